//! Restore: a backup becomes the data directories of a new region, as
//! etcd's snapshot restore does. Every chunk is verified before anything is
//! written; each node's directory is built aside (`.restoring` inside it)
//! and its files moved in with the format marker last, so a node never
//! starts on half a restore.
//!
//! A restored node holds the backup as an installed snapshot at the
//! backup's applied index, its log purged up to it, and the new members as
//! the membership: the nodes elect a leader as after any restart. The
//! cluster identity is new (nothing of the old membership, vote or region
//! roles is kept); versions keep their HLC and origin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Membership};

use super::archive::{self, Replay};
use super::{Manifest, Progress, Target, read_chunk};
use crate::hlc::{Hlc, HlcClock};
use crate::limits::WRITES_PER_ENTRY_MAX;
use crate::storage::snapshot::{self, Item};
use crate::storage::state_machine::RegionState;
use crate::storage::{self, format};
use crate::types::{LogId, NodeId, NodeInfo, SnapshotMeta, StoredMembership};

/// The staging directory inside a data directory.
const STAGING: &str = ".restoring";

/// Storage cache while restoring: the install streams, little is reread.
const RESTORE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// What a restore reports.
#[derive(Debug, Clone)]
pub struct Restored {
    pub backup: String,
    /// When the backup was created (RFC 3339).
    pub created: String,
    /// Live keys restored.
    pub keys: u64,
    /// The log index the new region starts after.
    pub applied_index: u64,
    /// The newest write restored.
    pub hlc_max: Hlc,
    pub nodes: usize,
    /// Archived writes replayed after the backup, from how many segments.
    pub replayed: u64,
    pub segments: usize,
}

/// How far a restore goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Until {
    /// Only writes stamped at or before this time (ms since the Unix
    /// epoch): the newest backup created by then, plus the archive up to it.
    pub time_ms: Option<u64>,
    /// Leave the archive out: the backup alone.
    pub no_archive: bool,
}

