//! The I/O-free replica core of replog: it drives raft-rs `RawNode` on a
//! [`replog_storage::LogStorage`], consuming [`Input`]s and emitting
//! [`Output`]s, so the same logic runs under the real runtime and under a
//! deterministic test harness.
//!
//! - [`events`]: the vocabulary (inputs, outputs, configuration, errors);
//! - [`replica`]: [`ReplicaCore`], in rooms by concern (the ready loop,
//!   apply, the recover protocol and replica states, membership);
//! - [`command`]: what log entries carry;
//! - [`slog_bridge`]: raft-rs's logs into `tracing`.

mod command;
mod events;
mod replica;
pub mod slog_bridge;

pub use command::{classify, BadEntry, Command, EntryContent};
pub use events::{
    CoreConfig, CoreError, Input, MemberProgress, MembershipChange, Output, PeerMessage, Progress,
    ProposalError, ProposalId,
};
pub use replica::ReplicaCore;
pub use replog_storage::bugs::InjectedBug;
