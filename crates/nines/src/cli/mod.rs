//! The `nines` command line, shaped like `etcdctl`: `--endpoints` (or
//! `NINES_ENDPOINTS`) defaulting to the cluster `nines up` starts, `-w
//! table|json`, and exit codes that tell failures apart (see
//! [`kv::exit`]), each with a one-line reason on stderr.

pub mod backup;
pub mod controller;
pub mod drill;
pub mod kv;
pub mod local;
pub mod region;
pub mod up;

use std::path::PathBuf;

use crate::rpc::{Client, ClientConfig, NodeInfo};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tracing::Instrument;

use crate::config::NodeConfig;

/// `nines --version`: the crate version and the git revision it was built
/// from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("NINES_GIT_REV"), ")");

#[derive(Parser, Debug)]
#[command(name = "nines", version = VERSION, about = "A replicated key-value store with multi-region failover")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Comma-separated client gRPC endpoints of the cluster (any one node
    /// will do).
    #[arg(long, global = true, env = "NINES_ENDPOINTS", value_delimiter = ',',
          default_values_t = crate::rpc::DEFAULT_ENDPOINTS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub endpoints: Vec<String>,
    /// Output format (json prints keys and values in base64).
    #[arg(short = 'w', long = "write-out", global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// How long connecting to one node may take (key-value commands).
    #[arg(long, global = true, default_value = "2s", value_parser = humantime::parse_duration)]
    pub dial_timeout: std::time::Duration,
    /// How long a key-value command may take over all its retries.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub command_timeout: std::time::Duration,
    /// The cluster CA certificate, to verify the nodes of an https:// cluster.
    #[arg(long = "cacert", id = "tls_cacert", global = true, env = "NINES_CACERT")]
    pub cacert: Option<PathBuf>,
    /// This client's certificate (client.pem, or admin.pem for membership and region operations).
    #[arg(long = "cert", id = "tls_cert", global = true, env = "NINES_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long = "key", id = "tls_key", global = true, env = "NINES_KEY")]
    pub key: Option<PathBuf>,
    /// A file holding the admin token (for clusters whose clients have no
    /// certificates): sent with every call; `nines node` and `nines up`
    /// require it for admin operations.
    #[arg(long, global = true, env = "NINES_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl Global {
    /// Reads `--admin-token-file`, if given, and sends the token with every
    /// call this process makes.
    fn send_admin_token(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.admin_token_file {
            let token = crate::token::AdminToken::read(path).map_err(|e| anyhow::anyhow!("--admin-token-file {e}"))?;
            crate::token::set_outgoing(token);
        }
        Ok(())
    }
}

