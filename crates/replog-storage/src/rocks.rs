//! [`RocksStorage`]: a replica's durable log on RocksDB.
//!
//! Layout (column families):
//! - `meta`: one record under key `replica`, the [`ReplicaMeta`].
//! - `log`: one record per position, key = position as 8 bytes big-endian.
//!
//! Every value is framed with a crc32c over key and payload
//! ([`crate::frame`]) and checked on every read.
//!
//! Invariants:
//! - Each [`LogUpdate`] is one RocksDB write batch: the metadata (hard state,
//!   applied position, snapshot mark) always matches the log it describes.
//! - The log holds exactly the positions `snapshot_index + 1 ..= last_index`,
//!   without gaps; open verifies this, and a write refuses entries that are
//!   not contiguous, not after the compaction point, or leave a gap.
//! - The compaction point only moves forward, and a write that installs a
//!   snapshot leaves the applied position at or past it (both asserted on
//!   every write).
//! - `hard_state.commit <= last_index` after open; a commit beyond the intact
//!   log means acknowledged data is missing, which strict open refuses.
//! - A non-strict open that found damage persists status RECOVERING before it
//!   returns, so the replica never votes or acknowledges on damaged data.
//! - Reads for sends to followers are held to a per-turn byte budget
//!   ([`FetchBudget`], [`DEFAULT_FETCH_BUDGET_BYTES`]): a catch-up never
//!   keeps the leader's driver thread reading for longer than one budget's
//!   worth per turn.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRecoveryMode, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};
use tracing::{info, warn};

use crate::api::{assert_write_keeps_invariants, check_conf_changes, LogStorage, LogUpdate};
use crate::error::{Result, StorageError};
use crate::fetch_budget::{FetchBudget, FetchStats, DEFAULT_FETCH_BUDGET_BYTES};
use crate::identity;
use crate::model::{
    key_position, now_unix_ms, position_key, Member, ReplicaIdentity, ReplicaMeta, ReplicaStatus,
    FORMAT_VERSION,
};
use crate::records::{self, META_KEY, REPAIR_STATE_KEY};

const CF_META: &str = "meta";
const CF_LOG: &str = "log";
/// The column families the storage itself owns (and RocksDB's `default`,
/// which it never writes): no layer above may register these names.
pub const OWN_COLUMN_FAMILIES: [&str; 3] = ["default", CF_META, CF_LOG];

/// Default upper bound of one stored record (a framed log entry).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

/// How to open an existing replica.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// `true` (default): any corruption is fatal, with an error naming the
    /// file or key. `false`: keep the intact prefix, drop the rest, and mark
    /// the replica RECOVERING.
    pub strict: bool,
    /// `true` (default): [`LogStorage::sync`] fsyncs. `false` trades
    /// durability for speed: an OS crash or power loss may lose acknowledged
    /// entries (a process crash does not).
    pub sync: bool,
    /// Refuse data of any other cluster.
    pub expected_cluster_id: Option<String>,
    /// Open without writing anything (operator tools on a stopped replica).
    /// Damage found in non-strict mode is then only reported, not repaired.
    pub read_only: bool,
    /// Largest record accepted from disk.
    pub max_record_bytes: usize,
    /// Column families the layers above keep in this database (the state
    /// machine on the log, through [`RocksStorage::shared_db`], so that an
    /// applied position and the state it produced are one atomic write).
    /// Each layer registers its own: `replog-store` names the scheduler
    /// state's. They are opened, and created when missing (unless
    /// `read_only`); families already on disk are always opened, registered
    /// or not (RocksDB refuses to open a database without all of them).
    pub column_families: Vec<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            strict: true,
            sync: true,
            expected_cluster_id: None,
            read_only: false,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            column_families: Vec::new(),
        }
    }
}

/// How to initialize a new replica (`replog initialize`).
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub cluster_id: String,
    pub replica_id: u64,
    /// The initial voting members; must contain `replica_id`.
    pub members: Vec<Member>,
}

impl InitOptions {
    /// A cluster of one: replica 1, the only voter (an embedded log).
    pub fn single_replica(cluster_id: &str) -> Self {
        InitOptions {
            cluster_id: cluster_id.to_string(),
            replica_id: 1,
            members: vec![Member {
                id: 1,
                address: String::new(),
            }],
        }
    }
}

/// What open found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Damage found, one line each (empty for a clean open).
    pub damage: Vec<String>,
    /// Last intact position after recovery.
    pub last_index: u64,
}

impl RecoveryReport {
    /// True if open found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

struct State {
    meta: ReplicaMeta,
    last_index: u64,
    /// The repair state record's payload (empty: none).
    repair_state: Vec<u8>,
}

struct Inner {
    db: Arc<DB>,
    dir: PathBuf,
    /// [`OpenOptions::sync`]: false when durability was turned off.
    fsync_enabled: bool,
    read_only: bool,
    max_record_bytes: usize,
    state: RwLock<State>,
    /// fsyncs done since open ([`LogStorage::sync`], and writes with
    /// [`LogUpdate::sync`]).
    fsync_count: AtomicU64,
    /// Longest fsync since [`RocksStorage::take_max_fsync_us`] last read it.
    max_fsync_us: AtomicU64,
    /// Reads that found a damaged record (checksum, size, decoding) since
    /// open.
    read_errors: AtomicU64,
    /// RocksDB operations (reads, writes, fsyncs, flushes) that failed
    /// since open.
    io_errors: AtomicU64,
    /// Budget of the reads for sends to followers, per core turn.
    fetch_budget: FetchBudget,
}

/// A replica's log on RocksDB. Cheap to clone (shared handle); safe to read
/// from many threads while one thread writes.
#[derive(Clone)]
pub struct RocksStorage {
    inner: Arc<Inner>,
}

fn db_options(strict: bool) -> Options {
    let mut o = Options::default();
    o.set_paranoid_checks(true);
    o.set_keep_log_file_num(4);
    o.set_max_total_wal_size(128 * 1024 * 1024);
    o.set_wal_recovery_mode(if strict {
        DBRecoveryMode::TolerateCorruptedTailRecords
    } else {
        DBRecoveryMode::PointInTime
    });
    o
}

/// The storage's own families, then `others` (registered by the layers
/// above or found on disk) with default options.
fn cf_descriptors(others: &[String]) -> Vec<ColumnFamilyDescriptor> {
    let mut log = Options::default();
    log.set_compression_type(rocksdb::DBCompressionType::Lz4);
    log.set_write_buffer_size(64 * 1024 * 1024);
    let mut descriptors = vec![
        ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ColumnFamilyDescriptor::new(CF_LOG, log),
    ];
    for name in others {
        assert!(
            !OWN_COLUMN_FAMILIES.contains(&name.as_str()),
            "column family '{name}' is the storage's own"
        );
        descriptors.push(ColumnFamilyDescriptor::new(name, Options::default()));
    }
    descriptors
}

/// Refuses a registered family that the storage owns itself, or a name
/// given twice.
fn check_registered_families(names: &[String]) -> Result<()> {
    for (i, name) in names.iter().enumerate() {
        if OWN_COLUMN_FAMILIES.contains(&name.as_str()) || name.is_empty() {
            return Err(StorageError::Invalid(format!(
                "column family '{name}' cannot be registered: the storage owns {OWN_COLUMN_FAMILIES:?}"
            )));
        }
        if names[..i].contains(name) {
            return Err(StorageError::Invalid(format!(
                "column family '{name}' is registered twice"
            )));
        }
    }
    Ok(())
}

impl Inner {
    /// [`rocks_err`] for an operation of the open replica, counted in
    /// [`Inner::io_errors`] (the self-monitor's `storage_errors`).
    fn io_err(&self) -> impl Fn(rocksdb::Error) -> StorageError + '_ {
        move |source| {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
            rocks_err(&self.dir)(source)
        }
    }
}

