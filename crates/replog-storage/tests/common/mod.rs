//! Helpers shared by this crate's integration tests: a replica made as
//! `replog initialize` makes it, and a fingerprint of a data directory to
//! prove that an operation changed nothing on disk.

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::path::Path;

use replog_storage::{InitOptions, Member, RocksStorage};

/// Initializes replica 1 of `cluster`, its only voter, in `dir`.
pub fn init(dir: &Path, cluster: &str) -> RocksStorage {
    RocksStorage::initialize(
        dir,
        &InitOptions {
            cluster_id: cluster.into(),
            replica_id: 1,
            members: vec![Member {
                id: 1,
                address: String::new(),
            }],
        },
    )
    .unwrap()
}

/// Name, size and content hash of every file below `dir`.
pub fn fingerprint(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut v: Vec<(String, u64, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                data.len() as u64,
                crc32c::crc32c(&data),
            )
        })
        .collect();
    v.sort();
    v
}
