//! The repair coordinator's configuration: the seed's flags, parsed, and
//! the rules a configuration must follow, checked at start-up.
//!
//! - `--repair-set id=command,...`: the commands, one per unique id.
//! - `--repair-order id:scope[:timeout],...`: the escalation order; scope
//!   `leader` runs the command on the leader's host, `replica` on the sick
//!   replica's; an id missing from the set, or another scope, is an error.
//! - `--num-allowed-repairs N`: repairs in progress at once. With `V`
//!   voters the quorum is `V/2+1`, and `N` repairs of healthy voters would
//!   leave `V-N`; so, outside `listen` mode (which repairs nothing),
//!   `N > V - (V/2+1)` is refused, with that arithmetic.
//! - `--removal-limit F` (a fraction of the voters at start-up): past
//!   `floor(F*V)` isolations since the last reset the coordinator stops and
//!   raises the alarm. A fraction that rounds to no isolation at all (40%
//!   of 2 voters) is refused rather than silently blocking every isolation.
//! - `--removal-rate-limit COUNT/PERIOD` (`1/10mins`): isolations per
//!   sliding window.
//! - `--repair-mode MODE[,id=MODE...]`: `listen`, `react` or `execute`,
//!   globally and per repair id; a step runs in the lesser of the two.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a repair command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// On the leader's host (for a replica that cannot act itself).
    Leader,
    /// On the sick replica's host.
    Replica,
}

/// The rollout stage (seed 002): what the coordinator does with a decision.
/// Ordered: `Listen < React < Execute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Records signals, decides nothing.
    Listen,
    /// Records the decision it would take, runs nothing.
    React,
    /// Records the decision, then acts on it.
    Execute,
}

/// One step of the escalation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairStep {
    pub id: String,
    /// Run by `sh -c`.
    pub command: String,
    pub scope: Scope,
    /// How long the step has to make the replica healthy.
    pub timeout: Duration,
    /// The step's own mode (the global mode caps it).
    pub mode: Mode,
}

/// `COUNT/PERIOD`: at most `count` isolations in any window of `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

/// A replica kept ready to replace an isolated one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spare {
    pub id: u64,
    pub address: String,
}

/// The whole configuration of the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairConfig {
    pub order: Vec<RepairStep>,
    pub num_allowed_repairs: u32,
    pub removal_rate_limit: Option<RateLimit>,
    /// Fraction of the voters at start-up (0..=1).
    pub removal_limit: f64,
    pub spares: Vec<Spare>,
    /// A replica healthy this long closes its case (or is re-admitted).
    pub healthy_period: Duration,
    pub mode: Mode,
    /// How long a signal counts when its report gives no expiry; the
    /// detector's own signals are renewed while they last.
    pub signal_ttl: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            order: Vec::new(),
            num_allowed_repairs: 1,
            removal_rate_limit: None,
            removal_limit: 1.0,
            spares: Vec::new(),
            healthy_period: Duration::from_secs(600),
            mode: Mode::Listen,
            signal_ttl: Duration::from_secs(300),
        }
    }
}

/// What the configuration allows, in numbers, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub voters: usize,
    pub quorum: usize,
    /// Isolations allowed before the alarm.
    pub removals_allowed: u32,
}

