//! The conformance suite of the storage contract ([`LogStorage`] on top of
//! raft-rs [`raft::Storage`]). Every implementation runs it:
//! `conformance::run_all(&mut MyHarness)`.
//!
//! Each check panics with a message naming the broken rule.

use std::ops::RangeInclusive;

use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

use crate::api::{LogStorage, LogUpdate};
use crate::error::StorageError;

/// Makes storages for the suite.
pub trait Harness {
    type S: LogStorage;
    /// A fresh storage initialized like `replog initialize` with voters `[1]`:
    /// compaction point (1, 1), no entries.
    fn fresh(&mut self) -> Self::S;
    /// Closes and reopens the storage, like a restart (or a crash: writes
    /// not followed by a sync may be lost).
    fn reopen(&mut self, s: Self::S) -> Self::S;
}

/// Syncs, then reopens: everything written so far must survive.
fn restart<H: Harness>(h: &mut H, s: H::S) -> H::S {
    s.sync().expect("sync");
    h.reopen(s)
}

/// Entries at `range` with `term` and `size` bytes of data each.
pub fn entries(range: RangeInclusive<u64>, term: u64, size: usize) -> Vec<Entry> {
    range
        .map(|i| Entry {
            index: i,
            term,
            data: vec![(i % 251) as u8; size].into(),
            ..Default::default()
        })
        .collect()
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn append<S: LogStorage>(s: &S, es: Vec<Entry>) {
    s.write(LogUpdate {
        entries: es,
        ..Default::default()
    })
    .expect("append");
}

fn is_compacted<T: std::fmt::Debug>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(raft::StorageError::Compacted)))
}

fn is_unavailable<T: std::fmt::Debug>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(raft::StorageError::Unavailable)))
}

/// Runs every check.
pub fn run_all<H: Harness>(h: &mut H) {
    fresh_bounds(h);
    append_and_read(h);
    entries_size_limit(h);
    overwrite_conflicting_tail(h);
    compaction_boundary(h);
    snapshot_metadata(h);
    snapshot_carries_membership_of_its_position(h);
    hard_and_conf_state_round_trip(h);
    compaction_of_everything_and_of_what_is_appended(h);
    install_snapshot(h);
    rejects_bad_appends(h);
    synced_writes_survive_reopen(h);
    repair_state_is_kept_and_carried_by_snapshots(h);
}

fn fresh_bounds<H: Harness>(h: &mut H) {
    let s = h.fresh();
    assert_eq!(s.first_index().unwrap(), 2, "fresh: first index");
    assert_eq!(s.last_index().unwrap(), 1, "fresh: last index");
    assert_eq!(s.term(1).unwrap(), 1, "fresh: term at the compaction point");
    assert!(
        is_compacted(s.term(0)),
        "fresh: term before the compaction point"
    );
    assert!(is_unavailable(s.term(2)), "fresh: term past the end");
    let st = s.initial_state().unwrap();
    assert_eq!(st.conf_state.voters, vec![1], "fresh: voters");
    assert_eq!(st.hard_state.commit, 1, "fresh: commit");
}

fn append_and_read<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=10, 2, 16));
    assert_eq!(s.last_index().unwrap(), 10);
    let all = s.entries(2, 11, None::<u64>, ctx()).unwrap();
    assert_eq!(all.len(), 9, "entries(2, 11)");
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.index, 2 + i as u64, "entries come in position order");
        assert_eq!(e.term, 2);
        assert_eq!(
            &e.data[..],
            &vec![(e.index % 251) as u8; 16][..],
            "data round trip"
        );
    }
    assert_eq!(
        s.entries(5, 8, None::<u64>, ctx()).unwrap().len(),
        3,
        "entries(5, 8)"
    );
    assert_eq!(s.term(5).unwrap(), 2);
    assert_eq!(s.term(10).unwrap(), 2, "term of the last entry");
    assert!(is_unavailable(s.term(11)), "term past the end");
    assert!(
        is_unavailable(s.entries(2, 12, None::<u64>, ctx())),
        "entries past the end is an error, not a panic"
    );
    assert!(
        is_compacted(s.entries(1, 3, None::<u64>, ctx())),
        "entries at the compaction point"
    );
}

fn entries_size_limit<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=11, 2, 100));
    let one = s.entries(2, 12, Some(0u64), ctx()).unwrap();
    assert_eq!(one.len(), 1, "a size limit of 0 still returns one entry");
    let mut expect = s.entries(2, 12, None::<u64>, ctx()).unwrap();
    let limit = (expect[0].data.len() * 3 + 30) as u64;
    raft::util::limit_size(&mut expect, Some(limit));
    let got = s.entries(2, 12, Some(limit), ctx()).unwrap();
    assert_eq!(
        got.len(),
        expect.len(),
        "size limit follows raft-rs limit_size"
    );
    assert!(
        got.len() > 1 && got.len() < 10,
        "limit {limit} returned {}",
        got.len()
    );
    let big = s.entries(2, 12, Some(u64::MAX), ctx()).unwrap();
    assert_eq!(big.len(), 10, "unbounded limit returns the whole range");
}

