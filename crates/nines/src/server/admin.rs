//! The `Admin` service: bootstrap, membership changes and per-node status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nines_proto::v1::admin_client::AdminClient;
use nines_proto::v1::admin_server::Admin;
use nines_proto::v1::{
    AddLearnerRequest, BackupMessage, BackupRequest, ClusterEventsRequest, ClusterEventsResponse, ClusterViewRequest,
    ClusterViewResponse, InitRequest, InitResponse, Member, MembersRequest, MembersResponse, PromoteRequest,
    RemoveRequest, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use openraft::ChangeMembers;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::forward::on_leader;
use crate::convert::{info_from_proto, info_to_proto};
use crate::error::Error;
use crate::limits::INIT_MEMBERS_MAX;
use crate::node::{ALREADY_INITIALIZED, Node};
use crate::types::{NodeId, role_name};

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }
}

fn admin_client(c: Channel) -> AdminClient<Channel> {
    AdminClient::new(c)
}

/// The membership as this node knows it.
fn members_response(node: &Node) -> MembersResponse {
    let (voters, members, leader_id) = node.membership();
    let members = members
        .iter()
        .map(|(id, n)| Member { node: Some(info_to_proto(*id, n)), voter: voters.contains(id) })
        .collect();
    MembersResponse { members, leader_id }
}

/// Checks the members of an `Init` request and converts them.
fn init_members(r: &InitRequest, this: NodeId) -> Result<BTreeMap<NodeId, crate::types::NodeInfo>, Error> {
    let mut members = BTreeMap::new();
    for m in &r.members {
        let (id, info) = info_from_proto(m)?;
        if members
            .values()
            .any(|o: &crate::types::NodeInfo| o.grpc_addr == info.grpc_addr || o.peer_addr == info.peer_addr)
        {
            return Err(Error::invalid(format!("node {id} shares a URL with another member: {info:?}")));
        }
        members.insert(id, info);
    }
    if !members.contains_key(&this) {
        return Err(Error::invalid(format!("members must include this node ({this})")));
    }
    Ok(members)
}

/// The checks of an `Init` request that need no member asked: its size,
/// each id once, this node among them.
fn check_init_request(r: &InitRequest, this: NodeId) -> Result<(), Error> {
    if r.members.is_empty() {
        return Err(Error::invalid("members is empty; give at least this node"));
    }
    if r.members.len() > INIT_MEMBERS_MAX {
        return Err(Error::invalid(format!(
            "{} members; limit INIT_MEMBERS_MAX is {INIT_MEMBERS_MAX}",
            r.members.len()
        )));
    }
    let mut ids = BTreeSet::new();
    if let Some(m) = r.members.iter().find(|m| !ids.insert(m.id)) {
        return Err(Error::invalid(format!("node id {} appears twice in members", m.id)));
    }
    if !ids.contains(&this) {
        return Err(Error::invalid(format!("members must include this node ({this})")));
    }
    Ok(())
}

/// How long asking a new member for its peer address may take.
const PEER_ADDR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Fills in a new member's peer address when the request leaves it empty:
/// the member itself says where it serves its peers (its `Status` at its
/// client URL), after confirming it is the node the request names.
async fn resolve_peer_addr(node: &Node, m: &mut nines_proto::v1::NodeInfo) -> Result<(), Error> {
    if !m.peer_addr.is_empty() {
        return Ok(());
    }
    if m.id == node.id() {
        m.peer_addr = node.info().peer_addr.clone();
        return Ok(());
    }
    let unreachable = |reason: String| Error::Unavailable {
        reason: format!(
            "node {} at {} did not say its peer address ({reason}); start it first, or give its peer URL",
            m.id, m.grpc_addr
        ),
        retry_safe: true,
    };
    let channel = node.channels().get(&m.grpc_addr).map_err(|e| Error::invalid(format!("node {}: {e}", m.id)))?;
    let status = tokio::time::timeout(PEER_ADDR_TIMEOUT, admin_client(channel).status(StatusRequest {}))
        .await
        .map_err(|_| unreachable(format!("no answer within {PEER_ADDR_TIMEOUT:?}")))?
        .map_err(|s| unreachable(s.message().to_string()))?
        .into_inner();
    let Some(found) = status.node else {
        return Err(unreachable("its status names no node".into()));
    };
    if found.id != m.id || found.region != m.region {
        return Err(Error::invalid(format!(
            "{} is node {} of region {}, not node {} of region {}",
            m.grpc_addr, found.id, found.region, m.id, m.region
        )));
    }
    m.peer_addr = found.peer_addr;
    Ok(())
}

