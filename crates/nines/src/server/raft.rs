//! The internal Raft service: receives openraft's RPCs from peers and hands
//! them to the local Raft instance. Its replies carry openraft's own result
//! (success or a Raft error) inside the payload; gRPC errors mean the message
//! itself was unusable.

use nines_proto::v1::RaftMessage;
use nines_proto::v1::raft_server;
use openraft::raft::InstallSnapshotRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::limits::{SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use crate::node::Node;
use crate::stance::LeaderContact;
use crate::tls::Role;
use crate::types::{NodeId, Raft, TypeConfig, Vote};

pub struct RaftService {
    raft: Raft,
    /// Answers vote requests (see [`Node::vote`]).
    node: Arc<Node>,
    /// Told of every append-entries message (see [`LeaderContact`]).
    contact: Arc<LeaderContact>,
}

impl RaftService {
    pub fn new(raft: Raft, node: Arc<Node>) -> Self {
        let contact = node.contact();
        RaftService { raft, node, contact }
    }
}

impl RaftService {
    /// Checks who a Raft message comes from, by the vote it carries (the
    /// candidate's, or the leader's):
    /// - never this node itself: a peer URL that leads back to its own node
    ///   would have it vote for itself and count its own acknowledgements;
    /// - with TLS, the sender speaks in its own name (the certificate's id,
    ///   whose region the gate checked), so one member's certificate cannot
    ///   stand for another;
    /// - with TLS, a vote request comes from a member: a removed node's
    ///   certificate stays valid, its candidacy does not. Entries and
    ///   snapshots are not checked against the membership: a node that
    ///   missed a membership change must still take them from a leader it
    ///   does not know yet. So a removed node's certificate can still send
    ///   entries in its own name: revoke it by a new CA (rotate the
    ///   certificates) where that matters. A node with no membership yet
    ///   takes any.
    fn check_sender(&self, role: Option<&Role>, vote: &Vote, request_vote: bool) -> Result<(), Status> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let sender = vote.leader_id.node_id;
        if let Some(Role::Node { region, id }) = role
            && *id != sender
        {
            return Err(Status::permission_denied(format!(
                "node {id} of region {region} sends Raft traffic in the name of node {sender}"
            )));
        }
        if sender == metrics.id {
            return Err(Status::permission_denied(format!(
                "Raft traffic in this node's own name (node {sender}): a peer URL that leads back to it?"
            )));
        }
        let Some(Role::Node { region, id }) = role else {
            return Ok(());
        };
        let membership = metrics.membership_config.membership();
        if request_vote && membership.nodes().next().is_some() && membership.get_node(id).is_none() {
            return Err(Status::permission_denied(format!(
                "node {id} is not a member of region {region}: only members stand for election"
            )));
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(req: Request<RaftMessage>, what: &str) -> Result<T, Status> {
    postcard::from_bytes(&req.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("malformed {what} message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = postcard::to_allocvec(value).map_err(|e| Status::internal(format!("encoding reply: {e}")))?;
    Ok(Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let role = req.extensions().get::<Role>().cloned();
        let rpc: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(req, "append-entries")?;
        self.check_sender(role.as_ref(), &rpc.vote, false)?;
        self.contact.record();
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let role = req.extensions().get::<Role>().cloned();
        let rpc: openraft::raft::VoteRequest<NodeId> = decode(req, "vote")?;
        self.check_sender(role.as_ref(), &rpc.vote, true)?;
        encode(&self.node.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let role = req.extensions().get::<Role>().cloned();
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req, "install-snapshot")?;
        self.check_sender(role.as_ref(), &rpc.vote, false)?;
        check_chunk(&rpc)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}

/// Refuses a snapshot chunk larger than `SNAPSHOT_CHUNK_BYTES_MAX` or ending
/// past `SNAPSHOT_BYTES_MAX`, before it reaches the snapshot file.
fn check_chunk(rpc: &InstallSnapshotRequest<TypeConfig>) -> Result<(), Status> {
    let len = rpc.data.len() as u64;
    if len > SNAPSHOT_CHUNK_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "snapshot chunk of {len} bytes; limit SNAPSHOT_CHUNK_BYTES_MAX is {SNAPSHOT_CHUNK_BYTES_MAX}"
        )));
    }
    match rpc.offset.checked_add(len) {
        Some(end) if end <= SNAPSHOT_BYTES_MAX => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "snapshot chunk at offset {} ends past SNAPSHOT_BYTES_MAX {SNAPSHOT_BYTES_MAX}",
            rpc.offset
        ))),
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use proptest::prelude::*;

    use super::*;

    fn chunk(offset: u64, len: usize) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Default::default(),
            meta: Default::default(),
            offset,
            data: vec![0; len],
            done: false,
        }
    }

    #[test]
    fn snapshot_chunks_past_the_limits_are_refused_by_name() {
        assert!(check_chunk(&chunk(0, SNAPSHOT_CHUNK_BYTES_MAX as usize)).is_ok());
        assert!(check_chunk(&chunk(SNAPSHOT_BYTES_MAX - 10, 10)).is_ok());
        for (c, needle) in [
            (chunk(0, SNAPSHOT_CHUNK_BYTES_MAX as usize + 1), "SNAPSHOT_CHUNK_BYTES_MAX"),
            (chunk(SNAPSHOT_BYTES_MAX, 1), "SNAPSHOT_BYTES_MAX"),
            (chunk(u64::MAX, 1), "SNAPSHOT_BYTES_MAX"),
        ] {
            let e = check_chunk(&c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{}", e.message());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any bytes as a Raft message decode or are refused; none panics.
        #[test]
        fn raft_messages_of_any_bytes_decode_or_fail_cleanly(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&payload);
            let _ = postcard::from_bytes::<VoteRequest<crate::types::NodeId>>(&payload);
            if let Ok(c) = postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(&payload) {
                let _ = check_chunk(&c);
            }
        }
    }
}
