//! The Raft log and vote (openraft's `RaftLogStorage`): an append-only
//! write-ahead log in segment files under `log/`, and the vote and the last
//! purged log id in `log/meta`.
//!
//! Why not a B-tree: a follower's flush is on every write's path. A redb commit
//! rewrote the B-tree's page, its parents and the allocator state (about
//! 28 KB per small append) before its `fdatasync`; an append here writes the
//! entries and one marker, then `fdatasync` (`benches/README.md` has the
//! before and after).
//!
//! # Layout
//!
//! - `log/SEGMENT.wal` (SEGMENT, 20 digits: the index of the first entry
//!   written to it, or one above the segment before when that is higher,
//!   so names rise in the order written): records `[length: u32 LE]
//!   [record]`, each record a checksummed [`record`] holding a `Wal`
//!   item. A segment past `SEGMENT_BYTES` is closed (synced) and the next
//!   appends open a new one. The live entries of a segment all lie below
//!   the next segment's name (what the purge relies on).
//! - Every write of the writer ends with a `Wal::Commit` marker, which also
//!   carries the latest committed log id (openraft's restart hint).
//! - `log/meta`: the vote and the last purged log id, replaced whole
//!   (written beside, synced, renamed, directory synced).
//!
//! Every change goes through one writer thread, in the order it was made:
//! it takes every request waiting, writes them and syncs once, then answers
//! all of them (group commit). An append is readable at once (from
//! `pending`, until it is written).
//!
//! Invariants:
//! - openraft hears that a follower's append is persisted, and
//!   `save_vote`, `truncate` and `purge` return, only after the change is
//!   synced (`fdatasync` of the segment, or the meta file and its
//!   directory). A leader's own appends are acknowledged once queued, so
//!   its sync runs beside the followers' instead of before them (openraft
//!   0.9 sends an entry only after the leader's acknowledgement); openraft
//!   may then count one committed before the leader holds it synced, so
//!   nothing leaves the node as committed before that: the state machine
//!   applies (answers clients, serves reads) only synced entries, and the
//!   commit index sent to followers is capped at the synced log
//!   ([`LogSynced`]). A start syncs the last segment before the log is used
//!   (a killed process's unsynced writes are still in the page cache).
//! - The live entries (above the last purge) follow one another by index
//!   in file order, truncation records applied: a log that goes on past a
//!   snapshot installed beyond its end records the purge up to there first
//!   (`append`), so a start never finds a hole, which it refuses.
//! - At start, entries after the last marker of the last segment were
//!   never acknowledged (their write did not finish): they are cut off, and
//!   so is a last write with a damaged record (a disk may persist the
//!   marker before an earlier sector of a write torn by a power cut). A
//!   damaged record with a whole write after it was synced and is damaged:
//!   the node stops with an error, as it does for any damage in an earlier
//!   segment.
//! - A truncation is a record (with its marker) appended to the last
//!   segment; nothing is ever cut in place except a torn tail at start, so
//!   a power cut cannot separate entries from their marker.
//! - A purge takes effect only once the state machine has made the purged
//!   entries' effects durable: `purge` records the target and returns at
//!   once (openraft calls it right after handing a snapshot to the state
//!   machine, and must not wait for the install), and a purger task carries
//!   it out when the durable applied index reaches it; the meta file records
//!   it before segments are removed, on a thread of their own (not the
//!   writer's: unlinking a compaction's segments held every append's flush).
//!   A crash before that leaves entries that are merely redundant.
//! - After a write or a sync fails, the writer takes no more changes:
//!   openraft stops the node rather than go on past a gap.
//! - The writer marks when each write begins and ends (`UnderWay`): a
//!   leader whose write has been under way too long counts its disk
//!   stalled and goes silent (`network::SYNC_STALL`).
//! - A node that led when it stopped starts with its vote uncommitted
//!   (saved so before openraft reads it): it may have lost entries its
//!   followers hold, and openraft 0.9 would otherwise restart it as leader
//!   of the same term, whose next entries would reuse the lost ones' log
//!   ids. It campaigns for a new term instead (one election after each
//!   restart of a leader).
//!
//! Caveats:
//! - openraft counts a leader's own entry committed before the leader's
//!   sync; what it does with that count inside itself (a new membership
//!   change once the last one counts committed) is held back by
//!   `Node::membership_turn`, which waits until the last change is applied.
//! - The commit index a leader sends is capped at its synced log, and
//!   openraft sends a new commit index once: a follower may learn it at the
//!   next heartbeat instead (every 40-60 ms), or, from a stepping-down
//!   leader (which sends none), from the next leader.
//! - The committed log id rides on the next write that leaves its entry in
//!   the log (never ahead of it: a start re-applies up to it); openraft
//!   treats it as a hint that speeds up restart.
//! - Damage in the last write of the last segment (or a damaged length
//!   prefix) reads as a torn write and is cut off, as a torn write would
//!   be: a write acknowledged just before the power cut could be lost from
//!   this node's log if the disk also damaged it; the region's other nodes
//!   hold it too.
//! - Truncated entries stay on disk until their segment is purged.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};

use super::power_loss::{Medium, PowerLossBackend};
use super::state_machine::DurableApplied;
use super::{fsync_dir, record};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Requests that may wait for the writer. At the limit openraft's appends
/// wait, which slows the leader down instead of growing memory.
const WRITE_QUEUE_MAX: usize = 4096;

/// Requests the writer takes into one write (one sync).
const WRITES_PER_COMMIT_MAX: usize = 1024;

/// A segment this long is closed; the next append opens a new one.
const SEGMENT_BYTES: u64 = 64 << 20;

/// How long the purger waits before it retries a purge that failed.
const PURGE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The log's directory inside the data directory.
pub const LOG_DIR: &str = "log";

/// The vote and the last purged log id, inside [`LOG_DIR`].
const META_FILE: &str = "meta";

/// What a segment holds, record by record.
#[derive(Debug, Deserialize)]
enum Wal {
    Entry(Entry),
    /// Ends each write: the records before it were written whole.
    Commit {
        committed: Option<LogId>,
    },
    /// The entries from `from` on, in this segment and earlier ones, are
    /// gone (a follower's log conflicted with its leader's).
    Truncate {
        from: u64,
    },
}

/// [`Wal`] as written (the same encoding, without copying the entry).
#[derive(Serialize)]
enum WalOut<'a> {
    Entry(&'a Entry),
    Commit { committed: Option<LogId> },
    Truncate { from: u64 },
}

/// The contents of `log/meta`.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    last_purged: Option<LogId>,
}

/// A change for the writer thread.
enum Write {
    /// `done` is `None` for the leader's own appends, acknowledged when
    /// queued (see [`own_as_leader`]).
    Append {
        entries: Vec<Entry>,
        done: Option<LogFlushed<TypeConfig>>,
    },
    Truncate {
        from: u64,
        done: tokio::sync::oneshot::Sender<std::io::Result<()>>,
    },
    Purge {
        upto: LogId,
        done: tokio::sync::oneshot::Sender<std::io::Result<()>>,
    },
    Vote {
        vote: Vote,
        done: tokio::sync::oneshot::Sender<std::io::Result<()>>,
    },
}

