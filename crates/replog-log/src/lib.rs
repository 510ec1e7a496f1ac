//! The embedded replicated log of replog, in the style of the Mesos
//! `Log::Reader` / `Log::Writer`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), replog_log::LogError> {
//! use replog_log::{Log, LogOptions};
//! let log = Log::open("/var/lib/replog", LogOptions::default())?;
//! let mut writer = log.writer();
//! let ending = writer.start().await?;          // once this replica leads
//! let p = writer.append(&b"hello"[..]).await?; // committed and fsynced
//! let entries = log.reader().read(p, p)?;       // committed entries only
//! # let _ = (ending, entries); Ok(()) }
//! ```
//!
//! Semantics:
//! - `append` returns once the entry is committed and durable (fsynced,
//!   unless [`LogOptions::sync`] is off); appends from many tasks share
//!   fsyncs (group commit).
//! - `read(from, to)` (inclusive) returns committed application entries
//!   only: leader no-ops, truncations and membership entries are filtered.
//!   A range that reaches before `beginning()`, past the committed `ending()`
//!   or past the last written position fails with [`LogError::Truncated`],
//!   [`LogError::Pending`] or [`LogError::PastEnd`].
//! - A [`Writer`] is bound to the leadership term it started in. Once that
//!   term ends every call fails with [`LogError::LeadershipLost`]: the
//!   embedding scheduler must fail over.

mod error;
pub mod peers;
mod position;
mod runtime;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use raft::eraftpb::Entry;
use replog_core::{classify, Command, CoreConfig, EntryContent};
use replog_storage::{OpenOptions, RecoveryReport, ReplicaMeta, RocksStorage, StorageError};
use tokio::sync::{oneshot, watch};

pub use error::{LogError, Result};
pub use peers::{ClusterOptions, PeerLink};
pub use position::Position;
pub use replog_core::{MembershipChange, Progress};
pub use replog_proto::replica::Envelope;
pub use replog_storage::{Member, ReplicaStatus};

use runtime::{Control, PeerWiring, Request, RuntimeConfig, Shared, Threads};

/// Default largest application entry (8 MiB).
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;
/// Most entries one `read` returns.
pub const MAX_READ_ENTRIES: u64 = 100_000;

/// How to open the log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Strict recovery (see [`OpenOptions::strict`]).
    pub strict: bool,
    /// fsync before acknowledging (default). Turning it off is like running
    /// Mesos without checkpointing: a process crash loses nothing, but an OS
    /// crash or power loss may lose acknowledged appends.
    pub sync: bool,
    /// Refuse a data directory of any other cluster.
    pub expected_cluster_id: Option<String>,
    /// Column families the state machine on the log keeps in the replica's
    /// database ([`OpenOptions::column_families`]); `replog-store`
    /// registers its own with `SchedulerStore::register_column_families`.
    pub column_families: Vec<String>,
    /// Largest application entry accepted by `append`.
    pub max_entry_bytes: usize,
    /// Raft's logical clock.
    pub tick_interval: Duration,
    /// Most appends and truncates in flight at once; callers beyond it wait.
    pub max_in_flight: usize,
    /// Most proposals grouped into one batch (one write, one fsync).
    pub max_batch: usize,
    /// How long `Writer::start` waits for this replica to lead.
    pub start_timeout: Duration,
    /// Longest a linearizable read ([`Log::linearizable_ending`]) takes: the
    /// leader's confirmation and this replica's apply of the confirmed
    /// position together. Past it the read fails with
    /// [`LogError::ReadNotConfirmed`].
    pub read_timeout: Duration,
    /// Raft's election timeout, in ticks.
    pub election_ticks: usize,
    /// Raft's heartbeat interval, in ticks.
    pub heartbeat_ticks: usize,
    /// How long the driver keeps polling for the next request after one
    /// that had work, before it parks its thread (zero: park at once).
    /// Waking a parked thread costs tens of microseconds on a VM, a large
    /// share of a lone append's latency; RocksDB's write thread spins for
    /// the same reason (`write_thread_max_yield_usec`, 100 µs). An idle
    /// replica never spins: the window opens only after work.
    pub idle_spin: Duration,
    /// Let an append (or read, or membership change) that finds the replica
    /// idle drive the core on the caller's thread instead of handing it to
    /// the driver thread (RocksDB's write leader does the same). On a
    /// replica of one the caller then does the write and its fsync itself
    /// and gets its answer without any thread wake-up; the calling thread
    /// (a tokio worker, say) is busy for that fsync. Likewise the sync
    /// thread reports a finished fsync to the core itself when nothing else
    /// waits for one and nobody drives (on a replica with peers: the answer
    /// to the leader, or to the caller, leaves without waking the driver).
    /// Off: every request and every fsync report goes through the driver
    /// thread.
    pub caller_drives: bool,
    /// Most bytes of log entries read for sends to followers in one turn of
    /// the core (0: no limit). A follower catching up a large log is fed
    /// this much per turn, with the requests queued meanwhile answered in
    /// between; without a limit raft-rs reads up to its whole in-flight
    /// window (256 messages of 1 MiB) in one turn, and the leader answers
    /// nobody for that long.
    pub fetch_budget_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            strict: true,
            sync: true,
            expected_cluster_id: None,
            column_families: Vec::new(),
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            tick_interval: Duration::from_millis(100),
            max_in_flight: 16 * 1024,
            max_batch: 4096,
            start_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(5),
            election_ticks: 10,
            heartbeat_ticks: 2,
            idle_spin: Duration::from_micros(100),
            caller_drives: true,
            fetch_budget_bytes: replog_storage::DEFAULT_FETCH_BUDGET_BYTES,
        }
    }
}

