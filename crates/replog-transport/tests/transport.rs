//! Transports on real tonic servers on 127.0.0.1 ephemeral ports. Nothing
//! here depends on timing beyond "eventually" waits with a 10 s deadline.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::Registry;
use replog_proto::replica::replica_transport_client::ReplicaTransportClient;
use replog_proto::storage::ReplicaStatus;
use replog_transport::{
    envelope::Body, Envelope, PeerStats, RecoverRequest, RecoverResponse, ServeHandle, Transport,
    TransportConfig, TransportError,
};
use tonic::metadata::MetadataValue;

const DEADLINE: Duration = Duration::from_secs(10);

struct Node {
    transport: Transport,
    inbound: crossbeam_channel::Receiver<Envelope>,
    registry: Registry,
    addr: SocketAddr,
    server: Option<ServeHandle>,
}

fn config(cluster: &str, id: u64) -> TransportConfig {
    let mut cfg = TransportConfig::new(cluster, id);
    // Fast retries keep the tests short; correctness never depends on them.
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn transport(
    cfg: TransportConfig,
    inbound_capacity: usize,
) -> (Transport, crossbeam_channel::Receiver<Envelope>, Registry) {
    init_tracing();
    let (tx, rx) = crossbeam_channel::bounded(inbound_capacity);
    let registry = Registry::new();
    let t = Transport::new(cfg, tx, &registry).expect("transport");
    (t, rx, registry)
}

async fn node(cfg: TransportConfig) -> Node {
    let (transport, inbound, registry) = transport(cfg, 10_000);
    let (addr, server) = transport
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .expect("serve");
    Node {
        transport,
        inbound,
        registry,
        addr,
        server: Some(server),
    }
}

/// A free port on 127.0.0.1 with nothing listening on it (yet).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn body(kind: u64, seq: u64) -> Body {
    match kind % 3 {
        0 => Body::Raft(Bytes::from(seq.to_be_bytes().to_vec())),
        1 => Body::RecoverRequest(RecoverRequest {
            status: ReplicaStatus::Voting as i32,
            last_index: seq,
            incarnation: seq ^ 0x5a5a,
        }),
        _ => Body::RecoverResponse(RecoverResponse {
            status: ReplicaStatus::Recovering as i32,
            term: 7,
            leader: 1,
            commit: seq,
        }),
    }
}

fn seq_of(env: &Envelope) -> u64 {
    match env.body.as_ref().expect("body") {
        Body::Raft(b) => u64::from_be_bytes(b.as_ref().try_into().expect("8 bytes")),
        Body::RecoverRequest(r) => r.last_index,
        Body::RecoverResponse(r) => r.commit,
    }
}

