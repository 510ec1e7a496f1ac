//! Rust clients of a replog cluster: [`Client`] for the log API and
//! [`StateClient`] for the scheduler-state API (replicas started with
//! `--state`). Both run their calls through one loop (`replicas.rs`).
//!
//! Give them the replica servers' addresses ([`Endpoint`]); they find the
//! leader (and follow `replog-leader` hints when a follower refuses a
//! write), retry what is safe to retry, and never retry what may have
//! happened. What a failure allows is [`replog_proto::wire::retry_rule`],
//! the one table of every replog client:
//!
//! - a call refused with NOT_LEADER was not executed: it is retried on the
//!   leader;
//! - a write whose outcome is unknown (leadership lost, the replica closed,
//!   the connection broke after the request was sent; on the state API
//!   also TIMEOUT and STORAGE, which may come after the write was appended)
//!   fails with [`ClientError::OutcomeUnknown`]: the caller decides
//!   (re-read, or write again if duplicates are fine);
//! - what was not executed (BUSY, NOT_VOTING, READ_NOT_CONFIRMED, a
//!   connection that could not be made; on the log API TIMEOUT, a writer
//!   that did not start) is retried after a backoff, on any replica; so is
//!   a read that failed in transport or with CLOSED or LEADERSHIP_LOST
//!   (a read changes nothing);
//! - any other code is final: [`ClientError::Replica`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), replog_client::ClientError> {
//! let client = replog_client::Client::new(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]);
//! let written = client.append(&b"hello"[..]).await?;
//! let read = client.read(written.position, written.position, true).await?;
//! # let _ = read; Ok(()) }
//! ```

mod endpoint;
mod replicas;
mod state;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use endpoint::{Endpoint, EndpointError};
use replicas::{answer, log_stub, Replicas, Target};
pub use replog_proto::client::{
    AppendRequest, AppendResponse, ChangeMembershipRequest, Entry, Leadership, MemberStatus,
    MembershipChange, MembershipOp, ReadRequest, ReadResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TruncateRequest, WatchLeadershipRequest,
};
pub use replog_proto::wire::{CallKind, ErrorCode, Retry};
pub use state::StateClient;
use tonic::Code;

/// Largest message accepted or sent (reads of many entries, snapshot
/// frames; the server's own limit).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Longest wait for one answer (calls whose work grows with the state,
    /// named on [`StateClient`], are not bounded).
    pub request_timeout: Duration,
    /// Attempts per call before giving up (leader changes, unreachable
    /// replicas).
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest one call keeps trying (`None`: only `max_attempts` bounds
    /// it). A call past it makes no further attempt.
    pub retry_deadline: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_attempts: 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            retry_deadline: None,
        }
    }
}

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The replica answered with an error; `code` is its stable
    /// `replog-error` code (NOT_LEADER, TRUNCATED, PENDING, ...): see
    /// [`ClientError::error_code`].
    #[error("{endpoint}: {code}: {message}")]
    Replica {
        endpoint: String,
        code: String,
        status: Code,
        message: String,
    },
    /// The write may or may not have happened; `code` is the replica's, if
    /// it answered (LEADERSHIP_LOST, CLOSED, ...), `None` when the
    /// connection broke or no answer came in time.
    #[error("{endpoint}: the outcome of the write is unknown: {message}")]
    OutcomeUnknown {
        endpoint: String,
        message: String,
        code: Option<ErrorCode>,
    },
    /// No replica could be reached, or none led, within the attempts.
    #[error("no leader found after {attempts} attempts (last error: {last})")]
    NoLeader { attempts: u32, last: String },
    /// A replica could not be reached.
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
}

impl ClientError {
    /// The stable replog error code, if the replica gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Replica { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How the clients report `status` from the replica at `endpoint`
    /// when nothing is retried (e.g. a stream that broke after it opened):
    /// [`ClientError::Replica`] if it carries a replog code, else
    /// [`ClientError::Unreachable`].
    pub fn from_status(endpoint: &str, status: &tonic::Status) -> ClientError {
        answer(endpoint, status)
    }

    /// The replica's code, typed: of a refusal, or of a write whose
    /// outcome it left unknown.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Replica { code, .. } => Some(ErrorCode::parse(code)),
            ClientError::OutcomeUnknown { code, .. } => code.clone(),
            _ => None,
        }
    }
}

/// A client of one cluster. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    replicas: Arc<Replicas>,
}

