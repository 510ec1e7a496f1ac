//! A check of RocksDB's MANIFEST before RocksDB reads it.
//!
//! RocksDB reads a record at the end of its MANIFEST whose checksum fails as
//! a torn write and drops it without an error (its WAL recovery modes do not
//! apply to the MANIFEST). When the dropped record was the version edit of a
//! flush, the table files it added are forgotten with it, and the WAL they
//! replaced is gone already: a strict open would then return a clean VOTING
//! replica without entries it had committed. This module reads the current
//! MANIFEST in RocksDB's log format (32 KiB blocks of records: a masked
//! crc32c of the type and payload, a 16-bit length, a type) and reports a
//! complete record whose checksum fails, or one that overruns its block
//! inside the file, as damage. A record cut by the end of the file is what a
//! crash in the middle of an append leaves, and is not damage (RocksDB
//! drops it, and nothing it described was acknowledged: the edit never
//! finished), unless complete records with valid checksums follow its
//! header: then its length was damaged, and RocksDB, taking it for a torn
//! tail, would drop every edit after it.
//!
//! Invariant: the check only reads; it claims damage only for a record it
//! can prove is not a torn tail, and stops without a claim at a record type
//! it does not know.

use std::path::Path;

/// RocksDB's log block size.
const BLOCK_BYTES: usize = 32 * 1024;
/// Checksum (4), length (2), type (1).
const HEADER_BYTES: usize = 7;
/// `kFullType` ..= `kLastType`: the record types of a MANIFEST.
const FIRST_TYPE: u8 = 1;
const LAST_TYPE: u8 = 4;
/// RocksDB's `crc32c::kMaskDelta`.
const MASK_DELTA: u32 = 0xa282_ead8;
/// A MANIFEST larger than this is not read whole (RocksDB rolls it over at
/// `max_manifest_file_size`, 1 GiB by default; ours stay small).
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

fn unmask(masked: u32) -> u32 {
    let rot = masked.wrapping_sub(MASK_DELTA);
    rot.rotate_left(15)
}

/// One record header of RocksDB's log format.
struct Header {
    /// The masked crc32c of the type byte and the payload.
    stored_crc: u32,
    length: usize,
    kind: u8,
}

impl Header {
    /// The header at `at`, when `bytes` holds all of it.
    fn at(bytes: &[u8], at: usize) -> Option<Header> {
        let header = bytes.get(at..at + HEADER_BYTES)?;
        Some(Header {
            stored_crc: u32::from_le_bytes(header[..4].try_into().expect("4 bytes")),
            length: u16::from_le_bytes([header[4], header[5]]) as usize,
            kind: header[6],
        })
    }

    fn is_known_kind(&self) -> bool {
        (FIRST_TYPE..=LAST_TYPE).contains(&self.kind)
    }

    /// Where the record whose header is at `at` ends.
    fn end(&self, at: usize) -> usize {
        at + HEADER_BYTES + self.length
    }

    /// Whether the record at `at` ends within its block.
    fn fits_block(&self, at: usize) -> bool {
        HEADER_BYTES + self.length <= block_left(at)
    }

    /// Whether the payload of the record at `at` (all of it in `bytes`)
    /// has the stored checksum.
    fn checks_out(&self, bytes: &[u8], at: usize) -> bool {
        let payload = &bytes[at + HEADER_BYTES..self.end(at)];
        crc32c::crc32c_append(crc32c::crc32c(&[self.kind]), payload) == unmask(self.stored_crc)
    }
}

/// Bytes from `at` to the end of its block.
fn block_left(at: usize) -> usize {
    BLOCK_BYTES - at % BLOCK_BYTES
}

/// The first provable damage in a MANIFEST's bytes, as a sentence naming
/// the offset; `None` when every complete record checks out.
pub fn find_damage(bytes: &[u8]) -> Option<String> {
    let mut offset = 0;
    while offset < bytes.len() {
        if block_left(offset) < HEADER_BYTES {
            offset += block_left(offset); // the block's zero trailer
            continue;
        }
        // None: a header cut by the end of the file.
        let h = Header::at(bytes, offset)?;
        if h.kind == 0 && h.length == 0 && h.stored_crc == 0 {
            return None; // zeroes: space written ahead of the records
        }
        if !h.is_known_kind() {
            return None; // not a MANIFEST record type this check knows
        }
        let length = h.length;
        let overruns_block = !h.fits_block(offset);
        if overruns_block && offset + block_left(offset) < bytes.len() {
            return Some(format!(
                "the record at offset {offset} claims {length} bytes, past the end of its block"
            ));
        }
        if overruns_block || h.end(offset) > bytes.len() {
            // Cut by the end of the file: a torn tail, unless complete
            // records follow its header (then its length is what is
            // damaged, and RocksDB would drop them all).
            return record_after(bytes, offset + HEADER_BYTES).map(|at| {
                format!(
                    "the record at offset {offset} claims {length} bytes, past the end of the \
                     file, but a complete record follows at offset {at}: its length is damaged"
                )
            });
        }
        if !h.checks_out(bytes, offset) {
            return Some(format!(
                "the record at offset {offset} ({length} bytes) fails its crc32c"
            ));
        }
        offset = h.end(offset);
    }
    None
}

