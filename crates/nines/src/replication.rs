//! Cross-region replication: the shipper that runs on each region's leader,
//! the receiver that takes a peer's shipments, and the adoption of region
//! roles both learn about. The gRPC adapter (`server/replication.rs`) only
//! decodes a shipment, calls [`receive`] with its node's [`Inboxes`] and
//! encodes the answer.
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
//! - Shipments are pipelined (several in flight to a peer, each continuing
//!   from where the one before it ends) and the receiver applies each only
//!   on top of the ones before it, grouping those that arrive together into
//!   one proposal; a lost or late shipment never leaves a gap, and its
//!   successors are shipped again.
//! - Replicated writes are never shipped again: only local-origin writes
//!   enter the changefeed.
//! - A delete's tombstone is collected only when every peer has applied it
//!   and this region holds every peer write made before that peer applied
//!   it (the peer reports its latest own write with each acknowledgement,
//!   the first acknowledgement that covered a tombstone is remembered, and
//!   shipments say how far they are complete). Later writes of that peer are
//!   stamped above the tombstone, so no older write can resurrect the key.
//!   Collection runs when an acknowledgement or a peer's writes arrive, so
//!   it keeps pace under continuous writes on both sides.
//! - A remote timestamp further ahead of the receiver's clock than
//!   `clock_offset_max` is never adopted by the receiver's clock: one bad
//!   clock cannot drag a region's time forward. The write still applies
//!   with its timestamp (so regions converge, and the stream behind it is
//!   not held up); each such write is counted (`nines region status`,
//!   `nines_hlc_remote_refused_total`) and logged.
//! - The replication setup (peer regions, mode, initial primary) is
//!   replicated state: every replica applies every entry by the same setup,
//!   whatever its own file says; a node whose file disagrees refuses to
//!   start, naming the field (`nines region configure` changes it).
//! - In active-passive mode every shipment and reply carries the sender's
//!   `(primary, epoch)`. A primary that hears of a higher epoch from the new
//!   primary demotes itself: its writes the new primary never applied are
//!   moved to the divergence record (`nines region divergent`), counted, and
//!   their keys are overwritten with the new primary's values (read
//!   linearizably there). That resync is driven by replicated state, so a
//!   leader change resumes it; a newer value than the divergent one is left
//!   alone. A region promoted again before its resync ran cannot read the
//!   other's values: it writes its divergent values again (compare-and-swap
//!   on the divergent version) so they reach every region.
//! - With an authority (`crate::authority`) every epoch is allocated there
//!   once. Without one, the failover controller never issues the same epoch
//!   twice, and two promotions to one epoch from elsewhere (two operators
//!   at once) resolve to the region whose name sorts first, in every
//!   region: the other demotes itself like any old primary.
//! - A peer that reports having applied less of this region than it once
//!   acknowledged lost writes (its nodes lost their disks); the changefeed
//!   may no longer hold them, so the shipper rebuilds it by a full sync:
//!   every key of this region's data (tombstones included, each with its
//!   own version) in key order, page by page, then the changefeed from the
//!   latest local write when the sync began. The peer counts nothing as
//!   applied from this region until the last page, and reports "full sync"
//!   until then; it is never promoted meanwhile. A full sync assumes the
//!   peer lost everything: a key it still holds that was deleted here and
//!   whose tombstone is collected stays.
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
//!   of the new epoch. The RPO guard (`replication.max_rpo`, see
//!   [`spawn_rpo_guard`]) bounds them in time: the primary refuses writes
//!   while no secondary has acknowledged its oldest unacknowledged write
//!   within `max_rpo`.
//!
//! Caveats:
//! - A region learns of a newer epoch only from the new primary's own
//!   messages (its shipments or replies); with three or more regions, news
//!   relayed by a third region is not acted on, and a third region that had
//!   applied more of the old primary than the new primary keeps those writes.
//! - A write stamped by a clock far ahead (before its node noticed, which it
//!   does only when its clock steps back) wins last-writer-wins on its key in
//!   every region until real time passes its timestamp: later writes to that
//!   key from other regions lose. That is last-writer-wins with a bad clock;
//!   it is counted where it arrives, and the node that stamped it steps down.
//! - Shippers ship to the peers in the node's file; a setup changed with
//!   `nines region configure` takes effect for shipping once the nodes
//!   restart with files that say the same.
//! - Tombstones of remote deletes and divergence records are kept forever.
//! - Simulated latency is a one-way delay added before each shipment.
//! - A shipment that arrives before the ones it continues from waits on the
//!   receiver's leader up to `SHIP_PREDECESSOR_WAIT` (at most
//!   `SHIPMENTS_WAITING_MAX` per origin, each up to the shipment limits),
//!   then is refused as out of order and the sender ships again from there.
//! - `in_order` comes from the node that answered. During a rolling upgrade
//!   from a build without it, a region whose leadership moves back to an
//!   old node applies pipelined shipments as they come and may skip
//!   overtaken writes: upgrade the receiving regions before the senders
//!   rely on it (a new sender pipelines only after an `in_order` answer).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rpc::{Client, ClientConfig, Consistency};
use nines_proto::v1::replication_client::ReplicationClient;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;

use crate::config::{Mode, RegionConfig};
use crate::convert;
use crate::error::Error;
use crate::hlc::Hlc;
use crate::limits::{
    DIVERGENT_LIST_MAX, DIVERGENT_PAGE_BYTES_MAX, RAFT_MESSAGE_BYTES_MAX, RESYNC_BATCH_BYTES_MAX,
    RESYNC_BATCH_KEYS_MAX, SHIP_BATCH_BYTES_MAX, SHIP_BATCH_ENTRIES_MAX,
};
use crate::node::Node;
use crate::types::{
    Command, CommandResult, Expected, Refusal, RemoteEntry, ResyncEntry, ShipAnswer, Shipment, SyncEntry,
    wins_epoch_tie,
};

/// How long an idle shipper waits before looking at the changefeed again
/// when no new local write woke it (one wakes it whenever it could send).
const SHIP_IDLE: Duration = Duration::from_millis(10);

