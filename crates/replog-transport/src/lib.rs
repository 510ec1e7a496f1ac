//! The peer transport of replog: [`Envelope`]s between the replicas of one
//! cluster over gRPC (tonic), one client-streaming `ReplicaTransport/Stream`
//! call per ordered pair of replicas
//! (`proto/replog/replica/v1/replica.proto`).
//!
//! [`Transport::send`] queues an envelope for its destination and returns at
//! once, from any thread. One task per peer (started on first use) connects,
//! streams the queue and reconnects with exponential backoff. Envelopes that
//! other replicas stream to this one arrive through
//! [`Transport::service`] (or [`Transport::serve`]) and are handed to the
//! inbound `crossbeam_channel`.
//!
//! # Invariants
//!
//! - **Bounded queues.** Each peer queue holds at most
//!   `peer_queue_capacity` envelopes (plus one in hand and at most one in
//!   the stream's channel); envelopes queued while a peer is unreachable
//!   stay queued up to that bound, and `send` beyond it drops the envelope,
//!   counts it and returns [`TransportError::QueueFull`]. The inbound
//!   channel is bounded by its creator; when it is full an accepted
//!   envelope is dropped and counted. Nothing here blocks on a slow peer.
//! - **Size limits.** No envelope larger than `max_message_bytes` (encoded)
//!   is queued ([`TransportError::MessageTooLarge`]), encoded by the client
//!   or decoded by the service (tonic's limits are set to the same value):
//!   the service drops it and counts it.
//! - **Identity on every connection.** Every stream carries the headers
//!   `replog-cluster-id`, `replog-from` and `replog-to`. The service checks
//!   them before reading anything: absent or malformed headers are refused
//!   with `INVALID_ARGUMENT`, another cluster id or a `replog-to` other than
//!   this replica with `PERMISSION_DENIED`; each refusal is logged (`warn`)
//!   and counted in `replog_transport_refused_connections_total{reason}`.
//!   Every envelope whose `cluster_id`, `from` or `to` disagree with the
//!   headers is dropped and counted. A client that is refused logs the
//!   peer's message (`error`) and retries at `backoff_max`.
//! - **Loss, not corruption or reordering.** Envelopes from one replica to
//!   another are delivered in the order they were sent, each at most once.
//!   Envelopes are lost when dropped as above, or when in flight on a
//!   stream that fails; Raft tolerates both.
//! - **No panics on network input**: malformed input ends the stream with a
//!   status or drops the envelope, counted.
//!
//! Logs are written per state change (connected, failing with a new error,
//! refused), not per retry.
//!
//! # Metrics
//!
//! Registered in the registry given to [`Transport::new`]:
//! `replog_transport_sent_messages_total{peer}`,
//! `replog_transport_received_messages_total{peer}`,
//! `replog_transport_dropped_messages_total{peer,reason}` (reasons
//! `queue_full`, `too_large`, `header_mismatch`, `no_body`, `inbound_full`,
//! `inbound_closed`), `replog_transport_refused_connections_total{reason}`
//! (`headers`, `cluster_id`, `replica_id`),
//! `replog_transport_refused_by_peer_total{peer}`,
//! `replog_transport_reconnects_total{peer}` and the gauge
//! `replog_transport_peer_connected{peer}`.
//!
//! # Serving next to other services
//!
//! ```no_run
//! # async fn example(transport: replog_transport::Transport) -> Result<(), Box<dyn std::error::Error>> {
//! replog_transport::server_builder() // or tonic's Server::builder()
//!     .add_service(transport.service())
//!     // .add_service(client_api_service)
//!     .serve("0.0.0.0:7000".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//! Streams accepted by [`Transport::service`] end when
//! [`Transport::close`] is called, so a graceful shutdown of that server
//! should close the transport first.

mod client;
mod config;
mod error;
mod metrics;
mod server;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use replog_proto::replica::replica_transport_server::ReplicaTransportServer;
use replog_proto::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Endpoint;
use tracing::debug;

pub use config::{TransportConfig, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PEER_QUEUE_CAPACITY};
pub use error::TransportError;
pub use replog_proto::replica::{envelope, Envelope, RecoverRequest, RecoverResponse};
pub use server::TransportService;
pub use stats::PeerStats;

use client::PeerTask;
use metrics::{DropReason, Metrics};
use stats::PeerState;

