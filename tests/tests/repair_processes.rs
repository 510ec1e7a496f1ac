//! The repair coordinator (issue 14) on real processes: five `replog
//! replica` processes on 127.0.0.1, each with its HTTP port
//! (`--metrics-listen`) and the same repair flags, driven through
//! `POST /repair...`, `GET /repairs` (raw HTTP/1.1 over TCP) and the
//! `replog repair` CLI.
//!
//! The repair commands are one shell script (`step.sh` in the test's
//! tempdir) that appends a `start` and an `end` line to the `calls` file
//! with the repair id, `$REPLOG_REPLICA_ID`, `$REPLOG_ATTEMPT`,
//! `$REPLOG_SIGNAL`, `$REPLOG_SCOPE`, a timestamp and its ancestor pids (so
//! a test can tell which replica process ran it), sleeps as long as the
//! file `sleep_<id>` says (tenths of a second) and exits with the code in
//! `exit_<id>`. The tests assert which steps ran, in which order and how
//! often; every wait polls against a generous deadline.
//!
//! The `replog` binary must be built first (`cargo build -p replog-cli
//! --bin replog`, same target directory; `REPLOG_BIN` overrides it).
//! Dropping a cluster SIGKILLs its replicas; a step script still running
//! ends within 0.1 s once the test's `run` file is gone.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replog_client::{Client, ClientConfig, StatusResponse};
use replog_tests::procs::{self, output_text, replog_bin, run, tool_command, VOTING};
use serde_json::Value;

/// How long any one wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(90);

/// A free port (see [`replog_tests::procs::free_port`]), from another
/// offset than cluster_processes.rs.
fn free_port() -> u16 {
    replog_tests::procs::free_port(6007)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The step script every repair id of these tests runs.
const STEP_SCRIPT: &str = r#"#!/bin/sh
D="$(dirname "$0")"
id="$REPLOG_REPAIR_ID"
p1=$PPID
p2=$(cut -d' ' -f4 /proc/$p1/stat 2>/dev/null)
p3=$(cut -d' ' -f4 /proc/$p2/stat 2>/dev/null)
line="$id|$REPLOG_REPLICA_ID|$REPLOG_ATTEMPT|$REPLOG_SIGNAL|$REPLOG_SCOPE"
echo "start|$line|$(date +%s%3N)|$$ $p1 $p2 $p3" >> "$D/calls"
n=$(cat "$D/sleep_$id" 2>/dev/null || echo 0)
i=0
while [ "$i" -lt "$n" ] && [ -f "$D/run" ]; do sleep 0.1; i=$((i+1)); done
code=$(cat "$D/exit_$id" 2>/dev/null || echo 0)
echo "end|$line|$(date +%s%3N)|$$ $p1 $p2 $p3|$code" >> "$D/calls"
exit "$code"
"#;

/// One line of the calls file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    start: bool,
    repair: String,
    replica: u64,
    attempt: u32,
    signal: String,
    scope: String,
    at_ms: u64,
    /// The script's pid and its ancestors'.
    pids: Vec<u32>,
}

fn parse_calls(text: &str) -> Vec<Call> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() < 8 {
                return None; // a line being written
            }
            Some(Call {
                start: f[0] == "start",
                repair: f[1].to_string(),
                replica: f[2].parse().ok()?,
                attempt: f[3].parse().ok()?,
                signal: f[4].to_string(),
                scope: f[5].to_string(),
                at_ms: f[6].parse().ok()?,
                pids: f[7]
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect(),
            })
        })
        .collect()
}

