//! The first minutes with the client: write, read, compare-and-swap and
//! delete a key. Start a cluster with `nines up`, then:
//!
//! ```text
//! cargo run -p nines-client --example quickstart -- --endpoints http://127.0.0.1:7001
//! ```

mod common;

use nines_client::{Client, Expect, Swap};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::args();
    let client = Client::builder().endpoints(args.endpoints).build()?;

    let version = client.put("quickstart/greeting", "hello").await?;
    println!("put quickstart/greeting = hello at index {} in {}", version.index, version.origin_region);

    let kv = client.get("quickstart/greeting").await?.ok_or("the value just written is missing")?;
    println!("get quickstart/greeting = {}", String::from_utf8_lossy(&kv.value));

    match client.compare_and_swap("quickstart/greeting", Expect::Index(kv.version.index), "hello again").await? {
        Swap::Done(v) => println!("cas succeeded at index {}", v.index),
        other => return Err(format!("cas against the version just read failed: {other:?}").into()),
    }

    let deleted = client.delete("quickstart/greeting").await?;
    println!("delete existed={}", deleted.existed);
    if client.get("quickstart/greeting").await?.is_some() {
        return Err("the key is still there after the delete".into());
    }

    let topology = client.topology();
    let names: Vec<&str> = topology.regions.iter().map(|r| r.name.as_str()).collect();
    println!("regions: {}; writes go to {:?}", names.join(", "), topology.primary);
    Ok(())
}
