//! Corrupt records on disk are errors that stop the node, never silently
//! missing data.

mod common;

use std::time::Duration;

use common::{TestCluster, serial};
use nines::rpc::{Consistency, Error};
use redb::{Database, ReadableTable, TableDefinition};
use tonic::Code;

/// Flips one payload byte of a stored record, leaving its header intact,
/// so only the checksum can tell.
fn flip_payload(record: &[u8]) -> Vec<u8> {
    let mut bad = record.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_record_is_data_loss_and_stops_the_node() {
    // Shows: a value whose record fails its checksum is reported as
    // DATA_LOSS (not as a missing key) and the node stops with an error.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(1, |_| {}).await;
    cluster.client().put("k", "value").await.expect("put");
    assert!(cluster.stop(1).success(), "clean stop");
    {
        const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
        let db = Database::open(cluster.nodes[&1].config.data_dir.join("state.redb")).expect("open state");
        let txn = db.begin_write().unwrap();
        {
            let mut data = txn.open_table(DATA).unwrap();
            let record = data.get(&b"k"[..]).unwrap().expect("the value's record is on disk").value().to_vec();
            data.insert(&b"k"[..], flip_payload(&record).as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    cluster.spawn(1);
    cluster.wait_serving(1).await;
    let err = cluster.client().get("k", Consistency::Local).await.expect_err("corrupt read");
    assert!(matches!(&err, Error::Server { code: Code::DataLoss, message } if message.contains("checksum")), "{err:?}");
    let status = cluster.wait_exit(1, Duration::from_secs(30)).expect("the node stops by itself");
    assert!(!status.success(), "a node that found corruption must exit with an error: {status}");
    assert!(cluster.log_of(1).contains("can no longer be trusted"), "{}", cluster.log_of(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_record_stops_the_node_at_startup() {
    // Shows: a Raft log entry that fails its checksum stops the node when it
    // reads its log, with an error that says so.
    let _serial = serial().await;
    let mut cluster = TestCluster::start(1, |_| {}).await;
    cluster.client().put("k", "value").await.expect("put");
    assert!(cluster.stop(1).success(), "clean stop");
    {
        // Damage the first entry of the last segment: later writes follow
        // it whole, so it was synced (damage in the very last write would
        // read as a write torn by a power cut, and be cut off).
        let log_dir = cluster.nodes[&1].config.data_dir.join("log");
        let mut segments: Vec<_> = std::fs::read_dir(&log_dir)
            .expect("log directory")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segments.sort();
        let last = segments.last().expect("a log segment");
        let bytes = std::fs::read(last).unwrap();
        let mut records = Vec::new();
        let mut pos = 0;
        while pos + 4 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            records.push(pos + 4..pos + 4 + len);
            pos += 4 + len;
        }
        assert!(records.len() >= 4, "a few writes in the segment: {}", records.len());
        let entry = records[0].clone();
        let mut damaged = bytes.clone();
        damaged[entry.clone()].copy_from_slice(&flip_payload(&bytes[entry]));
        std::fs::write(last, &damaged).unwrap();
    }
    cluster.spawn(1);
    let status = cluster.wait_exit(1, Duration::from_secs(30)).expect("the node stops by itself");
    assert!(!status.success(), "{status}");
    let log = cluster.log_of(1);
    assert!(log.contains("checksum mismatch"), "the error names the checksum: {log}");
}
