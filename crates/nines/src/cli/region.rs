//! `nines region ...`: region roles, switchover and failover, the
//! divergence record; and the multi-region part of `nines status`.

use std::time::{Duration, Instant};

use crate::rpc::{Client, ClientConfig, RegionInfo, RegionStatusResponse};
use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::{Format, Global, print_json, print_table};

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// Every region's role, epoch and replication lag.
    Status,
    /// Planned switchover: fence the primary, drain its changefeed into
    /// REGION, then promote REGION. Loses no acknowledged write. The fence
    /// is lifted on any failure or Ctrl-C, and ends by itself 10 s after the
    /// drain timeout if this command is killed.
    Promote {
        region: String,
        /// How long to wait for the old primary to drain.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Lift a planned switchover's fence now (default: the primary's); a
    /// fence also ends by itself when its time is up.
    Unfence {
        #[arg(long)]
        region: Option<String>,
    },
    /// Unplanned failover: promote REGION without the old primary's help.
    /// Writes the old primary had not shipped become its divergence record.
    Failover { region: String },
    /// Change a region's replication setup (default: the region of
    /// --endpoints): its peer regions, mode and initial primary, replicated
    /// through its Raft log so every replica applies the same. Options left
    /// out keep their current value. Every node's configuration file must
    /// then say the same: a node whose file disagrees refuses to restart.
    Configure {
        #[arg(long)]
        region: Option<String>,
        /// active-active or active-passive.
        #[arg(long)]
        mode: Option<String>,
        /// The primary at epoch 0 (active-passive).
        #[arg(long)]
        primary: Option<String>,
        /// The peer regions, comma-separated.
        #[arg(long, value_delimiter = ',')]
        peers: Option<Vec<String>>,
    },
    /// List a region's divergence record (default: the region of --endpoints).
    Divergent {
        #[arg(long)]
        region: Option<String>,
        /// At most this many records (0: up to 10,000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
}

/// A client config for talking to possibly dead regions: give up quickly.
pub fn probe_config(timeout: Duration) -> ClientConfig {
    ClientConfig { attempt_timeout: timeout, attempts_max: 3, request_deadline: timeout * 2, ..ClientConfig::default() }
}

/// The cluster's regions, learned from the region the endpoints reach. A
/// cluster without regions configured is one region at those endpoints.
pub async fn discover(g: &Global) -> anyhow::Result<Vec<RegionInfo>> {
    let client = Client::new(g.endpoints.clone(), probe_config(Duration::from_secs(3)))?;
    let status = client.region_status().await.context("asking the cluster for its regions")?;
    if status.regions.is_empty() {
        return Ok(vec![RegionInfo { name: status.region, endpoints: g.endpoints.clone() }]);
    }
    Ok(status.regions)
}

pub fn region_client(r: &RegionInfo, timeout: Duration) -> anyhow::Result<Client> {
    Ok(Client::new(r.endpoints.clone(), probe_config(timeout))?)
}

/// How long a promotion may take: with an authority, the region waits out
/// the old primary's lease (at most two leases plus the clock offset)
/// before it takes the epoch.
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client for promoting region `r` (see [`PROMOTE_TIMEOUT`]).
pub fn promote_client(r: &RegionInfo) -> anyhow::Result<Client> {
    let config = ClientConfig { request_deadline: PROMOTE_TIMEOUT, ..probe_config(PROMOTE_TIMEOUT) };
    Ok(Client::new(r.endpoints.clone(), config)?)
}

/// Every reachable region's status; unreachable ones are `Err`.
pub async fn statuses(regions: &[RegionInfo]) -> Vec<(RegionInfo, anyhow::Result<RegionStatusResponse>)> {
    let mut out = Vec::new();
    for r in regions {
        let status = match region_client(r, Duration::from_secs(2)) {
            Ok(c) => c.region_status().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        out.push((r.clone(), status));
    }
    out
}

/// The primary and epoch as the reachable region with the highest epoch sees
/// them. A region whose setup is not replicated yet (just started) knows no
/// roles and is left out.
fn current_primary(statuses: &[(RegionInfo, anyhow::Result<RegionStatusResponse>)]) -> Option<(String, u64)> {
    statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .filter(|s| s.setup.is_some())
        .max_by_key(|s| s.epoch)
        .map(|s| (s.primary.clone(), s.epoch))
}

/// How long a failover waits for every reachable region to agree on the
/// primary: a few cross-region rounds of shipping.
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// After `region` was promoted at `epoch`: waits (at most `SETTLE_MAX`)
/// until every reachable region names it primary at that epoch. Fails,
/// naming the winner, when another region won: a newer epoch, or the same
/// epoch and a name that sorts first (how concurrent failovers resolve).
async fn settled(regions: &[RegionInfo], region: &str, epoch: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        let all = statuses(regions).await;
        let seen: Vec<(String, u64)> =
            all.iter().filter_map(|(_, s)| s.as_ref().ok()).map(|s| (s.primary.clone(), s.epoch)).collect();
        let wins_over = |p: &str, e: u64| e > epoch || (e == epoch && crate::types::wins_epoch_tie(p, region));
        if let Some((winner, e)) = seen.iter().find(|(p, e)| wins_over(p, *e)) {
            bail!(
                "{region} was promoted at epoch {epoch}, but {winner} is the primary at epoch {e} (another failover \
                 won); {region} demotes itself as soon as it hears from {winner}, and any write it took meanwhile goes \
                 to its divergence record"
            );
        }
        if seen.iter().all(|(p, e)| p == region && *e == epoch) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            // Regions still at an older epoch (cut off from the new primary)
            // learn of it when they reach it again.
            let views: Vec<String> = seen.iter().map(|(p, e)| format!("{p}@{e}")).collect();
            eprintln!(
                "note: after {SETTLE_MAX:?} the reachable regions name {}; the others learn of epoch {epoch} when \
                 they reach {region} again",
                views.join(", ")
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn find<'a>(regions: &'a [RegionInfo], name: &str) -> anyhow::Result<&'a RegionInfo> {
    regions.iter().find(|r| r.name == name).ok_or_else(|| {
        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
        anyhow::anyhow!("no region {name:?}; the cluster has {}", names.join(", "))
    })
}

/// What a promotion of `region` starts from: its entry, the current
/// primary, and the epoch to promote it at (one above the current).
/// `None` when `region` already is the primary.
async fn role_change<'a>(
    regions: &'a [RegionInfo],
    region: &str,
) -> anyhow::Result<Option<(&'a RegionInfo, String, u64)>> {
    let target = find(regions, region)?;
    let all = statuses(regions).await;
    let (primary, epoch) = current_primary(&all).context("no region is reachable")?;
    if primary.is_empty() {
        bail!("this cluster is active-active: every region takes writes, there is no primary to change");
    }
    if primary == region {
        println!("{region} is already the primary (epoch {epoch})");
        return Ok(None);
    }
    let next = epoch
        .checked_add(1)
        .filter(|e| *e <= crate::limits::EPOCH_MAX)
        .with_context(|| format!("epoch {epoch} is at EPOCH_MAX; no region can be promoted"))?;
    Ok(Some((target, primary, next)))
}

/// How much longer than the drain a switchover's fence holds.
const FENCE_MARGIN: Duration = Duration::from_secs(10);

/// A planned switchover after the fence: waits until `region` has applied
/// everything `primary` wrote (at most `drain_timeout`), then promotes it.
/// Returns the new epoch.
async fn drain_and_promote(
    old: &Client,
    primary: &str,
    target: &RegionInfo,
    region: &str,
    epoch: u64,
    drain_timeout: Duration,
    fence_index: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + drain_timeout;
    loop {
        let s = old.region_status().await.with_context(|| format!("watching {primary} drain"))?;
        let lag = s
            .peers
            .iter()
            .find(|p| p.region == region)
            .map(|p| p.lag_entries)
            .with_context(|| format!("{primary} does not ship to {region}"))?;
        if s.role == "fenced" && lag == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{primary} still had {lag} writes not applied by {region} after {drain_timeout:?} (fenced at index \
                 {fence_index}); run the promote again, or `nines region failover {region}` to accept losing them"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = promote_client(target)?.promote_region(epoch).await.with_context(|| format!("promoting {region}"))?;
    Ok(r.epoch)
}

pub async fn run(g: &Global, command: RegionCommand) -> anyhow::Result<()> {
    let regions = discover(g).await?;
    match command {
        RegionCommand::Status => print_region_status(g, &statuses(&regions).await),
        RegionCommand::Promote { region, drain_timeout } => {
            let Some((target, primary, epoch)) = role_change(&regions, &region).await? else { return Ok(()) };
            let old = region_client(find(&regions, &primary)?, Duration::from_secs(5))?;
            // The fence outlives the drain by a margin, and ends by itself
            // if this command dies before it lifts it.
            let ttl = drain_timeout + FENCE_MARGIN;
            let fence = old.fence_for(false, ttl).await.with_context(|| format!("fencing the primary {primary}"))?;
            let switched = tokio::select! {
                r = drain_and_promote(&old, &primary, target, &region, epoch, drain_timeout, fence.index) => r,
                _ = crate::daemon::termination_signal() => Err(anyhow::anyhow!("interrupted")),
            };
            match switched {
                Ok(new_epoch) => {
                    println!("{region} is the primary at epoch {new_epoch} ({primary} drained and demotes itself)");
                }
                Err(e) => {
                    // Give the primary its writes back rather than leave the
                    // cluster without a writable region until the fence expires.
                    let lifted = old.fence(true).await;
                    let fence_state = match lifted {
                        Ok(_) => "the fence was lifted".to_string(),
                        Err(l) => format!("the fence could not be lifted ({l}); it expires within {ttl:?}"),
                    };
                    bail!("{e:#}; {fence_state}");
                }
            }
        }
        RegionCommand::Unfence { region } => {
            let name = match region {
                Some(r) => r,
                None => current_primary(&statuses(&regions).await).context("no region is reachable")?.0,
            };
            let client = region_client(find(&regions, &name)?, Duration::from_secs(5))?;
            let r = client.fence(true).await.with_context(|| format!("lifting the fence of {name}"))?;
            println!("{name} takes writes again (epoch {}, fence lifted at index {})", r.epoch, r.index);
        }
        RegionCommand::Failover { region } => {
            let Some((target, primary, epoch)) = role_change(&regions, &region).await? else { return Ok(()) };
            let r =
                promote_client(target)?.promote_region(epoch).await.with_context(|| format!("promoting {region}"))?;
            settled(&regions, &region, r.epoch).await?;
            println!("{region} is the primary at epoch {} (failover from {primary})", r.epoch);
        }
        RegionCommand::Configure { region, mode, primary, peers } => {
            let client = match &region {
                Some(name) => region_client(find(&regions, name)?, Duration::from_secs(5))?,
                None => Client::new(g.endpoints.clone(), ClientConfig::default())?,
            };
            let status = client.region_status().await.context("reading the region's setup")?;
            let mut setup = status.setup.with_context(|| {
                format!("region {} has no replicated setup yet; its leader proposes one first", status.region)
            })?;
            if let Some(m) = mode {
                setup.mode = m;
            }
            if let Some(p) = primary {
                setup.initial_primary = p;
            }
            if let Some(p) = peers {
                setup.peers = p;
            }
            let r = client.configure_region(setup).await.context("changing the region's setup")?;
            let s = r.setup.unwrap_or_default();
            if g.format == Format::Json {
                print_json(json!({
                    "region": s.region, "peers": s.peers, "mode": s.mode, "initial_primary": s.initial_primary
                }));
            } else {
                println!(
                    "region {} now: peers [{}], {}, initial primary {:?}; update every node's file to match",
                    s.region,
                    s.peers.join(", "),
                    s.mode,
                    s.initial_primary
                );
            }
        }
        RegionCommand::Divergent { region, limit } => {
            let client = match &region {
                Some(name) => region_client(find(&regions, name)?, Duration::from_secs(5))?,
                None => Client::new(g.endpoints.clone(), ClientConfig::default())?,
            };
            let d = client.divergent(limit).await?;
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            if g.format == Format::Json {
                let records: Vec<_> = d
                    .records
                    .iter()
                    .filter_map(|r| r.kv.as_ref().map(|kv| (kv, r.demoted_at_epoch)))
                    .map(|(kv, epoch)| {
                        json!({
                            "key": text(&kv.key), "value": if kv.tombstone { None } else { Some(text(&kv.value)) },
                            "version": { "index": kv.index, "hlc": format!("{}.{}", kv.hlc_physical_ms, kv.hlc_logical), "origin_region": kv.origin_region },
                            "demoted_at_epoch": epoch
                        })
                    })
                    .collect();
                print_json(json!({ "total": d.total, "records": records }));
            } else {
                let rows: Vec<Vec<String>> = d
                    .records
                    .iter()
                    .filter_map(|r| r.kv.as_ref().map(|kv| (kv, r.demoted_at_epoch)))
                    .map(|(kv, epoch)| {
                        vec![
                            text(&kv.key),
                            if kv.tombstone { "(deleted)".into() } else { text(&kv.value) },
                            format!(
                                "{} (hlc {}.{}, origin {})",
                                kv.index, kv.hlc_physical_ms, kv.hlc_logical, kv.origin_region
                            ),
                            epoch.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["KEY", "VALUE", "VERSION", "DEMOTED AT EPOCH"], &rows);
                println!("{} divergent writes", d.total);
            }
        }
    }
    Ok(())
}

pub fn print_region_status(g: &Global, all: &[(RegionInfo, anyhow::Result<RegionStatusResponse>)]) {
    if g.format == Format::Json {
        let regions: Vec<_> = all
            .iter()
            .map(|(r, s)| match s {
                Ok(s) => json!({
                    "region": r.name, "reachable": true, "mode": s.mode, "role": s.role, "primary": s.primary,
                    "epoch": s.epoch, "lease_left_ms": s.lease_left_ms, "authority": s.authority, "full_sync_from": s.full_sync_from,
                    "changefeed_entries": s.changefeed_entries, "divergent_count": s.divergent_count,
                    "peers": s.peers.iter().map(|p| json!({"region": p.region, "acked_index": p.acked_index, "lag_entries": p.lag_entries, "lag_ms": p.lag_ms})).collect::<Vec<_>>(),
                    "origins": s.origins.iter().map(|o| json!({"origin": o.origin, "applied_through": o.applied_through, "applied_total": o.applied_total, "refused_clock_total": o.refused_clock_total})).collect::<Vec<_>>(),
                }),
                Err(e) => json!({ "region": r.name, "reachable": false, "error": e.to_string() }),
            })
            .collect();
        print_json(json!({ "regions": regions }));
        return;
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|(r, s)| match s {
            Ok(s) => vec![
                r.name.clone(),
                s.mode.clone(),
                if s.full_sync_from.is_empty() {
                    s.role.clone()
                } else {
                    format!("{} (full sync from {})", s.role, s.full_sync_from.join(", "))
                },
                if s.primary.is_empty() { "-".into() } else { s.primary.clone() },
                s.epoch.to_string(),
                lease_column(s),
                s.changefeed_entries.to_string(),
                s.divergent_count.to_string(),
            ],
            Err(_) => {
                let mut row = vec![r.name.clone(), "-".into(), "unreachable".into()];
                row.resize(8, "-".into());
                row
            }
        })
        .collect();
    print_table(&["REGION", "MODE", "ROLE", "PRIMARY", "EPOCH", "LEASE", "CHANGEFEED", "DIVERGENT"], &rows);
    let lags: Vec<Vec<String>> = all
        .iter()
        .filter_map(|(r, s)| s.as_ref().ok().map(|s| (r, s)))
        .flat_map(|(r, s)| {
            s.peers.iter().map(move |p| {
                vec![
                    r.name.clone(),
                    p.region.clone(),
                    p.lag_entries.to_string(),
                    p.lag_ms.to_string(),
                    p.acked_index.to_string(),
                ]
            })
        })
        .collect();
    if !lags.is_empty() {
        println!();
        print_table(&["FROM", "TO", "LAG ENTRIES", "LAG MS", "ACKED INDEX"], &lags);
    }
}

/// The LEASE column: what is left of the primary's lease, "none" for a
/// primary that holds none (it takes no writes), "-" where no lease applies.
fn lease_column(s: &RegionStatusResponse) -> String {
    match (s.authority.is_empty(), s.role.as_str(), s.lease_left_ms) {
        (true, _, _) | (false, "secondary", _) => "-".into(),
        (false, _, 0) => "none".into(),
        (false, _, ms) => format!("{:.1}s", ms as f64 / 1000.0),
    }
}
