//! `nines controller`: the equivalent of a DNS health-checked failover for
//! active-passive clusters. It probes every region on an interval, asks
//! [`crate::controller::decide`] what to do, does it and logs it (through
//! `tracing`, on stderr): after `threshold` consecutive failed probes of the
//! primary it promotes the most caught-up reachable secondary (the one that
//! applied the most of the primary's changefeed) at the next epoch.
//!
//! A region is judged, not a node: every round probes every node of every
//! region at once, and a region answers when any of its nodes does. A node
//! answers with its region's status from the region's leader, which first
//! confirms with a quorum that it still leads (so a leader cut off from its
//! majority cannot answer for the region), all within the probe timeout. A
//! stopped or hung leader therefore fails only until the rest of its region
//! has elected another, which takes well under a second with the default
//! Raft timings (see `RaftConfig::timing`).
//!
//! With an authority (`cluster.authority`, which `nines up --mode
//! active-passive` starts), several controllers can run: each probes every
//! round, but only the one holding the authority's controller lease (three
//! intervals by default, renewed every round) acts; another takes over once
//! it has run out plus the clock offset. The promoted region claims its
//! epoch in the authority, so even two deciding controllers cannot both
//! win, and a primary that still renews its own lease is never replaced
//! (the promotion is refused after waiting two leases).
//!
//! The defaults (`--interval 1s --threshold 5`) are derived from that: the
//! slowest in-region recovery the fault harness measured without a real
//! outage is a paused leader, 3.2 s until writes resume (1.6 s typical), so a
//! region must miss 5 consecutive rounds of 1 s before it is failed over:
//! enough margin above an election, and still a few seconds for a region
//! that is really gone.

use std::time::{Duration, Instant};

use crate::rpc::RegionStatusResponse;
use anyhow::Context;
use clap::Args;

use super::Global;
use super::region::{discover, promote_client, region_client};
use crate::authority::{self, Authority, CONTROLLER_KEY, Lease};
use crate::controller::{Action, History, Outcome, Policy, Seen, decide, promoted};

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Time between probes of every region.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Consecutive failed probes of the primary before failing over (see the
    /// module doc for why 5).
    #[arg(long, default_value_t = 5)]
    pub threshold: u32,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How long this controller's lease in the authority holds (default:
    /// three intervals). Several controllers may run; the one holding the
    /// lease decides, the others take over when it stops renewing.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease: Option<Duration>,
}

pub async fn run(g: &Global, args: ControllerArgs) -> anyhow::Result<()> {
    super::init_tracing(false);
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
    let probes = node_probes(&regions, probe_timeout)?;
    tracing::info!(
        regions = regions.len(),
        interval = ?args.interval,
        threshold = args.threshold,
        "controller watching every region"
    );
    let mut deciding = match authority_of(&clients).await {
        Some(endpoints) => {
            let lease = args.lease.unwrap_or(args.interval * 3);
            let a = Authority::new(endpoints, args.interval.max(Duration::from_millis(200)))?;
            tracing::info!(id = %controller_id(), ?lease, "controllers share the decision through the authority's lease");
            Some(ControllerLease { authority: a, lease, id: controller_id(), standing_by: None })
        }
        None => None,
    };
    let policy = Policy { threshold: args.threshold };
    let started = Instant::now();
    let stop = crate::daemon::termination_signal();
    tokio::pin!(stop);
    let mut history = History::default();
    let mut ticker = tokio::time::interval(args.interval);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = ticker.tick() => {}
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        let seen = probe(&probes, probe_timeout).await;
        let (action, next) = decide(&seen, &history, &policy);
        history = next;
        // Every controller probes and keeps its history, so one that takes
        // over already knows how long the primary has been failing; only
        // the one holding the lease acts.
        if let Some(lease) = deciding.as_mut()
            && !lease.renew().await
        {
            continue;
        }
        match action {
            Action::Promote { region, epoch, .. } => {
                let client = promote_client(regions.iter().find(|r| r.name == region).context("candidate region")?)?;
                let outcome = match client.promote_region(epoch).await {
                    Ok(r) => Outcome::Promoted(r.epoch),
                    Err(e) if no_effect(&e) => {
                        tracing::warn!(%region, epoch, error = %e, "promotion refused");
                        Outcome::Refused
                    }
                    Err(e) => {
                        tracing::warn!(%region, epoch, error = %e, "promotion outcome unknown; only it will be retried");
                        Outcome::Unknown
                    }
                };
                if let Outcome::Promoted(e) = outcome {
                    tracing::warn!(%region, epoch = e, "promoted to primary");
                }
                history = promoted(&history, &region, epoch, &outcome);
            }
            Action::ActiveActive => anyhow::bail!("the cluster is active-active: there is no primary to fail over"),
            other => log(&other, args.threshold),
        }
    }
}

/// The authority's endpoints, as the first region that answers names them
/// (none: the cluster has no authority, and this controller decides alone).
async fn authority_of(clients: &[(String, crate::rpc::Client)]) -> Option<Vec<String>> {
    for (_, c) in clients {
        if let Ok(s) = c.region_status().await {
            return (!s.authority.is_empty()).then_some(s.authority);
        }
    }
    None
}

