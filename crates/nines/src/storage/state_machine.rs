//! The key-value state machine in `state.redb` (openraft's
//! `RaftStateMachine`), its cross-region changefeed, and its snapshots.
//!
//! Layout: table `data` maps a key to its stored value or tombstone,
//! `changefeed` a version index to a write waiting to be shipped,
//! `divergent` a sequence number to a divergence record, `archive` a
//! version index to a local write waiting for the continuous archive, and
//! `meta` holds the applied log id, the membership, the region state and
//! the archive's state, and `sessions` a client id to its session (see
//! [`super::session`]). Every value is
//! a checksummed [`record`].
//!
//! Invariants:
//! - One `apply` call writes all its entries' effects and the new applied
//!   log id in one redb transaction, so the state in the file always matches
//!   some applied index exactly.
//! - Reads see one consistent state: every read (a get, a whole scan page, a
//!   changefeed page) runs in one read transaction, so a scan never shows a
//!   write without every write applied before it.
//! - Applying is deterministic: every replica computes the same versions,
//!   changefeed and roles from the same log. The [`ReplicationSetup`] it
//!   applies by is replicated state (`Command::Configure`), not a node's
//!   file; until it is applied, nothing that depends on it applies (local
//!   writes and shipments are refused, retry-safe).
//! - Replicated input is checked at apply time and refused as a failed
//!   command (a batch over `WRITES_PER_ENTRY_MAX`, an epoch over
//!   `EPOCH_MAX`, a shipment from a region that is not a peer), never
//!   asserted: a bad entry in the log cannot crash-loop the region.
//! - A local write's HLC is raised above the version it replaces, so the
//!   versions of a key only grow.
//! - Remote writes apply last-writer-wins on `(hlc, origin region)`, each at
//!   most once: per origin, the highest applied origin index is stored with
//!   the data, and entries at or below it are skipped.
//! - Only writes that originated in this region enter the changefeed, so
//!   replicated writes are never shipped again.
//! - A tombstone of a local delete is dropped only once every peer region
//!   has applied it and this region holds every peer write that could be
//!   older (see `StateMachine::ack_shipped`).
//! - In active-passive mode, local writes apply only in the primary region
//!   while it is not fenced; the check is made at apply time, in log order,
//!   so no write slips in after a fence.
//! - The log is purged only up to what the state machine made durable
//!   ([`DurableApplied`]): applies commit without an fsync of their own (the
//!   log is durable, and openraft re-applies after a crash), a durable commit
//!   follows every `DURABLE_COMMIT_INTERVAL`, and a purge asks for one.
//! - A snapshot is streamed from a read transaction to a file while applies
//!   go on, and installed through staging tables in bounded batches that one
//!   final transaction switches in: a crash during an install leaves the old
//!   state whole (and the staging tables are dropped at the next open).
//! - An entry is applied only once this node's log holds it synced
//!   ([`LogSynced`]): a leader's own appends are acknowledged to openraft
//!   before their sync, so openraft may hand over an entry it counted
//!   committed before the leader holds it durably. The apply waits (the
//!   leader's client, its reads and this state are then not ahead of its
//!   disk); an entry never appended to this log would wait for good, which
//!   is why the storage conformance suite runs without the wait.
//! - A failure to apply a committed entry is returned to openraft, which
//!   stops the node: the replica can no longer be trusted.
//!
//! Caveats:
//! - Tombstones of remote deletes are kept; collecting them safely needs
//!   every region's acknowledgement, which is future work.
//! - A demoted primary's divergent writes are recorded and then overwritten
//!   with the new primary's values by a `Resync` its leader proposes; if that
//!   leader crashes first, those keys keep the divergent value until the new
//!   primary writes them again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::log_store::LogSynced;
use super::session::{self, Lookup, SessionRecord};
use super::snapshot::{self, Item, SnapshotError};
use super::{FileBackend, record};
use crate::config::Mode;
use crate::hlc::{Hlc, HlcClock};
use crate::limits::{
    ACK_HISTORY_MAX, EPOCH_MAX, SESSION_IDLE_MS, SESSION_SWEEP_MS, SNAPSHOT_INSTALL_BATCH_BYTES, WRITES_PER_ENTRY_MAX,
};
use crate::types::{
    Command, CommandResult, Entry, Expected, LogId, RemoteEntry, ReplicationSetup, ResyncEntry, SessionResult,
    SessionTag, Snapshot, SnapshotMeta, StorageError, StoredMembership, StoredValue, SyncEntry, TypeConfig, Version,
    wins_epoch_tie,
};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const CHANGEFEED: TableDefinition<u64, &[u8]> = TableDefinition::new("changefeed");
const DIVERGENT: TableDefinition<u64, &[u8]> = TableDefinition::new("divergent");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ARCHIVE: TableDefinition<u64, &[u8]> = TableDefinition::new("archive");
/// A client id to its [`SessionRecord`].
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

/// Where a snapshot is installed before it is switched in.
const DATA_NEXT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data.installing");
const CHANGEFEED_NEXT: TableDefinition<u64, &[u8]> = TableDefinition::new("changefeed.installing");
const DIVERGENT_NEXT: TableDefinition<u64, &[u8]> = TableDefinition::new("divergent.installing");
const ARCHIVE_NEXT: TableDefinition<u64, &[u8]> = TableDefinition::new("archive.installing");
const SESSIONS_NEXT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions.installing");

const APPLIED_KEY: &str = "applied";
const MEMBERSHIP_KEY: &str = "membership";
const REGION_KEY: &str = "region";
const ARCHIVE_KEY: &str = "archive";
const SESSION_CLOCK_KEY: &str = "session_clock";

/// The file of the state machine inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// How often an apply commits durably (fsync) although nothing asks: bounds
/// how much a restart re-applies from the log. Purges ask for a durable
/// commit anyway (see [`DurableApplied`]).
const DURABLE_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::new(&e)).into()
}

fn snapshot_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, openraft::AnyError::new(&e)).into()
}

fn read_err(e: impl Into<redb::Error>) -> StorageError {
    sm_err(ErrorVerb::Read, e.into())
}

fn write_err(e: impl Into<redb::Error>) -> StorageError {
    sm_err(ErrorVerb::Write, e.into())
}

/// Region roles and replication progress, replicated through Raft.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// The primary region as of `epoch`; empty at epoch 0 (the configured
    /// initial primary applies).
    pub primary: String,
    pub epoch: u64,
    /// The primary stopped taking writes for a planned switchover.
    /// The primary refuses local writes stamped before this HLC time (ms),
    /// for a planned switchover; 0: not fenced. A fence expires by itself.
    pub fenced_until_ms: u64,
    /// Per origin region: the highest origin index applied here.
    pub applied_from: BTreeMap<String, u64>,
    /// Per origin region: remote writes applied here, each counted once.
    pub applied_total: BTreeMap<String, u64>,
    /// Per peer region: the highest changefeed index it has applied.
    pub acked: BTreeMap<String, u64>,
    /// Per peer region: the acknowledgements that still matter for
    /// collecting tombstones, oldest first, as `(changefeed index the peer
    /// had applied, the peer's latest own write when it said so)`. At most
    /// `ACK_HISTORY_MAX` per peer (the oldest are dropped first, which only
    /// delays collection).
    pub ack_history: BTreeMap<String, Vec<(u64, u64)>>,
    /// Every tombstone of the changefeed at or below this index has been
    /// collected (or was no longer current); collection resumes above it.
    pub tombstones_collected_through: u64,
    /// Per origin region: every write of it through this index is applied here.
    pub complete_from: BTreeMap<String, u64>,
    /// Divergence records written so far.
    pub divergent_total: u64,
    /// Divergent keys still wait for the new primary's values.
    pub resync_pending: bool,
    /// The log index of the latest write that originated here.
    pub last_local_write: u64,
    /// The greatest timestamp of a write that originated here: a restarted
    /// node's clock starts from it (within the maximum offset).
    pub hlc_high: Hlc,
    /// The replicated setup; `None` until the region's first leader
    /// proposed it. Local writes and shipments wait for it.
    pub setup: Option<ReplicationSetup>,
    /// Regions rebuilding this one by a full sync (it lost writes they had
    /// shipped): until each finishes, this region is never promoted.
    pub full_sync_from: BTreeSet<String>,
}

/// A write that originated here, waiting to be shipped to peer regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `None` is a delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub hlc: Hlc,
}

/// A local write kept for the continuous archive until it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The write as stored (a tombstone for a delete).
    pub value: StoredValue,
}

/// Whether local writes are archived, since when, and how far the archive
/// has been stored (replicated through `Command::Archived`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveState {
    pub on: bool,
    /// The log index of the entry that turned archiving on: every local
    /// write after it is archived (until it is turned off).
    pub since: u64,
    /// Every archived write at or below this version index is stored.
    pub through: u64,
}

/// Archive entries, and whether they are all there are.
pub type ArchivePage = (Vec<(u64, ArchiveRecord)>, bool);

/// A write this region acknowledged as primary that never reached the
/// primary that replaced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergentRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub version: Version,
    pub demoted_at_epoch: u64,
}

/// Key-value pairs of a scan page, and whether more remain.
pub type ScanPage = (Vec<(Vec<u8>, StoredValue)>, bool);

/// Changefeed entries, and whether they are all there are.
pub type ChangefeedPage = (Vec<(u64, ChangeRecord)>, bool);

/// Divergence records, and the sequence number of the next one if any.
pub type DivergentPage = (Vec<DivergentRecord>, Option<u64>);

/// Why a read of the state failed: the store could not be read, or a record
/// is corrupt.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("storage read failed: {0}")]
    Io(#[from] redb::Error),
    #[error("corrupt record for key {key:?}: {source}")]
    Corrupt { key: Vec<u8>, source: record::RecordError },
}

impl From<redb::TransactionError> for ReadError {
    fn from(e: redb::TransactionError) -> Self {
        ReadError::Io(e.into())
    }
}

impl From<redb::TableError> for ReadError {
    fn from(e: redb::TableError) -> Self {
        ReadError::Io(e.into())
    }
}

impl From<redb::StorageError> for ReadError {
    fn from(e: redb::StorageError) -> Self {
        ReadError::Io(e.into())
    }
}

fn decode_at<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, ReadError> {
    record::decode(bytes).map_err(|source| ReadError::Corrupt { key: key.to_vec(), source })
}

/// The whole state at one applied log id (see
/// [`StateReader::consistent_view`]).
pub struct StateView {
    txn: ReadTransaction,
    pub applied: Option<LogId>,
    pub region: RegionState,
}

impl StateView {
    /// Every key with its value or tombstone, in key order, handed to
    /// `each` until it returns false.
    pub fn each_stored(&self, mut each: impl FnMut(Vec<u8>, StoredValue) -> bool) -> Result<(), ReadError> {
        let table = self.txn.open_table(DATA)?;
        for item in table.iter()? {
            let (k, v) = item?;
            let key = k.value().to_vec();
            let stored: StoredValue = decode_at(&key, v.value())?;
            if !each(key, stored) {
                break;
            }
        }
        Ok(())
    }
}

