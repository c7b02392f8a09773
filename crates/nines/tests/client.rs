//! The client library (`nines-client`) against real node processes: its
//! examples run as a user runs them, it follows a region failover with one
//! endpoint given, a CAS counter survives leader kills with every increment
//! counted once, and a stopped node's circuit opens and closes again.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::TestCluster;

/// The path of a `nines-client` example, built once per test run (with the
/// cargo and target directory of this test build).
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let target = PathBuf::from(env!("CARGO_BIN_EXE_nines")).parent().expect("target profile dir").to_path_buf();
    BUILT.get_or_init(|| {
        let release = target.ends_with("release");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--workspace", "--examples"])
            .args(release.then_some("--release"))
            .env("CARGO_TARGET_DIR", target.parent().expect("target dir"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --examples");
        assert!(status.success(), "building the client examples failed");
    });
    target.join("examples").join(name)
}

/// Runs an example to its end (bounded), returning its stdout; fails the
/// test with its stderr if it exits non-zero.
fn run_example(name: &str, args: &[&str], timeout: Duration) -> String {
    let child = Command::new(example(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start example");
    let out = common::output_within(child, timeout);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "example {name} exited {:?}: {stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_runs_against_a_cluster() {
    // Shows: the quickstart example, given one endpoint, writes, reads,
    // swaps and deletes, and names the region it learned.
    let _serial = common::serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let endpoint = cluster.nodes[&2].grpc();
    let out = tokio::task::spawn_blocking(move || {
        run_example("quickstart", &["--endpoints", &endpoint], Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(out.contains("get quickstart/greeting = hello"), "{out}");
    assert!(out.contains("cas succeeded") && out.contains("delete existed=true"), "{out}");
    assert!(out.contains("regions: test"), "{out}");
}

/// Kills a process (by PID) when dropped: the controller and restarted
/// nodes a test starts never outlive it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nines ARGS` in the background, its output in `log`.
fn spawn_nines(args: &[&str], log: &std::path::Path) -> KillOnDrop {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn nines");
    KillOnDrop(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_follows_a_region_failover_with_one_endpoint_given() {
    // Shows: `nines up --mode active-passive` with a controller; the writer
    // example, given one us-east endpoint, keeps getting acknowledgements
    // after all three us-east nodes are killed and the controller promotes
    // eu-west; every write it saw acknowledged is in eu-west or in us-east's
    // divergence record (read after us-east's nodes come back).
    let _serial = common::serial().await;
    let writer_exe = tokio::task::spawn_blocking(|| example("writer")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = common::PortBases::free(9);
    let (flags, d) = (ports.flags(), dir.path().to_string_lossy().into_owned());
    let mut args = vec!["up", "--mode", "active-passive", "--data-dir", &d];
    args.extend(flags.iter().map(String::as_str));
    let up = common::Up::spawn(&args, ports.grpc, "try: nines put");
    // NODE REGION AZ GRPC PEER ADMIN PID rows of us-east.
    let us_east: Vec<(u64, i32)> = up
        .printed
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() == 7 && cols[1] == "us-east")
        .map(|cols| (cols[0].parse().unwrap(), cols[6].parse().unwrap()))
        .collect();
    assert_eq!(us_east.len(), 3, "{}", up.printed);
    let url = |i: u16| format!("http://127.0.0.1:{}", ports.grpc + i);
    let all: Vec<String> = (0..6).map(url).collect();
    let _controller = spawn_nines(
        &["--endpoints", &all.join(","), "controller", "--interval", "500ms", "--threshold", "3", "--duration", "90s"],
        &dir.path().join("controller.log"),
    );

    let acked_file = dir.path().join("acked.txt");
    let mut writer = Command::new(writer_exe)
        .args(["--endpoints", &url(0), "--for", "30s", "--acked-file", acked_file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start writer");
    let stdout = writer.stdout.take().unwrap();
    let writer = KillOnDrop(writer);
    let started = Instant::now();
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).map(|l| (Instant::now(), l)).collect::<Vec<_>>()
    });
    tokio::time::sleep(Duration::from_secs(8)).await;
    let killed_at = Instant::now();
    for (_, pid) in &us_east {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    // The writer stops by itself after 30 s; killed if it runs far past.
    let mut writer = writer;
    while writer.0.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(90), "the writer ran far past its 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = tokio::task::spawn_blocking(move || lines.join().unwrap()).await.unwrap();
    let acked = |l: &str| l.strip_prefix("acked ")?.split_whitespace().next()?.parse::<u64>().ok();
    let at_kill = lines.iter().filter(|(t, _)| *t <= killed_at).filter_map(|(_, l)| acked(l)).max().unwrap_or(0);
    let total: u64 = lines
        .iter()
        .find_map(|(_, l)| l.strip_prefix("total acked ").and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no total: {lines:?}"));
    assert!(at_kill > 0, "acknowledgements before the kill: {lines:?}");
    assert!(total > at_kill + 10, "acknowledgements continued after the failover: {at_kill} then {total}");

    // us-east comes back (as a secondary, with its divergence record).
    let nodes: Vec<KillOnDrop> = us_east
        .iter()
        .map(|(id, _)| {
            let config = dir.path().join(format!("node-{id}/nines.toml"));
            let log = dir.path().join(format!("node-{id}.restart.log"));
            spawn_nines(&["node", "--config", config.to_str().unwrap()], &log)
        })
        .collect();
    let us = nines::rpc::Client::new((0..3).map(url).collect(), nines::rpc::ClientConfig::default()).unwrap();
    let eu = nines::rpc::Client::new((3..6).map(url).collect(), nines::rpc::ClientConfig::default()).unwrap();
    common::wait_for("us-east demoted to secondary", Duration::from_secs(60), || async {
        us.region_status().await.ok().filter(|s| s.role == "secondary").map(|_| ())
    })
    .await;
    let divergent: std::collections::BTreeSet<Vec<u8>> =
        us.divergent(0).await.unwrap().records.into_iter().filter_map(|r| r.kv.map(|kv| kv.key)).collect();
    let mut in_eu = std::collections::BTreeSet::new();
    let mut from = b"writer/".to_vec();
    loop {
        let range = nines::rpc::KeyRange::Range { start: from.clone(), end: b"writer0".to_vec() };
        let page = eu.scan(range, 10_000, nines::rpc::Consistency::Linearizable).await.unwrap();
        let Some(last) = page.kvs.last().map(|kv| kv.key.clone()) else { break };
        in_eu.extend(page.kvs.into_iter().map(|kv| kv.key));
        if !page.more {
            break;
        }
        from = last;
        from.push(0);
    }
    let acked_keys: Vec<Vec<u8>> =
        std::fs::read_to_string(&acked_file).unwrap().lines().map(|l| l.as_bytes().to_vec()).collect();
    assert_eq!(acked_keys.len() as u64, total);
    let lost: Vec<&Vec<u8>> = acked_keys.iter().filter(|k| !in_eu.contains(*k)).collect();
    let unexplained: Vec<String> =
        lost.iter().filter(|k| !divergent.contains(**k)).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    println!("acked {total} ({at_kill} before the kill); {} not in eu-west, all in the divergence record", lost.len());
    assert!(unexplained.is_empty(), "acknowledged writes lost and not in the divergence record: {unexplained:?}");
    drop(nodes);
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_counter_counts_every_increment_once_while_leaders_are_killed() {
    // Shows: the cas_counter example (8 tasks, 30 s) against a region whose
    // leader is kill -9'd every 5 s (and restarted): the counter ends at
    // exactly the number of increments the client reported successful. The
    // retries after unknown outcomes happen inside the client; without
    // sessions a retried swap would apply twice or report a false mismatch.
    let _serial = common::serial().await;
    tokio::task::spawn_blocking(|| example("cas_counter")).await.unwrap();
    let mut cluster = TestCluster::start(3, |_| {}).await;
    let endpoints = cluster.endpoints(&[1, 2, 3]).join(",");
    let counter = tokio::task::spawn_blocking(move || {
        run_example(
            "cas_counter",
            &["--endpoints", &endpoints, "--tasks", "8", "--for", "30s", "--key", "counter/kills"],
            Duration::from_secs(120),
        )
    });
    let mut kills = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let leader = cluster.wait_leader().await;
        cluster.kill(leader);
        kills += 1;
        cluster.spawn(leader);
    }
    let out = counter.await.unwrap();
    // "final F successes N unknown U"; the example exits 1 unless
    // N <= F <= N + U. Every increment's outcome was settled by the client
    // here (U = 0 in every run so far), so F == N.
    let nums: Vec<u64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 3, "{out}");
    let (last, successes, unknown) = (nums[0], nums[1], nums[2]);
    assert!(successes <= last && last <= successes + unknown, "{out}");
    assert!(unknown <= 1, "the client settles unknown outcomes itself: {out}");
    assert!(successes > 20, "the counter made progress through {kills} leader kills: {out}");
    println!("{out} after {kills} leader kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nodes_circuit_opens_and_closes_after_it_resumes() {
    // Shows: local reads spread over a region's nodes; SIGSTOP one: its
    // circuit opens, every read still succeeds (after at most one attempt
    // timeout at that node), and after SIGCONT a probe closes the circuit
    // and the node serves again.
    use nines_client::{BreakerConfig, CircuitState, Client, Consistency};
    let _serial = common::serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let leader = cluster.wait_leader().await;
    let stopped = *[1, 2, 3].iter().find(|id| **id != leader).unwrap();
    let target = cluster.nodes[&stopped].grpc();
    let attempt = Duration::from_millis(500);
    let client = Client::builder()
        .endpoints(cluster.endpoints(&[1, 2, 3]))
        .consistency(Consistency::Local)
        .attempt_timeout(attempt)
        .breaker(BreakerConfig { failures_to_open: 2, open_for: Duration::from_secs(1) })
        .build()
        .unwrap();
    client.put("k", "v").await.unwrap();
    for _ in 0..10 {
        client.get("k").await.unwrap();
    }
    let state = |c: &Client| c.circuits().into_iter().find(|(e, _)| *e == target).map(|(_, s)| s);
    assert_eq!(state(&client), Some(CircuitState::Closed { failures: 0 }), "{:?}", client.circuits());

    let pid = nix::unistd::Pid::from_raw(cluster.nodes[&stopped].child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resume = scopeguard(pid);
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let t = Instant::now();
        assert!(client.get("k").await.unwrap().is_some(), "every read succeeds with a node stopped");
        slowest = slowest.max(t.elapsed());
    }
    assert!(matches!(state(&client), Some(CircuitState::Open { .. } | CircuitState::HalfOpen { .. })));
    // One attempt timeout at the stopped node, then elsewhere (generous
    // bound for a loaded machine: four attempt timeouts).
    assert!(slowest < attempt * 4, "a read took {slowest:?}");
    drop(resume);
    common::wait_for("the circuit closed again", Duration::from_secs(20), || async {
        client.get("k").await.ok()?;
        (state(&client) == Some(CircuitState::Closed { failures: 0 })).then_some(())
    })
    .await;
}

/// SIGCONTs `pid` when dropped.
fn scopeguard(pid: nix::unistd::Pid) -> impl Drop {
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    Resume(pid)
}

#[test]
fn the_client_library_asks_tokio_for_timers_and_spawning_only() {
    // Shows: an embedder does not get tokio's `full` feature from
    // nines-client (`cargo tree -p nines-client -e features`).
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", "nines-client", "-e", "features", "-e", "normal"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tree.contains("tokio feature \"time\"") && tree.contains("tokio feature \"rt\""), "{tree}");
    assert!(!tree.contains("tokio feature \"full\""), "nines-client enables tokio/full:\n{tree}");
}
