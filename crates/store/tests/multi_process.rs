//! Many processes on one store file: the proof that the flock protocol loses no write.
//!
//! The parent test re-runs this test binary as children (selected by an env var); each child
//! claims slots with compare-and-swap, and the parent checks the result. In the second test
//! some children keep the store open between operations (as the agent and the Docker plugin
//! do) and must hand it over to the others, and to each other, every time they ask.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};

use ferrynet_store::conformance::claim_lowest_slot;
use ferrynet_store::{EmbeddedStore, Store};

const CHILD_ENV: &str = "FERRYNET_STORE_MP_CHILD";
const WRITERS: usize = 8;
const CLAIMS: usize = 50;
const PREFIX: &str = "/mp/slots/";

/// Kills and reaps children still running when the test fails.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn child(spec: &str) {
    let (spec, hold) = spec.rsplit_once(',').expect("path,writer,hold");
    let (path, writer) = spec.rsplit_once(',').expect("path,writer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(path).unwrap();
        if hold == "hold" {
            store.keep_open().unwrap();
        }
        for seq in 0..CLAIMS {
            claim_lowest_slot(&store, PREFIX, &format!("{writer}:{seq}"))
                .await
                .unwrap();
        }
    });
}

#[test]
fn multi_process_slot_allocation() {
    run_writers("multi_process_slot_allocation", 0);
}

/// Three of the eight writers keep the store open: nobody waits past the lock timeout (a
/// holder that never handed over would fail the others with "locked by another process").
#[test]
fn multi_process_slot_allocation_with_holders() {
    run_writers("multi_process_slot_allocation_with_holders", 3);
}

/// Run [`WRITERS`] children (the first `holders` of them keeping the store open), then check
/// that every claim landed exactly once.
fn run_writers(test: &str, holders: usize) {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    EmbeddedStore::open(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    for w in 0..WRITERS {
        let c = Command::new(&exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!(
                    "{},w{w},{}",
                    path.display(),
                    if w < holders { "hold" } else { "per-call" }
                ),
            )
            .spawn()
            .unwrap();
        children.0.push(c);
    }
    for c in &mut children.0 {
        let status = c.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(&path).unwrap();
        let (kvs, rev) = store.range(PREFIX).await.unwrap();
        let total = WRITERS * CLAIMS;
        // Every successful claim is exactly one revision; failed CAS attempts write nothing.
        assert_eq!(rev, total as u64);
        assert_eq!(kvs.len(), total);
        let slots: BTreeSet<usize> = kvs
            .iter()
            .map(|kv| kv.key[PREFIX.len()..].parse().unwrap())
            .collect();
        assert_eq!(
            slots,
            (0..total).collect::<BTreeSet<_>>(),
            "slots are dense and distinct"
        );
        let owners: BTreeSet<&[u8]> = kvs.iter().map(|kv| kv.value.as_slice()).collect();
        assert_eq!(owners.len(), total, "no claim was recorded twice or lost");
        let mut per_writer: BTreeMap<String, usize> = BTreeMap::new();
        for kv in &kvs {
            let owner = String::from_utf8(kv.value.clone()).unwrap();
            *per_writer
                .entry(owner.split(':').next().unwrap().to_string())
                .or_default() += 1;
            assert_eq!(
                kv.create_revision, kv.mod_revision,
                "a slot was overwritten"
            );
        }
        assert_eq!(per_writer.len(), WRITERS);
        assert!(per_writer.values().all(|&n| n == CLAIMS), "{per_writer:?}");
        let revs: BTreeSet<u64> = kvs.iter().map(|kv| kv.mod_revision).collect();
        assert_eq!(revs, (1..=total as u64).collect::<BTreeSet<_>>());
    });
}

const HOLDER_ENV: &str = "FERRYNET_STORE_MP_HOLDER";
const DEFER_ENV: &str = "FERRYNET_STORE_MP_DEFER";

/// A holder killed with SIGKILL while it keeps the store open (mid-write, or between writes)
/// leaves a store that the next process opens, repairs and reads in full: every write the
/// holder reported is there.
#[test]
fn a_killed_holder_leaves_a_usable_store() {
    killed_holder("a_killed_holder_leaves_a_usable_store", false);
}

/// The same with every write's durability deferred and then synced (`deferring_durability`
/// then `Store::sync`, as the Docker plugin does before `Join` answers): every write reported
/// after its sync survives the kill. With a `sync` that syncs nothing, the last writes before
/// the kill are rolled back by the repair and this fails.
#[test]
fn a_killed_holder_keeps_every_synced_deferred_write() {
    killed_holder("a_killed_holder_keeps_every_synced_deferred_write", true);
}

fn killed_holder(test: &str, defer: bool) {
    if let Ok(path) = std::env::var(HOLDER_ENV) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let defer = std::env::var_os(DEFER_ENV).is_some();
        rt.block_on(async {
            let store = EmbeddedStore::open(&path).unwrap();
            store.keep_open().unwrap();
            for i in 0u64.. {
                let key = format!("/held/{i:08}");
                let put = store.put(&key, i.to_string().into_bytes());
                if defer {
                    ferrynet_store::deferring_durability(put).await.unwrap();
                    store.sync().await.unwrap();
                } else {
                    put.await.unwrap();
                }
                // Reported durable: the parent counts these lines.
                println!("wrote {i}");
            }
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    EmbeddedStore::open(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    let mut cmd = Command::new(&exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, &path)
        .stdout(std::process::Stdio::piped());
    if defer {
        cmd.env(DEFER_ENV, "1");
    }
    let mut holder = cmd.spawn().unwrap();
    let out = holder.stdout.take().unwrap();
    children.0.push(holder);
    let mut reported = 0u64;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    while reported < 50 {
        let line = lines.next().expect("the holder ended early").unwrap();
        if let Some(n) = line.strip_prefix("wrote ") {
            reported = n.parse::<u64>().unwrap() + 1;
        }
    }
    let c = &mut children.0[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.wait().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(&path).unwrap();
        let (kvs, rev) = store.range("/held/").await.unwrap();
        assert!(
            kvs.len() as u64 >= reported,
            "{} keys, {reported} reported",
            kvs.len()
        );
        assert_eq!(rev, kvs.len() as u64, "one revision per write, none torn");
        for (i, kv) in kvs.iter().enumerate() {
            assert_eq!(kv.key, format!("/held/{i:08}"));
        }
        store.put("/after", b"x".to_vec()).await.unwrap();
    });
}
