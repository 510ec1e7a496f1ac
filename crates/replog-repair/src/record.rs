//! The records of the repair memory: what the coordinator (and the signal
//! intake) writes into the replicated log, one record per entry.
//!
//! Encoding: JSON (the same documents `GET /repairs` and `replog repair
//! history` show), at most [`MAX_RECORD_BYTES`]; the log's own framing
//! checks each entry's crc32c. [`Record::decode`] checks the size, the
//! syntax and every field's bounds; it never panics on any bytes. Unknown
//! fields are ignored (a newer writer may add some), an unknown record kind
//! is an error, and the state refuses the record deterministically on every
//! replica alike.

use serde::{Deserialize, Serialize};

use crate::config::{Mode, Scope};

/// Largest encoded record.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Largest recorded output of a repair command (its tail is kept).
pub const MAX_OUTPUT_BYTES: usize = 4 * 1024;
/// Largest signal name and details.
pub const MAX_SIGNAL_NAME_BYTES: usize = 64;
pub const MAX_DETAILS_BYTES: usize = 1024;

/// A signal: a replica is outside its safe envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub replica: u64,
    /// What is wrong (`fsync_latency`, `unreachable`, ...).
    pub signal: String,
    #[serde(default)]
    pub details: String,
    /// How long it has been outside its envelope, as reported.
    #[serde(default)]
    pub outside_ms: u64,
    /// Who reported it (`http`, `monitor:3`, `detector`).
    #[serde(default)]
    pub source: String,
    pub reported_at_ms: u64,
    /// It stops counting after this, unless reported again.
    pub expires_at_ms: u64,
}

/// A decision to run one step of the escalation (written before it runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStarted {
    pub replica: u64,
    /// 1 for the replica's first step, then 2, ...
    pub attempt: u32,
    /// Index in the escalation order.
    pub step: u32,
    pub repair_id: String,
    pub scope: Scope,
    /// `react`: recorded only; `execute`: the command runs.
    pub mode: Mode,
    /// The signal that opened the case, for the command's environment.
    #[serde(default)]
    pub signal: String,
    pub started_at_ms: u64,
    pub deadline_ms: u64,
    /// Term of the leader that decided.
    pub term: u64,
    /// The `--num-allowed-repairs` it was decided under: the state refuses
    /// the start when that many steps are already without an outcome (a
    /// decision taken on a state that lacked a late-committed start never
    /// breaks the limit).
    #[serde(default)]
    pub max_in_progress: Option<u32>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    /// The command exited with 0; the replica has until the deadline to heal.
    Succeeded,
    /// The command failed (or could not run): the next step follows at once.
    Failed,
    /// The command ran past the step's timeout and was killed.
    TimedOut,
    /// Recorded as started by an earlier leader with no outcome: its deadline passed.
    Unknown,
    /// `react` mode: nothing ran.
    Reacted,
}

/// The outcome of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFinished {
    pub replica: u64,
    pub attempt: u32,
    pub result: StepResult,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The tail of the command's output (at most [`MAX_OUTPUT_BYTES`]).
    #[serde(default)]
    pub output: String,
    pub finished_at_ms: u64,
}

/// A decision to isolate a replica whose escalation is exhausted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolated {
    pub replica: u64,
    /// The spare that replaces it (add, catch up, promote, then remove);
    /// `None`: the replica is demoted to a learner.
    #[serde(default)]
    pub spare: Option<u64>,
    #[serde(default)]
    pub spare_address: String,
    /// `react`: recorded only, not counted, membership untouched.
    pub mode: Mode,
    pub at_ms: u64,
    pub term: u64,
    /// The removal limit it was decided under (isolations since the last
    /// reset): the state refuses an isolation past it.
    #[serde(default)]
    pub max_removals: Option<u32>,
    /// The rate limit it was decided under (count, period in ms): the state
    /// refuses an isolation past it.
    #[serde(default)]
    pub rate_limit: Option<(u32, u64)>,
}

