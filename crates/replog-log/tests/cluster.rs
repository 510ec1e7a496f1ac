//! Replicas of one cluster in one process, wired by an in-memory link, on
//! real RocksDB directories: election, replication, linearizable reads,
//! a replica that loses its disk rejoining (EMPTY, RECOVERING, VOTING), and
//! adding a replica at runtime.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;
use replog_log::{
    ClusterOptions, Envelope, Log, LogOptions, Member, MembershipChange, PeerLink, ReplicaStatus,
};
use replog_storage::{InitOptions, RocksStorage};

const CLUSTER: &str = "cluster-test";

#[derive(Clone, Default)]
struct Switchboard {
    routes: Arc<Mutex<HashMap<u64, Sender<Envelope>>>>,
    /// Envelopes for which this returns true are held in `held` instead of
    /// being delivered (see [`Switchboard::release`]).
    hold: Arc<Mutex<Option<HoldFilter>>>,
    held: Arc<Mutex<Vec<Envelope>>>,
    /// Replicas whose messages, both ways, are dropped.
    cut: Arc<Mutex<Vec<u64>>>,
}

type HoldFilter = Box<dyn Fn(&Envelope) -> bool + Send>;

impl PeerLink for Switchboard {
    fn send(&self, envelope: Envelope) {
        {
            let cut = self.cut.lock();
            if cut.contains(&envelope.to) || cut.contains(&envelope.from) {
                return;
            }
        }
        if self.hold.lock().as_ref().is_some_and(|f| f(&envelope)) {
            self.held.lock().push(envelope);
            return;
        }
        if let Some(tx) = self.routes.lock().get(&envelope.to) {
            let _ = tx.try_send(envelope);
        }
    }
    fn set_peer(&self, _id: u64, _address: String) {}
}

impl Switchboard {
    /// Stops holding and delivers what was held, all at once (under the
    /// routes' lock, so that a receiver takes them as one batch).
    fn release(&self) {
        *self.hold.lock() = None;
        let held: Vec<Envelope> = std::mem::take(&mut *self.held.lock());
        let routes = self.routes.lock();
        for env in held {
            if let Some(tx) = routes.get(&env.to) {
                let _ = tx.try_send(env);
            }
        }
    }
}

/// The type of the raft-rs message an envelope carries, if it carries one.
fn raft_type(env: &Envelope) -> Option<raft::eraftpb::MessageType> {
    match &env.body {
        Some(replog_proto::replica::envelope::Body::Raft(bytes)) => {
            let m: raft::eraftpb::Message = protobuf::Message::parse_from_bytes(bytes).ok()?;
            Some(m.get_msg_type())
        }
        _ => None,
    }
}

