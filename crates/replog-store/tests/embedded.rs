//! The store on a real single-replica log (RocksDB, fsync on): writes go
//! through the log and come back through the applier.

use std::sync::Arc;

use replog_log::{Log, LogOptions, Position};
use replog_proto::state::{
    op, AdmitAgent, JobKey, MarkAgentReachable, Op, RemoveTasks, SaveTasks, ScheduleStatus,
    ScheduledTask, TaskConfig, Transaction,
};
use replog_state::TaskQuery;
use replog_storage::{InitOptions, RocksStorage};
use replog_store::{SchedulerStore, StoreError, StoreOptions};

/// Default log options with the store's column families registered.
fn store_log_options() -> LogOptions {
    let mut opts = LogOptions::default();
    SchedulerStore::register_column_families(&mut opts);
    opts
}

fn task(id: &str, role: &str, status: ScheduleStatus, pad: usize) -> ScheduledTask {
    ScheduledTask {
        task_id: id.to_string(),
        config: Some(TaskConfig {
            job: Some(JobKey {
                role: role.into(),
                environment: "prod".into(),
                name: "web".into(),
            }),
            executor_data: vec![7u8; pad].into(),
            ..Default::default()
        }),
        status: status as i32,
        ..Default::default()
    }
}

fn save(tasks: Vec<ScheduledTask>) -> Transaction {
    Transaction {
        ops: vec![Op {
            op: Some(op::Op::SaveTasks(SaveTasks { tasks })),
        }],
    }
}

/// A backup of `store`'s state (of cluster "store-test") in `dir/backups`.
fn backup_of(store: &SchedulerStore, dir: &std::path::Path) -> std::path::PathBuf {
    use replog_store::backup::{write_state, BackupDir, SnapshotIdentity};
    let backups = BackupDir::new(dir.join("backups"), 3).unwrap();
    let id = SnapshotIdentity {
        cluster_id: "store-test".into(),
        ..Default::default()
    };
    let (file, _) = backups
        .save(replog_storage::now_unix_ms(), |w| {
            write_state(store.state(), &id, w, |_| {}).map(|(_, s)| s)
        })
        .unwrap();
    file
}

