//! The key-value state machine on sled (openraft's `RaftStateMachine`), and
//! its snapshots.
//!
//! Layout: tree `state` maps `d` + key to an encoded [`StoredValue`] and
//! holds the last applied log id and membership under `m` keys; tree
//! `snapshot` holds the most recent snapshot (meta and data) under one key.
//!
//! Invariants:
//! - One `apply` call writes all its entries' effects and the new applied log
//!   id in one atomic sled batch, so the state on disk always matches some
//!   applied index exactly.
//! - Applying is deterministic: every replica computes the same versions from
//!   the same log. A local write's HLC is raised above the version it
//!   replaces, so versions of a key only grow.
//! - Deletes leave tombstones carrying their version; reads treat them as
//!   absent.
//! - A failure to apply a committed entry is returned to openraft, which
//!   stops the node: the replica can no longer be trusted.
//!
//! Caveats:
//! - Applies are not flushed on their own: the log is durable, and after a
//!   crash openraft re-applies from the last applied index found on disk.
//!   Snapshot builds and log purges flush, so applied never falls behind the
//!   purged log.
//! - A snapshot is the whole key space in memory, copied while the state
//!   machine worker waits. Fine for the data sizes nines targets today; a
//!   streaming snapshot is future work.
//! - Tombstones are kept forever for now; cross-region replication decides
//!   when they may be collected.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::record;
use crate::hlc::{Hlc, HlcClock};
use crate::types::{
    Command, CommandResult, Entry, Expected, LogId, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, StoredValue, TypeConfig, Version,
};

const DATA_PREFIX: u8 = b'd';
const APPLIED_KEY: &[u8] = b"m:applied";
const MEMBERSHIP_KEY: &[u8] = b"m:membership";
const SNAPSHOT_KEY: &[u8] = b"current";

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA_PREFIX);
    k.extend_from_slice(key);
    k
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::new(&e),
    )
    .into()
}

fn snapshot_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        openraft::AnyError::new(&e),
    )
    .into()
}

/// The data of a snapshot: every stored key with its value or tombstone.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    entries: Vec<(Vec<u8>, StoredValue)>,
}

/// A snapshot as kept on disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// An encoded record of [`SnapshotData`].
    data: Vec<u8>,
}

/// Key-value pairs of a scan page, and whether more remain.
pub type ScanPage = (Vec<(Vec<u8>, StoredValue)>, bool);

/// A read-only view of the state machine for serving reads. Cloning shares it.
#[derive(Clone)]
pub struct StateReader {
    tree: sled::Tree,
    applied: Arc<AtomicU64>,
}

/// Why a read of the state failed: the store could not be read, or a record
/// is corrupt.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("storage read failed: {0}")]
    Io(#[from] sled::Error),
    #[error("corrupt record for key {key:?}: {source}")]
    Corrupt {
        key: Vec<u8>,
        source: record::RecordError,
    },
}

impl StateReader {
    /// The log index the state reflects at least.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The stored value or tombstone of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        match self.tree.get(data_key(key))? {
            None => Ok(None),
            Some(bytes) => record::decode(&bytes)
                .map(Some)
                .map_err(|source| ReadError::Corrupt {
                    key: key.to_vec(),
                    source,
                }),
        }
    }

    /// Live values with keys in `[start, end)` (`end` empty: no upper bound),
    /// in key order. Stops after `limit` values or once keys and values
    /// reach `bytes_max`; the flag says whether more remain.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        bytes_max: usize,
    ) -> Result<ScanPage, ReadError> {
        let lo = data_key(start);
        let hi = if end.is_empty() {
            vec![DATA_PREFIX + 1]
        } else {
            data_key(end)
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.tree.range(lo..hi) {
            let (k, v) = item?;
            let key = k[1..].to_vec();
            let stored: StoredValue = record::decode(&v).map_err(|source| ReadError::Corrupt {
                key: key.clone(),
                source,
            })?;
            let Some(value) = stored.live() else { continue };
            if out.len() >= limit || (bytes > 0 && bytes + key.len() + value.len() > bytes_max) {
                return Ok((out, true));
            }
            bytes += key.len() + value.len();
            out.push((key, stored));
        }
        Ok((out, false))
    }
}

