//! The failure detector of the leader, and the failure tolerance.
//!
//! A replica is judged from what the leader observes of it: the time since
//! its last message (a replica silent for `ping_timeout x
//! max_ping_timeouts` is unreachable) and, for a voter, how far it is
//! behind the commit (more than `max_lag_entries` for `lag_period` is
//! lagging). Signals (`POST /repair`, the self-monitors) are judged by the
//! coordinator, not here.
//!
//! Invariants:
//! - After a leader change no replica is judged before `reregister_timeout`
//!   has passed (TiKV PD#2135: a new leader that forgot heartbeat times
//!   repaired at once); until then every other replica is [`Health::Grace`].
//! - Silence is counted from the later of the last message and the start
//!   of the leadership: a replica always gets a full `ping_timeout x
//!   max_ping_timeouts` to reach a new leader, whatever the old one saw.
//! - The leader itself is always healthy in its own judgment.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The detector's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    pub ping_timeout: Duration,
    pub max_ping_timeouts: u32,
    pub reregister_timeout: Duration,
    /// A voter this many positions behind the commit, for `lag_period`, is
    /// lagging (0: lag is never judged).
    pub max_lag_entries: u64,
    pub lag_period: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            ping_timeout: Duration::from_secs(15),
            max_ping_timeouts: 5,
            reregister_timeout: Duration::from_secs(600),
            max_lag_entries: 100_000,
            lag_period: Duration::from_secs(60),
        }
    }
}

impl DetectorConfig {
    /// Silence after which a replica is unreachable.
    pub fn unreachable_after(&self) -> Duration {
        self.ping_timeout
            .saturating_mul(self.max_ping_timeouts.max(1))
    }
}

/// What the leader observes of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub id: u64,
    pub voter: bool,
    /// Time since its last message (`None`: never heard).
    pub silence: Option<Duration>,
    /// Positions behind the commit.
    pub lag_entries: u64,
}

/// Why a replica is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    Unreachable { silent_ms: u64 },
    Lagging { lag_entries: u64, for_ms: u64 },
}

impl Reason {
    /// The signal name the coordinator records for it.
    pub fn signal(&self) -> &'static str {
        match self {
            Reason::Unreachable { .. } => "unreachable",
            Reason::Lagging { .. } => "replication_lag",
        }
    }
}

/// The detector's judgment of one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "health", rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy {
        reasons: Vec<Reason>,
    },
    /// Not judged yet: the re-register grace after a leader change.
    Grace,
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
    pub fn is_unhealthy(&self) -> bool {
        matches!(self, Health::Unhealthy { .. })
    }
}

/// The leader's failure detector. Holds only what it needs between
/// judgments: when this leadership started and since when each voter lags.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: DetectorConfig,
    leader_since_ms: Option<u64>,
    lagging_since_ms: BTreeMap<u64, u64>,
}

