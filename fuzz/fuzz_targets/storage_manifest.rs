//! The check of RocksDB's MANIFEST before RocksDB reads it
//! (`replog_storage::manifest`): untrusted bytes from disk.
//!
//! Holds: `find_damage` never panics, whatever the bytes (record lengths
//! past blocks and files, unknown types, zero runs, block trailers), and
//! gives the same answer twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog_storage::manifest;

fuzz_target!(|data: &[u8]| {
    let first = manifest::find_damage(data);
    assert_eq!(first, manifest::find_damage(data));
});
