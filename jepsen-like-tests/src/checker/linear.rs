//! Linearizability checker for a per-key register history.
//!
//! # What it promises
//!
//! Given the operations the fault-injection harness recorded against one key (reads, writes and
//! compare-and-swaps, each with the real-time interval in which the client saw it in flight),
//! [`check_register`] answers whether some total order of those operations exists that
//! (a) respects real time: if one operation returned before another was invoked, it comes first,
//! and (b) is legal for a single register whose initial value is `None` (key absent).
//! The answer is exact when it is [`Verdict::Linearizable`] or [`Verdict::NotLinearizable`];
//! when time or memory runs out it is [`Verdict::Unknown`], never a guess.
//! [`check_keys`] checks many keys under one shared time budget. Keys are independent registers,
//! so a history is linearizable exactly when every key's sub-history is (P-compositionality), which
//! keeps each search small.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's improvements. Every operation becomes a call entry at its
//! start time and a return entry at its end time; the entries form a doubly linked list sorted by
//! time. A depth-first search walks the list from its head: a call entry whose operation the model
//! accepts in the current state is linearized (its call and return entries are unlinked and pushed
//! on a stack, and the search restarts at the head); reaching a return entry means that operation
//! had to be linearized already, so the search backtracks (pops, relinks, and tries the next call
//! after the popped one). A memo of (set of linearized operations, register value) pairs prunes
//! every state that was already explored, because the future of the search depends only on those
//! two things. The history is linearizable when every operation that got an answer is linearized.
//!
//! # Invariants
//!
//! - The entry list always holds exactly the entries of the operations not yet linearized, in time
//!   order; unlinking and relinking are exact inverses (dancing links), done in LIFO order.
//! - The bitset, the register value and the count of answered operations still to place always
//!   describe the stack: they change only together with a push or a pop.
//! - At equal timestamps a return sorts before a call, so an operation that returned at `t`
//!   precedes one invoked at `t` (the stricter reading: touching intervals do not overlap).
//!   An operation with `start == end` gets its call and its return at the same instant: at time
//!   `t` the order is: returns of longer operations, calls of instant operations, returns of instant
//!   operations, calls of longer operations. Instant operations at the same `t` are therefore
//!   concurrent with each other (the rule cannot order them both ways) but follow everything that
//!   returned at `t` and precede everything invoked at `t`.
//! - An operation without an answer ([`Outcome::Unknown`]) has a call entry and no return entry:
//!   it may be linearized any time after its call, or never, and nothing ever requires it.
//!   Unanswered reads are dropped before the search since they have no effect and observed nothing.
//! - Every memo entry is a state the search entered; a state is entered at most once.
//! - `Explanation::ops` and all `#n` numbers in messages are indexes into the caller's slice for
//!   that key, including the unanswered reads that were dropped.
//!
//! # Caveats
//!
//! - Linearizability checking is NP-complete; the memo makes typical histories cheap, but a long
//!   history with wide overlap can explode. [`DEADLINE_CHECK_INTERVAL`], [`MAX_MEMO_ENTRIES`] and
//!   [`MAX_MEMO_BYTES`] turn that into [`Verdict::Unknown`].
//! - Every unanswered write or CAS may be placed anywhere after its call, so each one multiplies
//!   the search space. Keep them few: retire a client process after a timeout, as Jepsen does.
//! - Operations that definitely did not take effect (an error that guarantees no effect) must be
//!   filtered out by the caller. An error that does not guarantee that must be passed as
//!   [`Outcome::Unknown`]. A CAS that answered "did not swap" is not a failure: pass `Cas(false)`.
//! - Timestamps must come from one clock (the harness's monotonic clock): start taken before the
//!   request is sent, end after the answer arrived. Skewed clocks give false `NotLinearizable`s.
//! - Writing a unique value per write makes the check both stronger (no ABA ambiguity) and faster.
//! - The deadline is checked every [`DEADLINE_CHECK_INTERVAL`] search steps, so a history small
//!   enough to finish sooner is decided even after the deadline has passed.
//! - [`check_keys`] checks keys in order of increasing history length (then name), so that as
//!   many keys as possible are decided within the budget; "the first invalid key" is first in that
//!   order, and the keys after it are not checked.
//! - The explanation shows one longest linearizable prefix; others of equal length may exist.
//! - The memory figure is an estimate of the memo's heap use, not a measurement.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// How many search steps run between two reads of the clock. A step costs well under a
/// microsecond (a scan over the entries pending at the list head), so 1024 steps keep the overshoot
/// past a deadline around a millisecond, while the clock read (tens of nanoseconds) stays below
/// 0.1% of the work.
pub const DEADLINE_CHECK_INTERVAL: u64 = 1024;

/// The most (linearized set, value) states the memo may hold for one key before the search gives
/// up. Five million states is minutes of search at most and, for histories of a few hundred
/// operations, a few hundred MiB; a history that needs more is better split (shorter runs, fewer
/// unanswered operations) than searched.
pub const MAX_MEMO_ENTRIES: usize = 5_000_000;

/// The most heap the memo may use for one key, by estimate, before the search gives up. The memo
/// key is a bitset of all operations, so for long histories bytes bind before
/// [`MAX_MEMO_ENTRIES`] does. 1 GiB leaves the harness machine room for the cluster under test.
pub const MAX_MEMO_BYTES: usize = 1 << 30;

/// Estimated bytes for a memo entry with a new bitset, besides the bitset's own words: the boxed
/// slice and state vector headers in the table (40), hash table control byte and 7/8 load factor
/// slack (~8), two heap allocation headers (~32) and the state vector's heap (16).
const MEMO_NEW_SET_OVERHEAD_BYTES: usize = 96;

/// Estimated bytes for one more register value recorded under an existing bitset: 16 for the
/// `Option<u64>`, doubled because the vector grows by doubling.
const MEMO_EXTRA_STATE_BYTES: usize = 32;

