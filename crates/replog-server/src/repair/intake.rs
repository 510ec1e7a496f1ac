//! The admin API's requests, checked before anything is recorded: the
//! bearer token, the JSON body and its bounds, the replica it names. Pure:
//! every refusal is an [`AdminError`] with its HTTP status and reason.
//!
//! `POST /repair` (op `report`) takes
//! `{"replica": 3, "signal": "fsync_latency", "details": "...",
//!   "outside_ms": 60000, "expires_in_ms": 300000}`:
//! `replica` and `signal` are required; `expires_in_ms` defaults to the
//! coordinator's `--signal-ttl`.

use std::time::Duration;

use replog_repair::record::{self, Signal, MAX_DETAILS_BYTES};
use serde::Deserialize;

/// Largest request body taken.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Longest expiry a signal may ask for.
pub const MAX_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// A refused request: its HTTP status and why. Nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct AdminError {
    pub status: u16,
    pub reason: String,
}

impl AdminError {
    pub fn bad_request(reason: impl Into<String>) -> Self {
        AdminError {
            status: 400,
            reason: reason.into(),
        }
    }
    pub fn unauthorized() -> Self {
        AdminError {
            status: 401,
            reason: "a valid bearer token (--admin-token-file) is required".into(),
        }
    }
    pub fn not_found(reason: impl Into<String>) -> Self {
        AdminError {
            status: 404,
            reason: reason.into(),
        }
    }
    pub fn conflict(reason: impl Into<String>) -> Self {
        AdminError {
            status: 409,
            reason: reason.into(),
        }
    }
    pub fn unavailable(reason: impl Into<String>) -> Self {
        AdminError {
            status: 503,
            reason: reason.into(),
        }
    }
}

