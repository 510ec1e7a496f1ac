//! The health checks and the repair coordinator from the command line: the
//! `replog replica` flags ([`RepairFlags`], flattened into its arguments)
//! and `replog repair report|list|history|cancel|pause|resume|reset`,
//! which call any replica's `Repair` RPC (forwarded to the leader). The
//! runbook is docs/repair.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use replog_proto::client::replog_client_client::ReplogClientClient;
use replog_proto::client::RepairRequest;
use replog_repair::config::{self, RepairConfig};
use replog_repair::DetectorConfig;
use replog_server::RepairOptions;

use crate::support::runtime;

/// The repair flags of `replog replica`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepairFlags {
    /// After a leader change, no replica is judged before this long has
    /// passed (every replica gets that long to reach the new leader).
    #[arg(long, env = "REPLOG_REREGISTER_TIMEOUT", default_value = "10min", value_parser = humantime::parse_duration)]
    pub reregister_timeout: Duration,
    /// A voter this many positions behind the commit for --lag-period is
    /// unhealthy (0: lag is never judged).
    #[arg(long, env = "REPLOG_MAX_LAG_ENTRIES", default_value_t = 100_000)]
    pub max_lag_entries: u64,
    #[arg(long, env = "REPLOG_LAG_PERIOD", default_value = "1min", value_parser = humantime::parse_duration)]
    pub lag_period: Duration,
    /// The repair commands: `id=command,...` (run by `sh -c`).
    #[arg(long, env = "REPLOG_REPAIR_SET", default_value = "")]
    pub repair_set: String,
    /// The escalation order: `id:scope[:timeout],...`; scope `leader` runs
    /// the command on the leader's host, `replica` on the sick replica's.
    #[arg(long, env = "REPLOG_REPAIR_ORDER", default_value = "")]
    pub repair_order: String,
    /// The timeout of a step whose --repair-order entry gives none.
    #[arg(long, env = "REPLOG_REPAIR_TIMEOUT", default_value = "10min", value_parser = humantime::parse_duration)]
    pub repair_timeout: Duration,
    /// Repairs in progress at once (refused if it could cost the quorum).
    #[arg(long, env = "REPLOG_NUM_ALLOWED_REPAIRS", default_value_t = 1)]
    pub num_allowed_repairs: u32,
    /// Isolations per window, `COUNT/PERIOD` (e.g. `1/10mins`); default: no limit.
    #[arg(long, env = "REPLOG_REMOVAL_RATE_LIMIT")]
    pub removal_rate_limit: Option<String>,
    /// Fraction of the voters that may be isolated before the coordinator
    /// stops and raises the alarm (`replog repair reset` clears it).
    #[arg(long, env = "REPLOG_REMOVAL_LIMIT", default_value_t = 1.0)]
    pub removal_limit: f64,
    /// Replicas kept ready to replace an isolated one: `id=host:port,...`.
    #[arg(long, env = "REPLOG_SPARES", default_value = "")]
    pub spares: String,
    /// A replica healthy this long closes its case (or is re-admitted).
    #[arg(long, env = "REPLOG_HEALTHY_PERIOD", default_value = "10min", value_parser = humantime::parse_duration)]
    pub healthy_period: Duration,
    /// `listen`, `react` or `execute`, globally and per repair id:
    /// `react,restart=execute`.
    #[arg(long, env = "REPLOG_REPAIR_MODE", default_value = "listen")]
    pub repair_mode: String,
    /// How long a signal counts when its report gives no expiry.
    #[arg(long, env = "REPLOG_SIGNAL_TTL", default_value = "5min", value_parser = humantime::parse_duration)]
    pub signal_ttl: Duration,
    /// A file holding the bearer token the repair admin API requires.
    #[arg(long, env = "REPLOG_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The self-monitor's config (JSON: the statistics, their envelopes,
    /// the collection interval; docs/repair.md).
    #[arg(long, env = "REPLOG_MONITOR_CONFIG")]
    pub monitor_config: Option<PathBuf>,
}

