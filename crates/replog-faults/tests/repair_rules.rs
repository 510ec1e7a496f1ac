//! The repair coordinator's rules (`replog_faults::repair_check`) on
//! hand-written histories: one that passes every rule (an escalation
//! through both steps, an isolation, a re-admission, an alarm and its
//! reset, a refused stale decision), and for each rule one that breaks it;
//! each test asks only its rule, so it fails if the rule stops finding
//! the break.

use replog_faults::checker::{Rule, Violation};
use replog_faults::repair_check::{
    self as rc, Event, FinalState, Isolated, Limits, Record, Seen, StepCall, StepFinished,
    StepStarted,
};

const LIMITS: Limits = Limits {
    voters: 5,
    num_allowed_repairs: 1,
    removals_allowed: 3,
    rate_limit: Some((1, 20_000)),
};

fn start(replica: u64, attempt: u32, at: u64, deadline: u64, term: u64) -> Record {
    Record::StepStarted(StepStarted {
        replica,
        attempt,
        step: attempt - 1,
        repair_id: if attempt == 1 { "restart" } else { "reboot" }.into(),
        scope: if attempt == 1 { "replica" } else { "leader" }.into(),
        mode: "execute".into(),
        started_at_ms: at,
        deadline_ms: deadline,
        term,
    })
}

fn finish(replica: u64, attempt: u32, result: &str, at: u64) -> Record {
    Record::StepFinished(StepFinished {
        replica,
        attempt,
        result: result.into(),
        finished_at_ms: at,
    })
}

fn isolate(replica: u64, at: u64, term: u64) -> Record {
    Record::Isolated(Isolated {
        replica,
        spare: None,
        mode: "execute".into(),
        at_ms: at,
        term,
    })
}

fn signal(replica: u64) -> Record {
    Record::Signal {
        replica,
        signal: "unreachable".into(),
        source: "detector".into(),
    }
}

fn call(s: &Record) -> StepCall {
    let Record::StepStarted(s) = s else {
        panic!("not a start")
    };
    StepCall {
        repair_id: s.repair_id.clone(),
        replica: s.replica,
        attempt: s.attempt,
        scope: s.scope.clone(),
        deadline_ms: s.deadline_ms,
        at_ms: s.started_at_ms + 5,
    }
}

/// Applied records at positions 10, 20, ...
fn seen(records: Vec<Record>) -> Seen {
    let mut s = Seen::default();
    s.merge(
        records
            .into_iter()
            .enumerate()
            .map(|(i, r)| Event {
                position: 10 * (i as u64 + 1),
                record: Some(r),
                refused: None,
            })
            .collect(),
    );
    s.end_ms = 100_000;
    s
}

fn refused(s: &mut Seen, position: u64, record: Record, why: &str) {
    s.merge(vec![Event {
        position,
        record: Some(record),
        refused: Some(why.into()),
    }]);
}

/// Replica 2 escalates (its own step fails at once, the leader's succeeds
/// but 2 stays unhealthy until the deadline), is isolated at 4,000 and
/// re-admitted; then replica 3's step; an alarm and its reset; a stale
/// leader's step start for 4, refused.
fn good() -> Seen {
    let s2a = start(2, 1, 1_000, 3_000, 2);
    let s2b = start(2, 2, 1_100, 3_100, 2);
    let s3 = start(3, 1, 5_000, 7_000, 3);
    let mut s = seen(vec![
        signal(2),
        s2a.clone(),
        finish(2, 1, "failed", 1_050),
        s2b.clone(),
        finish(2, 2, "succeeded", 1_200),
        isolate(2, 4_000, 2),
        signal(3),
        s3.clone(),
        finish(3, 1, "succeeded", 5_100),
        Record::Readmitted {
            replica: 2,
            at_ms: 8_000,
        },
        Record::AlarmRaised {
            at_ms: 9_000,
            reason: "limit".into(),
        },
        Record::Reset { at_ms: 9_500 },
        Record::CaseClosed { replica: 3 },
    ]);
    refused(
        &mut s,
        135,
        start(4, 1, 9_600, 11_600, 2),
        "decision of term 2 after one of term 3",
    );
    s.calls = vec![call(&s2a), call(&s2b), call(&s3)];
    s.final_state = Some(FinalState {
        applied_through: 135,
        removals_since_reset: 0,
        alarm: false,
        open_cases: 0,
        removals_allowed: 3,
    });
    s
}

fn rules(vs: &[Violation]) -> Vec<Rule> {
    vs.iter().map(|v| v.rule).collect()
}

