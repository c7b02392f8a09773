//! The Raft log and vote in `log.redb` (openraft's `RaftLogStorage`).
//!
//! Layout: table `log` maps the log index to an encoded [`Entry`]; table
//! `meta` holds the vote, the last purged log id and the committed log id.
//!
//! Every change goes through one writer thread, in the order it was made:
//! it takes every request waiting, applies them in one write transaction
//! and commits it with `Durability::Immediate` (redb fsyncs the file), then
//! answers all of them: group commit. An append is readable at once (from
//! `pending`, until its commit lands). openraft 0.9's core waits for each
//! append to be flushed before it goes on, so today a batch rarely holds
//! more than one append (plus the vote or the commit hint); the writer is
//! ready for an openraft that pipelines appends.
//!
//! Invariants:
//! - openraft hears that an append is persisted, and `save_vote`,
//!   `truncate` and `purge` return, only after the transaction that made the
//!   change durable committed (fsync of the file).
//! - The key of every log record equals the index inside it; a mismatch is
//!   corruption.
//! - A reader sees every entry appended before it began: entries move from
//!   `pending` to the file only after the file has them, and readers look at
//!   `pending` first.
//! - A purge takes effect only once the state machine has made the purged
//!   entries' effects durable: `purge` records the target and returns at
//!   once (openraft calls it right after handing a snapshot to the state
//!   machine, and must not wait for the install), and a purger task carries
//!   it out when the durable applied index reaches it. A crash before that
//!   leaves entries that are merely redundant.
//!
//! Caveats:
//! - The committed log id is written with the next transaction, not on its
//!   own: openraft treats it as a hint that speeds up restart.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::state_machine::DurableApplied;
use super::{FileBackend, record};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE_KEY: &str = "vote";
const LAST_PURGED_KEY: &str = "last_purged";
const COMMITTED_KEY: &str = "committed";

/// Requests that may wait for the writer. At the limit openraft's appends
/// wait, which slows the leader down instead of growing memory.
const WRITE_QUEUE_MAX: usize = 4096;

/// Requests the writer takes into one transaction (one fsync).
const WRITES_PER_COMMIT_MAX: usize = 1024;

/// How long the purger waits before it retries a purge that failed.
const PURGE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The file of the log inside the data directory.
pub const LOG_FILE: &str = "log.redb";

/// A change for the writer thread.
enum Write {
    Append { entries: Vec<Entry>, done: LogFlushed<TypeConfig> },
    Truncate { from: u64, done: tokio::sync::oneshot::Sender<std::io::Result<()>> },
    Purge { upto: LogId, done: tokio::sync::oneshot::Sender<std::io::Result<()>> },
    Vote { vote: Vote, done: tokio::sync::oneshot::Sender<std::io::Result<()>> },
    Committed(Option<LogId>),
}

