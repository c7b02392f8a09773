//! `nines-bench`: runs one workload against nines or etcd and prints the
//! result as a table row or JSON.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use nines_bench::{Report, Target, Workload, preload, run};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum System {
    Nines,
    Etcd,
}

#[derive(Parser, Debug)]
#[command(name = "nines-bench", about = "Load generator for nines and etcd", args_override_self = true)]
struct Args {
    /// The system to drive.
    #[arg(long, value_enum)]
    target: System,
    /// Comma-separated endpoints (nines: http://host:port; etcd: host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long = "value-size", default_value_t = 128)]
    value_bytes: usize,
    /// Fraction of operations that are (linearizable) reads.
    #[arg(long, default_value_t = 0.0)]
    read_ratio: f64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop at this many operations per second over all clients, with
    /// latency counted from each operation's intended send time (default:
    /// closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Append `SENT ACKED` (Unix seconds) per acknowledged operation to
    /// this file as it happens (for failover measurements).
    #[arg(long)]
    ack_log: Option<std::path::PathBuf>,
    /// Write every key once before measuring (needed for reads).
    #[arg(long)]
    preload: bool,
    /// Only write every key once, then exit (so the load of the preload is
    /// not counted in a run's CPU time).
    #[arg(long, conflicts_with = "preload")]
    preload_only: bool,
    /// Print JSON instead of a table row.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() {
    if let Err(e) = main_inner().await {
        let reason: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("nines-bench: {}", reason.join(": "));
        std::process::exit(1);
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let a = Args::parse();
    let w = Workload {
        clients: a.clients,
        keys: a.keys,
        value_bytes: a.value_bytes,
        read_ratio: a.read_ratio,
        duration: a.duration,
        warmup: a.warmup,
        rate: a.rate,
        ack_log: a.ack_log,
    };
    w.validate()?;
    let target = match a.target {
        System::Nines => Target::nines(a.endpoints).await?,
        System::Etcd => Target::etcd(a.endpoints).await?,
    };
    if a.preload || a.preload_only {
        preload(&target, &w).await?;
    }
    if a.preload_only {
        return Ok(());
    }
    let report = run(&target, &w).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", Report::TABLE_HEADER);
        println!("{}", report.table_row());
    }
    Ok(())
}