/// Shipments in flight to one peer at once. Each waits out the one-way
/// latency on its own, so a write ships a moment after it is applied, not
/// after the exchange before it came back: stop-and-wait cost a write that
/// landed just after a send two exchanges (45-90 ms at 40 ms one way).
const SHIP_IN_FLIGHT_MAX: usize = 16;

/// The least time between two shipments to one peer: writes arriving
/// closer together share a shipment, so a busy region sends at most about
/// 500 shipments a second (each one Raft proposal at the receiver, which
/// groups those that arrive together). A write waits up to this long for
/// its shipment: it is part of the cross-region lag (5 ms gave a p99 of
/// 62-63 ms at 40 ms one way, against a goal of 60).
const SHIP_SPACING: Duration = Duration::from_millis(2);

/// How often a shipper with nothing to ship still exchanges roles and
/// progress with its peer, so epochs and acknowledgements spread on idle
/// regions too.
const SHIP_HEARTBEAT: Duration = Duration::from_millis(500);

/// How long a receiver holds a shipment that nothing waiting continues up
/// to (the ones sent before it have not arrived) before refusing it
/// (`Refusal::OutOfOrder`); the sender then ships again from the position
/// answered. Far below the sender's attempt timeout.
const SHIP_PREDECESSOR_WAIT: Duration = Duration::from_millis(500);

/// How long one attempt of a call to a peer region may take
/// (`region_client`).
const SHIP_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shipments one origin may have queued on a leader at once: a sender keeps
/// at most `SHIP_IN_FLIGHT_MAX` in flight, and requests it gave up on leave
/// the queue (those already taken into the proposal under way stay counted
/// until it ends); four pipelines' worth leaves room for a sender's retries and a
/// leader change, and bounds the queue at 64 x `SHIP_BATCH_BYTES_MAX`.
const SHIPMENTS_WAITING_MAX: usize = 4 * SHIP_IN_FLIGHT_MAX;
const _: () = assert!(SHIPMENTS_WAITING_MAX >= SHIP_IN_FLIGHT_MAX);
const _: () = assert!(SHIP_PREDECESSOR_WAIT.as_millis() * 4 <= SHIP_ATTEMPT_TIMEOUT.as_millis());

/// Backoff after a failed shipment: the peer region is down or partitioned.
const SHIP_BACKOFF: Duration = Duration::from_millis(200);

/// How often the shipper proposes the peer's acknowledgement to its own
/// region's Raft (which lets the changefeed and tombstones be collected).
/// Acks are cheap to lose (the peer reports its position again), so one
/// proposal per interval is enough.
const ACK_INTERVAL: Duration = Duration::from_millis(200);

/// Failed shipments between two warnings in the log: the first failure is
/// logged, then one in this many, so a long partition does not flood it.
const SHIP_FAILURES_PER_WARNING: u32 = 50;

/// A `Replication` client that accepts shipments up to the Raft message limit.
pub fn ship_client(c: Channel) -> ReplicationClient<Channel> {
    ReplicationClient::new(c)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
}

/// A client of a peer region at `endpoints` (its peer URLs for shipments,
/// its client URLs for reads), tuned for replication: few attempts per call
/// (the shipper loop retries), short deadlines.
pub fn region_client(region: &str, endpoints: &[String]) -> Result<Client, Error> {
    let config = ClientConfig {
        attempt_timeout: SHIP_ATTEMPT_TIMEOUT,
        attempts_max: 3,
        request_deadline: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    Client::new(endpoints.to_vec(), config).map_err(|e| Error::Internal(format!("region {region} endpoints: {e}")))
}

/// Starts one shipper per peer region; they stop when `stop` turns true.
pub fn spawn_shippers(node: Arc<Node>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    node.peers()
        .iter()
        .map(|peer| {
            let (node, peer, stop) = (node.clone(), peer.clone(), stop.clone());
            tokio::spawn(async move {
                match Shipper::new(node, peer) {
                    Ok(shipper) => shipper.run(stop).await,
                    Err(e) => tracing::error!(error = %e, "cannot ship to region"),
                }
            })
        })
        .collect()
}

/// What one round of the shipper does next.
enum Step {
    /// Nothing to send now.
    Idle,
    /// Send this shipment.
    Send(Shipment),
}

/// Ships this region's changefeed to one peer region while this node leads.
///
/// Changefeed shipments are pipelined: up to `SHIP_IN_FLIGHT_MAX` travel
/// at once, each continuing from where the one before it ends (`after`),
/// and the receiver applies each only once it applied the ones before, so
/// none is applied over a gap. Answers are taken in the order the
/// shipments left. A failure or a refusal drops everything in flight and
/// starts over from the receiver's own number; an answer that shows a
/// shipment was not applied drops everything in flight and ships again
/// from the position answered. Empty exchanges (the first one, which
/// learns the receiver's position, and heartbeats) and full sync pages go
/// one at a time, and so does everything to a receiver that does not
/// answer `in_order`.
struct Shipper {
    node: Arc<Node>,
    peer: RegionConfig,
    client: Arc<Client>,
    /// Simulated one-way latency to the peer, added before each shipment
    /// (plus the test-only jitter, see `Faults::ship_jitter`).
    latency: Duration,
    /// The peer's applied position for this region: `None` until it told us
    /// (after every failure and leadership loss, so a new exchange resumes
    /// from the peer's own number).
    cursor: Option<u64>,
    /// Shipments sent and not yet answered, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The peer said it applies shipments in order (`ShipAnswer::in_order`):
    /// until it does, one shipment at a time.
    pipelined: bool,
    /// When the latest shipment left (see `SHIP_SPACING`).
    last_send: Instant,
    last_exchange: Instant,
    /// The latest acknowledgement proposed, and when.
    last_ack: (u64, Instant),
    failures: u32,
    /// A full sync under way (the peer lost writes it had applied).
    full_sync: Option<FullSync>,
}

/// One shipment on its way: the exchange runs as its own task, so it waits
/// out the latency while the shipper sends the next one.
struct InFlight {
    reply: tokio::task::JoinHandle<Result<nines_proto::v1::ShipResponse, String>>,
    /// The highest origin index it carries (its `after` when it carries
    /// none): an answer below it means it was not applied.
    through: u64,
    /// Sent with nothing else in flight: the receiver computed its answer
    /// after every earlier one. Answers are taken in send order, but the
    /// receiver computes each after its own apply, so a pipelined
    /// shipment's answer may show less than the one before it; only answers
    /// to these can show that the peer lost writes.
    alone: bool,
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.drop_in_flight();
    }
}

