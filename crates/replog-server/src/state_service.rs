//! The scheduler-state API (`replog.store.v1.SchedulerState`) of a replica
//! server started with the state store on.
//!
//! Writes go through [`SchedulerStore::submit`] on the leader (a follower
//! answers NOT_LEADER with the leader's address); reads are served from the
//! local state, after a read index when the request asks for a
//! linearizable read. Snapshots are streamed one frame per message from a
//! RocksDB snapshot of the state, so writers do not pause and memory stays
//! at one chunk.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use replog_proto::state::{Entity, JobKey, JobUpdateKey, ScheduleStatus, ScheduledTask};
use replog_proto::store::scheduler_state_server::{SchedulerState, SchedulerStateServer};
use replog_proto::store::{
    ChangeEvent, CommitRecoveryRequest, CommitRecoveryResponse, DeleteRecoveryTasksRequest,
    DeleteRecoveryTasksResponse, EntitiesRequest, EntityChange, ReadMode, RecoveryStatusRequest,
    RecoveryStatusResponse, SnapshotFrame, SnapshotRequest, SubmitRequest, SubmitResponse,
    SummaryRequest, SummaryResponse, TaskQueryRequest, UnloadRecoveryRequest,
    UnloadRecoveryResponse, WatchRequest,
};
use replog_proto::wire::{coded_status, ErrorCode};
use replog_snapshot::{FrameSplitter, PieceReader};
use replog_state::{
    kind_name, TaskQuery, KIND_AGENT, KIND_CRON_JOB, KIND_HOST_ATTRIBUTES, KIND_JOB_UPDATE,
    KIND_MAINTENANCE_REQUEST, KIND_QUOTA, KIND_SCHEDULER_METADATA, KIND_TASK,
};
use replog_store::backup::{write_state, SnapshotIdentity};
use replog_store::{SchedulerStore, Staging, StagingError, StoreError};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::service::log_status;
use crate::MAX_CLIENT_MESSAGE_BYTES;

/// Most tasks one query answers.
pub const MAX_QUERY_TASKS: usize = 1_000_000;
/// Snapshot frames buffered between the exporting thread and the stream.
const SNAPSHOT_QUEUE: usize = 16;

/// State snapshots (backups, peers catching up) streamed at once; more are
/// refused with `BUSY`. Each holds a RocksDB snapshot and a thread.
const MAX_CONCURRENT_SNAPSHOTS: usize = 4;

/// The service.
#[derive(Clone)]
pub struct StateService {
    store: Arc<SchedulerStore>,
    staging: Arc<Staging>,
    snapshot_slots: Arc<tokio::sync::Semaphore>,
}

