//! Hostile store records never put a name into the zone that is not a sequence of DNS labels
//! (issue 12, part 8): whatever survives discovery's validation is safe to serve.

use proptest::prelude::*;

use super::*;
use ferrynet_model::network::{keys as nkeys, Endpoint, Network};
use ferrynet_model::portmap::Protocol;
use ferrynet_model::service::{keys as skeys, Producer, Service, ServicePort};
use ferrynet_model::validate::is_dns_name;

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,12}",
        2 => "[a-z0-9]{1,4}[\";}{%/ \n\t\\\\é.]{1,2}[a-z]{0,4}",
        1 => ".{0,30}",
        1 => "[a-z]{60,70}",
        1 => "[a-z]{30}\\.[a-z]{30}\\.[a-z]{30}",
    ]
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Every name the zone holds, as the fully qualified name a client would ask.
fn names(z: &Zone) -> Vec<String> {
    let mut out = Vec::new();
    for net in z.nets.values() {
        let q = |rel: &str| format!("{rel}.{}.{}", net.name, z.domain);
        out.extend(net.eps.all_names().iter().map(|n| q(n)));
        out.extend(net.svc.names.keys().map(|n| q(n)));
        let ptrs = net
            .eps
            .all_ptrs()
            .into_iter()
            .chain(net.svc.ptr.keys().copied());
        out.extend(ptrs.filter_map(|ip| net.ptr(&ip).map(q)));
        out.extend(net.svc.srv.keys().map(|n| q(n)));
        for (svc, tasks) in &net.svc.tasks {
            out.extend(tasks.iter().map(|t| q(&format!("{}.tasks.{svc}", t.label))));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn zone_holds_only_dns_names(
        nets in proptest::collection::vec(hostile(), 1..3),
        eps in proptest::collection::vec((hostile(), proptest::collection::vec(hostile(), 0..3)), 0..4),
        svcs in proptest::collection::vec((hostile(), hostile()), 0..3),
        ids in proptest::collection::vec(hostile(), 0..4),
    ) {
        let mut v = DiscoveryView::default();
        for (i, n) in nets.iter().enumerate() {
            let net = Network::bridged(n, [format!("10.{}.0.0/16", i + 1).parse().unwrap()]);
            v.put(&nkeys::network(n), &enc(&net));
        }
        for (i, (name, aliases)) in eps.iter().enumerate() {
            let net = &nets[i % nets.len()];
            let ep = Endpoint {
                ips: vec![format!("10.{}.0.{}/16", i % nets.len() + 1, i + 2).parse().unwrap()],
                name: Some(name.clone()),
                aliases: aliases.clone(),
                ..Endpoint::new(net, &format!("c{i}"), "eth0")
            };
            v.put(&nkeys::endpoint(net, &format!("c{i}"), "eth0"), &enc(&ep));
        }
        for (name, port) in &svcs {
            let s = Service {
                ports: vec![ServicePort { name: port.clone(), port: 80, protocol: Protocol::Tcp }],
                ..Service::named(name)
            };
            v.put(&skeys::service(name), &enc(&s));
            for (j, id) in ids.iter().enumerate() {
                let p = Producer {
                    service: name.clone(),
                    id: id.clone(),
                    host: None,
                    network: None,
                    container: None,
                    netns: None,
                    addrs: vec![format!("10.9.0.{}", j + 2).parse().unwrap()],
                    ports: Default::default(),
                    check: None,
                };
                v.put(&skeys::producer(name, id), &enc(&p));
            }
        }
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        for n in names(&z) {
            prop_assert!(is_dns_name(&n) || n.len() > 253 && n.split('.').all(is_dns_name), "{:?}", n);
        }
    }
}
