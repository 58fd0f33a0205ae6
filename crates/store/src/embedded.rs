//! The embedded backend: one redb file on one host, shared safely by many short processes.
//!
//! redb allows one opener per file, and every CNI invocation is its own process, so each
//! operation takes an exclusive `flock` on `<path>.lock`, opens the database, runs exactly one
//! transaction, closes the database and releases the lock. Nothing is cached between
//! operations, so a process can never act on state another process has since changed.
//!
//! etcd semantics are emulated inside that transaction: a global revision in `meta`, a bounded
//! `changes` table (revision -> events) that watchers read, and leases with expiry times that
//! every operation sweeps first (there is no daemon to expire them).
//!
//! A long-running process may instead keep the store open between operations
//! ([`EmbeddedStore::keep_open`]) and hand it over when another process asks (see `held`).

mod held;

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    perms, Compare, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError,
    TxnResult, WatchEvent,
};

/// How long an operation waits for another process's lock before giving up.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How many revisions of change history are kept for watchers.
pub const DEFAULT_HISTORY: u64 = 10_000;
/// How often a watcher looks for writes made by other processes.
const WATCH_POLL: Duration = Duration::from_millis(50);
/// How often a watcher reads the database even when the lock-file hint says nothing changed.
const WATCH_FULL_POLL: Duration = Duration::from_secs(1);
/// Most revisions a watcher reads in one operation (bounds memory and lock hold time).
const WATCH_BATCH: usize = 1_000;
/// redb page cache per open; the state is small and the database is reopened per operation.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// While waiting for the lock, how often to open the lock file again (a knock for a holder).
const KNOCK_EVERY: Duration = Duration::from_millis(50);

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const LEASES: TableDefinition<i64, &[u8]> = TableDefinition::new("leases");
/// (expiry unix-ms, lease) -> (): the smallest expiry is the first entry.
const EXPIRY: TableDefinition<(u64, i64), ()> = TableDefinition::new("lease_expiry");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_NEXT_LEASE: &str = "next_lease";

/// A [`Store`] kept in one local redb file; safe for many concurrent processes on one host.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
    history: u64,
    /// Committed revisions, so watchers in this process wake without waiting for a poll.
    notify: broadcast::Sender<Revision>,
    /// Set by [`EmbeddedStore::keep_open`]: the database kept open between operations.
    holder: OnceLock<held::Holder>,
    /// Whether operations go through `holder` (cleared if its hand-off listener fails).
    holding: AtomicBool,
}

impl Inner {
    /// The holder, while this process keeps the store open.
    fn held(&self) -> Option<&held::Holder> {
        self.holder
            .get()
            .filter(|_| self.holding.load(Ordering::Acquire))
    }

