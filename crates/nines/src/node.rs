//! The node handle: what every service of a node holds, and the only way
//! they reach Raft and the state machine.
//!
//! A [`Node`] is built once by [`crate::daemon`] and shared (`Arc<Node>`)
//! with the gRPC services, the admin HTTP port and the replication tasks.
//! Its fields are private: a service writes through [`Node::write`] (client
//! writes, batched) or [`Node::propose`] (internal commands), reads through
//! [`Node::reader`] after [`Node::ensure_linearizable`] when it must, and
//! changes membership through the methods here. Nothing reaches
//! `Raft::client_write` any other way.
//!
//! Invariants:
//! - A write is refused before it is proposed (retry-safe) when this node
//!   does not lead, its region does not take writes, or the changefeed
//!   backlog is full; once proposed, every failure is "outcome unknown"
//!   except a definite refusal from the state machine.
//! - Concurrent client writes share log entries (the batcher), never more
//!   than `WRITES_PER_ENTRY_MAX` writes or `ENTRY_BYTES_MAX` bytes per entry
//!   (a single maximal write always fits), with at most
//!   `PROPOSALS_IN_FLIGHT_MAX` entries proposed at once.
//!
//! Caveats:
//! - Leadership checks read openraft's metrics: a leader cut off from its
//!   quorum still passes [`Node::check_leader`] until it steps down. Writes
//!   are safe anyway (they need a quorum); reads that must be current use
//!   [`Node::ensure_linearizable`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::authority::{Authority, PrimaryLease};
use crate::config::{LatencyConfig, Mode, RegionConfig};
use crate::error::Error;
use crate::faults::Faults;
use crate::hlc::{Hlc, HlcClock};

use crate::limits::{
    CHANGEFEED_BACKLOG_MAX, ENTRY_BYTES_MAX, PROPOSAL_QUEUE_MAX, PROPOSALS_IN_FLIGHT_MAX, WRITES_PER_ENTRY_MAX,
};
use crate::network::Channels;
use crate::stance::{LeaderContact, Stance, StanceInputs, next_stance};
use crate::storage::StateReader;
use crate::takeover;
use crate::types::{Command, CommandResult, NodeId, NodeInfo, PeerLag, Raft, ReplicationSetup};

/// A client write waiting to be proposed, and where its result goes.
pub type Proposal = (Command, oneshot::Sender<Result<CommandResult, Error>>);

/// Entries a node may have in its log beyond what it applied and still be
/// ready: a replica further behind serves local reads that are too stale.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// How long a leader may take to confirm its leadership with a quorum for
/// the readiness check. A leader cut off from its majority still believes
/// it leads until it hears otherwise; asking the quorum is the only way to
/// know.
pub const READY_QUORUM_TIMEOUT: Duration = Duration::from_secs(1);

/// How recently a leader must have been heard from (an append-entries
/// message, heartbeats included) to count as alive: a few heartbeats.
const LEADER_HEARD_MAX: Duration = Duration::from_secs(1);

/// The longest a client call waits on a follower for a new leader (see
/// [`Node::await_leader`]): below the attempt timeouts of the clients in this
/// repository (1.5 s in the fault-injection harness, 2 s in `nines-client`),
/// so a held call is answered, forwarded or refused before they give up.
const LEADER_WAIT_MAX: Duration = Duration::from_secs(1);

/// How often the clock watch compares the hybrid clock with the physical
/// one: a node that must step down does so before a follower would start an
/// election (at least 280 ms of silence with the default timings).
const CLOCK_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How often the snapshot schedule looks at the applied index: snapshots
/// come thousands of entries apart, so a look costs nothing and a late one
/// little.
const SNAPSHOT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How long the snapshot schedule waits for a build it asked for before it
/// may ask again (openraft ignores an ask while it builds): far longer than
/// a build of gigabytes takes (about 7 s for 2 GB on the test machine).
const SNAPSHOT_BUILD_MAX: Duration = Duration::from_secs(120);

/// How long a membership change may take, including a new learner catching
/// up. A learner that needs longer is still being added; the caller is told
/// the outcome is unknown rather than waiting without bound.
pub const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The regions of the cluster as this node's configuration names them.
#[derive(Debug, Clone, Default)]
pub struct Regions {
    pub mode: Mode,
    /// The other regions, which this region ships to and receives from.
    pub peers: Vec<RegionConfig>,
    /// Every region, this one included; empty for a single-region cluster.
    pub all: Vec<RegionConfig>,
    /// The replication setup this node's file describes: what it proposes
    /// if it is the region's first leader.
    pub setup: ReplicationSetup,
    /// The authority's endpoints (empty: none), as configured.
    pub authority: Vec<String>,
    /// How long the primary's lease holds after a renewal.
    pub lease: Duration,
}

/// Everything a [`Node`] is made of; the daemon builds it.
pub struct Parts {
    pub id: NodeId,
    /// This node as it appears in the membership.
    pub info: NodeInfo,
    pub raft: Raft,
    pub reader: StateReader,
    pub clock: Arc<HlcClock>,
    pub channels: Channels,
    pub write_timeout: Duration,
    pub regions: Regions,
    pub latency: LatencyConfig,
    pub faults: Arc<Faults>,
    /// Renders `/metrics`; `None` when another recorder owns the process.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// When a leader's append-entries message last reached this node.
    pub contact: Arc<LeaderContact>,
    /// The authority, when the cluster has one (active-passive).
    pub authority: Option<Authority>,
    /// The last log index this node's log held when it started.
    pub log_index_at_start: u64,
    /// What happened, as this node saw it (see [`crate::events`]).
    pub history: Arc<crate::events::History>,
}

