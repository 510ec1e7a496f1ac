//! The coordinator's decisions, each from a small world: five voters, an
//! order of two steps, and records applied as the runtime would apply them.

use std::time::Duration;

use super::*;
use crate::config::{RateLimit, Scope, Spare};
use crate::health::Reason;

const S: u64 = 1_000;

struct World {
    coordinator: Coordinator,
    state: RepairState,
    view: View,
    position: u64,
}

fn step(id: &str, scope: Scope, timeout_s: u64) -> RepairStep {
    RepairStep {
        id: id.into(),
        command: format!("/bin/{id}"),
        scope,
        timeout: Duration::from_secs(timeout_s),
        mode: Mode::Execute,
    }
}

fn config() -> RepairConfig {
    RepairConfig {
        order: vec![
            step("restart", Scope::Replica, 10),
            step("reimage", Scope::Leader, 20),
        ],
        num_allowed_repairs: 2,
        removal_rate_limit: None,
        removal_limit: 0.4,
        spares: Vec::new(),
        healthy_period: Duration::from_secs(30),
        mode: Mode::Execute,
        signal_ttl: Duration::from_secs(300),
    }
}

fn member(id: u64) -> MemberView {
    MemberView {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        voter: true,
        health: Health::Healthy,
        caught_up: true,
    }
}

impl World {
    fn new(config: RepairConfig) -> World {
        let members: Vec<MemberView> = (1..=5).map(member).collect();
        let limits = config
            .check(5, &[1, 2, 3, 4, 5])
            .expect("a valid configuration");
        World {
            coordinator: Coordinator::new(config, limits),
            state: RepairState::default(),
            view: View {
                now_ms: 100 * S,
                term: 7,
                members,
                grace: false,
            },
            position: 0,
        }
    }

    fn apply(&mut self, record: Record) {
        self.position += 1;
        let applied = self.state.apply(self.position, record.clone());
        assert_eq!(applied, crate::state::Applied::Changed, "{record:?}");
    }

    fn signal(&mut self, replica: u64, name: &str, ttl_s: u64) {
        let now = self.view.now_ms;
        self.apply(Record::Signal(Signal {
            replica,
            signal: name.into(),
            details: String::new(),
            outside_ms: 60 * S,
            source: "test".into(),
            reported_at_ms: now,
            expires_at_ms: now + ttl_s * S,
        }));
    }

    /// One round: records proposed are applied; the rest is returned.
    fn round(&mut self) -> Vec<Action> {
        let actions = self.coordinator.decide(&self.view, &self.state);
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Propose(r) => self.apply(r),
                other => rest.push(other),
            }
        }
        rest
    }

    /// The step run by the last round finished with `result`.
    fn report(&mut self, replica: u64, attempt: u32, result: StepResult) {
        self.apply(Record::StepFinished(StepFinished {
            replica,
            attempt,
            result,
            exit_code: Some(if result == StepResult::Succeeded {
                0
            } else {
                1
            }),
            output: "ran".into(),
            finished_at_ms: self.view.now_ms,
        }));
    }

    fn advance_s(&mut self, s: u64) {
        self.view.now_ms += s * S;
    }

    fn set_health(&mut self, id: u64, health: Health) {
        self.view
            .members
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap()
            .health = health;
    }

    fn attempts(&self, replica: u64) -> Vec<(String, Option<StepResult>)> {
        self.state.cases.get(&replica).map_or(Vec::new(), |c| {
            c.attempts
                .iter()
                .map(|a| {
                    (
                        a.started.repair_id.clone(),
                        a.finished.as_ref().map(|f| f.result),
                    )
                })
                .collect()
        })
    }
}

fn runs(actions: &[Action]) -> Vec<(u64, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Run { started, .. } => Some((started.replica, started.repair_id.clone())),
            _ => None,
        })
        .collect()
}

fn unreachable() -> Health {
    Health::Unhealthy {
        reasons: vec![Reason::Unreachable { silent_ms: 60 * S }],
    }
}

