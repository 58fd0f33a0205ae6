use super::*;
use crate::fabric::vtep_mac;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn host(name: &str, underlay: &[&str], key: Option<[u8; 32]>) -> HostRecord {
    HostRecord {
        name: name.into(),
        underlay: underlay.iter().map(|s| net(s)).collect(),
        underlay_mtu: 1500,
        capabilities: vec![],
        version: String::new(),
        started_at: 0,
        sleeve: key.map(|k| SleeveRecord {
            public_key: encode_key(&k),
            port: 6784,
        }),
    }
}

fn peer(host: &str, underlay: &[&str], blocks: &[&str]) -> Peer {
    Peer {
        host: host.into(),
        underlay: underlay.iter().map(|s| net(s)).collect(),
        vtep_mac: vtep_mac(host, "n"),
        blocks: blocks.iter().map(|s| net(s)).collect(),
    }
}

#[test]
fn keys_round_trip_and_bad_ones_are_refused() {
    let k = [7u8; 32];
    assert_eq!(decode_key(&encode_key(&k)), Ok(k));
    assert!(decode_key("AAAA").is_err());
    assert!(decode_key("not base64!").is_err());
    assert!(decode_key(&encode_key(&k).repeat(2)).is_err());
    assert_eq!(sleeve_mtu(1500), 1408);
    assert_eq!(SLEEVE_OVERHEAD as usize, 80 + path::RELAY_HEADER);
    assert_eq!(sleeve_mtu(40), 0);
}

#[test]
fn peers_carry_key_endpoints_v4_first_and_blocks() {
    let hosts = [
        host("h1", &["172.31.0.1/24"], Some([1; 32])),
        host("h2", &["fd31::2/64", "172.31.0.2/24"], Some([2; 32])),
        host("h3", &["172.31.0.3/24"], None),
    ];
    let blocks = BTreeMap::from([("h2".to_string(), vec![net("10.20.0.64/26")])]);
    let (p, errors) = peers("h1", &hosts, &blocks);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(p.len(), 1, "h1 is me, h3 runs no sleeve");
    assert_eq!(p[0].host, "h2");
    assert_eq!(p[0].public_key, [2; 32]);
    assert_eq!(
        p[0].endpoints,
        vec![
            "172.31.0.2:6784".parse().unwrap(),
            "[fd31::2]:6784".parse().unwrap()
        ]
    );
    assert_eq!(p[0].allowed, vec![net("10.20.0.64/26")]);
}

#[test]
fn a_shared_key_is_refused_for_every_holder() {
    let hosts = [
        host("h1", &["172.31.0.1/24"], Some([1; 32])),
        host("h2", &["172.31.0.2/24"], Some([2; 32])),
        host("h3", &["172.31.0.3/24"], Some([2; 32])),
        host("h4", &["172.31.0.4/24"], Some([1; 32])),
    ];
    let (p, errors) = peers("h1", &hosts, &BTreeMap::new());
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("h2, h3")));
    assert!(errors
        .iter()
        .any(|e| e.contains("h4") && e.contains("this host's")));
}

#[test]
fn probe_counts_misses_and_resets_on_an_answer() {
    let p = Probe::Pending.after(false).after(false);
    assert_eq!(p, Probe::Silent { misses: 2 });
    assert_eq!(p.after(true), Probe::Answered);
    assert_eq!(probe_nonce(&probe_message(42)), Some(42));
    assert_eq!(probe_nonce(b"FNPROBE1"), None);
    // Never mistaken for a WireGuard message (type 1-4, then three zero bytes).
    assert!(probe_message(0)[1..4] != [0, 0, 0]);
}

#[test]
fn choice_per_backend_encrypt_and_auto() {
    let mine = [net("172.31.0.1/24")];
    let near = peer("h2", &["172.31.0.2/24"], &["10.20.0.64/26"]);
    let far = peer("h3", &["172.31.1.3/24"], &["10.20.0.128/26"]);
    let silent = Probe::Silent {
        misses: PROBE_MISSES,
    };
    let b = |backend, encrypt, p: &Peer, key, probe| {
        choose(backend, encrypt, &mine, p, key, probe).backend
    };
    assert_eq!(
        b(Backend::Vxlan, true, &near, true, Probe::Pending),
        Backend::Sleeve
    );
    assert_eq!(
        b(Backend::Route, true, &near, false, Probe::Pending),
        Backend::Sleeve
    );
    assert_eq!(
        b(Backend::Sleeve, false, &far, true, Probe::Pending),
        Backend::Sleeve
    );
    assert_eq!(b(Backend::Auto, false, &near, true, silent), Backend::Route);
    assert_eq!(
        b(Backend::Auto, false, &far, true, Probe::Pending),
        Backend::Vxlan
    );
    assert_eq!(
        b(Backend::Auto, false, &far, true, Probe::Answered),
        Backend::Vxlan
    );
    assert_eq!(
        b(
            Backend::Auto,
            false,
            &far,
            true,
            Probe::Silent { misses: 1 }
        ),
        Backend::Vxlan
    );
    assert_eq!(b(Backend::Auto, false, &far, true, silent), Backend::Sleeve);
    assert_eq!(b(Backend::Auto, false, &far, false, silent), Backend::Vxlan);
    let c = choose(Backend::Auto, false, &mine, &far, true, silent);
    assert!(
        c.reason.contains("only the sleeve port passes"),
        "{}",
        c.reason
    );
}

