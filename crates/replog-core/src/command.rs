//! What a log entry carries: the commands of the replicated log, and how
//! entries are classified for readers (application entries versus no-ops,
//! membership changes and repair records, which readers never see).

use bytes::Bytes;
use prost::Message as _;
use raft::eraftpb::{Entry, EntryType};
use replog_proto::storage::{log_command, LogCommand};

/// A command proposed through the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An application entry (what `Writer::append` wrote).
    Append(Bytes),
    /// Remove every position before this one, on every replica.
    Truncate(u64),
    /// A record of the repair memory (replog-repair's encoded `Record`):
    /// every replica folds it into its repair state; readers never see it.
    Repair(Bytes),
}

impl Command {
    /// Encodes the command as entry data.
    pub fn encode(&self) -> Vec<u8> {
        let command = match self {
            Command::Append(b) => log_command::Command::Append(b.clone()),
            Command::Truncate(to) => log_command::Command::Truncate(*to),
            Command::Repair(b) => log_command::Command::Repair(b.clone()),
        };
        LogCommand {
            command: Some(command),
        }
        .encode_to_vec()
    }

    /// Bytes the command adds to its payload when encoded.
    pub const MAX_OVERHEAD: usize = 16;
}

/// What one entry of the log is, for readers and for apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryContent {
    /// The empty entry a new leader commits at the start of its term.
    LeaderNoop,
    /// A membership change.
    Membership,
    /// A command.
    Command(Command),
}

/// Error for entry data that is not a valid command.
#[derive(Debug, thiserror::Error)]
#[error("entry at position {index} holds no valid command: {reason}")]
pub struct BadEntry {
    pub index: u64,
    pub reason: String,
}

/// Classifies an entry. Never panics on any data.
pub fn classify(e: &Entry) -> Result<EntryContent, BadEntry> {
    match e.get_entry_type() {
        EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => Ok(EntryContent::Membership),
        EntryType::EntryNormal if e.data.is_empty() => Ok(EntryContent::LeaderNoop),
        EntryType::EntryNormal => {
            let cmd = LogCommand::decode(e.data.clone()).map_err(|err| BadEntry {
                index: e.index,
                reason: err.to_string(),
            })?;
            match cmd.command {
                Some(log_command::Command::Append(b)) => {
                    Ok(EntryContent::Command(Command::Append(b)))
                }
                Some(log_command::Command::Truncate(to)) => {
                    Ok(EntryContent::Command(Command::Truncate(to)))
                }
                Some(log_command::Command::Repair(b)) => {
                    Ok(EntryContent::Command(Command::Repair(b)))
                }
                None => Err(BadEntry {
                    index: e.index,
                    reason: "empty command".into(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_classify() {
        for c in [
            Command::Append(Bytes::from_static(b"abc")),
            Command::Truncate(42),
            Command::Append(Bytes::new()),
        ] {
            let e = Entry {
                index: 7,
                data: c.encode().into(),
                ..Default::default()
            };
            assert_eq!(classify(&e).unwrap(), EntryContent::Command(c.clone()));
            assert!(
                e.data.len()
                    <= match &c {
                        Command::Append(b) => b.len(),
                        _ => 0,
                    } + Command::MAX_OVERHEAD
            );
        }
        let e = Entry::default();
        assert_eq!(classify(&e).unwrap(), EntryContent::LeaderNoop);
    }

    #[test]
    fn garbage_is_an_error() {
        let e = Entry {
            index: 3,
            data: vec![0xff, 0xff, 0xff].into(),
            ..Default::default()
        };
        let err = classify(&e).unwrap_err();
        assert!(err.to_string().contains("position 3"));
    }
}
