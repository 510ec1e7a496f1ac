//! Scenario tests of the whole core on [`MemoryStorage`]: a replica
//! driven the way the runtime drives it (`pump`), with fsyncs that happen
//! or not, crashes, and hand-made Raft messages. The pure decisions have
//! their table tests next to them.

use bytes::Bytes;
use raft::eraftpb::{Entry, EntryType, Message, MessageType};
use replog_storage::{
    LogStorage, LogUpdate, MembershipContext, MemoryStorage, Promotion, ReplicaStatus,
};

use super::membership::conf_change;
use super::*;
use crate::command::{classify, EntryContent};
use crate::events::{MembershipChange, PeerMessage};
use crate::InjectedBug;

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

/// Replica 1 of {1, 2, 3}, a follower, with the position and term of its
/// last entry.
fn follower_of_three() -> (ReplicaCore<MemoryStorage>, u64, u64) {
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
    (ReplicaCore::new(s, &cfg).unwrap(), last, last_term)
}

/// Replica 1, the single voter and leader, with replica 2 added as a
/// learner (the change applied).
fn leader_with_learner_2(cfg: CoreConfig) -> ReplicaCore<MemoryStorage> {
    let s = MemoryStorage::new_initialized("t", 1, vec![1]);
    let mut c = ReplicaCore::new(s, &cfg).unwrap();
    pump(&mut c, true);
    let mut out = Vec::new();
    c.step(
        Input::ChangeMembership {
            id: 1,
            changes: vec![MembershipChange::AddLearner(2)],
            addresses: Vec::new(),
        },
        &mut out,
    )
    .unwrap();
    pump(&mut c, true);
    c
}

/// The ready number of the first fsync `out` asks for.
fn sync_asked(out: &[Output]) -> Option<u64> {
    out.iter().find_map(|o| match o {
        Output::Sync { ready_number } => Some(*ready_number),
        _ => None,
    })
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

/// The writer of the current term writes (cargo-mutants: `propose`'s
/// writer-term check with `raft.state != Leader` as `==`, or
/// `!self.leader_ready` as `leader_ready`, refused every current writer and
/// no test proposed with a term); one of an earlier term never does.
#[test]
fn the_current_terms_writer_writes_and_an_earlier_ones_never() {
    let s = MemoryStorage::new_initialized("t", 1, vec![1]);
    let mut c = leader(&s);
    let term = c.progress().term;
    for (id, writer_term, writes) in [(1, term, true), (2, term - 1, false), (3, term + 1, false)] {
        let mut out = Vec::new();
        let command = Command::Append(Bytes::from_static(b"x"));
        let writer_term = Some(writer_term);
        c.step(
            Input::Propose {
                id,
                command,
                writer_term,
            },
            &mut out,
        )
        .unwrap();
        out.extend(pump(&mut c, true));
        let wrote = committed(&out).iter().any(|(p, _)| *p == id);
        assert_eq!(
            wrote, writes,
            "writer of term {writer_term:?} in term {term}: {out:?}"
        );
        if !writes {
            assert!(out.iter().any(|o| matches!(o, Output::Failed {
                id: i,
                error: ProposalError::LeadershipLost { .. }
            } if *i == id)));
        }
    }
}

/// A leader answers a linearizable read with the position to wait for
/// (cargo-mutants: `report_read_states` replaced by `()` left every read
/// to time out, and neither the table tests nor the cluster harness read).
#[test]
fn a_leader_answers_a_linearizable_read_with_its_commit_position() {
    let s = MemoryStorage::new_initialized("t", 1, vec![1]);
    let mut c = leader(&s);
    let mut out = Vec::new();
    c.step(append(1, "a"), &mut out).unwrap();
    out.extend(pump(&mut c, true));
    let (_, position) = committed(&out)[0];
    let mut out = Vec::new();
    c.step(Input::ReadIndex { id: 7 }, &mut out).unwrap();
    out.extend(pump(&mut c, true));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::ReadReady { id: 7, index } if *index >= position)),
        "{out:?}"
    );
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
    assert!(done
        .iter()
        .any(|o| matches!(o, Output::Truncated { first_index } if *first_index == positions[3])));
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