    /// Go back to one open per operation for good (the hand-off could no longer be heard).
    fn stop_holding(&self) {
        self.holding.store(false, Ordering::Release);
        if let Some(h) = self.holder.get() {
            h.state().release();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    ttl_ms: u64,
    expiry_ms: u64,
    keys: BTreeSet<String>,
}

/// One event as stored in the `changes` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredEvent {
    kind: EventKind,
    kv: KeyValue,
}

impl EmbeddedStore {
    /// Open (creating if missing, with its parent directory) the store file at `path`.
    ///
    /// Blocks while another process holds the store (up to [`DEFAULT_LOCK_TIMEOUT`]).
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedStore> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                // Only a directory made here is ours to make private; an existing one may be
                // shared (the state directory is tightened by whoever owns it).
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(perms::DIR_MODE)
                    .create(parent)
                    .map_err(|e| StoreError::Io(format!("create {}: {e}", parent.display())))?;
            }
        }
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        // Created 0600 before redb touches it, and fixed if an older version left it readable.
        perms::open_private_file(&path)?;
        perms::open_private_file(Path::new(&lock_name))?;
        let (notify, _) = broadcast::channel(64);
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                lock_path: PathBuf::from(lock_name),
                lock_timeout: DEFAULT_LOCK_TIMEOUT,
                history: DEFAULT_HISTORY,
                notify,
                holder: OnceLock::new(),
                holding: AtomicBool::new(false),
            }),
        };
        // Create the file and tables now so a bad path or foreign file fails here, not later.
        store.write_blocking(|_| Ok(()))?;
        Ok(store)
    }

    /// The same store with a different wait limit for the cross-process lock.
    pub fn with_lock_timeout(self, timeout: Duration) -> EmbeddedStore {
        self.reconfigure(|inner| inner.lock_timeout = timeout)
    }

    /// The same store keeping `revisions` revisions of watch history (at least 1).
    pub fn with_history(self, revisions: u64) -> EmbeddedStore {
        self.reconfigure(|inner| inner.history = revisions.max(1))
    }

    /// The path of the store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn reconfigure(self, f: impl FnOnce(&mut Inner)) -> EmbeddedStore {
        let mut inner = Inner {
            path: self.inner.path.clone(),
            lock_path: self.inner.lock_path.clone(),
            lock_timeout: self.inner.lock_timeout,
            history: self.inner.history,
            notify: self.inner.notify.clone(),
            // A reconfigured handle starts per operation; call `keep_open` after configuring.
            holder: OnceLock::new(),
            holding: AtomicBool::new(false),
        };
        f(&mut inner);
        EmbeddedStore {
            inner: Arc::new(inner),
        }
    }

    /// Take the cross-process lock, polling until the timeout.
    ///
    /// Polling (rather than a blocking `flock`) lets the wait end at a deadline; the backoff is
    /// short because operations hold the lock for about a millisecond.
    fn lock(&self) -> Result<Flock<File>> {
        let file = self.open_lock_file()?;
        // Opening the file was this process's first knock (see `held`).
        self.acquire(file, Some(Instant::now()))
    }

    fn open_lock_file(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(perms::FILE_MODE)
            .open(&self.inner.lock_path)
            .map_err(|e| StoreError::Io(format!("open {}: {e}", self.inner.lock_path.display())))
    }

    /// Lock `file` (the lock file), polling until the timeout. While waiting, open the file
    /// again every [`KNOCK_EVERY`] (first at once if `knocked` is None): a process that keeps
    /// the store open hands it over on each open it sees (module `held`).
    fn acquire(&self, mut file: File, mut knocked: Option<Instant>) -> Result<Flock<File>> {
        let deadline = Instant::now() + self.inner.lock_timeout;
        let mut backoff = Duration::from_micros(50);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(StoreError::Unavailable(format!(
                            "{} is locked by another process for more than {:?}",
                            self.inner.path.display(),
                            self.inner.lock_timeout
                        )));
                    }
                    file = f;
                    if knocked.is_none_or(|t| now.duration_since(t) >= KNOCK_EVERY) {
                        // A holder may have missed (or not yet been asked by) our last open.
                        if let Ok(again) = self.open_lock_file() {
                            file = again;
                        }
                        knocked = Some(now);
                    }
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_millis(2));
                }
                Err((_, e)) => {
                    return Err(StoreError::Io(format!(
                        "flock {}: {e}",
                        self.inner.lock_path.display()
                    )))
                }
            }
        }
    }

    /// Run `f` on the database while holding the lock; the database is closed before unlocking.
    ///
    /// When `f` committed a write it returns the new [`Hint`], published in the lock file
    /// (still under the lock) for other processes' watchers.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database, redb::Durability) -> Result<(T, Option<Hint>)>,
    ) -> Result<T> {
        self.with_db_as(false, f)
    }

    /// [`Self::with_db`]; `deferred` writes on a held database commit without syncing.
    fn with_db_as<T>(
        &self,
        deferred: bool,
        f: impl FnOnce(&Database, redb::Durability) -> Result<(T, Option<Hint>)>,
    ) -> Result<T> {
        if let Some(holder) = self.inner.held() {
            return self.with_held_db(holder, deferred, f);
        }
        let lock = self.lock()?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&self.inner.path)
            .map_err(db_err)?;
        let out = f(&db, redb::Durability::None);
        let closed = db.close().map_err(db_err);
        if let (Ok((_, Some(hint))), Ok(())) = (&out, &closed) {
            // Only a hint: a failed write just makes watchers poll the database.
            let _ = lock.write_all_at(&hint.encode(), 0);
        }
        drop(lock);
        let (out, hint) = out?;
        closed?;
        if let Some(hint) = hint.filter(|h| h.bumped) {
            // No receiver is fine: nobody in this process is watching.
            let _ = self.inner.notify.send(hint.revision);
        }
        Ok(out)
    }

    /// [`Self::with_db`] on the database this process keeps open: opened (under the lock) if
    /// it is not, and closed again right away while another process is waiting its turn.
    fn with_held_db<T>(
        &self,
        holder: &held::Holder,
        deferred: bool,
        f: impl FnOnce(&Database, redb::Durability) -> Result<(T, Option<Hint>)>,
    ) -> Result<T> {
        let mut st = holder.state();
        let open = match st.open.take() {
            Some(open) => open,
            None => {
                // Its own knocks make this holder yield too, which is fair when contended.
                let lock = self.acquire(st.take_idle(&self.inner.lock_path)?, None)?;
                match redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .create(&self.inner.path)
                {
                    Ok(db) => held::Open { lock, db },
                    Err(e) => {
                        if let Ok(file) = lock.unlock() {
                            st.put_idle(file);
                        }
                        return Err(db_err(e));
                    }
                }
            }
        };
        // Held between operations, so each write is made durable by its own commit, unless
        // its caller deferred that to a later sync (which any durable commit or the close
        // also does, for every deferred commit before it).
        let durability = match deferred {
            true => redb::Durability::None,
            false => redb::Durability::Immediate,
        };
        let out = f(&open.db, durability);
        // A commit happened when `f` returns a hint; a durable one synced the deferred before it.
        if let Ok((_, Some(_))) = &out {
            st.deferred = deferred;
        }
        if let Ok((_, Some(hint))) = &out {
            open.write_hint(&hint.encode());
        }
        st.open = Some(open);
        st.used(Instant::now());
        // After an error the next operation starts from a fresh open.
        if out.is_err() || st.yielding(Instant::now()) {
            st.release();
        }
        drop(st);
        let (out, hint) = out?;
        if let Some(hint) = hint.filter(|h| h.bumped) {
            let _ = self.inner.notify.send(hint.revision);
        }
        Ok(out)
    }

    /// Keep the database open between operations, for a long-running process (the agent, the
    /// Docker plugin); other processes still get it, each time they ask (module `held`).
    /// Call it after `with_*` configuration. Idempotent.
    pub fn keep_open(&self) -> Result<()> {
        if self.inner.holder.get().is_none() {
            // The holder opens its lock file before the listener starts, so that open is not
            // mistaken for another process's.
            let holder = held::Holder::new(&self.inner.lock_path)?;
            if self.inner.holder.set(holder).is_err() {
                return Ok(());
            }
            held::spawn_knock_listener(&self.inner.lock_path, Arc::downgrade(&self.inner))?;
        }
        self.inner.holding.store(true, Ordering::Release);
        Ok(())
    }

    /// Keep the held database open for at least `d` from now, even idle (a burst of calls is
    /// coming); a no-op unless [`EmbeddedStore::keep_open`] was called. Another process's
    /// knock still has it handed over at once.
    pub fn hold_for(&self, d: Duration) {
        if let Some(h) = self.inner.holder.get() {
            h.hold_until(Instant::now() + d);
        }
    }

    /// Run `f` in one write transaction after the lease sweep; commits only if `f` succeeds.
    /// `durability` is None where a close under the lock follows (see below).
    fn commit_write<T>(
        &self,
        db: &Database,
        durability: redb::Durability,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T>,
    ) -> Result<(T, Option<Hint>)> {
        let mut txn = db.begin_write().map_err(db_err)?;
        // No syncs of its own: every write here is followed by `db.close()` in `with_db`, still
        // under the lock, which makes this commit durable with the allocator-state commit redb
        // does on every close (the commit's own syncs saved: 5.6 per write under strace, was
        // 6.5). Nothing can see the commit
        // before that: other processes read only under the lock, and the write is reported (to
        // the caller, to watchers) only once the close has succeeded. If the close fails, the
        // caller gets its error; if the process dies before it, the file is marked for repair
        // (the writable open synced that mark) and the next open rolls back to the last durable
        // commit, so a write is either durable or was never reported.
        txn.set_durability(durability).map_err(db_err)?;
        let (out, hint) = {
            let mut tx = Tx::open(&txn, self.inner.history)?;
            let start = tx.revision()?;
            tx.sweep(now_ms())?;
            let out = f(&mut tx)?;
            let revision = tx.revision()?;
            let hint = Hint {
                revision,
                next_expiry_ms: tx.next_expiry()?,
                bumped: revision > start,
            };
            (out, hint)
        };
        txn.commit().map_err(db_err)?;
        Ok((out, Some(hint)))
    }

    /// One write transaction (after the lease sweep); commits only if `f` succeeds.
    fn write_blocking<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_blocking_as(false, f)
    }

    /// [`Self::write_blocking`], its durability deferred when `deferred` (see
    /// [`crate::deferring_durability`]; only a held store defers).
    fn write_blocking_as<T>(
        &self,
        deferred: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.with_db_as(deferred, |db, durability| {
            self.commit_write(db, durability, f)
        })
    }

    /// Make deferred writes durable: one empty durable commit on the held database when one
    /// is pending (a closed one synced them when it closed).
    fn sync_blocking(&self) -> Result<()> {
        let Some(holder) = self.inner.held() else {
            return Ok(());
        };
        let mut st = holder.state();
        if !st.deferred {
            return Ok(());
        }
        if let Some(open) = &st.open {
            let mut txn = open.db.begin_write().map_err(db_err)?;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(db_err)?;
            txn.commit().map_err(db_err)?;
        }
        st.deferred = false;
        Ok(())
    }

    /// A read; sweeps expired leases first (in a write transaction) only when one is due.
    fn read_blocking<T>(&self, f: impl Fn(&Reader) -> Result<T>) -> Result<T> {
        // A database held open now is read in place; otherwise a read-only open avoids
        // redb's syncs (a holder starts holding at its next write, not for a read).
        if !self.inner.held().is_some_and(|h| h.is_open()) {
            if let Some(out) = self.read_only(&f)? {
                return Ok(out);
            }
        }
        self.with_db(|db, durability| {
            {
                let txn = db.begin_read().map_err(db_err)?;
                let reader = Reader::open(&txn)?;
                if !reader
                    .next_expiry()?
                    .is_some_and(|e| is_expired(e, now_ms()))
                {
                    return Ok((f(&reader)?, None));
                }
            }
            let ((), hint) = self.commit_write(db, durability, |_| Ok(()))?;
            let txn = db.begin_read().map_err(db_err)?;
            Ok((f(&Reader::open(&txn)?)?, hint))
        })
    }

    /// A read through a read-only open, under the lock: redb writes nothing and syncs nothing
    /// then (a writable open marks the file dirty and syncs five times, even for a read). None
    /// when a writer must go first: a lease is due for its sweep, or the last writer died and
    /// left the file for a writable open to repair.
    fn read_only<T>(&self, f: &impl Fn(&Reader) -> Result<T>) -> Result<Option<T>> {
        let lock = self.read_lock()?;
        let db = match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .open_read_only(&self.inner.path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::RepairAborted) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let out = (|| {
            let txn = db.begin_read().map_err(db_err)?;
            let reader = Reader::open(&txn)?;
            if reader
                .next_expiry()?
                .is_some_and(|e| is_expired(e, now_ms()))
            {
                return Ok(None);
            }
            f(&reader).map(Some)
        })();
        let closed = db.close().map_err(db_err);
        self.read_unlock(lock);
        let out = out?;
        closed?;
        Ok(out)
    }

    /// The lock for a read-only open. A holder locks the lock file it keeps open (it knocks
    /// only if someone else has the store): opening the file anew would be a knock on itself,
    /// and its next writes would then go through an open of their own each, for the yield.
    fn read_lock(&self) -> Result<Flock<File>> {
        match self.inner.held() {
            Some(holder) => {
                let file = holder.state().take_idle(&self.inner.lock_path)?;
                self.acquire(file, None)
            }
            None => self.lock(),
        }
    }

    /// Unlock after [`Self::read_lock`]; a holder keeps the file for next time.
    fn read_unlock(&self, lock: Flock<File>) {
        let Some(holder) = self.inner.held() else {
            drop(lock);
            return;
        };
        match lock.unlock() {
            Ok(file) => holder.state().put_idle(file),
            // Dropping the lock closes the file, which unlocks it too.
            Err((lock, _)) => drop(lock),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(EmbeddedStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| StoreError::Io(format!("store worker failed: {e}")))?
    }

    /// Events under `prefix` after revision `after` (at most one batch), and the revision
    /// the caller has now seen up to.
    fn changes_since(
        &self,
        prefixes: &[(String, Revision)],
        after: Revision,
    ) -> Result<(Vec<WatchEvent>, Revision)> {
        self.read_blocking(|r| {
            check_watch_start(after, r.meta(META_COMPACTED)?)?;
            let current = r.meta(META_REVISION)?;
            let mut events = Vec::new();
            let mut seen = after;
            let mut batches = 0;
            for entry in r.changes.range(after.saturating_add(1)..).map_err(db_err)? {
                let (rev, data) = entry.map_err(db_err)?;
                for ev in decode::<Vec<StoredEvent>>(data.value())? {
                    if watched(prefixes, &ev.kv.key, rev.value()) {
                        events.push(WatchEvent {
                            kind: ev.kind,
                            kv: ev.kv,
                        });
                    }
                }
                seen = rev.value();
                batches += 1;
                if batches == WATCH_BATCH {
                    return Ok((events, seen));
                }
            }
            Ok((events, seen.max(current)))
        })
    }
}

