//! Names the git revision the binary is built from, for `nines --version`:
//! `NINES_GIT_REV` is the short hash of the commit checked out, or
//! `unknown` outside a git checkout.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).filter(|r| !r.is_empty()).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NINES_GIT_REV={rev}");
    // Built again when HEAD moves: a checkout, or a commit on the branch.
    // (Only files that exist: cargo takes a missing one as always changed.)
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let head = git(&["symbolic-ref", "-q", "HEAD"]).map(|h| format!("{dir}/{h}"));
        let files = [Some(format!("{dir}/HEAD")), Some(format!("{dir}/packed-refs")), head];
        for file in files.into_iter().flatten().filter(|f| std::path::Path::new(f).exists()) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
