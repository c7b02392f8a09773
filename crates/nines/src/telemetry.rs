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
//! | `nines_state_commit_duration_seconds{durable}` | histogram | an apply's state machine commit, synced or not (etcd: `disk_backend_commit_duration_seconds`) |
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

/// The kinds of metric, for [`METRICS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric a node exports, with the HELP text `/metrics` gives it
/// (`promtool check metrics` wants one for each). A metric recorded
/// anywhere in the crate must be listed here (a test checks).
const METRICS: &[(&str, Kind, &str)] = &[
    ("nines_raft_has_leader", Kind::Gauge, "1 if this node knows a leader of its region, else 0."),
    ("nines_raft_is_leader", Kind::Gauge, "1 if this node leads its region, else 0."),
    ("nines_raft_role", Kind::Gauge, "1 for the Raft role (label role) this node has now, 0 for the others."),
    ("nines_raft_term", Kind::Gauge, "The current Raft term."),
    ("nines_raft_last_log_index", Kind::Gauge, "Index of the last entry in this node's Raft log."),
    ("nines_raft_applied_index", Kind::Gauge, "Index of the last entry applied to the state machine."),
    ("nines_raft_commit_index", Kind::Gauge, "On the leader: the highest index a majority of voters holds."),
    ("nines_raft_leader_changes_seen_total", Kind::Counter, "Leader changes this node has observed."),
    ("nines_proposals_committed_total", Kind::Counter, "Proposals this node made that committed and applied."),
    ("nines_proposals_failed_total", Kind::Counter, "Proposals this node made that failed."),
    ("nines_proposal_duration_seconds", Kind::Histogram, "Time from proposing a command to its application."),
    ("nines_log_fsync_duration_seconds", Kind::Histogram, "Time to flush the Raft log to disk."),
    (
        "nines_state_commit_duration_seconds",
        Kind::Histogram,
        "Time to commit an apply's state machine transaction; durable says whether it synced to disk.",
    ),
    ("nines_grpc_requests_total", Kind::Counter, "Client and admin requests, by method and gRPC status code."),
    ("nines_grpc_request_duration_seconds", Kind::Histogram, "Client and admin request latency, by method."),
    ("nines_storage_bytes", Kind::Gauge, "Size of the node's database files on disk."),
    ("nines_replication_lag_entries", Kind::Gauge, "Writes of region from that region to has not applied yet."),
    (
        "nines_replication_lag_seconds",
        Kind::Gauge,
        "Age of the oldest write of region from that region to has not applied.",
    ),
    (
        "nines_hlc_remote_refused_total",
        Kind::Counter,
        "Shipped writes whose timestamp was too far ahead for the clock to adopt.",
    ),
    (
        "nines_hlc_log_refused_total",
        Kind::Counter,
        "Writes in this region's log whose timestamp was too far ahead to adopt.",
    ),
    ("nines_hlc_ahead_seconds", Kind::Gauge, "How far this node's hybrid clock runs ahead of its physical clock."),
    (
        "nines_shipments_out_of_order_total",
        Kind::Counter,
        "Shipments from origin refused for arriving ahead of their predecessors.",
    ),
    ("nines_rpo_guard_refusing", Kind::Gauge, "1 while the RPO guard refuses writes because no secondary keeps up."),
    (
        "nines_calls_shed_total",
        Kind::Counter,
        "Client calls refused with RESOURCE_EXHAUSTED because too many were in flight.",
    ),
    (
        "nines_permission_denied_total",
        Kind::Counter,
        "Calls refused because the caller's role or token does not allow them.",
    ),
    ("nines_tls_handshakes_refused_total", Kind::Counter, "TLS handshakes that failed or timed out."),
    ("nines_backups_total", Kind::Counter, "Scheduled backups this node completed as its region's leader."),
    ("nines_backup_failures_total", Kind::Counter, "Scheduled backups that failed."),
    ("nines_backup_running", Kind::Gauge, "1 while a scheduled backup runs on this node."),
    (
        "nines_backup_last_success_timestamp_seconds",
        Kind::Gauge,
        "When the last successful backup was taken (Unix time).",
    ),
    ("nines_backup_last_duration_seconds", Kind::Gauge, "How long the last successful backup took."),
    ("nines_backup_last_keys", Kind::Gauge, "Keys in the last successful backup."),
    ("nines_backup_last_bytes", Kind::Gauge, "Bytes in the last successful backup."),
    ("nines_archive_writes_total", Kind::Counter, "Writes stored in the continuous changefeed archive."),
    ("nines_archive_segments_total", Kind::Counter, "Segments stored in the continuous changefeed archive."),
    ("nines_archive_failures_total", Kind::Counter, "Failed attempts to store an archive segment."),
    ("nines_archive_last_store_timestamp_seconds", Kind::Gauge, "When the archive last stored writes (Unix time)."),
];

/// Installs the process-wide Prometheus recorder (once per node process)
/// and gives every metric its HELP text.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().set_buckets(BUCKETS_SECONDS)?.install_recorder()?;
    for (name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
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

/// A log flush slower than this is logged as a warning (etcd's "slow
/// fdatasync"): it is more than the heartbeat interval, so every follower
/// waiting on it misses heartbeats, and a few in a row cost an election.
const SLOW_LOG_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

/// Records one log flush that wrote `bytes` of log segments (0 when it only
/// wrote the meta file, or failed); warns when it was slow.
pub fn log_fsync(started: Instant, bytes: usize) {
    let took = started.elapsed();
    histogram!("nines_log_fsync_duration_seconds").record(took.as_secs_f64());
    if took >= SLOW_LOG_FLUSH {
        tracing::warn!(took_ms = took.as_millis() as u64, bytes, "slow log flush: the disk is saturated or stalled");
    }
}

/// Records one state machine commit.
pub fn state_commit(started: Instant, durable: bool) {
    let durable = if durable { "true" } else { "false" };
    histogram!("nines_state_commit_duration_seconds", "durable" => durable).record(started.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `counter!`, `gauge!` and `histogram!` in the crate's source, by
    /// metric name and kind.
    fn recorded(dir: &std::path::Path, out: &mut Vec<(String, Kind)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                recorded(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (macro_name, kind) in
                [("counter!(\"", Kind::Counter), ("gauge!(\"", Kind::Gauge), ("histogram!(\"", Kind::Histogram)]
            {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = &text[at + macro_name.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    out.push((name.to_string(), kind));
                }
            }
        }
    }

    #[test]
    fn every_recorded_metric_has_help_text_and_its_kind() {
        let mut found = Vec::new();
        recorded(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
        assert!(found.len() > 20, "the scan found the crate's metrics: {found:?}");
        for (name, kind) in found {
            let listed = METRICS.iter().find(|(n, _, _)| *n == name);
            let Some((_, listed_kind, help)) = listed else { panic!("{name} has no HELP text in METRICS") };
            assert_eq!(*listed_kind, kind, "{name} is recorded as a {kind:?}");
            assert!(help.ends_with('.') && help.len() > 10, "{name}: {help:?}");
        }
    }
}
