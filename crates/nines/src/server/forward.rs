//! Forwarding a request that needs the leader from a follower to the
//! leader it knows, once (`FORWARD_HOPS_MAX`); a request that was already
//! forwarded, or finds no leader, gets `UNAVAILABLE` with a leader hint.
//!
//! A client call that finds the region between leaders (none known, or the
//! known one unreachable: it died) waits here for the election, about as
//! long as one takes, instead of going back to a client that would only
//! poll for the new leader: it is answered as soon as the region can take
//! it, and the failover a client sees is the election and no more.

use std::future::Future;

use nines_proto::metadata;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::faults::LinkRule;
use crate::limits::FORWARD_HOPS_MAX;
use crate::node::Node;
use crate::types::NodeId;

/// How much longer than the leader's own write timeout a forwarded call may
/// take, so the leader's answer (even a timeout) normally arrives first.
const FORWARD_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How many times the request has been forwarded already.
pub(crate) fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(metadata::FORWARDED).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Where a call that needs the leader goes from this node.
struct Leader<'a> {
    id: Option<NodeId>,
    addr: &'a str,
}

/// The leader a `NotLeader` error names, if the call may go there: not
/// past `FORWARD_HOPS_MAX`, and not back to this node unless it leads now
/// (it was elected while the call waited).
fn leader_to_forward_to<'a>(node: &Node, err: &'a Error, hops: u32) -> Option<Leader<'a>> {
    let Error::NotLeader { leader_addr: Some(addr), leader_id } = err else {
        return None;
    };
    let here = *addr == node.info().grpc_addr || *addr == node.info().peer_addr;
    if hops >= FORWARD_HOPS_MAX || (here && node.check_leader().is_err()) {
        return None;
    }
    Some(Leader { id: *leader_id, addr })
}

/// The outcome of sending a call to the leader.
enum Sent<R> {
    /// The leader's answer, or a failure whose outcome is unknown.
    Answer(Result<Response<R>, Status>),
    /// No connection could be made: the call never left this node.
    Unreachable(Error),
}

impl<R> Sent<R> {
    /// What the caller is answered.
    fn into_result(self) -> Result<Response<R>, Status> {
        match self {
            Sent::Answer(a) => a,
            Sent::Unreachable(e) => Err(e.into()),
        }
    }
}

/// Sends `req` to `leader`.
async fn send<M, R, F, Fut>(node: &Node, leader: Leader<'_>, hops: u32, mut req: Request<M>, call: F) -> Sent<R>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let addr = leader.addr;
    match leader.id.and_then(|id| node.faults().link(id)) {
        Some(LinkRule::Drop) => {
            return Sent::Answer(Err(Error::Unavailable {
                reason: format!("the leader at {addr} is cut off by fault injection"),
                retry_safe: true,
            }
            .into()));
        }
        Some(LinkRule::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let Ok(channel) = node.channels().get(addr) else {
        // An address this node cannot dial: the caller gets the hint.
        return Sent::Answer(
            Err(Error::NotLeader { leader_id: leader.id, leader_addr: Some(addr.to_string()) }.into()),
        );
    };
    req.metadata_mut().insert(metadata::FORWARDED, (hops + 1).into());
    // A call this node admitted goes on with the caller's admin token, or
    // this node's own (as its certificate vouches for it under TLS).
    crate::token::vouch(req.metadata_mut());
    let deadline = node.write_timeout() + FORWARD_MARGIN;
    Sent::Answer(match tokio::time::timeout(deadline, call(channel, req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(s)) if crate::rpc::retry::connect_failed(&s) => {
            return Sent::Unreachable(Error::Unavailable {
                reason: format!("the leader at {addr} is unreachable: {}", s.message()),
                retry_safe: true,
            });
        }
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Error::Indeterminate(format!("no answer from the leader at {addr} within {deadline:?}")).into()),
    })
}

/// Forwards `msg` to the leader named by a `NotLeader` error, or returns the
/// error when forwarding is not possible. With no leader known, or the one
/// known unreachable, it first waits for an election (see the module).
pub(crate) async fn forward<M, R, F, Fut>(
    node: &Node,
    err: Error,
    hops: u32,
    msg: M,
    call: F,
) -> Result<Response<R>, Status>
where
    M: Clone,
    F: Fn(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    // One wait at most per call, so a held call stays within a client's
    // attempt timeout.
    if let Error::NotLeader { leader_addr: None, .. } = err
        && hops < FORWARD_HOPS_MAX
    {
        return forward_as(node, node.await_leader(None).await, hops, Request::new(msg), &call).await;
    }
    let Some(leader) = leader_to_forward_to(node, &err, hops) else {
        return Err(err.into());
    };
    let gone = leader.id;
    // Kept for a second try: a forwarded call is the exception (clients
    // learn the leader), and a dead leader's is known only by trying.
    let unreachable = match send(node, leader, hops, Request::new(msg.clone()), &call).await {
        Sent::Answer(a) => return a,
        Sent::Unreachable(e) => e,
    };
    let err = node.await_leader(gone).await;
    match leader_to_forward_to(node, &err, hops) {
        Some(leader) if leader.id != gone => send(node, leader, hops, Request::new(msg), &call).await.into_result(),
        _ => Err(unreachable.into()),
    }
}

/// [`forward`] of `req`, whose metadata (the caller's admin token) goes
/// with it, without waiting for an election (an admin call is answered at
/// once; a client call has waited already).
async fn forward_as<M, R, F, Fut>(
    node: &Node,
    err: Error,
    hops: u32,
    req: Request<M>,
    call: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let Some(leader) = leader_to_forward_to(node, &err, hops) else {
        return Err(err.into());
    };
    send(node, leader, hops, req, call).await.into_result()
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