/// The answer of a raw HTTP/1.1 request: status and body.
fn http(port: u16, method: &str, path: &str, body: &[u8], token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: \
         application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A server that refuses a body may answer and close before it read it
    // all: a failed write is not the answer.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

struct Node {
    port: u16,
    http: u16,
    dir: PathBuf,
    log: PathBuf,
    peers: BTreeMap<u64, u16>,
    child: Mutex<Option<Child>>,
}

/// Five (or `n`) replica processes with the same repair flags. Dropping it
/// SIGKILLs them; a failing test prints the tails of their logs first.
struct Cluster {
    root: tempfile::TempDir,
    bin: PathBuf,
    cluster_id: String,
    nodes: BTreeMap<u64, Node>,
    flags: Vec<String>,
    status_client: Client,
    started: Instant,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.root.path().join("run"));
        procs::kill_all(self.nodes.values().map(|n| &n.child));
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = self.nodes.values().map(|n| n.log.clone()).collect();
            logs.push(self.root.path().join("cli.log"));
            logs.push(self.root.path().join("calls"));
            procs::post_mortem(&logs, 80, &mut self.root);
        }
        // Give a step script that was still looping the time to see `run` gone.
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The repair flags every test starts from; `extra` (flag and value
/// pairs) adds or overrides.
fn repair_flags(dir: &Path, extra: &[&str]) -> Vec<String> {
    let step = format!("sh {}", dir.join("step.sh").display());
    let set: Vec<String> = ["restart", "reimage", "fence", "slow", "next", "s1", "s2"]
        .iter()
        .map(|id| format!("{id}={step}"))
        .collect();
    let mut flags: Vec<String> = [
        "--ping-timeout",
        "200ms",
        "--max-ping-timeouts",
        "3",
        "--reregister-timeout",
        "1s",
        "--repair-set",
        &set.join(","),
        "--repair-mode",
        "execute",
        "--healthy-period",
        "3s",
        "--signal-ttl",
        "5min",
        // The tests' replicas are not loaded: no lag to judge.
        "--max-lag-entries",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A flag of `extra` replaces the default (clap refuses one given twice).
    for pair in extra.chunks(2) {
        if let Some(i) = flags.iter().position(|f| f == pair[0]) {
            flags.drain(i..i + 2);
        }
        flags.extend(pair.iter().map(|s| s.to_string()));
    }
    flags
}

impl Cluster {
    /// `n` replicas initialized and started with the repair flags and
    /// `extra`, serving under a leader whose re-register grace is over.
    async fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_with_spares(n, 0, extra).await
    }

    /// [`Cluster::start`] plus `spares` EMPTY replicas (ids n+1...), named
    /// by every voter's `--spares` and started without it themselves (a
    /// spare may not name itself). Voters do not list the spares in
    /// `--peers`: a spare's address reaches them with the membership change
    /// that adds it.
    async fn start_with_spares(n: u64, spares: u64, extra: &[&str]) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("step.sh"), STEP_SCRIPT).unwrap();
        std::fs::write(root.path().join("run"), "").unwrap();
        std::fs::write(root.path().join("calls"), "").unwrap();
        let ports: BTreeMap<u64, u16> = (1..=n + spares).map(|id| (id, free_port())).collect();
        let spare_flag: Vec<String> = (n + 1..=n + spares)
            .map(|id| format!("{id}=127.0.0.1:{}", ports[&id]))
            .collect();
        let spare_flag = spare_flag.join(",");
        let mut with_spares: Vec<&str> = extra.to_vec();
        if spares > 0 {
            with_spares.extend(["--spares", spare_flag.as_str()]);
        }
        let flags = repair_flags(root.path(), &with_spares);
        let mut c = Cluster {
            root,
            bin: replog_bin(),
            cluster_id: format!("repair-{}", now_ms()),
            nodes: BTreeMap::new(),
            flags,
            status_client: Client::with_config(
                Vec::<String>::new(),
                ClientConfig {
                    connect_timeout: Duration::from_secs(1),
                    request_timeout: Duration::from_secs(3),
                    ..Default::default()
                },
            ),
            started: Instant::now(),
        };
        let voters: BTreeMap<u64, u16> = ports.range(1..=n).map(|(i, p)| (*i, *p)).collect();
        for id in 1..=n + spares {
            let peers = if id <= n { &voters } else { &ports };
            let peers = peers
                .iter()
                .filter(|(p, _)| **p != id)
                .map(|(p, port)| (*p, *port))
                .collect();
            c.nodes.insert(
                id,
                Node {
                    port: ports[&id],
                    http: free_port(),
                    dir: c.root.path().join(format!("r{id}")),
                    log: c.root.path().join(format!("r{id}.log")),
                    peers,
                    child: Mutex::new(None),
                },
            );
            if id <= n {
                c.initialize(id, &voters);
            }
        }
        for id in 1..=n + spares {
            c.start_replica(id);
        }
        for id in 1..=n + spares {
            c.wait(&format!("replica {id} to serve"), async || {
                c.status(id).await
            })
            .await;
        }
        c.wait_judging().await;
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn note(&self, what: &str) {
        eprintln!("[{:>6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    fn endpoint(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.node(id).port)
    }

    fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.lock().unwrap().as_ref().map(Child::id)
    }

    fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.child.lock().unwrap().is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sets how long step `repair` sleeps (tenths of a second) and its exit code.
    fn script(&self, repair: &str, tenths: u32, exit: i32) {
        std::fs::write(self.path(&format!("sleep_{repair}")), tenths.to_string()).unwrap();
        std::fs::write(self.path(&format!("exit_{repair}")), exit.to_string()).unwrap();
    }

    fn calls(&self) -> Vec<Call> {
        parse_calls(&std::fs::read_to_string(self.path("calls")).unwrap_or_default())
    }

    fn starts(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.start).collect()
    }

    fn cli(&self, args: &[String]) -> Output {
        let out = tool_command(&self.bin)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("cli.log"))
            .unwrap();
        writeln!(f, "===== replog {} -> {}", args.join(" "), out.status).unwrap();
        f.write_all(&out.stdout).unwrap();
        f.write_all(&out.stderr).unwrap();
        out
    }

    /// `replog repair --endpoint <replica id> [--token-file F] ARGS`.
    fn repair_cli(&self, via: u64, token_file: Option<&Path>, args: &[&str]) -> Output {
        let mut all: Vec<String> = vec!["repair".into(), "--endpoint".into(), self.endpoint(via)];
        if let Some(f) = token_file {
            all.push("--token-file".into());
            all.push(f.to_string_lossy().into_owned());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        self.cli(&all)
    }

    fn initialize(&self, id: u64, members: &BTreeMap<u64, u16>) {
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
            &self.cluster_id,
            "--replica-id",
            &id.to_string(),
            "--members",
            &members.join(","),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "replog initialize {id}: {}",
            output_text(&out)
        );
    }

    fn replica_args(&self, id: u64) -> Vec<String> {
        let node = self.node(id);
        let peers: Vec<String> = node
            .peers
            .iter()
            .map(|(p, port)| format!("{p}=127.0.0.1:{port}"))
            .collect();
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--log".into(),
            "info".into(),
            "--path".into(),
            node.dir.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{}", node.port),
            "--cluster-id".into(),
            self.cluster_id.clone(),
            "--replica-id".into(),
            id.to_string(),
            "--tick-interval".into(),
            "20ms".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", node.http),
            "--peers".into(),
            peers.join(","),
        ];
        args.extend(self.flags.iter().cloned());
        if self.is_spare(id) {
            // A spare may not name itself in --spares.
            if let Some(i) = args.iter().position(|a| a == "--spares") {
                args.drain(i..i + 2);
            }
        }
        args
    }

    /// Whether `id` was started as a spare (never initialized).
    fn is_spare(&self, id: u64) -> bool {
        let voters = self.nodes.len() as u64 - self.spare_count();
        id > voters
    }

    fn spare_count(&self) -> u64 {
        match self.flags.iter().position(|a| a == "--spares") {
            Some(i) => self.flags[i + 1].split(',').count() as u64,
            None => 0,
        }
    }

    fn start_replica(&self, id: u64) {
        let node = self.node(id);
        let mut slot = node.child.lock().unwrap();
        assert!(slot.is_none(), "replica {id} is already running");
        let args = self.replica_args(id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        writeln!(
            log,
            "===== test harness: starting replog {}",
            args.join(" ")
        )
        .unwrap();
        let child = tool_command(&self.bin)
            .args(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        *slot = Some(child);
        drop(slot);
        self.note(&format!("started replica {id}"));
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to replica `id`.
    fn signal_process(&self, id: u64, signal: i32) {
        let pid = self.pid(id).expect("a running replica") as i32;
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        self.note(&format!("sent signal {signal} to replica {id}"));
    }

    /// SIGKILLs replica `id` and reaps it.
    fn kill(&self, id: u64) {
        let mut child = self
            .node(id)
            .child
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| panic!("replica {id} is not running"));
        child.kill().expect("SIGKILL");
        let status = child.wait().unwrap();
        self.note(&format!("SIGKILLed replica {id} ({status})"));
    }

    fn check_alive(&self) {
        procs::check_alive(self.nodes.iter().map(|(id, n)| (*id, &n.child)));
    }

    async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.status_client.status_of(&self.endpoint(id)).await.ok()
    }

    /// Polls `f` until it gives a value; fails after [`WAIT`] or when a
    /// replica process died.
    async fn wait<T>(&self, what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
        let every = Duration::from_millis(50);
        procs::poll(what, WAIT, every, || self.check_alive(), f).await
    }

    /// The running replica that leads in the highest term.
    async fn leader(&self) -> Option<(u64, StatusResponse)> {
        procs::leader_of(self.running(), async |id| self.status(id).await).await
    }

    /// Waits for a leader whose detector judges (its grace is over) and
    /// finds every running member healthy; returns its id.
    async fn wait_judging(&self) -> u64 {
        self.wait(
            "a leader judging every running member healthy",
            async || {
                let (id, s) = self.leader().await?;
                let running = self.running();
                let healthy = s
                    .members
                    .iter()
                    .filter(|m| running.contains(&m.id))
                    .all(|m| m.health == "healthy");
                (healthy && s.failure_tolerance >= 0).then_some(id)
            },
        )
        .await
    }

    /// `GET /repairs` on replica `via` (what it has applied).
    fn repairs(&self, via: u64, token: Option<&str>) -> Value {
        let (status, body) = http(self.node(via).http, "GET", "/repairs", b"", token);
        assert_eq!(status, 200, "GET /repairs: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /repairs: {e}: {body}"))
    }

    /// The leader's `GET /repairs`.
    async fn leader_repairs(&self) -> Value {
        let (leader, _) = self.wait("a leader", async || self.leader().await).await;
        self.repairs(leader, None)
    }

    /// `POST /repair` for `replica` through replica `via`; returns the status.
    fn report(&self, via: u64, replica: u64, signal: &str, expires_in_ms: Option<u64>) -> u16 {
        let mut body = serde_json::json!({ "replica": replica, "signal": signal });
        if let Some(e) = expires_in_ms {
            body["expires_in_ms"] = e.into();
        }
        let (status, answer) = http(
            self.node(via).http,
            "POST",
            "/repair",
            body.to_string().as_bytes(),
            None,
        );
        if status != 200 {
            self.note(&format!("report of {replica} via {via}: {status} {answer}"));
        }
        status
    }

    /// Reports until one report is recorded (a leader change may refuse one).
    async fn report_recorded(&self, replica: u64, signal: &str, expires_in_ms: Option<u64>) {
        self.wait(
            &format!("a report on {replica} to be recorded"),
            async || {
                let via = *self.running().first()?;
                (self.report(via, replica, signal, expires_in_ms) == 200).then_some(())
            },
        )
        .await;
    }

    /// Reports `signal` on `sick` through `via` every `renew_ms` (each
    /// report expiring after `ttl_ms`) until the leader counts it as a
    /// learner.
    async fn signal_until_demoted(
        &self,
        via: u64,
        sick: u64,
        signal: &str,
        ttl_ms: u64,
        renew_ms: u64,
    ) {
        self.wait(
            &format!("replica {sick} to be demoted to a learner"),
            async || {
                self.report(via, sick, signal, Some(ttl_ms));
                match self.voter(sick).await {
                    Some(false) => Some(()),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(renew_ms)).await;
                        None
                    }
                }
            },
        )
        .await;
    }

    /// Whether the leader counts `id` as a voter (`None`: not a member).
    async fn voter(&self, id: u64) -> Option<bool> {
        let (_, s) = self.leader().await?;
        s.members.iter().find(|m| m.id == id).map(|m| m.voter)
    }

    /// Followers of the current leader (running), in id order.
    async fn followers(&self) -> (u64, Vec<u64>) {
        let leader = self.wait_judging().await;
        let followers = self
            .running()
            .into_iter()
            .filter(|id| *id != leader)
            .collect();
        (leader, followers)
    }
}

