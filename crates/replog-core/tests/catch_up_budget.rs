//! A follower catching up a large log is fed by the leader a fetch budget's
//! worth per turn ([`ReplicaCore::begin_turn`], `replog_storage::FetchBudget`):
//! three cores on RocksDB, stepped turn by turn by hand. Replica 3 is cut
//! off while 1 and 2 commit 8 MiB; once it is back, every turn of the
//! leader reads at most the budget (plus one entry) for it, the catch-up
//! takes at least (log / budget) turns, and replica 3 ends with the whole
//! log.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use replog_core::{Command, CoreConfig, Input, Output, ReplicaCore};
use replog_storage::{InitOptions, LogStorage, Member, RocksStorage};

const BUDGET: u64 = 1024 * 1024;
const ENTRY: usize = 64 * 1024;
const ENTRIES: u64 = 128; // 8 MiB

struct Node {
    core: ReplicaCore<RocksStorage>,
    storage: RocksStorage,
    inbox: VecDeque<Input>,
}

struct Cluster {
    nodes: BTreeMap<u64, Node>,
    /// Replicas whose messages, both ways, are dropped.
    cut: Vec<u64>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (1..=3)
            .map(|id| Member {
                id,
                address: format!("replica-{id}"),
            })
            .collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=3u64 {
            let storage = RocksStorage::initialize(
                &dir.path().join(format!("r{id}")),
                &InitOptions {
                    cluster_id: "budget".into(),
                    replica_id: id,
                    members: members.clone(),
                },
            )
            .unwrap();
            storage.set_fetch_budget_bytes(BUDGET);
            let config = CoreConfig {
                peers: (1..=3).filter(|p| *p != id).collect(),
                // Replica 1 times out first: it leads.
                election_tick_range: Some(if id == 1 { (10, 11) } else { (40, 41) }),
                incarnation: id,
                ..Default::default()
            };
            let core = ReplicaCore::new(storage.clone(), &config).unwrap();
            nodes.insert(
                id,
                Node {
                    core,
                    storage,
                    inbox: VecDeque::new(),
                },
            );
        }
        Cluster {
            nodes,
            cut: Vec::new(),
            _dir: dir,
        }
    }

    /// One turn of replica `id`, as the runtime runs it: the turn begins,
    /// the inputs delivered so far are stepped (and a tick, if `tick`), the
    /// core is driven, and its outputs are carried out (messages queued for
    /// their receivers' next turn, fsyncs done at once and reported in the
    /// next turn). Returns the committed proposals.
    fn turn(&mut self, id: u64, tick: bool) -> Vec<u64> {
        let node = self.nodes.get_mut(&id).unwrap();
        let mut out = Vec::new();
        node.core.begin_turn();
        let inputs: Vec<Input> = node.inbox.drain(..).collect();
        for input in inputs {
            node.core.step(input, &mut out).unwrap();
        }
        if tick {
            node.core.step(Input::Tick, &mut out).unwrap();
        }
        node.core.drive(&mut out).unwrap();
        let mut committed = Vec::new();
        for o in out {
            match o {
                Output::Send(msgs) => {
                    for m in msgs {
                        self.deliver(id, m.to, Input::Message(Box::new(m)));
                    }
                }
                Output::SendPeer { to, msg } => self.deliver(id, to, Input::Peer { from: id, msg }),
                Output::Sync { ready_number } => {
                    let node = self.nodes.get_mut(&id).unwrap();
                    node.storage.sync().unwrap();
                    node.inbox.push_back(Input::Persisted { ready_number });
                }
                Output::Committed { id, .. } => committed.push(id),
                _ => {}
            }
        }
        committed
    }

    fn deliver(&mut self, from: u64, to: u64, input: Input) {
        if self.cut.contains(&from) || self.cut.contains(&to) {
            return;
        }
        if let Some(n) = self.nodes.get_mut(&to) {
            n.inbox.push_back(input);
        }
    }

    /// A turn of every replica, each with a tick.
    fn round(&mut self) -> Vec<u64> {
        let mut committed = Vec::new();
        for id in 1..=3 {
            committed.extend(self.turn(id, true));
        }
        committed
    }
}

#[test]
fn a_lagging_follower_is_fed_a_budget_per_leader_turn_and_catches_up() {
    let mut c = Cluster::new();
    c.cut.push(3);
    let mut rounds = 0;
    while !c.nodes[&1].core.progress().leader_ready {
        rounds += 1;
        assert!(rounds < 1000, "replica 1 never led");
        c.round();
    }
    let term = c.nodes[&1].core.progress().term;

    // 8 MiB committed by replicas 1 and 2 alone.
    for i in 0..ENTRIES {
        let data = Bytes::from(vec![i as u8; ENTRY]);
        c.nodes
            .get_mut(&1)
            .unwrap()
            .inbox
            .push_back(Input::Propose {
                id: i + 1,
                command: Command::Append(data),
                writer_term: Some(term),
            });
    }
    let mut committed = 0;
    while committed < ENTRIES as usize {
        rounds += 1;
        assert!(rounds < 10_000, "the entries were never committed");
        committed += c.round().len();
    }
    let last = c.nodes[&1].storage.last_index();
    assert!(c.nodes[&3].storage.last_index() < last - ENTRIES);

    // Replica 3 is back: count the leader's turns until it has everything.
    c.cut.clear();
    let mut leader_turns = 0u64;
    let mut turns_with_reads = 0u64;
    while c.nodes[&3].storage.last_index() < last || c.nodes[&3].core.progress().applied < last {
        leader_turns += 1;
        assert!(leader_turns < 100_000, "replica 3 never caught up");
        let before = c.nodes[&1].storage.fetch_stats().bytes;
        c.turn(1, leader_turns.is_multiple_of(5));
        let read = c.nodes[&1].storage.fetch_stats().bytes - before;
        assert!(
            read <= BUDGET + ENTRY as u64 + 1024,
            "leader turn {leader_turns} read {read} bytes for followers, over the budget of {BUDGET}"
        );
        if read > 0 {
            turns_with_reads += 1;
        }
        c.turn(2, leader_turns.is_multiple_of(5));
        c.turn(3, leader_turns.is_multiple_of(5));
    }
    assert!(
        turns_with_reads >= ENTRIES * ENTRY as u64 / BUDGET,
        "8 MiB read in {turns_with_reads} turns: not spread by the budget"
    );
    let stats = c.nodes[&1].storage.fetch_stats();
    assert!(
        stats.deferred > 0,
        "no send ever waited for a later turn: {stats:?}"
    );

    // Replica 3 holds the leader's log.
    use raft::Storage as _;
    let ctx = || raft::GetEntriesContext::empty(false);
    let first = c.nodes[&1].storage.first_index().unwrap();
    let want = c.nodes[&1]
        .storage
        .entries(first, last + 1, None, ctx())
        .unwrap();
    let got = c.nodes[&3]
        .storage
        .entries(first, last + 1, None, ctx())
        .unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "replica 3's log differs from the leader's");
}
