//! The gRPC services a node serves on its one gRPC port: the client API
//! ([`kv`]), the admin API ([`admin`]) and the internal Raft transport
//! ([`raft`]); plus request validation ([`validate`]) and forwarding to the
//! leader.
//!
//! A request that needs the leader and arrives at a follower is forwarded
//! once to the leader it knows; if none is known, or the request was already
//! forwarded, the caller gets `UNAVAILABLE` with a leader hint instead.

pub mod admin;
pub mod kv;
pub mod raft;
pub mod region;
pub mod replication;
pub mod validate;

use std::future::Future;

use nines_proto::metadata;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::faults::LinkRule;
use crate::limits::FORWARD_HOPS_MAX;
use crate::node::Shared;
use crate::types::Version;

/// How many times the request has been forwarded already.
pub(crate) fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(metadata::FORWARDED).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Forwards `msg` to the leader named by a `NotLeader` error, or returns the
/// error when forwarding is not possible.
pub(crate) async fn forward<M, R, F, Fut>(
    node: &Shared,
    err: Error,
    hops: u32,
    msg: M,
    call: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(Channel, Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let Error::NotLeader { leader_addr: Some(addr), leader_id } = &err else {
        return Err(err.into());
    };
    if hops >= FORWARD_HOPS_MAX || *addr == node.info.grpc_addr {
        return Err(err.into());
    }
    match leader_id.and_then(|id| node.faults.link(id)) {
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
    let Ok(channel) = node.channels.get(addr) else {
        return Err(err.into());
    };
    let mut req = Request::new(msg);
    req.metadata_mut().insert(metadata::FORWARDED, (hops + 1).into());
    // Bound the forwarded call a little beyond the leader's own write timeout
    // so the leader's answer (even a timeout) normally arrives first.
    let deadline = node.write_timeout + std::time::Duration::from_secs(1);
    match tokio::time::timeout(deadline, call(channel, req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(s)) if nines_client::retry::connect_failed(&s) => Err(Error::Unavailable {
            reason: format!("the leader at {addr} is unreachable: {}", s.message()),
            retry_safe: true,
        }
        .into()),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Error::Indeterminate(format!("no answer from the leader at {addr} within {deadline:?}")).into()),
    }
}

pub(crate) fn version_to_proto(v: &Version) -> nines_proto::v1::Version {
    nines_proto::v1::Version {
        hlc_physical_ms: v.hlc.physical_ms,
        hlc_logical: v.hlc.logical,
        origin_region: v.origin.clone(),
        index: v.index,
    }
}
