//! Short fault campaigns for CI (under a minute each, one at a time): the
//! process faults, the network faults, the wipes, and the state store under
//! kills and partitions, each against a real 3-replica cluster in network
//! namespaces, checked by the checker; and the repair coordinator on 5
//! replicas under kills, pauses and partitions, its limits checked over
//! its replicated history. The long ones are
//! `replog-faults campaign --duration 1h --mix all` (see
//! docs/reliability.md).
//!
//! Needs root and a working `ip netns` (fails with the reason otherwise,
//! never skips), and the `replog` binary built in the same target
//! directory (`cargo build -p replog-cli --bin replog`) or REPLOG_BIN.

use std::sync::Mutex;
use std::time::Duration;

use replog_faults::campaign::{self, CampaignConfig, FaultKind, Report};
use replog_faults::cluster::ClusterConfig;
use replog_faults::repair::CoordinatorConfig;

/// One cluster at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `cfg` and checks what every campaign must show: faults injected,
/// writes acknowledged, no violation.
fn run(cfg: CampaignConfig) -> Report {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    replog_faults::netns::preflight().expect("fault campaigns need root and a working `ip netns`");
    let (mix, seed) = (cfg.mix.clone(), cfg.seed);
    let (report, _history) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(campaign::run(&cfg))
        .unwrap_or_else(|e| panic!("campaign {mix:?} (seed {seed}) did not complete: {e}"));
    eprintln!("{}", report.table());
    let faults: u64 = report.faults.values().sum();
    assert!(faults > 0, "no fault was injected: {report:?}");
    let written = if cfg.cluster.state {
        "state-put"
    } else {
        "append"
    };
    let acked = report
        .operations
        .get(written)
        .and_then(|o| o.get("ok"))
        .copied()
        .unwrap_or(0);
    assert!(acked > 0, "no {written} was acknowledged");
    assert!(
        report.violations.is_empty(),
        "violations: {:#?}\nhistory excerpts: {:#?}",
        report.violations,
        report.excerpts
    );
    report
}

fn campaign(mix: &str, seed: u64, duration: Duration, state: bool) {
    let mut cluster = ClusterConfig::new(3).expect("the replog binary");
    cluster.state = state;
    run(CampaignConfig::new(
        cluster,
        duration,
        FaultKind::parse_mix(mix).unwrap(),
        seed,
    ));
}

#[test]
fn kills_pauses_and_partitions() {
    campaign("kill,pause,partition", 11, Duration::from_secs(40), false);
}

#[test]
fn packet_loss_and_delay() {
    campaign("packet-loss,delay", 12, Duration::from_secs(25), false);
}

#[test]
fn wiped_followers_rejoin() {
    campaign("wipe,kill", 13, Duration::from_secs(35), false);
}

#[test]
fn state_store_under_kills_and_partitions() {
    campaign("kill,partition", 14, Duration::from_secs(20), true);
}

/// The coordinator acts on its own detector's judgments of the faults
/// (held 1-10 s: a step starts after ~3.5 s of silence), and its limits
/// hold over the whole replicated history.
#[test]
fn repair_coordinator_under_kills_pauses_and_partitions() {
    let cluster = ClusterConfig::new(5).expect("the replog binary");
    let mix = FaultKind::parse_mix("kill,pause,partition").unwrap();
    let cfg = CampaignConfig::new(cluster, Duration::from_secs(45), mix, 15)
        .with_repair(CoordinatorConfig::default());
    let report = run(cfg);
    let r = report.repair.expect("the repair report");
    assert!(r.steps_started > 0, "the coordinator never acted: {r:#?}");
    assert_eq!(
        r.history_gaps, 0,
        "some polls may have missed records: the rules saw less"
    );
    assert!(r.polls_failed < r.polls, "no poll of GET /repairs answered");
}
