//! A follower that refuses a candidate for its older log stands at once.
//!
//! When a leader dies, the follower whose timer fires first campaigns. If
//! its log is older than the other follower's (the leader had sent its last
//! entry to one of them only), that follower refuses it, and openraft 0.9
//! leaves things there: the refused candidate waits its election timeout
//! plus twice `election_timeout_max` before it tries again, and the
//! follower with the longer log campaigns only when its own timer fires,
//! at the term the refused candidate already holds, which that candidate
//! refuses too (it voted for itself in that term): one more election
//! timeout. openraft also keeps the "saw a longer log" flag of a node that
//! lost such a campaign until it campaigns again by its timer, so that
//! node, once a follower, waits twice `election_timeout_max` more at the
//! next failover. In `benches/failover.py` runs this was every failover
//! slower than 0.6 s: 0.7-1.1 s against a median of 0.37 s.
//!
//! So a follower that refuses a candidate for its older log, at a term
//! newer than its own vote, having heard no leader within the leader lease
//! (`Node::vote` checks these; openraft's refusal by lease has the same
//! shape), campaigns at once, at the candidate's term + 1, which the
//! candidate, whose log is no newer, grants. To get there it first records,
//! locally, a vote for the candidate at the candidate's term, as if the
//! candidate had asked with this node's own last log id: openraft's
//! ordinary vote handling then moves its term, or refuses (a lease not yet
//! run out, a vote given to someone else at that term, a log that grew),
//! and nothing happens. That vote is never sent, so no candidate counts
//! it; it only binds this node, which then does not vote for anyone else
//! at that term, as Raft allows. Every refusal for an older log, at any
//! term, gives the candidate its own last log id, so it does not take up
//! openraft's long-lived "saw a longer log" delay ([`refusal_to_send`]).
//!
//! Not done by a leader (it must not step down for a candidate that cannot
//! win), nor by a node that stands for no election (stepping down for its
//! clock, see [`crate::stance`], or draining), nor within one lease of the
//! node's start (a node that led restarts with its vote uncommitted, so
//! openraft's lease does not hold it back; the live leader's heartbeat
//! must get a chance to reach it first).
//!
//! Caveats:
//! - openraft's `trigger().elect()` ignores its own election switch; the
//!   take-over checks nines' ([`TakeOver`] is `Declined` when it is off),
//!   before it records the vote and again before it campaigns.
//! - A leader elected at the candidate's term or later keeps its place,
//!   as openraft's metrics show it just before the campaign; one they do
//!   not show yet, or one of an older term, is deposed (the recorded vote
//!   alone would do that, as in plain Raft): one more election, no safety
//!   issue.
//! - Every node rewrites its refusals, so openraft's back-off for a
//!   candidate that saw a longer log is off across the region. Where no
//!   take-over happens (within a lease of a start, declined), the longer
//!   log wins on its own timer against a candidate that retries sooner.
//! - With more than three voters the candidate may still win on the
//!   others' votes, and several followers may refuse it at once and split
//!   the next term; each waits a random time within one heartbeat first
//!   ([`spread`]). An extra election at worst.
//! - openraft clears the taking-over node's own "saw a longer log" flag
//!   only when it campaigns by its timer, not here.

use std::time::Duration;

use openraft::raft::{VoteRequest, VoteResponse};

use crate::types::{LogId, NodeId, Raft, Vote};

/// Above this many voters, other followers may refuse the same candidate
/// at once; each then waits a random [`spread`] before it takes over.
const VOTERS_WITHOUT_SPREAD: usize = 3;

/// Whether `resp`, this node's answer to `req`, refused a candidate whose
/// log is older than this node's: by log, or by lease (the same shape).
pub fn refused_for_an_older_log(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> bool {
    !resp.vote_granted && resp.last_log_id > req.last_log_id
}

/// Whether the candidate's term is newer than this node's vote, as it
/// answered: then openraft compared logs (or refused by lease), and this
/// node did not move to the candidate's term. A take-over needs it.
pub fn candidate_term_is_newer(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> bool {
    req.vote.leader_id().term > resp.vote.leader_id().term
}

/// The refusal sent to a candidate refused for its older log: this node's
/// answer with the candidate's own last log id in place of this node's
/// longer one. openraft reads a refusal's log id for one thing only: a
/// candidate that sees a longer log than its own adds twice
/// `election_timeout_max` to its election timeout, so that the node
/// holding it can win first, and keeps that delay until it next campaigns
/// by its timer. A node refused while its leader still lives (by lease)
/// thus campaigns late just when the leader dies (seen in the harness'
/// `kill-leader-lag`: 0.7 s), and one that lost a campaign and then
/// followed carries the delay into the next failover. The take-over lets
/// the longer log win first without it.
pub fn refusal_to_send(mut resp: VoteResponse<NodeId>, req: &VoteRequest<NodeId>) -> VoteResponse<NodeId> {
    resp.last_log_id = req.last_log_id;
    resp
}

/// How long a take-over waits first, with `voters` voters and heartbeats
/// every `heartbeat`: nothing with three or fewer (the candidate and this
/// node are the only live voters that count), else a random time within
/// one heartbeat, longer than a vote round and its two syncs, so that the
/// first follower's campaign usually reaches the others before they start
/// their own.
pub fn spread(voters: usize, heartbeat: Duration) -> Duration {
    if voters <= VOTERS_WITHOUT_SPREAD {
        return Duration::ZERO;
    }
    let ms = u64::try_from(heartbeat.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=ms))
}

/// A log position as a take-over's event gives it.
pub fn position(log_id: Option<LogId>) -> String {
    log_id.map_or_else(|| "an empty log".to_string(), |l| format!("index {} of term {}", l.index, l.leader_id.term))
}

/// What a take-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// This node campaigns at the candidate's term + 1.
    Standing,
    /// Something changed since the refusal (the reason says what), and
    /// this node leaves the election to openraft's timers.
    Declined { reason: String },
}

