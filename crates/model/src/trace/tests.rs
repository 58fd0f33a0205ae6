use super::*;
use crate::network::{FabricSpec, Subnet};
use crate::policy::parse_documents;
use crate::policy::verdict::PolicyEndpoint;
use crate::portmap::PortMapping;
use crate::service::{IngressPort, ServicePort};

fn net(name: &str, cidr: &str, backend: Option<Backend>) -> Network {
    let mut n = Network::bridged(name, [cidr.parse().unwrap()]);
    n.fabric = backend.map(|backend| FabricSpec {
        backend,
        vni: 7,
        block_v4: 24,
        block_v6: 122,
        encrypt: false,
    });
    n
}

fn ep(network: &str, name: &str, host: &str, ip: &str) -> Endpoint {
    let mut e = Endpoint::new(network, name, "eth0");
    e.name = Some(name.into());
    e.host = Some(host.into());
    e.ips = vec![format!("{ip}/24").parse().unwrap()];
    e.mac = Some("02:00:00:00:00:01".into());
    e.host_veth = Some(format!("fnv{name}"));
    e.netns = Some(format!("/run/netns/fnc-{name}"));
    e
}

/// h1..h3 on 172.31.0.0/24; network `fab` (vxlan, 10.20.N.0/24 on hN), `rt` (route,
/// 10.30.N.0/24), `iso` (single host, 10.40.0.0/24); a1,b1 on h1, a2 on h2 (fab), r1/r2 (rt),
/// i1 (iso, h1); service web (VIP 10.96.0.10:80 → a2:7000, ingress 30080).
fn facts() -> Facts {
    let mut f = Facts {
        me: "h1".into(),
        networks: vec![
            net("fab", "10.20.0.0/16", Some(Backend::Vxlan)),
            net("rt", "10.30.0.0/16", Some(Backend::Route)),
            net("iso", "10.40.0.0/24", None),
        ],
        ..Facts::default()
    };
    f.networks[2].subnets = vec![Subnet::new("10.40.0.0/24".parse().unwrap())];
    for i in 1..=3 {
        f.hosts.push(HostRecord {
            name: format!("h{i}"),
            underlay: vec![format!("172.31.0.1{i}/24").parse().unwrap()],
            underlay_mtu: 1500,
            capabilities: vec![],
            version: String::new(),
            started_at: 0,
            sleeve: None,
        });
        for n in ["fab", "rt"] {
            let b = if n == "fab" { 20 } else { 30 };
            f.blocks.push((
                n.into(),
                format!("10.{b}.{i}.0/24").parse().unwrap(),
                format!("h{i}"),
            ));
        }
    }
    let mut a2 = ep("fab", "a2", "h2", "10.20.2.5");
    a2.port_mappings.push(PortMapping {
        host_port: 8080,
        container_port: 7000,
        protocol: Protocol::Tcp,
        host_ip: None,
    });
    let mut i1 = ep("iso", "i1", "h1", "10.40.0.5");
    i1.host = None;
    f.endpoints = vec![
        ep("fab", "a1", "h1", "10.20.1.5"),
        ep("fab", "b1", "h1", "10.20.1.6"),
        a2,
        ep("rt", "r1", "h1", "10.30.1.5"),
        ep("rt", "r2", "h2", "10.30.2.5"),
        i1,
    ];
    f.endpoints[1].labels.insert("app".into(), "locked".into());
    f.services.push(Service {
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        vips: vec!["10.96.0.10".parse().unwrap()],
        ingress: vec![IngressPort {
            published: 30080,
            target: 80,
            protocol: Protocol::Tcp,
            local: false,
        }],
        ..Service::named("web")
    });
    let mut p = Producer {
        service: "web".into(),
        id: "a2".into(),
        host: Some("h2".into()),
        network: Some("fab".into()),
        container: Some("a2".into()),
        netns: None,
        addrs: vec!["10.20.2.5".parse().unwrap()],
        ports: BTreeMap::new(),
        check: None,
    };
    p.ports.insert(80, 7000);
    f.producers.push(ProducerFact {
        producer: p,
        healthy: true,
    });
    reindex(&mut f);
    f
}

