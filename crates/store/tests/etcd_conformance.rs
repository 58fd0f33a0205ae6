//! The shared store conformance suite, plus etcd-only behaviour, against EtcdStore on a real
//! etcd (Debian's `etcd-server`), started per test on loopback by `testing::EtcdServer`.
//!
//! A missing etcd binary fails these tests (it never skips them): the error names the package.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrynet_store::conformance::{self, DynStore};
use ferrynet_store::testing::{EtcdServer, EtcdServerOptions};
use ferrynet_store::{
    open, EtcdConfig, EtcdStore, EventKind, Op, Store, StoreConfig, StoreError, WatchEvent,
};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

fn start() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("cannot start a test etcd: {e}"))
}

/// A client for `server` with a short timeout, so failure tests finish quickly.
async fn client(server: &EtcdServer, timeout: Duration) -> EtcdStore {
    let mut cfg = EtcdConfig::new([server.endpoint.clone()]);
    cfg.timeout = timeout;
    EtcdStore::connect(&cfg).await.unwrap()
}

/// "A fresh store" on one etcd: every key deleted. Checks only use revisions relative to what
/// they read and prefixes of their own, so history left by earlier checks does not matter.
fn wiping_factory(store: DynStore) -> impl Fn() -> futures::future::BoxFuture<'static, DynStore> {
    move || {
        let store = store.clone();
        async move {
            store
                .txn(vec![], vec![Op::DeletePrefix(String::new())])
                .await
                .expect("wiping etcd between checks");
            assert!(store.range("").await.unwrap().0.is_empty());
            store
        }
        .boxed()
    }
}

async fn next(w: &mut BoxStream<'static, ferrynet_store::Result<WatchEvent>>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no watch event within 10 s")
        .expect("watch stream ended")
        .expect("watch error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let server = start();
    // Through the public store selection, as the binary does it.
    let store = open(&server.url.parse::<StoreConfig>().unwrap())
        .await
        .unwrap();
    conformance::run_all(wiping_factory(store)).await;
}

/// The racing and live-watch checks on a single-threaded runtime (how CNI invocations run).
#[tokio::test(flavor = "current_thread")]
async fn conformance_concurrency_on_current_thread() {
    let server = start();
    let store: DynStore = Arc::new(server.connect().await.unwrap());
    let fresh = wiping_factory(store);
    for (name, check) in conformance::checks() {
        if name.starts_with("concurrent_") || name.starts_with("watch_") {
            conformance::run_one(name, check, fresh().await).await;
        }
    }
}

#[tokio::test]
async fn stopped_etcd_is_unavailable_promptly_and_named() {
    let mut server = start();
    let timeout = Duration::from_secs(3);
    let store = client(&server, timeout).await;
    let rev = store.put("/u/a", b"1".to_vec()).await.unwrap();
    let mut w = store.watch("/u/", rev).await.unwrap();
    server.kill();

    for op in ["put", "get", "txn", "watch", "grant"] {
        let started = Instant::now();
        let res = match op {
            "put" => store.put("/u/b", b"2".to_vec()).await.map(drop),
            "get" => store.get("/u/a").await.map(drop),
            "txn" => store.txn(vec![], vec![Op::delete("/u/a")]).await.map(drop),
            "watch" => store.watch("/u/", 0).await.map(drop),
            _ => store.grant_lease(Duration::from_secs(5)).await.map(drop),
        };
        let took = started.elapsed();
        match res {
            Err(StoreError::Unavailable(msg)) => {
                eprintln!("{op} after etcd died: {msg}");
                assert!(msg.contains(&server.endpoint), "{op}: {msg}");
                // The first request may still meet the dying connection ("broken pipe");
                // from then on the reconnect is refused, and the message says so.
                if op != "put" {
                    assert!(msg.contains("refused"), "{op}: {msg}");
                }
            }
            other => panic!("{op}: expected Unavailable, got {other:?}"),
        }
        // Refused connections fail at once; the bound only proves there is no hang (slack for
        // a loaded CI machine).
        assert!(
            took < timeout + Duration::from_secs(2),
            "{op} took {took:?}"
        );
    }
    // The open watch reports the broken stream instead of going silent.
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Err(StoreError::Unavailable(msg)))) => {
            eprintln!("open watch after etcd died: {msg}");
            assert!(msg.contains(&server.endpoint), "{msg}")
        }
        other => panic!("expected a watch error, got {other:?}"),
    }
}

