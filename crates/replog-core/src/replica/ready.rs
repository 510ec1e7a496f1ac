//! The ready loop: raft-rs's documented order for asynchronous
//! persistence. Per ready: send `messages` at once (a leader's appends),
//! write entries, hard state and the effects of applied entries in one
//! [`LogUpdate`], `advance_append_async`; send `persisted_messages` (votes,
//! a follower's answers) only after the fsync of that ready, which the
//! runtime reports with [`Input::Persisted`] (`on_persist_ready`).
//!
//! Invariants:
//! - a persisted message never leaves before the fsync that covers its
//!   ready, except a heartbeat response, which promises nothing about the
//!   log or the vote;
//! - persisted reports come back in ready order: a ready is written inline
//!   (write and fsync in one call) only when no earlier ready waits;
//! - a replica that is not VOTING sends no vote traffic (asserted on
//!   every ready);
//! - at most `MAX_UNSYNCED_READIES` readies wait for their fsync.
//!
//! [`Input::Persisted`]: crate::Input::Persisted

use raft::eraftpb::{ConfState, Message, MessageType};
use raft::{Ready, SnapshotStatus, StateRole};
use replog_repair::RepairState;
use replog_storage::bugs::{self, InjectedBug};
use replog_storage::{LogStorage, LogUpdate, ReplicaStatus};
use tracing::{info, warn};

use super::ReplicaCore;
use crate::events::{CoreError, Output, Progress};

/// A ready written but not yet reported durable.
pub(super) struct UnsyncedReady {
    number: u64,
    messages: Vec<Message>,
    needs_sync: bool,
    /// Position of the snapshot this ready installed: raft-rs may count it
    /// applied only once it is persisted.
    snapshot: Option<u64>,
}

/// Bound on readies written but not yet reported persisted.
const MAX_UNSYNCED_READIES: usize = 4096;

/// True for the messages a replica sends only as a full voter.
pub(super) fn is_vote_traffic(m: &Message) -> bool {
    matches!(
        m.get_msg_type(),
        MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse
    )
}

/// Whether a ready's write must be fsynced before what depends on it
/// leaves: entries, snapshots, status and term/vote changes
/// (`must_sync`) do; a commit-index-only hard state may be lost and
/// recomputed.
fn needs_fsync(must_sync: bool, update: &LogUpdate) -> bool {
    must_sync || !update.entries.is_empty() || update.snapshot.is_some() || update.status.is_some()
}

impl<S: LogStorage> ReplicaCore<S> {
    /// True while a written ready waits for its fsync report
    /// ([`crate::Input::Persisted`]).
    pub fn awaiting_sync(&self) -> bool {
        !self.unsynced.is_empty()
    }

    /// Whether the next [`Self::drive`] may write and fsync a small ready in
    /// one storage call instead of emitting [`Output::Sync`]: the runtime
    /// allows it when no other input is queued, so that a lone append does
    /// not wait for two thread hand-offs to and from a sync thread, while
    /// a busy replica keeps batching many appends into one fsync there.
    pub fn allow_inline_sync(&mut self, allowed: bool) {
        self.inline_sync = allowed;
    }

    /// Starts a turn of the runtime (before its inputs are stepped): the
    /// storage's budget of reads for sends to followers is whole again
    /// ([`LogStorage::begin_fetch_turn`]), and the sends it refused in
    /// earlier turns are retried (`RawNode::on_entries_fetched`) while the
    /// budget lasts. A follower catching up a large log is thus fed a
    /// budget's worth per turn, and the requests queued between turns are
    /// served in between, instead of one turn reading up to
    /// `max_inflight_msgs * max_bytes_per_msg`. Each retry either spends
    /// budget or is dropped (leadership or the follower gone), so this
    /// loop ends; the retried sends come out of the next [`Self::drive`].
    pub fn begin_turn(&mut self) {
        self.storage.begin_fetch_turn();
        for _ in 0..self.storage.deferred_fetches() {
            let Some(context) = self.storage.next_deferred_fetch() else {
                break;
            };
            self.node.on_entries_fetched(context);
        }
    }

    /// True while sends to followers wait for a later turn's budget (see
    /// [`Self::begin_turn`]): the runtime then runs another turn soon,
    /// without waiting for a message or a tick.
    pub fn has_deferred_fetches(&self) -> bool {
        self.storage.deferred_fetches() > 0
    }

