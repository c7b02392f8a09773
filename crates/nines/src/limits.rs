//! Every limit of a node, each a named constant whose doc comment gives the
//! reason for the number. Input beyond a limit is refused with an error that
//! names the limit; nothing is truncated.

/// Largest key, in bytes. Keys are copied into every index entry and every
/// log entry; 4 KiB is generous for a key (DynamoDB allows 2 KiB) and keeps
/// scans cheap.
pub const KEY_BYTES_MAX: usize = 4 * 1024;

/// Largest value, in bytes. etcd's default request limit is 1.5 MiB;
/// DynamoDB's item limit is 400 KB. A maximal write must fit one log entry
/// (`ENTRY_BYTES_MAX`); that is asserted below.
pub const VALUE_BYTES_MAX: usize = 256 * 1024;

/// Largest client request on the wire, in bytes: a maximal key and value
/// plus framing. Larger messages are refused by the gRPC layer before they
/// are decoded.
pub const REQUEST_BYTES_MAX: usize = KEY_BYTES_MAX + VALUE_BYTES_MAX + 4 * 1024;

/// Largest response on the client wire, in bytes: a full scan page of
/// maximal values would exceed it, so scans also stop at this many bytes
/// (see `SCAN_RESPONSE_BYTES_MAX`).
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Results a scan returns when the request does not say.
pub const SCAN_LIMIT_DEFAULT: u32 = 1_000;

/// Most results one scan may ask for. Larger pages hold the state machine
/// longer and build larger responses; clients page with `start`.
pub const SCAN_LIMIT_MAX: u32 = 10_000;

/// A scan page stops early (with `more = true`) once its keys and values
/// reach this many bytes, so a response always fits `RESPONSE_BYTES_MAX`.
pub const SCAN_RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Bytes one log entry may hold: the batcher stops packing client writes
/// into an entry before their keys, values and framing pass it (the first
/// write always goes in, and a maximal write fits), and shipments and
/// resyncs, each one entry, are cut to fit it too. 1 MiB: large enough that
/// small writes batch by the hundred (1,024 writes of 1 KiB), small enough
/// that `RAFT_PAYLOAD_ENTRIES_MAX` full entries fit one Raft message and a
/// follower far behind catches up in messages of bounded size.
pub const ENTRY_BYTES_MAX: usize = 1024 * 1024;

/// Entries in one append-entries message: `RAFT_PAYLOAD_ENTRIES_MAX` full
/// entries (`ENTRY_BYTES_MAX` each) stay under `RAFT_MESSAGE_BYTES_MAX`
/// (asserted below), so an append-entries message is never refused for its
/// size. 24 entries of small writes each still let a lagging follower catch
/// up by thousands of writes per round trip.
pub const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 24;

/// Bytes an append-entries message should carry at most. openraft 0.9
/// gives every append-entries RPC the heartbeat interval (40 ms by default)
/// to complete, data or not, and resends the same range after a timeout; a
/// message that cannot be sent, decoded, appended and flushed in that time
/// would time out forever. 4 MiB moves in a few milliseconds on loopback or
/// a LAN. The transport enforces it by telling openraft `PayloadTooLarge`
/// with a smaller entry count (one entry always goes: see `ENTRY_BYTES_MAX`).
pub const RAFT_APPEND_BYTES_TARGET: usize = 4 * 1024 * 1024;

/// Largest message of the internal Raft transport, in bytes: a full
/// append-entries batch (see `RAFT_PAYLOAD_ENTRIES_MAX`) with room to spare.
/// Should a message still be too large, the transport reports it to
/// openraft as `PayloadTooLarge`, which sends fewer entries next time.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Snapshot chunk size, in bytes: under tonic's default 4 MiB message limit
/// with room for framing, so a snapshot of any size streams in chunks.
pub const SNAPSHOT_CHUNK_BYTES_MAX: u64 = 1024 * 1024;

