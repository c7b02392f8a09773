//! The `nines` binary: parses arguments and calls the library.

use clap::Parser;
use nines::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node(args) => nines::cli::run_node(args).map(|_| true),
        command => tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async {
                match command {
                    Command::Up(args) => {
                        nines::cli::init_tracing(false);
                        nines::cli::up::run(args).await.map(|_| true)
                    }
                    command => nines::cli::run_client(cli.global, command).await,
                }
            })
        }),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            // One line: the error and its causes.
            let reason: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("nines: {}", reason.join(": "));
            std::process::exit(1);
        }
    }
}
