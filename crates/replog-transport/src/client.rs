//! The send side: one task per peer that owns the peer's queue, connects,
//! streams the queue into a `ReplicaTransport/Stream` call and reconnects
//! with exponential backoff.
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replog_proto::replica::replica_transport_client::ReplicaTransportClient;
use replog_proto::replica::{Envelope, StreamSummary};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::{debug, error, info, warn};

use crate::stats::PeerState;
use crate::{HEADER_CLUSTER_ID, HEADER_FROM, HEADER_TO};

/// A stream that stays open this long without being refused counts as
/// established: `connected` turns true, the backoff resets and the
/// "connected" line is logged. A refusal arrives within one round trip.
const SETTLE: Duration = Duration::from_millis(500);
/// Envelopes between the peer queue and the gRPC stream (lost if the
/// stream fails).
const STREAM_BUFFER: usize = 64;
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything a peer task needs; it deliberately holds no reference to the
/// transport, so dropping the transport (or removing the peer) ends it.
pub(crate) struct PeerTask {
    pub(crate) id: u64,
    pub(crate) cluster_id: String,
    pub(crate) replica_id: u64,
    pub(crate) max_message_bytes: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) state: Arc<PeerState>,
    /// The peer's address; the sender is dropped when the peer is removed.
    pub(crate) addr: watch::Receiver<String>,
    pub(crate) queue: mpsc::Receiver<Envelope>,
    /// Becomes true when the transport is closed.
    pub(crate) closed: watch::Receiver<bool>,
}

/// How one connection attempt ended.
enum Attempt {
    /// The peer was removed or the transport closed.
    Stop,
    /// The peer's address changed: connect to the new one at once.
    AddrChanged,
    Failed {
        error: String,
        /// The peer refused us (wrong cluster or id): retry slowly.
        refused: bool,
        /// The stream had been established before it failed.
        established: bool,
    },
}