/// Largest snapshot a peer may stream to a node, in bytes: 1 TiB, beyond the
/// data any one node holds. A chunk that would end past it is refused: at a
/// hostile offset it would otherwise make a sparse file of that size, which
/// the install then reads through.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

/// Bytes of a snapshot the state machine installs per transaction: an
/// install of any size stays within bounded memory, and the batches go to
/// staging tables that one final transaction switches in.
pub const SNAPSHOT_INSTALL_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How many times a node forwards a request to the leader: once. A forwarded
/// request that reaches a non-leader again is answered with a leader hint
/// instead, so forwarding can never loop.
pub const FORWARD_HOPS_MAX: u32 = 1;

/// Members in the initial membership of `Init`. Raft groups larger than
/// seven voters gain no availability and pay in latency.
pub const INIT_MEMBERS_MAX: usize = 7;

/// Longest region or AZ label, in bytes: labels appear in every version.
pub const LABEL_BYTES_MAX: usize = 64;

/// Writes kept in a region's changefeed until every peer region has applied
/// them. At the limit the region refuses new writes (retry-safe
/// `UNAVAILABLE` naming this limit) rather than drop any: a peer region that
/// is down for long stops the writes of an active-active region instead of
/// silently losing replication. 100,000 writes of a few hundred bytes is
/// tens of MiB of disk, minutes of lag at typical rates.
pub const CHANGEFEED_BACKLOG_MAX: u64 = 100_000;

/// Changefeed entries in one shipment to a peer region.
pub const SHIP_BATCH_ENTRIES_MAX: usize = 512;

/// Bytes of keys and values in one shipment (at least one entry is always
/// sent). The receiver proposes a shipment as one log entry, so it must fit
/// `ENTRY_BYTES_MAX` with every entry's framing (asserted below).
pub const SHIP_BATCH_BYTES_MAX: usize = 512 * 1024;

/// Highest epoch a region may hold. Epochs rise by one per promotion, so
/// 2^48 is beyond any lifetime of failovers; it leaves room for `+ 1`
/// anywhere without overflow, and a peer or operator that names an epoch
/// beyond it is refused instead of wrapping every later comparison.
pub const EPOCH_MAX: u64 = 1 << 48;

/// Acknowledgements a region remembers per peer for collecting tombstones
/// (see the state machine's `ack_shipped`). One arrives every 200 ms or so
/// while tombstones wait for a peer's in-flight writes, which takes a round
/// trip or two; 1,024 is minutes of them. Beyond it the oldest are dropped,
/// which delays collection but never makes it early.
pub const ACK_HISTORY_MAX: usize = 1024;

/// How long a fence holds when the request does not say: a planned
/// switchover drains in seconds; a fence its CLI left behind (killed,
/// interrupted) must not stop the primary's writes for longer than this.
pub const FENCE_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest fence a request may ask for: ten minutes, beyond any drain.
pub const FENCE_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a client session is kept after its last write, in the
/// session clock's milliseconds (the greatest timestamp of any session
/// write applied). A client retries a write for seconds (its deadline), so
/// ten minutes is far beyond any retry; a session idle that long is dropped.
pub const SESSION_IDLE_MS: u64 = 10 * 60 * 1000;

/// How often, in session clock milliseconds, applying looks for idle
/// sessions to drop (a scan of the session table; deterministic, so every
/// replica drops the same sessions at the same entry).
pub const SESSION_SWEEP_MS: u64 = 60 * 1000;

/// Results one session keeps: the client's writes in flight at once. A
/// client with more unanswered writes than this loses the oldest results,
/// and a repeat of one of those is answered "outcome unknown".
pub const SESSION_RESULTS_MAX: usize = 1024;

/// Divergence records one request may list.
pub const DIVERGENT_LIST_MAX: u32 = 10_000;

/// Bytes of keys and values in one page of the divergence record (at least
/// one record is always listed): under the client's response limit with
/// room for `DIVERGENT_LIST_MAX` records' framing. The caller pages on with
/// the `next` sequence the reply gives.
pub const DIVERGENT_PAGE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Keys resynchronised from the new primary per proposal after a demotion.
pub const RESYNC_BATCH_KEYS_MAX: usize = 128;

