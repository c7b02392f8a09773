//! Generates the gRPC code from `proto/` with the vendored protoc, so no
//! system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Read when the script runs, not when it was compiled: a build script
    // binary can be shared between two checkouts of the workspace.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["nines/v1/kv.proto", "nines/v1/admin.proto", "nines/v1/raft.proto", "nines/v1/replication.proto"]
        .map(|f| root.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("nines_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
