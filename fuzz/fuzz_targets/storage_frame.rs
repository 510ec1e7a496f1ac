//! The crc32c frame of every stored value (`replog_storage::frame`).
//!
//! Input: key length (1 byte, mod 33), key, value. Holds: `decode` never
//! panics; an accepted value is exactly `encode(key, payload)` (so the frame
//! admits one encoding per payload) and its payload is within the limit; a
//! limit one byte below the payload refuses it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog_storage::frame;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let key_len = (data.first().copied().unwrap_or(0) % 33) as usize;
    let rest = data.get(1..).unwrap_or(&[]);
    let (key, value) = rest.split_at(key_len.min(rest.len()));
    match frame::decode(key, value, LIMIT, || "fuzz".to_string()) {
        Ok(payload) => {
            assert!(payload.len() <= LIMIT);
            assert_eq!(
                frame::encode(key, payload),
                value,
                "accepted a non-canonical frame"
            );
            if !payload.is_empty() {
                let e = frame::decode(key, value, payload.len() - 1, String::new).unwrap_err();
                assert!(e.is_corruption());
            }
        }
        Err(e) => assert!(e.is_corruption(), "{e}"),
    }
});
