//! The client API (`replog.client.v1.ReplogClient`) over an embedded [`Log`].
//!
//! Writes go through one [`Writer`] bound to the current leadership term;
//! when the term changes a new writer is started, so a write never crosses
//! terms. A replica that is not the writer refuses writes with
//! FAILED_PRECONDITION and the trailer `replog-leader: <id>=<address>`.
//! Every error carries a stable code in the `replog-error` metadata; a
//! linearizable read that was not confirmed in time is READ_NOT_CONFIRMED
//! (UNAVAILABLE): nothing was executed, and clients retry it. The codes,
//! the hint and what clients may retry are `replog_proto::wire`'s.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use replog_log::{Log, LogError, MembershipChange, Position, Writer};
use replog_proto::client::replog_client_server::{ReplogClient, ReplogClientServer};
use replog_proto::client::{
    AppendRequest, AppendResponse, ChangeMembershipRequest, ChangeMembershipResponse, Entry,
    Leadership, MemberStatus, MembershipOp, ReadRequest, ReadResponse, RepairRequest,
    RepairResponse, StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
    TruncateRequest, TruncateResponse, WatchLeadershipRequest,
};
use replog_proto::wire::{self, ErrorCode, LeaderHint};
use replog_storage::Member;
use tokio::sync::Mutex;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::MAX_CLIENT_MESSAGE_BYTES;

/// The client API service of one replica.
#[derive(Clone)]
pub struct ClientService {
    log: Arc<Log>,
    writer: Arc<Mutex<Option<Arc<Writer>>>>,
    /// Turns true when the server shuts down: open streams end, so a
    /// graceful shutdown never waits for a watcher.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The log holds the scheduler state (`--state`): raw appends and
    /// truncations are refused (the store writes its own records, and only
    /// its compaction may truncate, after making the state durable).
    state_log: bool,
    /// The repair admin API behind the `Repair` RPC.
    repairs: Option<Arc<crate::repair::Repairs>>,
}

/// The stable error code of a log error (`replog-error` metadata).
pub fn error_code(e: &LogError) -> ErrorCode {
    match e {
        LogError::NotLeader { .. } => ErrorCode::NotLeader,
        LogError::LeadershipLost { .. } => ErrorCode::LeadershipLost,
        LogError::Truncated { .. } => ErrorCode::Truncated,
        LogError::Pending { .. } => ErrorCode::Pending,
        LogError::PastEnd { .. } => ErrorCode::PastEnd,
        LogError::EntryTooLarge { .. } => ErrorCode::EntryTooLarge,
        LogError::NotVoting(_) => ErrorCode::NotVoting,
        // Not executed, may succeed later: clients retry it.
        LogError::Busy | LogError::MembershipInProgress(_) => ErrorCode::Busy,
        LogError::Membership(_) => ErrorCode::Membership,
        LogError::Invalid(_) | LogError::WriterNotStarted => ErrorCode::Invalid,
        LogError::Closed(_) => ErrorCode::Closed,
        LogError::Timeout(_) => ErrorCode::Timeout,
        // Nothing was executed: clients retry it, on any replica.
        LogError::ReadNotConfirmed { .. } => ErrorCode::ReadNotConfirmed,
        LogError::Storage(_) | LogError::Core(_) => ErrorCode::Storage,
    }
}

impl ClientService {
    pub fn new(log: Arc<Log>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        ClientService {
            log,
            writer: Arc::new(Mutex::new(None)),
            stopping,
            state_log: false,
            repairs: None,
        }
    }

    /// Serves the `Repair` RPC with `repairs` (without: unavailable).
    pub fn with_repairs(mut self, repairs: Arc<crate::repair::Repairs>) -> Self {
        self.repairs = Some(repairs);
        self
    }

    /// Refuses raw appends and truncations: the log belongs to the
    /// scheduler-state store.
    pub fn for_state_log(mut self) -> Self {
        self.state_log = true;
        self
    }

    fn refuse_raw_write(&self, what: &str) -> Result<(), Status> {
        if !self.state_log {
            return Ok(());
        }
        Err(wire::coded_status(
            Code::FailedPrecondition,
            ErrorCode::StateLog,
            format!(
                "this log holds the scheduler state (--state): {what} through replog.store.v1.SchedulerState, \
                 not the raw log API (the store compacts the log itself)"
            ),
        ))
    }

    /// The tonic server for this service, with its size limits.
    pub fn into_server(self) -> ReplogClientServer<ClientService> {
        ReplogClientServer::new(self)
            .max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
    }

    fn status(&self, e: LogError) -> Status {
        log_status(&self.log, e)
    }

