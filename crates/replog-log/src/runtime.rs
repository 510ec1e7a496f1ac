//! The runtime that executes the core's actions for an embedded replica:
//! an engine (the [`ReplicaCore`] and everyone waiting on it) behind one
//! lock, driven by a driver thread (batches proposals, ticks, peer
//! messages, fsync reports) or, when the replica is idle, by the caller
//! itself (see [`Shared::call`]); a sync
//! thread (fsyncs, coalescing every sync request that arrived while the
//! previous fsync ran: group commit) and a compactor thread (gives the space
//! of truncated positions back to the filesystem).
//!
//! Invariants:
//! - a caller is answered `Ok(position)` only after the core reported the
//!   entry committed, which for a replica needs the fsync that covered it;
//! - every queue is bounded: callers hold a semaphore permit for each
//!   request in flight, a ready carries at most `max_batch` proposals, and
//!   the sync and compaction channels carry at most one message per ready
//!   (each turn asserts its batch and its waiters within those bounds);
//! - the sync thread fsyncs for readies in increasing order (asserted), so
//!   each report covers every ready before it;
//! - a storage failure (an fsync error included) stops the replica: every
//!   waiting and later call fails with [`LogError::Closed`] and the reason;
//! - only the holder of the engine lock touches the core; the engine is
//!   `None` once stopped, and a stopped engine is never started again;
//! - a caller drives only its own request and only when no request is
//!   queued, so it never answers for, or reorders, anyone else's;
//! - no turn reads more than the storage's fetch budget
//!   ([`crate::LogOptions::fetch_budget_bytes`], plus one entry) for sends
//!   to followers: every turn starts with [`ReplicaCore::begin_turn`],
//!   which retries the sends an earlier turn's budget refused, and while
//!   any wait the driver thread runs turn after turn without parking (after
//!   taking whatever is queued), so a catch-up never stops the leader from
//!   answering for longer than one budget's worth of reading;
//! - a linearizable read ends within `read_timeout`: answered, or refused
//!   with [`LogError::ReadNotConfirmed`] (nothing was executed; safe to
//!   retry). Its read index is asked for again under a new id, never
//!   reused, whenever the leader changes or `read_retry` passed without an
//!   answer (raft-rs drops a read index request silently: no leader, a
//!   leader without a committed entry of its term, a lost message, a
//!   leadership change), and read ids start at a random value per start,
//!   so that two replicas' requests never share a context at the leader
//!   (raft-rs keeps one request per context and drops the second).

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, never, select, unbounded, Receiver, Sender};
use parking_lot::Mutex;
use replog_core::{Command, CoreConfig, Input, MembershipChange, Output, Progress, ReplicaCore};
use replog_proto::replica::Envelope;
use replog_storage::{LogStorage, Member, RocksStorage};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use crate::error::{LogError, Result};
use crate::peers::{self, ClusterOptions, Inbound, PeerLink};
use crate::{ClusterStatus, MemberStatus, Position};

pub(crate) struct Request {
    pub command: Command,
    pub writer_term: Option<u64>,
    pub reply: oneshot::Sender<Result<Position>>,
    pub permit: OwnedSemaphorePermit,
}

pub(crate) enum Control {
    Request(Request),
    /// A linearizable read: answered with the position reads must wait for.
    Read {
        reply: oneshot::Sender<Result<u64>>,
        permit: OwnedSemaphorePermit,
    },
    Membership {
        changes: Vec<MembershipChange>,
        addresses: Vec<Member>,
        reply: oneshot::Sender<Result<Position>>,
        permit: OwnedSemaphorePermit,
    },
    TransferLeader {
        to: u64,
    },
    /// Run a turn: sends to followers wait for a turn's fetch budget (a
    /// caller's or the sync thread's turn left them; see
    /// [`Shared::resume_queued`]).
    Resume,
    Status {
        reply: oneshot::Sender<ClusterStatus>,
    },
    Shutdown,
}

/// The cluster side of a replica: where its peers' messages come from and
/// go to.
pub(crate) struct PeerWiring {
    pub cluster: ClusterOptions,
    pub link: Arc<dyn PeerLink>,
    pub inbound: Receiver<Envelope>,
}

