//! Behaviour that `cargo mutants` found no test of in this crate (each test
//! names the survivors it kills; docs/reliability.md, "Mutation testing",
//! has the run): record limits and boundaries, the identity file's error
//! paths, what a `LogUpdate` counts as empty, metadata that must survive a
//! write and a read whole (joint membership, the hard state), and the
//! bookkeeping of membership history and addresses; and what
//! `RocksStorage::open` does with a damaged data directory (a lost or
//! damaged identity file, a bad metadata or log record, a damaged WAL,
//! MANIFEST or table file), strictly, leniently and read-only; and the
//! errors and limits of `RocksStorage`'s reads and writes.

mod common;

use std::path::Path;

use common::{fingerprint, init};
use raft::eraftpb::{ConfState, Entry, HardState};
use replog_storage::rocksdb::{ColumnFamily, DB};
use replog_storage::{
    conformance, frame, identity, records, LogStorage, LogUpdate, Member, OpenOptions,
    ReplicaIdentity, ReplicaMeta, ReplicaStatus, RocksStorage, StorageError,
};

/// api.rs `is_empty -> false`, `only_commit_and_applied -> false`.
#[test]
fn an_update_that_changes_nothing_is_empty() {
    assert!(LogUpdate::default().is_empty());
    assert!(LogUpdate::default().only_commit_and_applied());
    let commit_only = LogUpdate {
        hard_state: Some(Default::default()),
        applied: Some(7),
        ..Default::default()
    };
    assert!(commit_only.only_commit_and_applied());
    assert!(!commit_only.is_empty());
}

/// frame.rs `< with <=` in decode: a frame of an empty payload is exactly
/// the frame's overhead long, and valid.
#[test]
fn an_empty_payload_frames_and_unframes() {
    let v = frame::encode(b"k", b"");
    assert_eq!(v.len(), frame::FRAME_OVERHEAD);
    assert_eq!(frame::decode(b"k", &v, 0, String::new).unwrap(), b"");
    assert!(frame::decode(b"k", &v[..v.len() - 1], 0, String::new).is_err());
}

/// identity.rs: the `NotFound` guard replaced by `true` (every read error
/// taken for "no identity file"), and `sync_dir -> Ok(())`.
#[test]
fn an_unreadable_identity_file_is_an_error_not_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    assert!(identity::read(dir.path()).unwrap().is_none());
    // A directory where the file belongs: reading it fails (EISDIR).
    std::fs::create_dir(dir.path().join(identity::IDENTITY_FILE)).unwrap();
    match identity::read(dir.path()) {
        Err(StorageError::Io { path, .. }) => {
            assert!(path.ends_with(identity::IDENTITY_FILE), "{path:?}")
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let gone = dir.path().join("no-such-dir");
    assert!(matches!(
        identity::sync_dir(&gone),
        Err(StorageError::Io { .. })
    ));
    identity::sync_dir(dir.path()).unwrap();
}

/// records.rs: `META_LIMIT` (16 MiB) with a `*` replaced by `+` (1 MiB +
/// 16 bytes, or 17 KiB): a metadata record of several MiB (a large address
/// book) reads back, one over 16 MiB is refused.
#[test]
fn the_metadata_record_limit_is_16_mib() {
    let mut meta = ReplicaMeta::empty("c", 1, 0);
    let address = "a".repeat(1000);
    meta.members = (1..=3000)
        .map(|id| Member {
            id,
            address: address.clone(),
        })
        .collect();
    let v = records::encode_meta(&meta);
    assert!(v.len() > 2 << 20);
    assert_eq!(records::decode_meta(&v, String::new).unwrap(), meta);
    let over = frame::encode(b"replica", &vec![0u8; (16 << 20) + 1]);
    let e = records::decode_meta(&over, || "meta".into()).unwrap_err();
    assert!(
        e.is_corruption() && e.to_string().contains("exceeds the limit"),
        "{e}"
    );
}

/// model.rs `ReplicaStatus::as_str` (-> "" / "xyzzy") and its `Display`.
#[test]
fn statuses_have_their_operator_names() {
    for (s, name) in [
        (ReplicaStatus::Empty, "EMPTY"),
        (ReplicaStatus::Starting, "STARTING"),
        (ReplicaStatus::Recovering, "RECOVERING"),
        (ReplicaStatus::Voting, "VOTING"),
    ] {
        assert_eq!(s.as_str(), name);
        assert_eq!(s.to_string(), name);
    }
}

fn joint() -> ConfState {
    ConfState {
        voters: vec![1, 2, 4],
        learners: vec![5],
        voters_outgoing: vec![1, 2, 3],
        learners_next: vec![3],
        auto_leave: true,
        ..Default::default()
    }
}

/// model.rs `conf_from_pb` with `voters_outgoing`, `learners_next` or
/// `auto_leave` deleted: a joint membership (mid change) must come back
/// whole from disk, in the current, the snapshot's and the history's
/// membership alike, or a restart in the middle of a joint change forgets
/// the outgoing configuration.
#[test]
fn a_joint_membership_survives_the_metadata_record() {
    let mut meta = ReplicaMeta::initialized("c", 1, vec![1, 2, 3], 0);
    meta.install_snapshot_conf(joint());
    meta.record_conf_changes(&[(5, joint())]);
    let back = records::decode_meta(&records::encode_meta(&meta), String::new).unwrap();
    assert_eq!(back.conf_state, joint());
    assert_eq!(back.snapshot_conf_state, joint());
    assert_eq!(back.conf_history, vec![(5, joint())]);
}

/// model.rs `initialized` with the hard state's `term` deleted: a new
/// replica starts at term 1 with position 1 committed, the snapshot (1, 1)
/// every member starts from.
#[test]
fn an_initialized_replica_starts_at_term_one() {
    let m = ReplicaMeta::initialized("c", 2, vec![1, 2, 3], 9);
    assert_eq!((m.hard_state.term, m.hard_state.commit), (1, 1));
    assert_eq!(
        (m.snapshot_index, m.snapshot_term, m.applied_index),
        (1, 1, 1)
    );
    assert_eq!(m.status, ReplicaStatus::Voting);
    assert_eq!(m.first_index(), 2);
}

/// model.rs `compact_conf_to` `>` replaced by `>=`: a change exactly at the
/// compaction point is folded into the snapshot's membership.
#[test]
fn compaction_folds_the_change_at_its_point() {
    let mut m = ReplicaMeta::initialized("c", 1, vec![1], 0);
    let two = ConfState {
        voters: vec![1, 2],
        ..Default::default()
    };
    let three = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    m.record_conf_changes(&[(5, two.clone()), (8, three.clone())]);
    m.compact_conf_to(4);
    assert_eq!(m.conf_history.len(), 2);
    m.compact_conf_to(5);
    assert_eq!(m.snapshot_conf_state, two);
    assert_eq!(m.conf_history, vec![(8, three.clone())]);
    m.compact_conf_to(9);
    assert_eq!(m.snapshot_conf_state, three);
    assert!(m.conf_history.is_empty());
}

/// model.rs `record_addresses` replaced by `()` and its `==` replaced by
/// `!=`: addresses are added, an address of a known member is updated in
/// place, and the book stays sorted by id.
#[test]
fn the_address_book_adds_updates_and_sorts() {
    let mut m = ReplicaMeta::empty("c", 1, 0);
    let member = |id, address: &str| Member {
        id,
        address: address.into(),
    };
    m.record_addresses(&[member(3, "h3:1"), member(1, "h1:1")]);
    assert_eq!(m.members, vec![member(1, "h1:1"), member(3, "h3:1")]);
    m.record_addresses(&[member(3, "h3:2"), member(2, "h2:1")]);
    assert_eq!(
        m.members,
        vec![member(1, "h1:1"), member(2, "h2:1"), member(3, "h3:2")]
    );
}

fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
        ..Default::default()
    }
}

