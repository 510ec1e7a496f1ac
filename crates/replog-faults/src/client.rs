//! Clients that record a [`History`]: append writers, linearizable and
//! local readers, and a status poller per replica. They run until their
//! stop flag is set, each operation bounded by the client's request
//! timeout, and every operation is recorded with its invoke and complete
//! times on the cluster's clock.
//!
//! Outcome classification (see `replog_client`'s retry contract): an
//! append's `OutcomeUnknown` is unknown; `NoLeader` (every attempt was
//! refused before it ran), `Unreachable` and a replica's error code are
//! failed. Reads change nothing, so every failed read is just failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replog_client::{Client, ClientConfig, ClientError, StatusResponse};
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::history::{Call, Member, Op, Outcome, ReadEntry, Ret, StatusSample};
use crate::state_client::{self, StateClients, StateKeys};

/// How far back from the highest acknowledged position reads reach.
const READ_SPAN: u64 = 20;

/// The operations and status samples being recorded.
#[derive(Default)]
pub struct Recorder {
    next_id: AtomicU64,
    ops: Mutex<Vec<Op>>,
    statuses: Mutex<Vec<StatusSample>>,
    /// Highest position acknowledged so far (reads aim at it).
    high: AtomicU64,
}

impl Recorder {
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    pub fn statuses(&self) -> Vec<StatusSample> {
        self.statuses.lock().unwrap().clone()
    }

    /// Highest position acknowledged so far.
    pub fn high(&self) -> u64 {
        self.high.load(Ordering::SeqCst)
    }

    /// Acknowledged appends so far.
    pub fn acked(&self) -> usize {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.appended_at().is_some())
            .count()
    }

    fn record(&self, client: u32, invoke_us: u64, complete_us: u64, call: Call, outcome: Outcome) {
        if let Outcome::Ok(Ret::Appended { position, .. }) = &outcome {
            self.high.fetch_max(*position, Ordering::SeqCst);
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.ops.lock().unwrap().push(Op {
            id,
            client,
            invoke_us,
            complete_us,
            call,
            outcome,
        });
    }
}

fn now_us(c: &Cluster) -> u64 {
    c.elapsed().as_micros() as u64
}

fn append_outcome(r: Result<replog_client::AppendResponse, ClientError>) -> Outcome {
    match r {
        Ok(a) => Outcome::Ok(Ret::Appended {
            position: a.position,
            term: a.term,
        }),
        Err(e @ ClientError::OutcomeUnknown { .. }) => Outcome::Unknown(e.to_string()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// One append through `client` of `data`, recorded.
pub async fn append(
    rec: &Recorder,
    c: &Cluster,
    client: &Client,
    id: u32,
    data: Vec<u8>,
) -> Outcome {
    let invoke = now_us(c);
    let r = client.append(data.clone()).await;
    let outcome = append_outcome(r);
    rec.record(
        id,
        invoke,
        now_us(c),
        Call::Append { data },
        outcome.clone(),
    );
    outcome
}

/// One read of `from..=to`, recorded; `replica` names the replica of a
/// single-replica client (local reads).
pub async fn read(
    rec: &Recorder,
    c: &Cluster,
    client: &Client,
    id: u32,
    (from, to): (u64, u64),
    linearizable: bool,
    replica: Option<u64>,
) -> Outcome {
    let invoke = now_us(c);
    let outcome = match client.read(from, to, linearizable).await {
        Ok(r) => Outcome::Ok(Ret::Read {
            entries: r
                .entries
                .into_iter()
                .map(|e| ReadEntry {
                    position: e.position,
                    data: e.data.to_vec(),
                })
                .collect(),
        }),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    let call = Call::Read {
        from,
        to,
        linearizable,
        replica,
    };
    rec.record(id, invoke, now_us(c), call, outcome.clone());
    outcome
}

/// The running workload's tasks; [`Workload::stop`] ends them.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How many clients of each kind, and how long they pause between calls.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub appenders: u32,
    pub linearizable_readers: u32,
    pub local_readers: u32,
    /// Clients of the state store (`--state`), each alternating puts and
    /// linearizable gets on shared keys.
    pub state_clients: u32,
    pub pause: Duration,
    pub request_timeout: Duration,
    /// Status polls per replica per second.
    pub status_poll_interval: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            appenders: 4,
            linearizable_readers: 1,
            local_readers: 1,
            state_clients: 0,
            pause: Duration::from_millis(5),
            request_timeout: Duration::from_secs(3),
            status_poll_interval: Duration::from_millis(50),
        }
    }
}

/// The unique payload of append `n` of client `id`: `id` (4 bytes) and `n`
/// (8 bytes, both big-endian), then a body whose length (16..3016 bytes)
/// and every byte are functions of the pair, so that a value names the
/// one operation that proposed it and a torn value is told apart.
pub fn payload(id: u32, n: u64) -> Vec<u8> {
    let seed = ((id as u64) << 40) ^ n;
    let len = 16 + (seed.wrapping_mul(7919) % 3000) as usize;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

impl Workload {
    /// Starts the clients and one status poller per replica.
    pub fn start(cluster: Arc<Cluster>, rec: Arc<Recorder>, cfg: &WorkloadConfig) -> Workload {
        let ctx = ClientContext {
            cluster: cluster.clone(),
            rec,
            stop: Arc::new(AtomicBool::new(false)),
            pause: cfg.pause,
        };
        let mut tasks = Vec::new();
        let client = cluster.client(cfg.request_timeout);
        let mut next_client = 0u32;
        for _ in 0..cfg.appenders {
            next_client += 1;
            tasks.push(spawn_appender(ctx.clone(), client.clone(), next_client));
        }
        for (linearizable, n) in [(true, cfg.linearizable_readers), (false, cfg.local_readers)] {
            for k in 0..n {
                next_client += 1;
                let reader = Reader {
                    id: next_client,
                    first_turn: k as usize,
                    linearizable,
                    timeout: cfg.request_timeout,
                };
                tasks.push(spawn_reader(ctx.clone(), client.clone(), reader));
            }
        }
        let keys = Arc::new(StateKeys::default());
        for k in 0..cfg.state_clients {
            next_client += 1;
            let sc = StateClients::new(&cluster, cfg.request_timeout);
            tasks.push(spawn_state_client(
                ctx.clone(),
                sc,
                keys.clone(),
                next_client,
                k as u64,
            ));
        }
        for r in cluster.ids() {
            tasks.push(spawn_status_poller(
                ctx.clone(),
                r,
                cfg.status_poll_interval,
            ));
        }
        Workload {
            stop: ctx.stop,
            tasks,
        }
    }

    /// Stops every client and waits for them (each within its timeout).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// A client for status polls of replica `r` (short timeouts: a paused
/// replica must not hold the poller long).
pub fn status_client(c: &Cluster, r: u64) -> Client {
    Client::with_config(
        [c.endpoint(r)],
        ClientConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(500),
            max_attempts: 1,
            ..Default::default()
        },
    )
}

/// Polls replica `r` once; records and returns the answer.
pub async fn poll_status(
    rec: &Recorder,
    c: &Cluster,
    client: &Client,
    r: u64,
) -> Option<StatusResponse> {
    let invoke_us = now_us(c);
    let s = client.status_of(&c.endpoint(r)).await.ok()?;
    rec.statuses.lock().unwrap().push(StatusSample {
        replica: r,
        invoke_us,
        complete_us: now_us(c),
        status: s.status,
        term: s.term,
        leader: s.leader,
        is_leader: s.is_leader,
        commit: s.commit,
        applied: s.applied,
        last_index: s.last_index,
        members: s
            .members
            .iter()
            .map(|m| Member {
                id: m.id,
                voter: m.voter,
            })
            .collect(),
    });
    Some(s)
}

/// What every client task of a workload shares.
#[derive(Clone)]
struct ClientContext {
    cluster: Arc<Cluster>,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    /// Between two calls that succeeded (a failed one waits 50 ms).
    pause: Duration,
}

impl ClientContext {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn wait_after(&self, ok: bool) -> Duration {
        if ok {
            self.pause
        } else {
            Duration::from_millis(50)
        }
    }
}

/// An appender: numbered payloads through the leader-following client.
fn spawn_appender(ctx: ClientContext, client: Client, id: u32) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0;
        while !ctx.stopped() {
            n += 1;
            let outcome = append(&ctx.rec, &ctx.cluster, &client, id, payload(id, n)).await;
            tokio::time::sleep(ctx.wait_after(matches!(outcome, Outcome::Ok(_)))).await;
        }
    })
}

