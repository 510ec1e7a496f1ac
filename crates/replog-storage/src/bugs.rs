//! Bugs that can be put back on purpose, to prove that the tests find them.
//!
//! Each [`InjectedBug`] undoes one safety rule of replog (the rule is named
//! on the variant). The deterministic cluster harness and the fault
//! campaign run with one switched on and must fail; a harness that passes
//! with a bug in has lost its teeth.
//!
//! Invariant: without the cargo feature `inject-bugs`, [`active`] is `false`
//! for every bug, whatever the configuration or the environment says, so a
//! product build cannot run with one. With the feature, a process reads the
//! bug to inject from the environment variable `REPLOG_INJECT_BUG`
//! ([`InjectedBug::from_env`]), which is how a real-process test puts a bug
//! back into `replog replica`.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// One safety rule, undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InjectedBug {
    /// Rule: a RECOVERING replica turns VOTING only on the promotion that
    /// names its current incarnation. Bug: it turns VOTING on any entry
    /// that makes it a voter after one that made it a learner (replaying
    /// the log, it meets the demotion and promotion of an earlier
    /// incarnation and votes before it has caught up).
    EarlyVoting,
    /// Rule: the leader counts its own entries only once they are fsynced.
    /// Bug: it treats them as durable when written.
    AckBeforeFsync,
    /// Rule: a follower's append and vote responses leave after the fsync
    /// of what they promise. Bug: they leave at once.
    FollowerAnswersBeforeFsync,
    /// Rule: a vote is fsynced before the vote response leaves. Bug: a
    /// ready that only changes the hard state (term, vote) is not synced.
    VoteNotPersisted,
    /// Rule: a heartbeat's commit is clamped to the local log (the leader
    /// may count positions this replica lost). Bug: it is not.
    NoCommitClamp,
    /// Rule: every stored record's crc32c is checked on read. Bug: the
    /// check is skipped.
    SkipCrcCheck,
}

impl InjectedBug {
    /// Every bug, in the order of the reliability report.
    pub const ALL: [InjectedBug; 6] = [
        InjectedBug::EarlyVoting,
        InjectedBug::AckBeforeFsync,
        InjectedBug::FollowerAnswersBeforeFsync,
        InjectedBug::VoteNotPersisted,
        InjectedBug::NoCommitClamp,
        InjectedBug::SkipCrcCheck,
    ];

    /// The name used in `REPLOG_INJECT_BUG` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            InjectedBug::EarlyVoting => "early-voting",
            InjectedBug::AckBeforeFsync => "ack-before-fsync",
            InjectedBug::FollowerAnswersBeforeFsync => "follower-answers-before-fsync",
            InjectedBug::VoteNotPersisted => "vote-not-persisted",
            InjectedBug::NoCommitClamp => "no-commit-clamp",
            InjectedBug::SkipCrcCheck => "skip-crc-check",
        }
    }

    /// The bug named by `REPLOG_INJECT_BUG`, when built with the feature
    /// `inject-bugs`; always `None` without it.
    ///
    /// # Panics
    /// When the variable names no bug: a test that asks for a bug and gets
    /// none would pass for the wrong reason.
    pub fn from_env() -> Option<InjectedBug> {
        if !cfg!(feature = "inject-bugs") {
            return None;
        }
        let name = std::env::var("REPLOG_INJECT_BUG").ok()?;
        Some(
            name.parse()
                .unwrap_or_else(|e| panic!("REPLOG_INJECT_BUG: {e}")),
        )
    }
}

impl fmt::Display for InjectedBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InjectedBug {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        InjectedBug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = InjectedBug::ALL.iter().map(|b| b.name()).collect();
                format!("unknown bug {s:?}; known: {}", names.join(", "))
            })
    }
}

/// The bug this process runs with (`REPLOG_INJECT_BUG`, read once), for
/// code that has no configuration of its own (record decoding).
pub fn process_bug() -> Option<InjectedBug> {
    static BUG: OnceLock<Option<InjectedBug>> = OnceLock::new();
    *BUG.get_or_init(InjectedBug::from_env)
}

/// Whether `bug` is switched on in `configured` (always `false` without the
/// feature `inject-bugs`).
pub fn active(configured: Option<InjectedBug>, bug: InjectedBug) -> bool {
    cfg!(feature = "inject-bugs") && configured == Some(bug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for b in InjectedBug::ALL {
            assert_eq!(b.name().parse::<InjectedBug>(), Ok(b));
        }
        assert!("early".parse::<InjectedBug>().is_err());
    }

    #[test]
    fn a_bug_is_active_only_with_the_feature() {
        let on = active(Some(InjectedBug::EarlyVoting), InjectedBug::EarlyVoting);
        assert_eq!(on, cfg!(feature = "inject-bugs"));
        assert!(!active(None, InjectedBug::EarlyVoting));
        assert!(!active(
            Some(InjectedBug::AckBeforeFsync),
            InjectedBug::EarlyVoting
        ));
    }
}
