//! `replog replica`, `replog status --endpoint` and `replog members`: run a
//! replica server and operate a running cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Subcommand};
use replog_client::{Client, MembershipChange, MembershipOp, StatusResponse};
use replog_server::{ReplicaServer, ServerConfig};
use serde::Serialize;
use tracing::{info, warn};

use crate::support::{parse_replica_addresses, runtime, Address};

/// What to do with the local state at start (Mesos' `--recover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecoverMode {
    /// Rejoin the cluster with the local state (the default).
    Reconnect,
    /// Wipe this replica's local state and exit (before an incompatible
    /// upgrade, or to retire a replica); it rejoins EMPTY next time.
    Cleanup,
}

#[derive(Debug, clap::Args)]
pub struct ReplicaArgs {
    /// The replica's data directory. A missing or empty one starts EMPTY and
    /// joins its cluster by itself (or founds it with --auto-initialize).
    #[arg(long, env = "REPLOG_PATH")]
    pub path: PathBuf,
    /// Address to serve peers and clients on, e.g. 0.0.0.0:7100.
    #[arg(long, env = "REPLOG_LISTEN")]
    pub listen: SocketAddr,
    /// Address peers and clients reach this replica at (default: --listen).
    #[arg(long, env = "REPLOG_ADVERTISE")]
    pub advertise: Option<String>,
    /// Cluster id; every replica of the cluster uses the same one.
    #[arg(long, env = "REPLOG_CLUSTER_ID")]
    pub cluster_id: String,
    /// This replica's id (non-zero, unique in the cluster).
    #[arg(long, env = "REPLOG_REPLICA_ID")]
    pub replica_id: u64,
    /// The other replicas: `2=host:port,3=host:port`.
    #[arg(long, env = "REPLOG_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Found the log when every replica is EMPTY (Mesos' two-phase rule: a
    /// replica that merely lost its disk never founds a second log).
    #[arg(long, env = "REPLOG_AUTO_INITIALIZE")]
    pub auto_initialize: bool,
    /// Fail on any local corruption (true), or keep the intact prefix and
    /// rejoin as RECOVERING (false).
    #[arg(long, env = "REPLOG_STRICT", default_value_t = true, action = ArgAction::Set)]
    pub strict: bool,
    /// fsync before acknowledging (turning it off risks acknowledged data on
    /// an OS crash or power loss).
    #[arg(long, env = "REPLOG_SYNC", default_value_t = true, action = ArgAction::Set)]
    pub sync: bool,
    /// reconnect: rejoin with the local state; cleanup: wipe it and exit.
    #[arg(long, env = "REPLOG_RECOVER", value_enum, default_value = "reconnect")]
    pub recover: RecoverMode,
    /// How long a replica that is not VOTING may take to rejoin before it
    /// reports failure and exits (non-zero), e.g. `15min`.
    #[arg(long, env = "REPLOG_RECOVERY_TIMEOUT", default_value = "15min", value_parser = humantime::parse_duration)]
    pub recovery_timeout: Duration,
    /// A replica that sends nothing for this long missed one ping.
    #[arg(long, env = "REPLOG_PING_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,
    /// Missed pings after which a replica is reported unreachable.
    #[arg(long, env = "REPLOG_MAX_PING_TIMEOUTS", default_value_t = 5)]
    pub max_ping_timeouts: u32,
    /// Raft's clock tick (election timeout is 10 ticks, heartbeat 2).
    #[arg(long, env = "REPLOG_TICK_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub tick_interval: Duration,
    /// After a turn with work, the driver thread polls for the next one
    /// this long before it parks (a parked thread's wake-up costs tens of
    /// µs on a VM); `0s` parks at once. An idle replica never spins.
    #[arg(long, env = "REPLOG_IDLE_SPIN", default_value = "100us", value_parser = humantime::parse_duration)]
    pub idle_spin: Duration,
    /// Serve HTTP on this address: Prometheus metrics (`/metrics`), the
    /// repair admin API (`/repair`, `/repairs`), `/livez` and `/readyz`.
    #[arg(long, env = "REPLOG_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Run the scheduler-state store on the log and serve its API
    /// (`replog state`, `replog backup`, `replog recovery`). Every replica
    /// of a cluster must agree on it: the log then holds only state records.
    #[arg(long, env = "REPLOG_STATE")]
    pub state: bool,
    /// With --state: the leader compacts the log (flushes the state, then
    /// truncates the log) once this many positions were applied since the
    /// last compaction, or --snapshot-interval-bytes, or --snapshot-interval,
    /// whichever comes first. A replica whose state falls behind the log's
    /// beginning catches up from a peer's streamed state snapshot.
    #[arg(long, env = "REPLOG_SNAPSHOT_INTERVAL_ENTRIES", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval_entries: u64,
    /// With --state: compact once this many bytes of log entries were applied.
    #[arg(long, env = "REPLOG_SNAPSHOT_INTERVAL_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval_bytes: u64,
    /// With --state: compact once this much time passed (if anything was
    /// applied), e.g. `1h`.
    #[arg(long, env = "REPLOG_SNAPSHOT_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,
    /// With --state: positions kept before the applied position when the
    /// log is compacted, for followers that are a little behind.
    #[arg(long, env = "REPLOG_SNAPSHOT_KEEP_ENTRIES", default_value_t = 10_000)]
    pub snapshot_keep_entries: u64,
    /// Largest log entry, in bytes. With --state, a transaction bigger than
    /// this is framed over several entries (applied whole or not at all); a
    /// plain log refuses bigger appends.
    #[arg(long, env = "REPLOG_MAX_ENTRY_SIZE", default_value_t = replog_log::DEFAULT_MAX_ENTRY_BYTES)]
    pub max_entry_size: usize,
    /// Take backups of the scheduler state into this directory every
    /// --backup-interval (needs --state). Only the leader takes them, so a
    /// cluster writes one per interval; give every replica a directory so
    /// backups go on after a failover.
    #[arg(long, env = "REPLOG_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// How often the leader takes a backup into --backup-dir, e.g. `1h`.
    #[arg(long, env = "REPLOG_BACKUP_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub backup_interval: Duration,
    /// Newest backups kept in --backup-dir (older ones are deleted).
    #[arg(long, env = "REPLOG_MAX_SAVED_BACKUPS", default_value_t = 48, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_saved_backups: u64,
    #[command(flatten)]
    pub repair: crate::repair_cmd::RepairFlags,
}