/// Checks the bearer token: with a configured token, the request's must
/// equal it (compared in constant time for equal lengths).
pub fn check_token(configured: Option<&str>, given: &str) -> Result<(), AdminError> {
    let Some(expected) = configured else {
        return Ok(());
    };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same && !a.is_empty() {
        Ok(())
    } else {
        Err(AdminError::unauthorized())
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> &str {
    header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    replica: u64,
    signal: String,
    #[serde(default)]
    details: String,
    #[serde(default)]
    outside_ms: u64,
    #[serde(default)]
    expires_in_ms: Option<u64>,
    #[serde(default)]
    source: Option<String>,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AdminError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(AdminError::bad_request(format!(
            "body of {} bytes exceeds {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    serde_json::from_slice(body).map_err(|e| AdminError::bad_request(format!("body: {e}")))
}

/// A signal report as the record it becomes; `members` are the replica
/// ids of the cluster now.
pub fn report(
    body: &[u8],
    members: &[u64],
    now_ms: u64,
    default_ttl: Duration,
) -> Result<Signal, AdminError> {
    let b: ReportBody = parse(body)?;
    record::check_name("signal", &b.signal).map_err(AdminError::bad_request)?;
    if b.details.len() > MAX_DETAILS_BYTES {
        return Err(AdminError::bad_request(format!(
            "details of {} bytes exceed {MAX_DETAILS_BYTES}",
            b.details.len()
        )));
    }
    let ttl_ms = b.expires_in_ms.unwrap_or(default_ttl.as_millis() as u64);
    if ttl_ms == 0 || ttl_ms > MAX_EXPIRY.as_millis() as u64 {
        return Err(AdminError::bad_request(format!(
            "expires_in_ms must be between 1 and {}",
            MAX_EXPIRY.as_millis()
        )));
    }
    let source = b.source.unwrap_or_else(|| "http".into());
    record::check_name("source", &source).map_err(AdminError::bad_request)?;
    if !members.contains(&b.replica) {
        return Err(AdminError::not_found(format!(
            "replica {} is not a member of the cluster (members: {members:?})",
            b.replica
        )));
    }
    Ok(Signal {
        replica: b.replica,
        signal: b.signal,
        details: b.details,
        outside_ms: b.outside_ms,
        source,
        reported_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_ms),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaBody {
    replica: u64,
}

/// `cancel`: the replica whose case ends; it must have one.
pub fn cancel(body: &[u8], open_cases: &[u64]) -> Result<u64, AdminError> {
    let b: ReplicaBody = parse(body)?;
    if !open_cases.contains(&b.replica) {
        return Err(AdminError::not_found(format!(
            "replica {} has no open repair case",
            b.replica
        )));
    }
    Ok(b.replica)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

/// `pause`: an optional reason. An empty body is `{}`.
pub fn pause(body: &[u8]) -> Result<String, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let b: ReasonBody = parse(body)?;
    if b.reason.len() > MAX_DETAILS_BYTES {
        return Err(AdminError::bad_request("reason too long"));
    }
    Ok(b.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    #[test]
    fn reports_become_signals() {
        let s = report(
            br#"{"replica": 3, "signal": "fsync_latency", "details": "p99 900ms", "outside_ms": 60000}"#,
            &[1, 2, 3],
            1_000,
            TTL,
        )
        .unwrap();
        assert_eq!(s.replica, 3);
        assert_eq!(s.source, "http");
        assert_eq!(s.expires_at_ms, 1_000 + 300_000);
        let s = report(
            br#"{"replica": 1, "signal": "disk_free", "expires_in_ms": 5}"#,
            &[1],
            0,
            TTL,
        )
        .unwrap();
        assert_eq!(s.expires_at_ms, 5);
    }

    #[test]
    fn bad_reports_are_refused_with_their_status() {
        let big = format!(
            r#"{{"replica": 1, "signal": "x", "details": "{}"}}"#,
            "d".repeat(MAX_BODY_BYTES)
        );
        let rows: &[(&[u8], u16)] = &[
            (b"", 400),
            (b"not json", 400),
            (b"[]", 400),
            (br#"{"signal": "x"}"#, 400),
            (br#"{"replica": 1}"#, 400),
            (br#"{"replica": -1, "signal": "x"}"#, 400),
            (br#"{"replica": 1, "signal": ""}"#, 400),
            (br#"{"replica": 1, "signal": "rm -rf"}"#, 400),
            (br#"{"replica": 1, "signal": "x", "expires_in_ms": 0}"#, 400),
            (
                br#"{"replica": 1, "signal": "x", "expires_in_ms": 999999999999}"#,
                400,
            ),
            (br#"{"replica": 1, "signal": "x", "colour": "red"}"#, 400),
            (br#"{"replica": 1, "signal": "x", "source": "a b"}"#, 400),
            (big.as_bytes(), 400),
            (br#"{"replica": 9, "signal": "x"}"#, 404),
        ];
        for (body, status) in rows {
            let e = report(body, &[1, 2, 3], 0, TTL).unwrap_err();
            assert_eq!(e.status, *status, "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn tokens_as_a_table() {
        let rows = [
            (None, "", true),
            (None, "anything", true),
            (Some("s3cret"), "s3cret", true),
            (Some("s3cret"), "", false),
            (Some("s3cret"), "s3cre", false),
            (Some("s3cret"), "s3cret!", false),
            (Some(""), "", false),
        ];
        for (configured, given, ok) in rows {
            assert_eq!(
                check_token(configured, given).is_ok(),
                ok,
                "{configured:?} {given:?}"
            );
        }
        assert_eq!(bearer(Some("Bearer abc")), "abc");
        assert_eq!(bearer(Some("Basic abc")), "");
        assert_eq!(bearer(None), "");
    }

    #[test]
    fn cancel_and_pause_bodies() {
        assert_eq!(cancel(br#"{"replica": 2}"#, &[2]), Ok(2));
        assert_eq!(cancel(br#"{"replica": 3}"#, &[2]).unwrap_err().status, 404);
        assert_eq!(cancel(b"{}", &[2]).unwrap_err().status, 400);
        assert_eq!(pause(b""), Ok(String::new()));
        assert_eq!(pause(br#"{"reason": "window"}"#), Ok("window".into()));
        assert_eq!(pause(b"{").unwrap_err().status, 400);
    }
}
