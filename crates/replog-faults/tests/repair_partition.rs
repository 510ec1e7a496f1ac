//! The repair coordinator against a network partition (issue 14): five
//! replica processes in network namespaces; one follower is cut off from
//! every other replica by iptables rules in its namespace while its process
//! keeps running. The leader's detector judges it through ping timeouts
//! (`unreachable`, source `detector`), the escalation order runs (a script
//! that records its call), the exhausted order isolates the replica
//! (demoted to a learner), and once the network heals and the replica has
//! been healthy for `--healthy-period` it is re-admitted as a voter. While
//! cut off, the replica itself reports not ready (`GET /readyz`: no leader
//! known).
//!
//! Needs root and a working `ip netns` (fails with the reason otherwise,
//! never skips), and the `replog` binary built in the same target
//! directory (`cargo build -p replog-cli --bin replog`) or REPLOG_BIN.

use std::sync::Arc;
use std::time::Duration;

use replog_faults::cluster::{Cluster, ClusterConfig};
use replog_faults::nemesis::{Fault, Nemesis};
use replog_faults::repair::{fetch, get, HTTP_PORT};
use replog_faults::repair_check::Record;

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(90);

/// The repair command: records its call (repair id, replica, signal,
/// attempt) and succeeds.
const STEP_SCRIPT: &str = r#"#!/bin/sh
echo "$REPLOG_REPAIR_ID $REPLOG_REPLICA_ID $REPLOG_SIGNAL $REPLOG_ATTEMPT" >> "$(dirname "$0")/calls"
"#;

/// The applied records of the leader's `GET /repairs`.
async fn leader_records(c: &Cluster) -> Vec<Record> {
    let (leader, _) = c.leader().await.expect("a leader");
    let doc = fetch(c, leader).await.expect("GET /repairs");
    doc.state
        .history
        .iter()
        .filter_map(|e| e.applied().cloned())
        .collect()
}

/// Replica `id`'s `GET /readyz`: (status, body).
async fn readyz(c: &Cluster, id: u64) -> Option<(u16, String)> {
    let (status, body) = get(c, id, "/readyz").await.ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn repair_flags(dir: &std::path::Path) -> Vec<String> {
    let step = format!("probe=sh {}", dir.join("step.sh").display());
    [
        "--max-ping-timeouts",
        "3",
        "--reregister-timeout",
        "2s",
        "--repair-set",
        &step,
        "--repair-order",
        "probe:leader:2s",
        "--repair-mode",
        "execute",
        "--healthy-period",
        "3s",
        "--max-lag-entries",
        "0",
        "--metrics-listen",
        &format!("0.0.0.0:{HTTP_PORT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The leader's view of one member: (voter, health).
async fn member(c: &Cluster, id: u64) -> Option<(bool, String)> {
    let (_, s) = c.leader().await?;
    let m = s.members.iter().find(|m| m.id == id)?;
    Some((m.voter, m.health.clone()))
}

#[test]
fn a_partitioned_replica_is_detected_by_ping_timeouts_isolated_and_readmitted() {
    replog_faults::netns::preflight().expect("this test needs root and a working `ip netns`");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("step.sh"), STEP_SCRIPT).unwrap();
    let mut config = ClusterConfig::new(5).expect("the replog binary");
    config.flags = repair_flags(dir.path());
    config.dir = Some(dir.path().join("cluster"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(config, dir.path()));
}

async fn run(config: ClusterConfig, dir: &std::path::Path) {
    let c = Arc::new(Cluster::start(config).await.expect("a 5-replica cluster"));
    let nemesis = Nemesis::new(c.clone());
    let (leader, cut) = c
        .wait("a leader judging every member healthy", WAIT, async || {
            let (leader, s) = c.leader().await?;
            let healthy = s.members.len() == 5 && s.members.iter().all(|m| m.health == "healthy");
            healthy.then(|| (leader, (1..=5).find(|id| *id != leader).unwrap()))
        })
        .await
        .unwrap();
    eprintln!("leader {leader}; cutting replica {cut} off from the others");
    nemesis.inject(Fault::Isolate(cut)).await.unwrap();

    // Cut off, the replica itself knows no leader: not ready.
    c.wait(
        &format!("replica {cut} to report not ready"),
        WAIT,
        async || {
            let (status, body) = readyz(&c, cut).await?;
            (status == 503 && body.contains("no leader known")).then_some(())
        },
    )
    .await
    .unwrap();

    // The leader judges it unreachable, runs the order, and demotes it.
    c.wait(
        &format!("replica {cut} to be demoted"),
        WAIT,
        async || match member(&c, cut).await? {
            (false, _) => Some(()),
            _ => None,
        },
    )
    .await
    .unwrap();
    let records = leader_records(&c).await;
    assert!(
        records.iter().any(
            |r| matches!(r, Record::Signal { replica, signal, source, .. }
            if *replica == cut && signal == "unreachable" && source == "detector")
        ),
        "no detector signal for {cut}: {records:#?}"
    );
    let started: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::StepStarted(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(started.len(), 1, "{records:#?}");
    assert_eq!(
        (started[0].replica, started[0].repair_id.as_str()),
        (cut, "probe")
    );
    let isolated: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Isolated(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(isolated.len(), 1, "{records:#?}");
    assert_eq!((isolated[0].replica, isolated[0].spare), (cut, None));
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        vec![format!("probe {cut} unreachable 1")],
        "the repair command's calls"
    );
    // Nobody else was touched: the other four stay voters.
    for id in (1..=5).filter(|id| *id != cut) {
        assert_eq!(
            member(&c, id).await.map(|m| m.0),
            Some(true),
            "replica {id}"
        );
    }

    // The network heals: the replica is healthy again and re-admitted.
    nemesis.heal().await.unwrap();
    eprintln!("healed the network");
    c.wait(
        &format!("replica {cut} to be a voter again"),
        WAIT,
        async || {
            let (voter, health) = member(&c, cut).await?;
            (voter && health == "healthy").then_some(())
        },
    )
    .await
    .unwrap();
    let readmitted = leader_records(&c)
        .await
        .into_iter()
        .filter(|r| matches!(r, Record::Readmitted { replica, .. } if *replica == cut))
        .count();
    assert_eq!(readmitted, 1);
    c.wait(&format!("replica {cut} to be ready"), WAIT, async || {
        let (status, _) = readyz(&c, cut).await?;
        (status == 200).then_some(())
    })
    .await
    .unwrap();
}