impl RepairFlags {
    /// The server's repair options; every syntax error names its flag.
    pub fn options(&self, ping_timeout: Duration, max_ping_timeouts: u32) -> Result<RepairOptions> {
        let set = config::parse_repair_set(&self.repair_set)?;
        let order = config::parse_repair_order(&self.repair_order)?;
        let (mode, per_repair) = config::parse_repair_modes(&self.repair_mode)?;
        let steps = config::build_order(&set, &order, &per_repair, self.repair_timeout)?;
        let removal_rate_limit = self
            .removal_rate_limit
            .as_deref()
            .map(config::parse_rate_limit)
            .transpose()?;
        let admin_token = self.admin_token().context("--admin-token-file")?;
        let monitor = self
            .monitor_config
            .as_deref()
            .map(read_monitor_config)
            .transpose()?;
        Ok(RepairOptions {
            config: RepairConfig {
                order: steps,
                num_allowed_repairs: self.num_allowed_repairs,
                removal_rate_limit,
                removal_limit: self.removal_limit,
                spares: config::parse_spares(&self.spares)?,
                healthy_period: self.healthy_period,
                mode,
                signal_ttl: self.signal_ttl,
            },
            detector: DetectorConfig {
                ping_timeout,
                max_ping_timeouts,
                reregister_timeout: self.reregister_timeout,
                max_lag_entries: self.max_lag_entries,
                lag_period: self.lag_period,
            },
            admin_token,
            monitor,
            ..Default::default()
        })
    }

    fn admin_token(&self) -> Result<Option<String>> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        read_token(path).map(Some)
    }
}

/// Reads and checks a `--monitor-config` file.
fn read_monitor_config(path: &std::path::Path) -> Result<replog_repair::monitor::MonitorConfig> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("--monitor-config: cannot read {}", path.display()))?;
    replog_repair::monitor::MonitorConfig::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("--monitor-config {}: {e}", path.display()))
}

/// The first line of a token file, which must not be empty.
fn read_token(path: &std::path::Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("{} holds no token", path.display());
    }
    Ok(token)
}

#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// Any replica server of the cluster (`host:port`); it forwards to the leader.
    #[arg(long, env = "REPLOG_ENDPOINT")]
    pub endpoint: String,
    /// The bearer token file of --admin-token-file.
    #[arg(long, env = "REPLOG_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: RepairCommand,
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Report a signal: a replica is outside its safe envelope.
    ///
    /// Example: replog repair --endpoint h1:7101 report --replica 3 --signal fsync_latency --details "p99 900ms" --outside 5m
    Report {
        #[arg(long)]
        replica: u64,
        #[arg(long)]
        signal: String,
        #[arg(long, default_value = "")]
        details: String,
        /// How long it has been outside its envelope.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        outside: Duration,
        /// When the signal stops counting unless reported again (default: --signal-ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// The open cases, the alarm, the limits and the leader's judgment (JSON).
    List,
    /// The recent repair records (signals, decisions, outcomes), oldest first.
    History,
    /// End a replica's open case (its running step, if any, runs to its end).
    Cancel {
        #[arg(long)]
        replica: u64,
    },
    /// No new repair step or isolation until `resume` (maintenance windows).
    Pause {
        #[arg(long, default_value = "")]
        reason: String,
    },
    Resume,
    /// Clear the removal-limit alarm and the count of isolations.
    Reset,
}

pub fn repair(a: RepairArgs) -> Result<()> {
    let token = a
        .token_file
        .as_deref()
        .map(read_token)
        .transpose()?
        .unwrap_or_default();
    let (op, body) = request(&a.command);
    let rt = runtime()?;
    let (status, body) = rt.block_on(call(&a.endpoint, op, body, token))?;
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if status != 200 {
        let why = doc
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        bail!("the repair API answered {status}: {why}");
    }
    let shown = match a.command {
        RepairCommand::History => doc.pointer("/state/history").cloned().unwrap_or_default(),
        _ => doc,
    };
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(())
}

