//! Unit tests of the state store (the model-based proptest is in
//! `model_tests`).

use std::collections::BTreeMap;
use std::sync::Arc;

use replog_proto::state::{
    entity, op, AdmitAgent, Agent, AgentState, CronJob, Entity, HostAttributes,
    HostMaintenanceRequest, JobInstanceUpdateEvent, JobKey, JobUpdate, JobUpdateAction,
    JobUpdateEvent, JobUpdateKey, JobUpdateStatus, MarkAgentReachable, MarkAgentUnreachable, Op,
    Quota, RemoveAgent, RemoveCronJob, RemoveHostMaintenanceRequest, RemoveJobUpdates, RemoveQuota,
    RemoveTasks, Resource, SaveCronJob, SaveHostAttributes, SaveHostMaintenanceRequest,
    SaveJobInstanceUpdateEvent, SaveJobUpdate, SaveJobUpdateEvent, SaveQuota,
    SaveSchedulerMetadata, SaveTasks, ScheduleStatus, ScheduledTask, SchedulerMetadata, TaskConfig,
    Transaction,
};
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use tempfile::TempDir;

use crate::keys::{self, entity_key, EntityKey};
use crate::*;

mod model_tests;

// ---------------------------------------------------------------- builders

pub(crate) fn job(role: &str, env: &str, name: &str) -> JobKey {
    JobKey {
        role: role.into(),
        environment: env.into(),
        name: name.into(),
    }
}

pub(crate) fn task(id: &str, job: &JobKey, status: ScheduleStatus, host: &str) -> ScheduledTask {
    let mut metadata = BTreeMap::new();
    metadata.insert("zone".to_string(), "z1".to_string());
    metadata.insert("rack".to_string(), "r7".to_string());
    ScheduledTask {
        task_id: id.into(),
        config: Some(TaskConfig {
            job: Some(job.clone()),
            owner_user: "www".into(),
            resources: vec![Resource {
                name: "cpus".into(),
                scalar: 0.5,
            }],
            metadata,
            ..Default::default()
        }),
        status: status as i32,
        agent_host: host.into(),
        agent_id: if host.is_empty() {
            String::new()
        } else {
            format!("agent-{host}")
        },
        ..Default::default()
    }
}

pub(crate) fn txn(ops: Vec<op::Op>) -> Transaction {
    Transaction {
        ops: ops.into_iter().map(|o| Op { op: Some(o) }).collect(),
    }
}

pub(crate) fn save_tasks(tasks: Vec<ScheduledTask>) -> op::Op {
    op::Op::SaveTasks(SaveTasks { tasks })
}

pub(crate) fn remove_tasks(ids: &[&str]) -> op::Op {
    op::Op::RemoveTasks(RemoveTasks {
        task_ids: ids.iter().map(|s| s.to_string()).collect(),
    })
}

pub(crate) fn update_key(job: &JobKey, id: &str) -> JobUpdateKey {
    JobUpdateKey {
        job: Some(job.clone()),
        id: id.into(),
    }
}

pub(crate) fn admit(id: &str, host: &str, at: i64) -> op::Op {
    op::Op::AdmitAgent(AdmitAgent {
        agent_id: id.into(),
        hostname: host.into(),
        at_ms: at,
        info: [("os".to_string(), "linux".to_string())].into(),
    })
}

pub(crate) fn mark_unreachable(id: &str, at: i64) -> op::Op {
    op::Op::MarkAgentUnreachable(MarkAgentUnreachable {
        agent_id: id.into(),
        at_ms: at,
    })
}

pub(crate) fn mark_reachable(id: &str, at: i64) -> op::Op {
    op::Op::MarkAgentReachable(MarkAgentReachable {
        agent_id: id.into(),
        at_ms: at,
    })
}

pub(crate) fn remove_agent(id: &str, at: i64) -> op::Op {
    op::Op::RemoveAgent(RemoveAgent {
        agent_id: id.into(),
        at_ms: at,
    })
}

fn store() -> (TempDir, StateStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
    (dir, s)
}

fn done(a: Applied) -> Vec<Change> {
    match a {
        Applied::Done { changes } => changes,
        Applied::Rejected(e) => panic!("rejected: {e}"),
    }
}

fn rejected(a: Applied) -> StateError {
    match a {
        Applied::Done { changes } => panic!("applied: {changes:?}"),
        Applied::Rejected(e) => e,
    }
}

/// Every key of the column family, raw.
fn raw_keys(s: &StateStore) -> Vec<Vec<u8>> {
    let cf = s.db().cf_handle(s.column_family()).unwrap();
    let mut it = s.db().raw_iterator_cf(cf);
    it.seek_to_first();
    let mut out = Vec::new();
    while let Some(k) = it.key() {
        out.push(k.to_vec());
        it.next();
    }
    it.status().unwrap();
    out
}

/// Every task, by a full scan.
fn all_tasks(s: &StateStore) -> Vec<ScheduledTask> {
    s.tasks(&TaskQuery::default()).unwrap()
}

/// `q` through the indexes equals `q` as a filter over a full scan.
fn check_query(s: &StateStore, q: &TaskQuery) -> Vec<ScheduledTask> {
    let got = s.tasks(q).unwrap();
    let mut want: Vec<ScheduledTask> = all_tasks(s).into_iter().filter(|t| q.matches(t)).collect();
    if let Some(l) = q.limit {
        want.truncate(l);
    }
    assert_eq!(got, want, "query {q:?}");
    got
}

fn ids(tasks: &[ScheduledTask]) -> Vec<&str> {
    tasks.iter().map(|t| t.task_id.as_str()).collect()
}

// ---------------------------------------------------------------- entities