#[derive(Debug, clap::Args)]
pub struct MembersArgs {
    /// Replica servers of the cluster: `host:port,host:port`.
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoint: Vec<String>,
    #[command(subcommand)]
    pub command: MembersCommand,
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// List members with role, lag and reachability (as the leader sees them).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a replica as a learner; it is promoted once it has caught up.
    /// Start it first: `replog replica --path EMPTY_DIR --replica-id ID ...`.
    Add {
        id: u64,
        /// host:port the new replica serves on.
        address: String,
    },
    /// Remove a replica from the cluster.
    Remove { id: u64 },
    /// Promote a learner to voter now.
    Promote { id: u64 },
    /// Demote a voter to learner.
    Demote { id: u64 },
    /// Replace replica OLD by a new replica NEW at ADDRESS in one
    /// joint-consensus change (NEW joins as a learner, OLD leaves).
    Replace { old: u64, new: u64, address: String },
    /// Hand leadership to another voter.
    TransferLeader { to: u64 },
}

/// Parses `2=host:port` peers (see [`parse_replica_addresses`]).
pub fn parse_peers(items: &[String]) -> Result<BTreeMap<u64, String>> {
    Ok(parse_replica_addresses(items, "peer", Address::Required)?
        .into_iter()
        .collect())
}

/// `--recover=cleanup`: removes a replica's files (only a directory that
/// holds a replica, or nothing).
fn cleanup(path: &Path) -> Result<()> {
    let entries: Vec<_> = match std::fs::read_dir(path) {
        Ok(rd) => rd.flatten().collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("{} does not exist: nothing to clean up", path.display());
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", path.display())),
    };
    if !entries.is_empty() && !path.join("REPLICA-IDENTITY").exists() {
        bail!(
            "{} does not hold a replog replica (no REPLICA-IDENTITY file); refusing to wipe it",
            path.display()
        );
    }
    for e in &entries {
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("cannot remove {}", p.display()))?;
    }
    println!(
        "Wiped the local state of the replica in {} ({} entries); it rejoins as EMPTY when started again",
        path.display(),
        entries.len()
    );
    Ok(())
}