/// A replica whose snapshot membership is `at_snapshot` and whose
/// membership now is `now`.
fn meta_with(at_snapshot: ConfState, now: ConfState) -> ReplicaMeta {
    let mut m = ReplicaMeta::initialized("c", 1, vec![1], 0);
    m.install_snapshot_conf(at_snapshot);
    m.record_conf_changes(&[(5, now)]);
    m
}

/// model.rs `snapshot_conf_for`: every `||` of the membership test replaced
/// by `&&`, every `&&` of the condition replaced by `||`, its `!=` replaced
/// by `==` and its `!` deleted. A recipient that joined after the snapshot
/// gets it with itself added as a learner; one that was in it in any role,
/// one that is no member now, replica 0 and a joint snapshot membership
/// get the snapshot's membership unchanged.
#[test]
fn a_snapshot_includes_a_recipient_added_after_it_as_a_learner() {
    let base = conf(&[1, 2, 3], &[]);
    // Added after the snapshot, as a learner or as a voter.
    let m = meta_with(base.clone(), conf(&[1, 2, 3], &[4]));
    assert_eq!(m.snapshot_conf_for(4), conf(&[1, 2, 3], &[4]));
    let m = meta_with(base.clone(), conf(&[1, 2, 3, 4], &[]));
    assert_eq!(m.snapshot_conf_for(4), conf(&[1, 2, 3], &[4]));
    // Added after it through the joint state's learners_next / outgoing
    // voters only.
    let now = ConfState {
        voters_outgoing: vec![1, 2, 3, 4],
        ..conf(&[1, 2, 3], &[])
    };
    let m = meta_with(base.clone(), now);
    assert_eq!(m.snapshot_conf_for(4), conf(&[1, 2, 3], &[4]));
    let now = ConfState {
        learners_next: vec![4],
        ..conf(&[1, 2, 3], &[])
    };
    let m = meta_with(base.clone(), now);
    assert_eq!(m.snapshot_conf_for(4), conf(&[1, 2, 3], &[4]));

    // In the snapshot already, in each role: unchanged.
    let m = meta_with(base.clone(), conf(&[1, 2, 3], &[4]));
    assert_eq!(m.snapshot_conf_for(2), base);
    let with_learner = conf(&[1, 2, 3], &[4]);
    let m = meta_with(with_learner.clone(), conf(&[1, 2, 3, 4], &[]));
    assert_eq!(m.snapshot_conf_for(4), with_learner);
    let with_next = ConfState {
        learners_next: vec![4],
        ..conf(&[1, 2, 3], &[])
    };
    let m = meta_with(with_next.clone(), conf(&[1, 2, 3, 4], &[]));
    assert_eq!(m.snapshot_conf_for(4), with_next);
    // No member now, or replica 0: unchanged.
    let m = meta_with(base.clone(), conf(&[1, 2, 3], &[]));
    assert_eq!(m.snapshot_conf_for(9), base);
    assert_eq!(m.snapshot_conf_for(0), base);
    // A joint snapshot membership is never changed (raft-rs would refuse
    // a learner added to it).
    let joint_at_snapshot = ConfState {
        voters_outgoing: vec![1, 2],
        ..conf(&[1, 2, 3], &[])
    };
    let m = meta_with(joint_at_snapshot.clone(), conf(&[1, 2, 3, 4], &[]));
    assert_eq!(m.snapshot_conf_for(4), joint_at_snapshot);
}

/// model.rs `conf_state_at_snapshot -> Default::default()`: a snapshot
/// carries the membership of its position, and metadata written before the
/// snapshot membership was kept (none recorded, no history) falls back to
/// the current one.
#[test]
fn a_snapshot_carries_the_membership_of_its_position() {
    let m = meta_with(conf(&[1, 2, 3], &[]), conf(&[1, 2, 3, 4], &[]));
    assert_eq!(m.conf_state_at_snapshot(), conf(&[1, 2, 3], &[]));
    // A membership set without a history record (`LogUpdate::conf_state`)
    // is not the snapshot's.
    let mut set = ReplicaMeta::initialized("c", 1, vec![1, 2], 0);
    set.conf_state = conf(&[1, 2, 3], &[]);
    assert_eq!(set.conf_state_at_snapshot(), conf(&[1, 2], &[]));
    let mut old = ReplicaMeta::initialized("c", 1, vec![1, 2], 0);
    old.snapshot_conf_state = ConfState::default();
    assert_eq!(old.conf_state_at_snapshot(), conf(&[1, 2], &[]));
}

/// model.rs decode: `>=` of the history order check replaced by `<`. A
/// metadata record whose membership history repeats or goes back is
/// corrupt; one in order after the snapshot decodes.
#[test]
fn membership_history_out_of_order_is_corrupt() {
    use prost::Message as _;
    use replog_proto::storage as pb;
    let record = |indexes: &[u64]| {
        let m = pb::ReplicaMetadata {
            format_version: 1,
            cluster_id: "c".into(),
            replica_id: 1,
            status: pb::ReplicaStatus::Voting as i32,
            snapshot_index: 3,
            conf_history: indexes
                .iter()
                .map(|&index| pb::ConfChangeRecord {
                    index,
                    conf_state: Some(pb::ConfState {
                        voters: vec![1],
                        ..Default::default()
                    }),
                })
                .collect(),
            ..Default::default()
        };
        frame::encode(b"replica", &m.encode_to_vec())
    };
    let ok = records::decode_meta(&record(&[4, 9]), String::new).unwrap();
    assert_eq!(
        ok.conf_history.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [4, 9]
    );
    assert_eq!(ok.first_index(), 4);
    for bad in [&[4, 4][..], &[9, 4], &[3], &[2, 5]] {
        let e = records::decode_meta(&record(bad), || "meta".into()).unwrap_err();
        assert!(
            e.is_corruption() && e.to_string().contains("out of order"),
            "{bad:?}: {e}"
        );
    }
}

