//! Membership: the changes an operator asks for, which of them the leader
//! refuses and why ([`check_membership_change`]), the raft-rs change it
//! proposes ([`conf_change`]), and what a RECOVERING replica makes of a
//! membership it applied ([`judge_own_membership`], the rejoin rule).
//!
//! Invariants:
//! - a change is proposed only on the leader, never while another change is
//!   pending or the cluster is in a joint configuration (raft-rs would drop
//!   it, or, for a joint change, refuse it when it is applied);
//! - the leader never removes or demotes itself, and no change leaves the
//!   cluster without a voter;
//! - a RECOVERING replica turns VOTING only on the applied promotion entry
//!   that names it and its current incarnation.

use std::collections::BTreeSet;

use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
};
use raft::StateRole;
use replog_storage::bugs::InjectedBug;
use replog_storage::LogStorage;
use replog_storage::{
    bugs, encode_membership_context, Member, MembershipContext, Promotion, ReplicaStatus,
};
use tracing::{debug, info};

use super::{not_leader, PendingKind, ReplicaCore};
use crate::events::{MembershipChange, Output, ProposalError, ProposalId};
use replog_storage::LogUpdate;

pub(super) fn is_learner(cs: &ConfState, id: u64) -> bool {
    cs.learners.contains(&id) || cs.learners_next.contains(&id)
}

pub(super) fn is_voter(cs: &ConfState, id: u64) -> bool {
    cs.voters.contains(&id) || cs.voters_outgoing.contains(&id)
}

/// A membership of `voters` and `learners` (for table tests).
#[cfg(test)]
pub(super) fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
        ..Default::default()
    }
}

/// Why the leader `me` refuses `changes` to membership `conf`
/// (`change_pending`: raft-rs has a membership entry not yet applied), or
/// `Ok` when it may propose them. A refusal is
/// [`ProposalError::MembershipInProgress`] when the same request may
/// succeed later, [`ProposalError::Membership`] when it never will.
pub(super) fn check_membership_change(
    me: u64,
    conf: &ConfState,
    change_pending: bool,
    changes: &[MembershipChange],
) -> Result<(), ProposalError> {
    let never = |why: String| Err(ProposalError::Membership(why));
    let later = |why: &str| Err(ProposalError::MembershipInProgress(why.into()));
    if changes.is_empty() {
        return never("no change given".into());
    }
    if change_pending {
        return later("another membership change is in progress");
    }
    if !conf.voters_outgoing.is_empty() {
        return later("the cluster is leaving a joint configuration");
    }
    if changes.iter().any(
        |c| matches!(c, MembershipChange::Remove(r) | MembershipChange::AddLearner(r) if *r == me),
    ) {
        return never(format!(
            "replica {me} is the leader: transfer leadership to another voter first \
             (replog members transfer-leader), then remove or demote it"
        ));
    }
    let mut voters: BTreeSet<u64> = conf.voters.iter().copied().collect();
    let mut seen = BTreeSet::new();
    for c in changes {
        let (MembershipChange::AddVoter(r)
        | MembershipChange::AddLearner(r)
        | MembershipChange::Remove(r)) = *c;
        if r == 0 || !seen.insert(r) {
            return never(format!("replica id {r} is zero or changed twice"));
        }
        match c {
            MembershipChange::AddVoter(r) => {
                voters.insert(*r);
            }
            MembershipChange::AddLearner(r) | MembershipChange::Remove(r) => {
                voters.remove(r);
            }
        }
        if matches!(c, MembershipChange::Remove(r) if !is_voter(conf, *r) && !is_learner(conf, *r))
        {
            return never(format!("replica {r} is not a member"));
        }
    }
    if voters.is_empty() {
        return never("the change would leave no voter".into());
    }
    Ok(())
}

