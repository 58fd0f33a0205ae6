//! Records the git commit the binary is built from, for `ferrynet --version`.
//!
//! No network and no git objects are needed: `git rev-parse` reads the local checkout; a
//! source tree without git (a crate tarball, a Debian source package) says "unknown".

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FERRYNET_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a commit or a checkout); in a worktree, .git is a file and
    // git tells where HEAD and the index really live.
    for what in ["HEAD", "index"] {
        if let Some(p) = Command::new("git")
            .args(["rev-parse", "--git-path", what])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
        {
            println!("cargo:rerun-if-changed={}", p.trim());
        }
    }
    if let Some(p) = Command::new("git")
        .args(["symbolic-ref", "-q", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
    {
        if let Some(r) = Command::new("git")
            .args(["rev-parse", "--git-path", p.trim()])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
        {
            println!("cargo:rerun-if-changed={}", r.trim());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
