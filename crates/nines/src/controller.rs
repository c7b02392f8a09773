//! The failover controller's decision, as a pure function: given what the
//! latest round of probes saw and what the controller remembers, what to do
//! next. The loop around it (`nines controller`, in `cli/controller.rs`)
//! only probes, acts and logs.
//!
//! Invariants:
//! - A secondary is promoted only after `threshold` consecutive rounds in
//!   which the primary did not answer.
//! - The most caught-up reachable secondary wins (the one that applied the
//!   most of the primary's changefeed); ties go to the lower region name, so
//!   the choice is deterministic. A region being rebuilt by a full sync is
//!   never chosen.
//! - An epoch is issued at most once: the next epoch is one above the
//!   highest epoch ever seen or issued, and while a promotion's outcome is
//!   unknown (its reply was lost) the only promotion allowed is the same one
//!   again (same region, same epoch; the node treats a repeat as a no-op),
//!   until a probe shows that epoch or a higher one.
//!
//! Caveats:
//! - This history is one process's. With an authority, the region that is
//!   promoted allocates the epoch there (once, and only after the old
//!   primary's lease ran out), so controllers and operators racing cannot
//!   both win; the epoch asked for here is then a lower bound. Without one,
//!   two controllers (or a controller and an operator) can race, and the
//!   state machine's tie rule settles two primaries at one epoch.

use crate::limits::EPOCH_MAX;

/// What one region's probe showed (only regions that answered appear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub region: String,
    /// The region's view of the roles.
    pub epoch: u64,
    /// Empty in an active-active cluster.
    pub primary: String,
    /// How far the region has applied the primary's changefeed.
    pub applied_from_primary: u64,
    /// The region is being rebuilt by a full sync: never promoted.
    pub full_sync: bool,
}

/// The controller's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive failed rounds of the primary before failing over.
    pub threshold: u32,
}

/// What the controller remembers between rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Consecutive rounds in which the primary did not answer.
    pub failures: u32,
    /// The highest `(epoch, primary)` seen or issued.
    pub known: Option<(u64, String)>,
    /// A promotion whose outcome is unknown: `(region, epoch)`.
    pub pending: Option<(String, u64)>,
}

/// What to do after a round of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No region answered and no primary is known yet.
    NoRegionAnswers { failures: u32 },
    /// The cluster is active-active: there is no primary to fail over.
    ActiveActive,
    /// The primary answered; `recovered` if it had failed before.
    Healthy { primary: String, recovered: bool },
    /// The primary did not answer, fewer than `threshold` times in a row.
    PrimaryFailing { primary: String, failures: u32 },
    /// Promote `region` at `epoch`.
    Promote { region: String, epoch: u64, old_primary: String, applied_from_primary: u64 },
    /// A promotion's outcome is unknown and its region does not answer:
    /// wait rather than give the epoch to another region.
    AwaitPending { region: String, epoch: u64 },
    /// The primary is down and no secondary answers.
    NoCandidate { primary: String },
    /// The known epoch is `EPOCH_MAX`: no further epoch can be issued.
    EpochsExhausted { epoch: u64 },
}

/// How a promotion ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The region is primary at this epoch.
    Promoted(u64),
    /// The promotion certainly had no effect.
    Refused,
    /// It may or may not have happened.
    Unknown,
}