/// Whether a watcher of `prefixes` (each followed from after its own revision) wants the
/// change of `key` at `rev`.
fn watched(prefixes: &[(String, Revision)], key: &str, rev: Revision) -> bool {
    prefixes
        .iter()
        .any(|(p, after)| rev > *after && key.starts_with(p.as_str()))
}

/// Read-only view of the tables.
struct Reader {
    kv: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    meta: redb::ReadOnlyTable<&'static str, u64>,
    changes: redb::ReadOnlyTable<u64, &'static [u8]>,
    expiry: redb::ReadOnlyTable<(u64, i64), ()>,
}

impl Reader {
    fn open(txn: &redb::ReadTransaction) -> Result<Reader> {
        Ok(Reader {
            kv: txn.open_table(KV).map_err(db_err)?,
            meta: txn.open_table(META).map_err(db_err)?,
            changes: txn.open_table(CHANGES).map_err(db_err)?,
            expiry: txn.open_table(EXPIRY).map_err(db_err)?,
        })
    }

    fn meta(&self, name: &str) -> Result<u64> {
        Ok(self
            .meta
            .get(name)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn next_expiry(&self) -> Result<Option<u64>> {
        Ok(self
            .expiry
            .first()
            .map_err(db_err)?
            .map(|(k, _)| k.value().0))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.kv
            .get(key)
            .map_err(db_err)?
            .map(|v| decode(v.value()))
            .transpose()
    }

    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut out = Vec::new();
        for entry in self.kv.range(prefix..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(decode(v.value())?);
        }
        Ok(out)
    }
}

/// The tables of one write transaction plus the events it has produced so far.
struct Tx<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    changes: Table<'t, u64, &'static [u8]>,
    leases: Table<'t, i64, &'static [u8]>,
    expiry: Table<'t, (u64, i64), ()>,
    history: u64,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t WriteTransaction, history: u64) -> Result<Tx<'t>> {
        Ok(Tx {
            kv: txn.open_table(KV).map_err(db_err)?,
            meta: txn.open_table(META).map_err(db_err)?,
            changes: txn.open_table(CHANGES).map_err(db_err)?,
            leases: txn.open_table(LEASES).map_err(db_err)?,
            expiry: txn.open_table(EXPIRY).map_err(db_err)?,
            history,
        })
    }

    fn meta(&self, name: &str) -> Result<u64> {
        Ok(self
            .meta
            .get(name)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn set_meta(&mut self, name: &str, value: u64) -> Result<()> {
        self.meta.insert(name, value).map_err(db_err)?;
        Ok(())
    }

    fn revision(&self) -> Result<Revision> {
        self.meta(META_REVISION)
    }

    fn next_expiry(&self) -> Result<Option<u64>> {
        Ok(self
            .expiry
            .first()
            .map_err(db_err)?
            .map(|(k, _)| k.value().0))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.kv
            .get(key)
            .map_err(db_err)?
            .map(|v| decode(v.value()))
            .transpose()
    }

    fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>> {
        self.leases
            .get(id)
            .map_err(db_err)?
            .map(|v| decode(v.value()))
            .transpose()
    }

    fn set_lease(&mut self, id: LeaseId, rec: &LeaseRecord) -> Result<()> {
        self.leases
            .insert(id, encode(rec)?.as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    /// Record `events` as revision `rev` (when there are any) and compact old history.
    fn finish_revision(&mut self, rev: Revision, events: &[StoredEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.set_meta(META_REVISION, rev)?;
        self.changes
            .insert(rev, encode(&events)?.as_slice())
            .map_err(db_err)?;
        let floor = compaction_floor(rev, self.history);
        if floor > self.meta(META_COMPACTED)? {
            self.changes
                .retain_in(..=floor, |_, _| false)
                .map_err(db_err)?;
            self.set_meta(META_COMPACTED, floor)?;
        }
        Ok(())
    }

    /// Delete every key of every lease expired at `now_ms`, as one revision.
    fn sweep(&mut self, now_ms: u64) -> Result<()> {
        let mut entries = Vec::new();
        for entry in self.expiry.iter().map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (expiry, id) = k.value();
            if !is_expired(expiry, now_ms) {
                break;
            }
            entries.push((expiry, id));
        }
        let expired = select_expired(entries, now_ms);
        if expired.is_empty() {
            return Ok(());
        }
        let rev = self.revision()? + 1;
        let mut events = Vec::new();
        for id in expired {
            self.remove_lease(id, rev, &mut events)?;
        }
        self.finish_revision(rev, &events)
    }

    /// Remove a lease and delete its keys at `rev`; false if it did not exist.
    fn remove_lease(
        &mut self,
        id: LeaseId,
        rev: Revision,
        events: &mut Vec<StoredEvent>,
    ) -> Result<bool> {
        let Some(rec) = self.lease(id)? else {
            return Ok(false);
        };
        self.leases.remove(id).map_err(db_err)?;
        self.expiry.remove((rec.expiry_ms, id)).map_err(db_err)?;
        for key in &rec.keys {
            // Only keys still attached to this lease (a later put may have moved them).
            if self.get(key)?.is_some_and(|kv| kv.lease == Some(id)) {
                self.kv.remove(key.as_str()).map_err(db_err)?;
                events.push(delete_event(key, rev));
            }
        }
        Ok(true)
    }

    fn detach(&mut self, key: &str, lease: Option<LeaseId>) -> Result<()> {
        if let Some(id) = lease {
            if let Some(mut rec) = self.lease(id)? {
                if rec.keys.remove(key) {
                    self.set_lease(id, &rec)?;
                }
            }
        }
        Ok(())
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        rev: Revision,
        events: &mut Vec<StoredEvent>,
    ) -> Result<()> {
        let existing = self.get(key)?;
        if let Some(id) = lease {
            let mut rec = self.lease(id)?.ok_or(StoreError::LeaseNotFound(id))?;
            if rec.keys.insert(key.to_string()) {
                self.set_lease(id, &rec)?;
            }
        }
        if let Some(old) = existing.as_ref().and_then(|kv| kv.lease) {
            if Some(old) != lease {
                self.detach(key, Some(old))?;
            }
        }
        let kv = put_record(existing.as_ref(), key, value, lease, rev);
        self.kv
            .insert(key, encode(&kv)?.as_slice())
            .map_err(db_err)?;
        events.push(StoredEvent {
            kind: EventKind::Put,
            kv,
        });
        Ok(())
    }

    fn delete(&mut self, key: &str, rev: Revision, events: &mut Vec<StoredEvent>) -> Result<()> {
        if let Some(old) = self.get(key)? {
            self.kv.remove(key).map_err(db_err)?;
            self.detach(key, old.lease)?;
            events.push(delete_event(key, rev));
        }
        Ok(())
    }

    fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for entry in self.kv.range(prefix..).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            keys.push(k.value().to_string());
        }
        Ok(keys)
    }

    fn txn(&mut self, compares: &[Compare], ops: Vec<Op>) -> Result<TxnResult> {
        for c in compares {
            let key = match c {
                Compare::Exists(k)
                | Compare::Missing(k)
                | Compare::ModRevision(k, _)
                | Compare::Value(k, _) => k,
            };
            if !compare_holds(c, self.get(key)?.as_ref()) {
                return Ok(TxnResult {
                    succeeded: false,
                    revision: self.revision()?,
                });
            }
        }
        let rev = self.revision()? + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => self.put(&key, value, lease, rev, &mut events)?,
                Op::Delete(key) => self.delete(&key, rev, &mut events)?,
                Op::DeletePrefix(prefix) => {
                    for key in self.keys_with_prefix(&prefix)? {
                        self.delete(&key, rev, &mut events)?;
                    }
                }
            }
        }
        self.finish_revision(rev, &events)?;
        Ok(TxnResult {
            succeeded: true,
            revision: self.revision()?,
        })
    }

    fn grant(&mut self, ttl: Duration, now_ms: u64) -> Result<LeaseId> {
        let id = i64::try_from(self.meta(META_NEXT_LEASE)?.max(1))
            .map_err(|_| StoreError::Corrupt("lease counter overflow".into()))?;
        self.set_meta(META_NEXT_LEASE, id as u64 + 1)?;
        let ttl_ms = duration_ms(ttl);
        let rec = LeaseRecord {
            ttl_ms,
            expiry_ms: now_ms.saturating_add(ttl_ms),
            keys: BTreeSet::new(),
        };
        self.set_lease(id, &rec)?;
        self.expiry
            .insert((rec.expiry_ms, id), ())
            .map_err(db_err)?;
        Ok(id)
    }

    fn keep_alive(&mut self, id: LeaseId, now_ms: u64) -> Result<()> {
        let mut rec = self.lease(id)?.ok_or(StoreError::LeaseNotFound(id))?;
        if is_expired(rec.expiry_ms, now_ms) {
            return Err(StoreError::LeaseNotFound(id));
        }
        self.expiry.remove((rec.expiry_ms, id)).map_err(db_err)?;
        rec.expiry_ms = now_ms.saturating_add(rec.ttl_ms);
        self.expiry
            .insert((rec.expiry_ms, id), ())
            .map_err(db_err)?;
        self.set_lease(id, &rec)
    }

    fn revoke(&mut self, id: LeaseId) -> Result<()> {
        let rev = self.revision()? + 1;
        let mut events = Vec::new();
        if !self.remove_lease(id, rev, &mut events)? {
            return Err(StoreError::LeaseNotFound(id));
        }
        self.finish_revision(rev, &events)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |s| s.read_blocking(|r| r.get(&key)))
            .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.blocking(move |s| s.read_blocking(|r| Ok((r.range(&prefix)?, r.meta(META_REVISION)?))))
            .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        crate::check_txn_size(&compares, &ops)?;
        // Read here, in the caller's task: the blocking thread does not see its task-locals.
        let deferred = crate::durability_deferred();
        self.blocking(move |s| s.write_blocking_as(deferred, |tx| tx.txn(&compares, ops)))
            .await
    }

    async fn sync(&self) -> Result<()> {
        self.blocking(|s| s.sync_blocking()).await
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        self.watch_many(&[(prefix.to_string(), after)]).await
    }

    /// One watcher for every prefix: one history read per change, whatever their number.
    async fn watch_many(
        &self,
        prefixes: &[(String, Revision)],
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        let state = WatchState {
            store: self.clone(),
            prefixes: prefixes.into(),
            last: prefixes.iter().map(|(_, r)| *r).min().unwrap_or(0),
            buf: VecDeque::new(),
            wake: self.inner.notify.subscribe(),
            // Opened once: a holder (this process too) takes the open for one knock and hands over.
            hint_file: File::open(&self.inner.lock_path).ok(),
            last_full: Instant::now(),
            polled: false,
            done: false,
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.blocking(move |s| s.write_blocking(|tx| tx.grant(ttl, now_ms())))
            .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |s| s.write_blocking(|tx| tx.keep_alive(lease, now_ms())))
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |s| s.write_blocking(|tx| tx.revoke(lease)))
            .await
    }

    async fn revision(&self) -> Result<Revision> {
        self.blocking(move |s| s.read_blocking(|r| r.meta(META_REVISION)))
            .await
    }

    fn keep_open(&self) -> Result<()> {
        EmbeddedStore::keep_open(self)
    }

    fn hold_for(&self, d: Duration) {
        EmbeddedStore::hold_for(self, d)
    }
}

