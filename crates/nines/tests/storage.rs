//! Storage seen from outside: scans read one consistent state, a power cut
//! of a whole region loses no acknowledged write, a leader's unsynced log
//! never leaves it as committed, and a data directory the node did not write
//! is refused with what to do.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, serial, wait_for};
use nines::rpc::{Consistency, KeyRange};

/// Keys between `a` and `z`, so a scan from one to the other takes time.
const FILLER_KEYS: usize = 5_000;
/// Scanners running at once.
const SCANNERS: usize = 8;
/// How long the writer and scanners run.
const RUN: Duration = Duration::from_secs(10);

fn number(value: &[u8]) -> u64 {
    std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linearizable_scan_never_sees_a_write_without_the_writes_before_it() {
    // Shows: one writer puts a = i, then z = i, with 5,000 keys between
    // them; 8 scanners read the whole range linearizably, over and over.
    // Every scan reads one state, so it sees z no newer than a.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let client = Arc::new(cluster.client());
    let fillers: Vec<_> = (0..8)
        .map(|t| {
            let c = client.clone();
            tokio::spawn(async move {
                for i in (t..FILLER_KEYS).step_by(8) {
                    c.put(format!("m-{i:05}"), "filler").await.expect("filler");
                }
            })
        })
        .collect();
    for f in fillers {
        f.await.expect("filler task");
    }
    for key in ["a", "z"] {
        client.put(key, "0").await.expect("first a and z");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 1_000_000 {
                i += 1;
                c.put("a", i.to_string()).await.expect("put a");
                c.put("z", i.to_string()).await.expect("put z");
            }
            i
        })
    };
    let scans = Arc::new(AtomicUsize::new(0));
    let scanners: Vec<_> = (0..SCANNERS)
        .map(|_| {
            let (c, stop, scans) = (client.clone(), stop.clone(), scans.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let range = KeyRange::Range { start: b"a".to_vec(), end: b"{".to_vec() };
                    let page = c.scan(range, 10_000, Consistency::Linearizable).await.expect("scan");
                    assert!(!page.more, "the whole range fits one page");
                    assert_eq!(page.kvs.len(), FILLER_KEYS + 2, "every key in the range");
                    let (a, z) = (number(&page.kvs[0].value), number(&page.kvs[FILLER_KEYS + 1].value));
                    assert!(z <= a, "a scan saw z = {z} but a = {a}: z was written after a");
                    scans.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::SeqCst);
    for s in scanners {
        s.await.expect("a scanner failed");
    }
    let writes = writer.await.expect("writer");
    let scans = scans.load(Ordering::SeqCst);
    eprintln!("{scans} scans of {} keys beside {writes} write pairs in {:?}", FILLER_KEYS + 2, started.elapsed());
    assert!(scans >= SCANNERS && writes > 10, "too little ran to show anything: {scans} scans, {writes} writes");
}

/// Writers during the power cut test, and how long they write before it.
const POWER_CUT_WRITERS: usize = 8;
const POWER_CUT_AFTER: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_of_the_whole_region_keeps_every_acknowledged_write() {
    // Shows: every node of a region on storage that keeps only what was
    // synced (`power_loss_simulation`), all three killed at once while 8
    // writers put, keep every write that was acknowledged: a follower syncs
    // an append before openraft counts it, and the leader syncs its own
    // before it applies (answers) it, whatever the state machine (synced
    // once a second) holds. Appends cut mid-write are dropped at restart.
    // With the log's sync removed this test fails: the last second of
    // acknowledged writes is gone.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(3, |c| {
        c.fault_injection = true;
        c.storage.power_loss_simulation = true;
    })
    .await;
    let client = Arc::new(cluster.client());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..POWER_CUT_WRITERS)
        .map(|w| {
            let (c, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..100_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("w{w}-{i:06}");
                    match c.put(key.clone(), i.to_string()).await {
                        Ok(_) => acked.push(key),
                        Err(_) => break, // The power went: outcome unknown.
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(POWER_CUT_AFTER).await;
    for id in 1..=3 {
        cluster.kill(id);
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(acked.len() > 50, "too few writes before the cut to show anything: {}", acked.len());
    for id in 1..=3 {
        cluster.spawn(id);
    }
    cluster.wait_leader().await;
    let client = cluster.client();
    let mut missing = Vec::new();
    for key in &acked {
        let (c, k) = (&client, key.as_str());
        let got = wait_for("a linearizable read after the restart", Duration::from_secs(30), || async move {
            c.get(k, Consistency::Linearizable).await.ok()
        })
        .await;
        if got.kv.is_none() {
            missing.push(key.clone());
        }
    }
    eprintln!("{} acknowledged writes before the power cut; {} missing after it", acked.len(), missing.len());
    assert!(missing.is_empty(), "acknowledged writes lost at the power cut: {:?}", &missing[..missing.len().min(10)]);
    for id in 1..=3 {
        assert!(!cluster.log_of(id).contains("panicked"), "node {id}: {}", cluster.log_tail(id, 20));
    }
}

/// How long the leader's log syncs are held in the stalled-sync test, and
/// when it looks: before its followers could have elected another leader
/// (the network holds a stalled leader's messages only after 250 ms, and a
/// follower campaigns after 280 ms of silence at the earliest).
const STALLED_SYNC: Duration = Duration::from_millis(3_000);
const STALLED_SYNC_LOOK: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_log_sync_stalls_answers_nothing_unsynced_and_loses_its_place() {
    // Shows: the leader acknowledges its own appends to openraft before it
    // syncs them (its sync runs beside the followers'), so openraft counts a
    // write committed once a follower synced it; yet nothing leaves the
    // leader as committed before its own sync. With the leader's log syncs
    // held 3 s (the `log_sync_delay_ms` fault), a put is not answered, and
    // no node serves it, at first; then, the leader's disk stalled, its
    // followers elect another leader, which holds the write. Without the
    // state machine's wait for the sync the put is answered at once; without
    // the cap on the commit index the leader sends, the followers serve it
    // at once (and could keep it while a node without it is elected, had the
    // leader lost power); without the stalled leader going silent it keeps
    // its place (it heartbeats on) and the region takes no writes.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |c| c.fault_injection = true).await;
    let leader = cluster.wait_leader().await;
    cluster.client().put("before", "1").await.expect("put before the fault");
    let stalled =
        nines_proto::v1::SetFaultsRequest { log_sync_delay_ms: STALLED_SYNC.as_millis() as u32, ..Default::default() };
    let leader_url = cluster.nodes[&leader].grpc();
    cluster.client_of(&[leader]).set_all_faults_on(&leader_url, stalled).await.expect("set faults");
    let client = cluster.client();
    let put = tokio::spawn(async move { client.put("held", "2").await });
    tokio::time::sleep(STALLED_SYNC_LOOK).await;
    assert!(!put.is_finished(), "the put was answered before the leader synced it: {:?}", put.await);
    for id in 1..=3 {
        let got = cluster.client_of(&[id]).get("held", Consistency::Local).await.expect("local read");
        assert!(got.kv.is_none(), "node {id} (leader {leader}) served a write its leader has not synced");
    }
    let next = wait_for("another node to lead", Duration::from_secs(10), || async {
        for id in (1..=3).filter(|id| *id != leader) {
            if cluster.status(id).await.is_some_and(|s| s.role == "leader") {
                return Some(id);
            }
        }
        None
    })
    .await;
    put.abort();
    // The new leader holds the write (both followers synced it) and commits
    // it; the old one serves it too once its disk is back.
    cluster.client_of(&[leader]).set_all_faults_on(&leader_url, Default::default()).await.expect("clear faults");
    for id in 1..=3 {
        let c = cluster.client_of(&[id]);
        wait_for(&format!("node {id} to serve the write (new leader {next})"), Duration::from_secs(15), || async {
            c.get("held", Consistency::Local).await.ok().and_then(|g| g.kv)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_unsynced_entries_at_a_power_cut_does_not_reuse_their_log_ids() {
    // Shows: a leader whose followers synced an entry it had not (its log's
    // syncs held back, the `log_sync_delay_ms` fault) loses it when the
    // whole region loses power. openraft 0.9 would restart it as leader of
    // the same term, from its saved committed vote, and its next entry would
    // reuse the lost one's log id, which the followers take as the entry
    // they hold: they would apply `held` where the leader applied `after`,
    // and never serve `after` (this test then times out waiting for it).
    // Restarted with its vote uncommitted, it campaigns for a new term, and
    // every node ends with the same writes.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(3, |c| {
        c.fault_injection = true;
        c.storage.power_loss_simulation = true;
    })
    .await;
    let leader = cluster.wait_leader().await;
    cluster.client().put("before", "1").await.expect("put before the fault");
    let base = cluster.status(leader).await.expect("leader status").last_log_index;
    let slow = nines_proto::v1::SetFaultsRequest { log_sync_delay_ms: 5_000, ..Default::default() };
    let leader_url = cluster.nodes[&leader].grpc();
    cluster.client_of(&[leader]).set_all_faults_on(&leader_url, slow).await.expect("set faults");
    let client = cluster.client();
    let put = tokio::spawn(async move { client.put("held", "2").await });
    for id in (1..=3).filter(|id| *id != leader) {
        wait_for(&format!("follower {id} to hold the entry"), Duration::from_secs(10), || async {
            cluster.status(id).await.filter(|s| s.last_log_index > base)
        })
        .await;
    }
    // A follower syncs an entry within milliseconds of holding it; the cut
    // must come before 250 ms, after which the stalled leader goes silent
    // and an election would move the region to a new term first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!put.is_finished(), "the put was answered before the leader synced it");
    for id in 1..=3 {
        cluster.kill(id);
    }
    put.abort();
    for id in 1..=3 {
        cluster.spawn(id);
    }
    cluster.wait_leader().await;
    cluster.client().put("after", "3").await.expect("a put after the restart");
    let mut held = Vec::new();
    for id in 1..=3 {
        let c = cluster.client_of(&[id]);
        wait_for(&format!("node {id} to serve `after`"), Duration::from_secs(30), || async {
            c.get("after", Consistency::Local).await.ok().and_then(|g| g.kv)
        })
        .await;
        held.push(c.get("held", Consistency::Local).await.expect("local read").kv.is_some());
    }
    assert!(held.iter().all(|h| *h == held[0]), "the nodes disagree about `held` (leader before: {leader}): {held:?}");
}

#[test]
fn a_data_directory_of_another_format_is_refused_with_what_to_do() {
    // Shows: a node pointed at a directory written by the sled engine, or
    // of an unknown format, stops at once with an error that says what it
    // found and what to do, and changes nothing in the directory.
    let table: [(&str, &str); 2] = [("db", "sled"), ("FORMAT", "format 7")];
    for (what, want) in table {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        if what == "db" {
            std::fs::create_dir(data.join("db")).unwrap();
            std::fs::write(data.join("db").join("conf"), "sled").unwrap();
        } else {
            std::fs::write(data.join("FORMAT"), "nines data directory format 7 (redb)\n").unwrap();
        }
        let before: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nines"))
            .args(["node", "--insecure", "--data-dir"])
            .arg(&data)
            .args(["--grpc-listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .output()
            .expect("run nines node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the node started");
        assert!(stderr.contains(want) && stderr.contains("empty data directory"), "{what}: {stderr}");
        let after: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(before, after, "{what}: the directory was changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_for_is_built_and_covers_what_was_applied() {
    // Shows: the admin Snapshot call makes a node build a snapshot at once
    // (the policy would not for 10,000 entries), covering its applied index,
    // and the node keeps serving.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let client = cluster.client();
    for i in 0..50 {
        client.put(format!("k{i}"), "v").await.expect("put");
    }
    let leader = cluster.wait_leader().await;
    assert_eq!(cluster.status(leader).await.expect("status").snapshot_index, 0, "no snapshot yet");
    let target = client.snapshot_on(&cluster.nodes[&leader].grpc()).await.expect("ask for a snapshot");
    assert!(target >= 50, "the applied index covers the puts: {target}");
    wait_for("the snapshot", Duration::from_secs(30), || async {
        cluster.status(leader).await.filter(|s| s.snapshot_index >= target)
    })
    .await;
    let r = client.get("k49", Consistency::Linearizable).await.expect("get after the snapshot");
    assert_eq!(r.kv.expect("k49").value, b"v");
}
