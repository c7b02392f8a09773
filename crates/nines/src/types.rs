//! The types openraft is instantiated with: what goes into the log
//! ([`Command`]), what applying it returns ([`CommandResult`]), and what a
//! member of the cluster is ([`NodeInfo`]).

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;

/// A node's identifier, unique within its region's Raft group.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of a nines region.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type Vote = openraft::Vote<NodeId>;

/// Of two regions claiming primary at the same epoch, whether `a` wins
/// over `b`: the name that sorts first. Every region (state machine,
/// shipping, the CLI) resolves such a tie by this one rule.
pub fn wins_epoch_tie(a: &str, b: &str) -> bool {
    a < b
}

/// The name of a Raft role in status output and metrics.
pub fn role_name(state: &openraft::ServerState) -> &'static str {
    use openraft::ServerState;
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// A member of a region's Raft group, as stored in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where the node serves clients (KV, admin, health), e.g.
    /// `http://127.0.0.1:7001`.
    pub grpc_addr: String,
    /// Where the node serves HTTP probes, e.g. `http://127.0.0.1:8001`.
    pub admin_addr: String,
    pub region: String,
    pub az: String,
    /// Where the node serves its peers (Raft, cross-region shipments), e.g.
    /// `http://127.0.0.1:9001`.
    pub peer_addr: String,
}

impl NodeInfo {
    /// The node `config` describes, reached at `urls`.
    pub fn of(config: &crate::config::NodeConfig, urls: crate::config::Urls) -> NodeInfo {
        NodeInfo {
            grpc_addr: urls.grpc,
            admin_addr: urls.admin,
            region: config.region.clone(),
            az: config.az.clone(),
            peer_addr: urls.peer,
        }
    }

    /// The node `config` describes, at its configured listen addresses (no
    /// port 0).
    pub fn listening(config: &crate::config::NodeConfig) -> NodeInfo {
        NodeInfo::of(config, config.listen_urls())
    }
}

/// What a CompareAndSwap compares against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expected {
    /// The current value's version index, as this region's log assigned it.
    Index(u64),
    /// The key must not exist (or be deleted).
    Absent,
    /// The current value must be this write, named by its HLC and origin
    /// region: the same in every region, unlike its index.
    Write { hlc: Hlc, origin: String },
}

/// A command, as proposed to Raft. The leader stamps `hlc` before proposing
/// so every replica applies the same timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        hlc: Hlc,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        hlc: Hlc,
    },
    CompareAndSwap {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expected: Expected,
        hlc: Hlc,
    },
    /// Writes shipped from another region, applied last-writer-wins on
    /// `(hlc, origin)`. `epoch` is the sender's epoch (active-passive).
    /// After it, this region holds every write of `origin` through
    /// `complete_through`. `collect_below_ms` is as in `AckShipped`: holding
    /// more of the origin's writes may free tombstones.
    ApplyRemote { origin: String, epoch: u64, entries: Vec<RemoteEntry>, complete_through: u64, collect_below_ms: u64 },
    /// Peer `region` has applied this region's changefeed through `index`;
    /// its latest own write was at `peer_index` when it said so. Entries
    /// every peer has applied are dropped; a delete's tombstone only once
    /// this region also holds every peer's writes through its `peer_index`
    /// (so no older concurrent write can arrive after the tombstone is gone).
    /// Only tombstones stamped before `collect_below_ms` (the proposing
    /// leader's physical clock less twice the maximum clock offset) go: a
    /// later write to the key, stamped by any node's clock, is then newer
    /// than the tombstone the peers keep.
    AckShipped { region: String, index: u64, peer_index: u64, collect_below_ms: u64 },
    /// Adopt region roles (active-passive). An equal epoch with the same
    /// primary only changes the fence: local writes stamped before
    /// `fenced_until_ms` (HLC milliseconds; 0 lifts it) are refused, so a
    /// fence ends by itself even if nobody lifts it. A higher epoch that names another
    /// primary demotes this region if it was primary: its changefeed entries
    /// above `shipped_through` (never applied by the new primary) move to the
    /// divergence record.
    SetRole { primary: String, epoch: u64, fenced_until_ms: u64, shipped_through: u64 },
    /// Client writes packed into one entry by the leader (Put, Delete and
    /// CompareAndSwap only), applied in order; write `p` gets version index
    /// `log index * WRITES_PER_ENTRY_MAX + p`.
    Batch(Vec<Command>),
    /// After a demotion: values of divergent keys as the new primary has
    /// them. `done` marks the last batch.
    Resync { entries: Vec<ResyncEntry>, done: bool },
    /// Sets the region's replication setup. The first one is proposed by
    /// the region's first leader from its configuration; a later one changes
    /// it only with `replace` (`nines region configure`).
    Configure { setup: ReplicationSetup, replace: bool },
    /// A page of a full sync from `origin` (see `Shipment::full_sync`),
    /// applied last-writer-wins on each entry's own `(hlc, origin)`;
    /// `through` above 0 ends the sync: this region then holds every write
    /// of `origin` through it. (Last, so older log entries keep decoding.)
    FullSync { origin: String, epoch: u64, entries: Vec<SyncEntry>, through: u64 },
    /// The continuous archive (see `backup::archive`): with `on`, local
    /// writes are kept in the state machine's archive until the leader's
    /// archiver has stored them, and entries at or below version index
    /// `through` (stored now) go; `on` false stops archiving and drops the
    /// archive. (Last, so older log entries keep decoding.)
    Archived { on: bool, through: u64 },
    /// A client write (Put, Delete or CompareAndSwap) in a client session:
    /// applied at most once per `(client, seq)`; a repeat returns the first
    /// result (see `storage::state_machine`'s sessions). May stand in a
    /// `Batch`. (Last, so older log entries keep decoding.)
    Session { tag: SessionTag, write: Box<Command> },
}