/// A configuration that is refused, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: {reason}")]
    Syntax { flag: &'static str, reason: String },
    #[error("--repair-order names repair `{0}`, which --repair-set does not define")]
    UnknownRepair(String),
    #[error("--repair-order: scope `{scope}` of repair `{id}` is neither `leader` nor `replica`")]
    UnknownScope { id: String, scope: String },
    #[error("--repair-set defines repair `{0}` twice")]
    DuplicateRepair(String),
    #[error("--repair-mode names repair `{0}`, which --repair-order does not use")]
    UnknownModeRepair(String),
    #[error(
        "--num-allowed-repairs {allowed} could leave {left} healthy voters of {voters}, below \
         the quorum of {quorum} ({voters}/2+1); at most {max} = {voters} - {quorum} repairs at \
         once keep a quorum"
    )]
    LosesQuorum {
        allowed: u32,
        voters: usize,
        left: usize,
        quorum: usize,
        max: usize,
    },
    #[error(
        "--removal-limit {fraction} of {voters} voters allows floor({fraction} x {voters}) = 0 \
         isolations: every isolation would raise the alarm; give at least {needed} (1/{voters}), \
         or 0 to never isolate"
    )]
    RemovalLimitRoundsToZero {
        fraction: f64,
        voters: usize,
        needed: f64,
    },
    #[error("spare {0} is also a member of the cluster")]
    SpareIsMember(u64),
}

fn syntax(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Syntax {
        flag,
        reason: reason.into(),
    }
}

/// Parses `id=command,...`. Commands may not contain commas (the seed's
/// syntax); put a longer command in a script.
pub fn parse_repair_set(s: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, command) = item
            .split_once('=')
            .ok_or_else(|| syntax("--repair-set", format!("`{item}` is not id=command")))?;
        let (id, command) = (id.trim(), command.trim());
        check_id("--repair-set", id)?;
        if command.is_empty() {
            return Err(syntax(
                "--repair-set",
                format!("repair `{id}` has no command"),
            ));
        }
        if out.iter().any(|(i, _)| i == id) {
            return Err(ConfigError::DuplicateRepair(id.to_string()));
        }
        out.push((id.to_string(), command.to_string()));
    }
    Ok(out)
}

/// One entry of `--repair-order`, before it is joined with the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderEntry {
    pub id: String,
    pub scope: Scope,
    pub timeout: Option<Duration>,
}

/// Parses `id:scope[:timeout],...`.
pub fn parse_repair_order(s: &str) -> Result<Vec<OrderEntry>, ConfigError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let mut parts = item.split(':');
        let id = parts.next().unwrap_or_default().trim();
        check_id("--repair-order", id)?;
        let scope = match parts.next().map(str::trim) {
            Some("leader") => Scope::Leader,
            Some("replica") => Scope::Replica,
            Some(other) => {
                return Err(ConfigError::UnknownScope {
                    id: id.to_string(),
                    scope: other.to_string(),
                })
            }
            None => return Err(syntax("--repair-order", format!("`{item}` has no scope"))),
        };
        let timeout = parts
            .next()
            .map(|t| parse_duration(t.trim()).map_err(|e| syntax("--repair-order", e)))
            .transpose()?;
        if parts.next().is_some() {
            return Err(syntax(
                "--repair-order",
                format!("`{item}` is not id:scope[:timeout]"),
            ));
        }
        out.push(OrderEntry {
            id: id.to_string(),
            scope,
            timeout,
        });
    }
    Ok(out)
}

fn check_id(flag: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(syntax(
            flag,
            format!("`{id}` is not a repair id (1-64 of a-z, 0-9, - and _)"),
        ))
    }
}

/// Parses a mode name.
pub fn parse_mode(s: &str) -> Result<Mode, ConfigError> {
    match s.trim() {
        "listen" => Ok(Mode::Listen),
        "react" => Ok(Mode::React),
        "execute" => Ok(Mode::Execute),
        other => Err(syntax(
            "--repair-mode",
            format!("`{other}` is not listen, react or execute"),
        )),
    }
}

/// Parses `MODE[,id=MODE...]`: the global mode and per-repair modes.
pub fn parse_repair_modes(s: &str) -> Result<(Mode, Vec<(String, Mode)>), ConfigError> {
    let mut global = None;
    let mut per_repair = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((id, mode)) => {
                check_id("--repair-mode", id.trim())?;
                per_repair.push((id.trim().to_string(), parse_mode(mode)?));
            }
            None if global.is_none() => global = Some(parse_mode(item)?),
            None => return Err(syntax("--repair-mode", "more than one global mode")),
        }
    }
    Ok((global.unwrap_or(Mode::Listen), per_repair))
}

