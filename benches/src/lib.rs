//! A load generator that drives nines and etcd with the same workload from
//! the same code, so their numbers compare like for like.
//!
//! # Layout
//!
//! - [`Workload`]: clients, keys, value size, read/write mix, duration, warm-up.
//! - [`Target`]: the system under test (nines through its client library,
//!   etcd through its gRPC KV API).
//! - [`run`]: warm-up, then the measured run; [`Report`]: throughput and
//!   latency percentiles from hdrhistogram, as a table or JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

/// Most concurrent clients one run may have: each is a task with its own
/// connection share; beyond this the generator, not the target, saturates.
pub const CLIENTS_MAX: usize = 4096;

/// Largest value the generator writes, in bytes (nines' own value limit).
pub const VALUE_BYTES_MAX: usize = 256 * 1024;

/// Longest measured run, so a mistyped duration cannot run for hours.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);

/// Highest latency the histograms track, in microseconds (60 s); slower
/// operations are clamped to it and counted as such.
const LATENCY_US_MAX: u64 = 60_000_000;

/// What every client does.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub clients: usize,
    pub keys: u64,
    pub value_bytes: usize,
    /// Fraction of operations that are reads, 0.0 to 1.0.
    pub read_ratio: f64,
    #[serde(with = "humantime_secs")]
    pub duration: Duration,
    #[serde(with = "humantime_secs")]
    pub warmup: Duration,
}

mod humantime_secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Workload {
    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.clients >= 1 && self.clients <= CLIENTS_MAX, "--clients must be in 1..={CLIENTS_MAX}");
        anyhow::ensure!(self.keys >= 1, "--keys must be at least 1");
        anyhow::ensure!(self.value_bytes <= VALUE_BYTES_MAX, "--value-size must be at most {VALUE_BYTES_MAX} bytes");
        anyhow::ensure!((0.0..=1.0).contains(&self.read_ratio), "--read-ratio must be between 0 and 1");
        anyhow::ensure!(!self.duration.is_zero() && self.duration <= DURATION_MAX, "--duration must be in (0, 1h]");
        anyhow::ensure!(self.warmup <= DURATION_MAX, "--warmup must be at most 1h");
        Ok(())
    }
}

/// etcd's v3 KV API (the part the benchmark uses), generated from
/// `proto/etcd_kv.proto`.
pub mod etcdpb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

/// The system under test.
#[derive(Clone)]
pub enum Target {
    Nines(Arc<nines::rpc::Client>),
    /// One channel per etcd member; client `i` uses member `i % n` (etcd
    /// forwards to its leader itself).
    Etcd(Vec<etcdpb::kv_client::KvClient<tonic::transport::Channel>>),
}

impl Target {
    pub async fn nines(endpoints: Vec<String>) -> anyhow::Result<Target> {
        Ok(Target::Nines(Arc::new(nines::rpc::Client::new(endpoints, nines::rpc::ClientConfig::default())?)))
    }

    pub async fn etcd(endpoints: Vec<String>) -> anyhow::Result<Target> {
        let mut clients = Vec::new();
        for e in endpoints {
            let url = if e.starts_with("http") { e } else { format!("http://{e}") };
            let channel = tonic::transport::Endpoint::from_shared(url)?.tcp_nodelay(true).connect().await?;
            clients.push(etcdpb::kv_client::KvClient::new(channel));
        }
        anyhow::ensure!(!clients.is_empty(), "no etcd endpoints");
        Ok(Target::Etcd(clients))
    }

    /// The view of client number `i`.
    fn for_client(&self, i: usize) -> Target {
        match self {
            Target::Nines(c) => Target::Nines(c.clone()),
            Target::Etcd(cs) => Target::Etcd(vec![cs[i % cs.len()].clone()]),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Nines(_) => "nines",
            Target::Etcd(_) => "etcd",
        }
    }

    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Target::Nines(c) => {
                c.put(key, value).await?;
            }
            Target::Etcd(c) => {
                c[0].put(etcdpb::PutRequest { key, value, ..Default::default() }).await?;
            }
        }
        Ok(())
    }

    /// A linearizable read (etcd's default, nines' ReadIndex).
    async fn get(&mut self, key: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Target::Nines(c) => {
                c.get(key, nines::rpc::Consistency::Linearizable).await?;
            }
            Target::Etcd(c) => {
                c[0].range(etcdpb::RangeRequest { key, ..Default::default() }).await?;
            }
        }
        Ok(())
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