/// A full sync to one peer: every key of this region, in key order, then
/// the changefeed from `watermark` on.
struct FullSync {
    /// This region's latest local write when the sync began: every local
    /// write through it is in the data the pages carry.
    watermark: u64,
    /// The last key the peer has applied a page through.
    after: Option<Vec<u8>>,
    /// The last key of the page in flight, and whether it is the last page.
    sending: Option<(Vec<u8>, bool)>,
    keys: u64,
    started: Instant,
}

/// What woke the shipper.
enum Wake {
    /// The oldest shipment in flight was answered (or failed).
    Reply(Result<nines_proto::v1::ShipResponse, String>),
    /// A timer, a new local write, or the stop signal.
    Look,
}

impl Shipper {
    fn new(node: Arc<Node>, peer: RegionConfig) -> Result<Self, Error> {
        let client = Arc::new(region_client(&peer.name, &peer.peer_endpoints)?);
        let latency = node.latency().between(node.region(), &node.info().az, &peer.name, "");
        Ok(Shipper {
            node,
            peer,
            client,
            latency,
            cursor: None,
            in_flight: Default::default(),
            pipelined: false,
            last_send: Instant::now() - SHIP_SPACING,
            last_exchange: Instant::now() - SHIP_HEARTBEAT,
            last_ack: (0, Instant::now()),
            failures: 0,
            full_sync: None,
        })
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut writes = self.node.reader().local_writes();
        while !*stop.borrow() {
            let mut wait = SHIP_IDLE;
            let in_flight_max = if self.pipelined { SHIP_IN_FLIGHT_MAX } else { 1 };
            if self.in_flight.len() < in_flight_max {
                let spacing = SHIP_SPACING.saturating_sub(self.last_send.elapsed());
                if spacing.is_zero() {
                    match self.next_step() {
                        Ok(Step::Send(shipment)) => self.send(shipment),
                        Ok(Step::Idle) => {}
                        Err(e) => {
                            self.node.stop_fatally(format!("reading the changefeed: {e}"));
                            return;
                        }
                    }
                } else {
                    wait = spacing;
                }
            }
            // A new local write wakes the shipper when it could send at once.
            let on_write = self.in_flight.len() < in_flight_max && wait == SHIP_IDLE;
            let wake = tokio::select! {
                _ = stop.changed() => Wake::Look,
                reply = oldest_reply(&mut self.in_flight) => Wake::Reply(reply),
                changed = writes.changed(), if on_write => {
                    if changed.is_err() {
                        // The state machine is gone: the node is stopping.
                        tokio::time::sleep(SHIP_IDLE).await;
                    }
                    Wake::Look
                }
                _ = tokio::time::sleep(wait) => Wake::Look,
            };
            if let Wake::Reply(reply) = wake
                && let Some(flight) = self.in_flight.pop_front()
            {
                self.settle(&flight, reply).await;
            }
        }
    }

    /// Reads what to ship next: the changefeed after what was last sent, or
    /// an empty exchange of roles and progress when nothing is in flight
    /// and the peer's position is unknown or a heartbeat is due.
    fn next_step(&mut self) -> Result<Step, Error> {
        let node = &self.node;
        if node.check_leader().is_err() || node.faults().sends_blocked(&self.peer.name) {
            self.cursor = None;
            self.drop_in_flight();
            return Ok(Step::Idle);
        }
        let idle = self.in_flight.is_empty();
        if let Some(sync) = self.full_sync.as_mut() {
            return if idle { full_sync_page(node, &self.peer.name, sync) } else { Ok(Step::Idle) };
        }
        let after = match (self.cursor, self.in_flight.back()) {
            (Some(_), Some(last)) => last.through,
            (Some(cursor), None) => cursor,
            // The first exchange learns the peer's position; nothing follows
            // it until it is answered.
            (None, None) => return Ok(Step::Send(self.shipment(0, Vec::new(), 0))),
            (None, Some(_)) => return Ok(Step::Idle),
        };
        // Read the latest local write first: every local write at or below it
        // is in the changefeed (or was acknowledged by every peer) when we scan.
        let applied_before = node.reader().region_state().last_local_write;
        let (page, all) =
            node.reader().changefeed_after(after, SHIP_BATCH_ENTRIES_MAX, SHIP_BATCH_BYTES_MAX).map_err(Error::from)?;
        let complete_through = if all { applied_before } else { page.last().map(|(i, _)| *i).unwrap_or(after) };
        let entries: Vec<_> = page.into_iter().map(|(i, r)| convert::change_to_remote(i, r)).collect();
        if entries.is_empty() && !(idle && self.last_exchange.elapsed() >= SHIP_HEARTBEAT) {
            return Ok(Step::Idle);
        }
        Ok(Step::Send(self.shipment(after, entries, complete_through)))
    }

    /// A changefeed shipment (or an empty one) with this region's view of
    /// the roles and of the peer.
    fn shipment(&self, after: u64, entries: Vec<RemoteEntry>, complete_through: u64) -> Shipment {
        let region = self.node.reader().region_state();
        Shipment {
            origin: self.node.region().to_string(),
            epoch: region.epoch,
            primary: self.node.reader().primary(),
            after,
            entries,
            receiver_applied_through: region.applied_from.get(&self.peer.name).copied().unwrap_or(0),
            complete_through,
            full_sync: None,
        }
    }

