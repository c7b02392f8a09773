//! The nines client library: what applications embed to read and write a
//! nines cluster. Give it any one endpoint; it learns every region, sends
//! writes to the region that takes them and follows a failover by itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), nines_client::Error> {
//! let client = nines_client::Client::builder().endpoints(["http://127.0.0.1:7001"]).build()?;
//! client.put("greeting", "hello").await?;
//! let kv = client.get("greeting").await?.expect("just written");
//! assert_eq!(kv.value, b"hello");
//! # Ok(()) }
//! ```
//!
//! What a call does, in order:
//! - **Routing.** From a region's status the client learns every region,
//!   its nodes, its role and epoch ([`Topology`]), and refreshes that view
//!   periodically and whenever a region refuses or cannot be reached.
//!   Writes go to the primary region (active-passive) or the home region
//!   (active-active); reads go to the home region. Within a region a call
//!   goes to the node that last answered as leader, follows a node's leader
//!   hint, and spreads local reads over the nodes.
//! - **Circuit breaking.** Each endpoint has a circuit ([`BreakerConfig`]):
//!   after consecutive transport failures (refused, silent, reset) it is
//!   skipped, then probed, then used again.
//! - **Retries.** Every retry waits a jittered exponential backoff (`backon`),
//!   so clients do not retry in lockstep after an election, and no call
//!   outlives its deadline ([`ClientBuilder::request_timeout`]). A request
//!   that certainly had no effect is retried anywhere; a read is always
//!   retried.
//! - **Writes that apply once.** Each write carries this client's session
//!   id and a sequence number; the region keeps the result of each session
//!   write until the client has it. A write whose outcome was unknown (a
//!   timeout, a lost connection) is sent again with the same number and the
//!   region answers with the first result instead of applying it twice. It
//!   is retried only in the region where it may have applied: if writes
//!   have moved to another region meanwhile, the call ends with
//!   [`Error::OutcomeUnknown`].
//!
//! The client is cheap to clone (clones share connections, circuits and the
//! session) and needs a tokio runtime with timers.
//!
//! # Layout
//!
//! - [`Client`], [`ClientBuilder`]: the client, its settings and calls.
//! - [`Error`]: what can go wrong, by what the caller should do.
//! - [`topology`]: the client's view of regions, roles and epochs.
//! - [`breaker`]: the per-endpoint circuit breaker.
//! - The value types: [`KeyValue`], [`Version`], [`Consistency`], [`Expect`],
//!   [`Swap`], [`Deleted`], [`KeyRange`], [`ScanPage`].

#![deny(missing_docs)]

pub mod breaker;
mod error;
pub mod topology;
mod types;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use nines_proto::v1 as pb;
use nines_proto::v1::kv_client::KvClient;
use nines_proto::v1::region_admin_client::RegionAdminClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

pub use breaker::{BreakerConfig, CircuitState};
pub use error::Error;
use error::{Attempt, classify};
pub use topology::{RegionView, Role, Topology};
pub use types::{Consistency, Deleted, Expect, KeyRange, KeyValue, ScanPage, Swap, Version};

