//! A cluster of real `replog replica` processes, each in its own network
//! namespace (see [`crate::netns`]), all on port [`PORT`] of their own
//! address. Replicas are founded with `replog initialize` and started with
//! `--log info`; each one's stdout and stderr go to `rN.log` in the
//! cluster's directory, with a harness line before every start, kill,
//! pause and wipe. Dropping the cluster SIGKILLs every replica (printing
//! the tails of their logs when the thread is panicking), then removes the
//! namespaces.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replog_client::{Client, ClientConfig, StatusResponse};
use tracing::info;

use crate::netns::{NetError, Network};

/// The port every replica serves peers and clients on (each has its own
/// address, so they never collide).
pub const PORT: u16 = 7100;

/// Replica statuses as the status RPC reports them.
pub const EMPTY: i32 = 1;
pub const RECOVERING: i32 = 3;
pub const VOTING: i32 = 4;

/// The name of a replica status number.
pub fn status_name(s: i32) -> &'static str {
    match s {
        EMPTY => "EMPTY",
        2 => "STARTING",
        RECOVERING => "RECOVERING",
        VOTING => "VOTING",
        _ => "UNKNOWN",
    }
}

/// What starting or driving the cluster can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{bin} is missing: build it with `cargo build -p replog-cli --bin replog` (same CARGO_TARGET_DIR) or set REPLOG_BIN")]
    MissingBinary { bin: PathBuf },
    #[error("replog initialize of replica {id} failed: {output}")]
    Initialize { id: u64, output: String },
    #[error("timed out after {timeout_s} s waiting for {what}")]
    Timeout { what: String, timeout_s: u64 },
    #[error("replica {id} exited by itself with {status}")]
    Exited { id: u64, status: String },
    #[error("replica {id}: {what}")]
    State { id: u64, what: String },
    #[error(transparent)]
    Repair(#[from] crate::repair::RepairError),
}

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Replica ids are 1..=replicas.
    pub replicas: u64,
    /// Run the scheduler-state store (`--state`).
    pub state: bool,
    /// The `replog` binary.
    pub bin: PathBuf,
    /// More `replog replica` flags.
    pub flags: Vec<String>,
    /// Environment of the replica processes (every other `REPLOG_*`
    /// variable of this process is removed).
    pub env: Vec<(String, String)>,
    /// Where the data directories and logs go (a temporary directory when
    /// `None`, removed on drop).
    pub dir: Option<PathBuf>,
}

impl ClusterConfig {
    /// `replicas` replicas of the `replog` binary [`replog_bin`] finds;
    /// `REPLOG_INJECT_BUG` is handed to them when it is set here.
    pub fn new(replicas: u64) -> Result<ClusterConfig, ClusterError> {
        Ok(ClusterConfig::with_bin(replicas, replog_bin()?))
    }

    /// Like [`ClusterConfig::new`] with the binary `bin`.
    pub fn with_bin(replicas: u64, bin: PathBuf) -> ClusterConfig {
        let env = std::env::var("REPLOG_INJECT_BUG")
            .map(|v| vec![("REPLOG_INJECT_BUG".to_string(), v)])
            .unwrap_or_default();
        ClusterConfig {
            replicas,
            state: false,
            bin,
            flags: Vec::new(),
            env,
            dir: None,
        }
    }
}

/// The `replog` binary: `REPLOG_BIN`, else `replog` next to this
/// executable's directory (`<target>/<profile>/deps/x` or
/// `<target>/<profile>/x`).
pub fn replog_bin() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os("REPLOG_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("replog");
    if !bin.exists() {
        return Err(ClusterError::MissingBinary { bin });
    }
    Ok(bin)
}

struct Replica {
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// How many times its data directory was wiped.
    wipes: u32,
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Replica processes in namespaces. See the module docs.
pub struct Cluster {
    config: ClusterConfig,
    cluster_id: String,
    replicas: Mutex<BTreeMap<u64, Replica>>,
    root: PathBuf,
    /// Keeps a temporary root alive; `None` when the caller gave a
    /// directory.
    _tmp: Option<tempfile::TempDir>,
    status_client: Client,
    started: Instant,
    net: Network,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        for r in replicas.values_mut() {
            if let Some(mut child) = r.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (id, r) in replicas.iter() {
                eprintln!(
                    "\n===== tail of replica {id}'s log {} =====\n{}",
                    r.log.display(),
                    tail(&r.log, 60)
                );
            }
        }
    }
}