    /// Starts one exchange: a task that waits out the latency and sends.
    fn send(&mut self, shipment: Shipment) {
        let through = shipment.entries.last().map_or(shipment.after, |e| e.origin_index);
        let req = convert::shipment_to_proto(shipment);
        let (client, latency) = (self.client.clone(), self.latency + self.node.faults().ship_jitter());
        let reply = tokio::spawn(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            client
                .call(true, |c| {
                    let r = req.clone();
                    async move { ship_client(c).ship(r).await }
                })
                .await
                .map_err(|e| e.to_string())
        });
        let alone = self.in_flight.is_empty();
        self.in_flight.push_back(InFlight { reply, through, alone });
        self.last_send = Instant::now();
    }

    /// Abandons every shipment in flight: the next one continues from the
    /// receiver's own number.
    fn drop_in_flight(&mut self) {
        for flight in self.in_flight.drain(..) {
            flight.reply.abort();
        }
    }

    /// Acts on the answer to the oldest shipment in flight: adopt a newer
    /// primary, move the cursor, propose the acknowledgement now and then.
    async fn settle(&mut self, flight: &InFlight, reply: Result<nines_proto::v1::ShipResponse, String>) {
        let answer = match reply {
            Ok(r) => convert::answer_from_proto(r),
            Err(e) => {
                self.failures += 1;
                if self.failures == 1 || self.failures.is_multiple_of(SHIP_FAILURES_PER_WARNING) {
                    tracing::warn!(peer = %self.peer.name, failures = self.failures, error = %e, "shipping to region failed; retrying");
                }
                self.cursor = None;
                self.drop_in_flight();
                tokio::time::sleep(SHIP_BACKOFF).await;
                return;
            }
        };
        self.failures = 0;
        self.last_exchange = Instant::now();
        self.pipelined = answer.in_order;
        adopt_from_peer(&self.node, &self.peer, &answer).await;
        if answer.refused == Refusal::OutOfOrder {
            // What it continued from was lost on the way: ship again from
            // the position answered, at once.
            tracing::debug!(peer = %self.peer.name, reason = %answer.reason, "shipment arrived out of order");
            self.drop_in_flight();
        } else if answer.refused != Refusal::None {
            tracing::warn!(peer = %self.peer.name, refused = ?answer.refused, reason = %answer.reason, "shipment refused");
            self.drop_in_flight();
            tokio::time::sleep(SHIP_BACKOFF).await;
        } else {
            self.follow_full_sync(&answer, flight.alone);
        }
        if answer.applied_through < flight.through {
            // Not applied: a shipment before it was lost or late. What
            // follows it cannot apply either.
            self.drop_in_flight();
        }
        // A pipelined shipment's answer may show less than one already
        // taken (the receiver computed it earlier).
        let position = match self.cursor {
            Some(cursor) if !flight.alone => cursor.max(answer.applied_through),
            _ => answer.applied_through,
        };
        self.cursor = Some(position);
        self.node.stats().set_acked(&self.peer.name, position);
        self.propose_ack(&answer).await;
    }

    /// After an accepted exchange: moves a full sync on (or ends it), or
    /// starts one when the peer reports having applied less of this region
    /// than it once acknowledged (it lost writes: its nodes lost their
    /// disks) and the changefeed may no longer hold the difference. Only
    /// the answer to a shipment sent `alone` can show that (see `InFlight`).
    fn follow_full_sync(&mut self, answer: &ShipAnswer, alone: bool) {
        let peer = &self.peer.name;
        if let Some(sync) = self.full_sync.as_mut() {
            match sync.sending.take() {
                Some((_, true)) => {
                    tracing::warn!(%peer, keys = sync.keys, took = ?sync.started.elapsed(), "full sync done");
                    self.full_sync = None;
                }
                Some((last, false)) => sync.after = Some(last),
                None => {}
            }
            return;
        }
        if !alone {
            return;
        }
        let region = self.node.reader().region_state();
        let acked = region.acked.get(peer).copied().unwrap_or(0);
        if answer.applied_through < acked {
            tracing::warn!(
                %peer,
                applied = answer.applied_through,
                acked,
                "the peer region has applied less than it acknowledged (it lost its data?): rebuilding it by a full sync"
            );
            self.full_sync = Some(FullSync {
                watermark: region.last_local_write,
                after: None,
                sending: None,
                keys: 0,
                started: Instant::now(),
            });
        }
    }

    /// Proposes the peer's acknowledgement when it moved and `ACK_INTERVAL`
    /// has passed since the last one.
    async fn propose_ack(&mut self, answer: &ShipAnswer) {
        if answer.applied_through <= self.last_ack.0 || self.last_ack.1.elapsed() < ACK_INTERVAL {
            return;
        }
        let ack = Command::AckShipped {
            region: self.peer.name.clone(),
            index: answer.applied_through,
            peer_index: answer.receiver_index,
            collect_below_ms: collect_below_ms(&self.node),
        };
        if self.node.propose(ack).await.is_ok() {
            self.last_ack = (answer.applied_through, Instant::now());
        }
    }
}

/// The answer to the oldest shipment in flight; never ready when none is.
async fn oldest_reply(in_flight: &mut VecDeque<InFlight>) -> Result<nines_proto::v1::ShipResponse, String> {
    match in_flight.front_mut() {
        Some(flight) => (&mut flight.reply).await.unwrap_or_else(|e| Err(format!("the shipment task failed: {e}"))),
        None => std::future::pending().await,
    }
}

/// The next page of a full sync to `peer`: keys after the last one the peer
/// applied; the last page carries the watermark.
fn full_sync_page(node: &Node, peer: &str, sync: &mut FullSync) -> Result<Step, Error> {
    let (page, more) = node
        .reader()
        .sync_page(sync.after.as_deref(), SHIP_BATCH_ENTRIES_MAX, SHIP_BATCH_BYTES_MAX)
        .map_err(Error::from)?;
    let last = page.last().map(|(k, _)| k.clone()).or_else(|| sync.after.clone()).unwrap_or_default();
    sync.sending = Some((last, !more));
    sync.keys += page.len() as u64;
    let entries = page
        .into_iter()
        .map(|(key, v)| SyncEntry { key, value: v.value, hlc: v.version.hlc, origin: v.version.origin })
        .collect();
    let region = node.reader().region_state();
    Ok(Step::Send(Shipment {
        origin: node.region().to_string(),
        epoch: region.epoch,
        primary: node.reader().primary(),
        after: 0,
        entries: Vec::new(),
        receiver_applied_through: region.applied_from.get(peer).copied().unwrap_or(0),
        complete_through: if more { 0 } else { sync.watermark.max(1) },
        full_sync: Some(entries),
    }))
}

