//! Replica states and the recover protocol (Mesos semantics, Raft
//! mechanics): what a replica that is not VOTING asks its peers, what its
//! status becomes given their answers ([`decide_recovery_step`]), and what
//! the leader makes of a recover request ([`classify_requester`],
//! [`leader_action`]) and of a caught-up learner ([`choose_promotion`]).
//!
//! Invariants:
//! - a status change decided here is written and synced before the core
//!   acts on it (`set_status`, `auto_initialize`);
//! - EMPTY turns STARTING only when every configured replica answered EMPTY
//!   or STARTING, and STARTING turns VOTING only when every one answered
//!   STARTING or VOTING (Mesos' two-phase rule), so a replica that merely
//!   lost its disk never founds a second log;
//! - the leader demotes a voter only outside a pending or joint change, and
//!   never on a request its sender sent before the promotion it applied;
//! - a promotion names the incarnation the learner announced, or none only
//!   after a grace of two recover rounds (the rejoin rule).

use std::collections::{BTreeMap, BTreeSet};

use raft::eraftpb::ConfState;
use raft::StateRole;
use replog_storage::{LogStorage, LogUpdate, MembershipContext, Promotion, ReplicaStatus};
use tracing::{debug, info, warn};

use super::membership::{conf_change, is_learner, is_voter};
use super::ReplicaCore;
use crate::events::{CoreError, MembershipChange, Output, PeerMessage};

/// What a replica that is not VOTING does with this round's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecoveryStep {
    /// Nothing yet: more answers (or the next round) may decide.
    Wait,
    /// A VOTING replica answered: the cluster is live; persist RECOVERING.
    Recover,
    /// Auto-initialization's first phase: persist STARTING.
    Start,
    /// Every replica is EMPTY and this one may not found the log: warn and
    /// start the round over.
    WarnAllEmpty,
    /// Auto-initialization's second phase: found the log, turn VOTING.
    FoundLog,
}

/// What replica `status` does given the `answers` of this round from its
/// `peers` (the other configured replicas).
pub(super) fn decide_recovery_step(
    status: ReplicaStatus,
    auto_initialize: bool,
    peers: &[u64],
    answers: &BTreeMap<u64, ReplicaStatus>,
) -> RecoveryStep {
    let all_answered = peers.iter().all(|p| answers.contains_key(p));
    let any_voting = answers.values().any(|s| *s == ReplicaStatus::Voting);
    let all_in = |ok: &[ReplicaStatus]| all_answered && answers.values().all(|s| ok.contains(s));
    match status {
        ReplicaStatus::Empty if any_voting => RecoveryStep::Recover,
        ReplicaStatus::Empty
            if auto_initialize && all_in(&[ReplicaStatus::Empty, ReplicaStatus::Starting]) =>
        {
            RecoveryStep::Start
        }
        ReplicaStatus::Empty if all_in(&[ReplicaStatus::Empty]) => RecoveryStep::WarnAllEmpty,
        ReplicaStatus::Starting if all_in(&[ReplicaStatus::Starting, ReplicaStatus::Voting]) => {
            RecoveryStep::FoundLog
        }
        _ => RecoveryStep::Wait,
    }
}

/// Who sent a recover request, as any replica judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Requester {
    /// A VOTING replica (it probes, nothing to do).
    Voting,
    /// A voter whose request carries the incarnation its applied promotion
    /// named: sent while it was a learner, delivered after its promotion.
    /// It turns VOTING when it applies that; the request is ignored.
    StaleVoter,
    /// A voter that is not VOTING: it lost its state or restarted.
    LostVoter,
    /// A learner catching up: its incarnation is what its promotion names.
    Learner,
    /// Not a member of this cluster.
    Stranger,
}

/// Judges a request from `from` in `status` and `incarnation`, given the
/// membership `conf` and the incarnation the last promotion of `from`
/// applied here named (`promoted`).
pub(super) fn classify_requester(
    status: ReplicaStatus,
    conf: &ConfState,
    from: u64,
    incarnation: u64,
    promoted: Option<u64>,
) -> Requester {
    if status == ReplicaStatus::Voting {
        Requester::Voting
    } else if is_voter(conf, from) {
        if promoted == Some(incarnation) {
            Requester::StaleVoter
        } else {
            Requester::LostVoter
        }
    } else if is_learner(conf, from) {
        Requester::Learner
    } else {
        Requester::Stranger
    }
}

