//! Writes the seed inputs of every fuzz target: real encodings, made by the
//! crates' own encoders, under `corpus/<target>/seed-*` (or the directory
//! given as the first argument).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`
//! (`tools/fuzz --seeds` does this). Seeds are deterministic: the same build
//! writes the same files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use replog_core::{Command, PeerMessage};
use replog_fuzz::{sample_entities, sample_transactions, Layout};
use replog_proto::client::AppendResponse;
use replog_proto::snapshot::SnapshotHeader;
use replog_proto::store::FramedKind;
use replog_snapshot::{SnapshotWriter, WriterOptions};
use replog_storage::{frame, records, Member, ReplicaIdentity, ReplicaMeta, ReplicaStatus};
use replog_store::record::{encode_transaction, framed_begin, framed_part};

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let targets: [(&str, Vec<Vec<u8>>); 8] = [
        ("storage_frame", storage_frame()),
        ("storage_records", storage_records()),
        ("peer_envelope", peer_envelope()),
        ("snapshot_stream", snapshot_stream()),
        ("store_backup", store_backup()),
        ("store_records", store_records()),
        ("state_apply", state_apply()),
        ("grpc_unframe", grpc_unframe()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (i, seed) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}

fn storage_frame() -> Vec<Vec<u8>> {
    let cases: [(&[u8], &[u8]); 4] = [
        (b"replica", b"metadata"),
        (&[0, 0, 0, 0, 0, 0, 0, 9], b"entry"),
        (b"replog/identity", b""),
        (b"", &[0xAB; 100]),
    ];
    cases
        .iter()
        .map(|(key, payload)| {
            Layout::default()
                .byte(key.len() as u8)
                .rest(key)
                .rest(&frame::encode(key, payload))
                .bytes
        })
        .collect()
}

fn storage_records() -> Vec<Vec<u8>> {
    let mut meta = ReplicaMeta::initialized("prod-cluster", 2, vec![1, 2, 3], 1_700_000_000_000);
    meta.record_addresses(&[
        Member {
            id: 1,
            address: "10.0.0.1:7000".into(),
        },
        Member {
            id: 2,
            address: "10.0.0.2:7000".into(),
        },
    ]);
    meta.hard_state = HardState {
        term: 5,
        vote: 2,
        commit: 40,
        ..Default::default()
    };
    meta.record_conf_changes(&[(
        7,
        ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        },
    )]);
    let mut empty = ReplicaMeta::empty("prod-cluster", 4, 5);
    empty.status = ReplicaStatus::Recovering;
    let mut seeds: Vec<Vec<u8>> = [meta, empty]
        .iter()
        .map(|m| {
            Layout::default()
                .byte(0)
                .u64(0)
                .rest(&records::encode_meta(m))
                .bytes
        })
        .collect();
    let entries = [
        Entry {
            index: 2,
            term: 1,
            ..Default::default()
        },
        Entry {
            index: 3,
            term: 1,
            data: Command::Append(b"hello".to_vec().into()).encode().into(),
            ..Default::default()
        },
        Entry {
            index: 4,
            term: 2,
            data: Command::Truncate(3).encode().into(),
            ..Default::default()
        },
        Entry {
            index: 5,
            term: 2,
            entry_type: EntryType::EntryConfChangeV2,
            data: vec![0x12, 0x04, 0x08, 0x01, 0x10, 0x04].into(),
            context: vec![0x0A, 0x02, 0x08, 0x04].into(),
            ..Default::default()
        },
    ];
    for e in &entries {
        seeds.push(
            Layout::default()
                .byte(1)
                .u64(e.index)
                .rest(&records::encode_log_entry(e))
                .bytes,
        );
    }
    let id = ReplicaIdentity {
        format_version: replog_storage::FORMAT_VERSION,
        cluster_id: "prod-cluster".into(),
        replica_id: 2,
        created_at_unix_ms: 1_700_000_000_000,
    };
    seeds.push(
        Layout::default()
            .byte(2)
            .u64(0)
            .rest(&records::encode_identity(&id))
            .bytes,
    );
    seeds
}

fn raft_message(msg_type: MessageType) -> Message {
    Message {
        msg_type,
        from: 2,
        to: 1,
        term: 3,
        ..Default::default()
    }
}

fn peer_envelope() -> Vec<Vec<u8>> {
    let mut append = raft_message(MessageType::MsgAppend);
    append.log_term = 3;
    append.index = 10;
    append.commit = 9;
    append.entries = vec![Entry {
        index: 11,
        term: 3,
        data: Command::Append(b"x".to_vec().into()).encode().into(),
        ..Default::default()
    }]
    .into();
    let mut vote = raft_message(MessageType::MsgRequestVote);
    vote.log_term = 2;
    vote.index = 10;
    let mut snap = raft_message(MessageType::MsgSnapshot);
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = 8;
    snapshot.mut_metadata().term = 2;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    snap.set_snapshot(snapshot);
    let mut seeds: Vec<Vec<u8>> = [append, vote, snap, raft_message(MessageType::MsgHeartbeat)]
        .iter()
        .map(|m| replog_log::peers::raft_envelope("c", m).encode_to_vec())
        .collect();
    for msg in [
        PeerMessage::RecoverRequest {
            status: ReplicaStatus::Recovering,
            last_index: 10,
            incarnation: 77,
        },
        PeerMessage::RecoverResponse {
            status: ReplicaStatus::Voting,
            term: 3,
            leader: 2,
            applied: 9,
        },
    ] {
        seeds.push(replog_log::peers::peer_envelope("c", 2, 1, &msg).encode_to_vec());
    }
    seeds
}

