//! Appends of 256 B entries at concurrency 1 and 64, next to the raw
//! append+fdatasync rate of the same disk.
//!
//! Run: `cargo bench -p replog-benches --bench append`
//! (set REPLOG_BENCH_DIR to put the data on another disk; default: the
//! system temp directory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replog_benches::fresh_log;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("REPLOG_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = bench_dir();
    let mut g = c.benchmark_group("append_256B");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));
    g.sample_size(20);

    g.bench_function("raw_append_fdatasync", |b| {
        b.iter_custom(|iters| {
            let r =
                replog_cli::benchmark::fsync_probe(&dir.path().join("probe"), 256, iters as usize)
                    .unwrap();
            Duration::from_secs_f64(r.seconds)
        })
    });

    let log = fresh_log(&dir.path().join("log"));
    let writer = rt.block_on(async {
        let mut w = log.writer();
        w.start().await.unwrap();
        Arc::new(w)
    });
    let payload = Bytes::from(vec![0x42u8; 256]);
    for concurrency in [1usize, 64] {
        g.bench_function(format!("replog_concurrency_{concurrency}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let per = (iters as usize).div_ceil(concurrency);
                    let mut tasks = Vec::new();
                    for _ in 0..concurrency {
                        let w = writer.clone();
                        let p = payload.clone();
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..per {
                                w.append(p.clone()).await.unwrap();
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                    // Report time per append actually made.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * concurrency) as f64)
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
