//! [`SchedulerStore`]: the state store bound to a replicated log.
//!
//! One applier task per store reads the log's committed entries in order,
//! reassembles framed transactions ([`crate::record`]) and applies them to
//! the local [`StateStore`]. Writers submit transactions through the log's
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use replog_log::{Log, LogError, Position, Reader, Writer};
use replog_proto::state::Transaction;
use replog_state::{Applied, StateError, StateStore};
use tokio::sync::{watch, RwLock};
use tracing::{debug, error, warn};

use crate::record::{decode_record, encode_transaction, Assembled, Reassembler, RecordError};

/// Outcomes of this many recent positions are kept for their submitters.
pub const RESULT_SLOTS: usize = 65_536;
/// The position of the snapshot `initialize` founds a log with: nothing
/// before it, no state in it.
const FOUNDING_POSITION: u64 = 1;
/// Entries read from the log per page.
const PAGE: u64 = 4096;

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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_entry_bytes: 1024 * 1024,
            max_transaction_bytes: 64 * 1024 * 1024,
            apply_timeout: Duration::from_secs(30),
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
}

struct Shared {
    state: StateStore,
    progress: watch::Sender<ApplyProgress>,
    /// Rejections of recent positions (position -> error), bounded.
    rejected: Mutex<BTreeMap<u64, String>>,
    aborted_writes: AtomicU64,
}

/// The scheduler-state store on a replicated log (see the module docs).
pub struct SchedulerStore {
    shared: Arc<Shared>,
    log: Arc<Log>,
    opts: StoreOptions,
    writer: RwLock<Option<Writer>>,
    next_frame_id: AtomicU64,
    applier: tokio::task::JoinHandle<()>,
}

impl SchedulerStore {
    /// Binds `state` to `log` and starts applying the log's committed
    /// entries after the state's applied position. Must run in a tokio
    /// runtime.
    pub fn start(log: Arc<Log>, state: StateStore, opts: StoreOptions) -> Self {
        let (progress, _) = watch::channel(ApplyProgress {
            applied: state.applied(),
            failure: None,
        });
        let shared = Arc::new(Shared {
            state,
            progress,
            rejected: Mutex::new(BTreeMap::new()),
            aborted_writes: AtomicU64::new(0),
        });
        let applier = tokio::spawn(apply_loop(
            shared.clone(),
            log.reader(),
            log.watch_leadership(),
            opts.max_transaction_bytes,
        ));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        SchedulerStore {
            shared,
            log,
            opts,
            writer: RwLock::new(None),
            next_frame_id: AtomicU64::new(seed),
            applier,
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

    /// Waits until the local state has applied `position`.
    pub async fn wait_applied(&self, position: u64) -> Result<(), StoreError> {
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
        tokio::time::timeout(self.opts.apply_timeout, wait)
            .await
            .map_err(|_| StoreError::Timeout(self.opts.apply_timeout))?
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
    /// [`Writer::start`]) and waits until the state applied everything
    /// committed before. Returns that position.
    pub async fn start_writer(&self) -> Result<u64, StoreError> {
        let mut w = self.log.writer();
        let at = w.start().await?.value();
        *self.writer.write().await = Some(w);
        self.wait_applied(at).await?;
        Ok(at)
    }

    /// The writer of the current term: the one started, or a new one when
    /// this replica leads (again) in a later term. A writer of an ended
    /// term is never reused: its appends fail with `LeadershipLost`.
    async fn ensure_writer(&self) -> Result<(), StoreError> {
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
                last = w.append(e).await?;
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

    /// Stops the applier.
    pub fn close(&self) {
        self.applier.abort();
    }
}

impl Drop for SchedulerStore {
    fn drop(&mut self) {
        self.applier.abort();
    }
}

async fn apply_loop(
    shared: Arc<Shared>,
    reader: Reader,
    mut log_progress: watch::Receiver<replog_log::Progress>,
    max_transaction_bytes: usize,
) {
    let mut reassembler = Reassembler::new(max_transaction_bytes);
    // Next position to read; the state applied everything before it.
    let mut next = shared.state.applied() + 1;
    let fail = |why: String| {
        error!(reason = %why, "the state applier stopped");
        shared.progress.send_modify(|p| p.failure = Some(why));
    };
    loop {
        // A log as `initialize` made it begins after its founding snapshot
        // (position 1), which holds no state: an empty state starts there.
        let beginning = reader.beginning().value();
        if next < beginning && beginning <= FOUNDING_POSITION + 1 {
            next = beginning;
        }
        let ending = reader.ending().value();
        if ending < next {
            if log_progress.changed().await.is_err() {
                return;
            }
            continue;
        }
        let to = ending.min(next + PAGE - 1);
        let entries = match reader.read(Position::new(next), Position::new(to)) {
            Ok(e) => e,
            Err(LogError::Truncated { beginning, .. }) => {
                fail(format!(
                    "the local state stops at position {} but the log now begins at {beginning}: \
                     this replica needs a state snapshot from a peer",
                    next - 1
                ));
                return;
            }
            Err(e) => {
                fail(format!("reading the log at {next}..={to}: {e}"));
                return;
            }
        };
        let mut outcomes = Vec::new();
        for entry in entries {
            let position = entry.position.value();
            match decode_record(position, &entry.data) {
                Ok(rec) => reassembler.push(position, rec, &mut outcomes),
                Err(e) => warn!(error = %e, "skipping a log entry that is not a store record"),
            }
            for o in outcomes.drain(..) {
                match o {
                    Assembled::Apply { position, txn } => {
                        match shared.state.apply(position, &txn) {
                            Ok(Applied::Done { .. }) => {}
                            Ok(Applied::Rejected(e)) => {
                                debug!(position, reason = %e, "transaction rejected by a state check");
                                let mut r = shared.rejected.lock();
                                r.insert(position, e.to_string());
                                while r.len() > RESULT_SLOTS {
                                    r.pop_first();
                                }
                            }
                            Err(e) => {
                                fail(format!("applying position {position}: {e}"));
                                return;
                            }
                        }
                    }
                    Assembled::Aborted {
                        id,
                        begun_at,
                        reason,
                    } => {
                        shared.aborted_writes.fetch_add(1, Ordering::Relaxed);
                        warn!(id, begun_at, %reason, "skipping an aborted framed write");
                    }
                }
            }
        }
        // Everything up to `to` is applied, except a framed write still in
        // progress: the applied position stays before its beginning so a
        // restart reads it whole.
        let durable_to = match reassembler.begun_at() {
            Some(b) => b - 1,
            None => to,
        };
        if durable_to > shared.state.applied() {
            if let Err(e) = shared.state.skip_to(durable_to) {
                fail(format!("recording applied position {durable_to}: {e}"));
                return;
            }
        }
        let applied = shared.state.applied();
        shared.progress.send_if_modified(|p| {
            let changed = p.applied != applied;
            p.applied = applied;
            changed
        });
        next = to + 1;
    }
}