impl Global {
    /// The TLS identity `--cacert`, `--cert` and `--key` give, if any: all
    /// three or none.
    pub fn tls(&self) -> anyhow::Result<Option<crate::tls::TlsConfig>> {
        match (&self.cacert, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                Ok(Some(crate::tls::TlsConfig { ca: ca.clone(), cert: cert.clone(), key: key.clone() }))
            }
            _ => anyhow::bail!("TLS needs all of --cacert, --cert and --key (or NINES_CACERT, NINES_CERT, NINES_KEY)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadConsistency {
    Linearizable,
    Local,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a local cluster on loopback: two regions of three nodes by
    /// default (plus a three-node authority in active-passive mode); no
    /// config needed.
    Up(up::UpArgs),
    /// Run one node until SIGTERM or Ctrl-C: its config file (see
    /// deploy/nines.example.toml), environment and flags; it bootstraps
    /// nothing by itself (`nines member init` does, once).
    Node(NodeArgs),
    #[command(flatten)]
    Kv(kv::KvCommand),
    /// Show every node: region, AZ, role, term, log and applied index, leader.
    Status,
    /// What happened lately, every node's events merged by time: leaders
    /// elected and lost, peers unreachable, promotions, demotions and fences,
    /// divergent writes recorded, clock skew refused.
    Events,
    /// Membership: list, init, add a learner, promote, remove.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Regions: status, planned switchover, failover, divergence record.
    #[command(subcommand)]
    Region(region::RegionCommand),
    /// Backups: create, list, verify, prune (file:// or s3:// targets).
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Make a new region's data directories from a backup (nodes stopped,
    /// directories empty); then start the nodes.
    Restore(backup::RestoreArgs),
    /// The disaster-recovery drill: each strategy (backup & restore, pilot
    /// light, warm standby, active-active) on real nodes, its primary region
    /// destroyed, RTO and RPO measured.
    Drill(drill::DrillArgs),
    /// Health-checked failover: promote a secondary when the primary fails N probes.
    Controller(controller::ControllerArgs),
    /// Probe an HTTP health endpoint (e.g. http://127.0.0.1:8001/health/ready):
    /// exit 0 on a 2xx answer, 1 otherwise. For container health checks.
    Health {
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Certificates for mutual TLS, made offline.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a cluster CA (or reuse the one in DIR), a certificate per
    /// node, and the admin's and a client's (never overwrites a file).
    Create {
        /// Where to write them: ca.pem, node-REGION-ID.pem, admin.pem,
        /// client.pem, each with its -key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// A node, as REGION/ID or REGION/ID=HOST,HOST,... (DNS names and IP
        /// addresses it is reached at; default localhost,127.0.0.1). Repeat
        /// for each node.
        #[arg(long = "node")]
        nodes: Vec<crate::certs::NodeCert>,
    },
}

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// List members and the leader.
    List,
    /// Bootstrap a fresh cluster through the first endpoint: `ID=URL[@REGION/AZ]` ...
    Init {
        members: Vec<String>,
        /// Keep trying to reach the node for this long (it may still be starting).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Succeed if the cluster is already initialized (for deployment scripts
        /// that run on every start).
        #[arg(long)]
        if_new: bool,
    },
    /// Add a node as a learner (returns once it caught up).
    AddLearner {
        id: u64,
        /// The node's client gRPC URL, e.g. http://127.0.0.1:7004.
        grpc_addr: String,
        /// The node's peer URL, e.g. http://127.0.0.1:9004 (default: the
        /// node is asked for it).
        #[arg(long, default_value = "")]
        peer_addr: String,
        #[arg(long, default_value = "")]
        admin_addr: String,
        #[arg(long, default_value = "local")]
        region: String,
        #[arg(long, default_value = "")]
        az: String,
    },
    /// Promote a learner to voter.
    Promote { id: u64 },
    /// Remove a node.
    Remove { id: u64 },
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The node's TOML config (see deploy/nines.example.toml); defaults apply without one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, env = "NINES_ID")]
    pub id: Option<u64>,
    /// Take the id from the host name's trailing number plus one (a
    /// StatefulSet's pod `nines-us-east-0` is node 1).
    #[arg(long, env = "NINES_ID_FROM_HOSTNAME", conflicts_with = "id")]
    pub id_from_hostname: bool,
    #[arg(long, env = "NINES_REGION")]
    pub region: Option<String>,
    /// The node's AZ label; an empty value counts as not given.
    #[arg(long, env = "NINES_AZ")]
    pub az: Option<String>,
    /// The AZ when `--az` is absent or empty, made into a valid label (every
    /// character other than a letter, digit, '-' or '_' becomes '-'). The
    /// Kubernetes manifests pass the node's zone label as `--az` and the
    /// node's name here, so a cluster whose nodes carry no zone label (kind,
    /// minikube) or have dotted names (EKS) still starts.
    #[arg(long, env = "NINES_AZ_FALLBACK")]
    pub az_fallback: Option<String>,
    #[arg(long, env = "NINES_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the client gRPC listener (KV, admin, health) listens.
    #[arg(long, env = "NINES_GRPC_LISTEN")]
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// Where the peer gRPC listener (Raft, shipments) listens.
    #[arg(long, env = "NINES_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    #[arg(long, env = "NINES_ADMIN_LISTEN")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// The client gRPC URL others reach this node at (default: http:// + the listen address).
    #[arg(long, env = "NINES_GRPC_ADVERTISE")]
    pub grpc_advertise: Option<String>,
    /// The peer URL other nodes reach this node at (default: http:// + the listen address).
    #[arg(long, env = "NINES_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// The admin URL others reach this node at.
    #[arg(long, env = "NINES_ADMIN_ADVERTISE")]
    pub admin_advertise: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Run plaintext with no authentication (the config's `insecure = true`).
    #[arg(long, env = "NINES_INSECURE", conflicts_with = "tls_dir")]
    pub insecure: bool,
    /// Mutual TLS with the certificates `nines certs create` wrote to this
    /// directory: ca.pem and this node's node-REGION-ID.pem and its key
    /// (the config's `[tls]`, for nodes that share one config file).
    #[arg(long, env = "NINES_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

impl NodeArgs {
    /// The config file (or defaults) with environment and flags applied.
    pub fn resolve(&self) -> anyhow::Result<NodeConfig> {
        let mut c = crate::daemon::load_config(self.config.as_ref())?;
        if let Some(v) = self.id {
            c.id = v;
        }
        if self.id_from_hostname {
            c.id = id_from_hostname(&hostname()?)?;
        }
        if let Some(v) = &self.region {
            c.region = v.clone();
        }
        match (self.az.as_deref().filter(|v| !v.is_empty()), &self.az_fallback) {
            (Some(v), _) => c.az = v.to_string(),
            (None, Some(fallback)) => c.az = az_label(fallback),
            (None, None) => {}
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = self.grpc_listen {
            c.grpc_listen = v;
        }
        if let Some(v) = self.peer_listen {
            c.peer_listen = v;
        }
        if let Some(v) = self.admin_listen {
            c.admin_listen = v;
        }
        if let Some(v) = &self.grpc_advertise {
            c.grpc_advertise = v.clone();
        }
        if let Some(v) = &self.peer_advertise {
            c.peer_advertise = v.clone();
        }
        if let Some(v) = &self.admin_advertise {
            c.admin_advertise = v.clone();
        }
        if self.log_json {
            c.log_format = "json".into();
        }
        if self.insecure {
            c.insecure = true;
        }
        if let Some(dir) = &self.tls_dir {
            c.tls = Some(crate::certs::node_files(dir, &c.region, c.id));
            c.insecure = false;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `name` as an AZ label: each character a label may not hold becomes
/// '-', and the result is cut to `LABEL_BYTES_MAX` (config validation still
/// refuses an empty one).
fn az_label(name: &str) -> String {
    name.chars()
        .map(|c| if crate::config::is_label_char(c) { c } else { '-' })
        .take(crate::limits::LABEL_BYTES_MAX)
        .collect()
}

fn hostname() -> anyhow::Result<String> {
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
    {
        return Ok(h);
    }
    Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
}

/// `name-N` is node N + 1.
fn id_from_hostname(host: &str) -> anyhow::Result<u64> {
    let ordinal = host.rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
    ordinal.map(|n| n + 1).ok_or_else(|| anyhow::anyhow!("host name {host:?} does not end in -NUMBER"))
}

/// The whole `nines` command line: parses `args` (the program name first),
/// runs the command and returns the process's exit code: 0 on success, 1
/// with a one-line reason on stderr otherwise (clap's own codes for bad
/// usage). The `nines` binary is this; the harness calls it too, for the
/// nodes and controllers it starts and as the `nines` of its images.
pub fn main<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let result = match cli.command {
        Command::Node(args) => run_node(args, cli.global.admin_token_file.clone()).map(|_| true),
        command => tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async {
                match command {
                    Command::Up(args) => {
                        init_tracing(false);
                        cli.global.send_admin_token()?;
                        up::run(args, cli.global.admin_token_file.clone()).await.map(|_| true)
                    }
                    command => {
                        if let Some(tls) = cli.global.tls()? {
                            crate::tls::set_client_identity(tls.client()?);
                        }
                        cli.global.send_admin_token()?;
                        run_client(cli.global, command).await
                    }
                }
            })
        }),
    };
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            // One line: the error and its causes.
            let reason: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("nines: {}", reason.join(": "));
            e.downcast_ref::<kv::Exit>().map_or(kv::exit::FAILED, |exit| exit.code)
        }
    }
}

/// Sets up logging. Every line of a node names its node, region and AZ (the
/// `node` span entered by [`run_node`]).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NINES_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // Ignored: a subscriber may already be set (tests).
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Runs `nines node` on its own runtime. Every runtime thread enters the
/// node's span (id, region, AZ) for good, so every log line of the node
/// names it, including those of tasks openraft spawns.
pub fn run_node(args: NodeArgs, admin_token_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = args.resolve()?;
    if admin_token_file.is_some() {
        config.admin_token_file = admin_token_file;
    }
    init_tracing(config.log_format == "json");
    let span = tracing::info_span!("node", id = config.id, region = %config.region, az = %config.az);
    let thread_span = span.clone();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime_threads > 0 {
        builder.worker_threads(config.runtime_threads);
    }
    let runtime = builder
        .enable_all()
        .on_thread_start(move || {
            // Never exited: the thread belongs to this node until the process ends.
            std::mem::forget(thread_span.clone().entered());
        })
        .build()?;
    runtime.block_on(crate::daemon::run(config, crate::daemon::termination_signal()).instrument(span))
}

fn client(g: &Global) -> anyhow::Result<Client> {
    Ok(Client::new(g.endpoints.clone(), ClientConfig::default())?)
}

/// Prints rows as an aligned table.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub(crate) fn print_json(v: serde_json::Value) {
    println!("{v}");
}

/// Parses `ID=URL[@REGION/AZ]`.
fn parse_member(s: &str) -> anyhow::Result<NodeInfo> {
    let (id, rest) = s.split_once('=').ok_or_else(|| anyhow::anyhow!("member {s:?} is not ID=URL[@REGION/AZ]"))?;
    let id: u64 = id.parse().map_err(|_| anyhow::anyhow!("member {s:?}: id {id:?} is not a number"))?;
    let (url, labels) = match rest.split_once('@') {
        Some((u, l)) => (u, Some(l)),
        None => (rest, None),
    };
    let (region, az) = match labels {
        Some(l) => {
            let (r, a) = l.split_once('/').ok_or_else(|| anyhow::anyhow!("member {s:?}: labels must be REGION/AZ"))?;
            (r.to_string(), a.to_string())
        }
        None => ("local".to_string(), String::new()),
    };
    // The node that takes the request asks each member for its peer URL.
    Ok(NodeInfo { id, grpc_addr: url.to_string(), admin_addr: String::new(), region, az, peer_addr: String::new() })
}

fn print_members(g: &Global, m: &crate::rpc::MembersResponse) {
    if g.format == Format::Json {
        let members: Vec<_> = m
            .members
            .iter()
            .filter_map(|m| m.node.as_ref().map(|n| (n, m.voter)))
            .map(|(n, voter)| json!({"id": n.id, "grpc_addr": n.grpc_addr, "peer_addr": n.peer_addr, "admin_addr": n.admin_addr, "region": n.region, "az": n.az, "voter": voter}))
            .collect();
        print_json(json!({ "leader_id": m.leader_id, "members": members }));
        return;
    }
    let rows: Vec<Vec<String>> = m
        .members
        .iter()
        .filter_map(|mem| mem.node.as_ref().map(|n| (n, mem.voter)))
        .map(|(n, voter)| {
            vec![
                n.id.to_string(),
                if voter { "voter" } else { "learner" }.into(),
                n.region.clone(),
                n.az.clone(),
                n.grpc_addr.clone(),
                n.peer_addr.clone(),
                if m.leader_id == Some(n.id) { "*".into() } else { String::new() },
            ]
        })
        .collect();
    print_table(&["ID", "KIND", "REGION", "AZ", "GRPC", "PEER", "LEADER"], &rows);
}

/// Runs one client command; `Ok(false)` means "ran, but the answer is no"
/// (key not found, comparison failed), which exits 1.
pub async fn run_client(g: Global, command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Up(_) | Command::Node(_) => unreachable!("handled by main"),
        Command::Kv(kv) => kv::run(&g, kv).await?,
        Command::Status => status(&g).await?,
        Command::Events => events(&g).await?,
        Command::Region(r) => region::run(&g, r).await?,
        Command::Controller(args) => controller::run(&g, args).await?,
        Command::Backup(b) => return backup::run(&g, b).await,
        Command::Restore(args) => return backup::restore(args).await,
        Command::Drill(args) => return drill::run(&g, args).await,
        Command::Health { url, timeout } => return health(&url, timeout).await,
        Command::Certs(CertsCommand::Create { dir, nodes }) => {
            let created = crate::certs::create(&dir, &nodes)?;
            for f in &created.written {
                println!("wrote {}", f.display());
            }
            for f in &created.kept {
                println!("kept  {} (exists)", f.display());
            }
            println!(
                "a node's config: [tls] ca = \"{0}/ca.pem\", cert = \"{0}/node-REGION-ID.pem\", key = \"{0}/node-REGION-ID-key.pem\"",
                dir.display()
            );
            println!(
                "a client: nines --cacert {0}/ca.pem --cert {0}/client.pem --key {0}/client-key.pem (admin.pem for membership)",
                dir.display()
            );
        }
        Command::Member(m) => {
            let c = client(&g)?;
            match m {
                MemberCommand::List => print_members(&g, &c.members().await?),
                MemberCommand::Init { members, wait, if_new } => {
                    let members = members.iter().map(|m| parse_member(m)).collect::<anyhow::Result<Vec<_>>>()?;
                    let deadline = std::time::Instant::now() + wait;
                    loop {
                        match c.init(&g.endpoints[0], members.clone()).await {
                            Ok(()) => {
                                println!("initialized");
                                break;
                            }
                            Err(crate::rpc::Error::FailedPrecondition(msg)) if if_new => {
                                println!("already initialized ({msg})");
                                break;
                            }
                            Err(crate::rpc::Error::Server { code: tonic::Code::Unavailable, .. })
                                if std::time::Instant::now() < deadline =>
                            {
                                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                MemberCommand::AddLearner { id, grpc_addr, peer_addr, admin_addr, region, az } => {
                    let m = c.add_learner(NodeInfo { id, grpc_addr, admin_addr, region, az, peer_addr }).await?;
                    print_members(&g, &m);
                }
                MemberCommand::Promote { id } => print_members(&g, &c.promote(id).await?),
                MemberCommand::Remove { id } => print_members(&g, &c.remove(id).await?),
            }
        }
    }
    Ok(true)
}

/// `nines health URL`: `Ok(true)` on a 2xx answer within `timeout`.
async fn health(url: &str, timeout: std::time::Duration) -> anyhow::Result<bool> {
    let (status, body) = crate::view::http_get(url, timeout).await?;
    let text = String::from_utf8_lossy(&body);
    if (200..300).contains(&status) {
        println!("{status} {}", text.trim());
        Ok(true)
    } else {
        eprintln!("{url}: {status} {}", text.trim());
        Ok(false)
    }
}

/// `nines events`: every node's events, merged by time; then the nodes
/// whose events could not be fetched.
async fn events(g: &Global) -> anyhow::Result<()> {
    let json = client(g)?.cluster_events().await?;
    let histories: Vec<crate::events::NodeHistory> =
        serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("the cluster's events: {e}"))?;
    let events = crate::events::merge(&histories);
    let missing: Vec<_> = histories
        .iter()
        .filter_map(|h| h.error.as_ref().map(|e| json!({"node": h.node, "region": h.region, "error": e})))
        .collect();
    if g.format == Format::Json {
        print_json(json!({ "events": events, "unreachable": missing }));
        return Ok(());
    }
    let time = |ms: u64| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
    };
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| vec![time(e.at_ms), e.node.to_string(), e.region.clone(), e.kind.clone(), e.message.clone()])
        .collect();
    print_table(&["TIME", "NODE", "REGION", "KIND", "EVENT"], &rows);
    for h in histories.iter().filter(|h| h.error.is_some()) {
        let who = if h.node == 0 { format!("region {}", h.region) } else { format!("node {}", h.node) };
        eprintln!("{who}: events not fetched: {}", h.error.as_deref().unwrap_or_default());
    }
    Ok(())
}

/// `nines status`: every node of every region (from [`crate::view`]),
/// then each region's role and replication lag.
async fn status(g: &Global) -> anyhow::Result<()> {
    // The node gathers the view: it reaches addresses that may be private to
    // the cluster's network (containers). Without an answer, gather it here.
    let config = ClientConfig {
        attempts_max: 3,
        attempt_timeout: std::time::Duration::from_secs(15),
        ..ClientConfig::default()
    };
    let asked = Client::new(g.endpoints.clone(), config)?
        .cluster_view()
        .await
        .ok()
        .and_then(|j| serde_json::from_str::<crate::view::ClusterView>(&j).ok());
    let view = match asked {
        Some(v) => v,
        None => {
            let regions = match region::discover(g).await {
                Ok(r) => r,
                Err(_) => vec![crate::rpc::RegionInfo { name: String::new(), endpoints: g.endpoints.clone() }],
            };
            crate::view::cluster(&regions).await
        }
    };
    if g.format == Format::Json {
        print_json(serde_json::to_value(&view)?);
        return Ok(());
    }
    let dash = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut rows = Vec::new();
    for r in &view.regions {
        if r.nodes.is_empty() {
            rows.push(vec![
                "-".into(),
                r.name.clone(),
                "-".into(),
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for n in &r.nodes {
            rows.push(vec![
                n.id.to_string(),
                n.region.clone(),
                n.az.clone(),
                n.role.clone().unwrap_or_else(|| "unreachable".into()),
                dash(n.term),
                dash(n.last_log_index),
                dash(n.applied_index),
                dash(n.leader_id),
                n.hlc_ahead_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "-".into()),
                n.grpc_addr.clone(),
            ]);
        }
    }
    let header = ["NODE", "REGION", "AZ", "ROLE", "TERM", "LAST LOG", "APPLIED", "LEADER", "HLC AHEAD", "GRPC"];
    print_table(&header, &rows);
    for n in view.regions.iter().flat_map(|r| &r.nodes) {
        if let Some((id, at)) = &n.last_backup {
            println!("last scheduled backup of {}: {id} at {at} (node {})", n.region, n.id);
        }
    }
    if view.regions.len() > 1 {
        println!();
        let rows: Vec<Vec<String>> = view
            .regions
            .iter()
            .map(|r| {
                let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                vec![
                    r.name.clone(),
                    text(&r.mode),
                    if r.reachable { text(&r.role) } else { "unreachable".into() },
                    text(&r.primary),
                    dash(r.epoch),
                    dash(r.changefeed_entries),
                    dash(r.divergent_count),
                ]
            })
            .collect();
        print_table(&["REGION", "MODE", "ROLE", "PRIMARY", "EPOCH", "CHANGEFEED", "DIVERGENT"], &rows);
        let lags: Vec<Vec<String>> = view
            .regions
            .iter()
            .flat_map(|r| {
                r.lag.iter().map(|l| vec![r.name.clone(), l.to.clone(), l.entries.to_string(), l.ms.to_string()])
            })
            .collect();
        if !lags.is_empty() {
            println!();
            print_table(&["FROM", "TO", "LAG ENTRIES", "LAG MS"], &lags);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_with_and_without_labels() {
        let n = parse_member("2=http://127.0.0.1:7002@us-east/us-east-b").unwrap();
        assert_eq!(
            (n.id, n.grpc_addr.as_str(), n.region.as_str(), n.az.as_str()),
            (2, "http://127.0.0.1:7002", "us-east", "us-east-b")
        );
        assert_eq!(parse_member("1=http://h:1").unwrap().region, "local");
        for bad in ["x=http://h", "http://h", "1=http://h@nolabel"] {
            assert!(parse_member(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_come_from_statefulset_host_names() {
        assert_eq!(id_from_hostname("nines-us-east-0").unwrap(), 1);
        assert_eq!(id_from_hostname("nines-eu-west-2").unwrap(), 3);
        assert!(id_from_hostname("nines").is_err());
    }

    #[test]
    fn the_az_falls_back_to_a_sanitized_node_name_only_when_absent_or_empty() {
        #[derive(Parser)]
        struct Node {
            #[command(flatten)]
            args: NodeArgs,
        }
        let args = |az: Option<&str>, fallback: Option<&str>| {
            let mut a = Node::try_parse_from(["node", "--id", "1", "--region", "r", "--insecure"]).unwrap().args;
            a.az = az.map(str::to_string);
            a.az_fallback = fallback.map(str::to_string);
            a.resolve().map(|c| c.az)
        };
        // EKS names nodes after their DNS name: dots become dashes.
        assert_eq!(args(Some(""), Some("ip-10-0-1-2.ec2.internal")).unwrap(), "ip-10-0-1-2-ec2-internal");
        assert_eq!(args(None, Some("kind-worker")).unwrap(), "kind-worker");
        assert_eq!(args(Some("us-east-1a"), Some("ip-10-0-1-2.ec2.internal")).unwrap(), "us-east-1a");
        assert_eq!(args(None, Some(&"n".repeat(500))).unwrap().len(), crate::limits::LABEL_BYTES_MAX);
        let e = args(Some(""), Some("")).unwrap_err().to_string();
        assert!(e.contains("az"), "an empty AZ is still refused by name: {e}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
