//! The conformance suite every [`Store`] backend must pass (etcd v3 semantics).
//!
//! Compiled into the library (not `cfg(test)`) so each backend's tests can run it:
//! [`run_all`] runs every check on a fresh store from a factory; each check is also a
//! `pub async fn` taking an `Arc<dyn Store>` so a test file can list them one test each.
//! Checks only assume revisions relative to what they read, so a backend may hand out a
//! namespaced view of a shared server as "a fresh store".

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, BoxFuture};
use futures::{FutureExt, StreamExt};

use crate::{Compare, EventKind, KeyValue, Op, Revision, Store, StoreError, WatchEvent};

/// A store under test, shared by the tasks of one check.
pub type DynStore = Arc<dyn Store>;

/// One named check of the suite.
pub type Check = fn(DynStore) -> BoxFuture<'static, ()>;

/// How long a check waits for a watch event before failing.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// Every check, by name, in the order [`run_all`] runs them.
pub fn checks() -> Vec<(&'static str, Check)> {
    vec![
        ("get_missing", |s| get_missing(s).boxed()),
        ("put_get_revisions", |s| put_get_revisions(s).boxed()),
        ("range_prefix_sorted", |s| range_prefix_sorted(s).boxed()),
        ("delete_and_delete_missing", |s| {
            delete_and_delete_missing(s).boxed()
        }),
        ("delete_prefix", |s| delete_prefix(s).boxed()),
        ("txn_all_or_nothing", |s| txn_all_or_nothing(s).boxed()),
        ("txn_size_limit", |s| txn_size_limit(s).boxed()),
        ("compare_variants", |s| compare_variants(s).boxed()),
        ("revision_per_writing_txn", |s| {
            revision_per_writing_txn(s).boxed()
        }),
        ("concurrent_claim_one_winner", |s| {
            concurrent_claim_one_winner(s).boxed()
        }),
        ("concurrent_lowest_free_slot", |s| {
            concurrent_lowest_free_slot(s).boxed()
        }),
        ("watch_history_from_zero", |s| {
            watch_history_from_zero(s).boxed()
        }),
        ("watch_live_under_prefix", |s| {
            watch_live_under_prefix(s).boxed()
        }),
        ("watch_after_revision", |s| watch_after_revision(s).boxed()),
        ("watch_many_each_from_its_revision", |s| {
            watch_many_each_from_its_revision(s).boxed()
        }),
        ("lease_expiry", |s| lease_expiry(s).boxed()),
        ("lease_keep_alive", |s| lease_keep_alive(s).boxed()),
        ("lease_revoke", |s| lease_revoke(s).boxed()),
    ]
}

/// Run every check, each on a fresh store from `factory`; panics naming the first failing check.
pub async fn run_all<F>(factory: F)
where
    F: Fn() -> BoxFuture<'static, DynStore>,
{
    for (name, check) in checks() {
        run_one(name, check, factory().await).await;
    }
}

/// Run one check, turning its panic into one that names it.
pub async fn run_one(name: &str, check: Check, store: DynStore) {
    eprintln!("store conformance: {name}");
    if let Err(panic) = AssertUnwindSafe(check(store)).catch_unwind().await {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("store conformance check `{name}` failed: {msg}");
    }
}

