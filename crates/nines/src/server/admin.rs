//! The `Admin` service: bootstrap, membership changes and per-node status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nines_proto::v1::admin_client::AdminClient;
use nines_proto::v1::admin_server::Admin;
use nines_proto::v1::{
    AddLearnerRequest, ClusterViewRequest, ClusterViewResponse, InitRequest, InitResponse, Member, MembersRequest,
    MembersResponse, NodeInfo as ProtoNodeInfo, PromoteRequest, RemoveRequest, StatusRequest, StatusResponse,
};
use openraft::error::{ChangeMembershipError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use super::{forward, hops};
use crate::error::Error;
use crate::limits::{INIT_MEMBERS_MAX, LABEL_BYTES_MAX};
use crate::node::Shared;
use crate::types::{NodeId, NodeInfo};

pub struct AdminService {
    node: Arc<Shared>,
}

impl AdminService {
    pub fn new(node: Arc<Shared>) -> Self {
        AdminService { node }
    }
}

/// The name of a Raft role in status output and metrics.
pub fn role_name(state: &ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

pub(crate) fn info_to_proto(id: NodeId, n: &NodeInfo) -> ProtoNodeInfo {
    ProtoNodeInfo {
        id,
        grpc_addr: n.grpc_addr.clone(),
        admin_addr: n.admin_addr.clone(),
        region: n.region.clone(),
        az: n.az.clone(),
    }
}

/// Checks a node description from a request and converts it.
fn info_from_proto(n: &ProtoNodeInfo) -> Result<(NodeId, NodeInfo), Error> {
    if n.id == 0 {
        return Err(Error::invalid("node id must not be 0"));
    }
    if !(n.grpc_addr.starts_with("http://") || n.grpc_addr.starts_with("https://")) {
        return Err(Error::invalid(format!(
            "node {} grpc_addr {:?} must be a URL such as http://127.0.0.1:7001",
            n.id, n.grpc_addr
        )));
    }
    for (field, label) in [("region", &n.region), ("az", &n.az)] {
        if label.len() > LABEL_BYTES_MAX {
            return Err(Error::invalid(format!(
                "node {} {field} is {} bytes; limit LABEL_BYTES_MAX is {LABEL_BYTES_MAX}",
                n.id,
                label.len()
            )));
        }
    }
    Ok((
        n.id,
        NodeInfo {
            grpc_addr: n.grpc_addr.clone(),
            admin_addr: n.admin_addr.clone(),
            region: n.region.clone(),
            az: n.az.clone(),
        },
    ))
}

fn admin_client(c: tonic::transport::Channel) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(c)
}

impl AdminService {
    fn members_response(&self) -> MembersResponse {
        let m = self.node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member { node: Some(info_to_proto(*id, n)), voter: voters.contains(id) })
            .collect();
        MembersResponse { members, leader_id: m.current_leader }
    }

    /// Maps the outcome of a membership change that was started on this
    /// node (after a successful leadership check). A change has two steps;
    /// an error after the call began may follow a committed first step, so
    /// none of them is retry-safe.
    fn change(&self, result: ChangeOutcome) -> Result<MembersResponse, Error> {
        match result {
            Err(_) => Err(Error::Indeterminate(format!(
                "membership change not finished within {MEMBERSHIP_CHANGE_TIMEOUT:?}; check `nines member list`"
            ))),
            Ok(Ok(())) => Ok(self.members_response()),
            Ok(Err(e)) => Err(match *e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::Indeterminate(format!(
                    "leadership moved to {:?} during the membership change; check `nines member list`",
                    f.leader_id
                )),
                RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => match e {
                    ChangeMembershipError::InProgress(_) => {
                        Error::Unavailable { reason: e.to_string(), retry_safe: false }
                    }
                    _ => Error::FailedPrecondition(e.to_string()),
                },
                RaftError::Fatal(f) => Error::Unavailable { reason: f.to_string(), retry_safe: false },
            }),
        }
    }
}

