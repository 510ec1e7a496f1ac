//! The clients against tiny in-process gRPC servers that answer from a
//! script: each call takes the next scripted refusal, or succeeds when the
//! script is empty.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replog_proto::client::replog_client_server::{ReplogClient, ReplogClientServer};
use replog_proto::client::{ChangeMembershipResponse, TransferLeaderResponse, TruncateResponse};
use replog_proto::state::{Entity, ScheduledTask, Transaction};
use replog_proto::store::scheduler_state_server::{SchedulerState, SchedulerStateServer};
use replog_proto::store::{
    ChangeEvent, CommitRecoveryRequest, CommitRecoveryResponse, DeleteRecoveryTasksRequest,
    DeleteRecoveryTasksResponse, EntitiesRequest, ReadMode, RecoveryStatusRequest,
    RecoveryStatusResponse, SnapshotFrame, SnapshotRequest, SubmitRequest, SubmitResponse,
    SummaryRequest, SummaryResponse, TaskQueryRequest, UnloadRecoveryRequest,
    UnloadRecoveryResponse, WatchRequest,
};
use replog_proto::wire::{self, ErrorCode, LeaderHint};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::*;

/// One scripted replica: both APIs on one port.
#[derive(Default)]
struct Fake {
    id: u64,
    /// Refusals to answer with, in order; then success.
    script: Mutex<VecDeque<Status>>,
    calls: AtomicU32,
    is_leader: bool,
    /// Frames received by StageRecovery.
    frames: AtomicU32,
}

impl Fake {
    fn answer(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.script.lock().unwrap().pop_front() {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn refuse(&self, s: Status) {
        self.script.lock().unwrap().push_back(s);
    }
}

fn refusal(code: ErrorCode, leader: Option<(u64, &str)>) -> Status {
    let mut s = wire::coded_status(Code::FailedPrecondition, code, "scripted");
    if let Some((id, address)) = leader {
        wire::set_leader_hint(
            &mut s,
            &LeaderHint {
                id,
                address: address.into(),
            },
        );
    }
    s
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn one<T: Send + 'static>(item: T) -> Boxed<T> {
    Box::pin(tokio_stream::iter([Ok(item)]))
}

struct LogFake(Arc<Fake>);
struct StateFake(Arc<Fake>);

#[tonic::async_trait]
impl ReplogClient for LogFake {
    async fn append(&self, _r: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(AppendResponse {
            position: 7,
            term: self.0.id,
        }))
    }

    async fn truncate(
        &self,
        _r: Request<TruncateRequest>,
    ) -> Result<Response<TruncateResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(TruncateResponse { position: 1 }))
    }

    async fn read(&self, _r: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(ReadResponse::default()))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            replica_id: self.0.id,
            is_leader: self.0.is_leader,
            ..Default::default()
        }))
    }

    type WatchLeadershipStream = Boxed<Leadership>;

    async fn watch_leadership(
        &self,
        _r: Request<WatchLeadershipRequest>,
    ) -> Result<Response<Self::WatchLeadershipStream>, Status> {
        self.0.answer()?;
        Ok(Response::new(one(Leadership::default())))
    }

    async fn change_membership(
        &self,
        _r: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(ChangeMembershipResponse { position: 1 }))
    }

    async fn transfer_leader(
        &self,
        _r: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn repair(
        &self,
        _r: Request<replog_proto::client::RepairRequest>,
    ) -> Result<Response<replog_proto::client::RepairResponse>, Status> {
        Err(Status::unimplemented("the log fake has no repair API"))
    }
}

