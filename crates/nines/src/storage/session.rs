//! Client sessions: what makes a retried write apply once (the Raft
//! thesis' §6.3). A client names each write with its id and a sequence
//! number ([`SessionTag`]); the state machine keeps, per client, the result
//! of each write it applied until the client says it has the answer, and a
//! repeat of a write returns that result instead of applying it again.
//!
//! Invariants:
//! - A session's records are replicated state: written by `apply` with the
//!   rest of an entry's effects, carried in snapshots, the same on every
//!   replica.
//! - Expiry is deterministic: time is the session clock, the greatest
//!   timestamp of any session write applied (stamped by the leader, in the
//!   log), never a replica's own clock. A session idle for
//!   `SESSION_IDLE_MS` on it is dropped at the first sweep after.
//! - A result is kept until the client's `first_unanswered` passes it, or
//!   until more than `SESSION_RESULTS_MAX` are kept (then the oldest goes
//!   and `floor` rises past it).
//! - A write below `floor` that is not kept is never applied: it is
//!   answered "outcome unknown" ([`Lookup::Expired`]).
//! - A write of a client with no session is new: applying any write
//!   creates the session, which outlives every retry by minutes.
//!
//! Caveats:
//! - Sessions are per region: a write retried in another region (after a
//!   failover) is not recognised there.
//! - A failed compare-and-swap keeps no value: its repeat reports the value
//!   current at the repeat.
//! - A write repeated after its session expired would apply again; a
//!   client retries for seconds, far below the expiry.
//! - `SESSION_RESULTS_MAX` counts results from the oldest unanswered write
//!   on: a client with one write stuck while 1,024 later ones complete
//!   loses the stuck one's result (its repeat is then unknown).
//! - Each session write rewrites its session's record, and a sweep scans
//!   the session table inside `apply` once a minute.

use serde::{Deserialize, Serialize};

use crate::limits::{SESSION_IDLE_MS, SESSION_RESULTS_MAX};
use crate::types::{CommandResult, SessionResult, SessionTag};

/// One client's session as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session clock when the client last wrote.
    pub last_ms: u64,
    /// Every write numbered below this has been answered or forgotten.
    pub floor: u64,
    /// Results of applied writes at or above `floor`, by sequence number,
    /// ascending.
    pub results: Vec<(u64, SessionResult)>,
}

/// What a session knows of a write about to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Applied before: answer with this.
    Applied(SessionResult),
    /// Maybe applied before, result no longer kept: apply nothing.
    Expired,
    /// Not seen: apply it.
    New,
}

/// Looks a write up in its client's session (`None`: no session).
pub fn lookup(record: Option<&SessionRecord>, tag: &SessionTag) -> Lookup {
    match record {
        Some(r) => match r.results.binary_search_by_key(&tag.seq, |(s, _)| *s) {
            Ok(i) => Lookup::Applied(r.results[i].1.clone()),
            Err(_) if tag.seq < r.floor => Lookup::Expired,
            Err(_) => Lookup::New,
        },
        // No session: no write of this client applied within
        // SESSION_IDLE_MS (applying one creates the record, and a client
        // retries for seconds), so neither did this one.
        None => Lookup::New,
    }
}

/// What a session keeps of a write's result; `None` for a refusal, which
/// applied nothing (a repeat runs again).
pub fn keepable(result: &CommandResult) -> Option<SessionResult> {
    match result {
        CommandResult::Put { version } => Some(SessionResult::Put { version: version.clone() }),
        CommandResult::Delete { existed, version } => {
            Some(SessionResult::Delete { existed: *existed, version: version.clone() })
        }
        CommandResult::CompareAndSwap { succeeded, version, .. } => {
            Some(SessionResult::CompareAndSwap { succeeded: *succeeded, version: version.clone() })
        }
        _ => None,
    }
}

