//! The command line of `replog-bench`: its subcommands, each with the
//! arguments its module defines, logging, and dispatch.
//!
//! Invariant: this module only composes; no module imports it.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use replog_cli::support::init_tracing;

use crate::cluster::{self, ClusterArgs};

/// replog-bench: benchmark tooling of replog (not part of the product).
///
/// The local mesos-log benchmark of a replica's log stays
/// `replog benchmark --path DIR --input TRACE`.
#[derive(Debug, Parser)]
#[command(name = "replog-bench", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter, e.g. `info` or `replog=debug,raft=info` (env: REPLOG_LOG).
    #[arg(long, global = true, env = "REPLOG_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a running replog cluster (--endpoint) or etcd cluster (--etcd)
    /// with closed-loop clients and report throughput and latency: the same
    /// generator, the same client stack and the same report for both (what
    /// `replog benchmark --endpoint/--etcd` did until it moved here).
    ///
    /// Example: replog-bench cluster --endpoint host1:7101,host2:7101,host3:7101 --concurrency 64 --count 20000
    ///
    /// Example: replog-bench cluster --etcd http://127.0.0.1:23791 --concurrency 64 --count 20000
    Cluster(ClusterArgs),
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
        Command::Cluster(a) => cluster::cluster(a),
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

    #[test]
    fn benchmark_flags() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["replog-bench", "cluster"].iter().chain(args)).map(|cli| match cli
                .command
            {
                Command::Cluster(a) => a,
            })
        };
        let a = parse(&[
            "--etcd",
            "http://a:1,http://b:2",
            "--concurrency",
            "64",
            "--count",
            "5",
            "--value-size",
            "1KB",
        ])
        .unwrap();
        assert_eq!(a.etcd, ["http://a:1", "http://b:2"]);
        assert_eq!(a.concurrency, [64]);
        assert_eq!((a.count, a.value_size), (5, 1024));
        let a = parse(&["--endpoint", "h1:7101,h2:7101"]).unwrap();
        assert_eq!(a.endpoint, ["h1:7101", "h2:7101"]);
        assert!(a.etcd.is_empty());
        assert_eq!(
            (a.count, a.value_size, &a.concurrency[..]),
            (10_000, 256, &[1][..])
        );
        assert!(parse(&[]).is_err(), "needs --endpoint or --etcd");
        assert!(parse(&["--etcd", "http://a:1", "--endpoint", "h1:7101"]).is_err());
        assert!(parse(&["--etcd", "http://a:1", "--path", "/p"]).is_err());
    }
}