fn open(dir: &std::path::Path, opts: StoreOptions) -> SchedulerStore {
    let log = Arc::new(Log::open(dir, store_log_options()).unwrap());
    SchedulerStore::open(log, opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_apply_through_the_log_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    // Small entries so that the big transaction below is framed.
    let opts = StoreOptions {
        max_entry_bytes: 16 * 1024,
        ..StoreOptions::default()
    };
    let (hash, applied) = {
        let store = open(&path, opts.clone());
        store.start_writer().await.unwrap();
        let p1 = store
            .submit(&save(vec![
                task("a", "www", ScheduleStatus::Running, 10),
                task("b", "www", ScheduleStatus::Pending, 10),
                task("c", "batch", ScheduleStatus::Running, 10),
            ]))
            .await
            .unwrap();
        assert!(store.applied() >= p1);
        assert_eq!(store.state().task("a").unwrap().unwrap().task_id, "a");

        // About 200 KiB: framed over many entries, applied whole.
        let big: Vec<ScheduledTask> = (0..200)
            .map(|i| {
                task(
                    &format!("big-{i:04}"),
                    "bulk",
                    ScheduleStatus::Pending,
                    1000,
                )
            })
            .collect();
        let before = store.log().reader().ending().value();
        let p2 = store.submit(&save(big)).await.unwrap();
        assert!(p2 > before + 10, "framed over {} entries", p2 - before);
        let bulk = store
            .state()
            .tasks(&TaskQuery {
                role: Some("bulk".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(bulk.len(), 200);

        // A state check rejects this one: the agent was never admitted.
        let reject = Transaction {
            ops: vec![
                Op {
                    op: Some(op::Op::RemoveTasks(RemoveTasks {
                        task_ids: vec!["a".into()],
                    })),
                },
                Op {
                    op: Some(op::Op::MarkAgentReachable(MarkAgentReachable {
                        agent_id: "nobody".into(),
                        at_ms: 1,
                    })),
                },
            ],
        };
        match store.submit(&reject).await {
            Err(StoreError::Rejected { reason, .. }) => {
                assert!(reason.contains("nobody"), "{reason}")
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        // Nothing of it was applied.
        assert!(store.state().task("a").unwrap().is_some());

        // An invalid one never reaches the log.
        let ending = store.log().reader().ending();
        assert!(matches!(
            store.submit(&Transaction { ops: vec![] }).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.log().reader().ending(), ending);

        store
            .submit(&Transaction {
                ops: vec![Op {
                    op: Some(op::Op::AdmitAgent(AdmitAgent {
                        agent_id: "agent-1".into(),
                        hostname: "host-1".into(),
                        at_ms: 5,
                        ..Default::default()
                    })),
                }],
            })
            .await
            .unwrap();
        assert_eq!(store.aborted_writes(), 0);
        let out = (store.state().state_hash().unwrap(), store.applied());
        store.shutdown().await;
        out
    };
    // Reopen: the state is where it was; nothing is applied twice.
    let store = open(&path, opts);
    store.wait_applied(applied).await.unwrap();
    assert_eq!(store.state().state_hash().unwrap(), hash);
    assert_eq!(store.state().counts().unwrap().total(), 3 + 200 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_write_cut_short_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let opts = StoreOptions {
        max_entry_bytes: 4096,
        ..StoreOptions::default()
    };
    let store = open(&path, opts.clone());
    store.start_writer().await.unwrap();
    // A writer that died after the first half of a framed write: append its
    // first entries straight into the log.
    let big: Vec<ScheduledTask> = (0..100)
        .map(|i| task(&format!("t{i}"), "r", ScheduleStatus::Pending, 500))
        .collect();
    let entries = replog_store::record::encode_transaction(&save(big), 42, 4096, 64 << 20).unwrap();
    assert!(entries.len() > 4);
    let mut w = store.log().writer();
    w.start().await.unwrap();
    for e in &entries[..entries.len() / 2] {
        w.append(e.clone()).await.unwrap();
    }
    // The next write aborts it; it applies, the half write never does.
    store
        .submit(&save(vec![task("after", "r", ScheduleStatus::Running, 1)]))
        .await
        .unwrap();
    assert_eq!(store.aborted_writes(), 1);
    assert_eq!(store.state().counts().unwrap().total(), 1);
    assert!(store.state().task("t0").unwrap().is_none());
}

/// A writer whose leadership ended between the parts of a framed write
/// (a large transaction, or a recovery commit's state replacement) leaves
/// it open, and the applied position waits before its beginning. The next
/// writer closes it when it starts: without that, nothing is written until
/// some client writes, so starting the writer, a recovery commit and every
/// linearizable read wait for the applied position and time out (found by
/// `backup_under_writes_stage_delete_commit_fails_the_writer_over`: a
/// leader change during the commit's replacement, and every retry of the
/// commit timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_write_left_open_never_holds_back_the_next_writer_or_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let opts = StoreOptions {
        max_entry_bytes: 4096,
        apply_timeout: std::time::Duration::from_secs(3),
        ..StoreOptions::default()
    };
    let store = open(&path, opts.clone());
    store.start_writer().await.unwrap();
    let before = store.applied();
    let big: Vec<ScheduledTask> = (0..100)
        .map(|i| task(&format!("t{i}"), "r", ScheduleStatus::Pending, 500))
        .collect();
    let entries = replog_store::record::encode_transaction(&save(big), 42, 4096, 64 << 20).unwrap();
    {
        let mut w = store.log().writer();
        w.start().await.unwrap();
        for e in &entries[..entries.len() / 2] {
            w.append(e.clone()).await.unwrap();
        }
    }
    // The store's state waits before the open write's beginning.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        store.applied(),
        before,
        "applied stays before an open framed write"
    );
    let ending = store.log().reader().ending().value();

    // A new writer (the next leader's, after a restart here) closes it.
    store.shutdown().await;
    let store = open(&path, opts);
    let at = store.start_writer().await.unwrap();
    assert!(
        at > ending,
        "the writer's closing record follows the open write"
    );
    assert_eq!(store.applied(), at);
    assert_eq!(store.aborted_writes(), 1);
    assert_eq!(store.sync_for_read().await.unwrap(), at);
    assert_eq!(store.state().counts().unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_recovery_replaces_the_state_at_one_position() {
    use replog_store::{Staging, StagingError};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let opts = StoreOptions {
        max_entry_bytes: 8 * 1024,
        ..StoreOptions::default()
    };
    let store = open(&path, opts);
    store.start_writer().await.unwrap();
    let statuses = [ScheduleStatus::Running, ScheduleStatus::Failed];
    for b in 0..10 {
        let batch: Vec<ScheduledTask> = (0..100)
            .map(|i| {
                let n = b * 100 + i;
                task(
                    &format!("t{n:04}"),
                    &format!("role{}", n % 3),
                    statuses[n % 2],
                    50,
                )
            })
            .collect();
        store.submit(&save(batch)).await.unwrap();
    }
    // A backup, taken while the store runs.
    let file = backup_of(&store, dir.path());
    // Changes after the backup: they will be gone after the commit.
    store
        .submit(&save(vec![task(
            "late",
            "role0",
            ScheduleStatus::Running,
            1,
        )]))
        .await
        .unwrap();

    let staging = Arc::new(Staging::open(store.log().shared_db(), store.log().path()).unwrap());
    // Nothing staged: commit and unload are refused.
    assert!(matches!(
        store.commit_recovery(&staging).await,
        Err(StoreError::Staging(StagingError::NothingStaged))
    ));
    assert!(matches!(staging.unload(), Err(StagingError::NothingStaged)));
    // A damaged copy and another cluster's backup are refused; nothing staged.
    let mut bytes = std::fs::read(&file).unwrap();
    let wrong = {
        let n = bytes.len();
        bytes[n / 2] ^= 0x10;
        bytes.clone()
    };
    assert!(staging.stage(&wrong[..], Some("store-test"), 1).is_err());
    assert!(staging.staged().unwrap().is_none());
    let good = std::fs::File::open(&file).unwrap();
    assert!(staging.stage(good, Some("other-cluster"), 1).is_err());
    assert!(staging.staged().unwrap().is_none());

    let staged = staging
        .stage(std::fs::File::open(&file).unwrap(), Some("store-test"), 1)
        .unwrap();
    assert_eq!(staged.counts.tasks, 1000);
    // One at a time.
    assert!(matches!(
        staging.stage(std::fs::File::open(&file).unwrap(), None, 2),
        Err(StagingError::AlreadyStaged { .. })
    ));
    // Delete the failed tasks of role1 by query, and one task by id.
    let q = TaskQuery {
        role: Some("role1".into()),
        statuses: vec![ScheduleStatus::Failed],
        ..Default::default()
    };
    let doomed = staging.tasks(&q).unwrap().len() as u64;
    assert!(doomed > 100);
    assert_eq!(
        staging.delete_tasks(&["t0000".into()], Some(&q)).unwrap(),
        doomed + 1
    );
    let expected_hash = staging.state().state_hash().unwrap();

    let position = store.commit_recovery(&staging).await.unwrap();
    assert_eq!(store.applied(), position);
    assert_eq!(store.state().state_hash().unwrap(), expected_hash);
    assert!(store.state().task("late").unwrap().is_none());
    assert_eq!(store.state().counts().unwrap().tasks, 1000 - doomed - 1);
    assert!(staging.staged().unwrap().is_none());
    // The writer learns the state was replaced, once; then writes again.
    match store
        .submit(&save(vec![task("x", "r", ScheduleStatus::Running, 1)]))
        .await
    {
        Err(StoreError::StateReplaced { position: p }) => assert_eq!(p, position),
        other => panic!("expected StateReplaced, got {other:?}"),
    }
    store
        .submit(&save(vec![task("x", "r", ScheduleStatus::Running, 1)]))
        .await
        .unwrap();
    let hash = store.state().state_hash().unwrap();
    let applied = store.applied();
    drop(staging);
    store.shutdown().await;
    // A restart reads the replacement from the log again, or starts past
    // it: either way the same state.
    let store = open(
        &path,
        StoreOptions {
            max_entry_bytes: 8 * 1024,
            ..StoreOptions::default()
        },
    );
    store.wait_applied(applied).await.unwrap();
    assert_eq!(store.state().state_hash().unwrap(), hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_staging_is_recorded_and_never_committed_twice() {
    use replog_store::{Staging, StagingError};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let opts = StoreOptions {
        max_entry_bytes: 8 * 1024,
        ..StoreOptions::default()
    };
    let start = |staging: Arc<Staging>, log: Arc<Log>| {
        SchedulerStore::open_with(log, opts.clone(), None, Some(staging)).unwrap()
    };
    let log = Arc::new(Log::open(&path, store_log_options()).unwrap());
    let staging = Arc::new(Staging::open(log.shared_db(), log.path()).unwrap());
    let store = start(staging.clone(), log);
    store.start_writer().await.unwrap();
    let tasks: Vec<ScheduledTask> = (0..200)
        .map(|n| task(&format!("t{n:03}"), "r", ScheduleStatus::Running, 40))
        .collect();
    store.submit(&save(tasks)).await.unwrap();
    let file = backup_of(&store, dir.path());
    store
        .submit(&save(vec![task("late", "r", ScheduleStatus::Running, 1)]))
        .await
        .unwrap();
    assert!(staging.last_committed().is_none());
    let staged = staging
        .stage(std::fs::File::open(&file).unwrap(), Some("store-test"), 5)
        .unwrap();
    let staging_id = staged.staging_id().to_string();
    assert!(!staging_id.is_empty(), "a staging gets an id");

    let position = store.commit_recovery(&staging).await.unwrap();
    // The applier cleared the staging area it holds when it applied the
    // replacement, and recorded which staging was committed where.
    assert!(staging.staged().unwrap().is_none());
    let done = staging.last_committed().expect("recorded");
    assert_eq!(done.staging_id, staging_id);
    assert_eq!(done.position, position);
    assert!(store.state().task("late").unwrap().is_none());
    // A second commit (an operator's retry) finds nothing staged: the
    // replacement is not written twice.
    let before = store.log().reader().ending();
    // (The first call after the replacement tells this writer the state
    // was replaced, as any write would.)
    assert!(matches!(
        store.commit_recovery(&staging).await,
        Err(StoreError::StateReplaced { position: p }) if p == position
    ));
    assert!(matches!(
        store.commit_recovery(&staging).await,
        Err(StoreError::Staging(StagingError::NothingStaged))
    ));
    // Nothing was written but the new writer's closing record.
    let reader = store.log().reader();
    let ending = reader.ending();
    let written = if ending > before {
        reader
            .read(Position::new(before.value() + 1), ending)
            .unwrap()
    } else {
        Vec::new()
    };
    assert!(written.len() <= 1, "{written:?}");
    drop(reader); // a reader holds the data directory
    assert!(
        written
            .iter()
            .all(|e| e.data == replog_store::record::close_framed_write()),
        "{written:?}"
    );
    store
        .submit(&save(vec![task("x", "r", ScheduleStatus::Running, 1)]))
        .await
        .unwrap();
    let after_hash = store.state().state_hash().unwrap();
    let after = store.applied();
    drop(staging);
    store.shutdown().await;

    // The record survives a restart, and a restart replays nothing twice.
    let log = Arc::new(Log::open(&path, store_log_options()).unwrap());
    let staging = Arc::new(Staging::open(log.shared_db(), log.path()).unwrap());
    assert_eq!(staging.last_committed().unwrap().staging_id, staging_id);
    assert!(staging.staged().unwrap().is_none());
    let store = start(staging.clone(), log);
    store.wait_applied(after).await.unwrap();
    assert_eq!(store.state().state_hash().unwrap(), after_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_a_newer_schema_stops_the_applier_instead_of_losing_fields() {
    use prost::Message;
    use replog_proto::store::{log_record, LogRecord};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let store = open(&path, StoreOptions::default());
    store.start_writer().await.unwrap();
    let before = store
        .submit(&save(vec![task("a", "r", ScheduleStatus::Running, 1)]))
        .await
        .unwrap();
    // A writer of a newer build (its transaction may hold fields this
    // build would drop).
    let newer = LogRecord {
        record: Some(log_record::Record::Transaction(save(vec![task(
            "b",
            "r",
            ScheduleStatus::Running,
            1,
        )]))),
        schema_version: replog_state::SCHEMA_VERSION + 1,
    };
    let mut w = store.log().writer();
    w.start().await.unwrap();
    let at = w.append(newer.encode_to_vec()).await.unwrap().value();
    let mut progress = store.watch_applied();
    let failure = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Some(f) = progress.borrow_and_update().failure.clone() {
                return f;
            }
            progress.changed().await.unwrap();
        }
    })
    .await
    .expect("the applier did not stop");
    assert!(failure.contains("upgrade this replica"), "{failure}");
    assert!(failure.contains(&format!("position {at}")), "{failure}");
    // Nothing of it (or after it) was applied.
    assert!(store.applied() < at && store.applied() >= before);
    assert!(store.state().task("b").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_a_log_opened_without_its_column_families_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let log = Arc::new(Log::open(&path, LogOptions::default()).unwrap());
    match SchedulerStore::open(log.clone(), StoreOptions::default()) {
        Err(e @ StoreError::NotRegistered(_)) => {
            assert!(e.to_string().contains("register_column_families"), "{e}")
        }
        Err(e) => panic!("expected NotRegistered, got {e}"),
        Ok(_) => panic!("a store opened on a log without its column families"),
    }
    drop(log);
    // Registered, the same replica opens a store (the families are created).
    let store = open(&path, StoreOptions::default());
    store.start_writer().await.unwrap();
    let db = store.log().shared_db();
    for name in replog_store::COLUMN_FAMILIES {
        assert!(db.cf_handle(name).is_some(), "{name}");
    }
}
