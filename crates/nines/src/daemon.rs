//! The daemon: wires one node together, runs it and stops it. Nothing else
//! in the crate imports this module (besides the command line): it is the
//! top floor, and every service below it only sees the [`Node`] handle.
//!
//! [`run`] is a fixed sequence of steps, each a function here:
//!
//! 1. **Prepare** (`prepare`): validate the configuration, create the data
//!    directory, set up the fault hooks and the clock; then check the
//!    directory's format (another one is refused before anything is
//!    written) and take its lock (`LOCK`, naming this process: a second
//!    node on the same directory stops, naming the first one's PID).
//! 2. **Check the ports** (`check_ports`): each port is bound and let go
//!    before storage opens (which can take a while after a crash), so a
//!    taken port fails the start at once with its name (and the node that
//!    answers there).
//! 3. **Open storage** (`open_storage`) and **bind** (`bind`): the Raft log
//!    and the state machine, with this node's replication setup; then the
//!    client gRPC, peer gRPC and admin HTTP listeners, so that until the
//!    node can answer, connections are refused rather than left waiting.
//! 4. **Start Raft and the handle** (`start_node`): openraft on the opened
//!    storage, and the [`Node`] every service shares.
//! 5. **Serve** (`serve`): the client services (KV, admin, health,
//!    reflection) on the client port, Raft and shipments on the peer port
//!    (ports by trust, as etcd's 2379 and 2380), probes on the admin port.
//! 6. **Spawn tasks** (`spawn_tasks`): the write batcher, the shippers,
//!    the setup and resync tasks, the gauges, the gRPC health reporter, the clock
//!    watch and the scheduled backups.
//! 7. **Announce** (`write_addrs`): the bound addresses and PID, in
//!    `addrs.json` of the data directory.
//! 8. **Wait for stop** (`wait_for_stop`): SIGTERM/SIGINT, Raft stopping
//!    by itself, or a replica that can no longer be trusted.
//! 9. **Drain** (`drain`): stop accepting requests, let in-flight ones
//!    finish for up to `SHUTDOWN_GRACE`, stop Raft.
//!
//! Startup never bootstraps a cluster by itself: a fresh cluster is
//! initialised exactly once through the admin `Init` call, so a node that
//! restarts (or restarts with a wiped disk) can never found a second cluster.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nines_proto::v1::admin_server::AdminServer;
use nines_proto::v1::kv_server::KvServer;
use nines_proto::v1::raft_server::RaftServer;
use nines_proto::v1::region_admin_server::RegionAdminServer;
use nines_proto::v1::replication_server::ReplicationServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Bound, NodeConfig};
use crate::faults::Faults;
use crate::hlc::HlcClock;
use crate::limits::{GRPC_STREAMS_PER_CONNECTION_MAX, RAFT_MESSAGE_BYTES_MAX, REQUEST_BYTES_MAX, RESPONSE_BYTES_MAX};
use crate::network::{Channels, NetworkFactory};
use crate::node::{Node, Parts, Receivers, Regions};
use crate::server::admin::AdminService;
use crate::server::guard::GuardLayer;
use crate::server::kv::KvService;
use crate::server::raft::RaftService;
use crate::server::region::RegionAdminService;
use crate::server::replication::ReplicationService;
use crate::storage::{self, LogStore, StateMachine};
use crate::types::{NodeInfo, Raft, ReplicationSetup};

/// How long in-flight requests may run after shutdown begins. Longer than
/// the default write timeout would let one stuck write hold up a restart;
/// shorter than a container runtime's usual 10 s grace before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The file a node writes into its data directory once it serves, naming
/// the addresses it bound (useful with port 0) and its PID.
pub const ADDRS_FILE: &str = "addrs.json";

/// The gRPC health service's name for the client API; its status follows
/// readiness (a known leader), while the overall status ("") follows
/// liveness.
pub const KV_HEALTH_SERVICE: &str = "nines.v1.Kv";

/// How often the gauges are refreshed from Raft and storage.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Streams a peer may open and reset before this node accepts them (h2's
/// default is 20): a peer's RPCs over a 10 s stop, with room to spare.
const PENDING_ACCEPT_RESETS_MAX: usize = 1024;