/// Names one write of a client session: the Raft thesis' client id and
/// sequence number (§6.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTag {
    /// Random, chosen by the client when it starts.
    pub client: [u8; 16],
    /// The write's number in the session, from 1, never reused by the client.
    pub seq: u64,
    /// The lowest number the client still waits for an answer to: results
    /// below it are dropped.
    pub first_unanswered: u64,
    /// The client sent this write before and does not know what came of it.
    pub retry: bool,
}

/// What a session keeps of one applied write, to answer a repeat of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionResult {
    Put {
        version: Version,
    },
    Delete {
        existed: bool,
        version: Version,
    },
    /// A failed comparison keeps no value: a repeat reads the current one.
    CompareAndSwap {
        succeeded: bool,
        version: Option<Version>,
    },
}

/// How this region takes part in cross-region replication. Replicated state
/// (`Command::Configure`), so every replica of a region applies every entry
/// the same way whatever its own configuration file says: the region's
/// first leader proposes its file's setup, and a node whose file disagrees
/// with the replicated one refuses to start (see the daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSetup {
    pub region: String,
    /// The other regions. Empty: no changefeed is kept.
    pub peers: Vec<String>,
    pub mode: crate::config::Mode,
    /// The primary at epoch 0 (active-passive).
    pub initial_primary: String,
}

impl ReplicationSetup {
    /// The configuration field in which `self` (a node's file) differs from
    /// `replicated`, if any.
    pub fn differing_field(&self, replicated: &ReplicationSetup) -> Option<&'static str> {
        let sorted = |p: &[String]| {
            let mut p = p.to_vec();
            p.sort();
            p
        };
        if self.region != replicated.region {
            Some("region")
        } else if sorted(&self.peers) != sorted(&replicated.peers) {
            Some("cluster.regions")
        } else if self.mode != replicated.mode {
            Some("cluster.mode")
        } else if self.initial_primary != replicated.initial_primary {
            Some("cluster.primary")
        } else {
            None
        }
    }

    /// The setup in a few words, for messages.
    pub fn describe(&self) -> String {
        format!(
            "region {}, peers [{}], {}, initial primary {:?}",
            self.region,
            self.peers.join(", "),
            self.mode.as_str(),
            self.initial_primary
        )
    }
}

impl Command {
    /// This client write inside the session `tag` names, if any.
    pub fn in_session(self, tag: Option<SessionTag>) -> Command {
        match tag {
            Some(tag) => Command::Session { tag, write: Box::new(self) },
            None => self,
        }
    }

    /// What this command adds to a log entry, in bytes, at most: its keys
    /// and values plus `RECORD_FRAMING_BYTES_MAX` per record. The batcher
    /// and the limits' assertions count with it.
    pub fn entry_bytes(&self) -> usize {
        use crate::limits::RECORD_FRAMING_BYTES_MAX as F;
        match self {
            Command::Put { key, value, .. } | Command::CompareAndSwap { key, value, .. } => key.len() + value.len() + F,
            Command::Delete { key, .. } => key.len() + F,
            Command::ApplyRemote { origin, entries, .. } => {
                origin.len()
                    + F
                    + entries.iter().map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len) + F).sum::<usize>()
            }
            Command::AckShipped { region, .. } => region.len() + F,
            Command::SetRole { primary, .. } => primary.len() + F,
            Command::Batch(cmds) => F + cmds.iter().map(Command::entry_bytes).sum::<usize>(),
            Command::Configure { setup, .. } => {
                F + setup.region.len()
                    + setup.initial_primary.len()
                    + setup.peers.iter().map(|p| p.len() + F).sum::<usize>()
            }
            Command::Resync { entries, .. } => {
                F + entries.iter().map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len) + 2 * F).sum::<usize>()
            }
            Command::Archived { .. } => F,
            Command::Session { write, .. } => F + write.entry_bytes(),
            Command::FullSync { origin, entries, .. } => {
                origin.len()
                    + F
                    + entries
                        .iter()
                        .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len) + e.origin.len() + F)
                        .sum::<usize>()
            }
        }
    }
}

