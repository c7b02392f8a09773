//! A node's configuration: a TOML file whose every field has a default (see
//! `deploy/nines.example.toml`, which documents each one), overridden by
//! environment variables and flags (`nines node --help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::LABEL_BYTES_MAX;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's id, unique within its region. Must not be 0.
    pub id: u64,
    pub region: String,
    pub az: String,
    /// Where the node keeps its log, state and snapshots.
    pub data_dir: PathBuf,
    /// Where the client gRPC listener (KV, membership and region admin,
    /// health, reflection) listens. Port 0 picks a free port; the node then
    /// writes its addresses to `data_dir/addrs.json`.
    pub grpc_listen: SocketAddr,
    /// Where the peer gRPC listener (Raft inside the region, shipments
    /// between regions) listens: only other nodes need to reach it (as
    /// etcd's peer port). Port 0 picks a free port, as for `grpc_listen`.
    pub peer_listen: SocketAddr,
    /// Where the HTTP probes listen.
    pub admin_listen: SocketAddr,
    /// The gRPC URL other nodes and clients use to reach this node. Empty:
    /// `http://` + the bound `grpc_listen` address. Set it when listening on
    /// 0.0.0.0 (in a container, say).
    pub grpc_advertise: String,
    /// The admin URL, as `grpc_advertise`.
    pub admin_advertise: String,
    /// The peer URL other nodes use, as `grpc_advertise`.
    pub peer_advertise: String,
    pub raft: RaftConfig,
    /// Largest offset a remote clock may be ahead of this node's.
    #[serde(with = "humantime_serde")]
    pub clock_offset_max: Duration,
    /// How long a write may wait for commit before the client is told its
    /// outcome is unknown.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Log format: "text" (human-readable) or "json".
    pub log_format: String,
    /// Worker threads of the node's async runtime; 0 means one per CPU core.
    /// Set it lower when several nodes share one machine (`nines up` gives
    /// each node its share of the cores): more workers than cores only add
    /// thread wake-ups to every request.
    pub runtime_threads: usize,
    /// The regions of the cluster and how they replicate.
    pub cluster: ClusterConfig,
    /// Limits on cross-region replication.
    pub replication: ReplicationConfig,
    /// Simulated one-way network latency, added by this node's transport.
    pub latency: LatencyConfig,
    /// The storage engine.
    pub storage: StorageConfig,
    /// Scheduled backups, taken by the region's leader.
    pub backup: BackupConfig,
    /// Mutual TLS on the gRPC port: the cluster CA, this node's certificate
    /// and key (`nines certs create` makes them). Peers and clients must
    /// present a certificate the CA signed; its role decides what they may
    /// call (see `crate::tls`).
    pub tls: Option<crate::tls::TlsConfig>,
    /// A file holding the admin token (`crate::token`): a call carrying it
    /// (`authorization: Bearer TOKEN`, the CLI's `--admin-token-file`) may
    /// make admin operations. Without `[tls]`, admin operations then need
    /// it; with `[tls]`, it lifts a client certificate to admin.
    pub admin_token_file: Option<PathBuf>,
    /// Run plaintext, without TLS and without authorization: anyone who
    /// reaches the client port can read, write and change membership (unless
    /// `admin_token_file` guards the admin operations), and anyone who
    /// reaches the peer port can send Raft traffic and shipments. For
    /// loopback and tests; a node with neither `[tls]` nor `insecure = true`
    /// refuses to start.
    pub insecure: bool,
    /// Test only: enables the fault hooks (dropping replication traffic,
    /// offsetting the clock) through the admin API. Off by default; a node
    /// without it refuses every fault request.
    pub fault_injection: bool,
    /// Test only, needs `fault_injection`: plants a bug for the fault
    /// harness to find. A leader serves linearizable reads from its own
    /// state without confirming with a quorum that it still leads, so a
    /// leader cut off by a partition returns stale values.
    pub planted_bug_local_reads: bool,
}

