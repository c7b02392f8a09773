//! The history of a run: every operation a client invoked, with its outcome
//! and its real-time interval.
//!
//! Invariants:
//! - Times are microseconds since the run began, read from one monotonic
//!   clock (`Instant`), so intervals of different clients compare.
//! - An operation's interval covers every attempt the client made for it:
//!   its effect, if any, happened inside `[start_us, end_us]`.
//! - `Fail` means the operation certainly had no effect; `Info` means it may
//!   or may not have had one (a timeout, a lost connection).
//! - A process is one logical client doing one operation at a time. After an
//!   `Info` the client takes a new process number, as in Jepsen, because
//!   the old one may still be in flight.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Func {
    /// Linearizable read of a register.
    Read,
    /// Blind write of a register (or of an LWW key).
    Write,
    /// Compare-and-swap of a register: input `[from, to]`, output whether it swapped.
    Cas,
    /// Add a unique element to a set.
    Add,
    /// Delete a set element (input: the element) or an LWW key (output: the
    /// tombstone's version).
    Delete,
}

/// One completed operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub process: u64,
    pub f: Func,
    pub key: String,
    /// What the client asked for (the value written, `[from, to]` for a CAS).
    pub input: Value,
    pub outcome: Outcome,
    /// What came back: the value read, whether a CAS swapped, the version a
    /// write got. `null` when nothing did.
    pub output: Value,
    pub start_us: u64,
    pub end_us: u64,
    /// The node the client sent the operation to first.
    pub node: u64,
    /// The node that answered a read (after any retry or forwarding), and
    /// its applied index then: what explains a stale read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<(u64, u64)>,
    /// The error, for `Fail` and `Info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    pub fn is_write(&self) -> bool {
        matches!(self.f, Func::Write | Func::Cas | Func::Add | Func::Delete)
    }
}

/// One line of `history.jsonl`: an invocation or a completion.
#[derive(Serialize)]
struct Line<'a> {
    process: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    f: Func,
    key: &'a str,
    value: &'a Value,
    /// What came back besides a read's value: whether a CAS swapped, the
    /// version a write got.
    #[serde(skip_serializing_if = "Value::is_null")]
    result: &'a Value,
    start_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_us: Option<u64>,
    node: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    served_by: Option<(u64, u64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Collects operations from every client task.
#[derive(Clone)]
pub struct Recorder {
    began: Instant,
    /// `std::sync::Mutex`: held only to push, never across `.await`.
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    pub fn new(began: Instant) -> Self {
        Recorder { began, ops: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Microseconds since the run began.
    pub fn now_us(&self) -> u64 {
        self.began.elapsed().as_micros() as u64
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Every operation so far, ordered by start time.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ops.sort_by_key(|o| (o.start_us, o.process));
        ops
    }
}

/// Writes the history as JSON lines, one per event, in time order: an
/// `invoke` line at each operation's start and an `ok`/`fail`/`info` line
/// at its end.
pub fn write_jsonl(ops: &[Op], path: &Path) -> anyhow::Result<()> {
    let null = Value::Null;
    let mut events: Vec<(u64, u8, Line<'_>)> = Vec::with_capacity(ops.len() * 2);
    for o in ops {
        let invoke = Line {
            process: o.process,
            kind: "invoke",
            f: o.f,
            key: &o.key,
            value: &o.input,
            result: &null,
            start_us: o.start_us,
            end_us: None,
            node: o.node,
            served_by: None,
            error: None,
        };
        let kind = match o.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
        };
        // As in Jepsen, a completion's value is the value read, or for a
        // write the value it was invoked with; what else came back (a CAS's
        // answer, a write's version) goes in `result`.
        let (value, result) = match o.f {
            Func::Read => (if o.outcome == Outcome::Ok { &o.output } else { &null }, &null),
            _ => (&o.input, &o.output),
        };
        let done = Line {
            process: o.process,
            kind,
            f: o.f,
            key: &o.key,
            value,
            result,
            start_us: o.start_us,
            end_us: Some(o.end_us),
            node: o.node,
            served_by: o.served_by,
            error: o.error.as_deref(),
        };
        // At equal times a completion sorts before an invocation, the order
        // the checker assumes.
        events.push((o.start_us, 1, invoke));
        events.push((o.end_us, 0, done));
    }
    events.sort_by_key(|(t, order, l)| (*t, *order, l.process));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (_, _, line) in &events {
        serde_json::to_writer(&mut out, line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Counts of outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
}

pub fn counts(ops: &[Op]) -> Counts {
    let mut c = Counts::default();
    for o in ops {
        match o.outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::Fail => c.fail += 1,
            Outcome::Info => c.info += 1,
        }
    }
    c
}