/// A call's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Largest response accepted, in bytes: a full scan page (the server caps
/// one at 8 MiB of keys and values) plus framing.
const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The longest timeout or interval the client takes (longer ones are cut
/// to it).
const DURATION_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// The endpoints `nines up` serves its first region on.
pub const LOCAL_ENDPOINTS: &[&str] = &["http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003"];

/// The client's settings; see [`ClientBuilder`] for each.
#[derive(Debug, Clone)]
struct Config {
    endpoints: Vec<String>,
    home_region: Option<String>,
    connect_timeout: Duration,
    attempt_timeout: Duration,
    request_timeout: Duration,
    attempts_max: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    consistency: Consistency,
    refresh_every: Duration,
    breaker: BreakerConfig,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Builds a [`Client`].
///
/// ```
/// use std::time::Duration;
/// let client = nines_client::Client::builder()
///     .endpoints(["http://127.0.0.1:7001", "http://127.0.0.1:7002"])
///     .home_region("us-east")
///     .request_timeout(Duration::from_secs(5))
///     .build()
///     .expect("valid endpoints");
/// # drop(client);
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    config: Config,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            config: Config {
                endpoints: LOCAL_ENDPOINTS.iter().map(|s| s.to_string()).collect(),
                home_region: None,
                connect_timeout: Duration::from_millis(500),
                // Far above a commit (milliseconds) and below an election
                // plus a retry: a silent node costs a caller this long once,
                // then its circuit opens.
                attempt_timeout: Duration::from_secs(2),
                // Covers a leader election (under half a second) and a
                // region failover by the controller (a few seconds).
                request_timeout: Duration::from_secs(15),
                // Jittered backoff capped at 100 ms: a caller learns of a new
                // leader within about 100 ms of its election, and 200
                // attempts last longer than the request timeout.
                attempts_max: 200,
                backoff_min: Duration::from_millis(20),
                backoff_max: Duration::from_millis(100),
                consistency: Consistency::Linearizable,
                refresh_every: Duration::from_secs(5),
                breaker: BreakerConfig::default(),
                keepalive_interval: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(5),
                tls: None,
            },
        }
    }
}

impl ClientBuilder {
    /// Any nodes of the cluster (default: the cluster `nines up` starts);
    /// the others are learned from them.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The region reads go to, and writes in active-active mode (default:
    /// the region of the first endpoint).
    pub fn home_region(mut self, region: impl Into<String>) -> Self {
        self.config.home_region = Some(region.into());
        self
    }

    /// How long connecting to one node may take (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// How long one attempt may take before the client tries elsewhere
    /// (default 2 s).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = timeout;
        self
    }

    /// How long one call may take over all its attempts (default 15 s): no
    /// attempt starts or runs past it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// The most attempts one call makes (default 200).
    pub fn retry_budget(mut self, attempts: u32) -> Self {
        self.config.attempts_max = attempts.max(1);
        self
    }

    /// The first and the longest wait between attempts (default 20 ms and
    /// 100 ms); each wait is jittered.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.backoff_min = min;
        self.config.backoff_max = max.max(min);
        self
    }

    /// The consistency of [`Client::get`] and [`Client::scan`] (default
    /// linearizable).
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.config.consistency = consistency;
        self
    }

    /// How often the topology is refreshed while calls are made (default
    /// 5 s); errors refresh it at once.
    pub fn refresh_interval(mut self, every: Duration) -> Self {
        self.config.refresh_every = every;
        self
    }

    /// The per-endpoint circuit breaker's thresholds.
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.config.breaker = breaker;
        self
    }

    /// HTTP/2 keepalive: a ping every `interval`, and a connection whose
    /// ping is not answered within `timeout` is dropped (default 10 s and
    /// 5 s), so a peer that vanished without a reset does not hang calls.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.keepalive_interval = interval;
        self.config.keepalive_timeout = timeout;
        self
    }

    /// Mutual TLS for `https://` endpoints: the cluster CA and this
    /// client's certificate and key (`nines certs create` makes them), e.g.
    /// `ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key))`.
    /// Without it an `https://` endpoint is refused as invalid.
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// The client. Connections are made on first use, so this needs no
    /// runtime and no reachable node.
    pub fn build(self) -> Result<Client> {
        let mut config = self.config;
        // Timers add these to `Instant::now()`: beyond a day is a mistake,
        // and far beyond it would overflow.
        for d in [
            &mut config.request_timeout,
            &mut config.attempt_timeout,
            &mut config.connect_timeout,
            &mut config.refresh_every,
            &mut config.backoff_min,
            &mut config.backoff_max,
            &mut config.breaker.open_for,
        ] {
            *d = (*d).min(DURATION_MAX);
        }
        if config.endpoints.is_empty() {
            return Err(Error::InvalidEndpoint { endpoint: String::new(), reason: "no endpoints given".into() });
        }
        for e in &config.endpoints {
            endpoint(&config, e)?;
        }
        if config.request_timeout.is_zero() || config.attempt_timeout.is_zero() {
            return Err(Error::InvalidInput("request and attempt timeouts must be above zero".into()));
        }
        let mut client_id = [0u8; 16];
        rand::fill(&mut client_id);
        let inner = Inner {
            topology: RwLock::new(Topology::seeds(config.endpoints.clone())),
            breakers: breaker::Breakers::new(config.breaker),
            config,
            channels: Mutex::new(HashMap::new()),
            refreshed_at: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            leaders: Mutex::new(HashMap::new()),
            // A random first node: clients do not all start at one node.
            rotation: AtomicUsize::new(rand::random::<u16>() as usize),
            session: Session { client: client_id, next: AtomicU64::new(1), in_flight: Mutex::new(BTreeSet::new()) },
        };
        Ok(Client { inner: Arc::new(inner) })
    }
}

