//! Puts a fresh key in a loop with no failover logic of its own: the client
//! follows leader changes and region failovers. Prints `acked N errors M`
//! once a second and `total acked N` at the end.
//!
//! ```text
//! cargo run -p nines-client --example writer -- --endpoints http://127.0.0.1:7001 --for 30s
//! ```
//!
//! `--acked-file PATH` lists every acknowledged key, one per line.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use nines_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::args();
    let client = Client::builder().endpoints(args.endpoints).request_timeout(Duration::from_secs(5)).build()?;
    let mut acked_file = match &args.acked_file {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    let run = std::process::id();
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(1);
    let (mut acked, mut errors, mut n) = (0u64, 0u64, 0u64);
    while started.elapsed() < args.run_for {
        n += 1;
        let key = format!("writer/{run}/{n:08}");
        match client.put(key.as_bytes(), n.to_string()).await {
            Ok(_) => {
                acked += 1;
                if let Some(f) = acked_file.as_mut() {
                    writeln!(f, "{key}")?;
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("{key}: {e}");
            }
        }
        if Instant::now() >= next_report {
            println!("acked {acked} errors {errors}");
            next_report += Duration::from_secs(1);
        }
    }
    if let Some(mut f) = acked_file {
        f.flush()?;
    }
    println!("total acked {acked}");
    Ok(())
}
