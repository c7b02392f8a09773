//! Fault hooks for tests: drop replication traffic to and from chosen
//! regions (or only to them), reorder this node's shipments to peer
//! regions, drop or delay this node's traffic to chosen peers of its
//! region, and offset this node's physical clock.
//!
//! Invariants:
//! - The hooks exist in every build but act only when the node was started
//!   with `fault_injection = true`. Otherwise every request to set a fault
//!   is refused and the hooks stay neutral (nothing blocked, offset 0, no
//!   jitter).
//! - A link rule acts on what this node *sends* to a peer (Raft RPCs and
//!   forwarded client requests). A one-way cut is one rule; a two-way cut is
//!   a rule on each side. Answers to the peer's own requests still flow, as
//!   they ride on the peer's connection.
//! - Each `set` replaces every fault, after checking all of them: a refused
//!   request changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::Error;
use crate::hlc::{PhysicalClock, WallClock};

/// Largest clock offset a test may set: a day, far beyond any sane
/// `clock_offset_max`, and small enough that adding it cannot overflow.
pub const CLOCK_OFFSET_MS_MAX: i64 = 24 * 60 * 60 * 1000;

/// Longest delay a link rule may add: a minute, far beyond any election
/// timeout, so a test can stall a link without a rule that never ends.
pub const LINK_DELAY_MS_MAX: u32 = 60_000;

/// Longest extra wait the ship jitter may add to one shipment: ten
/// seconds, far beyond any cross-region latency, so a test can reorder
/// shipments as much as it likes without one that never leaves.
pub const SHIP_JITTER_MS_MAX: u64 = 10_000;

/// The most a fault may hold each sync of the Raft log back (ms): a stall
/// several elections long (a leader's followers replace it after 0.5-0.7 s)
/// and as long as a write's timeout (10 s), past which every write fails.
pub const LOG_SYNC_DELAY_MS_MAX: u64 = 10_000;

/// Most link rules at once: one per peer of a region is all a test needs,
/// and a region has at most `INIT_MEMBERS_MAX` voters plus learners.
pub const LINK_RULES_MAX: usize = 64;

/// Every fault of a node at once; `Faults::set` replaces them all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSet {
    /// Regions whose replication traffic to and from this node is dropped;
    /// `authority` (`crate::authority::AUTHORITY_FAULT`) cuts this node's
    /// lease renewals off from the authority, and `controller`
    /// (`crate::authority::CONTROLLER_FAULT`) the failover controller's
    /// probes off from this node.
    pub blocked_regions: Vec<String>,
    /// Regions this node does not ship to; their shipments still arrive.
    pub send_blocked_regions: Vec<String>,
    pub clock_offset_ms: i64,
    /// (peer node id, rule) pairs.
    pub links: Vec<(u64, LinkRule)>,
    /// Each shipment to a peer region waits a random extra time up to this
    /// before it leaves, so shipments in flight together arrive out of order.
    pub ship_jitter: Duration,
    /// Each sync of the Raft log waits this long first (a slow disk).
    pub log_sync_delay: Duration,
}

/// What happens to traffic from this node to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRule {
    /// Every message is dropped: each RPC to the peer times out.
    Drop,
    /// Every message waits this long before it is sent.
    Delay(Duration),
}

pub struct Faults {
    enabled: bool,
    /// The planted bug (`planted_bug_local_reads`): a leader serves
    /// linearizable reads from its own state without confirming with a
    /// quorum that it still leads. Only ever true with `enabled`.
    local_reads: bool,
    /// `std::sync::RwLock`: read on every shipment, never held across `.await`.
    blocked: RwLock<BTreeSet<String>>,
    /// Regions this node does not ship to. Same lock discipline as `blocked`.
    send_blocked: RwLock<BTreeSet<String>>,
    /// Peer node id -> rule. Same lock discipline as `blocked`.
    links: RwLock<BTreeMap<u64, LinkRule>>,
    clock_offset_ms: Arc<AtomicI64>,
    ship_jitter_ms: AtomicU64,
    /// Read by the log's writer before each sync.
    log_sync_delay_ms: Arc<AtomicU64>,
}

