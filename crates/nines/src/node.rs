//! A node: opens storage, starts Raft, serves gRPC and HTTP, and stops
//! cleanly.
//!
//! Startup never bootstraps a cluster by itself: a fresh cluster is
//! initialised exactly once through the admin `Init` call, so a node that
//! restarts (or restarts with a wiped disk) can never found a second cluster.
//!
//! Shutdown (SIGTERM or Ctrl-C): stop accepting requests, let in-flight ones
//! finish for up to `SHUTDOWN_GRACE`, stop Raft, flush storage.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nines_proto::v1::admin_server::AdminServer;
use nines_proto::v1::kv_server::KvServer;
use nines_proto::v1::raft_server::RaftServer;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::config::{LatencyConfig, Mode, NodeConfig, RegionConfig};
use crate::error::Error;
use crate::faults::Faults;
use crate::hlc::HlcClock;
use crate::limits::{
    CHANGEFEED_BACKLOG_MAX, PROPOSAL_QUEUE_MAX, PROPOSALS_IN_FLIGHT_MAX, RAFT_MESSAGE_BYTES_MAX, REQUEST_BYTES_MAX,
    RESPONSE_BYTES_MAX, WRITES_PER_ENTRY_MAX,
};
use crate::network::{Channels, NetworkFactory};
use crate::server::admin::AdminService;
use crate::server::kv::KvService;
use crate::server::raft::RaftService;
use crate::server::region::RegionAdminService;
use crate::server::replication::ReplicationService;
use crate::storage::{self, ReplicationSetup, StateReader};
use crate::types::{Command, CommandResult, NodeId, NodeInfo, Raft};
use nines_proto::v1::region_admin_server::RegionAdminServer;
use nines_proto::v1::replication_server::ReplicationServer;

/// How long in-flight requests may run after shutdown begins. Longer than
/// the default write timeout would let one stuck write hold up a restart;
/// shorter than a container runtime's usual 10 s grace before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The file a node writes into its data directory once it serves, naming
/// the addresses it bound (useful with port 0) and its PID.
pub const ADDRS_FILE: &str = "addrs.json";

/// The contents of [`ADDRS_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Addrs {
    pub id: NodeId,
    pub grpc_addr: String,
    pub admin_addr: String,
    pub pid: u32,
}

/// What every service of a node shares.
pub struct Shared {
    pub id: NodeId,
    /// This node as it appears in the membership.
    pub info: NodeInfo,
    pub raft: Raft,
    pub reader: StateReader,
    pub clock: Arc<HlcClock>,
    pub channels: Channels,
    pub write_timeout: Duration,
    /// Set when this replica can no longer be trusted (a corrupt record was
    /// read); the node then stops with an error.
    pub fatal: tokio::sync::watch::Sender<Option<String>>,
    pub mode: Mode,
    /// The other regions, which this region ships to and receives from.
    pub peers: Vec<RegionConfig>,
    /// Every region, this one included.
    pub all_regions: Vec<RegionConfig>,
    pub latency: LatencyConfig,
    pub faults: Arc<Faults>,
    pub stats: crate::replication::Stats,
    /// Renders `/metrics`; `None` when another recorder owns the process.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Client writes on their way to the batcher (see [`spawn_batcher`]).
    pub proposals: tokio::sync::mpsc::Sender<Proposal>,
}

/// A client write waiting to be proposed, and where its result goes.
pub type Proposal = (Command, tokio::sync::oneshot::Sender<Result<CommandResult, Error>>);

impl Shared {
    /// Stops the node: its data is corrupt and it must not serve.
    pub fn stop_fatally(&self, reason: String) {
        tracing::error!(%reason, "stopping: this replica can no longer be trusted");
        self.fatal.send_replace(Some(reason));
    }