/// The state machine of one node.
pub struct StateMachine {
    db: sled::Db,
    tree: sled::Tree,
    snapshots: sled::Tree,
    /// This node's region: the origin of writes accepted here.
    region: String,
    clock: Arc<HlcClock>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Shared with readers; updated after each applied batch is written.
    applied: Arc<AtomicU64>,
    /// Distinguishes snapshots built at the same log id.
    snapshot_seq: u64,
}

impl StateMachine {
    pub fn open(db: &sled::Db, region: &str, clock: Arc<HlcClock>) -> Result<Self, StorageError> {
        let open = |name: &str| db.open_tree(name).map_err(|e| sm_err(ErrorVerb::Read, e));
        let tree = open("state")?;
        let snapshots = open("snapshot")?;
        let read = |key: &[u8]| -> Result<Option<sled::IVec>, StorageError> {
            tree.get(key).map_err(|e| sm_err(ErrorVerb::Read, e))
        };
        let last_applied: Option<LogId> = match read(APPLIED_KEY)? {
            Some(b) => record::decode(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => None,
        };
        let membership: StoredMembership = match read(MEMBERSHIP_KEY)? {
            Some(b) => record::decode(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => StoredMembership::default(),
        };
        let applied = Arc::new(AtomicU64::new(last_applied.map(|l| l.index).unwrap_or(0)));
        Ok(StateMachine {
            db: db.clone(),
            tree,
            snapshots,
            region: region.to_string(),
            clock,
            last_applied,
            membership,
            applied,
            snapshot_seq: 0,
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            tree: self.tree.clone(),
            applied: self.applied.clone(),
        }
    }

    /// The current value of `key`, seeing writes earlier in the same batch.
    fn current(
        &self,
        overlay: &HashMap<Vec<u8>, StoredValue>,
        key: &[u8],
    ) -> Result<Option<StoredValue>, StorageError> {
        if let Some(v) = overlay.get(key) {
            return Ok(Some(v.clone()));
        }
        self.reader()
            .get(key)
            .map_err(|e| sm_err(ErrorVerb::Read, e))
    }

    /// The version of a local write at `index`, stamped `hlc` by the leader
    /// and raised above the version it replaces.
    fn local_version(&self, hlc: Hlc, index: u64, current: Option<&StoredValue>) -> Version {
        let hlc = match current {
            Some(c) if c.version.hlc >= hlc => c.version.hlc.successor(),
            _ => hlc,
        };
        self.clock.witness(hlc);
        Version {
            hlc,
            origin: self.region.clone(),
            index,
        }
    }

    fn apply_command(
        &self,
        overlay: &mut HashMap<Vec<u8>, StoredValue>,
        index: u64,
        cmd: Command,
    ) -> Result<CommandResult, StorageError> {
        Ok(match cmd {
            Command::Put { key, value, hlc } => {
                let current = self.current(overlay, &key)?;
                let version = self.local_version(hlc, index, current.as_ref());
                overlay.insert(
                    key,
                    StoredValue {
                        value: Some(value),
                        version: version.clone(),
                    },
                );
                CommandResult::Put { version }
            }
            Command::Delete { key, hlc } => {
                let current = self.current(overlay, &key)?;
                let existed = current.as_ref().is_some_and(|c| c.value.is_some());
                let version = self.local_version(hlc, index, current.as_ref());
                overlay.insert(
                    key,
                    StoredValue {
                        value: None,
                        version: version.clone(),
                    },
                );
                CommandResult::Delete { existed, version }
            }
            Command::CompareAndSwap {
                key,
                value,
                expected,
                hlc,
            } => {
                let current = self.current(overlay, &key)?;
                let live = current.as_ref().filter(|c| c.value.is_some());
                let matches = match (expected, live) {
                    (Expected::Absent, None) => true,
                    (Expected::Index(i), Some(c)) => c.version.index == i,
                    _ => false,
                };
                if matches {
                    let version = self.local_version(hlc, index, current.as_ref());
                    overlay.insert(
                        key,
                        StoredValue {
                            value: Some(value),
                            version: version.clone(),
                        },
                    );
                    CommandResult::CompareAndSwap {
                        succeeded: true,
                        version: Some(version),
                        current: None,
                    }
                } else {
                    let current = live.map(|c| (key.clone(), c.clone()));
                    CommandResult::CompareAndSwap {
                        succeeded: false,
                        version: None,
                        current,
                    }
                }
            }
        })
    }

    fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
        record::encode(value).map_err(|e| sm_err(ErrorVerb::Write, e))
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self
            .snapshots
            .get(SNAPSHOT_KEY)
            .map_err(|e| snapshot_err(ErrorVerb::Read, e))?
        {
            None => Ok(None),
            Some(b) => record::decode(&b)
                .map(Some)
                .map_err(|e| snapshot_err(ErrorVerb::Read, e)),
        }
    }

    async fn save_snapshot(
        db: &sled::Db,
        snapshots: &sled::Tree,
        snap: &StoredSnapshot,
    ) -> Result<(), StorageError> {
        let bytes = record::encode(snap).map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        snapshots
            .insert(SNAPSHOT_KEY, bytes)
            .map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        db.flush_async()
            .await
            .map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        Ok(())
    }
}

/// Builds a snapshot from a copy of the state taken by the state machine
/// worker, so applies that happen while it is encoded do not leak in.
pub struct SnapshotBuilder {
    db: sled::Db,
    snapshots: sled::Tree,
    meta: SnapshotMeta,
    copy: Result<Vec<(Vec<u8>, StoredValue)>, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let entries = std::mem::replace(&mut self.copy, Ok(Vec::new()))
            .map_err(|e| snapshot_err(ErrorVerb::Read, SnapshotCopy(e)))?;
        let data = record::encode(&SnapshotData { entries })
            .map_err(|e| snapshot_err(ErrorVerb::Write, e))?;
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data,
        };
        StateMachine::save_snapshot(&self.db, &self.snapshots, &stored).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("copying the state for a snapshot failed: {0}")]
struct SnapshotCopy(String);

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
        let mut overlay = HashMap::new();
        let mut results = Vec::new();
        let mut last_applied = self.last_applied;
        let mut membership = None;
        for entry in entries {
            if let Some(prev) = last_applied {
                assert!(
                    entry.log_id.index > prev.index,
                    "applying entry {} after {prev}: the log went backwards",
                    entry.log_id
                );
            }
            last_applied = Some(entry.log_id);
            results.push(match entry.payload {
                EntryPayload::Blank => CommandResult::None,
                EntryPayload::Normal(cmd) => {
                    self.apply_command(&mut overlay, entry.log_id.index, cmd)?
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResult::None
                }
            });
        }
        let mut batch = sled::Batch::default();
        for (key, value) in &overlay {
            batch.insert(data_key(key), Self::encode_state(value)?);
        }
        batch.insert(APPLIED_KEY, Self::encode_state(&last_applied)?);
        if let Some(m) = &membership {
            batch.insert(MEMBERSHIP_KEY, Self::encode_state(m)?);
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.last_applied = last_applied;
        if let Some(m) = membership {
            self.membership = m;
        }
        self.applied.store(
            last_applied.map(|l| l.index).unwrap_or(0),
            Ordering::Release,
        );
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        let last = self.last_applied;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let copy = (|| -> Result<Vec<(Vec<u8>, StoredValue)>, String> {
            let mut entries = Vec::new();
            for item in self.tree.scan_prefix([DATA_PREFIX]) {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let value: StoredValue =
                    record::decode(&v).map_err(|e| format!("key {:?}: {e}", &k[1..]))?;
                entries.push((k[1..].to_vec(), value));
            }
            Ok(entries)
        })();
        SnapshotBuilder {
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            meta,
            copy,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data_bytes = snapshot.into_inner();
        let data: SnapshotData =
            record::decode(&data_bytes).map_err(|e| snapshot_err(ErrorVerb::Read, e))?;
        let mut batch = sled::Batch::default();
        for item in self.tree.scan_prefix([DATA_PREFIX]) {
            let (k, _) = item.map_err(|e| sm_err(ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        for (key, value) in &data.entries {
            batch.insert(data_key(key), Self::encode_state(value)?);
        }
        batch.insert(APPLIED_KEY, Self::encode_state(&meta.last_log_id)?);
        batch.insert(MEMBERSHIP_KEY, Self::encode_state(&meta.last_membership)?);
        self.tree
            .apply_batch(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        for (_, value) in &data.entries {
            self.clock.witness(value.version.hlc);
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.applied.store(
            meta.last_log_id.map(|l| l.index).unwrap_or(0),
            Ordering::Release,
        );
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data_bytes,
        };
        Self::save_snapshot(&self.db, &self.snapshots, &stored).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
