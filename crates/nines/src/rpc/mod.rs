//! The wire-level client of one region: every gRPC call a node's own tools
//! make (membership, region admin, backups, shipping between regions, the
//! controller, tests and the harness). It imports nothing else of the crate.
//! Applications embed `nines-client` instead, which hides these types and
//! follows failovers between regions.
//!
//! A [`Client`] is given a list of endpoints (any nodes of a region). It
//! sends each request to the node it last succeeded with, follows leader
//! hints, moves to the next endpoint when a node is unreachable, and retries
//! with bounded exponential backoff. A write is retried only when the server
//! (or a refused connection) guarantees it had no effect; otherwise the
//! caller gets [`Error::Indeterminate`], because a blind retry could apply a
//! write twice or over a newer one. Reads are always retried.
//!
//! # Layout
//!
//! - [`Client`], [`ClientConfig`]: the client and its limits.
//! - [`Error`]: what can go wrong, grouped by what the caller should do.
//! - [`retry`]: how an error is classified (retry-safe or not).

pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use nines_proto::v1::region_admin_client::RegionAdminClient;
use nines_proto::v1::{
    AddLearnerRequest, BackupRequest, ClusterEventsRequest, ClusterViewRequest, CompareAndSwapRequest, DeleteRequest,
    GetRequest, InitRequest, MembersRequest, PromoteRequest, PutRequest, RemoveRequest, ScanRequest, SnapshotRequest,
    StatusRequest, admin_client::AdminClient, compare_and_swap_request, kv_client::KvClient,
};
pub use nines_proto::v1::{
    BackupMessage, CompareAndSwapResponse, ConfigureResponse, Consistency, DeleteResponse, DivergentResponse,
    FenceResponse, GetResponse, KeyValue, Member, MembersResponse, NodeInfo, PeerLag, PutResponse, RegionInfo,
    RegionPromoteResponse, RegionStatusResponse, ReplicationSetup, ScanResponse, StatusResponse, Version,
};
use nines_proto::v1::{
    ConfigureRequest, DivergentRequest, FenceRequest, RegionPromoteRequest, RegionStatusRequest, SetFaultsRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use self::retry::Retry;

/// A closure for [`Client::call`] that sends a clone of `$req` with the
/// `$client` stub's `$method`.
macro_rules! rpc {
    ($client:ident, $method:ident, $req:expr) => {
        |c| {
            let r = crate::token::request($req.clone());
            async move { Self::$client(c).$method(r).await }
        }
    };
}

/// The endpoints `nines up` serves on, used when none are given.
pub const DEFAULT_ENDPOINTS: &[&str] = &["http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003"];

/// Largest response the client accepts, in bytes: a full scan page (the
/// server caps a page at 8 MiB of keys and values) plus framing.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What can go wrong, grouped by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Every attempt failed with a retryable error; the request had no effect
    /// as far as the client knows. Try again later.
    #[error("unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    /// The write may or may not have been applied (a timeout, or a connection
    /// lost after the request was sent). Read back to find out.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The request is malformed or beyond a limit; the message names which.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The cluster's state refuses the request (e.g. already initialized).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// An endpoint string cannot be used.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// Any other server error, with its gRPC code.
    #[error("{code:?}: {message}")]
    Server { code: Code, message: String },
}

impl Error {
    fn from_final(status: &Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::ResourceExhausted => Error::InvalidArgument(message),
            code => Error::Server { code, message },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The client's limits. Every retry loop is bounded in count and time.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
    /// How many attempts one request makes at most.
    pub attempts_max: u32,
    /// The first backoff between attempts; doubles up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long connecting to one node may take.
    pub connect_timeout: Duration,
    /// How long one request may take over all its attempts: no new attempt
    /// starts after it.
    pub request_deadline: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        // 150 attempts with backoff capped at 60 ms span about 9 s: many
        // elections (a dead leader is replaced after 0.3 to 0.4 s with the
        // default timings). The low cap keeps the client from sleeping long
        // past the moment a new leader is ready; 16 refusals a second per
        // client while there is none are no load for a node.
        ClientConfig {
            attempt_timeout: Duration::from_secs(12),
            attempts_max: 150,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(60),
            connect_timeout: Duration::from_millis(500),
            request_deadline: Duration::from_secs(30),
        }
    }
}

