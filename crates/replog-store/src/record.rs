//! The records a store writes into the log, and their reassembly.
//!
//! Every application entry of a store's log is one encoded
//! [`LogRecord`]. [`encode_transaction`] turns a transaction into the
//! records to append: one `transaction` record when it fits in
//! `max_entry_bytes`, else a `framed_begin` record and `framed_part`
//! records of at most `max_entry_bytes` each.
//!
//! [`Reassembler`] is the reading side, free of I/O: it is fed the records
//! in log order and says what to apply at which position. Invariants:
//!
//! - a framed transaction is applied only when all its parts arrived in
//!   order, uninterrupted, and the whole encoding has the announced size and
//!   crc32c; it is applied at the position of its last part;
//! - anything else (a part of another id or out of order, a record between
//!   the parts, a size or checksum mismatch, a new begin) aborts it: it is
//!   reported as [`Assembled::Aborted`] and never half applied;
//! - memory is bounded: a begin announcing more than the limit is aborted
//!   at once, and the parts are checked against the announced size as they
//!   arrive.

use bytes::Bytes;
use prost::Message;
use replog_proto::state::Transaction;
use replog_proto::store::{log_record, FramedBegin, FramedPart, LogRecord};

/// Bytes a record adds around a part's data, at most (field tags, lengths
/// and the id and index varints).
pub const PART_OVERHEAD: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("the log entry at position {position} is not a store record: {reason}")]
    NotARecord { position: u64, reason: String },
    #[error("a transaction of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("max_entry_bytes {0} is too small to carry framed parts (at least {min})", min = PART_OVERHEAD + 1)]
    EntryLimitTooSmall(usize),
}

/// The log entries (encoded records) that write `txn`, in order. `id`
/// names a framed write (unique per writer, e.g. a counter seeded from the
/// clock); unused when the transaction fits in one entry.
pub fn encode_transaction(
    txn: &Transaction,
    id: u64,
    max_entry_bytes: usize,
    max_transaction_bytes: usize,
) -> Result<Vec<Bytes>, RecordError> {
    let single = LogRecord {
        record: Some(log_record::Record::Transaction(txn.clone())),
    };
    let body = txn.encode_to_vec();
    if body.len() > max_transaction_bytes {
        return Err(RecordError::TooLarge {
            size: body.len(),
            limit: max_transaction_bytes,
        });
    }
    if single.encoded_len() <= max_entry_bytes {
        return Ok(vec![Bytes::from(single.encode_to_vec())]);
    }
    if max_entry_bytes <= PART_OVERHEAD {
        return Err(RecordError::EntryLimitTooSmall(max_entry_bytes));
    }
    let part_bytes = max_entry_bytes - PART_OVERHEAD;
    let parts: Vec<&[u8]> = body.chunks(part_bytes).collect();
    let mut out = Vec::with_capacity(parts.len() + 1);
    out.push(Bytes::from(
        LogRecord {
            record: Some(log_record::Record::FramedBegin(FramedBegin {
                id,
                total_bytes: body.len() as u64,
                crc32c: crc32c::crc32c(&body),
                part_count: parts.len() as u32,
            })),
        }
        .encode_to_vec(),
    ));
    for (index, data) in parts.into_iter().enumerate() {
        let rec = LogRecord {
            record: Some(log_record::Record::FramedPart(FramedPart {
                id,
                index: index as u32,
                data: Bytes::copy_from_slice(data),
            })),
        };
        debug_assert!(rec.encoded_len() <= max_entry_bytes);
        out.push(Bytes::from(rec.encode_to_vec()));
    }
    Ok(out)
}

/// Decodes one log entry as a record.
pub fn decode_record(position: u64, data: &[u8]) -> Result<LogRecord, RecordError> {
    let rec = LogRecord::decode(data).map_err(|e| RecordError::NotARecord {
        position,
        reason: e.to_string(),
    })?;
    if rec.record.is_none() {
        return Err(RecordError::NotARecord {
            position,
            reason: "the record is empty".into(),
        });
    }
    Ok(rec)
}

/// What a record, fed in log order, makes of the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// Apply this transaction at this position.
    Apply { position: u64, txn: Transaction },
    /// The framed write that began at `begun_at` will never complete.
    Aborted {
        id: u64,
        begun_at: u64,
        reason: String,
    },
}

struct Partial {
    id: u64,
    begun_at: u64,
    total: usize,
    crc: u32,
    parts: u32,
    next: u32,
    buf: Vec<u8>,
}

