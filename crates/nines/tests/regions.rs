//! Several regions, each its own Raft group, replicating asynchronously and
//! last-writer-wins; region roles, switchover, failover and divergence. All
//! on real node processes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, http_get, serial, wait_at_least, wait_for};
use nines::config::{Mode, NodeConfig};
use nines::rpc::{Client, Consistency, Error, Version};

/// Cross-region latency in these tests: enough that shipping visibly lags,
/// small enough to keep the tests short.
fn with_latency(c: &mut NodeConfig) {
    c.latency.cross_region = Duration::from_millis(20);
    c.latency.cross_az = Duration::from_millis(1);
    c.fault_injection = true;
}

fn hlc_origin(v: &Version) -> (u64, u32, String) {
    (v.hlc_physical_ms, v.hlc_logical, v.origin_region.clone())
}

async fn local_get(c: &Client, key: &str) -> Option<(Vec<u8>, Version)> {
    let r = c.get(key.to_string(), Consistency::Local).await.expect("local read");
    r.kv.map(|kv| (kv.value, kv.version.expect("version")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_active_concurrent_writers_converge_to_the_greatest_version() {
    // Shows: writers in two regions on overlapping keys; afterwards every key
    // reads the same value and version in both regions, and that version is
    // the greatest (hlc, origin) acknowledged for the key.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActiveActive, with_latency).await;
    let mut writers = Vec::new();
    for region in ["a", "b"] {
        let client = cluster.region_client(region);
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, Vec<u8>, Version)> = Vec::new();
            for i in 0..200 {
                let key = format!("k{}", i % 17);
                let value = format!("{region}-{i}").into_bytes();
                let v = client.put(key.clone(), value.clone()).await.expect("put");
                acked.push((key, value, v));
            }
            acked
        }));
    }
    let mut greatest: BTreeMap<String, (Vec<u8>, Version)> = BTreeMap::new();
    for w in writers {
        for (key, value, v) in w.await.unwrap() {
            let replace = greatest.get(&key).is_none_or(|(_, g)| hlc_origin(g) < hlc_origin(&v));
            if replace {
                greatest.insert(key, (value, v));
            }
        }
    }
    cluster.wait_converged().await;
    let (a, b) = (cluster.region_client("a"), cluster.region_client("b"));
    for (key, (value, v)) in &greatest {
        let (va, ver_a) = local_get(&a, key).await.expect("key in a");
        let (vb, ver_b) = local_get(&b, key).await.expect("key in b");
        assert_eq!(va, vb, "{key}: regions disagree");
        assert_eq!(hlc_origin(&ver_a), hlc_origin(&ver_b), "{key}: versions disagree");
        assert_eq!(&va, value, "{key}: not the greatest acknowledged write");
        assert_eq!(hlc_origin(&ver_a), hlc_origin(v), "{key}: version is not the greatest acknowledged");
    }
}