/// How regions relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every region accepts writes; conflicts resolve last-writer-wins.
    #[default]
    ActiveActive,
    /// One primary region accepts writes under an epoch.
    ActivePassive,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ActiveActive => "active-active",
            Mode::ActivePassive => "active-passive",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub mode: Mode,
    /// The primary region at epoch 0 (active-passive only).
    pub primary: String,
    /// Every region with the gRPC endpoints of its nodes. Empty: this node's
    /// region is alone and nothing is replicated across regions.
    pub regions: Vec<RegionConfig>,
    /// The gRPC endpoints of the authority (active-passive): a nines region
    /// of its own that holds the primary's lease and allocates epochs (see
    /// `crate::authority`). Empty: no lease, and nothing prevents two
    /// primaries during a partition.
    pub authority: Vec<String>,
    /// How long the primary's lease holds after each renewal (renewed every
    /// third of it). It bounds what a cut-off primary can still acknowledge,
    /// and how soon after the primary's last renewal another region can be
    /// promoted (plus the maximum clock offset).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            mode: Mode::default(),
            primary: String::new(),
            regions: Vec::new(),
            authority: Vec::new(),
            lease: Duration::from_secs(3),
        }
    }
}

/// Limits on cross-region replication.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The RPO guard (active-passive, as Aurora's `rds.global_db_rpo`):
    /// when no secondary region has acknowledged the primary's oldest
    /// unacknowledged write within this long, the primary refuses new
    /// writes (retry-safe, naming the lag) until one catches up. Bounds what
    /// a region loss can lose, at the price of availability while the
    /// secondaries are cut off. 0s: off.
    #[serde(with = "humantime_serde")]
    pub max_rpo: Duration,
}

/// Shortest RPO guard: below it the guard's own probe and a cross-region
/// round trip would refuse writes on a healthy link.
pub const MAX_RPO_MIN: Duration = Duration::from_millis(200);

/// Shortest primary lease: renewals every third of it must fit a round trip
/// to the authority with room.
pub const LEASE_MIN: Duration = Duration::from_millis(600);

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// The client URLs of its nodes (`grpc_advertise`): status, and what
    /// clients learn of the region.
    pub endpoints: Vec<String>,
    /// The peer URLs of its nodes (`peer_advertise`): where shipments go.
    /// Needed for every region but this node's own.
    #[serde(default)]
    pub peer_endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyConfig {
    /// Between nodes of the same AZ.
    #[serde(with = "humantime_serde")]
    pub same_az: Duration,
    /// Between AZs of one region.
    #[serde(with = "humantime_serde")]
    pub cross_az: Duration,
    /// Between regions, unless a pair below says otherwise.
    #[serde(with = "humantime_serde")]
    pub cross_region: Duration,
    pub region_pairs: Vec<RegionPairLatency>,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            same_az: Duration::ZERO,
            cross_az: Duration::ZERO,
            cross_region: Duration::ZERO,
            region_pairs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionPairLatency {
    pub a: String,
    pub b: String,
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
}

impl LatencyConfig {
    /// The one-way delay from a node in (`from_region`, `from_az`) to one in
    /// (`to_region`, `to_az`).
    pub fn between(&self, from_region: &str, from_az: &str, to_region: &str, to_az: &str) -> Duration {
        if from_region != to_region {
            return self
                .region_pairs
                .iter()
                .find(|p| (p.a == from_region && p.b == to_region) || (p.a == to_region && p.b == from_region))
                .map(|p| p.latency)
                .unwrap_or(self.cross_region);
        }
        if from_az == to_az { self.same_az } else { self.cross_az }
    }
}

impl NodeConfig {
    /// The URLs others reach this node at: the advertised ones, or the
    /// addresses its listeners bound (gRPC over `https://` with TLS).
    pub fn urls(&self, bound: &Bound) -> Urls {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let url = |advertised: &str, scheme: &str, bound: SocketAddr| {
            if advertised.is_empty() { format!("{scheme}://{bound}") } else { advertised.to_string() }
        };
        Urls {
            grpc: url(&self.grpc_advertise, scheme, bound.grpc),
            peer: url(&self.peer_advertise, scheme, bound.peer),
            admin: url(&self.admin_advertise, "http", bound.admin),
        }
    }

    /// [`Self::urls`] of a node that binds what it is configured to listen
    /// on (no port 0).
    pub fn listen_urls(&self) -> Urls {
        self.urls(&Bound { grpc: self.grpc_listen, peer: self.peer_listen, admin: self.admin_listen })
    }

    /// The other regions, with their endpoints.
    pub fn peer_regions(&self) -> Vec<RegionConfig> {
        self.cluster.regions.iter().filter(|r| r.name != self.region).cloned().collect()
    }
}

impl RegionConfig {
    /// Region `name`, made up of `nodes`, at their configured listen
    /// addresses (no port 0).
    pub fn of(name: &str, nodes: &[NodeConfig]) -> RegionConfig {
        let urls: Vec<Urls> = nodes.iter().map(NodeConfig::listen_urls).collect();
        RegionConfig {
            name: name.to_string(),
            endpoints: urls.iter().map(|u| u.grpc.clone()).collect(),
            peer_endpoints: urls.into_iter().map(|u| u.peer).collect(),
        }
    }
}

/// Where others reach a node: its client gRPC, peer gRPC and admin HTTP
/// URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls {
    pub grpc: String,
    pub peer: String,
    pub admin: String,
}

