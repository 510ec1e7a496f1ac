//! The runtime that executes the core's actions for an embedded replica:
//! a driver thread (owns the [`ReplicaCore`], batches proposals), a sync
//! thread (fsyncs, coalescing every sync request that arrived while the
//! previous fsync ran: group commit) and a compactor thread (gives the space
//! of truncated positions back to the filesystem).
//!
//! Invariants:
//! - a caller is answered `Ok(position)` only after the core reported the
//!   entry committed, which for a replica needs the fsync that covered it;
//! - every queue is bounded: callers hold a semaphore permit for each
//!   request in flight, a ready carries at most `max_batch` proposals, and
//!   the sync and compaction channels carry at most one message per ready;
//! - a storage failure (an fsync error included) stops the replica: every
//!   waiting and later call fails with [`LogError::Closed`] and the reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use parking_lot::Mutex;
use replog_core::{Command, CoreConfig, Input, Output, Progress, ReplicaCore};
use replog_storage::{LogStorage, RocksStorage};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

use crate::error::{LogError, Result};
use crate::Position;

pub(crate) struct Request {
    pub command: Command,
    pub writer_term: Option<u64>,
    pub reply: oneshot::Sender<Result<Position>>,
    pub permit: OwnedSemaphorePermit,
}

pub(crate) enum Control {
    Request(Request),
    Shutdown,
}

/// State shared between the driver and the API handles.
pub(crate) struct Shared {
    pub progress: watch::Sender<Progress>,
    pub failure: Mutex<Option<String>>,
    pub permits: Arc<Semaphore>,
    pub requests: Sender<Control>,
}

impl Shared {
    pub fn closed_error(&self) -> LogError {
        LogError::Closed(self.failure.lock().clone())
    }
}

/// Tunables of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub tick_interval: Duration,
    pub max_in_flight: usize,
    pub max_batch: usize,
    pub core: CoreConfig,
}

pub(crate) struct Threads {
    pub driver: Option<JoinHandle<()>>,
    pub syncer: Option<JoinHandle<()>>,
    pub compactor: Option<JoinHandle<()>>,
}

pub(crate) fn start(storage: RocksStorage, cfg: RuntimeConfig) -> Result<(Arc<Shared>, Threads)> {
    let mut core = ReplicaCore::new(storage.clone(), &cfg.core)?;
    let mut outs = Vec::new();
    let initial = core.drive(&mut outs)?;
    let (progress_tx, _) = watch::channel(initial);
    let (req_tx, req_rx) = unbounded::<Control>();
    let shared = Arc::new(Shared {
        progress: progress_tx,
        failure: Mutex::new(None),
        permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
        requests: req_tx,
    });
    // One message per ready at most, and readies are bounded by the core.
    let (sync_tx, sync_rx) = bounded::<u64>(8192);
    let (persisted_tx, persisted_rx) = bounded::<std::result::Result<u64, String>>(8192);
    let (compact_tx, compact_rx) = bounded::<u64>(1024);

    let syncer = {
        let storage = storage.clone();
        std::thread::Builder::new()
            .name("replog-sync".into())
            .spawn(move || sync_loop(storage, sync_rx, persisted_tx))
            .map_err(|e| LogError::Invalid(format!("cannot start sync thread: {e}")))?
    };
    let compactor = {
        let storage = storage.clone();
        std::thread::Builder::new()
            .name("replog-compact".into())
            .spawn(move || compact_loop(storage, compact_rx))
            .map_err(|e| LogError::Invalid(format!("cannot start compaction thread: {e}")))?
    };
    let driver = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("replog-driver".into())
            .spawn(move || {
                let mut d = Driver {
                    core,
                    shared,
                    waiting: HashMap::new(),
                    next_id: 1,
                    sync_tx,
                    compact_tx,
                    cfg,
                };
                let result = d.run(outs, req_rx, persisted_rx);
                d.stop(result.err());
            })
            .map_err(|e| LogError::Invalid(format!("cannot start driver thread: {e}")))?
    };
    Ok((
        shared,
        Threads {
            driver: Some(driver),
            syncer: Some(syncer),
            compactor: Some(compactor),
        },
    ))
}

fn sync_loop(
    storage: RocksStorage,
    rx: Receiver<u64>,
    done: Sender<std::result::Result<u64, String>>,
) {
    while let Ok(mut n) = rx.recv() {
        // Group commit: one fsync covers every ready written so far.
        while let Ok(m) = rx.try_recv() {
            n = n.max(m);
        }
        let r = storage.sync().map(|()| n).map_err(|e| e.to_string());
        let failed = r.is_err();
        if done.send(r).is_err() || failed {
            return;
        }
    }
}

fn compact_loop(storage: RocksStorage, rx: Receiver<u64>) {
    while let Ok(mut first) = rx.recv() {
        while let Ok(f) = rx.try_recv() {
            first = first.max(f);
        }
        let started = Instant::now();
        if let Err(e) = storage.reclaim_space() {
            warn!(error = %e, "reclaiming the space of truncated positions failed");
        } else {
            debug!(first, elapsed = ?started.elapsed(), "reclaimed the space of truncated positions");
        }
    }
}

