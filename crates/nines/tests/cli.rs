//! The `nines` command line against real processes: `nines up` as the
//! README shows it, and the client commands with their exit codes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, serial_blocking};

fn nines(endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nines")).args(["--endpoints", endpoints]).args(args).output().expect("run nines")
}

#[test]
fn up_starts_a_cluster_the_cli_reaches_and_ctrl_c_stops_every_node() {
    // Shows: `nines up` starts two regions of three nodes, prints each
    // node's addresses and PID and each region's leader;
    // put/get/cas/del/scan/status/member list work against it with the
    // documented exit codes; SIGINT stops `up` and every node it started.
    let _serial = serial_blocking();
    let grpc = common::free_port_run(6);
    let admin = common::free_port_run(6);
    let (grpc_base, admin_base) = (grpc.to_string(), admin.to_string());
    let up = common::Up::spawn(
        &["up", "--grpc-port-base", &grpc_base, "--admin-port-base", &admin_base],
        grpc,
        "eu-west leader: node",
    );
    let printed = up.printed.clone();
    let pids: Vec<i32> = printed
        .lines()
        .filter(|l| l.contains("http://127.0.0.1:"))
        .map(|l| l.split_whitespace().last().unwrap().parse().expect("pid column"))
        .collect();
    assert_eq!(pids.len(), 6, "six nodes with PIDs: {printed}");
    for n in 0..6 {
        assert!(printed.contains(&format!("http://127.0.0.1:{}", grpc + n)), "{printed}");
        assert!(printed.contains(&format!("http://127.0.0.1:{}", admin + n)), "{printed}");
    }

    let eps = format!("http://127.0.0.1:{},http://127.0.0.1:{},http://127.0.0.1:{}", grpc, grpc + 1, grpc + 2);
    let o = nines(&eps, &["put", "greeting", "hello"]);
    assert!(o.status.success(), "put: {}", String::from_utf8_lossy(&o.stderr));
    let o = nines(&eps, &["get", "greeting"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello"));
    let o = nines(&eps, &["-w", "json", "get", "greeting", "--consistency", "local"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json output");
    assert_eq!(v["kv"]["value"], "hello");
    let index = v["kv"]["version"]["index"].as_u64().expect("version index");

    let o = nines(&eps, &["cas", "greeting", "hi", "--expect-version", &(index + 1000).to_string()]);
    assert_eq!(o.status.code(), Some(1), "a failed compare exits 1");
    assert!(String::from_utf8_lossy(&o.stderr).contains("compare failed"));
    let o = nines(&eps, &["cas", "greeting", "hi", "--expect-version", &index.to_string()]);
    assert!(o.status.success(), "cas: {}", String::from_utf8_lossy(&o.stderr));
    let o = nines(&eps, &["scan", "--prefix", "gree"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("hi"));
    let o = nines(&eps, &["del", "greeting"]);
    assert!(o.status.success());
    let o = nines(&eps, &["get", "greeting"]);
    assert_eq!(o.status.code(), Some(1), "a missing key exits 1");
    let o = nines(&eps, &["put", "", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    assert!(err.contains("key is empty"), "{err}");

    let o = nines(&eps, &["status"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert_eq!(table.lines().filter(|l| l.contains(" leader ") || l.contains(" follower ")).count(), 6, "{table}");
    assert_eq!(table.lines().filter(|l| l.contains(" leader ")).count(), 2, "one leader per region: {table}");
    assert!(table.contains("us-east") && table.contains("eu-west") && table.contains("LAG ENTRIES"), "{table}");
    // A write in one region reaches the other.
    let eu = format!("http://127.0.0.1:{},http://127.0.0.1:{},http://127.0.0.1:{}", grpc + 3, grpc + 4, grpc + 5);
    let o = nines(&eps, &["put", "travels", "far"]);
    assert!(o.status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = nines(&eu, &["get", "travels", "--consistency", "local"]);
        if o.status.success() {
            assert!(String::from_utf8_lossy(&o.stdout).contains("far"));
            break;
        }
        assert!(Instant::now() < deadline, "the write never reached eu-west");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = nines(&eps, &["member", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["members"].as_array().unwrap().len(), 3);

    // Ctrl-C: `up` stops every node it started, then exits 0.
    up.stop();
    for pid in pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "node pid {pid} still running after nines up stopped");
    }
}

#[test]
fn a_cli_with_no_cluster_fails_with_one_line() {
    // Shows: an unreachable cluster is a non-zero exit with a one-line reason.
    let port = free_port();
    let o = nines(&format!("http://127.0.0.1:{port}"), &["get", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unavailable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_data_dir_starts_again_on_its_own_data() {
    // Shows: a second `nines up` on the same --data-dir finds its cluster's
    // data, bootstraps nothing, and serves what the first one stored.
    let _serial = common::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (common::free_port_run(3), common::free_port_run(3));
    let first = common::Up::start_on(dir.path(), grpc, admin, &[]);
    first.client().put("kept", "across restarts").await.unwrap();
    first.stop();
    let again = common::Up::start_on(dir.path(), grpc, admin, &[]);
    let kv = again.client().get("kept", nines_client::Consistency::Linearizable).await.unwrap().kv.expect("kept");
    assert_eq!(kv.value, b"across restarts");
    again.stop();
}