/// A read-only view of the state machine for serving reads. Cloning shares it.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
    applied: Arc<AtomicU64>,
    /// Changefeed entries currently kept (not yet applied by every peer).
    changefeed_len: Arc<AtomicU64>,
    /// `std::sync::RwLock`: held only to clone or replace, never across `.await`.
    region: Arc<RwLock<RegionState>>,
    archive: Arc<RwLock<ArchiveState>>,
    /// The region's latest local write, as published.
    local_writes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateReader {
    /// Follows the region's latest local write (the log index), changing
    /// once each applied batch with a local write is published: what a
    /// shipper waits on.
    pub fn local_writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_writes.subscribe()
    }

    /// The highest origin index of `origin`'s writes applied here, without
    /// copying the region state.
    pub fn applied_from(&self, origin: &str) -> u64 {
        self.region_ref().applied_from.get(origin).copied().unwrap_or(0)
    }

    /// The log index the state reflects at least.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn region_state(&self) -> RegionState {
        self.region_ref().clone()
    }

    /// The region state without copying it (the acknowledgement history
    /// can be long, and every write looks here).
    fn region_ref(&self) -> std::sync::RwLockReadGuard<'_, RegionState> {
        self.region.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The primary region (active-passive), taking the configured one at
    /// epoch 0; empty before the setup is replicated.
    pub fn primary(&self) -> String {
        let state = self.region_ref();
        state.setup.as_ref().map(|s| effective_primary(s, &state)).unwrap_or_default()
    }

    /// The replicated setup, once the region has one.
    pub fn setup(&self) -> Option<ReplicationSetup> {
        self.region_ref().setup.clone()
    }

    /// The region's role as of now, without copying the region state:
    /// (primary, epoch, fenced until (HLC ms; a time past, or 0, is no
    /// fence), divergent writes recorded ever). The primary is empty before the setup is
    /// replicated or in active-active mode.
    pub fn role_summary(&self) -> (String, u64, u64, u64) {
        let state = self.region_ref();
        let primary = match &state.setup {
            Some(setup) if setup.mode == crate::config::Mode::ActivePassive => effective_primary(setup, &state),
            _ => String::new(),
        };
        (primary, state.epoch, state.fenced_until_ms, state.divergent_total)
    }

    /// Until when (HLC milliseconds) the region is fenced; 0: not fenced.
    pub fn fenced_until_ms(&self) -> u64 {
        self.region_ref().fenced_until_ms
    }

    /// Why a local write would be refused now, if it would: (reason, retry later).
    pub fn write_refusal(&self) -> Option<(String, bool)> {
        use crate::hlc::PhysicalClock;
        let state = self.region_ref();
        match &state.setup {
            Some(setup) => write_refusal(setup, &state, crate::hlc::WallClock.now_ms()),
            None => Some((NOT_CONFIGURED.into(), true)),
        }
    }

    pub fn changefeed_len(&self) -> u64 {
        self.changefeed_len.load(Ordering::Acquire)
    }

    /// The continuous archive's state.
    pub fn archive_state(&self) -> ArchiveState {
        *self.archive.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Archive entries above `after`, at most `limit` or `bytes_max` of keys
    /// and values (at least one). The flag says whether these are all.
    pub fn archive_after(&self, after: u64, limit: usize, bytes_max: usize) -> Result<ArchivePage, ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ARCHIVE)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table.range(after.saturating_add(1)..)? {
            let (k, v) = item?;
            let index = k.value();
            let rec: ArchiveRecord = decode_at(&index.to_be_bytes(), v.value())?;
            let size = rec.key.len() + rec.value.value.as_ref().map_or(0, Vec::len);
            if out.len() >= limit || (bytes > 0 && bytes + size > bytes_max) {
                return Ok((out, false));
            }
            bytes += size;
            out.push((index, rec));
        }
        Ok((out, true))
    }

    /// The stored value or tombstone of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DATA)?;
        let found = table.get(key)?;
        found.map(|v| decode_at(key, v.value())).transpose()
    }

    /// Live values with keys in `[start, end)` (`end` empty: no upper bound),
    /// in key order, from one consistent state. Stops after `limit` values
    /// or once keys and values reach `bytes_max`; the flag says whether more
    /// remain.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize, bytes_max: usize) -> Result<ScanPage, ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DATA)?;
        let range = if end.is_empty() { table.range(start..)? } else { table.range(start..end)? };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in range {
            let (k, v) = item?;
            let key = k.value().to_vec();
            let stored: StoredValue = decode_at(&key, v.value())?;
            let Some(value) = stored.live() else { continue };
            if out.len() >= limit || (bytes > 0 && bytes + key.len() + value.len() > bytes_max) {
                return Ok((out, true));
            }
            bytes += key.len() + value.len();
            out.push((key, stored));
        }
        Ok((out, false))
    }

    /// One consistent state for a backup: a read transaction with the
    /// applied log id and region state it holds. Applies go on meanwhile;
    /// the view keeps its state until dropped.
    pub fn consistent_view(&self) -> Result<StateView, ReadError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let applied = match meta.get(APPLIED_KEY)? {
            Some(v) => decode_at::<Option<LogId>>(APPLIED_KEY.as_bytes(), v.value())?,
            None => None,
        };
        let region = match meta.get(REGION_KEY)? {
            Some(v) => decode_at(REGION_KEY.as_bytes(), v.value())?,
            None => RegionState::default(),
        };
        drop(meta);
        Ok(StateView { txn, applied, region })
    }

    /// A page of a full sync: every key after `after` (from the first when
    /// `None`), tombstones included, at most `limit` keys or `bytes_max`
    /// of keys and values (at least one). The flag says whether more remain.
    pub fn sync_page(&self, after: Option<&[u8]>, limit: usize, bytes_max: usize) -> Result<ScanPage, ReadError> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DATA)?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table.range::<&[u8]>((start, Bound::Unbounded))? {
            let (k, v) = item?;
            let key = k.value().to_vec();
            let stored: StoredValue = decode_at(&key, v.value())?;
            let size = key.len() + stored.value.as_ref().map_or(0, Vec::len) + stored.version.origin.len();
            if out.len() >= limit || (bytes > 0 && bytes + size > bytes_max) {
                return Ok((out, true));
            }
            bytes += size;
            out.push((key, stored));
        }
        Ok((out, false))
    }

    /// Changefeed entries above `after`, at most `limit` of them or
    /// `bytes_max` of keys and values (at least one). The flag says whether
    /// these are all the entries there are.
    pub fn changefeed_after(&self, after: u64, limit: usize, bytes_max: usize) -> Result<ChangefeedPage, ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHANGEFEED)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in table.range(after.saturating_add(1)..)? {
            let (k, v) = item?;
            let index = k.value();
            let rec: ChangeRecord = decode_at(&index.to_be_bytes(), v.value())?;
            let size = rec.key.len() + rec.value.as_ref().map_or(0, Vec::len);
            if out.len() >= limit || (!out.is_empty() && bytes + size > bytes_max) {
                return Ok((out, false));
            }
            bytes += size;
            out.push((index, rec));
        }
        Ok((out, true))
    }

    /// How many changefeed entries lie above `after`, and the HLC of the
    /// first of them.
    pub fn changefeed_lag(&self, after: u64) -> Result<(u64, Option<Hlc>), ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHANGEFEED)?;
        let mut range = table.range(after.saturating_add(1)..)?;
        let first = match range.next() {
            None => return Ok((0, None)),
            Some(item) => {
                let (k, v) = item?;
                decode_at::<ChangeRecord>(&k.value().to_be_bytes(), v.value())?.hlc
            }
        };
        let mut count = 1;
        for item in range {
            item?;
            count += 1;
        }
        Ok((count, Some(first)))
    }

    /// Divergence records from sequence number `start` on, oldest first: at
    /// most `limit` of them or `bytes_max` of keys and values (at least one).
    /// Also the sequence number to continue from, `None` once all are listed.
    pub fn divergent(&self, start: u64, limit: usize, bytes_max: usize) -> Result<DivergentPage, ReadError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DIVERGENT)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in table.range(start..)? {
            let (k, v) = item?;
            let seq = k.value();
            let rec: DivergentRecord = decode_at(&seq.to_be_bytes(), v.value())?;
            let size = rec.key.len() + rec.value.as_ref().map_or(0, Vec::len);
            if out.len() >= limit || (!out.is_empty() && bytes + size > bytes_max) {
                return Ok((out, Some(seq)));
            }
            bytes += size;
            out.push(rec);
        }
        Ok((out, None))
    }
}

/// The state machine's applied index as far as it is durable, and the way
/// to make more of it durable. The log store purges only below it.
#[derive(Clone)]
pub struct DurableApplied {
    db: Arc<Database>,
    /// The applied index of the latest commit, durable or not.
    committed: Arc<AtomicU64>,
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    /// The highest index a `reach` waits to see durable.
    wanted: Arc<AtomicU64>,
}

/// How often `DurableApplied::reach` looks whether the state machine has
/// applied what it waits for.
const REACH_POLL: Duration = Duration::from_millis(10);

/// How long `DurableApplied::reach` leaves the durable commit to the
/// applies before it makes one itself (the state machine is idle).
const REACH_IDLE: Duration = Duration::from_millis(50);

impl DurableApplied {
    /// Waits until the applied index `index` is durable. The next apply
    /// commits durably (off the runtime's thread). Only when the state
    /// machine, having applied `index`, commits nothing for `REACH_IDLE` and
    /// holds no write transaction does an empty durable commit here persist
    /// every commit before it. (Made here while applies run, it held redb's
    /// write lock through its sync, and the next apply waited for it on the
    /// runtime's thread.)
    pub async fn reach(&self, index: u64) -> Result<(), String> {
        self.want(index);
        // The applied index last seen, and since when.
        let mut seen: Option<(u64, Instant)> = None;
        loop {
            if *self.durable.borrow() >= index {
                return Ok(());
            }
            let committed = self.committed.load(Ordering::Acquire);
            let since = match seen {
                Some((c, t)) if c == committed => t,
                _ => seen.insert((committed, Instant::now())).1,
            };
            if committed >= index && since.elapsed() >= REACH_IDLE {
                let (db, durable) = (self.db.clone(), self.durable.clone());
                let synced = tokio::task::spawn_blocking(move || -> Result<bool, redb::Error> {
                    let txn = match db.try_begin_write() {
                        Ok(txn) => txn,
                        // An apply is under way after all.
                        Err(redb::TransactionError::WouldBlock) => return Ok(false),
                        Err(e) => return Err(e.into()),
                    };
                    if *durable.borrow() >= index {
                        txn.abort()?;
                    } else {
                        txn.commit()?;
                    }
                    Ok(true)
                })
                .await;
                let synced =
                    synced.map_err(|e| format!("durable commit task failed: {e}"))?.map_err(|e| e.to_string())?;
                if synced {
                    self.raise(committed);
                    return Ok(());
                }
                seen = None;
            }
            tokio::time::sleep(REACH_POLL).await;
        }
    }

    /// Asks the next apply that reaches `index` to commit durably.
    fn want(&self, index: u64) {
        self.wanted.fetch_max(index, Ordering::AcqRel);
    }

    /// Whether a commit through `index` should be durable: a `reach` waits
    /// for more than is durable, and this commit gets it there.
    fn wanted_by(&self, index: u64) -> bool {
        let wanted = self.wanted.load(Ordering::Acquire);
        wanted > *self.durable.borrow() && index >= wanted
    }

    fn raise(&self, index: u64) {
        self.durable.send_if_modified(|d| {
            let raise = index > *d;
            if raise {
                *d = index;
            }
            raise
        });
    }
}

/// The highest changefeed index every peer has applied.
fn all_acked(setup: &ReplicationSetup, region: &RegionState) -> u64 {
    setup.peers.iter().map(|p| region.acked.get(p).copied().unwrap_or(0)).min().unwrap_or(0)
}

/// The highest changefeed index through which every tombstone is safe to
/// collect as far as `peer` is concerned: the last acknowledgement of the
/// longest prefix of its history whose peer positions this region holds
/// (see `StateMachine::ack_shipped`).
fn tombstones_safe_through(region: &RegionState, peer: &str) -> u64 {
    let held = region.complete_from.get(peer).copied().unwrap_or(0);
    let history = region.ack_history.get(peer).map(Vec::as_slice).unwrap_or_default();
    history.iter().take_while(|(_, w)| *w <= held).last().map(|(a, _)| *a).unwrap_or(0)
}

/// The version index of write `pos` of the entry at `log_index`: unique
/// within the region and increasing in log order.
pub fn version_index(log_index: u64, pos: u64) -> u64 {
    log_index * WRITES_PER_ENTRY_MAX + pos
}

/// Why nothing that depends on the setup applies yet.
const NOT_CONFIGURED: &str =
    "the region's replication setup is not replicated yet (its first leader proposes it); retry shortly";

fn effective_primary(setup: &ReplicationSetup, state: &RegionState) -> String {
    if state.epoch == 0 { setup.initial_primary.clone() } else { state.primary.clone() }
}

/// Why a local write stamped at `now_ms` (HLC milliseconds) would be
/// refused: (reason, retry later). At apply time `now_ms` is the write's own
/// stamp, so every replica decides the same.
fn write_refusal(setup: &ReplicationSetup, state: &RegionState, now_ms: u64) -> Option<(String, bool)> {
    if setup.mode != Mode::ActivePassive {
        return None;
    }
    let primary = effective_primary(setup, state);
    if primary != setup.region {
        return Some((
            format!(
                "region {} is a secondary; writes go to the primary region {primary} (epoch {})",
                setup.region, state.epoch
            ),
            false,
        ));
    }
    if now_ms < state.fenced_until_ms {
        let reason = format!(
            "region {} is fenced for a switchover for {} ms more; retry shortly",
            setup.region,
            state.fenced_until_ms - now_ms
        );
        return Some((reason, true));
    }
    None
}

/// The fields of an `ApplyRemote` command.
struct Remote {
    origin: String,
    epoch: u64,
    entries: Vec<RemoteEntry>,
    complete_through: u64,
    collect_below_ms: u64,
}

/// The fields of a `FullSync` command.
struct FullSyncPage {
    origin: String,
    epoch: u64,
    entries: Vec<SyncEntry>,
    through: u64,
}

/// The fields of an `AckShipped` command.
struct Ack {
    peer: String,
    acked: u64,
    peer_index: u64,
    collect_below_ms: u64,
}

/// The fields of a `SetRole` command.
struct Role {
    primary: String,
    epoch: u64,
    fenced_until_ms: u64,
    shipped_through: u64,
}

/// Applies a `Configure`: the first one sets the region's setup; a later one
/// changes it only when it says `replace` (an operator's `nines region
/// configure`), so a leader whose file differs cannot change it by accident.
fn configure(region: &mut RegionState, setup: ReplicationSetup, replace: bool) -> CommandResult {
    match &region.setup {
        Some(current) if *current == setup => CommandResult::None,
        Some(current) if !replace => CommandResult::Rejected {
            reason: format!("region {} is already set up as {current:?}", current.region),
            retry_later: false,
        },
        _ => {
            tracing::warn!(?setup, "replication setup replicated");
            region.setup = Some(setup);
            CommandResult::None
        }
    }
}

/// The effects of one `apply` call before they are written: reads see them.
#[derive(Default)]
struct Pending {
    /// `None`: remove the key entirely (a collected tombstone).
    data: HashMap<Vec<u8>, Option<StoredValue>>,
    /// `None`: remove the entry.
    changefeed: BTreeMap<u64, Option<ChangeRecord>>,
    divergent: Vec<(u64, DivergentRecord)>,
    /// Local writes to archive.
    archive: Vec<(u64, ArchiveRecord)>,
    /// The archive's new state, when a `Command::Archived` changed it.
    archive_state: Option<ArchiveState>,
    /// Sessions written (`None`: dropped).
    sessions: HashMap<[u8; 16], Option<SessionRecord>>,
    /// The session clock, when a session write moved it.
    session_clock: Option<u64>,
}

/// What one `apply` computed: results, effects, region state, the new
/// applied id and any new membership.
type Computed = (Vec<CommandResult>, Pending, RegionState, Option<LogId>, Option<StoredMembership>);

/// The state machine of one node.
pub struct StateMachine {
    db: Arc<Database>,
    /// Where snapshot files live.
    snapshot_dir: PathBuf,
    clock: Arc<HlcClock>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    region: RegionState,
    /// Shared with readers; updated after each applied batch is committed.
    applied: Arc<AtomicU64>,
    changefeed_len: Arc<AtomicU64>,
    shared_region: Arc<RwLock<RegionState>>,
    local_writes: Arc<tokio::sync::watch::Sender<u64>>,
    archive: ArchiveState,
    shared_archive: Arc<RwLock<ArchiveState>>,
    /// The greatest timestamp of a session write applied (milliseconds):
    /// the clock sessions expire by.
    session_clock: u64,
    /// Distinguishes snapshots built at the same log id.
    snapshot_seq: u64,
    durable: DurableApplied,
    /// When an apply last committed durably.
    last_durable_commit: Instant,
    /// The committed state `current` and `changefeed_in` read during an
    /// apply, under the batch's pending effects.
    view: Option<ReadTransaction>,
    /// Serialises replacing the current snapshot file, so an older one never
    /// overwrites a newer one. `std::sync::Mutex`: no `.await` under it.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
    /// The file a snapshot is being received into.
    receiving: Option<PathBuf>,
    /// How far the log is synced: an entry is applied only once it is
    /// (see [`LogSynced`]). `None` in tests without a log.
    log_synced: Option<LogSynced>,
}

