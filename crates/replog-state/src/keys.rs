//! Key encoding of the state column family (the layout is described in the
//! crate documentation).

use std::fmt;

use replog_proto::state::{entity, Entity, JobKey, JobUpdateKey, ScheduledTask};

/// Record kind of a task ([`replog_proto::state::ScheduledTask`]).
pub const KIND_TASK: u32 = 1;
/// Record kind of a cron job ([`replog_proto::state::CronJob`]).
pub const KIND_CRON_JOB: u32 = 2;
/// Record kind of a role's quota ([`replog_proto::state::Quota`]).
pub const KIND_QUOTA: u32 = 3;
/// Record kind of a host's attributes ([`replog_proto::state::HostAttributes`]).
pub const KIND_HOST_ATTRIBUTES: u32 = 4;
/// Record kind of a job update with its events ([`replog_proto::state::JobUpdateDetails`]).
pub const KIND_JOB_UPDATE: u32 = 5;
/// Record kind of a host maintenance request ([`replog_proto::state::HostMaintenanceRequest`]).
pub const KIND_MAINTENANCE_REQUEST: u32 = 6;
/// Record kind of the scheduler metadata singleton ([`replog_proto::state::SchedulerMetadata`]).
pub const KIND_SCHEDULER_METADATA: u32 = 7;
/// Record kind of an agent of the registry ([`replog_proto::state::Agent`]).
pub const KIND_AGENT: u32 = 8;

/// Every entity kind, in key order.
pub const ALL_KINDS: [u32; 8] = [
    KIND_TASK,
    KIND_CRON_JOB,
    KIND_QUOTA,
    KIND_HOST_ATTRIBUTES,
    KIND_JOB_UPDATE,
    KIND_MAINTENANCE_REQUEST,
    KIND_SCHEDULER_METADATA,
    KIND_AGENT,
];

/// A readable name of a kind (`"task"`, `"cron job"`, ...).
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_TASK => "task",
        KIND_CRON_JOB => "cron job",
        KIND_QUOTA => "quota",
        KIND_HOST_ATTRIBUTES => "host attributes",
        KIND_JOB_UPDATE => "job update",
        KIND_MAINTENANCE_REQUEST => "maintenance request",
        KIND_SCHEDULER_METADATA => "scheduler metadata",
        KIND_AGENT => "agent",
        _ => "unknown kind",
    }
}

/// The record kind of a snapshot record (`KIND_*`), 0 for an [`Entity`]
/// with no field set.
pub fn entity_kind(e: &Entity) -> u32 {
    match &e.entity {
        Some(entity::Entity::Task(_)) => KIND_TASK,
        Some(entity::Entity::CronJob(_)) => KIND_CRON_JOB,
        Some(entity::Entity::Quota(_)) => KIND_QUOTA,
        Some(entity::Entity::HostAttributes(_)) => KIND_HOST_ATTRIBUTES,
        Some(entity::Entity::JobUpdate(_)) => KIND_JOB_UPDATE,
        Some(entity::Entity::MaintenanceRequest(_)) => KIND_MAINTENANCE_REQUEST,
        Some(entity::Entity::SchedulerMetadata(_)) => KIND_SCHEDULER_METADATA,
        Some(entity::Entity::Agent(_)) => KIND_AGENT,
        None => 0,
    }
}

/// The identity of one stored entity: its kind and primary key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntityKey {
    /// A task by task id.
    Task(String),
    /// A cron job by job key.
    CronJob {
        role: String,
        environment: String,
        name: String,
    },
    /// A quota by role.
    Quota(String),
    /// Host attributes by host.
    HostAttributes(String),
    /// A job update by job key and update id.
    JobUpdate {
        role: String,
        environment: String,
        name: String,
        id: String,
    },
    /// A maintenance request by host.
    MaintenanceRequest(String),
    /// The scheduler metadata (a singleton).
    SchedulerMetadata,
    /// An agent by agent id.
    Agent(String),
}