/// A segment file: a plain file, or (test only) one that keeps only what
/// was synced at a power cut.
type SegmentFile = Arc<dyn Medium>;

/// Where an entry's record is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    log_id: LogId,
    segment: u64,
    offset: u64,
    len: u32,
}

/// What the writer and the readers share.
#[derive(Default)]
struct Shared {
    /// Appended entries not written yet, by index.
    pending: BTreeMap<u64, Entry>,
    /// Entries written lately, by index, up to `cache_max` bytes.
    cache: BTreeMap<u64, (Entry, usize)>,
    cache_bytes: usize,
    cache_max: usize,
    /// Every entry in the segments above the last purge.
    locs: BTreeMap<u64, Loc>,
    /// The segments by their name (rising in the order written).
    segments: BTreeMap<u64, SegmentFile>,
    /// The last entry written (not counting `pending`).
    last_entry: Option<LogId>,
    meta: Meta,
    committed: Option<LogId>,
}

impl Shared {
    fn cache_insert(&mut self, index: u64, entry: Entry, bytes: usize) {
        if let Some((_, old)) = self.cache.insert(index, (entry, bytes)) {
            self.cache_bytes -= old;
        }
        self.cache_bytes += bytes;
        while self.cache_bytes > self.cache_max {
            let Some((_, (_, b))) = self.cache.pop_first() else { break };
            self.cache_bytes -= b;
        }
    }

    fn forget_from(&mut self, from: u64) {
        for (_, (_, b)) in self.cache.split_off(&from) {
            self.cache_bytes -= b;
        }
        self.locs.split_off(&from);
    }

    fn forget_upto(&mut self, upto: u64) {
        let keep = self.cache.split_off(&upto.saturating_add(1));
        for (_, (_, b)) in std::mem::replace(&mut self.cache, keep) {
            self.cache_bytes -= b;
        }
        self.locs = self.locs.split_off(&upto.saturating_add(1));
    }
}

/// The Raft log of one node. Cloning shares it (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    /// `std::sync::Mutex`: held only to copy or update, never across
    /// `.await` or a disk access.
    shared: Arc<Mutex<Shared>>,
    writes: std::sync::mpsc::SyncSender<Write>,
    /// The latest committed log id openraft reported and the writer has not
    /// written yet: it rides on the writer's next marker.
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    /// The latest purge openraft asked for, carried out by the purger task
    /// once the state machine has made it durable. `None` only in the
    /// storage conformance suite, which purges a log with no state machine
    /// behind it: there purges happen at once.
    purge_target: Option<Arc<tokio::sync::watch::Sender<Option<LogId>>>>,
    /// How far the state machine is durable (`None` as `purge_target`).
    durable: Option<DurableApplied>,
    /// This node: its own appends as leader are acknowledged once queued.
    /// `None` acknowledges every append once synced.
    me: Option<NodeId>,
    /// How far the log is synced (moved by the writer).
    synced: LogSynced,
}

/// How far the log is synced: the last entry it held at its latest sync,
/// and whether a write failed (then it never moves again).
#[derive(Debug, Clone, Copy, Default)]
struct SyncState {
    last: Option<LogId>,
    failed: bool,
}

/// How far a node's log is synced. A leader's own appends are acknowledged
/// to openraft before they are synced (`own_as_leader`), so openraft may
/// count an entry committed before this node holds it durably. Nothing
/// leaves the node as committed until it does: the state machine applies an
/// entry (and so answers its client and serves it to reads) only once it is
/// synced here ([`LogSynced::reach`]), and the commit index a leader sends
/// its followers is capped at it ([`LogSynced::cap`]).
#[derive(Clone)]
pub struct LogSynced {
    state: tokio::sync::watch::Receiver<SyncState>,
    under_way: Arc<UnderWay>,
}

/// Since when the writer's current write and sync have been under way.
#[derive(Debug)]
struct UnderWay {
    epoch: std::time::Instant,
    /// Microseconds from `epoch` to the start, plus one; 0 while idle.
    since_us: AtomicU64,
}

impl UnderWay {
    fn new() -> Self {
        UnderWay { epoch: std::time::Instant::now(), since_us: AtomicU64::new(0) }
    }

    fn start(&self) {
        self.since_us.store(self.epoch.elapsed().as_micros() as u64 + 1, Ordering::Release);
    }

    fn end(&self) {
        self.since_us.store(0, Ordering::Release);
    }

    /// How long the write under way has taken so far.
    fn taking(&self) -> Option<std::time::Duration> {
        match self.since_us.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.epoch.elapsed().saturating_sub(std::time::Duration::from_micros(since - 1))),
        }
    }
}

/// How often [`LogSynced::unstalled`] looks again: a fraction of the 40 ms
/// heartbeat, and only while a write is stalled.
const STALL_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl LogSynced {
    /// Waits until the log is synced through `index`; fails once a write
    /// failed (the node then stops).
    pub async fn reach(&mut self, index: u64) -> Result<(), String> {
        let reached = |s: &SyncState| s.failed || s.last.is_some_and(|l| l.index >= index);
        match self.state.wait_for(reached).await {
            Ok(s) if !s.failed => Ok(()),
            Ok(_) => Err(format!("the log failed a write before entry {index} was synced")),
            Err(_) => Err(format!("the log's writer stopped before entry {index} was synced")),
        }
    }

    /// The commit index this node may tell others: `commit`, capped at
    /// the last synced entry.
    pub fn cap(&self, commit: Option<LogId>) -> Option<LogId> {
        capped(commit, self.state.borrow().last)
    }

    /// Waits while the log's write under way has taken `limit` or longer (a
    /// stalled disk); at once when it has not.
    pub async fn unstalled(&self, limit: std::time::Duration) {
        while self.under_way.taking().is_some_and(|t| t >= limit) {
            tokio::time::sleep(STALL_POLL).await;
        }
    }

    /// A handle synced through `last`, and a way to move it (tests of the
    /// gates).
    #[cfg(test)]
    pub fn for_test(last: Option<LogId>) -> (impl Fn(Option<LogId>), LogSynced) {
        let (tx, rx) = tokio::sync::watch::channel(SyncState { last, failed: false });
        let sync_to = move |last| {
            tx.send_replace(SyncState { last, failed: false });
        };
        (sync_to, LogSynced { state: rx, under_way: Arc::new(UnderWay::new()) })
    }
}

/// `commit`, or `synced` when that is lower. Both are entries of one
/// leader's log, which it never truncates, so their indexes order them.
fn capped(commit: Option<LogId>, synced: Option<LogId>) -> Option<LogId> {
    match (commit, synced) {
        (Some(c), Some(s)) if c.index > s.index => Some(s),
        (Some(_), None) => None,
        _ => commit,
    }
}

