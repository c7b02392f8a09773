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
    // The older v1alpha protocol too (older grpcurl, Python's grpcio-reflection).
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let channel =
            tonic::transport::Endpoint::from_shared(cluster.nodes[&1].grpc()).unwrap().connect().await.unwrap();
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let resp = stream.message().await.unwrap().expect("a v1alpha reflection answer");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "nines.v1.Kv"), "v1alpha reflection lists nines.v1.Kv: {names:?}");
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
    // Prometheus' own linter has nothing to say (every metric has HELP text).
    match promtool() {
        Some(promtool) => {
            use std::io::Write;
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run promtool");
            // `nines health` printed the status code before the body.
            let body = metrics.strip_prefix("200 ").expect("the body after its status code");
            child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
        }
        None => {
            assert!(std::env::var("CI").is_err(), "CI must install promtool (see .ci/run)");
            eprintln!("skipped: promtool is not installed (Debian's prometheus package has it)");
        }
    }
}

/// promtool, if installed. CI installs it; elsewhere the check says it skipped.
fn promtool() -> Option<&'static str> {
    Command::new("promtool").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "promtool")
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
async fn status_page_in_a_headless_browser_shows_every_node_events_and_charts() {
    // Shows: the page at / on any node's admin port, run in headless
    // Chromium, draws both regions and all six nodes with their roles; after
    // a leader is killed and the other region is failed over to, its events
    // panel lists the election and the promotion and its lag chart has data
    // points (a screenshot is kept in target/tmp/status-page.png).
    let Some(browser) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must install chromium (see .ci/run)");
        eprintln!("skipped: chromium is not installed (apt-get install chromium to run this test)");
        return;
    };
    let _serial = serial().await;
    let mut cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |_| {}).await;
    let url = format!("{}/", admin(&cluster, 5));
    let profile = tempfile::tempdir().unwrap();
    let chromium = |extra: Vec<String>| {
        let mut args: Vec<String> =
            ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=8000"]
                .map(String::from)
                .into();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra);
        args.push(url.clone());
        tokio::process::Command::new(browser).args(args).output()
    };
    let out = chromium(vec!["--dump-dom".into()]).await.expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("id=\"region-a\"") && dom.contains("id=\"region-b\""), "both regions drawn: {dom}");
    for id in 1..=6 {
        assert!(dom.contains(&format!("id=\"node-{id}\"")), "node {id} drawn: {dom}");
    }
    assert!(dom.contains("primary") && dom.contains("secondary") && dom.contains("leader"), "{dom}");

    // Writes, a leader killed in a, then an unplanned failover to b.
    let a = cluster.region_client("a");
    for i in 0..50 {
        a.put(format!("k{i}"), "v").await.unwrap();
    }
    let killed = cluster.wait_leader_in("a").await;
    cluster.kill(killed);
    let elected = wait_for("a new leader in a", Duration::from_secs(30), || async {
        let s = cluster.status(*cluster.regions["a"].iter().find(|id| **id != killed).unwrap()).await?;
        s.leader_id.filter(|l| *l != killed)
    })
    .await;
    let b = cluster.endpoints(&cluster.regions["b"]).join(",");
    let failover = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["--endpoints", &b, "region", "failover", "b"])
        .output()
        .unwrap();
    assert!(failover.status.success(), "failover: {}", String::from_utf8_lossy(&failover.stderr));
    // The samples are taken every 5 s: wait for one after the failover.
    tokio::time::sleep(nines::events::SAMPLE_EVERY + Duration::from_secs(1)).await;

    let out = chromium(vec!["--dump-dom".into()]).await.expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    for event in [format!("node {elected} elected leader of a"), "region b is the primary at epoch 1".to_string()] {
        assert!(dom.contains(&event), "the events panel shows {event:?}: {dom}");
    }
    assert!(dom.contains("class=\"event\""), "{dom}");
    let lag_points = dom
        .split("id=\"chart-lag-a\"")
        .nth(1)
        .and_then(|rest| rest.split("data-points=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a lag chart for region a with its point count");
    assert!(lag_points > 0, "the lag chart has data points: {dom}");
    assert!(dom.contains(&format!("not reached: node {killed}")), "the dead node is named: {dom}");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(vec![format!("--screenshot={}", shot.display()), "--window-size=1400,1600".into()])
        .await
        .expect("run chromium");
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot of the page");
    eprintln!("status page screenshot: {}", shot.display());
}