/// Decides the next action from one round of probes. Pure: the returned
/// history replaces the old one.
pub fn decide(seen: &[Seen], history: &History, policy: &Policy) -> (Action, History) {
    let mut h = history.clone();
    if let Some(s) = seen.iter().max_by_key(|s| s.epoch)
        && h.known.as_ref().is_none_or(|(e, _)| s.epoch > *e)
    {
        h.known = Some((s.epoch, s.primary.clone()));
    }
    if let (Some((_, pending_epoch)), Some((known_epoch, _))) = (&h.pending, &h.known)
        && known_epoch >= pending_epoch
    {
        // The promotion happened, or something newer did.
        h.pending = None;
    }
    let Some((epoch, primary)) = h.known.clone() else {
        h.failures += 1;
        return (Action::NoRegionAnswers { failures: h.failures }, h);
    };
    if primary.is_empty() {
        return (Action::ActiveActive, h);
    }
    if seen.iter().any(|s| s.region == primary) {
        let recovered = h.failures > 0;
        h.failures = 0;
        return (Action::Healthy { primary, recovered }, h);
    }
    h.failures += 1;
    if h.failures < policy.threshold {
        return (Action::PrimaryFailing { primary, failures: h.failures }, h);
    }
    if let Some((region, pending_epoch)) = h.pending.clone() {
        let action = match seen.iter().find(|s| s.region == region) {
            Some(s) => Action::Promote {
                region,
                epoch: pending_epoch,
                old_primary: primary,
                applied_from_primary: s.applied_from_primary,
            },
            None => Action::AwaitPending { region, epoch: pending_epoch },
        };
        return (action, h);
    }
    let Some(next_epoch) = epoch.checked_add(1).filter(|e| *e <= EPOCH_MAX) else {
        return (Action::EpochsExhausted { epoch }, h);
    };
    let candidate = seen
        .iter()
        .filter(|s| s.region != primary && !s.full_sync)
        .max_by(|a, b| a.applied_from_primary.cmp(&b.applied_from_primary).then_with(|| b.region.cmp(&a.region)));
    let action = match candidate {
        Some(s) => Action::Promote {
            region: s.region.clone(),
            epoch: next_epoch,
            old_primary: primary,
            applied_from_primary: s.applied_from_primary,
        },
        None => Action::NoCandidate { primary },
    };
    (action, h)
}