/// Reads a record stored under `key` in the meta table, if any.
fn read_meta<T: serde::de::DeserializeOwned>(txn: &ReadTransaction, key: &str) -> Result<Option<T>, StorageError> {
    let table = txn.open_table(META).map_err(read_err)?;
    let Some(bytes) = table.get(key).map_err(read_err)? else { return Ok(None) };
    record::decode(bytes.value()).map(Some).map_err(|e| sm_err(ErrorVerb::Read, e))
}

impl StateMachine {
    /// Opens (or creates) the state machine in `dir`, on `backend` when a
    /// test asks for one. Staging tables of an install that a crash
    /// interrupted are dropped.
    pub fn open(
        dir: &Path,
        cache_bytes: usize,
        backend: Option<FileBackend>,
        clock: Arc<HlcClock>,
    ) -> anyhow::Result<Self> {
        let db = super::open_database(&dir.join(STATE_FILE), cache_bytes, backend)?;
        let txn = db.begin_write()?;
        txn.open_table(DATA)?;
        txn.open_table(CHANGEFEED)?;
        txn.open_table(DIVERGENT)?;
        txn.open_table(META)?;
        txn.open_table(ARCHIVE)?;
        txn.open_table(SESSIONS)?;
        txn.delete_table(DATA_NEXT)?;
        txn.delete_table(CHANGEFEED_NEXT)?;
        txn.delete_table(DIVERGENT_NEXT)?;
        txn.delete_table(ARCHIVE_NEXT)?;
        txn.delete_table(SESSIONS_NEXT)?;
        txn.commit()?;
        let snapshot_dir = snapshot::dir(dir);
        std::fs::create_dir_all(&snapshot_dir)?;
        clean_snapshot_dir(&snapshot_dir)?;
        super::fsync_dir(dir)?;
        let read = db.begin_read()?;
        let last_applied: Option<LogId> = read_meta::<Option<LogId>>(&read, APPLIED_KEY)?.flatten();
        let membership: StoredMembership = read_meta(&read, MEMBERSHIP_KEY)?.unwrap_or_default();
        let region: RegionState = read_meta(&read, REGION_KEY)?.unwrap_or_default();
        let archive: ArchiveState = read_meta(&read, ARCHIVE_KEY)?.unwrap_or_default();
        let session_clock: u64 = read_meta(&read, SESSION_CLOCK_KEY)?.unwrap_or_default();
        let changefeed_len = read.open_table(CHANGEFEED)?.len()?;
        drop(read);
        // A restarted clock starts above what this region stamped (unless
        // that is beyond the maximum offset: then it is not adopted).
        if clock.witness(region.hlc_high).is_err() {
            tracing::warn!(high = %region.hlc_high, "the region stamped writes ahead of this clock's maximum offset");
        }
        let applied_index = last_applied.map(|l| l.index).unwrap_or(0);
        let db = Arc::new(db);
        let durable = DurableApplied {
            db: db.clone(),
            committed: Arc::new(AtomicU64::new(applied_index)),
            durable: Arc::new(tokio::sync::watch::channel(applied_index).0),
            wanted: Arc::new(AtomicU64::new(0)),
        };
        Ok(StateMachine {
            db,
            snapshot_dir,
            clock,
            last_applied,
            membership,
            shared_region: Arc::new(RwLock::new(region.clone())),
            local_writes: Arc::new(tokio::sync::watch::channel(region.last_local_write).0),
            region,
            archive,
            shared_archive: Arc::new(RwLock::new(archive)),
            session_clock,
            applied: Arc::new(AtomicU64::new(applied_index)),
            changefeed_len: Arc::new(AtomicU64::new(changefeed_len)),
            snapshot_seq: 0,
            durable,
            last_durable_commit: Instant::now(),
            view: None,
            snapshot_lock: Arc::new(std::sync::Mutex::new(())),
            receiving: None,
            log_synced: None,
        })
    }

    /// Applies an entry only once `synced` says the log holds it durably.
    pub fn apply_only_synced(&mut self, synced: LogSynced) {
        self.log_synced = Some(synced);
    }

