//! Checkers: each turns a history (and, for `set` and `lww`, the final
//! state of every node) into a verdict.
//!
//! - [`linearizable`]: the `register` history against a register per key
//!   ([`linear`], Wing-Gong-Lowe search with a time budget).
//! - [`set`]: every acknowledged add is present everywhere; nothing is
//!   present that was never added; nothing that certainly failed is present.
//! - [`lww`]: every node holds the same version of every key, and that
//!   version is at least the greatest one a client was told was written.
//! - [`failover`]: `set`'s checks, except that a lost add must have a
//!   divergence record (and every record an add), and no old primary
//!   acknowledged a write after another region was promoted.
//! - [`counter`]: the counter ends at the number of increments acknowledged
//!   (plus at most those whose outcome stayed unknown), and no two
//!   acknowledged increments claim the same step.

pub mod linear;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::history::{Func, Op, Outcome};
use crate::workload::NodeState;

/// A checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Invalid,
    /// The checker could not decide (time budget, nothing to judge).
    Unknown,
}

impl Serialize for Validity {
    /// `true`, `false` or `"unknown"`, as Jepsen writes it.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Validity::Valid => s.serialize_bool(true),
            Validity::Invalid => s.serialize_bool(false),
            Validity::Unknown => s.serialize_str("unknown"),
        }
    }
}

impl Validity {
    /// Invalid beats unknown beats valid.
    pub fn and(self, other: Validity) -> Validity {
        match (self, other) {
            (Validity::Invalid, _) | (_, Validity::Invalid) => Validity::Invalid,
            (Validity::Unknown, _) | (_, Validity::Unknown) => Validity::Unknown,
            _ => Validity::Valid,
        }
    }

