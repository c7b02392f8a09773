//! What a node does about its hybrid clock running ahead of its physical
//! clock: the decision, as a pure function, and the one fact it needs from
//! the network (when a leader was last heard from). The node's clock watch
//! (`Node::spawn_clock_watch`) applies it.
//!
//! Invariants:
//! - A node whose clock runs beyond the maximum offset never stamps a write
//!   (the clock refuses); the stance only decides who leads meanwhile.
//! - It steps down while another node that can lead is alive, and stands
//!   (leads, replicates, serves reads, still stamps nothing) when none took
//!   over within `STEP_DOWN_MAX`; a standing leader tries handing over again
//!   every `STANDING_MAX`, and steps down at once when another leader shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stance {
    /// The clock is within the maximum offset: lead, campaign, propose.
    Normal,
    /// Too far ahead: stand for no election; as leader send no heartbeats
    /// and propose nothing, so a node whose clock can stamp takes over.
    SteppingDown,
    /// Too far ahead, but no other node took over within `STEP_DOWN_MAX`
    /// (every node's clock is ahead, or the region has one node): lead and
    /// campaign again, so the region still replicates and serves reads.
    /// Client writes stay refused: nothing can be stamped.
    Standing,
}

/// How long a node steps down with no other live leader before it stands
/// again: several elections (each under half a second by default).
pub const STEP_DOWN_MAX: Duration = Duration::from_secs(3);

/// How long a standing leader leads before it tries handing over again: a
/// node with a sane clock may have come back meanwhile.
pub const STANDING_MAX: Duration = Duration::from_secs(30);

/// What the decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct StanceInputs {
    /// The hybrid clock runs beyond the maximum offset.
    pub skewed: bool,
    /// This node leads its region.
    pub leading: bool,
    /// Another node leads and was heard from lately.
    pub other_leader_alive: bool,
    /// How long, stepping down, no other live leader was heard.
    pub alone_for: Duration,
    /// How long this node has stood.
    pub standing_for: Duration,
}

/// The next stance. Pure; see the module doc.
pub fn next_stance(current: Stance, i: &StanceInputs) -> Stance {
    use Stance::*;
    match current {
        _ if !i.skewed => Normal,
        Normal => SteppingDown,
        SteppingDown if !i.other_leader_alive && i.alone_for >= STEP_DOWN_MAX => Standing,
        SteppingDown => SteppingDown,
        Standing if i.other_leader_alive => SteppingDown,
        Standing if i.leading && i.standing_for >= STANDING_MAX => SteppingDown,
        Standing => Standing,
    }
}

/// When a leader's append-entries message (heartbeats included) last
/// reached this node: the Raft service records it, the clock watch reads it.
#[derive(Debug)]
pub struct LeaderContact {
    start: Instant,
    /// Milliseconds after `start` of the last contact; `u64::MAX`: never.
    last_ms: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact { start: Instant::now(), last_ms: AtomicU64::new(u64::MAX) }
    }
}

impl LeaderContact {
    pub fn record(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether this node has run at least `within` without hearing a
    /// leader in that time.
    pub fn silent_for(&self, within: Duration) -> bool {
        self.start.elapsed() >= within && !self.heard_within(within)
    }

    /// Whether a leader was heard from within `within`.
    pub fn heard_within(&self, within: Duration) -> bool {
        match self.last_ms.load(Ordering::Relaxed) {
            u64::MAX => false,
            last => self.start.elapsed().as_millis() as u64 <= last + within.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_clock_runs_ahead_steps_down_stands_when_alone_and_hands_over_again() {
        use Stance::*;
        let short = Duration::from_millis(100);
        let at = |skewed, leading, other_leader_alive, alone_for, standing_for| StanceInputs {
            skewed,
            leading,
            other_leader_alive,
            alone_for,
            standing_for,
        };
        // (stance, inputs, next)
        let table = [
            (Normal, at(false, true, false, short, short), Normal),
            (Normal, at(true, true, false, short, short), SteppingDown),
            (SteppingDown, at(true, false, true, STEP_DOWN_MAX, short), SteppingDown),
            (SteppingDown, at(true, false, false, short, short), SteppingDown),
            (SteppingDown, at(true, false, false, STEP_DOWN_MAX, short), Standing),
            (SteppingDown, at(false, false, false, short, short), Normal),
            (Standing, at(true, false, true, short, short), SteppingDown),
            (Standing, at(true, true, false, short, short), Standing),
            (Standing, at(true, true, false, short, STANDING_MAX), SteppingDown),
            (Standing, at(true, false, false, short, STANDING_MAX), Standing),
            (Standing, at(false, true, false, short, short), Normal),
        ];
        for (now, inputs, want) in table {
            assert_eq!(next_stance(now, &inputs), want, "{now:?} with {inputs:?}");
        }
    }

    #[test]
    fn contact_is_fresh_only_after_it_was_recorded() {
        let c = LeaderContact::default();
        assert!(!c.heard_within(Duration::from_secs(3600)), "never heard");
        c.record();
        assert!(c.heard_within(Duration::from_secs(1)));
    }
}
