//! Backups on real processes: `nines backup create/verify/list`, a restore
//! through `nines up --restore-from` that serves every key, a flipped byte
//! that verify reports and restore refuses, a backup under write load that
//! is exactly the state at its stated index, and scheduled backups with
//! retention.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestCluster, Up, serial};
use nines::backup::{self, Target};
use nines::rpc::Consistency;
use nines::storage::snapshot::Item;

fn nines(endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nines")).args(["--endpoints", endpoints]).args(args).output().expect("run nines")
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A three-node region whose `[backup]` targets a new directory, as
/// `tweak` sets it; the directory, its URL and the cluster.
async fn backing_up(tweak: impl Fn(&mut nines::config::BackupConfig)) -> (tempfile::TempDir, String, TestCluster) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let target = url.clone();
    let cluster = TestCluster::start(3, move |c| {
        c.backup.target = target.clone();
        tweak(&mut c.backup);
    })
    .await;
    (dir, url, cluster)
}

/// Every live key and value of a backup, read through the library.
async fn backup_contents(url: &str) -> (backup::Manifest, BTreeMap<Vec<u8>, nines::types::StoredValue>) {
    let target = Target::open(url).unwrap();
    let manifest = backup::restore::choose(&target, None, Default::default()).await.unwrap();
    let mut out = BTreeMap::new();
    for chunk in &manifest.chunks {
        for item in backup::read_chunk(&target, &manifest, chunk).await.unwrap() {
            if let Item::Data { key, value } = item
                && value.value.is_some()
            {
                out.insert(key, value);
            }
        }
    }
    (manifest, out)
}