#[test]
fn a_signal_escalates_through_the_order_and_ends_in_isolation() {
    let mut w = World::new(config());
    w.signal(3, "fsync_latency", 600);
    assert_eq!(w.round(), vec![]); // the start is written first
    assert_eq!(w.attempts(3), vec![("restart".into(), None)]);
    let actions = w.round();
    assert_eq!(runs(&actions), vec![(3, "restart".into())]);
    assert_eq!(w.round(), vec![], "a launched step is not launched twice");
    w.report(3, 1, StepResult::Succeeded);
    // Still unhealthy before the step's timeout: wait.
    w.advance_s(5);
    assert_eq!(w.round(), vec![]);
    assert_eq!(w.attempts(3).len(), 1);
    // Still unhealthy after it: the next step.
    w.advance_s(5);
    w.round();
    assert_eq!(w.attempts(3)[1], ("reimage".into(), None));
    assert_eq!(runs(&w.round()), vec![(3, "reimage".into())]);
    // A failed command escalates at once, before its timeout: isolation.
    w.report(3, 2, StepResult::Failed);
    w.round();
    let iso = w.state.cases[&3].isolation.clone().expect("isolated");
    assert_eq!((iso.spare, iso.mode), (None, Mode::Execute));
    assert_eq!(w.state.removals_since_reset, 1);
    assert_eq!(w.round(), vec![Action::Demote { id: 3 }]);
}

#[test]
fn at_most_the_allowed_repairs_run_at_once() {
    let mut cfg = config();
    cfg.num_allowed_repairs = 1;
    let mut w = World::new(cfg);
    w.set_health(2, unreachable());
    w.set_health(3, unreachable());
    w.round(); // the detector's signals
    assert_eq!(w.state.cases[&2].signals["unreachable"].source, "detector");
    w.round();
    let started = |w: &World| -> Vec<u64> {
        w.state
            .cases
            .values()
            .filter(|c| c.unfinished().is_some())
            .map(|c| c.replica)
            .collect()
    };
    assert_eq!(started(&w), vec![2]);
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(started(&w), vec![2], "still one");
    w.report(2, 1, StepResult::Failed);
    w.round();
    assert_eq!(
        started(&w),
        vec![2],
        "2 escalates first (replica order); 3 still waits"
    );
    assert_eq!(w.attempts(3), vec![]);
}

#[test]
fn the_quorum_guard_keeps_three_of_five_voters_available() {
    // Signals against 3 of 5 voters that still replicate: taking two of
    // them leaves 3 available, a third would leave 2.
    let mut cfg = config();
    cfg.num_allowed_repairs = 2;
    let mut w = World::new(cfg);
    for r in [1, 2, 3] {
        w.signal(r, "disk", 600);
    }
    w.round();
    let started = w
        .state
        .cases
        .values()
        .filter(|c| c.unfinished().is_some())
        .count();
    assert_eq!(started, 2);
    // Replica 4 becomes unreachable: only 2 voters are available now;
    // nothing new starts, even when a slot frees up.
    w.set_health(4, unreachable());
    w.round();
    w.report(1, 1, StepResult::Failed);
    w.round();
    assert_eq!(
        w.attempts(1),
        vec![("restart".into(), Some(StepResult::Failed))]
    );
    assert_eq!(w.attempts(3), vec![]);
}

#[test]
fn repairing_an_unreachable_voter_costs_no_available_voter() {
    // Two of five unreachable: 3 available. Repairing the two keeps 3.
    let mut w = World::new(config());
    w.set_health(4, unreachable());
    w.set_health(5, unreachable());
    w.signal(4, "unreachable", 600);
    w.signal(5, "unreachable", 600);
    w.round();
    assert_eq!(w.attempts(4).len(), 1);
    assert_eq!(w.attempts(5).len(), 1);
}