/// The records of a `GET /repairs` document's history, of `kind`.
fn records<'a>(doc: &'a Value, kind: &str) -> Vec<&'a Value> {
    doc.pointer("/state/history")
        .and_then(Value::as_array)
        .map(|h| {
            h.iter()
                .filter_map(|e| e.get("record"))
                .filter(|r| r["kind"] == kind)
                .collect()
        })
        .unwrap_or_default()
}

fn refused(doc: &Value) -> Vec<&Value> {
    doc.pointer("/state/history")
        .and_then(Value::as_array)
        .map(|h| h.iter().filter(|e| !e["refused"].is_null()).collect())
        .unwrap_or_default()
}

/// Test 1: a signal escalates through the order with its timeouts and
/// scopes, a failing step advances at once, and the exhausted order
/// isolates the replica (demoted to a learner), all in the records.
#[test]
fn a_signal_escalates_through_the_order_and_isolates_the_replica() {
    run(async {
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "restart:replica:4s,reimage:leader:60s,fence:leader:60s",
            ],
        )
        .await;
        c.script("restart", 2, 0); // succeeds: the replica has until 4 s to heal
        c.script("reimage", 0, 3); // fails: the next step at once
        c.script("fence", 0, 4);
        let (_, followers) = c.followers().await;
        let sick = followers[0];
        c.note(&format!("signalling replica {sick}"));
        let out = c.repair_cli(
            followers[1],
            None,
            &[
                "report",
                "--replica",
                &sick.to_string(),
                "--signal",
                "fsync_latency",
                "--details",
                "p99 900ms",
                "--expires-in",
                "3s",
            ],
        );
        assert!(
            out.status.success(),
            "replog repair report: {}",
            output_text(&out)
        );
        // Keep the replica unhealthy: the report is renewed until isolated.
        c.signal_until_demoted(followers[1], sick, "fsync_latency", 3_000, 1_000)
            .await;
        let (leader, _) = c.wait("a leader", async || c.leader().await).await;
        let starts = c.starts();
        let order: Vec<(&str, u64, u32, &str, &str)> = starts
            .iter()
            .map(|s| {
                (
                    s.repair.as_str(),
                    s.replica,
                    s.attempt,
                    s.scope.as_str(),
                    s.signal.as_str(),
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("restart", sick, 1, "replica", "fsync_latency"),
                ("reimage", sick, 2, "leader", "fsync_latency"),
                ("fence", sick, 3, "leader", "fsync_latency"),
            ],
            "the steps that ran: {starts:#?}"
        );
        // Scope replica ran in the sick replica's process, scope leader in the leader's.
        let sick_pid = c.pid(sick).unwrap();
        let leader_pid = c.pid(leader).unwrap();
        assert!(
            starts[0].pids.contains(&sick_pid),
            "restart ran under {:?}, replica {sick} is {sick_pid}",
            starts[0].pids
        );
        for s in &starts[1..] {
            assert!(
                s.pids.contains(&leader_pid),
                "{} ran under {:?}, leader {leader} is {leader_pid}",
                s.repair,
                s.pids
            );
        }
        // A succeeded step has its whole timeout; a failed one advances at once.
        let doc = c.leader_repairs().await;
        let at = |attempt: u64, field: &str| -> u64 {
            records(&doc, "step_started")
                .iter()
                .find(|s| s["attempt"] == attempt)
                .and_then(|s| s[field].as_u64())
                .unwrap_or_else(|| panic!("no {field} of attempt {attempt}: {doc:#}"))
        };
        assert!(
            at(2, "started_at_ms") >= at(1, "deadline_ms"),
            "reimage started before restart's 4 s timeout ended: {doc:#}"
        );
        assert!(
            at(3, "started_at_ms") < at(2, "deadline_ms"),
            "fence waited for reimage's timeout although reimage failed: {doc:#}"
        );
        // Every step ran once, ended once, with its exit code.
        let ends: Vec<(String, u32)> = c
            .calls()
            .iter()
            .filter(|c| !c.start)
            .map(|c| (c.repair.clone(), c.attempt))
            .collect();
        assert_eq!(ends.len(), 3, "{ends:?}");

        let doc = c.leader_repairs().await;
        let started = records(&doc, "step_started");
        let finished = records(&doc, "step_finished");
        assert_eq!(started.len(), 3, "{doc:#}");
        let results: Vec<(u64, &str, Option<i64>)> = finished
            .iter()
            .map(|f| {
                (
                    f["attempt"].as_u64().unwrap(),
                    f["result"].as_str().unwrap(),
                    f["exit_code"].as_i64(),
                )
            })
            .collect();
        assert_eq!(
            results,
            vec![
                (1, "succeeded", Some(0)),
                (2, "failed", Some(3)),
                (3, "failed", Some(4))
            ],
            "{doc:#}"
        );
        let isolations = records(&doc, "isolated");
        assert_eq!(isolations.len(), 1, "{doc:#}");
        assert_eq!(isolations[0]["replica"], sick);
        assert!(refused(&doc).is_empty(), "refused records: {doc:#}");
        assert_eq!(doc["state"]["removals_since_reset"], 1);
        // The CLI's history shows the same records.
        let out = c.repair_cli(followers[1], None, &["history"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let history: Value = serde_json::from_slice(&out.stdout).unwrap();
        let kinds: Vec<&str> = history
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["record"]["kind"].as_str())
            .collect();
        for k in ["signal", "step_started", "step_finished", "isolated"] {
            assert!(kinds.contains(&k), "no {k} in the history {kinds:?}");
        }
        // The learner is never promoted back while isolated.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            c.voter(sick).await,
            Some(false),
            "the isolated replica was promoted again"
        );
    });
}

