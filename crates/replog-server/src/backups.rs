//! Scheduled backups taken by the server itself (`replog replica --state
//! --backup-dir DIR --backup-interval 1h --max-saved-backups 48`).
//!
//! Every [`BackupConfig::interval`] the task started by
//! [`crate::ReplicaServer::start`] writes the local scheduler state into
//! [`BackupConfig::dir`] as a backup file, the same file `replog backup`
//! writes (`replog backup verify|inspect`, `replog initialize
//! --from-backup`, `replog recovery stage` read it).
//!
//! Choice: only the leader (once its writer may start, `leader_ready`)
//! takes a scheduled backup; a follower skips its turn (debug log). A
//! cluster thus writes one backup per interval, not one per replica. Every
//! replica should still be given a backup directory (its own, or a shared
//! one): after a failover the new leader goes on writing backups in its
//! directory, so the newest backup of the cluster is the newest file over
//! all replicas' directories.
//!
//! Invariants:
//! - a backup is the state at exactly one applied position, read through a
//!   RocksDB snapshot ([`write_state`]): writers never pause, memory stays
//!   at one chunk whatever the state's size;
//! - the leader first waits for a linearizable read point, so a backup holds
//!   every write acknowledged before the backup started;
//! - a file gets a backup name only once it was written whole, read back and
//!   checked ([`replog_snapshot::verify`]: every checksum, the counts, the
//!   same position and record count as written) and fsynced; the directory
//!   is fsynced after the rename, then pruned to the newest
//!   [`BackupConfig::max_saved`] ([`BackupDir::save`]). A failed or
//!   cancelled backup leaves no file under a backup name;
//! - a failure is counted (`replog_backups_failed_total`) and logged as a
//!   warning; the replica keeps serving and tries again at the next turn;
//! - one backup at a time: a backup that outlasts the interval delays the
//!   next turn (no burst to catch up);
//! - the task ends when the server stops; a backup under way is cancelled
//!   (its temporary file is removed) and is counted neither way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter, IntGauge, Registry};
use replog_log::Log;
use replog_snapshot::SnapshotError;
use replog_state::StateStore;
use replog_store::backup::{write_state, BackupDir, BackupError, SnapshotIdentity};
use replog_store::SchedulerStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Default of [`BackupConfig::interval`] (`--backup-interval`).
pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Default of [`BackupConfig::max_saved`] (`--max-saved-backups`).
pub const DEFAULT_MAX_SAVED_BACKUPS: usize = 48;

/// Where and how often the server takes backups.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub dir: PathBuf,
    pub interval: Duration,
    /// Newest backups kept in `dir` (at least 1).
    pub max_saved: usize,
}

/// The backup metrics, registered in the server's registry.
#[derive(Clone)]
pub(crate) struct BackupMetrics {
    succeeded: IntCounter,
    failed: IntCounter,
    last_success: Gauge,
    last_duration: Gauge,
    last_bytes: IntGauge,
}

impl BackupMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = BackupMetrics {
            succeeded: IntCounter::new(
                "replog_backups_succeeded_total",
                "scheduled backups written and verified",
            )?,
            failed: IntCounter::new(
                "replog_backups_failed_total",
                "scheduled backups that failed (nothing was left under a backup name)",
            )?,
            last_success: Gauge::new(
                "replog_backup_last_success_timestamp_seconds",
                "Unix time the last successful backup was completed at (0: none yet)",
            )?,
            last_duration: Gauge::new(
                "replog_backup_last_duration_seconds",
                "how long the last successful backup took",
            )?,
            last_bytes: IntGauge::new(
                "replog_backup_last_bytes",
                "size of the last successful backup file",
            )?,
        };
        registry.register(Box::new(m.succeeded.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.last_duration.clone()))?;
        registry.register(Box::new(m.last_bytes.clone()))?;
        Ok(m)
    }

    fn succeeded(&self, b: &Backup) {
        self.succeeded.inc();
        self.last_success
            .set(replog_storage::now_unix_ms() as f64 / 1000.0);
        self.last_duration.set(b.seconds);
        self.last_bytes.set(b.bytes as i64);
    }

    fn failed(&self) {
        self.failed.inc();
    }
}

