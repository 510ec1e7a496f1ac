//! `replog backup ...` and `replog state ...`: the scheduler-state store of
//! a running cluster (replicas started with `--state`) and its backup files.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use replog_client::{CallKind, ClientConfig, ClientError, ErrorCode, Retry, StateClient};
use replog_proto::state::{
    op, JobKey, Op, SaveTasks, ScheduleStatus, ScheduledTask, TaskConfig, Transaction,
};
use replog_proto::store::{ReadMode, RecoveryStatusResponse, SummaryResponse, TaskQueryRequest};
use replog_store::backup::{inspect, BackupDir, Inspection};
use serde_json::json;
use tonic::Code;

use crate::support::{progress_bar, runtime};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// Replica servers of the cluster (`host:port,...`); the first that
    /// answers serves the snapshot, after a read index (it holds every
    /// write committed before the backup started).
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoint: Vec<String>,
    /// Directory of the backups (`scheduler-backup-YYYY-MM-DD-HH-MM`, UTC).
    #[arg(long, required = true)]
    pub dir: Option<PathBuf>,
    /// Keep the newest N backups in --dir; older ones are deleted.
    #[arg(long, default_value_t = 48)]
    pub max_saved: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Check a backup file offline: every checksum, the counts, every record.
    /// Exits non-zero with the reason if anything is wrong.
    Verify {
        file: PathBuf,
        /// Also require this cluster id in the header.
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Show a backup's header, entity counts and tasks by status (checks it
    /// whole, like verify).
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// Replica servers of the cluster: `host:port,host:port`.
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoint: Vec<String>,
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Each replica's applied position, entity counts and state hash
    /// (linearizable: replicas first apply everything committed).
    Summary {
        #[arg(long)]
        json: bool,
    },
    /// Write generated tasks (for tests, demos and benchmarks): --tasks
    /// tasks over 10 roles, in transactions of --batch tasks.
    Load {
        #[arg(long)]
        tasks: u64,
        #[arg(long, default_value_t = 500)]
        batch: u64,
        /// Bytes of executor data per task (its size on disk).
        #[arg(long, default_value_t = 200)]
        task_bytes: usize,
        /// Task ids start at this number (to add more tasks later).
        #[arg(long, default_value_t = 0)]
        first: u64,
    },
    /// Print tasks (role, job, instance, status, task id) matching a query.
    Tasks {
        #[command(flatten)]
        query: TaskQueryArgs,
    },
}

/// A task query on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct TaskQueryArgs {
    #[arg(long)]
    pub role: Option<String>,
    #[arg(long)]
    pub environment: Option<String>,
    #[arg(long)]
    pub job: Option<String>,
    /// Task statuses, e.g. RUNNING,PENDING.
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub task_id: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
}

fn parse_status(s: &str) -> Result<ScheduleStatus> {
    let up = s.trim().to_ascii_uppercase();
    ScheduleStatus::from_str_name(&format!("SCHEDULE_STATUS_{up}"))
        .filter(|s| *s != ScheduleStatus::Unspecified)
        .ok_or_else(|| anyhow!("unknown task status '{s}' (e.g. RUNNING, PENDING, FINISHED)"))
}

/// A status without its enum prefix (`RUNNING`).
pub fn status_name(s: i32) -> String {
    ScheduleStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SCHEDULE_STATUS_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({s})"))
}

impl TaskQueryArgs {
    pub fn to_request(&self, mode: ReadMode) -> Result<TaskQueryRequest> {
        Ok(TaskQueryRequest {
            mode: mode as i32,
            task_ids: self.task_id.clone(),
            role: self.role.clone().unwrap_or_default(),
            environment: self.environment.clone().unwrap_or_default(),
            job_name: self.job.clone().unwrap_or_default(),
            statuses: self
                .status
                .iter()
                .map(|s| parse_status(s).map(|s| s as i32))
                .collect::<Result<_>>()?,
            agent_host: self.host.clone().unwrap_or_default(),
            limit: self.limit,
        })
    }
}

