//! The `nines` binary: the command line of [`nines::cli::main`].

/// mimalloc rather than glibc's malloc: a node allocates and frees small
/// buffers on every request from several threads (gRPC frames, log
/// entries, storage pages), and glibc's allocator showed up as a tenth of
/// the leader's CPU under 64 writers (`benches/README.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(nines::cli::main(std::env::args_os()));
}
