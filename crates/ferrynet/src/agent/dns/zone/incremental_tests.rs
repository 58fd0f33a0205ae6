//! Model-based test of the incremental zone: any sequence of endpoint, network, service,
//! producer, health and host changes, cut into batches at random and applied through one
//! [`ZoneBuilder`], answers exactly what a full compile of the final view answers. The full
//! compile here is the zone's original per-view code, kept as the reference.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::{keys as nkeys, Endpoint, Network};
use ferrynet_model::pod::PodIdentity;
use ferrynet_model::portmap::Protocol;
use ferrynet_model::service::{
    keys as skeys, CheckKind, HealthCheck, HealthRecord, Producer, Service, ServicePort,
};
use proptest::prelude::*;

use super::{label, push_unique, Task, Zone, ZoneBuilder};

/// One network's answers, flattened for comparison.
#[derive(Debug, Clone, Default, PartialEq)]
struct Flat {
    name: String,
    names: BTreeMap<String, Vec<IpAddr>>,
    ptr: BTreeMap<IpAddr, String>,
    pods: BTreeSet<String>,
    tasks: BTreeMap<String, Vec<Task>>,
    srv: BTreeMap<String, Vec<(String, u16)>>,
    subnets: Vec<ipnet::IpNet>,
    internal: bool,
}

/// What `zone` answers, per network.
fn flatten(zone: &Zone) -> BTreeMap<String, Flat> {
    let mut out = BTreeMap::new();
    for (key, net) in &zone.nets {
        let mut f = Flat {
            name: net.name.clone(),
            subnets: net.subnets.clone(),
            internal: net.internal,
            pods: net.eps.all_pods(),
            tasks: net.svc.tasks.clone().into_iter().collect(),
            srv: net.svc.srv.clone().into_iter().collect(),
            ..Flat::default()
        };
        for n in net.eps.all_names().iter().chain(net.svc.names.keys()) {
            if let Some(a) = net.addrs(n) {
                f.names.insert(n.clone(), a.to_vec());
            }
        }
        for ip in net.eps.all_ptrs().iter().chain(net.svc.ptr.keys()) {
            if let Some(n) = net.ptr(ip) {
                f.ptr.insert(*ip, n.to_string());
            }
        }
        out.insert(key.clone(), f);
    }
    out
}

/// The zone's original compile: every network, every endpoint, every service, from scratch.
fn reference(view: &DiscoveryView) -> BTreeMap<String, Flat> {
    let mut nets = BTreeMap::new();
    for (name, net) in &view.networks {
        if !net.mode.gives_interfaces() {
            continue;
        }
        let mut z = Flat {
            name: name.to_ascii_lowercase(),
            subnets: net.subnets.iter().map(|s| s.cidr).collect(),
            internal: net.internal,
            ..Flat::default()
        };
        for ep in view.endpoints_on(name) {
            let primary = ep.name.as_deref().map(str::to_ascii_lowercase);
            let aliases = ep.aliases.iter().map(|a| a.to_ascii_lowercase());
            for n in primary.clone().into_iter().chain(aliases) {
                let e = z.names.entry(n).or_default();
                for a in &ep.addrs {
                    push_unique(e, *a);
                }
            }
            if let Some(p) = &primary {
                for a in &ep.addrs {
                    z.ptr.insert(*a, p.clone());
                }
            }
        }
        for (pname, pep) in view.pods_on(name) {
            for a in &pep.addrs {
                z.ptr.insert(*a, pname.clone());
            }
            z.names.insert(pname.clone(), pep.addrs.clone());
            z.pods.insert(pname);
        }
        for svc in view.services_on(name) {
            let sname = svc.name.to_ascii_lowercase();
            let healthy = view.healthy_producers(&svc.name);
            let tasks: Vec<Task> = healthy
                .iter()
                .map(|p| Task {
                    label: label(&p.id),
                    addrs: p.addrs.clone(),
                })
                .collect();
            let addrs = if svc.vips.is_empty() {
                let mut v = Vec::new();
                for t in &tasks {
                    for a in &t.addrs {
                        push_unique(&mut v, *a);
                    }
                }
                v
            } else {
                svc.vips.clone()
            };
            for v in &svc.vips {
                z.ptr.insert(*v, sname.clone());
            }
            for port in &svc.ports {
                let key = format!("_{}._{}.{sname}", label(&port.name), port.protocol.as_str());
                let targets = healthy
                    .iter()
                    .map(|p| (label(&p.id), p.target_port(port.port)))
                    .collect();
                z.srv.insert(key, targets);
            }
            z.names.insert(sname.clone(), addrs);
            z.tasks.insert(sname, tasks);
        }
        nets.insert(name.clone(), z);
    }
    nets
}

