//! Snapshot files: the state machine at one applied index, streamed to a
//! file from a read transaction (applies go on meanwhile, and nothing holds
//! the key space in memory), sent to followers in chunks by openraft, and
//! read back in bounded batches to install.
//!
//! Format: a sequence of frames, each a little-endian `u32` length and a
//! [`record`] (version, CRC32, postcard). The first frame is the header
//! (openraft's metadata and the region state), then every stored value,
//! changefeed entry and divergence record, then an end frame with their
//! counts. A file that ends early, has a bad frame or the wrong counts is
//! refused whole: a snapshot is installed completely or not at all.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record;
use super::session::SessionRecord;
use super::state_machine::{ArchiveRecord, ArchiveState, ChangeRecord, DivergentRecord, RegionState};
use crate::types::{SnapshotMeta, StoredValue};

/// Largest frame a snapshot file may hold: one stored value with its key
/// and framing, far below it. A larger length is a damaged file, refused
/// before anything is allocated for it.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The directory of snapshot files inside the data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// How much of a snapshot being written may wait unsynced. A snapshot holds
/// the whole state (1.9 GB after a minute of the harness's `large`
/// workload), every node builds one at about the same log index, and one
/// sync of it all at the end queued each node's log flushes behind it for
/// 0.5-0.7 s, long enough for an election. Synced in steps, a log flush
/// queues behind at most a step of each snapshot being written, not a whole
/// state.
const SYNC_STEP_BYTES: u64 = 8 * 1024 * 1024;

/// The snapshot a node serves to followers and keeps after a restart.
pub const CURRENT: &str = "current.snap";

/// One frame's contents.
#[derive(Debug, Serialize, Deserialize)]
pub enum Item {
    Header {
        meta: Box<SnapshotMeta>,
        region: Box<RegionState>,
    },
    Data {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        value: StoredValue,
    },
    Change {
        index: u64,
        record: ChangeRecord,
    },
    Divergent {
        seq: u64,
        record: DivergentRecord,
    },
    End {
        data: u64,
        changefeed: u64,
        divergent: u64,
    },
    // Added after `End`, so files written before them keep decoding; not
    // counted by the end frame.
    Archive {
        index: u64,
        record: ArchiveRecord,
    },
    ArchiveState(ArchiveState),
    Session {
        client: [u8; 16],
        record: SessionRecord,
    },
    SessionClock(u64),
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot frame {frame}: {source}")]
    Record { frame: u64, source: record::RecordError },
    #[error("snapshot frame {frame} claims {len} bytes; limit FRAME_BYTES_MAX is {FRAME_BYTES_MAX}")]
    FrameTooLarge { frame: u64, len: usize },
    #[error("snapshot is damaged: {0}")]
    Damaged(String),
}

/// One frame's record, checked against `FRAME_BYTES_MAX`.
fn encode_frame(item: &Item) -> Result<Vec<u8>, SnapshotError> {
    let bytes = record::encode(item).map_err(|source| SnapshotError::Record { frame: 0, source })?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(SnapshotError::FrameTooLarge { frame: 0, len: bytes.len() });
    }
    Ok(bytes)
}

/// Appends one frame (its length, then its record) to a buffer of frames,
/// as backups carry them.
pub fn push_frame(out: &mut Vec<u8>, item: &Item) -> Result<(), SnapshotError> {
    let bytes = encode_frame(item)?;
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Every item of a buffer of frames, in order; a frame that is cut,
/// too large or damaged is an error naming it.
pub fn read_frames(mut bytes: &[u8]) -> Result<Vec<Item>, SnapshotError> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let frame = items.len() as u64;
        let cut = || SnapshotError::Damaged(format!("frame {frame} is cut short"));
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(cut)?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(SnapshotError::FrameTooLarge { frame, len });
        }
        let body = rest.get(..len).ok_or_else(cut)?;
        items.push(record::decode(body).map_err(|source| SnapshotError::Record { frame, source })?);
        bytes = &rest[len..];
    }
    Ok(items)
}

