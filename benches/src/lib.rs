//! Shared set-up of replog's criterion benchmarks: a fresh single-replica
//! log in a temporary directory on the disk under test.

use std::path::Path;

use replog_log::{Log, LogOptions};
use replog_storage::{InitOptions, RocksStorage};

/// Initializes a single-replica log in `dir` and opens it.
pub fn fresh_log(dir: &Path) -> Log {
    RocksStorage::initialize(dir, &InitOptions::single_replica("bench"))
        .expect("initialize benchmark replica");
    Log::open(dir, LogOptions::default()).expect("open benchmark replica")
}
