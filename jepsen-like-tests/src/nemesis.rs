//! Nemeses: the faults a run injects, on a seeded schedule.
//!
//! A run alternates quiet periods and fault windows. Each window applies one
//! entry of the plan (`--nemesis kill,partition+clock` has two entries:
//! `kill` alone, then `partition` and `clock` together), chosen at random,
//! holds it, then heals everything: paused nodes continue, killed nodes
//! restart, every node's fault hooks are cleared.
//!
//! In `--docker` runs the faults are docker's instead (`docker pause`,
//! `docker kill`, `docker network disconnect`; see [`crate::compose`]), and
//! only the nemeses in [`DOCKER`] exist.
//!
//! Network faults are link rules inside the nodes (see `nines::faults`):
//! a rule drops or delays what one node sends to one peer of its region,
//! and a region can be cut off from another's replication traffic. Process
//! faults are signals from outside: kill -9 (restarted at heal) and
//! SIGSTOP (SIGCONT at heal).
//!
//! Invariants:
//! - Every fault is logged with its start and end time (run-relative).
//! - A window starts only if its hold ends a second before the run's time
//!   is up; healing it may run past that.
//! - The same seed makes the same choices (which nodes, which variant,
//!   how long); only which node leads (and, in a failover run, which
//!   region is primary) at that moment can differ.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::bail;
use nines::authority::{AUTHORITY_FAULT, CONTROLLER_FAULT};
use nines_proto::v1::{LinkFault, SetFaultsRequest};
use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::history::Recorder;

/// Quiet time before the first fault: clients reach a steady state first.
const FIRST_QUIET: Duration = Duration::from_secs(2);
/// How long a fault window lasts, chosen uniformly in this range (ms):
/// far longer than an election (under half a second) so faults have their
/// full effect.
const FAULT_MS: std::ops::Range<u64> = 4_000..8_000;
/// Quiet time between windows (ms): long enough for a recovery to show.
const QUIET_MS: std::ops::Range<u64> = 2_000..4_000;
/// Bound on healing: restarting nodes and clearing their hooks.
const HEAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra one-way delay the `latency` nemesis adds per link (ms). A round
/// trip stays under the default 40 ms heartbeat: openraft times every
/// AppendEntries RPC out after one heartbeat interval (the transport gives
/// up at three quarters of it), so a longer delay would drop every message
/// and act as a partition rather than a slow network.
const LATENCY_MS: std::ops::Range<u32> = 2..12;

/// The most extra wait of one shipment under `ship-reorder` (ms): several
/// times the 5 ms between two shipments, so most overtake one another.
const SHIP_JITTER_MS: u32 = 60;

/// Clock offsets of the `clock` nemesis (ms, either sign): well beyond
/// `clock_offset_max` (500 ms) at the top, so both sides of it are tried.
const CLOCK_OFFSET_MS: std::ops::Range<i64> = 200..2_000;
/// How far the `clock-jump` nemesis moves a leader's clock ahead (ms): 2 to
/// 5 minutes, far beyond `clock_offset_max`. The node notices only when the
/// clock steps back at heal; it then refuses to stamp and steps down until
/// its physical clock has caught up, minutes later (past the run's end).
const CLOCK_JUMP_MS: std::ops::Range<i64> = 120_000..300_000;

