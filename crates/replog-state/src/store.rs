//! [`StateStore`]: the scheduler state on RocksDB.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use replog_proto::state::{
    entity, op, AdmitAgent, Agent, AgentState, CronJob, Entity, HostAttributes,
    HostMaintenanceRequest, JobKey, JobUpdate, JobUpdateDetails, JobUpdateKey, Quota, RemoveAgent,
    SaveJobInstanceUpdateEvent, SaveJobUpdateEvent, ScheduleStatus, ScheduledTask,
    SchedulerMetadata, Transaction,
};
use replog_storage::{frame, StorageError};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRawIteratorWithThreadMode, Options, ReadOptions,
    SnapshotWithThreadMode, WriteBatch, DB,
};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::changes::{Change, Feed, Subscription};
use crate::error::{Result, StateError};
use crate::keys::{
    self, agent_index_prefix, describe_key, entity_key, gen_prefix, gen_range, host_index_prefix,
    job_index_prefix, kind_name, prefix_end, role_index_prefix, status_index_prefix,
    task_index_prefixes, EntityKey, GEN_TAG, IDX_TASK_STATUS, INDEX_BASE, KIND_AGENT,
    KIND_CRON_JOB, KIND_HOST_ATTRIBUTES, KIND_JOB_UPDATE, KIND_MAINTENANCE_REQUEST, KIND_QUOTA,
    KIND_SCHEDULER_METADATA, KIND_TASK, META_KEY,
};
use crate::validate::{self, Limits};

/// Format byte of the meta record.
const FORMAT: u8 = 1;
/// The generation of a new store.
const FIRST_GENERATION: u32 = 1;

/// What [`StateStore::apply`] did with a transaction.
#[derive(Debug)]
pub enum Applied {
    /// Every op was applied; the entities that changed, in key order (an op
    /// that rewrote an entity to the same bytes changes nothing).
    Done { changes: Vec<Change> },
    /// The transaction was refused as a whole (nothing of it was applied)
    /// and the applied position advanced past it. Every replica refuses it
    /// alike.
    Rejected(StateError),
}

impl Applied {
    pub fn is_rejected(&self) -> bool {
        matches!(self, Applied::Rejected(_))
    }
}

/// Which tasks [`StateStore::tasks`] returns: those matching every field
/// given (an empty list or `None` matches anything), in task id order.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub task_ids: Vec<String>,
    pub role: Option<String>,
    pub environment: Option<String>,
    pub job_name: Option<String>,
    pub statuses: Vec<ScheduleStatus>,
    pub agent_host: Option<String>,
    pub agent_id: Option<String>,
    /// At most this many tasks (the first ones in task id order).
    pub limit: Option<usize>,
}

impl TaskQuery {
    /// Tasks of one job.
    pub fn job(job: &JobKey) -> Self {
        TaskQuery {
            role: Some(job.role.clone()),
            environment: Some(job.environment.clone()),
            job_name: Some(job.name.clone()),
            ..Default::default()
        }
    }

    /// True if `t` matches every field of the query (except `limit`).
    pub fn matches(&self, t: &ScheduledTask) -> bool {
        let job = t.config.as_ref().and_then(|c| c.job.as_ref());
        let field = |want: &Option<String>, have: Option<&str>| match want {
            None => true,
            Some(w) => have == Some(w.as_str()),
        };
        (self.task_ids.is_empty() || self.task_ids.contains(&t.task_id))
            && field(&self.role, job.map(|j| j.role.as_str()))
            && field(&self.environment, job.map(|j| j.environment.as_str()))
            && field(&self.job_name, job.map(|j| j.name.as_str()))
            && (self.statuses.is_empty() || self.statuses.iter().any(|s| *s as i32 == t.status))
            && field(&self.agent_host, Some(t.agent_host.as_str()))
            && field(&self.agent_id, Some(t.agent_id.as_str()))
    }

    /// The single index prefix that answers this query best, if any.
    fn index_prefix(&self) -> Option<Vec<u8>> {
        if let (Some(role), Some(environment), Some(name)) =
            (&self.role, &self.environment, &self.job_name)
        {
            return Some(job_index_prefix(&JobKey {
                role: role.clone(),
                environment: environment.clone(),
                name: name.clone(),
            }));
        }
        if let Some(h) = self.agent_host.as_deref().filter(|h| !h.is_empty()) {
            return Some(host_index_prefix(h));
        }
        if let Some(a) = self.agent_id.as_deref().filter(|a| !a.is_empty()) {
            return Some(agent_index_prefix(a));
        }
        if let Some(role) = &self.role {
            return Some(role_index_prefix(role));
        }
        if self.statuses.len() == 1 {
            return Some(status_index_prefix(self.statuses[0] as i32));
        }
        None
    }
}

/// How many entities the state holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityCounts {
    pub tasks: u64,
    /// Tasks per status (statuses with no task are absent).
    pub tasks_by_status: BTreeMap<ScheduleStatus, u64>,
    pub cron_jobs: u64,
    pub quotas: u64,
    pub host_attributes: u64,
    pub job_updates: u64,
    pub maintenance_requests: u64,
    /// 0 or 1.
    pub scheduler_metadata: u64,
    pub agents: u64,
    /// Agents per state.
    pub agents_by_state: BTreeMap<AgentState, u64>,
}

impl EntityCounts {
    /// Every entity, all kinds together.
    pub fn total(&self) -> u64 {
        self.tasks
            + self.cron_jobs
            + self.quotas
            + self.host_attributes
            + self.job_updates
            + self.maintenance_requests
            + self.scheduler_metadata
            + self.agents
    }
}

/// What [`StateStore::replace_all`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaceReport {
    /// The generation now current.
    pub generation: u32,
    pub entities: u64,
    /// Write batches used (each at most about `Limits::replace_batch_bytes`).
    pub batches: u64,
}

/// What [`StateStore::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub applied: u64,
    pub generation: u32,
    pub entities: u64,
    pub index_entries: u64,
}

struct Writer {
    generation: u32,
    applied: u64,
}

/// The scheduler state: typed entities applied transaction by transaction
/// at increasing log positions (see the crate documentation for the key
/// layout and its invariants).
///
/// One writer at a time (writes are serialized inside); reads run
/// concurrently with writes, each on a RocksDB snapshot. Open at most one
/// `StateStore` per column family.
pub struct StateStore {
    db: Arc<DB>,
    cf: String,
    limits: Limits,
    writer: Mutex<Writer>,
    applied: AtomicU64,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("cf", &self.cf)
            .field("applied", &self.applied())
            .finish()
    }
}

fn encode_meta(generation: u32, applied: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(13);
    payload.push(FORMAT);
    payload.extend_from_slice(&generation.to_be_bytes());
    payload.extend_from_slice(&applied.to_be_bytes());
    frame::encode(META_KEY, &payload)
}

