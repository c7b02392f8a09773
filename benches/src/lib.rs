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

/// Highest open-loop rate, operations per second.
pub const RATE_MAX: f64 = 1_000_000.0;

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
    /// Open loop: operations per second over all clients, each sent at its
    /// intended time whatever the ones before it are doing, and its latency
    /// counted from that time (so a stall shows in every operation it
    /// delayed, not only the one it hit: no coordinated omission). `None`:
    /// closed loop, each client sends its next operation when the last one
    /// is answered.
    pub rate: Option<f64>,
    /// Where to append a line `SENT ACKED` (Unix seconds) per acknowledged
    /// operation as it happens, for failover measurements: the first
    /// acknowledgement of an operation sent after a kill is the recovery.
    #[serde(skip)]
    pub ack_log: Option<std::path::PathBuf>,
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
        if let Some(rate) = self.rate {
            anyhow::ensure!(rate.is_finite() && rate > 0.0 && rate <= RATE_MAX, "--rate must be in (0, {RATE_MAX}]");
        }
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
    /// One channel per etcd member and the one in use: client `i` starts
    /// on member `i % n` (etcd forwards to its leader itself) and moves to
    /// the next member after an error, as etcd's own client does.
    Etcd(Vec<etcdpb::kv_client::KvClient<tonic::transport::Channel>>, usize),
}

impl Target {
    pub async fn nines(endpoints: Vec<String>) -> anyhow::Result<Target> {
        Ok(Target::Nines(Arc::new(nines::rpc::Client::new(endpoints, nines::rpc::ClientConfig::default())?)))
    }

    pub async fn etcd(endpoints: Vec<String>) -> anyhow::Result<Target> {
        let mut clients = Vec::new();
        for e in endpoints {
            let url = if e.starts_with("http") { e } else { format!("http://{e}") };
            // Bounded like etcd's own client (5 s per request), so a member
            // that went away costs one timeout, then the next member is used.
            let channel = tonic::transport::Endpoint::from_shared(url)?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(5))
                .connect()
                .await?;
            clients.push(etcdpb::kv_client::KvClient::new(channel));
        }
        anyhow::ensure!(!clients.is_empty(), "no etcd endpoints");
        Ok(Target::Etcd(clients, 0))
    }

    /// The view of client number `i`.
    fn for_client(&self, i: usize) -> Target {
        match self {
            Target::Nines(c) => Target::Nines(c.clone()),
            Target::Etcd(cs, _) => Target::Etcd(cs.clone(), i % cs.len()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Nines(_) => "nines",
            Target::Etcd(..) => "etcd",
        }
    }

    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Target::Nines(c) => {
                c.put(key, value).await?;
            }
            Target::Etcd(c, at) => {
                let put = c[*at].put(etcdpb::PutRequest { key, value, ..Default::default() }).await;
                if put.is_err() {
                    *at = (*at + 1) % c.len();
                }
                put?;
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
            Target::Etcd(c, at) => {
                let range = c[*at].range(etcdpb::RangeRequest { key, ..Default::default() }).await;
                if range.is_err() {
                    *at = (*at + 1) % c.len();
                }
                range?;
            }
        }
        Ok(())
    }
}