/// Parses `COUNT/PERIOD`, e.g. `1/10mins`, `2/3hrs`.
pub fn parse_rate_limit(s: &str) -> Result<RateLimit, ConfigError> {
    let flag = "--removal-rate-limit";
    let (count, period) = s
        .split_once('/')
        .ok_or_else(|| syntax(flag, format!("`{s}` is not COUNT/PERIOD (e.g. 1/10mins)")))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| syntax(flag, format!("`{count}` is not a count")))?;
    if count == 0 {
        return Err(syntax(
            flag,
            "a count of 0 would never isolate; leave the flag out instead",
        ));
    }
    let period = parse_duration(period.trim()).map_err(|e| syntax(flag, e))?;
    if period.is_zero() {
        return Err(syntax(flag, "the period must be longer than 0"));
    }
    Ok(RateLimit { count, period })
}

/// Parses a duration: a number and a unit (`ms`, `s`/`secs`, `m`/`mins`,
/// `h`/`hrs`, `d`/`days`); a bare `10mins` period of a rate limit too.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 250ms, 30s, 10mins, 3hrs)"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" | "sec" | "secs" => 1_000,
        "m" | "min" | "mins" => 60_000,
        "h" | "hr" | "hrs" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (ms, s, mins, hrs, days)"
            ))
        }
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// Parses `id=host:port,...` of `--spares`.
pub fn parse_spares(s: &str) -> Result<Vec<Spare>, ConfigError> {
    let mut out: Vec<Spare> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, address) = item
            .split_once('=')
            .ok_or_else(|| syntax("--spares", format!("`{item}` is not id=host:port")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| syntax("--spares", format!("`{id}` is not a replica id")))?;
        if !address.contains(':') {
            return Err(syntax("--spares", format!("`{address}` is not host:port")));
        }
        if out.iter().any(|s| s.id == id) {
            return Err(syntax("--spares", format!("spare {id} is named twice")));
        }
        out.push(Spare {
            id,
            address: address.trim().to_string(),
        });
    }
    Ok(out)
}

/// Joins the set and the order into steps, with the modes.
pub fn build_order(
    set: &[(String, String)],
    order: &[OrderEntry],
    per_repair_modes: &[(String, Mode)],
    default_timeout: Duration,
) -> Result<Vec<RepairStep>, ConfigError> {
    for (id, _) in per_repair_modes {
        if !order.iter().any(|o| &o.id == id) {
            return Err(ConfigError::UnknownModeRepair(id.clone()));
        }
    }
    order
        .iter()
        .map(|o| {
            let command = set
                .iter()
                .find(|(id, _)| id == &o.id)
                .map(|(_, c)| c.clone())
                .ok_or_else(|| ConfigError::UnknownRepair(o.id.clone()))?;
            let mode = per_repair_modes
                .iter()
                .find(|(id, _)| id == &o.id)
                .map(|(_, m)| *m)
                .unwrap_or(Mode::Execute);
            Ok(RepairStep {
                id: o.id.clone(),
                command,
                scope: o.scope,
                timeout: o.timeout.unwrap_or(default_timeout),
                mode,
            })
        })
        .collect()
}

impl RepairConfig {
    /// The mode a step runs in: its own, capped by the global one.
    pub fn step_mode(&self, step: &RepairStep) -> Mode {
        step.mode.min(self.mode)
    }

