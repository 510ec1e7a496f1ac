//! How an embedded replica talks to the other replicas of its cluster.
//!
//! The runtime hands every message for a peer to a [`PeerLink`] as a
//! `replog.replica.v1.Envelope` and reads the peers' envelopes from a
//! bounded channel. The gRPC transport (crates/replog-transport) is the
//! production link; tests may wire replicas together in memory.
//!
//! Invariants: an envelope whose cluster id or recipient is not this
//! replica's, or whose body does not decode, is dropped with a log line and
//! never reaches the core; decoding never panics.

use std::collections::BTreeMap;
use std::time::Duration;

use raft::eraftpb::Message;
use replog_core::PeerMessage;
use replog_proto::replica::{envelope::Body, Envelope, RecoverRequest, RecoverResponse};
use replog_storage::ReplicaStatus;

/// Sends envelopes to peers. Must not block: a full queue drops (Raft and
/// the recover protocol both tolerate loss).
pub trait PeerLink: Send + Sync + 'static {
    fn send(&self, envelope: Envelope);
    /// The address book changed (a membership change added a replica).
    fn set_peer(&self, id: u64, address: String);
}

/// How this replica takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The other replicas: id -> `host:port` of their replica server.
    pub peers: BTreeMap<u64, String>,
    /// Mesos' `--auto-initialize` (two-phase rule).
    pub auto_initialize: bool,
    /// A replica is pinged (Raft heartbeats, recover requests) at least this
    /// often; a silence this long is one missed ping.
    pub ping_timeout: Duration,
    /// Missed pings after which a replica is reported unreachable.
    pub max_ping_timeouts: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            peers: BTreeMap::new(),
            auto_initialize: false,
            ping_timeout: Duration::from_secs(15),
            max_ping_timeouts: 5,
        }
    }
}

/// What an inbound envelope carries for the core.
#[derive(Debug)]
pub enum Inbound {
    Raft(Box<Message>),
    Peer(PeerMessage),
}

fn status_to_pb(s: ReplicaStatus) -> i32 {
    use replog_proto::storage::ReplicaStatus as P;
    (match s {
        ReplicaStatus::Empty => P::Empty,
        ReplicaStatus::Starting => P::Starting,
        ReplicaStatus::Recovering => P::Recovering,
        ReplicaStatus::Voting => P::Voting,
    }) as i32
}

/// The status of a protobuf enum value (`None` for unknown values).
pub fn status_from_pb(v: i32) -> Option<ReplicaStatus> {
    use replog_proto::storage::ReplicaStatus as P;
    match P::try_from(v).ok()? {
        P::Empty => Some(ReplicaStatus::Empty),
        P::Starting => Some(ReplicaStatus::Starting),
        P::Recovering => Some(ReplicaStatus::Recovering),
        P::Voting => Some(ReplicaStatus::Voting),
        P::Unspecified => None,
    }
}

/// The protobuf value of a status.
pub fn status_pb(s: ReplicaStatus) -> i32 {
    status_to_pb(s)
}

/// The envelope that carries Raft message `m` of cluster `cluster_id`.
pub fn raft_envelope(cluster_id: &str, m: &Message) -> Envelope {
    Envelope {
        cluster_id: cluster_id.to_string(),
        from: m.from,
        to: m.to,
        body: Some(Body::Raft(
            protobuf::Message::write_to_bytes(m)
                .expect("encoding an in-memory raft message cannot fail")
                .into(),
        )),
    }
}

/// The envelope that carries recover-protocol message `msg` from replica
/// `from` to replica `to` of cluster `cluster_id`.
pub fn peer_envelope(cluster_id: &str, from: u64, to: u64, msg: &PeerMessage) -> Envelope {
    let body = match msg {
        PeerMessage::RecoverRequest {
            status,
            last_index,
            incarnation,
        } => Body::RecoverRequest(RecoverRequest {
            status: status_to_pb(*status),
            last_index: *last_index,
            incarnation: *incarnation,
        }),
        PeerMessage::RecoverResponse {
            status,
            term,
            leader,
            applied,
        } => Body::RecoverResponse(RecoverResponse {
            status: status_to_pb(*status),
            term: *term,
            leader: *leader,
            commit: *applied,
        }),
    };
    Envelope {
        cluster_id: cluster_id.to_string(),
        from,
        to,
        body: Some(body),
    }
}

/// Checks and decodes an envelope for replica `me` of `cluster_id`: the
/// sender and what it carries, or why the envelope is dropped. Every
/// envelope a peer sends goes through it (public for the fuzz targets in
/// `fuzz/`).
pub fn decode(cluster_id: &str, me: u64, env: Envelope) -> Result<(u64, Inbound), String> {
    if env.cluster_id != cluster_id {
        return Err(format!(
            "envelope from replica {} of cluster '{}' (this is cluster '{cluster_id}')",
            env.from, env.cluster_id
        ));
    }
    if env.to != me {
        return Err(format!(
            "envelope for replica {} reached replica {me}",
            env.to
        ));
    }
    let from = env.from;
    let inbound = match env.body {
        Some(Body::Raft(bytes)) => {
            let m: Message = protobuf::Message::parse_from_bytes(&bytes)
                .map_err(|e| format!("undecodable raft message from {from}: {e}"))?;
            if m.from != from || m.to != me {
                return Err(format!(
                    "raft message from {} to {} in an envelope from {from} to {me}",
                    m.from, m.to
                ));
            }
            Inbound::Raft(Box::new(m))
        }
        Some(Body::RecoverRequest(r)) => Inbound::Peer(PeerMessage::RecoverRequest {
            status: status_from_pb(r.status).ok_or_else(|| {
                format!(
                    "recover request from {from} with unknown status {}",
                    r.status
                )
            })?,
            last_index: r.last_index,
            incarnation: r.incarnation,
        }),
        Some(Body::RecoverResponse(r)) => Inbound::Peer(PeerMessage::RecoverResponse {
            status: status_from_pb(r.status).ok_or_else(|| {
                format!(
                    "recover response from {from} with unknown status {}",
                    r.status
                )
            })?,
            term: r.term,
            leader: r.leader,
            applied: r.commit,
        }),
        None => return Err(format!("empty envelope from {from}")),
    };
    Ok((from, inbound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_foreign_ones_are_refused() {
        let m = Message {
            from: 2,
            to: 1,
            term: 7,
            ..Default::default()
        };
        let env = raft_envelope("c", &m);
        let (from, inbound) = decode("c", 1, env.clone()).unwrap();
        assert_eq!(from, 2);
        assert!(matches!(inbound, Inbound::Raft(r) if r.term == 7));
        assert!(decode("other", 1, env.clone())
            .unwrap_err()
            .contains("cluster 'c'"));
        assert!(decode("c", 3, env).is_err());
        let msg = PeerMessage::RecoverResponse {
            status: ReplicaStatus::Voting,
            term: 3,
            leader: 2,
            applied: 9,
        };
        let (_, inbound) = decode("c", 1, peer_envelope("c", 2, 1, &msg)).unwrap();
        assert!(matches!(inbound, Inbound::Peer(p) if p == msg));
        let garbage = Envelope {
            cluster_id: "c".into(),
            from: 2,
            to: 1,
            body: Some(Body::Raft(vec![0xff; 9].into())),
        };
        assert!(decode("c", 1, garbage).is_err());
    }
}
