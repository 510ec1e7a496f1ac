//! Durable replica storage of replog.
//!
//! A replica is one member's copy of the log in one data directory:
//! a RocksDB database ([`RocksStorage`]) with a `meta` column family (the
//! [`ReplicaMeta`] record: format version, cluster and replica id, status,
//! Raft hard and conf state, compaction point, applied position) and a `log`
//! column family (one entry per position), plus a `REPLICA-IDENTITY` file.
//!
//! Invariants every implementation keeps (checked by [`conformance`]):
//! - every value is framed with a crc32c ([`frame`]) that is checked on
//!   every read; a bad record is an error, never a panic or wrong data;
//! - one [`LogUpdate`] is one atomic write; updates become durable in order
//!   at [`LogStorage::sync`];
//! - the log is contiguous from `snapshot_index + 1` to `last_index`.

mod api;
pub mod bugs;
pub mod conformance;
mod error;
mod fetch_budget;
pub mod frame;
pub mod identity;
pub mod manifest;
mod memory;
mod model;
pub mod records;
mod rocks;

pub use api::{LogStorage, LogUpdate};
pub use error::{Result, StorageError};
pub use fetch_budget::{FetchBudget, FetchStats, DEFAULT_FETCH_BUDGET_BYTES, MAX_DEFERRED};
pub use memory::MemoryStorage;
pub use model::{
    decode_membership_context, encode_membership_context, key_position, now_unix_ms, position_key,
    Member, MembershipContext, Promotion, ReplicaIdentity, ReplicaMeta, ReplicaStatus,
    FORMAT_VERSION,
};
pub use rocks::{
    disk_usage, validate_cluster_id, InitOptions, OpenOptions, RecoveryReport, RocksStorage,
    DEFAULT_MAX_RECORD_BYTES, OWN_COLUMN_FAMILIES,
};
/// The RocksDB binding the storage is built on (for [`RocksStorage::shared_db`]).
pub use rocksdb;
