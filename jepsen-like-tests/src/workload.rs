//! Workloads: what the clients do, and the final reads after healing.
//!
//! - `register`: per-key linearizable reads, blind writes and
//!   compare-and-swaps inside the first region. Every written value is
//!   unique, so a value names the write that produced it.
//! - `set`: unique adds (one key per element) and deletes of elements the
//!   client added, then a final read of every node.
//! - `lww`: blind writes and deletes of a few shared keys from clients in
//!   every region; after healing, a final read of every key on every node.
//! - `large`: unique adds whose values run up to the value limit (256 KiB)
//!   from many clients; the final read checks every value byte for byte.
//! - `failover`: unique adds to whichever region is primary (active-passive
//!   with an authority and controllers); a client that gets an error asks
//!   the regions which one is primary now and writes there next. The final
//!   read is `set`'s; the divergence records are read too.
//! - `counter`: one counter in the first region, incremented through the
//!   client library (`nines-client`) by a linearizable read and a
//!   compare-and-swap on the version read; the library retries unknown
//!   outcomes itself with its session, so a retried swap applies once and
//!   never reports a false mismatch. The final read is the counter's value.
//!
//! Invariants:
//! - Each client process does one operation at a time; its interval covers
//!   every attempt the client library makes for it.
//! - An error classifies an operation as `Fail` only when it certainly had
//!   no effect: any read error, or a write the library reports as never
//!   proposed (`Unavailable`) or refused (`InvalidArgument`,
//!   `FailedPrecondition`). Anything else is `Info`.
//! - Every client loop stops by itself at the run's end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nines::rpc::{Client, ClientConfig, Consistency, Expect, KeyRange};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::history::{Func, Op, Outcome, Recorder};

/// How long a client spends on one operation, over all its attempts. Short,
/// so a client stuck on a cut-off node moves on (as `info`) while the fault
/// lasts; long enough for an election and a retry.
const REQUEST_DEADLINE: Duration = Duration::from_secs(3);

/// A register key is retired after this long: per-key histories stay short
/// enough for the linearizability search (as Jepsen's `independent`).
const REGISTER_KEY_LIFETIME: Duration = Duration::from_secs(10);

/// Pause between one client's operations (ms): about 10 ops/s per client,
/// enough contention for a handful of keys without flooding the checker.
const THINK_MS: std::ops::Range<u64> = 20..150;

/// Most keys a set scan returns per page (`SCAN_LIMIT_MAX` on the server).
const SCAN_PAGE: u32 = 10_000;

/// How long the final reads wait for every node to agree.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Register,
    Set,
    Lww,
    Large,
    Failover,
    Counter,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Set => "set",
            Workload::Lww => "lww",
            Workload::Large => "large",
            Workload::Failover => "failover",
            Workload::Counter => "counter",
        }
    }
}

/// Share of `set` operations that delete an element the client added
/// (and `lww` operations that delete a key): enough tombstones to exercise
/// their replication and collection, while most operations still add.
const DELETE_PERCENT: u32 = 20;

/// Key prefix of the `set` elements, and of the `large` ones.
pub const SET_PREFIX: &str = "s/";
pub const LARGE_PREFIX: &str = "l/";

/// The value a `large` add writes for element `e`: its number and length,
/// then a byte that depends on `e`, up to `len` bytes in all. The final read
/// checks every byte, so a torn or mixed-up value is caught.
pub fn large_value(e: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{e}:{len}:").into_bytes();
    let fill = b'a' + (e % 26) as u8;
    v.resize(len.max(v.len()), fill);
    v
}

/// The element a `large` value belongs to, if every byte is as written.
pub fn check_large_value(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value.get(..value.len().min(64))?).ok()?;
    let mut parts = text.splitn(3, ':');
    let e: u64 = parts.next()?.parse().ok()?;
    let len: usize = parts.next()?.parse().ok()?;
    (large_value(e, len) == value).then_some(e)
}

/// Where each client process sends its operations.
pub struct ClientSpec {
    /// The node the client is bound to, for the record.
    pub node: u64,
    pub endpoints: Vec<String>,
    /// `failover`: every data region as (name, first node, endpoints); the
    /// client writes to the one that is primary. Empty otherwise.
    pub regions: Vec<(String, u64, Vec<String>)>,
}