/// The tonic endpoint for an address, with the client's timeouts and
/// keepalive.
fn endpoint(config: &Config, addr: &str) -> Result<Endpoint> {
    let invalid = |reason: String| Error::InvalidEndpoint { endpoint: addr.to_string(), reason };
    if !(addr.starts_with("http://") || addr.starts_with("https://")) {
        return Err(invalid("an endpoint is a URL such as http://127.0.0.1:7001".into()));
    }
    let endpoint = Endpoint::from_shared(addr.to_string()).map_err(|e| invalid(e.to_string()))?;
    let endpoint = match (&config.tls, addr.starts_with("https://")) {
        (Some(tls), true) => endpoint.tls_config(tls.clone()).map_err(|e| invalid(e.to_string()))?,
        (None, true) => {
            return Err(invalid("an https:// endpoint needs the client's TLS settings (ClientBuilder::tls)".into()));
        }
        (_, false) => endpoint,
    };
    Ok(endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true))
}

/// This client's session: the id and numbers that make a retried write
/// apply once (see the crate doc).
#[derive(Debug)]
struct Session {
    client: [u8; 16],
    next: AtomicU64,
    /// Numbers sent and not yet answered. `std::sync::Mutex`: no `.await`
    /// while held.
    in_flight: Mutex<BTreeSet<u64>>,
}

/// One write's place in the session, given up when the call ends (however
/// it ends, dropped futures included).
struct SessionWrite<'a> {
    session: &'a Session,
    seq: u64,
}

impl Session {
    fn begin(&self) -> SessionWrite<'_> {
        // Numbered and registered under one lock: another write's
        // `first_unanswered` must never pass a number not yet registered
        // (the region would drop that write's result, or refuse it).
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        in_flight.insert(seq);
        SessionWrite { session: self, seq }
    }
}

impl SessionWrite<'_> {
    fn tag(&self, retry: bool) -> pb::Session {
        let in_flight = self.session.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let first_unanswered = in_flight.first().copied().unwrap_or(self.seq).min(self.seq);
        pb::Session { client: self.session.client.to_vec(), seq: self.seq, first_unanswered, retry }
    }
}

impl Drop for SessionWrite<'_> {
    fn drop(&mut self) {
        self.session.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.seq);
    }
}

/// What a call does, for routing and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read(Consistency),
}

#[derive(Debug)]
struct Inner {
    config: Config,
    /// One channel per endpoint (HTTP/2 multiplexes calls). The std locks
    /// here are never held across an `.await`.
    channels: Mutex<HashMap<String, Channel>>,
    topology: RwLock<Topology>,
    /// When a refresh last finished (`None`: never).
    refreshed_at: Mutex<Option<Instant>>,
    /// A background refresh is running.
    refreshing: AtomicBool,
    /// Per region, the endpoint that last answered as its leader.
    leaders: Mutex<HashMap<String, String>>,
    /// Spreads local reads and first attempts over a region's nodes.
    rotation: AtomicUsize,
    breakers: breaker::Breakers,
    session: Session,
}

