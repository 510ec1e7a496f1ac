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
//! The ready loop follows raft-rs's documented order for asynchronous
//! persistence: send `messages` at once, write entries and hard state,
//! apply committed entries, `advance_append_async`; send
//! `persisted_messages` only after the sync of that ready
//! (`on_persist_ready`).
//!
//! Replica states and the recover protocol (Mesos semantics, Raft
//! mechanics):
//! - a replica that is not VOTING broadcasts [`PeerMessage::RecoverRequest`]
//!   every `recover_interval_ticks`; every replica answers with its status;
//! - EMPTY: if any replica answers VOTING, the cluster is live: persist
//!   RECOVERING. With `auto_initialize`, Mesos' two-phase rule: EMPTY to
//!   STARTING only when every configured replica answered EMPTY or
//!   STARTING, STARTING to VOTING only when every one answered STARTING or
//!   VOTING, so a replica that merely lost its disk can never found a second
//!   log. Otherwise a repeated warning asks for `replog initialize`;
//! - EMPTY and STARTING replicas ignore Raft traffic altogether;
//! - RECOVERING: Raft runs, but the replica never ticks (so never
//!   campaigns) and drops vote, pre-vote and timeout-now requests: having
//!   lost what it voted for and what it held, its vote could elect a leader
//!   that lacks committed entries. It catches up as a learner (the leader
//!   demotes it first if it was a voter) and persists VOTING when it applies
//!   the promotion that names it *and its current incarnation*;
//! - the leader demotes a voter that reports EMPTY or RECOVERING, unless
//!   the report carries the incarnation a promotion already named (a request
//!   delayed past its promotion), and promotes a learner once it has
//!   everything committed (`auto_promote`), naming the incarnation the
//!   learner announced in its recover requests.
//!
//! The rejoin rule (asserted where the status changes): a RECOVERING
//! replica turns VOTING only by applying a promotion entry whose
//! [`Promotion`] names this replica and the incarnation it runs in now. A
//! replica replaying the log from the start meets the demotions and
//! promotions of its earlier incarnations (it may have lost its disk
//! before); they name other incarnations, or none, and never make it
//! VOTING. A promotion entry at position P is applied only once this
//! replica holds the log through P durably, and the leader proposed it
//! when the learner had matched everything committed, so a replica that
//! turns VOTING holds every entry committed before its promotion.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, Message, MessageType,
};
use raft::{Config, RawNode, SnapshotStatus, StateRole};
use replog_storage::bugs::{self, InjectedBug};
use replog_storage::{
    decode_membership_context, encode_membership_context, LogStorage, LogUpdate, Member,
    MembershipContext, Promotion, ReplicaStatus,
};
use tracing::{debug, info, warn};

use crate::command::{classify, Command, EntryContent};

/// Identifies a proposal (or a read) between the runtime and the core.
pub type ProposalId = u64;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Ticks without a leader before a follower campaigns.
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Largest total size of proposed-but-uncommitted entries (bytes).
    pub max_uncommitted_bytes: u64,
    /// Largest size of entries in one Raft message.
    pub max_bytes_per_msg: u64,
    /// Most unacknowledged append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// The other replicas of the cluster: the audience of the recover
    /// protocol and, with `auto_initialize`, the initial voters.
    pub peers: Vec<u64>,
    /// Mesos' `--auto-initialize`: a cluster whose replicas are all EMPTY
    /// founds the log by itself (two-phase rule).
    pub auto_initialize: bool,
    /// Ticks between recover broadcasts of a replica that is not VOTING.
    pub recover_interval_ticks: u64,
    /// The leader promotes a learner to voter once it has caught up.
    pub auto_promote: bool,
    /// Election timeout range in ticks, `[min, max)`. `None`: raft-rs's
    /// default `[election_tick, 2 * election_tick)`, drawn from its own
    /// random generator. A deterministic harness sets a range of one tick,
    /// chosen from its seed.
    pub election_tick_range: Option<(usize, usize)>,
    /// A ready of at most this many entries that needs an fsync, written
    /// when nothing else waits for one, is written and fsynced in one call
    /// on the caller's thread (see [`ReplicaCore::allow_inline_sync`]);
    /// bigger ones go through [`Output::Sync`]. 0: always [`Output::Sync`].
    pub inline_sync_max_entries: usize,
    /// Names this run of the replica in the recover protocol; must differ
    /// from one start to the next (the default draws a random one). It lets
    /// the leader tell a recover request delayed past the sender's promotion
    /// from one sent after the sender lost its data or restarted.
    pub incarnation: u64,
    /// A bug put back on purpose, for tests that prove they find it (see
    /// [`replog_storage::bugs`]); ignored unless built with the feature
    /// `inject-bugs`. Defaults to `REPLOG_INJECT_BUG` under that feature.
    pub injected_bug: Option<InjectedBug>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            max_uncommitted_bytes: 256 * 1024 * 1024,
            max_bytes_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            peers: Vec::new(),
            auto_initialize: false,
            recover_interval_ticks: 10,
            auto_promote: true,
            election_tick_range: None,
            inline_sync_max_entries: 8,
            incarnation: rand::random(),
            injected_bug: InjectedBug::from_env(),
        }
    }
}

/// A message of the recover protocol (outside Raft).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    RecoverRequest {
        status: ReplicaStatus,
        last_index: u64,
        /// The sender's [`CoreConfig::incarnation`].
        incarnation: u64,
    },
    RecoverResponse {
        status: ReplicaStatus,
        term: u64,
        leader: u64,
        commit: u64,
    },
}

