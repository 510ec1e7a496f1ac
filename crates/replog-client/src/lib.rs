//! Rust client of a replog cluster.
//!
//! Give it the replica servers' addresses; it finds the leader (and follows
//! `replog-leader` hints when a follower refuses a write), retries what is
//! safe to retry, and never retries what may have happened:
//!
//! - a write refused with NOT_LEADER was not executed: it is retried on the
//!   leader;
//! - a write whose outcome is unknown (leadership lost, the connection broke
//!   after the request was sent) fails with [`ClientError::OutcomeUnknown`]:
//!   the caller decides (re-read, or write again if duplicates are fine);
//! - reads, status and watches are retried on any replica; so is a
//!   linearizable read a replica refused as READ_NOT_CONFIRMED (no leader
//!   confirmed it within the replica's read timeout: nothing happened).
//!
//! ```no_run
//! # async fn demo() -> Result<(), replog_client::ClientError> {
//! let client = replog_client::Client::new(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]);
//! let written = client.append(&b"hello"[..]).await?;
//! let read = client.read(written.position, written.position, true).await?;
//! # let _ = read; Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replog_proto::client::replog_client_client::ReplogClientClient;
pub use replog_proto::client::{
    AppendRequest, AppendResponse, ChangeMembershipRequest, Entry, Leadership, MemberStatus,
    MembershipChange, MembershipOp, ReadRequest, ReadResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TruncateRequest, WatchLeadershipRequest,
};
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::debug;

/// Largest response accepted (reads of many entries).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Attempts per call before giving up (leader changes, unreachable
    /// replicas).
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_attempts: 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The replica answered with an error; `code` is its stable
    /// `replog-error` code (NOT_LEADER, TRUNCATED, PENDING, ...).
    #[error("{endpoint}: {code}: {message}")]
    Replica {
        endpoint: String,
        code: String,
        status: Code,
        message: String,
    },
    /// The write may or may not have happened.
    #[error("{endpoint}: the outcome of the write is unknown: {message}")]
    OutcomeUnknown { endpoint: String, message: String },
    /// No replica could be reached, or none led, within the attempts.
    #[error("no leader found after {attempts} attempts (last error: {last})")]
    NoLeader { attempts: u32, last: String },
    /// A replica could not be reached.
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("invalid endpoint '{0}'")]
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
}

/// A client of one cluster. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, ReplogClientClient<Channel>>>,
    /// The endpoint believed to lead.
    leader: Mutex<Option<String>>,
    /// Round-robin position over `endpoints` while no leader is known.
    rotation: std::sync::atomic::AtomicUsize,
}