/// A member that crashes and comes back: the watch reports the break, then resumes after the
/// last change it delivered, losing none written meanwhile and repeating none.
#[tokio::test]
async fn watch_resumes_after_etcd_restart_without_loss_or_repeats() {
    let mut server = start();
    let store = client(&server, Duration::from_secs(2)).await;
    let r0 = store.revision().await.unwrap();
    let mut w = store.watch("/rs/", r0).await.unwrap();
    store.put("/rs/a", b"1".to_vec()).await.unwrap();
    assert_eq!(next(&mut w).await.kv.key, "/rs/a");

    server.restart().unwrap();
    // Written as soon as etcd answers again, likely before the watcher is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rb = loop {
        match store.put("/rs/b", b"2".to_vec()).await {
            Ok(rev) => break rev,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("etcd did not come back: {e}"),
        }
    };
    let rc = store.put("/rs/c", b"3".to_vec()).await.unwrap();

    let (mut got, mut errors) = (Vec::new(), 0);
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), w.next()).await {
            Ok(Some(Ok(ev))) => got.push((ev.kv.key, ev.kv.mod_revision)),
            Ok(Some(Err(StoreError::Unavailable(_)))) => errors += 1,
            other => panic!("unexpected watch item: {other:?}"),
        }
    }
    assert_eq!(got, [("/rs/b".to_string(), rb), ("/rs/c".to_string(), rc)]);
    assert!(errors >= 1, "the break was not reported");
    let more = tokio::time::timeout(Duration::from_millis(500), w.next()).await;
    assert!(more.is_err(), "unexpected watch item: {more:?}");
}

/// Something accepts TCP on the endpoint but never answers: the timeout, not a hang.
#[tokio::test]
async fn silent_endpoint_times_out_as_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let mut cfg = EtcdConfig::new([endpoint.clone()]);
    cfg.timeout = Duration::from_secs(1);
    let store = EtcdStore::connect(&cfg).await.unwrap();
    let started = Instant::now();
    match store.get("/k").await {
        Err(StoreError::Unavailable(msg)) => {
            eprintln!("silent endpoint: {msg}");
            assert!(msg.contains("no answer within 1s"), "{msg}");
            assert!(msg.contains(&format!("{endpoint} accepts TCP")), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn watch_into_compacted_history_fails_as_compacted() {
    let server = start();
    let store = server.connect().await.unwrap();
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(store.put(&format!("/c/{i}"), vec![]).await.unwrap());
    }
    let mut raw = etcd_client::Client::connect([server.endpoint.as_str()], None)
        .await
        .unwrap();
    raw.compact(revs[3] as i64, None).await.unwrap();

    let mut w = store.watch("/c/", revs[0]).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Err(StoreError::Compacted {
            requested,
            compacted,
        }))) => assert_eq!((requested, compacted), (revs[0] + 1, revs[3])),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "a compacted watch ends");

    // History from the compaction revision on is still there.
    let mut w = store.watch("/c/", revs[3] - 1).await.unwrap();
    let ev = next(&mut w).await;
    assert_eq!(
        (ev.kind, ev.kv.key.as_str(), ev.kv.mod_revision),
        (EventKind::Put, "/c/3", revs[3])
    );
}

#[tokio::test]
async fn lease_errors_name_the_missing_lease() {
    let server = start();
    let store = server.connect().await.unwrap();
    assert!(matches!(
        store.keep_alive(0x7eed).await,
        Err(StoreError::LeaseNotFound(0x7eed))
    ));
    assert!(matches!(
        store.revoke_lease(0x7eed).await,
        Err(StoreError::LeaseNotFound(0x7eed))
    ));
    let live = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let dead = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store.revoke_lease(dead).await.unwrap();
    let put = |k: &str, lease| Op::Put {
        key: k.into(),
        value: vec![],
        lease: Some(lease),
    };
    let before = store.revision().await.unwrap();
    let res = store
        .txn(vec![], vec![put("/le/a", live), put("/le/b", dead)])
        .await;
    assert!(
        matches!(res, Err(StoreError::LeaseNotFound(id)) if id == dead),
        "{res:?}"
    );
    assert_eq!(store.revision().await.unwrap(), before, "nothing applied");
    // A put moves a key between leases, as in etcd; revoking the old lease leaves it.
    let other = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store.txn(vec![], vec![put("/le/m", live)]).await.unwrap();
    store.txn(vec![], vec![put("/le/m", other)]).await.unwrap();
    store.revoke_lease(live).await.unwrap();
    assert_eq!(
        store.get("/le/m").await.unwrap().unwrap().lease,
        Some(other)
    );
    // Sub-second TTLs round up to what etcd can do instead of failing.
    let short = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    store.keep_alive(short).await.unwrap();
}