/// One reader of a workload.
struct Reader {
    id: u32,
    /// Where its round-robin over the replicas starts (local reads).
    first_turn: usize,
    linearizable: bool,
    timeout: Duration,
}

/// A reader: linearizable reads of the newest acknowledged span through
/// the leader, or local reads of the span before it from each replica in
/// turn (a replica's committed view may lag).
fn spawn_reader(ctx: ClientContext, client: Client, reader: Reader) -> JoinHandle<()> {
    tokio::spawn(async move {
        let c = &ctx.cluster;
        let ids = c.ids();
        let locals: Vec<Client> = ids
            .iter()
            .map(|r| c.client_of(*r, reader.timeout))
            .collect();
        let mut turn = reader.first_turn;
        while !ctx.stopped() {
            let high = ctx.rec.high();
            if high == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            if reader.linearizable {
                let range = (high.saturating_sub(READ_SPAN - 1).max(1), high);
                read(&ctx.rec, c, &client, reader.id, range, true, None).await;
            } else {
                turn += 1;
                let r = turn % ids.len();
                let to = high.saturating_sub(READ_SPAN).max(1);
                let range = (to.saturating_sub(READ_SPAN - 1).max(1), to);
                read(
                    &ctx.rec,
                    c,
                    &locals[r],
                    reader.id,
                    range,
                    false,
                    Some(ids[r]),
                )
                .await;
            }
            tokio::time::sleep(ctx.pause * 4).await;
        }
    })
}

/// A state client: alternating puts and gets over a spread of keys and
/// replicas.
fn spawn_state_client(
    ctx: ClientContext,
    sc: StateClients,
    keys: Arc<StateKeys>,
    id: u32,
    first_turn: u64,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut turn = first_turn;
        while !ctx.stopped() {
            turn += 1;
            // A cheap spread of keys and replicas per client.
            let pick = turn.wrapping_mul(0x9E37_79B9) >> 7;
            let key = keys.next_key(pick);
            let invoke = now_us(&ctx.cluster);
            let (call, outcome) = if turn.is_multiple_of(2) {
                state_client::put(&sc, pick as usize, &key, keys.next_value()).await
            } else {
                state_client::get(&sc, pick as usize, &key).await
            };
            let ok = matches!(outcome, Outcome::Ok(_));
            ctx.rec
                .record(id, invoke, now_us(&ctx.cluster), call, outcome);
            tokio::time::sleep(ctx.wait_after(ok)).await;
        }
    })
}

/// Polls replica `r`'s status every `every` (the rejoin rule's samples).
fn spawn_status_poller(ctx: ClientContext, r: u64, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = status_client(&ctx.cluster, r);
        while !ctx.stopped() {
            poll_status(&ctx.rec, &ctx.cluster, &client, r).await;
            tokio::time::sleep(every).await;
        }
    })
}