impl EntityKey {
    /// The cron job key of `job`.
    pub fn cron_job(job: &JobKey) -> Self {
        EntityKey::CronJob {
            role: job.role.clone(),
            environment: job.environment.clone(),
            name: job.name.clone(),
        }
    }

    /// The key of the job update `key` (a missing job is empty strings;
    /// validation refuses those before they reach the store).
    pub fn job_update(key: &JobUpdateKey) -> Self {
        let job = key.job.clone().unwrap_or_default();
        EntityKey::JobUpdate {
            role: job.role,
            environment: job.environment,
            name: job.name,
            id: key.id.clone(),
        }
    }

    /// The record kind (`KIND_*`).
    pub fn kind(&self) -> u32 {
        match self {
            EntityKey::Task(_) => KIND_TASK,
            EntityKey::CronJob { .. } => KIND_CRON_JOB,
            EntityKey::Quota(_) => KIND_QUOTA,
            EntityKey::HostAttributes(_) => KIND_HOST_ATTRIBUTES,
            EntityKey::JobUpdate { .. } => KIND_JOB_UPDATE,
            EntityKey::MaintenanceRequest(_) => KIND_MAINTENANCE_REQUEST,
            EntityKey::SchedulerMetadata => KIND_SCHEDULER_METADATA,
            EntityKey::Agent(_) => KIND_AGENT,
        }
    }

    /// The key of an entity (the oneof of an [`Entity`]).
    pub fn of(e: &entity::Entity) -> Self {
        use entity::Entity as E;
        match e {
            E::Task(t) => EntityKey::Task(t.task_id.clone()),
            E::CronJob(j) => EntityKey::cron_job(&j.key.clone().unwrap_or_default()),
            E::Quota(q) => EntityKey::Quota(q.role.clone()),
            E::HostAttributes(h) => EntityKey::HostAttributes(h.host.clone()),
            E::JobUpdate(d) => EntityKey::job_update(
                &d.update
                    .as_ref()
                    .and_then(|u| u.key.clone())
                    .unwrap_or_default(),
            ),
            E::MaintenanceRequest(r) => EntityKey::MaintenanceRequest(r.host.clone()),
            E::SchedulerMetadata(_) => EntityKey::SchedulerMetadata,
            E::Agent(a) => EntityKey::Agent(a.agent_id.clone()),
        }
    }

    /// `[kind byte][primary key]`: the key below the generation prefix.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.kind() as u8];
        match self {
            EntityKey::Task(s)
            | EntityKey::Quota(s)
            | EntityKey::HostAttributes(s)
            | EntityKey::MaintenanceRequest(s)
            | EntityKey::Agent(s) => out.extend_from_slice(s.as_bytes()),
            EntityKey::CronJob {
                role,
                environment,
                name,
            } => {
                push_lp(&mut out, role);
                push_lp(&mut out, environment);
                out.extend_from_slice(name.as_bytes());
            }
            EntityKey::JobUpdate {
                role,
                environment,
                name,
                id,
            } => {
                push_lp(&mut out, role);
                push_lp(&mut out, environment);
                push_lp(&mut out, name);
                out.extend_from_slice(id.as_bytes());
            }
            EntityKey::SchedulerMetadata => {}
        }
        out
    }

    /// Inverse of [`EntityKey::encode`]; `None` for bytes it never produces.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (&kind, mut rest) = bytes.split_first()?;
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
        Some(match u32::from(kind) {
            KIND_TASK => EntityKey::Task(text(rest)?),
            KIND_QUOTA => EntityKey::Quota(text(rest)?),
            KIND_HOST_ATTRIBUTES => EntityKey::HostAttributes(text(rest)?),
            KIND_MAINTENANCE_REQUEST => EntityKey::MaintenanceRequest(text(rest)?),
            KIND_AGENT => EntityKey::Agent(text(rest)?),
            KIND_SCHEDULER_METADATA if rest.is_empty() => EntityKey::SchedulerMetadata,
            KIND_CRON_JOB => {
                let role = take_lp(&mut rest)?;
                let environment = take_lp(&mut rest)?;
                EntityKey::CronJob {
                    role,
                    environment,
                    name: text(rest)?,
                }
            }
            KIND_JOB_UPDATE => {
                let role = take_lp(&mut rest)?;
                let environment = take_lp(&mut rest)?;
                let name = take_lp(&mut rest)?;
                EntityKey::JobUpdate {
                    role,
                    environment,
                    name,
                    id: text(rest)?,
                }
            }
            _ => return None,
        })
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntityKey::Task(id) => write!(f, "task '{id}'"),
            EntityKey::CronJob {
                role,
                environment,
                name,
            } => write!(f, "cron job '{role}/{environment}/{name}'"),
            EntityKey::Quota(role) => write!(f, "quota of role '{role}'"),
            EntityKey::HostAttributes(host) => write!(f, "host attributes of '{host}'"),
            EntityKey::JobUpdate {
                role,
                environment,
                name,
                id,
            } => write!(f, "job update '{role}/{environment}/{name}' id '{id}'"),
            EntityKey::MaintenanceRequest(host) => write!(f, "maintenance request of '{host}'"),
            EntityKey::SchedulerMetadata => write!(f, "scheduler metadata"),
            EntityKey::Agent(id) => write!(f, "agent '{id}'"),
        }
    }
}