/// How often readiness is re-checked for gRPC health even when Raft reports
/// no change of role, leader or membership: a leader that lost its quorum
/// changes nothing Raft would report, and catching up, the region's role
/// and stepping down are not in what it reports. A leader's check is one
/// quorum round, four a second.
const HEALTH_RECHECK: Duration = Duration::from_millis(250);

/// The contents of [`ADDRS_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Addrs {
    pub id: crate::types::NodeId,
    pub grpc_addr: String,
    pub peer_addr: String,
    pub admin_addr: String,
    pub pid: u32,
}

/// Loads a node's configuration from a file, or the defaults without one.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<NodeConfig> {
    Ok(match path {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    })
}

/// Runs a node until `shutdown` completes (steps 1-9 of the module doc).
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let prepared = prepare(&config)?;
    // A directory of another format is refused before anything is written
    // into it, the lock file included.
    crate::storage::format::check(&config.data_dir)
        .with_context(|| format!("opening storage in {}", config.data_dir.display()))?;
    // Held until the node's process ends.
    let _lock = lock_data_dir(&config.data_dir)?;
    check_ports(&config).await?;
    let (storage, log_store, state_machine) = open_storage(&config, &prepared)?;
    let listeners = bind(&config).await?;
    let (tls, admin_token) = (prepared.tls.clone(), prepared.admin_token.clone());
    let (node, raft, receivers) = start_node(&config, prepared, &listeners, log_store, state_machine).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let servers = serve(&node, &raft, listeners, (tls, admin_token), &stop_rx).await?;
    let tasks = spawn_tasks(&node, &config, storage, receivers.proposals, servers.health.clone(), &stop_rx);
    let addrs_path = write_addrs(&config, &node)?;
    let failure = wait_for_stop(&raft, receivers.fatal, shutdown).await;
    drain(stop_tx, servers, tasks, &node, &raft).await;
    let _ = std::fs::remove_file(&addrs_path);
    match failure {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(reason) => Err(anyhow::anyhow!("node stopped: {reason}")),
    }
}

/// What step 1 sets up.
struct Prepared {
    faults: Arc<Faults>,
    clock: Arc<HlcClock>,
    raft_config: Arc<openraft::Config>,
    /// The TLS server side, when the node has `[tls]`.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The admin token, when the node has `admin_token_file`.
    admin_token: Option<crate::token::AdminToken>,
}

