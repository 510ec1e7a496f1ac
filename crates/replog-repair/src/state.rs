//! The replicated repair memory: every replica folds the committed repair
//! records, in log order, into the same [`RepairState`]. A new leader's
//! coordinator decides from it alone (and its own observations), so it
//! continues an escalation where the old leader stopped.
//!
//! Invariants (each asserted or enforced by refusing the record):
//! - records apply once: one at or below `applied_through` is skipped;
//! - decisions are fenced by term: a step start or isolation from a term
//!   below the latest decision's is refused;
//! - a case's attempts are numbered 1, 2, ... and a step starts only after
//!   the previous one has an outcome, so no step is started twice and none
//!   is forgotten;
//! - every counted isolation stays counted until an operator's reset; the
//!   rate window keeps the last [`MAX_RECENT_REMOVALS`] isolation times;
//! - the state is bounded: [`MAX_CASES`] cases, [`MAX_SIGNALS_PER_CASE`]
//!   signals and [`MAX_ATTEMPTS_PER_CASE`] attempts each, [`MAX_HISTORY`]
//!   recent records; a record that would exceed a bound is refused.
//!
//! A refused record changes nothing but `applied_through`, the refusal
//! count and the history: all replicas refuse it alike.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::record::{output_tail, Isolated, Record, StepFinished, StepStarted};

pub const MAX_CASES: usize = 64;
pub const MAX_SIGNALS_PER_CASE: usize = 16;
pub const MAX_ATTEMPTS_PER_CASE: usize = 32;
pub const MAX_HISTORY: usize = 64;
pub const MAX_RECENT_REMOVALS: usize = 64;
/// Output kept per attempt in the state (the history keeps the record's).
pub const MAX_ATTEMPT_OUTPUT_BYTES: usize = 256;
/// Largest encoded state accepted from disk or a snapshot.
pub const MAX_STATE_BYTES: usize = 4 * 1024 * 1024;

/// A signal that counts until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSignal {
    pub details: String,
    pub source: String,
    pub outside_ms: u64,
    pub reported_at_ms: u64,
    pub expires_at_ms: u64,
}

/// One step of a case, with its outcome once known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub started: StepStarted,
    pub finished: Option<StepFinished>,
}

/// Everything known about one sick replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub replica: u64,
    pub opened_at_ms: u64,
    pub signals: BTreeMap<String, ActiveSignal>,
    pub attempts: Vec<Attempt>,
    pub isolation: Option<Isolated>,
}

impl Case {
    /// Signals that still count at `now_ms`.
    pub fn active_signals(&self, now_ms: u64) -> impl Iterator<Item = (&String, &ActiveSignal)> {
        self.signals
            .iter()
            .filter(move |(_, s)| s.expires_at_ms > now_ms)
    }

    /// The attempt without an outcome, if any (at most the last).
    pub fn unfinished(&self) -> Option<&StepStarted> {
        self.attempts
            .last()
            .filter(|a| a.finished.is_none())
            .map(|a| &a.started)
    }

    /// True when an isolation that acts on the membership was decided.
    pub fn is_isolated(&self) -> bool {
        self.isolation
            .as_ref()
            .is_some_and(|i| i.mode == Mode::Execute)
    }
}

/// The alarm: the removal limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub at_ms: u64,
    pub reason: String,
}

/// One recent record, as applied (or refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub position: u64,
    pub record: Option<Record>,
    /// Why the record was refused (`record` is then what was decoded, if anything).
    pub refused: Option<String>,
}