impl Cluster {
    /// Creates the namespaces, founds the log with `replog initialize` on
    /// every replica, starts them and waits for a leader.
    pub async fn start(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        if !config.bin.exists() {
            return Err(ClusterError::MissingBinary {
                bin: config.bin.clone(),
            });
        }
        let ids: Vec<u64> = (1..=config.replicas).collect();
        let net = Network::create(&ids)?;
        let (root, tmp) = match &config.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let replicas = ids
            .iter()
            .map(|&id| {
                let r = Replica {
                    dir: root.join(format!("r{id}")),
                    log: root.join(format!("r{id}.log")),
                    child: None,
                    paused: false,
                    wipes: 0,
                };
                (id, r)
            })
            .collect();
        let cluster = Cluster {
            cluster_id: format!("faults-{}", net.bridge()),
            config,
            replicas: Mutex::new(replicas),
            root,
            _tmp: tmp,
            status_client: Client::with_config(
                Vec::<String>::new(),
                ClientConfig {
                    connect_timeout: Duration::from_millis(500),
                    request_timeout: Duration::from_secs(2),
                    max_attempts: 1,
                    ..Default::default()
                },
            ),
            started: Instant::now(),
            net,
        };
        for &id in &ids {
            cluster.initialize(id)?;
        }
        for &id in &ids {
            cluster.start_replica(id)?;
        }
        cluster
            .wait("a first leader", Duration::from_secs(60), async || {
                cluster.leader().await.map(|_| ())
            })
            .await?;
        Ok(cluster)
    }

    pub fn net(&self) -> &Network {
        &self.net
    }

    pub fn ids(&self) -> Vec<u64> {
        self.net.nodes().to_vec()
    }

    /// The directory holding the data directories and logs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Seconds since the cluster was created (the clock of every note).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `host:port` of replica `id`.
    pub fn endpoint(&self, id: u64) -> String {
        format!("{}:{PORT}", self.net.node_addr(id))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.ids().into_iter().map(|id| self.endpoint(id)).collect()
    }