/// One write from another region's changefeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEntry {
    /// The origin region's log index of the write.
    pub origin_index: u64,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `None` is a delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub hlc: Hlc,
}

/// One key of a full sync page: its value at the sender (`None`: a
/// tombstone) and its version there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub hlc: Hlc,
    pub origin: String,
}

/// A key's value at the new primary, to replace a divergent local write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `None`: absent or deleted at the new primary.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub hlc: Hlc,
    pub origin: String,
    /// The divergent version it replaces: a newer value is left alone.
    pub divergent: Version,
}

/// The version of a stored value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    /// The region where the write was accepted.
    pub origin: String,
    /// The log index at which this region applied the write.
    pub index: u64,
}

/// A stored value: a live value or a tombstone, with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    /// `None` is a tombstone: the key was deleted at `version`.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub version: Version,
}

impl StoredValue {
    /// The live value, if this is not a tombstone.
    pub fn live(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }
}

/// What applying one log entry returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries, acks, resyncs.
    None,
    /// The command was not applied: the region does not take writes now.
    Rejected {
        reason: String,
        retry_later: bool,
    },
    /// Remote writes: how many were new (not seen before), and how far the
    /// origin's changefeed is now applied.
    Remote {
        applied: u64,
        applied_through: u64,
    },
    /// One result per write of a `Batch`.
    Batch(Vec<CommandResult>),
    /// Roles adopted; `divergent` lists the keys whose local writes never
    /// reached the new primary.
    Role {
        divergent: Vec<Vec<u8>>,
    },
    Put {
        version: Version,
    },
    Delete {
        existed: bool,
        version: Version,
    },
    CompareAndSwap {
        succeeded: bool,
        /// The new version if `succeeded`.
        version: Option<Version>,
        /// The current value if the comparison failed (absent or a tombstone
        /// reads as `None`).
        current: Option<(Vec<u8>, StoredValue)>,
    },
    /// A repeated session write whose first result is no longer kept (the
    /// session expired or dropped it): it may or may not have applied, and
    /// it was not applied again.
    SessionExpired {
        seq: u64,
    },
}

/// One batch of a region's changefeed on its way to a peer region's leader
/// (the domain side of the `Replication.Ship` request).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shipment {
    pub origin: String,
    /// The sender's view of the region roles (active-passive).
    pub epoch: u64,
    pub primary: String,
    /// The origin index this batch continues from: `entries` are the
    /// origin's writes after it (0 with a full sync).
    pub after: u64,
    /// Writes in origin-index order, all above `after`.
    pub entries: Vec<RemoteEntry>,
    /// How far the sender has applied the receiver's own changefeed: tells a
    /// receiver that is being demoted which of its writes arrived.
    pub receiver_applied_through: u64,
    /// After this batch the receiver holds every write of the origin through
    /// this index.
    pub complete_through: u64,
    /// A page of a full sync instead of changefeed entries (`entries` is
    /// then empty): the receiver lost writes of the origin it had applied.
    pub full_sync: Option<Vec<SyncEntry>>,
}

/// Why a receiving region refused a shipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Refusal {
    #[default]
    None,
    /// The receiver knows a higher epoch: the sender is no longer primary.
    StaleEpoch,
    /// A timestamp in the batch is further ahead of the receiver's clock
    /// than its maximum offset.
    ClockAhead,
    /// The shipments this one continues from did not arrive in time:
    /// nothing was applied.
    OutOfOrder,
}

/// A receiving region's answer to a [`Shipment`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShipAnswer {
    /// The highest origin index of the sender's region applied here.
    pub applied_through: u64,
    /// The receiver's view of the region roles.
    pub epoch: u64,
    pub primary: String,
    pub refused: Refusal,
    pub reason: String,
    /// The log index of the receiver's latest own write when it replied.
    pub receiver_index: u64,
    /// The receiver orders shipments by `after`: several may be in flight.
    pub in_order: bool,
}

/// What one peer region has not applied of this region's changefeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLag {
    pub region: String,
    /// The highest changefeed index the peer reported applied.
    pub acked_index: u64,
    /// Changefeed entries above it.
    pub lag_entries: u64,
    /// Age of the oldest of them, in milliseconds.
    pub lag_ms: u64,
}
