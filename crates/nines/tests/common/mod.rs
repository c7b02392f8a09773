//! A test cluster of real `nines node` processes on loopback, each in its own
//! directory under one temporary directory. Every child is killed on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nines::config::{ClusterConfig, Mode, NodeConfig, RegionConfig};
use nines::rpc::{Client, ClientConfig, NodeInfo, StatusResponse};

/// Cluster tests run one at a time: three node processes per test on a
/// two-core machine is already a full load, and elections under a heavier
/// one would test the machine rather than nines.
/// A tokio mutex: it is held across `.await` for the whole test, and works
/// across the separate runtime each test starts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// [`serial`] for tests that are not async.
pub fn serial_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

/// GETs an admin HTTP URL through `nines health`: the status code (200 on
/// success) and everything it printed (the body included).
pub async fn http_get(url: &str) -> (u16, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["health", url])
        .output()
        .await
        .expect("run nines health");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let code = text.split_whitespace().find_map(|w| w.parse::<u16>().ok()).unwrap_or(0);
    (if out.status.success() { 200 } else { code }, text)
}

/// A port that was free a moment ago, chosen below the kernel's ephemeral
/// range: a node restarted on its old port must not find it taken as the
/// source port of some outgoing connection in the meantime.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Never hand out a port twice in one test process: a port picked for a
    // node that has not bound it yet still looks free.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in 20000..32000 after 1000 tries");
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `count` reaches `n` (acknowledged writes counted by a
/// writer task), for at most a minute.
pub async fn wait_at_least(count: &std::sync::atomic::AtomicUsize, n: usize) {
    wait_for(&format!("{n} acknowledged writes"), Duration::from_secs(60), || async {
        (count.load(std::sync::atomic::Ordering::SeqCst) >= n).then_some(())
    })
    .await
}

/// The authority's region name in [`TestCluster::start_with_authority`].
pub const AUTHORITY: &str = "authority";

pub struct TestNode {
    pub config: NodeConfig,
    pub config_path: PathBuf,
    pub child: Option<Child>,
}

impl TestNode {
    pub fn grpc(&self) -> String {
        format!("http://{}", self.config.grpc_listen)
    }

    /// Its peer URL (Raft, shipments).
    pub fn peer(&self) -> String {
        format!("http://{}", self.config.peer_listen)
    }

    pub fn info(&self) -> NodeInfo {
        nines::convert::info_to_proto(self.config.id, &nines::types::NodeInfo::listening(&self.config))
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, TestNode>,
    /// Region name -> its node ids (ids are unique across regions).
    pub regions: BTreeMap<String, Vec<u64>>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl TestCluster {
    /// Starts `n` nodes (one per AZ) of one region, bootstraps them and
    /// waits for a leader. `tweak` adjusts each node's config.
    pub async fn start(n: u64, tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        Self::start_regions(&[("test", n)], Mode::ActiveActive, tweak).await
    }

    /// Starts several regions (name, nodes), each its own Raft group, all
    /// replicating to each other; in active-passive mode the first region is
    /// the primary. Node ids run on across regions.
    pub async fn start_regions(spec: &[(&str, u64)], mode: Mode, tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        Self::start_inner(spec, mode, false, tweak).await
    }

    /// [`Self::start_regions`] in active-passive mode, plus a three-node
    /// authority (region `authority`, not one of the cluster's regions)
    /// that holds the primary's lease and allocates epochs.
    pub async fn start_with_authority(spec: &[(&str, u64)], tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        Self::start_inner(spec, Mode::ActivePassive, true, tweak).await
    }

    async fn start_inner(
        spec: &[(&str, u64)],
        mode: Mode,
        with_authority: bool,
        tweak: impl Fn(&mut NodeConfig),
    ) -> TestCluster {
        let cluster_regions = spec;
        let mut spec = spec.to_vec();
        if with_authority {
            spec.push((AUTHORITY, 3));
        }
        let spec = &spec[..];
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = BTreeMap::new();
        let mut regions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut next = 1;
        let mut ports = BTreeMap::new();
        for (region, n) in spec {
            for _ in 0..*n {
                ports.insert(next, (free_port(), free_port(), free_port()));
                regions.entry(region.to_string()).or_default().push(next);
                next += 1;
            }
        }
        let cluster_config = ClusterConfig {
            mode,
            primary: if mode == Mode::ActivePassive { spec[0].0.to_string() } else { String::new() },
            authority: if with_authority {
                regions[AUTHORITY].iter().map(|id| format!("http://127.0.0.1:{}", ports[id].0)).collect()
            } else {
                Vec::new()
            },
            regions: if cluster_regions.len() > 1 {
                cluster_regions
                    .iter()
                    .map(|(r, _)| RegionConfig {
                        name: r.to_string(),
                        endpoints: regions[*r].iter().map(|id| format!("http://127.0.0.1:{}", ports[id].0)).collect(),
                        peer_endpoints: regions[*r]
                            .iter()
                            .map(|id| format!("http://127.0.0.1:{}", ports[id].2))
                            .collect(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            ..ClusterConfig::default()
        };
        for (region, ids) in &regions {
            for (i, id) in ids.iter().enumerate() {
                let mut config = NodeConfig {
                    id: *id,
                    region: region.clone(),
                    az: format!("{region}-{}", (b'a' + i as u8) as char),
                    data_dir: dir.path().join(format!("node-{id}")),
                    grpc_listen: ([127, 0, 0, 1], ports[id].0).into(),
                    admin_listen: ([127, 0, 0, 1], ports[id].1).into(),
                    peer_listen: ([127, 0, 0, 1], ports[id].2).into(),
                    cluster: if region == AUTHORITY { ClusterConfig::default() } else { cluster_config.clone() },
                    insecure: true,
                    ..NodeConfig::default()
                };
                tweak(&mut config);
                let config_path = dir.path().join(format!("node-{id}.toml"));
                std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
                nodes.insert(*id, TestNode { config, config_path, child: None });
            }
        }
        let mut cluster = TestCluster { dir, nodes, regions };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in &ids {
            cluster.spawn(*id);
        }
        for id in &ids {
            cluster.wait_serving(*id).await;
        }
        for ids in cluster.regions.values() {
            let members: Vec<NodeInfo> = ids.iter().map(|id| cluster.nodes[id].info()).collect();
            let first = ids[0];
            cluster.client_of(&[first]).init(&cluster.nodes[&first].grpc(), members).await.expect("init");
        }
        let names: Vec<String> = cluster.regions.keys().cloned().collect();
        for r in names {
            cluster.wait_leader_in(&r).await;
        }
        cluster
    }

    /// Starts (or restarts) node `id`'s process.
    pub fn spawn(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nines"))
            .arg("node")
            .arg("--config")
            .arg(&node.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nines node");
        node.child = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        let mut child = self.nodes.get_mut(&id).unwrap().child.take().expect("node running");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    /// SIGTERM, and wait for the process to exit; returns its exit status.
    pub fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        let mut child = self.nodes.get_mut(&id).unwrap().child.take().expect("node running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM");
        child.wait().expect("reap")
    }

    /// Waits (bounded) for node `id`'s process to exit by itself.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.nodes.get_mut(&id).unwrap();
        let child = node.child.as_mut().expect("node running");
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("try_wait") {
                node.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn wipe(&mut self, id: u64) {
        let dir = &self.nodes[&id].config.data_dir;
        std::fs::remove_dir_all(dir).expect("wipe data dir");
    }

    pub fn endpoints(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().map(|id| self.nodes[id].grpc()).collect()
    }

    /// A client that only knows the given nodes.
    pub fn client_of(&self, ids: &[u64]) -> Client {
        Client::new(self.endpoints(ids), ClientConfig::default()).expect("client")
    }

    /// A client that knows every node (of a single-region cluster).
    pub fn client(&self) -> Client {
        assert_eq!(self.regions.len(), 1, "client() is for one region; use region_client");
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        self.client_of(&ids)
    }

    /// A client of every node of `region`.
    pub fn region_client(&self, region: &str) -> Client {
        self.client_of(&self.regions[region])
    }

    /// Sets the fault hooks on every running node of `region`.
    pub async fn set_faults(&self, region: &str, blocked: &[&str], clock_offset_ms: i64) {
        for id in &self.regions[region] {
            if self.nodes[id].child.is_some() {
                let c = self.client_of(&[*id]);
                c.set_faults_on(
                    &self.nodes[id].grpc(),
                    blocked.iter().map(|s| s.to_string()).collect(),
                    clock_offset_ms,
                )
                .await
                .expect("set faults");
            }
        }
    }

    /// Waits until every region reports no replication lag to any peer.
    pub async fn wait_converged(&self) {
        wait_for("regions to converge", Duration::from_secs(60), || async {
            for r in self.regions.keys() {
                let s = self.region_client(r).region_status().await.ok()?;
                if s.peers.iter().any(|p| p.lag_entries > 0) {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.client_of(&[id]).status_of(&self.nodes[&id].grpc()).await.ok()
    }

    pub async fn wait_serving(&self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status(id).await.is_none() {
            if Instant::now() > deadline {
                panic!("timed out after 30s waiting for node {id} to serve; its log ends:\n{}", self.log_tail(id, 30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a leader in a single-region cluster; returns its id.
    pub async fn wait_leader(&self) -> u64 {
        assert_eq!(self.regions.len(), 1, "wait_leader is for one region; use wait_leader_in");
        let region = self.regions.keys().next().unwrap().clone();
        self.wait_leader_in(&region).await
    }

    /// Waits until a running node of `region` leads it; returns its id.
    pub async fn wait_leader_in(&self, region: &str) -> u64 {
        wait_for(&format!("a leader in {region}"), Duration::from_secs(30), || async {
            let mut leader = None;
            for id in &self.regions[region] {
                let n = &self.nodes[id];
                if n.child.is_none() {
                    continue;
                }
                let s = self.status(*id).await?;
                if s.role == "leader" {
                    leader = Some(*id);
                }
            }
            leader
        })
        .await
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> StatusResponse {
        wait_for(&format!("node {id} to apply index {index}"), Duration::from_secs(60), || async {
            self.status(id).await.filter(|s| s.applied_index >= index)
        })
        .await
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// The last `lines` messages of node `id`'s log, for a failure report;
    /// backtrace frames (indented lines) are left out: the messages matter.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let log = self.log_of(id);
        let messages = log.lines().filter(|l| !l.starts_with(' '));
        let tail: Vec<&str> = messages.rev().take(lines).collect::<Vec<_>>().into_iter().rev().collect();
        tail.join("\n")
    }
}

/// Waits for a spawned child's output, at most `timeout`; kills it (by
/// PID) and fails the test if it runs longer. Its pipes are drained while
/// it runs, so a chatty child never blocks on a full pipe.
pub fn output_within(child: Child, timeout: Duration) -> std::process::Output {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("child output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(10));
            panic!("a child process ran past {timeout:?} and was killed");
        }
    }
}

/// `n` consecutive free ports starting at the returned one.
pub fn free_port_run(n: u16) -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if p < 65000 && (1..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no run of {n} free ports");
}

/// Port bases for `nines up`, each the start of a run of free ports.
#[derive(Debug, Clone, Copy)]
pub struct PortBases {
    pub grpc: u16,
    pub peer: u16,
    pub admin: u16,
}

impl PortBases {
    /// Runs of `n` free ports that do not overlap.
    pub fn free(n: u16) -> PortBases {
        let apart = |a: u16, b: u16| a.abs_diff(b) >= n;
        let grpc = free_port_run(n);
        let peer = std::iter::repeat_with(|| free_port_run(n)).find(|p| apart(*p, grpc)).unwrap();
        let admin = std::iter::repeat_with(|| free_port_run(n)).find(|a| apart(*a, grpc) && apart(*a, peer)).unwrap();
        PortBases { grpc, peer, admin }
    }

    /// `--grpc-port-base`, `--peer-port-base` and `--admin-port-base`.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, base) in
            [("--grpc-port-base", self.grpc), ("--peer-port-base", self.peer), ("--admin-port-base", self.admin)]
        {
            flags.extend([flag.to_string(), base.to_string()]);
        }
        flags
    }
}

/// `nines up --regions 1 --data-dir DIR` (plus `extra`), started and
/// serving: it printed its region's leader.
pub struct Up {
    /// `None` once stopped.
    child: Option<Child>,
    pub printed: String,
    grpc: u16,
}

impl Up {
    pub fn start(dir: &Path, extra: &[&str]) -> Up {
        Self::start_on(dir, PortBases::free(3), extra)
    }

    /// On given port bases (a restart reuses its cluster's addresses).
    pub fn start_on(dir: &Path, ports: PortBases, extra: &[&str]) -> Up {
        let flags = ports.flags();
        let dir = dir.to_string_lossy();
        let mut args = vec!["up", "--regions", "1", "--data-dir", &dir];
        args.extend(flags.iter().map(String::as_str));
        args.extend_from_slice(extra);
        Self::spawn(&args, ports.grpc, "us-east leader: node")
    }

    /// `nines ARGS` (an `up` command on gRPC port base `grpc`), until it
    /// printed `ready`.
    pub fn spawn(args: &[&str], grpc: u16, ready: &str) -> Up {
        // Its own process group, with the nodes it starts: however `up`
        // ends (even a SIGINT before it handles signals), the group is
        // killed after it, so no node outlives the test.
        let mut child = Command::new(env!("CARGO_BIN_EXE_nines"))
            .args(args)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nines up");
        // A thread reads `up`'s output for as long as it prints (so it never
        // blocks on a full pipe) and hands each line over.
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Reads on after the test stopped listening: a closed pipe would
            // make `up`'s next line fail (and `up` exit).
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Built before waiting: a failed start still stops `up` (Drop).
        let mut up = Up { child: Some(child), printed: String::new(), grpc };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !up.printed.contains(ready) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    up.printed.push_str(&line);
                    up.printed.push('\n');
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("nines up printed no leader: {}", up.printed),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("nines up exited early: {}", up.printed),
            }
        }
        up
    }

    pub fn client(&self) -> Client {
        let endpoints = (0..3).map(|i| format!("http://127.0.0.1:{}", self.grpc + i)).collect();
        Client::new(endpoints, ClientConfig::default()).unwrap()
    }

    /// Ctrl-C: `up` stops its nodes and exits 0.
    pub fn stop(mut self) {
        let status = self.interrupt().expect("nines up running");
        assert!(status.success(), "nines up exited {status:?}");
    }

    /// SIGINT, then the exit status; SIGKILL if `up` has not exited after
    /// 30 s (it stops its nodes with a bound of its own).
    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (`up` itself past its deadline, or
        // nodes of an `up` that died before handling SIGINT).
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        status.or_else(|| child.wait().ok())
    }
}

impl Drop for Up {
    /// A test that failed with `up` running still stops it and its nodes:
    /// an `up` left running would keep the test's output pipe open.
    fn drop(&mut self) {
        self.interrupt();
    }
}