/// This process's name in the authority's controller record.
fn controller_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/pid-{}", host.trim(), std::process::id())
}

/// The lease that makes one controller of several the one that decides.
struct ControllerLease {
    authority: Authority,
    lease: Duration,
    id: String,
    /// Who decides while this one stands by (logged once per holder).
    standing_by: Option<String>,
}

impl ControllerLease {
    /// Takes or renews the lease; whether this controller decides this round.
    async fn renew(&mut self) -> bool {
        let offset_ms = crate::config::NodeConfig::default().clock_offset_max.as_millis() as u64;
        let current = match self.authority.read(CONTROLLER_KEY).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the authority; not deciding this round");
                return false;
            }
        };
        let now = authority::wall_ms();
        if let Some(h) = &current
            && h.lease.holder != self.id
            && !h.lease.expired_at(now, offset_ms)
        {
            if self.standing_by.as_deref() != Some(&h.lease.holder) {
                tracing::info!(deciding = %h.lease.holder, "standing by: another controller decides");
                self.standing_by = Some(h.lease.holder.clone());
            }
            return false;
        }
        let mine =
            Lease { holder: self.id.clone(), epoch: 0, renewed_ms: now, lease_ms: self.lease.as_millis() as u64 };
        match self.authority.swap(CONTROLLER_KEY, current.as_ref(), &mine).await {
            Ok(true) => {
                if current.as_ref().is_none_or(|h| h.lease.holder != self.id) {
                    tracing::warn!(id = %self.id, "this controller decides now");
                }
                self.standing_by = None;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the controller lease; not deciding this round");
                false
            }
        }
    }
}

/// One single-attempt client per node of every region, by region.
fn node_probes(
    regions: &[crate::rpc::RegionInfo],
    timeout: Duration,
) -> anyhow::Result<Vec<(String, Vec<crate::rpc::Client>)>> {
    let config = crate::rpc::ClientConfig {
        attempt_timeout: timeout,
        attempts_max: 1,
        request_deadline: timeout,
        connect_timeout: timeout,
        ..crate::rpc::ClientConfig::default()
    };
    regions
        .iter()
        .map(|r| {
            let clients = r
                .endpoints
                .iter()
                .map(|e| crate::rpc::Client::new(vec![e.clone()], config.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((r.name.clone(), clients))
        })
        .collect()
}

/// Probes every node of every region at once; a region answers with the
/// first of its nodes that answers within `timeout`. Only regions that
/// answered, and know their roles, are in the result.
async fn probe(probes: &[(String, Vec<crate::rpc::Client>)], timeout: Duration) -> Vec<Seen> {
    let regions = probes.iter().map(|(name, clients)| async move {
        let asks = clients.iter().map(|c| {
            Box::pin(async move {
                match tokio::time::timeout(timeout, c.region_status_for_controller()).await {
                    Ok(Ok(s)) => Ok(s),
                    _ => Err(()),
                }
            })
        });
        futures::future::select_ok(asks).await.ok().map(|(s, _)| (name.clone(), s))
    });
    let answers: Vec<(String, RegionStatusResponse)> =
        futures::future::join_all(regions).await.into_iter().flatten().collect();
    answers
        .into_iter()
        // A region whose setup is not replicated yet knows no roles: it is
        // starting, and has nothing to say about the primary.
        .filter(|(_, s)| s.setup.is_some())
        .map(|(region, s)| {
            let applied_from_primary =
                s.origins.iter().find(|o| o.origin == s.primary).map(|o| o.applied_through).unwrap_or(0);
            Seen {
                region,
                epoch: s.epoch,
                primary: s.primary,
                applied_from_primary,
                full_sync: !s.full_sync_from.is_empty(),
            }
        })
        .collect()
}

/// Whether a failed promotion certainly had no effect.
fn no_effect(e: &crate::rpc::Error) -> bool {
    use crate::rpc::Error::*;
    matches!(e, Unavailable { .. } | InvalidArgument(_) | FailedPrecondition(_) | InvalidEndpoint { .. })
}

fn log(action: &Action, threshold: u32) {
    match action {
        Action::NoRegionAnswers { failures } => tracing::warn!(failures, "no region answers"),
        Action::Healthy { primary, recovered: true } => tracing::info!(%primary, "primary answers again"),
        Action::Healthy { .. } => {}
        Action::PrimaryFailing { primary, failures } => {
            tracing::warn!(%primary, failures, threshold, "primary failed its probe")
        }
        Action::AwaitPending { region, epoch } => {
            tracing::warn!(%region, epoch, "waiting for an unconfirmed promotion; its region does not answer")
        }
        Action::NoCandidate { primary } => tracing::warn!(%primary, "primary down and no secondary is reachable"),
        Action::EpochsExhausted { epoch } => {
            tracing::error!(epoch, "the epoch is at EPOCH_MAX; no region can be promoted")
        }
        Action::Promote { .. } | Action::ActiveActive => {}
    }
}
