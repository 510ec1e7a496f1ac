//! The etcd target: etcd's own gRPC API (the subset in
//! `proto/etcd/etcdserverpb/rpc.proto`, compiled by build.rs) and
//! [`EtcdTarget`], which puts values into an etcd cluster's leader.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::grpc_unary::UnaryConn;
use crate::loadgen::{Target, CONNECT_TIMEOUT};
use pb::maintenance_client::MaintenanceClient;

/// The subset of etcd's v3 gRPC API (`KV.Put`, `Maintenance.Status`) that
/// the etcd target drives (`proto/etcd/etcdserverpb/rpc.proto`). Not part of
/// replog's own interfaces.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// A client URL such as `http://127.0.0.1:2379`, without a trailing `/`.
fn parse_endpoint(s: &str) -> Result<String> {
    let s = s.trim().trim_end_matches('/');
    let uri: Uri = s.parse().with_context(|| format!("'{s}' is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("'{s}': only http:// endpoints are supported, not {other}://"),
        None => bail!("'{s}' has no scheme: write http://{s}"),
    }
    if uri.authority().is_none() || !matches!(uri.path(), "" | "/") {
        bail!("'{s}' is not an endpoint such as http://127.0.0.1:2379");
    }
    Ok(s.to_string())
}

/// Opens one gRPC connection (HTTP/2) to an etcd member.
async fn etcd_channel(endpoint: &str) -> Result<Channel> {
    Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("'{endpoint}' is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// Puts values into an etcd cluster's leader through etcd's own gRPC API
/// (`etcdserverpb.KV/Put`), the way etcd's Go client does. Each client
/// keeps its own HTTP/2 connection to the leader, like the replog target.
#[derive(Debug)]
pub struct EtcdTarget {
    /// The leader's client URL.
    pub leader: String,
    /// The leader's member id.
    pub leader_id: u64,
    /// The leader's etcd version.
    pub version: String,
    key_prefix: String,
}

impl EtcdTarget {
    /// Asks every endpoint for its status (`Maintenance/Status`) and picks
    /// the one that is the leader. Unreachable endpoints are only warned
    /// about, as long as one that answers is the leader.
    pub async fn discover(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        let mut answers = Vec::new();
        let mut errors = Vec::new();
        for ep in endpoints {
            let ep = parse_endpoint(ep)?;
            let status = tokio::time::timeout(Duration::from_secs(5), async {
                let mut m = MaintenanceClient::new(etcd_channel(&ep).await?);
                let r = m.status(pb::StatusRequest {}).await?.into_inner();
                anyhow::Ok(r)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within 5s")));
            match status {
                Ok(s) => answers.push((ep, s)),
                Err(e) => errors.push(format!("{ep}: {e:#}")),
            }
        }
        if answers.is_empty() {
            bail!("no etcd endpoint answered: {}", errors.join("; "));
        }
        let member = |s: &pb::StatusResponse| s.header.as_ref().map_or(0, |h| h.member_id);
        let Some((leader, s)) = answers
            .iter()
            .find(|(_, s)| s.leader != 0 && member(s) == s.leader)
        else {
            let seen: Vec<String> = answers
                .iter()
                .map(|(ep, s)| {
                    format!(
                        "{ep} is member {:x} and names leader {:x}",
                        member(s),
                        s.leader
                    )
                })
                .collect();
            bail!(
                "none of the endpoints that answered is the leader ({}); pass the leader's client URL too",
                seen.join("; ")
            );
        };
        for e in &errors {
            tracing::warn!("etcd endpoint {e} (going on with the leader)");
        }
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Ok(EtcdTarget {
            leader: leader.clone(),
            leader_id: s.leader,
            version: s.version.clone(),
            key_prefix: format!("replog-bench/{run}/"),
        })
    }
}

impl Target for EtcdTarget {
    type Session = UnaryConn;

    /// Opens the client's own connection to the leader.
    async fn connect(&self, _client: usize) -> Result<UnaryConn> {
        UnaryConn::connect(&self.leader, CONNECT_TIMEOUT).await
    }

    async fn put(&self, conn: &mut UnaryConn, seq: u64, payload: Bytes) -> Result<()> {
        let req = pb::PutRequest {
            key: Bytes::from(format!("{}{seq:010}", self.key_prefix)),
            value: payload,
            ..Default::default()
        };
        let r: pb::PutResponse = conn
            .call("/etcdserverpb.KV/Put", &req)
            .await
            .with_context(|| format!("put to {}", self.leader))?;
        if r.header.is_none() {
            bail!("etcd answered a put without a response header");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint(" http://127.0.0.1:2379/ ").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert!(parse_endpoint("https://127.0.0.1:2379").is_err());
        assert!(parse_endpoint("127.0.0.1:2379").is_err());
        assert!(parse_endpoint("http://127.0.0.1:2379/v3").is_err());
    }

    #[tokio::test]
    async fn discover_fails_clearly_without_etcd() {
        // Port 1 on loopback: nothing listens there.
        let e = EtcdTarget::discover(&["http://127.0.0.1:1".to_string()])
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("no etcd endpoint answered"),
            "{e:#}"
        );
    }
}