    /// The data directory of replica `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.replicas.lock().unwrap()[&id].dir.clone()
    }

    /// The log file of replica `id`.
    pub fn log_file(&self, id: u64) -> PathBuf {
        self.replicas.lock().unwrap()[&id].log.clone()
    }

    /// How often replica `id` was wiped.
    pub fn wipes(&self, id: u64) -> u32 {
        self.replicas.lock().unwrap()[&id].wipes
    }

    /// Writes a harness line into replica `id`'s log.
    fn mark(&self, log: &Path, what: &str) -> Result<(), ClusterError> {
        let mut f = OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(
            f,
            "===== [{:.3}s] fault harness: {what}",
            self.started.elapsed().as_secs_f64()
        )?;
        Ok(())
    }

    fn clean_command(&self, mut cmd: Command) -> Command {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REPLOG_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.config.env {
            cmd.env(k, v);
        }
        cmd.env("NO_COLOR", "1").stdin(Stdio::null());
        cmd
    }

    fn members_flag(&self) -> String {
        self.ids()
            .into_iter()
            .map(|id| format!("{id}={}", self.endpoint(id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn initialize(&self, id: u64) -> Result<(), ClusterError> {
        let dir = self.data_dir(id);
        let mut cmd = self.clean_command(Command::new(&self.config.bin));
        cmd.arg("initialize")
            .arg("--path")
            .arg(&dir)
            .args(["--cluster-id", &self.cluster_id])
            .args(["--replica-id", &id.to_string()])
            .args(["--members", &self.members_flag()]);
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(ClusterError::Initialize {
                id,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    fn replica_args(&self, id: u64, dir: &Path) -> Vec<String> {
        let peers: Vec<String> = self
            .ids()
            .into_iter()
            .filter(|p| *p != id)
            .map(|p| format!("{p}={}", self.endpoint(p)))
            .collect();
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--log".into(),
            "info".into(),
            "--path".into(),
            dir.to_string_lossy().into_owned(),
            "--listen".into(),
            self.endpoint(id),
            "--cluster-id".into(),
            self.cluster_id.clone(),
            "--replica-id".into(),
            id.to_string(),
            "--tick-interval".into(),
            "20ms".into(),
            "--ping-timeout".into(),
            "500ms".into(),
            "--peers".into(),
            peers.join(","),
        ];
        if self.config.state {
            args.push("--state".into());
        }
        args.extend(self.config.flags.iter().cloned());
        args
    }

    /// Starts replica `id` in its namespace on its data directory (a
    /// missing one starts EMPTY and rejoins by itself).
    pub fn start_replica(&self, id: u64) -> Result<(), ClusterError> {
        let mut replicas = self.replicas.lock().unwrap();
        let r = replicas.get_mut(&id).expect("a replica of this cluster");
        if r.child.is_some() {
            return Err(ClusterError::State {
                id,
                what: "already running".into(),
            });
        }
        let args = self.replica_args(id, &r.dir);
        self.mark(&r.log, &format!("starting replog {}", args.join(" ")))?;
        let file = OpenOptions::new().append(true).open(&r.log)?;
        let mut cmd = self.clean_command(self.net.command(id, &self.config.bin));
        cmd.args(&args).stdout(file.try_clone()?).stderr(file);
        r.child = Some(cmd.spawn()?);
        r.paused = false;
        info!(id, "started replica");
        Ok(())
    }

    /// SIGKILLs replica `id` and reaps it (a paused one too).
    pub fn kill(&self, id: u64) -> Result<(), ClusterError> {
        let mut replicas = self.replicas.lock().unwrap();
        let r = replicas.get_mut(&id).expect("a replica of this cluster");
        let Some(mut child) = r.child.take() else {
            return Err(ClusterError::State {
                id,
                what: "not running".into(),
            });
        };
        child.kill()?; // SIGKILL on Unix; it also ends a stopped process
        let status = child.wait()?;
        r.paused = false;
        self.mark(&r.log, &format!("SIGKILLed ({status})"))?;
        info!(id, "SIGKILLed replica");
        Ok(())
    }

    fn signal(&self, id: u64, sig: i32, paused: bool) -> Result<(), ClusterError> {
        let mut replicas = self.replicas.lock().unwrap();
        let r = replicas.get_mut(&id).expect("a replica of this cluster");
        let Some(child) = r.child.as_ref() else {
            return Err(ClusterError::State {
                id,
                what: "not running".into(),
            });
        };
        // SAFETY: kill has no memory preconditions; the pid is our child's
        // and not yet reaped.
        if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        r.paused = paused;
        let what = if paused { "SIGSTOPped" } else { "SIGCONTed" };
        self.mark(&r.log, what)?;
        Ok(())
    }

    /// SIGSTOPs replica `id`.
    pub fn pause(&self, id: u64) -> Result<(), ClusterError> {
        self.signal(id, libc::SIGSTOP, true)
    }

    /// SIGCONTs replica `id`.
    pub fn resume(&self, id: u64) -> Result<(), ClusterError> {
        self.signal(id, libc::SIGCONT, false)
    }

    /// Kills replica `id` if it runs and removes its data directory.
    pub fn wipe(&self, id: u64) -> Result<(), ClusterError> {
        if self.is_running(id) {
            self.kill(id)?;
        }
        let mut replicas = self.replicas.lock().unwrap();
        let r = replicas.get_mut(&id).expect("a replica of this cluster");
        match std::fs::remove_dir_all(&r.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        r.wipes += 1;
        self.mark(&r.log, "wiped the data directory")?;
        info!(id, "wiped replica");
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.replicas.lock().unwrap()[&id].child.is_some()
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.replicas.lock().unwrap()[&id].paused
    }

    /// Running replicas (paused ones included).
    pub fn running(&self) -> Vec<u64> {
        let replicas = self.replicas.lock().unwrap();
        replicas
            .iter()
            .filter(|(_, r)| r.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Fails when a replica process exited by itself.
    pub fn check_alive(&self) -> Result<(), ClusterError> {
        let mut replicas = self.replicas.lock().unwrap();
        for (id, r) in replicas.iter_mut() {
            if let Some(child) = r.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    r.child = None;
                    return Err(ClusterError::Exited {
                        id: *id,
                        status: status.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Replica `id`'s status, if it answers.
    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.status_client.status_of(&self.endpoint(id)).await.ok()
    }

    /// The unpaused running replica that leads in the highest term.
    pub async fn leader(&self) -> Option<(u64, StatusResponse)> {
        let mut best: Option<(u64, StatusResponse)> = None;
        for id in self.running() {
            if self.is_paused(id) {
                continue;
            }
            if let Some(s) = self.status(id).await {
                if s.is_leader
                    && s.status == VOTING
                    && best.as_ref().is_none_or(|b| b.1.term < s.term)
                {
                    best = Some((id, s));
                }
            }
        }
        best
    }

    /// Polls `f` every 20 ms until it gives a value; fails after `timeout`
    /// or when a replica process dies.
    pub async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> Result<T, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Some(v) = f().await {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    what: what.to_string(),
                    timeout_s: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client of every replica, for the workload.
    pub fn client(&self, request_timeout: Duration) -> Client {
        Client::with_config(
            self.endpoints(),
            ClientConfig {
                connect_timeout: Duration::from_millis(500),
                request_timeout,
                max_attempts: 6,
                backoff_min: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
                retry_deadline: None,
            },
        )
    }

    /// A client of replica `id` alone (local reads of its committed view).
    pub fn client_of(&self, id: u64, request_timeout: Duration) -> Client {
        Client::with_config(
            [self.endpoint(id)],
            ClientConfig {
                connect_timeout: Duration::from_millis(500),
                request_timeout,
                max_attempts: 1,
                ..Default::default()
            },
        )
    }
}