/// Acts on the roles a peer reported (active-passive): if the peer is the
/// primary at a higher epoch, adopt it (demoting this region if needed).
async fn adopt_from_peer(node: &Node, peer: &RegionConfig, answer: &ShipAnswer) {
    if node.mode() != Mode::ActivePassive {
        return;
    }
    if supersedes(node, &peer.name, &answer.primary, answer.epoch) {
        adopt(node, &answer.primary, answer.epoch, answer.applied_through).await;
    }
}

/// Whether `sender`, naming `primary` at `epoch`, is a primary this region
/// must adopt: it speaks for itself, and its epoch is higher, or equal with
/// a name that sorts before this region's primary (two promotions to one
/// epoch resolve the same way everywhere; the state machine applies the
/// same rule).
fn supersedes(node: &Node, sender: &str, primary: &str, epoch: u64) -> bool {
    let ours = node.reader().region_state().epoch;
    let current = node.reader().primary();
    primary == sender && (epoch > ours || (epoch == ours && !current.is_empty() && wins_epoch_tie(primary, &current)))
}

/// Adopts `primary` at `epoch`. `shipped_through` is how far the new primary
/// applied this region's changefeed; anything above becomes divergent, and
/// the resync task overwrites those keys with the new primary's values.
pub async fn adopt(node: &Node, primary: &str, epoch: u64, shipped_through: u64) {
    let cmd = Command::SetRole { primary: primary.to_string(), epoch, fenced_until_ms: 0, shipped_through };
    match node.propose(cmd).await {
        Ok(CommandResult::Role { divergent }) => {
            tracing::warn!(%primary, epoch, divergent = divergent.len(), "adopted a new primary");
        }
        Ok(other) => tracing::error!(?other, "unexpected result adopting a primary"),
        Err(e) => tracing::warn!(error = %e, %primary, epoch, "could not adopt the new primary yet"),
    }
}

/// Takes a peer region's shipment on this region's leader: checks that the
/// sender is a peer, that it is not stale (active-passive), adopts a newer
/// primary it names, refuses timestamps too far ahead of this clock, and
/// proposes the batch through Raft in order with the origin's other
/// shipments (see [`Inboxes`]). Forwarding to the leader is the adapter's
/// job; this must run on the leader.
pub async fn receive(node: &Arc<Node>, inboxes: &Inboxes, shipment: Shipment) -> Result<ShipAnswer, Error> {
    let origin = shipment.origin.clone();
    if origin == node.region() || !node.peers().iter().any(|p| p.name == origin) {
        return Err(Error::invalid(format!("origin_region {origin:?} is not a peer region")));
    }
    if node.faults().region_blocked(&origin) {
        return Err(Error::Unavailable {
            reason: format!("traffic from region {origin} is blocked (fault injection)"),
            retry_safe: true,
        });
    }
    if node.mode() == Mode::ActivePassive {
        let ours = node.reader().region_state();
        if shipment.epoch < ours.epoch {
            let reason = format!(
                "region {} is at epoch {} with primary {}; {origin} sent epoch {}",
                node.region(),
                ours.epoch,
                node.reader().primary(),
                shipment.epoch
            );
            return Ok(answer(node, &origin, Refusal::StaleEpoch, reason));
        }
        if supersedes(node, &origin, &shipment.primary, shipment.epoch) {
            adopt(node, &shipment.primary, shipment.epoch, shipment.receiver_applied_through).await;
        }
    }
    // A timestamp too far ahead of this clock is not adopted (that would
    // carry a wrong time into every later write here); the write still
    // applies with it, so regions converge. Counted and logged.
    let ahead: Vec<_> = shipment.entries.iter().filter_map(|e| node.clock().observe(e.hlc).err()).collect();
    if let Some(err) = ahead.first() {
        for _ in &ahead {
            node.stats().count_refused_clock(&origin);
            crate::telemetry::remote_refused(&origin);
        }
        tracing::warn!(%origin, writes = ahead.len(), error = %err, "shipped timestamps too far ahead: applied, not adopted by the clock");
    }
    if let Some(page) = shipment.full_sync {
        let cmd = Command::FullSync {
            origin: origin.clone(),
            epoch: shipment.epoch,
            entries: page,
            through: shipment.complete_through,
        };
        return match node.propose(cmd).await? {
            CommandResult::Remote { .. } => Ok(answer(node, &origin, Refusal::None, String::new())),
            CommandResult::Rejected { reason, .. } => Ok(answer(node, &origin, Refusal::StaleEpoch, reason)),
            other => Err(Error::Indeterminate(format!("a full sync page applied as {other:?}"))),
        };
    }
    let shipment = Waiting {
        id: 0,
        after: shipment.after,
        through: shipment.entries.last().map_or(shipment.after, |e| e.origin_index),
        epoch: shipment.epoch,
        entries: shipment.entries,
        complete_through: shipment.complete_through,
        deadline: Instant::now() + SHIP_PREDECESSOR_WAIT,
        done: None,
    };
    match inboxes.deliver(node, &origin, shipment).await? {
        Delivered::Applied => Ok(answer(node, &origin, Refusal::None, String::new())),
        Delivered::Refused(reason) => Ok(answer(node, &origin, Refusal::StaleEpoch, reason)),
        Delivered::OutOfOrder(reason) => Ok(answer(node, &origin, Refusal::OutOfOrder, reason)),
    }
}

/// The changefeed shipments of each origin region waiting on this leader to
/// be proposed. One proposal per origin is under way at a time, and holds
/// only shipments that continue from what this region applied (a shipment
/// sent after another may arrive first), so they apply in order with no
/// gap. Shipments that arrive while a proposal is under way go into the
/// next one together: one Raft entry for many shipments, so the time a
/// commit takes does not bound how many shipments a second a region takes.
///
/// A proposal runs as its own task, owning the shipments it took: a sender
/// that gives up on one of them (its request is dropped) neither stops it
/// nor leaves the others unanswered. A shipment whose request is dropped
/// while it waits leaves the queue with it.
#[derive(Default)]
pub struct Inboxes(Mutex<HashMap<String, Arc<Inbox>>>);