fn reindex(f: &mut Facts) {
    f.eps = EndpointIndex::new(
        f.endpoints
            .iter()
            .map(|e| PolicyEndpoint::of(e.clone(), 0, &Default::default()))
            .collect(),
    );
}

fn kernel_ok(f: &mut Facts) {
    let r = |gw: Option<&str>, dev: &str| RouteLookup::Route {
        gateway: gw.map(|g| g.parse().unwrap()),
        dev: dev.into(),
        protocol: 113,
        prefsrc: None,
    };
    let k = &mut f.kernel.routes;
    let fab = f.networks[0].bridge.clone();
    let iso = f.networks[2].bridge.clone();
    let vx = vxlan_dev_name("fab");
    k.insert("10.20.1.6".parse().unwrap(), r(None, &fab));
    k.insert("10.20.2.5".parse().unwrap(), r(Some("10.20.2.1"), &vx));
    k.insert("10.20.2.99".parse().unwrap(), r(Some("10.20.2.1"), &vx));
    k.insert("10.30.2.5".parse().unwrap(), r(Some("172.31.0.12"), "eth0"));
    k.insert("10.40.0.5".parse().unwrap(), r(None, &iso));
    k.insert("172.31.0.12".parse().unwrap(), r(None, "eth0"));
    k.insert("172.31.0.200".parse().unwrap(), r(None, "eth0"));
    f.kernel.guard_entry = Some(true);
}

fn run(f: &Facts, src: &str, dst: &str) -> Trace {
    run_spoof(f, src, dst, None)
}

fn run_spoof(f: &Facts, src: &str, dst: &str, spoof: Option<&str>) -> Trace {
    let (d, port, l4) = parse_dst(dst).unwrap();
    let q = Query {
        src: resolve(f, src).unwrap(),
        dst: resolve(f, &d).unwrap(),
        port,
        l4,
        v6: false,
        spoof: spoof.map(|s| s.parse().unwrap()),
    };
    trace(f, &q).unwrap()
}

fn verdict(t: &Trace) -> (bool, Step) {
    (t.verdict.delivered, t.verdict.step)
}

#[test]
fn parse_dst_forms() {
    assert_eq!(parse_dst("web").unwrap(), ("web".into(), None, L4::Icmp));
    assert_eq!(
        parse_dst("web:80").unwrap(),
        ("web".into(), Some(80), L4::Tcp)
    );
    assert_eq!(
        parse_dst("web:53/udp").unwrap(),
        ("web".into(), Some(53), L4::Udp)
    );
    assert_eq!(
        parse_dst("net/web:53/UDP").unwrap(),
        ("net/web".into(), Some(53), L4::Udp)
    );
    assert_eq!(
        parse_dst("net/web").unwrap(),
        ("net/web".into(), None, L4::Icmp)
    );
    assert_eq!(
        parse_dst("fd20::5").unwrap(),
        ("fd20::5".into(), None, L4::Icmp)
    );
    assert_eq!(
        parse_dst("[fd20::5]:80/tcp").unwrap(),
        ("fd20::5".into(), Some(80), L4::Tcp)
    );
    for bad in [
        "",
        "web:0",
        "web:99999",
        "web:x",
        "web:80/icmp",
        ":80",
        "[fd::1",
    ] {
        assert!(parse_dst(bad).is_err(), "{bad}");
    }
}

