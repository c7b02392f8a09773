//! Snapshot backups: a consistent copy of a region's key space at a stated
//! applied index and HLC range, streamed in chunks to an object store with
//! a manifest of SHA-256 checksums; verification, retention, and restore
//! into a new region.
//!
//! - [`target`]: the object store a URL names and the layout in it.
//! - [`copy`]: the leader's side: a linearizable point, one storage read
//!   transaction, chunks of frames.
//! - [`restore`]: verify every chunk, then build each new node's data
//!   directory aside and move it in whole.
//! - [`archive`]: the continuous archive of every local write, stored by
//!   the leader in segments, replayed by a point-in-time restore.
//! - [`schedule`]: the scheduled backups a node's `[backup]` section asks
//!   for, taken by the region's leader.
//!
//! A chunk is a run of snapshot-file frames ([`crate::storage::snapshot`]):
//! each record carries its own CRC, and the manifest the chunk's SHA-256.

pub mod archive;
pub mod copy;
pub mod restore;
pub mod schedule;
pub mod target;

use std::time::{Duration, SystemTime};

use anyhow::bail;
use futures::{Stream, StreamExt};
use nines_proto::v1::backup_message::Part;
use nines_proto::v1::{BackupHeader, BackupMessage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hlc::Hlc;
use crate::storage::snapshot::{self, Item};
pub use target::{Listed, Target};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Bytes of frames per chunk (one frame more at most): large enough that an
/// object store's per-request cost is small, small enough that neither side
/// holds much of the key space.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// What a backup holds, written last: a backup is complete when its
/// manifest exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub region: String,
    pub epoch: u64,
    /// Every write applied through this log index is in the backup, and
    /// none after it.
    pub applied_index: u64,
    pub applied_term: u64,
    /// The node that read the copy.
    pub node_id: u64,
    /// The oldest and newest write in the backup.
    pub hlc_min: Hlc,
    pub hlc_max: Hlc,
    /// Live keys, and tombstones (deleted keys; a point-in-time restore
    /// orders archived writes against them).
    pub keys: u64,
    pub tombstones: u64,
    /// Bytes of all chunks.
    pub bytes: u64,
    /// RFC 3339, and milliseconds since the Unix epoch.
    pub created: String,
    pub created_ms: u64,
    pub chunks: Vec<ChunkInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub name: String,
    /// Keys (values and tombstones).
    pub records: u64,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl Manifest {
    /// Refuses a manifest this build cannot read or that contradicts itself.
    fn check(&self, id: &str) -> anyhow::Result<()> {
        if self.format_version != MANIFEST_FORMAT {
            bail!("backup {id} has manifest format {}; this build reads format {MANIFEST_FORMAT}", self.format_version);
        }
        if self.id != id {
            bail!("the manifest in folder {id} names backup {}", self.id);
        }
        let (records, bytes) = self.chunks.iter().fold((0, 0), |(r, b), c| (r + c.records, b + c.bytes));
        if (records, bytes) != (self.keys + self.tombstones, self.bytes) {
            bail!(
                "backup {id}: its chunks hold {records} records in {bytes} bytes, its manifest says {} keys and \
                 {} tombstones in {}",
                self.keys,
                self.tombstones,
                self.bytes
            );
        }
        Ok(())
    }

    /// When the backup was created.
    pub fn created_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.created_ms)
    }
}

