//! The receive side: the `ReplicaTransport` service.
use std::sync::Arc;

use replog_proto::replica::replica_transport_server::ReplicaTransport;
use replog_proto::replica::{Envelope, StreamSummary};
use replog_proto::Message;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::metrics::{DropReason, RefusalReason};
use crate::{Shared, HEADER_CLUSTER_ID, HEADER_FROM, HEADER_TO};

/// The `ReplicaTransport` gRPC service of a [`Transport`](crate::Transport):
/// add [`Transport::service`](crate::Transport::service) to a tonic server.
/// Every stream it accepts ends when the transport is closed (and, for
/// [`Transport::serve`](crate::Transport::serve), when its handle stops).
#[derive(Clone)]
pub struct TransportService {
    pub(crate) shared: Arc<Shared>,
    /// Set by `serve`: the serve handle's stop signal.
    pub(crate) stop: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for TransportService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportService")
            .field("cluster_id", &self.shared.cluster_id)
            .field("replica_id", &self.shared.replica_id)
            .finish_non_exhaustive()
    }
}

/// The identity a stream claims in its headers.
struct Caller {
    cluster_id: String,
    from: u64,
    to: u64,
}

fn parse_headers(md: &MetadataMap) -> Result<Caller, String> {
    let text = |name: &str| -> Result<&str, String> {
        md.get(name)
            .ok_or_else(|| format!("header {name} is missing"))?
            .to_str()
            .map_err(|_| format!("header {name} is not visible ASCII"))
    };
    let number = |name: &str| -> Result<u64, String> {
        let t = text(name)?;
        t.parse()
            .map_err(|_| format!("header {name} is not a replica id: '{}'", t.escape_debug()))
    };
    Ok(Caller {
        cluster_id: text(HEADER_CLUSTER_ID)?.to_owned(),
        from: number(HEADER_FROM)?,
        to: number(HEADER_TO)?,
    })
}

impl TransportService {
    /// Checks the call's identity headers; a refusal is logged and counted.
    fn check(&self, md: &MetadataMap, remote: &str) -> Result<Caller, Status> {
        let s = &self.shared;
        let refuse = |reason: RefusalReason, status: Status| {
            warn!(
                remote,
                reason = reason.label(),
                "refused a peer stream: {}",
                status.message()
            );
            s.metrics.refused.with_label_values(&[reason.label()]).inc();
            Err(status)
        };
        let caller = match parse_headers(md) {
            Ok(c) => c,
            Err(msg) => {
                return refuse(
                    RefusalReason::Headers,
                    Status::invalid_argument(format!(
                        "{msg}; this is replica {} of cluster '{}' (replog peer streams carry {HEADER_CLUSTER_ID}, {HEADER_FROM} and {HEADER_TO}); refusing",
                        s.replica_id, s.cluster_id
                    )),
                )
            }
        };
        if caller.cluster_id != s.cluster_id {
            return refuse(
                RefusalReason::ClusterId,
                Status::permission_denied(format!(
                    "replica {} belongs to cluster '{}', this is replica {} of cluster '{}'; refusing",
                    caller.from,
                    caller.cluster_id.escape_debug(),
                    s.replica_id,
                    s.cluster_id
                )),
            );
        }
        if caller.to != s.replica_id {
            return refuse(
                RefusalReason::ReplicaId,
                Status::permission_denied(format!(
                    "replica {} of cluster '{}' addressed replica {}, but this is replica {}; refusing (check its peer addresses)",
                    caller.from, s.cluster_id, caller.to, s.replica_id
                )),
            );
        }
        Ok(caller)
    }

    async fn stopped(&self) {
        let mut closed = self.shared.closed.subscribe();
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = closed.wait_for(|c| *c) => {}
            _ = async {
                match stop.as_mut() {
                    // An error means the serve handle is gone: stop as well.
                    Some(stop) => { let _ = stop.wait_for(|s| *s).await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}

#[tonic::async_trait]
impl ReplicaTransport for TransportService {
    async fn stream(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<StreamSummary>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown address".into());
        // Identity first: nothing is read from a stream that is refused.
        let caller = self.check(request.metadata(), &remote)?;
        let s = &self.shared;
        let peer = s.peer_state(caller.from);
        debug!(peer = caller.from, %remote, "accepted a stream from replica {}", caller.from);
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        // Drop reasons already logged on this stream (one line per reason).
        let mut logged = 0u8;
        let stopped = self.stopped();
        tokio::pin!(stopped);
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut stopped => break,
                next = stream.message() => next,
            };
            let env = match next {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(status) => {
                    if status.code() == Code::OutOfRange {
                        // tonic's decoder refuses a frame over the limit; the
                        // stream cannot continue past it.
                        peer.on_dropped(DropReason::TooLarge);
                        warn!(peer = caller.from, "replica {} sent an envelope over the limit of {} bytes; ending its stream: {}", caller.from, s.max_message_bytes, status.message());
                    } else {
                        debug!(
                            peer = caller.from,
                            "stream from replica {} failed: {status}", caller.from
                        );
                    }
                    return Err(status);
                }
            };
            let verdict = if env.cluster_id != s.cluster_id
                || env.from != caller.from
                || env.to != s.replica_id
            {
                Err(DropReason::HeaderMismatch)
            } else if env.body.is_none() {
                Err(DropReason::NoBody)
            } else if env.encoded_len() > s.max_message_bytes {
                Err(DropReason::TooLarge)
            } else {
                match s.inbound.try_send(env) {
                    Ok(()) => Ok(()),
                    Err(crossbeam_channel::TrySendError::Full(_)) => Err(DropReason::InboundFull),
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                        Err(DropReason::InboundClosed)
                    }
                }
            };
            match verdict {
                Ok(()) => {
                    accepted += 1;
                    peer.on_received();
                }
                Err(reason) => {
                    peer.on_dropped(reason);
                    if logged & reason.bit() == 0 {
                        logged |= reason.bit();
                        warn!(
                            peer = caller.from,
                            reason = reason.label(),
                            "dropping envelopes from replica {}: {} (logged once per stream)",
                            caller.from,
                            reason.label()
                        );
                    }
                }
            }
        }
        debug!(
            peer = caller.from,
            accepted, "stream from replica {} ended", caller.from
        );
        Ok(Response::new(StreamSummary { accepted }))
    }
}