fn env(to: u64, seq: u64) -> Envelope {
    Envelope {
        cluster_id: String::new(), // filled in by send
        from: 0,                   // filled in by send
        to,
        body: Some(body(seq, seq)),
    }
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives exactly `n` envelopes (within the deadline).
async fn receive(rx: &crossbeam_channel::Receiver<Envelope>, n: usize) -> Vec<Envelope> {
    let mut got = Vec::new();
    eventually(&format!("{n} envelopes"), || {
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        got.len() >= n
    })
    .await;
    assert_eq!(got.len(), n, "more envelopes than expected");
    got
}

fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

fn stats(t: &Transport, id: u64) -> PeerStats {
    t.peer_stats()
        .into_iter()
        .find(|p| p.id == id)
        .expect("peer configured")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_exchange_envelopes_in_order() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(node(config("red", id)).await);
    }
    for a in &nodes {
        for b in &nodes {
            if a.transport.replica_id() != b.transport.replica_id() {
                a.transport
                    .set_peer(b.transport.replica_id(), b.addr.to_string());
            }
        }
    }
    const N: u64 = 300;
    // Replica 3 sends from plain threads: send needs no runtime context.
    let mut threads = Vec::new();
    for a in &nodes {
        for b in &nodes {
            let (from, to) = (a.transport.replica_id(), b.transport.replica_id());
            if from == to {
                continue;
            }
            let t = a.transport.clone();
            let run = move || {
                for seq in 0..N {
                    t.send(env(to, seq)).expect("send");
                }
            };
            if from == 3 {
                threads.push(std::thread::spawn(run));
            } else {
                run();
            }
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    for b in &nodes {
        let me = b.transport.replica_id();
        let got = receive(&b.inbound, 2 * N as usize).await;
        let mut by_sender: HashMap<u64, Vec<&Envelope>> = HashMap::new();
        for e in &got {
            assert_eq!(e.cluster_id, "red");
            assert_eq!(e.to, me);
            by_sender.entry(e.from).or_default().push(e);
        }
        assert_eq!(by_sender.len(), 2, "replica {me} hears from both others");
        for (from, envs) in by_sender {
            let seqs: Vec<u64> = envs.iter().map(|e| seq_of(e)).collect();
            assert_eq!(
                seqs,
                (0..N).collect::<Vec<_>>(),
                "order from {from} to {me}"
            );
            for e in envs {
                assert_eq!(
                    e.body,
                    Some(body(seq_of(e), seq_of(e))),
                    "each body kind intact"
                );
            }
            let from_label = from.to_string();
            assert_eq!(
                metric(
                    &b.registry,
                    "replog_transport_received_messages_total",
                    &[("peer", &from_label)]
                ),
                N as f64
            );
        }
    }
    for a in &nodes {
        for p in a.transport.peer_stats() {
            assert_eq!(
                p.sent,
                N,
                "sent from {} to {}",
                a.transport.replica_id(),
                p.id
            );
            assert_eq!(p.received, N);
            assert_eq!(p.dropped, 0);
            assert!(p.last_sent.is_some() && p.last_received.is_some());
        }
    }
    eventually("all connected", || {
        nodes
            .iter()
            .all(|n| n.transport.peer_stats().iter().all(|p| p.connected))
    })
    .await;
    for n in &mut nodes {
        n.server
            .take()
            .unwrap()
            .shutdown()
            .await
            .expect("clean shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_cluster_is_refused() {
    let red = node(config("red", 1)).await;
    let blue = node(config("blue", 4).with_peers([(1, red.addr.to_string())])).await;
    for seq in 0..10 {
        blue.transport.send(env(1, seq)).expect("queued");
    }
    eventually("refusal counted on the receiver", || {
        metric(
            &red.registry,
            "replog_transport_refused_connections_total",
            &[("reason", "cluster_id")],
        ) >= 1.0
    })
    .await;
    eventually("refusal visible on the sender", || {
        stats(&blue.transport, 1).last_error.is_some_and(|e| {
            e.contains(
                "replica 4 belongs to cluster 'blue', this is replica 1 of cluster 'red'; refusing",
            )
        })
    })
    .await;
    eventually("refusal counted on the sender", || {
        metric(
            &blue.registry,
            "replog_transport_refused_by_peer_total",
            &[("peer", "1")],
        ) >= 1.0
    })
    .await;
    let s = stats(&blue.transport, 1);
    assert!(!s.connected, "a refused peer is not connected: {s:?}");
    assert!(red.inbound.try_recv().is_err(), "nothing delivered");
    assert_eq!(
        metric(
            &red.registry,
            "replog_transport_received_messages_total",
            &[]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_replica_id_is_refused() {
    let one = node(config("red", 1)).await;
    // Replica 2 believes replica 3 lives at replica 1's address.
    let two = node(config("red", 2).with_peers([(3, one.addr.to_string())])).await;
    two.transport.send(env(3, 0)).expect("queued");
    eventually("refusal counted", || {
        metric(
            &one.registry,
            "replog_transport_refused_connections_total",
            &[("reason", "replica_id")],
        ) >= 1.0
    })
    .await;
    eventually("refusal visible on the sender", || {
        stats(&two.transport, 3)
            .last_error
            .is_some_and(|e| e.contains("addressed replica 3, but this is replica 1"))
    })
    .await;
    assert!(one.inbound.try_recv().is_err(), "nothing delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_envelope_is_refused_on_send() {
    let mut cfg = config("red", 1).with_peers([(2, free_addr().to_string())]);
    cfg.max_message_bytes = 1024;
    let (t, _rx, registry) = transport(cfg, 16);
    let big = Envelope {
        to: 2,
        body: Some(Body::Raft(Bytes::from(vec![7u8; 2000]))),
        ..Default::default()
    };
    match t.send(big) {
        Err(
            e @ TransportError::MessageTooLarge {
                to: 2,
                size,
                limit: 1024,
            },
        ) => {
            assert!(size > 2000);
            let msg = e.to_string();
            assert!(
                msg.contains(&size.to_string()) && msg.contains("1024"),
                "{msg}"
            );
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert_eq!(stats(&t, 2).dropped, 1);
    assert_eq!(
        metric(
            &registry,
            "replog_transport_dropped_messages_total",
            &[("peer", "2"), ("reason", "too_large")]
        ),
        1.0
    );
    assert!(matches!(
        t.send(env(9, 0)),
        Err(TransportError::UnknownPeer(9))
    ));
    let foreign = Envelope {
        cluster_id: "blue".into(),
        ..env(2, 0)
    };
    assert!(matches!(
        t.send(foreign),
        Err(TransportError::ForeignEnvelope { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn down_peer_queues_then_receives_and_restarted_peer_is_reconnected() {
    let b_addr = free_addr();
    let mut cfg = config("red", 1).with_peers([(2, b_addr.to_string())]);
    cfg.peer_queue_capacity = 8;
    let (a, _a_rx, a_registry) = transport(cfg, 16);

    // Peer 2 is down: 8 envelopes queue, the rest are dropped and counted.
    for seq in 0..20 {
        let r = a.send(env(2, seq));
        if seq < 8 {
            r.expect("queued");
        } else {
            assert!(
                matches!(
                    r,
                    Err(TransportError::QueueFull {
                        peer: 2,
                        capacity: 8
                    })
                ),
                "{r:?}"
            );
        }
    }
    assert_eq!(stats(&a, 2).dropped, 12);
    assert_eq!(
        metric(
            &a_registry,
            "replog_transport_dropped_messages_total",
            &[("reason", "queue_full")]
        ),
        12.0
    );
    eventually("connection error recorded", || {
        stats(&a, 2)
            .last_error
            .is_some_and(|e| e.contains("cannot connect"))
    })
    .await;

    // Peer 2 starts: the queued envelopes arrive, in order.
    let (b, b_rx, _b_registry) = transport(config("red", 2), 100);
    let (_, b_server) = b.serve(b_addr).await.expect("serve on the reserved port");
    let got = receive(&b_rx, 8).await;
    assert_eq!(
        got.iter().map(seq_of).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    eventually("connected", || stats(&a, 2).connected).await;
    let s = stats(&a, 2);
    assert!(s.reconnects >= 1, "{s:?}");
    assert_eq!(s.last_error, None);

    // Peer 2 stops; once a's reconnection attempts fail, envelopes queue.
    b_server.shutdown().await.expect("shutdown");
    drop(b);
    eventually("disconnected and failing", || {
        let s = stats(&a, 2);
        !s.connected && s.last_error.is_some_and(|e| e.contains("cannot connect"))
    })
    .await;
    for seq in 100..105 {
        a.send(env(2, seq)).expect("queued");
    }

    // Peer 2 restarts on the same port (a new process, say): a reconnects.
    let (b2, b2_rx, _b2_registry) = transport(config("red", 2), 100);
    let (_, _b2_server) = b2.serve(b_addr).await.expect("rebind the same port");
    let got = receive(&b2_rx, 5).await;
    assert_eq!(
        got.iter().map(seq_of).collect::<Vec<_>>(),
        (100..105).collect::<Vec<_>>()
    );
    eventually("connected again", || stats(&a, 2).connected).await;
    assert!(
        metric(
            &a_registry,
            "replog_transport_reconnects_total",
            &[("peer", "2")]
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changed_address_is_used() {
    let two = node(config("red", 2)).await;
    let (one, _rx, _reg) = transport(
        config("red", 1).with_peers([(2, free_addr().to_string())]),
        16,
    );
    one.send(env(2, 1)).expect("queued");
    eventually("first address fails", || {
        stats(&one, 2).last_error.is_some()
    })
    .await;
    one.set_peer(2, two.addr.to_string());
    let got = receive(&two.inbound, 1).await;
    assert_eq!(seq_of(&got[0]), 1);
    one.remove_peer(2);
    assert!(one.peer_stats().is_empty());
    assert!(matches!(
        one.send(env(2, 2)),
        Err(TransportError::UnknownPeer(2))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_inbound_channel_drops_and_counts() {
    let (b, b_rx, b_registry) = transport(config("red", 2), 2);
    let (b_addr, _server) = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (a, _a_rx, _a_reg) = transport(config("red", 1).with_peers([(2, b_addr.to_string())]), 16);
    for seq in 0..10 {
        a.send(env(2, seq)).expect("queued");
    }
    eventually("2 accepted, 8 dropped", || {
        metric(
            &b_registry,
            "replog_transport_received_messages_total",
            &[("peer", "1")],
        ) == 2.0
            && metric(
                &b_registry,
                "replog_transport_dropped_messages_total",
                &[("peer", "1")],
            ) == 8.0
    })
    .await;
    assert_eq!(
        metric(
            &b_registry,
            "replog_transport_dropped_messages_total",
            &[("peer", "1"), ("reason", "inbound_full")]
        ),
        8.0
    );
    // b has no configured peers; the inbound counters are per remote id.
    assert!(b.peer_stats().is_empty());
    assert_eq!(b_rx.len(), 2);
}

/// A hand-made client: headers and envelopes the transport would never send.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_checks_headers_and_every_envelope() {
    let mut cfg = config("red", 1);
    cfg.max_message_bytes = 1024;
    let one = node(cfg).await;
    let mut client = ReplicaTransportClient::connect(format!("http://{}", one.addr))
        .await
        .unwrap();
    let request = |envs: Vec<Envelope>, headers: &[(&'static str, &str)]| {
        let mut r = tonic::Request::new(tokio_stream::iter(envs));
        for (k, v) in headers {
            r.metadata_mut()
                .insert(*k, MetadataValue::try_from(*v).unwrap());
        }
        r
    };
    let good_headers = [
        ("replog-cluster-id", "red"),
        ("replog-from", "5"),
        ("replog-to", "1"),
    ];
    let ok = |seq| Envelope {
        cluster_id: "red".into(),
        from: 5,
        to: 1,
        body: Some(body(seq, seq)),
    };

    // Missing / malformed headers.
    let err = client.stream(request(vec![ok(0)], &[])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let bad = [
        ("replog-cluster-id", "red"),
        ("replog-from", "five"),
        ("replog-to", "1"),
    ];
    let err = client.stream(request(vec![ok(0)], &bad)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        metric(
            &one.registry,
            "replog_transport_refused_connections_total",
            &[("reason", "headers")]
        ),
        2.0
    );

    // Envelopes disagreeing with the headers are dropped, the rest accepted.
    let envs = vec![
        ok(1),
        Envelope { from: 6, ..ok(2) },
        Envelope {
            cluster_id: "blue".into(),
            ..ok(3)
        },
        Envelope { to: 2, ..ok(4) },
        Envelope {
            body: None,
            ..ok(5)
        },
        ok(6),
    ];
    let summary = client
        .stream(request(envs, &good_headers))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 2);
    let got = receive(&one.inbound, 2).await;
    assert_eq!(got.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 6]);
    assert_eq!(
        metric(
            &one.registry,
            "replog_transport_dropped_messages_total",
            &[("peer", "5"), ("reason", "header_mismatch")]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &one.registry,
            "replog_transport_dropped_messages_total",
            &[("peer", "5"), ("reason", "no_body")]
        ),
        1.0
    );

    // Over the receiver's limit: dropped, counted, the stream ends.
    let big = Envelope {
        body: Some(Body::Raft(Bytes::from(vec![1u8; 4096]))),
        ..ok(7)
    };
    let err = client
        .stream(request(vec![big], &good_headers))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert_eq!(
        metric(
            &one.registry,
            "replog_transport_dropped_messages_total",
            &[("peer", "5"), ("reason", "too_large")]
        ),
        1.0
    );
    assert!(one.inbound.try_recv().is_err());
}

#[test]
fn invalid_configurations_are_rejected() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, _rx) = crossbeam_channel::bounded(1);
    let registry = Registry::new();
    let try_new = |cfg: TransportConfig| {
        Transport::with_runtime(cfg, tx.clone(), &registry, rt.handle().clone())
    };
    let mut cfg = config("red", 1);
    cfg.peer_queue_capacity = 0;
    assert!(matches!(try_new(cfg), Err(TransportError::Config(_))));
    assert!(matches!(
        try_new(config("", 1)),
        Err(TransportError::Config(_))
    ));
    assert!(matches!(
        try_new(config("rot\u{e9}", 1)),
        Err(TransportError::Config(_))
    ));
    assert!(matches!(
        try_new(config("red", 0)),
        Err(TransportError::Config(_))
    ));
    assert!(matches!(
        try_new(config("red", 1).with_peers([(2, "not an address/at all")])),
        Err(TransportError::Config(_))
    ));
    // Outside a runtime, `new` says so instead of panicking.
    assert!(matches!(
        Transport::new(config("red", 1), tx.clone(), &registry),
        Err(TransportError::NoRuntime)
    ));
    // The metrics register once per registry.
    let _t = try_new(config("red", 1)).expect("valid");
    assert!(matches!(
        try_new(config("red", 1)),
        Err(TransportError::Metrics(_))
    ));
}
