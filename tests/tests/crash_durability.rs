//! Crash durability: a child process appends as fast as it can from many
//! tasks and is killed with SIGKILL mid-stream, many times. After each
//! restart every acknowledged position reads back byte for byte, and every
//! readable entry is a whole payload (nothing unacknowledged is half
//! visible).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replog_log::{Log, LogOptions, Position};
use replog_tests::{check_payload, payload};

const ROUNDS: u64 = 12;

/// Reads everything committed in the log into position -> data.
fn read_all(path: &std::path::Path) -> BTreeMap<u64, Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = Log::open(path, LogOptions::default()).expect("strict open after a crash");
        // Start a writer: this commits the new leader's entry, so every
        // entry written before the crash is committed and readable.
        let mut w = log.writer();
        let ending = w.start().await.unwrap();
        let r = log.reader();
        let mut out = BTreeMap::new();
        let mut from = r.beginning().value();
        while from <= ending.value() {
            let to = (from + 9_999).min(ending.value());
            for e in r.read(Position::new(from), Position::new(to)).unwrap() {
                out.insert(e.position.value(), e.data.to_vec());
            }
            from = to + 1;
        }
        out
    })
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica");
    let exe = env!("CARGO_BIN_EXE_crash-writer");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new(); // position -> seq
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    for round in 0..ROUNDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let concurrency = [1, 8, 64][(round % 3) as usize];
        let first_seq = (round + 1) * 1_000_000_000;
        let mut child = Command::new(exe)
            .arg(&path)
            .arg(concurrency.to_string())
            .arg(first_seq.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn crash-writer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        // Wait until the child writes, then let it run a random while.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("child started");
            let started = l == "STARTED";
            lines.push(l);
            if started {
                break;
            }
            assert!(Instant::now() < deadline, "child did not start");
        }
        let run_for = Duration::from_millis(50 + rng % 400);
        let kill_at = Instant::now() + run_for;
        while Instant::now() < kill_at {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(5)) {
                lines.push(l);
            }
        }
        child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());

        let mut this_round = 0;
        for l in &lines {
            let mut parts = l.split_whitespace();
            if parts.next() != Some("ACK") {
                continue;
            }
            // A line torn by the kill does not parse and was not seen whole.
            let (Some(p), Some(s)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(p), Ok(s)) = (p.parse::<u64>(), s.parse::<u64>()) else {
                continue;
            };
            if let Some(prev) = acked.insert(p, s) {
                panic!("position {p} acknowledged twice (seq {prev} and {s})");
            }
            this_round += 1;
        }

        let log = read_all(&path);
        for (p, seq) in &acked {
            let got = log.get(p).unwrap_or_else(|| {
                panic!("round {round}: acknowledged position {p} (seq {seq}) is lost")
            });
            assert_eq!(got, &payload(*seq), "round {round}: position {p} changed");
        }
        for (p, data) in &log {
            assert!(
                check_payload(data).is_some(),
                "round {round}: position {p} holds a torn or foreign entry of {} bytes",
                data.len()
            );
        }
        eprintln!(
            "round {round}: concurrency {concurrency}, ran {run_for:?}, {this_round} acks this round, {} acks in all, {} entries in the log",
            acked.len(),
            log.len()
        );
    }
    assert!(
        acked.len() as u64 > ROUNDS * 5,
        "the children acknowledged too little to test anything"
    );
}