/// The lock file in a data directory: locked (`flock`) by the node that
/// uses the directory, and naming its PID.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the lock of `dir`, or says which live process holds it. The lock
/// goes with the process, however it ends (even `kill -9`).
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "another process".to_string() } else { format!("PID {holder}") };
            anyhow::bail!(
                "data_dir {} is in use by a running nines node ({holder}): stop it first, or give this node \
                 another data_dir",
                dir.display()
            );
        }
        // A filesystem without locks: run unguarded, and say so.
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(
                path = %path.display(),
                "the filesystem cannot lock files: a second node on this data_dir would not be stopped"
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Step 1: validate, create the data directory, fault hooks and clock (the
/// directory's lock is taken right after, and held by `run`).
fn prepare(config: &NodeConfig) -> anyhow::Result<Prepared> {
    config.validate()?;
    let raft_config = Arc::new(config.openraft()?);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let faults = Arc::new(Faults::new(config.fault_injection, config.planted_bug_local_reads));
    if config.fault_injection {
        tracing::warn!("fault injection is enabled: this node is for tests only");
    }
    let tls = match &config.tls {
        Some(tls) => {
            // This node's identity for every connection it makes.
            crate::tls::set_client_identity(tls.client()?);
            Some(tls.server()?)
        }
        None => {
            tracing::warn!(
                "RUNNING INSECURE (insecure = true): gRPC on {} (clients) and {} (peers) is plaintext with no \
                 authentication; anyone who reaches them can read, write, change membership and send Raft traffic",
                config.grpc_listen,
                config.peer_listen
            );
            None
        }
    };
    let admin_token = match &config.admin_token_file {
        Some(path) => {
            let token = crate::token::AdminToken::read(path).map_err(|e| anyhow::anyhow!("admin_token_file: {e}"))?;
            // Sent with the node's own calls, as its identity is.
            crate::token::set_outgoing(token.clone());
            Some(token)
        }
        None => None,
    };
    let clock = Arc::new(HlcClock::new(Box::new(faults.clock()), config.clock_offset_max.as_millis() as u64));
    Ok(Prepared { faults, clock, raft_config, tls, admin_token })
}

/// Step 3: the Raft log and the state machine; a region whose replicated
/// setup disagrees with this node's file is refused here, naming the field.
fn open_storage(config: &NodeConfig, prepared: &Prepared) -> anyhow::Result<(storage::Disk, LogStore, StateMachine)> {
    let options = storage::Options {
        cache_bytes: config.storage.cache_size as usize,
        power_loss_simulation: config.storage.power_loss_simulation,
        node_id: Some(config.id),
        log_sync_delay_ms: Some(prepared.faults.log_sync_delay_ms()),
    };
    let opened = storage::open(&config.data_dir, prepared.clock.clone(), options)
        .with_context(|| format!("opening storage in {}", config.data_dir.display()))?;
    if let Some(replicated) = opened.2.reader().setup() {
        check_setup(&replication_setup(config), &replicated)?;
    }
    Ok(opened)
}

/// The replication setup a configuration file describes: what the region's
/// first leader proposes, and what a restart is checked against.
pub fn replication_setup(config: &NodeConfig) -> ReplicationSetup {
    let mut peers: Vec<String> = config.peer_regions().into_iter().map(|p| p.name).collect();
    peers.sort();
    ReplicationSetup {
        region: config.region.clone(),
        peers,
        mode: config.cluster.mode,
        initial_primary: config.cluster.primary.clone(),
    }
}

/// Refuses a configuration file whose replication setup differs from the
/// one the region replicated, naming the first field that differs.
pub fn check_setup(file: &ReplicationSetup, replicated: &ReplicationSetup) -> anyhow::Result<()> {
    match file.differing_field(replicated) {
        None => Ok(()),
        Some(field) => Err(anyhow::anyhow!(
            "{field} in this node's configuration disagrees with the setup region {} replicated: the file says \
             {}, the region {}. Every node of a region must apply the same setup: set {field} back, or change the \
             region's setup with `nines region configure` and then every node's file",
            replicated.region,
            file.describe(),
            replicated.describe()
        )),
    }
}

/// The authority client, when the cluster has one (active-passive). Its
/// calls give up within a third of the lease, so a renewal that cannot be
/// made is known in time.
fn authority(config: &NodeConfig) -> anyhow::Result<Option<crate::authority::Authority>> {
    if config.cluster.authority.is_empty() || config.cluster.mode != crate::config::Mode::ActivePassive {
        return Ok(None);
    }
    let timeout = config.cluster.lease / 3;
    Ok(Some(crate::authority::Authority::new(config.cluster.authority.clone(), timeout)?))
}

/// The bound listeners of step 3.
struct Listeners {
    grpc: TcpListener,
    peer: TcpListener,
    admin: TcpListener,
    bound: Bound,
}

/// Step 2: each port can be bound now (a port 0 always can).
async fn check_ports(config: &NodeConfig) -> anyhow::Result<()> {
    for (field, addr) in [
        ("grpc_listen", config.grpc_listen),
        ("peer_listen", config.peer_listen),
        ("admin_listen", config.admin_listen),
    ] {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!("{field} {}", port_taken(addr, &e).await);
        }
    }
    Ok(())
}

/// Step 3: bind the three ports.
async fn bind(config: &NodeConfig) -> anyhow::Result<Listeners> {
    let listen = |field: &'static str, addr: SocketAddr| async move {
        match TcpListener::bind(addr).await {
            Ok(listener) => Ok(listener),
            Err(e) => Err(anyhow::anyhow!("{field} {}", port_taken(addr, &e).await)),
        }
    };
    let grpc = listen("grpc_listen", config.grpc_listen).await?;
    let peer = listen("peer_listen", config.peer_listen).await?;
    let admin = listen("admin_listen", config.admin_listen).await?;
    let bound = Bound { grpc: grpc.local_addr()?, peer: peer.local_addr()?, admin: admin.local_addr()? };
    Ok(Listeners { grpc, peer, admin, bound })
}

