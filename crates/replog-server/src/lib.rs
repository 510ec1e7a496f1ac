//! The replica server of replog: one replica of a cluster, with its peer
//! transport (`replog.replica.v1.ReplicaTransport`) and the client API
//! (`replog.client.v1.ReplogClient`) served on one gRPC port.
//!
//! It is what `replog replica` runs, and what a scheduler embeds to run a
//! replica of a multi-replica cluster in its own process: [`ReplicaServer::log`]
//! gives the embedded [`Log`] (writer, reader, leadership watch) next to the
//! served API.
//!
//! Invariants:
//! - a data directory that is missing or empty becomes an EMPTY replica of
//!   the configured cluster (it never founds a log by itself: that takes
//!   `replog initialize` or `--auto-initialize` with the two-phase rule);
//! - an existing directory of another cluster or replica id is refused
//!   before anything is served;
//! - every request is bounded (message size limits on both services,
//!   a bounded inbound queue, the log's in-flight limit).

mod backups;
mod catch_up;
pub mod health;
mod metrics;
pub mod repair;
mod service;
mod state_service;

pub use backups::{BackupConfig, DEFAULT_BACKUP_INTERVAL, DEFAULT_MAX_SAVED_BACKUPS};

pub use repair::RepairOptions;
pub use state_service::StateService;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use replog_log::{ClusterOptions, Envelope, Log, LogError, LogOptions, PeerLink, ReplicaStatus};
use replog_storage::{InitOptions, Member, RocksStorage, StorageError};
pub use replog_store::StoreOptions;
use replog_store::{SchedulerStore, Staging, StagingError, StoreError};
use replog_transport::{Transport, TransportConfig, TransportError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use service::ClientService;

/// The smallest entry limit a server takes (`--max-entry-size`).
pub const MIN_MAX_ENTRY_BYTES: usize = 1024;

/// Largest client request or response (a read of many entries included).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Everything a replica server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub path: PathBuf,
    pub listen: SocketAddr,
    /// The address other replicas and clients reach this one at (defaults
    /// to `listen`).
    pub advertise: Option<String>,
    pub cluster_id: String,
    pub replica_id: u64,
    /// The other replicas: id -> host:port.
    pub peers: BTreeMap<u64, String>,
    pub auto_initialize: bool,
    pub log: LogOptions,
    pub ping_timeout: Duration,
    pub max_ping_timeouts: u32,
    /// Largest envelope between replicas.
    pub max_message_bytes: usize,
    /// Run the scheduler-state store on the log and serve its API
    /// (`replog.store.v1.SchedulerState`). Its log then holds only store
    /// records: do not append raw entries to it.
    pub state: Option<StoreOptions>,
    /// Take scheduled backups of the state into this directory (needs
    /// [`Self::state`]); only the leader takes them (see the `backups`
    /// module's docs).
    pub backup_dir: Option<PathBuf>,
    /// How often a backup is taken (default 1h).
    pub backup_interval: Duration,
    /// Newest backups kept in [`Self::backup_dir`] (default 48).
    pub max_saved_backups: usize,
    /// Serve HTTP on this address: Prometheus metrics (`GET /metrics`),
    /// the repair admin API (`POST /repair...`, `GET /repairs`) and the
    /// probes (`GET /livez`, `GET /readyz`).
    pub metrics_listen: Option<SocketAddr>,
    /// The failure detector and the repair coordinator (by default: the
    /// detector's defaults, `listen` mode, no repairs).
    pub repair: RepairOptions,
}

impl ServerConfig {
    /// A configuration with defaults for everything but the identity.
    pub fn new(
        path: impl Into<PathBuf>,
        listen: SocketAddr,
        cluster_id: &str,
        replica_id: u64,
    ) -> Self {
        ServerConfig {
            path: path.into(),
            listen,
            advertise: None,
            cluster_id: cluster_id.to_string(),
            replica_id,
            peers: BTreeMap::new(),
            auto_initialize: false,
            log: LogOptions::default(),
            ping_timeout: Duration::from_secs(15),
            max_ping_timeouts: 5,
            max_message_bytes: 16 * 1024 * 1024,
            state: None,
            backup_dir: None,
            backup_interval: DEFAULT_BACKUP_INTERVAL,
            max_saved_backups: DEFAULT_MAX_SAVED_BACKUPS,
            metrics_listen: None,
            repair: RepairOptions::default(),
        }
    }

