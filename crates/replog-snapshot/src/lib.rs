//! The one snapshot stream format of replog.
//!
//! The same stream carries a peer's state to a replica whose state is
//! behind its log's beginning (Raft snapshots themselves carry no data), is
//! a backup file (`scheduler-backup-YYYY-MM-DD-HH-MM`), is what staged
//! recovery reads, and is what a whole-state replacement writes through the
//! log. `docs/snapshot-format.md` gives the layout byte by byte; in short
//! (all integers little-endian):
//!
//! ```text
//! stream  = magic "RPLGSNAP" (8 bytes), HEADER frame, CHUNK frame*, TRAILER frame
//! frame   = type (1 byte) | length (u32) | payload (length bytes) | crc32c (u32)
//!           crc32c covers type, length and payload
//! HEADER  payload = protobuf replog.snapshot.v1.SnapshotHeader
//! CHUNK   payload = record+ ; record = kind (u32) | length (u32) | bytes
//! TRAILER payload = protobuf replog.snapshot.v1.SnapshotTrailer: counts,
//!           total_bytes, crc32c of every byte before the TRAILER frame, and
//!           crc32c of those frames without their own crc32cs
//! ```
//!
//! [`SnapshotWriter`] writes a stream, [`SnapshotReader`] reads one record at
//! a time, [`verify`] reads a whole stream and summarizes it, and
//! [`FrameSplitter`] / [`PieceReader`] cut an encoded stream into frames for
//! transport (one frame per gRPC message) and join them again.
//!
//! Invariants:
//! - Neither the reader nor the verifier ever panics, whatever the input: a
//!   bad stream is a [`SnapshotError`] that says what is wrong and at which
//!   byte offset.
//! - Every length read from a stream is checked against a limit
//!   ([`ReaderOptions`]) before anything is allocated for it.
//! - The reader never hands out a record from a frame whose crc32c it has
//!   not checked. Records of a stream that later fails (a damaged later
//!   chunk, a trailer that disagrees) have already been handed out, so a
//!   consumer stages what it reads and acts on it only once
//!   [`SnapshotReader::next_record`] has returned `Ok(None)`: only then have
//!   the counts, the total length, the whole-stream crc32c and the end of the
//!   stream been checked.
//! - Writer and reader hold at most one chunk in memory (plus the counts per
//!   record kind, at most [`MAX_KINDS`] of them), whatever the stream's size.
//! - The same header and records, pushed in the same order with the same
//!   options, always encode to the same bytes.
//! - Records never span chunks; a record never exceeds the record limit,
//!   on write or on read.
//! - Nothing here syncs a file: whoever writes a snapshot to a file owns the
//!   file and must fsync it (and its directory, after a rename) before
//!   treating it as durable.

mod error;
mod format;
mod reader;
mod split;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{Result, SnapshotError};
pub use format::{
    FrameType, DEFAULT_CHUNK_TARGET_BYTES, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_RECORD_BYTES,
    FORMAT_VERSION, FRAME_CRC_BYTES, FRAME_HEAD_BYTES, MAGIC, MAX_KINDS, MAX_TRAILER_BYTES,
    RECORD_HEAD_BYTES,
};
pub use reader::{check_cluster, verify, ReaderOptions, SnapshotReader, VerifySummary};
pub use replog_proto::snapshot::{SnapshotHeader, SnapshotTrailer};
pub use split::{FrameSplitter, PieceReader};
pub use writer::{SnapshotWriter, WriterOptions};
