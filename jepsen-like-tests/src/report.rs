//! A run's report: `results.json`, two plots and an `index.html` that ties
//! them to the history.
//!
//! RPO and RTO as reported here:
//! - RPO in writes: acknowledged writes missing at the end (`set`, `lww`).
//!   In milliseconds: for each lost write, how long before the next fault
//!   began it was acknowledged; the largest such age.
//! - RTO per fault: from the fault's start to the end of the first
//!   acknowledged write (or swapping CAS) invoked after it started, sent to
//!   a node of the region the fault hit.
//! - In `failover` runs: RPO in milliseconds is the longest stretch of
//!   acknowledged writes one promotion lost, from the first lost write's
//!   acknowledgement to the last one, or to the start of the fault if that
//!   came later (an old primary acknowledges within its lease after a
//!   partition began; a lost region acknowledges nothing after it died).
//!   RTO runs to the first acknowledged write that was kept, in any region.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::checker::Validity;
use crate::history::{Func, Op, Outcome};
use crate::nemesis::FaultRecord;

#[derive(Debug, Clone, Serialize)]
pub struct Rpo {
    pub writes: usize,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    #[serde(flatten)]
    pub fault: FaultRecord,
    /// `None` when no write succeeded after the fault began.
    pub rto_ms: Option<f64>,
}

/// Whether an operation changed state for sure: an acknowledged write or
/// add, or a CAS that swapped (a CAS that did not swap wrote nothing).
fn wrote(o: &Op) -> bool {
    o.outcome == Outcome::Ok && (matches!(o.f, Func::Write | Func::Add) || (o.f == Func::Cas && o.output == true))
}

/// RTO per fault (see the module doc). Only writes sent to nodes of the
/// region a fault hit count: other regions never stopped taking writes.
/// `region_of` maps a node id to its region.
pub fn rto(history: &[Op], faults: &[FaultRecord], region_of: &dyn Fn(u64) -> String) -> Vec<FaultReport> {
    faults
        .iter()
        .map(|f| {
            let first = history
                .iter()
                .filter(|o| wrote(o) && o.start_us >= f.start_us)
                .filter(|o| f.region.is_empty() || region_of(o.node) == f.region)
                .map(|o| o.end_us)
                .min();
            FaultReport { fault: f.clone(), rto_ms: first.map(|end| (end - f.start_us) as f64 / 1000.0) }
        })
        .collect()
}

/// RPO of the lost writes (see the module doc). `lost` holds the input
/// values of the lost writes.
pub fn rpo(history: &[Op], lost: &[u64], faults: &[FaultRecord]) -> Rpo {
    let mut ms: f64 = 0.0;
    for op in history.iter().filter(|o| o.outcome == Outcome::Ok && o.input.as_u64().is_some_and(|v| lost.contains(&v)))
    {
        let next_fault = faults.iter().map(|f| f.start_us).filter(|s| *s >= op.end_us).min();
        if let Some(s) = next_fault {
            ms = ms.max((s - op.end_us) as f64 / 1000.0);
        }
    }
    Rpo { writes: lost.len(), ms }
}

/// The failover RPO (see the module doc): lost writes grouped by the
/// first promotion at or after their acknowledgement; each group's stretch
/// runs from its first acknowledgement to its last, or to the start of the
/// latest fault before the promotion if that is later.
pub fn rpo_failover(history: &[Op], lost: &[u64], promoted_at: &[u64], faults: &[FaultRecord]) -> Rpo {
    let mut groups: std::collections::BTreeMap<u64, (u64, u64)> = std::collections::BTreeMap::new();
    for op in history.iter().filter(|o| o.outcome == Outcome::Ok && o.input.as_u64().is_some_and(|v| lost.contains(&v)))
    {
        let Some(p) = promoted_at.iter().copied().filter(|p| *p >= op.end_us).min() else { continue };
        let g = groups.entry(p).or_insert((op.end_us, op.end_us));
        *g = (g.0.min(op.end_us), g.1.max(op.end_us));
    }
    let mut ms: f64 = 0.0;
    for (p, (first, last)) in groups {
        let fault = faults.iter().map(|f| f.start_us).filter(|s| *s <= p).max().unwrap_or(0);
        ms = ms.max((last.max(fault).saturating_sub(first)) as f64 / 1000.0);
    }
    Rpo { writes: lost.len(), ms }
}

const FAULT_FILL: RGBColor = RGBColor(255, 214, 153);

