//! The coordinator under random signals, failures, command outcomes and
//! leader changes, deterministically from a seed (`REPLOG_REPAIR_SEEDS`
//! seeds, 300 by default). Every round checks the invariants
//! against the simulated world, not against the coordinator's own counts:
//! - never more than `num_allowed_repairs` commands running at once;
//! - no decision takes an available voter (healthy in the world, no step
//!   running on it) when that leaves fewer available voters than a quorum
//!   of the voters left;
//! - isolations since the last reset never exceed the removal limit, nor
//!   those within one window the rate limit;
//! - no step is ever run twice, across leaders.
//!
//! A new leader starts with a fresh coordinator (only the replicated state
//! carries over), its re-register grace, and the old leader's running
//! commands lost: their outcomes never arrive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replog_repair::config::{RateLimit, Spare};
use replog_repair::record::{Signal, StepFinished};
use replog_repair::{
    quorum, Action, Applied, Coordinator, Health, MemberView, Mode, Reason, Record, RepairConfig,
    RepairState, RepairStep, Scope, StepResult, View,
};

const S: u64 = 1_000;

struct Running {
    replica: u64,
    attempt: u32,
    finishes_at_ms: u64,
    result: StepResult,
    term: u64,
}

struct Sim {
    rng: ChaCha8Rng,
    config: RepairConfig,
    removals_allowed: u32,
    state: RepairState,
    position: u64,
    coordinator: Coordinator,
    term: u64,
    now_ms: u64,
    grace_until_ms: u64,
    /// id -> (voter, truly healthy, caught up)
    members: BTreeMap<u64, (bool, bool, bool)>,
    running: Vec<Running>,
    ever_run: BTreeSet<(u64, u32, u64)>,
    removal_times_ms: Vec<u64>,
}

