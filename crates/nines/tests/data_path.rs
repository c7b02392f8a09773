//! The write path under every input the limits allow: bursts of maximal
//! values from many clients, with and without a stopped follower.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, serial, wait_for};
use nines::limits::VALUE_BYTES_MAX;
use nines_client::{Client, ClientConfig};

/// Writers in a burst.
const BURST_CLIENTS: usize = 200;
/// How long a burst lasts.
const BURST: Duration = Duration::from_secs(15);
/// Acknowledgements are counted per window of this length; every window of
/// the burst must have some.
const WINDOW: Duration = Duration::from_secs(2);
/// Keys each writer cycles through (overwriting), so the key space stays
/// bounded: 200 x 4 x 256 KiB = 200 MiB at most.
const KEYS_PER_CLIENT: usize = 4;

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
                let mut i = 0usize;
                while started.elapsed() < BURST {
                    let key = format!("big-{c:03}-{}", i % KEYS_PER_CLIENT);
                    i += 1;
                    if client.put(key, value.as_slice()).await.is_ok() {
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
/// burst. The bound is 5 s on a release build (measured by
/// `tests/measure.rs`); this test runs debug builds on a shared machine, so it
/// checks that they catch up at all, with room.
const CATCH_UP_MAX: Duration = Duration::from_secs(60);

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
    wait_for("every node to apply what the leader applied", CATCH_UP_MAX, || async {
        for id in &ids {
            if cluster.status(*id).await?.applied_index < target {
                return None;
            }
        }
        Some(())
    })
    .await;
    let took = started.elapsed();
    eprintln!("every replica applied the leader's index {target} within {took:?}");
    took
}

fn signal(cluster: &TestCluster, id: u64, sig: nix::sys::signal::Signal) {
    let pid = cluster.nodes[&id].child.as_ref().expect("running").id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_maximal_values_from_200_clients_never_stalls_the_region() {
    // Shows: 200 writers of 256 KiB values (the limit) get acknowledgements in
    // every 2 s window of a 15 s burst, and afterwards the region takes a
    // small write at once with every replica caught up.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let (windows, total) = burst(Arc::new(cluster.client())).await;
    eprintln!("acknowledged per {WINDOW:?} window: {windows:?} ({total} in all)");
    assert!(windows.iter().all(|w| *w > 0), "a window without acknowledgements: {windows:?}");
    region_recovers(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_during_a_burst_of_maximal_values_catches_up() {
    // Shows: with one follower stopped (SIGSTOP) for 10 s of the burst, the
    // other two keep acknowledging, and once resumed it catches up with the
    // leader.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
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
    assert!(windows.iter().all(|w| *w > 0), "a window without acknowledgements: {windows:?}");
    region_recovers(&cluster).await;
}