#[test]
fn nothing_new_starts_in_the_grace_while_paused_or_in_listen_mode() {
    for stop in ["grace", "paused", "listen"] {
        let mut cfg = config();
        if stop == "listen" {
            cfg.mode = Mode::Listen;
        }
        let mut w = World::new(cfg);
        w.view.grace = stop == "grace";
        if stop == "paused" {
            w.apply(Record::Paused {
                at_ms: 1,
                reason: "maintenance".into(),
            });
        }
        w.signal(3, "disk", 600);
        assert_eq!(w.round(), vec![], "{stop}");
        assert_eq!(w.attempts(3), vec![], "{stop}");
    }
}

#[test]
fn a_step_an_earlier_leader_started_is_never_run_again() {
    let mut w = World::new(config());
    w.signal(3, "disk", 600);
    w.round();
    // A new leader (term 8, a new coordinator) finds the step without an outcome.
    w.view.term = 8;
    w.coordinator = Coordinator::new(config(), config().check(5, &[]).unwrap());
    w.advance_s(5);
    assert_eq!(w.round(), vec![], "before the deadline it waits");
    w.advance_s(5);
    assert_eq!(w.round(), vec![], "at the deadline: the outcome is unknown");
    assert_eq!(
        w.attempts(3),
        vec![("restart".into(), Some(StepResult::Unknown))]
    );
    assert_eq!(w.round(), vec![], "then the next step is written");
    assert_eq!(
        w.attempts(3),
        vec![
            ("restart".into(), Some(StepResult::Unknown)),
            ("reimage".into(), None)
        ]
    );
    assert_eq!(runs(&w.round()), vec![(3, "reimage".into())]);
}

#[test]
fn react_mode_records_what_it_would_do_and_runs_nothing() {
    let mut cfg = config();
    cfg.mode = Mode::React;
    let mut w = World::new(cfg);
    w.signal(3, "disk", 600);
    for _ in 0..3 {
        for _ in 0..3 {
            assert_eq!(runs(&w.round()), vec![]);
        }
        w.advance_s(20);
    }
    assert_eq!(
        w.attempts(3),
        vec![
            ("restart".into(), Some(StepResult::Reacted)),
            ("reimage".into(), Some(StepResult::Reacted))
        ]
    );
    let iso = w.state.cases[&3].isolation.clone().expect("would isolate");
    assert_eq!(iso.mode, Mode::React);
    assert_eq!(w.state.removals_since_reset, 0);
    assert_eq!(w.round(), vec![], "a react isolation changes no membership");
}

#[test]
fn a_per_repair_mode_caps_its_step() {
    let mut cfg = config();
    cfg.order[0].mode = Mode::React;
    let mut w = World::new(cfg);
    w.signal(3, "disk", 600);
    w.round();
    w.round();
    assert_eq!(
        w.attempts(3),
        vec![("restart".into(), Some(StepResult::Reacted))]
    );
    w.advance_s(10);
    w.round();
    assert_eq!(runs(&w.round()), vec![(3, "reimage".into())]);
}

/// Drives replica `r` through both steps to its isolation.
fn exhaust(w: &mut World, r: u64) {
    w.signal(r, "disk", 6_000);
    w.round();
    w.round();
    w.report(r, 1, StepResult::Failed);
    w.round();
    w.round();
    w.report(r, 2, StepResult::Failed);
    w.round();
}

#[test]
fn the_removal_limit_raises_the_alarm_and_only_a_reset_clears_it() {
    let mut cfg = config();
    cfg.removal_limit = 0.2; // of 5 voters: 1 isolation
    let mut w = World::new(cfg);
    w.set_health(2, unreachable());
    exhaust(&mut w, 2);
    assert_eq!(w.round(), vec![Action::Demote { id: 2 }]);
    w.view.members.iter_mut().find(|m| m.id == 2).unwrap().voter = false;
    assert_eq!(w.state.removals_since_reset, 1);
    w.set_health(3, unreachable());
    exhaust(&mut w, 3);
    let alarm = w.state.alarm.clone().expect("the alarm");
    assert!(
        alarm.reason.contains("allows 1 (floor(0.2 x 5 voters))"),
        "{}",
        alarm.reason
    );
    assert!(w.state.cases[&3].isolation.is_none());
    w.advance_s(3_600);
    w.round();
    assert!(
        w.state.cases[&3].isolation.is_none(),
        "the alarm holds until a reset"
    );
    w.apply(Record::Reset {
        at_ms: w.view.now_ms,
    });
    w.round();
    assert!(w.state.alarm.is_none());
    assert!(
        w.state.cases[&3].isolation.is_some(),
        "after the reset it continues"
    );
}

