//! Three replica servers in one process on 127.0.0.1, real RocksDB
//! directories, real gRPC between them, driven through the Rust client.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use replog_client::{Client, ClientError};
use replog_server::{ReplicaServer, ServerConfig};
use replog_storage::{InitOptions, Member, RocksStorage};

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(
    dir: &std::path::Path,
    cluster: &str,
    id: u64,
    addrs: &BTreeMap<u64, SocketAddr>,
) -> ServerConfig {
    let mut c = ServerConfig::new(dir, addrs[&id], cluster, id);
    c.peers = addrs
        .iter()
        .filter(|(p, _)| **p != id)
        .map(|(p, a)| (*p, a.to_string()))
        .collect();
    c.log.tick_interval = Duration::from_millis(50);
    c.ping_timeout = Duration::from_millis(200);
    c
}

/// Founds the log of a cluster of `addrs` in `root/r<id>` for every id
/// (what `replog initialize` does); returns the data directories.
fn initialize_all(
    root: &std::path::Path,
    cluster: &str,
    addrs: &BTreeMap<u64, SocketAddr>,
) -> BTreeMap<u64, std::path::PathBuf> {
    let members: Vec<Member> = addrs
        .iter()
        .map(|(id, a)| Member {
            id: *id,
            address: a.to_string(),
        })
        .collect();
    let mut dirs = BTreeMap::new();
    for id in addrs.keys() {
        let dir = root.join(format!("r{id}"));
        RocksStorage::initialize(
            &dir,
            &InitOptions {
                cluster_id: cluster.into(),
                replica_id: *id,
                members: members.clone(),
            },
        )
        .unwrap();
        dirs.insert(*id, dir);
    }
    dirs
}

