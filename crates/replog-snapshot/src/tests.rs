//! Tests of the whole format: round trips, chunking, every check of the
//! reader, corruption and truncation sweeps, transport pieces.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use crate::format::encode_frame;
use crate::*;

fn header() -> SnapshotHeader {
    SnapshotHeader {
        format_version: 0,
        cluster_id: "cluster-a".into(),
        position: 1234,
        term: 7,
        voters: vec![1, 2, 3],
        learners: vec![4],
        created_at_unix_ms: 1_700_000_000_000,
        content: "replog.state.v1".into(),
        labels: [("host", "r1"), ("reason", "test")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn opts(chunk_target_bytes: usize) -> WriterOptions {
    WriterOptions {
        chunk_target_bytes,
        ..WriterOptions::default()
    }
}

type Records = Vec<(u32, Vec<u8>)>;

fn write(records: &[(u32, Vec<u8>)], o: WriterOptions) -> (Vec<u8>, SnapshotTrailer) {
    let mut w = SnapshotWriter::new(Vec::new(), &header(), o).unwrap();
    for (kind, r) in records {
        w.push(*kind, r).unwrap();
    }
    w.finish().unwrap()
}

/// Reads a whole stream; returns the records handed out (also those before
/// an error) and the outcome.
fn read_all(
    bytes: &[u8],
    o: ReaderOptions,
) -> (Records, Result<(SnapshotHeader, SnapshotTrailer)>) {
    let mut got = Vec::new();
    let (mut r, h) = match SnapshotReader::open(bytes, o) {
        Ok(x) => x,
        Err(e) => return (got, Err(e)),
    };
    loop {
        match r.next_record() {
            Ok(Some((k, b))) => got.push((k, b.to_vec())),
            Ok(None) => {
                let t = r.trailer().cloned().expect("trailer after None");
                return (got, Ok((h, t)));
            }
            Err(e) => return (got, Err(e)),
        }
    }
}

fn sample_records(n: usize) -> Records {
    (0..n)
        .map(|i| {
            let kind = (i % 4) as u32 + 1;
            let len = match i % 7 {
                0 => 0,
                1 => 1,
                2 => 100,
                3 => 700,
                4 => 3000,
                5 => 5000, // over the 4 KiB chunk target used below
                _ => i % 300,
            };
            (kind, (0..len).map(|j| (i * 31 + j) as u8).collect())
        })
        .collect()
}

/// (offset, type byte, payload length) of each frame of a well-formed stream.
fn frames(stream: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut at = MAGIC.len();
    while at < stream.len() {
        let len = u32::from_le_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push((at, stream[at], len));
        at += FRAME_HEAD_BYTES + len + FRAME_CRC_BYTES;
    }
    out
}

/// A stream with the TRAILER replaced by `f(trailer)`, re-framed with a
/// correct frame crc32c.
fn with_trailer(stream: &[u8], f: impl FnOnce(&mut SnapshotTrailer)) -> Vec<u8> {
    let (at, ty, len) = *frames(stream).last().unwrap();
    assert_eq!(ty, FrameType::Trailer as u8);
    let mut t =
        SnapshotTrailer::decode(&stream[at + FRAME_HEAD_BYTES..at + FRAME_HEAD_BYTES + len])
            .unwrap();
    f(&mut t);
    let mut out = stream[..at].to_vec();
    out.extend_from_slice(&encode_frame(FrameType::Trailer, &t.encode_to_vec()));
    out
}

/// A TRAILER frame that matches `prefix` (magic and frames) exactly.
fn trailer_for(prefix: &[u8], chunks: u64, counts: &[(u32, u64)]) -> Vec<u8> {
    let mut bodies = Vec::new();
    for (at, _, len) in frames(prefix) {
        bodies.extend_from_slice(&prefix[at..at + FRAME_HEAD_BYTES + len]);
    }
    let t = SnapshotTrailer {
        record_count: counts.iter().map(|c| c.1).sum(),
        chunk_count: chunks,
        counts_by_kind: counts.iter().copied().collect(),
        total_bytes: prefix.len() as u64,
        stream_crc32c: crc32c::crc32c(prefix),
        frames_crc32c: crc32c::crc32c(&bodies),
    };
    encode_frame(FrameType::Trailer, &t.encode_to_vec())
}

fn header_frame(h: &SnapshotHeader) -> Vec<u8> {
    encode_frame(FrameType::Header, &h.encode_to_vec())
}

fn versioned(v: u32) -> SnapshotHeader {
    SnapshotHeader {
        format_version: v,
        ..header()
    }
}

/// A crafted stream: magic, the given frames, and a TRAILER matching them.
fn crafted(frames: &[Vec<u8>], chunks: u64, counts: &[(u32, u64)]) -> Vec<u8> {
    let mut s = MAGIC.to_vec();
    for f in frames {
        s.extend_from_slice(f);
    }
    let t = trailer_for(&s, chunks, counts);
    s.extend_from_slice(&t);
    s
}

fn chunk_of(records: &[(u32, &[u8])]) -> Vec<u8> {
    let mut p = Vec::new();
    for (k, r) in records {
        p.extend_from_slice(&k.to_le_bytes());
        p.extend_from_slice(&(r.len() as u32).to_le_bytes());
        p.extend_from_slice(r);
    }
    encode_frame(FrameType::Chunk, &p)
}

fn read_err(bytes: &[u8]) -> SnapshotError {
    match read_all(bytes, ReaderOptions::default()).1 {
        Ok(_) => panic!("stream was accepted"),
        Err(e) => e,
    }
}

// ------------------------------------------------------------ round trips

#[test]
fn round_trip_many_records_of_several_kinds_and_sizes() {
    let records = sample_records(2000);
    let (bytes, trailer) = write(&records, opts(4096));
    let (got, end) = read_all(&bytes, ReaderOptions::default());
    let (h, t) = end.unwrap();
    assert_eq!(got, records);
    assert_eq!(h, versioned(FORMAT_VERSION));
    assert_eq!(t, trailer);
    assert_eq!(t.record_count, 2000);
    assert_eq!(
        t.counts_by_kind,
        [(1, 500), (2, 500), (3, 500), (4, 500)].into()
    );
    assert_eq!(t.total_bytes as usize, frames(&bytes).last().unwrap().0);
    let chunks = frames(&bytes).iter().filter(|f| f.1 == 2).count();
    assert_eq!(t.chunk_count as usize, chunks);
    for (_, ty, len) in frames(&bytes) {
        // A chunk is at most the target, unless it holds one large record.
        assert!(
            ty != 2 || len <= 4096 || len == 5008,
            "chunk of {len} bytes"
        );
    }
}

#[test]
fn round_trip_with_default_options() {
    let records = sample_records(300);
    let (bytes, _) = write(&records, WriterOptions::default());
    let (got, end) = read_all(&bytes, ReaderOptions::default());
    end.unwrap();
    assert_eq!(got, records);
    assert_eq!(
        frames(&bytes).len(),
        3,
        "one HEADER, one CHUNK, one TRAILER"
    );
}

#[test]
fn zero_records() {
    let (bytes, t) = write(&[], WriterOptions::default());
    assert_eq!((t.record_count, t.chunk_count), (0, 0));
    assert!(t.counts_by_kind.is_empty());
    let (got, end) = read_all(&bytes, ReaderOptions::default());
    assert!(got.is_empty());
    assert_eq!(end.unwrap().1, t);
    let types: Vec<u8> = frames(&bytes).iter().map(|f| f.1).collect();
    assert_eq!(types, [1, 3]);
}

#[test]
fn record_larger_than_the_chunk_target_gets_a_chunk_of_its_own() {
    let big = vec![9u8; 10_000];
    let records = vec![
        (1, vec![1; 10]),
        (2, big.clone()),
        (1, vec![2; 10]),
        (3, Vec::new()),
    ];
    let (bytes, t) = write(&records, opts(100));
    let chunk_lens: Vec<usize> = frames(&bytes)
        .iter()
        .filter(|f| f.1 == 2)
        .map(|f| f.2)
        .collect();
    assert_eq!(chunk_lens, [18, 10_008, 26]);
    assert_eq!(t.chunk_count, 3);
    let (got, end) = read_all(&bytes, ReaderOptions::default());
    end.unwrap();
    assert_eq!(got, records);
}

#[test]
fn chunks_fill_up_to_the_target() {
    // 48 bytes per record (8 head + 40): two fit in 100, a third does not.
    let records: Records = (0..5).map(|i| (7, vec![i; 40])).collect();
    let (bytes, _) = write(&records, opts(100));
    let lens: Vec<usize> = frames(&bytes)
        .iter()
        .filter(|f| f.1 == 2)
        .map(|f| f.2)
        .collect();
    assert_eq!(lens, [96, 96, 48]);
    // A chunk filled exactly to the target is emitted at once.
    let records: Records = (0..3).map(|i| (7, vec![i; 92])).collect();
    let mut w = SnapshotWriter::new(Vec::new(), &header(), opts(100)).unwrap();
    let before = w.bytes_written();
    w.push(7, &records[0].1).unwrap();
    assert_eq!(w.bytes_written(), before + 109);
    // Target 0: every record in a chunk of its own.
    let (bytes, t) = write(&records, opts(0));
    assert_eq!(t.chunk_count, 3);
    assert_eq!(read_all(&bytes, ReaderOptions::default()).0, records);
}

#[test]
fn same_input_same_bytes() {
    let records = sample_records(200);
    let a = write(&records, opts(1000)).0;
    let b = write(&records, opts(1000)).0;
    assert_eq!(a, b);
}

#[test]
fn reads_short_reads_and_interrupts() {
    /// Hands out one byte per read, with an `Interrupted` before every
    /// other byte.
    struct Trickle<'a>(&'a [u8], bool);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = !self.1;
            if self.1 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }
    let records = sample_records(40);
    let (bytes, _) = write(&records, opts(2000));
    let summary = verify(Trickle(&bytes, false), ReaderOptions::default()).unwrap();
    assert_eq!(summary.records, 40);
    assert_eq!(summary.stream_bytes as usize, bytes.len());
}

#[test]
fn verify_summarizes() {
    let records = sample_records(100);
    let (bytes, trailer) = write(&records, opts(4096));
    let s = verify(&bytes[..], ReaderOptions::default()).unwrap();
    assert_eq!(s.header, versioned(FORMAT_VERSION));
    assert_eq!(s.trailer, trailer);
    assert_eq!(s.records, 100);
    assert_eq!(s.chunks, trailer.chunk_count);
    assert_eq!(s.counts_by_kind, trailer.counts_by_kind);
    let mut bytes_by_kind = BTreeMap::new();
    for (k, r) in &records {
        *bytes_by_kind.entry(*k).or_insert(0u64) += r.len() as u64;
    }
    assert_eq!(s.bytes_by_kind, bytes_by_kind);
    assert_eq!(s.record_bytes, bytes_by_kind.values().sum::<u64>());
    assert_eq!(s.stream_bytes as usize, bytes.len());
}

// ------------------------------------------------------------ writer checks

#[test]
fn writer_refuses_a_record_over_the_limit_and_stays_usable() {
    let o = WriterOptions {
        chunk_target_bytes: 50,
        max_record_bytes: 100,
        ..WriterOptions::default()
    };
    let mut w = SnapshotWriter::new(Vec::new(), &header(), o).unwrap();
    w.push(1, &[0; 100]).unwrap();
    let e = w.push(2, &[0; 101]).unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::RecordTooLarge {
                kind: 2,
                size: 101,
                limit: 100,
                ..
            }
        ),
        "{e}"
    );
    w.push(3, b"after").unwrap();
    let (bytes, t) = w.finish().unwrap();
    assert_eq!(t.record_count, 2);
    assert_eq!(read_all(&bytes, ReaderOptions::default()).0.len(), 2);
}