fn shade_faults<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, impl Ranged<ValueType = f64>>>,
    faults: &[FaultRecord],
    y: (f64, f64),
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut first = true;
    for f in faults {
        let rect = Rectangle::new(
            [(f.start_us as f64 / 1e6, y.0), (f.end_us as f64 / 1e6, y.1)],
            FAULT_FILL.mix(0.6).filled(),
        );
        let series = chart.draw_series(std::iter::once(rect))?;
        if first {
            series.label("fault").legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], FAULT_FILL.filled()));
            first = false;
        }
    }
    Ok(())
}

/// The legend box, top right, the same on every plot.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn outcome_color(o: Outcome) -> RGBColor {
    match o {
        Outcome::Ok => RGBColor(33, 113, 181),
        Outcome::Fail => RGBColor(203, 24, 29),
        Outcome::Info => RGBColor(255, 127, 0),
    }
}

/// Latency of every operation over time, log scale, coloured by outcome.
pub fn plot_latency(history: &[Op], faults: &[FaultRecord], seconds: f64, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ms = history.iter().map(|o| (o.end_us - o.start_us) as f64 / 1000.0).fold(10.0, f64::max) * 1.5;
    let y = (0.1, max_ms);
    let mut chart = ChartBuilder::on(&root)
        .caption("Operation latency (ms, log scale); faults shaded", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, (y.0..y.1).log_scale())?;
    chart.configure_mesh().x_desc("time since start (s)").y_desc("latency (ms)").draw()?;
    shade_faults(&mut chart, faults, y)?;
    for outcome in [Outcome::Ok, Outcome::Info, Outcome::Fail] {
        let color = outcome_color(outcome);
        let points: Vec<(f64, f64)> = history
            .iter()
            .filter(|o| o.outcome == outcome)
            .map(|o| (o.start_us as f64 / 1e6, ((o.end_us - o.start_us) as f64 / 1000.0).max(y.0)))
            .collect();
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 2, color.filled())))?
            .label(format!("{outcome:?}").to_lowercase())
            .legend(move |(x, y)| Circle::new((x + 6, y), 4, color.filled()));
    }
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Completed operations per second, per outcome.
pub fn plot_throughput(history: &[Op], faults: &[FaultRecord], seconds: f64, path: &Path) -> anyhow::Result<()> {
    // Whole seconds only: a last, partial second would read as a drop.
    let buckets = seconds.floor().max(1.0) as usize;
    let mut per: [Vec<f64>; 3] = [vec![0.0; buckets], vec![0.0; buckets], vec![0.0; buckets]];
    for o in history {
        let b = (o.end_us / 1_000_000) as usize;
        if b >= buckets {
            continue;
        }
        let i = match o.outcome {
            Outcome::Ok => 0,
            Outcome::Info => 1,
            Outcome::Fail => 2,
        };
        per[i][b] += 1.0;
    }
    let max = per.iter().flatten().fold(1.0, |a: f64, b| a.max(*b)) * 1.15;
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput (completed operations per second); faults shaded", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, 0f64..max)?;
    chart.configure_mesh().x_desc("time since start (s)").y_desc("ops/s").draw()?;
    shade_faults(&mut chart, faults, (0.0, max))?;
    for (i, outcome) in [Outcome::Ok, Outcome::Info, Outcome::Fail].into_iter().enumerate() {
        let color = outcome_color(outcome);
        let line: Vec<(f64, f64)> = per[i].iter().enumerate().map(|(b, n)| (b as f64 + 0.5, *n)).collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(format!("{outcome:?}").to_lowercase())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
    }
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn verdict_html(v: Validity) -> &'static str {
    match v {
        Validity::Valid => "<b style=\"color:#1a7f37\">valid</b>",
        Validity::Invalid => "<b style=\"color:#cf222e\">INVALID</b>",
        Validity::Unknown => "<b style=\"color:#9a6700\">unknown</b>",
    }
}

/// What `index.html` shows besides the plots.
pub struct Page<'a> {
    pub title: String,
    pub valid: Validity,
    /// (checker, verdict, message).
    pub checkers: Vec<(&'a str, Validity, String)>,
    /// Operations a checker names, shown as a table.
    pub named_ops: &'a [Op],
    pub counts: crate::history::Counts,
    pub rpo: &'a Rpo,
    pub faults: &'a [FaultReport],
    pub command: String,
}