/// What a bad request sends (what, path, body, token) and the statuses
/// that refuse it.
type BadRequest<'a> = (&'a str, &'a str, &'a [u8], Option<&'a str>, &'a [u16]);

/// Test 4: bad input on the HTTP port is refused with its status, and
/// nothing is recorded.
#[test]
fn bad_admin_requests_are_refused_and_record_nothing() {
    run(async {
        let token_dir = tempfile::tempdir().unwrap();
        let token_file = token_dir.path().join("token");
        std::fs::write(&token_file, "s3cret-token\n").unwrap();
        let token_flag = token_file.to_string_lossy().into_owned();
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "restart:replica:4s",
                "--admin-token-file",
                &token_flag,
            ],
        )
        .await;
        let (leader, followers) = c.followers().await;
        let good = br#"{"replica": 2, "signal": "fsync_latency"}"#;
        let token = Some("s3cret-token");
        let big_details = "d".repeat(20 * 1024);
        let big = format!(r#"{{"replica": 2, "signal": "x", "details": "{big_details}"}}"#);
        let huge = format!(
            r#"{{"replica": 2, "signal": "x", "details": "{}"}}"#,
            "d".repeat(70 * 1024)
        );
        for via in [leader, followers[0]] {
            let port = c.node(via).http;
            let rows: Vec<BadRequest> = vec![
                ("no token", "/repair", good, None, &[401]),
                ("wrong token", "/repair", good, Some("s3cret-tokeN"), &[401]),
                (
                    "longer token",
                    "/repair",
                    good,
                    Some("s3cret-token2"),
                    &[401],
                ),
                (
                    "malformed JSON",
                    "/repair",
                    b"{\"replica\": 2, \"signal\": ",
                    token,
                    &[400],
                ),
                ("not an object", "/repair", b"[1, 2]", token, &[400]),
                (
                    "negative replica",
                    "/repair",
                    br#"{"replica": -2, "signal": "x"}"#,
                    token,
                    &[400],
                ),
                (
                    "bad signal name",
                    "/repair",
                    br#"{"replica": 2, "signal": "rm -rf /"}"#,
                    token,
                    &[400],
                ),
                (
                    "unknown field",
                    "/repair",
                    br#"{"replica": 2, "signal": "x", "colour": 1}"#,
                    token,
                    &[400],
                ),
                (
                    "unknown replica",
                    "/repair",
                    br#"{"replica": 99, "signal": "x"}"#,
                    token,
                    &[404],
                ),
                (
                    "oversized body",
                    "/repair",
                    big.as_bytes(),
                    token,
                    &[400, 413],
                ),
                ("huge body", "/repair", huge.as_bytes(), token, &[400, 413]),
                (
                    "cancel without a case",
                    "/repair/cancel",
                    br#"{"replica": 2}"#,
                    token,
                    &[404],
                ),
                ("unknown operation", "/repair/explode", b"{}", token, &[404]),
                ("pause without token", "/repair/pause", b"{}", None, &[401]),
                (
                    "reset with wrong token",
                    "/repair/reset",
                    b"",
                    Some("nope"),
                    &[401],
                ),
            ];
            for (what, path, body, tok, want) in rows {
                let (status, answer) = http(port, "POST", path, body, tok);
                assert!(
                    want.contains(&status),
                    "{what} via replica {via}: {status} {answer}, expected {want:?}"
                );
                if status != 413 {
                    let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| {
                        panic!("{what}: the answer is not JSON ({e}): {answer}")
                    });
                    assert!(v["error"].is_string(), "{what}: {answer}");
                }
            }
            let (status, _) = http(port, "GET", "/repairs", b"", None);
            assert_eq!(status, 401, "GET /repairs without the token");
            let (status, _) = http(port, "GET", "/repairs", b"", Some("wrong"));
            assert_eq!(status, 401, "GET /repairs with a wrong token");
        }
        // The CLI: without the token it fails, with it it lists.
        let out = c.repair_cli(followers[1], None, &["list"]);
        assert!(
            !out.status.success(),
            "list without a token: {}",
            output_text(&out)
        );
        assert!(output_text(&out).contains("401"), "{}", output_text(&out));
        let out = c.repair_cli(
            followers[1],
            Some(&token_file),
            &["report", "--replica", "77", "--signal", "x"],
        );
        assert!(!out.status.success());
        assert!(output_text(&out).contains("404"), "{}", output_text(&out));
        // Nothing was recorded, on any replica.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for id in c.running() {
            let doc = c.repairs(id, token);
            assert_eq!(doc["state"]["applied_through"], 0, "replica {id}: {doc:#}");
            assert!(
                doc["state"]["cases"].as_object().unwrap().is_empty(),
                "{doc:#}"
            );
            assert!(
                doc["state"]["history"].as_array().unwrap().is_empty(),
                "{doc:#}"
            );
            assert!(doc["state"]["paused"].is_null(), "{doc:#}");
        }
        assert!(c.starts().is_empty(), "steps ran: {:?}", c.calls());
        // And a good request with the token is taken (the check is not just refusing all).
        let (status, answer) = http(
            c.node(followers[0]).http,
            "POST",
            "/repair/pause",
            br#"{"reason": "window"}"#,
            token,
        );
        assert_eq!(status, 200, "{answer}");
        let doc = c.repairs(leader, token);
        assert_eq!(doc["state"]["paused"]["reason"], "window", "{doc:#}");
    });
}