#[tonic::async_trait]
impl SchedulerState for StateFake {
    async fn submit(&self, _r: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(SubmitResponse {
            position: 100 + self.0.id,
        }))
    }

    type QueryTasksStream = Boxed<ScheduledTask>;

    async fn query_tasks(
        &self,
        r: Request<TaskQueryRequest>,
    ) -> Result<Response<Self::QueryTasksStream>, Status> {
        self.0.answer()?;
        let task_id = r.into_inner().task_ids.concat();
        Ok(Response::new(one(ScheduledTask {
            task_id,
            ..Default::default()
        })))
    }

    type EntitiesStream = Boxed<Entity>;

    async fn entities(
        &self,
        _r: Request<EntitiesRequest>,
    ) -> Result<Response<Self::EntitiesStream>, Status> {
        self.0.answer()?;
        Ok(Response::new(one(Entity::default())))
    }

    async fn summary(
        &self,
        _r: Request<SummaryRequest>,
    ) -> Result<Response<SummaryResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(SummaryResponse {
            applied: self.0.id,
            ..Default::default()
        }))
    }

    type SnapshotStream = Boxed<SnapshotFrame>;

    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.0.answer()?;
        Ok(Response::new(one(SnapshotFrame::default())))
    }

    type WatchStream = Boxed<ChangeEvent>;

    async fn watch(
        &self,
        _r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.0.answer()?;
        Ok(Response::new(one(ChangeEvent::default())))
    }

    async fn recovery_status(
        &self,
        _r: Request<RecoveryStatusRequest>,
    ) -> Result<Response<RecoveryStatusResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(RecoveryStatusResponse {
            replica_id: self.0.id,
            ..Default::default()
        }))
    }

    async fn stage_recovery(
        &self,
        r: Request<Streaming<SnapshotFrame>>,
    ) -> Result<Response<RecoveryStatusResponse>, Status> {
        self.0.answer()?;
        let mut frames = r.into_inner();
        while frames.message().await?.is_some() {
            self.0.frames.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Response::new(RecoveryStatusResponse {
            staged: true,
            replica_id: self.0.id,
            ..Default::default()
        }))
    }

    type RecoveryTasksStream = Boxed<ScheduledTask>;

    async fn recovery_tasks(
        &self,
        _r: Request<TaskQueryRequest>,
    ) -> Result<Response<Self::RecoveryTasksStream>, Status> {
        self.0.answer()?;
        Ok(Response::new(one(ScheduledTask::default())))
    }

    async fn delete_recovery_tasks(
        &self,
        _r: Request<DeleteRecoveryTasksRequest>,
    ) -> Result<Response<DeleteRecoveryTasksResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(DeleteRecoveryTasksResponse { deleted: 2 }))
    }

    async fn unload_recovery(
        &self,
        _r: Request<UnloadRecoveryRequest>,
    ) -> Result<Response<UnloadRecoveryResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(UnloadRecoveryResponse {}))
    }

    async fn commit_recovery(
        &self,
        _r: Request<CommitRecoveryRequest>,
    ) -> Result<Response<CommitRecoveryResponse>, Status> {
        self.0.answer()?;
        Ok(Response::new(CommitRecoveryResponse { position: 9 }))
    }
}

/// Starts a scripted replica with id `id`; returns it with its address.
async fn replica(id: u64, is_leader: bool) -> (Arc<Fake>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let fake = Arc::new(Fake {
        id,
        is_leader,
        ..Default::default()
    });
    let server = tonic::transport::Server::builder()
        .add_service(ReplogClientServer::new(LogFake(fake.clone())))
        .add_service(SchedulerStateServer::new(StateFake(fake.clone())))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    (fake, address)
}

/// An address nobody listens on.
fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn quick() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(5),
        max_attempts: 6,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(40),
        retry_deadline: None,
    }
}

fn txn() -> Transaction {
    Transaction::default()
}

#[tokio::test]
async fn submit_follows_the_leader_hint_then_keeps_to_the_leader() {
    let (follower, follower_at) = replica(1, false).await;
    let (leader, leader_at) = replica(2, true).await;
    follower.refuse(refusal(ErrorCode::NotLeader, Some((2, &leader_at))));
    // Only the follower is configured: the leader is found through its hint.
    let sc = StateClient::with_config([&follower_at], quick());
    assert_eq!(sc.submit(txn()).await.unwrap(), 102);
    assert_eq!((follower.calls(), leader.calls()), (1, 1));
    // The leader is remembered: the next call goes there first.
    assert_eq!(sc.submit(txn()).await.unwrap(), 102);
    assert_eq!((follower.calls(), leader.calls()), (1, 2));
}

#[tokio::test]
async fn a_submit_whose_leader_lost_leadership_is_not_sent_again() {
    let (leader, at) = replica(1, true).await;
    leader.refuse(refusal(ErrorCode::LeadershipLost, Some((2, "elsewhere:1"))));
    let sc = StateClient::with_config([&at], quick());
    let e = sc.submit(txn()).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::OutcomeUnknown { code: Some(ErrorCode::LeadershipLost), endpoint, .. } if *endpoint == at),
        "{e:?}"
    );
    assert_eq!(e.error_code(), Some(ErrorCode::LeadershipLost));
    assert_eq!(leader.calls(), 1, "sent once");
    // A state write's TIMEOUT may come after the append: unknown too.
    leader.refuse(wire::coded_status(
        Code::DeadlineExceeded,
        ErrorCode::Timeout,
        "no answer within 30s",
    ));
    let e = sc.submit(txn()).await.unwrap_err();
    assert!(matches!(e, ClientError::OutcomeUnknown { .. }), "{e:?}");
    assert_eq!(leader.calls(), 2);
}

