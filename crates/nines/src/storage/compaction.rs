//! When each node builds its snapshot (and so compacts its log).
//!
//! openraft's own policy (`LogsSinceLast`) makes every node of a region
//! snapshot at the same log index, so whatever a snapshot costs (writing the
//! whole state, removing the purged log) the region pays on every node at
//! once, and nodes that share a disk pay it together. Instead each node
//! snapshots every `every` entries at its own phase: node ids 1, 2 and 3 of
//! a region (or 4, 5, 6) build theirs a third of `every` apart.
//!
//! Invariants:
//! - A node snapshots when its applied index crosses its next phase point,
//!   and never within `every / 2` entries of its last snapshot (one it
//!   installed from its leader included): about every `every` entries.
//! - Only openraft builds snapshots; this task asks it to
//!   (`trigger().snapshot()`), and openraft ignores the ask while it builds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::node::Node;

/// How often the applied index is looked at: snapshots come thousands of
/// entries apart, so a poll costs nothing and a late one little.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Phases a region's nodes are spread over (its usual three AZs).
const PHASES: u64 = 3;

/// How many entries before the common point node `id` snapshots.
pub fn phase(id: u64, every: u64) -> u64 {
    (id.saturating_sub(1) % PHASES) * (every / PHASES)
}

/// Whether a node whose last snapshot holds index `snapshot` (0 for none)
/// and which has applied `applied` should build one now.
pub fn due(applied: u64, snapshot: u64, every: u64, phase: u64) -> bool {
    let every = every.max(1);
    applied >= snapshot.saturating_add(every / 2)
        && (applied.saturating_add(phase)) / every > (snapshot.saturating_add(phase)) / every
}

/// Asks openraft for a snapshot whenever [`due`] says so, until `stop`.
pub fn spawn(node: Arc<Node>, every: u64, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let phase = phase(node.id(), every);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
            let m = node.raft_metrics();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let snapshot = m.snapshot.map_or(0, |l| l.index);
            if due(applied, snapshot, every, phase)
                && let Err(e) = node.trigger_snapshot().await
            {
                tracing::debug!(error = %e, "no snapshot: raft stopped");
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indices at which a node with `phase` snapshots while its applied
    /// index climbs one entry at a time from 0 to `to`.
    fn snapshots(every: u64, phase: u64, to: u64) -> Vec<u64> {
        let mut at = Vec::new();
        let mut snapshot = 0;
        for applied in 1..=to {
            if due(applied, snapshot, every, phase) {
                at.push(applied);
                snapshot = applied;
            }
        }
        at
    }

    #[test]
    fn a_regions_three_nodes_snapshot_a_third_apart_every_interval() {
        assert_eq!(snapshots(900, phase(1, 900), 3_000), vec![900, 1_800, 2_700]);
        assert_eq!(snapshots(900, phase(2, 900), 3_000), vec![600, 1_500, 2_400]);
        // Its first point (300) comes before half an interval: it waits
        // until 450, then keeps its phase.
        assert_eq!(snapshots(900, phase(3, 900), 3_000), vec![450, 1_200, 2_100, 3_000]);
        // Ids run on across regions: node 4 is the first of its region.
        assert_eq!(phase(4, 900), phase(1, 900));
    }

    #[test]
    fn a_snapshot_from_elsewhere_defers_the_next_then_the_phase_returns() {
        // Installed at 850, just before node 1's point at 900: the next is
        // at least half an interval later, then back on the phase.
        let (every, phase) = (900, phase(1, 900));
        assert!(!due(900, 850, every, phase));
        assert!(!due(1_299, 850, every, phase));
        assert!(due(1_300, 850, every, phase));
        assert!(!due(1_799, 1_300, every, phase));
        assert!(due(1_800, 1_300, every, phase));
    }

    #[test]
    fn tiny_or_huge_intervals_stay_defined() {
        assert_eq!(snapshots(1, phase(2, 1), 3), vec![1, 2, 3]);
        assert_eq!(snapshots(2, phase(3, 2), 6), vec![2, 4, 6]);
        assert!(!due(u64::MAX, u64::MAX - 1, u64::MAX, phase(3, u64::MAX)));
    }
}