#[test]
fn a_correct_history_passes_every_rule_and_is_counted() {
    let s = good();
    let v = rc::check_repairs(&s, &LIMITS);
    assert!(v.is_empty(), "{v:#?}");
    let r = rc::repair_report(&s, 7, 1);
    assert_eq!(r.steps_started, 3);
    assert_eq!(r.isolations, 1);
    assert_eq!(r.readmissions, 1);
    assert_eq!(r.alarms, 1);
    assert_eq!(r.resets, 1);
    assert_eq!(r.signals["unreachable"], 2);
    assert_eq!(r.steps_finished["succeeded"], 2);
    assert_eq!(r.most_in_progress_at_once, 1);
    assert_eq!(r.most_isolated_at_once, 1);
    assert_eq!(r.refused["decision of term N after one of term N"], 1);
    assert_eq!(r.command_calls, 3);
    assert_eq!(r.commands_after_deadline, 0);
    assert_eq!(r.longest_step_overrun_ms, 0);
}

#[test]
fn commands_and_outcomes_after_their_deadline_are_counted() {
    let mut s = good();
    // Replica 3's command began 1 s after its deadline (7,000) and its
    // outcome came at 9,000.
    s.calls[2].at_ms = 8_000;
    s.events.insert(
        90,
        Event {
            position: 90,
            record: Some(finish(3, 1, "succeeded", 9_000)),
            refused: None,
        },
    );
    let r = rc::repair_report(&s, 1, 0);
    assert_eq!(r.commands_after_deadline, 1);
    assert_eq!(r.longest_step_overrun_ms, 2_000);
}

#[test]
fn two_repairs_at_once_are_found_counting_a_succeeded_step_until_its_deadline() {
    let mut s = good();
    // Replica 3 starts at 2,000 while 2's first step already failed but
    // its second one succeeded at 1,200 and has until 3,100 to heal.
    s.merge(vec![Event {
        position: 55,
        record: Some(start(3, 1, 2_000, 4_000, 2)),
        refused: None,
    }]);
    s.merge(vec![Event {
        position: 56,
        record: Some(finish(3, 1, "failed", 2_010)),
        refused: None,
    }]);
    let v = rc::repairs_at_once(&s, &LIMITS);
    assert_eq!(rules(&v), [Rule::RepairsAtOnce]);
    assert!(v[0].detail.contains("{2, 3}"), "{}", v[0].detail);
    // Allowed two at once, the same history passes.
    let two = Limits {
        num_allowed_repairs: 2,
        ..LIMITS
    };
    assert!(rc::repairs_at_once(&s, &two).is_empty());
}

#[test]
fn an_isolation_during_another_replicas_step_is_found() {
    let mut s = good();
    // Replica 4 isolated at 6,000, while 3's step (5,000 to 7,000) is in
    // progress.
    s.merge(vec![Event {
        position: 85,
        record: Some(isolate(4, 6_000, 3)),
        refused: None,
    }]);
    assert_eq!(
        rules(&rc::repairs_at_once(&s, &LIMITS)),
        [Rule::RepairsAtOnce]
    );
}

#[test]
fn a_step_without_an_outcome_is_in_progress_until_the_end() {
    let mut s = good();
    s.events.remove(&90); // 3's outcome
    s.merge(vec![Event {
        position: 125,
        record: Some(start(5, 1, 50_000, 52_000, 3)),
        refused: None,
    }]);
    s.calls.push(call(&start(5, 1, 50_000, 52_000, 3)));
    assert_eq!(
        rules(&rc::repairs_at_once(&s, &LIMITS)),
        [Rule::RepairsAtOnce]
    );
}

#[test]
fn isolations_past_the_removal_limit_or_the_rate_limit_are_found() {
    let mut s = good();
    // Three more isolations, 30 s apart (within the rate limit), before
    // the reset at position 120: 4 since the last reset.
    for (i, replica) in [3u64, 4, 5].iter().enumerate() {
        s.merge(vec![Event {
            position: 101 + i as u64,
            record: Some(isolate(*replica, 34_000 + 30_000 * i as u64, 3)),
            refused: None,
        }]);
    }
    let v = rc::removal_limits(&s, &LIMITS);
    assert_eq!(rules(&v), [Rule::RemovalLimits]);
    assert!(
        v[0].detail.contains("makes 4 since the last reset"),
        "{}",
        v[0].detail
    );
    // Two isolations 5 s apart break the rate limit of 1 per 20 s.
    let mut s = good();
    s.merge(vec![Event {
        position: 61,
        record: Some(isolate(4, 9_000, 2)),
        refused: None,
    }]);
    let v = rc::removal_limits(&s, &LIMITS);
    assert_eq!(rules(&v), [Rule::RemovalLimits]);
    assert!(v[0].detail.contains("rate limit"), "{}", v[0].detail);
}