pub fn write_index(page: &Page<'_>, path: &Path) -> anyhow::Result<()> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;max-width:1150px;margin:1em auto;padding:0 1em}}\
         table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}\
         code{{background:#f3f3f3;padding:1px 4px}}</style></head><body>\
         <h1>{title}: {verdict}</h1><p>Reproduce: <code>{cmd}</code></p>",
        title = esc(&page.title),
        verdict = verdict_html(page.valid),
        cmd = esc(&page.command)
    );
    h.push_str("<h2>Checkers</h2><table><tr><th>checker</th><th>verdict</th><th>details</th></tr>");
    for (name, v, msg) in &page.checkers {
        let _ = write!(h, "<tr><td>{name}</td><td>{}</td><td>{}</td></tr>", verdict_html(*v), esc(msg));
    }
    h.push_str("</table>");
    if !page.named_ops.is_empty() {
        h.push_str("<h3>Operations the checker names</h3><table><tr><th>process</th><th>op</th><th>key</th><th>input</th><th>outcome</th><th>output</th><th>interval (ms)</th><th>node</th></tr>");
        for o in page.named_ops {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{:.1} – {:.1}</td><td>{}</td></tr>",
                o.process,
                o.f,
                esc(&o.key),
                o.input,
                o.outcome,
                o.output,
                o.start_us as f64 / 1000.0,
                o.end_us as f64 / 1000.0,
                o.node
            );
        }
        h.push_str("</table>");
    }
    let _ = write!(
        h,
        "<h2>Counts</h2><p>ok {} · fail {} · info {} · RPO {} writes, {:.0} ms</p>",
        page.counts.ok, page.counts.fail, page.counts.info, page.rpo.writes, page.rpo.ms
    );
    h.push_str("<h2>Faults</h2><table><tr><th>nemesis</th><th>start (s)</th><th>end (s)</th><th>RTO (ms)</th><th>what</th></tr>");
    for f in page.faults {
        let rto = f.rto_ms.map_or("no write succeeded".to_string(), |ms| format!("{ms:.0}"));
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            f.fault.nemesis,
            f.fault.start_us as f64 / 1e6,
            f.fault.end_us as f64 / 1e6,
            rto,
            esc(&f.fault.detail)
        );
    }
    h.push_str(
        "</table><h2>Latency</h2><img src=\"latency.svg\" alt=\"latency over time\">\
         <h2>Throughput</h2><img src=\"throughput.svg\" alt=\"throughput over time\">\
         <h2>Files</h2><ul><li><a href=\"results.json\">results.json</a></li>\
         <li><a href=\"history.jsonl\">history.jsonl</a> (one line per invocation and completion)</li>\
         <li>node-N.log: each node's log</li></ul></body></html>\n",
    );
    std::fs::write(path, h)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn add(e: u64, end_us: u64) -> Op {
        Op {
            process: 0,
            f: Func::Add,
            key: format!("s/{e:010}"),
            input: json!(e),
            outcome: Outcome::Ok,
            output: serde_json::Value::Null,
            start_us: end_us - 10,
            end_us,
            node: 1,
            served_by: None,
            error: None,
        }
    }

    fn fault(start_us: u64) -> FaultRecord {
        FaultRecord { nemesis: "x".into(), region: String::new(), detail: String::new(), start_us, end_us: start_us }
    }

    #[test]
    fn failover_rpo_is_the_longest_stretch_one_promotion_lost() {
        let h = vec![add(1, 1_000), add(2, 1_040), add(3, 9_000), add(4, 12_500), add(5, 20_000)];
        // A region lost at 1_050 us (writes 1 and 2 were its last), promoted
        // away at 4_000; a partition from 8_000 in which the old primary
        // acknowledged 3 and 4 until its lease ran out, promoted at 13_000.
        let faults = [fault(1_050), fault(8_000)];
        let r = rpo_failover(&h, &[1, 2], &[4_000, 13_000], &faults);
        assert_eq!((r.writes, r.ms), (2, 0.05), "to the start of the region loss");
        let r = rpo_failover(&h, &[3, 4], &[4_000, 13_000], &faults);
        assert_eq!(r.ms, 3.5, "from the first lost write to the last, inside the partition");
        let r = rpo_failover(&h, &[1, 2, 3, 4, 5], &[4_000, 13_000], &faults);
        assert_eq!((r.writes, r.ms), (5, 3.5), "a write no promotion lost does not stretch anything");
    }
}
