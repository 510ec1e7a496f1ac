//! Frames as the unit of transport.
//!
//! A snapshot sent over gRPC (or any message transport) goes as a sequence
//! of pieces, each a self-checking unit that can be one message:
//!
//! - piece 0: the magic followed by the HEADER frame;
//! - every later piece: exactly one frame (a CHUNK, and last the TRAILER).
//!
//! The sender puts a [`FrameSplitter`] under a [`crate::SnapshotWriter`]
//! (it is a [`std::io::Write`]) and gets each piece handed to a callback as
//! soon as it is complete, e.g. to send it on a bounded channel. The
//! receiver needs nothing but a [`std::io::Read`] over the pieces in order:
//! [`PieceReader`] turns any iterator of pieces (a channel's receiver) into
//! one, and a [`crate::SnapshotReader`] on top checks everything as for a
//! file. Pieces need not be re-split or checked on arrival; a missing,
//! reordered, duplicated or damaged piece makes the reader fail.
//!
//! A piece is at most `max_chunk_bytes + 9` bytes; with the default record
//! limit (64 MiB) that is above gRPC's default message limit (4 MiB), so a
//! transport that carries large records raises its message limit, or the
//! content owner keeps records small (the chunk target, 1 MiB by default,
//! only bounds chunks of small records).

use std::io::{self, Read, Write};

use bytes::Bytes;

use crate::format::{
    FrameType, DEFAULT_MAX_RECORD_BYTES, FRAME_CRC_BYTES, FRAME_HEAD_BYTES, MAGIC,
    RECORD_HEAD_BYTES,
};

/// A [`Write`] that cuts the encoded stream written into it into pieces (see
/// the module docs) and hands each complete piece to `sink`.
///
/// It buffers one frame at a time. It does not check crc32cs (the reader
/// does) but refuses a frame longer than its limit and an unknown frame type
/// with [`io::ErrorKind::InvalidData`], so a misuse cannot make it buffer
/// without bound.
pub struct FrameSplitter<F> {
    sink: F,
    max_frame_bytes: usize,
    /// The piece being assembled.
    buf: Vec<u8>,
    /// Bytes `buf` must hold before the current step is complete.
    want: usize,
    step: Step,
    pieces: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Magic,
    /// `buf[head_at..]` is (becoming) a frame head.
    Head {
        head_at: usize,
    },
    Body {
        trailer: bool,
    },
    /// The TRAILER has been handed out; nothing more may be written.
    Ended,
}

impl<F: FnMut(Bytes) -> io::Result<()>> FrameSplitter<F> {
    /// A splitter accepting frame payloads up to the default reader's chunk
    /// limit (`DEFAULT_MAX_RECORD_BYTES + 8`).
    pub fn new(sink: F) -> Self {
        Self::with_max_frame_bytes(sink, DEFAULT_MAX_RECORD_BYTES + RECORD_HEAD_BYTES)
    }

    /// A splitter accepting frame payloads up to `max_frame_bytes`.
    pub fn with_max_frame_bytes(sink: F, max_frame_bytes: usize) -> Self {
        FrameSplitter {
            sink,
            max_frame_bytes,
            buf: Vec::new(),
            want: MAGIC.len(),
            step: Step::Magic,
            pieces: 0,
        }
    }

    /// Pieces handed to the sink so far.
    pub fn pieces(&self) -> u64 {
        self.pieces
    }

    /// Whether the TRAILER has been handed to the sink.
    pub fn is_complete(&self) -> bool {
        self.step == Step::Ended
    }

    /// Returns the sink once the whole stream, TRAILER included, has been
    /// handed to it; fails if a piece is incomplete or the TRAILER is
    /// missing.
    pub fn finish(self) -> io::Result<F> {
        if self.step != Step::Ended {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "snapshot stream incomplete: {} pieces handed out, {} bytes of the next \
                     pending, no TRAILER yet",
                    self.pieces,
                    self.buf.len()
                ),
            ));
        }
        Ok(self.sink)
    }

    fn invalid(msg: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    /// Called when `buf` holds `want` bytes: moves to the next step, handing
    /// out a piece when a frame is complete.
    fn step_done(&mut self) -> io::Result<()> {
        match self.step {
            Step::Magic => {
                self.step = Step::Head {
                    head_at: self.buf.len(),
                };
                self.want = self.buf.len() + FRAME_HEAD_BYTES;
            }
            Step::Head { head_at } => {
                let head = &self.buf[head_at..head_at + FRAME_HEAD_BYTES];
                let ty = FrameType::from_byte(head[0]).ok_or_else(|| {
                    Self::invalid(format!("unknown snapshot frame type {:#04x}", head[0]))
                })?;
                let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
                if len > self.max_frame_bytes {
                    return Err(Self::invalid(format!(
                        "snapshot {} frame of {len} bytes is over the limit of {} bytes",
                        ty.name(),
                        self.max_frame_bytes
                    )));
                }
                self.want = self.buf.len() + len + FRAME_CRC_BYTES;
                self.buf.reserve_exact(len + FRAME_CRC_BYTES);
                self.step = Step::Body {
                    trailer: ty == FrameType::Trailer,
                };
            }
            Step::Body { trailer } => {
                let piece = Bytes::from(std::mem::take(&mut self.buf));
                (self.sink)(piece)?;
                self.pieces += 1;
                if trailer {
                    self.step = Step::Ended;
                    self.want = 0;
                } else {
                    self.step = Step::Head { head_at: 0 };
                    self.want = FRAME_HEAD_BYTES;
                }
            }
            Step::Ended => {}
        }
        Ok(())
    }
}

impl<F: FnMut(Bytes) -> io::Result<()>> Write for FrameSplitter<F> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            if self.step == Step::Ended {
                return Err(Self::invalid(format!(
                    "{} bytes written after the snapshot's TRAILER",
                    data.len()
                )));
            }
            let n = (self.want - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.want {
                self.step_done()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Read`] over pieces of a stream arriving in order, e.g. the messages
/// of a gRPC stream forwarded to a channel: `PieceReader::new(rx.into_iter())`
/// with a `std::sync::mpsc::Receiver<io::Result<Bytes>>`, or
/// `std::iter::from_fn(|| rx.blocking_recv())` with a tokio receiver. The
/// stream ends when the iterator does; an `Err` item is returned as a read
/// error (a broken transport).
pub struct PieceReader<I> {
    pieces: I,
    current: Bytes,
}

impl<I: Iterator<Item = io::Result<Bytes>>> PieceReader<I> {
    pub fn new(pieces: I) -> Self {
        PieceReader {
            pieces,
            current: Bytes::new(),
        }
    }
}

impl<I: Iterator<Item = io::Result<Bytes>>> Read for PieceReader<I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            match self.pieces.next() {
                Some(piece) => self.current = piece?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