/// A watcher: drains its buffer, then reads new history when woken or on the poll interval.
struct WatchState {
    store: EmbeddedStore,
    /// The prefixes followed, each from after its own revision.
    prefixes: Arc<[(String, Revision)]>,
    last: Revision,
    buf: VecDeque<WatchEvent>,
    wake: broadcast::Receiver<Revision>,
    /// The lock file, read for the [`Hint`]; None means: always read the database.
    hint_file: Option<File>,
    last_full: Instant,
    polled: bool,
    done: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, WatchState)> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            if self.polled {
                tokio::select! {
                    // Lagged or a value: either way there is something new to read.
                    _ = self.wake.recv() => {}
                    _ = tokio::time::sleep(WATCH_POLL) => {
                        let hint = self.hint_file.as_ref().and_then(read_hint);
                        if !poll_needed(hint, self.last, now_ms(), self.last_full.elapsed()) {
                            continue;
                        }
                    }
                }
            }
            self.polled = true;
            self.last_full = Instant::now();
            let (prefixes, last) = (self.prefixes.clone(), self.last);
            match self
                .store
                .blocking(move |s| s.changes_since(&prefixes, last))
                .await
            {
                Ok((events, seen)) => {
                    self.last = seen;
                    self.buf.extend(events);
                }
                Err(e @ StoreError::Compacted { .. }) => {
                    // The watcher must resync from a fresh read; continuing would skip changes.
                    self.done = true;
                    return Some((Err(e), self));
                }
                // Transient (e.g. lock timeout): report it and keep polling.
                Err(e) => return Some((Err(e), self)),
            }
        }
    }
}

