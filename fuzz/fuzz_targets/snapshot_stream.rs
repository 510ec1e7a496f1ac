//! The snapshot stream (`replog_snapshot`): what a lagging replica receives
//! from its leader, what a backup file holds, what staged recovery reads.
//!
//! Input: a stream. Holds: the reader never panics and allocates only
//! within its limits; after an error it only answers `Poisoned`; `verify`
//! accepts exactly the streams the reader reads to the end, and counts the
//! same records; no record exceeds the record limit; an accepted stream
//! cut into transport pieces (`FrameSplitter`) and joined again
//! (`PieceReader`) is the same bytes and the same records; its records
//! written again by `SnapshotWriter` under the same header read back the
//! same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use replog_snapshot::{
    verify, FrameSplitter, PieceReader, ReaderOptions, SnapshotError, SnapshotReader,
    SnapshotWriter, WriterOptions, RECORD_HEAD_BYTES,
};
use std::io::Write;

const MAX_RECORD_BYTES: usize = 256 << 10;

fn options() -> ReaderOptions {
    ReaderOptions {
        max_header_bytes: 64 << 10,
        max_chunk_bytes: MAX_RECORD_BYTES + RECORD_HEAD_BYTES,
        max_record_bytes: MAX_RECORD_BYTES,
    }
}

type Read = (replog_snapshot::SnapshotHeader, Vec<(u32, Bytes)>);

/// Reads the whole stream; `Err` is the first error.
fn read_all(r: impl std::io::Read) -> Result<Read, SnapshotError> {
    let (mut reader, header) = SnapshotReader::open(r, options())?;
    let mut records = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(rec)) => {
                assert!(rec.1.len() <= MAX_RECORD_BYTES);
                records.push(rec);
            }
            Ok(None) => {
                assert!(reader.trailer().is_some());
                assert!(matches!(reader.next_record(), Ok(None)));
                return Ok((header, records));
            }
            Err(e) => {
                assert!(
                    matches!(reader.next_record(), Err(SnapshotError::Poisoned { .. })),
                    "a reader went on after {e}"
                );
                return Err(e);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let read = read_all(data);
    let verified = verify(data, options());
    let (header, records) = match (read, verified) {
        (Ok(r), Ok(summary)) => {
            assert_eq!(summary.records, r.1.len() as u64);
            assert_eq!(summary.stream_bytes, data.len() as u64);
            assert_eq!(summary.header, r.0);
            r
        }
        (Err(_), Err(_)) => {
            // The sender's splitter must not panic on it either.
            let mut splitter = FrameSplitter::new(|_piece: Bytes| Ok(()));
            let _ = splitter.write_all(data);
            return;
        }
        (r, v) => panic!("reader and verify disagree: {:?} / {:?}", r.err(), v.err()),
    };

    // Cut into transport pieces and joined again.
    let mut pieces = Vec::new();
    let mut splitter = FrameSplitter::with_max_frame_bytes(
        |piece: Bytes| {
            pieces.push(piece);
            Ok(())
        },
        MAX_RECORD_BYTES + RECORD_HEAD_BYTES,
    );
    splitter.write_all(data).expect("an accepted stream splits");
    assert!(splitter.is_complete());
    let _sink = splitter.finish().expect("an accepted stream splits whole");
    assert_eq!(pieces.concat(), data);
    let joined = read_all(PieceReader::new(pieces.into_iter().map(Ok))).unwrap();
    assert_eq!(joined, (header.clone(), records.clone()));

    // Written again.
    let wopts = WriterOptions {
        chunk_target_bytes: 4096,
        max_record_bytes: MAX_RECORD_BYTES,
        max_header_bytes: 64 << 10,
    };
    let mut w = SnapshotWriter::new(Vec::new(), &header, wopts).expect("the header was accepted");
    for (kind, bytes) in &records {
        w.push(*kind, bytes)
            .expect("an accepted record is writable");
    }
    let (rewritten, _) = w.finish().unwrap();
    assert_eq!(read_all(rewritten.as_slice()).unwrap(), (header, records));
});
