//! Constants and frame encoding of the snapshot stream.
//!
//! Layout of one frame (all integers little-endian):
//!
//! ```text
//! +--------+-------------------+------------------+-------------------+
//! | type   | length            | payload          | crc32c            |
//! | 1 byte | 4 bytes (u32)     | length bytes     | 4 bytes (u32)     |
//! +--------+-------------------+------------------+-------------------+
//! ```
//!
//! The crc32c (Castagnoli) covers the type byte, the four length bytes and
//! the payload. A CHUNK payload is one or more records:
//!
//! ```text
//! +---------------+---------------+--------------+
//! | kind (u32)    | length (u32)  | bytes        |
//! +---------------+---------------+--------------+
//! ```
//!
//! What is fixed forever, whatever [`FORMAT_VERSION`] becomes: the magic,
//! this frame layout, HEADER being the first frame, and field 1
//! (`format_version`) of the HEADER's protobuf message. A reader of any
//! version can therefore always tell which version a stream has.

/// The first eight bytes of every snapshot stream.
pub const MAGIC: [u8; 8] = *b"RPLGSNAP";

/// The stream format this crate writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before a frame's payload: type (1) and length (4).
pub const FRAME_HEAD_BYTES: usize = 5;
/// Bytes after a frame's payload: its crc32c.
pub const FRAME_CRC_BYTES: usize = 4;
/// Bytes before a record's bytes in a chunk: kind (4) and length (4).
pub const RECORD_HEAD_BYTES: usize = 8;

/// Default payload size a writer fills a chunk up to before emitting it.
pub const DEFAULT_CHUNK_TARGET_BYTES: usize = 1 << 20;
/// Default hard limit on one record, on write and on read.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 << 20;
/// Default limit on the HEADER payload, on write and on read.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 1 << 20;
/// Limit on the TRAILER payload (fixed: its size follows from [`MAX_KINDS`]).
pub const MAX_TRAILER_BYTES: usize = 1 << 20;
/// Most distinct record kinds one stream may hold. Bounds the memory of the
/// per-kind counts and the TRAILER's size (at most ~80 KiB).
pub const MAX_KINDS: usize = 4096;

/// Largest payload a u32 length can describe.
pub(crate) const MAX_FRAME_LENGTH: usize = u32::MAX as usize;

/// The type byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// The first frame: a `SnapshotHeader`.
    Header = 1,
    /// Records; zero or more of these follow the HEADER.
    Chunk = 2,
    /// The last frame: a `SnapshotTrailer`.
    Trailer = 3,
}

impl FrameType {
    /// The frame type of a type byte, if it is one.
    pub fn from_byte(b: u8) -> Option<FrameType> {
        match b {
            1 => Some(FrameType::Header),
            2 => Some(FrameType::Chunk),
            3 => Some(FrameType::Trailer),
            _ => None,
        }
    }

    /// The name the format (and error messages) use for it.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Header => "HEADER",
            FrameType::Chunk => "CHUNK",
            FrameType::Trailer => "TRAILER",
        }
    }
}

/// The frame head: type byte and little-endian payload length.
pub(crate) fn frame_head(ty: FrameType, len: u32) -> [u8; FRAME_HEAD_BYTES] {
    let l = len.to_le_bytes();
    [ty as u8, l[0], l[1], l[2], l[3]]
}

/// A record head: little-endian kind and length.
pub(crate) fn record_head(kind: u32, len: u32) -> [u8; RECORD_HEAD_BYTES] {
    let mut h = [0u8; RECORD_HEAD_BYTES];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[4..].copy_from_slice(&len.to_le_bytes());
    h
}

/// A whole frame (head, payload, crc32c). The caller has checked that the
/// payload fits a u32 length.
pub(crate) fn encode_frame(ty: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEAD_BYTES + payload.len() + FRAME_CRC_BYTES);
    out.extend_from_slice(&frame_head(ty, payload.len() as u32));
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The two running checksums of the TRAILER, over the bytes before it.
///
/// `stream` is the crc32c of every byte (magic, and every frame with its
/// own crc32c): what the bytes on disk must hash to. Because every frame
/// ends with the crc32c of its other bytes, a CRC over whole frames depends
/// only on the frame lengths once each frame's crc32c is right: intact
/// frames of equal length reordered, or replaced by frames of another
/// stream, leave it unchanged. `frames` is therefore kept as well: the
/// crc32c of every frame *without* its trailing crc32c (type, length,
/// payload), which changes with any such reordering or replacement.
///
/// Both are extended from the frame's own crc32c in O(log n), with no
/// second pass over the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StreamCrcs {
    pub stream: u32,
    pub frames: u32,
}

impl StreamCrcs {
    /// The checksums of a stream holding only the magic.
    pub fn after_magic() -> Self {
        StreamCrcs {
            stream: crc32c::crc32c(&MAGIC),
            frames: 0,
        }
    }

    /// Extends both by a frame with `payload_len` bytes of payload whose
    /// type, length and payload have crc32c `frame_crc` (the frame's own
    /// checksum).
    pub fn add_frame(&mut self, frame_crc: u32, payload_len: usize) {
        let body_len = FRAME_HEAD_BYTES + payload_len;
        let whole = crc32c::crc32c_append(frame_crc, &frame_crc.to_le_bytes());
        self.stream = crc32c::crc32c_combine(self.stream, whole, body_len + FRAME_CRC_BYTES);
        self.frames = crc32c::crc32c_combine(self.frames, frame_crc, body_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types_round_trip() {
        for t in [FrameType::Header, FrameType::Chunk, FrameType::Trailer] {
            assert_eq!(FrameType::from_byte(t as u8), Some(t));
        }
        assert_eq!(FrameType::from_byte(0), None);
        assert_eq!(FrameType::from_byte(4), None);
    }

    #[test]
    fn combined_crcs_equal_a_second_pass() {
        let mut stream = MAGIC.to_vec();
        let mut bodies = Vec::new();
        let mut crcs = StreamCrcs::after_magic();
        assert_eq!(crcs.stream, crc32c::crc32c(&stream));
        for (ty, payload) in [
            (FrameType::Header, &b"header"[..]),
            (FrameType::Chunk, &[7u8; 3000][..]),
            (FrameType::Chunk, &b""[..]),
        ] {
            let frame = encode_frame(ty, payload);
            let body = &frame[..frame.len() - FRAME_CRC_BYTES];
            crcs.add_frame(crc32c::crc32c(body), payload.len());
            stream.extend_from_slice(&frame);
            bodies.extend_from_slice(body);
            assert_eq!(crcs.stream, crc32c::crc32c(&stream));
            assert_eq!(crcs.frames, crc32c::crc32c(&bodies));
        }
    }

    #[test]
    fn whole_stream_crc_cannot_see_reordered_frames_but_frames_crc_can() {
        let a = encode_frame(FrameType::Chunk, b"first chunk!");
        let b = encode_frame(FrameType::Chunk, b"other chunk?");
        let crcs = |frames: [&Vec<u8>; 2]| {
            let mut c = StreamCrcs::after_magic();
            for f in frames {
                c.add_frame(crc32c::crc32c(&f[..f.len() - 4]), f.len() - 9);
            }
            c
        };
        let (ab, ba) = (crcs([&a, &b]), crcs([&b, &a]));
        assert_eq!(ab.stream, ba.stream, "a CRC over self-checked frames");
        assert_ne!(ab.frames, ba.frames);
    }
}
