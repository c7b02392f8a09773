//! Storage behind a narrow interface: the Raft log ([`LogStore`]) and the
//! state machine ([`StateMachine`]) of one node, each in its own redb file
//! under the node's data directory (so appends and applies never wait on one
//! another's transactions), every record checksummed ([`record`]), and the
//! directory's format checked first ([`mod@format`]).
//!
//! Why redb, and why two files, is measured in `docs/storage.md`.
//!
//! # Layout
//!
//! - [`mod@format`]: the data directory's format version.
//! - [`record`]: the versioned, checksummed encoding of every stored value.
//! - [`log_store`]: the Raft log and vote, with a writer thread that group
//!   commits (one fsync per batch of appends).
//! - [`state_machine`]: the key-value state, changefeed and divergence
//!   record; consistent reads through read transactions.
//! - [`session`]: client sessions, so that a retried write applies once.
//! - [`snapshot`]: snapshot files, streamed out and read back in batches.
//! - [`compaction`]: when each node builds its snapshot (a phase of its
//!   own, so a region's nodes do not all write one at once).
//! - [`power_loss`]: a storage backend for tests that keeps only what was
//!   synced.

// openraft's `StorageError` is large, and the storage traits return it by
// value; boxing it in our helpers would only move the copy elsewhere.
#![allow(clippy::result_large_err)]

pub mod compaction;
pub mod format;
pub mod log_store;
pub mod power_loss;
pub mod record;
pub mod session;
pub mod snapshot;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
pub use log_store::{LogStore, LogSynced};
pub use state_machine::{StateMachine, StateReader};

use crate::hlc::HlcClock;

/// How a node's storage is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// The engine's page cache in bytes, shared between the log and the
    /// state machine (a quarter and three quarters: the log is read mostly
    /// right after it is written).
    pub cache_bytes: usize,
    /// Test only: keep only what was synced at a power cut (`kill -9`); see
    /// [`power_loss`].
    pub power_loss_simulation: bool,
    /// The node whose storage this is: its own appends as leader are
    /// acknowledged to openraft once queued, their sync beside the
    /// followers' (see `log_store::LogSynced`). `None` (a restore)
    /// acknowledges every append once synced.
    pub node_id: Option<crate::types::NodeId>,
    /// Test only: each sync of the log waits this many milliseconds first
    /// (the `log_sync_delay_ms` fault).
    pub log_sync_delay_ms: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// The data directory of one node, for what is not the log or the state
/// machine (its size on disk).
#[derive(Clone)]
pub struct Disk(std::path::PathBuf);

impl Disk {
    /// Bytes of the log and state files and the snapshots.
    pub fn size_on_disk(&self) -> std::io::Result<u64> {
        let mut total = std::fs::metadata(self.0.join(state_machine::STATE_FILE))?.len();
        for dir in [self.0.join(log_store::LOG_DIR), snapshot::dir(&self.0)] {
            for entry in std::fs::read_dir(dir)? {
                total += entry?.metadata()?.len();
            }
        }
        Ok(total)
    }
}

/// Opens (or creates) the storage of one node under `dir`.
pub fn open(dir: &Path, clock: Arc<HlcClock>, options: Options) -> anyhow::Result<(Disk, LogStore, StateMachine)> {
    format::check_or_create(dir)?;
    if format::needs_upgrade(dir) {
        log_store::migrate_from_redb(dir).context("moving the log of data format 4 into log segments")?;
        format::mark(dir)?;
    }
    log_store::remove_old_log(dir)?;
    let backend = |name: &str| -> anyhow::Result<Option<FileBackend>> {
        if !options.power_loss_simulation {
            return Ok(None);
        }
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(name))?;
        Ok(Some(power_loss::PowerLossBackend::new(file)?))
    };
    let mut sm = StateMachine::open(dir, options.cache_bytes / 4 * 3, backend(state_machine::STATE_FILE)?, clock)
        .context("opening the state machine")?;
    let log = LogStore::open(
        dir,
        options.node_id,
        options.cache_bytes / 4,
        options.power_loss_simulation,
        Some(sm.durable_applied()),
        options.log_sync_delay_ms.clone(),
    )
    .context("opening the log")?;
    sm.apply_only_synced(log.synced());
    fsync_dir(dir)?;
    Ok((Disk(dir.to_path_buf()), log, sm))
}

/// The test-only backend a node uses with `power_loss_simulation`.
pub type FileBackend = power_loss::PowerLossBackend<std::fs::File>;

/// Opens a redb database file with a cache of `cache_bytes`, on `backend`
/// when given.
fn open_database(path: &Path, cache_bytes: usize, backend: Option<FileBackend>) -> anyhow::Result<redb::Database> {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(cache_bytes);
    let db = match backend {
        Some(b) => builder.create_with_backend(b)?,
        None => builder.create(path)?,
    };
    Ok(db)
}

/// Makes a directory's entries (files created, renamed or removed in it)
/// durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Runs `f`, a call that may wait on the disk, off the runtime's worker
/// thread where the runtime allows it (`block_in_place`, multi-threaded
/// runtimes), so the node's other tasks go on meanwhile; inline otherwise.
pub(crate) fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::types::{StorageError, TypeConfig};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let sm =
                StateMachine::open(dir.path(), 1 << 20, None, Arc::new(HlcClock::wall(500))).expect("state machine");
            // No purge gate: the suite purges logs with no state machine behind them.
            let log = LogStore::open(dir.path(), None, 1 << 20, false, None, None).expect("open log");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_conformance_suite_passes() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }
}
