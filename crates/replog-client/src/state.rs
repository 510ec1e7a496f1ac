//! The client of the scheduler-state API (`replog.store.v1.SchedulerState`)
//! of replicas started with `--state`.
//!
//! Calls run through the same loop as the log client's ([`Replicas::call`]):
//! writes go to the leader and follow `replog-leader` hints; a submit whose
//! outcome is unknown fails with [`ClientError::OutcomeUnknown`] and is
//! never sent again; reads are retried on any replica. A client made with
//! [`StateClient::at`] addresses one replica only (its staging area, its
//! view of the state) and follows no hints.
//!
//! Calls whose work grows with the whole state — [`StateClient::summary`]
//! (it hashes the state), [`StateClient::stage_recovery`] (an upload of a
//! backup) and [`StateClient::commit_recovery`] (it replicates the staged
//! state) — wait as long as the replica takes; every other call, and the
//! opening of a stream, is bounded by the config's request timeout.

use std::sync::Arc;

use replog_proto::state::{Entity, ScheduledTask, Transaction};
use replog_proto::store::scheduler_state_client::SchedulerStateClient;
use replog_proto::store::{
    ChangeEvent, CommitRecoveryRequest, DeleteRecoveryTasksRequest, EntitiesRequest, ReadMode,
    RecoveryStatusRequest, RecoveryStatusResponse, SnapshotFrame, SnapshotRequest, SubmitRequest,
    SummaryRequest, SummaryResponse, TaskQueryRequest, UnloadRecoveryRequest, WatchRequest,
};
use replog_proto::wire::{self, CallKind};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::replicas::{failure, Replicas, Target};
use crate::{ClientConfig, ClientError, Endpoint, MAX_MESSAGE_BYTES};

/// A client of the scheduler-state API of one cluster. Cheap to clone.
#[derive(Clone)]
pub struct StateClient {
    replicas: Arc<Replicas>,
    /// The one replica this client addresses ([`StateClient::at`]).
    pinned: Option<Endpoint>,
}

