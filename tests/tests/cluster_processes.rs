//! Real-process cluster tests: every replica is a `replog replica` process on
//! 127.0.0.1 with its own RocksDB directory under a tempdir, driven through
//! `replog_client::Client` and the `replog` CLI, and killed with SIGKILL.
//!
//! The `replog` binary must be built in the same target directory first
//! (`cargo build -p replog-cli --bin replog`); `REPLOG_BIN` overrides where
//! it is looked for. The load-generator test runs `replog-bench` likewise
//! (`cargo build -p replog-bench --bin replog-bench`, `REPLOG_BENCH_BIN`).
//!
//! Every replica's stdout and stderr go to `rN.log` in the test's tempdir
//! (`--log info`); when a test fails, the tails of those files are printed.
//! The tests run one at a time (they are timing-sensitive on small machines)
//! and every wait polls against a deadline: they assert behaviour, not speed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replog_client::{Client, ClientConfig, ClientError, StatusResponse};
use replog_tests::procs::{
    self, output_text, replog_bin, run, tail, target_bin, tool_command, VOTING,
};
use replog_tests::{check_payload, copy_dir, payload};

/// Replica statuses as the status RPC reports them.
const EMPTY: i32 = 1;
const RECOVERING: i32 = 3;

/// How long any one wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

fn status_name(s: i32) -> &'static str {
    match s {
        EMPTY => "EMPTY",
        2 => "STARTING",
        RECOVERING => "RECOVERING",
        VOTING => "VOTING",
        _ => "UNKNOWN",
    }
}

/// A free port (see [`replog_tests::procs::free_port`]).
fn free_port() -> u16 {
    replog_tests::procs::free_port(0)
}

/// The `replog-bench` binary (the load generator) of this target directory.
fn replog_bench_bin() -> PathBuf {
    target_bin("replog-bench", "replog-bench", "REPLOG_BENCH_BIN")
}

struct Node {
    cluster_id: String,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    /// The other replicas this one is started with (`--peers`).
    peers: BTreeMap<u64, u16>,
    child: Mutex<Option<Child>>,
}

impl Node {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }
}