/// Removes node `id` (a voter or a learner) from the membership.
async fn remove(node: &Node, id: NodeId) -> Result<MembersResponse, Error> {
    let (voters, members, _) = node.membership();
    if !members.iter().any(|(n, _)| *n == id) {
        return Err(Error::FailedPrecondition(format!("node {id} is not a member")));
    }
    let ids: BTreeSet<NodeId> = [id].into();
    let change = if voters.contains(&id) { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
    node.change_membership(change).await?;
    Ok(members_response(node))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let mut req = req.into_inner();
        // The cheap refusals first: an initialized node or a malformed
        // request asks no member anything.
        if self.node.is_initialized() {
            return Err(Error::FailedPrecondition(ALREADY_INITIALIZED.into()).into());
        }
        check_init_request(&req, self.node.id())?;
        for m in &mut req.members {
            resolve_peer_addr(&self.node, m).await?;
        }
        let members = init_members(&req, self.node.id())?;
        self.node.initialize(members).await?;
        Ok(Response::new(InitResponse {}))
    }

    async fn add_learner(&self, req: Request<AddLearnerRequest>) -> Result<Response<MembersResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { admin_client(c).add_learner(r).await };
        on_leader(node, req, remote, |mut r| async move {
            let Some(learner) = &mut r.node else {
                return Err(Error::invalid("node is not set"));
            };
            resolve_peer_addr(node, learner).await?;
            let (id, info) = info_from_proto(learner)?;
            let (_, members, _) = node.membership();
            let same = |n: &crate::types::NodeInfo| n.grpc_addr == info.grpc_addr || n.peer_addr == info.peer_addr;
            if let Some((other, _)) = members.iter().find(|(o, n)| *o != id && same(n)) {
                return Err(Error::invalid(format!("node {id} would share a URL with node {other}: {info:?}")));
            }
            node.add_learner(id, info).await?;
            Ok(members_response(node))
        })
        .await
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<MembersResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { admin_client(c).promote(r).await };
        on_leader(node, req, remote, |r| async move {
            node.change_membership(ChangeMembers::AddVoterIds([r.node_id].into())).await?;
            Ok(members_response(node))
        })
        .await
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<MembersResponse>, Status> {
        let node = &self.node;
        let remote = |c, r| async move { admin_client(c).remove(r).await };
        on_leader(node, req, remote, |r| remove(node, r.node_id)).await
    }

    async fn cluster_events(
        &self,
        _req: Request<ClusterEventsRequest>,
    ) -> Result<Response<ClusterEventsResponse>, Status> {
        let histories = crate::view::histories(&self.node.regions_for_view()).await;
        let json = serde_json::to_string(&histories).map_err(|e| Status::internal(format!("encoding events: {e}")))?;
        Ok(Response::new(ClusterEventsResponse { json }))
    }

    async fn cluster_view(&self, _req: Request<ClusterViewRequest>) -> Result<Response<ClusterViewResponse>, Status> {
        let view = crate::view::cluster(&self.node.regions_for_view()).await;
        let json = serde_json::to_string(&view).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Response::new(ClusterViewResponse { json }))
    }

    async fn members(&self, _req: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(members_response(&self.node)))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.raft_metrics();
        let last_backup = self.node.stats().last_backup();
        Ok(Response::new(StatusResponse {
            node: Some(info_to_proto(self.node.id(), self.node.info())),
            role: role_name(&m.state).into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            leader_id: m.current_leader,
            members: members_response(&self.node).members,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            hlc_ahead_ms: self.node.clock().ahead_ms(),
            last_backup_id: last_backup.as_ref().map(|(id, _)| id.clone()).unwrap_or_default(),
            last_backup_ms: last_backup.map_or(0, |(_, ms)| ms),
        }))
    }

    type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<BackupMessage, Status>> + Send>>;

    async fn backup(&self, _req: Request<BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let copy = crate::backup::copy::start(&self.node).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(copy);
        Ok(Response::new(Box::pin(futures::StreamExt::map(stream, |m| m.map_err(Status::from)))))
    }

    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<SnapshotResponse>, Status> {
        let applied_index = self.node.raft_metrics().last_applied.map(|l| l.index).unwrap_or(0);
        self.node.trigger_snapshot().await?;
        Ok(Response::new(SnapshotResponse { applied_index }))
    }
}
