//! Errors of the embedded log API.

use replog_core::{CoreError, ProposalError};
use replog_storage::{ReplicaStatus, StorageError};

use crate::Position;

/// Everything the log API can fail with. Each variant is distinct so callers
/// can act on it (fail over, retry, re-read from `beginning()`).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The replica's storage failed (including corruption found on read).
    #[error(transparent)]
    Storage(#[from] StorageError),

    /// The replica may not serve: it is not VOTING.
    #[error(
        "replica is {0}: it lost or damaged data and must rejoin its cluster before it can \
         serve (see `replog status`)"
    )]
    NotVoting(ReplicaStatus),

    /// This replica is not the leader, so it cannot write.
    #[error("this replica is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },

    /// The writer's leadership ended. Its pending writes may or may not be
    /// committed; the embedding scheduler must fail over (start a new writer
    /// and re-read the log).
    #[error(
        "writer lost leadership (it was started in term {term}); fail over and start a new writer"
    )]
    LeadershipLost { term: u64 },

    /// `append` or `truncate` before `start`.
    #[error("the writer was not started; call Writer::start first")]
    WriterNotStarted,

    /// The entry is larger than the configured limit.
    #[error("entry of {size} bytes exceeds the maximum entry size of {max} bytes")]
    EntryTooLarge { size: usize, max: usize },

    /// Part of the range was truncated away.
    #[error("position {requested} is truncated; the log begins at {beginning}")]
    Truncated {
        requested: Position,
        beginning: Position,
    },

    /// Part of the range is written but not yet committed.
    #[error("position {requested} is not committed yet (the log ends at {ending})")]
    Pending {
        requested: Position,
        ending: Position,
    },

    /// Part of the range was never written.
    #[error("position {requested} is past the end of the log (last written position {last})")]
    PastEnd { requested: Position, last: Position },

    /// A malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),

    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),

    /// A membership change was not made because another one is under
    /// way; the same request may succeed later.
    #[error("membership change not made: {0}; retry")]
    MembershipInProgress(String),

    /// Too many writes are waiting.
    #[error("too many uncommitted writes; retry later")]
    Busy,

    /// The log was closed, or its replica stopped after a fatal error.
    #[error("the log is closed{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),

    /// Waiting for this replica to lead (a writer's start) took longer than
    /// allowed.
    #[error("timed out after {0:?} waiting for this replica to become the writer")]
    Timeout(std::time::Duration),

    /// A linearizable read was not confirmed within `read_timeout`: no
    /// leader confirmed its read index (none known, one that has not
    /// committed an entry of its term yet, messages lost), or this replica
    /// did not apply the confirmed position. Nothing was executed: the read
    /// may be retried, here or on another replica.
    #[error(
        "linearizable read not confirmed within {waited:?} (no leader confirmed it, or this \
         replica did not apply it); nothing was executed, retry"
    )]
    ReadNotConfirmed { waited: std::time::Duration },

    /// The core refused to start.
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl From<ProposalError> for LogError {
    fn from(e: ProposalError) -> Self {
        match e {
            ProposalError::NotLeader { leader } => LogError::NotLeader { leader },
            ProposalError::LeadershipLost { term } => LogError::LeadershipLost { term },
            ProposalError::Busy => LogError::Busy,
            ProposalError::Membership(why) => LogError::Membership(why),
            ProposalError::MembershipInProgress(why) => LogError::MembershipInProgress(why),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;
