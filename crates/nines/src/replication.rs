//! Cross-region replication: the shipper that runs on each region's leader,
//! and the adoption of region roles it learns about.
//!
//! What it promises:
//! - Every write that originates in a region is recorded in that region's
//!   changefeed (in the state machine, in log order) and shipped to every
//!   peer region by whichever node leads the region at the time. The peer
//!   proposes the batch through its own Raft and applies it
//!   last-writer-wins on `(hlc, origin region)`.
//! - Delivery is at-least-once and application idempotent: the receiver
//!   keeps, per origin, the highest origin index it applied (replicated with
//!   its data), reports it in every reply, and the shipper always resumes
//!   from the receiver's number. A leader change on either side, or a
//!   restart, resumes from the right place with no gap and no duplicate.
//! - Replicated writes are never shipped again: only local-origin writes
//!   enter the changefeed.
//! - A delete's tombstone is collected only when every peer has applied it
//!   and this region holds every peer write made before that peer applied
//!   it (the peer reports its latest own write with each acknowledgement;
//!   shipments say how far they are complete). Later writes of that peer are
//!   stamped above the tombstone, so no older write can resurrect the key.
//! - A remote timestamp further ahead of the receiver's clock than
//!   `clock_offset_max` makes the receiver refuse the whole batch; the refusal
//!   is counted (`nines region status`) and logged, and the shipper retries
//!   after a backoff. Nothing is adopted silently.
//! - In active-passive mode every shipment and reply carries the sender's
//!   `(primary, epoch)`. A primary that hears of a higher epoch from the new
//!   primary demotes itself: its writes the new primary never applied are
//!   moved to the divergence record (`nines region divergent`), counted, and
//!   their keys are overwritten with the new primary's values (read
//!   linearizably there). That resync is driven by replicated state, so a
//!   leader change resumes it; a newer value than the divergent one is left
//!   alone.
//! - The failover controller never issues the same epoch twice and keeps
//!   the primary it promoted as the primary, so two regions never hold the
//!   same epoch through it.
//!
//! What is eventually consistent, and what can be lost:
//! - Regions converge once shipping catches up; until then a region's local
//!   reads miss the other regions' recent writes. The lag is measured per
//!   region pair in entries and in milliseconds (`nines status`).
//! - Active-active: a write that loses last-writer-wins to a concurrent write
//!   with a greater `(hlc, origin)` is overwritten everywhere; that is the
//!   model, not a loss.
//! - Active-passive, unplanned failover: writes the old primary acknowledged
//!   but had not shipped are not on the new primary. They are the RPO, and
//!   they are listed in the old primary's divergence record once it learns
//!   of the new epoch.
//!
//! Caveats:
//! - A region learns of a newer epoch only from the new primary's own
//!   messages (its shipments or replies); with three or more regions, news
//!   relayed by a third region is not acted on, and a third region that had
//!   applied more of the old primary than the new primary keeps those writes.
//! - Applying depends on the replication setup in each node's configuration
//!   (peer regions, mode, initial primary): it must be the same on every node
//!   of a region; changing it needs every node restarted with the new one.
//! - A write whose timestamp a peer refuses (clock too far ahead) holds up the
//!   stream to that peer until the peer's clock catches up; the refusals are
//!   counted and logged meanwhile, and the backlog limit stops writes before
//!   the changefeed grows without bound.
//! - Tombstones of remote deletes and divergence records are kept forever.
//! - Simulated latency is a one-way delay added before each shipment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nines_client::{Client, ClientConfig, Consistency};
use nines_proto::v1::{ChangeEntry, ShipRefusal, ShipRequest, ShipResponse};
use tokio::sync::watch;

use crate::config::{Mode, RegionConfig};
use crate::error::Error;
use crate::hlc::Hlc;
use crate::limits::{RESYNC_BATCH_KEYS_MAX, SHIP_BATCH_BYTES_MAX, SHIP_BATCH_ENTRIES_MAX};
use crate::node::Shared;
use crate::types::{Command, CommandResult, ResyncEntry};

/// How long an idle shipper waits before looking at the changefeed again.
/// Bounds replication lag from below on an idle region; 10 ms is noise next
/// to any cross-region latency.
const SHIP_IDLE: Duration = Duration::from_millis(10);

/// How often a shipper with nothing to ship still exchanges roles and
/// progress with its peer, so epochs and acknowledgements spread on idle
/// regions too.
const SHIP_HEARTBEAT: Duration = Duration::from_millis(500);

/// Backoff after a failed shipment: the peer region is down or partitioned.
const SHIP_BACKOFF: Duration = Duration::from_millis(200);

/// How often the shipper proposes the peer's acknowledgement to its own
/// region's Raft (which lets the changefeed and tombstones be collected).
/// Acks are cheap to lose (the peer reports its position again), so one
/// proposal per interval is enough.
const ACK_INTERVAL: Duration = Duration::from_millis(200);

