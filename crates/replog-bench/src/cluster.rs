//! `replog-bench cluster` and its arguments: the closed-loop generator
//! ([`crate::loadgen`]) against a running replog cluster (`--endpoint`) or
//! etcd cluster (`--etcd`), one concurrency level per run, one report.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::ArgGroup;
use replog_cli::benchmark::parse_size;
use replog_cli::support::{progress_bar, runtime};

use crate::etcd::EtcdTarget;
use crate::loadgen::{run, LoadSpec, Target};
use crate::replog_target::ReplogTarget;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["etcd", "endpoint"])))]
pub struct ClusterArgs {
    /// Benchmark an etcd cluster: its client URLs, comma separated
    /// (e.g. from benches/etcd/start-cluster.sh). Values are put into the
    /// leader through etcd's gRPC API (KV/Put) by --concurrency closed-loop clients.
    #[arg(long, value_delimiter = ',', conflicts_with = "endpoint")]
    pub etcd: Vec<String>,
    /// Benchmark a running replog cluster: its replica servers,
    /// comma separated. Entries are appended through the leader by
    /// --concurrency closed-loop clients (the same generator as --etcd).
    #[arg(long, value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// Operations in total.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Size of each value, e.g. `256B` or `4KB`.
    #[arg(long, default_value = "256", value_parser = parse_size)]
    pub value_size: usize,
    /// Closed-loop clients (one level per run).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `replog-bench cluster`: the etcd target with `--etcd`, else the replog
/// target.
pub fn cluster(a: ClusterArgs) -> Result<()> {
    if a.etcd.is_empty() {
        replog_benchmark(a)
    } else {
        etcd_benchmark(a)
    }
}

/// `replog-bench cluster --endpoint E[,E...]`: appends `--count` entries of
/// `--value-size` bytes to a running replog cluster from `--concurrency`
/// closed-loop clients (the same generator as `--etcd`).
pub fn replog_benchmark(a: ClusterArgs) -> Result<()> {
    let endpoints = a.endpoint.clone();
    closed_loop_benchmark(&a, "replog append", async move {
        let target = ReplogTarget::discover(&endpoints).await?;
        eprintln!("replog: leader at {}", target.leader);
        Ok(target)
    })
}

/// How long one operation may take before the run fails.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// `replog-bench cluster --etcd URL[,URL...]`: puts `--count` values of
/// `--value-size` bytes into the etcd cluster's leader from
/// `--concurrency` closed-loop clients and prints the report like the
/// replog benchmark does.
pub fn etcd_benchmark(a: ClusterArgs) -> Result<()> {
    let endpoints = a.etcd.clone();
    closed_loop_benchmark(&a, "etcd put", async move {
        let target = EtcdTarget::discover(&endpoints).await?;
        eprintln!(
            "etcd {}: leader {} (member {:x}), gRPC KV/Put",
            target.version, target.leader, target.leader_id
        );
        Ok(target)
    })
}

/// Runs the closed loop of `a` (`--concurrency`, `--count`, `--value-size`)
/// against the target `discover` finds, and prints the report (`--json`).
fn closed_loop_benchmark<T: Target>(
    a: &ClusterArgs,
    what: &str,
    discover: impl Future<Output = Result<T>>,
) -> Result<()> {
    let concurrency = match a.concurrency[..] {
        [c] if c > 0 => c,
        [_] => bail!("--concurrency must be at least 1"),
        _ => bail!("--endpoint and --etcd take one --concurrency level per run"),
    };
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let rt = runtime()?;
    let report = rt.block_on(async {
        let target = discover.await?;
        let spec = LoadSpec {
            label: format!("{what} c={concurrency}"),
            clients: concurrency,
            count: a.count,
            value_size: a.value_size,
            op_timeout: Some(OP_TIMEOUT),
        };
        let pb = progress_bar(a.count, what, !a.json);
        let r = run(Arc::new(target), &spec, &pb).await;
        pb.finish_and_clear();
        r
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&[&report])?);
    } else {
        println!("{}", report.line());
    }
    Ok(())
}
