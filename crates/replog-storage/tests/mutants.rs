//! Behaviour that `cargo mutants` found no test of in this crate (each test
//! names the survivors it kills; docs/reliability.md, "Mutation testing",
//! has the run): record limits and boundaries, the identity file's error
//! paths, what a `LogUpdate` counts as empty, metadata that must survive a
//! write and a read whole (joint membership, the hard state), and the
//! bookkeeping of membership history and addresses.

use raft::eraftpb::ConfState;
use replog_storage::{
    frame, identity, records, LogUpdate, Member, ReplicaMeta, ReplicaStatus, StorageError,
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
