//! Random op sequences applied to the store and to a plain in-memory model
//! (BTreeMaps) give the same answers to every query.

use std::collections::BTreeMap;

use proptest::prelude::*;
use replog_proto::state::{
    entity, op, Agent, AgentState, CronJob, Entity, HostAttributes, HostMaintenanceRequest,
    JobInstanceUpdateEvent, JobKey, JobUpdate, JobUpdateAction, JobUpdateDetails, JobUpdateEvent,
    JobUpdateKey, JobUpdateStatus, MaintenanceMode, Quota, RemoveCronJob,
    RemoveHostMaintenanceRequest, RemoveJobUpdates, RemoveQuota, Resource, SaveCronJob,
    SaveHostAttributes, SaveHostMaintenanceRequest, SaveJobInstanceUpdateEvent, SaveJobUpdate,
    SaveJobUpdateEvent, SaveQuota, SaveSchedulerMetadata, ScheduleStatus, ScheduledTask,
    SchedulerMetadata, Transaction,
};

use super::{
    admit, job, mark_reachable, mark_unreachable, remove_agent, remove_tasks, save_tasks, task,
    txn, update_key,
};
use crate::{Applied, Limits, StateStore, TaskQuery};

type Jk = (String, String, String);
type Uk = (String, String, String, String);

#[derive(Clone, Default, Debug)]
struct Model {
    tasks: BTreeMap<String, ScheduledTask>,
    cron: BTreeMap<Jk, CronJob>,
    quotas: BTreeMap<String, Quota>,
    hosts: BTreeMap<String, HostAttributes>,
    updates: BTreeMap<Uk, JobUpdateDetails>,
    maintenance: BTreeMap<String, HostMaintenanceRequest>,
    metadata: Option<SchedulerMetadata>,
    agents: BTreeMap<String, Agent>,
}

fn jk(k: &JobKey) -> Jk {
    (k.role.clone(), k.environment.clone(), k.name.clone())
}

fn uk(k: &JobUpdateKey) -> Uk {
    let (r, e, n) = jk(k.job.as_ref().unwrap());
    (r, e, n, k.id.clone())
}

impl Model {
    /// Applies `t` all or nothing; false if it is refused.
    fn apply(&mut self, t: &Transaction) -> bool {
        let mut m = self.clone();
        for o in &t.ops {
            if !m.op(o.op.as_ref().unwrap()) {
                return false;
            }
        }
        *self = m;
        true
    }

    fn op(&mut self, o: &op::Op) -> bool {
        use op::Op;
        match o {
            Op::SaveTasks(s) => {
                for t in &s.tasks {
                    self.tasks.insert(t.task_id.clone(), t.clone());
                }
            }
            Op::RemoveTasks(r) => {
                for id in &r.task_ids {
                    self.tasks.remove(id);
                }
            }
            Op::SaveCronJob(s) => {
                let j = s.job.clone().unwrap();
                self.cron.insert(jk(j.key.as_ref().unwrap()), j);
            }
            Op::RemoveCronJob(r) => {
                self.cron.remove(&jk(r.key.as_ref().unwrap()));
            }
            Op::SaveQuota(s) => {
                let q = s.quota.clone().unwrap();
                self.quotas.insert(q.role.clone(), q);
            }
            Op::RemoveQuota(r) => {
                self.quotas.remove(&r.role);
            }
            Op::SaveHostAttributes(s) => {
                let a = s.attributes.clone().unwrap();
                self.hosts.insert(a.host.clone(), a);
            }
            Op::SaveJobUpdate(s) => {
                let u = s.update.clone().unwrap();
                let d = self.updates.entry(uk(u.key.as_ref().unwrap())).or_default();
                d.update = Some(u);
            }
            Op::SaveJobUpdateEvent(s) => match self.updates.get_mut(&uk(s.key.as_ref().unwrap())) {
                Some(d) => d.update_events.push(s.event.clone().unwrap()),
                None => return false,
            },
            Op::SaveJobInstanceUpdateEvent(s) => {
                match self.updates.get_mut(&uk(s.key.as_ref().unwrap())) {
                    Some(d) => d.instance_events.push(s.event.unwrap()),
                    None => return false,
                }
            }
            Op::RemoveJobUpdates(r) => {
                for k in &r.keys {
                    self.updates.remove(&uk(k));
                }
            }
            Op::SaveHostMaintenanceRequest(s) => {
                let r = s.request.clone().unwrap();
                self.maintenance.insert(r.host.clone(), r);
            }
            Op::RemoveHostMaintenanceRequest(r) => {
                self.maintenance.remove(&r.host);
            }
            Op::SaveSchedulerMetadata(s) => self.metadata = s.metadata.clone(),
            Op::AdmitAgent(a) => {
                self.agents.insert(
                    a.agent_id.clone(),
                    Agent {
                        agent_id: a.agent_id.clone(),
                        hostname: a.hostname.clone(),
                        state: AgentState::Admitted as i32,
                        admitted_at_ms: a.at_ms,
                        info: a.info.clone(),
                        ..Default::default()
                    },
                );
            }
            Op::MarkAgentUnreachable(a) => match self.agents.get_mut(&a.agent_id) {
                Some(ag) if ag.state() == AgentState::Admitted => {
                    ag.state = AgentState::Unreachable as i32;
                    ag.unreachable_at_ms = a.at_ms;
                }
                _ => return false,
            },
            Op::MarkAgentReachable(a) => match self.agents.get_mut(&a.agent_id) {
                Some(ag) if ag.state() == AgentState::Unreachable => {
                    ag.state = AgentState::Admitted as i32;
                    ag.unreachable_at_ms = 0;
                }
                _ => return false,
            },
            Op::RemoveAgent(a) => match self.agents.get_mut(&a.agent_id) {
                Some(ag) if ag.state() != AgentState::Removed => {
                    ag.state = AgentState::Removed as i32;
                    ag.removed_at_ms = a.at_ms;
                }
                _ => return false,
            },
        }
        true
    }