/// How many pending operations an explanation message lists by description; the rest are only
/// counted (all of them are still in [`Explanation::ops`]).
const MAX_OPS_LISTED: usize = 8;

/// How many undecided keys an overall `Unknown` message quotes; the rest are only counted.
const MAX_UNDECIDED_QUOTED: usize = 3;

/// What a client asked of the register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Read,
    Write(u64),
    Cas { from: u64, to: u64 },
}

/// What the client heard back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The read returned this value.
    Read(Option<u64>),
    Written,
    /// The CAS answered: whether it swapped.
    Cas(bool),
    /// No answer (timeout, crash): the op may or may not have taken effect, at any time after its
    /// call.
    Unknown,
}

/// One recorded operation. Operations that definitely did not take effect must not be passed in;
/// see the module's caveats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The client process that issued it; only used in explanations.
    pub process: u64,
    pub call: Call,
    pub outcome: Outcome,
    /// When the request was about to be sent, on the harness's clock (any unit, consistently).
    pub start_us: u64,
    /// When the answer arrived. Ignored when the outcome is [`Outcome::Unknown`] (treated as
    /// +infinity). Must not be before `start_us` otherwise.
    pub end_us: u64,
}

/// The answer of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable(Explanation),
    /// The check could not decide (time or memory ran out, or the history was malformed); the
    /// string says why, for a person.
    Unknown(String),
}

/// Why a key's history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The key; empty when the check came from [`check_register`], which does not know it.
    pub key: String,
    /// A report line: the operation that no linearization could place before it returned, the
    /// longest linearizable prefix (its length, last operation and final value) and the other
    /// operations pending at that point.
    pub message: String,
    /// Indexes into that key's input slice: first the operation that could not be placed, then the
    /// other answered operations pending (invoked, not linearized) at the end of the longest prefix.
    pub ops: Vec<usize>,
}

/// Counters from [`check_keys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Keys in the input.
    pub keys: usize,
    /// Keys proven linearizable.
    pub keys_linearizable: usize,
    /// Keys proven not linearizable: 0 or 1, since the check stops at the first.
    pub keys_not_linearizable: usize,
    /// Keys whose check answered Unknown: time or memory ran out, or the history was malformed.
    pub keys_undecided: usize,
    /// Keys never started: the budget was gone, or an invalid key was found first.
    pub keys_unchecked: usize,
    /// Operations searched over all started keys, after dropping unanswered reads.
    pub ops: usize,
    /// Search states explored over all keys (each one a new memo entry).
    pub states: u64,
    /// The most states one key needed, to spot the key that eats the budget.
    pub max_states_one_key: u64,
}

/// Checks one key's history against a register whose initial value is `None`.
///
/// `ops` may be in any order. Returns [`Verdict::Unknown`] if `deadline` passes during the search
/// (checked every [`DEADLINE_CHECK_INTERVAL`] steps), if the memo outgrows [`MAX_MEMO_ENTRIES`] or
/// [`MAX_MEMO_BYTES`], or if an operation is malformed (an outcome that does not fit its call, or
/// an answered operation ending before it starts). The explanation's `key` is empty.
pub fn check_register(ops: &[Operation], deadline: Instant) -> Verdict {
    check_key(None, ops, Some(deadline), None, Limits::DEFAULT).verdict
}

/// Checks every key's history under one shared time budget.
///
/// Keys are checked from the shortest history to the longest. The first key found not
/// linearizable decides the verdict and stops the check. Otherwise, if any key was undecided or
/// never started because the budget ran out, the verdict is [`Verdict::Unknown`]; else
/// [`Verdict::Linearizable`].
pub fn check_keys(histories: &BTreeMap<String, Vec<Operation>>, budget: Duration) -> (Verdict, KeyStats) {
    check_keys_with(histories, budget, Limits::DEFAULT)
}

/// Memory limits for one key's search; a parameter only so tests can make them small.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_memo_entries: usize,
    max_memo_bytes: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits { max_memo_entries: MAX_MEMO_ENTRIES, max_memo_bytes: MAX_MEMO_BYTES };
}

fn check_keys_with(
    histories: &BTreeMap<String, Vec<Operation>>,
    budget: Duration,
    limits: Limits,
) -> (Verdict, KeyStats) {
    // A budget too large to add to now means no deadline at all.
    let deadline = Instant::now().checked_add(budget);
    let mut stats = KeyStats { keys: histories.len(), ..KeyStats::default() };
    // Short histories first: they are cheap, so the budget decides as many keys as possible
    // before a long one eats the rest of it.
    let mut order: Vec<(&String, &Vec<Operation>)> = histories.iter().collect();
    order.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(b.0)));

    let mut undecided: Vec<String> = Vec::new();
    let mut out_of_time = 0usize;
    for (position, (key, ops)) in order.iter().enumerate() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out_of_time = order.len() - position;
            stats.keys_unchecked += out_of_time;
            break;
        }
        let report = check_key(Some(key.as_str()), ops, deadline, Some(budget), limits);
        stats.ops += report.ops;
        stats.states += report.states;
        stats.max_states_one_key = stats.max_states_one_key.max(report.states);
        match report.verdict {
            Verdict::Linearizable => stats.keys_linearizable += 1,
            Verdict::NotLinearizable(explanation) => {
                stats.keys_not_linearizable += 1;
                stats.keys_unchecked += order.len() - position - 1;
                return (Verdict::NotLinearizable(explanation), stats);
            }
            Verdict::Unknown(why) => {
                stats.keys_undecided += 1;
                undecided.push(why);
            }
        }
    }

    if undecided.is_empty() && out_of_time == 0 {
        return (Verdict::Linearizable, stats);
    }
    let mut parts: Vec<String> = Vec::new();
    if !undecided.is_empty() {
        let mut part = format!(
            "{} of {} keys undecided: {}",
            undecided.len(),
            stats.keys,
            undecided[..undecided.len().min(MAX_UNDECIDED_QUOTED)].join("; ")
        );
        if undecided.len() > MAX_UNDECIDED_QUOTED {
            part.push_str(&format!("; and {} more", undecided.len() - MAX_UNDECIDED_QUOTED));
        }
        parts.push(part);
    }
    if out_of_time > 0 {
        parts.push(format!("{out_of_time} of {} keys not checked: the time budget of {budget:?} ran out", stats.keys));
    }
    (Verdict::Unknown(parts.join("; ")), stats)
}

