//! The typed records of a replica and their conversions to and from raft-rs
//! and protobuf types. raft-rs and prost types stop here: the rest of the
//! crate speaks these.

use std::fmt;

use bytes::Bytes;
use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState};
use replog_proto::storage as pb;

use crate::error::{Result, StorageError};

/// The on-disk format version this binary writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Replica status (the Mesos replica states), persisted in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaStatus {
    /// A new or wiped data directory: never votes, never acknowledges.
    Empty,
    /// Auto-initialize in progress (two-phase rule).
    Starting,
    /// Catching up as a learner; local data may be incomplete.
    Recovering,
    /// A full member.
    Voting,
}

impl ReplicaStatus {
    /// The name operators see (`EMPTY`, `STARTING`, `RECOVERING`, `VOTING`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStatus::Empty => "EMPTY",
            ReplicaStatus::Starting => "STARTING",
            ReplicaStatus::Recovering => "RECOVERING",
            ReplicaStatus::Voting => "VOTING",
        }
    }

    pub(crate) fn to_pb(self) -> pb::ReplicaStatus {
        match self {
            ReplicaStatus::Empty => pb::ReplicaStatus::Empty,
            ReplicaStatus::Starting => pb::ReplicaStatus::Starting,
            ReplicaStatus::Recovering => pb::ReplicaStatus::Recovering,
            ReplicaStatus::Voting => pb::ReplicaStatus::Voting,
        }
    }

    pub(crate) fn from_pb(v: i32) -> Option<Self> {
        match pb::ReplicaStatus::try_from(v).ok()? {
            pb::ReplicaStatus::Empty => Some(ReplicaStatus::Empty),
            pb::ReplicaStatus::Starting => Some(ReplicaStatus::Starting),
            pb::ReplicaStatus::Recovering => Some(ReplicaStatus::Recovering),
            pb::ReplicaStatus::Voting => Some(ReplicaStatus::Voting),
            pb::ReplicaStatus::Unspecified => None,
        }
    }
}

impl fmt::Display for ReplicaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Raft id of the member (non-zero).
    pub id: u64,
    /// `host:port` of its replica server; empty for an embedded replica.
    pub address: String,
}

/// The metadata record of a replica, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaMeta {
    pub format_version: u32,
    pub cluster_id: String,
    pub replica_id: u64,
    pub status: ReplicaStatus,
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Position and term of the last compacted entry (0, 0 for none).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    /// The last position whose effects are in this replica's state.
    pub applied_index: u64,
    pub members: Vec<Member>,
    pub created_at_unix_ms: u64,
    /// Membership as of `snapshot_index`: what a snapshot there carries.
    pub snapshot_conf_state: ConfState,
    /// Membership changes applied after `snapshot_index` (position, new
    /// membership), in position order; the last one equals `conf_state`.
    pub conf_history: Vec<(u64, ConfState)>,
}

fn conf_to_pb(cs: &ConfState) -> pb::ConfState {
    pb::ConfState {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        voters_outgoing: cs.voters_outgoing.clone(),
        learners_next: cs.learners_next.clone(),
        auto_leave: cs.auto_leave,
    }
}

fn conf_from_pb(cs: pb::ConfState) -> ConfState {
    ConfState {
        voters: cs.voters,
        learners: cs.learners,
        voters_outgoing: cs.voters_outgoing,
        learners_next: cs.learners_next,
        auto_leave: cs.auto_leave,
        ..Default::default()
    }
}

impl ReplicaMeta {
    /// The metadata of a freshly initialized VOTING replica. Like raft-rs's
    /// `MemStorage::initialize_with_conf_state`, the initial membership is a
    /// snapshot at (1, 1): every member starts from the same state and the
    /// first real entry is at position 2.
    pub fn initialized(cluster_id: &str, replica_id: u64, voters: Vec<u64>, now_ms: u64) -> Self {
        let conf_state = ConfState {
            voters,
            ..Default::default()
        };
        ReplicaMeta {
            format_version: FORMAT_VERSION,
            cluster_id: cluster_id.to_string(),
            replica_id,
            status: ReplicaStatus::Voting,
            hard_state: HardState {
                term: 1,
                commit: 1,
                ..Default::default()
            },
            conf_state: conf_state.clone(),
            snapshot_index: 1,
            snapshot_term: 1,
            applied_index: 1,
            members: Vec::new(),
            created_at_unix_ms: now_ms,
            snapshot_conf_state: conf_state,
            conf_history: Vec::new(),
        }
    }

