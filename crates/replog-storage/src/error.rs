//! Typed errors of replica storage.

use std::path::PathBuf;

/// Everything that can go wrong while opening, reading or writing a replica.
///
/// Every variant names what it is about (a path, a column family and key, a
/// position), so an operator can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A record failed its checksum, could not be decoded, or the data as a
    /// whole is inconsistent (a gap in the log, a commit beyond the last
    /// entry). `location` names the file or the column family and key.
    #[error("corrupt replica data at {location}: {reason}")]
    Corrupt { location: String, reason: String },

    /// RocksDB itself reported an error (its own checksums included).
    #[error("RocksDB error in {path}: {source}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },

    /// A filesystem operation outside RocksDB failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `initialize` was pointed at a directory that already holds files.
    #[error(
        "refusing to initialize {path}: the directory is not empty ({found}); \
         a replica is only ever initialized from an empty directory"
    )]
    NotEmpty { path: PathBuf, found: String },

    /// The directory holds no initialized replica.
    #[error("{path} holds no initialized replica ({reason}); run `replog initialize` first")]
    NotInitialized { path: PathBuf, reason: String },

    /// The data belongs to another cluster than the caller expected.
    #[error(
        "replica data in {path} belongs to cluster '{found}', not '{expected}'; \
         refusing to open it"
    )]
    ClusterMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },

    /// The data was written in a format this binary does not understand.
    #[error(
        "replica data in {path} has format version {found}; this binary reads \
         format version {supported} only"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A record is larger than the configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },

    /// The requested position was compacted away (truncated).
    #[error("position {index} is compacted; the first available position is {first}")]
    Compacted { index: u64, first: u64 },

    /// The requested position is not in the log (yet).
    #[error("position {index} is past the last position {last}")]
    Unavailable { index: u64, last: u64 },

    /// The caller broke the contract of the storage API.
    #[error("invalid storage request: {0}")]
    Invalid(String),

    /// The storage was opened read-only.
    #[error("{0} is opened read-only")]
    ReadOnly(PathBuf),
}

/// Shorthand for results of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    pub(crate) fn corrupt(location: impl Into<String>, reason: impl Into<String>) -> Self {
        StorageError::Corrupt {
            location: location.into(),
            reason: reason.into(),
        }
    }

    /// True when the error says the data on disk is damaged.
    pub fn is_corruption(&self) -> bool {
        match self {
            StorageError::Corrupt { .. } => true,
            StorageError::Rocks { source, .. } => source.kind() == rocksdb::ErrorKind::Corruption,
            _ => false,
        }
    }
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Compacted { .. } => raft::Error::Store(raft::StorageError::Compacted),
            StorageError::Unavailable { .. } => raft::Error::Store(raft::StorageError::Unavailable),
            other => raft::Error::Store(raft::StorageError::Other(Box::new(other))),
        }
    }
}