/// What a CompareAndSwap compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The current version's index. An index is assigned by one region's
    /// log: use it only with a version read in the region you write to.
    Index(u64),
    /// The key must be absent.
    Absent,
    /// The current value must be this write, named by its HLC and origin
    /// region, which are the same in every region (its index is not
    /// compared). Safe with a version read in any region.
    Write(Version),
}

/// Which keys a scan covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Keys in `[start, end)`; an empty `end` means no upper bound.
    Range { start: Vec<u8>, end: Vec<u8> },
    /// Every key beginning with these bytes.
    Prefix(Vec<u8>),
}

/// A client of one nines cluster (region).
pub struct Client {
    endpoints: Vec<String>,
    config: ClientConfig,
    /// One channel per address, reused for every request (HTTP/2
    /// multiplexes). `std::sync::Mutex` because it is never held across an
    /// `.await`.
    channels: Mutex<HashMap<String, Channel>>,
    /// The address that last answered (or was hinted as leader).
    preferred: Mutex<Option<String>>,
}

impl Client {
    /// A client of the cluster reachable at `endpoints` (e.g.
    /// `http://127.0.0.1:7001`). Connections are made lazily.
    pub fn new(endpoints: Vec<String>, config: ClientConfig) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::InvalidEndpoint { endpoint: String::new(), reason: "no endpoints given".into() });
        }
        let client = Client { endpoints, config, channels: Mutex::new(HashMap::new()), preferred: Mutex::new(None) };
        for e in &client.endpoints {
            client.channel(e)?;
        }
        Ok(client)
    }

    /// A client of the cluster `nines up` starts.
    pub fn local_default() -> Result<Self> {
        Self::new(DEFAULT_ENDPOINTS.iter().map(|s| s.to_string()).collect(), ClientConfig::default())
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::endpoint(addr)
            .map_err(|reason| Error::InvalidEndpoint { endpoint: addr.to_string(), reason })?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn first_target(&self) -> String {
        let preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        preferred.clone().unwrap_or_else(|| self.endpoints[0].clone())
    }

    fn set_preferred(&self, addr: &str) {
        *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr.to_string());
    }

    /// Moves the preference off `addr` (to the next endpoint) if it is
    /// the preferred one.
    fn avoid(&self, addr: &str) {
        let next = self.next_endpoint(addr);
        let mut preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        if preferred.as_deref().is_none_or(|p| p == addr) {
            *preferred = Some(next);
        }
    }

    fn next_endpoint(&self, after: &str) -> String {
        let i = self.endpoints.iter().position(|e| e == after).map(|i| i + 1).unwrap_or(0);
        self.endpoints[i % self.endpoints.len()].clone()
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.config.backoff_base.saturating_mul(1u32 << attempt.min(16));
        exp.min(self.config.backoff_max)
    }

    /// Runs one request with routing and bounded retries. `idempotent`
    /// requests are retried after any retryable error; others only after
    /// errors that guarantee no effect.
    ///
    /// Public so that services built on the same routing (replication
    /// between regions) can use it with their own gRPC stubs.
    pub async fn call<T, F, Fut>(&self, idempotent: bool, mut f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let mut target = self.first_target();
        let mut last = String::new();
        let started = std::time::Instant::now();
        for attempt in 0..self.config.attempts_max {
            if attempt > 0 && started.elapsed() >= self.config.request_deadline {
                return Err(Error::Unavailable { attempts: attempt, last });
            }
            let channel = self.channel(&target)?;
            let outcome = tokio::time::timeout(self.config.attempt_timeout, f(channel)).await;
            let status = match outcome {
                Ok(Ok(resp)) => {
                    self.set_preferred(&target);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!(
                    "no answer from {target} within {:?}",
                    self.config.attempt_timeout
                )),
            };
            last = format!("{target}: {}", status.message());
            match retry::classify(&status) {
                Retry::Final => return Err(Error::from_final(&status)),
                Retry::Unsafe if !idempotent => {
                    // The next request should not start at a node that just
                    // hung up or went silent (paused, cut off): it would
                    // cost every caller an attempt timeout until the node
                    // came back. A healthy node that was merely slow costs
                    // one forwarded hop instead.
                    if retry::leader_hint(&status).is_none() {
                        self.avoid(&target);
                    }
                    return Err(Error::Indeterminate(last));
                }
                Retry::Unsafe | Retry::Safe => {}
            }
            tracing::debug!(attempt, %target, error = %status.message(), "retrying");
            match retry::leader_hint(&status) {
                Some(hint) if hint != target => {
                    // Straight to a fresh hint; a hint that keeps changing
                    // (an election in progress) still backs off a little.
                    if attempt > 0 {
                        tokio::time::sleep(self.backoff(attempt) / 2).await;
                    }
                    target = hint;
                }
                _ => {
                    target = self.next_endpoint(&target);
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
        Err(Error::Unavailable { attempts: self.config.attempts_max, last })
    }

    fn kv(channel: Channel) -> KvClient<Channel> {
        KvClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
    }

    fn region(channel: Channel) -> RegionAdminClient<Channel> {
        RegionAdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
    }

    fn admin(channel: Channel) -> AdminClient<Channel> {
        AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
    }

    /// Writes `value` under `key`; returns the new version.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<Version> {
        let req = PutRequest { key: key.into(), value: value.into(), session: None };
        let resp: PutResponse = self.call(false, rpc!(kv, put, req)).await?;
        resp.version
            .ok_or_else(|| Error::Server { code: Code::Internal, message: "put response without version".into() })
    }

    /// Reads `key` at the given consistency.
    pub async fn get(&self, key: impl Into<Vec<u8>>, consistency: Consistency) -> Result<GetResponse> {
        let req = GetRequest { key: key.into(), consistency: consistency as i32 };
        self.call(true, rpc!(kv, get, req)).await
    }

    /// Deletes `key` (writes a tombstone).
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<DeleteResponse> {
        let req = DeleteRequest { key: key.into(), session: None };
        self.call(false, rpc!(kv, delete, req)).await
    }

    /// Writes `value` under `key` only if the current version matches.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        expect: Expect,
    ) -> Result<CompareAndSwapResponse> {
        let expected = match expect {
            Expect::Index(i) => compare_and_swap_request::Expected::ExpectedIndex(i),
            Expect::Absent => compare_and_swap_request::Expected::ExpectAbsent(true),
            Expect::Write(v) => compare_and_swap_request::Expected::ExpectedVersion(v),
        };
        let req =
            CompareAndSwapRequest { key: key.into(), value: value.into(), expected: Some(expected), session: None };
        self.call(false, rpc!(kv, compare_and_swap, req)).await
    }

    /// Lists live keys in a range or with a prefix, at most `limit` (0: the
    /// server's default).
    pub async fn scan(&self, range: KeyRange, limit: u32, consistency: Consistency) -> Result<ScanResponse> {
        let (start, end, prefix) = match range {
            KeyRange::Range { start, end } => (start, end, Vec::new()),
            KeyRange::Prefix(p) => (Vec::new(), Vec::new(), p),
        };
        let req = ScanRequest { start, end, prefix, limit, consistency: consistency as i32 };
        self.call(true, rpc!(kv, scan, req)).await
    }

    /// The status of the node at `endpoint` (not routed: status is per node).
    pub async fn status_of(&self, endpoint: &str) -> Result<StatusResponse> {
        let channel = self.channel(endpoint)?;
        let fut = async move { Self::admin(channel).status(crate::token::request(StatusRequest {})).await };
        match tokio::time::timeout(self.config.attempt_timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::Unavailable { attempts: 1, last: format!("{endpoint}: {}", s.message()) }),
            Err(_) => Err(Error::Unavailable { attempts: 1, last: format!("{endpoint}: timed out") }),
        }
    }

    /// Bootstraps a fresh cluster through the node at `endpoint`. Refused
    /// (`FailedPrecondition`) if that node is already initialized.
    pub async fn init(&self, endpoint: &str, members: Vec<NodeInfo>) -> Result<()> {
        let channel = self.channel(endpoint)?;
        Self::admin(channel)
            .init(crate::token::request(InitRequest { members }))
            .await
            .map_err(|s| Error::from_final(&s))?;
        Ok(())
    }

    /// Asks the node at `endpoint` to build a snapshot now; returns its
    /// applied index at that moment (the snapshot covers at least that).
    pub async fn snapshot_on(&self, endpoint: &str) -> Result<u64> {
        let channel = self.channel(endpoint)?;
        let r = Self::admin(channel)
            .snapshot(crate::token::request(SnapshotRequest {}))
            .await
            .map_err(|s| Error::from_final(&s))?;
        Ok(r.into_inner().applied_index)
    }

    /// Starts a backup copy on the region's leader (found through the
    /// members): the header, chunks and end of a consistent copy at a
    /// linearizable point. A stream cut short is an error, never a shorter
    /// copy.
    pub async fn backup_stream(&self) -> Result<tonic::Streaming<BackupMessage>> {
        let members = self.members().await?;
        let leader = members
            .leader_id
            .and_then(|id| members.members.iter().filter_map(|m| m.node.as_ref()).find(|n| n.id == id))
            .ok_or_else(|| Error::Unavailable { attempts: 1, last: "the region has no leader now".into() })?;
        let channel = self.channel(&leader.grpc_addr)?;
        let r = Self::admin(channel)
            .backup(crate::token::request(BackupRequest {}))
            .await
            .map_err(|s| Error::from_final(&s))?;
        Ok(r.into_inner())
    }

    /// The whole cluster as JSON, gathered by whichever node answers.
    pub async fn cluster_view(&self) -> Result<String> {
        Ok(self.call(true, rpc!(admin, cluster_view, ClusterViewRequest {})).await?.json)
    }

    /// Every node's recent events and samples as JSON, gathered by the node
    /// that answers (see `crate::events`).
    pub async fn cluster_events(&self) -> Result<String> {
        Ok(self.call(true, rpc!(admin, cluster_events, ClusterEventsRequest {})).await?.json)
    }

    /// The cluster's members and leader.
    pub async fn members(&self) -> Result<MembersResponse> {
        self.call(true, rpc!(admin, members, MembersRequest {})).await
    }

    /// Adds a node as a learner; returns once it has caught up.
    pub async fn add_learner(&self, node: NodeInfo) -> Result<MembersResponse> {
        let req = AddLearnerRequest { node: Some(node) };
        self.call(false, rpc!(admin, add_learner, req)).await
    }

    /// Promotes a learner to voter.
    pub async fn promote(&self, node_id: u64) -> Result<MembersResponse> {
        self.call(false, rpc!(admin, promote, PromoteRequest { node_id })).await
    }

    /// Removes a node (voter or learner) from the cluster.
    pub async fn remove(&self, node_id: u64) -> Result<MembersResponse> {
        self.call(false, rpc!(admin, remove, RemoveRequest { node_id })).await
    }

    /// The region's roles, replication lag per peer region, and what it
    /// applied from each origin. Answered by the region's leader.
    pub async fn region_status(&self) -> Result<RegionStatusResponse> {
        self.call(true, rpc!(region, region_status, RegionStatusRequest { from_controller: false })).await
    }

    /// [`Client::region_status`] as the failover controller asks it (a
    /// test's fault hooks can cut a region off from the controller).
    pub async fn region_status_for_controller(&self) -> Result<RegionStatusResponse> {
        self.call(true, rpc!(region, region_status, RegionStatusRequest { from_controller: true })).await
    }

    /// Stops the (primary) region taking writes, for a planned switchover;
    /// with `release`, lifts the fence again.
    pub async fn fence(&self, release: bool) -> Result<FenceResponse> {
        self.fence_for(release, Duration::ZERO).await
    }

    /// Fences the (primary) region for `ttl` (zero: the server's default);
    /// the fence ends by itself after it unless lifted earlier.
    pub async fn fence_for(&self, release: bool, ttl: Duration) -> Result<FenceResponse> {
        let ttl_ms = ttl.as_millis() as u64;
        self.call(true, rpc!(region, fence, FenceRequest { release, ttl_ms })).await
    }

    /// Makes the region primary at `epoch` (above every epoch it has seen).
    pub async fn promote_region(&self, epoch: u64) -> Result<RegionPromoteResponse> {
        self.call(false, rpc!(region, promote, RegionPromoteRequest { epoch })).await
    }

    /// The region's divergence record: writes it acknowledged as primary
    /// that never reached the primary that replaced it. Lists at most
    /// `limit` records (0: every record), asking page after page.
    pub async fn divergent(&self, limit: u32) -> Result<DivergentResponse> {
        let mut out = DivergentResponse::default();
        let mut start = 0;
        loop {
            let listed = out.records.len() as u32;
            let want = if limit == 0 { 0 } else { limit - listed };
            let page = self.call(true, rpc!(region, divergent, DivergentRequest { limit: want, start })).await?;
            out.total = page.total;
            out.records.extend(page.records);
            match page.next {
                Some(next) if limit == 0 || (out.records.len() as u32) < limit => start = next,
                next => {
                    out.next = next;
                    return Ok(out);
                }
            }
        }
    }

    /// Changes the region's replication setup (peers, mode, initial
    /// primary), replicated through its Raft log.
    pub async fn configure_region(&self, setup: ReplicationSetup) -> Result<ConfigureResponse> {
        self.call(false, rpc!(region, configure, ConfigureRequest { setup: Some(setup.clone()) })).await
    }

    /// Test only: sets the fault hooks of the node at `endpoint` (refused
    /// unless it runs with fault injection enabled).
    pub async fn set_faults_on(
        &self,
        endpoint: &str,
        blocked_regions: Vec<String>,
        clock_offset_ms: i64,
    ) -> Result<()> {
        self.set_all_faults_on(endpoint, SetFaultsRequest { blocked_regions, clock_offset_ms, ..Default::default() })
            .await
    }

    /// Replaces every fault on one node, link rules included (test only).
    pub async fn set_all_faults_on(&self, endpoint: &str, req: SetFaultsRequest) -> Result<()> {
        let channel = self.channel(endpoint)?;
        Self::region(channel).set_faults(crate::token::request(req)).await.map_err(|s| Error::from_final(&s))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Channels are created lazily, but tonic still wants a runtime around.
    #[tokio::test]
    async fn a_node_that_failed_a_write_is_no_longer_tried_first() {
        let endpoints: Vec<String> = (1..=3).map(|i| format!("http://127.0.0.1:{i}")).collect();
        let c = Client::new(endpoints.clone(), ClientConfig::default()).unwrap();
        assert_eq!(c.first_target(), endpoints[0]);
        c.avoid(&endpoints[0]);
        assert_eq!(c.first_target(), endpoints[1]);
        // Avoiding a node that is not preferred leaves the preference alone.
        c.avoid(&endpoints[0]);
        assert_eq!(c.first_target(), endpoints[1]);
        c.avoid(&endpoints[2]);
        assert_eq!(c.first_target(), endpoints[1]);
        // The last endpoint wraps around to the first.
        c.set_preferred(&endpoints[2]);
        c.avoid(&endpoints[2]);
        assert_eq!(c.first_target(), endpoints[0]);
    }
}