#[tokio::test]
async fn paged_range_is_complete_and_at_one_revision() {
    let server = start();
    let store = server.connect().await.unwrap().with_range_page(3);
    let keys: Vec<String> = (0..10).map(|i| format!("/pg/{i:02}")).collect();
    let ops = keys.iter().map(|k| Op::put(k, k.as_bytes())).collect();
    store.txn(vec![], ops).await.unwrap();
    // Neighbours that must not leak in: just past the prefix, and a key that sorts inside it.
    store.put("/pg0", b"x".to_vec()).await.unwrap();
    store.put("/pf/z", b"x".to_vec()).await.unwrap();
    store.put("/pg/05\0x", b"inner".to_vec()).await.unwrap();
    let rev = store.revision().await.unwrap();
    let (kvs, at) = store.range("/pg/").await.unwrap();
    let mut want = keys.clone();
    want.insert(6, "/pg/05\0x".into());
    assert_eq!(
        kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(at, rev);
}

#[tokio::test]
async fn delete_reports_existence_in_one_request() {
    let server = start();
    let store = server.connect().await.unwrap();
    store.put("/d", b"x".to_vec()).await.unwrap();
    let before = store.revision().await.unwrap();
    assert!(store.delete("/d").await.unwrap());
    assert_eq!(store.revision().await.unwrap(), before + 1);
    assert!(!store.delete("/d").await.unwrap());
    assert_eq!(store.revision().await.unwrap(), before + 1);
}

#[tokio::test]
async fn tls_with_client_certificate() {
    let server = EtcdServer::start_tls().unwrap_or_else(|e| panic!("cannot start a TLS etcd: {e}"));
    assert!(
        server.url.starts_with("etcds://127.0.0.1:"),
        "{}",
        server.url
    );
    let store = open(&server.config()).await.unwrap();
    for (name, check) in conformance::checks() {
        if matches!(
            name,
            "put_get_revisions" | "compare_variants" | "watch_history_from_zero" | "lease_revoke"
        ) {
            conformance::run_one(name, check, store.clone()).await;
        }
    }

    let tls = server.tls.clone().unwrap();
    let base = match server.config() {
        StoreConfig::Etcd(c) => EtcdConfig {
            timeout: Duration::from_secs(1),
            ..c
        },
        other => panic!("{other:?}"),
    };
    // Plain gRPC to a TLS port, no client certificate, and a CA that did not sign the server:
    // each fails as Unavailable within the timeout.
    let plain = EtcdConfig {
        tls: false,
        ca: None,
        cert: None,
        key: None,
        ..base.clone()
    };
    let no_cert = EtcdConfig {
        cert: None,
        key: None,
        ..base.clone()
    };
    let wrong_ca = EtcdConfig {
        ca: Some(tls.client_cert.clone()),
        ..base.clone()
    };
    for (what, cfg) in [
        ("plain", plain),
        ("no client cert", no_cert),
        ("wrong CA", wrong_ca),
    ] {
        let started = Instant::now();
        let store = EtcdStore::connect(&cfg).await.unwrap();
        match store.get("/k").await {
            Err(StoreError::Unavailable(msg)) => {
                eprintln!("TLS {what}: {msg}");
                assert!(msg.contains(&server.endpoint), "{what}: {msg}")
            }
            other => panic!("{what}: expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
    }
    // A missing certificate file fails at connect, naming the file.
    let missing = EtcdConfig {
        ca: Some("/nonexistent/ca.pem".into()),
        ..base
    };
    match EtcdStore::connect(&missing).await {
        Err(StoreError::Io(msg)) => assert!(msg.contains("/nonexistent/ca.pem"), "{msg}"),
        other => panic!("expected Io, got {other:?}"),
    }
}

/// A lab test can put etcd on an address of its own (here another loopback address), TLS
/// included: the server certificate names that address.
#[tokio::test]
async fn server_on_another_local_address_with_tls() {
    let server = EtcdServer::start_with(&EtcdServerOptions {
        tls: true,
        listen: "127.0.0.2".parse().unwrap(),
        ..EtcdServerOptions::default()
    })
    .unwrap_or_else(|e| panic!("cannot start a TLS etcd on 127.0.0.2: {e}"));
    assert!(
        server.endpoint.starts_with("127.0.0.2:"),
        "{}",
        server.endpoint
    );
    assert!(
        server.url.starts_with("etcds://127.0.0.2:"),
        "{}",
        server.url
    );
    let store = server.connect().await.unwrap();
    let rev = store.put("/addr", b"v".to_vec()).await.unwrap();
    assert_eq!(store.get("/addr").await.unwrap().unwrap().mod_revision, rev);
}

#[test]
fn missing_etcd_binary_is_an_error_naming_the_package() {
    let err = EtcdServer::start_with(&EtcdServerOptions {
        binary: "/nonexistent/etcd".into(),
        ..EtcdServerOptions::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("etcd-server"), "{err}");
}

#[test]
fn server_is_killed_and_removed_on_drop_even_on_panic() {
    let (pid, dir) = {
        let server = start();
        (server.pid(), server.dir().to_path_buf())
    };
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd {pid} still running"
    );
    let seen = std::sync::Mutex::new(None);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let server = start();
        *seen.lock().unwrap() = Some((server.pid(), server.dir().to_path_buf()));
        panic!("test failure while etcd runs");
    }));
    assert!(res.is_err());
    let (pid, dir) = seen.lock().unwrap().clone().unwrap();
    assert!(!dir.exists());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
