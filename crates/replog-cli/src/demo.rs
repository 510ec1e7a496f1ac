//! `replog demo`: the local cluster demo ([`crate::cluster_demo`]), or with
//! `--embedded` a single embedded replica.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use replog_log::{Log, LogOptions};
use replog_storage::identity;

use crate::cluster_demo::{cluster_demo, ClusterDemo};
use crate::support::{init_single_replica, progress_bar, runtime_with_workers};

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

/// Worker threads of the embedded demo's runtime.
const WORKER_THREADS: usize = 2;

fn default_demo_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("replog/demo");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/replog/demo");
    }
    PathBuf::from("replog-demo")
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let path = a.path.unwrap_or_else(default_demo_path);
    if !a.embedded {
        return cluster_demo(&ClusterDemo {
            dir: path.join("cluster"),
            fresh: a.fresh,
            entries: a.entries,
            base_port: a.base_port,
        });
    }
    if a.fresh && path.exists() {
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("cannot wipe {}", path.display()))?;
    }
    println!(
        "== replog demo: an embedded single-replica log in {}",
        path.display()
    );
    match identity::read(&path) {
        Ok(Some(id)) => println!(
            "-- found replica {} of cluster '{}' from an earlier run; reopening it",
            id.replica_id, id.cluster_id
        ),
        _ => {
            init_single_replica(&path, "demo")?;
            println!("-- initialized replica 1 of cluster 'demo' (EMPTY -> VOTING)");
        }
    }
    let rt = runtime_with_workers(WORKER_THREADS)?;
    rt.block_on(embedded_demo(&path, a.entries))
}

/// What the embedded demo appended: (position, data), sorted.
type Written = Vec<(replog_log::Position, String)>;

/// Appends, reads back, truncates, restarts and appends again on the
/// single replica at `path`, checking each step.
async fn embedded_demo(path: &std::path::Path, entries: usize) -> Result<()> {
    let log = Log::open(path, LogOptions::default())?;
    let mut writer = log.writer();
    let ending = writer.start().await?;
    println!(
        "-- this replica leads term {}; the log ends at position {ending}",
        log.leadership().term
    );
    let writer = Arc::new(writer);
    let written = append_concurrently(&writer, entries).await?;
    let reader = log.reader();
    let (first, last) = (written[0].0, written[written.len() - 1].0);
    let got = reader.read(first, last)?;
    if got.len() != written.len()
        || got
            .iter()
            .zip(&written)
            .any(|(e, (p, d))| e.position != *p || e.data != d.as_bytes())
    {
        bail!("read-back mismatch: the log does not hold what was acknowledged");
    }
    println!("-- read back positions {first}..={last}: every acknowledged entry, byte for byte");
    let mid = written[written.len() / 2].0;
    writer.truncate(mid).await?;
    println!(
        "-- truncated everything before position {mid}; the log now begins at {}",
        reader.beginning()
    );
    match reader.read(first, mid) {
        Err(e) => println!("-- reading the truncated range fails as it should: {e}"),
        Ok(_) => bail!("a truncated range was readable"),
    }
    drop((writer, reader));
    log.close();
    println!("-- closed the replica; reopening it (a restart)");
    reopen_and_check(path, &written, mid, last).await
}

/// `entries` appends from 16 concurrent writers, with a progress bar.
async fn append_concurrently(writer: &Arc<replog_log::Writer>, entries: usize) -> Result<Written> {
    let pb = progress_bar(entries as u64, "appending", true);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per_task = entries.div_ceil(16);
    for t in 0..16usize {
        let w = writer.clone();
        let pb = pb.clone();
        let n = per_task.min(entries.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let data = format!("task {t} entry {i}");
                out.push((w.append(data.clone().into_bytes()).await?, data));
                pb.inc(1);
            }
            anyhow::Ok(out)
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await??);
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "-- appended {} entries from 16 concurrent writers in {:.2}s ({:.0} appends/s, each fsynced before its ack)",
        written.len(),
        secs,
        written.len() as f64 / secs
    );
    written.sort();
    Ok(written)
}

/// After the restart: the kept entries `mid..=last` are intact, and the
/// log takes a new append.
async fn reopen_and_check(
    path: &std::path::Path,
    written: &Written,
    mid: replog_log::Position,
    last: replog_log::Position,
) -> Result<()> {
    let log = Log::open(path, LogOptions::default())?;
    let mut writer = log.writer();
    let ending = writer.start().await?;
    let reader = log.reader();
    let kept = reader.read(mid, last)?;
    let expect = written.iter().filter(|(p, _)| *p >= mid).count();
    if kept.len() != expect {
        bail!(
            "after restart {} entries were readable, expected {expect}",
            kept.len()
        );
    }
    let p = writer.append(&b"written after the restart"[..]).await?;
    println!(
        "-- after the restart: beginning {}, ending {ending}; all {expect} kept entries intact; appended at {p}",
        reader.beginning()
    );
    let meta = log.meta();
    println!(
        "-- status: {} replica {} of '{}', term {}, {} bytes on disk",
        meta.status,
        meta.replica_id,
        meta.cluster_id,
        meta.hard_state.term,
        replog_storage::disk_usage(path)?
    );
    println!(
        "== done. Inspect it with: replog status --path {}",
        path.display()
    );
    Ok(())
}