    /// Sets the largest entry: with the state store on, the largest state
    /// transaction ([`StoreOptions::max_entry_bytes`]), and the log's limit
    /// derived from it (the log takes the store's records whole: the same
    /// limit plus room for the records' own framing). Call it after
    /// [`Self::state`] is set.
    pub fn set_max_entry_bytes(&mut self, max_entry_bytes: usize) {
        if let Some(state) = &mut self.state {
            state.max_entry_bytes = max_entry_bytes;
        }
        self.log.max_entry_bytes = max_entry_bytes + replog_store::record::PART_OVERHEAD;
    }

    /// The rules a configuration must follow; [`ReplicaServer::start`]
    /// refuses one that breaks them, before it touches the data directory.
    /// The messages name the `replog replica` flags.
    pub fn validate(&self) -> Result<(), ServerError> {
        let refuse = |why: String| Err(ServerError::Config(why));
        if self.peers.contains_key(&self.replica_id) {
            return refuse(format!(
                "--peers lists this replica's own id {}; list only the other replicas",
                self.replica_id
            ));
        }
        if let (None, Some(dir)) = (&self.state, &self.backup_dir) {
            return refuse(format!(
                "--backup-dir {} needs --state: the server backs up the scheduler state, \
                 which runs only with --state",
                dir.display()
            ));
        }
        if self.backup_dir.is_some() && self.backup_interval.is_zero() {
            return refuse("--backup-interval must be more than zero".into());
        }
        if let Some(state) = &self.state {
            if state.max_entry_bytes < MIN_MAX_ENTRY_BYTES {
                return refuse(format!(
                    "--max-entry-size must be at least {MIN_MAX_ENTRY_BYTES} bytes"
                ));
            }
            let needed = state.max_entry_bytes + replog_store::record::PART_OVERHEAD;
            if self.log.max_entry_bytes < needed {
                return refuse(format!(
                    "the log's entry limit ({} bytes) is below the state's ({} bytes) plus the \
                     records' framing ({needed} bytes): set both with set_max_entry_bytes",
                    self.log.max_entry_bytes, state.max_entry_bytes
                ));
            }
        } else if self.log.max_entry_bytes
            < MIN_MAX_ENTRY_BYTES + replog_store::record::PART_OVERHEAD
        {
            // What `set_max_entry_bytes` makes of a limit under the minimum.
            return refuse(format!(
                "--max-entry-size must be at least {MIN_MAX_ENTRY_BYTES} bytes"
            ));
        }
        let (voters, members) = self.initial_membership();
        self.repair
            .config
            .check(voters, &members)
            .map_err(|e| ServerError::Config(e.to_string()))?;
        Ok(())
    }

    /// The voters and member ids the configuration names: this replica and
    /// its `--peers` (the membership a cluster starts with).
    fn initial_membership(&self) -> (usize, Vec<u64>) {
        let mut members: Vec<u64> = self.peers.keys().copied().collect();
        members.push(self.replica_id);
        (members.len(), members)
    }

    fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot serve on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// The transport as the log's [`PeerLink`].
struct TransportLink(Transport);

impl PeerLink for TransportLink {
    fn send(&self, envelope: Envelope) {
        if let Err(e) = self.0.send(envelope) {
            // Loss is tolerated (Raft resends); the transport counts it.
            debug!(error = %e, "envelope not queued");
        }
    }

