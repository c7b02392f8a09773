//! The `RegionAdmin` service: region roles (status, fence, promote), the
//! divergence record, and the test-only fault hooks.

use std::sync::Arc;
use std::time::Duration;

use nines_proto::v1::region_admin_client::RegionAdminClient;
use nines_proto::v1::region_admin_server::RegionAdmin;
use nines_proto::v1::{
    ConfigureRequest, ConfigureResponse, DivergentRequest, DivergentResponse, FenceRequest, FenceResponse,
    OriginApplied, RegionInfo, RegionPromoteRequest, RegionPromoteResponse, RegionStatusRequest, RegionStatusResponse,
    SetFaultsRequest, SetFaultsResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::forward::on_leader;
use crate::authority::{CONTROLLER_FAULT, ClaimError};
use crate::config::Mode;
use crate::convert;
use crate::error::Error;
use crate::limits::{DIVERGENT_LIST_MAX, DIVERGENT_PAGE_BYTES_MAX, EPOCH_MAX, FENCE_TTL_DEFAULT, FENCE_TTL_MAX};
use crate::node::Node;
use crate::types::{Command, CommandResult};

pub struct RegionAdminService {
    node: Arc<Node>,
}

impl RegionAdminService {
    pub fn new(node: Arc<Node>) -> Self {
        RegionAdminService { node }
    }
}

fn client(c: Channel) -> RegionAdminClient<Channel> {
    RegionAdminClient::new(c)
}

fn require_active_passive(node: &Node) -> Result<(), Error> {
    if node.mode() != Mode::ActivePassive {
        return Err(Error::FailedPrecondition(
            "region roles apply to active-passive clusters; this one is active-active".into(),
        ));
    }
    Ok(())
}

/// This region's roles and replication progress, as its leader knows them.
fn status(node: &Node) -> Result<RegionStatusResponse, Error> {
    let region = node.reader().region_state();
    let primary = node.reader().primary();
    let peers = node.replication_lag()?.into_iter().map(convert::peer_lag_to_proto).collect();
    let origins = node
        .peers()
        .iter()
        .map(|p| OriginApplied {
            origin: p.name.clone(),
            applied_through: region.applied_from.get(&p.name).copied().unwrap_or(0),
            applied_total: region.applied_total.get(&p.name).copied().unwrap_or(0),
            refused_clock_total: node.stats().refused_clock(&p.name),
        })
        .collect();
    let regions = node
        .all_regions()
        .iter()
        .map(|r| RegionInfo { name: r.name.clone(), endpoints: r.endpoints.clone() })
        .collect();
    Ok(RegionStatusResponse {
        region: node.region().to_string(),
        mode: node.mode().as_str().into(),
        primary: if node.mode() == Mode::ActivePassive { primary } else { String::new() },
        epoch: region.epoch,
        role: node.region_role().into(),
        changefeed_entries: node.reader().changefeed_len(),
        peers,
        origins,
        divergent_count: region.divergent_total,
        regions,
        leader_id: node.id(),
        setup: node.reader().setup().as_ref().map(convert::setup_to_proto),
        authority: node.authority_endpoints().to_vec(),
        lease_left_ms: node.primary_lease().left().as_millis() as u64,
        full_sync_from: region.full_sync_from.iter().cloned().collect(),
    })
}

/// Replaces this region's replication setup (an operator's change).
async fn configure(node: &Node, req: ConfigureRequest) -> Result<ConfigureResponse, Error> {
    let setup = convert::setup_from_proto(&req.setup.ok_or_else(|| Error::invalid("setup is not set"))?)?;
    if setup.region != node.region() {
        return Err(Error::invalid(format!("setup.region {:?} is not this region ({})", setup.region, node.region())));
    }
    match node.propose(Command::Configure { setup: setup.clone(), replace: true }).await? {
        CommandResult::None => {}
        CommandResult::Rejected { reason, .. } => return Err(Error::FailedPrecondition(reason)),
        other => return Err(Error::Indeterminate(format!("a setup change applied as {other:?}"))),
    }
    tracing::warn!(?setup, "replication setup changed; every node's file must now say the same before it restarts");
    Ok(ConfigureResponse { setup: Some(convert::setup_to_proto(&setup)) })
}

/// Fences this region (the primary) for a planned switchover for `ttl_ms`
/// (0: `FENCE_TTL_DEFAULT`), or releases the fence.
async fn fence(node: &Node, release: bool, ttl_ms: u64) -> Result<FenceResponse, Error> {
    require_active_passive(node)?;
    let region = node.reader().region_state();
    let primary = node.reader().primary();
    if primary != node.region() {
        return Err(Error::FailedPrecondition(format!(
            "region {} is not the primary ({primary} is, at epoch {})",
            node.region(),
            region.epoch
        )));
    }
    let ttl = match ttl_ms {
        0 => FENCE_TTL_DEFAULT,
        ms if ms > FENCE_TTL_MAX.as_millis() as u64 => {
            return Err(Error::invalid(format!("ttl_ms {ms} is above FENCE_TTL_MAX ({FENCE_TTL_MAX:?})")));
        }
        ms => std::time::Duration::from_millis(ms),
    };
    let fenced_until_ms = if release { 0 } else { node.now()?.physical_ms + ttl.as_millis() as u64 };
    let cmd = Command::SetRole { primary, epoch: region.epoch, fenced_until_ms, shipped_through: 0 };
    node.propose(cmd).await?;
    // Applied here by now: the applied index covers the fence.
    Ok(FenceResponse { epoch: region.epoch, index: node.reader().applied_index() })
}

/// Makes this region the primary at `epoch`, which must be above the
/// current one.
async fn promote(node: &Node, epoch: u64) -> Result<RegionPromoteResponse, Error> {
    require_active_passive(node)?;
    if epoch > EPOCH_MAX {
        return Err(Error::invalid(format!("epoch {epoch} is above EPOCH_MAX {EPOCH_MAX}")));
    }
    let state = node.reader().region_state();
    let current = state.epoch;
    if epoch <= current {
        return Err(Error::FailedPrecondition(format!("epoch {epoch} must be above the current epoch {current}")));
    }
    if !state.full_sync_from.is_empty() {
        let from: Vec<&str> = state.full_sync_from.iter().map(String::as_str).collect();
        return Err(Error::FailedPrecondition(format!(
            "region {} is being rebuilt by a full sync from {} (it lost its data): promoting it now would lose what it \
             has not received yet",
            node.region(),
            from.join(", ")
        )));
    }
    // With an authority, the epoch is allocated there first, once, and only
    // after the old primary's lease has run out.
    let claimed = match node.authority() {
        Some(authority) => {
            let (lease, offset) = (node.lease(), node.clock_offset_max());
            // Two leases let a holder that is gone run out for sure; a
            // forwarded promote must still answer before its caller gives up.
            let patience = (2 * (lease + offset) + Duration::from_secs(1))
                .min(node.write_timeout().saturating_sub(Duration::from_secs(1)));
            let claimed =
                authority.claim_primary(node.region(), epoch, lease, offset, patience).await.map_err(|e| {
                    match e {
                        // Retry-safe: a repeated claim by this region is a no-op.
                        ClaimError::Authority(a) => Error::Unavailable { reason: a.to_string(), retry_safe: true },
                        refused => Error::FailedPrecondition(refused.to_string()),
                    }
                })?;
            Some(claimed)
        }
        None => None,
    };
    let epoch = claimed.map_or(epoch, |(e, _)| e);
    let cmd = Command::SetRole { primary: node.region().to_string(), epoch, fenced_until_ms: 0, shipped_through: 0 };
    match node.propose(cmd).await? {
        CommandResult::Role { .. } => {}
        CommandResult::Rejected { reason, .. } => return Err(Error::FailedPrecondition(reason)),
        other => return Err(Error::Indeterminate(format!("promotion applied as {other:?}"))),
    }
    if let Some((_, sent)) = claimed {
        // The claim stamped a lease: take writes now rather than at the
        // keeper's next renewal.
        node.primary_lease().grant(sent, node.lease(), epoch);
    }
    tracing::warn!(region = %node.region(), epoch, "promoted to primary");
    Ok(RegionPromoteResponse { epoch })
}

/// The divergence record, read linearizably on the leader: a lagging
/// follower could still be missing a demotion that wrote records.
async fn divergent(node: &Node, start: u64, limit: u32) -> Result<DivergentResponse, Error> {
    node.ensure_linearizable().await?;
    let limit = match limit {
        0 => DIVERGENT_LIST_MAX,
        l if l > DIVERGENT_LIST_MAX => {
            return Err(Error::invalid(format!("limit {l} is above DIVERGENT_LIST_MAX {DIVERGENT_LIST_MAX}")));
        }
        l => l,
    };
    let total = node.reader().region_state().divergent_total;
    let (records, next) =
        node.reader().divergent(start, limit as usize, DIVERGENT_PAGE_BYTES_MAX).map_err(Error::from)?;
    Ok(DivergentResponse { records: records.into_iter().map(convert::divergent_to_proto).collect(), total, next })
}

#[tonic::async_trait]
impl RegionAdmin for RegionAdminService {
    async fn region_status(&self, req: Request<RegionStatusRequest>) -> Result<Response<RegionStatusResponse>, Status> {
        let node = &self.node;
        if req.get_ref().from_controller && node.faults().region_blocked(CONTROLLER_FAULT) {
            return Err(Error::Unavailable {
                reason: "this region is cut off from the failover controller (fault injection)".into(),
                retry_safe: true,
            }
            .into());
        }
        let remote = |c, r| async move { client(c).region_status(r).await };
        // The leader first confirms with a quorum that it still leads: a
        // leader cut off from its majority must not answer for its region
        // (the failover controller judges regions by this answer).
        on_leader(node, req, remote, |_| async move {
            node.ensure_linearizable().await?;
            status(node)
        })
        .await
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { client(c).fence(r).await };
        on_leader(node, req, remote, |r| fence(node, r.release, r.ttl_ms)).await
    }

    async fn promote(&self, req: Request<RegionPromoteRequest>) -> Result<Response<RegionPromoteResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { client(c).promote(r).await };
        on_leader(node, req, remote, |r| promote(node, r.epoch)).await
    }

    async fn divergent(&self, req: Request<DivergentRequest>) -> Result<Response<DivergentResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { client(c).divergent(r).await };
        on_leader(node, req, remote, |r| divergent(node, r.start, r.limit)).await
    }

    async fn configure(&self, req: Request<ConfigureRequest>) -> Result<Response<ConfigureResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { client(c).configure(r).await };
        on_leader(node, req, remote, |r| configure(node, r)).await
    }

    async fn set_faults(&self, req: Request<SetFaultsRequest>) -> Result<Response<SetFaultsResponse>, Status> {
        self.node.faults().set(convert::faults_from_proto(req.into_inner()))?;
        Ok(Response::new(SetFaultsResponse {}))
    }
}