/// Which nodes the clients use: `register` binds each client to one node of
/// the first region (a client of a cut-off leader keeps asking it, as a
/// real client would); `set` spreads clients over every node; `lww` gives
/// each client one region.
pub fn client_specs(workload: Workload, cluster: &Cluster, concurrency: usize) -> Vec<ClientSpec> {
    let nodes: Vec<u64> = match workload {
        Workload::Register | Workload::Counter => cluster.regions[&cluster.region_order[0]].clone(),
        Workload::Set | Workload::Lww | Workload::Large | Workload::Failover => cluster.data_ids(),
    };
    let regions: Vec<(String, u64, Vec<String>)> = match workload {
        Workload::Failover => cluster
            .region_order
            .iter()
            .map(|r| (r.clone(), cluster.regions[r][0], cluster.region_endpoints(r)))
            .collect(),
        _ => Vec::new(),
    };
    (0..concurrency)
        .map(|i| {
            let node = nodes[i % nodes.len()];
            let endpoints = match workload {
                Workload::Lww => cluster.region_endpoints(cluster.region_of(node)),
                Workload::Failover => regions[0].2.clone(),
                // The library routes within the region by itself.
                Workload::Counter => cluster.region_endpoints(&cluster.region_order[0]),
                _ => vec![cluster.endpoint(node)],
            };
            let node = if workload == Workload::Failover { regions[0].1 } else { node };
            ClientSpec { node, endpoints, regions: regions.clone() }
        })
        .collect()
}

fn client_config() -> ClientConfig {
    ClientConfig {
        attempt_timeout: Duration::from_millis(1500),
        attempts_max: 20,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(300),
        request_deadline: REQUEST_DEADLINE,
    }
}

