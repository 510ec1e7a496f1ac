//! The `replog benchmark` load generator (the mesos-log benchmark): appends
//! the sizes of a trace file, sequentially or from many concurrent
//! appenders, and measures throughput and latency; plus a raw fdatasync
//! probe of the same disk to compare against.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use replog_log::Writer;
use serde::Serialize;

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
}