/// Writes every key once, so reads find values.
pub async fn preload(target: &Target, w: &Workload) -> anyhow::Result<()> {
    let per = w.keys.div_ceil(w.clients as u64);
    let mut tasks = Vec::new();
    for c in 0..w.clients as u64 {
        let mut t = target.for_client(c as usize);
        let value = vec![b'v'; w.value_bytes];
        tasks.push(tokio::spawn(async move {
            for i in (c * per)..((c + 1) * per) {
                t.put(key(i), value.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The result of one measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub workload: Workload,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Report {
    fn from(target: &str, w: &Workload, hist: &Histogram<u64>, errors: u64, elapsed: Duration) -> Report {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Report {
            target: target.to_string(),
            workload: w.clone(),
            ops: hist.len(),
            errors,
            ops_per_sec: hist.len() as f64 / elapsed.as_secs_f64(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: hist.max() as f64 / 1000.0,
        }
    }

    /// One table row: target, clients, mix, throughput, percentiles.
    pub fn table_row(&self) -> String {
        format!(
            "{:<6} {:>7} {:>5.0}% {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            self.target,
            self.workload.clients,
            self.workload.read_ratio * 100.0,
            self.ops_per_sec,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.errors
        )
    }

    pub const TABLE_HEADER: &'static str =
        "TARGET CLIENTS READS      OPS/S   P50(ms)   P90(ms)   P99(ms) P99.9(ms)  ERRORS";
}

/// Runs the workload: every client loops until the deadline, first through
/// the warm-up (not recorded), then the measured duration.
pub async fn run(target: &Target, w: &Workload) -> anyhow::Result<Report> {
    w.validate()?;
    let warm_until = Instant::now() + w.warmup;
    let measure_until = warm_until + w.duration;
    let mut tasks = Vec::new();
    for c in 0..w.clients {
        let mut t = target.for_client(c);
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9 ^ c as u64);
            let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
            let mut errors = 0u64;
            let value = vec![b'x'; w.value_bytes];
            loop {
                let now = Instant::now();
                if now >= measure_until {
                    break;
                }
                let k = key(rng.random_range(0..w.keys));
                let read = rng.random_bool(w.read_ratio);
                let started = Instant::now();
                let ok = if read { t.get(k).await.is_ok() } else { t.put(k, value.clone()).await.is_ok() };
                if started >= warm_until {
                    if ok {
                        hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((hist, errors))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        total.add(h)?;
        errors += e;
    }
    Ok(Report::from(target.name(), w, &total, errors, w.duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            clients: 4,
            keys: 100,
            value_bytes: 128,
            read_ratio: 0.5,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
        }
    }

    /// Spoils one field of a workload.
    type Spoil = fn(&mut Workload);

    #[test]
    fn bad_workloads_name_the_flag() {
        let table: [(Spoil, &str); 5] = [
            (|w| w.clients = 0, "--clients"),
            (|w| w.keys = 0, "--keys"),
            (|w| w.value_bytes = VALUE_BYTES_MAX + 1, "--value-size"),
            (|w| w.read_ratio = 1.5, "--read-ratio"),
            (|w| w.duration = Duration::ZERO, "--duration"),
        ];
        for (spoil, flag) in table {
            let mut w = workload();
            spoil(&mut w);
            let e = w.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        workload().validate().unwrap();
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let r = Report::from("nines", &workload(), &h, 2, Duration::from_secs(2));
        assert_eq!(r.ops, 1000);
        assert_eq!(r.ops_per_sec, 500.0);
        assert!((r.p50_ms - 500.0).abs() < 1.0, "{}", r.p50_ms);
        assert!((r.p99_ms - 990.0).abs() < 2.0, "{}", r.p99_ms);
        assert_eq!(r.errors, 2);
    }
}
