//! `nines up`: a local cluster of real node processes on loopback, with an
//! embedded default configuration: by default two regions of three nodes,
//! one per AZ, with simulated latency (1 ms between AZs, 40 ms between
//! regions), and in active-passive mode a three-node authority holding the
//! primary's lease. Bootstraps each region only when it created the data itself,
//! prints every node's addresses and PID, reports nodes that exit, and stops
//! every node cleanly on Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::local::{Local, STARTUP_DEADLINE};
use crate::config::{ClusterConfig, LatencyConfig, Mode, NodeConfig, RegionConfig};

/// The most AZs (nodes) per region `up` starts: one Raft group gains
/// nothing beyond seven voters.
const UP_AZS_MAX: u64 = 7;

/// The nodes of the authority `up` starts for an active-passive cluster:
/// three, so it survives losing one.
const AUTHORITY_NODES: u64 = 3;

/// The authority's region name (it is not one of the cluster's regions).
pub const AUTHORITY_REGION: &str = "authority";

/// Where `up --tls` keeps the certificates, under the data directory.
pub const CERTS_DIR: &str = "certs";

/// The regions `up` can start, in order.
pub const REGION_NAMES: &[&str] = &["us-east", "eu-west", "ap-south", "us-west", "sa-east"];

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Keep the cluster's data here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of regions (named us-east, eu-west, ap-south, us-west, sa-east).
    #[arg(long, default_value_t = 2)]
    pub regions: u64,
    /// AZs per region, one node in each.
    #[arg(long, default_value_t = 3)]
    pub azs: u64,
    /// How regions relate: every region takes writes, or one primary does.
    #[arg(long, value_enum, default_value_t = UpMode::ActiveActive)]
    pub mode: UpMode,
    /// Client gRPC port of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 7001)]
    pub grpc_port_base: u16,
    /// Peer gRPC port (Raft, shipments) of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 9001)]
    pub peer_port_base: u16,
    /// Admin HTTP port of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 8001)]
    pub admin_port_base: u16,
    /// Simulated one-way latency between AZs of a region.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub cross_az_latency: Duration,
    /// Simulated one-way latency between regions.
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    pub cross_region_latency: Duration,
    /// Turn simulated latency off.
    #[arg(long)]
    pub no_latency: bool,
    /// Start every region from a backup (file:///dir or s3://bucket/prefix)
    /// instead of empty; needs a fresh data directory.
    #[arg(long)]
    pub restore_from: Option<String>,
    /// The backup to start from (default: the newest in --restore-from).
    #[arg(long, requires = "restore_from")]
    pub restore_id: Option<String>,
    #[command(flatten)]
    pub restore_until: super::backup::UntilArgs,
    /// Mutual TLS: generate a CA and certificates into DATA_DIR/certs (kept
    /// if there already) and run every node over https with them. Without
    /// it the cluster is plaintext with no authentication, on 127.0.0.1.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpMode {
    ActiveActive,
    ActivePassive,
}

fn az_name(region: &str, n: u64) -> String {
    let letter = (b'a' + (n % 26) as u8) as char;
    format!("{region}-{letter}")
}