/// One backup written.
#[derive(Debug, Clone)]
pub(crate) struct Backup {
    pub path: PathBuf,
    pub position: u64,
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// A writer that fails once `cancel` is set (the server is stopping).
struct Cancellable<'a, W> {
    inner: W,
    cancel: &'a AtomicBool,
}

impl<W: Write> Write for Cancellable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled: the server is stopping"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one backup of `state` into `dir` now, checks it, and makes it
/// durable under its backup name (blocking; see the module's invariants).
pub(crate) fn backup_once(
    state: &StateStore,
    id: &SnapshotIdentity,
    dir: &Path,
    max_saved: usize,
    cancel: &AtomicBool,
) -> Result<Backup, BackupError> {
    let started = Instant::now();
    let backups = BackupDir::new(dir, max_saved)?;
    let snap = |source| BackupError::Snapshot {
        path: dir.to_path_buf(),
        source,
    };
    let (path, v, written) = backups.save_verified(
        replog_storage::now_unix_ms(),
        |w| {
            let (_, written) = write_state(
                state,
                id,
                Cancellable {
                    inner: &mut *w,
                    cancel,
                },
                |_| {},
            )?;
            Ok(written)
        },
        // What was read back is what was written.
        |v, written| {
            if v.records != written.records || v.header.position != written.position {
                return Err(snap(SnapshotError::InvalidInput {
                    reason: format!(
                        "read back {} records at position {}, wrote {} at position {}",
                        v.records, v.header.position, written.records, written.position
                    ),
                }));
            }
            Ok(())
        },
    )?;
    let (position, records, bytes) = (written.position, written.records, v.stream_bytes);
    Ok(Backup {
        path,
        position,
        records,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The header identity of a backup taken now.
fn identity(log: &Log) -> SnapshotIdentity {
    let meta = log.meta();
    SnapshotIdentity {
        cluster_id: meta.cluster_id.clone(),
        term: log.progress().term,
        voters: meta.conf_state.voters.clone(),
        learners: meta.conf_state.learners.clone(),
        labels: [("replica".to_string(), meta.replica_id.to_string())].into(),
    }
}

/// Returns once the server is stopping (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` gives is dropped here, not held across awaits.
    let _ = stopping.wait_for(|s| *s).await;
}

/// What one turn did.
enum Turn {
    Done(Backup),
    Skipped(&'static str),
    Failed(String),
    Cancelled,
}

/// One turn: a backup if this replica leads.
async fn turn(
    store: &Arc<SchedulerStore>,
    config: &BackupConfig,
    stopping: &mut watch::Receiver<bool>,
) -> Turn {
    let p = store.log().progress();
    if !(p.is_leader && p.leader_ready) {
        return Turn::Skipped("not the leader");
    }
    if let Err(e) = store.sync_for_read().await {
        if !store.log().progress().is_leader {
            return Turn::Skipped("lost the leadership");
        }
        return Turn::Failed(format!("no read point: {e}"));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let job = {
        let (store, cancel, config) = (store.clone(), cancel.clone(), config.clone());
        let id = identity(store.log());
        tokio::task::spawn_blocking(move || {
            backup_once(store.state(), &id, &config.dir, config.max_saved, &cancel)
        })
    };
    tokio::pin!(job);
    let result = tokio::select! {
        r = &mut job => r,
        _ = stopped(stopping) => {
            cancel.store(true, Ordering::Relaxed);
            match job.await {
                // It may have finished meanwhile.
                Ok(Ok(b)) => return Turn::Done(b),
                _ => return Turn::Cancelled,
            }
        }
    };
    match result {
        Ok(Ok(b)) => Turn::Done(b),
        Ok(Err(e)) => Turn::Failed(e.to_string()),
        Err(e) => Turn::Failed(format!("the backup panicked: {e}")),
    }
}

/// Starts the backup task; it ends when `stopping` turns true (or its
/// sender is dropped).
pub(crate) fn spawn(
    store: Arc<SchedulerStore>,
    config: BackupConfig,
    metrics: BackupMetrics,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let period = config.interval.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(
            dir = %config.dir.display(),
            interval = ?config.interval,
            max_saved = config.max_saved,
            "scheduled backups on (taken while this replica leads)"
        );
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopped(&mut stopping) => return,
            }
            match turn(&store, &config, &mut stopping).await {
                Turn::Done(b) => {
                    metrics.succeeded(&b);
                    info!(
                        path = %b.path.display(),
                        position = b.position,
                        records = b.records,
                        bytes = b.bytes,
                        seconds = b.seconds,
                        "took a scheduled backup"
                    );
                }
                Turn::Skipped(why) => debug!(why, "no scheduled backup on this replica"),
                Turn::Failed(error) => {
                    metrics.failed();
                    warn!(dir = %config.dir.display(), %error, "a scheduled backup failed");
                }
                Turn::Cancelled => {
                    info!("the server is stopping: cancelled the backup under way");
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use replog_proto::state::{
        op, JobKey, Op, SaveTasks, ScheduleStatus, ScheduledTask, TaskConfig, Transaction,
    };
    use replog_state::Limits;
    use replog_store::backup::inspect;

    fn state_with_tasks(dir: &Path, n: u64) -> StateStore {
        let st = StateStore::open_standalone(dir, Limits::default()).unwrap();
        let job = JobKey {
            role: "www".into(),
            environment: "prod".into(),
            name: "web".into(),
        };
        let txn = Transaction {
            ops: vec![Op {
                op: Some(op::Op::SaveTasks(SaveTasks {
                    tasks: (0..n)
                        .map(|i| ScheduledTask {
                            task_id: format!("task-{i}"),
                            config: Some(TaskConfig {
                                job: Some(job.clone()),
                                ..Default::default()
                            }),
                            status: ScheduleStatus::Running as i32,
                            ..Default::default()
                        })
                        .collect(),
                })),
            }],
        };
        assert!(!st.apply(1, &txn).unwrap().is_rejected());
        st
    }

    fn id() -> SnapshotIdentity {
        SnapshotIdentity {
            cluster_id: "c".into(),
            term: 3,
            voters: vec![1, 2, 3],
            ..Default::default()
        }
    }

    #[test]
    fn backups_are_verified_and_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let st = state_with_tasks(&tmp.path().join("state"), 250);
        let dir = tmp.path().join("backups");
        let no = AtomicBool::new(false);
        let mut paths = Vec::new();
        for _ in 0..4 {
            let b = backup_once(&st, &id(), &dir, 2, &no).unwrap();
            assert_eq!(b.position, 1);
            assert_eq!(b.records, 250);
            assert_eq!(b.bytes, std::fs::metadata(&b.path).unwrap().len());
            let i = inspect(&b.path, Some("c")).unwrap();
            assert_eq!(i.counts.get("task"), Some(&250));
            assert_eq!(i.header.term, 3);
            paths.push(b.path);
        }
        let kept = BackupDir::new(&dir, 2).unwrap().list().unwrap();
        assert_eq!(kept, paths[2..]);
        // Nothing else in the directory (no temporary files left).
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn an_unwritable_dir_fails_and_a_cancelled_backup_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let st = state_with_tasks(&tmp.path().join("state"), 10);
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let no = AtomicBool::new(false);
        assert!(backup_once(&st, &id(), &file.join("backups"), 2, &no).is_err());

        let dir = tmp.path().join("backups");
        let yes = AtomicBool::new(true);
        let e = backup_once(&st, &id(), &dir, 2, &yes).unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn metrics_are_registered_and_counted() {
        let r = Registry::new();
        let m = BackupMetrics::register(&r).unwrap();
        m.failed();
        m.succeeded(&Backup {
            path: "p".into(),
            position: 7,
            records: 1,
            bytes: 1234,
            seconds: 0.5,
        });
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "replog_backups_succeeded_total 1",
            "replog_backups_failed_total 1",
            "replog_backup_last_duration_seconds 0.5",
            "replog_backup_last_bytes 1234",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in {text}");
        }
        assert!(text.contains("replog_backup_last_success_timestamp_seconds 1"));
    }
}