    /// Checks the configuration against the membership at start-up
    /// (`voters`, `members` including learners) and returns what it allows.
    pub fn check(&self, voters: usize, members: &[u64]) -> Result<Limits, ConfigError> {
        let quorum = crate::health::quorum(voters);
        let max = voters.saturating_sub(quorum);
        let allowed = self.num_allowed_repairs;
        // In `listen` mode nothing is ever repaired or isolated (a step's
        // mode is capped by the global one), so no limit can cost the
        // quorum: a replica server of one voter with the defaults starts.
        if self.mode != Mode::Listen && allowed as usize > max {
            return Err(ConfigError::LosesQuorum {
                allowed,
                voters,
                left: voters.saturating_sub(allowed as usize),
                quorum,
                max,
            });
        }
        if !(0.0..=1.0).contains(&self.removal_limit) || self.removal_limit.is_nan() {
            return Err(syntax(
                "--removal-limit",
                "must be a fraction between 0 and 1",
            ));
        }
        let removals_allowed = (self.removal_limit * voters as f64 + 1e-9).floor() as u32;
        if self.removal_limit > 0.0 && removals_allowed == 0 {
            return Err(ConfigError::RemovalLimitRoundsToZero {
                fraction: self.removal_limit,
                voters,
                needed: 1.0 / voters.max(1) as f64,
            });
        }
        if let Some(s) = self.spares.iter().find(|s| members.contains(&s.id)) {
            return Err(ConfigError::SpareIsMember(s.id));
        }
        Ok(Limits {
            voters,
            quorum,
            removals_allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allowed: u32, removal_limit: f64) -> RepairConfig {
        RepairConfig {
            num_allowed_repairs: allowed,
            removal_limit,
            mode: Mode::Execute,
            ..Default::default()
        }
    }

    #[test]
    fn the_quorum_guard_at_start_up_as_a_table() {
        // (voters, --num-allowed-repairs, accepted)
        let rows = [
            (1, 0, true),
            (1, 1, false),
            (2, 1, false),
            (3, 1, true),
            (3, 2, false),
            (4, 1, true),
            (4, 2, false),
            (5, 2, true),
            (5, 3, false),
            (7, 3, true),
            (7, 4, false),
        ];
        for (voters, allowed, accepted) in rows {
            let r = config(allowed, 1.0).check(voters, &[]);
            assert_eq!(
                r.is_ok(),
                accepted,
                "{voters} voters, {allowed} repairs: {r:?}"
            );
        }
    }

    #[test]
    fn listen_mode_repairs_nothing_so_no_limit_is_refused() {
        // The defaults (listen, one repair) on a replica server of one voter.
        assert!(RepairConfig::default().check(1, &[1]).is_ok());
        let mut c = config(1, 1.0);
        assert!(c.check(1, &[1]).is_err(), "execute: refused");
        c.mode = Mode::React;
        assert!(
            c.check(1, &[1]).is_err(),
            "react decides as execute does: refused"
        );
    }

    #[test]
    fn a_refusal_shows_its_arithmetic() {
        let e = config(3, 1.0).check(5, &[]).unwrap_err().to_string();
        assert!(e.contains("could leave 2 healthy voters of 5"), "{e}");
        assert!(e.contains("quorum of 3 (5/2+1)"), "{e}");
        assert!(e.contains("at most 2 = 5 - 3"), "{e}");
    }

    #[test]
    fn a_removal_limit_that_rounds_to_nothing_is_refused() {
        // (voters, fraction, Some(allowed) or None for refused)
        let rows = [
            (2, 0.4, None),
            (3, 0.33, None),
            (3, 0.34, Some(1)),
            (5, 0.4, Some(2)),
            (5, 0.0, Some(0)),
            (5, 1.0, Some(5)),
            (3, 1.0, Some(3)),
        ];
        for (voters, fraction, expect) in rows {
            let r = config(0, fraction).check(voters, &[]);
            assert_eq!(
                r.as_ref().ok().map(|l| l.removals_allowed),
                expect,
                "{voters} {fraction}: {r:?}"
            );
        }
        let e = config(0, 0.4).check(2, &[]).unwrap_err().to_string();
        assert!(e.contains("floor(0.4 x 2) = 0"), "{e}");
        assert!(config(0, 1.5).check(3, &[]).is_err());
    }

    #[test]
    fn repair_sets_parse_and_bad_ones_are_refused() {
        let set =
            parse_repair_set("restart=/bin/restart.sh, reimage = /bin/reimage --all").unwrap();
        assert_eq!(set[1], ("reimage".into(), "/bin/reimage --all".into()));
        for bad in ["restart", "=x", "a b=x", "r=", "r=x,r=y"] {
            assert!(parse_repair_set(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_repair_set("r=x,r=y"),
            Err(ConfigError::DuplicateRepair("r".into()))
        );
    }

    #[test]
    fn repair_orders_parse_with_scopes_and_timeouts() {
        let o = parse_repair_order("restart:replica:30s,reimage:leader").unwrap();
        assert_eq!(o[0].scope, Scope::Replica);
        assert_eq!(o[0].timeout, Some(Duration::from_secs(30)));
        assert_eq!(o[1].scope, Scope::Leader);
        assert_eq!(o[1].timeout, None);
        assert_eq!(
            parse_repair_order("restart:master"),
            Err(ConfigError::UnknownScope {
                id: "restart".into(),
                scope: "master".into()
            })
        );
        for bad in [
            "restart",
            "restart:replica:soon",
            "restart:replica:1s:x",
            ":replica",
        ] {
            assert!(parse_repair_order(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_order_naming_an_unknown_repair_is_refused() {
        let set = parse_repair_set("restart=/bin/r").unwrap();
        let order = parse_repair_order("restart:replica,reimage:leader").unwrap();
        let d = Duration::from_secs(60);
        assert_eq!(
            build_order(&set, &order, &[], d),
            Err(ConfigError::UnknownRepair("reimage".into()))
        );
        let order = parse_repair_order("restart:replica").unwrap();
        let steps = build_order(&set, &order, &[("restart".into(), Mode::React)], d).unwrap();
        assert_eq!(steps[0].mode, Mode::React);
        assert_eq!(steps[0].timeout, d);
        assert_eq!(
            build_order(&set, &order, &[("other".into(), Mode::React)], d),
            Err(ConfigError::UnknownModeRepair("other".into()))
        );
    }

    #[test]
    fn modes_cap_each_other() {
        let (global, per) = parse_repair_modes("react,reimage=execute,restart=listen").unwrap();
        assert_eq!(global, Mode::React);
        assert_eq!(per.len(), 2);
        let mut c = RepairConfig {
            mode: global,
            ..Default::default()
        };
        let mut step = RepairStep {
            id: "reimage".into(),
            command: "x".into(),
            scope: Scope::Leader,
            timeout: Duration::from_secs(1),
            mode: Mode::Execute,
        };
        assert_eq!(c.step_mode(&step), Mode::React);
        c.mode = Mode::Execute;
        assert_eq!(c.step_mode(&step), Mode::Execute);
        step.mode = Mode::Listen;
        assert_eq!(c.step_mode(&step), Mode::Listen);
        assert!(parse_repair_modes("execute,react").is_err());
        assert!(parse_repair_modes("run").is_err());
    }

    #[test]
    fn durations_and_rate_limits_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10mins"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("3hrs"), Ok(Duration::from_secs(3 * 3600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("x1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(
            parse_rate_limit("1/10mins"),
            Ok(RateLimit {
                count: 1,
                period: Duration::from_secs(600)
            })
        );
        for bad in ["1", "0/1s", "1/0s", "x/1s", "1/soon"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spares_parse_and_may_not_be_members() {
        let s = parse_spares("6=127.0.0.1:7306,7=h:1").unwrap();
        assert_eq!(s[0].id, 6);
        assert!(parse_spares("0=h:1").is_err());
        assert!(parse_spares("6=h").is_err());
        assert!(parse_spares("6=h:1,6=h:2").is_err());
        let c = RepairConfig {
            spares: s,
            ..Default::default()
        };
        assert_eq!(
            c.check(3, &[1, 2, 3, 7]),
            Err(ConfigError::SpareIsMember(7))
        );
    }
}