    pub(crate) fn not_leader(f: ForwardToLeader<NodeId, NodeInfo>) -> Error {
        Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.grpc_addr) }
    }

    /// This node's leadership as far as its metrics know: `Ok` if it leads,
    /// else `NotLeader` with the leader it knows of. Nothing was proposed,
    /// so the error is safe to retry anywhere.
    pub fn check_leader(&self) -> Result<(), Error> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.id) && m.state == openraft::ServerState::Leader {
            return Ok(());
        }
        let leader_addr =
            m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.grpc_addr.clone()));
        Err(Error::NotLeader { leader_id: m.current_leader, leader_addr })
    }

    /// Proposes a command on this node (which must lead) and waits until it
    /// is applied here.
    ///
    /// Only a failed leadership check before proposing is retry-safe. Once
    /// `client_write` has been called, even openraft's `ForwardToLeader` is
    /// not: it is also the answer when the entry was truncated from this
    /// node's log, and a copy of it may still be committed by a later leader.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, Error> {
        self.check_leader()?;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.write_timeout, self.raft.client_write(cmd)).await;
        crate::telemetry::proposal(started, matches!(outcome, Ok(Ok(_))));
        match outcome {
            Err(_) => Err(Error::Indeterminate(format!("not committed within {:?}", self.write_timeout))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(Error::Indeterminate(format!(
                "leadership moved to {:?} while the write was in flight",
                f.leader_id
            ))),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Error::Internal(format!("a data write failed as a membership change: {e}")))
            }
            Ok(Err(RaftError::Fatal(f))) => {
                Err(Error::Unavailable { reason: format!("raft stopped: {f}"), retry_safe: false })
            }
        }
    }

    /// Proposes a client write: refused up front when this region does not
    /// take writes or its changefeed backlog is full, and mapped to an error
    /// when the state machine refused it at apply time.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, Error> {
        self.check_leader()?;
        if let Some((reason, retry_later)) = self.reader.write_refusal() {
            return Err(refusal(reason, retry_later));
        }
        let backlog = self.reader.changefeed_len();
        if backlog >= CHANGEFEED_BACKLOG_MAX {
            tracing::warn!(backlog, "changefeed backlog full: refusing writes until peer regions catch up");
            return Err(Error::Unavailable {
                reason: format!(
                    "the changefeed holds {backlog} writes not yet applied by every peer region; \
                     limit CHANGEFEED_BACKLOG_MAX is {CHANGEFEED_BACKLOG_MAX}"
                ),
                retry_safe: true,
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = || Error::Unavailable { reason: "the node is stopping".into(), retry_safe: true };
        self.proposals.send((cmd, tx)).await.map_err(|_| stopped())?;
        match rx.await.map_err(|_| Error::Indeterminate("the node stopped during the write".into()))?? {
            CommandResult::Rejected { reason, retry_later } => Err(refusal(reason, retry_later)),
            other => Ok(other),
        }
    }

    /// The regions to show in a cluster view: every configured region, or
    /// this one alone (its members' endpoints) when none are configured.
    pub fn regions_for_view(&self) -> Vec<nines_client::RegionInfo> {
        if self.all_regions.is_empty() {
            let m = self.raft.metrics().borrow().clone();
            let endpoints = m.membership_config.membership().nodes().map(|(_, n)| n.grpc_addr.clone()).collect();
            return vec![nines_client::RegionInfo { name: self.info.region.clone(), endpoints }];
        }
        self.all_regions
            .iter()
            .map(|r| nines_client::RegionInfo { name: r.name.clone(), endpoints: r.endpoints.clone() })
            .collect()
    }

    /// This region's role: "active" (active-active), or "primary",
    /// "fenced" or "secondary" (active-passive).
    pub fn region_role(&self) -> &'static str {
        match self.mode {
            Mode::ActiveActive => "active",
            Mode::ActivePassive if self.reader.primary() != self.info.region => "secondary",
            Mode::ActivePassive if self.reader.region_state().fenced => "fenced",
            Mode::ActivePassive => "primary",
        }
    }

    /// Per peer region: what it has not applied of this region's changefeed.
    /// Exact on the leader (which hears the peers' acknowledgements).
    pub fn replication_lag(&self) -> Result<Vec<nines_proto::v1::PeerLag>, Error> {
        use crate::hlc::PhysicalClock;
        let region = self.reader.region_state();
        let now_ms = crate::hlc::WallClock.now_ms();
        let mut peers = Vec::new();
        for p in &self.peers {
            let replicated = region.acked.get(&p.name).copied().unwrap_or(0);
            let acked = self.stats.acked(&p.name).unwrap_or(replicated).max(replicated);
            let (lag_entries, first) = self.reader.changefeed_lag(acked).map_err(Error::from)?;
            let lag_ms = first.map(|h| now_ms.saturating_sub(h.physical_ms)).unwrap_or(0);
            peers.push(nines_proto::v1::PeerLag { region: p.name.clone(), acked_index: acked, lag_entries, lag_ms });
        }
        Ok(peers)
    }

    /// Confirms leadership with a quorum and waits until the state machine
    /// has applied everything committed before the read began (ReadIndex).
    pub async fn ensure_linearizable(&self) -> Result<(), Error> {
        if self.faults.serves_reads_locally() && self.check_leader().is_ok() {
            // The planted bug: a leader cut off from its quorum still
            // believes it leads, so this read may be stale.
            return Ok(());
        }
        let outcome = tokio::time::timeout(self.write_timeout, self.raft.ensure_linearizable()).await;
        match outcome {
            Err(_) => Err(Error::Unavailable {
                reason: format!("leadership not confirmed within {:?}", self.write_timeout),
                retry_safe: true,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(Self::not_leader(f)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(Error::Unavailable { reason: e.to_string(), retry_safe: true })
            }
            Ok(Err(RaftError::Fatal(f))) => {
                Err(Error::Unavailable { reason: format!("raft stopped: {f}"), retry_safe: true })
            }
        }
    }
}

/// Packs concurrent client writes into one log entry each time a proposal
/// slot is free (see `PROPOSALS_IN_FLIGHT_MAX`): under load many writes
/// share one append, flush, replication round and apply; a lone write is
/// proposed at once, alone.
pub fn spawn_batcher(
    shared: Arc<Shared>,
    mut queue: tokio::sync::mpsc::Receiver<Proposal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut batch = Vec::new();
            if queue.recv_many(&mut batch, WRITES_PER_ENTRY_MAX as usize).await == 0 {
                return;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let (mut cmds, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
                let results: Vec<Result<CommandResult, Error>> = if cmds.len() == 1 {
                    vec![shared.propose(cmds.remove(0)).await]
                } else {
                    let n = cmds.len();
                    match shared.propose(Command::Batch(cmds)).await {
                        Ok(CommandResult::Batch(rs)) if rs.len() == n => rs.into_iter().map(Ok).collect(),
                        Ok(other) => {
                            let e = Error::Internal(format!("a batch of {n} writes applied as {other:?}"));
                            vec![Err(e); n]
                        }
                        Err(e) => vec![Err(e); n],
                    }
                };
                for (waiter, result) in waiters.into_iter().zip(results) {
                    // Ignored: the caller may have given up (its request was cancelled).
                    let _ = waiter.send(result);
                }
            });
        }
    })
}

