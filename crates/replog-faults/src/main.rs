//! `replog-faults campaign`: a long fault campaign against real replica
//! processes in network namespaces; prints the report as a table and as
//! JSON, and exits non-zero when the checker (or, with `--repair`, a rule
//! of the repair coordinator) found a violation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use replog_faults::campaign::{self, CampaignConfig, FaultKind};
use replog_faults::cluster::ClusterConfig;
use replog_faults::repair::CoordinatorConfig;

#[derive(Parser)]
#[command(
    name = "replog-faults",
    about = "Fault campaigns against real replog replicas (needs root)"
)]
struct Cli {
    /// Log filter (tracing), e.g. `info` or `replog_faults=debug`.
    #[arg(long, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one campaign and print its report.
    Campaign {
        /// How long to inject faults, e.g. `10min`, `1h`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10min")]
        duration: Duration,
        /// `all`, or kinds separated by commas: kill, pause, partition,
        /// packet-loss, delay, wipe.
        #[arg(long, default_value = "all")]
        mix: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 3)]
        replicas: u64,
        /// Run the replicas with --state (the scheduler-state store).
        #[arg(long)]
        state: bool,
        /// Run the repair coordinator on the replicas, in execute mode,
        /// driven by the faults: a two-step order of harmless commands
        /// (restart:replica:2s, reboot:leader:2s, each records its call),
        /// --num-allowed-repairs 1, --removal-limit 0.6,
        /// --removal-rate-limit 1/20s, --healthy-period 3s, --signal-ttl 4s,
        /// --reregister-timeout 2s, HTTP on port 7200. Faults are then held
        /// 1-10 s and the campaign resets the removal-limit alarm after 2 s;
        /// the coordinator's limits are checked over its replicated history
        /// (use 5 replicas: 3 never demote).
        #[arg(long)]
        repair: bool,
        /// The longest a fault is held (default 4 s, 10 s with --repair).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_hold: Option<Duration>,
        /// Keep data directories and replica logs here (default: a
        /// temporary directory, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Write the whole history (operations, status polls, faults) as
        /// JSON to this file.
        #[arg(long)]
        history: Option<PathBuf>,
        /// The `replog` binary (default: REPLOG_BIN, else next to this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Campaign {
            duration,
            mix,
            seed,
            replicas,
            state,
            repair,
            max_hold,
            dir,
            history,
            bin,
        } => {
            let mix = FaultKind::parse_mix(&mix).map_err(anyhow::Error::msg)?;
            let mut cluster = match bin {
                Some(b) => ClusterConfig::with_bin(replicas, b),
                None => ClusterConfig::new(replicas)?,
            };
            cluster.state = state;
            cluster.dir = dir;
            let mut cfg = CampaignConfig::new(cluster, duration, mix, seed);
            if repair {
                cfg = cfg.with_repair(CoordinatorConfig::default());
            }
            if let Some(max) = max_hold {
                cfg.hold.1 = max.max(cfg.hold.0);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let (report, hist) = rt.block_on(campaign::run(&cfg))?;
            println!("{}", report.table());
            println!("{}", serde_json::to_string_pretty(&report)?);
            if let Some(path) = history {
                let f = std::fs::File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                serde_json::to_writer(std::io::BufWriter::new(f), &hist)?;
            }
            if !report.violations.is_empty() {
                bail!("{} violations found", report.violations.len());
            }
            Ok(())
        }
    }
}
