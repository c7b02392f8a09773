//! The internal Raft service: receives openraft's RPCs from peers and hands
//! them to the local Raft instance. Its replies carry openraft's own result
//! (success or a Raft error) inside the payload; gRPC errors mean the message
//! itself was unusable.

use nines_proto::v1::RaftMessage;
use nines_proto::v1::raft_server;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::stance::LeaderContact;
use crate::types::Raft;

pub struct RaftService {
    raft: Raft,
    /// Told of every append-entries message (see [`LeaderContact`]).
    contact: Arc<LeaderContact>,
}

impl RaftService {
    pub fn new(raft: Raft, contact: Arc<LeaderContact>) -> Self {
        RaftService { raft, contact }
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
        let rpc = decode(req, "append-entries")?;
        self.contact.record();
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(req, "vote")?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(req, "install-snapshot")?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