/// One key's result with the counters [`check_keys`] adds up.
struct KeyReport {
    verdict: Verdict,
    ops: usize,
    states: u64,
}

/// Checks one key. `key` and `budget` only shape the messages.
fn check_key(
    key: Option<&str>,
    ops: &[Operation],
    deadline: Option<Instant>,
    budget: Option<Duration>,
    limits: Limits,
) -> KeyReport {
    let prefix = key.map(|k| format!("key {k}: ")).unwrap_or_default();
    let items = match prepare(ops) {
        Ok(items) => items,
        Err(why) => {
            return KeyReport { verdict: Verdict::Unknown(format!("{prefix}{why}")), ops: 0, states: 0 };
        }
    };
    let (result, states) = search(&items, deadline, limits);
    let n = items.len();
    let verdict = match result {
        SearchResult::Linearizable => Verdict::Linearizable,
        SearchResult::NotLinearizable(failure) => {
            Verdict::NotLinearizable(explain(key.unwrap_or_default(), &prefix, &items, failure.as_ref()))
        }
        SearchResult::GaveUp(GiveUp::Deadline) => Verdict::Unknown(match budget {
            Some(budget) => {
                format!("{prefix}time budget of {budget:?} ran out after {states} search states on {n} ops")
            }
            None => format!("{prefix}deadline passed after {states} search states on {n} ops"),
        }),
        SearchResult::GaveUp(GiveUp::MemoEntries(entries)) => Verdict::Unknown(format!(
            "{prefix}gave up after {states} search states on {n} ops: the memo of visited \
             states reached {entries} entries (MAX_MEMO_ENTRIES = {})",
            limits.max_memo_entries
        )),
        SearchResult::GaveUp(GiveUp::MemoBytes(bytes)) => Verdict::Unknown(format!(
            "{prefix}gave up after {states} search states on {n} ops: the memo of visited \
             states reached about {} MiB (MAX_MEMO_BYTES = {} MiB)",
            bytes >> 20,
            limits.max_memo_bytes >> 20
        )),
    };
    KeyReport { verdict, ops: n, states }
}

/// An operation that takes part in the search.
struct Item<'a> {
    /// Its index in the caller's slice, for messages and [`Explanation::ops`].
    input: usize,
    op: &'a Operation,
    /// Whether it got an answer; only answered operations have a return entry.
    known: bool,
}

/// Validates the history and drops unanswered reads.
fn prepare(ops: &[Operation]) -> Result<Vec<Item<'_>>, String> {
    let mut items = Vec::with_capacity(ops.len());
    for (input, op) in ops.iter().enumerate() {
        let fits = matches!(
            (op.call, op.outcome),
            (_, Outcome::Unknown)
                | (Call::Read, Outcome::Read(_))
                | (Call::Write(_), Outcome::Written)
                | (Call::Cas { .. }, Outcome::Cas(_))
        );
        if !fits {
            return Err(format!(
                "malformed history: op #{input} ({}) has an outcome that does not fit its call",
                describe(op)
            ));
        }
        let known = op.outcome != Outcome::Unknown;
        if known && op.end_us < op.start_us {
            return Err(format!("malformed history: op #{input} ({}) ends before it starts", describe(op)));
        }
        // An unanswered read changed nothing and observed nothing, so no order depends on it.
        if op.call == Call::Read && !known {
            continue;
        }
        items.push(Item { input, op, known });
    }
    Ok(items)
}

/// The register model: the value after `item` is applied to `state`, or `None` if `item` cannot
/// happen in `state`.
fn step(state: Option<u64>, item: &Item<'_>) -> Option<Option<u64>> {
    match (item.op.call, item.op.outcome) {
        (Call::Read, Outcome::Read(seen)) => (seen == state).then_some(state),
        (Call::Write(v), Outcome::Written) => Some(Some(v)),
        (Call::Cas { from, to }, Outcome::Cas(true)) => (state == Some(from)).then_some(Some(to)),
        (Call::Cas { from, .. }, Outcome::Cas(false)) => (state != Some(from)).then_some(state),
        // An unanswered write or CAS is only worth placing where it changes the value: placing it
        // where it changes nothing is the same as never placing it, which is always allowed
        // because it has no return entry. Skipping those placements prunes the search.
        (Call::Write(v), Outcome::Unknown) => (state != Some(v)).then_some(Some(v)),
        (Call::Cas { from, to }, Outcome::Unknown) => (state == Some(from) && from != to).then_some(Some(to)),
        // prepare() rejects mismatched pairs and drops unanswered reads, so nothing else arrives.
        _ => None,
    }
}

/// Sort classes of entries at one timestamp; see the module invariants for why this order.
const CLASS_RETURN: u8 = 0;
const CLASS_INSTANT_CALL: u8 = 1;
const CLASS_INSTANT_RETURN: u8 = 2;
const CLASS_CALL: u8 = 3;

/// The end of the list.
const NIL: usize = usize::MAX;
/// The sentinel node before the first entry.
const HEAD: usize = 0;

struct Node {
    prev: usize,
    next: usize,
    /// Index into the items.
    item: usize,
    is_call: bool,
}

/// The time-ordered doubly linked list of call and return entries.
struct EntryList {
    nodes: Vec<Node>,
    /// For each item, the node of its return entry, if it has one.
    return_node: Vec<Option<usize>>,
}

