//! The command line of `replog`: the subcommands, each with the arguments
//! its module defines, logging, and dispatch.
//!
//! Invariant: this module only composes. Every subcommand's flags and code
//! live in its own module, what several share in [`crate::support`]; no
//! module imports this one.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::benchmark::{self, BenchmarkArgs};
use crate::cluster::{self, MembersArgs, ReplicaArgs};
use crate::demo::{self, DemoArgs};
use crate::inspect::{self, InitializeArgs, ReadArgs, StatusArgs};
use crate::repair_cmd::{self, RepairArgs};
use crate::state_cmd::{self, BackupArgs, RecoveryArgs, StateArgs};
use crate::support::init_tracing;

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
    ///
    /// The load of a running replog or etcd cluster (formerly --endpoint
    /// and --etcd) is the benchmark tool's: replog-bench cluster.
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
    Replica(Box<ReplicaArgs>),
    /// Back up the scheduler state of a running cluster into a directory
    /// (for cron), or check a backup file offline.
    ///
    /// Example: replog backup --endpoint host1:7101,host2:7101 --dir /var/backups/replog
    /// Example: replog backup verify /var/backups/replog/scheduler-backup-2026-11-22-06-00
    /// Example: replog backup inspect FILE --json
    Backup(BackupArgs),
    /// The scheduler state of a running cluster: summary (counts and state
    /// hash of every replica), tasks (a query), load (generated tasks).
    ///
    /// Example: replog state --endpoint host1:7101 summary
    State(StateArgs),
    /// Staged recovery from a backup against a running cluster: list, stage,
    /// print-tasks, delete-tasks, unload, commit (commit replaces the whole
    /// state at one position on every replica and fails the scheduler over).
    ///
    /// Example: replog recovery --endpoint host1:7101 stage /var/backups/replog/scheduler-backup-2026-11-22-06-00
    /// Example: replog recovery --endpoint host1:7101 delete-tasks --role www --status PENDING
    Recovery(RecoveryArgs),
    /// The repair coordinator: report a signal, list the open cases and
    /// the leader's judgment, read the history, cancel a case, pause and
    /// resume repairs, reset the removal-limit alarm (docs/repair.md).
    ///
    /// Example: replog repair --endpoint host1:7101 report --replica 3 --signal fsync_latency
    /// Example: replog repair --endpoint host1:7101 list
    Repair(RepairArgs),
    /// Operate the membership of a running cluster: list, add, remove,
    /// promote, demote, replace, transfer-leader.
    ///
    /// Example: replog members --endpoint host1:7101 add 4 host4:7101
    Members(MembersArgs),
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
            cluster::status_endpoints(&a.endpoint, a.json)
        }
        Command::Status(a) => inspect::status(a),
        Command::Replica(a) => cluster::replica(*a),
        Command::Members(a) => cluster::members(a),
        Command::Benchmark(a) => benchmark::benchmark(a),
        Command::Demo(a) => demo::demo(a),
        Command::Backup(a) => state_cmd::backup(a),
        Command::State(a) => state_cmd::state(a),
        Command::Recovery(a) => state_cmd::recovery(a),
        Command::Repair(a) => repair_cmd::repair(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