/// A membership change's outcome: openraft's result, or a timeout.
type ChangeOutcome =
    Result<Result<(), Box<RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>>, tokio::time::error::Elapsed>;

/// How long a membership change may take, including a new learner catching
/// up. A learner that needs longer is still being added; the caller is told
/// the outcome is unknown rather than waiting without bound.
pub const MEMBERSHIP_CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[tonic::async_trait]
impl Admin for AdminService {
    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let r = req.into_inner();
        if r.members.is_empty() {
            return Err(Error::invalid("members is empty; give at least this node").into());
        }
        if r.members.len() > INIT_MEMBERS_MAX {
            return Err(Error::invalid(format!(
                "{} members; limit INIT_MEMBERS_MAX is {INIT_MEMBERS_MAX}",
                r.members.len()
            ))
            .into());
        }
        let mut members = BTreeMap::new();
        for m in &r.members {
            let (id, info) = info_from_proto(m)?;
            if members.insert(id, info).is_some() {
                return Err(Error::invalid(format!("node id {id} appears twice in members")).into());
            }
        }
        if !members.contains_key(&self.node.id) {
            return Err(Error::invalid(format!("members must include this node ({})", self.node.id)).into());
        }
        match self.node.raft.initialize(members).await {
            Ok(()) => Ok(Response::new(InitResponse {})),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Err(Error::FailedPrecondition(
                "this node is already initialized: a cluster is bootstrapped exactly once".into(),
            )
            .into()),
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => Err(Error::invalid(e.to_string()).into()),
            Err(RaftError::Fatal(f)) => Err(Error::Unavailable { reason: f.to_string(), retry_safe: false }.into()),
        }
    }

    async fn add_learner(&self, req: Request<AddLearnerRequest>) -> Result<Response<MembersResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        let Some(node) = &r.node else {
            return Err(Error::invalid("node is not set").into());
        };
        let (id, info) = info_from_proto(node)?;
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, r, |c, req| async move { admin_client(c).add_learner(req).await })
                .await;
        }
        let call = self.node.raft.add_learner(id, info, true);
        let result =
            tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, call).await.map(|r| r.map(|_| ()).map_err(Box::new));
        Ok(Response::new(self.change(result)?))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<MembersResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, r, |c, req| async move { admin_client(c).promote(req).await }).await;
        }
        let ids: BTreeSet<NodeId> = [r.node_id].into();
        let call = self.node.raft.change_membership(ChangeMembers::AddVoterIds(ids), false);
        let result =
            tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, call).await.map(|r| r.map(|_| ()).map_err(Box::new));
        Ok(Response::new(self.change(result)?))
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<MembersResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        let id = r.node_id;
        if let Err(e) = self.node.check_leader() {
            return forward(&self.node, e, hops, r, |c, req| async move { admin_client(c).remove(req).await }).await;
        }
        let membership = self.node.raft.metrics().borrow().membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|v| v == id);
        let is_member = membership.nodes().any(|(n, _)| *n == id);
        if !is_member {
            return Err(Error::FailedPrecondition(format!("node {id} is not a member")).into());
        }
        let ids: BTreeSet<NodeId> = [id].into();
        let change = if is_voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
        let call = self.node.raft.change_membership(change, false);
        let result =
            tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, call).await.map(|r| r.map(|_| ()).map_err(Box::new));
        Ok(Response::new(self.change(result)?))
    }

    async fn cluster_view(&self, _req: Request<ClusterViewRequest>) -> Result<Response<ClusterViewResponse>, Status> {
        let view = crate::view::cluster(&self.node.regions_for_view()).await;
        let json = serde_json::to_string(&view).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Response::new(ClusterViewResponse { json }))
    }

    async fn members(&self, _req: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(self.members_response()))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow().clone();
        let role = role_name(&m.state);
        Ok(Response::new(StatusResponse {
            node: Some(info_to_proto(self.node.id, &self.node.info)),
            role: role.into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            leader_id: m.current_leader,
            members: self.members_response().members,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        }))
    }
}