#[test]
fn apply_and_query_each_entity_kind() {
    let (_d, s) = store();
    assert_eq!(s.applied(), 0);
    let j = job("www", "prod", "web");
    let cron = CronJob {
        key: Some(j.clone()),
        owner_user: "www".into(),
        cron_schedule: "*/5 * * * *".into(),
        instance_count: 2,
        ..Default::default()
    };
    let quota = Quota {
        role: "www".into(),
        resources: vec![Resource {
            name: "ram_mb".into(),
            scalar: 1024.0,
        }],
    };
    let attrs = HostAttributes {
        host: "h1".into(),
        mode: replog_proto::state::MaintenanceMode::None as i32,
        agent_id: "agent-h1".into(),
        ..Default::default()
    };
    let update = JobUpdate {
        key: Some(update_key(&j, "u1")),
        user: "alice".into(),
        created_timestamp_ms: 5,
        ..Default::default()
    };
    let maint = HostMaintenanceRequest {
        host: "h1".into(),
        timeout_secs: 60,
        ..Default::default()
    };
    let meta = SchedulerMetadata {
        framework_id: "fw-1".into(),
        version: "1.0".into(),
        details: [("k".to_string(), "v".to_string())].into(),
    };
    let changes = done(
        s.apply(
            1,
            &txn(vec![
                save_tasks(vec![task("t1", &j, ScheduleStatus::Running, "h1")]),
                op::Op::SaveCronJob(SaveCronJob {
                    job: Some(cron.clone()),
                }),
                op::Op::SaveQuota(SaveQuota {
                    quota: Some(quota.clone()),
                }),
                op::Op::SaveHostAttributes(SaveHostAttributes {
                    attributes: Some(attrs.clone()),
                }),
                op::Op::SaveJobUpdate(SaveJobUpdate {
                    update: Some(update.clone()),
                }),
                op::Op::SaveHostMaintenanceRequest(SaveHostMaintenanceRequest {
                    request: Some(maint.clone()),
                }),
                op::Op::SaveSchedulerMetadata(SaveSchedulerMetadata {
                    metadata: Some(meta.clone()),
                }),
                admit("a1", "h1", 100),
            ]),
        )
        .unwrap(),
    );
    assert_eq!(changes.len(), 8);
    assert!(changes.iter().all(|c| c.position == 1 && !c.removed));
    let kinds: Vec<u32> = changes.iter().map(|c| c.kind()).collect();
    assert_eq!(kinds, ALL_KINDS.to_vec(), "changes come in key order");
    assert_eq!(s.applied(), 1);

    assert_eq!(
        s.task("t1").unwrap().unwrap(),
        task("t1", &j, ScheduleStatus::Running, "h1")
    );
    assert_eq!(s.task("nope").unwrap(), None);
    assert_eq!(s.cron_job(&j).unwrap().unwrap(), cron);
    assert_eq!(s.cron_jobs().unwrap(), vec![cron.clone()]);
    assert_eq!(s.quota("www").unwrap().unwrap(), quota);
    assert_eq!(s.quotas().unwrap(), vec![quota.clone()]);
    assert_eq!(s.host_attributes("h1").unwrap().unwrap(), attrs);
    assert_eq!(s.all_host_attributes().unwrap(), vec![attrs.clone()]);
    let details = s.job_update(&update_key(&j, "u1")).unwrap().unwrap();
    assert_eq!(details.update.as_ref().unwrap(), &update);
    assert!(details.update_events.is_empty());
    assert_eq!(s.job_updates(Some(&j)).unwrap().len(), 1);
    assert_eq!(
        s.job_updates(Some(&job("www", "prod", "we")))
            .unwrap()
            .len(),
        0
    );
    assert_eq!(s.job_updates(None).unwrap().len(), 1);
    assert_eq!(s.maintenance_request("h1").unwrap().unwrap(), maint);
    assert_eq!(s.maintenance_requests().unwrap(), vec![maint.clone()]);
    assert_eq!(s.scheduler_metadata().unwrap().unwrap(), meta);
    let agent = s.agent("a1").unwrap().unwrap();
    assert_eq!(agent.state(), AgentState::Admitted);
    assert_eq!(agent.admitted_at_ms, 100);
    assert_eq!(agent.hostname, "h1");
    assert_eq!(s.agents(None).unwrap().len(), 1);
    assert_eq!(s.agents(Some(AgentState::Removed)).unwrap().len(), 0);

    let c = s.counts().unwrap();
    assert_eq!(c.tasks, 1);
    assert_eq!(c.tasks_by_status.get(&ScheduleStatus::Running), Some(&1));
    assert_eq!(
        (
            c.cron_jobs,
            c.quotas,
            c.host_attributes,
            c.job_updates,
            c.maintenance_requests,
            c.scheduler_metadata,
            c.agents
        ),
        (1, 1, 1, 1, 1, 1, 1)
    );
    assert_eq!(c.total(), 8);

    // Removals.
    let changes = done(
        s.apply(
            2,
            &txn(vec![
                remove_tasks(&["t1", "never-existed"]),
                op::Op::RemoveCronJob(RemoveCronJob {
                    key: Some(j.clone()),
                }),
                op::Op::RemoveQuota(RemoveQuota { role: "www".into() }),
                op::Op::RemoveJobUpdates(RemoveJobUpdates {
                    keys: vec![update_key(&j, "u1"), update_key(&j, "u2")],
                }),
                op::Op::RemoveHostMaintenanceRequest(RemoveHostMaintenanceRequest {
                    host: "h1".into(),
                }),
            ]),
        )
        .unwrap(),
    );
    assert_eq!(changes.len(), 5, "{changes:?}");
    assert!(changes.iter().all(|c| c.removed && c.position == 2));
    let c = s.counts().unwrap();
    assert_eq!(c.total(), 3, "{c:?}");
    assert!(c.tasks_by_status.is_empty());
    s.verify().unwrap();
}

