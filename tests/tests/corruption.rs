//! Corruption sweep: flip bytes at many offsets of every file of a replica's
//! data directory (WAL, SST, MANIFEST, CURRENT, OPTIONS, REPLICA-IDENTITY, RocksDB IDENTITY). For every
//! flip:
//! - strict open fails with a clear error, or opens and every read returns
//!   exactly the original data (or a clear corruption error) — never a panic,
//!   never silently wrong data;
//! - non-strict open recovers: what it serves is an intact prefix of the
//!   original, and if it found damage the replica is RECOVERING.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use replog_log::{application_entries, Log, LogOptions};
use replog_storage::{OpenOptions, ReplicaStatus, RocksStorage, StorageError};
use replog_tests::{copy_dir, payload};

fn build_template(path: &Path) {
    replog_storage::RocksStorage::initialize(
        path,
        &replog_storage::InitOptions::single_replica("sweep"),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let append = |from: u64, n: u64| {
        rt.block_on(async {
            let log = Log::open(path, LogOptions::default()).unwrap();
            let mut w = log.writer();
            w.start().await.unwrap();
            for seq in from..from + n {
                w.append(payload(seq)).await.unwrap();
            }
            log.close();
        })
    };
    // Older entries in SST files, newer ones only in the WAL.
    append(0, 150);
    {
        let (s, _) = RocksStorage::open(path, &OpenOptions::default()).unwrap();
        s.flush().unwrap();
    }
    append(150, 60);
}

/// Committed application entries as position -> data, or the first error.
fn committed(s: &RocksStorage) -> Result<BTreeMap<u64, Vec<u8>>, StorageError> {
    let meta = replog_storage::LogStorage::meta(s);
    let commit = meta.hard_state.commit;
    assert!(
        commit <= s.last_index(),
        "open must never leave commit beyond the log"
    );
    let first = s.first_index_now();
    if commit < first {
        return Ok(BTreeMap::new());
    }
    let entries = s.read_entries(first, commit + 1, None)?;
    Ok(application_entries(entries)
        .into_iter()
        .map(|e| (e.position.value(), e.data.to_vec()))
        .collect())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            // The info log and the lock file hold no replica data.
            !(n.starts_with("LOG") || n == "LOCK")
        })
        .collect();
    v.sort();
    v
}

fn kind(name: &str) -> &'static str {
    if name.ends_with(".log") {
        "WAL"
    } else if name.ends_with(".sst") {
        "SST"
    } else if name.starts_with("MANIFEST") {
        "MANIFEST"
    } else if name == "CURRENT" {
        "CURRENT"
    } else if name.starts_with("OPTIONS") {
        "OPTIONS"
    } else if name == "REPLICA-IDENTITY" {
        "REPLICA-IDENTITY"
    } else if name == "IDENTITY" {
        "ROCKSDB-IDENTITY"
    } else {
        "other"
    }
}

fn flip(path: &Path, offset: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[offset as usize] ^= 0xA5;
    std::fs::write(path, data).unwrap();
}

#[derive(Default, Debug)]
struct Tally {
    flips: usize,
    strict_refused: usize,
    strict_clean: usize,
    lenient_recovering: usize,
}

#[test]
fn byte_flips_in_every_file_are_caught_or_harmless() {
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    build_template(&template);
    let original = {
        let (s, _) = RocksStorage::open(
            &template,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        committed(&s).unwrap()
    };
    assert_eq!(original.len(), 210);
    let kinds: Vec<&str> = files(&template)
        .iter()
        .map(|p| kind(&p.file_name().unwrap().to_string_lossy()))
        .collect();
    for k in ["WAL", "SST", "MANIFEST", "CURRENT", "REPLICA-IDENTITY"] {
        assert!(kinds.contains(&k), "template lacks a {k} file: {kinds:?}");
    }

    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut case = 0;
    for file in files(&template) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let len = std::fs::metadata(&file).unwrap().len();
        let steps: u64 = 24;
        let mut offsets: Vec<u64> = (0..steps).map(|i| i * len / steps).collect();
        offsets.push(len - 1);
        offsets.dedup();
        for off in offsets {
            case += 1;
            let t = tallies.entry(kind(&name)).or_default();
            t.flips += 1;
            let what = format!("{name} at byte {off} of {len}");

            // Strict.
            let dir = root.path().join(format!("strict-{case}"));
            copy_dir(&template, &dir).unwrap();
            flip(&dir.join(&name), off);
            let r = catch_unwind(AssertUnwindSafe(|| {
                RocksStorage::open(&dir, &OpenOptions::default()).map(|(s, _)| committed(&s))
            }));
            match r {
                Err(_) => panic!("strict open panicked on a flip in {what}"),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert!(msg.len() > 20, "unclear error for {what}: {msg}");
                    t.strict_refused += 1;
                }
                Ok(Ok(Err(e))) => {
                    assert!(
                        e.is_corruption(),
                        "read after a flip in {what} failed with a non-corruption error: {e}"
                    );
                    t.strict_refused += 1;
                }
                Ok(Ok(Ok(data))) => {
                    assert!(
                        data == original,
                        "SILENTLY WRONG DATA after a flip in {what}"
                    );
                    t.strict_clean += 1;
                }
            }
            let _ = std::fs::remove_dir_all(&dir);

            // Non-strict.
            let dir = root.path().join(format!("lenient-{case}"));
            copy_dir(&template, &dir).unwrap();
            flip(&dir.join(&name), off);
            let opts = OpenOptions {
                strict: false,
                ..Default::default()
            };
            let r = catch_unwind(AssertUnwindSafe(|| {
                RocksStorage::open(&dir, &opts).map(|(s, rep)| {
                    (
                        committed(&s),
                        rep,
                        replog_storage::LogStorage::meta(&s).status,
                    )
                })
            }));
            match r {
                Err(_) => panic!("non-strict open panicked on a flip in {what}"),
                Ok(Err(e)) => panic!("non-strict open failed on a flip in {what}: {e}"),
                Ok(Ok((data, report, status))) => {
                    let data = data.unwrap_or_else(|e| {
                        panic!("non-strict read failed after a flip in {what}: {e}")
                    });
                    for (p, d) in &data {
                        assert_eq!(
                            original.get(p),
                            Some(d),
                            "non-strict open served wrong data at {p} after a flip in {what}"
                        );
                    }
                    // What it serves is a prefix of the original.
                    let served: Vec<&u64> = data.keys().collect();
                    let prefix: Vec<&u64> = original.keys().take(served.len()).collect();
                    assert_eq!(
                        served, prefix,
                        "non-strict open served a non-prefix after a flip in {what}"
                    );
                    if report.is_clean() {
                        assert_eq!(status, ReplicaStatus::Voting);
                        assert_eq!(
                            data, original,
                            "a clean non-strict open must serve everything ({what})"
                        );
                    } else {
                        assert_eq!(
                            status,
                            ReplicaStatus::Recovering,
                            "damage found but not RECOVERING ({what})"
                        );
                        t.lenient_recovering += 1;
                        // And the embedded log refuses to serve it.
                        let err = Log::open(
                            &dir,
                            LogOptions {
                                strict: false,
                                ..Default::default()
                            },
                        )
                        .err();
                        assert!(
                            err.is_some(),
                            "a RECOVERING replica must not serve ({what})"
                        );
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("corruption sweep ({case} flips): {tallies:#?}");
    for k in ["WAL", "SST", "MANIFEST", "CURRENT", "REPLICA-IDENTITY"] {
        let t = &tallies[k];
        assert!(
            t.strict_refused > 0,
            "no flip in any {k} file was detected: {t:?}"
        );
    }
}
