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
    // Bad usage exits 3, not clap's 2: 2 means "unknown" to callers of `run`.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 3 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command {
        Command::Node { args } => {
            let argv = ["nines".to_string(), "node".to_string()].into_iter().chain(args);
            let nines::cli::Cli { command, .. } = <nines::cli::Cli as Parser>::parse_from(argv);
            match command {
                nines::cli::Command::Node(args) => match nines::cli::run_node(args) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("nines-jepsen node: {e:#}");
                        1
                    }
                },
                _ => unreachable!("parsed from a `node` command line"),
            }
        }
        command => {
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
                    Command::Ctl { args } => {
                        let argv = std::iter::once("nines".to_string()).chain(args);
                        let nines::cli::Cli { global, command } = <nines::cli::Cli as Parser>::parse_from(argv);
                        nines::cli::run_client(global, command).await.map(|ok| if ok { 0 } else { 1 })
                    }
                    Command::Node { .. } => unreachable!("handled above"),
                }
            });
            match result {
                Ok(code) => code,
                Err(e) => {
                    // Neither valid nor invalid: the run itself failed.
                    eprintln!("nines-jepsen: {e:#}");
                    3
                }
            }
        }
    };
    std::process::exit(code);
}
