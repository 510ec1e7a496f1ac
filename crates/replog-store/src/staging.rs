//! Staged recovery: a backup loaded next to the live state, inspected and
//! edited, then committed through the log (see
//! [`crate::SchedulerStore::commit_recovery`]) or unloaded.
//!
//! Invariants:
//! - at most one backup is staged at a time; staging a second one, or
//!   committing with nothing staged, is refused;
//! - staging checks the whole file (checksums, counts, cluster id) while it
//!   loads it, and a bad file leaves nothing staged;
//! - what is staged survives a restart: the staged state is in the
//!   replica's RocksDB (`staging` column family) and a checksummed marker
//!   file records what it came from;
//! - every staged backup carries a random `staging_id` label that the
//!   commit writes into the replacement; the replica that holds the staging
//!   clears it when it applies that replacement (before loading it: from
//!   then on the log holds it), and records the id and position as the last
//!   committed recovery, so a commit that lost its answer can be told from
//!   one that never happened, and a staged backup is never committed twice.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use replog_proto::snapshot::SnapshotHeader;
use replog_proto::state::{op, Op, RemoveTasks, ScheduledTask, Transaction};
use replog_snapshot::{check_cluster, ReaderOptions, SnapshotReader};
use replog_state::{EntityCounts, Limits, StateError, StateStore, TaskQuery};
use replog_storage::frame;
use replog_storage::rocksdb::DB;

use crate::CF_STAGING;

use crate::backup::{load_stream, BackupError, CONTENT};

const MARKER: &str = "staged-recovery";
const COMMITTED_MARKER: &str = "last-committed-recovery";

/// Errors of staging.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(
        "a backup is already staged (cluster '{cluster_id}', position {position}); unload it first"
    )]
    AlreadyStaged { cluster_id: String, position: u64 },
    #[error("no backup is staged")]
    NothingStaged,
    #[error("the stream holds '{0}', not scheduler state ('{CONTENT}')")]
    WrongContent(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the staging marker {path}: {reason}")]
    Marker { path: PathBuf, reason: String },
}

/// The header label that makes a replica commit what is staged as soon as
/// it leads (set by `replog initialize --from-backup`).
pub const AUTO_COMMIT_LABEL: &str = "auto_commit";

/// The header label that identifies one staging (random, set when staged).
pub const STAGING_ID_LABEL: &str = "staging_id";

/// The last staged recovery this replica saw committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedRecovery {
    /// Its [`STAGING_ID_LABEL`].
    pub staging_id: String,
    /// The log position of the state replacement.
    pub position: u64,
}

/// What is staged.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The staged backup's header (its labels gain `staged_at_ms`).
    pub header: SnapshotHeader,
    pub counts: EntityCounts,
}

impl Staged {
    /// Whether it is to be committed as soon as this replica leads.
    pub fn auto_commit(&self) -> bool {
        self.header
            .labels
            .get(AUTO_COMMIT_LABEL)
            .map(String::as_str)
            == Some("true")
    }

    /// Its [`STAGING_ID_LABEL`] (empty for a staging of an older version).
    pub fn staging_id(&self) -> &str {
        staging_id_of(&self.header)
    }
}

/// The [`STAGING_ID_LABEL`] of a staged backup's (or a replacement's)
/// header; empty when it has none.
pub fn staging_id_of(header: &SnapshotHeader) -> &str {
    header
        .labels
        .get(STAGING_ID_LABEL)
        .map(String::as_str)
        .unwrap_or("")
}

fn new_staging_id(now_unix_ms: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_unix_ms);
    h.write_u32(std::process::id());
    format!("{now_unix_ms:x}-{:016x}", h.finish())
}

/// The staging area of one replica.
pub struct Staging {
    state: StateStore,
    marker: PathBuf,
    committed_marker: PathBuf,
    staged: Mutex<Option<SnapshotHeader>>,
    last_committed: Mutex<Option<CommittedRecovery>>,
}

