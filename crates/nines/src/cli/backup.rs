//! `nines backup create|list|verify|prune` and `nines restore`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{Format, Global, client};
use crate::backup::{self, Listed, Manifest, Retention, Target, restore};
use crate::types::{NodeId, NodeInfo};

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Back up the region the endpoints reach: a consistent copy at a
    /// linearizable point, streamed from its leader in checksummed chunks.
    Create {
        /// Where: file:///absolute/dir or s3://bucket/prefix (AWS_* variables).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// List the backups in a target, oldest first.
    List {
        #[arg(long)]
        from: String,
    },
    /// Recompute every checksum of a backup (default: every backup); exit 1
    /// naming the first bad chunk.
    Verify {
        #[arg(long)]
        from: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// Delete the backups the retention does not keep.
    Prune {
        #[arg(long)]
        from: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
}

#[derive(Args, Debug, Clone, Copy)]
pub struct RetentionArgs {
    /// Keep the newest N backups (applied after a create).
    #[arg(long)]
    keep: Option<u64>,
    /// Keep every backup created within this long, e.g. 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
}

impl RetentionArgs {
    fn retention(self) -> anyhow::Result<Retention> {
        if self.keep == Some(0) {
            bail!("--keep 0 would delete every backup; give at least 1");
        }
        Ok(Retention { keep: self.keep, keep_within: self.keep_within })
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup target: file:///absolute/dir or s3://bucket/prefix.
    #[arg(long)]
    from: String,
    /// The backup to restore (default: the newest, or the newest created
    /// before --to-time).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    until: UntilArgs,
    /// The configuration file of every node of the new region (repeat it):
    /// their data directories must hold no data, and they become the
    /// region's voters.
    #[arg(long = "config", required = true)]
    configs: Vec<PathBuf>,
}

/// How far a restore replays the archive.
#[derive(Args, Debug, Clone, Default)]
pub struct UntilArgs {
    /// Restore the state as of this time (RFC 3339, e.g.
    /// 2026-11-27T17:30:00Z): the newest backup created by then plus the
    /// continuous archive up to it. Default: every archived write.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    to_time: Option<std::time::SystemTime>,
    /// Restore the backup alone, without replaying the archive after it.
    #[arg(long, conflicts_with = "to_time")]
    no_archive: bool,
}

impl UntilArgs {
    pub fn until(&self) -> restore::Until {
        let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        restore::Until { time_ms: self.to_time.map(ms), no_archive: self.no_archive }
    }
}

/// A progress bar on a terminal (hidden elsewhere) over `total` bytes.
fn bar(total: Option<u64>, what: &str) -> ProgressBar {
    let pb = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let template = match total {
        Some(_) => "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ({eta})",
        None => "{prefix} {spinner} {bytes} {msg} ({bytes_per_sec})",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn manifest_row(m: &Manifest) -> String {
    format!(
        "{:<34} {:<10} {:>6} {:>10} {:>10} {:>12} {}",
        m.id, m.region, m.epoch, m.applied_index, m.keys, m.bytes, m.created
    )
}

fn manifest_json(m: &Manifest) -> serde_json::Value {
    serde_json::to_value(m).unwrap_or(serde_json::Value::Null)
}

pub async fn run(g: &Global, command: BackupCommand) -> anyhow::Result<bool> {
    match command {
        BackupCommand::Create { to, retention } => {
            let retention = retention.retention()?;
            let target = Target::open(&to)?;
            let stream = client(g)?.backup_stream().await.context("starting the copy on the region's leader")?;
            let parts = futures::StreamExt::map(stream, |m| m.map_err(|s| anyhow::anyhow!("{}", s.message())));
            let pb = bar(None, "backing up");
            let created = backup::create(&target, parts, &pb).await;
            pb.finish_and_clear();
            let m = created?;
            let dropped = backup::prune(&target, &retention).await?;
            match g.format {
                Format::Json => println!("{}", json!({ "backup": manifest_json(&m), "pruned": dropped })),
                Format::Table => {
                    println!(
                        "backup {} of region {}: {} keys, {} bytes in {} chunks, at applied index {} (term {}), \
                         writes {} .. {}",
                        m.id,
                        m.region,
                        m.keys,
                        m.bytes,
                        m.chunks.len(),
                        m.applied_index,
                        m.applied_term,
                        m.hlc_min,
                        m.hlc_max
                    );
                    if !dropped.is_empty() {
                        println!("pruned {} older backups: {}", dropped.len(), dropped.join(", "));
                    }
                }
            }
            Ok(true)
        }
        BackupCommand::List { from } => {
            let listed = Target::open(&from)?.list().await?;
            match g.format {
                Format::Json => {
                    let all: Vec<_> = listed
                        .iter()
                        .map(|l| match l {
                            Listed::Complete(m) => manifest_json(m),
                            Listed::Incomplete(id) => json!({ "id": id, "incomplete": true }),
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(all));
                }
                Format::Table => {
                    println!(
                        "{:<34} {:<10} {:>6} {:>10} {:>10} {:>12} CREATED",
                        "ID", "REGION", "EPOCH", "INDEX", "KEYS", "BYTES"
                    );
                    for l in &listed {
                        match l {
                            Listed::Complete(m) => println!("{}", manifest_row(m)),
                            Listed::Incomplete(id) => println!("{id:<34} (incomplete: no manifest)"),
                        }
                    }
                }
            }
            Ok(true)
        }
        BackupCommand::Verify { from, id } => {
            let target = Target::open(&from)?;
            let manifests = match id {
                Some(id) => vec![target.manifest(&id).await?],
                None => target.manifests().await?,
            };
            if manifests.is_empty() {
                bail!("{from} holds no complete backup to verify");
            }
            for m in &manifests {
                let pb = bar(Some(m.bytes), &format!("verifying {}", m.id));
                let checked = backup::verify(&target, m, &pb).await;
                pb.finish_and_clear();
                if let Err(e) = checked {
                    eprintln!("nines: {e:#}");
                    return Ok(false);
                }
                match g.format {
                    Format::Json => println!("{}", json!({ "id": m.id, "ok": true, "chunks": m.chunks.len() })),
                    Format::Table => {
                        println!("{}: {} chunks, {} keys: every checksum matches", m.id, m.chunks.len(), m.keys)
                    }
                }
            }
            Ok(true)
        }
        BackupCommand::Prune { from, retention } => {
            let retention = retention.retention()?;
            if !retention.is_set() {
                bail!("prune needs --keep or --keep-within (without either every backup is kept)");
            }
            let dropped = backup::prune(&Target::open(&from)?, &retention).await?;
            match g.format {
                Format::Json => println!("{}", json!({ "pruned": dropped })),
                Format::Table => println!(
                    "pruned {} backups{}",
                    dropped.len(),
                    if dropped.is_empty() { String::new() } else { format!(": {}", dropped.join(", ")) }
                ),
            }
            Ok(true)
        }
    }
}

/// The new region's members from their configuration files.
fn members(configs: &[crate::config::NodeConfig]) -> anyhow::Result<Vec<(NodeId, NodeInfo, PathBuf)>> {
    let mut out: Vec<(NodeId, NodeInfo, PathBuf)> = Vec::new();
    for c in configs {
        if c.region != configs[0].region {
            bail!(
                "the configurations name regions {} and {}: restore one region at a time",
                configs[0].region,
                c.region
            );
        }
        if out.iter().any(|(id, _, _)| *id == c.id) {
            bail!("node id {} appears in two configurations", c.id);
        }
        out.push((c.id, NodeInfo::listening(c), c.data_dir.clone()));
    }
    Ok(out)
}

/// Restores a backup into the data directories of `configs`; prints the
/// summary.
pub async fn restore_into(
    from: &str,
    id: Option<&str>,
    until: restore::Until,
    configs: &[crate::config::NodeConfig],
) -> anyhow::Result<restore::Restored> {
    let target = Target::open(from)?;
    let manifest = restore::choose(&target, id, until).await?;
    let members = members(configs)?;
    let pb = bar(Some(manifest.bytes), &format!("restoring {}", manifest.id));
    let restored = restore::restore(&target, &manifest, until, &members, &pb).await;
    pb.finish_and_clear();
    restored
}

/// What a restore did, in one line.
pub fn describe(r: &restore::Restored, region: &str) -> String {
    format!(
        "restored backup {} (created {}) and {} archived writes from {} segments into {} nodes of region {region}: \
         {} keys, newest write {}, the log starts after index {}",
        r.backup, r.created, r.replayed, r.segments, r.nodes, r.keys, r.hlc_max, r.applied_index
    )
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<bool> {
    let configs =
        args.configs.iter().map(|p| crate::daemon::load_config(Some(p))).collect::<anyhow::Result<Vec<_>>>()?;
    for c in &configs {
        c.validate()?;
    }
    let r = restore_into(&args.from, args.id.as_deref(), args.until.until(), &configs).await?;
    println!("{}", describe(&r, &configs[0].region));
    println!("start each node with its configuration; the nodes elect a leader on their own (no `member init`)");
    Ok(true)
}
