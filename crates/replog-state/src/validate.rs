//! Limits and the state-independent checks of transactions and entities.

use prost::Message;
use replog_proto::state::{
    entity, op, AgentState, CronCollisionPolicy, JobInstanceUpdateEvent, JobKey, JobUpdate,
    JobUpdateAction, JobUpdateEvent, JobUpdateKey, JobUpdateStatus, MaintenanceMode,
    ScheduleStatus, ScheduledTask, Transaction,
};

use crate::error::{Result, StateError};

/// Bounds of everything the store accepts. Every replica must use the same
/// transaction limits (they decide which transactions are refused).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest encoded transaction.
    pub max_transaction_bytes: usize,
    /// Most ops in one transaction.
    pub max_ops: usize,
    /// Most entities one transaction names (tasks saved, ids removed, ...).
    pub max_entities_per_transaction: usize,
    /// Largest stored record (an entity's encoding; a job update grows with
    /// its events and is refused past this).
    pub max_record_bytes: usize,
    /// Longest id, role, host, environment or name.
    pub max_key_bytes: usize,
    /// Bytes per write batch of `replace_all`.
    pub replace_batch_bytes: usize,
    /// Changes kept in memory for watchers.
    pub change_ring: usize,
    /// Events a subscriber may fall behind before it lags.
    pub broadcast_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_transaction_bytes: 64 * 1024 * 1024,
            max_ops: 10_000,
            max_entities_per_transaction: 100_000,
            max_record_bytes: 64 * 1024 * 1024,
            max_key_bytes: 4096,
            replace_batch_bytes: 4 * 1024 * 1024,
            change_ring: 65_536,
            broadcast_capacity: 1024,
        }
    }
}

type Check = std::result::Result<(), String>;

fn id(what: &str, s: &str, limits: &Limits) -> Check {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > limits.max_key_bytes {
        return Err(format!(
            "{what} is {} bytes, over the limit of {}",
            s.len(),
            limits.max_key_bytes
        ));
    }
    Ok(())
}

fn job_key(what: &str, k: Option<&JobKey>, limits: &Limits) -> Check {
    let k = k.ok_or_else(|| format!("{what} is missing"))?;
    id(&format!("{what}.role"), &k.role, limits)?;
    id(&format!("{what}.environment"), &k.environment, limits)?;
    id(&format!("{what}.name"), &k.name, limits)
}

fn update_key(what: &str, k: Option<&JobUpdateKey>, limits: &Limits) -> Check {
    let k = k.ok_or_else(|| format!("{what} is missing"))?;
    job_key(&format!("{what}.job"), k.job.as_ref(), limits)?;
    id(&format!("{what}.id"), &k.id, limits)
}

/// A known value of the enum; `unspecified_ok` also admits 0.
fn known<E: TryFrom<i32>>(what: &str, v: i32, unspecified_ok: bool) -> Check {
    if E::try_from(v).is_err() {
        return Err(format!("{what} has the unknown value {v}"));
    }
    if v == 0 && !unspecified_ok {
        return Err(format!("{what} is unspecified"));
    }
    Ok(())
}

pub(crate) fn task(t: &ScheduledTask, limits: &Limits) -> Check {
    id("task_id", &t.task_id, limits)?;
    let config = t
        .config
        .as_ref()
        .ok_or_else(|| format!("task '{}' has no config", t.task_id))?;
    job_key("config.job", config.job.as_ref(), limits)?;
    known::<ScheduleStatus>("status", t.status, false)?;
    for e in &t.events {
        known::<ScheduleStatus>("event status", e.status, true)?;
    }
    if t.agent_host.len() > limits.max_key_bytes || t.agent_id.len() > limits.max_key_bytes {
        return Err("agent_host or agent_id over the key limit".into());
    }
    Ok(())
}

fn job_update(u: Option<&JobUpdate>, limits: &Limits) -> Check {
    let u = u.ok_or("update is missing")?;
    update_key("update.key", u.key.as_ref(), limits)
}

fn update_event(e: Option<&JobUpdateEvent>) -> Check {
    let e = e.ok_or("event is missing")?;
    known::<JobUpdateStatus>("event status", e.status, false)
}

fn instance_event(e: Option<&JobInstanceUpdateEvent>) -> Check {
    let e = e.ok_or("event is missing")?;
    known::<JobUpdateAction>("event action", e.action, false)
}

