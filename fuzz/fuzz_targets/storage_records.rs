//! The stored records of a replica (`replog_storage::records`): the
//! metadata record, a log entry record (and the command in it, as the log
//! classifies it), the identity file.
//!
//! Input: selector byte, log position (8 bytes LE, for a log record), the
//! stored value. Holds: no decoder panics; a bad record is a corruption
//! error; an accepted record encodes to a value that decodes to the same
//! record; a log entry is at the position it was read at, with a non-zero
//! term.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog_fuzz::Input;
use replog_storage::records;

const MAX_RECORD_BYTES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let selector = input.byte() % 3;
    let index = input.u64();
    let value = input.rest();
    let loc = || "fuzz".to_string();
    match selector {
        0 => match records::decode_meta(value, loc) {
            Ok(meta) => {
                let again = records::decode_meta(&records::encode_meta(&meta), loc).unwrap();
                assert_eq!(again, meta);
                // Membership history is strictly after the snapshot, in order.
                let mut prev = meta.snapshot_index;
                for (i, _) in &meta.conf_history {
                    assert!(*i > prev);
                    prev = *i;
                }
            }
            Err(e) => assert!(e.is_corruption(), "{e}"),
        },
        1 => match records::decode_log_entry(index, value, MAX_RECORD_BYTES, loc) {
            Ok(entry) => {
                assert_eq!(entry.index, index);
                assert_ne!(entry.term, 0);
                let stored = records::encode_log_entry(&entry);
                let again = records::decode_log_entry(index, &stored, MAX_RECORD_BYTES, loc);
                assert_eq!(again.unwrap(), entry);
                // What readers and apply make of it: an error or a content,
                // and a command re-encodes to itself.
                if let Ok(replog_core::EntryContent::Command(c)) = replog_core::classify(&entry) {
                    let e2 = raft::eraftpb::Entry {
                        index,
                        data: c.encode().into(),
                        ..Default::default()
                    };
                    assert_eq!(
                        replog_core::classify(&e2).unwrap(),
                        replog_core::EntryContent::Command(c)
                    );
                }
            }
            Err(e) => assert!(e.is_corruption(), "{e}"),
        },
        _ => match records::decode_identity(value, "fuzz") {
            Ok(id) => {
                let again = records::decode_identity(&records::encode_identity(&id), "fuzz");
                assert_eq!(again.unwrap(), id);
            }
            Err(e) => assert!(e.is_corruption(), "{e}"),
        },
    }
});
