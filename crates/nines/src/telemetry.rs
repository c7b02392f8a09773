//! Metrics in the Prometheus text format, named the Prometheus way
//! (`nines_` prefix, base units in the name, counters ending in `_total`),
//! with equivalents of the Raft health signals etcd operators watch:
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `nines_raft_has_leader` | gauge | 1 if this node knows a leader (etcd: `server_has_leader`) |
//! | `nines_raft_is_leader` | gauge | 1 if this node leads its region |
//! | `nines_raft_role` | gauge | 1 for the role label this node has now |
//! | `nines_raft_term` | gauge | the current term |
//! | `nines_raft_leader_changes_seen_total` | counter | leader changes observed (etcd: `server_leader_changes_seen_total`) |
//! | `nines_raft_last_log_index`, `nines_raft_applied_index` | gauge | log and state machine progress |
//! | `nines_raft_commit_index` | gauge | on the leader: the index a majority of voters holds |
//! | `nines_proposals_committed_total`, `nines_proposals_failed_total` | counter | proposals (etcd: `server_proposals_*`) |
//! | `nines_proposal_duration_seconds` | histogram | propose to applied |
//! | `nines_log_fsync_duration_seconds` | histogram | log flush (etcd: `disk_wal_fsync_duration_seconds`) |
//! | `nines_grpc_requests_total{method,code}` | counter | client and admin requests by outcome |
//! | `nines_grpc_request_duration_seconds{method}` | histogram | request latency |
//! | `nines_storage_bytes` | gauge | size of the node's database on disk |
//! | `nines_replication_lag_entries{from,to}`, `nines_replication_lag_seconds{from,to}` | gauge | writes of this region a peer has not applied, and the age of the oldest |
//! | `nines_hlc_remote_refused_total{origin}` | counter | shipped writes whose timestamp was too far ahead to adopt (applied, not adopted by the clock) |
//! | `nines_hlc_log_refused_total` | counter | writes in this region's log whose timestamp was too far ahead to adopt |
//! | `nines_hlc_ahead_seconds` | gauge | how far this node's hybrid clock runs ahead of its physical clock |
//!
//! This module is a leaf: it records what it is given and imports nothing
//! else of the crate. The daemon samples Raft and storage for the gauges.

use std::future::Future;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tonic::{Response, Status};

/// Histogram buckets in seconds, 100 µs to 10 s: covers an fsync on a fast
/// disk up to a request that waited out an election.
const BUCKETS_SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide Prometheus recorder (once per node process).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().set_buckets(BUCKETS_SECONDS)?.install_recorder()?;
    Ok(handle)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs a request handler, counting it by outcome and timing it.
pub async fn observed<T>(
    method: &'static str,
    handler: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = handler.await;
    let code = match &result {
        Ok(_) => "OK",
        Err(s) => code_name(s.code()),
    };
    counter!("nines_grpc_requests_total", "method" => method, "code" => code).increment(1);
    histogram!("nines_grpc_request_duration_seconds", "method" => method).record(started.elapsed().as_secs_f64());
    result
}

/// Records one proposal's outcome.
pub fn proposal(started: Instant, ok: bool) {
    if ok {
        counter!("nines_proposals_committed_total").increment(1);
        histogram!("nines_proposal_duration_seconds").record(started.elapsed().as_secs_f64());
    } else {
        counter!("nines_proposals_failed_total").increment(1);
    }
}

/// Records one log flush.
pub fn log_fsync(started: Instant) {
    histogram!("nines_log_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
}

/// Counts a shipped write whose timestamp was too far ahead to adopt.
pub fn remote_refused(origin: &str) {
    counter!("nines_hlc_remote_refused_total", "origin" => origin.to_string()).increment(1);
}

/// Counts a shipment from `origin` that arrived after one that continues
/// past it: overtaken on the way (shipments travel several at once and the
/// receiver applies them in order), or shipped again after a failure.
pub fn shipment_out_of_order(origin: &str) {
    counter!("nines_shipments_out_of_order_total", "origin" => origin.to_string()).increment(1);
}

/// Counts a logged write whose timestamp was too far ahead to adopt.
pub fn log_refused() {
    counter!("nines_hlc_log_refused_total").increment(1);
}

/// Sets how far the hybrid clock runs ahead of the physical clock.
pub fn hlc_ahead(ms: u64) {
    gauge!("nines_hlc_ahead_seconds").set(ms as f64 / 1000.0);
}

/// The Raft gauges of one node at one moment.
pub struct RaftGauges {
    pub has_leader: bool,
    pub is_leader: bool,
    /// One of [`RAFT_ROLES`].
    pub role: &'static str,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Known on the leader only.
    pub commit_index: Option<u64>,
}

/// The values of the `role` label of `nines_raft_role`.
pub const RAFT_ROLES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

/// Sets the Raft gauges.
pub fn raft_gauges(g: &RaftGauges) {
    gauge!("nines_raft_has_leader").set(f64::from(u8::from(g.has_leader)));
    gauge!("nines_raft_is_leader").set(f64::from(u8::from(g.is_leader)));
    for role in RAFT_ROLES {
        gauge!("nines_raft_role", "role" => role).set(f64::from(u8::from(g.role == role)));
    }
    gauge!("nines_raft_term").set(g.term as f64);
    gauge!("nines_raft_last_log_index").set(g.last_log_index as f64);
    gauge!("nines_raft_applied_index").set(g.applied_index as f64);
    if let Some(commit) = g.commit_index {
        gauge!("nines_raft_commit_index").set(commit as f64);
    }
}

/// Counts a change to a new known leader.
pub fn leader_changed() {
    counter!("nines_raft_leader_changes_seen_total").increment(1);
}

/// Sets the size of the node's storage on disk.
pub fn storage_bytes(bytes: u64) {
    gauge!("nines_storage_bytes").set(bytes as f64);
}

/// Sets what peer region `to` has not applied of region `from`'s changefeed.
pub fn replication_lag(from: &str, to: &str, entries: u64, ms: u64) {
    let labels = [("from", from.to_string()), ("to", to.to_string())];
    gauge!("nines_replication_lag_entries", &labels).set(entries as f64);
    gauge!("nines_replication_lag_seconds", &labels).set(ms as f64 / 1000.0);
}
