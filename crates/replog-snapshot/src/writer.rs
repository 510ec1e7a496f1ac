//! [`SnapshotWriter`]: writes a snapshot stream to any [`std::io::Write`].
//!
//! Invariants: the writer holds at most one chunk in memory (a record larger
//! than the chunk target is written straight through, in a chunk of its
//! own); it never emits an empty chunk; every frame it writes is complete
//! before the next one starts; once a write to the underlying stream has
//! failed, every later call fails with [`SnapshotError::Poisoned`], so a
//! half-written stream never gets a TRAILER.
//!
//! The writer never syncs: a caller writing a file must `fsync` it (and the
//! directory, after renaming it into place) once [`SnapshotWriter::finish`]
//! has returned, before it reports the snapshot or backup as written. Wrap
//! an unbuffered writer (a file, a socket) in a [`std::io::BufWriter`]: the
//! writer issues one `write_all` per chunk, but the magic, the HEADER and a
//! large record's pieces are separate small writes.

use std::collections::BTreeMap;
use std::io::Write;

use prost::Message;
use replog_proto::snapshot::{SnapshotHeader, SnapshotTrailer};

use crate::error::{Result, SnapshotError};
use crate::format::{
    encode_frame, frame_head, record_head, FrameType, StreamCrcs, DEFAULT_CHUNK_TARGET_BYTES,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_RECORD_BYTES, FORMAT_VERSION, FRAME_CRC_BYTES,
    FRAME_HEAD_BYTES, MAGIC, MAX_FRAME_LENGTH, MAX_KINDS, MAX_TRAILER_BYTES, RECORD_HEAD_BYTES,
};

/// How a [`SnapshotWriter`] cuts records into chunks, and its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// A chunk is filled with records up to this many payload bytes
    /// (records with their 8-byte heads) and then emitted. A record whose
    /// head and bytes exceed it gets a chunk of its own. At most
    /// `max_record_bytes + 8`, so that every chunk fits the reader's
    /// default chunk limit.
    pub chunk_target_bytes: usize,
    /// A record longer than this is refused ([`SnapshotError::RecordTooLarge`]).
    /// Readers must allow at least as much.
    pub max_record_bytes: usize,
    /// A HEADER payload longer than this is refused
    /// ([`SnapshotError::FrameTooLarge`]). Readers must allow at least as much.
    pub max_header_bytes: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_target_bytes: DEFAULT_CHUNK_TARGET_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

impl WriterOptions {
    fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(SnapshotError::InvalidInput { reason });
        if self.max_record_bytes > MAX_FRAME_LENGTH - RECORD_HEAD_BYTES {
            return invalid(format!(
                "max_record_bytes {} does not fit a chunk (at most {} bytes)",
                self.max_record_bytes,
                MAX_FRAME_LENGTH - RECORD_HEAD_BYTES
            ));
        }
        if self.chunk_target_bytes > self.max_record_bytes + RECORD_HEAD_BYTES {
            return invalid(format!(
                "chunk_target_bytes {} is over max_record_bytes + {RECORD_HEAD_BYTES} ({})",
                self.chunk_target_bytes,
                self.max_record_bytes + RECORD_HEAD_BYTES
            ));
        }
        if self.max_header_bytes > MAX_FRAME_LENGTH {
            return invalid(format!(
                "max_header_bytes {} does not fit a frame (at most {MAX_FRAME_LENGTH} bytes)",
                self.max_header_bytes
            ));
        }
        Ok(())
    }
}

/// Writes one snapshot stream: magic and HEADER at [`SnapshotWriter::new`],
/// records with [`SnapshotWriter::push`], the last chunk and the TRAILER at
/// [`SnapshotWriter::finish`]. A writer dropped without `finish` leaves a
/// stream without TRAILER, which every reader refuses as truncated.
pub struct SnapshotWriter<W: Write> {
    w: W,
    opts: WriterOptions,
    /// The chunk being filled: `FRAME_HEAD_BYTES` placeholder bytes for the
    /// frame head, then records; the crc32c is appended when it is emitted.
    chunk: Vec<u8>,
    /// Bytes written to `w` so far.
    offset: u64,
    /// Checksums of those bytes.
    crcs: StreamCrcs,
    record_count: u64,
    chunk_count: u64,
    counts_by_kind: BTreeMap<u32, u64>,
    poisoned: bool,
}