/// Leadership as seen by this replica (see [`Log::watch_leadership`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    pub leader: Option<u64>,
    /// True when this replica leads and may write.
    pub is_writer: bool,
}

/// One member of the cluster as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    /// Where its replica server listens (empty if unknown).
    pub address: String,
    pub voter: bool,
    /// Highest position known to be on it (on the leader; 0 elsewhere).
    pub matched: u64,
    /// Positions it is behind the commit (on the leader; 0 elsewhere).
    pub lag: u64,
    /// Time since a message from it arrived (`None`: never).
    pub last_heard: Option<Duration>,
    /// Ping timeouts elapsed without a message from it.
    pub missed_pings: u32,
    /// False once `missed_pings` reaches `max_ping_timeouts`.
    pub reachable: bool,
}

/// The replica's view of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub progress: Progress,
    pub members: Vec<MemberStatus>,
    pub leader_address: Option<String>,
}

/// An open replica of the log. Dropping it (or [`Log::close`]) stops the
/// replica's threads.
pub struct Log {
    storage: RocksStorage,
    shared: Arc<Shared>,
    threads: Threads,
    opts: LogOptions,
    recovery: RecoveryReport,
}

impl Log {
    /// Opens the replica in `path` (initialized by `replog initialize`).
    pub fn open(path: impl AsRef<Path>, opts: LogOptions) -> Result<Log> {
        let (storage, recovery) = Self::open_storage(path.as_ref(), &opts)?;
        let status = replog_storage::LogStorage::meta(&storage).status;
        if status != ReplicaStatus::Voting {
            return Err(LogError::NotVoting(status));
        }
        Self::start(storage, recovery, opts, None)
    }

    /// Opens the replica in `path` as a member of a multi-replica cluster:
    /// messages for peers go to `link`, theirs arrive on `inbound`. Unlike
    /// [`Log::open`], a replica that is not VOTING is started too: it runs
    /// the recover protocol and rejoins (see `replog_core`).
    pub fn open_replica(
        path: impl AsRef<Path>,
        opts: LogOptions,
        cluster: ClusterOptions,
        link: Arc<dyn PeerLink>,
        inbound: crossbeam_channel::Receiver<Envelope>,
    ) -> Result<Log> {
        let (storage, recovery) = Self::open_storage(path.as_ref(), &opts)?;
        let wiring = PeerWiring {
            cluster,
            link,
            inbound,
        };
        Self::start(storage, recovery, opts, Some(wiring))
    }

    fn open_storage(path: &Path, opts: &LogOptions) -> Result<(RocksStorage, RecoveryReport)> {
        let open = OpenOptions {
            strict: opts.strict,
            sync: opts.sync,
            expected_cluster_id: opts.expected_cluster_id.clone(),
            column_families: opts.column_families.clone(),
            ..Default::default()
        };
        Ok(RocksStorage::open(path, &open)?)
    }

