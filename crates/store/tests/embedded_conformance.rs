//! The shared store conformance suite, plus embedded-only behaviour, against EmbeddedStore.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrynet_store::conformance::{self, DynStore};
use ferrynet_store::{EmbeddedStore, EventKind, Op, Store, StoreError};
use futures::{FutureExt, StreamExt};

/// A store in its own temp dir; the dir lives as long as the returned guard.
fn fresh() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("state/store.redb")).unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let dirs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = dirs.clone();
    conformance::run_all(move || {
        let (dir, store) = fresh();
        keep.lock().unwrap().push(dir);
        async move { Arc::new(store) as DynStore }.boxed()
    })
    .await;
}

/// The same suite on stores kept open between operations (the agent, the Docker plugin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_held_stores() {
    let dirs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = dirs.clone();
    conformance::run_all(move || {
        let (dir, store) = fresh();
        store.keep_open().unwrap();
        keep.lock().unwrap().push(dir);
        async move { Arc::new(store) as DynStore }.boxed()
    })
    .await;
}

/// A store kept open is handed to another opener each time it asks, and each side reads the
/// other's writes; the holder's watcher sees the other's writes too. The holder writes without
/// pause meanwhile (so it is never idle long enough to close on its own): without the hand-off
/// the other side fails with "locked by another process" after its 3 s lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_store_is_handed_over_and_sees_other_writes() {
    let (_dir, holder) = fresh();
    holder.keep_open().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (holder, stop) = (holder.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                holder.put("/busy", n.to_be_bytes().to_vec()).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let mut watch = holder.watch("/o", 0).await.unwrap();
    let other = EmbeddedStore::open(holder.path())
        .unwrap()
        .with_lock_timeout(Duration::from_secs(3));
    for i in 0..30u32 {
        holder.put("/h", i.to_be_bytes().to_vec()).await.unwrap();
        let seen = other.get("/h").await.unwrap().unwrap();
        assert_eq!(seen.value, i.to_be_bytes());
        other.put("/o", i.to_be_bytes().to_vec()).await.unwrap();
        assert_eq!(
            holder.get("/o").await.unwrap().unwrap().value,
            i.to_be_bytes()
        );
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the holder's watcher saw the other's write")
            .unwrap()
            .unwrap();
        assert_eq!(ev.kv.value, i.to_be_bytes());
    }
    // And after the holder has been left alone for longer than its yield, once more.
    tokio::time::sleep(Duration::from_millis(400)).await;
    holder.put("/h", b"last".to_vec()).await.unwrap();
    assert_eq!(other.get("/h").await.unwrap().unwrap().value, b"last");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(busy.await.unwrap() > 0);
}

/// The suite must also pass on a single-threaded runtime (how CNI invocations run).
#[tokio::test(flavor = "current_thread")]
async fn conformance_concurrency_on_current_thread() {
    for (name, check) in conformance::checks() {
        if name.starts_with("concurrent_") || name.starts_with("watch_live") {
            let (_dir, store) = fresh();
            conformance::run_one(name, check, Arc::new(store)).await;
        }
    }
}

#[tokio::test]
async fn new_store_is_at_revision_zero_and_reopens_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), 0);
    assert_eq!(store.put("/k", b"v".to_vec()).await.unwrap(), 1);
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), 1);
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"v");
    // Two handles on one file (as two processes would have) see each other's writes.
    let other = EmbeddedStore::open(&path).unwrap();
    other.put("/k2", b"w".to_vec()).await.unwrap();
    assert_eq!(store.get("/k2").await.unwrap().unwrap().mod_revision, 2);
}

#[tokio::test]
async fn watch_before_kept_history_is_compacted() {
    let (_dir, store) = fresh();
    let store = store.with_history(5);
    for i in 0..12 {
        store.put(&format!("/c/{i}"), vec![]).await.unwrap();
    }
    // Revisions 1..=7 are gone; history after 7 remains.
    let mut w = store.watch("/c/", 3).await.unwrap();
    match w.next().await {
        Some(Err(StoreError::Compacted {
            requested,
            compacted,
        })) => assert_eq!((requested, compacted), (4, 8)),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "a compacted watch ends");
    let mut w = store.watch("/c/", 7).await.unwrap();
    let first = w.next().await.unwrap().unwrap();
    assert_eq!(
        (first.kind, first.kv.key.as_str(), first.kv.mod_revision),
        (EventKind::Put, "/c/7", 8)
    );
}

