//! The checker's rules on hand-written histories: one history that passes
//! every rule, and for each rule one that breaks it (and only the rule
//! under test is asked about, so each test fails if its rule stops
//! finding the break).

use std::collections::BTreeMap;

use replog_faults::checker::{self, Rule};
use replog_faults::history::{
    Call, History, Isolation, Member, Op, Outcome, ReadEntry, Ret, StatusSample, Wipe,
};

fn op(id: u64, invoke_us: u64, complete_us: u64, call: Call, outcome: Outcome) -> Op {
    Op {
        id,
        client: 1,
        invoke_us,
        complete_us,
        call,
        outcome,
    }
}

fn v(n: u8) -> Vec<u8> {
    vec![n; 4]
}

fn append(id: u64, t: (u64, u64), data: u8, position: u64) -> Op {
    op(
        id,
        t.0,
        t.1,
        Call::Append { data: v(data) },
        Outcome::Ok(Ret::Appended { position, term: 2 }),
    )
}

fn read(id: u64, t: (u64, u64), range: (u64, u64), lin: bool, entries: &[(u64, u8)]) -> Op {
    op(
        id,
        t.0,
        t.1,
        Call::Read {
            from: range.0,
            to: range.1,
            linearizable: lin,
            replica: None,
        },
        Outcome::Ok(Ret::Read {
            entries: entries
                .iter()
                .map(|(p, d)| ReadEntry {
                    position: *p,
                    data: v(*d),
                })
                .collect(),
        }),
    )
}

fn log(entries: &[(u64, u8)]) -> BTreeMap<u64, Vec<u8>> {
    entries.iter().map(|(p, d)| (*p, v(*d))).collect()
}

fn sample(replica: u64, t: u64, status: i32, term: u64, leader: bool, last: u64) -> StatusSample {
    StatusSample {
        replica,
        invoke_us: t,
        complete_us: t + 1,
        status,
        term,
        leader: 1,
        is_leader: leader,
        commit: last,
        applied: last,
        last_index: last,
        members: Vec::new(),
    }
}

/// Three appends (one outcome unknown and applied, one failed and not),
/// reads that see what they must, a wipe and rejoin of replica 3 done
/// right, one leader per term.
fn good() -> History {
    let entries = [(2, 1), (3, 2), (5, 3)];
    let mut leader_sees_3 = sample(1, 500, 4, 3, true, 5);
    leader_sees_3.members = vec![Member { id: 2, voter: true }, Member { id: 3, voter: true }];
    let mut leader_learner = sample(1, 350, 4, 3, true, 5);
    leader_learner.members = vec![Member {
        id: 3,
        voter: false,
    }];
    History {
        ops: vec![
            append(1, (0, 10), 1, 2),
            append(2, (5, 20), 2, 3),
            op(
                3,
                21,
                60,
                Call::Append { data: v(3) },
                Outcome::Unknown("timeout".into()),
            ),
            op(
                4,
                21,
                22,
                Call::Append { data: v(4) },
                Outcome::Failed("NoLeader".into()),
            ),
            read(5, (30, 31), (1, 3), true, &[(2, 1), (3, 2)]),
            read(6, (70, 71), (1, 5), false, &entries),
        ],
        statuses: vec![
            sample(1, 100, 4, 2, true, 3),
            sample(2, 100, 4, 2, false, 3),
            sample(3, 310, 1, 2, false, 0),
            sample(3, 320, 3, 3, false, 2),
            leader_learner,
            sample(3, 400, 4, 3, false, 5),
            leader_sees_3,
        ],
        faults: Vec::new(),
        wipes: vec![Wipe {
            replica: 3,
            at_us: 300,
        }],
        isolations: Vec::new(),
        state_mode: false,
        final_logs: [1, 2, 3].into_iter().map(|r| (r, log(&entries))).collect(),
    }
}

fn rules(vs: &[checker::Violation]) -> Vec<Rule> {
    vs.iter().map(|v| v.rule).collect()
}

