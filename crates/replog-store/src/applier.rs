//! The applier: the one task per store that reads the log's committed
//! entries in order, reassembles framed writes ([`crate::record`]) and
//! applies them to the local state, catching up from a peer's state
//! snapshot when its next position was truncated (see the module docs of
//! [`crate::store`]).
//!
//! One turn of [`Applier::run`] reads a page of the log
//! ([`Applier::read_page`]), applies each entry ([`Applier::apply_entry`]:
//! decode, reassemble, apply a transaction, or receive and perform a whole
//! state replacement) and then advances the applied position
//! ([`Applier::advance_applied`]). Every reason to stop is an
//! [`ApplyStop`], reported in one place ([`Applier::run`]).
//!
//! Invariants:
//! - the state's applied position only moves forward; it stays before the
//!   beginning of a framed write still in progress, so a restart re-reads
//!   that write whole (asserted in `advance_applied`);
//! - a state replacement is spooled to a file in the replica's directory,
//!   never held in memory, and its spool is removed once applied, aborted
//!   or superseded by a snapshot;
//! - the state is flushed before the applier moves past a log beginning it
//!   has not flushed for (the store's durability invariant).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replog_log::{Log, LogEntry, LogError, Position, Reader};
use replog_proto::state::Transaction;
use replog_state::{Applied, StateError};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::record::{decode_record, Assembled, Reassembler, RecordError};
use crate::store::{Shared, SnapshotPieces, SnapshotSource, FOUNDING_POSITION, RESULT_SLOTS};

/// Entries read from the log per page.
const PAGE_ENTRIES: u64 = 4096;

/// First pause between catch-up attempts; it doubles up to
/// [`CATCH_UP_MAX_BACKOFF`].
const CATCH_UP_BACKOFF: Duration = Duration::from_millis(100);
const CATCH_UP_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why the applier stopped. The store serves no more; the reason is
/// published in [`crate::ApplyProgress::failure`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyStop {
    #[error(
        "the local state stops at position {applied} but the log now begins at {beginning}: \
         this replica needs a state snapshot from a peer"
    )]
    NeedsSnapshot { applied: u64, beginning: u64 },
    #[error("reading the log at {from}..={to}: {source}")]
    Read {
        from: u64,
        to: u64,
        source: LogError,
    },
    /// Applying it would drop what this build does not know and diverge
    /// from the upgraded replicas.
    #[error(transparent)]
    NewerSchema(RecordError),
    #[error("applying position {position}: {source}")]
    Apply { position: u64, source: StateError },
    #[error("cannot spool the state replacement: {0}")]
    Spool(std::io::Error),
    #[error("a part of replacement {id} without its spool")]
    PartWithoutSpool { id: u64 },
    #[error("replacement {id} completed without its spool")]
    ReplacementWithoutSpool { id: u64 },
    #[error("replacing the state at position {position}: {reason}")]
    Replace { position: u64, reason: String },
    #[error("recording applied position {position}: {source}")]
    RecordApplied { position: u64, source: StateError },
    #[error("flushing the state at {applied}: {source}")]
    Flush { applied: u64, source: StateError },
}

/// The applier's state between turns (see the module docs).
pub(crate) struct Applier {
    shared: Arc<Shared>,
    log: Arc<Log>,
    reader: Reader,
    source: Option<Arc<dyn SnapshotSource>>,
    max_transaction_bytes: usize,
    /// Changes whenever the log's progress does: the applier waits on it
    /// when it has applied everything committed.
    log_progress: watch::Receiver<replog_log::Progress>,
    /// The state is durable up to here (what a restart found, or the last
    /// flush): see the durability invariant of [`crate::store`].
    flushed: u64,
    /// Next position to read; the state applied everything before it.
    next: u64,
    reassembler: Reassembler,
    /// The state replacement being received, if any.
    spool: Option<Spool>,
}

impl Applier {
    pub(crate) fn new(
        shared: Arc<Shared>,
        log: Arc<Log>,
        max_transaction_bytes: usize,
        source: Option<Arc<dyn SnapshotSource>>,
    ) -> Applier {
        Spool::remove_stale(log.path());
        let applied = shared.state.applied();
        Applier {
            reader: log.reader(),
            log_progress: log.watch_progress(),
            shared,
            log,
            source,
            max_transaction_bytes,
            flushed: applied,
            next: applied + 1,
            reassembler: Reassembler::new(max_transaction_bytes),
            spool: None,
        }
    }

