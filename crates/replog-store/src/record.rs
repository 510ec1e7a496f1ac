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
use replog_proto::store::{log_record, FramedBegin, FramedKind, FramedPart, LogRecord};
use replog_state::SCHEMA_VERSION;

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
    #[error(
        "the log entry at position {position} was written with state schema {found}, \
         newer than this replica's ({supported}): upgrade this replica to apply it"
    )]
    NewerSchema {
        position: u64,
        found: u32,
        supported: u32,
    },
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
        schema_version: SCHEMA_VERSION,
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
    let parts: Vec<&[u8]> = body.chunks(part_bytes(max_entry_bytes)?).collect();
    let mut out = Vec::with_capacity(parts.len() + 1);
    out.push(framed_begin(
        id,
        FramedKind::Transaction,
        body.len() as u64,
        crc32c::crc32c(&body),
        parts.len() as u32,
    ));
    for (index, data) in parts.into_iter().enumerate() {
        let rec = framed_part(id, index as u32, Bytes::copy_from_slice(data));
        assert!(
            rec.len() <= max_entry_bytes,
            "a part of {} bytes does not fit in an entry of {max_entry_bytes}: PART_OVERHEAD is too small",
            rec.len()
        );
        out.push(rec);
    }
    Ok(out)
}

/// The usable data bytes of one part when entries are at most
/// `max_entry_bytes`.
pub fn part_bytes(max_entry_bytes: usize) -> Result<usize, RecordError> {
    if max_entry_bytes <= PART_OVERHEAD {
        return Err(RecordError::EntryLimitTooSmall(max_entry_bytes));
    }
    Ok(max_entry_bytes - PART_OVERHEAD)
}

/// The begin record of a framed write.
pub fn framed_begin(id: u64, kind: FramedKind, total_bytes: u64, crc: u32, parts: u32) -> Bytes {
    Bytes::from(
        LogRecord {
            record: Some(log_record::Record::FramedBegin(FramedBegin {
                id,
                total_bytes,
                crc32c: crc,
                part_count: parts,
                kind: kind as i32,
            })),
            schema_version: SCHEMA_VERSION,
        }
        .encode_to_vec(),
    )
}

/// The record that closes a framed write left open: a begin that announces
/// nothing (no bytes, no parts). A writer appends it when it starts
/// ([`crate::SchedulerStore::start_writer`]), and a writer whose framed
/// write failed between its parts appends it too: the framed write an
/// earlier writer left open (its leadership ended between the parts) is
/// then aborted on every replica at the same position, and the applied
/// position, held before that write's beginning, moves on without waiting
/// for the next write. A replica that does not know this record takes it
/// for a begin it aborts at once: the same outcome.
pub fn close_framed_write() -> Bytes {
    framed_begin(CLOSE_FRAME_ID, FramedKind::Transaction, 0, 0, 0)
}

/// The id of [`close_framed_write`]'s record (no framed write has it: a
/// writer's ids start from the clock).
const CLOSE_FRAME_ID: u64 = 0;

fn is_close_framed_write(begin: &FramedBegin) -> bool {
    begin.part_count == 0 && begin.total_bytes == 0 && begin.id == CLOSE_FRAME_ID
}

