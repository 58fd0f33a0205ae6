//! Records in the store are input (issue 12, part 8). A property test feeds hostile records
//! (quotes, `;`, newlines, `}`, `%`, `/`, unicode, huge names, port 0, addresses of the wrong
//! family) through discovery's validation and proves that every nft batch built from what
//! survives passes `nft -c` in a throwaway namespace and holds exactly the statements the same
//! records with plain names would give. An end-to-end test forges records in a real host's
//! store and shows the agent, `ferrynet reload` and DNS keep serving the good ones while
//! `ferrynet status` lists the bad keys.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{bin, need, out as text, within, Lab, Ns, Proc};
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::edge::{add_ports, base_ruleset, published_ports, EdgeNetwork};
use ferrynet_model::lb::{desired, full_batch};
use ferrynet_model::network::{keys, Endpoint, Network, NetworkMode, Subnet};
use ferrynet_model::policy::{EndpointIndex, PolicyEndpoint};
use ferrynet_model::portmap::{PortMapping, Protocol};
use ferrynet_model::service::{keys as skeys, IngressPort, Producer, Service, ServicePort};
use ferrynet_store::{EmbeddedStore, Op, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Strings a store writer might plant: plain names (most survive), names with one bad
/// character, known injections, arbitrary unicode and huge names.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9-]{0,10}",
        2 => "[a-z0-9]{1,4}[\";}{%/ \n\t\\\\é.]{1,2}[a-z]{0,4}",
        1 => Just("fn-x\"; flush ruleset; \"".to_string()),
        1 => Just("x\nadd rule inet ferrynet forward accept".to_string()),
        1 => Just("x\" ; delete table inet ferrynet ; \"".to_string()),
        1 => ".{0,40}",
        1 => "[a-z]{200,300}",
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..250).prop_map(|h| IpAddr::from([10, 1, 0, h])),
        any::<u16>().prop_map(|h| IpAddr::from([0xfd00, 1, 0, 0, 0, 0, 0, h])),
        // IPv4-mapped IPv6: an IPv4 address in the wrong family.
        (1u8..250).prop_map(|h| IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a01, h as u16])),
        Just(IpAddr::from([0, 0, 0, 0])),
        Just(IpAddr::from([224, 0, 0, 1])),
    ]
}

fn proto() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Sctp)
    ]
}

