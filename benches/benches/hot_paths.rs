//! Micro-benchmarks of nines' hot paths: encoding a log entry, applying a
//! batch of writes to the state machine, and the last-writer-wins merge of
//! a shipment from another region. `cargo bench -p nines-bench`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use nines::config::Mode;
use nines::hlc::{Hlc, HlcClock};
use nines::storage::record;
use nines::storage::state_machine::StateMachine;
use nines::types::{Command, Entry, RemoteEntry, ReplicationSetup};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};

/// Writes per applied batch: openraft hands the state machine what one
/// flush committed, typically tens of entries under load.
const BATCH: u64 = 64;

fn put(i: u64) -> Command {
    Command::Put {
        key: format!("key-{i:08}").into_bytes(),
        value: vec![b'v'; 128],
        hlc: Hlc { physical_ms: 1_700_000_000_000 + i, logical: 0 },
    }
}

fn entry(index: u64, cmd: Command) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) }
}

fn state_machine(dir: &std::path::Path, peers: &[&str]) -> StateMachine {
    let setup = ReplicationSetup {
        region: "a".into(),
        peers: peers.iter().map(|p| p.to_string()).collect(),
        mode: Mode::ActiveActive,
        initial_primary: String::new(),
    };
    let mut sm = StateMachine::open(dir, 64 << 20, None, Arc::new(HlcClock::wall(500))).expect("open state machine");
    // The region's setup is its first entry (index 0; the benches start at 1).
    let configure = entry(0, Command::Configure { setup, replace: false });
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(sm.apply([configure])).expect("configure");
    sm
}

fn encode_log_entry(c: &mut Criterion) {
    let e = entry(42, put(42));
    c.bench_function("encode log entry (128 B put)", |b| b.iter(|| record::encode(black_box(&e)).unwrap()));
    let bytes = record::encode(&e).unwrap();
    c.bench_function("decode log entry (128 B put)", |b| {
        b.iter(|| record::decode::<Entry>(black_box(&bytes)).unwrap())
    });
}

fn apply_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sm = state_machine(dir.path(), &["b"]);
    let mut next = 1u64;
    c.bench_function("apply 64 puts to the state machine", |b| {
        b.iter_batched(
            || {
                let batch: Vec<Entry> = (next..next + BATCH).map(|i| entry(i, put(i % 10_000))).collect();
                next += BATCH;
                batch
            },
            |batch| rt.block_on(sm.apply(batch)).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

fn lww_merge(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sm = state_machine(dir.path(), &["b"]);
    // Half the shipped keys exist locally with older versions, half are new.
    let local: Vec<Entry> = (1..=BATCH / 2).map(|i| entry(i, put(i))).collect();
    rt.block_on(sm.apply(local)).unwrap();
    let mut next_index = BATCH;
    let mut origin_index = 0u64;
    c.bench_function("merge a 64-write shipment last-writer-wins", |b| {
        b.iter_batched(
            || {
                let entries: Vec<RemoteEntry> = (0..BATCH)
                    .map(|i| {
                        origin_index += 1;
                        RemoteEntry {
                            origin_index,
                            key: format!("key-{:08}", i + 1).into_bytes(),
                            value: Some(vec![b'r'; 128]),
                            hlc: Hlc { physical_ms: 1_700_000_000_000 + origin_index, logical: 0 },
                        }
                    })
                    .collect();
                next_index += 1;
                let cmd = Command::ApplyRemote {
                    origin: "b".into(),
                    epoch: 0,
                    entries,
                    complete_through: origin_index,
                    collect_below_ms: 0,
                };
                vec![entry(next_index, cmd)]
            },
            |batch| rt.block_on(sm.apply(batch)).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, encode_log_entry, apply_batch, lww_merge);
criterion_main!(benches);