/// Why `addr` cannot be bound, and who answers there when it is a nines
/// node (asked for its status, within a second).
pub async fn port_taken(addr: SocketAddr, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return format!("{addr} cannot be bound: {e}");
    }
    let probe =
        crate::rpc::ClientConfig { attempt_timeout: Duration::from_millis(500), ..crate::rpc::ClientConfig::default() };
    // Plaintext, then TLS with this process's identity if it has one (a
    // node of another CA cannot be asked).
    for url in [format!("http://{addr}"), format!("https://{addr}")] {
        let Ok(client) = crate::rpc::Client::new(vec![url.clone()], probe.clone()) else { continue };
        if let Some(n) = client.status_of(&url).await.ok().and_then(|s| s.node) {
            return format!(
                "{addr} is in use: nines node {} of region {} answers there (see its cluster with `nines status \
                 --endpoints {url}`)",
                n.id, n.region
            );
        }
    }
    format!("{addr} is in use (by another program, or a nines port this process cannot ask)")
}

/// Step 4: start openraft on the opened storage and build the handle.
async fn start_node(
    config: &NodeConfig,
    prepared: Prepared,
    listeners: &Listeners,
    mut log_store: LogStore,
    state_machine: StateMachine,
) -> anyhow::Result<(Arc<Node>, Raft, Receivers)> {
    // Every entry this node holds may have been committed by it before a
    // restart (see `Node::ensure_linearizable`).
    let log_state = openraft::storage::RaftLogStorage::get_log_state(&mut log_store).await?;
    let log_index_at_start = log_state.last_log_id.map_or(0, |l| l.index);
    let info = NodeInfo::of(config, config.urls(&listeners.bound));
    let reader = state_machine.reader();
    let channels = Channels::default();
    let history = Arc::new(crate::events::History::new(config.id, &config.region));
    let network = NetworkFactory {
        id: config.id,
        channels: channels.clone(),
        me: info.clone(),
        latency: config.latency.clone(),
        faults: prepared.faults.clone(),
        retry_unreachable: Duration::from_millis(prepared.raft_config.heartbeat_interval),
        history: history.clone(),
        synced: log_store.synced(),
    };
    let raft =
        Raft::new(config.id, prepared.raft_config, network, log_store, state_machine).await.context("starting raft")?;
    let metrics = match crate::telemetry::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
            None
        }
    };
    let (node, receivers) = Node::new(Parts {
        id: config.id,
        info,
        raft: raft.clone(),
        reader,
        clock: prepared.clock,
        channels,
        write_timeout: config.write_timeout,
        regions: Regions {
            mode: config.cluster.mode,
            peers: config.peer_regions(),
            all: config.cluster.regions.clone(),
            setup: replication_setup(config),
            authority: config.cluster.authority.clone(),
            lease: config.cluster.lease,
        },
        latency: config.latency.clone(),
        faults: prepared.faults,
        metrics,
        contact: Arc::default(),
        authority: authority(config)?,
        log_index_at_start,
        history,
    });
    Ok((node, raft, receivers))
}

/// The running servers of step 5 and the health reporter they feed.
struct Servers {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    peer: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
}