/// One generated cluster: every record with the key it is stored under.
#[derive(Clone)]
struct Forged {
    records: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Forged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.records
                    .iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

fn network(i: usize) -> impl Strategy<Value = Network> {
    (
        hostile(),
        prop_oneof![hostile().prop_map(|s| format!("fn-{s}")), hostile()],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(name, bridge, internal, v6)| {
            let mut subnets = vec![Subnet::new(format!("10.{}.0.0/16", i + 1).parse().unwrap())];
            if v6 {
                subnets.push(Subnet::new(format!("fd00:{}::/64", i + 1).parse().unwrap()));
            }
            Network {
                name,
                mode: NetworkMode::Bridge,
                bridge,
                subnets,
                mtu: None,
                internal,
                ip_masq: !internal,
                fabric: None,
                default_deny: false,
            }
        })
}

fn endpoint(net: String) -> impl Strategy<Value = Endpoint> {
    (
        hostile(),
        hostile(),
        proptest::collection::vec(addr(), 0..3),
        proptest::collection::vec((any::<u16>(), any::<u16>(), proto()), 0..3),
        proptest::collection::vec(hostile(), 0..3),
    )
        .prop_map(move |(cid, ifname, ips, ports, aliases)| Endpoint {
            ips: ips
                .into_iter()
                .map(|a| ipnet::IpNet::new(a, if a.is_ipv4() { 16 } else { 64 }).unwrap())
                .collect(),
            port_mappings: ports
                .into_iter()
                .map(|(h, c, p)| PortMapping {
                    host_port: h,
                    container_port: c,
                    protocol: p,
                    host_ip: None,
                })
                .collect(),
            aliases,
            ..Endpoint::new(&net, &cid, &ifname)
        })
}

fn service() -> impl Strategy<Value = Service> {
    (
        hostile(),
        proptest::collection::vec((hostile(), any::<u16>(), proto()), 0..3),
        proptest::collection::vec(addr(), 0..3),
        proptest::collection::vec(any::<u16>(), 0..2),
    )
        .prop_map(|(name, ports, vips, ingress)| {
            let ingress = ingress
                .iter()
                .zip(&ports)
                .map(|(p, (_, t, proto))| IngressPort {
                    published: *p,
                    target: *t,
                    protocol: *proto,
                    local: false,
                })
                .collect();
            Service {
                ports: ports
                    .into_iter()
                    .map(|(name, port, protocol)| ServicePort {
                        name,
                        port,
                        protocol,
                    })
                    .collect(),
                vips,
                ingress,
                ..Service::named(&name)
            }
        })
}

fn producer(service: String) -> impl Strategy<Value = Producer> {
    (
        hostile(),
        proptest::collection::vec(addr(), 0..3),
        proptest::collection::btree_map(any::<u16>(), any::<u16>(), 0..2),
    )
        .prop_map(move |(id, addrs, ports)| Producer {
            service: service.clone(),
            id,
            host: None,
            network: None,
            container: None,
            netns: None,
            addrs,
            ports,
            check: None,
        })
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn forged() -> impl Strategy<Value = Forged> {
    let nets = (0..3usize).map(network).collect::<Vec<_>>();
    (
        nets,
        proptest::collection::vec(service(), 0..3),
        any::<bool>(),
    )
        .prop_flat_map(|(nets, svcs, misfile)| {
            let net_names: Vec<String> = nets.iter().map(|n| n.name.clone()).collect();
            let svc_names: Vec<String> = svcs.iter().map(|s| s.name.clone()).collect();
            let eps = proptest::collection::vec(
                proptest::sample::select(net_names).prop_flat_map(endpoint),
                0..4,
            );
            let prods = if svc_names.is_empty() {
                Just(Vec::new()).boxed()
            } else {
                proptest::collection::vec(
                    proptest::sample::select(svc_names).prop_flat_map(producer),
                    0..4,
                )
                .boxed()
            };
            (Just(nets), Just(svcs), eps, prods, Just(misfile))
        })
        .prop_map(|(nets, svcs, eps, prods, misfile)| {
            let mut records = Vec::new();
            for (i, n) in nets.iter().enumerate() {
                // Now and then a good record filed under another record's key.
                let key = if misfile && i == 0 {
                    keys::network("elsewhere")
                } else {
                    keys::network(&n.name)
                };
                records.push((key, json(n)));
            }
            for e in &eps {
                records.push((
                    keys::endpoint(&e.network, &e.container_id, &e.ifname),
                    json(e),
                ));
            }
            for s in &svcs {
                records.push((skeys::service(&s.name), json(s)));
            }
            for p in &prods {
                records.push((skeys::producer(&p.service, &p.id), json(p)));
            }
            Forged { records }
        })
}

/// The view discovery builds from the records (validation included).
fn view_of(f: &Forged) -> DiscoveryView {
    let mut v = DiscoveryView::default();
    v.reset(f.records.iter().map(|(k, v)| (k.as_str(), v.as_slice())), 1);
    v
}

/// The same view with every name replaced by a plain one (`n0`, `fn-n0`, `s0`, `p0`, `e0`):
/// the batches it gives are the statements the records are expected to give.
fn plain_twin(v: &DiscoveryView) -> DiscoveryView {
    let mut t = v.clone();
    let nets: BTreeMap<String, String> = v
        .networks
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), format!("n{i}")))
        .collect();
    t.networks = v
        .networks
        .iter()
        .map(|(k, n)| {
            let name = nets[k].clone();
            let n = Network {
                name: name.clone(),
                bridge: format!("fn-{name}"),
                ..n.clone()
            };
            (name, n)
        })
        .collect();
    t.endpoints = EndpointIndex::new(
        v.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let network = nets
                    .get(&*e.network)
                    .cloned()
                    .unwrap_or_else(|| "gone".into());
                PolicyEndpoint {
                    id: format!("{network}/e{i}/eth0").into(),
                    network: network.into(),
                    aliases: vec![],
                    ..e.clone()
                }
            })
            .collect(),
    );
    let svcs: BTreeMap<String, String> = v
        .services
        .keys()
        .enumerate()
        .map(|(i, s)| (s.clone(), format!("s{i}")))
        .collect();
    t.services = v
        .services
        .iter()
        .map(|(k, s)| {
            let mut s = s.clone();
            s.name = svcs[k].clone();
            for (j, p) in s.ports.iter_mut().enumerate() {
                p.name = format!("p{j}");
            }
            (s.name.clone(), s)
        })
        .collect();
    t.producers = v
        .producers
        .iter()
        .enumerate()
        .map(|(i, ((svc, _), p))| {
            let svc = svcs.get(svc).cloned().unwrap_or_else(|| "gone".into());
            let p = Producer {
                service: svc.clone(),
                id: format!("p{i}"),
                ..p.clone()
            };
            ((svc, format!("p{i}")), p)
        })
        .collect();
    t
}

