//! Model-based test of the one cluster feed as the agent consumes it: any sequence of puts and
//! deletes, cut into batches at random, folded by the feed (`FeedState`) and by the fabric's
//! view (`ClusterView`) gives the same state as a fresh snapshot of the store they leave.

use std::collections::BTreeMap;
use std::time::Instant;

use ferrynet_model::fabric::Backend;
use ferrynet_model::host::{BlockClaim, HostRecord};
use ferrynet_model::network::{keys, FabricSpec, Network};
use ferrynet_store::{EventKind, KeyValue, WatchEvent};
use ipnet::IpNet;
use proptest::prelude::*;

use crate::agent::view::ClusterView;
use crate::feed::{FabricUpdate, FeedState};

/// The store: key -> (value, create revision, mod revision).
type Model = BTreeMap<String, (Vec<u8>, u64, u64)>;

#[derive(Debug, Clone)]
enum Ev {
    Put(String, Vec<u8>),
    Delete(String),
}

fn network(name: &str, pool: &str, fabric: bool) -> Ev {
    let mut n = Network::bridged(name, [pool.parse().unwrap()]);
    n.bridge = format!("fn-{name}");
    n.fabric = fabric.then_some(FabricSpec {
        backend: Backend::Vxlan,
        vni: 7,
        block_v4: 26,
        block_v6: 122,
        encrypt: false,
    });
    Ev::Put(keys::network(name), serde_json::to_vec(&n).unwrap())
}

fn host(h: u8, good: bool) -> Ev {
    let rec = HostRecord {
        name: format!("h{h}"),
        // A multicast underlay is refused.
        underlay: vec![if good {
            "192.168.1.1/24"
        } else {
            "224.0.0.9/4"
        }
        .parse()
        .unwrap()],
        underlay_mtu: 1500,
        capabilities: vec![],
        version: String::new(),
        started_at: 0,
        sleeve: None,
    };
    Ev::Put(
        keys::host(&format!("h{h}")),
        serde_json::to_vec(&rec).unwrap(),
    )
}

fn block(net: &str, b: &str, h: u8) -> Ev {
    let claim = BlockClaim {
        host: format!("h{h}"),
    };
    Ev::Put(
        keys::block(net, &b.parse::<IpNet>().unwrap()),
        serde_json::to_vec(&claim).unwrap(),
    )
}

fn endpoint(net: &str, c: u8, ip: u8) -> Ev {
    let v = serde_json::json!({
        "network": net, "containerId": format!("c{c}"), "ifname": "eth0",
        "ips": [format!("10.20.0.{ip}/26")], "host": "h0",
    });
    Ev::Put(
        keys::endpoint(net, &format!("c{c}"), "eth0"),
        serde_json::to_vec(&v).unwrap(),
    )
}

fn event() -> impl Strategy<Value = Ev> {
    let net = prop_oneof![Just("blue"), Just("green")];
    // Blocks inside blue's pool, inside green's, and outside both.
    let blk = prop_oneof![
        Just("10.20.0.0/26"),
        Just("10.20.0.64/26"),
        Just("10.30.0.0/26"),
        Just("0.0.0.0/0")
    ];
    prop_oneof![
        2 => (net.clone(), prop_oneof![Just("10.20.0.0/16"), Just("10.30.0.0/16")], any::<bool>())
            .prop_map(|(n, pool, f)| network(n, pool, f)),
        1 => net.clone().prop_map(|n| Ev::Delete(keys::network(n))),
        1 => net.clone().prop_map(|n| Ev::Put(keys::network(n), b"{\"name\":1}".to_vec())),
        2 => (0u8..4, any::<bool>()).prop_map(|(h, good)| host(h, good)),
        1 => (0u8..4).prop_map(|h| Ev::Delete(keys::host(&format!("h{h}")))),
        3 => (net.clone(), blk.clone(), 0u8..5).prop_map(|(n, b, h)| block(n, b, h)),
        1 => (net.clone(), blk).prop_map(|(n, b)| Ev::Delete(keys::block(n, &b.parse().unwrap()))),
        2 => (net.clone(), 0u8..4, 1u8..6).prop_map(|(n, c, ip)| endpoint(n, c, ip)),
        1 => (net, 0u8..4).prop_map(|(n, c)| Ev::Delete(keys::endpoint(n, &format!("c{c}"), "eth0"))),
        // Keys the feed does not follow are never seen (the watch is per prefix).
    ]
}