fn config(rng: &mut ChaCha8Rng) -> RepairConfig {
    let step = |id: &str, timeout_s: u64| RepairStep {
        id: id.into(),
        command: "true".into(),
        scope: Scope::Replica,
        timeout: Duration::from_secs(timeout_s),
        mode: Mode::Execute,
    };
    RepairConfig {
        order: vec![step("restart", 20), step("reimage", 60)],
        num_allowed_repairs: rng.gen_range(1..=2),
        removal_rate_limit: rng.gen_bool(0.5).then_some(RateLimit {
            count: 1,
            period: Duration::from_secs(300),
        }),
        removal_limit: [0.2, 0.4, 0.6][rng.gen_range(0..3)],
        spares: if rng.gen_bool(0.5) {
            vec![Spare {
                id: 6,
                address: "h:6".into(),
            }]
        } else {
            Vec::new()
        },
        healthy_period: Duration::from_secs(60),
        mode: if rng.gen_bool(0.8) {
            Mode::Execute
        } else {
            Mode::React
        },
        signal_ttl: Duration::from_secs(120),
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = config(&mut rng);
        let limits = config.check(5, &[1, 2, 3, 4, 5]).expect("valid");
        let members = (1..=5).map(|id| (id, (true, true, true))).collect();
        Sim {
            rng,
            coordinator: Coordinator::new(config.clone(), limits),
            removals_allowed: limits.removals_allowed,
            config,
            state: RepairState::default(),
            position: 0,
            term: 1,
            now_ms: 1_000 * S,
            grace_until_ms: 0,
            members,
            running: Vec::new(),
            ever_run: BTreeSet::new(),
            removal_times_ms: Vec::new(),
        }
    }

    fn apply(&mut self, record: Record) -> bool {
        self.position += 1;
        matches!(self.state.apply(self.position, record), Applied::Changed)
    }

    fn view(&self) -> View {
        let silent = Health::Unhealthy {
            reasons: vec![Reason::Unreachable { silent_ms: 90 * S }],
        };
        let grace = self.now_ms < self.grace_until_ms;
        View {
            now_ms: self.now_ms,
            term: self.term,
            grace,
            members: self
                .members
                .iter()
                .map(|(id, (voter, healthy, caught_up))| MemberView {
                    id: *id,
                    address: format!("h:{id}"),
                    voter: *voter,
                    health: if grace {
                        Health::Grace
                    } else if *healthy {
                        Health::Healthy
                    } else {
                        silent.clone()
                    },
                    caught_up: *caught_up,
                })
                .collect(),
        }
    }

    /// Voters healthy in the world with no command running on them.
    fn available(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|(id, (voter, healthy, _))| {
                *voter && *healthy && !self.running.iter().any(|r| r.replica == **id)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|(_, m)| m.0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Checks that taking `replica` out (and out of the voters) keeps a
    /// quorum available, when it was available.
    fn check_takes(&self, what: &str, replica: u64, leaves_voters: bool) {
        let available = self.available();
        if !available.contains(&replica) {
            return;
        }
        let voters = self.voters().len() - usize::from(leaves_voters);
        let left = available.len() - 1;
        assert!(
            left >= quorum(voters),
            "{what} of available replica {replica} leaves {left} of {voters} voters available: {:?}",
            self.members
        );
    }

    fn world_step(&mut self) {
        self.now_ms += self.rng.gen_range(1..=10) * S;
        let roll = self.rng.gen_range(0..100);
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let id = ids[self.rng.gen_range(0..ids.len())];
        match roll {
            0..=4 => {
                // A failure, but never of a whole quorum by the world itself.
                let down = self.members.values().filter(|m| m.0 && !m.1).count();
                if down + 1 < quorum(self.voters().len()) {
                    self.members.get_mut(&id).unwrap().1 = false;
                }
            }
            5..=12 => self.members.get_mut(&id).unwrap().1 = true,
            13..=20 => {
                let now = self.now_ms;
                let name = ["disk_free", "fsync_latency"][self.rng.gen_range(0..2)];
                let ttl_s = self.rng.gen_range(5..200);
                self.apply(Record::Signal(Signal {
                    replica: id,
                    signal: name.into(),
                    details: String::new(),
                    outside_ms: 0,
                    source: "sim".into(),
                    reported_at_ms: now,
                    expires_at_ms: now + ttl_s * S,
                }));
            }
            21..=22 => self.leader_change(),
            23 if self.state.alarm.is_some() => {
                self.apply(Record::Reset { at_ms: self.now_ms });
            }
            _ => {}
        }
        self.finish_commands();
        self.lifecycle();
    }

    fn leader_change(&mut self) {
        self.term += 1;
        self.grace_until_ms = self.now_ms + 30 * S;
        // The old leader's commands: their outcomes never reach the log.
        self.running.clear();
        let limits = self.config.check(5, &[]).unwrap();
        self.coordinator = Coordinator::new(self.config.clone(), limits);
    }

    fn finish_commands(&mut self) {
        let now = self.now_ms;
        let (done, left): (Vec<_>, Vec<_>) = self
            .running
            .drain(..)
            .partition(|r| r.finishes_at_ms <= now);
        self.running = left;
        for r in done {
            if r.term != self.term {
                continue;
            }
            if r.result == StepResult::Succeeded && self.rng.gen_bool(0.5) {
                if let Some(m) = self.members.get_mut(&r.replica) {
                    m.1 = true;
                }
            }
            self.apply(Record::StepFinished(StepFinished {
                replica: r.replica,
                attempt: r.attempt,
                result: r.result,
                exit_code: Some(0),
                output: String::new(),
                finished_at_ms: now,
            }));
        }
    }

    /// The replica lifecycle: learners catch up and are promoted unless
    /// an isolation holds them.
    fn lifecycle(&mut self) {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            let held = self.state.holds_isolated(id);
            let m = self.members.get_mut(&id).unwrap();
            if !m.0 && m.1 {
                m.2 = true;
                if !held {
                    m.0 = true;
                }
            }
        }
    }

    fn round(&mut self) {
        let view = self.view();
        let actions = self.coordinator.decide(&view, &self.state);
        if std::env::var("SIM_DEBUG").is_ok() {
            eprintln!(
                "t={} members={:?} running={:?} actions={actions:?}",
                self.now_ms,
                self.members,
                self.running
                    .iter()
                    .map(|r| (r.replica, r.attempt))
                    .collect::<Vec<_>>()
            );
        }
        for a in actions {
            self.act(a);
        }
        self.check_limits();
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Propose(record) => {
                if let Record::StepStarted(s) = &record {
                    if s.mode == Mode::Execute {
                        self.check_takes("a step", s.replica, false);
                    }
                }
                let counted = matches!(&record, Record::Isolated(i) if i.mode == Mode::Execute);
                if self.apply(record) && counted {
                    self.removal_times_ms.push(self.now_ms);
                }
            }
            Action::Run { started, step, .. } => {
                assert!(
                    self.ever_run
                        .insert((started.replica, started.attempt, started.started_at_ms)),
                    "step run twice: {started:?}"
                );
                assert_eq!(started.term, self.term);
                assert!(
                    self.running.len() < self.config.num_allowed_repairs as usize,
                    "more than {} commands at once",
                    self.config.num_allowed_repairs
                );
                let took_ms = self.rng.gen_range(1..=step.timeout.as_secs() + 10) * S;
                let result = if took_ms >= step.timeout.as_millis() as u64 {
                    StepResult::TimedOut
                } else if self.rng.gen_bool(0.5) {
                    StepResult::Succeeded
                } else {
                    StepResult::Failed
                };
                self.running.push(Running {
                    replica: started.replica,
                    attempt: started.attempt,
                    finishes_at_ms: self.now_ms + took_ms.min(step.timeout.as_millis() as u64),
                    result,
                    term: started.term,
                });
            }
            Action::AddLearner { id, .. } => {
                self.members.entry(id).or_insert((false, true, false));
            }
            Action::Remove { id } => {
                self.check_takes("a removal", id, true);
                assert!(self.members.len() > 1);
                self.members.remove(&id);
            }
            Action::Demote { id } => {
                self.check_takes("a demotion", id, true);
                self.members.get_mut(&id).unwrap().0 = false;
            }
        }
    }

    fn check_limits(&self) {
        assert!(
            self.state.removals_since_reset <= self.removals_allowed,
            "{} isolations, {} allowed",
            self.state.removals_since_reset,
            self.removals_allowed
        );
        if let Some(rate) = self.config.removal_rate_limit {
            let period_ms = rate.period.as_millis() as u64;
            for (i, t) in self.removal_times_ms.iter().enumerate() {
                let within = self.removal_times_ms[i..]
                    .iter()
                    .filter(|u| **u < t + period_ms)
                    .count();
                assert!(
                    within <= rate.count as usize,
                    "{within} isolations within {period_ms} ms"
                );
            }
        }
    }
}

#[test]
fn the_coordinator_keeps_its_limits_under_random_faults_and_leader_changes() {
    let seeds: u64 = std::env::var("REPLOG_REPAIR_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut totals = BTreeMap::<&str, u64>::new();
    for seed in 0..seeds {
        let mut sim = Sim::new(seed);
        for _ in 0..600 {
            sim.world_step();
            sim.round();
        }
        *totals.entry("runs").or_default() += sim.ever_run.len() as u64;
        *totals.entry("isolations").or_default() += sim.removal_times_ms.len() as u64;
        *totals.entry("alarms").or_default() += u64::from(sim.state.alarm.is_some());
        *totals.entry("refused").or_default() += sim.state.refused;
    }
    eprintln!("{seeds} seeds: {totals:?}");
    // The simulation must exercise what it checks.
    assert!(totals["runs"] > seeds, "{totals:?}");
    assert!(totals["isolations"] > 0, "{totals:?}");
    assert!(totals["alarms"] > 0, "{totals:?}");
}