/// Puts framed transactions back together (see the module docs).
pub struct Reassembler {
    max_transaction_bytes: usize,
    open: Option<Partial>,
}

impl Reassembler {
    pub fn new(max_transaction_bytes: usize) -> Self {
        Reassembler {
            max_transaction_bytes,
            open: None,
        }
    }

    /// Whether a framed write is in progress (its begin was seen, not all
    /// its parts).
    pub fn in_progress(&self) -> Option<u64> {
        self.open.as_ref().map(|p| p.id)
    }

    /// Where the framed write in progress began.
    pub fn begun_at(&self) -> Option<u64> {
        self.open.as_ref().map(|p| p.begun_at)
    }

    fn abort(&mut self, reason: impl Into<String>, out: &mut Vec<Assembled>) {
        if let Some(p) = self.open.take() {
            out.push(Assembled::Aborted {
                id: p.id,
                begun_at: p.begun_at,
                reason: reason.into(),
            });
        }
    }

    /// Feeds the record at `position`; appends what to do to `out`.
    pub fn push(&mut self, position: u64, record: LogRecord, out: &mut Vec<Assembled>) {
        match record.record {
            None => {}
            Some(log_record::Record::Transaction(txn)) => {
                self.abort(
                    format!("a transaction was written at position {position} between its parts"),
                    out,
                );
                out.push(Assembled::Apply { position, txn });
            }
            Some(log_record::Record::FramedBegin(b)) => {
                self.abort(
                    format!("another framed write began at position {position}"),
                    out,
                );
                let total = b.total_bytes as usize;
                if b.total_bytes > self.max_transaction_bytes as u64 || b.part_count == 0 {
                    out.push(Assembled::Aborted {
                        id: b.id,
                        begun_at: position,
                        reason: format!(
                            "it announces {} bytes in {} parts (limit {} bytes)",
                            b.total_bytes, b.part_count, self.max_transaction_bytes
                        ),
                    });
                    return;
                }
                self.open = Some(Partial {
                    id: b.id,
                    begun_at: position,
                    total,
                    crc: b.crc32c,
                    parts: b.part_count,
                    next: 0,
                    buf: Vec::with_capacity(total.min(16 << 20)),
                });
            }
            Some(log_record::Record::FramedPart(part)) => {
                let Some(p) = self.open.as_mut() else {
                    // A part whose begin was aborted already, or lies before
                    // the start of what this reader saw: nothing to do.
                    return;
                };
                if part.id != p.id || part.index != p.next {
                    let why = format!(
                        "position {position} holds part {} of write {} where part {} of write {} was due",
                        part.index, part.id, p.next, p.id
                    );
                    self.abort(why, out);
                    return;
                }
                if p.buf.len() + part.data.len() > p.total {
                    let why = format!(
                        "its parts exceed the announced {} bytes at position {position}",
                        p.total
                    );
                    self.abort(why, out);
                    return;
                }
                p.buf.extend_from_slice(&part.data);
                p.next += 1;
                if p.next < p.parts {
                    return;
                }
                let p = self.open.take().expect("open above");
                if p.buf.len() != p.total || crc32c::crc32c(&p.buf) != p.crc {
                    out.push(Assembled::Aborted {
                        id: p.id,
                        begun_at: p.begun_at,
                        reason: format!(
                            "its {} bytes do not match the announced size {} and crc32c {:#010x}",
                            p.buf.len(),
                            p.total,
                            p.crc
                        ),
                    });
                    return;
                }
                match Transaction::decode(p.buf.as_slice()) {
                    Ok(txn) => out.push(Assembled::Apply { position, txn }),
                    Err(e) => out.push(Assembled::Aborted {
                        id: p.id,
                        begun_at: p.begun_at,
                        reason: format!("its bytes are not a transaction: {e}"),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replog_proto::state::{op, Op, RemoveTasks, SaveTasks, ScheduledTask};

    fn txn(tasks: usize, pad: usize) -> Transaction {
        Transaction {
            ops: vec![Op {
                op: Some(op::Op::SaveTasks(SaveTasks {
                    tasks: (0..tasks)
                        .map(|i| ScheduledTask {
                            task_id: format!("task-{i}-{}", "x".repeat(pad)),
                            ..Default::default()
                        })
                        .collect(),
                })),
            }],
        }
    }

    fn remove(id: &str) -> Transaction {
        Transaction {
            ops: vec![Op {
                op: Some(op::Op::RemoveTasks(RemoveTasks {
                    task_ids: vec![id.into()],
                })),
            }],
        }
    }

    fn feed(entries: &[Bytes], first: u64, r: &mut Reassembler) -> Vec<Assembled> {
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let pos = first + i as u64;
            r.push(pos, decode_record(pos, e).unwrap(), &mut out);
        }
        out
    }

    #[test]
    fn small_transaction_is_one_record() {
        let t = txn(3, 0);
        let e = encode_transaction(&t, 1, 1 << 20, 64 << 20).unwrap();
        assert_eq!(e.len(), 1);
        let mut r = Reassembler::new(64 << 20);
        assert_eq!(
            feed(&e, 10, &mut r),
            vec![Assembled::Apply {
                position: 10,
                txn: t
            }]
        );
    }

    #[test]
    fn big_transaction_is_framed_and_reassembled_at_its_last_part() {
        let t = txn(2000, 40);
        let e = encode_transaction(&t, 7, 4096, 64 << 20).unwrap();
        assert!(e.len() > 10, "{} entries", e.len());
        assert!(e.iter().all(|x| x.len() <= 4096));
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&e, 100, &mut r);
        assert_eq!(
            out,
            vec![Assembled::Apply {
                position: 100 + e.len() as u64 - 1,
                txn: t
            }]
        );
        assert_eq!(r.in_progress(), None);
    }

    #[test]
    fn too_large_is_refused_on_write() {
        let t = txn(1000, 100);
        assert!(matches!(
            encode_transaction(&t, 1, 4096, 10_000),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn an_interrupted_framed_write_is_aborted_and_the_interrupter_applies() {
        let t = txn(500, 40);
        let e = encode_transaction(&t, 7, 2048, 64 << 20).unwrap();
        let other = encode_transaction(&remove("a"), 8, 2048, 64 << 20).unwrap();
        let mut seq: Vec<Bytes> = e[..3].to_vec();
        seq.extend(other.iter().cloned());
        seq.extend(e[3..].iter().cloned());
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&seq, 1, &mut r);
        assert!(
            matches!(
                &out[0],
                Assembled::Aborted {
                    id: 7,
                    begun_at: 1,
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(
            out[1],
            Assembled::Apply {
                position: 4,
                txn: remove("a")
            }
        );
        // The rest of the aborted write's parts are ignored.
        assert_eq!(out.len(), 2, "{out:?}");
    }

    #[test]
    fn a_begin_without_parts_then_a_new_begin_aborts_the_first() {
        let a = encode_transaction(&txn(500, 40), 1, 2048, 64 << 20).unwrap();
        let b = encode_transaction(&txn(400, 40), 2, 2048, 64 << 20).unwrap();
        let mut seq = vec![a[0].clone(), a[1].clone()];
        seq.extend(b.iter().cloned());
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&seq, 1, &mut r);
        assert!(matches!(&out[0], Assembled::Aborted { id: 1, .. }));
        assert!(
            matches!(&out[1], Assembled::Apply { position, .. } if *position == seq.len() as u64)
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn parts_out_of_order_or_corrupt_abort() {
        let e = encode_transaction(&txn(500, 40), 3, 2048, 64 << 20).unwrap();
        // Swap two parts.
        let mut swapped = e.clone();
        swapped.swap(2, 3);
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&swapped, 1, &mut r);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Assembled::Aborted { reason, .. } if reason.contains("was due")));

        // A part whose data changed (same length): the crc32c catches it.
        let mut rec = decode_record(0, &e[2]).unwrap();
        if let Some(log_record::Record::FramedPart(p)) = &mut rec.record {
            let mut d = p.data.to_vec();
            d[5] ^= 0x40;
            p.data = Bytes::from(d);
        }
        let mut changed = e.clone();
        changed[2] = Bytes::from(rec.encode_to_vec());
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&changed, 1, &mut r);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Assembled::Aborted { reason, .. } if reason.contains("crc32c")));
    }

    #[test]
    fn a_begin_over_the_limit_is_aborted_at_once() {
        let e = encode_transaction(&txn(500, 40), 3, 2048, 64 << 20).unwrap();
        let mut r = Reassembler::new(1000);
        let out = feed(&e, 1, &mut r);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Assembled::Aborted { reason, .. } if reason.contains("limit")));
        assert_eq!(r.in_progress(), None);
    }

    #[test]
    fn garbage_is_not_a_record() {
        assert!(decode_record(5, &[0xff, 0xff, 0xff]).is_err());
        assert!(matches!(
            decode_record(5, &[]),
            Err(RecordError::NotARecord { position: 5, .. })
        ));
    }
}
