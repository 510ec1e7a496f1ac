//! The conventions of replog's gRPC answers, in one place: the server
//! writes them, the Rust client, the `replog` tool and the fault campaign's
//! clients read them.
//!
//! - Every error a replica answers carries a stable code in the
//!   [`ERROR_KEY`] (`replog-error`) metadata: an [`ErrorCode`]. A status
//!   without one did not come from replog's services (a connection that
//!   failed or broke, a timeout, tonic itself).
//! - A replica that cannot write because it does not lead (NOT_LEADER,
//!   LEADERSHIP_LOST) names the leader it knows in [`LEADER_KEY`]
//!   (`replog-leader`) as `id=address` ([`LeaderHint`]); the address is
//!   empty when the replica knows the leader's id but not its address.
//! - What a client may do after a failure is [`retry_rule`]: one table for
//!   every client, which never repeats a write that may have happened.
//!
//! Codes are only ever added; a code this build does not know (a newer
//! server's) is [`ErrorCode::Other`] and never taken for a known one.

use std::fmt;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key of the stable error code.
pub const ERROR_KEY: &str = "replog-error";
/// Metadata key of the leader hint (`id=address`).
pub const LEADER_KEY: &str = "replog-leader";

/// The stable codes of `replog-error`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// This replica does not lead (or its writer is not ready): nothing was
    /// executed.
    NotLeader,
    /// The leader lost its leadership while the call was in flight: a write
    /// may or may not be committed by the next leader.
    LeadershipLost,
    /// The position was truncated away.
    Truncated,
    /// The position is not committed yet.
    Pending,
    /// The position is past the log's end.
    PastEnd,
    EntryTooLarge,
    /// This replica is not a voter (yet): it cannot serve the call.
    NotVoting,
    /// Not executed (back-pressure, a membership change in progress, too
    /// many snapshots at once): try again later.
    Busy,
    /// A membership change was refused.
    Membership,
    Invalid,
    /// The replica is stopping or its log failed.
    Closed,
    /// The log API: the writer did not start in time (nothing was
    /// executed). The state API: no answer in time, perhaps after the write
    /// was appended.
    Timeout,
    /// A linearizable read no leader confirmed in time: nothing happened.
    ReadNotConfirmed,
    /// Storage failed (on the state API also the applier, after the write
    /// may have been appended).
    Storage,
    /// The log holds the scheduler state: raw writes are refused.
    StateLog,
    /// A backup is staged already (one at a time).
    AlreadyStaged,
    /// The uploaded backup is not sound or not of this cluster.
    BadBackup,
    /// The change feed cannot resume from there: reload the state.
    MustReload,
    NothingStaged,
    /// The transaction was committed but the state refused it: no effect.
    Rejected,
    /// The whole state was replaced after this replica's writer started:
    /// reload, then write again.
    StateReplaced,
    /// A code this build does not know.
    Other(String),
}

impl ErrorCode {
    /// Every code this build knows, for tables and tests.
    pub const KNOWN: &'static [ErrorCode] = &[
        ErrorCode::NotLeader,
        ErrorCode::LeadershipLost,
        ErrorCode::Truncated,
        ErrorCode::Pending,
        ErrorCode::PastEnd,
        ErrorCode::EntryTooLarge,
        ErrorCode::NotVoting,
        ErrorCode::Busy,
        ErrorCode::Membership,
        ErrorCode::Invalid,
        ErrorCode::Closed,
        ErrorCode::Timeout,
        ErrorCode::ReadNotConfirmed,
        ErrorCode::Storage,
        ErrorCode::StateLog,
        ErrorCode::AlreadyStaged,
        ErrorCode::BadBackup,
        ErrorCode::MustReload,
        ErrorCode::NothingStaged,
        ErrorCode::Rejected,
        ErrorCode::StateReplaced,
    ];

    /// The code as it is on the wire (`NOT_LEADER`).
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => known.known_str().expect("every other variant is known"),
        }
    }

    fn known_str(&self) -> Option<&'static str> {
        Some(match self {
            ErrorCode::NotLeader => "NOT_LEADER",
            ErrorCode::LeadershipLost => "LEADERSHIP_LOST",
            ErrorCode::Truncated => "TRUNCATED",
            ErrorCode::Pending => "PENDING",
            ErrorCode::PastEnd => "PAST_END",
            ErrorCode::EntryTooLarge => "ENTRY_TOO_LARGE",
            ErrorCode::NotVoting => "NOT_VOTING",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Membership => "MEMBERSHIP",
            ErrorCode::Invalid => "INVALID",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::ReadNotConfirmed => "READ_NOT_CONFIRMED",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::StateLog => "STATE_LOG",
            ErrorCode::AlreadyStaged => "ALREADY_STAGED",
            ErrorCode::BadBackup => "BAD_BACKUP",
            ErrorCode::MustReload => "MUST_RELOAD",
            ErrorCode::NothingStaged => "NOTHING_STAGED",
            ErrorCode::Rejected => "REJECTED",
            ErrorCode::StateReplaced => "STATE_REPLACED",
            ErrorCode::Other(_) => return None,
        })
    }

    /// The code of a wire string; one this build does not know is
    /// [`ErrorCode::Other`].
    pub fn parse(s: &str) -> ErrorCode {
        Self::KNOWN
            .iter()
            .find(|c| c.as_str() == s)
            .cloned()
            .unwrap_or_else(|| ErrorCode::Other(s.to_string()))
    }

    /// The metadata value of this code (`None` for an unknown code that is
    /// not valid metadata).
    fn metadata_value(&self) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        match self.known_str() {
            Some(s) => Some(MetadataValue::from_static(s)),
            None => self.as_str().parse().ok(),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::parse(s))
    }
}