/// How long the tool waits for one answer: as long as a replica takes (a
/// query, or a staged backup's deletion, grows with the state).
const ANSWER_PATIENCE: Duration = Duration::from_secs(3600);

/// The tool's state client config: `max_attempts` attempts per call (1:
/// the command moves on to the next replica, or reports, itself).
fn tool_config(max_attempts: u32) -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(5),
        request_timeout: ANSWER_PATIENCE,
        max_attempts,
        ..ClientConfig::default()
    }
}

/// The tool's state client of `endpoints` (see [`tool_config`]).
fn state_client(endpoints: &[String], max_attempts: u32) -> StateClient {
    StateClient::with_config(endpoints, tool_config(max_attempts))
}

/// A state client's error as the tool words it: `address: message (CODE)`
/// for a replica's refusal.
fn state_err(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Replica {
            endpoint,
            code,
            message,
            ..
        } => anyhow!("{endpoint}: {message} ({code})"),
        e => anyhow!(e),
    }
}

/// How long [`submit`] looks for a leader that takes a transaction.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(15);

/// The client [`submit`] goes through: it follows leader hints and asks
/// again every 100 ms for [`SUBMIT_PATIENCE`] (an election, or a new leader
/// whose state writer is not ready yet, takes a moment).
pub fn submit_client(endpoints: &[String]) -> StateClient {
    StateClient::with_config(
        endpoints,
        ClientConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(100),
            retry_deadline: Some(SUBMIT_PATIENCE),
            ..tool_config(u32::MAX)
        },
    )
}

