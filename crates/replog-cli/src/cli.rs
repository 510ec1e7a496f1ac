//! Command-line definition and dispatch of `replog`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgAction, Parser, Subcommand};

use crate::{demo, inspect};

/// replog: a replicated log and scheduler-state store (Raft on RocksDB).
///
/// Every replica keeps its data in one directory (`--path`). Start with
/// `replog initialize` on each replica's empty directory, like
/// `mesos-log initialize`.
#[derive(Debug, Parser)]
#[command(name = "replog", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter, e.g. `info` or `replog=debug,raft=info` (env: REPLOG_LOG).
    #[arg(long, global = true, env = "REPLOG_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn an EMPTY (new, empty) directory into a VOTING replica.
    ///
    /// Refuses a directory that holds anything: a replica is initialized
    /// once, never over existing data.
    ///
    /// Example: replog initialize --path /var/lib/replog --cluster-id prod-1 --replica-id 1
    Initialize(InitializeArgs),
    /// Print the committed entries of a stopped (or running) replica, read-only.
    ///
    /// With --strict=false it also reads a damaged replica, up to the damage.
    ///
    /// Example: replog read --path /var/lib/replog --from 100 --to 200
    Read(ReadArgs),
    /// Show a replica's status, identity, positions and size on disk, or,
    /// with --endpoint, every running replica's status, term, leader, commit
    /// and applied positions, lag and health.
    ///
    /// Example: replog status --path /var/lib/replog --json
    /// Example: replog status --endpoint host1:7101,host2:7101,host3:7101
    Status(StatusArgs),
    /// Measure appends/s and latency with a trace of entry sizes (mesos-log benchmark).
    ///
    /// Creates a fresh single-replica log in --path (which must be empty or
    /// missing, or a previous benchmark's log) and prints the disk's raw
    /// fdatasync rate next to replog's figures.
    ///
    /// Example: replog benchmark --path /tmp/bench --input trace.txt --concurrency 64
    Benchmark(BenchmarkArgs),
    /// Run a local demo: a cluster of 3 replica processes on 127.0.0.1
    /// (append, kill the leader, fail over, keep appending, bring it back,
    /// verify every replica), or with --embedded a single embedded replica.
    Demo(DemoArgs),
    /// Run a replica server: one replica of a cluster, serving its peers and
    /// clients on one gRPC port (flags also from REPLOG_* variables).
    ///
    /// Example: replog replica --path /var/lib/replog --listen 0.0.0.0:7101
    ///   --cluster-id prod-1 --replica-id 1 --peers 2=host2:7101,3=host3:7101
    Replica(crate::cluster::ReplicaArgs),
    /// Back up the scheduler state of a running cluster into a directory
    /// (for cron), or check a backup file offline.
    ///
    /// Example: replog backup --endpoint host1:7101,host2:7101 --dir /var/backups/replog
    /// Example: replog backup verify /var/backups/replog/scheduler-backup-2026-11-22-06-00
    /// Example: replog backup inspect FILE --json
    Backup(crate::state_cmd::BackupArgs),
    /// The scheduler state of a running cluster: summary (counts and state
    /// hash of every replica), tasks (a query), load (generated tasks).
    ///
    /// Example: replog state --endpoint host1:7101 summary
    State(crate::state_cmd::StateArgs),
    /// Staged recovery from a backup against a running cluster: list, stage,
    /// print-tasks, delete-tasks, unload, commit (commit replaces the whole
    /// state at one position on every replica and fails the scheduler over).
    ///
    /// Example: replog recovery --endpoint host1:7101 stage /var/backups/replog/scheduler-backup-2026-11-22-06-00
    /// Example: replog recovery --endpoint host1:7101 delete-tasks --role www --status PENDING
    Recovery(crate::state_cmd::RecoveryArgs),
    /// Operate the membership of a running cluster: list, add, remove,
    /// promote, demote, replace, transfer-leader.
    ///
    /// Example: replog members --endpoint host1:7101 add 4 host4:7101
    Members(crate::cluster::MembersArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitializeArgs {
    /// The replica's data directory (must be empty or missing).
    #[arg(long)]
    pub path: PathBuf,
    /// Cluster id shared by all replicas of the log (letters, digits, . _ -).
    #[arg(long)]
    pub cluster_id: String,
    /// This replica's id (non-zero, unique in the cluster).
    #[arg(long)]
    pub replica_id: u64,
    /// Initial voting members: `1,2,3` or `1=host:port,2=host:port,...`.
    /// Defaults to this replica alone.
    #[arg(long, value_delimiter = ',')]
    pub members: Vec<String>,
    /// Disaster restore: found the log with the scheduler state of this
    /// backup file (checked whole first; staged here and committed through
    /// the log when this replica first leads with --state). Give the new
    /// cluster a new --cluster-id, so replicas of the damaged cluster can
    /// never rejoin; found it with this replica alone (--members of itself)
    /// and add the others, started EMPTY, with `replog members add`.
    #[arg(long)]
    pub from_backup: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// The replica's data directory.
    #[arg(long)]
    pub path: PathBuf,
    /// First position to print (default: the beginning of the log).
    #[arg(long)]
    pub from: Option<u64>,
    /// Last position to print (default: the last committed position).
    #[arg(long)]
    pub to: Option<u64>,
    /// Fail on any corruption (true), or print the intact prefix (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub strict: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: ReadFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReadFormat {
    /// position, size and a printable preview per line
    Text,
    /// one JSON object per line with the data in hex
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The replica's data directory (a stopped or running replica).
    #[arg(
        long,
        required_unless_present = "endpoint",
        conflicts_with = "endpoint"
    )]
    pub path: Option<PathBuf>,
    /// Running replica servers (`host:port,...`): show each one's view.
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// Fail on any corruption (true), or report it (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub strict: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchmarkArgs {
    /// Directory for the benchmark's own log (empty or missing).
    // The hidden defaults only stand in with --etcd, which does not use them;
    // without --etcd both flags are required.
    #[arg(
        long,
        required_unless_present_any = ["etcd", "endpoint"],
        default_value = "unused-with-etcd",
        hide_default_value = true
    )]
    pub path: PathBuf,
    /// Trace file: one entry size per line, e.g. `256B`, `4KB`, `2MB`.
    #[arg(
        long,
        required_unless_present_any = ["etcd", "endpoint"],
        default_value = "unused-with-etcd",
        hide_default_value = true
    )]
    pub input: PathBuf,
    /// Benchmark an etcd cluster instead: its client URLs, comma separated
    /// (e.g. from benches/etcd/start-cluster.sh). Values are put into the
    /// leader through etcd's gRPC API (KV/Put) by --concurrency closed-loop clients.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["path", "input", "repeat", "sync", "probe_iterations", "endpoint"])]
    pub etcd: Vec<String>,
    /// Benchmark a running replog cluster instead: its replica servers,
    /// comma separated. Entries are appended through the leader by
    /// --concurrency closed-loop clients (the same generator as --etcd).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["path", "input", "repeat", "sync", "probe_iterations"])]
    pub endpoint: Vec<String>,
    /// Operations in total (with --etcd).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Size of each value (with --etcd), e.g. `256B` or `4KB`.
    #[arg(long, default_value = "256", value_parser = crate::benchmark::parse_size)]
    pub value_size: usize,
    /// Concurrent appenders (1 = sequential, as mesos-log's benchmark), or
    /// closed-loop clients with --endpoint/--etcd. Several levels, comma
    /// separated (e.g. `1,64`), are measured in one run, taking turns
    /// slice by slice with each other and with the fdatasync probe (local
    /// log only).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Run the trace this many times: one value, or one per concurrency
    /// level.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub repeat: Vec<usize>,
    /// fsync each batch before acknowledging (turning it off risks data on OS crash).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub sync: bool,
    /// Microseconds the log's driver polls for the next request before it
    /// parks (see LogOptions::idle_spin; 0 parks at once).
    #[arg(long, default_value_t = 100)]
    pub idle_spin_us: u64,
    /// Let an append that finds the replica idle do its write (and fsync)
    /// on its own thread (see LogOptions::caller_drives).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub caller_drives: bool,
    /// Iterations of the raw fdatasync probe (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub probe_iterations: usize,
    /// The probe and the appends take turns in this many slices, so that
    /// both meet the disk in the same state (a VM's disk speed drifts over
    /// seconds).
    #[arg(long, default_value_t = 10)]
    pub slices: usize,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Data directory of the demo replica
    /// (default: $XDG_DATA_HOME/replog/demo or ~/.local/share/replog/demo).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Entries to append.
    #[arg(long, default_value_t = 2000)]
    pub entries: usize,
    /// Wipe the demo directory first.
    #[arg(long)]
    pub fresh: bool,
    /// Run the single embedded replica demo (initialize, append, read,
    /// truncate, restart, verify) instead of the cluster.
    #[arg(long)]
    pub embedded: bool,
    /// First of the three ports the cluster demo's replicas listen on.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the tool with the process's arguments.
pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Initialize(a) => inspect::initialize(a),
        Command::Read(a) => inspect::read(a),
        Command::Status(a) if !a.endpoint.is_empty() => {
            crate::cluster::status_endpoints(&a.endpoint, a.json)
        }
        Command::Status(a) => inspect::status(a),
        Command::Replica(a) => crate::cluster::replica(a),
        Command::Members(a) => crate::cluster::members(a),
        Command::Benchmark(a) if !a.etcd.is_empty() => crate::loadgen::etcd_benchmark(a),
        Command::Benchmark(a) if !a.endpoint.is_empty() => crate::loadgen::replog_benchmark(a),
        Command::Benchmark(a) => demo::benchmark(a),
        Command::Demo(a) => demo::demo(a),
        Command::Backup(a) => crate::state_cmd::backup(a),
        Command::State(a) => crate::state_cmd::state(a),
        Command::Recovery(a) => crate::state_cmd::recovery(a),
    }
}

/// The async runtime of a command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A progress bar of long CLI work on stderr: hidden when `show` is false
/// (e.g. `--json`) or stderr is not a terminal (cron).
pub(crate) fn progress_bar(len: u64, what: &str, show: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
