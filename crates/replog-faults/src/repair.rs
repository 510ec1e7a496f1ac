//! The repair coordinator under the campaign's faults (issue 14: a
//! coordinator that demotes, removes and re-admits replicas by itself is
//! only as safe as the rejoin underneath it).
//!
//! With a [`CoordinatorConfig`] every replica runs the coordinator in
//! `execute` mode ([`CoordinatorConfig::flags`]) with a short escalation
//! order of harmless repair commands, a concurrency of one, removal limits
//! that allow isolations during the run, a healthy period of seconds (so
//! isolated replicas come back) and its HTTP port on [`HTTP_PORT`]. A
//! [`RepairWatch`] polls the leader's `GET /repairs` while the campaign
//! runs and merges the replicated history by log position; at the end the
//! rules of [`crate::repair_check`] judge it.
//!
//! What the harness guarantees of itself:
//! - The repair commands change nothing: one script ([`STEP_SCRIPT`]) that
//!   appends its call (repair id, replica, attempt, scope, deadline) to the
//!   `calls` file beside it and exits 0.
//! - It reports no signal: every signal comes from the leader's detector,
//!   which judges a replica silent for `--ping-timeout` x
//!   `--max-ping-timeouts` (500 ms x 5 here) unreachable; the nemesis's
//!   kills, pauses and partitions drive the coordinator.
//! - It plays the operator in one way only: when the leader's state shows
//!   the removal-limit alarm for [`CoordinatorConfig::reset_alarm_after`],
//!   it posts `POST /repair/reset` to the leader (a `reset` record in the
//!   history), as `replog repair reset` would. Without it a long campaign
//!   would end with the coordinator stopped and its demoted replicas never
//!   re-admitted (nothing new is decided while the alarm is raised).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::cluster::Cluster;
use crate::repair_check::{parse_calls, Event, FinalState, Limits, Seen, StepCall};

/// The HTTP port (`--metrics-listen`) of every replica, in its namespace.
pub const HTTP_PORT: u16 = 7200;

/// How long one HTTP exchange with a replica may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// The repair command: records its call, repairs nothing.
pub const STEP_SCRIPT: &str = r#"#!/bin/sh
# A repair step of the fault campaign: it repairs nothing, it records its call.
printf '%s|%s|%s|%s|%s|%s\n' "$REPLOG_REPAIR_ID" "$REPLOG_REPLICA_ID" "$REPLOG_ATTEMPT" \
  "$REPLOG_SCOPE" "$REPLOG_DEADLINE_MS" "$(date +%s%3N)" >> "$(dirname "$0")/calls"
"#;

/// One step of the escalation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderStep {
    pub id: String,
    /// `replica` (run by the sick replica's server) or `leader`.
    pub scope: &'static str,
    pub timeout: Duration,
}

/// How the replicas run the coordinator; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    pub order: Vec<OrderStep>,
    pub num_allowed_repairs: u32,
    /// `--removal-limit`, a fraction of the voters.
    pub removal_limit: f64,
    /// `--removal-rate-limit` as count and period.
    pub removal_rate_limit: Option<(u32, Duration)>,
    pub healthy_period: Duration,
    /// How long a detector signal counts (renewed at half of it while the
    /// replica stays unhealthy): a healed replica's signal is gone soon.
    pub signal_ttl: Duration,
    /// The detector's grace after a leader change.
    pub reregister_timeout: Duration,
    pub poll_interval: Duration,
    /// The campaign resets an alarm raised this long (`None`: never).
    pub reset_alarm_after: Option<Duration>,
}

impl Default for CoordinatorConfig {
    /// Two steps of 2 s (the sick replica's own, then the leader's), one
    /// repair at a time, 3 of 5 isolations before the alarm and at most one
    /// per 20 s, re-admission after 3 s of health.
    fn default() -> Self {
        let step = |id: &str, scope, ms| OrderStep {
            id: id.to_string(),
            scope,
            timeout: Duration::from_millis(ms),
        };
        CoordinatorConfig {
            order: vec![
                step("restart", "replica", 2000),
                step("reboot", "leader", 2000),
            ],
            num_allowed_repairs: 1,
            removal_limit: 0.6,
            removal_rate_limit: Some((1, Duration::from_secs(20))),
            healthy_period: Duration::from_secs(3),
            signal_ttl: Duration::from_secs(4),
            reregister_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(500),
            reset_alarm_after: Some(Duration::from_secs(2)),
        }
    }
}

