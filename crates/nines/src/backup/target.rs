//! Where backups are kept: an object store named by a URL (`file:///dir`
//! for a local directory, `s3://bucket/prefix` with the usual `AWS_*`
//! environment variables), and the layout of backups in it.
//!
//! Layout: `backups/<id>/manifest.json` and `backups/<id>/<n>.chunk`. The
//! manifest is written last, so a backup without one is incomplete (a
//! create that failed or is still running) and nothing reads it. The
//! continuous archive: `archive/<region>/<first>-<last>.seg`, named by the
//! version indexes of its first and last write.

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::Manifest;

/// The folder of every backup.
const BACKUPS: &str = "backups";

/// The folder of the continuous archive.
const ARCHIVE: &str = "archive";

/// The manifest's name inside a backup's folder.
const MANIFEST: &str = "manifest.json";

/// An opened backup target.
#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    url: String,
}

/// One archive segment: the version indexes of its first and last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first: u64,
    pub last: u64,
    path: Path,
}

impl Segment {
    pub fn name(&self) -> &str {
        self.path.as_ref()
    }
}

/// A backup found in a target: its manifest, or its id alone when it has
/// none (incomplete).
#[derive(Debug, Clone)]
pub enum Listed {
    Complete(Box<Manifest>),
    Incomplete(String),
}

impl Target {
    /// Opens the target a URL names; a local directory is created.
    pub fn open(url: &str) -> anyhow::Result<Target> {
        let store: Arc<dyn ObjectStore> = if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() || !path.starts_with('/') {
                bail!("backup target {url:?}: a file URL needs an absolute path, as file:///var/backups/nines");
            }
            std::fs::create_dir_all(path).with_context(|| format!("creating backup directory {path}"))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(path)
                    .with_context(|| format!("opening backup directory {path}"))?,
            )
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("backup target {url:?} names no bucket: use s3://bucket/prefix");
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .with_context(|| format!("opening backup target {url} (AWS_* environment variables)"))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)) }
        } else {
            bail!("backup target {url:?}: use file:///absolute/dir or s3://bucket/prefix");
        };
        Ok(Target { store, url: url.to_string() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn chunk_path(id: &str, n: usize) -> Path {
        Path::from(format!("{BACKUPS}/{id}/{n:06}.chunk"))
    }

    fn manifest_path(id: &str) -> Path {
        Path::from(format!("{BACKUPS}/{id}/{MANIFEST}"))
    }

    /// Stores chunk `n` of backup `id`; returns its name in the manifest.
    pub async fn put_chunk(&self, id: &str, n: usize, bytes: Vec<u8>) -> anyhow::Result<String> {
        let path = Self::chunk_path(id, n);
        self.put(&path, bytes).await?;
        Ok(path.filename().unwrap_or_default().to_string())
    }

    /// Reads a chunk named in backup `id`'s manifest; a missing one is an
    /// error naming it.
    pub async fn chunk(&self, id: &str, name: &str) -> anyhow::Result<Bytes> {
        self.get(&Path::from(format!("{BACKUPS}/{id}/{name}"))).await
    }

    /// Stores a backup's manifest, which completes it.
    pub async fn put_manifest(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(manifest)?;
        self.put(&Self::manifest_path(&manifest.id), json).await
    }

    /// The manifest of backup `id`.
    pub async fn manifest(&self, id: &str) -> anyhow::Result<Manifest> {
        let bytes = self.get(&Self::manifest_path(id)).await.with_context(|| format!("backup {id}"))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("the manifest of backup {id} in {} does not parse", self.url))?;
        manifest.check(id)?;
        Ok(manifest)
    }

    /// Every backup in the target, oldest first (ids sort by creation time).
    pub async fn list(&self) -> anyhow::Result<Vec<Listed>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&Path::from(BACKUPS)))
            .await
            .with_context(|| format!("listing backups in {}", self.url))?;
        let mut ids: Vec<String> =
            listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            match self.store.head(&Self::manifest_path(&id)).await {
                Ok(_) => out.push(Listed::Complete(Box::new(self.manifest(&id).await?))),
                Err(object_store::Error::NotFound { .. }) => out.push(Listed::Incomplete(id)),
                Err(e) => return Err(e).with_context(|| format!("reading backup {id} in {}", self.url)),
            }
        }
        Ok(out)
    }

    /// The complete backups, oldest first.
    pub async fn manifests(&self) -> anyhow::Result<Vec<Manifest>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter_map(|l| match l {
                Listed::Complete(m) => Some(*m),
                Listed::Incomplete(_) => None,
            })
            .collect())
    }

    /// Deletes backup `id`: its manifest first, so a delete that stops
    /// half-way leaves an incomplete backup, never a manifest naming
    /// missing chunks.
    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        let prefix = Path::from(format!("{BACKUPS}/{id}"));
        match self.store.delete(&Self::manifest_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting backup {id}")),
        }
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for o in objects {
            self.store.delete(&o.location).await.with_context(|| format!("deleting {}", o.location))?;
        }
        Ok(())
    }

    /// Stores an archive segment of `region` holding writes `first..=last`.
    pub async fn put_segment(&self, region: &str, first: u64, last: u64, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.put(&Path::from(format!("{ARCHIVE}/{region}/{first:020}-{last:020}.seg")), bytes).await
    }

    /// The archive segments of `region`, by first write.
    pub async fn segments(&self, region: &str) -> anyhow::Result<Vec<Segment>> {
        let prefix = Path::from(format!("{ARCHIVE}/{region}"));
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("listing the archive of {region} in {}", self.url))?;
        let mut out = Vec::new();
        for o in objects {
            let name = o.location.filename().unwrap_or_default();
            let parsed = name
                .strip_suffix(".seg")
                .and_then(|n| n.split_once('-'))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            match parsed {
                Some((first, last)) => out.push(Segment { first, last, path: o.location }),
                None => bail!("{} in the archive is not a segment (FIRST-LAST.seg)", o.location),
            }
        }
        out.sort_by_key(|s| (s.first, s.last));
        Ok(out)
    }

    /// A segment's bytes.
    pub async fn segment(&self, segment: &Segment) -> anyhow::Result<Bytes> {
        self.get(&segment.path).await
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.store.put(path, bytes.into()).await.with_context(|| format!("writing {path} to {}", self.url))?;
        Ok(())
    }

    async fn get(&self, path: &Path) -> anyhow::Result<Bytes> {
        match self.store.get(path).await {
            Ok(r) => Ok(r.bytes().await.with_context(|| format!("reading {path} from {}", self.url))?),
            Err(object_store::Error::NotFound { .. }) => bail!("{path} is missing from {}", self.url),
            Err(e) => Err(e).with_context(|| format!("reading {path} from {}", self.url)),
        }
    }
}
