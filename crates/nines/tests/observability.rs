//! What operators look at: probes, gRPC health and reflection, metrics,
//! logs, the status page, `nines health`, and graceful shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestCluster, http_get, serial, wait_for};
use nines::config::Mode;

fn admin(cluster: &TestCluster, id: u64) -> String {
    format!("http://{}", cluster.nodes[&id].config.admin_listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_separate_liveness_from_readiness_and_nines_health_exits_accordingly() {
    // Shows: a node cut off from its majority stays live (200) but turns not
    // ready (503, has_leader false), and `nines health` exits 0 and 1 to match.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(3, |_| {}).await;
    let (code, body) = http_get(&format!("{}/health/ready", admin(&cluster, 1))).await;
    assert_eq!(code, 200, "{body}");
    for check in ["has_leader", "member", "applied", "region_role"] {
        assert!(body.contains(check), "readiness names the {check} check: {body}");
    }
    cluster.kill(2);
    cluster.kill(3);
    let body = wait_for("node 1 to turn not ready", Duration::from_secs(30), || async {
        let (code, body) = http_get(&format!("{}/readyz", admin(&cluster, 1))).await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("\"has_leader\":{\"leader\":null,\"ok\":false"), "{body}");
    let (code, _) = http_get(&format!("{}/health/live", admin(&cluster, 1))).await;
    assert_eq!(code, 200, "liveness must not depend on a leader");
    let (code, _) = http_get(&format!("{}/livez", admin(&cluster, 1))).await;
    assert_eq!(code, 200);
    let unreachable = format!("http://127.0.0.1:{}/health/live", common::free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_nines")).args(["health", &unreachable]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "an unreachable probe exits 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reflection_and_metrics_are_served() {
    // Shows: the standard gRPC health service answers SERVING for the node
    // and the client API, reflection lists the nines services, and /metrics
    // has the documented metrics after some traffic.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 1), ("b", 1)], Mode::ActiveActive, |_| {}).await;
    let c = cluster.region_client("a");
    for i in 0..20 {
        c.put(format!("k{i}"), "v").await.unwrap();
    }
    let grpc = cluster.nodes[&1].grpc();
    let channel = tonic::transport::Endpoint::from_shared(grpc).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "nines.v1.Kv"] {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["nines.v1.Kv", "nines.v1.Admin", "nines.v1.RegionAdmin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "reflection lists {want}: {names:?}");
    }
    let metrics = wait_for("metrics with replication lag", Duration::from_secs(20), || async {
        let (code, body) = http_get(&format!("{}/metrics", admin(&cluster, 1))).await;
        (code == 200 && body.contains("nines_replication_lag_entries")).then_some(body)
    })
    .await;
    for name in [
        "nines_raft_has_leader 1",
        "nines_raft_is_leader 1",
        "nines_raft_term",
        "nines_raft_leader_changes_seen_total",
        "nines_raft_applied_index",
        "nines_raft_commit_index",
        "nines_proposals_committed_total",
        "nines_proposal_duration_seconds_bucket",
        "nines_log_fsync_duration_seconds_bucket",
        "nines_grpc_requests_total{method=\"Put\",code=\"OK\"} 20",
        "nines_grpc_request_duration_seconds_bucket",
        "nines_storage_bytes",
        "nines_replication_lag_seconds{from=\"a\",to=\"b\"}",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_node_region_and_az_on_every_line() {
    // Shows: with log_format = "json", every line of a node is JSON and
    // carries its node id, region and AZ, including openraft's own lines.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(3, |c| c.log_format = "json".into()).await;
    cluster.client().put("k", "v").await.unwrap();
    cluster.stop(2);
    let log = cluster.log_of(2);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = v["spans"].as_array().map(|a| a.to_vec()).unwrap_or_default();
        let node = spans.iter().chain(std::iter::once(&v["span"])).find(|s| s["name"] == "node");
        let node = node.unwrap_or_else(|| panic!("no node span: {line}"));
        assert_eq!(node["id"], 2, "{line}");
        assert_eq!(node["region"], "test", "{line}");
        assert_eq!(node["az"], "test-b", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_leader_cleanly_and_the_region_elects_another() {
    // Shows: SIGTERM makes the leader finish and exit 0 within its grace
    // period, and the other two elect a new leader; nothing acknowledged is lost.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(3, |_| {}).await;
    let client = cluster.client();
    for i in 0..50 {
        client.put(format!("k{i}"), "v").await.unwrap();
    }
    let leader = cluster.wait_leader().await;
    let started = Instant::now();
    let status = cluster.stop(leader);
    assert!(status.success(), "a stopped node exits 0: {status}");
    assert!(
        started.elapsed() < nines::daemon::SHUTDOWN_GRACE + Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    let next = cluster.wait_leader().await;
    assert_ne!(next, leader);
    for i in 0..50 {
        let r = client.get(format!("k{i}"), nines::rpc::Consistency::Linearizable).await.unwrap();
        assert!(r.kv.is_some(), "k{i} lost");
    }
}

/// Chromium, if installed. CI installs it; elsewhere the test says it skipped.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_headless_browser_shows_every_node_of_every_region() {
    // Shows: the page at / on any node's admin port, run in headless
    // Chromium, draws both regions and all six nodes with their roles.
    let Some(browser) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must install chromium (see .ci/run)");
        eprintln!("skipped: chromium is not installed (apt-get install chromium to run this test)");
        return;
    };
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |_| {}).await;
    let url = format!("{}/", admin(&cluster, 5));
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            "--virtual-time-budget=8000",
            "--dump-dom",
            &url,
        ])
        .output()
        .await
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("id=\"region-a\"") && dom.contains("id=\"region-b\""), "both regions drawn: {dom}");
    for id in 1..=6 {
        assert!(dom.contains(&format!("id=\"node-{id}\"")), "node {id} drawn: {dom}");
    }
    assert!(dom.contains("primary") && dom.contains("secondary") && dom.contains("leader"), "{dom}");
}
