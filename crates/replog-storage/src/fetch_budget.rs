//! A per-turn budget for the log reads that feed followers.
//!
//! raft-rs's leader, answering one append response of a follower in
//! replicate state, loops `maybe_send_append` until the follower's
//! in-flight window is full: up to `max_inflight_msgs` messages of
//! `max_size_per_msg` bytes (replog: 256 × 1 MiB), each read from storage,
//! all in one step and one `Ready`. A follower catching up a large log thus
//! made the leader read and encode up to 256 MiB on its driver thread in
//! one turn, while no client request was served (a 454 ms gap at 200 MB).
//!
//! raft-rs lets storage fetch entries asynchronously: when the context of a
//! read can wait ([`GetEntriesContext::can_async`]: reads for `MsgAppend`s)
//! the storage may answer `LogTemporarilyUnavailable`, and the application
//! calls `RawNode::on_entries_fetched(context)` later, which sends again.
//! [`FetchBudget`] uses that to spread such sends over turns: the core
//! starts every turn with [`FetchBudget::begin_turn`]; reads that can wait
//! are served until the turn's budget is spent and refused after that,
//! their contexts remembered; the core retries the remembered contexts at
//! the start of its next turn ([`FetchBudget::next_deferred`]), after
//! whatever the runtime queued meanwhile was admitted.
//!
//! Invariants:
//! - between two [`FetchBudget::begin_turn`]s, reads that can wait return
//!   at most `limit_bytes` of entry data and context in total, plus one
//!   entry: a read is let through only while budget is left, is limited to
//!   what is left, and returns at least one entry however large (raft-rs's
//!   contract), so the first read of every turn advances a catch-up;
//! - reads that cannot wait (committed entries for apply, leader transfer,
//!   conflict checks) are always served in full and not counted;
//! - at most [`MAX_DEFERRED`] contexts are remembered, and equal contexts
//!   (same follower, term and mode) only once: a context that is not
//!   remembered is safe to drop, because raft-rs sends to that follower
//!   again at its next append or heartbeat response;
//! - remembered contexts are retried in the order they were refused, and a
//!   retried context that is refused again goes to the back: catching-up
//!   followers take turns.

use std::collections::VecDeque;

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use raft::GetEntriesContext;

/// Default budget of one turn: a few messages of 1 MiB, some milliseconds
/// of reading and encoding on the leader's driver thread.
pub const DEFAULT_FETCH_BUDGET_BYTES: u64 = 4 * 1024 * 1024;

/// Most read contexts remembered at once (a few per follower are enough:
/// equal ones are kept once).
pub const MAX_DEFERRED: usize = 64;

/// Counters of a [`FetchBudget`] since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Turns begun.
    pub turns: u64,
    /// Reads that could wait and were served.
    pub served: u64,
    /// Bytes served to them.
    pub bytes: u64,
    /// Reads refused because their turn's budget was spent.
    pub deferred: u64,
    /// Refused reads whose context was not remembered (an equal one was,
    /// or [`MAX_DEFERRED`] were).
    pub dropped: u64,
    /// Remembered contexts handed back for a retry.
    pub retried: u64,
    /// Most bytes served to reads that could wait in one turn.
    pub max_turn_bytes: u64,
}

#[derive(Default)]
struct Turn {
    /// Bytes served to reads that could wait in this turn.
    spent_bytes: u64,
    /// Refused contexts, oldest first, with their keys (see `key`).
    deferred: VecDeque<(String, GetEntriesContext)>,
    stats: FetchStats,
}

/// The read budget of one storage (shared by its clones through the
/// storage's handle). See the module docs.
pub struct FetchBudget {
    limit_bytes: AtomicU64,
    turn: Mutex<Turn>,
}

/// Identifies what a context asks for. raft-rs keeps the fields of
/// `GetEntriesContext` to itself; its `Debug` form names them all (the
/// follower, the term and whether to send aggressively), and two contexts
/// with the same fields make `on_entries_fetched` do the same thing.
fn key(context: &GetEntriesContext) -> String {
    format!("{context:?}")
}

impl FetchBudget {
    /// A budget of `limit_bytes` per turn; 0: no budget (every read is
    /// served at once, as raft-rs does on its own).
    pub fn new(limit_bytes: u64) -> Self {
        FetchBudget {
            limit_bytes: AtomicU64::new(limit_bytes),
            turn: Mutex::new(Turn::default()),
        }
    }