/// Bytes of keys and values in one resync proposal (at least one key is
/// always sent): each is one log entry, so with its framing it must fit
/// `ENTRY_BYTES_MAX` (asserted below).
pub const RESYNC_BATCH_BYTES_MAX: usize = 512 * 1024;

/// Client writes the leader packs into one log entry. openraft 0.9 appends,
/// flushes, replicates and applies one entry at a time; packing concurrent
/// writes amortises all of that. Also the spacing of version indexes: write
/// `p` of the entry at log index `i` has version index `i * 1024 + p`.
pub const WRITES_PER_ENTRY_MAX: u64 = 1024;

/// Batched proposals in flight at once. While they are, new writes queue
/// and the next proposal takes them all: batches grow with load by
/// themselves, and a lone write waits for nothing.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4;

/// Writes waiting for a proposal slot; beyond it callers wait to enqueue.
pub const PROPOSAL_QUEUE_MAX: usize = 4096;

/// Client-facing gRPC calls (key-value, admin, region, reflection) one node
/// serves at once; one more is refused at once with `RESOURCE_EXHAUSTED`
/// (marked retry-safe: it never started) instead of joining an unbounded
/// queue. Raft, cross-region shipments and health checks are never shed, so
/// a node under a client flood keeps its leadership, its replication and
/// its probes. Half of `PROPOSAL_QUEUE_MAX`: every admitted write finds room
/// in the proposal queue with room left for forwarded ones; the heaviest
/// benchmark (256 clients) uses an eighth of it.
pub const CLIENT_CALLS_IN_FLIGHT_MAX: usize = PROPOSAL_QUEUE_MAX / 2;

/// HTTP/2 streams (calls) one connection may have open at once; the client
/// waits for a free one beyond it. Raft and shipments keep a connection per
/// peer with a handful in flight; a client would need more than this from
/// one connection only to flood.
pub const GRPC_STREAMS_PER_CONNECTION_MAX: u32 = 1024;

/// A bound on what one key-value record adds around its key and value, in
/// bytes, wherever it is encoded (a log entry, a shipment, a response): its
/// version (HLC, an origin label of at most `LABEL_BYTES_MAX`, an index),
/// enum tags and length prefixes. postcard and protobuf both need far less;
/// the relations below use it to stay true with room to spare.
pub const RECORD_FRAMING_BYTES_MAX: usize = 2 * LABEL_BYTES_MAX + 128;

/// tonic's default message limit, which the snapshot chunk must stay under.
const TONIC_DEFAULT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest single write on the wire or in a log, framing included.
pub const WRITE_BYTES_MAX: usize = KEY_BYTES_MAX + VALUE_BYTES_MAX + RECORD_FRAMING_BYTES_MAX;

/// A bound on what a log entry adds around its payload, in bytes: its log
/// id (term, node, index), the payload's enum tag and vector length.
pub const ENTRY_FRAMING_BYTES_MAX: usize = 64;

/// A bound on what an append-entries message adds around its entries, in
/// bytes: vote, previous log id, commit index, and the RPC framing.
const APPEND_FRAMING_BYTES_MAX: usize = 1024;

// The relations between the limits. Each is checked when the crate builds,
// so a change that breaks one fails to compile.

