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
    c.log.tick_interval = Duration::from_millis(20);
    c.ping_timeout = Duration::from_millis(200);
    c
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
    let members: Vec<Member> = addrs
        .iter()
        .map(|(id, a)| Member {
            id: *id,
            address: a.to_string(),
        })
        .collect();
    let mut servers = BTreeMap::new();
    for id in 1..=3u64 {
        let dir = tmp.path().join(format!("r{id}"));
        RocksStorage::initialize(
            &dir,
            &InitOptions {
                cluster_id: "blue".into(),
                replica_id: id,
                members: members.clone(),
            },
        )
        .unwrap();
        servers.insert(
            id,
            ReplicaServer::start(config(&dir, "blue", id, &addrs))
                .await
                .unwrap(),
        );
    }
    let endpoints: Vec<String> = addrs.values().map(|a| a.to_string()).collect();
    let client = Client::new(&endpoints);
    let leader = client.leader().await.unwrap();

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
                    && f.get_metric().iter().any(|m| m.get_counter().get_value() > 0.0)
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