    /// The budget per turn (0: none).
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes.load(Ordering::Relaxed)
    }

    /// Changes the budget from the next turn on (0: none).
    pub fn set_limit_bytes(&self, limit_bytes: u64) {
        self.limit_bytes.store(limit_bytes, Ordering::Relaxed);
    }

    /// Starts a turn: the budget is whole again. Remembered contexts stay
    /// remembered until [`Self::next_deferred`] hands them out.
    pub fn begin_turn(&self) {
        let mut t = self.turn.lock();
        t.spent_bytes = 0;
        t.stats.turns += 1;
    }

    /// Whether a read whose context is `context` may go ahead now, and how
    /// many bytes it may return (at least one entry is always returned).
    /// `None`: the read must answer `LogTemporarilyUnavailable`; its
    /// context is remembered for a retry when it can be.
    pub fn admit(&self, context: GetEntriesContext) -> Option<u64> {
        let limit_bytes = self.limit_bytes();
        if limit_bytes == 0 || !context.can_async() {
            return Some(u64::MAX);
        }
        let mut t = self.turn.lock();
        if t.spent_bytes < limit_bytes {
            t.stats.served += 1;
            return Some(limit_bytes - t.spent_bytes);
        }
        t.stats.deferred += 1;
        let k = key(&context);
        if t.deferred.len() >= MAX_DEFERRED || t.deferred.iter().any(|(d, _)| *d == k) {
            t.stats.dropped += 1;
        } else {
            t.deferred.push_back((k, context));
        }
        None
    }

    /// Counts `bytes` served to a read that [`Self::admit`] let go ahead
    /// with a limited allowance.
    pub fn charge(&self, bytes: u64) {
        if self.limit_bytes() == 0 {
            return;
        }
        let mut t = self.turn.lock();
        t.spent_bytes = t.spent_bytes.saturating_add(bytes);
        t.stats.bytes = t.stats.bytes.saturating_add(bytes);
        t.stats.max_turn_bytes = t.stats.max_turn_bytes.max(t.spent_bytes);
    }

    /// The oldest remembered context, while this turn's budget lasts (a
    /// retry would only be refused again otherwise).
    pub fn next_deferred(&self) -> Option<GetEntriesContext> {
        let mut t = self.turn.lock();
        let limit_bytes = self.limit_bytes();
        if limit_bytes != 0 && t.spent_bytes >= limit_bytes {
            return None;
        }
        let (_, context) = t.deferred.pop_front()?;
        t.stats.retried += 1;
        Some(context)
    }

    /// Contexts remembered now.
    pub fn deferred_len(&self) -> usize {
        self.turn.lock().deferred.len()
    }

    /// The counters so far.
    pub fn stats(&self) -> FetchStats {
        self.turn.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_that_cannot_wait_are_never_refused_or_counted() {
        let b = FetchBudget::new(100);
        b.begin_turn();
        for _ in 0..10 {
            assert_eq!(b.admit(GetEntriesContext::empty(false)), Some(u64::MAX));
        }
        assert_eq!(b.admit(GetEntriesContext::empty(true)), Some(100));
    }

    #[test]
    fn a_spent_turn_refuses_and_remembers_until_the_next_turn() {
        let b = FetchBudget::new(100);
        b.begin_turn();
        assert_eq!(b.admit(GetEntriesContext::empty(true)), Some(100));
        b.charge(60);
        assert_eq!(b.admit(GetEntriesContext::empty(true)), Some(40));
        b.charge(45);
        assert_eq!(b.admit(GetEntriesContext::empty(true)), None);
        // Equal contexts are remembered once.
        assert_eq!(b.admit(GetEntriesContext::empty(true)), None);
        assert_eq!(b.deferred_len(), 1);
        // No retry while the budget is spent.
        assert!(b.next_deferred().is_none());
        b.begin_turn();
        let c = b.next_deferred().expect("remembered");
        assert!(c.can_async());
        assert!(b.next_deferred().is_none());
        let s = b.stats();
        assert_eq!((s.deferred, s.dropped, s.retried), (2, 1, 1));
        assert_eq!(s.max_turn_bytes, 105);
    }

    #[test]
    fn no_budget_serves_everything() {
        let b = FetchBudget::new(0);
        b.begin_turn();
        b.charge(u64::MAX);
        assert_eq!(b.admit(GetEntriesContext::empty(true)), Some(u64::MAX));
        assert!(b.next_deferred().is_none());
    }
}
