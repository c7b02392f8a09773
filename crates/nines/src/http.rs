//! The admin HTTP port: liveness and readiness probes (with etcd/Kubernetes
//! style aliases) and a JSON status.
//!
//! - `/health/live`, `/livez`: the process and its event loop answer. Never
//!   depends on having a leader, so a partitioned node is not restarted.
//! - `/health/ready`, `/readyz`: knows a leader, is a member, and has applied
//!   within `READY_APPLY_LAG_MAX` entries of its log. 200 or 503, with each
//!   check in the JSON body.

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::node::Shared;

/// Entries a node may have in its log beyond what it applied and still be
/// ready: a replica further behind serves local reads that are too stale.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(node): State<Arc<Shared>>) -> (StatusCode, Json<serde_json::Value>) {
    let m = node.raft.metrics().borrow().clone();
    let has_leader = m.current_leader.is_some();
    let member = m.membership_config.membership().nodes().any(|(id, _)| *id == node.id);
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let lag = last_log.saturating_sub(applied);
    let caught_up = lag <= READY_APPLY_LAG_MAX;
    let ok = has_leader && member && caught_up;
    let body = json!({
        "status": if ok { "ready" } else { "not ready" },
        "checks": {
            "has_leader": { "ok": has_leader, "leader": m.current_leader },
            "member": { "ok": member },
            "applied": { "ok": caught_up, "last_log_index": last_log, "applied_index": applied, "lag_max": READY_APPLY_LAG_MAX },
        }
    });
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Serves the admin port until `shutdown` completes.
pub async fn serve(listener: TcpListener, node: Arc<Shared>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let app = Router::new()
        .route("/health/live", get(live))
        .route("/livez", get(live))
        .route("/health/ready", get(ready))
        .route("/readyz", get(ready))
        .with_state(node);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}
