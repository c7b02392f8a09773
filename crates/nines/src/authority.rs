//! The authority: a small nines region of its own (three nodes: one in each
//! of two regions and a witness, so it survives losing any one region or
//! any one node) whose linearizable keys say which region is primary, at
//! which epoch, under which lease, and which failover controller decides.
//! It is the Patroni pattern with a nines region as the consensus store.
//!
//! Records (JSON, readable with `nines get --endpoints <authority>`):
//! - `nines/primary`: the primary region, its epoch, when its lease was last
//!   renewed and for how long. The primary's leader renews it every third of
//!   the lease with a compare-and-swap; a promotion replaces it with a
//!   compare-and-swap on the version it read, so an epoch is allocated once,
//!   whoever asks (controller or operator), and two concurrent promotions
//!   cannot both win.
//! - `nines/controller`: which controller process decides, under the same
//!   kind of lease.
//!
//! Invariants:
//! - A holder counts its lease from when it *sent* the renewal, on its own
//!   monotonic clock, so it always stops before anyone else may take over.
//! - Anyone else counts it from the renewal's wall-clock stamp plus the lease
//!   plus the maximum clock offset between nodes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nines_client::{Client, ClientConfig, Consistency, Expect, Version};
use serde::{Deserialize, Serialize};

/// The key of the primary's lease.
pub const PRIMARY_KEY: &str = "nines/primary";

/// The key of the deciding controller's lease.
pub const CONTROLLER_KEY: &str = "nines/controller";

/// A lease held in the authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The region (primary) or controller id that holds it.
    pub holder: String,
    /// The primary's epoch (0 for a controller's lease).
    pub epoch: u64,
    /// The holder's wall clock when it last renewed, in milliseconds.
    pub renewed_ms: u64,
    /// How long a renewal holds, in milliseconds.
    pub lease_ms: u64,
}

impl Lease {
    /// Whether the lease has surely run out at `now_ms` (someone else's wall
    /// clock), allowing for clocks `offset_ms` apart.
    pub fn expired_at(&self, now_ms: u64, offset_ms: u64) -> bool {
        now_ms > self.renewed_ms.saturating_add(self.lease_ms).saturating_add(offset_ms)
    }
}

/// A lease as read, with the version a compare-and-swap names.
#[derive(Debug, Clone)]
pub struct Held {
    pub lease: Lease,
    pub version: Version,
}

/// Why the authority could not answer or refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("the authority did not answer: {0}")]
    Unreachable(String),
    #[error("the authority's record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A client of the authority region.
#[derive(Clone)]
pub struct Authority {
    client: std::sync::Arc<Client>,
}

impl Authority {
    /// A client of the authority at `endpoints`; every call gives up after
    /// `timeout` (a lease keeper must know in time that it could not renew).
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Result<Self, AuthorityError> {
        let config = ClientConfig {
            attempt_timeout: timeout,
            request_deadline: timeout,
            attempts_max: 5,
            connect_timeout: timeout.min(Duration::from_millis(500)),
            ..ClientConfig::default()
        };
        let client = Client::new(endpoints, config).map_err(|e| AuthorityError::Unreachable(e.to_string()))?;
        Ok(Authority { client: std::sync::Arc::new(client) })
    }

    /// The lease under `key`, read linearizably; `None` if there is none yet.
    pub async fn read(&self, key: &str) -> Result<Option<Held>, AuthorityError> {
        let got = self
            .client
            .get(key.to_string(), Consistency::Linearizable)
            .await
            .map_err(|e| AuthorityError::Unreachable(e.to_string()))?;
        let Some(kv) = got.kv else { return Ok(None) };
        let lease: Lease = serde_json::from_slice(&kv.value)
            .map_err(|e| AuthorityError::Corrupt { key: key.to_string(), reason: e.to_string() })?;
        let version =
            kv.version.ok_or_else(|| AuthorityError::Corrupt { key: key.to_string(), reason: "no version".into() })?;
        Ok(Some(Held { lease, version }))
    }

    /// Writes `lease` under `key` if the key still holds what was read
    /// (`None`: nothing yet). `Ok(false)`: someone changed it first; read
    /// again. An unknown outcome is an error: read again before deciding.
    pub async fn swap(&self, key: &str, expected: Option<&Held>, lease: &Lease) -> Result<bool, AuthorityError> {
        let value = serde_json::to_vec(lease)
            .map_err(|e| AuthorityError::Corrupt { key: key.to_string(), reason: e.to_string() })?;
        let expect = match expected {
            Some(h) => Expect::Write(h.version.clone()),
            None => Expect::Absent,
        };
        let r = self
            .client
            .compare_and_swap(key.to_string(), value, expect)
            .await
            .map_err(|e| AuthorityError::Unreachable(e.to_string()))?;
        Ok(r.succeeded)
    }
}

/// The wall clock in milliseconds.
pub fn wall_ms() -> u64 {
    use crate::hlc::PhysicalClock;
    crate::hlc::WallClock.now_ms()
}

/// The lease this node holds as leader of the primary region.
#[derive(Debug, Default)]
pub struct PrimaryLease {
    /// Until when the lease holds, and the epoch it was granted for.
    held: Mutex<Option<(Instant, u64)>>,
}

impl PrimaryLease {
    /// Whether the lease holds now for `epoch`.
    pub fn holds(&self, epoch: u64) -> bool {
        matches!(*self.lock(), Some((until, e)) if e == epoch && Instant::now() < until)
    }

    /// How long ago the lease ran out (zero while it holds or never held).
    pub fn expired_for(&self) -> Duration {
        self.lock().map_or(Duration::ZERO, |(until, _)| Instant::now().saturating_duration_since(until))
    }

    /// A renewal sent at `sent` succeeded: the lease holds `lease` after it.
    pub fn grant(&self, sent: Instant, lease: Duration, epoch: u64) {
        *self.lock() = Some((sent + lease, epoch));
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, u64)>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_only_after_its_length_and_the_clock_offset() {
        let l = Lease { holder: "a".into(), epoch: 1, renewed_ms: 1_000, lease_ms: 3_000 };
        // (someone's now, offset, expired)
        for (now, offset, want) in [(3_999, 500, false), (4_500, 500, false), (4_501, 500, true), (4_001, 0, true)] {
            assert_eq!(l.expired_at(now, offset), want, "now {now}, offset {offset}");
        }
    }

    #[test]
    fn a_lease_holds_from_its_renewal_for_its_epoch_only() {
        let l = PrimaryLease::default();
        assert!(!l.holds(0), "no lease before the first renewal");
        l.grant(Instant::now(), Duration::from_secs(60), 3);
        assert!(l.holds(3));
        assert!(!l.holds(4), "a lease is for one epoch");
        l.clear();
        assert!(!l.holds(3));
        l.grant(Instant::now() - Duration::from_secs(5), Duration::from_secs(1), 3);
        assert!(!l.holds(3), "counted from when the renewal was sent");
        assert!(l.expired_for() >= Duration::from_secs(3));
    }
}
