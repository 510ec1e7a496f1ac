//! `replog benchmark` (the mesos-log benchmark) and its arguments: appends
//! the sizes of a trace file to a fresh single-replica log, sequentially or
//! from many concurrent appenders, and measures throughput and latency;
//! plus a raw fdatasync probe of the same disk to compare against, the two
//! taking turns slice by slice.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::ArgAction;
use replog_log::{Log, LogOptions, Writer};
use replog_storage::identity;
use serde::Serialize;

use crate::support::{init_single_replica, progress_bar, runtime_with_workers};

#[derive(Debug, clap::Args)]
pub struct BenchmarkArgs {
    /// Directory for the benchmark's own log (empty or missing).
    // The hidden defaults only stand in with --endpoint/--etcd, which moved
    // to replog-bench (given, they only name its command line); without
    // them both flags are required.
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
    /// Moved to `replog-bench cluster --etcd` (hidden: given, the command
    /// fails naming the replog-bench command line that does what it did).
    #[arg(long, hide = true, value_delimiter = ',', conflicts_with_all = ["path", "input", "repeat", "sync", "probe_iterations", "endpoint"])]
    pub etcd: Vec<String>,
    /// Moved to `replog-bench cluster --endpoint` (hidden, as --etcd).
    #[arg(long, hide = true, value_delimiter = ',', conflicts_with_all = ["path", "input", "repeat", "sync", "probe_iterations"])]
    pub endpoint: Vec<String>,
    /// Moved with --endpoint/--etcd (hidden).
    #[arg(long, hide = true, default_value_t = 10_000)]
    pub count: u64,
    /// Moved with --endpoint/--etcd (hidden).
    #[arg(long, hide = true, default_value = "256", value_parser = parse_size)]
    pub value_size: usize,
    /// Concurrent appenders (1 = sequential, as mesos-log's benchmark).
    /// Several levels, comma separated (e.g. `1,64`), are measured in one
    /// run, taking turns slice by slice with each other and with the
    /// fdatasync probe.
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

/// Worker threads of the benchmark's runtime (beside the log's own threads).
const WORKER_THREADS: usize = 2;

/// `replog benchmark --path DIR --input TRACE`: the probe and the
/// concurrency levels, slice by slice, on a fresh (or an earlier
/// benchmark's) single-replica log in `DIR`; prints the reports.
pub fn benchmark(a: BenchmarkArgs) -> Result<()> {
    if let Some(moved) = moved_to_replog_bench(&a) {
        bail!(moved);
    }
    let trace = Arc::new(read_trace(&a.input)?);
    let levels = benchmark_levels(&a.concurrency, &a.repeat, trace.len())?;
    prepare_benchmark_replica(&a.path)?;
    let rt = runtime_with_workers(WORKER_THREADS)?;
    let (probe, runs) = rt.block_on(run_levels(&a, trace, &levels))?;
    print_reports(probe.as_ref(), &runs, a.json)
}

/// The benchmark writes to an empty directory (initialized here) or an
/// earlier benchmark's log, never to another cluster's replica.
fn prepare_benchmark_replica(path: &Path) -> Result<()> {
    match identity::read(path) {
        Ok(Some(id)) if id.cluster_id == "benchmark" => Ok(()),
        Ok(Some(id)) => bail!(
            "{} holds replica {} of cluster '{}'; the benchmark only writes to an empty \
             directory or an earlier benchmark's log",
            path.display(),
            id.replica_id,
            id.cluster_id
        ),
        _ => init_single_replica(path, "benchmark"),
    }
}

/// Runs the fsync probe and every level on the log at `a.path`, slice by
/// slice; returns the probe's report (if asked for) and one per level.
async fn run_levels(
    a: &BenchmarkArgs,
    trace: Arc<Vec<usize>>,
    levels: &[BenchmarkLevel],
) -> Result<(Option<Report>, Vec<Report>)> {
    let grand_total: usize = levels.iter().map(|l| l.appends).sum();
    let slices = a
        .slices
        .clamp(1, levels.iter().map(|l| l.appends).min().unwrap_or(1));
    let probe_dir = a.path.join("probe");
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
        let iterations = a.probe_iterations * (s + 1) / slices - a.probe_iterations * s / slices;
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
    Ok((probe, runs))
}

/// Prints the reports as JSON, or as lines with the ratios to the probe
/// and to the first level.
fn print_reports(probe: Option<&Report>, runs: &[Report], json: bool) -> Result<()> {
    if json {
        let reports: Vec<&Report> = probe.into_iter().chain(runs).collect();
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for r in probe.into_iter().chain(runs) {
        println!("{}", r.line());
    }
    for r in runs {
        if let Some(p) = probe {
            println!(
                "{}: p50 {:.2}x the raw append+fdatasync p50 ({}us vs {}us)",
                r.label,
                r.p50_us as f64 / p.p50_us.max(1) as f64,
                r.p50_us,
                p.p50_us
            );
        }
    }
    if let [first, rest @ ..] = runs {
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

/// What `replog benchmark --endpoint/--etcd` says since the load of a
/// running cluster moved to replog-bench: the `replog-bench cluster` command
/// line that does what it did. None without those flags.
fn moved_to_replog_bench(a: &BenchmarkArgs) -> Option<String> {
    let (flag, targets) = match (&a.etcd[..], &a.endpoint[..]) {
        ([], []) => return None,
        ([], endpoints) => ("--endpoint", endpoints),
        (urls, _) => ("--etcd", urls),
    };
    let concurrency: Vec<String> = a.concurrency.iter().map(|c| c.to_string()).collect();
    Some(format!(
        "`replog benchmark {flag}` moved to the benchmark tool replog-bench \
         (cargo build -p replog-bench); run: replog-bench cluster {flag} {} \
         --concurrency {} --count {} --value-size {}{}",
        targets.join(","),
        concurrency.join(","),
        a.count,
        a.value_size,
        if a.json { " --json" } else { "" }
    ))
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

/// Parses a size such as `100B`, `4KB`, `2MB` or `1GB` (units of 1024, as
/// mesos-log's trace files use); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .with_context(|| format!("'{s}' does not start with a number"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" | "KIB" => 1024,
        "MB" | "M" | "MIB" => 1024 * 1024,
        "GB" | "G" | "GIB" => 1024 * 1024 * 1024,
        other => bail!("unknown size unit '{other}' in '{s}' (use B, KB, MB or GB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size '{s}' overflows"))
}

/// Reads a trace: one size per line; blank lines and `#` comments skipped.
pub fn read_trace(path: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trace file {}", path.display()))?;
    let mut sizes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        sizes.push(parse_size(l).with_context(|| format!("{}:{}", path.display(), i + 1))?);
    }
    if sizes.is_empty() {
        bail!("trace file {} holds no sizes", path.display());
    }
    Ok(sizes)
}

/// Latency percentiles and throughput of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub count: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// fsyncs the replica did during the run (replog appends only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsyncs: Option<u64>,
    /// The longest stretch of the run in which no operation completed, in
    /// µs (closed-loop runs against a cluster): a disk stall or an election
    /// shows here, while p99 only says that something was slow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_gap_us: Option<u64>,
}

impl Report {
    pub fn new(label: &str, mut latencies: Vec<Duration>, bytes: u64, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let pct = |p: f64| -> u64 {
            if latencies.is_empty() {
                return 0;
            }
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i].as_micros() as u64
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            label: label.to_string(),
            count: latencies.len(),
            bytes,
            seconds: secs,
            ops_per_sec: latencies.len() as f64 / secs,
            mb_per_sec: bytes as f64 / secs / (1024.0 * 1024.0),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: latencies.last().map(|d| d.as_micros() as u64).unwrap_or(0),
            fsyncs: None,
            longest_gap_us: None,
        }
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let fsyncs = match self.fsyncs {
            Some(n) => format!(
                "  fsyncs={n} ({:.1} appends each)",
                self.count as f64 / n.max(1) as f64
            ),
            None => String::new(),
        };
        let gap = match self.longest_gap_us {
            Some(g) => format!("  longest_gap={g}us"),
            None => String::new(),
        };
        format!(
            "{:<28} count={:<8} bytes={:<11} time={:>8.3}s  {:>10.1} ops/s  {:>8.2} MB/s  p50={}us p99={}us max={}us{fsyncs}{gap}",
            self.label, self.count, self.bytes, self.seconds, self.ops_per_sec, self.mb_per_sec,
            self.p50_us, self.p99_us, self.max_us
        )
    }
}

