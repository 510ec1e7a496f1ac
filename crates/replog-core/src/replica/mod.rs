//! [`ReplicaCore`]: one replica's decision logic around raft-rs `RawNode`.
//!
//! It is free of I/O of its own: [`Input`]s go in, [`Output`]s come out. It
//! writes through [`LogStorage::write`] (visible at once, not yet durable)
//! and asks for durability with [`Output::Sync`]; the runtime fsyncs and
//! feeds [`Input::Persisted`] back. Under a deterministic harness the same
//! code runs on [`replog_storage::MemoryStorage`]. The one exception is a
//! change of replica status (EMPTY, STARTING, RECOVERING, VOTING), which is
//! rare and is synced before the core acts on it.
//!
//! The rooms, one concern each:
//! - this module: the state of one replica, [`Input`] dispatch, what Raft
//!   traffic a replica admits in each status ([`admits_raft_message`]),
//!   ticks, proposals, role changes and [`Progress`];
//! - [`ready`]: the ready loop (write, fsync, send in raft-rs's order);
//! - [`apply`]: what committed entries do;
//! - [`recover`]: replica states and the recover protocol, demotion and
//!   promotion by the leader;
//! - [`membership`]: operators' membership changes and the rejoin rule.
//!
//! The replica lifecycle (ARCHITECTURE.md has it as a table, and
//! `the_replica_lifecycle_as_a_table` checks every row):
//! - EMPTY and STARTING replicas ignore Raft traffic altogether and never
//!   tick; they broadcast recover requests until their peers' answers move
//!   them on (see [`recover`]);
//! - RECOVERING: Raft runs, but the replica never ticks (so never
//!   campaigns) and drops vote, pre-vote and timeout-now requests: having
//!   lost what it voted for and what it held, its vote could elect a leader
//!   that lacks committed entries. It catches up as a learner (the leader
//!   demotes it first if it was a voter) and persists VOTING when it applies
//!   the promotion that names it *and its current incarnation*;
//! - VOTING: a full Raft member.
//!
//! The rejoin rule (asserted where the status changes): a RECOVERING
//! replica turns VOTING only by applying a promotion entry whose
//! [`Promotion`](replog_storage::Promotion) names this replica and the
//! incarnation it runs in now. A replica replaying the log from the start
//! meets the demotions and promotions of its earlier incarnations (it may
//! have lost its disk before); they name other incarnations, or none, and
//! never make it VOTING. A promotion entry at position P is applied only
//! once this replica holds the log through P durably, and the leader
//! proposed it when the learner had matched everything committed, so a
//! replica that turns VOTING holds every entry committed before its
//! promotion.
//!
//! Invariants:
//! - a proposal is reported [`Output::Committed`] only once its entry is
//!   committed, applied and durable on this replica;
//! - many proposals share one ready and one sync (group commit);
//! - `applied` is written in the same batch as the effects of the entries
//!   it covers (truncation, membership), so a crash never applies an entry
//!   twice;
//! - a replica whose status is not VOTING never sends a vote, a vote
//!   request or a pre-vote (asserted on every ready).

mod apply;
mod membership;
mod ready;
mod recover;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::eraftpb::{Message, MessageType};
use raft::{Config, RawNode, StateRole};
use replog_repair::RepairState;
use replog_storage::bugs::{self, InjectedBug};
use replog_storage::{LogStorage, LogUpdate, ReplicaStatus};
use tracing::{debug, info, warn};

use crate::command::Command;
use crate::events::{
    CoreConfig, CoreError, Input, MemberProgress, Output, Progress, ProposalError, ProposalId,
};
use membership::{is_learner, is_voter};
use ready::UnsyncedReady;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingKind {
    Command,
    Membership,
}

struct Pending {
    term: u64,
    id: ProposalId,
    kind: PendingKind,
}