/// Whether the entries starting with `first` are this node's own as the
/// leader of the latest saved `vote` (its own vote, committed: the election
/// is won). openraft 0.9 waits for the callback of such an append before it
/// sends the entries to the followers, which put two syncs in series on
/// every write. These are acknowledged once queued, so the leader's sync
/// runs beside the followers' ([`LogSynced`] keeps that safe). No other
/// append is: a follower's acknowledgement tells its leader the entries are
/// durable. Only the leader of that vote makes entries with its leader id,
/// so an entry it led in an earlier term and gets back from a later leader
/// is a follower's append.
fn own_as_leader(me: Option<NodeId>, vote: Option<Vote>, first: &Entry) -> bool {
    vote.is_some_and(|vote| won(me, vote) && first.log_id.leader_id == vote.leader_id)
}

/// Whether `vote` is `me`'s own and committed: `me` won that election.
fn won(me: Option<NodeId>, vote: Vote) -> bool {
    me.is_some_and(|me| vote.committed && vote.leader_id.node_id == me)
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

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// How segment files are opened: plain, or through the power-loss
/// simulation.
#[derive(Clone)]
struct Files {
    dir: PathBuf,
    power_loss: bool,
    /// `SEGMENT_BYTES`, or less in a test.
    segment_bytes: u64,
}

impl Files {
    fn path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.wal"))
    }

    fn open(&self, first: u64) -> std::io::Result<SegmentFile> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(self.path(first))?;
        Ok(if self.power_loss { Arc::new(PowerLossBackend::new(file)?) } else { Arc::new(file) })
    }
}

impl LogStore {
    /// openraft appends past its log's end after it installed a snapshot
    /// beyond it (or found the state machine ahead of the log at start),
    /// having asked for a purge up to there, which waits for the state
    /// machine. Here that purge is recorded first, so the log on disk never
    /// has a hole (a start would refuse it): the state machine is durable
    /// that far already (a snapshot install is), so the wait is short.
    async fn purge_before_a_hole(&self, first: u64) -> Result<(), StorageError> {
        let Some(target) = &self.purge_target else { return Ok(()) };
        let due = {
            let shared = lock(&self.shared);
            let last = [shared.pending.keys().next_back().copied(), shared.last_entry.map(|l| l.index)]
                .into_iter()
                .flatten()
                .chain(shared.meta.last_purged.map(|l| l.index))
                .max();
            last.map_or(0, |l| l + 1)
        };
        if first <= due {
            return Ok(());
        }
        let Some(upto) = *target.borrow() else {
            return Err(write_logs_err(LogError(format!(
                "entry {first} would leave a hole after entry {due} with no purge asked for up to it"
            ))));
        };
        if upto.index + 1 < first {
            return Err(write_logs_err(LogError(format!(
                "entry {first} would leave a hole after entry {due}: the purge asked for ends at {upto}"
            ))));
        }
        self.purge_durably(upto).await
    }

    /// Makes the state machine durable through `upto`, then records the
    /// purge up to it and waits until that is on disk.
    async fn purge_durably(&self, upto: LogId) -> Result<(), StorageError> {
        if let Some(durable) = &self.durable {
            durable.reach(upto.index).await.map_err(|e| write_logs_err(LogError(e)))?;
        }
        self.durably(|done| Write::Purge { upto, done }, ErrorSubject::Logs).await
    }

    /// Opens (or creates) the log of node `me` under `dir`, keeping up to
    /// `cache_bytes` of recent entries in memory, through the power-loss
    /// simulation when a test asks for it, and starts its writer thread.
    pub fn open(
        dir: &Path,
        me: Option<NodeId>,
        cache_bytes: usize,
        power_loss: bool,
        durable_applied: Option<DurableApplied>,
        sync_delay_ms: Option<Arc<AtomicU64>>,
    ) -> anyhow::Result<Self> {
        let files = Files { dir: dir.join(LOG_DIR), power_loss, segment_bytes: SEGMENT_BYTES };
        let created = !files.dir.exists();
        std::fs::create_dir_all(&files.dir)?;
        if created {
            fsync_dir(dir)?;
        }
        let mut shared = recover(&files)?;
        shared.cache_max = cache_bytes;
        let shared = Arc::new(Mutex::new(shared));
        let committed = Arc::new(Mutex::new(None));
        let (writes, queue) = std::sync::mpsc::sync_channel(WRITE_QUEUE_MAX);
        let last = lock(&shared).last_entry;
        let (synced_tx, synced) = tokio::sync::watch::channel(SyncState { last, failed: false });
        let under_way = Arc::new(UnderWay::new());
        let writer = Writer {
            files,
            shared: shared.clone(),
            committed: committed.clone(),
            synced: synced_tx,
            under_way: under_way.clone(),
            sync_delay_ms,
        };
        let meta = lock(&shared).meta;
        if let Some(vote) = meta.vote
            && won(me, vote)
        {
            // This node led when it stopped, and may have lost entries its
            // followers hold: its own appends are acknowledged before they
            // are synced. openraft 0.9 restarts a node whose saved vote is
            // its own, committed, as leader in the same term, and its next
            // entries would reuse the lost ones' log ids, which a follower
            // takes as the entries it holds. Uncommitted, the vote makes it
            // campaign for the next term instead; that term's entries
            // replace the lost tail wherever it is.
            writer.write_meta(Meta { vote: Some(Vote { committed: false, ..vote }), ..meta })?;
        }
        std::thread::Builder::new().name("nines-log-writer".into()).spawn(move || writer.run(queue))?;
        let purge_target = durable_applied.clone().map(|durable| {
            let (target, watch) = tokio::sync::watch::channel(None);
            tokio::spawn(purger(durable, watch, writes.clone()));
            Arc::new(target)
        });
        Ok(LogStore {
            shared,
            writes,
            committed,
            purge_target,
            durable: durable_applied,
            me,
            synced: LogSynced { state: synced, under_way: under_way.clone() },
        })
    }

    /// Purges the log up to `log_id` and returns once the purge is
    /// recorded on disk, the state machine durable that far first (a
    /// restore, which moves the files away next: openraft's `purge` only
    /// records the target, and the purger task would carry it out later, in
    /// a directory that is gone by then).
    pub async fn purge_now(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.shared).pending.retain(|i, _| *i > log_id.index);
        self.purge_durably(log_id).await
    }

    /// How far this log is synced.
    pub fn synced(&self) -> LogSynced {
        self.synced.clone()
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

    fn send_stopped(&self) -> Result<(), StorageError> {
        Err(write_logs_err(LogError("the log writer stopped".into())))
    }
}

/// Removes purged segments and syncs the directory; a failure is logged
/// (the files hold only purged entries).
fn remove_segments(paths: &[PathBuf], dir: &Path) {
    for path in paths {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(segment = %path.display(), error = %e, "removing a purged log segment failed");
        }
    }
    if let Err(e) = fsync_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "syncing the log directory after a purge failed");
    }
}