/// One record of the repair memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Signal(Signal),
    StepStarted(StepStarted),
    StepFinished(StepFinished),
    Isolated(Isolated),
    /// An isolated replica healthy for the healthy period is a member again.
    Readmitted {
        replica: u64,
        at_ms: u64,
    },
    /// A replica healthy for the healthy period: its case ends.
    CaseClosed {
        replica: u64,
        at_ms: u64,
    },
    /// An operator ended a case (`replog repair cancel`).
    Cancelled {
        replica: u64,
        at_ms: u64,
    },
    /// The removal limit was reached: the coordinator stops.
    AlarmRaised {
        at_ms: u64,
        reason: String,
    },
    /// An operator cleared the alarm and the removal count (`replog repair reset`).
    Reset {
        at_ms: u64,
    },
    /// `replog repair pause`: no new step or isolation until resumed.
    Paused {
        at_ms: u64,
        #[serde(default)]
        reason: String,
    },
    Resumed {
        at_ms: u64,
    },
}

/// A record that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("repair record of {0} bytes exceeds the limit of {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("repair record is not valid: {0}")]
    Invalid(String),
}

impl Record {
    /// Encodes the record; it is at most [`MAX_RECORD_BYTES`] by
    /// construction (every string field is bounded by [`Record::check`]).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert_eq!(self.check(), Ok(()), "encoding an invalid record {self:?}");
        let bytes = serde_json::to_vec(self).expect("a record always serializes");
        debug_assert!(
            bytes.len() <= MAX_RECORD_BYTES,
            "record of {} bytes",
            bytes.len()
        );
        bytes
    }

    /// Decodes and checks a record from the log.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let record: Record =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid(e.to_string()))?;
        record.check().map_err(RecordError::Invalid)?;
        Ok(record)
    }

    /// The replica the record is about, if any.
    pub fn replica(&self) -> Option<u64> {
        match self {
            Record::Signal(s) => Some(s.replica),
            Record::StepStarted(s) => Some(s.replica),
            Record::StepFinished(s) => Some(s.replica),
            Record::Isolated(i) => Some(i.replica),
            Record::Readmitted { replica, .. }
            | Record::CaseClosed { replica, .. }
            | Record::Cancelled { replica, .. } => Some(*replica),
            Record::AlarmRaised { .. }
            | Record::Reset { .. }
            | Record::Paused { .. }
            | Record::Resumed { .. } => None,
        }
    }

    /// Field bounds: ids are non-zero, strings are bounded, deadlines
    /// follow their starts.
    pub fn check(&self) -> Result<(), String> {
        if self.replica() == Some(0) {
            return Err("replica id 0".into());
        }
        match self {
            Record::Signal(s) => {
                check_name("signal", &s.signal)?;
                bounded("details", &s.details, MAX_DETAILS_BYTES)?;
                bounded("source", &s.source, MAX_SIGNAL_NAME_BYTES)?;
                if s.expires_at_ms < s.reported_at_ms {
                    return Err("signal expires before it was reported".into());
                }
            }
            Record::StepStarted(s) => {
                check_name("repair_id", &s.repair_id)?;
                bounded("signal", &s.signal, MAX_SIGNAL_NAME_BYTES)?;
                if s.attempt == 0 || s.deadline_ms < s.started_at_ms || s.mode == Mode::Listen {
                    return Err(format!("step start out of bounds: {s:?}"));
                }
            }
            Record::StepFinished(s) => {
                bounded("output", &s.output, MAX_OUTPUT_BYTES)?;
                if s.attempt == 0 {
                    return Err("attempt 0".into());
                }
            }
            Record::Isolated(i) => {
                bounded("spare_address", &i.spare_address, 256)?;
                if i.spare == Some(0) || i.spare == Some(i.replica) || i.mode == Mode::Listen {
                    return Err(format!("isolation out of bounds: {i:?}"));
                }
            }
            Record::AlarmRaised { reason, .. } | Record::Paused { reason, .. } => {
                bounded("reason", reason, MAX_DETAILS_BYTES)?;
            }
            Record::Readmitted { .. }
            | Record::CaseClosed { .. }
            | Record::Cancelled { .. }
            | Record::Reset { .. }
            | Record::Resumed { .. } => {}
        }
        Ok(())
    }
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field} of {} bytes exceeds {max}", value.len()));
    }
    Ok(())
}

