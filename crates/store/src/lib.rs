//! ferrynet's cluster state store: one trait, etcd v3 semantics, several backends.
//!
//! Every write bumps one global revision; readers watch a key prefix from a revision, so no
//! update is missed and none is applied twice. Writes that depend on what is there are
//! transactions with preconditions (compare-and-swap).

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

pub mod config;
pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod perms;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{open, ConfigError, EtcdConfig, StoreConfig};

tokio::task_local! {
    static DEFERRED: ();
}

/// Run `f` with the durability of its writes deferred. On an embedded store this process keeps
/// open ([`EmbeddedStore::keep_open`]) each write then commits without syncing: it is visible at
/// once, here and to every other process (they get the store only after it is closed, which
/// syncs), and durable at the next [`Store::sync`], the next write made without deferral, or
/// when the store is closed (idle or handed over). Only the death of this process before then
/// loses it. For a caller that puts a [`Store::sync`] before anything outside depends on the
/// write (the Docker plugin syncs before `Join` answers, while Docker builds the sandbox).
/// Everywhere else writes are durable when they return, as before.
pub async fn deferring_durability<F: std::future::Future>(f: F) -> F::Output {
    DEFERRED.scope((), f).await
}

/// Whether the current task runs inside [`deferring_durability`].
pub(crate) fn durability_deferred() -> bool {
    DEFERRED.try_with(|_| ()).is_ok()
}
pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store-wide, monotonically increasing version number; every committed write gets a new one.
pub type Revision = u64;

/// Identifier of a lease; keys attached to a lease are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// A key and its value as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key (UTF-8 path such as `/ferrynet/v1/networks/blue`).
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision at which this key was created (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A precondition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Missing(String),
    /// The key's last write was at exactly this revision (0 means: the key does not exist).
    ModRevision(String, Revision),
    /// The key exists and holds exactly these bytes.
    Value(String, Vec<u8>),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key, optionally attached to a lease.
    Put {
        /// Key.
        key: String,
        /// New value.
        value: Vec<u8>,
        /// Lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Delete one key (no error if missing).
    Delete(String),
    /// Delete every key under a prefix.
    DeletePrefix(String),
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
    /// A delete of one key.
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete(key.into())
    }
}

/// The outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// True when every precondition held and the ops were applied.
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged when it failed or wrote nothing).
    pub revision: Revision,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (explicitly, by prefix, or by lease expiry).
    Delete,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key and, for puts, its new value (for deletes `value` is empty and
    /// `mod_revision` is the deleting revision).
    pub kv: KeyValue,
}

/// Errors from any backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now (etcd down, file locked for too long); retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history that was already compacted away; resync from a fresh read.
    #[error("revision {requested} was compacted (oldest kept is {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        compacted: Revision,
    },
    /// The lease does not exist or has expired.
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// The store's data is not what this version understands.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// An I/O error from the backend.
    #[error("store I/O error: {0}")]
    Io(String),
    /// A transaction with more compares or writes than every backend takes
    /// ([`MAX_TXN_OPS`]); the caller must split it.
    #[error("store transaction too large: {0}")]
    TooLarge(String),
}

/// The most compares, and the most writes, one transaction may carry: etcd's default
/// `--max-txn-ops`. The embedded backend keeps the same limit, so a write that would fail on
/// a cluster fails on one host too, where tests see it.
pub const MAX_TXN_OPS: usize = 128;

/// `TooLarge` when a transaction exceeds [`MAX_TXN_OPS`] in compares or in writes.
pub fn check_txn_size(compares: &[Compare], ops: &[Op]) -> Result<()> {
    if compares.len() > MAX_TXN_OPS || ops.len() > MAX_TXN_OPS {
        return Err(StoreError::TooLarge(format!(
            "{} compares and {} writes (the limit is {MAX_TXN_OPS} of each)",
            compares.len(),
            ops.len()
        )));
    }
    Ok(())
}

/// Result alias for store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The store interface; backends: [`EmbeddedStore`] (one file, one host) and [`EtcdStore`] (clusters).
#[async_trait]
pub trait Store: Send + Sync {
    /// The value of one key, if present.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key under `prefix`, sorted by key, and the revision the read was taken at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Every key under `prefix` at one revision, like [`Store::range`], handed to `each` in
    /// pages as they are read, so a large prefix is never held whole; returns the revision.
    async fn range_pages(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        let (kvs, rev) = self.range(prefix).await?;
        each(kvs);
        Ok(rev)
    }

    /// Apply `ops` atomically if every compare holds; otherwise change nothing.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult>;

    /// Make every write this process deferred (see [`deferring_durability`]) durable now.
    /// Stores whose writes are always durable have nothing to do.
    async fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Set one key unconditionally.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        Ok(self.txn(vec![], vec![Op::put(key, value)]).await?.revision)
    }

    /// Delete one key unconditionally; true if it existed.
    async fn delete(&self, key: &str) -> Result<bool> {
        let existed = self.get(key).await?.is_some();
        self.txn(vec![], vec![Op::delete(key)]).await?;
        Ok(existed)
    }

    /// Every change under `prefix` with a revision greater than `after`, in revision order,
    /// then live changes as they commit. Fails with [`StoreError::Compacted`] when that
    /// history is gone.
    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>>;

    /// One stream of every change under any of `prefixes`, each followed from after its own
    /// revision (as [`Store::watch`] would). The default merges one watch per prefix; the
    /// embedded store reads each change once for all of them, in revision order.
    async fn watch_many(
        &self,
        prefixes: &[(String, Revision)],
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        let mut streams = Vec::with_capacity(prefixes.len());
        for (prefix, after) in prefixes {
            streams.push(self.watch(prefix, *after).await?);
        }
        Ok(futures::stream::select_all(streams).boxed())
    }

    /// Create a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renew a lease; fails with [`StoreError::LeaseNotFound`] once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// End a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// The store's current revision.
    async fn revision(&self) -> Result<Revision>;

    /// Whether other hosts can share this store (a cluster store), not one host's file.
    fn is_shared(&self) -> bool {
        false
    }

    /// Called by long-running processes: the backend may keep resources open between
    /// operations (the embedded file; an etcd client is a connection already).
    fn keep_open(&self) -> Result<()> {
        Ok(())
    }

    /// A burst of operations is coming: a backend that keeps resources open (see
    /// [`Store::keep_open`]) keeps them for at least `d`, even idle. A no-op by default.
    fn hold_for(&self, _d: Duration) {}
}
