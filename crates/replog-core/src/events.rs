//! The core's vocabulary: what goes in ([`Input`]), what comes out
//! ([`Output`]), and its tunables ([`CoreConfig`]). Nothing here does I/O
//! or decides anything; the decisions are in [`crate::replica`].

use raft::eraftpb::Message;
use replog_storage::bugs::InjectedBug;
use replog_storage::{Member, ReplicaStatus};

use crate::command::Command;

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
        /// The answering replica's applied position (on the wire: the
        /// `commit` field of `RecoverResponse`).
        applied: u64,
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
    /// Last position applied here: committed, and durable on this replica.
    /// Every position up to it may be read. (There is no separate commit
    /// index: raft-rs's may run ahead of what this replica holds durably,
    /// and nothing outside the core may act on that.)
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// This replica votes in its current configuration (incoming or
    /// outgoing); false for a learner (catching up, or isolated by the
    /// repair coordinator).
    pub voter: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            status: ReplicaStatus::Empty,
            term: 0,
            leader: None,
            is_leader: false,
            leader_ready: false,
            applied: 0,
            first_index: 0,
            last_index: 0,
            voter: false,
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
    #[error("the stored repair state is unreadable: {0}")]
    RepairState(replog_repair::Rejected),
}