/// Latencies and bytes of one part of a run, and the time it took; the
/// parts of a run add up to its [`Report`].
#[derive(Debug, Default)]
pub struct Sample {
    pub latencies: Vec<Duration>,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Sample {
    pub fn extend(&mut self, part: Sample) {
        self.latencies.extend(part.latencies);
        self.bytes += part.bytes;
        self.elapsed += part.elapsed;
    }

    pub fn report(self, label: &str) -> Report {
        Report::new(label, self.latencies, self.bytes, self.elapsed)
    }
}

/// The raw fdatasync rate of the disk under `dir`: appends `size` bytes to a
/// fresh file and fdatasyncs, `iterations` times (what one log append costs
/// at the least).
pub fn fsync_probe(dir: &Path, size: usize, iterations: usize) -> Result<Report> {
    Ok(fsync_probe_sample(dir, size, iterations)?.report(&probe_label(size)))
}

/// The label of the raw fdatasync probe's report.
pub fn probe_label(size: usize) -> String {
    format!("raw append+fdatasync {size}B")
}

/// [`fsync_probe`] as a part of a run.
pub fn fsync_probe_sample(dir: &Path, size: usize, iterations: usize) -> Result<Sample> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let buf = vec![0x5au8; size];
    let mut lat = Vec::with_capacity(iterations);
    let start = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        f.write_all(&buf)?;
        // SAFETY: fdatasync on a file descriptor we own.
        let rc = unsafe { libc::fdatasync(f.as_raw_fd()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("fdatasync on {}", path.display()));
        }
        lat.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Sample {
        latencies: lat,
        bytes: (size * iterations) as u64,
        elapsed,
    })
}