    /// The durable applied index, for the log store's purges.
    pub fn durable_applied(&self) -> DurableApplied {
        self.durable.clone()
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            db: self.db.clone(),
            applied: self.applied.clone(),
            changefeed_len: self.changefeed_len.clone(),
            region: self.shared_region.clone(),
            archive: self.shared_archive.clone(),
            local_writes: self.local_writes.clone(),
        }
    }

    /// The committed state an apply reads under its pending effects.
    fn view(&self) -> Result<&ReadTransaction, StorageError> {
        self.view.as_ref().ok_or_else(|| sm_err(ErrorVerb::Read, SnapshotError::Damaged("no read view".into())))
    }

    /// The current value of `key`, seeing writes earlier in the same batch.
    fn current(&self, pending: &Pending, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        if let Some(v) = pending.data.get(key) {
            return Ok(v.clone());
        }
        let table = self.view()?.open_table(DATA).map_err(read_err)?;
        let found = table.get(key).map_err(read_err)?;
        found.map(|v| decode_at(key, v.value()).map_err(|e| sm_err(ErrorVerb::Read, e))).transpose()
    }

    /// Changefeed entries with indexes in `[lo, hi]`, seeing the pending batch.
    fn changefeed_in(&self, pending: &Pending, lo: u64, hi: u64) -> Result<BTreeMap<u64, ChangeRecord>, StorageError> {
        let mut out = BTreeMap::new();
        if lo <= hi {
            let table = self.view()?.open_table(CHANGEFEED).map_err(read_err)?;
            for item in table.range(lo..=hi).map_err(read_err)? {
                let (k, v) = item.map_err(read_err)?;
                let index = k.value();
                let rec = decode_at(&index.to_be_bytes(), v.value()).map_err(|e| sm_err(ErrorVerb::Read, e))?;
                out.insert(index, rec);
            }
            for (i, rec) in pending.changefeed.range(lo..=hi) {
                match rec {
                    Some(r) => out.insert(*i, r.clone()),
                    None => out.remove(i),
                };
            }
        }
        Ok(out)
    }

    /// Advances this replica's clock past an applied timestamp, unless it is
    /// too far ahead of the physical clock (then it is counted, not adopted).
    fn witness(&self, hlc: Hlc) {
        if self.clock.witness(hlc).is_err() {
            crate::telemetry::log_refused();
        }
    }

    /// The version of a local write at `index`, stamped `hlc` by the leader
    /// and raised above the version it replaces.
    fn local_version(&self, setup: &ReplicationSetup, hlc: Hlc, index: u64, current: Option<&StoredValue>) -> Version {
        let hlc = match current {
            Some(c) if c.version.hlc >= hlc => c.version.hlc.successor(),
            _ => hlc,
        };
        self.witness(hlc);
        Version { hlc, origin: setup.region.clone(), index }
    }

    /// Stores a local write and records it in the changefeed when there are
    /// peer regions to ship it to.
    fn write_local(
        &self,
        pending: &mut Pending,
        region: &mut RegionState,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        version: &Version,
    ) {
        region.last_local_write = version.index;
        region.hlc_high = region.hlc_high.max(version.hlc);
        if region.setup.as_ref().is_some_and(|s| !s.peers.is_empty()) {
            let rec = ChangeRecord { key: key.clone(), value: value.clone(), hlc: version.hlc };
            pending.changefeed.insert(version.index, Some(rec));
        }
        let stored = StoredValue { value, version: version.clone() };
        if pending.archive_state.unwrap_or(self.archive).on {
            pending.archive.push((version.index, ArchiveRecord { key: key.clone(), value: stored.clone() }));
        }
        pending.data.insert(key, Some(stored));
    }

    fn apply_command(
        &self,
        pending: &mut Pending,
        region: &mut RegionState,
        index: u64,
        cmd: Command,
    ) -> Result<CommandResult, StorageError> {
        if let Command::Configure { setup, replace } = cmd {
            return Ok(configure(region, setup, replace));
        }
        if let Command::Archived { on, through } = cmd {
            self.archived(pending, index, on, through);
            return Ok(CommandResult::None);
        }
        if let Command::Session { tag, write } = cmd {
            return self.apply_session(pending, region, index, tag, *write);
        }
        let Some(setup) = region.setup.clone() else {
            return Ok(match cmd {
                // Batches and acknowledgements carry nothing that waits.
                Command::AckShipped { .. } | Command::Resync { .. } => CommandResult::None,
                _ => CommandResult::Rejected { reason: NOT_CONFIGURED.into(), retry_later: true },
            });
        };
        let stamp = match &cmd {
            Command::Put { hlc, .. } | Command::Delete { hlc, .. } | Command::CompareAndSwap { hlc, .. } => {
                Some(hlc.physical_ms)
            }
            _ => None,
        };
        if let Some(ms) = stamp
            && let Some((reason, retry_later)) = write_refusal(&setup, region, ms)
        {
            return Ok(CommandResult::Rejected { reason, retry_later });
        }
        Ok(match cmd {
            Command::Put { key, value, hlc } => {
                let current = self.current(pending, &key)?;
                let version = self.local_version(&setup, hlc, index, current.as_ref());
                self.write_local(pending, region, key, Some(value), &version);
                CommandResult::Put { version }
            }
            Command::Delete { key, hlc } => {
                let current = self.current(pending, &key)?;
                let existed = current.as_ref().is_some_and(|c| c.value.is_some());
                let version = self.local_version(&setup, hlc, index, current.as_ref());
                self.write_local(pending, region, key, None, &version);
                CommandResult::Delete { existed, version }
            }
            Command::CompareAndSwap { key, value, expected, hlc } => {
                let current = self.current(pending, &key)?;
                let live = current.as_ref().filter(|c| c.value.is_some());
                let matches = match (expected, live) {
                    (Expected::Absent, None) => true,
                    (Expected::Index(i), Some(c)) => c.version.index == i,
                    (Expected::Write { hlc, origin }, Some(c)) => c.version.hlc == hlc && c.version.origin == origin,
                    _ => false,
                };
                if matches {
                    let version = self.local_version(&setup, hlc, index, current.as_ref());
                    self.write_local(pending, region, key, Some(value), &version);
                    CommandResult::CompareAndSwap { succeeded: true, version: Some(version), current: None }
                } else {
                    let current = live.map(|c| (key.clone(), c.clone()));
                    CommandResult::CompareAndSwap { succeeded: false, version: None, current }
                }
            }
            Command::ApplyRemote { origin, epoch, entries, complete_through, collect_below_ms } => {
                let remote = Remote { origin, epoch, entries, complete_through, collect_below_ms };
                self.apply_remote(&setup, pending, region, index, remote)?
            }
            Command::FullSync { origin, epoch, entries, through } => {
                self.apply_full_sync(&setup, pending, region, index, FullSyncPage { origin, epoch, entries, through })?
            }
            Command::AckShipped { region: peer, index: acked, peer_index, collect_below_ms } => {
                self.ack_shipped(&setup, pending, region, Ack { peer, acked, peer_index, collect_below_ms })?;
                CommandResult::None
            }
            Command::SetRole { primary, epoch, fenced_until_ms, shipped_through } => {
                self.set_role(&setup, pending, region, Role { primary, epoch, fenced_until_ms, shipped_through })?
            }
            Command::Resync { entries, done } => {
                self.resync(pending, index, entries)?;
                if done {
                    region.resync_pending = false;
                }
                CommandResult::None
            }
            // Handled above, before the setup is needed.
            Command::Configure { .. } | Command::Archived { .. } | Command::Session { .. } => CommandResult::None,
            // Batches are unpacked by `apply`; one inside another is refused.
            Command::Batch(_) => {
                CommandResult::Rejected { reason: "a batch may not hold another batch".into(), retry_later: false }
            }
        })
    }

    /// Applies a client write in a session: at most once per `(client,
    /// seq)`, a repeat answered with the first result (see [`session`]).
    fn apply_session(
        &self,
        pending: &mut Pending,
        region: &mut RegionState,
        index: u64,
        tag: SessionTag,
        write: Command,
    ) -> Result<CommandResult, StorageError> {
        let (stamp_ms, key) = match &write {
            Command::Put { key, hlc, .. } | Command::Delete { key, hlc } | Command::CompareAndSwap { key, hlc, .. } => {
                (hlc.physical_ms, key.clone())
            }
            other => {
                return Ok(CommandResult::Rejected {
                    reason: format!("a session holds only client writes, not {other:?}"),
                    retry_later: false,
                });
            }
        };
        let now_ms = self.advance_session_clock(pending, stamp_ms)?;
        let record = self.session_record(pending, &tag.client)?;
        match session::lookup(record.as_ref(), &tag) {
            Lookup::Applied(kept) => return self.replay(pending, key, kept),
            Lookup::Expired => return Ok(CommandResult::SessionExpired { seq: tag.seq }),
            Lookup::New => {}
        }
        let result = self.apply_command(pending, region, index, write)?;
        if let Some(kept) = session::keepable(&result) {
            let mut record = record.unwrap_or_default();
            record.keep(&tag, kept, now_ms);
            pending.sessions.insert(tag.client, Some(record));
        }
        Ok(result)
    }

    /// The result of a write applied before, as it was returned then (a
    /// failed compare-and-swap reports the value current now).
    fn replay(&self, pending: &Pending, key: Vec<u8>, kept: SessionResult) -> Result<CommandResult, StorageError> {
        Ok(match kept {
            SessionResult::Put { version } => CommandResult::Put { version },
            SessionResult::Delete { existed, version } => CommandResult::Delete { existed, version },
            SessionResult::CompareAndSwap { succeeded, version } => {
                let current = if succeeded {
                    None
                } else {
                    self.current(pending, &key)?.filter(|c| c.value.is_some()).map(|c| (key, c))
                };
                CommandResult::CompareAndSwap { succeeded, version, current }
            }
        })
    }

    /// A client's session, seeing this batch's changes.
    fn session_record(&self, pending: &Pending, client: &[u8; 16]) -> Result<Option<SessionRecord>, StorageError> {
        if let Some(r) = pending.sessions.get(client) {
            return Ok(r.clone());
        }
        let table = self.view()?.open_table(SESSIONS).map_err(read_err)?;
        let found = table.get(client.as_slice()).map_err(read_err)?;
        found.map(|v| decode_at(client, v.value()).map_err(|e| sm_err(ErrorVerb::Read, e))).transpose()
    }

    /// Moves the session clock to a session write's stamp (it never goes
    /// back) and returns it; each time it enters a new `SESSION_SWEEP_MS`
    /// period, drops the sessions idle longer than `SESSION_IDLE_MS`.
    fn advance_session_clock(&self, pending: &mut Pending, stamp_ms: u64) -> Result<u64, StorageError> {
        let before = pending.session_clock.unwrap_or(self.session_clock);
        if stamp_ms <= before {
            return Ok(before);
        }
        pending.session_clock = Some(stamp_ms);
        if before / SESSION_SWEEP_MS != stamp_ms / SESSION_SWEEP_MS {
            let table = self.view()?.open_table(SESSIONS).map_err(read_err)?;
            for item in table.iter().map_err(read_err)? {
                let (k, v) = item.map_err(read_err)?;
                let Ok(client) = <[u8; 16]>::try_from(k.value()) else { continue };
                if pending.sessions.contains_key(&client) {
                    continue;
                }
                let record: SessionRecord = decode_at(&client, v.value()).map_err(|e| sm_err(ErrorVerb::Read, e))?;
                if record.expired(stamp_ms) {
                    pending.sessions.insert(client, None);
                }
            }
            for record in pending.sessions.values_mut() {
                if record.as_ref().is_some_and(|r| r.expired(stamp_ms)) {
                    *record = None;
                }
            }
            tracing::debug!(clock_ms = stamp_ms, idle_ms = SESSION_IDLE_MS, "swept idle client sessions");
        }
        Ok(stamp_ms)
    }

    /// Turns the archive on (from this entry on) and marks it stored
    /// through `through`, or turns it off and drops it.
    fn archived(&self, pending: &mut Pending, index: u64, on: bool, through: u64) {
        let mut state = pending.archive_state.unwrap_or(self.archive);
        if !on {
            pending.archive.clear();
            pending.archive_state = Some(ArchiveState::default());
            return;
        }
        if !state.on {
            state = ArchiveState { on: true, since: index / WRITES_PER_ENTRY_MAX, through: 0 };
        }
        state.through = state.through.max(through);
        pending.archive_state = Some(state);
    }

    /// Why writes from `origin` at `epoch` are refused, if they are: not a
    /// peer, an impossible epoch, or (active-passive) an older epoch.
    fn refuse_remote(
        setup: &ReplicationSetup,
        region: &RegionState,
        origin: &str,
        epoch: u64,
    ) -> Option<CommandResult> {
        let reason = if !setup.peers.iter().any(|p| p == origin) {
            format!("{origin} is not a peer region of {}", setup.region)
        } else if epoch > EPOCH_MAX {
            format!("writes from {origin} at epoch {epoch}: above EPOCH_MAX {EPOCH_MAX}")
        } else if setup.mode == Mode::ActivePassive && epoch < region.epoch {
            format!("writes from {origin} at epoch {epoch} are stale: this region is at epoch {}", region.epoch)
        } else {
            return None;
        };
        Some(CommandResult::Rejected { reason, retry_later: false })
    }

    /// Applies a page of a full sync from `origin`: each key last-writer-
    /// wins on its own version; the last page (`through` above 0) records
    /// that this region holds every write of `origin` through it, and ends
    /// the sync.
    fn apply_full_sync(
        &self,
        setup: &ReplicationSetup,
        pending: &mut Pending,
        region: &mut RegionState,
        index: u64,
        page: FullSyncPage,
    ) -> Result<CommandResult, StorageError> {
        let FullSyncPage { origin, epoch, entries, through } = page;
        if let Some(refused) = Self::refuse_remote(setup, region, &origin, epoch) {
            return Ok(refused);
        }
        region.full_sync_from.insert(origin.clone());
        let mut applied = 0;
        for e in entries {
            let current = self.current(pending, &e.key)?;
            let newer = current
                .as_ref()
                .is_none_or(|c| (c.version.hlc, c.version.origin.as_str()) < (e.hlc, e.origin.as_str()));
            self.witness(e.hlc);
            if newer {
                applied += 1;
                let version = Version { hlc: e.hlc, origin: e.origin, index };
                pending.data.insert(e.key, Some(StoredValue { value: e.value, version }));
            }
        }
        if through > 0 {
            let applied_from = region.applied_from.entry(origin.clone()).or_default();
            *applied_from = (*applied_from).max(through);
            let complete = region.complete_from.entry(origin.clone()).or_default();
            *complete = (*complete).max(through);
            region.full_sync_from.remove(&origin);
        }
        let applied_through = region.applied_from.get(&origin).copied().unwrap_or(0);
        Ok(CommandResult::Remote { applied, applied_through })
    }

    fn apply_remote(
        &self,
        setup: &ReplicationSetup,
        pending: &mut Pending,
        region: &mut RegionState,
        index: u64,
        remote: Remote,
    ) -> Result<CommandResult, StorageError> {
        let Remote { origin, epoch, entries, complete_through, collect_below_ms } = remote;
        if let Some(refused) = Self::refuse_remote(setup, region, &origin, epoch) {
            return Ok(refused);
        }
        let mut through = region.applied_from.get(&origin).copied().unwrap_or(0);
        let mut applied = 0;
        for e in entries {
            if e.origin_index <= through {
                continue;
            }
            through = e.origin_index;
            applied += 1;
            let current = self.current(pending, &e.key)?;
            let newer =
                current.as_ref().is_none_or(|c| (c.version.hlc, c.version.origin.as_str()) < (e.hlc, origin.as_str()));
            self.witness(e.hlc);
            if newer {
                let version = Version { hlc: e.hlc, origin: origin.clone(), index };
                pending.data.insert(e.key, Some(StoredValue { value: e.value, version }));
            }
        }
        region.applied_from.insert(origin.clone(), through);
        let complete = region.complete_from.entry(origin.clone()).or_default();
        let advanced = complete_through > *complete;
        *complete = (*complete).max(complete_through);
        *region.applied_total.entry(origin).or_default() += applied;
        if advanced {
            // Holding more of the origin's writes may free tombstones.
            self.collect_tombstones(setup, pending, region, collect_below_ms)?;
        }
        Ok(CommandResult::Remote { applied, applied_through: through })
    }

    /// Records a peer's acknowledgement and collects what every peer has
    /// applied: put entries of the changefeed at once, a delete's entry and
    /// its tombstone once no peer can still send an older write to its key.
    ///
    /// A peer that acknowledged applying the delete at index `i` while its
    /// own latest write was at `w` stamps every later write to that key above
    /// the tombstone (it applies them after the tombstone, and a key's
    /// versions only grow); its writes up to `w` are what may still be older.
    /// So the tombstone may go once, for every peer, this region holds that
    /// peer's writes through the `w` of the first acknowledgement at or above
    /// `i`. Recording `w` per acknowledgement (not only the latest) is what
    /// lets tombstones go under continuous peer writes, where the latest `w`
    /// is always a little ahead of what has arrived here.
    fn ack_shipped(
        &self,
        setup: &ReplicationSetup,
        pending: &mut Pending,
        region: &mut RegionState,
        ack: Ack,
    ) -> Result<(), StorageError> {
        let Ack { peer, acked, peer_index, collect_below_ms } = ack;
        if !setup.peers.contains(&peer) {
            return Ok(());
        }
        let before = all_acked(setup, region);
        let entry = region.acked.entry(peer.clone()).or_default();
        if acked > *entry {
            *entry = acked;
            let history = region.ack_history.entry(peer).or_default();
            history.push((acked, peer_index));
            if history.len() > ACK_HISTORY_MAX {
                history.remove(0);
            }
        }
        // Puts every peer has now applied go at once; everything at or below
        // `before` that is left is a tombstone waiting (see below).
        let after = all_acked(setup, region);
        if after > before {
            for (i, rec) in self.changefeed_in(pending, before.saturating_add(1), after)? {
                if rec.value.is_some() {
                    pending.changefeed.insert(i, None);
                }
            }
        }
        self.collect_tombstones(setup, pending, region, collect_below_ms)
    }

    /// Collects the tombstones no peer can still send an older write for
    /// (see [`Self::ack_shipped`]): they wait on acknowledgements and on this
    /// region holding the peers' writes, so this runs after either moves.
    /// Only the newly collectable range is read.
    fn collect_tombstones(
        &self,
        setup: &ReplicationSetup,
        pending: &mut Pending,
        region: &mut RegionState,
        below_ms: u64,
    ) -> Result<(), StorageError> {
        let safe = setup.peers.iter().map(|p| tombstones_safe_through(region, p)).min().unwrap_or(0);
        let through = safe.min(all_acked(setup, region));
        if through <= region.tombstones_collected_through {
            return Ok(());
        }
        let mut collected = through;
        for (i, rec) in self.changefeed_in(pending, region.tombstones_collected_through.saturating_add(1), through)? {
            if rec.value.is_none() && rec.hlc.physical_ms >= below_ms {
                // Too new to go yet (see `Command::AckShipped`): it and
                // everything after it wait for a later collection.
                collected = i.saturating_sub(1);
                break;
            }
            pending.changefeed.insert(i, None);
            if rec.value.is_some() {
                continue;
            }
            let current = self.current(pending, &rec.key)?;
            // Collect the tombstone only if it is still this delete's.
            if current.is_some_and(|c| c.value.is_none() && c.version.index == i) {
                pending.data.insert(rec.key, None);
            }
        }
        region.tombstones_collected_through = region.tombstones_collected_through.max(collected);
        let done = region.tombstones_collected_through;
        // Acknowledgements at or below the collected tombstones are of no
        // further use: every tombstone left is above them.
        for history in region.ack_history.values_mut() {
            history.retain(|(a, _)| *a > done);
        }
        Ok(())
    }

    fn set_role(
        &self,
        setup: &ReplicationSetup,
        pending: &mut Pending,
        region: &mut RegionState,
        role: Role,
    ) -> Result<CommandResult, StorageError> {
        let Role { primary, epoch, fenced_until_ms, shipped_through } = role;
        if epoch > EPOCH_MAX {
            return Ok(CommandResult::Rejected {
                reason: format!("epoch {epoch} is above EPOCH_MAX {EPOCH_MAX}"),
                retry_later: false,
            });
        }
        let current_primary = effective_primary(setup, region);
        // Two primaries at one epoch (concurrent promotions without an
        // authority): the region whose name sorts first wins, in every
        // region whatever order the notices arrive in; the other demotes
        // itself like any old primary, its unshipped writes divergent.
        let loses_tie =
            epoch == region.epoch && primary != current_primary && !wins_epoch_tie(&primary, &current_primary);
        if epoch < region.epoch || loses_tie {
            return Ok(CommandResult::Role { divergent: Vec::new() });
        }
        if epoch == region.epoch && primary == current_primary {
            region.fenced_until_ms = fenced_until_ms;
            return Ok(CommandResult::Role { divergent: Vec::new() });
        }
        let mut divergent = Vec::new();
        if current_primary == setup.region && primary != setup.region {
            for (i, rec) in self.changefeed_in(pending, shipped_through.saturating_add(1), u64::MAX)? {
                pending.changefeed.insert(i, None);
                let version = Version { hlc: rec.hlc, origin: setup.region.clone(), index: i };
                let record =
                    DivergentRecord { key: rec.key.clone(), value: rec.value, version, demoted_at_epoch: epoch };
                pending.divergent.push((region.divergent_total, record));
                region.divergent_total += 1;
                divergent.push(rec.key);
            }
        }
        if !divergent.is_empty() {
            region.resync_pending = true;
        }
        region.primary = primary;
        region.epoch = epoch;
        region.fenced_until_ms = fenced_until_ms;
        Ok(CommandResult::Role { divergent })
    }

    fn resync(&self, pending: &mut Pending, index: u64, entries: Vec<ResyncEntry>) -> Result<(), StorageError> {
        for e in entries {
            let current = self.current(pending, &e.key)?;
            let replace = match &current {
                None => e.value.is_some(),
                Some(c) => {
                    c.version == e.divergent || (c.version.hlc, c.version.origin.as_str()) < (e.hlc, e.origin.as_str())
                }
            };
            if replace {
                let version = Version { hlc: e.hlc, origin: e.origin, index };
                pending.data.insert(e.key, Some(StoredValue { value: e.value, version }));
            }
        }
        Ok(())
    }

    /// Computes the effects of `entries` against the committed state (the
    /// read view) and the batch so far: results, effects, region state, the
    /// new applied id and any new membership.
    fn compute<I: IntoIterator<Item = Entry>>(&mut self, entries: I) -> Result<Computed, StorageError> {
        let mut pending = Pending::default();
        let mut region = self.region.clone();
        let mut results = Vec::new();
        let mut last_applied = self.last_applied;
        let mut membership = None;
        for entry in entries {
            if let Some(prev) = last_applied
                && entry.log_id.index <= prev.index
            {
                let why = format!("applying entry {} after {prev}: the log went backwards", entry.log_id);
                return Err(sm_err(ErrorVerb::Write, SnapshotError::Damaged(why)));
            }
            last_applied = Some(entry.log_id);
            let (result, changed) = self.apply_entry(&mut pending, &mut region, entry)?;
            membership = changed.or(membership);
            results.push(result);
        }
        Ok((results, pending, region, last_applied, membership))
    }

    /// Applies one log entry's payload into `pending`.
    fn apply_entry(
        &self,
        pending: &mut Pending,
        region: &mut RegionState,
        entry: Entry,
    ) -> Result<(CommandResult, Option<StoredMembership>), StorageError> {
        let result = match entry.payload {
            EntryPayload::Blank => CommandResult::None,
            EntryPayload::Normal(Command::Batch(cmds)) if cmds.len() as u64 > WRITES_PER_ENTRY_MAX => {
                // Replicated input: refused as a failed command, never
                // asserted, so a bad entry cannot crash-loop the region.
                let reason = format!(
                    "entry {} packs {} writes; limit WRITES_PER_ENTRY_MAX is {WRITES_PER_ENTRY_MAX}",
                    entry.log_id,
                    cmds.len()
                );
                tracing::error!(%reason, "refusing a batch at apply time");
                CommandResult::Batch(vec![CommandResult::Rejected { reason, retry_later: false }; cmds.len()])
            }
            EntryPayload::Normal(Command::Batch(cmds)) => {
                let mut results = Vec::with_capacity(cmds.len());
                for (pos, cmd) in cmds.into_iter().enumerate() {
                    let index = version_index(entry.log_id.index, pos as u64);
                    results.push(match cmd {
                        Command::Put { .. }
                        | Command::Delete { .. }
                        | Command::CompareAndSwap { .. }
                        | Command::Session { .. } => self.apply_command(pending, region, index, cmd)?,
                        other => CommandResult::Rejected {
                            reason: format!("a batch may hold only client writes, not {other:?}"),
                            retry_later: false,
                        },
                    });
                }
                CommandResult::Batch(results)
            }
            EntryPayload::Normal(cmd) => {
                let index = version_index(entry.log_id.index, 0);
                self.apply_command(pending, region, index, cmd)?
            }
            EntryPayload::Membership(m) => {
                return Ok((CommandResult::None, Some(StoredMembership::new(Some(entry.log_id), m))));
            }
        };
        Ok((result, None))
    }

    /// Writes a batch's effects and the new applied log id in one
    /// transaction, durably when `DURABLE_COMMIT_INTERVAL` has passed or a
    /// purge or snapshot waits for it (see [`DurableApplied::reach`]).
    /// Returns the change in the changefeed's length.
    fn write(
        &mut self,
        pending: &Pending,
        region: &RegionState,
        last_applied: Option<LogId>,
        membership: Option<&StoredMembership>,
    ) -> Result<i64, StorageError> {
        let index = last_applied.map(|l| l.index).unwrap_or(0);
        let durable = self.last_durable_commit.elapsed() >= DURABLE_COMMIT_INTERVAL || self.durable.wanted_by(index);
        let started = Instant::now();
        let grown = if durable {
            // A sync that waits on the disk leaves the runtime's thread to
            // the node's other tasks (Raft's heartbeats and appends): with one
            // runtime thread per node, a slow sync here would stall them all.
            super::off_the_runtime(|| self.transact(true, pending, region, last_applied, membership))?
        } else {
            self.transact(false, pending, region, last_applied, membership)?
        };
        crate::telemetry::state_commit(started, durable);
        self.durable.committed.store(index, Ordering::Release);
        if durable {
            self.last_durable_commit = Instant::now();
            self.durable.raise(index);
        }
        Ok(grown)
    }

    /// [`Self::write`]'s transaction.
    fn transact(
        &self,
        durable: bool,
        pending: &Pending,
        region: &RegionState,
        last_applied: Option<LogId>,
        membership: Option<&StoredMembership>,
    ) -> Result<i64, StorageError> {
        let enc = |v: &dyn erased::Encode| v.encode().map_err(|e| sm_err(ErrorVerb::Write, e));
        let mut txn = self.db.begin_write().map_err(write_err)?;
        if !durable {
            txn.set_durability(Durability::None).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        }
        let mut grown = 0i64;
        {
            let mut data = txn.open_table(DATA).map_err(write_err)?;
            for (key, value) in &pending.data {
                match value {
                    Some(v) => {
                        data.insert(key.as_slice(), enc(v)?.as_slice()).map_err(write_err)?;
                    }
                    None => {
                        data.remove(key.as_slice()).map_err(write_err)?;
                    }
                }
            }
            // A table is opened only when this batch writes to it: each
            // table opened is looked up and its root rewritten at commit.
            if !pending.changefeed.is_empty() {
                let mut changefeed = txn.open_table(CHANGEFEED).map_err(write_err)?;
                for (i, rec) in &pending.changefeed {
                    match rec {
                        Some(r) => {
                            let replaced = changefeed.insert(*i, enc(r)?.as_slice()).map_err(write_err)?;
                            // A changefeed key is the version index of a write
                            // applied in this very batch: never there before.
                            grown += i64::from(replaced.is_none());
                        }
                        None => grown -= i64::from(changefeed.remove(*i).map_err(write_err)?.is_some()),
                    }
                }
            }
            if !pending.divergent.is_empty() {
                let mut divergent = txn.open_table(DIVERGENT).map_err(write_err)?;
                for (seq, rec) in &pending.divergent {
                    divergent.insert(*seq, enc(rec)?.as_slice()).map_err(write_err)?;
                }
            }
            let mut meta = txn.open_table(META).map_err(write_err)?;
            if pending.archive_state.is_some() || !pending.archive.is_empty() {
                let mut archive = txn.open_table(ARCHIVE).map_err(write_err)?;
                if let Some(state) = &pending.archive_state {
                    // Entries already stored (or all, when archiving stops) go;
                    // this batch's own writes are above `through`.
                    archive
                        .retain_in(..=if state.on { state.through } else { u64::MAX }, |_, _| false)
                        .map_err(write_err)?;
                    meta.insert(ARCHIVE_KEY, enc(state)?.as_slice()).map_err(write_err)?;
                }
                for (i, rec) in &pending.archive {
                    archive.insert(*i, enc(rec)?.as_slice()).map_err(write_err)?;
                }
            }
            if !pending.sessions.is_empty() {
                let mut sessions = txn.open_table(SESSIONS).map_err(write_err)?;
                for (client, record) in &pending.sessions {
                    match record {
                        Some(r) => sessions.insert(client.as_slice(), enc(r)?.as_slice()).map_err(write_err)?,
                        None => sessions.remove(client.as_slice()).map_err(write_err)?,
                    };
                }
            }
            if let Some(ms) = pending.session_clock {
                meta.insert(SESSION_CLOCK_KEY, enc(&ms)?.as_slice()).map_err(write_err)?;
            }
            meta.insert(APPLIED_KEY, enc(&last_applied)?.as_slice()).map_err(write_err)?;
            if *region != self.region {
                meta.insert(REGION_KEY, enc(region)?.as_slice()).map_err(write_err)?;
            }
            if let Some(m) = membership {
                meta.insert(MEMBERSHIP_KEY, enc(m)?.as_slice()).map_err(write_err)?;
            }
        }
        txn.commit().map_err(write_err)?;
        Ok(grown)
    }

    fn publish(&mut self, region: RegionState) {
        *self.shared_region.write().unwrap_or_else(|p| p.into_inner()) = region.clone();
        let latest = region.last_local_write;
        self.local_writes.send_if_modified(|w| std::mem::replace(w, latest) != latest);
        self.region = region;
    }

    fn publish_archive(&mut self, state: ArchiveState) {
        *self.shared_archive.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.archive = state;
    }

    /// The file of a received snapshot, durable: the file
    /// `begin_receiving_snapshot` handed out, or a copy of whatever file
    /// openraft gives instead (read from its start).
    async fn received_file(&mut self, file: tokio::fs::File) -> Result<PathBuf, StorageError> {
        use std::io::Seek;
        use std::os::unix::fs::MetadataExt;
        let io = |e: std::io::Error| snapshot_err(ErrorVerb::Write, e);
        let mut file = file.into_std().await;
        let receiving = self.receiving.take();
        let same = match &receiving {
            Some(p) => std::fs::metadata(p).map_err(io)?.ino() == file.metadata().map_err(io)?.ino(),
            None => false,
        };
        if same && let Some(path) = receiving {
            super::off_the_runtime(|| file.sync_all()).map_err(io)?;
            return Ok(path);
        }
        if let Some(p) = receiving {
            std::fs::remove_file(p).map_err(io)?;
        }
        self.snapshot_seq += 1;
        let path = self.snapshot_dir.join(format!("installing-{}.snap", self.snapshot_seq));
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        super::off_the_runtime(|| {
            let mut copy = std::fs::File::create(&path)?;
            std::io::copy(&mut file, &mut copy)?;
            copy.sync_all()
        })
        .map_err(io)?;
        Ok(path)
    }

    /// Makes `path` the current snapshot unless a snapshot of a later log id
    /// is current already (a build that raced with an install).
    fn keep_snapshot(&self, path: &Path, meta: &SnapshotMeta) -> Result<(), StorageError> {
        keep_snapshot(&self.snapshot_dir, &self.snapshot_lock, path, meta)
    }
}

