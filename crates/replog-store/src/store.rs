//! [`SchedulerStore`]: the state store bound to a replicated log.
//!
//! One applier task per store ([`crate::applier`]) reads the log's
//! committed entries in order, reassembles framed transactions
//! ([`crate::record`]) and applies them to the local [`StateStore`]. Writers submit transactions through the log's
//! [`Writer`] and wait until their own replica applied them.
//!
//! Invariants:
//! - the state's applied position only moves forward, one committed log
//!   position after another; it never moves past the beginning of a framed
//!   write still in progress, so a restart re-reads that write whole;
//! - a transaction's outcome (applied, or rejected by a state check) is the
//!   same on every replica: the state machine is deterministic;
//! - queues are bounded: results of recent positions are kept for at most
//!   [`RESULT_SLOTS`] positions, reads of the log go in pages.
//!
//! # Snapshots and compaction
//!
//! The log of a state cluster does not grow forever. A compaction task runs
//! next to the applier; while this replica is the leader (`leader_ready`)
//! it counts what the state applied since the last compaction (entries,
//! bytes of applied log entries, time) and, when any of
//! [`StoreOptions::snapshot_interval_entries`],
//! [`StoreOptions::snapshot_interval_bytes`] or
//! [`StoreOptions::snapshot_interval`] is reached, it
//! 1. makes the state durable ([`StateStore::flush`], an fsync of the WAL),
//! 2. truncates the log to `applied - snapshot_keep_entries`
//!    ([`Writer::truncate`]): every replica drops the positions before it
//!    when it applies that truncation entry; the tail that is kept lets a
//!    follower that is a little behind go on from its own log.
//!
//! The local state is the snapshot: there is no separate snapshot file.
//! Compactions are counted ([`SchedulerStore::compactions`]).
//!
//! Invariant (durability): **the state is durable at least up to the log's
//! beginning - 1, or it is behind the log's beginning and catches up from a
//! peer** (below). Why it holds:
//! - the leader truncates only to `to <= applied - snapshot_keep_entries`
//!   after a flush that covered `applied` (asserted before the truncation);
//! - the state and the log share one RocksDB database and so one WAL, whose
//!   recovery keeps a prefix: a truncation a follower wrote after its state
//!   applied position `p` never survives a crash without `p`;
//! - on top of that, the applier flushes the state as soon as it sees the
//!   log's beginning move past what it last flushed.
//!
//! # Catch-up by streamed snapshot
//!
//! A replica whose state is behind its log's beginning (it was down while
//! the leader truncated, or it was wiped, rejoined EMPTY and received a
//! Raft snapshot) cannot replay the log. When the applier finds its next
//! position truncated it asks its [`SnapshotSource`] (the replica server
//! streams the `Snapshot` RPC of a peer) for a state snapshot stream and
//! loads it with [`crate::backup::load_stream`], at the position of the
//! snapshot's header, then applies the log from the next position on. The
//! snapshot is refused (and fetched again later, with backoff) unless its
//! content is scheduler state, its cluster id is this replica's, and its
//! position is at least the local log's beginning - 1 (a peer that is
//! behind too). The stream is read piece by piece through a bounded
//! channel (constant memory) and only a stream that checked out whole
//! switches the state ([`StateStore::replace_all`] generations); a crash in
//! the middle leaves the old state, and the applier, restarted, finds the
//! same gap and catches up again. Catch-ups are counted
//! ([`SchedulerStore::snapshot_catch_ups`]). A store without a source stops
//! its applier at such a gap, with the reason.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use parking_lot::Mutex;
use replog_log::{Log, LogError, Position, Reader, Writer};
use replog_proto::state::Transaction;
use replog_state::{StateError, StateStore};
use tokio::sync::{mpsc, watch, RwLock};
use tracing::{debug, info, warn};

use crate::applier::Applier;
use crate::record::{encode_transaction, RecordError};

