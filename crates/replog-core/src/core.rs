//! [`ReplicaCore`]: one replica's decision logic around raft-rs `RawNode`.
//!
//! It is free of I/O of its own: [`Input`]s go in, [`Output`]s come out. It
//! writes through [`LogStorage::write`] (visible at once, not yet durable)
//! and asks for durability with [`Output::Sync`]; the runtime fsyncs and
//! feeds [`Input::Persisted`] back. Under a deterministic harness the same
//! code runs on [`replog_storage::MemoryStorage`].
//!
//! The ready loop follows raft-rs's documented order for asynchronous
//! persistence: send `messages` at once, write entries and hard state,
//! apply committed entries, `advance_append_async`; send
//! `persisted_messages` only after the sync of that ready
//! (`on_persist_ready`).
//!
//! Invariants:
//! - a proposal is reported [`Output::Committed`] only once its entry is
//!   committed, applied and durable on this replica (for a single replica:
//!   after the fsync that covered it);
//! - many proposals share one ready and one sync (group commit): the
//!   runtime hands in every proposal that arrived while the previous sync ran;
//! - `applied` is written in the same batch as the effects of the entries
//!   it covers (truncation), so a crash never applies an entry twice.

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{Config, RawNode, StateRole};
use replog_storage::{LogStorage, LogUpdate, ReplicaStatus};
use tracing::{debug, info, warn};

use crate::command::{classify, Command, EntryContent};

/// Identifies a proposal between the runtime and the core.
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
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            max_uncommitted_bytes: 256 * 1024 * 1024,
            max_bytes_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
        }
    }
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
    /// Everything the core wrote up to and including the ready with this
    /// number is durable.
    Persisted { ready_number: u64 },
    /// A Raft message from a peer.
    Message(Box<Message>),
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
}

/// Progress of the log, published after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
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

/// An action for the runtime.
#[derive(Debug)]
pub enum Output {
    /// fsync everything written so far, then send
    /// `Input::Persisted { ready_number }`.
    Sync { ready_number: u64 },
    /// Send these messages to peers.
    Send(Vec<Message>),
    /// The proposal is committed at `position` and applied.
    Committed { id: ProposalId, position: u64 },
    /// The proposal failed.
    Failed {
        id: ProposalId,
        error: ProposalError,
    },
    /// Entries before `first_index` were removed; their space can be reclaimed.
    Truncated { first_index: u64 },
}

/// Errors that stop the core: storage failed or raft-rs refused its state.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("replica storage failed: {0}")]
    Storage(#[from] replog_storage::StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("replica is {0}, not VOTING: it may not take part in the log until it has recovered")]
    NotVoting(ReplicaStatus),
}

struct UnsyncedReady {
    number: u64,
    messages: Vec<Message>,
    needs_sync: bool,
}

struct Pending {
    term: u64,
    id: ProposalId,
}

/// Bound on readies written but not yet reported persisted.
const MAX_UNSYNCED_READIES: usize = 4096;

/// The replica's decision logic. See the module docs.
pub struct ReplicaCore<S: LogStorage> {
    node: RawNode<S>,
    storage: S,
    id: u64,
    /// Proposals by position, waiting for commit.
    pending: BTreeMap<u64, Pending>,
    /// Readies written but not yet reported durable, in order, with their
    /// persisted messages and whether they need an fsync at all.
    unsynced: VecDeque<UnsyncedReady>,
    leader_ready: bool,
    last_role: StateRole,
    applied: u64,
}

