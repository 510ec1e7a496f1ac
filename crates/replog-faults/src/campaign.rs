//! A campaign: a cluster in namespaces, the recording workload, and the
//! nemesis injecting one fault at a time from a mix (held for a while,
//! healed, a quiet spell, the next one), chosen by a seeded generator.
//! At the end every fault is healed, the cluster settles (every replica
//! VOTING with the leader's commit applied, the leader counting all of them
//! voters), each replica's log is read, and the checker runs over the
//! history. The report counts operations by kind and outcome, faults by
//! kind, the violations, and the longest gap without a completed (ok)
//! operation.
//!
//! Safety of the nemesis itself: a wipe takes only a follower, and only
//! while every replica is VOTING and a voter at the leader (wiping two
//! replicas of three at once would be a real data loss, not a bug).
//!
//! With the repair option ([`CampaignConfig::with_repair`]) the replicas
//! run the repair coordinator in `execute` mode and the faults drive it
//! (see [`crate::repair`]): faults are held longer (1-10 s, past the
//! detector's 2.5 s and the two-step escalation), the settle step waits
//! longer (every replica a voter means every demoted replica was
//! re-admitted), the coordinator's isolations reach the rejoin rule (a
//! demotion is not a rejoin), and the rules of [`crate::repair_check`] run
//! over its replicated history; their violations join the checker's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::checker::{check_all, Violation};
use crate::client::{Recorder, Workload, WorkloadConfig};
use crate::cluster::{Cluster, ClusterConfig, ClusterError, VOTING};
use crate::history::{Call, FaultRecord, History, Isolation, Op, Wipe};
use crate::nemesis::{Fault, Nemesis};
use crate::repair::{CoordinatorConfig, RepairDir, RepairWatch, Watched};
use crate::repair_check::{check_repairs, repair_report, RepairReport};

/// Kinds of fault a mix can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FaultKind {
    Kill,
    Pause,
    Partition,
    PacketLoss,
    Delay,
    Wipe,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::PacketLoss,
        FaultKind::Delay,
        FaultKind::Wipe,
    ];

    /// Parses a mix: `all`, or kinds separated by commas (`kill`, `pause`,
    /// `partition`, `packet-loss`, `delay`, `wipe`).
    pub fn parse_mix(s: &str) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => out.extend(FaultKind::ALL),
                "kill" => out.push(FaultKind::Kill),
                "pause" => out.push(FaultKind::Pause),
                "partition" => out.push(FaultKind::Partition),
                "packet-loss" => out.push(FaultKind::PacketLoss),
                "delay" => out.push(FaultKind::Delay),
                "wipe" => out.push(FaultKind::Wipe),
                other => return Err(format!("unknown fault kind '{other}'")),
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err("the mix is empty".into());
        }
        Ok(out)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CampaignConfig {
    pub duration: Duration,
    pub mix: Vec<FaultKind>,
    pub seed: u64,
    pub cluster: ClusterConfig,
    pub workload: WorkloadConfig,
    /// How long a fault is held: uniformly in this range.
    pub hold: (Duration, Duration),
    /// The quiet spell after each heal.
    pub quiet: (Duration, Duration),
    /// How long the end may take to settle before the campaign fails.
    pub settle_timeout: Duration,
    /// Run the repair coordinator under the faults (`None`: off).
    pub repair: Option<CoordinatorConfig>,
}

impl CampaignConfig {
    /// A campaign with the default workload: appends and reads, or with
    /// `--state` state-store puts and gets (raw appends are refused then).
    pub fn new(cluster: ClusterConfig, duration: Duration, mix: Vec<FaultKind>, seed: u64) -> Self {
        let workload = if cluster.state {
            WorkloadConfig {
                appenders: 0,
                linearizable_readers: 0,
                local_readers: 0,
                state_clients: 4,
                ..WorkloadConfig::default()
            }
        } else {
            WorkloadConfig::default()
        };
        CampaignConfig {
            duration,
            mix,
            seed,
            cluster,
            workload,
            hold: (Duration::from_millis(500), Duration::from_secs(4)),
            quiet: (Duration::from_millis(500), Duration::from_secs(2)),
            settle_timeout: Duration::from_secs(120),
            repair: None,
        }
    }

