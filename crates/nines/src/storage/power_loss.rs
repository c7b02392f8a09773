//! A redb storage backend for tests that keeps only what was synced, the
//! way a disk with a volatile write cache does at a power cut (the idea of
//! Jepsen's LazyFS, inside the process).
//!
//! Writes and length changes go to an in-memory image of the file, which
//! every read sees, and are queued; `sync_data` applies the queue to the
//! medium in order, in 4 KiB pieces, then syncs the medium. So:
//! - killing the process (`kill -9`) is a power cut: whatever was not synced
//!   is gone, as it would be from a disk cache;
//! - a kill during a sync leaves the queue applied up to some point, the
//!   last write torn part way: the order a disk may persist writes in before
//!   its flush completes;
//! - [`PowerLossBackend::cut_power`] does the same inside a test, at a
//!   chosen point of the queue.
//!
//! A node uses it only with `storage.power_loss_simulation = true`, which
//! needs `fault_injection = true`. It holds a copy of the whole file in
//! memory: it is for tests, never for real data.

use std::fmt::Debug;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Bytes written to the medium at a time while syncing: a power cut (a kill)
/// during a sync can land between any two pieces, tearing a page.
const SYNC_PIECE_BYTES: usize = 4096;

/// Where synced data lives: a file, or memory in a test.
#[allow(clippy::len_without_is_empty)] // Mirrors redb's StorageBackend.
pub trait Medium: Debug + Send + Sync + 'static {
    fn len(&self) -> io::Result<u64>;
    /// Reads `out.len()` bytes at `offset`; the medium holds them.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
}

