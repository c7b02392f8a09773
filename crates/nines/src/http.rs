//! The admin HTTP port:
//!
//! - `/health/live`, `/livez`: the process and its event loop answer. Never
//!   depends on having a leader, so a partitioned node is not restarted.
//! - `/health/ready`, `/readyz`: knows a leader, is a member, has applied
//!   within `READY_APPLY_LAG_MAX` entries of its log, and knows its region's
//!   role. 200 or 503, with each check in the JSON body.
//! - `/metrics`: Prometheus text format (see [`crate::telemetry`]).
//! - `/api/cluster`: the whole cluster as JSON (see [`crate::view`]).
//! - `/`: the status page, plain HTML and JavaScript drawing `/api/cluster`.

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::node::Shared;

/// Entries a node may have in its log beyond what it applied and still be
/// ready: a replica further behind serves local reads that are too stale.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// The status page, served as is: no build step.
const STATUS_PAGE: &str = include_str!("status.html");

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// How long a leader may take to confirm its leadership with a quorum for
/// the readiness check. A leader cut off from its majority still believes
/// it leads until it hears otherwise; asking the quorum is the only way to
/// know.
pub const READY_QUORUM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the node is ready, and each check.
pub async fn readiness(node: &Shared) -> (bool, serde_json::Value) {
    let m = node.raft.metrics().borrow().clone();
    let has_leader = if m.current_leader == Some(node.id) {
        matches!(tokio::time::timeout(READY_QUORUM_TIMEOUT, node.raft.get_read_log_id()).await, Ok(Ok(_)))
    } else {
        m.current_leader.is_some()
    };
    let leader = if has_leader { m.current_leader } else { None };
    let member = m.membership_config.membership().nodes().any(|(id, _)| *id == node.id);
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let caught_up = last_log.saturating_sub(applied) <= READY_APPLY_LAG_MAX;
    let role = node.region_role();
    let primary = node.reader.primary();
    let role_known = node.mode == crate::config::Mode::ActiveActive || !primary.is_empty();
    let ok = has_leader && member && caught_up && role_known;
    let body = json!({
        "status": if ok { "ready" } else { "not ready" },
        "node": { "id": node.id, "region": node.info.region, "az": node.info.az },
        "checks": {
            "has_leader": { "ok": has_leader, "leader": leader },
            "member": { "ok": member },
            "applied": { "ok": caught_up, "last_log_index": last_log, "applied_index": applied, "lag_max": READY_APPLY_LAG_MAX },
            "region_role": { "ok": role_known, "role": role, "primary": primary },
        }
    });
    (ok, body)
}

async fn ready(State(node): State<Arc<Shared>>) -> (StatusCode, Json<serde_json::Value>) {
    let (ok, body) = readiness(&node).await;
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn metrics(State(node): State<Arc<Shared>>) -> impl IntoResponse {
    let body = node.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn cluster(State(node): State<Arc<Shared>>) -> Json<crate::view::ClusterView> {
    Json(crate::view::cluster(&node.regions_for_view()).await)
}

async fn page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

/// Serves the admin port until `shutdown` completes.
pub async fn serve(listener: TcpListener, node: Arc<Shared>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/livez", get(live))
        .route("/health/ready", get(ready))
        .route("/readyz", get(ready))
        .with_state(node);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}