    /// Writes the commit-index/applied update that waits for a later
    /// ready's write (see `deferred`), if any, without an fsync. The runtime
    /// calls it now and then (every tick) and before it stops, so that the
    /// recorded commit index stays close to the real one.
    pub fn flush_deferred(&mut self) -> Result<(), CoreError> {
        if let Some(update) = self.deferred.take() {
            assert!(
                update.only_commit_and_applied() && !update.sync,
                "a deferred update holds a commit index and an applied position only"
            );
            self.storage.write(update)?;
        }
        Ok(())
    }

    /// Processes everything raft-rs has ready: writes, applies, and emits
    /// outputs. Returns the log's progress afterwards.
    pub fn drive(&mut self, out: &mut Vec<Output>) -> Result<Progress, CoreError> {
        if self.ticks == 0 && self.status != ReplicaStatus::Voting {
            // Start the recover protocol at once rather than a round later.
            self.ticks = 1;
            self.broadcast_recover(out);
        }
        while self.node.has_ready() {
            self.handle_ready(out)?;
        }
        self.note_role_change(out);
        Ok(self.progress())
    }

    /// Readies up to `ready_number` are durable; readies after them that
    /// needed no fsync ride along. Their persisted messages leave now.
    pub(super) fn on_persisted(&mut self, ready_number: u64, out: &mut Vec<Output>) {
        let mut done = None;
        let mut snapshot = None;
        while let Some(front) = self.unsynced.front() {
            if front.number > ready_number && front.needs_sync {
                break;
            }
            let r = self.unsynced.pop_front().expect("front exists");
            assert!(
                done.is_none_or(|d| d < r.number),
                "readies are persisted in order"
            );
            if !r.messages.is_empty() {
                out.push(Output::Send(r.messages));
            }
            done = Some(r.number);
            snapshot = r.snapshot.or(snapshot);
        }
        if let Some(n) = done {
            self.node.on_persist_ready(n);
        }
        if let Some(index) = snapshot {
            if index > self.node.raft.raft_log.applied {
                self.node.advance_apply_to(index);
            }
        }
    }

    fn handle_ready(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        let mut rd = self.node.ready();
        // Messages that may leave before the fsync (a leader's appends) go
        // out only when the runtime executes the outputs, after `drive`: a
        // ready with any must not hold them back behind an inline fsync.
        let sends_before_sync = !rd.messages().is_empty();
        let snapshots_sent = self.send_before_sync(&mut rd, out);
        self.report_read_states(&rd, out);
        let (mut update, installed) = self.take_writes(&mut rd);
        let committed = rd.take_committed_entries();
        self.apply(&committed, &mut update, out)?;
        let needs_sync = needs_fsync(rd.must_sync(), &update)
            && !(bugs::active(self.config.injected_bug, InjectedBug::VoteNotPersisted)
                && update.entries.is_empty()
                && update.snapshot.is_none()
                && update.status.is_none());
        if let Some(index) = installed {
            // The snapshot's position counts as applied: a held (older)
            // applied position must not be written with it, or the replica
            // would restart with applied < snapshot position, which raft-rs
            // refuses.
            update.applied = Some(index);
        }
        if let Some(e) = committed.last() {
            update.applied = Some(e.index);
        }
        self.merge_deferred(&mut update);
        assert!(
            installed.is_none_or(|index| update.applied >= Some(index)),
            "a snapshot is written with an applied position at or past it"
        );
        let inline =
            needs_sync && self.may_sync_inline(sends_before_sync, installed.is_some(), &update);
        update.sync = inline;
        let pretend_persisted = needs_sync && !inline && self.pretends_durable(&update);
        let inline = inline || pretend_persisted;
        let status_before = self.status;
        self.write_update(update, needs_sync, out)?;
        let number = rd.number();
        let persisted_msgs = self.take_persisted_messages(&mut rd, status_before, out);
        self.node.advance_append_async(rd);
        if let Some(e) = committed.last() {
            self.applied = e.index;
            self.node.advance_apply_to(e.index);
        }
        // Snapshots carry no data here (the log's positions are its state):
        // report them delivered; a lost one shows as a rejected append and
        // is sent again.
        for to in snapshots_sent {
            self.node.report_snapshot(to, SnapshotStatus::Finish);
        }
        if (needs_sync && !inline) || !self.unsynced.is_empty() {
            self.wait_for_sync(number, persisted_msgs, needs_sync, installed, out);
        } else {
            if !persisted_msgs.is_empty() {
                out.push(Output::Send(persisted_msgs));
            }
            self.node.on_persist_ready(number);
        }
        Ok(())
    }