/// Part `index` of framed write `id`.
pub fn framed_part(id: u64, index: u32, data: Bytes) -> Bytes {
    Bytes::from(
        LogRecord {
            record: Some(log_record::Record::FramedPart(FramedPart {
                id,
                index,
                data,
            })),
            schema_version: 0,
        }
        .encode_to_vec(),
    )
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
    if rec.schema_version > SCHEMA_VERSION {
        return Err(RecordError::NewerSchema {
            position,
            found: rec.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(rec)
}

/// What a record, fed in log order, makes of the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// Apply this transaction at this position.
    Apply { position: u64, txn: Transaction },
    /// A state replacement began: spool the parts that follow.
    ReplaceBegin {
        id: u64,
        begun_at: u64,
        total_bytes: u64,
    },
    /// The next slice of replacement `id` (in order).
    ReplacePart { id: u64, data: Bytes },
    /// Replacement `id` arrived whole (size and crc32c checked): replace
    /// the state with it at `position`.
    Replace { id: u64, position: u64 },
    /// The framed write that began at `begun_at` will never complete.
    Aborted {
        id: u64,
        begun_at: u64,
        reason: String,
    },
}

/// A framed write in progress: its begin was seen, not all its parts.
struct Partial {
    id: u64,
    kind: FramedKind,
    begun_at: u64,
    /// What the begin announced.
    total_bytes: u64,
    crc32c: u32,
    part_count: u32,
    /// The index of the part due next.
    next_part: u32,
    /// Bytes of the parts received and their running crc32c.
    received_bytes: u64,
    running_crc32c: u32,
    /// A transaction's bytes (a replacement's go to the caller instead).
    transaction_bytes: Vec<u8>,
}

impl Partial {
    /// The framed write that `begin`, at `position`, announces.
    fn new(position: u64, begin: &FramedBegin, kind: FramedKind) -> Self {
        Partial {
            id: begin.id,
            kind,
            begun_at: position,
            total_bytes: begin.total_bytes,
            crc32c: begin.crc32c,
            part_count: begin.part_count,
            next_part: 0,
            received_bytes: 0,
            running_crc32c: 0,
            transaction_bytes: match kind {
                FramedKind::Transaction => {
                    Vec::with_capacity((begin.total_bytes as usize).min(16 << 20))
                }
                FramedKind::StateReplacement => Vec::new(),
            },
        }
    }

    /// Whether `part`, at `position`, is the one due: of this write, next
    /// in order, within the announced size. `Err`: why not.
    fn check_due(&self, position: u64, part: &FramedPart) -> Result<(), String> {
        if part.id != self.id || part.index != self.next_part {
            return Err(format!(
                "position {position} holds part {} of write {} where part {} of write {} was due",
                part.index, part.id, self.next_part, self.id
            ));
        }
        if self.received_bytes + part.data.len() as u64 > self.total_bytes {
            return Err(format!(
                "its parts exceed the announced {} bytes at position {position}",
                self.total_bytes
            ));
        }
        Ok(())
    }

    /// Takes in the part that was due (see [`Self::check_due`]).
    fn accept(&mut self, part: FramedPart, out: &mut Vec<Assembled>) {
        assert!(
            part.id == self.id && part.index == self.next_part,
            "part {} of write {} accepted where part {} of write {} was due",
            part.index,
            part.id,
            self.next_part,
            self.id
        );
        self.received_bytes += part.data.len() as u64;
        assert!(
            self.received_bytes <= self.total_bytes,
            "write {} received {} bytes, over the announced {}",
            self.id,
            self.received_bytes,
            self.total_bytes
        );
        self.running_crc32c = crc32c::crc32c_append(self.running_crc32c, &part.data);
        match self.kind {
            FramedKind::Transaction => self.transaction_bytes.extend_from_slice(&part.data),
            FramedKind::StateReplacement => out.push(Assembled::ReplacePart {
                id: self.id,
                data: part.data,
            }),
        }
        self.next_part += 1;
    }

    /// True once every announced part arrived.
    fn has_all_parts(&self) -> bool {
        self.next_part >= self.part_count
    }

    /// What the whole write, complete at `position`, makes of the state.
    fn finish(self, position: u64) -> Assembled {
        assert_eq!(
            self.next_part, self.part_count,
            "a framed write finishes with its last part"
        );
        if self.received_bytes != self.total_bytes || self.running_crc32c != self.crc32c {
            return Assembled::Aborted {
                id: self.id,
                begun_at: self.begun_at,
                reason: format!(
                    "its {} bytes do not match the announced size {} and crc32c {:#010x}",
                    self.received_bytes, self.total_bytes, self.crc32c
                ),
            };
        }
        match self.kind {
            FramedKind::StateReplacement => Assembled::Replace {
                id: self.id,
                position,
            },
            FramedKind::Transaction => match Transaction::decode(self.transaction_bytes.as_slice())
            {
                Ok(txn) => Assembled::Apply { position, txn },
                Err(e) => Assembled::Aborted {
                    id: self.id,
                    begun_at: self.begun_at,
                    reason: format!("its bytes are not a transaction: {e}"),
                },
            },
        }
    }
}

/// Puts framed transactions back together (see the module docs).
pub struct Reassembler {
    max_transaction_bytes: usize,
    max_replacement_bytes: u64,
    partial: Option<Partial>,
}

/// Largest state replacement a reader accepts by default (1 TiB: it is
/// spooled to disk, so the bound is only against nonsense).
pub const DEFAULT_MAX_REPLACEMENT_BYTES: u64 = 1 << 40;

impl Reassembler {
    pub fn new(max_transaction_bytes: usize) -> Self {
        Reassembler {
            max_transaction_bytes,
            max_replacement_bytes: DEFAULT_MAX_REPLACEMENT_BYTES,
            partial: None,
        }
    }

    /// Whether a framed write is in progress (its begin was seen, not all
    /// its parts).
    pub fn in_progress(&self) -> Option<u64> {
        self.partial.as_ref().map(|p| p.id)
    }

    /// Where the framed write in progress began.
    pub fn begun_at(&self) -> Option<u64> {
        self.partial.as_ref().map(|p| p.begun_at)
    }

    fn abort(&mut self, reason: impl Into<String>, out: &mut Vec<Assembled>) {
        if let Some(p) = self.partial.take() {
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
            Some(log_record::Record::FramedBegin(begin)) => self.begin(position, begin, out),
            Some(log_record::Record::FramedPart(part)) => self.push_part(position, part, out),
        }
    }

    /// The framed write announced at `position` begins (and one in
    /// progress is aborted); one over its kind's limit, of no known kind
    /// or without parts is aborted at once.
    fn begin(&mut self, position: u64, begin: FramedBegin, out: &mut Vec<Assembled>) {
        if is_close_framed_write(&begin) {
            self.abort(
                format!("a writer closed it at position {position} (its own writer stopped between the parts)"),
                out,
            );
            return;
        }
        self.abort(
            format!("another framed write began at position {position}"),
            out,
        );
        let kind = FramedKind::try_from(begin.kind).ok();
        let limit_bytes = match kind {
            Some(FramedKind::Transaction) => self.max_transaction_bytes as u64,
            Some(FramedKind::StateReplacement) => self.max_replacement_bytes,
            None => 0,
        };
        let (Some(kind), true) = (
            kind,
            begin.total_bytes <= limit_bytes && begin.part_count > 0,
        ) else {
            out.push(Assembled::Aborted {
                id: begin.id,
                begun_at: position,
                reason: format!(
                    "it announces {} bytes of kind {} in {} parts (limit {limit_bytes} bytes)",
                    begin.total_bytes, begin.kind, begin.part_count
                ),
            });
            return;
        };
        if kind == FramedKind::StateReplacement {
            out.push(Assembled::ReplaceBegin {
                id: begin.id,
                begun_at: position,
                total_bytes: begin.total_bytes,
            });
        }
        self.partial = Some(Partial::new(position, &begin, kind));
    }

    /// A part at `position`: taken in if it is the one due, else the write
    /// in progress is aborted; the write is finished with its last part.
    fn push_part(&mut self, position: u64, part: FramedPart, out: &mut Vec<Assembled>) {
        let Some(p) = self.partial.as_mut() else {
            // A part whose begin was aborted already, or lies before
            // the start of what this reader saw: nothing to do.
            return;
        };
        if let Err(why) = p.check_due(position, &part) {
            self.abort(why, out);
            return;
        }
        p.accept(part, out);
        if !p.has_all_parts() {
            return;
        }
        let p = self.partial.take().expect("in progress above");
        out.push(p.finish(position));
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

    fn replacement(id: u64, data: &[u8], part: usize) -> Vec<Bytes> {
        let parts: Vec<&[u8]> = data.chunks(part).collect();
        let mut v = vec![framed_begin(
            id,
            FramedKind::StateReplacement,
            data.len() as u64,
            crc32c::crc32c(data),
            parts.len() as u32,
        )];
        for (i, d) in parts.into_iter().enumerate() {
            v.push(framed_part(id, i as u32, Bytes::copy_from_slice(d)));
        }
        v
    }

    #[test]
    fn a_replacement_is_streamed_out_and_completes_at_its_last_part() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let e = replacement(9, &data, 1000);
        let mut r = Reassembler::new(1000);
        let out = feed(&e, 50, &mut r);
        assert_eq!(
            out[0],
            Assembled::ReplaceBegin {
                id: 9,
                begun_at: 50,
                total_bytes: 10_000
            }
        );
        let mut spooled = Vec::new();
        for o in &out[1..out.len() - 1] {
            let Assembled::ReplacePart { id: 9, data } = o else {
                panic!("{o:?}")
            };
            spooled.extend_from_slice(data);
        }
        assert_eq!(spooled, data);
        assert_eq!(
            out.last().unwrap(),
            &Assembled::Replace {
                id: 9,
                position: 50 + 10
            }
        );
        // Not a transaction: the transaction limit does not apply to it,
        // and nothing of it was buffered.
        assert_eq!(r.in_progress(), None);
    }

    #[test]
    fn a_replacement_interrupted_or_damaged_is_aborted() {
        let data = vec![5u8; 5000];
        let mut e = replacement(1, &data, 1000);
        e.insert(
            3,
            encode_transaction(&remove("x"), 2, 1 << 20, 1 << 20).unwrap()[0].clone(),
        );
        let mut r = Reassembler::new(1 << 20);
        let out = feed(&e, 1, &mut r);
        assert!(out
            .iter()
            .any(|o| matches!(o, Assembled::Aborted { id: 1, .. })));
        assert!(!out.iter().any(|o| matches!(o, Assembled::Replace { .. })));

        // Same size, one byte changed in a part: the crc32c catches it.
        let mut bad = data.clone();
        bad[4321] ^= 1;
        let mut e = replacement(1, &data, 1000);
        let damaged = replacement(1, &bad, 1000);
        e[5] = damaged[5].clone();
        let mut r = Reassembler::new(1 << 20);
        let out = feed(&e, 1, &mut r);
        assert!(
            matches!(out.last().unwrap(), Assembled::Aborted { reason, .. } if reason.contains("crc32c"))
        );
    }

    #[test]
    fn garbage_is_not_a_record() {
        assert!(decode_record(5, &[0xff, 0xff, 0xff]).is_err());
        assert!(matches!(
            decode_record(5, &[]),
            Err(RecordError::NotARecord { position: 5, .. })
        ));
    }

    #[test]
    fn records_carry_the_schema_and_a_newer_one_is_refused() {
        let txn = Transaction::default();
        let entries = encode_transaction(&txn, 1, 1 << 20, 1 << 20).unwrap();
        let rec = decode_record(3, &entries[0]).unwrap();
        assert_eq!(rec.schema_version, SCHEMA_VERSION);
        // A framed write's begin carries it too; its parts need not.
        let begin = framed_begin(9, FramedKind::Transaction, 10, 0, 1);
        assert_eq!(
            decode_record(4, &begin).unwrap().schema_version,
            SCHEMA_VERSION
        );
        // Records of writers before the field existed read as version 1.
        let old = LogRecord {
            record: Some(log_record::Record::Transaction(txn.clone())),
            schema_version: 0,
        };
        assert!(decode_record(5, &old.encode_to_vec()).is_ok());
        let newer = LogRecord {
            record: Some(log_record::Record::Transaction(txn)),
            schema_version: SCHEMA_VERSION + 1,
        };
        let e = decode_record(6, &newer.encode_to_vec()).unwrap_err();
        assert!(
            matches!(e, RecordError::NewerSchema { position: 6, found, supported }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade this replica"), "{e}");
    }

    /// The closing record aborts a framed write in progress, is nothing
    /// on its own, and never aborts a write that begins after it.
    #[test]
    fn the_closing_record_aborts_only_a_write_in_progress() {
        let t = txn(40, 200);
        let framed = encode_transaction(&t, 9, 1024, 64 << 20).unwrap();
        assert!(framed.len() > 3);
        let close = close_framed_write();

        // Alone: nothing.
        let mut r = Reassembler::new(64 << 20);
        assert!(feed(std::slice::from_ref(&close), 1, &mut r).is_empty());

        // After half a framed write: that write is aborted, at its begin.
        let mut half: Vec<Bytes> = framed[..framed.len() / 2].to_vec();
        half.push(close.clone());
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&half, 10, &mut r);
        assert!(
            matches!(&out[..], [Assembled::Aborted { id: 9, begun_at: 10, reason }]
                if reason.contains("closed it")),
            "{out:?}"
        );
        assert_eq!(r.begun_at(), None);

        // Before a whole framed write: the write applies.
        let mut whole = vec![close];
        whole.extend(framed.iter().cloned());
        let mut r = Reassembler::new(64 << 20);
        let out = feed(&whole, 1, &mut r);
        let last = whole.len() as u64;
        assert_eq!(
            out,
            vec![Assembled::Apply {
                position: last,
                txn: t
            }]
        );
    }
}
