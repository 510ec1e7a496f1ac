//! The scripted regression scenario of issue 12 (acknowledged appends lost
//! when a wiped replica turned VOTING early), on real replica processes in
//! network namespaces:
//!
//! 1. 3 replicas, A the leader; B and C the others.
//! 2. C is wiped and rejoins fully (EMPTY -> RECOVERING -> VOTING, demoted
//!    and promoted: the log now holds that pair of membership entries).
//! 3. Only the A<->B link is cut; A acknowledges appends with C's help
//!    that B lacks.
//! 4. C is wiped again and restarted; as soon as it reports VOTING (or
//!    after a short wait), A is SIGKILLed and the partition healed.
//! 5. After a while with A down, A is restarted; a leader serves, more
//!    appends are acknowledged.
//! 6. The checker: no acknowledged append lost or duplicated, C never
//!    VOTING before the leader promoted it nor without what was
//!    acknowledged before its wipe, and the usual rules.
//!
//! With the fix (a RECOVERING replica turns VOTING only on a promotion that
//! names its current incarnation) it passes. To see it fail, put the bug
//! back in a separate build and point the test at that binary:
//!
//! ```text
//! CARGO_TARGET_DIR=$HOME/.cache/replog-bugs/target \
//!   cargo build -p replog-cli --bin replog --features replog-core/inject-bugs
//! REPLOG_BIN=$HOME/.cache/replog-bugs/target/debug/replog REPLOG_INJECT_BUG=early-voting \
//!   cargo test -p replog-faults --test regression_early_voting
//! ```
//!
//! (`REPLOG_INJECT_BUG` is handed to the replica processes; a binary built
//! without the feature ignores it.) Needs root: it fails, never skips,
//! without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replog_faults::campaign::fault_records;
use replog_faults::campaign::{read_logs, settle};
use replog_faults::checker::{check_all, Rule};
use replog_faults::client::{self, Recorder, Workload, WorkloadConfig};
use replog_faults::cluster::{status_name, Cluster, ClusterConfig, RECOVERING, VOTING};
use replog_faults::history::{History, Outcome};
use replog_faults::nemesis::{Fault, Nemesis};

const WAIT: Duration = Duration::from_secs(60);

/// A payload of `kib` KiB for append `n` (large ones make a rejoining
/// replica receive the log in several messages).
fn big_payload(n: u64, kib: usize) -> Vec<u8> {
    let mut p = client::payload(9, n);
    p.resize(kib * 1024, (n % 251) as u8);
    p
}

async fn append_ok(
    rec: &Recorder,
    c: &Cluster,
    client: &replog_client::Client,
    n: u64,
    kib: usize,
) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let outcome = client::append(
            rec,
            c,
            client,
            9,
            big_payload(n * 1000 + rec.acked() as u64, kib),
        )
        .await;
        if let Outcome::Ok(replog_faults::history::Ret::Appended { position, .. }) = outcome {
            return position;
        }
        assert!(
            Instant::now() < deadline,
            "no append acknowledged within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_voting_voter(c: &Cluster, id: u64, applied: u64) {
    c.wait(
        &format!("replica {id} VOTING, a voter, {applied} applied"),
        WAIT,
        async || {
            let s = c.status(id).await?;
            let (_, l) = c.leader().await?;
            let voter = l.members.iter().any(|m| m.id == id && m.voter);
            (s.status == VOTING && voter && s.applied >= applied).then_some(())
        },
    )
    .await
    .unwrap();
}

#[test]
fn wiped_replica_does_not_vote_early_and_no_acknowledged_append_is_lost() {
    replog_faults::netns::preflight().expect("this test needs root and a working `ip netns`");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario());
}

