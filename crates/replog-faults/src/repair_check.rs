//! The repair coordinator's invariants, checked over what a campaign saw
//! of it: the repair records of the replicated history (`GET /repairs`,
//! merged by log position from every poll, see [`Seen::merge`]) and the
//! calls the repair command recorded in its calls file. Pure functions,
//! one per rule, each returning the violations it found.
//!
//! Only *applied* records count (an event without a `refused` reason): a
//! refused record changed nothing in the state, and must have acted on
//! nothing either ([`steps_run_as_decided`]).
//!
//! The rules (each names its [`Rule`]):
//! - [`repairs_at_once`]: never more than `--num-allowed-repairs` replicas
//!   under repair at one instant. A step is in progress from its start to
//!   its outcome, or, when it succeeded, to the later of its outcome and
//!   its deadline (the replica has until then to heal, and the
//!   coordinator counts it); an isolation occupies its instant.
//! - [`removal_limits`]: counted isolations since the last reset never
//!   exceed `floor(--removal-limit x voters)`, never more than the rate
//!   limit's count in one window, and the state's own count at the end
//!   equals the records'.
//! - [`alarm_stops_decisions`]: no step starts and no isolation is applied
//!   between an alarm and the next reset.
//! - [`isolations_keep_quorum`]: replicas isolated (demoted, not yet
//!   re-admitted) at once never exceed [`max_isolated_at_once`].
//! - [`decisions_fenced_by_term`]: the terms of applied decisions (step
//!   starts, isolations) never go down in log order.
//! - [`steps_run_as_decided`]: every command call belongs to an applied
//!   `execute` step start (same replica, attempt, repair id, scope and
//!   deadline), and no step start ran more than once.
//! - [`histories_agree`]: two polls never showed different records at one
//!   position.
//!
//! The history a replica serves holds only its last 64 records: a poll
//! whose oldest record is newer than everything merged so far may have
//! missed some; [`Seen::gaps`] counts such polls (the rules are then
//! checked on what was seen, and the report says so).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::checker::{Rule, Violation};

/// How many records a replica's `GET /repairs` history holds at most.
pub const SERVED_HISTORY: usize = 64;

/// A decision to run one step, as the history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStarted {
    pub replica: u64,
    pub attempt: u32,
    pub step: u32,
    pub repair_id: String,
    /// `leader` or `replica`.
    pub scope: String,
    /// `react` or `execute`.
    pub mode: String,
    pub started_at_ms: u64,
    pub deadline_ms: u64,
    pub term: u64,
}

/// A step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFinished {
    pub replica: u64,
    pub attempt: u32,
    /// `succeeded`, `failed`, `timed_out`, `unknown` or `reacted`.
    pub result: String,
    pub finished_at_ms: u64,
}

/// A decision to isolate a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolated {
    pub replica: u64,
    #[serde(default)]
    pub spare: Option<u64>,
    pub mode: String,
    pub at_ms: u64,
    pub term: u64,
}

impl Isolated {
    /// Counted by the removal limits and acting on the membership.
    pub fn executes(&self) -> bool {
        self.mode == "execute"
    }
}

/// A repair record as `GET /repairs` serves it (the fields the rules
/// read; the others are ignored, an unknown kind is [`Record::Other`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Signal {
        replica: u64,
        signal: String,
        #[serde(default)]
        source: String,
    },
    StepStarted(StepStarted),
    StepFinished(StepFinished),
    Isolated(Isolated),
    Readmitted {
        replica: u64,
        at_ms: u64,
    },
    CaseClosed {
        replica: u64,
    },
    Cancelled {
        replica: u64,
    },
    AlarmRaised {
        at_ms: u64,
        #[serde(default)]
        reason: String,
    },
    Reset {
        at_ms: u64,
    },
    Paused {
        at_ms: u64,
    },
    Resumed {
        at_ms: u64,
    },
    #[serde(other)]
    Other,
}

/// One entry of the served history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub position: u64,
    pub record: Option<Record>,
    /// Why the state refused the record (`None`: applied).
    #[serde(default)]
    pub refused: Option<String>,
}

impl Event {
    /// The record, if the state applied it.
    pub fn applied(&self) -> Option<&Record> {
        match self.refused {
            None => self.record.as_ref(),
            Some(_) => None,
        }
    }
}

/// One run of the repair command, as its calls file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepCall {
    pub repair_id: String,
    pub replica: u64,
    pub attempt: u32,
    pub scope: String,
    pub deadline_ms: u64,
    pub at_ms: u64,
}

