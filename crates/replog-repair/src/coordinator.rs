//! The repair coordinator's decisions, I/O-free: given the replicated
//! [`RepairState`], the leader's view of the members and the configuration,
//! [`Coordinator::decide`] returns what to do: records to write, commands
//! to run, membership changes to make.
//!
//! The runtime writes the records and waits until they are applied before
//! it asks again; it runs a command only when told to by [`Action::Run`],
//! which follows a committed step start of this leader's term. The state
//! refuses a record that breaks its rules (a second start of a step, a
//! stale term), so a duplicate decision can never act twice.
//!
//! One round, in order:
//! 1. Bookkeeping, always (also paused, alarmed or in the grace): a step of
//!    this term not yet run is run (`execute`) or closed as `reacted`; a
//!    step of an earlier term whose deadline passed is closed as `unknown`
//!    (never run again without its outcome).
//! 2. Nothing new in `listen` mode, while paused, while the alarm is
//!    raised, or during the detector's re-register grace.
//! 3. Each case in replica order: an isolated replica is reconciled
//!    (spare added, sick replica removed once the spare is a caught-up
//!    voter; or demoted) and re-admitted when healthy for the healthy
//!    period; a healthy replica's case closes; an unhealthy replica with
//!    nothing in progress gets the next step of the order, or, when the
//!    order is exhausted, is isolated.
//!
//! Every new step and isolation passes two guards: at most
//! `num_allowed_repairs` in progress, and the voters still available (healthy
//! and not under repair) stay at least a quorum of the voters left; a
//! demotion needs one more (the voters left must survive another failure).
//! An
//! isolation also passes the removal limit (past it: the alarm) and the
//! rate limit (past it: wait).

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Limits, Mode, RepairConfig, RepairStep};
use crate::health::{quorum, Health, Reason};
use crate::record::{Isolated, Record, Signal, StepFinished, StepResult, StepStarted};
use crate::state::{Case, RepairState};

/// Longest a recorded judgment of the detector counts. The leader renews it
/// while the judgment holds (each round, once half its life is gone), so a
/// replica the detector finds healthy again stops being signalled within
/// this, not after `--signal-ttl` (that is for reports nobody renews), and
/// its healthy period starts then. A new leader, which has no detector
/// history during its re-register grace, still sees the judgment for this
/// long. `--signal-ttl` caps it.
pub const DETECTOR_SIGNAL_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The `source` of the signals the leader records from its own detector.
pub const DETECTOR_SOURCE: &str = "detector";

/// The leader's view of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub address: String,
    pub voter: bool,
    pub health: Health,
    /// Matched the commit (a spare may be promoted and the sick one removed).
    pub caught_up: bool,
}

/// What the coordinator sees this round.
#[derive(Debug, Clone)]
pub struct View {
    pub now_ms: u64,
    /// This leader's term.
    pub term: u64,
    pub members: Vec<MemberView>,
    /// The detector's re-register grace is on.
    pub grace: bool,
}

impl View {
    fn member(&self, id: u64) -> Option<&MemberView> {
        self.members.iter().find(|m| m.id == id)
    }
    fn voters(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| m.voter)
    }
}

/// What the runtime does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this record into the log.
    Propose(Record),
    /// Run the step (its start is committed): the command of `step` with
    /// the replica's id, address, signal and attempt in its environment.
    Run {
        started: StepStarted,
        step: RepairStep,
        address: String,
    },
    /// Add the spare as a learner (the replica lifecycle promotes it once
    /// it caught up).
    AddLearner { id: u64, address: String },
    /// Remove the replaced replica from the membership.
    Remove { id: u64 },
    /// Make the replica a learner.
    Demote { id: u64 },
}

/// The coordinator of one leadership: its volatile memory is what it saw
/// itself (since when each replica looks healthy, which steps it ran).
#[derive(Debug, Clone)]
pub struct Coordinator {
    config: RepairConfig,
    limits: Limits,
    healthy_since_ms: BTreeMap<u64, u64>,
    /// Steps this leader ran: (replica, attempt, started at); a case that
    /// closes and opens again numbers its attempts from 1 again.
    launched: BTreeSet<(u64, u32, u64)>,
}