/// A status with `code` in its `replog-error` metadata.
pub fn coded_status(status: Code, code: ErrorCode, message: impl Into<String>) -> Status {
    let mut s = Status::new(status, message);
    set_error_code(&mut s, &code);
    s
}

/// Puts `code` into the status's `replog-error` metadata.
pub fn set_error_code(status: &mut Status, code: &ErrorCode) {
    if let Some(v) = code.metadata_value() {
        status.metadata_mut().insert(ERROR_KEY, v);
    }
}

/// The replog code of a status (`None`: it has none).
pub fn error_code(status: &Status) -> Option<ErrorCode> {
    let v = status.metadata().get(ERROR_KEY)?.to_str().ok()?;
    Some(ErrorCode::parse(v))
}

/// The leader a replica names in `replog-leader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: u64,
    /// `host:port`; empty when the replica does not know it.
    pub address: String,
}

impl LeaderHint {
    /// `id=address`, as on the wire.
    pub fn to_wire(&self) -> String {
        format!("{}={}", self.id, self.address)
    }

    /// A hint as on the wire (`id=address`; the address may be empty).
    pub fn parse(s: &str) -> Option<LeaderHint> {
        let (id, address) = s.split_once('=')?;
        Some(LeaderHint {
            id: id.parse().ok()?,
            address: address.to_string(),
        })
    }
}

/// Puts `hint` into the status's `replog-leader` metadata (left out when
/// the address is not valid metadata).
pub fn set_leader_hint(status: &mut Status, hint: &LeaderHint) {
    if let Ok(v) = hint.to_wire().parse() {
        status.metadata_mut().insert(LEADER_KEY, v);
    }
}

/// The leader a status names, if it names one with an address (a hint
/// without an address leads nowhere).
pub fn leader_hint(status: &Status) -> Option<LeaderHint> {
    let v = status.metadata().get(LEADER_KEY)?.to_str().ok()?;
    LeaderHint::parse(v).filter(|h| !h.address.is_empty())
}

/// What a failed call was, for what its failure allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Changes nothing (reads, status, watches, a leader transfer, the
    /// staging area's queries): trying again is always safe.
    Read,
    /// A write through the log API (append, truncate, membership change):
    /// there TIMEOUT means the writer did not start.
    LogWrite,
    /// A write through the state API (submit, stage, commit, delete,
    /// unload): there TIMEOUT and STORAGE may come after the write was
    /// appended (the store waits for it to be applied).
    StateWrite,
}

impl CallKind {
    fn writes(self) -> bool {
        !matches!(self, CallKind::Read)
    }
}

/// What a client may do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not executed: this replica does not lead. Try the leader (the
    /// status's [`leader_hint`] names it, if this replica knows it).
    OnLeader,
    /// Not executed: try again, on any replica, after a backoff.
    Anywhere,
    /// A write that may or may not have happened: never repeated blindly.
    OutcomeUnknown,
    /// The answer stands: trying again will not change it. For a
    /// [`CallKind::StateWrite`], also: nothing happened.
    Final,
}