#[tokio::test]
async fn what_was_not_executed_is_retried_and_refusals_are_final() {
    let (r, at) = replica(1, true).await;
    r.refuse(refusal(ErrorCode::Busy, None));
    r.refuse(refusal(ErrorCode::NotVoting, None));
    let sc = StateClient::with_config([&at], quick());
    assert_eq!(sc.submit(txn()).await.unwrap(), 101);
    assert_eq!(r.calls(), 3);
    r.refuse(wire::coded_status(
        Code::InvalidArgument,
        ErrorCode::Invalid,
        "bad transaction",
    ));
    let e = sc.submit(txn()).await.unwrap_err();
    match &e {
        ClientError::Replica {
            code,
            status,
            message,
            ..
        } => {
            assert_eq!(code, "INVALID");
            assert_eq!(*status, Code::InvalidArgument);
            assert_eq!(message, "bad transaction");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.calls(), 4, "a refusal is not retried");
}

#[tokio::test]
async fn a_leader_that_names_itself_is_asked_again_after_a_backoff() {
    let (r, at) = replica(1, true).await;
    // Its writer is not ready yet: NOT_LEADER naming itself.
    r.refuse(refusal(ErrorCode::NotLeader, Some((1, &at))));
    r.refuse(refusal(ErrorCode::NotLeader, Some((1, &at))));
    let sc = StateClient::with_config([&at], quick());
    let started = Instant::now();
    assert_eq!(sc.submit(txn()).await.unwrap(), 101);
    assert_eq!(r.calls(), 3);
    // Two backoffs of 20 and 40 ms, not a spin.
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_replica_is_skipped_and_reads_go_anywhere() {
    let (r, at) = replica(1, false).await;
    let sc = StateClient::with_config([dead_address(), at.clone()], quick());
    // A connection that could not be made sent nothing: the next replica.
    assert_eq!(sc.submit(txn()).await.unwrap(), 101);
    r.refuse(refusal(ErrorCode::ReadNotConfirmed, None));
    let query = TaskQueryRequest {
        mode: ReadMode::Linearizable as i32,
        task_ids: vec!["t-1".into()],
        ..Default::default()
    };
    let mut tasks = sc.query_tasks(query).await.unwrap();
    assert_eq!(tasks.message().await.unwrap().unwrap().task_id, "t-1");
    assert_eq!(r.calls(), 3);
}

#[tokio::test]
async fn no_leader_within_the_deadline() {
    let (r, at) = replica(1, false).await;
    for _ in 0..1000 {
        r.refuse(refusal(ErrorCode::NotLeader, None));
    }
    let sc = StateClient::with_config(
        [&at],
        ClientConfig {
            max_attempts: u32::MAX,
            retry_deadline: Some(Duration::from_millis(300)),
            ..quick()
        },
    );
    let started = Instant::now();
    let e = sc.submit(txn()).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&e, ClientError::NoLeader { last, .. } if last.contains("scripted")),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(r.calls() > 3, "{}", r.calls());
}

#[tokio::test]
async fn a_pinned_client_stays_on_its_replica() {
    let (follower, follower_at) = replica(1, false).await;
    let (leader, leader_at) = replica(2, true).await;
    let sc = StateClient::with_config([&follower_at, &leader_at], quick());
    let pinned = sc.at(&format!("http://{follower_at}/")).unwrap();
    assert_eq!(pinned.pinned().unwrap().as_str(), follower_at);
    follower.refuse(refusal(ErrorCode::NotLeader, Some((2, &leader_at))));
    let e = pinned.commit_recovery().await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::NotLeader), "{e:?}");
    assert_eq!(
        (follower.calls(), leader.calls()),
        (1, 0),
        "no hint followed"
    );
    // Retryable refusals are retried there.
    follower.refuse(refusal(ErrorCode::Busy, None));
    assert_eq!(pinned.recovery_status().await.unwrap().replica_id, 1);
    assert_eq!(pinned.summary(ReadMode::Local).await.unwrap().applied, 1);
    assert_eq!(
        pinned
            .delete_recovery_tasks(DeleteRecoveryTasksRequest::default())
            .await
            .unwrap(),
        2
    );
    pinned.unload_recovery().await.unwrap();
    assert_eq!(leader.calls(), 0);
    // A dead pinned replica is unreachable, not "no leader".
    let dead = sc.at(&dead_address()).unwrap();
    let e = dead.recovery_status().await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    assert!(matches!(
        sc.at("nohost"),
        Err(ClientError::InvalidEndpoint(_))
    ));
}