/// The replica's decision logic. See the module docs.
pub struct ReplicaCore<S: LogStorage> {
    node: RawNode<S>,
    storage: S,
    config: CoreConfig,
    id: u64,
    status: ReplicaStatus,
    /// Proposals by position, waiting for commit.
    pending: BTreeMap<u64, Pending>,
    /// Readies written but not yet reported durable, in order, with their
    /// persisted messages and whether they need an fsync at all.
    unsynced: VecDeque<UnsyncedReady>,
    leader_ready: bool,
    last_role: StateRole,
    applied: u64,
    ticks: u64,
    /// Answers to this round of recover requests, by replica.
    recover_responses: BTreeMap<u64, ReplicaStatus>,
    /// While RECOVERING: this replica has been a learner since it started
    /// recovering. Only [`InjectedBug::EarlyVoting`] decides on it (the
    /// rule that bug puts back); the real rule is the named promotion.
    seen_as_learner: bool,
    /// The incarnation each replica last announced in a non-VOTING recover
    /// request while it was a learner here (one entry per replica id): the
    /// incarnation a promotion of it names.
    learner_incarnations: BTreeMap<u64, u64>,
    /// The incarnation named by the last promotion of each replica applied
    /// here. A non-VOTING request of that incarnation from a voter was sent
    /// before it applied its promotion, and is stale.
    promoted_incarnations: BTreeMap<u64, u64>,
    /// The replicated repair memory, folded from the repair records applied
    /// here (or adopted from a snapshot); persisted with the applied
    /// position that covers it. An isolated replica is never promoted.
    repair: RepairState,
    /// The tick at which this leader first found each caught-up learner
    /// with no known incarnation (an unnamed promotion waits for it to
    /// announce one for two recover rounds).
    unnamed_since: BTreeMap<u64, u64>,
    /// This replica's incarnation in its recover requests: starts as
    /// [`CoreConfig::incarnation`] and changes when this replica, RECOVERING,
    /// finds itself a voter it cannot turn VOTING from (see
    /// `note_own_membership`), so that the leader demotes it again.
    incarnation: u64,
    /// A commit-index/applied-only update not written yet: it rides along
    /// with the next ready's write (merged, so writes never go out of
    /// order), or [`ReplicaCore::flush_deferred`] writes it. The answers to
    /// the appends it committed need not wait for it: what they promise is
    /// already durable, and a commit index lost in a crash is recomputed.
    deferred: Option<LogUpdate>,
    /// The runtime has nothing else queued: a small ready may be written
    /// and fsynced inline (see [`CoreConfig::inline_sync_max_entries`]).
    inline_sync: bool,
}

/// Whether a replica in `status` steps a Raft message of `kind`: EMPTY and
/// STARTING replicas have not joined their cluster and take none; a
/// RECOVERING one catches up but does not vote (it lost what it voted for
/// and what it held, so its vote could elect a leader lacking committed
/// entries), nor start an election when told to.
fn admits_raft_message(status: ReplicaStatus, kind: MessageType) -> bool {
    match status {
        ReplicaStatus::Empty | ReplicaStatus::Starting => false,
        ReplicaStatus::Recovering => !matches!(
            kind,
            MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
                | MessageType::MsgTimeoutNow
        ),
        ReplicaStatus::Voting => true,
    }
}

/// Whether a replica in `status` ticks raft-rs, and so may campaign: only
/// a VOTING one; the others run the recover protocol on their ticks.
fn ticks_raft(status: ReplicaStatus) -> bool {
    status == ReplicaStatus::Voting
}

fn raft_config(id: u64, applied: u64, c: &CoreConfig) -> Config {
    let (min_election_tick, max_election_tick) = c.election_tick_range.unwrap_or((0, 0));
    Config {
        min_election_tick,
        max_election_tick,
        id,
        election_tick: c.election_tick,
        heartbeat_tick: c.heartbeat_tick,
        applied,
        max_size_per_msg: c.max_bytes_per_msg,
        max_inflight_msgs: c.max_inflight_msgs,
        max_uncommitted_size: c.max_uncommitted_bytes,
        pre_vote: true,
        check_quorum: true,
        ..Default::default()
    }
}

impl<S: LogStorage> ReplicaCore<S> {
    /// Starts the core on an opened storage, whatever its status.
    /// The repair state the storage holds (none: empty).
    fn stored_repair_state(storage: &S) -> Result<RepairState, CoreError> {
        let bytes = storage.repair_state();
        if bytes.is_empty() {
            return Ok(RepairState::default());
        }
        RepairState::decode(&bytes).map_err(CoreError::RepairState)
    }

    /// The replicated repair memory as of the applied position.
    pub fn repair_state(&self) -> &RepairState {
        &self.repair
    }