/// The state API's stub on `channel`, with the client's size limits.
fn stub(channel: Channel) -> SchedulerStateClient<Channel> {
    SchedulerStateClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl StateClient {
    /// A client of the replicas at `endpoints` (see [`crate::Client::new`]).
    pub fn new<I, S>(endpoints: I) -> StateClient
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_config(endpoints, ClientConfig::default())
    }

    pub fn with_config<I, S>(endpoints: I, config: ClientConfig) -> StateClient
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::over(Arc::new(Replicas::new(endpoints, config)))
    }

    pub(crate) fn over(replicas: Arc<Replicas>) -> StateClient {
        StateClient {
            replicas,
            pinned: None,
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[Endpoint] {
        self.replicas.endpoints()
    }

    /// The same client addressing only the replica at `endpoint` (one of
    /// the cluster's, configured or not): every call goes there, retried
    /// there while the rules allow, and a NOT_LEADER refusal is final.
    pub fn at(&self, endpoint: &str) -> Result<StateClient, ClientError> {
        let endpoint =
            Endpoint::parse(endpoint).map_err(|e| ClientError::InvalidEndpoint(e.to_string()))?;
        Ok(StateClient {
            replicas: self.replicas.clone(),
            pinned: Some(endpoint),
        })
    }

    /// The replica this client addresses, if it is pinned to one.
    pub fn pinned(&self) -> Option<&Endpoint> {
        self.pinned.as_ref()
    }

    /// Finds the leader (asking every configured replica in turn).
    pub async fn leader(&self) -> Result<Endpoint, ClientError> {
        self.replicas.leader().await
    }

    fn target(&self) -> Target<'_> {
        match &self.pinned {
            Some(e) => Target::Replica(e),
            None => Target::Leader,
        }
    }

    /// Runs `call` through the loop, bounded by the request timeout or not.
    async fn run<T, F, Fut>(&self, kind: CallKind, bounded: bool, call: F) -> Result<T, ClientError>
    where
        F: Fn(SchedulerStateClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let timeout = bounded.then_some(self.replicas.config.request_timeout);
        self.replicas
            .call(self.target(), kind, timeout, |channel| call(stub(channel)))
            .await
    }

    /// Applies `txn` through the log on the leader; returns its position
    /// once the leader applied it. Refused transactions (INVALID,
    /// REJECTED, ...) changed nothing; [`ClientError::OutcomeUnknown`] may
    /// have been applied.
    pub async fn submit(&self, txn: Transaction) -> Result<u64, ClientError> {
        self.run(CallKind::StateWrite, true, |mut c| {
            let transaction = Some(txn.clone());
            async move {
                c.submit(SubmitRequest { transaction })
                    .await
                    .map(|r| r.into_inner().position)
            }
        })
        .await
    }

    /// Tasks matching a query (the request's mode says local or
    /// linearizable).
    pub async fn query_tasks(
        &self,
        query: TaskQueryRequest,
    ) -> Result<Streaming<ScheduledTask>, ClientError> {
        self.run(CallKind::Read, true, |mut c| {
            let query = query.clone();
            async move { c.query_tasks(query).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Entities of one kind (see `EntitiesRequest`).
    pub async fn entities(
        &self,
        request: EntitiesRequest,
    ) -> Result<Streaming<Entity>, ClientError> {
        self.run(CallKind::Read, true, |mut c| {
            let request = request.clone();
            async move { c.entities(request).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Entity counts, the applied position and the state hash (not
    /// bounded by the request timeout: it hashes the whole state).
    pub async fn summary(&self, mode: ReadMode) -> Result<SummaryResponse, ClientError> {
        self.run(CallKind::Read, false, |mut c| async move {
            c.summary(SummaryRequest { mode: mode as i32 })
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// A consistent snapshot of the whole state, one frame per message.
    pub async fn snapshot(&self, mode: ReadMode) -> Result<Streaming<SnapshotFrame>, ClientError> {
        self.run(CallKind::Read, true, |mut c| async move {
            c.snapshot(SnapshotRequest { mode: mode as i32 })
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// The changes applied after `from_position`, then live (see
    /// `WatchRequest`; MUST_RELOAD ends it).
    pub async fn watch(&self, from_position: u64) -> Result<Streaming<ChangeEvent>, ClientError> {
        self.run(CallKind::Read, true, |mut c| async move {
            c.watch(WatchRequest { from_position })
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// What the replica has staged, and the last recovery it saw
    /// committed.
    pub async fn recovery_status(&self) -> Result<RecoveryStatusResponse, ClientError> {
        self.run(CallKind::Read, true, |mut c| async move {
            c.recovery_status(RecoveryStatusRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Uploads a backup's frames (as in the file) and stages it, on the
    /// leader (or the pinned replica). Sent once: the frames cannot be sent
    /// again, so no failure is retried. Returns the replica and what it
    /// staged.
    pub async fn stage_recovery<S>(
        &self,
        frames: S,
    ) -> Result<(Endpoint, RecoveryStatusResponse), ClientError>
    where
        S: Stream<Item = SnapshotFrame> + Send + 'static,
    {
        let endpoint = match &self.pinned {
            Some(e) => e.clone(),
            None => self.replicas.leader().await?,
        };
        let mut c = stub(self.replicas.channel(&endpoint)?);
        match c.stage_recovery(frames).await {
            Ok(r) => Ok((endpoint, r.into_inner())),
            Err(s) => {
                let rule = wire::retry_rule(&s, CallKind::StateWrite);
                Err(failure(&endpoint, &s, rule))
            }
        }
    }

    /// Tasks of the staged backup matching a query.
    pub async fn recovery_tasks(
        &self,
        query: TaskQueryRequest,
    ) -> Result<Streaming<ScheduledTask>, ClientError> {
        self.run(CallKind::Read, true, |mut c| {
            let query = query.clone();
            async move { c.recovery_tasks(query).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Deletes tasks from the staged backup; returns how many.
    pub async fn delete_recovery_tasks(
        &self,
        request: DeleteRecoveryTasksRequest,
    ) -> Result<u64, ClientError> {
        self.run(CallKind::StateWrite, true, |mut c| {
            let request = request.clone();
            async move {
                c.delete_recovery_tasks(request)
                    .await
                    .map(|r| r.into_inner().deleted)
            }
        })
        .await
    }

    /// Drops the staged backup.
    pub async fn unload_recovery(&self) -> Result<(), ClientError> {
        self.run(CallKind::StateWrite, true, |mut c| async move {
            c.unload_recovery(UnloadRecoveryRequest {})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Replaces the cluster's whole state with the staged backup; returns
    /// the position of the replacement (not bounded by the request
    /// timeout: it replicates the whole staged state).
    pub async fn commit_recovery(&self) -> Result<u64, ClientError> {
        self.run(CallKind::StateWrite, false, |mut c| async move {
            c.commit_recovery(CommitRecoveryRequest {})
                .await
                .map(|r| r.into_inner().position)
        })
        .await
    }
}
