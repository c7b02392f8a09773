//! Scheduled backups: the region's leader takes a backup when its region's
//! newest one in the target is `every` old, then applies the retention
//! (to each region's backups apart: regions may share a target). Followers
//! only watch: after a leader change the new leader goes on from the
//! target's newest backup, so the schedule survives failovers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge};
use tokio::sync::watch;

use super::{Quiet, Retention, Target};
use crate::config::BackupConfig;
use crate::node::Node;

/// How often a node checks whether a backup is due: often enough that a
/// backup starts within a second of being due with the shortest `every`.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Starts the schedule when the configuration names a target.
pub fn spawn(
    node: Arc<Node>,
    config: BackupConfig,
    stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.target.is_empty() {
        return None;
    }
    Some(tokio::spawn(run(node, config, stop)))
}

async fn run(node: Arc<Node>, config: BackupConfig, mut stop: watch::Receiver<bool>) {
    let target = match Target::open(&config.target) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "scheduled backups are off: the target does not open");
            return;
        }
    };
    let retention = Retention { keep: config.keep, keep_within: config.keep_within };
    // The newest backup's creation time, read from the target when this
    // node starts leading.
    let mut newest: Option<SystemTime> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
        if node.check_leader().is_err() {
            newest = None;
            continue;
        }
        if newest.is_none() {
            match target.manifests().await {
                Ok(all) => {
                    let own = all.iter().rev().find(|m| m.region == node.region());
                    newest = Some(own.map_or(SystemTime::UNIX_EPOCH, |m| m.created_at()));
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "listing backups");
                    continue;
                }
            }
        }
        let due = newest.is_some_and(|n| SystemTime::now().duration_since(n).unwrap_or_default() >= config.every);
        if !due {
            continue;
        }
        let started = std::time::Instant::now();
        gauge!("nines_backup_running").set(1.0);
        let outcome = once(&node, &target, &retention).await;
        gauge!("nines_backup_running").set(0.0);
        match outcome {
            Ok(m) => {
                newest = Some(m.created_at());
                node.stats().set_last_backup(m.id.clone(), m.created_ms);
                counter!("nines_backups_total").increment(1);
                gauge!("nines_backup_last_success_timestamp_seconds").set(m.created_ms as f64 / 1000.0);
                gauge!("nines_backup_last_duration_seconds").set(started.elapsed().as_secs_f64());
                gauge!("nines_backup_last_keys").set(m.keys as f64);
                gauge!("nines_backup_last_bytes").set(m.bytes as f64);
                tracing::info!(id = %m.id, keys = m.keys, index = m.applied_index, "scheduled backup taken");
            }
            Err(e) => {
                // Tried again at the next check: a failed backup leaves no
                // manifest and takes nothing away.
                counter!("nines_backup_failures_total").increment(1);
                tracing::warn!(error = format!("{e:#}"), "scheduled backup failed");
                tokio::time::sleep(config.every.min(Duration::from_secs(30))).await;
            }
        }
    }
}

/// One backup from this node's own copy, then the retention.
async fn once(node: &Node, target: &Target, retention: &Retention) -> anyhow::Result<super::Manifest> {
    let copy = super::copy::start(node).await?;
    let parts =
        futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(copy), |m| m.map_err(anyhow::Error::from));
    let manifest = super::create(target, parts, &Quiet).await?;
    let dropped = super::prune(target, retention).await?;
    if !dropped.is_empty() {
        tracing::info!(dropped = dropped.len(), "backups dropped by the retention");
    }
    Ok(manifest)
}