/// Now, in seconds since the Unix epoch (comparable with `date +%s.%N`).
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
    /// Operations answered over the warm-up and the measured run, failed
    /// ones included: what the target's CPU time is divided by.
    pub ops_total: u64,
    pub errors: u64,
    /// The first failed operation's error, if any failed: what the
    /// errors were.
    pub first_error: Option<String>,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Report {
    fn from(
        target: &str,
        w: &Workload,
        hist: &Histogram<u64>,
        errors: u64,
        first_error: Option<String>,
        ops_total: u64,
        elapsed: Duration,
    ) -> Report {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Report {
            target: target.to_string(),
            workload: w.clone(),
            ops: hist.len(),
            ops_total,
            errors,
            first_error,
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
/// the warm-up (not recorded), then the measured duration. In an open loop
/// client `c` sends its `k`-th operation at `start + (k + c / clients) x
/// clients / rate`, and the latency is counted from that time.
pub async fn run(target: &Target, w: &Workload) -> anyhow::Result<Report> {
    w.validate()?;
    let start = Instant::now();
    let warm_until = start + w.warmup;
    let measure_until = warm_until + w.duration;
    let ack_log = match &w.ack_log {
        Some(path) => Some(Arc::new(std::sync::Mutex::new(std::io::LineWriter::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("--ack-log {}: {e}", path.display()))?,
        )))),
        None => None,
    };
    let mut tasks = Vec::new();
    for c in 0..w.clients {
        let mut t = target.for_client(c);
        let w = w.clone();
        let ack_log = ack_log.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9 ^ c as u64);
            let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
            let (mut errors, mut answered) = (0u64, 0u64);
            let mut first_error = None;
            let mut last_done = start;
            let value = vec![b'x'; w.value_bytes];
            // Open loop: the gap between one client's sends.
            let gap = w.rate.map(|rate| Duration::from_secs_f64(w.clients as f64 / rate));
            let mut k = 0u32;
            loop {
                let intended = match gap {
                    Some(gap) => start + gap.mul_f64(f64::from(k) + c as f64 / w.clients as f64),
                    None => Instant::now(),
                };
                if intended >= measure_until {
                    break;
                }
                // Only an open loop waits: a timer rounds up to the next
                // millisecond, which a closed loop would add to every
                // operation.
                if gap.is_some() {
                    tokio::time::sleep_until(intended.into()).await;
                }
                k += 1;
                let key = key(rng.random_range(0..w.keys));
                let read = rng.random_bool(w.read_ratio);
                let sent = unix_now();
                let outcome = if read { t.get(key).await } else { t.put(key, value.clone()).await };
                let ok = outcome.is_ok();
                answered += 1;
                last_done = last_done.max(Instant::now());
                if let (true, Some(log)) = (ok, &ack_log) {
                    use std::io::Write;
                    let mut log = log.lock().map_err(|_| anyhow::anyhow!("ack log lock poisoned"))?;
                    writeln!(log, "{sent:.6} {:.6}", unix_now())?;
                }
                if intended >= warm_until {
                    if ok {
                        hist.saturating_record((intended.elapsed().as_micros() as u64).max(1));
                    } else {
                        errors += 1;
                        if let (None, Err(e)) = (&first_error, outcome) {
                            first_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            anyhow::Ok((hist, errors, first_error, answered, last_done))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    let (mut errors, mut answered, mut last_done) = (0, 0, measure_until);
    let mut first_error = None;
    for t in tasks {
        let (h, e, first, a, done) = t.await??;
        total.add(h)?;
        errors += e;
        first_error = first_error.or(first);
        answered += a;
        last_done = last_done.max(done);
    }
    // An open loop's operations are the schedule's: its throughput is them
    // over the time until the last was answered, which a target that fell
    // behind stretches past the measured duration.
    let elapsed = if w.rate.is_some() { last_done - warm_until } else { w.duration };
    Ok(Report::from(target.name(), w, &total, errors, first_error, answered, elapsed))
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
            rate: None,
            ack_log: None,
        }
    }

    /// Spoils one field of a workload.
    type Spoil = fn(&mut Workload);

    #[test]
    fn bad_workloads_name_the_flag() {
        let table: [(Spoil, &str); 7] = [
            (|w| w.clients = 0, "--clients"),
            (|w| w.keys = 0, "--keys"),
            (|w| w.value_bytes = VALUE_BYTES_MAX + 1, "--value-size"),
            (|w| w.read_ratio = 1.5, "--read-ratio"),
            (|w| w.duration = Duration::ZERO, "--duration"),
            (|w| w.rate = Some(0.0), "--rate"),
            (|w| w.rate = Some(f64::NAN), "--rate"),
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
        let first = Some("unavailable: no leader".to_string());
        let r = Report::from("nines", &workload(), &h, 2, first.clone(), 1002, Duration::from_secs(2));
        assert_eq!(r.ops, 1000);
        assert_eq!(r.ops_per_sec, 500.0);
        assert!((r.p50_ms - 500.0).abs() < 1.0, "{}", r.p50_ms);
        assert!((r.p99_ms - 990.0).abs() < 2.0, "{}", r.p99_ms);
        assert_eq!(r.errors, 2);
        assert_eq!(r.first_error, first);
        assert_eq!(r.ops_total, 1002);
    }
}