/// model.rs `now_unix_ms -> 0` / `-> 1`: the clock in milliseconds since
/// the epoch (creation times in the metadata and identity come from it).
#[test]
fn the_clock_reads_milliseconds_since_the_epoch() {
    let ms = replog_storage::now_unix_ms();
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        ms / 1000 >= s.saturating_sub(5) && ms / 1000 <= s + 5,
        "{ms} ms vs {s} s"
    );
}

// RocksStorage::open on damaged data directories. Each test damages a real
// replica the way a disk or an operator would and checks the exact outcome
// of all three opens: strict (an error naming what is damaged), non-strict
// read-only (the damage reported, the intact prefix served as RECOVERING,
// not a byte changed) and non-strict writable (the same, persisted: a
// strict open afterwards finds a clean RECOVERING replica).

/// Key of the metadata record in the `meta` family.
const META_KEY: &[u8] = b"replica";

/// The last position of [`replica_with_log`].
const LAST: u64 = 9;

/// Replica 1 of cluster "c" in `dir` holding positions 2..=9 (term 2), each
/// written, committed, applied and synced by a write of its own (one WAL
/// record each); `flushed`: moved to table files as well. Returns the
/// entries.
fn replica_with_log(dir: &Path, flushed: bool) -> Vec<Entry> {
    let s = init(dir, "c");
    let all = conformance::entries(2..=LAST, 2, 64);
    for e in &all {
        s.write(LogUpdate {
            entries: vec![e.clone()],
            hard_state: Some(HardState {
                term: 2,
                commit: e.index,
                ..Default::default()
            }),
            applied: Some(e.index),
            sync: true,
            ..Default::default()
        })
        .unwrap();
    }
    if flushed {
        s.flush().unwrap();
    }
    all
}

/// Changes the records of the healthy replica in `dir` behind the
/// storage's back, as damage would: `change` gets its RocksDB and the
/// `meta` and `log` families. The change is synced before the replica is
/// closed.
fn tamper(dir: &Path, change: impl FnOnce(&DB, &ColumnFamily, &ColumnFamily)) {
    let (s, _) = RocksStorage::open(dir, &OpenOptions::default()).unwrap();
    let db = s.shared_db();
    change(
        &db,
        db.cf_handle("meta").unwrap(),
        db.cf_handle("log").unwrap(),
    );
    db.flush_wal(true).unwrap();
}

/// The data files of `dir` with their contents (RocksDB's info log and
/// lock file left out: every open writes those).
fn data_files(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut v = fingerprint(dir);
    v.retain(|(name, _, _)| !name.starts_with("LOG") && name != "LOCK");
    v
}

fn lenient(read_only: bool) -> OpenOptions {
    OpenOptions {
        strict: false,
        read_only,
        ..Default::default()
    }
}

/// What a non-strict open found and serves.
#[derive(Debug)]
struct Recovered {
    damage: Vec<String>,
    status: ReplicaStatus,
    last_index: u64,
    commit: u64,
}

impl Recovered {
    /// Panics unless some line of the damage report contains every one of
    /// `parts`.
    fn assert_damage(&self, parts: &[&str]) {
        assert!(
            self.damage
                .iter()
                .any(|line| parts.iter().all(|p| line.contains(p))),
            "no damage line contains all of {parts:?}: {:#?}",
            self.damage
        );
    }
}

/// Opens `dir` non-strict (read-only: checks that no data file changed)
/// and checks what every open must keep: the report agrees with itself,
/// damage means RECOVERING, the commit position is within the log, and
/// what is served is exactly `original` up to the last intact position.
fn open_lenient(dir: &Path, read_only: bool, original: &[Entry]) -> Recovered {
    let before = data_files(dir);
    let (s, report) = RocksStorage::open(dir, &lenient(read_only)).unwrap();
    assert_eq!(report.is_clean(), report.damage.is_empty());
    assert_eq!(report.last_index, s.last_index());
    let meta = s.meta();
    if !report.is_clean() {
        assert_eq!(meta.status, ReplicaStatus::Recovering, "{report:?}");
    }
    let last = s.last_index();
    assert!(meta.hard_state.commit <= last && meta.applied_index <= meta.hard_state.commit);
    let first = s.first_index_now();
    let served = s.read_entries(first, last + 1, None).unwrap();
    let expected: Vec<Entry> = original
        .iter()
        .filter(|e| e.index >= first && e.index <= last)
        .cloned()
        .collect();
    assert_eq!(served, expected, "served after a non-strict open");
    drop(s);
    if read_only {
        assert_eq!(data_files(dir), before, "a read-only open changed the data");
    }
    Recovered {
        damage: report.damage,
        status: meta.status,
        last_index: last,
        commit: meta.hard_state.commit,
    }
}

/// Opens `dir` non-strict read-only, then non-strict writable, then
/// strictly: the writable open persisted its repair, so the strict one
/// finds nothing wrong and the same RECOVERING replica. Returns what the
/// read-only and the writable open found.
fn recover(dir: &Path, original: &[Entry]) -> (Recovered, Recovered) {
    let read_only = open_lenient(dir, true, original);
    let writable = open_lenient(dir, false, original);
    let (s, report) = RocksStorage::open(dir, &OpenOptions::default())
        .expect("a strict open after a non-strict repair");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(s.meta().status, writable.status);
    assert_eq!(s.last_index(), writable.last_index);
    assert_eq!(s.meta().hard_state.commit, writable.commit);
    (read_only, writable)
}

/// The error of opening `dir` with `opts`, which must fail. A refused
/// read-only open changes no data file; a refused writable one may (RocksDB
/// moves its WAL to a table file before the replica's records are
/// checked) but repairs nothing: a second open is refused the same way.
fn open_err(dir: &Path, opts: &OpenOptions) -> StorageError {
    let before = data_files(dir);
    let e = RocksStorage::open(dir, opts)
        .err()
        .unwrap_or_else(|| panic!("{opts:?}: opened a damaged replica"));
    if opts.read_only {
        assert_eq!(data_files(dir), before, "a refused read-only open wrote");
    }
    let again = RocksStorage::open(dir, opts).err().map(|e| e.to_string());
    assert_eq!(again, Some(e.to_string()), "{opts:?}: refused, then not");
    e
}

fn strict_open_err(dir: &Path) -> StorageError {
    open_err(dir, &OpenOptions::default())
}

