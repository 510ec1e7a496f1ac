//! [`SnapshotReader`]: reads and checks a snapshot stream from any
//! [`std::io::Read`], one record at a time; [`verify`]: a whole stream.
//!
//! The checks, in the order the reader makes them (docs/snapshot-format.md
//! has the same list):
//!
//! 1. the magic;
//! 2. for every frame: the type byte is a known type; the length is within
//!    the limit for that type (before anything is allocated); the payload
//!    and crc32c are all there; the crc32c matches; the frame is allowed
//!    where it is (HEADER first and only first, then CHUNKs, then TRAILER);
//! 3. HEADER: the payload decodes; the format version is supported;
//! 4. CHUNK (before any of its records is handed out): it holds at least one
//!    record; every record head lies inside the chunk; every record is
//!    within the record limit and inside the chunk; the stream has at most
//!    [`MAX_KINDS`] distinct kinds;
//! 5. TRAILER: the payload decodes; `total_bytes` is the TRAILER's offset;
//!    `stream_crc32c` matches every byte before the TRAILER; `frames_crc32c`
//!    matches the frames before it without their own crc32cs; `chunk_count`,
//!    `record_count` and `counts_by_kind` match what was read;
//! 6. nothing follows the TRAILER.
//!
//! Invariant: the reader never panics and never hands out a record of a
//! chunk whose crc32c and structure it has not checked; after any error it
//! only returns [`SnapshotError::Poisoned`].

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use prost::Message;
use replog_proto::snapshot::{SnapshotHeader, SnapshotTrailer};

use crate::error::{Result, SnapshotError};
use crate::format::{
    FrameType, StreamCrcs, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_RECORD_BYTES, FORMAT_VERSION,
    FRAME_CRC_BYTES, FRAME_HEAD_BYTES, MAGIC, MAX_KINDS, MAX_TRAILER_BYTES, RECORD_HEAD_BYTES,
};

/// A payload buffer is allocated for at most this many bytes up front; a
/// longer (but permitted) payload grows as its bytes actually arrive, so a
/// truncated stream that claims a large frame costs no large allocation.
const PREALLOCATE_LIMIT: usize = 1 << 20;

/// Limits a [`SnapshotReader`] enforces before allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Largest HEADER payload accepted.
    pub max_header_bytes: usize,
    /// Largest CHUNK payload accepted (the largest frame: the TRAILER is
    /// limited to [`MAX_TRAILER_BYTES`]).
    pub max_chunk_bytes: usize,
    /// Largest record accepted.
    pub max_record_bytes: usize,
}