#[test]
fn save_job_update_keeps_events_and_events_need_the_update() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    let key = update_key(&j, "u1");
    let ev = |status: JobUpdateStatus| {
        op::Op::SaveJobUpdateEvent(SaveJobUpdateEvent {
            key: Some(key.clone()),
            event: Some(JobUpdateEvent {
                status: status as i32,
                timestamp_ms: 7,
                ..Default::default()
            }),
        })
    };
    let iev = op::Op::SaveJobInstanceUpdateEvent(SaveJobInstanceUpdateEvent {
        key: Some(key.clone()),
        event: Some(JobInstanceUpdateEvent {
            instance_id: 3,
            timestamp_ms: 8,
            action: JobUpdateAction::InstanceUpdating as i32,
        }),
    });
    // Unknown update: the whole transaction is refused.
    let e = rejected(
        s.apply(1, &txn(vec![ev(JobUpdateStatus::RollingForward)]))
            .unwrap(),
    );
    assert!(matches!(e, StateError::UnknownEntity { op: 0, .. }), "{e}");
    let e = rejected(s.apply(2, &txn(vec![iev.clone()])).unwrap());
    assert!(matches!(e, StateError::UnknownEntity { .. }), "{e}");
    assert_eq!(s.applied(), 2);

    let save = |user: &str| {
        op::Op::SaveJobUpdate(SaveJobUpdate {
            update: Some(JobUpdate {
                key: Some(key.clone()),
                user: user.into(),
                ..Default::default()
            }),
        })
    };
    // Created and given events in one transaction.
    done(
        s.apply(
            3,
            &txn(vec![save("a"), ev(JobUpdateStatus::RollingForward), iev]),
        )
        .unwrap(),
    );
    done(s.apply(4, &txn(vec![save("b")])).unwrap());
    let d = s.job_update(&key).unwrap().unwrap();
    assert_eq!(d.update.unwrap().user, "b");
    assert_eq!(d.update_events.len(), 1);
    assert_eq!(d.instance_events.len(), 1);
}

#[test]
fn agent_state_machine() {
    let (_d, s) = store();
    let state = |s: &StateStore| s.agent("a").unwrap().map(|a| a.state());
    // Unknown agent: every transition is refused.
    for (p, o) in [
        (1, mark_unreachable("a", 1)),
        (2, mark_reachable("a", 1)),
        (3, remove_agent("a", 1)),
    ] {
        let e = rejected(s.apply(p, &txn(vec![o])).unwrap());
        assert!(matches!(e, StateError::UnknownEntity { .. }), "{e}");
    }
    done(s.apply(4, &txn(vec![admit("a", "h", 10)])).unwrap());
    assert_eq!(state(&s), Some(AgentState::Admitted));
    // ADMITTED: not reachable-able.
    let e = rejected(s.apply(5, &txn(vec![mark_reachable("a", 11)])).unwrap());
    assert!(
        matches!(&e, StateError::WrongState { expected, .. } if *expected == "UNREACHABLE"),
        "{e}"
    );
    done(s.apply(6, &txn(vec![mark_unreachable("a", 12)])).unwrap());
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!(
        (a.state(), a.unreachable_at_ms),
        (AgentState::Unreachable, 12)
    );
    let e = rejected(s.apply(7, &txn(vec![mark_unreachable("a", 13)])).unwrap());
    assert!(matches!(e, StateError::WrongState { .. }), "{e}");
    done(s.apply(8, &txn(vec![mark_reachable("a", 14)])).unwrap());
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!(
        (a.state(), a.unreachable_at_ms, a.admitted_at_ms),
        (AgentState::Admitted, 0, 10)
    );
    done(s.apply(9, &txn(vec![remove_agent("a", 15)])).unwrap());
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!((a.state(), a.removed_at_ms), (AgentState::Removed, 15));
    let e = rejected(s.apply(10, &txn(vec![remove_agent("a", 16)])).unwrap());
    assert!(matches!(e, StateError::WrongState { .. }), "{e}");
    // Readmission of a REMOVED agent.
    done(s.apply(11, &txn(vec![admit("a", "h2", 17)])).unwrap());
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!(
        (
            a.state(),
            a.admitted_at_ms,
            a.removed_at_ms,
            a.hostname.as_str()
        ),
        (AgentState::Admitted, 17, 0, "h2")
    );
    // Readmission of an UNREACHABLE agent.
    done(s.apply(12, &txn(vec![mark_unreachable("a", 18)])).unwrap());
    done(s.apply(13, &txn(vec![admit("a", "h2", 19)])).unwrap());
    assert_eq!(state(&s), Some(AgentState::Admitted));
    assert_eq!(s.applied(), 13);
}

// ---------------------------------------------------------------- indexes

