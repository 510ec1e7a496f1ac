//! The SchedulerState API of a single replica server (`--state`) over real
//! gRPC: submit, queries, summary, and the change feed.

use std::net::TcpListener;

use replog_proto::state::{
    op, JobKey, Op, RemoveTasks, SaveTasks, ScheduleStatus, ScheduledTask, TaskConfig, Transaction,
};
use replog_proto::store::scheduler_state_client::SchedulerStateClient;
use replog_proto::store::{
    EntitiesRequest, ReadMode, SubmitRequest, SummaryRequest, TaskQueryRequest, WatchRequest,
};
use replog_server::{ReplicaServer, ServerConfig, StoreOptions};
use replog_storage::{InitOptions, RocksStorage};

fn task(id: &str, role: &str) -> ScheduledTask {
    ScheduledTask {
        task_id: id.into(),
        config: Some(TaskConfig {
            job: Some(JobKey {
                role: role.into(),
                environment: "prod".into(),
                name: "web".into(),
            }),
            ..Default::default()
        }),
        status: ScheduleStatus::Running as i32,
        ..Default::default()
    }
}

fn txn(op: op::Op) -> Transaction {
    Transaction {
        ops: vec![Op { op: Some(op) }],
    }
}

async fn start(
    dir: &std::path::Path,
) -> (
    ReplicaServer,
    SchedulerStateClient<tonic::transport::Channel>,
) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = ServerConfig::new(dir, port, "api-test", 1);
    cfg.state = Some(StoreOptions::default());
    let server = ReplicaServer::start(cfg).await.unwrap();
    server
        .wait_voting(std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let client = SchedulerStateClient::connect(format!("http://{}", server.local_addr()))
        .await
        .unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_query_summary_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r1");
    RocksStorage::initialize(&path, &InitOptions::single_replica("api-test")).unwrap();
    let (server, mut c) = start(&path).await;
    // Writes wait for leadership inside the server.
    let mut watch = None;
    let mut first = 0;
    for attempt in 0..100 {
        match c
            .submit(SubmitRequest {
                transaction: Some(txn(op::Op::SaveTasks(SaveTasks {
                    tasks: vec![task("a", "www"), task("b", "batch")],
                }))),
            })
            .await
        {
            Ok(r) => {
                first = r.into_inner().position;
                break;
            }
            Err(s) if attempt < 99 => {
                assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    if watch.is_none() {
        watch = Some(
            c.watch(WatchRequest { from_position: 0 })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let second = c
        .submit(SubmitRequest {
            transaction: Some(txn(op::Op::RemoveTasks(RemoveTasks {
                task_ids: vec!["a".into()],
            }))),
        })
        .await
        .unwrap()
        .into_inner()
        .position;
    assert!(second > first);

    // The feed replays the first write and streams the second.
    let mut w = watch.unwrap();
    let e1 = w.message().await.unwrap().unwrap();
    assert_eq!(e1.position, first);
    let mut keys: Vec<(String, String, bool)> = e1
        .changes
        .iter()
        .map(|c| (c.kind.clone(), c.key.clone(), c.removed))
        .collect();
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().all(|(k, _, removed)| k == "task" && !removed),
        "{keys:?}"
    );
    let e2 = w.message().await.unwrap().unwrap();
    assert_eq!(e2.position, second);
    assert_eq!(e2.changes.len(), 1);
    assert!(e2.changes[0].removed);
    assert!(e2.changes[0].key.contains('a'), "{:?}", e2.changes[0]);

    // Queries and the summary, linearizable.
    let mut s = c
        .query_tasks(TaskQueryRequest {
            mode: ReadMode::Linearizable as i32,
            role: "batch".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(t) = s.message().await.unwrap() {
        got.push(t.task_id);
    }
    assert_eq!(got, ["b"]);
    let sum = c
        .summary(SummaryRequest {
            mode: ReadMode::Linearizable as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sum.counts["task"], 1);
    assert!(sum.applied >= second);
    assert_eq!(sum.state_hash.len(), 64);

    // Other entities, by kind and key.
    let q = replog_proto::state::Quota {
        role: "www".into(),
        resources: vec![replog_proto::state::Resource {
            name: "cpus".into(),
            scalar: 8.0,
        }],
    };
    let cron = replog_proto::state::CronJob {
        key: Some(JobKey {
            role: "www".into(),
            environment: "prod".into(),
            name: "nightly".into(),
        }),
        cron_schedule: "0 3 * * *".into(),
        task_config: task("x", "www").config,
        instance_count: 1,
        ..Default::default()
    };
    c.submit(SubmitRequest {
        transaction: Some(Transaction {
            ops: vec![
                Op {
                    op: Some(op::Op::SaveQuota(replog_proto::state::SaveQuota {
                        quota: Some(q.clone()),
                    })),
                },
                Op {
                    op: Some(op::Op::SaveCronJob(replog_proto::state::SaveCronJob {
                        job: Some(cron.clone()),
                    })),
                },
            ],
        }),
    })
    .await
    .unwrap();
    let entities = |kind: &str, key: &str| EntitiesRequest {
        mode: ReadMode::Linearizable as i32,
        kind: kind.into(),
        key: key.into(),
    };
    let mut got = Vec::new();
    let mut s = c
        .entities(entities("quota", "www"))
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = s.message().await.unwrap() {
        got.push(e);
    }
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].entity,
        Some(replog_proto::state::entity::Entity::Quota(q))
    );
    let mut s = c
        .entities(entities("cron job", "www/prod/nightly"))
        .await
        .unwrap()
        .into_inner();
    let e = s.message().await.unwrap().unwrap();
    assert_eq!(
        e.entity,
        Some(replog_proto::state::entity::Entity::CronJob(cron))
    );
    assert!(s.message().await.unwrap().is_none());
    let mut s = c
        .entities(entities("quota", "nobody"))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_none());
    for (kind, key) in [("planet", ""), ("cron job", "no-slashes"), ("task", "")] {
        let e = c.entities(entities(kind, key)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{kind} {key}: {e:?}"
        );
    }

    // The raw log API refuses writes to a state log.
    let mut raw = replog_proto::client::replog_client_client::ReplogClientClient::connect(format!(
        "http://{}",
        server.local_addr()
    ))
    .await
    .unwrap();
    let e = raw
        .truncate(replog_proto::client::TruncateRequest { to: 2 })
        .await
        .unwrap_err();
    assert_eq!(e.metadata().get("replog-error").unwrap(), "STATE_LOG");
    let e = raw
        .append(replog_proto::client::AppendRequest {
            data: b"raw".to_vec().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.metadata().get("replog-error").unwrap(), "STATE_LOG");

    // An invalid transaction is refused with a stable code.
    let bad = c
        .submit(SubmitRequest {
            transaction: Some(Transaction { ops: vec![] }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad.metadata().get("replog-error").unwrap(), "INVALID");

    // After a restart the feed remembers nothing older: a watcher from an
    // old position must reload.
    drop(w);
    server.shutdown().await.unwrap();
    let (_server, mut c) = start(&path).await;
    let err = c
        .watch(WatchRequest {
            from_position: first - 1,
        })
        .await
        .expect_err("an old position is refused");
    assert_eq!(err.metadata().get("replog-error").unwrap(), "MUST_RELOAD");
}
