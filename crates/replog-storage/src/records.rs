//! The stored records of a replica as bytes: the metadata record, a log
//! entry record and the identity file, each encoded and decoded exactly as
//! [`crate::RocksStorage`] and [`crate::identity`] write and read them
//! (frame, size limit, protobuf decoding, checks).
//!
//! These are the decoders of untrusted bytes of this crate (what is on disk
//! may be damaged in any way); they are public so that fuzz targets
//! (`fuzz/` at the repository root) and tools run the very code a replica
//! runs.
//!
//! Invariants: every `decode_*` returns an error, never panics, for any
//! input; an accepted value decodes to the record that `encode_*` of that
//! record decodes to again (the bytes may differ only where protobuf allows
//! several encodings of one message).

use bytes::Bytes;
use raft::eraftpb::Entry;

use crate::error::Result;
use crate::frame;
use crate::model::{decode_entry, encode_entry, position_key, ReplicaIdentity, ReplicaMeta};

/// Key of the metadata record in the `meta` column family.
pub(crate) const META_KEY: &[u8] = b"replica";
/// Largest metadata record read.
pub(crate) const META_LIMIT: usize = 16 * 1024 * 1024;
/// Key of the repair state record in the `meta` column family.
pub(crate) const REPAIR_STATE_KEY: &[u8] = b"repair-state";
/// Largest repair state record read (replog-repair bounds the state to 4 MiB).
pub(crate) const REPAIR_STATE_LIMIT: usize = 8 * 1024 * 1024;
/// Key the identity file's frame checksum covers.
const IDENTITY_KEY: &[u8] = b"replog/identity";
/// Largest identity file read.
const IDENTITY_LIMIT: usize = 64 * 1024;

/// The stored value of a metadata record (framed under its key).
pub fn encode_meta(meta: &ReplicaMeta) -> Vec<u8> {
    frame::encode(META_KEY, &meta.encode())
}

/// Checks and decodes a stored metadata record value; `location` names it
/// in an error.
pub fn decode_meta(value: &[u8], location: impl Fn() -> String) -> Result<ReplicaMeta> {
    let payload = frame::decode(META_KEY, value, META_LIMIT, &location)?;
    ReplicaMeta::decode(payload, &location())
}

/// The stored value of a repair state record (framed under its key).
pub fn encode_repair_state(state: &[u8]) -> Vec<u8> {
    frame::encode(REPAIR_STATE_KEY, state)
}

/// Checks a stored repair state record value and returns its payload.
pub fn decode_repair_state(value: &[u8], location: impl Fn() -> String) -> Result<Vec<u8>> {
    let payload = frame::decode(REPAIR_STATE_KEY, value, REPAIR_STATE_LIMIT, &location)?;
    Ok(payload.to_vec())
}

/// The stored value of the log entry `e` (framed under its position's key).
pub fn encode_log_entry(e: &Entry) -> Vec<u8> {
    frame::encode(&position_key(e.index), &encode_entry(e))
}

/// Checks and decodes the stored value of log position `index`, refusing
/// one of more than `max_record_bytes`; `location` names it in an error.
pub fn decode_log_entry(
    index: u64,
    value: &[u8],
    max_record_bytes: usize,
    location: impl Fn() -> String,
) -> Result<Entry> {
    let payload = frame::decode(&position_key(index), value, max_record_bytes, &location)?;
    decode_entry(index, Bytes::copy_from_slice(payload), location)
}

/// The contents of an identity file.
pub fn encode_identity(id: &ReplicaIdentity) -> Vec<u8> {
    frame::encode(IDENTITY_KEY, &id.encode())
}

/// Checks and decodes the contents of an identity file; `location` names
/// it in an error.
pub fn decode_identity(bytes: &[u8], location: &str) -> Result<ReplicaIdentity> {
    let payload = frame::decode(IDENTITY_KEY, bytes, IDENTITY_LIMIT, || location.to_string())?;
    ReplicaIdentity::decode(payload, location)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FORMAT_VERSION;
    use raft::eraftpb::EntryType;

    #[test]
    fn records_round_trip() {
        let meta = ReplicaMeta::initialized("c", 2, vec![1, 2, 3], 77);
        assert_eq!(decode_meta(&encode_meta(&meta), String::new).unwrap(), meta);
        let e = Entry {
            index: 9,
            term: 4,
            entry_type: EntryType::EntryConfChange,
            data: b"data".to_vec().into(),
            context: b"ctx".to_vec().into(),
            ..Default::default()
        };
        let v = encode_log_entry(&e);
        assert_eq!(decode_log_entry(9, &v, 1 << 20, String::new).unwrap(), e);
        let id = ReplicaIdentity {
            format_version: FORMAT_VERSION,
            cluster_id: "c".into(),
            replica_id: 3,
            created_at_unix_ms: 5,
        };
        assert_eq!(decode_identity(&encode_identity(&id), "f").unwrap(), id);
    }

    #[test]
    fn a_record_under_another_key_or_over_the_limit_is_corrupt() {
        let e = Entry {
            index: 9,
            term: 4,
            data: vec![7u8; 100].into(),
            ..Default::default()
        };
        let v = encode_log_entry(&e);
        let moved = decode_log_entry(10, &v, 1 << 20, || "log/10".into()).unwrap_err();
        assert!(moved.is_corruption() && moved.to_string().contains("log/10"));
        assert!(decode_log_entry(9, &v, 50, String::new)
            .unwrap_err()
            .is_corruption());
        // A metadata record is not an identity file, nor the other way round.
        let meta = encode_meta(&ReplicaMeta::empty("c", 1, 0));
        assert!(decode_identity(&meta, "f").unwrap_err().is_corruption());
    }
}