/// Writes frames to a snapshot file, counting what it wrote.
pub struct Writer {
    out: BufWriter<std::fs::File>,
    counts: (u64, u64, u64),
    /// Bytes written since the last sync.
    unsynced: u64,
    /// Bytes written in all.
    bytes: u64,
}

impl Writer {
    pub fn create(path: &Path, meta: SnapshotMeta, region: RegionState) -> Result<Self, SnapshotError> {
        let file = std::fs::File::create(path)?;
        let mut w = Writer { out: BufWriter::new(file), counts: (0, 0, 0), unsynced: 0, bytes: 0 };
        w.frame(&Item::Header { meta: Box::new(meta), region: Box::new(region) })?;
        Ok(w)
    }

    fn frame(&mut self, item: &Item) -> Result<(), SnapshotError> {
        let bytes = encode_frame(item)?;
        self.out.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.out.write_all(&bytes)?;
        self.unsynced += 4 + bytes.len() as u64;
        self.bytes += 4 + bytes.len() as u64;
        if self.unsynced >= SYNC_STEP_BYTES {
            self.out.flush()?;
            self.out.get_ref().sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    pub fn data(&mut self, key: Vec<u8>, value: StoredValue) -> Result<(), SnapshotError> {
        self.counts.0 += 1;
        self.frame(&Item::Data { key, value })
    }

    pub fn change(&mut self, index: u64, record: ChangeRecord) -> Result<(), SnapshotError> {
        self.counts.1 += 1;
        self.frame(&Item::Change { index, record })
    }

    pub fn divergent(&mut self, seq: u64, record: DivergentRecord) -> Result<(), SnapshotError> {
        self.counts.2 += 1;
        self.frame(&Item::Divergent { seq, record })
    }

    pub fn archive(&mut self, index: u64, record: ArchiveRecord) -> Result<(), SnapshotError> {
        self.frame(&Item::Archive { index, record })
    }

    pub fn archive_state(&mut self, state: ArchiveState) -> Result<(), SnapshotError> {
        self.frame(&Item::ArchiveState(state))
    }

    pub fn session(&mut self, client: [u8; 16], record: SessionRecord) -> Result<(), SnapshotError> {
        self.frame(&Item::Session { client, record })
    }

    pub fn session_clock(&mut self, ms: u64) -> Result<(), SnapshotError> {
        self.frame(&Item::SessionClock(ms))
    }

    /// Ends the file and makes it durable; returns its size.
    pub fn finish(mut self) -> Result<u64, SnapshotError> {
        let (data, changefeed, divergent) = self.counts;
        self.frame(&Item::End { data, changefeed, divergent })?;
        let file = self.out.into_inner().map_err(|e| SnapshotError::Io(e.into_error()))?;
        file.sync_all()?;
        Ok(self.bytes)
    }
}

/// Reads a snapshot file's frames in order; the header first.
pub struct Reader {
    input: BufReader<std::fs::File>,
    frame: u64,
    counts: (u64, u64, u64),
    ended: bool,
}

impl Reader {
    /// Opens a snapshot file and reads its header.
    pub fn open(path: &Path) -> Result<(Self, SnapshotMeta, RegionState), SnapshotError> {
        Self::from_file(std::fs::File::open(path)?)
    }

    /// Reads a snapshot's header from an open file, from where it stands.
    pub fn from_file(file: std::fs::File) -> Result<(Self, SnapshotMeta, RegionState), SnapshotError> {
        let mut r = Reader { input: BufReader::new(file), frame: 0, counts: (0, 0, 0), ended: false };
        match r.raw()? {
            Some(Item::Header { meta, region }) => Ok((r, *meta, *region)),
            _ => Err(SnapshotError::Damaged("it does not begin with a header".into())),
        }
    }

    fn raw(&mut self) -> Result<Option<Item>, SnapshotError> {
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(SnapshotError::FrameTooLarge { frame: self.frame, len });
        }
        let mut bytes = vec![0; len];
        self.input.read_exact(&mut bytes)?;
        let item = record::decode(&bytes).map_err(|source| SnapshotError::Record { frame: self.frame, source })?;
        self.frame += 1;
        Ok(Some(item))
    }

    /// Reads a whole snapshot file: every frame, the end frame and its counts.
    pub fn verify(path: &Path) -> Result<SnapshotMeta, SnapshotError> {
        let (mut r, meta, _) = Self::open(path)?;
        while r.next_item()?.is_some() {}
        Ok(meta)
    }

    /// The next stored item, or `None` after the end frame, whose counts
    /// must match what was read.
    pub fn next_item(&mut self) -> Result<Option<Item>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        match self.raw()? {
            None => Err(SnapshotError::Damaged(format!("it ends after {} frames, before its end frame", self.frame))),
            Some(Item::Header { .. }) => {
                Err(SnapshotError::Damaged(format!("a second header at frame {}", self.frame)))
            }
            Some(Item::End { data, changefeed, divergent }) => {
                if (data, changefeed, divergent) != self.counts {
                    return Err(SnapshotError::Damaged(format!(
                        "its end frame counts {:?}, but it holds {:?}",
                        (data, changefeed, divergent),
                        self.counts
                    )));
                }
                self.ended = true;
                Ok(None)
            }
            Some(item) => {
                match &item {
                    Item::Data { .. } => self.counts.0 += 1,
                    Item::Change { .. } => self.counts.1 += 1,
                    Item::Divergent { .. } => self.counts.2 += 1,
                    Item::Header { .. }
                    | Item::End { .. }
                    | Item::Archive { .. }
                    | Item::ArchiveState(_)
                    | Item::Session { .. }
                    | Item::SessionClock(_) => {}
                }
                Ok(Some(item))
            }
        }
    }
}