/// One membership change; several in one request form a joint change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voter, or promote a learner.
    AddVoter(u64),
    /// Add a learner, or demote a voter.
    AddLearner(u64),
    /// Remove a voter or learner.
    Remove(u64),
}

/// An event for the core.
#[derive(Debug)]
pub enum Input {
    /// A logical clock tick.
    Tick,
    /// Propose a command. With `writer_term`, the proposal fails with
    /// [`ProposalError::LeadershipLost`] unless this replica is still the
    /// ready leader of that term (a writer never writes across terms).
    Propose {
        id: ProposalId,
        command: Command,
        writer_term: Option<u64>,
    },
    /// Propose a membership change (leader only). `addresses` travel with
    /// the change, so every replica learns where added members listen.
    ChangeMembership {
        id: ProposalId,
        changes: Vec<MembershipChange>,
        addresses: Vec<Member>,
    },
    /// Ask the leader to hand leadership to `to`.
    TransferLeader { to: u64 },
    /// A linearizable read: answered with [`Output::ReadReady`] once the
    /// position every read must wait for is known.
    ReadIndex { id: ProposalId },
    /// Everything the core wrote up to and including the ready with this
    /// number is durable.
    Persisted { ready_number: u64 },
    /// A Raft message from a peer.
    Message(Box<Message>),
    /// A recover-protocol message from a peer.
    Peer { from: u64, msg: PeerMessage },
}

/// Why a proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// This replica is not the leader.
    #[error("this replica is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// Leadership changed after the proposal; it may or may not be committed.
    #[error("leadership was lost in term {term}; the outcome of the write is unknown")]
    LeadershipLost { term: u64 },
    /// Too much is proposed and not yet committed.
    #[error("too many uncommitted proposals; retry later")]
    Busy,
    /// The membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The membership change was not made because another one is still
    /// under way; the same request may succeed later.
    #[error("membership change not made: {0}; retry")]
    MembershipInProgress(String),
}

/// Progress of the log, published after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub status: ReplicaStatus,
    pub term: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    /// True once this leader's first entry of its term is applied: its
    /// writer may start.
    pub leader_ready: bool,
    /// Last committed position whose entry is durable here.
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            status: ReplicaStatus::Empty,
            term: 0,
            leader: None,
            is_leader: false,
            leader_ready: false,
            commit: 0,
            applied: 0,
            first_index: 0,
            last_index: 0,
        }
    }
}

/// One member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProgress {
    pub id: u64,
    pub voter: bool,
    /// Highest position known to be on that replica (leader only; 0 else).
    pub matched: u64,
}

/// An action for the runtime.
#[derive(Debug)]
pub enum Output {
    /// fsync everything written so far, then send
    /// `Input::Persisted { ready_number }`.
    Sync { ready_number: u64 },
    /// Send these Raft messages to peers.
    Send(Vec<Message>),
    /// Send a recover-protocol message.
    SendPeer { to: u64, msg: PeerMessage },
    /// The proposal is committed at `position` and applied.
    Committed { id: ProposalId, position: u64 },
    /// The proposal failed.
    Failed {
        id: ProposalId,
        error: ProposalError,
    },
    /// A linearizable read may be served once `applied >= index`.
    ReadReady { id: ProposalId, index: u64 },
    /// Entries before `first_index` were removed; their space can be reclaimed.
    Truncated { first_index: u64 },
    /// The replica's status changed (and is durable).
    StatusChanged { status: ReplicaStatus },
    /// A membership change told where these members listen.
    Addresses(Vec<Member>),
}