    /// Emits the ready's messages that may leave before its fsync; returns
    /// the replicas a snapshot is sent to.
    fn send_before_sync(&mut self, rd: &mut Ready, out: &mut Vec<Output>) -> Vec<u64> {
        if rd.messages().is_empty() {
            return Vec::new();
        }
        let msgs = rd.take_messages();
        self.assert_votes_only_when_voting_in(&msgs, self.status);
        let snapshots_sent = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        out.push(Output::Send(msgs));
        snapshots_sent
    }

    fn report_read_states(&self, rd: &Ready, out: &mut Vec<Output>) {
        for rs in rd.read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                out.push(Output::ReadReady {
                    id: u64::from_be_bytes(b),
                    index: rs.index,
                });
            }
        }
    }

    /// The ready's snapshot, entries and hard state as an update; returns
    /// the position of the snapshot it installs, if any.
    fn take_writes(&mut self, rd: &mut Ready) -> (LogUpdate, Option<u64>) {
        let mut update = LogUpdate::default();
        let mut installed: Option<(u64, ConfState)> = None;
        if !rd.snapshot().is_empty() {
            let md = rd.snapshot().get_metadata();
            update.snapshot = Some((md.index, md.term));
            update.conf_state = Some(md.get_conf_state().clone());
            self.adopt_snapshot_repair_state(&rd.snapshot().data, &mut update);
            installed = Some((md.index, md.get_conf_state().clone()));
            info!(
                replica = self.id,
                index = md.index,
                term = md.term,
                "installing a snapshot"
            );
        }
        update.entries = rd.take_entries();
        if let Some(hs) = rd.hs() {
            update.hard_state = Some(hs.clone());
        }
        if let Some((index, cs)) = &installed {
            self.applied = *index;
            self.note_own_membership(cs, false, None, &mut update);
        }
        (update, installed.map(|(index, _)| index))
    }

    /// A snapshot carries its sender's repair state, folded through a
    /// position at or past the snapshot's (the sender applied further): it
    /// replaces this replica's when it is further along; the entries after
    /// the snapshot then skip the records it already holds. An undecodable
    /// one is ignored (logged): this replica keeps its own.
    fn adopt_snapshot_repair_state(&mut self, data: &[u8], update: &mut LogUpdate) {
        if data.is_empty() {
            return;
        }
        match RepairState::decode(data) {
            Ok(state) if state.applied_through > self.repair.applied_through => {
                update.repair_state = Some(data.to_vec());
                self.repair = state;
            }
            Ok(_) => {}
            Err(why) => {
                warn!(replica = self.id, %why, "a snapshot's repair state is unreadable; kept this replica's")
            }
        }
    }

    /// An earlier ready's deferred update goes first, within this write
    /// (this one's fields are newer).
    fn merge_deferred(&mut self, update: &mut LogUpdate) {
        if let Some(d) = self.deferred.take() {
            if update.hard_state.is_none() {
                update.hard_state = d.hard_state;
            }
            update.applied = update.applied.max(d.applied);
        }
    }

    /// Inline only when allowed, no earlier ready waits for its fsync
    /// (persisted reports stay in order), nothing is to be sent before the
    /// fsync, there is no snapshot to report, and the ready is small.
    fn may_sync_inline(&self, sends_before_sync: bool, installs: bool, update: &LogUpdate) -> bool {
        self.inline_sync
            && !sends_before_sync
            && self.unsynced.is_empty()
            && !installs
            && update.entries.len() <= self.config.inline_sync_max_entries
    }

    /// Writes the update (a commit-index/applied-only one is deferred) and
    /// takes the status it carries.
    fn write_update(
        &mut self,
        update: LogUpdate,
        needs_sync: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), CoreError> {
        let new_status = update.status;
        if !needs_sync && update.only_commit_and_applied() {
            if !update.is_empty() {
                self.deferred = Some(update);
            }
        } else {
            self.storage.write(update)?;
        }
        if let Some(status) = new_status {
            info!(replica = self.id, from = %self.status, to = %status, "replica status changed");
            self.status = status;
            out.push(Output::StatusChanged { status });
        }
        Ok(())
    }

    /// The ready's persisted messages, but for heartbeat responses, which
    /// leave now: raft-rs files every message of a non-leader as
    /// "persisted", yet a heartbeat response promises nothing about this
    /// replica's log or vote (etcd's raft sends it at once too). Held
    /// behind a slow fsync (a VM disk stalls for hundreds of ms), it made a
    /// live follower look dead to its leader's quorum check, which then
    /// deposed the leader.
    fn take_persisted_messages(
        &mut self,
        rd: &mut Ready,
        status_before: ReplicaStatus,
        out: &mut Vec<Output>,
    ) -> Vec<Message> {
        let persisted_msgs = rd.take_persisted_messages();
        // The status this ready was produced under (a promotion in this
        // ready cannot have produced its vote messages).
        self.assert_votes_only_when_voting_in(&persisted_msgs, status_before);
        let (heartbeat_responses, persisted_msgs): (Vec<Message>, Vec<Message>) = persisted_msgs
            .into_iter()
            .partition(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse);
        if !heartbeat_responses.is_empty() {
            out.push(Output::Send(heartbeat_responses));
        }
        persisted_msgs
    }

    /// Queues ready `number` until its fsync (or an earlier one's) is
    /// reported, asking for the fsync when it needs one.
    fn wait_for_sync(
        &mut self,
        number: u64,
        messages: Vec<Message>,
        needs_sync: bool,
        snapshot: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        assert!(
            self.unsynced.len() < MAX_UNSYNCED_READIES,
            "runtime stopped reporting syncs"
        );
        assert!(
            self.unsynced.back().is_none_or(|r| r.number < number),
            "readies are queued in order"
        );
        self.unsynced.push_back(UnsyncedReady {
            number,
            messages,
            needs_sync,
            snapshot,
        });
        if needs_sync {
            out.push(Output::Sync {
                ready_number: number,
            });
        }
    }

    /// Asserts the rejoin rule's other half on outgoing messages produced
    /// under `status`: a replica that is not VOTING never campaigns and
    /// never answers a vote.
    fn assert_votes_only_when_voting_in(&self, msgs: &[Message], status: ReplicaStatus) {
        if let Some(m) = msgs.iter().find(|m| is_vote_traffic(m)) {
            assert!(
                status == ReplicaStatus::Voting,
                "replica {} in status {status} sends {:?} to {}",
                self.id,
                m.get_msg_type(),
                m.to
            );
        }
    }

    /// Whether an injected bug treats a ready that needs an fsync as
    /// durable without one (the leader's own entries, or a follower's
    /// answers). Always false in a product build.
    fn pretends_durable(&self, update: &LogUpdate) -> bool {
        let bug = if self.node.raft.state == StateRole::Leader {
            InjectedBug::AckBeforeFsync
        } else {
            InjectedBug::FollowerAnswersBeforeFsync
        };
        bugs::active(self.config.injected_bug, bug) && update.snapshot.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, HardState};

    /// Which writes need an fsync before what depends on them leaves.
    #[test]
    fn which_writes_need_an_fsync_as_a_table() {
        let entries = LogUpdate {
            entries: vec![Entry::default()],
            ..Default::default()
        };
        let snapshot = LogUpdate {
            snapshot: Some((5, 1)),
            ..Default::default()
        };
        let status = LogUpdate {
            status: Some(ReplicaStatus::Voting),
            ..Default::default()
        };
        let commit_only = LogUpdate {
            hard_state: Some(HardState {
                commit: 9,
                ..Default::default()
            }),
            applied: Some(9),
            ..Default::default()
        };
        #[rustfmt::skip]
        let rows: [(&str, bool, &LogUpdate, bool); 6] = [
            ("new entries",                          false, &entries,     true),
            ("a snapshot",                           false, &snapshot,    true),
            ("a status change",                      false, &status,      true),
            ("a term or vote change (must_sync)",    true,  &commit_only, true),
            ("a commit index and applied position",  false, &commit_only, false),
            ("nothing",                              false, &LogUpdate::default(), false),
        ];
        for (what, must_sync, update, want) in rows {
            assert_eq!(needs_fsync(must_sync, update), want, "{what}");
        }
    }

    #[test]
    fn vote_traffic_is_votes_and_pre_votes_both_ways() {
        use MessageType::*;
        for (kind, want) in [
            (MsgRequestVote, true),
            (MsgRequestVoteResponse, true),
            (MsgRequestPreVote, true),
            (MsgRequestPreVoteResponse, true),
            (MsgAppend, false),
            (MsgHeartbeatResponse, false),
            (MsgTimeoutNow, false),
        ] {
            let mut m = Message::default();
            m.set_msg_type(kind);
            assert_eq!(is_vote_traffic(&m), want, "{kind:?}");
        }
    }
}
