//! The `replog` binary, run as an operator would.

use std::path::Path;
use std::process::{Command, Output};

fn replog(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replog"))
        .args(args)
        .output()
        .expect("run replog")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn initialize_status_benchmark_read() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("r1");
    let o = replog(&[
        "initialize",
        "--path",
        p(&r),
        "--cluster-id",
        "prod-1",
        "--replica-id",
        "1",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("VOTING"), "{out}");

    // Initializing again is refused with a clear message.
    let o = replog(&[
        "initialize",
        "--path",
        p(&r),
        "--cluster-id",
        "prod-1",
        "--replica-id",
        "1",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("not empty"), "{err}");

    let o = replog(&["status", "--path", p(&r), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["status"], "VOTING");
    assert_eq!(j["cluster_id"], "prod-1");
    assert_eq!(j["replica_id"], 1);

    // The benchmark writes its own log; it refuses a real replica.
    let trace = d.path().join("trace.txt");
    std::fs::write(&trace, "# sizes\n100B\n1KB\n\n256B\n").unwrap();
    let o = replog(&["benchmark", "--path", p(&r), "--input", p(&trace)]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("prod-1"), "{err}");

    let b = d.path().join("bench");
    let o = replog(&[
        "benchmark",
        "--path",
        p(&b),
        "--input",
        p(&trace),
        "--repeat",
        "20",
        "--concurrency",
        "4",
        "--probe-iterations",
        "20",
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let reports: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reports[1]["count"], 60, "{out}");
    assert_eq!(reports[1]["bytes"], 20 * (100 + 1024 + 256), "{out}");

    // Read what the benchmark wrote.
    let o = replog(&["read", "--path", p(&b), "--format", "json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    let total: u64 = lines.iter().map(|l| l["size"].as_u64().unwrap()).sum();
    assert_eq!(total, 20 * (100 + 1024 + 256));

    // A range past the end is a clear error.
    let o = replog(&["read", "--path", p(&b), "--from", "2", "--to", "100000"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn status_of_a_missing_replica_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let o = replog(&["status", "--path", p(&d.path().join("nothing"))]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("replog initialize"), "{err}");
}

#[test]
fn embedded_demo_runs_and_survives_a_rerun() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("demo");
    for _ in 0..2 {
        let o = replog(&["demo", "--embedded", "--path", p(&path), "--entries", "300"]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        assert!(
            out.contains("every acknowledged entry, byte for byte"),
            "{out}"
        );
        assert!(out.contains("done"), "{out}");
    }
}

/// Three free consecutive ports (bound and released; good enough here).
fn free_base_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = l.local_addr().unwrap().port();
        drop(l);
        if base < 65000
            && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
}

#[test]
fn cluster_demo_fails_over_and_verifies_every_replica() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("demo");
    let port = free_base_port().to_string();
    let o = replog(&[
        "demo",
        "--path",
        p(&path),
        "--entries",
        "300",
        "--base-port",
        &port,
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("took over"), "{out}");
    assert!(out.contains("caught up"), "{out}");
    assert!(
        out.contains("are on all 3 replicas, byte for byte"),
        "{out}"
    );
}

#[test]
fn read_and_status_on_a_damaged_replica() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bench");
    let trace = d.path().join("trace.txt");
    std::fs::write(&trace, "512B\n").unwrap();
    let o = replog(&[
        "benchmark",
        "--path",
        p(&b),
        "--input",
        p(&trace),
        "--repeat",
        "200",
        "--probe-iterations",
        "0",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let full = replog(&["read", "--path", p(&b)]);
    let full_lines = text(&full).0.lines().count();
    assert_eq!(full_lines, 200);

    // Damage the middle of the write-ahead log (the entries live only there).
    let wal = std::fs::read_dir(&b)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .expect("a WAL file");
    let mut bytes = std::fs::read(&wal).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&wal, bytes).unwrap();

    let strict = replog(&["read", "--path", p(&b)]);
    let (_, err) = text(&strict);
    assert!(
        !strict.status.success(),
        "strict read must refuse damaged data"
    );
    assert!(err.contains("orrupt"), "{err}");

    let lenient = replog(&["read", "--path", p(&b), "--strict=false"]);
    let (out, err) = text(&lenient);
    assert!(lenient.status.success(), "{err}");
    assert!(err.contains("damage found"), "{err}");
    let n = out.lines().count();
    assert!(n < 200, "the damaged part is not served ({n} entries)");
    // What is served is the intact prefix of what was there.
    let full_out = text(&full).0;
    assert!(
        full_out.starts_with(&out),
        "non-strict read served something other than a prefix"
    );

    let status = replog(&["status", "--path", p(&b), "--strict=false", "--json"]);
    let (out, err) = text(&status);
    assert!(status.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!j["damage"].as_array().unwrap().is_empty(), "{out}");
}
