//! One run, start to verdict: start a cluster, drive clients while the
//! nemesis injects faults, heal, wait, read the final state, check, report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::json;

use crate::checker::{self, Validity};
use crate::cluster::{Cluster, NodeFlags};
use crate::history::{self, Recorder};
use crate::nemesis::{self, FaultRecord, Nemesis, Schedule};
use crate::report::{self, Page, Rpo};
use crate::workload::{self, FinalRead, Workload};

/// Shortest run: a fault window (4-8 s) plus the quiet before it.
const TIME_MIN: Duration = Duration::from_secs(10);
/// Longest run: an hour keeps a history within what the checker can read.
const TIME_MAX: Duration = Duration::from_secs(3600);
/// How long a healed cluster may take to have a leader in every region.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Client processes of the `large` workload unless `--concurrency` says:
/// enough maximal values in flight to fill entries and messages to their
/// limits.
const LARGE_CONCURRENCY: usize = 32;

/// Most client processes at once: a two-core machine runs the nodes too.
const CONCURRENCY_MAX: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// register, set, lww, large or failover.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Faults, e.g. `kill,partition` (one per window, at random) or
    /// `kill+partition` (together). `none` for no faults. Names: kill, pause,
    /// partition, partition-halves, partition-leader, partition-ring,
    /// partition-az, partition-region, partition-region-one-way,
    /// partition-one-way, latency, clock, clock-jump,
    /// az-loss, region-loss, power-cut, controller-kill (failover only),
    /// ship-reorder, hostile-peer, compact, slow-sync, kill-leader-lag.
    #[arg(long, default_value = "none")]
    pub nemesis: String,
    /// How long clients run (faults stop before the end), e.g. `60s`.
    #[arg(long, default_value = "60s")]
    pub time: humantime::Duration,
    /// Seeds every random choice of clients and nemesis. Default: from the clock (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of regions (default 1; lww needs and defaults to 2).
    #[arg(long)]
    pub regions: Option<usize>,
    /// AZs per region, one node each.
    #[arg(long, default_value_t = 3)]
    pub azs: usize,
    /// Client processes (default: 2 per node used by the workload, at most
    /// 12; 32 for large).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Keys the register and lww clients share at a time.
    #[arg(long, default_value_t = 4)]
    pub keys: usize,
    /// Where the results go. Default: `target/jepsen/<time>-<workload>-<nemesis>-s<seed>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Plant a bug to see the harness catch it: leaders serve linearizable
    /// reads locally, without confirming leadership with a quorum.
    #[arg(long)]
    pub planted_bug_local_reads: bool,
    /// Time the linearizability checker may take before it answers unknown.
    #[arg(long, default_value = "60s")]
    pub check_budget: humantime::Duration,
    /// Keep the nodes' data directories (removed by default; logs are kept).
    #[arg(long)]
    pub keep_data: bool,
    /// Fault windows of 0.5-1.5 s with 1-1.5 s between them (default 4-8 s
    /// and 2-4 s): many fault cycles a minute, for kill and power-cut loops.
    #[arg(long)]
    pub fast_faults: bool,
    /// How long every fault window holds, e.g. `60s` (default: 4-8 s at
    /// random, or 0.5-1.5 s with --fast-faults).
    #[arg(long)]
    pub hold: Option<humantime::Duration>,
    /// Run against the compose cluster (`deploy/docker-compose.yml`, on
    /// --image) with docker's own faults: `docker pause`, `docker kill`,
    /// `docker network disconnect`. Failover workload only; nemeses pause,
    /// kill, region-loss, partition-region.
    #[arg(long)]
    pub docker: bool,
    /// The image of `--docker` runs (`bash deploy/build-image.sh` builds
    /// nines:local).
    #[arg(long, env = "NINES_IMAGE", default_value = "nines:local")]
    pub image: String,
}

