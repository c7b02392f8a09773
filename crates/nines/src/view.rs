//! The whole cluster as one document: regions, their AZs and nodes with
//! role and health, each region's role, epoch and replication lag. Served
//! as JSON by every node's admin port (`/api/cluster`, drawn by the status
//! page at `/`) and printed by `nines status`.

use std::time::Duration;

use crate::events::NodeHistory;
use crate::rpc::{Client, ClientConfig, RegionInfo};
use serde::{Deserialize, Serialize};

/// How long one node or region may take to answer while the view is built:
/// a dead node must not stall the page.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub regions: Vec<RegionView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionView {
    pub name: String,
    /// The region's leader answered its region status.
    pub reachable: bool,
    pub mode: Option<String>,
    /// "active", "primary", "secondary" or "fenced".
    pub role: Option<String>,
    pub primary: Option<String>,
    pub epoch: Option<u64>,
    pub leader_id: Option<u64>,
    pub changefeed_entries: Option<u64>,
    pub divergent_count: Option<u64>,
    pub lag: Vec<LagView>,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LagView {
    pub to: String,
    pub entries: u64,
    pub ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    pub region: String,
    pub az: String,
    pub grpc_addr: String,
    pub admin_addr: String,
    pub reachable: bool,
    /// Answers and knows a leader.
    pub healthy: bool,
    pub role: Option<String>,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// How far the node's hybrid clock runs ahead of its physical clock.
    pub hlc_ahead_ms: Option<u64>,
    pub leader_id: Option<u64>,
    /// The last scheduled backup this node took: its id and RFC 3339 time.
    pub last_backup: Option<(String, String)>,
    pub error: Option<String>,
}

fn probe_client(endpoints: Vec<String>) -> Option<Client> {
    let config = ClientConfig {
        attempt_timeout: PROBE_TIMEOUT,
        attempts_max: 2,
        request_deadline: PROBE_TIMEOUT * 2,
        connect_timeout: PROBE_TIMEOUT / 2,
        ..ClientConfig::default()
    };
    Client::new(endpoints, config).ok()
}

async fn region_view(region: &RegionInfo) -> RegionView {
    let mut view = RegionView {
        name: region.name.clone(),
        reachable: false,
        mode: None,
        role: None,
        primary: None,
        epoch: None,
        leader_id: None,
        changefeed_entries: None,
        divergent_count: None,
        lag: Vec::new(),
        nodes: Vec::new(),
    };
    let Some(client) = probe_client(region.endpoints.clone()) else { return view };
    if let Ok(s) = client.region_status().await {
        view.reachable = true;
        view.mode = Some(s.mode);
        view.role = Some(s.role);
        view.primary = (!s.primary.is_empty()).then_some(s.primary);
        view.epoch = Some(s.epoch);
        view.changefeed_entries = Some(s.changefeed_entries);
        view.divergent_count = Some(s.divergent_count);
        view.lag =
            s.peers.into_iter().map(|p| LagView { to: p.region, entries: p.lag_entries, ms: p.lag_ms }).collect();
    }
    let members = match client.members().await {
        Ok(m) => m,
        Err(_) => return view,
    };
    view.leader_id = members.leader_id;
    for m in members.members {
        let Some(n) = m.node else { continue };
        let mut node = NodeView {
            id: n.id,
            region: n.region.clone(),
            az: n.az.clone(),
            grpc_addr: n.grpc_addr.clone(),
            admin_addr: n.admin_addr.clone(),
            reachable: false,
            healthy: false,
            role: None,
            term: None,
            last_log_index: None,
            applied_index: None,
            hlc_ahead_ms: None,
            leader_id: None,
            last_backup: None,
            error: None,
        };
        match client.status_of(&n.grpc_addr).await {
            Ok(s) => {
                node.reachable = true;
                node.healthy = s.leader_id.is_some();
                node.role = Some(s.role);
                node.term = Some(s.term);
                node.last_log_index = Some(s.last_log_index);
                node.applied_index = Some(s.applied_index);
                node.hlc_ahead_ms = Some(s.hlc_ahead_ms);
                node.leader_id = s.leader_id;
                if !s.last_backup_id.is_empty() {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(s.last_backup_ms);
                    node.last_backup = Some((s.last_backup_id, humantime::format_rfc3339_millis(at).to_string()));
                }
            }
            Err(e) => node.error = Some(e.to_string()),
        }
        view.nodes.push(node);
    }
    view
}

/// Builds the view of `regions`, asking each in turn.
pub async fn cluster(regions: &[RegionInfo]) -> ClusterView {
    let mut out = Vec::new();
    for r in regions {
        out.push(region_view(r).await);
    }
    ClusterView { regions: out }
}

/// Every node's history (events and samples, see [`crate::events`]), each
/// fetched from its node's admin port (`/api/events`) from inside the
/// cluster's network; a node that does not answer comes with `error`, and
/// the others still come.
///
/// The nodes come from each region's membership (one call per region); a
/// region none of whose nodes answers comes as one entry with `node` 0.
pub async fn histories(regions: &[RegionInfo]) -> Vec<NodeHistory> {
    let members = futures::future::join_all(regions.iter().map(|r| async move {
        let answer = match probe_client(r.endpoints.clone()) {
            Some(client) => client.members().await.ok(),
            None => None,
        };
        (r, answer)
    }))
    .await;
    let mut nodes = Vec::new();
    let mut out = Vec::new();
    for (region, answer) in members {
        match answer {
            Some(m) => nodes.extend(m.members.into_iter().filter_map(|m| m.node)),
            None => out.push(NodeHistory {
                region: region.name.clone(),
                error: Some(format!("no node of region {} answered", region.name)),
                ..Default::default()
            }),
        }
    }
    let fetches = nodes.iter().map(|n| async move {
        let failed =
            |why: String| NodeHistory { node: n.id, region: n.region.clone(), error: Some(why), ..Default::default() };
        if n.admin_addr.is_empty() {
            return failed("no admin address in the membership".into());
        }
        let url = format!("{}/api/events", n.admin_addr.trim_end_matches('/'));
        match http_get(&url, PROBE_TIMEOUT).await {
            Ok((200, body)) => serde_json::from_slice(&body).unwrap_or_else(|e| failed(format!("{url}: {e}"))),
            Ok((code, _)) => failed(format!("{url} answered {code}")),
            Err(e) => failed(format!("{e:#}")),
        }
    });
    out.extend(futures::future::join_all(fetches).await);
    out
}

/// A GET of `url` (plain HTTP) within `timeout`: the status code and body.
pub async fn http_get(url: &str, timeout: Duration) -> anyhow::Result<(u16, Vec<u8>)> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let uri: axum::http::Uri = url.parse().map_err(|e| anyhow::anyhow!("URL {url:?}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<axum::body::Bytes>>();
    let call = async {
        let resp = client.get(uri).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status.as_u16(), body.to_vec()))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{url} did not answer within {timeout:?}"),
    }
}