/// State shared between the driver thread and the API handles.
pub(crate) struct Shared {
    pub progress: watch::Sender<Progress>,
    pub failure: Mutex<Option<String>>,
    pub permits: Arc<Semaphore>,
    pub requests: Sender<Control>,
    /// The core and its waiters; `None` once the replica stopped. Whoever
    /// holds the lock drives the core.
    engine: Mutex<Option<Engine>>,
    /// See [`RuntimeConfig::caller_drives`].
    caller_drives: bool,
    /// Requests a caller drove on its own thread.
    pub caller_driven: AtomicU64,
    /// fsyncs the sync thread reported to the core itself.
    pub sync_reported: AtomicU64,
    /// The driver thread is batching concurrent requests: its last turn
    /// took more than one, and it has not parked since. Callers then queue
    /// behind it rather than drive, so that concurrent requests share its
    /// batches and fsyncs (the first caller to find the queue empty after
    /// a batch was answered would otherwise write and fsync alone).
    driver_batching: AtomicBool,
    /// A [`Control::Resume`] is queued and not yet taken: at most one is.
    resume_queued: AtomicBool,
}

impl Shared {
    fn new(
        progress: watch::Sender<Progress>,
        requests: Sender<Control>,
        engine: Engine,
        max_in_flight: usize,
        caller_drives: bool,
    ) -> Self {
        Shared {
            progress,
            failure: Mutex::new(None),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            requests,
            engine: Mutex::new(Some(engine)),
            caller_drives,
            caller_driven: AtomicU64::new(0),
            sync_reported: AtomicU64::new(0),
            driver_batching: AtomicBool::new(false),
            resume_queued: AtomicBool::new(false),
        }
    }

    pub fn closed_error(&self) -> LogError {
        LogError::Closed(self.failure.lock().clone())
    }

    /// Sends the driver the request `make` builds (holding an in-flight
    /// permit and a reply channel) and waits for its answer.
    ///
    /// When the driver thread is not batching concurrent requests, nothing
    /// is queued or in flight and nobody drives the engine, the caller
    /// drives it for its own request instead (as RocksDB's write leader
    /// does): no hand-off to the driver thread and, when the core can
    /// answer at once (a replica of one), no wake-up of the caller either.
    /// The caller's thread then does the write, and the fsync when the
    /// core syncs a lone small ready inline, before this returns.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(OwnedSemaphorePermit, oneshot::Sender<Result<T>>) -> Control,
    ) -> Result<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.closed_error())?;
        let (tx, rx) = oneshot::channel();
        if let Err(control) = self.drive_here(make(permit, tx)) {
            self.requests
                .send(control)
                .map_err(|_| self.closed_error())?;
        }
        rx.await.map_err(|_| self.closed_error())?
    }

    /// Drives the engine for `control` on this thread if the replica is
    /// idle; gives `control` back otherwise.
    fn drive_here(&self, control: Control) -> std::result::Result<(), Control> {
        if !self.caller_drives
            || self.driver_batching.load(Ordering::Acquire)
            || !self.requests.is_empty()
        {
            return Err(control);
        }
        let Some(mut guard) = self.engine.try_lock() else {
            return Err(control);
        };
        let Some(engine) = guard.as_mut() else {
            return Err(control);
        };
        if !engine.waiting.is_empty() || !engine.reads.is_empty() {
            // Others are in flight: the driver thread groups this request
            // with theirs (one fsync for all) rather than this caller
            // holding the engine through an fsync of its own.
            return Err(control);
        }
        let work = Work {
            controls: vec![control],
            ..Work::default()
        };
        self.caller_driven.fetch_add(1, Ordering::Relaxed);
        self.turn(&mut guard, work);
        Ok(())
    }

    /// Called by the sync thread right after an fsync that covered every
    /// ready up to `ready_number`, when no other fsync is asked for: if
    /// nobody drives the engine, reports it here (sends the messages that
    /// waited for it, answers the appends it made durable) instead of
    /// waking the driver thread for it. False: the driver thread must be
    /// told, as before.
    fn report_persisted_here(&self, ready_number: u64) -> bool {
        if !self.caller_drives {
            return false;
        }
        let Some(mut guard) = self.engine.try_lock() else {
            return false;
        };
        if guard.is_none() {
            return false;
        }
        let work = Work {
            persisted: Some(ready_number),
            ..Work::default()
        };
        self.sync_reported.fetch_add(1, Ordering::Relaxed);
        self.turn(&mut guard, work);
        true
    }

    /// One turn of the engine in `guard` on this thread; a failure or a
    /// panic stops the replica, as one on the driver thread does.
    fn turn(&self, guard: &mut Option<Engine>, work: Work) {
        let Some(engine) = guard.as_mut() else {
            return;
        };
        let turn =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.process(self, work)));
        let failure = match turn {
            Ok(Ok(_)) => {
                // Sends this turn deferred need a turn of their own: the
                // driver thread may be parked, so it is woken.
                if engine.core.has_deferred_fetches()
                    && !self.resume_queued.swap(true, Ordering::AcqRel)
                    && self.requests.send(Control::Resume).is_err()
                {
                    self.resume_queued.store(false, Ordering::Release);
                }
                return;
            }
            Ok(Err(failure)) => failure,
            Err(panic) => panic_reason(panic.as_ref()),
        };
        engine.stop(self, Some(failure));
        *guard = None;
    }
}