#[test]
fn index_queries_follow_status_host_and_removal() {
    let (_d, s) = store();
    let web = job("www", "prod", "web");
    let api = job("www", "prod", "api");
    let db = job("data", "prod", "db");
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (j, status, host) = match i % 3 {
            0 => (&web, ScheduleStatus::Running, "h1"),
            1 => (&api, ScheduleStatus::Pending, ""),
            _ => (&db, ScheduleStatus::Running, "h2"),
        };
        tasks.push(task(&format!("t{i:02}"), j, status, host));
    }
    done(s.apply(1, &txn(vec![save_tasks(tasks)])).unwrap());

    let queries = |s: &StateStore| {
        let qs = vec![
            TaskQuery::job(&web),
            TaskQuery::job(&api),
            TaskQuery {
                role: Some("www".into()),
                ..Default::default()
            },
            TaskQuery {
                role: Some("www".into()),
                environment: Some("prod".into()),
                ..Default::default()
            },
            TaskQuery {
                statuses: vec![ScheduleStatus::Running],
                ..Default::default()
            },
            TaskQuery {
                statuses: vec![ScheduleStatus::Running, ScheduleStatus::Pending],
                limit: Some(7),
                ..Default::default()
            },
            TaskQuery {
                statuses: vec![ScheduleStatus::Finished, ScheduleStatus::Pending],
                ..Default::default()
            },
            TaskQuery {
                agent_host: Some("h1".into()),
                ..Default::default()
            },
            TaskQuery {
                agent_host: Some("h2".into()),
                statuses: vec![ScheduleStatus::Running],
                ..Default::default()
            },
            TaskQuery {
                agent_id: Some("agent-h2".into()),
                ..Default::default()
            },
            TaskQuery {
                task_ids: vec!["t05".into(), "t01".into(), "zz".into(), "t01".into()],
                ..Default::default()
            },
            TaskQuery {
                role: Some("data".into()),
                limit: Some(2),
                ..Default::default()
            },
            TaskQuery {
                job_name: Some("web".into()),
                ..Default::default()
            },
        ];
        qs.iter()
            .map(|q| check_query(s, q).len())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        queries(&s),
        vec![10, 10, 20, 20, 20, 7, 10, 10, 10, 10, 2, 2, 10]
    );
    assert_eq!(
        ids(&s.tasks(&TaskQuery::job(&web)).unwrap())[..3],
        ["t00", "t03", "t06"]
    );

    // Status and host changes, removals.
    let mut t0 = task("t00", &web, ScheduleStatus::Finished, "");
    t0.failure_count = 1;
    let t3 = task("t03", &web, ScheduleStatus::Running, "h2");
    let t4 = task("t04", &db, ScheduleStatus::Pending, "h9"); // changes job too
    done(
        s.apply(
            2,
            &txn(vec![
                save_tasks(vec![t0, t3, t4]),
                remove_tasks(&["t06", "t09"]),
            ]),
        )
        .unwrap(),
    );
    s.verify().unwrap();
    assert_eq!(
        queries(&s),
        vec![8, 9, 17, 17, 17, 7, 11, 6, 11, 11, 2, 2, 8]
    );
    assert!(s
        .tasks(&TaskQuery {
            agent_host: Some("h9".into()),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .all(|t| t.task_id == "t04"));
    assert_eq!(
        ids(&s
            .tasks(&TaskQuery {
                statuses: vec![ScheduleStatus::Finished],
                ..Default::default()
            })
            .unwrap()),
        ["t00"]
    );

    // Remove everything: no index entry may remain.
    let all: Vec<String> = all_tasks(&s).into_iter().map(|t| t.task_id).collect();
    let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    done(s.apply(3, &txn(vec![remove_tasks(&all)])).unwrap());
    assert_eq!(queries(&s), vec![0; 13]);
    let keys = raw_keys(&s);
    assert_eq!(
        keys,
        vec![keys::META_KEY.to_vec()],
        "only the meta record is left"
    );
}

#[test]
fn several_ops_on_one_task_in_one_transaction() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    let changes = done(
        s.apply(
            1,
            &txn(vec![
                save_tasks(vec![task("t", &j, ScheduleStatus::Pending, "h1")]),
                save_tasks(vec![task("t", &j, ScheduleStatus::Running, "h2")]),
                remove_tasks(&["t"]),
                save_tasks(vec![task("t", &j, ScheduleStatus::Killed, "h3")]),
            ]),
        )
        .unwrap(),
    );
    assert_eq!(changes.len(), 1);
    s.verify().unwrap();
    let h = |h: &str| TaskQuery {
        agent_host: Some(h.into()),
        ..Default::default()
    };
    assert_eq!(s.tasks(&h("h1")).unwrap().len(), 0);
    assert_eq!(s.tasks(&h("h3")).unwrap().len(), 1);
    // Saving the same bytes again changes nothing.
    let changes = done(
        s.apply(
            2,
            &txn(vec![save_tasks(vec![task(
                "t",
                &j,
                ScheduleStatus::Killed,
                "h3",
            )])]),
        )
        .unwrap(),
    );
    assert!(changes.is_empty());
    // Remove then re-save within one transaction: no change either.
    let changes = done(
        s.apply(
            3,
            &txn(vec![
                remove_tasks(&["t"]),
                save_tasks(vec![task("t", &j, ScheduleStatus::Killed, "h3")]),
            ]),
        )
        .unwrap(),
    );
    assert!(changes.is_empty());
    s.verify().unwrap();
}

// ---------------------------------------------------------------- rejection and atomicity

#[test]
fn a_rejected_transaction_changes_nothing_but_advances_applied() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    done(
        s.apply(
            1,
            &txn(vec![save_tasks(vec![task(
                "t1",
                &j,
                ScheduleStatus::Running,
                "h",
            )])]),
        )
        .unwrap(),
    );
    let before = s.state_hash().unwrap();
    let raw_before = raw_keys(&s);
    let mut sub = s.subscribe();
    // The last op refers to an unknown agent: the first ops must not stick.
    let e = rejected(
        s.apply(
            5,
            &txn(vec![
                save_tasks(vec![task("t2", &j, ScheduleStatus::Running, "h")]),
                remove_tasks(&["t1"]),
                admit("a1", "h", 1),
                mark_reachable("nobody", 2),
            ]),
        )
        .unwrap(),
    );
    assert!(
        matches!(&e, StateError::UnknownEntity { op: 3, kind, .. } if *kind == "agent"),
        "{e}"
    );
    assert!(e.is_rejection());
    assert_eq!(s.applied(), 5);
    assert_eq!(s.state_hash().unwrap(), before);
    assert_eq!(raw_keys(&s), raw_before);
    assert!(s.task("t1").unwrap().is_some());
    assert!(s.agent("a1").unwrap().is_none());
    assert!(
        sub.try_recv().unwrap().is_none(),
        "a rejection sends nothing"
    );

    // A transaction that fails validation is refused the same way.
    let e = rejected(
        s.apply(
            6,
            &txn(vec![
                save_tasks(vec![task("t3", &j, ScheduleStatus::Running, "h")]),
                op::Op::RemoveQuota(RemoveQuota { role: "".into() }),
            ]),
        )
        .unwrap(),
    );
    assert!(matches!(e, StateError::InvalidOp { index: 1, .. }), "{e}");
    assert_eq!(s.applied(), 6);
    assert!(s.task("t3").unwrap().is_none());

    // Positions must increase.
    for p in [5, 6] {
        let e = s.apply(p, &txn(vec![admit("a", "h", 1)])).unwrap_err();
        assert!(
            matches!(e, StateError::PositionNotAfterApplied { applied: 6, .. }),
            "{e}"
        );
        assert!(s.skip_to(p).is_err());
    }
    s.skip_to(9).unwrap();
    assert_eq!(s.applied(), 9);
    assert_eq!(s.state_hash().unwrap(), before);
}