/// Whether a data directory holds node data (a config file or log beside it
/// does not count).
pub fn holds_data(dir: &Path) -> bool {
    [format::FORMAT_FILE, storage::log_store::LOG_DIR, storage::state_machine::STATE_FILE, snapshot::SNAPSHOT_DIR]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// The backup `id`, or the newest complete one (of those wholly before
/// `until.time_ms`, when set).
pub async fn choose(target: &Target, id: Option<&str>, until: Until) -> anyhow::Result<Manifest> {
    let before = |m: &Manifest| until.time_ms.is_none_or(|t| m.created_ms <= t && m.hlc_max.physical_ms <= t);
    match id {
        Some(id) => {
            let m = target.manifest(id).await?;
            if !before(&m) {
                bail!("backup {id} was created at {}, after the time to restore to", m.created);
            }
            Ok(m)
        }
        None => target.manifests().await?.into_iter().rfind(before).with_context(|| match until.time_ms {
            Some(_) => format!("{} holds no complete backup created before the time to restore to", target.url()),
            None => format!("{} holds no complete backup", target.url()),
        }),
    }
}

/// Restores `manifest`, and the archive after it up to `until`, into the
/// data directories of `members` (every voter of the new region). Refuses
/// a directory that holds data.
pub async fn restore(
    target: &Target,
    manifest: &Manifest,
    until: Until,
    members: &[(NodeId, NodeInfo, PathBuf)],
    progress: &dyn Progress,
) -> anyhow::Result<Restored> {
    if members.is_empty() {
        bail!("a restore needs at least one node");
    }
    for (id, _, dir) in members {
        if holds_data(dir) {
            bail!(
                "the data directory of node {id}, {}, holds data: a restore makes a new region and never writes \
                 over one; give an empty directory",
                dir.display()
            );
        }
    }
    // Everything is checked before anything is written: every chunk, and
    // every archive segment (read whole into the replay).
    super::verify(target, manifest, progress).await?;
    let replay =
        if until.no_archive { Replay::default() } else { archive::replay(target, manifest, until.time_ms).await? };

    let staging: Vec<PathBuf> = members.iter().map(|(_, _, d)| d.join(STAGING)).collect();
    let result = build(target, manifest, replay, members, &staging).await;
    if result.is_err() {
        for s in &staging {
            let _ = std::fs::remove_dir_all(s);
        }
    }
    result
}

async fn build(
    target: &Target,
    manifest: &Manifest,
    mut replay: Replay,
    members: &[(NodeId, NodeInfo, PathBuf)],
    staging: &[PathBuf],
) -> anyhow::Result<Restored> {
    for s in staging {
        if s.exists() {
            std::fs::remove_dir_all(s).with_context(|| format!("removing an earlier attempt, {}", s.display()))?;
        }
        std::fs::create_dir_all(s).with_context(|| format!("creating {}", s.display()))?;
    }
    // The new log starts after every restored write's version index.
    let applied = manifest.applied_index.max(replay.last_index / WRITES_PER_ENTRY_MAX).max(1);
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), applied);
    let voters: BTreeSet<NodeId> = members.iter().map(|(id, _, _)| *id).collect();
    let nodes: BTreeMap<NodeId, NodeInfo> = members.iter().map(|(id, info, _)| (*id, info.clone())).collect();
    let membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: membership,
        snapshot_id: format!("restore-{}", manifest.id),
    };

    // One snapshot file from the backup and the replayed archive (each key
    // last-writer-wins; tombstones dropped), installed on every node. A
    // restarted clock starts above the newest write (see `RegionState`).
    let file = staging[0].join("restore.snap");
    let hlc_max = manifest.hlc_max.max(replay.newest);
    let region = RegionState { hlc_high: hlc_max, ..RegionState::default() };
    let mut writer = snapshot::Writer::create(&file, meta.clone(), region)?;
    let (replayed, segments) = (replay.count, replay.segments);
    let mut keys = 0;
    for chunk in &manifest.chunks {
        // Read again, and checked again: the target may have changed since
        // the verify.
        for item in read_chunk(target, manifest, chunk).await? {
            if let Item::Data { key, value } = item {
                if value.version.hlc > manifest.hlc_max {
                    bail!(
                        "backup {}: a value in {} is stamped {}, after the newest write its manifest states ({})",
                        manifest.id,
                        chunk.name,
                        value.version.hlc,
                        manifest.hlc_max
                    );
                }
                let value = match replay.writes.remove(&key) {
                    Some(later) if archive::newer(&later, &value) => later,
                    _ => value,
                };
                if value.value.is_some() {
                    keys += 1;
                    writer.data(key, value)?;
                }
            }
        }
    }
    for (key, value) in std::mem::take(&mut replay.writes) {
        if value.value.is_some() {
            keys += 1;
            writer.data(key, value)?;
        }
    }
    writer.finish()?;

    for (s, (_, _, dir)) in staging.iter().zip(members) {
        install(s, &file, &meta).await.with_context(|| format!("restoring into {}", dir.display()))?;
    }
    std::fs::remove_file(&file)?;
    for (s, (_, _, dir)) in staging.iter().zip(members) {
        move_in(s, dir)?;
    }
    Ok(Restored {
        backup: manifest.id.clone(),
        created: manifest.created.clone(),
        keys,
        applied_index: log_id.index,
        hlc_max,
        nodes: members.len(),
        replayed,
        segments,
    })
}

/// Opens fresh storage in `dir`, installs the snapshot and purges the log
/// up to it.
async fn install(dir: &Path, file: &Path, meta: &SnapshotMeta) -> anyhow::Result<()> {
    let clock = Arc::new(HlcClock::wall(0));
    let options = storage::Options {
        cache_bytes: RESTORE_CACHE_BYTES,
        power_loss_simulation: false,
        node_id: None,
        log_sync_delay_ms: None,
    };
    let (_, mut log, mut sm) = storage::open(dir, clock, options)?;
    let snapshot = tokio::fs::File::open(file).await?;
    sm.install_snapshot(meta, Box::new(snapshot)).await?;
    if let Some(log_id) = meta.last_log_id {
        log.purge_now(log_id).await?;
    }
    Ok(())
}

/// Moves the built files into the data directory, the format marker last.
fn move_in(staging: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(staging)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort_by_key(|n| n == format::FORMAT_FILE);
    for name in names {
        std::fs::rename(staging.join(&name), dir.join(&name))
            .with_context(|| format!("moving {} into {}", name.to_string_lossy(), dir.display()))?;
    }
    storage::fsync_dir(dir)?;
    std::fs::remove_dir(staging)?;
    storage::fsync_dir(dir)?;
    Ok(())
}
