//! The replicas of one cluster as a client sees them, and the one loop that
//! runs a call on them: [`Replicas::call`], used by the log client and the
//! state client alike.
//!
//! Invariants of the loop:
//!
//! - what a failure allows is [`wire::retry_rule`]'s answer, nothing else;
//! - a call that may have happened is never sent again: it fails with
//!   [`ClientError::OutcomeUnknown`];
//! - a NOT_LEADER refusal is followed to the replica its hint names at
//!   once, unless the hint names the replica just asked (a leader whose
//!   writer is not ready yet names itself): then, and without a hint, the
//!   loop backs off first;
//! - the believed leader is the last replica that answered a call; any
//!   failure but a final answer forgets it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replog_proto::client::replog_client_client::ReplogClientClient;
use replog_proto::client::{StatusRequest, StatusResponse};
use replog_proto::wire::{self, CallKind, Retry};
use tonic::transport::Channel;
use tonic::Status;
use tracing::debug;

use crate::{ClientConfig, ClientError, Endpoint, MAX_MESSAGE_BYTES};

/// Where a call goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// The leader: the believed one, hinted ones, or every replica in turn.
    Leader,
    /// This replica only (hints are not followed).
    Replica(&'a Endpoint),
}

/// Endpoints, connections and who leads, shared by the clients of one
/// cluster.
pub(crate) struct Replicas {
    pub(crate) config: ClientConfig,
    endpoints: Vec<Endpoint>,
    /// The first configured endpoint that did not parse: every call fails
    /// with it.
    invalid: Option<String>,
    /// One lazily connected channel per replica.
    channels: Mutex<HashMap<Endpoint, Channel>>,
    /// The replica believed to lead.
    leader: Mutex<Option<Endpoint>>,
    /// Round-robin position over `endpoints` while no leader is known.
    rotation: AtomicUsize,
}

