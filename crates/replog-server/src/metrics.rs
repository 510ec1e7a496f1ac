//! The replica's Prometheus metrics, and the HTTP port that serves them
//! (`GET /metrics` on [`crate::ServerConfig::metrics_listen`]) with the
//! repair admin API (`POST /repair`, `POST /repair/{cancel,pause,resume,
//! reset}`, `GET /repairs`; see [`crate::repair`]) and the probes:
//! - `GET /livez`: 200 while the replica runs (503 once it stopped on a
//!   fatal error: its process should be restarted);
//! - `GET /readyz`: 200 when the replica is ready by the rule of
//!   [`crate::health`] (VOTING, a leader known, caught up, not stopped),
//!   the same rule the gRPC port's `grpc.health.v1` service answers; else
//!   503 with the reason.
//!
//! The transport's and the backups' counters live in the server's
//! registry; the replica's state (status, term, positions, members, the
//! state store's counters) is read at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use replog_log::{Log, ReplicaStatus};
use replog_store::SchedulerStore;
use tokio::task::JoinHandle;
use tracing::error;

use crate::ServerError;

/// What a scrape reads.
pub(crate) struct Metrics {
    pub(crate) log: Arc<Log>,
    pub(crate) registry: prometheus::Registry,
    pub(crate) store: Option<Arc<SchedulerStore>>,
    pub(crate) repairs: Arc<crate::repair::Repairs>,
}

