//! The data directory's format version: a small file, `FORMAT`, written
//! (and fsynced, with its directory) before anything else, and checked
//! before anything is opened. A directory written by another engine or an
//! unknown version stops the node with an error that says what it found and
//! what to do; nothing is opened, created or changed in it.

use std::path::Path;

use super::fsync_dir;

/// The file naming the format.
pub const FORMAT_FILE: &str = "FORMAT";

/// This version's format: the log in segment files under `log/`, the state
/// machine in a redb file (`state.redb`), snapshots under `snapshots/`. 3:
/// the region state records full syncs under way. 4: members have a peer
/// address. 5: the log moved from `log.redb` into segments.
pub const FORMAT_VERSION: u32 = 5;

/// The format this version upgrades in place (its log is moved into
/// segments when the storage opens: [`super::open`]).
pub const UPGRADABLE_VERSION: u32 = 4;

/// What `FORMAT` holds for a version.
fn format_text(version: u32) -> String {
    if version <= UPGRADABLE_VERSION {
        format!("nines data directory format {version} (redb)\n")
    } else {
        format!("nines data directory format {version} (log segments, redb)\n")
    }
}

/// Files of this format; any of them without `FORMAT` is a directory this
/// version did not write.
const OURS: [&str; 4] = ["log", "log.redb", "state.redb", "snapshots"];

/// What a directory was written by, and why it cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "{dir} was written by nines with sled (data format 1), which this version cannot read: sled did not \
         make acknowledged writes durable. Give this node an empty data directory and add it back to its \
         region (`nines member remove`, then `nines member add-learner` and `promote`), or restore a backup"
    )]
    Sled { dir: String },
    #[error(
        "{dir} has data format {found}, but this nines reads format {FORMAT_VERSION}; run the nines version \
         that wrote it, or give this node an empty data directory and add it back to its region"
    )]
    Version { dir: String, found: String },
    #[error(
        "{dir} holds {file} but no {FORMAT_FILE} file: it was not written by this version of nines (or it \
         was damaged). Move it away, or give this node an empty data directory"
    )]
    Unknown { dir: String, file: String },
    #[error("reading or writing the format of {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

/// Checks `dir`'s format without changing anything: `Ok(true)` if it is
/// this version's (or the one it upgrades), `Ok(false)` if the directory
/// holds nothing of a format (fresh), the refusal otherwise.
pub fn check(dir: &Path) -> Result<bool, FormatError> {
    let name = || dir.display().to_string();
    match std::fs::read_to_string(dir.join(FORMAT_FILE)) {
        Ok(text) if text == format_text(FORMAT_VERSION) || text == format_text(UPGRADABLE_VERSION) => {
            return Ok(true);
        }
        Ok(text) => return Err(FormatError::Version { dir: name(), found: format!("{:?}", text.trim()) }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FormatError::Io { dir: name(), source: e }),
    }
    if dir.join("db").exists() {
        return Err(FormatError::Sled { dir: name() });
    }
    if let Some(file) = OURS.iter().find(|f| dir.join(f).exists()) {
        return Err(FormatError::Unknown { dir: name(), file: file.to_string() });
    }
    Ok(false)
}

/// Whether `dir` has the format this version upgrades in place.
pub fn needs_upgrade(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(FORMAT_FILE)).is_ok_and(|t| t == format_text(UPGRADABLE_VERSION))
}

/// Checks `dir`'s format, or marks a fresh directory with this version's.
pub fn check_or_create(dir: &Path) -> Result<(), FormatError> {
    if check(dir)? {
        return Ok(());
    }
    mark(dir)
}

/// Marks `dir` with this version's format (durably, replacing any).
pub fn mark(dir: &Path) -> Result<(), FormatError> {
    let name = || dir.display().to_string();
    let io = |source| FormatError::Io { dir: name(), source };
    let path = dir.join(FORMAT_FILE);
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, format_text(FORMAT_VERSION).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        fsync_dir(dir)
    };
    write().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_directory_gets_the_format_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.log"), "logs may be there first").unwrap();
        check_or_create(dir.path()).unwrap();
        check_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(), format_text(FORMAT_VERSION));
    }

    #[test]
    fn other_formats_are_refused_with_what_was_found_and_what_to_do() {
        // (what the directory holds, words the error must contain)
        let table: [(&str, &str, &str); 3] = [
            ("db", "", "sled"),
            (FORMAT_FILE, "nines data directory format 9 (future)\n", "format 9"),
            ("state.redb", "", "no FORMAT file"),
        ];
        for (file, contents, want) in table {
            let dir = tempfile::tempdir().unwrap();
            if contents.is_empty() && file == "db" {
                std::fs::create_dir(dir.path().join(file)).unwrap();
            } else {
                std::fs::write(dir.path().join(file), contents).unwrap();
            }
            let e = check_or_create(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{file}: {e}");
            assert!(e.contains("empty data directory") || e.contains("nines version"), "{e}");
        }
    }
}