#[tokio::test]
async fn lock_held_elsewhere_times_out_as_unavailable() {
    let (dir, store) = fresh();
    let store = store.with_lock_timeout(Duration::from_millis(200));
    let lock_file = std::fs::File::open(dir.path().join("state/store.redb.lock")).unwrap();
    let held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let started = Instant::now();
    match store.put("/k", b"v".to_vec()).await {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains("locked by another process"), "{msg}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    drop(held);
    assert_eq!(store.put("/k", b"v".to_vec()).await.unwrap(), 1);
}

#[tokio::test]
async fn lease_moved_key_survives_old_lease_revoke() {
    let (_dir, store) = fresh();
    let a = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let b = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(a, b);
    let put = |lease| Op::Put {
        key: "/m".into(),
        value: b"v".to_vec(),
        lease: Some(lease),
    };
    store.txn(vec![], vec![put(a)]).await.unwrap();
    store.txn(vec![], vec![put(b)]).await.unwrap();
    let before = store.revision().await.unwrap();
    store.revoke_lease(a).await.unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "revoking an empty lease writes nothing"
    );
    assert_eq!(store.get("/m").await.unwrap().unwrap().lease, Some(b));
    store.revoke_lease(b).await.unwrap();
    assert_eq!(store.get("/m").await.unwrap(), None);
    assert!(matches!(
        store.revoke_lease(b).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// Per-operation cost (lock + open + one transaction + close); printed with --nocapture.
#[tokio::test]
async fn measure_put_latency() {
    let (_dir, store) = fresh();
    let n = 1000u64;
    let started = Instant::now();
    for i in 0..n {
        store
            .put(&format!("/bench/{i}"), b"0123456789abcdef".to_vec())
            .await
            .unwrap();
    }
    let put_mean = started.elapsed() / n as u32;
    let started = Instant::now();
    for i in 0..n {
        store.get(&format!("/bench/{i}")).await.unwrap().unwrap();
    }
    let get_mean = started.elapsed() / n as u32;
    eprintln!(
        "embedded store: {n} puts, mean {} us; {n} gets, mean {} us",
        put_mean.as_micros(),
        get_mean.as_micros()
    );
    assert_eq!(store.revision().await.unwrap(), n);
    assert_eq!(store.range("/bench/").await.unwrap().0.len(), n as usize);
}

/// A watcher on another handle (no shared in-process wake-up, as in another process) still
/// sees writes and lease expiries promptly, through the lock-file hint and polling.
#[tokio::test]
async fn watch_from_another_handle_sees_writes_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let writer = EmbeddedStore::open(&path).unwrap();
    let watcher = EmbeddedStore::open(&path).unwrap();
    let mut w = watcher.watch("/x/", 0).await.unwrap();
    let started = Instant::now();
    writer.put("/x/a", b"1".to_vec()).await.unwrap();
    let ev = next(&mut w).await;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Put, "/x/a"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );

    let lease = writer
        .grant_lease(Duration::from_millis(300))
        .await
        .unwrap();
    writer
        .txn(
            vec![],
            vec![Op::Put {
                key: "/x/l".into(),
                value: vec![],
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.kv.key, "/x/l");
    // Nobody touches the store now: the watcher itself must notice the due lease and sweep it.
    let started = Instant::now();
    let ev = next(&mut w).await;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "/x/l"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
}

async fn next(
    w: &mut futures::stream::BoxStream<'static, ferrynet_store::Result<ferrynet_store::WatchEvent>>,
) -> ferrynet_store::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Reads open the file read-only: they leave it untouched (no dirty mark, no header rewrite, so
/// no syncs), and still see what the last write committed; a due lease still gets swept.
#[tokio::test]
async fn reads_leave_the_file_untouched() {
    let (dir, store) = fresh();
    let path = dir.path().join("state/store.redb");
    store.put("/r/a", b"1".to_vec()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/r/b".into(),
                value: b"2".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Coarse file-system clocks: make a rewrite visible in the mtime.
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..3 {
        assert_eq!(store.get("/r/a").await.unwrap().unwrap().value, b"1");
        let (kvs, rev) = store.range("/r/").await.unwrap();
        assert_eq!(kvs.len(), 2);
        assert_eq!(rev, store.revision().await.unwrap());
    }
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read changed the file"
    );

    // A short lease that has run out: the next read must sweep it (a write) and not see its key.
    let short = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/r/c".into(),
                value: b"3".to_vec(),
                lease: Some(short),
            }],
        )
        .await
        .unwrap();
    assert_eq!(store.range("/r/").await.unwrap().0.len(), 3);
    std::thread::sleep(Duration::from_millis(400));
    let (kvs, _) = store.range("/r/").await.unwrap();
    assert_eq!(
        kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["/r/a", "/r/b"]
    );
}

/// Whether some process holds a flock on `path`, read from /proc/locks by inode: opening the
/// lock file to probe it would be a knock, which makes a holder close at once.
fn flocked(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks.lines().any(|l| {
        l.contains("FLOCK")
            && l.split_whitespace()
                .any(|f| f.rsplit(':').next() == Some(ino.to_string().as_str()))
    })
}

/// A hold keeps a held store open past its idle time (without one it closes), and another
/// opener still gets the store at once: a hold never makes a CLI or CNI call wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_the_store_open_and_still_yields_to_a_knock() {
    let (_dir, holder) = fresh();
    holder.keep_open().unwrap();
    let mut lock = holder.path().as_os_str().to_owned();
    lock.push(".lock");
    let lock = std::path::PathBuf::from(lock);
    holder.put("/k", b"1".to_vec()).await.unwrap();
    assert!(flocked(&lock), "held after a write");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!flocked(&lock), "closed once idle, without a hold");

    holder.put("/k", b"2".to_vec()).await.unwrap();
    holder.hold_for(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(flocked(&lock), "still held during the hold, idle as it is");
    let other = EmbeddedStore::open(holder.path())
        .unwrap()
        .with_lock_timeout(Duration::from_secs(3));
    // Within the 3 s lock timeout, or this fails: the hold gave way to the knock.
    other.put("/k", b"3".to_vec()).await.unwrap();
    assert_eq!(holder.get("/k").await.unwrap().unwrap().value, b"3");
}