#[test]
fn a_record_over_the_limit_rejects_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_record_bytes: 300,
        ..Limits::default()
    };
    let s = StateStore::open_standalone(dir.path(), limits).unwrap();
    let j = job("r", "e", "n");
    let key = update_key(&j, "u");
    done(
        s.apply(
            1,
            &txn(vec![op::Op::SaveJobUpdate(SaveJobUpdate {
                update: Some(JobUpdate {
                    key: Some(key.clone()),
                    ..Default::default()
                }),
            })]),
        )
        .unwrap(),
    );
    // Events accumulate until the record would exceed the limit.
    let mut position = 1;
    let rejection = loop {
        position += 1;
        let a = s
            .apply(
                position,
                &txn(vec![op::Op::SaveJobUpdateEvent(SaveJobUpdateEvent {
                    key: Some(key.clone()),
                    event: Some(JobUpdateEvent {
                        status: JobUpdateStatus::RollingForward as i32,
                        message: "x".repeat(40),
                        ..Default::default()
                    }),
                })]),
            )
            .unwrap();
        if let Applied::Rejected(e) = a {
            break e;
        }
        assert!(position < 20);
    };
    assert!(
        matches!(rejection, StateError::TooLarge { .. }),
        "{rejection}"
    );
    assert_eq!(s.applied(), position);
    s.verify().unwrap();
}

#[test]
fn validate_refuses_malformed_transactions() {
    let l = Limits::default();
    let j = job("r", "e", "n");
    let invalid_op = |o: op::Op| {
        let e = StateStore::validate(&txn(vec![o]), &l).unwrap_err();
        assert!(matches!(e, StateError::InvalidOp { index: 0, .. }), "{e}");
        e.to_string()
    };
    // Empty transaction, op without a variant.
    assert!(matches!(
        StateStore::validate(&Transaction::default(), &l),
        Err(StateError::InvalidTransaction { .. })
    ));
    let e = StateStore::validate(
        &Transaction {
            ops: vec![Op { op: None }],
        },
        &l,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no variant"), "{e}");
    // Empty ids, keys, roles, hosts.
    assert!(
        invalid_op(save_tasks(vec![task("", &j, ScheduleStatus::Running, "")])).contains("task_id")
    );
    invalid_op(save_tasks(vec![task(
        "t",
        &job("", "e", "n"),
        ScheduleStatus::Running,
        "",
    )]));
    invalid_op(remove_tasks(&[""]));
    invalid_op(op::Op::RemoveQuota(RemoveQuota { role: "".into() }));
    invalid_op(op::Op::SaveHostAttributes(SaveHostAttributes {
        attributes: Some(HostAttributes::default()),
    }));
    invalid_op(admit("a", "", 1));
    invalid_op(admit("", "h", 1));
    invalid_op(mark_reachable("", 1));
    // Missing sub-messages.
    assert!(invalid_op(op::Op::SaveCronJob(SaveCronJob { job: None })).contains("missing"));
    invalid_op(op::Op::SaveCronJob(SaveCronJob {
        job: Some(CronJob::default()),
    }));
    invalid_op(op::Op::SaveQuota(SaveQuota { quota: None }));
    invalid_op(op::Op::SaveSchedulerMetadata(SaveSchedulerMetadata {
        metadata: None,
    }));
    invalid_op(op::Op::SaveJobUpdate(SaveJobUpdate {
        update: Some(JobUpdate::default()),
    }));
    invalid_op(op::Op::SaveJobUpdateEvent(SaveJobUpdateEvent {
        key: Some(update_key(&j, "u")),
        event: None,
    }));
    let mut no_config = task("t", &j, ScheduleStatus::Running, "");
    no_config.config = None;
    invalid_op(save_tasks(vec![no_config]));
    // Enum values out of range, unspecified statuses.
    let mut bad = task("t", &j, ScheduleStatus::Running, "");
    bad.status = 99;
    assert!(invalid_op(save_tasks(vec![bad])).contains("99"));
    let mut unspecified = task("t", &j, ScheduleStatus::Running, "");
    unspecified.status = 0;
    invalid_op(save_tasks(vec![unspecified]));
    invalid_op(op::Op::SaveJobInstanceUpdateEvent(
        SaveJobInstanceUpdateEvent {
            key: Some(update_key(&j, "u")),
            event: Some(JobInstanceUpdateEvent {
                action: 42,
                ..Default::default()
            }),
        },
    ));
    invalid_op(op::Op::SaveHostAttributes(SaveHostAttributes {
        attributes: Some(HostAttributes {
            host: "h".into(),
            mode: -1,
            ..Default::default()
        }),
    }));
    // Keys over the limit.
    invalid_op(remove_tasks(&[&"x".repeat(l.max_key_bytes + 1)]));

    // Sizes and counts.
    let small = Limits {
        max_transaction_bytes: 1000,
        max_ops: 3,
        max_entities_per_transaction: 5,
        ..Limits::default()
    };
    let big = txn(vec![save_tasks(
        (0..20)
            .map(|i| task(&format!("t{i}"), &j, ScheduleStatus::Running, "h"))
            .collect(),
    )]);
    assert!(matches!(
        StateStore::validate(&big, &small),
        Err(StateError::TooLarge { .. })
    ));
    let many = txn((0..4).map(|_| admit("a", "h", 1)).collect());
    let e = StateStore::validate(&many, &small).unwrap_err();
    assert!(e.to_string().contains("ops"), "{e}");
    let wide = txn(vec![remove_tasks(&["1", "2", "3", "4", "5", "6"])]);
    let e = StateStore::validate(&wide, &small).unwrap_err();
    assert!(e.to_string().contains("entities"), "{e}");
    StateStore::validate(&txn(vec![remove_tasks(&["1", "2", "3", "4", "5"])]), &small).unwrap();
}

// ---------------------------------------------------------------- persistence

#[test]
fn applied_position_and_state_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let j = job("r", "e", "n");
    let hash = {
        let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
        done(
            s.apply(
                3,
                &txn(vec![save_tasks(vec![task(
                    "t",
                    &j,
                    ScheduleStatus::Running,
                    "h",
                )])]),
            )
            .unwrap(),
        );
        rejected(s.apply(4, &txn(vec![remove_agent("x", 1)])).unwrap());
        s.skip_to(7).unwrap();
        s.state_hash().unwrap()
    };
    let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
    assert_eq!(s.applied(), 7);
    assert_eq!(s.generation(), 1);
    assert_eq!(s.state_hash().unwrap(), hash);
    assert!(s.task("t").unwrap().is_some());
    assert!(s.apply(7, &txn(vec![admit("a", "h", 1)])).is_err());
    done(s.apply(8, &txn(vec![admit("a", "h", 1)])).unwrap());
}