    fn entities(&self) -> Vec<Entity> {
        use entity::Entity as E;
        let mut out: Vec<E> = Vec::new();
        out.extend(self.tasks.values().cloned().map(E::Task));
        out.extend(self.cron.values().cloned().map(E::CronJob));
        out.extend(self.quotas.values().cloned().map(E::Quota));
        out.extend(self.hosts.values().cloned().map(E::HostAttributes));
        out.extend(self.updates.values().cloned().map(E::JobUpdate));
        out.extend(
            self.maintenance
                .values()
                .cloned()
                .map(E::MaintenanceRequest),
        );
        out.extend(self.metadata.clone().map(E::SchedulerMetadata));
        out.extend(self.agents.values().cloned().map(E::Agent));
        out.into_iter()
            .map(|e| Entity { entity: Some(e) })
            .collect()
    }
}

// ---------------------------------------------------------------- strategies
// Names of equal length, so tuple order equals key order.

fn name(prefix: &'static str, n: u8) -> impl Strategy<Value = String> {
    (0..n).prop_map(move |i| format!("{prefix}{i}"))
}

fn job_key() -> impl Strategy<Value = JobKey> {
    (name("r", 2), name("e", 2), name("n", 2)).prop_map(|(r, e, n)| job(&r, &e, &n))
}

fn upd_key() -> impl Strategy<Value = JobUpdateKey> {
    (job_key(), name("u", 2)).prop_map(|(j, u)| update_key(&j, &u))
}

fn status() -> impl Strategy<Value = ScheduleStatus> {
    prop::sample::select(vec![
        ScheduleStatus::Pending,
        ScheduleStatus::Assigned,
        ScheduleStatus::Running,
        ScheduleStatus::Finished,
        ScheduleStatus::Killed,
    ])
}

fn host() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "h0", "h1", "h2"]).prop_map(String::from)
}

fn a_task() -> impl Strategy<Value = ScheduledTask> {
    (name("t", 8), job_key(), status(), host(), 0..3i32).prop_map(|(id, j, s, h, f)| {
        let mut t = task(&id, &j, s, &h);
        t.failure_count = f;
        t
    })
}