/// Replaces the whole state with a snapshot file's, in bounded batches into
/// staging tables (cleared first: a failed install may have left some) and
/// one final transaction that switches them in (see the module doc).
/// Returns the snapshot's region state, its changefeed length and the
/// greatest timestamp it holds. Blocking: runs off the async runtime.
fn install_tables(db: &Database, path: &Path, meta: &SnapshotMeta) -> Result<Installed, StorageError> {
    let fail = |e: SnapshotError| snapshot_err(ErrorVerb::Read, e);
    let (mut reader, file_meta, region) = snapshot::Reader::open(path).map_err(fail)?;
    if file_meta.last_log_id != meta.last_log_id {
        return Err(fail(SnapshotError::Damaged(format!(
            "it holds log id {:?}, not the {:?} it was sent as",
            file_meta.last_log_id, meta.last_log_id
        ))));
    }
    let clear = db.begin_write().map_err(write_err)?;
    clear.delete_table(DATA_NEXT).map_err(write_err)?;
    clear.delete_table(CHANGEFEED_NEXT).map_err(write_err)?;
    clear.delete_table(DIVERGENT_NEXT).map_err(write_err)?;
    clear.delete_table(ARCHIVE_NEXT).map_err(write_err)?;
    clear.delete_table(SESSIONS_NEXT).map_err(write_err)?;
    clear.commit().map_err(write_err)?;
    let mut changefeed_len = 0;
    let mut newest = Hlc::default();
    let mut archive_state = ArchiveState::default();
    let mut session_clock = 0;
    let mut done = false;
    while !done {
        let mut txn = db.begin_write().map_err(write_err)?;
        txn.set_durability(Durability::None).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        {
            let mut data = txn.open_table(DATA_NEXT).map_err(write_err)?;
            let mut changefeed = txn.open_table(CHANGEFEED_NEXT).map_err(write_err)?;
            let mut divergent = txn.open_table(DIVERGENT_NEXT).map_err(write_err)?;
            let mut archive = txn.open_table(ARCHIVE_NEXT).map_err(write_err)?;
            let mut sessions = txn.open_table(SESSIONS_NEXT).map_err(write_err)?;
            let mut bytes = 0;
            while bytes < SNAPSHOT_INSTALL_BATCH_BYTES {
                let Some(item) = reader.next_item().map_err(fail)? else {
                    done = true;
                    break;
                };
                let enc = |v: &dyn erased::Encode| v.encode().map_err(|e| sm_err(ErrorVerb::Write, e));
                match item {
                    Item::Data { key, value } => {
                        newest = newest.max(value.version.hlc);
                        let v = enc(&value)?;
                        bytes += key.len() + v.len();
                        data.insert(key.as_slice(), v.as_slice()).map_err(write_err)?;
                    }
                    Item::Change { index, record } => {
                        let v = enc(&record)?;
                        bytes += v.len();
                        changefeed_len += 1;
                        changefeed.insert(index, v.as_slice()).map_err(write_err)?;
                    }
                    Item::Divergent { seq, record } => {
                        let v = enc(&record)?;
                        bytes += v.len();
                        divergent.insert(seq, v.as_slice()).map_err(write_err)?;
                    }
                    Item::Archive { index, record } => {
                        let v = enc(&record)?;
                        bytes += v.len();
                        archive.insert(index, v.as_slice()).map_err(write_err)?;
                    }
                    Item::ArchiveState(state) => archive_state = state,
                    Item::Session { client, record } => {
                        let v = enc(&record)?;
                        bytes += v.len();
                        sessions.insert(client.as_slice(), v.as_slice()).map_err(write_err)?;
                    }
                    Item::SessionClock(ms) => session_clock = ms,
                    Item::Header { .. } | Item::End { .. } => {}
                }
            }
        }
        txn.commit().map_err(write_err)?;
    }
    switch_in(db, meta, &region, &archive_state, session_clock)?;
    Ok(Installed { region, changefeed_len, newest, archive: archive_state, session_clock })
}

/// What an install put in place.
struct Installed {
    region: RegionState,
    changefeed_len: u64,
    /// The greatest timestamp the snapshot holds.
    newest: Hlc,
    archive: ArchiveState,
    session_clock: u64,
}

/// The final, durable transaction of an install: the staging tables
/// replace the live ones, with the snapshot's applied id, membership and
/// region state.
fn switch_in(
    db: &Database,
    meta: &SnapshotMeta,
    region: &RegionState,
    archive: &ArchiveState,
    session_clock: u64,
) -> Result<(), StorageError> {
    let enc = |v: &dyn erased::Encode| v.encode().map_err(|e| sm_err(ErrorVerb::Write, e));
    let txn = db.begin_write().map_err(write_err)?;
    txn.delete_table(DATA).map_err(write_err)?;
    txn.delete_table(CHANGEFEED).map_err(write_err)?;
    txn.delete_table(DIVERGENT).map_err(write_err)?;
    txn.delete_table(ARCHIVE).map_err(write_err)?;
    txn.delete_table(SESSIONS).map_err(write_err)?;
    // Opened so that an empty snapshot still has every table to rename.
    txn.open_table(DATA_NEXT).map_err(write_err)?;
    txn.open_table(CHANGEFEED_NEXT).map_err(write_err)?;
    txn.open_table(DIVERGENT_NEXT).map_err(write_err)?;
    txn.open_table(ARCHIVE_NEXT).map_err(write_err)?;
    txn.open_table(SESSIONS_NEXT).map_err(write_err)?;
    txn.rename_table(DATA_NEXT, DATA).map_err(write_err)?;
    txn.rename_table(CHANGEFEED_NEXT, CHANGEFEED).map_err(write_err)?;
    txn.rename_table(DIVERGENT_NEXT, DIVERGENT).map_err(write_err)?;
    txn.rename_table(ARCHIVE_NEXT, ARCHIVE).map_err(write_err)?;
    txn.rename_table(SESSIONS_NEXT, SESSIONS).map_err(write_err)?;
    {
        let mut m = txn.open_table(META).map_err(write_err)?;
        m.insert(APPLIED_KEY, enc(&meta.last_log_id)?.as_slice()).map_err(write_err)?;
        m.insert(MEMBERSHIP_KEY, enc(&meta.last_membership)?.as_slice()).map_err(write_err)?;
        m.insert(REGION_KEY, enc(region)?.as_slice()).map_err(write_err)?;
        m.insert(ARCHIVE_KEY, enc(archive)?.as_slice()).map_err(write_err)?;
        m.insert(SESSION_CLOCK_KEY, enc(&session_clock)?.as_slice()).map_err(write_err)?;
    }
    txn.commit().map_err(write_err)?;
    Ok(())
}

/// Removes what a crash or a failed transfer left in the snapshot
/// directory (files being built, received or installed), and a current
/// snapshot that does not read back whole: openraft builds a new one, where
/// serving a damaged one would stop every follower that installs it.
fn clean_snapshot_dir(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n != snapshot::CURRENT) {
            std::fs::remove_file(&path)?;
        }
    }
    let current = dir.join(snapshot::CURRENT);
    if current.exists()
        && let Err(e) = snapshot::Reader::verify(&current)
    {
        tracing::warn!(error = %e, path = %current.display(), "removing a damaged snapshot; a new one will be built");
        std::fs::remove_file(&current)?;
    }
    super::fsync_dir(dir)?;
    Ok(())
}

