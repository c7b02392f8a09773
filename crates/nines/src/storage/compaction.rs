//! When each node builds its snapshot (and so compacts its log).
//!
//! openraft's own policy (`LogsSinceLast`) makes every node of a region
//! snapshot at the same log index, so whatever a snapshot costs (writing the
//! whole state, removing the purged log) the region pays on every node at
//! once, and nodes that share a disk pay it together. Instead each node
//! snapshots every `every` entries at its own phase: the first, second and
//! third of a region's voters (by id) build theirs a third of `every` apart.
//! This module decides when; `Node::spawn_snapshot_schedule` asks openraft
//! (`trigger().snapshot()`) when it is time.
//!
//! Invariants:
//! - A node snapshots when its applied index crosses its next phase point,
//!   and never within `every / 2` entries of its last snapshot (one it
//!   installed from its leader included): about every `every` entries.
//!
//! Caveats:
//! - Three phases: the fourth and fifth voters of a five-AZ region share the
//!   first two voters' phases.
//! - The applied index is polled, so a snapshot comes up to one poll late.

/// Phases a region's nodes are spread over (its usual three AZs).
const PHASES: u64 = 3;

/// How many entries before the common point the voter at `position` (its
/// place among the region's voter ids, in order) snapshots.
pub fn phase(position: usize, every: u64) -> u64 {
    (position as u64 % PHASES) * (every / PHASES)
}

/// Whether a node whose last snapshot holds index `snapshot` (0 for none)
/// and which has applied `applied` should build one now.
pub fn due(applied: u64, snapshot: u64, every: u64, phase: u64) -> bool {
    let every = every.max(1);
    applied >= snapshot.saturating_add(every / 2)
        && (applied.saturating_add(phase)) / every > (snapshot.saturating_add(phase)) / every
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
        assert_eq!(snapshots(900, phase(0, 900), 3_000), vec![900, 1_800, 2_700]);
        assert_eq!(snapshots(900, phase(1, 900), 3_000), vec![600, 1_500, 2_400]);
        // Its first point (300) comes before half an interval: it waits
        // until 450, then keeps its phase.
        assert_eq!(snapshots(900, phase(2, 900), 3_000), vec![450, 1_200, 2_100, 3_000]);
        // A fourth voter shares the first one's phase.
        assert_eq!(phase(3, 900), phase(0, 900));
    }

    #[test]
    fn polls_that_jump_many_entries_still_snapshot_once_per_crossing() {
        // Applied moves 700 entries between two looks.
        let (every, phase) = (1_000, phase(1, 1_000));
        let mut snapshot = 0;
        let mut at = Vec::new();
        for applied in (700..=6_300).step_by(700) {
            if due(applied, snapshot, every, phase) {
                at.push(applied);
                snapshot = applied;
            }
        }
        // Points at 667, 1,667, 2,667 ...: each crossing seen at the next look.
        assert_eq!(at, vec![700, 2_100, 2_800, 4_200, 4_900, 6_300]);
        // The interval of a test that never snapshots.
        assert!(!due(1_000_000, 0, 1_000_000_000, phase));
    }

    #[test]
    fn a_snapshot_from_elsewhere_defers_the_next_then_the_phase_returns() {
        // Installed at 850, just before node 1's point at 900: the next is
        // at least half an interval later, then back on the phase.
        let (every, phase) = (900, phase(0, 900));
        assert!(!due(900, 850, every, phase));
        assert!(!due(1_299, 850, every, phase));
        assert!(due(1_300, 850, every, phase));
        assert!(!due(1_799, 1_300, every, phase));
        assert!(due(1_800, 1_300, every, phase));
    }

    #[test]
    fn tiny_or_huge_intervals_stay_defined() {
        assert_eq!(snapshots(1, phase(1, 1), 3), vec![1, 2, 3]);
        assert_eq!(snapshots(2, phase(2, 2), 6), vec![2, 4, 6]);
        assert!(!due(u64::MAX, u64::MAX - 1, u64::MAX, phase(2, u64::MAX)));
    }
}
