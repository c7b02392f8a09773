//! The load generator against real servers, briefly: a one-node nines
//! region run in this process, and an etcd member when etcd is installed.

use std::time::Duration;

use nines::config::NodeConfig;
use nines_bench::{Target, Workload, preload, run};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn workload(read_ratio: f64) -> Workload {
    Workload {
        clients: 4,
        keys: 50,
        value_bytes: 128,
        read_ratio,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        rate: None,
        ack_log: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generator_measures_a_real_nines_node() {
    // Shows: puts and linearizable gets against a real node are counted,
    // timed and error-free.
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        id: 1,
        data_dir: dir.path().join("node"),
        grpc_listen: ([127, 0, 0, 1], free_port()).into(),
        admin_listen: ([127, 0, 0, 1], free_port()).into(),
        peer_listen: ([127, 0, 0, 1], free_port()).into(),
        insecure: true,
        ..NodeConfig::default()
    };
    let endpoint = format!("http://{}", config.grpc_listen);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(nines::daemon::run(config, async move {
        let _ = stop_rx.await;
    }));
    let client = nines::rpc::Client::new(vec![endpoint.clone()], nines::rpc::ClientConfig::default()).unwrap();
    let me = nines::rpc::NodeInfo { id: 1, grpc_addr: endpoint.clone(), ..Default::default() };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.init(&endpoint, vec![me.clone()]).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "node did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target = Target::nines(vec![endpoint]).await.unwrap();
    let puts = run(&target, &workload(0.0)).await.unwrap();
    assert!(puts.ops > 0 && puts.errors == 0, "{puts:?}");
    assert!(puts.p50_ms > 0.0 && puts.p50_ms <= puts.p99_ms, "{puts:?}");
    // Open loop: the number of operations is the schedule's, 200 a second
    // over the 0.8 s measured, whatever the node's speed.
    let open = run(&target, &Workload { rate: Some(200.0), ..workload(0.0) }).await.unwrap();
    assert!((158..=162).contains(&open.ops) && open.errors == 0, "{open:?}");
    assert!(open.ops_total >= open.ops + 38, "the warm-up's 40 operations are counted in ops_total: {open:?}");
    preload(&target, &workload(1.0)).await.unwrap();
    let gets = run(&target, &workload(1.0)).await.unwrap();
    assert!(gets.ops > 0 && gets.errors == 0, "{gets:?}");
    let _ = stop_tx.send(());
    node.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generator_measures_a_real_etcd_member() {
    // Shows: the same generator drives etcd's KV API (puts and reads).
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "CI must install etcd-server (see .ci/run)");
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server to run this test)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = std::process::Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}"), "--log-level", "error"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start etcd");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let target = loop {
        if let Ok(t) = Target::etcd(vec![client_url.clone()]).await
            && preload(&t, &workload(1.0)).await.is_ok()
        {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "etcd did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mixed = run(&target, &workload(0.5)).await;
    let _ = etcd.kill();
    let _ = etcd.wait();
    let mixed = mixed.unwrap();
    assert!(mixed.ops > 0 && mixed.errors == 0, "{mixed:?}");
}