/// See [`StateMachine::keep_snapshot`]. Runs off the runtime's thread: the
/// rename frees the replaced snapshot's blocks (a whole state's worth) and
/// the directory sync waits for the journal.
fn keep_snapshot(
    dir: &Path,
    lock: &std::sync::Mutex<()>,
    path: &Path,
    meta: &SnapshotMeta,
) -> Result<(), StorageError> {
    super::off_the_runtime(|| {
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = dir.join(snapshot::CURRENT);
        let newer = match snapshot::Reader::open(&current) {
            Ok((_, kept, _)) => kept.last_log_id > meta.last_log_id,
            Err(_) => false,
        };
        let io = |e: std::io::Error| snapshot_err(ErrorVerb::Write, e);
        if newer {
            std::fs::remove_file(path).map_err(io)?;
        } else {
            std::fs::rename(path, &current).map_err(io)?;
        }
        super::fsync_dir(dir).map_err(io)
    })
}

/// Encoding a stored record through one object-safe call, so the write
/// paths can take any record type.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Result<Vec<u8>, super::record::RecordError>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, super::record::RecordError> {
            super::record::encode(self)
        }
    }
}

/// Builds a snapshot from a read transaction taken when openraft asked, so
/// applies that happen while it is written do not leak in.
pub struct SnapshotBuilder {
    durable: DurableApplied,
    view: Option<ReadTransaction>,
    meta: SnapshotMeta,
    region: RegionState,
    dir: PathBuf,
    lock: Arc<std::sync::Mutex<()>>,
}

/// Streams the state of `view` into a new file in `dir`; returns its path
/// and size.
fn write_snapshot(
    view: ReadTransaction,
    dir: &Path,
    meta: &SnapshotMeta,
    region: RegionState,
) -> Result<(PathBuf, u64), SnapshotError> {
    let path = dir.join(format!("build-{}.snap", meta.snapshot_id));
    let mut w = snapshot::Writer::create(&path, meta.clone(), region)?;
    let storage = |e: redb::Error| SnapshotError::Damaged(format!("reading the state: {e}"));
    let decode_err = |e: record::RecordError| SnapshotError::Damaged(format!("a stored record: {e}"));
    let data = view.open_table(DATA).map_err(|e| storage(e.into()))?;
    for item in data.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = item.map_err(|e| storage(e.into()))?;
        w.data(k.value().to_vec(), record::decode(v.value()).map_err(decode_err)?)?;
    }
    let changefeed = view.open_table(CHANGEFEED).map_err(|e| storage(e.into()))?;
    for item in changefeed.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = item.map_err(|e| storage(e.into()))?;
        w.change(k.value(), record::decode(v.value()).map_err(decode_err)?)?;
    }
    let divergent = view.open_table(DIVERGENT).map_err(|e| storage(e.into()))?;
    for item in divergent.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = item.map_err(|e| storage(e.into()))?;
        w.divergent(k.value(), record::decode(v.value()).map_err(decode_err)?)?;
    }
    let meta_table = view.open_table(META).map_err(|e| storage(e.into()))?;
    if let Some(state) = meta_table.get(ARCHIVE_KEY).map_err(|e| storage(e.into()))? {
        w.archive_state(record::decode(state.value()).map_err(decode_err)?)?;
    }
    let archive = view.open_table(ARCHIVE).map_err(|e| storage(e.into()))?;
    for item in archive.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = item.map_err(|e| storage(e.into()))?;
        w.archive(k.value(), record::decode(v.value()).map_err(decode_err)?)?;
    }
    if let Some(ms) = meta_table.get(SESSION_CLOCK_KEY).map_err(|e| storage(e.into()))? {
        w.session_clock(record::decode(ms.value()).map_err(decode_err)?)?;
    }
    let sessions = view.open_table(SESSIONS).map_err(|e| storage(e.into()))?;
    for item in sessions.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = item.map_err(|e| storage(e.into()))?;
        let client = <[u8; 16]>::try_from(k.value())
            .map_err(|_| SnapshotError::Damaged(format!("a session id of {} bytes", k.value().len())))?;
        w.session(client, record::decode(v.value()).map_err(decode_err)?)?;
    }
    let bytes = w.finish()?;
    Ok((path, bytes))
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let view = self
            .view
            .take()
            .ok_or_else(|| snapshot_err(ErrorVerb::Read, SnapshotError::Damaged("built twice".into())))?;
        let (dir, meta, region) = (self.dir.clone(), self.meta.clone(), self.region.clone());
        let started = std::time::Instant::now();
        let (built, bytes) = tokio::task::spawn_blocking(move || write_snapshot(view, &dir, &meta, region))
            .await
            .map_err(|e| snapshot_err(ErrorVerb::Write, SnapshotError::Damaged(e.to_string())))?
            .map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        // Opened before it may be renamed (or dropped for a newer one), so
        // what is returned is this snapshot whatever happens to the name.
        let file = tokio::fs::File::open(&built).await.map_err(|e| snapshot_err(ErrorVerb::Read, e))?;
        // The state the snapshot holds is made durable before the snapshot
        // becomes current: a restart never finds a current snapshot ahead of
        // its own durable state.
        let index = self.meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.durable.reach(index).await.map_err(|e| snapshot_err(ErrorVerb::Write, SnapshotError::Damaged(e)))?;
        keep_snapshot(&self.dir, &self.lock, &built, &self.meta)?;
        tracing::info!(index, bytes, took_ms = started.elapsed().as_millis() as u64, "snapshot built");
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(file) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(synced), Some(last)) = (&mut self.log_synced, entries.last()) {
            let reached = synced.reach(last.log_id.index).await;
            reached
                .map_err(|e| StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, openraft::AnyError::error(e)))?;
        }
        self.view = Some(self.db.begin_read().map_err(read_err)?);
        let computed = self.compute(entries);
        // The read view ends with the computation, whatever its outcome.
        self.view = None;
        let (results, pending, region, last_applied, membership) = computed?;
        let grown = self.write(&pending, &region, last_applied, membership.as_ref())?;
        self.last_applied = last_applied;
        if let Some(m) = membership {
            self.membership = m;
        }
        let len = self.changefeed_len.load(Ordering::Acquire) as i64 + grown;
        if len < 0 {
            return Err(sm_err(
                ErrorVerb::Write,
                SnapshotError::Damaged(format!("changefeed length went negative: {len}")),
            ));
        }
        self.changefeed_len.store(len as u64, Ordering::Release);
        self.publish(region);
        if let Some(state) = pending.archive_state {
            self.publish_archive(state);
        }
        if let Some(ms) = pending.session_clock {
            self.session_clock = ms;
        }
        self.applied.store(last_applied.map(|l| l.index).unwrap_or(0), Ordering::Release);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        let last = self.last_applied;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta { last_log_id: last, last_membership: self.membership.clone(), snapshot_id };
        // Taken now, between applies: the snapshot is exactly the state at
        // `last`. A failure shows when the snapshot is built.
        let view = self.db.begin_read().ok();
        SnapshotBuilder {
            durable: self.durable.clone(),
            view,
            meta,
            region: self.region.clone(),
            dir: self.snapshot_dir.clone(),
            lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        self.snapshot_seq += 1;
        let path = self.snapshot_dir.join(format!("incoming-{}.snap", self.snapshot_seq));
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .await
            .map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let path = self.received_file(*snapshot).await?;
        let (db, file, m) = (self.db.clone(), path.clone(), meta.clone());
        let installed = tokio::task::spawn_blocking(move || install_tables(&db, &file, &m))
            .await
            .map_err(|e| snapshot_err(ErrorVerb::Write, SnapshotError::Damaged(e.to_string())))??;
        // The installed state is durable; the snapshot becomes current before
        // the durable index moves, so the log is never purged beyond the
        // current snapshot (a crash in between keeps the older snapshot and
        // the unpurged log).
        self.keep_snapshot(&path, meta)?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.durable.committed.store(index, Ordering::Release);
        self.durable.raise(index);
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.changefeed_len.store(installed.changefeed_len, Ordering::Release);
        // The installed values' clock, adopted within the maximum offset.
        self.witness(installed.newest);
        self.publish(installed.region);
        self.publish_archive(installed.archive);
        self.session_clock = installed.session_clock;
        self.applied.store(index, Ordering::Release);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        open_current(&self.snapshot_dir)
    }
}