#[test]
fn unknown_and_ambiguous_names() {
    let mut f = facts();
    assert_eq!(resolve(&f, "nope"), Err(TraceError::Unknown("nope".into())));
    let mut dup = ep("rt", "a1", "h1", "10.30.1.9");
    dup.container_id = "a1".into();
    f.endpoints.push(dup);
    assert!(matches!(resolve(&f, "a1"), Err(TraceError::Ambiguous(..))));
    assert_eq!(resolve(&f, "rt/a1"), Ok(Party::Endpoint(6)));
    assert_eq!(resolve(&f, "host"), Ok(Party::Host("h1".into())));
    assert_eq!(resolve(&f, "h3"), Ok(Party::Host("h3".into())));
    assert_eq!(resolve(&f, "172.31.0.12"), Ok(Party::Host("h2".into())));
    assert_eq!(
        resolve(&f, "8.8.8.8"),
        Ok(Party::Address("8.8.8.8".parse().unwrap()))
    );
}

#[test]
fn asks_the_kernel_then_uses_its_answers() {
    let mut f = facts();
    let t = run(&f, "a1", "a2:7000");
    assert!(t.lookups.contains(&"10.20.2.5".parse().unwrap()));
    assert!(t.guard_lookup.is_some());
    kernel_ok(&mut f);
    let t = run(&f, "a1", "a2:7000");
    assert!(t.lookups.is_empty() && t.guard_lookup.is_none());
}

#[test]
fn same_host_delivered() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "b1:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    assert!(t.hops.iter().all(|h| h.step != Step::Backend));
}

#[test]
fn cross_host_vxlan_names_fdb_and_vtep() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    let b = t.hops.iter().find(|h| h.step == Step::Backend).unwrap();
    assert!(
        b.what.contains("FDB") && b.what.contains("172.31.0.12"),
        "{}",
        b.what
    );
    let steps: Vec<Step> = t.hops.iter().map(|h| h.step).collect();
    let pos = |s| steps.iter().position(|x| *x == s).unwrap();
    assert!(pos(Step::Route) < pos(Step::Backend) && pos(Step::Backend) < pos(Step::Arrival));
}

#[test]
fn cross_host_route_backend_next_hop() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "r1", "r2:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    let b = t.hops.iter().find(|h| h.step == Step::Backend).unwrap();
    assert!(b.what.contains("next hop 172.31.0.12"), "{}", b.what);
}

#[test]
fn sleeve_peer_without_key_is_dropped() {
    let mut f = facts();
    f.networks[0].fabric.as_mut().unwrap().encrypt = true;
    kernel_ok(&mut f);
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (false, Step::Backend), "{t:#?}");
    f.hosts[1].sleeve = Some(crate::sleeve::SleeveRecord {
        public_key: "KEY".into(),
        port: 6784,
    });
    f.kernel.routes.insert(
        "10.20.2.5".parse().unwrap(),
        RouteLookup::Route {
            gateway: Some("10.20.2.1".parse().unwrap()),
            dev: SLEEVE_DEV.into(),
            protocol: 113,
            prefsrc: None,
        },
    );
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    assert!(t.hops.iter().any(|h| h.what.contains("172.31.0.12:6784")));
}

#[test]
fn missing_fabric_route_drops_at_route() {
    let mut f = facts();
    kernel_ok(&mut f);
    f.kernel.routes.insert(
        "10.20.2.5".parse().unwrap(),
        RouteLookup::Route {
            gateway: Some("172.31.0.254".parse().unwrap()),
            dev: "eth0".into(),
            protocol: 3,
            prefsrc: None,
        },
    );
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (false, Step::Route), "{t:#?}");
    assert_eq!(t.verdict.host.as_deref(), Some("h1"));
    f.kernel.routes.insert(
        "10.20.2.5".parse().unwrap(),
        RouteLookup::Error("Network is unreachable".into()),
    );
    assert_eq!(verdict(&run(&f, "a1", "a2:7000")), (false, Step::Route));
}

#[test]
fn spoofed_source_dropped_by_anti_spoofing() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run_spoof(&f, "a1", "a2:7000", Some("10.20.1.6"));
    assert_eq!(verdict(&t), (false, Step::AntiSpoofing), "{t:#?}");
    assert!(t.verdict.reason.contains("ip4_spoof"));
    // The kernel lacking the element drops even honest frames.
    f.kernel.guard_entry = Some(false);
    assert_eq!(
        verdict(&run(&f, "a1", "a2:7000")),
        (false, Step::AntiSpoofing)
    );
}

