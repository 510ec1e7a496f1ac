//! The health checks and the repair coordinator of replog (issue 14), as
//! I/O-free decisions: observations and records in, judgments and actions
//! out. The runtime (replog-server) feeds the leader's observations in,
//! writes the records this crate decides on into the replicated log, and
//! runs the commands; every replica folds the committed records into the
//! same [`RepairState`] (applied by replog-core, persisted with the replica's
//! metadata and carried by its snapshots).
//!
//! - [`config`]: the coordinator's flags (`--repair-set`, `--repair-order`,
//!   `--num-allowed-repairs`, limits, modes, spares) and the start-up rules,
//!   refused with their arithmetic.
//! - [`health`]: the failure detector (ping timeouts, the re-register grace
//!   after a leader change, replication lag) and the failure tolerance.
//! - [`record`]: what the coordinator writes into the log, and its checked
//!   decoding.
//! - [`state`]: the replicated repair memory, a deterministic fold of the
//!   records.
//! - [`monitor`]: the replica's self-monitor (`--monitor-config`): envelopes
//!   held for their duration become signals, reported again while they last.
//! - [`coordinator`]: the decisions: which step next, when a step timed out,
//!   when to isolate, re-admit, close a case or raise the alarm.
//!
//! Invariants (asserted in [`coordinator`] and checked by the simulation in
//! `tests/coordinator_sim.rs`):
//! - at most `num_allowed_repairs` repairs are in progress at once;
//! - a decision never leaves fewer available voters than a quorum of the
//!   voters it leaves;
//! - isolations since the last reset never exceed the removal limit, and
//!   those inside one rate window never exceed the rate limit;
//! - a step recorded as started is never started again: the next step waits
//!   for its outcome or its deadline.

pub mod config;
pub mod coordinator;
pub mod health;
pub mod monitor;
pub mod record;
pub mod state;

pub use config::{ConfigError, Limits, Mode, RateLimit, RepairConfig, RepairStep, Scope, Spare};
pub use coordinator::{Action, Coordinator, MemberView, View, DETECTOR_SIGNAL_TTL};
pub use health::{
    failure_tolerance, quorum, Detector, DetectorConfig, Health, Observation, Reason,
};
pub use record::{Record, RecordError, StepResult};
pub use state::{Applied, Case, Rejected, RepairState};
