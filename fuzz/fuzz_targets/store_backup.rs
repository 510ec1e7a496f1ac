//! Backup files and staged-recovery streams (`replog_store::backup`):
//! `header_of`, `inspect` and `load_into` on a file holding the input.
//!
//! Input: the file's bytes. Holds: nothing panics; a file that `inspect`
//! refuses is refused by `load_into` too; a refused load changes nothing
//! (the state hash and the applied position stay as they were); an
//! accepted load leaves exactly the file's records as the state, at the
//! position given, with indexes that agree (`verify`).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use replog_fuzz::{sample_entities, scratch_dir, small_limits};
use replog_state::StateStore;
use replog_store::backup;

struct Scratch {
    dir: tempfile::TempDir,
    state: StateStore,
    position: u64,
}

static SCRATCH: Mutex<Option<Scratch>> = Mutex::new(None);

fn open() -> Scratch {
    let dir = scratch_dir();
    let state = StateStore::open_standalone(&dir.path().join("state"), small_limits()).unwrap();
    Scratch {
        dir,
        state,
        position: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = guard.get_or_insert_with(open);
    let path = s.dir.path().join("scheduler-backup-fuzz");
    std::fs::write(&path, data).unwrap();

    // A state to lose: the sample entities.
    s.position += 1;
    let sample = sample_entities().into_iter().map(Ok::<_, std::io::Error>);
    s.state.replace_all(s.position, sample).unwrap();
    let before = s.state.state_hash().unwrap();

    let header = backup::header_of(&path);
    let inspected = backup::inspect(&path, None);
    if let Ok(i) = &inspected {
        assert_eq!(&i.header, header.as_ref().unwrap());
        assert_eq!(i.stream_bytes, data.len() as u64);
    }
    let loaded = backup::load_into(&s.state, &path, s.position + 1, None);
    match (&inspected, &loaded) {
        (_, Err(e)) => {
            assert!(!matches!(e, backup::BackupError::Io { .. }), "{e}");
            assert_eq!(
                s.state.state_hash().unwrap(),
                before,
                "a refused load changed the state: {e}"
            );
            assert_eq!(s.state.applied(), s.position);
        }
        (Ok(i), Ok(h)) => {
            s.position += 1;
            assert_eq!(h, &i.header);
            assert_eq!(s.state.applied(), s.position);
            let report = s.state.verify().unwrap();
            assert_eq!(report.entities, i.records);
        }
        (Err(e), Ok(_)) => panic!("loaded a file that inspect refuses: {e}"),
    }
});