/// Reads `log/meta` and every segment, cutting off a torn tail (see the
/// module doc).
fn recover(files: &Files) -> anyhow::Result<Shared> {
    let mut shared = Shared::default();
    match std::fs::read(files.dir.join(META_FILE)) {
        Ok(bytes) => {
            shared.meta =
                record::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", files.dir.join(META_FILE).display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mut names = Vec::new();
    for item in std::fs::read_dir(&files.dir)? {
        let name = item?.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = name.strip_suffix(".wal").and_then(|n| n.parse::<u64>().ok()) {
            names.push(first);
        }
    }
    names.sort_unstable();
    let purged = shared.meta.last_purged.map(|l| l.index);
    // The next live entry due: one above the last purge, then one above
    // the entry before (the first live entry of a log never purged may
    // have any index).
    let mut next: Option<u64> = purged.map(|p| p + 1);
    for (pos, &first) in names.iter().enumerate() {
        let last_segment = pos + 1 == names.len();
        let path = files.path(first);
        let file = files.open(first)?;
        let mut bytes = vec![0; file.len()? as usize];
        file.read_at(0, &mut bytes)?;
        let scan = scan(&bytes).map_err(|e| anyhow::anyhow!("log segment {}: {e}", path.display()))?;
        if scan.whole < bytes.len() as u64 {
            if !last_segment {
                anyhow::bail!(
                    "log segment {} ends in an incomplete write at offset {} but is not the last segment: the log \
                     is damaged",
                    path.display(),
                    scan.whole
                );
            }
            tracing::warn!(
                segment = %path.display(),
                offset = scan.whole,
                bytes = bytes.len() as u64 - scan.whole,
                "cutting off the log's torn tail (a write that never finished, so never acknowledged)"
            );
            file.set_len(scan.whole)?;
            file.sync()?;
        }
        for item in scan.items {
            let (entry, offset, len) = match item {
                Item::Entry(entry, offset, len) => (entry, offset, len),
                Item::Truncate(from) => {
                    shared.locs.split_off(&from);
                    let floor = purged.map_or(from, |p| from.max(p + 1));
                    next = next.map(|n| n.min(floor));
                    continue;
                }
            };
            let index = entry.log_id.index;
            // Purged entries are dead (a purge may have removed only some
            // of their segments before a crash).
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            // No hole and no step back: a log that goes on past a snapshot
            // recorded the purge up to it first (see `append`).
            if let Some(n) = next
                && index != n
            {
                anyhow::bail!("log segment {} holds entry {} where entry {n} was due", path.display(), entry.log_id);
            }
            next = Some(index + 1);
            shared.locs.insert(index, Loc { log_id: entry.log_id, segment: first, offset, len });
        }
        if scan.committed.is_some() {
            shared.committed = scan.committed;
        }
        shared.segments.insert(first, file);
    }
    shared.last_entry = shared.locs.last_key_value().map(|(_, l)| l.log_id);
    // What a killed process wrote without its sync is still read back (from
    // the page cache): sync it before this log claims it as its own.
    if let Some(file) = shared.segments.values().next_back() {
        file.sync()?;
    }
    Ok(shared)
}

/// A record of a whole write, in file order.
enum Item {
    /// The entry, where its record starts, its length.
    Entry(Entry, u64, u32),
    Truncate(u64),
}

/// A segment read through: its whole writes' records, the last committed
/// hint, and where the whole writes end.
struct Scan {
    items: Vec<Item>,
    committed: Option<LogId>,
    whole: u64,
}

/// Reads a segment's writes. A write counts once its marker is read; a
/// write with no marker never finished (never acknowledged) and ends the
/// whole ones. A damaged record in the last write is what a write torn by
/// a power cut looks like on a disk that persisted its marker before an
/// earlier sector: cut off too. A damaged record with another whole write
/// after it was synced before that write began: the segment is damaged.
fn scan(bytes: &[u8]) -> Result<Scan, String> {
    let mut out = Scan { items: Vec::new(), committed: None, whole: 0 };
    let mut batch = Vec::new();
    // The first record of this write that failed its check.
    let mut damaged: Option<(u64, record::RecordError)> = None;
    // A write with a marker and a damaged record: torn if it is the last.
    let mut suspect: Option<(u64, record::RecordError)> = None;
    let mut pos = 0usize;
    while bytes.len() - pos >= 4 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let body = pos + 4;
        if len == 0 || bytes.len() - body < len {
            break; // A write that never finished: cut here.
        }
        match record::decode::<Wal>(&bytes[body..body + len]) {
            Err(e) => {
                damaged.get_or_insert((pos as u64, e));
            }
            Ok(Wal::Entry(e)) => batch.push(Item::Entry(e, body as u64, len as u32)),
            Ok(Wal::Truncate { from }) => batch.push(Item::Truncate(from)),
            Ok(Wal::Commit { committed }) => {
                if let Some((at, e)) = suspect.take() {
                    return Err(format!(
                        "the record at offset {at} is damaged ({e}), and writes after it were written whole"
                    ));
                }
                if damaged.is_some() {
                    suspect = damaged.take();
                    batch.clear();
                } else {
                    out.items.append(&mut batch);
                    out.committed = committed.or(out.committed);
                    out.whole = (body + len) as u64;
                }
            }
        }
        pos = body + len;
    }
    Ok(out)
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

/// The writer thread's state.
struct Writer {
    files: Files,
    shared: Arc<Mutex<Shared>>,
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    /// Moved after each sync, before anyone is answered.
    synced: tokio::sync::watch::Sender<SyncState>,
    /// Set while a batch is written and synced.
    under_way: Arc<UnderWay>,
    /// Test only: how long each write waits before its sync (ms).
    sync_delay_ms: Option<Arc<AtomicU64>>,
}

/// Records encoded for the current segment, not yet written.
#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// What `bytes` holds, in order.
    items: Vec<BufItem>,
}

/// A record in a [`Buffer`].
enum BufItem {
    /// The entry, the offset of its record in the buffer, its length.
    Entry(Entry, usize, u32),
    Truncate(u64),
}

impl Buffer {
    fn push(&mut self, item: &WalOut<'_>) -> anyhow::Result<(usize, u32)> {
        let rec = record::encode(item)?;
        let len = u32::try_from(rec.len())?;
        self.bytes.extend_from_slice(&len.to_le_bytes());
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&rec);
        Ok((at, len))
    }
}

impl Writer {
    /// One write and one sync per batch of requests.
    fn run(self, queue: std::sync::mpsc::Receiver<Write>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < WRITES_PER_COMMIT_MAX {
                match queue.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            self.under_way.start();
            let result = self.commit(&batch);
            self.under_way.end();
            crate::telemetry::log_fsync(started, *result.as_ref().unwrap_or(&0));
            let failed = result.is_err();
            match &result {
                Ok(_) => {
                    let last = lock(&self.shared).last_entry;
                    self.synced.send_replace(SyncState { last, failed: false });
                }
                Err(e) => {
                    tracing::error!(error = %e, "writing the log failed; the log takes no more writes");
                    self.synced.send_modify(|s| s.failed = true);
                }
            }
            for w in batch {
                let r = result.as_ref().map(|_| ()).map_err(other);
                match w {
                    Write::Append { done, .. } => {
                        if let Some(done) = done {
                            done.log_io_completed(r)
                        }
                    }
                    Write::Truncate { done, .. } | Write::Purge { done, .. } | Write::Vote { done, .. } => {
                        // Ignored: the caller may have given up waiting.
                        let _ = done.send(r);
                    }
                }
            }
            if failed {
                // What is on disk and in memory may no longer agree (a write
                // or a sync failed part way): every later change fails
                // (openraft then stops the node), none lands after it.
                return;
            }
        }
    }

