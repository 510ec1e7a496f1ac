//! Snapshots and compaction on a real single-replica log: the leader
//! flushes its state and truncates the log; a state behind the log's
//! beginning catches up from a streamed snapshot (a scripted
//! [`SnapshotSource`] here; the replica server streams a peer's), refusing
//! broken, stale and foreign ones without changing anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replog_log::{Log, LogOptions};
use replog_proto::state::{op, JobKey, Op, SaveTasks, ScheduledTask, TaskConfig, Transaction};
use replog_state::{Limits, StateStore};
use replog_storage::{InitOptions, RocksStorage};
use replog_store::backup::{write_state, SnapshotIdentity};
use replog_store::{FetchFuture, SchedulerStore, SnapshotSource, StoreOptions};

/// Default log options with the store's column families registered.
fn store_log_options() -> LogOptions {
    let mut opts = LogOptions::default();
    SchedulerStore::register_column_families(&mut opts);
    opts
}

fn save(id: u64) -> Transaction {
    Transaction {
        ops: vec![Op {
            op: Some(op::Op::SaveTasks(SaveTasks {
                tasks: vec![ScheduledTask {
                    task_id: format!("t{id:05}"),
                    config: Some(TaskConfig {
                        job: Some(JobKey {
                            role: "r".into(),
                            environment: "prod".into(),
                            name: "web".into(),
                        }),
                        executor_data: vec![1u8; 100].into(),
                        ..Default::default()
                    }),
                    status: replog_proto::state::ScheduleStatus::Running as i32,
                    ..Default::default()
                }],
            })),
        }],
    }
}

fn snapshot_bytes(state: &StateStore, cluster_id: &str) -> Vec<u8> {
    let id = SnapshotIdentity {
        cluster_id: cluster_id.into(),
        ..Default::default()
    };
    write_state(state, &id, Vec::new(), |_| {}).unwrap().0
}

/// Serves `streams[attempt]` (the last one from then on), in small pieces.
struct Scripted {
    streams: Vec<(String, Vec<u8>)>,
    fetched: AtomicU64,
}

impl SnapshotSource for Scripted {
    fn fetch(&self, attempt: u64) -> FetchFuture<'_> {
        self.fetched.fetch_add(1, Ordering::SeqCst);
        let i = (attempt as usize).min(self.streams.len() - 1);
        let (name, bytes) = self.streams[i].clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for piece in bytes.chunks(700) {
                    if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                        return;
                    }
                }
            });
            Ok((name, rx))
        })
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_and_a_state_behind_the_log_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let log = Arc::new(Log::open(&path, store_log_options()).unwrap());
    let opts = StoreOptions {
        snapshot_interval_entries: 20,
        snapshot_keep_entries: 5,
        ..StoreOptions::default()
    };
    let store = SchedulerStore::open(log.clone(), opts.clone()).unwrap();
    store.start_writer().await.unwrap();
    for i in 0..60 {
        store.submit(&save(i)).await.unwrap();
    }
    let reader = log.reader();
    wait_for("a compaction", || {
        store.compactions() >= 1 && reader.beginning().value() > 2
    })
    .await;
    let applied = store.applied();
    let beginning = reader.beginning().value();
    // The kept tail: the log still holds what followers a little behind
    // need, and nothing the state has not applied was dropped.
    assert!(
        beginning + opts.snapshot_keep_entries - 1 <= applied,
        "{beginning} {applied}"
    );
    let hash = store.state().state_hash().unwrap();
    let good = snapshot_bytes(store.state(), "store-test");
    let foreign = snapshot_bytes(store.state(), "another-cluster");
    store.shutdown().await;

    // A state that is far behind the log (as a replica that was down, or
    // wiped): position 0, while the log begins past 2.
    let stale_dir = tempfile::tempdir().unwrap();
    let stale = StateStore::open_standalone(stale_dir.path(), Limits::default()).unwrap();
    let stale_bytes = snapshot_bytes(&stale, "store-test");
    drop(stale);
    let behind_dir = tempfile::tempdir().unwrap();
    let behind = StateStore::open_standalone(behind_dir.path(), Limits::default()).unwrap();
    assert_eq!(behind.applied(), 0);
    let source = Arc::new(Scripted {
        streams: vec![
            ("broken".into(), good[..good.len() / 2].to_vec()),
            ("behind".into(), stale_bytes),
            ("foreign".into(), foreign),
            ("good".into(), good),
        ],
        fetched: AtomicU64::new(0),
    });
    let store = SchedulerStore::start_with_source(
        log.clone(),
        behind,
        opts,
        Some(source.clone() as Arc<dyn SnapshotSource>),
    );
    store.wait_applied(applied).await.unwrap();
    assert_eq!(store.snapshot_catch_ups(), 1);
    assert_eq!(source.fetched.load(Ordering::SeqCst), 4);
    assert_eq!(store.state().state_hash().unwrap(), hash);
    assert_eq!(store.state().counts().unwrap().tasks, 60);
    // It goes on applying the log after the snapshot's position.
    store.start_writer().await.unwrap();
    store.submit(&save(1000)).await.unwrap();
    assert_eq!(store.state().counts().unwrap().tasks, 61);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_source_a_state_behind_the_log_stops_the_applier() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    RocksStorage::initialize(&path, &InitOptions::single_replica("store-test")).unwrap();
    let log = Arc::new(Log::open(&path, store_log_options()).unwrap());
    let opts = StoreOptions {
        snapshot_interval_entries: 10,
        snapshot_keep_entries: 2,
        ..StoreOptions::default()
    };
    let store = SchedulerStore::open(log.clone(), opts.clone()).unwrap();
    store.start_writer().await.unwrap();
    for i in 0..30 {
        store.submit(&save(i)).await.unwrap();
    }
    let reader = log.reader();
    wait_for("a compaction", || reader.beginning().value() > 2).await;
    store.shutdown().await;
    let behind_dir = tempfile::tempdir().unwrap();
    let behind = StateStore::open_standalone(behind_dir.path(), Limits::default()).unwrap();
    let store = SchedulerStore::start(log.clone(), behind, opts);
    let mut rx = store.watch_applied();
    wait_for("the applier to stop", || {
        rx.borrow_and_update().failure.is_some()
    })
    .await;
    let why = rx.borrow().failure.clone().unwrap();
    assert!(why.contains("needs a state snapshot from a peer"), "{why}");
}
