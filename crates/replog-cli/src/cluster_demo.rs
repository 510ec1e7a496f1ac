//! `replog demo`: a local 3-replica cluster of real `replog replica`
//! processes on 127.0.0.1. It appends, kills the leader, shows the failover,
//! goes on appending, brings the killed replica back, and verifies that every
//! replica holds every acknowledged entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use replog_client::{Client, ClientConfig, ClientError};
use tokio::sync::Mutex;

use crate::support::{progress_bar, runtime};

const CLUSTER: &str = "demo";

/// What the cluster demo runs.
#[derive(Debug, Clone)]
pub struct ClusterDemo {
    /// Directory of the replicas' data and logs.
    pub dir: PathBuf,
    /// Wipe `dir` first.
    pub fresh: bool,
    /// Entries appended in each of the three rounds.
    pub entries: usize,
    /// First of the three ports the replicas listen on.
    pub base_port: u16,
}

/// The replica processes; killed when dropped.
struct Replicas {
    exe: PathBuf,
    dir: PathBuf,
    ports: BTreeMap<u64, u16>,
    children: BTreeMap<u64, Child>,
}

impl Replicas {
    fn endpoint(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports[&id])
    }

    fn endpoints(&self) -> Vec<String> {
        self.ports.keys().map(|id| self.endpoint(*id)).collect()
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("replica-{id}"))
    }

    fn log_file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("replica-{id}.log"))
    }

    fn start(&mut self, id: u64) -> Result<()> {
        let peers: Vec<String> = self
            .ports
            .keys()
            .filter(|p| **p != id)
            .map(|p| format!("{p}={}", self.endpoint(*p)))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(id))
            .with_context(|| format!("cannot open {}", self.log_file(id).display()))?;
        let child = Command::new(&self.exe)
            .arg("--log")
            .arg("info")
            .arg("replica")
            .arg("--path")
            .arg(self.path(id))
            .arg("--listen")
            .arg(self.endpoint(id))
            .arg("--cluster-id")
            .arg(CLUSTER)
            .arg("--replica-id")
            .arg(id.to_string())
            .arg("--peers")
            .arg(peers.join(","))
            .arg("--ping-timeout")
            .arg("1s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start replica {id}"))?;
        self.children.insert(id, child);
        Ok(())
    }

    fn kill(&mut self, id: u64) -> Result<()> {
        if let Some(mut c) = self.children.remove(&id) {
            c.kill().context("cannot kill the replica")?;
            let _ = c.wait();
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.children) {
            // SIGTERM first: the replica shuts down cleanly.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn initialize(exe: &Path, path: &Path, id: u64, members: &str) -> Result<()> {
    let out = Command::new(exe)
        .arg("initialize")
        .arg("--path")
        .arg(path)
        .arg("--cluster-id")
        .arg(CLUSTER)
        .arg("--replica-id")
        .arg(id.to_string())
        .arg("--members")
        .arg(members)
        .output()
        .context("cannot run replog initialize")?;
    if !out.status.success() {
        bail!(
            "replog initialize failed for replica {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The replica id behind an endpoint.
async fn replica_of(client: &Client, endpoint: &str) -> Result<u64> {
    Ok(client.status_of(endpoint).await?.replica_id)
}

async fn wait_leader(client: &Client, not: Option<u64>) -> Result<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(e) = client.leader().await {
            let id = replica_of(client, &e).await.unwrap_or(0);
            if id != 0 && Some(id) != not {
                return Ok((id, e));
            }
        }
        if Instant::now() > deadline {
            bail!("no leader elected within 60s; see the replica logs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Acked = Arc<Mutex<BTreeMap<u64, Vec<u8>>>>;

/// Appends `count` entries with `writers` concurrent writers; returns how
/// many were acknowledged and how many had an unknown outcome.
async fn append_batch(
    client: &Client,
    acked: &Acked,
    label: &str,
    start: u64,
    count: u64,
    writers: u64,
) -> (u64, u64) {
    let pb = progress_bar(count, label, true);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = client.clone();
        let acked = acked.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut unknown) = (0, 0);
            let mut i = start + w;
            while i < start + count {
                let payload = format!("demo entry {i}").into_bytes();
                match client.append(payload.clone()).await {
                    Ok(r) => {
                        acked.lock().await.insert(r.position, payload);
                        ok += 1;
                    }
                    Err(ClientError::OutcomeUnknown { .. }) | Err(ClientError::NoLeader { .. }) => {
                        unknown += 1
                    }
                    Err(_) => unknown += 1,
                }
                pb.inc(1);
                i += writers;
            }
            (ok, unknown)
        }));
    }
    let (mut ok, mut unknown) = (0, 0);
    for t in tasks {
        if let Ok((o, u)) = t.await {
            ok += o;
            unknown += u;
        }
    }
    pb.finish_and_clear();
    (ok, unknown)
}

pub fn cluster_demo(a: &ClusterDemo) -> Result<()> {
    let mut replicas = prepare_replicas(a)?;
    let rt = runtime()?;
    let outcome = rt.block_on(demo_scenario(a.entries as u64, &mut replicas));
    replicas.stop_all();
    println!(
        "-- stopped the replicas; data and logs are in {}",
        a.dir.display()
    );
    outcome
}

/// The demo's directory and ports checked, its three replicas initialized
/// (or reused from an earlier run) and started.
fn prepare_replicas(a: &ClusterDemo) -> Result<Replicas> {
    let base = a.dir.clone();
    if a.fresh && base.exists() {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot wipe {}", base.display()))?;
    }
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let exe = std::env::current_exe().context("cannot find the replog binary")?;
    let ports: BTreeMap<u64, u16> = (1..=3u64)
        .map(|i| (i, a.base_port + i as u16 - 1))
        .collect();
    for (id, port) in &ports {
        if std::net::TcpListener::bind(("127.0.0.1", *port)).is_err() {
            bail!("port {port} (replica {id}) is in use; choose others with --base-port");
        }
    }
    let mut replicas = Replicas {
        exe: exe.clone(),
        dir: base.clone(),
        ports,
        children: BTreeMap::new(),
    };
    let members: Vec<String> = replicas
        .ports
        .keys()
        .map(|id| format!("{id}={}", replicas.endpoint(*id)))
        .collect();
    println!(
        "== replog demo: a local cluster of 3 replica processes in {}",
        base.display()
    );
    for id in 1..=3u64 {
        let p = replicas.path(id);
        if p.join("REPLICA-IDENTITY").exists() {
            println!(
                "-- replica {id}: reusing {} from an earlier run",
                p.display()
            );
        } else {
            initialize(&exe, &p, id, &members.join(","))?;
            println!(
                "-- replica {id}: initialized {} (EMPTY -> VOTING)",
                p.display()
            );
        }
    }
    for id in 1..=3u64 {
        replicas.start(id)?;
        println!(
            "-- replica {id}: serving on {} (log: {})",
            replicas.endpoint(id),
            replicas.log_file(id).display()
        );
    }
    Ok(replicas)
}

/// Appends `n` entries, kills the leader while appending `n` more, appends
/// `n` on the new leader, restarts the killed one, and verifies every
/// acknowledged entry on every replica.
async fn demo_scenario(n: u64, replicas: &mut Replicas) -> Result<()> {
    let endpoints = replicas.endpoints();
    let client = Client::with_config(
        &endpoints,
        ClientConfig {
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let (leader, _) = wait_leader(&client, None).await?;
    println!(
        "-- replica {leader} was elected leader in {:?}",
        started.elapsed()
    );
    crate::cluster::status_endpoints_async(&endpoints, false).await?;

    let acked: Acked = Arc::new(Mutex::new(BTreeMap::new()));
    let t = Instant::now();
    let (ok, _) = append_batch(&client, &acked, "appending", 0, n, 16).await;
    println!(
        "-- appended {ok} entries in {:?} (16 concurrent writers)",
        t.elapsed()
    );

    kill_the_leader_while_appending(&client, &acked, replicas, leader, n).await?;
    crate::cluster::status_endpoints_async(&endpoints, false).await?;

    let t = Instant::now();
    let (ok, _) = append_batch(&client, &acked, "appending", 2 * n, n, 16).await;
    println!(
        "-- appended {ok} more entries on the new leader in {:?}",
        t.elapsed()
    );

    println!("-- restarting replica {leader} on its data directory");
    replicas.start(leader)?;
    let last = *acked.lock().await.keys().last().unwrap_or(&0);
    wait_all_applied(&client, last, leader).await?;
    println!("-- replica {leader} caught up");
    crate::cluster::status_endpoints_async(&endpoints, false).await?;

    let acked = acked.lock().await.clone();
    verify_on_every_replica(&endpoints, &acked).await?;
    println!(
        "== verified: all {} acknowledged entries are on all 3 replicas, byte for byte",
        acked.len()
    );
    Ok(())
}

/// SIGKILLs `leader` while 16 writers append `n` entries (from position
/// label `n` on), and reports the failover.
async fn kill_the_leader_while_appending(
    client: &Client,
    acked: &Acked,
    replicas: &mut Replicas,
    leader: u64,
    n: u64,
) -> Result<()> {
    println!("-- killing the leader, replica {leader}, with SIGKILL, while appending");
    let during = {
        let client = client.clone();
        let acked = acked.clone();
        tokio::spawn(async move { append_batch(&client, &acked, "failover", n, n, 16).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = Instant::now();
    replicas.kill(leader)?;
    let (new_leader, _) = wait_leader(client, Some(leader)).await?;
    println!(
        "-- replica {new_leader} took over in {:?}",
        killed_at.elapsed()
    );
    let (ok, unknown) = during.await.context("writer task failed")?;
    println!(
        "-- during the failover {ok} appends were acknowledged; {unknown} had an unknown outcome (the client reports them, it never guesses)"
    );
    Ok(())
}

/// Waits (up to 60 s) until every replica applied `last`; `restarted` is
/// the one expected to lag.
async fn wait_all_applied(client: &Client, last: u64, restarted: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = client.status_all().await;
        if all
            .iter()
            .all(|(_, s)| s.as_ref().is_ok_and(|s| s.applied >= last))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("replica {restarted} did not catch up within 60s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every acknowledged position from each replica alone and compares
/// the bytes.
async fn verify_on_every_replica(
    endpoints: &[String],
    acked: &BTreeMap<u64, Vec<u8>>,
) -> Result<()> {
    let (Some(&first), Some(&last)) = (acked.keys().next(), acked.keys().last()) else {
        return Ok(());
    };
    for e in endpoints {
        let one = Client::new([e.clone()]);
        let mut got = BTreeMap::new();
        let mut from = first;
        while from <= last {
            let to = (from + 9_999).min(last);
            let r = one
                .read(from, to, false)
                .await
                .with_context(|| format!("reading {from}..={to} from {e}"))?;
            for entry in r.entries {
                got.insert(entry.position, entry.data.to_vec());
            }
            from = to + 1;
        }
        for (p, data) in acked {
            if got.get(p) != Some(data) {
                bail!("replica at {e} does not hold acknowledged position {p}");
            }
        }
    }
    Ok(())
}