// ---- pure bookkeeping ----

/// What the last write left in the lock file: lets a watcher in another process see, without
/// opening the database, that nothing changed and no lease is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hint {
    revision: Revision,
    next_expiry_ms: Option<u64>,
    /// Whether the write that produced it bumped the revision (not stored).
    bumped: bool,
}

const HINT_MAGIC: &[u8; 4] = b"FNH1";
const HINT_LEN: usize = 4 + 8 + 8;

impl Hint {
    fn encode(&self) -> [u8; HINT_LEN] {
        let mut b = [0u8; HINT_LEN];
        b[..4].copy_from_slice(HINT_MAGIC);
        b[4..12].copy_from_slice(&self.revision.to_le_bytes());
        b[12..20].copy_from_slice(&self.next_expiry_ms.unwrap_or(0).to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Hint> {
        if b.len() < HINT_LEN || &b[..4] != HINT_MAGIC {
            return None;
        }
        let revision = u64::from_le_bytes(b[4..12].try_into().ok()?);
        let expiry = u64::from_le_bytes(b[12..20].try_into().ok()?);
        Some(Hint {
            revision,
            next_expiry_ms: (expiry != 0).then_some(expiry),
            bumped: false,
        })
    }
}

/// Whether a timer-driven watcher poll must read the database: the hint is missing, shows a
/// newer revision, or a lease is due (someone must sweep it); and at least every
/// [`WATCH_FULL_POLL`], in case a writer died between commit and hint.
fn poll_needed(hint: Option<Hint>, seen: Revision, now_ms: u64, since_full: Duration) -> bool {
    match hint {
        _ if since_full >= WATCH_FULL_POLL => true,
        None => true,
        Some(h) => h.revision != seen || h.next_expiry_ms.is_some_and(|e| is_expired(e, now_ms)),
    }
}

fn read_hint(file: &File) -> Option<Hint> {
    let mut b = [0u8; HINT_LEN];
    file.read_exact_at(&mut b, 0).ok()?;
    Hint::decode(&b)
}

/// The highest revision whose history may be dropped once `current` is committed.
fn compaction_floor(current: Revision, keep: u64) -> Revision {
    current.saturating_sub(keep)
}

/// Whether a watch that has seen everything up to `after` can continue, given history up to
/// and including `compacted` is gone.
fn check_watch_start(after: Revision, compacted: Revision) -> Result<()> {
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after + 1,
            compacted: compacted + 1,
        });
    }
    Ok(())
}