fn corrupt_from_frame(key: &[u8], e: StorageError) -> StateError {
    let reason = match e {
        StorageError::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    };
    StateError::Corrupt {
        key: describe_key(key),
        reason,
    }
}

fn decode_meta(cf: &str, value: &[u8]) -> Result<(u32, u64)> {
    let payload = frame::decode(META_KEY, value, 64, String::new)
        .map_err(|e| corrupt_from_frame(META_KEY, e))?;
    if payload.first() != Some(&FORMAT) {
        if let Some(&found) = payload.first() {
            if found > FORMAT {
                return Err(StateError::UnsupportedFormat {
                    cf: cf.to_string(),
                    found,
                    supported: FORMAT,
                });
            }
        }
        return Err(StateError::Corrupt {
            key: describe_key(META_KEY),
            reason: "unknown format".into(),
        });
    }
    if payload.len() != 13 {
        return Err(StateError::Corrupt {
            key: describe_key(META_KEY),
            reason: format!("meta record of {} bytes, expected 13", payload.len()),
        });
    }
    let generation = u32::from_be_bytes(payload[1..5].try_into().expect("4 bytes"));
    let applied = u64::from_be_bytes(payload[5..13].try_into().expect("8 bytes"));
    if generation == 0 {
        return Err(StateError::Corrupt {
            key: describe_key(META_KEY),
            reason: "generation 0".into(),
        });
    }
    Ok((generation, applied))
}

/// The stored payload of an entity (the message itself; its kind is in the
/// key).
pub(crate) fn encode_payload(e: &entity::Entity) -> Vec<u8> {
    use entity::Entity as E;
    match e {
        E::Task(m) => m.encode_to_vec(),
        E::CronJob(m) => m.encode_to_vec(),
        E::Quota(m) => m.encode_to_vec(),
        E::HostAttributes(m) => m.encode_to_vec(),
        E::JobUpdate(m) => m.encode_to_vec(),
        E::MaintenanceRequest(m) => m.encode_to_vec(),
        E::SchedulerMetadata(m) => m.encode_to_vec(),
        E::Agent(m) => m.encode_to_vec(),
    }
}

fn decode_payload(kind: u32, payload: &[u8], key: &[u8]) -> Result<entity::Entity> {
    use entity::Entity as E;
    let err = |source| StateError::Decode {
        key: describe_key(key),
        source,
    };
    Ok(match kind {
        KIND_TASK => E::Task(ScheduledTask::decode(payload).map_err(err)?),
        KIND_CRON_JOB => E::CronJob(CronJob::decode(payload).map_err(err)?),
        KIND_QUOTA => E::Quota(Quota::decode(payload).map_err(err)?),
        KIND_HOST_ATTRIBUTES => E::HostAttributes(HostAttributes::decode(payload).map_err(err)?),
        KIND_JOB_UPDATE => E::JobUpdate(JobUpdateDetails::decode(payload).map_err(err)?),
        KIND_MAINTENANCE_REQUEST => {
            E::MaintenanceRequest(HostMaintenanceRequest::decode(payload).map_err(err)?)
        }
        KIND_SCHEDULER_METADATA => {
            E::SchedulerMetadata(SchedulerMetadata::decode(payload).map_err(err)?)
        }
        KIND_AGENT => E::Agent(Agent::decode(payload).map_err(err)?),
        other => {
            return Err(StateError::Corrupt {
                key: describe_key(key),
                reason: format!("unknown entity kind {other}"),
            })
        }
    })
}

/// An entity's index keys: `[gen][index kind][value][task id]`.
fn task_index_keys(generation: u32, task: &ScheduledTask) -> BTreeSet<Vec<u8>> {
    task_index_prefixes(task)
        .into_iter()
        .map(|p| {
            let mut k = gen_prefix(generation);
            k.extend_from_slice(&p);
            k.extend_from_slice(task.task_id.as_bytes());
            k
        })
        .collect()
}

/// One entity touched by a transaction being staged.
struct Slot {
    key: EntityKey,
    /// As stored before the transaction: payload and value.
    original: Option<(Vec<u8>, entity::Entity)>,
    /// As the transaction leaves it so far.
    current: Option<entity::Entity>,
}

struct Stage<'a> {
    store: &'a StateStore,
    cf: &'a ColumnFamily,
    generation: u32,
    slots: BTreeMap<Vec<u8>, Slot>,
}

