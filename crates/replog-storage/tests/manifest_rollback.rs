//! Every byte of a replica's MANIFEST flipped in turn: a strict open either
//! fails or serves every committed entry, and a non-strict one either
//! serves them all or turns the replica RECOVERING. Never a clean VOTING
//! replica without entries it committed (RocksDB reads a damaged last
//! MANIFEST record as a torn write and drops it without an error; the
//! storage checks the MANIFEST first: `replog_storage::manifest`).

mod common;

use common::init;
use raft::eraftpb::HardState;
use replog_storage::{
    conformance, LogStorage, LogUpdate, OpenOptions, ReplicaStatus, RocksStorage,
};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_flipped_manifest_byte_never_opens_as_a_clean_replica_without_committed_entries() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    let s = init(&t, "c");
    for e in conformance::entries(2..=9, 2, 64) {
        let i = e.index;
        let hard_state = HardState {
            term: 2,
            commit: i,
            ..Default::default()
        };
        s.write(LogUpdate {
            entries: vec![e],
            hard_state: Some(hard_state),
            applied: Some(i),
            sync: true,
            ..Default::default()
        })
        .unwrap();
    }
    s.flush().unwrap();
    drop(s);
    let manifest = std::fs::read_to_string(t.join("CURRENT")).unwrap();
    let manifest = manifest.trim().to_string();
    let len = std::fs::metadata(t.join(&manifest)).unwrap().len();
    let (mut silent, mut refused) = (Vec::new(), 0);
    for off in 0..len {
        let c = d.path().join(format!("c{off}"));
        copy_dir(&t, &c);
        let p = c.join(&manifest);
        let mut b = std::fs::read(&p).unwrap();
        b[off as usize] ^= 0xA5;
        std::fs::write(&p, b).unwrap();
        let lenient = d.path().join(format!("l{off}"));
        copy_dir(&c, &lenient);
        match RocksStorage::open(&c, &OpenOptions::default()) {
            Ok((s, _)) if s.last_index() != 9 => silent.push((off, "strict", s.last_index())),
            Ok(_) => {}
            Err(_) => refused += 1,
        }
        let non_strict = OpenOptions {
            strict: false,
            ..Default::default()
        };
        if let Ok((s, report)) = RocksStorage::open(&lenient, &non_strict) {
            let status = LogStorage::meta(&s).status;
            if s.last_index() != 9 && (status != ReplicaStatus::Recovering || report.is_clean()) {
                silent.push((off, "non-strict", s.last_index()));
            }
        }
        std::fs::remove_dir_all(&c).unwrap();
        std::fs::remove_dir_all(&lenient).unwrap();
    }
    assert!(
        silent.is_empty(),
        "{manifest} of {len} bytes: opens that lost committed entries silently (offset, mode, last): {silent:?}"
    );
    assert!(refused > 0, "no flip was refused: the sweep tested nothing");
}