async fn next_event(
    stream: &mut futures::stream::BoxStream<'static, crate::Result<WatchEvent>>,
) -> WatchEvent {
    match tokio::time::timeout(EVENT_WAIT, stream.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => panic!("watch stream ended"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
    }
}

/// Assert the stream yields nothing more for `wait`.
async fn no_more_events(
    stream: &mut futures::stream::BoxStream<'static, crate::Result<WatchEvent>>,
    wait: Duration,
) {
    if let Ok(item) = tokio::time::timeout(wait, stream.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn brief(ev: &WatchEvent) -> (EventKind, String, Vec<u8>) {
    (ev.kind, ev.kv.key.clone(), ev.kv.value.clone())
}

/// A missing key reads as None; an empty prefix range is empty.
pub async fn get_missing(s: DynStore) {
    assert_eq!(s.get("/nope").await.unwrap(), None);
    let (kvs, _) = s.range("/nope/").await.unwrap();
    assert!(kvs.is_empty());
}

/// create_revision stays across updates; mod_revision moves to each write's revision.
pub async fn put_get_revisions(s: DynStore) {
    let r1 = s.put("/a", b"1".to_vec()).await.unwrap();
    let kv = s.get("/a").await.unwrap().expect("key after put");
    assert_eq!(
        kv,
        KeyValue {
            key: "/a".into(),
            value: b"1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            lease: None
        }
    );
    let r2 = s.put("/a", b"2".to_vec()).await.unwrap();
    assert!(r2 > r1, "revision must grow: {r1} -> {r2}");
    let kv = s.get("/a").await.unwrap().expect("key after update");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"2"[..], r1, r2)
    );
    assert_eq!(s.revision().await.unwrap(), r2);
}

/// Range returns only keys with the prefix, sorted, and the current revision.
pub async fn range_prefix_sorted(s: DynStore) {
    for k in ["/p/c", "/p/a", "/q/a", "/pa", "/p/b/x", "/o"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let rev = s.revision().await.unwrap();
    let (kvs, at) = s.range("/p/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b/x", "/p/c"]);
    assert!(kvs.iter().all(|kv| kv.value == kv.key.as_bytes()));
    assert_eq!(at, rev);
}

/// Delete reports whether the key existed and removes it; deleting a missing key is fine.
pub async fn delete_and_delete_missing(s: DynStore) {
    s.put("/d", b"x".to_vec()).await.unwrap();
    assert!(s.delete("/d").await.unwrap());
    assert_eq!(s.get("/d").await.unwrap(), None);
    assert!(!s.delete("/d").await.unwrap());
    // Re-creating after delete starts a new create_revision.
    let r = s.put("/d", b"y".to_vec()).await.unwrap();
    assert_eq!(s.get("/d").await.unwrap().unwrap().create_revision, r);
}

/// DeletePrefix removes exactly the keys under the prefix, in one revision.
pub async fn delete_prefix(s: DynStore) {
    for k in ["/dp/a", "/dp/b", "/dp/c/d", "/dpx", "/other"] {
        s.put(k, b"v".to_vec()).await.unwrap();
    }
    let before = s.revision().await.unwrap();
    let res = s
        .txn(vec![], vec![Op::DeletePrefix("/dp/".into())])
        .await
        .unwrap();
    assert!(res.succeeded);
    assert_eq!(res.revision, before + 1);
    assert!(s.range("/dp/").await.unwrap().0.is_empty());
    assert!(s.get("/dpx").await.unwrap().is_some());
    assert!(s.get("/other").await.unwrap().is_some());
}

/// A failed compare applies none of the ops and leaves the revision alone; a passing one applies all.
pub async fn txn_all_or_nothing(s: DynStore) {
    s.put("/t/x", b"1".to_vec()).await.unwrap();
    let before = s.revision().await.unwrap();
    let res = s
        .txn(
            vec![
                Compare::Exists("/t/x".into()),
                Compare::Missing("/t/x".into()),
            ],
            vec![Op::put("/t/y", "2"), Op::delete("/t/x")],
        )
        .await
        .unwrap();
    assert!(!res.succeeded);
    assert_eq!(res.revision, before);
    assert_eq!(s.revision().await.unwrap(), before);
    assert_eq!(s.get("/t/y").await.unwrap(), None);
    assert!(s.get("/t/x").await.unwrap().is_some());

    let res = s
        .txn(
            vec![Compare::Exists("/t/x".into())],
            vec![Op::put("/t/y", "2"), Op::delete("/t/x")],
        )
        .await
        .unwrap();
    assert!(res.succeeded);
    assert_eq!(res.revision, before + 1);
    let y = s.get("/t/y").await.unwrap().unwrap();
    assert_eq!(y.mod_revision, before + 1);
    assert_eq!(s.get("/t/x").await.unwrap(), None);
}

/// A transaction of `MAX_TXN_OPS` compares and writes commits; one more of either is refused
/// as `TooLarge` and writes nothing.
pub async fn txn_size_limit(s: DynStore) {
    use crate::{StoreError, MAX_TXN_OPS};
    let key = |i: usize| format!("/big/{i:04}");
    let puts = |n: usize| (0..n).map(|i| Op::put(key(i), "v")).collect::<Vec<_>>();
    let missing = |n: usize| (0..n).map(|i| Compare::Missing(key(i))).collect::<Vec<_>>();
    let res = s
        .txn(missing(MAX_TXN_OPS), puts(MAX_TXN_OPS))
        .await
        .unwrap();
    assert!(res.succeeded);
    let before = s.revision().await.unwrap();
    let more = s.txn(vec![], puts(MAX_TXN_OPS + 1)).await;
    assert!(matches!(more, Err(StoreError::TooLarge(_))), "{more:?}");
    let more = s.txn(missing(MAX_TXN_OPS + 1), vec![]).await;
    assert!(matches!(more, Err(StoreError::TooLarge(_))), "{more:?}");
    assert_eq!(s.revision().await.unwrap(), before);
    assert!(s.get(&key(MAX_TXN_OPS)).await.unwrap().is_none());
}

/// Exists, Missing, ModRevision (including 0 = missing) and Value, each holding and failing.
pub async fn compare_variants(s: DynStore) {
    let rev = s.put("/c", b"v".to_vec()).await.unwrap();
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::Exists("/c".into()), true),
        (Compare::Exists("/c-none".into()), false),
        (Compare::Missing("/c-none".into()), true),
        (Compare::Missing("/c".into()), false),
        (Compare::ModRevision("/c".into(), rev), true),
        (Compare::ModRevision("/c".into(), rev + 1), false),
        (Compare::ModRevision("/c".into(), 0), false),
        (Compare::ModRevision("/c-none".into(), 0), true),
        (Compare::ModRevision("/c-none".into(), rev), false),
        (Compare::Value("/c".into(), b"v".to_vec()), true),
        (Compare::Value("/c".into(), b"w".to_vec()), false),
        (Compare::Value("/c-none".into(), Vec::new()), false),
    ];
    for (i, (cmp, want)) in cases.into_iter().enumerate() {
        let marker = format!("/c-mark/{i}");
        let res = s
            .txn(vec![cmp.clone()], vec![Op::put(&marker, "m")])
            .await
            .unwrap();
        assert_eq!(res.succeeded, want, "compare {cmp:?}");
        assert_eq!(
            s.get(&marker).await.unwrap().is_some(),
            want,
            "ops of compare {cmp:?}"
        );
    }
}