/// Outcomes of this many recent positions are kept for their submitters.
pub const RESULT_SLOTS: usize = 65_536;
/// The position of the snapshot `initialize` founds a log with: nothing
/// before it. Its state is empty, or the backup the log was founded from
/// (`replog initialize --from-backup`, loaded at this position).
pub const FOUNDING_POSITION: u64 = 1;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The transaction is invalid; nothing was written.
    #[error("invalid transaction: {0}")]
    Invalid(#[source] StateError),
    /// A state check rejected the transaction when it was applied at
    /// `position`: it is in the log but changed nothing, on every replica.
    #[error("transaction at position {position} rejected: {reason}")]
    Rejected { position: u64, reason: String },
    #[error(transparent)]
    Record(#[from] RecordError),
    /// This replica is not (or no longer) the writer: fail over.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The local state failed (storage or corruption).
    #[error("the local state failed: {0}")]
    State(#[source] StateError),
    /// The applier stopped; the store serves no more.
    #[error("the store's applier stopped: {0}")]
    Stopped(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The whole state was replaced at `position` (a staged recovery was
    /// committed) after this replica's writer started: reload the state
    /// and start writing again.
    #[error("the state was replaced at position {position} (a staged recovery was committed): reload it, then write again")]
    StateReplaced { position: u64 },
    #[error(transparent)]
    Staging(#[from] crate::staging::StagingError),
    #[error("{0}")]
    Io(String),
    /// The log was opened without the store's column families.
    #[error("the log's database has no column family '{0}': open the log with the store's column families registered (SchedulerStore::register_column_families)")]
    NotRegistered(String),
}

/// Limits of a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest log entry the store writes; bigger transactions are framed.
    pub max_entry_bytes: usize,
    /// Largest transaction (encoded), framed or not.
    pub max_transaction_bytes: usize,
    /// How long a submitter waits for its own replica to apply its write.
    pub apply_timeout: Duration,
    /// The leader compacts the log once this many positions were applied
    /// since the last compaction (see the module docs).
    pub snapshot_interval_entries: u64,
    /// ... or once this many bytes of log entries were applied.
    pub snapshot_interval_bytes: u64,
    /// ... or once this much time passed (and something was applied).
    pub snapshot_interval: Duration,
    /// Positions kept before the applied position when the log is
    /// truncated, for followers that are a little behind.
    pub snapshot_keep_entries: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_entry_bytes: 1024 * 1024,
            max_transaction_bytes: 64 * 1024 * 1024,
            apply_timeout: Duration::from_secs(30),
            snapshot_interval_entries: 100_000,
            snapshot_interval_bytes: 256 * 1024 * 1024,
            snapshot_interval: Duration::from_secs(3600),
            snapshot_keep_entries: 10_000,
        }
    }
}

/// What the applier publishes.
#[derive(Debug, Clone, Default)]
pub struct ApplyProgress {
    /// Last log position applied to the local state.
    pub applied: u64,
    /// Why the applier stopped, if it did.
    pub failure: Option<String>,
    /// The position of the last state replacement (a committed staged
    /// recovery) this replica applied since start: everyone holding state
    /// read before it must reload.
    pub replaced_at: Option<u64>,
    /// The Raft term this replica was in when it applied that replacement.
    pub replaced_in_term: u64,
}

/// Frame pieces of one snapshot stream (`docs/snapshot-format.md`), in
/// order, through a bounded channel; an `Err` breaks the stream, and so
/// does the sender going away before the trailer.
pub type SnapshotPieces = mpsc::Receiver<std::io::Result<Bytes>>;

/// A boxed future of a [`SnapshotSource`].
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(String, SnapshotPieces), String>> + Send + 'a>>;

/// Where a replica whose state is behind its log's beginning gets a state
/// snapshot (see the module docs). The replica server's implementation
/// streams the `Snapshot` RPC of the leader or another member.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Opens one snapshot stream: returns who serves it (for log lines and
    /// errors) and its pieces. `attempt` counts the tries of one catch-up
    /// from 0, so that a source can go round its peers (one may be behind).
    fn fetch(&self, attempt: u64) -> FetchFuture<'_>;
}

/// What the store, its applier and its compaction task share.
pub(crate) struct Shared {
    pub(crate) state: StateStore,
    pub(crate) progress: watch::Sender<ApplyProgress>,
    /// Rejections of recent positions (position -> error), bounded.
    pub(crate) rejected: Mutex<BTreeMap<u64, String>>,
    pub(crate) aborted_writes: AtomicU64,
    /// Bytes of log entries applied since start (compaction by bytes).
    pub(crate) applied_bytes: AtomicU64,
    /// Log truncations this replica proposed as leader, since start.
    pub(crate) compactions: AtomicU64,
    /// State snapshots installed from a peer, since start.
    pub(crate) catch_ups: AtomicU64,
    /// This replica's staging area, cleared when its staged backup is
    /// applied as a replacement.
    pub(crate) staging: Option<Arc<crate::staging::Staging>>,
}

/// The scheduler-state store on a replicated log (see the module docs).
pub struct SchedulerStore {
    shared: Arc<Shared>,
    log: Arc<Log>,
    opts: StoreOptions,
    writer: RwLock<Option<Writer>>,
    /// The applied position when the current writer started.
    writer_started_at: AtomicU64,
    next_frame_id: AtomicU64,
    /// One recovery commit at a time.
    commit_lock: tokio::sync::Mutex<()>,
    applier: tokio::task::JoinHandle<()>,
    compactor: tokio::task::JoinHandle<()>,
}

impl SchedulerStore {
    /// Binds `state` to `log` and starts applying the log's committed
    /// entries after the state's applied position. Must run in a tokio
    /// runtime. Without a [`SnapshotSource`], an applier whose state falls
    /// behind the log's beginning stops (see [`Self::start_with_source`]).
    pub fn start(log: Arc<Log>, state: StateStore, opts: StoreOptions) -> Self {
        Self::start_with_source(log, state, opts, None)
    }

    /// Registers the store's column families ([`crate::COLUMN_FAMILIES`])
    /// in the options of the log it will run on: open the log with these,
    /// then [`Self::open`] the store on it.
    pub fn register_column_families(opts: &mut replog_log::LogOptions) {
        for name in crate::COLUMN_FAMILIES {
            if !opts.column_families.iter().any(|n| n == name) {
                opts.column_families.push(name.to_string());
            }
        }
    }

    /// Opens the scheduler state kept in `log`'s own database (the state
    /// store's column family, registered when the log was opened:
    /// [`Self::register_column_families`]) and starts the store on it, as
    /// [`Self::start`] does. Must run in a tokio runtime.
    pub fn open(log: Arc<Log>, opts: StoreOptions) -> Result<Self, StoreError> {
        Self::open_with(log, opts, None, None)
    }

    /// Like [`Self::open`], with a [`SnapshotSource`] for catch-up and this
    /// replica's staging area (see [`Self::start_with`]).
    pub fn open_with(
        log: Arc<Log>,
        opts: StoreOptions,
        source: Option<Arc<dyn SnapshotSource>>,
        staging: Option<Arc<crate::staging::Staging>>,
    ) -> Result<Self, StoreError> {
        let db = log.shared_db();
        if let Some(missing) = crate::COLUMN_FAMILIES
            .into_iter()
            .find(|name| db.cf_handle(name).is_none())
        {
            return Err(StoreError::NotRegistered(missing.to_string()));
        }
        let state = StateStore::open(db, crate::CF_STATE, replog_state::Limits::default())
            .map_err(StoreError::State)?;
        Ok(Self::start_with(log, state, opts, source, staging))
    }

    /// Like [`Self::start`]; an applier whose state is behind the log's
    /// beginning catches up from a snapshot of `source` (module docs).
    pub fn start_with_source(
        log: Arc<Log>,
        state: StateStore,
        opts: StoreOptions,
        source: Option<Arc<dyn SnapshotSource>>,
    ) -> Self {
        Self::start_with(log, state, opts, source, None)
    }

    /// Like [`Self::start_with_source`], with this replica's staging area:
    /// the applier clears it (and records the commit) when it applies the
    /// replacement of what is staged there, whoever wrote that replacement.
    pub fn start_with(
        log: Arc<Log>,
        state: StateStore,
        opts: StoreOptions,
        source: Option<Arc<dyn SnapshotSource>>,
        staging: Option<Arc<crate::staging::Staging>>,
    ) -> Self {
        let (progress, _) = watch::channel(ApplyProgress {
            applied: state.applied(),
            failure: None,
            replaced_at: None,
            replaced_in_term: 0,
        });
        let shared = Arc::new(Shared {
            state,
            progress,
            rejected: Mutex::new(BTreeMap::new()),
            aborted_writes: AtomicU64::new(0),
            applied_bytes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            staging,
        });
        let applier = tokio::spawn(
            Applier::new(
                shared.clone(),
                log.clone(),
                opts.max_transaction_bytes,
                source,
            )
            .run(),
        );
        let compactor = tokio::spawn(compaction_loop(shared.clone(), log.clone(), opts.clone()));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1); // 0 is the id of `close_framed_write`
        SchedulerStore {
            shared,
            log,
            opts,
            writer: RwLock::new(None),
            writer_started_at: AtomicU64::new(0),
            next_frame_id: AtomicU64::new(seed),
            commit_lock: tokio::sync::Mutex::new(()),
            applier,
            compactor,
        }
    }

    /// The local state, as of [`Self::applied`] (local reads).
    pub fn state(&self) -> &StateStore {
        &self.shared.state
    }

    /// The log under the store.
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The last position applied to the local state.
    pub fn applied(&self) -> u64 {
        self.shared.progress.borrow().applied
    }

    /// Progress of the applier, to watch.
    pub fn watch_applied(&self) -> watch::Receiver<ApplyProgress> {
        self.shared.progress.subscribe()
    }

    /// Framed writes that never completed, seen since start.
    pub fn aborted_writes(&self) -> u64 {
        self.shared.aborted_writes.load(Ordering::Relaxed)
    }

    /// Log truncations this replica proposed as leader since start.
    pub fn compactions(&self) -> u64 {
        self.shared.compactions.load(Ordering::Relaxed)
    }

    /// State snapshots this replica installed from a peer since start.
    pub fn snapshot_catch_ups(&self) -> u64 {
        self.shared.catch_ups.load(Ordering::Relaxed)
    }

    /// Waits until the local state has applied `position`.
    pub async fn wait_applied(&self, position: u64) -> Result<(), StoreError> {
        tokio::time::timeout(
            self.opts.apply_timeout,
            self.wait_applied_unbounded(position),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.opts.apply_timeout))?
    }

    /// Waits, however long it takes, until the local state has applied
    /// `position` (or the applier stopped). For a state replacement that is
    /// already in the log: it will be applied, and what follows it (clearing
    /// the staging area, stepping down) must not be skipped because a large
    /// state takes longer than [`StoreOptions::apply_timeout`] to install.
    async fn wait_applied_unbounded(&self, position: u64) -> Result<(), StoreError> {
        let mut rx = self.shared.progress.subscribe();
        let wait = async {
            loop {
                {
                    let p = rx.borrow_and_update();
                    if p.applied >= position {
                        return Ok(());
                    }
                    if let Some(f) = &p.failure {
                        return Err(StoreError::Stopped(f.clone()));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(StoreError::Stopped("the store was closed".into()));
                }
            }
        };
        wait.await
    }

    /// Waits until the local state reflects every write committed before
    /// this call anywhere in the cluster (a linearizable read point), then
    /// returns that position. Reads of [`Self::state`] after it see them.
    pub async fn sync_for_read(&self) -> Result<u64, StoreError> {
        let at = self.log.linearizable_ending().await?.value();
        self.wait_applied(at).await?;
        Ok(at)
    }

    /// Makes this replica the writer (waits for leadership; see
    /// [`Writer::start`]), closes any framed write an earlier writer left
    /// open ([`crate::record::close_framed_write`]: without it the applied
    /// position would wait before that write's beginning until the next
    /// write, and this wait with it), and waits until the state applied
    /// everything committed before. Returns that position (the closing
    /// record's).
    pub async fn start_writer(&self) -> Result<u64, StoreError> {
        let mut w = self.log.writer();
        w.start().await?;
        let at = w.append(crate::record::close_framed_write()).await?.value();
        self.wait_applied(at).await?;
        self.writer_started_at
            .store(self.applied(), Ordering::SeqCst);
        *self.writer.write().await = Some(w);
        Ok(at)
    }

    /// The writer of the current term: the one started, or a new one when
    /// this replica leads (again) in a later term. A writer of an ended
    /// term is never reused: its appends fail with `LeadershipLost`.
    async fn ensure_writer(&self) -> Result<(), StoreError> {
        let (replaced, replaced_in_term) = {
            let p = self.shared.progress.borrow();
            (p.replaced_at, p.replaced_in_term)
        };
        if let Some(position) = replaced {
            if position > self.writer_started_at.load(Ordering::SeqCst) {
                let mut guard = self.writer.write().await;
                if let Some(w) = guard.take() {
                    // Once per writer that was live when the state was
                    // replaced: the next submit starts a new one. A writer
                    // whose term ended before the replacement belongs to a
                    // leadership already lost (the leadership watch said
                    // so) and is dropped quietly.
                    if w.term().is_some_and(|t| t >= replaced_in_term) {
                        return Err(StoreError::StateReplaced { position });
                    }
                }
            }
        }
        let p = self.log.progress();
        if let Some(w) = self.writer.read().await.as_ref() {
            if w.term() == Some(p.term) {
                return Ok(());
            }
        }
        if !p.leader_ready {
            return Err(LogError::NotLeader { leader: p.leader }.into());
        }
        self.start_writer().await.map(|_| ())
    }

    /// Writes `txn` through the log and waits until the local state applied
    /// it; returns its position. A transaction a state check rejects is in
    /// the log but changed nothing: [`StoreError::Rejected`].
    pub async fn submit(&self, txn: &Transaction) -> Result<u64, StoreError> {
        StateStore::validate(txn, self.shared.state.limits()).map_err(StoreError::Invalid)?;
        self.ensure_writer().await?;
        let id = self.next_frame_id.fetch_add(1, Ordering::Relaxed);
        let entries = encode_transaction(
            txn,
            id,
            self.opts.max_entry_bytes,
            self.opts.max_transaction_bytes,
        )?;
        let position = if entries.len() == 1 {
            // Single entries may go concurrently.
            let guard = self.writer.read().await;
            let w = guard.as_ref().ok_or(LogError::WriterNotStarted)?;
            w.append(entries.into_iter().next().expect("one entry"))
                .await?
                .value()
        } else {
            // A framed write must not be interleaved with other writes of
            // this store (that would abort it): hold the writer alone.
            let guard = self.writer.write().await;
            let w = guard.as_ref().ok_or(LogError::WriterNotStarted)?;
            let mut last = Position::new(0);
            for e in entries {
                match w.append(e).await {
                    Ok(p) => last = p,
                    Err(e) => return Err(close_after_failed_frame(w, e.into()).await),
                }
            }
            last.value()
        };
        self.wait_applied(position).await?;
        if let Some(reason) = self.shared.rejected.lock().get(&position) {
            return Err(StoreError::Rejected {
                position,
                reason: reason.clone(),
            });
        }
        Ok(position)
    }

    /// Commits the staged recovery: replicates the staged state through the
    /// log as one framed state replacement, waits until this replica
    /// applied it (every replica swaps its whole state at that one
    /// position), clears the staging area, and steps down as leader so the
    /// scheduler fails over and reloads. Returns the position of the swap.
    pub async fn commit_recovery(
        &self,
        staging: &Arc<crate::staging::Staging>,
    ) -> Result<u64, StoreError> {
        self.commit_staged(staging, true).await
    }

    /// Commits the backup a new log was founded from (`replog initialize
    /// --from-backup`): like [`Self::commit_recovery`], but nobody held
    /// state before it, so nobody fails over: the leader keeps leading and
    /// its writer goes on.
    pub async fn commit_restored(
        &self,
        staging: &Arc<crate::staging::Staging>,
    ) -> Result<u64, StoreError> {
        self.commit_staged(staging, false).await
    }

    async fn commit_staged(
        &self,
        staging: &Arc<crate::staging::Staging>,
        fail_over: bool,
    ) -> Result<u64, StoreError> {
        let _one_at_a_time = self.commit_lock.lock().await;
        self.ensure_writer().await?;
        // Apply everything committed before looking at the staging area: a
        // replacement of this very staging that an earlier attempt got
        // into the log (its answer lost with a leader change) has then
        // cleared it, and is not written twice.
        self.sync_for_read().await?;
        let staged = staging
            .staged()?
            .ok_or(crate::staging::StagingError::NothingStaged)?;
        let staging_id = staged.staging_id().to_string();
        let meta = self.log.meta();
        let id = crate::backup::SnapshotIdentity {
            cluster_id: meta.cluster_id.clone(),
            term: self.log.progress().term,
            voters: meta.conf_state.voters.clone(),
            learners: meta.conf_state.learners.clone(),
            labels: staged.header.labels.clone().into_iter().collect(),
        };
        // Spool the staged state to a file (constant memory), then append it
        // in parts.
        let path = self
            .log
            .path()
            .join(format!("commit-recovery-{}.snapshot", std::process::id()));
        let (total, crc) = {
            let path = path.clone();
            let staging = staging.clone();
            tokio::task::spawn_blocking(move || -> Result<(u64, u32), StoreError> {
                let f = std::fs::File::create(&path).map_err(|e| StoreError::Io(e.to_string()))?;
                let w = CrcWriter {
                    inner: std::io::BufWriter::with_capacity(1 << 20, f),
                    crc: 0,
                    bytes: 0,
                };
                let (w, _) = crate::backup::write_state(staging.state(), &id, w, |_| {})
                    .map_err(|e| StoreError::Io(e.to_string()))?;
                w.inner
                    .into_inner()
                    .map_err(|e| StoreError::Io(e.into_error().to_string()))?;
                Ok((w.bytes, w.crc))
            })
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??
        };
        let result = self.append_replacement(&path, total, crc).await;
        let _ = std::fs::remove_file(&path);
        let position = result?;
        // The replacement is in the log: wait for it whatever its size.
        self.wait_applied_unbounded(position).await?;
        // The applier cleared an attached staging area; this one may not be.
        if staging
            .staged()?
            .is_some_and(|s| s.staging_id() == staging_id)
        {
            staging.clear()?;
        }
        if !fail_over {
            self.writer_started_at.store(position, Ordering::SeqCst);
            return Ok(position);
        }
        // Step down: the scheduler on this host fails over and reloads.
        let me = meta.replica_id;
        if let Some(other) = self
            .log
            .meta()
            .conf_state
            .voters
            .iter()
            .copied()
            .find(|v| *v != me)
        {
            if let Err(e) = self.log.transfer_leader(other) {
                warn!(error = %e, to = other, "could not hand leadership over after the recovery commit");
            }
        }
        Ok(position)
    }

    async fn append_replacement(
        &self,
        path: &std::path::Path,
        total: u64,
        crc: u32,
    ) -> Result<u64, StoreError> {
        let part_bytes = crate::record::part_bytes(self.opts.max_entry_bytes)?;
        let parts = total.div_ceil(part_bytes as u64).max(1) as u32;
        let id = self.next_frame_id.fetch_add(1, Ordering::Relaxed);
        let guard = self.writer.write().await;
        let w = guard.as_ref().ok_or(LogError::WriterNotStarted)?;
        w.append(crate::record::framed_begin(
            id,
            replog_proto::store::FramedKind::StateReplacement,
            total,
            crc,
            parts,
        ))
        .await?;
        match append_parts_from_file(w, id, path, part_bytes, parts).await {
            Ok(last) => Ok(last.value()),
            Err(e) => Err(close_after_failed_frame(w, e).await),
        }
    }

    /// Stops the applier (it lets go of the log once its task ends; see
    /// [`Self::shutdown`] to wait for that).
    pub fn close(&self) {
        self.applier.abort();
        self.compactor.abort();
    }

    /// Stops the applier and waits until it let go of the log, so that the
    /// replica's directory can be opened again once the store is dropped.
    pub async fn shutdown(mut self) {
        self.applier.abort();
        self.compactor.abort();
        let _ = (&mut self.applier).await;
        let _ = (&mut self.compactor).await;
    }
}