/// The addresses a node's three listeners bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
}

/// The storage engine's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The engine's page cache, shared by the log and the state machine,
    /// written like `64MiB`. Memory beyond it is the node's own (requests,
    /// batches, Raft's in-flight entries).
    #[serde(with = "bytes_serde")]
    pub cache_size: u64,
    /// Test only, needs `fault_injection`: the storage keeps only what was
    /// synced when the process is killed, as a disk's volatile cache would
    /// at a power cut. For power-loss tests; never for real data.
    pub power_loss_simulation: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { cache_size: 64 * 1024 * 1024, power_loss_simulation: false }
    }
}

/// Scheduled backups (see `nines backup`): the region's leader takes one
/// every `every` and then applies the retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups go: `file:///absolute/dir` or `s3://bucket/prefix` (with
    /// the usual `AWS_*` environment variables). Empty: no scheduled backups.
    pub target: String,
    /// How often the leader takes a backup.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Keep the newest this many backups (and those `keep_within`); unset
    /// with `keep_within` unset: keep every backup.
    pub keep: Option<u64>,
    /// Keep every backup created within this long.
    #[serde(with = "humantime_serde")]
    pub keep_within: Option<Duration>,
    /// How often the leader stores the continuous archive (every local
    /// write, for point-in-time restore) to `target`: the most a restore
    /// can lose. 0s: no archive.
    #[serde(with = "humantime_serde")]
    pub archive_every: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            target: String::new(),
            every: Duration::from_secs(3600),
            keep: None,
            keep_within: None,
            archive_every: Duration::from_secs(5),
        }
    }
}

/// Shortest backup interval: each backup reads the whole key space.
pub const BACKUP_EVERY_MIN: Duration = Duration::from_secs(1);

/// Shortest archive interval (other than 0, off): each store is an object
/// written and an entry proposed.
pub const ARCHIVE_EVERY_MIN: Duration = Duration::from_millis(100);

/// Sizes in the configuration: a number of bytes, or one with a unit, as
/// people write them (`512KiB`, `64MiB`, `1GiB`; `kB`, `MB`, `GB` are powers
/// of ten).
pub mod bytes_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses a size; the error says what it could not read.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 64MiB"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, kB, MB or GB)")),
        };
        n.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
    }

    /// Formats a size the way `parse` reads it.
    pub fn format(n: u64) -> String {
        for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= factor && n.is_multiple_of(factor) {
                return format!("{}{unit}", n / factor);
            }
        }
        format!("{n}B")
    }

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*n))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Size {
            Bytes(u64),
            Text(String),
        }
        match Size::deserialize(d)? {
            Size::Bytes(n) => Ok(n),
            Size::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// The round trip between this region's AZs on a quiet network; the
    /// timings below are derived from it when they are not given (see
    /// [`RaftConfig::timing`]). Unset: twice the simulated cross-AZ latency
    /// where there is one, else `AZ_ROUND_TRIP_DEFAULT`.
    #[serde(with = "humantime_serde")]
    pub az_round_trip: Option<Duration>,
    /// How often the leader sends heartbeats; openraft 0.9 also gives every
    /// append-entries message this long to be answered.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// A follower that hears no leader starts an election after
    /// `election_timeout_max` (openraft's leader lease) plus a random time
    /// in `[election_timeout_min, election_timeout_max)` chosen at start.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Option<Duration>,
    /// Build a snapshot about every this many entries; the nodes of a
    /// region build theirs a third of it apart (`storage::compaction`).
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log below the snapshot, so briefly lagging
    /// followers catch up from the log instead of a snapshot.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            az_round_trip: None,
            heartbeat_interval: None,
            election_timeout_min: None,
            election_timeout_max: None,
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 1_000,
        }
    }
}

/// The round trip between AZs assumed when neither the config nor the
/// simulated latency gives one: about what AZs of one cloud region measure.
pub const AZ_ROUND_TRIP_DEFAULT: Duration = Duration::from_millis(2);

