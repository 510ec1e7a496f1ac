//! The closed-loop load generator.
//!
//! [`run`] starts N clients (tokio tasks); each one issues its next
//! operation as soon as the previous one is acknowledged, until M operations
//! have been issued in all. Each operation's latency is recorded and the run
//! is summed up as a [`Report`], the same one `replog benchmark` prints. The
//! first failed operation stops the run with an error that names it and
//! tells how many operations had succeeded: nothing is retried.
//!
//! What is loaded is a [`Target`]: [`crate::replog_target::ReplogTarget`]
//! appends to a replog cluster (`--endpoint`), [`crate::etcd::EtcdTarget`]
//! puts values into an etcd cluster (`--etcd`). Both speak gRPC over one
//! HTTP/2 connection per client, through the same unary caller
//! ([`crate::grpc_unary`]), so the two are measured through the same client
//! stack.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use indicatif::ProgressBar;
use replog_cli::benchmark::Report;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long a client may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
}