impl<'a> Stage<'a> {
    fn slot(&mut self, key: EntityKey) -> Result<&mut Slot> {
        use std::collections::btree_map::Entry;
        match self.slots.entry(key.encode()) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let full = entity_key(self.generation, &key);
                let original = match self
                    .store
                    .db
                    .get_pinned_cf(self.cf, &full)
                    .map_err(StateError::rocks("read before apply"))?
                {
                    None => None,
                    Some(value) => {
                        let payload = self.store.unframe(&full, &value)?;
                        let e = decode_payload(key.kind(), payload, &full)?;
                        Some((payload.to_vec(), e))
                    }
                };
                let current = original.as_ref().map(|(_, e)| e.clone());
                Ok(v.insert(Slot {
                    key,
                    original,
                    current,
                }))
            }
        }
    }

    fn set(&mut self, key: EntityKey, value: Option<entity::Entity>) -> Result<()> {
        self.slot(key)?.current = value;
        Ok(())
    }

    /// Stages op `index` of the transaction.
    fn run(&mut self, index: usize, o: &op::Op) -> Result<()> {
        use entity::Entity as E;
        use op::Op;
        match o {
            Op::SaveTasks(s) => {
                for t in &s.tasks {
                    self.set(EntityKey::Task(t.task_id.clone()), Some(E::Task(t.clone())))?;
                }
                Ok(())
            }
            Op::RemoveTasks(r) => {
                for id in &r.task_ids {
                    self.set(EntityKey::Task(id.clone()), None)?;
                }
                Ok(())
            }
            Op::SaveCronJob(s) => {
                let job = s.job.clone().unwrap_or_default();
                let key = EntityKey::cron_job(&job.key.clone().unwrap_or_default());
                self.set(key, Some(E::CronJob(job)))
            }
            Op::RemoveCronJob(r) => self.set(
                EntityKey::cron_job(&r.key.clone().unwrap_or_default()),
                None,
            ),
            Op::SaveQuota(s) => {
                let q = s.quota.clone().unwrap_or_default();
                self.set(EntityKey::Quota(q.role.clone()), Some(E::Quota(q)))
            }
            Op::RemoveQuota(r) => self.set(EntityKey::Quota(r.role.clone()), None),
            Op::SaveHostAttributes(s) => {
                let a = s.attributes.clone().unwrap_or_default();
                self.set(
                    EntityKey::HostAttributes(a.host.clone()),
                    Some(E::HostAttributes(a)),
                )
            }
            Op::SaveJobUpdate(s) => self.save_job_update(s.update.clone().unwrap_or_default()),
            Op::SaveJobUpdateEvent(s) => self.add_update_event(index, s),
            Op::SaveJobInstanceUpdateEvent(s) => self.add_instance_event(index, s),
            Op::RemoveJobUpdates(r) => {
                for k in &r.keys {
                    self.set(EntityKey::job_update(k), None)?;
                }
                Ok(())
            }
            Op::SaveHostMaintenanceRequest(s) => {
                let r = s.request.clone().unwrap_or_default();
                self.set(
                    EntityKey::MaintenanceRequest(r.host.clone()),
                    Some(E::MaintenanceRequest(r)),
                )
            }
            Op::RemoveHostMaintenanceRequest(r) => {
                self.set(EntityKey::MaintenanceRequest(r.host.clone()), None)
            }
            Op::SaveSchedulerMetadata(s) => self.set(
                EntityKey::SchedulerMetadata,
                Some(E::SchedulerMetadata(s.metadata.clone().unwrap_or_default())),
            ),
            Op::AdmitAgent(a) => self.admit_agent(a),
            Op::MarkAgentUnreachable(a) => {
                let agent = self.agent(index, &a.agent_id, AgentState::Admitted, "ADMITTED")?;
                agent.state = AgentState::Unreachable as i32;
                agent.unreachable_at_ms = a.at_ms;
                Ok(())
            }
            Op::MarkAgentReachable(a) => {
                let agent =
                    self.agent(index, &a.agent_id, AgentState::Unreachable, "UNREACHABLE")?;
                agent.state = AgentState::Admitted as i32;
                agent.unreachable_at_ms = 0;
                Ok(())
            }
            Op::RemoveAgent(a) => self.remove_agent(index, a),
        }
    }

    /// Saves the update itself of a job update, keeping its events.
    fn save_job_update(&mut self, update: JobUpdate) -> Result<()> {
        let key = EntityKey::job_update(&update.key.clone().unwrap_or_default());
        let slot = self.slot(key)?;
        slot.current = Some(entity::Entity::JobUpdate(match slot.current.take() {
            Some(entity::Entity::JobUpdate(mut d)) => {
                d.update = Some(update);
                d
            }
            _ => JobUpdateDetails {
                update: Some(update),
                ..Default::default()
            },
        }));
        Ok(())
    }

    /// Adds an event to a job update that exists.
    fn add_update_event(&mut self, index: usize, s: &SaveJobUpdateEvent) -> Result<()> {
        let key = EntityKey::job_update(&s.key.clone().unwrap_or_default());
        let slot = self.slot(key)?;
        match &mut slot.current {
            Some(entity::Entity::JobUpdate(d)) => {
                d.update_events.push(s.event.clone().unwrap_or_default());
                Ok(())
            }
            _ => Err(unknown(index, &slot.key)),
        }
    }

    /// Adds an instance event to a job update that exists.
    fn add_instance_event(&mut self, index: usize, s: &SaveJobInstanceUpdateEvent) -> Result<()> {
        let key = EntityKey::job_update(&s.key.clone().unwrap_or_default());
        let slot = self.slot(key)?;
        match &mut slot.current {
            Some(entity::Entity::JobUpdate(d)) => {
                d.instance_events.push(s.event.unwrap_or_default());
                Ok(())
            }
            _ => Err(unknown(index, &slot.key)),
        }
    }

    /// Admits an agent: new, or readmitted from any state, ADMITTED as of
    /// `at_ms`.
    fn admit_agent(&mut self, a: &AdmitAgent) -> Result<()> {
        let slot = self.slot(EntityKey::Agent(a.agent_id.clone()))?;
        slot.current = Some(entity::Entity::Agent(Agent {
            agent_id: a.agent_id.clone(),
            hostname: a.hostname.clone(),
            state: AgentState::Admitted as i32,
            admitted_at_ms: a.at_ms,
            unreachable_at_ms: 0,
            removed_at_ms: 0,
            info: a.info.clone(),
        }));
        Ok(())
    }

    /// Removes an agent that is ADMITTED or UNREACHABLE (it is kept,
    /// REMOVED as of `at_ms`).
    fn remove_agent(&mut self, index: usize, a: &RemoveAgent) -> Result<()> {
        let slot = self.slot(EntityKey::Agent(a.agent_id.clone()))?;
        match &mut slot.current {
            Some(entity::Entity::Agent(agent)) if agent.state() != AgentState::Removed => {
                agent.state = AgentState::Removed as i32;
                agent.removed_at_ms = a.at_ms;
                Ok(())
            }
            Some(entity::Entity::Agent(agent)) => Err(StateError::WrongState {
                op: index,
                key: slot.key.to_string(),
                state: agent.state().as_str_name().to_string(),
                expected: "ADMITTED or UNREACHABLE",
            }),
            _ => Err(unknown(index, &slot.key)),
        }
    }

    /// The agent `id`, which must be in state `want`.
    fn agent(
        &mut self,
        index: usize,
        id: &str,
        want: AgentState,
        expected: &'static str,
    ) -> Result<&mut Agent> {
        let slot = self.slot(EntityKey::Agent(id.to_string()))?;
        let state = match &slot.current {
            Some(entity::Entity::Agent(agent)) => agent.state(),
            _ => return Err(unknown(index, &slot.key)),
        };
        if state != want {
            return Err(StateError::WrongState {
                op: index,
                key: slot.key.to_string(),
                state: state.as_str_name().to_string(),
                expected,
            });
        }
        match &mut slot.current {
            Some(entity::Entity::Agent(agent)) => Ok(agent),
            _ => Err(unknown(index, &slot.key)),
        }
    }

    /// Writes what changed into `batch`; returns the changes.
    fn finish(self, batch: &mut WriteBatch, position: u64) -> Result<Vec<Change>> {
        let limits = &self.store.limits;
        let mut changes = Vec::new();
        for (k, slot) in self.slots {
            let new_payload = slot.current.as_ref().map(encode_payload);
            let old_payload = slot.original.as_ref().map(|(p, _)| p);
            if new_payload.as_ref() == old_payload {
                continue;
            }
            let mut full = gen_prefix(self.generation);
            full.extend_from_slice(&k);
            match &new_payload {
                Some(p) => {
                    if p.len() > limits.max_record_bytes {
                        return Err(StateError::TooLarge {
                            what: format!("{} (encoded bytes)", slot.key),
                            size: p.len() as u64,
                            limit: limits.max_record_bytes as u64,
                        });
                    }
                    batch.put_cf(self.cf, &full, frame::encode(&full, p));
                }
                None => batch.delete_cf(self.cf, &full),
            }
            if slot.key.kind() == KIND_TASK {
                let index_keys = |e: Option<&entity::Entity>| match e {
                    Some(entity::Entity::Task(t)) => task_index_keys(self.generation, t),
                    _ => BTreeSet::new(),
                };
                let old = index_keys(slot.original.as_ref().map(|(_, e)| e));
                let new = index_keys(slot.current.as_ref());
                for gone in old.difference(&new) {
                    batch.delete_cf(self.cf, gone);
                }
                for added in new.difference(&old) {
                    batch.put_cf(self.cf, added, frame::encode(added, &[]));
                }
            }
            changes.push(Change {
                position,
                key: slot.key,
                removed: new_payload.is_none(),
            });
        }
        Ok(changes)
    }
}