fn rocks_err(dir: &Path) -> impl Fn(rocksdb::Error) -> StorageError + '_ {
    move |source| StorageError::Rocks {
        path: dir.to_path_buf(),
        source,
    }
}

fn log_location(dir: &Path, index: u64) -> String {
    format!(
        "{} column family '{CF_LOG}' position {index}",
        dir.display()
    )
}

fn meta_location(dir: &Path) -> String {
    format!(
        "{} column family '{CF_META}' key '{}'",
        dir.display(),
        String::from_utf8_lossy(META_KEY)
    )
}

/// Validates a cluster id: 1 to 128 characters of `[A-Za-z0-9._-]`.
pub fn validate_cluster_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "cluster id '{id}' must be 1 to 128 characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Sum of the sizes of all files below `dir`.
pub fn disk_usage(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let rd = fs::read_dir(dir).map_err(|source| StorageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let md = match e.metadata() {
            Ok(m) => m,
            Err(_) => continue, // removed while we looked
        };
        if md.is_dir() {
            total += disk_usage(&e.path())?;
        } else {
            total += md.len();
        }
    }
    Ok(total)
}

impl RocksStorage {
    /// Turns an empty (or missing) directory into an initialized VOTING
    /// replica. Refuses a directory that holds anything, without touching it.
    pub fn initialize(dir: &Path, init: &InitOptions) -> Result<Self> {
        Self::create(dir, init, ReplicaStatus::Voting)
    }

    /// Turns an empty (or missing) directory into an EMPTY replica of
    /// `cluster_id`: it knows who it is, holds no log and no membership, and
    /// never votes or acknowledges until it has joined its cluster through
    /// the recover protocol. `init.members` is the address book it starts
    /// with. Refuses a directory that holds anything.
    pub fn create_empty(dir: &Path, init: &InitOptions) -> Result<Self> {
        Self::create(dir, init, ReplicaStatus::Empty)
    }

    fn create(dir: &Path, init: &InitOptions, status: ReplicaStatus) -> Result<Self> {
        validate_cluster_id(&init.cluster_id)?;
        if init.replica_id == 0 {
            return Err(StorageError::Invalid("replica id must be non-zero".into()));
        }
        let mut ids: Vec<u64> = init.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != init.members.len() || ids.contains(&0) {
            return Err(StorageError::Invalid(
                "member ids must be unique and non-zero".into(),
            ));
        }
        if !ids.contains(&init.replica_id) {
            return Err(StorageError::Invalid(format!(
                "replica id {} is not among the members {ids:?}",
                init.replica_id
            )));
        }
        match fs::read_dir(dir) {
            Ok(rd) => {
                let names: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                if !names.is_empty() {
                    let mut shown = names.clone();
                    shown.sort();
                    shown.truncate(5);
                    return Err(StorageError::NotEmpty {
                        path: dir.to_path_buf(),
                        found: format!("{} entries, e.g. {}", names.len(), shown.join(", ")),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|source| StorageError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(StorageError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }

        let created = now_unix_ms();
        let mut opts = db_options(true);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db =
            DB::open_cf_descriptors(&opts, dir, cf_descriptors(&[])).map_err(rocks_err(dir))?;
        let meta = if status == ReplicaStatus::Voting {
            ReplicaMeta::initialized(&init.cluster_id, init.replica_id, ids, created)
        } else {
            ReplicaMeta::empty(&init.cluster_id, init.replica_id, created)
        };
        let meta = ReplicaMeta {
            members: init.members.clone(),
            ..meta
        };
        {
            let cf = db.cf_handle(CF_META).expect("created above");
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(cf, META_KEY, records::encode_meta(&meta), &wo)
                .map_err(rocks_err(dir))?;
        }
        drop(db);
        // The identity is written last: a directory without it never opens,
        // so an interrupted initialize is never mistaken for a replica.
        identity::write(
            dir,
            &ReplicaIdentity {
                format_version: FORMAT_VERSION,
                cluster_id: init.cluster_id.clone(),
                replica_id: init.replica_id,
                created_at_unix_ms: created,
            },
        )?;
        info!(dir = %dir.display(), cluster = %init.cluster_id, replica = init.replica_id,
              %status, "created replica");
        Self::open(dir, &OpenOptions::default()).map(|(s, _)| s)
    }

    /// Opens an initialized replica, verifying every record (see
    /// [`OpenOptions::strict`] for what happens on damage).
    pub fn open(dir: &Path, opts: &OpenOptions) -> Result<(Self, RecoveryReport)> {
        if !dir.is_dir() {
            return Err(StorageError::NotInitialized {
                path: dir.to_path_buf(),
                reason: "the directory does not exist".into(),
            });
        }
        check_registered_families(&opts.column_families)?;
        let mut damage: Vec<String> = Vec::new();
        // 1. Identity, before RocksDB touches anything.
        let ident = read_identity(dir, opts.strict, &mut damage)?;
        if let Some(i) = &ident {
            check_identity(dir, i.format_version, &i.cluster_id, opts)?;
        }
        // 2. RocksDB; 3. and 4. the metadata record and every log record.
        let db = open_db(dir, opts, &mut damage)?;
        let (db, verified) = verify_repairing(db, dir, ident.as_ref(), opts, &mut damage)?;
        let repair_state = verified.repair_state.clone();
        let (meta, last_index) = keep_intact_prefix(verified, dir, opts.strict, &mut damage)?;
        let state = State {
            meta,
            last_index,
            repair_state,
        };
        let storage = Self::from_open_db(db, dir, opts, state);
        if !damage.is_empty() && !opts.read_only {
            storage.persist_recovery(last_index, ident.is_none())?;
        }
        Ok((storage, RecoveryReport { damage, last_index }))
    }

    fn from_open_db(db: DB, dir: &Path, opts: &OpenOptions, state: State) -> Self {
        RocksStorage {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                dir: dir.to_path_buf(),
                fsync_enabled: opts.sync,
                read_only: opts.read_only,
                max_record_bytes: opts.max_record_bytes,
                state: RwLock::new(state),
                fsync_count: AtomicU64::new(0),
                max_fsync_us: AtomicU64::new(0),
                read_errors: AtomicU64::new(0),
                io_errors: AtomicU64::new(0),
                fetch_budget: FetchBudget::new(DEFAULT_FETCH_BUDGET_BYTES),
            }),
        }
    }

    /// Persists the repaired view of a non-strict open: drops the damaged
    /// tail, stores the clamped metadata and RECOVERING, durably, before
    /// anyone reads; writes the identity file again if it was lost.
    fn persist_recovery(&self, last_index: u64, identity_lost: bool) -> Result<()> {
        self.rewrite_after_recovery(last_index)?;
        if !identity_lost {
            return Ok(());
        }
        let meta = self.meta();
        identity::write(
            &self.inner.dir,
            &ReplicaIdentity {
                format_version: meta.format_version,
                cluster_id: meta.cluster_id.clone(),
                replica_id: meta.replica_id,
                created_at_unix_ms: meta.created_at_unix_ms,
            },
        )
    }

    fn rewrite_after_recovery(&self, last_index: u64) -> Result<()> {
        let inner = &self.inner;
        let st = inner.state.read();
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.log_cf(),
            position_key(last_index + 1),
            position_key(u64::MAX),
        );
        batch.put_cf(self.meta_cf(), META_KEY, records::encode_meta(&st.meta));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        inner.db.write_opt(batch, &wo).map_err(inner.io_err())
    }

    fn log_cf(&self) -> &ColumnFamily {
        self.inner.db.cf_handle(CF_LOG).expect("checked at open")
    }

    fn meta_cf(&self) -> &ColumnFamily {
        self.inner.db.cf_handle(CF_META).expect("checked at open")
    }

    /// The replica's RocksDB, shared with the state machine on the log
    /// (it writes the families registered in
    /// [`OpenOptions::column_families`]; nothing else may write the log's
    /// own families).
    pub fn shared_db(&self) -> Arc<DB> {
        self.inner.db.clone()
    }

    /// The replica's data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// First position present in the log (one past the compaction point).
    pub fn first_index_now(&self) -> u64 {
        self.inner.state.read().meta.snapshot_index + 1
    }

    /// Number of fsyncs since open ([`LogStorage::sync`], and writes with
    /// [`LogUpdate::sync`]).
    pub fn sync_count(&self) -> u64 {
        self.inner.fsync_count.load(Ordering::Relaxed)
    }

    /// Sets the budget, in bytes per core turn, of the reads for sends to
    /// followers (0: no budget). See [`FetchBudget`].
    pub fn set_fetch_budget_bytes(&self, bytes: u64) {
        self.inner.fetch_budget.set_limit_bytes(bytes);
    }

    /// Counters of the read budget for sends to followers.
    pub fn fetch_stats(&self) -> FetchStats {
        self.inner.fetch_budget.stats()
    }

    /// Last position present in the log.
    pub fn last_index(&self) -> u64 {
        self.inner.state.read().last_index
    }

    /// Flushes memtables to SST files (the WAL is then no longer needed for
    /// the data written so far).
    pub fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(StorageError::ReadOnly(self.inner.dir.clone()));
        }
        let db = &self.inner.db;
        db.flush_cf(self.meta_cf()).map_err(self.inner.io_err())?;
        db.flush_cf(self.log_cf()).map_err(self.inner.io_err())
    }