impl Metrics {
    /// The metrics in the Prometheus text format, read now.
    pub(crate) async fn text(&self) -> String {
        use prometheus::Encoder;
        let scrape = prometheus::Registry::new();
        self.replica_gauges(&scrape);
        if let Ok(cs) = self.log.cluster_status().await {
            member_gauges(&scrape, &cs.members);
        }
        if let Some(store) = &self.store {
            store_metrics(&scrape, store);
        }
        let mut families = self.registry.gather();
        families.extend(scrape.gather());
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The replica's status, term and positions.
    fn replica_gauges(&self, scrape: &prometheus::Registry) {
        let gauge = |name: &str, help: &str, v: i64| register_gauge(scrape, name, help, v);
        let p = self.log.progress();
        let status = match p.status {
            ReplicaStatus::Empty => 1,
            ReplicaStatus::Starting => 2,
            ReplicaStatus::Recovering => 3,
            ReplicaStatus::Voting => 4,
        };
        gauge(
            "replog_replica_status",
            "1 EMPTY, 2 STARTING, 3 RECOVERING, 4 VOTING",
            status,
        );
        gauge("replog_raft_term", "current Raft term", p.term as i64);
        gauge(
            "replog_is_leader",
            "1 when this replica leads",
            p.is_leader as i64,
        );
        gauge(
            "replog_commit_position",
            "last committed position applied here",
            p.applied as i64,
        );
        gauge(
            "replog_first_position",
            "first position not truncated",
            p.first_index as i64,
        );
        gauge(
            "replog_last_position",
            "last position written here",
            p.last_index as i64,
        );
    }
}

fn routes(metrics: Arc<Metrics>) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    let m = metrics.clone();
    let probes = metrics.clone();
    let ready = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = m.clone();
                async move { metrics.text().await }
            }),
        )
        .route(
            "/livez",
            get(move || {
                let m = probes.clone();
                async move {
                    match m.log.failure() {
                        None => (StatusCode::OK, "ok\n".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("stopped: {why}\n")),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let m = ready.clone();
                async move {
                    match crate::health::not_ready(&m.log) {
                        None => (StatusCode::OK, "ready\n".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                    }
                }
            }),
        )
        .route(
            "/repairs",
            get(|State(m): State<Arc<Metrics>>, headers: HeaderMap| async move {
                admin(&m, "list", &[], &headers).await
            }),
        )
        .route(
            "/repair",
            post(|State(m): State<Arc<Metrics>>, headers: HeaderMap, body: axum::body::Bytes| async move {
                admin(&m, "report", &body, &headers).await
            }),
        )
        .route(
            "/repair/{op}",
            post(
                |State(m): State<Arc<Metrics>>,
                 Path(op): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    match op.as_str() {
                        "cancel" | "pause" | "resume" | "reset" => admin(&m, &op, &body, &headers).await,
                        _ => json_answer(404, br#"{"error":"no such repair operation"}"#.to_vec()),
                    }
                },
            ),
        )
        .layer(axum::extract::DefaultBodyLimit::max(4 * crate::repair::intake::MAX_BODY_BYTES))
        .with_state(metrics)
}

/// One admin request through [`crate::repair::Repairs::handle`].
async fn admin(
    m: &Metrics,
    op: &str,
    body: &[u8],
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = crate::repair::intake::bearer(auth);
    let (status, body) = m.repairs.handle(op, body, token, false).await;
    json_answer(status, body)
}

fn json_answer(status: u16, body: Vec<u8>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Serves the HTTP port on `addr` until `stopping` turns true; returns
/// the task and the address bound (the real port when `addr`'s is 0).
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(JoinHandle<()>, SocketAddr), ServerError> {
    let app = routes(metrics);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        let stopped = async move {
            while !*stopping.borrow_and_update() {
                if stopping.changed().await.is_err() {
                    return;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            error!(error = %e, "the metrics server stopped");
        }
    });
    Ok((task, bound))
}

fn register_gauge(scrape: &prometheus::Registry, name: &str, help: &str, v: i64) {
    let g = prometheus::IntGauge::new(name, help).expect("valid metric name");
    g.set(v);
    scrape.register(Box::new(g)).expect("registered once");
}

/// Reachability and lag of every member (lag on the leader only).
fn member_gauges(scrape: &prometheus::Registry, members: &[replog_log::MemberStatus]) {
    use prometheus::{GaugeVec, Opts};

    let reachable = GaugeVec::new(
        Opts::new(
            "replog_member_reachable",
            "1 while a member answers within --ping-timeout x --max-ping-timeouts",
        ),
        &["member"],
    )
    .expect("valid metric");
    let lag = GaugeVec::new(
        Opts::new(
            "replog_member_lag_positions",
            "positions a member is behind the commit (leader only)",
        ),
        &["member"],
    )
    .expect("valid metric");
    for m in members {
        let id = m.id.to_string();
        reachable
            .with_label_values(&[&id])
            .set(m.reachable as i64 as f64);
        lag.with_label_values(&[&id]).set(m.lag as f64);
    }
    scrape
        .register(Box::new(reachable))
        .expect("registered once");
    scrape.register(Box::new(lag)).expect("registered once");
}

/// Snapshots and compaction of the state log (replog_store::store).
fn store_metrics(scrape: &prometheus::Registry, store: &SchedulerStore) {
    // Snapshots and compaction of the state log (replog_store::store).
    let counter = |name: &str, help: &str, v: u64| {
        let c = prometheus::IntCounter::new(name, help).expect("valid metric name");
        c.inc_by(v);
        scrape.register(Box::new(c)).expect("registered once");
    };
    counter(
        "replog_state_compactions_total",
        "log truncations this replica proposed as leader after flushing its state",
        store.compactions(),
    );
    counter(
                "replog_state_aborted_framed_writes_total",
                "framed writes (a transaction or a state replacement over several entries) that never completed and were skipped",
                store.aborted_writes(),
            );
    counter(
                "replog_state_snapshot_catch_ups_total",
                "state snapshots this replica installed from a peer (its state was behind the log's beginning)",
                store.snapshot_catch_ups(),
            );
    let stopped = prometheus::IntGauge::new(
                "replog_state_applier_stopped",
                "1 when this replica's state applier stopped (a record of a newer state schema, a storage error: see its log); its state no longer follows the log",
            )
            .expect("valid metric name");
    stopped.set(store.watch_applied().borrow().failure.is_some() as i64);
    scrape.register(Box::new(stopped)).expect("registered once");
}