/// How late a slowed leader syncs its log (ms), in `slow-sync`.
const SLOW_SYNC_MS: std::ops::Range<u32> = 200..800;
/// How long the slowed leader runs before its region's power is cut (ms):
/// often before its first late sync lands.
const SLOW_SYNC_CUT_AFTER_MS: std::ops::Range<u64> = 100..600;
/// How long a leader cut off from one follower keeps committing with the
/// other before it is killed, in `kill-leader-lag` (ms): short of the 280
/// ms after which the cut-off follower starts campaigning on its own.
const LAG_BEFORE_KILL_MS: std::ops::Range<u64> = 50..250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nemesis {
    Kill,
    Pause,
    /// A random one of the partition variants below (region only with 2+ regions).
    Partition,
    PartitionHalves,
    PartitionLeader,
    PartitionRing,
    PartitionAz,
    PartitionRegion,
    PartitionRegionOneWay,
    PartitionOneWay,
    Latency,
    Clock,
    /// One leader's clock jumps minutes ahead for the window, then steps
    /// back at heal.
    ClockJump,
    AzLoss,
    RegionLoss,
    /// One or two nodes of a region (half the time with its leader) lose
    /// power: killed, and with their storage keeping only what was synced.
    PowerCut,
    /// The failover controller that decides is killed (failover runs);
    /// restarted at heal.
    ControllerKill,
    /// One region's shipments to the others each wait a random extra time,
    /// so shipments in flight together arrive out of order.
    ShipReorder,
    /// Every node of a region gets, on its peer port, what a broken or
    /// hostile peer could send: a shipment at epoch u64::MAX, a snapshot
    /// chunk far past any size, a malformed Raft message. Each must be
    /// refused by name (the run stops otherwise), and no node may die of it.
    HostilePeer,
    /// Every node of a region builds a snapshot at the same moment and drops
    /// its log below it: no fault at all, only the heaviest disk work a node
    /// does, on every node at once. It must not cost an election (see
    /// [`keeps_leaders`]).
    Compact,
    /// A region's leader syncs its log hundreds of ms late (a slow disk) and
    /// is cut off from one follower; moments later the whole region loses
    /// power. The leader counts its own appends before it syncs them, so the
    /// other follower alone holds writes openraft counted committed, and the
    /// leader comes back without them: no such write may have been answered
    /// or applied anywhere (the cut-off follower can win the next election
    /// without them), and the leader must not lead the same term again
    /// (its next entries would reuse the lost ones' log ids).
    SlowSync,
    /// A region's leader is cut off from one follower, which falls behind
    /// while the other keeps committing with the leader; moments later the
    /// leader is killed. The follower that is behind may campaign first,
    /// with an older log: the other refuses it and must take over at once
    /// (`nines::takeover`), not after its own election timeout; no
    /// acknowledged write may be lost. The fault's RTO shows which.
    KillLeaderLag,
}

/// Every nemesis name `--nemesis` accepts.
pub const NAMES: [(&str, Nemesis); 22] = [
    ("kill", Nemesis::Kill),
    ("pause", Nemesis::Pause),
    ("partition", Nemesis::Partition),
    ("partition-halves", Nemesis::PartitionHalves),
    ("partition-leader", Nemesis::PartitionLeader),
    ("partition-ring", Nemesis::PartitionRing),
    ("partition-az", Nemesis::PartitionAz),
    ("partition-region", Nemesis::PartitionRegion),
    ("partition-region-one-way", Nemesis::PartitionRegionOneWay),
    ("partition-one-way", Nemesis::PartitionOneWay),
    ("latency", Nemesis::Latency),
    ("clock", Nemesis::Clock),
    ("clock-jump", Nemesis::ClockJump),
    ("az-loss", Nemesis::AzLoss),
    ("region-loss", Nemesis::RegionLoss),
    ("power-cut", Nemesis::PowerCut),
    ("controller-kill", Nemesis::ControllerKill),
    ("ship-reorder", Nemesis::ShipReorder),
    ("hostile-peer", Nemesis::HostilePeer),
    ("compact", Nemesis::Compact),
    ("slow-sync", Nemesis::SlowSync),
    ("kill-leader-lag", Nemesis::KillLeaderLag),
];

/// The nemeses a `--docker` run can inject: those docker itself can do to
/// the compose cluster (the others need the nodes' fault hooks).
pub const DOCKER: [Nemesis; 4] = [Nemesis::Pause, Nemesis::Kill, Nemesis::RegionLoss, Nemesis::PartitionRegion];

impl Nemesis {
    pub fn name(self) -> &'static str {
        NAMES.iter().find(|(_, n)| *n == self).map_or("?", |(s, _)| s)
    }
}

/// Whether a run under `plan` must keep every region's first leader: no
/// entry stops, pauses, cuts off or slows a node, so an election (a term
/// rising) means a node stalled by itself long enough for a follower to
/// give up on its leader. `none` qualifies, and so do `compact` (all nodes
/// compacting at once) and `ship-reorder` (only cross-region shipments
/// wait).
pub fn keeps_leaders(plan: &[Vec<Nemesis>]) -> bool {
    plan.iter().flatten().all(|n| matches!(n, Nemesis::Compact | Nemesis::ShipReorder))
}

