//! Bad input to replica storage: each case is a clear error and changes
//! nothing on disk.

mod common;

use common::{fingerprint, init};
use prost::Message as _;
use replog_storage::{
    frame, identity, InitOptions, LogStorage, LogUpdate, Member, OpenOptions, RocksStorage,
    StorageError, FORMAT_VERSION,
};

#[test]
fn initialize_refuses_a_non_empty_directory() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("precious.txt"), b"do not touch").unwrap();
    let before = fingerprint(d.path());
    let err = RocksStorage::initialize(
        d.path(),
        &InitOptions {
            cluster_id: "c".into(),
            replica_id: 1,
            members: vec![Member {
                id: 1,
                address: String::new(),
            }],
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, StorageError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("precious.txt"), "{err}");
    assert_eq!(fingerprint(d.path()), before, "nothing changed on disk");
}

#[test]
fn initialize_twice_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    drop(init(&p, "c"));
    let before = fingerprint(&p);
    let err = RocksStorage::initialize(
        &p,
        &InitOptions {
            cluster_id: "c".into(),
            replica_id: 1,
            members: vec![Member {
                id: 1,
                address: String::new(),
            }],
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, StorageError::NotEmpty { .. }), "{err}");
    assert_eq!(fingerprint(&p), before);
}

#[test]
fn initialize_validates_its_arguments() {
    let d = tempfile::tempdir().unwrap();
    let bad = [
        ("", 1, vec![1]),
        ("has space", 1, vec![1]),
        ("ok", 0, vec![0]),
        ("ok", 4, vec![1, 2, 3]),
        ("ok", 1, vec![1, 1]),
    ];
    for (i, (cluster, id, members)) in bad.into_iter().enumerate() {
        let p = d.path().join(format!("r{i}"));
        let err = RocksStorage::initialize(
            &p,
            &InitOptions {
                cluster_id: cluster.into(),
                replica_id: id,
                members: members
                    .into_iter()
                    .map(|id| Member {
                        id,
                        address: String::new(),
                    })
                    .collect(),
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, StorageError::Invalid(_)), "{err}");
        assert!(!p.exists(), "a refused initialize creates nothing");
    }
}

#[test]
fn another_clusters_data_is_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    drop(init(&p, "cluster-a"));
    let before = fingerprint(&p);
    let err = RocksStorage::open(
        &p,
        &OpenOptions {
            expected_cluster_id: Some("cluster-b".into()),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, StorageError::ClusterMismatch { .. }), "{err}");
    assert!(err.to_string().contains("cluster-a") && err.to_string().contains("cluster-b"));
    assert_eq!(fingerprint(&p), before, "nothing changed on disk");
}

#[test]
fn a_future_format_version_is_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    drop(init(&p, "c"));
    // Rewrite REPLICA-IDENTITY as a future binary would.
    let future = replog_proto::storage::ReplicaIdentity {
        format_version: FORMAT_VERSION + 1,
        cluster_id: "c".into(),
        replica_id: 1,
        created_at_unix_ms: 0,
    };
    std::fs::write(
        p.join(identity::IDENTITY_FILE),
        frame::encode(b"replog/identity", &future.encode_to_vec()),
    )
    .unwrap();
    let before = fingerprint(&p);
    let err = RocksStorage::open(&p, &OpenOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, StorageError::UnsupportedFormat { found, .. } if found == FORMAT_VERSION + 1),
        "{err}"
    );
    assert_eq!(fingerprint(&p), before, "nothing changed on disk");
}

#[test]
fn an_uninitialized_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let err = RocksStorage::open(&d.path().join("missing"), &OpenOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, StorageError::NotInitialized { .. }), "{err}");
    let err = RocksStorage::open(d.path(), &OpenOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("replog initialize"), "{err}");
}

#[test]
fn oversized_record_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    drop(init(&p, "c"));
    let (s, _) = RocksStorage::open(
        &p,
        &OpenOptions {
            max_record_bytes: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    let mut e = replog_storage::conformance::entries(2..=2, 2, 2000);
    let err = s
        .write(LogUpdate {
            entries: std::mem::take(&mut e),
            ..Default::default()
        })
        .err()
        .unwrap();
    assert!(matches!(err, StorageError::TooLarge { .. }), "{err}");
    assert_eq!(s.last_index(), 1, "nothing was written");
}

#[test]
fn oversized_record_on_disk_is_corruption_not_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r");
    {
        let s = init(&p, "c");
        s.write(LogUpdate {
            entries: replog_storage::conformance::entries(2..=3, 2, 5000),
            ..Default::default()
        })
        .unwrap();
        s.sync().unwrap();
    }
    let err = RocksStorage::open(
        &p,
        &OpenOptions {
            max_record_bytes: 1000,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("position 2"), "{err}");
}