/// The counts the guards check, kept up to date within one round.
struct Budget {
    in_progress: usize,
    allowed: usize,
    /// Voters healthy and not under repair or isolated.
    available: BTreeSet<u64>,
    voters: BTreeSet<u64>,
    /// Counted isolations decided in this round (not in the state yet).
    isolations: u32,
}

impl Budget {
    /// True when taking `replica` out (and, when `leaves_voters`, out of
    /// the voters) keeps a quorum of the voters left available.
    fn keeps_quorum(&self, replica: u64, leaves_voters: bool) -> bool {
        let available = self.available.iter().filter(|v| **v != replica).count();
        let voters = if leaves_voters {
            self.voters.iter().filter(|v| **v != replica).count()
        } else {
            self.voters.len()
        };
        voters > 0 && available >= quorum(voters)
    }

    /// True when demoting `replica` leaves voters that can still lose one
    /// more and keep a quorum. A demotion makes the cluster smaller for
    /// good (the learner is held until re-admitted, and re-admission needs
    /// a leader): demoting one of three voters would leave two, and the
    /// next failure would leave no quorum and no way back (the
    /// deterministic cluster harness found exactly that, seed 286). Without
    /// a spare, a cluster of three therefore never demotes.
    fn can_demote(&self, replica: u64) -> bool {
        let available = self.available.iter().filter(|v| **v != replica).count();
        let voters = self.voters.iter().filter(|v| **v != replica).count();
        voters > 0 && available > quorum(voters)
    }

    /// Counts a decision on `replica`: one more in progress, and the
    /// replica no longer available to later decisions of the round. The
    /// voters are left as they are: a demotion lands in a later round, and
    /// until the membership shows it the replica counts among the voters.
    fn take(&mut self, replica: u64, leaves_voters: bool) {
        debug_assert!(
            self.in_progress < self.allowed,
            "{} repairs of {}",
            self.in_progress,
            self.allowed
        );
        debug_assert!(
            self.keeps_quorum(replica, leaves_voters),
            "taking {replica} from available {:?} of voters {:?}",
            self.available,
            self.voters
        );
        self.in_progress += 1;
        self.available.remove(&replica);
    }
}