/// Submits `txn` to the leader (written again on the new leader when
/// leadership was lost mid-write, which is safe only because this tool's
/// transactions are idempotent). Gives up when no leader takes it within
/// [`SUBMIT_PATIENCE`].
pub async fn submit(client: &StateClient, txn: Transaction) -> Result<u64> {
    let deadline = Instant::now() + SUBMIT_PATIENCE;
    let no_leader = || {
        let endpoints: Vec<&str> = client.endpoints().iter().map(|e| e.as_str()).collect();
        anyhow!("no leader found among {}", endpoints.join(","))
    };
    loop {
        match client.submit(txn.clone()).await {
            Ok(position) => return Ok(position),
            // LEADERSHIP_LOST: the write may or may not be in the log.
            // The transactions this tool writes are saves of generated
            // tasks, which are idempotent, so writing one again on the
            // new leader is safe (a scheduler's own writes need not be).
            Err(ClientError::OutcomeUnknown {
                code: Some(ErrorCode::LeadershipLost),
                ..
            }) if Instant::now() < deadline => {}
            Err(ClientError::OutcomeUnknown {
                code: Some(ErrorCode::LeadershipLost),
                ..
            })
            | Err(ClientError::NoLeader { .. }) => return Err(no_leader()),
            Err(ClientError::Replica {
                endpoint,
                code,
                status: Code::FailedPrecondition,
                message,
            }) => bail!("{endpoint} refused the transaction: {message} ({code})"),
            Err(ClientError::Replica {
                endpoint,
                status,
                message,
                ..
            }) => bail!("{endpoint}: {message} ({status:?})"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Generated task number `i` (deterministic).
pub fn generated_task(i: u64, task_bytes: usize) -> ScheduledTask {
    let statuses = [
        ScheduleStatus::Running,
        ScheduleStatus::Running,
        ScheduleStatus::Running,
        ScheduleStatus::Pending,
        ScheduleStatus::Finished,
        ScheduleStatus::Failed,
    ];
    ScheduledTask {
        task_id: format!("task-{i:09}"),
        config: Some(TaskConfig {
            job: Some(JobKey {
                role: format!("role-{}", i % 10),
                environment: if i.is_multiple_of(3) { "devel" } else { "prod" }.into(),
                name: format!("job-{}", i % 100),
            }),
            owner_user: "scheduler".into(),
            is_service: true,
            executor_data: vec![(i % 251) as u8; task_bytes].into(),
            ..Default::default()
        }),
        instance_id: (i % 1000) as i32,
        status: statuses[(i % statuses.len() as u64) as usize] as i32,
        agent_host: format!("host-{}", i % 50),
        agent_id: format!("agent-{}", i % 50),
        ..Default::default()
    }
}

fn summary_json(endpoint: &str, s: &SummaryResponse) -> serde_json::Value {
    json!({
        "endpoint": endpoint,
        "applied": s.applied,
        "counts": s.counts,
        "state_hash": s.state_hash,
    })
}

/// `replog state ...`.
pub fn state(a: StateArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        match a.command {
            StateCommand::Summary { json } => {
                let mut out = Vec::new();
                let mut failed = false;
                // A linearizable read needs a leader: retry through a leader
                // change (four attempts, 500 ms apart).
                let client = StateClient::with_config(
                    &a.endpoint,
                    ClientConfig {
                        backoff_min: Duration::from_millis(500),
                        backoff_max: Duration::from_millis(500),
                        ..tool_config(4)
                    },
                );
                for e in &a.endpoint {
                    let r = async { client.at(e)?.summary(ReadMode::Linearizable).await }
                        .await
                        .map_err(state_err);
                    match r {
                        Ok(s) => out.push(summary_json(e, &s)),
                        Err(err) => {
                            failed = true;
                            out.push(json!({"endpoint": e, "error": format!("{err:#}")}))
                        }
                    }
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    for o in &out {
                        println!("{o}");
                    }
                }
                if failed {
                    bail!("not every replica answered");
                }
                Ok(())
            }
            StateCommand::Load {
                tasks,
                batch,
                task_bytes,
                first,
            } => {
                let batch = batch.max(1);
                let pb = progress_bar(tasks, "tasks", true);
                let started = Instant::now();
                let client = submit_client(&a.endpoint);
                let mut i = first;
                let mut last = 0;
                let mut latencies_us: Vec<u64> = Vec::new();
                while i < first + tasks {
                    let n = batch.min(first + tasks - i);
                    let txn = Transaction {
                        ops: vec![Op {
                            op: Some(op::Op::SaveTasks(SaveTasks {
                                tasks: (i..i + n).map(|k| generated_task(k, task_bytes)).collect(),
                            })),
                        }],
                    };
                    let t0 = Instant::now();
                    last = submit(&client, txn).await?;
                    latencies_us.push(t0.elapsed().as_micros() as u64);
                    i += n;
                    pb.inc(n);
                }
                pb.finish_and_clear();
                let secs = started.elapsed().as_secs_f64();
                latencies_us.sort_unstable();
                let pct = |q: f64| {
                    latencies_us
                        .get(((latencies_us.len() as f64 * q).ceil() as usize).saturating_sub(1))
                        .copied()
                        .unwrap_or(0)
                };
                println!(
                    "wrote {tasks} tasks in {} transactions in {secs:.2}s ({:.0} tasks/s); \
                     transaction latency p50={}us p99={}us max={}us; last position {last}",
                    latencies_us.len(),
                    tasks as f64 / secs.max(1e-9),
                    pct(0.50),
                    pct(0.99),
                    latencies_us.last().copied().unwrap_or(0)
                );
                Ok(())
            }
            StateCommand::Tasks { query } => {
                let req = query.to_request(ReadMode::Linearizable)?;
                let client = state_client(&a.endpoint, 1);
                let mut s = async { client.at(&a.endpoint[0])?.query_tasks(req).await }
                    .await
                    .map_err(state_err)?;
                print_task_header();
                while let Some(t) = s.message().await.map_err(|s| anyhow!("{}", s.message()))? {
                    print_task(&t);
                }
                Ok(())
            }
        }
    })
}

pub fn print_task_header() {
    println!(
        "{:<12} {:<26} {:>8} {:<10} task id",
        "role", "job", "instance", "status"
    );
}

pub fn print_task(t: &ScheduledTask) {
    let job = t
        .config
        .as_ref()
        .and_then(|c| c.job.as_ref())
        .cloned()
        .unwrap_or_default();
    println!(
        "{:<12} {:<26} {:>8} {:<10} {}",
        job.role,
        format!("{}/{}", job.environment, job.name),
        t.instance_id,
        status_name(t.status),
        t.task_id
    );
}

/// `replog backup ...`.
pub fn backup(a: BackupArgs) -> Result<()> {
    match a.command {
        Some(BackupCommand::Verify { file, cluster_id }) => {
            let i = inspect(&file, cluster_id.as_deref())
                .with_context(|| format!("{} is not a sound backup", file.display()))?;
            println!(
                "{}: OK — cluster '{}', position {}, {} records, {} bytes",
                file.display(),
                i.header.cluster_id,
                i.header.position,
                i.records,
                i.stream_bytes
            );
            Ok(())
        }
        Some(BackupCommand::Inspect { file, json }) => {
            let i = inspect(&file, None)
                .with_context(|| format!("{} is not a sound backup", file.display()))?;
            print_inspection(&i, json)
        }
        None => {
            let dir = a.dir.expect("clap requires --dir without a subcommand");
            take_backup(&a.endpoint, &dir, a.max_saved)
        }
    }
}

fn print_inspection(i: &Inspection, as_json: bool) -> Result<()> {
    let created = chrono::DateTime::from_timestamp_millis(i.header.created_at_unix_ms as i64)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "format_version": i.header.format_version,
                "cluster_id": i.header.cluster_id,
                "position": i.header.position,
                "term": i.header.term,
                "voters": i.header.voters,
                "learners": i.header.learners,
                "created_at": created,
                "content": i.header.content,
                "records": i.records,
                "bytes": i.stream_bytes,
                "counts": i.counts,
                "tasks_by_status": i.tasks_by_status,
            }))?
        );
        return Ok(());
    }
    println!("format version  {}", i.header.format_version);
    println!("cluster id      {}", i.header.cluster_id);
    println!(
        "position        {} (term {})",
        i.header.position, i.header.term
    );
    println!(
        "membership      voters {:?} learners {:?}",
        i.header.voters, i.header.learners
    );
    println!("created at      {created}");
    println!("records         {} ({} bytes)", i.records, i.stream_bytes);
    for (k, n) in &i.counts {
        println!("  {k:<22} {n}");
    }
    if !i.tasks_by_status.is_empty() {
        println!("tasks by status");
        for (s, n) in &i.tasks_by_status {
            println!("  {s:<22} {n}");
        }
    }
    Ok(())
}