/// Parses the calls file: `repair_id|replica|attempt|scope|deadline_ms|at_ms`
/// per line; a line that does not parse (being written) is skipped.
pub fn parse_calls(text: &str) -> Vec<StepCall> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            if f.len() != 6 {
                return None;
            }
            Some(StepCall {
                repair_id: f[0].to_string(),
                replica: f[1].parse().ok()?,
                attempt: f[2].parse().ok()?,
                scope: f[3].to_string(),
                deadline_ms: f[4].parse().ok()?,
                at_ms: f[5].parse().ok()?,
            })
        })
        .collect()
}

/// The limits the coordinator was started with, computed here from the
/// flags the campaign gave (not read back from the replicas).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub voters: usize,
    pub num_allowed_repairs: u32,
    /// `floor(--removal-limit x voters)`.
    pub removals_allowed: u32,
    /// `--removal-rate-limit` as (count, period in ms).
    pub rate_limit: Option<(u32, u64)>,
}

/// The most replicas a coordinator without spares may hold isolated at
/// once: each demotion must leave voters that can lose one more and keep
/// a quorum (`left - 1 >= left/2 + 1`, so at least 3 voters left), and
/// never fewer than a quorum of the original voters. 2 of 5, 0 of 3.
pub fn max_isolated_at_once(voters: usize) -> usize {
    let quorum = |n: usize| n / 2 + 1;
    (1..=voters)
        .take_while(|k| {
            let left = voters - k;
            // One more failure keeps a quorum: left - 1 >= quorum(left).
            left > quorum(left) && left >= quorum(voters)
        })
        .last()
        .unwrap_or(0)
}

/// The state's counters at the end, from the most advanced final poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FinalState {
    pub applied_through: u64,
    pub removals_since_reset: u32,
    pub alarm: bool,
    pub open_cases: usize,
    /// What the replica says the removal limit allows.
    pub removals_allowed: u32,
}

/// Everything seen of the coordinator during a campaign.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Seen {
    /// Every record seen, by log position.
    pub events: BTreeMap<u64, Event>,
    /// Positions at which two polls showed different events.
    pub conflicts: Vec<(u64, String)>,
    /// Polls that may have missed records (see the module docs).
    pub gaps: u64,
    /// Wall clock (unix ms) of the last poll: a step without an outcome
    /// is in progress until then.
    pub end_ms: u64,
    pub final_state: Option<FinalState>,
    pub calls: Vec<StepCall>,
}

impl Seen {
    /// Merges one poll's history (oldest first, as served).
    pub fn merge(&mut self, history: Vec<Event>) {
        let newest = self.events.keys().next_back().copied();
        let oldest = history.iter().map(|e| e.position).min();
        if let (Some(newest), Some(oldest)) = (newest, oldest) {
            if history.len() >= SERVED_HISTORY && oldest > newest {
                self.gaps += 1;
            }
        }
        for e in history {
            match self.events.get(&e.position) {
                Some(known) if *known != e => self
                    .conflicts
                    .push((e.position, format!("{known:?} and then {e:?}"))),
                Some(_) => {}
                None => {
                    self.events.insert(e.position, e);
                }
            }
        }
    }

    /// The applied records in log order.
    pub fn applied(&self) -> impl Iterator<Item = (u64, &Record)> {
        self.events
            .values()
            .filter_map(|e| e.applied().map(|r| (e.position, r)))
    }

    /// Applied isolations that demote (execute, no spare): (replica, at_ms).
    pub fn demotions(&self) -> Vec<(u64, u64)> {
        self.applied()
            .filter_map(|(_, r)| match r {
                Record::Isolated(i) if i.executes() && i.spare.is_none() => {
                    Some((i.replica, i.at_ms))
                }
                _ => None,
            })
            .collect()
    }
}

fn violation(rule: Rule, detail: String) -> Violation {
    Violation {
        rule,
        detail,
        ops: Vec::new(),
    }
}

/// Every rule over `seen`.
pub fn check_repairs(seen: &Seen, limits: &Limits) -> Vec<Violation> {
    let mut v = Vec::new();
    v.extend(repairs_at_once(seen, limits));
    v.extend(removal_limits(seen, limits));
    v.extend(alarm_stops_decisions(seen));
    v.extend(isolations_keep_quorum(seen, limits));
    v.extend(decisions_fenced_by_term(seen));
    v.extend(steps_run_as_decided(seen));
    v.extend(histories_agree(seen));
    v
}

