//! Measurements, not tests: each prints numbers and is ignored by default.
//! Run them on a quiet machine with a release build:
//!
//! ```sh
//! cargo test --release -p nines --test measure -- --ignored --nocapture --test-threads 1
//! ```

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, serial, wait_for};
use nines::config::{Mode, NodeConfig};
use nines::rpc::{Consistency, Error};

/// The simulated latency `nines up` uses.
fn up_latency(c: &mut NodeConfig) {
    c.latency.cross_az = Duration::from_millis(1);
    c.latency.cross_region = Duration::from_millis(40);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    eprintln!(
        "{name}: n={} p50 {:?} p99 {:?} max {:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

/// Writes `key-N` values in sequence until told to stop; returns the keys
/// whose put was acknowledged, with the times each put was invoked and
/// acknowledged.
async fn writer(
    client: nines::rpc::Client,
    stop: Arc<AtomicBool>,
    prefix: &'static str,
) -> Vec<(String, Instant, Instant)> {
    let mut acked = Vec::new();
    let mut i = 0;
    // Bounded: at most 100,000 attempts, and the test stops it far sooner.
    while !stop.load(Ordering::SeqCst) && i < 100_000 {
        let k = format!("{prefix}-{i:06}");
        let invoked = Instant::now();
        match client.put(k.clone(), k.clone()).await {
            Ok(_) => acked.push((k, invoked, Instant::now())),
            Err(Error::Indeterminate(_) | Error::Unavailable { .. }) => {}
            Err(e) => panic!("unexpected write error: {e}"),
        }
        i += 1;
    }
    acked
}

/// How a leader is lost in a failover measurement.
#[derive(Debug, Clone, Copy)]
enum LeaderLoss {
    /// kill -9: a crash.
    Kill,
    /// SIGTERM: a planned stop, which drains and hands off.
    Term,
}

/// Loses the leader `rounds` times under a running writer (`nines up`'s
/// 1 ms between AZs); returns, per round, the time from the signal to the
/// first acknowledgement of a write invoked after it.
async fn leader_loss_to_next_ack(loss: LeaderLoss, rounds: usize) -> Vec<Duration> {
    let mut cluster = TestCluster::start(3, up_latency).await;
    let mut samples = Vec::new();
    for round in 0..rounds {
        let leader = cluster.wait_leader().await;
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(writer(cluster.client(), stop.clone(), "m"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lost_at = Instant::now();
        match loss {
            LeaderLoss::Kill => cluster.kill(leader),
            LeaderLoss::Term => {
                cluster.stop(leader);
            }
        }
        wait_for("a new leader", Duration::from_secs(30), || async {
            for id in 1..=3u64 {
                if id != leader && cluster.status(id).await.is_some_and(|s| s.role == "leader") {
                    return Some(());
                }
            }
            None
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::SeqCst);
        let acked = handle.await.unwrap();
        let gap = acked
            .iter()
            .find(|(_, invoked, _)| *invoked > lost_at)
            .map(|(_, _, acked_at)| *acked_at - lost_at)
            .expect("a write invoked after the leader was lost");
        eprintln!("round {round}: {loss:?} leader {leader}; next acknowledged write after {gap:?}");
        samples.push(gap);
        cluster.spawn(leader);
        cluster.wait_serving(leader).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture to print failover times"]
async fn measure_leader_loss_to_next_acknowledged_write() {
    // Measures: over 20 kill -9s and 20 SIGTERMs of the leader, the time
    // from the signal to the next acknowledged write of a running writer.
    // Prints min/median/max of each.
    let _serial = serial().await;
    nines::cli::init_tracing(false);
    for loss in [LeaderLoss::Kill, LeaderLoss::Term] {
        let mut samples = leader_loss_to_next_ack(loss, 20).await;
        samples.sort();
        eprintln!(
            "{loss:?} leader -> next acknowledged write over {} tries: min {:?}, median {:?}, max {:?}",
            samples.len(),
            samples[0],
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        );
        assert_eq!(samples.len(), 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_replication_lag_under_steady_writes() {
    // Measures: with `nines up`'s latency (1 ms between AZs, 40 ms between
    // regions) and a steady NINES_LAG_RATE writes/s (default 200; each put
    // sent on its tick, not after the one before) in region a for 20 s:
    // (1) the lag region a reports for b (age of the oldest write b has not
    // applied), sampled every 20 ms; (2) for 400 writes spread over the
    // run, the time from the acknowledgement in a to the first local read
    // in b.
    let rate: u32 = std::env::var("NINES_LAG_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(200).clamp(1, 5_000);
    let writes = rate * 20;
    let probe_every = (writes / 400).max(1);
    let _serial = serial().await;
    let cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActiveActive, up_latency).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let a = cluster.region_client("a");
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut lag = Vec::new();
            while !stop.load(Ordering::SeqCst) && lag.len() < 5_000 {
                if let Ok(s) = a.region_status().await {
                    lag.push(Duration::from_millis(s.peers[0].lag_ms));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lag
        })
    };
    let a = Arc::new(cluster.region_client("a"));
    let b = Arc::new(cluster.region_client("b"));
    let mut puts = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    for i in 0..writes {
        ticker.tick().await;
        let (a, b) = (a.clone(), b.clone());
        puts.push(tokio::spawn(async move {
            let key = format!("lag-{i:06}");
            a.put(key.clone(), "v").await.expect("put");
            let acked = Instant::now();
            if i % probe_every != 0 {
                return None;
            }
            let deadline = acked + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(r) = b.get(key.clone(), Consistency::Local).await
                    && r.kv.is_some()
                {
                    return Some(acked.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            panic!("{key} never became visible in b");
        }));
    }
    let mut visible = Vec::new();
    for p in puts {
        visible.extend(p.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let lag = sampler.await.unwrap();
    eprintln!("{rate} writes/s in a for 20 s:");
    // For `benches/run.sh`: one JSON line per run, appended to NINES_LAG_OUT.
    if let Ok(path) = std::env::var("NINES_LAG_OUT") {
        let ms = |mut v: Vec<Duration>| {
            v.sort();
            let at = |p| percentile(&v, p).as_secs_f64() * 1e3;
            serde_json::json!({ "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
        };
        let line = serde_json::json!({ "rate": rate, "reported": ms(lag.clone()), "visible": ms(visible.clone()) });
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("NINES_LAG_OUT");
        std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()).expect("write NINES_LAG_OUT");
    }
    summary("replication lag reported by a for b (sampled every 20 ms)", lag);
    summary("ack in a -> first local read in b", visible);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_unplanned_failover_rto_and_rpo() {
    // Measures, over 5 tries: active-passive, `nines up`'s latency, the
    // controller at its defaults (1 s interval, 5 failed probes), a writer on
    // the primary at full speed; every node of the primary is killed. RTO:
    // kill to the secondary becoming primary. RPO: acknowledged writes
    // missing from the new primary, and the age at the kill of the oldest
    // of them.
    let _serial = serial().await;
    let mut rto = Vec::new();
    let mut lost = Vec::new();
    let mut rpo_ms = Vec::new();
    for attempt in 0..5 {
        let mut cluster = TestCluster::start_regions(&[("a", 3), ("b", 3)], Mode::ActivePassive, up_latency).await;
        let endpoints_b = cluster.endpoints(&cluster.regions["b"]);
        let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_nines"))
            .args(["--endpoints", &endpoints_b.join(","), "controller", "--duration", "120s"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("controller");
        let stop = Arc::new(AtomicBool::new(false));
        let a = cluster.region_client("a");
        let stop_w = stop.clone();
        let writer = tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..1_000_000u32 {
                if stop_w.load(Ordering::SeqCst) {
                    break;
                }
                let key = format!("f-{i:07}");
                if a.put(key.clone(), "v").await.is_ok() {
                    acked.push((key, Instant::now()));
                }
            }
            acked
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let killed_at = Instant::now();
        for id in cluster.regions["a"].clone() {
            cluster.kill(id);
        }
        stop.store(true, Ordering::SeqCst);
        let b = cluster.region_client("b");
        wait_for("b to be promoted", Duration::from_secs(60), || async {
            b.region_status().await.ok().filter(|s| s.role == "primary")
        })
        .await;
        let took = killed_at.elapsed();
        // The writer's last put is still retrying against the dead region.
        let acked = writer.await.unwrap();
        let _ = controller.kill();
        let _ = controller.wait();
        let mut missing: BTreeMap<String, Instant> = BTreeMap::new();
        for (key, at) in &acked {
            match b.get(key.clone(), Consistency::Local).await {
                Ok(r) if r.kv.is_some() => {}
                Ok(_) => {
                    missing.insert(key.clone(), *at);
                }
                Err(Error::Unavailable { .. }) | Err(_) => panic!("reading b failed"),
            }
        }
        let oldest = missing.values().min().map(|t| killed_at.saturating_duration_since(*t)).unwrap_or_default();
        eprintln!(
            "try {attempt}: RTO {took:?}; {} acknowledged writes, {} missing from the new primary (oldest {oldest:?} old at the kill)",
            acked.len(),
            missing.len()
        );
        rto.push(took);
        lost.push(missing.len());
        rpo_ms.push(oldest);
    }
    summary("RTO (kill of every primary node -> secondary promoted)", rto);
    lost.sort();
    eprintln!("RPO in writes: min {} median {} max {}", lost[0], lost[lost.len() / 2], lost[lost.len() - 1]);
    summary("RPO in time (age of the oldest lost write at the kill)", rpo_ms);
}

/// Keys loaded before the snapshot measurement.
const SNAPSHOT_KEYS: u64 = 1_000_000;

/// `writers` tasks putting small values until `stop`; the latency of every
/// acknowledged put. Bounded: at most 1,000,000 puts per task.
async fn write_latencies(
    client: Arc<nines::rpc::Client>,
    writers: u64,
    stop: Arc<AtomicBool>,
    prefix: &'static str,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (c, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..1_000_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let invoked = Instant::now();
                    if c.put(format!("{prefix}-{w}-{i}"), "v").await.is_ok() {
                        out.push(invoked.elapsed());
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_write_latency_during_a_snapshot_build_of_a_million_keys() {
    // Measures: three nodes, 1,000,000 keys of 100 bytes loaded (no snapshot
    // by policy); then 16 writers for 10 s with no snapshot, and the same 16
    // writers from the moment the leader is asked to build a snapshot of
    // every key until it has. Prints p50/p99 of both and how long the build
    // took.
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |c| c.raft.snapshot_logs_since_last = 1_000_000_000).await;
    let client = Arc::new(cluster.client());
    let started = Instant::now();
    let loaders: Vec<_> = (0..64u64)
        .map(|w| {
            let c = client.clone();
            tokio::spawn(async move {
                let mut k = w;
                while k < SNAPSHOT_KEYS {
                    c.put(format!("load-{k:07}"), vec![b'v'; 100]).await.expect("load put");
                    k += 64;
                }
            })
        })
        .collect();
    for l in loaders {
        l.await.expect("loader");
    }
    eprintln!("loaded {SNAPSHOT_KEYS} keys in {:?}", started.elapsed());
    let leader = cluster.wait_leader().await;
    let before = cluster.status(leader).await.expect("status").snapshot_index;

    let stop = Arc::new(AtomicBool::new(false));
    let quiet = tokio::spawn(write_latencies(client.clone(), 16, stop.clone(), "quiet"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let quiet = quiet.await.expect("quiet writers");

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(write_latencies(client.clone(), 16, stop.clone(), "during"));
    let asked = Instant::now();
    let target = client.snapshot_on(&cluster.nodes[&leader].grpc()).await.expect("ask for a snapshot");
    let built = wait_for("the leader's snapshot", Duration::from_secs(300), || async {
        let s = cluster.status(leader).await?;
        (s.snapshot_index >= target && s.snapshot_index > before).then(|| asked.elapsed())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let during = during.await.expect("writers during the build");
    summary("writes, no snapshot", quiet);
    summary("writes while the leader builds a snapshot", during);
    eprintln!("snapshot of {SNAPSHOT_KEYS}+ keys built in {built:?} (asked at applied index {target})");
}