/// Replica processes of one test. Dropping it SIGKILLs every process; when
/// the test is failing it prints the tail of every replica's log first.
struct Cluster {
    root: tempfile::TempDir,
    bin: PathBuf,
    nodes: BTreeMap<u64, Node>,
    /// Used for status calls only.
    status_client: Client,
    started: Instant,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        procs::kill_all(self.nodes.values().map(|n| &n.child));
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = self.nodes.values().map(|n| n.log.clone()).collect();
            logs.push(self.root.path().join("cli.log"));
            procs::post_mortem(&logs, 60, &mut self.root);
        }
    }
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            root: tempfile::tempdir().unwrap(),
            bin: replog_bin(),
            nodes: BTreeMap::new(),
            status_client: Client::with_config(
                Vec::<String>::new(),
                ClientConfig {
                    connect_timeout: Duration::from_secs(1),
                    request_timeout: Duration::from_secs(3),
                    ..Default::default()
                },
            ),
            started: Instant::now(),
        }
    }

    /// `n` replicas of `cluster_id`, initialized with `replog initialize`,
    /// started, and serving under a leader.
    async fn initialized(cluster_id: &str, n: u64) -> Cluster {
        Cluster::initialized_with(cluster_id, n, &[], &[]).await
    }

    /// Like [`Cluster::initialized`], with more `replog initialize` flags
    /// (`init`) and more `replog replica` flags (`flags`).
    async fn initialized_with(cluster_id: &str, n: u64, init: &[&str], flags: &[&str]) -> Cluster {
        let mut c = Cluster::new();
        let ports: BTreeMap<u64, u16> = (1..=n).map(|id| (id, free_port())).collect();
        for id in 1..=n {
            c.add_node(id, cluster_id, ports[&id], &ports);
            c.initialize_with(id, &ports, init);
        }
        for id in 1..=n {
            c.start(id, flags);
        }
        for id in 1..=n {
            c.wait_serving(id).await;
        }
        c.wait_leader("the first leader", |_, _| true).await;
        c
    }

    /// Declares replica `id` (not started); its peers are `all` but itself.
    fn add_node(&mut self, id: u64, cluster_id: &str, port: u16, all: &BTreeMap<u64, u16>) {
        let peers = all
            .iter()
            .filter(|(p, _)| **p != id)
            .map(|(p, port)| (*p, *port))
            .collect();
        let dir = self.root.path().join(format!("r{id}"));
        let log = self.root.path().join(format!("r{id}.log"));
        self.nodes.insert(
            id,
            Node {
                cluster_id: cluster_id.to_string(),
                port,
                dir,
                log,
                peers,
                child: Mutex::new(None),
            },
        );
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    fn endpoint(&self, id: u64) -> String {
        self.node(id).endpoint()
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(Node::endpoint).collect()
    }

    fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.running())
            .map(|(id, _)| *id)
            .collect()
    }

    fn note(&self, what: &str) {
        eprintln!("[{:>6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Appends a harness line to a log file, so restarts show in it.
    fn mark(&self, log: &Path, what: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        writeln!(
            f,
            "===== [{:.2}s] test harness: {what}",
            self.started.elapsed().as_secs_f64()
        )
        .unwrap();
    }

    fn command(&self) -> Command {
        tool_command(&self.bin)
    }

    /// Runs a short `replog` command to completion; its output goes to
    /// `cli.log` and is returned.
    fn cli(&self, args: &[String]) -> Output {
        self.run_tool(&self.bin, "replog", args)
    }

    /// Runs `bin` (called `name` in the log) with `args` to completion; its
    /// output goes to `cli.log` and is returned.
    fn run_tool(&self, bin: &Path, name: &str, args: &[String]) -> Output {
        let out = tool_command(bin)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let log = self.root.path().join("cli.log");
        self.mark(
            &log,
            &format!("{name} {} -> {}", args.join(" "), out.status),
        );
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&out.stdout).unwrap();
        f.write_all(&out.stderr).unwrap();
        out
    }

    fn initialize_with(&self, id: u64, members: &BTreeMap<u64, u16>, extra: &[&str]) {
        let node = self.node(id);
        let members: Vec<String> = members
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect();
        let args: Vec<String> = [
            "initialize",
            "--path",
            &node.dir.to_string_lossy(),
            "--cluster-id",
            &node.cluster_id,
            "--replica-id",
            &id.to_string(),
            "--members",
            &members.join(","),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "replog initialize of replica {id} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `replog replica` arguments of replica `id` on `dir`, `port`.
    fn replica_args(&self, id: u64, dir: &Path, port: u16, extra: &[&str]) -> Vec<String> {
        let node = self.node(id);
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--log".into(),
            "info".into(),
            "--path".into(),
            dir.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--cluster-id".into(),
            node.cluster_id.clone(),
            "--replica-id".into(),
            id.to_string(),
            "--tick-interval".into(),
            "20ms".into(),
            "--ping-timeout".into(),
            "500ms".into(),
        ];
        if !node.peers.is_empty() {
            let peers: Vec<String> = node
                .peers
                .iter()
                .map(|(p, port)| format!("{p}=127.0.0.1:{port}"))
                .collect();
            args.push("--peers".into());
            args.push(peers.join(","));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn spawn_logged(&self, args: &[String], log: &Path) -> Child {
        self.mark(log, &format!("starting replog {}", args.join(" ")));
        let file = OpenOptions::new().append(true).open(log).unwrap();
        self.command()
            .args(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()))
    }

    /// Starts replica `id` on its directory (`extra`: more flags).
    fn start(&self, id: u64, extra: &[&str]) {
        let node = self.node(id);
        let mut slot = node.child.lock().unwrap();
        assert!(slot.is_none(), "replica {id} is already running");
        let args = self.replica_args(id, &node.dir, node.port, extra);
        *slot = Some(self.spawn_logged(&args, &node.log));
        drop(slot);
        self.note(&format!("started replica {id} {extra:?}"));
    }

    /// SIGKILLs replica `id` and reaps it.
    fn kill(&self, id: u64) {
        let node = self.node(id);
        let mut child = node
            .child
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| panic!("replica {id} is not running"));
        child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
        let status = child.wait().unwrap();
        self.mark(&node.log, &format!("SIGKILLed replica {id} ({status})"));
        self.note(&format!("SIGKILLed replica {id}"));
    }

    /// Fails the test if a replica process exited by itself.
    fn check_alive(&self) {
        procs::check_alive(self.nodes.iter().map(|(id, n)| (*id, &n.child)));
    }

    fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.node(id).log).unwrap_or_default()
    }

    /// What replica `id` logged since it was last started.
    fn last_run_log(&self, id: u64) -> String {
        let text = self.log_text(id);
        let start = text.rfind("test harness: starting").unwrap_or(0);
        text[start..].to_string()
    }

    async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.status_client.status_of(&self.endpoint(id)).await.ok()
    }

    /// Polls `f` until it gives a value; fails the test after [`WAIT`] or
    /// when a replica process dies.
    async fn wait<T>(&self, what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
        let every = Duration::from_millis(20);
        procs::poll(what, WAIT, every, || self.check_alive(), f).await
    }

    async fn wait_serving(&self, id: u64) {
        self.wait(&format!("replica {id} to serve"), async || {
            self.status(id).await
        })
        .await;
    }

    /// The running replica that leads in the highest term, if any.
    async fn leader(&self) -> Option<(u64, StatusResponse)> {
        procs::leader_of(self.running(), async |id| self.status(id).await).await
    }

    /// Waits for a leader that `ok` accepts.
    async fn wait_leader(
        &self,
        what: &str,
        ok: impl Fn(u64, &StatusResponse) -> bool,
    ) -> (u64, StatusResponse) {
        self.wait(what, async || {
            self.leader().await.filter(|(id, s)| ok(*id, s))
        })
        .await
    }

    /// Waits until replica `id` is VOTING with everything up to `position`
    /// applied, and the leader counts it as a voter.
    async fn wait_caught_up_voter(&self, id: u64, position: u64) {
        self.wait(
            &format!("replica {id} to be a VOTING voter with position {position} applied"),
            async || {
                let s = self.status(id).await?;
                let (_, l) = self.leader().await?;
                let voter = l.members.iter().any(|m| m.id == id && m.voter);
                (s.status == VOTING && s.applied >= position && voter).then_some(())
            },
        )
        .await;
    }

    /// Polls replica `id`'s status as fast as it answers until it is VOTING
    /// and a voter at the leader; returns every status seen, in order.
    async fn watch_until_voting(&self, id: u64) -> Vec<i32> {
        let mut seen: Vec<i32> = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            self.check_alive();
            if let Some(s) = self.status(id).await {
                if seen.last() != Some(&s.status) {
                    self.note(&format!("replica {id} is {}", status_name(s.status)));
                    seen.push(s.status);
                }
                if s.status == VOTING {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for replica {id} to be VOTING (seen {:?})",
                seen.iter().map(|s| status_name(*s)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen
    }

    /// A client of every replica the cluster knows.
    fn client(&self) -> Client {
        Client::with_config(
            self.endpoints(),
            ClientConfig {
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
    }

    /// `replog members remove ID`, then waits until the leader no longer
    /// counts it among the members.
    async fn remove_member(&self, id: u64) {
        let out = self.members(&["remove", &id.to_string()]);
        assert!(
            out.status.success(),
            "members remove: {}",
            output_text(&out)
        );
        self.wait(
            &format!("replica {id} to leave the leader's members"),
            async || {
                let (_, l) = self.leader().await?;
                (!l.members.iter().any(|m| m.id == id)).then_some(())
            },
        )
        .await;
    }

    /// Runs `replog members --endpoint <running replicas> ARGS`.
    fn members(&self, args: &[&str]) -> Output {
        let endpoints: Vec<String> = self
            .running()
            .into_iter()
            .map(|id| self.endpoint(id))
            .collect();
        let mut all: Vec<String> = vec!["members".into(), "--endpoint".into(), endpoints.join(",")];
        all.extend(args.iter().map(|s| s.to_string()));
        let out = self.cli(&all);
        self.note(&format!(
            "replog members {} -> {}",
            args.join(" "),
            out.status
        ));
        out
    }
}

/// A command of one of the workspace's binaries, without the caller's
/// `REPLOG_*` variables.
/// Writers appending `payload(seq)` through one client, each recording what
/// was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    /// position -> seq of every acknowledged append.
    acked: Arc<Mutex<BTreeMap<u64, u64>>>,
    /// Failed appends by kind (none of them was acknowledged).
    failures: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Broken promises seen by the writers (a position acknowledged twice).
    violations: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn failure_kind(e: &ClientError) -> String {
    match e {
        ClientError::Replica { code, .. } => code.clone(),
        ClientError::OutcomeUnknown { .. } => "OutcomeUnknown".into(),
        ClientError::NoLeader { .. } => "NoLeader".into(),
        ClientError::Unreachable { .. } => "Unreachable".into(),
        ClientError::InvalidEndpoint(_) => "InvalidEndpoint".into(),
    }
}

impl Load {
    /// `writers` tasks, each appending one entry at a time, pausing `pace`
    /// between appends. Sequence numbers start at `base`.
    fn start(client: Client, writers: u64, pace: Duration, base: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(BTreeMap::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..writers)
            .map(|w| {
                let (client, stop, acked, failures, violations) = (
                    client.clone(),
                    stop.clone(),
                    acked.clone(),
                    failures.clone(),
                    violations.clone(),
                );
                tokio::spawn(async move {
                    let mut seq = base + w * 10_000_000;
                    while !stop.load(Ordering::SeqCst) {
                        seq += 1;
                        match client.append(payload(seq)).await {
                            Ok(r) => {
                                if let Some(prev) = acked.lock().unwrap().insert(r.position, seq) {
                                    violations.lock().unwrap().push(format!(
                                        "position {} acknowledged twice (seq {prev} and {seq})",
                                        r.position
                                    ));
                                }
                                if !pace.is_zero() {
                                    tokio::time::sleep(pace).await;
                                }
                            }
                            Err(e) => {
                                *failures
                                    .lock()
                                    .unwrap()
                                    .entry(failure_kind(&e))
                                    .or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            failures,
            violations,
            tasks,
        }
    }

    fn acks(&self) -> usize {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "{v:?}");
        self.acked.lock().unwrap().len()
    }

    fn last_position(&self) -> u64 {
        self.acked
            .lock()
            .unwrap()
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `more` further appends are acknowledged; returns how
    /// many there are in all.
    async fn wait_more(&self, c: &Cluster, what: &str, more: usize) -> usize {
        let target = self.acks() + more;
        let n = c
            .wait(
                &format!("{more} more acknowledged appends ({what})"),
                async || {
                    let n = self.acks();
                    (n >= target).then_some(n)
                },
            )
            .await;
        c.note(&format!("{n} appends acknowledged ({what})"));
        n
    }

    /// Stops the writers; returns what was acknowledged.
    async fn stop(self) -> BTreeMap<u64, u64> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("a writer task panicked");
        }
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "{v:?}");
        eprintln!(
            "load stopped: {} acknowledged, failures {:?}",
            self.acked.lock().unwrap().len(),
            self.failures.lock().unwrap()
        );
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Waits until every replica in `ids` is VOTING with the last acknowledged
/// position applied, then reads the log from each one's endpoint
/// (linearizable) and checks: every acknowledged position holds exactly its
/// payload, every entry is a whole payload written once, and all replicas
/// hold the same entries.
async fn verify_replicas(c: &Cluster, ids: &[u64], acked: &BTreeMap<u64, u64>) {
    assert!(!acked.is_empty(), "nothing was acknowledged");
    let last = *acked.keys().next_back().unwrap();
    let mut reference: Option<(u64, BTreeMap<u64, Vec<u8>>)> = None;
    for &id in ids {
        let s = c
            .wait(
                &format!("replica {id} to be VOTING with position {last} applied"),
                async || {
                    c.status(id)
                        .await
                        .filter(|s| s.status == VOTING && s.applied >= last)
                },
            )
            .await;
        let client = Client::with_config(
            [c.endpoint(id)],
            ClientConfig {
                request_timeout: Duration::from_secs(10),
                max_attempts: 5,
                ..Default::default()
            },
        );
        let mut got: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut from = s.first_index.max(1);
        while from <= last {
            let to = (from + 999).min(last);
            let r = client
                .read(from, to, true)
                .await
                .unwrap_or_else(|e| panic!("linearizable read {from}..={to} on replica {id}: {e}"));
            for e in r.entries {
                got.insert(e.position, e.data.to_vec());
            }
            from = to + 1;
        }
        for (p, seq) in acked {
            let data = got.get(p).unwrap_or_else(|| {
                panic!("replica {id}: acknowledged position {p} (seq {seq}) is missing")
            });
            assert!(
                *data == payload(*seq),
                "replica {id}: acknowledged position {p} holds other data than seq {seq}"
            );
        }
        let mut seqs: BTreeMap<u64, u64> = BTreeMap::new();
        for (p, data) in &got {
            let seq = check_payload(data).unwrap_or_else(|| {
                panic!(
                    "replica {id}: position {p} holds a torn or foreign entry of {} bytes",
                    data.len()
                )
            });
            if let Some(q) = seqs.insert(seq, *p) {
                panic!("replica {id}: seq {seq} was written twice, at {q} and {p}");
            }
        }
        match &reference {
            None => reference = Some((id, got)),
            Some((rid, r)) => assert!(
                *r == got,
                "replicas {rid} and {id} hold different entries up to {last}"
            ),
        }
        c.note(&format!(
            "replica {id}: all {} acknowledged appends read back (linearizable, up to {last})",
            acked.len()
        ));
    }
}

#[test]
fn leader_sigkill_under_load_loses_no_acknowledged_append() {
    run(async {
        let c = Cluster::initialized("kill", 3).await;
        let load = Load::start(c.client(), 4, Duration::from_millis(5), 1_000_000_000);
        for round in 1..=3 {
            load.wait_more(&c, &format!("before kill {round}"), 300)
                .await;
            let (old, old_s) = c
                .wait_leader(&format!("a leader (round {round})"), |_, _| true)
                .await;
            c.kill(old);
            let (new, new_s) = c
                .wait_leader(&format!("a new leader after killing {old}"), |id, s| {
                    id != old && s.term > old_s.term
                })
                .await;
            c.note(&format!(
                "round {round}: killed leader {old} (term {}); replica {new} leads in term {}",
                old_s.term, new_s.term
            ));
            assert_ne!(new, old);
            assert!(new_s.term > old_s.term);
            c.start(old, &[]);
            c.wait_serving(old).await;
            load.wait_more(&c, &format!("after failover {round}"), 300)
                .await;
        }
        let acked = load.stop().await;
        verify_replicas(&c, &[1, 2, 3], &acked).await;
    });
}

#[test]
fn wiped_follower_rejoins_empty_recovering_voting() {
    run(async {
        let c = Cluster::initialized("wipe", 3).await;
        let load = Load::start(c.client(), 3, Duration::from_millis(5), 2_000_000_000);
        load.wait_more(&c, "before the wipe", 300).await;
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let f = (1..=3).find(|id| *id != leader).unwrap();
        c.kill(f);
        std::fs::remove_dir_all(&c.node(f).dir).unwrap();
        c.note(&format!("wiped replica {f}'s directory"));
        load.wait_more(&c, &format!("with replica {f} gone"), 200)
            .await;

        c.start(f, &[]);
        let seen = c.watch_until_voting(f).await;
        let log = c.last_run_log(f);
        assert!(
            log.contains("created an EMPTY replica"),
            "replica {f} did not start EMPTY on its wiped directory"
        );
        assert_ne!(
            seen[0], VOTING,
            "a wiped replica must not start VOTING (statuses seen: {seen:?})"
        );
        let recovering_logged = log
            .lines()
            .any(|l| l.contains("replica status changed") && l.contains("to=RECOVERING"));
        assert!(
            seen.contains(&RECOVERING) || recovering_logged,
            "replica {f} never showed RECOVERING (statuses seen: {seen:?})"
        );
        assert!(
            log.contains("Received a recover response from a replica in VOTING status"),
            "replica {f}'s log lacks the recover protocol's lines"
        );
        c.wait_caught_up_voter(f, load.last_position()).await;
        load.wait_more(&c, "after the rejoin", 100).await;
        let acked = load.stop().await;
        verify_replicas(&c, &[1, 2, 3], &acked).await;
        // It holds the log from its beginning, not only what came after the
        // wipe.
        let s = c.status(f).await.unwrap();
        assert!(
            s.first_index <= *acked.keys().next().unwrap(),
            "replica {f} lacks the log's beginning (first index {})",
            s.first_index
        );
    });
}

/// Flips one byte in the middle of the largest WAL or SST file of `dir`.
fn flip_largest_data_file(dir: &Path) -> String {
    let (path, len) = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".log") || n.ends_with(".sst")
        })
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .max_by_key(|(_, len)| *len)
        .expect("a WAL or SST file");
    let offset = (len / 2) as usize;
    let mut data = std::fs::read(&path).unwrap();
    data[offset] ^= 0xA5;
    std::fs::write(&path, data).unwrap();
    format!(
        "{} at byte {offset} of {len}",
        path.file_name().unwrap().to_string_lossy()
    )
}

#[test]
fn corrupted_follower_restarted_non_strict_rejoins() {
    run(async {
        let c = Cluster::initialized("corrupt", 3).await;
        let load = Load::start(c.client(), 16, Duration::ZERO, 3_000_000_000);
        c.wait("3000 acknowledged appends", async || {
            (load.acks() >= 3000).then_some(())
        })
        .await;
        let mut acked = load.stop().await;
        let last = *acked.keys().next_back().unwrap();
        for id in 1..=3 {
            c.wait_caught_up_voter(id, last).await;
        }
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let f = (1..=3).find(|id| *id != leader).unwrap();
        c.kill(f);
        let dir = c.node(f).dir.clone();
        let flipped = flip_largest_data_file(&dir);
        c.note(&format!("replica {f}: flipped a byte of {flipped}"));

        // Strict (the default) refuses the damaged directory: on a copy.
        let copy = c.root.path().join(format!("r{f}-strict-copy"));
        copy_dir(&dir, &copy).unwrap();
        let strict_log = c.root.path().join(format!("r{f}-strict.log"));
        let args = c.replica_args(f, &copy, free_port(), &["--strict=true"]);
        let mut strict = c.spawn_logged(&args, &strict_log);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = strict.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = strict.kill();
                let _ = strict.wait();
                panic!(
                    "a strict replica kept running on a directory with a flip in {flipped}:\n{}",
                    tail(&strict_log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = std::fs::read_to_string(&strict_log).unwrap();
        assert!(
            !status.success(),
            "strict start on a flip in {flipped} exited with {status}"
        );
        assert!(
            text.to_lowercase().contains("corrupt"),
            "the strict refusal does not mention corruption:\n{}",
            tail(&strict_log, 20)
        );
        c.note(&format!(
            "strict start refused the damage ({status}): {}",
            text.lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or("<no error line>")
        ));

        // Non-strict keeps the intact prefix and rejoins.
        c.start(f, &["--strict=false"]);
        let load = Load::start(c.client(), 2, Duration::from_millis(5), 3_500_000_000);
        let seen = c.watch_until_voting(f).await;
        let log = c.last_run_log(f);
        assert!(
            seen.contains(&RECOVERING)
                || log
                    .lines()
                    .any(|l| l.contains("status changed") && l.contains("RECOVERING")),
            "replica {f} did not recover through RECOVERING (statuses seen: {seen:?})"
        );
        assert_ne!(seen[0], VOTING, "a damaged replica must not start VOTING");
        c.wait_caught_up_voter(f, load.last_position()).await;
        load.wait_more(&c, "after the rejoin", 100).await;
        acked.extend(load.stop().await);
        verify_replicas(&c, &[1, 2, 3], &acked).await;
    });
}

#[test]
fn membership_changes_and_leader_transfer_under_load() {
    run(async {
        let mut c = Cluster::initialized("members", 3).await;
        let port4 = free_port();
        let mut all: BTreeMap<u64, u16> = c.nodes.iter().map(|(id, n)| (*id, n.port)).collect();
        all.insert(4, port4);
        c.add_node(4, "members", port4, &all);
        let load = Load::start(c.client(), 3, Duration::from_millis(5), 4_000_000_000);
        load.wait_more(&c, "three replicas", 200).await;

        // Add replica 4: started EMPTY, then added; it catches up as a
        // learner and is promoted by the leader.
        c.start(4, &[]);
        c.wait_serving(4).await;
        let out = c.members(&["add", "4", &c.endpoint(4)]);
        assert!(out.status.success(), "members add: {}", output_text(&out));
        c.wait_caught_up_voter(4, load.last_position()).await;
        assert!(
            (1..=3).any(|id| c.log_text(id).lines().any(|l| l
                .contains("learner has caught up; promoting it to voter")
                && l.contains("replica=4"))),
            "no leader logged the promotion of learner 4"
        );
        let (_, l) = c.wait_leader("a leader", |_, _| true).await;
        assert_eq!(
            l.members.iter().filter(|m| m.voter).count(),
            4,
            "{:?}",
            l.members
        );
        load.wait_more(&c, "after adding 4", 100).await;

        // Remove a follower among the first three.
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let x = (1..=3).find(|id| *id != leader).unwrap();
        c.remove_member(x).await;
        c.kill(x);
        load.wait_more(&c, &format!("after removing {x}"), 100)
            .await;

        // Hand leadership to another voter (replica 4 if it does not lead).
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let to = if leader != 4 {
            4
        } else {
            c.running().into_iter().find(|id| *id != leader).unwrap()
        };
        let out = c.members(&["transfer-leader", &to.to_string()]);
        assert!(
            out.status.success(),
            "transfer-leader: {}",
            output_text(&out)
        );
        let (now, _) = c
            .wait_leader(&format!("replica {to} to lead"), |id, _| id == to)
            .await;
        assert_eq!(now, to);
        load.wait_more(&c, &format!("after moving leadership to {to}"), 100)
            .await;

        // Every replica is VOTING with the whole log; the removed one is out.
        let acked = load.stop().await;
        let remaining = c.running();
        assert_eq!(remaining.len(), 3, "{remaining:?}");
        verify_replicas(&c, &remaining, &acked).await;
    });
}

/// `replog members remove <the leader>`: the remaining voters must keep
/// taking writes without the removed leader having to be stopped, and no
/// append may be committed twice.
///
/// Today (raft-rs 0.7) the removed leader either keeps leading and drops
/// every proposal (appends get BUSY) or, when entries commit after its
/// removal, its driver thread panics in raft-rs (`raft.rs:943`,
/// `maybe_commit` unwraps the leader's own progress); the process then stays
/// up answering CLOSED, the client retries CLOSED appends (an append the
/// dead driver had already replicated is committed twice), and a client
/// whose first endpoint is the dead leader never finds the new one.
#[test]
fn removing_the_leader_is_refused_until_leadership_moves() {
    run(async {
        let c = Cluster::initialized("rmleader", 3).await;
        let load = Load::start(c.client(), 3, Duration::from_millis(5), 5_000_000_000);
        load.wait_more(&c, "three replicas", 200).await;
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        // raft-rs cannot run a leader that removed itself: refused, clearly.
        let out = c.members(&["remove", &leader.to_string()]);
        assert!(!out.status.success(), "removing the leader must be refused");
        assert!(
            output_text(&out).contains("transfer leadership"),
            "{}",
            output_text(&out)
        );
        // Move leadership, then the old leader can go.
        let to = (1..=3u64).find(|id| *id != leader).unwrap();
        let out = c.members(&["transfer-leader", &to.to_string()]);
        assert!(
            out.status.success(),
            "transfer-leader: {}",
            output_text(&out)
        );
        c.wait_leader("the new leader", |id, _| id == to).await;
        c.remove_member(leader).await;
        load.wait_more(&c, &format!("after removing {leader}"), 100)
            .await;
        c.kill(leader);
        let acked = load.stop().await;
        let remaining = c.running();
        verify_replicas(&c, &remaining, &acked).await;
    });
}

#[test]
fn replica_of_another_cluster_is_refused() {
    run(async {
        let mut c = Cluster::initialized("blue", 3).await;
        let client = c.client();
        let before = client.append(&b"blue-before"[..]).await.unwrap();
        let blue: BTreeMap<u64, u16> = c.nodes.iter().map(|(id, n)| (*id, n.port)).collect();
        let mut with_red = blue.clone();
        with_red.insert(4, free_port());
        c.add_node(4, "red", with_red[&4], &with_red);
        c.start(4, &[]);
        c.wait_serving(4).await;
        let blue_logs = async || {
            (1..=3)
                .map(|id| c.log_text(id))
                .find(|l| {
                    l.lines().any(|line| {
                        line.contains("refused a peer stream") && line.contains("cluster 'red'")
                    })
                })
                .map(|_| ())
        };
        c.wait(
            "a blue replica to log the refusal of cluster 'red'",
            blue_logs,
        )
        .await;
        // Blue keeps serving; red stays EMPTY and out of blue's membership.
        for i in 0..20 {
            let r = client
                .append(format!("blue-{i}").into_bytes())
                .await
                .unwrap();
            assert!(r.position > before.position);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let red = c.status(4).await.expect("red answers status");
        assert_eq!(red.cluster_id, "red");
        assert_eq!(red.status, EMPTY, "red is {}", status_name(red.status));
        let (_, l) = c.wait_leader("a blue leader", |_, _| true).await;
        assert_eq!(l.cluster_id, "blue");
        let ids: BTreeSet<u64> = l.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3]));
        assert!(!c.log_text(4).contains("status changed"));
    });
}

/// `replog-bench cluster --endpoint` (the load generator of the etcd
/// comparison) appends exactly `--count` entries of `--value-size` bytes
/// through the leader, over its own HTTP/2 unary caller.
#[test]
fn benchmark_endpoint_appends_every_operation_through_the_leader() {
    run(async {
        let c = Cluster::initialized("bench", 3).await;
        let client = c.client();
        let before = client.append(&b"before"[..]).await.unwrap().position;
        let eps = c.endpoints().join(",");
        let out = c.bench_ok(&[
            "cluster",
            "--endpoint",
            &eps,
            "--concurrency",
            "16",
            "--count",
            "300",
            "--value-size",
            "64",
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {out}"));
        assert_eq!(report[0]["count"], 300, "{out}");
        let after = client.append(&b"after"[..]).await.unwrap().position;
        // Everything in between is the benchmark's: 300 entries of the
        // generator's 64-byte payload, nothing lost and nothing extra.
        let mut from = before + 1;
        let mut seen = 0;
        while from < after {
            let r = client.read(from, after - 1, true).await.unwrap();
            let Some(last) = r.entries.last() else { break };
            from = last.position + 1;
            for e in &r.entries {
                let expected: Vec<u8> = (0..64).map(|i| b'a' + (i % 26) as u8).collect();
                assert_eq!(e.data.as_ref(), &expected[..], "entry {}", e.position);
                seen += 1;
            }
        }
        assert_eq!(seen, 300, "entries between {before} and {after}");
    });
}

// ---------------------------------------------------------------------------
// The scheduler-state store (`replog replica --state`)

impl Cluster {
    /// Runs `replog ARGS` and returns its stdout; fails the test if it fails.
    fn cli_ok(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "replog {} failed: {}",
            args.join(" "),
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `replog-bench ARGS` and returns its stdout; fails the test if it
    /// fails.
    fn bench_ok(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self.run_tool(&replog_bench_bin(), "replog-bench", &args);
        assert!(
            out.status.success(),
            "replog-bench {} failed: {}",
            args.join(" "),
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `replog state --endpoint <all> summary --json`, per replica.
    fn state_summaries(&self) -> Vec<serde_json::Value> {
        let eps = self.endpoints().join(",");
        let out = self.cli_ok(&["state", "--endpoint", &eps, "summary", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {out}"))
    }

    fn backup_file(&self, dir: &Path) -> PathBuf {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("scheduler-backup-")
            })
            .collect();
        files.sort();
        files.pop().expect("a backup in the directory")
    }
}

/// The state hash and task count a backup holds after deleting the tasks
/// matching `deleted`, computed offline in a standalone store.
fn expected_state(file: &Path, deleted: Option<&replog_state::TaskQuery>) -> (String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let st = replog_state::StateStore::open_standalone(dir.path(), replog_state::Limits::default())
        .unwrap();
    replog_store::backup::load_into(&st, file, 1, None).unwrap();
    if let Some(q) = deleted {
        let ids: Vec<String> = st
            .tasks(q)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        let txn = replog_proto::state::Transaction {
            ops: vec![replog_proto::state::Op {
                op: Some(replog_proto::state::op::Op::RemoveTasks(
                    replog_proto::state::RemoveTasks { task_ids: ids },
                )),
            }],
        };
        assert!(!st.apply(2, &txn).unwrap().is_rejected());
    }
    (st.state_hash().unwrap(), st.counts().unwrap().tasks)
}

#[test]
fn backup_under_writes_stage_delete_commit_fails_the_writer_over() {
    run(async {
        let c = Cluster::initialized_with("sched", 3, &[], &["--state"]).await;
        let eps = c.endpoints().join(",");
        c.load_tasks(&eps, &["--tasks", "100000", "--batch", "1000"]);
        c.note("wrote 100,000 tasks");

        // A backup while writes continue.
        let backups = c.root.path().join("backups");
        let mut writer = c
            .command()
            .args([
                "state",
                "--endpoint",
                &eps,
                "load",
                "--tasks",
                "20000",
                "--first",
                "100000",
                "--batch",
                "200",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cli_ok(&[
            "backup",
            "--endpoint",
            &eps,
            "--dir",
            &backups.to_string_lossy(),
        ]);
        assert!(
            writer.wait().unwrap().success(),
            "the concurrent writes failed"
        );
        let file = c.backup_file(&backups);
        c.note(&format!("backup {} taken under writes", file.display()));
        let verified = c.cli_ok(&["backup", "verify", &file.to_string_lossy()]);
        assert!(verified.contains("OK"), "{verified}");

        // More changes after the backup: the commit undoes them.
        c.load_tasks(&eps, &["--tasks", "5000", "--first", "200000"]);

        let f = file.to_string_lossy().to_string();
        c.cli_ok(&["recovery", "--endpoint", &eps, "stage", &f]);
        let again = c.cli(&["recovery", "--endpoint", &eps, "stage", &f].map(String::from));
        assert!(!again.status.success());
        assert!(
            output_text(&again).contains("ALREADY_STAGED"),
            "{}",
            output_text(&again)
        );
        let printed = c.cli_ok(&[
            "recovery",
            "--endpoint",
            &eps,
            "print-tasks",
            "--role",
            "role-3",
            "--status",
            "FAILED",
        ]);
        let shown = printed.lines().filter(|l| l.contains("FAILED")).count();
        assert!(shown > 100, "{printed}");
        let deleted = c.cli_ok(&[
            "recovery",
            "--endpoint",
            &eps,
            "delete-tasks",
            "--role",
            "role-3",
            "--status",
            "FAILED",
        ]);
        assert!(
            deleted.contains(&format!("deleted {shown} tasks")),
            "{deleted}"
        );

        let query = replog_state::TaskQuery {
            role: Some("role-3".into()),
            statuses: vec![replog_proto::state::ScheduleStatus::Failed],
            ..Default::default()
        };
        let (hash, tasks) = expected_state(&file, Some(&query));
        // The backup is staged on the replica that led when it was staged.
        let listed = c.cli_ok(&["recovery", "--endpoint", &eps, "list"]);
        let holder: u64 = listed
            .lines()
            .find_map(|l| l.strip_prefix("on replica "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no holder in: {listed}"));
        // Leadership moves away before the commit (an election under load
        // does the same): the commit moves it back to the holder first.
        let elsewhere = if holder == 1 { 2 } else { 1 };
        c.cli_ok(&[
            "members",
            "--endpoint",
            &eps,
            "transfer-leader",
            &elsewhere.to_string(),
        ]);
        c.wait_leader("leadership away from the holder", |id, _| id != holder)
            .await;
        let committed = c.cli_ok(&["recovery", "--endpoint", &eps, "commit"]);
        c.note(&format!("commit: {}", committed.trim()));
        assert!(committed.contains("committed"), "{committed}");
        let old_leader = holder;
        // Committing again finds nothing staged, and the commit recorded.
        let again = c.cli(&["recovery", "--endpoint", &eps, "commit"].map(String::from));
        assert!(!again.status.success(), "{}", output_text(&again));
        assert!(
            output_text(&again).contains("nothing is staged"),
            "{}",
            output_text(&again)
        );
        let listed = c.cli_ok(&["recovery", "--endpoint", &eps, "list"]);
        assert!(
            listed.contains("nothing staged") && listed.contains("last committed recovery"),
            "{listed}"
        );
        // The old leader stepped down.
        let (new_leader, _) = c
            .wait_leader("a new leader", |id, _| id != old_leader)
            .await;

        // Every replica holds exactly the backup minus the deleted tasks.
        let summaries = c.state_summaries();
        assert_eq!(summaries.len(), 3);
        for s in &summaries {
            assert_eq!(s["state_hash"], hash.as_str(), "{s}");
            assert_eq!(s["counts"]["task"], tasks, "{s}");
        }
        // The old leader's writer gets the failover error.
        let old = c.cli(
            &[
                "state",
                "--endpoint",
                &c.endpoint(old_leader),
                "load",
                "--tasks",
                "1",
                "--first",
                "900000",
            ]
            .map(String::from),
        );
        assert!(!old.status.success());
        assert!(
            output_text(&old).contains("the state was replaced"),
            "{}",
            output_text(&old)
        );
        // The new leader serves writes.
        c.load_tasks(
            &c.endpoint(new_leader),
            &["--tasks", "10", "--first", "900000"],
        );
        let after = c.state_summaries();
        assert!(
            after.iter().all(|s| s["counts"]["task"] == tasks + 10),
            "{after:?}"
        );
    });
}

#[test]
fn disaster_restore_founds_a_new_cluster_the_old_one_cannot_join() {
    run(async {
        let old = Cluster::initialized_with("old", 3, &[], &["--state"]).await;
        let eps = old.endpoints().join(",");
        old.cli_ok(&["state", "--endpoint", &eps, "load", "--tasks", "3000"]);
        let backups = old.root.path().join("backups");
        old.cli_ok(&[
            "backup",
            "--endpoint",
            &eps,
            "--dir",
            &backups.to_string_lossy(),
        ]);
        let file = old.backup_file(&backups);
        let (hash, tasks) = expected_state(&file, None);
        let f = file.to_string_lossy().to_string();

        // Bad backups are refused by verify, by initialize (which then
        // creates nothing) and by stage (which then stages nothing).
        let bytes = std::fs::read(&file).unwrap();
        let mut bad = Vec::new();
        bad.push(("truncated", bytes[..bytes.len() - 100].to_vec()));
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x04;
        bad.push(("bit-flipped", flipped));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        bad.push(("wrong magic", magic));
        for (what, data) in &bad {
            let p = old
                .root
                .path()
                .join(format!("bad-{}", what.replace(' ', "-")));
            std::fs::write(&p, data).unwrap();
            let ps = p.to_string_lossy().to_string();
            let v = old.cli(&["backup", "verify", &ps].map(String::from));
            assert!(!v.status.success(), "{what} verified");
            let target = old
                .root
                .path()
                .join(format!("never-{}", what.replace(' ', "-")));
            let i = old.cli(
                &[
                    "initialize",
                    "--path",
                    &target.to_string_lossy(),
                    "--cluster-id",
                    "x",
                    "--replica-id",
                    "1",
                    "--from-backup",
                    &ps,
                ]
                .map(String::from),
            );
            assert!(!i.status.success(), "{what}: {}", output_text(&i));
            assert!(
                !target.exists(),
                "{what}: initialize left {}",
                target.display()
            );
            let s = old.cli(&["recovery", "--endpoint", &eps, "stage", &ps].map(String::from));
            assert!(!s.status.success(), "{what} was staged");
        }
        let listed = old.cli_ok(&["recovery", "--endpoint", &eps, "list"]);
        assert!(listed.contains("nothing staged"), "{listed}");
        // Another cluster's backup is refused by stage.
        let other = Cluster::initialized_with("other", 1, &[], &["--state"]).await;
        let o = other
            .cli(&["recovery", "--endpoint", &other.endpoint(1), "stage", &f].map(String::from));
        assert!(!o.status.success());
        assert!(output_text(&o).contains("old"), "{}", output_text(&o));
        drop(other);

        // The new cluster: replica 1 founds it alone from the backup (and
        // commits it through the log when it leads); 2 and 3 start EMPTY,
        // are added, and catch up from the log.
        let mut new = Cluster::new();
        let ports: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
        for id in 1..=3 {
            new.add_node(id, "restored", ports[&id], &ports);
        }
        let founder: BTreeMap<u64, u16> = BTreeMap::from([(1, ports[&1])]);
        new.initialize_with(1, &founder, &["--from-backup", &f]);
        for id in 1..=3 {
            new.start(id, &["--state"]);
        }
        new.wait_leader("replica 1 to lead the new cluster", |id, _| id == 1)
            .await;
        for id in [2, 3] {
            new.wait_serving(id).await;
            let out = new.members(&["add", &id.to_string(), &new.endpoint(id)]);
            assert!(out.status.success(), "members add: {}", output_text(&out));
        }
        let (_, l) = new.wait_leader("a leader", |_, _| true).await;
        for id in [2, 3] {
            new.wait_caught_up_voter(id, l.commit).await;
        }
        let neweps = new.endpoints().join(",");
        for s in new.state_summaries() {
            assert_eq!(s["state_hash"], hash.as_str(), "{s}");
            assert_eq!(s["counts"]["task"], tasks, "{s}");
        }
        new.cli_ok(&[
            "state",
            "--endpoint",
            &neweps,
            "load",
            "--tasks",
            "5",
            "--first",
            "500000",
        ]);
        // A wiped replica rejoins and replays the restored state.
        new.kill(3);
        std::fs::remove_dir_all(&new.node(3).dir).unwrap();
        new.start(3, &["--state"]);
        let (_, l) = new.wait_leader("a leader", |_, _| true).await;
        new.wait_caught_up_voter(3, l.commit).await;
        for s in new.state_summaries() {
            assert_eq!(s["counts"]["task"], tasks + 5, "{s}");
        }
        let hashes: BTreeSet<String> = new
            .state_summaries()
            .iter()
            .map(|s| s["state_hash"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(hashes.len(), 1, "replicas disagree: {hashes:?}");
        // A replica of the old cluster pointed at the new one is refused.
        let log = new.node(1).log.clone();
        drop(old);
        let mut intruder = Cluster::new();
        let mut ports: BTreeMap<u64, u16> = new.nodes.iter().map(|(id, n)| (*id, n.port)).collect();
        ports.insert(4, free_port());
        intruder.add_node(4, "old", ports[&4], &ports);
        intruder.initialize_with(4, &ports, &[]);
        intruder.start(4, &["--state"]);
        new.wait(
            "the new cluster to refuse the old cluster's replica",
            async || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains("refused a peer stream") && l.contains("cluster 'old'"))
                    .then_some(())
            },
        )
        .await;
        for s in new.state_summaries() {
            assert_eq!(s["counts"]["task"], tasks + 5, "{s}");
        }
    });
}

// ---------------------------------------------------------------------------
// Scheduled backups (`replog replica --state --backup-dir DIR`)

/// The backups in `dir` (by backup name), oldest first; none when it does
/// not exist.
fn scheduled_backups(dir: &Path) -> Vec<PathBuf> {
    if !dir.is_dir() {
        return Vec::new();
    }
    replog_store::backup::BackupDir::new(dir, usize::MAX)
        .unwrap()
        .list()
        .unwrap()
}

/// `GET /metrics` from a replica's `--metrics-listen` port.
fn scrape_metrics(port: u16) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1").then_some(out)
}

/// The value of an unlabelled metric in a scrape.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn the_leader_takes_scheduled_backups_verified_and_pruned() {
    run(async {
        let mut c = Cluster::new();
        let ports: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
        let metrics: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
        for id in 1..=3 {
            c.add_node(id, "bk", ports[&id], &ports);
            c.initialize_with(id, &ports, &[]);
        }
        let dirs: BTreeMap<u64, PathBuf> = (1..=3)
            .map(|id| (id, c.root.path().join(format!("backups-{id}"))))
            .collect();
        for id in 1..=3 {
            let dir = dirs[&id].to_string_lossy().to_string();
            let m = format!("127.0.0.1:{}", metrics[&id]);
            c.start(
                id,
                &[
                    "--state",
                    "--backup-dir",
                    &dir,
                    "--backup-interval",
                    "300ms",
                    "--max-saved-backups",
                    "2",
                    "--metrics-listen",
                    &m,
                ],
            );
        }
        for id in 1..=3 {
            c.wait_serving(id).await;
        }
        let eps = c.endpoints().join(",");
        c.load_tasks(&eps, &["--tasks", "2000"]);
        let (leader, before) = c.wait_leader("a leader", |_, _| true).await;
        c.note(&format!("wrote 2000 tasks; replica {leader} leads"));

        // A backup started after the writes were acknowledged holds them all.
        c.wait("a scheduled backup holding the 2000 tasks", async || {
            let newest = scheduled_backups(&dirs[&leader]).pop()?;
            // Pruning may remove it under our feet: then look again.
            let i = replog_store::backup::inspect(&newest, Some("bk")).ok()?;
            (i.counts.get("task") == Some(&2000)).then_some(())
        })
        .await;
        let text = c
            .wait("the leader's backup metrics", async || {
                let t = scrape_metrics(metrics[&leader])?;
                (metric(&t, "replog_backups_succeeded_total")? >= 2.0).then_some(t)
            })
            .await;
        assert_eq!(metric(&text, "replog_backups_failed_total"), Some(0.0));
        assert!(metric(&text, "replog_backup_last_bytes").unwrap() > 0.0);
        assert!(metric(&text, "replog_backup_last_success_timestamp_seconds").unwrap() > 1.6e9);
        assert!(metric(&text, "replog_backup_last_duration_seconds").is_some());
        for id in (1..=3).filter(|id| *id != leader) {
            let t = c
                .wait("a follower's metrics", async || {
                    scrape_metrics(metrics[&id])
                })
                .await;
            assert_eq!(metric(&t, "replog_backups_succeeded_total"), Some(0.0));
        }
        let (still, after) = c.wait_leader("a leader", |_, _| true).await;

        // Stop every replica so the directories hold still, then check them.
        for id in 1..=3 {
            c.kill(id);
        }
        let kept = scheduled_backups(&dirs[&leader]);
        assert!(
            (1..=2).contains(&kept.len()),
            "--max-saved-backups 2 kept {kept:?}"
        );
        for f in &kept {
            let out = c.cli_ok(&["backup", "verify", &f.to_string_lossy()]);
            assert!(out.contains("OK"), "{out}");
        }
        let newest = kept.last().unwrap().to_string_lossy().to_string();
        let json: serde_json::Value =
            serde_json::from_str(&c.cli_ok(&["backup", "inspect", &newest, "--json"])).unwrap();
        assert_eq!(json["counts"]["task"], 2000, "{json}");
        assert_eq!(json["cluster_id"], "bk", "{json}");
        if still == leader && after.term == before.term {
            for id in (1..=3).filter(|id| *id != leader) {
                assert!(
                    scheduled_backups(&dirs[&id]).is_empty(),
                    "follower {id} took backups: {:?}",
                    scheduled_backups(&dirs[&id])
                );
            }
        } else {
            c.note("the leadership moved during the test: not checking the followers' directories");
        }
    });
}

#[test]
fn a_failing_scheduled_backup_is_counted_and_the_replica_keeps_serving() {
    run(async {
        let metrics_port = free_port();
        let root = tempfile::tempdir().unwrap();
        // A directory cannot be made under a regular file.
        let blocker = root.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let dir = blocker.join("backups");
        let m = format!("127.0.0.1:{metrics_port}");
        let c = Cluster::initialized_with(
            "bkfail",
            1,
            &[],
            &[
                "--state",
                "--backup-dir",
                &dir.to_string_lossy(),
                "--backup-interval",
                "200ms",
                "--metrics-listen",
                &m,
            ],
        )
        .await;
        let text = c
            .wait("failed backups to be counted", async || {
                let t = scrape_metrics(metrics_port)?;
                (metric(&t, "replog_backups_failed_total")? >= 2.0).then_some(t)
            })
            .await;
        assert_eq!(metric(&text, "replog_backups_succeeded_total"), Some(0.0));
        assert!(c.log_text(1).contains("a scheduled backup failed"));
        // It keeps serving writes.
        c.load_tasks(&c.endpoint(1), &["--tasks", "50"]);
        c.check_alive();
        // Once the directory can be made, the next turn succeeds.
        std::fs::remove_file(&blocker).unwrap();
        c.wait("a backup once the directory can be made", async || {
            let t = scrape_metrics(metrics_port)?;
            (metric(&t, "replog_backups_succeeded_total")? >= 1.0).then_some(())
        })
        .await;
        let newest = scheduled_backups(&dir).pop().expect("a backup");
        let i = replog_store::backup::inspect(&newest, Some("bkfail")).unwrap();
        assert_eq!(i.counts.get("task"), Some(&50));
    });
}

// ---------------------------------------------------------------------------
// Snapshots and compaction of the state log (`--snapshot-interval-entries`,
// `--snapshot-keep-entries`) and catch-up by streamed state snapshot.

/// `replog replica` flags of the compaction test: compact every 50 applied
/// positions, keep 10.
const COMPACTING: [&str; 5] = [
    "--state",
    "--snapshot-interval-entries",
    "50",
    "--snapshot-keep-entries",
    "10",
];

impl Cluster {
    /// `replog state --endpoint ENDPOINTS load ARGS...`, which must succeed.
    fn load_tasks(&self, endpoints: &str, args: &[&str]) -> String {
        let mut all = vec!["state", "--endpoint", endpoints, "load"];
        all.extend_from_slice(args);
        self.cli_ok(&all)
    }

    /// The state's applied position on replica `id` alone (linearizable).
    fn state_applied(&self, id: u64) -> u64 {
        let out = self.cli_ok(&[
            "state",
            "--endpoint",
            &self.endpoint(id),
            "summary",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["applied"].as_u64().unwrap_or_else(|| panic!("{out}"))
    }

    /// The last position replica `id` could replay by itself: its state's
    /// applied position or the end of its log, whichever is later (asked
    /// while nothing is written).
    async fn log_holds(&self, id: u64) -> u64 {
        let applied = self.state_applied(id);
        let s = self.status(id).await.expect("the replica answers");
        applied.max(s.last_index)
    }

    /// Endpoints of the running replicas, for writes.
    fn running_endpoints(&self) -> String {
        self.running()
            .into_iter()
            .map(|id| self.endpoint(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until the leader's log begins after `position` + 1: a replica
    /// whose state applied only up to `position` cannot replay the log.
    async fn wait_truncated_past(&self, position: u64) -> u64 {
        let (leader, s) = self
            .wait_leader(
                &format!("the leader's log to be truncated past position {position}"),
                |_, s| s.first_index > position + 1,
            )
            .await;
        assert!(
            self.log_text(leader).contains("compacted the state log"),
            "the leader truncated without saying so"
        );
        s.first_index
    }

    /// Every running replica holds the same state with `tasks` tasks.
    fn assert_same_state(&self, tasks: u64) {
        let summaries = self.state_summaries();
        assert_eq!(summaries.len(), 3);
        let hashes: BTreeSet<String> = summaries
            .iter()
            .map(|s| s["state_hash"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(hashes.len(), 1, "replicas disagree: {summaries:?}");
        for s in &summaries {
            assert_eq!(s["counts"]["task"], tasks, "{s}");
        }
    }
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_streamed_snapshot() {
    run(async {
        let c = Cluster::initialized_with("compact", 3, &[], &COMPACTING).await;
        let eps = c.endpoints().join(",");
        c.load_tasks(&eps, &["--tasks", "200", "--batch", "10"]);
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let f = (1..=3).find(|id| *id != leader).unwrap();
        let behind = c.log_holds(f).await;
        c.kill(f);

        // Enough writes for several compactions while the follower is down.
        c.load_tasks(
            &c.running_endpoints(),
            &["--tasks", "600", "--batch", "4", "--first", "10000"],
        );
        let first = c.wait_truncated_past(behind).await;
        c.note(&format!(
            "the follower holds up to {behind}; the leader's log begins at {first}"
        ));

        // It restarts behind the log, gets a Raft snapshot of the log and a
        // streamed snapshot of the state from a peer, and goes on.
        c.start(f, &COMPACTING);
        c.wait(
            "the follower to catch up by streamed snapshot",
            async || {
                c.last_run_log(f)
                    .contains("caught up by a streamed state snapshot")
                    .then_some(())
            },
        )
        .await;
        c.assert_same_state(800);
        let log = c.last_run_log(f);
        assert!(
            log.contains("the local state is behind the log's beginning"),
            "{log}"
        );
        assert!(!log.contains("the state applier stopped"), "{log}");

        // Now killed while it installs a big snapshot: it recovers after a
        // restart (the old state stays until the new one checked out whole,
        // and the applier finds the same gap again).
        let behind = c.log_holds(f).await;
        c.kill(f);
        c.load_tasks(
            &c.running_endpoints(),
            &[
                "--tasks",
                "20000",
                "--batch",
                "250",
                "--task-bytes",
                "1000",
                "--first",
                "100000",
            ],
        );
        c.wait_truncated_past(behind).await;
        c.start(f, &COMPACTING);
        c.wait("the follower to start installing a snapshot", async || {
            c.last_run_log(f)
                .contains("installing a state snapshot from a peer")
                .then_some(())
        })
        .await;
        c.kill(f);
        let interrupted = !c
            .last_run_log(f)
            .contains("caught up by a streamed state snapshot");
        c.note(&format!("killed during the install: {interrupted}"));
        c.start(f, &COMPACTING);
        if interrupted {
            c.wait(
                "the follower to catch up again after the restart",
                async || {
                    c.last_run_log(f)
                        .contains("caught up by a streamed state snapshot")
                        .then_some(())
                },
            )
            .await;
        }
        let (_, l) = c.wait_leader("a leader", |_, _| true).await;
        c.wait_caught_up_voter(f, l.commit).await;
        c.assert_same_state(20_800);
    });
}

#[test]
fn a_wiped_follower_of_a_compacted_state_log_rejoins_with_the_whole_state() {
    run(async {
        let c = Cluster::initialized_with("wipe-state", 3, &[], &COMPACTING).await;
        let eps = c.endpoints().join(",");
        c.load_tasks(&eps, &["--tasks", "300", "--batch", "5"]);
        let (leader, _) = c.wait_leader("a leader", |_, _| true).await;
        let f = (1..=3).find(|id| *id != leader).unwrap();
        c.kill(f);
        std::fs::remove_dir_all(&c.node(f).dir).unwrap();
        c.note(&format!("wiped replica {f}'s directory"));
        // Compactions while it is gone: the log no longer begins at 1, so
        // the rejoin needs a snapshot of the log and of the state.
        c.load_tasks(
            &c.running_endpoints(),
            &["--tasks", "300", "--batch", "5", "--first", "5000"],
        );
        c.wait_truncated_past(1).await;

        c.start(f, &COMPACTING);
        let seen = c.watch_until_voting(f).await;
        assert_ne!(seen[0], VOTING, "statuses seen: {seen:?}");
        let log = c.last_run_log(f);
        assert!(log.contains("created an EMPTY replica"), "{log}");
        let (_, l) = c.wait_leader("a leader", |_, _| true).await;
        c.wait_caught_up_voter(f, l.commit).await;
        c.assert_same_state(600);
        let log = c.last_run_log(f);
        assert!(
            log.contains("caught up by a streamed state snapshot"),
            "the state did not come by snapshot: {log}"
        );
        assert!(!log.contains("the state applier stopped"), "{log}");
        // It serves the state like the others, and writes go on.
        c.load_tasks(&eps, &["--tasks", "10", "--first", "9000"]);
        c.assert_same_state(610);
    });
}
