//! A cluster of real nines node processes on loopback, owned by one run.
//!
//! Each node is this harness's own executable started as `nines-jepsen node
//! --config <file>`: the same node code as the `nines` binary, so a run needs
//! nothing built beside the harness. One node per AZ; node ids run on across
//! regions.
//!
//! Invariants:
//! - Every node runs with `fault_injection = true`; no other node exists.
//! - Only processes this cluster spawned are signalled, by their own PID.
//! - Dropping the cluster resumes and kills every node (and controller) it
//!   still runs.
//!
//! A failover run adds a three-node authority (region `authority`, not a
//! data region: no workload or region fault touches it) and two failover
//! controllers, started as `nines-jepsen ctl ... controller`.
//!
//! With `--docker` the nodes are instead the containers of the compose
//! cluster (`deploy/docker-compose.yml`: us-east primary, eu-west, the
//! authority and one controller), reached through their published ports;
//! faults are docker's (see [`crate::compose`]) and no node takes fault
//! hooks.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nines::config::{ClusterConfig, Mode, NodeConfig, RegionConfig};
use nines::rpc::{Client, ClientConfig, NodeInfo};
use nines_proto::v1::SetFaultsRequest;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::SeedableRng;

use crate::compose::{self, Compose};

/// Region names in the order `--regions N` uses them.
pub const REGION_NAMES: [&str; 4] = ["us-east", "eu-west", "ap-south", "sa-east"];

/// Most AZs per region: a Raft group of more than 7 voters gains nothing
/// and `nines` refuses to initialize one (`INIT_MEMBERS_MAX`).
pub const AZS_MAX: usize = 7;

/// How long a node may take to start serving, or a region to elect a
/// leader, before the run gives up: generous for a loaded two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one probe of a node (status, fault setting). A paused node
/// never answers, so every probe needs one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct NodeProc {
    pub config: NodeConfig,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP (or `docker pause`) and not yet continued.
    paused: bool,
    /// `--docker` runs: the node's container.
    container: Option<Container>,
}

/// A node's container in a `--docker` run.
struct Container {
    service: String,
    id: String,
    /// Started and not killed by the run.
    running: bool,
    /// Docker's restart count when the run last looked: a restart the run
    /// did not cause is the node exiting by itself.
    restarts: u64,
    /// Disconnected from the shared network, to be connected at heal.
    cut_off: bool,
}

impl NodeProc {
    /// Its gRPC URL: https when it runs TLS (the compose cluster).
    pub fn endpoint(&self) -> String {
        self.config.listen_urls().grpc
    }

    fn info(&self) -> NodeInfo {
        nines::convert::info_to_proto(self.config.id, &nines::types::NodeInfo::listening(&self.config))
    }
}

pub struct Cluster {
    exe: PathBuf,
    /// `--docker` runs: the compose project, removed with the cluster.
    compose: Option<Compose>,
    pub nodes: BTreeMap<u64, NodeProc>,
    /// Region name -> its node ids, in AZ order.
    pub regions: BTreeMap<String, Vec<u64>>,
    /// Region names in topology order (the first is where `register` runs).
    pub region_order: Vec<String>,
    /// One client for status probes and fault settings, of every node.
    probe: Client,
    /// Nodes that exited without being killed: (node, exit status). A node
    /// exits by itself only when it stops fatally (corruption, a failed
    /// apply) or crashes, so each one is a finding.
    pub unexpected_exits: Vec<(u64, String)>,
    /// Failover runs: the controllers (empty otherwise).
    controllers: Vec<ControllerProc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.compose.is_some() {
            // Removing the project (dropping it) removes every container.
            return;
        }
        for i in 0..self.controllers.len() {
            self.kill_controller(i);
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// A port that was free a moment ago, below the kernel's ephemeral range
/// so a restarted node does not find its port taken by some outgoing
/// connection's source port.
fn free_port(taken: &mut Vec<u16>, rng: &mut impl rand::RngExt) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000u16);
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    bail!("no free port in 20000..32000 after 1000 tries")
}

