//! Errors of the transport.
use std::net::SocketAddr;

/// An error of the [`Transport`](crate::Transport).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The configuration cannot work (the message says which field).
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// `Transport::new` was called outside a tokio runtime.
    #[error("the transport needs a tokio runtime: call Transport::new inside one or use Transport::with_runtime")]
    NoRuntime,
    /// `send` to a replica id that has no address.
    #[error("unknown peer: replica {0} has no address in this transport")]
    UnknownPeer(u64),
    /// The envelope is larger than `max_message_bytes`; it was not queued.
    #[error("envelope to replica {to} is {size} bytes, over the transport's limit of {limit} bytes (max_message_bytes)")]
    MessageTooLarge {
        /// Destination replica.
        to: u64,
        /// Encoded size of the envelope.
        size: usize,
        /// The configured `max_message_bytes`.
        limit: usize,
    },
    /// The envelope names another cluster or another sender than this
    /// transport (an empty `cluster_id` and a zero `from` are filled in).
    #[error("envelope names cluster '{cluster_id}' replica {from}, but this transport is replica {ours_replica} of cluster '{ours_cluster}'")]
    ForeignEnvelope {
        /// The envelope's cluster id.
        cluster_id: String,
        /// The envelope's sender.
        from: u64,
        /// This transport's cluster id.
        ours_cluster: String,
        /// This transport's replica id.
        ours_replica: u64,
    },
    /// The peer's queue is full (the peer is slow or unreachable); the
    /// envelope was dropped and counted. Raft tolerates the loss; callers
    /// may report the peer unreachable to Raft.
    #[error("queue to replica {peer} is full ({capacity} envelopes); envelope dropped")]
    QueueFull {
        /// Destination replica.
        peer: u64,
        /// The configured `peer_queue_capacity`.
        capacity: usize,
    },
    /// The transport was closed with `Transport::close`.
    #[error("the transport is closed")]
    Closed,
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("gRPC server task failed: {0}")]
    ServerTask(String),
    /// Registering the metrics failed (e.g. already registered in that registry).
    #[error("cannot register transport metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