    /// The metadata of an EMPTY replica: an identity, no log, no membership.
    pub fn empty(cluster_id: &str, replica_id: u64, now_ms: u64) -> Self {
        ReplicaMeta {
            format_version: FORMAT_VERSION,
            cluster_id: cluster_id.to_string(),
            replica_id,
            status: ReplicaStatus::Empty,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot_index: 0,
            snapshot_term: 0,
            applied_index: 0,
            members: Vec::new(),
            created_at_unix_ms: now_ms,
            snapshot_conf_state: ConfState::default(),
            conf_history: Vec::new(),
        }
    }

    /// Records membership changes applied at the given positions (after
    /// `snapshot_index`, in order); the last one becomes `conf_state`.
    pub fn record_conf_changes(&mut self, changes: &[(u64, ConfState)]) {
        for (index, cs) in changes {
            debug_assert!(*index > self.snapshot_index);
            debug_assert!(self.conf_history.last().is_none_or(|(i, _)| i < index));
            self.conf_history.push((*index, cs.clone()));
            self.conf_state = cs.clone();
        }
    }

    /// A snapshot at `snapshot_index` with membership `cs` was installed:
    /// it is both the snapshot's and the current membership.
    pub fn install_snapshot_conf(&mut self, cs: ConfState) {
        self.snapshot_conf_state = cs.clone();
        self.conf_state = cs;
        self.conf_history.clear();
    }

    /// The compaction point moved to `mark`: fold the membership changes at
    /// or before it into the snapshot's membership.
    pub fn compact_conf_to(&mut self, mark: u64) {
        while let Some((i, _)) = self.conf_history.first() {
            if *i > mark {
                break;
            }
            let (_, cs) = self.conf_history.remove(0);
            self.snapshot_conf_state = cs;
        }
    }

    /// Adds or updates addresses in the address book (`members`).
    pub fn record_addresses(&mut self, addresses: &[Member]) {
        for a in addresses {
            match self.members.iter_mut().find(|m| m.id == a.id) {
                Some(m) => m.address = a.address.clone(),
                None => self.members.push(a.clone()),
            }
        }
        self.members.sort_by_key(|m| m.id);
    }

    /// The membership a snapshot at `snapshot_index` sent to replica `to`
    /// carries. A replica added after that position is not in it, and
    /// raft-rs refuses a snapshot that leaves out its recipient; so a
    /// recipient that is a member now is included as a learner. Replaying
    /// the entries after the snapshot then adds it again, which changes
    /// nothing, and every later change applies as on the leader.
    pub fn snapshot_conf_for(&self, to: u64) -> ConfState {
        let mut cs = self.conf_state_at_snapshot();
        let member = |c: &ConfState| {
            c.voters.contains(&to)
                || c.learners.contains(&to)
                || c.voters_outgoing.contains(&to)
                || c.learners_next.contains(&to)
        };
        if to != 0 && !member(&cs) && member(&self.conf_state) && cs.voters_outgoing.is_empty() {
            cs.learners.push(to);
        }
        cs
    }