    /// Bytes the replica occupies on disk.
    pub fn disk_usage(&self) -> Result<u64> {
        disk_usage(&self.inner.dir)
    }

    fn read_entry(&self, index: u64) -> Result<Option<Entry>> {
        let key = position_key(index);
        let got = self
            .inner
            .db
            .get_pinned_cf(self.log_cf(), key)
            .map_err(self.inner.io_err())?;
        let Some(v) = got else { return Ok(None) };
        let loc = || log_location(&self.inner.dir, index);
        let decoded = records::decode_log_entry(index, &v, self.inner.max_record_bytes, loc);
        if decoded.is_err() {
            self.inner.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        decoded.map(Some)
    }

    /// The longest fsync since the last call, in µs (the self-monitor's
    /// `fsync_latency_ms`); resets it.
    pub fn take_max_fsync_us(&self) -> u64 {
        self.inner.max_fsync_us.swap(0, Ordering::Relaxed)
    }

    /// Reads that found a damaged record since open (the self-monitor's
    /// `checksum_errors`).
    pub fn read_error_count(&self) -> u64 {
        self.inner.read_errors.load(Ordering::Relaxed)
    }

    /// RocksDB operations that failed since open (with
    /// [`RocksStorage::read_error_count`], the self-monitor's
    /// `storage_errors`).
    pub fn io_error_count(&self) -> u64 {
        self.inner.io_errors.load(Ordering::Relaxed)
    }

    fn note_fsync(&self, started: std::time::Instant) {
        let us = started.elapsed().as_micros() as u64;
        self.inner.max_fsync_us.fetch_max(us, Ordering::Relaxed);
        self.inner.fsync_count.fetch_add(1, Ordering::Relaxed);
    }

    /// The error for an entry that should be present but is not: compacted
    /// meanwhile, or corruption.
    fn missing(&self, index: u64) -> StorageError {
        let st = self.inner.state.read();
        if index <= st.meta.snapshot_index {
            StorageError::Compacted {
                index,
                first: st.meta.snapshot_index + 1,
            }
        } else if index > st.last_index {
            StorageError::Unavailable {
                index,
                last: st.last_index,
            }
        } else {
            StorageError::corrupt(log_location(&self.inner.dir, index), "entry is missing")
        }
    }

    /// Entries `[low, high)`, at most `max_size` bytes (always at least one).
    pub fn read_entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>> {
        {
            let st = self.inner.state.read();
            if low <= st.meta.snapshot_index {
                return Err(StorageError::Compacted {
                    index: low,
                    first: st.meta.snapshot_index + 1,
                });
            }
            if high > st.last_index + 1 {
                return Err(StorageError::Unavailable {
                    index: high - 1,
                    last: st.last_index,
                });
            }
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(position_key(high).to_vec());
        let mut out = Vec::with_capacity(((high - low) as usize).min(1024));
        let mut approx_bytes: u64 = 0;
        let iter = self.inner.db.iterator_cf_opt(
            self.log_cf(),
            ro,
            IteratorMode::From(&position_key(low), rocksdb::Direction::Forward),
        );
        let mut expected = low;
        for item in iter {
            let (k, v) = item.map_err(self.inner.io_err())?;
            let idx = key_position(&k).ok_or_else(|| {
                StorageError::corrupt(log_location(&self.inner.dir, expected), "malformed key")
            })?;
            if idx != expected {
                return Err(self.missing(expected));
            }
            let loc = || log_location(&self.inner.dir, idx);
            let e = records::decode_log_entry(idx, &v, self.inner.max_record_bytes, loc)?;
            approx_bytes += (e.data.len() + e.context.len()) as u64;
            out.push(e);
            expected += 1;
            if expected >= high {
                // Do not step further: the next block may be outside the
                // range (and, after non-strict recovery, damaged).
                break;
            }
            if let Some(max) = max_size {
                if approx_bytes > max {
                    break;
                }
            }
        }
        let stopped_by_size = max_size.is_some_and(|m| approx_bytes > m);
        if !stopped_by_size && expected < high {
            return Err(self.missing(expected));
        }
        if let Some(max) = max_size {
            raft::util::limit_size(&mut out, Some(max));
        }
        Ok(out)
    }

    /// Term of the entry at `index` (including the compaction point).
    pub fn entry_term(&self, index: u64) -> Result<u64> {
        {
            let st = self.inner.state.read();
            if index == st.meta.snapshot_index {
                return Ok(st.meta.snapshot_term);
            }
            if index < st.meta.snapshot_index {
                return Err(StorageError::Compacted {
                    index,
                    first: st.meta.snapshot_index + 1,
                });
            }
            if index > st.last_index {
                return Err(StorageError::Unavailable {
                    index,
                    last: st.last_index,
                });
            }
        }
        match self.read_entry(index)? {
            Some(e) => Ok(e.term),
            None => Err(self.missing(index)),
        }
    }
}

/// Reads the REPLICA-IDENTITY file. Non-strict, a missing or damaged file
/// is damage: the identity then comes from the metadata record.
fn read_identity(
    dir: &Path,
    strict: bool,
    damage: &mut Vec<String>,
) -> Result<Option<ReplicaIdentity>> {
    match identity::read(dir) {
        Ok(Some(i)) => Ok(Some(i)),
        Ok(None) => {
            if !dir.join("CURRENT").exists() {
                return Err(StorageError::NotInitialized {
                    path: dir.to_path_buf(),
                    reason: "no REPLICA-IDENTITY file".into(),
                });
            }
            if strict {
                return Err(StorageError::corrupt(
                    identity::path(dir).display().to_string(),
                    "file is missing",
                ));
            }
            damage.push(format!(
                "{} is missing (initialization incomplete or file lost)",
                identity::path(dir).display()
            ));
            Ok(None)
        }
        Err(e) if !strict && e.is_corruption() => {
            damage.push(e.to_string());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Opens RocksDB (its own WAL, MANIFEST and block checksums). Always tried
/// strictly first: a lenient WAL mode on its own would cut the log at a
/// damaged record without telling anyone, and a replica that silently
/// forgot acknowledged entries must never stay VOTING. Non-strict, what
/// RocksDB refuses is damage; it is then opened point-in-time, and
/// repaired if that fails too.
fn open_db(dir: &Path, opts: &OpenOptions, damage: &mut Vec<String>) -> Result<DB> {
    check_manifest(dir, opts.strict, damage)?;
    let others = families_to_open(dir, opts);
    let open_with = |o: &Options| open_db_with(dir, opts.read_only, &others, o);
    match open_with(&db_options(true)) {
        Ok(db) => return Ok(db),
        Err(e) if opts.strict => return Err(rocks_err(dir)(e)),
        Err(e) => {
            damage.push(format!("RocksDB refused the data as it is: {e}"));
            warn!(dir = %dir.display(), error = %e, "strict RocksDB recovery failed; recovering leniently (non-strict)");
        }
    }
    match open_with(&db_options(false)) {
        Ok(db) => Ok(db),
        Err(e) if opts.read_only => Err(rocks_err(dir)(e)),
        Err(e) => {
            damage.push(format!(
                "point-in-time recovery failed too ({e}); repaired the database"
            ));
            repair_and_open(dir, opts)
        }
    }
}

/// Reads RocksDB's MANIFEST before RocksDB does ([`crate::manifest`]):
/// RocksDB would drop a damaged record at its end without an error, and
/// with it the table files of the flush it recorded. Damage is fatal when
/// strict; non-strict, it is reported (the replica turns RECOVERING and
/// catches up what it lost from its peers).
fn check_manifest(dir: &Path, strict: bool, damage: &mut Vec<String>) -> Result<()> {
    let found = crate::manifest::check(dir).map_err(|source| StorageError::Io {
        path: dir.join("CURRENT"),
        source,
    })?;
    let Some(why) = found else {
        return Ok(());
    };
    if strict {
        return Err(StorageError::Corrupt {
            location: format!("{} RocksDB MANIFEST", dir.display()),
            reason: format!(
                "{why}; RocksDB would drop that version edit silently, and with it data this replica may have acknowledged"
            ),
        });
    }
    warn!(dir = %dir.display(), %why, "RocksDB's MANIFEST is damaged; what its last edits recorded may be lost");
    damage.push(format!(
        "RocksDB's MANIFEST is damaged ({why}): what its damaged edits recorded is lost"
    ));
    Ok(())
}

/// The families besides the storage's own that an open names: every one
/// on disk (a database opens only with all of them), plus, writable, the
/// registered ones (created when missing). A read-only open names only
/// what is on disk: it creates nothing.
fn families_to_open(dir: &Path, opts: &OpenOptions) -> Vec<String> {
    let mut names: Vec<String> = DB::list_cf(&Options::default(), dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !OWN_COLUMN_FAMILIES.contains(&n.as_str()))
        .collect();
    if !opts.read_only {
        for registered in &opts.column_families {
            if !names.contains(registered) {
                names.push(registered.clone());
            }
        }
    }
    names
}

fn open_db_with(
    dir: &Path,
    read_only: bool,
    others: &[String],
    o: &Options,
) -> std::result::Result<DB, rocksdb::Error> {
    if read_only {
        let mut names: Vec<String> = vec![CF_META.into(), CF_LOG.into()];
        names.extend(others.iter().cloned());
        DB::open_cf_for_read_only(o, dir, names, false)
    } else {
        let mut o = o.clone();
        o.create_missing_column_families(true);
        DB::open_cf_descriptors(&o, dir, cf_descriptors(others))
    }
}

/// Runs RocksDB's repair (it sets aside table files that fail their
/// checksums) and opens the result point-in-time.
fn repair_and_open(dir: &Path, opts: &OpenOptions) -> Result<DB> {
    assert!(!opts.read_only, "a read-only open never repairs");
    DB::repair(&db_options(false), dir).map_err(rocks_err(dir))?;
    let others = families_to_open(dir, opts);
    open_db_with(dir, false, &others, &db_options(false)).map_err(rocks_err(dir))
}

/// Verifies `db`; when RocksDB reported corrupt blocks and the open is
/// non-strict and writable, repairs the database (the log is then cut at
/// the gap) and verifies it again.
fn verify_repairing(
    db: DB,
    dir: &Path,
    ident: Option<&ReplicaIdentity>,
    opts: &OpenOptions,
    damage: &mut Vec<String>,
) -> Result<(DB, Verified)> {
    let verified = verify(&db, dir, ident, opts)?;
    if !verified.rocks_corruption || opts.strict || opts.read_only {
        return Ok((db, verified));
    }
    damage.extend(verified.meta_damage);
    damage.extend(verified.bad.map(|(_, why)| why));
    damage.push("RocksDB reported corrupt blocks; repaired the database".into());
    warn!(dir = %dir.display(), "corrupt RocksDB blocks; running repair (non-strict)");
    drop(db);
    let db = repair_and_open(dir, opts)?;
    let verified = verify(&db, dir, ident, opts)?;
    Ok((db, verified))
}

/// What open keeps of verified data. Strict, any damage is an error.
/// Non-strict, the log is cut before its first bad position, the commit
/// position is clamped to what is left, and a replica with damage of any
/// kind is RECOVERING. Returns the metadata and the last intact position.
fn keep_intact_prefix(
    verified: Verified,
    dir: &Path,
    strict: bool,
    damage: &mut Vec<String>,
) -> Result<(ReplicaMeta, u64)> {
    let Verified {
        mut meta,
        last_index,
        bad,
        meta_damage,
        ..
    } = verified;
    damage.extend(meta_damage);
    if let Some((from, why)) = bad {
        if strict {
            return Err(StorageError::corrupt(log_location(dir, from), why));
        }
        damage.push(format!("{why}; dropped the log from position {from} on"));
    }
    if meta.hard_state.commit > last_index {
        let why = format!(
            "commit position {} is beyond the last intact position {last_index}: committed entries are missing",
            meta.hard_state.commit
        );
        if strict {
            return Err(StorageError::corrupt(
                log_location(dir, last_index + 1),
                why,
            ));
        }
        damage.push(why);
        meta.hard_state.commit = last_index;
    }
    meta.applied_index = meta.applied_index.min(meta.hard_state.commit);
    if !damage.is_empty() {
        warn!(dir = %dir.display(), ?damage, "non-strict recovery kept the intact prefix up to position {last_index}; replica is RECOVERING");
        meta.status = ReplicaStatus::Recovering;
    }
    assert!(
        meta.snapshot_index <= last_index && meta.hard_state.commit <= last_index,
        "open keeps a log from the compaction point {} to the commit position {} or past it, \
         not to {last_index}",
        meta.snapshot_index,
        meta.hard_state.commit
    );
    Ok((meta, last_index))
}

fn check_identity(
    dir: &Path,
    format_version: u32,
    cluster_id: &str,
    opts: &OpenOptions,
) -> Result<()> {
    if format_version != FORMAT_VERSION {
        return Err(StorageError::UnsupportedFormat {
            path: dir.to_path_buf(),
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    if let Some(expected) = &opts.expected_cluster_id {
        if expected != cluster_id {
            return Err(StorageError::ClusterMismatch {
                path: dir.to_path_buf(),
                expected: expected.clone(),
                found: cluster_id.to_string(),
            });
        }
    }
    Ok(())
}

/// What verifying a replica's RocksDB data found.
struct Verified {
    meta: ReplicaMeta,
    repair_state: Vec<u8>,
    last_index: u64,
    /// First bad position and why.
    bad: Option<(u64, String)>,
    /// The metadata record was unreadable (non-strict: rebuilt from identity).
    meta_damage: Option<String>,
    /// RocksDB itself reported corrupt blocks (a repair may salvage more).
    rocks_corruption: bool,
}

/// Reads the metadata record and checks every log record: checksum,
/// decoding, contiguity, terms. In strict mode the first problem is an error.
fn verify(
    db: &DB,
    dir: &Path,
    ident: Option<&ReplicaIdentity>,
    opts: &OpenOptions,
) -> Result<Verified> {
    // 3. The metadata record, and the repair state record beside it.
    let mut read = read_meta(db, dir, ident, opts)?;
    let repair_state = read_repair_state(db, dir, ident, opts, &mut read)?;
    // 4. Every log record: checksum, decoding, contiguity, terms.
    let scan = scan_log(db, dir, &read.meta, opts.max_record_bytes)?;
    Ok(Verified {
        repair_state,
        meta: read.meta,
        last_index: scan.last_index,
        bad: scan.bad,
        meta_damage: read.damage,
        rocks_corruption: read.rocks_corruption || scan.rocks_corruption,
    })
}

/// What reading the metadata record found.
struct MetaRead {
    meta: ReplicaMeta,
    /// The record was unreadable (non-strict: rebuilt from the identity).
    damage: Option<String>,
    /// RocksDB itself failed to read it.
    rocks_corruption: bool,
}

/// Reads the metadata record and checks it against the identity file and
/// `opts`. Non-strict, an unreadable record is rebuilt from the identity
/// file (RECOVERING, no log); with neither, the replica is lost.
fn read_meta(
    db: &DB,
    dir: &Path,
    ident: Option<&ReplicaIdentity>,
    opts: &OpenOptions,
) -> Result<MetaRead> {
    let meta_loc = meta_location(dir);
    let cf = db.cf_handle(CF_META).ok_or_else(|| {
        StorageError::corrupt(dir.display().to_string(), "column family 'meta' is missing")
    })?;
    let read = match db.get_pinned_cf(cf, META_KEY) {
        Ok(Some(v)) => records::decode_meta(&v, || meta_loc.clone()),
        Ok(None) => Err(StorageError::corrupt(
            meta_loc.clone(),
            "metadata record is missing",
        )),
        Err(e) => Err(rocks_err(dir)(e)),
    };
    let read = match read {
        Ok(meta) => MetaRead {
            meta,
            damage: None,
            rocks_corruption: false,
        },
        Err(e) if !opts.strict => {
            let Some(i) = ident else {
                return Err(StorageError::corrupt(
                    dir.display().to_string(),
                    format!(
                        "both the REPLICA-IDENTITY file and the metadata record are unreadable ({e}); \
                         the replica's identity is lost: wipe the directory and add it back \
                         as a new replica"
                    ),
                ));
            };
            MetaRead {
                meta: meta_from_identity(i),
                damage: Some(e.to_string()),
                rocks_corruption: matches!(e, StorageError::Rocks { .. }),
            }
        }
        Err(e) => return Err(e),
    };
    let meta = &read.meta;
    check_identity(dir, meta.format_version, &meta.cluster_id, opts)?;
    if let Some(i) = ident {
        if i.cluster_id != meta.cluster_id || i.replica_id != meta.replica_id {
            return Err(StorageError::corrupt(
                meta_loc,
                format!(
                    "metadata says cluster '{}' replica {}, REPLICA-IDENTITY says cluster '{}' replica {}",
                    meta.cluster_id, meta.replica_id, i.cluster_id, i.replica_id
                ),
            ));
        }
    }
    Ok(read)
}

/// Reads the repair state record (none: empty). A damaged one is an error
/// when strict; non-strict, the replica is rebuilt as when its metadata is
/// unreadable (RECOVERING, no log): it then folds the repair records again
/// from the leader's log or snapshot, and never acts on a partial memory.
fn read_repair_state(
    db: &DB,
    dir: &Path,
    ident: Option<&ReplicaIdentity>,
    opts: &OpenOptions,
    read: &mut MetaRead,
) -> Result<Vec<u8>> {
    let location = || {
        format!(
            "{} (column family meta, key {})",
            dir.display(),
            String::from_utf8_lossy(REPAIR_STATE_KEY)
        )
    };
    let cf = db.cf_handle(CF_META).expect("read_meta checked it");
    let result = match db.get_pinned_cf(cf, REPAIR_STATE_KEY) {
        Ok(None) => return Ok(Vec::new()),
        Ok(Some(v)) => records::decode_repair_state(&v, location),
        Err(e) => Err(rocks_err(dir)(e)),
    };
    let e = match result {
        Ok(state) => return Ok(state),
        Err(e) if opts.strict => return Err(e),
        Err(e) => e,
    };
    let Some(i) = ident else {
        return Err(StorageError::corrupt(
            location(),
            format!(
                "the repair state record is unreadable ({e}) and so is the REPLICA-IDENTITY file"
            ),
        ));
    };
    read.meta = meta_from_identity(i);
    read.damage = Some(format!(
        "{e}; the replica rejoins with no log and rebuilds its repair state"
    ));
    read.rocks_corruption |= matches!(e, StorageError::Rocks { .. });
    Ok(Vec::new())
}

/// The metadata of a replica whose record was lost: who it is, RECOVERING,
/// no log and no membership.
fn meta_from_identity(i: &ReplicaIdentity) -> ReplicaMeta {
    ReplicaMeta {
        format_version: i.format_version,
        cluster_id: i.cluster_id.clone(),
        replica_id: i.replica_id,
        status: ReplicaStatus::Recovering,
        hard_state: HardState::default(),
        conf_state: ConfState::default(),
        snapshot_index: 0,
        snapshot_term: 0,
        applied_index: 0,
        members: Vec::new(),
        created_at_unix_ms: i.created_at_unix_ms,
        snapshot_conf_state: ConfState::default(),
        conf_history: Vec::new(),
    }
}

/// What scanning the log found.
struct LogScan {
    /// Last position of the intact prefix.
    last_index: u64,
    /// First bad position and why.
    bad: Option<(u64, String)>,
    /// RocksDB itself failed to read a record.
    rocks_corruption: bool,
}

/// Checks every log record after the compaction point in position order,
/// up to the first bad one.
fn scan_log(db: &DB, dir: &Path, meta: &ReplicaMeta, max_record_bytes: usize) -> Result<LogScan> {
    let cf = db.cf_handle(CF_LOG).ok_or_else(|| {
        StorageError::corrupt(dir.display().to_string(), "column family 'log' is missing")
    })?;
    let mut scan = LogScan {
        last_index: meta.snapshot_index,
        bad: None,
        rocks_corruption: false,
    };
    let mut prev_term = meta.snapshot_term;
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let expected = scan.last_index + 1;
        let checked = match item {
            Ok((key, value)) => check_log_record(
                dir,
                &key,
                &value,
                expected,
                meta.snapshot_index,
                prev_term,
                max_record_bytes,
            ),
            Err(e) => {
                scan.rocks_corruption = true;
                Err((expected, format!("{}: {e}", log_location(dir, expected))))
            }
        };
        match checked {
            Ok(term) => {
                prev_term = term;
                scan.last_index = expected;
            }
            Err(bad) => {
                scan.bad = Some(bad);
                break;
            }
        }
    }
    Ok(scan)
}

/// Checks the log record that should be at position `expected`: its key,
/// frame, decoding and term (never below `prev_term`). Returns its term,
/// or the bad position and why.
fn check_log_record(
    dir: &Path,
    key: &[u8],
    value: &[u8],
    expected: u64,
    snapshot_index: u64,
    prev_term: u64,
    max_record_bytes: usize,
) -> std::result::Result<u64, (u64, String)> {
    let Some(idx) = key_position(key) else {
        return Err((
            expected,
            format!("{}: malformed key {:?}", log_location(dir, expected), key),
        ));
    };
    if idx != expected {
        let why = if idx < expected {
            format!("entry {idx} is at or before the compaction point {snapshot_index}")
        } else {
            format!("gap: position {expected} is missing, next present is {idx}")
        };
        return Err((expected, format!("{}: {why}", log_location(dir, expected))));
    }
    let loc = || log_location(dir, idx);
    let entry = records::decode_log_entry(idx, value, max_record_bytes, loc)
        .map_err(|e| (idx, e.to_string()))?;
    if entry.term < prev_term {
        return Err((
            idx,
            format!(
                "{}: term {} is below the previous term {prev_term}",
                loc(),
                entry.term
            ),
        ));
    }
    Ok(entry.term)
}

impl raft::Storage for RocksStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.inner.state.read();
        Ok(RaftState::new(
            st.meta.hard_state.clone(),
            st.meta.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if !context.can_async() {
            return Ok(self.read_entries(low, high, max_size)?);
        }
        let budget = &self.inner.fetch_budget;
        let Some(allowed) = budget.admit(context) else {
            // Refused for this turn; the core retries it at its next turn.
            return Err(raft::Error::Store(
                raft::StorageError::LogTemporarilyUnavailable,
            ));
        };
        let limit = max_size.map_or(allowed, |m| m.min(allowed));
        let entries = self.read_entries(low, high, Some(limit))?;
        budget.charge(
            entries
                .iter()
                .map(|e| (e.data.len() + e.context.len()) as u64)
                .sum(),
        );
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.entry_term(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.state.read().meta.snapshot_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.state.read().last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let st = self.inner.state.read();
        if request_index > st.meta.snapshot_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = Snapshot::default();
        let md = s.mut_metadata();
        md.index = st.meta.snapshot_index;
        md.term = st.meta.snapshot_term;
        md.set_conf_state(st.meta.snapshot_conf_for(to));
        s.data = st.repair_state.clone().into();
        Ok(s)
    }
}

/// The steps of [`LogStorage::write`], each on the metadata and last
/// position the batch will leave (`next`), so that a refused update
/// changes nothing.
impl RocksStorage {
    /// Installs the update's snapshot mark, if any: every entry is removed
    /// and the log continues after the mark.
    fn stage_snapshot(
        &self,
        u: &LogUpdate,
        next: &mut State,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        let Some((index, term)) = u.snapshot else {
            return Ok(());
        };
        let meta = &mut next.meta;
        if index < meta.snapshot_index {
            return Err(StorageError::Invalid(format!(
                "snapshot at {index} is older than the current one at {}",
                meta.snapshot_index
            )));
        }
        batch.delete_range_cf(self.log_cf(), position_key(0), position_key(u64::MAX));
        meta.snapshot_index = index;
        meta.snapshot_term = term;
        meta.hard_state.commit = meta.hard_state.commit.max(index);
        meta.hard_state.term = meta.hard_state.term.max(term);
        meta.applied_index = meta.applied_index.max(index);
        let cs = u
            .conf_state
            .clone()
            .unwrap_or_else(|| meta.conf_state.clone());
        meta.install_snapshot_conf(cs);
        next.last_index = index;
        Ok(())
    }

    /// Appends `entries`, removing the tail they overwrite. They must be
    /// contiguous, after the compaction point, and leave no gap.
    fn stage_entries(
        &self,
        entries: &[Entry],
        next: &mut State,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        let (Some(first), Some(end)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let (first, end) = (first.index, end.index);
        let (snapshot_index, last) = (next.meta.snapshot_index, next.last_index);
        if first <= snapshot_index {
            return Err(StorageError::Invalid(format!(
                "append at {first} is at or before the compaction point {snapshot_index}"
            )));
        }
        if first > last + 1 {
            return Err(StorageError::Invalid(format!(
                "append at {first} leaves a gap after the last position {last}"
            )));
        }
        if entries
            .iter()
            .zip(first..)
            .any(|(e, index)| e.index != index)
        {
            return Err(StorageError::Invalid(
                "appended entries are not contiguous".into(),
            ));
        }
        let log = self.log_cf();
        if first <= last {
            batch.delete_range_cf(log, position_key(first), position_key(last + 1));
        }
        for e in entries {
            let framed = records::encode_log_entry(e);
            if framed.len() > self.inner.max_record_bytes {
                return Err(StorageError::TooLarge {
                    what: "log entry",
                    size: framed.len() as u64,
                    limit: self.inner.max_record_bytes as u64,
                });
            }
            batch.put_cf(log, position_key(e.index), framed);
        }
        next.last_index = end;
        Ok(())
    }

    /// Removes every entry before `to` and moves the compaction point to
    /// `to - 1`; a no-op when `to` is at or before the first position.
    /// `appended` are the entries of the same update (not in RocksDB yet).
    fn stage_compaction(
        &self,
        to: u64,
        appended: &[Entry],
        next: &mut State,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        let (meta, last) = (&mut next.meta, next.last_index);
        if to <= meta.snapshot_index + 1 {
            return Ok(());
        }
        if to > last + 1 {
            return Err(StorageError::Invalid(format!(
                "cannot compact to {to}: the last position is {last}"
            )));
        }
        let mark = to - 1;
        // Not entry_term(): it takes the state lock we hold.
        let term = match appended.iter().find(|e| e.index == mark) {
            Some(e) => e.term,
            None => {
                self.read_entry(mark)?
                    .ok_or_else(|| {
                        StorageError::corrupt(
                            log_location(&self.inner.dir, mark),
                            "entry is missing",
                        )
                    })?
                    .term
            }
        };
        batch.delete_range_cf(
            self.log_cf(),
            position_key(meta.snapshot_index + 1),
            position_key(to),
        );
        meta.snapshot_index = mark;
        meta.snapshot_term = term;
        meta.compact_conf_to(mark);
        Ok(())
    }

    /// Writes `batch`, with an fsync of the WAL when `sync` is asked for
    /// and durability is on (RocksDB's WAL is one file written in order:
    /// the fsync covers every write before this one too).
    fn write_batch(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let inner = &self.inner;
        let synced = sync && inner.fsync_enabled && !inner.read_only;
        let mut wo = WriteOptions::default();
        wo.set_sync(synced);
        let started = std::time::Instant::now();
        inner.db.write_opt(batch, &wo).map_err(inner.io_err())?;
        if synced {
            self.note_fsync(started);
        }
        Ok(())
    }
}

/// The fields of an update that need no check: the hard state, a
/// membership without a snapshot, addresses, the applied position, the
/// status.
fn record_unchecked_fields(meta: &mut ReplicaMeta, u: LogUpdate) {
    if let Some(hs) = u.hard_state {
        meta.hard_state = hs;
    }
    if let (Some(cs), None) = (u.conf_state, u.snapshot) {
        meta.conf_state = cs;
    }
    meta.record_addresses(&u.member_addresses);
    if let Some(a) = u.applied {
        meta.applied_index = a;
    }
    if let Some(s) = u.status {
        meta.status = s;
    }
}

impl LogStorage for RocksStorage {
    fn write(&self, mut u: LogUpdate) -> Result<()> {
        let inner = &self.inner;
        if inner.read_only {
            return Err(StorageError::ReadOnly(inner.dir.clone()));
        }
        if u.is_empty() {
            return if u.sync { self.sync() } else { Ok(()) };
        }
        // Holding the write lock keeps readers' view (first/last index)
        // in step with what the batch makes visible.
        let mut st = inner.state.write();
        let mut next = State {
            meta: st.meta.clone(),
            last_index: st.last_index,
            repair_state: Vec::new(),
        };
        let mut batch = WriteBatch::default();
        self.stage_snapshot(&u, &mut next, &mut batch)?;
        self.stage_entries(&u.entries, &mut next, &mut batch)?;
        check_conf_changes(&u, next.meta.snapshot_index)?;
        next.meta.record_conf_changes(&u.conf_changes);
        if let Some(to) = u.compact_to {
            self.stage_compaction(to, &u.entries, &mut next, &mut batch)?;
        }
        let (installed, sync) = (u.snapshot.map(|(index, _)| index), u.sync);
        let repair_state = u.repair_state.take();
        if let Some(rs) = &repair_state {
            batch.put_cf(
                self.meta_cf(),
                REPAIR_STATE_KEY,
                records::encode_repair_state(rs),
            );
        }
        record_unchecked_fields(&mut next.meta, u);
        assert_write_keeps_invariants(&st.meta, &next.meta, next.last_index, installed);
        batch.put_cf(self.meta_cf(), META_KEY, records::encode_meta(&next.meta));
        self.write_batch(batch, sync)?;
        next.repair_state = match repair_state {
            Some(rs) => rs,
            None => std::mem::take(&mut st.repair_state),
        };
        *st = next;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if self.inner.fsync_enabled && !self.inner.read_only {
            let started = std::time::Instant::now();
            self.inner.db.flush_wal(true).map_err(self.inner.io_err())?;
            self.note_fsync(started);
        }
        Ok(())
    }

    fn meta(&self) -> ReplicaMeta {
        self.inner.state.read().meta.clone()
    }

    fn repair_state(&self) -> Vec<u8> {
        self.inner.state.read().repair_state.clone()
    }

    fn reclaim_space(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let first = self.inner.state.read().meta.snapshot_index + 1;
        self.inner.db.compact_range_cf(
            self.log_cf(),
            None::<&[u8]>,
            Some(&position_key(first)[..]),
        );
        Ok(())
    }

    fn begin_fetch_turn(&self) {
        self.inner.fetch_budget.begin_turn();
    }

    fn next_deferred_fetch(&self) -> Option<GetEntriesContext> {
        self.inner.fetch_budget.next_deferred()
    }

    fn deferred_fetches(&self) -> usize {
        self.inner.fetch_budget.deferred_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    struct Rocks {
        dirs: Vec<tempfile::TempDir>,
    }

    impl conformance::Harness for Rocks {
        type S = RocksStorage;
        fn fresh(&mut self) -> RocksStorage {
            let d = tempfile::tempdir().unwrap();
            let s =
                RocksStorage::initialize(&d.path().join("r"), &InitOptions::single_replica("test"))
                    .unwrap();
            self.dirs.push(d);
            s
        }
        fn reopen(&mut self, s: RocksStorage) -> RocksStorage {
            let dir = s.dir().to_path_buf();
            drop(s);
            RocksStorage::open(&dir, &OpenOptions::default()).unwrap().0
        }
    }

    #[test]
    fn rocks_storage_conformance() {
        conformance::run_all(&mut Rocks { dirs: Vec::new() });
    }

    #[test]
    fn a_damaged_record_read_is_counted_as_a_checksum_error() {
        let mut h = Rocks { dirs: Vec::new() };
        let s = conformance::Harness::fresh(&mut h);
        s.write(LogUpdate {
            entries: conformance::entries(2..=4, 2, 64),
            sync: true,
            ..Default::default()
        })
        .unwrap();
        assert!(s.read_entry(3).is_ok());
        assert_eq!((s.read_error_count(), s.io_error_count()), (0, 0));
        // Flip one byte of entry 3 in place, under the storage's feet.
        let db = s.shared_db();
        let cf = db.cf_handle(CF_LOG).unwrap();
        let mut raw = db.get_cf(&cf, position_key(3)).unwrap().unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x01;
        db.put_cf(&cf, position_key(3), &raw).unwrap();
        let err = s.read_entry(3).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(s.read_entry(2).is_ok() && s.read_entry(4).is_ok());
        assert!(s.read_entry(3).is_err());
        assert_eq!(
            (s.read_error_count(), s.io_error_count()),
            (2, 0),
            "two damaged reads, no failed RocksDB operation"
        );
    }

    /// Unmounts its directory on drop.
    struct Mount(std::path::PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// A full disk: RocksDB's failed writes are counted as I/O errors (the
    /// self-monitor's `storage_errors`), not as damaged records. The small
    /// filesystem is a tmpfs (mounting it needs root, as the fault tests'
    /// namespaces do).
    #[test]
    fn failed_rocksdb_writes_on_a_full_disk_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let small = d.path().join("small");
        std::fs::create_dir(&small).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&small)
            .status()
            .expect("mount(8)");
        assert!(mounted.success(), "mounting a tmpfs needs root");
        let _mount = Mount(small.clone());
        let s =
            RocksStorage::initialize(&small.join("r"), &InitOptions::single_replica("t")).unwrap();
        let mut failure = None;
        for i in 0..1_000u64 {
            let update = LogUpdate {
                entries: conformance::entries(2 + i..=2 + i, 2, 64 * 1024),
                sync: true,
                ..Default::default()
            };
            if let Err(e) = s.write(update) {
                failure = Some(e);
                break;
            }
        }
        let failure = failure.expect("64 MB never fit in 24 MB");
        assert!(!failure.is_corruption(), "{failure}");
        assert!(s.io_error_count() >= 1, "{failure}");
        assert_eq!(s.read_error_count(), 0);
        drop(s);
    }

    #[test]
    fn a_write_with_sync_is_fsynced_in_the_write() {
        let mut h = Rocks { dirs: Vec::new() };
        let s = conformance::Harness::fresh(&mut h);
        let before = s.sync_count();
        s.write(LogUpdate {
            entries: conformance::entries(2..=3, 2, 8),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sync_count(), before);
        s.write(LogUpdate {
            entries: conformance::entries(4..=4, 2, 8),
            sync: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sync_count(), before + 1);
        // An empty update that asks for it still syncs.
        s.write(LogUpdate {
            sync: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sync_count(), before + 2);
    }

    #[test]
    fn truncation_gives_disk_space_back() {
        let mut h = Rocks { dirs: Vec::new() };
        let s = conformance::Harness::fresh(&mut h);
        let payload = vec![7u8; 4096];
        // Incompressible-ish data: vary it per entry.
        for chunk in 0..40u64 {
            let entries: Vec<Entry> = (0..500u64)
                .map(|i| {
                    let idx = 2 + chunk * 500 + i;
                    // Incompressible data, so compression cannot hide the size.
                    let mut x = idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut d = payload.clone();
                    for b in d.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    Entry {
                        index: idx,
                        term: 2,
                        data: d.into(),
                        ..Default::default()
                    }
                })
                .collect();
            s.write(LogUpdate {
                entries,
                ..Default::default()
            })
            .unwrap();
        }
        s.sync().unwrap();
        s.flush().unwrap();
        let before = s.disk_usage().unwrap();
        assert!(
            before > 60 * 1024 * 1024,
            "expected >60MiB on disk, got {before}"
        );
        let last = s.last_index();
        s.write(LogUpdate {
            compact_to: Some(last - 10),
            ..Default::default()
        })
        .unwrap();
        s.reclaim_space().unwrap();
        s.inner.db.flush_wal(true).unwrap();
        let after = s.disk_usage().unwrap();
        assert!(
            after < before / 4,
            "truncation must give space back: {before} bytes before, {after} after"
        );
        assert_eq!(s.read_entries(last - 10, last + 1, None).unwrap().len(), 11);
    }

    /// A follower's catch-up, read as raft-rs's leader reads it (messages
    /// of at most 1 MiB, each read with a context that can wait): with a
    /// budget of 1 MiB per turn it is spread over several turns, each turn
    /// serves at most the budget (plus one entry), reads that cannot wait
    /// are never refused, and every entry arrives, in order.
    #[test]
    fn a_large_catch_up_is_read_over_several_turns() {
        use raft::Storage as _;
        let mut h = Rocks { dirs: Vec::new() };
        let s = conformance::Harness::fresh(&mut h);
        const ENTRY: usize = 64 * 1024;
        const BUDGET: u64 = 1024 * 1024;
        let first = s.last_index() + 1;
        let entries: Vec<Entry> = (first..first + 128)
            .map(|index| Entry {
                index,
                term: 2,
                data: vec![index as u8; ENTRY].into(),
                ..Default::default()
            })
            .collect();
        s.write(LogUpdate {
            entries,
            ..Default::default()
        })
        .unwrap();
        s.set_fetch_budget_bytes(BUDGET);
        let last = s.last_index();
        let mut next = first;
        let mut turns = 0u64;
        while next <= last {
            turns += 1;
            assert!(turns < 100, "the catch-up does not advance");
            s.begin_fetch_turn();
            // A turn first takes back what the last one refused.
            assert_eq!(s.next_deferred_fetch().is_some(), turns > 1);
            let mut served: u64 = 0;
            while next <= last {
                let ctx = raft::GetEntriesContext::empty(true);
                match s.entries(next, last + 1, Some(BUDGET), ctx) {
                    Ok(got) => {
                        assert_eq!(got[0].index, next);
                        served += got.iter().map(|e| e.data.len() as u64).sum::<u64>();
                        next += got.len() as u64;
                    }
                    Err(raft::Error::Store(raft::StorageError::LogTemporarilyUnavailable)) => {
                        assert_eq!(s.deferred_fetches(), 1, "the refused read is remembered");
                        break;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            assert!(
                served <= BUDGET + ENTRY as u64,
                "turn {turns} served {served} bytes, over the budget of {BUDGET}"
            );
            // Reads that cannot wait are served even with the budget spent.
            let all = s
                .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
                .unwrap();
            assert_eq!(all.len(), 128);
        }
        let total = 128 * ENTRY as u64;
        assert!(
            turns >= total / BUDGET,
            "{total} bytes in {turns} turns: the budget did not spread them"
        );
        let stats = s.fetch_stats();
        assert!(stats.deferred > 0 && stats.max_turn_bytes <= BUDGET + ENTRY as u64);
    }
}
