//! The `replog-bench` binary, run as a benchmark's script runs it. (A run
//! against a real cluster is `tests/tests/cluster_processes.rs`,
//! `benchmark_endpoint_appends_every_operation_through_the_leader`.)

use std::process::{Command, Output};

fn replog_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replog-bench"))
        .args(args)
        .env_remove("REPLOG_LOG")
        .output()
        .expect("run replog-bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cluster_needs_a_target() {
    let o = replog_bench(&["cluster", "--count", "1"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    let err = stderr(&o);
    assert!(
        err.contains("--etcd") && err.contains("--endpoint"),
        "{err}"
    );
}

#[test]
fn an_unreachable_etcd_fails_clearly() {
    // Port 1 on loopback: nothing listens there.
    let o = replog_bench(&["cluster", "--etcd", "http://127.0.0.1:1", "--count", "1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("no etcd endpoint answered"), "{err}");
}
