//! A flood on a real node: 2,000 idle connections plus 12,000 calls
//! at once. The node stays up, answers health checks, serves what it
//! admits and refuses the excess at once with RESOURCE_EXHAUSTED (marked
//! retry-safe) instead of queuing it.

mod common;

use std::time::Duration;

use common::{TestCluster, http_get, serial};
use nines::limits::CLIENT_CALLS_IN_FLIGHT_MAX;
use nines_proto::metadata;
use nines_proto::v1::PutRequest;
use nines_proto::v1::kv_client::KvClient;
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Connections the flood spreads its calls over, and calls on each.
const FLOOD_CONNECTIONS: usize = 24;
const CALLS_PER_CONNECTION: usize = 500;
const IDLE_CONNECTIONS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_call_flood_get_refusals_not_a_queue() {
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let leader = cluster.wait_leader().await;
    // Serving writes (the leader has proposed the region's setup) before
    // the flood: every failure below is then the flood's.
    cluster.client().put("before", "flood").await.expect("a put before the flood");
    let node = &cluster.nodes[&leader];
    let url = node.grpc();

    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(node.config.grpc_listen).await.expect("idle connection"));
    }

    let calls = FLOOD_CONNECTIONS * CALLS_PER_CONNECTION;
    assert!(calls > 2 * CLIENT_CALLS_IN_FLIGHT_MAX, "the flood must exceed the node's budget");
    let mut flood = tokio::task::JoinSet::new();
    for c in 0..FLOOD_CONNECTIONS {
        let channel = Endpoint::from_shared(url.clone()).unwrap().connect().await.expect("connect");
        for i in 0..CALLS_PER_CONNECTION {
            let mut kv = KvClient::new(channel.clone());
            flood.spawn(async move {
                let put =
                    PutRequest { key: format!("flood-{c}-{i}").into_bytes(), value: b"v".to_vec(), session: None };
                tokio::time::timeout(Duration::from_secs(60), kv.put(put)).await.expect("a call hung").map(|_| ())
            });
        }
    }

    // While the flood is on: health checks answer, on gRPC and HTTP.
    let health_channel = Endpoint::from_shared(url.clone()).unwrap().connect().await.expect("health connection");
    let mut health = HealthClient::new(health_channel);
    let check = tokio::time::timeout(Duration::from_secs(10), health.check(HealthCheckRequest::default()))
        .await
        .expect("the health check hung");
    assert!(check.is_ok(), "gRPC health during the flood: {check:?}");
    let (code, text) = http_get(&format!("http://{}/health/live", node.config.admin_listen)).await;
    assert_eq!(code, 200, "liveness during the flood: {text}");

    let (mut ok, mut shed) = (0, 0);
    while let Some(r) = flood.join_next().await {
        match r.expect("flood task") {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.metadata().get(metadata::RETRY_SAFE).is_some(), "a shed call is marked retry-safe: {s:?}");
                assert!(s.message().contains("CLIENT_CALLS_IN_FLIGHT_MAX"), "{s:?}");
                shed += 1;
            }
            Err(s) => panic!("a flood call failed otherwise: {s:?}"),
        }
    }
    eprintln!("flood of {calls} calls over {IDLE_CONNECTIONS} idle connections: {ok} served, {shed} refused");
    assert!(shed > 0, "nothing was refused: the node queued all {calls} calls");
    assert!(ok >= CLIENT_CALLS_IN_FLIGHT_MAX, "the node served only {ok} of the flood");

    // Afterwards the node serves as before, idle connections still open.
    cluster.client().put("after", "flood").await.expect("a put after the flood");
    assert_eq!(idle.len(), IDLE_CONNECTIONS);
    let (code, _) = http_get(&format!("http://{}/health/ready", node.config.admin_listen)).await;
    assert_eq!(code, 200, "ready after the flood");
}