impl Drop for SchedulerStore {
    fn drop(&mut self) {
        self.applier.abort();
        self.compactor.abort();
    }
}

/// Appends the `parts` parts of framed write `id` from the file at `path`,
/// `part_bytes` each (the last one shorter); returns the last's position.
async fn append_parts_from_file(
    w: &Writer,
    id: u64,
    path: &std::path::Path,
    part_bytes: usize,
    parts: u32,
) -> Result<Position, StoreError> {
    use std::io::Read;
    let io = |e: std::io::Error| StoreError::Io(e.to_string());
    let mut f = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut last = Position::new(0);
    for index in 0..parts {
        let mut buf = vec![0u8; part_bytes];
        let mut n = 0;
        while n < part_bytes {
            let k = f.read(&mut buf[n..]).map_err(io)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        buf.truncate(n);
        last = w
            .append(crate::record::framed_part(id, index, buf.into()))
            .await?;
    }
    assert!(parts == 0 || last.value() > 0, "every part was appended");
    Ok(last)
}

/// A framed write failed between its parts (`error`): closes it
/// ([`crate::record::close_framed_write`]) so that the applied position
/// moves on, when `w` still can write (a writer whose leadership ended
/// cannot: the next writer closes it when it starts). Returns `error`.
async fn close_after_failed_frame(w: &Writer, error: StoreError) -> StoreError {
    if let Err(e) = w.append(crate::record::close_framed_write()).await {
        debug!(error = %e, "could not close the failed framed write; the next writer will");
    }
    error
}

/// How often the compaction task looks at the clock when nothing is
/// applied.
const COMPACTION_CHECK: Duration = Duration::from_secs(1);

/// The leader's side of compaction (see the module docs): counts what was
/// applied since the last compaction and, when an interval is reached and
/// this replica is the leader, flushes the state and truncates the log.
async fn compaction_loop(shared: Arc<Shared>, log: Arc<Log>, opts: StoreOptions) {
    let mut applied_rx = shared.progress.subscribe();
    let check = opts
        .snapshot_interval
        .clamp(Duration::from_millis(10), COMPACTION_CHECK);
    let mut compactor = Compactor::new(shared, log, opts);
    loop {
        // Woken by the applier's progress, or by the clock (time interval).
        if let Ok(Err(_)) = tokio::time::timeout(check, applied_rx.changed()).await {
            return; // the store is gone
        }
        compactor.compact_if_due().await;
    }
}

/// Which interval made a compaction due.
#[derive(Debug, Clone, Copy)]
enum CompactionReason {
    Entries,
    Bytes,
    Time,
}

impl CompactionReason {
    fn as_str(self) -> &'static str {
        match self {
            CompactionReason::Entries => "entries",
            CompactionReason::Bytes => "bytes",
            CompactionReason::Time => "time",
        }
    }
}

