//! Configuration of a [`Transport`](crate::Transport).
use std::collections::HashMap;
use std::time::Duration;

/// Default limit of one envelope's encoded size: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default capacity of each peer's send queue, in envelopes.
pub const DEFAULT_PEER_QUEUE_CAPACITY: usize = 4096;

/// What a [`Transport`](crate::Transport) needs to know about its cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// The cluster this replica belongs to; every connection carries it and
    /// every connection from another cluster is refused. Visible ASCII, no spaces
    /// (it travels in a gRPC metadata header).
    pub cluster_id: String,
    /// This replica's id (non-zero, as in Raft).
    pub replica_id: u64,
    /// Replica id -> `host:port` of its server. Can be changed at run time
    /// with [`Transport::set_peer`](crate::Transport::set_peer) and
    /// [`Transport::remove_peer`](crate::Transport::remove_peer).
    pub peers: HashMap<u64, String>,
    /// Largest encoded envelope sent or accepted (also the gRPC
    /// encoding/decoding limit of both the client and the service).
    pub max_message_bytes: usize,
    /// Envelopes queued per peer while they wait for the connection.
    pub peer_queue_capacity: usize,
    /// Bound on establishing one connection (TCP and HTTP/2 handshake).
    pub connect_timeout: Duration,
    /// First delay between connection attempts to a peer.
    pub backoff_min: Duration,
    /// Longest delay between connection attempts (doubling from
    /// `backoff_min`); a peer that refuses us is retried at this pace.
    pub backoff_max: Duration,
}

impl TransportConfig {
    /// A configuration with the defaults: 16 MiB messages, 4096 envelopes
    /// per peer queue, 5 s connect timeout, backoff from 50 ms to 2 s, and
    /// no peers.
    pub fn new(cluster_id: impl Into<String>, replica_id: u64) -> Self {
        TransportConfig {
            cluster_id: cluster_id.into(),
            replica_id,
            peers: HashMap::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            peer_queue_capacity: DEFAULT_PEER_QUEUE_CAPACITY,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }

    /// The same configuration with `peers` added.
    pub fn with_peers<I, S>(mut self, peers: I) -> Self
    where
        I: IntoIterator<Item = (u64, S)>,
        S: Into<String>,
    {
        self.peers
            .extend(peers.into_iter().map(|(id, a)| (id, a.into())));
        self
    }
}