#[derive(Debug, Clone)]
enum Ev {
    Put(String, Vec<u8>, u64),
    Delete(String),
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

const NETS: [&str; 3] = ["blue", "green", "Red"];
const NAMES: [&str; 4] = ["web", "db", "Web", "api"];

fn addr(i: u8) -> ipnet::IpNet {
    // A small pool, so names and addresses collide across endpoints and networks.
    if i % 5 == 4 {
        format!("fd00::{}/64", i % 3 + 2).parse().unwrap()
    } else {
        format!("10.0.0.{}/16", i % 4 + 2).parse().unwrap()
    }
}

fn endpoint() -> impl Strategy<Value = Ev> {
    (
        0..NETS.len(),
        0u8..5,
        proptest::option::of(0..NAMES.len()),
        proptest::collection::vec(0..NAMES.len(), 0..2),
        proptest::collection::vec(0u8..10, 0..3),
        proptest::option::of((0u8..2, 0u8..2)),
        1u64..6,
    )
        .prop_map(|(n, c, name, aliases, addrs, pod, created)| {
            let net = NETS[n];
            let id = format!("c{c}");
            let ep = Endpoint {
                ips: addrs.into_iter().map(addr).collect(),
                name: name.map(|i| NAMES[i].to_string()),
                aliases: aliases.into_iter().map(|i| NAMES[i].to_string()).collect(),
                pod: pod.map(|(p, ns)| PodIdentity {
                    namespace: format!("ns{ns}"),
                    name: format!("pod{p}"),
                    uid: None,
                    infra_container_id: None,
                }),
                ..Endpoint::new(net, &id, "eth0")
            };
            Ev::Put(nkeys::endpoint(net, &id, "eth0"), enc(&ep), created)
        })
}

fn network() -> impl Strategy<Value = Ev> {
    (0..NETS.len(), any::<bool>(), any::<bool>()).prop_map(|(n, internal, present)| {
        let name = NETS[n];
        if !present {
            return Ev::Delete(nkeys::network(name));
        }
        let mut net = Network::bridged(name, ["10.0.0.0/16".parse().unwrap()]);
        net.internal = internal;
        Ev::Put(nkeys::network(name), enc(&net), 1)
    })
}

fn service() -> impl Strategy<Value = Ev> {
    (0u8..2, any::<bool>(), proptest::option::of(0..NETS.len())).prop_map(|(s, vip, on)| {
        let name = format!("svc{s}");
        let svc = Service {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            vips: if vip {
                vec![format!("10.96.0.{}", s + 1).parse().unwrap()]
            } else {
                vec![]
            },
            networks: on.map(|n| vec![NETS[n].to_string()]).unwrap_or_default(),
            // svc1's producers count only once a health record says they pass.
            check: (s == 1).then(|| HealthCheck::new(CheckKind::Tcp { port: 80 })),
            ..Service::named(&name)
        };
        Ev::Put(skeys::service(&name), enc(&svc), 1)
    })
}

fn producer() -> impl Strategy<Value = Ev> {
    (0u8..2, 0u8..3, 0u8..10, 0u8..2, any::<bool>()).prop_map(|(s, id, a, host, present)| {
        let (svc, id) = (format!("svc{s}"), format!("p{id}"));
        if !present {
            return Ev::Delete(skeys::producer(&svc, &id));
        }
        let p = Producer {
            service: svc.clone(),
            id: id.clone(),
            host: Some(format!("h{host}")),
            network: None,
            container: None,
            netns: None,
            addrs: vec![addr(a).addr()],
            ports: Default::default(),
            check: None,
        };
        Ev::Put(skeys::producer(&svc, &id), enc(&p), 1)
    })
}

fn other() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (0u8..2).prop_map(|h| Ev::Put(nkeys::host(&format!("h{h}")), b"{}".to_vec(), 1)),
        (0u8..2).prop_map(|h| Ev::Delete(nkeys::host(&format!("h{h}")))),
        (0u8..2, 0u8..3, any::<bool>()).prop_map(|(s, id, healthy)| {
            let (svc, id) = (format!("svc{s}"), format!("p{id}"));
            let h = HealthRecord {
                healthy,
                host: "h0".into(),
                since_ms: 1,
                output: String::new(),
            };
            Ev::Put(skeys::health(&svc, &id), enc(&h), 1)
        }),
        (0u8..2).prop_map(|s| Ev::Delete(skeys::service(&format!("svc{s}")))),
        (0..NETS.len(), 0u8..5).prop_map(|(n, c)| Ev::Delete(nkeys::endpoint(
            NETS[n],
            &format!("c{c}"),
            "eth0"
        ))),
    ]
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        6 => endpoint(),
        2 => network(),
        1 => service(),
        2 => producer(),
        3 => other(),
    ]
}