fn stream(
    header: &SnapshotHeader,
    records: &[(u32, Vec<u8>)],
    chunk_target_bytes: usize,
) -> Vec<u8> {
    let opts = WriterOptions {
        chunk_target_bytes,
        ..WriterOptions::default()
    };
    let mut w = SnapshotWriter::new(Vec::new(), header, opts).unwrap();
    for (kind, r) in records {
        w.push(*kind, r).unwrap();
    }
    w.finish().unwrap().0
}

fn state_header() -> SnapshotHeader {
    SnapshotHeader {
        format_version: replog_snapshot::FORMAT_VERSION,
        cluster_id: "prod-cluster".into(),
        position: 42,
        term: 3,
        voters: vec![1, 2, 3],
        learners: vec![],
        created_at_unix_ms: 1_700_000_000_000,
        content: replog_store::backup::CONTENT.into(),
        labels: BTreeMap::from([(
            replog_store::backup::SCHEMA_LABEL.to_string(),
            replog_state::SCHEMA_VERSION.to_string(),
        )]),
    }
}

fn entity_records() -> Vec<(u32, Vec<u8>)> {
    sample_entities()
        .iter()
        .map(|e| (replog_state::entity_kind(e), e.encode_to_vec()))
        .collect()
}

fn snapshot_stream() -> Vec<Vec<u8>> {
    let other = SnapshotHeader {
        content: "test.v1".into(),
        ..state_header()
    };
    vec![
        stream(&state_header(), &entity_records(), 1 << 20),
        stream(&state_header(), &entity_records(), 64),
        stream(&other, &[], 1 << 20),
        stream(
            &other,
            &[(1, vec![]), (9, vec![7; 300]), (1, b"abc".to_vec())],
            200,
        ),
    ]
}

fn store_backup() -> Vec<Vec<u8>> {
    let mut task_only = entity_records();
    task_only.truncate(2);
    vec![
        stream(&state_header(), &entity_records(), 1 << 20),
        stream(&state_header(), &entity_records(), 100),
        stream(&state_header(), &task_only, 1 << 20),
        stream(&state_header(), &[], 1 << 20),
    ]
}

fn store_records() -> Vec<Vec<u8>> {
    let txns = sample_transactions();
    let mut seeds = Vec::new();
    for (i, t) in txns.iter().enumerate() {
        let mut l = Layout::default().field(&txns[(i + 1) % txns.len()].encode_to_vec());
        for max_entry in [1 << 20, 96] {
            for e in encode_transaction(t, i as u64 + 1, max_entry, 1 << 20).unwrap() {
                l = l.field(&e);
            }
        }
        seeds.push(l.bytes);
    }
    // A state replacement, whole, then one cut short by a transaction.
    let body = stream(&state_header(), &entity_records(), 1 << 20);
    let parts: Vec<&[u8]> = body.chunks(400).collect();
    let mut l = Layout::default()
        .field(&txns[0].encode_to_vec())
        .field(&framed_begin(
            9,
            FramedKind::StateReplacement,
            body.len() as u64,
            crc32c::crc32c(&body),
            parts.len() as u32,
        ));
    for (i, p) in parts.iter().enumerate() {
        l = l.field(&framed_part(9, i as u32, p.to_vec().into()));
    }
    l = l
        .field(&framed_begin(10, FramedKind::StateReplacement, 1000, 0, 3))
        .field(&framed_part(10, 0, vec![1; 100].into()));
    for e in encode_transaction(&txns[1], 11, 1 << 20, 1 << 20).unwrap() {
        l = l.field(&e);
    }
    seeds.push(l.bytes);
    seeds
}

fn state_apply() -> Vec<Vec<u8>> {
    let txns = sample_transactions();
    let all = txns
        .iter()
        .fold(Layout::default(), |l, t| l.field(&t.encode_to_vec()));
    let mut seeds = vec![all.bytes];
    for t in &txns {
        seeds.push(Layout::default().field(&t.encode_to_vec()).bytes);
    }
    seeds
}

fn grpc_unframe() -> Vec<Vec<u8>> {
    [
        AppendResponse {
            position: 42,
            term: 3,
        },
        AppendResponse::default(),
    ]
    .iter()
    .map(|m| replog_bench::grpc_unary::frame(m).to_vec())
    .collect()
}
