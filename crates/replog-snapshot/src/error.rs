//! Typed errors of the snapshot stream.
//!
//! Every variant about the stream's bytes names the byte offset (from the
//! start of the stream, magic included) of the item it is about, so a
//! damaged backup file can be inspected with nothing but the message and a
//! hex dump.

/// Result of the snapshot stream's operations.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// Everything that can go wrong while writing, reading or verifying a
/// snapshot stream.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The stream does not start with [`crate::MAGIC`]: not a snapshot.
    /// `found` is the stream's first bytes (fewer than 8 if it is shorter).
    #[error(
        "not a replog snapshot stream: it starts with {found:02x?}, not the magic \
         \"RPLGSNAP\" (52 50 4c 47 53 4e 41 50)"
    )]
    BadMagic { found: Vec<u8> },

    /// The HEADER (at byte offset 8) declares a format version this binary
    /// cannot read: newer than [`crate::FORMAT_VERSION`], or 0 (none).
    #[error(
        "snapshot stream has format version {found} (HEADER at byte offset 8); this binary \
         reads format version {supported} only"
    )]
    UnsupportedVersion { found: u32, supported: u32 },

    /// The stream ends (at byte offset `end`) inside `what`, which starts at
    /// byte offset `offset`; or it ends before its TRAILER.
    #[error(
        "snapshot stream truncated: it ends at byte offset {end}, inside the {what} that \
         starts at byte offset {offset}"
    )]
    Truncated {
        offset: u64,
        what: &'static str,
        end: u64,
    },

    /// A frame's crc32c does not match its bytes (`frame` names it), or the
    /// TRAILER's whole-stream crc32c does not match the stream before it
    /// (`frame` is "stream", `offset` the TRAILER's).
    #[error(
        "crc32c mismatch in the {frame} at byte offset {offset} (stored {stored:#010x}, \
         computed {computed:#010x})"
    )]
    ChecksumMismatch {
        offset: u64,
        frame: &'static str,
        stored: u32,
        computed: u32,
    },

    /// A frame's length is over the limit for its type (checked before
    /// anything is allocated), or a frame to write would be.
    #[error(
        "{frame} frame at byte offset {offset} has a payload of {size} bytes, over the limit \
         of {limit} bytes"
    )]
    FrameTooLarge {
        offset: u64,
        frame: &'static str,
        size: u64,
        limit: u64,
    },

    /// A record is over the record limit. On write, `offset` is where the
    /// record would have started.
    #[error(
        "record of kind {kind} at byte offset {offset} has {size} bytes, over the limit of \
         {limit} bytes"
    )]
    RecordTooLarge {
        offset: u64,
        kind: u32,
        size: u64,
        limit: u64,
    },

    /// A frame (or byte) that is not allowed where it is: a CHUNK or TRAILER
    /// before the HEADER, a second HEADER, a frame of unknown type, data
    /// after the TRAILER.
    #[error("unexpected {found} at byte offset {offset}: expected {expected}")]
    UnexpectedFrame {
        offset: u64,
        found: String,
        expected: &'static str,
    },

    /// A frame whose crc32c is right but whose content breaks the format (a
    /// record running past its chunk, an empty chunk, too many record kinds).
    #[error("malformed {frame} frame at byte offset {offset}: {reason}")]
    Malformed {
        offset: u64,
        frame: &'static str,
        reason: String,
    },

    /// The TRAILER (at `offset`) disagrees with the stream before it: `what`
    /// is the count that differs.
    #[error(
        "the TRAILER at byte offset {offset} does not match the stream: {what} is {trailer} \
         in the trailer but {actual} in the stream"
    )]
    CountMismatch {
        offset: u64,
        what: String,
        trailer: u64,
        actual: u64,
    },

    /// A HEADER or TRAILER payload is not a valid protobuf message.
    #[error("cannot decode the {frame} payload of the frame at byte offset {offset}: {source}")]
    Decode {
        offset: u64,
        frame: &'static str,
        #[source]
        source: prost::DecodeError,
    },

    /// Reading or writing the underlying stream failed; `offset` is the byte
    /// offset at which the failed operation started.
    #[error("I/O error at byte offset {offset} of the snapshot stream: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    /// The snapshot belongs to another cluster (see [`crate::check_cluster`]).
    #[error("snapshot belongs to cluster '{found}', not '{expected}'; refusing it")]
    ClusterMismatch { expected: String, found: String },

    /// The writer was given options or a header it cannot write, or more
    /// than [`crate::MAX_KINDS`] record kinds.
    #[error("invalid snapshot writer input: {reason}")]
    InvalidInput { reason: String },

    /// An earlier call on this writer or reader failed; the stream is
    /// incomplete (writer) or untrustworthy (reader) and must be discarded.
    #[error(
        "the snapshot {side} failed earlier (at byte offset {offset}); the stream must be \
         discarded"
    )]
    Poisoned { side: &'static str, offset: u64 },
}

impl SnapshotError {
    /// Whether the error says that the stream's bytes are damaged or not a
    /// snapshot this binary can read (rather than an I/O failure, a
    /// misuse, or a snapshot of another cluster). Fetching the stream again
    /// may help; reading the same bytes again will not.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            SnapshotError::BadMagic { .. }
                | SnapshotError::UnsupportedVersion { .. }
                | SnapshotError::Truncated { .. }
                | SnapshotError::ChecksumMismatch { .. }
                | SnapshotError::FrameTooLarge { .. }
                | SnapshotError::RecordTooLarge { .. }
                | SnapshotError::UnexpectedFrame { .. }
                | SnapshotError::Malformed { .. }
                | SnapshotError::CountMismatch { .. }
                | SnapshotError::Decode { .. }
        )
    }
}