/// The offset of the first complete record of a known type whose crc32c
/// checks out, at or after `from` and ending within `bytes` (within its
/// block). The bytes of a torn record's payload hold none but by a 2^-32
/// chance.
fn record_after(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&at| {
        Header::at(bytes, at).is_some_and(|h| {
            h.is_known_kind()
                && h.fits_block(at)
                && h.end(at) <= bytes.len()
                && h.checks_out(bytes, at)
        })
    })
}

/// Checks the MANIFEST that `dir/CURRENT` names. `Ok(None)`: sound, or
/// nothing to check (a new directory; a CURRENT that names no MANIFEST,
/// which RocksDB refuses itself); `Ok(Some(why))`: damage,
/// naming the file and the offset; `Err`: it could not be read.
pub fn check(dir: &Path) -> std::io::Result<Option<String>> {
    let current = match std::fs::read(dir.join("CURRENT")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A damaged CURRENT is RocksDB's to report (it refuses to open); only
    // the MANIFEST a sound CURRENT names is read here.
    let Some(name) = std::str::from_utf8(&current)
        .ok()
        .and_then(|s| s.strip_suffix('\n'))
        .filter(|n| n.starts_with("MANIFEST-") && !n.contains('/'))
    else {
        return Ok(None);
    };
    let path = dir.join(name);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        // RocksDB reports a missing MANIFEST itself, as corruption.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_MANIFEST_BYTES {
        return Ok(None);
    }
    let bytes = std::fs::read(&path)?;
    Ok(find_damage(&bytes).map(|why| format!("{}: {why}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(crc: u32) -> u32 {
        crc.rotate_right(15).wrapping_add(MASK_DELTA)
    }

    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
        let mut r = mask(crc).to_le_bytes().to_vec();
        r.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        r.push(kind);
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn masking_round_trips() {
        for crc in [0, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(unmask(mask(crc)), crc);
        }
    }

    /// Every case, and what the check says of it.
    #[test]
    fn what_is_damage_and_what_is_a_torn_tail() {
        let a = record(1, b"first version edit");
        let b = record(1, b"second version edit, a flush");
        let whole = [a.clone(), b.clone()].concat();
        let flip = |at: usize| {
            let mut v = whole.clone();
            v[at] ^= 0xa5;
            v
        };
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("sound", whole.clone(), false),
            ("empty", Vec::new(), false),
            (
                "a payload byte of the last record",
                flip(whole.len() - 1),
                true,
            ),
            ("a checksum byte of the last record", flip(a.len()), true),
            ("the type of the last record", flip(a.len() + 6), false), // unknown type: no claim
            (
                "a payload byte of the first record",
                flip(HEADER_BYTES),
                true,
            ),
            (
                "the last record cut short",
                whole[..whole.len() - 3].to_vec(),
                false,
            ),
            (
                "the last header cut short",
                whole[..a.len() + 4].to_vec(),
                false,
            ),
            (
                "zeroes after the records",
                [whole.clone(), vec![0; 64]].concat(),
                false,
            ),
            ("the length of the first record, high byte", flip(5), true),
            (
                "the length of the last record, high byte",
                flip(a.len() + 5),
                false,
            ),
        ];
        for (name, bytes, damaged) in cases {
            assert_eq!(find_damage(&bytes).is_some(), damaged, "{name}");
        }
    }

    #[test]
    fn a_record_past_its_block_is_damage_unless_the_file_ends_there() {
        // A record claiming more than its block holds, with another block
        // after it: damage. The same record in the file's last block: a
        // torn tail.
        let mut r = record(1, b"x");
        r[4..6].copy_from_slice(&(BLOCK_BYTES as u16 - 3).to_le_bytes());
        let mut two_blocks = r.clone();
        two_blocks.resize(BLOCK_BYTES + 10, 0);
        assert!(find_damage(&two_blocks).is_some());
        assert!(find_damage(&r).is_none());
    }
}