/// In-memory replication progress on this node, for status and metrics.
#[derive(Default)]
pub struct Stats {
    /// `std::sync::Mutex`: held only to read or update a map entry.
    inner: Mutex<StatsInner>,
}

#[derive(Default, Clone)]
struct StatsInner {
    /// Per peer region: the highest changefeed index it reported applied.
    acked: BTreeMap<String, u64>,
    /// Per origin region: batches refused because a timestamp was too far ahead.
    refused_clock: BTreeMap<String, u64>,
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn acked(&self, peer: &str) -> Option<u64> {
        self.lock().acked.get(peer).copied()
    }

    fn set_acked(&self, peer: &str, index: u64) {
        self.lock().acked.insert(peer.to_string(), index);
    }

    pub fn refused_clock(&self, origin: &str) -> u64 {
        self.lock().refused_clock.get(origin).copied().unwrap_or(0)
    }

    pub fn count_refused_clock(&self, origin: &str) {
        *self.lock().refused_clock.entry(origin.to_string()).or_default() += 1;
    }
}

/// A client of a peer region, tuned for replication: few attempts per call
/// (the shipper loop retries), short deadlines.
pub fn region_client(region: &RegionConfig) -> Result<Client, Error> {
    let config = ClientConfig {
        attempt_timeout: Duration::from_secs(5),
        attempts_max: 3,
        request_deadline: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    Client::new(region.endpoints.clone(), config)
        .map_err(|e| Error::Internal(format!("region {} endpoints: {e}", region.name)))
}

/// Starts one shipper per peer region; they stop when `stop` turns true.
pub fn spawn_shippers(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    shared.peers.iter().map(|peer| tokio::spawn(ship_to(shared.clone(), peer.clone(), stop.clone()))).collect()
}

fn to_entry(index: u64, rec: crate::storage::state_machine::ChangeRecord) -> ChangeEntry {
    ChangeEntry {
        origin_index: index,
        key: rec.key,
        tombstone: rec.value.is_none(),
        value: rec.value.unwrap_or_default(),
        hlc_physical_ms: rec.hlc.physical_ms,
        hlc_logical: rec.hlc.logical,
    }
}

async fn ship_to(shared: Arc<Shared>, peer: RegionConfig, mut stop: watch::Receiver<bool>) {
    let client = match region_client(&peer) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(peer = %peer.name, error = %e, "cannot ship to region");
            return;
        }
    };
    let latency = shared.latency.between(&shared.info.region, &shared.info.az, &peer.name, "");
    // The peer's applied position for this region: `None` until it told us.
    let mut cursor: Option<u64> = None;
    let mut last_exchange = Instant::now() - SHIP_HEARTBEAT;
    let mut last_ack = (0u64, Instant::now());
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let pause = async {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(SHIP_IDLE) => {}
            }
        };
        if shared.check_leader().is_err() || shared.faults.sends_blocked(&peer.name) {
            cursor = None;
            pause.await;
            continue;
        }
        // Read the latest local write first: every local write at or below it
        // is in the changefeed (or was acknowledged by every peer) when we scan.
        let applied_before = shared.reader.region_state().last_local_write;
        let (entries, complete_through) = match cursor {
            None => (Vec::new(), 0),
            Some(c) => match shared.reader.changefeed_after(c, SHIP_BATCH_ENTRIES_MAX, SHIP_BATCH_BYTES_MAX) {
                Ok((page, all)) => {
                    let complete = if all { applied_before } else { page.last().map(|(i, _)| *i).unwrap_or(c) };
                    (page.into_iter().map(|(i, r)| to_entry(i, r)).collect::<Vec<_>>(), complete)
                }
                Err(e) => {
                    shared.stop_fatally(format!("reading the changefeed: {e}"));
                    return;
                }
            },
        };
        if entries.is_empty() && cursor.is_some() && last_exchange.elapsed() < SHIP_HEARTBEAT {
            pause.await;
            continue;
        }
        let region = shared.reader.region_state();
        let req = ShipRequest {
            origin_region: shared.info.region.clone(),
            epoch: region.epoch,
            primary: shared.reader.primary(),
            entries,
            receiver_applied_through: region.applied_from.get(&peer.name).copied().unwrap_or(0),
            complete_through,
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let sent = client
            .call(true, |c| {
                let r = req.clone();
                async move { crate::server::replication::client(c).ship(r).await }
            })
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(peer = %peer.name, failures, error = %e, "shipping to region failed; retrying");
                }
                cursor = None;
                tokio::time::sleep(SHIP_BACKOFF).await;
                continue;
            }
        };
        failures = 0;
        last_exchange = Instant::now();
        adopt_from_peer(&shared, &peer, &resp).await;
        match ShipRefusal::try_from(resp.refused).unwrap_or(ShipRefusal::None) {
            ShipRefusal::None => {}
            ShipRefusal::StaleEpoch => {
                tracing::warn!(peer = %peer.name, reason = %resp.reason, "shipment refused: stale epoch");
                tokio::time::sleep(SHIP_BACKOFF).await;
            }
            ShipRefusal::ClockAhead => {
                tracing::warn!(peer = %peer.name, reason = %resp.reason, "shipment refused: clock ahead");
                tokio::time::sleep(SHIP_BACKOFF).await;
            }
        }
        cursor = Some(resp.applied_through);
        shared.stats.set_acked(&peer.name, resp.applied_through);
        if resp.applied_through > last_ack.0 && last_ack.1.elapsed() >= ACK_INTERVAL {
            let ack = Command::AckShipped {
                region: peer.name.clone(),
                index: resp.applied_through,
                peer_index: resp.receiver_index,
            };
            if shared.propose(ack).await.is_ok() {
                last_ack = (resp.applied_through, Instant::now());
            }
        }
    }
}

