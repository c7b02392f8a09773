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
//! - A remote timestamp further ahead of the receiver's clock than
//!   `clock_offset_max` makes the receiver refuse the whole batch; the refusal
//!   is counted (`nines region status`) and logged, and the shipper retries
//!   after a backoff. Nothing is adopted silently.
//! - In active-passive mode every shipment and reply carries the sender's
//!   `(primary, epoch)`. A primary that hears of a higher epoch from the new
//!   primary demotes itself: its writes the new primary never applied are
//!   moved to the divergence record (`nines region divergent`), counted, and
//!   their keys are overwritten with the new primary's values.
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
//!   relayed by a third region is not acted on.
//! - Simulated latency is a one-way delay added before each shipment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nines_client::{Client, ClientConfig, Consistency};
use nines_proto::v1::replication_client::ReplicationClient;
use nines_proto::v1::{ChangeEntry, ShipRefusal, ShipRequest, ShipResponse};
use tokio::sync::watch;

use crate::config::{Mode, RegionConfig};
use crate::error::Error;
use crate::hlc::Hlc;
use crate::limits::{RAFT_MESSAGE_BYTES_MAX, RESYNC_BATCH_KEYS_MAX, SHIP_BATCH_BYTES_MAX, SHIP_BATCH_ENTRIES_MAX};
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

/// Attempts to read divergent keys from the new primary and resync them.
const RESYNC_ATTEMPTS_MAX: u32 = 5;

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
        if shared.check_leader().is_err() || shared.faults.region_blocked(&peer.name) {
            cursor = None;
            pause.await;
            continue;
        }
        let entries = match cursor {
            None => Vec::new(),
            Some(c) => match shared.reader.changefeed_after(c, SHIP_BATCH_ENTRIES_MAX, SHIP_BATCH_BYTES_MAX) {
                Ok(e) => e.into_iter().map(|(i, r)| to_entry(i, r)).collect(),
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
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let sent = client
            .call(true, |c| {
                let r = req.clone();
                async move {
                    ReplicationClient::new(c)
                        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                        .ship(r)
                        .await
                }
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
            let ack = Command::AckShipped { region: peer.name.clone(), index: resp.applied_through };
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
/// those keys are resynchronised from the new primary in the background.
pub async fn adopt(shared: Arc<Shared>, primary: &str, epoch: u64, shipped_through: u64) {
    let cmd = Command::SetRole { primary: primary.to_string(), epoch, fenced: false, shipped_through };
    match shared.propose(cmd).await {
        Ok(CommandResult::Role { divergent }) => {
            tracing::warn!(%primary, epoch, divergent = divergent.len(), "adopted a new primary");
            if !divergent.is_empty()
                && let Some(region) = shared.peers.iter().find(|p| p.name == primary).cloned()
            {
                tokio::spawn(resync(shared.clone(), region, divergent));
            }
        }
        Ok(other) => tracing::error!(?other, "unexpected result adopting a primary"),
        Err(e) => tracing::warn!(error = %e, %primary, epoch, "could not adopt the new primary yet"),
    }
}

/// Overwrites divergent keys with the values the new primary has.
async fn resync(shared: Arc<Shared>, primary: RegionConfig, keys: Vec<Vec<u8>>) {
    let client = match region_client(&primary) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot resync divergent keys");
            return;
        }
    };
    for chunk in keys.chunks(RESYNC_BATCH_KEYS_MAX) {
        let mut done = false;
        for attempt in 1..=RESYNC_ATTEMPTS_MAX {
            let mut entries = Vec::with_capacity(chunk.len());
            let mut failed = None;
            for key in chunk {
                match client.get(key.clone(), Consistency::Local).await {
                    Ok(r) => entries.push(match r.kv {
                        Some(kv) => {
                            let v = kv.version.unwrap_or_default();
                            ResyncEntry {
                                key: key.clone(),
                                value: Some(kv.value),
                                hlc: Hlc { physical_ms: v.hlc_physical_ms, logical: v.hlc_logical },
                                origin: v.origin_region,
                            }
                        }
                        None => {
                            ResyncEntry { key: key.clone(), value: None, hlc: Hlc::default(), origin: String::new() }
                        }
                    }),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if failed.is_none() && shared.propose(Command::Resync { entries }).await.is_ok() {
                done = true;
                break;
            }
            tracing::warn!(attempt, error = ?failed, "resync of divergent keys failed; retrying");
            tokio::time::sleep(SHIP_BACKOFF * attempt).await;
        }
        if !done {
            tracing::error!(keys = chunk.len(), "giving up resyncing divergent keys; they keep their divergent values");
        }
    }
}