#[test]
fn a_state_counting_other_isolations_than_its_records_is_found() {
    let mut s = good();
    s.final_state.as_mut().unwrap().removals_since_reset = 1;
    assert_eq!(
        rules(&rc::removal_limits(&s, &LIMITS)),
        [Rule::RemovalLimits]
    );
    let mut s = good();
    s.final_state.as_mut().unwrap().removals_allowed = 5;
    assert_eq!(
        rules(&rc::removal_limits(&s, &LIMITS)),
        [Rule::RemovalLimits]
    );
}

#[test]
fn a_decision_while_the_alarm_is_raised_is_found() {
    let mut s = good();
    let late = start(4, 1, 9_200, 11_200, 3);
    s.merge(vec![Event {
        position: 115,
        record: Some(late.clone()),
        refused: None,
    }]);
    s.calls.push(call(&late));
    assert_eq!(
        rules(&rc::alarm_stops_decisions(&s)),
        [Rule::AlarmStopsDecisions]
    );
}

#[test]
fn three_of_five_isolated_at_once_is_found() {
    assert_eq!(rc::max_isolated_at_once(5), 2);
    assert_eq!(rc::max_isolated_at_once(3), 0);
    assert_eq!(rc::max_isolated_at_once(7), 3);
    let mut s = good();
    for (i, replica) in [3u64, 4].iter().enumerate() {
        s.merge(vec![Event {
            position: 61 + i as u64,
            record: Some(isolate(*replica, 4_500 + i as u64, 2)),
            refused: None,
        }]);
    }
    let v = rc::isolations_keep_quorum(&s, &LIMITS);
    assert_eq!(rules(&v), [Rule::IsolationsKeepQuorum]);
    // Two at once is within the bound.
    s.events.remove(&62);
    assert!(rc::isolations_keep_quorum(&s, &LIMITS).is_empty());
}

#[test]
fn a_stale_decision_applied_is_found() {
    let mut s = good();
    // The refused stale start, applied instead.
    s.events.get_mut(&135).unwrap().refused = None;
    let v = rc::decisions_fenced_by_term(&s);
    assert_eq!(rules(&v), [Rule::DecisionsFencedByTerm]);
}

#[test]
fn a_command_run_for_a_refused_start_or_twice_or_undecided_is_found() {
    let mut s = good();
    s.calls.push(call(&start(4, 1, 9_600, 11_600, 2)));
    let v = rc::steps_run_as_decided(&s);
    assert_eq!(rules(&v), [Rule::StepsRunAsDecided]);
    assert!(v[0].detail.contains("refused"), "{}", v[0].detail);
    let mut s = good();
    let again = s.calls[2].clone();
    s.calls.push(again);
    let v = rc::steps_run_as_decided(&s);
    assert_eq!(rules(&v), [Rule::StepsRunAsDecided]);
    assert!(v[0].detail.contains("ran 2 times"), "{}", v[0].detail);
    let mut s = good();
    s.calls[0].deadline_ms += 1;
    assert_eq!(
        rules(&rc::steps_run_as_decided(&s)),
        [Rule::StepsRunAsDecided]
    );
}

#[test]
fn polls_that_disagree_or_may_have_missed_records_are_found() {
    let mut s = good();
    s.merge(vec![Event {
        position: 10,
        record: Some(signal(4)),
        refused: None,
    }]);
    assert_eq!(
        rules(&rc::histories_agree(&s)),
        [Rule::RepairHistoriesAgree]
    );
    // A full history of newer records than any seen: some may be missing.
    let full: Vec<Event> = (0..rc::SERVED_HISTORY as u64)
        .map(|i| Event {
            position: 1_000 + i,
            record: Some(signal(5)),
            refused: None,
        })
        .collect();
    let mut s = good();
    s.merge(full.clone());
    assert_eq!(s.gaps, 1);
    // The same again overlaps what was seen: no gap.
    s.merge(full);
    assert_eq!(s.gaps, 1);
}

#[test]
fn records_and_calls_parse_as_served() {
    let doc = br#"[{"position":7,"record":{"kind":"step_started","replica":2,"attempt":1,"step":0,
        "repair_id":"restart","scope":"replica","mode":"execute","signal":"unreachable",
        "started_at_ms":5,"deadline_ms":9,"term":4,"max_in_progress":1},"refused":null},
        {"position":8,"record":{"kind":"launch","x":1},"refused":"undecodable"},
        {"position":9,"record":null,"refused":"undecodable record: eof"}]"#;
    let events: Vec<Event> = serde_json::from_slice(doc).unwrap();
    assert_eq!(events[0].applied(), Some(&start(2, 1, 5, 9, 4)));
    assert_eq!(events[1].record, Some(Record::Other));
    assert_eq!(events[2].applied(), None);
    let calls = rc::parse_calls("restart|2|1|replica|9|6\nhalf|2\nreboot|3|2|leader|20|12\n");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].replica, 3);
    assert_eq!(calls[1].deadline_ms, 20);
}