impl Medium for std::fs::File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(out, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// A disk in memory, for tests: what it holds survives a power cut.
#[derive(Debug, Default, Clone)]
pub struct MemoryDisk(Arc<Mutex<Vec<u8>>>);

impl MemoryDisk {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Medium for MemoryDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.bytes();
        let start = offset as usize;
        let src = bytes.get(start..start + out.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.bytes();
        let end = offset as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes().resize(len as usize, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A change not yet synced.
#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug)]
struct State {
    /// The file as the process sees it: synced data and every change since.
    image: Vec<u8>,
    /// The changes since the last sync, in order.
    queue: Vec<Op>,
    /// Test only: the next sync stops after this many bytes reach the
    /// medium, tearing the write it is in, and fails, as a machine that
    /// loses power during a flush.
    fail_sync_after: Option<usize>,
}

/// See the module doc.
#[derive(Debug)]
pub struct PowerLossBackend<M: Medium> {
    medium: M,
    /// `std::sync::Mutex`: redb calls the backend from its own threads, and
    /// nothing awaits under it.
    state: Mutex<State>,
}

impl<M: Medium> PowerLossBackend<M> {
    /// A backend over what `medium` holds now.
    pub fn new(medium: M) -> io::Result<Self> {
        let mut image = vec![0; medium.len()? as usize];
        medium.read_at(0, &mut image)?;
        Ok(PowerLossBackend { medium, state: Mutex::new(State { image, queue: Vec::new(), fail_sync_after: None }) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A power cut in a test: the first `kept` queued changes reach the
    /// medium, then `torn` bytes of the next one if it is a write; the rest
    /// is lost. The backend must not be used afterwards; open a new one on
    /// the medium, as a rebooted machine would.
    pub fn cut_power(&self, kept: usize, torn: usize) -> io::Result<()> {
        let state = self.state();
        for op in state.queue.iter().take(kept) {
            apply(&self.medium, op)?;
        }
        if let Some(Op::Write { offset, data }) = state.queue.get(kept) {
            self.medium.write_at(*offset, &data[..torn.min(data.len())])?;
        }
        Ok(())
    }

    /// Changes queued since the last sync.
    pub fn unsynced(&self) -> usize {
        self.state().queue.len()
    }

    /// Makes the next sync lose power after `bytes` bytes reached the medium
    /// (see `State::fail_sync_after`).
    pub fn fail_next_sync_after(&self, bytes: usize) {
        self.state().fail_sync_after = Some(bytes);
    }
}

fn apply<M: Medium>(medium: &M, op: &Op) -> io::Result<()> {
    match op {
        Op::Write { offset, data } => {
            for (i, piece) in data.chunks(SYNC_PIECE_BYTES).enumerate() {
                medium.write_at(offset + (i * SYNC_PIECE_BYTES) as u64, piece)?;
            }
            Ok(())
        }
        Op::SetLen(len) => medium.set_len(*len),
    }
}

impl<M: Medium> redb::StorageBackend for PowerLossBackend<M> {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().image.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state();
        let start = offset as usize;
        let src =
            state.image.get(start..start + out.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        state.image.resize(len as usize, 0);
        state.queue.push(Op::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state();
        if let Some(budget) = state.fail_sync_after.take() {
            let mut left = budget;
            for op in &state.queue {
                match op {
                    Op::Write { offset, data } => {
                        let n = left.min(data.len());
                        self.medium.write_at(*offset, &data[..n])?;
                        left -= n;
                    }
                    Op::SetLen(len) => self.medium.set_len(*len)?,
                }
                if left == 0 {
                    break;
                }
            }
            return Err(io::Error::other(format!("power cut after {budget} bytes of a sync")));
        }
        for op in &state.queue {
            apply(&self.medium, op)?;
        }
        self.medium.sync()?;
        state.queue.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        let end = offset as usize + data.len();
        if state.image.len() < end {
            state.image.resize(end, 0);
        }
        state.image[offset as usize..end].copy_from_slice(data);
        state.queue.push(Op::Write { offset, data: data.to_vec() });
        Ok(())
    }
}

/// The same simulation under the log's segment files.
impl<M: Medium> Medium for PowerLossBackend<M> {
    fn len(&self) -> io::Result<u64> {
        redb::StorageBackend::len(self)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        redb::StorageBackend::read(self, offset, out)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        redb::StorageBackend::write(self, offset, data)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        redb::StorageBackend::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        redb::StorageBackend::sync_data(self)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(disk: &MemoryDisk) -> (Database, Arc<PowerLossBackend<MemoryDisk>>) {
        let backend = Arc::new(PowerLossBackend::new(disk.clone()).expect("backend"));
        let db =
            Database::builder().create_with_backend(SharedBackend(backend.clone())).expect("open after a power cut");
        (db, backend)
    }

    /// Lets the test keep a handle on the backend redb owns.
    #[derive(Debug)]
    struct SharedBackend(Arc<PowerLossBackend<MemoryDisk>>);

    impl redb::StorageBackend for SharedBackend {
        fn len(&self) -> io::Result<u64> {
            redb::StorageBackend::len(&*self.0)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            redb::StorageBackend::read(&*self.0, offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            redb::StorageBackend::set_len(&*self.0, len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            redb::StorageBackend::write(&*self.0, offset, data)
        }
    }

    /// Commits `n` values, durably or not.
    fn commit(db: &Database, from: u64, n: u64, durable: bool) -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut t = txn.open_table(T)?;
            for k in from..from + n {
                t.insert(k, k * 7)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn a_power_cut_during_any_flush_keeps_every_durable_commit_and_the_database_opens(
            rounds in prop::collection::vec((1u64..300, any::<bool>()), 1..10),
            torn_after in 0usize..200_000,
        ) {
            let disk = MemoryDisk::default();
            let (db, backend) = open(&disk);
            let mut durable = 0;
            let mut next = 0;
            // The last round's flush loses power part way through.
            for (i, (n, is_durable)) in rounds.iter().enumerate() {
                if i + 1 == rounds.len() {
                    backend.fail_next_sync_after(torn_after);
                }
                let done = commit(&db, next, *n, *is_durable || i + 1 == rounds.len());
                next += n;
                match done {
                    Ok(()) if *is_durable => durable = next,
                    Ok(()) => {}
                    Err(_) => break,
                }
            }
            std::mem::forget(db); // a power cut: no clean shutdown
            let (db, _) = open(&disk);
            let txn = db.begin_read().unwrap();
            if durable > 0 {
                let t = txn.open_table(T).unwrap();
                for k in 0..durable {
                    let v = t.get(k).unwrap().map(|g| g.value());
                    prop_assert_eq!(v, Some(k * 7), "durable key {} lost", k);
                }
            }
        }
    }

    #[test]
    fn unsynced_writes_are_lost_at_a_power_cut_and_synced_ones_kept() {
        let disk = MemoryDisk::default();
        let (db, backend) = open(&disk);
        commit(&db, 0, 10, true).unwrap();
        commit(&db, 10, 10, false).unwrap();
        backend.cut_power(0, 0).unwrap();
        std::mem::forget(db);
        let (db, _) = open(&disk);
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        assert_eq!(t.get(9).unwrap().map(|g| g.value()), Some(63));
        assert!(t.get(10).unwrap().is_none(), "the unsynced commit is gone");
    }
}
