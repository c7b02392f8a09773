//! Node processes on this machine, for `nines up` and `nines drill`: each
//! node runs this same binary as `nines node --config DATA_DIR/nines.toml`
//! with its log in `DATA_DIR/node.log`. Dropping a [`Local`] kills every
//! node it still runs, so a failing command never leaves orphans.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::rpc::{Client, ClientConfig, NodeInfo};
use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::NodeConfig;

/// How long a start waits for nodes to serve and for a leader. Generous: a
/// first start on a loaded laptop can take seconds.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// How long nodes get to stop after SIGTERM before they are killed. Above
/// the node's own `SHUTDOWN_GRACE`.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The data directory to use: the one given, or a new temporary one
/// (removed when the returned guard drops).
pub fn data_dir(given: Option<&PathBuf>, prefix: &str) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match given {
        Some(d) => (d.clone(), None),
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    })
}

/// A started node process.
pub struct NodeProcess {
    pub config: NodeConfig,
    child: Child,
    exited: bool,
}

impl NodeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn grpc(&self) -> String {
        member(&self.config).grpc_addr
    }

    /// The node as a member of its region.
    pub fn info(&self) -> NodeInfo {
        member(&self.config)
    }
}

/// A node's membership entry, from its configuration.
pub fn member(c: &NodeConfig) -> NodeInfo {
    crate::convert::info_to_proto(c.id, &crate::types::NodeInfo::listening(c))
}

/// The node processes this command started.
#[derive(Default)]
pub struct Local {
    pub nodes: Vec<NodeProcess>,
}

impl Drop for Local {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut().filter(|n| !n.exited) {
            // Ignored: the process may have exited on its own already.
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

impl Local {
    /// Starts a node: writes its configuration into its data directory and
    /// runs it there.
    pub fn spawn(&mut self, c: &NodeConfig) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the nines binary")?;
        std::fs::create_dir_all(&c.data_dir)?;
        let config_path = c.data_dir.join("nines.toml");
        std::fs::write(&config_path, toml::to_string_pretty(c)?)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(c.data_dir.join("node.log"))?;
        let child = std::process::Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}", c.id))?;
        self.nodes.push(NodeProcess { config: c.clone(), child, exited: false });
        Ok(())
    }

    /// Waits until every node in `configs` answers status calls.
    pub async fn wait_serving(&mut self, configs: &[NodeConfig], deadline: Instant) -> anyhow::Result<()> {
        let endpoints: Vec<String> = configs.iter().map(|c| member(c).grpc_addr).collect();
        let client = Client::new(endpoints.clone(), ClientConfig::default())?;
        for (c, ep) in configs.iter().zip(&endpoints) {
            while client.status_of(ep).await.is_err() {
                self.check_alive()?;
                if Instant::now() > deadline {
                    bail!(
                        "node {} did not serve at {ep} within {STARTUP_DEADLINE:?}; see {}",
                        c.id,
                        c.data_dir.join("node.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Bootstraps the region `configs` make up (when `init`), then waits for
    /// its leader; returns the leader's id.
    pub async fn bootstrap(&mut self, configs: &[NodeConfig], init: bool, deadline: Instant) -> anyhow::Result<u64> {
        let region = &configs[0].region;
        let members: Vec<NodeInfo> = configs.iter().map(member).collect();
        let endpoints: Vec<String> = members.iter().map(|m| m.grpc_addr.clone()).collect();
        let client = Client::new(endpoints.clone(), ClientConfig::default())?;
        if init {
            client.init(&endpoints[0], members).await.with_context(|| format!("bootstrapping region {region}"))?;
        }
        loop {
            if let Ok(m) = client.members().await
                && let Some(l) = m.leader_id
            {
                return Ok(l);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "region {region} elected no leader within {STARTUP_DEADLINE:?}; see node.log in {}",
                    configs[0].data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if a node exited (during a start).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for n in self.nodes.iter_mut().filter(|n| !n.exited) {
            if let Some(status) = n.child.try_wait()? {
                n.exited = true;
                let log = n.config.data_dir.join("node.log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                bail!(
                    "node {} exited during startup ({status}); see {}; it ended: {}",
                    n.config.id,
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
        }
        Ok(())
    }

    /// Prints and marks each node that exited since the last call.
    pub fn report_exits(&mut self) {
        for n in self.nodes.iter_mut().filter(|n| !n.exited) {
            if let Ok(Some(status)) = n.child.try_wait() {
                n.exited = true;
                println!("node {} (pid {}) exited: {status}", n.config.id, n.child.id());
            }
        }
    }

    /// How many nodes run.
    pub fn running(&mut self) -> usize {
        let mut n = 0;
        for node in self.nodes.iter_mut().filter(|n| !n.exited) {
            n += usize::from(node.child.try_wait().ok().flatten().is_none());
        }
        n
    }

    /// kill -9 every node of `region`, and waits for them.
    pub fn kill_region(&mut self, region: &str) {
        for n in self.nodes.iter_mut().filter(|n| !n.exited && n.config.region == region) {
            // Ignored: the process may have exited on its own already.
            let _ = n.child.kill();
            let _ = n.child.wait();
            n.exited = true;
        }
    }

    /// SIGTERM to every running node, then SIGKILL to any still running
    /// after `STOP_DEADLINE`.
    pub async fn stop_all(&mut self) {
        for n in self.nodes.iter().filter(|n| !n.exited) {
            // Ignored: the process may have exited between the check and the signal.
            let _ = kill(Pid::from_raw(n.child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline
            && self.nodes.iter_mut().any(|n| !n.exited && n.child.try_wait().ok().flatten().is_none())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for n in self.nodes.iter_mut() {
            if !n.exited && n.child.try_wait().ok().flatten().is_none() {
                println!("node {} did not stop within {STOP_DEADLINE:?}; killing it", n.config.id);
                let _ = n.child.kill();
            }
            let _ = n.child.wait();
            n.exited = true;
        }
    }
}