fn overwrite_conflicting_tail<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=10, 2, 8));
    append(&s, entries(6..=7, 3, 8));
    assert_eq!(
        s.last_index().unwrap(),
        7,
        "a conflicting append drops the old tail"
    );
    assert_eq!(s.term(6).unwrap(), 3);
    assert_eq!(s.term(5).unwrap(), 2);
    assert!(is_unavailable(s.term(8)), "old tail is gone");
    let s = restart(h, s);
    assert_eq!(s.last_index().unwrap(), 7, "tail removal is durable");
}

fn compaction_boundary<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=5, 2, 8));
    append(&s, entries(6..=10, 3, 8));
    s.write(LogUpdate {
        compact_to: Some(7),
        applied: Some(8),
        hard_state: Some(HardState {
            term: 3,
            commit: 9,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.first_index().unwrap(),
        7,
        "first index after compact_to(7)"
    );
    assert_eq!(s.last_index().unwrap(), 10);
    assert_eq!(
        s.term(6).unwrap(),
        3,
        "term at the compaction boundary is kept"
    );
    assert!(is_compacted(s.term(5)), "term before the boundary");
    assert!(
        is_compacted(s.entries(6, 8, None::<u64>, ctx())),
        "entries before the boundary"
    );
    assert_eq!(s.entries(7, 11, None::<u64>, ctx()).unwrap().len(), 4);
    // Compacting to or before the boundary is a no-op.
    s.write(LogUpdate {
        compact_to: Some(3),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.first_index().unwrap(),
        7,
        "compaction never goes backwards"
    );
    for at_the_boundary in [6, 7] {
        s.write(LogUpdate {
            compact_to: Some(at_the_boundary),
            ..Default::default()
        })
        .expect("compacting to the compaction point or the first position");
        assert_eq!(s.first_index().unwrap(), 7, "compact_to({at_the_boundary})");
    }
    assert!(
        matches!(
            s.write(LogUpdate {
                compact_to: Some(12),
                ..Default::default()
            }),
            Err(StorageError::Invalid(_))
        ),
        "compacting past the end is refused"
    );
    let s = restart(h, s);
    assert_eq!(s.first_index().unwrap(), 7, "compaction is durable");
    assert_eq!(s.term(6).unwrap(), 3);
    assert_eq!(
        s.meta().applied_index,
        8,
        "applied is stored with the compaction"
    );
}

fn snapshot_metadata<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=10, 4, 8));
    s.write(LogUpdate {
        compact_to: Some(6),
        ..Default::default()
    })
    .unwrap();
    let snap = s.snapshot(0, 2).unwrap();
    assert_eq!(
        snap.get_metadata().index,
        5,
        "snapshot index is the compaction point"
    );
    assert_eq!(snap.get_metadata().term, 4);
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1]);
    assert_eq!(
        s.snapshot(5, 2).unwrap().get_metadata().index,
        5,
        "a snapshot asked for at the compaction point is ready"
    );
    assert!(
        s.snapshot(9, 2).is_err(),
        "a snapshot newer than the compaction point is not ready"
    );
}

fn snapshot_carries_membership_of_its_position<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=10, 4, 8));
    let with_2 = ConfState {
        voters: vec![1, 2],
        ..Default::default()
    };
    let with_3 = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    s.write(LogUpdate {
        conf_changes: vec![(4, with_2.clone()), (8, with_3.clone())],
        applied: Some(9),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.initial_state().unwrap().conf_state,
        with_3,
        "current membership"
    );
    let voters_at = |s: &H::S| {
        s.snapshot(0, 2)
            .unwrap()
            .get_metadata()
            .get_conf_state()
            .voters
            .clone()
    };
    assert_eq!(voters_at(&s), vec![1], "before any change is compacted");
    s.write(LogUpdate {
        compact_to: Some(4),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        voters_at(&s),
        vec![1],
        "the change at 4 is not folded in at 3"
    );
    s.write(LogUpdate {
        compact_to: Some(6),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        voters_at(&s),
        vec![1, 2],
        "the change at 4 is folded in at 5"
    );
    let s = restart(h, s);
    assert_eq!(voters_at(&s), vec![1, 2], "survives reopen");
    assert_eq!(s.initial_state().unwrap().conf_state, with_3);
    assert!(
        s.write(LogUpdate {
            conf_changes: vec![(5, with_2.clone())],
            ..Default::default()
        })
        .is_err(),
        "a membership change at or before the compaction point is refused"
    );
    s.write(LogUpdate {
        compact_to: Some(10),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        voters_at(&s),
        vec![1, 2, 3],
        "the change at 8 is folded in at 9"
    );
    // Installing a snapshot replaces both.
    s.write(LogUpdate {
        snapshot: Some((20, 6)),
        conf_state: Some(with_2.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(voters_at(&s), vec![1, 2]);
    assert_eq!(s.initial_state().unwrap().conf_state, with_2);
}

fn hard_and_conf_state_round_trip<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=4, 5, 8));
    let hs = HardState {
        term: 5,
        vote: 1,
        commit: 3,
        ..Default::default()
    };
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    s.write(LogUpdate {
        hard_state: Some(hs.clone()),
        conf_state: Some(cs.clone()),
        ..Default::default()
    })
    .unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs);
    assert_eq!(st.conf_state, cs);
    let s = restart(h, s);
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs, "hard state survives reopen");
    assert_eq!(st.conf_state, cs, "conf state survives reopen");
}

/// Compacting in the update that appends takes the mark's term from the
/// appended entry at the mark; compacting to one past the last position
/// empties the log, which continues after it.
fn compaction_of_everything_and_of_what_is_appended<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=5, 2, 8));
    let mut appended = entries(6..=7, 3, 8);
    appended.extend(entries(8..=8, 4, 8));
    appended.extend(entries(9..=9, 5, 8));
    s.write(LogUpdate {
        entries: appended,
        compact_to: Some(9),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.first_index().unwrap(), 9);
    assert_eq!(
        s.term(8).unwrap(),
        4,
        "the mark's term is the appended entry's at the mark"
    );
    assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().term, 4);
    s.write(LogUpdate {
        compact_to: Some(10),
        ..Default::default()
    })
    .expect("compacting to one past the last position");
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (10, 9),
        "compacting everything empties the log"
    );
    assert_eq!(s.term(9).unwrap(), 5);
    append(&s, entries(10..=10, 5, 8));
    let s = restart(h, s);
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (10, 10)
    );
    assert_eq!((s.term(9).unwrap(), s.term(10).unwrap()), (5, 5));
}