/// Takes a backup of the cluster at `endpoints` into `dir`.
pub fn take_backup(endpoints: &[String], dir: &std::path::Path, max_saved: usize) -> Result<()> {
    let rt = runtime()?;
    let backups = BackupDir::new(dir, max_saved)?;
    let started = Instant::now();
    let mut errors = Vec::new();
    let client = state_client(endpoints, 1);
    for e in endpoints {
        let now = replog_storage::now_unix_ms();
        let pb = progress_bar(0, "backup", true);
        let r =
            backups.save_verified(
                now,
                |w| {
                    rt.block_on(async {
                        let mut s = async { client.at(e)?.snapshot(ReadMode::Linearizable).await }
                            .await
                            .map_err(state_err)?;
                        let mut bytes = 0u64;
                        while let Some(f) = s.message().await.map_err(|s| {
                            anyhow!("{e}: the snapshot stream broke: {}", s.message())
                        })? {
                            w.write_all(&f.data).context("writing the backup")?;
                            bytes += f.data.len() as u64;
                            pb.set_position(bytes);
                        }
                        anyhow::Ok(bytes)
                    })
                    .map_err(|err| replog_store::backup::BackupError::Io {
                        path: dir.to_path_buf(),
                        source: std::io::Error::other(format!("{err:#}")),
                    })
                },
                |_, _| Ok(()),
            );
        pb.finish_and_clear();
        match r {
            Ok((path, summary, bytes)) => {
                println!(
                    "{}: cluster '{}', position {}, {} records, {bytes} bytes in {:.2}s (from {e})",
                    path.display(),
                    summary.header.cluster_id,
                    summary.header.position,
                    summary.records,
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Err(err) => {
                eprintln!("backup from {e} failed: {err:#}");
                errors.push(format!("{e}: {err:#}"));
            }
        }
    }
    bail!("no backup taken: {}", errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::parse_args;

    #[test]
    fn backup_and_state_flags() {
        let b: BackupArgs =
            parse_args(&["backup", "--endpoint", "a:1,b:2", "--dir", "/d"]).unwrap();
        assert_eq!(b.endpoint, ["a:1", "b:2"]);
        assert_eq!(b.max_saved, 48);
        assert!(b.command.is_none());
        let b: BackupArgs = parse_args(&["backup", "verify", "/f"]).unwrap();
        assert!(matches!(b.command, Some(BackupCommand::Verify { .. })));
        assert!(
            parse_args::<BackupArgs>(&["backup", "--dir", "/d"]).is_err(),
            "needs --endpoint"
        );
        assert!(
            parse_args::<BackupArgs>(&["backup", "--endpoint", "a:1"]).is_err(),
            "needs --dir"
        );
        let s: StateArgs = parse_args(&[
            "state",
            "--endpoint",
            "a:1",
            "tasks",
            "--role",
            "www",
            "--status",
            "running,PENDING",
        ])
        .unwrap();
        let StateCommand::Tasks { query } = s.command else {
            panic!("not tasks")
        };
        let req = query.to_request(ReadMode::Local).unwrap();
        assert_eq!(req.role, "www");
        assert_eq!(
            req.statuses,
            [
                ScheduleStatus::Running as i32,
                ScheduleStatus::Pending as i32
            ]
        );
        let bad = TaskQueryArgs {
            status: vec!["SLEEPING".into()],
            ..query
        };
        assert!(bad.to_request(ReadMode::Local).is_err());
    }

    #[test]
    fn a_commit_is_tried_again_unless_refused_for_good() {
        let refused = |code: &str| ClientError::Replica {
            endpoint: "a:1".into(),
            code: code.into(),
            status: Code::FailedPrecondition,
            message: "m".into(),
        };
        for code in [
            "NOT_LEADER",
            "BUSY",
            "NOT_VOTING",
            "READ_NOT_CONFIRMED",
            "STATE_REPLACED",
        ] {
            assert!(worth_retrying(&refused(code)), "{code}");
        }
        for code in ["NOTHING_STAGED", "ALREADY_STAGED", "INVALID", "BAD_BACKUP"] {
            assert!(!worth_retrying(&refused(code)), "{code}");
        }
        assert!(worth_retrying(&ClientError::OutcomeUnknown {
            endpoint: "a:1".into(),
            message: "m".into(),
            code: Some(ErrorCode::LeadershipLost),
        }));
        assert!(worth_retrying(&ClientError::Unreachable {
            endpoint: "a:1".into(),
            message: "tcp connect error".into(),
        }));
        assert!(!worth_retrying(&ClientError::InvalidEndpoint("a".into())));
        assert_eq!(
            state_err(refused("ALREADY_STAGED")).to_string(),
            "a:1: m (ALREADY_STAGED)"
        );
    }
}

// ---------------------------------------------------------------------------
// replog recovery

#[derive(Debug, clap::Args)]
pub struct RecoveryArgs {
    /// Replica servers of the cluster (`host:port,...`; the other members
    /// are found through them). A backup is staged on the leader; the other
    /// commands go to the replica that holds it, wherever leadership went
    /// since.
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoint: Vec<String>,
    /// How long `commit` keeps trying while leadership moves (it moves
    /// leadership to the replica holding the staged backup first).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub commit_timeout: std::time::Duration,
    #[command(subcommand)]
    pub command: RecoveryCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RecoveryCommand {
    /// The backups in --dir (newest last), what is staged (and on which
    /// replica) and the last recovery committed.
    List {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Upload a backup file to the leader and stage it (checked whole; one
    /// at a time).
    Stage { file: PathBuf },
    /// Print the staged backup's tasks matching a query.
    PrintTasks {
        #[command(flatten)]
        query: TaskQueryArgs,
    },
    /// Delete tasks from the staged backup: by --task-id, or every task
    /// matching the query flags.
    DeleteTasks {
        #[command(flatten)]
        query: TaskQueryArgs,
    },
    /// Drop the staged backup.
    Unload,
    /// Replace the cluster's whole state with the staged backup, at one log
    /// position on every replica; the leader then steps down so the
    /// scheduler fails over and reloads.
    Commit,
}

/// One replica's staging area, as it answered `RecoveryStatus`.
struct StagingArea {
    address: String,
    status: RecoveryStatusResponse,
}

/// Asks every member of the cluster (found through the status of
/// `endpoints`) what it has staged. Members that do not answer are named on
/// stderr and left out.
async fn staging_areas(endpoints: &[String]) -> Result<Vec<StagingArea>> {
    let client = replog_client::Client::new(endpoints);
    let mut addresses: Vec<String> = Vec::new();
    for (endpoint, r) in client.status_all().await {
        addresses.push(endpoint);
        if let Ok(s) = r {
            addresses.extend(
                s.members
                    .into_iter()
                    .map(|m| m.address)
                    .filter(|a| !a.is_empty()),
            );
        }
    }
    addresses.sort();
    addresses.dedup();
    let mut out: Vec<StagingArea> = Vec::new();
    let state = state_client(endpoints, 1);
    for address in addresses {
        let answer = async { state.at(&address)?.recovery_status().await }
            .await
            .map_err(state_err);
        match answer {
            // One answer per replica, however it was named.
            Ok(r) if out.iter().any(|a| a.status.replica_id == r.replica_id) => {}
            Ok(status) => out.push(StagingArea { address, status }),
            Err(e) => eprintln!("warning: cannot ask {address} what it has staged: {e:#}"),
        }
    }
    if out.is_empty() {
        bail!("no replica of {} answered", endpoints.join(","));
    }
    Ok(out)
}

/// The one replica holding a staged backup.
fn holder(areas: &[StagingArea]) -> Result<&StagingArea> {
    let staged: Vec<&StagingArea> = areas.iter().filter(|a| a.status.staged).collect();
    match staged.as_slice() {
        [] => bail!("nothing is staged on any replica (run `replog recovery stage FILE` first)"),
        [one] => Ok(one),
        many => bail!(
            "backups are staged on several replicas ({}); unload all but one (`replog recovery --endpoint ADDR unload`)",
            many.iter()
                .map(|a| format!("replica {} at {}", a.status.replica_id, a.address))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Whether a failed commit may be tried again: it did not run (leadership
/// moved, the replica was busy or went away), its outcome is unknown (the
/// next round finds it recorded if it went through: a commit is never
/// applied twice), or this attempt was told of a replacement (perhaps an
/// earlier attempt's, whose answer was lost). Only a final refusal stands.
fn worth_retrying(e: &ClientError) -> bool {
    match e {
        ClientError::OutcomeUnknown { .. }
        | ClientError::NoLeader { .. }
        | ClientError::Unreachable { .. } => true,
        ClientError::Replica { .. } => e.error_code().is_some_and(|code| {
            code == ErrorCode::StateReplaced
                || replog_proto::wire::code_rule(&code, CallKind::StateWrite) != Retry::Final
        }),
        ClientError::InvalidEndpoint(_) => false,
    }
}

/// `replog recovery commit`: makes the replica holding the staged backup
/// the leader, commits there, and tries again while leadership moves. An
/// attempt whose answer was lost is recognised by the staging id the
/// replica records as committed, so the backup is never committed twice.
async fn commit_staged(endpoints: &[String], timeout: std::time::Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let areas = staging_areas(endpoints).await?;
    let (staging_id, replica) = {
        let first = holder(&areas)?;
        (first.status.staging_id.clone(), first.status.replica_id)
    };
    let mut first_look = Some(areas);
    let client = replog_client::Client::new(endpoints);
    let state = state_client(endpoints, 1);
    let mut last_error = String::new();
    loop {
        if Instant::now() > deadline {
            bail!(
                "the commit did not get through within {} (last: {last_error}); what is staged is unchanged, run commit again",
                humantime::format_duration(timeout)
            );
        }
        // The first round uses the look taken above; later ones look again.
        let areas = match first_look.take() {
            Some(a) => a,
            None => staging_areas(endpoints).await?,
        };
        if let Some(done) = areas
            .iter()
            .find(|a| !staging_id.is_empty() && a.status.last_committed_staging_id == staging_id)
        {
            println!(
                "committed: every replica replaced its state at position {}; the leader stepped down, the scheduler fails over and reloads",
                done.status.last_committed_position
            );
            return Ok(());
        }
        let Some(area) = areas.iter().find(|a| a.status.replica_id == replica) else {
            // Down or restarting: what it staged survives; ask again.
            last_error =
                format!("replica {replica}, which holds the staged backup, did not answer");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        };
        if !area.status.staged {
            bail!("the staged backup is no longer staged on replica {replica} (unloaded?); nothing was committed");
        }
        if area.status.staging_id != staging_id {
            bail!("replica {replica} now holds another staged backup; look at it with `replog recovery list`");
        }
        let status = client.status_of(&area.address).await;
        match status {
            Ok(s) if s.is_leader => {}
            Ok(_) => {
                eprintln!(
                    "moving leadership to replica {replica} ({}), which holds the staged backup",
                    area.address
                );
                if let Err(e) = client.transfer_leader(replica).await {
                    last_error = e.to_string();
                }
                let until = Instant::now() + std::time::Duration::from_secs(10);
                while Instant::now() < until {
                    if client
                        .status_of(&area.address)
                        .await
                        .is_ok_and(|s| s.is_leader)
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                continue;
            }
            Err(e) => {
                last_error = e.to_string();
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        }
        let holder = state.at(&area.address).map_err(state_err)?;
        match holder.commit_recovery().await {
            Ok(position) => {
                println!(
                    "committed: every replica replaced its state at position {position}; replica {replica} ({}) stepped down, the scheduler fails over and reloads",
                    area.address
                );
                return Ok(());
            }
            Err(e) if worth_retrying(&e) => {
                last_error = state_err(e).to_string();
                eprintln!("leadership moved during the commit ({last_error}); trying again");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            Err(e) => return Err(state_err(e)),
        }
    }
}

fn print_recovery_status(s: &replog_proto::store::RecoveryStatusResponse) {
    if !s.staged {
        println!("nothing staged");
        return;
    }
    let created = chrono::DateTime::from_timestamp_millis(s.created_at_unix_ms as i64)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    println!(
        "staged: backup of cluster '{}' at position {} (taken {created})",
        s.cluster_id, s.backup_position
    );
    let mut counts: Vec<_> = s.counts.iter().filter(|(_, n)| **n > 0).collect();
    counts.sort();
    for (k, n) in counts {
        println!("  {k:<22} {n}");
    }
}

/// `replog recovery ...`.
pub fn recovery(a: RecoveryArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        match a.command {
            RecoveryCommand::List { dir } => {
                if let Some(dir) = dir {
                    let backups = BackupDir::new(&dir, usize::MAX)?;
                    for b in backups.list()? {
                        let len = std::fs::metadata(&b).map(|m| m.len()).unwrap_or(0);
                        println!("{}  {len} bytes", b.display());
                    }
                }
                let areas = staging_areas(&a.endpoint).await?;
                let staged: Vec<&StagingArea> = areas.iter().filter(|a| a.status.staged).collect();
                if staged.is_empty() {
                    println!("nothing staged");
                }
                for area in staged {
                    println!("on replica {} ({}):", area.status.replica_id, area.address);
                    print_recovery_status(&area.status);
                }
                if let Some(last) = areas
                    .iter()
                    .filter(|a| !a.status.last_committed_staging_id.is_empty())
                    .max_by_key(|a| a.status.last_committed_position)
                {
                    println!(
                        "last committed recovery: {} at position {} (recorded by replica {})",
                        last.status.last_committed_staging_id,
                        last.status.last_committed_position,
                        last.status.replica_id
                    );
                }
                return Ok(());
            }
            RecoveryCommand::Commit => return commit_staged(&a.endpoint, a.commit_timeout).await,
            RecoveryCommand::Stage { .. } => {
                let areas = staging_areas(&a.endpoint).await?;
                if let Some(area) = areas.iter().find(|a| a.status.staged) {
                    bail!(
                        "a backup is already staged on replica {} ({}): cluster '{}', position {}; unload it first, one staged backup at a time (ALREADY_STAGED)",
                        area.status.replica_id,
                        area.address,
                        area.status.cluster_id,
                        area.status.backup_position
                    );
                }
            }
            _ => {}
        }
        let target = match &a.command {
            RecoveryCommand::Stage { .. } => state_client(&a.endpoint, ClientConfig::default().max_attempts)
                .leader()
                .await
                .context("cannot find the cluster's leader")?
                .to_string(),
            _ => {
                let areas = staging_areas(&a.endpoint).await?;
                holder(&areas)?.address.clone()
            }
        };
        let c = state_client(&a.endpoint, 1).at(&target).map_err(state_err)?;
        let leader = target;
        match a.command {
            RecoveryCommand::List { .. } | RecoveryCommand::Commit => unreachable!("handled above"),
            RecoveryCommand::Stage { file } => {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))?;
                // Upload one frame per message, as the file holds them.
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                let reader = tokio::task::spawn_blocking(move || -> Result<()> {
                    use std::io::Read;
                    let mut f = std::io::BufReader::with_capacity(1 << 20, f);
                    let mut splitter = replog_snapshot::FrameSplitter::new(|piece| {
                        tx.blocking_send(replog_proto::store::SnapshotFrame { data: piece })
                            .map_err(|_| std::io::Error::other("the upload stopped"))
                    });
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        splitter.write_all(&buf[..n])?;
                    }
                    let _sink = splitter
                        .finish()
                        .context("the file does not end on a whole frame (truncated?)")?;
                    Ok(())
                });
                let r = c
                    .stage_recovery(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await;
                let read = reader.await.context("the file reader panicked")?;
                let (_, s) = r.map_err(state_err)?;
                read.with_context(|| format!("reading {}", file.display()))?;
                println!("staged {} on {leader}", file.display());
                print_recovery_status(&s);
            }
            RecoveryCommand::PrintTasks { query } => {
                let mut s = c
                    .recovery_tasks(query.to_request(ReadMode::Local)?)
                    .await
                    .map_err(state_err)?;
                print_task_header();
                let broke = |s| state_err(ClientError::from_status(&leader, &s));
                while let Some(t) = s.message().await.map_err(broke)? {
                    print_task(&t);
                }
            }
            RecoveryCommand::DeleteTasks { query } => {
                let ids = query.task_id.clone();
                let q = TaskQueryArgs {
                    task_id: Vec::new(),
                    ..query
                };
                let any_filter = q.role.is_some()
                    || q.environment.is_some()
                    || q.job.is_some()
                    || !q.status.is_empty()
                    || q.host.is_some();
                if ids.is_empty() && !any_filter {
                    bail!("name --task-id or query flags (--role, --job, --status, ...): deleting every task is not a query");
                }
                let deleted = c
                    .delete_recovery_tasks(replog_proto::store::DeleteRecoveryTasksRequest {
                        task_ids: ids,
                        query: any_filter
                            .then(|| q.to_request(ReadMode::Local))
                            .transpose()?,
                    })
                    .await
                    .map_err(state_err)?;
                println!("deleted {deleted} tasks from the staged backup");
            }
            RecoveryCommand::Unload => {
                c.unload_recovery().await.map_err(state_err)?;
                println!("unloaded the staged backup");
            }
        }
        Ok(())
    })
}