/// The edge batch (skeleton and published ports) and the load balancer's full batch.
fn batches(v: &DiscoveryView) -> Vec<String> {
    let nets: Vec<EdgeNetwork> = v
        .networks
        .values()
        .filter(|n| n.mode.gives_interfaces())
        .map(|n| EdgeNetwork {
            name: n.name.clone(),
            bridge: n.bridge.clone(),
            subnets: n.subnets.iter().map(|s| s.cidr).collect(),
            internal: n.internal,
            ip_masq: n.ip_masq && !n.internal,
            routed: n.mode == NetworkMode::Routed,
        })
        .collect();
    // A host port is published once (the store's port keys see to it); keep the first.
    let mut seen = std::collections::BTreeSet::new();
    let mut ports = Vec::new();
    for e in v.endpoints.iter() {
        let ips: Vec<IpAddr> = e.addrs.clone();
        for p in published_ports(&e.port_mappings, &ips) {
            if seen.insert(format!(
                "{:?}",
                (
                    p.mapping.protocol,
                    p.mapping.host_port,
                    p.container_ip.is_ipv6()
                )
            )) {
                ports.push(p);
            }
        }
    }
    let mut edge = base_ruleset(&nets);
    if !ports.is_empty() {
        edge.push_str(&add_ports(&ports));
    }
    vec![edge, full_batch(&desired(v, "h1"))]
}

/// Statements in a batch: its lines plus every `;` outside quotes and braces (a line with an
/// unbalanced quote or brace counts double, so a broken-out string never goes unseen).
fn statements(batch: &str) -> usize {
    batch
        .lines()
        .map(|l| {
            let (mut quoted, mut depth, mut n) = (false, 0i32, 1);
            for c in l.chars() {
                match c {
                    '"' => quoted = !quoted,
                    '{' if !quoted => depth += 1,
                    '}' if !quoted => depth -= 1,
                    ';' if !quoted && depth == 0 => n += 1,
                    _ => {}
                }
            }
            if quoted || depth != 0 {
                n += 1;
            }
            n
        })
        .sum()
}

