//! Column families a layer above registers in a replica's database
//! (`OpenOptions::column_families`): created by a read-write open that
//! registers them, always opened once on disk, never created read-only, and
//! never one of the storage's own.

use replog_storage::rocksdb::{Options, DB};
use replog_storage::{InitOptions, OpenOptions, RocksStorage, StorageError, OWN_COLUMN_FAMILIES};

fn families_on_disk(dir: &std::path::Path) -> Vec<String> {
    let mut names = DB::list_cf(&Options::default(), dir).unwrap();
    names.sort();
    names
}

fn registering(names: &[&str]) -> OpenOptions {
    OpenOptions {
        column_families: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

/// A replica as `initialize` makes it, at `path` in a temporary directory
/// (kept as long as the returned guard lives).
fn new_replica() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    drop(RocksStorage::initialize(&path, &InitOptions::single_replica("c")).unwrap());
    (dir, path)
}

#[test]
fn a_new_replica_holds_only_the_storages_own_families() {
    let (_dir, path) = new_replica();
    assert_eq!(families_on_disk(&path), ["default", "log", "meta"]);
}

#[test]
fn a_registered_family_is_created_and_then_always_opened() {
    let (_dir, path) = new_replica();

    let (s, report) = RocksStorage::open(&path, &registering(&["state", "extra"])).unwrap();
    assert!(report.is_clean(), "{:?}", report.damage);
    let db = s.shared_db();
    db.put_cf(db.cf_handle("extra").unwrap(), b"k", b"v")
        .unwrap();
    drop(db);
    drop(s);
    assert_eq!(
        families_on_disk(&path),
        ["default", "extra", "log", "meta", "state"]
    );

    // Not registered this time: what is on disk is opened all the same
    // (RocksDB would refuse the database otherwise), with its data.
    let (s, _) = RocksStorage::open(&path, &OpenOptions::default()).unwrap();
    let db = s.shared_db();
    let extra = db.cf_handle("extra").expect("a family on disk is opened");
    assert_eq!(db.get_cf(extra, b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn a_read_only_open_creates_no_family() {
    let (_dir, path) = new_replica();
    let opts = OpenOptions {
        read_only: true,
        ..registering(&["state"])
    };
    let (s, _) = RocksStorage::open(&path, &opts).unwrap();
    assert!(s.shared_db().cf_handle("state").is_none());
    drop(s);
    assert_eq!(families_on_disk(&path), ["default", "log", "meta"]);
}

#[test]
fn the_storages_own_families_and_duplicates_cannot_be_registered() {
    let (_dir, path) = new_replica();
    for own in OWN_COLUMN_FAMILIES.iter().chain(&[""]) {
        match RocksStorage::open(&path, &registering(&[own])) {
            Err(StorageError::Invalid(msg)) => {
                assert!(msg.contains("cannot be registered"), "{msg}")
            }
            other => panic!(
                "registering '{own}': expected Invalid, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    match RocksStorage::open(&path, &registering(&["state", "state"])) {
        Err(StorageError::Invalid(msg)) => assert!(msg.contains("twice"), "{msg}"),
        other => panic!("expected Invalid, got {:?}", other.map(|_| ())),
    }
    // Nothing was created by the refused opens.
    assert_eq!(families_on_disk(&path), ["default", "log", "meta"]);
}