/// Acts on the roles a peer reported (active-passive): if the peer is the
/// primary at a higher epoch, adopt it (demoting this region if needed).
async fn adopt_from_peer(shared: &Arc<Shared>, peer: &RegionConfig, resp: &ShipResponse) {
    if shared.mode != Mode::ActivePassive {
        return;
    }
    let ours = shared.reader.region_state();
    if resp.epoch > ours.epoch && resp.primary == peer.name {
        adopt(shared.clone(), &resp.primary, resp.epoch, resp.applied_through).await;
    }
}

/// Adopts `primary` at `epoch`. `shipped_through` is how far the new primary
/// applied this region's changefeed; anything above becomes divergent, and
/// the resync task overwrites those keys with the new primary's values.
pub async fn adopt(shared: Arc<Shared>, primary: &str, epoch: u64, shipped_through: u64) {
    let cmd = Command::SetRole { primary: primary.to_string(), epoch, fenced: false, shipped_through };
    match shared.propose(cmd).await {
        Ok(CommandResult::Role { divergent }) => {
            tracing::warn!(%primary, epoch, divergent = divergent.len(), "adopted a new primary");
        }
        Ok(other) => tracing::error!(?other, "unexpected result adopting a primary"),
        Err(e) => tracing::warn!(error = %e, %primary, epoch, "could not adopt the new primary yet"),
    }
}

/// How often the resync task looks for divergent keys waiting for the new
/// primary's values.
const RESYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the task that, on the region's leader, overwrites divergent keys
/// with the new primary's values until the region state says it is done.
/// Driven by replicated state, so a leader change resumes it.
pub fn spawn_resync(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
            }
            if *stop.borrow() {
                return;
            }
            let region = shared.reader.region_state();
            if !region.resync_pending || shared.check_leader().is_err() {
                continue;
            }
            if let Err(e) = resync_once(&shared, region.epoch).await {
                tracing::warn!(error = %e, "resync of divergent keys failed; retrying");
            }
        }
    })
}

/// One pass over the divergence record of the current epoch: reads each key
/// at the new primary (linearizable, so no stale replica answers) and
/// proposes the values; the last batch marks the resync done.
async fn resync_once(shared: &Arc<Shared>, epoch: u64) -> Result<(), Error> {
    let primary = shared.reader.primary();
    let region = shared
        .peers
        .iter()
        .find(|p| p.name == primary)
        .cloned()
        .ok_or_else(|| Error::Internal(format!("primary {primary} is not a peer region")))?;
    if shared.faults.region_blocked(&primary) {
        return Err(Error::Unavailable {
            reason: format!("traffic with region {primary} is blocked (fault injection)"),
            retry_safe: true,
        });
    }
    let client = region_client(&region)?;
    let records: Vec<_> = shared
        .reader
        .divergent(usize::MAX)
        .map_err(Error::from)?
        .into_iter()
        .filter(|r| r.demoted_at_epoch == epoch)
        .collect();
    let chunks: Vec<_> = records.chunks(RESYNC_BATCH_KEYS_MAX).collect();
    if chunks.is_empty() {
        shared.propose(Command::Resync { entries: Vec::new(), done: true }).await?;
        return Ok(());
    }
    for (n, chunk) in chunks.iter().enumerate() {
        let mut entries = Vec::with_capacity(chunk.len());
        for record in chunk.iter() {
            let read = client
                .get(record.key.clone(), Consistency::Linearizable)
                .await
                .map_err(|e| Error::Unavailable { reason: format!("reading {primary}: {e}"), retry_safe: true })?;
            let (value, hlc, origin) = match read.kv {
                Some(kv) => {
                    let v = kv.version.unwrap_or_default();
                    (Some(kv.value), Hlc { physical_ms: v.hlc_physical_ms, logical: v.hlc_logical }, v.origin_region)
                }
                None => (None, Hlc::default(), String::new()),
            };
            entries.push(ResyncEntry {
                key: record.key.clone(),
                value,
                hlc,
                origin,
                divergent: record.version.clone(),
            });
        }
        let done = n + 1 == chunks.len();
        shared.propose(Command::Resync { entries, done }).await?;
    }
    tracing::info!(keys = records.len(), %primary, "divergent keys resynchronised from the new primary");
    Ok(())
}