/// The current snapshot: its header and its data read through one file
/// descriptor, so a newer snapshot renamed in meanwhile cannot mix with it.
fn open_current(dir: &Path) -> Result<Option<Snapshot>, StorageError> {
    use std::io::Seek;
    let io = |e: std::io::Error| snapshot_err(ErrorVerb::Read, e);
    let mut file = match std::fs::File::open(dir.join(snapshot::CURRENT)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let header = snapshot::Reader::from_file(file.try_clone().map_err(io)?);
    let (_, meta, _) = header.map_err(|e| snapshot_err(ErrorVerb::Read, e))?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

    use super::*;

    fn fresh() -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(dir.path(), 1 << 20, None, Arc::new(HlcClock::wall(500))).unwrap();
        (dir, sm)
    }

    fn open(region: &str, peers: &[&str], mode: Mode, primary: &str) -> (tempfile::TempDir, StateMachine) {
        let (dir, mut sm) = fresh();
        let setup = ReplicationSetup {
            region: region.into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            mode,
            initial_primary: primary.into(),
        };
        // The setup is the region's first entry (index 0 here, so the tests'
        // writes start at index 1).
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 0),
            payload: EntryPayload::Normal(Command::Configure { setup, replace: false }),
        };
        futures::executor::block_on(sm.apply([entry])).unwrap();
        (dir, sm)
    }

    fn hlc(ms: u64, logical: u32) -> Hlc {
        Hlc { physical_ms: ms, logical }
    }

    /// Applies `cmd` as the next log entry.
    async fn apply(sm: &mut StateMachine, cmd: Command) -> CommandResult {
        let index = sm.last_applied.map(|l| l.index + 1).unwrap_or(1);
        let entry =
            Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) };
        sm.apply([entry]).await.unwrap().remove(0)
    }

    /// Builds a snapshot on `from` and installs it on `to`, as a follower
    /// receives one.
    async fn transfer_snapshot(from: &mut StateMachine, to: &mut StateMachine) {
        let snap = from.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let mut incoming = to.begin_receiving_snapshot().await.unwrap();
        let mut sent = snap.snapshot;
        tokio::io::copy(&mut sent, &mut incoming).await.unwrap();
        to.install_snapshot(&snap.meta, incoming).await.unwrap();
    }

    /// Deletes `k` at `at`; the tombstone's version.
    async fn delete_k(sm: &mut StateMachine, at: Hlc) -> Version {
        match apply(sm, Command::Delete { key: "k".into(), hlc: at }).await {
            CommandResult::Delete { version, .. } => version,
            other => panic!("delete result: {other:?}"),
        }
    }

    fn put(key: &str, value: &str, at: Hlc) -> Command {
        Command::Put { key: key.into(), value: value.into(), hlc: at }
    }

    fn remote(origin_index: u64, key: &str, value: Option<&str>, at: Hlc) -> RemoteEntry {
        RemoteEntry { origin_index, key: key.into(), value: value.map(|v| v.into()), hlc: at }
    }

    #[tokio::test]
    async fn an_entry_is_applied_only_once_the_log_holds_it_synced() {
        let (_dir, mut sm) = open("us-east", &[], Mode::ActivePassive, "us-east");
        let (sync_to, synced) = LogSynced::for_test(Some(LogId::new(CommittedLeaderId::new(1, 1), 0)));
        sm.apply_only_synced(synced);
        let entry =
            |index| Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank };
        // Entries 1 and 2 are queued in the log, not synced: the apply waits.
        let early = tokio::time::timeout(Duration::from_millis(200), sm.apply([entry(1), entry(2)])).await;
        assert!(early.is_err(), "applied before the log was synced: {early:?}");
        assert_eq!(sm.reader().applied_index(), 0);
        sync_to(Some(LogId::new(CommittedLeaderId::new(1, 1), 1)));
        let half = tokio::time::timeout(Duration::from_millis(200), sm.apply([entry(1), entry(2)])).await;
        assert!(half.is_err(), "applied entry 2 with the log synced through 1 only");
        sync_to(Some(LogId::new(CommittedLeaderId::new(1, 1), 2)));
        let applied = tokio::time::timeout(Duration::from_secs(5), sm.apply([entry(1), entry(2)])).await;
        assert_eq!(applied.expect("applied once synced").unwrap().len(), 2);
        assert_eq!(sm.reader().applied_index(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_wait_is_met_by_the_next_apply_or_alone_when_idle() {
        // Shows: a wait for an applied index to be durable leaves the sync
        // to the next apply (which commits durably, so the wait ends without
        // a commit of its own); with no apply coming the waiter syncs alone.
        let (_d, mut sm) = open("a", &[], Mode::ActiveActive, "");
        let durable = sm.durable_applied();
        apply(&mut sm, put("k", "v1", hlc(1, 0))).await;
        let first = sm.applied.load(Ordering::Acquire);
        assert!(*durable.durable.borrow() < first, "the interval's durable commit came early");
        durable.want(first);
        apply(&mut sm, put("k", "v2", hlc(2, 0))).await;
        let second = sm.applied.load(Ordering::Acquire);
        assert_eq!(*durable.durable.borrow(), second, "the apply after the wait did not commit durably");
        tokio::time::timeout(Duration::from_secs(5), durable.reach(first)).await.unwrap().unwrap();
        // Idle: no apply follows, and the waiter syncs by itself.
        apply(&mut sm, put("k", "v3", hlc(3, 0))).await;
        let third = sm.applied.load(Ordering::Acquire);
        assert!(*durable.durable.borrow() < third, "an apply nobody waited for committed durably");
        tokio::time::timeout(Duration::from_secs(5), durable.reach(third)).await.unwrap().unwrap();
        assert_eq!(*durable.durable.borrow(), third);
    }

    #[tokio::test]
    async fn remote_writes_merge_last_writer_wins_on_hlc_then_origin() {
        // (local write's hlc, remote hlc, remote origin, value that must win)
        let table = [
            (hlc(100, 0), hlc(200, 0), "b", "remote"),
            (hlc(200, 0), hlc(100, 0), "b", "local"),
            (hlc(100, 5), hlc(100, 6), "b", "remote"),
            // Equal timestamps: the greater origin name wins ("b" > "a").
            (hlc(100, 0), hlc(100, 0), "b", "remote"),
            (hlc(100, 0), hlc(100, 0), "0", "local"),
        ];
        for (local_at, remote_at, origin, winner) in table {
            let (_d, mut sm) = open("a", &[origin], Mode::ActiveActive, "");
            apply(&mut sm, put("k", "local", local_at)).await;
            let entries = vec![remote(1, "k", Some("remote"), remote_at)];
            apply(
                &mut sm,
                Command::ApplyRemote {
                    origin: origin.into(),
                    epoch: 0,
                    entries,
                    complete_through: 1,
                    collect_below_ms: u64::MAX,
                },
            )
            .await;
            let got = sm.reader().get(b"k").unwrap().unwrap();
            assert_eq!(got.value.as_deref(), Some(winner.as_bytes()), "local {local_at} vs {origin} {remote_at}");
        }
    }

    #[tokio::test]
    async fn a_batch_applies_its_writes_in_order_with_distinct_versions() {
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let batch = Command::Batch(vec![
            put("k", "1", hlc(5, 0)),
            put("k", "2", hlc(5, 0)),
            Command::CompareAndSwap { key: "n".into(), value: "x".into(), expected: Expected::Absent, hlc: hlc(5, 0) },
            Command::AckShipped { region: "b".into(), index: 0, peer_index: 0, collect_below_ms: u64::MAX },
        ]);
        let CommandResult::Batch(results) = apply(&mut sm, batch).await else { panic!("batch result") };
        let versions: Vec<u64> = results
            .iter()
            .filter_map(|r| match r {
                CommandResult::Put { version } => Some(version.index),
                CommandResult::CompareAndSwap { version: Some(v), .. } => Some(v.index),
                _ => None,
            })
            .collect();
        assert_eq!(versions, vec![version_index(1, 0), version_index(1, 1), version_index(1, 2)]);
        assert!(matches!(results[3], CommandResult::Rejected { .. }), "only client writes may be batched");
        let k = sm.reader().get(b"k").unwrap().unwrap();
        assert_eq!(k.value.as_deref(), Some(&b"2"[..]), "the later write in the batch wins");
        assert!(k.version.hlc > hlc(5, 0), "versions of a key only grow, even within a batch");
        assert_eq!(sm.reader().changefeed_len(), 3);
    }

    #[tokio::test]
    async fn a_full_sync_rebuilds_a_region_and_marks_it_until_its_last_page() {
        let (_d, mut sm) = open("b", &["a", "c"], Mode::ActivePassive, "a");
        apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "c".into(),
                epoch: 0,
                entries: vec![remote(2, "k2", Some("newer-from-c"), hlc(50, 0))],
                complete_through: 2,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        let entry = |k: &str, v: Option<&str>, at: u64, origin: &str| SyncEntry {
            key: k.into(),
            value: v.map(Into::into),
            hlc: hlc(at, 0),
            origin: origin.into(),
        };
        let page = |entries, through| Command::FullSync { origin: "a".into(), epoch: 0, entries, through };
        let first = page(vec![entry("k1", Some("1"), 10, "a"), entry("k2", Some("old"), 20, "c")], 0);
        assert_eq!(apply(&mut sm, first).await, CommandResult::Remote { applied: 1, applied_through: 0 });
        let state = sm.reader().region_state();
        assert!(state.full_sync_from.contains("a"), "in full sync after the first page");
        assert_eq!(state.applied_from.get("a"), None, "nothing counts as applied from a before the last page");
        let last = page(vec![entry("k3", None, 30, "a"), entry("k4", Some("4"), 40, "c")], 77);
        assert_eq!(apply(&mut sm, last).await, CommandResult::Remote { applied: 2, applied_through: 77 });
        let state = sm.reader().region_state();
        assert!(state.full_sync_from.is_empty(), "the last page ends the sync");
        assert_eq!((state.applied_from["a"], state.complete_from["a"]), (77, 77));
        let get = |k: &[u8]| sm.reader().get(k).unwrap().unwrap();
        assert_eq!(get(b"k1").value.as_deref(), Some(&b"1"[..]));
        assert_eq!(get(b"k2").value.as_deref(), Some(&b"newer-from-c"[..]), "a newer write is kept");
        assert_eq!(get(b"k3").value, None, "a tombstone arrives as a tombstone");
        assert_eq!(get(b"k4").version.origin, "c", "a value keeps its own origin, not the sender's");
        let stale = Command::FullSync { origin: "z".into(), epoch: 0, entries: Vec::new(), through: 1 };
        assert!(matches!(apply(&mut sm, stale).await, CommandResult::Rejected { .. }), "only from a peer");
    }

    #[tokio::test]
    async fn a_shipment_applied_twice_counts_once() {
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let batch = vec![remote(3, "x", Some("1"), hlc(10, 0)), remote(7, "y", Some("2"), hlc(11, 0))];
        let first = apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 0,
                entries: batch.clone(),
                complete_through: 7,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        assert_eq!(first, CommandResult::Remote { applied: 2, applied_through: 7 });
        let mut overlapping = batch;
        overlapping.push(remote(9, "z", Some("3"), hlc(12, 0)));
        let again = apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 0,
                entries: overlapping,
                complete_through: 9,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        assert_eq!(again, CommandResult::Remote { applied: 1, applied_through: 9 });
        let region = sm.reader().region_state();
        assert_eq!(region.applied_total["b"], 3);
        assert_eq!(sm.reader().changefeed_len(), 0, "replicated writes are never shipped again");
    }

    #[tokio::test]
    async fn tombstones_are_collected_only_after_every_peer_acknowledged_them() {
        let (_d, mut sm) = open("a", &["b", "c"], Mode::ActiveActive, "");
        apply(&mut sm, put("k", "v", hlc(1, 0))).await;
        let version = delete_k(&mut sm, hlc(2, 0)).await;
        assert_eq!(sm.reader().changefeed_len(), 2);
        apply(
            &mut sm,
            Command::AckShipped { region: "b".into(), index: version.index, peer_index: 0, collect_below_ms: u64::MAX },
        )
        .await;
        assert_eq!(sm.reader().changefeed_len(), 2, "c has not applied them yet");
        assert!(sm.reader().get(b"k").unwrap().is_some(), "the tombstone stays until every peer has it");
        apply(
            &mut sm,
            Command::AckShipped { region: "c".into(), index: version.index, peer_index: 0, collect_below_ms: u64::MAX },
        )
        .await;
        assert_eq!(sm.reader().changefeed_len(), 0);
        assert!(sm.reader().get(b"k").unwrap().is_none(), "the acknowledged tombstone is collected");
    }

    #[tokio::test]
    async fn a_tombstone_outlives_older_writes_still_in_flight_from_a_peer() {
        // a deletes k; b acknowledges the delete at its log index 40, but b's
        // own concurrent (older) put of k, at b's index 30, has not reached a.
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let version = delete_k(&mut sm, hlc(10, 0)).await;
        apply(
            &mut sm,
            Command::AckShipped {
                region: "b".into(),
                index: version.index,
                peer_index: 40,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        assert!(sm.reader().get(b"k").unwrap().is_some(), "the tombstone must wait for b's writes up to index 40");
        let late = vec![remote(30, "k", Some("old"), hlc(5, 0))];
        apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 0,
                entries: late,
                complete_through: 40,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        // The older put lost to the tombstone, and holding b's writes through
        // 40 frees the tombstone in the same apply: no older write can come.
        assert!(sm.reader().get(b"k").unwrap().is_none(), "collected, and the older put did not resurrect k");
        assert_eq!(sm.reader().changefeed_len(), 0);
    }

    #[tokio::test]
    async fn secondary_and_fenced_regions_refuse_local_writes_at_apply_time() {
        let (_d, mut secondary) = open("b", &["a"], Mode::ActivePassive, "a");
        let r = apply(&mut secondary, put("k", "v", hlc(1, 0))).await;
        assert!(
            matches!(r, CommandResult::Rejected { retry_later: false, ref reason } if reason.contains("primary region a"))
        );
        let (_d, mut primary) = open("a", &["b"], Mode::ActivePassive, "a");
        assert!(matches!(apply(&mut primary, put("k", "v", hlc(1, 0))).await, CommandResult::Put { .. }));
        let fence = Command::SetRole { primary: "a".into(), epoch: 0, fenced_until_ms: 100, shipped_through: 0 };
        apply(&mut primary, fence).await;
        let r = apply(&mut primary, put("k", "w", hlc(2, 0))).await;
        assert!(matches!(r, CommandResult::Rejected { retry_later: true, .. }), "{r:?}");
        assert_eq!(primary.reader().get(b"k").unwrap().unwrap().value.as_deref(), Some(&b"v"[..]));
        // The fence expires by itself: a write stamped after it applies.
        let later = apply(&mut primary, put("k", "x", hlc(100, 0))).await;
        assert!(matches!(later, CommandResult::Put { .. }), "{later:?}");
    }

    #[tokio::test]
    async fn demotion_moves_exactly_the_unshipped_writes_to_the_divergence_record() {
        let (_d, mut sm) = open("a", &["b"], Mode::ActivePassive, "a");
        for i in 1..=5u64 {
            apply(&mut sm, put(&format!("k{i}"), "v", hlc(i, 0))).await;
        }
        let demote = Command::SetRole {
            primary: "b".into(),
            epoch: 1,
            fenced_until_ms: 0,
            shipped_through: version_index(3, 0),
        };
        let r = apply(&mut sm, demote).await;
        assert_eq!(r, CommandResult::Role { divergent: vec![b"k4".to_vec(), b"k5".to_vec()] });
        let reader = sm.reader();
        assert_eq!(reader.region_state().divergent_total, 2);
        let records = reader.divergent(0, 10, 1 << 20).unwrap().0;
        let indexes: Vec<u64> = records.iter().map(|r| r.version.index).collect();
        assert_eq!(indexes, vec![version_index(4, 0), version_index(5, 0)]);
        // Writes 1..=3 reached b; they leave the changefeed when b's ack is applied.
        assert_eq!(reader.changefeed_len(), 3);
        assert_eq!(reader.primary(), "b");
        // A second notice of the same epoch changes nothing.
        let again = Command::SetRole { primary: "b".into(), epoch: 1, fenced_until_ms: 0, shipped_through: 0 };
        assert_eq!(apply(&mut sm, again).await, CommandResult::Role { divergent: vec![] });
        assert_eq!(sm.reader().region_state().divergent_total, 2);
    }

    #[tokio::test]
    async fn two_primaries_at_one_epoch_resolve_to_the_same_one_in_either_order() {
        // Regions b and c were both promoted at epoch 1; every region ends
        // with b (the first name), whichever notice it applies first, and c
        // records its own writes since as divergent.
        let role = |p: &str, shipped_through| Command::SetRole {
            primary: p.into(),
            epoch: 1,
            fenced_until_ms: 0,
            shipped_through,
        };
        for order in [["b", "c"], ["c", "b"]] {
            let (_d, mut a) = open("a", &["b", "c"], Mode::ActivePassive, "a");
            for p in order {
                apply(&mut a, role(p, 0)).await;
            }
            assert_eq!((a.reader().primary(), a.reader().region_state().epoch), ("b".to_string(), 1), "{order:?}");
        }
        let (_d, mut c) = open("c", &["a", "b"], Mode::ActivePassive, "a");
        apply(&mut c, role("c", 0)).await;
        apply(&mut c, put("k", "v", hlc(5, 0))).await;
        let r = apply(&mut c, role("b", 0)).await;
        assert_eq!(r, CommandResult::Role { divergent: vec![b"k".to_vec()] });
        assert_eq!(c.reader().primary(), "b");
        let r = apply(&mut c, role("c", 0)).await;
        assert_eq!(r, CommandResult::Role { divergent: vec![] }, "the loser's own notice changes nothing now");
        assert_eq!(c.reader().primary(), "b");
    }

    #[tokio::test]
    async fn a_snapshot_carries_the_changefeed_roles_and_divergence() {
        let (_d1, mut a) = open("a", &["b"], Mode::ActivePassive, "a");
        for i in 1..=4u64 {
            apply(&mut a, put(&format!("k{i}"), "v", hlc(i, 0))).await;
        }
        let shipped_through = version_index(2, 0);
        apply(&mut a, Command::SetRole { primary: "b".into(), epoch: 1, fenced_until_ms: 0, shipped_through }).await;
        let entries = vec![remote(9, "r", Some("x"), hlc(50, 0))];
        apply(
            &mut a,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 1,
                entries,
                complete_through: 9,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        let (_d2, mut b) = open("a", &["b"], Mode::ActivePassive, "a");
        transfer_snapshot(&mut a, &mut b).await;
        let (ra, rb) = (a.reader(), b.reader());
        assert_eq!(ra.region_state(), rb.region_state());
        assert_eq!(ra.divergent(0, 10, 1 << 20).unwrap(), rb.divergent(0, 10, 1 << 20).unwrap());
        assert_eq!(ra.changefeed_after(0, 100, 1 << 20).unwrap(), rb.changefeed_after(0, 100, 1 << 20).unwrap());
        assert!(rb.region_state().resync_pending, "the demotion left divergent keys to resync");
        assert_eq!(rb.get(b"r").unwrap().unwrap().value.as_deref(), Some(&b"x"[..]));
    }

    fn in_session(cmd: Command, client: u8, seq: u64, first_unanswered: u64, retry: bool) -> Command {
        cmd.in_session(Some(SessionTag { client: [client; 16], seq, first_unanswered, retry }))
    }

    #[tokio::test]
    async fn a_repeated_session_write_returns_its_first_result_and_applies_once() {
        let (_d, mut sm) = open("a", &[], Mode::ActiveActive, "");
        let first = apply(&mut sm, in_session(put("k", "1", hlc(100, 0)), 1, 1, 1, false)).await;
        let CommandResult::Put { version } = &first else { panic!("put: {first:?}") };
        // Another client's write to the key in between.
        apply(&mut sm, put("k", "other", hlc(101, 0))).await;
        // The repeat (its first answer was lost) gets the first version and
        // does not write "1" over "other".
        let again = apply(&mut sm, in_session(put("k", "1", hlc(102, 0)), 1, 1, 1, true)).await;
        assert_eq!(again, CommandResult::Put { version: version.clone() });
        assert_eq!(sm.reader().get(b"k").unwrap().unwrap().value.as_deref(), Some(&b"other"[..]));

        // A compare-and-swap that succeeded reports success when repeated,
        // although its comparison no longer holds.
        let cas = |seq, retry| {
            let cmd = Command::CompareAndSwap {
                key: "c".into(),
                value: "v".into(),
                expected: Expected::Absent,
                hlc: hlc(103, 0),
            };
            in_session(cmd, 1, seq, 2, retry)
        };
        let done = apply(&mut sm, cas(2, false)).await;
        assert!(matches!(done, CommandResult::CompareAndSwap { succeeded: true, .. }), "{done:?}");
        assert_eq!(apply(&mut sm, cas(2, true)).await, done);
        // Once the client has the answer (first_unanswered passed 2), a
        // repeat is unknown, never applied again.
        apply(&mut sm, in_session(put("x", "1", hlc(104, 0)), 1, 3, 3, false)).await;
        assert_eq!(apply(&mut sm, cas(2, true)).await, CommandResult::SessionExpired { seq: 2 });
    }

    #[tokio::test]
    async fn idle_sessions_expire_by_the_session_clock_and_sessions_travel_in_snapshots() {
        let (_d, mut a) = open("a", &[], Mode::ActiveActive, "");
        let t0 = 1_000_000;
        apply(&mut a, in_session(put("k", "1", hlc(t0, 0)), 1, 1, 1, false)).await;
        apply(&mut a, in_session(put("k", "2", hlc(t0 + 1, 0)), 2, 1, 1, false)).await;
        // Snapshot to a new replica: both sessions recognise their writes.
        let (_d2, mut b) = open("a", &[], Mode::ActiveActive, "");
        transfer_snapshot(&mut a, &mut b).await;
        assert_eq!(b.session_clock, t0 + 1);
        let repeat = apply(&mut b, in_session(put("k", "1", hlc(t0 + 2, 0)), 1, 1, 1, true)).await;
        assert!(matches!(repeat, CommandResult::Put { .. }), "{repeat:?}");
        assert_eq!(b.reader().get(b"k").unwrap().unwrap().value.as_deref(), Some(&b"2"[..]), "not applied again");
        // Client 2 keeps writing; client 1 goes idle past SESSION_IDLE_MS and
        // its session is dropped at the next sweep: a repeat of its first
        // write, that late, is new to the region (client 2's still is not).
        let later = t0 + SESSION_IDLE_MS + SESSION_SWEEP_MS + 1;
        apply(&mut b, in_session(put("k", "3", hlc(later, 0)), 2, 2, 2, false)).await;
        apply(&mut b, in_session(put("k", "repeat", hlc(later + 1, 0)), 2, 2, 2, true)).await;
        assert_eq!(b.reader().get(b"k").unwrap().unwrap().value.as_deref(), Some(&b"3"[..]));
        apply(&mut b, in_session(put("k", "1", hlc(later + 2, 0)), 1, 1, 1, true)).await;
        assert_eq!(b.reader().get(b"k").unwrap().unwrap().value.as_deref(), Some(&b"1"[..]), "session 1 expired");
        // The clock and the sessions survive a restart.
        let clock = b.session_clock;
        drop(b);
        let reopened = StateMachine::open(_d2.path(), 1 << 20, None, Arc::new(HlcClock::wall(500))).unwrap();
        assert_eq!(reopened.session_clock, clock);
    }

    #[tokio::test]
    async fn the_archive_keeps_local_writes_until_stored_and_travels_in_snapshots() {
        let (_d1, mut a) = open("a", &[], Mode::ActiveActive, "");
        apply(&mut a, put("before", "v", hlc(1, 0))).await;
        assert!(a.reader().archive_after(0, 100, 1 << 20).unwrap().0.is_empty(), "off until turned on");
        apply(&mut a, Command::Archived { on: true, through: 0 }).await;
        let since = a.reader().archive_state().since;
        assert_eq!(since, 2, "on from the entry that turned it on");
        for i in 1..=4u64 {
            apply(&mut a, put(&format!("k{i}"), "v", hlc(10 + i, 0))).await;
        }
        apply(&mut a, Command::Delete { key: b"k1".to_vec(), hlc: hlc(20, 0) }).await;
        let (all, complete) = a.reader().archive_after(0, 100, 1 << 20).unwrap();
        assert!(complete);
        let keys: Vec<&[u8]> = all.iter().map(|(_, r)| r.key.as_slice()).collect();
        assert_eq!(keys, [&b"k1"[..], b"k2", b"k3", b"k4", b"k1"]);
        assert!(all[4].1.value.value.is_none(), "a delete is archived as a tombstone");
        // Stored through the second write: those two go.
        apply(&mut a, Command::Archived { on: true, through: all[1].0 }).await;
        let left = a.reader().archive_after(0, 100, 1 << 20).unwrap().0;
        assert_eq!(left, all[2..].to_vec());
        let state = a.reader().archive_state();
        assert_eq!((state.on, state.since, state.through), (true, since, all[1].0));
        // A follower that installs a snapshot holds the same archive.
        let (_d2, mut b) = open("a", &[], Mode::ActiveActive, "");
        transfer_snapshot(&mut a, &mut b).await;
        assert_eq!(b.reader().archive_after(0, 100, 1 << 20).unwrap().0, left);
        assert_eq!(b.reader().archive_state(), state);
        apply(&mut b, put("k5", "v", hlc(30, 0))).await;
        assert_eq!(b.reader().archive_after(0, 100, 1 << 20).unwrap().0.len(), 4, "still archiving after the install");
        // Off: the archive goes, and later writes are not kept.
        apply(&mut b, Command::Archived { on: false, through: 0 }).await;
        apply(&mut b, put("k6", "v", hlc(31, 0))).await;
        assert!(b.reader().archive_after(0, 100, 1 << 20).unwrap().0.is_empty());
        assert!(!b.reader().archive_state().on);
    }

    #[tokio::test]
    async fn tombstones_are_collected_while_the_peer_keeps_writing() {
        // b acknowledges a's delete while b's own writes keep flowing: each
        // acknowledgement names a later b position than a holds yet, but the
        // first one that covered the delete is held soon, and that suffices.
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let version = delete_k(&mut sm, hlc(10, 0)).await;
        let mut b_index = 100;
        for round in 0..5u64 {
            // b acknowledged everything so far, at its own position b_index...
            let acked = version.index + round;
            apply(
                &mut sm,
                Command::AckShipped {
                    region: "b".into(),
                    index: acked,
                    peer_index: b_index,
                    collect_below_ms: u64::MAX,
                },
            )
            .await;
            // ...while a holds b's writes only up to the previous position.
            let entries = vec![remote(b_index - 50, "other", Some("x"), hlc(20 + round, 0))];
            apply(
                &mut sm,
                Command::ApplyRemote {
                    origin: "b".into(),
                    epoch: 0,
                    entries,
                    complete_through: b_index - 50,
                    collect_below_ms: u64::MAX,
                },
            )
            .await;
            apply(&mut sm, put("filler", "v", hlc(30 + round, 0))).await;
            b_index += 100;
        }
        assert!(sm.reader().get(b"k").unwrap().is_none(), "the tombstone is collected under steady peer writes");
        let region = sm.reader().region_state();
        assert!(region.ack_history["b"].len() < 5, "acknowledgements below collected tombstones are dropped");
    }

    #[tokio::test]
    async fn a_tombstone_waits_for_the_peer_writes_of_the_first_ack_that_covered_it() {
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let version = delete_k(&mut sm, hlc(10, 0)).await;
        apply(
            &mut sm,
            Command::AckShipped {
                region: "b".into(),
                index: version.index,
                peer_index: 40,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        let early = vec![remote(39, "x", Some("1"), hlc(5, 0))];
        apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 0,
                entries: early,
                complete_through: 39,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        apply(&mut sm, put("more", "v", hlc(11, 0))).await;
        apply(
            &mut sm,
            Command::AckShipped {
                region: "b".into(),
                index: version.index + 1,
                peer_index: 90,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        assert!(sm.reader().get(b"k").unwrap().is_some(), "b's write 40 may still be older: never early");
        apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "b".into(),
                epoch: 0,
                entries: vec![],
                complete_through: 40,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        apply(
            &mut sm,
            Command::AckShipped {
                region: "b".into(),
                index: version.index + 1,
                peer_index: 95,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        assert!(sm.reader().get(b"k").unwrap().is_none(), "held through 40: collected, though b is at 95 now");
    }

    #[tokio::test]
    async fn a_tombstone_stamped_ahead_of_the_clocks_waits_until_they_pass_it() {
        // A tombstone stamped far ahead (a clock that jumped) is kept until
        // the proposers' clocks pass it; collecting it earlier would let a
        // later write to the key be stamped below the tombstone the peer
        // keeps, and lose there.
        let (_d, mut sm) = open("a", &["b"], Mode::ActiveActive, "");
        let version = delete_k(&mut sm, hlc(10_000, 0)).await;
        let ack = |below| Command::AckShipped {
            region: "b".into(),
            index: version.index,
            peer_index: 0,
            collect_below_ms: below,
        };
        apply(&mut sm, ack(5_000)).await;
        assert!(sm.reader().get(b"k").unwrap().is_some(), "stamped at 10 s, clocks at 5 s: kept");
        assert_eq!(sm.reader().changefeed_len(), 1);
        apply(&mut sm, ack(10_001)).await;
        assert!(sm.reader().get(b"k").unwrap().is_none(), "the clocks passed it: collected");
        assert_eq!(sm.reader().changefeed_len(), 0);
    }

    #[tokio::test]
    async fn replicated_input_beyond_the_limits_is_refused_at_apply_not_asserted() {
        let (_d, mut sm) = open("a", &["b"], Mode::ActivePassive, "a");
        let too_many =
            Command::Batch((0..=WRITES_PER_ENTRY_MAX).map(|i| put(&format!("k{i}"), "v", hlc(1, 0))).collect());
        let CommandResult::Batch(results) = apply(&mut sm, too_many).await else { panic!("batch result") };
        assert!(results.iter().all(|r| matches!(r, CommandResult::Rejected { .. })));
        assert!(sm.reader().get(b"k0").unwrap().is_none(), "nothing of the refused batch applied");
        let role = Command::SetRole { primary: "b".into(), epoch: u64::MAX, fenced_until_ms: 0, shipped_through: 0 };
        assert!(matches!(apply(&mut sm, role).await, CommandResult::Rejected { .. }));
        let ship = Command::ApplyRemote {
            origin: "b".into(),
            epoch: EPOCH_MAX + 1,
            entries: vec![],
            complete_through: 0,
            collect_below_ms: u64::MAX,
        };
        assert!(matches!(apply(&mut sm, ship).await, CommandResult::Rejected { .. }));
        assert_eq!(sm.reader().region_state().epoch, 0);
        // The region still serves.
        assert!(matches!(apply(&mut sm, put("k", "v", hlc(2, 0))).await, CommandResult::Put { .. }));
    }

    #[tokio::test]
    async fn a_cas_on_a_write_from_another_region_matches_that_write_not_its_index() {
        let (_d, mut sm) = open("b", &["a"], Mode::ActiveActive, "");
        // a's write of k reaches b; its index in b is b's own log index.
        let from_a = Version { hlc: hlc(100, 0), origin: "a".into(), index: version_index(7, 0) };
        let entries = vec![remote(5, "k", Some("from-a"), from_a.hlc)];
        apply(
            &mut sm,
            Command::ApplyRemote {
                origin: "a".into(),
                epoch: 0,
                entries,
                complete_through: 5,
                collect_below_ms: u64::MAX,
            },
        )
        .await;
        // b then writes k itself; its index happens to equal a's index of the
        // earlier write (what a reader in region a saw).
        while sm.last_applied.map(|l| l.index + 1) != Some(7) {
            apply(&mut sm, put("filler", "v", hlc(101, 0))).await;
        }
        let CommandResult::Put { version: ours } = apply(&mut sm, put("k", "from-b", hlc(102, 0))).await else {
            panic!("put result")
        };
        assert_eq!(ours.index, from_a.index, "the coincidence the index alone cannot tell apart");
        let by_write = Command::CompareAndSwap {
            key: "k".into(),
            value: "x".into(),
            expected: Expected::Write { hlc: from_a.hlc, origin: from_a.origin.clone() },
            hlc: hlc(103, 0),
        };
        let CommandResult::CompareAndSwap { succeeded, .. } = apply(&mut sm, by_write).await else { panic!("cas") };
        assert!(!succeeded, "a's write was replaced: the CAS must fail");
        let by_ours = Command::CompareAndSwap {
            key: "k".into(),
            value: "y".into(),
            expected: Expected::Write { hlc: ours.hlc, origin: "b".into() },
            hlc: hlc(104, 0),
        };
        let CommandResult::CompareAndSwap { succeeded, .. } = apply(&mut sm, by_ours).await else { panic!("cas") };
        assert!(succeeded, "the current write, named by hlc and origin, matches");
    }

    #[tokio::test]
    async fn the_first_setup_wins_and_nothing_waits_for_it_is_applied_before() {
        let (_dir, mut sm) = fresh();
        let early = apply(&mut sm, put("k", "v", hlc(1, 0))).await;
        assert!(matches!(early, CommandResult::Rejected { retry_later: true, .. }), "{early:?}");
        let setup =
            |mode| ReplicationSetup { region: "a".into(), peers: vec!["b".into()], mode, initial_primary: "a".into() };
        let first = Command::Configure { setup: setup(Mode::ActivePassive), replace: false };
        assert_eq!(apply(&mut sm, first.clone()).await, CommandResult::None);
        assert_eq!(apply(&mut sm, first).await, CommandResult::None, "the same setup again is no change");
        let other = Command::Configure { setup: setup(Mode::ActiveActive), replace: false };
        assert!(
            matches!(apply(&mut sm, other).await, CommandResult::Rejected { .. }),
            "a leader's differing file loses"
        );
        assert_eq!(sm.reader().setup().unwrap().mode, Mode::ActivePassive);
        let operator = Command::Configure { setup: setup(Mode::ActiveActive), replace: true };
        assert_eq!(apply(&mut sm, operator).await, CommandResult::None);
        assert_eq!(sm.reader().setup().unwrap().mode, Mode::ActiveActive);
        assert!(matches!(apply(&mut sm, put("k", "v", hlc(2, 0))).await, CommandResult::Put { .. }));
    }
}