/// A client of a nines cluster. Cheap to clone: clones share connections,
/// circuits, the topology and the session.
///
/// ```no_run
/// # async fn demo() -> Result<(), nines_client::Error> {
/// use nines_client::{Client, Expect, Swap};
/// let client = Client::builder().endpoints(["http://127.0.0.1:7001"]).build()?;
/// match client.compare_and_swap("lock", Expect::Absent, "me").await? {
///     Swap::Done(version) => println!("took the lock at {}", version.index),
///     Swap::Mismatch(holder) => println!("held by {:?}", holder.map(|kv| kv.value)),
///     _ => {}
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

impl Client {
    /// A builder with the defaults (the endpoints of `nines up`).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Writes `value` under `key`; returns the new version.
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// let version = client.put("k", "v").await?;
    /// println!("written in {} at index {}", version.origin_region, version.index);
    /// # Ok(()) }
    /// ```
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<Version> {
        let (key, value) = (key.into(), value.into());
        let write = self.inner.session.begin();
        let resp = self
            .call("put", Op::Write, |ch, retry| {
                let req = pb::PutRequest { key: key.clone(), value: value.clone(), session: Some(write.tag(retry)) };
                async move { kv(ch).put(req).await }
            })
            .await?;
        resp.version.map(Version::from_pb).ok_or_else(|| missing("put", "version"))
    }

