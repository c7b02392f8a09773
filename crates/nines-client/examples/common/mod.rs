//! Argument parsing shared by the examples (kept tiny: no dependencies).

use std::time::Duration;

/// The examples' options.
pub struct Args {
    /// `--endpoints URL[,URL...]` (default: the cluster `nines up` starts).
    pub endpoints: Vec<String>,
    /// `--for DURATION`, e.g. `30s`, `500ms`, `2m` (default 10s).
    pub run_for: Duration,
    /// `--tasks N` (default 8).
    pub tasks: usize,
    /// `--key KEY` (default `counter`).
    pub key: String,
    /// `--acked-file PATH`: where the writer lists each acknowledged key.
    pub acked_file: Option<String>,
}

/// Parses `std::env::args`, exiting with a message naming a bad option.
pub fn args() -> Args {
    let mut out = Args {
        endpoints: nines_client::LOCAL_ENDPOINTS.iter().map(|s| s.to_string()).collect(),
        run_for: Duration::from_secs(10),
        tasks: 8,
        key: "counter".into(),
        acked_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else { fail(&format!("{flag} needs a value")) };
        match flag.as_str() {
            "--endpoints" => out.endpoints = value.split(',').map(str::to_string).collect(),
            "--for" => {
                out.run_for =
                    duration(&value).unwrap_or_else(|| fail(&format!("--for {value}: not a duration like 30s")))
            }
            "--tasks" => out.tasks = value.parse().unwrap_or_else(|_| fail(&format!("--tasks {value}: not a number"))),
            "--key" => out.key = value,
            "--acked-file" => out.acked_file = Some(value),
            _ => fail(&format!("unknown option {flag}")),
        }
    }
    out
}

/// `500ms`, `30s` or `2m`.
fn duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i))?;
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}