    /// Applies until the log closes, or until a reason to stop, which it
    /// logs and publishes.
    pub(crate) async fn run(mut self) {
        if let Err(stop) = self.apply_until_closed().await {
            let why = stop.to_string();
            error!(reason = %why, "the state applier stopped");
            self.shared.progress.send_modify(|p| p.failure = Some(why));
        }
    }

    async fn apply_until_closed(&mut self) -> Result<(), ApplyStop> {
        loop {
            self.skip_founding_snapshot();
            let ending = self.reader.ending().value();
            if ending < self.next {
                if self.log_progress.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            let to = ending.min(self.next + PAGE_ENTRIES - 1);
            let Some(entries) = self.read_page(to).await? else {
                continue;
            };
            for entry in entries {
                self.apply_entry(entry).await?;
            }
            self.advance_applied(to)?;
        }
    }

    /// A log as `initialize` made it begins after its founding snapshot
    /// (position 1), which holds no state: an empty state starts there.
    fn skip_founding_snapshot(&mut self) {
        let beginning = self.reader.beginning().value();
        if self.next < beginning && beginning <= FOUNDING_POSITION + 1 {
            self.next = beginning;
        }
    }

    /// The committed entries `next..=to`; `None` when they were truncated
    /// and the state caught up from a peer's snapshot instead (the next
    /// turn reads on from the snapshot's position).
    async fn read_page(&mut self, to: u64) -> Result<Option<Vec<LogEntry>>, ApplyStop> {
        match self
            .reader
            .read(Position::new(self.next), Position::new(to))
        {
            Ok(entries) => Ok(Some(entries)),
            Err(LogError::Truncated { beginning, .. }) => {
                self.catch_up_from_peer(beginning.value()).await?;
                Ok(None)
            }
            Err(source) => Err(ApplyStop::Read {
                from: self.next,
                to,
                source,
            }),
        }
    }

    async fn catch_up_from_peer(&mut self, beginning: u64) -> Result<(), ApplyStop> {
        let applied = self.next - 1;
        let Some(source) = self.source.clone() else {
            return Err(ApplyStop::NeedsSnapshot { applied, beginning });
        };
        let position = catch_up(&self.shared, &self.log, &source, applied).await;
        assert!(
            position >= applied,
            "a snapshot catch-up never moves the state back ({position} < {applied})"
        );
        // Whatever was being reassembled is part of the snapshot now (a
        // snapshot's position is never inside a framed write).
        self.reassembler = Reassembler::new(self.max_transaction_bytes);
        if let Some(s) = self.spool.take() {
            s.discard();
        }
        self.flushed = position; // replace_all syncs the WAL
        self.shared.progress.send_modify(|p| p.applied = position);
        self.next = position + 1;
        Ok(())
    }

    /// Decodes one entry and applies what it completes.
    async fn apply_entry(&mut self, entry: LogEntry) -> Result<(), ApplyStop> {
        let position = entry.position.value();
        self.shared
            .applied_bytes
            .fetch_add(entry.data.len() as u64, Ordering::Relaxed);
        let mut assembled = Vec::new();
        match decode_record(position, &entry.data) {
            Ok(rec) => self.reassembler.push(position, rec, &mut assembled),
            Err(e @ RecordError::NewerSchema { .. }) => return Err(ApplyStop::NewerSchema(e)),
            Err(e) => warn!(error = %e, "skipping a log entry that is not a store record"),
        }
        for a in assembled {
            self.apply_assembled(a).await?;
        }
        Ok(())
    }

    async fn apply_assembled(&mut self, assembled: Assembled) -> Result<(), ApplyStop> {
        match assembled {
            Assembled::Apply { position, txn } => self.apply_transaction(position, &txn),
            Assembled::Aborted {
                id,
                begun_at,
                reason,
            } => {
                self.shared.aborted_writes.fetch_add(1, Ordering::Relaxed);
                warn!(id, begun_at, %reason, "skipping an aborted framed write");
                if let Some(s) = self.spool.take() {
                    s.discard();
                }
                Ok(())
            }
            Assembled::ReplaceBegin {
                id,
                begun_at,
                total_bytes,
            } => {
                info!(id, begun_at, total_bytes, "a state replacement begins");
                self.spool = Some(Spool::create(self.log.path(), id).map_err(ApplyStop::Spool)?);
                Ok(())
            }
            Assembled::ReplacePart { id, data } => {
                let Some(s) = self.spool.as_mut().filter(|s| s.id == id) else {
                    return Err(ApplyStop::PartWithoutSpool { id });
                };
                s.write(&data).map_err(ApplyStop::Spool)
            }
            Assembled::Replace { id, position } => self.replace_state(id, position).await,
        }
    }

    /// Applies a transaction; a rejection by a state check is an outcome
    /// (the same on every replica), kept for its submitter.
    fn apply_transaction(&self, position: u64, txn: &Transaction) -> Result<(), ApplyStop> {
        match self.shared.state.apply(position, txn) {
            Ok(Applied::Done { .. }) => Ok(()),
            Ok(Applied::Rejected(e)) => {
                debug!(position, reason = %e, "transaction rejected by a state check");
                let mut r = self.shared.rejected.lock();
                r.insert(position, e.to_string());
                while r.len() > RESULT_SLOTS {
                    r.pop_first();
                }
                Ok(())
            }
            Err(source) => Err(ApplyStop::Apply { position, source }),
        }
    }

    /// Replaces the whole state with the spooled replacement `id`, at
    /// `position` (a committed staged recovery).
    async fn replace_state(&mut self, id: u64, position: u64) -> Result<(), ApplyStop> {
        let Some(spool) = self.spool.take().filter(|s| s.id == id) else {
            return Err(ApplyStop::ReplacementWithoutSpool { id });
        };
        let shared = self.shared.clone();
        let header =
            tokio::task::spawn_blocking(move || load_replacement(&shared, spool, position))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|reason| ApplyStop::Replace { position, reason })?;
        warn!(
            position,
            backup_position = header.position,
            cluster = %header.cluster_id,
            "the whole state was replaced (a staged recovery was committed); everyone must reload"
        );
        let term = self.log.progress().term;
        self.shared.progress.send_modify(|p| {
            p.applied = position;
            p.replaced_at = Some(position);
            p.replaced_in_term = term;
        });
        Ok(())
    }