/// Errors that stop the core: storage failed or raft-rs refused its state.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("replica storage failed: {0}")]
    Storage(#[from] replog_storage::StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

struct UnsyncedReady {
    number: u64,
    messages: Vec<Message>,
    needs_sync: bool,
    /// Position of the snapshot this ready installed: raft-rs may count it
    /// applied only once it is persisted.
    snapshot: Option<u64>,
}

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

/// Bound on readies written but not yet reported persisted.
const MAX_UNSYNCED_READIES: usize = 4096;

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

fn is_learner(cs: &ConfState, id: u64) -> bool {
    cs.learners.contains(&id) || cs.learners_next.contains(&id)
}

fn is_voter(cs: &ConfState, id: u64) -> bool {
    cs.voters.contains(&id) || cs.voters_outgoing.contains(&id)
}

/// What a RECOVERING replica makes of a membership it now has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnMembership {
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
fn judge_own_membership(
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

/// Which caught-up learner the leader promotes, and the promotion it
/// names: the first one that announced an incarnation; else the first one
/// whose grace for announcing one is over, unnamed.
fn choose_promotion(
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

/// True for the messages a replica sends only as a full voter.
fn is_vote_traffic(m: &Message) -> bool {
    matches!(
        m.get_msg_type(),
        MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse
    )
}

impl<S: LogStorage> ReplicaCore<S> {
    /// Starts the core on an opened storage, whatever its status.
    pub fn new(storage: S, config: &CoreConfig) -> Result<Self, CoreError> {
        let meta = storage.meta();
        let node = Self::new_node(&storage, config, meta.replica_id, meta.applied_index)?;
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
            Input::Persisted { ready_number } => {
                // Readies up to `ready_number` are durable; readies after them
                // that needed no fsync ride along.
                let mut done = None;
                let mut snapshot = None;
                while let Some(front) = self.unsynced.front() {
                    if front.number > ready_number && front.needs_sync {
                        break;
                    }
                    let r = self.unsynced.pop_front().expect("front exists");
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
            Input::Message(m) => self.step_raft(*m),
            Input::Peer { from, msg } => self.step_peer(from, msg, out)?,
        }
        Ok(())
    }

    fn step_raft(&mut self, m: Message) {
        match self.status {
            ReplicaStatus::Empty | ReplicaStatus::Starting => {
                debug!(replica = self.id, from = m.from, status = %self.status,
                       "ignoring a raft message: this replica has not joined its cluster");
                return;
            }
            ReplicaStatus::Recovering => {
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgRequestVote
                        | MessageType::MsgRequestPreVote
                        | MessageType::MsgTimeoutNow
                ) {
                    debug!(replica = self.id, from = m.from, kind = ?m.get_msg_type(),
                           "a RECOVERING replica does not vote");
                    return;
                }
            }
            ReplicaStatus::Voting => {}
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
        if self.status == ReplicaStatus::Voting {
            self.node.tick();
            self.auto_promote();
        } else if self.ticks % self.config.recover_interval_ticks.max(1) == 1 {
            self.broadcast_recover(out);
        }
        Ok(())
    }

    /// Starts a round of the recover protocol.
    fn broadcast_recover(&mut self, out: &mut Vec<Output>) {
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

    fn step_peer(
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
                info!(
                    "Replica in {} status received a broadcasted recover request from {from}",
                    self.status
                );
                let conf = self.node.raft.prs().conf().to_conf_state();
                if status != ReplicaStatus::Voting && is_voter(&conf, from) {
                    if self.promoted_incarnations.get(&from) == Some(&incarnation) {
                        // Sent while it was a learner, delivered after its
                        // promotion: it turns VOTING when it applies that.
                        debug!(
                            replica = from,
                            incarnation, "ignoring a recover request sent before its promotion"
                        );
                        return Ok(());
                    }
                } else if status != ReplicaStatus::Voting && is_learner(&conf, from) {
                    self.learner_incarnations.insert(from, incarnation);
                }
                let raft = &self.node.raft;
                out.push(Output::SendPeer {
                    to: from,
                    msg: PeerMessage::RecoverResponse {
                        status: self.status,
                        term: raft.term,
                        leader: raft.leader_id,
                        commit: self.applied,
                    },
                });
                if raft.state == StateRole::Leader && self.status == ReplicaStatus::Voting {
                    self.leader_handles_recovering(from, status, last_index, incarnation, &conf);
                }
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

    /// The leader's part: a voter that lost its state is demoted, so that
    /// it catches up as a learner and is promoted afterwards.
    /// `conf` is the membership the leader has now.
    fn leader_handles_recovering(
        &mut self,
        from: u64,
        status: ReplicaStatus,
        last_index: u64,
        incarnation: u64,
        conf: &ConfState,
    ) {
        if status == ReplicaStatus::Voting {
            return;
        }
        if let Some(pr) = self.node.raft.mut_prs().get_mut(from) {
            if pr.matched > last_index {
                // It lost what it held: replicate to it from what it has.
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
        if is_voter(conf, from) {
            if self.node.raft.has_pending_conf() || !conf.voters_outgoing.is_empty() {
                debug!(
                    replica = from,
                    "demotion waits for a pending membership change"
                );
                return;
            }
            info!(replica = from, %status, incarnation, "demoting a voter that lost its state to learner; it is promoted again once it has caught up");
            // Its promotion names the incarnation it was demoted in.
            self.learner_incarnations.insert(from, incarnation);
            let cc = conf_change(&[MembershipChange::AddLearner(from)]);
            if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
                warn!(error = %e, replica = from, "could not propose the demotion");
            }
        } else if !is_learner(conf, from) {
            info!(replica = from, %status,
                  "replica is not a member of this cluster; add it with `replog members add`");
        }
    }

    /// The leader promotes one caught-up learner per tick, naming the
    /// incarnation it announced as a learner (the rejoin rule). A learner
    /// that announced none (a VOTING replica an operator made a learner)
    /// is promoted unnamed, but only after it was found caught up and
    /// unnamed for two recover rounds: a RECOVERING replica ignores an
    /// unnamed promotion and would stay a voter that cannot vote until it
    /// is demoted again.
    fn auto_promote(&mut self) {
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
            .collect();
        let (now, grace) = (self.ticks, 2 * self.config.recover_interval_ticks.max(1));
        self.unnamed_since
            .retain(|id, _| caught_up.contains(id) && !self.learner_incarnations.contains_key(id));
        let mut grace_over = BTreeSet::new();
        for &id in caught_up
            .iter()
            .filter(|id| !self.learner_incarnations.contains_key(id))
        {
            let since = *self.unnamed_since.entry(id).or_insert(now);
            if now - since >= grace {
                grace_over.insert(id);
            }
        }
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
        let mut cc = conf_change(&[MembershipChange::AddVoter(id)]);
        if promotion.is_some() {
            let context = MembershipContext {
                addresses: Vec::new(),
                promotion,
            };
            cc.context = encode_membership_context(&context).into();
        }
        if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
            warn!(error = %e, replica = id, "could not propose the promotion");
        }
    }

    /// Decides what a replica that is not VOTING does with the answers of
    /// this round.
    fn decide_recovery(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        let peers: Vec<u64> = self
            .config
            .peers
            .iter()
            .copied()
            .filter(|p| *p != self.id)
            .collect();
        let all_answered = peers.iter().all(|p| self.recover_responses.contains_key(p));
        let any_voting = self
            .recover_responses
            .values()
            .any(|s| *s == ReplicaStatus::Voting);
        let all_in = |ok: &[ReplicaStatus]| {
            all_answered && self.recover_responses.values().all(|s| ok.contains(s))
        };
        match self.status {
            ReplicaStatus::Empty if any_voting => {
                info!(
                    replica = self.id,
                    "a VOTING replica answered: the cluster is live; recovering as a learner"
                );
                self.set_status(ReplicaStatus::Recovering, out)?;
            }
            ReplicaStatus::Empty
                if self.config.auto_initialize
                    && all_in(&[ReplicaStatus::Empty, ReplicaStatus::Starting]) =>
            {
                info!(
                    replica = self.id,
                    "every replica is EMPTY or STARTING: starting auto-initialization"
                );
                self.set_status(ReplicaStatus::Starting, out)?;
            }
            ReplicaStatus::Empty if all_in(&[ReplicaStatus::Empty]) => {
                warn!(
                    replica = self.id,
                    "all replicas are EMPTY: run `replog initialize` on each host (or start every replica with --auto-initialize)"
                );
                self.recover_responses.clear();
            }
            ReplicaStatus::Starting
                if all_in(&[ReplicaStatus::Starting, ReplicaStatus::Voting]) =>
            {
                self.auto_initialize(out)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The second phase: found the log with every configured replica as a
    /// voter, exactly as `replog initialize` would.
    fn auto_initialize(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
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

    fn change_membership(
        &mut self,
        id: ProposalId,
        changes: &[MembershipChange],
        addresses: &[Member],
        out: &mut Vec<Output>,
    ) {
        let raft = &self.node.raft;
        let refuse = |why: String| Output::Failed {
            id,
            error: ProposalError::Membership(why),
        };
        if let Some(refusal) = not_leader(raft, id) {
            out.push(refusal);
            return;
        }
        if changes.is_empty() {
            out.push(refuse("no change given".into()));
            return;
        }
        let later = |why: &str| Output::Failed {
            id,
            error: ProposalError::MembershipInProgress(why.into()),
        };
        if raft.has_pending_conf() {
            out.push(later("another membership change is in progress"));
            return;
        }
        let conf = raft.prs().conf().to_conf_state();
        if !conf.voters_outgoing.is_empty() {
            out.push(later("the cluster is leaving a joint configuration"));
            return;
        }
        let me = self.id;
        if changes.iter().any(|c| {
            matches!(c, MembershipChange::Remove(r) | MembershipChange::AddLearner(r) if *r == me)
        }) {
            out.push(refuse(format!(
                "replica {me} is the leader: transfer leadership to another voter first \
                 (replog members transfer-leader), then remove or demote it"
            )));
            return;
        }
        let mut voters: BTreeSet<u64> = conf.voters.iter().copied().collect();
        let mut seen = BTreeSet::new();
        for c in changes {
            let (MembershipChange::AddVoter(r)
            | MembershipChange::AddLearner(r)
            | MembershipChange::Remove(r)) = *c;
            if r == 0 || !seen.insert(r) {
                out.push(refuse(format!("replica id {r} is zero or changed twice")));
                return;
            }
            match c {
                MembershipChange::AddVoter(r) => {
                    voters.insert(*r);
                }
                MembershipChange::AddLearner(r) | MembershipChange::Remove(r) => {
                    voters.remove(r);
                }
            }
            if matches!(c, MembershipChange::Remove(r) if !is_voter(&conf, *r) && !is_learner(&conf, *r))
            {
                out.push(refuse(format!("replica {r} is not a member")));
                return;
            }
        }
        if voters.is_empty() {
            out.push(refuse("the change would leave no voter".into()));
            return;
        }
        let term = raft.term;
        let mut cc = conf_change(changes);
        if !addresses.is_empty() {
            let context = MembershipContext {
                addresses: addresses.to_vec(),
                promotion: None,
            };
            cc.context = encode_membership_context(&context).into();
        }
        let r = self.node.propose_conf_change(Vec::new(), cc);
        self.note_proposal(id, term, PendingKind::Membership, r, out);
    }

    /// True while a written ready waits for its fsync report
    /// ([`Input::Persisted`]).
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

    fn handle_ready(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        let mut rd = self.node.ready();
        let mut snapshots_sent = Vec::new();
        // Messages that may leave before the fsync (a leader's appends) go
        // out only when the runtime executes the outputs, after `drive`: a
        // ready with any must not hold them back behind an inline fsync.
        let sends_before_sync = !rd.messages().is_empty();
        if !rd.messages().is_empty() {
            let msgs = rd.take_messages();
            self.assert_votes_only_when_voting_in(&msgs, self.status);
            snapshots_sent.extend(
                msgs.iter()
                    .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                    .map(|m| m.to),
            );
            out.push(Output::Send(msgs));
        }
        for rs in rd.read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                out.push(Output::ReadReady {
                    id: u64::from_be_bytes(b),
                    index: rs.index,
                });
            }
        }
        let mut update = LogUpdate::default();
        let mut installed = None;
        if !rd.snapshot().is_empty() {
            let md = rd.snapshot().get_metadata();
            update.snapshot = Some((md.index, md.term));
            update.conf_state = Some(md.get_conf_state().clone());
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
        let committed = rd.take_committed_entries();
        self.apply(&committed, &mut update, out)?;
        // Only entries, snapshots, status and term/vote changes need an
        // fsync; a commit-index-only hard state may be lost and recomputed.
        let needs_sync = rd.must_sync()
            || !update.entries.is_empty()
            || update.snapshot.is_some()
            || update.status.is_some();
        let needs_sync = needs_sync
            && !(bugs::active(self.config.injected_bug, InjectedBug::VoteNotPersisted)
                && update.entries.is_empty()
                && update.snapshot.is_none()
                && update.status.is_none());
        if let Some((index, _)) = &installed {
            // The snapshot's position counts as applied: a held (older)
            // applied position must not be written with it, or the replica
            // would restart with applied < snapshot position, which raft-rs
            // refuses.
            update.applied = Some(*index);
        }
        if let Some(e) = committed.last() {
            update.applied = Some(e.index);
        }
        // An earlier ready's deferred update goes first, within this write
        // (this one's fields are newer).
        if let Some(d) = self.deferred.take() {
            if update.hard_state.is_none() {
                update.hard_state = d.hard_state;
            }
            update.applied = update.applied.max(d.applied);
        }
        debug_assert!(
            installed
                .as_ref()
                .is_none_or(|(index, _)| update.applied >= Some(*index)),
            "a snapshot is written with an applied position at or past it"
        );
        // Inline only when no earlier ready waits for its fsync (persisted
        // reports stay in order), nothing is to be sent before the fsync,
        // and there is no snapshot to report.
        let inline = needs_sync
            && self.inline_sync
            && !sends_before_sync
            && self.unsynced.is_empty()
            && installed.is_none()
            && update.entries.len() <= self.config.inline_sync_max_entries;
        update.sync = inline;
        let pretend_persisted = needs_sync && !inline && self.pretends_durable(&update);
        let inline = inline || pretend_persisted;
        let new_status = update.status;
        let status_before = self.status;
        let only_commit_and_applied = !needs_sync && update.only_commit_and_applied();
        if only_commit_and_applied {
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
        let number = rd.number();
        let persisted_msgs = rd.take_persisted_messages();
        // The status this ready was produced under (a promotion in this
        // ready cannot have produced its vote messages).
        self.assert_votes_only_when_voting_in(&persisted_msgs, status_before);
        let (heartbeat_responses, persisted_msgs): (Vec<Message>, Vec<Message>) = persisted_msgs
            .into_iter()
            .partition(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse);
        // raft-rs files every message of a non-leader as "persisted". A
        // heartbeat response promises nothing about this replica's log or
        // vote (etcd's raft sends it at once too), so it goes out now: held
        // behind a slow fsync (a VM disk stalls for hundreds of ms), it made
        // a live follower look dead to its leader's quorum check, which
        // then deposed the leader.
        if !heartbeat_responses.is_empty() {
            out.push(Output::Send(heartbeat_responses));
        }
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
            assert!(
                self.unsynced.len() < MAX_UNSYNCED_READIES,
                "runtime stopped reporting syncs"
            );
            self.unsynced.push_back(UnsyncedReady {
                number,
                messages: persisted_msgs,
                needs_sync,
                snapshot: installed.as_ref().map(|(index, _)| *index),
            });
            if needs_sync {
                out.push(Output::Sync {
                    ready_number: number,
                });
            }
        } else {
            if !persisted_msgs.is_empty() {
                out.push(Output::Send(persisted_msgs));
            }
            self.node.on_persist_ready(number);
        }
        Ok(())
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

    /// While RECOVERING: acts on a membership this replica now has, from an
    /// applied entry (with the promotion it names, if any) or from an
    /// installed snapshot (`from_entry == false`; a snapshot's membership
    /// never promotes: it may be older than what this replica applied, and
    /// it names no incarnation). See [`judge_own_membership`].
    fn note_own_membership(
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

    fn apply(
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
            let mut membership_applied = false;
            match e.get_entry_type() {
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let mut promotion = None;
                    let cs = if e.get_entry_type() == EntryType::EntryConfChange {
                        let cc: ConfChange = protobuf::Message::parse_from_bytes(&e.data)
                            .map_err(raft::Error::CodecError)?;
                        self.node.apply_conf_change(&cc)
                    } else {
                        let cc: ConfChangeV2 = protobuf::Message::parse_from_bytes(&e.data)
                            .map_err(raft::Error::CodecError)?;
                        if !cc.context.is_empty() {
                            match decode_membership_context(&cc.context) {
                                Some(context) => {
                                    promotion = context.promotion;
                                    if !context.addresses.is_empty() {
                                        update
                                            .member_addresses
                                            .extend(context.addresses.iter().cloned());
                                        out.push(Output::Addresses(context.addresses));
                                    }
                                }
                                None => warn!(
                                    position = e.index,
                                    "membership change with an undecodable context"
                                ),
                            }
                        }
                        self.node.apply_conf_change(&cc)
                    };
                    match cs {
                        Ok(cs) => {
                            info!(replica = self.id, position = e.index, voters = ?cs.voters,
                                  learners = ?cs.learners, outgoing = ?cs.voters_outgoing,
                                  "membership changed");
                            if self.node.raft.state == StateRole::Leader && !is_voter(&cs, self.id)
                            {
                                // A change proposed by an earlier leader removed
                                // or demoted this one. raft-rs would keep leading
                                // without a progress of its own (and panic on the
                                // next commit): step down, the voters elect.
                                let term = self.node.raft.term;
                                warn!(
                                    replica = self.id,
                                    term, "this leader is no longer a voter; stepping down"
                                );
                                self.node.raft.become_follower(term + 1, raft::INVALID_ID);
                            }
                            if let Some(p) = promotion {
                                self.promoted_incarnations
                                    .insert(p.replica_id, p.incarnation);
                            }
                            self.note_own_membership(&cs, true, promotion, update);
                            update.conf_changes.push((e.index, cs));
                            membership_applied = true;
                        }
                        // Every replica refuses the same entry the same way.
                        Err(err) => warn!(position = e.index, error = %err,
                                          "membership change refused by raft; skipped"),
                    }
                }
                EntryType::EntryNormal => match classify(e) {
                    Ok(EntryContent::LeaderNoop) => {
                        if self.node.raft.state == StateRole::Leader
                            && e.term == self.node.raft.term
                        {
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
                    Ok(EntryContent::Command(Command::Append(_)))
                    | Ok(EntryContent::Membership) => {}
                    Err(bad) => warn!(%bad, "skipping an entry that holds no valid command"),
                },
            }
            if let Some(p) = self.pending.remove(&e.index) {
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
        if let Some(to) = update.compact_to {
            let first = self.storage.meta().snapshot_index + 1;
            if to > first {
                out.push(Output::Truncated { first_index: to });
            }
        }
        Ok(())
    }

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
            commit: self.applied,
            applied: self.applied,
            first_index: raft.raft_log.first_index(),
            last_index: raft.raft_log.last_index(),
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

/// The raft-rs change for `changes` (joint consensus when more than one
/// voter changes; left automatically).
fn conf_change(changes: &[MembershipChange]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use replog_storage::MemoryStorage;

    /// Runs the core like the runtime does, with `sync` deciding whether a
    /// requested fsync happens; returns the outputs that are not syncs.
    fn pump(c: &mut ReplicaCore<MemoryStorage>, sync: bool) -> Vec<Output> {
        let mut done = Vec::new();
        for _ in 0..100 {
            let mut out = Vec::new();
            c.drive(&mut out).unwrap();
            let mut synced = None;
            for o in out {
                match o {
                    Output::Sync { ready_number } if sync => {
                        c.storage().sync().unwrap();
                        synced = Some(ready_number);
                    }
                    Output::Sync { .. } => {}
                    other => done.push(other),
                }
            }
            match synced {
                Some(n) => {
                    let mut out = Vec::new();
                    c.step(Input::Persisted { ready_number: n }, &mut out)
                        .unwrap();
                    done.extend(out);
                }
                None => return done,
            }
        }
        panic!("the core did not settle");
    }

    /// (proposal id, position) of every `Committed` output, in order.
    fn committed(outs: &[Output]) -> Vec<(ProposalId, u64)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Committed { id, position } => Some((*id, *position)),
                _ => None,
            })
            .collect()
    }

    fn leader(storage: &MemoryStorage) -> ReplicaCore<MemoryStorage> {
        let mut c = ReplicaCore::new(storage.clone(), &CoreConfig::default()).unwrap();
        pump(&mut c, true);
        assert!(c.progress().leader_ready, "a single voter leads at once");
        c
    }

    fn append(id: u64, s: &str) -> Input {
        Input::Propose {
            id,
            command: Command::Append(Bytes::copy_from_slice(s.as_bytes())),
            writer_term: None,
        }
    }

    #[test]
    fn nothing_is_acknowledged_before_its_sync() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let mut c = leader(&s);
        let mut out = Vec::new();
        for i in 0..10 {
            c.step(append(i, "x"), &mut out).unwrap();
        }
        assert!(out.is_empty());
        // Drive without fsyncs, remembering the syncs asked for.
        let mut drive_out = Vec::new();
        c.drive(&mut drive_out).unwrap();
        let asked: Vec<u64> = drive_out
            .iter()
            .filter_map(|o| match o {
                Output::Sync { ready_number } => Some(*ready_number),
                _ => None,
            })
            .collect();
        assert!(!asked.is_empty(), "new entries need an fsync");
        assert!(
            !drive_out
                .iter()
                .any(|o| matches!(o, Output::Committed { .. })),
            "acknowledged before the fsync: {drive_out:?}"
        );
        assert!(
            pump(&mut c, false).is_empty(),
            "nothing happens until the sync is done"
        );
        c.storage().sync().unwrap();
        let mut synced = Vec::new();
        c.step(
            Input::Persisted {
                ready_number: *asked.iter().max().unwrap(),
            },
            &mut synced,
        )
        .unwrap();
        synced.extend(pump(&mut c, true));
        let acked = committed(&synced);
        assert_eq!(acked.len(), 10, "{synced:?}");
        assert!(acked
            .windows(2)
            .all(|w| w[0].1 + 1 == w[1].1 && w[0].0 + 1 == w[1].0));
    }

    #[test]
    fn a_crash_loses_only_unacknowledged_entries() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let mut c = leader(&s);
        let mut out = Vec::new();
        c.step(append(1, "durable"), &mut out).unwrap();
        let acked = pump(&mut c, true);
        let Some(Output::Committed { position, .. }) = acked.first() else {
            panic!("{acked:?}")
        };
        let position = *position;
        c.step(append(2, "lost"), &mut out).unwrap();
        pump(&mut c, false);
        drop(c);
        s.crash();
        let c = leader(&s);
        let e = raft::Storage::entries(
            c.storage(),
            position,
            position + 1,
            None::<u64>,
            raft::GetEntriesContext::empty(false),
        )
        .unwrap();
        assert_eq!(
            classify(&e[0]).unwrap(),
            EntryContent::Command(Command::Append(Bytes::from_static(b"durable")))
        );
        let last = raft::Storage::last_index(c.storage()).unwrap();
        let tail = raft::Storage::entries(
            c.storage(),
            position + 1,
            last + 1,
            None::<u64>,
            raft::GetEntriesContext::empty(false),
        )
        .unwrap();
        assert!(
            tail.iter()
                .all(|e| classify(e).unwrap() == EntryContent::LeaderNoop),
            "the unsynced entry must not survive the crash: {tail:?}"
        );
    }

    #[test]
    fn a_membership_change_during_another_is_refused_as_retryable() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let mut c = leader(&s);
        let mut out = Vec::new();
        for id in [7, 8] {
            c.step(
                Input::ChangeMembership {
                    id,
                    changes: vec![MembershipChange::AddLearner(id)],
                    addresses: Vec::new(),
                },
                &mut out,
            )
            .unwrap();
        }
        // The first is proposed (not yet applied); the second is not made
        // and says it may succeed later.
        assert!(
            matches!(
                out.as_slice(),
                [Output::Failed {
                    id: 8,
                    error: ProposalError::MembershipInProgress(_)
                }]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn a_writer_of_an_old_term_is_refused() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let mut c = leader(&s);
        let term = c.progress().term;
        let mut out = Vec::new();
        c.step(
            Input::Propose {
                id: 9,
                command: Command::Append(Bytes::from_static(b"x")),
                writer_term: Some(term - 1),
            },
            &mut out,
        )
        .unwrap();
        assert!(matches!(
            out.as_slice(),
            [Output::Failed {
                id: 9,
                error: ProposalError::LeadershipLost { .. }
            }]
        ));
    }

    #[test]
    fn truncation_is_applied_with_the_applied_position() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let mut c = leader(&s);
        let mut out = Vec::new();
        for i in 0..5 {
            c.step(append(i, "x"), &mut out).unwrap();
        }
        let acked = pump(&mut c, true);
        let positions: Vec<u64> = committed(&acked).into_iter().map(|(_, p)| p).collect();
        c.step(
            Input::Propose {
                id: 99,
                command: Command::Truncate(positions[3]),
                writer_term: None,
            },
            &mut out,
        )
        .unwrap();
        let done = pump(&mut c, true);
        assert!(done.iter().any(
            |o| matches!(o, Output::Truncated { first_index } if *first_index == positions[3])
        ));
        let meta = s.meta();
        assert_eq!(meta.snapshot_index + 1, positions[3]);
        assert!(meta.applied_index > positions[4]);
    }

    #[test]
    fn a_recovering_replica_never_campaigns_or_votes() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1, 2, 3]);
        s.write(LogUpdate {
            status: Some(ReplicaStatus::Recovering),
            ..Default::default()
        })
        .unwrap();
        let cfg = CoreConfig {
            peers: vec![2, 3],
            ..Default::default()
        };
        let mut c = ReplicaCore::new(s, &cfg).unwrap();
        let mut out = Vec::new();
        for _ in 0..200 {
            c.step(Input::Tick, &mut out).unwrap();
        }
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVote);
        vote.from = 2;
        vote.to = 1;
        vote.term = 5;
        vote.log_term = 1;
        vote.index = 1;
        c.step(Input::Message(Box::new(vote)), &mut out).unwrap();
        out.extend(pump(&mut c, true));
        let raft_msgs: Vec<&Message> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(m) => Some(m.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(raft_msgs.is_empty(), "sent raft messages: {raft_msgs:?}");
        assert!(out.iter().any(|o| matches!(
            o,
            Output::SendPeer {
                msg: PeerMessage::RecoverRequest {
                    status: ReplicaStatus::Recovering,
                    ..
                },
                ..
            }
        )));
        assert_eq!(c.progress().term, 1, "the vote request was not even seen");
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
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

    fn conf_entry(index: u64, change: MembershipChange, promotion: Option<Promotion>) -> Entry {
        let mut cc = conf_change(&[change]);
        if promotion.is_some() {
            let context = MembershipContext {
                addresses: Vec::new(),
                promotion,
            };
            cc.context = encode_membership_context(&context).into();
        }
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.index = index;
        e.term = 2;
        e.data = protobuf::Message::write_to_bytes(&cc).unwrap().into();
        e
    }

    /// Feeds replica 3 (RECOVERING, incarnation 7) the leader's entries
    /// 2.. and returns its status after it applied them.
    fn replay(entries: Vec<Entry>, bug: Option<InjectedBug>) -> ReplicaStatus {
        let s = MemoryStorage::new_initialized("t", 3, vec![1, 2, 3]);
        s.write(LogUpdate {
            status: Some(ReplicaStatus::Recovering),
            ..Default::default()
        })
        .unwrap();
        s.sync().unwrap();
        let cfg = CoreConfig {
            peers: vec![1, 2],
            incarnation: 7,
            injected_bug: bug,
            ..Default::default()
        };
        let mut c = ReplicaCore::new(s, &cfg).unwrap();
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 3;
        m.term = 2;
        m.log_term = 1;
        m.index = 1;
        m.commit = entries.last().map_or(1, |e| e.index);
        m.set_entries(entries.into());
        let mut out = Vec::new();
        c.step(Input::Message(Box::new(m)), &mut out).unwrap();
        pump(&mut c, true);
        assert_eq!(c.storage().meta().status, c.status(), "status is persisted");
        c.status()
    }

    /// The bug the fault campaign found: a replica wiped twice replays the
    /// demotion and promotion of its first rejoin and must not turn VOTING
    /// on them; only the promotion of its current incarnation counts.
    #[test]
    fn replaying_an_earlier_incarnations_promotion_does_not_make_it_voting() {
        let old_promotion = Some(Promotion {
            replica_id: 3,
            incarnation: 6,
        });
        let earlier_rejoin = vec![
            conf_entry(2, MembershipChange::AddLearner(3), None),
            conf_entry(3, MembershipChange::AddVoter(3), old_promotion),
        ];
        assert_eq!(
            replay(earlier_rejoin.clone(), None),
            ReplicaStatus::Recovering
        );
        let mut this_rejoin = earlier_rejoin.clone();
        this_rejoin.push(conf_entry(4, MembershipChange::AddLearner(3), None));
        this_rejoin.push(conf_entry(
            5,
            MembershipChange::AddVoter(3),
            Some(Promotion {
                replica_id: 3,
                incarnation: 7,
            }),
        ));
        assert_eq!(replay(this_rejoin, None), ReplicaStatus::Voting);
        // The switch that puts the bug back does put it back.
        assert_eq!(
            replay(earlier_rejoin, Some(InjectedBug::EarlyVoting)),
            ReplicaStatus::Voting
        );
    }

    #[test]
    fn a_recover_request_delayed_past_its_promotion_does_not_demote() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        let cfg = CoreConfig {
            peers: vec![2],
            ..Default::default()
        };
        let mut c = ReplicaCore::new(s, &cfg).unwrap();
        pump(&mut c, true);
        assert!(c.progress().leader_ready);
        let change = |c: &mut ReplicaCore<MemoryStorage>, id, ch| {
            let mut out = Vec::new();
            c.step(
                Input::ChangeMembership {
                    id,
                    changes: vec![ch],
                    addresses: Vec::new(),
                },
                &mut out,
            )
            .unwrap();
            out.extend(pump(c, true));
            assert!(committed(&out).iter().any(|(p, _)| *p == id), "{out:?}");
        };
        let recover = |c: &mut ReplicaCore<MemoryStorage>, incarnation| {
            let mut out = Vec::new();
            c.step(
                Input::Peer {
                    from: 2,
                    msg: PeerMessage::RecoverRequest {
                        status: ReplicaStatus::Recovering,
                        last_index: 0,
                        incarnation,
                    },
                },
                &mut out,
            )
            .unwrap();
        };
        // Replica 2 recovers as a learner (incarnation 11), catches up and
        // is promoted by the leader, naming incarnation 11.
        change(&mut c, 1, MembershipChange::AddLearner(2));
        recover(&mut c, 11);
        let committed = c.node.raft.raft_log.committed;
        c.node.raft.mut_prs().get_mut(2).unwrap().matched = committed;
        let mut out = Vec::new();
        c.step(Input::Tick, &mut out).unwrap();
        pump(&mut c, true);
        assert!(c.node.raft.prs().conf().to_conf_state().voters.contains(&2));
        assert_eq!(c.promoted_incarnations.get(&2), Some(&11));
        // A request of that incarnation arrives late: no demotion.
        recover(&mut c, 11);
        assert!(
            !c.node.raft.has_pending_conf(),
            "demoted on a stale request"
        );
        // A request of a new incarnation (it restarted or lost its data):
        // the leader demotes it.
        recover(&mut c, 12);
        assert!(
            c.node.raft.has_pending_conf(),
            "a new incarnation is demoted"
        );
    }

    #[test]
    fn a_heartbeat_response_does_not_wait_for_a_pending_fsync() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1, 2, 3]);
        let last = s
            .meta()
            .snapshot_index
            .max(raft::Storage::last_index(&s).unwrap());
        let last_term = raft::Storage::term(&s, last).unwrap();
        let cfg = CoreConfig {
            peers: vec![2, 3],
            ..Default::default()
        };
        let mut c = ReplicaCore::new(s, &cfg).unwrap();
        let sent = |out: &[Output], kind: MessageType| {
            out.iter()
                .filter_map(|o| match o {
                    Output::Send(m) => Some(m.iter()),
                    _ => None,
                })
                .flatten()
                .any(|m| m.get_msg_type() == kind)
        };
        // Leader 2 (term 2) appends an entry: it needs an fsync, which the
        // runtime has not reported yet.
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        (append.from, append.to, append.term) = (2, 1, 2);
        (append.index, append.log_term, append.commit) = (last, last_term, last);
        let mut e = Entry::default();
        (e.index, e.term) = (last + 1, 2);
        append.entries = vec![e].into();
        let mut out = Vec::new();
        c.step(Input::Message(Box::new(append)), &mut out).unwrap();
        c.drive(&mut out).unwrap();
        let ready_number = out
            .iter()
            .find_map(|o| match o {
                Output::Sync { ready_number } => Some(*ready_number),
                _ => None,
            })
            .expect("the append asks for an fsync");
        assert!(
            !sent(&out, MessageType::MsgAppendResponse),
            "not before the fsync"
        );
        // A heartbeat meanwhile is answered at once.
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term, hb.commit) = (2, 1, 2, last);
        let mut out = Vec::new();
        c.step(Input::Message(Box::new(hb)), &mut out).unwrap();
        c.drive(&mut out).unwrap();
        assert!(sent(&out, MessageType::MsgHeartbeatResponse));
        assert!(
            !sent(&out, MessageType::MsgAppendResponse),
            "still not before the fsync"
        );
        // The append's answer leaves once the fsync is reported.
        let mut out = Vec::new();
        c.step(Input::Persisted { ready_number }, &mut out).unwrap();
        c.drive(&mut out).unwrap();
        assert!(sent(&out, MessageType::MsgAppendResponse));
    }
}