impl Replicas {
    /// The replicas at `endpoints` (empty strings are skipped).
    pub(crate) fn new<I, S>(endpoints: I, config: ClientConfig) -> Replicas
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        let mut invalid = None;
        for given in endpoints {
            let given = given.as_ref();
            if given.trim().is_empty() {
                continue;
            }
            match Endpoint::parse(given) {
                Ok(e) => parsed.push(e),
                Err(e) => {
                    invalid.get_or_insert(e.to_string());
                }
            }
        }
        Replicas {
            config,
            endpoints: parsed,
            invalid,
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            rotation: AtomicUsize::new(0),
        }
    }

    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The endpoints, if every one given was valid and there is one.
    fn usable(&self) -> Result<&[Endpoint], ClientError> {
        if let Some(e) = &self.invalid {
            return Err(ClientError::InvalidEndpoint(e.clone()));
        }
        if self.endpoints.is_empty() {
            return Err(ClientError::InvalidEndpoint("no endpoints given".into()));
        }
        Ok(&self.endpoints)
    }

    /// The channel to `endpoint`, connected on first use.
    pub(crate) fn channel(&self, endpoint: &Endpoint) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(endpoint.uri())
            .map_err(|e| ClientError::InvalidEndpoint(format!("{endpoint}: {e}")))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(endpoint.clone(), channel.clone());
        Ok(channel)
    }

    fn believed_leader(&self) -> Option<Endpoint> {
        self.leader.lock().expect("leader poisoned").clone()
    }

    pub(crate) fn set_leader(&self, leader: Option<Endpoint>) {
        *self.leader.lock().expect("leader poisoned") = leader;
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let c = &self.config;
        let d = c.backoff_min.saturating_mul(1 << attempt.min(10));
        d.min(c.backoff_max)
    }

    /// The next replica to ask for the leader: the believed leader, or the
    /// next in turn (a shared counter, so that every attempt tries the next
    /// one whatever the call).
    fn candidate(&self, endpoints: &[Endpoint]) -> Endpoint {
        if let Some(l) = self.believed_leader() {
            return l;
        }
        let i = self.rotation.fetch_add(1, Ordering::Relaxed);
        endpoints[i % endpoints.len()].clone()
    }

    /// One attempt of `call` on `endpoint`, within `timeout` if given (no
    /// answer in time is tonic's own timeout status: the request may have
    /// been sent).
    pub(crate) async fn attempt<T, F, Fut>(
        &self,
        endpoint: &Endpoint,
        timeout: Option<Duration>,
        call: &F,
    ) -> Result<Result<T, Status>, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let running = call(self.channel(endpoint)?);
        Ok(match timeout {
            None => running.await,
            Some(t) => tokio::time::timeout(t, running)
                .await
                .unwrap_or_else(|_| Err(Status::cancelled("Timeout expired"))),
        })
    }

    /// Runs `call` on `target` until it succeeds or [`wire::retry_rule`]
    /// says stop, within the config's attempts and deadline.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        target: Target<'_>,
        kind: CallKind,
        timeout: Option<Duration>,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let endpoints = self.usable()?;
        let started = Instant::now();
        let mut last: Option<(Endpoint, Status)> = None;
        let mut hinted: Option<Endpoint> = None;
        let mut attempts = 0;
        while attempts < self.config.max_attempts && !self.past_deadline(started, attempts) {
            let endpoint = match target {
                Target::Replica(e) => e.clone(),
                Target::Leader => hinted.take().unwrap_or_else(|| self.candidate(endpoints)),
            };
            let attempt = attempts;
            attempts += 1;
            let status = match self.attempt(&endpoint, timeout, &call).await? {
                Ok(v) => {
                    if matches!(target, Target::Leader) {
                        self.set_leader(Some(endpoint));
                    }
                    return Ok(v);
                }
                Err(status) => status,
            };
            let rule = wire::retry_rule(&status, kind);
            if rule != Retry::Final {
                self.set_leader(None);
            }
            match (rule, target) {
                (Retry::Final | Retry::OutcomeUnknown, _)
                | (Retry::OnLeader, Target::Replica(_)) => {
                    return Err(failure(&endpoint, &status, rule));
                }
                (Retry::OnLeader, Target::Leader) => {
                    hinted = wire::leader_hint(&status)
                        .and_then(|h| Endpoint::parse(&h.address).ok())
                        .filter(|h| *h != endpoint);
                    match &hinted {
                        Some(h) => debug!(%endpoint, leader = %h, "following the leader hint"),
                        None => tokio::time::sleep(self.backoff(attempt)).await,
                    }
                }
                (Retry::Anywhere, _) => tokio::time::sleep(self.backoff(attempt)).await,
            }
            last = Some((endpoint, status));
        }
        Err(match (target, last) {
            (Target::Replica(_), Some((endpoint, status))) => {
                failure(&endpoint, &status, wire::retry_rule(&status, kind))
            }
            (_, last) => ClientError::NoLeader {
                attempts,
                last: last
                    .map(|(e, s)| describe(&e, &s))
                    .unwrap_or_else(|| "none".into()),
            },
        })
    }

    fn past_deadline(&self, started: Instant, attempts: u32) -> bool {
        attempts > 0
            && self
                .config
                .retry_deadline
                .is_some_and(|d| started.elapsed() >= d)
    }

    /// The status of the replica at `endpoint` (one attempt).
    pub(crate) async fn status_of(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let endpoint =
            Endpoint::parse(endpoint).map_err(|e| ClientError::InvalidEndpoint(e.to_string()))?;
        let ask = |channel| async move {
            log_stub(channel)
                .status(StatusRequest {})
                .await
                .map(|r| r.into_inner())
        };
        self.attempt(&endpoint, Some(self.config.request_timeout), &ask)
            .await?
            .map_err(|s| answer(endpoint.as_str(), &s))
    }

    /// The status of every configured replica, in order.
    pub(crate) async fn status_all(&self) -> Vec<(String, Result<StatusResponse, ClientError>)> {
        let mut out = Vec::new();
        for e in &self.endpoints {
            out.push((e.to_string(), self.status_of(e.as_str()).await));
        }
        out
    }

    /// Finds the leader (asking every replica in turn).
    pub(crate) async fn leader(&self) -> Result<Endpoint, ClientError> {
        self.usable()?;
        let mut last = String::from("no replica answered");
        for attempt in 0..self.config.max_attempts {
            for e in &self.endpoints {
                match self.status_of(e.as_str()).await {
                    Ok(s) if s.is_leader => {
                        self.set_leader(Some(e.clone()));
                        return Ok(e.clone());
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
            attempts: self.config.max_attempts,
            last,
        })
    }
}

/// The log API's stub on `channel`, with the client's size limits.
pub(crate) fn log_stub(channel: Channel) -> ReplogClientClient<Channel> {
    ReplogClientClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `endpoint: message` (or the whole status when it carries no replog
/// code).
fn describe(endpoint: &Endpoint, status: &Status) -> String {
    match wire::error_code(status) {
        Some(_) => format!("{endpoint}: {}", status.message()),
        None => format!("{endpoint}: {status}"),
    }
}

/// The error a failed call ends with: a write that may have happened is
/// [`ClientError::OutcomeUnknown`]; a replica's coded answer is
/// [`ClientError::Replica`]; anything else did not reach a replica's
/// service ([`ClientError::Unreachable`]).
pub(crate) fn failure(endpoint: &Endpoint, status: &Status, rule: Retry) -> ClientError {
    match rule {
        Retry::OutcomeUnknown => {
            let code = wire::error_code(status);
            ClientError::OutcomeUnknown {
                endpoint: endpoint.to_string(),
                message: match code {
                    Some(_) => status.message().to_string(),
                    None => status.to_string(),
                },
                code,
            }
        }
        _ => answer(endpoint.as_str(), status),
    }
}

/// A status as a replica's answer ([`ClientError::Replica`], with its
/// code) or, without a replog code, as a replica that was not reached.
pub(crate) fn answer(endpoint: &str, status: &Status) -> ClientError {
    match wire::error_code(status) {
        Some(code) => ClientError::Replica {
            endpoint: endpoint.to_string(),
            code: code.to_string(),
            status: status.code(),
            message: status.message().to_string(),
        },
        None => ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            message: status.message().to_string(),
        },
    }
}