/// One origin's queue on this node.
#[derive(Default)]
struct Inbox {
    /// `std::sync::Mutex`: never held across an `.await`.
    queue: Mutex<Queue>,
    /// The highest `through` of the shipments that arrived: one arriving
    /// below it came out of order (counted).
    arrived_through: AtomicU64,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Shipments taken into the proposal under way.
    taken: usize,
    /// A proposal task is running.
    proposing: bool,
    /// Shipments queued so far: numbers them (so a dropped request can
    /// take its own out), and tells the proposal task whether any arrived
    /// while it ran.
    arrivals: u64,
}

/// One shipment waiting for its turn.
struct Waiting {
    id: u64,
    after: u64,
    /// Its last entry's origin index (`after` when it has none).
    through: u64,
    epoch: u64,
    entries: Vec<RemoteEntry>,
    complete_through: u64,
    /// Past this, a shipment that nothing waiting continues up to is
    /// answered unapplied.
    deadline: Instant,
    /// Where its outcome goes (the request's handler).
    done: Option<oneshot::Sender<Result<Delivered, Error>>>,
}

/// What became of a shipment.
#[derive(Debug, Clone)]
enum Delivered {
    /// Applied (or it had nothing to apply).
    Applied,
    /// The batch was refused at apply (a stale epoch).
    Refused(String),
    /// Not applied: the shipments it continues from did not arrive in time.
    OutOfOrder(String),
}

impl Inboxes {
    /// Proposes `shipment` in order with the others of `origin`, alone or
    /// together with them, and says what became of it.
    async fn deliver(&self, node: &Arc<Node>, origin: &str, mut shipment: Waiting) -> Result<Delivered, Error> {
        let inbox = self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(origin.to_string()).or_default().clone();
        let arrived = inbox.arrived_through.fetch_max(shipment.through, Ordering::Relaxed);
        if shipment.through < arrived && !shipment.entries.is_empty() {
            crate::telemetry::shipment_out_of_order(origin);
        }
        let (done, mut delivered) = oneshot::channel();
        shipment.done = Some(done);
        let deadline = shipment.deadline;
        let id = {
            let mut queue = inbox.lock();
            let queued = queue.waiting.len() + queue.taken;
            if queued >= SHIPMENTS_WAITING_MAX {
                return Err(Error::Unavailable {
                    reason: format!("{queued} shipments from {origin} are waiting already (SHIPMENTS_WAITING_MAX)"),
                    retry_safe: true,
                });
            }
            let id = queue.arrivals;
            queue.arrivals += 1;
            shipment.id = id;
            queue.waiting.push(shipment);
            id
        };
        // Takes the shipment out of the queue if this request is dropped
        // while it waits.
        let _leave = Leave { inbox: &inbox, id };
        Inbox::start_proposal(&inbox, node, origin);
        // Until its deadline, the proposal task answers it; past it, only a
        // pass that proposes nothing does (see `propose_ready`), so an
        // overdue shipment asks for one now and then.
        let mut wake = deadline;
        loop {
            tokio::select! {
                outcome = &mut delivered => {
                    return outcome.unwrap_or_else(|_| Err(Error::Internal("a shipment was dropped unanswered".into())));
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    Inbox::start_proposal(&inbox, node, origin);
                    wake = Instant::now() + SHIP_PREDECESSOR_WAIT / 10;
                }
            }
        }
    }
}

/// Takes a waiting shipment out of its queue when its request is dropped.
struct Leave<'a> {
    inbox: &'a Inbox,
    id: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.inbox.lock().waiting.retain(|w| w.id != self.id);
    }
}

/// The proposal task of an inbox: if it stops without ending normally (a
/// panic), the next shipment can still start one.
struct ProposalTask<'a> {
    inbox: &'a Inbox,
    ended: bool,
}

impl Drop for ProposalTask<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut queue = self.inbox.lock();
            queue.proposing = false;
            queue.taken = 0;
        }
    }
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a proposal task unless one is under way. The task proposes
    /// as long as it gets on or shipments arrive while it runs, so a
    /// shipment queued while it runs is seen by it or starts the next one.
    fn start_proposal(inbox: &Arc<Inbox>, node: &Arc<Node>, origin: &str) {
        {
            let mut queue = inbox.lock();
            if queue.proposing || queue.waiting.is_empty() {
                return;
            }
            queue.proposing = true;
        }
        let (inbox, node, origin) = (inbox.clone(), node.clone(), origin.to_string());
        tokio::spawn(async move {
            let mut task = ProposalTask { inbox: &inbox, ended: false };
            loop {
                let seen = inbox.lock().arrivals;
                let progressed = inbox.propose_ready(&node, &origin).await;
                let mut queue = inbox.lock();
                if queue.waiting.is_empty() || (!progressed && queue.arrivals == seen) {
                    queue.proposing = false;
                    task.ended = true;
                    return;
                }
            }
        });
    }

    /// Proposes the waiting shipments that continue from what this region
    /// applied of `origin`, as one batch within the shipment limits, and
    /// answers them. When none does, answers those past their deadline
    /// with an error (what they continue from was lost on the way); the
    /// rest keep waiting. Whether it proposed or answered anything.
    async fn propose_ready(&self, node: &Node, origin: &str) -> bool {
        let mut position = node.reader().applied_from(origin);
        let (mut group, mut entries, mut bytes) = (Vec::new(), Vec::new(), 0);
        {
            let mut queue = self.lock();
            queue.waiting.sort_by_key(|w| w.after);
            let mut rest = Vec::new();
            for mut w in std::mem::take(&mut queue.waiting) {
                let size: usize = w.entries.iter().map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len)).sum();
                let fits = group.first().is_none_or(|first: &Waiting| {
                    w.epoch == first.epoch
                        && entries.len() + w.entries.len() <= SHIP_BATCH_ENTRIES_MAX
                        && bytes + size <= SHIP_BATCH_BYTES_MAX
                });
                if w.after <= position && fits {
                    entries.extend(w.entries.drain(..).filter(|e| e.origin_index > position));
                    bytes += size;
                    position = position.max(w.through);
                    group.push(w);
                } else {
                    rest.push(w);
                }
            }
            if group.is_empty() {
                let now = Instant::now();
                let (mut overdue, waiting): (Vec<_>, Vec<_>) = rest.into_iter().partition(|w| now >= w.deadline);
                queue.waiting = waiting;
                for w in overdue.iter_mut() {
                    w.answer(Ok(Delivered::OutOfOrder(format!(
                        "this shipment continues from {origin}'s write {} but this region has applied it only \
                         through {position}, and the shipments between did not arrive within {SHIP_PREDECESSOR_WAIT:?}",
                        w.after
                    ))));
                }
                return !overdue.is_empty();
            }
            queue.waiting = rest;
            queue.taken = group.len();
        }
        let Some(first) = group.first() else { return false };
        let complete_through = group.iter().map(|w| w.complete_through).max().unwrap_or(0);
        // An empty batch can still advance what this region holds of the
        // origin (`complete_through`); propose it when it would.
        let held = node.reader().region_state().complete_from.get(origin).copied().unwrap_or(0);
        let outcome = if entries.is_empty() && complete_through <= held {
            Ok(Delivered::Applied)
        } else {
            let cmd = Command::ApplyRemote {
                origin: origin.to_string(),
                epoch: first.epoch,
                entries,
                complete_through,
                collect_below_ms: collect_below_ms(node),
            };
            match node.propose(cmd).await {
                Ok(CommandResult::Remote { .. }) => Ok(Delivered::Applied),
                Ok(CommandResult::Rejected { reason, .. }) => Ok(Delivered::Refused(reason)),
                Ok(other) => Err(Error::Indeterminate(format!("a shipment applied as {other:?}"))),
                Err(e) => Err(e),
            }
        };
        self.lock().taken = 0;
        for mut w in group {
            w.answer(outcome.clone());
        }
        true
    }
}

