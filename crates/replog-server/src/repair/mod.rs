//! Health checks and the repair coordinator on a replica server (issue 14):
//! the runtime around `replog_repair`'s I/O-free decisions.
//!
//! - [`intake`]: the admin API's requests, checked (token, body, replica).
//! - [`executor`]: runs a repair command with its environment and timeout.
//! - [`round`]: the leader's rounds: observe, judge, decide, act.
//! - `monitor`: the replica's self-monitor (`--monitor-config`).
//!
//! Every replica serves the admin API (HTTP `POST /repair...`,
//! `GET /repairs`, and the `Repair` RPC); one that does not lead forwards
//! the request to the leader over the RPC, once. Only the leader records:
//! a signal, a decision or an operator's command is a record in the
//! replicated log, written by a writer of the leader's term (fenced: a
//! deposed leader's write fails), before anything acts on it.

pub mod executor;
pub mod intake;
mod monitor;
mod round;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use replog_log::Log;
use replog_proto::client::replog_client_client::ReplogClientClient;
use replog_proto::client::{RepairRequest, RepairResponse};
use replog_repair::config::Limits;
use replog_repair::{DetectorConfig, Health, Record, RepairConfig};
use serde::Serialize;
use tokio::task::JoinHandle;

use intake::AdminError;

/// The repair coordinator's configuration on a server.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    pub config: RepairConfig,
    pub detector: DetectorConfig,
    /// The bearer token the admin API requires (`--admin-token-file`).
    pub admin_token: Option<String>,
    /// How often the leader runs a round of decisions.
    pub round_interval: Duration,
    /// The self-monitor's config (`--monitor-config`); none: no monitor.
    pub monitor: Option<replog_repair::monitor::MonitorConfig>,
}

impl Default for RepairOptions {
    fn default() -> Self {
        RepairOptions {
            config: RepairConfig::default(),
            detector: DetectorConfig::default(),
            admin_token: None,
            round_interval: Duration::from_secs(1),
            monitor: None,
        }
    }
}

/// What the leader's last round saw, for `GET /repairs`, `replog status`
/// and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Judgment {
    /// This replica led when it judged (else everything below is empty).
    pub leader: bool,
    pub term: u64,
    pub grace: bool,
    pub health: BTreeMap<u64, Health>,
    pub voters: usize,
    pub available_voters: usize,
    /// `None`: no quorum of healthy voters (or not judged).
    pub failure_tolerance: Option<usize>,
}

/// The repair side of a replica server.
pub struct Repairs {
    log: Arc<Log>,
    /// This replica's id (read once: `Log::meta` copies the whole record).
    me: u64,
    opts: RepairOptions,
    limits: Limits,
    judgment: Mutex<Judgment>,
    metrics: round::RepairMetrics,
    /// The writer of the term this replica leads in (started on first use).
    writer: tokio::sync::Mutex<Option<(u64, replog_log::Writer)>>,
}

