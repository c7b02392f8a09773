//! What happened, as each node saw it, kept by the node itself (no
//! Prometheus needed): a bounded ring of recent events (a leader elected or
//! lost, a peer unreachable, the region promoted, demoted or fenced,
//! divergent writes recorded, clock skew refused) and ten minutes of samples
//! (writes per second, replication lag, the leader). `/api/events` serves a
//! node's own; the status page and `nines events` merge every node's by
//! time, so they keep working while some nodes are down.
//!
//! This module is a leaf: the daemon's watch and the node record into it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Events a node keeps; older ones are dropped.
pub const EVENTS_MAX: usize = 256;

/// How often a node samples writes, lag and leader.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples a node keeps: ten minutes' worth.
pub const SAMPLES_MAX: usize = 120;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, in ms since the Unix epoch (this node's clock).
    pub at_ms: u64,
    /// The node that saw it.
    pub node: u64,
    pub region: String,
    /// `leader`, `no-leader`, `takeover`, `unreachable`, `reachable`,
    /// `region`, `divergent` or `clock`.
    pub kind: String,
    pub message: String,
}

/// One sample of a node's view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: u64,
    /// Client writes this node committed per second since the last sample
    /// (only a leader commits them).
    pub writes_per_s: f64,
    /// The leader this node knows, if any.
    pub leader: Option<u64>,
    pub term: u64,
    /// On a leader: per peer region, the age in ms of the oldest write of
    /// this region it has not applied.
    pub lag_ms: BTreeMap<String, u64>,
}

/// A node's events and samples, as `/api/events` serves them; `error` says
/// why a node's could not be fetched (the other fields are then empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeHistory {
    pub node: u64,
    pub region: String,
    pub events: Vec<Event>,
    pub samples: Vec<Sample>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A node's history, recorded as it goes.
pub struct History {
    node: u64,
    region: String,
    events: Mutex<VecDeque<Event>>,
    samples: Mutex<VecDeque<Sample>>,
    /// Client writes committed by this node, ever.
    writes: AtomicU64,
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl History {
    pub fn new(node: u64, region: &str) -> Self {
        History {
            node,
            region: region.to_string(),
            events: Mutex::new(VecDeque::new()),
            samples: Mutex::new(VecDeque::new()),
            writes: AtomicU64::new(0),
        }
    }

    /// Records an event now (and logs it).
    pub fn record(&self, kind: &str, message: String) {
        tracing::info!(kind, "{message}");
        let event =
            Event { at_ms: now_ms(), node: self.node, region: self.region.clone(), kind: kind.to_string(), message };
        push(&self.events, event, EVENTS_MAX);
    }

    /// Counts `n` client writes committed.
    pub fn count_writes(&self, n: u64) {
        self.writes.fetch_add(n, Ordering::Relaxed);
    }

    /// Client writes committed by this node, ever.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn sample(&self, sample: Sample) {
        push(&self.samples, sample, SAMPLES_MAX);
    }

    /// Everything kept, oldest first.
    pub fn snapshot(&self) -> NodeHistory {
        NodeHistory {
            node: self.node,
            region: self.region.clone(),
            events: copy(&self.events),
            samples: copy(&self.samples),
            error: None,
        }
    }
}

fn copy<T: Clone>(queue: &Mutex<VecDeque<T>>) -> Vec<T> {
    queue.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
}

fn push<T>(queue: &Mutex<VecDeque<T>>, item: T, max: usize) {
    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
    if q.len() == max {
        q.pop_front();
    }
    q.push_back(item);
}

/// Every node's events, merged by time (ties by node), oldest first; the
/// same event seen by several nodes (a region promoted, say) once, as the
/// first node to record it saw it.
pub fn merge(histories: &[NodeHistory]) -> Vec<Event> {
    let mut all: Vec<Event> = histories.iter().flat_map(|h| h.events.iter().cloned()).collect();
    all.sort_by_key(|e| (e.at_ms, e.node));
    let mut out: Vec<Event> = Vec::new();
    for e in all {
        // The same message about the same region within a few seconds of
        // one kept is one event that several nodes applied (the status page
        // merges by the same rule).
        let duplicate = out
            .iter()
            .rev()
            .take_while(|s| e.at_ms.saturating_sub(s.at_ms) <= 5_000)
            .any(|s| s.region == e.region && s.kind == e.kind && s.message == e.message && s.node != e.node);
        if !duplicate {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rings_stay_bounded_and_merging_orders_by_time_once_per_event() {
        let h = History::new(1, "us-east");
        for i in 0..EVENTS_MAX + 10 {
            h.record("leader", format!("event {i}"));
        }
        for _ in 0..SAMPLES_MAX + 3 {
            h.sample(Sample::default());
        }
        let snap = h.snapshot();
        assert_eq!(snap.events.len(), EVENTS_MAX);
        assert_eq!(snap.events[0].message, "event 10", "the oldest went first");
        assert_eq!(snap.samples.len(), SAMPLES_MAX);

        let event = |at_ms, node, message: &str| Event {
            at_ms,
            node,
            region: "us-east".into(),
            kind: "region".into(),
            message: message.into(),
        };
        let a =
            NodeHistory { node: 1, events: vec![event(100, 1, "promoted"), event(300, 1, "x")], ..Default::default() };
        let b =
            NodeHistory { node: 2, events: vec![event(150, 2, "promoted"), event(200, 2, "y")], ..Default::default() };
        let merged: Vec<(u64, String)> = merge(&[a, b]).into_iter().map(|e| (e.at_ms, e.message)).collect();
        assert_eq!(merged, [(100, "promoted".into()), (200, "y".into()), (300, "x".into())]);
    }
}