#[test]
fn stores_in_column_families_of_a_shared_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = ["state", "staging"].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = Arc::new(DB::open_cf_descriptors(&opts, dir.path(), cfs).unwrap());
    let state = StateStore::open(db.clone(), "state", Limits::default()).unwrap();
    let staging = StateStore::open(db.clone(), "staging", Limits::default()).unwrap();
    let j = job("r", "e", "n");
    done(
        state
            .apply(
                1,
                &txn(vec![save_tasks(vec![task(
                    "t",
                    &j,
                    ScheduleStatus::Running,
                    "h",
                )])]),
            )
            .unwrap(),
    );
    assert_eq!(staging.applied(), 0);
    assert!(staging.task("t").unwrap().is_none());
    // Stage the state, then compare.
    staging
        .replace_all(state.applied(), state.export().unwrap())
        .unwrap();
    assert_eq!(staging.state_hash().unwrap(), state.state_hash().unwrap());
    assert_eq!(staging.applied(), 1);
    let e = StateStore::open(db, "nope", Limits::default()).unwrap_err();
    assert!(matches!(e, StateError::MissingColumnFamily(_)), "{e}");
}

// ---------------------------------------------------------------- replace_all

fn many_tasks(n: usize) -> Vec<ScheduledTask> {
    let statuses = [
        ScheduleStatus::Pending,
        ScheduleStatus::Running,
        ScheduleStatus::Finished,
    ];
    (0..n)
        .map(|i| {
            let j = job(&format!("role{}", i % 7), "prod", &format!("job{}", i % 50));
            task(
                &format!("task-{i:07}"),
                &j,
                statuses[i % 3],
                &format!("host{}", i % 100),
            )
        })
        .collect()
}

fn entities_of(tasks: Vec<ScheduledTask>) -> impl Iterator<Item = Result<Entity, StateError>> {
    tasks.into_iter().map(|t| {
        Ok(Entity {
            entity: Some(entity::Entity::Task(t)),
        })
    })
}

#[test]
fn replace_all_with_50000_tasks_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let n = 50_000;
    let (hash, counts) = {
        let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
        let j = job("old", "e", "n");
        done(
            s.apply(
                1,
                &txn(vec![
                    save_tasks(vec![task("old-task", &j, ScheduleStatus::Running, "h")]),
                    admit("old-agent", "h", 1),
                ]),
            )
            .unwrap(),
        );
        let mut sub = s.subscribe();
        // Reversed order: replace_all must not depend on key order.
        let mut tasks = many_tasks(n);
        tasks.reverse();
        let report = s.replace_all(1000, entities_of(tasks)).unwrap();
        assert_eq!(report.entities, n as u64);
        assert_eq!(report.generation, 2);
        assert!(report.batches > 1, "{report:?}");
        assert_eq!(s.applied(), 1000);
        assert!(matches!(
            sub.try_recv().unwrap(),
            Some(StateEvent::Reset { position: 1000 })
        ));
        assert!(s.task("old-task").unwrap().is_none());
        assert!(s.agent("old-agent").unwrap().is_none());
        let c = s.counts().unwrap();
        assert_eq!(c.tasks, n as u64);
        assert_eq!(c.total(), n as u64);
        (s.state_hash().unwrap(), c)
    };
    let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
    assert_eq!(s.applied(), 1000);
    assert_eq!(s.generation(), 2);
    assert_eq!(s.counts().unwrap(), counts);
    assert_eq!(s.state_hash().unwrap(), hash);
    let v = s.verify().unwrap();
    assert_eq!(v.entities, n as u64);
    assert_eq!(v.index_entries, 5 * n as u64);
    let q = TaskQuery {
        role: Some("role3".into()),
        environment: Some("prod".into()),
        job_name: Some("job10".into()),
        ..Default::default()
    };
    let got = check_query(&s, &q);
    assert!(got.len() >= n / 350, "{}", got.len());
    assert_eq!(
        s.tasks(&TaskQuery {
            agent_host: Some("host42".into()),
            ..Default::default()
        })
        .unwrap()
        .len(),
        n / 100
    );
    // No key of generation 1 is left.
    let old = keys::gen_prefix(1);
    assert!(raw_keys(&s).iter().all(|k| !k.starts_with(&old)));
}

#[test]
fn a_crash_in_the_middle_of_replace_all_leaves_the_old_state() {
    let dir = tempfile::tempdir().unwrap();
    let j = job("r", "e", "n");
    let (hash, raw) = {
        let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
        done(
            s.apply(
                1,
                &txn(vec![save_tasks(vec![task(
                    "t",
                    &j,
                    ScheduleStatus::Running,
                    "h",
                )])]),
            )
            .unwrap(),
        );
        let hash = s.state_hash().unwrap();
        let raw = raw_keys(&s);
        // Write part of the next generation, then "crash" before the switch.
        let cf = s.db().cf_handle(s.column_family()).unwrap();
        let (count, batches) = s
            .write_generation(cf, 2, entities_of(many_tasks(20_000)))
            .unwrap();
        assert_eq!(count, 20_000);
        assert!(batches > 1);
        // Readers still see the old state in the meantime.
        assert_eq!(s.state_hash().unwrap(), hash);
        assert_eq!(s.counts().unwrap().tasks, 1);
        assert!(raw_keys(&s).len() > raw.len());
        (hash, raw)
    };
    let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
    assert_eq!(s.applied(), 1);
    assert_eq!(s.generation(), 1);
    assert_eq!(s.state_hash().unwrap(), hash);
    assert_eq!(raw_keys(&s), raw, "the half-written generation is gone");
    s.verify().unwrap();
    // And the next replacement works.
    s.replace_all(2, entities_of(many_tasks(10))).unwrap();
    assert_eq!(s.counts().unwrap().tasks, 10);
}

