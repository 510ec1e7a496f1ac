//! Prometheus metrics of the transport.
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Why an inbound connection was refused (label `reason` of
/// `replog_transport_refused_connections_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// Missing or unparsable `replog-*` headers.
    Headers,
    /// Another cluster.
    ClusterId,
    /// Addressed to another replica id.
    ReplicaId,
}

impl RefusalReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            RefusalReason::Headers => "headers",
            RefusalReason::ClusterId => "cluster_id",
            RefusalReason::ReplicaId => "replica_id",
        }
    }
}

/// Why an envelope was dropped (label `reason` of
/// `replog_transport_dropped_messages_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Sending: the peer's queue was full.
    QueueFull,
    /// Sending or receiving: over `max_message_bytes`.
    TooLarge,
    /// Receiving: the envelope's cluster id, from or to disagree with the
    /// call's headers.
    HeaderMismatch,
    /// Receiving: no body (or one this version does not know).
    NoBody,
    /// Receiving: the inbound channel was full.
    InboundFull,
    /// Receiving: the inbound channel's receiver is gone.
    InboundClosed,
}

impl DropReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::HeaderMismatch => "header_mismatch",
            DropReason::NoBody => "no_body",
            DropReason::InboundFull => "inbound_full",
            DropReason::InboundClosed => "inbound_closed",
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) sent: IntCounterVec,
    pub(crate) received: IntCounterVec,
    pub(crate) dropped: IntCounterVec,
    pub(crate) refused: IntCounterVec,
    pub(crate) refused_by_peer: IntCounterVec,
    pub(crate) reconnects: IntCounterVec,
    pub(crate) connected: IntGaugeVec,
}

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            sent: IntCounterVec::new(
                Opts::new(
                    "replog_transport_sent_messages_total",
                    "Envelopes handed to a peer's stream.",
                ),
                &["peer"],
            )?,
            received: IntCounterVec::new(
                Opts::new(
                    "replog_transport_received_messages_total",
                    "Envelopes accepted from a peer and handed to the inbound channel.",
                ),
                &["peer"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "replog_transport_dropped_messages_total",
                    "Envelopes dropped, by peer and reason.",
                ),
                &["peer", "reason"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "replog_transport_refused_connections_total",
                    "Inbound streams refused, by reason (headers, cluster_id, replica_id).",
                ),
                &["reason"],
            )?,
            refused_by_peer: IntCounterVec::new(
                Opts::new(
                    "replog_transport_refused_by_peer_total",
                    "Outbound streams a peer refused (PERMISSION_DENIED or INVALID_ARGUMENT).",
                ),
                &["peer"],
            )?,
            reconnects: IntCounterVec::new(
                Opts::new(
                    "replog_transport_reconnects_total",
                    "Connection attempts to a peer after the first one.",
                ),
                &["peer"],
            )?,
            connected: IntGaugeVec::new(
                Opts::new(
                    "replog_transport_peer_connected",
                    "1 while a stream to the peer is established, else 0.",
                ),
                &["peer"],
            )?,
        };
        for (i, c) in m.collectors().into_iter().enumerate() {
            if let Err(e) = registry.register(c) {
                // All or nothing: a failed `new` leaves the registry as it
                // was (a clone of a metric vector names the same collector).
                for r in m.collectors().into_iter().take(i) {
                    let _ = registry.unregister(r);
                }
                return Err(e);
            }
        }
        Ok(m)
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.sent.clone()),
            Box::new(self.received.clone()),
            Box::new(self.dropped.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.refused_by_peer.clone()),
            Box::new(self.reconnects.clone()),
            Box::new(self.connected.clone()),
        ]
    }
}
