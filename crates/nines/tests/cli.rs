//! The `nines` command line against real processes: `nines up` as the
//! README shows it, and the client commands with their exit codes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, serial_blocking};

fn nines(endpoints: &str, args: &[&str]) -> std::process::Output {
    nines_with_stdin(endpoints, args, &[])
}

/// `nines --endpoints ENDPOINTS ARGS` with `stdin` as its input, bounded.
fn nines_with_stdin(endpoints: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["--endpoints", endpoints])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nines");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    common::output_within(child, Duration::from_secs(60))
}

#[test]
fn up_starts_a_cluster_the_cli_reaches_and_ctrl_c_stops_every_node() {
    // Shows: `nines up` starts two regions of three nodes, prints each
    // node's addresses and PID and each region's leader;
    // put/get/cas/del/scan/status/member list work against it with the
    // documented exit codes; SIGINT stops `up` and every node it started.
    let _serial = serial_blocking();
    let ports = common::PortBases::free(6);
    let flags = ports.flags();
    let args: Vec<&str> = std::iter::once("up").chain(flags.iter().map(String::as_str)).collect();
    let up = common::Up::spawn(&args, ports.grpc, "eu-west leader: node");
    let printed = up.printed.clone();
    let pids: Vec<i32> = printed
        .lines()
        .filter(|l| l.contains("http://127.0.0.1:"))
        .map(|l| l.split_whitespace().last().unwrap().parse().expect("pid column"))
        .collect();
    assert_eq!(pids.len(), 6, "six nodes with PIDs: {printed}");
    for n in 0..6 {
        assert!(printed.contains(&format!("http://127.0.0.1:{}", ports.grpc + n)), "{printed}");
        assert!(printed.contains(&format!("http://127.0.0.1:{}", ports.admin + n)), "{printed}");
        assert!(printed.contains(&format!("http://127.0.0.1:{}", ports.peer + n)), "{printed}");
    }

    let eps = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{},http://127.0.0.1:{}",
        ports.grpc,
        ports.grpc + 1,
        ports.grpc + 2
    );
    let o = nines(&eps, &["put", "greeting", "hello"]);
    assert!(o.status.success(), "put: {}", String::from_utf8_lossy(&o.stderr));
    let o = nines(&eps, &["get", "greeting"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello"));
    let o = nines(&eps, &["-w", "json", "get", "greeting", "--consistency", "local"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json output");
    assert_eq!(v["kv"]["value"], "aGVsbG8=", "values are base64 in json, as etcdctl prints them");
    let index = v["kv"]["version"]["index"].as_u64().expect("version index");

    let o = nines(&eps, &["cas", "greeting", "hi", "--expect-version", &(index + 1000).to_string()]);
    assert_eq!(o.status.code(), Some(6), "a failed compare exits 6");
    assert!(String::from_utf8_lossy(&o.stderr).contains("compare failed"));
    let o = nines(&eps, &["cas", "greeting", "hi", "--expect-version", &index.to_string()]);
    assert!(o.status.success(), "cas: {}", String::from_utf8_lossy(&o.stderr));
    let o = nines(&eps, &["scan", "--prefix", "gree"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("hi"));
    let o = nines(&eps, &["del", "greeting"]);
    assert!(o.status.success());
    let o = nines(&eps, &["get", "greeting"]);
    assert_eq!(o.status.code(), Some(3), "a missing key exits 3");
    let o = nines(&eps, &["put", "", "x"]);
    assert_eq!(o.status.code(), Some(2), "invalid input exits 2");
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
    let eu = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{},http://127.0.0.1:{}",
        ports.grpc + 3,
        ports.grpc + 4,
        ports.grpc + 5
    );
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
    let o = nines(&format!("http://127.0.0.1:{port}"), &["get", "x", "--command-timeout", "1s"]);
    assert_eq!(o.status.code(), Some(4), "unreachable exits 4");
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
    let ports = common::PortBases::free(3);
    let first = common::Up::start_on(dir.path(), ports, &[]);
    first.client().put("kept", "across restarts").await.unwrap();
    first.stop();
    let again = common::Up::start_on(dir.path(), ports, &[]);
    let kv = again.client().get("kept", nines::rpc::Consistency::Linearizable).await.unwrap().kv.expect("kept");
    assert_eq!(kv.value, b"across restarts");
    again.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_up_on_taken_ports_or_a_held_data_dir_stops_at_once_naming_them() {
    // Shows: with a cluster running, `nines up` on the same ports exits
    // non-zero within 2 s naming the port and the nines node answering
    // there, and changes nothing in the running cluster; `nines node` on a
    // running node's data directory stops naming that node's PID.
    let _serial = common::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = common::PortBases::free(3);
    let first = common::Up::start_on(dir.path(), ports, &[]);
    let client = first.client();
    client.put("k", "v").await.unwrap();
    let before = client.status_of(&format!("http://127.0.0.1:{}", ports.grpc)).await.unwrap();

    let flags = ports.flags();
    let mut args = vec!["up", "--regions", "1"];
    args.extend(flags.iter().map(String::as_str));
    let started = Instant::now();
    let second = Command::new(env!("CARGO_BIN_EXE_nines")).args(&args).output().unwrap();
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(!second.status.success(), "the second up must fail: {said}");
    assert!(took < Duration::from_secs(2), "it took {took:?}: {said}");
    assert!(said.contains(&format!("port {}", ports.grpc)), "names the port: {said}");
    assert!(said.contains("nines node 1 of region us-east answers there"), "{said}");
    assert!(!said.contains("bootstrapping"), "{said}");

    let after = client.status_of(&format!("http://127.0.0.1:{}", ports.grpc)).await.unwrap();
    assert_eq!((after.term, after.last_log_index), (before.term, before.last_log_index), "nothing changed");
    assert_eq!(after.members.len(), 3);

    // A second node on node 1's data directory stops, naming the holder.
    let config = dir.path().join("node-1/nines.toml");
    let node = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["node", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&node.stderr).into_owned();
    // Node 1's PID, as `up` printed it (NODE ... PID).
    let pid = first
        .printed
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.len() == 7 && cols[0] == "1")
        .map(|cols| cols[6].to_string())
        .expect("node 1's row");
    assert!(!node.status.success(), "{said}");
    assert!(said.contains(&format!("in use by a running nines node (PID {pid})")), "{said}");
    assert_eq!(client.get("k", nines::rpc::Consistency::Linearizable).await.unwrap().kv.unwrap().value, b"v");

    // `nines events` lists the election of the running cluster's leader, as
    // a table and as JSON.
    let eps = format!("http://127.0.0.1:{}", ports.grpc);
    let leader = before.leader_id.expect("a leader");
    // (A node notes what happened within a second.)
    let elected = format!("node {leader} elected leader of us-east");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = nines(&eps, &["events"]);
        let printed = String::from_utf8_lossy(&table.stdout).into_owned();
        assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
        if printed.contains(&elected) {
            break;
        }
        assert!(Instant::now() < deadline, "no election listed: {printed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let json = nines(&eps, &["-w", "json", "events"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("events as JSON");
    let kinds: Vec<&str> = v["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"leader"), "{v}");
    assert_eq!(v["unreachable"].as_array().map(Vec::len), Some(0), "every node answered: {v}");
    first.stop();
}

/// The exit codes of the README's table, by code.
fn readme_exit_codes() -> Vec<(i32, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let table = readme.split("| Exit code |").nth(1).expect("the README has an exit code table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].parse().expect("a code"), cells[1].to_lowercase())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exit_code_is_what_the_readme_says() {
    // Shows: each exit code of the README's table comes from the situation
    // the table names, on a real cluster: success, failure, invalid input,
    // not found, unreachable, outcome unknown (a write that reached a leader
    // whose followers are gone) and a failed comparison; and values from
    // stdin come back byte for byte through base64 JSON.
    use nines::cli::kv::exit;
    let _serial = common::serial().await;
    let table = readme_exit_codes();
    let documented: Vec<i32> = table.iter().map(|(c, _)| *c).collect();
    let ours = [exit::OK, exit::FAILED, exit::INVALID, exit::NOT_FOUND, exit::UNREACHABLE, exit::OUTCOME_UNKNOWN];
    let ours: Vec<i32> = ours.into_iter().chain([exit::COMPARE_FAILED]).collect();
    assert_eq!(documented, ours, "the README's codes are the CLI's");
    let words = ["success", "fail", "invalid", "not found", "unreachable", "outcome unknown", "compare"];
    for ((code, text), word) in table.iter().zip(words) {
        assert!(text.contains(word), "code {code} is documented as {text:?}, expected {word:?}");
    }

    let mut cluster = common::TestCluster::start(3, |_| {}).await;
    let eps = cluster.endpoints(&[1, 2, 3]).join(",");
    let run_at =
        |eps: &str, args: &[&str], stdin: Option<&[u8]>| nines_with_stdin(eps, args, stdin.unwrap_or_default());
    let run = |args: &[&str], stdin: Option<&[u8]>| run_at(&eps, args, stdin);
    let code = |o: &std::process::Output| o.status.code().expect("exited");

    // 0, with a binary value from stdin that comes back whole.
    let binary: Vec<u8> = (0..=255u8).collect();
    let o = run(&["put", "bin"], Some(&binary));
    assert_eq!(code(&o), exit::OK, "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["get", "bin", "-w", "json"], None);
    assert_eq!(code(&o), exit::OK);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    use base64::Engine;
    let value = base64::engine::general_purpose::STANDARD.decode(v["kv"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(value, binary);
    let file = cluster.dir.path().join("value");
    std::fs::write(&file, b"from a file").unwrap();
    assert_eq!(code(&run(&["put", "f", "--file", file.to_str().unwrap()], None)), exit::OK);
    assert!(String::from_utf8_lossy(&run(&["get", "f"], None).stdout).contains("from a file"));
    // 1: a command that ran and failed (a health check answered 404).
    let admin = &cluster.nodes[&1].config.admin_listen;
    let o = run(&["health", &format!("http://{admin}/no-such-page")], None);
    assert_eq!(code(&o), exit::FAILED, "{}", String::from_utf8_lossy(&o.stderr));
    // 2: invalid input, from the server and from the command line.
    assert_eq!(code(&run(&["put", "", "x"], None)), exit::INVALID);
    assert_eq!(code(&run(&["put", "k", "v", "--no-such-flag"], None)), exit::INVALID);
    assert_eq!(code(&run_at("127.0.0.1:1", &["put", "k", "v"], None)), exit::INVALID);
    // 3: not found.
    assert_eq!(code(&run(&["get", "never-written"], None)), exit::NOT_FOUND);
    // 4: nothing answers.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let o = run_at(&nobody, &["get", "k", "--command-timeout", "1s"], None);
    assert_eq!(code(&o), exit::UNREACHABLE, "{}", String::from_utf8_lossy(&o.stderr));
    // 6: a failed comparison.
    assert_eq!(code(&run(&["cas", "f", "new", "--expect-absent"], None)), exit::COMPARE_FAILED);
    // 5: a put reaches the leader after both its followers were killed: it
    // is in the leader's log and may commit yet, or be lost.
    let leader = cluster.wait_leader().await;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    for f in &followers {
        cluster.kill(*f);
    }
    let only = cluster.nodes[&leader].grpc();
    let o = run_at(&only, &["put", "k", "v", "--command-timeout", "3s"], None);
    assert_eq!(code(&o), exit::OUTCOME_UNKNOWN, "{}", String::from_utf8_lossy(&o.stderr));
    for f in &followers {
        cluster.spawn(*f);
    }
    assert_eq!(code(&run(&["put", "k", "v", "--command-timeout", "30s"], None)), exit::OK, "the cluster serves on");
}