impl Default for ReaderOptions {
    /// Accepts every stream a writer with default options writes.
    fn default() -> Self {
        ReaderOptions {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_chunk_bytes: DEFAULT_MAX_RECORD_BYTES + RECORD_HEAD_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Handing out records; `chunk[pos..]` are the records not yet handed
    /// out of the current chunk (checked when it was read).
    Records,
    /// The TRAILER was read and every check passed.
    Done(SnapshotTrailer),
    /// An error was returned; the stream is not to be trusted.
    Failed,
}

/// Reads one snapshot stream, one record at a time. See the module docs
/// for the checks and their order.
pub struct SnapshotReader<R: Read> {
    r: R,
    opts: ReaderOptions,
    /// Bytes consumed from `r`.
    offset: u64,
    /// Checksums of the bytes consumed before the TRAILER frame.
    crcs: StreamCrcs,
    /// Payload of the current chunk and the next record's position in it.
    chunk: Bytes,
    pos: usize,
    record_count: u64,
    chunk_count: u64,
    counts_by_kind: BTreeMap<u32, u64>,
    bytes_by_kind: BTreeMap<u32, u64>,
    state: State,
}

/// A frame whose crc32c has been checked.
struct Frame {
    ty: FrameType,
    offset: u64,
    payload: Vec<u8>,
}

impl<R: Read> std::fmt::Debug for SnapshotReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("offset", &self.offset)
            .field("record_count", &self.record_count)
            .field("chunk_count", &self.chunk_count)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Checks the magic and reads and checks the HEADER frame; returns the
    /// reader, positioned before the first record, and the header.
    ///
    /// The header's cluster is not checked here: see [`check_cluster`].
    pub fn open(r: R, opts: ReaderOptions) -> Result<(Self, SnapshotHeader)> {
        let mut reader = SnapshotReader {
            r,
            opts,
            offset: 0,
            crcs: StreamCrcs::after_magic(),
            chunk: Bytes::new(),
            pos: 0,
            record_count: 0,
            chunk_count: 0,
            counts_by_kind: BTreeMap::new(),
            bytes_by_kind: BTreeMap::new(),
            state: State::Records,
        };
        let mut magic = [0u8; 8];
        let n = reader.read_full(&mut magic)?;
        if magic[..n] != MAGIC[..n] {
            return Err(SnapshotError::BadMagic {
                found: magic[..n].to_vec(),
            });
        }
        if n < MAGIC.len() {
            return Err(SnapshotError::Truncated {
                offset: 0,
                what: "magic",
                end: reader.offset,
            });
        }
        let frame = reader.read_frame()?;
        if frame.ty != FrameType::Header {
            return Err(SnapshotError::UnexpectedFrame {
                offset: frame.offset,
                found: format!("{} frame", frame.ty.name()),
                expected: "the HEADER frame first",
            });
        }
        let header = SnapshotHeader::decode(frame.payload.as_slice()).map_err(|source| {
            SnapshotError::Decode {
                offset: frame.offset,
                frame: FrameType::Header.name(),
                source,
            }
        })?;
        if header.format_version == 0 || header.format_version > FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: header.format_version,
                supported: FORMAT_VERSION,
            });
        }
        Ok((reader, header))
    }

    /// The next record as `(kind, bytes)`, or `None` once the TRAILER has
    /// been read and every end-of-stream check has passed (see the module
    /// docs). Until then, records handed out are provisional: a consumer
    /// that must not act on a damaged snapshot stages them and commits only
    /// after `None`.
    ///
    /// The returned [`Bytes`] shares its chunk's buffer (no copy); a
    /// consumer that keeps many small records for long should copy them, or
    /// it keeps their whole chunks alive.
    ///
    /// After an error every call returns [`SnapshotError::Poisoned`].
    pub fn next_record(&mut self) -> Result<Option<(u32, Bytes)>> {
        match self.state {
            State::Records => {}
            State::Done(_) => return Ok(None),
            State::Failed => {
                return Err(SnapshotError::Poisoned {
                    side: "reader",
                    offset: self.offset,
                })
            }
        }
        match self.advance() {
            Ok(record) => Ok(record),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// The TRAILER, once [`SnapshotReader::next_record`] has returned `None`.
    pub fn trailer(&self) -> Option<&SnapshotTrailer> {
        match &self.state {
            State::Done(t) => Some(t),
            _ => None,
        }
    }

    /// Bytes of the stream consumed so far (the whole stream, once done).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Records read so far, by kind.
    pub fn counts_by_kind(&self) -> &BTreeMap<u32, u64> {
        &self.counts_by_kind
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    fn advance(&mut self) -> Result<Option<(u32, Bytes)>> {
        loop {
            if self.pos < self.chunk.len() {
                return Ok(Some(self.take_record()));
            }
            let frame = self.read_frame()?;
            match frame.ty {
                FrameType::Chunk => self.load_chunk(frame)?,
                FrameType::Trailer => {
                    let trailer = self.check_trailer(frame)?;
                    self.check_end()?;
                    self.chunk = Bytes::new();
                    self.pos = 0;
                    self.state = State::Done(trailer);
                    return Ok(None);
                }
                FrameType::Header => {
                    return Err(SnapshotError::UnexpectedFrame {
                        offset: frame.offset,
                        found: "second HEADER frame".into(),
                        expected: "a CHUNK or the TRAILER frame",
                    })
                }
            }
        }
    }

    /// The record at `pos` of a chunk `load_chunk` has checked.
    fn take_record(&mut self) -> (u32, Bytes) {
        let head = self.chunk.get(self.pos..self.pos + RECORD_HEAD_BYTES);
        let (kind, len) = match head {
            Some(h) => (le_u32(&h[..4]), le_u32(&h[4..]) as usize),
            None => (0, 0), // unreachable: checked by `load_chunk`
        };
        let start = (self.pos + RECORD_HEAD_BYTES).min(self.chunk.len());
        let end = start.saturating_add(len).min(self.chunk.len());
        self.pos = end;
        (kind, self.chunk.slice(start..end))
    }

    /// Checks a chunk's structure and counts its records before any of them
    /// is handed out.
    fn load_chunk(&mut self, frame: Frame) -> Result<()> {
        let payload_offset = frame.offset + FRAME_HEAD_BYTES as u64;
        let malformed = |reason: String| SnapshotError::Malformed {
            offset: frame.offset,
            frame: FrameType::Chunk.name(),
            reason,
        };
        let p = &frame.payload;
        if p.is_empty() {
            return Err(malformed("it holds no record".into()));
        }
        let mut pos = 0usize;
        let mut records = 0u64;
        while pos < p.len() {
            let at = payload_offset + pos as u64;
            let rest = p.len() - pos;
            if rest < RECORD_HEAD_BYTES {
                return Err(malformed(format!(
                    "the record head at byte offset {at} needs {RECORD_HEAD_BYTES} bytes; \
                     the chunk has {rest} left"
                )));
            }
            let kind = le_u32(&p[pos..pos + 4]);
            let len = le_u32(&p[pos + 4..pos + 8]) as usize;
            if len > self.opts.max_record_bytes {
                return Err(SnapshotError::RecordTooLarge {
                    offset: at,
                    kind,
                    size: len as u64,
                    limit: self.opts.max_record_bytes as u64,
                });
            }
            if len > rest - RECORD_HEAD_BYTES {
                return Err(malformed(format!(
                    "the record at byte offset {at} claims {len} bytes; the chunk has {} left",
                    rest - RECORD_HEAD_BYTES
                )));
            }
            if self.counts_by_kind.len() >= MAX_KINDS && !self.counts_by_kind.contains_key(&kind) {
                return Err(malformed(format!(
                    "the record at byte offset {at} has kind {kind}, beyond the {MAX_KINDS} \
                     distinct kinds a stream may hold"
                )));
            }
            *self.counts_by_kind.entry(kind).or_insert(0) += 1;
            *self.bytes_by_kind.entry(kind).or_insert(0) += len as u64;
            records += 1;
            pos += RECORD_HEAD_BYTES + len;
        }
        self.record_count += records;
        self.chunk_count += 1;
        self.chunk = Bytes::from(frame.payload);
        self.pos = 0;
        Ok(())
    }

    fn check_trailer(&mut self, frame: Frame) -> Result<SnapshotTrailer> {
        let offset = frame.offset;
        let t = SnapshotTrailer::decode(frame.payload.as_slice()).map_err(|source| {
            SnapshotError::Decode {
                offset,
                frame: FrameType::Trailer.name(),
                source,
            }
        })?;
        let mismatch = |what: String, trailer: u64, actual: u64| {
            Err(SnapshotError::CountMismatch {
                offset,
                what,
                trailer,
                actual,
            })
        };
        if t.total_bytes != offset {
            return mismatch("total_bytes".into(), t.total_bytes, offset);
        }
        if t.stream_crc32c != self.crcs.stream {
            return Err(SnapshotError::ChecksumMismatch {
                offset,
                frame: "stream (TRAILER stream_crc32c)",
                stored: t.stream_crc32c,
                computed: self.crcs.stream,
            });
        }
        if t.frames_crc32c != self.crcs.frames {
            return Err(SnapshotError::ChecksumMismatch {
                offset,
                frame: "frames (TRAILER frames_crc32c)",
                stored: t.frames_crc32c,
                computed: self.crcs.frames,
            });
        }
        if t.chunk_count != self.chunk_count {
            return mismatch("chunk_count".into(), t.chunk_count, self.chunk_count);
        }
        if t.record_count != self.record_count {
            return mismatch("record_count".into(), t.record_count, self.record_count);
        }
        let kinds = t.counts_by_kind.keys().chain(self.counts_by_kind.keys());
        for kind in kinds {
            let said = t.counts_by_kind.get(kind).copied().unwrap_or(0);
            let seen = self.counts_by_kind.get(kind).copied().unwrap_or(0);
            if said != seen {
                return mismatch(format!("the count of records of kind {kind}"), said, seen);
            }
        }
        Ok(t)
    }

    /// Checks that the stream ends right after the TRAILER.
    fn check_end(&mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        let n = self.read_some(&mut byte)?;
        if n != 0 {
            return Err(SnapshotError::UnexpectedFrame {
                offset: self.offset - n as u64,
                found: "data after the TRAILER frame".into(),
                expected: "the end of the stream",
            });
        }
        Ok(())
    }

    /// Reads one frame and checks its length limit and crc32c; extends the
    /// stream crc32c unless it is the TRAILER.
    fn read_frame(&mut self) -> Result<Frame> {
        let offset = self.offset;
        let mut head = [0u8; FRAME_HEAD_BYTES];
        let n = self.read_full(&mut head)?;
        if n == 0 {
            return Err(SnapshotError::Truncated {
                offset,
                what: "next frame (the stream ends before its TRAILER)",
                end: self.offset,
            });
        }
        if n < head.len() {
            return Err(SnapshotError::Truncated {
                offset,
                what: "frame head",
                end: self.offset,
            });
        }
        let Some(ty) = FrameType::from_byte(head[0]) else {
            return Err(SnapshotError::UnexpectedFrame {
                offset,
                found: format!("frame of unknown type {:#04x}", head[0]),
                expected: "a HEADER, CHUNK or TRAILER frame",
            });
        };
        let len = le_u32(&head[1..]) as usize;
        let limit = match ty {
            FrameType::Header => self.opts.max_header_bytes,
            FrameType::Chunk => self.opts.max_chunk_bytes,
            FrameType::Trailer => MAX_TRAILER_BYTES,
        };
        if len > limit {
            return Err(SnapshotError::FrameTooLarge {
                offset,
                frame: ty.name(),
                size: len as u64,
                limit: limit as u64,
            });
        }
        let what = match ty {
            FrameType::Header => "HEADER frame",
            FrameType::Chunk => "CHUNK frame",
            FrameType::Trailer => "TRAILER frame",
        };
        let mut payload = Vec::with_capacity(len.min(PREALLOCATE_LIMIT));
        let got = (&mut self.r)
            .take(len as u64)
            .read_to_end(&mut payload)
            .map_err(|source| SnapshotError::Io {
                offset: self.offset,
                source,
            })?;
        self.offset += got as u64;
        if got < len {
            return Err(SnapshotError::Truncated {
                offset,
                what,
                end: self.offset,
            });
        }
        let mut crc_bytes = [0u8; FRAME_CRC_BYTES];
        if self.read_full(&mut crc_bytes)? < FRAME_CRC_BYTES {
            return Err(SnapshotError::Truncated {
                offset,
                what,
                end: self.offset,
            });
        }
        let stored = u32::from_le_bytes(crc_bytes);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&head), &payload);
        if stored != computed {
            return Err(SnapshotError::ChecksumMismatch {
                offset,
                frame: what,
                stored,
                computed,
            });
        }
        if ty != FrameType::Trailer {
            self.crcs.add_frame(computed, len);
        }
        Ok(Frame {
            ty,
            offset,
            payload,
        })
    }

    /// Reads until `buf` is full or the stream ends; returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(filled)
    }

    /// One `read`, retried on `Interrupted`; counts the bytes consumed.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            match self.r.read(buf) {
                Ok(n) => {
                    // A misbehaving reader may claim more than it was given.
                    let n = n.min(buf.len());
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(SnapshotError::Io {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Refuses a snapshot of another cluster than `expected_cluster_id`.
pub fn check_cluster(header: &SnapshotHeader, expected_cluster_id: &str) -> Result<()> {
    if header.cluster_id != expected_cluster_id {
        return Err(SnapshotError::ClusterMismatch {
            expected: expected_cluster_id.to_string(),
            found: header.cluster_id.clone(),
        });
    }
    Ok(())
}

/// What [`verify`] found in a stream that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifySummary {
    pub header: SnapshotHeader,
    pub trailer: SnapshotTrailer,
    /// Records, by kind.
    pub counts_by_kind: BTreeMap<u32, u64>,
    /// Bytes of records (without their heads), by kind.
    pub bytes_by_kind: BTreeMap<u32, u64>,
    /// Records in all.
    pub records: u64,
    /// CHUNK frames.
    pub chunks: u64,
    /// Bytes of records (without their heads) in all.
    pub record_bytes: u64,
    /// Bytes of the whole stream, TRAILER included.
    pub stream_bytes: u64,
}

/// Reads a whole stream through every check of [`SnapshotReader`] and
/// summarizes it. Holds one chunk at a time.
pub fn verify<R: Read>(r: R, opts: ReaderOptions) -> Result<VerifySummary> {
    let (mut reader, header) = SnapshotReader::open(r, opts)?;
    while reader.next_record()?.is_some() {}
    let trailer = match &reader.state {
        State::Done(t) => t.clone(),
        // next_record returns Ok(None) only in State::Done.
        _ => {
            return Err(SnapshotError::Poisoned {
                side: "reader",
                offset: reader.offset,
            })
        }
    };
    Ok(VerifySummary {
        header,
        records: reader.record_count,
        chunks: reader.chunk_count,
        record_bytes: reader.bytes_by_kind.values().sum(),
        counts_by_kind: std::mem::take(&mut reader.counts_by_kind),
        bytes_by_kind: std::mem::take(&mut reader.bytes_by_kind),
        stream_bytes: reader.offset,
        trailer,
    })
}
