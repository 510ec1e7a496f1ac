//! Child process of the crash-durability test: appends as fast as it can
//! from many tasks and prints `ACK <position> <seq>` after each append is
//! acknowledged, until it is killed.
//!
//! usage: crash-writer <path> <concurrency> <first-seq>

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use replog_log::{Log, LogOptions};
use replog_storage::{identity, InitOptions, RocksStorage};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).context("path")?);
    let concurrency: usize = args.get(2).context("concurrency")?.parse()?;
    let first_seq: u64 = args.get(3).context("first-seq")?.parse()?;
    if identity::read(&path)?.is_none() {
        RocksStorage::initialize(&path, &InitOptions::single_replica("crash-test"))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let log = Log::open(&path, LogOptions::default())?;
        let mut w = log.writer();
        w.start().await?;
        println!("STARTED");
        std::io::stdout().flush()?;
        let w = Arc::new(w);
        let next = Arc::new(AtomicU64::new(first_seq));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (w, next) = (w.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    let pos = w.append(replog_tests::payload(seq)).await?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {} {}", pos.value(), seq)?;
                    out.flush()?;
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
}