// ---------------------------------------------------------------- layout

/// The meta record: current generation and applied position.
pub(crate) const META_KEY: &[u8] = &[0x00];
/// First byte of every generation's key.
pub(crate) const GEN_TAG: u8 = 0x01;
/// First kind byte of the secondary indexes (entity kinds are below it).
pub(crate) const INDEX_BASE: u8 = 0x80;
/// Task index by job key: `lp(role) lp(environment) lp(name)`.
pub(crate) const IDX_TASK_JOB: u8 = 0x81;
/// Task index by role: `lp(role)`.
pub(crate) const IDX_TASK_ROLE: u8 = 0x82;
/// Task index by status: the status number, u32 big-endian.
pub(crate) const IDX_TASK_STATUS: u8 = 0x83;
/// Task index by agent host: `lp(host)` (tasks with a host only).
pub(crate) const IDX_TASK_HOST: u8 = 0x84;
/// Task index by agent id: `lp(agent_id)` (tasks with an agent only).
pub(crate) const IDX_TASK_AGENT: u8 = 0x85;

pub(crate) fn push_lp(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_lp(rest: &mut &[u8]) -> Option<String> {
    if rest.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let body = rest.get(4..4 + n)?;
    let s = String::from_utf8(body.to_vec()).ok()?;
    *rest = &rest[4 + n..];
    Some(s)
}

/// `[GEN_TAG][generation u32 BE]`.
pub(crate) fn gen_prefix(generation: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(5);
    out.push(GEN_TAG);
    out.extend_from_slice(&generation.to_be_bytes());
    out
}

/// The key range `[start, end)` holding every key of `generation`.
pub(crate) fn gen_range(generation: u32) -> (Vec<u8>, Vec<u8>) {
    let start = gen_prefix(generation);
    let end = prefix_end(&start).unwrap_or_else(|| vec![GEN_TAG + 1]);
    (start, end)
}

/// The full key of an entity in `generation`.
pub(crate) fn entity_key(generation: u32, key: &EntityKey) -> Vec<u8> {
    let mut out = gen_prefix(generation);
    out.extend_from_slice(&key.encode());
    out
}

/// The smallest key greater than every key starting with `prefix` (`None`
/// if there is none: the prefix is all 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The index value prefixes of one task, each `[index kind][value]`; the
/// index key is `gen_prefix ‖ that ‖ task_id`.
pub(crate) fn task_index_prefixes(task: &ScheduledTask) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(5);
    let job = task
        .config
        .as_ref()
        .and_then(|c| c.job.clone())
        .unwrap_or_default();
    out.push(job_index_prefix(&job));
    out.push(role_index_prefix(&job.role));
    out.push(status_index_prefix(task.status));
    if !task.agent_host.is_empty() {
        out.push(host_index_prefix(&task.agent_host));
    }
    if !task.agent_id.is_empty() {
        out.push(agent_index_prefix(&task.agent_id));
    }
    out
}