/// Header naming the sender's cluster.
pub const HEADER_CLUSTER_ID: &str = "replog-cluster-id";
/// Header naming the sending replica id.
pub const HEADER_FROM: &str = "replog-from";
/// Header naming the receiving replica id.
pub const HEADER_TO: &str = "replog-to";

/// The peer transport of one replica. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("cluster_id", &self.shared.cluster_id)
            .field("replica_id", &self.shared.replica_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) cluster_id: String,
    pub(crate) replica_id: u64,
    pub(crate) max_message_bytes: usize,
    peer_queue_capacity: usize,
    connect_timeout: std::time::Duration,
    backoff_min: std::time::Duration,
    backoff_max: std::time::Duration,
    runtime: tokio::runtime::Handle,
    pub(crate) inbound: crossbeam_channel::Sender<Envelope>,
    pub(crate) metrics: Metrics,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Counters by replica id, for both directions (inbound streams may come
    /// from replicas that are not, or not yet, configured peers).
    peer_states: Mutex<HashMap<u64, Arc<PeerState>>>,
    /// True once the transport is closed.
    pub(crate) closed: watch::Sender<bool>,
}

struct Peer {
    /// Dropping it (remove_peer, close, drop) stops the peer's task.
    addr: watch::Sender<String>,
    queue: mpsc::Sender<Envelope>,
    /// The queue's receiver until the peer's task is started.
    unstarted: Option<mpsc::Receiver<Envelope>>,
    state: Arc<PeerState>,
}

impl Shared {
    pub(crate) fn peer_state(&self, id: u64) -> Arc<PeerState> {
        self.peer_states
            .lock()
            .entry(id)
            .or_insert_with(|| PeerState::new(id, &self.metrics))
            .clone()
    }

    fn new_peer(&self, id: u64, addr: String) -> Peer {
        let (queue, rx) = mpsc::channel(self.peer_queue_capacity);
        Peer {
            addr: watch::Sender::new(addr),
            queue,
            unstarted: Some(rx),
            state: self.peer_state(id),
        }
    }
}

fn validate_addr(id: u64, addr: &str) -> Result<(), TransportError> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|_| ())
        .map_err(|e| {
            TransportError::Config(format!(
                "address of replica {id} is not host:port: '{addr}': {}",
                client::chain(&e)
            ))
        })
}