/// Why `Init` is refused on a node that has a log already.
pub const ALREADY_INITIALIZED: &str = "this node is already initialized: a cluster is bootstrapped exactly once";

/// What every service of a node shares. See the module doc.
pub struct Node {
    id: NodeId,
    info: NodeInfo,
    raft: Raft,
    reader: StateReader,
    clock: Arc<HlcClock>,
    channels: Channels,
    write_timeout: Duration,
    regions: Regions,
    latency: LatencyConfig,
    faults: Arc<Faults>,
    stats: Stats,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Set when this replica can no longer be trusted (a corrupt record was
    /// read); the daemon then stops the node with an error.
    fatal: watch::Sender<Option<String>>,
    /// Client writes on their way to the batcher (see [`Node::spawn_batcher`]).
    proposals: mpsc::Sender<Proposal>,
    /// When a leader's append-entries message last reached this node.
    contact: Arc<LeaderContact>,
    /// The authority, when the cluster has one: then the primary writes only
    /// under `primary_lease`.
    authority: Option<Authority>,
    /// The primary's lease while this node leads the primary region (see
    /// [`crate::lease`]).
    primary_lease: Arc<PrimaryLease>,
    /// The last log index this node's log held when it started: a
    /// linearizable read waits until this node has applied it (see
    /// [`Node::ensure_linearizable`]).
    log_index_at_start: u64,
    /// Set while this node steps down because its clock runs too far ahead
    /// ([`Stance::SteppingDown`]): it proposes nothing, sends no heartbeats
    /// and stands for no election, so a node with a sane clock takes over.
    stepping_down: AtomicBool,
    /// Whether this node sends heartbeats and stands for elections, by its
    /// timer or by a take-over (see [`Node::set_campaigning`]).
    campaigning: AtomicBool,
    /// Leadership confirmations shared by the linearizable reads waiting.
    read_rounds: crate::reads::ReadRounds,
    /// What happened, as this node saw it.
    history: Arc<crate::events::History>,
    /// Held by the membership change under way (see
    /// [`Node::membership_turn`]).
    membership_changes: tokio::sync::Mutex<()>,
}

/// The receiving ends the daemon keeps: the proposal queue (for the
/// batcher) and the fatal-error signal (to stop the node).
pub struct Receivers {
    pub proposals: mpsc::Receiver<Proposal>,
    pub fatal: watch::Receiver<Option<String>>,
}

impl Node {
    pub fn new(parts: Parts) -> (Arc<Node>, Receivers) {
        let (fatal, fatal_rx) = watch::channel(None);
        let (proposals, proposals_rx) = mpsc::channel(PROPOSAL_QUEUE_MAX);
        let node = Node {
            id: parts.id,
            info: parts.info,
            raft: parts.raft,
            reader: parts.reader,
            clock: parts.clock,
            channels: parts.channels,
            write_timeout: parts.write_timeout,
            regions: parts.regions,
            latency: parts.latency,
            faults: parts.faults,
            stats: Stats::default(),
            metrics: parts.metrics,
            fatal,
            proposals,
            stepping_down: AtomicBool::new(false),
            campaigning: AtomicBool::new(true),
            contact: parts.contact,
            authority: parts.authority,
            primary_lease: Arc::default(),
            log_index_at_start: parts.log_index_at_start,
            read_rounds: Default::default(),
            history: parts.history,
            membership_changes: tokio::sync::Mutex::new(()),
        };
        (Arc::new(node), Receivers { proposals: proposals_rx, fatal: fatal_rx })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node as it appears in the membership.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn region(&self) -> &str {
        &self.info.region
    }

    /// The state machine, for reads.
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// The channel cache shared with the Raft transport (forwarding uses it).
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn clock(&self) -> &HlcClock {
        &self.clock
    }

    /// The largest clock offset between nodes this cluster tolerates.
    pub fn clock_offset_max(&self) -> Duration {
        Duration::from_millis(self.clock.offset_ms_max())
    }

    /// A fresh timestamp for a write this node is about to propose; refused
    /// (retry-safe: nothing was proposed) while this node's hybrid clock runs
    /// too far ahead of its physical clock.
    pub fn now(&self) -> Result<Hlc, Error> {
        self.clock.now().map_err(|e| Error::Unavailable { reason: e.to_string(), retry_safe: true })
    }

    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    pub fn mode(&self) -> Mode {
        self.regions.mode
    }

    /// The other regions, which this region ships to and receives from.
    pub fn peers(&self) -> &[RegionConfig] {
        &self.regions.peers
    }

    /// Every configured region, this one included.
    pub fn all_regions(&self) -> &[RegionConfig] {
        &self.regions.all
    }

    /// The authority's endpoints as configured (empty: none).
    pub fn authority_endpoints(&self) -> &[String] {
        &self.regions.authority
    }

    /// How long the primary's lease holds after a renewal.
    pub fn lease(&self) -> Duration {
        self.regions.lease
    }

    /// The replication setup this node's file describes.
    pub fn file_setup(&self) -> &ReplicationSetup {
        &self.regions.setup
    }

    pub fn latency(&self) -> &LatencyConfig {
        &self.latency
    }

    /// The authority, when the cluster has one.
    pub fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    /// The primary's lease as this node holds it.
    pub fn primary_lease(&self) -> &PrimaryLease {
        &self.primary_lease
    }

    /// The epoch whose lease a write of this node needs, when it needs one:
    /// in an active-passive cluster with an authority, on the primary.
    fn lease_epoch(&self) -> Option<u64> {
        let needed = self.authority.is_some()
            && self.regions.mode == Mode::ActivePassive
            && self.reader.primary() == self.info.region;
        needed.then(|| self.reader.region_state().epoch)
    }

    /// When a leader's append-entries message last reached this node.
    pub fn contact(&self) -> Arc<LeaderContact> {
        self.contact.clone()
    }

    /// What happened, as this node saw it.
    pub fn history(&self) -> &crate::events::History {
        &self.history
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Switches this node's heartbeats and its candidacies (openraft's
    /// timer and a take-over) on or off: off while it steps down for its
    /// clock and once it drains.
    pub fn set_campaigning(&self, on: bool) {
        self.campaigning.store(on, Ordering::Release);
        let runtime = self.raft.runtime_config();
        runtime.heartbeat(on);
        runtime.elect(on);
    }

    /// Answers a candidate's vote request. A refusal for an older log
    /// leaves without this node's longer log ([`takeover::refusal_to_send`]).
    /// When the candidate's term is also newer than this node's vote, this
    /// node heard no leader within the leader lease (and has run that
    /// long), follows or campaigns, and stands for elections, it takes
    /// over (see [`crate::takeover`]), in a task of its own.
    pub async fn vote(self: &Arc<Self>, req: VoteRequest<NodeId>) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        let resp = self.raft.vote(req.clone()).await?;
        if !takeover::refused_for_an_older_log(&req, &resp) {
            return Ok(resp);
        }
        let (voters, state) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.membership_config.membership().voter_ids().count(), m.state)
        };
        let config = self.raft.config();
        let lease = Duration::from_millis(config.election_timeout_max);
        let take_over = takeover::candidate_term_is_newer(&req, &resp)
            && matches!(state, ServerState::Follower | ServerState::Candidate)
            && self.contact.silent_for(lease)
            && self.campaigning.load(Ordering::Acquire);
        if take_over {
            let wait = takeover::spread(voters, Duration::from_millis(config.heartbeat_interval));
            let node = self.clone();
            let (candidate, candidate_last, ours) = (req.vote, req.last_log_id, resp.last_log_id);
            tokio::spawn(async move {
                let may_stand = || node.campaigning.load(Ordering::Acquire);
                match takeover::take_over(&node.raft, candidate, ours, wait, may_stand).await {
                    Ok(takeover::TakeOver::Standing) => node.history.record(
                        "takeover",
                        format!(
                            "node {}: candidate node {} at term {} holds an older log ({}, this node's {}): \
                             standing for election at term {}",
                            node.id,
                            candidate.leader_id().node_id,
                            candidate.leader_id().term,
                            takeover::position(candidate_last),
                            takeover::position(ours),
                            candidate.leader_id().term + 1,
                        ),
                    ),
                    Ok(takeover::TakeOver::Declined { reason }) => {
                        tracing::debug!(%candidate, "no take-over: {reason}")
                    }
                    Err(e) => tracing::warn!("taking over from candidate {candidate} failed: {e}"),
                }
            });
        }
        Ok(takeover::refusal_to_send(resp, &req))
    }