/// Runs every client until `until`; returns when all have stopped.
pub async fn run_clients(
    workload: Workload,
    specs: Vec<ClientSpec>,
    keys: usize,
    seed: u64,
    recorder: Recorder,
    until: Instant,
) -> anyhow::Result<()> {
    let concurrency = specs.len() as u64;
    let next_value = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let client = Client::new(spec.endpoints.clone(), client_config())?;
        let library = library_builder()
            .endpoints(spec.endpoints.clone())
            .request_timeout(COUNTER_DEADLINE)
            .attempt_timeout(Duration::from_millis(1500))
            .build()?;
        let regions = spec
            .regions
            .iter()
            .map(|(name, node, endpoints)| Ok((name.clone(), *node, Client::new(endpoints.clone(), client_config())?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut c = ClientTask {
            workload,
            client,
            node: spec.node,
            process: i as u64,
            concurrency,
            keys,
            rng: StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i as u64)),
            recorder: recorder.clone(),
            next_value: next_value.clone(),
            last_seen: BTreeMap::new(),
            added: Vec::new(),
            served_by: None,
            regions,
            primary: 0,
            library,
        };
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                c.step().await;
                let think = Duration::from_millis(c.rng.random_range(THINK_MS));
                tokio::time::sleep(think).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

struct ClientTask {
    workload: Workload,
    client: Client,
    node: u64,
    process: u64,
    /// Process numbers advance by this after an `info`, staying unique.
    concurrency: u64,
    keys: usize,
    rng: StdRng,
    recorder: Recorder,
    next_value: Arc<AtomicU64>,
    /// Register: the last value this client saw per key, the `from` of its next CAS.
    last_seen: BTreeMap<String, u64>,
    /// Set: elements this client added (acknowledged) and has not deleted.
    added: Vec<u64>,
    /// The node that answered this step's read and its applied index.
    served_by: Option<(u64, u64)>,
    /// `failover`: every data region (name, first node, client), and the
    /// index of the one this client believes is primary.
    regions: Vec<(String, u64, Client)>,
    primary: usize,
    /// `counter`: the client library, with its session.
    library: nines_client::Client,
}

/// The counter's key.
pub const COUNTER_KEY: &str = "counter";

/// How long one counter operation may take: long enough for the library to
/// settle an unknown outcome across an election (its retries carry the
/// session), short enough that a client stuck behind a fault moves on.
const COUNTER_DEADLINE: Duration = Duration::from_secs(10);

/// Whether a library error leaves a write certainly without effect.
fn library_failed_for_sure(e: &nines_client::Error) -> bool {
    use nines_client::Error as E;
    matches!(e, E::Unavailable { .. } | E::InvalidInput(_) | E::Refused(_) | E::InvalidEndpoint { .. })
}

/// Whether an error leaves a write certainly without effect.
fn write_failed_for_sure(e: &nines::rpc::Error) -> bool {
    use nines::rpc::Error as E;
    matches!(e, E::Unavailable { .. } | E::InvalidArgument(_) | E::FailedPrecondition(_) | E::InvalidEndpoint { .. })
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn version_json(v: &nines_proto::v1::Version) -> Value {
    json!({"physical_ms": v.hlc_physical_ms, "logical": v.hlc_logical, "origin": v.origin_region, "index": v.index})
}

/// A version as every region agrees on it: the log index is where *this*
/// region applied the write, so it differs between regions and is left out.
fn stored_version_json(v: &nines_proto::v1::Version) -> Value {
    json!({"physical_ms": v.hlc_physical_ms, "logical": v.hlc_logical, "origin": v.origin_region})
}

impl ClientTask {
    fn unique(&self) -> u64 {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    async fn step(&mut self) {
        let start_us = self.recorder.now_us();
        if self.workload == Workload::Counter {
            let (input, result) = self.counter_op().await;
            let end_us = self.recorder.now_us();
            let (outcome, output, error) = match result {
                Ok(swapped) => (Outcome::Ok, json!(swapped), None),
                Err(e) => {
                    let sure = library_failed_for_sure(&e);
                    (if sure { Outcome::Fail } else { Outcome::Info }, Value::Null, Some(e.to_string()))
                }
            };
            let node = self.node;
            return self.finish(
                Func::Cas,
                COUNTER_KEY.into(),
                input,
                (outcome, output, error),
                (start_us, end_us),
                node,
            );
        }
        let (f, key, input, result) = match self.workload {
            Workload::Register => self.register_op().await,
            Workload::Set => self.set_op().await,
            Workload::Failover => self.failover_op().await,
            Workload::Lww => {
                let key = format!("w{}", self.rng.random_range(0..self.keys));
                if self.rng.random_range(0..100) < DELETE_PERCENT {
                    let r = self.client.delete(key.clone()).await;
                    (Func::Delete, key, Value::Null, r.map(|d| d.version.as_ref().map_or(Value::Null, version_json)))
                } else {
                    let v = self.unique();
                    let r = self.client.put(key.clone(), v.to_string()).await;
                    (Func::Write, key, json!(v), r.map(|v| version_json(&v)))
                }
            }
            Workload::Counter => unreachable!("counter steps above"),
            Workload::Large => {
                let e = self.unique();
                let len = if self.rng.random_bool(0.25) {
                    nines::limits::VALUE_BYTES_MAX
                } else {
                    self.rng.random_range(1..=nines::limits::VALUE_BYTES_MAX)
                };
                let key = format!("{LARGE_PREFIX}{e:010}");
                let r = self.client.put(key.clone(), large_value(e, len)).await;
                (Func::Add, key, json!(e), r.map(|v| version_json(&v)))
            }
        };
        let end_us = self.recorder.now_us();
        let (outcome, output, error) = match result {
            Ok(out) => (Outcome::Ok, out, None),
            Err(e) => {
                let sure = f == Func::Read || write_failed_for_sure(&e);
                (if sure { Outcome::Fail } else { Outcome::Info }, Value::Null, Some(e.to_string()))
            }
        };
        // A failover write is recorded as sent to the first node of the
        // region it went to (the region is what the checks need).
        let node = match self.workload {
            Workload::Failover => self.regions[self.primary].1,
            _ => self.node,
        };
        if self.workload == Workload::Failover && outcome != Outcome::Ok {
            self.find_primary().await;
        }
        self.finish(f, key, input, (outcome, output, error), (start_us, end_us), node);
    }

    /// Records one operation; an `info` moves the process to a new number.
    fn finish(
        &mut self,
        f: Func,
        key: String,
        input: Value,
        (outcome, output, error): (Outcome, Value, Option<String>),
        (start_us, end_us): (u64, u64),
        node: u64,
    ) {
        self.recorder.record(Op {
            process: self.process,
            f,
            key,
            input,
            outcome,
            output,
            start_us,
            end_us,
            node,
            served_by: self.served_by.take(),
            error,
        });
        if outcome == Outcome::Info {
            self.process += self.concurrency;
        }
    }

    /// One counter increment: a linearizable read, then a compare-and-swap
    /// from the value read to the next (input `[from, to]`, output whether
    /// it swapped). A failed read step proposed nothing: a certain failure.
    async fn counter_op(&mut self) -> (Value, nines_client::Result<bool>) {
        use nines_client::{Error, Expect, Swap};
        let current = match self.library.get(COUNTER_KEY).await {
            Ok(c) => c,
            Err(e) => {
                let e = Error::Unavailable { attempts: 1, last: format!("counter read step: {e}") };
                return (Value::Null, Err(e));
            }
        };
        let (from, expect) = match &current {
            Some(kv) => (parse_u64(&kv.value).unwrap_or(0), Expect::Index(kv.version.index)),
            None => (0, Expect::Absent),
        };
        let to = from + 1;
        let r = self.library.compare_and_swap(COUNTER_KEY, expect, to.to_string()).await;
        (json!([from, to]), r.map(|s| matches!(s, Swap::Done(_))))
    }

    /// One set operation: mostly an add of a new element, sometimes a delete
    /// of an element this client added earlier.
    async fn set_op(&mut self) -> (Func, String, Value, nines::rpc::Result<Value>) {
        if !self.added.is_empty() && self.rng.random_range(0..100) < DELETE_PERCENT {
            let e = self.added.swap_remove(self.rng.random_range(0..self.added.len()));
            let key = format!("{SET_PREFIX}{e:010}");
            let r = self.client.delete(key.clone()).await;
            return (Func::Delete, key, json!(e), r.map(|d| d.version.as_ref().map_or(Value::Null, version_json)));
        }
        let e = self.unique();
        let key = format!("{SET_PREFIX}{e:010}");
        let r = self.client.put(key.clone(), e.to_string()).await;
        if r.is_ok() {
            self.added.push(e);
        }
        (Func::Add, key, json!(e), r.map(|v| version_json(&v)))
    }

    /// One failover operation: an add of a new element, to the region this
    /// client believes is primary.
    async fn failover_op(&mut self) -> (Func, String, Value, nines::rpc::Result<Value>) {
        let e = self.unique();
        let key = format!("{SET_PREFIX}{e:010}");
        let r = self.regions[self.primary].2.put(key.clone(), e.to_string()).await;
        (Func::Add, key, json!(e), r.map(|v| version_json(&v)))
    }

    /// After a failed failover write: asks every region which region is
    /// primary and writes from now on to the one named at the highest epoch
    /// (an old primary cut off from the rest still names itself).
    async fn find_primary(&mut self) {
        let asks =
            self.regions.iter().map(|(_, _, c)| tokio::time::timeout(Duration::from_millis(500), c.region_status()));
        let newest =
            futures::future::join_all(asks).await.into_iter().filter_map(|r| r.ok()?.ok()).max_by_key(|s| s.epoch);
        if let Some(s) = newest
            && let Some(p) = self.regions.iter().position(|(name, _, _)| *name == s.primary)
        {
            self.primary = p;
        }
    }

    /// One register operation: read half the time, else a write, or a CAS
    /// from the last value this client saw.
    async fn register_op(&mut self) -> (Func, String, Value, nines::rpc::Result<Value>) {
        let generation = self.recorder.now_us() / REGISTER_KEY_LIFETIME.as_micros() as u64;
        let key = format!("r{generation}-{}", self.rng.random_range(0..self.keys));
        let roll = self.rng.random_range(0..10);
        if roll < 5 {
            let r = self.client.get(key.clone(), Consistency::Linearizable).await;
            let r = r.map(|resp| {
                self.served_by = Some((resp.served_by, resp.applied_index));
                let v = resp.kv.and_then(|kv| parse_u64(&kv.value));
                if let Some(v) = v {
                    self.last_seen.insert(key.clone(), v);
                }
                json!(v)
            });
            return (Func::Read, key, Value::Null, r);
        }
        let to = self.unique();
        match self.last_seen.get(&key).copied() {
            Some(from) if roll >= 8 => {
                let r = self.cas(&key, from, to).await;
                (Func::Cas, key, json!([from, to]), r.map(|swapped| json!(swapped)))
            }
            _ => {
                let r = self.client.put(key.clone(), to.to_string()).await;
                (Func::Write, key, json!(to), r.map(|_| Value::Null))
            }
        }
    }

    /// Compare-and-swap by value, built from a linearizable read and a CAS
    /// on the version read. Values are unique, so "the version read is still
    /// current" is "the value is still `from`"; the operation takes effect
    /// (or observes a mismatch) at one of its two steps, inside its interval.
    /// A failed read step is a certain failure: nothing was proposed.
    async fn cas(&mut self, key: &str, from: u64, to: u64) -> nines::rpc::Result<bool> {
        let current = self
            .client
            .get(key, Consistency::Linearizable)
            .await
            .map_err(|e| nines::rpc::Error::Unavailable { attempts: 1, last: format!("cas read step: {e}") })?;
        let Some(kv) = current.kv else { return Ok(false) };
        if parse_u64(&kv.value) != Some(from) {
            return Ok(false);
        }
        let index = kv.version.map_or(0, |v| v.index);
        let resp = self.client.compare_and_swap(key, to.to_string(), Expect::Index(index)).await?;
        if resp.succeeded {
            self.last_seen.insert(key.to_string(), to);
        }
        Ok(resp.succeeded)
    }
}

/// A client library builder with this process's TLS identity, if the
/// cluster runs TLS (the compose cluster of `--docker`).
fn library_builder() -> nines_client::ClientBuilder {
    let builder = nines_client::Client::builder();
    match nines::tls::client_identity() {
        Some(tls) => builder.tls(tls),
        None => builder,
    }
}

/// The counter's final value, read linearizably from the first region
/// (bounded by the converge timeout); 0 if it was never written.
pub async fn final_counter(cluster: &Cluster) -> anyhow::Result<u64> {
    let client = library_builder()
        .endpoints(cluster.region_endpoints(&cluster.region_order[0]))
        .request_timeout(CONVERGE_TIMEOUT)
        .build()?;
    let kv = client.get(COUNTER_KEY).await?;
    Ok(kv.and_then(|kv| parse_u64(&kv.value)).unwrap_or(0))
}

/// What every node holds at the end, per key: the value and its version.
pub type NodeState = BTreeMap<String, Option<(String, Value)>>;

/// What the final read reads on every node.
#[derive(Clone, Copy)]
pub enum FinalRead<'a> {
    /// These keys, one by one (lww).
    Keys(&'a BTreeSet<String>),
    /// Every key under the set prefix.
    Set,
    /// Every key under the large prefix; each value is checked byte for byte
    /// and kept as its element number (or `corrupt: ...`), not in full.
    Large,
}

/// The final read: polls every node with local reads until all agree or
/// `CONVERGE_TIMEOUT` passes. Returns each node's state and whether they
/// agreed.
pub async fn final_reads(cluster: &Cluster, what: FinalRead<'_>) -> anyhow::Result<(BTreeMap<u64, NodeState>, bool)> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut clients = BTreeMap::new();
    for id in cluster.data_ids() {
        clients.insert(id, Client::new(vec![cluster.endpoint(id)], client_config())?);
    }
    loop {
        let mut states = BTreeMap::new();
        let mut unread = None;
        for (id, client) in &clients {
            match read_node(client, what).await {
                Ok(s) => {
                    states.insert(*id, s);
                }
                Err(e) => unread = Some(format!("final read of node {id} failed: {e}")),
            }
        }
        let first = states.values().next();
        let agree = unread.is_none() && states.values().all(|s| Some(s) == first);
        if agree {
            return Ok((states, true));
        }
        if Instant::now() > deadline {
            // Never a partial answer: a node that cannot be read is not a
            // node that lost the data.
            if let Some(why) = unread {
                anyhow::bail!("{why} (after {CONVERGE_TIMEOUT:?})");
            }
            return Ok((states, false));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn read_node(client: &Client, what: FinalRead<'_>) -> nines::rpc::Result<NodeState> {
    let mut state = NodeState::new();
    let prefix = match what {
        FinalRead::Keys(keys) => {
            for k in keys {
                let resp = client.get(k.as_str(), Consistency::Local).await?;
                let entry = resp.kv.map(|kv| {
                    let v = kv.version.as_ref().map_or(Value::Null, stored_version_json);
                    (String::from_utf8_lossy(&kv.value).into_owned(), v)
                });
                state.insert(k.clone(), entry);
            }
            return Ok(state);
        }
        FinalRead::Set => SET_PREFIX,
        FinalRead::Large => LARGE_PREFIX,
    };
    let mut start = prefix.as_bytes().to_vec();
    let mut end = start.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    loop {
        let range = KeyRange::Range { start: start.clone(), end: end.clone() };
        let resp = client.scan(range, SCAN_PAGE, Consistency::Local).await?;
        for kv in &resp.kvs {
            let v = kv.version.as_ref().map_or(Value::Null, stored_version_json);
            let value = match what {
                FinalRead::Large => match check_large_value(&kv.value) {
                    Some(e) => e.to_string(),
                    None => format!("corrupt: {} bytes", kv.value.len()),
                },
                _ => String::from_utf8_lossy(&kv.value).into_owned(),
            };
            state.insert(String::from_utf8_lossy(&kv.key).into_owned(), Some((value, v)));
        }
        match (resp.more, resp.kvs.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok(state)
}
