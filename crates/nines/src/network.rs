//! The Raft transport client: openraft's `RaftNetwork` over the internal
//! `Raft` gRPC service.
//!
//! Invariants:
//! - One HTTP/2 channel per peer address, shared by every RPC to that peer
//!   and by request forwarding ([`Channels`]); nothing opens a connection per
//!   RPC.
//! - Each RPC is bounded by openraft's hard TTL for it.
//! - A peer that cannot be connected to is reported `Unreachable`, so
//!   openraft backs off; an append-entries message of several entries that
//!   is over `RAFT_APPEND_BYTES_TARGET` (checked before sending), refused by
//!   the peer for its size, or not done within its deadline is
//!   `PayloadTooLarge` with a smaller entry count, so openraft sends fewer
//!   entries instead of resending the same range forever; any other
//!   transport failure is a `Network` error.
//! - Never `PayloadTooLarge` for a message of one entry or none (a
//!   heartbeat): there is nothing smaller to send, and openraft 0.9's
//!   replication task panics on it while a heartbeat is in flight ("there
//!   can not be two actions with payload in flight"), which ends
//!   replication to that peer for good.
//!
//! Caveats:
//! - openraft's messages travel postcard-encoded inside an opaque protobuf
//!   `bytes` field: both ends must run the same nines build. Rolling upgrades
//!   across versions with a changed message layout are not supported yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nines_proto::v1::RaftMessage;
use nines_proto::v1::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic::transport::Channel;

use crate::config::LatencyConfig;
use crate::events::History;
use crate::faults::{Faults, LinkRule};
use crate::limits::{RAFT_APPEND_BYTES_TARGET, RAFT_MESSAGE_BYTES_MAX};
use crate::storage::LogSynced;
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// How long connecting to a peer may take before the RPC fails. Peers are
/// on a LAN (or loopback): a connection that takes longer is as good as
/// down, and openraft retries.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A cache of one lazily connected channel per address.
#[derive(Clone, Default)]
pub struct Channels {
    /// `std::sync::Mutex`: held only to look up or insert, never across `.await`.
    inner: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    /// The channel to `addr`, created (without connecting) on first use.
    /// Over TLS, with this node's identity, when `addr` is `https://`.
    pub fn get(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let channel = crate::tls::endpoint(addr)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Creates a [`PeerClient`] per target; openraft keeps one per peer.
pub struct NetworkFactory {
    /// This node's id.
    pub id: NodeId,
    /// The connections to peers, shared with the node's other clients.
    pub channels: Channels,
    /// This node, for its region and AZ.
    pub me: NodeInfo,
    /// The simulated latency between AZs and regions.
    pub latency: LatencyConfig,
    /// The test link rules.
    pub faults: Arc<Faults>,
    /// How long openraft waits before it tries an unreachable peer again:
    /// the Raft heartbeat interval (see [`PeerClient::backoff`]).
    pub retry_unreachable: Duration,
    /// Where a peer turning unreachable (and back) is recorded.
    pub history: Arc<History>,
    /// How far this node's log is synced: the commit index it sends is
    /// capped there.
    pub synced: LogSynced,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        let delay = self.latency.between(&self.me.region, &self.me.az, &node.region, &node.az);
        PeerClient {
            id: self.id,
            target,
            addr: node.peer_addr.clone(),
            channel: self.channels.get(&node.peer_addr),
            delay,
            faults: self.faults.clone(),
            retry_unreachable: self.retry_unreachable,
            history: self.history.clone(),
            failures: 0,
            synced: self.synced.clone(),
        }
    }
}

/// How long the log's write under way may take before the leader counts
/// its disk stalled and sends its followers nothing until it lands: above
/// the slowest sync seen under load here (131 ms, large values on a shared
/// disk). With the default timings a follower campaigns after 280-400 ms of
/// silence, so a leader is replaced once one write has stalled about
/// 0.53-0.65 s (it was 0.28-0.4 s when openraft's core waited for every
/// sync); a leader whose every sync takes less keeps its place.
const SYNC_STALL: Duration = Duration::from_millis(250);

/// Shortest wait before an unreachable peer is tried again, whatever the
/// heartbeat: a dead peer costs at most a hundred connection attempts a
/// second.
const RETRY_UNREACHABLE_MIN: Duration = Duration::from_millis(10);

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    addr: String,
    /// An address that does not parse stays an error, reported on each RPC.
    channel: Result<Channel, String>,
    /// Simulated one-way latency to this peer, added before each RPC.
    delay: Duration,
    /// Test link rules, read on each RPC.
    faults: Arc<Faults>,
    retry_unreachable: Duration,
    history: Arc<History>,
    /// RPCs in a row that found the peer unreachable or timed out.
    failures: u32,
    /// How far this node's log is synced.
    synced: LogSynced,
}

