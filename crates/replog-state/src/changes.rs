//! The change feed: which entities changed at which position.
//!
//! A bounded ring of the most recent changes (whole positions at a time)
//! plus a bounded `tokio::sync::broadcast` channel. A watcher subscribes,
//! receives [`StateEvent`]s, and if it falls behind the channel it is
//! caught up from the ring; if it fell out of the ring too (or the state was
//! replaced), it gets [`StateError::MustReload`] and reloads the state. The
//! feed is in memory only: after a restart a watcher reloads.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::error::{Result, StateError};
use crate::keys::EntityKey;

/// One entity written or removed at `position`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub position: u64,
    pub key: EntityKey,
    /// True if the entity no longer exists after `position`.
    pub removed: bool,
}

impl Change {
    /// The record kind (`KIND_*`) of the entity.
    pub fn kind(&self) -> u32 {
        self.key.kind()
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub enum StateEvent {
    /// The changes of one applied position (positions with no change, such
    /// as rejected transactions, send nothing).
    Changes {
        position: u64,
        changes: Arc<[Change]>,
    },
    /// The whole state was replaced as of `position` (`replace_all`):
    /// reload it.
    Reset { position: u64 },
}

impl StateEvent {
    pub fn position(&self) -> u64 {
        match self {
            StateEvent::Changes { position, .. } | StateEvent::Reset { position } => *position,
        }
    }
}

struct Ring {
    /// The changes of each position that had any, in position order.
    batches: VecDeque<(u64, Arc<[Change]>)>,
    /// Changes in `batches`: at most `max_changes`, the oldest go first.
    change_count: usize,
    max_changes: usize,
    /// The ring holds every change of the positions in `(floor, latest]`.
    floor: u64,
    latest: u64,
    /// Incremented by every reset.
    epoch: u64,
}

pub(crate) struct Feed {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<StateEvent>,
}

impl Feed {
    pub(crate) fn new(applied: u64, max_changes: usize, broadcast_capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(broadcast_capacity.max(1));
        Feed {
            ring: Mutex::new(Ring {
                batches: VecDeque::new(),
                change_count: 0,
                max_changes,
                floor: applied,
                latest: applied,
                epoch: 0,
            }),
            tx,
        }
    }

    /// Records the changes of `position` (possibly none) and tells the
    /// subscribers.
    pub(crate) fn publish(&self, position: u64, changes: Vec<Change>) {
        let mut ring = self.ring.lock();
        assert!(
            position > ring.latest,
            "changes of position {position} published after those of {}",
            ring.latest
        );
        ring.latest = position;
        if changes.is_empty() {
            return;
        }
        let changes: Arc<[Change]> = changes.into();
        ring.change_count += changes.len();
        ring.batches.push_back((position, changes.clone()));
        while ring.change_count > ring.max_changes {
            let Some((p, c)) = ring.batches.pop_front() else {
                break;
            };
            ring.change_count -= c.len();
            ring.floor = p;
        }
        // No subscriber is not an error.
        let _ = self.tx.send(StateEvent::Changes { position, changes });
    }

    /// The state was replaced as of `position`.
    pub(crate) fn reset(&self, position: u64) {
        let mut ring = self.ring.lock();
        ring.batches.clear();
        ring.change_count = 0;
        ring.floor = position;
        ring.latest = position;
        ring.epoch += 1;
        let _ = self.tx.send(StateEvent::Reset { position });
    }

    fn since(ring: &Ring, since: u64) -> Result<Vec<(u64, Arc<[Change]>)>> {
        if since < ring.floor {
            return Err(StateError::MustReload {
                since,
                floor: ring.floor,
            });
        }
        Ok(ring
            .batches
            .iter()
            .filter(|(p, _)| *p > since)
            .cloned()
            .collect())
    }

    pub(crate) fn changes_since(&self, since: u64) -> Result<Vec<Change>> {
        let ring = self.ring.lock();
        Ok(Self::since(&ring, since)?
            .into_iter()
            .flat_map(|(_, c)| c.iter().cloned().collect::<Vec<_>>())
            .collect())
    }

    pub(crate) fn subscribe(self: &Arc<Self>) -> Subscription {
        let ring = self.ring.lock();
        Subscription {
            rx: self.tx.subscribe(),
            feed: Arc::downgrade(self),
            seen: ring.latest,
            epoch: ring.epoch,
            backlog: VecDeque::new(),
            failed: None,
        }
    }
}

/// A watcher of the store's changes (see [`crate::StateStore::subscribe`]).
///
/// It starts at the position applied when it was created: load the state
/// first (or note [`Subscription::position`]) and then apply the events.
pub struct Subscription {
    rx: broadcast::Receiver<StateEvent>,
    /// Weak: the channel closes when the store is dropped.
    feed: Weak<Feed>,
    /// Every event up to this position was delivered.
    seen: u64,
    epoch: u64,
    backlog: VecDeque<StateEvent>,
    failed: Option<(u64, u64)>,
}

impl Subscription {
    /// The position up to which this watcher has received every change.
    pub fn position(&self) -> u64 {
        self.seen
    }

    /// Next event. `Err(MustReload)` if the watcher fell behind what the
    /// store keeps; `Ok(None)` if the store was dropped.
    pub async fn recv(&mut self) -> Result<Option<StateEvent>> {
        loop {
            if let Some(e) = self.next_ready()? {
                return Ok(Some(e));
            }
            match self.rx.recv().await {
                Ok(e) => {
                    if let Some(e) = self.accept(e) {
                        return Ok(Some(e));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !self.catch_up()? {
                        return Ok(None);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Next event if one is waiting (non-blocking).
    pub fn try_recv(&mut self) -> Result<Option<StateEvent>> {
        loop {
            if let Some(e) = self.next_ready()? {
                return Ok(Some(e));
            }
            match self.rx.try_recv() {
                Ok(e) => {
                    if let Some(e) = self.accept(e) {
                        return Ok(Some(e));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    if !self.catch_up()? {
                        return Ok(None);
                    }
                }
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => return Ok(None),
            }
        }
    }

    fn next_ready(&mut self) -> Result<Option<StateEvent>> {
        if let Some((since, floor)) = self.failed {
            return Err(StateError::MustReload { since, floor });
        }
        while let Some(e) = self.backlog.pop_front() {
            if let Some(e) = self.accept(e) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Drops what was already delivered; tracks position and epoch.
    fn accept(&mut self, e: StateEvent) -> Option<StateEvent> {
        match &e {
            StateEvent::Reset { position } => {
                self.epoch += 1;
                self.seen = *position;
                Some(e)
            }
            StateEvent::Changes { position, .. } => {
                if *position <= self.seen {
                    return None;
                }
                self.seen = *position;
                Some(e)
            }
        }
    }

    /// Fills the backlog from the ring after the channel lagged; false if
    /// the store is gone.
    fn catch_up(&mut self) -> Result<bool> {
        let Some(feed) = self.feed.upgrade() else {
            return Ok(false);
        };
        let ring = feed.ring.lock();
        let batches = if ring.epoch != self.epoch {
            Err(StateError::MustReload {
                since: self.seen,
                floor: ring.floor,
            })
        } else {
            Feed::since(&ring, self.seen)
        };
        match batches {
            Ok(b) => {
                self.backlog.extend(
                    b.into_iter()
                        .map(|(position, changes)| StateEvent::Changes { position, changes }),
                );
                Ok(true)
            }
            Err(e) => {
                if let StateError::MustReload { since, floor } = e {
                    self.failed = Some((since, floor));
                }
                Err(e)
            }
        }
    }
}
