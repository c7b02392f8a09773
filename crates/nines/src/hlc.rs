//! Hybrid logical clock: physical milliseconds plus a logical counter.
//!
//! A leader stamps every write with `now()`. Timestamps are totally ordered
//! (`physical_ms`, then `logical`) and a clock never hands out the same or a
//! smaller timestamp twice, even when the wall clock steps back.
//!
//! Invariants:
//! - `now()` is strictly greater than every timestamp this clock returned
//!   or adopted before.
//! - The clock never adopts a timestamp more than `offset_ms_max` ahead of
//!   this node's physical clock, whether it comes from the replicated log
//!   (`witness`) or from another region (`observe`): one write stamped by a
//!   clock that jumped ahead cannot drag every replica's clock with it. The
//!   refusal is counted and reported; the write itself still applies with
//!   its timestamp (every replica and region must apply it the same way).
//! - `now()` refuses to stamp while the clock runs more than `offset_ms_max`
//!   ahead of the physical clock (the physical clock stepped back, or this
//!   node's own clock had jumped ahead): stamping would carry the wrong time
//!   into every later write. The node steps down as leader meanwhile.
//!
//! Caveats:
//! - The logical counter is 32 bits; when it would overflow, the physical
//!   part advances by one millisecond instead (a clock far ahead of real
//!   time then drifts ahead a little more).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One hybrid-logical-clock timestamp. Field order matters: the derived
/// `Ord` compares `physical_ms` first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub physical_ms: u64,
    /// Orders events that share a millisecond.
    pub logical: u32,
}

impl Hlc {
    /// The smallest timestamp greater than `self`.
    pub fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc { physical_ms: self.physical_ms, logical },
            None => Hlc { physical_ms: self.physical_ms + 1, logical: 0 },
        }
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms, self.logical)
    }
}

/// This clock runs too far ahead of the physical clock to stamp a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this node's hybrid clock is {ahead_ms} ms ahead of its physical clock (maximum offset {offset_ms_max} ms): \
     refusing to stamp writes until the physical clock catches up"
)]
pub struct ClockSkewError {
    pub ahead_ms: u64,
    pub offset_ms_max: u64,
}

/// A remote timestamp too far ahead of the local clock to adopt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote timestamp {remote} is {ahead_ms} ms ahead of the local clock (maximum offset {offset_ms_max} ms)")]
pub struct ClockOffsetError {
    pub remote: Hlc,
    pub ahead_ms: u64,
    pub offset_ms_max: u64,
}

/// The source of physical time, so tests can drive the clock.
pub trait PhysicalClock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct WallClock;

impl PhysicalClock for WallClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is a broken machine; treating it as 0 keeps the
        // HLC monotonic (the logical counter carries on) instead of panicking.
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A hybrid logical clock.
pub struct HlcClock {
    physical: Box<dyn PhysicalClock>,
    /// Largest offset a remote timestamp may be ahead of the local wall clock.
    offset_ms_max: u64,
    /// The last timestamp returned or observed. `std::sync::Mutex` because
    /// it is held for a few instructions and never across an `.await`.
    last: Mutex<Hlc>,
}

impl HlcClock {
    pub fn new(physical: Box<dyn PhysicalClock>, offset_ms_max: u64) -> Self {
        HlcClock { physical, offset_ms_max, last: Mutex::new(Hlc::default()) }
    }