/// Writes unique keys `{prefix}-{i}` through `client` until `stop`; returns
/// the acknowledged keys and the keys whose outcome is unknown.
async fn unique_writer(
    client: Client,
    prefix: String,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> (Vec<String>, Vec<String>) {
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    // Bounded: the test stops it long before.
    for i in 0..50_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("{prefix}-{i:06}");
        match client.put(key.clone(), key.clone()).await {
            Ok(_) => {
                acked.push(key);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(Error::Indeterminate(_)) => unknown.push(key),
            Err(Error::Unavailable { .. }) => {}
            Err(e) => panic!("unexpected write error: {e}"),
        }
    }
    (acked, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_between_regions_under_writes_then_restored_converges_without_loss() {
    // Shows: with the link between two regions cut, both keep taking writes
    // and the lag grows; once it is restored both converge and every
    // acknowledged write is in both regions.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActiveActive, with_latency).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let writers: Vec<_> = ["a", "b"]
        .iter()
        .zip(&counts)
        .map(|(r, c)| tokio::spawn(unique_writer(cluster.region_client(r), format!("w{r}"), stop.clone(), c.clone())))
        .collect();
    wait_at_least(&counts[0], 50).await;
    cluster.set_faults("a", &["b"], 0).await;
    cluster.set_faults("b", &["a"], 0).await;
    let before = counts[0].load(Ordering::SeqCst);
    wait_at_least(&counts[0], before + 100).await;
    let s = cluster.region_client("a").region_status().await.unwrap();
    assert!(s.peers[0].lag_entries > 0, "a cut link must show lag: {s:?}");
    cluster.set_faults("a", &[], 0).await;
    cluster.set_faults("b", &[], 0).await;
    let before = counts[0].load(Ordering::SeqCst);
    wait_at_least(&counts[0], before + 50).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap().0);
    }
    cluster.wait_converged().await;
    for region in ["a", "b"] {
        let c = cluster.region_client(region);
        for key in &acked {
            assert!(local_get(&c, key).await.is_some(), "acknowledged {key} missing in region {region}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_leaders_killed_while_shipping_resume_without_gap_or_duplicate() {
    // Shows: killing the shipping region's leader, then the receiving
    // region's leader, under writes: afterwards the receiver applied every
    // write of the origin exactly once (its per-origin application counter
    // equals the origin's number of writes) and holds every one of them.
    let _serial = serial().await;
    let mut cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActiveActive, with_latency).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(unique_writer(cluster.region_client("a"), "s".into(), stop.clone(), count.clone()));
    wait_at_least(&count, 150).await;
    let leader_a = cluster.wait_leader_in("a").await;
    cluster.kill(leader_a);
    let n = count.load(Ordering::SeqCst);
    wait_at_least(&count, n + 150).await;
    let leader_b = cluster.wait_leader_in("b").await;
    cluster.kill(leader_b);
    let n = count.load(Ordering::SeqCst);
    wait_at_least(&count, n + 150).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, _) = writer.await.unwrap();
    cluster.wait_converged().await;
    assert_b_applied_every_write_of_a_once(&cluster, b"s", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_overtaking_each_other_apply_in_order_without_gap_or_duplicate() {
    // Shows: with each of a's shipments to b held back a random 0-60 ms more
    // (on top of the 20 ms latency), shipments in flight together overtake
    // each other (b counts them), and b still applies every write of a
    // exactly once and holds every acknowledged one. A receiver that applied
    // a shipment over a gap would skip the writes of the one overtaken.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActiveActive, with_latency).await;
    for id in &cluster.regions["a"] {
        let jitter = nines_proto::v1::SetFaultsRequest { ship_jitter_ms: 60, ..Default::default() };
        cluster.client_of(&[*id]).set_all_faults_on(&cluster.nodes[id].grpc(), jitter).await.expect("set faults");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(unique_writer(cluster.region_client("a"), format!("s{w}"), stop.clone(), count.clone())))
        .collect();
    wait_at_least(&count, 2_000).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap().0);
    }
    cluster.wait_converged().await;
    let mut overtaken = 0;
    for id in &cluster.regions["b"] {
        let (_, metrics) = http_get(&format!("http://{}/metrics", cluster.nodes[id].config.admin_listen)).await;
        overtaken += metrics
            .lines()
            .filter(|l| l.starts_with("nines_shipments_out_of_order_total{origin=\"a\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    assert!(overtaken > 0, "the jitter must make shipments overtake each other; none did");
    assert_b_applied_every_write_of_a_once(&cluster, b"s", &acked).await;
}

/// Every write that originated in a (acknowledged or not) is a key starting
/// with `prefix` in a: b must have applied each exactly once (its counter of
/// writes applied from a equals their number), and hold every `acked` key.
async fn assert_b_applied_every_write_of_a_once(cluster: &TestCluster, prefix: &[u8], acked: &[String]) {
    let a = cluster.region_client("a");
    let mut written = BTreeSet::new();
    let mut start = prefix.to_vec();
    let mut end = prefix.to_vec();
    *end.last_mut().expect("a prefix") += 1;
    loop {
        let page = a
            .scan(
                nines::rpc::KeyRange::Range { start: start.clone(), end: end.clone() },
                10_000,
                Consistency::Linearizable,
            )
            .await
            .expect("scan a");
        for kv in &page.kvs {
            written.insert(kv.key.clone());
        }
        if !page.more {
            break;
        }
        start = page.kvs.last().unwrap().key.clone();
        start.push(0);
    }
    let status_b = cluster.region_client("b").region_status().await.unwrap();
    let from_a = status_b.origins.iter().find(|o| o.origin == "a").expect("origin a");
    assert_eq!(
        from_a.applied_total,
        written.len() as u64,
        "b applied {} writes from a, a holds {}: a gap or a duplicate",
        from_a.applied_total,
        written.len()
    );
    let b = cluster.region_client("b");
    for key in acked {
        assert!(local_get(&b, key).await.is_some(), "acknowledged {key} missing in b");
    }
}

fn nines(endpoints: &[String], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["--endpoints", &endpoints.join(",")])
        .args(args)
        .output()
        .expect("run nines")
}

/// Writes unique keys to whichever region is primary, switching region when
/// the current one names another primary.
async fn following_writer(
    clients: Vec<(String, Client)>,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> (Vec<String>, Vec<String>) {
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    let mut current = 0;
    for i in 0..50_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("p-{i:06}");
        match clients[current].1.put(key.clone(), key.clone()).await {
            Ok(_) => {
                acked.push(key);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(Error::FailedPrecondition(msg)) => {
                assert!(msg.contains("secondary"), "{msg}");
                current = (current + 1) % clients.len();
            }
            Err(Error::Indeterminate(_)) => unknown.push(key),
            Err(Error::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("unexpected write error: {e}"),
        }
    }
    (acked, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_passive_planned_switchover_under_a_writer_loses_no_acknowledged_write() {
    // Shows: `nines region promote b` while a writer runs: the old primary
    // stops taking writes, drains, b is promoted, the writer follows, and
    // every acknowledged write is in both regions; nothing is divergent.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, with_latency).await;
    let err = cluster.region_client("b").put("x", "y").await.expect_err("secondary refuses writes");
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("primary region a")), "{err}");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let clients = vec![("a".to_string(), cluster.region_client("a")), ("b".to_string(), cluster.region_client("b"))];
    let writer = tokio::spawn(following_writer(clients, stop.clone(), count.clone()));
    wait_at_least(&count, 200).await;
    let endpoints_a = cluster.endpoints(&cluster.regions["a"]);
    let out = nines(&endpoints_a, &["region", "promote", "b"]);
    assert!(out.status.success(), "promote: {}", String::from_utf8_lossy(&out.stderr));
    let n = count.load(Ordering::SeqCst);
    wait_at_least(&count, n + 200).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, _) = writer.await.unwrap();
    let s = cluster.region_client("b").region_status().await.unwrap();
    assert_eq!((s.role.as_str(), s.epoch), ("primary", 1), "{s:?}");
    wait_for("a to demote itself", Duration::from_secs(30), || async {
        cluster.region_client("a").region_status().await.ok().filter(|s| s.role == "secondary")
    })
    .await;
    cluster.wait_converged().await;
    for region in ["a", "b"] {
        let c = cluster.region_client(region);
        for key in &acked {
            assert!(local_get(&c, key).await.is_some(), "acknowledged {key} missing in {region}");
        }
    }
    let d = cluster.region_client("a").divergent(0).await.unwrap();
    assert_eq!(d.total, 0, "a planned switchover leaves nothing divergent: {d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_passive_unplanned_failover_promotes_and_divergence_counts_every_lost_write() {
    // Shows: with every node of the primary killed under writes, the
    // controller promotes the secondary within interval x threshold plus an
    // election (with slack for a loaded machine); the acknowledged writes
    // missing from the new primary are exactly the old primary's divergence
    // record (plus at most the one write whose outcome the writer never
    // learned), once the old primary returns and demotes itself.
    let _serial = serial().await;
    let mut cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, |c| {
        with_latency(c);
        // A slow link, so that writes are still in flight when a dies.
        c.latency.cross_region = Duration::from_millis(150);
    })
    .await;
    let endpoints_b = cluster.endpoints(&cluster.regions["b"]);
    let mut controller = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args([
            "--endpoints",
            &endpoints_b.join(","),
            "controller",
            "--interval",
            "300ms",
            "--threshold",
            "3",
            "--duration",
            "120s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start controller");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(unique_writer(cluster.region_client("a"), "f".into(), stop.clone(), count.clone()));
    wait_at_least(&count, 300).await;
    let killed_at = Instant::now();
    for id in cluster.regions["a"].clone() {
        cluster.kill(id);
    }
    stop.store(true, Ordering::SeqCst);
    let b = cluster.region_client("b");
    wait_for("the controller to promote b", Duration::from_secs(60), || async {
        b.region_status().await.ok().filter(|s| s.role == "primary")
    })
    .await;
    let rto = killed_at.elapsed();
    // The writer's last put may still be retrying against the dead region.
    let (acked, unknown) = writer.await.unwrap();
    eprintln!("failover: b primary {rto:?} after a was lost");
    // interval x threshold (0.9 s) plus an election, with generous slack for
    // a loaded two-core machine: a bound, not a speed claim.
    assert!(rto < Duration::from_millis(300 * 3) + Duration::from_secs(10), "promotion took {rto:?}");
    let _ = controller.kill();
    let _ = controller.wait();

    let mut missing = BTreeSet::new();
    for key in &acked {
        if local_get(&b, key).await.is_none() {
            missing.insert(key.clone());
        }
    }
    eprintln!("acknowledged writes: {}, missing from the new primary: {}", acked.len(), missing.len());
    for id in cluster.regions["a"].clone() {
        cluster.spawn(id);
    }
    let a = cluster.region_client("a");
    let d = wait_for("a to demote itself", Duration::from_secs(60), || async {
        let s = a.region_status().await.ok()?;
        (s.role == "secondary").then_some(())?;
        a.divergent(0).await.ok()
    })
    .await;
    let divergent: BTreeSet<String> =
        d.records.iter().map(|r| String::from_utf8_lossy(&r.kv.as_ref().unwrap().key).into_owned()).collect();
    assert_eq!(d.total as usize, divergent.len());
    let unknown: BTreeSet<String> = unknown.into_iter().collect();
    let divergent_acked: BTreeSet<String> = divergent.difference(&unknown).cloned().collect();
    assert_eq!(divergent_acked, missing, "divergence record vs acknowledged writes missing from the new primary");
    assert!(divergent.len() - divergent_acked.len() <= 1, "at most the one in-flight write is unacknowledged");
    // The old primary then takes the new primary's values for those keys:
    // the regions agree again.
    for key in &divergent {
        wait_for(&format!("{key} resynchronised in a"), Duration::from_secs(30), || async {
            let (in_a, in_b) = (local_get(&a, key).await, local_get(&b, key).await);
            (in_a.map(|(v, _)| v) == in_b.map(|(v, _)| v)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_beyond_the_maximum_offset_is_applied_but_never_adopted_and_reported() {
    // Shows: a region whose clock runs 10 s ahead (the maximum offset is
    // 500 ms) ships timestamps the other region does not adopt into its
    // clock: counted in its region status and logged. The write itself
    // applies (regions converge), and the receiver's own next write is
    // stamped by its own time, not 10 s ahead.
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 1), ("b", 1)], Mode::ActiveActive, with_latency).await;
    cluster.set_faults("a", &[], 10_000).await;
    let v = cluster.region_client("a").put("ahead", "x").await.expect("put");
    let b = cluster.region_client("b");
    let s = wait_for("b to count a's timestamps as too far ahead", Duration::from_secs(30), || async {
        let s = b.region_status().await.ok()?;
        let o = s.origins.iter().find(|o| o.origin == "a")?;
        (o.refused_clock_total > 0).then_some(o.refused_clock_total)
    })
    .await;
    assert!(s > 0);
    let (value, version) = local_get(&b, "ahead").await.expect("the write applies in b");
    assert_eq!((value.as_slice(), version.hlc_physical_ms), (&b"x"[..], v.hlc_physical_ms), "with its own timestamp");
    let ours = b.put("later-in-b", "y").await.expect("put in b");
    assert!(
        ours.hlc_physical_ms < v.hlc_physical_ms,
        "b's clock did not adopt a's time: b stamped {ours:?} after seeing {v:?}"
    );
    let b_node = cluster.regions["b"][0];
    assert!(cluster.log_of(b_node).contains("too far ahead"), "{}", cluster.log_of(b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpo_guard_stops_writes_while_no_secondary_acknowledges_and_resumes_after_heal() {
    // Shows: with `replication.max_rpo`, a primary cut off from its
    // secondary acknowledges writes for at most max_rpo (plus a probe), then
    // refuses them naming the lag, and takes writes again once healed.
    let _serial = serial().await;
    let max_rpo = Duration::from_secs(1);
    let cluster = TestCluster::start_regions(&[("a", 1), ("b", 1)], Mode::ActivePassive, |c| {
        with_latency(c);
        c.replication.max_rpo = max_rpo;
    })
    .await;
    let config = nines::rpc::ClientConfig { attempts_max: 1, ..Default::default() };
    let client = Client::new(cluster.endpoints(&cluster.regions["a"]), config).unwrap();
    wait_for("the region's setup", Duration::from_secs(30), || async { client.put("first", "v").await.ok() }).await;
    // A working link: nothing is refused.
    let healthy = Instant::now();
    let mut n = 0;
    while healthy.elapsed() < Duration::from_secs(2) {
        client.put(format!("healthy-{n}"), "v").await.expect("the guard refused a write on a working link");
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.set_faults("a", &["b"], 0).await;
    cluster.set_faults("b", &["a"], 0).await;
    let cut = Instant::now();
    let mut last_ack = cut;
    let refusal = loop {
        assert!(cut.elapsed() < Duration::from_secs(30), "the guard never refused a write");
        match client.put(format!("cut-{n}"), "v").await {
            Ok(_) => last_ack = Instant::now(),
            Err(e) => break e.to_string(),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(refusal.contains("RPO guard") && refusal.contains("max_rpo"), "{refusal}");
    // What the secondary lacks spans at most max_rpo, a probe and this
    // machine's scheduling.
    let unreplicated = last_ack - cut;
    assert!(unreplicated <= max_rpo + Duration::from_secs(1), "writes acknowledged for {unreplicated:?} after the cut");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(client.put("still-cut", "v").await.is_err(), "writes resumed while the link is still cut");
    cluster.set_faults("a", &[], 0).await;
    cluster.set_faults("b", &[], 0).await;
    wait_for("writes to resume after the heal", Duration::from_secs(30), || async {
        client.put("healed", "v").await.ok()
    })
    .await;
}