/// The Raft log of one node. Cloning shares it (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Appended entries whose commit has not landed yet, by index.
    /// `std::sync::Mutex`: held only to copy or update, never across `.await`.
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    writes: std::sync::mpsc::SyncSender<Write>,
    /// The latest purge openraft asked for, carried out by the purger task
    /// once the state machine has made it durable. `None` only in the
    /// storage conformance suite, which purges a log with no state machine
    /// behind it: there purges happen at once.
    purge_target: Option<Arc<tokio::sync::watch::Sender<Option<LogId>>>>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LogError(String);

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, on `backend` when a test asks
    /// for one, and starts its writer thread.
    pub fn open(
        dir: &Path,
        cache_bytes: usize,
        backend: Option<FileBackend>,
        durable_applied: Option<DurableApplied>,
    ) -> anyhow::Result<Self> {
        let db = super::open_database(&dir.join(LOG_FILE), cache_bytes, backend)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        let db = Arc::new(db);
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let (writes, queue) = std::sync::mpsc::sync_channel(WRITE_QUEUE_MAX);
        let (wdb, wpending) = (db.clone(), pending.clone());
        std::thread::Builder::new().name("nines-log-writer".into()).spawn(move || writer(wdb, wpending, queue))?;
        let purge_target = durable_applied.map(|durable| {
            let (target, watch) = tokio::sync::watch::channel(None);
            tokio::spawn(purger(durable, watch, writes.clone()));
            Arc::new(target)
        });
        Ok(LogStore { db, pending, writes, purge_target })
    }

    /// Sends a change and waits until it is durable.
    async fn durably(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<std::io::Result<()>>) -> Write,
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The channel is bounded: waiting for room blocks, so leave the runtime.
        let writes = self.writes.clone();
        let w = make(tx);
        tokio::task::spawn_blocking(move || writes.send(w))
            .await
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, LogError(e.to_string())))?
            .map_err(|_| io_err(subject.clone(), ErrorVerb::Write, LogError("the log writer stopped".into())))?;
        rx.await
            .map_err(|_| io_err(subject.clone(), ErrorVerb::Write, LogError("the log writer stopped".into())))?
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let subject = || if key == VOTE_KEY { ErrorSubject::Vote } else { ErrorSubject::Store };
        let err = |e: redb::Error| io_err(subject(), ErrorVerb::Read, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(META).map_err(|e| err(e.into()))?;
        let Some(bytes) = table.get(key).map_err(|e| err(e.into()))? else { return Ok(None) };
        record::decode(bytes.value()).map(Some).map_err(|e| io_err(subject(), ErrorVerb::Read, e))
    }
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    let entry: Entry = record::decode(bytes).map_err(read_logs_err)?;
    if entry.log_id.index != index {
        return Err(read_logs_err(LogError(format!("log record under index {index} holds entry {}", entry.log_id))));
    }
    Ok(entry)
}

/// Carries out purges once the state machine made them durable (see the
/// module doc); stops when the log store is gone.
async fn purger(
    durable: DurableApplied,
    mut target: tokio::sync::watch::Receiver<Option<LogId>>,
    writes: std::sync::mpsc::SyncSender<Write>,
) {
    while target.changed().await.is_ok() {
        let Some(upto) = *target.borrow_and_update() else { continue };
        loop {
            if let Err(e) = durable.reach(upto.index).await {
                tracing::warn!(error = %e, %upto, "making the state machine durable before a purge failed; retrying");
                tokio::time::sleep(PURGE_RETRY).await;
                continue;
            }
            let (done, result) = tokio::sync::oneshot::channel();
            let sent = {
                let writes = writes.clone();
                tokio::task::spawn_blocking(move || writes.send(Write::Purge { upto, done })).await
            };
            if !matches!(sent, Ok(Ok(()))) {
                return; // The writer is gone: the node is stopping.
            }
            match result.await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, %upto, "purging the log failed; retrying");
                    tokio::time::sleep(PURGE_RETRY).await;
                }
                Err(_) => return,
            }
        }
    }
}

/// The writer thread: one transaction and one fsync per batch of requests.
fn writer(db: Arc<Database>, pending: Arc<Mutex<BTreeMap<u64, Entry>>>, queue: std::sync::mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < WRITES_PER_COMMIT_MAX {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit(&db, &batch);
        crate::telemetry::log_fsync(started);
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the log failed");
        }
        let mut appended = Vec::new();
        for w in batch {
            let r = result.as_ref().map(|_| ()).map_err(other);
            match w {
                Write::Append { entries, done } => {
                    appended.extend(entries.into_iter().map(|e| e.log_id));
                    done.log_io_completed(r);
                }
                Write::Truncate { done, .. } | Write::Purge { done, .. } | Write::Vote { done, .. } => {
                    // Ignored: the caller may have given up waiting.
                    let _ = done.send(r);
                }
                Write::Committed(_) => {}
            }
        }
        if result.is_ok() {
            // The file has them now; a later entry at the same index (after a
            // truncate) stays pending until its own commit.
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            for id in appended {
                if pending.get(&id.index).is_some_and(|e| e.log_id == id) {
                    pending.remove(&id.index);
                }
            }
        }
    }
}

