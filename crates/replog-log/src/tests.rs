use super::*;
use replog_storage::InitOptions;

fn init(dir: &Path) {
    RocksStorage::initialize(dir, &InitOptions::single_replica("test-cluster")).unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn append_read_truncate_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let log = Log::open(&path, LogOptions::default()).unwrap();
        let mut w = log.writer();
        assert!(matches!(
            w.append(&b"x"[..]).await,
            Err(LogError::WriterNotStarted)
        ));
        let start = w.start().await.unwrap();
        let mut positions = Vec::new();
        for i in 0..20u32 {
            positions.push(w.append(i.to_be_bytes().to_vec()).await.unwrap());
        }
        assert!(positions.windows(2).all(|p| p[0] < p[1]), "positions grow");
        assert!(positions[0] > start);
        let r = log.reader();
        assert_eq!(r.ending(), *positions.last().unwrap());
        let got = r.read(r.beginning(), r.ending()).unwrap();
        assert_eq!(got.len(), 20, "no-ops are filtered out");
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.position, positions[i]);
            assert_eq!(&e.data[..], &(i as u32).to_be_bytes());
        }
        // Truncate before the 11th entry.
        let tpos = w.truncate(positions[10]).await.unwrap();
        assert!(tpos > positions[19]);
        assert_eq!(r.beginning(), positions[10]);
        assert!(matches!(
            r.read(positions[0], positions[12]),
            Err(LogError::Truncated { .. })
        ));
        let after = r.read(positions[10], r.ending()).unwrap();
        assert_eq!(after.len(), 10, "truncation entries are filtered out");
        assert!(matches!(
            r.read(positions[10], Position::new(r.ending().value() + 5)),
            Err(LogError::PastEnd { .. })
        ));
        assert!(matches!(
            r.read(positions[12], positions[11]),
            Err(LogError::Invalid(_))
        ));
        // The data directory is released once the log and its readers are gone.
        drop((r, w));
        log.close();

        let log = Log::open(&path, LogOptions::default()).unwrap();
        let r = log.reader();
        assert_eq!(r.beginning(), positions[10], "truncation is durable");
        let mut w = log.writer();
        let ending = w.start().await.unwrap();
        assert!(ending >= positions[19]);
        let again = r.read(positions[10], positions[19]).unwrap();
        assert_eq!(again, after, "entries survive reopen byte for byte");
        let p = w.append(&b"after-restart"[..]).await.unwrap();
        assert!(p > ending);
    });
}

#[test]
fn oversized_entry_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let opts = LogOptions {
            max_entry_bytes: 1024,
            ..Default::default()
        };
        let log = Log::open(&path, opts).unwrap();
        let mut w = log.writer();
        w.start().await.unwrap();
        let before = log.progress();
        let err = w.append(vec![0u8; 1025]).await.unwrap_err();
        assert!(
            matches!(
                err,
                LogError::EntryTooLarge {
                    size: 1025,
                    max: 1024
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("1025"));
        assert_eq!(
            log.progress().last_index,
            before.last_index,
            "nothing was written"
        );
        w.append(vec![0u8; 1024]).await.unwrap();
    });
}

#[test]
fn concurrent_appends_share_fsyncs_and_all_commit() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let log = Log::open(&path, LogOptions::default()).unwrap();
        let mut w = log.writer();
        w.start().await.unwrap();
        let w = Arc::new(w);
        let syncs_before = log.sync_count();
        let all = append_concurrently(&w, 32, 50, false).await;
        let syncs = log.sync_count() - syncs_before;
        assert!(syncs > 0, "appends were fsynced");
        assert!(
            syncs * 4 <= all.len() as u64,
            "{} concurrent appends took {syncs} fsyncs: they do not share them",
            all.len()
        );
        assert_reads_back(&log, &all);
    });
}

#[test]
fn pending_positions_are_not_readable() {
    // A read past the committed ending but within the written log is
    // "pending", never returned.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    let (storage, _) = RocksStorage::open(&path, &OpenOptions::default()).unwrap();
    // Write entries 2..=4 directly without committing them.
    replog_storage::LogStorage::write(
        &storage,
        replog_storage::LogUpdate {
            entries: replog_storage::conformance::entries(2..=4, 1, 4),
            ..Default::default()
        },
    )
    .unwrap();
    let (tx, rx) = watch::channel(Progress {
        applied: 1,
        ..Default::default()
    });
    let r = Reader {
        storage,
        progress: rx,
    };
    assert!(matches!(
        r.read(Position::new(2), Position::new(3)),
        Err(LogError::Pending { .. })
    ));
    assert!(matches!(
        r.read(Position::new(2), Position::new(9)),
        Err(LogError::PastEnd { .. })
    ));
    drop(tx);
}