fn an_op() -> impl Strategy<Value = op::Op> {
    use op::Op;
    prop_oneof![
        8 => prop::collection::vec(a_task(), 0..4).prop_map(save_tasks),
        2 => prop::collection::vec(name("t", 8), 0..3).prop_map(|ids| {
            let ids: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
            remove_tasks(&ids)
        }),
        1 => (job_key(), 0..3i32).prop_map(|(k, n)| Op::SaveCronJob(SaveCronJob {
            job: Some(CronJob { key: Some(k), instance_count: n, ..Default::default() }),
        })),
        1 => job_key().prop_map(|k| Op::RemoveCronJob(RemoveCronJob { key: Some(k) })),
        1 => (name("r", 2), 0..4u8).prop_map(|(r, x)| Op::SaveQuota(SaveQuota {
            quota: Some(Quota { role: r, resources: vec![Resource { name: "cpus".into(), scalar: f64::from(x) }] }),
        })),
        1 => name("r", 2).prop_map(|r| Op::RemoveQuota(RemoveQuota { role: r })),
        1 => (name("h", 3), 0..5i32).prop_map(|(h, m)| Op::SaveHostAttributes(SaveHostAttributes {
            attributes: Some(HostAttributes { host: h, mode: m, ..Default::default() }),
        })),
        4 => (upd_key(), name("user", 2)).prop_map(|(k, u)| Op::SaveJobUpdate(SaveJobUpdate {
            update: Some(JobUpdate { key: Some(k), user: u, ..Default::default() }),
        })),
        1 => (upd_key(), 1..12i32).prop_map(|(k, s)| Op::SaveJobUpdateEvent(SaveJobUpdateEvent {
            key: Some(k),
            event: Some(JobUpdateEvent { status: s, ..Default::default() }),
        })),
        1 => (upd_key(), 0..4i32).prop_map(|(k, i)| Op::SaveJobInstanceUpdateEvent(SaveJobInstanceUpdateEvent {
            key: Some(k),
            event: Some(JobInstanceUpdateEvent { instance_id: i, action: JobUpdateAction::InstanceUpdated as i32, ..Default::default() }),
        })),
        1 => prop::collection::vec(upd_key(), 0..3).prop_map(|keys| Op::RemoveJobUpdates(RemoveJobUpdates { keys })),
        1 => (name("h", 3), 0..100i64).prop_map(|(h, t)| Op::SaveHostMaintenanceRequest(SaveHostMaintenanceRequest {
            request: Some(HostMaintenanceRequest { host: h, timeout_secs: t, ..Default::default() }),
        })),
        1 => name("h", 3).prop_map(|h| Op::RemoveHostMaintenanceRequest(RemoveHostMaintenanceRequest { host: h })),
        1 => name("fw", 3).prop_map(|f| Op::SaveSchedulerMetadata(SaveSchedulerMetadata {
            metadata: Some(SchedulerMetadata { framework_id: f, details: [("a".to_string(), "b".to_string()), ("c".to_string(), "d".to_string())].into(), ..Default::default() }),
        })),
        4 => (name("a", 3), host(), 0..100i64).prop_map(|(a, h, t)| admit(&a, if h.is_empty() { "hx" } else { &h }, t)),
        1 => (name("a", 3), 0..100i64).prop_map(|(a, t)| mark_unreachable(&a, t)),
        1 => (name("a", 3), 0..100i64).prop_map(|(a, t)| mark_reachable(&a, t)),
        1 => (name("a", 3), 0..100i64).prop_map(|(a, t)| remove_agent(&a, t)),
    ]
}

fn a_txn() -> impl Strategy<Value = Transaction> {
    prop::collection::vec(an_op(), 1..4).prop_map(txn)
}

fn a_query() -> impl Strategy<Value = TaskQuery> {
    (
        prop::collection::vec(name("t", 9), 0..3),
        prop::option::of(name("r", 3)),
        prop::option::of(name("e", 2)),
        prop::option::of(name("n", 2)),
        prop::collection::vec(status(), 0..3),
        prop::option::of(host()),
        prop::option::of(prop::sample::select(vec!["", "agent-h0", "agent-h1"])),
        prop::option::of(0..6usize),
    )
        .prop_map(
            |(ids, role, env, name, statuses, host, agent, limit)| TaskQuery {
                // Mostly no ids: they make every other field a filter only.
                task_ids: if ids.len() == 2 { ids } else { vec![] },
                role,
                environment: env,
                job_name: name,
                statuses,
                agent_host: host,
                agent_id: agent.map(String::from),
                limit,
            },
        )
}