    /// The membership a snapshot at `snapshot_index` carries.
    pub fn conf_state_at_snapshot(&self) -> ConfState {
        if self.snapshot_conf_state == ConfState::default() && self.conf_history.is_empty() {
            // Written before the snapshot membership was kept: no change
            // was recorded after the snapshot, so the current one is it.
            return self.conf_state.clone();
        }
        self.snapshot_conf_state.clone()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let hs = &self.hard_state;
        let cs = &self.conf_state;
        pb::ReplicaMetadata {
            format_version: self.format_version,
            cluster_id: self.cluster_id.clone(),
            replica_id: self.replica_id,
            status: self.status.to_pb() as i32,
            hard_state: Some(pb::HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            }),
            conf_state: Some(conf_to_pb(cs)),
            snapshot_index: self.snapshot_index,
            snapshot_term: self.snapshot_term,
            applied_index: self.applied_index,
            members: self
                .members
                .iter()
                .map(|m| pb::Member {
                    id: m.id,
                    address: m.address.clone(),
                })
                .collect(),
            created_at_unix_ms: self.created_at_unix_ms,
            snapshot_conf_state: Some(conf_to_pb(&self.snapshot_conf_state)),
            conf_history: self
                .conf_history
                .iter()
                .map(|(index, cs)| pb::ConfChangeRecord {
                    index: *index,
                    conf_state: Some(conf_to_pb(cs)),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    pub(crate) fn decode(bytes: &[u8], location: &str) -> Result<Self> {
        let m = pb::ReplicaMetadata::decode(bytes)
            .map_err(|e| StorageError::corrupt(location, format!("undecodable metadata: {e}")))?;
        let status = ReplicaStatus::from_pb(m.status).ok_or_else(|| {
            StorageError::corrupt(location, format!("unknown replica status {}", m.status))
        })?;
        let hs = m.hard_state.unwrap_or_default();
        let cs = m.conf_state.unwrap_or_default();
        let hard_state = HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
            ..Default::default()
        };
        let conf_state = conf_from_pb(cs);
        let mut conf_history = Vec::with_capacity(m.conf_history.len());
        for r in m.conf_history {
            if r.index <= m.snapshot_index
                || conf_history.last().is_some_and(|(i, _)| *i >= r.index)
            {
                return Err(StorageError::corrupt(
                    location,
                    format!("membership history out of order at position {}", r.index),
                ));
            }
            conf_history.push((r.index, conf_from_pb(r.conf_state.unwrap_or_default())));
        }
        Ok(ReplicaMeta {
            snapshot_conf_state: conf_from_pb(m.snapshot_conf_state.unwrap_or_default()),
            conf_history,
            format_version: m.format_version,
            cluster_id: m.cluster_id,
            replica_id: m.replica_id,
            status,
            hard_state,
            conf_state,
            snapshot_index: m.snapshot_index,
            snapshot_term: m.snapshot_term,
            applied_index: m.applied_index,
            members: m
                .members
                .into_iter()
                .map(|x| Member {
                    id: x.id,
                    address: x.address,
                })
                .collect(),
            created_at_unix_ms: m.created_at_unix_ms,
        })
    }

    /// First position that may be present in the log.
    pub fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }
}

/// Identity of a replica, as kept in the REPLICA-IDENTITY file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdentity {
    pub format_version: u32,
    pub cluster_id: String,
    pub replica_id: u64,
    pub created_at_unix_ms: u64,
}

impl ReplicaIdentity {
    pub(crate) fn encode(&self) -> Vec<u8> {
        pb::ReplicaIdentity {
            format_version: self.format_version,
            cluster_id: self.cluster_id.clone(),
            replica_id: self.replica_id,
            created_at_unix_ms: self.created_at_unix_ms,
        }
        .encode_to_vec()
    }

    pub(crate) fn decode(bytes: &[u8], location: &str) -> Result<Self> {
        let m = pb::ReplicaIdentity::decode(bytes)
            .map_err(|e| StorageError::corrupt(location, format!("undecodable identity: {e}")))?;
        Ok(ReplicaIdentity {
            format_version: m.format_version,
            cluster_id: m.cluster_id,
            replica_id: m.replica_id,
            created_at_unix_ms: m.created_at_unix_ms,
        })
    }
}

/// Encodes a Raft entry for the log column family (index lives in the key).
pub(crate) fn encode_entry(e: &Entry) -> Vec<u8> {
    let kind = match e.get_entry_type() {
        EntryType::EntryNormal => pb::EntryKind::Normal,
        EntryType::EntryConfChange => pb::EntryKind::ConfChange,
        EntryType::EntryConfChangeV2 => pb::EntryKind::ConfChangeV2,
    };
    pb::StoredEntry {
        term: e.term,
        kind: kind as i32,
        data: e.data.clone(),
        context: e.context.clone(),
    }
    .encode_to_vec()
}

