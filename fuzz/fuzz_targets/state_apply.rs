//! Transactions as the state store receives them from the log
//! (`replog_state::StateStore::validate` and `apply`), on two stores.
//!
//! Input: transactions (encoded, one per field), applied in order from an
//! empty state. Holds: nothing panics; a transaction that fails `validate`
//! is refused whole; a refused one changes nothing but the applied
//! position; both stores come to the same outcome every time and to the
//! same state hash (the determinism every replica relies on); the indexes
//! always agree with the entities (`verify`).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use replog_fuzz::{scratch_dir, small_limits, Input};
use replog_proto::state::{Entity, Transaction};
use replog_state::{Applied, StateStore};

struct Stores {
    _dir: tempfile::TempDir,
    a: StateStore,
    b: StateStore,
    position: u64,
}

static STORES: Mutex<Option<Stores>> = Mutex::new(None);

fn open() -> Stores {
    let dir = scratch_dir();
    let a = StateStore::open_standalone(&dir.path().join("a"), small_limits()).unwrap();
    let b = StateStore::open_standalone(&dir.path().join("b"), small_limits()).unwrap();
    Stores {
        _dir: dir,
        a,
        b,
        position: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = STORES.lock().unwrap_or_else(|e| e.into_inner());
    let s = guard.get_or_insert_with(open);
    // Every input starts from an empty state.
    s.position += 1;
    let none = std::iter::empty::<Result<Entity, std::io::Error>>;
    s.a.replace_all(s.position, none()).unwrap();
    s.b.replace_all(s.position, none()).unwrap();
    let empty = s.a.state_hash().unwrap();

    let mut input = Input::new(data);
    while !input.is_empty() {
        let Ok(txn) = Transaction::decode(input.field()) else {
            continue;
        };
        s.position += 1;
        let valid = StateStore::validate(&txn, s.a.limits());
        let before = s.a.state_hash().unwrap();
        let a = s.a.apply(s.position, &txn).unwrap();
        let b = s.b.apply(s.position, &txn).unwrap();
        assert_eq!(a.is_rejected(), b.is_rejected(), "{a:?} / {b:?}");
        assert_eq!(s.a.applied(), s.position);
        match a {
            Applied::Rejected(e) => {
                assert!(e.is_rejection(), "{e}");
                assert_eq!(
                    s.a.state_hash().unwrap(),
                    before,
                    "a refused transaction changed the state"
                );
            }
            Applied::Done { .. } => assert!(valid.is_ok(), "applied an invalid transaction"),
        }
    }
    let hash = s.a.state_hash().unwrap();
    assert_eq!(hash, s.b.state_hash().unwrap(), "two stores diverged");
    s.a.verify().unwrap();
    if hash != empty {
        s.b.verify().unwrap();
    }
});