impl<S: LogStorage> ReplicaCore<S> {
    /// Starts the core on an opened storage. Refuses a replica that is not
    /// VOTING: it must rejoin a cluster first.
    pub fn new(storage: S, config: &CoreConfig) -> Result<Self, CoreError> {
        let meta = storage.meta();
        if meta.status != ReplicaStatus::Voting {
            return Err(CoreError::NotVoting(meta.status));
        }
        let cfg = Config {
            id: meta.replica_id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied: meta.applied_index,
            max_size_per_msg: config.max_bytes_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            max_uncommitted_size: config.max_uncommitted_bytes,
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        };
        cfg.validate()?;
        let logger = crate::slog_bridge::logger(meta.replica_id);
        let mut node = RawNode::new(&cfg, storage.clone(), &logger)?;
        let voters = &meta.conf_state.voters;
        if voters.len() == 1 && voters[0] == meta.replica_id {
            // A cluster of one needs no election timeout to find its leader.
            node.campaign()?;
        }
        Ok(ReplicaCore {
            node,
            storage,
            id: meta.replica_id,
            pending: BTreeMap::new(),
            unsynced: VecDeque::new(),
            leader_ready: false,
            last_role: StateRole::Follower,
            applied: meta.applied_index,
        })
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The storage the core writes to.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Number of proposals waiting for commit.
    pub fn pending_proposals(&self) -> usize {
        self.pending.len()
    }

    /// Feeds one input; outputs are appended to `out`. Call [`Self::drive`]
    /// after a batch of inputs.
    pub fn step(&mut self, input: Input, out: &mut Vec<Output>) -> Result<(), CoreError> {
        match input {
            Input::Tick => {
                self.node.tick();
            }
            Input::Propose {
                id,
                command,
                writer_term,
            } => self.propose(id, command, writer_term, out),
            Input::Persisted { ready_number } => {
                // Readies up to `ready_number` are durable; readies after them
                // that needed no fsync ride along.
                let mut done = None;
                while let Some(front) = self.unsynced.front() {
                    if front.number > ready_number && front.needs_sync {
                        break;
                    }
                    let r = self.unsynced.pop_front().expect("front exists");
                    if !r.messages.is_empty() {
                        out.push(Output::Send(r.messages));
                    }
                    done = Some(r.number);
                }
                if let Some(n) = done {
                    self.node.on_persist_ready(n);
                }
            }
            Input::Message(m) => {
                if let Err(e) = self.node.step(*m) {
                    debug!(error = %e, "dropped a raft message");
                }
            }
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
        if raft.state != StateRole::Leader {
            let leader = (raft.leader_id != 0).then_some(raft.leader_id);
            out.push(Output::Failed {
                id,
                error: ProposalError::NotLeader { leader },
            });
            return;
        }
        let term = raft.term;
        match self.node.propose(Vec::new(), command.encode()) {
            Ok(()) => {
                let position = self.node.raft.raft_log.last_index();
                let prev = self.pending.insert(position, Pending { term, id });
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

    /// Processes everything raft-rs has ready: writes, applies, and emits
    /// outputs. Returns the log's progress afterwards.
    pub fn drive(&mut self, out: &mut Vec<Output>) -> Result<Progress, CoreError> {
        while self.node.has_ready() {
            self.handle_ready(out)?;
        }
        self.note_role_change(out);
        Ok(self.progress())
    }

    fn handle_ready(&mut self, out: &mut Vec<Output>) -> Result<(), CoreError> {
        let mut rd = self.node.ready();
        if !rd.messages().is_empty() {
            out.push(Output::Send(rd.take_messages()));
        }
        let mut update = LogUpdate::default();
        if !rd.snapshot().is_empty() {
            let md = rd.snapshot().get_metadata();
            update.snapshot = Some((md.index, md.term));
            update.conf_state = Some(md.get_conf_state().clone());
        }
        update.entries = rd.take_entries();
        if let Some(hs) = rd.hs() {
            update.hard_state = Some(hs.clone());
        }
        let committed = rd.take_committed_entries();
        self.apply(&committed, &mut update, out)?;
        // Only entries, snapshots and term/vote changes need an fsync; a
        // commit-index-only hard state may be lost and recomputed.
        let needs_sync = rd.must_sync() || !update.entries.is_empty() || update.snapshot.is_some();
        if let Some(e) = committed.last() {
            update.applied = Some(e.index);
        }
        self.storage.write(update)?;
        let number = rd.number();
        let persisted_msgs = rd.take_persisted_messages();
        self.node.advance_append_async(rd);
        if let Some(e) = committed.last() {
            self.applied = e.index;
            self.node.advance_apply_to(e.index);
        }
        if needs_sync || !self.unsynced.is_empty() {
            assert!(
                self.unsynced.len() < MAX_UNSYNCED_READIES,
                "runtime stopped reporting syncs"
            );
            self.unsynced.push_back(UnsyncedReady {
                number,
                messages: persisted_msgs,
                needs_sync,
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
            match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc: ConfChange = protobuf::Message::parse_from_bytes(&e.data)
                        .map_err(raft::Error::CodecError)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    update.conf_state = Some(cs);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc: ConfChangeV2 = protobuf::Message::parse_from_bytes(&e.data)
                        .map_err(raft::Error::CodecError)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    update.conf_state = Some(cs);
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
                if p.term == e.term {
                    out.push(Output::Committed {
                        id: p.id,
                        position: e.index,
                    });
                } else {
                    out.push(Output::Failed {
                        id: p.id,
                        error: ProposalError::LeadershipLost { term: p.term },
                    });
                }
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
    fn a_replica_that_is_not_voting_does_not_run() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        s.write(LogUpdate {
            status: Some(ReplicaStatus::Recovering),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(
            ReplicaCore::new(s, &CoreConfig::default()),
            Err(CoreError::NotVoting(ReplicaStatus::Recovering))
        ));
    }
}