/// A signal name or repair id: 1-64 of `a-z A-Z 0-9 _ - . :`.
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SIGNAL_NAME_BYTES
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} `{value}` is not 1-64 of a-z, 0-9, _ - . :"
        ))
    }
}

/// The last `max` bytes of `output`, cut at a character boundary.
pub fn output_tail(output: &str, max: usize) -> String {
    if output.len() <= max {
        return output.to_string();
    }
    let mut start = output.len() - max;
    while !output.is_char_boundary(start) {
        start += 1;
    }
    output[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal() -> Record {
        Record::Signal(Signal {
            replica: 3,
            signal: "fsync_latency".into(),
            details: "p99 800 ms".into(),
            outside_ms: 60_000,
            source: "http".into(),
            reported_at_ms: 10,
            expires_at_ms: 20,
        })
    }

    #[test]
    fn records_round_trip() {
        let records = [
            signal(),
            Record::StepStarted(StepStarted {
                replica: 3,
                attempt: 1,
                step: 0,
                repair_id: "restart".into(),
                scope: Scope::Replica,
                mode: Mode::Execute,
                signal: "fsync_latency".into(),
                started_at_ms: 5,
                deadline_ms: 9,
                term: 4,
                max_in_progress: Some(2),
            }),
            Record::StepFinished(StepFinished {
                replica: 3,
                attempt: 1,
                result: StepResult::Failed,
                exit_code: Some(2),
                output: "no such host".into(),
                finished_at_ms: 7,
            }),
            Record::Isolated(Isolated {
                replica: 3,
                spare: Some(6),
                spare_address: "h:1".into(),
                mode: Mode::Execute,
                at_ms: 8,
                term: 4,
                max_removals: Some(2),
                rate_limit: Some((1, 600_000)),
            }),
            Record::AlarmRaised {
                at_ms: 1,
                reason: "limit".into(),
            },
            Record::Reset { at_ms: 2 },
        ];
        for r in records {
            assert_eq!(Record::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn bad_records_are_refused_never_panic() {
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(Record::decode(&big), Err(RecordError::TooLarge(big.len())));
        let bad: &[&[u8]] = &[
            b"",
            b"{",
            b"\xff\xfe",
            br#"{"kind":"launch_missiles"}"#,
            br#"{"kind":"signal","replica":0,"signal":"x","reported_at_ms":1,"expires_at_ms":2}"#,
            br#"{"kind":"signal","replica":1,"signal":"","reported_at_ms":1,"expires_at_ms":2}"#,
            br#"{"kind":"signal","replica":1,"signal":"a b","reported_at_ms":1,"expires_at_ms":2}"#,
            br#"{"kind":"signal","replica":1,"signal":"x","reported_at_ms":3,"expires_at_ms":2}"#,
            br#"{"kind":"isolated","replica":1,"spare":1,"mode":"execute","at_ms":1,"term":1}"#,
            br#"{"kind":"step_finished","replica":1,"attempt":0,"result":"failed","finished_at_ms":1}"#,
        ];
        for b in bad {
            assert!(
                matches!(Record::decode(b), Err(RecordError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // Unknown fields are ignored: a newer writer may add some.
        let newer = br#"{"kind":"reset","at_ms":5,"operator":"ana"}"#;
        assert_eq!(Record::decode(newer), Ok(Record::Reset { at_ms: 5 }));
    }

    #[test]
    fn output_tails_keep_the_end_at_a_char_boundary() {
        assert_eq!(output_tail("abc", 5), "abc");
        assert_eq!(output_tail("abcdef", 3), "def");
        assert_eq!(output_tail("aé", 1), "");
        assert_eq!(output_tail("aéb", 2), "b");
    }
}
