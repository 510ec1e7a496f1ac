//! The store on a real single-replica log (RocksDB, fsync on): writes go
//! through the log and come back through the applier.

use std::sync::Arc;

use replog_log::{Log, LogOptions};
use replog_proto::state::{
    op, AdmitAgent, JobKey, MarkAgentReachable, Op, RemoveTasks, SaveTasks, ScheduleStatus,
    ScheduledTask, TaskConfig, Transaction,
};
use replog_state::{Limits, StateStore, TaskQuery};
use replog_storage::{InitOptions, RocksStorage, CF_STATE};
use replog_store::{SchedulerStore, StoreError, StoreOptions};

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

fn open(dir: &std::path::Path, opts: StoreOptions) -> SchedulerStore {
    let log = Arc::new(Log::open(dir, LogOptions::default()).unwrap());
    let state = StateStore::open(log.shared_db(), CF_STATE, Limits::default()).unwrap();
    SchedulerStore::start(log, state, opts)
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
        (store.state().state_hash().unwrap(), store.applied())
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