impl StateService {
    pub fn new(store: Arc<SchedulerStore>, staging: Arc<Staging>) -> Self {
        StateService {
            store,
            staging,
            snapshot_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SNAPSHOTS)),
        }
    }

    fn staging_status(&self, e: StagingError) -> Status {
        match e {
            e @ StagingError::AlreadyStaged { .. } => coded_status(
                Code::FailedPrecondition,
                ErrorCode::AlreadyStaged,
                e.to_string(),
            ),
            e @ StagingError::NothingStaged => coded_status(
                Code::FailedPrecondition,
                ErrorCode::NothingStaged,
                e.to_string(),
            ),
            e @ (StagingError::WrongContent(_) | StagingError::Backup(_)) => {
                coded_status(Code::InvalidArgument, ErrorCode::BadBackup, e.to_string())
            }
            e @ (StagingError::State(_) | StagingError::Marker { .. }) => {
                coded_status(Code::Internal, ErrorCode::Storage, e.to_string())
            }
        }
    }

    fn recovery_status(&self) -> Result<RecoveryStatusResponse, Status> {
        let staged = self.staging.staged().map_err(|e| self.staging_status(e))?;
        let mut r = match staged {
            None => RecoveryStatusResponse::default(),
            Some(s) => RecoveryStatusResponse {
                staged: true,
                cluster_id: s.header.cluster_id.clone(),
                backup_position: s.header.position,
                created_at_unix_ms: s.header.created_at_unix_ms,
                counts: counts_map(&s.counts),
                staging_id: s.staging_id().to_string(),
                ..Default::default()
            },
        };
        r.replica_id = self.store.log().meta().replica_id;
        if let Some(c) = self.staging.last_committed() {
            r.last_committed_staging_id = c.staging_id;
            r.last_committed_position = c.position;
        }
        Ok(r)
    }

    /// The tonic server for this service, with its size limits.
    pub fn into_server(self) -> SchedulerStateServer<StateService> {
        SchedulerStateServer::new(self)
            .max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
    }

    fn status(&self, e: StoreError) -> Status {
        match e {
            StoreError::Log(e) => log_status(self.store.log(), e),
            StoreError::Invalid(e) => {
                coded_status(Code::InvalidArgument, ErrorCode::Invalid, e.to_string())
            }
            e @ StoreError::Record(_) => {
                coded_status(Code::InvalidArgument, ErrorCode::Invalid, e.to_string())
            }
            e @ StoreError::Rejected { .. } => {
                coded_status(Code::FailedPrecondition, ErrorCode::Rejected, e.to_string())
            }
            e @ StoreError::Timeout(_) => {
                coded_status(Code::DeadlineExceeded, ErrorCode::Timeout, e.to_string())
            }
            e @ (StoreError::State(_)
            | StoreError::Stopped(_)
            | StoreError::Io(_)
            | StoreError::NotRegistered(_)) => {
                coded_status(Code::Internal, ErrorCode::Storage, e.to_string())
            }
            e @ StoreError::StateReplaced { .. } => {
                coded_status(Code::Aborted, ErrorCode::StateReplaced, e.to_string())
            }
            StoreError::Staging(e) => self.staging_status(e),
        }
    }

    async fn read_point(&self, mode: i32) -> Result<(), Status> {
        match ReadMode::try_from(mode) {
            Ok(ReadMode::Local) => Ok(()),
            Ok(ReadMode::Linearizable) => self
                .store
                .sync_for_read()
                .await
                .map(|_| ())
                .map_err(|e| self.status(e)),
            Err(_) => Err(coded_status(
                Code::InvalidArgument,
                ErrorCode::Invalid,
                format!("unknown read mode {mode}"),
            )),
        }
    }
}