    /// The same campaign with the repair coordinator on (see the module
    /// docs): faults held 1-10 s, 180 s to settle.
    pub fn with_repair(mut self, repair: CoordinatorConfig) -> Self {
        self.repair = Some(repair);
        self.hold = (Duration::from_secs(1), Duration::from_secs(10));
        self.settle_timeout = Duration::from_secs(180);
        self
    }
}

/// What a campaign found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub replicas: u64,
    pub mix: Vec<FaultKind>,
    pub duration_s: f64,
    /// `kind -> outcome -> count`.
    pub operations: BTreeMap<String, BTreeMap<String, u64>>,
    pub faults: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
    /// Operations around each violation (by the ids it names).
    pub excerpts: Vec<Vec<Op>>,
    pub longest_gap_ms: u64,
    /// The same for acknowledged writes only (local reads are served
    /// without a leader, so the first gap can hide an unavailable writer).
    pub longest_write_gap_ms: u64,
    pub status_samples: usize,
    pub final_log_entries: usize,
    /// What the repair coordinator did (with the repair option).
    pub repair: Option<RepairReport>,
}

impl Report {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "campaign: seed {} replicas {} mix {:?} duration {:.0} s\n",
            self.seed, self.replicas, self.mix, self.duration_s
        );
        s += &format!(
            "{:<20} {:>8} {:>8} {:>8}\n",
            "operation", "ok", "failed", "unknown"
        );
        for (kind, by) in &self.operations {
            let n = |k: &str| by.get(k).copied().unwrap_or(0);
            s += &format!(
                "{kind:<20} {:>8} {:>8} {:>8}\n",
                n("ok"),
                n("failed"),
                n("unknown")
            );
        }
        s += &format!("{:<20} {:>8}\n", "fault", "count");
        for (kind, n) in &self.faults {
            s += &format!("{kind:<20} {n:>8}\n");
        }
        s += &format!(
            "violations: {}\nlongest gap without a completed operation: {} ms (without an acknowledged write: {} ms)\nstatus samples: {}, healed log: {} entries\n",
            self.violations.len(),
            self.longest_gap_ms,
            self.longest_write_gap_ms,
            self.status_samples,
            self.final_log_entries
        );
        if let Some(r) = &self.repair {
            s += &r.table();
        }
        for v in &self.violations {
            s += &format!("  VIOLATION {:?}: {}\n", v.rule, v.detail);
        }
        s
    }
}

/// A small seeded generator (splitmix64): campaigns replay from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn duration(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// The longest stretch in `[from_us, to_us]` with no ok operation that
/// `counts` completing.
pub fn longest_gap_us(ops: &[Op], from_us: u64, to_us: u64, counts: impl Fn(&Op) -> bool) -> u64 {
    let mut done: Vec<u64> = ops
        .iter()
        .filter(|o| matches!(o.outcome, crate::history::Outcome::Ok(_)) && counts(o))
        .map(|o| o.complete_us)
        .filter(|t| (from_us..=to_us).contains(t))
        .collect();
    done.sort_unstable();
    let mut last = from_us;
    let mut gap = 0;
    for t in done.into_iter().chain([to_us]) {
        gap = gap.max(t - last);
        last = t;
    }
    gap
}

/// Whether every replica is VOTING and a voter at the current leader.
async fn all_voting_voters(c: &Cluster) -> Option<u64> {
    let (leader, ls) = c.leader().await?;
    for id in c.ids() {
        let voter = ls.members.iter().any(|m| m.id == id && m.voter);
        let s = c.status(id).await?;
        if !voter || s.status != VOTING {
            return None;
        }
    }
    Some(leader)
}

