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
//!   file records what it came from.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use replog_proto::snapshot::SnapshotHeader;
use replog_proto::state::{op, Op, RemoveTasks, ScheduledTask, Transaction};
use replog_snapshot::{check_cluster, ReaderOptions, SnapshotReader};
use replog_state::{EntityCounts, Limits, StateError, StateStore, TaskQuery};
use replog_storage::rocksdb::DB;
use replog_storage::{frame, CF_STAGING};

use crate::backup::{load_stream, BackupError, CONTENT};

const MARKER: &str = "staged-recovery";

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
}

/// The staging area of one replica.
pub struct Staging {
    state: StateStore,
    marker: PathBuf,
    staged: Mutex<Option<SnapshotHeader>>,
}

impl Staging {
    /// Opens the staging area in `db` (the replica's database) whose
    /// directory is `dir`.
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
        Ok(Staging {
            state,
            marker,
            staged: Mutex::new(staged),
        })
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
        let bad = |e: std::io::Error| StagingError::Marker {
            path: self.marker.clone(),
            reason: e.to_string(),
        };
        match h {
            None => match std::fs::remove_file(&self.marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(bad(e)),
                _ => Ok(()),
            },
            Some(h) => {
                let tmp = self.marker.with_extension("tmp");
                let bytes = frame::encode(MARKER.as_bytes(), &h.encode_to_vec());
                let f = std::fs::File::create(&tmp).map_err(bad)?;
                use std::io::Write;
                let mut w = std::io::BufWriter::new(f);
                w.write_all(&bytes).map_err(bad)?;
                let f = w.into_inner().map_err(|e| bad(e.into_error()))?;
                f.sync_all().map_err(bad)?;
                std::fs::rename(&tmp, &self.marker).map_err(bad)?;
                if let Some(dir) = self.marker.parent() {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(bad)?;
                }
                Ok(())
            }
        }
    }
}
