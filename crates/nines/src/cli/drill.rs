//! `nines drill`: the classic disaster-recovery strategies measured on real
//! node processes. For each strategy it starts the topology, runs a writer
//! whose every acknowledged write is known, destroys the primary region
//! (kill -9 every node and delete its data), recovers the way the strategy
//! does, and measures:
//!
//! - RTO: last acknowledged write before the disaster to the first
//!   acknowledged write after recovery;
//! - RPO: acknowledged writes missing after recovery (every key is read),
//!   their maximum age at the disaster, and the window they span;
//! - cost: node processes running before the disaster.
//!
//! The writer is the application: it writes fresh keys to its home region
//! and, after `CLIENT_FAILOVER_AFTER` of failures, to the recovery region
//! (whose endpoints it is given at start, as a DNS failover record would).
//! Recovery is what an operator or the controller does, started at once
//! (the drill's detection time is zero, except the controller's own).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rpc::{Client, ClientConfig, Consistency, KeyRange};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::backup::restore_into;
use super::local::{Local, STARTUP_DEADLINE, member};
use super::{Format, Global};
use crate::backup::restore::Until;
use crate::config::{BackupConfig, ClusterConfig, LatencyConfig, Mode, NodeConfig, RegionConfig};

/// How long the writer sees failures before it moves to the recovery
/// region: longer than an election inside a region, so a leader change
/// never moves it.
const CLIENT_FAILOVER_AFTER: Duration = Duration::from_secs(2);

/// How long the writer goes on after the first write acknowledged after
/// recovery, so the report shows the recovered rate.
const AFTER_RECOVERY: Duration = Duration::from_secs(3);

/// The longest a recovery may take before the drill gives up on it.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(180);

/// The width of a bar in the timeline.
const BUCKET: Duration = Duration::from_millis(250);

/// The key prefix of the writer's keys.
const PREFIX: &str = "drill-";

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// Which strategy to drill.
    #[arg(long, value_enum, default_value_t = StrategyArg::All)]
    pub strategy: StrategyArg,
    /// How long the writer runs before the disaster.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub time: Duration,
    /// Seeds the writer's value sizes and the disaster's moment.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the HTML report and results.json go.
    #[arg(long, default_value = "drill-report")]
    pub report: PathBuf,
    /// Keep the nodes' data here (default: a temporary directory, removed).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    BackupRestore,
    PilotLight,
    WarmStandby,
    ActiveActive,
    All,
}

/// How a scenario recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    BackupRestore { archive: bool },
    PilotLight,
    WarmStandby,
    ActiveActive,
}

/// One measured run.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    strategy: Strategy,
    /// Cut the link between the regions this long before the disaster.
    cut_before: Option<Duration>,
    max_rpo: Duration,
    textbook: &'static str,
}

fn scenarios(arg: StrategyArg, time: Duration) -> Vec<Scenario> {
    let cut = Some(time / 3);
    let backup = |archive, name| Scenario {
        name,
        strategy: Strategy::BackupRestore { archive },
        cut_before: None,
        max_rpo: Duration::ZERO,
        textbook: "RPO hours, RTO hours",
    };
    let warm = |name, cut_before, max_rpo| Scenario {
        name,
        strategy: Strategy::WarmStandby,
        cut_before,
        max_rpo,
        textbook: "RPO seconds, RTO minutes",
    };
    let mut out = Vec::new();
    if matches!(arg, StrategyArg::BackupRestore | StrategyArg::All) {
        out.push(backup(false, "backup-restore"));
        out.push(backup(true, "backup-restore+archive"));
    }
    if matches!(arg, StrategyArg::PilotLight | StrategyArg::All) {
        out.push(Scenario {
            name: "pilot-light",
            strategy: Strategy::PilotLight,
            cut_before: None,
            max_rpo: Duration::ZERO,
            textbook: "RPO minutes, RTO tens of minutes",
        });
    }
    if matches!(arg, StrategyArg::WarmStandby | StrategyArg::All) {
        out.push(warm("warm-standby", None, Duration::ZERO));
        out.push(warm("warm-standby, link cut", cut, Duration::ZERO));
        out.push(warm("warm-standby, link cut, max_rpo 1s", cut, Duration::from_secs(1)));
    }
    if matches!(arg, StrategyArg::ActiveActive | StrategyArg::All) {
        out.push(Scenario {
            name: "active-active",
            strategy: Strategy::ActiveActive,
            cut_before: None,
            max_rpo: Duration::ZERO,
            textbook: "RPO near zero, RTO near zero",
        });
    }
    out
}