/// The compaction task's state.
struct Compactor {
    shared: Arc<Shared>,
    log: Arc<Log>,
    reader: Reader,
    opts: StoreOptions,
    /// The applied position, bytes of applied entries and time when the
    /// intervals were last reached (or the task started).
    base_applied: u64,
    base_applied_bytes: u64,
    base_time: Instant,
    /// The writer of the last compaction, kept while its term lasts.
    writer: Option<Writer>,
}

impl Compactor {
    fn new(shared: Arc<Shared>, log: Arc<Log>, opts: StoreOptions) -> Self {
        Compactor {
            base_applied: shared.state.applied(),
            base_applied_bytes: shared.applied_bytes.load(Ordering::Relaxed),
            base_time: Instant::now(),
            reader: log.reader(),
            shared,
            log,
            opts,
            writer: None,
        }
    }

    /// Compacts the log if this replica leads and an interval is reached:
    /// flushes the state, then truncates the log to `applied -
    /// snapshot_keep_entries`.
    async fn compact_if_due(&mut self) {
        let p = self.log.progress();
        if !p.leader_ready {
            return;
        }
        let applied = self.shared.state.applied();
        let Some(reason) = self.interval_reached(applied) else {
            return;
        };
        let to = applied.saturating_sub(self.opts.snapshot_keep_entries);
        let beginning = self.reader.beginning().value();
        if to <= beginning {
            debug!(
                applied,
                beginning, "nothing to compact yet: the log holds only the kept tail"
            );
            return;
        }
        // The state must be durable past the truncation point: the log will
        // no longer hold those entries.
        let Some(flushed) = self.flush_state().await else {
            return;
        };
        assert!(
            to - 1 <= flushed,
            "compaction to {to} past the durable state ({flushed})"
        );
        let Some(w) = self.writer_of_term(p.term).await else {
            return;
        };
        match w.truncate(Position::new(to)).await {
            Ok(at) => {
                self.shared.compactions.fetch_add(1, Ordering::Relaxed);
                info!(
                    truncated_to = to,
                    applied,
                    flushed,
                    kept = self.opts.snapshot_keep_entries,
                    entry = at.value(),
                    reason = reason.as_str(),
                    "compacted the state log: the state is durable, positions before truncated_to are dropped"
                );
            }
            Err(e) => {
                warn!(error = %e, to, "compacting the log failed");
                self.writer = None;
            }
        }
    }