    /// The writer of the current term, started if needed.
    async fn writer(&self) -> Result<Arc<Writer>, Status> {
        let p = self.log.progress();
        if !p.leader_ready {
            return Err(self.status(LogError::NotLeader { leader: p.leader }));
        }
        let mut slot = self.writer.lock().await;
        if let Some(w) = slot.as_ref() {
            if w.term() == Some(p.term) {
                return Ok(w.clone());
            }
        }
        let mut w = self.log.writer();
        w.start().await.map_err(|e| self.status(e))?;
        let w = Arc::new(w);
        *slot = Some(w.clone());
        Ok(w)
    }
}

/// The leader this replica knows, with its address if the membership
/// names it.
fn leader_hint(log: &Log) -> Option<LeaderHint> {
    let leader = log.progress().leader?;
    let address = log
        .meta()
        .members
        .into_iter()
        .find(|m| m.id == leader)
        .map(|m| m.address)
        .unwrap_or_default();
    Some(LeaderHint {
        id: leader,
        address,
    })
}

/// A log error as a gRPC status: a stable `replog-error` code, and the
/// leader's `id=address` in `replog-leader` when this replica cannot write.
pub fn log_status(log: &Log, e: LogError) -> Status {
    let code = match &e {
        LogError::NotLeader { .. } | LogError::LeadershipLost { .. } | LogError::NotVoting(_) => {
            Code::FailedPrecondition
        }
        LogError::Truncated { .. } | LogError::PastEnd { .. } => Code::OutOfRange,
        LogError::Pending { .. }
        | LogError::Busy
        | LogError::MembershipInProgress(_)
        | LogError::ReadNotConfirmed { .. } => Code::Unavailable,
        LogError::EntryTooLarge { .. } | LogError::Invalid(_) | LogError::WriterNotStarted => {
            Code::InvalidArgument
        }
        LogError::Membership(_) => Code::FailedPrecondition,
        LogError::Timeout(_) => Code::DeadlineExceeded,
        LogError::Closed(_) => Code::Unavailable,
        LogError::Storage(_) | LogError::Core(_) => Code::Internal,
    };
    let mut status = wire::coded_status(code, error_code(&e), e.to_string());
    if matches!(
        e,
        LogError::NotLeader { .. } | LogError::LeadershipLost { .. }
    ) {
        if let Some(hint) = leader_hint(log) {
            wire::set_leader_hint(&mut status, &hint);
        }
    }
    status
}

fn status_pb(s: replog_log::ReplicaStatus) -> i32 {
    replog_log::peers::status_pb(s)
}

type LeadershipStream = Pin<Box<dyn Stream<Item = Result<Leadership, Status>> + Send>>;

#[tonic::async_trait]
impl ReplogClient for ClientService {
    async fn append(
        &self,
        req: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        self.refuse_raw_write("write")?;
        let w = self.writer().await?;
        let data: Bytes = req.into_inner().data;
        let position = w.append(data).await.map_err(|e| self.status(e))?;
        Ok(Response::new(AppendResponse {
            position: position.value(),
            term: w.term().unwrap_or(0),
        }))
    }

