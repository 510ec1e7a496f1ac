//! Helpers shared by the fuzz targets (`fuzz_targets/`) and the seed
//! generator (`examples/gen_seeds.rs`): a cursor that cuts a fuzz input into
//! fields, the limits the targets run the stores with, a scratch directory,
//! and sample records of every kind.
//!
//! The inputs of the targets that take several fields are laid out with
//! [`Input`]; the seed generator writes them with [`Layout`], the inverse,
//! so seeds and targets agree on the layout by construction.

use std::collections::BTreeMap;
use std::path::PathBuf;

use replog_proto::state::{
    entity, op, AdmitAgent, Agent, AgentState, Entity, HostAttributes, JobInstanceUpdateEvent,
    JobKey, JobUpdate, JobUpdateAction, JobUpdateDetails, JobUpdateEvent, JobUpdateKey,
    JobUpdateStatus, MaintenanceMode, MarkAgentUnreachable, Op, Quota, RemoveTasks, Resource,
    SaveJobInstanceUpdateEvent, SaveJobUpdate, SaveJobUpdateEvent, SaveQuota, SaveTasks,
    ScheduleStatus, ScheduledTask, SchedulerMetadata, TaskConfig, Transaction,
};
use replog_state::Limits;

/// Reads the fields of a fuzz input; past its end every field is empty or
/// zero, so any input is a valid layout.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    /// A field of up to 65535 bytes, prefixed by its length (u16 LE).
    pub fn field(&mut self) -> &'a [u8] {
        let len = u16::from_le_bytes([self.byte(), self.byte()]) as usize;
        self.take(len)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(len.min(self.data.len()));
        self.data = b;
        a
    }
}

/// Writes an input that [`Input`] reads back field by field.
#[derive(Default)]
pub struct Layout {
    pub bytes: Vec<u8>,
}

impl Layout {
    pub fn byte(mut self, b: u8) -> Self {
        self.bytes.push(b);
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// # Panics
    /// If `f` is longer than 65535 bytes (seeds are small).
    pub fn field(mut self, f: &[u8]) -> Self {
        let len = u16::try_from(f.len()).expect("a seed field fits in 64 KiB");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(f);
        self
    }

    pub fn rest(mut self, f: &[u8]) -> Self {
        self.bytes.extend_from_slice(f);
        self
    }
}

/// Limits of the stores the targets write into: small, so that a fuzz
/// input reaches every limit check and the state stays small.
pub fn small_limits() -> Limits {
    Limits {
        max_transaction_bytes: 64 * 1024,
        max_ops: 64,
        max_entities_per_transaction: 256,
        max_record_bytes: 16 * 1024,
        max_key_bytes: 64,
        replace_batch_bytes: 4 * 1024,
        change_ring: 64,
        broadcast_capacity: 16,
    }
}

/// A directory for the stores of one fuzz process, in memory when
/// `/dev/shm` exists (a RocksDB on tmpfs: no disk I/O per input).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = PathBuf::from("/dev/shm");
    if base.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("replog-fuzz-")
            .tempdir_in(&base)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("replog-fuzz-")
        .tempdir()
        .expect("a temporary directory")
}

fn job(role: &str, name: &str) -> JobKey {
    JobKey {
        role: role.into(),
        environment: "prod".into(),
        name: name.into(),
    }
}

/// A task of `job` in `status` on `host`, with some of every field.
pub fn task(id: &str, job: &JobKey, status: ScheduleStatus, host: &str) -> ScheduledTask {
    ScheduledTask {
        task_id: id.into(),
        config: Some(TaskConfig {
            job: Some(job.clone()),
            owner_user: "www".into(),
            resources: vec![Resource {
                name: "cpus".into(),
                scalar: 0.5,
            }],
            metadata: BTreeMap::from([("zone".to_string(), "z1".to_string())]),
            ..Default::default()
        }),
        status: status as i32,
        agent_host: host.into(),
        agent_id: if host.is_empty() {
            String::new()
        } else {
            format!("agent-{host}")
        },
        assigned_ports: BTreeMap::from([("http".to_string(), 31000)]),
        ..Default::default()
    }
}