/// Tunables of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub tick_interval: Duration,
    /// How long a linearizable read waits, in all, to be confirmed by the
    /// leader and applied here.
    pub read_timeout: Duration,
    /// How long a read index request may go unanswered before it is asked
    /// for again, under a new id.
    pub read_retry: Duration,
    pub max_in_flight: usize,
    pub max_batch: usize,
    /// See [`crate::LogOptions::idle_spin`].
    pub idle_spin: Duration,
    /// See [`crate::LogOptions::caller_drives`].
    pub caller_drives: bool,
    pub core: CoreConfig,
}

pub(crate) struct Threads {
    pub driver: Option<JoinHandle<()>>,
    pub syncer: Option<JoinHandle<()>>,
    pub compactor: Option<JoinHandle<()>>,
}

/// Capacity of the channel of fsync requests to the sync thread and of the
/// channel of its reports: one message per ready at most, and the core
/// keeps fewer readies than this waiting for their fsync (it asserts so).
const SYNC_QUEUE_CAPACITY: usize = 8192;
/// Capacity of the channel of truncation points to the compactor thread
/// (it works from the highest one queued; a report that finds the channel
/// full is dropped, a later one covers it).
const COMPACT_QUEUE_CAPACITY: usize = 1024;

/// What the sync thread reports: the highest ready an fsync covered, or
/// why the fsync failed.
type SyncReport = std::result::Result<u64, String>;