/// Completes once `stop` turns true (or its sender is gone, which also
/// means stop).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Step 5: the client services on the client port, Raft and shipments on
/// the peer port (both over mutual TLS, each call authorized by the
/// caller's role, when the node has `[tls]`), probes and metrics on the
/// admin port. A service is reachable on its own port only.
async fn serve(
    node: &Arc<Node>,
    raft: &Raft,
    listeners: Listeners,
    (tls, admin_token): (Option<tokio_rustls::TlsAcceptor>, Option<crate::token::AdminToken>),
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Servers> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    // Reflection in both protocols: v1, and v1alpha, which older grpcurl
    // and grpcui and Python's grpcio-reflection speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nines_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha().context("building gRPC reflection (v1alpha)")?;
    let reflection = reflection().build_v1().context("building gRPC reflection")?;
    let mut server = tonic::transport::Server::builder()
        // A leader cancels every Raft RPC that outlives its deadline, so a
        // node that was stopped for a while (SIGSTOP, a VM stall) resumes to
        // hundreds of streams its peers reset before it could accept them.
        // Past h2's default limit of 20 it sends GOAWAY (too_many_resets)
        // and drops the connection with every forwarded write on it. The
        // limit still bounds what a rapid-reset flood can queue.
        .http2_max_pending_accept_reset_streams(Some(PENDING_ACCEPT_RESETS_MAX))
        .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION_MAX)
        // Authorization first: a refused caller takes no share of the budget.
        .layer(GuardLayer(crate::tls::Gate::new(node.region(), tls.is_some(), admin_token)))
        .layer(GuardLayer(crate::server::shed::Shed::default()));
    let client = server
        .clone()
        .add_service(health_service.clone())
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            KvServer::new(KvService::new(node.clone()))
                .max_decoding_message_size(REQUEST_BYTES_MAX)
                .max_encoding_message_size(RESPONSE_BYTES_MAX),
        )
        .add_service(AdminServer::new(AdminService::new(node.clone())))
        .add_service(RegionAdminServer::new(RegionAdminService::new(node.clone())));
    let peer = server
        .add_service(health_service)
        .add_service(
            ReplicationServer::new(ReplicationService::new(node.clone()))
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
        )
        .add_service(
            RaftServer::new(RaftService::new(raft.clone(), node.clone()))
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
        );
    // One router on one listener, plaintext or TLS.
    macro_rules! spawn_router {
        ($router:expr, $listener:expr) => {
            match &tls {
                // No Nagle on accepted connections: with delayed ACKs it
                // holds small replies back by up to 40 ms.
                None => tokio::spawn($router.serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from($listener).with_nodelay(Some(true)),
                    stopped(stop.clone()),
                )),
                // The handshakes complete in `tls::accept` (which also sets
                // no Nagle).
                Some(acceptor) => tokio::spawn($router.serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(crate::tls::accept($listener, acceptor.clone())),
                    stopped(stop.clone()),
                )),
            }
        };
    }
    let grpc = spawn_router!(client, listeners.grpc);
    let peer = spawn_router!(peer, listeners.peer);
    let http = tokio::spawn(crate::http::serve(listeners.admin, node.clone(), stopped(stop.clone())));
    Ok(Servers { grpc, peer, http, health })
}

/// Step 6: the node's background tasks; they stop when `stop` turns true
/// (the batcher when its queue closes or it is aborted).
fn spawn_tasks(
    node: &Arc<Node>,
    config: &NodeConfig,
    storage: storage::Disk,
    proposals: tokio::sync::mpsc::Receiver<crate::node::Proposal>,
    health: tonic_health::server::HealthReporter,
    stop: &watch::Receiver<bool>,
) -> Tasks {
    let batcher = node.spawn_batcher(proposals);
    let mut background = crate::replication::spawn_shippers(node.clone(), stop.clone());
    background.push(crate::replication::spawn_resync(node.clone(), stop.clone()));
    background.push(crate::replication::spawn_setup(node.clone(), stop.clone()));
    background.push(spawn_gauges(node.clone(), storage, stop.clone()));
    background.push(spawn_health(node.clone(), health, stop.clone()));
    background.push(node.spawn_clock_watch(stop.clone()));
    background.push(node.spawn_snapshot_schedule(config.raft.snapshot_logs_since_last, stop.clone()));
    if let Some(authority) = node.authority() {
        background.push(crate::lease::spawn_keeper(node.clone(), authority.clone(), node.lease(), stop.clone()));
    }
    background.extend(crate::backup::schedule::spawn(node.clone(), config.backup.clone(), stop.clone()));
    background.push(crate::backup::archive::spawn(node.clone(), config.backup.clone(), stop.clone()));
    background.extend(crate::replication::spawn_rpo_guard(node.clone(), config.replication.max_rpo, stop.clone()));
    Tasks { batcher, background }
}

