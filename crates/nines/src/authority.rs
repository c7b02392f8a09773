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

use crate::rpc::{Client, ClientConfig, Consistency, Expect, Version};
use serde::{Deserialize, Serialize};

/// The key of the primary's lease.
pub const PRIMARY_KEY: &str = "nines/primary";

/// The name under which a test's fault hooks cut a node off from the
/// authority (`blocked_regions = ["authority"]`).
pub const AUTHORITY_FAULT: &str = "authority";

/// The name under which a test's fault hooks cut a region off from the
/// failover controller's probes (`blocked_regions = ["controller"]`).
pub const CONTROLLER_FAULT: &str = "controller";

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

/// What a region that wants to become primary at `epoch` or later may do,
/// given the primary's record as read (`None`: nothing yet) at `now_ms` on
/// its wall clock, with clocks at most `offset_ms` apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Write a record naming this region at this epoch, with a
    /// compare-and-swap on the version read. Always above the record's
    /// epoch, so an epoch is issued once.
    Take(u64),
    /// The record already names this region at this epoch, at or above the
    /// one asked for (a repeated promotion whose first reply was lost).
    Ours(u64),
    /// The holder's lease may still hold until `until_ms`: wait, read again.
    WaitUntil { until_ms: u64 },
}

/// Decides a claim (see [`Claim`]): nobody takes the record from a holder
/// before its lease plus the clock offset has run out.
pub fn judge(current: Option<&Lease>, region: &str, epoch: u64, now_ms: u64, offset_ms: u64) -> Claim {
    let Some(l) = current else { return Claim::Take(epoch) };
    if l.holder == region && l.epoch >= epoch {
        return Claim::Ours(l.epoch);
    }
    if !l.expired_at(now_ms, offset_ms) {
        return Claim::WaitUntil { until_ms: l.renewed_ms + l.lease_ms + offset_ms + 1 };
    }
    Claim::Take(epoch.max(l.epoch.saturating_add(1)))
}

/// Why a region could not become primary.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{holder} is the primary at epoch {epoch} (allocated by the authority: another failover won)")]
    Lost { holder: String, epoch: u64 },
    #[error(
        "{holder} is the primary at epoch {epoch} and still renews its lease after {waited:?}: it is alive and \
         reaches the authority; switch over with `nines region promote`, or stop it first"
    )]
    Renewed { holder: String, epoch: u64, waited: Duration },
    #[error("the authority's epoch {0} is at EPOCH_MAX; no region can be promoted")]
    Exhausted(u64),
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