pub(crate) fn start(
    storage: RocksStorage,
    cfg: RuntimeConfig,
    wiring: Option<PeerWiring>,
) -> Result<(Arc<Shared>, Threads)> {
    let mut core = ReplicaCore::new(storage.clone(), &cfg.core)?;
    let mut outs = Vec::new();
    let initial = core.drive(&mut outs)?;
    let (progress_tx, _) = watch::channel(initial);
    let (req_tx, req_rx) = unbounded::<Control>();
    let (sync_tx, sync_rx) = bounded::<u64>(SYNC_QUEUE_CAPACITY);
    let (persisted_tx, persisted_rx) = bounded::<SyncReport>(SYNC_QUEUE_CAPACITY);
    let (compact_tx, compact_rx) = bounded::<u64>(COMPACT_QUEUE_CAPACITY);

    let meta = storage.meta();
    let (link, inbound, cluster) = match wiring {
        Some(w) => (Some(w.link), w.inbound, w.cluster),
        None => (None, never(), ClusterOptions::default()),
    };
    let caller_drives = cfg.caller_drives;
    let max_in_flight = cfg.max_in_flight;
    let engine = Engine {
        core,
        waiting: HashMap::new(),
        reads: HashMap::new(),
        next_id: random_u64() >> 1,
        sync_tx,
        compact_tx,
        queued_requests: req_rx.clone(),
        queued_inbound: inbound.clone(),
        cfg,
        cluster_id: meta.cluster_id,
        link,
        addresses: known_addresses(&meta.members, &cluster),
        cluster,
        last_heard: HashMap::new(),
        started: Instant::now(),
    };
    let shared = Arc::new(Shared::new(
        progress_tx,
        req_tx,
        engine,
        max_in_flight,
        caller_drives,
    ));
    let syncer = {
        let (storage, shared) = (storage.clone(), shared.clone());
        spawn_thread("replog-sync", "sync", move || {
            sync_loop(&shared, storage, sync_rx, persisted_tx)
        })?
    };
    let compactor = spawn_thread("replog-compact", "compaction", move || {
        compact_loop(storage, compact_rx)
    })?;
    let driver = {
        let shared = shared.clone();
        let initial = initial_work(outs);
        spawn_thread("replog-driver", "driver", move || {
            run_driver(&shared, initial, req_rx, persisted_rx, inbound)
        })?
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

/// Where each replica listens: the addresses the metadata knows, then
/// those configured (which win).
fn known_addresses(members: &[Member], cluster: &ClusterOptions) -> BTreeMap<u64, String> {
    let mut addresses: BTreeMap<u64, String> = members
        .iter()
        .filter(|m| !m.address.is_empty())
        .map(|m| (m.id, m.address.clone()))
        .collect();
    addresses.extend(cluster.peers.clone());
    addresses
}

/// Starts thread `name` running `body`; `what` names it in the error.
fn spawn_thread(
    name: &str,
    what: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map_err(|e| LogError::Invalid(format!("cannot start {what} thread: {e}")))
}

/// The driver thread's body: [`drive_loop`], then the engine is stopped
/// with the reason it ended for (a fatal error or a panic; none on
/// shutdown) unless a caller stopped it already.
fn run_driver(
    shared: &Shared,
    initial: Work,
    req_rx: Receiver<Control>,
    persisted_rx: Receiver<SyncReport>,
    inbound: Receiver<Envelope>,
) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drive_loop(shared, initial, req_rx, persisted_rx, inbound)
    }));
    let failure = match result {
        Ok(r) => r.err(),
        Err(panic) => Some(panic_reason(panic.as_ref())),
    };
    let mut guard = shared.engine.lock();
    if let Some(engine) = guard.as_mut() {
        engine.stop(shared, failure);
    }
    *guard = None;
}

/// The reason a panic of the driving thread gives.
fn panic_reason(panic: &(dyn std::any::Any + Send)) -> String {
    format!(
        "the replica's driver panicked: {}",
        panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown cause")
    )
}

fn initial_work(outs: Vec<Output>) -> Work {
    Work {
        outputs: outs,
        ..Work::default()
    }
}