/// The configuration of every node: region r (from 0), AZ a (from 0) is
/// node `r * azs + a + 1`.
pub fn node_configs(args: &UpArgs, dir: &Path) -> anyhow::Result<Vec<NodeConfig>> {
    let total = args.regions * args.azs;
    let port = |base: u16, id: u64| -> anyhow::Result<u16> {
        u16::try_from(u64::from(base) + id - 1).context("port base plus node count exceeds 65535")
    };
    let scheme = if args.tls { "https" } else { "http" };
    let url =
        |base: u16, id: u64| -> anyhow::Result<String> { Ok(format!("{scheme}://127.0.0.1:{}", port(base, id)?)) };
    let grpc = |id: u64| url(args.grpc_port_base, id);
    let mut regions = Vec::new();
    for r in 0..args.regions {
        let ids = (1..=args.azs).map(|a| r * args.azs + a);
        regions.push(RegionConfig {
            name: REGION_NAMES[r as usize].to_string(),
            endpoints: ids.clone().map(grpc).collect::<anyhow::Result<_>>()?,
            peer_endpoints: ids.map(|id| url(args.peer_port_base, id)).collect::<anyhow::Result<_>>()?,
        });
    }
    // Active-passive: three more nodes form the authority, a region of its
    // own that holds the primary's lease and allocates epochs.
    let authority_ids: Vec<u64> = match args.mode {
        UpMode::ActivePassive if args.regions > 1 => ((total + 1)..=(total + AUTHORITY_NODES)).collect(),
        _ => Vec::new(),
    };
    let authority = authority_ids.iter().map(|id| grpc(*id)).collect::<anyhow::Result<Vec<_>>>()?;
    let cluster = ClusterConfig {
        mode: match args.mode {
            UpMode::ActiveActive => Mode::ActiveActive,
            UpMode::ActivePassive => Mode::ActivePassive,
        },
        primary: match args.mode {
            UpMode::ActiveActive => String::new(),
            UpMode::ActivePassive => REGION_NAMES[0].to_string(),
        },
        regions: if args.regions > 1 { regions } else { Vec::new() },
        authority,
        ..ClusterConfig::default()
    };
    let latency = if args.no_latency {
        LatencyConfig::default()
    } else {
        LatencyConfig {
            cross_az: args.cross_az_latency,
            cross_region: args.cross_region_latency,
            ..LatencyConfig::default()
        }
    };
    // The nodes share this machine: each gets its share of the cores, at
    // least one worker (2 cores and 3 nodes: one-client puts 15% faster, 256
    // clients 11%, than two workers each).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime_threads = (cores / (total as usize + authority_ids.len())).max(1);
    let node = |id: u64, region: &str, az: u64, cluster: &ClusterConfig| -> anyhow::Result<NodeConfig> {
        Ok(NodeConfig {
            runtime_threads,
            id,
            region: region.to_string(),
            az: az_name(region, az),
            data_dir: dir.join(format!("node-{id}")),
            grpc_listen: ([127, 0, 0, 1], port(args.grpc_port_base, id)?).into(),
            peer_listen: ([127, 0, 0, 1], port(args.peer_port_base, id)?).into(),
            admin_listen: ([127, 0, 0, 1], port(args.admin_port_base, id)?).into(),
            cluster: cluster.clone(),
            latency: latency.clone(),
            tls: args.tls.then(|| crate::certs::node_files(&dir.join(CERTS_DIR), region, id)),
            insecure: !args.tls,
            ..NodeConfig::default()
        })
    };
    let mut configs = Vec::new();
    for id in 1..=total {
        let (r, a) = ((id - 1) / args.azs, (id - 1) % args.azs);
        configs.push(node(id, REGION_NAMES[r as usize], a, &cluster)?);
    }
    for (a, id) in authority_ids.into_iter().enumerate() {
        configs.push(node(id, AUTHORITY_REGION, a as u64, &ClusterConfig::default())?);
    }
    Ok(configs)
}

/// Creates (or keeps) the CA and the certificates of every node, the admin
/// and the client in DIR/certs, and makes this process the admin for the
/// bootstrap calls it makes.
fn certificates(dir: &Path, configs: &[NodeConfig]) -> anyhow::Result<()> {
    let certs = dir.join(CERTS_DIR);
    let nodes: Vec<crate::certs::NodeCert> = configs
        .iter()
        .map(|c| crate::certs::NodeCert {
            region: c.region.clone(),
            id: c.id,
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
        })
        .collect();
    crate::certs::create(&certs, &nodes)?;
    let admin = crate::certs::role_files(&certs, &crate::tls::Role::Admin);
    crate::tls::set_client_identity(admin.client()?);
    Ok(())
}

/// Refuses to start anything while a port of the cluster is taken, naming
/// the port and, where a nines node answers there, that node.
async fn check_ports(configs: &[NodeConfig]) -> anyhow::Result<()> {
    for c in configs {
        for (what, addr) in [("client gRPC", c.grpc_listen), ("peer", c.peer_listen), ("admin", c.admin_listen)] {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                bail!(
                    "node {}'s {what} port {}: {}. Stop what runs there, or start this cluster on other ports \
                     (--grpc-port-base, --peer-port-base, --admin-port-base)",
                    c.id,
                    addr.port(),
                    crate::daemon::port_taken(addr, &e).await
                );
            }
        }
    }
    Ok(())
}