/// Apply `ev` to the store at the next revision; the watch event it makes, if any.
fn commit(store: &mut Model, rev: &mut u64, ev: &Ev) -> Option<WatchEvent> {
    *rev += 1;
    let (kind, kv) = match ev {
        Ev::Put(k, v) => {
            let created = store.get(k).map_or(*rev, |e| e.1);
            store.insert(k.clone(), (v.clone(), created, *rev));
            (EventKind::Put, kv(k, v, created, *rev))
        }
        Ev::Delete(k) => {
            store.remove(k)?;
            (EventKind::Delete, kv(k, &[], 0, *rev))
        }
    };
    Some(WatchEvent { kind, kv })
}

fn kv(key: &str, value: &[u8], create_revision: u64, mod_revision: u64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
        lease: None,
    }
}

/// A fresh read of `store` at `rev`, the way the feed reads it (prefix by prefix).
fn snapshot(store: &Model, rev: u64) -> (FeedState, Vec<KeyValue>) {
    let mut state = FeedState::default();
    for prefix in ferrynet_model::discovery::prefixes() {
        let page = store
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, (v, c, m))| kv(k, v, *c, *m))
            .collect();
        state.snapshot_page(page);
    }
    let FabricUpdate::Reset(kvs) = state.finish(rev) else {
        unreachable!("finish makes a reset")
    };
    (state, kvs)
}

/// What the reconciler reads of a view, departed hosts aside (a fresh view has none by
/// design): claims count only where they fit their network's pool.
#[derive(Debug, PartialEq)]
struct Seen {
    networks: BTreeMap<String, Network>,
    hosts: BTreeMap<String, HostRecord>,
    blocks: BTreeMap<String, BTreeMap<IpNet, String>>,
    rejected: BTreeMap<String, String>,
}

fn seen(v: &ClusterView) -> Seen {
    let blocks = v
        .networks
        .keys()
        .map(|n| {
            let fit = v.blocks.get(n).into_iter().flatten();
            let fit = fit.filter(|(b, _)| v.block_fits(n, b));
            (n.clone(), fit.map(|(b, h)| (*b, h.clone())).collect())
        })
        .collect();
    Seen {
        networks: v.networks.clone(),
        hosts: v.hosts.clone(),
        blocks,
        rejected: v.rejected.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn feed_incremental_equals_snapshot(
        start in proptest::collection::vec(event(), 0..20),
        events in proptest::collection::vec((event(), any::<bool>()), 0..60),
    ) {
        let mut store = Model::new();
        let mut rev = 0;
        for ev in &start {
            commit(&mut store, &mut rev, ev);
        }
        let now = Instant::now();
        let (mut state, kvs) = snapshot(&store, rev);
        let mut cluster = ClusterView::default();
        cluster.reset(&kvs, now);
        // The events, cut into batches where the flag says (a busy consumer takes several).
        let mut batch = Vec::new();
        let fold = |state: &mut FeedState, cluster: &mut ClusterView, batch: Vec<WatchEvent>| {
            if let Some(FabricUpdate::Events(evs)) = state.apply(batch) {
                for ev in &evs {
                    prop_assert!(crate::feed::is_fabric_key(&ev.kv.key));
                    cluster.apply(ev, now);
                }
            }
            Ok(())
        };
        for (ev, cut) in &events {
            batch.extend(commit(&mut store, &mut rev, ev));
            if *cut {
                fold(&mut state, &mut cluster, std::mem::take(&mut batch))?;
            }
        }
        fold(&mut state, &mut cluster, batch)?;
        let (fresh, fresh_kvs) = snapshot(&store, rev);
        let mut fresh_cluster = ClusterView::default();
        fresh_cluster.reset(&fresh_kvs, now);
        // A delete made no watch event when the key was absent; the revision is the last one.
        let mut view = state.view.clone();
        view.revision = rev;
        prop_assert_eq!(&view, &fresh.view);
        prop_assert_eq!(seen(&cluster), seen(&fresh_cluster));
        // Departed hosts are the ones seen live that are gone now.
        for h in cluster.departed.keys() {
            prop_assert!(!cluster.hosts.contains_key(h));
        }
        // An owner unknown to the incremental view is unknown to a fresh one too; the fresh
        // one also does not know the departed.
        let fresh_unknown = fresh_cluster.unknown_owners();
        for h in cluster.unknown_owners() {
            prop_assert!(fresh_unknown.contains(&h), "{} unknown only incrementally", h);
        }
        for h in &fresh_unknown {
            prop_assert!(cluster.unknown_owners().contains(h) || cluster.departed.contains_key(h));
        }
    }
}