/// A clean replica opens clean in every mode (rocks.rs
/// `RecoveryReport::is_clean -> false`; `column_families_on_disk` -> an
/// empty list, `[""]` or `["xyzzy"]`, which a read-only open names: the
/// function of 7f9178c, `families_to_open` since).
#[test]
fn a_clean_replica_opens_clean_in_every_mode() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, true);
    for read_only in [true, false] {
        let r = open_lenient(&p, read_only, &all);
        assert!(r.damage.is_empty(), "{r:?}");
        assert_eq!(
            (r.status, r.last_index, r.commit),
            (ReplicaStatus::Voting, LAST, LAST)
        );
    }
    let (s, report) = RocksStorage::open(&p, &OpenOptions::default()).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.last_index, LAST);
    assert_eq!(s.meta().status, ReplicaStatus::Voting);
}

/// A lost REPLICA-IDENTITY file (rocks.rs `open`'s persist guard
/// `!damage.is_empty() && !opts.read_only` with `&&` replaced by `||` or
/// either `!` deleted, which every damage test here kills too;
/// `persist_recovery -> Ok(())` and its `delete !`): strict, a corruption
/// naming the file; non-strict, damage, RECOVERING with the whole log, and
/// the writable open writes the file again from the metadata.
#[test]
fn a_lost_identity_file_is_damage_and_is_written_again() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, false);
    let id_file = p.join(identity::IDENTITY_FILE);
    let id_before = std::fs::read(&id_file).unwrap();
    std::fs::remove_file(&id_file).unwrap();

    let e = strict_open_err(&p);
    assert!(
        e.is_corruption() && e.to_string().contains("REPLICA-IDENTITY: file is missing"),
        "{e}"
    );
    let read_only = open_lenient(&p, true, &all);
    read_only.assert_damage(&["REPLICA-IDENTITY is missing"]);
    assert_eq!(read_only.last_index, LAST);
    assert!(!id_file.exists(), "a read-only open wrote the identity");
    let (_, writable) = recover(&p, &all);
    writable.assert_damage(&["REPLICA-IDENTITY is missing"]);
    assert_eq!(
        (writable.status, writable.last_index, writable.commit),
        (ReplicaStatus::Recovering, LAST, LAST)
    );
    assert_eq!(
        std::fs::read(&id_file).unwrap(),
        id_before,
        "identity rewritten"
    );
}

/// A damaged REPLICA-IDENTITY file (rocks.rs `read_identity`'s guard
/// `!strict && e.is_corruption()` replaced by `false`, its `&&` by `||`,
/// its `!` deleted): strict, a corruption error; non-strict, damage and
/// the file written again.
#[test]
fn a_damaged_identity_file_is_damage_and_is_written_again() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, false);
    let id_file = p.join(identity::IDENTITY_FILE);
    let id_before = std::fs::read(&id_file).unwrap();
    let mut bad = id_before.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0xA5;
    std::fs::write(&id_file, &bad).unwrap();

    let e = strict_open_err(&p);
    assert!(
        e.is_corruption() && e.to_string().contains("REPLICA-IDENTITY"),
        "{e}"
    );
    let (read_only, writable) = recover(&p, &all);
    for r in [&read_only, &writable] {
        r.assert_damage(&["REPLICA-IDENTITY", "crc32c mismatch"]);
        assert_eq!((r.status, r.last_index), (ReplicaStatus::Recovering, LAST));
    }
    assert_eq!(
        std::fs::read(&id_file).unwrap(),
        id_before,
        "identity rewritten"
    );
}

/// An identity file that cannot be read at all (here: a directory in its
/// place) is an I/O error in every mode, never damage to recover from
/// (rocks.rs `read_identity`'s guard replaced by `true`).
#[test]
fn an_unreadable_identity_file_is_an_error_in_every_mode() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    replica_with_log(&p, false);
    let id_file = p.join(identity::IDENTITY_FILE);
    std::fs::remove_file(&id_file).unwrap();
    std::fs::create_dir(&id_file).unwrap();
    for opts in [OpenOptions::default(), lenient(true), lenient(false)] {
        match RocksStorage::open(&p, &opts) {
            Err(StorageError::Io { path, .. }) => assert_eq!(path, id_file),
            Err(e) => panic!("{opts:?}: expected an I/O error, got {e}"),
            Ok(_) => panic!("{opts:?}: opened with an unreadable identity file"),
        }
    }
}

/// A bad metadata record (rocks.rs `read_meta`'s guard `!opts.strict`
/// replaced by `true` / `false` and its `!` deleted; `meta_location ->
/// ""` / `"xyzzy"`): strict, a corruption naming the record; non-strict, the metadata is rebuilt from
/// the identity file: RECOVERING, no membership, no log (the log cannot be
/// trusted without the compaction point it continues from).
#[test]
fn a_bad_metadata_record_is_rebuilt_from_the_identity() {
    for missing in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        let all = replica_with_log(&p, false);
        let created = identity::read(&p).unwrap().unwrap().created_at_unix_ms;
        tamper(&p, |db, meta, _| {
            if missing {
                db.delete_cf(meta, META_KEY).unwrap();
            } else {
                db.put_cf(meta, META_KEY, b"not a record").unwrap();
            }
        });
        let why = if missing {
            "metadata record is missing"
        } else {
            "unknown frame version 110"
        };
        let location = format!("{} column family 'meta' key 'replica'", p.display());

        let e = strict_open_err(&p);
        assert!(e.is_corruption(), "{e}");
        assert!(
            e.to_string().contains(&location) && e.to_string().contains(why),
            "{e}"
        );
        let (read_only, writable) = recover(&p, &all);
        for r in [&read_only, &writable] {
            r.assert_damage(&[&location, why]);
            r.assert_damage(&[
                "position 1",
                "gap: position 1 is missing, next present is 2",
            ]);
            assert_eq!(
                (r.status, r.last_index, r.commit),
                (ReplicaStatus::Recovering, 0, 0)
            );
        }
        let (s, _) = RocksStorage::open(&p, &OpenOptions::default()).unwrap();
        let m = s.meta();
        assert_eq!((m.cluster_id.as_str(), m.replica_id), ("c", 1));
        assert_eq!(m.created_at_unix_ms, created);
        assert_eq!((m.snapshot_index, m.applied_index), (0, 0));
        assert!(m.conf_state.voters.is_empty() && m.members.is_empty());
        assert_eq!(s.first_index_now(), 1);
    }
}

/// With both the identity file and the metadata record unreadable, the
/// replica's identity is lost: every open fails (no survivor; the case
/// the two above leave out).
#[test]
fn a_replica_without_identity_and_metadata_is_lost() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    replica_with_log(&p, false);
    tamper(&p, |db, meta, _| {
        db.put_cf(meta, META_KEY, b"not a record").unwrap()
    });
    std::fs::remove_file(p.join(identity::IDENTITY_FILE)).unwrap();
    let e = strict_open_err(&p);
    assert!(e.to_string().contains("file is missing"), "{e}");
    for read_only in [true, false] {
        let e = open_err(&p, &lenient(read_only));
        assert!(
            e.is_corruption() && e.to_string().contains("identity is lost"),
            "{e}"
        );
    }
}

