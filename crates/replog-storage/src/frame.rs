//! crc32c framing of every value replog stores.
//!
//! Layout of a framed value (all integers little-endian):
//!
//! ```text
//! +---------+-------------------+------------------+
//! | version | crc32c            | payload          |
//! | 1 byte  | 4 bytes           | n bytes          |
//! +---------+-------------------+------------------+
//! ```
//!
//! The checksum covers the record's key, the version byte and the payload, so
//! a value that is intact but stored under the wrong key is caught as well.
//!
//! Invariants: [`decode`] never panics on any input; it returns the payload
//! only if the checksum matches and the size is within the caller's limit.

use crate::bugs::{self, InjectedBug};
use crate::error::{Result, StorageError};

/// Version byte of the frame layout above.
pub const FRAME_VERSION: u8 = 1;
/// Bytes the frame adds to a payload.
pub const FRAME_OVERHEAD: usize = 5;

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c_append(0, key);
    let c = crc32c::crc32c_append(c, &[FRAME_VERSION]);
    crc32c::crc32c_append(c, payload)
}

/// Frames `payload` stored under `key`.
pub fn encode(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + payload.len());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&checksum(key, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks and unframes a value read under `key`; `location` names the record
/// in the error.
pub fn decode<'a>(
    key: &[u8],
    value: &'a [u8],
    max_payload_bytes: usize,
    location: impl FnOnce() -> String,
) -> Result<&'a [u8]> {
    if value.len() < FRAME_OVERHEAD {
        return Err(StorageError::corrupt(
            location(),
            format!("record of {} bytes is shorter than its frame", value.len()),
        ));
    }
    if value.len() - FRAME_OVERHEAD > max_payload_bytes {
        return Err(StorageError::corrupt(
            location(),
            format!(
                "record of {} bytes exceeds the limit of {max_payload_bytes} bytes",
                value.len() - FRAME_OVERHEAD
            ),
        ));
    }
    if value[0] != FRAME_VERSION {
        return Err(StorageError::corrupt(
            location(),
            format!("unknown frame version {}", value[0]),
        ));
    }
    let stored = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
    let payload = &value[FRAME_OVERHEAD..];
    let actual = checksum(key, payload);
    if stored != actual && !bugs::active(bugs::process_bug(), InjectedBug::SkipCrcCheck) {
        return Err(StorageError::corrupt(
            location(),
            format!("crc32c mismatch (stored {stored:#010x}, computed {actual:#010x})"),
        ));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let v = encode(b"k", b"hello");
        assert_eq!(decode(b"k", &v, 100, String::new).unwrap(), b"hello");
    }

    #[test]
    fn wrong_key_is_caught() {
        let v = encode(b"k1", b"hello");
        let err = decode(b"k2", &v, 100, || "log/2".into()).unwrap_err();
        assert!(err.to_string().contains("log/2"), "{err}");
        assert!(err.is_corruption());
    }

    #[test]
    fn limit_is_enforced() {
        let v = encode(b"k", &[0u8; 64]);
        assert!(decode(b"k", &v, 63, String::new).is_err());
        assert!(decode(b"k", &v, 64, String::new).is_ok());
    }

    proptest! {
        #[test]
        fn every_single_byte_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..200), pos in any::<usize>(), bit in 0u8..8) {
            let mut v = encode(b"key", &payload);
            let i = pos % v.len();
            v[i] ^= 1 << bit;
            prop_assert!(decode(b"key", &v, 1 << 20, String::new).is_err());
        }

        #[test]
        fn decode_never_panics(value in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(b"key", &value, 32, String::new);
        }
    }
}