/// What one scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub strategy: String,
    pub textbook: String,
    /// Node processes running before the disaster.
    pub nodes: usize,
    pub rto_ms: u64,
    /// Acknowledged writes before the disaster, and those missing after.
    pub acked_before: u64,
    pub rpo_writes: u64,
    /// The oldest missing write's age at the disaster, and the time its
    /// missing writes span.
    pub rpo_max_age_ms: u64,
    pub rpo_window_ms: u64,
    /// Acknowledged after recovery but missing: always 0, or the drill failed.
    pub lost_after_recovery: u64,
    pub notes: String,
    pub timeline: Timeline,
}

/// Writes acknowledged per `BUCKET`, and the moments that matter (ms since
/// the writer started).
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub bucket_ms: u64,
    pub acked: Vec<u32>,
    pub failed: Vec<u32>,
    pub link_cut_ms: Option<u64>,
    pub disaster_ms: u64,
    pub last_ack_before_ms: u64,
    pub first_ack_after_ms: u64,
}

/// The writer: fresh keys, one at a time, every outcome recorded.
struct Writer {
    acked: Mutex<Vec<(String, Duration)>>,
    failed: Mutex<Vec<Duration>>,
    stop: AtomicBool,
    started: Instant,
}

impl Writer {
    async fn run(self: Arc<Self>, home: Client, recovery: Client, scenario: String, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut client = &home;
        let mut failing_since: Option<Instant> = None;
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let key = format!("{PREFIX}{scenario}-{n:08}");
            n += 1;
            let value = vec![b'v'; rng.random_range(16..256)];
            match client.put(key.clone(), value).await {
                Ok(_) => {
                    failing_since = None;
                    self.acked.lock().unwrap_or_else(|p| p.into_inner()).push((key, self.started.elapsed()));
                }
                Err(_) => {
                    self.failed.lock().unwrap_or_else(|p| p.into_inner()).push(self.started.elapsed());
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= CLIENT_FAILOVER_AFTER && std::ptr::eq(client, &home) {
                        client = &recovery;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn acked(&self) -> Vec<(String, Duration)> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Waits until the region takes writes (its setup is replicated).
async fn wait_writable(client: &Client, deadline: Instant) -> anyhow::Result<()> {
    loop {
        match client.put("ready", "").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("the region took no write within {STARTUP_DEADLINE:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Where the drill's nodes listen: below Linux's ephemeral range
/// (32768-60999), so no client connection of this machine takes a port
/// between its choice and the node's bind (a port the kernel picks for
/// `bind(0)` is in that range, and was taken that way once).
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port in `PORTS` that binds now and is not in `used`.
fn free_port(used: &mut HashSet<u16>) -> anyhow::Result<u16> {
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    for _ in 0..1000 {
        let port = rng.random_range(PORTS);
        if !used.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port in {PORTS:?} after 1000 tries")
}

fn writer_client(endpoints: Vec<String>) -> anyhow::Result<Client> {
    let config = ClientConfig {
        attempt_timeout: Duration::from_secs(1),
        attempts_max: 2,
        request_deadline: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    Ok(Client::new(endpoints, config)?)
}

fn endpoints(configs: &[NodeConfig]) -> Vec<String> {
    configs.iter().map(|c| member(c).grpc_addr).collect()
}

/// The topology of a scenario: the primary region's nodes, the recovery
/// region's (started now or at recovery), and their cluster setup.
struct Topology {
    primary: Vec<NodeConfig>,
    recovery: Vec<NodeConfig>,
    /// Recovery nodes started only at recovery (pilot light's growth, and
    /// every node of a restored region).
    later: Vec<NodeConfig>,
}

fn topology(s: &Scenario, dir: &Path, backups: &str, time: Duration) -> anyhow::Result<Topology> {
    let two_regions = !matches!(s.strategy, Strategy::BackupRestore { .. });
    let mut next_id = 0;
    let mut used = HashSet::new();
    let mut node = |region: &str, az: usize| -> anyhow::Result<NodeConfig> {
        next_id += 1;
        Ok(NodeConfig {
            id: next_id,
            region: region.into(),
            az: format!("{region}-{}", (b'a' + az as u8) as char),
            data_dir: dir.join(format!("node-{next_id}")),
            grpc_listen: ([127, 0, 0, 1], free_port(&mut used)?).into(),
            peer_listen: ([127, 0, 0, 1], free_port(&mut used)?).into(),
            admin_listen: ([127, 0, 0, 1], free_port(&mut used)?).into(),
            runtime_threads: 1,
            fault_injection: s.cut_before.is_some(),
            latency: LatencyConfig {
                cross_az: Duration::from_millis(1),
                cross_region: Duration::from_millis(40),
                ..LatencyConfig::default()
            },
            insecure: true,
            ..NodeConfig::default()
        })
    };
    let primary = (0..3).map(|a| node("us-east", a)).collect::<anyhow::Result<Vec<_>>>()?;
    let standby_now = match s.strategy {
        Strategy::PilotLight => 1,
        Strategy::WarmStandby | Strategy::ActiveActive => 3,
        Strategy::BackupRestore { .. } => 0,
    };
    let recovery_region = if two_regions { "eu-west" } else { "us-east" };
    let mut recovery = (0..3).map(|a| node(recovery_region, a)).collect::<anyhow::Result<Vec<_>>>()?;
    let later = recovery.split_off(standby_now);
    let mut topology = Topology { primary, recovery, later };
    let cluster = ClusterConfig {
        mode: if s.strategy == Strategy::ActiveActive { Mode::ActiveActive } else { Mode::ActivePassive },
        primary: if s.strategy == Strategy::ActiveActive { String::new() } else { "us-east".into() },
        regions: if two_regions {
            vec![RegionConfig::of("us-east", &topology.primary), RegionConfig::of("eu-west", &topology.recovery)]
        } else {
            Vec::new()
        },
        ..ClusterConfig::default()
    };
    let all = topology.primary.iter_mut().chain(topology.recovery.iter_mut()).chain(topology.later.iter_mut());
    for c in all {
        c.cluster = if two_regions { cluster.clone() } else { ClusterConfig::default() };
        c.replication.max_rpo = s.max_rpo;
        if let Strategy::BackupRestore { archive } = s.strategy {
            c.backup = BackupConfig {
                target: backups.to_string(),
                every: (time / 2).max(crate::config::BACKUP_EVERY_MIN),
                archive_every: if archive { Duration::from_secs(1) } else { Duration::ZERO },
                ..BackupConfig::default()
            };
        }
    }
    Ok(topology)
}

/// Every key under `PREFIX` in the region `client` reaches.
async fn keys_in(client: &Client) -> anyhow::Result<HashSet<String>> {
    let mut out = HashSet::new();
    let mut start = PREFIX.as_bytes().to_vec();
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    loop {
        let range = KeyRange::Range { start: start.clone(), end: end.clone() };
        let page = client.scan(range, 10_000, Consistency::Linearizable).await.context("reading every key")?;
        for kv in &page.kvs {
            out.insert(String::from_utf8_lossy(&kv.key).into_owned());
        }
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs one scenario end to end.
async fn run_scenario(s: &Scenario, args: &DrillArgs, dir: &Path, pb: &ProgressBar, n: u64) -> anyhow::Result<Row> {
    let phase = |what: &str| pb.set_message(format!("{}: {what}", s.name));
    std::fs::create_dir_all(dir)?;
    let backups = format!("file://{}", dir.join("backups").display());
    let mut t = topology(s, dir, &backups, args.time)?;
    let mut local = Local::default();
    phase("starting the topology");
    let deadline = Instant::now() + STARTUP_DEADLINE;
    for c in t.primary.iter().chain(&t.recovery) {
        local.spawn(c)?;
    }
    local.wait_serving(&t.primary, deadline).await?;
    local.bootstrap(&t.primary, true, deadline).await?;
    if !t.recovery.is_empty() {
        local.wait_serving(&t.recovery, deadline).await?;
        local.bootstrap(&t.recovery, true, deadline).await?;
    }
    let home = writer_client(endpoints(&t.primary))?;
    let recovery_configs: Vec<NodeConfig> = t.recovery.iter().chain(&t.later).cloned().collect();
    wait_writable(&home, deadline).await?;
    let mut controller = None;
    if s.strategy == Strategy::WarmStandby {
        let all: Vec<String> = endpoints(&t.primary).into_iter().chain(endpoints(&t.recovery)).collect();
        let log = std::fs::File::create(dir.join("controller.log"))?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["--endpoints", &all.join(","), "controller", "--duration"])
            .arg(format!("{}s", (args.time + RECOVERY_DEADLINE).as_secs()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the controller")?;
        controller = Some(ChildGuard(child));
    }

    phase("writing");
    let writer = Arc::new(Writer {
        acked: Mutex::new(Vec::new()),
        failed: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        started: Instant::now(),
    });
    let recovery_client = writer_client(endpoints(&recovery_configs))?;
    let task =
        tokio::spawn(writer.clone().run(home, recovery_client, s.name.replace([' ', ',', '+'], ""), args.seed + n));
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_mul(31).wrapping_add(n));
    // The disaster comes within the last tenth of the time, by the seed.
    let time = args.time.mul_f64(rng.random_range(0.9..=1.0));
    let mut link_cut = None;
    if let Some(before) = s.cut_before {
        tokio::time::sleep(time.saturating_sub(before)).await;
        phase("link between the regions cut");
        cut_link(&t.primary, &t.recovery).await?;
        link_cut = Some(writer.started.elapsed());
        tokio::time::sleep(before).await;
    } else {
        tokio::time::sleep(time).await;
    }

    phase("disaster: killing us-east and deleting its data");
    let nodes = local.running();
    local.kill_region("us-east");
    let disaster = writer.started.elapsed();
    for c in &t.primary {
        std::fs::remove_dir_all(&c.data_dir).with_context(|| format!("deleting {}", c.data_dir.display()))?;
    }

    phase("recovering");
    let recovery_started = Instant::now();
    let notes = recover(s, &mut t, &mut local, &backups, &recovery_configs).await?;
    let first_after = loop {
        let acked = writer.acked();
        if let Some((_, at)) = acked.iter().find(|(_, at)| *at > disaster) {
            break *at;
        }
        if recovery_started.elapsed() > RECOVERY_DEADLINE {
            bail!("{}: no write was acknowledged within {RECOVERY_DEADLINE:?} of the disaster", s.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    phase("recovered; writing on");
    tokio::time::sleep(AFTER_RECOVERY).await;
    writer.stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    drop(controller);

    phase("reading every key");
    let reader = Client::new(endpoints(&recovery_configs), ClientConfig::default())?;
    let present = keys_in(&reader).await?;
    local.stop_all().await;

    let acked = writer.acked();
    let before: Vec<&(String, Duration)> = acked.iter().filter(|(_, at)| *at <= disaster).collect();
    let missing: Vec<Duration> = before.iter().filter(|(k, _)| !present.contains(k)).map(|(_, at)| *at).collect();
    let lost_after = acked.iter().filter(|(k, at)| *at > disaster && !present.contains(k)).count() as u64;
    let last_before = before.iter().map(|(_, at)| *at).max().unwrap_or_default();
    let (oldest, newest) = (missing.iter().min().copied(), missing.iter().max().copied());
    let failed = writer.failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let end = acked.iter().map(|(_, at)| *at).chain(failed.iter().copied()).max().unwrap_or_default();
    let buckets = (end.as_millis() / BUCKET.as_millis() + 1) as usize;
    let mut timeline = Timeline {
        bucket_ms: ms(BUCKET),
        acked: vec![0; buckets],
        failed: vec![0; buckets],
        link_cut_ms: link_cut.map(ms),
        disaster_ms: ms(disaster),
        last_ack_before_ms: ms(last_before),
        first_ack_after_ms: ms(first_after),
    };
    for (_, at) in &acked {
        timeline.acked[(at.as_millis() / BUCKET.as_millis()) as usize] += 1;
    }
    for at in &failed {
        timeline.failed[(at.as_millis() / BUCKET.as_millis()) as usize] += 1;
    }
    Ok(Row {
        strategy: s.name.to_string(),
        textbook: s.textbook.to_string(),
        nodes,
        rto_ms: ms(first_after.saturating_sub(last_before)),
        acked_before: before.len() as u64,
        rpo_writes: missing.len() as u64,
        rpo_max_age_ms: oldest.map_or(0, |o| ms(disaster.saturating_sub(o))),
        rpo_window_ms: match (oldest, newest) {
            (Some(o), Some(n)) => ms(n - o),
            _ => 0,
        },
        lost_after_recovery: lost_after,
        notes,
        timeline,
    })
}

/// Kills the controller when the scenario ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Ignored: it may have stopped by itself (its --duration).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Cuts replication both ways (the nodes' fault hooks).
async fn cut_link(primary: &[NodeConfig], standby: &[NodeConfig]) -> anyhow::Result<()> {
    let client = Client::new(endpoints(primary), ClientConfig::default())?;
    for (configs, other) in [(primary, "eu-west"), (standby, "us-east")] {
        for c in configs {
            client.set_faults_on(&member(c).grpc_addr, vec![other.to_string()], 0).await?;
        }
    }
    Ok(())
}

/// Recovers the way the scenario's strategy does; returns notes for the row.
async fn recover(
    s: &Scenario,
    t: &mut Topology,
    local: &mut Local,
    backups: &str,
    recovery: &[NodeConfig],
) -> anyhow::Result<String> {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    match s.strategy {
        Strategy::BackupRestore { archive } => {
            let until = Until { time_ms: None, no_archive: !archive };
            let restored = restore_into(backups, None, until, &t.later).await?;
            for c in &t.later {
                local.spawn(c)?;
            }
            local.wait_serving(&t.later, deadline).await?;
            local.bootstrap(&t.later, false, deadline).await?;
            let every = t.later[0].backup.every;
            Ok(if archive {
                format!(
                    "backups every {every:?}, archive every {:?}; restored {} keys, {} archived writes replayed",
                    t.later[0].backup.archive_every, restored.keys, restored.replayed
                )
            } else {
                format!("backups every {every:?}, no archive; restored {} keys", restored.keys)
            })
        }
        Strategy::PilotLight => {
            let standby = Client::new(endpoints(&t.recovery), ClientConfig::default())?;
            let status = standby.region_status().await.context("reading the standby's epoch")?;
            let started = Instant::now();
            let next = status.epoch.checked_add(1).context("the standby's epoch is at u64::MAX: cannot promote")?;
            standby.promote_region(next).await.context("promoting the standby")?;
            let promoted = started.elapsed();
            for c in &t.later {
                local.spawn(c)?;
            }
            local.wait_serving(&t.later, deadline).await?;
            for c in &t.later {
                standby.add_learner(member(c)).await.with_context(|| format!("adding node {}", c.id))?;
                standby.promote(c.id).await.with_context(|| format!("promoting node {}", c.id))?;
            }
            Ok(format!(
                "1 standby node promoted in {} ms, grown to {} nodes {} ms after the disaster",
                ms(promoted),
                recovery.len(),
                ms(started.elapsed())
            ))
        }
        Strategy::WarmStandby => Ok(format!(
            "the controller (1 s probes, 5 failures) promoted eu-west{}",
            if s.max_rpo.is_zero() { String::new() } else { format!("; RPO guard max_rpo {:?}", s.max_rpo) }
        )),
        Strategy::ActiveActive => {
            Ok(format!("the writer moved to eu-west after {CLIENT_FAILOVER_AFTER:?} of failures"))
        }
    }
}

pub async fn run(g: &Global, args: DrillArgs) -> anyhow::Result<bool> {
    if args.time < Duration::from_secs(3) {
        bail!("--time {:?} is too short to see a workload before the disaster; give at least 3s", args.time);
    }
    let (dir, _temp) = super::local::data_dir(args.data_dir.as_ref(), "nines-drill-")?;
    let list = scenarios(args.strategy, args.time);
    let pb = ProgressBar::new(list.len() as u64);
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{pos}/{len}] {elapsed} {msg}") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut rows = Vec::new();
    for (n, s) in list.iter().enumerate() {
        let scenario_dir = dir.join(format!("{n}-{}", s.name.replace([' ', ',', '+'], "_")));
        let row = run_scenario(s, &args, &scenario_dir, &pb, n as u64).await;
        pb.inc(1);
        rows.push(row.with_context(|| format!("drill of {}", s.name))?);
    }
    pb.finish_and_clear();
    std::fs::create_dir_all(&args.report)?;
    let json = serde_json::json!({ "seed": args.seed, "time_s": args.time.as_secs_f64(), "rows": rows });
    std::fs::write(args.report.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(args.report.join("report.html"), report::html(&rows, args.seed, args.time))?;
    match g.format {
        Format::Json => println!("{json}"),
        Format::Table => {
            println!("{}", report::table(&rows));
            println!("report: {}", args.report.join("report.html").display());
        }
    }
    // A write acknowledged after recovery and then missing is a bug.
    Ok(rows.iter().all(|r| r.lost_after_recovery == 0))
}

pub mod report {
    //! The drill's table and its HTML report (a timeline per strategy, as
    //! inline SVG: no scripts, no build step).

    use std::fmt::Write;
    use std::time::Duration;

    use super::Row;

    /// The columns of the table, and a row's cells.
    const HEADER: [&str; 7] =
        ["strategy", "nodes", "RTO", "RPO (writes lost)", "RPO (oldest lost)", "lost writes span", "textbook"];

    fn cells(r: &Row) -> [String; 7] {
        [
            r.strategy.clone(),
            r.nodes.to_string(),
            format!("{:.2} s", r.rto_ms as f64 / 1000.0),
            format!("{} of {}", r.rpo_writes, r.acked_before),
            format!("{} ms", r.rpo_max_age_ms),
            format!("{} ms", r.rpo_window_ms),
            r.textbook.clone(),
        ]
    }

    /// The measured table, in Markdown (a terminal reads it too).
    pub fn table(rows: &[Row]) -> String {
        let mut out = format!("| {} |\n|---|---:|---:|---:|---:|---:|---|\n", HEADER.join(" | "));
        for r in rows {
            let _ = writeln!(out, "| {} |", cells(r).join(" | "));
        }
        out
    }

    fn escape(s: &str) -> String {
        s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    }

    /// One strategy's timeline: acknowledged writes per bucket (blue),
    /// failed attempts (grey), the link cut, the disaster and the recovery.
    fn svg(r: &Row) -> String {
        let t = &r.timeline;
        let (w, h, pad) = (900.0, 180.0, 30.0);
        let n = t.acked.len().max(1) as f64;
        let peak = t.acked.iter().chain(&t.failed).copied().max().unwrap_or(1).max(1) as f64;
        let bw = (w - 2.0 * pad) / n;
        let x = |ms: u64| pad + (ms as f64 / t.bucket_ms as f64) * bw;
        let mut s = format!("<svg width=\"{w}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\">");
        for (i, (a, f)) in t.acked.iter().zip(&t.failed).enumerate() {
            let bx = pad + i as f64 * bw;
            let ah = (*a as f64 / peak) * (h - 2.0 * pad);
            let fh = (*f as f64 / peak) * (h - 2.0 * pad);
            let _ = write!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{ah:.1}\" fill=\"#3b6ea5\"/>\
                 <rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{fh:.1}\" fill=\"#bbb\"/>",
                h - pad - ah,
                bw.max(1.0),
                h - pad - ah - fh,
                bw.max(1.0)
            );
        }
        let mut mark = |ms: u64, color: &str, label: &str| {
            let _ = write!(
                s,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{pad}\" y2=\"{1}\" stroke=\"{color}\" stroke-width=\"2\"/>\
                 <text x=\"{0:.1}\" y=\"{2}\" font-size=\"11\" fill=\"{color}\">{label}</text>",
                x(ms),
                h - pad,
                pad - 6.0
            );
        };
        if let Some(cut) = t.link_cut_ms {
            mark(cut, "#d08000", "link cut");
        }
        mark(t.disaster_ms, "#c0392b", "disaster");
        mark(t.first_ack_after_ms, "#27ae60", "recovered");
        let _ = write!(
            s,
            "<text x=\"{pad}\" y=\"{}\" font-size=\"11\">0 s</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{:.1} s</text>\
             <text x=\"2\" y=\"{}\" font-size=\"11\">{peak}</text></svg>",
            h - 10.0,
            w - pad - 30.0,
            h - 10.0,
            n * t.bucket_ms as f64 / 1000.0,
            pad + 4.0
        );
        s
    }

    pub fn html(rows: &[Row], seed: u64, time: Duration) -> String {
        let mut body = String::new();
        body.push_str("<table><tr>");
        for h in HEADER.iter().chain(&["notes"]) {
            let _ = write!(body, "<th>{h}</th>");
        }
        body.push_str("</tr>");
        for r in rows {
            body.push_str("<tr>");
            for c in cells(r).iter().chain([&r.notes]) {
                let _ = write!(body, "<td>{}</td>", escape(c));
            }
            body.push_str("</tr>");
        }
        body.push_str("</table>");
        for r in rows {
            let _ = write!(
                body,
                "<h2>{}</h2><p>RTO {:.2} s: last write acknowledged before the disaster at {:.2} s, first after at \
                 {:.2} s. Blue: writes acknowledged per {} ms; grey: failed attempts.</p>{}",
                escape(&r.strategy),
                r.rto_ms as f64 / 1000.0,
                r.timeline.last_ack_before_ms as f64 / 1000.0,
                r.timeline.first_ack_after_ms as f64 / 1000.0,
                r.timeline.bucket_ms,
                svg(r)
            );
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>nines DR drill</title><style>\
             body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>\
             <h1>nines disaster-recovery drill</h1><p>Seed {seed}, {:?} of writes before each disaster (kill -9 of \
             every us-east node and deletion of its data).</p>{body}</body></html>",
            time
        )
    }
}
