//! Fault hooks for tests: drop replication traffic to and from chosen
//! regions, and offset this node's physical clock.
//!
//! Invariants:
//! - The hooks exist in every build but act only when the node was started
//!   with `fault_injection = true`. Otherwise every request to set a fault
//!   is refused and the hooks stay neutral (nothing blocked, offset 0).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::Error;
use crate::hlc::{PhysicalClock, WallClock};

/// Largest clock offset a test may set: a day, far beyond any sane
/// `clock_offset_max`, and small enough that adding it cannot overflow.
pub const CLOCK_OFFSET_MS_MAX: i64 = 24 * 60 * 60 * 1000;

pub struct Faults {
    enabled: bool,
    /// `std::sync::RwLock`: read on every shipment, never held across `.await`.
    blocked: RwLock<BTreeSet<String>>,
    clock_offset_ms: Arc<AtomicI64>,
}

impl Faults {
    pub fn new(enabled: bool) -> Self {
        Faults { enabled, blocked: RwLock::new(BTreeSet::new()), clock_offset_ms: Arc::new(AtomicI64::new(0)) }
    }

    /// The physical clock this node's HLC reads: the wall clock plus the
    /// test offset (always 0 unless enabled).
    pub fn clock(&self) -> OffsetClock {
        OffsetClock { offset_ms: self.clock_offset_ms.clone() }
    }

    /// Whether replication traffic with `region` is dropped.
    pub fn region_blocked(&self, region: &str) -> bool {
        self.enabled && self.blocked.read().unwrap_or_else(|p| p.into_inner()).contains(region)
    }

    /// Replaces the active faults.
    pub fn set(&self, blocked_regions: Vec<String>, clock_offset_ms: i64) -> Result<(), Error> {
        if !self.enabled {
            return Err(Error::FailedPrecondition(
                "fault injection is disabled on this node; it is a test-only setting (fault_injection = true)".into(),
            ));
        }
        if clock_offset_ms.abs() > CLOCK_OFFSET_MS_MAX {
            return Err(Error::invalid(format!(
                "clock_offset_ms {clock_offset_ms} is beyond CLOCK_OFFSET_MS_MAX {CLOCK_OFFSET_MS_MAX}"
            )));
        }
        tracing::warn!(?blocked_regions, clock_offset_ms, "fault injection: faults set");
        *self.blocked.write().unwrap_or_else(|p| p.into_inner()) = blocked_regions.into_iter().collect();
        self.clock_offset_ms.store(clock_offset_ms, Ordering::SeqCst);
        Ok(())
    }
}

/// The wall clock shifted by a test offset.
pub struct OffsetClock {
    offset_ms: Arc<AtomicI64>,
}

impl PhysicalClock for OffsetClock {
    fn now_ms(&self) -> u64 {
        let wall = WallClock.now_ms() as i64;
        (wall + self.offset_ms.load(Ordering::SeqCst)).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_refused_unless_enabled() {
        let off = Faults::new(false);
        assert!(off.set(vec!["eu".into()], 1000).is_err());
        assert!(!off.region_blocked("eu"));
        let on = Faults::new(true);
        on.set(vec!["eu".into()], 5_000).unwrap();
        assert!(on.region_blocked("eu"));
        assert!(on.clock().now_ms() >= WallClock.now_ms() + 4_000);
        assert!(on.set(vec![], CLOCK_OFFSET_MS_MAX + 1).is_err());
    }
}
