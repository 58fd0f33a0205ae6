use super::*;
use crate::network::keys;
use crate::portmap::Protocol;
use crate::service::{Service, ServicePort};

fn net() -> Network {
    Network {
        bridge: "fn-blue".into(),
        ..Network::bridged("blue", ["10.20.0.0/16".parse().unwrap()])
    }
}

fn ep() -> Endpoint {
    Endpoint {
        ips: vec!["10.20.0.2/16".parse().unwrap()],
        mac: Some("02:00:00:00:00:01".into()),
        host_veth: Some("fnv0123456789ab".into()),
        netns: Some("/var/run/netns/c1".into()),
        name: Some("web".into()),
        aliases: vec!["db.local".into(), "cache_1".into()],
        ..Endpoint::new("blue", "c1", "eth0")
    }
}

fn producer() -> Producer {
    Producer {
        service: "web".into(),
        id: "web-1".into(),
        host: Some("h1".into()),
        network: Some("blue".into()),
        container: Some("c1".into()),
        netns: None,
        addrs: vec!["10.20.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        ports: Default::default(),
        check: None,
    }
}

fn service() -> Service {
    Service {
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        vips: vec!["10.96.0.10".parse().unwrap()],
        ..Service::named("web")
    }
}

#[test]
fn good_records_pass_under_their_keys() {
    net().validate_at(&keys::network("blue")).unwrap();
    ep().validate_at(&keys::endpoint("blue", "c1", "eth0"))
        .unwrap();
    service().validate_at(&skeys::service("web")).unwrap();
    producer()
        .validate_at(&skeys::producer("web", "web-1"))
        .unwrap();
    BlockClaim { host: "h1".into() }
        .validate_at(&keys::block("blue", &"10.20.0.0/26".parse().unwrap()))
        .unwrap();
}

#[test]
fn hostile_bridges_are_refused() {
    for bad in [
        "fn-x\"; flush ruleset; \"",
        "fn-",
        "fn-Blue",
        "fn-a%d",
        "fn-a b",
        "fn-abcdefghijklm",
        "docker0",
        "fn-a\nb",
        "fn-é",
    ] {
        let mut n = net();
        n.bridge = bad.into();
        let e = n.validate().unwrap_err();
        assert_eq!(e.field, "bridge", "{bad:?}");
    }
    for good in ["fn-blue", "fn-0", "fn-abcdefghijkl", "fn-a-b"] {
        check_bridge_name(good).unwrap();
    }
}

#[test]
fn hostile_network_records_are_refused() {
    let mut n = net();
    n.name = "blue\nadd rule".into();
    assert!(n.validate().is_err());
    // A well-formed record stored under another network's key.
    assert!(net().validate_at(&keys::network("red")).is_err());
    let mut n = net();
    n.mtu = Some(10);
    assert!(n.validate().is_err());
    let mut n = net();
    n.subnets.clear();
    assert!(n.validate().is_err());
}

#[test]
fn hostile_endpoints_are_refused() {
    type Spoil = Box<dyn Fn(&mut Endpoint)>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("aliases", Box::new(|e| e.aliases.push("a b".into()))),
        ("aliases", Box::new(|e| e.aliases.push("x}".into()))),
        ("aliases", Box::new(|e| e.aliases.push("a..b".into()))),
        ("aliases", Box::new(|e| e.aliases.push("x".repeat(64)))),
        ("name", Box::new(|e| e.name = Some("web\n".into()))),
        ("ifname", Box::new(|e| e.ifname = "eth%d".into())),
        ("ifname", Box::new(|e| e.ifname = "a/b".into())),
        ("ifname", Box::new(|e| e.ifname = "abcdefghijklmnop".into())),
        (
            "hostVeth",
            Box::new(|e| e.host_veth = Some("x\";drop".into())),
        ),
        (
            "netns",
            Box::new(|e| e.netns = Some("/run/netns/../../etc".into())),
        ),
        ("netns", Box::new(|e| e.netns = Some("relative".into()))),
        ("containerId", Box::new(|e| e.container_id = "c1;rm".into())),
        (
            "mac",
            Box::new(|e| e.mac = Some("01:00:00:00:00:01".into())),
        ),
        (
            "ips",
            Box::new(|e| e.ips.push("0.0.0.0/0".parse().unwrap())),
        ),
        ("host", Box::new(|e| e.host = Some("h 1".into()))),
        (
            "hostPort",
            Box::new(|e| {
                e.port_mappings.push(PortMapping {
                    host_port: 0,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                })
            }),
        ),
    ];
    for (field, spoil) in cases {
        let mut e = ep();
        spoil(&mut e);
        let err = e.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
    // The record under another container's key.
    assert!(ep()
        .validate_at(&keys::endpoint("blue", "c2", "eth0"))
        .is_err());
}

#[test]
fn hostile_services_and_producers_are_refused() {
    let mut s = service();
    s.name = "web}".into();
    assert!(s.validate().is_err());
    let mut s = service();
    s.vips.push("10.96.0.11".parse().unwrap());
    assert_eq!(s.validate().unwrap_err().field, "vips");
    let mut s = service();
    s.ports[0].name = "h\"ttp".into();
    assert!(s.validate().is_err());
    let mut s = service();
    s.networks.push("x y".into());
    assert!(s.validate().is_err());
    let mut s = service();
    s.check = Some(HealthCheck::new(CheckKind::Http {
        port: 80,
        path: "/\r\nHost: evil".into(),
        status: 200,
    }));
    assert!(s.validate().is_err());
    assert!(service().validate_at(&skeys::service("api")).is_err());

    let mut p = producer();
    p.addrs = vec!["::ffff:10.20.0.2".parse().unwrap()];
    assert_eq!(p.validate().unwrap_err().field, "addrs");
    let mut p = producer();
    p.addrs.push("10.20.0.3".parse().unwrap());
    assert!(p.validate().is_err());
    let mut p = producer();
    p.id = "a}b".into();
    assert!(p.validate().is_err());
    let mut p = producer();
    p.netns = Some("/proc/1/ns/../../../root".into());
    assert!(p.validate().is_err());
    let mut p = producer();
    p.ports.insert(80, 0);
    assert!(p.validate().is_err());
    assert!(producer()
        .validate_at(&skeys::producer("web", "web-2"))
        .is_err());
}

#[test]
fn producer_addresses_must_be_on_its_network() {
    let mut p = producer();
    p.addrs = vec!["10.20.0.2".parse().unwrap()];
    check_producer_on(&p, &net()).unwrap();
    // An IPv6 address on an IPv4-only network: the wrong family.
    p.addrs = vec!["fd00::2".parse().unwrap()];
    assert!(check_producer_on(&p, &net()).is_err());
    p.addrs = vec!["10.99.0.2".parse().unwrap()];
    assert!(check_producer_on(&p, &net()).is_err());
}

#[test]
fn hostile_hosts_blocks_and_ranges_are_refused() {
    let h = HostRecord {
        name: "h1".into(),
        underlay: vec!["192.168.1.1/24".parse().unwrap()],
        underlay_mtu: 1500,
        capabilities: vec!["route".into(), "vxlan".into()],
        version: "0.1.0".into(),
        started_at: 0,
        sleeve: None,
    };
    h.validate_at(&keys::host("h1")).unwrap();
    assert!(h.validate_at(&keys::host("h2")).is_err());
    let mut bad = h.clone();
    bad.name = "h1\"".into();
    assert!(bad.validate().is_err());
    let mut bad = h.clone();
    bad.underlay = vec!["224.0.0.1/4".parse().unwrap()];
    assert!(bad.validate().is_err());
    let mut bad = h;
    bad.capabilities = vec!["vx lan".into()];
    assert!(bad.validate().is_err());

    assert!(BlockClaim { host: "h;1".into() }.validate().is_err());
    assert!(BlockClaim { host: "h1".into() }
        .validate_at(&keys::block("a b", &"10.0.0.0/26".parse().unwrap()))
        .is_err());

    let r = VipRanges {
        v4: "fd00::/112".parse().ok(),
        v6: None,
    };
    assert!(r.validate().is_err());
    VipRanges::default().validate().unwrap();
}

#[test]
fn blocks_must_lie_in_their_network() {
    let mut n = net();
    n.fabric = Some(crate::network::FabricSpec {
        backend: crate::fabric::Backend::Route,
        vni: 7,
        block_v4: 26,
        block_v6: 122,
        encrypt: false,
    });
    check_block_on(&"10.20.0.64/26".parse().unwrap(), &n).unwrap();
    for bad in ["0.0.0.0/0", "10.21.0.0/26", "10.0.0.0/8", "fd00::/122"] {
        assert!(check_block_on(&bad.parse().unwrap(), &n).is_err(), "{bad}");
    }
    // Single-host networks have no blocks.
    assert!(check_block_on(&"10.20.0.64/26".parse().unwrap(), &net()).is_err());
}

#[test]
fn dns_names() {
    for good in ["web", "web-1", "db.local", "a_b", "A1", "-a"] {
        assert!(is_dns_name(good), "{good}");
    }
    for bad in [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "a b",
        "a}",
        "é",
        &"a".repeat(64),
    ] {
        assert!(!is_dns_name(bad), "{bad:?}");
    }
}

#[test]
fn errors_show_values_escaped_and_short() {
    let e = check_bridge_name(&format!("fn-\n{}", "x".repeat(200))).unwrap_err();
    let text = e.to_string();
    assert!(!text.contains('\n'));
    assert!(text.len() < 200);
}

#[test]
fn discovery_view_skips_and_lists_bad_records() {
    use crate::discovery::DiscoveryView;
    let enc = |v: &dyn erased::Json| v.json();
    let mut v = DiscoveryView::default();
    let mut evil = net();
    evil.name = "evil".into();
    evil.bridge = "fn-x\"; flush ruleset; \"".into();
    let mut bad_svc = service();
    bad_svc.name = "x}".into();
    let mut bad_ep = ep();
    bad_ep.container_id = "c2".into();
    bad_ep.aliases = vec!["a b".into()];
    let mut wrong_family = producer();
    wrong_family.id = "web-2".into();
    wrong_family.addrs = vec!["fd00::9".parse().unwrap()];
    let mut good_p = producer();
    good_p.addrs.truncate(1);
    let kvs: Vec<(String, Vec<u8>)> = vec![
        (keys::network("blue"), enc(&net())),
        (keys::network("evil"), enc(&evil)),
        (keys::endpoint("blue", "c1", "eth0"), enc(&ep())),
        (keys::endpoint("blue", "c2", "eth0"), enc(&bad_ep)),
        (skeys::service("web"), enc(&service())),
        (skeys::service("x}"), enc(&bad_svc)),
        (skeys::producer("web", "web-1"), enc(&good_p)),
        (skeys::producer("web", "web-2"), enc(&wrong_family)),
        (keys::network("junk"), b"{not json".to_vec()),
    ];
    v.reset(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())), 1);
    assert_eq!(v.networks.keys().collect::<Vec<_>>(), ["blue"]);
    assert_eq!(v.endpoints.len(), 1);
    assert_eq!(v.services.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(v.producers.len(), 1);
    let rejected: Vec<&String> = v.rejected.keys().collect();
    for k in [
        keys::network("evil"),
        keys::network("junk"),
        keys::endpoint("blue", "c2", "eth0"),
        skeys::service("x}"),
        skeys::producer("web", "web-2"),
    ] {
        assert!(rejected.contains(&&k), "{k} missing from {rejected:?}");
    }
    assert_eq!(v.rejected.len(), 5);
    // Repaired or deleted, a key leaves the list.
    v.put(
        &keys::network("evil"),
        &enc(&Network {
            name: "evil".into(),
            bridge: "fn-evil".into(),
            ..net()
        }),
    );
    v.delete(&keys::network("junk"));
    assert_eq!(v.rejected.len(), 3);
    assert!(v.networks.contains_key("evil"));
}