fn conf_entry(index: u64, change: MembershipChange, promotion: Option<Promotion>) -> Entry {
    let context = MembershipContext {
        addresses: Vec::new(),
        promotion,
    };
    let cc = conf_change(&[change], context);
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
    let (mut c, last, last_term) = follower_of_three();
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
    let ready_number = sync_asked(&out).expect("the append asks for an fsync");
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

/// The replica lifecycle table of ARCHITECTURE.md, its "Raft traffic",
/// "ticks" and "votes" columns, row by row (the "becomes" column is
/// `recover::tests::what_a_replica_becomes_given_the_recover_answers_as_a_table`
/// and `membership::tests::the_rejoin_rule_as_a_table`).
#[test]
fn the_replica_lifecycle_as_a_table() {
    use MessageType::*;
    use ReplicaStatus::*;
    let catch_up = [MsgAppend, MsgHeartbeat, MsgSnapshot];
    let elections = [MsgRequestVote, MsgRequestPreVote, MsgTimeoutNow];
    // status, takes appends/heartbeats/snapshots, takes vote traffic, ticks
    #[rustfmt::skip]
    let rows = [
        (Empty,      false, false, false),
        (Starting,   false, false, false),
        (Recovering, true,  false, false),
        (Voting,     true,  true,  true),
    ];
    for (status, takes_catch_up, takes_elections, ticks) in rows {
        for kind in catch_up {
            assert_eq!(
                admits_raft_message(status, kind),
                takes_catch_up,
                "{status} {kind:?}"
            );
        }
        for kind in elections {
            assert_eq!(
                admits_raft_message(status, kind),
                takes_elections,
                "{status} {kind:?}"
            );
        }
        // Answers to its own requests: only a VOTING replica sends any.
        assert_eq!(
            admits_raft_message(status, MsgRequestVoteResponse),
            status != Empty && status != Starting,
            "{status}"
        );
        assert_eq!(ticks_raft(status), ticks, "{status}");
    }
}

/// Feeds a recover-protocol message from `from`; returns the outputs.
fn peer(c: &mut ReplicaCore<MemoryStorage>, from: u64, msg: PeerMessage) -> Vec<Output> {
    let mut out = Vec::new();
    c.step(Input::Peer { from, msg }, &mut out).unwrap();
    out
}

fn answer(status: ReplicaStatus) -> PeerMessage {
    PeerMessage::RecoverResponse {
        status,
        term: 0,
        leader: 0,
        applied: 0,
    }
}

/// A vote is durable before the answer that grants it leaves: killed by
/// deferring a term/vote change like a commit-index-only one.
#[test]
fn a_vote_is_durable_before_its_answer_leaves() {
    let s = MemoryStorage::new_initialized("t", 1, vec![1, 2, 3]);
    let cfg = CoreConfig {
        peers: vec![2, 3],
        ..Default::default()
    };
    let mut c = ReplicaCore::new(s.clone(), &cfg).unwrap();
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestVote);
    (vote.from, vote.to, vote.term) = (2, 1, 5);
    (vote.log_term, vote.index) = (1, 1);
    let mut out = Vec::new();
    c.step(Input::Message(Box::new(vote)), &mut out).unwrap();
    c.drive(&mut out).unwrap();
    let granted = |out: &[Output]| {
        out.iter().any(|o| {
            matches!(o, Output::Send(ms) if ms.iter().any(|m| {
                m.get_msg_type() == MessageType::MsgRequestVoteResponse && !m.reject
            }))
        })
    };
    let ready_number = sync_asked(&out).expect("a vote asks for an fsync");
    assert!(!granted(&out), "the vote left before its fsync: {out:?}");
    s.sync().unwrap();
    let mut out = Vec::new();
    c.step(Input::Persisted { ready_number }, &mut out).unwrap();
    assert!(granted(&out), "{out:?}");
    drop(c);
    s.crash();
    let hs = s.meta().hard_state;
    assert_eq!((hs.term, hs.vote), (5, 2), "the vote survives a crash");
}