/// A write the region's role refuses; it had no effect.
fn refusal(reason: String, retry_later: bool) -> Error {
    if retry_later { Error::Unavailable { reason, retry_safe: true } } else { Error::FailedPrecondition(reason) }
}

/// Loads a node's configuration from a file (or defaults) with overrides.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<NodeConfig> {
    Ok(match path {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    })
}

/// Runs a node until `shutdown` completes.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let raft_config = Arc::new(config.openraft()?);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let faults = Arc::new(Faults::new(config.fault_injection, config.planted_bug_local_reads));
    if config.fault_injection {
        tracing::warn!("fault injection is enabled: this node is for tests only");
    }
    let clock = Arc::new(HlcClock::new(Box::new(faults.clock()), config.clock_offset_max.as_millis() as u64));
    let peers = config.peer_regions();
    let setup = ReplicationSetup {
        region: config.region.clone(),
        peers: peers.iter().map(|p| p.name.clone()).collect(),
        mode: config.cluster.mode,
        initial_primary: config.cluster.primary.clone(),
    };
    let (db, log_store, state_machine) = storage::open(&config.data_dir, setup, clock.clone())
        .with_context(|| format!("opening storage in {}", config.data_dir.display()))?;
    let reader = state_machine.reader();

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding grpc_listen {}", config.grpc_listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin_listen {}", config.admin_listen))?;
    let grpc_addr: SocketAddr = grpc_listener.local_addr()?;
    let admin_addr: SocketAddr = admin_listener.local_addr()?;
    let advertise = |configured: &str, bound: SocketAddr| {
        if configured.is_empty() { format!("http://{bound}") } else { configured.to_string() }
    };
    let info = NodeInfo {
        grpc_addr: advertise(&config.grpc_advertise, grpc_addr),
        admin_addr: advertise(&config.admin_advertise, admin_addr),
        region: config.region.clone(),
        az: config.az.clone(),
    };

    let channels = Channels::default();
    let network =
        NetworkFactory::new(config.id, channels.clone(), info.clone(), config.latency.clone(), faults.clone());
    let raft = Raft::new(config.id, raft_config, network, log_store, state_machine).await.context("starting raft")?;
    let (fatal, mut fatal_rx) = tokio::sync::watch::channel(None);
    let (proposals, proposal_queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE_MAX);
    let shared = Arc::new(Shared {
        id: config.id,
        info: info.clone(),
        raft: raft.clone(),
        reader,
        clock,
        channels,
        write_timeout: config.write_timeout,
        fatal,
        mode: config.cluster.mode,
        peers,
        all_regions: config.cluster.regions.clone(),
        latency: config.latency.clone(),
        faults,
        stats: Default::default(),
        metrics: match crate::telemetry::install() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                None
            }
        },
        proposals,
    });
    let batcher = spawn_batcher(shared.clone(), proposal_queue);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|s| *s).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nines_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            KvServer::new(KvService::new(shared.clone()))
                .max_decoding_message_size(REQUEST_BYTES_MAX)
                .max_encoding_message_size(RESPONSE_BYTES_MAX),
        )
        .add_service(AdminServer::new(AdminService::new(shared.clone())))
        .add_service(RegionAdminServer::new(RegionAdminService::new(shared.clone())))
        .add_service(
            ReplicationServer::new(ReplicationService::new(shared.clone()))
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
        )
        .add_service(
            RaftServer::new(RaftService::new(raft.clone()))
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(
            // No Nagle on accepted connections: with delayed ACKs it holds
            // small replies back by up to 40 ms.
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let grpc_task = tokio::spawn(grpc);
    let http_task = tokio::spawn(crate::http::serve(admin_listener, shared.clone(), stopped(stop_rx.clone())));
    let mut shippers = crate::replication::spawn_shippers(shared.clone(), stop_rx.clone());
    shippers.push(crate::replication::spawn_resync(shared.clone(), stop_rx.clone()));
    shippers.push(crate::telemetry::spawn_gauges(shared.clone(), db.clone(), stop_rx.clone()));
    shippers.push(spawn_health(shared.clone(), health, stop_rx.clone()));

    let addrs = Addrs {
        id: config.id,
        grpc_addr: info.grpc_addr.clone(),
        admin_addr: info.admin_addr.clone(),
        pid: std::process::id(),
    };
    let addrs_path = config.data_dir.join(ADDRS_FILE);
    let tmp = config.data_dir.join(format!("{ADDRS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&addrs)?)?;
    std::fs::rename(&tmp, &addrs_path)?;
    tracing::info!(grpc = %info.grpc_addr, admin = %info.admin_addr, "node serving");

    let mut metrics = raft.metrics();
    let raft_failed = async move {
        loop {
            if let Err(f) = &metrics.borrow_and_update().running_state {
                return format!("raft stopped: {f}");
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    };
    let corrupt = async move {
        match fatal_rx.wait_for(|f| f.is_some()).await {
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
    // Ignored: the receivers only disappear once both servers have stopped.
    let _ = stop_tx.send(true);
    let drain = async {
        let _ = grpc_task.await;
        let _ = http_task.await;
        for s in shippers {
            let _ = s.await;
        }
    };
    batcher.abort();
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish within the grace period");
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft did not shut down cleanly");
    }
    let _ = std::fs::remove_file(&addrs_path);
    match failure {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(reason) => Err(anyhow::anyhow!("node stopped: {reason}")),
    }
}

/// The gRPC health service's name for the client API; its status follows
/// readiness (a known leader), while the overall status ("") follows
/// liveness.
pub const KV_HEALTH_SERVICE: &str = "nines.v1.Kv";

/// Keeps the gRPC health status of the client API in step with readiness.
fn spawn_health(
    shared: Arc<Shared>,
    health: tonic_health::server::HealthReporter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut metrics = shared.raft.metrics();
        loop {
            let ready = crate::http::readiness(&shared).await.0;
            let status =
                if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            health.set_service_status(KV_HEALTH_SERVICE, status).await;
            // Re-checked on every Raft change, and at least every second: a
            // leader that lost its quorum changes nothing Raft would report.
            tokio::select! {
                _ = stop.changed() => return,
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
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
