//! The Raft log and vote on sled (openraft's `RaftLogStorage`).
//!
//! Layout: tree `raft_log` maps the big-endian log index to an encoded
//! [`Entry`]; tree `raft_meta` holds the vote, the last purged log id and the
//! committed log id.
//!
//! Invariants:
//! - `save_vote` returns, and `append` reports its entries persisted, only
//!   after sled has flushed them to disk: sled's `insert` alone is not
//!   durable. Appends are flushed by a background task that groups every
//!   append waiting into one flush (group commit) and reports them in order.
//! - The key of every log record equals the index inside it; a mismatch is
//!   reported as corruption.
//! - `purge` records the new last-purged id before it removes entries, so a
//!   crash between the two leaves entries that are merely redundant.
//!
//! Caveats:
//! - The committed log id is stored without a flush: openraft treats it as a
//!   hint that speeds up restart, and losing it only means re-learning the
//!   commit index from the leader.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError};

use super::record;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE_KEY: &[u8] = b"vote";
const LAST_PURGED_KEY: &[u8] = b"last_purged";
const COMMITTED_KEY: &[u8] = b"committed";

/// The Raft log of one node. Cloning shares the same trees (sled trees are
/// reference counted), which is how the log reader is made.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The state machine's applied index known to be on disk. `purge` waits
    /// for it to reach the purged index: openraft purges right after handing
    /// a received snapshot to the state machine worker, and a crash between a
    /// durable purge and a durable install would leave a hole between the
    /// applied index and the log. `None` only in the storage conformance
    /// suite, which purges a log with no state machine behind it.
    durable_applied: Option<tokio::sync::watch::Receiver<u64>>,
    /// Appends waiting to be made durable; the flusher task completes them
    /// in order, many per flush (group commit).
    flushes: tokio::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Appends that may wait for one flush. Under load openraft hands the log
/// one client write per append; grouping them is what turns one fsync per
/// write into one per batch. At the limit `append` waits, which slows the
/// leader down instead of growing memory.
const FLUSH_QUEUE_MAX: usize = 4096;

/// Makes appended entries durable: takes every append waiting, flushes
/// once, and reports all of them persisted (or all failed), in order.
async fn flusher(db: sled::Db, mut pending: tokio::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    let mut batch = Vec::new();
    while pending.recv_many(&mut batch, FLUSH_QUEUE_MAX).await > 0 {
        let started = std::time::Instant::now();
        let flushed = db.flush_async().await;
        crate::telemetry::log_fsync(started);
        for callback in batch.drain(..) {
            match &flushed {
                Ok(_) => callback.log_io_completed(Ok(())),
                Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
            }
        }
        if let Err(e) = flushed {
            tracing::error!(error = %e, "flushing the log failed");
        }
    }
}

/// How long `purge` waits for the state machine to make the purged entries'
/// effects durable. A snapshot install that takes longer than this is stuck;
/// failing the purge stops the node rather than risk a hole in the log.
const PURGE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(120);

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    /// Opens the log. Must run inside a tokio runtime: it starts the flusher.
    pub fn open(
        db: &sled::Db,
        durable_applied: Option<tokio::sync::watch::Receiver<u64>>,
    ) -> Result<Self, sled::Error> {
        let (flushes, pending) = tokio::sync::mpsc::channel(FLUSH_QUEUE_MAX);
        tokio::spawn(flusher(db.clone(), pending));
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            durable_applied,
            flushes,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let subject = || match key {
            VOTE_KEY => ErrorSubject::Vote,
            _ => ErrorSubject::Store,
        };
        match self.meta.get(key).map_err(|e| io_err(subject(), ErrorVerb::Read, e))? {
            None => Ok(None),
            Some(bytes) => record::decode(&bytes).map(Some).map_err(|e| io_err(subject(), ErrorVerb::Read, e)),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let bytes = record::encode(value).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.meta.insert(key, bytes).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_async().await.map_err(write_logs_err)?;
        Ok(())
    }

    fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, StorageError> {
        let entry: Entry = record::decode(value).map_err(read_logs_err)?;
        let index = index_of_key(key).map_err(read_logs_err)?;
        if entry.log_id.index != index {
            return Err(read_logs_err(CorruptLog(format!(
                "log record under index {index} holds entry {}",
                entry.log_id
            ))));
        }
        Ok(entry)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CorruptLog(String);

fn index_of_key(key: &[u8]) -> Result<u64, CorruptLog> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| CorruptLog(format!("log key of {} bytes, want 8", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (key, value) = item.map_err(read_logs_err)?;
            let entry = Self::decode_entry(&key, &value)?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        let last = match self.log.last().map_err(read_logs_err)? {
            Some((key, value)) => Some(Self::decode_entry(&key, &value)?.log_id),
            None => None,
        };
        // The purge marker may reach disk before the removals do; the last
        // log id is never below the last purged one.
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.max(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE_KEY, vote)?;
        self.db.flush_async().await.map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(COMMITTED_KEY, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = record::encode(&entry).map_err(write_logs_err)?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        // Durable once the flusher's next flush completes; openraft goes on
        // with other work meanwhile and learns it through the callback.
        self.flushes.send(callback).await.map_err(|_| write_logs_err(CorruptLog("the log flusher stopped".into())))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_id.index.to_be_bytes()..) {
            let (key, _) = item.map_err(read_logs_err)?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(durable) = &self.durable_applied {
            let mut durable = durable.clone();
            let waited = tokio::time::timeout(PURGE_WAIT_MAX, durable.wait_for(|d| *d >= log_id.index)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(write_logs_err(CorruptLog(format!(
                    "refusing to purge the log to {log_id}: the state machine has not made it durable within {PURGE_WAIT_MAX:?}"
                ))));
            }
        }
        self.write_meta(LAST_PURGED_KEY, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (key, _) = item.map_err(read_logs_err)?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        self.flush().await
    }
}