    /// Everything up to `to` is applied, except a framed write still in
    /// progress: the applied position stays before its beginning so a
    /// restart reads it whole. Flushes the state when the log's beginning
    /// passed what it last flushed, and publishes the applied position.
    fn advance_applied(&mut self, to: u64) -> Result<(), ApplyStop> {
        let durable_to = match self.reassembler.begun_at() {
            Some(b) => b - 1,
            None => to,
        };
        assert!(
            durable_to <= to,
            "the applied position never passes what was read"
        );
        if durable_to > self.shared.state.applied() {
            self.shared
                .state
                .skip_to(durable_to)
                .map_err(|source| ApplyStop::RecordApplied {
                    position: durable_to,
                    source,
                })?;
        }
        let applied = self.shared.state.applied();
        // The log dropped positions past what the state last flushed:
        // flush now (the shared WAL already orders the state's writes
        // before the truncation; this keeps the invariant explicit and
        // cheap).
        if self.reader.beginning().value().saturating_sub(1) > self.flushed {
            self.shared
                .state
                .flush()
                .map_err(|source| ApplyStop::Flush { applied, source })?;
            self.flushed = applied;
        }
        self.shared.progress.send_if_modified(|p| {
            let changed = p.applied != applied;
            p.applied = applied;
            changed
        });
        self.next = to + 1;
        Ok(())
    }
}