/// What the leader does about a requester (`change_pending`: a
/// membership change is pending or the cluster is in a joint
/// configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaderAction {
    Nothing,
    /// Propose its demotion to learner; its promotion names the incarnation
    /// it was demoted in.
    Demote,
    /// Demote it, but only once the pending change is done (a later request).
    DemotionWaits,
    /// Tell the operator to add it.
    TellOperator,
}

pub(super) fn leader_action(requester: Requester, change_pending: bool) -> LeaderAction {
    match requester {
        Requester::LostVoter if change_pending => LeaderAction::DemotionWaits,
        Requester::LostVoter => LeaderAction::Demote,
        Requester::Stranger => LeaderAction::TellOperator,
        Requester::Voting | Requester::StaleVoter | Requester::Learner => LeaderAction::Nothing,
    }
}

/// Which caught-up learner the leader promotes, and the promotion it
/// names: the first one that announced an incarnation; else the first one
/// whose grace for announcing one is over, unnamed.
pub(super) fn choose_promotion(
    caught_up: &[u64],
    learner_incarnations: &BTreeMap<u64, u64>,
    grace_over: &BTreeSet<u64>,
) -> Option<(u64, Option<Promotion>)> {
    let named = caught_up.iter().find_map(|id| {
        learner_incarnations.get(id).map(|&incarnation| {
            let p = Promotion {
                replica_id: *id,
                incarnation,
            };
            (*id, Some(p))
        })
    });
    named.or_else(|| {
        caught_up
            .iter()
            .find(|id| grace_over.contains(id))
            .map(|id| (*id, None))
    })
}

impl<S: LogStorage> ReplicaCore<S> {
    /// Starts a round of the recover protocol.
    pub(super) fn broadcast_recover(&mut self, out: &mut Vec<Output>) {
        self.recover_responses.clear();
        let last_index = self.node.raft.raft_log.last_index();
        for &to in &self.config.peers {
            if to != self.id {
                out.push(Output::SendPeer {
                    to,
                    msg: PeerMessage::RecoverRequest {
                        status: self.status,
                        last_index,
                        incarnation: self.incarnation,
                    },
                });
            }
        }
    }

    pub(super) fn step_peer(
        &mut self,
        from: u64,
        msg: PeerMessage,
        out: &mut Vec<Output>,
    ) -> Result<(), CoreError> {
        match msg {
            PeerMessage::RecoverRequest {
                status,
                last_index,
                incarnation,
            } => {
                self.answer_recover_request(from, status, last_index, incarnation, out);
            }
            PeerMessage::RecoverResponse { status, .. } => {
                info!("Received a recover response from a replica in {status} status");
                if self.status != ReplicaStatus::Voting {
                    self.recover_responses.insert(from, status);
                    self.decide_recovery(out)?;
                }
            }
        }
        Ok(())
    }

    fn answer_recover_request(
        &mut self,
        from: u64,
        status: ReplicaStatus,
        last_index: u64,
        incarnation: u64,
        out: &mut Vec<Output>,
    ) {
        info!(
            "Replica in {} status received a broadcasted recover request from {from}",
            self.status
        );
        let conf = self.node.raft.prs().conf().to_conf_state();
        let promoted = self.promoted_incarnations.get(&from).copied();
        let requester = classify_requester(status, &conf, from, incarnation, promoted);
        match requester {
            Requester::StaleVoter => {
                debug!(
                    replica = from,
                    incarnation, "ignoring a recover request sent before its promotion"
                );
                return;
            }
            Requester::Learner => {
                self.learner_incarnations.insert(from, incarnation);
            }
            Requester::Voting | Requester::LostVoter | Requester::Stranger => {}
        }
        let raft = &self.node.raft;
        out.push(Output::SendPeer {
            to: from,
            msg: PeerMessage::RecoverResponse {
                status: self.status,
                term: raft.term,
                leader: raft.leader_id,
                applied: self.applied,
            },
        });
        if raft.state == StateRole::Leader && self.status == ReplicaStatus::Voting {
            self.leader_handles_recovering(from, requester, status, last_index, incarnation, &conf);
        }
    }