/// What a client may do after `status` answered a call of `kind`: by its
/// replog code ([`code_rule`]), or, without one, as a transport failure
/// (a connection that could not be made sent nothing; any other failure
/// may have come after a write was sent).
pub fn retry_rule(status: &Status, kind: CallKind) -> Retry {
    match error_code(status) {
        Some(code) => code_rule(&code, kind),
        None if never_sent(status) || !kind.writes() => Retry::Anywhere,
        None => Retry::OutcomeUnknown,
    }
}

/// A transport failure before anything was sent: the connection could not
/// be made (tonic answers UNAVAILABLE with hyper's "tcp connect error").
/// Not any message with "connect" in it: "error reading a body from
/// connection" is a connection that broke, perhaps after the request went.
fn never_sent(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.message().contains("connect error")
}

/// What a client may do after a replica refused a call of `kind` with
/// `code`.
pub fn code_rule(code: &ErrorCode, kind: CallKind) -> Retry {
    use ErrorCode as E;
    match (code, kind) {
        (E::NotLeader, _) => Retry::OnLeader,
        (E::Busy | E::NotVoting | E::ReadNotConfirmed, _) => Retry::Anywhere,
        (E::LeadershipLost | E::Closed, CallKind::Read) => Retry::Anywhere,
        (E::LeadershipLost | E::Closed, _) => Retry::OutcomeUnknown,
        (E::Timeout, CallKind::Read | CallKind::LogWrite) => Retry::Anywhere,
        (E::Timeout | E::Storage, CallKind::StateWrite) => Retry::OutcomeUnknown,
        (E::Other(_), CallKind::LogWrite | CallKind::StateWrite) => Retry::OutcomeUnknown,
        (
            E::Truncated
            | E::Pending
            | E::PastEnd
            | E::EntryTooLarge
            | E::Membership
            | E::Invalid
            | E::Storage
            | E::StateLog
            | E::AlreadyStaged
            | E::BadBackup
            | E::MustReload
            | E::NothingStaged
            | E::Rejected
            | E::StateReplaced
            | E::Other(_),
            _,
        ) => Retry::Final,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_and_unknown_ones_stay_unknown() {
        for code in ErrorCode::KNOWN {
            assert_eq!(ErrorCode::parse(code.as_str()), *code);
            assert_eq!(code.to_string(), code.as_str());
            let s = coded_status(Code::Internal, code.clone(), "m");
            assert_eq!(s.metadata().get(ERROR_KEY).unwrap(), code.as_str());
            assert_eq!(error_code(&s).as_ref(), Some(code));
        }
        let mut names: Vec<&str> = ErrorCode::KNOWN.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::KNOWN.len(), "distinct names");
        let newer = ErrorCode::parse("QUOTA_EXCEEDED");
        assert_eq!(newer, ErrorCode::Other("QUOTA_EXCEEDED".into()));
        let s = coded_status(Code::Unavailable, newer.clone(), "m");
        assert_eq!(error_code(&s), Some(newer));
        assert_eq!(error_code(&Status::unavailable("x")), None);
        // Lower case is another code, not NOT_LEADER.
        assert!(matches!(
            ErrorCode::parse("not_leader"),
            ErrorCode::Other(_)
        ));
    }

    #[test]
    fn codes_are_the_ones_on_the_wire() {
        // The strings replicas have always sent: they never change.
        let wire = [
            "NOT_LEADER",
            "LEADERSHIP_LOST",
            "TRUNCATED",
            "PENDING",
            "PAST_END",
            "ENTRY_TOO_LARGE",
            "NOT_VOTING",
            "BUSY",
            "MEMBERSHIP",
            "INVALID",
            "CLOSED",
            "TIMEOUT",
            "READ_NOT_CONFIRMED",
            "STORAGE",
            "STATE_LOG",
            "ALREADY_STAGED",
            "BAD_BACKUP",
            "MUST_RELOAD",
            "NOTHING_STAGED",
            "REJECTED",
            "STATE_REPLACED",
        ];
        let known: Vec<&str> = ErrorCode::KNOWN.iter().map(|c| c.as_str()).collect();
        assert_eq!(known, wire);
    }

    #[test]
    fn leader_hints() {
        let mut s = Status::failed_precondition("not the leader");
        set_leader_hint(
            &mut s,
            &LeaderHint {
                id: 3,
                address: "10.0.0.3:7101".into(),
            },
        );
        assert_eq!(s.metadata().get(LEADER_KEY).unwrap(), "3=10.0.0.3:7101");
        assert_eq!(
            leader_hint(&s),
            Some(LeaderHint {
                id: 3,
                address: "10.0.0.3:7101".into()
            })
        );
        for (wire, parsed) in [
            ("2=", Some((2, ""))),
            ("2=a:1", Some((2, "a:1"))),
            ("x=a:1", None),
            ("a:1", None),
            ("", None),
        ] {
            assert_eq!(
                LeaderHint::parse(wire),
                parsed.map(|(id, address)| LeaderHint {
                    id,
                    address: address.into()
                }),
                "{wire}"
            );
        }
        // Known leader, unknown address: no hint to follow.
        let mut s = Status::failed_precondition("not the leader");
        set_leader_hint(
            &mut s,
            &LeaderHint {
                id: 2,
                address: String::new(),
            },
        );
        assert_eq!(s.metadata().get(LEADER_KEY).unwrap(), "2=");
        assert_eq!(leader_hint(&s), None);
        assert_eq!(leader_hint(&Status::failed_precondition("x")), None);
    }

    #[test]
    fn what_a_client_may_do_on_each_code() {
        use CallKind::{LogWrite, Read, StateWrite};
        use Retry::{Anywhere, Final, OnLeader, OutcomeUnknown};
        // (code, read, log write, state write)
        let table = [
            ("NOT_LEADER", OnLeader, OnLeader, OnLeader),
            ("LEADERSHIP_LOST", Anywhere, OutcomeUnknown, OutcomeUnknown),
            ("TRUNCATED", Final, Final, Final),
            ("PENDING", Final, Final, Final),
            ("PAST_END", Final, Final, Final),
            ("ENTRY_TOO_LARGE", Final, Final, Final),
            ("NOT_VOTING", Anywhere, Anywhere, Anywhere),
            ("BUSY", Anywhere, Anywhere, Anywhere),
            ("MEMBERSHIP", Final, Final, Final),
            ("INVALID", Final, Final, Final),
            ("CLOSED", Anywhere, OutcomeUnknown, OutcomeUnknown),
            ("TIMEOUT", Anywhere, Anywhere, OutcomeUnknown),
            ("READ_NOT_CONFIRMED", Anywhere, Anywhere, Anywhere),
            ("STORAGE", Final, Final, OutcomeUnknown),
            ("STATE_LOG", Final, Final, Final),
            ("ALREADY_STAGED", Final, Final, Final),
            ("BAD_BACKUP", Final, Final, Final),
            ("MUST_RELOAD", Final, Final, Final),
            ("NOTHING_STAGED", Final, Final, Final),
            ("REJECTED", Final, Final, Final),
            ("STATE_REPLACED", Final, Final, Final),
            ("SOMETHING_NEWER", Final, OutcomeUnknown, OutcomeUnknown),
        ];
        assert_eq!(table.len(), ErrorCode::KNOWN.len() + 1, "every code");
        for (code, read, log_write, state_write) in table {
            let status = coded_status(Code::FailedPrecondition, ErrorCode::parse(code), "m");
            for (kind, want) in [
                (Read, read),
                (LogWrite, log_write),
                (StateWrite, state_write),
            ] {
                assert_eq!(retry_rule(&status, kind), want, "{code} {kind:?}");
            }
        }
    }

    #[test]
    fn what_a_client_may_do_after_a_transport_failure() {
        use CallKind::{LogWrite, Read, StateWrite};
        let refused = Status::unavailable("tcp connect error");
        let broken = Status::unavailable("error reading a body from connection");
        let timed_out = Status::cancelled("Timeout expired");
        let unknown = Status::unknown("transport error");
        for kind in [Read, LogWrite, StateWrite] {
            assert_eq!(retry_rule(&refused, kind), Retry::Anywhere, "{kind:?}");
        }
        for s in [&broken, &timed_out, &unknown] {
            assert_eq!(retry_rule(s, Read), Retry::Anywhere, "{s:?}");
            assert_eq!(retry_rule(s, LogWrite), Retry::OutcomeUnknown, "{s:?}");
            assert_eq!(retry_rule(s, StateWrite), Retry::OutcomeUnknown, "{s:?}");
        }
        // A code decides, whatever the gRPC status says.
        let mut coded = Status::unavailable("connect");
        set_error_code(&mut coded, &ErrorCode::Invalid);
        assert_eq!(retry_rule(&coded, Read), Retry::Final);
    }
}