    async fn truncate(
        &self,
        req: Request<TruncateRequest>,
    ) -> Result<Response<TruncateResponse>, Status> {
        self.refuse_raw_write("truncate")?;
        let w = self.writer().await?;
        let to = Position::new(req.into_inner().to);
        let position = w.truncate(to).await.map_err(|e| self.status(e))?;
        Ok(Response::new(TruncateResponse {
            position: position.value(),
        }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let r = req.into_inner();
        if r.linearizable {
            self.log
                .linearizable_ending()
                .await
                .map_err(|e| self.status(e))?;
        }
        let reader = self.log.reader();
        let log = self.log.clone();
        let (from, to) = (Position::new(r.from), Position::new(r.to));
        // Reads touch the disk: keep them off the async workers.
        let entries = tokio::task::spawn_blocking(move || reader.read(from, to))
            .await
            .map_err(|e| Status::internal(format!("read task failed: {e}")))?
            .map_err(|e| self.status(e))?;
        let reader = log.reader();
        Ok(Response::new(ReadResponse {
            entries: entries
                .into_iter()
                .map(|e| Entry {
                    position: e.position.value(),
                    data: e.data,
                })
                .collect(),
            beginning: reader.beginning().value(),
            ending: reader.ending().value(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self
            .log
            .cluster_status()
            .await
            .map_err(|e| self.status(e))?;
        let meta = self.log.meta();
        let storage_dir = self.log.path().to_path_buf();
        let disk_bytes = tokio::task::spawn_blocking(move || {
            replog_storage::disk_usage(&storage_dir).unwrap_or(0)
        })
        .await
        .unwrap_or(0);
        let p = s.progress;
        let judgment = self
            .repairs
            .as_ref()
            .map(|r| r.judgment())
            .filter(|j| j.leader);
        Ok(Response::new(StatusResponse {
            cluster_id: meta.cluster_id,
            replica_id: meta.replica_id,
            status: status_pb(p.status),
            term: p.term,
            leader: p.leader.unwrap_or(0),
            leader_address: s.leader_address.unwrap_or_default(),
            is_leader: p.is_leader,
            commit: p.applied,
            applied: p.applied,
            first_index: p.first_index,
            last_index: p.last_index,
            members: s
                .members
                .into_iter()
                .map(|m| MemberStatus {
                    id: m.id,
                    address: m.address,
                    voter: m.voter,
                    matched: m.matched,
                    lag: m.lag,
                    last_heard_ms: m.last_heard.map(|d| d.as_millis() as i64).unwrap_or(-1),
                    missed_pings: m.missed_pings,
                    reachable: m.reachable,
                    health: judgment
                        .as_ref()
                        .and_then(|j| j.health.get(&m.id))
                        .map(describe_health)
                        .unwrap_or_default(),
                })
                .collect(),
            disk_bytes,
            failure_tolerance: judgment
                .as_ref()
                .and_then(|j| j.failure_tolerance)
                .map_or(-1, |t| t as i32),
        }))
    }

    async fn repair(
        &self,
        req: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        let Some(repairs) = &self.repairs else {
            return Err(Status::unavailable(
                "this server runs no repair coordinator",
            ));
        };
        let r = req.into_inner();
        if r.body.len() > crate::repair::intake::MAX_BODY_BYTES {
            return Ok(Response::new(RepairResponse {
                http_status: 400,
                body: br#"{"error":"body too large"}"#.to_vec().into(),
            }));
        }
        let (http_status, body) = repairs.handle(&r.op, &r.body, &r.token, r.forwarded).await;
        Ok(Response::new(RepairResponse {
            http_status: u32::from(http_status),
            body: body.into(),
        }))
    }

    type WatchLeadershipStream = LeadershipStream;

    async fn watch_leadership(
        &self,
        _req: Request<WatchLeadershipRequest>,
    ) -> Result<Response<Self::WatchLeadershipStream>, Status> {
        let mut rx = self.log.watch_progress();
        let svc = self.clone();
        let mut stopping = self.stopping.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                let p = *rx.borrow_and_update();
                let now = (p.term, p.leader, p.leader_ready, p.status);
                if last != Some(now) {
                    last = Some(now);
                    let leader_address =
                        leader_hint(&svc.log).map(|h| h.address).unwrap_or_default();
                    let msg = Leadership {
                        term: p.term,
                        leader: p.leader.unwrap_or(0),
                        leader_address,
                        is_writer: p.leader_ready,
                        status: status_pb(p.status),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                let stopped = tokio::select! {
                    r = rx.changed() => r.is_err(),
                    _ = stopping.wait_for(|s| *s) => true,
                };
                if stopped {
                    let _ = tx
                        .send(Err(Status::unavailable("the replica stopped")))
                        .await;
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn change_membership(
        &self,
        req: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        let r = req.into_inner();
        let mut changes = Vec::with_capacity(r.changes.len());
        let mut addresses = Vec::new();
        for c in r.changes {
            let op = MembershipOp::try_from(c.op).unwrap_or(MembershipOp::Unspecified);
            changes.push(match op {
                MembershipOp::Add => {
                    if c.address.is_empty() {
                        return Err(Status::invalid_argument(format!(
                            "adding replica {} needs its address (host:port)",
                            c.id
                        )));
                    }
                    addresses.push(Member {
                        id: c.id,
                        address: c.address.clone(),
                    });
                    MembershipChange::AddLearner(c.id)
                }
                MembershipOp::Remove => MembershipChange::Remove(c.id),
                MembershipOp::Promote => MembershipChange::AddVoter(c.id),
                MembershipOp::Demote => MembershipChange::AddLearner(c.id),
                MembershipOp::Unspecified => {
                    return Err(Status::invalid_argument(
                        "membership change without an operation",
                    ))
                }
            });
        }
        let position = self
            .log
            .change_membership(changes, addresses)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(ChangeMembershipResponse {
            position: position.value(),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let p = self.log.progress();
        if !p.is_leader {
            return Err(self.status(LogError::NotLeader { leader: p.leader }));
        }
        self.log
            .transfer_leader(req.into_inner().to)
            .map_err(|e| self.status(e))?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> LeadershipStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Leadership, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The detector's judgment as `replog status` shows it.
fn describe_health(h: &replog_repair::Health) -> String {
    match h {
        replog_repair::Health::Healthy => "healthy".into(),
        replog_repair::Health::Grace => "grace".into(),
        replog_repair::Health::Unhealthy { reasons } => {
            let names: Vec<&str> = reasons.iter().map(|r| r.signal()).collect();
            format!("unhealthy: {}", names.join(", "))
        }
    }
}
