//! A unary gRPC call over one HTTP/2 connection, for the load generator.
//!
//! Why not tonic's generated client: tonic streams a request body, so
//! hyper sends the request's HEADERS, its DATA and an empty END_STREAM
//! DATA frame as they come, which on a busy connection is three `writev`
//! calls, three loopback packets and three wake-ups of the server per call
//! (measured: 2.9 `writev` per call at 1000 clients, the generator's biggest
//! cost, about as much CPU as the replog leader it loads). Here the whole
//! request (HEADERS, then one DATA frame that ends the stream) is queued on
//! the h2 connection before its task runs, so it normally leaves in one
//! write. The load generator drives replog and etcd through this same
//! caller, so neither is favoured.
//!
//! Invariants: every answer is checked (HTTP status 200, `grpc-status` 0,
//! the 5-byte gRPC frame: not compressed, its length what was received, at
//! most [`MAX_RESPONSE_BYTES`]); a bad one is an error, never a panic.
//! Received bytes are released to h2's flow control as they are read.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use tonic::codegen::http::{HeaderMap, Request, StatusCode};

/// Largest gRPC response message accepted.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// One client's HTTP/2 connection; calls on it run one at a time.
pub struct UnaryConn {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for UnaryConn {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl UnaryConn {
    /// Connects to `endpoint` (`host:port`, or `http://host:port`) with
    /// TCP_NODELAY and the HTTP/2 handshake, within `timeout`.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self> {
        let authority = endpoint.trim_start_matches("http://");
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let (send, connection) = h2::client::handshake(tcp).await?;
            anyhow::Ok((send, connection))
        };
        let (send, connection) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| anyhow!("no connection within {timeout:?}"))?
            .with_context(|| format!("cannot connect to {authority}"))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        });
        Ok(UnaryConn {
            send,
            authority: authority.to_string(),
            connection,
        })
    }

    /// Calls the unary method `path` (`/package.Service/Method`) with
    /// `request` and decodes the answer.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        path: &str,
        request: &Req,
    ) -> Result<Resp> {
        let body = frame(request);
        let http_request = Request::post(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .context("cannot build the request")?;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .context("the connection is gone")?;
        let (response, mut stream) = send
            .send_request(http_request, false)
            .context("cannot send the request")?;
        stream
            .send_data(body, true)
            .context("cannot send the request body")?;
        let response = response.await.context("no answer")?;
        let (head, mut body) = response.into_parts();
        if head.status != StatusCode::OK {
            bail!("HTTP status {} from {path}", head.status);
        }
        // A trailers-only answer carries the status in its headers.
        if head.headers.contains_key("grpc-status") {
            check_status(&head.headers, path)?;
            bail!("{path} answered without a message");
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("the answer broke off")?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if message.len() + chunk.len() > MAX_RESPONSE_BYTES + 5 {
                bail!("the answer of {path} exceeds {MAX_RESPONSE_BYTES} bytes");
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .context("the answer's trailers broke off")?
            .ok_or_else(|| anyhow!("{path} answered without a grpc-status"))?;
        check_status(&trailers, path)?;
        unframe(&message, path)
    }
}

/// `request` as one gRPC length-prefixed message (uncompressed).
pub fn frame<M: prost::Message>(request: &M) -> Bytes {
    let len = request.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    request
        .encode(&mut buf)
        .expect("the buffer was sized for the message");
    buf.freeze()
}

/// Decodes the one length-prefixed message of an answer (`path` names the
/// call in an error). These are the network bytes this client parses
/// itself; public for the fuzz targets in `fuzz/`.
pub fn unframe<M: prost::Message + Default>(bytes: &[u8], path: &str) -> Result<M> {
    if bytes.len() < 5 {
        bail!("{path} answered {} bytes, not a gRPC message", bytes.len());
    }
    if bytes[0] != 0 {
        bail!("{path} answered a compressed message (flag {})", bytes[0]);
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if len != bytes.len() - 5 {
        bail!(
            "{path} answered a message of {len} bytes in a frame of {}",
            bytes.len() - 5
        );
    }
    M::decode(&bytes[5..]).with_context(|| format!("cannot decode the answer of {path}"))
}

/// `grpc-status` 0, or an error naming the status and its message.
fn check_status(headers: &HeaderMap, path: &str) -> Result<()> {
    let status = headers
        .get("grpc-status")
        .ok_or_else(|| anyhow!("{path} answered without a grpc-status"))?;
    if status.as_bytes() == b"0" {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    bail!(
        "{path} failed: grpc-status {} {message}",
        String::from_utf8_lossy(status.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use replog_proto::client::AppendResponse;

    #[test]
    fn a_framed_message_decodes_back() {
        let m = AppendResponse {
            position: 42,
            ..Default::default()
        };
        let bytes = frame(&m);
        assert_eq!(bytes[0], 0);
        let back: AppendResponse = unframe(&bytes, "/x").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_bad_frame_is_an_error_not_a_panic() {
        let m = AppendResponse {
            position: 42,
            ..Default::default()
        };
        let good = frame(&m).to_vec();
        let short = &good[..3];
        assert!(unframe::<AppendResponse>(short, "/x").is_err());
        let mut compressed = good.clone();
        compressed[0] = 1;
        assert!(unframe::<AppendResponse>(&compressed, "/x").is_err());
        let truncated = &good[..good.len() - 1];
        let e = unframe::<AppendResponse>(truncated, "/x").unwrap_err();
        assert!(e.to_string().contains("in a frame of"), "{e}");
    }

    #[test]
    fn a_failed_status_names_it() {
        let mut h = HeaderMap::new();
        assert!(check_status(&h, "/x").is_err(), "no status at all");
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(check_status(&h, "/x").is_ok());
        h.insert("grpc-status", "14".parse().unwrap());
        h.insert("grpc-message", "not leader".parse().unwrap());
        let e = check_status(&h, "/x").unwrap_err().to_string();
        assert!(e.contains("14") && e.contains("not leader"), "{e}");
    }
}