#[test]
fn replace_all_that_fails_keeps_the_old_state() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    done(
        s.apply(
            1,
            &txn(vec![save_tasks(vec![task(
                "t",
                &j,
                ScheduleStatus::Running,
                "h",
            )])]),
        )
        .unwrap(),
    );
    let hash = s.state_hash().unwrap();
    let raw = raw_keys(&s);
    // The source fails.
    let source = many_tasks(100).into_iter().enumerate().map(|(i, t)| {
        if i == 50 {
            Err(std::io::Error::other("disk gone"))
        } else {
            Ok(Entity {
                entity: Some(entity::Entity::Task(t)),
            })
        }
    });
    let e = s.replace_all(9, source).unwrap_err();
    assert!(matches!(e, StateError::Source { after: 50, .. }), "{e}");
    // A duplicate (out of order, in another batch).
    let dup = Limits {
        replace_batch_bytes: 1000,
        ..Limits::default()
    };
    let d2 = tempfile::tempdir().unwrap();
    let s2 = StateStore::open_standalone(d2.path(), dup).unwrap();
    let mut tasks = many_tasks(30);
    tasks.push(tasks[3].clone());
    let e = s2.replace_all(1, entities_of(tasks)).unwrap_err();
    assert!(
        matches!(e, StateError::InvalidEntity { index: 30, .. }),
        "{e}"
    );
    assert_eq!(raw_keys(&s2).len(), 1);
    // An invalid entity, an empty one.
    let e = s
        .replace_all(9, vec![Ok::<_, StateError>(Entity { entity: None })])
        .unwrap_err();
    assert!(
        matches!(e, StateError::InvalidEntity { index: 0, .. }),
        "{e}"
    );
    let e = s
        .replace_all(
            9,
            vec![Ok::<_, StateError>(Entity {
                entity: Some(entity::Entity::Agent(Agent {
                    agent_id: "a".into(),
                    hostname: "h".into(),
                    ..Default::default()
                })),
            })],
        )
        .unwrap_err();
    assert!(e.to_string().contains("state"), "{e}");
    assert_eq!(s.applied(), 1);
    assert_eq!(s.generation(), 1);
    assert_eq!(s.state_hash().unwrap(), hash);
    assert_eq!(raw_keys(&s), raw);
}

// ---------------------------------------------------------------- hashes, exports

#[test]
fn state_hash_is_independent_of_batching_and_positions() {
    let (_d1, a) = store();
    let (_d2, b) = store();
    let j = job("r", "e", "n");
    let ops = vec![
        save_tasks(vec![
            task("t1", &j, ScheduleStatus::Running, "h1"),
            task("t2", &j, ScheduleStatus::Pending, ""),
        ]),
        admit("a1", "h1", 5),
        op::Op::SaveQuota(SaveQuota {
            quota: Some(Quota {
                role: "r".into(),
                ..Default::default()
            }),
        }),
        remove_tasks(&["t2"]),
        mark_unreachable("a1", 6),
    ];
    done(a.apply(1, &txn(ops.clone())).unwrap());
    let mut p = 10;
    for o in ops {
        p += 3;
        done(b.apply(p, &txn(vec![o])).unwrap());
    }
    let ha = a.state_hash().unwrap();
    assert_eq!(ha.len(), 64);
    assert_eq!(ha, b.state_hash().unwrap());
    // An export replayed into a third store hashes the same.
    let (_d3, c) = store();
    c.replace_all(1, a.export().unwrap()).unwrap();
    assert_eq!(c.state_hash().unwrap(), ha);
    // One change makes it differ.
    done(b.apply(100, &txn(vec![mark_reachable("a1", 7)])).unwrap());
    assert_ne!(b.state_hash().unwrap(), ha);
    // An empty store has a fixed hash.
    let (_d4, e1) = store();
    let (_d5, e2) = store();
    e2.skip_to(5).unwrap();
    assert_eq!(e1.state_hash().unwrap(), e2.state_hash().unwrap());
}

#[test]
fn export_during_concurrent_writes_is_consistent() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    // Every position adds exactly one task, so the state at position p has
    // p tasks.
    let writes = 3000u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            for p in 1..=writes {
                let t = task(&format!("t{p:06}"), &j, ScheduleStatus::Running, "h");
                done(s.apply(p, &txn(vec![save_tasks(vec![t])])).unwrap());
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut exports = 0;
        let mut mid = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) || exports < 3 {
            let export = s.export().unwrap();
            let position = export.position();
            let mut n = 0u64;
            for e in export {
                let e = e.unwrap();
                assert_eq!(entity_kind(&e), KIND_TASK);
                n += 1;
                // Slow the reader a little so that writes overlap it.
                if n.is_multiple_of(500) {
                    std::thread::yield_now();
                }
            }
            assert_eq!(n, position, "an export holds the state of its position");
            if position > 0 && position < writes {
                mid += 1;
            }
            exports += 1;
        }
        writer.join().unwrap();
        eprintln!("{exports} exports, {mid} while writing");
    });
    assert_eq!(s.export().unwrap().count() as u64, writes);
}

// ---------------------------------------------------------------- corruption