/// RPCs in a row that must fail before a peer is recorded unreachable: one
/// slow answer under load is not an event.
const UNREACHABLE_AFTER: u32 = 3;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerClient {
    /// Sends one RPC. `entries` is the number of entries an append-entries
    /// request carries: a message too large for the transport is then
    /// reported as `PayloadTooLarge` with a smaller count to try, so openraft
    /// sends fewer entries instead of resending the same message forever.
    async fn send<Req, Resp, E>(
        &mut self,
        action: RPCTypes,
        req: &Req,
        entries: Option<usize>,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        E: std::error::Error + DeserializeOwned,
        Resp: DeserializeOwned,
    {
        let result = self.send_once(action, req, entries, ttl).await;
        let failed = matches!(&result, Err(RPCError::Unreachable(_) | RPCError::Timeout(_) | RPCError::Network(_)));
        if failed {
            self.failures = self.failures.saturating_add(1);
            if self.failures == UNREACHABLE_AFTER {
                let message = format!("node {} cannot reach node {} at {}", self.id, self.target, self.addr);
                self.history.record("unreachable", message);
            }
        } else if result.is_ok() {
            if self.failures >= UNREACHABLE_AFTER {
                self.history.record("reachable", format!("node {} reaches node {} again", self.id, self.target));
            }
            self.failures = 0;
        }
        result
    }

    /// One RPC, as [`Self::send`] describes.
    async fn send_once<Req, Resp, E>(
        &mut self,
        action: RPCTypes,
        req: &Req,
        entries: Option<usize>,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        E: std::error::Error + DeserializeOwned,
        Resp: DeserializeOwned,
    {
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                let e = TransportError(format!("peer {} address {:?} is unusable: {e}", self.target, self.addr));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        let payload = postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Some(n) = entries
            && n > 1
            && payload.len() > RAFT_APPEND_BYTES_TARGET
        {
            let fit = (n as u128 * RAFT_APPEND_BYTES_TARGET as u128 / payload.len() as u128) as u64;
            return Err(too_large(fit, &TransportError(format!("{} bytes in {n} entries", payload.len()))));
        }
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let msg = RaftMessage { payload };
        let call = async move {
            match action {
                RPCTypes::AppendEntries => client.append_entries(msg).await,
                RPCTypes::Vote => client.vote(msg).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(msg).await,
            }
        };
        let mut delay = self.delay;
        match self.faults.link(self.target) {
            Some(LinkRule::Drop) => {
                // A dropped message is noticed only when the RPC times out,
                // as on a real network. Failing at once would make openraft
                // retry (and log) in a tight loop.
                tokio::time::sleep(ttl).await;
                return Err(RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout: ttl }));
            }
            Some(LinkRule::Delay(extra)) => delay += extra,
            None => {}
        }
        let call = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            call.await
        };
        let resp = match tokio::time::timeout(ttl, call).await {
            // Several entries that did not make it within the deadline are
            // sent in smaller messages next: resending the same range would
            // time out the same way, forever.
            Err(_) if entries.is_some_and(|n| n > 1) => {
                let n = entries.unwrap_or(1) as u64;
                return Err(too_large(n / 2, &TransportError(format!("{n} entries not sent within {ttl:?}"))));
            }
            Err(_) => {
                return Err(RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout: ttl }));
            }
            Ok(Err(status)) if crate::rpc::retry::connect_failed(&status) => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) if refused_for_size(&status) && entries.is_some_and(|n| n > 1) => {
                let n = entries.unwrap_or(1) as u64;
                return Err(too_large(n / 2, &status));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&resp.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Whether a failed RPC is tonic refusing a message over the size limit (on
/// either side, before the request reaches openraft): one of these codes,
/// made by tonic's codec with no cause behind it. The same codes also come
/// from the transport (an HTTP/2 GOAWAY with ENHANCE_YOUR_CALM is
/// `ResourceExhausted`), and those carry their cause: they are network
/// errors, not a size to shrink.
fn refused_for_size(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted) && std::error::Error::source(status).is_none()
}

/// `PayloadTooLarge` asking openraft to send at most `entries` (at least
/// one) per append-entries message next time.
fn too_large<E: std::error::Error>(
    entries: u64,
    cause: &(impl std::error::Error + 'static),
) -> RPCError<NodeId, NodeInfo, E> {
    RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries.max(1)).with_source_error(cause))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    /// After an `Unreachable`, openraft sends nothing to the peer (not even
    /// heartbeats) until this backoff passes; its default is 500 ms. That is
    /// longer than a follower waits before it campaigns (280 ms with the
    /// default timings), so a restarted peer heard nothing from the leader,
    /// started an election and deposed a healthy leader. Here: one
    /// heartbeat interval, then two, then 2.5 for good (100 ms at 40 ms),
    /// well within the leader lease of 5 heartbeats, so a peer that is back
    /// hears the leader before it could campaign, while a dead one costs a
    /// refused connection (and its log lines) ten times a second, not 25.
    fn backoff(&self) -> openraft::network::Backoff {
        let first = self.retry_unreachable.max(RETRY_UNREACHABLE_MIN);
        let steps = [first, first * 2].into_iter().chain(std::iter::repeat(first * 5 / 2));
        openraft::network::Backoff::new(steps)
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let entries = rpc.entries.len();
        // A leader whose log sync stalls (a disk that stopped) goes silent:
        // its followers elect another leader, as they did when openraft's
        // core waited for each of its syncs. (It acknowledges its own appends
        // before their sync now, so nothing else would stop it.)
        let ttl = option.soft_ttl();
        let started = tokio::time::Instant::now();
        if tokio::time::timeout(ttl, self.synced.unstalled(SYNC_STALL)).await.is_err() {
            let timeout = Timeout { action: RPCTypes::AppendEntries, id: self.id, target: self.target, timeout: ttl };
            return Err(RPCError::Timeout(timeout));
        }
        // openraft may count this leader's own entries before they are
        // synced here (see `LogSynced`): a follower that applied one could
        // keep it while a new leader, elected without it, writes over it.
        let mut rpc = rpc;
        rpc.leader_commit = self.synced.cap(rpc.leader_commit);
        // The soft deadline (less any wait above): our own timeout must fire
        // before openraft's (at the hard one) for a slow message to be sent
        // smaller next time.
        let left = ttl.saturating_sub(started.elapsed());
        self.send(RPCTypes::AppendEntries, &rpc, Some(entries), left).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.send(RPCTypes::InstallSnapshot, &rpc, None, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.send(RPCTypes::Vote, &rpc, None, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sourceless_size_code_is_a_size_refusal() {
        // What tonic's codec answers for a message over the limit.
        assert!(refused_for_size(&tonic::Status::resource_exhausted("message length too large")));
        assert!(refused_for_size(&tonic::Status::out_of_range("decoded message length too large")));
        // An HTTP/2 GOAWAY (too_many_resets) arrives with the same code and its cause.
        let mut goaway = tonic::Status::resource_exhausted("h2 protocol error: http2 error");
        goaway.set_source(Arc::new(TransportError("GoAway(too_many_resets, ENHANCE_YOUR_CALM)".into())));
        assert!(!refused_for_size(&goaway));
        assert!(!refused_for_size(&tonic::Status::unavailable("connection reset")));
    }
}
