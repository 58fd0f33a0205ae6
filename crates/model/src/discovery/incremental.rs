//! Model-based test of the one cluster feed: any sequence of puts and deletes applied to a
//! view one event at a time gives the same view as a fresh snapshot of the store they leave.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::DiscoveryView;
use crate::network::{keys, Network};
use crate::policy::document::keys as pkeys;

/// A stored value: what the key holds and the revision that created it.
type Model = BTreeMap<String, (Vec<u8>, u64)>;

#[derive(Debug, Clone)]
enum Ev {
    Put(String, Vec<u8>),
    Delete(String),
}

fn endpoint(net: &str, cid: u8, host: u8, ip: u8, app: u8, extra: bool) -> Ev {
    let mut labels = serde_json::json!({ "app": format!("a{app}") });
    if extra {
        labels["tier"] = serde_json::json!("x");
    }
    let v = serde_json::json!({
        "network": net, "containerId": format!("c{cid}"), "ifname": "eth0",
        // Few addresses for many records: two endpoints claiming one address is covered.
        "ips": [format!("10.0.0.{ip}/24")], "host": format!("h{host}"), "labels": labels,
    });
    Ev::Put(
        keys::endpoint(net, &format!("c{cid}"), "eth0"),
        serde_json::to_vec(&v).unwrap(),
    )
}

fn event() -> impl Strategy<Value = Ev> {
    let net = prop_oneof![Just("blue"), Just("green")];
    prop_oneof![
        6 => (net.clone(), 0u8..12, 0u8..3, 1u8..6, 0u8..3, any::<bool>())
            .prop_map(|(n, c, h, ip, app, x)| endpoint(n, c, h, ip, app, x)),
        2 => (net.clone(), 0u8..12).prop_map(|(n, c)| Ev::Delete(keys::endpoint(n, &format!("c{c}"), "eth0"))),
        // A record that fails its checks reads as absent.
        1 => (net.clone(), 0u8..12).prop_map(|(n, c)| Ev::Put(keys::endpoint(n, &format!("c{c}"), "eth0"), b"{\"network\":1}".to_vec())),
        1 => (net.clone(), any::<bool>()).prop_map(|(n, deny)| {
            let mut nw = Network::bridged(n, ["10.0.0.0/24".parse().unwrap()]);
            nw.default_deny = deny;
            Ev::Put(keys::network(n), serde_json::to_vec(&nw).unwrap())
        }),
        1 => net.prop_map(|n| Ev::Delete(keys::network(n))),
        1 => (0u8..3, 0u8..3).prop_map(|(p, app)| {
            let v = serde_json::json!({"name": format!("p{p}"), "selector": format!("app=a{app}"),
                "ingress": [{"from": [{"selector": "app=a0"}]}]});
            Ev::Put(pkeys::policy(&format!("p{p}")), serde_json::to_vec(&v).unwrap())
        }),
        1 => (0u8..3).prop_map(|p| Ev::Delete(pkeys::policy(&format!("p{p}")))),
        1 => (0u8..3).prop_map(|h| Ev::Put(keys::host(&format!("h{h}")), b"{}".to_vec())),
        1 => (0u8..3).prop_map(|h| Ev::Delete(keys::host(&format!("h{h}")))),
    ]
}

/// A fresh view of `store` (a snapshot, in key order, with create revisions).
fn snapshot(store: &Model, revision: u64) -> DiscoveryView {
    let mut v = DiscoveryView::default();
    v.reset(std::iter::empty(), revision);
    for (k, (val, created)) in store {
        v.put_created(k, val, *created);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn incremental_equals_snapshot(start in proptest::collection::vec(event(), 0..20),
                                   events in proptest::collection::vec(event(), 0..60)) {
        let mut store = Model::new();
        let mut rev = 0;
        let apply = |store: &mut Model, ev: &Ev, rev: &mut u64| {
            *rev += 1;
            match ev {
                Ev::Put(k, v) => {
                    let created = store.get(k).map_or(*rev, |(_, c)| *c);
                    store.insert(k.clone(), (v.clone(), created));
                }
                Ev::Delete(k) => {
                    store.remove(k);
                }
            }
        };
        for ev in &start {
            apply(&mut store, ev, &mut rev);
        }
        // The feed: a snapshot, then the events one at a time (each published view is a clone
        // that shares the maps; the older ones must not change under their readers).
        let mut view = snapshot(&store, rev);
        let mut published = Vec::new();
        for ev in &events {
            apply(&mut store, ev, &mut rev);
            let created = match ev {
                Ev::Put(k, _) => store[k].1,
                Ev::Delete(_) => 0,
            };
            match ev {
                Ev::Put(k, v) => view.put_created(k, v, created),
                Ev::Delete(k) => view.delete(k),
            }
            view.revision = rev;
            published.push((view.clone(), snapshot(&store, rev)));
        }
        prop_assert_eq!(&view, &snapshot(&store, rev));
        for (old, fresh) in &published {
            prop_assert_eq!(old, fresh);
        }
        // Every address is found at the lowest id holding it, as a fresh index would say.
        for e in view.endpoints.iter() {
            for a in &e.addrs {
                let owner = view.endpoints.iter().filter(|o| o.addrs.contains(a)).map(|o| o.id.clone()).min();
                prop_assert_eq!(view.endpoints.by_ip(*a).map(|o| o.id.clone()), owner);
            }
        }
    }
}