/// Takes over from `candidate`, refused for an older log when this node's
/// last log id was `last_log_id`: waits `wait`, records a vote for it at
/// its term with that log id, then, once openraft granted it, starts an
/// election (see the module doc). `may_stand` says whether this node
/// stands for elections now; it is asked before each step.
pub async fn take_over(
    raft: &Raft,
    candidate: Vote,
    last_log_id: Option<LogId>,
    wait: Duration,
    may_stand: impl Fn() -> bool,
) -> Result<TakeOver, String> {
    let off = || TakeOver::Declined { reason: "this node stands for no election now".into() };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if !may_stand() {
        return Ok(off());
    }
    let adopt = VoteRequest { vote: Vote { committed: false, ..candidate }, last_log_id };
    let resp = raft.vote(adopt).await.map_err(|e| format!("recording the vote: {e}"))?;
    if !resp.vote_granted {
        return Ok(TakeOver::Declined { reason: format!("openraft refused the vote; this node's is {}", resp.vote) });
    }
    // A leader elected meanwhile at the candidate's term or later (its
    // append moved this node's vote on; the candidate itself, when it won
    // on other voters), or another campaign at such a term, stays:
    // openraft's metrics may not show the recorded vote yet, but they
    // never show a vote newer than this node's.
    let now = raft.metrics().borrow().vote;
    if now.leader_id().term >= candidate.leader_id().term
        && (now.is_committed() || now.leader_id() != candidate.leader_id())
    {
        return Ok(TakeOver::Declined { reason: format!("this node's vote moved on to {now}") });
    }
    if !may_stand() {
        return Ok(off());
    }
    raft.trigger().elect().await.map_err(|e| format!("starting the election: {e}"))?;
    Ok(TakeOver::Standing)
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 3), index))
    }

    fn req(term: u64, last: Option<LogId>) -> VoteRequest<NodeId> {
        VoteRequest { vote: Vote::new(term, 2), last_log_id: last }
    }

    fn resp(term: u64, committed: bool, granted: bool, last: Option<LogId>) -> VoteResponse<NodeId> {
        let mut vote = Vote::new(term, 3);
        if committed {
            vote.commit();
        }
        VoteResponse { vote, vote_granted: granted, last_log_id: last }
    }

    /// (refused for an older log, candidate's term newer): a take-over
    /// needs both; the refusal is rewritten on the first alone.
    fn judge(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> (bool, bool) {
        (refused_for_an_older_log(req, resp), candidate_term_is_newer(req, resp))
    }

    #[test]
    fn a_refusal_for_an_older_log_is_told_apart_from_the_others() {
        // The failover tail: candidate at term 21 with one entry less (by
        // log, or by lease: the same answer; `Node::vote` checks the lease).
        assert_eq!(judge(&req(21, log(20, 99)), &resp(20, true, false, log(20, 100))), (true, true));
        // A candidate with no log at all, and this node a candidate itself.
        assert_eq!(judge(&req(5, None), &resp(4, false, false, log(4, 1))), (true, true));
        // A longer log of a later term is longer too.
        assert_eq!(judge(&req(21, log(19, 120)), &resp(20, true, false, log(20, 100))), (true, true));
        // Granted: nothing to do.
        assert_eq!(judge(&req(21, log(20, 100)), &resp(21, false, true, log(20, 100))), (false, false));
        // Refused, but the candidate's log is as long: by lease or by vote.
        assert_eq!(judge(&req(21, log(20, 100)), &resp(20, true, false, log(20, 100))), (false, true));
        // An older log, but this node's vote is at the candidate's term or
        // later (a split vote): rewritten, no take-over.
        assert_eq!(judge(&req(21, log(20, 99)), &resp(21, false, false, log(20, 100))), (true, false));
        assert_eq!(judge(&req(21, log(20, 99)), &resp(22, false, false, log(20, 100))), (true, false));
    }

    #[test]
    fn a_rewritten_refusal_gives_the_candidate_its_own_log_and_keeps_the_rest() {
        let r = refusal_to_send(resp(20, true, false, log(20, 100)), &req(21, log(20, 99)));
        assert_eq!((r.last_log_id, r.vote_granted, r.vote), (log(20, 99), false, resp(20, true, false, None).vote));
    }

    #[test]
    fn only_more_than_three_voters_spread_their_take_overs_within_a_heartbeat() {
        let hb = Duration::from_millis(40);
        assert_eq!(spread(3, hb), Duration::ZERO);
        assert_eq!(spread(1, hb), Duration::ZERO);
        for _ in 0..100 {
            assert!(spread(5, hb) <= hb);
        }
    }
}