/// A leader that hears a member report a shorter log than it acknowledged
/// stops counting the lost positions (else a wiped follower would count
/// towards a quorum for entries it no longer holds).
#[test]
fn a_member_that_lost_positions_is_probed_from_what_it_holds() {
    let mut c = leader_with_learner_2(CoreConfig {
        peers: vec![2],
        auto_promote: false,
        ..Default::default()
    });
    let last = c.node.raft.raft_log.last_index();
    c.node.raft.mut_prs().get_mut(2).unwrap().matched = last;
    let request = |last_index| PeerMessage::RecoverRequest {
        status: ReplicaStatus::Recovering,
        last_index,
        incarnation: 9,
    };
    peer(&mut c, 2, request(last));
    assert_eq!(
        c.node.raft.prs().get(2).unwrap().matched,
        last,
        "nothing lost"
    );
    peer(&mut c, 2, request(0));
    assert_eq!(
        c.node.raft.prs().get(2).unwrap().matched,
        0,
        "lost positions"
    );
}

/// A learner that never announced an incarnation (a VOTING replica an
/// operator made a learner) is promoted unnamed, but only after two
/// recover rounds of grace; one that announced one is promoted at once.
#[test]
fn an_unnamed_promotion_waits_for_its_grace() {
    let recover_interval_ticks = 5;
    let start = |announce: bool| {
        let mut c = leader_with_learner_2(CoreConfig {
            peers: vec![2],
            recover_interval_ticks,
            ..Default::default()
        });
        if announce {
            let request = PeerMessage::RecoverRequest {
                status: ReplicaStatus::Recovering,
                last_index: 0,
                incarnation: 4,
            };
            peer(&mut c, 2, request);
        }
        let committed = c.node.raft.raft_log.committed;
        c.node.raft.mut_prs().get_mut(2).unwrap().matched = committed;
        c
    };
    let promoted_after = |mut c: ReplicaCore<MemoryStorage>| {
        for tick in 1..=100u64 {
            let mut out = Vec::new();
            c.step(Input::Tick, &mut out).unwrap();
            if c.node.raft.has_pending_conf() {
                return tick;
            }
        }
        panic!("never promoted");
    };
    assert_eq!(promoted_after(start(true)), 1, "named: at the first tick");
    let unnamed = promoted_after(start(false));
    assert_eq!(
        unnamed,
        1 + 2 * recover_interval_ticks,
        "unnamed: after two recover rounds"
    );
}

/// An EMPTY replica that hears a VOTING answer persists RECOVERING before
/// it acts on it.
#[test]
fn an_empty_replica_persists_recovering_when_the_cluster_is_live() {
    let s = MemoryStorage::new_empty("t", 3);
    let cfg = CoreConfig {
        peers: vec![1, 2],
        ..Default::default()
    };
    let mut c = ReplicaCore::new(s.clone(), &cfg).unwrap();
    let out = peer(&mut c, 1, answer(ReplicaStatus::Voting));
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::StatusChanged {
                status: ReplicaStatus::Recovering
            }
        )),
        "{out:?}"
    );
    s.crash();
    assert_eq!(s.meta().status, ReplicaStatus::Recovering, "synced");
}

/// The second phase of auto-initialization founds exactly the log
/// `replog initialize` would: every configured replica a voter, the
/// founding snapshot at position 1 of term 1, VOTING, all synced.
#[test]
fn auto_initialization_founds_the_initial_log() {
    let s = MemoryStorage::new_empty("t", 3);
    let cfg = CoreConfig {
        peers: vec![1, 2],
        auto_initialize: true,
        ..Default::default()
    };
    let mut c = ReplicaCore::new(s.clone(), &cfg).unwrap();
    peer(&mut c, 1, answer(ReplicaStatus::Empty));
    peer(&mut c, 2, answer(ReplicaStatus::Empty));
    assert_eq!(c.status(), ReplicaStatus::Starting);
    assert_eq!(s.meta().status, ReplicaStatus::Starting);
    peer(&mut c, 1, answer(ReplicaStatus::Starting));
    let out = peer(&mut c, 2, answer(ReplicaStatus::Starting));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::StatusChanged {
            status: ReplicaStatus::Voting
        }
    )));
    s.crash();
    let meta = s.meta();
    assert_eq!(meta.status, ReplicaStatus::Voting);
    assert_eq!(meta.conf_state.voters, vec![1, 2, 3]);
    assert_eq!((meta.snapshot_index, meta.snapshot_term), (1, 1));
    assert_eq!((meta.hard_state.term, meta.hard_state.commit), (1, 1));
    assert_eq!(meta.applied_index, 1);
    assert_eq!(c.progress().applied, 1);
}