/// `nft -c -f -` in `ns`: the batch parses and the kernel would take it.
fn nft_check(ns: &Ns, batch: &str) -> Result<(), String> {
    let mut child = Command::new("nsenter")
        .args([&ns.enter(), "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(batch.as_bytes())
        .map_err(|e| e.to_string())?;
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    o.status
        .success()
        .then_some(())
        .ok_or_else(|| format!("{}\n--- batch ---\n{batch}", text(&o)))
}

#[test]
fn batches_from_hostile_records_pass_nft_check_and_add_nothing() {
    let ns = Ns::new("hr");
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&forged(), |f| {
            let v = view_of(&f);
            let twin = plain_twin(&v);
            for (got, plain) in batches(&v).iter().zip(batches(&twin)) {
                prop_assert_eq!(
                    statements(got),
                    statements(&plain),
                    "extra statements in\n{}",
                    got
                );
                if let Err(e) = nft_check(&ns, got) {
                    return Err(TestCaseError::fail(e));
                }
            }
            // Every key is either kept or listed as refused (a key written twice counts once).
            let keys: std::collections::BTreeSet<&str> =
                f.records.iter().map(|(k, _)| k.as_str()).collect();
            let kept = v.networks.len() + v.endpoints.len() + v.services.len() + v.producers.len();
            prop_assert_eq!(kept + v.rejected.len(), keys.len());
            Ok(())
        })
        .unwrap();
}

/// The probe can fail: a hostile bridge that skips validation does add statements, and the
/// kernel check alone would not have caught it.
#[test]
fn the_statement_count_catches_an_unvalidated_injection() {
    let ns = Ns::new("hr");
    let evil = EdgeNetwork {
        name: "evil".into(),
        bridge: "fn-x\"; flush ruleset; \"".into(),
        subnets: vec!["10.9.0.0/16".parse().unwrap()],
        internal: false,
        ip_masq: true,
        routed: false,
    };
    let plain = EdgeNetwork {
        bridge: "fn-evil".into(),
        ..evil.clone()
    };
    let got = base_ruleset(std::slice::from_ref(&evil));
    assert!(statements(&got) > statements(&base_ruleset(&[plain])));
    // Injected text that still parses: only the count shows it.
    let sneaky = EdgeNetwork {
        name: "x\"\nadd table inet pwned\nadd rule inet ferrynet forward comment \"".into(),
        ..evil.clone()
    };
    let got = base_ruleset(&[EdgeNetwork {
        bridge: "fn-evil".into(),
        ..sneaky
    }]);
    let plain = base_ruleset(&[EdgeNetwork {
        name: "evil".into(),
        bridge: "fn-evil".into(),
        ..evil
    }]);
    assert!(statements(&got) > statements(&plain));
    let _ = nft_check(&ns, &got);
}

// ---- end to end: forged records in a real host's store -------------------------------------

struct Host {
    lab: Lab,
    agent: Option<Proc>,
    containers: Vec<String>,
    _outside: Ns,
}

impl Drop for Host {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.lab.cli(&["rm", "--force", c]);
        }
        self.agent.take();
    }
}

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(self.lab.state.path().join("agent.log")).unwrap_or_default()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.lab.cli(args);
        assert!(o.status.success(), "{args:?}: {}\n{}", text(&o), self.log());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn nft(&self, args: &[&str]) -> String {
        let mut v = vec!["nft"];
        v.extend_from_slice(args);
        self.lab.host.must(&v)
    }
}

fn forge(lab: &Lab, ops: Vec<Op>) {
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    let store: Arc<dyn Store> = Arc::new(store);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.txn(vec![], ops))
        .expect("forge records");
}