/// Chooses the next fault of `kind`, or `None` when its precondition does
/// not hold now (see the module docs).
async fn choose(c: &Cluster, rng: &mut Rng, kind: FaultKind) -> Option<Fault> {
    let ids = c.ids();
    let any = *rng.pick(&ids);
    Some(match kind {
        FaultKind::Kill => Fault::Kill(any),
        FaultKind::Pause => Fault::Pause(any),
        FaultKind::Partition => match rng.below(4) {
            0 => Fault::Isolate(any),
            1 => {
                let mut shuffled = ids.clone();
                for i in (1..shuffled.len()).rev() {
                    shuffled.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let minority = shuffled[..(ids.len() - 1) / 2].to_vec();
                Fault::Split { minority }
            }
            2 => {
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != any).collect();
                Fault::CutLink(any, *rng.pick(&others))
            }
            _ => Fault::Bridge { middle: any },
        },
        FaultKind::PacketLoss => Fault::PacketLoss {
            replica: any,
            probability: [0.05, 0.2, 0.5][rng.below(3) as usize],
        },
        FaultKind::Delay => Fault::Delay {
            replica: any,
            delay_ms: [20, 100, 300][rng.below(3) as usize],
        },
        FaultKind::Wipe => {
            let leader = all_voting_voters(c).await?;
            let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
            Fault::Wipe(*rng.pick(&followers))
        }
    })
}