    /// The process exit code: 0 valid, 1 invalid, 2 unknown.
    pub fn exit_code(self) -> i32 {
        match self {
            Validity::Valid => 0,
            Validity::Invalid => 1,
            Validity::Unknown => 2,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LinearResult {
    pub valid: Validity,
    /// Why, for a person: the explanation of a violation, or why unknown.
    pub message: String,
    /// The operations the explanation names, as recorded.
    pub ops: Vec<Op>,
    pub keys: usize,
    pub states_explored: u64,
}

fn as_value(v: &Value) -> Option<u64> {
    v.as_u64()
}

/// Checks a `register` history for linearizability, key by key, within `budget`.
pub fn linearizable(history: &[Op], budget: Duration) -> LinearResult {
    let mut per_key: BTreeMap<String, Vec<linear::Operation>> = BTreeMap::new();
    let mut originals: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
    for op in history {
        // A certain failure had no effect; a read that got no answer observed nothing.
        if op.outcome == Outcome::Fail || (op.outcome == Outcome::Info && op.f == Func::Read) {
            continue;
        }
        let call = match op.f {
            Func::Read => linear::Call::Read,
            Func::Write => match as_value(&op.input) {
                Some(v) => linear::Call::Write(v),
                None => continue,
            },
            Func::Cas => match op.input.as_array().map(|a| a.iter().filter_map(as_value).collect::<Vec<_>>()) {
                Some(ft) if ft.len() == 2 => linear::Call::Cas { from: ft[0], to: ft[1] },
                _ => continue,
            },
            // The register workload neither adds nor deletes.
            Func::Add | Func::Delete => continue,
        };
        let outcome = match (op.outcome, op.f) {
            (Outcome::Info, _) => linear::Outcome::Unknown,
            (_, Func::Read) => linear::Outcome::Read(as_value(&op.output)),
            (_, Func::Cas) => linear::Outcome::Cas(op.output.as_bool().unwrap_or(false)),
            _ => linear::Outcome::Written,
        };
        per_key.entry(op.key.clone()).or_default().push(linear::Operation {
            process: op.process,
            call,
            outcome,
            start_us: op.start_us,
            end_us: op.end_us,
        });
        originals.entry(op.key.clone()).or_default().push(op);
    }
    let keys = per_key.len();
    let (verdict, stats) = linear::check_keys(&per_key, budget);
    let (valid, message, ops) = match verdict {
        linear::Verdict::Linearizable => {
            (Validity::Valid, format!("all {keys} keys linearizable ({} ops)", stats.ops), Vec::new())
        }
        linear::Verdict::NotLinearizable(e) => {
            let named = originals
                .get(&e.key)
                .map(|ops| e.ops.iter().filter_map(|i| ops.get(*i).map(|o| (*o).clone())).collect())
                .unwrap_or_default();
            (Validity::Invalid, e.message, named)
        }
        linear::Verdict::Unknown(why) => (Validity::Unknown, why, Vec::new()),
    };
    LinearResult { valid, message, ops, keys, states_explored: stats.states }
}

#[derive(Debug, Clone, Serialize)]
pub struct SetResult {
    pub valid: Validity,
    pub message: String,
    pub attempted: usize,
    pub acknowledged: usize,
    /// Acknowledged deletes.
    pub deleted: usize,
    /// Acknowledged adds, never deleted, missing from at least one node.
    pub lost: Vec<u64>,
    /// Elements whose delete was acknowledged, yet present on a node.
    pub resurrected: Vec<u64>,
    /// Elements present that no client ever tried to add, or under the
    /// wrong key, or with a damaged value: corruption.
    pub unexpected: Vec<String>,
    /// Adds the client was told certainly failed, yet present.
    pub failed_but_present: Vec<u64>,
    /// Adds with an unknown outcome that are present (fine either way).
    pub unknown_present: usize,
    pub unknown_absent: usize,
    /// Whether every node held the same elements at the end.
    pub converged: bool,
}

/// The element a set (or large) key holds, if the key and value agree.
fn set_element(key: &str, value: &str) -> Option<u64> {
    let e: u64 = key.strip_prefix("s/").or_else(|| key.strip_prefix("l/"))?.parse().ok()?;
    (value.parse::<u64>().ok()? == e).then_some(e)
}

/// Each element's outcome for one kind of operation.
fn outcomes(history: &[Op], f: Func) -> BTreeMap<u64, Outcome> {
    history.iter().filter(|o| o.f == f).filter_map(|o| o.input.as_u64().map(|e| (e, o.outcome))).collect()
}

pub fn set(history: &[Op], finals: &BTreeMap<u64, NodeState>, converged: bool) -> SetResult {
    let outcome_of = outcomes(history, Func::Add);
    let delete_of = outcomes(history, Func::Delete);
    let mut unexpected = BTreeSet::new();
    let mut present_everywhere: Option<BTreeSet<u64>> = None;
    let mut present_anywhere = BTreeSet::new();
    for (node, state) in finals {
        let mut here = BTreeSet::new();
        for (key, entry) in state {
            let Some((value, _)) = entry else { continue };
            match set_element(key, value) {
                Some(e) if outcome_of.contains_key(&e) => {
                    here.insert(e);
                }
                _ => {
                    unexpected.insert(format!("node {node}: {key}={value}"));
                }
            }
        }
        present_anywhere.extend(here.iter().copied());
        present_everywhere = Some(match present_everywhere {
            None => here,
            Some(p) => p.intersection(&here).copied().collect(),
        });
    }
    let everywhere = present_everywhere.unwrap_or_default();
    // A delete that certainly failed leaves the element; one that may have
    // happened may have removed it.
    let maybe_deleted = |e: &u64| matches!(delete_of.get(e), Some(Outcome::Ok | Outcome::Info));
    let acked: Vec<u64> = outcome_of.iter().filter(|(_, o)| **o == Outcome::Ok).map(|(e, _)| *e).collect();
    let lost: Vec<u64> = acked.iter().copied().filter(|e| !maybe_deleted(e) && !everywhere.contains(e)).collect();
    let deleted: Vec<u64> = delete_of.iter().filter(|(_, o)| **o == Outcome::Ok).map(|(e, _)| *e).collect();
    let resurrected: Vec<u64> = deleted.iter().copied().filter(|e| present_anywhere.contains(e)).collect();
    let failed_but_present: Vec<u64> = outcome_of
        .iter()
        .filter(|(e, o)| **o == Outcome::Fail && present_anywhere.contains(e))
        .map(|(e, _)| *e)
        .collect();
    let unknown: Vec<u64> = outcome_of.iter().filter(|(_, o)| **o == Outcome::Info).map(|(e, _)| *e).collect();
    let unknown_present = unknown.iter().filter(|e| present_anywhere.contains(e)).count();
    let valid = if finals.is_empty() || acked.is_empty() {
        Validity::Unknown
    } else if lost.is_empty()
        && resurrected.is_empty()
        && unexpected.is_empty()
        && failed_but_present.is_empty()
        && converged
    {
        Validity::Valid
    } else {
        Validity::Invalid
    };
    let message = format!(
        "{} acknowledged adds, {} acknowledged deletes, {} lost, {} resurrected, {} unexpected, {} reported failed but present, nodes {}",
        acked.len(),
        deleted.len(),
        lost.len(),
        resurrected.len(),
        unexpected.len(),
        failed_but_present.len(),
        if converged { "agree" } else { "disagree" }
    );
    SetResult {
        valid,
        message,
        attempted: outcome_of.len(),
        acknowledged: acked.len(),
        deleted: deleted.len(),
        lost,
        resurrected,
        unexpected: unexpected.into_iter().collect(),
        failed_but_present,
        unknown_present,
        unknown_absent: unknown.len() - unknown_present,
        converged,
    }
}

/// A promotion the run saw: from `at_us` on, `region` was primary at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promotion {
    pub at_us: u64,
    pub region: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub valid: Validity,
    pub message: String,
    /// Acknowledged adds missing at the end with no divergence record.
    pub lost_without_record: Vec<u64>,
    /// Divergence records of elements no client was told were added, nor
    /// might have been.
    pub records_never_written: Vec<u64>,
    /// Acknowledged adds sent to a region after another region's promotion
    /// was seen: an old primary acknowledged after its lease ran out.
    pub acked_after_promotion: Vec<String>,
    /// Elements in a divergence record.
    pub divergent: usize,
    pub promotions: Vec<Promotion>,
}

/// The failover checks, on top of `set`'s: the acknowledged adds that are
/// missing at the end are exactly the divergence records of acknowledged
/// adds (set equality; a record may also hold an add whose outcome the
/// client never learned), and no region acknowledged an add it was sent
/// after another region had been seen promoted (its lease had run out
/// before the promotion). Lost writes themselves are the price of
/// asynchronous replication, counted in the RPO, and not a violation.
pub fn failover(
    history: &[Op],
    set: &SetResult,
    divergent: &BTreeSet<u64>,
    promotions: &[Promotion],
    region_of: &dyn Fn(u64) -> String,
) -> FailoverResult {
    let outcome_of = outcomes(history, Func::Add);
    let lost_without_record: Vec<u64> = set.lost.iter().copied().filter(|e| !divergent.contains(e)).collect();
    let records_never_written: Vec<u64> =
        divergent.iter().copied().filter(|e| !matches!(outcome_of.get(e), Some(Outcome::Ok | Outcome::Info))).collect();
    let mut acked_after_promotion = Vec::new();
    for op in history.iter().filter(|o| o.f == Func::Add && o.outcome == Outcome::Ok) {
        let region = region_of(op.node);
        if let Some(p) = promotions.iter().rfind(|p| p.at_us <= op.start_us)
            && p.region != region
        {
            acked_after_promotion.push(format!(
                "{} acknowledged by {region} (sent at {:.3} s), after {} was seen primary at epoch {} ({:.3} s)",
                op.key,
                op.start_us as f64 / 1e6,
                p.region,
                p.epoch,
                p.at_us as f64 / 1e6
            ));
        }
    }
    let set_ok =
        set.resurrected.is_empty() && set.unexpected.is_empty() && set.failed_but_present.is_empty() && set.converged;
    let valid = if set.acknowledged == 0 {
        Validity::Unknown
    } else if set_ok
        && lost_without_record.is_empty()
        && records_never_written.is_empty()
        && acked_after_promotion.is_empty()
    {
        Validity::Valid
    } else {
        Validity::Invalid
    };
    let message = format!(
        "{} promotions; {} acknowledged adds lost, {} of them without a divergence record; {} divergence records, {} \
         of adds never attempted; {} acknowledged by a region after another's promotion; {} unexpected, {} \
         reported failed but present, nodes {}",
        promotions.len().saturating_sub(1),
        set.lost.len(),
        lost_without_record.len(),
        divergent.len(),
        records_never_written.len(),
        acked_after_promotion.len(),
        set.unexpected.len(),
        set.failed_but_present.len(),
        if set.converged { "agree" } else { "disagree" }
    );
    FailoverResult {
        valid,
        message,
        lost_without_record,
        records_never_written,
        acked_after_promotion,
        divergent: divergent.len(),
        promotions: promotions.to_vec(),
    }
}

/// A version in last-writer-wins order: (physical ms, logical, origin region).
type LwwOrder = (u64, u64, String);

fn lww_order(v: &Value) -> Option<LwwOrder> {
    Some((v.get("physical_ms")?.as_u64()?, v.get("logical")?.as_u64()?, v.get("origin")?.as_str()?.to_string()))
}

#[derive(Debug, Clone, Serialize)]
pub struct LwwKey {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LwwResult {
    pub valid: Validity,
    pub message: String,
    pub keys: usize,
    /// Keys whose nodes disagree at the end.
    pub diverged: Vec<LwwKey>,
    /// Keys whose final version is older than an acknowledged write.
    pub lost_keys: Vec<LwwKey>,
    /// Acknowledged writes newer than their key's final version: lost.
    pub lost_writes: Vec<u64>,
    /// Final values no client wrote: corruption.
    pub unexpected: Vec<LwwKey>,
    pub converged: bool,
}

/// Checks the final state of every key against the acknowledged writes and
/// deletes. A key's final version must not be older than any acknowledged
/// write or delete of it (else those are lost). A key absent at the end
/// must have a delete as its newest operation: an acknowledged delete newer
/// than every acknowledged write, or a delete whose outcome is unknown.
pub fn lww(history: &[Op], finals: &BTreeMap<u64, NodeState>, converged: bool) -> LwwResult {
    let writes: Vec<&Op> = history.iter().filter(|o| o.f == Func::Write && o.outcome != Outcome::Fail).collect();
    let deletes: Vec<&Op> = history.iter().filter(|o| o.f == Func::Delete && o.outcome != Outcome::Fail).collect();
    let keys: BTreeSet<&str> = writes.iter().chain(&deletes).map(|o| o.key.as_str()).collect();
    let (mut diverged, mut lost_keys, mut unexpected, mut lost_writes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for key in &keys {
        let mut finals_of_key: Vec<Option<&(String, Value)>> = Vec::new();
        for f in finals.values().map(|s| s.get(*key).and_then(|e| e.as_ref())) {
            if !finals_of_key.contains(&f) {
                finals_of_key.push(f);
            }
        }
        if finals_of_key.len() > 1 {
            diverged.push(LwwKey { key: key.to_string(), problem: format!("nodes hold {finals_of_key:?}") });
        }
        let acked = |ops: &[&Op]| -> Vec<(Option<u64>, LwwOrder)> {
            ops.iter()
                .filter(|o| o.key == *key && o.outcome == Outcome::Ok)
                .filter_map(|o| lww_order(&o.output).map(|v| (o.input.as_u64(), v)))
                .collect()
        };
        let (acked_writes, acked_deletes) = (acked(&writes), acked(&deletes));
        let newest_delete = acked_deletes.iter().map(|(_, v)| v.clone()).max();
        let unknown_delete = deletes.iter().any(|o| o.key == *key && o.outcome == Outcome::Info);
        for fin in finals_of_key {
            let final_order = match fin {
                None => {
                    // Absent: the newest operation must have been a delete.
                    if unknown_delete {
                        continue;
                    }
                    let newer: Vec<&(Option<u64>, LwwOrder)> =
                        acked_writes.iter().filter(|(_, v)| newest_delete.as_ref().is_none_or(|d| v > d)).collect();
                    if !newer.is_empty() {
                        lost_keys.push(LwwKey {
                            key: key.to_string(),
                            problem: format!(
                                "absent at the end, yet {} acknowledged writes are newer than any acknowledged delete",
                                newer.len()
                            ),
                        });
                        lost_writes.extend(newer.iter().filter_map(|(v, _)| *v));
                    }
                    continue;
                }
                Some((value, version)) => {
                    let written = writes
                        .iter()
                        .any(|o| o.key == *key && o.input.as_u64().map(|v| v.to_string()) == Some(value.clone()));
                    if !written {
                        let problem = format!("final value {value:?} was never written");
                        unexpected.push(LwwKey { key: key.to_string(), problem });
                        continue;
                    }
                    let Some(order) = lww_order(version) else {
                        let problem = format!("final version {version} unreadable");
                        unexpected.push(LwwKey { key: key.to_string(), problem });
                        continue;
                    };
                    order
                }
            };
            let newer: Vec<&(Option<u64>, LwwOrder)> =
                acked_writes.iter().chain(&acked_deletes).filter(|(_, v)| *v > final_order).collect();
            if let Some((_, greatest)) = newer.iter().max_by(|a, b| a.1.cmp(&b.1)) {
                lost_keys.push(LwwKey {
                    key: key.to_string(),
                    problem: format!(
                        "final version {final_order:?} is older than acknowledged {greatest:?} ({} newer acknowledged writes or deletes)",
                        newer.len()
                    ),
                });
                lost_writes.extend(newer.iter().filter_map(|(v, _)| *v));
            }
        }
    }
    lost_writes.sort_unstable();
    lost_writes.dedup();
    let acked_any = writes.iter().any(|o| o.outcome == Outcome::Ok);
    let valid = if finals.is_empty() || !acked_any {
        Validity::Unknown
    } else if diverged.is_empty() && lost_keys.is_empty() && unexpected.is_empty() && converged {
        Validity::Valid
    } else {
        Validity::Invalid
    };
    let message = format!(
        "{} keys, {} acknowledged deletes: {} diverged, {} lost their newest acknowledged write or delete ({} writes lost), {} hold values never written",
        keys.len(),
        deletes.iter().filter(|o| o.outcome == Outcome::Ok).count(),
        diverged.len(),
        lost_keys.len(),
        lost_writes.len(),
        unexpected.len()
    );
    LwwResult { valid, message, keys: keys.len(), diverged, lost_keys, lost_writes, unexpected, converged }
}

/// The `counter` verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CounterResult {
    pub valid: Validity,
    pub message: String,
    /// Increments acknowledged as swapped.
    pub acknowledged: u64,
    /// Increments whose outcome the client never learned.
    pub unknown: u64,
    pub final_value: u64,
    /// Acknowledged increments missing from the final value.
    pub lost: u64,
    /// Values two acknowledged increments both claim to have written.
    pub duplicated: Vec<u64>,
}

/// Checks a counter history against the final value: every acknowledged
/// increment `n -> n+1` is a distinct step, and the final value lies
/// between the acknowledged increments and those plus the unknown ones. A
/// retried swap that applied twice, or reported a false mismatch after it
/// applied, puts the value above that range; a lost one below it.
pub fn counter(history: &[Op], final_value: u64) -> CounterResult {
    let mut steps = BTreeMap::new();
    let (mut acknowledged, mut unknown) = (0u64, 0u64);
    for op in history.iter().filter(|o| o.f == Func::Cas) {
        match op.outcome {
            Outcome::Ok if op.output == Value::Bool(true) => {
                acknowledged += 1;
                if let Some(to) = op.input.get(1).and_then(Value::as_u64) {
                    *steps.entry(to).or_insert(0u32) += 1;
                }
            }
            Outcome::Info => unknown += 1,
            _ => {}
        }
    }
    let duplicated: Vec<u64> = steps.iter().filter(|(_, n)| **n > 1).map(|(to, _)| *to).collect();
    let lost = acknowledged.saturating_sub(final_value);
    let (valid, message) = if !duplicated.is_empty() {
        (Validity::Invalid, format!("acknowledged increments claim the same values: {duplicated:?}"))
    } else if lost > 0 {
        (Validity::Invalid, format!("{acknowledged} increments acknowledged but the counter is {final_value}"))
    } else if final_value > acknowledged + unknown {
        let msg = format!(
            "the counter is {final_value}, above {acknowledged} acknowledged and {unknown} unknown increments: an \
             increment applied without being acknowledged as such"
        );
        (Validity::Invalid, msg)
    } else if acknowledged == 0 {
        (Validity::Unknown, "no increment was acknowledged".into())
    } else {
        let msg = format!("the counter is {final_value}: {acknowledged} acknowledged, {unknown} unknown increments");
        (Validity::Valid, msg)
    };
    CounterResult { valid, message, acknowledged, unknown, final_value, lost, duplicated }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn op(f: Func, key: &str, input: Value, outcome: Outcome, output: Value, start_us: u64, end_us: u64) -> Op {
        Op {
            process: 0,
            f,
            key: key.into(),
            input,
            outcome,
            output,
            start_us,
            end_us,
            node: 1,
            served_by: None,
            error: None,
        }
    }

    fn add(e: u64, outcome: Outcome) -> Op {
        op(Func::Add, &format!("s/{e:010}"), json!(e), outcome, Value::Null, e * 10, e * 10 + 5)
    }

    fn set_state(elements: &[u64]) -> NodeState {
        elements.iter().map(|e| (format!("s/{e:010}"), Some((e.to_string(), Value::Null)))).collect()
    }

    fn inc(from: u64, outcome: Outcome, swapped: bool) -> Op {
        let out = if outcome == Outcome::Ok { json!(swapped) } else { Value::Null };
        op(Func::Cas, "counter", json!([from, from + 1]), outcome, out, from * 10, from * 10 + 5)
    }

    #[test]
    fn a_counter_is_judged_against_acknowledged_and_unknown_increments() {
        use Outcome::*;
        let good =
            vec![inc(0, Ok, true), inc(1, Ok, false), inc(1, Ok, true), inc(2, Info, false), inc(2, Fail, false)];
        // (history, final value, verdict)
        let table = [
            (good.clone(), 2, Validity::Valid),
            (good.clone(), 3, Validity::Valid),
            (good.clone(), 1, Validity::Invalid),
            (good.clone(), 4, Validity::Invalid),
            (vec![inc(0, Ok, true), inc(0, Ok, true)], 2, Validity::Invalid),
            (vec![inc(0, Info, false)], 1, Validity::Unknown),
        ];
        for (h, last, want) in table {
            let r = counter(&h, last);
            assert_eq!(r.valid, want, "final {last}: {r:?}");
        }
        assert_eq!(counter(&good, 1).lost, 1);
    }

    #[test]
    fn set_with_every_acknowledged_add_everywhere_is_valid() {
        let h = vec![add(1, Outcome::Ok), add(2, Outcome::Info), add(3, Outcome::Fail)];
        let finals = BTreeMap::from([(1, set_state(&[1, 2])), (2, set_state(&[1, 2]))]);
        let r = set(&h, &finals, true);
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        assert_eq!((r.unknown_present, r.unknown_absent), (1, 0));
    }

    #[test]
    fn set_missing_an_acknowledged_add_on_one_node_is_invalid_and_counts_it_lost() {
        let h = vec![add(1, Outcome::Ok), add(2, Outcome::Ok)];
        let finals = BTreeMap::from([(1, set_state(&[1, 2])), (2, set_state(&[1]))]);
        let r = set(&h, &finals, false);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.lost, vec![2]);
    }

    #[test]
    fn set_with_a_value_never_added_or_a_failed_add_present_is_invalid() {
        let h = vec![add(1, Outcome::Ok), add(3, Outcome::Fail)];
        let r = set(&h, &BTreeMap::from([(1, set_state(&[1, 9]))]), true);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.unexpected.len(), 1, "{r:?}");
        let r = set(&h, &BTreeMap::from([(1, set_state(&[1, 3]))]), true);
        assert_eq!(r.failed_but_present, vec![3]);
        assert_eq!(r.valid, Validity::Invalid);
        let mut wrong = set_state(&[1]);
        wrong.insert("s/0000000001".into(), Some(("2".into(), Value::Null)));
        assert_eq!(set(&h, &BTreeMap::from([(1, wrong)]), true).valid, Validity::Invalid);
    }

    #[test]
    fn failover_loses_only_what_its_divergence_records_hold_and_no_old_primary_acks_late() {
        // Node 1 is in region a, node 4 in region b; b was seen promoted at
        // 35 us. Adds 1-3 went to a, 4 to b (starts at e * 10 us).
        let region_of = |n: u64| if n < 4 { "a".to_string() } else { "b".to_string() };
        let to_b = |mut o: Op| {
            o.node = 4;
            o
        };
        let promotions = [
            Promotion { at_us: 0, region: "a".into(), epoch: 0 },
            Promotion { at_us: 35, region: "b".into(), epoch: 1 },
        ];
        let h = vec![add(1, Outcome::Ok), add(2, Outcome::Ok), add(3, Outcome::Info), to_b(add(4, Outcome::Ok))];
        let finals = BTreeMap::from([(1, set_state(&[1, 4])), (4, set_state(&[1, 4]))]);
        let s = set(&h, &finals, true);
        assert_eq!(s.lost, vec![2]);
        // (divergence records, valid, lost without record, records never written)
        type Row = (Vec<u64>, Validity, Vec<u64>, Vec<u64>);
        let table: Vec<Row> = vec![
            (vec![2], Validity::Valid, vec![], vec![]),
            (vec![2, 3], Validity::Valid, vec![], vec![]),
            (vec![], Validity::Invalid, vec![2], vec![]),
            (vec![2, 9], Validity::Invalid, vec![], vec![9]),
        ];
        for (records, valid, without, never) in table {
            let r = failover(&h, &s, &records.iter().copied().collect(), &promotions, &region_of);
            assert_eq!(
                (r.valid, &r.lost_without_record, &r.records_never_written),
                (valid, &without, &never),
                "{records:?}"
            );
            assert!(r.acked_after_promotion.is_empty(), "{r:?}");
        }
        // An add sent to a at 50 us (after b's promotion) and acknowledged.
        let mut late = h.clone();
        late.push(add(5, Outcome::Ok));
        let r = failover(&late, &s, &BTreeSet::from([2]), &promotions, &region_of);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.acked_after_promotion.len(), 1, "{r:?}");
    }

