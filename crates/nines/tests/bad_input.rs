//! Bad input: every limit and malformed field gets INVALID_ARGUMENT naming
//! the problem, nothing is stored, and the cluster keeps serving.

mod common;

use common::{TestCluster, serial};
use nines::limits::{KEY_BYTES_MAX, REQUEST_BYTES_MAX, SCAN_LIMIT_MAX, VALUE_BYTES_MAX};
use nines::rpc::{Consistency, Error, Expect, KeyRange};
use nines_proto::v1::kv_client::KvClient;
use nines_proto::v1::raft_client::RaftClient;
use nines_proto::v1::replication_client::ReplicationClient;
use nines_proto::v1::{CompareAndSwapRequest, GetRequest, PutRequest, ScanRequest, Session};
use nines_proto::v1::{RaftMessage, ShipRequest};
use tonic::Code;

fn assert_invalid<T: std::fmt::Debug>(what: &str, r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains(needle), "{what}: message {msg:?} lacks {needle:?}"),
        other => panic!("{what}: expected invalid argument naming {needle:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_and_malformed_field_is_refused_by_name_and_the_cluster_keeps_serving() {
    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let c = cluster.client();

    assert_invalid("empty key", c.put("", "v").await, "key is empty");
    assert_invalid("long key", c.put(vec![b'k'; KEY_BYTES_MAX + 1], "v").await, "KEY_BYTES_MAX");
    assert_invalid("long value", c.put("k", vec![0u8; VALUE_BYTES_MAX + 1]).await, "VALUE_BYTES_MAX");
    assert_invalid("long key on get", c.get(vec![b'k'; KEY_BYTES_MAX + 1], Consistency::Local).await, "KEY_BYTES_MAX");
    assert_invalid("empty key on delete", c.delete("").await, "key is empty");
    assert_invalid(
        "cas long value",
        c.compare_and_swap("k", vec![0u8; VALUE_BYTES_MAX + 1], Expect::Absent).await,
        "VALUE_BYTES_MAX",
    );
    assert_invalid("cas version 0", c.compare_and_swap("k", "v", Expect::Index(0)).await, "expected_index 0");
    assert_invalid(
        "scan limit",
        c.scan(KeyRange::Prefix(b"k".to_vec()), SCAN_LIMIT_MAX + 1, Consistency::Local).await,
        "SCAN_LIMIT_MAX",
    );
    assert_invalid(
        "scan inverted",
        c.scan(KeyRange::Range { start: b"b".to_vec(), end: b"a".to_vec() }, 0, Consistency::Local).await,
        "below end",
    );

    // Fields the typed client cannot express, sent raw.
    let mut raw = KvClient::connect(cluster.nodes[&1].grpc()).await.expect("connect");
    let s = raw.get(GetRequest { key: b"k".to_vec(), consistency: 7 }).await.expect_err("unknown consistency");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("consistency 7"), "{}", s.message());
    let s = raw
        .compare_and_swap(CompareAndSwapRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: None,
            session: None,
        })
        .await
        .expect_err("cas without expected");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("expected is not set"), "{}", s.message());
    let s = raw
        .scan(ScanRequest { prefix: b"a".to_vec(), start: b"a".to_vec(), ..Default::default() })
        .await
        .expect_err("prefix and start");
    assert_eq!(s.code(), Code::InvalidArgument);
    // Client sessions with an id that is not 16 bytes, or numbers out of
    // order, are refused by name.
    let sessions = [
        (Session { client: vec![1; 5], seq: 1, first_unanswered: 1, retry: false }, "16"),
        (Session { client: vec![1; 16], seq: 0, first_unanswered: 0, retry: false }, "seq 0"),
        (Session { client: vec![1; 16], seq: 2, first_unanswered: 3, retry: false }, "first_unanswered 3"),
    ];
    for (session, needle) in sessions {
        let req = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), session: Some(session) };
        let s = raw.put(req).await.expect_err("bad session");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(needle), "{} lacks {needle:?}", s.message());
    }
    // A message above the request limit is refused by the gRPC layer before
    // it is decoded; the message names the size limit.
    let s = raw
        .put(PutRequest { key: b"k".to_vec(), value: vec![0u8; REQUEST_BYTES_MAX + 1], session: None })
        .await
        .expect_err("oversize request");
    assert!(matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument), "{s:?}");
    assert!(s.message().contains(&REQUEST_BYTES_MAX.to_string()), "{}", s.message());

    // Hostile peer input is refused by name: a shipment at epoch u64::MAX,
    // a snapshot chunk at an offset near u64::MAX (at the peer port, where
    // those services are).
    let url = cluster.nodes[&1].peer();
    let ship = ShipRequest { origin_region: "elsewhere".into(), epoch: u64::MAX, ..Default::default() };
    let s = ReplicationClient::connect(url.clone()).await.unwrap().ship(ship).await.expect_err("epoch u64::MAX");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("EPOCH_MAX"), "{}", s.message());
    let chunk = openraft::raft::InstallSnapshotRequest::<nines::types::TypeConfig> {
        vote: Default::default(),
        meta: Default::default(),
        offset: u64::MAX - 1,
        data: vec![1, 2, 3],
        done: false,
    };
    let payload = postcard::to_allocvec(&chunk).unwrap();
    let s =
        RaftClient::connect(url).await.unwrap().install_snapshot(RaftMessage { payload }).await.expect_err("offset");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("SNAPSHOT_BYTES_MAX"), "{}", s.message());

    // Nothing was stored, and the cluster still serves.
    let r = c.get("k", Consistency::Linearizable).await.expect("get");
    assert!(r.kv.is_none(), "a refused write left a value: {:?}", r.kv);
    c.put("k", vec![7u8; VALUE_BYTES_MAX]).await.expect("a value at the limit is accepted");
    let r = c.get("k", Consistency::Linearizable).await.expect("get");
    assert_eq!(r.kv.unwrap().value.len(), VALUE_BYTES_MAX);
    let max_key = vec![b'k'; KEY_BYTES_MAX];
    c.put(max_key.clone(), "v").await.expect("a key at the limit is accepted");
    assert!(c.get(max_key, Consistency::Linearizable).await.unwrap().kv.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_batch_over_the_limit_is_refused_at_apply_and_the_region_keeps_serving() {
    // Shows: a Raft entry packing WRITES_PER_ENTRY_MAX + 1 writes (position
    // 1024, which no leader of this build proposes: a forged leader sends it
    // to every node, so it is committed everywhere) is refused when applied,
    // by every node, without a crash; the region elects a leader and serves.
    use nines::types::{Command, Entry, TypeConfig};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    let _serial = serial().await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let c = cluster.client();
    c.put("before", "v").await.expect("put");
    // A quiet region: every node holds the same log.
    let leader = cluster.wait_leader().await;
    let (term, last) = loop {
        let all: Vec<_> = terms_and_last_indexes(&cluster).await;
        if all.windows(2).all(|w| w[0] == w[1]) {
            break all[0];
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The forged leader: node 99 (no member; this cluster is insecure) at
    // the next term.
    let forged = CommittedLeaderId::new(term + 1, 99);
    let prev = LogId::new(CommittedLeaderId::new(term, leader), last);
    let puts = (0..=nines::limits::WRITES_PER_ENTRY_MAX)
        .map(|i| Command::Put {
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
            hlc: nines::hlc::Hlc { physical_ms: 1, logical: 0 },
        })
        .collect();
    let entry = Entry { log_id: LogId::new(forged, last + 1), payload: EntryPayload::Normal(Command::Batch(puts)) };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term + 1, 99),
        prev_log_id: Some(prev),
        entries: vec![entry],
        leader_commit: Some(LogId::new(forged, last + 1)),
    };
    let payload = postcard::to_allocvec(&append).unwrap();
    for id in 1..=3u64 {
        let mut raft = RaftClient::connect(cluster.nodes[&id].peer()).await.unwrap();
        let reply =
            raft.append_entries(RaftMessage { payload: payload.clone() }).await.expect("delivered").into_inner();
        let answer: Result<AppendEntriesResponse<u64>, openraft::error::RaftError<u64>> =
            postcard::from_bytes(&reply.payload).unwrap();
        assert!(matches!(answer, Ok(AppendEntriesResponse::Success)), "node {id} took the entry: {answer:?}");
    }
    // Every node applies it as refused and keeps running; the region elects
    // a new leader and serves.
    for id in 1..=3u64 {
        cluster.wait_applied(id, last + 1).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.put("after", "v").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the region did not serve again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for id in 1..=3u64 {
        assert!(cluster.status(id).await.is_some(), "node {id} is up");
        let log = cluster.log_of(id);
        assert!(log.contains("refusing a batch at apply time") && log.contains("WRITES_PER_ENTRY_MAX"), "node {id}");
    }
    let read = c.get("k0", Consistency::Linearizable).await.expect("get");
    assert!(read.kv.is_none(), "nothing of the refused batch was applied");
}

/// Each node's (term, last log index).
async fn terms_and_last_indexes(cluster: &TestCluster) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for id in 1..=3u64 {
        let s = cluster.status(id).await.expect("status");
        out.push((s.term, s.last_log_index));
    }
    out
}
