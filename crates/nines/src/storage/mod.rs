//! Storage behind a narrow interface: the Raft log ([`LogStore`]) and the
//! state machine ([`StateMachine`]) of one node, both in one sled database
//! under the node's data directory, every record checksummed ([`record`]).
//!
//! sled is unmaintained; keeping it behind these two types means replacing
//! it touches only this module.

// openraft's `StorageError` is large, and the storage traits return it by
// value; boxing it in our helpers would only move the copy elsewhere.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod record;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;

pub use log_store::LogStore;
pub use state_machine::{StateMachine, StateReader};

use crate::hlc::HlcClock;

/// The database of one node, for what is not the log or the state machine
/// (its size on disk).
#[derive(Clone)]
pub struct Disk(sled::Db);

impl Disk {
    pub fn size_on_disk(&self) -> std::io::Result<u64> {
        self.0.size_on_disk().map_err(std::io::Error::other)
    }
}

/// Opens (or creates) the storage of one node under `dir`.
pub fn open(dir: &Path, clock: Arc<HlcClock>) -> anyhow::Result<(Disk, LogStore, StateMachine)> {
    let db = sled::Config::new().path(dir.join("db")).open()?;
    let sm = StateMachine::open(&db, clock).map_err(|e| anyhow::anyhow!("{e}"))?;
    let log = LogStore::open(&db, Some(sm.durable_applied()))?;
    Ok((Disk(db), log, sm))
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
            let db = sled::Config::new().path(dir.path().join("db")).open().expect("open db");
            let sm = StateMachine::open(&db, Arc::new(HlcClock::wall(500)))?;
            // No purge gate: the suite purges logs with no state machine behind them.
            let log = LogStore::open(&db, None).expect("open log");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_conformance_suite_passes() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }
}
