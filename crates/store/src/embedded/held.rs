//! A long-running process (the agent, the Docker plugin) keeps the embedded store open between
//! operations, and hands it over whenever another process asks for it.
//!
//! redb admits one opener per file and CLI and CNI processes must keep opening it per call, so
//! "open once" needs a hand-off: the holder keeps the cross-process lock and the database open,
//! and watches the lock file with inotify. Every other process opens that file before it waits
//! for the lock (and opens it again while it waits, see `KNOCK_EVERY`), so an `IN_OPEN` event
//! means someone is waiting: the holder closes the database, unlocks, and goes back to one open
//! per operation for [`YIELD_FOR`], then holds again. The holder opens its own lock file once, so
//! its own operations never look like a knock.
//!
//! Holding starts at a write (reads of a file not held use the cheap read-only open) and ends
//! after [`IDLE_FOR`] without an operation: the close then happens on the listener's thread,
//! off every caller's path, and an idle agent leaves the file free, so a CNI call beside it
//! pays no hand-off. A caller that knows a burst is coming (the Docker server) extends that
//! with a hold (`Holder::hold_until`); a knock still ends a hold at once.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use redb::Database;

use super::Inner;
use crate::{Result, StoreError};

/// After another process knocked, how long this process opens the store per operation again.
pub(super) const YIELD_FOR: Duration = Duration::from_millis(200);
/// A held store unused for this long is closed (a burst of a container's calls fits in it).
pub(super) const IDLE_FOR: Duration = Duration::from_millis(250);
/// How often the listener looks for an idle store.
const IDLE_CHECK: u16 = 50;

/// The database a long-running process keeps open, and the lock that makes that safe.
pub(super) struct Holder {
    state: Mutex<HeldState>,
}

/// What the holder has now.
pub(super) struct HeldState {
    /// The lock file while it is unlocked (None after an error lost it: reopened on next use).
    idle: Option<File>,
    /// The locked file and the open database, between operations too.
    pub(super) open: Option<Open>,
    /// Until then, close and unlock after every operation (someone else wants the store).
    yield_until: Option<Instant>,
    /// When the held database was last used.
    last_used: Option<Instant>,
    /// Kept open until then even when idle: a burst of calls is under way (see `hold_for`).
    hold_until: Option<Instant>,
    /// A deferred write is not yet durable (see `crate::deferring_durability`).
    pub(super) deferred: bool,
}

/// The cross-process lock and the database opened under it.
pub(super) struct Open {
    /// The locked lock file; the hint for other processes' watchers is written into it.
    pub(super) lock: Flock<File>,
    pub(super) db: Database,
}

impl Holder {
    /// A holder for the store whose lock file is `lock_path` (opened here, once).
    pub(super) fn new(lock_path: &Path) -> Result<Holder> {
        Ok(Holder {
            state: Mutex::new(HeldState {
                idle: Some(open_lock_file(lock_path)?),
                open: None,
                yield_until: None,
                last_used: None,
                hold_until: None,
                deferred: false,
            }),
        })
    }

    /// Whether the database is held open right now.
    pub(super) fn is_open(&self) -> bool {
        self.state().open.is_some()
    }

    /// Close the database if it has not been used for [`IDLE_FOR`] and no hold runs.
    fn close_if_idle(&self, now: Instant) {
        let mut st = self.state();
        if st.open.is_some() && idle(st.last_used, st.hold_until, now) {
            st.release();
        }
    }

    /// Keep the database open until at least `until`, idle or not; another process's knock
    /// still closes it at once.
    pub(super) fn hold_until(&self, until: Instant) {
        let mut st = self.state();
        st.hold_until = Some(st.hold_until.map_or(until, |t| t.max(until)));
    }

    /// The holder's state; a panic in another operation leaves it usable (it is only handles).
    pub(super) fn state(&self) -> MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another process asked for the store: close it now and open per operation for a while.
    fn knocked(&self) {
        let mut st = self.state();
        st.yield_until = Some(Instant::now() + YIELD_FOR);
        st.release();
    }
}

/// Whether a held database last used at `last_used`, held until `hold_until`, is idle at `now`.
fn idle(last_used: Option<Instant>, hold_until: Option<Instant>, now: Instant) -> bool {
    last_used.is_none_or(|t| now.duration_since(t) >= IDLE_FOR)
        && hold_until.is_none_or(|t| now >= t)
}