/// The tasks of step 6.
struct Tasks {
    batcher: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

/// Step 7: writes [`ADDRS_FILE`] (atomically, by rename) and returns its path.
fn write_addrs(config: &NodeConfig, node: &Node) -> anyhow::Result<PathBuf> {
    let info = node.info();
    let addrs = Addrs {
        id: config.id,
        grpc_addr: info.grpc_addr.clone(),
        peer_addr: info.peer_addr.clone(),
        admin_addr: info.admin_addr.clone(),
        pid: std::process::id(),
    };
    let path = config.data_dir.join(ADDRS_FILE);
    write_atomically(&path, &serde_json::to_vec_pretty(&addrs)?)?;
    tracing::info!(grpc = %info.grpc_addr, peer = %info.peer_addr, admin = %info.admin_addr, "node serving");
    Ok(path)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Step 8: waits for `shutdown`, Raft stopping, or a fatal error. `None`
/// is a requested stop; `Some` names the failure.
async fn wait_for_stop(
    raft: &Raft,
    mut fatal: watch::Receiver<Option<String>>,
    shutdown: impl Future<Output = ()>,
) -> Option<String> {
    // The server metrics change only on elections and membership changes
    // (the full metrics with every acknowledgement, waking this task each
    // time); both senders go when Raft's core stops, the full metrics last
    // saying why.
    let metrics = raft.metrics();
    let mut server = raft.server_metrics();
    let raft_failed = async move {
        while server.changed().await.is_ok() {}
        match &metrics.borrow().running_state {
            Err(f) => format!("raft stopped: {f}"),
            Ok(()) => "raft stopped".to_string(),
        }
    };
    let corrupt = async move {
        match fatal.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone().unwrap_or_default(),
            Err(_) => "fatal channel closed".to_string(),
        }
    };
    let failure = tokio::select! {
        _ = shutdown => None,
        reason = raft_failed => Some(reason),
        reason = corrupt => Some(reason),
    };
    match &failure {
        None => tracing::info!("shutting down: no new requests, finishing in-flight ones"),
        Some(reason) => tracing::error!(%reason, "stopping after a fatal error"),
    }
    failure
}

/// Step 9: stops the servers and tasks, waits up to `SHUTDOWN_GRACE` for
/// in-flight requests, then stops Raft.
///
/// A leader hands off as early as openraft 0.9 lets it: it stops sending
/// heartbeats (and this node stops standing for election) before the drain,
/// so the followers' leader lease runs out while in-flight requests finish,
/// and a new leader is elected as soon after a SIGTERM as after a crash.
/// Earlier is not possible: openraft 0.9 has no leadership transfer, and a
/// follower refuses every vote until the lease from the last heartbeat it
/// heard has passed.
async fn drain(stop: watch::Sender<bool>, servers: Servers, tasks: Tasks, node: &Node, raft: &Raft) {
    // Ignored: the receivers only disappear once everything has stopped.
    let _ = stop.send(true);
    // After `stop`, which the clock watch (it also switches these) obeys
    // at its next step: should it switch them back once in between, the
    // hand-off only waits for the drain, as it always did.
    node.set_campaigning(false);
    tasks.batcher.abort();
    let wait = async {
        let _ = servers.grpc.await;
        let _ = servers.peer.await;
        let _ = servers.http.await;
        for t in tasks.background {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish within the grace period");
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft did not shut down cleanly");
    }
}

/// Refreshes the gauges every `GAUGE_INTERVAL` until `stop`.
fn spawn_gauges(node: Arc<Node>, storage: storage::Disk, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_leader = None;
        let mut watch = Watch::default();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
            }
            node.metrics_upkeep();
            let m = node.raft_metrics();
            if m.current_leader != last_leader {
                if m.current_leader.is_some() {
                    crate::telemetry::leader_changed();
                }
                record_leader(&node, last_leader, m.current_leader, m.current_term);
                last_leader = m.current_leader;
            }
            watch.region(&node);
            crate::telemetry::raft_gauges(&crate::telemetry::RaftGauges {
                has_leader: m.current_leader.is_some(),
                is_leader: m.current_leader == Some(node.id()),
                role: crate::types::role_name(&m.state),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                commit_index: node.commit_index(),
            });
            if let Ok(bytes) = storage.size_on_disk() {
                crate::telemetry::storage_bytes(bytes);
            }
            let mut lag_ms = std::collections::BTreeMap::new();
            if node.check_leader().is_ok()
                && let Ok(lags) = node.replication_lag()
            {
                for lag in lags {
                    crate::telemetry::replication_lag(node.region(), &lag.region, lag.lag_entries, lag.lag_ms);
                    lag_ms.insert(lag.region, lag.lag_ms);
                }
            }
            watch.sample(&node, m.current_leader, m.current_term, lag_ms);
        }
    })
}