fn counts_map(counts: &replog_state::EntityCounts) -> std::collections::HashMap<String, u64> {
    [
        (KIND_TASK, counts.tasks),
        (KIND_CRON_JOB, counts.cron_jobs),
        (KIND_QUOTA, counts.quotas),
        (KIND_HOST_ATTRIBUTES, counts.host_attributes),
        (KIND_JOB_UPDATE, counts.job_updates),
        (KIND_MAINTENANCE_REQUEST, counts.maintenance_requests),
        (KIND_SCHEDULER_METADATA, counts.scheduler_metadata),
        (KIND_AGENT, counts.agents),
    ]
    .into_iter()
    .map(|(k, n)| (kind_name(k).to_string(), n))
    .collect()
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<ChangeEvent, Status>> + Send>>;

fn change_event(position: u64, changes: &[replog_state::Change]) -> ChangeEvent {
    ChangeEvent {
        position,
        changes: changes
            .iter()
            .map(|c| EntityChange {
                kind: kind_name(c.kind()).to_string(),
                key: c.key.to_string(),
                removed: c.removed,
            })
            .collect(),
        reset: false,
    }
}

type EntityStream = Pin<Box<dyn Stream<Item = Result<Entity, Status>> + Send>>;

enum EntitiesError {
    Invalid(String),
    State(replog_state::StateError),
}

impl From<replog_state::StateError> for EntitiesError {
    fn from(e: replog_state::StateError) -> Self {
        EntitiesError::State(e)
    }
}

/// `role/environment/name` as a job key.
fn job_key(s: &str) -> Option<JobKey> {
    let mut it = s.splitn(3, '/');
    let (role, env, name) = (it.next()?, it.next()?, it.next()?);
    (!role.is_empty() && !env.is_empty() && !name.is_empty()).then(|| JobKey {
        role: role.into(),
        environment: env.into(),
        name: name.into(),
    })
}

/// The entities of `kind` (all, or those under `key`; see `EntitiesRequest`).
fn entities_of(
    st: &replog_state::StateStore,
    kind: &str,
    key: &str,
) -> Result<Vec<Entity>, EntitiesError> {
    use replog_proto::state::entity::Entity as E;
    let wrap = |e: E| Entity { entity: Some(e) };
    let one = |k: &str| (!k.is_empty()).then(|| k.to_string());
    let bad_job =
        || EntitiesError::Invalid(format!("'{key}' is not a job key role/environment/name"));
    Ok(match kind {
        "task" => match one(key) {
            Some(id) => st.task(&id)?.into_iter().map(|t| wrap(E::Task(t))).collect(),
            None => {
                return Err(EntitiesError::Invalid(
                    "list tasks with QueryTasks; Entities takes one task id".into(),
                ))
            }
        },
        "cron job" => match one(key) {
            Some(k) => st
                .cron_job(&job_key(&k).ok_or_else(bad_job)?)?
                .into_iter()
                .map(|j| wrap(E::CronJob(j)))
                .collect(),
            None => st.cron_jobs()?.into_iter().map(|j| wrap(E::CronJob(j))).collect(),
        },
        "quota" => match one(key) {
            Some(role) => st.quota(&role)?.into_iter().map(|q| wrap(E::Quota(q))).collect(),
            None => st.quotas()?.into_iter().map(|q| wrap(E::Quota(q))).collect(),
        },
        "host attributes" => match one(key) {
            Some(h) => st
                .host_attributes(&h)?
                .into_iter()
                .map(|a| wrap(E::HostAttributes(a)))
                .collect(),
            None => st
                .all_host_attributes()?
                .into_iter()
                .map(|a| wrap(E::HostAttributes(a)))
                .collect(),
        },
        "job update" => {
            let updates = match one(key) {
                None => st.job_updates(None)?,
                Some(k) => match k.matches('/').count() {
                    2 => st.job_updates(Some(&job_key(&k).ok_or_else(bad_job)?))?,
                    _ => {
                        let (job, id) = k.rsplit_once('/').ok_or_else(bad_job)?;
                        let key = JobUpdateKey {
                            job: Some(job_key(job).ok_or_else(bad_job)?),
                            id: id.into(),
                        };
                        st.job_update(&key)?.into_iter().collect()
                    }
                },
            };
            updates.into_iter().map(|u| wrap(E::JobUpdate(u))).collect()
        }
        "maintenance request" => match one(key) {
            Some(h) => st
                .maintenance_request(&h)?
                .into_iter()
                .map(|m| wrap(E::MaintenanceRequest(m)))
                .collect(),
            None => st
                .maintenance_requests()?
                .into_iter()
                .map(|m| wrap(E::MaintenanceRequest(m)))
                .collect(),
        },
        "scheduler metadata" => st
            .scheduler_metadata()?
            .into_iter()
            .map(|m| wrap(E::SchedulerMetadata(m)))
            .collect(),
        "agent" => match one(key) {
            Some(id) => st.agent(&id)?.into_iter().map(|a| wrap(E::Agent(a))).collect(),
            None => st.agents(None)?.into_iter().map(|a| wrap(E::Agent(a))).collect(),
        },
        other => {
            return Err(EntitiesError::Invalid(format!(
                "unknown entity kind '{other}' (task, cron job, quota, host attributes, job update, maintenance request, scheduler metadata, agent)"
            )))
        }
    })
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<ScheduledTask, Status>> + Send>>;
type FrameStream = Pin<Box<dyn Stream<Item = Result<SnapshotFrame, Status>> + Send>>;

fn query_of(r: &TaskQueryRequest) -> Result<TaskQuery, Status> {
    let mut statuses = Vec::new();
    for s in &r.statuses {
        statuses.push(ScheduleStatus::try_from(*s).map_err(|_| {
            coded_status(
                Code::InvalidArgument,
                ErrorCode::Invalid,
                format!("unknown task status {s}"),
            )
        })?);
    }
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let limit = match r.limit {
        0 => MAX_QUERY_TASKS,
        n => (n as usize).min(MAX_QUERY_TASKS),
    };
    Ok(TaskQuery {
        task_ids: r.task_ids.clone(),
        role: some(&r.role),
        environment: some(&r.environment),
        job_name: some(&r.job_name),
        statuses,
        agent_host: some(&r.agent_host),
        limit: Some(limit),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl SchedulerState for StateService {
    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let Some(txn) = req.into_inner().transaction else {
            return Err(coded_status(
                Code::InvalidArgument,
                ErrorCode::Invalid,
                "the request holds no transaction",
            ));
        };
        let position = self.store.submit(&txn).await.map_err(|e| self.status(e))?;
        Ok(Response::new(SubmitResponse { position }))
    }

    type QueryTasksStream = TaskStream;

    async fn query_tasks(
        &self,
        req: Request<TaskQueryRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let r = req.into_inner();
        self.read_point(r.mode).await?;
        let q = query_of(&r)?;
        let store = self.store.clone();
        let tasks = tokio::task::spawn_blocking(move || store.state().tasks(&q))
            .await
            .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
            .map_err(|e| self.status(StoreError::State(e)))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            tasks.into_iter().map(Ok),
        ))))
    }

    type EntitiesStream = EntityStream;

    async fn entities(
        &self,
        req: Request<EntitiesRequest>,
    ) -> Result<Response<EntityStream>, Status> {
        let r = req.into_inner();
        self.read_point(r.mode).await?;
        let store = self.store.clone();
        let found =
            tokio::task::spawn_blocking(move || entities_of(store.state(), &r.kind, &r.key))
                .await
                .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
                .map_err(|e| match e {
                    EntitiesError::Invalid(m) => {
                        coded_status(Code::InvalidArgument, ErrorCode::Invalid, m)
                    }
                    EntitiesError::State(e) => self.status(StoreError::State(e)),
                })?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            found.into_iter().map(Ok),
        ))))
    }

    async fn summary(
        &self,
        req: Request<SummaryRequest>,
    ) -> Result<Response<SummaryResponse>, Status> {
        self.read_point(req.into_inner().mode).await?;
        let store = self.store.clone();
        let (applied, counts, hash) = tokio::task::spawn_blocking(move || {
            // Counts and hash are read one after the other: under concurrent
            // writes they may be of different positions (compare hashes of
            // a quiet state).
            let st = store.state();
            let counts = st.counts()?;
            let hash = st.state_hash()?;
            Ok::<_, replog_state::StateError>((st.applied(), counts, hash))
        })
        .await
        .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
        .map_err(|e| self.status(StoreError::State(e)))?;
        Ok(Response::new(SummaryResponse {
            applied,
            counts: counts_map(&counts),
            state_hash: hash,
        }))
    }

    type SnapshotStream = FrameStream;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        self.read_point(req.into_inner().mode).await?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotFrame, Status>>(SNAPSHOT_QUEUE);
        let log = store.log().clone();
        let meta = log.meta();
        let id = SnapshotIdentity {
            cluster_id: meta.cluster_id.clone(),
            term: log.progress().term,
            voters: meta.conf_state.voters.clone(),
            learners: meta.conf_state.learners.clone(),
            labels: [("replica".to_string(), meta.replica_id.to_string())].into(),
        };
        let permit = self.snapshot_slots.clone().try_acquire_owned().map_err(|_| {
            coded_status(
                Code::ResourceExhausted,
                ErrorCode::Busy,
                format!("{MAX_CONCURRENT_SNAPSHOTS} state snapshots are being streamed already; try again"),
            )
        })?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let frames = tx.clone();
            let sink = move |piece: Bytes| {
                frames
                    .blocking_send(Ok(SnapshotFrame { data: piece }))
                    .map_err(|_| std::io::Error::other("the snapshot's receiver went away"))
            };
            let result = write_state(store.state(), &id, FrameSplitter::new(sink), |_| {})
                .and_then(|(splitter, summary)| {
                    // Checks the stream ended on a whole frame.
                    let _sink = splitter.finish().map_err(|source| {
                        replog_store::backup::BackupError::Io {
                            path: "<stream>".into(),
                            source,
                        }
                    })?;
                    Ok(summary)
                });
            match result {
                Ok(s) => info!(
                    position = s.position,
                    records = s.records,
                    bytes = s.bytes,
                    "streamed a state snapshot"
                ),
                Err(e) => {
                    warn!(error = %e, "a state snapshot failed");
                    let _ = tx.blocking_send(Err(coded_status(
                        Code::Internal,
                        ErrorCode::Storage,
                        e.to_string(),
                    )));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchStream = ChangeStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<ChangeStream>, Status> {
        let from = req.into_inner().from_position;
        let state = self.store.clone();
        // Subscribe first, then read the backlog: nothing falls between.
        let mut sub = state.state().subscribe();
        let backlog = state.state().changes_since(from).map_err(|e| match e {
            e @ replog_state::StateError::MustReload { .. } => coded_status(
                Code::FailedPrecondition,
                ErrorCode::MustReload,
                e.to_string(),
            ),
            e => self.status(StoreError::State(e)),
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ChangeEvent, Status>>(SNAPSHOT_QUEUE);
        tokio::spawn(async move {
            let mut sent = from;
            let mut i = 0;
            while i < backlog.len() {
                let p = backlog[i].position;
                let j = backlog[i..]
                    .iter()
                    .position(|c| c.position != p)
                    .map_or(backlog.len(), |k| i + k);
                if tx.send(Ok(change_event(p, &backlog[i..j]))).await.is_err() {
                    return;
                }
                sent = p;
                i = j;
            }
            loop {
                let event = match sub.recv().await {
                    Ok(Some(e)) => e,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(coded_status(
                                Code::FailedPrecondition,
                                ErrorCode::MustReload,
                                e.to_string(),
                            )))
                            .await;
                        return;
                    }
                };
                if event.position() <= sent {
                    continue;
                }
                sent = event.position();
                let msg = match &event {
                    replog_state::StateEvent::Changes { position, changes } => {
                        change_event(*position, changes)
                    }
                    replog_state::StateEvent::Reset { position } => ChangeEvent {
                        position: *position,
                        changes: Vec::new(),
                        reset: true,
                    },
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn recovery_status(
        &self,
        _req: Request<RecoveryStatusRequest>,
    ) -> Result<Response<RecoveryStatusResponse>, Status> {
        Ok(Response::new(self.recovery_status()?))
    }

    async fn stage_recovery(
        &self,
        req: Request<Streaming<SnapshotFrame>>,
    ) -> Result<Response<RecoveryStatusResponse>, Status> {
        let mut incoming = req.into_inner();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(SNAPSHOT_QUEUE);
        tokio::spawn(async move {
            loop {
                let item = match incoming.message().await {
                    Ok(Some(f)) => Ok(f.data),
                    Ok(None) => return,
                    Err(s) => Err(std::io::Error::other(format!(
                        "the upload broke: {}",
                        s.message()
                    ))),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        let staging = self.staging.clone();
        let cluster = self.store.log().meta().cluster_id;
        tokio::task::spawn_blocking(move || {
            let pieces = std::iter::from_fn(move || rx.blocking_recv());
            staging.stage(
                PieceReader::new(pieces),
                Some(&cluster),
                replog_storage::now_unix_ms(),
            )
        })
        .await
        .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
        .map_err(|e| self.staging_status(e))?;
        info!("a backup was staged for recovery");
        Ok(Response::new(self.recovery_status()?))
    }

    type RecoveryTasksStream = TaskStream;

    async fn recovery_tasks(
        &self,
        req: Request<TaskQueryRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let q = query_of(&req.into_inner())?;
        let staging = self.staging.clone();
        let tasks = tokio::task::spawn_blocking(move || staging.tasks(&q))
            .await
            .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
            .map_err(|e| self.staging_status(e))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            tasks.into_iter().map(Ok),
        ))))
    }

    async fn delete_recovery_tasks(
        &self,
        req: Request<DeleteRecoveryTasksRequest>,
    ) -> Result<Response<DeleteRecoveryTasksResponse>, Status> {
        let r = req.into_inner();
        let q = r.query.as_ref().map(query_of).transpose()?;
        if r.task_ids.is_empty() && q.is_none() {
            return Err(coded_status(
                Code::InvalidArgument,
                ErrorCode::Invalid,
                "name task ids or a query of the tasks to delete",
            ));
        }
        let staging = self.staging.clone();
        let deleted =
            tokio::task::spawn_blocking(move || staging.delete_tasks(&r.task_ids, q.as_ref()))
                .await
                .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
                .map_err(|e| self.staging_status(e))?;
        info!(deleted, "deleted tasks from the staged backup");
        Ok(Response::new(DeleteRecoveryTasksResponse { deleted }))
    }

    async fn unload_recovery(
        &self,
        _req: Request<UnloadRecoveryRequest>,
    ) -> Result<Response<UnloadRecoveryResponse>, Status> {
        let staging = self.staging.clone();
        tokio::task::spawn_blocking(move || staging.unload())
            .await
            .map_err(|e| coded_status(Code::Internal, ErrorCode::Storage, e.to_string()))?
            .map_err(|e| self.staging_status(e))?;
        info!("the staged backup was unloaded");
        Ok(Response::new(UnloadRecoveryResponse {}))
    }

    async fn commit_recovery(
        &self,
        _req: Request<CommitRecoveryRequest>,
    ) -> Result<Response<CommitRecoveryResponse>, Status> {
        let position = self
            .store
            .commit_recovery(&self.staging)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(CommitRecoveryResponse { position }))
    }
}