#[tokio::test]
async fn stage_uploads_every_frame_to_the_leader_once() {
    let (_follower, follower_at) = replica(1, false).await;
    let (leader, leader_at) = replica(2, true).await;
    let sc = StateClient::with_config([&follower_at, &leader_at], quick());
    let frames = tokio_stream::iter((0..3).map(|_| SnapshotFrame::default()));
    let (on, status) = sc.stage_recovery(frames).await.unwrap();
    assert_eq!(on.as_str(), leader_at);
    assert!(status.staged);
    assert_eq!(leader.frames.load(Ordering::SeqCst), 3);
    // A refusal of an upload is not retried (the frames are gone).
    leader.refuse(wire::coded_status(
        Code::FailedPrecondition,
        ErrorCode::AlreadyStaged,
        "a backup is staged already",
    ));
    let frames = tokio_stream::iter([SnapshotFrame::default()]);
    let e = sc.stage_recovery(frames).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::AlreadyStaged));
    assert_eq!(leader.calls(), 2);
}

#[tokio::test]
async fn streams_open_through_the_loop() {
    let (r, at) = replica(1, true).await;
    let sc = StateClient::with_config([&at], quick());
    r.refuse(refusal(ErrorCode::Busy, None));
    assert!(sc
        .snapshot(ReadMode::Linearizable)
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .is_some());
    assert!(sc
        .watch(0)
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .is_some());
    assert!(sc
        .entities(EntitiesRequest::default())
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .is_some());
    assert!(sc
        .recovery_tasks(TaskQueryRequest::default())
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .is_some());
    r.refuse(wire::coded_status(
        Code::FailedPrecondition,
        ErrorCode::MustReload,
        "reload",
    ));
    let e = sc.watch(5).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::MustReload));
    assert_eq!(sc.leader().await.unwrap().as_str(), at);
}

#[tokio::test]
async fn appends_follow_hints_and_never_repeat_a_lost_one() {
    let (follower, follower_at) = replica(1, false).await;
    let (leader, leader_at) = replica(2, true).await;
    follower.refuse(refusal(ErrorCode::NotLeader, Some((2, &leader_at))));
    let client = Client::with_config([&follower_at], quick());
    assert_eq!(client.append(&b"x"[..]).await.unwrap().position, 7);
    assert_eq!((follower.calls(), leader.calls()), (1, 1));
    // The leader alone from here on (a forgotten leader is looked for in
    // turn).
    let client = Client::with_config([&leader_at], quick());
    leader.refuse(refusal(ErrorCode::LeadershipLost, None));
    let e = client.append(&b"y"[..]).await.unwrap_err();
    assert!(
        matches!(
            &e,
            ClientError::OutcomeUnknown {
                code: Some(ErrorCode::LeadershipLost),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(leader.calls(), 2, "sent once");
    // On the log API TIMEOUT is a writer that did not start: retried.
    leader.refuse(wire::coded_status(
        Code::DeadlineExceeded,
        ErrorCode::Timeout,
        "writer not started",
    ));
    leader.refuse(refusal(ErrorCode::ReadNotConfirmed, None));
    assert_eq!(client.append(&b"z"[..]).await.unwrap().position, 7);
    client.read(1, 1, true).await.unwrap();
    // A truncated position is a final answer.
    leader.refuse(wire::coded_status(
        Code::OutOfRange,
        ErrorCode::Truncated,
        "truncated",
    ));
    let e = client.read(1, 1, false).await.unwrap_err();
    assert_eq!(e.code(), Some("TRUNCATED"), "{e}");
    assert_eq!(client.leader().await.unwrap(), leader_at);
    assert!(client.status_of(&follower_at).await.unwrap().replica_id == 1);
    // The state client made from it shares what it learnt.
    assert_eq!(client.state().submit(txn()).await.unwrap(), 102);
    assert_eq!((follower.calls(), leader.calls()), (1, 8));
}

#[tokio::test]
async fn a_bad_endpoint_fails_every_call_with_its_reason() {
    let (_r, at) = replica(1, true).await;
    let client = Client::with_config([at.as_str(), "https://a:1"], quick());
    let e = client.append(&b"x"[..]).await.unwrap_err();
    match e {
        ClientError::InvalidEndpoint(m) => {
            assert!(
                m.contains("https://a:1") && m.contains("plain http://"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let e = Client::new(Vec::<String>::new())
        .leader()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidEndpoint(_)), "{e:?}");
    // Spaces, http:// and a trailing / are accepted, as always.
    let client = Client::with_config([format!(" http://{at}/ ")], quick());
    assert_eq!(client.endpoints()[0].as_str(), at);
    assert_eq!(client.append(&b"x"[..]).await.unwrap().position, 7);
}