impl EntryList {
    fn build(items: &[Item<'_>]) -> EntryList {
        let mut entries: Vec<(u64, u8, usize)> = Vec::with_capacity(items.len() * 2);
        for (i, item) in items.iter().enumerate() {
            let (start, end) = (item.op.start_us, item.op.end_us);
            if !item.known {
                entries.push((start, CLASS_CALL, i));
            } else if start == end {
                entries.push((start, CLASS_INSTANT_CALL, i));
                entries.push((end, CLASS_INSTANT_RETURN, i));
            } else {
                entries.push((start, CLASS_CALL, i));
                entries.push((end, CLASS_RETURN, i));
            }
        }
        // An item's call and return differ in class, so all keys are distinct and the unstable
        // sort is deterministic.
        entries.sort_unstable();

        let mut nodes = Vec::with_capacity(entries.len() + 1);
        let mut return_node = vec![None; items.len()];
        nodes.push(Node {
            prev: NIL,
            next: if entries.is_empty() { NIL } else { 1 },
            item: usize::MAX,
            is_call: false,
        });
        for (k, &(_, class, item)) in entries.iter().enumerate() {
            let index = k + 1;
            let is_call = class == CLASS_CALL || class == CLASS_INSTANT_CALL;
            if !is_call {
                return_node[item] = Some(index);
            }
            nodes.push(Node { prev: k, next: if index == entries.len() { NIL } else { index + 1 }, item, is_call });
        }
        EntryList { nodes, return_node }
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn unlink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    /// Puts `n` back where it was; valid only in the reverse order of the unlinks.
    fn relink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = n;
        if next != NIL {
            self.nodes[next].prev = n;
        }
    }

    /// Removes a call entry and its return entry.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Some(ret) = self.return_node[self.nodes[call].item] {
            self.unlink(ret);
        }
    }

    /// Undoes [`EntryList::lift`], relinking in reverse order.
    fn unlift(&mut self, call: usize) {
        if let Some(ret) = self.return_node[self.nodes[call].item] {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// A compact set of item indexes.
struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset { words: vec![0; bits.div_ceil(64)] }
    }

    fn set(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
    }
}

/// A fast non-cryptographic hasher for memo keys. The keys come from our own history, not from an
/// adversary, so flooding resistance buys nothing, and SipHash would dominate each step's cost.
#[derive(Default)]
struct MemoHasher(u64);

impl MemoHasher {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for MemoHasher {
    fn finish(&self) -> u64 {
        // A final avalanche so the table's low and high bits both depend on every word.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.mix(u64::from(byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }
}

/// Visited states: for each linearized set, the register values it was entered with. Keying on
/// the set lets a lookup borrow the live bitset instead of allocating a key per step.
struct Memo {
    map: HashMap<Box<[u64]>, Vec<Option<u64>>, BuildHasherDefault<MemoHasher>>,
    entries: usize,
    approx_bytes: usize,
    limits: Limits,
}

enum Insert {
    New,
    Seen,
    Full(GiveUp),
}

impl Memo {
    fn new(limits: Limits) -> Memo {
        Memo { map: HashMap::default(), entries: 0, approx_bytes: 0, limits }
    }