/// A backup id: its creation time (so ids sort by age) and region.
fn backup_id(created: SystemTime, region: &str) -> String {
    let stamp: String =
        humantime::format_rfc3339_millis(created).to_string().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("{stamp}-{region}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a create reports as it goes.
pub trait Progress: Sync {
    /// A chunk of `bytes` was handled; `records` keys so far.
    fn chunk(&self, records: u64, bytes: u64);
}

impl Progress for indicatif::ProgressBar {
    fn chunk(&self, records: u64, bytes: u64) {
        self.inc(bytes);
        self.set_message(format!("{records} keys"));
    }
}

/// No progress to show (scheduled backups).
pub struct Quiet;

impl Progress for Quiet {
    fn chunk(&self, _records: u64, _bytes: u64) {}
}

/// Writes a backup from a copy's messages (a header, chunks, an end) into
/// `target`, chunk by chunk, and its manifest last.
pub async fn create<S>(target: &Target, mut parts: S, progress: &dyn Progress) -> anyhow::Result<Manifest>
where
    S: Stream<Item = anyhow::Result<BackupMessage>> + Unpin,
{
    let header: BackupHeader = match parts.next().await.transpose()?.and_then(|m| m.part) {
        Some(Part::Header(h)) => h,
        other => bail!("the backup stream did not begin with a header (got {other:?})"),
    };
    let created = SystemTime::now();
    let id = backup_id(created, &header.region);
    let mut chunks = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let end = loop {
        match parts.next().await.transpose()?.and_then(|m| m.part) {
            Some(Part::Chunk(c)) => {
                let info = ChunkInfo {
                    name: String::new(),
                    records: c.records,
                    bytes: c.frames.len() as u64,
                    sha256: sha256_hex(&c.frames),
                };
                let name = target.put_chunk(&id, chunks.len() + 1, c.frames).await?;
                records += info.records;
                bytes += info.bytes;
                progress.chunk(records, info.bytes);
                chunks.push(ChunkInfo { name, ..info });
            }
            Some(Part::End(end)) => break end,
            Some(Part::Header(_)) => bail!("the backup stream sent a second header"),
            None => bail!("the backup stream ended after {records} records, before its end (the node stopped?)"),
        }
    };
    if (end.keys + end.tombstones, end.bytes) != (records, bytes) {
        bail!(
            "the backup stream's end counts {} records in {} bytes, but {records} in {bytes} arrived",
            end.keys + end.tombstones,
            end.bytes
        );
    }
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT,
        id,
        region: header.region,
        epoch: header.epoch,
        applied_index: header.applied_index,
        applied_term: header.applied_term,
        node_id: header.node_id,
        hlc_min: Hlc { physical_ms: end.hlc_min_ms, logical: end.hlc_min_logical },
        hlc_max: Hlc { physical_ms: end.hlc_max_ms, logical: end.hlc_max_logical },
        keys: end.keys,
        tombstones: end.tombstones,
        bytes,
        created: humantime::format_rfc3339_millis(created).to_string(),
        created_ms: created.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        chunks,
    };
    target.put_manifest(&manifest).await?;
    Ok(manifest)
}

/// Reads one chunk, checks its SHA-256 against the manifest and decodes
/// every frame; the error names the chunk and what is wrong with it.
pub async fn read_chunk(target: &Target, manifest: &Manifest, chunk: &ChunkInfo) -> anyhow::Result<Vec<Item>> {
    let name = format!("chunk {} of backup {}", chunk.name, manifest.id);
    let bytes = target.chunk(&manifest.id, &chunk.name).await.map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
    let sha = sha256_hex(&bytes);
    if sha != chunk.sha256 {
        bail!("{name} is corrupt: SHA-256 {sha}, the manifest says {}", chunk.sha256);
    }
    let items = snapshot::read_frames(&bytes).map_err(|e| anyhow::anyhow!("{name} does not decode: {e}"))?;
    let data = items.iter().filter(|i| matches!(i, Item::Data { .. })).count() as u64;
    if data != chunk.records || data != items.len() as u64 {
        bail!("{name} holds {} frames ({data} keys); the manifest says {} keys", items.len(), chunk.records);
    }
    Ok(items)
}

/// Checks every chunk of a backup; the error names the first bad one.
pub async fn verify(target: &Target, manifest: &Manifest, progress: &dyn Progress) -> anyhow::Result<()> {
    let mut records = 0;
    for chunk in &manifest.chunks {
        read_chunk(target, manifest, chunk).await?;
        records += chunk.records;
        progress.chunk(records, chunk.bytes);
    }
    Ok(())
}

/// Which backups of one region to keep: the newest `keep`, and every one
/// created within `keep_within` of now. The newest backup is always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep: Option<u64>,
    #[serde(with = "humantime_serde")]
    pub keep_within: Option<Duration>,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.keep.is_some() || self.keep_within.is_some()
    }

    /// The ids of backups (oldest first) this retention drops at `now`.
    pub fn to_drop(&self, backups: &[Manifest], now: SystemTime) -> Vec<String> {
        if !self.is_set() {
            return Vec::new();
        }
        let n = backups.len();
        backups
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                let newest = *i + 1 == n;
                let by_count = self.keep.is_some_and(|k| (n - i) as u64 <= k);
                let by_age =
                    self.keep_within.is_some_and(|d| now.duration_since(m.created_at()).map_or(true, |age| age <= d));
                !(newest || by_count || by_age)
            })
            .map(|(_, m)| m.id.clone())
            .collect()
    }
}

