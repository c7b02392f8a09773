//! The `nines` binary: the command line of [`nines::cli::main`].

fn main() {
    std::process::exit(nines::cli::main(std::env::args_os()));
}