#[test]
fn forged_records_are_skipped_listed_and_never_break_the_others() {
    need("dig", "dnsutils");
    let lab = Lab::new();
    let t = common::tag();
    let good = format!("hg{t}");
    let (web, client) = (format!("hw{t}"), format!("hc{t}"));
    let (outside, _, _) = lab.outside(1);
    let underlay = lab.host_links("fto").pop().expect("outside link");
    let mut h = Host {
        lab,
        agent: None,
        containers: Vec::new(),
        _outside: outside,
    };
    h.ok(&["network", "create", &good, "--subnet", "10.71.0.0/24"]);
    let log = std::fs::File::create(h.lab.state.path().join("agent.log")).expect("log");
    let state = h.lab.state.path().display().to_string();
    let child = Command::new("nsenter")
        .args([
            &h.lab.host.enter(),
            bin(),
            "--state-dir",
            &state,
            "agent",
            "--host-name",
            "h1",
            "--underlay-dev",
            &underlay,
            "--dns-upstream",
            "none",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start agent");
    h.agent = Some(Proc(child));
    within(Duration::from_secs(20), || {
        let o = h.lab.cli(&["status", "--json"]);
        o.status.success().then_some(()).ok_or_else(|| text(&o))
    });
    for c in [&web, &client] {
        h.ok(&["run", "--name", c, "--net", &good, "--", "sleep", "600"]);
        h.containers.push(c.clone());
    }

    // Forge: a good service with a producer, and the hostile records of the brief.
    let good_svc = Service {
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        vips: vec!["10.96.7.7".parse().unwrap()],
        ..Service::named("api")
    };
    let good_prod = Producer {
        service: "api".into(),
        id: "p1".into(),
        host: None,
        network: Some(good.clone()),
        container: None,
        netns: None,
        addrs: vec!["10.71.0.200".parse().unwrap()],
        ports: BTreeMap::new(),
        check: None,
    };
    let evil_net = Network {
        bridge: "fn-x\"; flush ruleset; \"".into(),
        ..Network::bridged("evil", ["10.72.0.0/24".parse().unwrap()])
    };
    let newline_net = Network::bridged(
        "nl\nadd table inet pwned",
        ["10.73.0.0/24".parse().unwrap()],
    );
    let brace_svc = Service {
        ports: good_svc.ports.clone(),
        ..Service::named("x}")
    };
    let wrong_family = Producer {
        id: "p2".into(),
        addrs: vec!["fd00:71::9".parse().unwrap()],
        ..good_prod.clone()
    };
    let spaced = Endpoint {
        ips: vec!["10.71.0.99/24".parse().unwrap()],
        name: Some("forged".into()),
        aliases: vec!["a b".into()],
        ..Endpoint::new(&good, "forged1", "eth0")
    };
    let bad_keys = [
        keys::network("evil"),
        keys::network(&newline_net.name),
        skeys::service("x}"),
        skeys::producer("api", "p2"),
        keys::endpoint(&good, "forged1", "eth0"),
    ];
    forge(
        &h.lab,
        vec![
            Op::put(skeys::service("api"), json(&good_svc)),
            Op::put(skeys::producer("api", "p1"), json(&good_prod)),
            Op::put(bad_keys[0].clone(), json(&evil_net)),
            Op::put(bad_keys[1].clone(), json(&newline_net)),
            Op::put(bad_keys[2].clone(), json(&brace_svc)),
            Op::put(bad_keys[3].clone(), json(&wrong_family)),
            Op::put(bad_keys[4].clone(), json(&spaced)),
        ],
    );

    // `ferrynet status` lists every bad key.
    within(Duration::from_secs(20), || {
        let o = h.lab.cli(&["status", "--json"]);
        let st: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let listed: Vec<&str> = st["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["key"].as_str())
            .collect();
        bad_keys
            .iter()
            .all(|k| listed.contains(&k.as_str()))
            .then_some(())
            .ok_or(format!("listed {listed:?}\n{}", h.log()))
    });
    let human = h.ok(&["status"]);
    assert!(human.contains("rejected records (5)"), "{human}");
    assert!(
        !human.contains("nl\nadd"),
        "keys are printed escaped: {human}"
    );

    // The load balancer serves the good service.
    within(Duration::from_secs(20), || {
        let o = h
            .lab
            .host
            .run(&["nft", "list", "table", "inet", "ferrynet-svc"]);
        let s = text(&o);
        (s.contains("svc-api-tcp-80-4") && s.contains("10.71.0.200") && !s.contains("x}"))
            .then_some(())
            .ok_or(format!("{s}\n{}", h.log()))
    });
    // `ferrynet reload` rebuilds the edge from the good records and keeps everything else.
    h.ok(&["reload"]);
    let edge = h.nft(&["list", "table", "inet", "ferrynet"]);
    assert!(edge.contains(&format!("outbound {good}")), "{edge}");
    assert!(
        !edge.contains("evil") && !edge.contains("10.72.0.0"),
        "{edge}"
    );
    let tables = h.nft(&["list", "tables"]);
    assert!(
        tables.contains("inet ferrynet-svc") && !tables.contains("pwned"),
        "{tables}"
    );

    // DNS answers the good names and not the forged ones.
    let zone = format!("{good}.ferrynet.internal");
    let dig = |name: &str| {
        let q = format!("{name}.{zone}");
        let o = h.lab.cli(&[
            "exec",
            &client,
            "--",
            "dig",
            "+short",
            "+tries=1",
            "+time=5",
            "@10.71.0.1",
            &q,
            "A",
        ]);
        text(&o).trim().to_string()
    };
    within(Duration::from_secs(20), || {
        let (w, api) = (dig(&web), dig("api"));
        (w.starts_with("10.71.0.") && api == "10.96.7.7")
            .then_some(())
            .ok_or(format!("web {w:?} api {api:?}\n{}", h.log()))
    });
    assert_eq!(
        dig("forged"),
        "",
        "the endpoint with a bad alias is not served"
    );
    // Repaired, the record is served and leaves the list.
    let repaired = Endpoint {
        aliases: vec!["a-b".into()],
        ..spaced
    };
    forge(&h.lab, vec![Op::put(bad_keys[4].clone(), json(&repaired))]);
    within(Duration::from_secs(20), || {
        let got = dig("a-b");
        (got == "10.71.0.99").then_some(()).ok_or(got)
    });
    // The status list follows (it is refreshed on the agent's next event or tick).
    within(Duration::from_secs(20), || {
        let o = h.lab.cli(&["status", "--json"]);
        let st: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let listed = st["rejected"].to_string();
        (!listed.contains("forged1") && listed.contains("evil"))
            .then_some(())
            .ok_or(listed)
    });
}