/// Appends `count` sizes of `trace` (cycled, starting at its `first`
/// one) through `writer` from `concurrency` tasks. Calls `progress` after
/// each append.
pub async fn run_appends(
    writer: Arc<Writer>,
    trace: Arc<Vec<usize>>,
    first: usize,
    count: usize,
    concurrency: usize,
    progress: Arc<dyn Fn() + Send + Sync>,
) -> Result<Sample> {
    let total = first + count;
    let max = trace.iter().copied().max().unwrap_or(0);
    let payload = Bytes::from((0..max).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let next = Arc::new(AtomicUsize::new(first));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (writer, trace, next, payload, progress) = (
            writer.clone(),
            trace.clone(),
            next.clone(),
            payload.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let size = trace[i % trace.len()];
                let t = Instant::now();
                writer.append(payload.slice(..size)).await?;
                lat.push(t.elapsed());
                bytes += size as u64;
                progress();
            }
            anyhow::Ok((lat, bytes))
        }));
    }
    let mut sample = Sample {
        latencies: Vec::with_capacity(count),
        ..Sample::default()
    };
    for t in tasks {
        let (l, b) = t.await.context("appender task panicked")??;
        sample.latencies.extend(l);
        sample.bytes += b;
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_mesos_traces() {
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert_eq!(parse_size("2MB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size(" 4kb ").unwrap(), 4096);
        assert_eq!(parse_size("256").unwrap(), 256);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn percentiles() {
        let lat: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let r = Report::new("x", lat, 0, Duration::from_secs(1));
        assert_eq!(r.p50_us, 50);
        assert_eq!(r.p99_us, 99);
        assert_eq!(r.max_us, 100);
    }

    fn parse(args: &[&str]) -> Result<BenchmarkArgs, clap::Error> {
        let argv: Vec<&str> = ["benchmark"].iter().chain(args).copied().collect();
        crate::support::parse_args(&argv)
    }

    #[test]
    fn benchmark_flags() {
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
        let a = parse(&["--path", "/p", "--input", "/t"]).unwrap();
        assert!(a.etcd.is_empty());
        assert_eq!(a.value_size, 256);
        assert!(
            parse(&[]).is_err(),
            "the replog benchmark still needs --path and --input"
        );
        assert!(parse(&["--path", "/p"]).is_err());
        assert!(parse(&["--etcd", "http://a:1", "--path", "/p"]).is_err());
    }

    #[test]
    fn cluster_flags_name_the_replog_bench_command_line() {
        let a = parse(&[
            "--endpoint",
            "a:1,b:2",
            "--concurrency",
            "64",
            "--count",
            "5",
            "--value-size",
            "1KB",
            "--json",
        ])
        .unwrap();
        let e = benchmark(a).unwrap_err().to_string();
        assert!(e.contains("`replog benchmark --endpoint` moved"), "{e}");
        assert!(
            e.contains(
                "run: replog-bench cluster --endpoint a:1,b:2 --concurrency 64 --count 5 \
                 --value-size 1024 --json"
            ),
            "{e}"
        );
        let e = benchmark(parse(&["--etcd", "http://a:1"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "run: replog-bench cluster --etcd http://a:1 --concurrency 1 --count 10000 \
                 --value-size 256"
            ),
            "{e}"
        );
    }

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
