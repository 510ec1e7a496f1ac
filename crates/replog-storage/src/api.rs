//! The write-side contract every replica storage implements, on top of
//! raft-rs's read-side [`raft::Storage`].

use raft::eraftpb::{ConfState, Entry, HardState};

use crate::error::Result;
use crate::model::{Member, ReplicaMeta, ReplicaStatus};

/// One atomic change to a replica's storage. Everything in it lands in a
/// single write batch: all of it is visible after a crash, or none of it.
#[derive(Debug, Default, Clone)]
pub struct LogUpdate {
    /// Entries to append. They must be contiguous; the first one may overwrite
    /// a conflicting tail, which is then removed.
    pub entries: Vec<Entry>,
    /// New hard state.
    pub hard_state: Option<HardState>,
    /// New membership. With `snapshot`, the membership the snapshot carries;
    /// otherwise it replaces the current membership without a history
    /// record (use `conf_changes` for changes applied from the log).
    pub conf_state: Option<ConfState>,
    /// Membership changes applied from log entries: (position, membership
    /// from then on), in position order. Recorded before `compact_to`, so a
    /// snapshot at the compaction point carries the membership of its
    /// position.
    pub conf_changes: Vec<(u64, ConfState)>,
    /// Install a snapshot mark at (index, term): every entry at or before
    /// `index` is removed, and the log continues after it.
    pub snapshot: Option<(u64, u64)>,
    /// Remove every entry before this position (truncate / compact).
    pub compact_to: Option<u64>,
    /// Addresses of members to add or update in the address book.
    pub member_addresses: Vec<Member>,
    /// New applied position; written with the state it produced.
    pub applied: Option<u64>,
    /// New replica status.
    pub status: Option<ReplicaStatus>,
    /// The replicated repair memory as of `applied` (replog-repair's
    /// encoded `RepairState`), stored under its own key and carried by the
    /// snapshots this replica sends. Opaque to the storage.
    pub repair_state: Option<Vec<u8>>,
    /// Make this write, and every write before it, durable before `write`
    /// returns (the write and its fsync in one call), instead of at a later
    /// [`LogStorage::sync`]. Ignored when durability was turned off.
    pub sync: bool,
}

impl LogUpdate {
    /// True if the update changes nothing.
    pub fn is_empty(&self) -> bool {
        self.only_commit_and_applied() && self.hard_state.is_none() && self.applied.is_none()
    }

    /// True if the update changes nothing but the hard state (of which,
    /// for the caller to know, only the commit index) and the applied
    /// position: what a replica may write late, merged into a later write.
    pub fn only_commit_and_applied(&self) -> bool {
        self.entries.is_empty()
            && self.conf_state.is_none()
            && self.conf_changes.is_empty()
            && self.member_addresses.is_empty()
            && self.snapshot.is_none()
            && self.compact_to.is_none()
            && self.status.is_none()
            && self.repair_state.is_none()
    }
}

/// A replica's durable log: raft-rs [`raft::Storage`] for reads, plus writes.
///
/// Contract:
/// - [`LogStorage::write`] makes the update visible to reads at once and
///   durable no later than the next [`LogStorage::sync`] that starts after it
///   returned. Updates are durable in order: after a crash the storage holds a
///   prefix of the updates written.
/// - Reads never return an entry whose checksum does not match.
/// - `first_index() == snapshot_index + 1` and `last_index() >= snapshot_index`.
pub trait LogStorage: raft::Storage + Clone + Send + Sync + 'static {
    /// Applies `update` atomically (visible now, durable after `sync`).
    fn write(&self, update: LogUpdate) -> Result<()>;
    /// Makes every completed write durable (fsync), unless durability was
    /// explicitly turned off.
    fn sync(&self) -> Result<()>;
    /// A copy of the metadata record as it is now.
    fn meta(&self) -> ReplicaMeta;
    /// The repair state last written (empty: none yet). A snapshot this
    /// storage makes carries it as its data.
    fn repair_state(&self) -> Vec<u8>;
    /// Gives the space of removed entries back to the filesystem (a no-op for
    /// storage that holds none).
    fn reclaim_space(&self) -> Result<()>;

    /// Starts a turn of the read budget for sends to followers (see
    /// [`crate::FetchBudget`]): reads that can wait are served again, up to
    /// the budget. Storage without a budget serves every read at once.
    fn begin_fetch_turn(&self) {}

    /// The oldest read context refused for want of budget, to be retried
    /// with `RawNode::on_entries_fetched` now, while this turn's budget
    /// lasts. `None`: nothing to retry now.
    fn next_deferred_fetch(&self) -> Option<raft::GetEntriesContext> {
        None
    }

    /// Read contexts refused for want of budget and not retried yet.
    fn deferred_fetches(&self) -> usize {
        0
    }
}

/// Checks that `conf_changes` are after the compaction point and in order.
pub(crate) fn check_conf_changes(u: &LogUpdate, snapshot_index: u64) -> Result<()> {
    let mut prev = snapshot_index;
    for (index, _) in &u.conf_changes {
        if *index <= prev {
            return Err(crate::error::StorageError::Invalid(format!(
                "membership change at {index} is not after position {prev}"
            )));
        }
        prev = *index;
    }
    Ok(())
}

/// What every write keeps once its update passed the checks above: the log
/// still ends at or after the compaction point (`last_index` is the last
/// position after the write), the compaction point never moves back, and
/// an installed snapshot counts as applied (raft-rs refuses to restart a
/// replica whose applied position is behind its snapshot). A failure is a
/// bug in the storage's checks or in its caller.
pub(crate) fn assert_write_keeps_invariants(
    before: &ReplicaMeta,
    after: &ReplicaMeta,
    last_index: u64,
    installed: Option<u64>,
) {
    assert!(
        after.snapshot_index <= last_index,
        "a write leaves the compaction point {} past the last position {last_index}",
        after.snapshot_index
    );
    assert!(
        after.snapshot_index >= before.snapshot_index,
        "a write moves the compaction point back from {} to {}",
        before.snapshot_index,
        after.snapshot_index
    );
    if let Some(index) = installed {
        assert!(
            after.applied_index >= index,
            "a snapshot at {index} is written with the applied position {}, behind it",
            after.applied_index
        );
    }
}