    fn start(
        storage: RocksStorage,
        recovery: RecoveryReport,
        opts: LogOptions,
        wiring: Option<PeerWiring>,
    ) -> Result<Log> {
        let core = match &wiring {
            Some(w) => CoreConfig {
                peers: w.cluster.peers.keys().copied().collect(),
                auto_initialize: w.cluster.auto_initialize,
                election_tick: opts.election_ticks,
                heartbeat_tick: opts.heartbeat_ticks,
                ..Default::default()
            },
            None => CoreConfig {
                election_tick: opts.election_ticks,
                heartbeat_tick: opts.heartbeat_ticks,
                ..Default::default()
            },
        };
        storage.set_fetch_budget_bytes(opts.fetch_budget_bytes);
        let cfg = RuntimeConfig {
            tick_interval: opts.tick_interval,
            read_timeout: opts.read_timeout,
            // Half an election timeout: a lost request is asked for again
            // well before the caller gives up, a slow one is not flooded.
            read_retry: opts.tick_interval * (opts.election_ticks.max(2) as u32) / 2,
            max_in_flight: opts.max_in_flight,
            max_batch: opts.max_batch,
            idle_spin: opts.idle_spin,
            caller_drives: opts.caller_drives,
            core,
        };
        let (shared, threads) = runtime::start(storage.clone(), cfg, wiring)?;
        Ok(Log {
            storage,
            shared,
            threads,
            opts,
            recovery,
        })
    }

    /// A writer handle; call [`Writer::start`] before writing.
    pub fn writer(&self) -> Writer {
        Writer {
            shared: self.shared.clone(),
            term: None,
            max_entry_bytes: self.opts.max_entry_bytes,
            start_timeout: self.opts.start_timeout,
        }
    }

    /// A reader handle.
    pub fn reader(&self) -> Reader {
        Reader {
            storage: self.storage.clone(),
            progress: self.shared.progress.subscribe(),
        }
    }

    /// Watches this replica's [`Progress`]: status, term and leader, and
    /// the applied position; it changes after every step of the core that
    /// changed any of them.
    pub fn watch_progress(&self) -> watch::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// Leadership as seen now.
    pub fn leadership(&self) -> Leadership {
        let p = *self.shared.progress.borrow();
        Leadership {
            term: p.term,
            leader: p.leader,
            is_writer: p.leader_ready,
        }
    }

    /// Progress of the log now (term, commit, first and last position).
    pub fn progress(&self) -> Progress {
        *self.shared.progress.borrow()
    }

    /// A linearizable ending: the committed position every read must see,
    /// confirmed by the leader (Raft ReadIndex), once this replica has
    /// applied it.
    ///
    /// Always ends within [`LogOptions::read_timeout`]: when no leader
    /// confirms the read in time (none is known, the leader has not
    /// committed an entry of its term yet, messages were lost) or this
    /// replica does not apply the confirmed position in time, it fails with
    /// [`LogError::ReadNotConfirmed`]: nothing happened, and the read may
    /// be tried again here or on another replica.
    pub async fn linearizable_ending(&self) -> Result<Position> {
        let read = async {
            let index = self
                .shared
                .call(|permit, reply| Control::Read { reply, permit })
                .await?;
            let mut progress = self.shared.progress.subscribe();
            loop {
                let p = *progress.borrow_and_update();
                if p.applied >= index {
                    return Ok(Position::new(p.applied.max(index)));
                }
                if progress.changed().await.is_err() {
                    return Err(self.shared.closed_error());
                }
            }
        };
        let waited = self.opts.read_timeout;
        tokio::time::timeout(waited, read)
            .await
            .map_err(|_| LogError::ReadNotConfirmed { waited })?
    }

    /// Changes the membership (on the leader): several changes form one
    /// joint-consensus change. `addresses` tell every replica where added
    /// members listen. Returns the position of the change once applied.
    pub async fn change_membership(
        &self,
        changes: Vec<MembershipChange>,
        addresses: Vec<Member>,
    ) -> Result<Position> {
        self.shared
            .call(|permit, reply| Control::Membership {
                changes,
                addresses,
                reply,
                permit,
            })
            .await
    }

    /// Asks the leader to hand leadership to replica `to` (best effort:
    /// watch [`Log::watch_leadership`] for the outcome).
    pub fn transfer_leader(&self, to: u64) -> Result<()> {
        self.shared
            .requests
            .send(Control::TransferLeader { to })
            .map_err(|_| self.shared.closed_error())
    }