    fn delete(e: u64, outcome: Outcome) -> Op {
        op(Func::Delete, &format!("s/{e:010}"), json!(e), outcome, Value::Null, e * 10 + 6, e * 10 + 8)
    }

    #[test]
    fn set_deletes_must_stay_deleted_and_failed_ones_must_not_remove() {
        // (history, final elements on both nodes, valid, resurrected, lost)
        type Row = (Vec<Op>, Vec<u64>, Validity, Vec<u64>, Vec<u64>);
        let table: Vec<Row> = vec![
            (vec![add(1, Outcome::Ok), delete(1, Outcome::Ok)], vec![], Validity::Valid, vec![], vec![]),
            (vec![add(1, Outcome::Ok), delete(1, Outcome::Ok)], vec![1], Validity::Invalid, vec![1], vec![]),
            (vec![add(1, Outcome::Ok), delete(1, Outcome::Info)], vec![], Validity::Valid, vec![], vec![]),
            (vec![add(1, Outcome::Ok), delete(1, Outcome::Info)], vec![1], Validity::Valid, vec![], vec![]),
            (vec![add(1, Outcome::Ok), delete(1, Outcome::Fail)], vec![], Validity::Invalid, vec![], vec![1]),
        ];
        for (h, elements, valid, resurrected, lost) in table {
            let finals = BTreeMap::from([(1, set_state(&elements)), (2, set_state(&elements))]);
            let r = set(&h, &finals, true);
            assert_eq!((r.valid, &r.resurrected, &r.lost), (valid, &resurrected, &lost), "{h:?} -> {elements:?}");
        }
    }

