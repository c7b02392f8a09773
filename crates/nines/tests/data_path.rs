//! The write path under every input the limits allow: bursts of maximal
//! values from many clients, with and without a stopped follower.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, serial, wait_for};
use nines::limits::VALUE_BYTES_MAX;
use nines::rpc::{Client, ClientConfig};

/// Writers in a burst.
const BURST_CLIENTS: usize = 200;
/// How long a burst lasts: a whole number of windows, so the last window
/// is as long as the others.
const BURST: Duration = Duration::from_secs(16);
/// Acknowledgements are counted per window of this length; every window of
/// the burst must have some.
const WINDOW: Duration = Duration::from_secs(2);
/// A region whose log is compacted often, so a burst's disk use stays
/// bounded (CI machines may have well under a GiB free): a snapshot every 64
/// entries (each up to 1 MiB) with 32 kept below it holds a node's log to
/// about 100 MiB instead of every entry of the burst (several hundred MiB).
fn compact_often(c: &mut nines::config::NodeConfig) {
    c.raft.snapshot_logs_since_last = 64;
    c.raft.logs_kept_after_snapshot = 32;
}

/// Runs `BURST_CLIENTS` writers of maximal values for `BURST`; returns the
/// acknowledgements per window and in all.
async fn burst(client: Arc<Client>) -> (Vec<usize>, usize) {
    let windows: Arc<Vec<AtomicUsize>> =
        Arc::new((0..BURST.as_secs().div_ceil(WINDOW.as_secs())).map(|_| AtomicUsize::new(0)).collect());
    let started = Instant::now();
    let value = Arc::new(vec![b'v'; VALUE_BYTES_MAX]);
    let writers: Vec<_> = (0..BURST_CLIENTS)
        .map(|c| {
            let (client, windows, value) = (client.clone(), windows.clone(), value.clone());
            tokio::spawn(async move {
                // One key per writer, overwritten: the key space stays at
                // 200 x 256 KiB = 50 MiB.
                let key = format!("big-{c:03}");
                while started.elapsed() < BURST {
                    if client.put(key.clone(), value.as_slice()).await.is_ok() {
                        let w = (started.elapsed().as_secs() / WINDOW.as_secs()) as usize;
                        if let Some(slot) = windows.get(w) {
                            slot.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(BURST).await;
    // Writes still in flight at the end are abandoned: the burst is over.
    for w in writers {
        w.abort();
    }
    let counts: Vec<usize> = windows.iter().map(|w| w.load(Ordering::SeqCst)).collect();
    let total = counts.iter().sum();
    (counts, total)
}

/// How long every replica may take to apply what the leader applied after a
/// burst. On a release build it takes a few seconds; this test runs debug
/// builds with fsyncs on a shared disk, so it checks that they catch up at
/// all, with room.
const CATCH_UP_MAX: Duration = Duration::from_secs(240);

/// After a burst: a small write succeeds at once, and every node's applied
/// index reaches the leader's; returns how long that took.
async fn region_recovers(cluster: &TestCluster) -> Duration {
    let quick = ClientConfig {
        attempt_timeout: Duration::from_secs(5),
        request_deadline: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let small = Client::new(cluster.endpoints(&ids), quick).expect("client");
    let acked = small.put("after-the-burst", "small").await;
    assert!(acked.is_ok(), "a small write after the burst failed: {acked:?}");
    let leader = cluster.wait_leader().await;
    let target = cluster.status(leader).await.expect("leader status").applied_index;
    let started = Instant::now();
    loop {
        let mut behind = Vec::new();
        for id in &ids {
            let applied = cluster.status(*id).await.map(|s| s.applied_index);
            if applied.is_none_or(|a| a < target) {
                behind.push((*id, applied));
            }
        }
        if behind.is_empty() {
            break;
        }
        if started.elapsed() > CATCH_UP_MAX {
            // What the lagging nodes were doing, for whoever reads the failure.
            let logs = logs_of_every_node(cluster, 40);
            panic!(
                "after {CATCH_UP_MAX:?} not every node applied the leader's index {target}:\nbehind: {behind:?}{logs}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    eprintln!("every replica applied the leader's index {target} within {took:?}");
    took
}

/// Fails the test if a window of the burst had no acknowledgement, with
/// what each node last logged (a full disk, a stuck replication stream).
fn assert_every_window_acknowledged(cluster: &TestCluster, windows: &[usize]) {
    if windows.iter().all(|w| *w > 0) {
        return;
    }
    // A full disk stops every node's log; say how much was left.
    let df = std::process::Command::new("df").arg("-h").arg(cluster.dir.path()).output();
    let space = match df {
        Ok(out) => format!("\nspace where the nodes keep their data:\n{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => format!("\n(df failed: {e})"),
    };
    panic!("a window without acknowledgements: {windows:?}{space}{}", logs_of_every_node(cluster, 20));
}

/// The last `lines` messages of every node's log, for a failure report.
fn logs_of_every_node(cluster: &TestCluster, lines: usize) -> String {
    cluster.nodes.keys().map(|id| format!("\nnode {id}'s log ends:\n{}", cluster.log_tail(*id, lines))).collect()
}

fn signal(cluster: &TestCluster, id: u64, sig: nix::sys::signal::Signal) {
    let pid = cluster.nodes[&id].child.as_ref().expect("running").id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_maximal_values_from_200_clients_never_stalls_the_region() {
    // Shows: 200 writers of 256 KiB values (the limit) get acknowledgements in
    // every 2 s window of a 16 s burst, and afterwards the region takes a
    // small write at once with every replica caught up.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, compact_often).await;
    let (windows, total) = burst(Arc::new(cluster.client())).await;
    eprintln!("acknowledged per {WINDOW:?} window: {windows:?} ({total} in all)");
    assert_every_window_acknowledged(&cluster, &windows);
    region_recovers(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_during_a_burst_of_maximal_values_catches_up() {
    // Shows: with one follower stopped (SIGSTOP) for 10 s of the burst, the
    // other two keep acknowledging, and once resumed it catches up with the
    // leader.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, compact_often).await;
    let leader = cluster.wait_leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    let client = Arc::new(cluster.client_of(&[leader]));
    let run = tokio::spawn(burst(client));
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&cluster, follower, nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(10)).await;
    signal(&cluster, follower, nix::sys::signal::Signal::SIGCONT);
    let (windows, total) = run.await.expect("burst");
    eprintln!("acknowledged per {WINDOW:?} window: {windows:?} ({total} in all)");
    assert_every_window_acknowledged(&cluster, &windows);
    region_recovers(&cluster).await;
}

/// Two regions, `nines up`'s 40 ms between them, fault hooks on.
fn two_regions(c: &mut nines::config::NodeConfig) {
    c.latency.cross_region = Duration::from_millis(40);
    c.latency.cross_az = Duration::from_millis(1);
    c.fault_injection = true;
}

async fn local_get(c: &Client, key: &str) -> Option<nines::rpc::KeyValue> {
    c.get(key.to_string(), nines::rpc::Consistency::Local).await.ok()?.kv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_under_steady_writes_from_the_peer_region_leave_no_changefeed_backlog() {
    // Shows: while eu-west writes other keys continuously (about 500 a
    // second), us-east deletes 20,000 keys; once eu-west has them all,
    // us-east's changefeed (the tombstones waiting to be collected) drains
    // to nothing. Before, every acknowledgement named a newer eu-west write
    // than us-east held, and no tombstone was ever collected.
    const DELETES: usize = 20_000;
    const DELETERS: usize = 32;
    const PEER_WRITERS: usize = 8;
    let _serial = serial().await;
    let cluster =
        TestCluster::start_regions(&[("us-east", 3), ("eu-west", 3)], nines::config::Mode::ActiveActive, two_regions)
            .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peer_writes = Arc::new(AtomicUsize::new(0));
    let eu = Arc::new(cluster.region_client("eu-west"));
    let writers: Vec<_> = (0..PEER_WRITERS)
        .map(|w| {
            let (eu, stop, count) = (eu.clone(), stop.clone(), peer_writes.clone());
            tokio::spawn(async move {
                // 8 writers at one put per 16 ms each: about 500 a second.
                let mut tick = tokio::time::interval(Duration::from_millis(16));
                for i in 0..100_000usize {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    tick.tick().await;
                    if eu.put(format!("eu-{w}-{i}"), "v").await.is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let us = Arc::new(cluster.region_client("us-east"));
    let deleters: Vec<_> = (0..DELETERS)
        .map(|d| {
            let us = us.clone();
            tokio::spawn(async move {
                for i in (d..DELETES).step_by(DELETERS) {
                    us.delete(format!("gone-{i:05}")).await.expect("delete");
                }
            })
        })
        .collect();
    for d in deleters {
        d.await.expect("deleter");
    }
    let written_during = peer_writes.load(Ordering::SeqCst);
    // "Shipped": eu-west has applied every us-east write.
    wait_for("eu-west to apply every delete", Duration::from_secs(120), || async {
        let s = us.region_status().await.ok()?;
        s.peers.iter().all(|p| p.lag_entries == 0 && p.acked_index > 0).then_some(())
    })
    .await;
    let shipped = Instant::now();
    let drained = wait_for("us-east's changefeed to drain", Duration::from_secs(30), || async {
        let s = us.region_status().await.ok()?;
        (s.changefeed_entries == 0).then_some(shipped.elapsed())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    eprintln!(
        "{DELETES} deletes in us-east beside {written_during} eu-west writes; changefeed empty {drained:?} after eu-west had them"
    );
    assert!(written_during > 100, "eu-west kept writing during the deletes ({written_during})");
    assert!(local_get(&us, "gone-00007").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_clock_ten_minutes_ahead_for_one_write_does_not_hold_up_later_writes() {
    // Shows: us-east's leader stamps one write with a clock 10 minutes ahead,
    // then its clock steps back. It refuses to stamp and steps down; the new
    // leader's writes reach eu-west within 2 s each, and the odd write
    // reaches it too (applied with its time, never adopted by eu-west's clock).
    let _serial = serial().await;
    let cluster =
        TestCluster::start_regions(&[("us-east", 3), ("eu-west", 1)], nines::config::Mode::ActiveActive, two_regions)
            .await;
    let leader = cluster.wait_leader_in("us-east").await;
    let endpoint = cluster.nodes[&leader].grpc();
    let to_leader = cluster.client_of(&[leader]);
    to_leader.set_faults_on(&endpoint, vec![], 10 * 60 * 1000).await.expect("clock ahead");
    let jumped = to_leader.put("jumped", "x").await.expect("put with the clock ahead");
    to_leader.set_faults_on(&endpoint, vec![], 0).await.expect("clock back");
    let us = cluster.region_client("us-east");
    let eu = cluster.region_client("eu-west");
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let key = format!("after-{i}");
        let v = us.put(key.clone(), "y").await.expect("a write after the step back");
        assert!(v.hlc_physical_ms < jumped.hlc_physical_ms, "{key} was stamped by a sane clock: {v:?}");
        let acked = Instant::now();
        wait_for(&format!("{key} in eu-west"), Duration::from_secs(30), || async {
            local_get(&eu, &key).await.map(|_| ())
        })
        .await;
        worst = worst.max(acked.elapsed());
    }
    eprintln!("writes after the step back reached eu-west within {worst:?} (worst of 10)");
    assert!(worst <= Duration::from_secs(2), "a write took {worst:?} to reach eu-west");
    let there = local_get(&eu, "jumped").await.expect("the odd write converges");
    assert_eq!(there.version.map(|v| v.hlc_physical_ms), Some(jumped.hlc_physical_ms));
    let new_leader = cluster.wait_leader_in("us-east").await;
    assert_ne!(new_leader, leader, "the node whose clock ran ahead stepped down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_another_replication_setup_refuses_to_start_naming_the_field() {
    // Shows: the region's setup is replicated; a node whose file now says
    // active-passive (the region replicated active-active) refuses to start
    // and names cluster.mode; the others serve on, and the node restarted
    // with the region's setup catches up to the same state.
    let _serial = serial().await;
    let mut cluster =
        TestCluster::start_regions(&[("us-east", 3), ("eu-west", 1)], nines::config::Mode::ActiveActive, two_regions)
            .await;
    let us = cluster.region_client("us-east");
    wait_for("the setup to be replicated", Duration::from_secs(30), || async {
        us.region_status().await.ok()?.setup.map(|_| ())
    })
    .await;
    us.put("before", "1").await.expect("put");
    let node = cluster.regions["us-east"][2];
    cluster.stop(node);
    let original = cluster.nodes[&node].config.clone();
    let mut changed = original.clone();
    changed.cluster.mode = nines::config::Mode::ActivePassive;
    changed.cluster.primary = "us-east".into();
    let path = cluster.nodes[&node].config_path.clone();
    std::fs::write(&path, toml::to_string(&changed).unwrap()).unwrap();
    cluster.spawn(node);
    let status = cluster.wait_exit(node, Duration::from_secs(30)).expect("the node must refuse to start");
    assert!(!status.success());
    let log = cluster.log_of(node);
    assert!(log.contains("cluster.mode") && log.contains("active-active"), "{log}");
    us.put("during", "2").await.expect("the other nodes serve on");
    std::fs::write(&path, toml::to_string(&original).unwrap()).unwrap();
    cluster.spawn(node);
    cluster.wait_serving(node).await;
    let leader = cluster.wait_leader_in("us-east").await;
    let target = cluster.status(leader).await.expect("leader").applied_index;
    cluster.wait_applied(node, target).await;
    let alone = cluster.client_of(&[node]);
    for key in ["before", "during"] {
        assert!(local_get(&alone, key).await.is_some(), "{key} on the restarted node");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_with_a_version_read_in_the_other_region_never_matches_a_different_write() {
    // Shows: a version read in us-east names its write (hlc and origin) in
    // eu-west too: a CAS there succeeds while that write is current, and
    // fails once eu-west has replaced it with a different write.
    let _serial = serial().await;
    let cluster =
        TestCluster::start_regions(&[("us-east", 1), ("eu-west", 1)], nines::config::Mode::ActiveActive, two_regions)
            .await;
    let (us, eu) = (cluster.region_client("us-east"), cluster.region_client("eu-west"));
    us.put("k", "from-us").await.expect("put");
    let read_in_us =
        us.get("k", nines::rpc::Consistency::Linearizable).await.expect("get").kv.unwrap().version.unwrap();
    wait_for("k in eu-west", Duration::from_secs(30), || async { local_get(&eu, "k").await.map(|_| ()) }).await;
    let ok = eu.compare_and_swap("k", "cas-1", nines::rpc::Expect::Write(read_in_us.clone())).await.expect("cas");
    assert!(ok.succeeded, "the write read in us-east is current in eu-west");
    eu.put("k", "from-eu").await.expect("a different write in eu-west");
    let again = eu.compare_and_swap("k", "cas-2", nines::rpc::Expect::Write(read_in_us)).await.expect("cas");
    assert!(!again.succeeded, "a different write is current: the CAS must fail");
    assert_eq!(local_get(&eu, "k").await.unwrap().value, b"from-eu");
}
