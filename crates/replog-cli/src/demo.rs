//! `replog demo` and `replog benchmark`: both run an embedded replica.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use replog_log::{Log, LogOptions};
use replog_storage::{identity, InitOptions, RocksStorage};

use crate::benchmark::{fsync_probe, read_trace, run_appends, Report};
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
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
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
    let mut reports: Vec<Report> = Vec::new();
    if a.probe_iterations > 0 {
        let size = trace[0];
        let r = fsync_probe(&a.path.join("probe"), size, a.probe_iterations)?;
        if !a.json {
            println!("{}", r.line());
        }
        reports.push(r);
    }
    let rt = runtime()?;
    let r = rt.block_on(async {
        let opts = LogOptions {
            sync: a.sync,
            idle_spin: std::time::Duration::from_micros(a.idle_spin_us),
            caller_drives: a.caller_drives,
            ..Default::default()
        };
        let log = Log::open(&a.path, opts)?;
        let mut w = log.writer();
        w.start().await?;
        let total = (trace.len() * a.repeat) as u64;
        let pb = progress_bar(total, "appending", !a.json);
        let pb2 = pb.clone();
        let label = format!("replog append c={}", a.concurrency);
        let r = run_appends(
            Arc::new(w),
            trace.clone(),
            a.repeat,
            a.concurrency,
            &label,
            Arc::new(move || pb2.inc(1)),
        )
        .await;
        pb.finish_and_clear();
        log.close();
        r
    })?;
    if a.json {
        reports.push(r);
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!("{}", r.line());
        if let Some(p) = reports.first() {
            println!(
                "replog appends/s vs raw fdatasync/s: {:.2}x   (p50 {}us vs {}us)",
                r.ops_per_sec / p.ops_per_sec,
                r.p50_us,
                p.p50_us
            );
        }
    }
    Ok(())
}
