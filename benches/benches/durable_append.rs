//! What a durable log append costs on this machine's disk, for the choice
//! of the Raft log's engine: a redb transaction committed with
//! `Durability::Immediate` (what nines uses), against a bare append-only
//! file with `fdatasync` after each append (what a hand-written segmented
//! WAL would cost at best: no index, no checksum of its own, no recovery).
//! Each row appends entries of one size, one durable commit per append, or
//! 16 appends per commit (group commit under load).
//!
//! `cargo bench -p nines-bench --bench durable_append` prints a Markdown
//! table; `crates/nines/docs/storage.md` keeps a run of it.

use std::io::Write;
use std::time::{Duration, Instant};

use redb::{Database, TableDefinition};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// Appends per row: enough for stable percentiles, a few seconds each.
const APPENDS: usize = 2_000;

/// Entry sizes: one small write, a batch of small writes, a large value.
const ENTRY_BYTES: [usize; 3] = [256, 16 * 1024, 256 * 1024];

struct Row {
    engine: &'static str,
    entry_bytes: usize,
    per_commit: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
    disk_bytes: u64,
}

/// Bytes this process has caused to be written to storage so far.
fn disk_written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn redb_appends(dir: &std::path::Path, entry_bytes: usize, per_commit: usize) -> Row {
    let db = Database::create(dir.join("log.redb")).expect("create redb");
    let payload = vec![0x5a; entry_bytes];
    let mut latencies = Vec::with_capacity(APPENDS / per_commit);
    let (started, before) = (Instant::now(), disk_written());
    for batch in 0..APPENDS / per_commit {
        let t = Instant::now();
        let txn = db.begin_write().expect("begin");
        {
            let mut log = txn.open_table(LOG).expect("table");
            for i in 0..per_commit {
                log.insert((batch * per_commit + i) as u64, payload.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    Row { engine: "redb", entry_bytes, per_commit, latencies, elapsed, disk_bytes: disk_written() - before }
}

fn wal_appends(dir: &std::path::Path, entry_bytes: usize, per_commit: usize) -> Row {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("wal")).expect("wal");
    let payload = vec![0x5a; entry_bytes];
    let mut latencies = Vec::with_capacity(APPENDS / per_commit);
    let (started, before) = (Instant::now(), disk_written());
    for _ in 0..APPENDS / per_commit {
        let t = Instant::now();
        for _ in 0..per_commit {
            file.write_all(&(payload.len() as u32).to_le_bytes()).expect("write");
            file.write_all(&payload).expect("write");
        }
        file.sync_data().expect("fdatasync");
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    Row {
        engine: "append + fdatasync",
        entry_bytes,
        per_commit,
        latencies,
        elapsed,
        disk_bytes: disk_written() - before,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    // Criterion's harness flags (`--bench`) are accepted and ignored.
    println!("| engine | entry | appends per commit | commits/s | p50 ms | p99 ms | disk bytes per entry |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for entry_bytes in ENTRY_BYTES {
        for per_commit in [1, 16] {
            for run in [redb_appends as fn(&std::path::Path, usize, usize) -> Row, wal_appends] {
                let dir = tempfile::tempdir_in(std::env::current_dir().expect("cwd")).expect("temp dir");
                let mut row = run(dir.path(), entry_bytes, per_commit);
                row.latencies.sort();
                let commits = row.latencies.len() as f64;
                println!(
                    "| {} | {} B | {} | {:.0} | {:.2} | {:.2} | {:.0} |",
                    row.engine,
                    row.entry_bytes,
                    row.per_commit,
                    commits / row.elapsed.as_secs_f64(),
                    percentile(&row.latencies, 0.50),
                    percentile(&row.latencies, 0.99),
                    row.disk_bytes as f64 / APPENDS as f64
                );
            }
        }
    }
}