/// Unix time in ms, the clock of every repair record.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Repairs {
    /// Checks the configuration against the membership at start-up
    /// (`voters` and every member's id) and registers the metrics.
    pub fn new(
        log: Arc<Log>,
        opts: RepairOptions,
        voters: usize,
        members: &[u64],
        registry: &prometheus::Registry,
    ) -> Result<Arc<Repairs>, String> {
        let limits = opts
            .config
            .check(voters, members)
            .map_err(|e| e.to_string())?;
        let metrics = round::RepairMetrics::register(registry).map_err(|e| e.to_string())?;
        Ok(Arc::new(Repairs {
            me: log.meta().replica_id,
            log,
            opts,
            limits,
            judgment: Mutex::new(Judgment::default()),
            metrics,
            writer: tokio::sync::Mutex::new(None),
        }))
    }

    /// What the last round judged.
    pub fn judgment(&self) -> Judgment {
        self.judgment.lock().clone()
    }

    /// Starts the leader's rounds, and the self-monitor if configured,
    /// until `stopping` turns true.
    pub fn spawn(self: &Arc<Self>, stopping: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
        if let Some(config) = self.opts.monitor.clone() {
            tokio::spawn(monitor::run(self.clone(), config, stopping.clone()));
        }
        let me = self.clone();
        tokio::spawn(async move { round::run(me, stopping).await })
    }

    /// One admin request (`op`, its JSON body, the bearer token); forwards
    /// it to the leader unless this replica leads or it was forwarded.
    pub async fn handle(
        &self,
        op: &str,
        body: &[u8],
        token: &str,
        forwarded: bool,
    ) -> (u16, Vec<u8>) {
        match self.handle_checked(op, body, token, forwarded).await {
            Ok(json) => (200, json),
            Err(e) => (e.status, error_body(&e)),
        }
    }

    async fn handle_checked(
        &self,
        op: &str,
        body: &[u8],
        token: &str,
        forwarded: bool,
    ) -> Result<Vec<u8>, AdminError> {
        intake::check_token(self.opts.admin_token.as_deref(), token)?;
        match op {
            "list" => return self.list(),
            "run" => return round::run_here(self, body).await,
            "report" | "cancel" | "pause" | "resume" | "reset" => {}
            other => {
                return Err(AdminError::not_found(format!(
                    "no repair operation `{other}`"
                )))
            }
        }
        if !self.log.progress().is_leader {
            if forwarded {
                return Err(AdminError::unavailable(
                    "this replica no longer leads; try again",
                ));
            }
            return self.forward(op, body, token).await;
        }
        let record = self.record_for(op, body).await?;
        round::write(self, &record).await?;
        Ok(serde_json::to_vec(&serde_json::json!({ "recorded": record })).unwrap_or_default())
    }

    /// The record an operation writes, checked against the state now.
    async fn record_for(&self, op: &str, body: &[u8]) -> Result<Record, AdminError> {
        let now = now_ms();
        Ok(match op {
            "report" => {
                let members: Vec<u64> = self
                    .log
                    .cluster_status()
                    .await
                    .map_err(|e| AdminError::unavailable(e.to_string()))?
                    .members
                    .iter()
                    .map(|m| m.id)
                    .collect();
                Record::Signal(intake::report(
                    body,
                    &members,
                    now,
                    self.opts.config.signal_ttl,
                )?)
            }
            "cancel" => {
                let state = self
                    .log
                    .repair_state()
                    .map_err(|e| AdminError::unavailable(e.to_string()))?;
                let open: Vec<u64> = state.cases.keys().copied().collect();
                Record::Cancelled {
                    replica: intake::cancel(body, &open)?,
                    at_ms: now,
                }
            }
            "pause" => Record::Paused {
                at_ms: now,
                reason: intake::pause(body)?,
            },
            "resume" => Record::Resumed { at_ms: now },
            "reset" => Record::Reset { at_ms: now },
            _ => unreachable!("checked by handle_checked"),
        })
    }

    /// `GET /repairs`: the replicated state and the leader's judgment.
    fn list(&self) -> Result<Vec<u8>, AdminError> {
        let state = self
            .log
            .repair_state()
            .map_err(|e| AdminError::unavailable(e.to_string()))?;
        let p = self.log.progress();
        let doc = serde_json::json!({
            "replica": self.me,
            "is_leader": p.is_leader,
            "leader": p.leader,
            "mode": self.opts.config.mode,
            "num_allowed_repairs": self.opts.config.num_allowed_repairs,
            "removals_allowed": self.limits.removals_allowed,
            "judgment": self.judgment(),
            "state": state,
        });
        Ok(serde_json::to_vec_pretty(&doc).unwrap_or_default())
    }

    /// Sends the request to the leader's `Repair` RPC, once.
    async fn forward(&self, op: &str, body: &[u8], token: &str) -> Result<Vec<u8>, AdminError> {
        let status = self
            .log
            .cluster_status()
            .await
            .map_err(|e| AdminError::unavailable(e.to_string()))?;
        let Some(leader) = status.leader_address.filter(|a| !a.is_empty()) else {
            return Err(AdminError::unavailable("no leader known; try again"));
        };
        let response = call(&leader, op, body, token, true, FORWARD_TIMEOUT).await?;
        if response.http_status == 200 {
            return Ok(response.body.to_vec());
        }
        Err(AdminError {
            status: response.http_status as u16,
            reason: error_reason(&response.body),
        })
    }
}

/// Longest a follower waits for the leader's answer to an admin request it
/// forwarded (a paused or cut-off leader must not hold the operator).
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a connection to another replica's `Repair` RPC may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Calls the `Repair` RPC of the replica at `address` (`host:port`); the
/// whole call, connection included, ends within `within`.
pub(crate) async fn call(
    address: &str,
    op: &str,
    body: &[u8],
    token: &str,
    forwarded: bool,
    within: Duration,
) -> Result<RepairResponse, AdminError> {
    let unreachable = |e: String| AdminError::unavailable(format!("cannot reach {address}: {e}"));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT.min(within));
    let request = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut client = ReplogClientClient::new(channel);
        let response = client
            .repair(RepairRequest {
                op: op.to_string(),
                body: body.to_vec().into(),
                token: token.to_string(),
                forwarded,
            })
            .await
            .map_err(|e| unreachable(e.message().to_string()))?;
        Ok(response.into_inner())
    };
    tokio::time::timeout(within, request)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no answer within {within:?}"))))
}

fn error_body(e: &AdminError) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": e.reason })).unwrap_or_default()
}

fn error_reason(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}
