//! A closed-loop load generator and its targets.
//!
//! [`run`] starts N clients (tokio tasks); each one issues its next
//! operation as soon as the previous one is acknowledged, until M operations
//! have been issued in all. Each operation's latency is recorded and the run
//! is summed up as a [`Report`], the same one `replog benchmark` prints. The
//! first failed operation stops the run with an error that names it and
//! tells how many operations had succeeded: nothing is retried.
//!
//! What is loaded is a [`Target`]: [`ReplogTarget`] appends to a replog
//! cluster (`--endpoint`), [`EtcdTarget`] puts values into an etcd cluster
//! (`--etcd`). Both speak gRPC over one HTTP/2 connection per client,
//! through the same unary caller ([`crate::grpc_unary`]), so the two are
//! measured through the same client stack.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use indicatif::ProgressBar;
use replog_proto::client::{AppendRequest, AppendResponse};
use replog_proto::etcd;
use replog_proto::etcd::maintenance_client::MaintenanceClient;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::benchmark::{BenchmarkArgs, Report};
use crate::grpc_unary::UnaryConn;
use crate::support::{progress_bar, runtime};

/// How long a client may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Something the generator puts values into.
///
/// Each client first opens its own [`Target::Session`] (a connection, kept
/// for the whole run), then calls [`Target::put`] on it back to back.
pub trait Target: Send + Sync + 'static {
    /// One client's connection and state.
    type Session: Send + 'static;

    /// Opens client `client`'s session (0-based). Not timed.
    fn connect(&self, client: usize) -> impl Future<Output = Result<Self::Session>> + Send;

    /// Writes `payload` as operation `seq` (0-based, unique in the run) and
    /// returns once the target acknowledged it durably.
    fn put(
        &self,
        session: &mut Self::Session,
        seq: u64,
        payload: Bytes,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The report's label.
    pub label: String,
    /// Concurrent clients (at least 1).
    pub clients: usize,
    /// Operations in total, over all clients.
    pub count: u64,
    /// Bytes of each operation's payload.
    pub value_size: usize,
    /// An operation (or a connect) taking longer fails the run.
    pub op_timeout: Option<Duration>,
}

async fn with_timeout<F: Future<Output = Result<T>>, T>(
    limit: Option<Duration>,
    f: F,
) -> Result<T> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f)
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {d:?}"))),
    }
}

/// Runs `spec` against `target`: connects every client, then runs the
/// closed loop. `progress` is advanced once per acknowledged operation
/// (pass [`ProgressBar::hidden`] for none).
pub async fn run<T: Target>(
    target: Arc<T>,
    spec: &LoadSpec,
    progress: &ProgressBar,
) -> Result<Report> {
    if spec.clients == 0 {
        bail!("the load generator needs at least one client");
    }
    if spec.count == 0 {
        bail!("the load generator needs at least one operation");
    }

    let mut connects = JoinSet::new();
    for c in 0..spec.clients {
        let target = target.clone();
        let limit = spec.op_timeout;
        connects.spawn(async move { (c, with_timeout(limit, target.connect(c)).await) });
    }
    let mut sessions: Vec<Option<T::Session>> = (0..spec.clients).map(|_| None).collect();
    while let Some(joined) = connects.join_next().await {
        let (c, session) = joined.context("a connecting client panicked")?;
        sessions[c] = Some(session.with_context(|| format!("client {c} cannot connect"))?);
    }

    let payload = Bytes::from(
        (0..spec.value_size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let succeeded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let per_client = (spec.count / spec.clients as u64 + 1) as usize;
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for (c, session) in sessions.into_iter().enumerate() {
        let mut session = session.expect("every client connected");
        let (target, payload, next, succeeded, stop, progress) = (
            target.clone(),
            payload.clone(),
            next.clone(),
            succeeded.clone(),
            stop.clone(),
            progress.clone(),
        );
        let (count, limit) = (spec.count, spec.op_timeout);
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut completions = Vec::with_capacity(per_client);
            while !stop.load(Ordering::Relaxed) {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let t = Instant::now();
                if let Err(e) = with_timeout(limit, target.put(&mut session, seq, payload.clone())).await {
                    stop.store(true, Ordering::Relaxed);
                    let ok = succeeded.load(Ordering::SeqCst);
                    return Err(e.context(format!(
                        "client {c}: operation {seq} failed; {ok} of {count} operations had succeeded"
                    )));
                }
                let done = Instant::now();
                latencies.push(done - t);
                completions.push(done - start);
                succeeded.fetch_add(1, Ordering::SeqCst);
                progress.inc(1);
            }
            Ok((latencies, completions))
        });
    }
    let mut latencies = Vec::with_capacity(spec.count as usize);
    let mut completions = Vec::with_capacity(spec.count as usize);
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok((l, c))) => {
                latencies.extend(l);
                completions.extend(c);
            }
            Ok(Err(e)) => {
                workers.abort_all();
                return Err(e);
            }
            Err(e) => {
                workers.abort_all();
                return Err(anyhow!("a client task failed: {e}"));
            }
        }
    }
    let elapsed = start.elapsed();
    let bytes = latencies.len() as u64 * spec.value_size as u64;
    let mut report = Report::new(&spec.label, latencies, bytes, elapsed);
    report.longest_gap_us = Some(longest_gap(completions).as_micros() as u64);
    Ok(report)
}