impl Client {
    /// A client of the replicas at `endpoints` (`host:port`; see
    /// [`Endpoint`]). Connections are made lazily. If an endpoint is not
    /// valid, every call fails with [`ClientError::InvalidEndpoint`]
    /// naming it.
    pub fn new<I, S>(endpoints: I) -> Client
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_config(endpoints, ClientConfig::default())
    }

    pub fn with_config<I, S>(endpoints: I, config: ClientConfig) -> Client
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client {
            replicas: Arc::new(Replicas::new(endpoints, config)),
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[Endpoint] {
        self.replicas.endpoints()
    }

    /// A client of the same replicas' scheduler-state API, sharing this
    /// client's connections and its knowledge of the leader.
    pub fn state(&self) -> StateClient {
        StateClient::over(self.replicas.clone())
    }

    /// Runs a call of `kind` on the leader (see the crate's retry rules).
    async fn on_leader<T, F, Fut>(&self, kind: CallKind, call: F) -> Result<T, ClientError>
    where
        F: Fn(
            replog_proto::client::replog_client_client::ReplogClientClient<
                tonic::transport::Channel,
            >,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let timeout = Some(self.replicas.config.request_timeout);
        self.replicas
            .call(Target::Leader, kind, timeout, |channel| {
                call(log_stub(channel))
            })
            .await
    }

    /// Appends `data`; returns its position (and the leader's term) once it
    /// is committed and durable on a quorum.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<AppendResponse, ClientError> {
        let data = data.into();
        self.on_leader(CallKind::LogWrite, |mut c| {
            let data = data.clone();
            async move {
                c.append(AppendRequest { data })
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Removes every position before `to` on every replica.
    pub async fn truncate(&self, to: u64) -> Result<u64, ClientError> {
        self.on_leader(CallKind::LogWrite, |mut c| async move {
            c.truncate(TruncateRequest { to })
                .await
                .map(|r| r.into_inner().position)
        })
        .await
    }

    /// Reads application entries `from..=to`. Linearizable reads see every
    /// write acknowledged before the call; others read some replica's
    /// committed view.
    pub async fn read(
        &self,
        from: u64,
        to: u64,
        linearizable: bool,
    ) -> Result<ReadResponse, ClientError> {
        self.on_leader(CallKind::Read, |mut c| async move {
            c.read(ReadRequest {
                from,
                to,
                linearizable,
            })
            .await
            .map(|r| r.into_inner())
        })
        .await
    }

    /// Applies membership changes (more than one: one joint change).
    pub async fn change_membership(
        &self,
        changes: Vec<MembershipChange>,
    ) -> Result<u64, ClientError> {
        self.on_leader(CallKind::LogWrite, |mut c| {
            let changes = changes.clone();
            async move {
                c.change_membership(ChangeMembershipRequest { changes })
                    .await
                    .map(|r| r.into_inner().position)
            }
        })
        .await
    }

    /// Asks the leader to hand leadership to `to` (asking again is
    /// harmless).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ClientError> {
        self.on_leader(CallKind::Read, |mut c| async move {
            c.transfer_leader(TransferLeaderRequest { to })
                .await
                .map(|_| ())
        })
        .await
    }

    /// The status of the replica at `endpoint`.
    pub async fn status_of(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        self.replicas.status_of(endpoint).await
    }

    /// The status of every configured replica, in order.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, ClientError>)> {
        self.replicas.status_all().await
    }

    /// Finds the leader's endpoint (asking every replica in turn).
    pub async fn leader(&self) -> Result<String, ClientError> {
        self.replicas.leader().await.map(|e| e.to_string())
    }

    /// Watches leadership as the replica at `endpoint` sees it.
    pub async fn watch_leadership(
        &self,
        endpoint: &str,
    ) -> Result<tonic::Streaming<Leadership>, ClientError> {
        let endpoint =
            Endpoint::parse(endpoint).map_err(|e| ClientError::InvalidEndpoint(e.to_string()))?;
        let open = |channel| async move {
            log_stub(channel)
                .watch_leadership(WatchLeadershipRequest {})
                .await
                .map(|r| r.into_inner())
        };
        let timeout = Some(self.replicas.config.request_timeout);
        self.replicas
            .attempt(&endpoint, timeout, &open)
            .await?
            .map_err(|s| answer(endpoint.as_str(), &s))
    }
}

#[cfg(test)]
mod tests;
