//! The `Replication` service: receives a peer region's shipments on this
//! region's leader and commits them through Raft. See
//! [`crate::replication`] for the guarantees.

use std::sync::Arc;

use nines_proto::v1::replication_client::ReplicationClient;
use nines_proto::v1::replication_server::Replication;
use nines_proto::v1::{ShipRefusal, ShipRequest, ShipResponse};
use tonic::{Request, Response, Status};

use super::{forward, hops, validate};
use crate::config::Mode;
use crate::error::Error;
use crate::hlc::Hlc;
use crate::limits::{RAFT_MESSAGE_BYTES_MAX, SHIP_BATCH_ENTRIES_MAX};
use crate::node::Shared;
use crate::types::{Command, CommandResult, RemoteEntry};

pub struct ReplicationService {
    node: Arc<Shared>,
}

impl ReplicationService {
    pub fn new(node: Arc<Shared>) -> Self {
        ReplicationService { node }
    }

    fn response(&self, origin: &str, refused: ShipRefusal, reason: String) -> ShipResponse {
        let region = self.node.reader.region_state();
        ShipResponse {
            applied_through: region.applied_from.get(origin).copied().unwrap_or(0),
            epoch: region.epoch,
            primary: self.node.reader.primary(),
            refused: refused as i32,
            reason,
            receiver_index: region.last_local_write,
        }
    }
}

/// A `Replication` client that accepts shipments up to the Raft message limit.
pub fn client(c: tonic::transport::Channel) -> ReplicationClient<tonic::transport::Channel> {
    ReplicationClient::new(c)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
}

/// Checks a shipment's shape and converts its entries.
fn entries_of(req: &ShipRequest) -> Result<Vec<RemoteEntry>, Error> {
    if req.entries.len() > SHIP_BATCH_ENTRIES_MAX {
        return Err(Error::invalid(format!(
            "{} entries; limit SHIP_BATCH_ENTRIES_MAX is {SHIP_BATCH_ENTRIES_MAX}",
            req.entries.len()
        )));
    }
    let mut last = 0;
    let mut out = Vec::with_capacity(req.entries.len());
    for e in &req.entries {
        if e.origin_index <= last {
            return Err(Error::invalid(format!("origin_index {} is not above the previous {last}", e.origin_index)));
        }
        last = e.origin_index;
        validate::key(&e.key)?;
        validate::value(&e.value)?;
        out.push(RemoteEntry {
            origin_index: e.origin_index,
            key: e.key.clone(),
            value: (!e.tombstone).then(|| e.value.clone()),
            hlc: Hlc { physical_ms: e.hlc_physical_ms, logical: e.hlc_logical },
        });
    }
    Ok(out)
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn ship(&self, req: Request<ShipRequest>) -> Result<Response<ShipResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        let node = &self.node;
        if r.origin_region == node.info.region || !node.peers.iter().any(|p| p.name == r.origin_region) {
            return Err(Error::invalid(format!("origin_region {:?} is not a peer region", r.origin_region)).into());
        }
        if node.faults.region_blocked(&r.origin_region) {
            return Err(Error::Unavailable {
                reason: format!("traffic from region {} is blocked (fault injection)", r.origin_region),
                retry_safe: true,
            }
            .into());
        }
        if let Err(e) = node.check_leader() {
            return forward(node, e, hops, r, |c, req| async move { client(c).ship(req).await }).await;
        }
        let entries = entries_of(&r)?;
        if node.mode == Mode::ActivePassive {
            let ours = node.reader.region_state();
            if r.epoch < ours.epoch {
                let reason = format!(
                    "region {} is at epoch {} with primary {}; {} sent epoch {}",
                    node.info.region,
                    ours.epoch,
                    node.reader.primary(),
                    r.origin_region,
                    r.epoch
                );
                return Ok(Response::new(self.response(&r.origin_region, ShipRefusal::StaleEpoch, reason)));
            }
            if r.epoch > ours.epoch && r.primary == r.origin_region {
                crate::replication::adopt(node.clone(), &r.primary, r.epoch, r.receiver_applied_through).await;
            }
        }
        for e in &entries {
            if let Err(err) = node.clock.observe(e.hlc) {
                node.stats.count_refused_clock(&r.origin_region);
                crate::telemetry::remote_refused(&r.origin_region);
                tracing::warn!(origin = %r.origin_region, error = %err, "refusing a shipment: remote timestamp too far ahead");
                return Ok(Response::new(self.response(&r.origin_region, ShipRefusal::ClockAhead, err.to_string())));
            }
        }
        // An empty batch can still advance what this region holds of the
        // origin (`complete_through`); propose it when it would.
        let held = node.reader.region_state().complete_from.get(&r.origin_region).copied().unwrap_or(0);
        if !entries.is_empty() || r.complete_through > held {
            let cmd = Command::ApplyRemote {
                origin: r.origin_region.clone(),
                epoch: r.epoch,
                entries,
                complete_through: r.complete_through,
            };
            match node.propose(cmd).await? {
                CommandResult::Remote { .. } => {}
                CommandResult::Rejected { reason, .. } => {
                    return Ok(Response::new(self.response(&r.origin_region, ShipRefusal::StaleEpoch, reason)));
                }
                other => return Err(Error::Internal(format!("a shipment applied as {other:?}")).into()),
            }
        }
        Ok(Response::new(self.response(&r.origin_region, ShipRefusal::None, String::new())))
    }
}