impl Waiting {
    fn answer(&mut self, outcome: Result<Delivered, Error>) {
        if let Some(done) = self.done.take() {
            // Ignored: the sender may have given up on this shipment.
            let _ = done.send(outcome);
        }
    }
}

/// Tombstones stamped before this (physical milliseconds) may be collected:
/// this node's physical clock less twice the maximum clock offset, so any
/// node's clock stamps a later write to the key above the tombstone that
/// peer regions keep (see `Command::AckShipped`).
fn collect_below_ms(node: &Node) -> u64 {
    let clock = node.clock();
    clock.wall_ms().saturating_sub(2 * clock.offset_ms_max())
}

/// This region's answer to `origin`: how far it applied the origin, and its
/// view of the roles.
fn answer(node: &Node, origin: &str, refused: Refusal, reason: String) -> ShipAnswer {
    let region = node.reader().region_state();
    ShipAnswer {
        applied_through: region.applied_from.get(origin).copied().unwrap_or(0),
        epoch: region.epoch,
        primary: node.reader().primary(),
        refused,
        reason,
        receiver_index: region.last_local_write,
        in_order: true,
    }
}

/// How often the setup task looks at the replicated setup.
const SETUP_INTERVAL: Duration = Duration::from_millis(200);

/// How often a node whose file disagrees with the replicated setup says so.
const SETUP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Starts the task that makes the region's replication setup replicated
/// state: on the leader of a region that has none yet, it proposes this
/// node's file's setup (the first such proposal to commit wins; a later,
/// different one is refused at apply). On any node whose file disagrees
/// with the replicated setup (an operator changed it with `nines region
/// configure`), it says so now and then: the node refuses to restart until
/// its file matches.
pub fn spawn_setup(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut warned: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(SETUP_INTERVAL) => {}
            }
            match node.reader().setup() {
                None if node.check_leader().is_ok() => {
                    let setup = node.file_setup().clone();
                    match node.propose(Command::Configure { setup: setup.clone(), replace: false }).await {
                        Ok(CommandResult::None) => tracing::info!(?setup, "proposed this region's replication setup"),
                        Ok(other) => tracing::warn!(?other, "the region's replication setup was not taken"),
                        Err(e) => {
                            tracing::warn!(error = %e, "proposing the region's replication setup failed; retrying")
                        }
                    }
                }
                Some(replicated) => {
                    let file = node.file_setup();
                    if let Some(field) = file.differing_field(&replicated)
                        && warned.is_none_or(|w| w.elapsed() >= SETUP_WARNING_INTERVAL)
                    {
                        tracing::error!(
                            field,
                            file = %file.describe(),
                            replicated = %replicated.describe(),
                            "this node's configuration disagrees with the region's replicated setup; \
                             it will refuse to restart until its file matches"
                        );
                        warned = Some(Instant::now());
                    }
                }
                None => {}
            }
        }
    })
}

/// How often the resync task looks for divergent keys waiting for the new
/// primary's values.
const RESYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the task that, on the region's leader, overwrites divergent keys
/// with the new primary's values until the region state says it is done.
/// Driven by replicated state, so a leader change resumes it.
/// The RPO guard on the primary region's leader: every probe it measures
/// how old the oldest write is that no secondary has acknowledged (the best
/// secondary's lag), and past `max_rpo` makes the node refuse writes,
/// naming the lag, until a secondary catches up. Writes acknowledged while
/// the guard is open are at most `max_rpo` plus one probe old when it
/// closes. Off (`None`) unless active-passive with `max_rpo` set.
pub fn spawn_rpo_guard(
    node: Arc<Node>,
    max_rpo: Duration,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if max_rpo.is_zero() || node.mode() != Mode::ActivePassive || node.peers().is_empty() {
        return None;
    }
    let probe = (max_rpo / 10).clamp(Duration::from_millis(10), Duration::from_millis(200));
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(probe) => {}
                _ = stop.changed() => return,
            }
            let refusal = if node.check_leader().is_ok() && node.region_role() == "primary" {
                match node.replication_lag() {
                    Ok(lags) => {
                        let best = lags.iter().min_by_key(|l| l.lag_ms);
                        best.filter(|l| l.lag_ms > max_rpo.as_millis() as u64).map(|l| {
                            format!(
                                "RPO guard: no secondary region has acknowledged this primary's writes of the last \
                                 {} ms ({} writes behind in {}, the closest); replication.max_rpo is {max_rpo:?}. \
                                 Writes resume when a secondary catches up",
                                l.lag_ms, l.lag_entries, l.region
                            )
                        })
                    }
                    Err(e) => Some(format!("RPO guard: the replication lag cannot be read: {e}")),
                }
            } else {
                None
            };
            let refusing = refusal.is_some();
            if refusing != node.stats().rpo_refusal().is_some() {
                match &refusal {
                    Some(reason) => tracing::warn!(%reason, "RPO guard: refusing writes"),
                    None => tracing::info!("RPO guard: a secondary caught up; taking writes again"),
                }
            }
            metrics::gauge!("nines_rpo_guard_refusing").set(f64::from(u8::from(refusing)));
            node.stats().set_rpo_refusal(refusal);
        }
    }))
}