mod erased {
    /// Serialize any record without naming its type.
    pub trait Json {
        fn json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap()
        }
    }
}

#[test]
fn forged_pod_identities_labels_and_limits_are_refused() {
    let pod = || crate::pod::PodIdentity {
        namespace: "default".into(),
        name: "web-0".into(),
        uid: Some("5f2e0c1a-8d1e-4c1b-9a3e-1f2e3d4c5b6a".into()),
        infra_container_id: Some("c1".into()),
    };
    let with = |f: &dyn Fn(&mut Endpoint)| {
        let mut e = ep();
        e.pod = Some(pod());
        e.labels.insert("namespace".into(), "default".into());
        f(&mut e);
        e
    };
    with(&|_| {})
        .validate_at(&keys::endpoint("blue", "c1", "eth0"))
        .unwrap();
    // An old record, without any of them, still reads.
    let old: Endpoint = serde_json::from_str(
        r#"{"network":"blue","containerId":"c1","ifname":"eth0","ips":["10.20.0.2/16"]}"#,
    )
    .unwrap();
    assert!(old.pod.is_none() && old.labels.is_empty() && old.bandwidth.is_none());
    old.validate().unwrap();
    for (what, bad) in [
        (
            "dotted namespace",
            with(&|e| e.pod.as_mut().unwrap().namespace = "a.b".into()),
        ),
        (
            "empty name",
            with(&|e| e.pod.as_mut().unwrap().name = String::new()),
        ),
        (
            "name with a quote",
            with(&|e| e.pod.as_mut().unwrap().name = "x\"y".into()),
        ),
        (
            "uid with a slash",
            with(&|e| e.pod.as_mut().unwrap().uid = Some("../x".into())),
        ),
        (
            "sandbox id",
            with(&|e| e.pod.as_mut().unwrap().infra_container_id = Some("-x".into())),
        ),
        (
            "namespace label of another namespace",
            with(&|e| {
                e.labels.insert("namespace".into(), "kube-system".into());
            }),
        ),
        ("no namespace label", with(&|e| e.labels.clear())),
        (
            "label value",
            with(&|e| {
                e.labels.insert("app".into(), "a b".into());
            }),
        ),
        (
            "half a bandwidth limit",
            with(&|e| {
                e.bandwidth = Some(crate::bandwidth::Bandwidth {
                    ingress_rate: 1_000_000,
                    ..Default::default()
                })
            }),
        ),
    ] {
        assert!(bad.validate().is_err(), "{what} should be refused");
    }
}