/// The replicated repair memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairState {
    /// Log position of the last record folded in (0: none).
    pub applied_through: u64,
    /// Term of the latest decision.
    pub last_term: u64,
    pub cases: BTreeMap<u64, Case>,
    /// Counted isolations since the last reset.
    pub removals_since_reset: u32,
    /// Times of the latest counted isolations (for the rate limit).
    pub recent_removals_ms: VecDeque<u64>,
    pub alarm: Option<Alarm>,
    pub paused: Option<Alarm>,
    /// Records refused since the state began.
    pub refused: u64,
    pub history: VecDeque<Event>,
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("no open case for replica {0}")]
    NoCase(u64),
    #[error("decision of term {term} after one of term {last_term}")]
    StaleTerm { term: u64, last_term: u64 },
    #[error("attempt {got} of replica {replica}, expected {expected}")]
    WrongAttempt {
        replica: u64,
        got: u32,
        expected: u32,
    },
    #[error("replica {0} has a step without an outcome")]
    StepInProgress(u64),
    #[error("replica {0} is isolated")]
    Isolated(u64),
    #[error("replica {0} is not isolated")]
    NotIsolated(u64),
    #[error("the alarm is raised")]
    Alarm,
    #[error("{0}")]
    Limit(String),
    #[error("bound exceeded: {0}")]
    Bound(&'static str),
    #[error("undecodable record: {0}")]
    Undecodable(String),
}

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Refused(Rejected),
    /// At or below `applied_through`: already in the state.
    Skipped,
}

impl RepairState {
    /// Folds the repair entry at `position` (its bytes as in the log).
    pub fn apply_entry(&mut self, position: u64, bytes: &[u8]) -> Applied {
        if position <= self.applied_through {
            return Applied::Skipped;
        }
        match Record::decode(bytes) {
            Ok(record) => self.apply(position, record),
            Err(e) => {
                self.applied_through = position;
                self.refuse(position, None, Rejected::Undecodable(e.to_string()))
            }
        }
    }

    /// Folds one decoded record at `position`.
    pub fn apply(&mut self, position: u64, record: Record) -> Applied {
        if position <= self.applied_through {
            return Applied::Skipped;
        }
        self.applied_through = position;
        match self.change(&record) {
            Ok(()) => {
                self.remember(position, Some(record), None);
                Applied::Changed
            }
            Err(why) => self.refuse(position, Some(record), why),
        }
    }

    fn refuse(&mut self, position: u64, record: Option<Record>, why: Rejected) -> Applied {
        self.refused += 1;
        self.remember(position, record, Some(why.to_string()));
        Applied::Refused(why)
    }

