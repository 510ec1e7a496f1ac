//! The replica's self-monitor (seed 002's agent monitoring), I/O-free: a
//! config file deployed with the replica (`--monitor-config`) names the
//! statistics to collect, the safe envelope of each and how long a value
//! may stay outside it; [`Monitor::observe`] takes one collection and says
//! which envelopes are violated for long enough to report.
//!
//! The config is JSON:
//! ```json
//! { "interval": "30s",
//!   "stats": [
//!     { "stat": "fsync_latency_ms",  "max": 500,        "for": "2mins" },
//!     { "stat": "disk_free_bytes",   "min": 1073741824, "for": "5mins" },
//!     { "stat": "apply_lag_entries", "max": 10000,      "for": "1min" },
//!     { "stat": "storage_errors",    "max": 0,          "for": "0s" },
//!     { "stat": "leader_silence_ms", "max": 10000,      "for": "30s" } ] }
//! ```
//!
//! Invariants:
//! - a violation is reported only once its value stayed outside the
//!   envelope for the envelope's `for`, at every collection since;
//! - while it lasts it is reported again at every collection, each report
//!   expiring after [`Monitor::report_ttl`] (three intervals): a condition
//!   that clears stops being reported and its signal expires on its own,
//!   and one whose reports stop arriving (the replica died) expires too;
//! - a statistic missing from a collection ends its violation (nothing is
//!   reported on a value nobody measured).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse_duration;

/// The statistics a replica collects.
pub const STATS: [&str; 6] = [
    "fsync_latency_ms",
    "disk_free_bytes",
    "apply_lag_entries",
    "storage_errors",
    "checksum_errors",
    "leader_silence_ms",
];

/// Largest monitor config read.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Shortest collection interval (the seed: sub-minute intervals rarely pay;
/// tests use short ones).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// One statistic's safe envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub stat: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// How long a value must stay outside before it is reported.
    pub hold: Duration,
}

impl Envelope {
    fn outside(&self, value: f64) -> bool {
        self.min.is_some_and(|min| value < min) || self.max.is_some_and(|max| value > max)
    }
}

/// The parsed config.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    pub interval: Duration,
    pub envelopes: Vec<Envelope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interval: String,
    stats: Vec<RawEnvelope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    stat: String,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(rename = "for", default)]
    hold: Option<String>,
}

impl MonitorConfig {
    /// Parses and checks a config file's bytes; errors name the problem.
    pub fn parse(bytes: &[u8]) -> Result<MonitorConfig, String> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "{} bytes; the limit is {MAX_CONFIG_BYTES}",
                bytes.len()
            ));
        }
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let interval = parse_duration(&raw.interval)?;
        if interval < MIN_INTERVAL {
            return Err(format!(
                "interval {} is below {} ms",
                raw.interval,
                MIN_INTERVAL.as_millis()
            ));
        }
        let mut envelopes: Vec<Envelope> = Vec::new();
        for e in raw.stats {
            if !STATS.contains(&e.stat.as_str()) {
                return Err(format!(
                    "unknown stat `{}` (known: {})",
                    e.stat,
                    STATS.join(", ")
                ));
            }
            if envelopes.iter().any(|x| x.stat == e.stat) {
                return Err(format!("stat `{}` is listed twice", e.stat));
            }
            let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
            if (e.min.is_none() && e.max.is_none()) || !finite(e.min) || !finite(e.max) {
                return Err(format!("stat `{}` needs a finite min or max", e.stat));
            }
            if let (Some(min), Some(max)) = (e.min, e.max) {
                if min > max {
                    return Err(format!("stat `{}`: min {min} is above max {max}", e.stat));
                }
            }
            let hold = e
                .hold
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .unwrap_or_default();
            envelopes.push(Envelope {
                stat: e.stat,
                min: e.min,
                max: e.max,
                hold,
            });
        }
        Ok(MonitorConfig {
            interval,
            envelopes,
        })
    }
}

/// A violation to report as a signal named after its statistic.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub stat: String,
    pub value: f64,
    /// How long it has been outside its envelope.
    pub outside_ms: u64,
    pub details: String,
}

/// The monitor's memory: since when each statistic is outside.
#[derive(Debug, Clone)]
pub struct Monitor {
    config: MonitorConfig,
    outside_since_ms: BTreeMap<String, u64>,
}

