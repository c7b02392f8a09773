//! The key-value commands (`put`, `get`, `del`, `cas`, `scan`) on the
//! client library applications embed, with etcdctl's habits: exit codes
//! that tell the failures apart ([`exit`]), `-w json` with keys and values
//! in base64 (safe for binary data), values from a file or stdin, and
//! `--dial-timeout` / `--command-timeout`.

use std::io::Read;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nines_client::{Client, Consistency, Expect, KeyRange, KeyValue, Swap, Version};
use serde_json::json;

use super::{Format, Global, ReadConsistency, print_json, print_table};

/// The exit codes of `nines` (the README's table); every failure prints a
/// one-line reason on stderr.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any other failure (refused by the cluster's state, a server error).
    pub const FAILED: i32 = 1;
    /// Invalid input: bad usage, a bad endpoint, a key or value beyond a
    /// limit. Nothing was sent, or the cluster refused it unapplied.
    pub const INVALID: i32 = 2;
    /// The key does not exist (`get`).
    pub const NOT_FOUND: i32 = 3;
    /// No node answered within the command timeout; the request had no
    /// effect.
    pub const UNREACHABLE: i32 = 4;
    /// A write's outcome is unknown: it may or may not have been applied.
    pub const OUTCOME_UNKNOWN: i32 = 5;
    /// A compare-and-swap found another version (`cas`).
    pub const COMPARE_FAILED: i32 = 6;
}

/// A command that ended with a specific exit code and its reason.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Exit { code, message: message.into() }
    }
}

impl From<nines_client::Error> for Exit {
    fn from(e: nines_client::Error) -> Self {
        use nines_client::Error as E;
        let code = match &e {
            E::Unavailable { .. } => exit::UNREACHABLE,
            E::OutcomeUnknown(_) => exit::OUTCOME_UNKNOWN,
            E::InvalidInput(_) | E::InvalidEndpoint { .. } => exit::INVALID,
            _ => exit::FAILED,
        };
        Exit::new(code, e.to_string())
    }
}

/// Where a write's value comes from: the argument, `--file PATH`, or stdin
/// (`--file -`, or neither given).
#[derive(clap::Args, Debug, Clone)]
pub struct ValueArgs {
    /// The value; without it (and without --file) it is read from stdin.
    pub value: Option<String>,
    /// Read the value from this file (`-` for stdin), byte for byte.
    #[arg(long, conflicts_with = "value")]
    pub file: Option<PathBuf>,
}

impl ValueArgs {
    fn read(&self) -> Result<Vec<u8>, Exit> {
        let invalid =
            |what: &str, e: std::io::Error| Exit::new(exit::INVALID, format!("reading the value from {what}: {e}"));
        match (&self.value, &self.file) {
            (Some(v), _) => Ok(v.clone().into_bytes()),
            (None, Some(path)) if path.as_os_str() != "-" => {
                std::fs::read(path).map_err(|e| invalid(&path.display().to_string(), e))
            }
            (None, _) => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map_err(|e| invalid("stdin", e))?;
                Ok(buf)
            }
        }
    }
}

/// The key-value commands.
#[derive(clap::Subcommand, Debug)]
pub enum KvCommand {
    /// Write a value (from the argument, --file, or stdin).
    Put {
        key: String,
        #[command(flatten)]
        value: ValueArgs,
    },
    /// Read a value. Exit code 3 if the key does not exist.
    Get {
        key: String,
        #[arg(long, value_enum, default_value_t = ReadConsistency::Linearizable)]
        consistency: ReadConsistency,
    },
    /// Delete a key.
    Del { key: String },
    /// Write a value only if the key's current version matches (exit code
    /// 6 if it does not).
    Cas {
        key: String,
        #[command(flatten)]
        value: ValueArgs,
        /// The version the key must currently have: its index (`2048`, as
        /// this region's log assigned it), or the write itself as
        /// `HLC@ORIGIN` (`1732670000123.4@us-east`, valid in any region).
        #[arg(long, conflicts_with = "expect_absent", required_unless_present = "expect_absent")]
        #[arg(value_parser = parse_expected_version)]
        expect_version: Option<Expect>,
        /// The key must not exist.
        #[arg(long)]
        expect_absent: bool,
    },
    /// List keys in a range or with a prefix.
    Scan {
        /// Keys beginning with this.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        prefix: Option<String>,
        /// First key (inclusive).
        #[arg(long)]
        from: Option<String>,
        /// Last key (exclusive).
        #[arg(long)]
        to: Option<String>,
        /// At most this many keys (default 1000, at most 10000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = ReadConsistency::Linearizable)]
        consistency: ReadConsistency,
    },
}