/// A lease expiring at `expiry_ms` is gone at `now_ms`.
fn is_expired(expiry_ms: u64, now_ms: u64) -> bool {
    expiry_ms <= now_ms
}

/// The leases to sweep, from `(expiry, lease)` entries sorted by expiry.
fn select_expired(entries: impl IntoIterator<Item = (u64, LeaseId)>, now_ms: u64) -> Vec<LeaseId> {
    entries
        .into_iter()
        .take_while(|(e, _)| is_expired(*e, now_ms))
        .map(|(_, id)| id)
        .collect()
}

/// Whether `c` holds for the key's current value.
fn compare_holds(c: &Compare, current: Option<&KeyValue>) -> bool {
    match c {
        Compare::Exists(_) => current.is_some(),
        Compare::Missing(_) => current.is_none(),
        Compare::ModRevision(_, rev) => current.map_or(0, |kv| kv.mod_revision) == *rev,
        Compare::Value(_, v) => current.is_some_and(|kv| &kv.value == v),
    }
}

/// The record after a put at `rev`: creation revision survives updates.
fn put_record(
    existing: Option<&KeyValue>,
    key: &str,
    value: Vec<u8>,
    lease: Option<LeaseId>,
    rev: Revision,
) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value,
        create_revision: existing.map_or(rev, |kv| kv.create_revision),
        mod_revision: rev,
        lease,
    }
}