/// Test-only modes every node of a run starts with.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeFlags {
    /// The planted stale-read bug (`planted_bug_local_reads`).
    pub planted_bug_local_reads: bool,
    /// Storage that keeps only what was synced when a node is killed, so a
    /// kill is a power cut (`storage.power_loss_simulation`).
    pub power_loss_simulation: bool,
    /// Active-passive with failover: the first region is primary under a
    /// lease from a three-node authority, and two failover controllers run
    /// (one decides, the other stands by).
    pub failover: bool,
    /// Keep only a few entries below a snapshot
    /// (`raft.logs_kept_after_snapshot`), so that each snapshot of the
    /// `compact` nemesis drops the whole log written since the last one.
    pub compact_fully: bool,
}

/// Entries a node keeps below its snapshot when the run compacts
/// (`NodeFlags::compact_fully`): with the default 1,000 (each holding up to
/// 1 MiB of batched values under `large`), an early compaction would drop
/// little or nothing of the log.
const LOGS_KEPT_WHEN_COMPACTING: u64 = 8;

/// The authority's region name in a failover run (not a data region).
pub const AUTHORITY_REGION: &str = "authority";

/// Failover controllers a failover run keeps running.
pub const CONTROLLERS: usize = 2;

/// The controllers' probe interval and threshold: a region is failed over
/// after `CONTROLLER_THRESHOLD` missed rounds of `CONTROLLER_INTERVAL`.
pub const CONTROLLER_INTERVAL: &str = "1s";
pub const CONTROLLER_THRESHOLD: &str = "3";