/// Runs `nines up`; with `admin_token_file` (the global flag) every node
/// requires that token for admin operations.
pub async fn run(args: UpArgs, admin_token_file: Option<PathBuf>) -> anyhow::Result<()> {
    if args.azs == 0 || args.azs > UP_AZS_MAX {
        bail!("--azs {} is outside 1..={UP_AZS_MAX}", args.azs);
    }
    if args.regions == 0 || args.regions > REGION_NAMES.len() as u64 {
        bail!("--regions {} is outside 1..={}", args.regions, REGION_NAMES.len());
    }
    let (dir, temp) = super::local::data_dir(args.data_dir.as_ref(), "nines-up-")?;
    let mut configs = node_configs(&args, &dir)?;
    if let Some(path) = admin_token_file {
        // The nodes run in their own directories: an absolute path.
        let path = std::fs::canonicalize(&path).with_context(|| format!("--admin-token-file {}", path.display()))?;
        for c in &mut configs {
            c.admin_token_file = Some(path.clone());
        }
    }
    check_ports(&configs).await?;
    let existing = configs.iter().filter(|c| crate::backup::restore::holds_data(&c.data_dir)).count();
    if existing != 0 && existing != configs.len() {
        bail!(
            "{} holds data for {existing} of {} nodes; use a fresh --data-dir or restore the missing nodes",
            dir.display(),
            configs.len()
        );
    }
    let fresh = existing == 0;
    // The members' addresses (http or https) are in the cluster's data.
    let made_with_tls = dir.join(CERTS_DIR).join("ca.pem").exists();
    if !fresh && args.tls != made_with_tls {
        let (was, add) = if made_with_tls { ("with", "add") } else { ("without", "drop") };
        bail!("{} holds a cluster started {was} --tls (its members' addresses say so): {add} --tls", dir.display());
    }
    if args.tls {
        certificates(&dir, &configs)?;
    }
    let until = args.restore_until.until();
    if args.restore_from.is_none() && (until.time_ms.is_some() || until.no_archive) {
        bail!("--to-time and --no-archive say how to restore: give --restore-from too");
    }
    let mut restored = Vec::new();
    if let Some(from) = &args.restore_from {
        if !fresh {
            bail!("--restore-from needs a fresh --data-dir: {} holds a cluster's data already", dir.display());
        }
        for region in configs.chunk_by(|a, b| a.region == b.region).filter(|r| r[0].region != AUTHORITY_REGION) {
            let r = super::backup::restore_into(from, args.restore_id.as_deref(), until, region).await?;
            println!("{}", super::backup::describe(&r, &region[0].region));
            restored.push(region[0].region.clone());
        }
    }
    let mut local = Local::default();
    for c in &configs {
        local.spawn(c)?;
    }
    let deadline = Instant::now() + STARTUP_DEADLINE;
    local.wait_serving(&configs, deadline).await?;
    let mut leaders = Vec::new();
    for region_configs in configs.chunk_by(|a, b| a.region == b.region) {
        let region = region_configs[0].region.clone();
        let init = fresh && !restored.contains(&region);
        leaders.push((region, local.bootstrap(region_configs, init, deadline).await?));
    }

    let mut mode = if args.regions > 1 { format!(", {}", configs[0].cluster.mode.as_str()) } else { String::new() };
    if !configs[0].cluster.authority.is_empty() {
        mode += &format!(", primary lease {:?} from a {AUTHORITY_NODES}-node authority", configs[0].cluster.lease);
    }
    println!("nines: {} regions x {} AZs{mode} (data in {})", args.regions, args.azs, dir.display());
    println!("{:<5} {:<10} {:<12} {:<24} {:<24} {:<24} {:<8}", "NODE", "REGION", "AZ", "GRPC", "PEER", "ADMIN", "PID");
    for (c, p) in configs.iter().zip(&local.nodes) {
        let urls = c.listen_urls();
        println!(
            "{:<5} {:<10} {:<12} {:<24} {:<24} {:<24} {:<8}",
            c.id,
            c.region,
            c.az,
            urls.grpc,
            urls.peer,
            urls.admin,
            p.pid()
        );
    }
    for (region, leader) in &leaders {
        println!("{region} leader: node {leader}");
    }
    if args.tls {
        let certs = dir.join(CERTS_DIR);
        let endpoints: Vec<String> =
            local.nodes.iter().filter(|n| n.config.region != AUTHORITY_REGION).map(|n| n.grpc()).collect();
        println!("mutual TLS on: certificates in {}; a client needs them:", certs.display());
        let flags = |role: &crate::tls::Role| {
            let f = crate::certs::role_files(&certs, role);
            format!(
                "--endpoints {} --cacert {} --cert {} --key {}",
                endpoints.join(","),
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        };
        println!("  client (reads, writes, status):  nines {} put hello world", flags(&crate::tls::Role::Client));
        println!("  admin (membership, regions):     nines {} member list", flags(&crate::tls::Role::Admin));
        println!("Ctrl-C stops every node");
    } else {
        println!("plaintext on 127.0.0.1 with no authentication (nines up --tls for mutual TLS)");
        println!("try: nines put hello world && nines get hello && nines status   (Ctrl-C stops every node)");
    }

    let stop = crate::daemon::termination_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => local.report_exits(),
        }
    }
    println!("stopping {} nodes", local.running());
    local.stop_all().await;
    drop(temp);
    Ok(())
}