    /// A snapshot of openraft's metrics.
    pub fn raft_metrics(&self) -> RaftMetrics<NodeId, NodeInfo> {
        self.raft.metrics().borrow().clone()
    }

    /// Starts building a snapshot now, as the snapshot policy would.
    pub async fn trigger_snapshot(&self) -> Result<(), Error> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Unavailable { reason: format!("raft stopped: {e}"), retry_safe: true })
    }

    /// openraft's server metrics (vote, role, leader, membership) as they
    /// change. Unlike the full metrics, which change with every replication
    /// acknowledgement, these change only on an election or a membership
    /// change.
    pub fn raft_server_watch(&self) -> watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, NodeInfo>> {
        self.raft.server_metrics()
    }

    /// The Prometheus text of every metric of this process (empty when the
    /// recorder belongs to someone else).
    pub fn render_metrics(&self) -> String {
        self.metrics.as_ref().map(|h| h.render()).unwrap_or_default()
    }

    /// Drains histogram buffers; the exporter leaves this to its user.
    pub fn metrics_upkeep(&self) {
        if let Some(h) = &self.metrics {
            h.run_upkeep();
        }
    }

    /// Stops the node: its data is corrupt and it must not serve.
    pub fn stop_fatally(&self, reason: String) {
        tracing::error!(%reason, "stopping: this replica can no longer be trusted");
        self.fatal.send_replace(Some(reason));
    }

    fn not_leader(f: ForwardToLeader<NodeId, NodeInfo>) -> Error {
        Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.grpc_addr) }
    }

    /// This node's leadership as far as its metrics know: `Ok` if it leads,
    /// else `NotLeader` with the leader it knows of. Nothing was proposed,
    /// so the error is safe to retry anywhere.
    pub fn check_leader(&self) -> Result<(), Error> {
        // Borrowed, not cloned: this runs before every write.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader == Some(self.id) && m.state == openraft::ServerState::Leader {
            return Ok(());
        }
        let leader_addr =
            m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.grpc_addr.clone()));
        Err(Error::NotLeader { leader_id: m.current_leader, leader_addr })
    }

    /// Waits, about as long as an election takes at most, until the region
    /// has a leader other than `gone` (one found unreachable), and returns
    /// what the leadership check says then: `NotLeader` naming the leader to
    /// go to, or naming this node once it leads.
    pub async fn await_leader(&self, gone: Option<NodeId>) -> Error {
        // A dead leader is replaced after its lease and a random election
        // timeout, each at most election_timeout_max; a split vote costs one
        // more timeout. Capped well inside a client's attempt timeout.
        let bound =
            Duration::from_millis(self.raft.config().election_timeout_max.saturating_mul(3)).min(LEADER_WAIT_MAX);
        let id = self.id;
        let elected = |m: &RaftMetrics<NodeId, NodeInfo>| match m.current_leader {
            Some(l) if l == id => m.state == openraft::ServerState::Leader,
            Some(l) => Some(l) != gone,
            None => false,
        };
        let mut metrics = self.raft.metrics();
        // Whether one was elected in time or not, the check below says.
        let _ = tokio::time::timeout(bound, metrics.wait_for(elected)).await;
        match self.check_leader() {
            Ok(()) => Error::NotLeader { leader_id: Some(id), leader_addr: Some(self.info.grpc_addr.clone()) },
            Err(e) => e,
        }
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
        if self.stepping_down.load(Ordering::Acquire) {
            return Err(Error::Unavailable { reason: self.stepping_down_reason(), retry_safe: true });
        }
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
                Err(Error::Indeterminate(format!("a data write failed as a membership change: {e}")))
            }
            Ok(Err(RaftError::Fatal(f))) => {
                Err(Error::Unavailable { reason: format!("raft stopped: {f}"), retry_safe: false })
            }
        }
    }

    fn stepping_down_reason(&self) -> String {
        format!(
            "this leader is stepping down: its hybrid clock runs {} ms ahead of its physical clock",
            self.clock.ahead_ms()
        )
    }

    /// Proposes a client write, stamped by this leader's clock (`stamped`
    /// builds the command from the timestamp): refused up front when this
    /// node does not lead, its clock cannot stamp, its region does not take
    /// writes or its changefeed backlog is full; mapped to an error when the
    /// state machine refused it at apply time.
    pub async fn write(&self, stamped: impl FnOnce(Hlc) -> Command) -> Result<CommandResult, Error> {
        self.check_leader()?;
        if let Some((reason, retry_later)) = self.reader.write_refusal() {
            return Err(refusal(reason, retry_later));
        }
        if let Some(reason) = self.stats.rpo_refusal() {
            return Err(Error::Unavailable { reason, retry_safe: true });
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
        let lease_epoch = self.lease_epoch();
        if let Some(epoch) = lease_epoch
            && !self.primary_lease.holds(epoch)
        {
            return Err(Error::Unavailable {
                reason: format!(
                    "region {} is primary at epoch {epoch} but holds no lease from the authority (ran out {:?} \
                     ago, or not renewed since this node began leading): it takes no writes until it renews",
                    self.info.region,
                    self.primary_lease.expired_for()
                ),
                retry_safe: true,
            });
        }
        let cmd = stamped(self.now()?);
        let (tx, rx) = oneshot::channel();
        let stopped = || Error::Unavailable { reason: "the node is stopping".into(), retry_safe: true };
        self.proposals.send((cmd, tx)).await.map_err(|_| stopped())?;
        let result = match rx.await.map_err(|_| Error::Indeterminate("the node stopped during the write".into()))?? {
            CommandResult::Rejected { reason, retry_later } => return Err(refusal(reason, retry_later)),
            CommandResult::SessionExpired { seq } => {
                return Err(Error::SessionExpired(format!(
                    "write {seq} of this client session was sent before and its result is no longer kept \
                     (the session expired, or dropped it); it was not applied again"
                )));
            }
            other => other,
        };
        // A primary whose lease ran out while the write was in flight may
        // already have been replaced: the write is not acknowledged.
        if let Some(epoch) = lease_epoch
            && !self.primary_lease.holds(epoch)
        {
            return Err(Error::Indeterminate(format!(
                "the primary lease of region {} ran out before the write could be acknowledged",
                self.info.region
            )));
        }
        Ok(result)
    }

    /// Confirms leadership with a quorum and waits until the state machine
    /// has applied everything committed before the read began (ReadIndex).
    /// The reads waiting share one confirmation round ([`crate::reads`]).
    ///
    /// openraft 0.9 lets a node that led before a restart lead again at
    /// once, in the same term, without a new first entry; its ReadIndex is
    /// then the commit index it saved, which may lag what it committed and
    /// acknowledged before the restart (found by the power-cut nemesis: a
    /// restarted leader served a value two writes old; openraft issue #1511).
    /// Any entry of the log it started with may have been committed, so
    /// reads also wait until it has applied that log (as far as it still
    /// holds it). (A node that led when it stopped now starts with its vote
    /// uncommitted and campaigns instead, see `storage::log_store`, and a
    /// newly elected leader's ReadIndex covers its first entry of the term:
    /// the wait stays as a second line of defence.)
    pub async fn ensure_linearizable(&self) -> Result<(), Error> {
        if self.stepping_down.load(Ordering::Acquire) && self.check_leader().is_ok() {
            // Confirming leadership would send heartbeats and keep this node
            // in place; another node takes over shortly.
            return Err(Error::Unavailable { reason: self.stepping_down_reason(), retry_safe: true });
        }
        if self.faults.serves_reads_locally() && self.check_leader().is_ok() {
            // The planted bug: a leader cut off from its quorum still
            // believes it leads, so this read may be stale.
            return Ok(());
        }
        self.read_rounds.confirm(|| self.confirm_leadership()).await
    }

    /// One leadership confirmation round for the reads waiting (see
    /// [`crate::reads`]): a quorum round, then the wait until this node has
    /// applied what was committed when it began, and the log it started with.
    async fn confirm_leadership(&self) -> Result<(), Error> {
        // Checked again: a read may have waited out a round while this node
        // began stepping down.
        if self.stepping_down.load(Ordering::Acquire) && self.check_leader().is_ok() {
            return Err(Error::Unavailable { reason: self.stepping_down_reason(), retry_safe: true });
        }
        let outcome = tokio::time::timeout(self.write_timeout, async {
            let confirmed = self.raft.ensure_linearizable().await?;
            let m = self.raft_metrics();
            // Committed entries are never truncated: one committed before the
            // restart is still in the log, at or below both bounds.
            let target = self.log_index_at_start.min(m.last_log_index.unwrap_or(0));
            if m.last_applied.map_or(0, |l| l.index) < target {
                let waited = self.raft.wait(None).applied_index_at_least(Some(target), "the log at start").await;
                if let Err(e) = waited {
                    return Ok(Err(Error::Unavailable { reason: e.to_string(), retry_safe: true }));
                }
            }
            Ok(Ok(confirmed))
        })
        .await;
        match outcome {
            Err(_) => Err(Error::Unavailable {
                reason: format!("leadership not confirmed within {:?}", self.write_timeout),
                retry_safe: true,
            }),
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(Self::not_leader(f)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(Error::Unavailable { reason: e.to_string(), retry_safe: true })
            }
            Ok(Err(RaftError::Fatal(f))) => {
                Err(Error::Unavailable { reason: format!("raft stopped: {f}"), retry_safe: true })
            }
        }
    }

    /// The regions to show in a cluster view: every configured region, or
    /// this one alone (its members' endpoints) when none are configured.
    pub fn regions_for_view(&self) -> Vec<crate::rpc::RegionInfo> {
        if self.regions.all.is_empty() {
            let m = self.raft_metrics();
            let endpoints = m.membership_config.membership().nodes().map(|(_, n)| n.grpc_addr.clone()).collect();
            return vec![crate::rpc::RegionInfo { name: self.info.region.clone(), endpoints }];
        }
        self.regions
            .all
            .iter()
            .map(|r| crate::rpc::RegionInfo { name: r.name.clone(), endpoints: r.endpoints.clone() })
            .collect()
    }

    /// This region's role: "active" (active-active), or "primary",
    /// "fenced" or "secondary" (active-passive).
    pub fn region_role(&self) -> &'static str {
        match self.regions.mode {
            Mode::ActiveActive => "active",
            Mode::ActivePassive if self.reader.primary() != self.info.region => "secondary",
            Mode::ActivePassive if self.reader.fenced_until_ms() > self.clock.wall_ms() => "fenced",
            Mode::ActivePassive => "primary",
        }
    }

    /// Per peer region: what it has not applied of this region's changefeed.
    /// Exact on the leader (which hears the peers' acknowledgements).
    pub fn replication_lag(&self) -> Result<Vec<PeerLag>, Error> {
        use crate::hlc::PhysicalClock;
        let region = self.reader.region_state();
        let now_ms = crate::hlc::WallClock.now_ms();
        let mut peers = Vec::new();
        for p in &self.regions.peers {
            let replicated = region.acked.get(&p.name).copied().unwrap_or(0);
            let acked_index = self.stats.acked(&p.name).unwrap_or(replicated).max(replicated);
            let (lag_entries, first) = self.reader.changefeed_lag(acked_index).map_err(Error::from)?;
            let lag_ms = first.map(|h| now_ms.saturating_sub(h.physical_ms)).unwrap_or(0);
            peers.push(PeerLag { region: p.name.clone(), acked_index, lag_entries, lag_ms });
        }
        Ok(peers)
    }

    /// On a leader, the highest index a majority of voters has: its commit
    /// index. openraft reports replication progress only on the leader, so
    /// followers have none.
    pub fn commit_index(&self) -> Option<u64> {
        let m = self.raft_metrics();
        let replication = m.replication.as_ref()?;
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|v| {
                if *v == m.id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    replication.get(v).copied().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        matched.get(voters.len() / 2).copied()
    }

    /// Whether the node is ready, and each check (the `/health/ready` body):
    /// knows a leader (confirmed by a quorum when it is the leader), is a
    /// member, has applied within `READY_APPLY_LAG_MAX` of its log, and knows
    /// its region's role.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let m = self.raft_metrics();
        // A leader stepping down asks no quorum: that would send heartbeats
        // and keep it in place.
        let stepping_down = self.stepping_down.load(Ordering::Acquire) && m.current_leader == Some(self.id);
        let has_leader = if stepping_down {
            false
        } else if m.current_leader == Some(self.id) {
            matches!(tokio::time::timeout(READY_QUORUM_TIMEOUT, self.raft.get_read_log_id()).await, Ok(Ok(_)))
        } else {
            m.current_leader.is_some()
        };
        let leader = if has_leader { m.current_leader } else { None };
        let member = m.membership_config.membership().nodes().any(|(id, _)| *id == self.id);
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let caught_up = last_log.saturating_sub(applied) <= READY_APPLY_LAG_MAX;
        let role = self.region_role();
        let primary = self.reader.primary();
        let role_known = self.regions.mode == Mode::ActiveActive || !primary.is_empty();
        let ok = has_leader && member && caught_up && role_known;
        let body = json!({
            "status": if ok { "ready" } else { "not ready" },
            "node": { "id": self.id, "region": self.info.region, "az": self.info.az },
            "checks": {
                "has_leader": { "ok": has_leader, "leader": leader, "stepping_down": stepping_down },
                "member": { "ok": member },
                "applied": { "ok": caught_up, "last_log_index": last_log, "applied_index": applied, "lag_max": READY_APPLY_LAG_MAX },
                "region_role": { "ok": role_known, "role": role, "primary": primary },
            }
        });
        (ok, body)
    }

    /// Bootstraps the cluster with `members` (exactly once).
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), Error> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(Error::FailedPrecondition(ALREADY_INITIALIZED.into()))
            }
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => Err(Error::invalid(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(Error::Unavailable { reason: f.to_string(), retry_safe: false }),
        }
    }

    /// Whether this node holds a log or a membership already: bootstrapped,
    /// or added to a region. (Raft's own check at `initialize` stays the
    /// authority; this one answers before anything else is done.)
    pub fn is_initialized(&self) -> bool {
        let m = self.raft_metrics();
        m.last_log_index.is_some() || m.membership_config.membership().nodes().next().is_some()
    }

    /// Adds a learner and waits until it has caught up (this node must lead).
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_CHANGE_TIMEOUT;
        let _turn = self.membership_turn(deadline).await?;
        membership_outcome(tokio::time::timeout_at(deadline, self.raft.add_learner(id, info, true)).await)
    }

    /// Changes the voters or members (this node must lead).
    pub async fn change_membership(&self, change: ChangeMembers<NodeId, NodeInfo>) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_CHANGE_TIMEOUT;
        let _turn = self.membership_turn(deadline).await?;
        let call = self.raft.change_membership(change, false);
        membership_outcome(tokio::time::timeout_at(deadline, call).await)
    }

    /// Waits until no other membership change is under way here and the
    /// latest membership entry is applied on this node. openraft takes a
    /// new change once it counts the last one committed, and a leader counts
    /// its own copy before syncing it (see `storage::LogSynced`): the last
    /// change might then sit on a single follower, and if this leader lost
    /// it, two changes would be in flight at once, which can leave two
    /// majorities. An applied entry is synced here, so truly committed.
    /// Then checks again that this node leads (the wait may be long). Gives
    /// up at `deadline`, the whole change's.
    async fn membership_turn(&self, deadline: tokio::time::Instant) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        self.check_leader()?;
        let applied = |m: &RaftMetrics<NodeId, NodeInfo>| {
            m.last_applied.map(|l| l.index) >= m.membership_config.log_id().map(|l| l.index)
        };
        let waited = tokio::time::timeout_at(deadline, async {
            let turn = self.membership_changes.lock().await;
            self.raft.metrics().wait_for(applied).await.map(|_| turn)
        })
        .await;
        match waited {
            Ok(Ok(turn)) => self.check_leader().map(|()| turn),
            Ok(Err(_)) => Err(Error::Unavailable { reason: "raft stopped".into(), retry_safe: true }),
            Err(_) => Err(Error::Unavailable {
                reason: format!(
                    "another membership change, or the last one's apply, took all of {MEMBERSHIP_CHANGE_TIMEOUT:?}"
                ),
                retry_safe: true,
            }),
        }
    }

    /// The membership's voters and members as this node knows them.
    pub fn membership(&self) -> (BTreeSet<NodeId>, Vec<(NodeId, NodeInfo)>, Option<NodeId>) {
        let m = self.raft_metrics();
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().collect();
        let members = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        (voters, members, m.current_leader)
    }

    /// Starts the batcher: it packs concurrent client writes into one log
    /// entry each time a proposal slot is free (see
    /// `PROPOSALS_IN_FLIGHT_MAX`), at most `WRITES_PER_ENTRY_MAX` writes and
    /// `ENTRY_BYTES_MAX` bytes per entry (see [`pack`]). Under load many
    /// writes share one append, flush, replication round and apply; a lone
    /// write is proposed at once, alone.
    pub fn spawn_batcher(self: &Arc<Self>, mut queue: mpsc::Receiver<Proposal>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
            // A write that did not fit the previous entry opens the next one.
            let mut carry: Option<Proposal> = None;
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let first = match carry.take() {
                    Some(p) => p,
                    None => loop {
                        match queue.recv().await {
                            Some(p) if p.1.is_closed() => continue,
                            Some(p) => break p,
                            None => return,
                        }
                    },
                };
                // A write whose caller gave up before it was proposed is
                // dropped here: it had no effect, and proposing it would only
                // hold up the writes queued behind it.
                let next = || loop {
                    match queue.try_recv() {
                        Ok(p) if p.1.is_closed() => continue,
                        other => return other.ok(),
                    }
                };
                let (batch, rest) = pack(first, |p| p.0.entry_bytes(), next);
                carry = rest;
                let node = node.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    node.propose_batch(batch).await;
                });
            }
        })
    }

    /// Asks openraft for a snapshot about every `every` applied entries, at
    /// this node's phase among its region's voters
    /// (`storage::compaction`), until `stop`.
    pub fn spawn_snapshot_schedule(
        self: &Arc<Self>,
        every: u64,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            // The snapshot index when this task last asked, and when: the
            // metrics can lag the core, so until the snapshot moves (or a
            // build had all the time it could need) it does not ask again,
            // lest a stale look start a second build of the whole state.
            let mut asked: Option<(u64, std::time::Instant)> = None;
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(SNAPSHOT_CHECK_INTERVAL) => {}
                }
                let m = node.raft_metrics();
                let applied = m.last_applied.map_or(0, |l| l.index);
                let snapshot = m.snapshot.map_or(0, |l| l.index);
                if asked.is_some_and(|(at, when)| at == snapshot && when.elapsed() < SNAPSHOT_BUILD_MAX) {
                    continue;
                }
                let position = m.membership_config.membership().voter_ids().position(|id| id == node.id).unwrap_or(0);
                if !crate::storage::compaction::due(
                    applied,
                    snapshot,
                    every,
                    crate::storage::compaction::phase(position, every),
                ) {
                    continue;
                }
                if let Err(e) = node.trigger_snapshot().await {
                    tracing::debug!(error = %e, "no snapshot: raft stopped");
                    return;
                }
                asked = Some((snapshot, std::time::Instant::now()));
            }
        })
    }

    /// Starts the clock watch: every `CLOCK_CHECK_INTERVAL` it exports how
    /// far the hybrid clock runs ahead of the physical one and moves this
    /// node's [`Stance`] (see [`next_stance`]). While the clock runs too far
    /// ahead the node refuses to stamp writes in any case; stepping down
    /// lets a node whose clock can stamp take over.
    pub fn spawn_clock_watch(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut stance = Stance::Normal;
            let now = std::time::Instant::now;
            // Since when, stepping down, no other live leader was heard; and
            // since when this node stands.
            let (mut alone_since, mut standing_since) = (now(), now());
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(CLOCK_CHECK_INTERVAL) => {}
                }
                let ahead_ms = node.clock.ahead_ms();
                crate::telemetry::hlc_ahead(ahead_ms);
                let leader = node.raft_metrics().current_leader;
                let leading = leader == Some(node.id);
                // A leader is alive when it named itself and was heard from
                // lately: openraft keeps naming a leader after it died.
                let other_leader_alive = leader.is_some() && !leading && node.contact.heard_within(LEADER_HEARD_MAX);
                if other_leader_alive {
                    alone_since = now();
                }
                let inputs = StanceInputs {
                    skewed: ahead_ms > node.clock.offset_ms_max(),
                    leading,
                    other_leader_alive,
                    alone_for: alone_since.elapsed(),
                    standing_for: standing_since.elapsed(),
                };
                let next = next_stance(stance, &inputs);
                if next == stance {
                    continue;
                }
                match next {
                    Stance::Normal => tracing::warn!("the physical clock caught up with the hybrid clock"),
                    Stance::SteppingDown => {
                        alone_since = now();
                        tracing::error!(ahead_ms, "hybrid clock too far ahead of the physical clock: stepping down");
                        node.history.record(
                            "clock",
                            format!(
                                "node {}: hybrid clock {ahead_ms} ms ahead of the physical clock: refusing to stamp \
                                 writes, stepping down",
                                node.id
                            ),
                        );
                    }
                    Stance::Standing => {
                        standing_since = now();
                        tracing::error!(
                            ahead_ms,
                            "no node with a sane clock took over: leading again, still refusing to stamp writes"
                        )
                    }
                }
                let stepping_down = next == Stance::SteppingDown;
                node.stepping_down.store(stepping_down, Ordering::Release);
                node.set_campaigning(!stepping_down);
                stance = next;
            }
        })
    }

    /// Proposes the writes of one batch as one entry and answers each waiter.
    async fn propose_batch(&self, batch: Vec<Proposal>) {
        let (mut cmds, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let results: Vec<Result<CommandResult, Error>> = if cmds.len() == 1 {
            vec![self.propose(cmds.remove(0)).await]
        } else {
            let n = cmds.len();
            match self.propose(Command::Batch(cmds)).await {
                Ok(CommandResult::Batch(rs)) if rs.len() == n => rs.into_iter().map(Ok).collect(),
                Ok(other) => {
                    let e = Error::Indeterminate(format!("a batch of {n} writes applied as {other:?}"));
                    vec![Err(e); n]
                }
                Err(e) => vec![Err(e); n],
            }
        };
        let committed =
            results.iter().filter(|r| matches!(r, Ok(r) if !matches!(r, CommandResult::Rejected { .. }))).count();
        self.history.count_writes(committed as u64);
        for (waiter, result) in waiters.into_iter().zip(results) {
            // Ignored: the caller may have given up (its request was cancelled).
            let _ = waiter.send(result);
        }
    }
}