pub fn replica(a: ReplicaArgs) -> Result<()> {
    if a.recover == RecoverMode::Cleanup {
        return cleanup(&a.path);
    }
    let peers = parse_peers(&a.peers)?;
    let mut config = ServerConfig::new(&a.path, a.listen, &a.cluster_id, a.replica_id);
    config.advertise = a.advertise.clone();
    config.peers = peers;
    config.auto_initialize = a.auto_initialize;
    config.log.strict = a.strict;
    config.log.sync = a.sync;
    config.log.tick_interval = a.tick_interval;
    config.log.idle_spin = a.idle_spin;
    config.ping_timeout = a.ping_timeout;
    config.max_ping_timeouts = a.max_ping_timeouts;
    config.backup_dir = a.backup_dir.clone();
    config.backup_interval = a.backup_interval;
    config.max_saved_backups = a.max_saved_backups as usize;
    config.metrics_listen = a.metrics_listen;
    config.repair = a.repair.options(a.ping_timeout, a.max_ping_timeouts)?;
    if a.state {
        config.state = Some(replog_server::StoreOptions {
            snapshot_interval_entries: a.snapshot_interval_entries,
            snapshot_interval_bytes: a.snapshot_interval_bytes,
            snapshot_interval: a.snapshot_interval,
            snapshot_keep_entries: a.snapshot_keep_entries,
            ..Default::default()
        });
    }
    config.set_max_entry_bytes(a.max_entry_size);
    config.validate()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let server = ReplicaServer::start(config)
            .await
            .with_context(|| format!("cannot start replica {} in {}", a.replica_id, a.path.display()))?;
        let server = std::sync::Arc::new(server);
        eprintln!(
            "replica {} of cluster '{}' serving on {} ({})",
            a.replica_id,
            a.cluster_id,
            server.local_addr(),
            server.log().progress().status
        );
        let recovery = {
            let s = server.clone();
            let timeout = a.recovery_timeout;
            async move {
                match s.wait_voting(timeout).await {
                    Ok(()) => std::future::pending::<Result<()>>().await,
                    Err(status) => Err(anyhow::anyhow!(
                        "replica {} is still {status} after --recovery-timeout {}: it could not rejoin its cluster \
                         (check that the other replicas run and list it, see `replog status --endpoint`)",
                        a.replica_id,
                        humantime::format_duration(timeout)
                    )),
                }
            }
        };
        let failed = {
            let s = server.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Some(why) = s.log().failure() {
                        return anyhow::anyhow!("replica {} stopped: {why}", a.replica_id);
                    }
                }
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        let outcome = tokio::select! {
            r = recovery => r,
            e = failed => Err(e),
            _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); Ok(()) }
            _ = term.recv() => { info!("terminated; stopping"); Ok(()) }
        };
        match std::sync::Arc::try_unwrap(server) {
            Ok(s) => {
                if let Err(e) = s.shutdown().await {
                    warn!(error = %e, "shutdown was not clean");
                }
            }
            Err(_) => warn!("the replica is still in use; exiting without a graceful shutdown"),
        }
        outcome
    })
}

#[derive(Serialize)]
struct StatusRow {
    endpoint: String,
    reachable: bool,
    error: Option<String>,
    replica_id: Option<u64>,
    cluster_id: Option<String>,
    status: Option<String>,
    term: Option<u64>,
    leader: Option<u64>,
    is_leader: Option<bool>,
    commit: Option<u64>,
    applied: Option<u64>,
    first_index: Option<u64>,
    last_index: Option<u64>,
    lag: Option<u64>,
    disk_bytes: Option<u64>,
    /// The leader's count of voters it can still lose (None: not judged).
    failure_tolerance: Option<i32>,
    members: Vec<MemberRow>,
}

#[derive(Serialize)]
struct MemberRow {
    id: u64,
    address: String,
    role: &'static str,
    matched: u64,
    lag: u64,
    last_heard_ms: i64,
    missed_pings: u32,
    reachable: bool,
    /// The leader's failure detector's judgment (empty elsewhere).
    health: String,
}

fn status_name(v: i32) -> String {
    replog_log::peers::status_from_pb(v)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "UNKNOWN".into())
}

fn member_rows(s: &StatusResponse) -> Vec<MemberRow> {
    s.members
        .iter()
        .map(|m| MemberRow {
            id: m.id,
            address: m.address.clone(),
            role: if m.voter { "voter" } else { "learner" },
            matched: m.matched,
            lag: m.lag,
            last_heard_ms: m.last_heard_ms,
            missed_pings: m.missed_pings,
            reachable: m.reachable,
            health: m.health.clone(),
        })
        .collect()
}