/// A client of every data region (failover runs), with short timeouts.
fn region_clients(cluster: &Cluster) -> anyhow::Result<Vec<(String, nines::rpc::Client)>> {
    let config = nines::rpc::ClientConfig {
        attempt_timeout: Duration::from_millis(500),
        attempts_max: 3,
        connect_timeout: Duration::from_millis(300),
        request_deadline: Duration::from_millis(1000),
        ..nines::rpc::ClientConfig::default()
    };
    cluster
        .region_order
        .iter()
        .map(|r| Ok((r.clone(), nines::rpc::Client::new(cluster.region_endpoints(r), config.clone())?)))
        .collect()
}

/// How often a failover run asks every region for its role.
const PROMOTION_POLL: Duration = Duration::from_millis(200);

/// Watches the regions until `until`: each time a region reports itself
/// primary at an epoch above every one seen, that is a promotion, timed when
/// it was seen (never before it happened). The first region is primary at
/// epoch 0 from the start.
async fn watch_promotions(
    regions: Vec<(String, nines::rpc::Client)>,
    recorder: Recorder,
    until: Instant,
) -> Vec<checker::Promotion> {
    let mut seen = vec![checker::Promotion { at_us: 0, region: regions[0].0.clone(), epoch: 0 }];
    while Instant::now() < until {
        for (name, client) in &regions {
            if let Ok(s) = client.region_status().await
                && s.primary == *name
                && s.epoch > seen.last().map_or(0, |p| p.epoch)
            {
                let at_us = recorder.now_us();
                eprintln!("[{:>7.1}s] {name} is primary at epoch {}", at_us as f64 / 1e6, s.epoch);
                seen.push(checker::Promotion { at_us, region: name.clone(), epoch: s.epoch });
            }
        }
        tokio::time::sleep(PROMOTION_POLL).await;
    }
    seen
}

/// Every element in a divergence record of any data region.
async fn divergent_elements(cluster: &Cluster) -> anyhow::Result<BTreeSet<u64>> {
    let mut elements = BTreeSet::new();
    for name in &cluster.region_order {
        let client = nines::rpc::Client::new(cluster.region_endpoints(name), nines::rpc::ClientConfig::default())?;
        let d = client.divergent(0).await.with_context(|| format!("reading {name}'s divergence record"))?;
        for kv in d.records.iter().filter_map(|r| r.kv.as_ref()) {
            let key = String::from_utf8_lossy(&kv.key);
            if let Some(e) = key.strip_prefix(workload::SET_PREFIX).and_then(|n| n.parse().ok()) {
                elements.insert(e);
            }
        }
    }
    Ok(elements)
}

/// The `elections` check of a run whose faults touch no node: every data
/// region must end in the term it started in. A rise means some node stalled
/// long enough for a follower to campaign (won or not): a false election, and
/// the unavailability it brings, with no fault to blame.
fn elections(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, regions: &[String]) -> (Validity, String) {
    let mut rose = Vec::new();
    let mut unread = Vec::new();
    let mut kept = Vec::new();
    for r in regions {
        match (before.get(r), after.get(r)) {
            (Some(b), Some(a)) if a > b => rose.push(format!("{r} from term {b} to {a}")),
            (Some(b), Some(_)) => kept.push(format!("{r} {b}")),
            _ => unread.push(r.as_str()),
        }
    }
    if !rose.is_empty() {
        let msg = format!("elections with no fault that touches a node: {}", rose.join(", "));
        (Validity::Invalid, msg)
    } else if !unread.is_empty() {
        (Validity::Unknown, format!("no node of {} answered with its term", unread.join(", ")))
    } else {
        (Validity::Valid, format!("every region kept its leader's term ({})", kept.join(", ")))
    }
}

/// What a run found, for the caller (and the suite's table).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workload: String,
    pub nemesis: String,
    pub valid: Validity,
    pub lost: usize,
    pub rpo_ms: f64,
    pub rto_ms_max: Option<f64>,
    pub counts: history::Counts,
    pub out: PathBuf,
}