/// The sync thread: one fsync for every ready written since the last one
/// (group commit). Its report goes to the driver thread, unless no other
/// fsync is asked for and the engine is free: then this thread reports it
/// itself (no wake-up of the driver on the path of a lone append, on the
/// leader and on the follower alike). A failed fsync always goes to the
/// driver thread, which stops the replica.
fn sync_loop(shared: &Shared, storage: RocksStorage, rx: Receiver<u64>, done: Sender<SyncReport>) {
    let mut last_synced: Option<u64> = None;
    while let Ok(mut n) = rx.recv() {
        while let Ok(m) = rx.try_recv() {
            n = n.max(m);
        }
        assert!(
            last_synced.is_none_or(|last| last < n),
            "the fsync of ready {n} is asked for after that of ready {last_synced:?}: \
             readies are persisted in order"
        );
        last_synced = Some(n);
        let r = storage.sync().map(|()| n).map_err(|e| e.to_string());
        if r.is_ok() && rx.is_empty() && shared.report_persisted_here(n) {
            continue;
        }
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

/// A random number, from the standard library's randomly keyed hasher
/// (fresh keys from the OS at each start of the process).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A linearizable read waiting for its read index.
struct ReadWaiter {
    reply: oneshot::Sender<Result<u64>>,
    _permit: OwnedSemaphorePermit,
    /// When the read is refused if still unanswered.
    deadline: Instant,
    /// When its read index was last asked for.
    asked_at: Instant,
    /// The term and leader this replica knew then.
    asked_of: (u64, Option<u64>),
}

/// What one turn of the engine handles.
#[derive(Default)]
struct Work {
    /// Requests of API handles.
    controls: Vec<Control>,
    /// Messages from peers.
    envelopes: Vec<Envelope>,
    /// The highest ready an fsync covered, if a report arrived.
    persisted: Option<u64>,
    /// A tick of raft's logical clock is due.
    tick: bool,
    /// Outputs already produced (the core's first drive at start).
    outputs: Vec<Output>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.controls.is_empty()
            && self.envelopes.is_empty()
            && self.persisted.is_none()
            && self.outputs.is_empty()
    }
}

/// The replica's core and everything waiting on it; driven by whoever
/// holds [`Shared::engine`].
struct Engine {
    core: ReplicaCore<RocksStorage>,
    /// Callers waiting for their proposal, each holding its permit.
    waiting: HashMap<u64, (oneshot::Sender<Result<Position>>, OwnedSemaphorePermit)>,
    /// Linearizable reads waiting for their read index, by the id of their
    /// latest request.
    reads: HashMap<u64, ReadWaiter>,
    /// The next id of a proposal or read. Starts at a random value (see
    /// the module docs: read ids must not repeat across replicas or
    /// restarts) and wraps.
    next_id: u64,
    sync_tx: Sender<u64>,
    compact_tx: Sender<u64>,
    /// The driver thread's queues, only to see whether anything waits in
    /// them (nothing is received through these handles).
    queued_requests: Receiver<Control>,
    queued_inbound: Receiver<Envelope>,
    cfg: RuntimeConfig,
    cluster_id: String,
    link: Option<Arc<dyn PeerLink>>,
    cluster: ClusterOptions,
    /// Where each known replica listens.
    addresses: BTreeMap<u64, String>,
    /// When a message from each peer last arrived.
    last_heard: HashMap<u64, Instant>,
    started: Instant,
}

/// The driver thread: waits for requests, peer messages, fsync reports and
/// ticks, and drives the engine with them. Returns on shutdown, on a fatal
/// error (the reason) or when a caller stopped the engine.
fn drive_loop(
    shared: &Shared,
    initial: Work,
    req_rx: Receiver<Control>,
    persisted_rx: Receiver<SyncReport>,
    inbound: Receiver<Envelope>,
) -> std::result::Result<(), String> {
    let (tick_interval, max_batch, idle_spin) = {
        let guard = shared.engine.lock();
        let Some(engine) = guard.as_ref() else {
            return Ok(());
        };
        (
            engine.cfg.tick_interval,
            engine.cfg.max_batch,
            engine.cfg.idle_spin,
        )
    };
    let queues = DriverQueues {
        requests: req_rx,
        persisted: persisted_rx,
        inbound,
        max_batch,
    };
    let mut next_tick = Instant::now() + tick_interval;
    let mut work = initial;
    let mut had_work = false;
    // Sends to followers wait for the next turn's fetch budget: take what
    // is queued, without parking, and run that turn.
    let mut resume = false;
    loop {
        if work.is_empty() && resume {
            queues.take_queued(&mut work)?;
        } else if work.is_empty() {
            if had_work {
                queues.spin_until_any(
                    idle_spin.min(next_tick.saturating_duration_since(Instant::now())),
                );
            }
            let timeout = next_tick.saturating_duration_since(Instant::now());
            shared.driver_batching.store(false, Ordering::Release);
            if queues.wait(&mut work, timeout)?.is_break() {
                return Ok(());
            }
        }
        // Whatever else is queued joins this turn's batch.
        queues.join_queued_requests(&mut work);
        work.tick = tick_due(&mut next_tick, tick_interval);
        had_work = !work.is_empty();
        if work.controls.len() > 1 {
            shared.driver_batching.store(true, Ordering::Release);
        }
        let mut guard = shared.engine.lock();
        let Some(engine) = guard.as_mut() else {
            // A caller stopped the engine after a fatal error.
            return Ok(());
        };
        if engine.process(shared, std::mem::take(&mut work))? {
            return Ok(());
        }
        resume = engine.core.has_deferred_fetches();
    }
}

/// True when a tick is due; then moves `next_tick` on by one interval
/// (or to one interval from now, after a stall longer than that).
fn tick_due(next_tick: &mut Instant, tick_interval: Duration) -> bool {
    if Instant::now() < *next_tick {
        return false;
    }
    *next_tick += tick_interval;
    if *next_tick < Instant::now() {
        *next_tick = Instant::now() + tick_interval;
    }
    true
}

/// The driver thread's queues.
struct DriverQueues {
    requests: Receiver<Control>,
    persisted: Receiver<SyncReport>,
    inbound: Receiver<Envelope>,
    /// Most requests, and most envelopes after the first, per turn.
    max_batch: usize,
}

impl DriverQueues {
    /// Parks until a request, an envelope or an fsync report arrives, or
    /// for `timeout`, and puts what came into `work`. `Break`: every API
    /// handle is gone. An fsync failure, or the sync thread gone, is fatal.
    fn wait(
        &self,
        work: &mut Work,
        timeout: Duration,
    ) -> std::result::Result<ControlFlow<()>, String> {
        select! {
            recv(self.requests) -> msg => {
                let Ok(first) = msg else { return Ok(ControlFlow::Break(())) };
                work.controls.push(first);
            }
            recv(self.inbound) -> env => {
                if let Ok(env) = env {
                    work.envelopes.push(env);
                    work.envelopes.extend(inbound_batch(&self.inbound).take(self.max_batch));
                }
            }
            recv(self.persisted) -> msg => {
                let Ok(first) = msg else { return Err("the sync thread stopped".into()) };
                self.fold_persisted(work, Some(first))?;
            }
            default(timeout) => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Takes, without parking, the envelopes and fsync reports queued.
    fn take_queued(&self, work: &mut Work) -> std::result::Result<(), String> {
        work.envelopes
            .extend(inbound_batch(&self.inbound).take(self.max_batch));
        self.fold_persisted(work, None)
    }

    /// Folds `first` and the fsync reports queued behind it into `work`:
    /// the highest ready covered. A failed fsync is fatal.
    fn fold_persisted(
        &self,
        work: &mut Work,
        first: Option<SyncReport>,
    ) -> std::result::Result<(), String> {
        let queued = std::iter::from_fn(|| self.persisted.try_recv().ok());
        for report in first.into_iter().chain(queued) {
            let n = report.map_err(|e| format!("fsync failed: {e}"))?;
            work.persisted = Some(work.persisted.map_or(n, |p| p.max(n)));
        }
        Ok(())
    }

    /// Adds queued requests to `work`, up to `max_batch` in all.
    fn join_queued_requests(&self, work: &mut Work) {
        while work.controls.len() < self.max_batch {
            match self.requests.try_recv() {
                Ok(m) => work.controls.push(m),
                Err(_) => break,
            }
        }
    }

    /// See [`spin_until_ready`]: until anything is queued.
    fn spin_until_any(&self, window: Duration) {
        spin_until_ready(window, || {
            !self.requests.is_empty() || !self.inbound.is_empty() || !self.persisted.is_empty()
        });
    }
}

impl Engine {
    /// One turn: admits the requests, steps the core with every input,
    /// drives it and carries out what it asks. True on shutdown; an error
    /// is fatal (the caller stops the engine with it).
    fn process(&mut self, shared: &Shared, work: Work) -> std::result::Result<bool, String> {
        assert!(
            work.controls.len() <= self.cfg.max_batch.max(1),
            "a turn takes {} requests, over max_batch {}",
            work.controls.len(),
            self.cfg.max_batch
        );
        let mut inputs = Vec::with_capacity(work.controls.len() + work.envelopes.len() + 2);
        let mut shutdown = false;
        for c in work.controls {
            if matches!(c, Control::Resume) {
                shared.resume_queued.store(false, Ordering::Release);
                continue;
            }
            shutdown |= self.admit(c, &mut inputs);
        }
        self.assert_waiters_hold_permits();
        if shutdown {
            // The commit record is current when the replica stops cleanly.
            self.core.flush_deferred().map_err(|e| e.to_string())?;
            return Ok(true);
        }
        self.receive(work.envelopes, &mut inputs);
        if let Some(ready_number) = work.persisted {
            inputs.push(Input::Persisted { ready_number });
        }
        if work.tick {
            inputs.push(Input::Tick);
            self.expire_or_retry_reads(&mut inputs);
        }
        let mut outs = work.outputs;
        // The fetch budget is whole again; sends it refused before go first.
        self.core.begin_turn();
        for input in inputs {
            self.core
                .step(input, &mut outs)
                .map_err(|e| e.to_string())?;
        }
        // Nothing else queued: a small ready may be fsynced inline. Only on
        // a replica without peers: one with peers must keep answering
        // heartbeats while an fsync is slow (a VM disk stalls for hundreds
        // of ms now and then), or its leader's quorum check deposes the
        // leader. Seen as spurious elections: with inline syncs on
        // followers, both stalled in one disk hiccup.
        self.core.allow_inline_sync(
            self.link.is_none()
                && self.queued_requests.is_empty()
                && self.queued_inbound.is_empty(),
        );
        let progress = self.core.drive(&mut outs).map_err(|e| e.to_string())?;
        // Publish before answering: a caller that got its position must
        // see it within `ending()`.
        shared.progress.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
        self.execute(outs)?;
        if work.tick {
            // Keep the recorded commit index close to the real one.
            self.core.flush_deferred().map_err(|e| e.to_string())?;
        }
        Ok(false)
    }

    /// Every caller waiting holds one of the `max_in_flight` permits.
    fn assert_waiters_hold_permits(&self) {
        let waiters = self.waiting.len() + self.reads.len();
        assert!(
            waiters <= self.cfg.max_in_flight,
            "{waiters} requests wait, over max_in_flight {}: each holds a permit",
            self.cfg.max_in_flight
        );
    }

    /// Turns inbound envelopes into inputs.
    fn receive(&mut self, envelopes: Vec<Envelope>, inputs: &mut Vec<Input>) {
        let me = self.core.id();
        for env in envelopes {
            match peers::decode(&self.cluster_id, me, env) {
                Ok((from, inbound)) => {
                    self.last_heard.insert(from, Instant::now());
                    inputs.push(match inbound {
                        Inbound::Raft(m) => Input::Message(m),
                        Inbound::Peer(msg) => Input::Peer { from, msg },
                    });
                }
                Err(why) => warn!(%why, "dropped an envelope"),
            }
        }
    }

    /// Refuses the reads past their deadline, and asks again, under a new
    /// id, for the read index of those asked of another leader or too long
    /// ago: raft-rs drops a read index request without a word when there is
    /// no leader, when the leader has not committed an entry of its term
    /// yet, when it loses leadership, or when the request or its answer is
    /// lost; the answer to the old id, should it come, is ignored.
    fn expire_or_retry_reads(&mut self, inputs: &mut Vec<Input>) {
        let now = Instant::now();
        let p = self.core.progress();
        let leader_now = (p.term, p.leader);
        let due: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| {
                r.deadline <= now
                    || r.asked_of != leader_now
                    || now.duration_since(r.asked_at) >= self.cfg.read_retry
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut r) = self.reads.remove(&id) else {
                continue;
            };
            if r.deadline <= now {
                let _ = r.reply.send(Err(LogError::ReadNotConfirmed {
                    waited: self.cfg.read_timeout,
                }));
                continue;
            }
            debug!(old = id, ?leader_now, "asking again for a read index");
            r.asked_at = now;
            r.asked_of = leader_now;
            let id = self.new_id();
            self.reads.insert(id, r);
            inputs.push(Input::ReadIndex { id });
        }
    }

    fn status(&self) -> ClusterStatus {
        let progress = self.core.progress();
        let now = Instant::now();
        let me = self.core.id();
        let ping = self.cluster.ping_timeout.max(Duration::from_millis(1));
        let members = self
            .core
            .members()
            .into_iter()
            .map(|m| {
                let heard = self.last_heard.get(&m.id).copied();
                let silence = if m.id == me {
                    Duration::ZERO
                } else {
                    now - heard.unwrap_or(self.started)
                };
                let missed_pings = (silence.as_nanos() / ping.as_nanos()) as u32;
                MemberStatus {
                    id: m.id,
                    address: self.addresses.get(&m.id).cloned().unwrap_or_default(),
                    voter: m.voter,
                    matched: m.matched,
                    lag: if progress.is_leader {
                        progress.applied.saturating_sub(m.matched)
                    } else {
                        0
                    },
                    last_heard: if m.id == me {
                        Some(Duration::ZERO)
                    } else {
                        heard.map(|h| now - h)
                    },
                    missed_pings,
                    reachable: missed_pings < self.cluster.max_ping_timeouts.max(1),
                }
            })
            .collect();
        ClusterStatus {
            progress,
            members,
            leader_address: progress
                .leader
                .and_then(|l| self.addresses.get(&l).cloned()),
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Turns a request into an input; true on shutdown.
    fn admit(&mut self, c: Control, inputs: &mut Vec<Input>) -> bool {
        match c {
            Control::Shutdown => true,
            Control::Resume => false,
            Control::Read { reply, permit } => {
                let id = self.new_id();
                let now = Instant::now();
                let p = self.core.progress();
                self.reads.insert(
                    id,
                    ReadWaiter {
                        reply,
                        _permit: permit,
                        deadline: now + self.cfg.read_timeout,
                        asked_at: now,
                        asked_of: (p.term, p.leader),
                    },
                );
                inputs.push(Input::ReadIndex { id });
                false
            }
            Control::Membership {
                changes,
                addresses,
                reply,
                permit,
            } => {
                let id = self.new_id();
                self.waiting.insert(id, (reply, permit));
                inputs.push(Input::ChangeMembership {
                    id,
                    changes,
                    addresses,
                });
                false
            }
            Control::TransferLeader { to } => {
                inputs.push(Input::TransferLeader { to });
                false
            }
            Control::Status { reply } => {
                let _ = reply.send(self.status());
                false
            }
            Control::Request(r) => {
                let id = self.new_id();
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
                Output::Failed { id, error } => {
                    if let Some(r) = self.reads.remove(&id) {
                        let _ = r.reply.send(Err(error.into()));
                    } else {
                        self.answer(id, Err(error.into()));
                    }
                }
                Output::Truncated { first_index } => {
                    let _ = self.compact_tx.try_send(first_index);
                }
                Output::Send(msgs) => match &self.link {
                    Some(link) => {
                        for m in &msgs {
                            link.send(peers::raft_envelope(&self.cluster_id, m));
                        }
                    }
                    // A replica without peers (an embedded log of one).
                    None => debug!(count = msgs.len(), "no peers; dropping raft messages"),
                },
                Output::SendPeer { to, msg } => match &self.link {
                    Some(link) => link.send(peers::peer_envelope(
                        &self.cluster_id,
                        self.core.id(),
                        to,
                        &msg,
                    )),
                    None => debug!(to, "no peers; dropping a recover-protocol message"),
                },
                Output::ReadReady { id, index } => {
                    if let Some(r) = self.reads.remove(&id) {
                        let _ = r.reply.send(Ok(index));
                    }
                }
                Output::StatusChanged { status } => {
                    info!(%status, "replica status is now {status}");
                }
                Output::Addresses(members) => {
                    for m in members {
                        if m.id != self.core.id() && !m.address.is_empty() {
                            if let Some(link) = &self.link {
                                link.set_peer(m.id, m.address.clone());
                            }
                            self.addresses.insert(m.id, m.address);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails everyone waiting and closes the API. The holder of the lock
    /// then drops the engine (and with it the helper threads' senders).
    fn stop(&mut self, shared: &Shared, failure: Option<String>) {
        if let Some(f) = &failure {
            error!(reason = %f, "replica stopped after a fatal error");
            *shared.failure.lock() = Some(f.clone());
        }
        for (_, (tx, _permit)) in self.waiting.drain() {
            let _ = tx.send(Err(LogError::Closed(failure.clone())));
        }
        for (_, r) in self.reads.drain() {
            let _ = r.reply.send(Err(LogError::Closed(failure.clone())));
        }
        shared.permits.close();
        shared.progress.send_modify(|p| {
            p.is_leader = false;
            p.leader_ready = false;
        });
    }
}

/// Polls `ready` for up to `window` before the caller parks: a request
/// that arrives meanwhile is taken without the wake-up of a parked thread.
/// Spins briefly, then yields its CPU between polls so that the thread
/// about to send (on a machine of few cores, maybe this very core) runs.
fn spin_until_ready(window: Duration, ready: impl Fn() -> bool) {
    if window.is_zero() {
        return;
    }
    let started = Instant::now();
    let mut polls = 0u32;
    while !ready() {
        if started.elapsed() >= window {
            return;
        }
        polls += 1;
        if polls < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The envelopes already queued behind the first one.
fn inbound_batch(rx: &Receiver<Envelope>) -> impl Iterator<Item = Envelope> + '_ {
    std::iter::from_fn(move || rx.try_recv().ok())
}