/// `replog status --endpoint`: every replica's view, side by side.
pub fn status_endpoints(endpoints: &[String], json: bool) -> Result<()> {
    runtime()?.block_on(status_endpoints_async(endpoints, json))
}

/// [`status_endpoints`] inside a running async runtime.
pub async fn status_endpoints_async(endpoints: &[String], json: bool) -> Result<()> {
    let rows = async {
        let client = Client::with_config(
            endpoints,
            replog_client::ClientConfig {
                request_timeout: Duration::from_secs(3),
                ..Default::default()
            },
        );
        let all = client.status_all().await;
        let max_commit = all
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|s| s.commit))
            .max()
            .unwrap_or(0);
        all.into_iter()
            .map(|(endpoint, r)| match r {
                Ok(s) => StatusRow {
                    endpoint,
                    reachable: true,
                    error: None,
                    replica_id: Some(s.replica_id),
                    cluster_id: Some(s.cluster_id.clone()),
                    status: Some(status_name(s.status)),
                    term: Some(s.term),
                    leader: Some(s.leader),
                    is_leader: Some(s.is_leader),
                    commit: Some(s.commit),
                    applied: Some(s.applied),
                    first_index: Some(s.first_index),
                    last_index: Some(s.last_index),
                    lag: Some(max_commit.saturating_sub(s.applied)),
                    disk_bytes: Some(s.disk_bytes),
                    failure_tolerance: Some(s.failure_tolerance).filter(|t| *t >= 0 || s.is_leader),
                    members: member_rows(&s),
                },
                Err(e) => StatusRow {
                    endpoint,
                    reachable: false,
                    error: Some(e.to_string()),
                    replica_id: None,
                    cluster_id: None,
                    status: None,
                    term: None,
                    leader: None,
                    is_leader: None,
                    commit: None,
                    applied: None,
                    first_index: None,
                    last_index: None,
                    lag: None,
                    disk_bytes: None,
                    failure_tolerance: None,
                    members: Vec::new(),
                },
            })
            .collect::<Vec<_>>()
    }
    .await;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let dash = || "-".to_string();
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(dash);
    println!(
        "{:<22} {:>7} {:<10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>6}  NOTE",
        "ENDPOINT", "REPLICA", "STATUS", "TERM", "LEADER", "COMMIT", "APPLIED", "FIRST", "LAG"
    );
    for r in &rows {
        let note = match (&r.error, r.is_leader) {
            (Some(e), _) => format!("unreachable: {e}"),
            (None, Some(true)) => "leader".to_string(),
            _ => String::new(),
        };
        println!(
            "{:<22} {:>7} {:<10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>6}  {}",
            r.endpoint,
            opt(r.replica_id),
            r.status.clone().unwrap_or_else(dash),
            opt(r.term),
            opt(r.leader.filter(|l| *l != 0)),
            opt(r.commit),
            opt(r.applied),
            opt(r.first_index),
            opt(r.lag),
            note
        );
    }
    if let Some(leader) = rows.iter().find(|r| r.is_leader == Some(true)) {
        println!();
        print_members(&leader.members);
        println!("\n{}", describe_tolerance(leader.failure_tolerance));
    } else {
        println!("\nno replica reports itself leader");
    }
    Ok(())
}

fn print_members(members: &[MemberRow]) {
    println!(
        "{:<8} {:<22} {:<8} {:>8} {:>6} {:>10} {:>7}  HEALTH",
        "MEMBER", "ADDRESS", "ROLE", "MATCHED", "LAG", "HEARD(ms)", "MISSED"
    );
    for m in members {
        println!(
            "{:<8} {:<22} {:<8} {:>8} {:>6} {:>10} {:>7}  {}",
            m.id,
            m.address,
            m.role,
            m.matched,
            m.lag,
            m.last_heard_ms,
            m.missed_pings,
            match (m.health.as_str(), m.reachable) {
                ("", true) => "reachable",
                ("", false) => "UNREACHABLE",
                (judged, _) => judged,
            }
        );
    }
}

