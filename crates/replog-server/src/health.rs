//! Readiness: one decision, two probes. `GET /readyz` on the HTTP port and
//! the standard `grpc.health.v1.Health` service on the gRPC port answer
//! from the same [`readiness`] of the replica.
//!
//! A replica is ready (`SERVING`) when all of these hold:
//! - it has not stopped on a fatal error (`/livez` would be 503);
//! - it is VOTING (not EMPTY or RECOVERING) and a voter of its current
//!   configuration (not a learner: catching up, or isolated by the repair
//!   coordinator);
//! - it knows a leader (it is not in an election or cut off);
//! - it has applied all but at most [`READY_MAX_UNAPPLIED`] of the
//!   positions it holds (it is caught up).
//!
//! Otherwise it is `NOT_SERVING`, and `/readyz` says why.
//!
//! gRPC service names: `""` (the replica as a whole) and each gRPC service
//! the replica serves (`replog.client.v1.ReplogClient`,
//! `replog.replica.v1.ReplicaTransport`, and
//! `replog.store.v1.SchedulerState` when the state store is served) all
//! answer the replica's readiness: one replica, one answer. Any other name
//! is `NOT_FOUND` from `Check` and `SERVICE_UNKNOWN` from `Watch`, as the
//! protocol asks.
//!
//! `Watch` sends the status at once, then every change of it. It follows
//! the replica's progress channel (a change is seen when it happens) and
//! re-reads at least every [`WATCH_RECHECK`] (a fatal stop is not a
//! progress change). At most [`MAX_WATCHES`] watches run at once; past that
//! a watch is refused with `RESOURCE_EXHAUSTED`, never queued.

use std::sync::Arc;
use std::time::Duration;

use replog_log::{Log, Progress, ReplicaStatus};
use replog_proto::health::health_check_response::ServingStatus;
use replog_proto::health::health_server::{Health, HealthServer};
use replog_proto::health::{HealthCheckRequest, HealthCheckResponse};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Positions a ready replica may hold but not have applied yet.
pub const READY_MAX_UNAPPLIED: u64 = 1_000;

/// Longest a watch goes without re-reading the replica's readiness.
pub const WATCH_RECHECK: Duration = Duration::from_secs(1);

/// Most `Watch` calls served at once by one replica.
pub const MAX_WATCHES: usize = 64;

/// Answers buffered per watch before the watcher is waited for.
const WATCH_BUFFER: usize = 4;

/// Why the replica is not ready, `None` when it is: the module's rule.
/// `failure` is the fatal error the replica stopped on, if any.
pub fn readiness(p: &Progress, failure: Option<&str>) -> Option<String> {
    if let Some(why) = failure {
        return Some(format!("stopped: {why}"));
    }
    if p.status != ReplicaStatus::Voting {
        return Some(format!("replica is {}", p.status));
    }
    if !p.voter {
        return Some("replica is a learner (catching up or isolated)".into());
    }
    if p.leader.is_none() {
        return Some("no leader known".into());
    }
    let unapplied = p.last_index.saturating_sub(p.applied);
    if unapplied > READY_MAX_UNAPPLIED {
        return Some(format!("{unapplied} positions held but not applied yet"));
    }
    None
}

/// The replica's readiness now (see [`readiness`]).
pub(crate) fn not_ready(log: &Log) -> Option<String> {
    readiness(&log.progress(), log.failure().as_deref())
}

/// The `grpc.health.v1.Health` service of one replica.
pub(crate) struct HealthService {
    log: Arc<Log>,
    services: Vec<&'static str>,
    watches: Arc<Semaphore>,
}

impl HealthService {
    /// `services`: the full names of the gRPC services this replica serves.
    pub(crate) fn new(log: Arc<Log>, services: Vec<&'static str>) -> Self {
        HealthService {
            log,
            services,
            watches: Arc::new(Semaphore::new(MAX_WATCHES)),
        }
    }

