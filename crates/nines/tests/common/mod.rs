//! A test cluster of real `nines node` processes on loopback, each in its own
//! directory under one temporary directory. Every child is killed on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nines::config::NodeConfig;
use nines_client::{Client, ClientConfig, NodeInfo, StatusResponse};

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

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().unwrap().port()
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

pub struct TestNode {
    pub config: NodeConfig,
    pub config_path: PathBuf,
    pub child: Option<Child>,
}

impl TestNode {
    pub fn grpc(&self) -> String {
        format!("http://{}", self.config.grpc_listen)
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.config.id,
            grpc_addr: self.grpc(),
            admin_addr: format!("http://{}", self.config.admin_listen),
            region: self.config.region.clone(),
            az: self.config.az.clone(),
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, TestNode>,
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
    /// Starts `n` nodes (one per AZ), bootstraps them and waits for a leader.
    /// `tweak` adjusts each node's config.
    pub async fn start(n: u64, tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut config = NodeConfig {
                id,
                region: "test".into(),
                az: format!("test-{}", (b'a' + (id - 1) as u8) as char),
                data_dir: dir.path().join(format!("node-{id}")),
                grpc_listen: ([127, 0, 0, 1], free_port()).into(),
                admin_listen: ([127, 0, 0, 1], free_port()).into(),
                ..NodeConfig::default()
            };
            tweak(&mut config);
            let config_path = dir.path().join(format!("node-{id}.toml"));
            std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
            nodes.insert(id, TestNode { config, config_path, child: None });
        }
        let mut cluster = TestCluster { dir, nodes };
        for id in 1..=n {
            cluster.spawn(id);
        }
        for id in 1..=n {
            cluster.wait_serving(id).await;
        }
        let members: Vec<NodeInfo> = cluster.nodes.values().map(|n| n.info()).collect();
        cluster.client_of(&[1]).init(&cluster.nodes[&1].grpc(), members).await.expect("init");
        cluster.wait_leader().await;
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

    /// A client that knows every node.
    pub fn client(&self) -> Client {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        self.client_of(&ids)
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.client_of(&[id]).status_of(&self.nodes[&id].grpc()).await.ok()
    }

    pub async fn wait_serving(&self, id: u64) {
        wait_for(&format!("node {id} to serve"), Duration::from_secs(30), || self.status(id)).await;
    }

    /// Waits until the running nodes agree on one leader; returns its id.
    pub async fn wait_leader(&self) -> u64 {
        wait_for("a leader", Duration::from_secs(30), || async {
            let mut leader = None;
            for (id, n) in &self.nodes {
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
}