    /// Carries out a batch in order, then syncs what it wrote.
    /// Returns the bytes written to the log.
    fn commit(&self, batch: &[Write]) -> anyhow::Result<usize> {
        let mut buffer = Buffer::default();
        let mut unsynced: Option<SegmentFile> = None;
        for w in batch {
            match w {
                Write::Append { entries, .. } => {
                    for e in entries {
                        let (at, len) = buffer.push(&WalOut::Entry(e))?;
                        buffer.items.push(BufItem::Entry(e.clone(), at, len));
                    }
                }
                // In the same write as the appends around it: one marker per
                // sync, so a torn sync never leaves a whole write after a
                // damaged one.
                Write::Truncate { from, .. } => {
                    buffer.push(&WalOut::Truncate { from: *from })?;
                    buffer.items.push(BufItem::Truncate(*from));
                }
                // Never touches the last segment, where the buffer goes.
                Write::Purge { upto, .. } => self.purge(*upto)?,
                Write::Vote { vote, .. } => {
                    let meta = Meta { vote: Some(*vote), ..lock(&self.shared).meta };
                    self.write_meta(meta)?;
                }
            }
        }
        let written = self.flush(&mut buffer, &mut unsynced)?;
        if let Some(file) = unsynced {
            if let Some(ms) = self.sync_delay_ms.as_ref().map(|d| d.load(Ordering::Relaxed)).filter(|ms| *ms > 0) {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            file.sync()?;
        }
        Ok(written)
    }

    /// The last segment, opening the first one (named `first`) when there
    /// is none, or a new one when the last is full (syncing it first).
    fn segment_for(&self, first: u64, unsynced: &mut Option<SegmentFile>) -> anyhow::Result<(u64, SegmentFile)> {
        let last = lock(&self.shared).segments.last_key_value().map(|(n, f)| (*n, f.clone()));
        if let Some((name, file)) = &last
            && file.len()? < self.files.segment_bytes
        {
            return Ok((*name, file.clone()));
        }
        if let Some(file) = unsynced.take() {
            file.sync()?;
        }
        // Names only rise, so segments read back in the order written (after
        // a truncation the next first index may be below the last name), and
        // lie above every live entry written before, which the purge relies
        // on (a truncation in this write may not land).
        let highest = lock(&self.shared).locs.last_key_value().map(|(i, _)| *i);
        let name = first.max(last.map_or(0, |(n, _)| n + 1)).max(highest.map_or(0, |i| i + 1));
        let file = self.files.open(name)?;
        fsync_dir(&self.files.dir)?;
        lock(&self.shared).segments.insert(name, file.clone());
        Ok((name, file))
    }

    /// Writes the buffered entries and a marker to the last segment and
    /// makes them readable from where they are. Returns the bytes written.
    fn flush(&self, buffer: &mut Buffer, unsynced: &mut Option<SegmentFile>) -> anyhow::Result<usize> {
        if buffer.items.is_empty() {
            return Ok(0);
        }
        // The hint may name entries still queued behind this write: it is
        // written only once the log holds its entry (a start re-applies up
        // to it), and kept for a later write until then.
        let (written_max, written_committed) = {
            let shared = lock(&self.shared);
            (shared.locs.last_key_value().map(|(i, _)| *i), shared.committed)
        };
        let durable_max = buffer
            .items
            .iter()
            .filter_map(|i| match i {
                BufItem::Entry(e, ..) => Some(e.log_id.index),
                BufItem::Truncate(_) => None,
            })
            .chain(written_max)
            .max();
        let committed = {
            let mut slot = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            match *slot {
                Some(Some(c)) if durable_max.is_some_and(|m| c.index <= m) => slot.take().flatten(),
                _ => None,
            }
        };
        let committed = committed.or(written_committed);
        buffer.push(&WalOut::Commit { committed })?;
        let first = match &buffer.items[0] {
            BufItem::Entry(e, ..) => e.log_id.index,
            BufItem::Truncate(from) => *from,
        };
        let (name, file) = self.segment_for(first, unsynced)?;
        let base = file.len()?;
        file.write_at(base, &buffer.bytes)?;
        *unsynced = Some(file);
        let mut shared = lock(&self.shared);
        shared.committed = committed;
        for item in buffer.items.drain(..) {
            let (entry, at, len) = match item {
                BufItem::Entry(entry, at, len) => (entry, at, len),
                BufItem::Truncate(from) => {
                    shared.forget_from(from);
                    shared.last_entry = shared.locs.last_key_value().map(|(_, l)| l.log_id);
                    continue;
                }
            };
            let index = entry.log_id.index;
            // A later entry at the same index (after a truncate) stays
            // pending until its own write.
            if shared.pending.get(&index).is_some_and(|p| p.log_id == entry.log_id) {
                shared.pending.remove(&index);
            }
            shared.locs.insert(index, Loc { log_id: entry.log_id, segment: name, offset: base + at as u64, len });
            shared.last_entry = Some(entry.log_id);
            shared.cache_insert(index, entry, len as usize);
        }
        let written = buffer.bytes.len();
        buffer.bytes.clear();
        Ok(written)
    }

    /// Records the purge in the meta file, then removes the segments whose
    /// entries are all purged.
    fn purge(&self, upto: LogId) -> anyhow::Result<()> {
        let meta = lock(&self.shared).meta;
        // Purges only move forward.
        if meta.last_purged.is_some_and(|p| p >= upto) {
            return Ok(());
        }
        self.write_meta(Meta { last_purged: Some(upto), ..meta })?;
        let names: Vec<u64> = lock(&self.shared).segments.keys().copied().collect();
        // A segment's entries all lie below the next segment's first index.
        let gone: Vec<u64> = names.windows(2).filter(|w| w[1] <= upto.index + 1).map(|w| w[0]).collect();
        {
            let mut shared = lock(&self.shared);
            for name in &gone {
                shared.segments.remove(name);
            }
            shared.forget_upto(upto.index);
        }
        if !gone.is_empty() {
            // Removed by another thread: unlinking gigabytes of segments
            // and syncing the directory took this writer (and so every
            // append's flush) off the log for a third of a second, on every
            // node at once. Nothing waits for it: the purge is recorded, and
            // a segment a crash leaves behind holds only purged entries,
            // which a start skips and the next purge removes (one whose
            // removal failed stays until the next start).
            let paths: Vec<PathBuf> = gone.iter().map(|name| self.files.path(*name)).collect();
            let (on_thread, dir) = (paths.clone(), self.files.dir.clone());
            let spawned = std::thread::Builder::new()
                .name("nines-log-purge".into())
                .spawn(move || remove_segments(&on_thread, &dir));
            if spawned.is_err() {
                // No thread to spare: removed here, as before.
                remove_segments(&paths, &self.files.dir);
            }
        }
        Ok(())
    }

    /// Replaces `log/meta` durably and updates the shared copy.
    fn write_meta(&self, meta: Meta) -> anyhow::Result<()> {
        let path = self.files.dir.join(META_FILE);
        let tmp = self.files.dir.join(format!("{META_FILE}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &record::encode(&meta)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        fsync_dir(&self.files.dir)?;
        lock(&self.shared).meta = meta;
        Ok(())
    }
}

/// Reads the entry at `loc` from `file`.
fn read_entry(file: &SegmentFile, loc: Loc) -> std::io::Result<Entry> {
    let mut bytes = vec![0; loc.len as usize];
    file.read_at(loc.offset, &mut bytes)?;
    match record::decode::<Wal>(&bytes).map_err(other)? {
        Wal::Entry(e) => Ok(e),
        _ => Err(other(format!("log offset {} holds no entry", loc.offset))),
    }
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
        // Under the lock: what is in memory, and where the rest is. Pending
        // first: an entry that leaves it is written by then.
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let mut to_read = Vec::new();
        {
            let shared = lock(&self.shared);
            for (i, e) in shared.pending.range(start..).take_while(|(i, _)| range.contains(*i)) {
                out.insert(*i, e.clone());
            }
            for (i, loc) in shared.locs.range(start..).take_while(|(i, _)| range.contains(*i)) {
                if out.contains_key(i) {
                    continue;
                }
                match shared.cache.get(i) {
                    Some((e, _)) => {
                        out.insert(*i, e.clone());
                    }
                    None => {
                        let file = shared.segments.get(&loc.segment).cloned();
                        to_read.push((*i, *loc, file));
                    }
                }
            }
        }
        for (index, loc, file) in to_read {
            let file = file.ok_or_else(|| read_logs_err(LogError(format!("log segment {} is gone", loc.segment))))?;
            let entry = read_entry(&file, loc).map_err(read_logs_err)?;
            if entry.log_id.index != index {
                return Err(read_logs_err(LogError(format!(
                    "log record for index {index} holds entry {}",
                    entry.log_id
                ))));
            }
            out.insert(index, entry);
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let shared = lock(&self.shared);
        let pending_last = shared.pending.values().next_back().map(|e| e.log_id);
        let last_purged = shared.meta.last_purged;
        let last = pending_last.max(shared.last_entry).max(last_purged);
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
        Ok(lock(&self.shared).meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Rides on the writer's next marker (a hint only).
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.shared).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(first) = entries.first() {
            self.purge_before_a_hole(first.log_id.index).await?;
        }
        // Durable once the writer syncs; openraft learns it through the
        // callback, or, for the leader's own entries, once they are queued
        // (in order, so a later sync covers them). A full queue waits here.
        let own = {
            let mut shared = lock(&self.shared);
            for e in &entries {
                shared.pending.insert(e.log_id.index, e.clone());
            }
            entries.first().is_some_and(|first| own_as_leader(self.me, shared.meta.vote, first))
        };
        let (done, queued) = if own { (None, Some(callback)) } else { (Some(callback), None) };
        let writes = self.writes.clone();
        let w = Write::Append { entries, done };
        match writes.try_send(w) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(w)) => tokio::task::spawn_blocking(move || writes.send(w))
                .await
                .map_err(|e| write_logs_err(LogError(e.to_string())))?
                .map_err(|_| write_logs_err(LogError("the log writer stopped".into())))?,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return self.send_stopped(),
        }
        if let Some(queued) = queued {
            queued.log_io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.shared).pending.retain(|i, _| *i < log_id.index);
        let from = log_id.index;
        self.durably(|done| Write::Truncate { from, done }, ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.shared).pending.retain(|i, _| *i > log_id.index);
        match &self.purge_target {
            Some(target) => {
                target.send_modify(|t| *t = (*t).max(Some(log_id)));
                Ok(())
            }
            None => self.durably(|done| Write::Purge { upto: log_id, done }, ErrorSubject::Logs).await,
        }
    }
}

/// The log of format 4 (a redb file), read once to move it into segments.
const OLD_LOG_FILE: &str = "log.redb";

/// Moves a format-4 log (`log.redb`: vote, last purged and committed log
/// ids, entries) into `log/`. Built beside under `log.migrating` and
/// renamed into place, so a crash part way leaves the old log to start
/// again from; the caller then marks the directory with the new format and
/// calls [`remove_old_log`].
pub fn migrate_from_redb(dir: &Path) -> anyhow::Result<()> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let old = dir.join(OLD_LOG_FILE);
    if !old.exists() {
        return Ok(());
    }
    let db = redb::Database::open(&old)?;
    let txn = db.begin_read()?;
    let meta_table = txn.open_table(META)?;
    let read_meta =
        |key: &str| -> anyhow::Result<Option<Vec<u8>>> { Ok(meta_table.get(key)?.map(|v| v.value().to_vec())) };
    let vote: Option<Vote> = read_meta("vote")?.map(|b| record::decode(&b)).transpose()?;
    let last_purged: Option<LogId> = read_meta("last_purged")?.map(|b| record::decode(&b)).transpose()?;
    let committed: Option<LogId> =
        read_meta("committed")?.map(|b| record::decode::<Option<LogId>>(&b)).transpose()?.flatten();
    let mut buffer = Buffer::default();
    let (mut first, mut count) = (None, 0u64);
    for item in txn.open_table(LOG)?.iter()? {
        let (k, v) = item?;
        let entry: Entry = record::decode(v.value())?;
        anyhow::ensure!(
            entry.log_id.index == k.value(),
            "{}: index {} holds entry {}",
            old.display(),
            k.value(),
            entry.log_id
        );
        first.get_or_insert(entry.log_id.index);
        count += 1;
        buffer.push(&WalOut::Entry(&entry))?;
    }
    buffer.push(&WalOut::Commit { committed })?;
    let staging = dir.join("log.migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir(&staging)?;
    let files = Files { dir: staging.clone(), power_loss: false, segment_bytes: SEGMENT_BYTES };
    let name = first.unwrap_or_else(|| last_purged.map_or(0, |l| l.index + 1));
    let segment = files.open(name)?;
    segment.write_at(0, &buffer.bytes)?;
    segment.sync()?;
    let meta = record::encode(&Meta { vote, last_purged })?;
    let mut f = std::fs::File::create(staging.join(META_FILE))?;
    std::io::Write::write_all(&mut f, &meta)?;
    f.sync_all()?;
    fsync_dir(&staging)?;
    // Read back as a start would, while `log.redb` is still there.
    recover(&files).map_err(|e| anyhow::anyhow!("the moved log does not read back ({e}); log.redb is unchanged"))?;
    let target = dir.join(LOG_DIR);
    if target.exists() {
        // An earlier migration renamed its copy but stopped before the
        // format was marked: nothing ran on it.
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&staging, &target)?;
    fsync_dir(dir)?;
    tracing::info!(entries = count, "moved the log from log.redb into log segments");
    Ok(())
}

/// Removes the format-4 log once the directory is marked with the new format.
pub fn remove_old_log(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(OLD_LOG_FILE)) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn led_by(term: u64, node: NodeId, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, node), index), payload: EntryPayload::Blank }
    }

    fn vote(term: u64, node: NodeId, committed: bool) -> Option<Vote> {
        let mut v = Vote::new(term, node);
        v.committed = committed;
        Some(v)
    }

    #[test]
    fn only_the_leaders_own_entries_are_acknowledged_before_their_sync() {
        // Node 1 won term 3 and appends what it leads.
        assert!(own_as_leader(Some(1), vote(3, 1, true), &led_by(3, 1, 10)));
        // A follower of node 1 in term 3 (its vote is committed too).
        assert!(!own_as_leader(Some(2), vote(3, 1, true), &led_by(3, 1, 10)));
        // A candidate that has not won yet.
        assert!(!own_as_leader(Some(1), vote(3, 1, false), &led_by(3, 1, 10)));
        // Node 1's entry of term 2, sent back by the leader of term 4.
        assert!(!own_as_leader(Some(1), vote(4, 3, true), &led_by(2, 1, 10)));
        // Node 1 leads term 4; an entry of its term-2 leadership is not one
        // it makes now.
        assert!(!own_as_leader(Some(1), vote(4, 1, true), &led_by(2, 1, 10)));
        // No node id (a restore) or no vote yet.
        assert!(!own_as_leader(None, vote(3, 1, true), &led_by(3, 1, 10)));
        assert!(!own_as_leader(Some(1), None, &led_by(3, 1, 10)));
    }

    #[test]
    fn the_commit_index_sent_is_capped_at_the_synced_log() {
        let at = |index| Some(LogId::new(CommittedLeaderId::new(3, 1), index));
        assert_eq!(capped(at(9), at(7)), at(7));
        assert_eq!(capped(at(7), at(9)), at(7));
        assert_eq!(capped(at(7), at(7)), at(7));
        assert_eq!(capped(at(7), None), None);
        assert_eq!(capped(None, at(7)), None);
    }

    /// Writes `writes` (each a run of entries, then its marker unless the
    /// flag says the write never finished) as segment `first` of `dir`.
    fn segment(dir: &Path, first: u64, writes: &[(std::ops::RangeInclusive<u64>, bool)]) -> PathBuf {
        let files = Files { dir: dir.join(LOG_DIR), power_loss: false, segment_bytes: SEGMENT_BYTES };
        std::fs::create_dir_all(&files.dir).unwrap();
        let mut buffer = Buffer::default();
        for (range, finished) in writes {
            for i in range.clone() {
                buffer.push(&WalOut::Entry(&entry(i))).unwrap();
            }
            if *finished {
                buffer.push(&WalOut::Commit { committed: Some(entry(*range.end()).log_id) }).unwrap();
            }
        }
        std::fs::write(files.path(first), &buffer.bytes).unwrap();
        files.path(first)
    }

    /// Appends one whole write of `range` to segment `first`.
    fn segment_append(dir: &Path, first: u64, range: std::ops::RangeInclusive<u64>) {
        let path = Files { dir: dir.join(LOG_DIR), power_loss: false, segment_bytes: SEGMENT_BYTES }.path(first);
        let mut buffer = Buffer::default();
        for i in range {
            buffer.push(&WalOut::Entry(&entry(i))).unwrap();
        }
        buffer.push(&WalOut::Commit { committed: None }).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&buffer.bytes);
        std::fs::write(&path, &bytes).unwrap();
    }

    /// Flips the last byte of the `n`th record (from 1) of the segment at `path`.
    fn damage_end_of_record(path: &Path, n: usize) {
        let mut bytes = std::fs::read(path).unwrap();
        let mut pos = 0;
        for _ in 0..n {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            pos += 4 + len;
        }
        bytes[pos - 1] ^= 1;
        std::fs::write(path, &bytes).unwrap();
    }

    fn recovered(dir: &Path) -> anyhow::Result<Shared> {
        recover(&Files { dir: dir.join(LOG_DIR), power_loss: false, segment_bytes: SEGMENT_BYTES })
    }

    fn indexes(shared: &Shared) -> Vec<u64> {
        shared.locs.keys().copied().collect()
    }

    #[test]
    fn a_write_that_never_finished_is_cut_off_and_the_whole_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 1, &[(1..=2, true), (3..=3, true), (4..=5, false)]);
        let whole = std::fs::metadata(&path).unwrap().len();
        // A torn record too: the last one loses its end.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(whole - 3).unwrap();
        let shared = recovered(dir.path()).unwrap();
        assert_eq!(indexes(&shared), vec![1, 2, 3]);
        assert_eq!(shared.last_entry, Some(entry(3).log_id));
        assert_eq!(shared.committed, Some(entry(3).log_id));
        // Cut on disk: a second start finds the same without cutting again.
        let cut = std::fs::metadata(&path).unwrap().len();
        assert!(cut < whole - 3, "the unfinished write is gone from the file");
        assert_eq!(indexes(&recovered(dir.path()).unwrap()), vec![1, 2, 3]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);
    }

    #[test]
    fn a_damaged_record_written_whole_stops_the_log_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 1, &[(1..=3, true), (4..=4, true)]);
        // The last byte of entry 2's record (its marker follows later).
        damage_end_of_record(&path, 2);
        let e = recovered(dir.path()).err().expect("damage refused").to_string();
        assert!(e.contains("checksum mismatch") && e.contains("written whole"), "{e}");
    }

    #[test]
    fn a_damaged_record_in_the_last_write_is_a_torn_write_and_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 1, &[(1..=3, true), (4..=5, true)]);
        // The last byte of entry 4's record (the 5th, after 1-3 and a
        // marker): its write's marker is whole.
        damage_end_of_record(&path, 5);
        let shared = recovered(dir.path()).unwrap();
        assert_eq!(indexes(&shared), vec![1, 2, 3]);
    }

    #[test]
    fn an_entry_at_or_below_the_one_before_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        segment(dir.path(), 1, &[(1..=3, true)]);
        segment(dir.path(), 3, &[(3..=4, true)]);
        let e = recovered(dir.path()).err().expect("a step back refused").to_string();
        assert!(e.contains("holds entry") && e.contains("where entry 4 was due"), "{e}");
    }

    #[test]
    fn a_hole_in_the_log_is_refused_unless_a_purge_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        segment(dir.path(), 1, &[(1..=3, true), (11..=12, true)]);
        let e = recovered(dir.path()).err().expect("a hole refused").to_string();
        assert!(e.contains("where entry 4 was due"), "{e}");
        let meta = Meta { vote: None, last_purged: Some(entry(10).log_id) };
        std::fs::write(dir.path().join(LOG_DIR).join(META_FILE), record::encode(&meta).unwrap()).unwrap();
        let shared = recovered(dir.path()).unwrap();
        assert_eq!(indexes(&shared), vec![11, 12]);
        assert_eq!(shared.last_entry, Some(entry(12).log_id));
    }

    #[test]
    fn an_unfinished_write_before_the_last_segment_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        segment(dir.path(), 1, &[(1..=3, true), (4..=4, false)]);
        segment(dir.path(), 5, &[(5..=6, true)]);
        let e = recovered(dir.path()).err().expect("refused").to_string();
        assert!(e.contains("not the last segment"), "{e}");
    }

    #[tokio::test]
    async fn truncation_and_purge_last_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        segment(dir.path(), 1, &[(1..=3, true)]);
        segment(dir.path(), 4, &[(4..=6, true)]);
        segment(dir.path(), 7, &[(7..=9, true)]);
        {
            let mut log = LogStore::open(dir.path(), None, 1 << 20, false, None, None).unwrap();
            log.truncate(entry(5).log_id).await.unwrap();
            log.purge(entry(3).log_id).await.unwrap();
            let state = log.get_log_state().await.unwrap();
            assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(entry(3).log_id), Some(entry(4).log_id)));
            log.save_vote(&Vote::new(3, 2)).await.unwrap();
        }
        // The purged segment goes on a thread of its own.
        let purged = dir.path().join(LOG_DIR).join(format!("{:020}.wal", 1));
        for _ in 0..500 {
            if !purged.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!purged.exists(), "the purged segment was not removed within 5 s");
        let shared = recovered(dir.path()).unwrap();
        assert_eq!(indexes(&shared), vec![4]);
        assert_eq!(shared.meta.last_purged, Some(entry(3).log_id));
        assert_eq!(shared.meta.vote, Some(Vote::new(3, 2)));
        let names: Vec<u64> = shared.segments.keys().copied().collect();
        assert_eq!(names, vec![4, 7], "segment 1 purged; 7 holds the truncation");
        // Appends go on after the truncation, and outlast a restart.
        drop(shared);
        segment_append(dir.path(), 7, 5..=6);
        assert_eq!(indexes(&recovered(dir.path()).unwrap()), vec![4, 5, 6]);
        let mut log = LogStore::open(dir.path(), None, 1 << 20, false, None, None).unwrap();
        let got: Vec<u64> = log.try_get_log_entries(0..100).await.unwrap().iter().map(|e| e.log_id.index).collect();
        assert_eq!(got, vec![4, 5, 6]);
    }

    #[test]
    fn segments_written_after_a_truncation_read_back_in_the_order_written() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of about three entries each.
        let files = Files { dir: dir.path().join(LOG_DIR), power_loss: false, segment_bytes: 120 };
        std::fs::create_dir_all(&files.dir).unwrap();
        let writer = Writer {
            files: files.clone(),
            shared: Arc::new(Mutex::new(Shared::default())),
            committed: Arc::new(Mutex::new(None)),
            synced: tokio::sync::watch::channel(SyncState::default()).0,
            under_way: Arc::new(UnderWay::new()),
            sync_delay_ms: None,
        };
        let term = |t: u64, i: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(t, 1), i),
            payload: EntryPayload::Blank,
        };
        let append = |entries: Vec<Entry>, unsynced: &mut Option<SegmentFile>| {
            let mut buffer = Buffer::default();
            for e in entries {
                let (at, len) = buffer.push(&WalOut::Entry(&e)).unwrap();
                buffer.items.push(BufItem::Entry(e, at, len));
            }
            writer.flush(&mut buffer, unsynced).unwrap();
        };
        let truncate = |from: u64, unsynced: &mut Option<SegmentFile>| {
            let mut buffer = Buffer::default();
            buffer.push(&WalOut::Truncate { from }).unwrap();
            buffer.items.push(BufItem::Truncate(from));
            writer.flush(&mut buffer, unsynced).unwrap();
        };
        let mut unsynced = None;
        for i in 1..=9 {
            append(vec![term(1, i)], &mut unsynced);
        }
        truncate(3, &mut unsynced);
        for i in 3..=8 {
            append(vec![term(2, i)], &mut unsynced);
        }
        if let Some(f) = unsynced.take() {
            f.sync().unwrap();
        }
        let names: Vec<u64> = lock(&writer.shared).segments.keys().copied().collect();
        assert!(names.len() >= 4 && names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        let shared = recovered(dir.path()).unwrap();
        let ids: Vec<(u64, u64)> = shared.locs.values().map(|l| (l.log_id.leader_id.term, l.log_id.index)).collect();
        let want: Vec<(u64, u64)> = (1..=2).map(|i| (1, i)).chain((3..=8).map(|i| (2, i))).collect();
        assert_eq!(ids, want);
        assert_eq!(shared.last_entry, Some(term(2, 8).log_id));
    }

    #[test]
    fn a_committed_hint_ahead_of_the_written_entries_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files { dir: dir.path().join(LOG_DIR), power_loss: false, segment_bytes: SEGMENT_BYTES };
        std::fs::create_dir_all(&files.dir).unwrap();
        let writer = Writer {
            files,
            shared: Arc::new(Mutex::new(Shared::default())),
            committed: Arc::new(Mutex::new(None)),
            synced: tokio::sync::watch::channel(SyncState::default()).0,
            under_way: Arc::new(UnderWay::new()),
            sync_delay_ms: None,
        };
        let write = |range: std::ops::RangeInclusive<u64>, unsynced: &mut Option<SegmentFile>| {
            let mut buffer = Buffer::default();
            for i in range {
                let e = entry(i);
                let (at, len) = buffer.push(&WalOut::Entry(&e)).unwrap();
                buffer.items.push(BufItem::Entry(e, at, len));
            }
            writer.flush(&mut buffer, unsynced).unwrap();
        };
        let mut unsynced = None;
        // openraft reports entry 6 committed while entries 4..=6 still wait
        // behind the write of 1..=3.
        *writer.committed.lock().unwrap() = Some(Some(entry(6).log_id));
        write(1..=3, &mut unsynced);
        assert_eq!(recovered(dir.path()).unwrap().committed, None, "not ahead of the log");
        write(4..=6, &mut unsynced);
        assert_eq!(recovered(dir.path()).unwrap().committed, Some(entry(6).log_id));
    }

    #[test]
    fn a_format_4_log_moves_into_segments() {
        use redb::TableDefinition;
        const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join(OLD_LOG_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                for i in 3..=7 {
                    log.insert(i, record::encode(&entry(i)).unwrap().as_slice()).unwrap();
                }
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("vote", record::encode(&Vote::new(4, 1)).unwrap().as_slice()).unwrap();
                meta.insert("last_purged", record::encode(&entry(2).log_id).unwrap().as_slice()).unwrap();
                meta.insert("committed", record::encode(&Some(entry(6).log_id)).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        migrate_from_redb(dir.path()).unwrap();
        remove_old_log(dir.path()).unwrap();
        assert!(!dir.path().join(OLD_LOG_FILE).exists());
        let shared = recovered(dir.path()).unwrap();
        assert_eq!(indexes(&shared), vec![3, 4, 5, 6, 7]);
        assert_eq!(shared.meta.vote, Some(Vote::new(4, 1)));
        assert_eq!(shared.meta.last_purged, Some(entry(2).log_id));
        assert_eq!(shared.committed, Some(entry(6).log_id));
        // Nothing left to move: a second call changes nothing.
        migrate_from_redb(dir.path()).unwrap();
        assert_eq!(indexes(&recovered(dir.path()).unwrap()), vec![3, 4, 5, 6, 7]);
    }
}