/// Appends, writing again when a leader change left the outcome unknown
/// (fine here: these tests count positions, not payloads).
async fn append(client: &Client, data: &[u8]) -> u64 {
    loop {
        match client.append(data.to_vec()).await {
            Ok(r) => return r.position,
            Err(ClientError::OutcomeUnknown { .. }) | Err(ClientError::NoLeader { .. }) => continue,
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_serves_clients_and_refuses_another_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_port())).collect();
    let dirs = initialize_all(tmp.path(), "blue", &addrs);
    let mut servers = BTreeMap::new();
    for (id, dir) in &dirs {
        servers.insert(
            *id,
            ReplicaServer::start(config(dir, "blue", *id, &addrs))
                .await
                .unwrap(),
        );
    }
    let endpoints: Vec<String> = addrs.values().map(|a| a.to_string()).collect();
    let client = Client::new(&endpoints);
    let leader = client.leader().await.unwrap();
    let mut watch = client.watch_leadership(&leader).await.unwrap();
    let first = watch.message().await.unwrap().unwrap();
    assert!(first.is_writer, "{first:?}");
    assert_eq!(first.leader_address, leader);

    // Writes through any endpoint reach the leader.
    let mut positions = Vec::new();
    for i in 0..20u32 {
        let r = client.append(format!("e{i}").into_bytes()).await.unwrap();
        positions.push(r.position);
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let first = positions[0];
    let last = *positions.last().unwrap();
    let read = client.read(first, last, true).await.unwrap();
    assert_eq!(read.entries.len(), 20);
    assert_eq!(read.entries[3].data.as_ref(), b"e3");

    // A follower refuses writes and names the leader.
    let follower = endpoints.iter().find(|e| **e != leader).unwrap().clone();
    let direct = Client::with_config(
        [follower.clone()],
        replog_client::ClientConfig {
            max_attempts: 1,
            ..Default::default()
        },
    );
    match direct.append(&b"x"[..]).await {
        Err(ClientError::NoLeader { last, .. }) => {
            assert!(last.contains("not the leader"), "{last}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Status of every replica: one leader, everyone VOTING and caught up.
    eventually("every replica to apply the writes", || {
        let client = client.clone();
        async move {
            client
                .status_all()
                .await
                .into_iter()
                .all(|(_, s)| s.is_ok_and(|s| s.applied >= last))
        }
    })
    .await;
    let all = client.status_all().await;
    assert_eq!(
        all.iter()
            .filter(|(_, s)| s.as_ref().unwrap().is_leader)
            .count(),
        1
    );
    let leader_status = client.status_of(&leader).await.unwrap();
    assert_eq!(leader_status.members.len(), 3);
    assert!(leader_status.members.iter().all(|m| m.voter && m.reachable));

    // A replica of another cluster is refused by every replica.
    let red_dir = tmp.path().join("red");
    let red_addr = free_port();
    let mut red_addrs = addrs.clone();
    red_addrs.insert(4, red_addr);
    let mut red_cfg = config(&red_dir, "red", 4, &red_addrs);
    red_cfg.peers.retain(|id, _| *id != 4);
    let red = ReplicaServer::start(red_cfg).await.unwrap();
    eventually("the foreign replica to be refused", || {
        let reg = servers[&1].registry().clone();
        async move {
            reg.gather().iter().any(|f| {
                f.name() == "replog_transport_refused_connections_total"
                    && f.get_metric()
                        .iter()
                        .any(|m| m.get_counter().get_value() > 0.0)
            })
        }
    })
    .await;
    assert_eq!(
        red.log().progress().status,
        replog_storage::ReplicaStatus::Empty,
        "a replica of another cluster never joins"
    );
    let after = client.append(&b"still-serving"[..]).await.unwrap();
    assert!(after.position > last);
    drop(red);
    for (_, s) in servers {
        s.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncation_is_replicated_and_a_lagging_replica_catches_up_by_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_port())).collect();
    let dirs = initialize_all(tmp.path(), "trunc", &addrs);
    let mut servers = BTreeMap::new();
    for id in 1..=3u64 {
        servers.insert(
            id,
            ReplicaServer::start(config(&dirs[&id], "trunc", id, &addrs))
                .await
                .unwrap(),
        );
    }
    let endpoints: Vec<String> = addrs.values().map(|a| a.to_string()).collect();
    let client = Client::new(&endpoints);
    let leader_endpoint = client.leader().await.unwrap();
    let leader = client.status_of(&leader_endpoint).await.unwrap().replica_id;
    let lagging = (1..=3u64).find(|id| *id != leader).unwrap();
    let payload = vec![7u8; 1024];
    for _ in 0..200 {
        append(&client, &payload).await;
    }
    // One follower stops; the others go on and truncate past its log.
    servers.remove(&lagging).unwrap().shutdown().await.unwrap();
    let mut last = 0;
    for _ in 0..300 {
        last = append(&client, &payload).await;
    }
    let cut = last - 50;
    client.truncate(cut).await.unwrap();
    let live: Vec<String> = endpoints
        .iter()
        .filter(|e| **e != addrs[&lagging].to_string())
        .cloned()
        .collect();
    eventually("the live replicas to truncate", || {
        let client = client.clone();
        let live = live.clone();
        async move {
            let mut all = true;
            for e in &live {
                all &= client
                    .status_of(e)
                    .await
                    .is_ok_and(|s| s.first_index == cut);
            }
            all
        }
    })
    .await;
    let err = client.read(cut - 10, cut, false).await.unwrap_err();
    assert_eq!(err.code(), Some("TRUNCATED"), "{err}");

    // The lagging replica comes back behind the truncation point: it gets a
    // snapshot, then the tail.
    servers.insert(
        lagging,
        ReplicaServer::start(config(&dirs[&lagging], "trunc", lagging, &addrs))
            .await
            .unwrap(),
    );
    let lag_endpoint = addrs[&lagging].to_string();
    let after = client
        .append(&b"after-truncate"[..])
        .await
        .unwrap()
        .position;
    eventually("the lagging replica to catch up", || {
        let client = client.clone();
        let e = lag_endpoint.clone();
        async move {
            client
                .status_of(&e)
                .await
                .is_ok_and(|s| s.applied >= after && s.first_index == cut)
        }
    })
    .await;
    let only = Client::new([lag_endpoint.clone()]);
    let r = only.read(cut, after, false).await.unwrap();
    assert_eq!(r.entries.first().unwrap().position, cut);
    assert_eq!(r.entries.last().unwrap().data.as_ref(), b"after-truncate");
    assert_eq!(
        r.entries.len() as u64,
        after - cut + 1 - 1,
        "every position but the truncation entry"
    );
    for (_, s) in servers {
        s.shutdown().await.unwrap();
    }
}

/// `GET /metrics` is served by the server itself on `metrics_listen`, and
/// stops with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_its_metrics_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = [(1, free_port())].into();
    let dirs = initialize_all(dir.path(), "m", &addrs);
    let mut cfg = config(&dirs[&1], "m", 1, &addrs);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = ReplicaServer::start(cfg).await.unwrap();
    let addr = server.metrics_addr().expect("metrics are served");
    let get = || async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        Ok::<String, std::io::Error>(body)
    };
    let body = get().await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("replog_replica_status 4"), "{body}");
    server.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(get().await.is_err(), "still serving after shutdown");
}

