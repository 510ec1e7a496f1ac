//! The replica's self-monitor task (`--monitor-config`): every interval it
//! collects this replica's statistics, asks `replog_repair::Monitor` which
//! envelopes are violated for long enough, and reports each as a signal
//! about this replica (source `monitor`) through the admin API, which
//! forwards it to the leader. Each report expires after three intervals,
//! so a condition that clears, or a replica that stops reporting, leaves
//! no signal behind.
//!
//! Statistics: `fsync_latency_ms` (the longest fsync of the interval),
//! `disk_free_bytes` (of the data directory's filesystem, for
//! unprivileged users), `apply_lag_entries` (positions held but not
//! applied), `checksum_errors` (damaged records reads found since open),
//! `storage_errors` (those and the RocksDB operations that failed since
//! open),
//! `leader_silence_ms` (time since the leader was last heard from; 0 on
//! the leader; not collected while no leader is known).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use replog_repair::monitor::{Monitor, MonitorConfig};
use tracing::{info, warn};

use super::{now_ms, Repairs};

/// Collects and reports until `stopping` turns true.
pub(super) async fn run(
    r: Arc<Repairs>,
    config: MonitorConfig,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut monitor = Monitor::new(config);
    let ttl_ms = monitor.report_ttl().as_millis() as u64;
    let mut tick = tokio::time::interval(monitor.config().interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = r.me;
    info!(
        interval_ms = monitor.config().interval.as_millis() as u64,
        envelopes = monitor.config().envelopes.len(),
        "self-monitor started"
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.changed() => {}
        }
        if *stopping.borrow() {
            return;
        }
        let stats = collect(&r).await;
        for v in monitor.observe(now_ms(), &stats) {
            let body = serde_json::json!({
                "replica": me,
                "signal": v.stat,
                "details": v.details,
                "outside_ms": v.outside_ms,
                "expires_in_ms": ttl_ms,
                "source": "monitor",
            });
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let token = r.opts.admin_token.clone().unwrap_or_default();
            let (status, answer) = r.handle("report", &body, &token, false).await;
            if status != 200 {
                warn!(status, answer = %String::from_utf8_lossy(&answer), stat = %v.stat,
                      "the self-monitor's report was not recorded");
            }
        }
    }
}

/// This replica's statistics now.
async fn collect(r: &Repairs) -> BTreeMap<&'static str, f64> {
    let mut stats = BTreeMap::new();
    let health = r.log.storage_health();
    stats.insert("fsync_latency_ms", health.max_fsync.as_secs_f64() * 1_000.0);
    stats.insert("checksum_errors", health.checksum_errors as f64);
    let storage_errors = health.checksum_errors.saturating_add(health.io_errors);
    stats.insert("storage_errors", storage_errors as f64);
    let p = r.log.progress();
    stats.insert(
        "apply_lag_entries",
        p.last_index.saturating_sub(p.applied) as f64,
    );
    if let Some(free) = disk_free_bytes(r.log.path()) {
        stats.insert("disk_free_bytes", free as f64);
    }
    if p.is_leader {
        stats.insert("leader_silence_ms", 0.0);
    } else if let (Some(leader), Ok(status)) = (p.leader, r.log.cluster_status().await) {
        let heard = status
            .members
            .iter()
            .find(|m| m.id == leader)
            .and_then(|m| m.last_heard);
        if let Some(heard) = heard {
            stats.insert("leader_silence_ms", heard.as_secs_f64() * 1_000.0);
        }
    }
    stats
}

/// Bytes free for unprivileged users on the filesystem holding `dir`.
fn disk_free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a valid out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_free_is_read_for_a_directory_and_not_for_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::disk_free_bytes(dir.path()).is_some_and(|b| b > 0));
        assert_eq!(
            super::disk_free_bytes(std::path::Path::new("/nonexistent/replog")),
            None
        );
    }
}