/// Decodes a log entry stored at `index`; `location` names it in an error
/// (built only then: entries are decoded on every read).
pub(crate) fn decode_entry(
    index: u64,
    bytes: Bytes,
    location: impl Fn() -> String,
) -> Result<Entry> {
    let s = pb::StoredEntry::decode(bytes)
        .map_err(|e| StorageError::corrupt(location(), format!("undecodable log entry: {e}")))?;
    let entry_type = match pb::EntryKind::try_from(s.kind) {
        Ok(pb::EntryKind::Normal) => EntryType::EntryNormal,
        Ok(pb::EntryKind::ConfChange) => EntryType::EntryConfChange,
        Ok(pb::EntryKind::ConfChangeV2) => EntryType::EntryConfChangeV2,
        Err(_) => {
            return Err(StorageError::corrupt(
                location(),
                format!("unknown entry kind {}", s.kind),
            ))
        }
    };
    if s.term == 0 {
        return Err(StorageError::corrupt(location(), "log entry with term 0"));
    }
    Ok(Entry {
        index,
        term: s.term,
        entry_type,
        data: s.data,
        context: s.context,
        ..Default::default()
    })
}

/// Key of a log position: 8 bytes big-endian, so RocksDB orders keys by position.
pub fn position_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Inverse of [`position_key`]; `None` for a key of the wrong length.
pub fn key_position(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a membership change carries besides raft-rs's change: the members'
/// addresses, and for a promotion of a catching-up learner, the incarnation
/// it promotes (see [`Promotion`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipContext {
    pub addresses: Vec<Member>,
    pub promotion: Option<Promotion>,
}

/// The promotion of replica `replica_id` in its incarnation `incarnation`
/// (the random number it drew at start and sends in its recover requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    pub replica_id: u64,
    pub incarnation: u64,
}

/// Encodes a membership change's context (stored in the log entry).
pub fn encode_membership_context(context: &MembershipContext) -> Vec<u8> {
    pb::MemberAddresses {
        members: context
            .addresses
            .iter()
            .map(|m| pb::Member {
                id: m.id,
                address: m.address.clone(),
            })
            .collect(),
        promotion: context.promotion.map(|p| pb::Promotion {
            replica_id: p.replica_id,
            incarnation: p.incarnation,
        }),
    }
    .encode_to_vec()
}

/// Decodes a membership change's context; `None` if it is not one. An
/// empty context is an empty [`MembershipContext`].
pub fn decode_membership_context(bytes: &[u8]) -> Option<MembershipContext> {
    let m = pb::MemberAddresses::decode(bytes).ok()?;
    Some(MembershipContext {
        addresses: m
            .members
            .into_iter()
            .map(|x| Member {
                id: x.id,
                address: x.address,
            })
            .collect(),
        promotion: m.promotion.map(|p| Promotion {
            replica_id: p.replica_id,
            incarnation: p.incarnation,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_membership_context_round_trips_and_garbage_is_refused() {
        let member = |id: u64| Member {
            id,
            address: format!("10.0.0.{id}:7100"),
        };
        let contexts = [
            MembershipContext::default(),
            MembershipContext {
                addresses: vec![member(1), member(2)],
                promotion: None,
            },
            MembershipContext {
                addresses: Vec::new(),
                promotion: Some(Promotion {
                    replica_id: 3,
                    incarnation: u64::MAX,
                }),
            },
        ];
        for c in contexts {
            let bytes = encode_membership_context(&c);
            assert_eq!(decode_membership_context(&bytes), Some(c));
        }
        // An empty context (a change without addresses) is an empty one,
        // and bytes that are no protobuf message are refused.
        assert_eq!(
            decode_membership_context(&[]),
            Some(MembershipContext::default())
        );
        assert_eq!(decode_membership_context(&[0xff, 0xff, 0xff]), None);
    }
}