/// Shortest derived heartbeat interval. openraft 0.9 gives every
/// append-entries message one heartbeat interval to be answered, and the
/// answer waits for the follower's fsync: 40 ms holds a round trip and an
/// fsync on a busy disk; shorter would cut large writes into ever smaller
/// messages for no gain in failover.
pub const HEARTBEAT_MIN: Duration = Duration::from_millis(40);

/// Longest Raft timing (and AZ round trip) a config may give: beyond it a
/// region would take minutes to notice a dead leader.
pub const RAFT_TIMING_MAX: Duration = Duration::from_secs(60);

/// Longest AZ round trip a config may give: the timings derived from it
/// stay within `RAFT_TIMING_MAX`.
pub const AZ_ROUND_TRIP_MAX: Duration = Duration::from_secs(1);

/// The Raft timings a node runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

impl RaftConfig {
    /// The timings: each one given is used as given; the others are
    /// derived from the AZ round trip `rtt`:
    ///
    /// - heartbeat = max(4 x rtt, `HEARTBEAT_MIN`): every append-entries
    ///   message must cross the link twice and be fsynced within one
    ///   heartbeat (openraft's timeout for it), with room for a slow fsync.
    /// - election_timeout_max = 5 heartbeats: openraft's leader lease, the
    ///   silence every follower waits out before it even considers an
    ///   election. openraft checks its timers every 1.5 heartbeat intervals,
    ///   so an idle leader's heartbeats arrive every 60 ms (at 40 ms) and a
    ///   follower campaigns after max + a random [min, max): 280 to 400 ms of
    ///   silence, more than four heartbeats lost in a row, which a busy CPU
    ///   does not do (see the test `a_loaded_region_keeps_its_leader_and_term`).
    ///   A leader whose disk stalls does lose its place: once one log write
    ///   has taken 250 ms it sends its followers nothing until it lands
    ///   (`network::SYNC_STALL`), so a stall of about 0.53-0.65 s costs it.
    /// - election_timeout_min = 2 heartbeats: openraft also gives a vote
    ///   request this long, and a voter fsyncs its vote before it answers;
    ///   the random part [min, max) spans two timer checks, so the two
    ///   followers of a dead leader rarely campaign at the same check (a
    ///   split vote costs another timeout). A dead leader is replaced in
    ///   about 0.3 to 0.4 s instead of 0.9 to 1.2 s; when the follower that
    ///   campaigns first lacks an entry the other holds, the other takes
    ///   over at once (`crate::takeover`).
    ///
    /// Every timing is whole milliseconds, as openraft counts them.
    pub fn timing(&self, simulated_cross_az: Duration) -> RaftTiming {
        let rtt = self.az_round_trip.unwrap_or(if simulated_cross_az.is_zero() {
            AZ_ROUND_TRIP_DEFAULT
        } else {
            simulated_cross_az.saturating_mul(2)
        });
        let heartbeat = self.heartbeat_interval.unwrap_or_else(|| rtt.saturating_mul(4).max(HEARTBEAT_MIN));
        let ms = |d: Duration| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let heartbeat = ms(heartbeat);
        let min = ms(self.election_timeout_min.unwrap_or(heartbeat.saturating_mul(2)));
        let max =
            ms(self.election_timeout_max.unwrap_or(heartbeat.saturating_mul(5).max(min.saturating_add(heartbeat))));
        RaftTiming { heartbeat_interval: heartbeat, election_timeout_min: min, election_timeout_max: max }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            region: "local".into(),
            az: "local-a".into(),
            data_dir: PathBuf::from("nines-data"),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            grpc_advertise: String::new(),
            admin_advertise: String::new(),
            peer_advertise: String::new(),
            raft: RaftConfig::default(),
            clock_offset_max: Duration::from_millis(500),
            write_timeout: Duration::from_secs(10),
            log_format: "text".into(),
            runtime_threads: 0,
            cluster: ClusterConfig::default(),
            replication: ReplicationConfig::default(),
            latency: LatencyConfig::default(),
            storage: StorageConfig::default(),
            backup: BackupConfig::default(),
            tls: None,
            admin_token_file: None,
            insecure: false,
            fault_injection: false,
            planted_bug_local_reads: false,
        }
    }
}

/// Most runtime worker threads: far beyond any machine's cores; a larger
/// number is a typo.
pub const RUNTIME_THREADS_MAX: usize = 1024;

