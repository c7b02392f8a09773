//! The suite: every nemesis against every workload, one run each, and a
//! Markdown table of what each found (verdict, lost writes, RPO, worst RTO).
//!
//! `register` runs in one region (it checks linearizability inside a
//! region); `set` and `lww` run in two, so region faults apply to them.
//! `partition-region` needs two regions and is marked n/a for `register`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;

use crate::checker::Validity;
use crate::nemesis::NAMES;
use crate::run::{self, RunArgs};
use crate::workload::Workload;

#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// How long each run's clients run.
    #[arg(long, default_value = "30s")]
    pub time: humantime::Duration,
    /// The seed of every run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Comma-separated workloads (default: all six).
    #[arg(long, default_value = "register,set,lww,large,failover,counter")]
    pub workloads: String,
    /// Comma-separated nemesis entries (default: each nemesis alone, then
    /// `kill+partition` and `pause+clock` combined; for `failover`, the
    /// faults a failover must survive: see `FAILOVER_NEMESES`).
    #[arg(long)]
    pub nemeses: Option<String>,
    /// Where runs and the table go. Default: `target/jepsen/suite-<time>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run the failover workload against the compose cluster with docker's
    /// faults (see `run --docker`); rows: `DOCKER_NEMESES` unless --nemeses says.
    #[arg(long)]
    pub docker: bool,
    /// The image of `--docker` runs.
    #[arg(long, env = "NINES_IMAGE", default_value = "nines:local")]
    pub image: String,
}

/// The rows of a `--docker` suite: the primary region cut off by the
/// network, a frozen leader, the primary region's containers killed.
pub const DOCKER_NEMESES: &[&str] = &["partition-region", "pause", "region-loss"];

/// The failover workload's default rows: losing the primary region, the
/// primary cut off from the rest (authority and controllers included), a
/// hung leader, the deciding controller killed (alone and during a region
/// loss).
pub const FAILOVER_NEMESES: &[&str] =
    &["region-loss", "partition-region", "pause", "controller-kill", "region-loss+controller-kill"];

fn verdict(v: Validity) -> &'static str {
    match v {
        Validity::Valid => "valid",
        Validity::Invalid => "**invalid**",
        Validity::Unknown => "unknown",
    }
}

/// Runs the suite; the exit code is the worst verdict (a failed run counts as unknown).
pub async fn run(args: &SuiteArgs) -> anyhow::Result<i32> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("target/jepsen").join(format!("suite-{stamp}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let workloads = if args.docker { "failover" } else { args.workloads.as_str() };
    let workloads: Vec<Workload> = workloads
        .split(',')
        .map(|w| {
            <Workload as clap::ValueEnum>::from_str(w.trim(), false).map_err(|e| anyhow::anyhow!("workload {w:?}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let nemeses: Vec<String> = match &args.nemeses {
        Some(n) => n.split(',').map(|s| s.trim().to_string()).collect(),
        None => NAMES
            .iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| n != "controller-kill")
            .chain(["kill+partition".into(), "pause+clock".into()])
            .collect(),
    };
    let failover_nemeses: Vec<String> = match &args.nemeses {
        Some(_) => nemeses.clone(),
        None if args.docker => DOCKER_NEMESES.iter().map(|s| s.to_string()).collect(),
        None => FAILOVER_NEMESES.iter().map(|s| s.to_string()).collect(),
    };
    for n in nemeses.iter().chain(&failover_nemeses) {
        crate::nemesis::parse_plan(n)?;
    }
    let mut table = String::from(
        "| workload | nemesis | verdict | lost writes | RPO (ms) | worst RTO (ms) | ok / fail / info |\n|---|---|---|---|---|---|---|\n",
    );
    let mut worst = Validity::Valid;
    for w in &workloads {
        let rows = if *w == Workload::Failover { &failover_nemeses } else { &nemeses };
        for n in rows {
            if *w != Workload::Failover && n.contains("controller-kill") {
                let _ = writeln!(table, "| {} | {n} | n/a (no controller) | | | | |", w.name());
                continue;
            }
            // register, large and counter run in one region: large for the
            // volume of data (256 KiB values), register for the checker's
            // sake, counter because client sessions are per region.
            let one_region = matches!(w, Workload::Register | Workload::Large | Workload::Counter);
            if one_region && (n.contains("partition-region") || n.contains("ship-reorder")) {
                let _ = writeln!(table, "| {} | {n} | n/a (one region) | | | | |", w.name());
                continue;
            }
            let args = RunArgs {
                workload: *w,
                nemesis: n.clone(),
                time: args.time,
                seed: Some(args.seed),
                regions: Some(if one_region { 1 } else { 2 }),
                azs: 3,
                concurrency: None,
                keys: 4,
                out: Some(out.join(format!("{}-{}", w.name(), n.replace('+', "_")))),
                planted_bug_local_reads: false,
                check_budget: std::time::Duration::from_secs(60).into(),
                keep_data: false,
                fast_faults: false,
                hold: None,
                docker: args.docker,
                image: args.image.clone(),
            };
            match run::run(&args).await {
                Ok(s) => {
                    worst = worst.and(s.valid);
                    let lost = if *w == Workload::Register { "n/a".to_string() } else { s.lost.to_string() };
                    let rto = s.rto_ms_max.map_or("-".to_string(), |ms| format!("{ms:.0}"));
                    let _ = writeln!(
                        table,
                        "| {} | {n} | {} | {lost} | {:.0} | {rto} | {} / {} / {} |",
                        w.name(),
                        verdict(s.valid),
                        s.rpo_ms,
                        s.counts.ok,
                        s.counts.fail,
                        s.counts.info
                    );
                }
                Err(e) => {
                    worst = worst.and(Validity::Unknown);
                    let _ = writeln!(
                        table,
                        "| {} | {n} | run failed: {} | | | | |",
                        w.name(),
                        format!("{e:#}").replace('|', "/")
                    );
                }
            }
            // Written after every run, so an interrupted suite keeps its rows.
            std::fs::write(out.join("table.md"), &table)?;
        }
    }
    eprintln!("{table}\ntable: {}", out.join("table.md").display());
    Ok(worst.exit_code())
}
