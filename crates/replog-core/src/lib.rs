//! The I/O-free replica core of replog: it drives raft-rs `RawNode` on a
//! [`replog_storage::LogStorage`], consuming [`Input`]s and emitting
//! [`Output`]s, so the same logic runs under the real runtime and under a
//! deterministic test harness.

mod command;
mod core;
pub mod slog_bridge;

pub use command::{classify, BadEntry, Command, EntryContent};
pub use core::{
    CoreConfig, CoreError, Input, MemberProgress, MembershipChange, Output, PeerMessage, Progress,
    ProposalError, ProposalId, ReplicaCore,
};
pub use replog_storage::bugs::InjectedBug;