impl PeerTask {
    pub(crate) async fn run(mut self) {
        let mut backoff = self.backoff_min;
        // The error last logged; None while healthy. Errors are logged when
        // they change, not on every retry.
        let mut logged: Option<String> = None;
        // An envelope taken from the queue but not yet in a stream; it
        // survives reconnections.
        let mut pending: Option<Envelope> = None;
        let mut first = true;
        loop {
            if !first {
                let delay = jitter(backoff);
                tokio::select! {
                    biased;
                    _ = wait_closed(&mut self.closed) => break,
                    changed = self.addr.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        backoff = self.backoff_min;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                self.state.on_reconnect();
            }
            first = false;
            let addr = self.addr.borrow_and_update().clone();
            match self.attempt(&addr, &mut pending, &mut logged).await {
                Attempt::Stop => break,
                Attempt::AddrChanged => {
                    info!(
                        peer = self.id,
                        "address of peer {} changed; reconnecting", self.id
                    );
                    backoff = self.backoff_min;
                    first = true;
                }
                Attempt::Failed {
                    error: msg,
                    refused,
                    established,
                } => {
                    let changed = logged.as_deref() != Some(msg.as_str());
                    if changed {
                        if refused {
                            error!(peer = self.id, %addr, "peer {} at {addr} refused this replica: {msg}; retrying every {:?}", self.id, self.backoff_max);
                        } else {
                            warn!(peer = self.id, %addr, "peer {} at {addr}: {msg}; reconnecting with backoff", self.id);
                        }
                        logged = Some(msg.clone());
                    } else {
                        debug!(peer = self.id, %addr, "peer {}: {msg}", self.id);
                    }
                    self.state.set_error(Some(msg));
                    backoff = if refused {
                        self.backoff_max
                    } else if established {
                        self.backoff_min
                    } else {
                        (backoff * 2).min(self.backoff_max)
                    };
                }
            }
        }
        self.state.set_connected(false);
        debug!(peer = self.id, "send task of peer {} stopped", self.id);
    }

    /// Connects once and streams the queue until the stream fails.
    async fn attempt(
        &mut self,
        addr: &str,
        pending: &mut Option<Envelope>,
        logged: &mut Option<String>,
    ) -> Attempt {
        let channel = match self.connect(addr).await {
            Ok(channel) => channel,
            Err(ended) => return ended,
        };
        let mut client = ReplicaTransportClient::new(channel)
            .max_encoding_message_size(self.max_message_bytes)
            .max_decoding_message_size(self.max_message_bytes);
        // Envelopes wait in the peer queue, not here, so that few are lost
        // when the stream fails; but a burst is moved here at once, so that
        // tonic encodes it into one DATA frame (h2 receivers limit how many
        // small frames they buffer: see `server_builder`).
        let (tx, rx) = mpsc::channel::<Envelope>(STREAM_BUFFER);
        let call = client.stream(self.stream_request(rx));
        self.stream_until_ended(call, &tx, addr, pending, logged)
            .await
    }

    /// Opens a channel to `addr` within the connect timeout; `Err` is how
    /// the attempt ended instead (failed, stopped, or the address changed).
    async fn connect(&mut self, addr: &str) -> Result<Channel, Attempt> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| failed(format!("invalid address '{addr}': {}", chain(&e))))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connect = tokio::time::timeout(self.connect_timeout, endpoint.connect());
        tokio::select! {
            biased;
            _ = wait_closed(&mut self.closed) => Err(Attempt::Stop),
            changed = self.addr.changed() => {
                Err(if changed.is_err() { Attempt::Stop } else { Attempt::AddrChanged })
            }
            r = connect => match r {
                Ok(Ok(channel)) => Ok(channel),
                Ok(Err(e)) => Err(failed(format!("cannot connect: {}", chain(&e)))),
                Err(_) => Err(failed(format!(
                    "cannot connect: timed out after {:?}",
                    self.connect_timeout
                ))),
            },
        }
    }

    /// The `Stream` call's request: the envelopes of `rx`, with the
    /// identity headers.
    fn stream_request(
        &self,
        rx: mpsc::Receiver<Envelope>,
    ) -> tonic::Request<ReceiverStream<Envelope>> {
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let md = request.metadata_mut();
        let cluster_id = MetadataValue::try_from(self.cluster_id.as_str())
            .expect("Transport::with_runtime refuses a cluster id that is no header value");
        md.insert(HEADER_CLUSTER_ID, cluster_id);
        md.insert(HEADER_FROM, MetadataValue::from(self.replica_id));
        md.insert(HEADER_TO, MetadataValue::from(self.id));
        request
    }

    /// Feeds the queue into the open `call` (through `tx`) until it ends,
    /// the peer is removed, its address changes or the transport closes.
    async fn stream_until_ended(
        &mut self,
        call: impl Future<Output = Result<tonic::Response<StreamSummary>, tonic::Status>>,
        tx: &mpsc::Sender<Envelope>,
        addr: &str,
        pending: &mut Option<Envelope>,
        logged: &mut Option<String>,
    ) -> Attempt {
        tokio::pin!(call);
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        let mut established = false;
        let mut request_closed = false;
        let opened = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = wait_closed(&mut self.closed) => return Attempt::Stop,
                changed = self.addr.changed() => {
                    self.state.set_connected(false);
                    return if changed.is_err() { Attempt::Stop } else { Attempt::AddrChanged };
                }
                result = &mut call => {
                    self.state.set_connected(false);
                    return self.call_ended(result, established, opened);
                }
                _ = &mut settle, if !established => {
                    established = true;
                    self.on_established(addr, logged);
                }
                permit = tx.reserve(), if pending.is_some() && !request_closed => match permit {
                    Ok(permit) => self.send_burst(permit, tx, pending),
                    // The call dropped its request stream: it is ending;
                    // its result comes next.
                    Err(_) => request_closed = true,
                },
                env = self.queue.recv(), if pending.is_none() => match env {
                    Some(env) => *pending = Some(env),
                    None => return Attempt::Stop,
                },
            }
        }
    }

    /// How the attempt ended when its call returned `result`.
    fn call_ended(
        &self,
        result: Result<tonic::Response<StreamSummary>, tonic::Status>,
        established: bool,
        opened: Instant,
    ) -> Attempt {
        let status = match result {
            Ok(summary) => {
                debug!(
                    peer = self.id,
                    accepted = summary.get_ref().accepted,
                    "stream to peer {} ended after {:?}",
                    self.id,
                    opened.elapsed()
                );
                return Attempt::Failed {
                    error: "the peer ended the stream".into(),
                    refused: false,
                    established,
                };
            }
            Err(status) => status,
        };
        let refused = matches!(
            status.code(),
            Code::PermissionDenied | Code::InvalidArgument
        );
        if refused {
            self.state.on_refused();
        }
        let error = if refused {
            format!("refused ({:?}): {}", status.code(), status.message())
        } else {
            format!("stream failed ({:?}): {}", status.code(), status.message())
        };
        Attempt::Failed {
            error,
            refused,
            established,
        }
    }

    /// The stream stayed open for [`SETTLE`]: the peer is connected.
    fn on_established(&self, addr: &str, logged: &mut Option<String>) {
        self.state.set_connected(true);
        self.state.set_error(None);
        if let Some(previous) = logged.take() {
            info!(peer = self.id, %addr, "connected to peer {} at {addr} (previous error: {previous})", self.id);
        } else {
            info!(peer = self.id, %addr, "connected to peer {} at {addr}", self.id);
        }
    }

    /// Sends the envelope in hand with `permit`, then moves the rest of a
    /// burst from the queue into the stream without waiting.
    fn send_burst(
        &mut self,
        permit: mpsc::Permit<'_, Envelope>,
        tx: &mpsc::Sender<Envelope>,
        pending: &mut Option<Envelope>,
    ) {
        if let Some(env) = pending.take() {
            permit.send(env);
            self.state.on_sent();
        }
        while let Ok(permit) = tx.try_reserve() {
            match self.queue.try_recv() {
                Ok(env) => {
                    permit.send(env);
                    self.state.on_sent();
                }
                Err(_) => break,
            }
        }
    }
}

/// An attempt that failed before any stream was established.
fn failed(error: String) -> Attempt {
    Attempt::Failed {
        error,
        refused: false,
        established: false,
    }
}

async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    // An error means the transport is gone: closed as well.
    let _ = closed.wait_for(|c| *c).await;
}

/// `d` shortened by up to a fifth, so that peers retrying together spread.
fn jitter(d: Duration) -> Duration {
    let r = RandomState::new().hash_one(Instant::now());
    let fifth = d.as_nanos() as u64 / 5;
    if fifth == 0 {
        return d;
    }
    d.saturating_sub(Duration::from_nanos(r % fifth))
}

/// An error with its sources, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
