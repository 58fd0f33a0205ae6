//! The store is root's: a ferrynet process makes its state directory 0700 and the embedded
//! store and lock files 0600 (and fixes them when found looser), so a non-root user can neither
//! read the store nor hold its lock.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{bin, out, sh};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
}

/// Open the store as root (any command that reads it).
fn open_as_root(state: &Path) {
    let s = state.display().to_string();
    let o = sh(&[bin(), "--state-dir", &s, "network", "ls"]);
    assert!(o.status.success(), "{}", out(&o));
}

/// `nobody` tries to read the store file; true when it could.
fn nobody_reads(store: &Path) -> bool {
    let s = store.display().to_string();
    sh(&["runuser", "-u", "nobody", "--", "cat", &s])
        .status
        .success()
}

/// `nobody` tries to take the store's lock (shared or exclusive); true when it could.
fn nobody_locks(lock: &Path) -> bool {
    let l = lock.display().to_string();
    sh(&[
        "runuser", "-u", "nobody", "--", "flock", "-n", "-s", &l, "true",
    ])
    .status
    .success()
}

#[test]
fn a_non_root_user_cannot_read_the_store_or_hold_its_lock() {
    // Under /tmp so that nothing above the state directory stops `nobody` by accident.
    let t = tempfile::Builder::new()
        .prefix("fnperm")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let state = t.path().join("state");
    let store = state.join("store.redb");
    let lock = state.join("store.redb.lock");

    open_as_root(&state);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&store), 0o600);
    assert_eq!(mode(&lock), 0o600);
    assert_eq!(std::fs::metadata(&store).expect("stat").uid(), 0);
    assert!(!nobody_reads(&store), "nobody read the store");
    assert!(!nobody_locks(&lock), "nobody took the store lock");

    // Even with the directory opened up, the files themselves refuse.
    chmod(&state, 0o755);
    assert!(!nobody_reads(&store), "nobody read the store (dir 0755)");
    assert!(!nobody_locks(&lock), "nobody took the lock (dir 0755)");

    // An older install's loose modes: the probes succeed (they can tell) ...
    chmod(&store, 0o644);
    chmod(&lock, 0o644);
    assert!(
        nobody_reads(&store),
        "the probe cannot read even a 0644 store"
    );
    assert!(
        nobody_locks(&lock),
        "the probe cannot lock even a 0644 lock"
    );
    // ... until the next ferrynet process opens the store and fixes them.
    open_as_root(&state);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&store), 0o600);
    assert_eq!(mode(&lock), 0o600);
    chmod(&state, 0o755);
    assert!(!nobody_reads(&store), "nobody read the store after the fix");
    assert!(!nobody_locks(&lock), "nobody took the lock after the fix");
}