/// What the repair side of a campaign can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(
        "the repair script's path {0} holds a comma or a space, which --repair-set cannot carry"
    )]
    BadPath(PathBuf),
    #[error("{0} is given by the cluster's flags and by the repair option (a replica refuses a flag given twice)")]
    FlagGivenTwice(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{what} at {addr}: {why}")]
    Http {
        addr: SocketAddr,
        what: String,
        why: String,
    },
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl CoordinatorConfig {
    /// The `replog replica` flags; `script` is the repair command's script.
    /// Fails when `given` (the cluster's own extra flags) holds one of them.
    pub fn flags(&self, script: &Path, given: &[String]) -> Result<Vec<String>, RepairError> {
        let path = script.to_string_lossy();
        if path.contains([',', ' ']) {
            return Err(RepairError::BadPath(script.to_path_buf()));
        }
        let set: Vec<String> = self
            .order
            .iter()
            .map(|s| format!("{}=sh {path}", s.id))
            .collect();
        let order: Vec<String> = self
            .order
            .iter()
            .map(|s| format!("{}:{}:{}", s.id, s.scope, ms(s.timeout)))
            .collect();
        let mut flags = vec![
            ("--repair-mode", "execute".to_string()),
            ("--repair-set", set.join(",")),
            ("--repair-order", order.join(",")),
            (
                "--num-allowed-repairs",
                self.num_allowed_repairs.to_string(),
            ),
            ("--removal-limit", self.removal_limit.to_string()),
            ("--healthy-period", ms(self.healthy_period)),
            ("--signal-ttl", ms(self.signal_ttl)),
            ("--reregister-timeout", ms(self.reregister_timeout)),
            ("--metrics-listen", format!("0.0.0.0:{HTTP_PORT}")),
        ];
        if let Some((count, period)) = self.removal_rate_limit {
            flags.push(("--removal-rate-limit", format!("{count}/{}", ms(period))));
        }
        if let Some((flag, _)) = flags.iter().find(|(f, _)| given.iter().any(|g| g == f)) {
            return Err(RepairError::FlagGivenTwice(flag.to_string()));
        }
        Ok(flags
            .into_iter()
            .flat_map(|(f, v)| [f.to_string(), v])
            .collect())
    }

    /// The limits these flags set for `voters` voters (the replicas'
    /// arithmetic, done here again: `floor(limit x voters)`).
    pub fn limits(&self, voters: usize) -> Limits {
        Limits {
            voters,
            num_allowed_repairs: self.num_allowed_repairs,
            removals_allowed: (self.removal_limit * voters as f64 + 1e-9).floor() as u32,
            rate_limit: self
                .removal_rate_limit
                .map(|(count, period)| (count, period.as_millis() as u64)),
        }
    }
}

/// The directory of the repair script and its calls file: `repair/` under
/// the campaign's directory, or a temporary one.
pub struct RepairDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl RepairDir {
    /// Creates the directory and writes the script.
    pub fn create(under: Option<&Path>) -> Result<RepairDir, RepairError> {
        let (path, tmp) = match under {
            Some(dir) => (dir.join("repair"), None),
            None => {
                let t = tempfile::tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join("step.sh"), STEP_SCRIPT)?;
        std::fs::write(path.join("calls"), "")?;
        Ok(RepairDir { path, _tmp: tmp })
    }

    pub fn script(&self) -> PathBuf {
        self.path.join("step.sh")
    }

    /// Every call the script recorded so far.
    pub fn calls(&self) -> Result<Vec<StepCall>, RepairError> {
        Ok(parse_calls(&std::fs::read_to_string(
            self.path.join("calls"),
        )?))
    }
}

/// `GET /repairs`, the fields the watcher reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RepairsDoc {
    pub is_leader: bool,
    pub removals_allowed: u32,
    pub state: StateDoc,
}

/// The replicated state in [`RepairsDoc`].
#[derive(Debug, Clone, Deserialize)]
pub struct StateDoc {
    pub applied_through: u64,
    pub removals_since_reset: u32,
    pub alarm: Option<serde_json::Value>,
    pub cases: serde_json::Map<String, serde_json::Value>,
    pub history: Vec<Event>,
}

impl RepairsDoc {
    fn final_state(&self) -> FinalState {
        FinalState {
            applied_through: self.state.applied_through,
            removals_since_reset: self.state.removals_since_reset,
            alarm: self.state.alarm.is_some(),
            open_cases: self.state.cases.len(),
            removals_allowed: self.removals_allowed,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or("a chunk without its size line")?;
        let line = String::from_utf8_lossy(&b[..eol]);
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("chunk size `{size_hex}` is not hexadecimal"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or("a chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("a chunk without its end")?;
    }
}

/// Status and body of a whole HTTP/1.1 response.
pub fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = find(buf, b"\r\n\r\n").ok_or("no end of the headers")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    let body = &buf[end + 4..];
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        },
    ))
}