pub fn spawn_resync(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
            }
            if *stop.borrow() {
                return;
            }
            let region = node.reader().region_state();
            if !region.resync_pending || node.check_leader().is_err() {
                continue;
            }
            if let Err(e) = resync_once(&node, region.epoch).await {
                tracing::warn!(error = %e, "resync of divergent keys failed; retrying");
            }
        }
    })
}

/// One pass over the divergence records of this epoch and every earlier
/// one (skipped when this region is the primary again): reads each key
/// at the new primary (linearizable, so no stale replica answers) and
/// proposes the values in batches of at most `RESYNC_BATCH_KEYS_MAX` keys and
/// `RESYNC_BATCH_BYTES_MAX` bytes (each batch is one log entry); the last
/// batch marks the resync done.
async fn resync_once(node: &Node, epoch: u64) -> Result<(), Error> {
    let primary = node.reader().primary();
    if primary == node.region() {
        // Promoted again before the resync ran: no other region's values
        // can be taken, and this region's divergent values would stay here
        // alone. They ship to every region as new writes instead.
        let reshipped = reship_divergent(node, epoch).await?;
        node.propose(Command::Resync { entries: Vec::new(), done: true }).await?;
        if reshipped > 0 {
            tracing::warn!(
                keys = reshipped,
                "primary again before the divergent keys were resynchronised: their values were written again, to \
                 reach every region (they stay in the divergence record)"
            );
        }
        return Ok(());
    }
    let region = node
        .peers()
        .iter()
        .find(|p| p.name == primary)
        .cloned()
        .ok_or_else(|| Error::Internal(format!("primary {primary} is not a peer region")))?;
    if node.faults().sends_blocked(&primary) {
        return Err(Error::Unavailable {
            reason: format!("traffic to region {primary} is blocked (fault injection)"),
            retry_safe: true,
        });
    }
    let client = region_client(&region.name, &region.endpoints)?;
    let mut batch: Vec<ResyncEntry> = Vec::new();
    let (mut bytes, mut keys) = (0, 0);
    let mut start = Some(0);
    while let Some(from) = start {
        let (records, next) = node
            .reader()
            .divergent(from, DIVERGENT_LIST_MAX as usize, DIVERGENT_PAGE_BYTES_MAX)
            .map_err(Error::from)?;
        start = next;
        // Every demotion up to this epoch: two failovers close together
        // leave records of the earlier one that no pass has resynced yet.
        for record in records.iter().filter(|r| r.demoted_at_epoch <= epoch) {
            let entry = read_at_primary(&client, &primary, record).await?;
            let size = entry.key.len() + entry.value.as_ref().map_or(0, Vec::len);
            if !batch.is_empty() && (batch.len() >= RESYNC_BATCH_KEYS_MAX || bytes + size > RESYNC_BATCH_BYTES_MAX) {
                node.propose(Command::Resync { entries: std::mem::take(&mut batch), done: false }).await?;
                bytes = 0;
            }
            bytes += size;
            keys += 1;
            batch.push(entry);
        }
    }
    node.propose(Command::Resync { entries: batch, done: true }).await?;
    tracing::info!(keys, %primary, "divergent keys resynchronised from the new primary");
    Ok(())
}

/// On a region that is primary again with divergent keys never
/// resynchronised: writes each key that still holds its divergent value
/// again, as a new local write (a compare-and-swap on that value, so a
/// client's newer write wins; a delete for a divergent delete), so it
/// ships to every region and they converge. Returns how many were written.
async fn reship_divergent(node: &Node, epoch: u64) -> Result<u64, Error> {
    let mut reshipped = 0;
    let mut start = Some(0);
    while let Some(from) = start {
        let (records, next) = node
            .reader()
            .divergent(from, DIVERGENT_LIST_MAX as usize, DIVERGENT_PAGE_BYTES_MAX)
            .map_err(Error::from)?;
        start = next;
        for record in records.iter().filter(|r| r.demoted_at_epoch <= epoch) {
            let current = node.reader().get(&record.key).map_err(Error::from)?;
            let Some(current) = current.filter(|c| c.version == record.version) else { continue };
            let key = record.key.clone();
            match current.value {
                Some(value) => {
                    let expected = Expected::Write { hlc: record.version.hlc, origin: record.version.origin.clone() };
                    node.write(|hlc| Command::CompareAndSwap { key, value, expected, hlc }).await?;
                }
                // The window between the read above and this delete is the
                // one place a client's write could be undone: there is no
                // compare-and-delete.
                None => {
                    node.write(|hlc| Command::Delete { key, hlc }).await?;
                }
            }
            reshipped += 1;
        }
    }
    Ok(reshipped)
}

/// A divergent key's value as the new primary has it.
async fn read_at_primary(
    client: &Client,
    primary: &str,
    record: &crate::storage::state_machine::DivergentRecord,
) -> Result<ResyncEntry, Error> {
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
    Ok(ResyncEntry { key: record.key.clone(), value, hlc, origin, divergent: record.version.clone() })
}