/// Smallest storage cache: below a few MiB the engine rereads its own
/// index pages on every request.
pub const STORAGE_CACHE_MIN: u64 = 4 * 1024 * 1024;

/// Largest storage cache: 64 GiB, beyond any machine this runs on; a larger
/// number is a typo.
pub const STORAGE_CACHE_MAX: u64 = 64 * 1024 * 1024 * 1024;

/// A configuration that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Whether a region or AZ label may hold `c`: ASCII letters, digits, '-'
/// and '_'.
pub fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

impl NodeConfig {
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "must not be 0 (0 means \"no node\" in status output)"));
        }
        for (field, label) in [("region", &self.region), ("az", &self.az)] {
            if label.is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
            if label.len() > LABEL_BYTES_MAX {
                return Err(invalid(
                    field,
                    format!("is {} bytes; limit LABEL_BYTES_MAX is {LABEL_BYTES_MAX}", label.len()),
                ));
            }
            if !label.chars().all(is_label_char) {
                return Err(invalid(field, format!("{label:?} may hold only ASCII letters, digits, '-' and '_'")));
            }
        }
        if self.runtime_threads > RUNTIME_THREADS_MAX {
            return Err(invalid(
                "runtime_threads",
                format!(
                    "is {}; limit RUNTIME_THREADS_MAX is {RUNTIME_THREADS_MAX} (0 means one per core)",
                    self.runtime_threads
                ),
            ));
        }
        let max_rpo = self.replication.max_rpo;
        if !max_rpo.is_zero() && max_rpo < MAX_RPO_MIN {
            return Err(invalid(
                "replication.max_rpo",
                format!("is {max_rpo:?}; at least MAX_RPO_MIN ({MAX_RPO_MIN:?}), or 0s for no guard"),
            ));
        }
        let b = &self.backup;
        if !b.target.is_empty() {
            if !b.target.starts_with("file:///") && !b.target.starts_with("s3://") {
                return Err(invalid(
                    "backup.target",
                    format!("{:?}: use file:///absolute/dir or s3://bucket/prefix", b.target),
                ));
            }
            if b.every < BACKUP_EVERY_MIN {
                return Err(invalid(
                    "backup.every",
                    format!("is {:?}; at least BACKUP_EVERY_MIN ({BACKUP_EVERY_MIN:?})", b.every),
                ));
            }
            if !b.archive_every.is_zero() && b.archive_every < ARCHIVE_EVERY_MIN {
                return Err(invalid(
                    "backup.archive_every",
                    format!(
                        "is {:?}; at least ARCHIVE_EVERY_MIN ({ARCHIVE_EVERY_MIN:?}), or 0s for no archive",
                        b.archive_every
                    ),
                ));
            }
            if b.keep == Some(0) {
                return Err(invalid("backup.keep", "must be at least 1 (leave it out to keep every backup)"));
            }
        }
        let r = &self.raft;
        let t = r.timing(self.latency.cross_az);
        if r.az_round_trip.is_some_and(|d| d.is_zero() || d > AZ_ROUND_TRIP_MAX) {
            return Err(invalid(
                "raft.az_round_trip",
                format!("must be between 0 and {AZ_ROUND_TRIP_MAX:?} (leave it out for the default)"),
            ));
        }
        // openraft counts in whole milliseconds.
        for (field, d) in [
            ("raft.heartbeat_interval", t.heartbeat_interval),
            ("raft.election_timeout_min", t.election_timeout_min),
            ("raft.election_timeout_max", t.election_timeout_max),
        ] {
            if d < Duration::from_millis(1) || d > RAFT_TIMING_MAX {
                return Err(invalid(field, format!("is {d:?}; it must be between 1ms and {RAFT_TIMING_MAX:?}")));
            }
        }
        // Each timing must exceed the one before it.
        for ((field, d), (below, b)) in [
            (("raft.election_timeout_min", t.election_timeout_min), ("raft.heartbeat_interval", t.heartbeat_interval)),
            (
                ("raft.election_timeout_max", t.election_timeout_max),
                ("raft.election_timeout_min", t.election_timeout_min),
            ),
        ] {
            if d <= b {
                return Err(invalid(field, format!("is {d:?}; it must be greater than {below} ({b:?})")));
            }
        }
        if self.planted_bug_local_reads && !self.fault_injection {
            return Err(invalid(
                "planted_bug_local_reads",
                "is a test-only bug and needs fault_injection = true; never set it outside the fault harness",
            ));
        }
        if self.storage.power_loss_simulation && !self.fault_injection {
            return Err(invalid(
                "storage.power_loss_simulation",
                "is a test-only mode that loses unsynced data on purpose and needs fault_injection = true",
            ));
        }
        if self.storage.cache_size < STORAGE_CACHE_MIN || self.storage.cache_size > STORAGE_CACHE_MAX {
            return Err(invalid(
                "storage.cache_size",
                format!(
                    "is {}; it must be between {} and {}",
                    bytes_serde::format(self.storage.cache_size),
                    bytes_serde::format(STORAGE_CACHE_MIN),
                    bytes_serde::format(STORAGE_CACHE_MAX)
                ),
            ));
        }
        if r.snapshot_logs_since_last == 0 {
            return Err(invalid("raft.snapshot_logs_since_last", "must be greater than 0"));
        }
        if self.cluster.lease < LEASE_MIN {
            return Err(invalid("cluster.lease", format!("must be at least {LEASE_MIN:?}")));
        }
        if self.write_timeout.is_zero() {
            return Err(invalid("write_timeout", "must be greater than 0"));
        }
        match (&self.tls, self.insecure) {
            (None, false) => {
                return Err(invalid(
                    "tls",
                    "is missing: give [tls] ca, cert and key (`nines certs create` makes them), or set \
                     insecure = true (or --insecure) to run plaintext with no authentication",
                ));
            }
            (Some(_), true) => return Err(invalid("insecure", "is true while [tls] is given: choose one")),
            _ => {}
        }
        // A node with [tls] speaks only https, one without only http: every
        // gRPC URL it advertises or dials must be one of its scheme (which
        // also makes it a URL).
        let (scheme, why) =
            if self.tls.is_some() { ("https://", "this node has [tls]") } else { ("http://", "this node is insecure") };
        let advertised = [("grpc_advertise", &self.grpc_advertise), ("peer_advertise", &self.peer_advertise)]
            .into_iter()
            .filter(|(_, u)| !u.is_empty());
        let authority = self.cluster.authority.iter().map(|e| ("cluster.authority", e));
        let regions = self
            .cluster
            .regions
            .iter()
            .flat_map(|r| r.endpoints.iter().chain(&r.peer_endpoints).map(|e| ("cluster.regions", e)));
        if let Some((field, url)) = advertised.chain(authority).chain(regions).find(|(_, u)| !u.starts_with(scheme)) {
            return Err(invalid(field, format!("{url:?} must be a {scheme} URL: {why}")));
        }
        // A node that tells clients where it is (listening on 0.0.0.0, in a
        // container) must tell its peers too: the bound peer address would
        // lead them nowhere, or back to themselves.
        if !self.grpc_advertise.is_empty() && self.peer_advertise.is_empty() {
            return Err(invalid(
                "peer_advertise",
                "is missing while grpc_advertise is set: give the peer URL other nodes reach this node at \
                 (e.g. http://us-east-1:9001)",
            ));
        }
        let admin = &self.admin_advertise;
        if !(admin.is_empty() || admin.starts_with("http://") || admin.starts_with("https://")) {
            return Err(invalid("admin_advertise", format!("{admin:?} must be a URL such as http://nines-1:8001")));
        }
        let regions = &self.cluster.regions;
        if !regions.is_empty() {
            let mut names = std::collections::BTreeSet::new();
            for r in regions {
                if !names.insert(r.name.as_str()) {
                    return Err(invalid("cluster.regions", format!("region {:?} is listed twice", r.name)));
                }
                if r.endpoints.is_empty() {
                    return Err(invalid("cluster.regions", format!("region {:?} has no endpoints", r.name)));
                }
                if r.peer_endpoints.is_empty() && r.name != self.region {
                    return Err(invalid(
                        "cluster.regions",
                        format!("region {:?} has no peer_endpoints: shipments to it need its nodes' peer URLs", r.name),
                    ));
                }
            }
            if !names.contains(self.region.as_str()) {
                return Err(invalid("cluster.regions", format!("does not list this node's region {:?}", self.region)));
            }
        }
        if self.cluster.mode == Mode::ActivePassive && !regions.iter().any(|r| r.name == self.cluster.primary) {
            return Err(invalid(
                "cluster.primary",
                format!("{:?} must name one of cluster.regions in active-passive mode", self.cluster.primary),
            ));
        }
        if self.log_format != "text" && self.log_format != "json" {
            return Err(invalid("log_format", format!("{:?} is neither \"text\" nor \"json\"", self.log_format)));
        }
        Ok(())
    }

    /// The openraft configuration this node runs with.
    pub fn openraft(&self) -> Result<openraft::Config, ConfigError> {
        let ms = |d: Duration| d.as_millis() as u64;
        let t = self.raft.timing(self.latency.cross_az);
        let c = openraft::Config {
            cluster_name: format!("nines-{}", self.region),
            heartbeat_interval: ms(t.heartbeat_interval),
            election_timeout_min: ms(t.election_timeout_min),
            election_timeout_max: ms(t.election_timeout_max),
            // Each node snapshots at its own phase (`storage::compaction`),
            // not all at the same index as openraft's own policy would.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.raft.logs_kept_after_snapshot,
            max_payload_entries: crate::limits::RAFT_PAYLOAD_ENTRIES_MAX,
            snapshot_max_chunk_size: crate::limits::SNAPSHOT_CHUNK_BYTES_MAX,
            ..Default::default()
        };
        c.validate().map_err(|e| invalid("raft", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        for (text, want) in
            [("64MiB", 64 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30), ("4096", 4096), ("2MB", 2_000_000)]
        {
            assert_eq!(bytes_serde::parse(text), Ok(want), "{text}");
            assert_eq!(bytes_serde::parse(&bytes_serde::format(want)), Ok(want), "{text} formatted");
        }
        for bad in ["", "MiB", "12 parsecs", "99999999999999GiB"] {
            assert!(bytes_serde::parse(bad).is_err(), "{bad}");
        }
        let e = NodeConfig::from_toml("[storage]\ncache_size = \"12 furlongs\"", std::path::Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("furlongs"), "{e}");
    }

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nines.example.toml");
        let c = NodeConfig::load(&path).expect("example parses");
        assert_eq!(c, NodeConfig::default(), "the example must document the defaults");
        let e = c.validate().expect_err("the defaults choose neither TLS nor insecure").to_string();
        assert!(e.contains("`tls`") && e.contains("insecure = true"), "{e}");
        let c = NodeConfig { insecure: true, ..c };
        c.validate().expect("defaults are valid once insecure is chosen");
        c.openraft().expect("defaults make a valid openraft config");
    }

    #[test]
    fn latency_is_chosen_by_geography() {
        let l = LatencyConfig {
            same_az: Duration::from_millis(0),
            cross_az: Duration::from_millis(1),
            cross_region: Duration::from_millis(40),
            region_pairs: vec![RegionPairLatency {
                a: "us".into(),
                b: "ap".into(),
                latency: Duration::from_millis(90),
            }],
        };
        let table = [
            (("us", "us-a", "us", "us-a"), 0),
            (("us", "us-a", "us", "us-b"), 1),
            (("us", "us-a", "eu", "eu-a"), 40),
            (("ap", "ap-a", "us", "us-c"), 90),
        ];
        for ((fr, fa, tr, ta), ms) in table {
            assert_eq!(l.between(fr, fa, tr, ta), Duration::from_millis(ms), "{fr}/{fa} -> {tr}/{ta}");
        }
    }

    #[test]
    fn durations_read_like_people_write_them() {
        let c = NodeConfig::from_toml(
            "write_timeout = \"2s 500ms\"\n[raft]\nheartbeat_interval = \"50ms\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.write_timeout, Duration::from_millis(2500));
        assert_eq!(c.raft.heartbeat_interval, Some(Duration::from_millis(50)));
    }

    #[test]
    fn raft_timings_follow_the_az_round_trip() {
        let ms = Duration::from_millis;
        let timing = |text: &str, cross_az: u64| {
            let c = NodeConfig::from_toml(text, std::path::Path::new("t.toml")).unwrap();
            let t = c.raft.timing(ms(cross_az));
            (t.heartbeat_interval, t.election_timeout_min, t.election_timeout_max)
        };
        // A LAN-like round trip: the heartbeat floor rules.
        assert_eq!(timing("", 0), (ms(40), ms(80), ms(200)));
        assert_eq!(timing("", 1), (ms(40), ms(80), ms(200)));
        // A slow link between AZs, given or simulated, scales every timing.
        assert_eq!(timing("[raft]\naz_round_trip = \"20ms\"", 0), (ms(80), ms(160), ms(400)));
        assert_eq!(timing("", 15), (ms(120), ms(240), ms(600)));
        // What is given is kept; the rest follows from it.
        assert_eq!(timing("[raft]\nheartbeat_interval = \"100ms\"", 0), (ms(100), ms(200), ms(500)));
        // Whole milliseconds, as openraft counts them.
        assert_eq!(timing("[raft]\nheartbeat_interval = \"1ms 600us\"", 0), (ms(1), ms(2), ms(5)));
        // A given minimum near five heartbeats still leaves the maximum a
        // heartbeat above it.
        assert_eq!(timing("[raft]\nelection_timeout_min = \"300ms\"", 0), (ms(40), ms(300), ms(340)));
        assert_eq!(
            timing("[raft]\nelection_timeout_min = \"300ms\"\nelection_timeout_max = \"600ms\"", 0),
            (ms(40), ms(300), ms(600))
        );
    }

    #[test]
    fn errors_name_the_field() {
        let table: &[(&str, &str)] = &[
            ("id = 0", "`id`"),
            ("region = \"\"", "`region`"),
            ("az = \"a b\"", "`az`"),
            ("[raft]\nelection_timeout_min = \"40ms\"", "`raft.election_timeout_min`"),
            ("[raft]\nelection_timeout_max = \"80ms\"", "`raft.election_timeout_max`"),
            ("[raft]\naz_round_trip = \"0s\"", "`raft.az_round_trip`"),
            ("[raft]\naz_round_trip = \"2s\"", "`raft.az_round_trip`"),
            ("[raft]\nheartbeat_interval = \"500us\"", "`raft.heartbeat_interval`"),
            ("log_format = \"xml\"", "`log_format`"),
            ("planted_bug_local_reads = true", "`planted_bug_local_reads`"),
            ("runtime_threads = 100000", "`runtime_threads`"),
            ("[cluster]\nmode = \"active-passive\"", "`cluster.primary`"),
            ("[[cluster.regions]]\nname = \"other\"\nendpoints = [\"http://h:1\"]", "`cluster.regions`"),
            ("[[cluster.regions]]\nname = \"local\"\nendpoints = [\"h:1\"]", "`cluster.regions`"),
            (
                "[[cluster.regions]]\nname = \"local\"\nendpoints = [\"http://h:1\"]\n\
                 [[cluster.regions]]\nname = \"b\"\nendpoints = [\"http://h:2\"]",
                "has no peer_endpoints",
            ),
            (
                "[[cluster.regions]]\nname = \"local\"\nendpoints = [\"http://h:1\"]\n\
                 [[cluster.regions]]\nname = \"b\"\nendpoints = [\"http://h:2\"]\npeer_endpoints = [\"h:3\"]",
                "`cluster.regions`",
            ),
        ];
        for (text, field) in table {
            let c = NodeConfig::from_toml(&format!("insecure = true\n{text}"), std::path::Path::new("t.toml")).unwrap();
            let err = c.validate().expect_err(text).to_string();
            assert!(err.contains(field), "{text}: error {err:?} does not name {field}");
        }
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n-key.pem\"";
        for (text, field) in [
            ("", "`tls`"),
            (&format!("insecure = true\n{tls}") as &str, "`insecure`"),
            (&format!("grpc_advertise = \"http://n:1\"\n{tls}"), "`grpc_advertise`"),
            (&format!("peer_advertise = \"http://n:2\"\n{tls}"), "`peer_advertise`"),
            (&format!("grpc_advertise = \"https://n:1\"\n{tls}"), "is missing while grpc_advertise is set"),
        ] {
            let c = NodeConfig::from_toml(text, std::path::Path::new("t.toml")).unwrap();
            let err = c.validate().expect_err(text).to_string();
            assert!(err.contains(field), "{text}: error {err:?} does not name {field}");
        }
        let c = NodeConfig::from_toml(tls, std::path::Path::new("t.toml")).unwrap();
        c.validate().expect("TLS without insecure is valid");
        let urls = c.listen_urls();
        assert_eq!(
            (urls.grpc.as_str(), urls.peer.as_str(), urls.admin.as_str()),
            ("https://127.0.0.1:7001", "https://127.0.0.1:9001", "http://127.0.0.1:8001"),
            "a TLS node advertises https on both gRPC ports"
        );
        let err = NodeConfig::from_toml("write_timeout = \"soon\"", std::path::Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("write_timeout"), "{err}");
        let err = NodeConfig::from_toml("[cluster]\nmode = \"both\"", std::path::Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
        let err = NodeConfig::from_toml("colour = 1", std::path::Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