    /// The leader's part: a voter that lost its state is demoted, so that
    /// it catches up as a learner and is promoted afterwards.
    /// `conf` is the membership the leader has now.
    fn leader_handles_recovering(
        &mut self,
        from: u64,
        requester: Requester,
        status: ReplicaStatus,
        last_index: u64,
        incarnation: u64,
        conf: &ConfState,
    ) {
        if requester == Requester::Voting {
            return;
        }
        self.probe_again_if_it_lost_positions(from, last_index);
        let change_pending = self.node.raft.has_pending_conf() || !conf.voters_outgoing.is_empty();
        match leader_action(requester, change_pending) {
            LeaderAction::Nothing => {}
            LeaderAction::DemotionWaits => {
                debug!(
                    replica = from,
                    "demotion waits for a pending membership change"
                );
            }
            LeaderAction::Demote => {
                info!(replica = from, %status, incarnation, "demoting a voter that lost its state to learner; it is promoted again once it has caught up");
                // Its promotion names the incarnation it was demoted in.
                self.learner_incarnations.insert(from, incarnation);
                let cc = conf_change(
                    &[MembershipChange::AddLearner(from)],
                    MembershipContext::default(),
                );
                if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
                    warn!(error = %e, replica = from, "could not propose the demotion");
                }
            }
            LeaderAction::TellOperator => {
                info!(replica = from, %status,
                      "replica is not a member of this cluster; add it with `replog members add`");
            }
        }
    }

    /// A member that reports a log shorter than what it acknowledged lost
    /// positions: replicate to it from what it has.
    fn probe_again_if_it_lost_positions(&mut self, from: u64, last_index: u64) {
        if let Some(pr) = self.node.raft.mut_prs().get_mut(from) {
            if pr.matched > last_index {
                info!(
                    replica = from,
                    matched = pr.matched,
                    last_index,
                    "replica lost positions it had acknowledged; probing it again"
                );
                pr.matched = last_index;
                pr.become_probe();
            }
        }
    }

    /// The leader promotes one caught-up learner per tick, naming the
    /// incarnation it announced as a learner (the rejoin rule). A learner
    /// that announced none (a VOTING replica an operator made a learner)
    /// is promoted unnamed, but only after it was found caught up and
    /// unnamed for two recover rounds: a RECOVERING replica ignores an
    /// unnamed promotion and would stay a voter that cannot vote until it
    /// is demoted again.
    pub(super) fn auto_promote(&mut self) {
        let raft = &self.node.raft;
        if !self.config.auto_promote
            || raft.state != StateRole::Leader
            || !self.leader_ready
            || raft.has_pending_conf()
        {
            return;
        }
        let conf = raft.prs().conf().to_conf_state();
        if !conf.voters_outgoing.is_empty() {
            return;
        }
        let committed = raft.raft_log.committed;
        let caught_up: Vec<u64> = conf
            .learners
            .iter()
            .copied()
            .filter(|id| raft.prs().get(*id).is_some_and(|p| p.matched >= committed))
            .filter(|id| !self.repair.holds_isolated(*id))
            .collect();
        let grace_over = self.unnamed_grace_over(&caught_up);
        let Some((id, promotion)) =
            choose_promotion(&caught_up, &self.learner_incarnations, &grace_over)
        else {
            return;
        };
        self.unnamed_since.remove(&id);
        info!(
            replica = id,
            committed,
            incarnation = ?promotion.map(|p| p.incarnation),
            "learner has caught up; promoting it to voter"
        );
        let context = MembershipContext {
            addresses: Vec::new(),
            promotion,
        };
        let cc = conf_change(&[MembershipChange::AddVoter(id)], context);
        if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
            warn!(error = %e, replica = id, "could not propose the promotion");
        }
    }

    /// The caught-up learners with no known incarnation that have waited
    /// two recover rounds for one; starts the wait of the new ones.
    fn unnamed_grace_over(&mut self, caught_up: &[u64]) -> BTreeSet<u64> {
        let (now, grace_ticks) = (self.ticks, 2 * self.config.recover_interval_ticks.max(1));
        self.unnamed_since
            .retain(|id, _| caught_up.contains(id) && !self.learner_incarnations.contains_key(id));
        let mut grace_over = BTreeSet::new();
        for &id in caught_up
            .iter()
            .filter(|id| !self.learner_incarnations.contains_key(id))
        {
            let since = *self.unnamed_since.entry(id).or_insert(now);
            if now - since >= grace_ticks {
                grace_over.insert(id);
            }
        }
        grace_over
    }

    /// Decides what a replica that is not VOTING does with the answers of
    /// this round (see [`decide_recovery_step`]).
    fn decide_recovery(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        let peers: Vec<u64> = self
            .config
            .peers
            .iter()
            .copied()
            .filter(|p| *p != self.id)
            .collect();
        let step = decide_recovery_step(
            self.status,
            self.config.auto_initialize,
            &peers,
            &self.recover_responses,
        );
        match step {
            RecoveryStep::Wait => {}
            RecoveryStep::Recover => {
                info!(
                    replica = self.id,
                    "a VOTING replica answered: the cluster is live; recovering as a learner"
                );
                self.set_status(ReplicaStatus::Recovering, out)?;
            }
            RecoveryStep::Start => {
                info!(
                    replica = self.id,
                    "every replica is EMPTY or STARTING: starting auto-initialization"
                );
                self.set_status(ReplicaStatus::Starting, out)?;
            }
            RecoveryStep::WarnAllEmpty => {
                warn!(
                    replica = self.id,
                    "all replicas are EMPTY: run `replog initialize` on each host (or start every replica with --auto-initialize)"
                );
                self.recover_responses.clear();
            }
            RecoveryStep::FoundLog => self.auto_initialize(out)?,
        }
        Ok(())
    }

    /// The second phase: found the log with every configured replica as a
    /// voter, exactly as `replog initialize` would.
    fn auto_initialize(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        assert_eq!(
            self.status,
            ReplicaStatus::Starting,
            "only a STARTING replica founds the log"
        );
        let mut voters: Vec<u64> = self.config.peers.clone();
        voters.push(self.id);
        voters.sort_unstable();
        voters.dedup();
        info!(
            replica = self.id,
            ?voters,
            "every replica is STARTING or VOTING: initializing the log"
        );
        let hard_state = raft::eraftpb::HardState {
            term: 1,
            commit: 1,
            ..Default::default()
        };
        self.storage.write(LogUpdate {
            snapshot: Some((1, 1)),
            conf_state: Some(ConfState {
                voters,
                ..Default::default()
            }),
            hard_state: Some(hard_state),
            applied: Some(1),
            status: Some(ReplicaStatus::Voting),
            ..Default::default()
        })?;
        self.storage.sync()?;
        // The node saw no Raft traffic while STARTING; start it afresh on
        // the initialized state.
        self.node = Self::new_node(&self.storage, &self.config, self.id, 1)?;
        self.applied = 1;
        self.status = ReplicaStatus::Voting;
        self.recover_responses.clear();
        out.push(Output::StatusChanged {
            status: ReplicaStatus::Voting,
        });
        Ok(())
    }

    /// Persists (and syncs) a status change outside a ready.
    fn set_status(
        &mut self,
        status: ReplicaStatus,
        out: &mut Vec<Output>,
    ) -> Result<(), CoreError> {
        self.storage.write(LogUpdate {
            status: Some(status),
            ..Default::default()
        })?;
        self.storage.sync()?;
        info!(replica = self.id, from = %self.status, to = %status, "replica status changed");
        self.status = status;
        self.recover_responses.clear();
        out.push(Output::StatusChanged { status });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::membership::conf;
    use super::*;
    use ReplicaStatus::{Empty, Recovering, Starting, Voting};

    fn answers(list: &[(u64, ReplicaStatus)]) -> BTreeMap<u64, ReplicaStatus> {
        list.iter().copied().collect()
    }

    /// The "becomes" column of the replica lifecycle table
    /// (ARCHITECTURE.md), for replica 1 of {1, 2, 3}.
    #[test]
    fn what_a_replica_becomes_given_the_recover_answers_as_a_table() {
        use RecoveryStep::*;
        let peers = [2, 3];
        type Row = (
            &'static str,
            ReplicaStatus,
            bool,
            Vec<(u64, ReplicaStatus)>,
            RecoveryStep,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("EMPTY, one VOTING answer is enough",         Empty, false, vec![(2, Voting)],                  Recover),
            ("EMPTY, VOTING wins over auto-initialize",    Empty, true,  vec![(2, Empty), (3, Voting)],      Recover),
            ("EMPTY, RECOVERING answers decide nothing",   Empty, false, vec![(2, Recovering), (3, Recovering)], Wait),
            ("EMPTY, all EMPTY, auto-initialize",          Empty, true,  vec![(2, Empty), (3, Empty)],       Start),
            ("EMPTY, EMPTY and STARTING, auto-initialize", Empty, true,  vec![(2, Starting), (3, Empty)],    Start),
            ("EMPTY, one answer missing",                  Empty, true,  vec![(2, Empty)],                   Wait),
            ("EMPTY, all EMPTY, no auto-initialize",       Empty, false, vec![(2, Empty), (3, Empty)],       WarnAllEmpty),
            ("EMPTY, a RECOVERING one blocks founding",    Empty, true,  vec![(2, Empty), (3, Recovering)],  Wait),
            ("EMPTY, STARTING without auto-initialize",    Empty, false, vec![(2, Starting), (3, Empty)],    Wait),
            ("STARTING, all STARTING",                     Starting, true, vec![(2, Starting), (3, Starting)], FoundLog),
            ("STARTING, STARTING and VOTING",              Starting, true, vec![(2, Voting), (3, Starting)], FoundLog),
            ("STARTING, one answer missing",               Starting, true, vec![(2, Starting)],              Wait),
            ("STARTING, an EMPTY one is behind",           Starting, true, vec![(2, Empty), (3, Starting)],  Wait),
            ("RECOVERING waits for its promotion",         Recovering, false, vec![(2, Voting), (3, Voting)], Wait),
            ("VOTING is done",                             Voting, false, vec![(2, Voting), (3, Voting)],    Wait),
        ];
        for (what, status, auto, list, want) in rows {
            assert_eq!(
                decide_recovery_step(status, auto, &peers, &answers(&list)),
                want,
                "{what}"
            );
        }
    }

    /// When the leader demotes: replica 3 asks in incarnation 7.
    #[test]
    fn when_the_leader_demotes_as_a_table() {
        use LeaderAction::*;
        use ReplicaStatus::Voting as VOTING;
        use Requester::{Learner, LostVoter, StaleVoter, Stranger};
        let voter = conf(&[1, 2, 3], &[]);
        let learner = conf(&[1, 2], &[3]);
        let stranger = conf(&[1, 2], &[]);
        let mut joint = conf(&[1, 2], &[]);
        joint.voters_outgoing = vec![1, 2, 3];
        type Row<'a> = (
            &'a str,
            ReplicaStatus,
            &'a ConfState,
            Option<u64>,
            bool,
            Requester,
            LeaderAction,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("a VOTING voter probes",                    VOTING,     &voter,    None,    false, Requester::Voting, Nothing),
            ("a voter that lost its disk",               Empty,      &voter,    None,    false, LostVoter,  Demote),
            ("a RECOVERING voter",                       Recovering, &voter,    None,    false, LostVoter,  Demote),
            ("a voter of an earlier promotion",          Recovering, &voter,    Some(6), false, LostVoter,  Demote),
            ("a request sent before its promotion",      Recovering, &voter,    Some(7), false, StaleVoter, Nothing),
            ("a lost voter while a change is pending",   Recovering, &voter,    None,    true,  LostVoter,  DemotionWaits),
            ("a lost voter in a joint configuration",    Recovering, &joint,    None,    true,  LostVoter,  DemotionWaits),
            ("a learner catching up",                    Recovering, &learner,  None,    false, Learner,    Nothing),
            ("a learner once promoted in 7, demoted",    Recovering, &learner,  Some(7), false, Learner,    Nothing),
            ("not a member",                             Empty,      &stranger, None,    false, Stranger,   TellOperator),
            ("a VOTING stranger",                        VOTING,     &stranger, None,    false, Requester::Voting, Nothing),
        ];
        for (what, status, cs, promoted, pending, requester, action) in rows {
            let got = classify_requester(status, cs, 3, 7, promoted);
            assert_eq!(got, requester, "{what}");
            assert_eq!(leader_action(got, pending), action, "{what}");
        }
    }

    #[test]
    fn which_learner_the_leader_promotes_as_a_table() {
        let known: BTreeMap<u64, u64> = [(4, 40), (5, 50)].into();
        let named = |id, incarnation| {
            Some((
                id,
                Some(Promotion {
                    replica_id: id,
                    incarnation,
                }),
            ))
        };
        let none = BTreeSet::new();
        let three: BTreeSet<u64> = [3].into();
        let six: BTreeSet<u64> = [6].into();
        type Row<'a> = (
            &'a str,
            &'a [u64],
            &'a BTreeSet<u64>,
            Option<(u64, Option<Promotion>)>,
        );
        #[rustfmt::skip]
        let rows: [Row; 7] = [
            ("nobody caught up",                        &[],     &three, None),
            ("a learner with its incarnation",          &[5],    &none,  named(5, 50)),
            ("the named one before an unnamed one",     &[3, 4], &none,  named(4, 40)),
            ("unnamed waits for the grace",             &[3],    &none,  None),
            ("unnamed after its grace",                 &[3],    &three, Some((3, None))),
            ("another learner's grace does not count",  &[3],    &six,   None),
            ("named first even after the grace",        &[3, 5], &three, named(5, 50)),
        ];
        for (what, caught_up, grace_over, want) in rows {
            assert_eq!(
                choose_promotion(caught_up, &known, grace_over),
                want,
                "{what}"
            );
        }
    }
}