/// Parses `--nemesis`: entries separated by `,`, each one or more names
/// joined by `+` (applied together). `none` is the empty plan.
pub fn parse_plan(spec: &str) -> anyhow::Result<Vec<Vec<Nemesis>>> {
    if spec.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut plan = Vec::new();
    for entry in spec.split(',') {
        let mut together = Vec::new();
        for name in entry.split('+') {
            let name = name.trim();
            let Some((_, n)) = NAMES.iter().find(|(s, _)| *s == name) else {
                let known: Vec<&str> = NAMES.iter().map(|(s, _)| *s).collect();
                bail!("unknown nemesis {name:?}; known: none, {}", known.join(", "));
            };
            if together.contains(n) {
                bail!("nemesis {name:?} appears twice in {entry:?}");
            }
            together.push(*n);
        }
        plan.push(together);
    }
    Ok(plan)
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub nemesis: String,
    /// The region the fault hit; empty when it hit nodes of several.
    pub region: String,
    /// What exactly was done, for a person.
    pub detail: String,
    pub start_us: u64,
    /// When the heal completed.
    pub end_us: u64,
}

/// Link rules, cut regions, clock offsets and ship jitter of one window, per node.
#[derive(Default)]
struct Net {
    links: BTreeMap<u64, BTreeMap<u64, Option<u32>>>,
    blocked: BTreeMap<u64, BTreeSet<String>>,
    /// Regions a node does not ship to (one-way region cuts).
    send_blocked: BTreeMap<u64, BTreeSet<String>>,
    clock: BTreeMap<u64, i64>,
    /// The most extra wait of each shipment a node sends (ms).
    ship_jitter: BTreeMap<u64, u32>,
    /// How late a node syncs its log (ms).
    log_sync_delay: BTreeMap<u64, u32>,
}

impl Net {
    /// `from` drops everything it sends to `to`.
    fn cut(&mut self, from: u64, to: u64) {
        self.links.entry(from).or_default().insert(to, None);
    }

    fn cut_both(&mut self, a: u64, b: u64) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Cuts every link between a node of `side` and a node of `other`, both ways.
    fn cut_between(&mut self, side: &[u64], other: &[u64]) {
        for a in side {
            for b in other.iter().filter(|b| !side.contains(b)) {
                self.cut_both(*a, *b);
            }
        }
    }

    /// Delays what `from` sends to `to`, unless that link is cut.
    fn delay(&mut self, from: u64, to: u64, ms: u32) {
        self.links.entry(from).or_default().entry(to).or_insert(Some(ms));
    }

    fn is_empty(&self) -> bool {
        self.links.is_empty()
            && self.blocked.is_empty()
            && self.send_blocked.is_empty()
            && self.clock.is_empty()
            && self.ship_jitter.is_empty()
            && self.log_sync_delay.is_empty()
    }