fn delete_event(key: &str, rev: Revision) -> StoredEvent {
    StoredEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            lease: None,
        },
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(format!("decode: {e}")))
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => StoreError::Unavailable(
            "database file is open in a process that bypasses the lock".into(),
        ),
        redb::Error::Corrupted(m) => StoreError::Corrupt(m),
        e => StoreError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_watcher_of_several_prefixes_wants_each_after_its_own_revision() {
        let prefixes = [("/a/".to_string(), 5), ("/b/".to_string(), 9)];
        assert!(watched(&prefixes, "/a/x", 6));
        assert!(
            !watched(&prefixes, "/a/x", 5),
            "at the prefix's own revision: already read"
        );
        assert!(!watched(&prefixes, "/b/x", 7), "before /b/'s revision");
        assert!(watched(&prefixes, "/b/x", 10));
        assert!(!watched(&prefixes, "/c/x", 10), "outside every prefix");
        assert!(!watched(&[], "/a/x", 10));
    }

    use super::*;

    /// A holder's own read-only reads (made while its database is closed, idle) are no knock:
    /// its next write holds the database again instead of yielding to itself. Opening the lock
    /// file anew for those reads made the Docker plugin, which reads before every write,
    /// open the file for every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holders_own_reads_do_not_make_it_yield() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("store.redb")).unwrap();
        store.keep_open().unwrap();
        store.put("/a", b"1".to_vec()).await.unwrap();
        let holder = store.inner.held().unwrap();
        assert!(holder.is_open());
        // Closed after the idle time, by the listener.
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder.is_open() {
            assert!(Instant::now() < deadline, "the idle close never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give the listener time to see any open of the lock file the read makes.
        assert_eq!(store.get("/a").await.unwrap().unwrap().value, b"1");
        tokio::time::sleep(Duration::from_millis(120)).await;
        store.put("/b", b"2".to_vec()).await.unwrap();
        assert!(
            holder.is_open(),
            "the holder yielded to its own read and closed after its write"
        );
    }

    fn kv(mod_revision: Revision, value: &[u8]) -> KeyValue {
        KeyValue {
            key: "k".into(),
            value: value.to_vec(),
            create_revision: 1,
            mod_revision,
            lease: None,
        }
    }

    #[test]
    fn compaction_floor_keeps_last_n() {
        assert_eq!(compaction_floor(5, 10), 0);
        assert_eq!(compaction_floor(10, 10), 0);
        assert_eq!(compaction_floor(11, 10), 1);
        assert_eq!(compaction_floor(10_500, 10_000), 500);
    }

    #[test]
    fn watch_start_against_compaction() {
        assert!(check_watch_start(0, 0).is_ok());
        assert!(check_watch_start(5, 5).is_ok());
        match check_watch_start(4, 5) {
            Err(StoreError::Compacted {
                requested,
                compacted,
            }) => {
                assert_eq!((requested, compacted), (5, 6));
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
    }

    #[test]
    fn expired_selection_stops_at_first_live_lease() {
        let entries = vec![(100, 7), (200, 3), (300, 9), (400, 1)];
        assert_eq!(select_expired(entries.clone(), 99), Vec::<LeaseId>::new());
        assert_eq!(select_expired(entries.clone(), 200), vec![7, 3]);
        assert_eq!(select_expired(entries, 1_000), vec![7, 3, 9, 1]);
    }

    #[test]
    fn compares() {
        let cur = kv(4, b"v");
        assert!(compare_holds(&Compare::Exists("k".into()), Some(&cur)));
        assert!(!compare_holds(&Compare::Exists("k".into()), None));
        assert!(compare_holds(&Compare::Missing("k".into()), None));
        assert!(!compare_holds(&Compare::Missing("k".into()), Some(&cur)));
        assert!(compare_holds(
            &Compare::ModRevision("k".into(), 4),
            Some(&cur)
        ));
        assert!(!compare_holds(
            &Compare::ModRevision("k".into(), 3),
            Some(&cur)
        ));
        assert!(compare_holds(&Compare::ModRevision("k".into(), 0), None));
        assert!(!compare_holds(
            &Compare::ModRevision("k".into(), 0),
            Some(&cur)
        ));
        assert!(compare_holds(
            &Compare::Value("k".into(), b"v".to_vec()),
            Some(&cur)
        ));
        assert!(!compare_holds(
            &Compare::Value("k".into(), b"w".to_vec()),
            Some(&cur)
        ));
        assert!(!compare_holds(
            &Compare::Value("k".into(), Vec::new()),
            None
        ));
    }

    #[test]
    fn put_keeps_create_revision() {
        let first = put_record(None, "k", b"a".to_vec(), None, 3);
        assert_eq!((first.create_revision, first.mod_revision), (3, 3));
        let second = put_record(Some(&first), "k", b"b".to_vec(), Some(2), 8);
        assert_eq!(
            (second.create_revision, second.mod_revision, second.lease),
            (3, 8, Some(2))
        );
    }

    #[test]
    fn events_round_trip_and_garbage_is_corrupt() {
        let evs = vec![
            StoredEvent {
                kind: EventKind::Put,
                kv: kv(2, b"x"),
            },
            delete_event("k", 3),
        ];
        let back: Vec<StoredEvent> = decode(&encode(&evs).unwrap()).unwrap();
        assert_eq!(back, evs);
        assert!(matches!(
            decode::<Vec<StoredEvent>>(b"\x00nope"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn hint_round_trip_and_garbage() {
        let h = Hint {
            revision: 42,
            next_expiry_ms: Some(1_700),
            bumped: false,
        };
        assert_eq!(Hint::decode(&h.encode()), Some(h));
        let none = Hint {
            revision: 7,
            next_expiry_ms: None,
            bumped: false,
        };
        assert_eq!(Hint::decode(&none.encode()), Some(none));
        assert_eq!(Hint::decode(&[]), None);
        assert_eq!(Hint::decode(&[0u8; HINT_LEN]), None);
    }

    #[test]
    fn watcher_polls_only_when_hint_says_so() {
        let quiet = Some(Hint {
            revision: 5,
            next_expiry_ms: Some(1_000),
            bumped: false,
        });
        let short = Duration::from_millis(100);
        assert!(!poll_needed(quiet, 5, 999, short));
        assert!(poll_needed(quiet, 4, 999, short), "newer revision");
        assert!(poll_needed(quiet, 5, 1_000, short), "lease due");
        assert!(poll_needed(None, 5, 0, short), "no hint");
        assert!(
            poll_needed(quiet, 5, 0, WATCH_FULL_POLL),
            "periodic full poll"
        );
        let no_leases = Some(Hint {
            revision: 5,
            next_expiry_ms: None,
            bumped: false,
        });
        assert!(!poll_needed(no_leases, 5, u64::MAX, short));
    }

    #[test]
    fn expiry_boundary() {
        assert!(is_expired(10, 10));
        assert!(!is_expired(11, 10));
    }
}