impl RunArgs {
    /// The command that repeats this run.
    pub fn command(&self, seed: u64, regions: usize) -> String {
        let mut c = format!(
            "cargo run --release -p nines-jepsen -- run --workload {} --nemesis {} --time {} --seed {seed} --regions {regions} --azs {}",
            self.workload.name(),
            self.nemesis,
            self.time,
            self.azs
        );
        if self.planted_bug_local_reads {
            c.push_str(" --planted-bug-local-reads");
        }
        if self.fast_faults {
            c.push_str(" --fast-faults");
        }
        if let Some(hold) = self.hold {
            c.push_str(&format!(" --hold {hold}"));
        }
        if self.docker {
            c.push_str(&format!(" --docker --image {}", self.image));
        }
        c
    }
}

/// What the compose cluster can run: the failover workload on its two
/// regions of three AZs, with the faults docker can inject.
fn check_docker_args(args: &RunArgs, plan: &[Vec<Nemesis>]) -> anyhow::Result<()> {
    if args.workload != Workload::Failover {
        bail!("--docker runs the compose cluster, which is active-passive: use --workload failover");
    }
    if args.regions.is_some_and(|r| r != 2) || args.azs != 3 {
        bail!("--docker runs the compose cluster: two regions of three AZs (leave --regions and --azs out)");
    }
    if args.planted_bug_local_reads {
        bail!("--planted-bug-local-reads needs the harness's own nodes, not --docker");
    }
    if let Some(n) = plan.iter().flatten().find(|n| !nemesis::DOCKER.contains(n)) {
        let known: Vec<&str> = nemesis::DOCKER.iter().map(|n| n.name()).collect();
        bail!("--docker cannot inject {:?} (it needs the nodes' fault hooks); it can: {}", n.name(), known.join(", "));
    }
    Ok(())
}

