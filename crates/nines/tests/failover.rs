//! Region failover safety on real node processes: a hung leader is not a
//! region failure, and a planned switchover whose command dies leaves no
//! fence behind for long.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestCluster, serial, wait_for};
use nines::config::Mode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn nines(endpoints: &[String], args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nines"));
    c.args(["--endpoints", &endpoints.join(",")]).args(args);
    c
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_leader_of_the_primary_is_not_a_region_failure() {
    // Shows (the report that opened the failover-safety issue): a controller
    // watching all six nodes with `--interval 1s --threshold 3`, the primary's
    // leader SIGSTOPped for 15 s: the rest of the primary elects a leader and
    // keeps taking writes (at least 12 of 15, one a second), and the
    // controller fails nothing over.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |_| {}).await;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let mut controller =
        nines(&cluster.endpoints(&all), &["controller", "--interval", "1s", "--threshold", "3", "--duration", "40s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start controller");
    // The controller sees the cluster healthy first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_leader_in("a").await;
    let hung = cluster.nodes[&leader].child.as_ref().expect("leader running");
    signal(hung, Signal::SIGSTOP);
    let others: Vec<u64> = cluster.regions["a"].iter().copied().filter(|id| *id != leader).collect();
    let client = cluster.client_of(&others);
    let started = Instant::now();
    let mut acked = 0;
    let mut errors = Vec::new();
    for i in 0..15u64 {
        match client.put(format!("hung-{i}"), "v").await {
            Ok(_) => acked += 1,
            Err(e) => errors.push(e.to_string()),
        }
        let slot = started + Duration::from_secs(i + 1);
        tokio::time::sleep_until(slot.into()).await;
    }
    let hung_for = started.elapsed();
    signal(cluster.nodes[&leader].child.as_ref().unwrap(), Signal::SIGCONT);
    let b = cluster.region_client("b").region_status().await.expect("b status");
    let a = cluster.client_of(&others).region_status().await.expect("a status");
    let _ = controller.kill();
    let out = controller.wait_with_output().expect("controller output");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("leader {leader} hung for {hung_for:?}: {acked} of 15 writes acknowledged; errors: {errors:?}");
    assert_eq!((b.role.as_str(), b.epoch), ("secondary", 0), "b was promoted: {b:?}\ncontroller said:\n{said}");
    assert_eq!((a.role.as_str(), a.epoch), ("primary", 0), "{a:?}");
    assert!(!said.contains("promot"), "the controller tried to promote a region:\n{said}");
    assert!(acked >= 12, "only {acked} of 15 writes acknowledged while one node hung: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_killed_mid_drain_leaves_a_fence_that_expires_or_is_lifted() {
    // Shows: `nines region promote b` killed while it waits for b to drain
    // (b cannot: a's shipments to b are dropped) leaves a fenced, refusing
    // writes; the fence ends by itself (drain timeout + 10 s), and after a
    // second killed switchover `nines region unfence` lifts it at once.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |c| {
        c.fault_injection = true;
    })
    .await;
    let a = cluster.region_client("a");
    let endpoints_a = cluster.endpoints(&cluster.regions["a"]);
    cluster.set_faults("a", &["b"], 0).await;
    a.put("before", "v").await.expect("a write before the switchover");
    let drain = Duration::from_secs(5);
    let fence_max = drain + Duration::from_secs(10);

    let killed_switchover = || async {
        let mut cli = nines(&endpoints_a, &["region", "promote", "b", "--drain-timeout", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start promote");
        wait_for("a to be fenced", Duration::from_secs(10), || async {
            a.region_status().await.ok().filter(|s| s.role == "fenced")
        })
        .await;
        let fenced_at = Instant::now();
        cli.kill().expect("kill promote");
        cli.wait().expect("reap promote");
        let err = a.put("during", "v").await.expect_err("a fenced primary refuses writes");
        assert!(err.to_string().contains("fenced"), "{err}");
        fenced_at
    };

    let fenced_at = killed_switchover().await;
    wait_for("a to take writes again", fence_max + Duration::from_secs(10), || async {
        a.put("after-expiry", "v").await.ok()
    })
    .await;
    let held = fenced_at.elapsed();
    eprintln!("a switchover killed mid-drain: the fence held {held:?} (at most {fence_max:?})");
    assert!(held <= fence_max + Duration::from_secs(5), "the fence held {held:?}");

    killed_switchover().await;
    let out = nines(&endpoints_a, &["region", "unfence"]).output().expect("run unfence");
    assert!(out.status.success(), "unfence: {}", String::from_utf8_lossy(&out.stderr));
    a.put("after-unfence", "v").await.expect("a takes writes as soon as it is unfenced");
    let s = a.region_status().await.expect("a status");
    assert_eq!((s.role.as_str(), s.epoch), ("primary", 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failovers_started_together_end_with_one_primary_and_the_other_told_who_won() {
    // Shows: `nines region failover b` and `nines region failover c` started
    // at the same moment (both usually compute epoch 1; if one sees the
    // other's promotion first, it takes epoch 2). Exactly one command
    // succeeds; the other fails naming the winner and its epoch; every region
    // ends with that primary at that epoch, and the loser refuses writes.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 1), ("b", 1), ("c", 1)], Mode::ActivePassive, |_| {}).await;
    let endpoints: Vec<String> = cluster.endpoints(&cluster.nodes.keys().copied().collect::<Vec<_>>());
    for region in ["a", "b", "c"] {
        let client = cluster.region_client(region);
        wait_for(&format!("{region} to know its role"), Duration::from_secs(30), || async {
            client.region_status().await.ok().filter(|s| s.primary == "a")
        })
        .await;
    }
    let start = |region: &str| {
        nines(&endpoints, &["region", "failover", region]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
    };
    let (b, c) = (start("b").expect("failover b"), start("c").expect("failover c"));
    let outputs = [("b", b.wait_with_output().unwrap()), ("c", c.wait_with_output().unwrap())];
    let text =
        |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    for (r, o) in &outputs {
        eprintln!("failover {r}: {}: {}", o.status, text(o).trim());
    }
    let winners: Vec<&str> = outputs.iter().filter(|(_, o)| o.status.success()).map(|(r, _)| *r).collect();
    assert_eq!(winners.len(), 1, "exactly one failover must win: {winners:?}");
    let winner = winners[0];
    let (loser, lost) = outputs.iter().find(|(r, _)| *r != winner).unwrap();
    let won = text(&outputs.iter().find(|(r, _)| *r == winner).unwrap().1);
    let epoch: u64 = won
        .split("at epoch ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the winner names its epoch: {won}"));
    let said = text(lost);
    assert!(
        said.contains(&format!("{winner} is the primary at epoch {epoch}")),
        "the loser ({loser}) must name the winner: {said}"
    );
    for region in ["a", "b", "c"] {
        let client = cluster.region_client(region);
        let s = wait_for(&format!("{region} to name {winner} at epoch {epoch}"), Duration::from_secs(30), || async {
            client.region_status().await.ok().filter(|s| s.primary == winner && s.epoch == epoch)
        })
        .await;
        eprintln!("{region}: {} (primary {} at epoch {})", s.role, s.primary, s.epoch);
    }
    let err = cluster.region_client(loser).put("k", "v").await.expect_err("the loser is a secondary");
    assert!(err.to_string().contains(&format!("primary region {winner}")), "{err}");
    cluster.region_client(winner).put("k", "v").await.expect("the winner takes writes");
}