    /// The replica's view of its cluster: progress, members, their lag and
    /// reachability.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .requests
            .send(Control::Status { reply: tx })
            .map_err(|_| self.shared.closed_error())?;
        rx.await.map_err(|_| self.shared.closed_error())
    }

    /// Why the replica stopped, if it stopped on a fatal error (storage
    /// failure, fsync error, a bug caught in the driver). A process serving
    /// this replica should exit then, so that its supervisor restarts it.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    /// The replicated repair memory as of this replica's applied position
    /// (see `replog_repair::RepairState`).
    pub fn repair_state(&self) -> Result<replog_repair::RepairState> {
        let bytes = replog_storage::LogStorage::repair_state(&self.storage);
        if bytes.is_empty() {
            return Ok(replog_repair::RepairState::default());
        }
        replog_repair::RepairState::decode(&bytes)
            .map_err(|e| LogError::Core(replog_core::CoreError::RepairState(e)))
    }

    /// The replica's metadata record.
    pub fn meta(&self) -> ReplicaMeta {
        replog_storage::LogStorage::meta(&self.storage)
    }

    /// What open found (damage repaired in non-strict mode).
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The storage's health since the last call (the longest fsync is
    /// reset by it; the counters count since open): what the self-monitor
    /// collects.
    pub fn storage_health(&self) -> StorageHealth {
        StorageHealth {
            max_fsync: Duration::from_micros(self.storage.take_max_fsync_us()),
            checksum_errors: self.storage.read_error_count(),
            io_errors: self.storage.io_error_count(),
        }
    }

    /// Number of fsyncs done since open (group commit makes it far smaller
    /// than the number of appends under concurrency).
    pub fn sync_count(&self) -> u64 {
        self.storage.sync_count()
    }

    /// Counters of the budget of reads for sends to followers (see
    /// [`LogOptions::fetch_budget_bytes`]).
    pub fn fetch_stats(&self) -> replog_storage::FetchStats {
        self.storage.fetch_stats()
    }

    /// Requests (appends, truncates, reads, membership changes) that found
    /// the replica idle and were driven on the caller's own thread since
    /// open (see [`LogOptions::caller_drives`]).
    pub fn caller_driven_count(&self) -> u64 {
        self.shared
            .caller_driven
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// fsyncs whose completion the sync thread reported to the core itself
    /// since open, because no other fsync was asked for and nobody drove
    /// the engine (see [`LogOptions::caller_drives`]); the driver thread
    /// was told of the others.
    pub fn sync_reported_count(&self) -> u64 {
        self.shared
            .sync_reported
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The replica's RocksDB, for a state machine on this log that keeps
    /// its state in the same database (in the column families it
    /// registered in [`LogOptions::column_families`]): its applied position
    /// and the state it produced are then one atomic write.
    pub fn shared_db(&self) -> Arc<replog_storage::rocksdb::DB> {
        self.storage.shared_db()
    }

    /// The replica's data directory.
    pub fn path(&self) -> &Path {
        self.storage.dir()
    }

    /// Stops the replica: waiting calls fail with [`LogError::Closed`]. The
    /// data directory is released when the last [`Reader`] is dropped too.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.shared.requests.send(Control::Shutdown);
        if let Some(d) = self.threads.driver.take() {
            let _ = d.join();
        }
        // The driver owned the senders of the helper threads; they end now.
        if let Some(s) = self.threads.syncer.take() {
            let _ = s.join();
        }
        if let Some(c) = self.threads.compactor.take() {
            let _ = c.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Writes to the log while this replica leads. See the crate docs.
pub struct Writer {
    shared: Arc<Shared>,
    term: Option<u64>,
    max_entry_bytes: usize,
    start_timeout: Duration,
}

impl Writer {
    /// Waits until this replica is the leader and its first entry of the
    /// term is committed, binds the writer to that term, and returns the
    /// last committed position.
    pub async fn start(&mut self) -> Result<Position> {
        let mut rx = self.shared.progress.subscribe();
        let wait = async {
            loop {
                let p = *rx.borrow_and_update();
                if p.leader_ready {
                    return Ok(p);
                }
                if self.shared.permits.is_closed() {
                    return Err(self.shared.closed_error());
                }
                if rx.changed().await.is_err() {
                    return Err(self.shared.closed_error());
                }
            }
        };
        let p = tokio::time::timeout(self.start_timeout, wait)
            .await
            .map_err(|_| LogError::Timeout(self.start_timeout))??;
        self.term = Some(p.term);
        Ok(Position::new(p.applied))
    }

    /// The term this writer was started in.
    pub fn term(&self) -> Option<u64> {
        self.term
    }

    /// Appends `data`; returns its position once committed and durable.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<Position> {
        let data = data.into();
        if data.len() > self.max_entry_bytes {
            return Err(LogError::EntryTooLarge {
                size: data.len(),
                max: self.max_entry_bytes,
            });
        }
        self.propose(Command::Append(data)).await
    }

    /// Removes every position before `to` on every replica; returns the
    /// position of the truncation entry.
    pub async fn truncate(&self, to: Position) -> Result<Position> {
        let p = *self.shared.progress.borrow();
        if to.value() > p.applied + 1 {
            return Err(LogError::PastEnd {
                requested: to,
                last: Position::new(p.applied),
            });
        }
        self.propose(Command::Truncate(to.value())).await
    }

    /// Writes a record of the repair memory (see `replog_repair`); returns
    /// its position once committed. Fenced like every write: it fails with
    /// `LeadershipLost` unless this replica still leads in the writer's term.
    pub async fn append_repair(&self, record: &replog_repair::Record) -> Result<Position> {
        self.propose(Command::Repair(record.encode().into())).await
    }

    async fn propose(&self, command: Command) -> Result<Position> {
        let term = self.term.ok_or(LogError::WriterNotStarted)?;
        self.shared
            .call(|permit, reply| {
                Control::Request(Request {
                    command,
                    writer_term: Some(term),
                    reply,
                    permit,
                })
            })
            .await
    }
}

/// One application entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub position: Position,
    pub data: Bytes,
}

/// Reads committed entries of the local replica.
#[derive(Clone)]
pub struct Reader {
    storage: RocksStorage,
    progress: watch::Receiver<Progress>,
}

impl Reader {
    /// The first position that has not been truncated.
    pub fn beginning(&self) -> Position {
        Position::new(self.storage.first_index_now())
    }

    /// The last committed position.
    pub fn ending(&self) -> Position {
        Position::new(self.progress.borrow().applied)
    }

    /// Committed application entries in `from..=to`.
    pub fn read(&self, from: Position, to: Position) -> Result<Vec<LogEntry>> {
        if from > to {
            return Err(LogError::Invalid(format!(
                "read from {from} to {to}: 'from' is after 'to'"
            )));
        }
        if to.value() - from.value() >= MAX_READ_ENTRIES {
            return Err(LogError::Invalid(format!(
                "read of {} positions exceeds the limit of {MAX_READ_ENTRIES}; read in pages",
                to.value() - from.value() + 1
            )));
        }
        let ending = self.ending();
        let beginning = self.beginning();
        if from < beginning {
            return Err(LogError::Truncated {
                requested: from,
                beginning,
            });
        }
        if to > ending {
            let last = Position::new(self.storage.last_index());
            return Err(if to <= last {
                LogError::Pending {
                    requested: to,
                    ending,
                }
            } else {
                LogError::PastEnd {
                    requested: to,
                    last,
                }
            });
        }
        let entries = self
            .storage
            .read_entries(from.value(), to.value() + 1, None)
            .map_err(|e| match e {
                StorageError::Compacted { index, .. } => LogError::Truncated {
                    requested: Position::new(index),
                    beginning: self.beginning(),
                },
                other => LogError::Storage(other),
            })?;
        Ok(application_entries(entries))
    }
}

/// What [`Log::storage_health`] reads: the self-monitor's
/// `fsync_latency_ms`, `checksum_errors` and `storage_errors` (damaged
/// records and failed RocksDB operations together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageHealth {
    /// The longest fsync since the previous reading.
    pub max_fsync: Duration,
    /// Reads that found a damaged record (checksum, size, decoding), since open.
    pub checksum_errors: u64,
    /// RocksDB operations (reads, writes, fsyncs) that failed, since open.
    pub io_errors: u64,
}

/// Keeps the application entries of `entries`, in order.
pub fn application_entries(entries: Vec<Entry>) -> Vec<LogEntry> {
    entries
        .into_iter()
        .filter_map(|e| match classify(&e) {
            Ok(EntryContent::Command(Command::Append(data))) => Some(LogEntry {
                position: Position::new(e.index),
                data,
            }),
            Ok(_) => None,
            Err(bad) => {
                tracing::warn!(%bad, "skipping an entry that holds no valid command");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