fn txn(ops: Vec<op::Op>) -> Transaction {
    Transaction {
        ops: ops.into_iter().map(|o| Op { op: Some(o) }).collect(),
    }
}

/// Transactions a scheduler writes, in an order in which each applies
/// (the job update exists before its events, the agent is admitted before
/// it is marked).
pub fn sample_transactions() -> Vec<Transaction> {
    let web = job("www-data", "web");
    let key = JobUpdateKey {
        job: Some(web.clone()),
        id: "u1".into(),
    };
    vec![
        txn(vec![op::Op::SaveTasks(SaveTasks {
            tasks: vec![
                task("t1", &web, ScheduleStatus::Running, "host-a"),
                task("t2", &web, ScheduleStatus::Pending, ""),
            ],
        })]),
        txn(vec![op::Op::SaveQuota(SaveQuota {
            quota: Some(Quota {
                role: "www-data".into(),
                resources: vec![Resource {
                    name: "mem".into(),
                    scalar: 1024.0,
                }],
            }),
        })]),
        txn(vec![
            op::Op::SaveJobUpdate(SaveJobUpdate {
                update: Some(JobUpdate {
                    key: Some(key.clone()),
                    user: "alice".into(),
                    created_timestamp_ms: 1000,
                    instructions: b"instances 0-9".to_vec().into(),
                    metadata: BTreeMap::new(),
                }),
            }),
            op::Op::SaveJobUpdateEvent(SaveJobUpdateEvent {
                key: Some(key.clone()),
                event: Some(JobUpdateEvent {
                    status: JobUpdateStatus::RollingForward as i32,
                    timestamp_ms: 1001,
                    user: "alice".into(),
                    message: String::new(),
                }),
            }),
            op::Op::SaveJobInstanceUpdateEvent(SaveJobInstanceUpdateEvent {
                key: Some(key),
                event: Some(JobInstanceUpdateEvent {
                    instance_id: 3,
                    timestamp_ms: 1002,
                    action: JobUpdateAction::InstanceUpdated as i32,
                }),
            }),
        ]),
        txn(vec![
            op::Op::AdmitAgent(AdmitAgent {
                agent_id: "agent-host-a".into(),
                hostname: "host-a".into(),
                at_ms: 5,
                info: BTreeMap::from([("os".to_string(), "linux".to_string())]),
            }),
            op::Op::MarkAgentUnreachable(MarkAgentUnreachable {
                agent_id: "agent-host-a".into(),
                at_ms: 6,
            }),
        ]),
        txn(vec![op::Op::RemoveTasks(RemoveTasks {
            task_ids: vec!["t2".into()],
        })]),
    ]
}

/// Entities of every kind, as a backup holds them.
pub fn sample_entities() -> Vec<Entity> {
    let web = job("www-data", "web");
    let e = |x| Entity { entity: Some(x) };
    vec![
        e(entity::Entity::Task(task(
            "t1",
            &web,
            ScheduleStatus::Running,
            "host-a",
        ))),
        e(entity::Entity::Task(task(
            "t2",
            &web,
            ScheduleStatus::Finished,
            "host-b",
        ))),
        e(entity::Entity::Quota(Quota {
            role: "www-data".into(),
            resources: vec![],
        })),
        e(entity::Entity::HostAttributes(HostAttributes {
            host: "host-a".into(),
            mode: MaintenanceMode::None as i32,
            ..Default::default()
        })),
        e(entity::Entity::JobUpdate(JobUpdateDetails {
            update: Some(JobUpdate {
                key: Some(JobUpdateKey {
                    job: Some(web),
                    id: "u1".into(),
                }),
                user: "alice".into(),
                ..Default::default()
            }),
            update_events: vec![],
            instance_events: vec![],
        })),
        e(entity::Entity::SchedulerMetadata(SchedulerMetadata {
            framework_id: "fw-1".into(),
            version: "1".into(),
            details: BTreeMap::new(),
        })),
        e(entity::Entity::Agent(Agent {
            agent_id: "agent-host-a".into(),
            hostname: "host-a".into(),
            state: AgentState::Admitted as i32,
            admitted_at_ms: 5,
            ..Default::default()
        })),
    ]
}