/// Waits until every replica is VOTING, a voter at the leader, with the
/// leader's commit (taken once all are voters) applied; returns that
/// commit.
pub async fn settle(c: &Cluster, timeout: Duration) -> Result<u64, ClusterError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    c.wait("every replica VOTING and a voter", left(), async || {
        all_voting_voters(c).await
    })
    .await?;
    let (_, ls) = c
        .wait("a leader", left(), async || c.leader().await)
        .await?;
    let commit = ls.commit;
    c.wait(
        &format!("every replica to apply {commit}"),
        left(),
        async || {
            for id in c.ids() {
                if c.status(id).await?.applied < commit {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;
    Ok(commit)
}

/// Logs every replica's status and the tail of its log, and what the
/// coordinator did: the cluster did not settle after healing (a liveness
/// failure to look into).
async fn report_unsettled(c: &Cluster, watch: Option<&RepairWatch>) {
    if let Some(w) = watch {
        error!(
            "the repair coordinator until then:\n{}",
            repair_report(&w.seen(), 0, 0).table()
        );
    }
    for id in c.ids() {
        let s = c.status(id).await;
        error!(
            replica = id,
            status = ?s.as_ref().map(|s| crate::cluster::status_name(s.status)),
            term = ?s.as_ref().map(|s| s.term),
            leader = ?s.as_ref().map(|s| s.leader),
            applied = ?s.as_ref().map(|s| s.applied),
            members = ?s.as_ref().map(|s| s.members.iter().map(|m| (m.id, m.voter)).collect::<Vec<_>>()),
            "replica after healing (the cluster did not settle); its log ends:\n{}",
            crate::cluster::tail(&c.log_file(id), 40)
        );
    }
}

/// Reads every replica's application entries up to `to` (local reads).
pub async fn read_logs(
    c: &Cluster,
    to: u64,
) -> Result<BTreeMap<u64, BTreeMap<u64, Vec<u8>>>, ClusterError> {
    let mut logs = BTreeMap::new();
    for id in c.ids() {
        let client = c.client_of(id, Duration::from_secs(10));
        let first = c
            .status(id)
            .await
            .map(|s| s.first_index.max(1))
            .unwrap_or(1);
        let mut log = BTreeMap::new();
        let mut from = first;
        while from <= to {
            let upto = (from + 999).min(to);
            let r = client
                .read(from, upto, false)
                .await
                .map_err(|e| ClusterError::State {
                    id,
                    what: format!("reading {from}..={upto} after healing: {e}"),
                })?;
            for e in r.entries {
                log.insert(e.position, e.data.to_vec());
            }
            from = upto + 1;
        }
        logs.insert(id, log);
    }
    Ok(logs)
}

/// Builds the report of a finished history.
pub fn report(cfg: &CampaignConfig, h: &History, from_us: u64, to_us: u64) -> Report {
    let violations = check_all(h);
    let mut operations: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for o in &h.ops {
        *operations
            .entry(o.call.kind().to_string())
            .or_default()
            .entry(o.outcome.name().to_string())
            .or_default() += 1;
    }
    let mut faults = BTreeMap::new();
    for f in &h.faults {
        *faults.entry(f.kind.clone()).or_default() += 1;
    }
    let excerpts = violations
        .iter()
        .take(10)
        .map(|v| {
            let named: Vec<&Op> = h.ops.iter().filter(|o| v.ops.contains(&o.id)).collect();
            let lo = named.iter().map(|o| o.invoke_us).min().unwrap_or(0);
            let hi = named.iter().map(|o| o.complete_us).max().unwrap_or(0);
            h.excerpt(lo, hi).into_iter().take(40).cloned().collect()
        })
        .collect();
    Report {
        seed: cfg.seed,
        replicas: cfg.cluster.replicas,
        mix: cfg.mix.clone(),
        duration_s: (to_us - from_us) as f64 / 1e6,
        operations,
        faults,
        violations,
        excerpts,
        longest_gap_ms: longest_gap_us(&h.ops, from_us, to_us, |_| true) / 1000,
        longest_write_gap_ms: longest_gap_us(&h.ops, from_us, to_us, |o| {
            matches!(o.call, Call::Append { .. } | Call::StatePut { .. })
        }) / 1000,
        status_samples: h.statuses.len(),
        final_log_entries: crate::checker::reference_log(h).len(),
        repair: None,
    }
}

/// The history of a nemesis's faults.
pub fn fault_records(n: &Nemesis) -> (Vec<FaultRecord>, Vec<Wipe>) {
    let events = n.events();
    let wipes = events
        .iter()
        .filter_map(|e| match e.fault {
            Fault::Wipe(r) => Some(Wipe {
                replica: r,
                at_us: e.injected_us,
            }),
            _ => None,
        })
        .collect();
    let faults = events
        .into_iter()
        .map(|e| FaultRecord {
            kind: e.kind.to_string(),
            detail: format!("{:?}", e.fault),
            injected_us: e.injected_us,
            healed_us: e.healed_us,
        })
        .collect();
    (faults, wipes)
}

/// The cluster of a campaign; with the repair option, the repair script
/// is written first and the coordinator's flags join the replicas'.
async fn start_cluster(
    cfg: &CampaignConfig,
) -> Result<(Arc<Cluster>, Option<RepairDir>), ClusterError> {
    let mut cluster = cfg.cluster.clone();
    let dir = match &cfg.repair {
        Some(r) => {
            let dir = RepairDir::create(cfg.cluster.dir.as_deref())?;
            cluster
                .flags
                .extend(r.flags(&dir.script(), &cfg.cluster.flags)?);
            Some(dir)
        }
        None => None,
    };
    Ok((Arc::new(Cluster::start(cluster).await?), dir))
}

/// One fault at a time from the mix until `end`: a quiet spell, the
/// fault, its hold, the heal.
async fn inject_until(
    cfg: &CampaignConfig,
    cluster: &Cluster,
    nemesis: &Nemesis,
    rng: &mut Rng,
    end: Instant,
) -> Result<(), ClusterError> {
    while Instant::now() < end {
        tokio::time::sleep(rng.duration(cfg.quiet)).await;
        let kind = *rng.pick(&cfg.mix);
        let Some(fault) = choose(cluster, rng, kind).await else {
            continue;
        };
        info!(?fault, "injecting");
        nemesis.inject(fault).await?;
        tokio::time::sleep(rng.duration(cfg.hold)).await;
        nemesis.heal().await?;
        cluster.check_alive()?;
    }
    Ok(())
}

/// The coordinator's demotions on the history's clock.
fn isolations(w: &Watched) -> Vec<Isolation> {
    w.seen
        .demotions()
        .into_iter()
        .map(|(replica, at_ms)| Isolation {
            replica,
            at_us: at_ms.saturating_sub(w.epoch_ms) * 1000,
        })
        .collect()
}

/// Adds the repair rules' violations and counts to `report`.
fn add_repair(report: &mut Report, cfg: &CoordinatorConfig, w: &Watched, voters: usize) {
    if w.seen.gaps > 0 {
        warn!(
            gaps = w.seen.gaps,
            "some repair polls may have missed records: the repair rules saw less"
        );
    }
    report
        .violations
        .extend(check_repairs(&w.seen, &cfg.limits(voters)));
    report.repair = Some(repair_report(&w.seen, w.polls, w.polls_failed));
}

/// Runs a campaign; see the module docs. Returns the report and the whole
/// history (for a JSON dump).
pub async fn run(cfg: &CampaignConfig) -> Result<(Report, History), ClusterError> {
    let (cluster, repair_dir) = start_cluster(cfg).await?;
    let nemesis = Nemesis::new(cluster.clone());
    let rec = Arc::new(Recorder::default());
    let mut rng = Rng::new(cfg.seed);
    let from_us = cluster.elapsed().as_micros() as u64;
    let watch = cfg
        .repair
        .as_ref()
        .map(|r| RepairWatch::start(cluster.clone(), r));
    let workload = Workload::start(cluster.clone(), rec.clone(), &cfg.workload);
    let end = Instant::now() + cfg.duration;
    let result = inject_until(cfg, &cluster, &nemesis, &mut rng, end).await;
    if let Err(e) = &result {
        warn!(error = %e, "the campaign stopped early");
    }
    nemesis.heal().await?;
    // A little load on the healed cluster, then the end of the workload.
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.stop().await;
    let to_us = cluster.elapsed().as_micros() as u64;
    result?;
    let commit = match settle(&cluster, cfg.settle_timeout).await {
        Ok(c) => c,
        Err(e) => {
            report_unsettled(&cluster, watch.as_ref()).await;
            return Err(e);
        }
    };
    let final_logs = read_logs(&cluster, commit).await?;
    let watched = match (watch, &repair_dir) {
        (Some(w), Some(dir)) => Some(w.finish(&cluster, dir).await?),
        _ => None,
    };
    let (faults, wipes) = fault_records(&nemesis);
    let history = History {
        ops: rec.ops(),
        statuses: rec.statuses(),
        faults,
        wipes,
        isolations: watched.as_ref().map(isolations).unwrap_or_default(),
        state_mode: cfg.cluster.state,
        final_logs,
    };
    drop(nemesis);
    let mut report = report(cfg, &history, from_us, to_us);
    if let (Some(r), Some(w)) = (&cfg.repair, &watched) {
        add_repair(&mut report, r, w, cluster.ids().len());
    }
    Ok((report, history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Outcome, Ret};

    fn op(complete_us: u64, write: bool, ok: bool) -> Op {
        let call = if write {
            Call::Append { data: vec![1] }
        } else {
            Call::Read {
                from: 1,
                to: 1,
                linearizable: false,
                replica: Some(1),
            }
        };
        let outcome = match (ok, write) {
            (false, _) => Outcome::Failed("refused".into()),
            (true, true) => Outcome::Ok(Ret::Appended {
                position: 1,
                term: 1,
            }),
            (true, false) => Outcome::Ok(Ret::Read { entries: vec![] }),
        };
        Op {
            id: complete_us,
            client: 1,
            invoke_us: 0,
            complete_us,
            call,
            outcome,
        }
    }

    #[test]
    fn gaps_count_only_ok_operations_of_the_kind_asked() {
        let ops = [
            op(10, true, true),
            op(30, false, true),
            op(45, true, false),
            op(70, true, true),
        ];
        // Completions of ok operations: 10, 30, 70, then the end at 100.
        assert_eq!(longest_gap_us(&ops, 0, 100, |_| true), 40);
        let writes = |o: &Op| matches!(o.call, Call::Append { .. });
        assert_eq!(longest_gap_us(&ops, 0, 100, writes), 60);
        assert_eq!(longest_gap_us(&[], 0, 100, writes), 100);
    }

    #[test]
    fn mixes_parse() {
        assert_eq!(FaultKind::parse_mix("all").unwrap(), FaultKind::ALL);
        assert_eq!(
            FaultKind::parse_mix("wipe, kill,kill").unwrap(),
            [FaultKind::Kill, FaultKind::Wipe]
        );
        assert!(FaultKind::parse_mix("kill,flood").is_err());
        assert!(FaultKind::parse_mix("").is_err());
    }
}