    fn remember(&mut self, position: u64, record: Option<Record>, refused: Option<String>) {
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Event {
            position,
            record,
            refused,
        });
    }

    fn change(&mut self, record: &Record) -> Result<(), Rejected> {
        match record {
            Record::Signal(s) => self.on_signal(s),
            Record::StepStarted(s) => self.on_step_started(s),
            Record::StepFinished(f) => self.on_step_finished(f),
            Record::Isolated(i) => self.on_isolated(i),
            Record::Readmitted { replica, .. } => {
                let case = self.case_mut(*replica)?;
                if case.isolation.is_none() {
                    return Err(Rejected::NotIsolated(*replica));
                }
                self.cases.remove(replica);
                Ok(())
            }
            Record::CaseClosed { replica, .. } => {
                let case = self.case_mut(*replica)?;
                if case.isolation.is_some() {
                    return Err(Rejected::Isolated(*replica));
                }
                if case.unfinished().is_some() {
                    return Err(Rejected::StepInProgress(*replica));
                }
                self.cases.remove(replica);
                Ok(())
            }
            Record::Cancelled { replica, .. } => {
                if self.case_mut(*replica)?.is_isolated() {
                    return Err(Rejected::Isolated(*replica));
                }
                self.cases.remove(replica);
                Ok(())
            }
            Record::AlarmRaised { at_ms, reason } => {
                if self.alarm.is_none() {
                    self.alarm = Some(Alarm {
                        at_ms: *at_ms,
                        reason: reason.clone(),
                    });
                }
                Ok(())
            }
            Record::Reset { .. } => {
                self.alarm = None;
                self.removals_since_reset = 0;
                Ok(())
            }
            Record::Paused { at_ms, reason } => {
                self.paused = Some(Alarm {
                    at_ms: *at_ms,
                    reason: reason.clone(),
                });
                Ok(())
            }
            Record::Resumed { .. } => {
                self.paused = None;
                Ok(())
            }
        }
    }

    fn case_mut(&mut self, replica: u64) -> Result<&mut Case, Rejected> {
        self.cases
            .get_mut(&replica)
            .ok_or(Rejected::NoCase(replica))
    }

    fn fence(&mut self, term: u64) -> Result<(), Rejected> {
        if term < self.last_term {
            return Err(Rejected::StaleTerm {
                term,
                last_term: self.last_term,
            });
        }
        self.last_term = term;
        Ok(())
    }

    fn on_signal(&mut self, s: &crate::record::Signal) -> Result<(), Rejected> {
        if !self.cases.contains_key(&s.replica) && self.cases.len() >= MAX_CASES {
            return Err(Rejected::Bound("open cases"));
        }
        let case = self.cases.entry(s.replica).or_insert_with(|| Case {
            replica: s.replica,
            opened_at_ms: s.reported_at_ms,
            signals: BTreeMap::new(),
            attempts: Vec::new(),
            isolation: None,
        });
        case.signals
            .retain(|_, a| a.expires_at_ms > s.reported_at_ms);
        if !case.signals.contains_key(&s.signal) && case.signals.len() >= MAX_SIGNALS_PER_CASE {
            return Err(Rejected::Bound("signals of one replica"));
        }
        case.signals.insert(
            s.signal.clone(),
            ActiveSignal {
                details: s.details.clone(),
                source: s.source.clone(),
                outside_ms: s.outside_ms,
                reported_at_ms: s.reported_at_ms,
                expires_at_ms: s.expires_at_ms,
            },
        );
        Ok(())
    }

    fn on_step_started(&mut self, s: &StepStarted) -> Result<(), Rejected> {
        let case = self
            .cases
            .get(&s.replica)
            .ok_or(Rejected::NoCase(s.replica))?;
        if case.isolation.is_some() {
            return Err(Rejected::Isolated(s.replica));
        }
        if case.unfinished().is_some() {
            return Err(Rejected::StepInProgress(s.replica));
        }
        let expected = case.attempts.len() as u32 + 1;
        if s.attempt != expected {
            return Err(Rejected::WrongAttempt {
                replica: s.replica,
                got: s.attempt,
                expected,
            });
        }
        if case.attempts.len() >= MAX_ATTEMPTS_PER_CASE {
            return Err(Rejected::Bound("attempts of one replica"));
        }
        let running = self
            .cases
            .values()
            .filter(|c| c.unfinished().is_some())
            .count();
        if let Some(max) = s.max_in_progress.filter(|max| running >= *max as usize) {
            return Err(Rejected::Limit(format!(
                "{running} steps without an outcome; {max} allowed at once"
            )));
        }
        self.fence(s.term)?;
        let case = self.case_mut(s.replica)?;
        case.attempts.push(Attempt {
            started: s.clone(),
            finished: None,
        });
        Ok(())
    }

    fn on_step_finished(&mut self, f: &StepFinished) -> Result<(), Rejected> {
        let case = self.case_mut(f.replica)?;
        let expected = case.attempts.len() as u32;
        let last = case.attempts.last_mut();
        match last {
            Some(a) if a.started.attempt == f.attempt && a.finished.is_none() => {
                let mut kept = f.clone();
                kept.output = output_tail(&f.output, MAX_ATTEMPT_OUTPUT_BYTES);
                a.finished = Some(kept);
                Ok(())
            }
            _ => Err(Rejected::WrongAttempt {
                replica: f.replica,
                got: f.attempt,
                expected,
            }),
        }
    }

    fn on_isolated(&mut self, i: &Isolated) -> Result<(), Rejected> {
        let case = self
            .cases
            .get(&i.replica)
            .ok_or(Rejected::NoCase(i.replica))?;
        if case.isolation.is_some() {
            return Err(Rejected::Isolated(i.replica));
        }
        if case.unfinished().is_some() {
            return Err(Rejected::StepInProgress(i.replica));
        }
        if self.alarm.is_some() {
            return Err(Rejected::Alarm);
        }
        if i.mode == Mode::Execute {
            self.check_removal_limits(i)?;
        }
        self.fence(i.term)?;
        if i.mode == Mode::Execute {
            self.removals_since_reset += 1;
            if self.recent_removals_ms.len() == MAX_RECENT_REMOVALS {
                self.recent_removals_ms.pop_front();
            }
            self.recent_removals_ms.push_back(i.at_ms);
        }
        self.case_mut(i.replica)?.isolation = Some(i.clone());
        Ok(())
    }

    /// The limits an isolation was decided under, against the state now.
    fn check_removal_limits(&self, i: &Isolated) -> Result<(), Rejected> {
        if let Some(max) = i
            .max_removals
            .filter(|max| self.removals_since_reset >= *max)
        {
            return Err(Rejected::Limit(format!(
                "{} isolations since the last reset; the removal limit allows {max}",
                self.removals_since_reset
            )));
        }
        if let Some((count, period_ms)) = i.rate_limit {
            let within = self.removals_within(i.at_ms, period_ms);
            if within >= count as usize {
                return Err(Rejected::Limit(format!(
                    "{within} isolations within {period_ms} ms; the rate limit allows {count}"
                )));
            }
        }
        Ok(())
    }

    /// Isolations counted in the window of `period_ms` ending at `now_ms`.
    pub fn removals_within(&self, now_ms: u64, period_ms: u64) -> usize {
        let from = now_ms.saturating_sub(period_ms);
        self.recent_removals_ms
            .iter()
            .filter(|t| **t > from)
            .count()
    }

    /// True when `replica`'s membership is held by an isolation: the
    /// replica lifecycle must not promote it back.
    pub fn holds_isolated(&self, replica: u64) -> bool {
        self.cases.get(&replica).is_some_and(Case::is_isolated)
    }

    /// Encodes the state (for the replica's metadata and its snapshots).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the state always serializes")
    }

    /// Decodes a state from disk or a snapshot, checking its size and bounds.
    pub fn decode(bytes: &[u8]) -> Result<RepairState, Rejected> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(Rejected::Bound("encoded repair state"));
        }
        let s: RepairState =
            serde_json::from_slice(bytes).map_err(|e| Rejected::Undecodable(e.to_string()))?;
        let bounded = s.cases.len() <= MAX_CASES
            && s.history.len() <= MAX_HISTORY
            && s.recent_removals_ms.len() <= MAX_RECENT_REMOVALS
            && s.cases.iter().all(|(id, c)| {
                *id == c.replica
                    && c.signals.len() <= MAX_SIGNALS_PER_CASE
                    && c.attempts.len() <= MAX_ATTEMPTS_PER_CASE
            });
        if !bounded {
            return Err(Rejected::Bound("decoded repair state"));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scope;
    use crate::record::{Signal, StepResult};

    fn signal(replica: u64, name: &str, at: u64, expires: u64) -> Record {
        Record::Signal(Signal {
            replica,
            signal: name.into(),
            details: String::new(),
            outside_ms: 0,
            source: "test".into(),
            reported_at_ms: at,
            expires_at_ms: expires,
        })
    }

    fn start(replica: u64, attempt: u32, term: u64) -> Record {
        Record::StepStarted(StepStarted {
            replica,
            attempt,
            step: attempt - 1,
            repair_id: "restart".into(),
            scope: Scope::Replica,
            mode: Mode::Execute,
            signal: "x".into(),
            started_at_ms: 10,
            deadline_ms: 20,
            term,
            max_in_progress: None,
        })
    }

    fn finish(replica: u64, attempt: u32) -> Record {
        Record::StepFinished(StepFinished {
            replica,
            attempt,
            result: StepResult::Failed,
            exit_code: Some(1),
            output: "x".repeat(1000),
            finished_at_ms: 15,
        })
    }

    fn isolate(replica: u64, term: u64, mode: Mode) -> Record {
        Record::Isolated(Isolated {
            replica,
            spare: None,
            spare_address: String::new(),
            mode,
            at_ms: 30,
            term,
            max_removals: None,
            rate_limit: None,
        })
    }

    /// Applies `records` at positions 1, 2, ... and returns the state and
    /// what each did ("ok", "skip" or the refusal).
    fn fold(records: Vec<Record>) -> (RepairState, Vec<String>) {
        let mut s = RepairState::default();
        let results = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| match s.apply(i as u64 + 1, r) {
                Applied::Changed => "ok".to_string(),
                Applied::Skipped => "skip".to_string(),
                Applied::Refused(why) => why.to_string(),
            })
            .collect();
        (s, results)
    }

    #[test]
    fn the_records_rules_as_a_table() {
        // (records, what the last one does)
        let rows: Vec<(Vec<Record>, &str)> = vec![
            (vec![signal(2, "disk", 1, 9)], "ok"),
            (vec![start(2, 1, 1)], "no open case for replica 2"),
            (vec![signal(2, "disk", 1, 9), start(2, 1, 1)], "ok"),
            (
                vec![signal(2, "disk", 1, 9), start(2, 2, 1)],
                "attempt 2 of replica 2, expected 1",
            ),
            (
                vec![signal(2, "disk", 1, 9), start(2, 1, 1), start(2, 2, 1)],
                "replica 2 has a step without an outcome",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    start(2, 1, 1),
                    finish(2, 1),
                    start(2, 2, 1),
                ],
                "ok",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    start(2, 1, 3),
                    finish(2, 1),
                    start(2, 2, 2),
                ],
                "decision of term 2 after one of term 3",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    start(2, 1, 1),
                    finish(2, 1),
                    finish(2, 1),
                ],
                "attempt 1 of replica 2, expected 1",
            ),
            (
                vec![signal(2, "disk", 1, 9), finish(2, 1)],
                "attempt 1 of replica 2, expected 0",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    start(2, 1, 1),
                    isolate(2, 1, Mode::Execute),
                ],
                "replica 2 has a step without an outcome",
            ),
            (
                vec![signal(2, "disk", 1, 9), isolate(2, 1, Mode::Execute)],
                "ok",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    isolate(2, 1, Mode::Execute),
                    start(2, 1, 1),
                ],
                "replica 2 is isolated",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    isolate(2, 1, Mode::Execute),
                    Record::CaseClosed {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "replica 2 is isolated",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    isolate(2, 1, Mode::Execute),
                    Record::Cancelled {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "replica 2 is isolated",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    isolate(2, 1, Mode::React),
                    Record::Cancelled {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "ok",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    isolate(2, 1, Mode::Execute),
                    Record::Readmitted {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "ok",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    Record::Readmitted {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "replica 2 is not isolated",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    start(2, 1, 1),
                    Record::CaseClosed {
                        replica: 2,
                        at_ms: 5,
                    },
                ],
                "replica 2 has a step without an outcome",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    Record::AlarmRaised {
                        at_ms: 1,
                        reason: "x".into(),
                    },
                    isolate(2, 1, Mode::Execute),
                ],
                "the alarm is raised",
            ),
            (
                vec![
                    signal(2, "disk", 1, 9),
                    Record::AlarmRaised {
                        at_ms: 1,
                        reason: "x".into(),
                    },
                    Record::Reset { at_ms: 2 },
                    isolate(2, 1, Mode::Execute),
                ],
                "ok",
            ),
        ];
        for (records, expect) in rows {
            let (_, results) = fold(records.clone());
            assert_eq!(
                results.last().unwrap(),
                expect,
                "{records:?} -> {results:?}"
            );
        }
    }

    #[test]
    fn the_limits_a_decision_carries_hold_in_the_state() {
        let mut limited = start(3, 1, 1);
        if let Record::StepStarted(s) = &mut limited {
            s.max_in_progress = Some(1);
        }
        let (_, results) = fold(vec![
            signal(2, "d", 1, 9),
            signal(3, "d", 1, 9),
            start(2, 1, 1),
            limited,
        ]);
        assert_eq!(
            results.last().unwrap(),
            "1 steps without an outcome; 1 allowed at once"
        );
        let capped = |replica, max_removals, rate_limit| {
            Record::Isolated(Isolated {
                replica,
                spare: None,
                spare_address: String::new(),
                mode: Mode::Execute,
                at_ms: 30,
                term: 1,
                max_removals,
                rate_limit,
            })
        };
        let (s, results) = fold(vec![
            signal(2, "d", 1, 9),
            signal(3, "d", 1, 9),
            capped(2, Some(1), None),
            capped(3, Some(1), None),
        ]);
        assert_eq!(
            results.last().unwrap(),
            "1 isolations since the last reset; the removal limit allows 1"
        );
        assert_eq!(s.removals_since_reset, 1);
        let (_, results) = fold(vec![
            signal(2, "d", 1, 9),
            signal(3, "d", 1, 9),
            capped(2, None, Some((1, 100))),
            capped(3, None, Some((1, 100))),
        ]);
        assert_eq!(
            results.last().unwrap(),
            "1 isolations within 100 ms; the rate limit allows 1"
        );
    }

    #[test]
    fn isolations_are_counted_until_a_reset_and_react_ones_never() {
        let (s, _) = fold(vec![
            signal(2, "disk", 1, 9),
            signal(3, "disk", 1, 9),
            isolate(2, 1, Mode::Execute),
            isolate(3, 1, Mode::React),
        ]);
        assert_eq!(s.removals_since_reset, 1);
        assert_eq!(s.removals_within(30, 10), 1);
        assert_eq!(s.removals_within(100, 10), 0);
        assert!(s.holds_isolated(2));
        assert!(!s.holds_isolated(3));
        let mut s = s;
        s.apply(10, Record::Reset { at_ms: 40 });
        assert_eq!(s.removals_since_reset, 0);
        // The rate window is time, not the alarm: a reset leaves it.
        assert_eq!(s.removals_within(35, 10), 1);
    }

    #[test]
    fn records_apply_once_and_refusals_are_remembered() {
        let mut s = RepairState::default();
        assert_eq!(s.apply(5, signal(2, "disk", 1, 9)), Applied::Changed);
        assert_eq!(s.apply(5, signal(2, "disk", 1, 9)), Applied::Skipped);
        assert_eq!(s.apply(4, signal(3, "disk", 1, 9)), Applied::Skipped);
        assert!(!s.cases.contains_key(&3));
        assert!(matches!(
            s.apply_entry(6, b"garbage"),
            Applied::Refused(Rejected::Undecodable(_))
        ));
        assert_eq!(s.applied_through, 6);
        assert_eq!(s.refused, 1);
        assert_eq!(s.history.back().unwrap().position, 6);
        assert!(s.history.back().unwrap().refused.is_some());
    }

    #[test]
    fn signals_expire_and_are_refreshed() {
        let (s, _) = fold(vec![signal(2, "disk", 1, 10), signal(2, "fsync", 5, 20)]);
        let case = &s.cases[&2];
        assert_eq!(case.active_signals(8).count(), 2);
        assert_eq!(case.active_signals(12).count(), 1);
        // A signal reported after another expired drops the expired one.
        let (s, _) = fold(vec![signal(2, "disk", 1, 10), signal(2, "fsync", 11, 20)]);
        assert_eq!(s.cases[&2].signals.len(), 1);
    }

    #[test]
    fn the_state_is_bounded() {
        let mut s = RepairState::default();
        let mut pos = 0;
        for r in 1..=MAX_CASES as u64 + 1 {
            pos += 1;
            s.apply(pos, signal(r, "disk", 1, 9));
        }
        assert_eq!(s.cases.len(), MAX_CASES);
        for i in 0..MAX_SIGNALS_PER_CASE + 1 {
            pos += 1;
            s.apply(pos, signal(1, &format!("s{i}"), 1, 9));
        }
        assert_eq!(s.cases[&1].signals.len(), MAX_SIGNALS_PER_CASE);
        for a in 1..=MAX_ATTEMPTS_PER_CASE as u32 + 1 {
            pos += 1;
            s.apply(pos, start(1, a, 1));
            pos += 1;
            s.apply(pos, finish(1, a));
        }
        assert_eq!(s.cases[&1].attempts.len(), MAX_ATTEMPTS_PER_CASE);
        assert!(
            s.cases[&1].attempts[0]
                .finished
                .as_ref()
                .unwrap()
                .output
                .len()
                <= MAX_ATTEMPT_OUTPUT_BYTES
        );
        assert_eq!(s.history.len(), MAX_HISTORY);
        let bytes = s.encode();
        assert!(bytes.len() <= MAX_STATE_BYTES);
        assert_eq!(RepairState::decode(&bytes), Ok(s));
        assert!(RepairState::decode(b"{").is_err());
        assert!(RepairState::decode(&vec![b' '; MAX_STATE_BYTES + 1]).is_err());
    }
}