/// Records how a promotion of `region` at `epoch` ended.
pub fn promoted(history: &History, region: &str, epoch: u64, outcome: &Outcome) -> History {
    let mut h = history.clone();
    match outcome {
        Outcome::Promoted(e) => {
            h.known = Some((*e, region.to_string()));
            h.failures = 0;
            h.pending = None;
        }
        Outcome::Refused => h.pending = None,
        Outcome::Unknown => h.pending = Some((region.to_string(), epoch)),
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(region: &str, epoch: u64, primary: &str, applied: u64) -> Seen {
        Seen { region: region.into(), epoch, primary: primary.into(), applied_from_primary: applied, full_sync: false }
    }

    fn history(failures: u32, known: Option<(u64, &str)>, pending: Option<(&str, u64)>) -> History {
        History {
            failures,
            known: known.map(|(e, p)| (e, p.to_string())),
            pending: pending.map(|(r, e)| (r.to_string(), e)),
        }
    }

    fn promote(region: &str, epoch: u64, applied: u64) -> Action {
        Action::Promote { region: region.into(), epoch, old_primary: "a".into(), applied_from_primary: applied }
    }

    #[test]
    fn the_decision_table() {
        let policy = Policy { threshold: 3 };
        let a = seen("a", 4, "a", 0);
        let b = seen("b", 4, "a", 90);
        let c = seen("c", 4, "a", 120);
        let c_low = seen("c", 4, "a", 10);
        // (what the probes saw, history before, action, failures after)
        let table: Vec<(&str, Vec<Seen>, History, Action, u32)> = vec![
            (
                "primary healthy",
                vec![a.clone(), b.clone()],
                history(0, Some((4, "a")), None),
                Action::Healthy { primary: "a".into(), recovered: false },
                0,
            ),
            (
                "primary answers again",
                vec![a.clone(), b.clone()],
                history(2, Some((4, "a")), None),
                Action::Healthy { primary: "a".into(), recovered: true },
                0,
            ),
            (
                "primary failing below threshold",
                vec![b.clone()],
                history(1, Some((4, "a")), None),
                Action::PrimaryFailing { primary: "a".into(), failures: 2 },
                2,
            ),
            (
                "at threshold, one caught-up secondary",
                vec![b.clone()],
                history(2, Some((4, "a")), None),
                promote("b", 5, 90),
                3,
            ),
            (
                "two secondaries: the most caught-up wins",
                vec![b.clone(), c.clone()],
                history(2, Some((4, "a")), None),
                promote("c", 5, 120),
                3,
            ),
            (
                "two secondaries, the other way round",
                vec![c_low.clone(), b.clone()],
                history(2, Some((4, "a")), None),
                promote("b", 5, 90),
                3,
            ),
            (
                "promotion outcome unknown: the same promotion again, no second epoch",
                vec![b.clone(), c.clone()],
                history(3, Some((4, "a")), Some(("b", 5))),
                promote("b", 5, 90),
                4,
            ),
            (
                "promotion outcome unknown and its region silent: wait",
                vec![c.clone()],
                history(3, Some((4, "a")), Some(("b", 5))),
                Action::AwaitPending { region: "b".into(), epoch: 5 },
                4,
            ),
            (
                "the most caught-up secondary is in full sync: the other wins",
                vec![Seen { full_sync: true, ..c.clone() }, b.clone()],
                history(2, Some((4, "a")), None),
                promote("b", 5, 90),
                3,
            ),
            (
                "the only secondary is in full sync: no candidate",
                vec![Seen { full_sync: true, ..b.clone() }],
                history(2, Some((4, "a")), None),
                Action::NoCandidate { primary: "a".into() },
                3,
            ),
            (
                "no secondary answers",
                vec![],
                history(2, Some((4, "a")), None),
                Action::NoCandidate { primary: "a".into() },
                3,
            ),
            ("nothing known, nobody answers", vec![], History::default(), Action::NoRegionAnswers { failures: 1 }, 1),
            ("active-active", vec![seen("a", 0, "", 0)], History::default(), Action::ActiveActive, 0),
            (
                "the epoch cannot rise further",
                vec![seen("b", EPOCH_MAX, "a", 5)],
                history(2, None, None),
                Action::EpochsExhausted { epoch: EPOCH_MAX },
                3,
            ),
        ];
        for (name, seen, before, want, failures) in table {
            let (got, after) = decide(&seen, &before, &policy);
            assert_eq!(got, want, "{name}");
            assert_eq!(after.failures, failures, "{name}: failures");
        }
    }

    #[test]
    fn a_promotion_seen_by_a_probe_clears_the_pending_one() {
        let policy = Policy { threshold: 1 };
        let before = history(3, Some((4, "a")), Some(("b", 5)));
        let (action, after) = decide(&[seen("b", 5, "b", 0)], &before, &policy);
        assert_eq!(action, Action::Healthy { primary: "b".into(), recovered: true });
        assert_eq!(after.pending, None);
        assert_eq!(after.known, Some((5, "b".to_string())));
    }

    #[test]
    fn outcomes_update_the_history() {
        let h = history(3, Some((4, "a")), None);
        let done = promoted(&h, "b", 5, &Outcome::Promoted(5));
        assert_eq!((done.failures, done.known.clone(), done.pending.clone()), (0, Some((5, "b".into())), None));
        let unknown = promoted(&h, "b", 5, &Outcome::Unknown);
        assert_eq!(unknown.pending, Some(("b".to_string(), 5)));
        assert_eq!(unknown.known, h.known, "an unknown outcome is not taken as a promotion");
        assert_eq!(promoted(&unknown, "b", 5, &Outcome::Refused).pending, None);
        // After an unknown outcome, a round at threshold never issues epoch 6.
        let (action, _) = decide(&[seen("c", 4, "a", 500)], &unknown, &Policy { threshold: 1 });
        assert_eq!(action, Action::AwaitPending { region: "b".into(), epoch: 5 });
    }
}