impl Monitor {
    pub fn new(config: MonitorConfig) -> Self {
        Monitor {
            config,
            outside_since_ms: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// How long one report counts at the leader: three intervals.
    pub fn report_ttl(&self) -> Duration {
        self.config.interval.saturating_mul(3)
    }

    /// One collection at `now_ms`: the violations to report now.
    pub fn observe(&mut self, now_ms: u64, stats: &BTreeMap<&str, f64>) -> Vec<Violation> {
        let mut out = Vec::new();
        for e in &self.config.envelopes {
            let Some(&value) = stats.get(e.stat.as_str()) else {
                self.outside_since_ms.remove(&e.stat);
                continue;
            };
            if !e.outside(value) {
                self.outside_since_ms.remove(&e.stat);
                continue;
            }
            let since = *self
                .outside_since_ms
                .entry(e.stat.clone())
                .or_insert(now_ms);
            let outside_ms = now_ms.saturating_sub(since);
            if outside_ms >= e.hold.as_millis() as u64 {
                out.push(Violation {
                    stat: e.stat.clone(),
                    value,
                    outside_ms,
                    details: describe(e, value),
                });
            }
        }
        out
    }
}

fn describe(e: &Envelope, value: f64) -> String {
    let bound = |name: &str, v: Option<f64>| v.map(|v| format!("{name} {v}"));
    let bounds: Vec<String> = [bound("min", e.min), bound("max", e.max)]
        .into_iter()
        .flatten()
        .collect();
    format!("{} = {value} outside [{}]", e.stat, bounds.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{ "interval": "1s", "stats": [
        { "stat": "fsync_latency_ms", "max": 500, "for": "3s" },
        { "stat": "disk_free_bytes", "min": 1000 },
        { "stat": "storage_errors", "max": 0, "for": "0s" } ] }"#;

    fn stats(pairs: &[(&'static str, f64)]) -> BTreeMap<&'static str, f64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_violation_is_reported_once_held_and_while_it_lasts() {
        let mut m = Monitor::new(MonitorConfig::parse(CONFIG.as_bytes()).unwrap());
        assert_eq!(m.report_ttl(), Duration::from_secs(3));
        // (second, fsync latency, reported?)
        let rows = [
            (0, 900.0, false),
            (1, 900.0, false),
            (2, 800.0, false),
            (3, 700.0, true),
            (4, 600.0, true),
            (5, 100.0, false),
            (6, 900.0, false),
        ];
        for (s, latency, reported) in rows {
            let v = m.observe(s * 1_000, &stats(&[("fsync_latency_ms", latency)]));
            assert_eq!(!v.is_empty(), reported, "second {s}: {v:?}");
            if reported {
                assert_eq!(v[0].outside_ms, s * 1_000);
                assert!(
                    v[0].details.contains("outside [max 500]"),
                    "{}",
                    v[0].details
                );
            }
        }
    }

    #[test]
    fn envelopes_as_a_table() {
        // (stats, expected violated stats)
        type Row = (Vec<(&'static str, f64)>, Vec<&'static str>);
        let rows: Vec<Row> = vec![
            (vec![("disk_free_bytes", 999.0)], vec!["disk_free_bytes"]),
            (vec![("disk_free_bytes", 1000.0)], vec![]),
            (vec![("storage_errors", 1.0)], vec!["storage_errors"]),
            (
                vec![("storage_errors", 0.0), ("disk_free_bytes", 5.0)],
                vec!["disk_free_bytes"],
            ),
            (vec![("apply_lag_entries", 1e9)], vec![]), // not configured
            (vec![], vec![]),
        ];
        for (collected, want) in rows {
            let mut m = Monitor::new(MonitorConfig::parse(CONFIG.as_bytes()).unwrap());
            let got: Vec<String> = m
                .observe(0, &stats(&collected))
                .into_iter()
                .map(|v| v.stat)
                .collect();
            assert_eq!(got, want, "{collected:?}");
        }
    }

    #[test]
    fn a_missing_statistic_ends_its_violation() {
        let mut m = Monitor::new(MonitorConfig::parse(CONFIG.as_bytes()).unwrap());
        m.observe(0, &stats(&[("fsync_latency_ms", 900.0)]));
        m.observe(1_000, &stats(&[]));
        assert!(m
            .observe(3_000, &stats(&[("fsync_latency_ms", 900.0)]))
            .is_empty());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let rows = [
            (
                r#"{"interval": "1s", "stats": [{"stat": "cpu", "max": 1}]}"#,
                "unknown stat",
            ),
            (
                r#"{"interval": "1s", "stats": [{"stat": "storage_errors"}]}"#,
                "finite min or max",
            ),
            (
                r#"{"interval": "1s", "stats": [{"stat": "storage_errors", "min": 2, "max": 1}]}"#,
                "above max",
            ),
            (r#"{"interval": "10ms", "stats": []}"#, "below"),
            (r#"{"interval": "soon", "stats": []}"#, "not a duration"),
            (
                r#"{"interval": "1s", "stats": [{"stat": "storage_errors", "max": 0, "for": "x"}]}"#,
                "not a duration",
            ),
            (
                r#"{"interval": "1s", "stats": [{"stat": "storage_errors", "max": 0}, {"stat": "storage_errors", "max": 1}]}"#,
                "twice",
            ),
            (
                r#"{"interval": "1s", "stats": [], "colour": 1}"#,
                "unknown field",
            ),
            ("not json", "expected"),
        ];
        for (text, want) in rows {
            let e = MonitorConfig::parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(MonitorConfig::parse(&vec![b' '; MAX_CONFIG_BYTES + 1]).is_err());
    }
}
