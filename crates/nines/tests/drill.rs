//! `nines drill` end to end: every strategy on real nodes, its primary
//! region destroyed, one row each in the JSON and the HTML report, and the
//! trade the RPO guard makes visible.

mod common;

use std::process::Command;

use common::serial_blocking;

#[test]
fn the_drill_measures_every_strategy_and_the_rpo_guard_bounds_the_loss() {
    let _serial = serial_blocking();
    let report = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(["drill", "--strategy", "all", "--time", "6s", "--seed", "7", "-w", "json", "--report"])
        .arg(report.path())
        .output()
        .expect("run nines drill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON document on stdout");
    let rows = json["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["strategy"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "backup-restore",
            "backup-restore+archive",
            "pilot-light",
            "warm-standby",
            "warm-standby, link cut",
            "warm-standby, link cut, max_rpo 1s",
            "active-active"
        ]
    );
    let row = |name: &str| rows.iter().find(|r| r["strategy"] == name).unwrap();
    for r in rows {
        assert!(r["acked_before"].as_u64().unwrap() > 50, "a workload ran before the disaster: {r}");
        assert!(r["rto_ms"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["lost_after_recovery"], 0, "a write acknowledged after recovery went missing: {r}");
        let t = &r["timeline"];
        assert!(t["first_ack_after_ms"].as_u64() > t["disaster_ms"].as_u64(), "{r}");
    }
    // Cost: a pilot light runs one standby node, a warm standby three.
    assert_eq!(row("backup-restore")["nodes"], 3);
    assert_eq!(row("pilot-light")["nodes"], 4);
    assert_eq!(row("warm-standby")["nodes"], 6);
    // The guard: with the link cut 2 s before the disaster, the writes lost
    // span at most max_rpo (1 s) and a probe; without it, the whole cut.
    let guarded = row("warm-standby, link cut, max_rpo 1s")["rpo_window_ms"].as_u64().unwrap();
    let unguarded = row("warm-standby, link cut")["rpo_window_ms"].as_u64().unwrap();
    assert!(guarded <= 1_500, "the guard let {guarded} ms of writes go unreplicated");
    assert!(unguarded > guarded, "without the guard the cut loses more: {unguarded} vs {guarded} ms");
    let html = std::fs::read_to_string(report.path().join("report.html")).unwrap();
    for name in names {
        assert!(html.contains(&format!("<h2>{name}</h2>")), "the report shows {name}");
    }
    assert_eq!(html.matches("<svg").count(), rows.len(), "a timeline per strategy");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(saved["rows"], json["rows"], "the saved results are the printed ones");
}