/// `nines up --regions 1 --restore-from URL` on a new data directory.
fn up_from_backup(url: &str, extra: &[&str]) -> (Up, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--restore-from", url];
    args.extend_from_slice(extra);
    (Up::start(dir.path(), &args), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_verifies_restores_whole_and_a_flipped_byte_is_refused() {
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let client = cluster.client();
    let mut written = BTreeMap::new();
    for i in 0..160u32 {
        let key = format!("key-{i:03}");
        let v = client.put(key.clone(), format!("value-{i}").repeat(1 + (i as usize % 7))).await.unwrap();
        written.insert(key, v);
    }
    // Ten deleted: the backup holds the 150 live keys only.
    for i in 150..160u32 {
        client.delete(format!("key-{i:03}")).await.unwrap();
        written.remove(&format!("key-{i:03}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("backups").display());
    let endpoints = cluster.endpoints(&[1, 2, 3]).join(",");

    let created = nines(&endpoints, &["backup", "create", "--to", &url]);
    assert!(created.status.success(), "create: {}", text(&created));
    assert!(text(&created).contains("150 keys"), "{}", text(&created));
    let verified = nines(&endpoints, &["backup", "verify", "--from", &url]);
    assert!(verified.status.success(), "verify: {}", text(&verified));
    let listed = nines(&endpoints, &["-w", "json", "backup", "list", "--from", &url]);
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("list json");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["keys"], 150, "{list}");
    assert_eq!(list[0]["region"], "test", "{list}");
    let (manifest, contents) = backup_contents(&url).await;
    assert_eq!(contents.len(), 150);
    assert!(manifest.applied_index >= 1 && manifest.hlc_max >= manifest.hlc_min, "{manifest:?}");
    drop(cluster);

    // A fresh `nines up` from the backup serves every key, versions kept.
    let (up, _up_dir) = up_from_backup(&url, &[]);
    assert!(up.printed.contains("restored backup"), "{}", up.printed);
    let restored = up.client();
    for (key, version) in &written {
        let kv = restored.get(key.clone(), Consistency::Linearizable).await.unwrap().kv.expect("restored key");
        let v = kv.version.unwrap();
        assert_eq!((v.hlc_physical_ms, v.hlc_logical), (version.hlc_physical_ms, version.hlc_logical), "{key}");
        assert_eq!(v.origin_region, "test");
    }
    for i in 150..160u32 {
        let gone = restored.get(format!("key-{i:03}"), Consistency::Linearizable).await.unwrap();
        assert!(gone.kv.is_none(), "deleted key-{i:03} came back");
    }
    // The restored region takes writes, above the restored versions.
    let after = restored.put("after-restore", "yes").await.unwrap();
    assert!(after.index > manifest.applied_index * 1024, "{after:?} vs {manifest:?}");
    up.stop();

    // One flipped byte: verify names the chunk, restore refuses and writes nothing.
    let chunk = dir.path().join("backups/backups").join(&manifest.id).join(&manifest.chunks[0].name);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&chunk, &bytes).unwrap();
    let bad = nines(&endpoints, &["backup", "verify", "--from", &url]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains(&manifest.chunks[0].name) && text(&bad).contains("corrupt"), "{}", text(&bad));
    let fresh = tempfile::tempdir().unwrap();
    let mut config =
        nines::config::NodeConfig { id: 1, region: "restored".into(), insecure: true, ..Default::default() };
    config.data_dir = fresh.path().join("node-1");
    let config_path = fresh.path().join("node-1.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let refused = nines(&endpoints, &["restore", "--from", &url, "--config", config_path.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains(&manifest.chunks[0].name), "{}", text(&refused));
    assert!(!nines::backup::restore::holds_data(&config.data_dir), "a refused restore wrote data");
    // Repaired, it restores; a directory that holds data is then refused.
    bytes[middle] ^= 0x01;
    std::fs::write(&chunk, &bytes).unwrap();
    let ok = nines(&endpoints, &["restore", "--from", &url, "--config", config_path.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(nines::backup::restore::holds_data(&config.data_dir));
    let again = nines(&endpoints, &["restore", "--from", &url, "--config", config_path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("holds data"), "{}", text(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_is_the_state_at_its_stated_index() {
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let client = Arc::new(cluster.client());
    // Four writers, each overwriting its own 25 keys in turn; every
    // acknowledged write is recorded with its version index.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, String, u64)> = Vec::new();
            let mut n = 0u32;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let key = format!("w{w}-k{:02}", n % 25);
                let value = format!("w{w}-n{n}");
                let v = client.put(key.clone(), value.clone()).await.expect("write under load");
                acked.push((key, value, v.index));
                n += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let endpoints = cluster.endpoints(&[1, 2, 3]).join(",");
    let created = nines(&endpoints, &["backup", "create", "--to", &url]);
    assert!(created.status.success(), "{}", text(&created));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let (manifest, contents) = backup_contents(&url).await;
    // Version index = log index x 1024 + position: a write is in the state
    // at applied index I exactly when its log index is at most I.
    let bound = (manifest.applied_index + 1) * 1024;
    let mut expected: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let (mut before, mut after) = (0, 0);
    for (key, value, index) in &acked {
        if *index < bound {
            before += 1;
            let e = expected.entry(key.clone()).or_insert((value.clone(), *index));
            if *index > e.1 {
                *e = (value.clone(), *index);
            }
        } else {
            after += 1;
        }
    }
    assert!(before > 100 && after > 10, "the backup ran under load: {before} writes before it, {after} after");
    let got: BTreeMap<String, (String, u64)> = contents
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k.clone()).unwrap(),
                (String::from_utf8(v.value.clone().unwrap()).unwrap(), v.version.index),
            )
        })
        .collect();
    assert_eq!(got, expected, "the backup is exactly the acknowledged state at index {}", manifest.applied_index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_takes_scheduled_backups_and_applies_the_retention() {
    let _serial = serial().await;
    let (_dir, url, cluster) = backing_up(|b| {
        b.every = Duration::from_secs(1);
        b.keep = Some(2);
    })
    .await;
    let client = cluster.client();
    client.put("scheduled", "1").await.unwrap();
    let target = Target::open(&url).unwrap();
    let leader = cluster.wait_leader().await;
    // Four backups at one a second; the retention leaves the newest two.
    let seen = common::wait_for("four scheduled backups", Duration::from_secs(30), || {
        let cluster = &cluster;
        async move {
            let metrics = metrics_of(&cluster.nodes[&leader].config.admin_listen).await?;
            let taken: f64 = metrics
                .lines()
                .find(|l| l.starts_with("nines_backups_total"))
                .and_then(|l| l.split_whitespace().last()?.parse().ok())?;
            (taken >= 4.0).then_some(metrics)
        }
    })
    .await;
    assert!(seen.contains("nines_backup_last_success_timestamp_seconds"), "{seen}");
    let manifests = target.manifests().await.unwrap();
    assert!(!manifests.is_empty() && manifests.len() <= 3, "retention keeps 2 (3 while one is taken): {manifests:?}");
    assert!(manifests.iter().all(|m| m.node_id == leader), "only the leader backs up: {manifests:?}");
    let followers: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    for f in followers {
        let m = metrics_of(&cluster.nodes[&f].config.admin_listen).await.unwrap_or_default();
        assert!(!m.contains("nines_backups_total"), "follower {f} took a backup");
    }
    let status = nines(&cluster.endpoints(&[leader]).join(","), &["-w", "json", "status"]);
    assert!(text(&status).contains("last_backup"), "{}", text(&status));
}

/// The node's `/metrics` text.
async fn metrics_of(admin: &std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_restore_holds_exactly_the_writes_stamped_before_it() {
    // A backup, then 30 s of writes archived every 500 ms; a restore to a
    // time in the middle holds exactly the writes stamped by then, and a
    // restore without a time holds every acknowledged write.
    let _serial = serial().await;
    let (_dir, url, cluster) = backing_up(|b| {
        b.every = Duration::from_secs(3600);
        b.archive_every = Duration::from_millis(500);
    })
    .await;
    let endpoints = cluster.endpoints(&[1, 2, 3]).join(",");
    // The archive turns on at the leader's first tick; the backup after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = nines(&endpoints, &["backup", "create", "--to", &url]);
    assert!(created.status.success(), "{}", text(&created));
    let client = cluster.client();
    let started = Instant::now();
    let mut acked: Vec<(String, u64, u32)> = Vec::new();
    let mut middle = None;
    while started.elapsed() < Duration::from_secs(30) {
        if middle.is_none() && started.elapsed() >= Duration::from_secs(15) {
            middle = Some(std::time::SystemTime::now());
        }
        let key = format!("pitr-{:06}", acked.len());
        let v = client.put(key.clone(), "x").await.expect("write");
        acked.push((key, v.hlc_physical_ms, v.hlc_logical));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let middle = middle.unwrap();
    let middle_ms = middle.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    // Every write stored: the archive runs every 500 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(cluster);

    let to_time = humantime::format_rfc3339_millis(middle).to_string();
    let (up, _up_dir) = up_from_backup(&url, &["--to-time", &to_time]);
    let restored = up.client();
    let (mut before, mut after) = (0, 0);
    for (key, ms, logical) in &acked {
        let kv = restored.get(key.clone(), Consistency::Linearizable).await.unwrap().kv;
        if *ms <= middle_ms {
            before += 1;
            let v = kv.unwrap_or_else(|| panic!("{key}, stamped {ms} before {middle_ms}, is missing")).version.unwrap();
            assert_eq!((v.hlc_physical_ms, v.hlc_logical), (*ms, *logical), "{key}");
        } else {
            after += 1;
            assert!(kv.is_none(), "{key}, stamped {ms} after {middle_ms}, was restored");
        }
    }
    assert!(before > 100 && after > 100, "writes on both sides of the time: {before} before, {after} after");
    up.stop();

    // Without a time: every acknowledged write, from the archive.
    let fresh = tempfile::tempdir().unwrap();
    let config = nines::config::NodeConfig { data_dir: fresh.path().join("n1"), insecure: true, ..Default::default() };
    let config_path = fresh.path().join("n1.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let all = nines(&endpoints, &["restore", "--from", &url, "--config", config_path.to_str().unwrap()]);
    assert!(all.status.success(), "{}", text(&all));
    let summary = text(&all);
    assert!(summary.contains(&format!("and {} archived writes", acked.len())), "{summary}");
}