fn opts() -> LogOptions {
    LogOptions {
        tick_interval: Duration::from_millis(20),
        start_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn start(board: &Switchboard, dir: &Path, id: u64, all: &[u64]) -> Log {
    start_with(board, dir, id, all, opts())
}

fn start_with(board: &Switchboard, dir: &Path, id: u64, all: &[u64], opts: LogOptions) -> Log {
    let (tx, rx) = bounded(4096);
    board.routes.lock().insert(id, tx);
    let cluster = ClusterOptions {
        peers: all
            .iter()
            .filter(|p| **p != id)
            .map(|p| (*p, format!("replica-{p}")))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    };
    Log::open_replica(dir, opts, cluster, Arc::new(board.clone()), rx).unwrap()
}

fn init(dir: &Path, id: u64, all: &[u64]) {
    RocksStorage::initialize(
        dir,
        &InitOptions {
            cluster_id: CLUSTER.into(),
            replica_id: id,
            members: all
                .iter()
                .map(|m| Member {
                    id: *m,
                    address: format!("replica-{m}"),
                })
                .collect(),
        },
    )
    .unwrap();
}

fn empty(dir: &Path, id: u64) {
    RocksStorage::create_empty(
        dir,
        &InitOptions {
            cluster_id: CLUSTER.into(),
            replica_id: id,
            members: vec![Member {
                id,
                address: String::new(),
            }],
        },
    )
    .unwrap();
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn leader(logs: &BTreeMap<u64, Log>) -> u64 {
    let mut found = None;
    eventually("a leader", || {
        found = logs
            .iter()
            .find(|(_, l)| l.progress().leader_ready)
            .map(|(id, _)| *id);
        found.is_some()
    });
    found.unwrap()
}

/// Role changes, status changes and raft-rs's own notes (elections, quorum
/// checks) go to the test's output, shown when a test fails: an unexpected
/// election is then explained by the log. `RUST_LOG` overrides the filter.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("raft=info,replog_core=info,replog_log=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_replicate_and_a_wiped_replica_rejoins() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: BTreeMap<u64, PathBuf> = (1..=3)
        .map(|i| (i, tmp.path().join(format!("r{i}"))))
        .collect();
    let all = [1, 2, 3];
    let board = Switchboard::default();
    let mut logs = BTreeMap::new();
    for (id, dir) in &dirs {
        init(dir, *id, &all);
        logs.insert(*id, start(&board, dir, *id, &all));
    }
    let l = leader(&logs);
    let mut w = logs[&l].writer();
    w.start().await.unwrap();
    let mut written = Vec::new();
    for i in 0..50u32 {
        let p = w.append(format!("entry-{i}").into_bytes()).await.unwrap();
        written.push((p, format!("entry-{i}")));
    }
    let last = written.last().unwrap().0;
    let ending = logs[&l].linearizable_ending().await.unwrap();
    assert!(ending >= last);
    // Every replica has every entry.
    for (id, log) in &logs {
        eventually("replication", || log.reader().ending() >= last);
        let got = log.reader().read(written[0].0, last).unwrap();
        let want: Vec<_> = written
            .iter()
            .map(|(p, d)| (*p, d.clone().into_bytes()))
            .collect();
        let got: Vec<_> = got
            .into_iter()
            .map(|e| (e.position, e.data.to_vec()))
            .collect();
        assert_eq!(got, want, "replica {id}");
    }
    // Lone appends: on each replica, the sync thread reported most of its
    // fsyncs to the core itself rather than waking the driver thread.
    for (id, log) in &logs {
        assert!(
            log.sync_reported_count() > 0,
            "replica {id}: no fsync reported by the sync thread"
        );
    }
    // A linearizable read on a follower goes through the leader.
    let follower = *logs.keys().find(|id| **id != l).unwrap();
    assert!(logs[&follower].linearizable_ending().await.unwrap() >= last);
    // Writing on a follower is refused with the leader's id.
    let mut fw = logs[&follower].writer();
    assert!(matches!(
        tokio::time::timeout(Duration::from_millis(300), fw.start()).await,
        Err(_) | Ok(Err(_))
    ));

    // The follower loses its disk and comes back EMPTY: it rejoins.
    logs.remove(&follower).unwrap().close();
    std::fs::remove_dir_all(&dirs[&follower]).unwrap();
    empty(&dirs[&follower], follower);
    let rejoined = start(&board, &dirs[&follower], follower, &all);
    for i in 50..60u32 {
        let p = w.append(format!("entry-{i}").into_bytes()).await.unwrap();
        written.push((p, format!("entry-{i}")));
    }
    let last = written.last().unwrap().0;
    eventually("the wiped replica to be VOTING again", || {
        rejoined.progress().status == ReplicaStatus::Voting && rejoined.reader().ending() >= last
    });
    let got = rejoined.reader().read(written[0].0, last).unwrap();
    assert_eq!(
        got.len(),
        written.len(),
        "the rejoined replica has the whole log"
    );
    let status = logs[&l].cluster_status().await.unwrap();
    eventually("the rejoined replica to be a voter", || {
        let s = futures_lite_block(logs[&l].cluster_status()).unwrap();
        s.members.iter().any(|m| m.id == follower && m.voter)
    });
    assert!(status.members.iter().all(|m| m.reachable));
    logs.insert(follower, rejoined);

    // Add a fourth replica at runtime.
    let d4 = tmp.path().join("r4");
    empty(&d4, 4);
    let r4 = start(&board, &d4, 4, &[1, 2, 3, 4]);
    logs[&l]
        .change_membership(
            vec![MembershipChange::AddLearner(4)],
            vec![Member {
                id: 4,
                address: "replica-4".into(),
            }],
        )
        .await
        .unwrap();
    let p = w.append(&b"after-add"[..]).await.unwrap();
    eventually("the new replica to be VOTING", || {
        r4.progress().status == ReplicaStatus::Voting && r4.reader().ending() >= p
    });
    let got = r4.reader().read(r4.reader().beginning(), p).unwrap();
    assert_eq!(got.last().unwrap().data.as_ref(), b"after-add");
    assert!(logs[&l]
        .meta()
        .members
        .iter()
        .any(|m| m.id == 4 && m.address == "replica-4"));

    // Leadership moves away: the old writer fails with a distinct error and
    // the leadership watch tells the embedding scheduler.
    let mut watch = logs[&l].watch_progress();
    let to = *logs.keys().find(|id| **id != l).unwrap();
    logs[&l].transfer_leader(to).unwrap();
    eventually("leadership to move", || logs[&to].progress().leader_ready);
    tokio::time::timeout(Duration::from_secs(10), async {
        while watch.borrow_and_update().is_leader {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the watch reports the lost leadership");
    match w.append(&b"from-the-old-writer"[..]).await {
        Err(replog_log::LogError::LeadershipLost { term }) => assert_eq!(Some(term), w.term()),
        other => panic!("expected LeadershipLost, got {other:?}"),
    }
    let mut w2 = logs[&to].writer();
    w2.start().await.unwrap();
    let p2 = w2.append(&b"from-the-new-writer"[..]).await.unwrap();
    assert!(p2 > p);
    drop(r4);
}

/// Runs a future to completion from synchronous test code.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Three initialized replicas started with `opts`; returns them and their
/// directories (in `tmp`).
fn cluster_of_three(
    tmp: &Path,
    board: &Switchboard,
    opts: &LogOptions,
) -> (BTreeMap<u64, Log>, BTreeMap<u64, PathBuf>) {
    let all = [1, 2, 3];
    let dirs: BTreeMap<u64, PathBuf> = all
        .iter()
        .map(|i| (*i, tmp.join(format!("r{i}"))))
        .collect();
    let mut logs = BTreeMap::new();
    for (id, dir) in &dirs {
        init(dir, *id, &all);
        logs.insert(*id, start_with(board, dir, *id, &all, opts.clone()));
    }
    (logs, dirs)
}

/// Two followers forward their first linearizable read to the leader in
/// the same instant. raft-rs keeps one pending read index request per
/// request context and silently drops a second one with the same context;
/// read ids used to start at 1 on every replica, so both followers' first
/// reads carried the same context and one of them hung until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_forwarded_by_two_followers_at_once_are_both_answered() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let board = Switchboard::default();
    let opts = LogOptions {
        read_timeout: Duration::from_secs(3),
        ..opts()
    };
    let (logs, _dirs) = cluster_of_three(tmp.path(), &board, &opts);
    let l = leader(&logs);
    let mut w = logs[&l].writer();
    w.start().await.unwrap();
    let last = w.append(&b"before the reads"[..]).await.unwrap();
    let followers: Vec<u64> = logs.keys().copied().filter(|id| *id != l).collect();
    for f in &followers {
        eventually("the followers to know the leader", || {
            logs[f].progress().leader == Some(l)
        });
    }

    // Hold the forwarded read index requests until both were sent, then
    // deliver them to the leader together.
    *board.hold.lock() = Some(Box::new(move |env: &Envelope| {
        env.to == l && raft_type(env) == Some(raft::eraftpb::MessageType::MsgReadIndex)
    }));
    let (a, b) = (&logs[&followers[0]], &logs[&followers[1]]);
    let reads = async { tokio::join!(a.linearizable_ending(), b.linearizable_ending()) };
    let release = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while board.held.lock().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the followers did not forward their reads"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        board.release();
    };
    let ((ra, rb), ()) = tokio::join!(reads, release);
    for (id, r) in [(followers[0], ra), (followers[1], rb)] {
        let ending = r.unwrap_or_else(|e| panic!("replica {id}: linearizable read failed: {e}"));
        assert!(
            ending >= last,
            "replica {id}: read ending {ending} before {last}"
        );
    }
}

/// A follower cut off from its cluster still ends a linearizable read: it
/// is refused with `ReadNotConfirmed` (nothing executed, safe to retry)
/// within the read timeout, never left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_no_leader_confirms_ends_with_read_not_confirmed() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let board = Switchboard::default();
    let read_timeout = Duration::from_secs(1);
    let opts = LogOptions {
        read_timeout,
        ..opts()
    };
    let (logs, _dirs) = cluster_of_three(tmp.path(), &board, &opts);
    let l = leader(&logs);
    let f = *logs.keys().find(|id| **id != l).unwrap();
    eventually("the follower to know the leader", || {
        logs[&f].progress().leader == Some(l)
    });
    board.cut.lock().push(f);
    // Generous: the read must end by itself, long before this.
    let r = tokio::time::timeout(read_timeout * 10, logs[&f].linearizable_ending())
        .await
        .expect("a linearizable read was left waiting");
    match r {
        Err(replog_log::LogError::ReadNotConfirmed { waited }) => assert_eq!(waited, read_timeout),
        other => panic!("expected ReadNotConfirmed, got {other:?}"),
    }
    // Back in touch, the same replica answers again.
    board.cut.lock().clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match logs[&f].linearizable_ending().await {
            Ok(_) => break,
            Err(replog_log::LogError::ReadNotConfirmed { .. }) => {
                assert!(Instant::now() < deadline, "reads never confirmed again");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

/// A wiped follower catches up a log many times the fetch budget: the
/// leader's reads for it are spread over many turns, none reading more
/// than the budget (plus one entry), and the follower gets the whole log
/// and turns VOTING again; the leader keeps committing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_a_budget_per_turn() {
    init_tracing();
    const BUDGET: u64 = 1024 * 1024;
    const ENTRY: usize = 64 * 1024;
    const ENTRIES: u32 = 384; // 24 MiB
    let tmp = tempfile::tempdir().unwrap();
    let board = Switchboard::default();
    let opts = LogOptions {
        fetch_budget_bytes: BUDGET,
        ..opts()
    };
    let (mut logs, dirs) = cluster_of_three(tmp.path(), &board, &opts);
    let all = [1, 2, 3];
    let l = leader(&logs);
    let f = *logs.keys().find(|id| **id != l).unwrap();
    logs.remove(&f).unwrap().close();
    let mut w = logs[&l].writer();
    w.start().await.unwrap();
    let mut last = None;
    for i in 0..ENTRIES {
        let mut data = vec![(i % 251) as u8; ENTRY];
        data[..4].copy_from_slice(&i.to_be_bytes());
        last = Some(w.append(data).await.unwrap());
    }
    let last = last.unwrap();
    let before = logs[&l].fetch_stats();

    std::fs::remove_dir_all(&dirs[&f]).unwrap();
    empty(&dirs[&f], f);
    let rejoined = start_with(&board, &dirs[&f], f, &all, opts.clone());
    // Appends keep being answered while the follower catches up.
    let mut during = Vec::new();
    while !(rejoined.progress().status == ReplicaStatus::Voting
        && rejoined.reader().ending() >= last)
    {
        assert!(during.len() < 100_000, "the follower never caught up");
        during.push(w.append(&b"during the catch-up"[..]).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = rejoined
        .reader()
        .read(rejoined.reader().beginning(), last)
        .unwrap();
    let data: Vec<_> = got.iter().filter(|e| e.data.len() == ENTRY).collect();
    assert_eq!(
        data.len(),
        ENTRIES as usize,
        "the follower has every large entry"
    );
    for (i, e) in data.iter().enumerate() {
        assert_eq!(
            &e.data[..4],
            &(i as u32).to_be_bytes(),
            "entry {} out of order",
            e.position
        );
    }
    let s = logs[&l].fetch_stats();
    assert!(
        s.deferred > before.deferred,
        "the catch-up never waited for a later turn's budget: {s:?}"
    );
    assert!(
        s.max_turn_bytes <= BUDGET + ENTRY as u64 + 1024,
        "a turn read {} bytes for followers, over the budget of {BUDGET}",
        s.max_turn_bytes
    );
    // So the catch-up took at least total / budget turns.
    assert!(
        s.bytes - before.bytes >= u64::from(ENTRIES) * ENTRY as u64,
        "the leader read less than the log for the follower: {s:?}"
    );
}
