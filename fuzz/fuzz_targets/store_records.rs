//! The records of a store's log (`replog_store::record`): decoding an entry
//! as a record and putting framed transactions back together.
//!
//! Input: a field with a transaction (encoded), then log entries (fields),
//! fed in log order from position 1. Holds: nothing panics; the
//! reassembler's output is well formed (a replacement's parts come between
//! its begin and its end, and add up to its announced size; nothing is
//! applied twice at one position); and after whatever came before, the
//! transaction written by `encode_transaction` (framed into small parts)
//! is applied whole, exactly as it was encoded, at the position of its
//! last entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use replog_fuzz::Input;
use replog_proto::state::Transaction;
use replog_store::record::{decode_record, encode_transaction, Assembled, Reassembler};

const MAX_TRANSACTION_BYTES: usize = 1 << 20;
/// Small entries, so that most transactions are framed.
const MAX_ENTRY_BYTES: usize = 96;

/// Checks the shape of the output so far; `open` is the replacement in
/// progress (id, announced bytes, bytes seen).
fn check(out: &[Assembled], open: &mut Option<(u64, u64, u64)>, last_apply: &mut u64) {
    for a in out {
        match a {
            Assembled::ReplaceBegin {
                id, total_bytes, ..
            } => {
                *open = Some((*id, *total_bytes, 0));
            }
            Assembled::ReplacePart { id, data } => {
                let o = open
                    .as_mut()
                    .expect("a replacement part outside a replacement");
                assert_eq!(o.0, *id);
                o.2 += data.len() as u64;
                assert!(o.2 <= o.1, "replacement parts past the announced size");
            }
            Assembled::Replace { id, position } => {
                let o = open.take().expect("a replacement ended that never began");
                assert_eq!((o.0, o.2), (*id, o.1), "a replacement of the wrong size");
                assert!(*position > *last_apply);
                *last_apply = *position;
            }
            Assembled::Aborted { id, .. } => {
                if open.is_some_and(|o| o.0 == *id) {
                    *open = None;
                }
            }
            Assembled::Apply { position, .. } => {
                assert!(*position > *last_apply, "two results at one position");
                *last_apply = *position;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let txn = Transaction::decode(input.field()).unwrap_or_default();
    let mut r = Reassembler::new(MAX_TRANSACTION_BYTES);
    let mut out = Vec::new();
    let mut open = None;
    let mut last_apply = 0;
    let mut position = 0u64;
    while !input.is_empty() {
        position += 1;
        let entry = input.field();
        if let Ok(rec) = decode_record(position, entry) {
            r.push(position, rec, &mut out);
        }
        check(&out, &mut open, &mut last_apply);
        out.clear();
    }

    let Ok(entries) = encode_transaction(&txn, 0xF022, MAX_ENTRY_BYTES, MAX_TRANSACTION_BYTES)
    else {
        return;
    };
    let expected = Transaction::decode(txn.encode_to_vec().as_slice()).unwrap();
    for e in &entries {
        position += 1;
        assert!(e.len() <= MAX_ENTRY_BYTES);
        r.push(position, decode_record(position, e).unwrap(), &mut out);
    }
    check(&out, &mut open, &mut last_apply);
    match out.last() {
        Some(Assembled::Apply { position: p, txn }) => {
            assert_eq!(*p, position);
            // Compared as bytes: a NaN in it is not equal to itself.
            assert_eq!(txn.encode_to_vec(), expected.encode_to_vec());
        }
        other => panic!("a whole transaction was not applied: {other:?}"),
    }
    assert!(r.in_progress().is_none());
});