impl Faults {
    /// `local_reads` plants the stale-read bug; it needs `enabled`.
    pub fn new(enabled: bool, local_reads: bool) -> Self {
        Faults {
            enabled,
            local_reads: enabled && local_reads,
            blocked: RwLock::new(BTreeSet::new()),
            send_blocked: RwLock::new(BTreeSet::new()),
            links: RwLock::new(BTreeMap::new()),
            clock_offset_ms: Arc::new(AtomicI64::new(0)),
            ship_jitter_ms: AtomicU64::new(0),
            log_sync_delay_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How long each sync of the Raft log waits first, in milliseconds
    /// (always 0 unless enabled): the log's writer reads it.
    pub fn log_sync_delay_ms(&self) -> Arc<AtomicU64> {
        self.log_sync_delay_ms.clone()
    }

    /// Whether the planted stale-read bug is on: a linearizable read on a
    /// node that believes it leads skips the quorum check (ReadIndex).
    pub fn serves_reads_locally(&self) -> bool {
        self.local_reads
    }

    /// The rule for traffic from this node to node `to`, if any.
    pub fn link(&self, to: u64) -> Option<LinkRule> {
        if !self.enabled {
            return None;
        }
        self.links.read().unwrap_or_else(|p| p.into_inner()).get(&to).copied()
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

    /// Whether this node's shipments to `region` are dropped: traffic with
    /// it is blocked both ways, or just this way.
    pub fn sends_blocked(&self, region: &str) -> bool {
        self.region_blocked(region)
            || (self.enabled && self.send_blocked.read().unwrap_or_else(|p| p.into_inner()).contains(region))
    }

    /// The extra wait for one shipment to a peer region: random, up to the
    /// set jitter (zero unless one is set).
    pub fn ship_jitter(&self) -> Duration {
        match self.ship_jitter_ms.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            max => Duration::from_millis(rand::random_range(0..=max)),
        }
    }

    /// Replaces the active faults.
    pub fn set(&self, faults: FaultSet) -> Result<(), Error> {
        let FaultSet { blocked_regions, send_blocked_regions, clock_offset_ms, links, ship_jitter, log_sync_delay } =
            faults;
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
        if links.len() > LINK_RULES_MAX {
            return Err(Error::invalid(format!(
                "{} link rules; limit LINK_RULES_MAX is {LINK_RULES_MAX}",
                links.len()
            )));
        }
        for (to, rule) in &links {
            if let LinkRule::Delay(d) = rule
                && d.as_millis() > u128::from(LINK_DELAY_MS_MAX)
            {
                return Err(Error::invalid(format!(
                    "link delay to node {to} of {d:?} is beyond LINK_DELAY_MS_MAX {LINK_DELAY_MS_MAX} ms"
                )));
            }
        }
        if ship_jitter.as_millis() > u128::from(SHIP_JITTER_MS_MAX) {
            return Err(Error::invalid(format!(
                "ship jitter of {ship_jitter:?} is beyond SHIP_JITTER_MS_MAX {SHIP_JITTER_MS_MAX} ms"
            )));
        }
        if log_sync_delay.as_millis() > u128::from(LOG_SYNC_DELAY_MS_MAX) {
            return Err(Error::invalid(format!(
                "log sync delay of {log_sync_delay:?} is beyond LOG_SYNC_DELAY_MS_MAX {LOG_SYNC_DELAY_MS_MAX} ms"
            )));
        }
        tracing::warn!(
            ?blocked_regions,
            ?send_blocked_regions,
            clock_offset_ms,
            ?links,
            ?ship_jitter,
            ?log_sync_delay,
            "fault injection: faults set"
        );
        *self.blocked.write().unwrap_or_else(|p| p.into_inner()) = blocked_regions.into_iter().collect();
        *self.send_blocked.write().unwrap_or_else(|p| p.into_inner()) = send_blocked_regions.into_iter().collect();
        *self.links.write().unwrap_or_else(|p| p.into_inner()) = links.into_iter().collect();
        self.clock_offset_ms.store(clock_offset_ms, Ordering::SeqCst);
        self.ship_jitter_ms.store(ship_jitter.as_millis() as u64, Ordering::SeqCst);
        self.log_sync_delay_ms.store(log_sync_delay.as_millis() as u64, Ordering::SeqCst);
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
        let off = Faults::new(false, true);
        assert!(!off.serves_reads_locally());
        let faults = FaultSet {
            blocked_regions: vec!["eu".into()],
            send_blocked_regions: vec!["ap".into()],
            clock_offset_ms: 5_000,
            links: vec![(2, LinkRule::Drop), (3, LinkRule::Delay(Duration::from_millis(50)))],
            ship_jitter: Duration::from_millis(30),
            log_sync_delay: Duration::from_millis(40),
        };
        assert!(off.set(faults.clone()).is_err());
        assert_eq!(off.log_sync_delay_ms().load(Ordering::SeqCst), 0);
        assert!(!off.region_blocked("eu"));
        assert!(!off.sends_blocked("ap"));
        assert_eq!(off.link(2), None);
        assert_eq!(off.ship_jitter(), Duration::ZERO);
        let on = Faults::new(true, false);
        assert!(!on.serves_reads_locally());
        on.set(faults).unwrap();
        assert!(on.region_blocked("eu"));
        assert!(on.sends_blocked("eu"), "a two-way block blocks sending too");
        assert!(on.sends_blocked("ap"));
        assert!(!on.region_blocked("ap"), "a one-way block lets the region's shipments in");
        assert_eq!(on.link(2), Some(LinkRule::Drop));
        assert_eq!(on.link(3), Some(LinkRule::Delay(Duration::from_millis(50))));
        assert_eq!(on.link(4), None);
        assert!((0..200).all(|_| on.ship_jitter() <= Duration::from_millis(30)));
        assert!((0..200).any(|_| on.ship_jitter() > Duration::ZERO), "the jitter varies");
        assert!(on.clock().now_ms() >= WallClock.now_ms() + 4_000);
        assert_eq!(on.log_sync_delay_ms().load(Ordering::SeqCst), 40);
        assert!(on.set(FaultSet { clock_offset_ms: CLOCK_OFFSET_MS_MAX + 1, ..FaultSet::default() }).is_err());
        let too_long = Duration::from_millis(u64::from(LINK_DELAY_MS_MAX) + 1);
        assert!(on.set(FaultSet { links: vec![(2, LinkRule::Delay(too_long))], ..FaultSet::default() }).is_err());
        // A refused set changes nothing; a later set replaces everything.
        assert_eq!(on.link(2), Some(LinkRule::Drop));
        on.set(FaultSet::default()).unwrap();
        assert_eq!(on.link(2), None);
        assert!(!on.region_blocked("eu"));
        assert!(!on.sends_blocked("ap"));
        assert_eq!(on.ship_jitter(), Duration::ZERO);
        let too_much = Duration::from_millis(SHIP_JITTER_MS_MAX + 1);
        assert!(on.set(FaultSet { ship_jitter: too_much, ..FaultSet::default() }).is_err());
        assert_eq!(on.log_sync_delay_ms().load(Ordering::SeqCst), 0);
        let too_slow = Duration::from_millis(LOG_SYNC_DELAY_MS_MAX + 1);
        assert!(on.set(FaultSet { log_sync_delay: too_slow, ..FaultSet::default() }).is_err());
    }
}
