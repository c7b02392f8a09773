//! Forwarding a request that needs the leader from a follower to the
//! leader it knows, once (`FORWARD_HOPS_MAX`); a request that was already
//! forwarded, or finds no leader, gets `UNAVAILABLE` with a leader hint.

use std::future::Future;

use nines_proto::metadata;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::faults::LinkRule;
use crate::limits::FORWARD_HOPS_MAX;
use crate::node::Node;

/// How much longer than the leader's own write timeout a forwarded call may
/// take, so the leader's answer (even a timeout) normally arrives first.
const FORWARD_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How many times the request has been forwarded already.
pub(crate) fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(metadata::FORWARDED).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Forwards `msg` to the leader named by a `NotLeader` error, or returns the
/// error when forwarding is not possible.
pub(crate) async fn forward<M, R, F, Fut>(
    node: &Node,
    err: Error,
    hops: u32,
    msg: M,
    call: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    forward_as(node, err, hops, Request::new(msg), call).await
}

/// [`forward`] of `req`, whose metadata (the caller's admin token) goes
/// with it.
async fn forward_as<M, R, F, Fut>(
    node: &Node,
    err: Error,
    hops: u32,
    mut req: Request<M>,
    call: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let Error::NotLeader { leader_addr: Some(addr), leader_id } = &err else {
        return Err(err.into());
    };
    if hops >= FORWARD_HOPS_MAX || *addr == node.info().grpc_addr || *addr == node.info().peer_addr {
        return Err(err.into());
    }
    match leader_id.and_then(|id| node.faults().link(id)) {
        Some(LinkRule::Drop) => {
            return Err(Error::Unavailable {
                reason: format!("the leader at {addr} is cut off by fault injection"),
                retry_safe: true,
            }
            .into());
        }
        Some(LinkRule::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let Ok(channel) = node.channels().get(addr) else {
        return Err(err.into());
    };
    req.metadata_mut().insert(metadata::FORWARDED, (hops + 1).into());
    // A call this node admitted goes on with the caller's admin token, or
    // this node's own (as its certificate vouches for it under TLS).
    crate::token::vouch(req.metadata_mut());
    let deadline = node.write_timeout() + FORWARD_MARGIN;
    match tokio::time::timeout(deadline, call(channel, req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(s)) if crate::rpc::retry::connect_failed(&s) => Err(Error::Unavailable {
            reason: format!("the leader at {addr} is unreachable: {}", s.message()),
            retry_safe: true,
        }
        .into()),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Error::Indeterminate(format!("no answer from the leader at {addr} within {deadline:?}")).into()),
    }
}

/// `req` with no metadata but its admin token (see [`crate::token`]).
fn token_only<M>(req: Request<M>) -> Request<M> {
    let (metadata, _, msg) = req.into_parts();
    let mut out = Request::new(msg);
    crate::token::pass_on(&metadata, out.metadata_mut());
    out
}

/// Serves a request that needs the leader: `here` runs on this node when it
/// leads; otherwise the request goes to the leader through `remote` (see
/// [`forward`]). The one prologue of every leader-only admin call.
pub(crate) async fn on_leader<M, R, F, Fut, H, HFut>(
    node: &Node,
    req: Request<M>,
    remote: F,
    here: H,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
    H: FnOnce(M) -> HFut,
    HFut: Future<Output = Result<R, Error>>,
{
    let hops = hops(&req);
    match node.check_leader() {
        Ok(()) => here(req.into_inner()).await.map(Response::new).map_err(Status::from),
        Err(e) => forward_as(node, e, hops, token_only(req), remote).await,
    }
}

/// [`on_leader`] for a service of the peer listener (shipments): the leader
/// is reached, and named in the hint, at its peer address.
pub(crate) async fn on_leader_peer<M, R, F, Fut, H, HFut>(
    node: &Node,
    req: Request<M>,
    remote: F,
    here: H,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
    H: FnOnce(M) -> HFut,
    HFut: Future<Output = Result<R, Error>>,
{
    let hops = hops(&req);
    // A leader hint names the leader's peer address, whether this node found
    // it is no leader before or while serving the call.
    let at_peer_port = |e: Error| match e {
        Error::NotLeader { leader_id, .. } => {
            let (_, members, _) = node.membership();
            let leader_addr =
                leader_id.and_then(|l| members.into_iter().find(|(id, _)| *id == l)).map(|(_, n)| n.peer_addr);
            Error::NotLeader { leader_id, leader_addr }
        }
        e => e,
    };
    match node.check_leader() {
        Ok(()) => here(req.into_inner()).await.map(Response::new).map_err(|e| Status::from(at_peer_port(e))),
        Err(e) => forward_as(node, at_peer_port(e), hops, token_only(req), remote).await,
    }
}