impl SessionRecord {
    /// Records a write's result at session clock `now_ms`, dropping what
    /// the client has answered and the oldest beyond `SESSION_RESULTS_MAX`.
    pub fn keep(&mut self, tag: &SessionTag, result: SessionResult, now_ms: u64) {
        self.last_ms = self.last_ms.max(now_ms);
        self.floor = self.floor.max(tag.first_unanswered);
        let floor = self.floor;
        self.results.retain(|(s, _)| *s >= floor);
        if tag.seq >= self.floor
            && let Err(i) = self.results.binary_search_by_key(&tag.seq, |(s, _)| *s)
        {
            self.results.insert(i, (tag.seq, result));
        }
        while self.results.len() > SESSION_RESULTS_MAX {
            let (dropped, _) = self.results.remove(0);
            self.floor = self.floor.max(dropped + 1);
        }
    }

    /// Whether the session has been idle too long at session clock `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.last_ms.saturating_add(SESSION_IDLE_MS) < now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::types::Version;

    fn tag(seq: u64, first_unanswered: u64, retry: bool) -> SessionTag {
        SessionTag { client: [7; 16], seq, first_unanswered, retry }
    }

    fn put(index: u64) -> SessionResult {
        SessionResult::Put { version: Version { hlc: Hlc::default(), origin: "r".into(), index } }
    }

    #[test]
    fn a_write_is_new_then_applied_then_forgotten_once_answered() {
        let mut r = SessionRecord::default();
        assert_eq!(lookup(Some(&r), &tag(1, 1, false)), Lookup::New);
        r.keep(&tag(1, 1, false), put(10), 5);
        assert_eq!(lookup(Some(&r), &tag(1, 1, true)), Lookup::Applied(put(10)));
        // The client has the answer to 1 when it sends 2.
        r.keep(&tag(2, 2, false), put(11), 6);
        assert_eq!(r.results.len(), 1);
        assert_eq!(lookup(Some(&r), &tag(1, 2, true)), Lookup::Expired);
        assert_eq!(lookup(Some(&r), &tag(2, 2, true)), Lookup::Applied(put(11)));
        assert_eq!(lookup(Some(&r), &tag(3, 2, false)), Lookup::New);
        assert_eq!(r.last_ms, 6);
    }

    #[test]
    fn writes_in_flight_out_of_order_are_all_kept() {
        let mut r = SessionRecord::default();
        r.keep(&tag(3, 1, false), put(3), 1);
        r.keep(&tag(1, 1, false), put(1), 1);
        r.keep(&tag(2, 1, false), put(2), 1);
        let seqs: Vec<u64> = r.results.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn beyond_the_results_limit_the_oldest_goes_and_reads_as_unknown() {
        let mut r = SessionRecord::default();
        let n = SESSION_RESULTS_MAX as u64 + 2;
        for seq in 1..=n {
            r.keep(&tag(seq, 1, false), put(seq), 1);
        }
        assert_eq!(r.results.len(), SESSION_RESULTS_MAX);
        assert_eq!(r.floor, 3);
        assert_eq!(lookup(Some(&r), &tag(2, 1, true)), Lookup::Expired);
        assert_eq!(lookup(Some(&r), &tag(3, 1, true)), Lookup::Applied(put(3)));
    }

    #[test]
    fn a_write_of_a_client_without_a_session_is_new() {
        assert_eq!(lookup(None, &tag(5, 5, true)), Lookup::New);
        assert_eq!(lookup(None, &tag(5, 5, false)), Lookup::New);
        assert_eq!(lookup(None, &tag(1, 1, true)), Lookup::New);
        let r = SessionRecord { last_ms: 1_000, ..Default::default() };
        assert!(!r.expired(1_000 + SESSION_IDLE_MS));
        assert!(r.expired(1_001 + SESSION_IDLE_MS));
    }

    #[test]
    fn refusals_are_not_kept() {
        let refused = CommandResult::Rejected { reason: "fenced".into(), retry_later: true };
        assert_eq!(keepable(&refused), None);
        let cas = CommandResult::CompareAndSwap { succeeded: false, version: None, current: None };
        assert_eq!(keepable(&cas), Some(SessionResult::CompareAndSwap { succeeded: false, version: None }));
    }
}