/// One HTTP/1.1 exchange without a body (`Connection: close`).
async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, Vec<u8>), RepairError> {
    let what = format!("{method} {path}");
    let err = |why: String| RepairError::Http {
        addr,
        what: what.clone(),
        why,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| err(format!("no answer within {HTTP_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?;
    parse_response(&answer).map_err(err)
}

/// The HTTP address of replica `id`, from the root namespace.
fn http_addr(c: &Cluster, id: u64) -> SocketAddr {
    SocketAddr::from((c.net().node_addr(id), HTTP_PORT))
}

/// `GET path` on replica `id`'s HTTP port (`/readyz`, `/livez`, ...): the
/// status and body.
pub async fn get(c: &Cluster, id: u64, path: &str) -> Result<(u16, Vec<u8>), RepairError> {
    http(http_addr(c, id), "GET", path).await
}

/// Replica `id`'s `GET /repairs`.
pub async fn fetch(c: &Cluster, id: u64) -> Result<RepairsDoc, RepairError> {
    let addr = http_addr(c, id);
    let (status, body) = http(addr, "GET", "/repairs").await?;
    let err = |why: String| RepairError::Http {
        addr,
        what: "GET /repairs".into(),
        why,
    };
    if status != 200 {
        return Err(err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body).map_err(|e| err(format!("unreadable answer: {e}")))
}

/// `POST /repair/reset` to replica `id`.
async fn reset(c: &Cluster, id: u64) -> Result<(), RepairError> {
    let addr = http_addr(c, id);
    match http(addr, "POST", "/repair/reset").await? {
        (200, _) => Ok(()),
        (status, body) => Err(RepairError::Http {
            addr,
            what: "POST /repair/reset".into(),
            why: format!("answered {status}: {}", String::from_utf8_lossy(&body)),
        }),
    }
}

/// Unix time in ms (the clock of the repair records).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    polls: AtomicU64,
    failed: AtomicU64,
}

/// What a watch saw, once finished.
#[derive(Debug, Clone)]
pub struct Watched {
    pub seen: Seen,
    pub polls: u64,
    pub polls_failed: u64,
    /// Unix ms at the cluster clock's zero: `(at_ms - epoch_ms) x 1000` is
    /// a record's time on the history's clock.
    pub epoch_ms: u64,
}

/// Polls the coordinator during a campaign; see the module docs.
pub struct RepairWatch {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
    epoch_ms: u64,
}

impl Drop for RepairWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Polls replica `id` once and merges its history; returns its document.
async fn poll(c: &Cluster, shared: &Shared, id: u64) -> Option<RepairsDoc> {
    shared.polls.fetch_add(1, Ordering::SeqCst);
    match fetch(c, id).await {
        Ok(doc) => {
            shared.seen.lock().unwrap().merge(doc.state.history.clone());
            Some(doc)
        }
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(replica = id, error = %e, "repair poll failed");
            None
        }
    }
}

/// The watcher's loop: the leader (else the next replica in turn) every
/// `poll_interval`; an alarm the leader shows long enough is reset.
async fn watch_loop(
    c: Arc<Cluster>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    cfg: CoordinatorConfig,
) {
    let ids = c.ids();
    let mut turn = 0usize;
    let mut alarmed_since: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(cfg.poll_interval).await;
        let id = match c.leader().await {
            Some((id, _)) => id,
            None => {
                turn += 1;
                ids[turn % ids.len()]
            }
        };
        let Some(doc) = poll(&c, &shared, id).await else {
            continue;
        };
        let Some(after) = cfg.reset_alarm_after.filter(|_| doc.is_leader) else {
            continue;
        };
        if doc.state.alarm.is_none() {
            alarmed_since = None;
            continue;
        }
        let since = *alarmed_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= after {
            match reset(&c, id).await {
                Ok(()) => {
                    info!(leader = id, alarm = ?doc.state.alarm, "the campaign reset the repair alarm");
                    alarmed_since = None;
                }
                Err(e) => warn!(error = %e, "resetting the repair alarm failed; trying again"),
            }
        }
    }
}

impl RepairWatch {
    /// Starts polling `c` (the cluster's clock and the unix clock are tied
    /// here).
    pub fn start(c: Arc<Cluster>, cfg: &CoordinatorConfig) -> RepairWatch {
        let epoch_ms = unix_ms().saturating_sub(c.elapsed().as_millis() as u64);
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(watch_loop(c, shared.clone(), stop.clone(), cfg.clone()));
        RepairWatch {
            shared,
            stop,
            task: Some(task),
            epoch_ms,
        }
    }

    /// What was seen so far (for a report of a campaign that failed).
    pub fn seen(&self) -> Seen {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Stops polling, polls every replica once more (the final state is
    /// the most advanced one's) and reads the calls file.
    pub async fn finish(mut self, c: &Cluster, dir: &RepairDir) -> Result<Watched, RepairError> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let mut last: Option<RepairsDoc> = None;
        for id in c.ids() {
            if let Some(doc) = poll(c, &self.shared, id).await {
                if last
                    .as_ref()
                    .is_none_or(|l| l.state.applied_through < doc.state.applied_through)
                {
                    last = Some(doc);
                }
            }
        }
        let mut seen = self.shared.seen.lock().unwrap().clone();
        seen.end_ms = unix_ms();
        seen.final_state = last.as_ref().map(RepairsDoc::final_state);
        seen.calls = dir.calls()?;
        Ok(Watched {
            seen,
            polls: self.shared.polls.load(Ordering::SeqCst),
            polls_failed: self.shared.failed.load(Ordering::SeqCst),
            epoch_ms: self.epoch_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Ok((200, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok((503, b"abcde".to_vec())));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab")
                .is_err()
        );
    }

    #[test]
    fn flags_name_every_setting_once_and_refuse_a_second_time() {
        let cfg = CoordinatorConfig::default();
        let flags = cfg.flags(Path::new("/tmp/r/step.sh"), &[]).unwrap();
        let value = |f: &str| {
            let i = flags.iter().position(|x| x == f).unwrap();
            flags[i + 1].clone()
        };
        assert_eq!(
            value("--repair-set"),
            "restart=sh /tmp/r/step.sh,reboot=sh /tmp/r/step.sh"
        );
        assert_eq!(
            value("--repair-order"),
            "restart:replica:2000ms,reboot:leader:2000ms"
        );
        assert_eq!(value("--removal-rate-limit"), "1/20000ms");
        assert_eq!(value("--metrics-listen"), "0.0.0.0:7200");
        assert_eq!(cfg.limits(5).removals_allowed, 3);
        let given = vec!["--healthy-period".to_string(), "1s".to_string()];
        assert!(matches!(
            cfg.flags(Path::new("/tmp/r/step.sh"), &given),
            Err(RepairError::FlagGivenTwice(f)) if f == "--healthy-period"
        ));
        assert!(matches!(
            cfg.flags(Path::new("/tmp/a b/step.sh"), &[]),
            Err(RepairError::BadPath(_))
        ));
    }
}