fn unknown(op: usize, key: &EntityKey) -> StateError {
    StateError::UnknownEntity {
        op,
        kind: kind_name(key.kind()),
        key: key.to_string(),
    }
}

/// A consistent view: a RocksDB snapshot and the generation and applied
/// position it holds.
struct View<'a> {
    store: &'a StateStore,
    cf: &'a ColumnFamily,
    snapshot: SnapshotWithThreadMode<'a, DB>,
    generation: u32,
    applied: u64,
}

impl<'a> View<'a> {
    fn get(&self, key: &EntityKey) -> Result<Option<entity::Entity>> {
        let full = entity_key(self.generation, key);
        match self
            .snapshot
            .get_cf(self.cf, &full)
            .map_err(StateError::rocks("read"))?
        {
            None => Ok(None),
            Some(value) => {
                let payload = self.store.unframe(&full, &value)?;
                Ok(Some(decode_payload(key.kind(), payload, &full)?))
            }
        }
    }

    fn task(&self, id: &str) -> Result<Option<ScheduledTask>> {
        Ok(match self.get(&EntityKey::Task(id.to_string()))? {
            Some(entity::Entity::Task(t)) => Some(t),
            _ => None,
        })
    }

    /// An iterator over `[gen ‖ prefix, gen ‖ prefix_end)` on the snapshot.
    /// It must not outlive the view (it reads through the snapshot).
    fn iter(&self, prefix: &[u8]) -> DBRawIteratorWithThreadMode<'a, DB> {
        let mut start = gen_prefix(self.generation);
        start.extend_from_slice(prefix);
        iter_on(self.store, self.cf, &self.snapshot, start)
    }

    /// Calls `f(key, payload)` for every record under `prefix` (below the
    /// generation) until it returns false; checks every frame.
    fn scan(&self, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
        let mut it = self.iter(prefix);
        while let Some((k, v)) = it.item() {
            let payload = self.store.unframe(k, v)?;
            if !f(k, payload)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(StateError::rocks("scan"))
    }

    /// Every entity of `kind` under `prefix` (below the kind byte).
    fn entities(&self, kind: u32, prefix: &[u8]) -> Result<Vec<entity::Entity>> {
        let mut p = vec![kind as u8];
        p.extend_from_slice(prefix);
        let mut out = Vec::new();
        self.scan(&p, |k, payload| {
            out.push(decode_payload(kind, payload, k)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Follows an index prefix: the task ids under it, in order, until `f`
    /// returns false.
    fn index(&self, prefix: &[u8], mut f: impl FnMut(&str) -> Result<bool>) -> Result<()> {
        let skip = 5 + prefix.len();
        self.scan(prefix, |k, _| {
            let id = std::str::from_utf8(&k[skip..]).map_err(|_| StateError::Corrupt {
                key: describe_key(k),
                reason: "the task id is not UTF-8".into(),
            })?;
            f(id)
        })
    }
}

/// A raw iterator over `[start, prefix_end(start))` reading through
/// `snapshot`, seeked to `start`.
fn iter_on<'a>(
    store: &'a StateStore,
    cf: &ColumnFamily,
    snapshot: &SnapshotWithThreadMode<'a, DB>,
    start: Vec<u8>,
) -> DBRawIteratorWithThreadMode<'a, DB> {
    let mut opts = ReadOptions::default();
    opts.set_snapshot(snapshot);
    if let Some(end) = prefix_end(&start) {
        opts.set_iterate_upper_bound(end);
    }
    let mut it = store.db.raw_iterator_cf_opt(cf, opts);
    it.seek(&start);
    it
}

fn unwrap_entity<T>(
    e: Option<entity::Entity>,
    f: impl FnOnce(entity::Entity) -> Option<T>,
) -> Option<T> {
    e.and_then(f)
}

macro_rules! variant {
    ($v:ident) => {
        |e| match e {
            entity::Entity::$v(x) => Some(x),
            _ => None,
        }
    };
}

/// The column family of a store in a database of its own
/// ([`StateStore::open_standalone`]).
pub const STANDALONE_COLUMN_FAMILY: &str = "state";

impl StateStore {
    /// Uses column family `cf` of an already open database (on a replica,
    /// `replog-store` registers and names its families: the scheduler
    /// state's and a staged recovery's). A new column family becomes an empty
    /// state at position 0; generations other than the current one (left by
    /// a `replace_all` that crashed) are deleted.
    pub fn open(db: Arc<DB>, cf: &str, limits: Limits) -> Result<Self> {
        let (generation, applied) = {
            let handle = db
                .cf_handle(cf)
                .ok_or_else(|| StateError::MissingColumnFamily(cf.to_string()))?;
            let meta = db
                .get_cf(handle, META_KEY)
                .map_err(StateError::rocks("read the meta record"))?;
            let (generation, applied) = match meta {
                Some(v) => decode_meta(cf, &v)?,
                None => {
                    let mut it = db.raw_iterator_cf(handle);
                    it.seek_to_first();
                    if let Some(k) = it.key() {
                        return Err(StateError::Corrupt {
                            key: describe_key(META_KEY),
                            reason: format!(
                                "missing, but the column family holds data ({})",
                                describe_key(k)
                            ),
                        });
                    }
                    it.status().map_err(StateError::rocks("scan"))?;
                    drop(it);
                    db.put_cf(handle, META_KEY, encode_meta(FIRST_GENERATION, 0))
                        .map_err(StateError::rocks("write the meta record"))?;
                    info!(cf, "new state store");
                    (FIRST_GENERATION, 0)
                }
            };
            remove_other_generations(&db, handle, cf, generation)?;
            (generation, applied)
        };
        info!(cf, generation, applied, "state store open");
        Ok(StateStore {
            feed: Arc::new(Feed::new(
                applied,
                limits.change_ring,
                limits.broadcast_capacity,
            )),
            db,
            cf: cf.to_string(),
            limits,
            writer: Mutex::new(Writer {
                generation,
                applied,
            }),
            applied: AtomicU64::new(applied),
        })
    }

    /// A store in its own RocksDB at `dir` (created if missing), in one
    /// column family named [`STANDALONE_COLUMN_FAMILY`]: tests, staging files, disaster
    /// restore.
    pub fn open_standalone(dir: &Path, limits: Limits) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        let db = DB::open_cf_descriptors(
            &opts,
            dir,
            vec![ColumnFamilyDescriptor::new(
                STANDALONE_COLUMN_FAMILY,
                Options::default(),
            )],
        )
        .map_err(StateError::rocks(format!("open {}", dir.display())))?;
        Self::open(Arc::new(db), STANDALONE_COLUMN_FAMILY, limits)
    }

    /// The database the store writes into.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// The column family the store uses.
    pub fn column_family(&self) -> &str {
        &self.cf
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The store's column family: [`Self::open`] found it, and nothing
    /// drops a column family of an open database.
    fn cf(&self) -> &ColumnFamily {
        self.db
            .cf_handle(&self.cf)
            .expect("the column family was there at open and is never dropped")
    }

    fn unframe<'v>(&self, key: &[u8], value: &'v [u8]) -> Result<&'v [u8]> {
        frame::decode(key, value, self.limits.max_record_bytes, String::new)
            .map_err(|e| corrupt_from_frame(key, e))
    }

    /// The last applied log position (0 = none).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The current generation (changes with every `replace_all`).
    pub fn generation(&self) -> u32 {
        self.writer.lock().generation
    }

    /// The state-independent checks of a transaction: it has ops, each op
    /// has a variant, ids, keys, roles and hosts are non-empty and within
    /// `max_key_bytes`, required sub-messages are present, enum values are
    /// known, and sizes and counts are within `limits`.
    pub fn validate(txn: &Transaction, limits: &Limits) -> Result<()> {
        validate::transaction(txn, limits)
    }

    /// Applies `txn` at `position` (which must be after [`applied`]) in one
    /// RocksDB write batch holding the entities, their index entries and the
    /// new applied position.
    ///
    /// A transaction that fails [`StateStore::validate`] or a
    /// state-dependent check (an event of an unknown job update, an agent
    /// transition the registry does not allow, a record over
    /// `max_record_bytes`) is refused whole: `Ok(Applied::Rejected)`, and
    /// the applied position still advances. `Err` means the store could not
    /// apply (`PositionNotAfterApplied`, RocksDB, corruption) and nothing
    /// changed.
    ///
    /// The write is not synced: the log it is applied from is durable, and
    /// after a crash the entries after [`applied`] are applied again.
    ///
    /// [`applied`]: StateStore::applied
    pub fn apply(&self, position: u64, txn: &Transaction) -> Result<Applied> {
        let mut w = self.writer.lock();
        if position <= w.applied {
            return Err(StateError::PositionNotAfterApplied {
                position,
                applied: w.applied,
            });
        }
        let cf = self.cf();
        let staged = validate::transaction(txn, &self.limits).and_then(|()| {
            let mut stage = Stage {
                store: self,
                cf,
                generation: w.generation,
                slots: BTreeMap::new(),
            };
            for (index, o) in txn.ops.iter().enumerate() {
                if let Some(o) = &o.op {
                    stage.run(index, o)?;
                }
            }
            let mut batch = WriteBatch::default();
            let changes = stage.finish(&mut batch, position)?;
            Ok((batch, changes))
        });
        let (mut batch, changes, outcome) = match staged {
            Ok((batch, changes)) => {
                let outcome = Applied::Done {
                    changes: changes.clone(),
                };
                (batch, changes, outcome)
            }
            Err(e) if e.is_rejection() => {
                debug!(position, error = %e, "transaction rejected");
                (WriteBatch::default(), Vec::new(), Applied::Rejected(e))
            }
            Err(e) => return Err(e),
        };
        batch.put_cf(cf, META_KEY, encode_meta(w.generation, position));
        self.db
            .write(batch)
            .map_err(StateError::rocks(format!("apply position {position}")))?;
        self.advance_applied(&mut w, position);
        self.feed.publish(position, changes);
        Ok(outcome)
    }

    /// Advances the applied position past a log entry that holds no state
    /// (a membership change, a no-op).
    pub fn skip_to(&self, position: u64) -> Result<()> {
        let mut w = self.writer.lock();
        if position <= w.applied {
            return Err(StateError::PositionNotAfterApplied {
                position,
                applied: w.applied,
            });
        }
        let cf = self.cf();
        self.db
            .put_cf(cf, META_KEY, encode_meta(w.generation, position))
            .map_err(StateError::rocks(format!("skip to position {position}")))?;
        self.advance_applied(&mut w, position);
        self.feed.publish(position, Vec::new());
        Ok(())
    }

    /// Publishes `position` as applied once the write batch that holds it
    /// (with what it produced) is written: the applied position moves
    /// forward, one batch at a time, and readers see the writer's.
    fn advance_applied(&self, w: &mut Writer, position: u64) {
        assert!(
            position > w.applied,
            "the applied position moves forward only: {} to {position}",
            w.applied
        );
        assert_eq!(
            self.applied.load(Ordering::Acquire),
            w.applied,
            "the published applied position is the writer's"
        );
        w.applied = position;
        self.applied.store(position, Ordering::Release);
    }

    /// Makes every write so far durable (fsync of the WAL). A replica's log
    /// does this for the whole database; a standalone store calls it.
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(StateError::rocks("flush the WAL"))
    }

    fn view(&self) -> Result<View<'_>> {
        let cf = self.cf();
        let snapshot = self.db.snapshot();
        let meta = snapshot
            .get_cf(cf, META_KEY)
            .map_err(StateError::rocks("read the meta record"))?
            .ok_or_else(|| StateError::Corrupt {
                key: describe_key(META_KEY),
                reason: "missing".into(),
            })?;
        let (generation, applied) = decode_meta(&self.cf, &meta)?;
        Ok(View {
            store: self,
            cf,
            snapshot,
            generation,
            applied,
        })
    }

    // ------------------------------------------------------------ reads

    /// A task by id.
    pub fn task(&self, id: &str) -> Result<Option<ScheduledTask>> {
        self.view()?.task(id)
    }

    /// The tasks matching `q`, in task id order. Uses an index when the
    /// query names ids, a job, a host, an agent, a role or statuses.
    pub fn tasks(&self, q: &TaskQuery) -> Result<Vec<ScheduledTask>> {
        let v = self.view()?;
        let limit = q.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut take = |t: ScheduledTask| {
            if q.matches(&t) {
                out.push(t);
            }
            out.len() < limit
        };
        let indexed = |id: &str| -> Result<ScheduledTask> {
            v.task(id)?.ok_or_else(|| StateError::Corrupt {
                key: format!("generation {} task index", v.generation),
                reason: format!("entry for task '{id}', which does not exist"),
            })
        };
        if !q.task_ids.is_empty() {
            let ids: BTreeSet<&String> = q.task_ids.iter().collect();
            for id in ids {
                if let Some(t) = v.task(id)? {
                    if !take(t) {
                        break;
                    }
                }
            }
        } else if let Some(prefix) = q.index_prefix() {
            v.index(&prefix, |id| Ok(take(indexed(id)?)))?;
        } else if !q.statuses.is_empty() {
            // Several statuses: merge their index ranges in task id order.
            let statuses: BTreeSet<i32> = q.statuses.iter().map(|s| *s as i32).collect();
            let mut iters: Vec<(usize, DBRawIteratorWithThreadMode<'_, DB>)> = statuses
                .into_iter()
                .map(|s| {
                    let p = status_index_prefix(s);
                    (5 + p.len(), v.iter(&p))
                })
                .collect();
            loop {
                let mut best: Option<(usize, Vec<u8>)> = None;
                for (i, (skip, it)) in iters.iter().enumerate() {
                    match it.key() {
                        Some(k) => {
                            let id = &k[*skip..];
                            if best.as_ref().is_none_or(|(_, b)| id < b.as_slice()) {
                                best = Some((i, id.to_vec()));
                            }
                        }
                        None => it.status().map_err(StateError::rocks("scan"))?,
                    }
                }
                let Some((i, id)) = best else { break };
                let (_, it) = &mut iters[i];
                if let (Some(k), Some(val)) = (it.key(), it.value()) {
                    v.store.unframe(k, val)?;
                }
                it.next();
                let id = String::from_utf8(id).map_err(|_| StateError::Corrupt {
                    key: "task index by status".into(),
                    reason: "a task id that is not UTF-8".into(),
                })?;
                if !take(indexed(&id)?) {
                    break;
                }
            }
        } else {
            v.scan(&[KIND_TASK as u8], |k, payload| {
                match decode_payload(KIND_TASK, payload, k)? {
                    entity::Entity::Task(t) => Ok(take(t)),
                    _ => Ok(true),
                }
            })?;
        }
        Ok(out)
    }

    /// A cron job by key.
    pub fn cron_job(&self, key: &JobKey) -> Result<Option<CronJob>> {
        Ok(unwrap_entity(
            self.view()?.get(&EntityKey::cron_job(key))?,
            variant!(CronJob),
        ))
    }

    /// Every cron job, in key order.
    pub fn cron_jobs(&self) -> Result<Vec<CronJob>> {
        self.all(KIND_CRON_JOB, variant!(CronJob))
    }

    /// A role's quota.
    pub fn quota(&self, role: &str) -> Result<Option<Quota>> {
        Ok(unwrap_entity(
            self.view()?.get(&EntityKey::Quota(role.to_string()))?,
            variant!(Quota),
        ))
    }

    /// Every quota, by role.
    pub fn quotas(&self) -> Result<Vec<Quota>> {
        self.all(KIND_QUOTA, variant!(Quota))
    }

    /// A host's attributes.
    pub fn host_attributes(&self, host: &str) -> Result<Option<HostAttributes>> {
        Ok(unwrap_entity(
            self.view()?
                .get(&EntityKey::HostAttributes(host.to_string()))?,
            variant!(HostAttributes),
        ))
    }

    /// Every host's attributes, by host.
    pub fn all_host_attributes(&self) -> Result<Vec<HostAttributes>> {
        self.all(KIND_HOST_ATTRIBUTES, variant!(HostAttributes))
    }

    /// A job update with its events.
    pub fn job_update(&self, key: &JobUpdateKey) -> Result<Option<JobUpdateDetails>> {
        Ok(unwrap_entity(
            self.view()?.get(&EntityKey::job_update(key))?,
            variant!(JobUpdate),
        ))
    }

    /// The job updates of `job` (all of them for `None`), in key order.
    pub fn job_updates(&self, job: Option<&JobKey>) -> Result<Vec<JobUpdateDetails>> {
        let mut prefix = Vec::new();
        if let Some(j) = job {
            keys::push_lp(&mut prefix, &j.role);
            keys::push_lp(&mut prefix, &j.environment);
            keys::push_lp(&mut prefix, &j.name);
        }
        Ok(self
            .view()?
            .entities(KIND_JOB_UPDATE, &prefix)?
            .into_iter()
            .filter_map(variant!(JobUpdate))
            .collect())
    }

    /// A host's maintenance request.
    pub fn maintenance_request(&self, host: &str) -> Result<Option<HostMaintenanceRequest>> {
        Ok(unwrap_entity(
            self.view()?
                .get(&EntityKey::MaintenanceRequest(host.to_string()))?,
            variant!(MaintenanceRequest),
        ))
    }

    /// Every maintenance request, by host.
    pub fn maintenance_requests(&self) -> Result<Vec<HostMaintenanceRequest>> {
        self.all(KIND_MAINTENANCE_REQUEST, variant!(MaintenanceRequest))
    }

    /// The scheduler metadata, once saved.
    pub fn scheduler_metadata(&self) -> Result<Option<SchedulerMetadata>> {
        Ok(unwrap_entity(
            self.view()?.get(&EntityKey::SchedulerMetadata)?,
            variant!(SchedulerMetadata),
        ))
    }

    /// An agent of the registry.
    pub fn agent(&self, id: &str) -> Result<Option<Agent>> {
        Ok(unwrap_entity(
            self.view()?.get(&EntityKey::Agent(id.to_string()))?,
            variant!(Agent),
        ))
    }

    /// The agents (in `state` only, if given), by agent id.
    pub fn agents(&self, state: Option<AgentState>) -> Result<Vec<Agent>> {
        let mut all = self.all(KIND_AGENT, variant!(Agent))?;
        if let Some(s) = state {
            all.retain(|a| a.state == s as i32);
        }
        Ok(all)
    }

    fn all<T>(&self, kind: u32, f: impl FnMut(entity::Entity) -> Option<T>) -> Result<Vec<T>> {
        Ok(self
            .view()?
            .entities(kind, &[])?
            .into_iter()
            .filter_map(f)
            .collect())
    }

    /// How many entities of each kind (tasks also by status, agents by
    /// state). Counts keys, so it reads every key once.
    pub fn counts(&self) -> Result<EntityCounts> {
        let v = self.view()?;
        let mut c = EntityCounts::default();
        let n = |kind: u32| -> Result<u64> {
            let mut count = 0;
            v.scan(&[kind as u8], |_, _| {
                count += 1;
                Ok(true)
            })?;
            Ok(count)
        };
        c.tasks = n(KIND_TASK)?;
        c.cron_jobs = n(KIND_CRON_JOB)?;
        c.quotas = n(KIND_QUOTA)?;
        c.host_attributes = n(KIND_HOST_ATTRIBUTES)?;
        c.job_updates = n(KIND_JOB_UPDATE)?;
        c.maintenance_requests = n(KIND_MAINTENANCE_REQUEST)?;
        c.scheduler_metadata = n(KIND_SCHEDULER_METADATA)?;
        v.scan(&[IDX_TASK_STATUS], |k, _| {
            let s = k
                .get(6..10)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .and_then(|s| ScheduleStatus::try_from(s).ok())
                .ok_or_else(|| StateError::Corrupt {
                    key: describe_key(k),
                    reason: "bad status index entry".into(),
                })?;
            *c.tasks_by_status.entry(s).or_default() += 1;
            Ok(true)
        })?;
        for e in v.entities(KIND_AGENT, &[])? {
            if let entity::Entity::Agent(a) = e {
                c.agents += 1;
                *c.agents_by_state.entry(a.state()).or_default() += 1;
            }
        }
        Ok(c)
    }

    /// Hex SHA-256 over every entity (kind, primary key and stored
    /// message) in key order: equal on every replica that applied the same
    /// transactions, whatever the positions, batches or generations. Every
    /// value's checksum is verified on the way.
    pub fn state_hash(&self) -> Result<String> {
        let v = self.view()?;
        let mut h = Sha256::new();
        h.update(b"replog-state-hash-v1\0");
        v.scan(&[], |k, payload| {
            let below = &k[5..];
            if below.first().is_some_and(|b| *b >= INDEX_BASE) {
                return Ok(false);
            }
            h.update((below.len() as u32).to_be_bytes());
            h.update(below);
            h.update((payload.len() as u64).to_be_bytes());
            h.update(payload);
            Ok(true)
        })?;
        Ok(keys::hex(&h.finalize()))
    }

    /// Reads every record: every checksum, every message, every key, and
    /// that the indexes hold exactly the entries the tasks call for (each
    /// index entry names an existing task with that value; each task has
    /// all of its entries). `Corrupt` names the first problem.
    pub fn verify(&self) -> Result<VerifyReport> {
        let v = self.view()?;
        let mut entities = 0u64;
        let mut index_entries = 0u64;
        v.scan(&[], |k, payload| {
            let below = &k[5..];
            let kind = below.first().copied().unwrap_or(0);
            if kind < INDEX_BASE {
                let key = EntityKey::decode(below).ok_or_else(|| StateError::Corrupt {
                    key: describe_key(k),
                    reason: "malformed key".into(),
                })?;
                let e = decode_payload(u32::from(kind), payload, k)?;
                if EntityKey::of(&e) != key {
                    return Err(StateError::Corrupt {
                        key: describe_key(k),
                        reason: format!("holds {} instead", EntityKey::of(&e)),
                    });
                }
                if let entity::Entity::Task(t) = &e {
                    for ik in task_index_keys(v.generation, t) {
                        let value = v
                            .snapshot
                            .get_cf(v.cf, &ik)
                            .map_err(StateError::rocks("verify"))?;
                        match value {
                            Some(val) => {
                                self.unframe(&ik, &val)?;
                            }
                            None => {
                                return Err(StateError::Corrupt {
                                    key: describe_key(&ik),
                                    reason: format!("missing index entry of task '{}'", t.task_id),
                                })
                            }
                        }
                    }
                }
                entities += 1;
            } else {
                index_entries += 1;
                // Which task does it name? Try each prefix length the task
                // itself would produce.
                let task_id = index_entry_task(below).ok_or_else(|| StateError::Corrupt {
                    key: describe_key(k),
                    reason: "malformed index entry".into(),
                })?;
                let ok = match v.task(&task_id)? {
                    Some(t) => task_index_keys(v.generation, &t).contains(k),
                    None => false,
                };
                if !ok {
                    return Err(StateError::Corrupt {
                        key: describe_key(k),
                        reason: format!("stale index entry for task '{task_id}'"),
                    });
                }
            }
            Ok(true)
        })?;
        Ok(VerifyReport {
            applied: v.applied,
            generation: v.generation,
            entities,
            index_entries,
        })
    }

    /// A consistent export of the whole state from one RocksDB snapshot
    /// (writers go on meanwhile): the applied position of the snapshot and
    /// every entity in key order.
    pub fn export(&self) -> Result<Export<'_>> {
        let v = self.view()?;
        let iter = iter_on(self, v.cf, &v.snapshot, gen_prefix(v.generation));
        Ok(Export {
            iter,
            _snapshot: v.snapshot,
            store: self,
            position: v.applied,
            generation: v.generation,
            started: false,
            done: false,
        })
    }

    /// Replaces the whole state with `entities` as of `position`,
    /// atomically: readers see the old state until one write switches to
    /// the new one. The entities are written into the next generation in
    /// batches of about `Limits::replace_batch_bytes` (any order; a
    /// duplicate key is refused), then one batch makes that generation
    /// current with the new applied position, then the old generation is
    /// deleted. On any error the old state stays and the partial generation
    /// is deleted; after a crash, [`StateStore::open`] deletes it.
    ///
    /// `position` is taken as given (a peer's state snapshot is ahead of
    /// the applied position; a staged backup may not be). Subscribers get a
    /// [`crate::StateEvent::Reset`]. The WAL is synced once the switch is
    /// written.
    pub fn replace_all<I, E>(&self, position: u64, entities: I) -> Result<ReplaceReport>
    where
        I: IntoIterator<Item = std::result::Result<Entity, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut w = self.writer.lock();
        let cf = self.cf();
        let old = w.generation;
        let new = if old == u32::MAX {
            FIRST_GENERATION
        } else {
            old + 1
        };
        let written = self.write_generation(cf, new, entities);
        let (entities, batches) = match written {
            Ok(r) => r,
            Err(e) => {
                let (s, end) = gen_range(new);
                if let Err(de) = self.db.delete_range_cf(cf, &s, &end) {
                    warn!(error = %de, generation = new, "cannot delete a partial generation; the next open will");
                }
                return Err(e);
            }
        };
        let mut flip = WriteBatch::default();
        flip.put_cf(cf, META_KEY, encode_meta(new, position));
        self.db
            .write(flip)
            .map_err(StateError::rocks("switch to the new generation"))?;
        w.generation = new;
        w.applied = position;
        self.applied.store(position, Ordering::Release);
        self.feed.reset(position);
        self.flush()?;
        let (s, end) = gen_range(old);
        if let Err(e) = self.db.delete_range_cf(cf, &s, &end) {
            warn!(error = %e, generation = old, "cannot delete the old generation; the next open will");
        }
        info!(
            cf = %self.cf,
            position, generation = new, entities, batches, "state replaced"
        );
        Ok(ReplaceReport {
            generation: new,
            entities,
            batches,
        })
    }

    /// Writes `entities` into generation `generation` (not current), in
    /// bounded batches; returns (entities, batches).
    pub(crate) fn write_generation<I, E>(
        &self,
        cf: &ColumnFamily,
        generation: u32,
        entities: I,
    ) -> Result<(u64, u64)>
    where
        I: IntoIterator<Item = std::result::Result<Entity, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Whatever an earlier failed attempt left behind.
        let (s, end) = gen_range(generation);
        self.db
            .delete_range_cf(cf, &s, &end)
            .map_err(StateError::rocks("clear the next generation"))?;
        let mut batch = WriteBatch::default();
        let mut in_batch: HashSet<Vec<u8>> = HashSet::new();
        let mut last: Option<Vec<u8>> = None;
        let mut count = 0u64;
        let mut batches = 0u64;
        for item in entities {
            let index = count;
            let e = item.map_err(|source| StateError::Source {
                after: index,
                source: source.into(),
            })?;
            let inner = e.entity.ok_or_else(|| StateError::InvalidEntity {
                index,
                reason: "no field set".into(),
            })?;
            validate::entity(&inner, &self.limits)
                .map_err(|reason| StateError::InvalidEntity { index, reason })?;
            let key = EntityKey::of(&inner);
            let below = key.encode();
            let payload = encode_payload(&inner);
            if payload.len() > self.limits.max_record_bytes {
                return Err(StateError::TooLarge {
                    what: format!("entity #{index}, {key} (encoded bytes)"),
                    size: payload.len() as u64,
                    limit: self.limits.max_record_bytes as u64,
                });
            }
            let mut full = gen_prefix(generation);
            full.extend_from_slice(&below);
            // In key order (as exports are) nothing can repeat; otherwise
            // look for an earlier copy.
            let in_order = last.as_ref().is_none_or(|l| below > *l);
            if !in_order
                && (in_batch.contains(&below)
                    || self
                        .db
                        .get_pinned_cf(cf, &full)
                        .map_err(StateError::rocks("replace"))?
                        .is_some())
            {
                return Err(StateError::InvalidEntity {
                    index,
                    reason: format!("{key} appears twice"),
                });
            }
            batch.put_cf(cf, &full, frame::encode(&full, &payload));
            if let entity::Entity::Task(t) = &inner {
                for ik in task_index_keys(generation, t) {
                    batch.put_cf(cf, &ik, frame::encode(&ik, &[]));
                }
            }
            if in_order {
                last = Some(below.clone());
            }
            in_batch.insert(below);
            count += 1;
            if batch.size_in_bytes() >= self.limits.replace_batch_bytes {
                self.db
                    .write(std::mem::take(&mut batch))
                    .map_err(StateError::rocks("replace"))?;
                in_batch.clear();
                batches += 1;
            }
        }
        if !batch.is_empty() {
            self.db.write(batch).map_err(StateError::rocks("replace"))?;
            batches += 1;
        }
        Ok((count, batches))
    }

    // ------------------------------------------------------------ changes

    /// The changes after position `since` (up to the applied position), in
    /// position and key order, from the in-memory ring.
    /// `Err(MustReload)` if they are no longer all there (or the state was
    /// replaced after `since`).
    pub fn changes_since(&self, since: u64) -> Result<Vec<Change>> {
        self.feed.changes_since(since)
    }

    /// A watcher of the changes from the current applied position on.
    pub fn subscribe(&self) -> Subscription {
        self.feed.subscribe()
    }
}