impl Detector {
    pub fn new(cfg: DetectorConfig) -> Self {
        Detector {
            cfg,
            leader_since_ms: None,
            lagging_since_ms: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// This replica became the leader at `now_ms`: the grace starts and
    /// what an earlier leadership saw is forgotten.
    pub fn on_leadership(&mut self, now_ms: u64) {
        self.leader_since_ms = Some(now_ms);
        self.lagging_since_ms.clear();
    }

    /// This replica is no longer the leader.
    pub fn on_leadership_lost(&mut self) {
        self.leader_since_ms = None;
        self.lagging_since_ms.clear();
    }

    /// True while the re-register grace lasts (or when not leading).
    pub fn in_grace(&self, now_ms: u64) -> bool {
        match self.leader_since_ms {
            None => true,
            Some(since) => {
                now_ms.saturating_sub(since) < self.cfg.reregister_timeout.as_millis() as u64
            }
        }
    }

    /// Judges every observed member; `me` is the leader.
    pub fn judge(
        &mut self,
        now_ms: u64,
        me: u64,
        observed: &[Observation],
    ) -> BTreeMap<u64, Health> {
        self.lagging_since_ms
            .retain(|id, _| observed.iter().any(|o| o.id == *id));
        let grace = self.in_grace(now_ms);
        let led_ms = self
            .leader_since_ms
            .map_or(0, |since| now_ms.saturating_sub(since));
        let mut out = BTreeMap::new();
        for o in observed {
            let health = if o.id == me {
                Health::Healthy
            } else {
                let reasons = self.reasons(now_ms, led_ms, o);
                if grace {
                    Health::Grace
                } else if reasons.is_empty() {
                    Health::Healthy
                } else {
                    Health::Unhealthy { reasons }
                }
            };
            out.insert(o.id, health);
        }
        out
    }

    /// Why `o` is unhealthy (empty: it is not); tracks lag periods even
    /// during the grace, so that a lag is judged by its whole length.
    fn reasons(&mut self, now_ms: u64, led_ms: u64, o: &Observation) -> Vec<Reason> {
        let mut reasons = Vec::new();
        let heard_ms = o.silence.map_or(u64::MAX, |s| s.as_millis() as u64);
        let silent_ms = heard_ms.min(led_ms);
        if silent_ms >= self.cfg.unreachable_after().as_millis() as u64 {
            reasons.push(Reason::Unreachable { silent_ms });
        }
        let lags =
            self.cfg.max_lag_entries > 0 && o.voter && o.lag_entries > self.cfg.max_lag_entries;
        if !lags {
            self.lagging_since_ms.remove(&o.id);
            return reasons;
        }
        let since = *self.lagging_since_ms.entry(o.id).or_insert(now_ms);
        let for_ms = now_ms.saturating_sub(since);
        if for_ms >= self.cfg.lag_period.as_millis() as u64 {
            reasons.push(Reason::Lagging {
                lag_entries: o.lag_entries,
                for_ms,
            });
        }
        reasons
    }
}

/// The quorum of `voters` voters: a majority.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// How many more voters the cluster can lose and keep a quorum, given how
/// many of its `voters` are available now (`None`: it has no quorum now).
pub fn failure_tolerance(voters: usize, available: usize) -> Option<usize> {
    debug_assert!(available <= voters, "{available} available of {voters}");
    available.checked_sub(quorum(voters))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;

    fn cfg() -> DetectorConfig {
        DetectorConfig {
            ping_timeout: Duration::from_secs(1),
            max_ping_timeouts: 3,
            reregister_timeout: Duration::from_secs(10),
            max_lag_entries: 100,
            lag_period: Duration::from_secs(5),
        }
    }

    fn obs(id: u64, silence_s: Option<u64>, lag: u64) -> Observation {
        Observation {
            id,
            voter: true,
            silence: silence_s.map(Duration::from_secs),
            lag_entries: lag,
        }
    }

    #[test]
    fn the_detector_as_a_table() {
        // (ms led when judged, silence s, lag, expected signal or "healthy"/"grace")
        let rows: &[(u64, Option<u64>, u64, &str)] = &[
            (5 * S, Some(100), 0, "grace"),
            (10 * S, Some(2), 0, "healthy"),
            (10 * S, Some(3), 0, "unreachable"),
            (10 * S, None, 0, "unreachable"),
            (2 * S, None, 0, "grace"),
            (20 * S, Some(1), 101, "healthy"), // lagging, but not for lag_period yet
            (20 * S, Some(1), 100, "healthy"),
        ];
        for (led_ms, silence, lag, expect) in rows {
            let mut d = Detector::new(cfg());
            d.on_leadership(0);
            let h = d.judge(*led_ms, 1, &[obs(1, Some(0), 0), obs(2, *silence, *lag)]);
            assert_eq!(h[&1], Health::Healthy);
            let got = match &h[&2] {
                Health::Healthy => "healthy",
                Health::Grace => "grace",
                Health::Unhealthy { reasons } => reasons[0].signal(),
            };
            assert_eq!(
                got, *expect,
                "led {led_ms} ms, silence {silence:?}, lag {lag}"
            );
        }
    }

    #[test]
    fn a_new_leader_counts_silence_from_its_own_start() {
        let mut d = Detector::new(cfg());
        d.on_leadership(1_000 * S);
        // Silent for an hour as the old leader saw it; the new leader has
        // led for 10 s (the grace) and 3 s is the limit: judged.
        let h = d.judge(1_010 * S, 1, &[obs(2, Some(3_600), 0)]);
        assert_eq!(
            h[&2],
            Health::Unhealthy {
                reasons: vec![Reason::Unreachable { silent_ms: 10 * S }]
            }
        );
        // With a longer limit than the leadership so far, not judged.
        let mut c = cfg();
        c.max_ping_timeouts = 20;
        let mut d = Detector::new(c);
        d.on_leadership(1_000 * S);
        assert_eq!(
            d.judge(1_010 * S, 1, &[obs(2, Some(3_600), 0)])[&2],
            Health::Healthy
        );
    }

    #[test]
    fn lag_is_judged_after_its_period_and_forgotten_when_it_ends() {
        let mut d = Detector::new(cfg());
        d.on_leadership(0);
        assert!(d.judge(10 * S, 1, &[obs(2, Some(0), 500)])[&2].is_healthy());
        assert!(d.judge(14 * S, 1, &[obs(2, Some(0), 500)])[&2].is_healthy());
        assert_eq!(
            d.judge(15 * S, 1, &[obs(2, Some(0), 500)])[&2],
            Health::Unhealthy {
                reasons: vec![Reason::Lagging {
                    lag_entries: 500,
                    for_ms: 5 * S
                }]
            }
        );
        assert!(d.judge(16 * S, 1, &[obs(2, Some(0), 10)])[&2].is_healthy());
        assert!(d.judge(17 * S, 1, &[obs(2, Some(0), 500)])[&2].is_healthy());
        // A learner's lag (a catching-up spare or rejoining replica) is not judged.
        let mut learner = obs(3, Some(0), 10_000);
        learner.voter = false;
        assert!(d.judge(30 * S, 1, &[learner])[&3].is_healthy());
        assert!(d.judge(40 * S, 1, &[learner])[&3].is_healthy());
    }

    #[test]
    fn leadership_lost_ends_judging() {
        let mut d = Detector::new(cfg());
        d.on_leadership(0);
        d.on_leadership_lost();
        assert!(d.in_grace(1_000 * S));
        assert_eq!(d.judge(1_000 * S, 1, &[obs(2, None, 0)])[&2], Health::Grace);
    }

    #[test]
    fn failure_tolerance_as_a_table() {
        // (voters, available, tolerance)
        let rows = [
            (1, 1, Some(0)),
            (1, 0, None),
            (2, 2, Some(0)),
            (3, 3, Some(1)),
            (3, 2, Some(0)),
            (3, 1, None),
            (4, 4, Some(1)),
            (5, 5, Some(2)),
            (5, 3, Some(0)),
            (5, 2, None),
        ];
        for (voters, available, tolerance) in rows {
            assert_eq!(
                failure_tolerance(voters, available),
                tolerance,
                "{available}/{voters}"
            );
        }
    }
}
