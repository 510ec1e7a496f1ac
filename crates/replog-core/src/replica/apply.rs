//! Apply: what committed entries do to this replica. A membership entry
//! changes raft-rs's configuration (and may promote this replica, see
//! [`super::membership`]); the leader's first entry of its term lets its
//! writer start; a truncation compacts the log; every entry settles the
//! proposal waiting at its position.
//!
//! Invariants:
//! - entries are applied once, in order (asserted);
//! - the effects of applied entries (compaction, membership, addresses,
//!   status) go into the ready's [`LogUpdate`], written in one batch with
//!   the applied position that covers them, so a crash never applies an
//!   entry twice;
//! - a proposal is reported committed only when the entry at its position
//!   is of its term (else another leader's entry replaced it).

use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType};
use raft::StateRole;
use replog_repair::state::Applied;
use replog_storage::{decode_membership_context, LogStorage, LogUpdate, Promotion};
use tracing::{info, warn};

use super::{PendingKind, ReplicaCore};
use crate::command::{classify, Command, EntryContent};
use crate::events::{CoreError, Output, ProposalError};

impl<S: LogStorage> ReplicaCore<S> {
    /// Applies `committed` (in order) into `update`, emitting outcomes.
    pub(super) fn apply(
        &mut self,
        committed: &[Entry],
        update: &mut LogUpdate,
        out: &mut Vec<Output>,
    ) -> Result<(), CoreError> {
        for e in committed {
            assert!(
                e.index > self.applied || self.applied == 0,
                "entry {} applied twice",
                e.index
            );
            let membership_applied = match e.get_entry_type() {
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_membership(e, update, out)?
                }
                EntryType::EntryNormal => {
                    self.apply_normal(e, update);
                    false
                }
            };
            self.settle_proposal(e, membership_applied, out);
        }
        if let Some(to) = update.compact_to {
            let first = self.storage.meta().snapshot_index + 1;
            if to > first {
                out.push(Output::Truncated { first_index: to });
            }
        }
        Ok(())
    }

    /// Applies a membership entry; false when raft-rs refused it (every
    /// replica refuses the same entry the same way).
    fn apply_membership(
        &mut self,
        e: &Entry,
        update: &mut LogUpdate,
        out: &mut Vec<Output>,
    ) -> Result<bool, CoreError> {
        let mut promotion = None;
        let cs = if e.get_entry_type() == EntryType::EntryConfChange {
            let cc: ConfChange =
                protobuf::Message::parse_from_bytes(&e.data).map_err(raft::Error::CodecError)?;
            self.node.apply_conf_change(&cc)
        } else {
            let cc: ConfChangeV2 =
                protobuf::Message::parse_from_bytes(&e.data).map_err(raft::Error::CodecError)?;
            promotion = self.read_membership_context(e.index, &cc.context, update, out);
            self.node.apply_conf_change(&cc)
        };
        let cs = match cs {
            Ok(cs) => cs,
            Err(err) => {
                warn!(position = e.index, error = %err, "membership change refused by raft; skipped");
                return Ok(false);
            }
        };
        info!(replica = self.id, position = e.index, voters = ?cs.voters,
              learners = ?cs.learners, outgoing = ?cs.voters_outgoing,
              "membership changed");
        self.step_down_unless_voter(&cs);
        self.note_membership(e.index, cs, promotion, update);
        Ok(true)
    }

    /// The addresses (recorded and reported) and the promotion a membership
    /// entry's context carries. An undecodable context is logged and
    /// ignored: the change itself is raft-rs's and still applies.
    fn read_membership_context(
        &mut self,
        position: u64,
        context: &[u8],
        update: &mut LogUpdate,
        out: &mut Vec<Output>,
    ) -> Option<Promotion> {
        if context.is_empty() {
            return None;
        }
        let Some(context) = decode_membership_context(context) else {
            warn!(position, "membership change with an undecodable context");
            return None;
        };
        if !context.addresses.is_empty() {
            update
                .member_addresses
                .extend(context.addresses.iter().cloned());
            out.push(Output::Addresses(context.addresses));
        }
        context.promotion
    }

    /// Records an applied membership `cs` at `position`: the incarnation its
    /// promotion named, this replica's own verdict, and the history entry.
    fn note_membership(
        &mut self,
        position: u64,
        cs: ConfState,
        promotion: Option<Promotion>,
        update: &mut LogUpdate,
    ) {
        if let Some(p) = promotion {
            self.promoted_incarnations
                .insert(p.replica_id, p.incarnation);
        }
        self.note_own_membership(&cs, true, promotion, update);
        update.conf_changes.push((position, cs));
    }

    fn apply_normal(&mut self, e: &Entry, update: &mut LogUpdate) {
        match classify(e) {
            Ok(EntryContent::LeaderNoop) => {
                if self.node.raft.state == StateRole::Leader && e.term == self.node.raft.term {
                    self.leader_ready = true;
                    info!(
                        replica = self.id,
                        term = e.term,
                        position = e.index,
                        "leader's entry of its term is committed; writer may start"
                    );
                }
            }
            Ok(EntryContent::Command(Command::Truncate(to))) => {
                let to = to.min(e.index);
                let cur = update.compact_to.unwrap_or(0);
                update.compact_to = Some(cur.max(to));
            }
            Ok(EntryContent::Command(Command::Repair(bytes))) => {
                self.apply_repair(e.index, &bytes, update);
            }
            Ok(EntryContent::Command(Command::Append(_))) | Ok(EntryContent::Membership) => {}
            Err(bad) => warn!(%bad, "skipping an entry that holds no valid command"),
        }
    }

    /// Folds the repair record at `position` into the repair state; the
    /// new state rides in the update with the applied position covering it.
    /// A refused record changes the state too (its history and refusal
    /// count): every replica refuses it alike.
    fn apply_repair(&mut self, position: u64, bytes: &[u8], update: &mut LogUpdate) {
        match self.repair.apply_entry(position, bytes) {
            Applied::Skipped => return,
            Applied::Changed => {}
            Applied::Refused(why) => {
                warn!(replica = self.id, position, %why, "repair record refused");
            }
        }
        debug_assert_eq!(self.repair.applied_through, position);
        update.repair_state = Some(self.repair.encode());
    }

    /// Reports the outcome of the proposal waiting at `e`'s position, if
    /// any.
    fn settle_proposal(&mut self, e: &Entry, membership_applied: bool, out: &mut Vec<Output>) {
        let Some(p) = self.pending.remove(&e.index) else {
            return;
        };
        let outcome = if p.term != e.term {
            Err(ProposalError::LeadershipLost { term: p.term })
        } else if p.kind == PendingKind::Membership && !membership_applied {
            Err(ProposalError::MembershipInProgress(
                "raft refused it, another change was pending".into(),
            ))
        } else {
            Ok(())
        };
        out.push(match outcome {
            Ok(()) => Output::Committed {
                id: p.id,
                position: e.index,
            },
            Err(error) => Output::Failed { id: p.id, error },
        });
    }
}