    fn request(&self, id: u64) -> SetFaultsRequest {
        SetFaultsRequest {
            blocked_regions: self.blocked.get(&id).map(|b| b.iter().cloned().collect()).unwrap_or_default(),
            send_blocked_regions: self.send_blocked.get(&id).map(|b| b.iter().cloned().collect()).unwrap_or_default(),
            clock_offset_ms: self.clock.get(&id).copied().unwrap_or(0),
            ship_jitter_ms: self.ship_jitter.get(&id).copied().unwrap_or(0),
            log_sync_delay_ms: self.log_sync_delay.get(&id).copied().unwrap_or(0),
            links: self
                .links
                .get(&id)
                .map(|l| {
                    l.iter()
                        .map(|(to, rule)| LinkFault { to_node: *to, drop: rule.is_none(), delay_ms: rule.unwrap_or(0) })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// How long fault windows and the quiet between them last (ms).
#[derive(Debug, Clone)]
pub struct Schedule {
    pub fault_ms: std::ops::Range<u64>,
    pub quiet_ms: std::ops::Range<u64>,
}

impl Schedule {
    /// Windows long enough for a recovery to show in the plots.
    pub fn normal() -> Self {
        Schedule { fault_ms: FAULT_MS, quiet_ms: QUIET_MS }
    }

    /// Short windows, for many fault cycles a minute (kill and power-cut
    /// loops): a node is back and has caught up before the next one.
    pub fn fast() -> Self {
        Schedule { fault_ms: 500..1_500, quiet_ms: 1_000..1_500 }
    }
}

/// Runs the plan's windows until `until`, then returns every fault it injected.
pub async fn run(
    cluster: &mut Cluster,
    plan: &[Vec<Nemesis>],
    schedule: &Schedule,
    rng: &mut StdRng,
    recorder: &Recorder,
    until: Instant,
) -> anyhow::Result<Vec<FaultRecord>> {
    let mut faults = Vec::new();
    if plan.is_empty() {
        tokio::time::sleep_until(until.into()).await;
        return Ok(faults);
    }
    tokio::time::sleep(FIRST_QUIET).await;
    loop {
        let hold = Duration::from_millis(rng.random_range(schedule.fault_ms.clone()));
        let quiet = Duration::from_millis(rng.random_range(schedule.quiet_ms.clone()));
        // A window must fit, with a second to spare for its heal.
        if Instant::now() + hold + Duration::from_secs(1) > until {
            break;
        }
        let entry = &plan[rng.random_range(0..plan.len())];
        let mut net = Net::default();
        let mut details = Vec::new();
        for n in entry {
            let (region, detail) = apply(*n, cluster, &mut net, rng).await?;
            details.push((n.name(), region, detail));
        }
        if !net.is_empty() {
            for id in cluster.ids() {
                if cluster.running(id) && !cluster.paused(id) {
                    // A node that cannot take its rules (busy restarting,
                    // say) is said so; the fault is then partial.
                    if let Err(e) = cluster.set_faults(id, net.request(id)).await {
                        eprintln!("  could not set faults on node {id}: {e:#}");
                    }
                }
            }
        }
        // The fault starts once all of it is in place: an operation that
        // began before the last rule was set may not have met the fault.
        let start_us = recorder.now_us();
        for (name, _, detail) in &details {
            eprintln!("[{:>7.1}s] fault {name}: {detail}", start_us as f64 / 1e6);
        }
        tokio::time::sleep(hold).await;
        cluster.heal(HEAL_TIMEOUT).await?;
        let end_us = recorder.now_us();
        eprintln!("[{:>7.1}s] healed", end_us as f64 / 1e6);
        for (name, region, detail) in details {
            faults.push(FaultRecord { nemesis: name.to_string(), region, detail, start_us, end_us });
        }
        let next = Instant::now() + quiet;
        if next >= until {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
    }
    tokio::time::sleep_until(until.into()).await;
    Ok(faults)
}

/// A region chosen at random; in a failover run, three times in four the
/// primary (losing it is what failover is for).
async fn pick_region(cluster: &Cluster, rng: &mut StdRng) -> String {
    let any = cluster.region_order[rng.random_range(0..cluster.region_order.len())].clone();
    if cluster.has_authority() && rng.random_bool(0.75) {
        return cluster.primary_region().await.unwrap_or(any);
    }
    any
}

/// Half the time a region's leader (failover is what most faults test),
/// otherwise any node of that region.
async fn pick_node(cluster: &Cluster, region: &str, rng: &mut StdRng) -> u64 {
    let ids = &cluster.regions[region];
    let any = ids[rng.random_range(0..ids.len())];
    if rng.random_bool(0.5) { cluster.leader_of(region).await.unwrap_or(any) } else { any }
}

/// Cuts `leader` off from one of its followers among `ids`, chosen at
/// random, both ways, and sets the two nodes' rules from `net` at once
/// rather than after `apply` returns (the nemeses that use it act on the
/// cut within the window). The follower, when the region has one.
async fn cut_off_a_follower(
    cluster: &Cluster,
    net: &mut Net,
    rng: &mut StdRng,
    leader: u64,
    ids: &[u64],
) -> Option<u64> {
    let followers: Vec<u64> = ids.iter().copied().filter(|id| *id != leader).collect();
    let cut_off = (!followers.is_empty()).then(|| followers[rng.random_range(0..followers.len())]);
    if let Some(f) = cut_off {
        net.cut_both(leader, f);
    }
    for id in std::iter::once(leader).chain(cut_off) {
        if let Err(e) = cluster.set_faults(id, net.request(id)).await {
            eprintln!("  could not set faults on node {id}: {e:#}");
        }
    }
    cut_off
}

/// How a report names node `id` of `region`: says whether it leads (asked
/// before the fault, which may silence it).
async fn describe(cluster: &Cluster, region: &str, id: u64) -> String {
    match cluster.leader_of(region).await == Some(id) {
        true => format!("node {id} (leader of {region})"),
        false => format!("node {id} ({region})"),
    }
}

/// Applies one nemesis: process faults at once, network faults into `net`.
/// Returns the region it hit (empty for several) and what it did.
async fn apply(
    nemesis: Nemesis,
    cluster: &mut Cluster,
    net: &mut Net,
    rng: &mut StdRng,
) -> anyhow::Result<(String, String)> {
    let region = pick_region(cluster, rng).await;
    let ids = cluster.regions[&region].clone();
    let nemesis = if nemesis == Nemesis::Partition {
        let mut variants = vec![
            Nemesis::PartitionHalves,
            Nemesis::PartitionLeader,
            Nemesis::PartitionRing,
            Nemesis::PartitionAz,
            Nemesis::PartitionOneWay,
        ];
        if cluster.region_order.len() > 1 {
            variants.push(Nemesis::PartitionRegion);
            variants.push(Nemesis::PartitionRegionOneWay);
        }
        variants[rng.random_range(0..variants.len())]
    } else {
        nemesis
    };
    let detail = match nemesis {
        Nemesis::Kill => {
            let id = pick_node(cluster, &region, rng).await;
            let node = describe(cluster, &region, id).await;
            cluster.kill(id);
            format!("kill -9 {node}; restarted at heal")
        }
        Nemesis::Pause => {
            let id = pick_node(cluster, &region, rng).await;
            let node = describe(cluster, &region, id).await;
            cluster.signal_pause(id, true)?;
            match cluster.is_compose() {
                true => format!("docker pause {node}; unpaused at heal"),
                false => format!("SIGSTOP {node}; SIGCONT at heal"),
            }
        }
        Nemesis::PartitionHalves => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let (minority, majority) = shuffled.split_at(ids.len() / 2);
            net.cut_between(minority, majority);
            format!("partition-halves in {region}: {minority:?} | {majority:?}")
        }
        Nemesis::PartitionLeader => {
            let Some(leader) = cluster.leader_of(&region).await else {
                return Ok((region.clone(), format!("partition-leader: {region} has no leader; nothing cut")));
            };
            net.cut_between(&[leader], &ids);
            format!("partition-leader: node {leader} (leader of {region}) cut off from the rest of {region}")
        }
        Nemesis::PartitionRing => {
            // Each node keeps its two ring neighbours: every node sees a
            // majority, but no two see the same one. With 3 nodes everyone is
            // a neighbour, so one link (first-last) is cut instead.
            let mut ring = ids.clone();
            ring.shuffle(rng);
            let n = ring.len();
            let mut cut = Vec::new();
            for i in 0..n {
                for j in (i + 1)..n {
                    let neighbours = j == i + 1 || (i == 0 && j == n - 1);
                    if !neighbours || (n == 3 && i == 0 && j == 2) {
                        net.cut_both(ring[i], ring[j]);
                        cut.push((ring[i], ring[j]));
                    }
                }
            }
            format!("partition-ring in {region}: ring {ring:?}, links cut {cut:?}")
        }
        Nemesis::PartitionAz => {
            let az = cluster.az_of(ids[rng.random_range(0..ids.len())]).to_string();
            let inside: Vec<u64> = ids.iter().copied().filter(|id| cluster.az_of(*id) == az).collect();
            net.cut_between(&inside, &ids);
            format!("partition-az: AZ {az} (nodes {inside:?}) cut off from the rest of {region}")
        }
        Nemesis::PartitionOneWay => {
            let Some(leader) = cluster.leader_of(&region).await else {
                return Ok((region.clone(), format!("partition-one-way: {region} has no leader; nothing cut")));
            };
            for b in ids.iter().filter(|b| **b != leader) {
                net.cut(leader, *b);
            }
            format!("partition-one-way: node {leader} (leader of {region}) can hear its peers but not reach them")
        }
        Nemesis::PartitionRegion if cluster.is_compose() => {
            cluster.cut_region_off(&region)?;
            format!(
                "partition-region: every node of {region} taken off the shared network (docker network \
                 disconnect): cut off from the other region, the authority and the controller; clients on the \
                 host still reach it"
            )
        }
        Nemesis::PartitionRegion => {
            if cluster.region_order.len() < 2 {
                return Ok((region, "partition-region: one region only; nothing cut".into()));
            }
            let others: Vec<String> = cluster.region_order.iter().filter(|r| **r != region).cloned().collect();
            // With an authority, the region is cut off from it and from the
            // controllers too: the other regions' side of the cut holds them.
            let beyond: Vec<String> = if cluster.has_authority() {
                vec![AUTHORITY_FAULT.to_string(), CONTROLLER_FAULT.to_string()]
            } else {
                Vec::new()
            };
            for id in cluster.data_ids() {
                if cluster.region_of(id) == region {
                    net.blocked.entry(id).or_default().extend(others.iter().chain(&beyond).cloned());
                } else {
                    net.blocked.entry(id).or_default().insert(region.clone());
                }
            }
            let and_more = if beyond.is_empty() { "" } else { ", the authority and the controllers" };
            format!("partition-region: {region} cut off from {others:?}{and_more} (both ways)")
        }
        Nemesis::PartitionRegionOneWay => {
            if cluster.region_order.len() < 2 {
                return Ok((region, "partition-region-one-way: one region only; nothing cut".into()));
            }
            let others: Vec<String> = cluster.region_order.iter().filter(|r| **r != region).cloned().collect();
            for id in cluster.regions[&region].clone() {
                net.send_blocked.entry(id).or_default().extend(others.iter().cloned());
            }
            format!("partition-region-one-way: {region}'s writes do not reach {others:?}; theirs still reach {region}")
        }
        Nemesis::Latency => {
            let mut added = Vec::new();
            for r in &cluster.region_order {
                let ids = &cluster.regions[r];
                for a in ids {
                    for b in ids.iter().filter(|b| *b != a) {
                        let ms = rng.random_range(LATENCY_MS);
                        net.delay(*a, *b, ms);
                        added.push(ms);
                    }
                }
            }
            let (lo, hi) = (added.iter().min().copied().unwrap_or(0), added.iter().max().copied().unwrap_or(0));
            format!("latency: every link inside each region delayed by {lo}-{hi} ms")
        }
        Nemesis::Clock => {
            let mut all = cluster.ids();
            all.shuffle(rng);
            let chosen = &all[..all.len().div_ceil(2)];
            let mut offsets = Vec::new();
            for id in chosen {
                let ms = rng.random_range(CLOCK_OFFSET_MS) * if rng.random_bool(0.5) { 1 } else { -1 };
                net.clock.insert(*id, ms);
                offsets.push(format!("node {id} {ms:+} ms"));
            }
            format!("clock: {}", offsets.join(", "))
        }
        Nemesis::ClockJump => {
            let Some(leader) = cluster.leader_of(&region).await else {
                return Ok((region.clone(), format!("clock-jump: {region} has no leader; no clock moved")));
            };
            let ms = rng.random_range(CLOCK_JUMP_MS);
            net.clock.insert(leader, ms);
            format!("clock-jump: node {leader} (leader of {region}) {:+} s ahead; steps back at heal", ms / 1000)
        }
        Nemesis::AzLoss => {
            let az = cluster.az_of(ids[rng.random_range(0..ids.len())]).to_string();
            let inside: Vec<u64> = ids.iter().copied().filter(|id| cluster.az_of(*id) == az).collect();
            for id in &inside {
                cluster.kill(*id);
            }
            format!("az-loss: AZ {az} (nodes {inside:?}) killed; restarted at heal")
        }
        Nemesis::PowerCut => {
            // With power-loss storage a kill is a power cut: only what each
            // node synced survives.
            // One node, two, or (a quarter of the time) the whole region at
            // once: then only what the logs synced holds acknowledged writes.
            let first = pick_node(cluster, &region, rng).await;
            let mut cut = vec![first];
            if rng.random_bool(0.25) {
                cut = ids.clone();
            } else if ids.len() > 2 && rng.random_bool(0.5) {
                let others: Vec<u64> = ids.iter().copied().filter(|id| *id != first).collect();
                cut.push(others[rng.random_range(0..others.len())]);
            }
            for id in &cut {
                cluster.kill(*id);
            }
            format!("power-cut: nodes {cut:?} ({region}) lost power; unsynced writes gone; restarted at heal")
        }
        Nemesis::SlowSync => {
            let Some(leader) = cluster.leader_of(&region).await else {
                return Ok((region.clone(), format!("slow-sync: {region} has no leader; nothing slowed")));
            };
            let ms = rng.random_range(SLOW_SYNC_MS);
            net.log_sync_delay.insert(leader, ms);
            // In place now: the power cut comes inside the window.
            let cut_off = cut_off_a_follower(cluster, net, rng, leader, &ids).await;
            let after = rng.random_range(SLOW_SYNC_CUT_AFTER_MS);
            tokio::time::sleep(Duration::from_millis(after)).await;
            for id in &ids {
                cluster.kill(*id);
            }
            let cut = cut_off.map_or(String::new(), |f| format!(", cut off from node {f}"));
            format!(
                "slow-sync: node {leader} (leader of {region}) synced its log {ms} ms late{cut}; {after} ms later \
                 every node of {region} ({ids:?}) lost power (unsynced writes gone); restarted at heal"
            )
        }
        Nemesis::KillLeaderLag => {
            let Some(leader) = cluster.leader_of(&region).await else {
                return Ok((region.clone(), format!("kill-leader-lag: {region} has no leader; nothing killed")));
            };
            if ids.len() < 3 {
                return Ok((
                    region.clone(),
                    format!("kill-leader-lag: {region} has under two followers; nothing done"),
                ));
            }
            // In place now: the follower must fall behind before the kill.
            let behind = cut_off_a_follower(cluster, net, rng, leader, &ids).await.expect("two followers or more");
            let after = rng.random_range(LAG_BEFORE_KILL_MS);
            tokio::time::sleep(Duration::from_millis(after)).await;
            cluster.kill(leader);
            format!(
                "kill-leader-lag: node {leader} (leader of {region}) cut off from node {behind} (to fall behind); \
                 {after} ms later kill -9 node {leader}; restarted at heal"
            )
        }
        Nemesis::RegionLoss => {
            for id in &ids {
                cluster.kill(*id);
            }
            format!("region-loss: every node of {region} ({ids:?}) killed; restarted at heal")
        }
        Nemesis::ShipReorder => {
            if cluster.region_order.len() < 2 {
                return Ok((region, "ship-reorder: one region only; nothing shipped".into()));
            }
            for id in cluster.regions[&region].clone() {
                net.ship_jitter.insert(id, SHIP_JITTER_MS);
            }
            format!(
                "ship-reorder: each shipment {region} sends waits a random 0-{SHIP_JITTER_MS} ms more, so they overtake each other"
            )
        }
        Nemesis::HostilePeer => {
            let mut refused = Vec::new();
            for id in &ids {
                let url = nines::types::NodeInfo::listening(&cluster.nodes[id].config).peer_addr;
                refused.push(format!("node {id}: {}", hostile_peer_input(&url).await?));
            }
            format!(
                "hostile-peer: every node of {region} sent a shipment at epoch u64::MAX, a snapshot chunk at \
                 offset 2^64-2 and a malformed append-entries ({})",
                refused.join("; ")
            )
        }
        Nemesis::Compact => {
            // All at once: the stalls this looks for came from every node
            // doing the same disk work at the same moment (removing its
            // purged log segments; syncing a whole snapshot file at once).
            let asked = futures::future::join_all(ids.iter().map(|id| cluster.snapshot(*id))).await;
            let said: Vec<String> = ids
                .iter()
                .zip(asked)
                .map(|(id, r)| match r {
                    Ok(index) => format!("node {id} from index {index}"),
                    Err(e) => format!("node {id} not asked ({e:#})"),
                })
                .collect();
            format!(
                "compact: every node of {region} builds a snapshot at once and drops its log below it ({})",
                said.join(", ")
            )
        }
        Nemesis::ControllerKill => match cluster.kill_deciding_controller().await {
            Some(n) => format!("controller-kill: kill -9 controller {n} (the one deciding); restarted at heal"),
            None => "controller-kill: no controller holds the lease; nothing killed".into(),
        },
        Nemesis::Partition => unreachable!("replaced by a variant above"),
    };
    // Latency, clock and controller faults touch every region.
    let hit = if matches!(nemesis, Nemesis::Latency | Nemesis::Clock | Nemesis::ControllerKill) {
        String::new()
    } else {
        region
    };
    Ok((hit, detail))
}

/// Sends the peer port at `url` a shipment at epoch u64::MAX, a snapshot
/// chunk at an offset near u64::MAX and a malformed append-entries message.
/// Each must be INVALID_ARGUMENT naming what is wrong: any other answer
/// stops the run with an error. A node that cannot be reached (killed or
/// cut off by a fault applied with this one), or a region without a leader
/// to take the shipment, is said so.
async fn hostile_peer_input(url: &str) -> anyhow::Result<String> {
    use nines_proto::v1::raft_client::RaftClient;
    use nines_proto::v1::replication_client::ReplicationClient;
    use nines_proto::v1::{RaftMessage, ShipRequest};
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(2));
    let Ok(channel) = endpoint.connect().await else { return Ok("not reached".into()) };
    let chunk = openraft::raft::InstallSnapshotRequest::<nines::types::TypeConfig> {
        vote: Default::default(),
        meta: Default::default(),
        offset: u64::MAX - 1,
        data: vec![1, 2, 3],
        done: false,
    };
    let ship = ShipRequest { origin_region: "hostile".into(), epoch: u64::MAX, ..Default::default() };
    let timeout = Duration::from_secs(5);
    let answers = [
        (
            "the shipment",
            tokio::time::timeout(timeout, ReplicationClient::new(channel.clone()).ship(ship))
                .await
                .map(|r| r.map(|_| ())),
            "EPOCH_MAX",
        ),
        (
            "the snapshot chunk",
            tokio::time::timeout(
                timeout,
                RaftClient::new(channel.clone())
                    .install_snapshot(RaftMessage { payload: postcard::to_allocvec(&chunk)? }),
            )
            .await
            .map(|r| r.map(|_| ())),
            "SNAPSHOT_BYTES_MAX",
        ),
        (
            "the append-entries",
            tokio::time::timeout(
                timeout,
                RaftClient::new(channel).append_entries(RaftMessage { payload: vec![0xff; 8] }),
            )
            .await
            .map(|r| r.map(|_| ())),
            "malformed",
        ),
    ];
    let mut said = Vec::new();
    for (what, answer, needle) in answers {
        match answer {
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument && s.message().contains(needle) => {
                said.push(format!("{what} refused"))
            }
            // No leader to take the shipment, or the node went away.
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => said.push(format!("{what} not taken (unavailable)")),
            Err(_) => said.push(format!("{what} unanswered within {timeout:?}")),
            other => bail!("{url} answered {what} with {other:?}: it must be INVALID_ARGUMENT naming {needle}"),
        }
    }
    Ok(said.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_entries_and_combinations() {
        let plan = parse_plan("kill,partition+clock").unwrap();
        assert_eq!(plan, vec![vec![Nemesis::Kill], vec![Nemesis::Partition, Nemesis::Clock]]);
        assert!(parse_plan("none").unwrap().is_empty());
        for (name, n) in NAMES {
            assert_eq!(parse_plan(name).unwrap(), vec![vec![n]]);
            assert_eq!(n.name(), name);
        }
    }

    #[test]
    fn unknown_or_repeated_nemeses_are_refused_by_name() {
        let e = parse_plan("kill,explode").unwrap_err().to_string();
        assert!(e.contains("\"explode\""), "{e}");
        assert!(parse_plan("kill+kill").is_err());
        assert!(parse_plan("").is_err());
    }

    #[test]
    fn only_plans_that_touch_no_node_must_keep_their_leaders() {
        assert!(keeps_leaders(&parse_plan("none").unwrap()));
        assert!(keeps_leaders(&parse_plan("compact,ship-reorder").unwrap()));
        assert!(!keeps_leaders(&parse_plan("compact,kill").unwrap()));
        assert!(!keeps_leaders(&parse_plan("compact+latency").unwrap()));
    }

    #[test]
    fn cutting_a_node_off_cuts_both_directions_and_never_a_self_link() {
        let mut net = Net::default();
        net.cut_between(&[1], &[1, 2, 3]);
        let drops =
            |id: u64| -> Vec<u64> { net.request(id).links.iter().filter(|l| l.drop).map(|l| l.to_node).collect() };
        assert_eq!(drops(1), vec![2, 3]);
        assert_eq!(drops(2), vec![1]);
        assert_eq!(drops(3), vec![1]);
    }

    #[test]
    fn a_cut_link_stays_cut_when_latency_is_added() {
        let mut net = Net::default();
        net.cut(1, 2);
        net.delay(1, 2, 100);
        net.delay(1, 3, 100);
        let req = net.request(1);
        assert_eq!(req.links.len(), 2);
        assert!(req.links.iter().any(|l| l.to_node == 2 && l.drop));
        assert!(req.links.iter().any(|l| l.to_node == 3 && !l.drop && l.delay_ms == 100));
        assert_eq!(net.request(2), SetFaultsRequest::default());
    }
}
