//! The client `Kv` service: validates, stamps, proposes writes through Raft
//! and serves reads at the requested consistency.

use std::sync::Arc;

use nines_proto::v1::kv_client::KvClient;
use nines_proto::v1::kv_server::Kv;
use nines_proto::v1::{
    CompareAndSwapRequest, CompareAndSwapResponse, Consistency, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};
use tonic::{Request, Response, Status};

use super::forward::{forward, hops};
use crate::convert::{key_value as kv, version_to_proto};
use crate::error::Error;
use crate::limits::{RESPONSE_BYTES_MAX, SCAN_RESPONSE_BYTES_MAX};
use crate::node::Node;
use crate::telemetry::observed;
use crate::types::{Command, CommandResult};
use crate::validate;

pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        KvService { node }
    }
}

/// Maps a failed state read; corruption also stops the node.
fn read_failed(node: &Node, e: crate::storage::state_machine::ReadError) -> Status {
    let e = Error::from(e);
    if let Error::InvalidData(reason) = &e {
        node.stop_fatally(reason.clone());
    }
    e.into()
}

/// A write that was proposed and came back with an unexpected result: it
/// may or may not have taken effect.
fn unexpected(what: &str, got: &CommandResult) -> Status {
    Error::Indeterminate(format!("{what} applied as {got:?}")).into()
}

fn kv_client(c: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
    KvClient::new(c).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

impl KvService {
    async fn handle_put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let hops = hops(&req);
        crate::tls::check_key_write(&req, &req.get_ref().key)?;
        let r = req.into_inner();
        validate::key(&r.key)?;
        validate::value(&r.value)?;
        let tag = validate::session(r.session.as_ref())?;
        let (key, value) = (r.key.clone(), r.value.clone());
        match self.node.write(|hlc| Command::Put { key, value, hlc }.in_session(tag)).await {
            Ok(CommandResult::Put { version }) => {
                Ok(Response::new(PutResponse { version: Some(version_to_proto(&version)) }))
            }
            Ok(other) => Err(unexpected("put", &other)),
            Err(e) => forward(&self.node, e, hops, r, |c, req| async move { kv_client(c).put(req).await }).await,
        }
    }

    async fn handle_get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        validate::key(&r.key)?;
        if validate::consistency(r.consistency)? == Consistency::Linearizable
            && let Err(e) = self.node.ensure_linearizable().await
        {
            return forward(&self.node, e, hops, r, |c, req| async move { kv_client(c).get(req).await }).await;
        }
        let applied_index = self.node.reader().applied_index();
        let stored = self.node.reader().get(&r.key).map_err(|e| read_failed(&self.node, e))?;
        let kv = stored.and_then(|s| kv(r.key, s));
        Ok(Response::new(GetResponse { kv, applied_index, served_by: self.node.id() }))
    }

    async fn handle_delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let hops = hops(&req);
        crate::tls::check_key_write(&req, &req.get_ref().key)?;
        let r = req.into_inner();
        validate::key(&r.key)?;
        let tag = validate::session(r.session.as_ref())?;
        let key = r.key.clone();
        match self.node.write(|hlc| Command::Delete { key, hlc }.in_session(tag)).await {
            Ok(CommandResult::Delete { existed, version }) => {
                Ok(Response::new(DeleteResponse { existed, version: Some(version_to_proto(&version)) }))
            }
            Ok(other) => Err(unexpected("delete", &other)),
            Err(e) => forward(&self.node, e, hops, r, |c, req| async move { kv_client(c).delete(req).await }).await,
        }
    }

    async fn handle_compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let hops = hops(&req);
        crate::tls::check_key_write(&req, &req.get_ref().key)?;
        let r = req.into_inner();
        validate::key(&r.key)?;
        validate::value(&r.value)?;
        let expected = validate::expected(&r)?;
        let tag = validate::session(r.session.as_ref())?;
        let (key, value) = (r.key.clone(), r.value.clone());
        match self.node.write(|hlc| Command::CompareAndSwap { key, value, expected, hlc }.in_session(tag)).await {
            Ok(CommandResult::CompareAndSwap { succeeded, version, current }) => {
                Ok(Response::new(CompareAndSwapResponse {
                    succeeded,
                    version: version.as_ref().map(version_to_proto),
                    current: current.and_then(|(k, v)| kv(k, v)),
                }))
            }
            Ok(other) => Err(unexpected("compare-and-swap", &other)),
            Err(e) => {
                forward(&self.node, e, hops, r, |c, req| async move { kv_client(c).compare_and_swap(req).await }).await
            }
        }
    }

    async fn handle_scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let hops = hops(&req);
        let r = req.into_inner();
        let bounds = validate::scan(&r)?;
        if validate::consistency(r.consistency)? == Consistency::Linearizable
            && let Err(e) = self.node.ensure_linearizable().await
        {
            return forward(&self.node, e, hops, r, |c, req| async move { kv_client(c).scan(req).await }).await;
        }
        let applied_index = self.node.reader().applied_index();
        let (found, more) = self
            .node
            .reader()
            .scan(&bounds.start, &bounds.end, bounds.limit as usize, SCAN_RESPONSE_BYTES_MAX)
            .map_err(|e| read_failed(&self.node, e))?;
        let kvs = found.into_iter().filter_map(|(k, v)| kv(k, v)).collect();
        Ok(Response::new(ScanResponse { kvs, more, applied_index, served_by: self.node.id() }))
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        observed("Put", self.handle_put(req)).await
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        observed("Get", self.handle_get(req)).await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        observed("Delete", self.handle_delete(req)).await
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        observed("CompareAndSwap", self.handle_compare_and_swap(req)).await
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        observed("Scan", self.handle_scan(req)).await
    }
}