pub async fn run(args: &RunArgs) -> anyhow::Result<Summary> {
    let plan = nemesis::parse_plan(&args.nemesis)?;
    let time: Duration = args.time.into();
    if !(TIME_MIN..=TIME_MAX).contains(&time) {
        bail!("--time must be between {TIME_MIN:?} and {TIME_MAX:?}, got {}", args.time);
    }
    let multi_region = matches!(args.workload, Workload::Lww | Workload::Failover);
    let regions = args.regions.unwrap_or(if multi_region { 2 } else { 1 });
    if multi_region && regions < 2 {
        bail!(
            "the {} workload needs several regions: --regions must be at least 2, got {regions}",
            args.workload.name()
        );
    }
    let failover = args.workload == Workload::Failover;
    if !failover && plan.iter().flatten().any(|n| *n == Nemesis::ControllerKill) {
        bail!("controller-kill needs the failover workload: only failover runs have controllers");
    }
    if args.docker {
        check_docker_args(args, &plan)?;
    }
    if let Some(hold) = args.hold {
        let hold: Duration = hold.into();
        // The first quiet 2 s, the window and a second for its heal.
        if hold < Duration::from_secs(1) || hold + Duration::from_secs(3) > time {
            bail!(
                "--hold must be at least 1s and leave 3 s of --time ({}) around it, got {}",
                args.time,
                args.hold.map_or_else(String::new, |h| h.to_string())
            );
        }
    }
    if args.keys == 0 || args.keys > 1000 {
        bail!("--keys must be 1..=1000, got {}", args.keys);
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let seed = args.seed.unwrap_or(stamp);
    let out = args.out.clone().unwrap_or_else(|| {
        let nemesis: String =
            args.nemesis.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        PathBuf::from("target/jepsen").join(format!("{stamp}-{}-{nemesis}-s{seed}", args.workload.name()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let command = args.command(seed, regions);
    eprintln!("run: {command}\nresults: {}", out.display());

    let used_nodes = match args.workload {
        Workload::Register | Workload::Counter => args.azs,
        _ => args.azs * regions,
    };
    // Many writers of large values: the point is a burst, not contention.
    let concurrency = args.concurrency.unwrap_or(match args.workload {
        Workload::Large => LARGE_CONCURRENCY,
        _ => (2 * used_nodes).min(12),
    });
    if concurrency == 0 || concurrency > CONCURRENCY_MAX {
        bail!("--concurrency must be 1..={CONCURRENCY_MAX}, got {concurrency}");
    }
    let exe = std::env::current_exe().context("finding this executable to start nodes with")?;
    let flags = NodeFlags {
        planted_bug_local_reads: args.planted_bug_local_reads,
        power_loss_simulation: plan.iter().flatten().any(|n| matches!(n, Nemesis::PowerCut | Nemesis::SlowSync)),
        failover,
        compact_fully: plan.iter().flatten().any(|n| *n == Nemesis::Compact),
    };
    let mut cluster = match args.docker {
        true => Cluster::start_compose(&out, crate::compose::default_file(), &args.image).await?,
        false => Cluster::start(&out, exe, regions, args.azs, flags).await?,
    };

    // Plans that touch no node must keep every region's first leader.
    let must_keep_leaders = nemesis::keeps_leaders(&plan);
    let terms_before = if must_keep_leaders { cluster.terms().await } else { BTreeMap::new() };
    let began = Instant::now();
    let until = began + time;
    let recorder = Recorder::new(began);
    let specs = workload::client_specs(args.workload, &cluster, concurrency);
    let clients = tokio::spawn(workload::run_clients(args.workload, specs, args.keys, seed, recorder.clone(), until));
    let promotions = match failover {
        true => Some(tokio::spawn(watch_promotions(region_clients(&cluster)?, recorder.clone(), until))),
        false => None,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut schedule = if args.fast_faults { Schedule::fast() } else { Schedule::normal() };
    if let Some(hold) = args.hold {
        let ms = Duration::from(hold).as_millis() as u64;
        schedule.fault_ms = ms..ms + 1;
    }
    let faults = nemesis::run(&mut cluster, &plan, &schedule, &mut rng, &recorder, until).await;
    let clients = clients.await.context("client task")?;
    let faults: Vec<FaultRecord> = faults?;
    clients?;
    let ran_us = recorder.now_us();

    // Heal whatever is left, then let the cluster settle before final reads.
    cluster.heal(RECOVERY_TIMEOUT).await?;
    cluster.wait_leaders(RECOVERY_TIMEOUT).await?;
    let ops = recorder.ops();
    history::write_jsonl(&ops, &out.join("history.jsonl"))?;
    let counts = history::counts(&ops);

    let mut checkers: Vec<(&str, Validity, String)> = Vec::new();
    let mut details = serde_json::Map::new();
    let mut named_ops = Vec::new();
    let mut lost: Vec<u64> = Vec::new();
    let mut lost_count = 0;
    // Failover runs: when each promotion was seen (the moment unshipped
    // writes of the old primary were lost).
    let mut promoted_at: Vec<u64> = Vec::new();
    match args.workload {
        Workload::Register => {
            eprintln!("checking linearizability of {} operations...", ops.len());
            let r = checker::linearizable(&ops, args.check_budget.into());
            checkers.push(("linearizable", r.valid, r.message.clone()));
            named_ops = r.ops.clone();
            details.insert("linearizable".into(), serde_json::to_value(&r)?);
        }
        Workload::Failover => {
            let promotions = match promotions {
                Some(task) => task.await.context("promotion watcher")?,
                None => Vec::new(),
            };
            let (finals, agree) = workload::final_reads(&cluster, FinalRead::Set).await?;
            let set = checker::set(&ops, &finals, agree);
            let divergent = divergent_elements(&cluster).await?;
            let region_of = |id: u64| cluster.nodes.get(&id).map_or(String::new(), |n| n.config.region.clone());
            let r = checker::failover(&ops, &set, &divergent, &promotions, &region_of);
            promoted_at = promotions.iter().skip(1).map(|p| p.at_us).collect();
            checkers.push(("failover", r.valid, r.message.clone()));
            lost = set.lost.clone();
            lost_count = set.lost.len();
            details.insert("set".into(), serde_json::to_value(&set)?);
            details.insert("failover".into(), serde_json::to_value(&r)?);
        }
        Workload::Set | Workload::Large => {
            let what = if args.workload == Workload::Set { FinalRead::Set } else { FinalRead::Large };
            let (finals, agree) = workload::final_reads(&cluster, what).await?;
            let r = checker::set(&ops, &finals, agree);
            checkers.push(("set", r.valid, r.message.clone()));
            lost = r.lost.clone();
            lost_count = r.lost.len();
            details.insert("set".into(), serde_json::to_value(&r)?);
        }
        Workload::Counter => {
            let last = workload::final_counter(&cluster).await?;
            let r = checker::counter(&ops, last);
            checkers.push(("counter", r.valid, r.message.clone()));
            lost_count = r.lost as usize;
            details.insert("counter".into(), serde_json::to_value(&r)?);
        }
        Workload::Lww => {
            let keys: BTreeSet<String> = ops.iter().map(|o| o.key.clone()).collect();
            let (finals, agree) = workload::final_reads(&cluster, FinalRead::Keys(&keys)).await?;
            let r = checker::lww(&ops, &finals, agree);
            checkers.push(("convergence", r.valid, r.message.clone()));
            lost = r.lost_writes.clone();
            lost_count = r.lost_writes.len();
            details.insert("convergence".into(), serde_json::to_value(&r)?);
        }
    }
    // Read after the final reads, so an election that a late fault's work
    // (a snapshot still being written when the clients stopped) caused
    // is counted too.
    if must_keep_leaders {
        let terms_after = cluster.terms().await;
        let (v, msg) = elections(&terms_before, &terms_after, &cluster.region_order);
        checkers.push(("elections", v, msg));
    }
    // A node that exited by itself stopped fatally or crashed: a finding.
    cluster.reap();
    if cluster.unexpected_exits.is_empty() {
        checkers.push(("nodes", Validity::Valid, "no node exited by itself".into()));
    } else {
        let exits: Vec<String> = cluster.unexpected_exits.iter().map(|(id, s)| format!("node {id}: {s}")).collect();
        checkers.push((
            "nodes",
            Validity::Invalid,
            format!("exited by themselves (see their logs): {}", exits.join(", ")),
        ));
    }
    // A run in which no write succeeded proves nothing.
    let writes_ok = ops.iter().filter(|o| o.is_write() && o.outcome == history::Outcome::Ok).count();
    let stats = if writes_ok == 0 { Validity::Unknown } else { Validity::Valid };
    checkers.push((
        "stats",
        stats,
        format!("{writes_ok} acknowledged writes, {} ok, {} fail, {} info", counts.ok, counts.fail, counts.info),
    ));
    let valid = checkers.iter().fold(Validity::Valid, |v, (_, c, _)| v.and(*c));

    let region_of = |id: u64| cluster.nodes.get(&id).map_or(String::new(), |n| n.config.region.clone());
    let (rpo, mut fault_reports) = if failover {
        // A failover loses the old primary's unshipped writes when another
        // region is promoted (see `report::rpo_failover`). The RTO runs to
        // the first acknowledged write that was kept, in any region (an old
        // primary that still acknowledges within its lease has not recovered
        // anything: those writes are lost).
        let kept: Vec<history::Op> = ops
            .iter()
            .filter(|o| !(o.outcome == history::Outcome::Ok && o.input.as_u64().is_some_and(|e| lost.contains(&e))))
            .cloned()
            .collect();
        let anywhere: Vec<FaultRecord> =
            faults.iter().map(|f| FaultRecord { region: String::new(), ..f.clone() }).collect();
        (report::rpo_failover(&ops, &lost, &promoted_at, &faults), report::rto(&kept, &anywhere, &region_of))
    } else {
        (report::rpo(&ops, &lost, &faults), report::rto(&ops, &faults, &region_of))
    };
    let rpo: Rpo = rpo;
    for (report, fault) in fault_reports.iter_mut().zip(&faults) {
        report.fault.region = fault.region.clone();
    }
    let results = json!({
        "valid": valid,
        "run": {
            "workload": args.workload.name(),
            "nemesis": args.nemesis,
            "seed": seed,
            "time_s": time.as_secs_f64(),
            "regions": regions,
            "azs": args.azs,
            "concurrency": concurrency,
            "planted_bug_local_reads": args.planted_bug_local_reads,
            "command": command,
        },
        "checkers": checkers.iter().map(|(n, v, m)| json!({"name": n, "valid": v, "message": m})).collect::<Vec<_>>(),
        "details": details,
        "counts": counts,
        "lost": lost_count,
        "unexpected": details.values().map(|d| d.get("unexpected").and_then(|u| u.as_array()).map_or(0, Vec::len)).sum::<usize>(),
        "rpo": rpo,
        "faults": fault_reports,
    });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let seconds = (ran_us as f64 / 1e6).max(1.0);
    report::plot_latency(&ops, &faults, seconds, &out.join("latency.svg"))?;
    report::plot_throughput(&ops, &faults, seconds, &out.join("throughput.svg"))?;
    let title = format!("{} / {}", args.workload.name(), args.nemesis);
    let page = Page {
        title,
        valid,
        checkers: checkers.clone(),
        named_ops: &named_ops,
        counts,
        rpo: &rpo,
        faults: &fault_reports,
        command: command.clone(),
    };
    report::write_index(&page, &out.join("index.html"))?;
    drop(cluster);
    if !args.keep_data {
        for entry in std::fs::read_dir(&out)? {
            let path = entry?.path();
            if path.is_dir() && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("node-")) {
                std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }

    for (name, v, msg) in &checkers {
        eprintln!("{name}: {} — {msg}", serde_json::to_string(v)?);
    }
    let rto_ms_max = fault_reports.iter().filter_map(|f| f.rto_ms).reduce(f64::max);
    eprintln!(
        "verdict: {} · ok {} fail {} info {} · lost {} · RPO {:.0} ms · {} faults · report {}",
        serde_json::to_string(&valid)?,
        counts.ok,
        counts.fail,
        counts.info,
        lost_count,
        rpo.ms,
        fault_reports.len(),
        out.join("index.html").display()
    );
    Ok(Summary {
        workload: args.workload.name().into(),
        nemesis: args.nemesis.clone(),
        valid,
        lost: lost_count,
        rpo_ms: rpo.ms,
        rto_ms_max,
        counts,
        out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(r, t)| (r.to_string(), *t)).collect()
    }

    #[test]
    fn a_term_that_rose_without_a_fault_is_a_false_election() {
        let regions = vec!["us-east".to_string(), "eu-west".to_string()];
        let before = terms(&[("us-east", 1), ("eu-west", 1)]);
        let (v, msg) = elections(&before, &terms(&[("us-east", 1), ("eu-west", 1)]), &regions);
        assert_eq!(v, Validity::Valid, "{msg}");
        let (v, msg) = elections(&before, &terms(&[("us-east", 1), ("eu-west", 3)]), &regions);
        assert_eq!(v, Validity::Invalid);
        assert!(msg.contains("eu-west from term 1 to 3"), "{msg}");
        let (v, msg) = elections(&before, &terms(&[("us-east", 1)]), &regions);
        assert_eq!(v, Validity::Unknown);
        assert!(msg.contains("eu-west"), "{msg}");
    }
}
