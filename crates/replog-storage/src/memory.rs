//! [`MemoryStorage`]: the in-memory replica storage for deterministic tests.
//!
//! It keeps the same contract as [`crate::RocksStorage`], including the
//! durability model: [`LogStorage::write`] is visible at once but lost by
//! [`MemoryStorage::crash`] unless a [`LogStorage::sync`] followed it.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState};

use crate::api::{assert_write_keeps_invariants, check_conf_changes, LogStorage, LogUpdate};
use crate::error::{Result, StorageError};
use crate::model::{now_unix_ms, ReplicaMeta};

#[derive(Clone)]
struct State {
    meta: ReplicaMeta,
    /// entries[i] is at position snapshot_index + 1 + i.
    entries: VecDeque<Entry>,
    repair_state: Vec<u8>,
}

impl State {
    fn last_index(&self) -> u64 {
        self.meta.snapshot_index + self.entries.len() as u64
    }
}

struct Shared {
    current: State,
    durable: State,
}

/// In-memory [`LogStorage`]. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct MemoryStorage {
    shared: Arc<Mutex<Shared>>,
}

impl MemoryStorage {
    /// An initialized VOTING replica with `voters`, like `replog initialize`.
    pub fn new_initialized(cluster_id: &str, replica_id: u64, voters: Vec<u64>) -> Self {
        Self::from_meta(ReplicaMeta::initialized(
            cluster_id,
            replica_id,
            voters,
            now_unix_ms(),
        ))
    }

    /// An EMPTY replica (a new or wiped data directory).
    pub fn new_empty(cluster_id: &str, replica_id: u64) -> Self {
        Self::from_meta(ReplicaMeta::empty(cluster_id, replica_id, now_unix_ms()))
    }

    fn from_meta(meta: ReplicaMeta) -> Self {
        let st = State {
            meta,
            entries: VecDeque::new(),
            repair_state: Vec::new(),
        };
        MemoryStorage {
            shared: Arc::new(Mutex::new(Shared {
                current: st.clone(),
                durable: st,
            })),
        }
    }

    /// Simulates a crash: everything written since the last sync is lost.
    pub fn crash(&self) {
        let mut sh = self.shared.lock();
        sh.current = sh.durable.clone();
    }

    fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.shared.lock().current)
    }

    fn entries_in(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>> {
        self.with(|st| {
            let first = st.meta.snapshot_index + 1;
            if low < first {
                return Err(StorageError::Compacted { index: low, first });
            }
            if high > st.last_index() + 1 {
                return Err(StorageError::Unavailable {
                    index: high - 1,
                    last: st.last_index(),
                });
            }
            let lo = (low - first) as usize;
            let hi = (high - first) as usize;
            let mut out: Vec<Entry> = st.entries.range(lo..hi).cloned().collect();
            raft::util::limit_size(&mut out, max_size);
            Ok(out)
        })
    }

    fn term_of(&self, idx: u64) -> Result<u64> {
        self.with(|st| {
            let first = st.meta.snapshot_index + 1;
            if idx == st.meta.snapshot_index {
                return Ok(st.meta.snapshot_term);
            }
            if idx < st.meta.snapshot_index {
                return Err(StorageError::Compacted { index: idx, first });
            }
            if idx > st.last_index() {
                return Err(StorageError::Unavailable {
                    index: idx,
                    last: st.last_index(),
                });
            }
            Ok(st.entries[(idx - first) as usize].term)
        })
    }
}

impl raft::Storage for MemoryStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(self.with(|st| RaftState::new(st.meta.hard_state.clone(), st.meta.conf_state.clone())))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        Ok(self.entries_in(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.term_of(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.with(|st| st.meta.snapshot_index + 1))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.with(|st| st.last_index()))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.with(|st| {
            if request_index > st.meta.snapshot_index {
                return Err(raft::Error::Store(
                    raft::StorageError::SnapshotTemporarilyUnavailable,
                ));
            }
            let mut s = Snapshot::default();
            let md = s.mut_metadata();
            md.index = st.meta.snapshot_index;
            md.term = st.meta.snapshot_term;
            md.set_conf_state(st.meta.snapshot_conf_for(to));
            s.data = st.repair_state.clone().into();
            Ok(s)
        })
    }
}