    /// Reads `key` at the client's default consistency; `None` if absent.
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// if let Some(kv) = client.get("k").await? {
    ///     println!("{:?} at version {}", kv.value, kv.version.index);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>> {
        self.get_with(key, self.inner.config.consistency).await
    }

    /// Reads `key` at the given consistency.
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// let maybe_stale = client.get_with("k", nines_client::Consistency::Local).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_with(&self, key: impl Into<Vec<u8>>, consistency: Consistency) -> Result<Option<KeyValue>> {
        let req = pb::GetRequest { key: key.into(), consistency: consistency.to_pb() };
        let resp = self
            .call("get", Op::Read(consistency), |ch, _| {
                let req = req.clone();
                async move { kv(ch).get(req).await }
            })
            .await?;
        Ok(resp.kv.and_then(KeyValue::from_pb))
    }

    /// Deletes `key` (writes a tombstone).
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// let deleted = client.delete("k").await?;
    /// println!("existed: {}", deleted.existed);
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<Deleted> {
        let key = key.into();
        let write = self.inner.session.begin();
        let resp = self
            .call("delete", Op::Write, |ch, retry| {
                let req = pb::DeleteRequest { key: key.clone(), session: Some(write.tag(retry)) };
                async move { kv(ch).delete(req).await }
            })
            .await?;
        let version = resp.version.map(Version::from_pb).ok_or_else(|| missing("delete", "version"))?;
        Ok(Deleted { existed: resp.existed, version })
    }

    /// Writes `value` under `key` only if its current value is what
    /// `expect` says. Retried after an unknown outcome, it reports what the
    /// first application did (never a false mismatch against its own
    /// write).
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// use nines_client::{Expect, Swap};
    /// let current = client.get("counter").await?.expect("initialised");
    /// match client.compare_and_swap("counter", Expect::Index(current.version.index), "2").await? {
    ///     Swap::Done(_) => println!("incremented"),
    ///     _ => println!("someone else got there first"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Vec<u8>>,
        expect: Expect,
        value: impl Into<Vec<u8>>,
    ) -> Result<Swap> {
        use pb::compare_and_swap_request::Expected;
        let (key, value) = (key.into(), value.into());
        let expected = match expect {
            Expect::Absent => Expected::ExpectAbsent(true),
            Expect::Index(i) => Expected::ExpectedIndex(i),
            Expect::Version(v) => Expected::ExpectedVersion(v.to_pb()),
        };
        let write = self.inner.session.begin();
        let resp = self
            .call("compare_and_swap", Op::Write, |ch, retry| {
                let req = pb::CompareAndSwapRequest {
                    key: key.clone(),
                    value: value.clone(),
                    expected: Some(expected.clone()),
                    session: Some(write.tag(retry)),
                };
                async move { kv(ch).compare_and_swap(req).await }
            })
            .await?;
        if resp.succeeded {
            let version = resp.version.map(Version::from_pb).ok_or_else(|| missing("compare-and-swap", "version"))?;
            Ok(Swap::Done(version))
        } else {
            Ok(Swap::Mismatch(resp.current.and_then(KeyValue::from_pb)))
        }
    }

    /// Lists live keys in `range`, at most `limit` (0: the server's
    /// default), at the client's default consistency.
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
    /// let page = client.scan(nines_client::KeyRange::Prefix(b"user/".to_vec()), 100).await?;
    /// for kv in page.kvs {
    ///     println!("{}", String::from_utf8_lossy(&kv.key));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn scan(&self, range: KeyRange, limit: u32) -> Result<ScanPage> {
        let consistency = self.inner.config.consistency;
        let (start, end, prefix) = match range {
            KeyRange::Range { start, end } => (start, end, Vec::new()),
            KeyRange::Prefix(p) => (Vec::new(), Vec::new(), p),
        };
        let req = pb::ScanRequest { start, end, prefix, limit, consistency: consistency.to_pb() };
        let resp = self
            .call("scan", Op::Read(consistency), |ch, _| {
                let req = req.clone();
                async move { kv(ch).scan(req).await }
            })
            .await?;
        Ok(ScanPage { kvs: resp.kvs.into_iter().filter_map(KeyValue::from_pb).collect(), more: resp.more })
    }

    /// The cluster as the client last saw it.
    ///
    /// ```no_run
    /// # async fn demo(client: nines_client::Client) {
    /// let topology = client.refresh_topology().await;
    /// println!("primary: {:?} at epoch {}", topology.primary, topology.epoch);
    /// # }
    /// ```
    pub fn topology(&self) -> Topology {
        self.inner.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks every known region for its status now and returns the new view.
    pub async fn refresh_topology(&self) -> Topology {
        self.refresh(Instant::now() + self.inner.config.attempt_timeout).await;
        self.topology()
    }

    /// Every endpoint's circuit, for diagnostics.
    ///
    /// ```no_run
    /// # fn demo(client: nines_client::Client) {
    /// for (endpoint, state) in client.circuits() {
    ///     println!("{endpoint}: {state:?}");
    /// }
    /// # }
    /// ```
    pub fn circuits(&self) -> Vec<(String, CircuitState)> {
        self.inner.breakers.states()
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = endpoint(&self.inner.config, addr)?.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// The region reads go to.
    fn home(&self, topology: &Topology) -> String {
        if let Some(home) = &self.inner.config.home_region {
            return home.clone();
        }
        // The region of the first endpoint given that the view places.
        let endpoints = &self.inner.config.endpoints;
        endpoints.iter().find_map(|e| topology.region_of(e)).map(|r| r.name.clone()).unwrap_or_default()
    }

    fn leader_of(&self, region: &str) -> Option<String> {
        self.inner.leaders.lock().unwrap_or_else(|p| p.into_inner()).get(region).cloned()
    }

    fn set_leader(&self, region: &str, endpoint: &str) {
        let mut leaders = self.inner.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if leaders.get(region).map(String::as_str) != Some(endpoint) {
            leaders.insert(region.to_string(), endpoint.to_string());
        }
    }

    fn forget_leader(&self, region: &str, endpoint: &str) {
        let mut leaders = self.inner.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if leaders.get(region).map(String::as_str) == Some(endpoint) {
            leaders.remove(region);
        }
    }

    /// The endpoint of `region` to try next: its leader for writes and
    /// linearizable reads, the next in turn for local reads, skipping open
    /// circuits. `None` when every circuit of the region is open.
    fn pick(&self, topology: &Topology, region: &str, op: Op, now: Instant) -> Option<String> {
        // A region the view does not place (none answered yet): the
        // endpoints given. A write whose outcome is unknown is never sent
        // again this way (see `call_inner`).
        let placed = topology.candidates(region);
        let endpoints = if placed.is_empty() { &self.inner.config.endpoints } else { &placed };
        let n = endpoints.len();
        if op != Op::Read(Consistency::Local)
            && let Some(leader) = self.leader_of(region)
            && endpoints.contains(&leader)
            && self.inner.breakers.allow(&leader, now)
        {
            return Some(leader);
        }
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &endpoints[(start + i) % n]).find(|e| self.inner.breakers.allow(e, now)).cloned()
    }

    /// Refreshes the topology if it was never learned (inline) or is older
    /// than the refresh interval (in the background).
    async fn keep_topology_fresh(&self, deadline: Instant) {
        let refreshed_at = *self.inner.refreshed_at.lock().unwrap_or_else(|p| p.into_inner());
        match refreshed_at {
            // At most half the call's time: the seeds serve if no region
            // answers (a silent seed must leave time for an attempt).
            None => self.refresh(Instant::now() + deadline.saturating_duration_since(Instant::now()) / 2).await,
            Some(at) if at.elapsed() >= self.inner.config.refresh_every => {
                if !self.inner.refreshing.swap(true, Ordering::AcqRel) {
                    let client = self.clone();
                    // Cleared however the task ends, even if it never runs
                    // (a runtime shutting down drops it).
                    let done = Refreshing(client.inner.clone());
                    tokio::spawn(async move {
                        let _done = done;
                        client.refresh(Instant::now() + client.inner.config.attempt_timeout).await;
                    });
                }
            }
            Some(_) => {}
        }
    }

    /// Asks every known region for its status, each of its endpoints in
    /// parallel (a silent node must not keep the others from answering),
    /// within one attempt timeout and never past `deadline`, and merges the
    /// first answer of each region.
    async fn refresh(&self, deadline: Instant) {
        let topology = self.topology();
        let groups: Vec<Vec<String>> = topology.regions.iter().map(|r| topology.candidates(&r.name)).collect();
        let mut asks = tokio::task::JoinSet::new();
        for (group, endpoints) in groups.iter().enumerate() {
            for endpoint in endpoints {
                if self.inner.breakers.is_open(endpoint, Instant::now()) {
                    continue;
                }
                let (client, endpoint) = (self.clone(), endpoint.clone());
                asks.spawn(async move { (group, client.region_status(&endpoint).await.map(|s| (endpoint, s))) });
            }
        }
        let until = tokio::time::Instant::from_std(deadline.min(Instant::now() + self.inner.config.attempt_timeout));
        let mut answered = vec![false; groups.len()];
        let mut reports = Vec::new();
        while !answered.iter().all(|a| *a) {
            let Ok(Some(joined)) = tokio::time::timeout_at(until, asks.join_next()).await else { break };
            if let Ok((group, Some((endpoint, status)))) = joined
                && !answered[group]
            {
                answered[group] = true;
                reports.push(topology::Report { asked: groups[group].clone(), answered: endpoint, status });
            }
        }
        if reports.is_empty() {
            return;
        }
        let mut topology = self.inner.topology.write().unwrap_or_else(|p| p.into_inner());
        let merged = topology.merge(&reports);
        if merged.primary != topology.primary || merged.epoch != topology.epoch {
            tracing::info!(primary = ?merged.primary, epoch = merged.epoch, "the cluster's primary region changed");
        }
        *topology = merged;
        drop(topology);
        *self.inner.refreshed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// One node's region status, within one attempt timeout.
    async fn region_status(&self, endpoint: &str) -> Option<pb::RegionStatusResponse> {
        let channel = self.channel(endpoint).ok()?;
        let mut admin = RegionAdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX);
        let ask = admin.region_status(pb::RegionStatusRequest { from_controller: false });
        match tokio::time::timeout(self.inner.config.attempt_timeout, ask).await {
            Ok(Ok(r)) => {
                self.inner.breakers.success(endpoint);
                Some(r.into_inner())
            }
            Ok(Err(status)) => {
                if classify(&status).transport() {
                    self.inner.breakers.failure(endpoint, Instant::now());
                }
                None
            }
            Err(_) => {
                self.inner.breakers.failure(endpoint, Instant::now());
                None
            }
        }
    }

    /// Waits the next backoff, never past `deadline`.
    async fn back_off(&self, backoff: &mut impl Iterator<Item = Duration>, deadline: Instant) {
        let wait = backoff.next().unwrap_or(self.inner.config.backoff_max);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait.min(left)).await;
    }

    /// Runs one call with routing, circuit breaking and bounded retries.
    /// `attempt` sends it to a channel; its flag says the write was sent
    /// before with an unknown outcome (a session repeat).
    async fn call<T, F, Fut>(&self, name: &'static str, op: Op, attempt: F) -> Result<T>
    where
        F: FnMut(Channel, bool) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let span = tracing::debug_span!("nines_client", call = name);
        self.call_inner(op, attempt).instrument(span).await
    }

    async fn call_inner<T, F, Fut>(&self, op: Op, mut attempt: F) -> Result<T>
    where
        F: FnMut(Channel, bool) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff_min)
            .with_max_delay(config.backoff_max)
            .with_jitter()
            .without_max_times()
            .build();
        let mut hint: Option<String> = None;
        // The region a write may have applied in: it is retried only there.
        let mut pinned: Option<String> = None;
        let mut last = String::from("no attempt was made");
        let mut attempts = 0;
        self.keep_topology_fresh(deadline).await;
        while attempts < config.attempts_max && Instant::now() < deadline {
            let topology = self.topology();
            let home = self.home(&topology);
            let region = match op {
                Op::Write => topology.write_region(&home).to_string(),
                Op::Read(_) => home.clone(),
            };
            if let Some(p) = &pinned
                && *p != region
            {
                return Err(Error::OutcomeUnknown(format!(
                    "{last}; writes moved from region {p:?} to {region:?} meanwhile, and a write whose outcome is \
                     unknown is retried only where it may have applied"
                )));
            }
            let now = Instant::now();
            let target = match hint.take().filter(|h| self.inner.breakers.allow(h, now)) {
                Some(h) => h,
                None => match self.pick(&topology, &region, op, now) {
                    Some(t) => t,
                    None => {
                        last = format!("every endpoint of region {region:?} failed recently (circuits open)");
                        self.refresh(deadline).await;
                        self.back_off(&mut backoff, deadline).await;
                        continue;
                    }
                },
            };
            attempts += 1;
            let per_attempt = config.attempt_timeout.min(deadline.saturating_duration_since(now));
            let channel = match self.channel(&target) {
                Ok(c) => c,
                // A learned endpoint or hint that is not a usable URL.
                Err(e) if pinned.is_some() => return Err(Error::OutcomeUnknown(format!("{last}; then {e}"))),
                Err(e) => return Err(e),
            };
            let outcome = tokio::time::timeout(per_attempt, attempt(channel, pinned.is_some())).await;
            let (status, class) = match outcome {
                Ok(Ok(resp)) => {
                    self.inner.breakers.success(&target);
                    if op != Op::Read(Consistency::Local) {
                        self.set_leader(&region, &target);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => {
                    let class = classify(&status);
                    (status, class)
                }
                // The client's own timeout: a silent node, a transport
                // failure whose outcome is unknown; held against the node
                // only if it had a whole attempt timeout (not one cut short
                // by the call's deadline).
                Err(_) => (
                    Status::deadline_exceeded(format!("no answer within {per_attempt:?}")),
                    Attempt::Unknown { transport: per_attempt >= config.attempt_timeout },
                ),
            };
            last = format!("{target}: {}", status.message());
            tracing::debug!(attempt = attempts, %target, error = %status.message(), ?class, "attempt failed");
            if class.transport() {
                self.inner.breakers.failure(&target, Instant::now());
                self.forget_leader(&region, &target);
            } else {
                self.inner.breakers.success(&target);
            }
            match class {
                // After an attempt whose outcome is unknown, a refusal says
                // nothing about that attempt (the region may have applied it
                // and been fenced or demoted since).
                Attempt::Final(_) | Attempt::SessionExpired if pinned.is_some() => {
                    return Err(Error::OutcomeUnknown(format!("{last}; an earlier attempt's outcome is unknown")));
                }
                Attempt::Final(Error::Refused(reason)) if op == Op::Write => {
                    // A secondary refuses writes: if the primary moved, the
                    // refused write (no effect) goes to the new one.
                    self.refresh(deadline).await;
                    if self.topology().write_region(&home) == region {
                        return Err(Error::Refused(reason));
                    }
                }
                Attempt::Final(e) => return Err(e),
                Attempt::SessionExpired => return Err(Error::OutcomeUnknown(last)),
                Attempt::NotApplied { leader: Some(leader), .. } if leader != target => {
                    // Straight to a fresh hint; a hint that keeps moving (an
                    // election) still backs off.
                    if attempts > 1 {
                        self.back_off(&mut backoff, deadline).await;
                    }
                    hint = Some(leader);
                }
                Attempt::NotApplied { .. } => self.back_off(&mut backoff, deadline).await,
                // No region answered yet: the endpoints given may span
                // regions, and the session is per region, so the write is
                // not sent again.
                Attempt::Unknown { .. } if op == Op::Write => {
                    // Pinned to the region the endpoint belongs to, which
                    // must be the region writes go to now.
                    match topology.region_of(&target) {
                        Some(r) if !r.name.is_empty() && r.name == region => pinned = Some(region),
                        _ => {
                            return Err(Error::OutcomeUnknown(format!(
                                "{last}; the endpoint is not known to be in region {region:?}"
                            )));
                        }
                    }
                    self.back_off(&mut backoff, deadline).await;
                }
                Attempt::Unknown { .. } => self.back_off(&mut backoff, deadline).await,
            }
        }
        Err(match pinned {
            Some(_) => Error::OutcomeUnknown(last),
            None => Error::Unavailable { attempts, last },
        })
    }
}

