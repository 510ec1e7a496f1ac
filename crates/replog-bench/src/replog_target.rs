//! The replog target: appends to a running replog cluster's leader.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use replog_proto::client::{AppendRequest, AppendResponse};

use crate::grpc_unary::UnaryConn;
use crate::loadgen::{Target, CONNECT_TIMEOUT};

/// Appends to a replog cluster's leader (`replog.client.v1.ReplogClient/
/// Append`), each client on its own HTTP/2 connection: the same client
/// stack as [`crate::etcd::EtcdTarget`]. The leader is found
/// once, before the clock starts, with the `replog-client` crate; during the
/// run nothing is retried or redirected (a leader change fails the run).
pub struct ReplogTarget {
    /// The leader found before the run (not timed).
    pub leader: String,
}

impl ReplogTarget {
    /// Finds the cluster's leader among `endpoints`.
    pub async fn discover(endpoints: &[String]) -> Result<Self> {
        let client = replog_client::Client::new(endpoints);
        let leader = client
            .leader()
            .await
            .context("cannot find the replog cluster's leader")?;
        Ok(ReplogTarget { leader })
    }
}

impl Target for ReplogTarget {
    type Session = UnaryConn;

    /// Opens the client's own connection to the leader.
    async fn connect(&self, _client: usize) -> Result<UnaryConn> {
        UnaryConn::connect(&self.leader, CONNECT_TIMEOUT).await
    }

    async fn put(&self, conn: &mut UnaryConn, _seq: u64, payload: Bytes) -> Result<()> {
        let r: AppendResponse = conn
            .call(
                "/replog.client.v1.ReplogClient/Append",
                &AppendRequest { data: payload },
            )
            .await
            .with_context(|| format!("append to {}", self.leader))?;
        if r.position == 0 {
            bail!("{} acknowledged an append at position 0", self.leader);
        }
        Ok(())
    }
}
