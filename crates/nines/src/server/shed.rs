//! Load shedding: a node serves at most `CLIENT_CALLS_IN_FLIGHT_MAX`
//! client-facing calls at once and refuses the next one at once with
//! `RESOURCE_EXHAUSTED`, marked retry-safe (the call never started), so a
//! flood of clients gets refusals it can back off from, not a queue that
//! grows without bound. Raft, cross-region shipments and health checks pass
//! untouched: a flooded node keeps its leadership, its replication and its
//! probes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nines_proto::metadata;
use tokio::sync::Semaphore;
use tonic::Status;

use crate::limits::CLIENT_CALLS_IN_FLIGHT_MAX;

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

/// Calls that are never shed: the cluster's own traffic and probes.
fn exempt(path: &str) -> bool {
    ["/nines.v1.Raft/", "/nines.v1.Replication/", "/grpc.health."].iter().any(|p| path.starts_with(p))
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
        if exempt(req.uri().path()) {
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

    #[test]
    fn cluster_traffic_and_probes_are_never_shed() {
        for p in ["/nines.v1.Raft/AppendEntries", "/nines.v1.Replication/Ship", "/grpc.health.v1.Health/Check"] {
            assert!(exempt(p), "{p}");
        }
        for p in ["/nines.v1.Kv/Put", "/nines.v1.Admin/Status", "/grpc.reflection.v1.ServerReflection/Info"] {
            assert!(!exempt(p), "{p}");
        }
    }
}