    pub fn new(storage: S, config: &CoreConfig) -> Result<Self, CoreError> {
        let meta = storage.meta();
        let node = Self::new_node(&storage, config, meta.replica_id, meta.applied_index)?;
        let repair = Self::stored_repair_state(&storage)?;
        let mut core = ReplicaCore {
            node,
            storage,
            config: config.clone(),
            id: meta.replica_id,
            status: meta.status,
            pending: BTreeMap::new(),
            unsynced: VecDeque::new(),
            leader_ready: false,
            last_role: StateRole::Follower,
            applied: meta.applied_index,
            ticks: 0,
            recover_responses: BTreeMap::new(),
            seen_as_learner: is_learner(&meta.conf_state, meta.replica_id),
            learner_incarnations: BTreeMap::new(),
            promoted_incarnations: BTreeMap::new(),
            repair,
            unnamed_since: BTreeMap::new(),
            incarnation: config.incarnation,
            deferred: None,
            inline_sync: false,
        };
        if core.status == ReplicaStatus::Voting {
            let voters = &meta.conf_state.voters;
            if voters.len() == 1 && voters[0] == meta.replica_id {
                // A cluster of one needs no election timeout to find its leader.
                core.node.campaign()?;
            }
        }
        Ok(core)
    }

    fn new_node(
        storage: &S,
        c: &CoreConfig,
        id: u64,
        applied: u64,
    ) -> Result<RawNode<S>, CoreError> {
        let cfg = raft_config(id, applied, c);
        cfg.validate()?;
        let logger = crate::slog_bridge::logger(id);
        Ok(RawNode::new(&cfg, storage.clone(), &logger)?)
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This replica's status.
    pub fn status(&self) -> ReplicaStatus {
        self.status
    }

    /// The storage the core writes to.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Number of proposals waiting for commit.
    pub fn pending_proposals(&self) -> usize {
        self.pending.len()
    }

    /// The current membership with each member's replication progress
    /// (`matched` is only known on the leader).
    pub fn members(&self) -> Vec<MemberProgress> {
        let conf = self.node.raft.prs().conf().to_conf_state();
        let is_leader = self.node.raft.state == StateRole::Leader;
        let mut ids: BTreeSet<u64> = conf.voters.iter().copied().collect();
        ids.extend(conf.voters_outgoing.iter().copied());
        ids.extend(conf.learners.iter().copied());
        ids.extend(conf.learners_next.iter().copied());
        ids.into_iter()
            .map(|id| MemberProgress {
                id,
                voter: is_voter(&conf, id),
                matched: match self.node.raft.prs().get(id) {
                    Some(p) if is_leader => p.matched,
                    _ => 0,
                },
            })
            .collect()
    }

    /// Feeds one input; outputs are appended to `out`. Call [`Self::drive`]
    /// after a batch of inputs.
    pub fn step(&mut self, input: Input, out: &mut Vec<Output>) -> Result<(), CoreError> {
        match input {
            Input::Tick => self.tick(out)?,
            Input::Propose {
                id,
                command,
                writer_term,
            } => self.propose(id, command, writer_term, out),
            Input::ChangeMembership {
                id,
                changes,
                addresses,
            } => self.change_membership(id, &changes, &addresses, out),
            Input::TransferLeader { to } => {
                if self.node.raft.state == StateRole::Leader && self.status == ReplicaStatus::Voting
                {
                    info!(replica = self.id, to, "transferring leadership");
                    self.node.transfer_leader(to);
                }
            }
            Input::ReadIndex { id } => {
                if self.status != ReplicaStatus::Voting && self.status != ReplicaStatus::Recovering
                {
                    out.push(Output::Failed {
                        id,
                        error: ProposalError::NotLeader { leader: None },
                    });
                } else {
                    // raft-rs drops the request when there is no leader; the
                    // runtime times such reads out.
                    self.node.read_index(id.to_be_bytes().to_vec());
                }
            }
            Input::Persisted { ready_number } => self.on_persisted(ready_number, out),
            Input::Message(m) => self.step_raft(*m),
            Input::Peer { from, msg } => self.step_peer(from, msg, out)?,
        }
        Ok(())
    }

    fn step_raft(&mut self, m: Message) {
        if !admits_raft_message(self.status, m.get_msg_type()) {
            debug!(replica = self.id, from = m.from, status = %self.status, kind = ?m.get_msg_type(),
                   "dropping a raft message: EMPTY and STARTING replicas take none, RECOVERING ones do not vote");
            return;
        }
        let mut m = m;
        if m.get_msg_type() == MessageType::MsgHeartbeat {
            // A leader that still counts positions this replica held before
            // it lost them sends a commit beyond its log; raft-rs would
            // panic on it. The positions this replica does hold match the
            // leader's up to there, so clamping is safe.
            let last = self.node.raft.raft_log.last_index();
            if m.commit > last
                && !bugs::active(self.config.injected_bug, InjectedBug::NoCommitClamp)
            {
                debug!(
                    replica = self.id,
                    commit = m.commit,
                    last,
                    "clamping a heartbeat's commit to the local log"
                );
                m.commit = last;
            }
        }
        if let Err(e) = self.node.step(m) {
            debug!(error = %e, "dropped a raft message");
        }
    }

    fn tick(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        self.ticks += 1;
        if ticks_raft(self.status) {
            self.node.tick();
            self.auto_promote();
        } else if self.ticks % self.config.recover_interval_ticks.max(1) == 1 {
            self.broadcast_recover(out);
        }
        Ok(())
    }

    fn propose(
        &mut self,
        id: ProposalId,
        command: Command,
        writer_term: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        let raft = &self.node.raft;
        if let Some(term) = writer_term {
            if raft.term != term || raft.state != StateRole::Leader || !self.leader_ready {
                out.push(Output::Failed {
                    id,
                    error: ProposalError::LeadershipLost { term },
                });
                return;
            }
        }
        if let Some(refusal) = not_leader(raft, id) {
            out.push(refusal);
            return;
        }
        let term = raft.term;
        let r = self.node.propose(Vec::new(), command.encode());
        self.note_proposal(id, term, PendingKind::Command, r, out);
    }

    fn note_proposal(
        &mut self,
        id: ProposalId,
        term: u64,
        kind: PendingKind,
        r: raft::Result<()>,
        out: &mut Vec<Output>,
    ) {
        match r {
            Ok(()) => {
                let position = self.node.raft.raft_log.last_index();
                let prev = self.pending.insert(position, Pending { term, id, kind });
                assert!(prev.is_none(), "two proposals at position {position}");
            }
            Err(raft::Error::ProposalDropped) => {
                let error = if self.node.raft.state == StateRole::Leader {
                    ProposalError::Busy
                } else {
                    ProposalError::NotLeader { leader: None }
                };
                out.push(Output::Failed { id, error });
            }
            Err(e) => {
                warn!(error = %e, "proposal refused");
                out.push(Output::Failed {
                    id,
                    error: ProposalError::Busy,
                });
            }
        }
    }

    /// A leader that lost its leadership fails its pending proposals as
    /// outcome-unknown (the next leader may still commit them).
    fn note_role_change(&mut self, out: &mut Vec<Output>) {
        let role = self.node.raft.state;
        if role == self.last_role {
            return;
        }
        info!(replica = self.id, term = self.node.raft.term, from = ?self.last_role, to = ?role, "role changed");
        if self.last_role == StateRole::Leader {
            self.leader_ready = false;
            let term = self.node.raft.term;
            // Outcomes are unknown: the entries may still be committed by
            // the next leader.
            for (_, p) in std::mem::take(&mut self.pending) {
                out.push(Output::Failed {
                    id: p.id,
                    error: ProposalError::LeadershipLost {
                        term: p.term.max(term),
                    },
                });
            }
        }
        self.last_role = role;
    }

    /// The log's progress now.
    pub fn progress(&self) -> Progress {
        let raft = &self.node.raft;
        let is_leader = raft.state == StateRole::Leader;
        Progress {
            status: self.status,
            term: raft.term,
            leader: (raft.leader_id != 0).then_some(raft.leader_id),
            is_leader,
            leader_ready: is_leader && self.leader_ready,
            applied: self.applied,
            first_index: raft.raft_log.first_index(),
            last_index: raft.raft_log.last_index(),
            voter: raft.prs().conf().voters().contains(raft.id),
        }
    }
}

/// The refusal of proposal `id` when this replica does not lead.
fn not_leader<S: raft::Storage>(raft: &raft::Raft<S>, id: ProposalId) -> Option<Output> {
    (raft.state != StateRole::Leader).then(|| Output::Failed {
        id,
        error: ProposalError::NotLeader {
            leader: (raft.leader_id != 0).then_some(raft.leader_id),
        },
    })
}