/// Records a change of the leader this node knows: the node elected records
/// its election, a node left without one records the loss.
fn record_leader(node: &Node, was: Option<u64>, now: Option<u64>, term: u64) {
    let region = node.region();
    match (was, now) {
        (_, Some(l)) if l == node.id() => {
            node.history().record("leader", format!("node {l} elected leader of {region} at term {term}"))
        }
        (Some(old), None) => {
            node.history().record("no-leader", format!("node {} lost its leader (node {old})", node.id()))
        }
        _ => {}
    }
}

/// What the gauge loop remembers between rounds for the events and samples.
#[derive(Default)]
struct Watch {
    /// The region's (primary, epoch, fenced, divergent total) last seen.
    region: Option<(String, u64, bool, u64)>,
    /// When the last sample was taken, and the writes counted then.
    sampled: Option<(std::time::Instant, u64)>,
}

impl Watch {
    /// Records the region's promotions, demotions, fences and divergent
    /// writes (active-passive) as this node applies them after its start;
    /// the same message from each node of the region merges into one event.
    fn region(&mut self, node: &Node) {
        let (primary, epoch, fenced_until, divergent) = node.reader().role_summary();
        if primary.is_empty() {
            return;
        }
        // A fence ends by time; its field keeps the time.
        let fenced = fenced_until > crate::events::now_ms();
        let now = (primary.clone(), epoch, fenced, divergent);
        let region = node.region();
        let history = node.history();
        match &self.region {
            Some(was) if *was == now => return,
            Some((was_primary, was_epoch, was_fenced, was_divergent)) => {
                if (was_primary, was_epoch) != (&primary, &epoch) {
                    history.record("region", role_message(region, &primary, epoch));
                }
                if *was_fenced != now.2 {
                    let what = if now.2 { "fenced: refuses local writes" } else { "unfenced" };
                    history.record("region", format!("region {region} {what}"));
                }
                if divergent > *was_divergent {
                    history.record(
                        "divergent",
                        format!(
                            "region {region} recorded {} divergent writes (acknowledged, not shipped before its demotion)",
                            divergent - was_divergent
                        ),
                    );
                }
            }
            // What the node finds at start is no event: it may be a promotion
            // of long ago.
            None => {}
        }
        self.region = Some(now);
    }

    /// Takes a sample every `events::SAMPLE_EVERY`.
    fn sample(&mut self, node: &Node, leader: Option<u64>, term: u64, lag_ms: std::collections::BTreeMap<String, u64>) {
        let writes = node.history().writes();
        let now = std::time::Instant::now();
        let writes_per_s = match self.sampled {
            Some((at, _)) if now.duration_since(at) < crate::events::SAMPLE_EVERY => return,
            Some((at, before)) => writes.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64(),
            None => 0.0,
        };
        self.sampled = Some((now, writes));
        let at_ms = crate::events::now_ms();
        node.history().sample(crate::events::Sample { at_ms, writes_per_s, leader, term, lag_ms });
    }
}

/// A region's role, as an event says it.
fn role_message(region: &str, primary: &str, epoch: u64) -> String {
    if primary == region {
        format!("region {region} is the primary at epoch {epoch}")
    } else {
        format!("region {region} is a secondary (primary {primary}, epoch {epoch})")
    }
}

/// Keeps the gRPC health status of the client API in step with readiness:
/// re-checked on every change of role, leader or membership, and at least
/// every `HEALTH_RECHECK`. Not on every change of the full Raft metrics:
/// those change with every replication acknowledgement, and a leader's
/// readiness check is itself a quorum round, whose acknowledgements changed
/// the metrics again: the leader checked its readiness in a loop, sending
/// heartbeats nonstop (about 40% of a core on an idle leader).
fn spawn_health(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut metrics = node.raft_server_watch();
        loop {
            let ready = node.readiness().await.0;
            let status =
                if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            health.set_service_status(KV_HEALTH_SERVICE, status).await;
            tokio::select! {
                _ = stop.changed() => return,
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(HEALTH_RECHECK) => {}
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        // Without signal handlers the node still stops on Ctrl-C via tokio.
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
