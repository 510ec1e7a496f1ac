//! Runs a repair command: `sh -c COMMAND` with the step's environment,
//! killed at its timeout, its output (stdout and stderr) kept to its last
//! [`MAX_OUTPUT_BYTES`] bytes.
//!
//! Environment of every command: `REPLOG_REPAIR_ID`, `REPLOG_REPLICA_ID`,
//! `REPLOG_REPLICA_ADDRESS`, `REPLOG_SIGNAL`, `REPLOG_ATTEMPT`,
//! `REPLOG_SCOPE`, `REPLOG_DEADLINE_MS` (unix ms).

use std::process::Stdio;
use std::time::Duration;

use replog_repair::record::{output_tail, StepStarted, MAX_OUTPUT_BYTES};
use replog_repair::StepResult;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub result: StepResult,
    pub exit_code: Option<i32>,
    pub output: String,
}

impl Outcome {
    pub fn failed(why: impl Into<String>) -> Self {
        Outcome {
            result: StepResult::Failed,
            exit_code: None,
            output: output_tail(&why.into(), MAX_OUTPUT_BYTES),
        }
    }
}

/// The environment a step's command gets.
pub fn environment(started: &StepStarted, address: &str) -> Vec<(String, String)> {
    let scope = match started.scope {
        replog_repair::Scope::Leader => "leader",
        replog_repair::Scope::Replica => "replica",
    };
    [
        ("REPLOG_REPAIR_ID", started.repair_id.clone()),
        ("REPLOG_REPLICA_ID", started.replica.to_string()),
        ("REPLOG_REPLICA_ADDRESS", address.to_string()),
        ("REPLOG_SIGNAL", started.signal.clone()),
        ("REPLOG_ATTEMPT", started.attempt.to_string()),
        ("REPLOG_SCOPE", scope.to_string()),
        ("REPLOG_DEADLINE_MS", started.deadline_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs `command` with `env` for at most `timeout`.
pub async fn run(command: &str, env: &[(String, String)], timeout: Duration) -> Outcome {
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("cannot start `sh -c {command}`: {e}")),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let collect = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = tokio::join!(
            read_tail(&mut stdout, &mut out),
            read_tail(&mut stderr, &mut err)
        );
        out.extend_from_slice(&err);
        out
    };
    let waited = tokio::time::timeout(timeout, async {
        let (output, status) = tokio::join!(collect, child.wait());
        (output, status)
    })
    .await;
    match waited {
        Ok((output, Ok(status))) => Outcome {
            result: if status.success() {
                StepResult::Succeeded
            } else {
                StepResult::Failed
            },
            exit_code: status.code(),
            output: output_tail(&String::from_utf8_lossy(&output), MAX_OUTPUT_BYTES),
        },
        Ok((_, Err(e))) => Outcome::failed(format!("waiting for the command: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Outcome {
                result: StepResult::TimedOut,
                exit_code: None,
                output: format!("killed after its timeout of {} ms", timeout.as_millis()),
            }
        }
    }
}

/// Reads `from` to its end, keeping only the last `MAX_OUTPUT_BYTES` in
/// `into` (memory stays bounded whatever the command prints).
async fn read_tail(from: &mut (impl AsyncReadExt + Unpin), into: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                into.extend_from_slice(&buf[..n]);
                if into.len() > 2 * MAX_OUTPUT_BYTES {
                    into.drain(..into.len() - MAX_OUTPUT_BYTES);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![("REPLOG_REPLICA_ID".into(), "3".into())]
    }

    #[tokio::test]
    async fn commands_report_their_exit_output_and_environment() {
        let o = run(
            "echo replica $REPLOG_REPLICA_ID; echo oops >&2",
            &env(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(o.result, StepResult::Succeeded);
        assert_eq!(o.exit_code, Some(0));
        assert_eq!(o.output, "replica 3\noops\n");
        let o = run("exit 7", &env(), Duration::from_secs(10)).await;
        assert_eq!((o.result, o.exit_code), (StepResult::Failed, Some(7)));
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let started = std::time::Instant::now();
        let o = run("sleep 30", &env(), Duration::from_millis(200)).await;
        assert_eq!(o.result, StepResult::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn output_is_bounded_to_its_tail() {
        let o = run(
            "yes x | head -c 100000; echo END",
            &env(),
            Duration::from_secs(10),
        )
        .await;
        assert!(o.output.len() <= MAX_OUTPUT_BYTES, "{}", o.output.len());
        assert!(o.output.ends_with("END\n"));
    }
}