fn compare(s: &StateStore, m: &Model, queries: &[TaskQuery]) -> Result<(), TestCaseError> {
    let all: Vec<ScheduledTask> = m.tasks.values().cloned().collect();
    prop_assert_eq!(s.tasks(&TaskQuery::default()).unwrap(), all.clone());
    for q in queries {
        let mut want: Vec<ScheduledTask> = all.iter().filter(|t| q.matches(t)).cloned().collect();
        if let Some(l) = q.limit {
            want.truncate(l);
        }
        prop_assert_eq!(s.tasks(q).unwrap(), want, "query {:?}", q);
    }
    for t in m.tasks.values().take(3) {
        prop_assert_eq!(s.task(&t.task_id).unwrap(), Some(t.clone()));
    }
    prop_assert_eq!(
        s.cron_jobs().unwrap(),
        m.cron.values().cloned().collect::<Vec<_>>()
    );
    for (k, j) in m.cron.iter().take(2) {
        prop_assert_eq!(s.cron_job(&job(&k.0, &k.1, &k.2)).unwrap(), Some(j.clone()));
    }
    prop_assert_eq!(
        s.quotas().unwrap(),
        m.quotas.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(
        s.all_host_attributes().unwrap(),
        m.hosts.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(
        s.job_updates(None).unwrap(),
        m.updates.values().cloned().collect::<Vec<_>>()
    );
    let j0 = job("r0", "e1", "n0");
    prop_assert_eq!(
        s.job_updates(Some(&j0)).unwrap(),
        m.updates
            .iter()
            .filter(|(k, _)| (k.0.as_str(), k.1.as_str(), k.2.as_str()) == ("r0", "e1", "n0"))
            .map(|(_, d)| d.clone())
            .collect::<Vec<_>>()
    );
    for (k, d) in m.updates.iter().take(2) {
        prop_assert_eq!(
            s.job_update(&update_key(&job(&k.0, &k.1, &k.2), &k.3))
                .unwrap(),
            Some(d.clone())
        );
    }
    prop_assert_eq!(
        s.maintenance_requests().unwrap(),
        m.maintenance.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(s.scheduler_metadata().unwrap(), m.metadata.clone());
    prop_assert_eq!(
        s.agents(None).unwrap(),
        m.agents.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(
        s.agents(Some(AgentState::Unreachable)).unwrap(),
        m.agents
            .values()
            .filter(|a| a.state() == AgentState::Unreachable)
            .cloned()
            .collect::<Vec<_>>()
    );
    let c = s.counts().unwrap();
    prop_assert_eq!(c.tasks, m.tasks.len() as u64);
    prop_assert_eq!(c.total(), m.entities().len() as u64);
    let running = m
        .tasks
        .values()
        .filter(|t| t.status() == ScheduleStatus::Running)
        .count() as u64;
    prop_assert_eq!(
        c.tasks_by_status
            .get(&ScheduleStatus::Running)
            .copied()
            .unwrap_or(0),
        running
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(
        txns in prop::collection::vec(a_txn(), 1..40),
        queries in prop::collection::vec(a_query(), 6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open_standalone(dir.path(), Limits::default()).unwrap();
        let mut m = Model::default();
        for (i, t) in txns.iter().enumerate() {
            let position = 2 * i as u64 + 1;
            let accepted = m.apply(t);
            let applied = s.apply(position, t).unwrap();
            prop_assert_eq!(!applied.is_rejected(), accepted, "txn {} {:?}: {:?}", i, t, applied);
            if let Applied::Rejected(e) = &applied {
                prop_assert!(e.is_rejection());
            }
            prop_assert_eq!(s.applied(), position);
            if i % 4 == 0 {
                compare(&s, &m, &queries)?;
            }
        }
        compare(&s, &m, &queries)?;
        s.verify().unwrap();

        // The model's entities written by replace_all give the same state,
        // byte for byte.
        let d2 = tempfile::tempdir().unwrap();
        let r = StateStore::open_standalone(d2.path(), Limits::default()).unwrap();
        r.replace_all(s.applied(), m.entities().into_iter().map(Ok::<_, crate::StateError>)).unwrap();
        prop_assert_eq!(r.state_hash().unwrap(), s.state_hash().unwrap());
        compare(&r, &m, &queries)?;
        // And the export is the model, in key order.
        let exported: Vec<Entity> = s.export().unwrap().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(exported, m.entities());
    }
}

#[test]
fn maintenance_modes_and_events_round_trip() {
    // Smoke test that the model's value space is accepted by validation.
    let l = Limits::default();
    for m in 0..5 {
        let t = txn(vec![op::Op::SaveHostAttributes(SaveHostAttributes {
            attributes: Some(HostAttributes {
                host: "h".into(),
                mode: m,
                ..Default::default()
            }),
        })]);
        StateStore::validate(&t, &l).unwrap();
    }
    assert_eq!(MaintenanceMode::Drained as i32, 4);
    for s in 1..12 {
        assert!(JobUpdateStatus::try_from(s).is_ok());
    }
}