fn normalize(endpoint: &str) -> String {
    endpoint
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// The replog error code and leader hint of a status.
fn classify(status: &Status) -> (Option<String>, Option<(u64, String)>) {
    let code = status
        .metadata()
        .get("replog-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let hint = status
        .metadata()
        .get("replog-leader")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split_once('='))
        .and_then(|(id, addr)| Some((id.parse().ok()?, addr.to_string())))
        .filter(|(_, a): &(u64, String)| !a.is_empty());
    (code, hint)
}

impl Client {
    /// A client of the replicas at `endpoints` (`host:port`). Connections
    /// are made lazily.
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
        let endpoints = endpoints
            .into_iter()
            .map(|e| normalize(e.as_ref()))
            .filter(|e| !e.is_empty())
            .collect();
        Client {
            inner: Arc::new(Inner {
                config,
                endpoints,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                rotation: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    async fn rpc(&self, endpoint: &str) -> Result<ReplogClientClient<Channel>, ClientError> {
        let mut channels = self.inner.channels.lock().await;
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let uri = format!("http://{endpoint}");
        let ep = Endpoint::from_shared(uri)
            .map_err(|_| ClientError::InvalidEndpoint(endpoint.to_string()))?
            .connect_timeout(self.inner.config.connect_timeout)
            .timeout(self.inner.config.request_timeout)
            .tcp_nodelay(true);
        let channel = ep.connect_lazy();
        let c = ReplogClientClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        channels.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }

    fn error(endpoint: &str, status: &Status) -> ClientError {
        let (code, _) = classify(status);
        ClientError::Replica {
            endpoint: endpoint.to_string(),
            code: code.unwrap_or_else(|| format!("{:?}", status.code()).to_uppercase()),
            status: status.code(),
            message: status.message().to_string(),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let c = &self.inner.config;
        let d = c.backoff_min.saturating_mul(1 << attempt.min(10));
        d.min(c.backoff_max)
    }

    /// Candidate endpoints: the believed leader first, then the others in
    /// turn.
    async fn candidate(&self) -> String {
        if let Some(l) = self.inner.leader.lock().await.clone() {
            return l;
        }
        // No leader known: go round the endpoints (a shared counter, so
        // that every attempt tries the next one whatever the call).
        let n = self.inner.endpoints.len().max(1);
        let i = self
            .inner
            .rotation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.endpoints[i % n].clone()
    }

    /// Runs a leader-only call, following leader hints. `may_have_happened`
    /// tells whether a transport failure leaves the outcome unknown.
    async fn on_leader<T, F, Fut>(&self, may_have_happened: bool, call: F) -> Result<T, ClientError>
    where
        F: Fn(ReplogClientClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        if self.inner.endpoints.is_empty() {
            return Err(ClientError::InvalidEndpoint("no endpoints given".into()));
        }
        let mut last = String::from("none");
        let mut hinted: Option<String> = None;
        for attempt in 0..self.inner.config.max_attempts {
            let endpoint = match hinted.take() {
                Some(h) => h,
                None => self.candidate().await,
            };
            let rpc = self.rpc(&endpoint).await?;
            match call(rpc).await {
                Ok(v) => {
                    *self.inner.leader.lock().await = Some(endpoint);
                    return Ok(v);
                }
                Err(status) => {
                    let (code, hint) = classify(&status);
                    match code.as_deref() {
                        Some("NOT_LEADER") => {
                            *self.inner.leader.lock().await = None;
                            if let Some((_, addr)) = hint {
                                debug!(%endpoint, leader = %addr, "following the leader hint");
                                hinted = Some(normalize(&addr));
                            } else {
                                tokio::time::sleep(self.backoff(attempt)).await;
                            }
                            last = format!("{endpoint}: {}", status.message());
                        }
                        // A write that reached a leader which then lost its
                        // leadership or stopped may be committed or not.
                        Some("LEADERSHIP_LOST") | Some("CLOSED") if may_have_happened => {
                            *self.inner.leader.lock().await = None;
                            return Err(ClientError::OutcomeUnknown {
                                endpoint,
                                message: status.message().to_string(),
                            });
                        }
                        // Not executed: retry elsewhere or later.
                        Some("BUSY")
                        | Some("NOT_VOTING")
                        | Some("CLOSED")
                        | Some("TIMEOUT")
                        | Some("READ_NOT_CONFIRMED") => {
                            *self.inner.leader.lock().await = None;
                            last = format!("{endpoint}: {}", status.message());
                            tokio::time::sleep(self.backoff(attempt)).await;
                        }
                        Some(_) => return Err(Self::error(&endpoint, &status)),
                        None => {
                            // A transport failure: unreachable replica, or a
                            // broken connection.
                            *self.inner.leader.lock().await = None;
                            let never_sent = status.code() == Code::Unavailable
                                && status.message().contains("connect");
                            if may_have_happened && !never_sent {
                                return Err(ClientError::OutcomeUnknown {
                                    endpoint,
                                    message: status.to_string(),
                                });
                            }
                            last = format!("{endpoint}: {status}");
                            tokio::time::sleep(self.backoff(attempt)).await;
                        }
                    }
                }
            }
        }
        Err(ClientError::NoLeader {
            attempts: self.inner.config.max_attempts,
            last,
        })
    }

    /// Appends `data`; returns its position (and the leader's term) once it
    /// is committed and durable on a quorum.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<AppendResponse, ClientError> {
        let data = data.into();
        self.on_leader(true, |mut c| {
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
        self.on_leader(true, |mut c| async move {
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
        self.on_leader(false, |mut c| async move {
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
        self.on_leader(true, |mut c| {
            let changes = changes.clone();
            async move {
                c.change_membership(ChangeMembershipRequest { changes })
                    .await
                    .map(|r| r.into_inner().position)
            }
        })
        .await
    }

    /// Asks the leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ClientError> {
        self.on_leader(false, |mut c| async move {
            c.transfer_leader(TransferLeaderRequest { to })
                .await
                .map(|_| ())
        })
        .await
    }

    /// The status of the replica at `endpoint`.
    pub async fn status_of(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let endpoint = normalize(endpoint);
        let mut c = self.rpc(&endpoint).await?;
        c.status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| match classify(&s).0 {
                Some(_) => Self::error(&endpoint, &s),
                None => ClientError::Unreachable {
                    endpoint: endpoint.clone(),
                    message: s.message().to_string(),
                },
            })
    }

    /// The status of every configured replica, in order.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, ClientError>)> {
        let mut out = Vec::new();
        for e in self.inner.endpoints.clone() {
            let r = self.status_of(&e).await;
            out.push((e, r));
        }
        out
    }

    /// Finds the leader's endpoint (asking every replica in turn).
    pub async fn leader(&self) -> Result<String, ClientError> {
        let mut last = String::from("no replica answered");
        for attempt in 0..self.inner.config.max_attempts {
            for (e, r) in self.status_all().await {
                match r {
                    Ok(s) if s.is_leader => {
                        *self.inner.leader.lock().await = Some(e.clone());
                        return Ok(e);
                    }
                    Ok(s) if !s.leader_address.is_empty() => {
                        last = format!("{e} points at {}", s.leader_address)
                    }
                    Ok(_) => last = format!("{e} knows no leader"),
                    Err(err) => last = err.to_string(),
                }
            }
            tokio::time::sleep(self.backoff(attempt)).await;
        }
        Err(ClientError::NoLeader {
            attempts: self.inner.config.max_attempts,
            last,
        })
    }

    /// Watches leadership as the replica at `endpoint` sees it.
    pub async fn watch_leadership(
        &self,
        endpoint: &str,
    ) -> Result<tonic::Streaming<Leadership>, ClientError> {
        let endpoint = normalize(endpoint);
        let mut c = self.rpc(&endpoint).await?;
        c.watch_leadership(WatchLeadershipRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Self::error(&endpoint, &s))
    }
}