/// The outcome of step start `s` among the records after it (before the
/// replica's next step start).
fn outcome_of<'a>(s: &StepStarted, after: &[&'a Record]) -> Option<&'a StepFinished> {
    for r in after {
        match r {
            Record::StepFinished(f) if f.replica == s.replica && f.attempt == s.attempt => {
                return Some(f)
            }
            Record::StepStarted(next) if next.replica == s.replica => return None,
            _ => {}
        }
    }
    None
}

/// `(replica, from_ms, to_ms)` of every applied step (see the module
/// docs) and every counted isolation (`to = from + 1`).
pub fn in_progress_intervals(seen: &Seen) -> Vec<(u64, u64, u64)> {
    let applied: Vec<&Record> = seen.applied().map(|(_, r)| r).collect();
    let mut out = Vec::new();
    for (i, r) in applied.iter().enumerate() {
        match r {
            Record::StepStarted(s) => {
                let finished = outcome_of(s, &applied[i + 1..]);
                let to = match finished {
                    None => seen.end_ms.max(s.started_at_ms + 1),
                    Some(f) if matches!(f.result.as_str(), "succeeded" | "reacted") => {
                        f.finished_at_ms.max(s.deadline_ms)
                    }
                    Some(f) => f.finished_at_ms,
                };
                out.push((s.replica, s.started_at_ms, to));
            }
            Record::Isolated(iso) if iso.executes() => {
                out.push((iso.replica, iso.at_ms, iso.at_ms + 1));
            }
            _ => {}
        }
    }
    out
}

/// The most replicas in progress at one start instant, and that instant.
pub fn most_at_once(intervals: &[(u64, u64, u64)]) -> (usize, u64, BTreeSet<u64>) {
    intervals
        .iter()
        .map(|(_, at, _)| {
            let busy: BTreeSet<u64> = intervals
                .iter()
                .filter(|(_, from, to)| from <= at && at < to)
                .map(|(r, _, _)| *r)
                .collect();
            (busy.len(), *at, busy)
        })
        .max_by_key(|(n, at, _)| (*n, std::cmp::Reverse(*at)))
        .unwrap_or_default()
}

pub fn repairs_at_once(seen: &Seen, limits: &Limits) -> Vec<Violation> {
    let (most, at, busy) = most_at_once(&in_progress_intervals(seen));
    if most <= limits.num_allowed_repairs as usize {
        return Vec::new();
    }
    vec![violation(
        Rule::RepairsAtOnce,
        format!(
            "replicas {busy:?} were under repair at once at {at} ms; --num-allowed-repairs is {}",
            limits.num_allowed_repairs
        ),
    )]
}

pub fn removal_limits(seen: &Seen, limits: &Limits) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut since_reset = 0u32;
    let mut times: Vec<u64> = Vec::new();
    let through = seen.final_state.map_or(u64::MAX, |f| f.applied_through);
    let mut counted_through = 0u32;
    for (position, r) in seen.applied() {
        match r {
            Record::Reset { .. } => since_reset = 0,
            Record::Isolated(i) if i.executes() => {
                since_reset += 1;
                if since_reset > limits.removals_allowed {
                    out.push(violation(
                        Rule::RemovalLimits,
                        format!(
                            "isolation of replica {} at position {position} makes {since_reset} \
                             since the last reset; the removal limit allows {}",
                            i.replica, limits.removals_allowed
                        ),
                    ));
                }
                if let Some((count, period_ms)) = limits.rate_limit {
                    let from = i.at_ms.saturating_sub(period_ms);
                    let within = times.iter().filter(|t| **t > from).count() + 1;
                    if within > count as usize {
                        out.push(violation(
                            Rule::RemovalLimits,
                            format!(
                                "isolation of replica {} at {} ms makes {within} within \
                                 {period_ms} ms; the rate limit allows {count}",
                                i.replica, i.at_ms
                            ),
                        ));
                    }
                }
                times.push(i.at_ms);
            }
            _ => {}
        }
        if position <= through {
            counted_through = since_reset;
        }
    }
    if let Some(f) = seen.final_state {
        if f.removals_allowed != limits.removals_allowed {
            out.push(violation(
                Rule::RemovalLimits,
                format!(
                    "the replicas allow {} isolations; the flags allow floor(limit x {} voters) = {}",
                    f.removals_allowed, limits.voters, limits.removals_allowed
                ),
            ));
        }
        if seen.gaps == 0 && f.removals_since_reset != counted_through {
            out.push(violation(
                Rule::RemovalLimits,
                format!(
                    "the state counts {} isolations since the last reset at position {}; its \
                     records count {counted_through}",
                    f.removals_since_reset, f.applied_through
                ),
            ));
        }
    }
    out
}