/// The task id at the end of an index entry (below the generation prefix).
fn index_entry_task(below: &[u8]) -> Option<String> {
    let (&kind, rest) = below.split_first()?;
    let lp = |r: &[u8]| -> Option<usize> {
        let n = u32::from_be_bytes(r.get(..4)?.try_into().ok()?) as usize;
        (r.len() >= 4 + n).then_some(4 + n)
    };
    let skip = match kind {
        keys::IDX_TASK_JOB => {
            let a = lp(rest)?;
            let b = a + lp(&rest[a..])?;
            b + lp(&rest[b..])?
        }
        keys::IDX_TASK_ROLE | keys::IDX_TASK_HOST | keys::IDX_TASK_AGENT => lp(rest)?,
        keys::IDX_TASK_STATUS => {
            if rest.len() < 4 {
                return None;
            }
            4
        }
        _ => return None,
    };
    String::from_utf8(rest[skip..].to_vec()).ok()
}

/// Deletes every generation but `current` (a `replace_all` that crashed
/// before or after its switch).
fn remove_other_generations(db: &DB, cf: &ColumnFamily, name: &str, current: u32) -> Result<()> {
    let (cur_start, cur_end) = gen_range(current);
    let ranges = [(vec![GEN_TAG], cur_start), (cur_end, vec![GEN_TAG + 1])];
    for (start, end) in ranges {
        if start >= end {
            continue;
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end.clone());
        let mut it = db.raw_iterator_cf_opt(cf, opts);
        it.seek(&start);
        let found = it.key().map(describe_key);
        it.status().map_err(StateError::rocks("scan generations"))?;
        drop(it);
        if let Some(first) = found {
            warn!(cf = name, current, first = %first, "deleting a generation that is not current (an interrupted replacement)");
            db.delete_range_cf(cf, &start, &end)
                .map_err(StateError::rocks("delete a stale generation"))?;
        }
    }
    Ok(())
}

/// A consistent export (see [`StateStore::export`]): iterate it for the
/// entities; [`Export::position`] is the applied position they are the
/// state of.
pub struct Export<'a> {
    // Declared first: dropped before the snapshot it reads through.
    iter: DBRawIteratorWithThreadMode<'a, DB>,
    _snapshot: SnapshotWithThreadMode<'a, DB>,
    store: &'a StateStore,
    position: u64,
    generation: u32,
    started: bool,
    done: bool,
}

impl Export<'_> {
    /// The applied position the exported state is the state of.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The generation exported.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn read(&mut self) -> Result<Option<Entity>> {
        if self.started {
            self.iter.next();
        }
        self.started = true;
        let Some((k, v)) = self.iter.item() else {
            self.iter.status().map_err(StateError::rocks("export"))?;
            return Ok(None);
        };
        let kind = k.get(5).copied().unwrap_or(0);
        if kind >= INDEX_BASE {
            return Ok(None);
        }
        let payload = self.store.unframe(k, v)?;
        let e = decode_payload(u32::from(kind), payload, k)?;
        Ok(Some(Entity { entity: Some(e) }))
    }
}

impl Iterator for Export<'_> {
    type Item = Result<Entity>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
