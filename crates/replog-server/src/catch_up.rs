//! [`PeerSnapshots`]: the replica server's [`SnapshotSource`]. A replica
//! whose state is behind its log's beginning (see `replog_store::store`)
//! gets a state snapshot by calling the `Snapshot` RPC
//! (`replog.store.v1.SchedulerState`, read mode LOCAL) of the leader first,
//! then of the other members (`log.meta().members`), going round them from
//! one attempt to the next.
//!
//! Invariants:
//! - memory stays constant: the frames go one at a time through a bounded
//!   channel of [`SNAPSHOT_QUEUE`] pieces to the installing thread;
//! - a stream that breaks or stalls for [`PIECE_TIMEOUT`] ends with an
//!   error piece, so the installer never takes a partial stream for whole
//!   (and the snapshot reader also checks the trailer).

use std::sync::Arc;
use std::time::Duration;

use replog_log::Log;
use replog_proto::store::scheduler_state_client::SchedulerStateClient;
use replog_proto::store::{ReadMode, SnapshotRequest};
use replog_store::{FetchFuture, SnapshotPieces, SnapshotSource};
use tracing::debug;

use crate::MAX_CLIENT_MESSAGE_BYTES;

/// Snapshot pieces buffered between the gRPC stream and the installer.
pub const SNAPSHOT_QUEUE: usize = 16;
/// Longest wait for the next piece of a snapshot stream.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait to connect to a peer and get its stream started.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// State snapshots from the other members of this replica's cluster.
pub struct PeerSnapshots {
    log: Arc<Log>,
}

impl PeerSnapshots {
    pub fn new(log: Arc<Log>) -> Self {
        PeerSnapshots { log }
    }

    /// The other members with an address: the leader first, then by id,
    /// rotated by `attempt`.
    fn candidates(&self, attempt: u64) -> Vec<(u64, String)> {
        let meta = self.log.meta();
        let leader = self.log.progress().leader;
        let mut peers: Vec<(u64, String)> = meta
            .members
            .iter()
            .filter(|m| m.id != meta.replica_id && !m.address.is_empty())
            .map(|m| (m.id, m.address.clone()))
            .collect();
        peers.sort_by_key(|(id, _)| (Some(*id) != leader, *id));
        if !peers.is_empty() {
            let n = (attempt % peers.len() as u64) as usize;
            peers.rotate_left(n);
        }
        peers
    }
}

async fn open_stream(address: &str) -> Result<SnapshotPieces, String> {
    let start = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("'{address}' is not host:port: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut client = SchedulerStateClient::new(ch)
            .max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CLIENT_MESSAGE_BYTES);
        client
            .snapshot(SnapshotRequest {
                mode: ReadMode::Local as i32,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT * 2, start)
        .await
        .map_err(|_| "no answer in time".to_string())??;
    let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_QUEUE);
    tokio::spawn(async move {
        loop {
            let item = match tokio::time::timeout(PIECE_TIMEOUT, stream.message()).await {
                Ok(Ok(Some(frame))) => Ok(frame.data),
                // The end of the stream: the reader checks it ended on
                // the trailer.
                Ok(Ok(None)) => return,
                Ok(Err(s)) => Err(std::io::Error::other(format!(
                    "the snapshot stream broke: {}",
                    s.message()
                ))),
                Err(_) => Err(std::io::Error::other(format!(
                    "the snapshot stream stalled for {PIECE_TIMEOUT:?}"
                ))),
            };
            let stop = item.is_err();
            // The installer went away (it refused the snapshot): stop, which
            // drops the stream and cancels the call.
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(rx)
}

impl SnapshotSource for PeerSnapshots {
    fn fetch(&self, attempt: u64) -> FetchFuture<'_> {
        Box::pin(async move {
            let peers = self.candidates(attempt);
            if peers.is_empty() {
                return Err("no other member with an address to get a state snapshot from".into());
            }
            let mut errors = Vec::new();
            for (id, address) in peers {
                match open_stream(&address).await {
                    Ok(rx) => return Ok((format!("replica {id} at {address}"), rx)),
                    Err(e) => {
                        debug!(replica = id, %address, error = %e, "no state snapshot from this peer");
                        errors.push(format!("replica {id} at {address}: {e}"));
                    }
                }
            }
            Err(format!(
                "no peer served a state snapshot: {}",
                errors.join("; ")
            ))
        })
    }
}