#[test]
fn desired_mixes_backends_per_peer() {
    let mine = [net("172.31.0.1/24")];
    let peers = [
        peer("h2", &["172.31.0.2/24"], &["10.20.0.64/26"]),
        peer(
            "h3",
            &["172.31.1.3/24"],
            &["10.20.0.128/26", "fd20::80/122"],
        ),
        peer("h4", &["172.31.1.4/24"], &["10.20.0.192/26"]),
    ];
    let input = FabricInput {
        me: "h1",
        my_underlay: &mine,
        underlay_dev: "eth0",
        vxlan_dev: "fnx0",
        backend: Backend::Auto,
        peers: &peers,
        my_blocks: &[],
    };
    let choices = BTreeMap::from([
        (
            "h2".to_string(),
            choose(Backend::Auto, false, &mine, &peers[0], true, Probe::Pending),
        ),
        (
            "h3".to_string(),
            choose(
                Backend::Auto,
                false,
                &mine,
                &peers[1],
                true,
                Probe::Silent { misses: 5 },
            ),
        ),
        (
            "h4".to_string(),
            choose(
                Backend::Auto,
                false,
                &mine,
                &peers[2],
                true,
                Probe::Answered,
            ),
        ),
    ]);
    let (state, st) = desired(&input, SLEEVE_DEV, &choices);
    let backends: Vec<_> = st.iter().map(|s| (s.host.as_str(), s.backend)).collect();
    assert_eq!(
        backends,
        vec![
            ("h2", Some(Backend::Route)),
            ("h3", Some(Backend::Sleeve)),
            ("h4", Some(Backend::Vxlan))
        ]
    );
    let dev_of = |dst: &str| {
        state
            .routes
            .iter()
            .find(|r| r.dst == net(dst))
            .map(|r| r.dev.clone())
    };
    assert_eq!(dev_of("10.20.0.64/26").as_deref(), Some("eth0"));
    assert_eq!(dev_of("10.20.0.128/26").as_deref(), Some(SLEEVE_DEV));
    assert_eq!(dev_of("fd20::80/122").as_deref(), Some(SLEEVE_DEV));
    assert_eq!(dev_of("10.20.0.192/26").as_deref(), Some("fnx0"));
    // The sleeved peer keeps its VXLAN entries (no route), so the probe can still pass.
    assert!(state.fdb.iter().any(|f| f.mac == peers[1].vtep_mac));
    assert_eq!(state.routes.len(), 4);
}

#[test]
fn encrypted_vxlan_has_no_vxlan_entries() {
    let mine = [net("172.31.0.1/24")];
    let blocks = [net("10.20.0.0/26")];
    let peers = [peer("h2", &["172.31.0.2/24"], &["10.20.0.64/26"])];
    let input = FabricInput {
        me: "h1",
        my_underlay: &mine,
        underlay_dev: "eth0",
        vxlan_dev: "fnx0",
        backend: Backend::Vxlan,
        peers: &peers,
        my_blocks: &blocks,
    };
    let choices = BTreeMap::from([(
        "h2".to_string(),
        choose(Backend::Vxlan, true, &mine, &peers[0], true, Probe::Pending),
    )]);
    let (state, st) = desired(&input, SLEEVE_DEV, &choices);
    assert!(state.fdb.is_empty() && state.neigh.is_empty());
    let route = sleeve_route(net("10.20.0.64/26"), SLEEVE_DEV, &blocks);
    assert_eq!(state.routes.iter().next(), Some(&route));
    // This host's own packets into the sleeve leave from its gateway in the network: the
    // peer accepts only this host's blocks as sources.
    assert_eq!(route.src, Some("10.20.0.1".parse::<IpAddr>().unwrap()));
    assert_eq!(st[0].backend, Some(Backend::Sleeve));
    assert_eq!(
        probe_target(&peers[0]),
        Some("10.20.0.65".parse::<IpAddr>().unwrap())
    );
}
