//! The continuous archive, for point-in-time restore: the state machine
//! keeps every local write in its `archive` table while archiving is on
//! (replicated, so a new leader has what the old one had not stored yet),
//! and the region's leader stores them in segments to the backup target
//! every `archive_every`, then proposes `Command::Archived` to drop what
//! it stored. A restore replays the archive after a backup, up to a chosen
//! time: the RPO of backup & restore becomes the archive interval.
//!
//! A segment is a run of frames: first the archive's state when it was
//! read (archiving on since log index `since`, stored through `through`),
//! then the writes above `through`. From the states a restore knows
//! whether the segments cover every write after its backup: each must
//! continue from where the one before ended (overlaps, from a leader that
//! stopped between storing a segment and proposing, are harmless).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use metrics::{counter, gauge};
use tokio::sync::watch;

use super::{Manifest, Target};
use crate::config::BackupConfig;
use crate::hlc::Hlc;
use crate::limits::WRITES_PER_ENTRY_MAX;
use crate::node::Node;
use crate::storage::snapshot::{self, Item};
use crate::storage::state_machine::ArchiveState;
use crate::types::{Command, CommandResult, StoredValue};

/// Bytes of keys and values per segment (one write more at most).
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// Writes per segment.
const SEGMENT_WRITES_MAX: usize = 50_000;

/// How often a node with archiving off checks whether the region still
/// keeps an archive (to drop it).
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Starts the archiver: with a target and `archive_every` it stores the
/// archive; without, it turns a region's archive off (so it stops growing).
pub fn spawn(node: Arc<Node>, config: BackupConfig, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(node, config, stop))
}

async fn run(node: Arc<Node>, config: BackupConfig, mut stop: watch::Receiver<bool>) {
    let target = if config.target.is_empty() || config.archive_every.is_zero() {
        None
    } else {
        match Target::open(&config.target) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "the archive is off: its target does not open");
                None
            }
        }
    };
    let every = if target.is_some() { config.archive_every } else { IDLE_CHECK };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if node.check_leader().is_err() {
            continue;
        }
        let state = node.reader().archive_state();
        let outcome = match (&target, state.on) {
            (None, false) => continue,
            (None, true) => node.propose(Command::Archived { on: false, through: 0 }).await.map(|_| 0),
            (Some(_), false) => node.propose(Command::Archived { on: true, through: 0 }).await.map(|_| 0),
            (Some(t), true) => match store(&node, t, state).await {
                Ok(n) => Ok(n),
                Err(e) => {
                    counter!("nines_archive_failures_total").increment(1);
                    tracing::warn!(error = format!("{e:#}"), "storing the archive failed; retrying");
                    continue;
                }
            },
        };
        match outcome {
            Ok(stored) if stored > 0 => {
                counter!("nines_archive_writes_total").increment(stored);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                gauge!("nines_archive_last_store_timestamp_seconds").set(now.as_secs_f64());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "changing the archive's state failed; retrying"),
        }
    }
}

/// Stores every archived write above `state.through` in segments; returns
/// how many it stored.
async fn store(node: &Node, target: &Target, state: ArchiveState) -> anyhow::Result<u64> {
    let mut through = state.through;
    let mut stored = 0;
    loop {
        let (page, complete) = node.reader().archive_after(through, SEGMENT_WRITES_MAX, SEGMENT_BYTES)?;
        let (Some(first), Some(last)) = (page.first().map(|p| p.0), page.last().map(|p| p.0)) else {
            return Ok(stored);
        };
        let mut frames = Vec::new();
        snapshot::push_frame(&mut frames, &Item::ArchiveState(ArchiveState { through, ..state }))?;
        let n = page.len() as u64;
        for (index, record) in page {
            snapshot::push_frame(&mut frames, &Item::Archive { index, record })?;
        }
        target.put_segment(node.region(), first, last, frames).await?;
        match node.propose(Command::Archived { on: true, through: last }).await? {
            CommandResult::None => {}
            other => bail!("the region refused to mark the archive stored through {last}: {other:?}"),
        }
        counter!("nines_archive_segments_total").increment(1);
        stored += n;
        through = last;
        if complete {
            return Ok(stored);
        }
    }
}

/// The archived writes a restore replays on top of a backup.
#[derive(Debug, Default)]
pub struct Replay {
    /// Per key, the last write (by HLC, then origin) after the backup.
    pub writes: BTreeMap<Vec<u8>, StoredValue>,
    /// Archived writes read, and segments.
    pub count: u64,
    pub segments: usize,
    /// The greatest version index and timestamp replayed.
    pub last_index: u64,
    pub newest: Hlc,
}

/// Whether `a` is written after `b`, last-writer-wins.
pub fn newer(a: &StoredValue, b: &StoredValue) -> bool {
    (a.version.hlc, &a.version.origin) > (b.version.hlc, &b.version.origin)
}

/// Reads the archive of `manifest`'s region after the backup, keeping the
/// writes stamped at or before `to_ms` (every write without it). Refuses
/// an archive that does not cover every write after the backup, naming
/// the gap.
pub async fn replay(target: &Target, manifest: &Manifest, to_ms: Option<u64>) -> anyhow::Result<Replay> {
    // Version index = log index x WRITES_PER_ENTRY_MAX + position: below
    // `bound` the backup holds every write.
    let bound = (manifest.applied_index + 1) * WRITES_PER_ENTRY_MAX;
    let mut covered = bound - 1;
    let mut out = Replay::default();
    for segment in target.segments(&manifest.region).await?.into_iter().filter(|s| s.last >= bound) {
        let name = segment.name().to_string();
        let bytes = target.segment(&segment).await?;
        let items = snapshot::read_frames(&bytes).map_err(|e| anyhow::anyhow!("archive segment {name}: {e}"))?;
        let mut items = items.into_iter();
        let Some(Item::ArchiveState(state)) = items.next() else {
            bail!("archive segment {name} does not begin with the archive's state");
        };
        if state.since > manifest.applied_index + 1 {
            bail!(
                "the archive of {} does not cover the writes after backup {}: archiving began at log index {}, \
                 after the backup's {}; restore a backup taken after it, or without the archive",
                manifest.region,
                manifest.id,
                state.since,
                manifest.applied_index
            );
        }
        if state.through > covered {
            bail!(
                "the archive of {} has a gap before segment {name}: it continues from write {}, but the backup and \
                 the segments before it reach {covered}",
                manifest.region,
                state.through
            );
        }
        out.segments += 1;
        for item in items {
            let Item::Archive { index, record } = item else {
                bail!("archive segment {name} holds a frame that is not an archived write");
            };
            if index < bound || to_ms.is_some_and(|t| record.value.version.hlc.physical_ms > t) {
                continue;
            }
            out.count += 1;
            out.last_index = out.last_index.max(index);
            out.newest = out.newest.max(record.value.version.hlc);
            match out.writes.get(&record.key) {
                Some(kept) if !newer(&record.value, kept) => {}
                _ => {
                    out.writes.insert(record.key, record.value);
                }
            }
        }
        covered = covered.max(segment.last);
    }
    Ok(out)
}