/// A replica that cannot serve one (EMPTY, STARTING) refuses a
/// linearizable read at once instead of leaving it to time out; only a
/// VOTING leader hands leadership over.
#[test]
fn reads_and_leader_transfers_are_refused_where_they_cannot_work() {
    let s = MemoryStorage::new_empty("t", 3);
    let mut c = ReplicaCore::new(s, &CoreConfig::default()).unwrap();
    let mut out = Vec::new();
    c.step(Input::ReadIndex { id: 7 }, &mut out).unwrap();
    assert!(
        matches!(
            out.as_slice(),
            [Output::Failed {
                id: 7,
                error: ProposalError::NotLeader { leader: None }
            }]
        ),
        "{out:?}"
    );
    // A follower of three does not start a transfer; the leader does.
    let s = MemoryStorage::new_initialized("t", 1, vec![1, 2, 3]);
    let cfg = CoreConfig {
        peers: vec![2, 3],
        ..Default::default()
    };
    let mut c = ReplicaCore::new(s, &cfg).unwrap();
    c.step(Input::TransferLeader { to: 2 }, &mut out).unwrap();
    assert_eq!(
        c.node.raft.lead_transferee, None,
        "a follower transfers nothing"
    );
    let s = MemoryStorage::new_initialized("t", 1, vec![1]);
    let mut c = leader(&s);
    c.step(
        Input::ChangeMembership {
            id: 1,
            changes: vec![MembershipChange::AddVoter(2)],
            addresses: Vec::new(),
        },
        &mut out,
    )
    .unwrap();
    pump(&mut c, true);
    c.step(Input::TransferLeader { to: 2 }, &mut out).unwrap();
    assert_eq!(
        c.node.raft.lead_transferee,
        Some(2),
        "the leader starts one"
    );
}

/// A follower's answer in a ready that itself needs no fsync still waits
/// for the fsync of an earlier ready: it acknowledges the earlier ready's
/// entries too (killed by letting such a ready's persisted messages go
/// out while an earlier one waits).
#[test]
fn a_later_answer_never_overtakes_an_earlier_pending_fsync() {
    let (mut c, last, last_term) = follower_of_three();
    let append = |index, log_term, entries: Vec<Entry>| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        (m.from, m.to, m.term) = (2, 1, 2);
        (m.index, m.log_term, m.commit) = (index, log_term, last);
        m.entries = entries.into();
        Input::Message(Box::new(m))
    };
    let acked = |out: &[Output]| {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(m) => Some(m.iter()),
                _ => None,
            })
            .flatten()
            .filter(|m| m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject)
            .map(|m| m.index)
            .max()
    };
    let mut e = Entry::default();
    (e.index, e.term) = (last + 1, 2);
    let mut out = Vec::new();
    c.step(append(last, last_term, vec![e]), &mut out).unwrap();
    c.drive(&mut out).unwrap();
    let ready_number = sync_asked(&out).expect("the entry asks for an fsync");
    assert_eq!(acked(&out), None, "not before the fsync");
    // The leader probes again with nothing new: the answer needs no fsync
    // of its own, but it covers position last + 1.
    let mut out = Vec::new();
    c.step(append(last + 1, 2, Vec::new()), &mut out).unwrap();
    c.drive(&mut out).unwrap();
    assert_eq!(acked(&out), None, "overtook the pending fsync: {out:?}");
    let mut out = Vec::new();
    c.step(Input::Persisted { ready_number }, &mut out).unwrap();
    c.drive(&mut out).unwrap();
    assert_eq!(acked(&out), Some(last + 1), "{out:?}");
}

fn repair(id: u64, record: &replog_repair::Record) -> Input {
    Input::Propose {
        id,
        command: Command::Repair(record.encode().into()),
        writer_term: None,
    }
}

fn signal(replica: u64) -> replog_repair::Record {
    replog_repair::Record::Signal(replog_repair::record::Signal {
        replica,
        signal: "disk_free".into(),
        details: String::new(),
        outside_ms: 0,
        source: "test".into(),
        reported_at_ms: 1,
        expires_at_ms: 1_000,
    })
}

fn isolate(replica: u64) -> replog_repair::Record {
    replog_repair::Record::Isolated(replog_repair::record::Isolated {
        replica,
        spare: None,
        spare_address: String::new(),
        mode: replog_repair::Mode::Execute,
        at_ms: 2,
        term: 1,
        max_removals: None,
        rate_limit: None,
    })
}