impl HeldState {
    /// The lock file to lock next (reopened if an earlier failure lost it).
    pub(super) fn take_idle(&mut self, lock_path: &Path) -> Result<File> {
        match self.idle.take() {
            Some(f) => Ok(f),
            None => open_lock_file(lock_path),
        }
    }

    /// Note a use of the held database (for the idle close).
    pub(super) fn used(&mut self, now: Instant) {
        self.last_used = Some(now);
    }

    /// Keep an unlocked lock file for next time.
    pub(super) fn put_idle(&mut self, file: File) {
        self.idle = Some(file);
    }

    /// Whether the store must be closed after this operation: another process knocked lately.
    pub(super) fn yielding(&mut self, now: Instant) -> bool {
        match self.yield_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.yield_until = None;
                false
            }
            None => false,
        }
    }

    /// Close the database and unlock, keeping the lock file for the next hold.
    pub(super) fn release(&mut self) {
        let Some(Open { lock, db }) = self.open.take() else {
            return;
        };
        // Every write was committed durably (Durability::Immediate) while held, except
        // deferred ones, which the close makes durable with its own durable commit. A failed
        // close loses only those; the next open repairs what it left.
        self.deferred = false;
        if let Err(e) = db.close() {
            tracing::error!(error = %e, "closing the held store failed: writes whose durability was deferred since the last sync may be lost");
        }
        match lock.unlock() {
            Ok(file) => self.idle = Some(file),
            // Dropping the lock closes the file, which unlocks it too.
            Err((lock, e)) => {
                tracing::warn!(error = %e, "unlocking the held store failed");
                drop(lock);
            }
        }
    }
}

impl Open {
    /// Publish the hint for other processes' watchers (best effort, as in the per-call path).
    pub(super) fn write_hint(&self, hint: &[u8]) {
        let _ = self.lock.write_all_at(hint, 0);
    }
}

fn open_lock_file(lock_path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(lock_path)
        .map_err(|e| StoreError::Io(format!("open {}: {e}", lock_path.display())))
}

/// Watch `lock_path` for other processes' opens and hand the store over on each; the thread
/// ends at the first event after the store is dropped.
pub(super) fn spawn_knock_listener(lock_path: &Path, store: Weak<Inner>) -> Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| StoreError::Io(format!("inotify: {e}")))?;
    inotify
        .add_watch(lock_path, AddWatchFlags::IN_OPEN)
        .map_err(|e| StoreError::Io(format!("inotify watch {}: {e}", lock_path.display())))?;
    std::thread::Builder::new()
        .name("store-handoff".into())
        .spawn(move || loop {
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, PollTimeout::from(IDLE_CHECK)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => false,
            };
            if !ready {
                let Some(inner) = store.upgrade() else {
                    return;
                };
                if let Some(holder) = inner.holder.get() {
                    holder.close_if_idle(Instant::now());
                }
                continue;
            }
            match inotify.read_events() {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => {
                    // Without the listener nobody could take the store from us: stop holding.
                    tracing::warn!(error = %e, "store hand-off listener failed; opening per operation");
                    if let Some(inner) = store.upgrade() {
                        inner.stop_holding();
                    }
                    return;
                }
            }
            let Some(inner) = store.upgrade() else {
                return;
            };
            if let Some(holder) = inner.holder.get() {
                holder.knocked();
            }
        })
        .map_err(|e| StoreError::Io(format!("spawn the store hand-off listener: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yielding_lasts_until_its_deadline_then_clears() {
        let mut st = HeldState {
            idle: None,
            open: None,
            yield_until: None,
            last_used: None,
            hold_until: None,
            deferred: false,
        };
        let now = Instant::now();
        assert!(!st.yielding(now));
        st.yield_until = Some(now + YIELD_FOR);
        assert!(st.yielding(now));
        assert!(st.yielding(now + YIELD_FOR / 2));
        assert!(!st.yielding(now + YIELD_FOR));
        assert_eq!(st.yield_until, None);
    }

    #[test]
    fn a_hold_keeps_an_idle_store_open_until_it_ends() {
        let t0 = Instant::now();
        assert!(idle(None, None, t0), "never used");
        assert!(!idle(Some(t0), None, t0 + IDLE_FOR / 2));
        assert!(idle(Some(t0), None, t0 + IDLE_FOR));
        let hold = t0 + IDLE_FOR * 8;
        assert!(
            !idle(Some(t0), Some(hold), t0 + IDLE_FOR),
            "held past the idle time"
        );
        assert!(idle(Some(t0), Some(hold), hold), "the hold has ended");
        assert!(!idle(Some(hold), Some(hold), hold), "used again just now");
    }
}
