//! Per-peer counters, shared by the peer's send task, the inbound service
//! and [`Transport::peer_stats`](crate::Transport::peer_stats).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};

use crate::metrics::{DropReason, Metrics};

/// What [`Transport::peer_stats`](crate::Transport::peer_stats) reports about
/// one configured peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    /// The peer's replica id.
    pub id: u64,
    /// The peer's configured address (`host:port`).
    pub addr: String,
    /// A stream to the peer is established: it has stayed open for a
    /// moment without being refused (a refusal arrives within a round trip).
    pub connected: bool,
    /// When an envelope was last handed to the peer's stream.
    pub last_sent: Option<Instant>,
    /// When an envelope from the peer was last accepted (handed to the
    /// inbound channel).
    pub last_received: Option<Instant>,
    /// Envelopes handed to the peer's stream. Envelopes in flight when a
    /// stream fails are lost (Raft resends), but were counted here.
    pub sent: u64,
    /// Envelopes accepted from the peer.
    pub received: u64,
    /// Envelopes to or from the peer that were dropped (full queue, too
    /// large, header mismatch, full inbound channel, ...).
    pub dropped: u64,
    /// Connection attempts after the first one.
    pub reconnects: u64,
    /// The last connection error; cleared once a stream is established.
    pub last_error: Option<String>,
}

pub(crate) struct PeerState {
    id: u64,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicBool,
    last_sent: Mutex<Option<Instant>>,
    last_received: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    sent_metric: IntCounter,
    received_metric: IntCounter,
    reconnects_metric: IntCounter,
    refused_metric: IntCounter,
    connected_metric: IntGauge,
    metrics: Metrics,
}

impl PeerState {
    pub(crate) fn new(id: u64, metrics: &Metrics) -> Arc<Self> {
        let label = id.to_string();
        let l = [label.as_str()];
        Arc::new(PeerState {
            id,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            last_sent: Mutex::new(None),
            last_received: Mutex::new(None),
            last_error: Mutex::new(None),
            sent_metric: metrics.sent.with_label_values(&l),
            received_metric: metrics.received.with_label_values(&l),
            reconnects_metric: metrics.reconnects.with_label_values(&l),
            refused_metric: metrics.refused_by_peer.with_label_values(&l),
            connected_metric: metrics.connected.with_label_values(&l),
            metrics: metrics.clone(),
        })
    }

    pub(crate) fn on_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.sent_metric.inc();
        *self.last_sent.lock() = Some(Instant::now());
    }

    pub(crate) fn on_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.received_metric.inc();
        *self.last_received.lock() = Some(Instant::now());
    }

    pub(crate) fn on_dropped(&self, reason: DropReason) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .dropped
            .with_label_values(&[self.id.to_string().as_str(), reason.label()])
            .inc();
    }

    pub(crate) fn on_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.reconnects_metric.inc();
    }

    pub(crate) fn on_refused(&self) {
        self.refused_metric.inc();
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.connected_metric.set(i64::from(connected));
    }

    pub(crate) fn set_error(&self, error: Option<String>) {
        *self.last_error.lock() = error;
    }

    pub(crate) fn snapshot(&self, addr: String) -> PeerStats {
        PeerStats {
            id: self.id,
            addr,
            connected: self.connected.load(Ordering::Relaxed),
            last_sent: *self.last_sent.lock(),
            last_received: *self.last_received.lock(),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}