fn install_snapshot<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=10, 2, 8));
    s.write(LogUpdate {
        snapshot: Some((20, 4)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.first_index().unwrap(), 21);
    assert_eq!(s.last_index().unwrap(), 20);
    assert_eq!(s.term(20).unwrap(), 4);
    assert!(s.initial_state().unwrap().hard_state.commit >= 20);
    assert!(
        matches!(
            s.write(LogUpdate {
                snapshot: Some((15, 4)),
                ..Default::default()
            }),
            Err(StorageError::Invalid(_))
        ),
        "a snapshot older than the current one is refused"
    );
    s.write(LogUpdate {
        snapshot: Some((20, 4)),
        ..Default::default()
    })
    .expect("the current snapshot installed again");
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (21, 20)
    );
    append(&s, entries(21..=22, 4, 8));
    assert_eq!(
        s.last_index().unwrap(),
        22,
        "the log continues after a snapshot"
    );
}

fn rejects_bad_appends<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=5, 2, 8));
    assert!(
        s.write(LogUpdate {
            entries: entries(8..=9, 2, 8),
            ..Default::default()
        })
        .is_err(),
        "an append that leaves a gap is refused"
    );
    assert!(
        s.write(LogUpdate {
            entries: entries(1..=2, 2, 8),
            ..Default::default()
        })
        .is_err(),
        "an append at the compaction point is refused"
    );
    let mut gappy = entries(6..=6, 2, 8);
    gappy.extend(entries(8..=8, 2, 8));
    assert!(
        s.write(LogUpdate {
            entries: gappy,
            ..Default::default()
        })
        .is_err(),
        "non-contiguous entries are refused"
    );
    assert_eq!(
        s.last_index().unwrap(),
        5,
        "a refused update changes nothing"
    );
}

fn synced_writes_survive_reopen<H: Harness>(h: &mut H) {
    let s = h.fresh();
    append(&s, entries(2..=50, 2, 64));
    let s = restart(h, s);
    assert_eq!(s.last_index().unwrap(), 50);
    let got = s.entries(2, 51, None::<u64>, ctx()).unwrap();
    assert_eq!(
        got,
        entries(2..=50, 2, 64),
        "entries survive reopen byte for byte"
    );
}

/// The repair state is written with its update, survives a restart, is
/// left alone by updates without one, and is the data of every snapshot.
fn repair_state_is_kept_and_carried_by_snapshots<H: Harness>(h: &mut H) {
    let s = h.fresh();
    assert!(
        s.repair_state().is_empty(),
        "a fresh replica has no repair state"
    );
    append(&s, entries(2..=4, 1, 8));
    s.write(LogUpdate {
        applied: Some(3),
        repair_state: Some(b"state at 3".to_vec()),
        ..Default::default()
    })
    .expect("write with a repair state");
    assert_eq!(s.repair_state(), b"state at 3");
    append(&s, entries(5..=6, 1, 8));
    assert_eq!(
        s.repair_state(),
        b"state at 3",
        "an update without one keeps it"
    );
    let s = restart(h, s);
    assert_eq!(s.repair_state(), b"state at 3", "lost in a restart");
    s.write(LogUpdate {
        compact_to: Some(4),
        ..Default::default()
    })
    .expect("compact");
    let snap = s.snapshot(3, 0).expect("snapshot");
    assert_eq!(
        &snap.data[..],
        b"state at 3",
        "a snapshot carries the repair state"
    );
    s.write(LogUpdate {
        repair_state: Some(Vec::new()),
        ..Default::default()
    })
    .expect("an empty repair state");
    let s = restart(h, s);
    assert!(s.repair_state().is_empty());
}
