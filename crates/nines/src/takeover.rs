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
//! lost such a campaign until it campaigns again, so that node, once a
//! follower, waits twice `election_timeout_max` more at the next failover.
//! In `benches/failover.py` runs this was every failover slower than 0.6 s:
//! 0.7-1.1 s against a median of 0.37 s.
//!
//! So the follower that refuses, having checked that the candidate's term
//! is newer than its own vote (its leader's lease has expired: openraft
//! refuses by lease before it compares logs), campaigns at once, at the
//! candidate's term + 1, which the candidate, whose log is no newer,
//! grants. To get there it first records, locally, a vote for the candidate
//! at the candidate's term, as if the candidate had asked with this node's
//! own last log id: openraft's ordinary vote handling then moves its term
//! (or refuses, and nothing happens: a leader heard meanwhile, a vote given
//! to someone else at that term, a log that grew). That vote is never sent,
//! so no candidate counts it; it only binds this node, which then does not
//! vote for anyone else at that term, as Raft allows. Every refusal for an
//! older log gives the candidate its own last log id, so it does not take
//! up openraft's long-lived "saw a longer log" delay ([`refusal_to_send`]).
//!
//! Not done by a leader (it must not step down for a candidate that cannot
//! win), nor by a node stepping down for its clock (see [`crate::stance`]).
//! With more than three voters, several followers may refuse the same
//! candidate at once and split the vote at the next term; each waits a
//! random time within one AZ round trip first, and stands only if it did
//! not vote for another meanwhile.

use std::time::Duration;

use openraft::raft::{VoteRequest, VoteResponse};

use crate::types::{LogId, NodeId, Raft, Vote};

/// Whether `resp`, this node's answer to `req`, refused a candidate only
/// because this node's log is longer, while the candidate's term is newer
/// than this node's vote: then the candidate cannot win this node's vote,
/// and this node may take over (see the module doc).
pub fn refused_for_an_older_log(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> bool {
    !resp.vote_granted && resp.last_log_id > req.last_log_id && req.vote.leader_id().term > resp.vote.leader_id().term
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

/// A last log id as a take-over's event gives it.
pub fn describe(log_id: Option<LogId>) -> String {
    log_id.map_or_else(|| "an empty log".to_string(), |l| format!("last entry {l}"))
}

/// What a take-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// This node campaigns at the candidate's term + 1.
    Standing,
    /// openraft refused the local vote (`vote` is this node's vote now):
    /// something changed since the refusal, and this node leaves the
    /// election to its timer.
    Declined { vote: Vote },
}

/// Takes over from `candidate`, refused for an older log when this node's
/// last log id was `last_log_id`: records a vote for it at its term with
/// that log id, then, once openraft granted it, starts an election (see the
/// module doc). Waits `jitter` first.
pub async fn take_over(
    raft: &Raft,
    candidate: Vote,
    last_log_id: Option<LogId>,
    jitter: Duration,
) -> Result<TakeOver, String> {
    if !jitter.is_zero() {
        tokio::time::sleep(jitter).await;
    }
    let adopt = VoteRequest { vote: Vote { committed: false, ..candidate }, last_log_id };
    let resp = raft.vote(adopt).await.map_err(|e| format!("recording the vote: {e}"))?;
    if !resp.vote_granted {
        return Ok(TakeOver::Declined { vote: resp.vote });
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

    #[test]
    fn only_a_refusal_for_an_older_log_at_a_newer_term_leads_to_a_take_over() {
        // The failover tail: candidate at term 21 with one entry less.
        assert!(refused_for_an_older_log(&req(21, log(20, 99)), &resp(20, true, false, log(20, 100))));
        // A candidate with no log at all, and this node a candidate itself.
        assert!(refused_for_an_older_log(&req(5, None), &resp(4, false, false, log(4, 1))));
        // Granted: nothing to do.
        assert!(!refused_for_an_older_log(&req(21, log(20, 100)), &resp(21, false, true, log(20, 100))));
        // Refused, but the candidate's log is as long: refused by lease or
        // by vote, not for its log.
        assert!(!refused_for_an_older_log(&req(21, log(20, 100)), &resp(20, true, false, log(20, 100))));
        // An older log, but this node's vote is already at the candidate's
        // term or later: openraft's timers deal with it.
        assert!(!refused_for_an_older_log(&req(21, log(20, 99)), &resp(21, false, false, log(20, 100))));
        assert!(!refused_for_an_older_log(&req(21, log(20, 99)), &resp(22, false, false, log(20, 100))));
        // A longer log of a later term is longer too.
        assert!(refused_for_an_older_log(&req(21, log(19, 120)), &resp(20, true, false, log(20, 100))));
    }
}
