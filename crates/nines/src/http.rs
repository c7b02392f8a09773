//! The admin HTTP port:
//!
//! - `/health/live`, `/livez`: the process and its event loop answer. Never
//!   depends on having a leader, so a partitioned node is not restarted.
//! - `/health/ready`, `/readyz`: [`Node::readiness`] (knows a leader, is a
//!   member, has applied within `READY_APPLY_LAG_MAX` entries of its log,
//!   knows its region's role). 200 or 503, with each check in the JSON body.
//!
//! This module only renders; what "ready" means lives in the node.
//! - `/metrics`: Prometheus text format (see [`crate::telemetry`]).
//! - `/api/cluster`: the whole cluster as JSON (see [`crate::view`]).
//! - `/api/events`: this node's recent events and samples (see
//!   [`crate::events`]); `/api/cluster/events`: every node's, each fetched
//!   from its own admin port.
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

use crate::node::Node;

/// The status page, served as is: no build step.
const STATUS_PAGE: &str = include_str!("status.html");

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(node): State<Arc<Node>>) -> (StatusCode, Json<serde_json::Value>) {
    let (ok, body) = node.readiness().await;
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let body = node.render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn cluster(State(node): State<Arc<Node>>) -> Json<crate::view::ClusterView> {
    Json(crate::view::cluster(&node.regions_for_view()).await)
}

async fn events(State(node): State<Arc<Node>>) -> Json<crate::events::NodeHistory> {
    Json(node.history().snapshot())
}

async fn cluster_events(State(node): State<Arc<Node>>) -> Json<Vec<crate::events::NodeHistory>> {
    Json(crate::view::histories(&node.regions_for_view()).await)
}

async fn page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

/// Serves the admin port until `shutdown` completes.
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/cluster", get(cluster))
        .route("/api/events", get(events))
        .route("/api/cluster/events", get(cluster_events))
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