impl LogStorage for MemoryStorage {
    fn write(&self, u: LogUpdate) -> Result<()> {
        let mut sh = self.shared.lock();
        // Work on a copy so a rejected update changes nothing.
        let mut st = sh.current.clone();
        if let Some((index, term)) = u.snapshot {
            if index < st.meta.snapshot_index {
                return Err(StorageError::Invalid(format!(
                    "snapshot at {index} is older than the current one at {}",
                    st.meta.snapshot_index
                )));
            }
            st.entries.clear();
            st.meta.snapshot_index = index;
            st.meta.snapshot_term = term;
            st.meta.hard_state.commit = st.meta.hard_state.commit.max(index);
            st.meta.hard_state.term = st.meta.hard_state.term.max(term);
            st.meta.applied_index = st.meta.applied_index.max(index);
            let cs = u
                .conf_state
                .clone()
                .unwrap_or_else(|| st.meta.conf_state.clone());
            st.meta.install_snapshot_conf(cs);
        }
        if let Some(first) = u.entries.first().map(|e| e.index) {
            let last = st.last_index();
            if first <= st.meta.snapshot_index {
                return Err(StorageError::Invalid(format!(
                    "append at {first} is at or before the compaction point {}",
                    st.meta.snapshot_index
                )));
            }
            if first > last + 1 {
                return Err(StorageError::Invalid(format!(
                    "append at {first} leaves a gap after the last position {last}"
                )));
            }
            for (i, e) in u.entries.iter().enumerate() {
                if e.index != first + i as u64 {
                    return Err(StorageError::Invalid(
                        "appended entries are not contiguous".into(),
                    ));
                }
            }
            st.entries
                .truncate((first - st.meta.snapshot_index - 1) as usize);
            st.entries.extend(u.entries.iter().cloned());
        }
        check_conf_changes(&u, st.meta.snapshot_index)?;
        st.meta.record_conf_changes(&u.conf_changes);
        if let Some(to) = u.compact_to {
            if to > st.meta.snapshot_index + 1 {
                if to > st.last_index() + 1 {
                    return Err(StorageError::Invalid(format!(
                        "cannot compact to {to}: the last position is {}",
                        st.last_index()
                    )));
                }
                let n = (to - 1 - st.meta.snapshot_index) as usize;
                let term = st.entries[n - 1].term;
                st.entries.drain(..n);
                st.meta.snapshot_index = to - 1;
                st.meta.snapshot_term = term;
                st.meta.compact_conf_to(to - 1);
            }
        }
        if let Some(hs) = u.hard_state {
            st.meta.hard_state = hs;
        }
        if let (Some(cs), None) = (u.conf_state, u.snapshot) {
            st.meta.conf_state = cs;
        }
        st.meta.record_addresses(&u.member_addresses);
        if let Some(a) = u.applied {
            st.meta.applied_index = a;
        }
        if let Some(rs) = u.repair_state {
            st.repair_state = rs;
        }
        if let Some(s) = u.status {
            st.meta.status = s;
        }
        let installed = u.snapshot.map(|(index, _)| index);
        assert_write_keeps_invariants(&sh.current.meta, &st.meta, st.last_index(), installed);
        sh.current = st;
        if u.sync {
            sh.durable = sh.current.clone();
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut sh = self.shared.lock();
        sh.durable = sh.current.clone();
        Ok(())
    }

    fn meta(&self) -> ReplicaMeta {
        self.with(|st| st.meta.clone())
    }

    fn repair_state(&self) -> Vec<u8> {
        self.with(|st| st.repair_state.clone())
    }

    fn reclaim_space(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    struct Mem;

    impl conformance::Harness for Mem {
        type S = MemoryStorage;
        fn fresh(&mut self) -> MemoryStorage {
            MemoryStorage::new_initialized("test", 1, vec![1])
        }
        fn reopen(&mut self, s: MemoryStorage) -> MemoryStorage {
            s.crash();
            s
        }
    }

    #[test]
    fn memory_storage_conformance() {
        conformance::run_all(&mut Mem);
    }

    #[test]
    fn crash_loses_unsynced_writes_only() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        s.write(LogUpdate {
            entries: conformance::entries(2..=5, 2, 8),
            ..Default::default()
        })
        .unwrap();
        s.sync().unwrap();
        s.write(LogUpdate {
            entries: conformance::entries(6..=9, 2, 8),
            ..Default::default()
        })
        .unwrap();
        s.crash();
        assert_eq!(raft::Storage::last_index(&s).unwrap(), 5);
    }

    #[test]
    fn a_synced_write_survives_a_crash_with_everything_before_it() {
        let s = MemoryStorage::new_initialized("t", 1, vec![1]);
        s.write(LogUpdate {
            entries: conformance::entries(2..=5, 2, 8),
            ..Default::default()
        })
        .unwrap();
        s.write(LogUpdate {
            entries: conformance::entries(6..=7, 2, 8),
            sync: true,
            ..Default::default()
        })
        .unwrap();
        s.write(LogUpdate {
            entries: conformance::entries(8..=9, 2, 8),
            ..Default::default()
        })
        .unwrap();
        s.crash();
        assert_eq!(raft::Storage::last_index(&s).unwrap(), 7);
    }
}