/// Test 5: the leader is SIGKILLed while a step runs; the new leader does
/// not run that attempt again: it waits for its deadline, records it
/// `unknown`, and goes on with the next step.
#[test]
fn a_new_leader_does_not_rerun_a_step_of_the_killed_leader() {
    run(async {
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "slow:leader:8s,next:leader:60s",
                // The killed leader is restarted at once; it must not be
                // judged unreachable meanwhile (that would open a case of its own).
                "--ping-timeout",
                "1s",
                "--max-ping-timeouts",
                "5",
                "--num-allowed-repairs",
                "2",
            ],
        )
        .await;
        c.script("slow", 150, 0); // runs 15 s, past its 8 s timeout
        c.script("next", 0, 0);
        let (leader, followers) = c.followers().await;
        let sick = followers[0];
        c.report_recorded(sick, "disk_errors", None).await;
        let first = c
            .wait("step slow to start", async || {
                c.starts()
                    .into_iter()
                    .find(|s| s.repair == "slow" && s.replica == sick)
            })
            .await;
        assert_eq!(first.replica, sick);
        assert!(
            first.pids.contains(&c.pid(leader).unwrap()),
            "slow ran under {:?}",
            first.pids
        );
        c.kill(leader);
        c.start_replica(leader);
        let next = c
            .wait("step next to start under the new leader", async || {
                c.starts()
                    .into_iter()
                    .find(|s| s.repair == "next" && s.replica == sick)
            })
            .await;
        // Give a wrong re-run the time to show.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let starts: Vec<Call> = c
            .starts()
            .into_iter()
            .filter(|s| s.replica == sick)
            .collect();
        let seen: Vec<(&str, u32)> = starts
            .iter()
            .map(|s| (s.repair.as_str(), s.attempt))
            .collect();
        assert_eq!(seen, vec![("slow", 1), ("next", 2)], "{starts:#?}");
        let doc = c.leader_repairs().await;
        let started = records(&doc, "step_started");
        let deadline = started
            .iter()
            .find(|s| s["attempt"] == 1)
            .and_then(|s| s["deadline_ms"].as_u64())
            .unwrap_or_else(|| panic!("no start of attempt 1: {doc:#}"));
        assert!(
            next.at_ms >= deadline,
            "next started at {} before slow's deadline {deadline}",
            next.at_ms
        );
        let finished = records(&doc, "step_finished");
        let first_outcome: Vec<&str> = finished
            .iter()
            .filter(|f| f["replica"] == sick && f["attempt"] == 1)
            .map(|f| f["result"].as_str().unwrap())
            .collect();
        assert_eq!(first_outcome, vec!["unknown"], "{doc:#}");
        assert!(refused(&doc).is_empty(), "refused records: {doc:#}");
    });
}

/// The in-progress intervals of every attempt in the history: from its
/// start to its outcome, or to its deadline when it succeeded (a succeeded
/// step holds its repair slot until then).
fn in_progress_intervals(doc: &Value, until_ms: u64) -> Vec<(u64, u64, u64)> {
    let started = records(doc, "step_started");
    let finished = records(doc, "step_finished");
    started
        .iter()
        .map(|s| {
            let replica = s["replica"].as_u64().unwrap();
            let attempt = &s["attempt"];
            let from = s["started_at_ms"].as_u64().unwrap();
            let deadline = s["deadline_ms"].as_u64().unwrap();
            let to = match finished
                .iter()
                .find(|f| f["replica"] == replica && &f["attempt"] == attempt)
            {
                None => until_ms,
                Some(f) if f["result"] == "succeeded" => {
                    deadline.max(f["finished_at_ms"].as_u64().unwrap())
                }
                Some(f) => f["finished_at_ms"].as_u64().unwrap(),
            };
            (replica, from, to)
        })
        .collect()
}

/// The most replicas in progress at once.
fn most_at_once(intervals: &[(u64, u64, u64)]) -> usize {
    intervals
        .iter()
        .map(|(_, from, _)| {
            intervals
                .iter()
                .filter(|(_, f, t)| f <= from && from < t)
                .map(|(r, _, _)| *r)
                .collect::<std::collections::BTreeSet<u64>>()
                .len()
        })
        .max()
        .unwrap_or(0)
}

