//! The primary's lease, kept by the leader of the primary region (active-
//! passive clusters with an [`authority`]).
//!
//! Invariants:
//! - The primary acknowledges a write only while it holds a lease: checked
//!   before the write is proposed (refused, retry-safe, naming the lease)
//!   and again before it is acknowledged (outcome unknown if the lease ran
//!   out meanwhile). So no write is acknowledged by a primary whose lease
//!   ran out, and a primary cut off from the authority stops within one
//!   lease.
//! - A lease is counted from when the renewal was sent, on this node's
//!   monotonic clock; the authority lets another region be promoted only
//!   after the renewal's wall-clock stamp plus the lease plus the maximum
//!   clock offset. The two never overlap while clocks stay within the
//!   offset.
//! - A node starts without a lease, and so does a new leader: a region that
//!   restarts as primary takes no write until it has confirmed its epoch
//!   with the authority.
//!
//! Caveats:
//! - If the authority is unreachable from the primary (all of its nodes, or
//!   a partition), the primary stops taking writes: the price of never
//!   having two primaries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::authority::{self, AUTHORITY_FAULT, Authority, Lease, PRIMARY_KEY};
use crate::config::Mode;
use crate::node::Node;

/// How soon the keeper looks again when this node has no lease to renew:
/// a node that just became the primary's leader takes writes within it.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// Starts the lease keeper: every third of the lease, while this node leads
/// the primary region, it renews the primary's lease in the authority (or
/// creates it at epoch 0). It clears the lease when this node no longer
/// leads the primary, or the authority names a newer primary, and gives it
/// up while the region is fenced.
pub fn spawn_keeper(
    node: Arc<Node>,
    authority: Authority,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = 0u32;
        let mut next = IDLE_TICK;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = match renew(&node, &authority, lease).await {
                Ok(Renewal::Renewed) => {
                    failures = 0;
                    lease / 3
                }
                Ok(Renewal::Idle) => {
                    failures = 0;
                    IDLE_TICK
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(error = %e, failures, "could not renew the primary lease");
                    }
                    IDLE_TICK.max(lease / 10)
                }
            };
        }
    })
}

/// What a round of the keeper did.
enum Renewal {
    /// The lease was renewed.
    Renewed,
    /// Nothing to renew: this node does not lead the primary region, or the
    /// region is fenced (and gave its lease up).
    Idle,
}

/// One renewal (see [`spawn_keeper`]).
async fn renew(node: &Node, authority: &Authority, lease: Duration) -> Result<Renewal, String> {
    let held = node.primary_lease();
    let region = node.region().to_string();
    if node.mode() != Mode::ActivePassive || node.check_leader().is_err() || node.reader().primary() != region {
        held.clear();
        return Ok(Renewal::Idle);
    }
    if node.faults().region_blocked(AUTHORITY_FAULT) {
        return Err("the authority is cut off from this node (fault injection)".into());
    }
    let epoch = node.reader().region_state().epoch;
    if node.region_role() == "fenced" {
        // A fenced primary takes no writes: giving the lease up lets the
        // switchover promote without waiting it out.
        held.clear();
        authority.release_primary(&region, epoch).await.map_err(|e| e.to_string())?;
        return Ok(Renewal::Idle);
    }
    let sent = Instant::now();
    let renewed =
        Lease { holder: region.clone(), epoch, renewed_ms: authority::wall_ms(), lease_ms: lease.as_millis() as u64 };
    let current = authority.read(PRIMARY_KEY).await.map_err(|e| e.to_string())?;
    let expected = match &current {
        None if epoch == 0 => None,
        None => return Err(format!("the authority has no primary, but {region} is primary at epoch {epoch}")),
        Some(h) if h.lease.holder == region && h.lease.epoch == epoch => Some(h),
        Some(h) => {
            held.clear();
            return Err(format!(
                "the authority names {} primary at epoch {}; {region} is at epoch {epoch} and takes no writes",
                h.lease.holder, h.lease.epoch
            ));
        }
    };
    if authority.swap(PRIMARY_KEY, expected, &renewed).await.map_err(|e| e.to_string())? {
        held.grant(sent, lease, epoch);
        Ok(Renewal::Renewed)
    } else {
        Err("the primary's record changed while renewing; trying again".into())
    }
}