impl Authority {
    /// Makes `region` the primary at `epoch` or the first epoch above the
    /// authority's, once: waits (at most `patience`; two leases plus the
    /// offset let a holder that is gone run out for sure) for the current
    /// holder's lease to run out, then takes the record with a
    /// compare-and-swap. A claim that loses the swap to another region's
    /// has lost the failover. Returns the epoch and when the lease was
    /// stamped, so the new primary's own lease counts from then.
    pub async fn claim_primary(
        &self,
        region: &str,
        epoch: u64,
        lease: Duration,
        offset: Duration,
        patience: Duration,
    ) -> Result<(u64, Instant), ClaimError> {
        let started = Instant::now();
        let mut raced: Option<u64> = None;
        loop {
            let current = self.read(PRIMARY_KEY).await?;
            if let (Some(tried), Some(h)) = (raced, &current)
                && h.lease.holder != region
                && h.lease.epoch >= tried
            {
                return Err(ClaimError::Lost { holder: h.lease.holder.clone(), epoch: h.lease.epoch });
            }
            let sent = Instant::now();
            let stamp = wall_ms();
            match judge(current.as_ref().map(|h| &h.lease), region, epoch, stamp, offset.as_millis() as u64) {
                Claim::Take(e) if e > crate::limits::EPOCH_MAX => return Err(ClaimError::Exhausted(e - 1)),
                // Ours: stamped again all the same, so the lease the caller
                // counts from now is the one everyone else reads.
                Claim::Take(e) | Claim::Ours(e) => {
                    let wanted = Lease {
                        holder: region.to_string(),
                        epoch: e,
                        renewed_ms: stamp,
                        lease_ms: lease.as_millis() as u64,
                    };
                    if self.swap(PRIMARY_KEY, current.as_ref(), &wanted).await? {
                        return Ok((e, sent));
                    }
                    raced = Some(e);
                }
                Claim::WaitUntil { until_ms } => {
                    let left = patience.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        // Only a record makes a claim wait.
                        let (holder, epoch) = current.map(|h| (h.lease.holder, h.lease.epoch)).unwrap_or_default();
                        return Err(ClaimError::Renewed { holder, epoch, waited: started.elapsed() });
                    }
                    tokio::time::sleep(Duration::from_millis(until_ms.saturating_sub(stamp)).min(left)).await;
                }
            }
        }
    }

    /// Gives up `region`'s lease at `epoch` (a fenced primary takes no
    /// writes, so a switchover need not wait out its lease): stamps it with
    /// length zero, if the record still names it. The caller has already
    /// stopped counting the lease as held.
    pub async fn release_primary(&self, region: &str, epoch: u64) -> Result<(), AuthorityError> {
        let Some(current) = self.read(PRIMARY_KEY).await? else { return Ok(()) };
        if current.lease.holder != region || current.lease.epoch != epoch || current.lease.lease_ms == 0 {
            return Ok(());
        }
        let released = Lease { renewed_ms: wall_ms(), lease_ms: 0, ..current.lease.clone() };
        // A lost race means the record changed: nothing of ours to release.
        self.swap(PRIMARY_KEY, Some(&current), &released).await?;
        Ok(())
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

    /// How long the lease still holds (zero when it does not).
    pub fn left(&self) -> Duration {
        self.lock().map_or(Duration::ZERO, |(until, _)| until.saturating_duration_since(Instant::now()))
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
    fn claims_wait_out_the_lease_and_only_ever_raise_the_epoch() {
        let held =
            |holder: &str, epoch, renewed_ms, lease_ms| Lease { holder: holder.into(), epoch, renewed_ms, lease_ms };
        let a0 = held("a", 0, 10_000, 3_000);
        // (record, region, epoch asked, now, verdict)
        let table = [
            (None, "b", 1, 0, Claim::Take(1)),
            (Some(a0.clone()), "b", 1, 12_000, Claim::WaitUntil { until_ms: 13_501 }),
            (Some(a0.clone()), "b", 1, 13_500, Claim::WaitUntil { until_ms: 13_501 }),
            (Some(a0.clone()), "b", 1, 13_501, Claim::Take(1)),
            (Some(a0.clone()), "b", 4, 13_501, Claim::Take(4)),
            // A released lease (a fenced primary) ends after the offset.
            (Some(held("a", 0, 10_000, 0)), "b", 1, 10_400, Claim::WaitUntil { until_ms: 10_501 }),
            (Some(held("a", 0, 10_000, 0)), "b", 1, 10_501, Claim::Take(1)),
            (Some(held("b", 1, 20_000, 3_000)), "b", 1, 20_001, Claim::Ours(1)),
            (Some(held("b", 2, 20_000, 3_000)), "b", 1, 20_001, Claim::Ours(2)),
            // A holder at the asked epoch, alive: wait; gone: the next epoch.
            (Some(held("b", 1, 20_000, 3_000)), "c", 1, 20_001, Claim::WaitUntil { until_ms: 23_501 }),
            (Some(held("b", 1, 20_000, 3_000)), "c", 1, 99_000, Claim::Take(2)),
            (Some(held("c", 3, 20_000, 3_000)), "b", 2, 99_000, Claim::Take(4)),
        ];
        for (record, region, epoch, now, want) in table {
            assert_eq!(judge(record.as_ref(), region, epoch, now, 500), want, "{record:?} {region}@{epoch} at {now}");
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
