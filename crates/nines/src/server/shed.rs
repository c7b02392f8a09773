//! Load shedding: a node serves at most `CLIENT_CALLS_IN_FLIGHT_MAX`
//! client-facing calls at once and refuses the next one at once with
//! `RESOURCE_EXHAUSTED`, marked retry-safe (the call never started), so a
//! flood of clients gets refusals it can back off from, not a queue that
//! grows without bound. A call holds its share until its answer starts (a
//! streamed answer, a backup, runs on without it).
//!
//! Never shed: Raft, cross-region shipments, health checks and the
//! controller's probe (`RegionStatus`), and, on a TLS node, every call of a
//! node or an admin certificate (the authority's lease renewals are
//! key-value calls of nodes; operators must get through a flood). On an
//! insecure node, which knows no roles, a lease renewal can be shed; the
//! authority client retries it, as it is marked retry-safe.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nines_proto::metadata;
use tokio::sync::Semaphore;
use tonic::Status;

use crate::limits::CLIENT_CALLS_IN_FLIGHT_MAX;
use crate::tls::Role;

/// The tower layer: one shared budget of calls for the whole server.
#[derive(Clone)]
pub struct Shed {
    permits: Arc<Semaphore>,
}

impl Default for Shed {
    fn default() -> Self {
        Shed { permits: Arc::new(Semaphore::new(CLIENT_CALLS_IN_FLIGHT_MAX)) }
    }
}

impl<S> tower::Layer<S> for Shed {
    type Service = Shedding<S>;
    fn layer(&self, inner: S) -> Shedding<S> {
        Shedding { inner, permits: self.permits.clone() }
    }
}

#[derive(Clone)]
pub struct Shedding<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

/// Calls that are never shed: the cluster's own traffic and probes, and
/// the calls of nodes and admins (their role, from `tls::Gate`).
fn exempt<B>(req: &::http::Request<B>) -> bool {
    let path = req.uri().path();
    let cluster_path =
        ["/nines.v1.Raft/", "/nines.v1.Replication/", "/grpc.health.", "/nines.v1.RegionAdmin/RegionStatus"]
            .iter()
            .any(|p| path.starts_with(p));
    cluster_path || matches!(req.extensions().get::<Role>(), Some(Role::Node { .. } | Role::Admin))
}

impl<S, B, R> tower::Service<::http::Request<B>> for Shedding<S>
where
    S: tower::Service<::http::Request<B>, Response = ::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = ::http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ::http::Request<B>) -> Self::Future {
        if exempt(&req) {
            return Box::pin(self.inner.call(req));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let call = self.inner.call(req);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                metrics::counter!("nines_calls_shed_total").increment(1);
                let mut status = Status::resource_exhausted(format!(
                    "this node is serving {CLIENT_CALLS_IN_FLIGHT_MAX} calls (CLIENT_CALLS_IN_FLIGHT_MAX); the call \
                     was not started: retry with backoff, or another node"
                ));
                status.metadata_mut().insert(metadata::RETRY_SAFE, "true".parse().expect("ASCII"));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str, role: Option<Role>) -> ::http::Request<()> {
        let mut req = ::http::Request::builder().uri(path).body(()).unwrap();
        if let Some(role) = role {
            req.extensions_mut().insert(role);
        }
        req
    }

    #[test]
    fn cluster_traffic_probes_nodes_and_admins_are_never_shed() {
        for p in [
            "/nines.v1.Raft/AppendEntries",
            "/nines.v1.Replication/Ship",
            "/grpc.health.v1.Health/Check",
            "/nines.v1.RegionAdmin/RegionStatus",
        ] {
            assert!(exempt(&call(p, None)), "{p}");
        }
        for p in ["/nines.v1.Kv/Put", "/nines.v1.Admin/Status", "/grpc.reflection.v1.ServerReflection/Info"] {
            assert!(!exempt(&call(p, None)), "{p}");
            assert!(!exempt(&call(p, Some(Role::Client))), "{p} by a client");
            assert!(exempt(&call(p, Some(Role::Admin))), "{p} by an admin");
            assert!(exempt(&call(p, Some(Role::Node { region: "r".into(), id: 1 }))), "{p} by a node");
        }
    }
}
