//! The scheduler-state store of replog: the state machine on the replicated
//! log.
//!
//! Each committed log entry that is a [`Transaction`] (a list of typed
//! [`Op`]s, `proto/replog/state/v1/state.proto`) is applied at its log
//! position, atomically, on every replica, by [`StateStore::apply`]. The
//! state is modelled on Apache Aurora's storage (tasks, cron jobs, quotas,
//! host attributes, job updates, maintenance requests, scheduler metadata)
//! plus an agent registry like the Mesos master's registrar. No networking
//! and no Raft here: the caller feeds positions and transactions.
//!
//! # Determinism
//!
//! The same transactions at the same positions give byte-identical state on
//! every replica: ops are applied in order onto an in-memory overlay, the
//! result is written in key order, entities are stored as their protobuf
//! encoding (maps are `BTreeMap`s, so they encode in key order), and every
//! refusal (validation or a state-dependent check) depends only on the
//! transaction and the state. A refused transaction changes nothing but the
//! applied position ([`Applied::Rejected`]). Replicas and backups compare
//! with [`StateStore::state_hash`]. Every replica must use the same
//! transaction [`Limits`].
//!
//! # Key layout (one column family)
//!
//! ```text
//! 0x00                                              meta: [format=1][generation u32 BE][applied u64 BE]
//! 0x01 [gen u32 BE] [kind 0x01..=0x08] [primary key]                    an entity (its message)
//! 0x01 [gen u32 BE] [index 0x81..=0x85] [index value] [task id]         a task index entry (empty payload)
//! ```
//!
//! Entity kinds are the `KIND_*` constants, equal to the field numbers of
//! [`Entity`]. Primary keys: task id; cron job `lp(role) lp(environment)
//! name`; quota role; host attributes host; job update `lp(role)
//! lp(environment) lp(name) update id`; maintenance request host; scheduler
//! metadata empty (a singleton); agent id. `lp(s)` is the string prefixed
//! by its length (u32 BE); the last component runs to the end of the key,
//! so ids and host names sort as bytes and a job's updates are one prefix.
//!
//! Task indexes (index value, then the task id to the end of the key): by
//! job `0x81 lp(role) lp(environment) lp(name)`, by role `0x82 lp(role)`, by
//! status `0x83 status u32 BE`, by agent host `0x84 lp(host)` and by agent id
//! `0x85 lp(agent_id)` (the last two only for tasks that have one). Length
//! prefixes make every index value prefix-free: a value containing 0x00 or
//! being a prefix of another value never mixes their entries.
//!
//! Every value, index entries and the meta record included, is framed with
//! [`replog_storage::frame`] (crc32c over key and payload) and checked on
//! every read; a bad one is [`StateError::Corrupt`] naming the key.
//!
//! Invariants:
//! - The meta record names the one current generation; readers read it and
//!   the entities from the same RocksDB snapshot, so they see one
//!   generation whole.
//! - One [`StateStore::apply`] is one write batch: entities, index entries
//!   and the applied position, so a position is applied exactly once and
//!   indexes never disagree with entities. [`StateStore::apply`] and
//!   [`StateStore::skip_to`] move the applied position forward only
//!   (asserted), one batch at a time; only [`StateStore::replace_all`]
//!   sets it to the position it is given.
//! - Index entries are exactly those the current tasks call for (old
//!   entries of a changed or removed task are deleted in the same batch);
//!   [`StateStore::verify`] checks this both ways.
//! - [`StateStore::replace_all`] writes generation g+1 in bounded batches,
//!   switches the meta record to g+1 and the new position in one write, then
//!   deletes generation g with a range delete. [`StateStore::open`] deletes
//!   every generation but the current one, so a crash at any point leaves
//!   either the old state or the new one, and no garbage after the next
//!   open.
//! - Everything is bounded: transaction bytes, ops and entities per
//!   transaction, record bytes, key lengths, replacement batch bytes, the
//!   change ring and the broadcast channel ([`Limits`]).
//!
//! # Changes
//!
//! [`StateStore::changes_since`] and [`StateStore::subscribe`] give the
//! entities that changed per position, from a bounded in-memory ring and a
//! bounded broadcast channel; a watcher that falls out of both gets
//! [`StateError::MustReload`].
//!
//! [`Transaction`]: replog_proto::state::Transaction
//! [`Op`]: replog_proto::state::Op
//! [`Entity`]: replog_proto::state::Entity

/// The version of the state schema (`proto/replog/state/v1/state.proto`)
/// this build writes and understands. Bump it with every change a replica
/// of an older build would silently lose: a new field or entity, which
/// protobuf decoding drops when it does not know it. Log records and state
/// snapshots carry it; a replica refuses (stops applying, or refuses the
/// file) what a newer schema wrote instead of applying it without the
/// fields it does not know, so replicas of mixed versions cannot diverge.
/// Upgrade every replica before the scheduler writes with a newer one.
pub const SCHEMA_VERSION: u32 = 1;

mod changes;
mod error;
mod keys;
mod store;
mod validate;

pub use changes::{Change, StateEvent, Subscription};
pub use error::{Result, StateError};
pub use keys::{
    entity_kind, kind_name, EntityKey, ALL_KINDS, KIND_AGENT, KIND_CRON_JOB, KIND_HOST_ATTRIBUTES,
    KIND_JOB_UPDATE, KIND_MAINTENANCE_REQUEST, KIND_QUOTA, KIND_SCHEDULER_METADATA, KIND_TASK,
};
pub use store::{
    Applied, EntityCounts, Export, ReplaceReport, StateStore, TaskQuery, VerifyReport,
    STANDALONE_COLUMN_FAMILY,
};
pub use validate::Limits;

#[cfg(test)]
mod tests;