/// Metadata of another replica or cluster than the identity file names
/// is refused in every mode (rocks.rs `read_meta`: `||` replaced by `&&`).
#[test]
fn metadata_of_another_replica_than_the_identity_is_refused() {
    for (cluster, replica) in [("c", 2), ("d", 1)] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        replica_with_log(&p, false);
        let ident = ReplicaIdentity {
            cluster_id: cluster.into(),
            replica_id: replica,
            ..identity::read(&p).unwrap().unwrap()
        };
        std::fs::write(
            p.join(identity::IDENTITY_FILE),
            records::encode_identity(&ident),
        )
        .unwrap();
        let says = format!(
            "metadata says cluster 'c' replica 1, REPLICA-IDENTITY says cluster '{cluster}' replica {replica}"
        );
        for opts in [OpenOptions::default(), lenient(true), lenient(false)] {
            let e = open_err(&p, &opts);
            assert!(e.is_corruption() && e.to_string().contains(&says), "{e}");
        }
    }
}

/// Without the identity file, the metadata record is checked against the
/// expected cluster instead (no survivor: `read_meta`'s own check, which
/// the identity file's otherwise makes first).
#[test]
fn without_the_identity_file_the_metadata_names_the_cluster() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    replica_with_log(&p, false);
    std::fs::remove_file(p.join(identity::IDENTITY_FILE)).unwrap();
    for read_only in [true, false] {
        let opts = OpenOptions {
            expected_cluster_id: Some("other".into()),
            ..lenient(read_only)
        };
        let e = open_err(&p, &opts);
        assert!(matches!(e, StorageError::ClusterMismatch { .. }), "{e}");
    }
}

/// A bad log record (rocks.rs `keep_intact_prefix`'s `!` of
/// `!damage.is_empty()` deleted: a damaged replica left VOTING;
/// `rewrite_after_recovery -> Ok(())` and its `+` replaced by `-` / `*`):
/// strict, a corruption naming the position;
/// non-strict, the log is cut before it, the commit position clamped to
/// what is left, RECOVERING; the writable open deletes the bad tail, so
/// that a strict open afterwards finds the intact prefix and nothing else.
#[test]
fn a_bad_log_record_cuts_the_log_before_it() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, false);
    tamper(&p, |db, _, log| {
        db.put_cf(log, replog_storage::position_key(6), b"not a record")
            .unwrap()
    });
    let at_6 = format!("{} column family 'log' position 6", p.display());

    let e = strict_open_err(&p);
    assert!(e.is_corruption() && e.to_string().contains(&at_6), "{e}");
    let (read_only, writable) = recover(&p, &all);
    for r in [&read_only, &writable] {
        r.assert_damage(&[&at_6, "dropped the log from position 6 on"]);
        r.assert_damage(&[
            "commit position 9 is beyond the last intact position 5: committed entries are missing",
        ]);
        assert_eq!(
            (r.status, r.last_index, r.commit),
            (ReplicaStatus::Recovering, 5, 5)
        );
    }
    // The bad record and the intact ones after it are gone from disk: a
    // raw look at the log family finds positions 2..=5 only.
    tamper(&p, |db, _, log| {
        let keys: Vec<u64> = db
            .iterator_cf(log, replog_storage::rocksdb::IteratorMode::Start)
            .map(|kv| replog_storage::key_position(&kv.unwrap().0).unwrap())
            .collect();
        assert_eq!(keys, vec![2, 3, 4, 5]);
    });
}

/// Committed entries missing at the end of the log (rocks.rs
/// `keep_intact_prefix`: the location's `+` replaced by `-` / `*`): strict, a corruption at the first missing
/// position; non-strict, the commit position clamped.
#[test]
fn committed_entries_missing_at_the_end_are_damage() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, false);
    tamper(&p, |db, _, log| {
        for i in [8, 9] {
            db.delete_cf(log, replog_storage::position_key(i)).unwrap();
        }
    });
    let e = strict_open_err(&p);
    let msg = e.to_string();
    assert!(e.is_corruption(), "{e}");
    assert!(
        msg.contains(&format!("{} column family 'log' position 8", p.display()))
            && msg.contains("commit position 9 is beyond the last intact position 7"),
        "{e}"
    );
    let (read_only, writable) = recover(&p, &all);
    for r in [&read_only, &writable] {
        assert_eq!(r.damage.len(), 1, "{r:?}");
        assert_eq!(
            (r.status, r.last_index, r.commit),
            (ReplicaStatus::Recovering, 7, 7)
        );
    }
}

/// Damage done to the log family of a replica's RocksDB.
type LogDamage = fn(&DB, &ColumnFamily);

/// A gap in the log, an entry at or before the compaction point, and a
/// term going down are each damage at the position where they are
/// (rocks.rs `check_log_record`: `<` replaced by `==` / `>` in which of
/// the first two it is).
#[test]
fn gaps_stale_entries_and_falling_terms_are_damage_where_they_are() {
    let cases: [(&str, LogDamage, u64, &str); 3] = [
        (
            "gap",
            |db, log| db.delete_cf(log, replog_storage::position_key(6)).unwrap(),
            5,
            "position 6: gap: position 6 is missing, next present is 7",
        ),
        (
            "stale",
            |db, log| {
                let stale = Entry {
                    index: 1,
                    term: 1,
                    ..Default::default()
                };
                db.put_cf(
                    log,
                    replog_storage::position_key(1),
                    records::encode_log_entry(&stale),
                )
                .unwrap()
            },
            1,
            "position 2: entry 1 is at or before the compaction point 1",
        ),
        (
            "term",
            |db, log| {
                let low = Entry {
                    index: 7,
                    term: 1,
                    data: vec![7; 64].into(),
                    ..Default::default()
                };
                db.put_cf(
                    log,
                    replog_storage::position_key(7),
                    records::encode_log_entry(&low),
                )
                .unwrap()
            },
            6,
            "position 7: term 1 is below the previous term 2",
        ),
    ];
    for (name, damage, last, why) in cases {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        let all = replica_with_log(&p, false);
        tamper(&p, |db, _, log| damage(db, log));
        let e = strict_open_err(&p);
        assert!(
            e.is_corruption() && e.to_string().contains(why),
            "{name}: {e}"
        );
        // The repair deletes the log after the intact prefix only: a stale
        // entry before it stays, and a strict open keeps refusing it
        // (docs/reliability.md, "Mutation testing").
        let writable = if name == "stale" {
            open_lenient(&p, true, &all);
            open_lenient(&p, false, &all)
        } else {
            recover(&p, &all).1
        };
        writable.assert_damage(&[why]);
        assert_eq!(
            (writable.status, writable.last_index),
            (ReplicaStatus::Recovering, last),
            "{name}"
        );
    }
}

