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
//! insecure node, the admin token's holders count as admins (nodes that
//! have it, and calls another node forwarded with it); without a token no
//! caller has a role, and a lease renewal can be shed: the authority client
//! retries it, as it is marked retry-safe.

use std::sync::Arc;

use nines_proto::metadata;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::guard::Guard;
use crate::limits::CLIENT_CALLS_IN_FLIGHT_MAX;
use crate::tls::Role;

/// The guard: one shared budget of calls for the whole server.
#[derive(Clone)]
pub struct Shed {
    permits: Arc<Semaphore>,
}

impl Default for Shed {
    fn default() -> Self {
        Shed { permits: Arc::new(Semaphore::new(CLIENT_CALLS_IN_FLIGHT_MAX)) }
    }
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

impl Guard for Shed {
    /// The call's share of the budget (none when exempt).
    type Pass = Option<OwnedSemaphorePermit>;

    fn admit<B>(&self, req: &mut ::http::Request<B>) -> Result<Self::Pass, Status> {
        if exempt(req) {
            return Ok(None);
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                metrics::counter!("nines_calls_shed_total").increment(1);
                let mut status = Status::resource_exhausted(format!(
                    "this node is serving {CLIENT_CALLS_IN_FLIGHT_MAX} calls (CLIENT_CALLS_IN_FLIGHT_MAX); the call \
                     was not started: retry with backoff, or another node"
                ));
                status.metadata_mut().insert(metadata::RETRY_SAFE, "true".parse().expect("ASCII"));
                Err(status)
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