#[test]
fn the_rate_limit_spaces_isolations() {
    let mut cfg = config();
    cfg.removal_limit = 1.0;
    cfg.num_allowed_repairs = 2;
    cfg.removal_rate_limit = Some(RateLimit {
        count: 1,
        period: Duration::from_secs(600),
    });
    let mut w = World::new(cfg);
    // Two of seven voters signalled (still replicating): both exhaust
    // their order; the margin allows both demotions, the rate only one.
    for id in 6..=7 {
        w.view.members.push(member(id));
    }
    exhaust(&mut w, 2);
    exhaust(&mut w, 3);
    assert!(w.state.cases[&2].isolation.is_some());
    assert!(
        w.state.cases[&3].isolation.is_none(),
        "within the window: waits"
    );
    w.advance_s(601);
    w.round();
    assert!(w.state.cases[&3].isolation.is_some());
}

#[test]
fn a_spare_replaces_the_isolated_replica_add_before_remove() {
    let mut cfg = config();
    cfg.spares = vec![Spare {
        id: 6,
        address: "127.0.0.1:7006".into(),
    }];
    let mut w = World::new(cfg);
    w.set_health(3, unreachable());
    exhaust(&mut w, 3);
    assert_eq!(w.state.cases[&3].isolation.as_ref().unwrap().spare, Some(6));
    assert_eq!(
        w.round(),
        vec![Action::AddLearner {
            id: 6,
            address: "127.0.0.1:7006".into()
        }]
    );
    // A learner catching up: nothing yet.
    let mut spare = member(6);
    spare.voter = false;
    spare.caught_up = false;
    w.view.members.push(spare);
    assert_eq!(w.round(), vec![]);
    // Promoted by the replica lifecycle once caught up: now remove 3,
    // but only while the voters left keep a quorum available: with the
    // promoted spare and two more voters down, removing 3 (healthy again)
    // would leave 2 of 5 available.
    let s = w.view.members.iter_mut().find(|m| m.id == 6).unwrap();
    s.voter = true;
    s.caught_up = true;
    w.set_health(3, Health::Healthy);
    for id in [6, 1, 2] {
        w.set_health(id, unreachable());
    }
    let removes = |actions: Vec<Action>| {
        actions
            .into_iter()
            .filter(|a| matches!(a, Action::Remove { .. }))
            .count()
    };
    assert_eq!(removes(w.round()), 0, "the unavailable spare counted");
    for id in [6, 1, 2] {
        w.set_health(id, Health::Healthy);
    }
    assert_eq!(w.round(), vec![Action::Remove { id: 3 }]);
    w.view.members.retain(|m| m.id != 3);
    // (the cases the outage opened for 1, 2 and 6 go on; nothing is removed)
    assert_eq!(removes(w.round()), 0);
}

#[test]
fn a_demoted_replica_healthy_for_the_period_is_readmitted() {
    let mut w = World::new(config());
    w.set_health(3, unreachable());
    exhaust(&mut w, 3);
    w.round();
    w.view.members.iter_mut().find(|m| m.id == 3).unwrap().voter = false;
    w.set_health(3, Health::Healthy);
    w.advance_s(6_001); // exhaust's own report (6000 s) expired too
    w.round();
    assert!(w.state.cases.contains_key(&3));
    w.advance_s(30);
    w.round();
    assert!(!w.state.cases.contains_key(&3), "re-admitted");
}