impl Staging {
    /// The staging area of the replica behind `log`: its column family in
    /// the log's database, its marker files in the log's directory.
    pub fn for_log(log: &replog_log::Log) -> Result<Self, StagingError> {
        Self::open(log.shared_db(), log.path())
    }

    /// Opens the staging area in `db` (the replica's database, opened with
    /// [`crate::COLUMN_FAMILIES`] registered) whose directory is `dir`.
    pub fn open(db: Arc<DB>, dir: &Path) -> Result<Self, StagingError> {
        let state = StateStore::open(db, CF_STAGING, Limits::default())?;
        let marker = dir.join(MARKER);
        let staged = match std::fs::read(&marker) {
            Ok(bytes) => {
                let bad = |reason: String| StagingError::Marker {
                    path: marker.clone(),
                    reason,
                };
                let location = marker.display().to_string();
                let payload = frame::decode(MARKER.as_bytes(), &bytes, 1 << 20, || location)
                    .map_err(|e| bad(e.to_string()))?;
                Some(SnapshotHeader::decode(payload).map_err(|e| bad(e.to_string()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StagingError::Marker {
                    path: marker,
                    reason: e.to_string(),
                })
            }
        };
        let committed_marker = dir.join(COMMITTED_MARKER);
        let last_committed = read_committed(&committed_marker)?;
        Ok(Staging {
            state,
            marker,
            committed_marker,
            staged: Mutex::new(staged),
            last_committed: Mutex::new(last_committed),
        })
    }

    /// The last staged recovery this replica saw committed (survives
    /// restarts).
    pub fn last_committed(&self) -> Option<CommittedRecovery> {
        self.last_committed.lock().clone()
    }

    /// A state replacement whose header is `replacement` is being applied
    /// at `position`: when it is what is staged here (same staging id),
    /// the staging is cleared and recorded as committed. Returns whether it
    /// was.
    pub(crate) fn on_replacement(
        &self,
        replacement: &SnapshotHeader,
        position: u64,
    ) -> Result<bool, StagingError> {
        let id = staging_id_of(replacement);
        if id.is_empty() {
            return Ok(false);
        }
        let ours = self
            .staged
            .lock()
            .as_ref()
            .is_some_and(|h| staging_id_of(h) == id);
        if !ours {
            return Ok(false);
        }
        let done = CommittedRecovery {
            staging_id: id.to_string(),
            position,
        };
        write_atomically(
            &self.committed_marker,
            Some(&frame::encode(
                COMMITTED_MARKER.as_bytes(),
                format!("{}\n{}", done.staging_id, done.position).as_bytes(),
            )),
        )
        .map_err(|e| StagingError::Marker {
            path: self.committed_marker.clone(),
            reason: e.to_string(),
        })?;
        *self.last_committed.lock() = Some(done);
        self.clear()?;
        Ok(true)
    }

    /// The staged state (to read; edit it through [`Self::delete_tasks`]).
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// What is staged, if anything.
    pub fn staged(&self) -> Result<Option<Staged>, StagingError> {
        let Some(header) = self.staged.lock().clone() else {
            return Ok(None);
        };
        Ok(Some(Staged {
            header,
            counts: self.state.counts()?,
        }))
    }

    fn require(&self) -> Result<SnapshotHeader, StagingError> {
        self.staged
            .lock()
            .clone()
            .ok_or(StagingError::NothingStaged)
    }

    /// Stages the snapshot stream `r` (a backup), checking it whole and
    /// that it is of `cluster_id` (when given).
    pub fn stage<R: Read>(
        &self,
        r: R,
        cluster_id: Option<&str>,
        now_unix_ms: u64,
    ) -> Result<Staged, StagingError> {
        self.stage_with(r, cluster_id, now_unix_ms, false)
    }

    /// [`Self::stage`], marked to be committed as soon as this replica
    /// leads when `auto_commit` (disaster restore).
    pub fn stage_with<R: Read>(
        &self,
        r: R,
        cluster_id: Option<&str>,
        now_unix_ms: u64,
        auto_commit: bool,
    ) -> Result<Staged, StagingError> {
        if let Some(h) = self.staged.lock().as_ref() {
            return Err(StagingError::AlreadyStaged {
                cluster_id: h.cluster_id.clone(),
                position: h.position,
            });
        }
        let here = Path::new("<staged backup>");
        let (reader, mut header) =
            SnapshotReader::open(r, ReaderOptions::default()).map_err(|source| {
                BackupError::Snapshot {
                    path: here.to_path_buf(),
                    source,
                }
            })?;
        if header.content != CONTENT {
            return Err(StagingError::WrongContent(header.content));
        }
        crate::backup::check_state_header(here, &header)?;
        if let Some(c) = cluster_id {
            check_cluster(&header, c).map_err(|source| BackupError::Snapshot {
                path: here.to_path_buf(),
                source,
            })?;
        }
        // The staging area's own positions count edits: the load is 1.
        load_stream(&self.state, here, reader, 1)?;
        header
            .labels
            .insert("staged_at_ms".into(), now_unix_ms.to_string());
        header
            .labels
            .insert(STAGING_ID_LABEL.into(), new_staging_id(now_unix_ms));
        if auto_commit {
            header
                .labels
                .insert(AUTO_COMMIT_LABEL.into(), "true".into());
        }
        self.write_marker(Some(&header))?;
        *self.staged.lock() = Some(header.clone());
        Ok(Staged {
            header,
            counts: self.state.counts()?,
        })
    }

    /// Tasks of the staged state matching `q`.
    pub fn tasks(&self, q: &TaskQuery) -> Result<Vec<ScheduledTask>, StagingError> {
        self.require()?;
        Ok(self.state.tasks(q)?)
    }

    /// Deletes from the staged state the tasks with these ids and those
    /// matching `q` (when given); returns how many were deleted.
    pub fn delete_tasks(&self, ids: &[String], q: Option<&TaskQuery>) -> Result<u64, StagingError> {
        self.require()?;
        let mut doomed: Vec<String> = Vec::new();
        for id in ids {
            if self.state.task(id)?.is_some() {
                doomed.push(id.clone());
            }
        }
        if let Some(q) = q {
            doomed.extend(self.state.tasks(q)?.into_iter().map(|t| t.task_id));
        }
        doomed.sort();
        doomed.dedup();
        let n = doomed.len() as u64;
        let per_txn = self.state.limits().max_entities_per_transaction.max(1);
        for chunk in doomed.chunks(per_txn) {
            let txn = Transaction {
                ops: vec![Op {
                    op: Some(op::Op::RemoveTasks(RemoveTasks {
                        task_ids: chunk.to_vec(),
                    })),
                }],
            };
            let at = self.state.applied() + 1;
            if let replog_state::Applied::Rejected(e) = self.state.apply(at, &txn)? {
                return Err(e.into());
            }
        }
        Ok(n)
    }

    /// Drops what is staged.
    pub fn unload(&self) -> Result<(), StagingError> {
        self.require()?;
        self.clear()
    }

    /// Drops what is staged, if anything (after a commit).
    pub(crate) fn clear(&self) -> Result<(), StagingError> {
        let next = self.state.applied() + 1;
        self.state
            .replace_all(next, std::iter::empty::<Result<_, StateError>>())?;
        self.write_marker(None)?;
        *self.staged.lock() = None;
        Ok(())
    }

    fn write_marker(&self, h: Option<&SnapshotHeader>) -> Result<(), StagingError> {
        let bytes = h.map(|h| frame::encode(MARKER.as_bytes(), &h.encode_to_vec()));
        write_atomically(&self.marker, bytes.as_deref()).map_err(|e| StagingError::Marker {
            path: self.marker.clone(),
            reason: e.to_string(),
        })
    }
}

/// Replaces the file at `path` with `bytes` (temporary name, fsync,
/// rename, directory fsync), or removes it for `None`.
fn write_atomically(path: &Path, bytes: Option<&[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    match bytes {
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(bytes) => {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        }
    }
}

fn read_committed(path: &Path) -> Result<Option<CommittedRecovery>, StagingError> {
    let bad = |reason: String| StagingError::Marker {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let location = path.display().to_string();
    let payload = frame::decode(COMMITTED_MARKER.as_bytes(), &bytes, 4096, || location)
        .map_err(|e| bad(e.to_string()))?;
    let text = std::str::from_utf8(payload).map_err(|e| bad(e.to_string()))?;
    let (id, position) = text
        .split_once('\n')
        .ok_or_else(|| bad("no position".into()))?;
    let position = position
        .parse()
        .map_err(|e| bad(format!("position {position:?}: {e}")))?;
    Ok(Some(CommittedRecovery {
        staging_id: id.to_string(),
        position,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replog_storage::{InitOptions, RocksStorage};

    /// Default log options with the store's column families registered.
    fn store_log_options() -> replog_log::LogOptions {
        let mut opts = replog_log::LogOptions::default();
        crate::SchedulerStore::register_column_families(&mut opts);
        opts
    }

    /// A fresh single replica at `dir/r` with `backup_bytes()` staged.
    fn staged_replica(dir: &Path) -> (PathBuf, Arc<replog_log::Log>, Staging, Staged) {
        let path = dir.join("r");
        RocksStorage::initialize(&path, &InitOptions::single_replica("c")).unwrap();
        let (log, staging) = staging_in(&path);
        let staged = staging.stage(&backup_bytes()[..], Some("c"), 7).unwrap();
        (path, log, staging, staged)
    }

    fn staging_in(dir: &Path) -> (Arc<replog_log::Log>, Staging) {
        let log = Arc::new(replog_log::Log::open(dir, store_log_options()).expect("open log"));
        let staging = Staging::open(log.shared_db(), log.path()).expect("open staging");
        (log, staging)
    }

    fn backup_bytes() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
        let id = crate::backup::SnapshotIdentity {
            cluster_id: "c".into(),
            ..Default::default()
        };
        let (w, _) = crate::backup::write_state(&state, &id, Vec::new(), |_| {}).expect("write");
        w
    }

    #[test]
    fn only_the_replacement_of_what_is_staged_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log, staging, staged) = staged_replica(dir.path());
        let id = staged.staging_id().to_string();
        assert!(!id.is_empty());

        // Another staging's replacement, and one without an id: untouched.
        let mut other = staged.header.clone();
        other
            .labels
            .insert(STAGING_ID_LABEL.into(), "someone-else".into());
        assert!(!staging.on_replacement(&other, 10).unwrap());
        let mut none = staged.header.clone();
        none.labels.remove(STAGING_ID_LABEL);
        assert!(!staging.on_replacement(&none, 10).unwrap());
        assert!(staging.staged().unwrap().is_some());
        assert!(staging.last_committed().is_none());

        // Its own: cleared and recorded, durably.
        assert!(staging.on_replacement(&staged.header, 12).unwrap());
        assert!(staging.staged().unwrap().is_none());
        let done = CommittedRecovery {
            staging_id: id.clone(),
            position: 12,
        };
        assert_eq!(staging.last_committed(), Some(done.clone()));
        // A replay of the same replacement changes nothing.
        assert!(!staging.on_replacement(&staged.header, 12).unwrap());
        drop(staging);
        drop(log);
        let (_log, staging) = staging_in(&path);
        assert_eq!(staging.last_committed(), Some(done));
        assert!(staging.staged().unwrap().is_none());
    }

    #[test]
    fn a_damaged_commit_record_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (path, _log, staging, staged) = staged_replica(dir.path());
            assert!(staging.on_replacement(&staged.header, 3).unwrap());
            path
        };
        let record = path.join(COMMITTED_MARKER);
        let mut bytes = std::fs::read(&record).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        std::fs::write(&record, &bytes).unwrap();
        let log = Arc::new(replog_log::Log::open(&path, store_log_options()).expect("open log"));
        match Staging::open(log.shared_db(), log.path()) {
            Err(StagingError::Marker { path: p, .. }) => assert_eq!(p, record),
            Err(e) => panic!("expected a marker error, got {e}"),
            Ok(_) => panic!("a damaged commit record was accepted"),
        }
    }
}