async fn scenario() {
    let cluster = Arc::new(
        Cluster::start(ClusterConfig::new(3).expect("the replog binary"))
            .await
            .expect("a 3-replica cluster in namespaces"),
    );
    let c = &*cluster;
    let nemesis = Nemesis::new(cluster.clone());
    let rec = Arc::new(Recorder::default());
    // Only status pollers (every 5 ms): the appends are scripted below.
    let pollers = Workload::start(
        cluster.clone(),
        rec.clone(),
        &WorkloadConfig {
            appenders: 0,
            linearizable_readers: 0,
            local_readers: 0,
            status_poll_interval: Duration::from_millis(5),
            ..Default::default()
        },
    );
    let client = c.client(Duration::from_secs(3));
    let (a, _) = c
        .wait("a leader", WAIT, async || c.leader().await)
        .await
        .unwrap();
    let others: Vec<u64> = c.ids().into_iter().filter(|i| *i != a).collect();
    let (b, cc) = (others[0], others[1]);
    eprintln!("A = {a}, B = {b}, C = {cc}");

    for n in 0..10 {
        append_ok(&rec, c, &client, n, 4).await;
    }
    // C wiped once; it rejoins fully: demoted, caught up, promoted.
    nemesis.inject(Fault::Wipe(cc)).await.unwrap();
    wait_voting_voter(c, cc, rec.high()).await;
    eprintln!("C rejoined once; high {}", rec.high());
    // Large entries between the promotion and the cut: C's next catch-up
    // takes several messages.
    for n in 10..40 {
        append_ok(&rec, c, &client, n, 96).await;
    }
    wait_voting_voter(c, cc, rec.high()).await;

    nemesis.inject(Fault::CutLink(a, b)).await.unwrap();
    let b_last = c.status(b).await.map(|s| s.last_index).unwrap_or(0);
    let mut beyond_b = 0;
    let mut n = 40;
    while beyond_b < 10 {
        let p = append_ok(&rec, c, &client, n, 4).await;
        n += 1;
        let b_now = c.status(b).await.map(|s| s.last_index).unwrap_or(b_last);
        if p > b_now {
            beyond_b += 1;
        }
    }
    let b_now = c.status(b).await.map(|s| s.last_index).unwrap_or(0);
    eprintln!(
        "A acknowledged up to {} with B's log at {b_now}",
        rec.high()
    );
    assert!(
        rec.high() > b_now,
        "B holds everything A acknowledged: the cut did not hold"
    );

    // C wiped again; A killed as soon as C reports VOTING (or after a
    // short wait), and the cut healed while A is down.
    nemesis.inject(Fault::Wipe(cc)).await.unwrap();
    let restarted = Instant::now();
    let poll = client::status_client(c, cc);
    let mut seen: Vec<i32> = Vec::new();
    loop {
        if let Some(s) = client::poll_status(&rec, c, &poll, cc).await {
            if seen.last() != Some(&s.status) {
                eprintln!(
                    "[{:?}] C is {} (last index {})",
                    restarted.elapsed(),
                    status_name(s.status),
                    s.last_index
                );
                seen.push(s.status);
            }
            if s.status == VOTING {
                break;
            }
        }
        if seen.contains(&RECOVERING) && restarted.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            restarted.elapsed() < WAIT,
            "C never came back (seen {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    nemesis.inject(Fault::Kill(a)).await.unwrap();
    nemesis.heal_network().await.unwrap();
    eprintln!("killed A, healed the A<->B link");
    // With A down, only B and C: a leader there needs C's vote.
    let early = c
        .wait(
            "a leader among B and C",
            Duration::from_secs(3),
            async || c.leader().await,
        )
        .await;
    eprintln!(
        "leader while A was down: {:?}",
        early.as_ref().map(|(id, s)| (id, s.term)).ok()
    );
    nemesis.heal().await.unwrap(); // restarts A
    c.wait("a leader after A's restart", WAIT, async || {
        c.leader().await
    })
    .await
    .unwrap();
    for n in 1000..1010 {
        append_ok(&rec, c, &client, n, 4).await;
    }
    let commit = settle(c, Duration::from_secs(120))
        .await
        .expect("the cluster settles");
    pollers.stop().await;
    let final_logs = read_logs(c, commit).await.expect("every replica's log");
    let (faults, wipes) = fault_records(&nemesis);
    let h = History {
        ops: rec.ops(),
        statuses: rec.statuses(),
        faults,
        wipes,
        state_mode: false,
        final_logs,
    };
    let violations = check_all(&h);
    for v in &violations {
        eprintln!("VIOLATION {:?}: {}", v.rule, v.detail);
    }
    let lost = violations
        .iter()
        .filter(|v| v.rule == Rule::AcknowledgedAppendKept)
        .count();
    assert!(
        violations.is_empty(),
        "{} violations ({lost} acknowledged appends lost); first: {:?}",
        violations.len(),
        violations.first()
    );
    drop(nemesis);
}
