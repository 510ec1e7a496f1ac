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
//! A second scenario wipes C again with every link up, so that C replays
//! its old demotion and promotion while it catches up: the rejoin rule of
//! the checker must see no early VOTING.
//!
//! With the fix (a RECOVERING replica turns VOTING only on a promotion that
//! names its current incarnation) both pass. To run them against the bug,
//! build a binary with it put back in a separate target directory and
//! point the tests at it:
//!
//! ```text
//! CARGO_TARGET_DIR=$HOME/.cache/replog-bugs/target \
//!   cargo build -p replog-cli --bin replog --features replog-storage/inject-bugs
//! REPLOG_BIN=$HOME/.cache/replog-bugs/target/debug/replog REPLOG_INJECT_BUG=early-voting \
//!   cargo test -p replog-faults --test regression_early_voting
//! ```
//!
//! (The switch lives in replog-storage's `bugs` module; replog-core's
//! `inject-bugs` feature only forwards to it, and `-p replog-cli` cannot
//! name replog-core's features, as it does not depend on it directly.
//! `REPLOG_INJECT_BUG` is handed to the replica processes; a binary built
//! without the feature ignores it. `REPLOG_FAULTS_DIR` keeps the replicas'
//! directories and logs.) Needs root: the tests fail, never skip, without
//! it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replog_faults::campaign::{fault_records, read_logs, settle};
use replog_faults::checker::{check_all, Rule};
use replog_faults::client::{self, Recorder, Workload, WorkloadConfig};
use replog_faults::cluster::{status_name, Cluster, ClusterConfig, RECOVERING, VOTING};
use replog_faults::history::{History, Outcome, Ret};
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
        if let Outcome::Ok(Ret::Appended { position, .. }) = outcome {
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

/// One scenario at a time (the machine has two cores).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(scenario: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    replog_faults::netns::preflight().expect("this test needs root and a working `ip netns`");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario);
}

/// A cluster with status pollers (every 5 ms), whose replica C was wiped
/// once and rejoined fully, followed by large entries.
struct Setup {
    cluster: Arc<Cluster>,
    nemesis: Nemesis,
    rec: Arc<Recorder>,
    pollers: Workload,
    client: replog_client::Client,
    a: u64,
    b: u64,
    cc: u64,
}

async fn setup(name: &str) -> Setup {
    let mut config = ClusterConfig::new(3).expect("the replog binary");
    // REPLOG_FAULTS_DIR keeps the data directories and replica logs.
    config.dir =
        std::env::var_os("REPLOG_FAULTS_DIR").map(|d| std::path::PathBuf::from(d).join(name));
    let cluster = Arc::new(
        Cluster::start(config)
            .await
            .expect("a 3-replica cluster in namespaces"),
    );
    let c = &*cluster;
    let nemesis = Nemesis::new(cluster.clone());
    let rec = Arc::new(Recorder::default());
    // Only status pollers: the appends are scripted.
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
    // Large entries after the promotion: C's next catch-up takes several
    // messages, and it applies its old demotion and promotion first.
    for n in 10..40 {
        append_ok(&rec, c, &client, n, 96).await;
    }
    wait_voting_voter(c, cc, rec.high()).await;
    Setup {
        cluster,
        nemesis,
        rec,
        pollers,
        client,
        a,
        b,
        cc,
    }
}

impl Setup {
    /// More appends, then settle, read every log, and check the history.
    async fn finish(self) {
        let c = &*self.cluster;
        c.wait("a leader", WAIT, async || c.leader().await)
            .await
            .unwrap();
        for n in 1000..1010 {
            append_ok(&self.rec, c, &self.client, n, 4).await;
        }
        let commit = settle(c, Duration::from_secs(120))
            .await
            .expect("the cluster settles");
        self.pollers.stop().await;
        let final_logs = read_logs(c, commit).await.expect("every replica's log");
        let (faults, wipes) = fault_records(&self.nemesis);
        let h = History {
            ops: self.rec.ops(),
            statuses: self.rec.statuses(),
            faults,
            wipes,
            isolations: Vec::new(),
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
    }
}

/// Polls C every 2 ms after its restart until it reports VOTING, or has
/// been RECOVERING and `patience` passed; prints each status change.
async fn watch_c(s: &Setup, patience: Duration) {
    let c = &*s.cluster;
    let restarted = Instant::now();
    let poll = client::status_client(c, s.cc);
    let mut seen: Vec<i32> = Vec::new();
    loop {
        if let Some(st) = client::poll_status(&s.rec, c, &poll, s.cc).await {
            if seen.last() != Some(&st.status) {
                eprintln!(
                    "[{:?}] C is {} (last index {}, applied {})",
                    restarted.elapsed(),
                    status_name(st.status),
                    st.last_index,
                    st.applied
                );
                seen.push(st.status);
            }
            if st.status == VOTING {
                return;
            }
        }
        if seen.contains(&RECOVERING) && restarted.elapsed() > patience {
            return;
        }
        assert!(
            restarted.elapsed() < WAIT,
            "C never came back (seen {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The story of issue 12, step by step (see the module docs).
#[test]
fn wiped_replica_does_not_vote_early_and_no_acknowledged_append_is_lost() {
    run(async {
        let s = setup("lost-appends").await;
        let (c, a, b, cc) = (&*s.cluster, s.a, s.b, s.cc);
        s.nemesis.inject(Fault::CutLink(a, b)).await.unwrap();
        let mut beyond_b = 0;
        let mut n = 40;
        while beyond_b < 10 {
            let p = append_ok(&s.rec, c, &s.client, n, 4).await;
            n += 1;
            let b_now = c.status(b).await.map(|st| st.last_index).unwrap_or(0);
            if p > b_now {
                beyond_b += 1;
            }
        }
        let b_now = c.status(b).await.map(|st| st.last_index).unwrap_or(0);
        eprintln!(
            "A acknowledged up to {} with B's log at {b_now}",
            s.rec.high()
        );
        assert!(
            s.rec.high() > b_now,
            "B holds everything A acknowledged: the cut did not hold"
        );
        // C wiped again; A killed as soon as C reports VOTING (or after a
        // short wait), and the cut healed while A is down.
        s.nemesis.inject(Fault::Wipe(cc)).await.unwrap();
        watch_c(&s, Duration::from_millis(1500)).await;
        s.nemesis.inject(Fault::Kill(a)).await.unwrap();
        s.nemesis.heal_network().await.unwrap();
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
            early.as_ref().map(|(id, st)| (id, st.term)).ok()
        );
        s.nemesis.heal().await.unwrap(); // restarts A
        s.finish().await;
    });
}

/// C wiped again with every link up: replaying the log from its start it
/// meets its earlier demotion and promotion; it must stay RECOVERING until
/// the leader promotes its new incarnation (the checker's rejoin rule: no
/// VOTING while the leader lists it as a learner, nor before it holds
/// what was acknowledged before the wipe).
#[test]
fn wiped_replica_replaying_its_old_promotion_stays_recovering() {
    run(async {
        let s = setup("old-promotion").await;
        s.nemesis.inject(Fault::Wipe(s.cc)).await.unwrap();
        watch_c(&s, Duration::from_secs(30)).await;
        wait_voting_voter(&s.cluster, s.cc, s.rec.high()).await;
        s.finish().await;
    });
}