#[test]
fn writer_refuses_bad_options_and_headers() {
    let bad = [
        WriterOptions {
            chunk_target_bytes: 1000,
            max_record_bytes: 100,
            ..WriterOptions::default()
        },
        WriterOptions {
            max_record_bytes: u32::MAX as usize,
            ..WriterOptions::default()
        },
    ];
    for o in bad {
        let e = SnapshotWriter::new(Vec::new(), &header(), o).unwrap_err();
        assert!(matches!(e, SnapshotError::InvalidInput { .. }), "{e}");
    }
    let e = SnapshotWriter::new(Vec::new(), &versioned(2), WriterOptions::default()).unwrap_err();
    assert!(e.to_string().contains("format version 2"), "{e}");
    let mut big = header();
    big.labels.insert("big".into(), "x".repeat(2 << 20));
    let e = SnapshotWriter::new(Vec::new(), &big, WriterOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::FrameTooLarge {
                offset: 8,
                frame: "HEADER",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn writer_limits_distinct_kinds() {
    let mut w = SnapshotWriter::new(Vec::new(), &header(), opts(1 << 16)).unwrap();
    for k in 0..MAX_KINDS as u32 {
        w.push(k, b"").unwrap();
    }
    let e = w.push(MAX_KINDS as u32, b"").unwrap_err();
    assert!(matches!(e, SnapshotError::InvalidInput { .. }), "{e}");
    w.push(0, b"known kind").unwrap();
    let (bytes, t) = w.finish().unwrap();
    assert_eq!(t.counts_by_kind.len(), MAX_KINDS);
    let s = verify(&bytes[..], ReaderOptions::default()).unwrap();
    assert_eq!(s.records, MAX_KINDS as u64 + 1);
}

#[test]
fn writer_is_poisoned_by_a_failed_write() {
    /// Accepts `left` bytes, then fails.
    #[derive(Debug)]
    struct Failing {
        left: usize,
    }
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = SnapshotWriter::new(Failing { left: 200 }, &header(), opts(100)).unwrap();
    let mut failed = None;
    for i in 0..10 {
        if let Err(e) = w.push(1, &[i; 60]) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a write failed");
    assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
    assert!(e.to_string().contains("disk full"), "{e}");
    let e = w.push(1, b"x").unwrap_err();
    assert!(
        matches!(e, SnapshotError::Poisoned { side: "writer", .. }),
        "{e}"
    );
    let e = w.finish().unwrap_err();
    assert!(matches!(e, SnapshotError::Poisoned { .. }), "{e}");
}

// ------------------------------------------------------------ reader checks

#[test]
fn wrong_magic() {
    let (mut bytes, _) = write(&sample_records(3), WriterOptions::default());
    bytes[0] = b'X';
    let e = read_err(&bytes);
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");
    assert!(e.is_corruption());
    let e = read_err(b"{\"json\": true}");
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a replog snapshot"), "{e}");
    let e = read_err(b"ab");
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");
    let e = read_err(b"");
    assert!(
        matches!(
            e,
            SnapshotError::Truncated {
                offset: 0,
                what: "magic",
                end: 0
            }
        ),
        "{e}"
    );
    let e = read_err(b"RPLG");
    assert!(matches!(e, SnapshotError::Truncated { end: 4, .. }), "{e}");
}

#[test]
fn future_format_version_is_refused() {
    let s = crafted(&[header_frame(&versioned(2))], 0, &[]);
    let e = read_err(&s);
    assert!(
        matches!(
            e,
            SnapshotError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("format version 2"), "{e}");
    let s = crafted(&[header_frame(&versioned(0))], 0, &[]);
    let e = read_err(&s);
    assert!(
        matches!(e, SnapshotError::UnsupportedVersion { found: 0, .. }),
        "{e}"
    );
    // The crafted helper itself makes valid streams.
    let s = crafted(
        &[header_frame(&versioned(1)), chunk_of(&[(5, b"x")])],
        1,
        &[(5, 1)],
    );
    assert_eq!(
        read_all(&s, ReaderOptions::default()).0,
        [(5, b"x".to_vec())]
    );
}

#[test]
fn trailer_that_disagrees_is_refused() {
    let records = sample_records(50);
    let (bytes, _) = write(&records, opts(1000));
    let trailer_at = frames(&bytes).last().unwrap().0 as u64;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            with_trailer(&bytes, |t| t.record_count += 1),
            "record_count",
        ),
        (with_trailer(&bytes, |t| t.chunk_count -= 1), "chunk_count"),
        (
            with_trailer(&bytes, |t| *t.counts_by_kind.get_mut(&1).unwrap() += 1),
            "kind 1",
        ),
        (
            with_trailer(&bytes, |t| {
                t.counts_by_kind.insert(99, 0);
                *t.counts_by_kind.get_mut(&2).unwrap() -= 1;
                *t.counts_by_kind.get_mut(&3).unwrap() += 1;
            }),
            "kind 2",
        ),
        (with_trailer(&bytes, |t| t.total_bytes -= 1), "total_bytes"),
    ];
    for (s, what) in cases {
        let (got, end) = read_all(&s, ReaderOptions::default());
        assert_eq!(got, records, "records are handed out before the trailer");
        let e = end.unwrap_err();
        assert!(
            matches!(&e, SnapshotError::CountMismatch { offset, .. } if *offset == trailer_at),
            "{e}"
        );
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    let s = with_trailer(&bytes, |t| t.stream_crc32c ^= 1);
    let e = read_err(&s);
    assert!(
        matches!(
            e,
            SnapshotError::ChecksumMismatch {
                frame: "stream (TRAILER stream_crc32c)",
                ..
            }
        ),
        "{e}"
    );
    let s = with_trailer(&bytes, |t| t.frames_crc32c ^= 1);
    let e = read_err(&s);
    assert!(
        matches!(
            e,
            SnapshotError::ChecksumMismatch {
                frame: "frames (TRAILER frames_crc32c)",
                ..
            }
        ),
        "{e}"
    );
    // A zero count for a kind that has no record is the same as no entry.
    let s = with_trailer(&bytes, |t| {
        t.counts_by_kind.insert(77, 0);
    });
    read_all(&s, ReaderOptions::default()).1.unwrap();
}

#[test]
fn data_after_the_trailer_is_refused() {
    let (bytes, _) = write(&sample_records(5), WriterOptions::default());
    for extra in [&[0u8][..], &bytes[..], &bytes[8..]] {
        let mut s = bytes.clone();
        s.extend_from_slice(extra);
        let e = read_err(&s);
        assert!(
            matches!(&e, SnapshotError::UnexpectedFrame { offset, .. } if *offset as usize == bytes.len()),
            "{e}"
        );
        assert!(e.to_string().contains("after the TRAILER"), "{e}");
    }
}

#[test]
fn frames_out_of_order_are_refused() {
    let h = header_frame(&versioned(1));
    let c = chunk_of(&[(1, b"abc")]);
    // CHUNK before HEADER, TRAILER first, two HEADERs.
    for (frames, chunks, counts, found) in [
        (vec![c.clone(), h.clone()], 1, vec![(1, 1)], "CHUNK"),
        (vec![], 0, vec![], "TRAILER"),
        (vec![h.clone(), h.clone()], 0, vec![], "second HEADER"),
        (
            vec![h.clone(), c.clone(), h.clone()],
            1,
            vec![(1, 1)],
            "second HEADER",
        ),
    ] {
        let s = crafted(&frames, chunks, &counts);
        let e = read_err(&s);
        assert!(matches!(e, SnapshotError::UnexpectedFrame { .. }), "{e}");
        assert!(e.to_string().contains(found), "{found}: {e}");
    }
    // A frame of unknown type with a correct crc32c.
    let s = crafted(&[h.clone(), encode_frame_raw(9, b"??")], 0, &[]);
    let e = read_err(&s);
    assert!(e.to_string().contains("unknown type 0x09"), "{e}");
}

fn encode_frame_raw(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_frame(FrameType::Chunk, payload);
    f[0] = ty;
    let n = f.len() - FRAME_CRC_BYTES;
    let crc = crc32c::crc32c(&f[..n]);
    f[n..].copy_from_slice(&crc.to_le_bytes());
    f
}

#[test]
fn malformed_chunks_are_refused() {
    let h = header_frame(&versioned(1));
    let mut past_end = chunk_of(&[(1, b"abcd")]);
    // Claim 5 bytes where there are 4 (and fix the crc32c).
    past_end[FRAME_HEAD_BYTES + 4] = 5;
    let n = past_end.len() - FRAME_CRC_BYTES;
    let crc = crc32c::crc32c(&past_end[..n]);
    past_end[n..].copy_from_slice(&crc.to_le_bytes());
    let cases = [
        (encode_frame(FrameType::Chunk, b""), "no record"),
        (
            encode_frame(FrameType::Chunk, &[1, 0, 0, 0, 0]),
            "record head",
        ),
        (past_end, "claims 5 bytes"),
    ];
    for (chunk, why) in cases {
        let s = crafted(&[h.clone(), chunk], 1, &[(1, 1)]);
        let e = read_err(&s);
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    offset: 30..,
                    frame: "CHUNK",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(why), "{why}: {e}");
    }
}

/// Intact chunks of equal length, reordered or taken from another stream,
/// pass every frame's crc32c and even the whole-stream crc32c (a CRC over
/// self-checked frames depends only on their lengths); `frames_crc32c`
/// catches them.
#[test]
fn reordered_or_replaced_chunks_fail_the_frames_checksum() {
    let records: Records = (0..4).map(|i| (1, vec![i; 40])).collect();
    let (bytes, _) = write(&records, opts(50));
    let f = frames(&bytes);
    let (a, b) = (f[1], f[2]);
    assert_eq!((a.1, b.1, a.2, b.2), (2, 2, 48, 48));
    let mut s = bytes.clone();
    let a_end = a.0 + a.2 + 9;
    let b_end = b.0 + b.2 + 9;
    s[a.0..b_end].copy_from_slice(&[&bytes[b.0..b_end], &bytes[a.0..a_end]].concat());
    let (got, end) = read_all(&s, ReaderOptions::default());
    assert_eq!(got.len(), 4, "every frame checks out on its own");
    let e = end.unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::ChecksumMismatch {
                frame: "frames (TRAILER frames_crc32c)",
                ..
            }
        ),
        "{e}"
    );
    // A chunk of another stream with the same length.
    let other: Records = (0..4).map(|i| (1, vec![i + 10; 40])).collect();
    let (other, _) = write(&other, opts(50));
    let mut s = bytes.clone();
    s[a.0..a_end].copy_from_slice(&other[a.0..a_end]);
    let e = read_err(&s);
    assert!(
        matches!(
            e,
            SnapshotError::ChecksumMismatch {
                frame: "frames (TRAILER frames_crc32c)",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn lengths_are_checked_before_allocating() {
    // A HEADER claiming 4 GiB, followed by nothing.
    let mut s = MAGIC.to_vec();
    s.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff]);
    let e = read_err(&s);
    assert!(
        matches!(e, SnapshotError::FrameTooLarge { offset: 8, frame: "HEADER", size: 0xffff_ffff, limit } if limit == DEFAULT_MAX_HEADER_BYTES as u64),
        "{e}"
    );
    assert!(e.to_string().contains("at byte offset 8"), "{e}");
    // A CHUNK over the reader's chunk limit.
    let (bytes, _) = write(&[(1, vec![0; 5000])], WriterOptions::default());
    let o = ReaderOptions {
        max_chunk_bytes: 4000,
        ..ReaderOptions::default()
    };
    let e = read_all(&bytes, o).1.unwrap_err();
    assert!(
        matches!(e, SnapshotError::FrameTooLarge { frame: "CHUNK", .. }),
        "{e}"
    );
    // A record over the reader's record limit.
    let o = ReaderOptions {
        max_record_bytes: 4999,
        ..ReaderOptions::default()
    };
    let e = read_all(&bytes, o).1.unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::RecordTooLarge {
                kind: 1,
                size: 5000,
                limit: 4999,
                ..
            }
        ),
        "{e}"
    );
    // A TRAILER over its fixed limit.
    let (mut bytes, _) = write(&[], WriterOptions::default());
    let at = frames(&bytes).last().unwrap().0;
    bytes[at + 1..at + 5].copy_from_slice(&(MAX_TRAILER_BYTES as u32 + 1).to_le_bytes());
    let e = read_err(&bytes);
    assert!(
        matches!(
            e,
            SnapshotError::FrameTooLarge {
                frame: "TRAILER",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cluster_mismatch() {
    let (bytes, _) = write(&[], WriterOptions::default());
    let (_, h) = SnapshotReader::open(&bytes[..], ReaderOptions::default()).unwrap();
    check_cluster(&h, "cluster-a").unwrap();
    let e = check_cluster(&h, "cluster-b").unwrap_err();
    assert!(
        matches!(&e, SnapshotError::ClusterMismatch { expected, found } if expected == "cluster-b" && found == "cluster-a"),
        "{e}"
    );
    assert!(!e.is_corruption());
}

#[test]
fn reader_is_poisoned_after_an_error_and_idle_after_the_end() {
    let (bytes, _) = write(&sample_records(20), opts(500));
    let mut damaged = bytes.clone();
    let last_chunk = frames(&bytes).iter().rev().nth(1).unwrap().0;
    damaged[last_chunk + 7] ^= 1;
    let (mut r, _) = SnapshotReader::open(&damaged[..], ReaderOptions::default()).unwrap();
    let e = loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("damage not found"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(e, SnapshotError::ChecksumMismatch { offset, frame: "CHUNK frame", .. } if offset as usize == last_chunk),
        "{e}"
    );
    let e = r.next_record().unwrap_err();
    assert!(
        matches!(e, SnapshotError::Poisoned { side: "reader", .. }),
        "{e}"
    );
    assert!(r.trailer().is_none());

    let (mut r, _) = SnapshotReader::open(&bytes[..], ReaderOptions::default()).unwrap();
    while r.next_record().unwrap().is_some() {}
    assert!(r.next_record().unwrap().is_none());
    assert_eq!(r.trailer().unwrap().record_count, 20);
    assert_eq!(r.offset() as usize, bytes.len());
}

// ------------------------------------------------------------ sweeps

/// Asserts that a damaged stream is refused, and that every record handed
/// out before the error is the original one.
fn assert_refused(damaged: &[u8], records: &[(u32, Vec<u8>)], what: &str) {
    let (got, end) = read_all(damaged, ReaderOptions::default());
    assert!(end.is_err(), "{what}: accepted");
    assert!(got.len() <= records.len(), "{what}: extra records");
    assert_eq!(
        got[..],
        records[..got.len()],
        "{what}: wrong data handed out"
    );
    let e = end.unwrap_err();
    assert!(e.is_corruption(), "{what}: {e}");
}

#[test]
fn every_byte_flip_of_a_small_stream_is_refused() {
    let records: Records = vec![(1, b"alpha".to_vec()), (2, vec![]), (1, vec![7; 30])];
    let (bytes, _) = write(&records, opts(32));
    assert!(frames(&bytes).len() >= 4, "more than one chunk");
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut s = bytes.clone();
            s[i] ^= mask;
            assert_refused(&s, &records, &format!("byte {i} ^ {mask:#x}"));
        }
    }
}

#[test]
fn byte_flips_across_a_multi_chunk_stream_are_refused() {
    let records = sample_records(120);
    let (bytes, t) = write(&records, opts(2048));
    assert!(t.chunk_count > 20);
    let boundaries: Vec<usize> = frames(&bytes).iter().map(|f| f.0).collect();
    let mut offsets: Vec<usize> = (0..bytes.len()).step_by(97).collect();
    for b in boundaries {
        offsets.extend(b.saturating_sub(4)..(b + 13).min(bytes.len()));
    }
    offsets.extend(bytes.len() - 40..bytes.len());
    for i in offsets {
        let mut s = bytes.clone();
        s[i] ^= 0x5a;
        assert_refused(&s, &records, &format!("byte {i}"));
    }
}

#[test]
fn every_truncation_is_refused_as_truncated() {
    for (records, target) in [
        (
            vec![(1, b"alpha".to_vec()), (2, vec![]), (1, vec![7; 30])],
            32,
        ),
        (sample_records(30), 1024),
    ] {
        let (bytes, _) = write(&records, opts(target));
        for len in 0..bytes.len() {
            let (got, end) = read_all(&bytes[..len], ReaderOptions::default());
            assert_eq!(got[..], records[..got.len()], "cut at {len}");
            match end {
                Err(SnapshotError::Truncated { end, offset, .. }) => {
                    assert_eq!(end as usize, len, "cut at {len}");
                    assert!(offset <= end);
                }
                other => panic!("cut at {len}: {other:?}"),
            }
        }
    }
}

#[test]
fn error_messages_name_the_offset() {
    let (bytes, _) = write(&sample_records(10), opts(300));
    let second = frames(&bytes)[2].0;
    let mut s = bytes.clone();
    s[second + 20] ^= 1;
    let e = read_err(&s);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("CHUNK frame at byte offset {second}")),
        "{msg}"
    );
    let e = read_err(&bytes[..second + 3]);
    assert_eq!(
        e.to_string(),
        format!(
            "snapshot stream truncated: it ends at byte offset {}, inside the frame head that \
             starts at byte offset {second}",
            second + 3
        )
    );
}

// ------------------------------------------------------------ transport

#[test]
fn frames_are_the_unit_of_transport() {
    let records = sample_records(60);
    let mut pieces = Vec::new();
    let splitter = FrameSplitter::new(|p: Bytes| {
        pieces.push(p);
        Ok(())
    });
    let w = SnapshotWriter::new(splitter, &header(), opts(3000)).unwrap();
    let mut w = w;
    for (k, r) in &records {
        w.push(*k, r).unwrap();
    }
    let (splitter, t) = w.finish().unwrap();
    assert!(splitter.is_complete());
    assert_eq!(splitter.pieces(), t.chunk_count + 2);
    let _sink = splitter.finish().unwrap();
    // Piece 0: magic and HEADER; then one frame each, each self-checking.
    assert_eq!(&pieces[0][..8], &MAGIC);
    for (i, p) in pieces.iter().enumerate() {
        let frame = if i == 0 { &p[8..] } else { &p[..] };
        let n = frame.len() - FRAME_CRC_BYTES;
        let len = u32::from_le_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + FRAME_HEAD_BYTES, n);
        assert_eq!(crc32c::crc32c(&frame[..n]).to_le_bytes(), frame[n..]);
        let expected = match i {
            0 => FrameType::Header,
            i if i == pieces.len() - 1 => FrameType::Trailer,
            _ => FrameType::Chunk,
        };
        assert_eq!(frame[0], expected as u8);
    }
    // Receiving: a Read over the pieces, as from a channel.
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<Bytes>>();
    for p in &pieces {
        tx.send(Ok(p.clone())).unwrap();
    }
    drop(tx);
    let (mut r, h) =
        SnapshotReader::open(PieceReader::new(rx.into_iter()), ReaderOptions::default()).unwrap();
    assert_eq!(h.cluster_id, "cluster-a");
    let mut got = Vec::new();
    while let Some((k, b)) = r.next_record().unwrap() {
        got.push((k, b.to_vec()));
    }
    assert_eq!(got, records);
    // A lost piece, and a broken transport.
    let mut lost = pieces.clone();
    lost.remove(2);
    let e = verify(
        PieceReader::new(lost.into_iter().map(Ok)),
        ReaderOptions::default(),
    )
    .unwrap_err();
    assert!(e.is_corruption(), "{e}");
    let broken = pieces[..3]
        .iter()
        .cloned()
        .map(Ok)
        .chain([Err(io::Error::other("stream reset"))]);
    let e = verify(PieceReader::new(broken), ReaderOptions::default()).unwrap_err();
    assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
}