/// Applies a retention to a target, to each region's backups apart (regions
/// may share a target); returns the ids it deleted.
pub async fn prune(target: &Target, retention: &Retention) -> anyhow::Result<Vec<String>> {
    let all = target.manifests().await?;
    let regions: std::collections::BTreeSet<&str> = all.iter().map(|m| m.region.as_str()).collect();
    let now = SystemTime::now();
    let mut dropped = Vec::new();
    for region in regions {
        let own: Vec<Manifest> = all.iter().filter(|m| m.region == region).cloned().collect();
        dropped.extend(retention.to_drop(&own, now));
    }
    for id in &dropped {
        target.delete(id).await?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, age: Duration, now: SystemTime) -> Manifest {
        let created = now - age;
        Manifest {
            format_version: MANIFEST_FORMAT,
            id: id.into(),
            region: "r".into(),
            epoch: 0,
            applied_index: 1,
            applied_term: 1,
            node_id: 1,
            hlc_min: Hlc::default(),
            hlc_max: Hlc::default(),
            keys: 0,
            tombstones: 0,
            bytes: 0,
            created: String::new(),
            created_ms: created.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64,
            chunks: Vec::new(),
        }
    }

    #[test]
    fn retention_keeps_the_newest_by_count_or_age_and_always_the_last() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let all: Vec<Manifest> = (0..5).map(|i| manifest(&format!("b{i}"), hour * (5 - i), now)).collect();
        let keep2 = Retention { keep: Some(2), keep_within: None };
        assert_eq!(keep2.to_drop(&all, now), ["b0", "b1", "b2"]);
        let within = Retention { keep: None, keep_within: Some(hour * 2 + Duration::from_secs(1)) };
        assert_eq!(within.to_drop(&all, now), ["b0", "b1", "b2"]);
        let both = Retention { keep: Some(4), keep_within: Some(hour) };
        assert_eq!(both.to_drop(&all, now), ["b0"]);
        let long_ago = Retention { keep: None, keep_within: Some(Duration::from_secs(1)) };
        assert_eq!(long_ago.to_drop(&all, now), ["b0", "b1", "b2", "b3"], "the newest stays");
        assert!(Retention::default().to_drop(&all, now).is_empty(), "no rule drops nothing");
    }

    #[tokio::test]
    async fn prune_keeps_each_regions_newest_apart() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(&format!("file://{}", dir.path().display())).unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        for (id, region, age) in [("1-a", "a", 4), ("2-b", "b", 3), ("3-a", "a", 2), ("4-a", "a", 1)] {
            let m = Manifest { region: region.into(), ..manifest(id, hour * age, now) };
            target.put_manifest(&m).await.unwrap();
        }
        let dropped = prune(&target, &Retention { keep: Some(1), keep_within: None }).await.unwrap();
        assert_eq!(dropped, ["1-a", "3-a"], "region b's only backup stays");
        let left: Vec<String> = target.manifests().await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(left, ["2-b", "4-a"]);
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let a = backup_id(t, "us-east");
        let b = backup_id(t + Duration::from_millis(1), "eu-west");
        assert!(a < b, "{a} < {b}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }
}
