//! What the process-level tests share to start and drive real `replog`
//! processes: the binaries of the target directory, free ports, one test at
//! a time on a runtime, and the tools' command lines and output.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replog_client::StatusResponse;

/// The tests of one test binary start several processes each; running
/// them one at a time keeps the machine from being the thing under test.
static SERIAL: Mutex<()> = Mutex::new(());

/// Binary `name` of `package`, built in this target directory; `env`
/// overrides where it is looked for.
pub fn target_bin(name: &str, package: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    // target/debug/deps/<test>-HASH -> target/debug/NAME
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p {package} --bin {name}` \
         (same CARGO_TARGET_DIR), or point {env} at it",
        bin.display()
    );
    bin
}

/// The `replog` binary of this target directory (`REPLOG_BIN` overrides).
pub fn replog_bin() -> PathBuf {
    target_bin("replog", "replog-cli", "REPLOG_BIN")
}

/// A port nobody listens on, outside Linux's ephemeral range (32768-60999),
/// so that no outgoing connection takes it while a replica is down between
/// a kill and its restart. Ports are handed out once per test process,
/// starting at an offset of the process id and `salt` (each test binary
/// its own, so that two binaries rarely start at the same port).
pub fn free_port(salt: u32) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = (std::process::id().wrapping_mul(7919).wrapping_add(salt)) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (BASE + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {BASE} and {}", BASE + SPAN);
}

/// Runs a test body on a multi-threaded runtime, one test at a time.
pub fn run<F: std::future::Future<Output = ()>>(body: F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

/// The last `n` lines of the file at `path` (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command of a tool binary without the caller's `REPLOG_*` variables.
pub fn tool_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REPLOG_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Replica status code of a VOTING replica in a `StatusResponse`.
pub const VOTING: i32 = 4;

/// Fails the test if one of the replica processes exited by itself (a
/// slot holds a running child; a killed one was taken out of it).
pub fn check_alive<'a>(children: impl IntoIterator<Item = (u64, &'a Mutex<Option<Child>>)>) {
    for (id, slot) in children {
        let mut slot = slot.lock().unwrap();
        if let Some(child) = slot.as_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                slot.take();
                panic!("replica {id} exited by itself with {status}");
            }
        }
    }
}

/// Polls `f` every `every` until it gives a value, calling `alive` before
/// each try (it panics when a process died); fails the test after `limit`.
pub async fn poll<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    alive: impl Fn(),
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        alive();
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Of the replicas `ids`, the VOTING one that leads in the highest term,
/// asking each with `status`.
pub async fn leader_of(
    ids: impl IntoIterator<Item = u64>,
    status: impl AsyncFn(u64) -> Option<StatusResponse>,
) -> Option<(u64, StatusResponse)> {
    let mut best: Option<(u64, StatusResponse)> = None;
    for id in ids {
        if let Some(s) = status(id).await {
            if s.is_leader && s.status == VOTING && best.as_ref().is_none_or(|b| b.1.term < s.term)
            {
                best = Some((id, s));
            }
        }
    }
    best
}

/// SIGKILLs and reaps every child still in its slot (a test's clean-up;
/// a poisoned slot is taken too).
pub fn kill_all<'a>(children: impl IntoIterator<Item = &'a Mutex<Option<Child>>>) {
    for slot in children {
        if let Some(mut child) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// For a failing test: prints the last `lines` of each of `logs` that
/// exists and, with `REPLOG_KEEP_TEST_DIRS` set, keeps `root` (replaced by
/// a fresh temporary directory) for a post-mortem.
pub fn post_mortem(logs: &[PathBuf], lines: usize, root: &mut tempfile::TempDir) {
    for log in logs.iter().filter(|l| l.exists()) {
        eprintln!(
            "\n===== tail of {} =====\n{}",
            log.display(),
            tail(log, lines)
        );
    }
    if std::env::var_os("REPLOG_KEEP_TEST_DIRS").is_some() {
        let path = std::mem::replace(root, tempfile::tempdir().unwrap()).keep();
        eprintln!("kept the test directory {}", path.display());
    }
}