/// Loads a finished spool into the state at `position`; clears this
/// replica's staging area first when the replacement is what it staged
/// (from here on the log holds it). Blocking.
fn load_replacement(
    shared: &Shared,
    spool: Spool,
    position: u64,
) -> Result<replog_snapshot::SnapshotHeader, String> {
    let path = spool.finish()?;
    if let Some(staging) = &shared.staging {
        let header = crate::backup::header_of(&path).map_err(|e| e.to_string())?;
        if staging
            .on_replacement(&header, position)
            .map_err(|e| e.to_string())?
        {
            info!(
                position,
                "the backup staged here was committed; the staging area is cleared"
            );
        }
    }
    let r = crate::backup::load_into(&shared.state, &path, position, None);
    let _ = std::fs::remove_file(&path);
    r.map_err(|e| e.to_string())
}

/// Fetches and installs a peer's state snapshot until one works; returns
/// its position (>= the log's beginning - 1 when it was fetched).
async fn catch_up(
    shared: &Arc<Shared>,
    log: &Arc<Log>,
    source: &Arc<dyn SnapshotSource>,
    behind: u64,
) -> u64 {
    let reader = log.reader();
    let mut backoff = CATCH_UP_BACKOFF;
    let mut attempt = 0u64;
    loop {
        let beginning = reader.beginning().value();
        warn!(
            applied = behind,
            log_beginning = beginning,
            attempt,
            "the local state is behind the log's beginning: catching up from a peer's state snapshot"
        );
        let started = Instant::now();
        let result = match source.fetch(attempt).await {
            Ok((peer, pieces)) => install_snapshot(
                shared,
                log,
                peer.clone(),
                pieces,
                beginning.saturating_sub(1),
            )
            .await
            .map(|position| (peer, position)),
            Err(e) => Err(e),
        };
        match result {
            Ok((peer, position)) => {
                shared.catch_ups.fetch_add(1, Ordering::Relaxed);
                info!(
                    %peer,
                    position,
                    elapsed = ?started.elapsed(),
                    "caught up by a streamed state snapshot"
                );
                return position;
            }
            Err(e) => {
                warn!(error = %e, attempt, retry_in = ?backoff, "a state snapshot catch-up failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(CATCH_UP_MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

/// Reads one snapshot stream and loads it whole into the state, or changes
/// nothing. `needed`: the lowest position the snapshot may be of.
async fn install_snapshot(
    shared: &Arc<Shared>,
    log: &Arc<Log>,
    peer: String,
    mut pieces: SnapshotPieces,
    needed: u64,
) -> Result<u64, String> {
    let cluster = log.meta().cluster_id;
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let path = PathBuf::from(format!("<state snapshot of {peer}>"));
        let piece_iter = std::iter::from_fn(|| pieces.blocking_recv());
        let (r, header) = replog_snapshot::SnapshotReader::open(
            replog_snapshot::PieceReader::new(piece_iter),
            replog_snapshot::ReaderOptions::default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        crate::backup::check_state_header(&path, &header).map_err(|e| e.to_string())?;
        replog_snapshot::check_cluster(&header, &cluster)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if header.position < needed {
            return Err(format!(
                "{} is of position {}, but this replica's log begins at {}: the peer is behind too",
                path.display(),
                header.position,
                needed + 1
            ));
        }
        info!(
            %peer,
            position = header.position,
            "installing a state snapshot from a peer"
        );
        crate::backup::load_stream(&shared.state, &path, r, header.position)
            .map_err(|e| e.to_string())?;
        Ok(header.position)
    })
    .await
    .map_err(|e| format!("installing the snapshot panicked: {e}"))?
}

/// A state replacement being received: its bytes go to a file in the
/// replica's directory (never to memory), removed once applied or aborted.
struct Spool {
    id: u64,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

const SPOOL_PREFIX: &str = "state-replacement-";

impl Spool {
    fn create(dir: &Path, id: u64) -> std::io::Result<Spool> {
        let path = dir.join(format!("{SPOOL_PREFIX}{id}.spool"));
        let file = std::fs::File::create(&path)?;
        Ok(Spool {
            id,
            path,
            file: std::io::BufWriter::with_capacity(1 << 20, file),
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(data)
    }

    fn finish(self) -> Result<PathBuf, String> {
        self.file
            .into_inner()
            .map_err(|e| e.into_error().to_string())?;
        Ok(self.path)
    }

    fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Spools left by a replica that stopped while receiving one (the
    /// replacement is read again from the log).
    fn remove_stale(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(SPOOL_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
