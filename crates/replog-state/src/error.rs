//! Typed errors of the state store.

/// Everything that can go wrong while validating, applying or reading state.
///
/// Transactions are refused with [`StateError::InvalidTransaction`],
/// [`StateError::InvalidOp`], [`StateError::TooLarge`],
/// [`StateError::UnknownEntity`] or [`StateError::WrongState`]; these are
/// deterministic (every replica refuses the same transaction the same way).
/// [`StateError::Corrupt`], [`StateError::Decode`] and [`StateError::Rocks`]
/// are about the local copy and differ between replicas.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The transaction as a whole is malformed (no ops).
    #[error("invalid transaction: {reason}")]
    InvalidTransaction { reason: String },

    /// Op number `index` (from 0) of a transaction is malformed.
    #[error("invalid op #{index}: {reason}")]
    InvalidOp { index: usize, reason: String },

    /// Entity number `index` (from 0) of a replacement stream is malformed.
    #[error("invalid entity #{index} of the replacement: {reason}")]
    InvalidEntity { index: u64, reason: String },

    /// Op number `op` needs an entity that does not exist (`key` names the
    /// entity, kind included).
    #[error("op #{op}: {key} does not exist")]
    UnknownEntity {
        op: usize,
        kind: &'static str,
        key: String,
    },

    /// Op number `op` is not allowed in the entity's current state (an agent
    /// transition the registry does not allow).
    #[error("op #{op}: {key} is {state}, expected {expected}")]
    WrongState {
        op: usize,
        key: String,
        state: String,
        expected: &'static str,
    },

    /// Something is larger (or more numerous) than its limit.
    #[error("{what} is {size}, over the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },

    /// Positions are applied in increasing order, each once.
    #[error("position {position} is not after the applied position {applied}")]
    PositionNotAfterApplied { position: u64, applied: u64 },

    /// A stored value failed its checksum or the stored data is inconsistent.
    #[error("corrupt state at {key}: {reason}")]
    Corrupt { key: String, reason: String },

    /// A stored value passed its checksum but is not the message it should be.
    #[error("cannot decode {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: prost::DecodeError,
    },

    /// RocksDB reported an error.
    #[error("RocksDB error ({context}): {source}")]
    Rocks {
        context: String,
        #[source]
        source: rocksdb::Error,
    },

    /// The database has no column family of that name.
    #[error("the database has no column family '{0}'")]
    MissingColumnFamily(String),

    /// The stored data was written by a newer format.
    #[error("the state in column family '{cf}' has format {found}; this binary reads format {supported}")]
    UnsupportedFormat {
        cf: String,
        found: u8,
        supported: u8,
    },

    /// The entity stream given to `replace_all` failed; nothing was replaced.
    #[error("reading the replacement entities failed after {after} entities: {source}")]
    Source {
        after: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The changes after `since` are no longer in memory (or the state was
    /// replaced since): the watcher must reload the whole state and
    /// subscribe again.
    #[error("changes after position {since} are no longer available (the oldest kept follows {floor}); reload the state")]
    MustReload { since: u64, floor: u64 },
}

impl StateError {
    pub(crate) fn rocks(context: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> StateError {
        let context = context.into();
        move |source| StateError::Rocks { context, source }
    }

    /// True for a refusal of the transaction itself (deterministic), false
    /// for a problem of the local store.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            StateError::InvalidTransaction { .. }
                | StateError::InvalidOp { .. }
                | StateError::UnknownEntity { .. }
                | StateError::WrongState { .. }
                | StateError::TooLarge { .. }
        )
    }

    /// True if the local data is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, StateError::Corrupt { .. } | StateError::Decode { .. })
    }
}

/// Result of the state store.
pub type Result<T, E = StateError> = std::result::Result<T, E>;