/// The raft-rs change for `changes` (joint consensus when more than one
/// voter changes; left automatically), carrying `context` when it holds
/// anything (addresses or a promotion).
pub(super) fn conf_change(
    changes: &[MembershipChange],
    context: MembershipContext,
) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    if !context.addresses.is_empty() || context.promotion.is_some() {
        cc.context = encode_membership_context(&context).into();
    }
    cc.set_transition(ConfChangeTransition::Auto);
    let singles: Vec<ConfChangeSingle> = changes
        .iter()
        .map(|c| {
            let (t, id) = match *c {
                MembershipChange::AddVoter(id) => (ConfChangeType::AddNode, id),
                MembershipChange::AddLearner(id) => (ConfChangeType::AddLearnerNode, id),
                MembershipChange::Remove(id) => (ConfChangeType::RemoveNode, id),
            };
            let mut s = ConfChangeSingle::default();
            s.set_change_type(t);
            s.node_id = id;
            s
        })
        .collect();
    cc.set_changes(singles.into());
    cc
}

/// What a RECOVERING replica makes of a membership it now has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnMembership {
    /// Its own promotion, in this incarnation: persist VOTING.
    TurnVoting,
    /// A learner: it catches up and waits for its promotion.
    Learner,
    /// A voter by an entry that is not its own promotion (an earlier
    /// incarnation's promotion replayed, an unnamed or another replica's
    /// promotion): stays RECOVERING; the leader demotes it on its next
    /// recover request and promotes it anew.
    UntrustedVoter,
    /// A voter by a snapshot's membership: stays RECOVERING, and takes a
    /// new incarnation, since the promotion of its current one may be among
    /// the compacted entries, and the leader would then take its recover
    /// requests for stale ones and never demote it.
    VoterBySnapshot,
    /// Not a member at all.
    NotMember,
}

/// The rejoin rule as a pure decision: replica `id`, RECOVERING in
/// `incarnation`, now has membership `cs`, from an applied entry naming
/// `promotion` or (`from_entry == false`) from a snapshot.
pub(super) fn judge_own_membership(
    id: u64,
    incarnation: u64,
    cs: &ConfState,
    from_entry: bool,
    promotion: Option<Promotion>,
) -> OwnMembership {
    let own = Promotion {
        replica_id: id,
        incarnation,
    };
    if is_learner(cs, id) {
        OwnMembership::Learner
    } else if !is_voter(cs, id) {
        OwnMembership::NotMember
    } else if !from_entry {
        OwnMembership::VoterBySnapshot
    } else if promotion == Some(own) {
        OwnMembership::TurnVoting
    } else {
        OwnMembership::UntrustedVoter
    }
}

impl<S: LogStorage> ReplicaCore<S> {
    /// Proposes an operator's membership change, or refuses it (see
    /// [`check_membership_change`]). `addresses` ride in the entry's
    /// context, so every replica learns where added members listen.
    pub(super) fn change_membership(
        &mut self,
        id: ProposalId,
        changes: &[MembershipChange],
        addresses: &[Member],
        out: &mut Vec<Output>,
    ) {
        let raft = &self.node.raft;
        if let Some(refusal) = not_leader(raft, id) {
            out.push(refusal);
            return;
        }
        let conf = raft.prs().conf().to_conf_state();
        if let Err(error) =
            check_membership_change(self.id, &conf, raft.has_pending_conf(), changes)
        {
            out.push(Output::Failed { id, error });
            return;
        }
        let term = raft.term;
        let context = MembershipContext {
            addresses: addresses.to_vec(),
            promotion: None,
        };
        let cc = conf_change(changes, context);
        let r = self.node.propose_conf_change(Vec::new(), cc);
        self.note_proposal(id, term, PendingKind::Membership, r, out);
    }

    /// While RECOVERING: acts on a membership this replica now has, from an
    /// applied entry (with the promotion it names, if any) or from an
    /// installed snapshot (`from_entry == false`; a snapshot's membership
    /// never promotes: it may be older than what this replica applied, and
    /// it names no incarnation). See [`judge_own_membership`].
    pub(super) fn note_own_membership(
        &mut self,
        cs: &ConfState,
        from_entry: bool,
        promotion: Option<Promotion>,
        update: &mut LogUpdate,
    ) {
        if self.status != ReplicaStatus::Recovering {
            return;
        }
        let mut verdict =
            judge_own_membership(self.id, self.incarnation, cs, from_entry, promotion);
        if bugs::active(self.config.injected_bug, InjectedBug::EarlyVoting)
            && from_entry
            && is_voter(cs, self.id)
            && self.seen_as_learner
        {
            verdict = OwnMembership::TurnVoting;
        }
        match verdict {
            OwnMembership::TurnVoting => {
                self.assert_own_promotion(cs, from_entry, promotion);
                info!(
                    replica = self.id,
                    incarnation = self.incarnation,
                    "promoted to voter in this incarnation after catching up"
                );
                update.status = Some(ReplicaStatus::Voting);
            }
            OwnMembership::Learner => self.seen_as_learner = true,
            OwnMembership::UntrustedVoter => {
                debug!(
                    replica = self.id,
                    incarnation = self.incarnation,
                    "a voter by an entry that is not this incarnation's promotion; still RECOVERING"
                );
                self.seen_as_learner = false;
            }
            OwnMembership::VoterBySnapshot => {
                self.incarnation = self.incarnation.wrapping_add(1);
                debug!(
                    replica = self.id,
                    incarnation = self.incarnation,
                    "a voter by a snapshot: new incarnation, to be demoted"
                );
                self.seen_as_learner = false;
            }
            OwnMembership::NotMember => self.seen_as_learner = false,
        }
    }