#[test]
fn opening_a_recovering_replica_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    {
        let (s, _) = RocksStorage::open(&path, &OpenOptions::default()).unwrap();
        replog_storage::LogStorage::write(
            &s,
            replog_storage::LogUpdate {
                status: Some(ReplicaStatus::Recovering),
                ..Default::default()
            },
        )
        .unwrap();
        replog_storage::LogStorage::sync(&s).unwrap();
    }
    let err = Log::open(&path, LogOptions::default()).err().unwrap();
    assert!(
        matches!(err, LogError::NotVoting(ReplicaStatus::Recovering)),
        "{err}"
    );
}

/// Appends `n` entries one after another and checks they read back.
async fn append_sequentially(log: &Log, n: u32) -> Vec<Position> {
    let mut w = log.writer();
    w.start().await.unwrap();
    let mut written = Vec::new();
    for i in 0..n {
        let d = i.to_be_bytes().to_vec();
        written.push((w.append(d.clone()).await.unwrap(), d));
    }
    assert_reads_back(log, &written);
    written.into_iter().map(|(p, _)| p).collect()
}

#[test]
fn a_lone_append_is_driven_and_fsynced_by_its_caller() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let log = Log::open(&path, LogOptions::default()).unwrap();
        let syncs_before = log.sync_count();
        let driven_before = log.caller_driven_count();
        let positions = append_sequentially(&log, 50).await;
        let driven = log.caller_driven_count() - driven_before;
        assert!(
            driven >= 45,
            "only {driven} of 50 sequential appends were driven by their caller"
        );
        assert!(
            log.sync_count() - syncs_before >= 50,
            "every acknowledged append was fsynced"
        );
        let last = *positions.last().unwrap();
        log.close();
        // Acknowledged means durable: all of it is there after reopen.
        let log = Log::open(&path, LogOptions::default()).unwrap();
        let r = log.reader();
        assert!(r.ending() >= last);
        assert_eq!(r.read(positions[0], last).unwrap().len(), 50);
    });
}

#[test]
fn with_caller_drives_off_every_request_goes_through_the_driver_thread() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let opts = LogOptions {
            caller_drives: false,
            idle_spin: Duration::ZERO,
            ..Default::default()
        };
        let log = Log::open(&path, opts).unwrap();
        append_sequentially(&log, 20).await;
        assert_eq!(log.caller_driven_count(), 0);
        assert_eq!(log.sync_reported_count(), 0);
    });
}

#[test]
fn callers_and_the_driver_thread_interleave_without_losing_a_request() {
    // Sequential writers (which drive when the replica is idle) next to
    // concurrent ones (which queue for the driver thread): every append is
    // answered once, with its own position, and reads back.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r1");
    init(&path);
    rt().block_on(async {
        let log = Log::open(&path, LogOptions::default()).unwrap();
        let mut w = log.writer();
        w.start().await.unwrap();
        let all = append_concurrently(&Arc::new(w), 8, 100, true).await;
        assert_reads_back(&log, &all);
    });
}

/// Appends from `tasks` tasks, `per_task` entries each (the task number
/// and the entry number as data), the tasks yielding now and then when
/// `yielding`; returns every (position, data), sorted by position, and
/// checks the positions are distinct.
async fn append_concurrently(
    w: &Arc<Writer>,
    tasks: u32,
    per_task: u32,
    yielding: bool,
) -> Vec<(Position, Vec<u8>)> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let w = w.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..per_task {
                let mut d = t.to_be_bytes().to_vec();
                d.extend_from_slice(&i.to_be_bytes());
                out.push((w.append(d.clone()).await.unwrap(), d));
                if yielding && i % 10 == t % 10 {
                    tokio::task::yield_now().await;
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    assert!(
        all.windows(2).all(|p| p[0].0 < p[1].0),
        "distinct positions"
    );
    all
}

/// Every (position, data) of `all` (sorted, contiguous) reads back.
fn assert_reads_back(log: &Log, all: &[(Position, Vec<u8>)]) {
    let got = log.reader().read(all[0].0, all[all.len() - 1].0).unwrap();
    assert_eq!(got.len(), all.len());
    for (e, (p, d)) in got.iter().zip(all) {
        assert_eq!((e.position, &e.data[..]), (*p, &d[..]));
    }
}