/// Flips one byte at `offset` of the file `name` in `dir`.
fn flip(dir: &Path, name: &str, offset: usize) {
    let path = dir.join(name);
    let mut data = std::fs::read(&path).unwrap();
    data[offset] ^= 0xA5;
    std::fs::write(&path, data).unwrap();
}

/// The name of the one WAL file of `dir` that holds records.
fn wal_file(dir: &Path) -> String {
    let names: Vec<String> = fingerprint(dir)
        .into_iter()
        .filter(|(name, len, _)| name.ends_with(".log") && *len > 0)
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0].clone()
}

/// A damaged record in the middle of the WAL (rocks.rs `open_db`'s guard
/// `opts.strict` replaced by `true` / `false`; `db_options ->
/// Default::default()`, whose point-in-time WAL recovery would cut the log
/// silently in a strict open): strict, RocksDB's own error; non-strict,
/// the log up to the damaged record, RECOVERING.
#[test]
fn a_damaged_wal_record_is_refused_strictly_and_cut_leniently() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, false);
    let wal = wal_file(&p);
    let len = std::fs::metadata(p.join(&wal)).unwrap().len() as usize;
    flip(&p, &wal, len / 2);

    let e = strict_open_err(&p);
    assert!(
        matches!(e, StorageError::Rocks { .. }) && e.is_corruption(),
        "{e}"
    );
    let (read_only, writable) = recover(&p, &all);
    for r in [&read_only, &writable] {
        r.assert_damage(&["RocksDB refused the data as it is", "Corruption"]);
        assert_eq!(r.status, ReplicaStatus::Recovering);
        assert!(r.last_index > 1 && r.last_index < LAST, "{r:?}");
    }
    assert_eq!(read_only.last_index, writable.last_index);
}

/// A damaged MANIFEST (rocks.rs `open_db`'s guard `opts.read_only`
/// replaced by `true` / `false`): strict and non-strict read-only, an
/// error (a read-only open never repairs; strict, the storage's own
/// MANIFEST check names it); non-strict writable, RocksDB's
/// repair rebuilds it from the table files: every position is back, and
/// the replica is RECOVERING all the same.
#[test]
fn a_damaged_manifest_is_repaired_only_by_a_writable_lenient_open() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, true);
    let manifest = std::fs::read_to_string(p.join("CURRENT")).unwrap();
    // The first record: flipping a byte of the last ones may read as a
    // torn write that RocksDB drops (see docs/reliability.md).
    flip(&p, manifest.trim(), 12);

    // Strict: the MANIFEST check refuses it before RocksDB reads it;
    // non-strict read-only: RocksDB refuses it, and nothing is repaired.
    let strict = open_err(&p, &OpenOptions::default());
    assert!(
        matches!(&strict, StorageError::Corrupt { location, .. } if location.contains("MANIFEST")),
        "{strict}"
    );
    let read_only = open_err(&p, &lenient(true));
    assert!(
        matches!(read_only, StorageError::Rocks { .. }) && read_only.is_corruption(),
        "{read_only}"
    );
    let writable = open_lenient(&p, false, &all);
    writable.assert_damage(&["RocksDB's MANIFEST is damaged", "fails its crc32c"]);
    writable.assert_damage(&["RocksDB refused the data as it is"]);
    writable.assert_damage(&["point-in-time recovery failed too", "repaired the database"]);
    assert_eq!(
        (writable.status, writable.last_index, writable.commit),
        (ReplicaStatus::Recovering, LAST, LAST)
    );
    let (s, report) = RocksStorage::open(&p, &OpenOptions::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(s.meta().status, ReplicaStatus::Recovering);
}

/// A damaged data block of the log's table file (rocks.rs
/// `verify_repairing`: either `||` replaced by `&&`, `!` deleted;
/// `verify`'s `||` replaced by `&&`): strict, a corruption at the first
/// position of the block; non-strict read-only, the log cut before it,
/// nothing repaired or written; non-strict writable, RocksDB's repair runs
/// first.
#[test]
fn a_damaged_table_block_is_repaired_only_by_a_writable_lenient_open() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let all = replica_with_log(&p, true);
    let mut log_table = String::new();
    tamper(&p, |db, _, _| {
        let tables: Vec<String> = db
            .live_files()
            .unwrap()
            .into_iter()
            .filter(|f| f.column_family_name == "log")
            .map(|f| f.name.trim_start_matches('/').to_string())
            .collect();
        assert_eq!(tables.len(), 1, "{tables:?}");
        log_table = tables[0].clone();
    });
    // The first data block starts at offset 0: all eight positions.
    flip(&p, &log_table, 20);
    let at_2 = format!("{} column family 'log' position 2", p.display());

    let e = strict_open_err(&p);
    assert!(e.is_corruption() && e.to_string().contains(&at_2), "{e}");
    assert!(e.to_string().contains("block checksum mismatch"), "{e}");
    let (read_only, writable) = recover(&p, &all);
    for r in [&read_only, &writable] {
        r.assert_damage(&[&at_2, "block checksum mismatch"]);
        r.assert_damage(&["commit position 9 is beyond the last intact position 1"]);
        assert_eq!(
            (r.status, r.last_index, r.commit),
            (ReplicaStatus::Recovering, 1, 1)
        );
    }
    let repaired = "RocksDB reported corrupt blocks; repaired the database";
    assert!(
        !read_only.damage.iter().any(|l| l == repaired),
        "{read_only:?}"
    );
    writable.assert_damage(&[repaired]);
}

// RocksStorage outside recovery: creation, limits, and the read paths'
// errors.