/// The operation and JSON body of a command.
fn request(c: &RepairCommand) -> (&'static str, Vec<u8>) {
    let json = |v: serde_json::Value| serde_json::to_vec(&v).expect("json");
    match c {
        RepairCommand::Report {
            replica,
            signal,
            details,
            outside,
            expires_in,
        } => {
            let mut v = serde_json::json!({
                "replica": replica,
                "signal": signal,
                "details": details,
                "outside_ms": outside.as_millis() as u64,
            });
            if let Some(e) = expires_in {
                v["expires_in_ms"] = (e.as_millis() as u64).into();
            }
            ("report", json(v))
        }
        RepairCommand::List | RepairCommand::History => ("list", Vec::new()),
        RepairCommand::Cancel { replica } => {
            ("cancel", json(serde_json::json!({ "replica": replica })))
        }
        RepairCommand::Pause { reason } => ("pause", json(serde_json::json!({ "reason": reason }))),
        RepairCommand::Resume => ("resume", Vec::new()),
        RepairCommand::Reset => ("reset", Vec::new()),
    }
}

async fn call(endpoint: &str, op: &str, body: Vec<u8>, token: String) -> Result<(u32, Vec<u8>)> {
    let endpoint = replog_client::Endpoint::parse(endpoint)?;
    let mut client = ReplogClientClient::connect(endpoint.uri())
        .await
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let r = client
        .repair(RepairRequest {
            op: op.to_string(),
            body: body.into(),
            token,
            forwarded: false,
        })
        .await
        .with_context(|| format!("the Repair call to {endpoint} failed"))?
        .into_inner();
    Ok((r.http_status, r.body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::parse_args;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        repair: RepairFlags,
    }

    fn options(args: &[&str]) -> Result<RepairOptions> {
        let argv: Vec<&str> = std::iter::once("replica")
            .chain(args.iter().copied())
            .collect();
        let f: Flags = parse_args(&argv)?;
        f.repair.options(Duration::from_secs(1), 3)
    }

    #[test]
    fn bad_flag_combinations_are_refused() {
        let rows: &[(&[&str], &str)] = &[
            (
                &[
                    "--repair-set",
                    "restart=/bin/r",
                    "--repair-order",
                    "reimage:leader",
                ],
                "does not define",
            ),
            (
                &[
                    "--repair-set",
                    "restart=/bin/r",
                    "--repair-order",
                    "restart:master",
                ],
                "neither `leader` nor `replica`",
            ),
            (&["--repair-set", "r=/bin/r,r=/bin/s"], "twice"),
            (
                &["--repair-mode", "execute,react"],
                "more than one global mode",
            ),
            (&["--repair-mode", "run"], "is not listen, react or execute"),
            (&["--removal-rate-limit", "1/soon"], "is not a duration"),
            (&["--spares", "6"], "is not id=host:port"),
            (
                &["--admin-token-file", "/nonexistent/token"],
                "--admin-token-file",
            ),
            (
                &["--monitor-config", "/nonexistent/monitor.json"],
                "--monitor-config",
            ),
        ];
        for (args, want) in rows {
            let e = format!("{:#}", options(args).unwrap_err());
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn flags_build_the_options() {
        let o = options(&[
            "--repair-set",
            "restart=/bin/restart,reimage=/bin/reimage",
            "--repair-order",
            "restart:replica:30s,reimage:leader",
            "--repair-mode",
            "react,reimage=execute",
            "--removal-rate-limit",
            "1/10mins",
            "--reregister-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(o.config.order.len(), 2);
        assert_eq!(o.config.order[0].timeout, Duration::from_secs(30));
        assert_eq!(o.config.order[1].timeout, Duration::from_secs(600));
        assert_eq!(o.config.mode, replog_repair::Mode::React);
        assert_eq!(o.detector.reregister_timeout, Duration::from_secs(2));
        assert_eq!(o.detector.max_ping_timeouts, 3);
        assert!(o.admin_token.is_none());
    }

    #[test]
    fn token_files_give_their_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&p).is_err());
    }

    #[test]
    fn commands_become_requests() {
        let (op, body) = request(&RepairCommand::Report {
            replica: 3,
            signal: "disk_free".into(),
            details: String::new(),
            outside: Duration::from_secs(60),
            expires_in: Some(Duration::from_secs(5)),
        });
        assert_eq!(op, "report");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["outside_ms"], 60_000);
        assert_eq!(v["expires_in_ms"], 5_000);
        assert_eq!(request(&RepairCommand::Reset).0, "reset");
    }
}