#[test]
fn splitter_refuses_what_is_not_a_stream() {
    let mut s = FrameSplitter::new(|_| Ok(()));
    s.write_all(&MAGIC).unwrap();
    let e = s.write_all(&[7, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    let mut s = FrameSplitter::with_max_frame_bytes(|_| Ok(()), 10);
    s.write_all(&MAGIC).unwrap();
    assert!(s.write_all(&[1, 11, 0, 0, 0]).is_err());
    let s = FrameSplitter::new(|_| Ok(()));
    assert!(s.finish().is_err(), "no TRAILER");
    // Bytes after the TRAILER.
    let (bytes, _) = write(&[], WriterOptions::default());
    let mut s = FrameSplitter::new(|_| Ok(()));
    s.write_all(&bytes).unwrap();
    assert!(s.write_all(b"x").is_err());
    // Written one byte at a time, the pieces are the same.
    let (bytes, _) = write(&sample_records(20), opts(700));
    let mut whole = Vec::new();
    let mut s = FrameSplitter::new(|p| {
        whole.push(p);
        Ok(())
    });
    for b in &bytes {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    let _sink = s.finish().unwrap();
    assert_eq!(whole.concat(), bytes);
    assert_eq!(whole.len(), frames(&bytes).len());
}

// ------------------------------------------------------------ properties

fn arb_records() -> impl Strategy<Value = Records> {
    proptest::collection::vec(
        (0u32..6, proptest::collection::vec(any::<u8>(), 0..400)),
        0..60,
    )
}

proptest! {
    #[test]
    fn prop_round_trip(records in arb_records(), target in 0usize..1200) {
        let (bytes, t) = write(&records, opts(target));
        let (got, end) = read_all(&bytes, ReaderOptions::default());
        let (_, trailer) = end.unwrap();
        prop_assert_eq!(&got, &records);
        prop_assert_eq!(&trailer, &t);
        prop_assert_eq!(t.record_count as usize, records.len());
        prop_assert_eq!(t.total_bytes as usize, frames(&bytes).last().unwrap().0);
        for (_, ty, len) in frames(&bytes) {
            prop_assert!(ty != 2 || len <= target.max(8 + 400));
        }
    }

    #[test]
    fn prop_reader_never_panics_on_arbitrary_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        with_magic in any::<bool>(),
    ) {
        let mut s = if with_magic { MAGIC.to_vec() } else { Vec::new() };
        s.extend_from_slice(&body);
        let _ = read_all(&s, ReaderOptions::default());
    }

    #[test]
    fn prop_damage_is_refused(
        records in arb_records(),
        edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
    ) {
        let (bytes, _) = write(&records, opts(300));
        let mut s = bytes.clone();
        for (at, mask) in edits {
            let i = at % s.len();
            s[i] ^= mask;
        }
        prop_assume!(s != bytes);
        let (got, end) = read_all(&s, ReaderOptions::default());
        prop_assert!(end.is_err());
        prop_assert_eq!(&got[..], &records[..got.len()]);
    }
}