/// The longest stretch, from the start of the run (offset zero) through
/// the given completion offsets, with no completion in it.
fn longest_gap(mut completions: Vec<Duration>) -> Duration {
    completions.sort_unstable();
    let mut previous = Duration::ZERO;
    let mut longest = Duration::ZERO;
    for c in completions {
        longest = longest.max(c - previous);
        previous = c;
    }
    longest
}

// ---------------------------------------------------------------------------
// etcd

/// A client URL such as `http://127.0.0.1:2379`, without a trailing `/`.
fn parse_endpoint(s: &str) -> Result<String> {
    let s = s.trim().trim_end_matches('/');
    let uri: Uri = s.parse().with_context(|| format!("'{s}' is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("'{s}': only http:// endpoints are supported, not {other}://"),
        None => bail!("'{s}' has no scheme: write http://{s}"),
    }
    if uri.authority().is_none() || !matches!(uri.path(), "" | "/") {
        bail!("'{s}' is not an endpoint such as http://127.0.0.1:2379");
    }
    Ok(s.to_string())
}

/// Opens one gRPC connection (HTTP/2) to an etcd member.
async fn etcd_channel(endpoint: &str) -> Result<Channel> {
    Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("'{endpoint}' is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// Puts values into an etcd cluster's leader through etcd's own gRPC API
/// (`etcdserverpb.KV/Put`), the way etcd's Go client does. Each client
/// keeps its own HTTP/2 connection to the leader, like the replog target.
#[derive(Debug)]
pub struct EtcdTarget {
    /// The leader's client URL.
    pub leader: String,
    /// The leader's member id.
    pub leader_id: u64,
    /// The leader's etcd version.
    pub version: String,
    key_prefix: String,
}

impl EtcdTarget {
    /// Asks every endpoint for its status (`Maintenance/Status`) and picks
    /// the one that is the leader. Unreachable endpoints are only warned
    /// about, as long as one that answers is the leader.
    pub async fn discover(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        let mut answers = Vec::new();
        let mut errors = Vec::new();
        for ep in endpoints {
            let ep = parse_endpoint(ep)?;
            let status = tokio::time::timeout(Duration::from_secs(5), async {
                let mut m = MaintenanceClient::new(etcd_channel(&ep).await?);
                let r = m.status(etcd::StatusRequest {}).await?.into_inner();
                anyhow::Ok(r)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within 5s")));
            match status {
                Ok(s) => answers.push((ep, s)),
                Err(e) => errors.push(format!("{ep}: {e:#}")),
            }
        }
        if answers.is_empty() {
            bail!("no etcd endpoint answered: {}", errors.join("; "));
        }
        let member = |s: &etcd::StatusResponse| s.header.as_ref().map_or(0, |h| h.member_id);
        let Some((leader, s)) = answers
            .iter()
            .find(|(_, s)| s.leader != 0 && member(s) == s.leader)
        else {
            let seen: Vec<String> = answers
                .iter()
                .map(|(ep, s)| {
                    format!(
                        "{ep} is member {:x} and names leader {:x}",
                        member(s),
                        s.leader
                    )
                })
                .collect();
            bail!(
                "none of the endpoints that answered is the leader ({}); pass the leader's client URL too",
                seen.join("; ")
            );
        };
        for e in &errors {
            tracing::warn!("etcd endpoint {e} (going on with the leader)");
        }
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Ok(EtcdTarget {
            leader: leader.clone(),
            leader_id: s.leader,
            version: s.version.clone(),
            key_prefix: format!("replog-bench/{run}/"),
        })
    }
}

impl Target for EtcdTarget {
    type Session = UnaryConn;

    /// Opens the client's own connection to the leader.
    async fn connect(&self, _client: usize) -> Result<UnaryConn> {
        UnaryConn::connect(&self.leader, CONNECT_TIMEOUT).await
    }

    async fn put(&self, conn: &mut UnaryConn, seq: u64, payload: Bytes) -> Result<()> {
        let req = etcd::PutRequest {
            key: Bytes::from(format!("{}{seq:010}", self.key_prefix)),
            value: payload,
            ..Default::default()
        };
        let r: etcd::PutResponse = conn
            .call("/etcdserverpb.KV/Put", &req)
            .await
            .with_context(|| format!("put to {}", self.leader))?;
        if r.header.is_none() {
            bail!("etcd answered a put without a response header");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// the command line

/// Appends to a replog cluster's leader (`replog.client.v1.ReplogClient/
/// Append`), each client on its own HTTP/2 connection: the same client
/// stack as [`EtcdTarget`]. The leader is found
/// once, before the clock starts, with the `replog-client` crate; during the
/// run nothing is retried or redirected (a leader change fails the run).
pub struct ReplogTarget {
    /// The leader found before the run (not timed).
    pub leader: String,
}

impl ReplogTarget {
    /// Finds the cluster's leader among `endpoints`.
    pub async fn discover(endpoints: &[String]) -> Result<Self> {
        let client = replog_client::Client::new(endpoints);
        let leader = client
            .leader()
            .await
            .context("cannot find the replog cluster's leader")?;
        Ok(ReplogTarget { leader })
    }
}

impl Target for ReplogTarget {
    type Session = UnaryConn;

    /// Opens the client's own connection to the leader.
    async fn connect(&self, _client: usize) -> Result<UnaryConn> {
        UnaryConn::connect(&self.leader, CONNECT_TIMEOUT).await
    }

    async fn put(&self, conn: &mut UnaryConn, _seq: u64, payload: Bytes) -> Result<()> {
        let r: AppendResponse = conn
            .call(
                "/replog.client.v1.ReplogClient/Append",
                &AppendRequest { data: payload },
            )
            .await
            .with_context(|| format!("append to {}", self.leader))?;
        if r.position == 0 {
            bail!("{} acknowledged an append at position 0", self.leader);
        }
        Ok(())
    }
}

/// `replog benchmark --endpoint E[,E...]`: appends `--count` entries of
/// `--value-size` bytes to a running replog cluster from `--concurrency`
/// closed-loop clients (the same generator as `--etcd`).
pub fn replog_benchmark(a: BenchmarkArgs) -> Result<()> {
    let endpoints = a.endpoint.clone();
    closed_loop_benchmark(&a, "replog append", async move {
        let target = ReplogTarget::discover(&endpoints).await?;
        eprintln!("replog: leader at {}", target.leader);
        Ok(target)
    })
}

/// How long one operation may take before the run fails.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// `replog benchmark --etcd URL[,URL...]`: puts `--count` values of
/// `--value-size` bytes into the etcd cluster's leader from
/// `--concurrency` closed-loop clients and prints the report like the
/// replog benchmark does.
pub fn etcd_benchmark(a: BenchmarkArgs) -> Result<()> {
    let endpoints = a.etcd.clone();
    closed_loop_benchmark(&a, "etcd put", async move {
        let target = EtcdTarget::discover(&endpoints).await?;
        eprintln!(
            "etcd {}: leader {} (member {:x}), gRPC KV/Put",
            target.version, target.leader, target.leader_id
        );
        Ok(target)
    })
}

/// Runs the closed loop of `a` (`--concurrency`, `--count`, `--value-size`)
/// against the target `discover` finds, and prints the report (`--json`).
fn closed_loop_benchmark<T: Target>(
    a: &BenchmarkArgs,
    what: &str,
    discover: impl Future<Output = Result<T>>,
) -> Result<()> {
    let concurrency = match a.concurrency[..] {
        [c] if c > 0 => c,
        [_] => bail!("--concurrency must be at least 1"),
        _ => bail!("--endpoint and --etcd take one --concurrency level per run"),
    };
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let rt = runtime()?;
    let report = rt.block_on(async {
        let target = discover.await?;
        let spec = LoadSpec {
            label: format!("{what} c={concurrency}"),
            clients: concurrency,
            count: a.count,
            value_size: a.value_size,
            op_timeout: Some(OP_TIMEOUT),
        };
        let pb = progress_bar(a.count, what, !a.json);
        let r = run(Arc::new(target), &spec, &pb).await;
        pb.finish_and_clear();
        r
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&[&report])?);
    } else {
        println!("{}", report.line());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// An in-process target: records who put what; op `fail_at` fails; op
    /// `seq` takes `latency(seq)` of (tokio) time.
    struct Fake {
        puts: Mutex<Vec<(usize, u64, usize)>>,
        fail_at: Option<u64>,
        latency: fn(u64) -> Duration,
    }

    impl Fake {
        fn new(fail_at: Option<u64>, latency: fn(u64) -> Duration) -> Arc<Self> {
            Arc::new(Fake {
                puts: Mutex::new(Vec::new()),
                fail_at,
                latency,
            })
        }
    }

    impl Target for Fake {
        type Session = usize;
        async fn connect(&self, client: usize) -> Result<usize> {
            Ok(client)
        }
        async fn put(&self, client: &mut usize, seq: u64, payload: Bytes) -> Result<()> {
            tokio::time::sleep((self.latency)(seq)).await;
            if Some(seq) == self.fail_at {
                bail!("injected failure");
            }
            self.puts
                .lock()
                .unwrap()
                .push((*client, seq, payload.len()));
            Ok(())
        }
    }

    fn spec(clients: usize, count: u64) -> LoadSpec {
        LoadSpec {
            label: "fake".into(),
            clients,
            count,
            value_size: 256,
            op_timeout: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_exactly_count_ops_across_clients() {
        for (clients, count) in [(1, 10), (7, 1000), (64, 5000), (50, 3)] {
            let fake = Fake::new(None, |s| Duration::from_micros(s % 50));
            let r = run(fake.clone(), &spec(clients, count), &ProgressBar::hidden())
                .await
                .unwrap();
            let puts = fake.puts.lock().unwrap();
            assert_eq!(r.count as u64, count);
            assert_eq!(puts.len() as u64, count);
            assert_eq!(r.bytes, count * 256);
            assert!(puts.iter().all(|&(_, _, len)| len == 256));
            let seqs: HashSet<u64> = puts.iter().map(|&(_, s, _)| s).collect();
            assert_eq!(
                seqs,
                (0..count).collect::<HashSet<u64>>(),
                "each op exactly once"
            );
            let used: HashSet<usize> = puts.iter().map(|&(c, _, _)| c).collect();
            assert!(used.iter().all(|&c| c < clients));
            if count >= 10 * clients as u64 {
                assert_eq!(used.len(), clients, "every client took part");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stops_on_the_first_error() {
        let fake = Fake::new(Some(100), |_| Duration::from_micros(50));
        let e = run(fake.clone(), &spec(8, 100_000), &ProgressBar::hidden())
            .await
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("operation 100 failed"), "{msg}");
        assert!(msg.contains("operations had succeeded"), "{msg}");
        assert!(msg.contains("injected failure"), "{msg}");
        // The other clients stop after their operation in flight: nowhere
        // near the whole count is issued.
        let n = fake.puts.lock().unwrap().len();
        assert!(
            (92..=120).contains(&n),
            "{n} ops went through after the failure"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_of_known_latencies() {
        // Op i takes (i+1) ms: latencies 1..=100 ms, one client.
        let fake = Fake::new(None, |s| Duration::from_millis(s + 1));
        let r = run(fake, &spec(1, 100), &ProgressBar::hidden())
            .await
            .unwrap();
        assert_eq!(r.count, 100);
        assert_eq!(r.p50_us, 50_000);
        assert_eq!(r.p99_us, 99_000);
        assert_eq!(r.max_us, 100_000);
        assert!((r.seconds - 5.050).abs() < 1e-6, "{}", r.seconds);
        assert!((r.ops_per_sec - 100.0 / 5.050).abs() < 1e-6);

        // Four clients, the same ops: the latencies stay the op's own, the
        // run takes about a quarter of the time.
        let fake = Fake::new(None, |s| Duration::from_millis(s + 1));
        let r = run(fake, &spec(4, 100), &ProgressBar::hidden())
            .await
            .unwrap();
        assert_eq!((r.p50_us, r.p99_us, r.max_us), (50_000, 99_000, 100_000));
        assert!(r.seconds < 1.5, "{}", r.seconds);
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_stretch_without_a_completion_is_reported() {
        // One client; op 5 takes 2 s, the others 1 ms.
        let fake = Fake::new(None, |s| {
            Duration::from_millis(if s == 5 { 2000 } else { 1 })
        });
        let r = run(fake, &spec(1, 10), &ProgressBar::hidden())
            .await
            .unwrap();
        assert_eq!(r.longest_gap_us, Some(2_000_000));
        assert_eq!(
            longest_gap(vec![Duration::from_millis(3), Duration::from_millis(1)]),
            Duration::from_millis(2)
        );
        assert_eq!(longest_gap(Vec::new()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_op_times_out() {
        let fake = Fake::new(None, |s| Duration::from_secs(if s == 3 { 60 } else { 0 }));
        let mut sp = spec(1, 10);
        sp.op_timeout = Some(Duration::from_secs(1));
        let e = run(fake, &sp, &ProgressBar::hidden()).await.unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("operation 3 failed; 3 of 10"), "{msg}");
        assert!(msg.contains("no answer within"), "{msg}");
    }

    #[tokio::test]
    async fn zero_clients_or_ops_are_refused() {
        let fake = Fake::new(None, |_| Duration::ZERO);
        assert!(run(fake.clone(), &spec(0, 10), &ProgressBar::hidden())
            .await
            .is_err());
        assert!(run(fake, &spec(1, 0), &ProgressBar::hidden())
            .await
            .is_err());
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint(" http://127.0.0.1:2379/ ").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert!(parse_endpoint("https://127.0.0.1:2379").is_err());
        assert!(parse_endpoint("127.0.0.1:2379").is_err());
        assert!(parse_endpoint("http://127.0.0.1:2379/v3").is_err());
    }

    #[tokio::test]
    async fn discover_fails_clearly_without_etcd() {
        // Port 1 on loopback: nothing listens there.
        let e = EtcdTarget::discover(&["http://127.0.0.1:1".to_string()])
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("no etcd endpoint answered"),
            "{e:#}"
        );
    }

    #[test]
    fn benchmark_flags() {
        let parse = |args: &[&str]| {
            let argv: Vec<&str> = ["benchmark"].iter().chain(args).copied().collect();
            crate::support::parse_args::<BenchmarkArgs>(&argv)
        };
        let a = parse(&[
            "--etcd",
            "http://a:1,http://b:2",
            "--concurrency",
            "64",
            "--count",
            "5",
            "--value-size",
            "1KB",
        ])
        .unwrap();
        assert_eq!(a.etcd, ["http://a:1", "http://b:2"]);
        assert_eq!(a.concurrency, [64]);
        assert_eq!((a.count, a.value_size), (5, 1024));
        let a = parse(&["--path", "/p", "--input", "/t"]).unwrap();
        assert!(a.etcd.is_empty());
        assert_eq!(a.value_size, 256);
        assert!(
            parse(&[]).is_err(),
            "the replog benchmark still needs --path and --input"
        );
        assert!(parse(&["--path", "/p"]).is_err());
        assert!(parse(&["--etcd", "http://a:1", "--path", "/p"]).is_err());
    }
}