/// The failure tolerance line of `replog status`.
fn describe_tolerance(tolerance: Option<i32>) -> String {
    match tolerance {
        Some(t) if t >= 0 => format!(
            "failure tolerance: {t} (the cluster can lose {t} more voter{} and keep a quorum)",
            if t == 1 { "" } else { "s" }
        ),
        Some(_) => "failure tolerance: none (fewer healthy voters than a quorum, or the leader's \
                    re-register grace is on)"
            .to_string(),
        None => "failure tolerance: unknown (no leader answered)".to_string(),
    }
}

pub fn members(a: MembersArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let client = Client::new(&a.endpoint);
        let change = |op: MembershipOp, id: u64, address: String| MembershipChange {
            op: op as i32,
            id,
            address,
        };
        let changes = match a.command {
            MembersCommand::List { json } => {
                let leader = client.leader().await.context("cannot find the leader")?;
                let s = client.status_of(&leader).await?;
                let rows = member_rows(&s);
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                        "leader: replica {} at {leader} (term {})",
                        s.replica_id, s.term
                    );
                    print_members(&rows);
                }
                return Ok(());
            }
            MembersCommand::TransferLeader { to } => {
                client.transfer_leader(to).await?;
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(l) = client.leader().await {
                        let s = client.status_of(&l).await?;
                        if s.replica_id == to {
                            println!("replica {to} leads now (term {})", s.term);
                            return Ok(());
                        }
                    }
                }
                bail!(
                    "leadership did not move to replica {to} within 10s (is it a caught-up voter?)"
                );
            }
            MembersCommand::Add { id, address } => vec![change(MembershipOp::Add, id, address)],
            MembersCommand::Remove { id } => vec![change(MembershipOp::Remove, id, String::new())],
            MembersCommand::Promote { id } => {
                vec![change(MembershipOp::Promote, id, String::new())]
            }
            MembersCommand::Demote { id } => vec![change(MembershipOp::Demote, id, String::new())],
            MembersCommand::Replace { old, new, address } => vec![
                change(MembershipOp::Add, new, address),
                change(MembershipOp::Remove, old, String::new()),
            ],
        };
        let position = client.change_membership(changes).await?;
        println!("membership changed at position {position}");
        Ok(())
    })
}

#[cfg(test)]
mod backup_flag_tests {
    use crate::support::parse_args;

    fn replica_args(extra: &[&str]) -> Result<super::ReplicaArgs, clap::Error> {
        let base = [
            "replica",
            "--path",
            "/nonexistent/replog-backup-flag-test",
            "--listen",
            "127.0.0.1:0",
            "--cluster-id",
            "c",
            "--replica-id",
            "1",
        ];
        let argv: Vec<&str> = base.iter().chain(extra).copied().collect();
        parse_args(&argv)
    }

    #[test]
    fn backup_flags_and_defaults() {
        let a = replica_args(&[]).unwrap();
        assert_eq!(a.backup_dir, None);
        assert_eq!(a.backup_interval, std::time::Duration::from_secs(3600));
        assert_eq!(a.max_saved_backups, 48);
        let a = replica_args(&[
            "--state",
            "--backup-dir",
            "/b",
            "--backup-interval",
            "15min",
            "--max-saved-backups",
            "3",
        ])
        .unwrap();
        assert_eq!(a.backup_dir.as_deref(), Some(std::path::Path::new("/b")));
        assert_eq!(a.backup_interval, std::time::Duration::from_secs(900));
        assert_eq!(a.max_saved_backups, 3);
        assert!(replica_args(&["--max-saved-backups", "0"]).is_err());
    }

    #[test]
    fn idle_spin_defaults_to_100us_and_parses_durations() {
        use std::time::Duration;
        assert_eq!(
            replica_args(&[]).unwrap().idle_spin,
            Duration::from_micros(100)
        );
        let a = replica_args(&["--idle-spin", "1ms"]).unwrap();
        assert_eq!(a.idle_spin, Duration::from_millis(1));
        let a = replica_args(&["--idle-spin", "0s"]).unwrap();
        assert_eq!(a.idle_spin, Duration::ZERO);
        assert!(replica_args(&["--idle-spin", "fast"]).is_err());
    }

    #[test]
    fn backup_dir_without_state_is_refused() {
        let a = replica_args(&["--backup-dir", "/b"]).unwrap();
        let e = super::replica(a).unwrap_err();
        assert!(
            format!("{e:#}").contains("--backup-dir /b needs --state"),
            "{e:#}"
        );
    }
}
