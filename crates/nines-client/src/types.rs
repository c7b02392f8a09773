//! The client's own types: what a call takes and returns, free of the wire
//! crate's generated types.

use nines_proto::v1 as pb;

/// The version every stored value carries.
///
/// Within a region `index` is unique and grows in log order; `(hlc,
/// origin_region)` names the write in every region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Version {
    /// Hybrid logical clock: physical milliseconds since the Unix epoch.
    pub hlc_physical_ms: u64,
    /// Hybrid logical clock: orders events within one millisecond.
    pub hlc_logical: u32,
    /// The region that accepted the write.
    pub origin_region: String,
    /// Where the write applied in this region's log (entry index x 1024 +
    /// position in the entry).
    pub index: u64,
}

impl Version {
    /// A version that names a write by its HLC and origin region, for
    /// [`Expect::Version`] (which does not compare `index`).
    ///
    /// ```
    /// let v = nines_client::Version::new(1_732_670_000_123, 4, "us-east");
    /// assert_eq!(v.origin_region, "us-east");
    /// ```
    pub fn new(hlc_physical_ms: u64, hlc_logical: u32, origin_region: impl Into<String>) -> Self {
        Version { hlc_physical_ms, hlc_logical, origin_region: origin_region.into(), index: 0 }
    }

    pub(crate) fn from_pb(v: pb::Version) -> Self {
        Version {
            hlc_physical_ms: v.hlc_physical_ms,
            hlc_logical: v.hlc_logical,
            origin_region: v.origin_region,
            index: v.index,
        }
    }

    pub(crate) fn to_pb(&self) -> pb::Version {
        pb::Version {
            hlc_physical_ms: self.hlc_physical_ms,
            hlc_logical: self.hlc_logical,
            origin_region: self.origin_region.clone(),
            index: self.index,
        }
    }
}

/// A key, its value and the value's version.
///
/// ```no_run
/// # async fn demo(client: nines_client::Client) -> Result<(), nines_client::Error> {
/// if let Some(kv) = client.get("k").await? {
///     println!("{} = {:?} (index {})", String::from_utf8_lossy(&kv.key), kv.value, kv.version.index);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
    /// The value's version.
    pub version: Version,
}

impl KeyValue {
    pub(crate) fn from_pb(kv: pb::KeyValue) -> Option<Self> {
        Some(KeyValue { key: kv.key, value: kv.value, version: Version::from_pb(kv.version?) })
    }
}

/// How fresh a read must be.
///
/// ```
/// let client = nines_client::Client::builder().consistency(nines_client::Consistency::Local).build();
/// # drop(client);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Consistency {
    /// The region's leader confirms it still leads and the read reflects
    /// every write the region acknowledged before it began.
    #[default]
    Linearizable,
    /// Any node of the home region answers from its own state: fast, and
    /// possibly behind.
    Local,
}

impl Consistency {
    pub(crate) fn to_pb(self) -> i32 {
        match self {
            Consistency::Linearizable => pb::Consistency::Linearizable as i32,
            Consistency::Local => pb::Consistency::Local as i32,
        }
    }
}

/// What a compare-and-swap compares the key's current value against.
///
/// ```
/// use nines_client::{Expect, Version};
/// let by_index = Expect::Index(2048);
/// let by_write = Expect::Version(Version::new(1_732_670_000_123, 4, "us-east"));
/// # drop((by_index, by_write, Expect::Absent));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expect {
    /// The key must be absent (or deleted).
    Absent,
    /// The current version's `index`: assigned by one region's log, so use
    /// it with a version read in the region the write goes to.
    Index(u64),
    /// The current value must be this write (its HLC and origin region,
    /// the same in every region): safe with a version read anywhere.
    Version(Version),
}

/// What a compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Swap {
    /// The comparison held and the value was written at this version.
    Done(Version),
    /// The comparison failed; this is the current value (`None`: absent).
    Mismatch(Option<KeyValue>),
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deleted {
    /// A live value existed before the delete.
    pub existed: bool,
    /// The version of the tombstone.
    pub version: Version,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ScanPage {
    /// Live keys in order.
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one.
    pub more: bool,
}

/// Which keys a scan covers.
///
/// ```
/// let users = nines_client::KeyRange::Prefix(b"user/".to_vec());
/// let a_to_m = nines_client::KeyRange::Range { start: b"a".to_vec(), end: b"m".to_vec() };
/// # drop((users, a_to_m));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyRange {
    /// Keys in `[start, end)`; an empty `end` means no upper bound.
    Range {
        /// First key, inclusive.
        start: Vec<u8>,
        /// Last key, exclusive; empty for none.
        end: Vec<u8>,
    },
    /// Every key beginning with these bytes.
    Prefix(Vec<u8>),
}
