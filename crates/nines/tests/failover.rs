//! Region failover safety on real node processes: a hung leader is not a
//! region failure; a planned switchover whose command dies leaves no fence
//! behind for long; a primary cut off from the authority stops within its
//! lease; concurrent failovers issue one epoch; a killed controller's
//! standby finishes the failover.

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
    let cluster = TestCluster::start_with_authority(&[("a", 3), ("b", 3)], |_| {}).await;
    let all: Vec<u64> = cluster.regions["a"].iter().chain(&cluster.regions["b"]).copied().collect();
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
    let cluster = TestCluster::start_with_authority(&[("a", 3), ("b", 3)], |c| c.fault_injection = true).await;
    let a = cluster.region_client("a");
    let endpoints_a = cluster.endpoints(&cluster.regions["a"]);
    cluster.set_faults("a", &["b"], 0).await;
    wait_for("a to hold its lease", Duration::from_secs(30), || async { a.put("before", "v").await.ok() }).await;
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
    // Without an authority, the tie rule of the state machine decides.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 1), ("b", 1), ("c", 1)], Mode::ActivePassive, |_| {}).await;
    two_failovers_at_once(cluster, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failovers_started_together_with_an_authority_allocate_the_epoch_once() {
    // The same with an authority, after the primary a died: both claims
    // wait out a's lease, then race on one compare-and-swap; the loser is
    // never primary, not even for a moment.
    let _serial = serial().await;
    let cluster = TestCluster::start_with_authority(&[("a", 1), ("b", 1), ("c", 1)], |_| {}).await;
    two_failovers_at_once(cluster, true).await;
}

async fn two_failovers_at_once(mut cluster: TestCluster, with_authority: bool) {
    let regions: Vec<u64> = ["a", "b", "c"].iter().flat_map(|r| cluster.regions[*r].clone()).collect();
    let endpoints: Vec<String> = cluster.endpoints(&regions);
    for region in ["a", "b", "c"] {
        let client = cluster.region_client(region);
        wait_for(&format!("{region} to know its role"), Duration::from_secs(30), || async {
            client.region_status().await.ok().filter(|s| s.primary == "a")
        })
        .await;
    }
    let live = if with_authority {
        cluster.region_client("a").put("k", "v").await.expect("a holds its lease");
        cluster.kill(cluster.regions["a"][0]);
        vec!["b", "c"]
    } else {
        vec!["a", "b", "c"]
    };
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
    for region in live {
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

/// A client of `region` that gives up within a second and two attempts:
/// once a primary's lease has run out, each refused write is counted and the
/// next one starts, instead of retrying for the default ten seconds.
fn quick_client(cluster: &TestCluster, region: &str) -> nines::rpc::Client {
    let config = nines::rpc::ClientConfig {
        attempts_max: 2,
        attempt_timeout: Duration::from_secs(1),
        request_deadline: Duration::from_secs(1),
        ..nines::rpc::ClientConfig::default()
    };
    nines::rpc::Client::new(cluster.endpoints(&cluster.regions[region]), config).expect("client")
}

/// A writer's record: every key it tried, and when each acknowledged one
/// was acknowledged (keys whose outcome is unknown are tried, not acked).
#[derive(Default)]
struct Writes {
    acked: Vec<(String, Instant)>,
    unknown: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_authority_stops_within_its_lease_and_loses_only_what_it_acked_meanwhile() {
    // Shows: a (primary, lease T = 3 s) is cut off from b and from the
    // authority for 20 s while a writer on its side puts 20 keys a second.
    // a stops acknowledging within T of the cut; `nines region failover b`
    // succeeds once a's lease has run out; after the heal a's divergence
    // record holds exactly the acknowledged writes b lacks (set equality,
    // allowing writes whose outcome the writer never learned), and there are
    // at most about T x the write rate of them.
    let _serial = serial().await;
    let cluster = TestCluster::start_with_authority(&[("a", 3), ("b", 3)], |c| c.fault_injection = true).await;
    let lease = Duration::from_secs(3);
    let a = cluster.region_client("a");
    let b = cluster.region_client("b");
    wait_for("a to hold its lease", Duration::from_secs(30), || async { a.put("first", "v").await.ok() }).await;

    let writer = {
        let a = quick_client(&cluster, "a");
        tokio::spawn(async move {
            let mut w = Writes::default();
            let started = Instant::now();
            for i in 0..1_000u64 {
                if started.elapsed() > Duration::from_secs(24) {
                    break;
                }
                let key = format!("w-{i:04}");
                match a.put(key.clone(), "v").await {
                    Ok(_) => w.acked.push((key, Instant::now())),
                    Err(
                        nines::rpc::Error::Unavailable { .. }
                        | nines::rpc::Error::FailedPrecondition(_)
                        | nines::rpc::Error::InvalidArgument(_),
                    ) => {}
                    Err(_) => w.unknown.push(key),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            w
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut = Instant::now();
    cluster.set_faults("a", &["b", nines::authority::AUTHORITY_FAULT], 0).await;
    cluster.set_faults("b", &["a"], 0).await;

    let endpoints_b = cluster.endpoints(&cluster.regions["b"]);
    let cli = nines(&endpoints_b, &["region", "failover", "b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start failover");
    wait_for("b to be promoted", Duration::from_secs(20), || async {
        b.region_status().await.ok().filter(|s| s.role == "primary")
    })
    .await;
    let failed_over = cut.elapsed();
    let out = cli.wait_with_output().expect("failover output");
    assert!(out.status.success(), "failover b: {}", String::from_utf8_lossy(&out.stderr));
    b.put("after-failover", "v").await.expect("b takes writes");
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    cluster.set_faults("a", &[], 0).await;
    cluster.set_faults("b", &[], 0).await;
    let writes = writer.await.expect("writer");
    wait_for("a to follow b", Duration::from_secs(30), || async {
        a.region_status().await.ok().filter(|s| s.primary == "b" && s.role == "secondary")
    })
    .await;

    let after_cut: Vec<Duration> =
        writes.acked.iter().filter(|(_, t)| *t > cut).map(|(_, t)| t.duration_since(cut)).collect();
    let last_ack = after_cut.iter().max().copied().unwrap_or_default();
    let mut missing = std::collections::BTreeSet::new();
    for (key, _) in &writes.acked {
        let got = b.get(key.clone(), nines::rpc::Consistency::Linearizable).await.expect("read b");
        if got.kv.is_none() {
            missing.insert(key.clone());
        }
    }
    let divergent: std::collections::BTreeSet<String> = a
        .divergent(0)
        .await
        .expect("a's divergence record")
        .records
        .iter()
        .filter_map(|r| r.kv.as_ref())
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    eprintln!(
        "cut at 2 s: {} writes acked after the cut, the last {last_ack:?} after it; b primary {failed_over:?} after the \
         cut; {} acked writes missing from b, {} divergent records, {} writes of unknown outcome",
        after_cut.len(),
        missing.len(),
        divergent.len(),
        writes.unknown.len()
    );
    assert!(last_ack <= lease + Duration::from_millis(500), "a acknowledged a write {last_ack:?} after the cut");
    assert!(missing.is_subset(&divergent), "acked writes lost without a record: {:?}", missing.difference(&divergent));
    let explained: std::collections::BTreeSet<String> = missing.iter().chain(&writes.unknown).cloned().collect();
    assert!(divergent.is_subset(&explained), "records of writes never acked: {:?}", divergent.difference(&explained));
    let bound = (lease.as_secs_f64() + 1.0) * 20.0;
    assert!((missing.len() as f64) <= bound, "{} acked writes lost, above T x rate ({bound})", missing.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_deciding_controller_during_a_primary_failure_still_fails_over() {
    // Shows: two controllers share the decision through the authority's
    // controller lease. kill -9 of the deciding one at the moment the
    // primary region dies: the other takes over and promotes b, within the
    // failover time plus one controller lease.
    let _serial = serial().await;
    let mut cluster = TestCluster::start_with_authority(&[("a", 1), ("b", 1)], |_| {}).await;
    let a = cluster.region_client("a");
    wait_for("a to hold its lease", Duration::from_secs(30), || async { a.put("k", "v").await.ok() }).await;
    let all: Vec<u64> = cluster.regions["a"].iter().chain(&cluster.regions["b"]).copied().collect();
    let start = || {
        nines(&cluster.endpoints(&all), &["controller", "--interval", "1s", "--threshold", "3", "--duration", "60s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start controller")
    };
    let mut controllers = [start(), start()];
    // (The killed one is reaped when the array is dropped below.)
    let authority = cluster.region_client(common::AUTHORITY);
    let holder = wait_for("a controller to decide", Duration::from_secs(30), || async {
        let got = authority.get(nines::authority::CONTROLLER_KEY, nines::rpc::Consistency::Linearizable).await.ok()?;
        let lease: nines::authority::Lease = serde_json::from_slice(&got.kv?.value).ok()?;
        Some(lease.holder)
    })
    .await;
    let deciding = controllers
        .iter()
        .position(|c| holder.ends_with(&format!("pid-{}", c.id())))
        .unwrap_or_else(|| panic!("{holder} is not one of the controllers started"));
    let primary = cluster.regions["a"][0];
    let failed = Instant::now();
    cluster.kill(primary);
    controllers[deciding].kill().expect("kill the deciding controller");
    let b = cluster.region_client("b");
    wait_for("b to be promoted", Duration::from_secs(40), || async {
        b.region_status().await.ok().filter(|s| s.primary == "b" && s.role == "primary")
    })
    .await;
    let rto = failed.elapsed();
    b.put("after", "v").await.expect("b takes writes");
    let [first, second] = controllers;
    let mut survivor = if deciding == 0 { second } else { first };
    survivor.kill().expect("stop the other controller");
    let said = String::from_utf8_lossy(&survivor.wait_with_output().expect("controller output").stderr).to_string();
    eprintln!("b promoted {rto:?} after the primary and the deciding controller died");
    assert!(said.contains("this controller decides now"), "the other controller never took over:\n{said}");
    // threshold x interval, plus the controller lease (3 x interval) and
    // the clock offset, plus the primary's lease and a margin for the claim.
    assert!(rto <= Duration::from_secs(15), "failover took {rto:?}");
}

/// Every key of `region` with its value (read linearizably, page by page),
/// for comparing regions.
async fn contents(cluster: &TestCluster, region: &str) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let client = cluster.region_client(region);
    let mut all = std::collections::BTreeMap::new();
    let mut start = Vec::new();
    loop {
        let range = nines::rpc::KeyRange::Range { start: start.clone(), end: Vec::new() };
        let page = client.scan(range, 10_000, nines::rpc::Consistency::Linearizable).await.expect("scan");
        let last = page.kvs.last().map(|kv| kv.key.clone());
        all.extend(page.kvs.into_iter().map(|kv| (kv.key, kv.value)));
        match (page.more, last) {
            (true, Some(mut next)) => {
                next.push(0);
                start = next;
            }
            _ => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failovers_in_a_row_then_heal_every_region_converges() {
    // Shows: a (primary) is cut off and acknowledges writes until its lease
    // runs out; b is promoted (epoch 1) and takes writes; a hears of it and
    // demotes itself, but cannot resynchronise its divergent keys (its
    // traffic to b is dropped) before every node of b dies; a is promoted
    // again (epoch 2) and b comes back. Both regions end with the same keys
    // and values: the divergent writes a still held were written again
    // and reached b (before, a kept them alone, for good).
    let _serial = serial().await;
    let mut cluster = TestCluster::start_with_authority(&[("a", 3), ("b", 3)], |c| c.fault_injection = true).await;
    let (a, b) = (cluster.region_client("a"), cluster.region_client("b"));
    wait_for("a to hold its lease", Duration::from_secs(30), || async { a.put("k-0", "a").await.ok() }).await;
    cluster.set_faults("a", &["b", nines::authority::AUTHORITY_FAULT], 0).await;
    cluster.set_faults("b", &["a"], 0).await;
    let a_quick = quick_client(&cluster, "a");
    let mut acked_by_a = 0;
    for i in 1..=40 {
        if a_quick.put(format!("k-{i}"), "a").await.is_ok() {
            acked_by_a += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(acked_by_a > 0, "a acknowledged nothing after the cut");
    let endpoints_b = cluster.endpoints(&cluster.regions["b"]);
    let out = nines(&endpoints_b, &["region", "failover", "b"]).output().expect("failover b");
    assert!(out.status.success(), "failover b: {}", String::from_utf8_lossy(&out.stderr));
    for i in 100..110 {
        b.put(format!("k-{i}"), "b").await.expect("b takes writes");
    }
    // b's shipments reach a again; a's traffic to b (its resync) stays cut.
    for id in cluster.regions["a"].clone() {
        let req = nines_proto::v1::SetFaultsRequest {
            blocked_regions: vec![nines::authority::AUTHORITY_FAULT.into()],
            send_blocked_regions: vec!["b".into()],
            ..Default::default()
        };
        cluster.client_of(&[id]).set_all_faults_on(&cluster.nodes[&id].grpc(), req).await.expect("faults");
    }
    cluster.set_faults("b", &[], 0).await;
    let divergent = wait_for("a to demote itself", Duration::from_secs(30), || async {
        a.region_status().await.ok().filter(|s| s.primary == "b" && s.divergent_count > 0).map(|s| s.divergent_count)
    })
    .await;
    for id in cluster.regions["b"].clone() {
        cluster.kill(id);
    }
    cluster.set_faults("a", &[], 0).await;
    let endpoints_a = cluster.endpoints(&cluster.regions["a"]);
    let out = nines(&endpoints_a, &["region", "failover", "a"]).output().expect("failover a");
    assert!(out.status.success(), "failover a: {}", String::from_utf8_lossy(&out.stderr));
    for id in cluster.regions["b"].clone() {
        cluster.spawn(id);
    }
    wait_for("b to follow a at epoch 2", Duration::from_secs(60), || async {
        b.region_status().await.ok().filter(|s| s.primary == "a" && s.epoch == 2)
    })
    .await;
    let (mut on_a, mut on_b) = (contents(&cluster, "a").await, contents(&cluster, "b").await);
    let deadline = Instant::now() + Duration::from_secs(60);
    while on_a != on_b && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (on_a, on_b) = (contents(&cluster, "a").await, contents(&cluster, "b").await);
    }
    eprintln!(
        "a acknowledged {acked_by_a} writes after the cut, {divergent} divergent at its demotion; at the end a holds {} \
         keys, b {}",
        on_a.len(),
        on_b.len()
    );
    let only_a: Vec<_> = on_a.keys().filter(|k| !on_b.contains_key(*k)).map(|k| String::from_utf8_lossy(k)).collect();
    assert_eq!(on_a, on_b, "the regions differ; keys only on a: {only_a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_lost_its_disks_is_rebuilt_by_a_full_sync_and_not_promoted_meanwhile() {
    // Shows: every node of b (secondary) loses its data after b had applied
    // and acknowledged all of a's writes (so a's changefeed no longer holds
    // them). b is initialized again; a notices that b reports less than it
    // acknowledged and rebuilds it from its data, page by page (100 ms
    // apart here, the simulated cross-region latency). Meanwhile b's status
    // says "full sync from a" and a promotion of b is refused; at the end b
    // holds every key with a's values. (Before, b came back empty for good
    // with a lag of 0, and could be promoted.)
    let _serial = serial().await;
    let mut cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |c| {
        c.latency.cross_region = Duration::from_millis(100);
    })
    .await;
    let a = cluster.region_client("a");
    let value = vec![b'v'; 64 * 1024];
    let keys = 160;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (a, value) = (cluster.region_client("a"), value.clone());
            tokio::spawn(async move {
                for i in (w..keys).step_by(8) {
                    a.put(format!("k-{i:04}"), value.clone()).await.expect("put");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    wait_for("a's changefeed to be collected", Duration::from_secs(60), || async {
        a.region_status().await.ok().filter(|s| s.changefeed_entries == 0 && s.peers.iter().all(|p| p.lag_entries == 0))
    })
    .await;
    let ids = cluster.regions["b"].clone();
    for id in &ids {
        cluster.kill(*id);
        cluster.wipe(*id);
    }
    for id in &ids {
        cluster.spawn(*id);
    }
    for id in &ids {
        cluster.wait_serving(*id).await;
    }
    let members: Vec<_> = ids.iter().map(|id| cluster.nodes[id].info()).collect();
    cluster.client_of(&[ids[0]]).init(&cluster.nodes[&ids[0]].grpc(), members).await.expect("init b again");
    let b = cluster.region_client("b");
    let started = Instant::now();
    let mut seen_full_sync = false;
    let mut refused = None;
    loop {
        if let Ok(s) = b.region_status().await {
            if s.full_sync_from.iter().any(|r| r == "a") {
                seen_full_sync = true;
                if refused.is_none() {
                    refused = Some(b.promote_region(1).await.expect_err("a region in full sync is not promoted"));
                }
            } else if seen_full_sync {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the full sync did not end within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let refused = refused.expect("a promotion was tried during the full sync").to_string();
    assert!(refused.contains("full sync"), "{refused}");
    let on_a = contents(&cluster, "a").await;
    let on_b = contents(&cluster, "b").await;
    eprintln!("b rebuilt by a full sync of {} keys in {took:?}; a promotion meanwhile: {refused}", on_b.len());
    assert_eq!(on_a.len(), keys);
    assert!(on_a == on_b, "b differs from a after the full sync: {} keys vs {}", on_b.len(), on_a.len());
}