/// Where snapshots live, and the path of a new file in it.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SNAPSHOT_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::types::Version;

    fn value(v: &str) -> StoredValue {
        StoredValue {
            value: Some(v.as_bytes().to_vec()),
            version: Version { hlc: Hlc { physical_ms: 1, logical: 0 }, origin: "a".into(), index: 1 },
        }
    }

    fn write(path: &Path, n: usize) {
        let mut w = Writer::create(path, SnapshotMeta::default(), RegionState::default()).unwrap();
        for i in 0..n {
            w.data(format!("k{i}").into_bytes(), value("v")).unwrap();
        }
        w.finish().unwrap();
    }

    fn read_all(path: &Path) -> Result<usize, SnapshotError> {
        let (mut r, _, _) = Reader::open(path)?;
        let mut n = 0;
        while r.next_item()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn a_snapshot_file_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write(&path, 100);
        assert_eq!(read_all(&path).unwrap(), 100);
    }

    #[test]
    fn a_snapshot_of_several_sync_steps_reads_back_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.snap");
        let big = |i: usize| vec![(i % 251) as u8; 64 * 1024];
        let n = (3 * SYNC_STEP_BYTES as usize) / (64 * 1024) + 7;
        let mut w = Writer::create(&path, SnapshotMeta::default(), RegionState::default()).unwrap();
        for i in 0..n {
            let mut v = value("");
            v.value = Some(big(i));
            w.data(format!("k{i:05}").into_bytes(), v).unwrap();
        }
        let bytes = w.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        assert!(bytes > 3 * SYNC_STEP_BYTES);
        let (mut r, _, _) = Reader::open(&path).unwrap();
        let mut i = 0;
        while let Some(item) = r.next_item().unwrap() {
            let Item::Data { key, value } = item else { continue };
            assert_eq!(key, format!("k{i:05}").into_bytes());
            assert_eq!(value.value, Some(big(i)), "value {i}");
            i += 1;
        }
        assert_eq!(i, n);
    }

    #[test]
    fn a_cut_or_damaged_snapshot_file_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write(&path, 100);
        let bytes = std::fs::read(&path).unwrap();
        // Cut anywhere after the header, or one byte flipped anywhere.
        for cut in [bytes.len() - 1, bytes.len() / 2, 40] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(read_all(&path).is_err(), "cut at {cut}");
        }
        for at in (0..bytes.len()).step_by(97) {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            std::fs::write(&path, &flipped).unwrap();
            assert!(read_all(&path).is_err(), "flipped byte {at}");
        }
    }
}