impl Transport {
    /// A transport on the current tokio runtime (see [`Transport::with_runtime`]).
    pub fn new(
        cfg: TransportConfig,
        inbound: crossbeam_channel::Sender<Envelope>,
        registry: &prometheus::Registry,
    ) -> Result<Self, TransportError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        Self::with_runtime(cfg, inbound, registry, runtime)
    }

    /// A transport whose tasks run on `runtime`. `inbound` receives every
    /// accepted envelope (it is bounded; when full, envelopes are dropped
    /// and counted). The metrics are registered in `registry`.
    pub fn with_runtime(
        cfg: TransportConfig,
        inbound: crossbeam_channel::Sender<Envelope>,
        registry: &prometheus::Registry,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TransportError> {
        let invalid = |m: String| Err(TransportError::Config(m));
        if cfg.cluster_id.is_empty() {
            return invalid("cluster_id is empty".into());
        }
        if !cfg.cluster_id.bytes().all(|b| b.is_ascii_graphic())
            || MetadataValue::try_from(cfg.cluster_id.as_str()).is_err()
        {
            return invalid(format!(
                "cluster_id '{}' must be visible ASCII without spaces (it is sent in a header)",
                cfg.cluster_id.escape_debug()
            ));
        }
        if cfg.replica_id == 0 {
            return invalid("replica_id must not be 0".into());
        }
        if cfg.max_message_bytes == 0 {
            return invalid("max_message_bytes must not be 0".into());
        }
        if cfg.peer_queue_capacity == 0 {
            return invalid("peer_queue_capacity must not be 0".into());
        }
        if cfg.connect_timeout.is_zero() {
            return invalid("connect_timeout must not be 0".into());
        }
        if cfg.backoff_min.is_zero() || cfg.backoff_min > cfg.backoff_max {
            return invalid(format!(
                "backoff must satisfy 0 < backoff_min ({:?}) <= backoff_max ({:?})",
                cfg.backoff_min, cfg.backoff_max
            ));
        }
        for (id, addr) in &cfg.peers {
            if *id == 0 {
                return invalid(format!("peer '{addr}' has replica id 0"));
            }
            validate_addr(*id, addr)?;
        }
        let metrics = Metrics::register(registry)?;
        let shared = Arc::new(Shared {
            cluster_id: cfg.cluster_id,
            replica_id: cfg.replica_id,
            max_message_bytes: cfg.max_message_bytes,
            peer_queue_capacity: cfg.peer_queue_capacity,
            connect_timeout: cfg.connect_timeout,
            backoff_min: cfg.backoff_min,
            backoff_max: cfg.backoff_max,
            runtime,
            inbound,
            metrics,
            peers: Mutex::new(HashMap::new()),
            peer_states: Mutex::new(HashMap::new()),
            closed: watch::Sender::new(false),
        });
        {
            let mut peers = shared.peers.lock();
            for (id, addr) in cfg.peers {
                let peer = shared.new_peer(id, addr);
                peers.insert(id, peer);
            }
        }
        Ok(Transport { shared })
    }

    /// This transport's cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.shared.cluster_id
    }

    /// This transport's replica id.
    pub fn replica_id(&self) -> u64 {
        self.shared.replica_id
    }

    /// The `ReplicaTransport` service, with the gRPC message size limits
    /// set to `max_message_bytes`, to add to a tonic server next to other
    /// services.
    pub fn service(&self) -> ReplicaTransportServer<TransportService> {
        self.service_with_stop(None)
    }

    fn service_with_stop(
        &self,
        stop: Option<watch::Receiver<bool>>,
    ) -> ReplicaTransportServer<TransportService> {
        let limit = self.shared.max_message_bytes;
        ReplicaTransportServer::new(TransportService {
            shared: self.shared.clone(),
            stop,
        })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
    }

    /// Serves [`Transport::service`] alone on `listen` (port 0 picks a free
    /// port). Returns the bound address and a handle: dropping it, or
    /// [`ServeHandle::shutdown`], stops accepting and ends every stream.
    pub async fn serve(
        &self,
        listen: SocketAddr,
    ) -> Result<(SocketAddr, ServeHandle), TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: listen,
            source,
        };
        let socket = if listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(bind_err)?;
        // A restarted replica must be able to bind its port again at once.
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.bind(listen).map_err(bind_err)?;
        let listener = socket.listen(1024).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = self.service_with_stop(Some(stop_rx.clone()));
        let mut stop_server = stop_rx;
        let server = server_builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_server.wait_for(|s| *s).await;
            });
        let task = self.shared.runtime.spawn(server);
        debug!(%local, replica = self.shared.replica_id, "serving the peer transport");
        Ok((
            local,
            ServeHandle {
                local_addr: local,
                stop: stop_tx,
                task: Some(task),
            },
        ))
    }

    /// Queues `env` for replica `env.to`; never blocks, callable from any
    /// thread. An empty `cluster_id` and a zero `from` are filled in with
    /// this transport's; other values must be this transport's.
    ///
    /// Errors: [`TransportError::UnknownPeer`],
    /// [`TransportError::MessageTooLarge`] (naming both sizes),
    /// [`TransportError::ForeignEnvelope`], [`TransportError::Closed`], and
    /// [`TransportError::QueueFull`] when the peer's queue is full: then the
    /// envelope was dropped and counted (`dropped`, reason `queue_full`).
    pub fn send(&self, mut env: Envelope) -> Result<(), TransportError> {
        let s = &self.shared;
        if *s.closed.borrow() {
            return Err(TransportError::Closed);
        }
        if env.cluster_id.is_empty() {
            env.cluster_id.clone_from(&s.cluster_id);
        }
        if env.from == 0 {
            env.from = s.replica_id;
        }
        if env.cluster_id != s.cluster_id || env.from != s.replica_id {
            return Err(TransportError::ForeignEnvelope {
                cluster_id: env.cluster_id,
                from: env.from,
                ours_cluster: s.cluster_id.clone(),
                ours_replica: s.replica_id,
            });
        }
        let to = env.to;
        let encoded_bytes = env.encoded_len();
        let mut peers = s.peers.lock();
        let peer = peers.get_mut(&to).ok_or(TransportError::UnknownPeer(to))?;
        if encoded_bytes > s.max_message_bytes {
            peer.state.on_dropped(DropReason::TooLarge);
            return Err(TransportError::MessageTooLarge {
                to,
                size: encoded_bytes,
                limit: s.max_message_bytes,
            });
        }
        if let Some(queue) = peer.unstarted.take() {
            let task = PeerTask {
                id: to,
                cluster_id: s.cluster_id.clone(),
                replica_id: s.replica_id,
                max_message_bytes: s.max_message_bytes,
                connect_timeout: s.connect_timeout,
                backoff_min: s.backoff_min,
                backoff_max: s.backoff_max,
                state: peer.state.clone(),
                addr: peer.addr.subscribe(),
                queue,
                closed: s.closed.subscribe(),
            };
            s.runtime.spawn(task.run());
        }
        match peer.queue.try_send(env) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                peer.state.on_dropped(DropReason::QueueFull);
                Err(TransportError::QueueFull {
                    peer: to,
                    capacity: s.peer_queue_capacity,
                })
            }
            // The task stopped, which happens only when the transport's
            // runtime is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransportError::Closed),
        }
    }

    /// Adds peer `id` at `addr` (`host:port`), or changes its address: its
    /// stream is then re-established to the new address, keeping the queue.
    /// An address that is not `host:port` shows up as the peer's
    /// `last_error` (and in the log) when it is used.
    pub fn set_peer(&self, id: u64, addr: String) {
        let s = &self.shared;
        if let Err(e) = validate_addr(id, &addr) {
            tracing::warn!(peer = id, "{e}");
        }
        let mut peers = s.peers.lock();
        match peers.get(&id) {
            Some(peer) => {
                peer.addr.send_if_modified(|a| {
                    if *a == addr {
                        false
                    } else {
                        *a = addr;
                        true
                    }
                });
            }
            None => {
                let peer = s.new_peer(id, addr);
                peers.insert(id, peer);
            }
        }
    }

    /// Removes peer `id`: its task stops and its queued envelopes are
    /// discarded. Inbound streams from it are still accepted (the cluster
    /// id is the gate, not the peer list).
    pub fn remove_peer(&self, id: u64) {
        let removed = self.shared.peers.lock().remove(&id);
        if let Some(peer) = removed {
            peer.state.set_connected(false);
        }
    }

    /// Counters and connection state of every configured peer, by id.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let peers = self.shared.peers.lock();
        let mut stats: Vec<PeerStats> = peers
            .values()
            .map(|p| p.state.snapshot(p.addr.borrow().clone()))
            .collect();
        drop(peers);
        stats.sort_by_key(|p| p.id);
        stats
    }

    /// Stops the transport: every peer task ends (queued envelopes are
    /// discarded), every inbound stream is ended, and `send` returns
    /// [`TransportError::Closed`]. Call it before a graceful shutdown of a
    /// server that holds [`Transport::service`].
    pub fn close(&self) {
        self.shared.closed.send_replace(true);
        let peers = std::mem::take(&mut *self.shared.peers.lock());
        for peer in peers.values() {
            peer.state.set_connected(false);
        }
    }
}

/// A tonic server builder with the settings the peer transport wants: HTTP/2
/// keepalive (10 s, timeout 20 s), TCP_NODELAY, and flow-control windows of
/// 2 MiB per stream and 4 MiB per connection. Use it for the server that
/// carries [`Transport::service`] next to other services.
///
/// Do not enable `http2_adaptive_window` on that server: it starts the
/// windows at 64 KiB, and h2 sizes its budget of buffered small DATA frames
/// from the connection window (half of it, one small frame costing up to
/// 256 bytes), so a burst of a few hundred small Raft messages would make it
/// close the connection (GOAWAY `ENHANCE_YOUR_CALM`, "too_many_data_frames").
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(client::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(client::KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
}

/// Stops a [`Transport::serve`] server when dropped or shut down.
#[derive(Debug)]
pub struct ServeHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ServeHandle {
    /// The address being served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends every stream of this server, and waits until
    /// its connections are closed.
    pub async fn shutdown(mut self) -> Result<(), TransportError> {
        self.stop.send_replace(true);
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result.map_err(TransportError::Server),
                Err(e) => Err(TransportError::ServerTask(e.to_string())),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        // The server winds down in the background.
        self.stop.send_replace(true);
    }
}
