//! Crash points for the crash-consistency tests (issue 17): with the `failpoints` feature,
//! `FERRYNET_FAILPOINT=NAME` makes the process abort when it reaches the point `NAME`, so a
//! test can kill every step of an operation in turn and check that the runtime's next call
//! (DEL, GC, a retried ADD, an agent restart) leaves nothing behind. Release builds leave the
//! feature out and every point compiles to nothing.
//!
//! Ours rather than the `fail` crate: it needs only "abort here", which `fail` does not offer
//! (its panic would unwind through our cleanup paths, which a crash never runs).

/// Every crash point, in the order an operation reaches them (the test walks this list).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub const POINTS: &[&str] = &[
    "add-reserved",
    "add-bridge",
    "add-veth",
    "add-guarded",
    "add-published",
    "add-recorded",
    "del-unpublished",
    "del-unplugged",
    "del-released",
    "network-create-recorded",
    "network-rm-detached",
    "network-rm-deleted",
    "cnm-endpoint-recorded",
    "cnm-joined",
    "cnm-published",
    "cnm-left",
    "cnm-endpoint-unlinked",
    "agent-release-batched",
    "agent-fabric-applied",
];

/// Abort the process here when `FERRYNET_FAILPOINT` names `name` (feature `failpoints` only).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    debug_assert!(POINTS.contains(&name), "unlisted crash point {name}");
    if std::env::var("FERRYNET_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("ferrynet: crash point {name} reached: aborting");
        std::process::abort();
    }
}

/// Points where a step fails once (returns an error) instead of aborting, so a test can check
/// that the agent retries it: the first time `FERRYNET_FAILPOINT` names one, [`fails_once`] is
/// true.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub const ERRORS: &[&str] = &["move-renumber"];

/// True the first time the process reaches `name` when `FERRYNET_FAILPOINT` names it
/// (feature `failpoints` only).
#[cfg(feature = "failpoints")]
pub fn fails_once(name: &str) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    // One flag is enough: the variable names one point.
    static FIRED: AtomicBool = AtomicBool::new(false);
    debug_assert!(ERRORS.contains(&name), "unlisted fail point {name}");
    let on = std::env::var("FERRYNET_FAILPOINT").is_ok_and(|v| v == name);
    if on && !FIRED.swap(true, Ordering::SeqCst) {
        eprintln!("ferrynet: fail point {name} reached: failing once");
        return true;
    }
    false
}

/// Fail points are compiled out without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fails_once(_name: &str) -> bool {
    false
}

/// Crash points are compiled out without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// `ferrynet --version`: a build that honours `FERRYNET_FAILPOINT` says so.
#[cfg(feature = "failpoints")]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FERRYNET_GIT_COMMIT"),
    ", crash points enabled)"
);
/// `ferrynet --version`.
#[cfg(not(feature = "failpoints"))]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FERRYNET_GIT_COMMIT"),
    ")"
);