    #[test]
    fn large_values_are_checked_byte_for_byte() {
        let v = crate::workload::large_value(7, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(crate::workload::check_large_value(&v), Some(7));
        let mut torn = v.clone();
        torn[500] ^= 1;
        assert_eq!(crate::workload::check_large_value(&torn), None);
        assert_eq!(crate::workload::check_large_value(&v[..999]), None, "a short value");
        assert_eq!(set_element("l/0000000007", "7"), Some(7));
    }

    #[test]
    fn set_without_any_acknowledged_add_is_unknown() {
        let h = vec![add(1, Outcome::Info)];
        assert_eq!(set(&h, &BTreeMap::from([(1, set_state(&[]))]), true).valid, Validity::Unknown);
    }

    fn version(ms: u64, origin: &str) -> Value {
        json!({"physical_ms": ms, "logical": 0, "origin": origin, "index": 1})
    }

    fn lww_write(key: &str, v: u64, outcome: Outcome, ms: u64, origin: &str) -> Op {
        let out = if outcome == Outcome::Ok { version(ms, origin) } else { Value::Null };
        op(Func::Write, key, json!(v), outcome, out, ms, ms + 1)
    }

    fn lww_state(entries: &[(&str, u64, u64, &str)]) -> NodeState {
        entries
            .iter()
            .map(|(k, v, ms, origin)| {
                (k.to_string(), Some((v.to_string(), json!({"physical_ms": ms, "logical": 0, "origin": origin}))))
            })
            .collect()
    }

    #[test]
    fn lww_converged_on_the_greatest_acknowledged_version_is_valid() {
        let h = vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_write("w0", 2, Outcome::Ok, 100, "eu-west")];
        // Equal clocks: "us-east" > "eu-west" wins the tie.
        let s = lww_state(&[("w0", 1, 100, "us-east")]);
        let r = lww(&h, &BTreeMap::from([(1, s.clone()), (2, s)]), true);
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn lww_settling_on_an_older_version_is_invalid_and_counts_the_lost_write() {
        let h = vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_write("w0", 2, Outcome::Ok, 200, "eu-west")];
        let s = lww_state(&[("w0", 1, 100, "us-east")]);
        let r = lww(&h, &BTreeMap::from([(1, s.clone()), (2, s)]), true);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.lost_writes, vec![2]);
    }

    #[test]
    fn lww_nodes_that_disagree_or_hold_unwritten_values_are_invalid() {
        let h =
            vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_write("w0", 2, Outcome::Info, 200, "eu-west")];
        let a = lww_state(&[("w0", 1, 100, "us-east")]);
        let b = lww_state(&[("w0", 2, 200, "eu-west")]);
        let r = lww(&h, &BTreeMap::from([(1, a), (2, b.clone())]), false);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.diverged.len(), 1);
        // The unacknowledged newer write winning everywhere is fine.
        assert_eq!(lww(&h, &BTreeMap::from([(1, b.clone()), (2, b)]), true).valid, Validity::Valid);
        let c = lww_state(&[("w0", 7, 300, "eu-west")]);
        let r = lww(&h, &BTreeMap::from([(1, c)]), true);
        assert_eq!(r.unexpected.len(), 1);
        assert_eq!(r.valid, Validity::Invalid);
    }

    fn lww_delete(key: &str, outcome: Outcome, ms: u64, origin: &str) -> Op {
        let out = if outcome == Outcome::Ok { version(ms, origin) } else { Value::Null };
        op(Func::Delete, key, Value::Null, outcome, out, ms, ms + 1)
    }

    #[test]
    fn lww_deleted_keys_stay_deleted_unless_a_newer_write_came() {
        let absent: NodeState = BTreeMap::from([("w0".to_string(), None)]);
        let written = lww_state(&[("w0", 1, 100, "us-east")]);
        // (history, final state, valid)
        let table: Vec<(&str, Vec<Op>, NodeState, Validity)> = vec![
            (
                "deleted after the write: absent",
                vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_delete("w0", Outcome::Ok, 200, "eu-west")],
                absent.clone(),
                Validity::Valid,
            ),
            (
                "deleted after the write, yet the write is back",
                vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_delete("w0", Outcome::Ok, 200, "eu-west")],
                written.clone(),
                Validity::Invalid,
            ),
            (
                "written after the delete: present",
                vec![lww_delete("w0", Outcome::Ok, 50, "eu-west"), lww_write("w0", 1, Outcome::Ok, 100, "us-east")],
                written.clone(),
                Validity::Valid,
            ),
            (
                "written after the delete, yet absent",
                vec![lww_delete("w0", Outcome::Ok, 50, "eu-west"), lww_write("w0", 1, Outcome::Ok, 100, "us-east")],
                absent.clone(),
                Validity::Invalid,
            ),
            (
                "a delete of unknown outcome may have won",
                vec![lww_write("w0", 1, Outcome::Ok, 100, "us-east"), lww_delete("w0", Outcome::Info, 0, "eu-west")],
                absent,
                Validity::Valid,
            ),
        ];
        for (name, h, state, valid) in table {
            let r = lww(&h, &BTreeMap::from([(1, state.clone()), (2, state)]), true);
            assert_eq!(r.valid, valid, "{name}: {r:?}");
        }
    }

    #[test]
    fn register_history_with_a_stale_read_is_invalid_and_names_the_read() {
        let h = vec![
            op(Func::Write, "r0", json!(1), Outcome::Ok, Value::Null, 0, 10),
            op(Func::Write, "r0", json!(2), Outcome::Ok, Value::Null, 20, 30),
            op(Func::Read, "r0", Value::Null, Outcome::Ok, json!(1), 40, 50),
            op(Func::Write, "r1", json!(3), Outcome::Fail, Value::Null, 0, 5),
            op(Func::Read, "r1", Value::Null, Outcome::Ok, Value::Null, 10, 20),
        ];
        let r = linearizable(&h, Duration::from_secs(5));
        assert_eq!(r.valid, Validity::Invalid, "{r:?}");
        assert!(r.ops.iter().any(|o| o.f == Func::Read && o.output == json!(1)), "{r:?}");
        let ok: Vec<Op> = h.into_iter().filter(|o| o.output != json!(1)).collect();
        assert_eq!(linearizable(&ok, Duration::from_secs(5)).valid, Validity::Valid);
    }

    #[test]
    fn validity_combines_invalid_over_unknown_over_valid() {
        assert_eq!(Validity::Valid.and(Validity::Unknown), Validity::Unknown);
        assert_eq!(Validity::Unknown.and(Validity::Invalid), Validity::Invalid);
        assert_eq!(Validity::Valid.and(Validity::Valid).exit_code(), 0);
        assert_eq!(serde_json::to_value(Validity::Unknown).unwrap(), json!("unknown"));
    }
}
