//! `replog demo` and `replog benchmark`: both run an embedded replica.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use replog_log::{Log, LogOptions};
use replog_storage::{identity, InitOptions, RocksStorage};

use crate::benchmark::{fsync_probe_sample, probe_label, read_trace, run_appends, Report, Sample};
use crate::cli::{progress_bar, BenchmarkArgs, DemoArgs};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_single(path: &Path, cluster_id: &str) -> Result<()> {
    RocksStorage::initialize(path, &InitOptions::single_replica(cluster_id))
        .with_context(|| format!("cannot initialize {}", path.display()))?;
    Ok(())
}

pub(crate) fn default_demo_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("replog/demo");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/replog/demo");
    }
    PathBuf::from("replog-demo")
}

pub fn demo(a: DemoArgs) -> Result<()> {
    if !a.embedded {
        return crate::cluster_demo::cluster_demo(&a);
    }
    let path = a.path.unwrap_or_else(default_demo_path);
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
            init_single(&path, "demo")?;
            println!("-- initialized replica 1 of cluster 'demo' (EMPTY -> VOTING)");
        }
    }
    let rt = runtime()?;
    rt.block_on(async {
        let log = Log::open(&path, LogOptions::default())?;
        let mut writer = log.writer();
        let ending = writer.start().await?;
        println!(
            "-- this replica leads term {}; the log ends at position {ending}",
            log.leadership().term
        );
        let writer = Arc::new(writer);
        let pb = progress_bar(a.entries as u64, "appending", true);
        let started = Instant::now();
        let mut tasks = Vec::new();
        let per_task = a.entries.div_ceil(16);
        for t in 0..16usize {
            let w = writer.clone();
            let pb = pb.clone();
            let n = per_task.min(a.entries.saturating_sub(t * per_task));
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
        let reader = log.reader();
        let (first, last) = (written[0].0, written[written.len() - 1].0);
        let got = reader.read(first, last)?;
        if got.len() != written.len()
            || got.iter().zip(&written).any(|(e, (p, d))| e.position != *p || e.data != d.as_bytes())
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
        let log = Log::open(&path, LogOptions::default())?;
        let mut writer = log.writer();
        let ending = writer.start().await?;
        let reader = log.reader();
        let kept = reader.read(mid, last)?;
        let expect = written.iter().filter(|(p, _)| *p >= mid).count();
        if kept.len() != expect {
            bail!("after restart {} entries were readable, expected {expect}", kept.len());
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
            replog_storage::disk_usage(&path)?
        );
        println!("== done. Inspect it with: replog status --path {}", path.display());
        anyhow::Ok(())
    })
}