    /// The interval reached since the last one, if any (entries first, then
    /// bytes, then time); counting then starts again from `applied`.
    fn interval_reached(&mut self, applied: u64) -> Option<CompactionReason> {
        let applied_bytes = self.shared.applied_bytes.load(Ordering::Relaxed);
        let opts = &self.opts;
        let reason = if applied.saturating_sub(self.base_applied) >= opts.snapshot_interval_entries
        {
            CompactionReason::Entries
        } else if applied_bytes.saturating_sub(self.base_applied_bytes)
            >= opts.snapshot_interval_bytes
        {
            CompactionReason::Bytes
        } else if self.base_time.elapsed() >= opts.snapshot_interval && applied > self.base_applied
        {
            CompactionReason::Time
        } else {
            return None;
        };
        self.base_applied = applied;
        self.base_applied_bytes = applied_bytes;
        self.base_time = Instant::now();
        Some(reason)
    }

    /// Makes the state durable (an fsync of the WAL, off the runtime's
    /// threads); returns the applied position the flush covered, or `None`
    /// (logged) when it failed.
    async fn flush_state(&self) -> Option<u64> {
        let shared = self.shared.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            let at = shared.state.applied();
            shared.state.flush().map(|_| at)
        })
        .await;
        match flushed {
            Ok(Ok(at)) => Some(at),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot flush the state; the log is not compacted");
                None
            }
            Err(e) => {
                warn!(error = %e, "the state flush panicked; the log is not compacted");
                None
            }
        }
    }

    /// A writer of `term`: the one kept, or a new one; `None` (logged) when
    /// none could be started.
    async fn writer_of_term(&mut self, term: u64) -> Option<&Writer> {
        if self.writer.as_ref().and_then(Writer::term) != Some(term) {
            let mut w = self.log.writer();
            if let Err(e) = w.start().await {
                warn!(error = %e, "cannot start a writer to compact the log");
                self.writer = None;
                return None;
            }
            self.writer = Some(w);
        }
        self.writer.as_ref()
    }
}

/// A writer that counts and checksums what passes through it.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