    /// A clock on the system's wall clock.
    pub fn wall(offset_ms_max: u64) -> Self {
        Self::new(Box::new(WallClock), offset_ms_max)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hlc> {
        // A poisoned lock means a panic while holding it; the guarded value is
        // a plain Copy timestamp that is always valid, so carry on with it.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new timestamp, greater than every one before; refused while the
    /// clock runs more than the maximum offset ahead of the physical clock.
    pub fn now(&self) -> Result<Hlc, ClockSkewError> {
        let wall = self.physical.now_ms();
        let mut last = self.lock();
        let ahead_ms = last.physical_ms.saturating_sub(wall);
        if ahead_ms > self.offset_ms_max {
            return Err(ClockSkewError { ahead_ms, offset_ms_max: self.offset_ms_max });
        }
        let next = if wall > last.physical_ms { Hlc { physical_ms: wall, logical: 0 } } else { last.successor() };
        *last = next;
        Ok(next)
    }

    /// The physical clock, in milliseconds.
    pub fn wall_ms(&self) -> u64 {
        self.physical.now_ms()
    }

    /// How far this clock runs ahead of the physical clock, in milliseconds.
    pub fn ahead_ms(&self) -> u64 {
        let wall = self.physical.now_ms();
        self.lock().physical_ms.saturating_sub(wall)
    }

    /// The largest offset a timestamp may be ahead of the physical clock.
    pub fn offset_ms_max(&self) -> u64 {
        self.offset_ms_max
    }

    /// Advances the clock past a timestamp seen in the replicated log, unless
    /// it is further ahead of the physical clock than the maximum offset
    /// (then the clock stays, the entry still applies, and this returns the
    /// refusal for the caller to count).
    pub fn witness(&self, seen: Hlc) -> Result<(), ClockOffsetError> {
        let wall = self.physical.now_ms();
        let ahead_ms = seen.physical_ms.saturating_sub(wall);
        if ahead_ms > self.offset_ms_max {
            return Err(ClockOffsetError { remote: seen, ahead_ms, offset_ms_max: self.offset_ms_max });
        }
        let mut last = self.lock();
        if seen > *last {
            *last = seen;
        }
        Ok(())
    }

    /// Advances the clock past a remote timestamp, unless it is further ahead
    /// of the local wall clock than the maximum offset.
    pub fn observe(&self, remote: Hlc) -> Result<(), ClockOffsetError> {
        self.witness(remote)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct Manual(Arc<AtomicU64>);
    impl PhysicalClock for Manual {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn clock(start: u64, offset: u64) -> (HlcClock, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(start));
        (HlcClock::new(Box::new(Manual(t.clone())), offset), t)
    }

    #[test]
    fn now_is_strictly_increasing_even_when_the_wall_clock_steps_back() {
        // Each step: set the wall clock, take a timestamp, expect this value.
        let table: &[(u64, Hlc)] = &[
            (100, Hlc { physical_ms: 100, logical: 0 }),
            (100, Hlc { physical_ms: 100, logical: 1 }),
            (90, Hlc { physical_ms: 100, logical: 2 }),
            (101, Hlc { physical_ms: 101, logical: 0 }),
            (50, Hlc { physical_ms: 101, logical: 1 }),
        ];
        let (c, t) = clock(0, 1000);
        for (wall, want) in table {
            t.store(*wall, Ordering::SeqCst);
            assert_eq!(c.now().unwrap(), *want, "wall {wall}");
        }
    }

    #[test]
    fn observe_within_offset_advances_the_clock() {
        let (c, _) = clock(1000, 500);
        let remote = Hlc { physical_ms: 1400, logical: 7 };
        c.observe(remote).expect("within offset");
        assert_eq!(c.now().unwrap(), Hlc { physical_ms: 1400, logical: 8 });
    }

    #[test]
    fn observe_beyond_offset_is_refused_and_leaves_the_clock_alone() {
        let (c, _) = clock(1000, 500);
        let remote = Hlc { physical_ms: 1501, logical: 0 };
        let err = c.observe(remote).expect_err("beyond offset");
        assert_eq!(err.ahead_ms, 501);
        assert_eq!(c.now().unwrap(), Hlc { physical_ms: 1000, logical: 0 });
    }

    #[test]
    fn a_clock_that_jumped_ahead_and_back_refuses_to_stamp_until_time_catches_up() {
        // The physical clock jumps 10 minutes ahead for one stamp, then back.
        let (c, t) = clock(1_000_000, 500);
        t.store(1_600_000, Ordering::SeqCst);
        let future = c.now().expect("the jump itself cannot be seen locally");
        t.store(1_000_100, Ordering::SeqCst);
        let e = c.now().expect_err("ahead by ten minutes");
        assert_eq!(e.ahead_ms, 599_900);
        assert_eq!(c.ahead_ms(), 599_900);
        // A replica that applies the future write does not adopt its time.
        let (replica, _) = clock(1_000_100, 500);
        assert!(replica.witness(future).is_err());
        assert_eq!(replica.now().unwrap(), Hlc { physical_ms: 1_000_100, logical: 0 });
        // Once physical time passes it, the jumped clock stamps again, above it.
        t.store(1_600_001, Ordering::SeqCst);
        assert!(c.now().unwrap() > future);
    }

    #[test]
    fn successor_carries_logical_overflow_into_physical() {
        let h = Hlc { physical_ms: 5, logical: u32::MAX };
        assert_eq!(h.successor(), Hlc { physical_ms: 6, logical: 0 });
        assert!(h.successor() > h);
    }
}