/// A failover controller process (`nines-jepsen ctl ... controller`).
struct ControllerProc {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Cluster {
    /// Writes every node's config under `dir`, starts the nodes, initializes
    /// each region's Raft group and waits for a leader in each.
    pub async fn start(
        dir: &Path,
        exe: PathBuf,
        regions: usize,
        azs: usize,
        flags: NodeFlags,
    ) -> anyhow::Result<Cluster> {
        if regions == 0 || regions > REGION_NAMES.len() {
            bail!("--regions must be 1..={}, got {regions}", REGION_NAMES.len());
        }
        if azs == 0 || azs > AZS_MAX {
            bail!("--azs must be 1..={AZS_MAX}, got {azs}");
        }
        // Ports are not part of the run's seed: they depend on what else
        // the machine runs, and a replay must not collide with a live run.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mut rng = rand::rngs::StdRng::seed_from_u64(nanos as u64 ^ u64::from(std::process::id()));
        let mut taken = Vec::new();
        let region_order: Vec<String> = REGION_NAMES[..regions].iter().map(|s| s.to_string()).collect();
        let mut ports = BTreeMap::new();
        let mut region_ids: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut next = 1u64;
        let mut all_regions = region_order.clone();
        if flags.failover {
            all_regions.push(AUTHORITY_REGION.to_string());
        }
        for r in &all_regions {
            let nodes = if r == AUTHORITY_REGION { 3 } else { azs };
            for _ in 0..nodes {
                let mut port = || free_port(&mut taken, &mut rng);
                ports.insert(next, (port()?, port()?, port()?));
                region_ids.entry(r.clone()).or_default().push(next);
                next += 1;
            }
        }
        let cluster_config = ClusterConfig {
            mode: if flags.failover { Mode::ActivePassive } else { Mode::ActiveActive },
            primary: if flags.failover { region_order[0].clone() } else { String::new() },
            authority: match region_ids.get(AUTHORITY_REGION) {
                Some(ids) => ids.iter().map(|id| format!("http://127.0.0.1:{}", ports[id].0)).collect(),
                None => Vec::new(),
            },
            regions: if regions > 1 {
                region_order
                    .iter()
                    .map(|r| RegionConfig {
                        name: r.clone(),
                        endpoints: region_ids[r].iter().map(|id| format!("http://127.0.0.1:{}", ports[id].0)).collect(),
                        peer_endpoints: region_ids[r]
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
        let mut nodes = BTreeMap::new();
        for r in &all_regions {
            for (i, id) in region_ids[r].iter().enumerate() {
                let config = NodeConfig {
                    id: *id,
                    region: r.clone(),
                    az: format!("{r}-{}", (b'a' + i as u8) as char),
                    data_dir: dir.join(format!("node-{id}")),
                    grpc_listen: ([127, 0, 0, 1], ports[id].0).into(),
                    admin_listen: ([127, 0, 0, 1], ports[id].1).into(),
                    peer_listen: ([127, 0, 0, 1], ports[id].2).into(),
                    cluster: if r == AUTHORITY_REGION { ClusterConfig::default() } else { cluster_config.clone() },
                    fault_injection: true,
                    planted_bug_local_reads: flags.planted_bug_local_reads,
                    storage: nines::config::StorageConfig {
                        power_loss_simulation: flags.power_loss_simulation,
                        ..Default::default()
                    },
                    insecure: true,
                    raft: nines::config::RaftConfig {
                        logs_kept_after_snapshot: match flags.compact_fully {
                            true => LOGS_KEPT_WHEN_COMPACTING,
                            false => nines::config::RaftConfig::default().logs_kept_after_snapshot,
                        },
                        ..Default::default()
                    },
                    ..NodeConfig::default()
                };
                let config_path = dir.join(format!("node-{id}.toml"));
                std::fs::write(&config_path, toml::to_string(&config)?)
                    .with_context(|| format!("writing {}", config_path.display()))?;
                let log_path = dir.join(format!("node-{id}.log"));
                nodes.insert(
                    *id,
                    NodeProc { config, config_path, log_path, child: None, paused: false, container: None },
                );
            }
        }
        let endpoints: Vec<String> = nodes.values().map(NodeProc::endpoint).collect();
        let probe = Client::new(endpoints, probe_config())?;
        let controllers = if flags.failover {
            (0..CONTROLLERS)
                .map(|i| ControllerProc { child: None, log_path: dir.join(format!("controller-{}.log", i + 1)) })
                .collect()
        } else {
            Vec::new()
        };
        let mut cluster = Cluster {
            exe,
            compose: None,
            nodes,
            regions: region_ids,
            region_order,
            probe,
            unexpected_exits: Vec::new(),
            controllers,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in &ids {
            cluster.spawn(*id)?;
        }
        for id in &ids {
            cluster.wait_serving(*id).await?;
        }
        for ids in cluster.regions.values() {
            let members: Vec<NodeInfo> = ids.iter().map(|id| cluster.nodes[id].info()).collect();
            let first = cluster.nodes[&ids[0]].endpoint();
            cluster.probe.init(&first, members).await.with_context(|| format!("initializing the region at {first}"))?;
        }
        cluster.wait_leaders(START_TIMEOUT).await?;
        for i in 0..cluster.controllers.len() {
            cluster.spawn_controller(i)?;
        }
        Ok(cluster)
    }

    /// Starts the compose cluster of `file` on `image` (`--docker`): two
    /// regions of three nodes (us-east primary), the authority and one
    /// controller. Waits until every node serves, every region has a leader
    /// and the primary holds its lease.
    pub async fn start_compose(dir: &Path, file: PathBuf, image: &str) -> anyhow::Result<Cluster> {
        let mut nodes = BTreeMap::new();
        let mut regions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut logs = Vec::new();
        let mut az = BTreeMap::<&str, u8>::new();
        // The compose cluster runs mutual TLS; its certificates are copied
        // out of the `certs` volume once it is up.
        let certs = dir.join("certs");
        for (n, (region, service)) in (1u64..).zip(compose::NODE_SERVICES) {
            let (grpc, admin) = compose::host_ports(n);
            let letter = az.entry(region).or_insert(b'a');
            let config = NodeConfig {
                id: n,
                region: region.to_string(),
                az: format!("{region}-{}", *letter as char),
                grpc_listen: ([127, 0, 0, 1], grpc).into(),
                admin_listen: ([127, 0, 0, 1], admin).into(),
                tls: Some(nines::certs::node_files(&certs, region, (n - 1) % 3 + 1)),
                ..NodeConfig::default()
            };
            *letter += 1;
            let log_path = dir.join(format!("node-{n}.log"));
            logs.push((service.to_string(), log_path.clone()));
            let container = Container {
                service: service.to_string(),
                id: String::new(),
                running: true,
                restarts: 0,
                cut_off: false,
            };
            let node = NodeProc {
                config,
                config_path: PathBuf::new(),
                log_path,
                child: None,
                paused: false,
                container: Some(container),
            };
            nodes.insert(n, node);
            regions.entry(region.to_string()).or_default().push(n);
        }
        logs.push(("controller".to_string(), dir.join("controller-1.log")));
        eprintln!("starting the compose cluster of {} on {image}...", file.display());
        let compose = Compose::up(file, image, logs)?;
        for node in nodes.values_mut() {
            let c = node.container.as_mut().expect("a compose node has a container");
            c.id = compose.container(&c.service)?;
        }
        compose.copy_certs(&certs)?;
        let admin = nines::certs::role_files(&certs, &nines::tls::Role::Admin);
        nines::tls::set_client_identity(admin.client()?);
        let endpoints: Vec<String> = nodes.values().map(NodeProc::endpoint).collect();
        let cluster = Cluster {
            exe: PathBuf::new(),
            compose: Some(compose),
            nodes,
            regions,
            region_order: compose::NODE_SERVICES[..6].iter().step_by(3).map(|(r, _)| r.to_string()).collect(),
            probe: Client::new(endpoints, probe_config())?,
            unexpected_exits: Vec::new(),
            controllers: Vec::new(),
        };
        // Images start in seconds, but the init containers wait for every
        // node, and a loaded machine is slow.
        let timeout = START_TIMEOUT * 4;
        for id in cluster.ids() {
            cluster.wait_serving_within(id, timeout).await?;
        }
        cluster.wait_leaders(timeout).await?;
        let deadline = Instant::now() + timeout;
        while cluster.primary_region().await.is_none() {
            if Instant::now() > deadline {
                bail!("no region of the compose cluster says it is primary after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    /// Whether the nodes are the compose cluster's containers (`--docker`).
    pub fn is_compose(&self) -> bool {
        self.compose.is_some()
    }

    /// `--docker` runs: takes every node of `region` off the shared network,
    /// cutting it off from the other region, the authority and the
    /// controller (connected again at heal).
    pub fn cut_region_off(&mut self, region: &str) -> anyhow::Result<()> {
        let compose = self.compose.as_ref().context("only --docker runs cut regions off with docker")?;
        for id in &self.regions[region] {
            let c = self.nodes.get_mut(id).and_then(|n| n.container.as_mut()).context("a compose node")?;
            if !c.cut_off {
                compose.disconnect(&c.id)?;
                c.cut_off = true;
            }
        }
        Ok(())
    }

    /// Every node id, in order (the authority's too).
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The ids of the nodes that hold the data: every node of the data
    /// regions, not the authority's.
    pub fn data_ids(&self) -> Vec<u64> {
        self.region_order.iter().flat_map(|r| self.regions[r].iter().copied()).collect()
    }

    /// The primary region as the region reporting the highest epoch names
    /// it (failover runs), if any region answers.
    pub async fn primary_region(&self) -> Option<String> {
        let mut best: Option<(u64, String)> = None;
        for r in &self.region_order {
            let Ok(client) = Client::new(self.region_endpoints(r), probe_config()) else { continue };
            if let Ok(Ok(s)) = tokio::time::timeout(PROBE_TIMEOUT, client.region_status()).await
                && !s.primary.is_empty()
                && best.as_ref().is_none_or(|(e, _)| s.epoch > *e)
            {
                best = Some((s.epoch, s.primary));
            }
        }
        best.map(|(_, p)| p)
    }

    /// Whether this is a failover run (an authority and controllers).
    pub fn has_authority(&self) -> bool {
        self.regions.contains_key(AUTHORITY_REGION)
    }

    /// Starts controller `i` (a no-op if it runs): probes every data node,
    /// logs to `controller-<i+1>.log`.
    fn spawn_controller(&mut self, i: usize) -> anyhow::Result<()> {
        let endpoints: Vec<String> = self.data_ids().iter().map(|id| self.endpoint(*id)).collect();
        let exe = self.exe.clone();
        let c = &mut self.controllers[i];
        if c.child.is_some() {
            return Ok(());
        }
        let endpoints = endpoints.join(",");
        let args = [
            "ctl",
            "--endpoints",
            &endpoints,
            "controller",
            "--interval",
            CONTROLLER_INTERVAL,
            "--threshold",
            CONTROLLER_THRESHOLD,
        ];
        let child = spawn_logged(&exe, args, &c.log_path).with_context(|| format!("starting controller {}", i + 1))?;
        c.child = Some(child);
        Ok(())
    }

    /// kill -9 controller `i`, if it runs.
    fn kill_controller(&mut self, i: usize) {
        if let Some(mut child) = self.controllers[i].child.take() {
            // Ours and not yet reaped: the PID is still its own.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// kill -9 the controller that decides now (the holder of the
    /// authority's controller lease); returns its number (from 1), or
    /// `None` when no controller of this run holds the lease.
    pub async fn kill_deciding_controller(&mut self) -> Option<usize> {
        let authority = Client::new(self.region_endpoints(AUTHORITY_REGION), probe_config()).ok()?;
        let got = authority.get(nines::authority::CONTROLLER_KEY, nines::rpc::Consistency::Linearizable).await.ok()?;
        let lease: nines::authority::Lease = serde_json::from_slice(&got.kv?.value).ok()?;
        let i = self.controllers.iter().position(|c| {
            c.child.as_ref().is_some_and(|child| lease.holder.ends_with(&format!("pid-{}", child.id())))
        })?;
        self.kill_controller(i);
        Some(i + 1)
    }

    pub fn endpoint(&self, id: u64) -> String {
        self.nodes[&id].endpoint()
    }

    /// Endpoints of a region's nodes.
    pub fn region_endpoints(&self, region: &str) -> Vec<String> {
        self.regions[region].iter().map(|id| self.endpoint(*id)).collect()
    }

    pub fn region_of(&self, id: u64) -> &str {
        &self.nodes[&id].config.region
    }

    pub fn az_of(&self, id: u64) -> &str {
        &self.nodes[&id].config.az
    }

    /// Whether node `id`'s process was started and not killed. Call
    /// [`Cluster::reap`] first to notice a process that exited by itself.
    pub fn running(&self, id: u64) -> bool {
        let node = &self.nodes[&id];
        node.child.is_some() || node.container.as_ref().is_some_and(|c| c.running)
    }

    /// Notices nodes that exited by themselves, records them in
    /// `unexpected_exits` and forgets their processes (so heal restarts them).
    pub fn reap(&mut self) {
        if self.compose.is_some() {
            self.reap_containers();
            return;
        }
        for (id, node) in self.nodes.iter_mut() {
            let Some(child) = node.child.as_mut() else { continue };
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("node {id} exited by itself: {status}; see {}", node.log_path.display());
                self.unexpected_exits.push((*id, status.to_string()));
                node.child = None;
                node.paused = false;
            }
        }
    }

    /// [`Cluster::reap`] for containers: a restart docker made by itself,
    /// or a container that stopped though the run did not kill it, is a node
    /// that exited by itself.
    fn reap_containers(&mut self) {
        let ids: Vec<String> = self.nodes.values().filter_map(|n| n.container.as_ref().map(|c| c.id.clone())).collect();
        let mut args = vec!["inspect", "--format", "{{.Id}} {{.RestartCount}} {{.State.Running}}"];
        args.extend(ids.iter().map(String::as_str));
        let out = match compose::docker(&args) {
            Ok(out) => out,
            Err(e) => {
                eprintln!("could not inspect the containers: {e:#}");
                return;
            }
        };
        for line in out.lines() {
            let mut fields = line.split_whitespace();
            let (Some(full), Some(restarts), Some(up)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let restarts: u64 = restarts.parse().unwrap_or(0);
            for (id, node) in self.nodes.iter_mut() {
                let Some(c) = node.container.as_mut().filter(|c| full.starts_with(&c.id)) else { continue };
                if restarts > c.restarts || (c.running && up != "true") {
                    let what = if up == "true" { "restarted by docker" } else { "stopped" };
                    eprintln!("node {id} ({}) exited by itself: {what}", c.service);
                    self.unexpected_exits.push((*id, format!("container {what}")));
                    c.running = up == "true";
                    node.paused = false;
                }
                c.restarts = restarts;
            }
        }
    }

    pub fn paused(&self, id: u64) -> bool {
        self.nodes[&id].paused
    }

    /// Starts node `id`'s process; a no-op if it runs.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let exe = self.exe.clone();
        let node = self.nodes.get_mut(&id).context("unknown node")?;
        if let Some(c) = node.container.as_mut() {
            if !c.running {
                compose::docker(&["start", &c.id])?;
                c.running = true;
            }
            return Ok(());
        }
        if node.child.is_some() {
            return Ok(());
        }
        let args = [OsStr::new("node"), OsStr::new("--config"), node.config_path.as_os_str()];
        let child = spawn_logged(&exe, args, &node.log_path).with_context(|| format!("starting node {id}"))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// kill -9 (a paused node is continued first so it dies at once); a
    /// no-op if it is not running.
    pub fn kill(&mut self, id: u64) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        if let Some(c) = node.container.as_mut() {
            if c.running {
                // A frozen container is thawed first, as a stopped process is
                // continued: the kill then lands at once.
                if node.paused {
                    let _ = compose::docker(&["unpause", &c.id]);
                }
                if let Err(e) = compose::docker(&["kill", &c.id]) {
                    eprintln!("could not kill node {id}: {e:#}");
                }
                c.running = false;
            }
            node.paused = false;
            return;
        }
        if let Some(mut child) = node.child.take() {
            if node.paused {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            }
            // The process is ours and not yet reaped, so its PID is still
            // its own: kill and wait cannot hit another process.
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// SIGSTOP or SIGCONT node `id`, if it runs.
    pub fn signal_pause(&mut self, id: u64, pause: bool) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("unknown node")?;
        if let Some(c) = node.container.as_ref() {
            if c.running && node.paused != pause {
                compose::docker(&[if pause { "pause" } else { "unpause" }, &c.id])?;
                node.paused = pause;
            }
            return Ok(());
        }
        let Some(child) = &node.child else { return Ok(()) };
        if node.paused == pause {
            return Ok(());
        }
        let signal = if pause { Signal::SIGSTOP } else { Signal::SIGCONT };
        kill(Pid::from_raw(child.id() as i32), signal).with_context(|| format!("{signal} to node {id}"))?;
        node.paused = pause;
        Ok(())
    }

    /// The node's status, if it answers within the probe timeout.
    pub async fn status(&self, id: u64) -> Option<nines::rpc::StatusResponse> {
        if !self.running(id) || self.paused(id) {
            return None;
        }
        let endpoint = self.endpoint(id);
        tokio::time::timeout(PROBE_TIMEOUT, self.probe.status_of(&endpoint)).await.ok()?.ok()
    }

    /// The node of `region` that says it leads, if one does. With two
    /// claimants (an old leader cut off), the one with the higher term.
    pub async fn leader_of(&self, region: &str) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for id in &self.regions[region] {
            if let Some(s) = self.status(*id).await
                && s.role == "leader"
                && best.is_none_or(|(term, _)| s.term > term)
            {
                best = Some((s.term, *id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// The highest Raft term any node of each data region reports (nodes
    /// that do not answer are left out; a region none of whose nodes
    /// answers is missing). A term rises with every election, won or not.
    pub async fn terms(&self) -> BTreeMap<String, u64> {
        let mut terms = BTreeMap::new();
        for r in &self.region_order {
            for id in &self.regions[r] {
                if let Some(s) = self.status(*id).await {
                    let t = terms.entry(r.clone()).or_insert(s.term);
                    *t = (*t).max(s.term);
                }
            }
        }
        terms
    }

    /// Asks node `id` to build a snapshot now (and so to drop its log
    /// below it); returns its applied index then.
    pub async fn snapshot(&self, id: u64) -> anyhow::Result<u64> {
        if !self.running(id) || self.paused(id) {
            bail!("node {id} is not running");
        }
        let endpoint = self.endpoint(id);
        let index = tokio::time::timeout(PROBE_TIMEOUT, self.probe.snapshot_on(&endpoint))
            .await
            .with_context(|| format!("asking node {id} for a snapshot timed out"))??;
        Ok(index)
    }

    async fn wait_serving(&self, id: u64) -> anyhow::Result<()> {
        self.wait_serving_within(id, START_TIMEOUT).await
    }

    async fn wait_serving_within(&self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.status(id).await.is_none() {
            if Instant::now() > deadline {
                bail!("node {id} did not serve within {timeout:?}; see {}", self.nodes[&id].log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits until every region has a leader that a quorum follows.
    pub async fn wait_leaders(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for r in self.regions.keys() {
            while self.leader_of(r).await.is_none() {
                if Instant::now() > deadline {
                    bail!("region {r} has no leader after {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Replaces the fault hooks on node `id`. Fails on a node that is down
    /// or paused (the caller decides whether that matters).
    pub async fn set_faults(&self, id: u64, req: SetFaultsRequest) -> anyhow::Result<()> {
        if self.compose.is_some() {
            bail!("the compose cluster's nodes take no fault hooks");
        }
        if !self.running(id) || self.paused(id) {
            bail!("node {id} is not running");
        }
        let endpoint = self.endpoint(id);
        tokio::time::timeout(PROBE_TIMEOUT, self.probe.set_all_faults_on(&endpoint, req))
            .await
            .with_context(|| format!("setting faults on node {id} timed out"))??;
        Ok(())
    }

    /// Ends every fault: continues paused nodes, restarts stopped ones (and
    /// killed controllers) and clears every node's fault hooks. Retries
    /// clearing until it sticks (a restarted node needs a moment to serve),
    /// bounded by `timeout`.
    pub async fn heal(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.reap();
        for id in self.ids() {
            // A node that cannot be continued is killed: it restarts below.
            if let Err(e) = self.signal_pause(id, false) {
                eprintln!("{e:#}; killing node {id} instead");
                self.kill(id);
            }
            self.spawn(id)?;
        }
        for i in 0..self.controllers.len() {
            self.spawn_controller(i)?;
        }
        if let Some(compose) = &self.compose {
            for node in self.nodes.values_mut() {
                if let Some(c) = node.container.as_mut().filter(|c| c.cut_off) {
                    compose.reconnect(&c.id, &c.service)?;
                    c.cut_off = false;
                }
            }
            // No hooks to clear: healed once every node serves again.
            for id in self.ids() {
                self.wait_serving_within(id, timeout).await?;
            }
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        for id in self.ids() {
            loop {
                match self.set_faults(id, SetFaultsRequest::default()).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("node {id} did not clear its faults within {timeout:?}")));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }
}

/// Starts `exe` with `args`, its output appended to `log_path`; it dies with
/// the harness.
fn spawn_logged<A: AsRef<OsStr>>(
    exe: &Path,
    args: impl IntoIterator<Item = A>,
    log_path: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = Command::new(exe);
    // SAFETY: the closure runs in the child between fork and exec and
    // only makes one async-signal-safe system call (prctl).
    unsafe {
        command.pre_exec(|| {
            // If the harness dies (killed, crashed), its nodes and
            // controllers die too instead of lingering with their ports.
            // The signal follows the spawning thread: a runtime worker,
            // which lives as long as the run.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    Ok(command.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?)
}

/// A client config for probes: one short attempt, so a dead or paused node
/// costs the caller little.
fn probe_config() -> ClientConfig {
    ClientConfig {
        attempt_timeout: PROBE_TIMEOUT,
        attempts_max: 1,
        connect_timeout: Duration::from_millis(300),
        request_deadline: PROBE_TIMEOUT,
        ..ClientConfig::default()
    }
}