#[test]
fn a_case_closes_once_healthy_for_the_period() {
    let mut w = World::new(config());
    w.signal(3, "disk", 5);
    w.round();
    w.round();
    w.report(3, 1, StepResult::Succeeded);
    w.advance_s(10); // signal expired, deadline passed
    w.round();
    assert!(
        w.state.cases.contains_key(&3),
        "healthy, but not for the period yet"
    );
    w.advance_s(30);
    w.round();
    assert!(!w.state.cases.contains_key(&3));
    // A signal that expired before any step closes at once.
    w.signal(4, "disk", 1);
    w.advance_s(2);
    w.round();
    // (the first round may have started a step while it was active)
    assert!(w.state.cases.get(&4).is_none_or(|c| !c.attempts.is_empty()));
}

#[test]
fn a_demotion_keeps_room_for_one_more_failure() {
    // Three voters, no spare: demoting one would leave two, which cannot
    // lose another; the replica stays a voter, its case open.
    let mut cfg = config();
    cfg.num_allowed_repairs = 1;
    cfg.removal_limit = 1.0;
    let mut w = World::new(cfg.clone());
    w.view.members.truncate(3);
    w.set_health(3, unreachable());
    exhaust(&mut w, 3);
    for _ in 0..3 {
        assert_eq!(w.round(), vec![], "never demoted in a cluster of three");
    }
    assert!(w.state.cases[&3].isolation.is_none());
    // Five voters: 3 is isolated, but demoted only while the four left
    // keep a quorum with one to spare.
    let mut w = World::new(cfg);
    w.set_health(3, unreachable());
    exhaust(&mut w, 3);
    assert!(w.state.cases[&3].isolation.is_some());
    assert_eq!(w.round(), vec![Action::Demote { id: 3 }]);
}

#[test]
fn a_detector_signal_is_renewed_while_it_holds_and_ends_soon_after() {
    let mut config = config();
    config.mode = Mode::Listen; // judgments only: nothing runs
    let mut w = World::new(config);
    w.set_health(3, unreachable());
    let ttl_s = DETECTOR_SIGNAL_TTL.as_secs();
    let signals = |w: &World| {
        w.state
            .history
            .iter()
            .filter(|e| matches!(&e.record, Some(Record::Signal(s)) if s.source == "detector"))
            .count()
    };
    for _ in 0..60 {
        w.round();
        let active = w.state.cases[&3].active_signals(w.view.now_ms).count();
        assert_eq!(active, 1, "the judgment holds, so does its signal");
        w.advance_s(1);
    }
    // Renewed at half its life: one record per ttl/2, not one per round.
    let written = signals(&w);
    assert!(
        (60 / (ttl_s / 2) as usize..=60 / (ttl_s / 2) as usize + 2).contains(&written),
        "{written} detector signals in 60 rounds"
    );
    // Healthy again: no longer signalled within the detector's TTL.
    w.set_health(3, Health::Healthy);
    w.advance_s(ttl_s);
    w.round();
    assert_eq!(w.state.cases[&3].active_signals(w.view.now_ms).count(), 0);
    assert_eq!(signals(&w), written, "nothing renewed once healthy");
}

#[test]
fn a_replica_the_detector_finds_healthy_again_is_not_escalated_on_its_old_signal() {
    let mut cfg = config();
    cfg.order = vec![
        step("restart", Scope::Replica, 2),
        step("reimage", Scope::Leader, 20),
    ];
    let mut w = World::new(cfg);
    w.set_health(3, unreachable());
    // The detector's signal, the start of restart (written), its run.
    let ran: Vec<(u64, String)> = (0..3).flat_map(|_| runs(&w.round())).collect();
    assert_eq!(ran, vec![(3, "restart".to_string())], "{:?}", w.attempts(3));
    w.advance_s(1);
    w.report(3, 1, StepResult::Succeeded);
    // Back from its pause: the detector's recorded signal still counts for
    // a while, but the live judgment is newer.
    w.set_health(3, Health::Healthy);
    w.advance_s(2); // restart's deadline passed
    assert!(w.state.cases[&3].active_signals(w.view.now_ms).count() > 0);
    assert_eq!(runs(&w.round()), vec![], "escalated a healthy replica");
    assert_eq!(w.attempts(3).len(), 1);
    w.advance_s(30);
    w.round();
    assert!(
        !w.state.cases.contains_key(&3),
        "closed after the healthy period"
    );
}