/// Clears `Inner::refreshing` when a background refresh ends.
struct Refreshing(Arc<Inner>);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

/// A response without a field the server always sets.
fn missing(call: &str, field: &str) -> Error {
    Error::Server { code: "Internal".into(), message: format!("{call} response without its {field}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_endpoints_are_refused_by_name() {
        let e = Client::builder().endpoints(["127.0.0.1:7001"]).build().unwrap_err();
        assert!(matches!(&e, Error::InvalidEndpoint { endpoint, .. } if endpoint == "127.0.0.1:7001"), "{e}");
        let none: [&str; 0] = [];
        assert!(matches!(Client::builder().endpoints(none).build(), Err(Error::InvalidEndpoint { .. })));
    }

    #[test]
    fn a_session_names_its_oldest_unanswered_write() {
        let s = Session { client: [1; 16], next: AtomicU64::new(1), in_flight: Mutex::new(BTreeSet::new()) };
        let one = s.begin();
        let two = s.begin();
        assert_eq!((two.tag(false).seq, two.tag(false).first_unanswered), (2, 1));
        drop(one);
        let t = two.tag(true);
        assert_eq!((t.seq, t.first_unanswered, t.retry), (2, 2, true));
        drop(two);
        assert_eq!(s.begin().tag(false).first_unanswered, 3);
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_within_the_deadline_as_unavailable() {
        // Port 1 on loopback refuses connections: nothing was sent.
        let client = Client::builder()
            .endpoints(["http://127.0.0.1:1"])
            .request_timeout(Duration::from_millis(600))
            .build()
            .unwrap();
        let started = Instant::now();
        let e = client.put("k", "v").await.unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded by the deadline");
        assert!(
            client
                .circuits()
                .iter()
                .any(|(_, s)| matches!(s, CircuitState::Open { .. } | CircuitState::HalfOpen { .. }))
        );
    }
}