/// Applies a batch of changes in one durable transaction.
fn commit(db: &Database, batch: &[Write]) -> anyhow::Result<()> {
    let mut txn = db.begin_write()?;
    if batch.iter().all(|w| matches!(w, Write::Committed(_))) {
        // Only the commit hint: the next durable commit carries it.
        txn.set_durability(redb::Durability::None)?;
    }
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        for w in batch {
            match w {
                Write::Append { entries, .. } => {
                    for e in entries {
                        log.insert(e.log_id.index, record::encode(e)?.as_slice())?;
                    }
                }
                Write::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                Write::Purge { upto, .. } => {
                    let stored: Option<LogId> = match meta.get(LAST_PURGED_KEY)? {
                        Some(b) => Some(record::decode(b.value())?),
                        None => None,
                    };
                    // Purges only move forward.
                    if stored.is_none_or(|s| *upto > s) {
                        meta.insert(LAST_PURGED_KEY, record::encode(upto)?.as_slice())?;
                        log.retain_in(..=upto.index, |_, _| false)?;
                    }
                }
                Write::Vote { vote, .. } => {
                    meta.insert(VOTE_KEY, record::encode(vote)?.as_slice())?;
                }
                Write::Committed(c) => {
                    meta.insert(COMMITTED_KEY, record::encode(c)?.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
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
        // Pending first: an entry that leaves it is in the file by then.
        let mut out: BTreeMap<u64, Entry> = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.range(start..).take_while(|(i, _)| range.contains(*i)).map(|(i, e)| (*i, e.clone())).collect()
        };
        let txn = self.db.begin_read().map_err(|e| read_logs_err(redb::Error::from(e)))?;
        let log = txn.open_table(LOG).map_err(|e| read_logs_err(redb::Error::from(e)))?;
        for item in log.range(start..).map_err(|e| read_logs_err(redb::Error::from(e)))? {
            let (k, v) = item.map_err(|e| read_logs_err(redb::Error::from(e)))?;
            let index = k.value();
            if !range.contains(&index) {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(index) {
                slot.insert(decode_entry(index, v.value())?);
            }
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let pending_last =
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).values().next_back().map(|e| e.log_id);
        // One read transaction: a purge between two reads would tear them.
        let txn = self.db.begin_read().map_err(|e| read_logs_err(redb::Error::from(e)))?;
        let meta = txn.open_table(META).map_err(|e| read_logs_err(redb::Error::from(e)))?;
        let last_purged: Option<LogId> =
            match meta.get(LAST_PURGED_KEY).map_err(|e| read_logs_err(redb::Error::from(e)))? {
                Some(b) => Some(record::decode(b.value()).map_err(read_logs_err)?),
                None => None,
            };
        let log = txn.open_table(LOG).map_err(|e| read_logs_err(redb::Error::from(e)))?;
        let stored_last = match log.last().map_err(|e| read_logs_err(redb::Error::from(e)))? {
            Some((k, v)) => Some(decode_entry(k.value(), v.value())?.log_id),
            None => None,
        };
        let last = pending_last.max(stored_last).max(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.durably(|done| Write::Vote { vote, done }, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Rides on the next transaction; a full queue drops it (a hint only).
        let _ = self.writes.try_send(Write::Committed(committed));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for e in &entries {
                pending.insert(e.log_id.index, e.clone());
            }
        }
        // Durable once the writer commits; openraft goes on meanwhile and
        // learns it through the callback. A full queue waits here.
        let writes = self.writes.clone();
        let w = Write::Append { entries, done: callback };
        match writes.try_send(w) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(w)) => tokio::task::spawn_blocking(move || writes.send(w))
                .await
                .map_err(|e| write_logs_err(LogError(e.to_string())))?
                .map_err(|_| write_logs_err(LogError("the log writer stopped".into()))),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => self.send_stopped(),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).retain(|i, _| *i < log_id.index);
        let from = log_id.index;
        self.durably(|done| Write::Truncate { from, done }, ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).retain(|i, _| *i > log_id.index);
        match &self.purge_target {
            Some(target) => {
                target.send_modify(|t| *t = (*t).max(Some(log_id)));
                Ok(())
            }
            None => self.durably(|done| Write::Purge { upto: log_id, done }, ErrorSubject::Logs).await,
        }
    }
}

impl LogStore {
    fn send_stopped(&self) -> Result<(), StorageError> {
        Err(write_logs_err(LogError("the log writer stopped".into())))
    }
}