#[test]
fn a_flipped_byte_is_corrupt_not_a_panic() {
    let (_d, s) = store();
    let j = job("r", "e", "n");
    done(
        s.apply(
            1,
            &txn(vec![save_tasks(vec![
                task("t1", &j, ScheduleStatus::Running, "h"),
                task("t2", &j, ScheduleStatus::Running, "h"),
            ])]),
        )
        .unwrap(),
    );
    let cf = s.db().cf_handle(s.column_family()).unwrap();
    let key = entity_key(s.generation(), &EntityKey::Task("t2".into()));
    let value = s.db().get_cf(cf, &key).unwrap().unwrap();
    for i in [0, 3, value.len() / 2, value.len() - 1] {
        let mut bad = value.clone();
        bad[i] ^= 0x10;
        s.db().put_cf(cf, &key, &bad).unwrap();
        let check = |r: Result<(), StateError>, what: &str| {
            let e = r.expect_err(what);
            assert!(e.is_corruption(), "{what}: {e}");
            assert!(e.to_string().contains("t2"), "{what}: {e}");
        };
        check(s.task("t2").map(|_| ()), "task");
        check(s.tasks(&TaskQuery::default()).map(|_| ()), "scan");
        check(s.tasks(&TaskQuery::job(&j)).map(|_| ()), "index");
        check(s.state_hash().map(|_| ()), "hash");
        check(s.verify().map(|_| ()), "verify");
        check(
            s.export()
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .map(|_| ()),
            "export",
        );
        // Applying on top of it is an error, not a rejection: nothing moves.
        let e = s.apply(2, &txn(vec![remove_tasks(&["t2"])])).unwrap_err();
        assert!(e.is_corruption(), "{e}");
        assert_eq!(s.applied(), 1);
        // The intact task still reads.
        assert!(s.task("t1").unwrap().is_some());
    }
    // A damaged meta record.
    s.db().put_cf(cf, &key, &value).unwrap();
    s.verify().unwrap();
    let meta = s.db().get_cf(cf, keys::META_KEY).unwrap().unwrap();
    let mut bad = meta.clone();
    bad[7] ^= 1;
    s.db().put_cf(cf, keys::META_KEY, &bad).unwrap();
    let e = s.task("t1").unwrap_err();
    assert!(e.to_string().contains("meta"), "{e}");
    // A stale index entry.
    s.db().put_cf(cf, keys::META_KEY, &meta).unwrap();
    let mut stale = keys::gen_prefix(1);
    stale.extend_from_slice(&keys::host_index_prefix("elsewhere"));
    stale.extend_from_slice(b"t1");
    s.db()
        .put_cf(cf, &stale, replog_storage::frame::encode(&stale, &[]))
        .unwrap();
    let e = s.verify().unwrap_err();
    assert!(e.to_string().contains("stale"), "{e}");
}

// ---------------------------------------------------------------- changes

#[test]
fn changes_since_and_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        change_ring: 10,
        broadcast_capacity: 4,
        ..Limits::default()
    };
    let s = StateStore::open_standalone(dir.path(), limits).unwrap();
    let j = job("r", "e", "n");
    let mut sub = s.subscribe();
    let mut lagging = s.subscribe();
    let mut lost = s.subscribe();
    assert_eq!(sub.position(), 0);
    for p in 1..=3u64 {
        done(
            s.apply(
                p,
                &txn(vec![save_tasks(vec![task(
                    &format!("t{p}"),
                    &j,
                    ScheduleStatus::Running,
                    "h",
                )])]),
            )
            .unwrap(),
        );
    }
    done(s.apply(4, &txn(vec![remove_tasks(&["t1"])])).unwrap());
    let c = s.changes_since(2).unwrap();
    assert_eq!(
        c,
        vec![
            Change {
                position: 3,
                key: EntityKey::Task("t3".into()),
                removed: false
            },
            Change {
                position: 4,
                key: EntityKey::Task("t1".into()),
                removed: true
            },
        ]
    );
    assert_eq!(s.changes_since(4).unwrap(), vec![]);
    for p in 1..=4 {
        let e = sub.try_recv().unwrap().unwrap();
        assert_eq!(e.position(), p);
    }
    assert!(sub.try_recv().unwrap().is_none());
    assert_eq!(sub.position(), 4);

    // Overflow the broadcast channel (4) but not the ring (10 changes).
    for p in 5..=10u64 {
        done(
            s.apply(p, &txn(vec![admit(&format!("a{p}"), "h", 1)]))
                .unwrap(),
        );
    }
    let mut got = Vec::new();
    while let Some(e) = lagging.try_recv().unwrap() {
        got.push(e.position());
    }
    assert_eq!(got, (1..=10).collect::<Vec<_>>(), "caught up from the ring");
    // Overflow the ring too: position 1's changes are gone.
    for p in 11..=20u64 {
        done(
            s.apply(p, &txn(vec![admit(&format!("b{p}"), "h", 1)]))
                .unwrap(),
        );
    }
    assert!(matches!(
        s.changes_since(0),
        Err(StateError::MustReload { since: 0, .. })
    ));
    assert_eq!(s.changes_since(10).unwrap().len(), 10);
    let e = lost.try_recv().unwrap_err();
    assert!(matches!(e, StateError::MustReload { .. }), "{e}");
    assert!(lost.try_recv().is_err(), "stays failed");

    // A replacement resets every watcher.
    let mut w = s.subscribe();
    s.replace_all(50, entities_of(many_tasks(3))).unwrap();
    assert!(matches!(
        w.try_recv().unwrap(),
        Some(StateEvent::Reset { position: 50 })
    ));
    assert!(matches!(
        s.changes_since(20),
        Err(StateError::MustReload { .. })
    ));
    assert_eq!(s.changes_since(50).unwrap(), vec![]);

    // recv() in an async context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut w = s.subscribe();
    rt.block_on(async {
        done(s.apply(51, &txn(vec![admit("z", "h", 1)])).unwrap());
        let e = w.recv().await.unwrap().unwrap();
        match e {
            StateEvent::Changes { position, changes } => {
                assert_eq!(position, 51);
                assert_eq!(changes[0].key, EntityKey::Agent("z".into()));
                assert_eq!(changes[0].kind(), KIND_AGENT);
            }
            other => panic!("{other:?}"),
        }
    });
    drop(s);
    rt.block_on(async {
        assert!(w.recv().await.unwrap().is_none(), "closed with the store");
    });
}
