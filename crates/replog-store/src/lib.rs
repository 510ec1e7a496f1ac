//! The scheduler-state store on the replicated log.
//!
//! A scheduler writes typed transactions (`replog.state.v1.Transaction`);
//! the store encodes each one as log records ([`record`]), appends them
//! through the log's writer, and every replica applies the committed
//! records, in log order, to its state (`replog-state`).
//!
//! Invariants:
//! - the log holds only [`record`] encodings; an entry that is not one is
//!   reported and skipped, never guessed at;
//! - a transaction too big for one entry is framed and applied whole at the
//!   position of its last part, or not at all.

mod applier;
pub mod backup;
pub mod record;
pub mod staging;
pub mod store;

/// Column family of the scheduler state, in the replica's own database (so
/// that an applied position and the state it produced are one atomic
/// write).
pub const CF_STATE: &str = "state";
/// Column family of a staged recovery (a backup loaded for inspection and
/// editing before it is committed through the log).
pub const CF_STAGING: &str = "staging";
/// The column families this crate keeps in its log's database: a log that
/// carries a scheduler store is opened with them registered
/// ([`SchedulerStore::register_column_families`]).
pub const COLUMN_FAMILIES: [&str; 2] = [CF_STATE, CF_STAGING];

pub use staging::{
    staging_id_of, CommittedRecovery, Staged, Staging, StagingError, AUTO_COMMIT_LABEL,
    STAGING_ID_LABEL,
};
pub use store::{
    ApplyProgress, FetchFuture, SchedulerStore, SnapshotPieces, SnapshotSource, StoreError,
    StoreOptions, FOUNDING_POSITION,
};