struct Driver {
    core: ReplicaCore<RocksStorage>,
    shared: Arc<Shared>,
    /// Callers waiting for their proposal, each holding its permit.
    waiting: HashMap<u64, (oneshot::Sender<Result<Position>>, OwnedSemaphorePermit)>,
    next_id: u64,
    sync_tx: Sender<u64>,
    compact_tx: Sender<u64>,
    cfg: RuntimeConfig,
}

impl Driver {
    fn run(
        &mut self,
        initial: Vec<Output>,
        req_rx: Receiver<Control>,
        persisted_rx: Receiver<std::result::Result<u64, String>>,
    ) -> std::result::Result<(), String> {
        self.execute(initial)?;
        let mut next_tick = Instant::now() + self.cfg.tick_interval;
        let mut inputs = Vec::with_capacity(self.cfg.max_batch);
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(req_rx) -> msg => {
                    let Ok(first) = msg else { return Ok(()) };
                    let mut shutdown = self.admit(first, &mut inputs);
                    while inputs.len() < self.cfg.max_batch && !shutdown {
                        match req_rx.try_recv() {
                            Ok(m) => shutdown = self.admit(m, &mut inputs),
                            Err(_) => break,
                        }
                    }
                    if shutdown {
                        return Ok(());
                    }
                }
                recv(persisted_rx) -> msg => {
                    let Ok(r) = msg else { return Err("the sync thread stopped".into()) };
                    let mut n = r.map_err(|e| format!("fsync failed: {e}"))?;
                    while let Ok(r) = persisted_rx.try_recv() {
                        n = n.max(r.map_err(|e| format!("fsync failed: {e}"))?);
                    }
                    inputs.push(Input::Persisted { ready_number: n });
                }
                default(timeout) => {}
            }
            if Instant::now() >= next_tick {
                inputs.push(Input::Tick);
                next_tick += self.cfg.tick_interval;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.cfg.tick_interval;
                }
            }
            let mut outs = Vec::new();
            for input in inputs.drain(..) {
                self.core
                    .step(input, &mut outs)
                    .map_err(|e| e.to_string())?;
            }
            let progress = self.core.drive(&mut outs).map_err(|e| e.to_string())?;
            // Publish before answering: a caller that got its position must
            // see it within `ending()`.
            self.shared.progress.send_if_modified(|p| {
                let changed = *p != progress;
                *p = progress;
                changed
            });
            self.execute(outs)?;
        }
    }

    /// Turns a request into an input; true on shutdown.
    fn admit(&mut self, c: Control, inputs: &mut Vec<Input>) -> bool {
        match c {
            Control::Shutdown => true,
            Control::Request(r) => {
                let id = self.next_id;
                self.next_id += 1;
                // The permit is released when the request is answered.
                self.waiting.insert(id, (r.reply, r.permit));
                inputs.push(Input::Propose {
                    id,
                    command: r.command,
                    writer_term: r.writer_term,
                });
                false
            }
        }
    }

    fn answer(&mut self, id: u64, r: Result<Position>) {
        if let Some((tx, _permit)) = self.waiting.remove(&id) {
            let _ = tx.send(r);
        }
    }

    fn execute(&mut self, outs: Vec<Output>) -> std::result::Result<(), String> {
        for o in outs {
            match o {
                Output::Sync { ready_number } => self
                    .sync_tx
                    .send(ready_number)
                    .map_err(|_| "the sync thread stopped".to_string())?,
                Output::Committed { id, position } => self.answer(id, Ok(Position::new(position))),
                Output::Failed { id, error } => self.answer(id, Err(error.into())),
                Output::Truncated { first_index } => {
                    let _ = self.compact_tx.try_send(first_index);
                }
                Output::Send(msgs) => {
                    // An embedded single replica has no peers to send to.
                    debug!(count = msgs.len(), "no transport; dropping raft messages");
                }
                Output::SendPeer { to, .. } => {
                    debug!(to, "no transport; dropping a recover-protocol message");
                }
                Output::ReadReady { id, .. } => {
                    debug!(id, "no reader waits for this read index");
                }
                Output::StatusChanged { status } => {
                    debug!(%status, "replica status changed");
                }
            }
        }
        Ok(())
    }

    fn stop(&mut self, failure: Option<String>) {
        if let Some(f) = &failure {
            error!(reason = %f, "replica stopped after a fatal error");
            *self.shared.failure.lock() = Some(f.clone());
        }
        for (_, (tx, _permit)) in self.waiting.drain() {
            let _ = tx.send(Err(LogError::Closed(failure.clone())));
        }
        self.shared.permits.close();
        self.shared.progress.send_modify(|p| {
            p.is_leader = false;
            p.leader_ready = false;
        });
    }
}
