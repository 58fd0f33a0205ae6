//! Many processes on one store file: the proof that the flock protocol loses no write.
//!
//! The parent test re-runs this test binary as children (selected by an env var); each child
//! claims slots with compare-and-swap, and the parent checks the result.

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
    let (path, writer) = spec.rsplit_once(',').expect("path,writer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(path).unwrap();
        for seq in 0..CLAIMS {
            claim_lowest_slot(&store, PREFIX, &format!("{writer}:{seq}"))
                .await
                .unwrap();
        }
    });
}

#[test]
fn multi_process_slot_allocation() {
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
            .args([
                "--exact",
                "multi_process_slot_allocation",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{},w{w}", path.display()))
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