    pub(crate) fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }

    fn knows(&self, service: &str) -> bool {
        service.is_empty() || self.services.contains(&service)
    }
}

/// `SERVING` or `NOT_SERVING` from the readiness rule.
fn serving_status(log: &Log) -> ServingStatus {
    match not_ready(log) {
        None => ServingStatus::Serving,
        Some(_) => ServingStatus::NotServing,
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !self.knows(&service) {
            return Err(Status::not_found(format!(
                "unknown service {service:?}: this replica serves {:?}",
                self.services
            )));
        }
        Ok(Response::new(answer(serving_status(&self.log))))
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("{MAX_WATCHES} health watches already run"))
        })?;
        let service = request.into_inner().service;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let log = self.log.clone();
        let known = self.knows(&service);
        tokio::spawn(async move {
            let _permit = permit;
            if known {
                follow(&log, &tx).await;
            } else {
                // Unknown names stay unknown: the set of services is fixed
                // when the replica starts. Hold the call open until the
                // watcher leaves, as the protocol asks.
                if tx
                    .send(Ok(answer(ServingStatus::ServiceUnknown)))
                    .await
                    .is_ok()
                {
                    tx.closed().await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends the readiness at once and at each change, until the watcher
/// leaves or the replica's progress channel closes (the replica stopped:
/// the last answer sent then is `NOT_SERVING`).
async fn follow(log: &Log, tx: &mpsc::Sender<Result<HealthCheckResponse, Status>>) {
    let mut progress = log.watch_progress();
    let mut sent: Option<ServingStatus> = None;
    loop {
        let now = serving_status(log);
        if sent != Some(now) {
            if tx.send(Ok(answer(now))).await.is_err() {
                return;
            }
            sent = Some(now);
        }
        tokio::select! {
            changed = progress.changed() => {
                if changed.is_err() {
                    if sent != Some(ServingStatus::NotServing) {
                        let _ = tx.send(Ok(answer(ServingStatus::NotServing))).await;
                    }
                    return;
                }
            }
            _ = tokio::time::sleep(WATCH_RECHECK) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(status: ReplicaStatus, leader: Option<u64>, applied: u64, last: u64) -> Progress {
        Progress {
            status,
            leader,
            applied,
            last_index: last,
            voter: true,
            ..Default::default()
        }
    }

    fn learner(p: Progress) -> Progress {
        Progress { voter: false, ..p }
    }

    #[test]
    fn readiness_as_a_table() {
        use ReplicaStatus::*;
        // (progress, fatal failure, the reason it is not ready; None: ready)
        let rows: Vec<(Progress, Option<&str>, Option<&str>)> = vec![
            (progress(Voting, Some(1), 10, 10), None, None),
            (
                progress(Voting, Some(2), 0, READY_MAX_UNAPPLIED),
                None,
                None,
            ),
            (
                progress(Voting, Some(2), 0, READY_MAX_UNAPPLIED + 1),
                None,
                Some("1001 positions held but not applied yet"),
            ),
            (
                progress(Voting, None, 10, 10),
                None,
                Some("no leader known"),
            ),
            (
                learner(progress(Voting, Some(1), 10, 10)),
                None,
                Some("replica is a learner (catching up or isolated)"),
            ),
            (
                progress(Empty, Some(1), 0, 0),
                None,
                Some("replica is EMPTY"),
            ),
            (
                progress(Recovering, Some(1), 5, 5),
                None,
                Some("replica is RECOVERING"),
            ),
            (
                progress(Voting, Some(1), 10, 10),
                Some("disk gone"),
                Some("stopped: disk gone"),
            ),
            // A stopped replica says it stopped, whatever else holds.
            (
                progress(Empty, None, 0, 0),
                Some("disk gone"),
                Some("stopped: disk gone"),
            ),
        ];
        for (p, failure, want) in rows {
            let got = readiness(&p, failure);
            assert_eq!(got.as_deref(), want, "{p:?} failure={failure:?}");
        }
    }
}