#[test]
fn foreign_network_isolated() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "i1:7000");
    assert_eq!(verdict(&t), (false, Step::Isolation), "{t:#?}");
    let t = run(&f, "a1", "r2:7000");
    assert_eq!(verdict(&t), (false, Step::Isolation));
}

#[test]
fn policy_deny_names_policy_and_rule() {
    let mut f = facts();
    kernel_ok(&mut f);
    let docs = parse_documents(
        "name: lock\nselector: app=locked\ningress:\n  - action: deny\n    ports: [tcp/7000]\n",
    )
    .unwrap();
    f.book = PolicyBook::new(docs, Default::default());
    let t = run(&f, "a1", "b1:7000");
    assert_eq!(verdict(&t), (false, Step::Policy), "{t:#?}");
    assert!(
        t.verdict.reason.contains("policy lock, rule 0"),
        "{}",
        t.verdict.reason
    );
    // Another port: selected, no rule matches: denied by default.
    let t = run(&f, "a1", "b1:80");
    assert_eq!(verdict(&t), (false, Step::Policy));
    assert!(t.verdict.reason.contains("no rule matches"));
    assert_eq!(
        verdict(&run(&f, "b1", "a1:7000")),
        (true, Step::Destination)
    );
}

#[test]
fn published_port_dnat_on_the_owning_host() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "172.31.0.12:8080");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    let d = t.hops.iter().find(|h| h.step == Step::Dnat).unwrap();
    assert_eq!(d.host.as_deref(), Some("h2"));
    assert!(d.what.contains("pm4_any") && d.what.contains("10.20.2.5:7000"));
    // From another network: DNATed, so isolation lets it pass.
    assert_eq!(
        verdict(&run(&f, "i1", "h2:8080")),
        (true, Step::Destination)
    );
    // An unpublished port is for the host itself.
    let t = run(&f, "a1", "h2:9999");
    assert_eq!(t.verdict.step, Step::Destination);
    assert!(t.verdict.reason.contains("own stack"));
}

#[test]
fn vip_and_ingress_pick_a_healthy_producer() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "10.96.0.10:80");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    assert!(t
        .hops
        .iter()
        .any(|h| h.step == Step::Dnat && h.host.as_deref() == Some("h1")));
    assert_eq!(
        verdict(&run(&f, "a1", "10.96.0.10:81")),
        (false, Step::Dnat)
    );
    let t = run(&f, "172.31.0.200", "h3:30080");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    f.producers[0].healthy = false;
    let t = run(&f, "a1", "10.96.0.10:80");
    assert_eq!(verdict(&t), (false, Step::Dnat));
    assert!(t.verdict.reason.contains("no healthy producer"));
}

#[test]
fn outside_destination_leaves_masqueraded() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "172.31.0.200:7000");
    assert_eq!(verdict(&t), (true, Step::Route), "{t:#?}");
    assert!(t.hops.iter().any(|h| h.what.contains("masqueraded")));
    f.networks[0].internal = true;
    assert_eq!(
        verdict(&run(&f, "a1", "172.31.0.200:7000")),
        (false, Step::Route)
    );
}

#[test]
fn unused_address_in_a_block_is_dropped_on_its_host() {
    let mut f = facts();
    kernel_ok(&mut f);
    let t = run(&f, "a1", "10.20.2.99:7000");
    assert_eq!(verdict(&t), (false, Step::Destination), "{t:#?}");
    assert_eq!(t.verdict.host.as_deref(), Some("h2"));
}

#[test]
fn remote_hops_come_from_the_model() {
    let mut f = facts();
    f.me = "h3".into();
    let t = run(&f, "a1", "a2:7000");
    assert!(t.lookups.is_empty(), "h3's kernel holds neither end");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    assert!(t
        .hops
        .iter()
        .filter(|h| h.step == Step::Route)
        .all(|h| h.basis == Basis::Model));
}