/// The standard gRPC health service on the replica port: a replica with no
/// leader is NOT_SERVING, SERVING once its cluster has one, NOT_SERVING
/// again when it loses it; a watch sees each change; unknown service names
/// are refused as the protocol asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_grpc_health_service_follows_readiness() {
    use replog_proto::health::health_check_response::ServingStatus;
    use replog_proto::health::health_client::HealthClient;
    use replog_proto::health::HealthCheckRequest;
    let tmp = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=2).map(|i| (i, free_port())).collect();
    let dirs = initialize_all(tmp.path(), "h", &addrs);
    let one = ReplicaServer::start(config(&dirs[&1], "h", 1, &addrs))
        .await
        .unwrap();
    let mut health = HealthClient::connect(format!("http://{}", addrs[&1]))
        .await
        .unwrap();
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;

    // Alone, one of two voters has no leader: not serving.
    let r = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(r.status, not_serving);
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, not_serving);

    // With its peer, a leader is elected: serving, and the watch says so.
    let two = ReplicaServer::start(config(&dirs[&2], "h", 2, &addrs))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch reports the change")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, serving);
    for service in [
        "",
        "replog.client.v1.ReplogClient",
        "replog.replica.v1.ReplicaTransport",
    ] {
        let r = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status, serving, "{service:?}");
    }

    // Unknown names: NOT_FOUND from Check, SERVICE_UNKNOWN from Watch.
    let e = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = health
        .check(check("replog.store.v1.SchedulerState"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "no state store here: {e}");
    let mut unknown = health
        .watch(check("no.such.Service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unknown.message().await.unwrap().unwrap().status,
        ServingStatus::ServiceUnknown as i32
    );

    // The peer goes: the quorum is lost, the leader steps down, and the
    // watch reports not serving again.
    two.shutdown().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch reports the loss")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, not_serving);
    let r = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(r.status, not_serving);
    one.shutdown().await.unwrap();
}

/// The rules of a configuration, refused before anything is touched.
#[test]
fn invalid_configurations_are_refused_with_the_flag_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base = || ServerConfig::new(dir.path(), free_port(), "v", 1);
    let with_state = || {
        let mut c = base();
        c.state = Some(replog_server::StoreOptions::default());
        c
    };
    let mut own_peer = base();
    own_peer.peers.insert(1, "x:1".into());
    let mut backups_without_state = base();
    backups_without_state.backup_dir = Some("/b".into());
    let mut zero_interval = with_state();
    zero_interval.backup_dir = Some("/b".into());
    zero_interval.backup_interval = Duration::ZERO;
    let mut tiny_entries = with_state();
    tiny_entries.set_max_entry_bytes(512);
    let mut log_below_state = with_state();
    log_below_state.log.max_entry_bytes = 1024 * 1024;
    let mut tiny_raw_entries = base();
    tiny_raw_entries.set_max_entry_bytes(1000);
    let mut derived = with_state();
    derived.set_max_entry_bytes(4096);
    let rows: Vec<(&str, ServerConfig, Option<&str>)> = vec![
        ("defaults", base(), None),
        ("defaults with the state store", with_state(), None),
        ("the log's limit derived from the state's", derived, None),
        (
            "its own id among the peers",
            own_peer,
            Some("--peers lists this replica's own id 1"),
        ),
        (
            "backups without the state",
            backups_without_state,
            Some("--backup-dir /b needs --state"),
        ),
        (
            "backups every 0 s",
            zero_interval,
            Some("--backup-interval must be more than zero"),
        ),
        (
            "entries under 1 KiB",
            tiny_entries,
            Some("--max-entry-size must be at least 1024 bytes"),
        ),
        (
            "a log limit below the state's framing",
            log_below_state,
            Some("below the state's"),
        ),
    ];
    for (what, config, want) in rows {
        match (config.validate(), want) {
            (Ok(()), None) => {}
            (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{what}: {e}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}
