//! `nines up`: a local cluster of real node processes on loopback, with an
//! embedded default configuration. Bootstraps the cluster only when it
//! created the data itself, prints every node's addresses and PID, reports
//! nodes that exit, and stops every node cleanly on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nines_client::{Client, ClientConfig, NodeInfo};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::NodeConfig;

/// How long `up` waits for nodes to serve and for a leader. Generous: a
/// first start on a loaded laptop can take seconds.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// How long nodes get to stop after SIGTERM before they are killed. Above
/// the node's own `SHUTDOWN_GRACE`.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The most nodes `up` starts: one Raft group gains nothing beyond seven.
const UP_NODES_MAX: u64 = 7;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Keep the cluster's data here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of nodes, one per AZ.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// gRPC port of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 7001)]
    pub grpc_port_base: u16,
    /// Admin HTTP port of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 8001)]
    pub admin_port_base: u16,
    /// The region's name.
    #[arg(long, default_value = "local")]
    pub region: String,
}

/// A started node process. Dropping it kills the process, so a failing `up`
/// never leaves orphans.
struct NodeProcess {
    id: u64,
    child: Child,
    exited: bool,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if !self.exited {
            // Ignored: the process may have exited on its own already.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn az_name(region: &str, n: u64) -> String {
    let letter = (b'a' + ((n - 1) % 26) as u8) as char;
    format!("{region}-{letter}")
}

pub fn node_config(args: &UpArgs, dir: &Path, n: u64) -> anyhow::Result<NodeConfig> {
    let port = |base: u16| -> anyhow::Result<u16> {
        base.checked_add((n - 1) as u16).context("port base plus node count exceeds 65535")
    };
    Ok(NodeConfig {
        id: n,
        region: args.region.clone(),
        az: az_name(&args.region, n),
        data_dir: dir.join(format!("node-{n}")),
        grpc_listen: ([127, 0, 0, 1], port(args.grpc_port_base)?).into(),
        admin_listen: ([127, 0, 0, 1], port(args.admin_port_base)?).into(),
        ..NodeConfig::default()
    })
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > UP_NODES_MAX {
        bail!("--nodes {} is outside 1..={UP_NODES_MAX}", args.nodes);
    }
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("nines-up-").tempdir()?),
    };
    let dir = match (&args.data_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory exists when no data dir is given"),
    };
    let configs = (1..=args.nodes).map(|n| node_config(&args, &dir, n)).collect::<anyhow::Result<Vec<_>>>()?;
    let existing = configs.iter().filter(|c| c.data_dir.join("db").exists()).count();
    if existing != 0 && existing != configs.len() {
        bail!(
            "{} holds data for {existing} of {} nodes; use a fresh --data-dir or restore the missing nodes",
            dir.display(),
            configs.len()
        );
    }
    let fresh = existing == 0;
    let exe = std::env::current_exe().context("finding the nines binary")?;
    let mut nodes = Vec::new();
    for c in &configs {
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
        nodes.push(NodeProcess { id: c.id, child, exited: false });
    }
    let endpoints: Vec<String> = configs.iter().map(|c| format!("http://{}", c.grpc_listen)).collect();
    let client = Client::new(endpoints.clone(), ClientConfig::default())?;

    let deadline = Instant::now() + STARTUP_DEADLINE;
    for (c, ep) in configs.iter().zip(&endpoints) {
        while client.status_of(ep).await.is_err() {
            check_alive(&mut nodes, &dir)?;
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
    if fresh {
        let members = configs
            .iter()
            .map(|c| NodeInfo {
                id: c.id,
                grpc_addr: format!("http://{}", c.grpc_listen),
                admin_addr: format!("http://{}", c.admin_listen),
                region: c.region.clone(),
                az: c.az.clone(),
            })
            .collect();
        client.init(&endpoints[0], members).await.context("bootstrapping the cluster")?;
    }
    let leader = loop {
        if let Ok(m) = client.members().await
            && let Some(l) = m.leader_id
        {
            break l;
        }
        check_alive(&mut nodes, &dir)?;
        if Instant::now() > deadline {
            bail!("no leader elected within {STARTUP_DEADLINE:?}; see the node.log files under {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    println!("nines: {} nodes in region {} (data in {})", configs.len(), args.region, dir.display());
    println!("{:<5} {:<10} {:<10} {:<24} {:<24} {:<8}", "NODE", "REGION", "AZ", "GRPC", "ADMIN", "PID");
    for (c, p) in configs.iter().zip(&nodes) {
        println!(
            "{:<5} {:<10} {:<10} {:<24} {:<24} {:<8}",
            c.id,
            c.region,
            c.az,
            format!("http://{}", c.grpc_listen),
            format!("http://{}", c.admin_listen),
            p.child.id()
        );
    }
    println!("leader: node {leader}");
    println!("try: nines put hello world && nines get hello && nines status   (Ctrl-C stops every node)");

    let stop = crate::node::termination_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => report_exits(&mut nodes),
        }
    }
    println!("stopping {} nodes", nodes.iter().filter(|n| !n.exited).count());
    stop_all(&mut nodes).await;
    drop(temp);
    Ok(())
}

/// Fails if a node exited during startup.
fn check_alive(nodes: &mut [NodeProcess], dir: &Path) -> anyhow::Result<()> {
    for n in nodes.iter_mut() {
        if let Some(status) = n.child.try_wait()? {
            n.exited = true;
            bail!(
                "node {} exited during startup ({status}); see {}",
                n.id,
                dir.join(format!("node-{}/node.log", n.id)).display()
            );
        }
    }
    Ok(())
}

fn report_exits(nodes: &mut [NodeProcess]) {
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        if let Ok(Some(status)) = n.child.try_wait() {
            n.exited = true;
            println!("node {} (pid {}) exited: {status}", n.id, n.child.id());
        }
    }
}

/// SIGTERM to every running node, then SIGKILL to any still running after
/// `STOP_DEADLINE`.
async fn stop_all(nodes: &mut [NodeProcess]) {
    for n in nodes.iter().filter(|n| !n.exited) {
        // Ignored: the process may have exited between the check and the signal.
        let _ = kill(Pid::from_raw(n.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    while Instant::now() < deadline
        && nodes.iter_mut().any(|n| !n.exited && n.child.try_wait().ok().flatten().is_none())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in nodes.iter_mut() {
        if !n.exited && n.child.try_wait().ok().flatten().is_none() {
            println!("node {} did not stop within {STOP_DEADLINE:?}; killing it", n.id);
            let _ = n.child.kill();
        }
        let _ = n.child.wait();
        n.exited = true;
    }
}