impl Coordinator {
    /// A coordinator for a new leadership; `limits` from [`RepairConfig::check`].
    pub fn new(config: RepairConfig, limits: Limits) -> Self {
        Coordinator {
            config,
            limits,
            healthy_since_ms: BTreeMap::new(),
            launched: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &RepairConfig {
        &self.config
    }

    /// One round of decisions.
    pub fn decide(&mut self, view: &View, state: &RepairState) -> Vec<Action> {
        self.note_health(view, state);
        let mut out = Vec::new();
        self.bookkeeping(view, state, &mut out);
        self.detector_signals(view, state, &mut out);
        let stopped = self.config.mode == Mode::Listen
            || state.paused.is_some()
            || state.alarm.is_some()
            || view.grace;
        if stopped {
            return out;
        }
        let mut budget = self.budget(view, state);
        for case in state.cases.values() {
            if !self.decide_case(view, state, case, &mut budget, &mut out) {
                break;
            }
        }
        out
    }

    /// Tracks since when each member looks healthy to this leader.
    fn note_health(&mut self, view: &View, state: &RepairState) {
        for m in &view.members {
            if self.looks_healthy(view, state, m.id) {
                self.healthy_since_ms.entry(m.id).or_insert(view.now_ms);
            } else {
                self.healthy_since_ms.remove(&m.id);
            }
        }
        self.healthy_since_ms
            .retain(|id, _| view.member(*id).is_some());
    }

    /// Healthy to this leader now: its detector finds nothing, and no
    /// reported signal counts. The detector's own recorded signals are
    /// left out: this leader's live judgment is their source and is newer
    /// (a replica back from a pause is healthy at once, not when the
    /// record of its silence expires).
    fn looks_healthy(&self, view: &View, state: &RepairState, id: u64) -> bool {
        let detector_healthy = view.member(id).is_some_and(|m| m.health.is_healthy());
        let signalled = state.cases.get(&id).is_some_and(|c| {
            c.active_signals(view.now_ms)
                .any(|(_, s)| s.source != DETECTOR_SOURCE)
        });
        detector_healthy && !signalled
    }

    fn healthy_for_period(&self, view: &View, id: u64) -> bool {
        let period_ms = self.config.healthy_period.as_millis() as u64;
        self.healthy_since_ms
            .get(&id)
            .is_some_and(|since| view.now_ms.saturating_sub(*since) >= period_ms)
    }

    /// Runs or closes the steps that wait for this leader.
    fn bookkeeping(&mut self, view: &View, state: &RepairState, out: &mut Vec<Action>) {
        for case in state.cases.values() {
            let Some(started) = case.unfinished() else {
                continue;
            };
            let mine = started.term == view.term;
            if !mine {
                if view.now_ms >= started.deadline_ms {
                    out.push(finish(started, StepResult::Unknown, view.now_ms));
                }
                continue;
            }
            if started.mode == Mode::React {
                out.push(finish(started, StepResult::Reacted, view.now_ms));
                continue;
            }
            let key = (started.replica, started.attempt, started.started_at_ms);
            if self.launched.contains(&key) {
                continue; // the runner reports its outcome (it kills at the deadline)
            }
            let Some(step) = self.config.order.get(started.step as usize) else {
                out.push(finish(started, StepResult::Failed, view.now_ms));
                continue;
            };
            self.launched.insert(key);
            out.push(Action::Run {
                started: started.clone(),
                step: step.clone(),
                address: view
                    .member(started.replica)
                    .map(|m| m.address.clone())
                    .unwrap_or_default(),
            });
        }
    }

    /// Records the detector's judgments as signals (source `detector`),
    /// renewed when less than half their time to live is left, so that a
    /// judgment that ends expires on its own within
    /// [`DETECTOR_SIGNAL_TTL`].
    fn detector_signals(&self, view: &View, state: &RepairState, out: &mut Vec<Action>) {
        let ttl_ms = self.config.signal_ttl.min(DETECTOR_SIGNAL_TTL).as_millis() as u64;
        for m in &view.members {
            let Health::Unhealthy { reasons } = &m.health else {
                continue;
            };
            for reason in reasons {
                let name = reason.signal();
                let fresh = state
                    .cases
                    .get(&m.id)
                    .and_then(|c| c.signals.get(name))
                    .is_some_and(|s| s.expires_at_ms > view.now_ms.saturating_add(ttl_ms / 2));
                if fresh {
                    continue;
                }
                let outside_ms = match reason {
                    Reason::Unreachable { silent_ms } => *silent_ms,
                    Reason::Lagging { for_ms, .. } => *for_ms,
                };
                out.push(Action::Propose(Record::Signal(Signal {
                    replica: m.id,
                    signal: name.to_string(),
                    details: serde_json::to_string(reason).unwrap_or_default(),
                    outside_ms,
                    source: DETECTOR_SOURCE.into(),
                    reported_at_ms: view.now_ms,
                    expires_at_ms: view.now_ms.saturating_add(ttl_ms),
                })));
            }
        }
    }

    fn budget(&self, view: &View, state: &RepairState) -> Budget {
        let busy: BTreeSet<u64> = state
            .cases
            .values()
            .filter(|c| self.in_progress(view, c))
            .map(|c| c.replica)
            .collect();
        let available = view
            .voters()
            .filter(|m| {
                m.health.is_healthy() && !busy.contains(&m.id) && !state.holds_isolated(m.id)
            })
            .map(|m| m.id)
            .collect();
        Budget {
            in_progress: busy.len(),
            allowed: self.config.num_allowed_repairs as usize,
            available,
            voters: view.voters().map(|m| m.id).collect(),
            isolations: 0,
        }
    }

    /// A repair is in progress for the case: a step without an outcome, a
    /// step that succeeded and still has time to take effect, or a
    /// replacement by a spare not finished.
    fn in_progress(&self, view: &View, case: &Case) -> bool {
        if case.unfinished().is_some() {
            return true;
        }
        let settling = case.attempts.last().is_some_and(|a| {
            let ok = a
                .finished
                .as_ref()
                .is_some_and(|f| matches!(f.result, StepResult::Succeeded | StepResult::Reacted));
            ok && view.now_ms < a.started.deadline_ms
        });
        let replacing = case.is_isolated()
            && case.isolation.as_ref().is_some_and(|i| i.spare.is_some())
            && view.member(case.replica).is_some();
        settling || replacing
    }

    /// Decides one case; false stops the round (the alarm was raised).
    fn decide_case(
        &mut self,
        view: &View,
        state: &RepairState,
        case: &Case,
        budget: &mut Budget,
        out: &mut Vec<Action>,
    ) -> bool {
        if case.isolation.is_some() {
            self.reconcile_isolation(view, case, budget, out);
            return true;
        }
        if self.in_progress(view, case) {
            return true;
        }
        if self.looks_healthy(view, state, case.replica) || view.member(case.replica).is_none() {
            if case.attempts.is_empty() || self.healthy_for_period(view, case.replica) {
                out.push(Action::Propose(Record::CaseClosed {
                    replica: case.replica,
                    at_ms: view.now_ms,
                }));
            }
            return true;
        }
        let next = case.attempts.len();
        match self.config.order.get(next) {
            Some(step) => {
                self.start_step(view, case, next, step.clone(), budget, out);
                true
            }
            None => self.isolate(view, state, case, budget, out),
        }
    }

    fn start_step(
        &self,
        view: &View,
        case: &Case,
        index: usize,
        step: RepairStep,
        budget: &mut Budget,
        out: &mut Vec<Action>,
    ) {
        let mode = self.config.step_mode(&step);
        if mode == Mode::Listen {
            return; // this repair is only listened to: the escalation waits here
        }
        if budget.in_progress >= budget.allowed || !budget.keeps_quorum(case.replica, false) {
            return;
        }
        budget.take(case.replica, false);
        let signal = case
            .active_signals(view.now_ms)
            .map(|(name, _)| name.clone())
            .next()
            .or_else(|| unhealthy_reason(view, case.replica))
            .unwrap_or_default();
        out.push(Action::Propose(Record::StepStarted(StepStarted {
            replica: case.replica,
            attempt: index as u32 + 1,
            step: index as u32,
            repair_id: step.id.clone(),
            scope: step.scope,
            mode,
            signal,
            started_at_ms: view.now_ms,
            deadline_ms: view.now_ms.saturating_add(step.timeout.as_millis() as u64),
            term: view.term,
            max_in_progress: Some(self.config.num_allowed_repairs),
        })));
    }

    /// The order is exhausted: isolate, within the limits. False when the
    /// alarm was raised.
    fn isolate(
        &self,
        view: &View,
        state: &RepairState,
        case: &Case,
        budget: &mut Budget,
        out: &mut Vec<Action>,
    ) -> bool {
        let mode = self.config.mode;
        debug_assert!(mode != Mode::Listen);
        if mode == Mode::Execute {
            let allowed = self.limits.removals_allowed;
            let counted = state.removals_since_reset + budget.isolations;
            if counted >= allowed {
                out.push(Action::Propose(Record::AlarmRaised {
                    at_ms: view.now_ms,
                    reason: format!(
                        "isolating replica {} would make {} isolations since the last reset; the \
                         removal limit allows {allowed} (floor({} x {} voters))",
                        case.replica,
                        counted + 1,
                        self.config.removal_limit,
                        self.limits.voters
                    ),
                }));
                return false;
            }
            if let Some(rate) = self.config.removal_rate_limit {
                let period_ms = rate.period.as_millis() as u64;
                let within =
                    state.removals_within(view.now_ms, period_ms) + budget.isolations as usize;
                if within >= rate.count as usize {
                    return true; // wait for the window to move
                }
            }
        }
        let spare = self.free_spare(view, state);
        let voter = view.member(case.replica).is_some_and(|m| m.voter);
        let demotes = spare.is_none() && voter;
        let safe = if demotes {
            budget.can_demote(case.replica)
        } else {
            budget.keeps_quorum(case.replica, false)
        };
        if budget.in_progress >= budget.allowed || !safe {
            return true;
        }
        budget.take(case.replica, demotes);
        if mode == Mode::Execute {
            budget.isolations += 1;
        }
        out.push(Action::Propose(Record::Isolated(Isolated {
            replica: case.replica,
            spare: spare.map(|s| s.id),
            spare_address: spare.map(|s| s.address.clone()).unwrap_or_default(),
            mode,
            at_ms: view.now_ms,
            term: view.term,
            max_removals: Some(self.limits.removals_allowed),
            rate_limit: self
                .config
                .removal_rate_limit
                .map(|r| (r.count, r.period.as_millis() as u64)),
        })));
        true
    }

    /// The first spare that is not a member and replaces nobody yet.
    fn free_spare(&self, view: &View, state: &RepairState) -> Option<&crate::config::Spare> {
        self.config.spares.iter().find(|s| {
            view.member(s.id).is_none()
                && !state
                    .cases
                    .values()
                    .any(|c| c.isolation.as_ref().is_some_and(|i| i.spare == Some(s.id)))
        })
    }

    /// Drives the membership toward what the isolation decided, and
    /// re-admits a demoted replica healthy for the healthy period.
    fn reconcile_isolation(
        &self,
        view: &View,
        case: &Case,
        budget: &mut Budget,
        out: &mut Vec<Action>,
    ) {
        let Some(iso) = case.isolation.as_ref().filter(|i| i.mode == Mode::Execute) else {
            return; // react: nothing was done, nothing to undo
        };
        let sick = view.member(case.replica);
        match iso.spare {
            Some(spare) => match view.member(spare) {
                None if sick.is_some() => out.push(Action::AddLearner {
                    id: spare,
                    address: iso.spare_address.clone(),
                }),
                Some(s) if s.voter && s.caught_up && sick.is_some() => {
                    // The spare counts only when available itself (a
                    // promoted spare may have failed since).
                    let leaves = sick.is_some_and(|m| m.voter);
                    let mut after = budget.available.clone();
                    let voters: BTreeSet<u64> = budget
                        .voters
                        .iter()
                        .copied()
                        .chain([spare])
                        .filter(|v| !(leaves && *v == case.replica))
                        .collect();
                    after.retain(|v| voters.contains(v));
                    if after.len() >= quorum(voters.len()) {
                        out.push(Action::Remove { id: case.replica });
                    }
                }
                _ => {}
            },
            None => {
                let Some(m) = sick else {
                    return;
                };
                if m.voter {
                    if budget.can_demote(case.replica) {
                        out.push(Action::Demote { id: case.replica });
                    }
                } else if m.health.is_healthy() && self.healthy_for_period(view, m.id) {
                    out.push(Action::Propose(Record::Readmitted {
                        replica: case.replica,
                        at_ms: view.now_ms,
                    }));
                }
            }
        }
    }
}

fn finish(started: &StepStarted, result: StepResult, now_ms: u64) -> Action {
    Action::Propose(Record::StepFinished(StepFinished {
        replica: started.replica,
        attempt: started.attempt,
        result,
        exit_code: None,
        output: String::new(),
        finished_at_ms: now_ms,
    }))
}

fn unhealthy_reason(view: &View, replica: u64) -> Option<String> {
    match &view.member(replica)?.health {
        Health::Unhealthy { reasons } => reasons.first().map(|r| r.signal().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