fn apply(view: &mut DiscoveryView, ev: &Ev) {
    match ev {
        Ev::Put(k, v, created) => view.put_created(k, v, *created),
        Ev::Delete(k) => view.delete(k),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn incremental_zone_equals_a_full_compile(
        events in proptest::collection::vec(event(), 0..60),
        cuts in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let mut view = DiscoveryView::default();
        let mut builder = ZoneBuilder::new("ferrynet.internal.");
        let mut rest = events.as_slice();
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cuts.next().unwrap_or(&1)).min(rest.len());
            for ev in &rest[..n] {
                apply(&mut view, ev);
            }
            rest = &rest[n..];
            let zone = builder.update(&view);
            prop_assert_eq!(flatten(&zone), reference(&view));
        }
        let fresh = Zone::build(&view, "ferrynet.internal");
        prop_assert_eq!(flatten(&builder.update(&view)), flatten(&fresh));
    }
}

/// The zone handed out before a change is not changed by it (the server may still be reading
/// it): the maps are shared, never mutated in place.
#[test]
fn an_earlier_zone_is_unchanged_by_later_updates() {
    let mut view = DiscoveryView::default();
    let net = Network::bridged("blue", ["10.0.0.0/16".parse().unwrap()]);
    view.put(&nkeys::network("blue"), &enc(&net));
    let ep = |id: &str, ip: &str| Endpoint {
        ips: vec![ip.parse().unwrap()],
        name: Some("web".into()),
        ..Endpoint::new("blue", id, "eth0")
    };
    view.put(
        &nkeys::endpoint("blue", "a", "eth0"),
        &enc(&ep("a", "10.0.0.2/16")),
    );
    let mut b = ZoneBuilder::new("ferrynet.internal");
    let before = b.update(&view);
    view.put(
        &nkeys::endpoint("blue", "b", "eth0"),
        &enc(&ep("b", "10.0.0.3/16")),
    );
    view.delete(&nkeys::endpoint("blue", "a", "eth0"));
    let after = b.update(&view);
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    assert_eq!(before.names_hit("blue", "web"), Some(&[ip("10.0.0.2")][..]));
    assert_eq!(after.names_hit("blue", "web"), Some(&[ip("10.0.0.3")][..]));
}