pub fn benchmark(a: BenchmarkArgs) -> Result<()> {
    let trace = Arc::new(read_trace(&a.input)?);
    let levels = benchmark_levels(&a.concurrency, &a.repeat, trace.len())?;
    match identity::read(&a.path) {
        Ok(Some(id)) if id.cluster_id == "benchmark" => {}
        Ok(Some(id)) => bail!(
            "{} holds replica {} of cluster '{}'; the benchmark only writes to an empty \
             directory or an earlier benchmark's log",
            a.path.display(),
            id.replica_id,
            id.cluster_id
        ),
        _ => init_single(&a.path, "benchmark")?,
    }
    let rt = runtime()?;
    let grand_total: usize = levels.iter().map(|l| l.appends).sum();
    let slices = a
        .slices
        .clamp(1, levels.iter().map(|l| l.appends).min().unwrap_or(1));
    let probe_dir = a.path.join("probe");
    let (probe, runs) = rt.block_on(async {
        let opts = LogOptions {
            sync: a.sync,
            idle_spin: std::time::Duration::from_micros(a.idle_spin_us),
            caller_drives: a.caller_drives,
            ..Default::default()
        };
        let log = Log::open(&a.path, opts)?;
        let mut w = log.writer();
        w.start().await?;
        let w = Arc::new(w);
        let pb = progress_bar(grand_total as u64, "appending", !a.json);
        let pb2 = pb.clone();
        let progress: Arc<dyn Fn() + Send + Sync> = Arc::new(move || pb2.inc(1));
        // The probe and each concurrency level take turns, slice by slice,
        // so that all of them meet the disk in the same state (a VM's disk
        // speed drifts over seconds).
        let mut probe = Sample::default();
        let mut runs: Vec<(Sample, u64)> = levels.iter().map(|_| Default::default()).collect();
        let mut next_trace_index = 0;
        for s in 0..slices {
            let iterations =
                a.probe_iterations * (s + 1) / slices - a.probe_iterations * s / slices;
            if iterations > 0 {
                probe.extend(fsync_probe_sample(&probe_dir, trace[0], iterations)?);
            }
            for (level, (sample, fsyncs)) in levels.iter().zip(runs.iter_mut()) {
                let count = level.appends * (s + 1) / slices - level.appends * s / slices;
                let syncs_before = log.sync_count();
                let part = run_appends(
                    w.clone(),
                    trace.clone(),
                    next_trace_index,
                    count,
                    level.concurrency,
                    progress.clone(),
                )
                .await?;
                next_trace_index += count;
                *fsyncs += log.sync_count() - syncs_before;
                sample.extend(part);
            }
        }
        pb.finish_and_clear();
        drop(w);
        log.close();
        let probe = (a.probe_iterations > 0).then(|| probe.report(&probe_label(trace[0])));
        let runs: Vec<Report> = levels
            .iter()
            .zip(runs)
            .map(|(level, (sample, fsyncs))| {
                let mut r = sample.report(&format!("replog append c={}", level.concurrency));
                r.fsyncs = Some(fsyncs);
                r
            })
            .collect();
        anyhow::Ok((probe, runs))
    })?;
    if a.json {
        let reports: Vec<&Report> = probe.iter().chain(&runs).collect();
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for r in probe.iter().chain(&runs) {
        println!("{}", r.line());
    }
    for r in &runs {
        if let Some(p) = &probe {
            println!(
                "{}: p50 {:.2}x the raw append+fdatasync p50 ({}us vs {}us)",
                r.label,
                r.p50_us as f64 / p.p50_us.max(1) as f64,
                r.p50_us,
                p.p50_us
            );
        }
    }
    if let [first, rest @ ..] = &runs[..] {
        for r in rest {
            println!(
                "{}: {:.1}x the appends/s of {}",
                r.label,
                r.ops_per_sec / first.ops_per_sec.max(1e-9),
                first.label
            );
        }
    }
    Ok(())
}

/// One concurrency level of a benchmark run.
#[derive(Debug, PartialEq, Eq)]
struct BenchmarkLevel {
    concurrency: usize,
    appends: usize,
}

/// Pairs each `--concurrency` level with its `--repeat` (one value for all,
/// or one per level) and counts its appends.
fn benchmark_levels(
    concurrency: &[usize],
    repeat: &[usize],
    trace_len: usize,
) -> Result<Vec<BenchmarkLevel>> {
    if concurrency.is_empty() || concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    if repeat.len() != 1 && repeat.len() != concurrency.len() {
        bail!(
            "--repeat takes one value or one per --concurrency level ({} levels, {} values)",
            concurrency.len(),
            repeat.len()
        );
    }
    concurrency
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let r = repeat[if repeat.len() == 1 { 0 } else { i }];
            if r == 0 {
                bail!("--repeat must be at least 1");
            }
            Ok(BenchmarkLevel {
                concurrency: c,
                appends: r * trace_len,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_levels_pair_concurrency_with_repeat() {
        let l = |c, appends| BenchmarkLevel {
            concurrency: c,
            appends,
        };
        assert_eq!(
            benchmark_levels(&[1, 64], &[5000, 100_000], 1).unwrap(),
            [l(1, 5000), l(64, 100_000)]
        );
        assert_eq!(
            benchmark_levels(&[1, 8], &[3], 2).unwrap(),
            [l(1, 6), l(8, 6)],
            "one --repeat applies to every level"
        );
        assert!(benchmark_levels(&[1, 64], &[1, 2, 3], 1).is_err());
        assert!(benchmark_levels(&[0], &[1], 1).is_err());
        assert!(benchmark_levels(&[1], &[0], 1).is_err());
    }
}