pub fn alarm_stops_decisions(seen: &Seen) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut alarm: Option<u64> = None;
    for (position, r) in seen.applied() {
        match r {
            Record::AlarmRaised { .. } => alarm = alarm.or(Some(position)),
            Record::Reset { .. } => alarm = None,
            Record::StepStarted(_) | Record::Isolated(_) => {
                if let Some(raised) = alarm {
                    out.push(violation(
                        Rule::AlarmStopsDecisions,
                        format!(
                            "{r:?} applied at position {position}, after the alarm of position \
                             {raised} and before any reset"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

pub fn isolations_keep_quorum(seen: &Seen, limits: &Limits) -> Vec<Violation> {
    let max = max_isolated_at_once(limits.voters);
    let mut isolated = BTreeSet::new();
    let mut out = Vec::new();
    for (position, r) in seen.applied() {
        match r {
            Record::Isolated(i) if i.executes() && i.spare.is_none() => {
                isolated.insert(i.replica);
                if isolated.len() > max {
                    out.push(violation(
                        Rule::IsolationsKeepQuorum,
                        format!(
                            "replicas {isolated:?} isolated at once at position {position}; of \
                             {} voters at most {max} may be (the voters left must survive one \
                             more failure)",
                            limits.voters
                        ),
                    ));
                }
            }
            Record::Readmitted { replica, .. } => {
                isolated.remove(replica);
            }
            _ => {}
        }
    }
    out
}

pub fn decisions_fenced_by_term(seen: &Seen) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut latest = 0u64;
    for (position, r) in seen.applied() {
        let term = match r {
            Record::StepStarted(s) => s.term,
            Record::Isolated(i) => i.term,
            _ => continue,
        };
        if term < latest {
            out.push(violation(
                Rule::DecisionsFencedByTerm,
                format!(
                    "a decision of term {term} was applied at position {position} after one of \
                     term {latest}: {r:?}"
                ),
            ));
        }
        latest = latest.max(term);
    }
    out
}

fn runs(s: &StepStarted, c: &StepCall) -> bool {
    s.replica == c.replica
        && s.attempt == c.attempt
        && s.repair_id == c.repair_id
        && s.scope == c.scope
        && s.deadline_ms == c.deadline_ms
}

pub fn steps_run_as_decided(seen: &Seen) -> Vec<Violation> {
    let mut out = Vec::new();
    let started = |applied: bool| -> Vec<&StepStarted> {
        seen.events
            .values()
            .filter(|e| e.refused.is_none() == applied)
            .filter_map(|e| match &e.record {
                Some(Record::StepStarted(s)) => Some(s),
                _ => None,
            })
            .collect()
    };
    let (applied, refused) = (started(true), started(false));
    for c in &seen.calls {
        if applied.iter().any(|s| s.mode == "execute" && runs(s, c)) {
            continue;
        }
        let why = if refused.iter().any(|s| runs(s, c)) {
            "for a step start the state refused"
        } else {
            "without an applied execute step start in the history"
        };
        out.push(violation(
            Rule::StepsRunAsDecided,
            format!(
                "the repair command ran {why}: {c:?} (polls that may have missed records: {})",
                seen.gaps
            ),
        ));
    }
    for s in applied {
        let n = seen.calls.iter().filter(|c| runs(s, c)).count();
        if n > 1 {
            out.push(violation(
                Rule::StepsRunAsDecided,
                format!("step start {s:?} ran {n} times"),
            ));
        }
    }
    out
}

pub fn histories_agree(seen: &Seen) -> Vec<Violation> {
    seen.conflicts
        .iter()
        .map(|(position, what)| {
            violation(
                Rule::RepairHistoriesAgree,
                format!("two polls disagree at position {position}: {what}"),
            )
        })
        .collect()
}

/// What the coordinator did, counted from the applied records.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RepairReport {
    /// Signals by name (`unreachable`, ...).
    pub signals: BTreeMap<String, u64>,
    pub steps_started: u64,
    /// Step outcomes by result.
    pub steps_finished: BTreeMap<String, u64>,
    pub isolations: u64,
    pub readmissions: u64,
    pub cases_closed: u64,
    pub alarms: u64,
    pub resets: u64,
    /// Refused records by reason (digits replaced by `N`).
    pub refused: BTreeMap<String, u64>,
    pub command_calls: usize,
    /// Command calls that began after their step's deadline (a step's
    /// command should be killed at it; see docs/reliability.md).
    pub commands_after_deadline: usize,
    /// The latest an outcome was recorded after its step's deadline, in ms
    /// (0: none after it).
    pub longest_step_overrun_ms: u64,
    pub most_in_progress_at_once: usize,
    pub most_isolated_at_once: usize,
    pub records_seen: usize,
    pub history_gaps: u64,
    pub polls: u64,
    pub polls_failed: u64,
    pub final_state: Option<FinalState>,
}

/// A refusal reason with its numbers replaced, to count by kind.
fn reason_kind(why: &str) -> String {
    let mut out = String::new();
    for c in why.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('N') {
                out.push('N');
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn most_isolated(seen: &Seen) -> usize {
    let mut isolated = BTreeSet::new();
    let mut most = 0;
    for (_, r) in seen.applied() {
        match r {
            Record::Isolated(i) if i.executes() && i.spare.is_none() => {
                isolated.insert(i.replica);
            }
            Record::Readmitted { replica, .. } => {
                isolated.remove(replica);
            }
            _ => {}
        }
        most = most.max(isolated.len());
    }
    most
}

/// The latest an applied outcome came after its step's deadline, in ms.
fn longest_overrun(seen: &Seen) -> u64 {
    let applied: Vec<&Record> = seen.applied().map(|(_, r)| r).collect();
    applied
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Record::StepStarted(s) => outcome_of(s, &applied[i + 1..])
                .map(|f| f.finished_at_ms.saturating_sub(s.deadline_ms)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Counts what `seen` holds (the poll counters are the watcher's).
pub fn repair_report(seen: &Seen, polls: u64, polls_failed: u64) -> RepairReport {
    let mut r = RepairReport {
        command_calls: seen.calls.len(),
        commands_after_deadline: seen
            .calls
            .iter()
            .filter(|c| c.at_ms > c.deadline_ms)
            .count(),
        longest_step_overrun_ms: longest_overrun(seen),
        most_in_progress_at_once: most_at_once(&in_progress_intervals(seen)).0,
        most_isolated_at_once: most_isolated(seen),
        records_seen: seen.events.len(),
        history_gaps: seen.gaps,
        polls,
        polls_failed,
        final_state: seen.final_state,
        ..RepairReport::default()
    };
    for e in seen.events.values() {
        if let Some(why) = &e.refused {
            *r.refused.entry(reason_kind(why)).or_default() += 1;
        }
    }
    for (_, rec) in seen.applied() {
        match rec {
            Record::Signal { signal, .. } => *r.signals.entry(signal.clone()).or_default() += 1,
            Record::StepStarted(_) => r.steps_started += 1,
            Record::StepFinished(f) => *r.steps_finished.entry(f.result.clone()).or_default() += 1,
            Record::Isolated(i) if i.executes() => r.isolations += 1,
            Record::Readmitted { .. } => r.readmissions += 1,
            Record::CaseClosed { .. } => r.cases_closed += 1,
            Record::AlarmRaised { .. } => r.alarms += 1,
            Record::Reset { .. } => r.resets += 1,
            _ => {}
        }
    }
    r
}

impl RepairReport {
    /// Plain-text lines for the campaign's table.
    pub fn table(&self) -> String {
        let finished: u64 = self.steps_finished.values().sum();
        let mut s = format!(
            "repair coordinator: signals {:?}, steps started {}, finished {} {:?}, isolations {}, \
             re-admissions {}, cases closed {}, alarms {}, resets {}, command calls {}\n",
            self.signals,
            self.steps_started,
            finished,
            self.steps_finished,
            self.isolations,
            self.readmissions,
            self.cases_closed,
            self.alarms,
            self.resets,
            self.command_calls
        );
        s += &format!(
            "  commands begun after their step's deadline {}, longest outcome after a deadline {} \
             ms\n  most in progress at once {}, most isolated at once {}, refused {:?}\n  records \
             seen {}, polls {} ({} failed, {} may have missed records), at the end {:?}\n",
            self.commands_after_deadline,
            self.longest_step_overrun_ms,
            self.most_in_progress_at_once,
            self.most_isolated_at_once,
            self.refused,
            self.records_seen,
            self.polls,
            self.polls_failed,
            self.history_gaps,
            self.final_state
        );
        s
    }
}