impl<W: Write> std::fmt::Debug for SnapshotWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("offset", &self.offset)
            .field("buffered", &self.chunk_payload_len())
            .field("record_count", &self.record_count)
            .field("chunk_count", &self.chunk_count)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<W: Write> SnapshotWriter<W> {
    /// Starts a stream: checks the options, writes the magic and the HEADER
    /// frame. `header.format_version` may be left 0 (it is written as
    /// [`FORMAT_VERSION`]); any other version than that is refused.
    pub fn new(w: W, header: &SnapshotHeader, opts: WriterOptions) -> Result<Self> {
        opts.validate()?;
        let payload = match header.format_version {
            FORMAT_VERSION => header.encode_to_vec(),
            0 => SnapshotHeader {
                format_version: FORMAT_VERSION,
                ..header.clone()
            }
            .encode_to_vec(),
            v => {
                return Err(SnapshotError::InvalidInput {
                    reason: format!(
                        "header has format version {v}; this binary writes version \
                         {FORMAT_VERSION} only"
                    ),
                })
            }
        };
        if payload.len() > opts.max_header_bytes {
            return Err(SnapshotError::FrameTooLarge {
                offset: MAGIC.len() as u64,
                frame: FrameType::Header.name(),
                size: payload.len() as u64,
                limit: opts.max_header_bytes as u64,
            });
        }
        let mut writer = SnapshotWriter {
            w,
            opts,
            chunk: vec![0; FRAME_HEAD_BYTES],
            offset: 0,
            crcs: StreamCrcs::after_magic(),
            record_count: 0,
            chunk_count: 0,
            counts_by_kind: BTreeMap::new(),
            poisoned: false,
        };
        writer.write_raw(&MAGIC)?;
        let frame = encode_frame(FrameType::Header, &payload);
        writer.write_frame(&frame)?;
        Ok(writer)
    }

    /// Appends one record of `kind` (chosen by the content owner). The
    /// record goes into the current chunk, which is emitted first if the
    /// record would take it over the chunk target; a record larger than the
    /// target is written at once in a chunk of its own.
    ///
    /// A record over `max_record_bytes`, or a kind beyond the first
    /// [`MAX_KINDS`] distinct ones, is refused and the stream stays usable.
    pub fn push(&mut self, kind: u32, record: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        if record.len() > self.opts.max_record_bytes {
            return Err(SnapshotError::RecordTooLarge {
                offset: self.offset + self.chunk.len() as u64,
                kind,
                size: record.len() as u64,
                limit: self.opts.max_record_bytes as u64,
            });
        }
        if self.counts_by_kind.len() >= MAX_KINDS && !self.counts_by_kind.contains_key(&kind) {
            return Err(SnapshotError::InvalidInput {
                reason: format!(
                    "record kind {kind} would be the stream's {}th distinct kind; at most \
                     {MAX_KINDS} are allowed",
                    MAX_KINDS + 1
                ),
            });
        }
        let need = RECORD_HEAD_BYTES + record.len();
        if need > self.opts.chunk_target_bytes {
            self.emit_chunk()?;
            self.write_single_record_chunk(kind, record)?;
        } else {
            if self.chunk_payload_len() + need > self.opts.chunk_target_bytes {
                self.emit_chunk()?;
            }
            // `record.len() <= max_record_bytes < u32::MAX` (checked above
            // and in `validate`).
            self.chunk
                .extend_from_slice(&record_head(kind, record.len() as u32));
            self.chunk.extend_from_slice(record);
            if self.chunk_payload_len() >= self.opts.chunk_target_bytes {
                self.emit_chunk()?;
            }
        }
        self.record_count += 1;
        *self.counts_by_kind.entry(kind).or_insert(0) += 1;
        Ok(())
    }

    /// Emits the last chunk and the TRAILER, flushes (does not sync) the
    /// underlying writer, and returns it with the TRAILER written.
    pub fn finish(mut self) -> Result<(W, SnapshotTrailer)> {
        self.check_poisoned()?;
        self.emit_chunk()?;
        let trailer = SnapshotTrailer {
            record_count: self.record_count,
            chunk_count: self.chunk_count,
            counts_by_kind: std::mem::take(&mut self.counts_by_kind),
            total_bytes: self.offset,
            stream_crc32c: self.crcs.stream,
            frames_crc32c: self.crcs.frames,
        };
        let payload = trailer.encode_to_vec();
        if payload.len() > MAX_TRAILER_BYTES {
            // Cannot happen with at most MAX_KINDS kinds; checked anyway.
            return Err(SnapshotError::FrameTooLarge {
                offset: self.offset,
                frame: FrameType::Trailer.name(),
                size: payload.len() as u64,
                limit: MAX_TRAILER_BYTES as u64,
            });
        }
        let frame = encode_frame(FrameType::Trailer, &payload);
        self.write_raw(&frame)?;
        let offset = self.offset;
        self.w.flush().map_err(|source| {
            self.poisoned = true;
            SnapshotError::Io { offset, source }
        })?;
        Ok((self.w, trailer))
    }

    /// Bytes written to the underlying writer so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    fn chunk_payload_len(&self) -> usize {
        self.chunk.len() - FRAME_HEAD_BYTES
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(SnapshotError::Poisoned {
                side: "writer",
                offset: self.offset,
            });
        }
        Ok(())
    }

    /// Emits the chunk being filled, if it holds any record.
    fn emit_chunk(&mut self) -> Result<()> {
        let len = self.chunk_payload_len();
        if len == 0 {
            return Ok(());
        }
        // len <= chunk_target_bytes <= max_record_bytes + 8 <= u32::MAX.
        self.chunk[..FRAME_HEAD_BYTES].copy_from_slice(&frame_head(FrameType::Chunk, len as u32));
        let crc = crc32c::crc32c(&self.chunk);
        self.chunk.extend_from_slice(&crc.to_le_bytes());
        let chunk = std::mem::take(&mut self.chunk);
        let result = self.write_raw(&chunk);
        self.chunk = chunk;
        self.chunk.truncate(FRAME_HEAD_BYTES);
        result?;
        self.crcs.add_frame(crc, len);
        self.chunk_count += 1;
        Ok(())
    }

    /// Writes a chunk holding only `record`, without copying the record.
    fn write_single_record_chunk(&mut self, kind: u32, record: &[u8]) -> Result<()> {
        let len = RECORD_HEAD_BYTES + record.len();
        let mut head = [0u8; FRAME_HEAD_BYTES + RECORD_HEAD_BYTES];
        head[..FRAME_HEAD_BYTES].copy_from_slice(&frame_head(FrameType::Chunk, len as u32));
        head[FRAME_HEAD_BYTES..].copy_from_slice(&record_head(kind, record.len() as u32));
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), record);
        self.write_raw(&head)?;
        self.write_raw(record)?;
        self.write_raw(&crc.to_le_bytes())?;
        self.crcs.add_frame(crc, len);
        self.chunk_count += 1;
        Ok(())
    }

    /// Writes a whole frame encoded by `encode_frame` and extends the
    /// stream crc32c with it.
    fn write_frame(&mut self, frame: &[u8]) -> Result<()> {
        self.write_raw(frame)?;
        let body = &frame[..frame.len() - FRAME_CRC_BYTES];
        self.crcs
            .add_frame(crc32c::crc32c(body), body.len() - FRAME_HEAD_BYTES);
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        match self.w.write_all(bytes) {
            Ok(()) => {
                self.offset += bytes.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.poisoned = true;
                Err(SnapshotError::Io {
                    offset: self.offset,
                    source,
                })
            }
        }
    }
}
