//! The `nines-jepsen` binary: parses arguments and calls the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nines-jepsen", about = "Fault-injection runs against a real nines cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run: start a cluster, inject faults, check. Exit 0 valid, 1 invalid, 2 unknown.
    Run(nines_jepsen::run::RunArgs),
    /// Every nemesis against every workload; writes a Markdown table.
    Suite(nines_jepsen::suite::SuiteArgs),
    /// A cluster node (how a run starts its nodes; same as `nines node`).
    #[command(hide = true, disable_help_flag = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Any other `nines` command (how a failover run starts its
    /// controllers: `ctl --endpoints ... controller`).
    #[command(hide = true, disable_help_flag = true)]
    Ctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    // Called as `nines` (the harness's images install this executable under
    // that name), it is the `nines` command line.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == "nines") {
        std::process::exit(nines::cli::main(std::env::args_os()));
    }
    // Bad usage exits 3, not clap's 2: 2 means "unknown" to callers of `run`.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 3 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let command = match cli.command {
        Command::Node { args } => {
            let argv = ["nines".to_string(), "node".to_string()].into_iter().chain(args);
            std::process::exit(nines::cli::main(argv));
        }
        Command::Ctl { args } => std::process::exit(nines::cli::main(std::iter::once("nines".to_string()).chain(args))),
        command => command,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nines-jepsen: cannot start the runtime: {e}");
            std::process::exit(3);
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Run(args) => nines_jepsen::run::run(&args).await.map(|s| s.valid.exit_code()),
            Command::Suite(args) => nines_jepsen::suite::run(&args).await,
            Command::Node { .. } | Command::Ctl { .. } => unreachable!("handled above"),
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            // Neither valid nor invalid: the run itself failed.
            eprintln!("nines-jepsen: {e:#}");
            3
        }
    };
    std::process::exit(code);
}