/// Each writing txn bumps the revision by exactly one; non-writing ones not at all.
pub async fn revision_per_writing_txn(s: DynStore) {
    let r0 = s.revision().await.unwrap();
    assert_eq!(s.put("/r/a", b"1".to_vec()).await.unwrap(), r0 + 1);
    let res = s
        .txn(
            vec![],
            vec![
                Op::put("/r/b", "1"),
                Op::put("/r/c", "1"),
                Op::put("/r/a", "2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(res.revision, r0 + 2);
    for k in ["/r/a", "/r/b", "/r/c"] {
        assert_eq!(s.get(k).await.unwrap().unwrap().mod_revision, r0 + 2, "{k}");
    }
    // Deleting a missing key writes nothing.
    let res = s.txn(vec![], vec![Op::delete("/r/none")]).await.unwrap();
    assert!(res.succeeded);
    assert_eq!(res.revision, r0 + 2);
    assert_eq!(s.revision().await.unwrap(), r0 + 2);
    assert_eq!(s.put("/r/d", b"1".to_vec()).await.unwrap(), r0 + 3);
}

/// 16 racers claim one key with Compare::Missing: exactly one wins, and its value is stored.
pub async fn concurrent_claim_one_winner(s: DynStore) {
    let results = join_all((0..16).map(|i| {
        let s = s.clone();
        async move {
            let res = s
                .txn(
                    vec![Compare::Missing("/claim".into())],
                    vec![Op::put("/claim", format!("{i}"))],
                )
                .await
                .unwrap();
            (i, res.succeeded)
        }
    }))
    .await;
    let winners: Vec<i32> = results
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let kv = s.get("/claim").await.unwrap().unwrap();
    assert_eq!(kv.value, format!("{}", winners[0]).into_bytes());
    assert_eq!(kv.create_revision, kv.mod_revision);
}

/// Claim the lowest free slot under `prefix` for `owner`, retrying on conflict; returns the slot.
pub async fn claim_lowest_slot(s: &dyn Store, prefix: &str, owner: &str) -> crate::Result<u32> {
    loop {
        let (kvs, _) = s.range(prefix).await?;
        let taken: BTreeSet<u32> = kvs
            .iter()
            .filter_map(|kv| kv.key[prefix.len()..].parse().ok())
            .collect();
        let slot = (0..).find(|n| !taken.contains(n)).unwrap_or(0);
        let key = format!("{prefix}{slot:06}");
        let res = s
            .txn(
                vec![Compare::ModRevision(key.clone(), 0)],
                vec![Op::put(&key, owner)],
            )
            .await?;
        if res.succeeded {
            return Ok(slot);
        }
    }
}

/// 16 racers each allocate the lowest free slot with retry-on-conflict: all slots distinct.
pub async fn concurrent_lowest_free_slot(s: DynStore) {
    let slots = join_all((0..16).map(|i| {
        let s = s.clone();
        async move {
            claim_lowest_slot(s.as_ref(), "/slots/", &format!("owner-{i}"))
                .await
                .unwrap()
        }
    }))
    .await;
    let distinct: BTreeSet<u32> = slots.iter().copied().collect();
    assert_eq!(
        distinct,
        (0..16).collect::<BTreeSet<u32>>(),
        "slots: {slots:?}"
    );
    let (kvs, _) = s.range("/slots/").await.unwrap();
    let owners: BTreeMap<String, Vec<u8>> = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    assert_eq!(owners.len(), 16);
    assert_eq!(
        owners.values().collect::<BTreeSet<_>>().len(),
        16,
        "each slot has its own owner"
    );
}

/// A watch from revision 0 replays the prefix's history in order, then continues live.
pub async fn watch_history_from_zero(s: DynStore) {
    let r1 = s.put("/h/a", b"1".to_vec()).await.unwrap();
    s.put("/other/z", b"z".to_vec()).await.unwrap();
    let r2 = s.put("/h/b", b"2".to_vec()).await.unwrap();
    let r3 = s
        .txn(vec![], vec![Op::delete("/h/a")])
        .await
        .unwrap()
        .revision;
    let mut w = s.watch("/h/", 0).await.unwrap();
    let got: Vec<WatchEvent> = vec![
        next_event(&mut w).await,
        next_event(&mut w).await,
        next_event(&mut w).await,
    ];
    let summary: Vec<_> = got.iter().map(brief).collect();
    assert_eq!(
        summary,
        vec![
            (EventKind::Put, "/h/a".into(), b"1".to_vec()),
            (EventKind::Put, "/h/b".into(), b"2".to_vec()),
            (EventKind::Delete, "/h/a".into(), vec![]),
        ]
    );
    let revs: Vec<Revision> = got.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(revs, vec![r1, r2, r3]);
    let r4 = s.put("/h/c", b"3".to_vec()).await.unwrap();
    let live = next_event(&mut w).await;
    assert_eq!(
        (brief(&live), live.kv.mod_revision),
        ((EventKind::Put, "/h/c".into(), b"3".to_vec()), r4)
    );
}

/// A live watch sees puts and deletes under its prefix, in order, and nothing else.
pub async fn watch_live_under_prefix(s: DynStore) {
    let start = s.revision().await.unwrap();
    let mut w = s.watch("/w/", start).await.unwrap();
    s.put("/w/a", b"1".to_vec()).await.unwrap();
    s.put("/x/b", b"no".to_vec()).await.unwrap();
    s.put("/wa", b"no".to_vec()).await.unwrap();
    s.txn(vec![], vec![Op::delete("/w/a"), Op::put("/x/c", "no")])
        .await
        .unwrap();
    s.put("/w/c", b"2".to_vec()).await.unwrap();
    let got = vec![
        brief(&next_event(&mut w).await),
        brief(&next_event(&mut w).await),
        brief(&next_event(&mut w).await),
    ];
    assert_eq!(
        got,
        vec![
            (EventKind::Put, "/w/a".into(), b"1".to_vec()),
            (EventKind::Delete, "/w/a".into(), vec![]),
            (EventKind::Put, "/w/c".into(), b"2".to_vec()),
        ]
    );
    no_more_events(&mut w, Duration::from_millis(300)).await;
}

/// One watch of several prefixes gives each prefix's changes after that prefix's own
/// revision, and nothing outside them.
pub async fn watch_many_each_from_its_revision(s: DynStore) {
    let r1 = s.put("/m1/a", b"old".to_vec()).await.unwrap();
    s.put("/m2/a", b"seen".to_vec()).await.unwrap();
    let r2 = s.put("/m2/b", b"seen".to_vec()).await.unwrap();
    // /m1/ is followed from after r1, so its write below (after r2) is wanted; /m2/ from
    // after r2, so its two writes up to r2 are not.
    s.put("/m1/b", b"between".to_vec()).await.unwrap();
    let mut w = s
        .watch_many(&[("/m1/".into(), r1), ("/m2/".into(), r2)])
        .await
        .unwrap();
    s.put("/m2/c", b"new".to_vec()).await.unwrap();
    s.put("/other/x", b"no".to_vec()).await.unwrap();
    s.txn(vec![], vec![Op::delete("/m1/a")]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(brief(&next_event(&mut w).await));
    }
    got.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        got,
        vec![
            (EventKind::Delete, "/m1/a".into(), vec![]),
            (EventKind::Put, "/m1/b".into(), b"between".to_vec()),
            (EventKind::Put, "/m2/c".into(), b"new".to_vec()),
        ]
    );
    no_more_events(&mut w, Duration::from_millis(300)).await;
}

/// A watch after revision r starts with the first change after r.
pub async fn watch_after_revision(s: DynStore) {
    let r1 = s.put("/wa/1", b"1".to_vec()).await.unwrap();
    let r2 = s.put("/wa/2", b"2".to_vec()).await.unwrap();
    let r3 = s.put("/wa/3", b"3".to_vec()).await.unwrap();
    let mut w = s.watch("/wa/", r1).await.unwrap();
    let a = next_event(&mut w).await;
    let b = next_event(&mut w).await;
    assert_eq!((a.kv.key.as_str(), a.kv.mod_revision), ("/wa/2", r2));
    assert_eq!((b.kv.key.as_str(), b.kv.mod_revision), ("/wa/3", r3));
    let mut w = s.watch("/wa/", r3).await.unwrap();
    no_more_events(&mut w, Duration::from_millis(300)).await;
}

/// Keys on a lease vanish after its TTL, and a watcher sees a Delete for each.
pub async fn lease_expiry(s: DynStore) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(
        vec![],
        vec![Op::Put {
            key: "/l/a".into(),
            value: b"1".to_vec(),
            lease: Some(lease),
        }],
    )
    .await
    .unwrap();
    s.put("/l/keep", b"k".to_vec()).await.unwrap();
    assert_eq!(s.get("/l/a").await.unwrap().unwrap().lease, Some(lease));
    let start = s.revision().await.unwrap();
    let mut w = s.watch("/l/", start).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(brief(&ev), (EventKind::Delete, "/l/a".into(), vec![]));
    assert!(ev.kv.mod_revision > start);
    assert_eq!(s.get("/l/a").await.unwrap(), None);
    assert!(s.get("/l/keep").await.unwrap().is_some());
    assert!(matches!(
        s.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// keep_alive pushes expiry out; once it stops, the keys go.
pub async fn lease_keep_alive(s: DynStore) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(
        vec![],
        vec![Op::Put {
            key: "/ka/a".into(),
            value: b"1".to_vec(),
            lease: Some(lease),
        }],
    )
    .await
    .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.keep_alive(lease).await.unwrap();
    }
    // 4 s have passed, twice the TTL.
    assert!(
        s.get("/ka/a").await.unwrap().is_some(),
        "kept-alive key expired"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.get("/ka/a").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "key outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Revoking deletes the lease's keys at once (watchers see it); the lease is then unusable.
pub async fn lease_revoke(s: DynStore) {
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    s.txn(
        vec![],
        vec![
            Op::Put {
                key: "/rv/a".into(),
                value: b"1".to_vec(),
                lease: Some(lease),
            },
            Op::Put {
                key: "/rv/b".into(),
                value: b"2".to_vec(),
                lease: Some(lease),
            },
        ],
    )
    .await
    .unwrap();
    let start = s.revision().await.unwrap();
    let mut w = s.watch("/rv/", start).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.get("/rv/a").await.unwrap(), None);
    assert_eq!(s.get("/rv/b").await.unwrap(), None);
    let mut keys = vec![next_event(&mut w).await, next_event(&mut w).await]
        .into_iter()
        .map(|e| {
            assert_eq!(e.kind, EventKind::Delete);
            e.kv.key
        })
        .collect::<Vec<_>>();
    keys.sort();
    assert_eq!(keys, ["/rv/a", "/rv/b"]);
    assert!(matches!(
        s.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    let put = s
        .txn(
            vec![],
            vec![Op::Put {
                key: "/rv/c".into(),
                value: b"3".to_vec(),
                lease: Some(lease),
            }],
        )
        .await;
    assert!(
        matches!(put, Err(StoreError::LeaseNotFound(_))),
        "put on revoked lease: {put:?}"
    );
    assert_eq!(s.get("/rv/c").await.unwrap(), None);
}
