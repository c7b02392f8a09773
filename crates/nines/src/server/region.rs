//! The `RegionAdmin` service: region roles (status, fence, promote), the
//! divergence record, and the test-only fault hooks.

use std::sync::Arc;

use nines_proto::v1::region_admin_client::RegionAdminClient;
use nines_proto::v1::region_admin_server::RegionAdmin;
use nines_proto::v1::{
    DivergentRecord, DivergentRequest, DivergentResponse, FenceRequest, FenceResponse, KeyValueRecord, OriginApplied,
    RegionInfo, RegionPromoteRequest, RegionPromoteResponse, RegionStatusRequest, RegionStatusResponse,
    SetFaultsRequest, SetFaultsResponse,
};
use tonic::{Request, Response, Status};

use super::{forward, hops};
use crate::config::Mode;
use crate::error::Error;
use crate::faults::{FaultSet, LinkRule};
use crate::limits::DIVERGENT_LIST_MAX;
use crate::node::Shared;
use crate::types::{Command, CommandResult};

pub struct RegionAdminService {
    node: Arc<Shared>,
}

impl RegionAdminService {
    pub fn new(node: Arc<Shared>) -> Self {
        RegionAdminService { node }
    }

    fn status(&self) -> Result<RegionStatusResponse, Error> {
        let node = &self.node;
        let region = node.reader.region_state();
        let primary = node.reader.primary();
        let role = node.region_role();
        let peers = node.replication_lag()?;
        let origins = node
            .peers
            .iter()
            .map(|p| OriginApplied {
                origin: p.name.clone(),
                applied_through: region.applied_from.get(&p.name).copied().unwrap_or(0),
                applied_total: region.applied_total.get(&p.name).copied().unwrap_or(0),
                refused_clock_total: node.stats.refused_clock(&p.name),
            })
            .collect();
        let regions = node
            .all_regions
            .iter()
            .map(|r| RegionInfo { name: r.name.clone(), endpoints: r.endpoints.clone() })
            .collect();
        Ok(RegionStatusResponse {
            region: node.info.region.clone(),
            mode: node.mode.as_str().into(),
            primary: if node.mode == Mode::ActivePassive { primary } else { String::new() },
            epoch: region.epoch,
            role: role.into(),
            changefeed_entries: node.reader.changefeed_len(),
            peers,
            origins,
            divergent_count: region.divergent_total,
            regions,
            leader_id: node.id,
        })
    }

    fn require_active_passive(&self) -> Result<(), Error> {
        if self.node.mode != Mode::ActivePassive {
            return Err(Error::FailedPrecondition(
                "region roles apply to active-passive clusters; this one is active-active".into(),
            ));
        }
        Ok(())
    }
}

fn client(c: tonic::transport::Channel) -> RegionAdminClient<tonic::transport::Channel> {
    RegionAdminClient::new(c)
}

#[tonic::async_trait]
impl RegionAdmin for RegionAdminService {
    async fn region_status(&self, req: Request<RegionStatusRequest>) -> Result<Response<RegionStatusResponse>, Status> {
        let hops = hops(&req);
        if let Err(e) = self.node.check_leader() {
            return forward(
                &self.node,
                e,
                hops,
                req.into_inner(),
                |c, r| async move { client(c).region_status(r).await },
            )
            .await;
        }
        Ok(Response::new(self.status()?))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceResponse>, Status> {
        let hops = hops(&req);
        self.require_active_passive()?;
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, req.into_inner(), |c, r| async move { client(c).fence(r).await })
                .await;
        }
        let release = req.into_inner().release;
        let region = self.node.reader.region_state();
        let primary = self.node.reader.primary();
        if primary != self.node.info.region {
            return Err(Error::FailedPrecondition(format!(
                "region {} is not the primary ({primary} is, at epoch {})",
                self.node.info.region, region.epoch
            ))
            .into());
        }
        let cmd = Command::SetRole { primary, epoch: region.epoch, fenced: !release, shipped_through: 0 };
        self.node.propose(cmd).await?;
        // Applied here by now: the applied index covers the fence.
        Ok(Response::new(FenceResponse { epoch: region.epoch, index: self.node.reader.applied_index() }))
    }

    async fn promote(&self, req: Request<RegionPromoteRequest>) -> Result<Response<RegionPromoteResponse>, Status> {
        let hops = hops(&req);
        self.require_active_passive()?;
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, req.into_inner(), |c, r| async move { client(c).promote(r).await })
                .await;
        }
        let epoch = req.into_inner().epoch;
        let current = self.node.reader.region_state().epoch;
        if epoch <= current {
            return Err(
                Error::FailedPrecondition(format!("epoch {epoch} must be above the current epoch {current}")).into()
            );
        }
        let cmd = Command::SetRole { primary: self.node.info.region.clone(), epoch, fenced: false, shipped_through: 0 };
        match self.node.propose(cmd).await? {
            CommandResult::Role { .. } => {}
            other => return Err(Error::Internal(format!("promotion applied as {other:?}")).into()),
        }
        tracing::warn!(region = %self.node.info.region, epoch, "promoted to primary");
        Ok(Response::new(RegionPromoteResponse { epoch }))
    }

    async fn divergent(&self, req: Request<DivergentRequest>) -> Result<Response<DivergentResponse>, Status> {
        // A linearizable read on the leader: a lagging follower could still
        // be missing a demotion that wrote records.
        let hops = hops(&req);
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, req.into_inner(), |c, r| async move { client(c).divergent(r).await })
                .await;
        }
        self.node.ensure_linearizable().await?;
        let limit = match req.into_inner().limit {
            0 => DIVERGENT_LIST_MAX,
            l if l > DIVERGENT_LIST_MAX => {
                return Err(
                    Error::invalid(format!("limit {l} is above DIVERGENT_LIST_MAX {DIVERGENT_LIST_MAX}")).into()
                );
            }
            l => l,
        };
        let total = self.node.reader.region_state().divergent_total;
        let records = self
            .node
            .reader
            .divergent(limit as usize)
            .map_err(Error::from)?
            .into_iter()
            .map(|d| DivergentRecord {
                kv: Some(KeyValueRecord {
                    key: d.key,
                    tombstone: d.value.is_none(),
                    value: d.value.unwrap_or_default(),
                    hlc_physical_ms: d.version.hlc.physical_ms,
                    hlc_logical: d.version.hlc.logical,
                    origin_region: d.version.origin,
                    index: d.version.index,
                }),
                demoted_at_epoch: d.demoted_at_epoch,
            })
            .collect();
        Ok(Response::new(DivergentResponse { records, total }))
    }

    async fn set_faults(&self, req: Request<SetFaultsRequest>) -> Result<Response<SetFaultsResponse>, Status> {
        let r = req.into_inner();
        let links = r
            .links
            .iter()
            .map(|l| {
                let rule = if l.drop {
                    LinkRule::Drop
                } else {
                    LinkRule::Delay(std::time::Duration::from_millis(u64::from(l.delay_ms)))
                };
                (l.to_node, rule)
            })
            .collect();
        self.node.faults.set(FaultSet {
            blocked_regions: r.blocked_regions,
            send_blocked_regions: r.send_blocked_regions,
            clock_offset_ms: r.clock_offset_ms,
            links,
        })?;
        Ok(Response::new(SetFaultsResponse {}))
    }
}