/// Repair records are folded into the repair state with the applied
/// position that covers them, survive a restart and the truncation of
/// every entry that carried them, and a bad one is refused, not fatal.
#[test]
fn repair_records_fold_into_a_state_that_outlives_their_entries() {
    let s = MemoryStorage::new_initialized("t", 1, vec![1]);
    let mut c = leader(&s);
    let mut out = Vec::new();
    c.step(repair(1, &signal(3)), &mut out).unwrap();
    c.step(
        Input::Propose {
            id: 2,
            command: Command::Repair(Bytes::from_static(b"not a record")),
            writer_term: None,
        },
        &mut out,
    )
    .unwrap();
    c.step(append(3, "x"), &mut out).unwrap();
    let acked = pump(&mut c, true);
    let positions: Vec<u64> = committed(&acked).into_iter().map(|(_, p)| p).collect();
    assert_eq!(positions.len(), 3, "all three commit: {acked:?}");
    let state = c.repair_state().clone();
    assert!(state.cases.contains_key(&3));
    assert_eq!(state.refused, 1);
    assert_eq!(state.applied_through, positions[1]);
    assert_eq!(
        replog_repair::RepairState::decode(&s.repair_state()).unwrap(),
        state,
        "persisted"
    );
    // Readers never see repair records.
    let data: Vec<Entry> = raft::Storage::entries(
        &s,
        positions[0],
        positions[2] + 1,
        None,
        raft::GetEntriesContext::empty(false),
    )
    .unwrap();
    let app: Vec<_> = data
        .iter()
        .filter(|e| matches!(classify(e), Ok(EntryContent::Command(Command::Append(_)))))
        .collect();
    assert_eq!(app.len(), 1);
    // Truncate past every repair entry, restart: the state is still there.
    c.step(
        Input::Propose {
            id: 4,
            command: Command::Truncate(positions[2] + 1),
            writer_term: None,
        },
        &mut out,
    )
    .unwrap();
    pump(&mut c, true);
    drop(c);
    let c = ReplicaCore::new(s.clone(), &CoreConfig::default()).unwrap();
    assert_eq!(c.repair_state(), &state, "the state outlives its entries");
    // A snapshot of this replica carries it.
    let snap = raft::Storage::snapshot(&s, 0, 0).unwrap();
    assert_eq!(
        replog_repair::RepairState::decode(&snap.data).unwrap(),
        state
    );
}

/// A learner an isolation holds is never promoted, however caught up;
/// once re-admitted, the lifecycle promotes it again.
#[test]
fn an_isolated_learner_is_not_promoted_until_readmitted() {
    let mut c = leader_with_learner_2(CoreConfig {
        peers: vec![2],
        ..Default::default()
    });
    let mut out = Vec::new();
    c.step(repair(10, &signal(2)), &mut out).unwrap();
    c.step(repair(11, &isolate(2)), &mut out).unwrap();
    pump(&mut c, true);
    assert!(c.repair_state().holds_isolated(2));
    let request = PeerMessage::RecoverRequest {
        status: ReplicaStatus::Recovering,
        last_index: 0,
        incarnation: 4,
    };
    peer(&mut c, 2, request);
    let caught_up = |c: &mut ReplicaCore<MemoryStorage>| {
        let committed = c.node.raft.raft_log.committed;
        c.node.raft.mut_prs().get_mut(2).unwrap().matched = committed;
    };
    caught_up(&mut c);
    for _ in 0..50 {
        c.step(Input::Tick, &mut out).unwrap();
        assert!(
            !c.node.raft.has_pending_conf(),
            "an isolated learner was promoted"
        );
    }
    c.step(
        repair(
            12,
            &replog_repair::Record::Readmitted {
                replica: 2,
                at_ms: 3,
            },
        ),
        &mut out,
    )
    .unwrap();
    pump(&mut c, true);
    assert!(!c.repair_state().holds_isolated(2));
    caught_up(&mut c);
    let promoted = (0..50).any(|_| {
        c.step(Input::Tick, &mut out).unwrap();
        c.node.raft.has_pending_conf()
    });
    assert!(promoted, "a re-admitted learner is promoted again");
}