#[test]
fn a_correct_history_passes_every_rule() {
    let v = checker::check_all(&good());
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn a_lost_acknowledged_append_is_found() {
    let mut h = good();
    for l in h.final_logs.values_mut() {
        l.remove(&3);
    }
    let v = checker::acknowledged_appends_kept(&h);
    assert_eq!(rules(&v), [Rule::AcknowledgedAppendKept]);
    assert_eq!(v[0].ops, [2]);
}

#[test]
fn an_acknowledged_append_at_another_position_is_found() {
    let mut h = good();
    for l in h.final_logs.values_mut() {
        *l = log(&[(2, 1), (4, 2), (5, 3)]);
    }
    let v = checker::acknowledged_appends_kept(&h);
    assert_eq!(rules(&v), [Rule::AcknowledgedAppendKept]);
}

#[test]
fn a_phantom_entry_is_found() {
    let mut h = good();
    for l in h.final_logs.values_mut() {
        l.insert(6, v(99));
    }
    assert_eq!(
        rules(&checker::no_phantom_or_duplicate(&h)),
        [Rule::NoPhantom]
    );
}

#[test]
fn a_failed_append_in_the_log_is_a_phantom() {
    let mut h = good();
    for l in h.final_logs.values_mut() {
        l.insert(6, v(4));
    }
    let v = checker::no_phantom_or_duplicate(&h);
    assert_eq!(rules(&v), [Rule::NoPhantom]);
    assert_eq!(v[0].ops, [4]);
}

#[test]
fn a_duplicate_value_is_found() {
    let mut h = good();
    for l in h.final_logs.values_mut() {
        l.insert(6, v(3));
    }
    assert_eq!(
        rules(&checker::no_phantom_or_duplicate(&h)),
        [Rule::NoDuplicate]
    );
}

#[test]
fn real_time_order_is_checked() {
    let mut h = good();
    // Append 2 is invoked after append 1 completed but got a lower position.
    h.ops[1] = append(2, (15, 20), 2, 1);
    let v = checker::real_time_order(&h);
    assert_eq!(rules(&v), [Rule::RealTimeOrder]);
    assert_eq!(v[0].ops, [1, 2]);
    // Overlapping appends may take either order.
    h.ops[1] = append(2, (5, 20), 2, 1);
    assert!(checker::real_time_order(&h).is_empty());
}

#[test]
fn a_stale_linearizable_read_is_found() {
    let mut h = good();
    // Invoked after append 2 was acknowledged at 3, yet misses it.
    h.ops[4] = read(5, (30, 31), (1, 3), true, &[(2, 1)]);
    let v = checker::linearizable_reads_not_stale(&h);
    assert_eq!(rules(&v), [Rule::LinearizableReadNotStale]);
    assert_eq!(v[0].ops, [2, 5]);
    // The same read, concurrent with the append, may miss it.
    h.ops[4] = read(5, (15, 31), (1, 3), true, &[(2, 1)]);
    assert!(checker::linearizable_reads_not_stale(&h).is_empty());
}

#[test]
fn a_read_that_differs_from_the_log_is_found() {
    let mut h = good();
    h.ops[5] = read(6, (70, 71), (1, 5), false, &[(2, 1), (3, 7), (5, 3)]);
    assert_eq!(rules(&checker::reads_match_log(&h)), [Rule::ReadMatchesLog]);
    // Missing an entry of its range is a difference too.
    h.ops[5] = read(6, (70, 71), (1, 5), false, &[(2, 1), (5, 3)]);
    assert_eq!(rules(&checker::reads_match_log(&h)), [Rule::ReadMatchesLog]);
}

#[test]
fn replicas_that_differ_after_healing_are_found() {
    let mut h = good();
    h.final_logs.insert(2, log(&[(2, 1), (3, 2)]));
    assert_eq!(
        rules(&checker::replicas_identical(&h)),
        [Rule::ReplicasIdentical]
    );
}

#[test]
fn two_leaders_in_one_term_are_found() {
    let mut h = good();
    h.statuses.push(sample(2, 150, 4, 2, true, 3));
    assert_eq!(
        rules(&checker::one_leader_per_term(&h.statuses)),
        [Rule::OneLeaderPerTerm]
    );
}

#[test]
fn a_wiped_replica_voting_while_the_leader_lists_it_as_learner_is_found() {
    let mut h = good();
    // Replica 3 says VOTING at 330, the leader lists it as a learner at 350.
    h.statuses.push(sample(3, 330, 4, 3, false, 5));
    let v = checker::rejoin_votes_only_when_promoted(&h);
    assert_eq!(rules(&v), [Rule::RejoinVotesOnlyWhenPromoted]);
    assert!(v[0].detail.contains("learner"), "{}", v[0].detail);
}

#[test]
fn a_learner_listing_after_the_coordinator_isolated_the_replica_is_no_violation() {
    let mut h = good();
    // Replica 3 says VOTING at 330; the coordinator isolated (demoted) it
    // at 340, so the leader's learner listing at 350 is its demotion.
    h.statuses.push(sample(3, 330, 4, 3, false, 5));
    h.isolations.push(Isolation {
        replica: 3,
        at_us: 340,
    });
    assert!(checker::rejoin_votes_only_when_promoted(&h).is_empty());
    // An isolation after the listing excuses nothing, nor one of another
    // replica.
    h.isolations = vec![
        Isolation {
            replica: 3,
            at_us: 360,
        },
        Isolation {
            replica: 2,
            at_us: 340,
        },
    ];
    let v = checker::rejoin_votes_only_when_promoted(&h);
    assert_eq!(rules(&v), [Rule::RejoinVotesOnlyWhenPromoted]);
}

#[test]
fn a_leader_that_has_not_applied_the_promotion_yet_is_no_violation() {
    let mut h = good();
    // The leader lists 3 as a learner after 3 said VOTING, but had applied
    // less than 3 had: it may not have applied the promotion yet.
    h.statuses.push(sample(3, 330, 4, 3, false, 5));
    h.statuses[4].applied = 4;
    assert!(checker::rejoin_votes_only_when_promoted(&h).is_empty());
}

#[test]
fn a_wiped_replica_voting_without_what_was_acknowledged_before_is_found() {
    let mut h = good();
    // VOTING after the leader's learner listing, but holding only up to 2
    // while 3 was acknowledged before the wipe.
    h.statuses[5].last_index = 2;
    let v = checker::rejoin_votes_only_when_promoted(&h);
    assert_eq!(rules(&v), [Rule::RejoinVotesOnlyWhenPromoted]);
    assert!(v[0].detail.contains("acknowledged"), "{}", v[0].detail);
}

fn put(id: u64, t: (u64, u64), key: &str, value: u64, outcome: Outcome) -> Op {
    let call = Call::StatePut {
        key: key.into(),
        value,
    };
    op(id, t.0, t.1, call, outcome)
}

fn get(id: u64, t: (u64, u64), key: &str, value: Option<u64>) -> Op {
    let call = Call::StateGet { key: key.into() };
    op(id, t.0, t.1, call, Outcome::Ok(Ret::StateValue { value }))
}

fn written(position: u64) -> Outcome {
    Outcome::Ok(Ret::StateWritten { position })
}

#[test]
fn state_operations_are_checked_for_linearizability() {
    let mut h = History {
        ops: vec![
            get(1, (0, 5), "k", None),
            put(2, (10, 20), "k", 1, written(3)),
            // Concurrent with the put: either value is fine.
            get(3, (15, 25), "k", None),
            put(4, (30, 40), "k", 2, Outcome::Unknown("timeout".into())),
            get(5, (50, 60), "k", Some(2)),
            get(6, (70, 80), "k", Some(2)),
            put(7, (90, 95), "k", 9, Outcome::Failed("NoLeader".into())),
        ],
        ..History::default()
    };
    assert!(checker::state_linearizable(&h).is_empty());
    // A get after an acknowledged put that does not see it (nor a later
    // one) is stale.
    h.ops.push(get(8, (100, 110), "k", Some(1)));
    assert_eq!(
        rules(&checker::state_linearizable(&h)),
        [Rule::StateLinearizable]
    );
    h.ops.pop();
    // A failed put's value seen is not linearizable either.
    h.ops.push(get(8, (100, 110), "k", Some(9)));
    assert_eq!(
        rules(&checker::state_linearizable(&h)),
        [Rule::StateLinearizable]
    );
    h.ops.pop();
    // Values flip-flopping between two gets: 2 then 1 is stale.
    h.ops[5] = get(6, (70, 80), "k", Some(1));
    assert_eq!(
        rules(&checker::state_linearizable(&h)),
        [Rule::StateLinearizable]
    );
}