/// Checks one op; returns how many entities it names.
fn op(o: &op::Op, limits: &Limits) -> std::result::Result<usize, String> {
    use op::Op;
    Ok(match o {
        Op::SaveTasks(s) => {
            for t in &s.tasks {
                task(t, limits)?;
            }
            s.tasks.len()
        }
        Op::RemoveTasks(r) => {
            for t in &r.task_ids {
                id("task id", t, limits)?;
            }
            r.task_ids.len()
        }
        Op::SaveCronJob(s) => {
            let j = s.job.as_ref().ok_or("job is missing")?;
            job_key("job.key", j.key.as_ref(), limits)?;
            known::<CronCollisionPolicy>("collision_policy", j.collision_policy, true)?;
            1
        }
        Op::RemoveCronJob(r) => {
            job_key("key", r.key.as_ref(), limits)?;
            1
        }
        Op::SaveQuota(s) => {
            let q = s.quota.as_ref().ok_or("quota is missing")?;
            id("quota.role", &q.role, limits)?;
            1
        }
        Op::RemoveQuota(r) => {
            id("role", &r.role, limits)?;
            1
        }
        Op::SaveHostAttributes(s) => {
            let a = s.attributes.as_ref().ok_or("attributes are missing")?;
            id("attributes.host", &a.host, limits)?;
            known::<MaintenanceMode>("attributes.mode", a.mode, true)?;
            1
        }
        Op::SaveJobUpdate(s) => {
            job_update(s.update.as_ref(), limits)?;
            1
        }
        Op::SaveJobUpdateEvent(s) => {
            update_key("key", s.key.as_ref(), limits)?;
            update_event(s.event.as_ref())?;
            1
        }
        Op::SaveJobInstanceUpdateEvent(s) => {
            update_key("key", s.key.as_ref(), limits)?;
            instance_event(s.event.as_ref())?;
            1
        }
        Op::RemoveJobUpdates(r) => {
            for k in &r.keys {
                update_key("key", Some(k), limits)?;
            }
            r.keys.len()
        }
        Op::SaveHostMaintenanceRequest(s) => {
            let r = s.request.as_ref().ok_or("request is missing")?;
            id("request.host", &r.host, limits)?;
            1
        }
        Op::RemoveHostMaintenanceRequest(r) => {
            id("host", &r.host, limits)?;
            1
        }
        Op::SaveSchedulerMetadata(s) => {
            s.metadata.as_ref().ok_or("metadata is missing")?;
            1
        }
        Op::AdmitAgent(a) => {
            id("agent_id", &a.agent_id, limits)?;
            id("hostname", &a.hostname, limits)?;
            1
        }
        Op::MarkAgentUnreachable(a) => {
            id("agent_id", &a.agent_id, limits)?;
            1
        }
        Op::MarkAgentReachable(a) => {
            id("agent_id", &a.agent_id, limits)?;
            1
        }
        Op::RemoveAgent(a) => {
            id("agent_id", &a.agent_id, limits)?;
            1
        }
    })
}

/// The state-independent checks of a transaction (see
/// [`crate::StateStore::validate`]).
pub(crate) fn transaction(txn: &Transaction, limits: &Limits) -> Result<()> {
    if txn.ops.is_empty() {
        return Err(StateError::InvalidTransaction {
            reason: "it has no ops".into(),
        });
    }
    if txn.ops.len() > limits.max_ops {
        return Err(StateError::TooLarge {
            what: "number of ops in the transaction".into(),
            size: txn.ops.len() as u64,
            limit: limits.max_ops as u64,
        });
    }
    let size = txn.encoded_len();
    if size > limits.max_transaction_bytes {
        return Err(StateError::TooLarge {
            what: "encoded transaction (bytes)".into(),
            size: size as u64,
            limit: limits.max_transaction_bytes as u64,
        });
    }
    let mut entities = 0usize;
    for (index, o) in txn.ops.iter().enumerate() {
        let o = o.op.as_ref().ok_or_else(|| StateError::InvalidOp {
            index,
            reason: "the op has no variant set".into(),
        })?;
        entities += op(o, limits).map_err(|reason| StateError::InvalidOp { index, reason })?;
    }
    if entities > limits.max_entities_per_transaction {
        return Err(StateError::TooLarge {
            what: "number of entities in the transaction".into(),
            size: entities as u64,
            limit: limits.max_entities_per_transaction as u64,
        });
    }
    Ok(())
}

/// The checks of one entity of a replacement stream.
pub(crate) fn entity(e: &entity::Entity, limits: &Limits) -> Check {
    use entity::Entity as E;
    match e {
        E::Task(t) => task(t, limits),
        E::CronJob(j) => {
            job_key("key", j.key.as_ref(), limits)?;
            known::<CronCollisionPolicy>("collision_policy", j.collision_policy, true)
        }
        E::Quota(q) => id("role", &q.role, limits),
        E::HostAttributes(a) => {
            id("host", &a.host, limits)?;
            known::<MaintenanceMode>("mode", a.mode, true)
        }
        E::JobUpdate(d) => {
            job_update(d.update.as_ref(), limits)?;
            for e in &d.update_events {
                update_event(Some(e))?;
            }
            for e in &d.instance_events {
                instance_event(Some(e))?;
            }
            Ok(())
        }
        E::MaintenanceRequest(r) => id("host", &r.host, limits),
        E::SchedulerMetadata(_) => Ok(()),
        E::Agent(a) => {
            id("agent_id", &a.agent_id, limits)?;
            id("hostname", &a.hostname, limits)?;
            known::<AgentState>("state", a.state, false)
        }
    }
}
