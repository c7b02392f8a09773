//! A counter incremented by several tasks with compare-and-swap: each task
//! reads the counter and swaps in the next value against the version it
//! read. Retries after unknown outcomes happen inside the client (the
//! session makes a repeated swap report what the first one did), so the
//! final value equals the increments reported successful.
//!
//! ```text
//! cargo run -p nines-client --example cas_counter -- --tasks 8 --for 30s --key counter
//! ```
//!
//! Prints `final F successes N unknown U` and exits 1 unless F is N (give
//! or take the U increments whose outcome stayed unknown: N <= F <= N + U).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nines_client::{Client, Error, Expect, Swap};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::args();
    let client = Client::builder().endpoints(args.endpoints).build()?;
    let key = args.key.clone();
    // Start from 0 unless the counter exists.
    client.compare_and_swap(key.as_bytes(), Expect::Absent, "0").await?;
    let successes = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.tasks {
        let (client, key, successes, unknown) = (client.clone(), key.clone(), successes.clone(), unknown.clone());
        let run_for = args.run_for;
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                let current = match client.get(key.as_bytes()).await {
                    Ok(Some(kv)) => kv,
                    Ok(None) => continue,
                    Err(e) => {
                        eprintln!("get: {e}");
                        continue;
                    }
                };
                let n: u64 = String::from_utf8_lossy(&current.value).parse().unwrap_or(0);
                match client
                    .compare_and_swap(key.as_bytes(), Expect::Index(current.version.index), (n + 1).to_string())
                    .await
                {
                    Ok(Swap::Done(_)) => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(Error::OutcomeUnknown(e)) => {
                        eprintln!("cas outcome unknown: {e}");
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => eprintln!("cas: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let kv = client.get(key.as_bytes()).await?.ok_or("the counter is gone")?;
    let last: u64 = String::from_utf8_lossy(&kv.value).parse()?;
    let (ok, unsure) = (successes.load(Ordering::Relaxed), unknown.load(Ordering::Relaxed));
    println!("final {last} successes {ok} unknown {unsure}");
    if last < ok || last > ok + unsure {
        eprintln!("the counter is {last} but {ok} increments were reported successful ({unsure} unknown)");
        std::process::exit(1);
    }
    Ok(())
}