    fn set_peer(&self, id: u64, address: String) {
        info!(replica = id, %address, "learned a replica's address from a membership change");
        self.0.set_peer(id, address);
    }
}

/// A running replica server. Dropping it (or [`ReplicaServer::shutdown`])
/// stops serving and closes the replica.
pub struct ReplicaServer {
    log: Arc<Log>,
    transport: Transport,
    local_addr: SocketAddr,
    registry: prometheus::Registry,
    metrics: Arc<metrics::Metrics>,
    /// The `/metrics` HTTP task, when [`ServerConfig::metrics_listen`] is set.
    metrics_http: Option<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    stopping: tokio::sync::watch::Sender<bool>,
    serving: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    store: Option<Arc<SchedulerStore>>,
    /// The scheduled-backup task, when [`ServerConfig::backup_dir`] is set.
    backups: Option<JoinHandle<()>>,
    repairs: Arc<repair::Repairs>,
    /// The repair coordinator's rounds (they act only while leading).
    repair_rounds: Option<JoinHandle<()>>,
}

/// A data directory that is missing or empty becomes an EMPTY replica of
/// the configured cluster, knowing where every member listens.
fn create_empty_replica_if_new(config: &ServerConfig) -> Result<(), ServerError> {
    if !is_empty_dir(&config.path)? {
        return Ok(());
    }
    let mut members: Vec<Member> = config
        .peers
        .iter()
        .map(|(id, address)| Member {
            id: *id,
            address: address.clone(),
        })
        .collect();
    members.push(Member {
        id: config.replica_id,
        address: config.advertised(),
    });
    RocksStorage::create_empty(
        &config.path,
        &InitOptions {
            cluster_id: config.cluster_id.clone(),
            replica_id: config.replica_id,
            members,
        },
    )?;
    info!(path = %config.path.display(), "created an EMPTY replica; it joins its cluster through the recover protocol");
    Ok(())
}

/// The peer transport and the replica's log on it; refuses a directory
/// that holds another replica.
async fn open_replica(
    config: &ServerConfig,
    registry: &prometheus::Registry,
) -> Result<(Transport, Arc<Log>), ServerError> {
    let (inbound_tx, inbound_rx) = crossbeam_channel::bounded(8192);
    let tcfg = TransportConfig {
        max_message_bytes: config.max_message_bytes,
        ..TransportConfig::new(config.cluster_id.clone(), config.replica_id)
            .with_peers(config.peers.iter().map(|(id, a)| (*id, a.clone())))
    };
    let transport = Transport::new(tcfg, inbound_tx, registry)?;
    let mut log_opts = config.log.clone();
    log_opts.expected_cluster_id = Some(config.cluster_id.clone());
    if config.state.is_some() {
        SchedulerStore::register_column_families(&mut log_opts);
    }
    let cluster = ClusterOptions {
        peers: config.peers.clone(),
        auto_initialize: config.auto_initialize,
        ping_timeout: config.ping_timeout,
        max_ping_timeouts: config.max_ping_timeouts,
    };
    let path = config.path.clone();
    let link: Arc<dyn PeerLink> = Arc::new(TransportLink(transport.clone()));
    let log = tokio::task::spawn_blocking(move || {
        Log::open_replica(&path, log_opts, cluster, link, inbound_rx)
    })
    .await
    .map_err(|e| ServerError::Config(format!("opening the replica panicked: {e}")))??;
    let meta = log.meta();
    if meta.replica_id != config.replica_id {
        return Err(ServerError::Config(format!(
            "{} holds replica {}, not replica {}",
            config.path.display(),
            meta.replica_id,
            config.replica_id
        )));
    }
    Ok((transport, Arc::new(log)))
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The scheduler-state store on `log`, catching up from peers, with this
/// replica's staging area (and the auto-commit of a backup the log was
/// founded from).
fn open_store(
    log: &Arc<Log>,
    opts: &StoreOptions,
) -> Result<(Arc<SchedulerStore>, Arc<Staging>), ServerError> {
    let staging = Staging::for_log(log)
        .map_err(|e| ServerError::Config(format!("cannot open the staging area: {e}")))?;
    let staging = Arc::new(staging);
    let source: Arc<dyn replog_store::SnapshotSource> =
        Arc::new(catch_up::PeerSnapshots::new(log.clone()));
    let store = SchedulerStore::open_with(
        log.clone(),
        opts.clone(),
        Some(source),
        Some(staging.clone()),
    )
    .map_err(|e| ServerError::Config(format!("cannot open the state store: {e}")))?;
    let store = Arc::new(store);
    spawn_auto_commit(store.clone(), staging.clone());
    Ok((store, staging))
}

/// The scheduled-backup task into `dir`, with its metrics.
fn spawn_backups(
    config: &ServerConfig,
    store: &Arc<SchedulerStore>,
    dir: &Path,
    registry: &prometheus::Registry,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    let metrics = backups::BackupMetrics::register(registry)
        .map_err(|e| ServerError::Config(format!("cannot register the backup metrics: {e}")))?;
    Ok(backups::spawn(
        store.clone(),
        BackupConfig {
            dir: dir.to_path_buf(),
            interval: config.backup_interval,
            max_saved: config.max_saved_backups,
        },
        metrics,
        stopping,
    ))
}

/// How long a graceful shutdown waits for open calls before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// True when `dir` is missing or holds nothing.
fn is_empty_dir(dir: &Path) -> Result<bool, ServerError> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(StorageError::Io {
            path: dir.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// Commits a backup staged by `replog initialize --from-backup` as soon as
/// this replica leads (it founded the log alone, so it leads at once).
fn spawn_auto_commit(store: Arc<SchedulerStore>, staging: Arc<Staging>) {
    let staged = match staging.staged() {
        Ok(Some(s)) if s.auto_commit() => s,
        Ok(_) => return,
        Err(e) => {
            warn!(error = %e, "cannot read the staging area");
            return;
        }
    };
    tokio::spawn(async move {
        let mut progress = store.log().watch_progress();
        loop {
            if progress.borrow_and_update().leader_ready {
                match store.commit_restored(&staging).await {
                    Ok(position) => {
                        info!(
                            position,
                            backup_cluster = %staged.header.cluster_id,
                            backup_position = staged.header.position,
                            "committed the restored backup through the log"
                        );
                        return;
                    }
                    Err(StoreError::Staging(StagingError::NothingStaged)) => {
                        // An earlier attempt's replacement got through.
                        info!("the restored backup was committed through the log");
                        return;
                    }
                    Err(e) => warn!(error = %e, "committing the restored backup failed; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    });
}

impl ReplicaServer {
    /// Opens (or creates EMPTY) the replica and serves it. Must be called
    /// inside a tokio runtime.
    pub async fn start(config: ServerConfig) -> Result<ReplicaServer, ServerError> {
        config.validate()?;
        create_empty_replica_if_new(&config)?;
        let registry = prometheus::Registry::new();
        let (transport, log) = open_replica(&config, &registry).await?;
        let status = log.meta().status;
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let (voters, members) = config.initial_membership();
        let repairs = repair::Repairs::new(
            log.clone(),
            config.repair.clone(),
            voters,
            &members,
            &registry,
        )
        .map_err(ServerError::Config)?;
        let repair_rounds = repairs.spawn(stopping_tx.subscribe());
        let client = ClientService::new(log.clone(), stopping_rx).with_repairs(repairs.clone());
        let client = if config.state.is_some() {
            client.for_state_log()
        } else {
            client
        };
        let listener = bind(config.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let (store, staging) = match &config.state {
            Some(opts) => {
                let (store, staging) = open_store(&log, opts)?;
                (Some(store), Some(staging))
            }
            None => (None, None),
        };
        let backups = match (&store, &config.backup_dir) {
            (Some(store), Some(dir)) => Some(spawn_backups(
                &config,
                store,
                dir,
                &registry,
                stopping_tx.subscribe(),
            )?),
            _ => None,
        };
        let mut served = vec![
            "replog.replica.v1.ReplicaTransport",
            "replog.client.v1.ReplogClient",
        ];
        if store.is_some() {
            served.push("replog.store.v1.SchedulerState");
        }
        let health = health::HealthService::new(log.clone(), served);
        let router = replog_transport::server_builder()
            .add_service(transport.service())
            .add_service(client.into_server())
            .add_service(health.into_server())
            .add_optional_service(
                store
                    .clone()
                    .zip(staging)
                    .map(|(s, st)| StateService::new(s, st).into_server()),
            );
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let serving = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
        });
        info!(
            replica = config.replica_id,
            cluster = %config.cluster_id,
            listen = %local_addr,
            %status,
            "replica server is serving"
        );
        let metrics = Arc::new(metrics::Metrics {
            log: log.clone(),
            registry: registry.clone(),
            store: store.clone(),
            repairs: repairs.clone(),
        });
        let (metrics_http, metrics_addr) = match config.metrics_listen {
            Some(addr) => {
                let (task, bound) =
                    metrics::serve(addr, metrics.clone(), stopping_tx.subscribe()).await?;
                info!(listen = %bound, "serving metrics on /metrics");
                (Some(task), Some(bound))
            }
            None => (None, None),
        };
        Ok(ReplicaServer {
            log,
            transport,
            local_addr,
            registry,
            metrics,
            metrics_http,
            metrics_addr,
            stop: Some(stop_tx),
            stopping: stopping_tx,
            serving: Some(serving),
            store,
            backups,
            repairs,
            repair_rounds: Some(repair_rounds),
        })
    }

    /// The embedded log (writer, reader, leadership watch).
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The health checks and the repair coordinator.
    pub fn repairs(&self) -> &Arc<repair::Repairs> {
        &self.repairs
    }

    /// The scheduler-state store, when the server runs one
    /// ([`ServerConfig::state`]).
    pub fn store(&self) -> Option<&Arc<SchedulerStore>> {
        self.store.as_ref()
    }

    /// Where the server listens (the real port when configured with 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Prometheus registry of this replica's metrics.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// The replica's metrics in the Prometheus text format: the transport's
    /// counters and the replica's state, read now (what `GET /metrics`
    /// serves on [`ServerConfig::metrics_listen`]).
    pub async fn metrics_text(&self) -> String {
        self.metrics.text().await
    }

    /// Where `/metrics` is served, when [`ServerConfig::metrics_listen`] is
    /// set (the real port when configured with 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until the replica is VOTING, or `timeout` passes
    /// (`--recovery-timeout`).
    pub async fn wait_voting(&self, timeout: Duration) -> Result<(), ReplicaStatus> {
        let mut rx = self.log.watch_progress();
        let wait = async {
            loop {
                if rx.borrow_and_update().status == ReplicaStatus::Voting {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(true) => Ok(()),
            _ => Err(self.log.progress().status),
        }
    }

    /// Stops serving, closes the peer streams and the replica.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop_serving().await
    }

    async fn stop_serving(&mut self) -> Result<(), ServerError> {
        if let Some(store) = &self.store {
            store.close();
        }
        self.transport.close();
        let _ = self.stopping.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut serving) = self.serving.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await {
                Ok(Ok(Err(source))) => {
                    return Err(ServerError::Serve {
                        addr: self.local_addr,
                        source,
                    })
                }
                Ok(_) => {}
                Err(_) => {
                    warn!("calls still open after {SHUTDOWN_GRACE:?}; dropping them");
                    serving.abort();
                }
            }
        }
        if let Some(mut metrics_http) = self.metrics_http.take() {
            // It saw `stopping`; open scrapes get the grace too.
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut metrics_http)
                .await
                .is_err()
            {
                metrics_http.abort();
            }
        }
        if let Some(mut backups) = self.backups.take() {
            // It saw `stopping` and cancels a backup under way.
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut backups)
                .await
                .is_err()
            {
                warn!("the backup task is still running after {SHUTDOWN_GRACE:?}; dropping it");
                backups.abort();
            }
        }
        if let Some(rounds) = self.repair_rounds.take() {
            // It saw `stopping`; a repair command under way is left to its
            // own task (its outcome is recorded by a later leader as unknown).
            rounds.abort();
        }
        Ok(())
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.transport.close();
        let _ = self.stopping.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