// A maximal write fits a client request.
const _: () = assert!(REQUEST_BYTES_MAX >= KEY_BYTES_MAX + VALUE_BYTES_MAX, "a maximal put must fit REQUEST_BYTES_MAX");
// A full scan page (its bytes, then one more record that crossed the line,
// then every record's framing) fits a response.
const _: () = assert!(
    SCAN_RESPONSE_BYTES_MAX + WRITE_BYTES_MAX + SCAN_LIMIT_MAX as usize * RECORD_FRAMING_BYTES_MAX
        <= RESPONSE_BYTES_MAX,
    "a full scan page must fit RESPONSE_BYTES_MAX"
);
const _: () = assert!(SCAN_LIMIT_DEFAULT <= SCAN_LIMIT_MAX, "the default scan limit must be allowed");
// Snapshot chunks travel under tonic's default limit and the Raft limit.
const _: () = assert!(
    (SNAPSHOT_CHUNK_BYTES_MAX as usize) < TONIC_DEFAULT_MESSAGE_BYTES,
    "SNAPSHOT_CHUNK_BYTES_MAX must stay under tonic's 4 MiB default"
);
// A full shipment (its bytes, one record that crossed the line, every
// record's framing) fits the replication service's message limit.
const _: () = assert!(
    SHIP_BATCH_BYTES_MAX + WRITE_BYTES_MAX + SHIP_BATCH_ENTRIES_MAX * RECORD_FRAMING_BYTES_MAX
        <= RAFT_MESSAGE_BYTES_MAX,
    "a full shipment must fit RAFT_MESSAGE_BYTES_MAX"
);
// A maximal write always fits one entry, so the batcher can always make
// progress; and a full append-entries message fits the transport.
const _: () = assert!(WRITE_BYTES_MAX <= ENTRY_BYTES_MAX, "a maximal write must fit ENTRY_BYTES_MAX");
const _: () = assert!(
    RAFT_PAYLOAD_ENTRIES_MAX as usize * (ENTRY_BYTES_MAX + ENTRY_FRAMING_BYTES_MAX) + APPEND_FRAMING_BYTES_MAX
        <= RAFT_MESSAGE_BYTES_MAX,
    "RAFT_PAYLOAD_ENTRIES_MAX full entries must fit RAFT_MESSAGE_BYTES_MAX"
);
// A shipment, proposed as one entry, fits it: its bytes (or one write that
// is larger alone) plus every record's framing.
const _: () = assert!(
    max(SHIP_BATCH_BYTES_MAX, WRITE_BYTES_MAX) + SHIP_BATCH_ENTRIES_MAX * RECORD_FRAMING_BYTES_MAX <= ENTRY_BYTES_MAX,
    "a full shipment must fit one log entry (ENTRY_BYTES_MAX)"
);
// A resync proposal fits one entry: its bytes plus the one write that
// crossed the line, plus framing (a resync entry carries two versions).
const _: () = assert!(
    RESYNC_BATCH_BYTES_MAX + WRITE_BYTES_MAX + RESYNC_BATCH_KEYS_MAX * 2 * RECORD_FRAMING_BYTES_MAX <= ENTRY_BYTES_MAX,
    "a full resync batch must fit one log entry (ENTRY_BYTES_MAX)"
);
// A page of the divergence record fits a response.
const _: () = assert!(
    DIVERGENT_PAGE_BYTES_MAX + WRITE_BYTES_MAX + DIVERGENT_LIST_MAX as usize * RECORD_FRAMING_BYTES_MAX
        <= RESPONSE_BYTES_MAX,
    "a full page of the divergence record must fit RESPONSE_BYTES_MAX"
);
// One full entry always fits the append-entries target, so replication can
// always make progress one entry at a time.
const _: () = assert!(
    ENTRY_BYTES_MAX + ENTRY_FRAMING_BYTES_MAX + APPEND_FRAMING_BYTES_MAX <= RAFT_APPEND_BYTES_TARGET,
    "one full entry must fit RAFT_APPEND_BYTES_TARGET"
);
const _: () = assert!(RAFT_APPEND_BYTES_TARGET <= RAFT_MESSAGE_BYTES_MAX, "the target must be under the hard limit");
// Versions are spaced WRITES_PER_ENTRY_MAX apart per log index; positions
// are below it.
const _: () = assert!(WRITES_PER_ENTRY_MAX > 1, "a batch must be able to hold more than one write");
const _: () = assert!(FORWARD_HOPS_MAX >= 1, "a follower must be able to forward once");

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}