/// Parses `--expect-version`: `INDEX` or `PHYSICAL_MS.LOGICAL@ORIGIN`.
pub(crate) fn parse_expected_version(s: &str) -> Result<Expect, String> {
    if let Ok(index) = s.parse::<u64>() {
        return Ok(Expect::Index(index));
    }
    let bad = || format!("{s:?} is neither a version index (2048) nor HLC@ORIGIN (1732670000123.4@us-east)");
    let (hlc, origin) = s.split_once('@').ok_or_else(bad)?;
    let (ms, logical) = hlc.split_once('.').ok_or_else(bad)?;
    let (Ok(hlc_physical_ms), Ok(hlc_logical)) = (ms.parse::<u64>(), logical.parse::<u32>()) else { return Err(bad()) };
    if origin.is_empty() {
        return Err(bad());
    }
    Ok(Expect::Version(Version::new(hlc_physical_ms, hlc_logical, origin)))
}

fn client(g: &Global, consistency: ReadConsistency) -> Result<Client, Exit> {
    let consistency = match consistency {
        ReadConsistency::Linearizable => Consistency::Linearizable,
        ReadConsistency::Local => Consistency::Local,
    };
    let mut builder = Client::builder();
    if let Some(tls) = g.tls().map_err(|e| Exit::new(exit::INVALID, e.to_string()))? {
        builder = builder.tls(tls.client().map_err(|e| Exit::new(exit::INVALID, e.to_string()))?);
    }
    Ok(builder
        .endpoints(g.endpoints.clone())
        .connect_timeout(g.dial_timeout)
        // Longer than a dial: an attempt that ends while still connecting
        // would count as one whose outcome is unknown.
        .attempt_timeout((g.dial_timeout + std::time::Duration::from_secs(1)).min(g.command_timeout))
        .request_timeout(g.command_timeout)
        .consistency(consistency)
        .build()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn version_json(v: &Version) -> serde_json::Value {
    json!({
        "index": v.index, "hlc": format!("{}.{}", v.hlc_physical_ms, v.hlc_logical), "origin_region": v.origin_region
    })
}

fn version_text(v: &Version) -> String {
    format!("version {} ({}.{}@{})", v.index, v.hlc_physical_ms, v.hlc_logical, v.origin_region)
}

/// A key-value pair as JSON: key and value in base64, as etcdctl prints
/// them, so binary data survives.
fn kv_json(kv: &KeyValue) -> serde_json::Value {
    json!({ "key": BASE64.encode(&kv.key), "value": BASE64.encode(&kv.value), "version": version_json(&kv.version) })
}

fn kv_row(kv: &KeyValue) -> Vec<String> {
    vec![text(&kv.key), text(&kv.value), version_text(&kv.version)]
}

/// Runs one key-value command.
pub async fn run(g: &Global, command: KvCommand) -> Result<(), Exit> {
    let json = g.format == Format::Json;
    match command {
        KvCommand::Put { key, value } => {
            let value = value.read()?;
            let v = client(g, ReadConsistency::Linearizable)?.put(key.as_bytes(), value).await?;
            if json {
                print_json(json!({ "key": BASE64.encode(&key), "version": version_json(&v) }));
            } else {
                println!("OK {}", version_text(&v));
            }
        }
        KvCommand::Get { key, consistency } => {
            let found = client(g, consistency)?.get(key.as_bytes()).await?;
            let Some(kv) = found else {
                if json {
                    print_json(json!({ "kv": null }));
                }
                return Err(Exit::new(exit::NOT_FOUND, format!("key {key:?} not found")));
            };
            if json {
                print_json(json!({ "kv": kv_json(&kv) }));
            } else {
                print_table(&["KEY", "VALUE", "VERSION"], &[kv_row(&kv)]);
            }
        }
        KvCommand::Del { key } => {
            let d = client(g, ReadConsistency::Linearizable)?.delete(key.as_bytes()).await?;
            if json {
                print_json(
                    json!({ "key": BASE64.encode(&key), "existed": d.existed, "version": version_json(&d.version) }),
                );
            } else {
                let what = if d.existed { "DELETED" } else { "ABSENT (tombstone written)" };
                println!("{what} {}", version_text(&d.version));
            }
        }
        KvCommand::Cas { key, value, expect_version, expect_absent } => {
            let expect = match (expect_version, expect_absent) {
                (Some(v), false) => v,
                _ => Expect::Absent,
            };
            let value = value.read()?;
            let swap =
                client(g, ReadConsistency::Linearizable)?.compare_and_swap(key.as_bytes(), expect, value).await?;
            let (version, current) = match &swap {
                Swap::Done(v) => (Some(v), None),
                Swap::Mismatch(current) => (None, current.as_ref()),
                _ => (None, None),
            };
            if json {
                print_json(json!({
                    "key": BASE64.encode(&key), "succeeded": version.is_some(),
                    "version": version.map(version_json), "current": current.map(kv_json)
                }));
            } else if let Some(v) = version {
                println!("OK {}", version_text(v));
            }
            if version.is_none() {
                let now = current.map(|kv| version_text(&kv.version)).unwrap_or_else(|| "absent".into());
                return Err(Exit::new(exit::COMPARE_FAILED, format!("compare failed: key {key:?} is {now}")));
            }
        }
        KvCommand::Scan { prefix, from, to, limit, consistency } => {
            let range = match prefix {
                Some(p) => KeyRange::Prefix(p.into_bytes()),
                None => KeyRange::Range {
                    start: from.unwrap_or_default().into_bytes(),
                    end: to.unwrap_or_default().into_bytes(),
                },
            };
            let page = client(g, consistency)?.scan(range, limit).await?;
            if json {
                let kvs: Vec<_> = page.kvs.iter().map(kv_json).collect();
                print_json(json!({ "kvs": kvs, "more": page.more }));
            } else {
                let rows: Vec<Vec<String>> = page.kvs.iter().map(kv_row).collect();
                print_table(&["KEY", "VALUE", "VERSION"], &rows);
                if page.more {
                    println!("(more keys follow; continue with --from)");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_versions_parse_as_an_index_or_a_write() {
        assert_eq!(parse_expected_version("2048").unwrap(), Expect::Index(2048));
        let Expect::Version(v) = parse_expected_version("1732670000123.4@us-east").unwrap() else { panic!("a write") };
        assert_eq!((v.hlc_physical_ms, v.hlc_logical, v.origin_region.as_str()), (1732670000123, 4, "us-east"));
        for bad in ["", "x", "12@", "1.2", "1.x@a", "@a"] {
            assert!(parse_expected_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_errors_map_to_the_documented_exit_codes() {
        use nines_client::Error as E;
        let table = [
            (E::Unavailable { attempts: 3, last: "x".into() }, exit::UNREACHABLE),
            (E::OutcomeUnknown("x".into()), exit::OUTCOME_UNKNOWN),
            (E::InvalidInput("x".into()), exit::INVALID),
            (E::Refused("x".into()), exit::FAILED),
        ];
        for (e, code) in table {
            assert_eq!(Exit::from(e.clone()).code, code, "{e}");
        }
    }
}
