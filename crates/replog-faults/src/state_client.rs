//! Recorded operations on the scheduler-state store (`--state`): a put
//! saves task `key` with its `failure_count` set to a value unique in the
//! campaign; a get is a linearizable query of that task id. The checker
//! treats each key as a register ([`crate::checker::state_linearizable`]).
//!
//! Keys rotate: the operations of the campaign go to [`KEYS_AT_ONCE`] keys
//! of the current epoch, and a new epoch starts every [`OPS_PER_EPOCH`]
//! operations, so that no key gets more operations than the search takes.
//!
//! Outcomes of a put, by [`wire::retry_rule`] for a state write:
//! acknowledged (ok); refused before it ran or without effect (a final
//! code: INVALID, REJECTED, ...; or what was not executed — NOT_LEADER,
//! BUSY, NOT_VOTING, a connection that could not be made — for every one
//! of a few attempts: failed); whatever may have been applied
//! (LEADERSHIP_LOST, CLOSED, TIMEOUT, STORAGE, a code this build does not
//! know, a broken connection): unknown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use replog_proto::state::{
    op, JobKey, Op as StateOp, SaveTasks, ScheduleStatus, ScheduledTask, TaskConfig, Transaction,
};
use replog_proto::store::scheduler_state_client::SchedulerStateClient;
use replog_proto::store::{ReadMode, SubmitRequest, TaskQueryRequest};
use replog_proto::wire::{self, CallKind, Retry};
use tonic::transport::{Channel, Endpoint};

use crate::cluster::Cluster;
use crate::history::{Call, Outcome, Ret};

/// Keys in use at a time.
pub const KEYS_AT_ONCE: u64 = 4;
/// Operations before the keys change.
pub const OPS_PER_EPOCH: u64 = 120;
/// Attempts of one put while replicas answer that it was not executed.
const ATTEMPTS: u32 = 5;

/// Shared counters of the state clients.
#[derive(Default)]
pub struct StateKeys {
    ops: AtomicU64,
    values: AtomicU64,
}

impl StateKeys {
    /// The key of the next operation (`pick` chooses among the epoch's).
    pub fn next_key(&self, pick: u64) -> String {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        format!("fk-{}-{}", n / OPS_PER_EPOCH, pick % KEYS_AT_ONCE)
    }

    /// A value no put used before.
    pub fn next_value(&self) -> u64 {
        self.values.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// One state client per replica endpoint (channels connect lazily).
pub struct StateClients {
    endpoints: Vec<String>,
    clients: Vec<SchedulerStateClient<Channel>>,
}

impl StateClients {
    pub fn new(c: &Cluster, timeout: Duration) -> StateClients {
        let endpoints = c.endpoints();
        let clients = endpoints
            .iter()
            .map(|e| {
                let ch = Endpoint::from_shared(format!("http://{e}"))
                    .expect("host:port endpoints")
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                SchedulerStateClient::new(ch)
            })
            .collect();
        StateClients { endpoints, clients }
    }

    fn index_of(&self, addr: &str) -> Option<usize> {
        self.endpoints.iter().position(|e| e == addr)
    }
}

fn task(key: &str, value: u64) -> ScheduledTask {
    ScheduledTask {
        task_id: key.to_string(),
        config: Some(TaskConfig {
            job: Some(JobKey {
                role: "faults".into(),
                environment: "prod".into(),
                name: "register".into(),
            }),
            owner_user: "replog-faults".into(),
            is_service: true,
            ..Default::default()
        }),
        status: ScheduleStatus::Running as i32,
        failure_count: value as i32,
        ..Default::default()
    }
}

/// The status's replog code, or "" without one.
fn code(s: &tonic::Status) -> String {
    wire::error_code(s)
        .map(|c| c.to_string())
        .unwrap_or_default()
}

/// Puts `value` under `key`, starting at replica index `start`.
pub async fn put(sc: &StateClients, start: usize, key: &str, value: u64) -> (Call, Outcome) {
    let call = Call::StatePut {
        key: key.to_string(),
        value,
    };
    let txn = Transaction {
        ops: vec![StateOp {
            op: Some(op::Op::SaveTasks(SaveTasks {
                tasks: vec![task(key, value)],
            })),
        }],
    };
    let mut target = start % sc.clients.len();
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        let mut c = sc.clients[target].clone();
        let r = c
            .submit(SubmitRequest {
                transaction: Some(txn.clone()),
            })
            .await;
        let s = match r {
            Ok(r) => {
                let position = r.into_inner().position;
                return (call, Outcome::Ok(Ret::StateWritten { position }));
            }
            Err(s) => s,
        };
        last = format!("{}: {} {}", sc.endpoints[target], code(&s), s.message());
        match wire::retry_rule(&s, CallKind::StateWrite) {
            Retry::OnLeader | Retry::Anywhere => {
                target = wire::leader_hint(&s)
                    .and_then(|h| sc.index_of(&h.address))
                    .unwrap_or((target + 1) % sc.clients.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Retry::Final => return (call, Outcome::Failed(last)),
            Retry::OutcomeUnknown => return (call, Outcome::Unknown(last)),
        }
    }
    (call, Outcome::Failed(format!("no leader took it: {last}")))
}

/// A linearizable query of `key` at replica index `at`.
pub async fn get(sc: &StateClients, at: usize, key: &str) -> (Call, Outcome) {
    let call = Call::StateGet {
        key: key.to_string(),
    };
    let mut c = sc.clients[at % sc.clients.len()].clone();
    let req = TaskQueryRequest {
        mode: ReadMode::Linearizable as i32,
        task_ids: vec![key.to_string()],
        ..Default::default()
    };
    let outcome = match c.query_tasks(req).await {
        Err(s) => Outcome::Failed(format!("{} {}", code(&s), s.message())),
        Ok(r) => {
            let mut stream = r.into_inner();
            let mut value = None;
            loop {
                match stream.message().await {
                    Ok(Some(t)) if t.task_id == key => value = Some(t.failure_count as u64),
                    Ok(Some(_)) => {}
                    Ok(None) => break Outcome::Ok(Ret::StateValue { value }),
                    Err(s) => break Outcome::Failed(format!("{} {}", code(&s), s.message())),
                }
            }
        }
    };
    (call, outcome)
}
