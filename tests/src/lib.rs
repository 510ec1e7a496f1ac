//! Helpers shared by replog's process-level integration tests: the payload
//! scheme of the crash writer, data-directory utilities, and [`procs`] (what
//! the tests that start real `replog` processes share).

pub mod procs;

use std::path::Path;

/// The payload the crash writer appends for sequence number `seq`: the
/// sequence number (8 bytes big-endian) followed by a deterministic body of
/// a length that varies with `seq`. Every byte is a function of `seq`, so a
/// reader can tell a whole entry from a torn or foreign one.
pub fn payload(seq: u64) -> Vec<u8> {
    let len = 16 + (seq.wrapping_mul(7919) % 3000) as usize;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// The sequence number a payload claims, if it is a whole, valid payload.
pub fn check_payload(data: &[u8]) -> Option<u64> {
    let seq = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    (payload(seq) == data).then_some(seq)
}

/// Copies a directory tree (files only, as a replica directory is).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_check() {
        for seq in [0, 1, 77, 1_000_000_007] {
            assert_eq!(check_payload(&payload(seq)), Some(seq));
            let mut p = payload(seq);
            let last = p.len() - 1;
            p[last] ^= 1;
            assert_eq!(check_payload(&p), None);
            assert_eq!(check_payload(&payload(seq)[..10]), None);
        }
    }
}