#[test]
fn json_shape() {
    let mut f = facts();
    kernel_ok(&mut f);
    let v = serde_json::to_value(run(&f, "a1", "a2:7000")).unwrap();
    assert_eq!(v["verdict"]["delivered"], true);
    assert_eq!(v["verdict"]["step"], "destination");
    assert_eq!(v["hops"][1]["step"], "anti-spoofing");
    assert_eq!(v["proto"], "tcp");
}

#[test]
fn host_source_uses_the_kernels_preferred_source() {
    let mut f = facts();
    kernel_ok(&mut f);
    // Its underlay address: not in any pool, passes.
    let t = run(&f, "host", "a2:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    assert_eq!(t.src, "172.31.0.11".parse::<IpAddr>().unwrap());
    // A route whose preferred source is another network's address (a routed network's
    // gateway on lo): isolation drops it on the receiving host.
    f.kernel.routes.insert(
        "10.20.2.5".parse().unwrap(),
        RouteLookup::Route {
            gateway: Some("10.20.2.1".parse().unwrap()),
            dev: vxlan_dev_name("fab"),
            protocol: 113,
            prefsrc: Some("10.30.1.1".parse().unwrap()),
        },
    );
    let t = run(&f, "host", "a2:7000");
    assert_eq!(verdict(&t), (false, Step::Isolation), "{t:#?}");
    assert_eq!(t.verdict.host.as_deref(), Some("h2"));
    // To a container of its own: no forward hook, no isolation.
    assert_eq!(
        verdict(&run(&f, "host", "r1:7000")),
        (true, Step::Destination)
    );
}

#[test]
fn vxlan_entries_are_checked_in_this_hosts_kernel() {
    use crate::fabric::{FabricState, FdbEntry, NeighEntry};
    let mut f = facts();
    kernel_ok(&mut f);
    let dev = vxlan_dev_name("fab");
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(t.vxlan_lookups, vec![dev.clone()]);
    let mac = vtep_mac("h2", "fab");
    let mut k = FabricState::default();
    k.neigh.insert(NeighEntry {
        dev: dev.clone(),
        ip: "10.20.2.1".parse().unwrap(),
        mac,
    });
    f.kernel.vxlan.insert(dev.clone(), k.clone());
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (false, Step::Backend), "{t:#?}");
    assert!(
        t.verdict.reason.contains("FDB entry missing"),
        "{}",
        t.verdict.reason
    );
    k.fdb.insert(FdbEntry {
        dev: dev.clone(),
        mac,
        dst: "172.31.0.12".parse().unwrap(),
    });
    f.kernel.vxlan.insert(dev, k);
    let t = run(&f, "a1", "a2:7000");
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
    let b = t.hops.iter().find(|h| h.step == Step::Backend).unwrap();
    assert_eq!(b.basis, Basis::Kernel);
}

#[test]
fn this_host_without_a_record_sends_from_its_preferred_source() {
    let mut f = facts();
    f.me = "solo".into();
    f.endpoints[5].host = None;
    let q = Query {
        src: resolve(&f, "host").unwrap(),
        dst: resolve(&f, "i1").unwrap(),
        port: Some(7000),
        l4: L4::Tcp,
        v6: false,
        spoof: None,
    };
    let t = trace(&f, &q).unwrap();
    assert_eq!(t.lookups, vec!["10.40.0.5".parse::<IpAddr>().unwrap()]);
    f.kernel.routes.insert(
        "10.40.0.5".parse().unwrap(),
        RouteLookup::Route {
            gateway: None,
            dev: f.networks[2].bridge.clone(),
            protocol: 2,
            prefsrc: Some("10.40.0.1".parse().unwrap()),
        },
    );
    let t = trace(&f, &q).unwrap();
    assert_eq!(t.src, "10.40.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(verdict(&t), (true, Step::Destination), "{t:#?}");
}