pub(crate) fn job_index_prefix(job: &JobKey) -> Vec<u8> {
    let mut out = vec![IDX_TASK_JOB];
    push_lp(&mut out, &job.role);
    push_lp(&mut out, &job.environment);
    push_lp(&mut out, &job.name);
    out
}

pub(crate) fn role_index_prefix(role: &str) -> Vec<u8> {
    let mut out = vec![IDX_TASK_ROLE];
    push_lp(&mut out, role);
    out
}

pub(crate) fn status_index_prefix(status: i32) -> Vec<u8> {
    let mut out = vec![IDX_TASK_STATUS];
    out.extend_from_slice(&(status as u32).to_be_bytes());
    out
}

pub(crate) fn host_index_prefix(host: &str) -> Vec<u8> {
    let mut out = vec![IDX_TASK_HOST];
    push_lp(&mut out, host);
    out
}

pub(crate) fn agent_index_prefix(agent_id: &str) -> Vec<u8> {
    let mut out = vec![IDX_TASK_AGENT];
    push_lp(&mut out, agent_id);
    out
}

/// A readable name of a stored key, for error messages.
pub(crate) fn describe_key(key: &[u8]) -> String {
    if key == META_KEY {
        return "meta record".to_string();
    }
    if key.len() >= 6 && key[0] == GEN_TAG {
        let generation = u32::from_be_bytes([key[1], key[2], key[3], key[4]]);
        let rest = &key[5..];
        if rest[0] < INDEX_BASE {
            if let Some(k) = EntityKey::decode(rest) {
                return format!("generation {generation} {k}");
            }
        } else {
            let name = match rest[0] {
                IDX_TASK_JOB => "task index by job",
                IDX_TASK_ROLE => "task index by role",
                IDX_TASK_STATUS => "task index by status",
                IDX_TASK_HOST => "task index by host",
                IDX_TASK_AGENT => "task index by agent",
                _ => "unknown index",
            };
            return format!(
                "generation {generation} {name} entry {}",
                String::from_utf8_lossy(&rest[1..]).escape_debug()
            );
        }
    }
    format!("key {}", hex(key))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_keys_round_trip() {
        let keys = [
            EntityKey::Task("t-1".into()),
            EntityKey::CronJob {
                role: "r\0x".into(),
                environment: "".into(),
                name: "n".into(),
            },
            EntityKey::Quota("r".into()),
            EntityKey::HostAttributes("h".into()),
            EntityKey::JobUpdate {
                role: "r".into(),
                environment: "e".into(),
                name: "n".into(),
                id: "u\0".into(),
            },
            EntityKey::MaintenanceRequest("h".into()),
            EntityKey::SchedulerMetadata,
            EntityKey::Agent("a".into()),
        ];
        for k in keys {
            assert_eq!(EntityKey::decode(&k.encode()), Some(k.clone()), "{k}");
        }
    }

    #[test]
    fn length_prefixes_keep_components_apart() {
        // ("ab", "c") and ("a", "bc") must be different keys, and a job's
        // prefix must not cover another job whose name extends it.
        let a = job_index_prefix(&JobKey {
            role: "ab".into(),
            environment: "c".into(),
            name: "n".into(),
        });
        let b = job_index_prefix(&JobKey {
            role: "a".into(),
            environment: "bc".into(),
            name: "n".into(),
        });
        assert_ne!(a, b);
        let short = role_index_prefix("r");
        let long = role_index_prefix("r2");
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn prefix_end_is_the_successor() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let (s, e) = gen_range(u32::MAX);
        assert!(s < e);
    }
}