    /// The rejoin rule, asserted where the status turns VOTING.
    fn assert_own_promotion(&self, cs: &ConfState, from_entry: bool, promotion: Option<Promotion>) {
        assert!(
            is_voter(cs, self.id) && from_entry,
            "replica {} turns VOTING only by applying its promotion",
            self.id
        );
        assert!(
            promotion
                == Some(Promotion {
                    replica_id: self.id,
                    incarnation: self.incarnation
                })
                || bugs::active(self.config.injected_bug, InjectedBug::EarlyVoting),
            "replica {} turns VOTING only on the promotion of its incarnation {} (got {promotion:?})",
            self.id,
            self.incarnation
        );
    }

    /// Steps this leader down when an applied change (proposed by an
    /// earlier leader) removed or demoted it: raft-rs would keep leading
    /// without a progress of its own, and panic on the next commit.
    pub(super) fn step_down_unless_voter(&mut self, cs: &ConfState) {
        if self.node.raft.state == StateRole::Leader && !is_voter(cs, self.id) {
            let term = self.node.raft.term;
            tracing::warn!(
                replica = self.id,
                term,
                "this leader is no longer a voter; stepping down"
            );
            self.node.raft.become_follower(term + 1, raft::INVALID_ID);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MembershipChange::{AddLearner, AddVoter, Remove};

    /// Every refusal of a membership change, and what passes: leader 1 of
    /// voters {1, 2, 3} and learner 4.
    #[test]
    fn which_membership_changes_the_leader_refuses_as_a_table() {
        let members = conf(&[1, 2, 3], &[4]);
        let alone = conf(&[1], &[]);
        let mut joint = conf(&[1, 2, 5], &[]);
        joint.voters_outgoing = vec![1, 2, 3];
        let never = |s: &str| Some(("never", s.to_string()));
        let later = |s: &str| Some(("later", s.to_string()));
        type Row<'a> = (
            &'a str,
            &'a ConfState,
            bool,
            Vec<MembershipChange>,
            Option<(&'a str, String)>,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("nothing asked",               &members, false, vec![],                       never("no change given")),
            ("another change pending",      &members, true,  vec![AddVoter(5)],            later("another membership change is in progress")),
            ("empty, with a change pending", &members, true, vec![],                       never("no change given")),
            ("joint configuration",         &joint,   false, vec![AddVoter(6)],            later("the cluster is leaving a joint configuration")),
            ("the leader removes itself",   &members, false, vec![Remove(1)],              never("replica 1 is the leader")),
            ("the leader demotes itself",   &members, false, vec![AddLearner(1)],          never("replica 1 is the leader")),
            ("replica id zero",             &members, false, vec![AddVoter(0)],            never("replica id 0 is zero or changed twice")),
            ("one replica changed twice",   &members, false, vec![AddVoter(5), Remove(5)], never("replica id 5 is zero or changed twice")),
            ("removing a stranger",         &members, false, vec![Remove(9)],              never("replica 9 is not a member")),
            ("no voter left",               &alone, false, vec![AddVoter(1), Remove(1)], never("replica 1 is the leader")),
            ("add a voter",                 &members, false, vec![AddVoter(5)],            None),
            ("promote a learner",           &members, false, vec![AddVoter(4)],            None),
            ("demote a follower",           &members, false, vec![AddLearner(2)],          None),
            ("remove a learner",            &members, false, vec![Remove(4)],              None),
            ("a joint change",              &members, false, vec![Remove(2), AddVoter(5)], None),
            ("re-adding a voter is allowed", &members, false, vec![AddVoter(2)],           None),
        ];
        for (what, cs, pending, changes, want) in rows {
            let got = check_membership_change(1, cs, pending, &changes);
            match (got, want) {
                (Ok(()), None) => {}
                (Err(ProposalError::Membership(why)), Some(("never", w))) => {
                    assert!(why.starts_with(&w), "{what}: {why}")
                }
                (Err(ProposalError::MembershipInProgress(why)), Some(("later", w))) => {
                    assert_eq!(why, w, "{what}")
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// The one refusal no leader can reach through the checks above (it
    /// cannot remove itself): a change that leaves no voter.
    #[test]
    fn a_change_that_leaves_no_voter_is_refused() {
        // Replica 9 leads by itself after being removed from `conf` by an
        // entry it has not applied yet; voters {2}.
        let got = check_membership_change(9, &conf(&[2], &[]), false, &[Remove(2)]);
        assert_eq!(
            got,
            Err(ProposalError::Membership(
                "the change would leave no voter".into()
            ))
        );
    }

    #[test]
    fn a_joint_change_names_every_single_change() {
        let cc = conf_change(
            &[AddVoter(5), AddLearner(2), Remove(4)],
            MembershipContext::default(),
        );
        assert!(cc.context.is_empty(), "an empty context is not written");
        assert_eq!(cc.get_transition(), ConfChangeTransition::Auto);
        let got: Vec<(ConfChangeType, u64)> = cc
            .get_changes()
            .iter()
            .map(|s| (s.get_change_type(), s.node_id))
            .collect();
        assert_eq!(
            got,
            vec![
                (ConfChangeType::AddNode, 5),
                (ConfChangeType::AddLearnerNode, 2),
                (ConfChangeType::RemoveNode, 4)
            ]
        );
    }

    #[test]
    fn members_of_a_joint_configuration_count_on_both_sides() {
        let mut cs = conf(&[1, 2], &[3]);
        cs.voters_outgoing = vec![4];
        cs.learners_next = vec![5];
        for (id, voter, learner) in [
            (1, true, false),
            (4, true, false),
            (3, false, true),
            (5, false, true),
            (6, false, false),
        ] {
            assert_eq!(
                (is_voter(&cs, id), is_learner(&cs, id)),
                (voter, learner),
                "{id}"
            );
        }
    }

    /// Every row of the rejoin rule: replica 3, RECOVERING in incarnation 7.
    #[test]
    fn the_rejoin_rule_as_a_table() {
        use OwnMembership::*;
        let own = Some(Promotion {
            replica_id: 3,
            incarnation: 7,
        });
        let older = Some(Promotion {
            replica_id: 3,
            incarnation: 6,
        });
        let other = Some(Promotion {
            replica_id: 2,
            incarnation: 7,
        });
        let voter = conf(&[1, 2, 3], &[]);
        let learner = conf(&[1, 2], &[3]);
        let gone = conf(&[1, 2], &[]);
        #[rustfmt::skip]
        let rows: [(&str, &ConfState, bool, Option<Promotion>, OwnMembership); 9] = [
            ("its promotion in this incarnation",        &voter,   true,  own,   TurnVoting),
            ("a promotion of an earlier incarnation",    &voter,   true,  older, UntrustedVoter),
            ("another replica's promotion",              &voter,   true,  other, UntrustedVoter),
            ("an unnamed promotion (operator, old log)", &voter,   true,  None,  UntrustedVoter),
            ("a snapshot that makes it a voter",         &voter,   false, None,  VoterBySnapshot),
            ("a snapshot, even naming it",               &voter,   false, own,   VoterBySnapshot),
            ("its demotion",                             &learner, true,  None,  Learner),
            ("a snapshot as a learner",                  &learner, false, None,  Learner),
            ("a removal",                                &gone,    true,  None,  NotMember),
        ];
        for (what, cs, from_entry, promotion, want) in rows {
            assert_eq!(
                judge_own_membership(3, 7, cs, from_entry, promotion),
                want,
                "{what}"
            );
        }
    }
}