/// Packs one log entry's worth of writes: `first`, then whatever `next`
/// yields while the entry stays within `WRITES_PER_ENTRY_MAX` writes and
/// `ENTRY_BYTES_MAX` bytes (as `size` counts them). The first write always
/// goes in (a maximal write fits an entry: see `limits`); the write that
/// would have crossed the byte line is returned to open the next entry.
pub fn pack<T>(first: T, size: impl Fn(&T) -> usize, mut next: impl FnMut() -> Option<T>) -> (Vec<T>, Option<T>) {
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < WRITES_PER_ENTRY_MAX as usize {
        let Some(item) = next() else { break };
        let b = size(&item);
        if bytes + b > ENTRY_BYTES_MAX {
            return (batch, Some(item));
        }
        bytes += b;
        batch.push(item);
    }
    (batch, None)
}

/// A membership change's outcome: openraft's result, or a timeout.
type ChangeOutcome<T> =
    Result<Result<T, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>, tokio::time::error::Elapsed>;

/// Maps the outcome of a membership change that was started on this node
/// (after a successful leadership check). A change has two steps; an error
/// after the call began may follow a committed first step, so none of them
/// is retry-safe.
fn membership_outcome<T>(result: ChangeOutcome<T>) -> Result<(), Error> {
    match result {
        Err(_) => Err(Error::Indeterminate(format!(
            "membership change not finished within {MEMBERSHIP_CHANGE_TIMEOUT:?}; check `nines member list`"
        ))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(Error::Indeterminate(format!(
            "leadership moved to {:?} during the membership change; check `nines member list`",
            f.leader_id
        ))),
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(match e {
            ChangeMembershipError::InProgress(_) => Error::Unavailable { reason: e.to_string(), retry_safe: false },
            _ => Error::FailedPrecondition(e.to_string()),
        }),
        Ok(Err(RaftError::Fatal(f))) => Err(Error::Unavailable { reason: f.to_string(), retry_safe: false }),
    }
}

/// A write the region's role refuses; it had no effect.
fn refusal(reason: String, retry_later: bool) -> Error {
    if retry_later { Error::Unavailable { reason, retry_safe: true } } else { Error::FailedPrecondition(reason) }
}

/// In-memory replication progress on this node, for status and metrics.
/// Not replicated: a new leader starts empty and learns it again from the
/// next exchange with each peer.
#[derive(Default)]
pub struct Stats {
    /// `std::sync::Mutex`: held only to read or update a map entry.
    inner: Mutex<StatsInner>,
}

#[derive(Default, Clone)]
struct StatsInner {
    /// Per peer region: the highest changefeed index it reported applied.
    acked: BTreeMap<String, u64>,
    /// Per origin region: batches refused because a timestamp was too far ahead.
    refused_clock: BTreeMap<String, u64>,
    /// The last scheduled backup this node took: its id and when (ms since
    /// the Unix epoch).
    last_backup: Option<(String, u64)>,
    /// Why the RPO guard refuses writes now, if it does.
    rpo_refusal: Option<String>,
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn acked(&self, peer: &str) -> Option<u64> {
        self.lock().acked.get(peer).copied()
    }

    pub fn set_acked(&self, peer: &str, index: u64) {
        self.lock().acked.insert(peer.to_string(), index);
    }

    pub fn refused_clock(&self, origin: &str) -> u64 {
        self.lock().refused_clock.get(origin).copied().unwrap_or(0)
    }

    pub fn count_refused_clock(&self, origin: &str) {
        *self.lock().refused_clock.entry(origin.to_string()).or_default() += 1;
    }

    pub fn last_backup(&self) -> Option<(String, u64)> {
        self.lock().last_backup.clone()
    }

    pub fn set_last_backup(&self, id: String, at_ms: u64) {
        self.lock().last_backup = Some((id, at_ms));
    }

    pub fn rpo_refusal(&self) -> Option<String> {
        self.lock().rpo_refusal.clone()
    }

    pub fn set_rpo_refusal(&self, reason: Option<String>) {
        self.lock().rpo_refusal = reason;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::hlc::Hlc;
    use crate::limits::{ENTRY_FRAMING_BYTES_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX, WRITE_BYTES_MAX};
    use crate::types::{Entry, LogId};

    fn put(key_len: usize, value_len: usize) -> Command {
        Command::Put {
            key: vec![b'k'; key_len.max(1)],
            value: vec![b'v'; value_len],
            hlc: Hlc { physical_ms: u64::MAX, logical: u32::MAX },
        }
    }

    /// Packs every size in `sizes`, in order, into entries.
    fn pack_all(sizes: &[usize]) -> Vec<Vec<usize>> {
        let mut queue = sizes.iter().copied();
        let mut carry = None;
        let mut entries = Vec::new();
        while let Some(first) = carry.take().or_else(|| queue.next()) {
            let (batch, rest) = pack(first, |s| *s, || queue.next());
            carry = rest;
            entries.push(batch);
        }
        entries
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn no_entry_passes_the_byte_budget_for_any_mix_of_sizes(
            sizes in prop::collection::vec(prop_oneof![1usize..2_000, 200_000usize..=WRITE_BYTES_MAX], 1..3_000)
        ) {
            let entries = pack_all(&sizes);
            for e in &entries {
                prop_assert!(!e.is_empty());
                prop_assert!(e.len() <= WRITES_PER_ENTRY_MAX as usize, "{} writes", e.len());
                prop_assert!(e.iter().sum::<usize>() <= ENTRY_BYTES_MAX, "{} bytes", e.iter().sum::<usize>());
            }
            let flat: Vec<usize> = entries.into_iter().flatten().collect();
            prop_assert_eq!(flat, sizes, "every write is packed once, in order");
        }

        #[test]
        fn an_encoded_entry_stays_within_what_its_writes_count(
            lens in prop::collection::vec((1usize..=KEY_BYTES_MAX, 0usize..=VALUE_BYTES_MAX), 1..6)
        ) {
            let cmd = Command::Batch(lens.iter().map(|(k, v)| put(*k, *v)).collect());
            let counted = cmd.entry_bytes();
            let entry = Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(u64::MAX, u64::MAX), u64::MAX),
                payload: openraft::EntryPayload::Normal(cmd),
            };
            let encoded = crate::storage::record::encode(&entry).expect("encode").len();
            prop_assert!(encoded <= counted + ENTRY_FRAMING_BYTES_MAX, "{encoded} bytes encoded, {counted} counted");
        }
    }

    #[test]
    fn a_maximal_write_always_fits_an_entry_alone() {
        let max = put(KEY_BYTES_MAX, VALUE_BYTES_MAX);
        let (batch, rest) = pack(max.clone(), Command::entry_bytes, || None);
        assert_eq!((batch.len(), rest), (1, None));
        // Behind a nearly full entry it opens the next one instead.
        let small = put(1, ENTRY_BYTES_MAX - WRITE_BYTES_MAX);
        let mut next = Some(max.clone());
        let (batch, rest) = pack(small, Command::entry_bytes, || next.take());
        assert_eq!(batch.len(), 1);
        assert_eq!(rest, Some(max));
    }
}
