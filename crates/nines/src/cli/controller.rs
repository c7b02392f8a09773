//! `nines controller`: the equivalent of a DNS health-checked failover for
//! active-passive clusters. It probes every region on an interval; after
//! `threshold` consecutive failed probes of the primary it promotes the most
//! caught-up reachable secondary (the one that applied the most of the
//! primary's changefeed) at the next epoch.
//!
//! A probe succeeds when the region's leader answers its region status
//! within the probe timeout: the region has a leader and serves.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use nines_client::RegionStatusResponse;

use super::Global;
use super::region::{discover, region_client};

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Time between probes of every region.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Consecutive failed probes of the primary before failing over.
    #[arg(long, default_value_t = 3)]
    pub threshold: u32,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

pub async fn run(g: &Global, args: ControllerArgs) -> anyhow::Result<()> {
    if args.threshold == 0 {
        anyhow::bail!("--threshold must be at least 1");
    }
    if args.interval.is_zero() {
        anyhow::bail!("--interval must be greater than 0");
    }
    let regions = discover(g).await?;
    let probe_timeout = args.interval.max(Duration::from_millis(200)) / 2;
    let clients = regions
        .iter()
        .map(|r| region_client(r, probe_timeout).map(|c| (r.name.clone(), c)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "{} controller: watching {} regions every {:?}, failing over after {} failed probes",
        now(),
        regions.len(),
        args.interval,
        args.threshold
    );
    let started = Instant::now();
    let stop = crate::node::termination_signal();
    tokio::pin!(stop);
    let mut failures = 0u32;
    // The highest (epoch, primary) this controller has seen or issued: a
    // region that misses a probe right after its promotion is still known
    // as primary, and no epoch is issued twice.
    let mut known: Option<(u64, String)> = None;
    let mut ticker = tokio::time::interval(args.interval);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = ticker.tick() => {}
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        let mut seen: Vec<(String, RegionStatusResponse)> = Vec::new();
        for (name, c) in &clients {
            if let Ok(Ok(s)) = tokio::time::timeout(probe_timeout, c.region_status()).await {
                seen.push((name.clone(), s));
            }
        }
        if let Some(view) = seen.iter().map(|(_, s)| s).max_by_key(|s| s.epoch)
            && known.as_ref().is_none_or(|(e, _)| view.epoch > *e)
        {
            known = Some((view.epoch, view.primary.clone()));
        }
        let Some((epoch, primary)) = known.clone() else {
            failures += 1;
            println!("{} no region answers ({failures} failed probes)", now());
            continue;
        };
        if primary.is_empty() {
            anyhow::bail!("the cluster is active-active: there is no primary to fail over");
        }
        if seen.iter().any(|(n, _)| *n == primary) {
            if failures > 0 {
                println!("{} primary {primary} answers again", now());
            }
            failures = 0;
            continue;
        }
        failures += 1;
        println!("{} primary {primary} failed its probe ({failures}/{})", now(), args.threshold);
        if failures < args.threshold {
            continue;
        }
        let applied_from_primary = |s: &RegionStatusResponse| {
            s.origins.iter().find(|o| o.origin == primary).map(|o| o.applied_through).unwrap_or(0)
        };
        let Some((candidate, status)) =
            seen.iter().filter(|(n, _)| *n != primary).max_by_key(|(_, s)| applied_from_primary(s))
        else {
            println!("{} no secondary is reachable to promote", now());
            continue;
        };
        let client = &clients.iter().find(|(n, _)| n == candidate).context("candidate client")?.1;
        match client.promote_region(epoch + 1).await {
            Ok(r) => {
                known = Some((r.epoch, candidate.clone()));
                println!(
                    "{} promoted {candidate} to primary at epoch {} (it had applied {primary} through index {})",
                    now(),
                    r.epoch,
                    applied_from_primary(status)
                );
                failures = 0;
            }
            Err(e) => println!("{} promoting {candidate} failed: {e}", now()),
        }
    }
}