/// Keeps reporting `signal` on each of `replicas` (expiring after
/// `ttl_ms`) until its first step started; returns when all did.
async fn report_until_started(c: &Cluster, replicas: &[u64], ttl_ms: u64) {
    c.wait(
        "every signalled replica's first step to start",
        async || {
            // Started: the leader applied the step's start (the script
            // runs a round later; a report after the start would outlive
            // the step's timeout and escalate further).
            let doc = c.leader_repairs().await;
            let started = |r: u64| {
                doc["state"]["cases"][r.to_string()]["attempts"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                    || records(&doc, "step_started")
                        .iter()
                        .any(|s| s["replica"] == r)
            };
            let waiting: Vec<u64> = replicas.iter().copied().filter(|r| !started(*r)).collect();
            if waiting.is_empty() {
                return Some(());
            }
            let via = *c.running().first()?;
            for r in waiting {
                c.report(via, r, "fsync_latency", Some(ttl_ms));
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            None
        },
    )
    .await;
}

/// Test 2: with --num-allowed-repairs 1, simultaneous signals against
/// three replicas are repaired one at a time: no two runs overlap.
#[test]
fn one_repair_at_a_time_with_num_allowed_repairs_one() {
    run(async {
        let c = Cluster::start(
            5,
            &["--repair-order", "s1:replica:4s", "--healthy-period", "1s"],
        )
        .await;
        c.script("s1", 10, 0);
        let (_, followers) = c.followers().await;
        let sick = &followers[..3];
        // Many reports at once, from several threads and through several replicas.
        std::thread::scope(|s| {
            for (i, r) in sick.iter().enumerate() {
                for via in c.running() {
                    let port = c.node(via).http;
                    let body = serde_json::json!({"replica": r, "signal": format!("burst_{i}"), "expires_in_ms": 1500});
                    s.spawn(move || {
                        http(port, "POST", "/repair", body.to_string().as_bytes(), None)
                    });
                }
            }
        });
        report_until_started(&c, sick, 2_500).await;
        c.wait("every step to end and every case to close", async || {
            let ends = c.calls().iter().filter(|c| !c.start).count();
            let doc = c.leader_repairs().await;
            let closed = doc["state"]["cases"].as_object()?.is_empty();
            (ends >= 3 && closed).then_some(())
        })
        .await;
        let calls = c.calls();
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for s in calls.iter().filter(|c| c.start) {
            let end = calls
                .iter()
                .find(|e| !e.start && e.pids[0] == s.pids[0])
                .unwrap_or_else(|| panic!("no end of {s:?}"));
            runs.push((s.replica, s.at_ms, end.at_ms));
        }
        let replicas: std::collections::BTreeSet<u64> = runs.iter().map(|r| r.0).collect();
        assert_eq!(
            replicas.len(),
            3,
            "every signalled replica was repaired: {runs:?}"
        );
        assert_eq!(runs.len(), 3, "each once: {calls:#?}");
        for a in &runs {
            for b in &runs {
                if a != b {
                    assert!(a.2 <= b.1 || b.2 <= a.1, "runs overlap: {a:?} and {b:?}");
                }
            }
        }
        let doc = c.leader_repairs().await;
        let intervals = in_progress_intervals(&doc, now_ms());
        assert_eq!(most_at_once(&intervals), 1, "{intervals:?}");
        assert!(records(&doc, "isolated").is_empty(), "{doc:#}");
    });
}

/// Test 3: signals against three of five voters (which still replicate):
/// never more than two under repair at once with --num-allowed-repairs 2;
/// and 3 of 5 is refused at start-up with its arithmetic.
#[test]
fn the_quorum_guard_holds_on_a_real_cluster() {
    run(async {
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "s1:replica:4s",
                "--healthy-period",
                "1s",
                "--num-allowed-repairs",
                "2",
            ],
        )
        .await;
        c.script("s1", 10, 0);
        let (_, followers) = c.followers().await;
        let sick = &followers[..3];
        report_until_started(&c, sick, 2_500).await;
        c.wait("every case to close", async || {
            let doc = c.leader_repairs().await;
            (c.calls().iter().filter(|c| !c.start).count() >= 3
                && doc["state"]["cases"].as_object()?.is_empty())
            .then_some(())
        })
        .await;
        let doc = c.leader_repairs().await;
        let intervals = in_progress_intervals(&doc, now_ms());
        assert_eq!(intervals.len(), 3, "{doc:#}");
        assert_eq!(most_at_once(&intervals), 2, "{intervals:?}");
        assert!(records(&doc, "isolated").is_empty(), "{doc:#}");
        // Every voter stayed a voter.
        for id in 1..=5 {
            assert_eq!(c.voter(id).await, Some(true), "replica {id}");
        }
        drop(c);

        // --num-allowed-repairs 3 of 5 voters is refused at start-up.
        let dir = tempfile::tempdir().unwrap();
        let peers: Vec<String> = (2..=5)
            .map(|p| format!("{p}=127.0.0.1:{}", free_port()))
            .collect();
        let mut args: Vec<String> = [
            "replica",
            "--path",
            &dir.path().join("r1").to_string_lossy(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--cluster-id",
            "refused",
            "--replica-id",
            "1",
            "--peers",
            &peers.join(","),
            "--num-allowed-repairs",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(repair_flags(
            dir.path(),
            &["--repair-order", "s1:replica:3s"],
        ));
        let mut child = tool_command(&replog_bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("a replica with --num-allowed-repairs 3 of 5 voters kept running");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let text = output_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("quorum of 3"), "{text}");
        assert!(text.contains("could leave 2 healthy voters of 5"), "{text}");
        assert!(text.contains("at most 2 = 5 - 3"), "{text}");
    });
}

/// Test 6: --removal-limit 0.2 of 5 voters allows one isolation: the second
/// raises the alarm instead; `replog repair reset` clears it and the
/// second replica is isolated then.
#[test]
fn the_removal_limit_raises_the_alarm_until_reset() {
    run(async {
        let c = Cluster::start(
            5,
            &["--repair-order", "s1:leader:30s", "--removal-limit", "0.2"],
        )
        .await;
        c.script("s1", 0, 1);
        let (_, followers) = c.followers().await;
        let (a, b) = (followers[0], followers[1]);
        c.report_recorded(a, "disk_errors", None).await;
        c.report_recorded(b, "disk_errors", None).await;
        c.wait(&format!("replica {a} to be demoted"), async || {
            (c.voter(a).await == Some(false)).then_some(())
        })
        .await;
        let doc = c
            .wait("the alarm", async || {
                let doc = c.leader_repairs().await;
                (!doc["state"]["alarm"].is_null()).then_some(doc)
            })
            .await;
        let reason = doc["state"]["alarm"]["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            reason.contains(&format!("isolating replica {b}")),
            "{reason}"
        );
        assert!(reason.contains("floor(0.2 x 5 voters)"), "{reason}");
        assert_eq!(doc["state"]["removals_since_reset"], 1, "{doc:#}");
        assert_eq!(doc["removals_allowed"], 1);
        let isolated: Vec<u64> = records(&doc, "isolated")
            .iter()
            .map(|i| i["replica"].as_u64().unwrap())
            .collect();
        assert_eq!(isolated, vec![a], "{doc:#}");
        // The alarm holds: b stays a voter.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(c.voter(b).await, Some(true));
        let out = c.repair_cli(followers[2], None, &["list"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(!listed["state"]["alarm"].is_null(), "{listed:#}");

        let out = c.repair_cli(followers[2], None, &["reset"]);
        assert!(
            out.status.success(),
            "replog repair reset: {}",
            output_text(&out)
        );
        c.wait(
            &format!("replica {b} to be demoted after the reset"),
            async || (c.voter(b).await == Some(false)).then_some(()),
        )
        .await;
        let doc = c.leader_repairs().await;
        assert!(doc["state"]["alarm"].is_null(), "{doc:#}");
        assert_eq!(doc["state"]["removals_since_reset"], 1, "{doc:#}");
        let isolated: Vec<u64> = records(&doc, "isolated")
            .iter()
            .map(|i| i["replica"].as_u64().unwrap())
            .collect();
        assert_eq!(isolated, vec![a, b], "{doc:#}");
        // Each replica's step ran once (the order has one step).
        let starts: Vec<u64> = c.starts().iter().map(|s| s.replica).collect();
        assert_eq!(starts, vec![a, b], "{:?}", c.calls());
    });
}

/// The rate limit: with --removal-rate-limit 1/15s, a second isolation
/// waits for the window to move.
#[test]
fn the_rate_limit_spaces_isolations() {
    run(async {
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "s1:leader:30s",
                "--removal-rate-limit",
                "1/15s",
            ],
        )
        .await;
        c.script("s1", 0, 1);
        let (_, followers) = c.followers().await;
        let (a, b) = (followers[0], followers[1]);
        c.report_recorded(a, "disk_errors", None).await;
        c.report_recorded(b, "disk_errors", None).await;
        for r in [a, b] {
            c.wait(&format!("replica {r} to be demoted"), async || {
                (c.voter(r).await == Some(false)).then_some(())
            })
            .await;
        }
        let doc = c.leader_repairs().await;
        let at: Vec<(u64, u64)> = records(&doc, "isolated")
            .iter()
            .map(|i| (i["replica"].as_u64().unwrap(), i["at_ms"].as_u64().unwrap()))
            .collect();
        assert_eq!(at.len(), 2, "{doc:#}");
        assert!(
            at[1].1 >= at[0].1 + 15_000,
            "isolations {at:?} closer than the 15 s window"
        );
        // b's order was exhausted long before its isolation: it waited for the window.
        let b_failed = records(&doc, "step_finished")
            .iter()
            .find(|f| f["replica"] == at[1].0)
            .and_then(|f| f["finished_at_ms"].as_u64())
            .unwrap();
        assert!(at[1].1 > b_failed + 5_000, "{doc:#}");
    });
}

/// A sick leader: its order runs (scope leader on itself), and its
/// isolation first moves the leadership (a leader cannot demote itself),
/// then the new leader demotes it; the other replicas' repairs go on.
#[test]
fn an_isolated_leader_hands_over_its_leadership_and_is_demoted() {
    run(async {
        let c = Cluster::start(
            5,
            &[
                "--repair-order",
                "s1:leader:30s",
                "--num-allowed-repairs",
                "2",
            ],
        )
        .await;
        c.script("s1", 0, 1);
        let (leader, followers) = c.followers().await;
        c.report_recorded(leader, "disk_errors", None).await;
        c.wait(
            &format!("the sick leader {leader} to be demoted"),
            async || {
                let (now, _) = c.leader().await?;
                (now != leader && c.voter(leader).await == Some(false)).then_some(())
            },
        )
        .await;
        // A later case is still decided.
        let other = followers[followers.len() - 1];
        c.report_recorded(other, "disk_errors", None).await;
        c.wait(&format!("replica {other} to be demoted"), async || {
            (c.voter(other).await == Some(false)).then_some(())
        })
        .await;
        let starts: Vec<u64> = c.starts().iter().map(|s| s.replica).collect();
        assert_eq!(starts, vec![leader, other], "{:?}", c.calls());
    });
}

/// Appends one after another through every voter's endpoint until stopped,
/// writing again when an outcome is unknown; keeps the acknowledged
/// positions and how many failed for good.
struct Writes {
    acked: std::sync::Arc<Mutex<Vec<u64>>>,
    failed: std::sync::Arc<Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writes {
    fn start(endpoints: Vec<String>) -> Writes {
        use std::sync::atomic::Ordering;
        let acked = std::sync::Arc::new(Mutex::new(Vec::new()));
        let failed = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = Client::with_config(
            endpoints,
            ClientConfig {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        );
        let task = tokio::spawn({
            let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
            async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match client.append(format!("w{i}").into_bytes()).await {
                        Ok(r) => acked.lock().unwrap().push(r.position),
                        Err(replog_client::ClientError::OutcomeUnknown { .. })
                        | Err(replog_client::ClientError::NoLeader { .. }) => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Writes {
            acked,
            failed,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` writes beyond the current count are acknowledged.
    async fn wait_more(&self, c: &Cluster, what: &str, more: usize) {
        let want = self.count() + more;
        c.wait(
            &format!("{more} more acknowledged writes {what}"),
            async || (self.count() >= want).then_some(()),
        )
        .await;
    }

    /// Stops the writer; returns the acknowledged positions.
    async fn stop(self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let failed = self.failed.lock().unwrap().clone();
        (acked, failed)
    }
}

/// The membership as the leader sees it: (id, voter) of every member.
async fn membership(c: &Cluster) -> Option<Vec<(u64, bool)>> {
    let (_, s) = c.leader().await?;
    Some(s.members.iter().map(|m| (m.id, m.voter)).collect())
}

/// Test: with a spare configured, an exhausted order replaces the sick
/// replica: the spare is added as a learner, catches up, is promoted, and
/// only then is the sick replica removed; the cluster never has fewer than
/// five voters and acknowledges writes all along.
#[test]
fn an_isolated_replica_is_replaced_by_a_spare_while_writes_go_on() {
    run(async {
        let c = Cluster::start_with_spares(5, 1, &["--repair-order", "fence:leader:30s"]).await;
        let spare = 6;
        c.script("fence", 0, 1); // fails: the order is exhausted at once
        assert_eq!(
            c.voter(spare).await,
            None,
            "the spare starts outside the cluster"
        );
        let writes = Writes::start((1..=5).map(|id| c.endpoint(id)).collect());
        writes.wait_more(&c, "before the signal", 50).await;
        let (_, followers) = c.followers().await;
        let sick = *followers.iter().find(|id| **id <= 5).unwrap();
        c.note(&format!("signalling replica {sick}"));
        c.report_recorded(sick, "storage_errors", Some(3_000)).await;

        // Watch the membership until the sick replica is gone; keep it sick.
        let mut seen: Vec<Vec<(u64, bool)>> = Vec::new();
        let mut acked_at_change: Vec<usize> = Vec::new();
        c.wait(
            &format!("replica {sick} to be replaced by {spare}"),
            async || {
                c.report(1, sick, "storage_errors", Some(3_000));
                let m = membership(&c).await?;
                if seen.last() != Some(&m) {
                    c.note(&format!("membership {m:?}"));
                    seen.push(m.clone());
                    acked_at_change.push(writes.count());
                }
                let gone = !m.iter().any(|(id, _)| *id == sick);
                if gone {
                    Some(())
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
            },
        )
        .await;
        writes.wait_more(&c, "after the replacement", 50).await;

        // Add before remove: the spare was a learner, then a voter, and
        // only then did the sick replica leave; never fewer than 5 voters.
        let spare_as =
            |m: &Vec<(u64, bool)>| m.iter().find(|(id, _)| *id == spare).map(|(_, v)| *v);
        let has_sick = |m: &Vec<(u64, bool)>| m.iter().any(|(id, _)| *id == sick);
        for m in &seen {
            let voters = m.iter().filter(|(_, v)| *v).count();
            assert!(
                voters >= 5,
                "only {voters} voters in {m:?}; all seen: {seen:?}"
            );
            if !has_sick(m) {
                assert_eq!(
                    spare_as(m),
                    Some(true),
                    "{sick} removed before {spare} voted: {seen:?}"
                );
            }
        }
        assert!(
            seen.iter()
                .any(|m| spare_as(m) == Some(true) && has_sick(m)),
            "never saw the spare voting beside the sick replica: {seen:?}"
        );
        let final_members = seen.last().unwrap();
        assert_eq!(final_members.len(), 5, "{final_members:?}");
        assert!(final_members.iter().all(|(_, v)| *v), "{final_members:?}");

        // Writes were acknowledged between every change of the membership.
        let total = writes.count();
        acked_at_change.push(total);
        assert!(
            acked_at_change.windows(2).all(|w| w[0] < w[1]),
            "a membership phase without acknowledged writes: {acked_at_change:?} ({seen:?})"
        );
        let (acked, failed) = writes.stop().await;
        assert!(failed.is_empty(), "writes failed for good: {failed:?}");

        // The history names the spare, and the spare holds every write.
        let doc = c.leader_repairs().await;
        let isolations = records(&doc, "isolated");
        assert_eq!(isolations.len(), 1, "{doc:#}");
        assert_eq!(isolations[0]["replica"], sick);
        assert_eq!(isolations[0]["spare"], spare);
        assert!(refused(&doc).is_empty(), "refused records: {doc:#}");
        let last = *acked.iter().max().unwrap();
        c.wait(
            &format!("spare {spare} to apply every acknowledged write"),
            async || {
                let s = c.status(spare).await?;
                (s.status == VOTING && s.applied >= last).then_some(())
            },
        )
        .await;
    });
}

/// Test: a replica demoted because nothing helped, once healthy for
/// `--healthy-period`, is re-admitted: the case closes, a `readmitted`
/// record is written and the lifecycle promotes it back to a voter.
#[test]
fn a_replica_that_heals_is_readmitted() {
    run(async {
        let c = Cluster::start(5, &["--repair-order", "fence:leader:30s"]).await;
        c.script("fence", 0, 1);
        let (_, followers) = c.followers().await;
        let sick = followers[0];
        c.report_recorded(sick, "fsync_latency", Some(2_000)).await;
        c.signal_until_demoted(1, sick, "fsync_latency", 2_000, 500)
            .await;
        let demoted_at = Instant::now();
        c.note(&format!("replica {sick} demoted; no more signals"));
        // An isolated learner is not ready (HTTP and gRPC health alike).
        let readyz = |id: u64| http(c.node(id).http, "GET", "/readyz", b"", None);
        c.wait(&format!("replica {sick} to report not ready"), async || {
            let (status, body) = readyz(sick);
            (status == 503 && body.contains("learner")).then_some(())
        })
        .await;
        // The last signal expires within 2 s, then 3 s of health: back.
        c.wait(&format!("replica {sick} to be a voter again"), async || {
            (c.voter(sick).await? && c.status(sick).await?.status == VOTING).then_some(())
        })
        .await;
        assert!(
            demoted_at.elapsed() >= Duration::from_secs(3),
            "re-admitted before --healthy-period (3 s) of health"
        );
        c.wait(&format!("replica {sick} to be ready again"), async || {
            (readyz(sick).0 == 200).then_some(())
        })
        .await;
        let doc = c.leader_repairs().await;
        let readmitted = records(&doc, "readmitted");
        assert_eq!(readmitted.len(), 1, "{doc:#}");
        assert_eq!(readmitted[0]["replica"], sick);
        assert!(refused(&doc).is_empty(), "refused records: {doc:#}");
        let open = doc["state"]["cases"]
            .as_object()
            .map(|m| m.len())
            .unwrap_or(0);
        assert_eq!(open, 0, "the case stays open: {doc:#}");
        // It stays a voter: nothing signals it any more.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(c.voter(sick).await, Some(true));
    });
}

/// Test: a step of scope `replica` on a replica that is paused (SIGSTOP: it
/// holds its connections but answers nothing) ends at the step's deadline
/// and the escalation goes on to the next step; the command never starts
/// late, even when the paused replica resumes and finds the request
/// waiting (found by the fault campaign: the leader waited for it for up
/// to 600 s, and the command ran after its deadline).
#[test]
fn a_step_on_a_paused_replica_ends_at_its_deadline_and_never_runs_late() {
    run(async {
        let c = Cluster::start(
            5,
            &["--repair-order", "restart:replica:2s,fence:leader:60s"],
        )
        .await;
        c.script("restart", 0, 0);
        c.script("fence", 0, 0);
        let (_, followers) = c.followers().await;
        let sick = followers[0];
        c.signal_process(sick, libc::SIGSTOP);
        // The detector judges it unreachable; restart starts, and must end
        // by its deadline although the replica cannot answer.
        let doc = c
            .wait(
                "the next step after the paused replica's restart",
                async || {
                    let doc = c.leader_repairs().await;
                    let next = records(&doc, "step_started")
                        .iter()
                        .any(|s| s["replica"] == sick && s["repair_id"] == "fence");
                    next.then_some(doc)
                },
            )
            .await;
        let restart = records(&doc, "step_started")
            .into_iter()
            .find(|s| s["repair_id"] == "restart")
            .cloned()
            .unwrap_or_else(|| panic!("no restart step: {doc:#}"));
        let finished = records(&doc, "step_finished")
            .into_iter()
            .find(|f| f["replica"] == sick && f["attempt"] == restart["attempt"])
            .cloned()
            .unwrap_or_else(|| panic!("restart has no outcome: {doc:#}"));
        assert_eq!(finished["result"], "failed", "{finished:#}");
        assert!(
            finished["output"]
                .as_str()
                .unwrap_or("")
                .contains("no answer within"),
            "{finished:#}"
        );
        // The replica resumes and finds the request: it refuses it.
        c.signal_process(sick, libc::SIGCONT);
        let deadline_ms = restart["deadline_ms"].as_u64().unwrap();
        c.wait(&format!("replica {sick} to answer again"), async || {
            c.status(sick).await
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Paused before the step began, it could only have run it late.
        let restarts: Vec<Call> = c
            .starts()
            .into_iter()
            .filter(|s| s.repair == "restart")
            .collect();
        assert!(
            restarts.is_empty(),
            "restart ran after its deadline {deadline_ms}: {restarts:?}"
        );
    });
}