/// rocks.rs `validate_cluster_id`: each `||` of the allowed characters
/// replaced by `&&`, and the length limit.
#[test]
fn cluster_ids_are_letters_digits_dots_underscores_and_dashes() {
    for ok in ["a", "a.b", "a_b", "a-b", "A9._-z", &"x".repeat(128)] {
        replog_storage::validate_cluster_id(ok).unwrap();
    }
    for bad in ["", "a b", "a/b", "a:b", "é", &"x".repeat(129)] {
        assert!(
            matches!(
                replog_storage::validate_cluster_id(bad),
                Err(StorageError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
}

/// rocks.rs `disk_usage`: the `+=` of a subdirectory's total replaced by
/// `-=` / `*=`.
#[test]
fn disk_usage_sums_every_file_below_the_directory() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("sub");
    std::fs::create_dir_all(sub.join("deeper")).unwrap();
    std::fs::write(d.path().join("a"), [0u8; 10]).unwrap();
    std::fs::write(sub.join("b"), [0u8; 20]).unwrap();
    std::fs::write(sub.join("deeper").join("c"), [0u8; 5]).unwrap();
    assert_eq!(replog_storage::disk_usage(d.path()).unwrap(), 35);
}

/// rocks.rs `create`: the `NotFound` guard on reading the directory
/// replaced by `true` (any read error taken for "no directory yet", after
/// which initialize would create a database in a directory it could not
/// look into), and the address book (`members`) deleted from the
/// metadata it writes.
#[test]
fn initialize_keeps_the_address_book_and_refuses_what_it_cannot_read() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    match RocksStorage::initialize(&file, &replog_storage::InitOptions::single_replica("c")) {
        Err(StorageError::Io { path, source }) => {
            assert_eq!(path, file);
            assert_eq!(source.kind(), std::io::ErrorKind::NotADirectory);
        }
        Err(e) => panic!("expected the read error, got {e}"),
        Ok(_) => panic!("initialized a file"),
    }
    let members: Vec<Member> = (1..=3)
        .map(|id| Member {
            id,
            address: format!("h{id}:7000"),
        })
        .collect();
    let init = replog_storage::InitOptions {
        cluster_id: "c".into(),
        replica_id: 2,
        members: members.clone(),
    };
    let voting = RocksStorage::initialize(&d.path().join("v"), &init).unwrap();
    let empty = RocksStorage::create_empty(&d.path().join("e"), &init).unwrap();
    for (s, status) in [
        (voting, ReplicaStatus::Voting),
        (empty, ReplicaStatus::Empty),
    ] {
        let dir = s.dir().to_path_buf();
        drop(s);
        let (s, _) = RocksStorage::open(&dir, &OpenOptions::default()).unwrap();
        assert_eq!(s.meta().members, members);
        assert_eq!((s.meta().status, s.meta().replica_id), (status, 2));
    }
}

/// rocks.rs `DEFAULT_MAX_RECORD_BYTES` (256 MiB) with a `*` replaced by
/// `+` (1 MiB + 256 bytes, or 257 KiB): an entry of 2 MiB is written and
/// read back with the default options; the write's limit is on the framed
/// record, inclusive (`>` replaced by `>=` in `stage_entries`).
#[test]
fn records_up_to_the_limit_are_written_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    let s = init(&p, "c");
    let big = conformance::entries(2..=2, 2, 2 << 20);
    s.write(LogUpdate {
        entries: big.clone(),
        sync: true,
        ..Default::default()
    })
    .unwrap();
    drop(s);
    let (s, report) = RocksStorage::open(&p, &OpenOptions::default()).unwrap();
    assert!(report.is_clean());
    assert_eq!(s.read_entries(2, 3, None).unwrap(), big);
    drop(s);

    // A limit of exactly one framed record: that record is written, one a
    // byte larger is refused.
    let q = d.path().join("q");
    drop(init(&q, "c"));
    let one = conformance::entries(2..=2, 2, 100);
    let limit = records::encode_log_entry(&one[0]).len();
    let opts = OpenOptions {
        max_record_bytes: limit,
        ..Default::default()
    };
    let (s, _) = RocksStorage::open(&q, &opts).unwrap();
    let over = conformance::entries(2..=2, 2, 101);
    let e = s
        .write(LogUpdate {
            entries: over,
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { .. }), "{e}");
    s.write(LogUpdate {
        entries: one.clone(),
        sync: true,
        ..Default::default()
    })
    .unwrap();
    drop(s);
    let (s, _) = RocksStorage::open(&q, &opts).unwrap();
    assert_eq!(s.read_entries(2, 3, None).unwrap(), one);
}

/// rocks.rs `first_index_now` (-> 0 / 1, `+` replaced by `-` / `*`): one
/// past the compaction point.
#[test]
fn the_first_index_is_one_past_the_compaction_point() {
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("r"), "c");
    assert_eq!(s.first_index_now(), 2);
    s.write(LogUpdate {
        entries: conformance::entries(2..=9, 2, 8),
        ..Default::default()
    })
    .unwrap();
    s.write(LogUpdate {
        compact_to: Some(6),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.first_index_now(), 6);
}

/// The open replica of [`replica_with_log`] with position `index` deleted
/// behind its back (what damage found after open looks like).
fn with_position_deleted(dir: &Path, index: u64) -> RocksStorage {
    replica_with_log(dir, false);
    let (s, _) = RocksStorage::open(dir, &OpenOptions::default()).unwrap();
    let db = s.shared_db();
    db.delete_cf(
        db.cf_handle("log").unwrap(),
        replog_storage::position_key(index),
    )
    .unwrap();
    s
}

fn assert_missing_at(r: Result<impl std::fmt::Debug, StorageError>, dir: &Path, index: u64) {
    match r {
        Err(StorageError::Corrupt { location, reason }) => {
            let at = format!("{} column family 'log' position {index}", dir.display());
            assert_eq!(
                (location.as_str(), reason.as_str()),
                (at.as_str(), "entry is missing")
            );
        }
        other => panic!("expected position {index} to be missing, got {other:?}"),
    }
}

/// An entry missing inside the log of an open replica is corruption at its
/// position, whether in the middle or the last one, never "compacted" or
/// "past the end" (rocks.rs `missing`: `<=` replaced by `>`, `>` replaced
/// by `==` / `<` / `>=`; `read_entries`' final check `<` replaced by `>`,
/// and its `stopped_by_size` `>` replaced by `>=`: a read whose size limit
/// equals what it found is not cut by the limit).
#[test]
fn an_entry_missing_from_an_open_log_is_corruption_where_it_is() {
    for index in [6, LAST] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        let s = with_position_deleted(&p, index);
        assert_missing_at(s.read_entries(2, LAST + 1, None), &p, index);
        assert_missing_at(s.entry_term(index), &p, index);
        if index == LAST {
            // Positions 2..=8 hold 7 * 64 bytes of data: exactly the limit.
            assert_missing_at(s.read_entries(2, LAST + 1, Some(7 * 64)), &p, index);
        }
    }
}

/// The errors of reads outside the log name the position asked for and
/// the bounds (rocks.rs `read_entries`: `+` of `first` replaced by `-` /
/// `*`, `high - 1` replaced by `high + 1` / `high / 1`; `entry_term`: `+`
/// of `first` replaced by `-` / `*`).
#[test]
fn reads_outside_the_log_name_the_position_and_the_bounds() {
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("r"), "c");
    s.write(LogUpdate {
        entries: conformance::entries(2..=9, 2, 8),
        ..Default::default()
    })
    .unwrap();
    s.write(LogUpdate {
        compact_to: Some(6),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(
        s.read_entries(3, 8, None),
        Err(StorageError::Compacted { index: 3, first: 6 })
    ));
    assert!(matches!(
        s.read_entries(6, 12, None),
        Err(StorageError::Unavailable { index: 11, last: 9 })
    ));
    assert!(matches!(
        s.entry_term(3),
        Err(StorageError::Compacted { index: 3, first: 6 })
    ));
    assert!(matches!(
        s.entry_term(12),
        Err(StorageError::Unavailable { index: 12, last: 9 })
    ));
    assert_eq!(s.entry_term(5).unwrap(), 2, "the compaction point's term");
}