    fn insert(&mut self, set: &[u64], state: Option<u64>) -> Insert {
        let seen = self.map.get(set);
        if seen.is_some_and(|states| states.contains(&state)) {
            return Insert::Seen;
        }
        let cost = if seen.is_some() { MEMO_EXTRA_STATE_BYTES } else { set.len() * 8 + MEMO_NEW_SET_OVERHEAD_BYTES };
        if self.entries >= self.limits.max_memo_entries {
            return Insert::Full(GiveUp::MemoEntries(self.entries));
        }
        if self.approx_bytes + cost > self.limits.max_memo_bytes {
            return Insert::Full(GiveUp::MemoBytes(self.approx_bytes));
        }
        match self.map.get_mut(set) {
            Some(states) => states.push(state),
            None => {
                self.map.insert(set.into(), vec![state]);
            }
        }
        self.entries += 1;
        self.approx_bytes += cost;
        Insert::New
    }
}

/// Why a search stopped without an answer.
enum GiveUp {
    Deadline,
    /// Memo entries at the time.
    MemoEntries(usize),
    /// Estimated memo bytes at the time.
    MemoBytes(usize),
}

enum SearchResult {
    Linearizable,
    /// The deepest dead end, for the explanation; `None` only if the search never met a return
    /// entry, which cannot happen while an answered operation is unplaced.
    NotLinearizable(Option<Failure>),
    GaveUp(GiveUp),
}

/// The deepest point the search reached: a linearizable prefix that no operation can extend
/// before the return of `blocking`.
struct Failure {
    /// Length of the prefix.
    depth: usize,
    /// Register value at its end.
    state: Option<u64>,
    /// The item whose return entry stopped the search.
    blocking: usize,
    /// The prefix's last item.
    last: Option<usize>,
    /// Other answered items invoked but not placed at that point.
    pending: Vec<usize>,
}

/// One linearized item on the search stack.
struct Frame {
    call_node: usize,
    /// The register value before it.
    prior: Option<u64>,
}

/// The depth-first search. Returns the result and how many states it explored.
fn search(items: &[Item<'_>], deadline: Option<Instant>, limits: Limits) -> (SearchResult, u64) {
    let mut list = EntryList::build(items);
    let mut linearized = Bitset::new(items.len());
    let mut memo = Memo::new(limits);
    let mut stack: Vec<Frame> = Vec::with_capacity(items.len());
    let mut state: Option<u64> = None;
    let mut known_left = items.iter().filter(|item| item.known).count();
    let mut deepest: Option<Failure> = None;
    let mut states: u64 = 0;
    let mut steps: u64 = 0;
    let mut entry = list.first();

    loop {
        // Unanswered operations left over may all be "never"; nothing else needs placing.
        if known_left == 0 {
            return (SearchResult::Linearizable, states);
        }
        steps += 1;
        if steps.is_multiple_of(DEADLINE_CHECK_INTERVAL) && deadline.is_some_and(|d| Instant::now() >= d) {
            return (SearchResult::GaveUp(GiveUp::Deadline), states);
        }

        if entry != NIL && list.nodes[entry].is_call {
            let item = list.nodes[entry].item;
            if let Some(next_state) = step(state, &items[item]) {
                linearized.set(item);
                match memo.insert(&linearized.words, next_state) {
                    Insert::New => {
                        states += 1;
                        stack.push(Frame { call_node: entry, prior: state });
                        state = next_state;
                        list.lift(entry);
                        if items[item].known {
                            known_left -= 1;
                        }
                        entry = list.first();
                        continue;
                    }
                    // This exact state was explored from another order; its future is known.
                    Insert::Seen => linearized.clear(item),
                    Insert::Full(why) => return (SearchResult::GaveUp(why), states),
                }
            }
            entry = list.nodes[entry].next;
            continue;
        }

        // A return entry: its operation had to be placed by now and was not, so this prefix is a
        // dead end. (The end of the list cannot be reached while an answered operation is
        // unplaced, since its return entry would come first; it is handled the same way.)
        if entry != NIL && deepest.as_ref().is_none_or(|d| stack.len() > d.depth) {
            deepest = Some(dead_end(&list, items, entry, stack.len(), state, &stack));
        }
        let Some(frame) = stack.pop() else {
            return (SearchResult::NotLinearizable(deepest), states);
        };
        let item = list.nodes[frame.call_node].item;
        list.unlift(frame.call_node);
        linearized.clear(item);
        state = frame.prior;
        if items[item].known {
            known_left += 1;
        }
        // Try the alternatives after the operation just taken back.
        entry = list.nodes[frame.call_node].next;
    }
}

/// Records the dead end at return entry `blocking_node`.
fn dead_end(
    list: &EntryList,
    items: &[Item<'_>],
    blocking_node: usize,
    depth: usize,
    state: Option<u64>,
    stack: &[Frame],
) -> Failure {
    let blocking = list.nodes[blocking_node].item;
    // Everything before the first return entry is a pending call. Unanswered operations are left
    // out: they never block anything.
    let mut pending = Vec::new();
    let mut n = list.first();
    while n != blocking_node && n != NIL {
        let item = list.nodes[n].item;
        if list.nodes[n].is_call && item != blocking && items[item].known {
            pending.push(item);
        }
        n = list.nodes[n].next;
    }
    Failure { depth, state, blocking, last: stack.last().map(|frame| list.nodes[frame.call_node].item), pending }
}

/// Builds the report for a key that is not linearizable.
fn explain(key: &str, prefix: &str, items: &[Item<'_>], failure: Option<&Failure>) -> Explanation {
    let Some(failure) = failure else {
        // Unreachable in practice (see SearchResult::NotLinearizable); still answer something
        // truthful rather than panic in a test harness.
        return Explanation {
            key: key.to_string(),
            message: format!("{prefix}no linearization of {} ops", items.len()),
            ops: Vec::new(),
        };
    };
    let name = |i: usize| format!("op #{}, {}", items[i].input, describe(items[i].op));
    let b = &items[failure.blocking];
    let mut message = format!(
        "{prefix}no linearization: {}, but the longest linearizable prefix ({} of {} ops) ",
        name(failure.blocking),
        failure.depth,
        items.len()
    );
    match failure.last {
        Some(last) => message.push_str(&format!("ends with value {:?} after {},", failure.state, name(last))),
        None => message.push_str(&format!("is empty, with the initial value {:?},", failure.state)),
    }
    message.push_str(&format!(" and no remaining op can be placed before op #{} returns", b.input));
    if !failure.pending.is_empty() {
        let listed: Vec<String> = failure
            .pending
            .iter()
            .take(MAX_OPS_LISTED)
            .map(|&i| format!("#{} {}", items[i].input, describe(items[i].op)))
            .collect();
        message.push_str(&format!("; also pending then: {}", listed.join(", ")));
        if failure.pending.len() > MAX_OPS_LISTED {
            message.push_str(&format!(" and {} more", failure.pending.len() - MAX_OPS_LISTED));
        }
    }
    let mut ops = vec![b.input];
    ops.extend(failure.pending.iter().map(|&i| items[i].input));
    Explanation { key: key.to_string(), message, ops }
}

/// Microseconds as milliseconds, e.g. `1.200 ms`.
fn ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

/// A one-line description of an operation, e.g. `read by process 4 at [1.200 ms, 1.250 ms] returned
/// Some(7)`.
fn describe(op: &Operation) -> String {
    let what = match op.call {
        Call::Read => "read".to_string(),
        Call::Write(v) => format!("write({v})"),
        Call::Cas { from, to } => format!("cas({from}->{to})"),
    };
    // Times are shown in milliseconds with microsecond precision.
    let (start, end, process) = (ms(op.start_us), ms(op.end_us), op.process);
    let result = match op.outcome {
        Outcome::Read(seen) => format!("returned {seen:?}"),
        Outcome::Written => "ok".to_string(),
        Outcome::Cas(true) => "swapped".to_string(),
        Outcome::Cas(false) => "did not swap".to_string(),
        Outcome::Unknown => return format!("{what} by process {process} invoked at {start}, no answer"),
    };
    format!("{what} by process {process} at [{start}, {end}] {result}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, call: Call, outcome: Outcome, start: u64, end: u64) -> Operation {
        Operation { process, call, outcome, start_us: start, end_us: end }
    }

    fn write(process: u64, v: u64, start: u64, end: u64) -> Operation {
        op(process, Call::Write(v), Outcome::Written, start, end)
    }

    fn read(process: u64, seen: Option<u64>, start: u64, end: u64) -> Operation {
        op(process, Call::Read, Outcome::Read(seen), start, end)
    }

    fn cas(process: u64, from: u64, to: u64, swapped: bool, start: u64, end: u64) -> Operation {
        op(process, Call::Cas { from, to }, Outcome::Cas(swapped), start, end)
    }

    /// An unanswered operation; its end is deliberately garbage, since it must be ignored.
    fn unanswered(process: u64, call: Call, start: u64) -> Operation {
        op(process, call, Outcome::Unknown, start, 0)
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(120)
    }

    fn check(ops: &[Operation]) -> Verdict {
        check_register(ops, later())
    }

    fn explanation(verdict: Verdict) -> Explanation {
        match verdict {
            Verdict::NotLinearizable(e) => e,
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check(&[]), Verdict::Linearizable);
    }

    #[test]
    fn sequential_write_then_read_is_linearizable() {
        let h = [
            read(1, None, 0, 5),
            write(1, 1, 10, 20),
            read(2, Some(1), 30, 40),
            write(2, 2, 50, 60),
            read(1, Some(2), 70, 80),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_write_and_read_seeing_either_value_is_linearizable() {
        for seen in [Some(1), Some(2)] {
            let h = [write(1, 1, 0, 10), write(1, 2, 20, 40), read(2, seen, 25, 35)];
            assert_eq!(check(&h), Verdict::Linearizable, "read saw {seen:?}");
        }
    }

    #[test]
    fn stale_read_is_not_linearizable_and_names_the_read() {
        // An unanswered read first shifts every index by one: the explanation must still use
        // the caller's indexes.
        let h = [unanswered(9, Call::Read, 0), write(1, 1, 0, 10), write(2, 2, 20, 30), read(3, Some(1), 40, 50)];
        let e = explanation(check(&h));
        assert_eq!(e.ops[0], 3, "{e:?}");
        assert_eq!(e.key, "");
        assert!(
            e.message.contains("op #3, read by process 3 at [0.040 ms, 0.050 ms] returned Some(1)"),
            "{}",
            e.message
        );
        assert!(e.message.contains("(2 of 3 ops) ends with value Some(2)"), "{}", e.message);
    }

    #[test]
    fn lost_write_is_not_linearizable() {
        let h = [write(1, 5, 0, 10), read(2, None, 20, 30)];
        let e = explanation(check(&h));
        assert_eq!(e.ops, vec![1]);
    }

    #[test]
    fn deepest_dead_end_is_reported() {
        // The first read may see None if it goes before the write; the second read cannot.
        let h = [write(1, 5, 0, 10), read(2, None, 5, 30), read(3, None, 40, 50)];
        let e = explanation(check(&h));
        assert_eq!(e.ops, vec![2], "{}", e.message);
    }

    #[test]
    fn cas_after_write_of_from_is_linearizable() {
        let h = [write(1, 1, 0, 10), cas(2, 1, 2, true, 20, 30), read(3, Some(2), 40, 50)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn cas_swapped_when_value_was_never_from_is_not_linearizable() {
        let h = [write(1, 5, 0, 10), cas(2, 1, 2, true, 20, 30)];
        let e = explanation(check(&h));
        assert_eq!(e.ops, vec![1]);
        // And on the initial (absent) value.
        assert!(matches!(check(&[cas(2, 1, 2, true, 20, 30)]), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn two_concurrent_cas_both_swapping_is_not_linearizable() {
        let h = [write(1, 1, 0, 10), cas(2, 1, 2, true, 20, 40), cas(3, 1, 2, true, 25, 45)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn cas_failure_when_value_was_from_is_not_linearizable() {
        let h = [write(1, 1, 0, 10), cas(2, 1, 2, false, 20, 30)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
        let h = [write(1, 1, 0, 10), cas(2, 3, 4, false, 20, 30), read(1, Some(1), 40, 50)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn unanswered_write_whose_value_is_read_later_is_linearizable() {
        let h = [
            write(1, 1, 0, 10),
            unanswered(2, Call::Write(7), 20),
            read(3, Some(1), 30, 40),
            read(3, Some(7), 50, 60),
            read(1, Some(7), 70, 80),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn unanswered_write_never_read_is_linearizable() {
        let h =
            [write(1, 1, 0, 10), unanswered(2, Call::Write(7), 5), read(3, Some(1), 30, 40), read(1, Some(1), 50, 60)];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Also when it is the only thing besides reads of the initial value, and for a CAS.
        let h = [
            unanswered(2, Call::Write(7), 0),
            unanswered(3, Call::Cas { from: 7, to: 8 }, 0),
            read(1, None, 10, 20),
            read(1, None, 30, 40),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn unanswered_cas_may_take_effect_is_linearizable() {
        let h = [write(1, 1, 0, 10), unanswered(2, Call::Cas { from: 1, to: 2 }, 20), read(3, Some(2), 100, 110)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn read_of_value_written_only_after_it_returned_is_not_linearizable() {
        let h = [read(1, Some(7), 0, 10), unanswered(2, Call::Write(7), 20)];
        let e = explanation(check(&h));
        assert_eq!(e.ops, vec![0]);
        let h = [read(1, Some(7), 0, 10), write(2, 7, 20, 30)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn unanswered_read_is_dropped_and_linearizable() {
        let h = [write(1, 1, 0, 10), unanswered(2, Call::Read, 5), read(1, Some(1), 20, 30)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn touching_intervals_are_ordered_return_first_not_linearizable() {
        // The write returns at 10 and the read is invoked at 10: the write comes first, so the
        // read cannot see the initial value.
        let h = [write(1, 1, 0, 10), read(2, None, 10, 20)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
        // The other way round: the read returns at 10, the write is invoked at 10.
        let h = [read(2, Some(1), 0, 10), write(1, 1, 10, 20)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn instant_ops_at_the_same_time_are_concurrent_linearizable() {
        let h = [write(1, 1, 5, 5), read(2, None, 5, 5), read(3, Some(1), 5, 5)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn instant_op_precedes_op_invoked_at_its_time_not_linearizable() {
        let h = [write(1, 1, 5, 5), read(2, None, 5, 9)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
        let h = [write(1, 1, 0, 5), read(2, None, 5, 5)];
        assert!(matches!(check(&h), Verdict::NotLinearizable(_)));
    }

    /// Three concurrent writes whose order is pinned by reads during them; the search's first
    /// guesses (write 1 first) are wrong, so it must backtrack.
    fn pinned_order_history(final_read: Option<u64>) -> Vec<Operation> {
        vec![
            write(1, 1, 0, 100),
            write(2, 2, 0, 100),
            write(3, 3, 0, 100),
            read(4, Some(3), 10, 20),
            read(5, Some(1), 30, 40),
            read(6, Some(2), 50, 60),
            read(7, final_read, 110, 120),
        ]
    }

    #[test]
    fn backtracking_to_find_pinned_write_order_is_linearizable() {
        assert_eq!(check(&pinned_order_history(Some(2))), Verdict::Linearizable);
    }

    #[test]
    fn contradictory_reads_of_concurrent_writes_are_not_linearizable() {
        for final_read in [Some(1), Some(3), None] {
            let e = explanation(check(&pinned_order_history(final_read)));
            assert_eq!(e.ops[0], 6, "{}", e.message);
            assert!(e.message.contains("(6 of 7 ops) ends with value Some(2)"), "{}", e.message);
        }
    }

    #[test]
    fn malformed_history_is_unknown() {
        let h = [op(1, Call::Read, Outcome::Written, 0, 10)];
        assert!(matches!(check(&h), Verdict::Unknown(m) if m.contains("does not fit")));
        let h = [write(1, 1, 10, 5)];
        assert!(matches!(check(&h), Verdict::Unknown(m) if m.contains("ends before")));
    }

    /// xorshift64*: a tiny deterministic generator, enough for test histories.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            // A zero state would stay zero forever.
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Values written are drawn from 1..=VALUES, so reads and CASes collide often.
    const VALUES: u64 = 3;

    /// Simulates a real atomic register: each process runs ops back to back; each op takes effect
    /// at a point strictly inside its interval (on a doubled time axis, so the point never equals
    /// an end), and its outcome is what the register answered there. Some ops get no answer; of
    /// those, half take effect (possibly after their recorded end) and half never do.
    fn simulated_history(rng: &mut Rng, processes: u64, ops_each: u64) -> Vec<Operation> {
        struct Planned {
            op: Operation,
            effect_at: Option<u64>,
        }
        let mut planned = Vec::new();
        for process in 0..processes {
            let mut t = rng.below(5);
            for _ in 0..ops_each {
                let start = t + rng.below(4);
                let len = 1 + rng.below(12);
                let end = start + len;
                let call = match rng.below(10) {
                    0..=3 => Call::Read,
                    4..=6 => Call::Write(1 + rng.below(VALUES)),
                    _ => Call::Cas { from: 1 + rng.below(VALUES), to: 1 + rng.below(VALUES) },
                };
                let answered = rng.below(8) != 0;
                let effect_at = if answered {
                    Some(2 * start + 1 + rng.below(2 * len - 1))
                } else if rng.below(2) == 0 {
                    Some(2 * start + 1 + rng.below(2 * len - 1 + 40))
                } else {
                    None
                };
                let outcome = if answered { Outcome::Written } else { Outcome::Unknown };
                planned.push(Planned { op: op(process, call, outcome, start, end), effect_at });
                t = end;
            }
        }
        let mut order: Vec<usize> = (0..planned.len()).filter(|&i| planned[i].effect_at.is_some()).collect();
        order.sort_by_key(|&i| (planned[i].effect_at, planned[i].op.process));
        let mut value: Option<u64> = None;
        for i in order {
            let p = &mut planned[i];
            let answered = p.op.outcome != Outcome::Unknown;
            let outcome = match p.op.call {
                Call::Read => Outcome::Read(value),
                Call::Write(v) => {
                    value = Some(v);
                    Outcome::Written
                }
                Call::Cas { from, to } => {
                    let swapped = value == Some(from);
                    if swapped {
                        value = Some(to);
                    }
                    Outcome::Cas(swapped)
                }
            };
            if answered {
                p.op.outcome = outcome;
            }
        }
        planned.into_iter().map(|p| p.op).collect()
    }

    /// Makes one answered read return a value that every op able to write it writes only after
    /// the read returned (or that nobody writes), which no linearization allows. Returns whether a
    /// mutation was possible and whether the value is really written later (the non-trivial case).
    fn mutate_to_future_value(rng: &mut Rng, h: &mut [Operation]) -> Option<bool> {
        let reads: Vec<usize> = (0..h.len()).filter(|&i| matches!(h[i].outcome, Outcome::Read(_))).collect();
        if reads.is_empty() {
            return None;
        }
        let r = reads[rng.below(reads.len() as u64) as usize];
        let read_end = h[r].end_us;
        let writers_of = |v: u64| {
            h.iter().filter(move |o| match (o.call, o.outcome) {
                (Call::Write(w), _) => w == v,
                (Call::Cas { to, .. }, Outcome::Cas(true) | Outcome::Unknown) => to == v,
                _ => false,
            })
        };
        // VALUES + 1 is never written, the fallback that is always invalid.
        let candidates: Vec<(u64, bool)> = (1..=VALUES + 1)
            .filter(|&v| writers_of(v).all(|o| o.start_us > read_end))
            .map(|v| (v, writers_of(v).next().is_some()))
            .collect();
        let &(v, written_later) = candidates.iter().find(|c| c.1).or(candidates.last())?;
        h[r].outcome = Outcome::Read(Some(v));
        Some(written_later)
    }

    #[test]
    fn simulated_atomic_register_histories_are_linearizable_300_seeds() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let processes = 2 + rng.below(4);
            let ops_each = 3 + rng.below(10);
            let h = simulated_history(&mut rng, processes, ops_each);
            assert_eq!(check(&h), Verdict::Linearizable, "seed {seed}: {h:?}");
        }
    }

    #[test]
    fn simulated_histories_with_a_read_of_a_future_value_are_not_linearizable_300_seeds() {
        let mut nontrivial = 0;
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let processes = 2 + rng.below(4);
            let ops_each = 3 + rng.below(10);
            let mut h = simulated_history(&mut rng, processes, ops_each);
            let Some(written_later) = mutate_to_future_value(&mut rng, &mut h) else {
                continue;
            };
            nontrivial += usize::from(written_later);
            assert!(matches!(check(&h), Verdict::NotLinearizable(_)), "seed {seed}: {h:?}");
        }
        assert!(nontrivial >= 30, "only {nontrivial} mutations read a value written later");
    }

    #[test]
    fn large_simulated_history_is_linearizable() {
        let mut rng = Rng::new(7);
        let h = simulated_history(&mut rng, 8, 150);
        let (verdict, stats) = check_keys(&BTreeMap::from([("big".to_string(), h)]), Duration::from_secs(60));
        assert_eq!(verdict, Verdict::Linearizable);
        assert_eq!(stats.keys_linearizable, 1);
        assert!(stats.states >= 1000, "{stats:?}");
    }

    #[test]
    fn passed_deadline_on_large_concurrent_history_is_unknown() {
        let mut rng = Rng::new(11);
        let h = simulated_history(&mut rng, 30, 100);
        let verdict = check_register(&h, Instant::now());
        assert!(matches!(&verdict, Verdict::Unknown(m) if m.contains("deadline passed")), "{verdict:?}");
        let (verdict, stats) = check_keys(&BTreeMap::from([("k".to_string(), h)]), Duration::ZERO);
        assert!(matches!(&verdict, Verdict::Unknown(m) if m.contains("not checked")), "{verdict:?}");
        assert_eq!(stats.keys_unchecked, 1);
    }

    #[test]
    fn memo_limit_exceeded_is_unknown() {
        let tight = Limits { max_memo_entries: 3, max_memo_bytes: MAX_MEMO_BYTES };
        let (verdict, stats) = check_keys_with(
            &BTreeMap::from([("k".to_string(), pinned_order_history(Some(2)))]),
            Duration::from_secs(60),
            tight,
        );
        assert!(matches!(&verdict, Verdict::Unknown(m) if m.contains("MAX_MEMO_ENTRIES = 3")), "{verdict:?}");
        assert_eq!(stats.keys_undecided, 1);
        let tight = Limits { max_memo_entries: MAX_MEMO_ENTRIES, max_memo_bytes: 300 };
        let verdict = check_key(None, &pinned_order_history(Some(2)), None, None, tight).verdict;
        assert!(matches!(&verdict, Verdict::Unknown(m) if m.contains("MAX_MEMO_BYTES")), "{verdict:?}");
    }

    #[test]
    fn check_keys_with_one_invalid_key_is_not_linearizable_naming_it() {
        let histories = BTreeMap::from([
            ("good".to_string(), vec![write(1, 1, 0, 10), read(2, Some(1), 20, 30)]),
            ("bad".to_string(), vec![write(1, 1, 0, 10), write(2, 2, 20, 30), read(3, Some(1), 40, 50)]),
        ]);
        let (verdict, stats) = check_keys(&histories, Duration::from_secs(60));
        let e = explanation(verdict);
        assert_eq!(e.key, "bad");
        assert_eq!(e.ops[0], 2);
        assert!(e.message.starts_with("key bad: no linearization: op #2, read"), "{}", e.message);
        assert_eq!(stats.keys, 2);
        assert_eq!(stats.keys_not_linearizable, 1);
        assert_eq!(stats.keys_linearizable + stats.keys_unchecked, 1, "{stats:?}");
    }

    #[test]
    fn check_keys_all_valid_is_linearizable() {
        let histories = BTreeMap::from([
            ("a".to_string(), vec![write(1, 1, 0, 10), read(2, Some(1), 20, 30)]),
            ("b".to_string(), pinned_order_history(Some(2))),
            ("c".to_string(), Vec::new()),
        ]);
        let (verdict, stats) = check_keys(&histories, Duration::from_secs(60));
        assert_eq!(verdict, Verdict::Linearizable);
        assert_eq!(stats.keys, 3);
        assert_eq!(stats.keys_linearizable, 3);
        assert_eq!(stats.ops, 9);
        assert!(stats.states >= 9, "{stats:?}");
        assert_eq!(check_keys(&BTreeMap::new(), Duration::ZERO).0, Verdict::Linearizable);
    }

    #[test]
    fn check_keys_invalid_key_beats_undecided_key_not_linearizable_else_unknown() {
        let tight = Limits { max_memo_entries: 3, max_memo_bytes: MAX_MEMO_BYTES };
        // An undecided key next to a valid one makes the whole verdict Unknown.
        let histories = BTreeMap::from([
            ("slow".to_string(), pinned_order_history(Some(2))),
            ("easy".to_string(), vec![write(1, 1, 0, 10)]),
        ]);
        let (verdict, stats) = check_keys_with(&histories, Duration::from_secs(60), tight);
        assert!(
            matches!(&verdict, Verdict::Unknown(m) if m.starts_with("1 of 2 keys undecided: key slow:")),
            "{verdict:?}"
        );
        assert_eq!(stats.keys_linearizable, 1, "{stats:?}");

        // An invalid key that needs only one state, checked after ("wrong" is longer) a key that
        // runs out of memo: the invalid key decides the verdict.
        let histories = BTreeMap::from([
            ("slow".to_string(), pinned_order_history(Some(2))),
            (
                "wrong".to_string(),
                vec![
                    write(1, 5, 0, 10),
                    read(2, None, 20, 30),
                    read(2, None, 40, 50),
                    read(2, None, 60, 70),
                    read(2, None, 80, 90),
                    read(2, None, 100, 110),
                    read(2, None, 120, 130),
                    read(2, None, 140, 150),
                ],
            ),
        ]);
        let (verdict, stats) = check_keys_with(&histories, Duration::from_secs(60), tight);
        assert_eq!(explanation(verdict).key, "wrong");
        assert_eq!(stats.keys_undecided, 1, "{stats:?}");
        assert_eq!(stats.keys_not_linearizable, 1, "{stats:?}");
    }
}