/// Entries of 100 bytes of data and 50 of context.
fn with_context(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|index| Entry {
            index,
            term: 2,
            data: vec![index as u8; 100].into(),
            context: vec![0xC0; 50].into(),
            ..Default::default()
        })
        .collect()
}

/// A size-limited read stops reading at its limit, counting data and
/// context, so it never touches the records after it (rocks.rs
/// `read_entries`: `+=` of the bytes read replaced by `*=`, their `+`
/// replaced by `-` / `*`), and a read for a follower is charged data and
/// context (`entries`' `+` replaced by `-`).
#[test]
fn a_size_limited_read_stops_at_its_limit_counting_data_and_context() {
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("r"), "c");
    let all = with_context(2..=9);
    s.write(LogUpdate {
        entries: all.clone(),
        ..Default::default()
    })
    .unwrap();

    s.set_fetch_budget_bytes(1 << 20);
    s.begin_fetch_turn();
    let got =
        raft::Storage::entries(&s, 2, 10, None, raft::GetEntriesContext::empty(true)).unwrap();
    assert_eq!(got, all);
    assert_eq!(
        s.fetch_stats().bytes,
        8 * 150,
        "data and context are charged"
    );

    // Position 6 damaged: a read limited to 400 bytes reads 2, 3 and 4
    // (150 bytes each) and returns what raft-rs's limit keeps of them.
    let db = s.shared_db();
    db.put_cf(
        db.cf_handle("log").unwrap(),
        replog_storage::position_key(6),
        b"not a record",
    )
    .unwrap();
    assert!(s.read_entries(2, 10, None).unwrap_err().is_corruption());
    let mut expected = all[..3].to_vec();
    raft::util::limit_size(&mut expected, Some(400));
    assert_eq!(expected.len(), 2);
    assert_eq!(s.read_entries(2, 10, Some(400)).unwrap(), expected);
}

/// With durability off, neither a write asking for it nor a sync fsyncs
/// (rocks.rs `sync`'s `&&` replaced by `||`); read-only, a sync does
/// nothing either.
#[test]
fn durability_off_and_read_only_never_fsync() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    drop(init(&p, "c"));
    let opts = OpenOptions {
        sync: false,
        ..Default::default()
    };
    let (s, _) = RocksStorage::open(&p, &opts).unwrap();
    s.write(LogUpdate {
        entries: conformance::entries(2..=3, 2, 8),
        sync: true,
        ..Default::default()
    })
    .unwrap();
    s.sync().unwrap();
    assert_eq!(s.sync_count(), 0);
    drop(s);
    let (s, _) = RocksStorage::open(&p, &lenient(true)).unwrap();
    s.sync().unwrap();
    assert_eq!(s.sync_count(), 0);
}

/// The count of reads for followers refused in this turn and remembered
/// for the next (rocks.rs `deferred_fetches -> 1`): none before a refusal,
/// one after, none once handed out again.
#[test]
fn refused_follower_reads_are_counted_until_retried() {
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("r"), "c");
    s.write(LogUpdate {
        entries: conformance::entries(2..=9, 2, 100),
        ..Default::default()
    })
    .unwrap();
    s.set_fetch_budget_bytes(100);
    s.begin_fetch_turn();
    let read = |s: &RocksStorage| {
        raft::Storage::entries(s, 2, 10, None, raft::GetEntriesContext::empty(true))
    };
    assert_eq!(s.deferred_fetches(), 0);
    assert!(read(&s).is_ok(), "the first read spends the budget");
    assert_eq!(s.deferred_fetches(), 0);
    assert!(matches!(
        read(&s),
        Err(raft::Error::Store(
            raft::StorageError::LogTemporarilyUnavailable
        ))
    ));
    assert_eq!(s.deferred_fetches(), 1);
    s.begin_fetch_turn();
    assert!(s.next_deferred_fetch().is_some());
    assert_eq!(s.deferred_fetches(), 0);
}

/// A replica without a compaction point (EMPTY, snapshot index 0) may hold
/// a log from position 1 and compact it (rocks.rs `stage_compaction`: the
/// start of the deleted range, `snapshot_index + 1`, replaced by
/// `snapshot_index - 1`, which underflows).
#[test]
fn a_log_without_a_compaction_point_compacts_from_position_one() {
    let d = tempfile::tempdir().unwrap();
    let s = RocksStorage::create_empty(
        &d.path().join("r"),
        &replog_storage::InitOptions::single_replica("c"),
    )
    .unwrap();
    assert_eq!((s.first_index_now(), s.last_index()), (1, 0));
    s.write(LogUpdate {
        entries: conformance::entries(1..=4, 1, 8),
        ..Default::default()
    })
    .unwrap();
    s.write(LogUpdate {
        compact_to: Some(3),
        ..Default::default()
    })
    .unwrap();
    assert_eq!((s.first_index_now(), s.last_index()), (3, 4));
    assert_eq!(s.entry_term(2).unwrap(), 1);
}

/// A replica made before the state machine's families existed (`meta` and
/// `log` only) opens read-only, and creates nothing (rocks.rs
/// `column_families_on_disk` of 7f9178c: `==` replaced by `!=`, which
/// names every family, on disk or not).
#[test]
fn a_replica_without_the_later_families_opens_read_only() {
    use replog_storage::rocksdb::Options;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        let db = DB::open_cf(&o, &p, ["meta", "log"]).unwrap();
        let meta = ReplicaMeta::initialized("c", 1, vec![1], 0);
        let cf = db.cf_handle("meta").unwrap();
        db.put_cf(cf, META_KEY, records::encode_meta(&meta))
            .unwrap();
        db.flush_wal(true).unwrap();
    }
    let ident = ReplicaIdentity {
        format_version: replog_storage::FORMAT_VERSION,
        cluster_id: "c".into(),
        replica_id: 1,
        created_at_unix_ms: 0,
    };
    std::fs::write(
        p.join(identity::IDENTITY_FILE),
        records::encode_identity(&ident),
    )
    .unwrap();
    let before = data_files(&p);
    let read_only = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let (s, report) = RocksStorage::open(&p, &read_only).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        (s.meta().status, s.last_index()),
        (ReplicaStatus::Voting, 1)
    );
    drop(s);
    assert_eq!(data_files(&p), before);
    assert_eq!(
        DB::list_cf(&Options::default(), &p).unwrap(),
        ["default", "meta", "log"]
    );
}
