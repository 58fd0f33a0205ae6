//! What the embedded DNS server answers, decided from a [`DiscoveryView`] alone (pure).
//!
//! A [`Zone`] is compiled once per view change: per network, a map from lower-case names to
//! records, so a query costs a couple of hash lookups whatever the cluster's size.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;

/// Default cluster domain.
pub const DEFAULT_DOMAIN: &str = "ferrynet.internal";

/// The query types the zone distinguishes; anything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Service location.
    Srv,
    /// Reverse lookup.
    Ptr,
    /// Any other type: a known name answers with no data.
    Other,
}

/// The data of one answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    /// An address (A or AAAA by family).
    Addr(IpAddr),
    /// A service location: port and target name (fully qualified, no trailing dot).
    Srv {
        /// The producer's port.
        port: u16,
        /// Its name, which resolves to its addresses.
        target: String,
    },
    /// A reverse pointer to a name (fully qualified, no trailing dot).
    Ptr(String),
}

/// One answer record; `name` None means the query's own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Owner name (None: the query name, spelled as the client spelled it).
    pub name: Option<String>,
    /// The data.
    pub data: RData,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name exists here: these records (possibly none: no data of that type).
    Records {
        /// Answer section.
        answers: Vec<Rec>,
        /// Additional section (addresses of SRV targets).
        additionals: Vec<Rec>,
    },
    /// A name inside the cluster domain (or a cluster reverse zone) that does not exist.
    NxDomain,
    /// Not ours: ask the upstream resolvers.
    Forward,
    /// Not ours, and the network may not reach outside (internal): not forwarded.
    Refused,
}

impl Answer {
    fn records(answers: Vec<Rec>) -> Answer {
        Answer::Records {
            answers,
            additionals: Vec::new(),
        }
    }
    fn empty() -> Answer {
        Answer::records(Vec::new())
    }
}

/// An SRV target: a producer's name label and its addresses and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Task {
    label: String,
    addrs: Vec<IpAddr>,
}

#[derive(Debug, Default, Clone)]
struct NetZone {
    /// Lower-case network name, the label(s) between a name and the domain.
    name: String,
    /// `X` -> addresses: services (their VIPs, else their healthy producers) win over
    /// containers and aliases.
    names: HashMap<String, Vec<IpAddr>>,
    /// Service `X` -> its healthy producers (`tasks.X`, `<id>.tasks.X`).
    tasks: HashMap<String, Vec<Task>>,
    /// `_<port>._<proto>.X` -> (producer label, port).
    srv: HashMap<String, Vec<(String, u16)>>,
    /// Address -> the name it reverses to (relative to the network's zone).
    ptr: HashMap<IpAddr, String>,
    /// The network's pool: reverse lookups inside it never leave the host.
    subnets: Vec<ipnet::IpNet>,
    /// An internal network: its containers' queries are never forwarded.
    internal: bool,
    /// Pod names (`POD.NAMESPACE`): answered as asked, without the network's domain, though
    /// they have a dot (other dotted names outside the domain are forwarded).
    pods: HashSet<String>,
}

/// The compiled answers of one host's DNS server.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    domain: String,
    nets: HashMap<String, NetZone>,
}

/// A name as a DNS label: lower case, anything but letters, digits and `-` becomes `-`.
pub fn label(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

fn push_unique(v: &mut Vec<IpAddr>, a: IpAddr) {
    if !v.contains(&a) {
        v.push(a);
    }
}

impl Zone {
    /// Compile the answers for every bridged network of `view` under `domain`.
    pub fn build(view: &DiscoveryView, domain: &str) -> Zone {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut nets = HashMap::new();
        for (name, net) in &view.networks {
            if !net.mode.gives_interfaces() {
                continue;
            }
            let mut z = NetZone {
                name: name.to_ascii_lowercase(),
                subnets: net.subnets.iter().map(|s| s.cidr).collect(),
                internal: net.internal,
                ..Default::default()
            };
            // Containers and aliases first; services overwrite them below.
            for ep in view.endpoints_on(name) {
                let addrs = &ep.addrs;
                let primary = ep.name.as_deref().map(str::to_ascii_lowercase);
                for n in primary.iter().chain(
                    ep.aliases
                        .iter()
                        .map(|a| a.to_ascii_lowercase())
                        .collect::<Vec<_>>()
                        .iter(),
                ) {
                    let e = z.names.entry(n.clone()).or_default();
                    for a in addrs {
                        push_unique(e, *a);
                    }
                }
                if let Some(p) = &primary {
                    for a in addrs {
                        z.ptr.insert(*a, p.clone());
                    }
                }
            }
            // Pods: `POD.NAMESPACE`, from the newest endpoint of each pod only (a pod
            // re-created under its name answers at its new address, whether or not the old
            // sandbox's record is gone yet). They win over container names and aliases
            // spelled the same, so a container or a namespace-less runtime cannot take a
            // pod's name; services, whose names have no dots, never meet them.
            for (pname, pep) in view.pods_on(name) {
                let addrs: Vec<IpAddr> = pep.addrs.clone();
                for a in &addrs {
                    z.ptr.insert(*a, pname.clone());
                }
                z.names.insert(pname.clone(), addrs);
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
                    // No virtual IP: round robin over the producers, as Docker's dnsrr mode.
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
            // Keyed by the network's own name: the server asks with it.
            nets.insert(name.clone(), z);
        }
        Zone { domain, nets }
    }

    /// The answer to `qname`/`qtype` asked on `network` (the network whose gateway received it).
    pub fn answer(&self, network: &str, qname: &str, qtype: QType) -> Answer {
        let Some(net) = self.nets.get(network) else {
            return Answer::Forward;
        };
        match self.local(net, qname, qtype) {
            Answer::Forward if net.internal => Answer::Refused,
            a => a,
        }
    }

    /// The addresses of a container, alias or service name asked on `network`, for the wire
    /// fast path: `lower` is the query name in lower case without its trailing dot. `Some` only
    /// where [`Zone::answer`] would answer from the names map (the caller filters by family);
    /// `None` for everything else (reverse names, the zone apexes, `tasks.`, SRV, NXDOMAIN,
    /// forwards), which the caller leaves to the general path.
    pub fn names_hit(&self, network: &str, lower: &str) -> Option<&[IpAddr]> {
        let net = self.nets.get(network)?;
        if lower.ends_with(".arpa") || lower == self.domain {
            return None;
        }
        let inner = match below(lower, &self.domain) {
            Some(rest) => below(rest, &net.name)?,
            None if !lower.contains('.') || net.pods.contains(lower) => lower,
            None => return None,
        };
        net.names.get(inner).map(Vec::as_slice)
    }

    fn local(&self, net: &NetZone, qname: &str, qtype: QType) -> Answer {
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ip) = parse_reverse(&q) {
            return self.reverse(net, ip, qtype);
        }
        let inner = if q == self.domain {
            return Answer::empty();
        } else if let Some(rest) = below(&q, &self.domain) {
            if rest == net.name {
                return Answer::empty();
            }
            match below(rest, &net.name) {
                Some(inner) => inner,
                // Another network's name, or nothing at all: invisible from here.
                None => return Answer::NxDomain,
            }
        } else if (!q.contains('.') || net.pods.contains(&q)) && net.names.contains_key(&q) {
            // A bare name a resolver sent without the search domain, or a pod's
            // `POD.NAMESPACE`.
            q.as_str()
        } else {
            return Answer::Forward;
        };
        self.lookup(net, inner, qtype)
    }

    fn fqdn(&self, net: &NetZone, rel: &str) -> String {
        format!("{rel}.{}.{}", net.name, self.domain)
    }

    fn lookup(&self, net: &NetZone, inner: &str, qtype: QType) -> Answer {
        if let Some(addrs) = net.names.get(inner) {
            return Answer::records(addr_recs(None, addrs, qtype));
        }
        if let Some(svc) = inner.strip_prefix("tasks.") {
            if let Some(tasks) = net.tasks.get(svc) {
                let all: Vec<IpAddr> = tasks.iter().flat_map(|t| t.addrs.clone()).collect();
                return Answer::records(addr_recs(None, &all, qtype));
            }
        }
        if let Some((id, svc)) = inner.split_once(".tasks.") {
            if let Some(t) = net
                .tasks
                .get(svc)
                .and_then(|ts| ts.iter().find(|t| t.label == id))
            {
                return Answer::records(addr_recs(None, &t.addrs, qtype));
            }
        }
        if let Some(targets) = net.srv.get(inner) {
            if qtype != QType::Srv {
                return Answer::empty();
            }
            let svc = inner.splitn(3, '.').nth(2).unwrap_or_default();
            let tasks = net.tasks.get(svc).map(Vec::as_slice).unwrap_or_default();
            let mut answers = Vec::new();
            let mut additionals = Vec::new();
            for (id, port) in targets {
                let target = self.fqdn(net, &format!("{id}.tasks.{svc}"));
                if let Some(t) = tasks.iter().find(|t| t.label == *id) {
                    for a in &t.addrs {
                        additionals.push(Rec {
                            name: Some(target.clone()),
                            data: RData::Addr(*a),
                        });
                    }
                }
                answers.push(Rec {
                    name: None,
                    data: RData::Srv {
                        port: *port,
                        target,
                    },
                });
            }
            return Answer::Records {
                answers,
                additionals,
            };
        }
        Answer::NxDomain
    }

    fn reverse(&self, net: &NetZone, ip: IpAddr, qtype: QType) -> Answer {
        match net.ptr.get(&ip) {
            Some(rel) if qtype == QType::Ptr => Answer::records(vec![Rec {
                name: None,
                data: RData::Ptr(self.fqdn(net, rel)),
            }]),
            Some(_) => Answer::empty(),
            None if net.subnets.iter().any(|s| s.contains(&ip)) => Answer::NxDomain,
            None => Answer::Forward,
        }
    }
}

/// `name` without `.suffix` (whole labels only), if it ends so.
fn below<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)?.strip_suffix('.')
}

fn addr_recs(name: Option<&str>, addrs: &[IpAddr], qtype: QType) -> Vec<Rec> {
    let want_v6 = match qtype {
        QType::A => false,
        QType::Aaaa => true,
        _ => return Vec::new(),
    };
    addrs
        .iter()
        .filter(|a| a.is_ipv6() == want_v6)
        .map(|a| Rec {
            name: name.map(str::to_string),
            data: RData::Addr(*a),
        })
        .collect()
}

/// The address a full reverse name (`4.3.2.1.in-addr.arpa`, 32 nibbles `.ip6.arpa`) stands
/// for; None for anything else (partial reverse zones included).
pub fn parse_reverse(q: &str) -> Option<IpAddr> {
    if let Some(rest) = q.strip_suffix(".in-addr.arpa") {
        let parts: Vec<u8> = rest
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if parts.len() != 4 {
            return None;
        }
        return Some(IpAddr::from([parts[3], parts[2], parts[1], parts[0]]));
    }
    let rest = q.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|p| {
            (p.len() == 1)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let v = nibbles
        .iter()
        .rev()
        .fold(0u128, |acc, n| (acc << 4) | u128::from(*n));
    Some(IpAddr::from(std::net::Ipv6Addr::from(v)))
}

/// The reverse name of an address.
#[cfg(test)]
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let mut s = String::new();
            for i in 0..32 {
                s.push_str(&format!("{:x}.", (v >> (i * 4)) & 0xf));
            }
            s + "ip6.arpa"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::network::{keys as nkeys, Endpoint, Network};
    use ferrynet_model::portmap::Protocol;
    use ferrynet_model::service::{keys as skeys, Producer, Service, ServicePort};
    use std::collections::BTreeMap;

    fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }
    fn net(name: &str, cidrs: &[&str]) -> Network {
        Network::bridged(name, cidrs.iter().map(|c| c.parse().unwrap()))
    }
    fn ep(net: &str, id: &str, name: Option<&str>, aliases: &[&str], ips: &[&str]) -> Endpoint {
        Endpoint {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            name: name.map(Into::into),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            ..Endpoint::new(net, id, "eth0")
        }
    }
    fn put_ep(v: &mut DiscoveryView, e: &Endpoint) {
        v.put(
            &nkeys::endpoint(&e.network, &e.container_id, &e.ifname),
            &enc(e),
        );
    }
    fn addr(s: &str) -> Rec {
        Rec {
            name: None,
            data: RData::Addr(s.parse().unwrap()),
        }
    }
    fn recs(a: Answer) -> Vec<Rec> {
        match a {
            Answer::Records { answers, .. } => answers,
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn sample() -> DiscoveryView {
        let mut v = DiscoveryView::default();
        v.put(
            &nkeys::network("blue"),
            &enc(&net("blue", &["10.30.0.0/24", "fd00:30::/64"])),
        );
        v.put(&nkeys::network("red"), &enc(&net("red", &["10.31.0.0/24"])));
        put_ep(
            &mut v,
            &ep(
                "blue",
                "c1",
                Some("web1"),
                &["www"],
                &["10.30.0.2/24", "fd00:30::2/64"],
            ),
        );
        put_ep(
            &mut v,
            &ep("blue", "c2", Some("db"), &[], &["10.30.0.3/24"]),
        );
        put_ep(
            &mut v,
            &ep("red", "c3", Some("secret"), &[], &["10.31.0.2/24"]),
        );
        v.put(&nkeys::host("h1"), b"{}");
        let svc = Service {
            name: "api".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            vips: vec!["10.96.0.5".parse().unwrap()],
            networks: vec!["blue".into()],
            ingress: vec![],
            affinity: false,
            check: None,
        };
        v.put(&skeys::service("api"), &enc(&svc));
        for (id, ip, port) in [("a1", "10.30.0.10", 8080), ("a2", "10.30.0.11", 8081)] {
            let p = Producer {
                service: "api".into(),
                id: id.into(),
                host: Some("h1".into()),
                network: Some("blue".into()),
                container: None,
                netns: None,
                addrs: vec![ip.parse().unwrap()],
                ports: BTreeMap::from([(80, port)]),
                check: None,
            };
            v.put(&skeys::producer("api", id), &enc(&p));
        }
        v
    }

    #[test]
    fn containers_and_aliases_by_family() {
        let z = Zone::build(&sample(), DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "web1.blue.ferrynet.internal.", QType::A)),
            vec![addr("10.30.0.2")]
        );
        assert_eq!(
            recs(z.answer("blue", "WWW.Blue.FerryNet.Internal", QType::Aaaa)),
            vec![addr("fd00:30::2")]
        );
        assert_eq!(
            recs(z.answer("blue", "web1", QType::A)),
            vec![addr("10.30.0.2")]
        );
        // A name with no address of the family exists: no data, not NXDOMAIN.
        assert_eq!(
            recs(z.answer("blue", "db.blue.ferrynet.internal", QType::Aaaa)),
            vec![]
        );
        assert_eq!(
            recs(z.answer("blue", "db.blue.ferrynet.internal", QType::Other)),
            vec![]
        );
    }

    fn pod(net: &str, id: &str, ns: &str, name: &str, ips: &[&str]) -> Endpoint {
        let mut e = ep(net, id, None, &[], ips);
        e.pod = Some(ferrynet_model::pod::PodIdentity {
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            infra_container_id: Some(id.into()),
        });
        e.labels.insert("namespace".into(), ns.into());
        e
    }
    fn put_pod(v: &mut DiscoveryView, e: &Endpoint, created: u64) {
        let key = nkeys::endpoint(&e.network, &e.container_id, &e.ifname);
        v.put_created(&key, &enc(e), created);
    }

    #[test]
    fn pods_by_name_and_namespace() {
        let mut v = sample();
        put_pod(
            &mut v,
            &pod(
                "blue",
                "s1",
                "default",
                "web-0",
                &["10.30.0.20/24", "fd00:30::20/64"],
            ),
            10,
        );
        put_pod(
            &mut v,
            &pod("blue", "s2", "team-b", "web-0", &["10.30.0.21/24"]),
            11,
        );
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        for q in [
            "web-0.default",
            "Web-0.Default.",
            "web-0.default.blue.ferrynet.internal",
        ] {
            assert_eq!(
                recs(z.answer("blue", q, QType::A)),
                vec![addr("10.30.0.20")],
                "{q}"
            );
        }
        assert_eq!(
            recs(z.answer("blue", "web-0.default", QType::Aaaa)),
            vec![addr("fd00:30::20")]
        );
        assert_eq!(
            recs(z.answer("blue", "web-0.team-b", QType::A)),
            vec![addr("10.30.0.21")]
        );
        // The fast path agrees.
        assert_eq!(
            z.names_hit("blue", "web-0.default"),
            Some(
                &[
                    "10.30.0.20".parse().unwrap(),
                    "fd00:30::20".parse().unwrap()
                ][..]
            )
        );
        // The bare pod name is no name of its own (it would mix namespaces).
        assert_eq!(z.answer("blue", "web-0", QType::A), Answer::Forward);
        assert_eq!(
            z.answer("blue", "web-0.blue.ferrynet.internal", QType::A),
            Answer::NxDomain
        );
        // Reverse: the pod's name.
        let r = recs(z.answer(
            "blue",
            &reverse_name("10.30.0.20".parse().unwrap()),
            QType::Ptr,
        ));
        assert_eq!(
            r[0].data,
            RData::Ptr("web-0.default.blue.ferrynet.internal".into())
        );
        // Other dotted names stay outside: forwarded.
        assert_eq!(z.answer("blue", "web-0.nobody", QType::A), Answer::Forward);
        assert_eq!(z.names_hit("blue", "web-0.nobody"), None);
        // Another network does not see them.
        assert_eq!(z.answer("red", "web-0.default", QType::A), Answer::Forward);
    }

    #[test]
    fn a_recreated_pod_takes_its_name_and_keeps_it() {
        let mut v = sample();
        let old = pod("blue", "s1", "default", "web-0", &["10.30.0.20/24"]);
        let new = pod("blue", "s9", "default", "web-0", &["10.30.0.29/24"]);
        put_pod(&mut v, &old, 10);
        put_pod(&mut v, &new, 12);
        // Both records exist: the newer sandbox holds the name alone.
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "web-0.default", QType::A)),
            vec![addr("10.30.0.29")]
        );
        let old_ptr = reverse_name("10.30.0.20".parse().unwrap());
        assert_eq!(z.answer("blue", &old_ptr, QType::Ptr), Answer::NxDomain);
        // Whatever order the watch delivered them in.
        let mut w = sample();
        put_pod(&mut w, &new, 12);
        put_pod(&mut w, &old, 10);
        let z = Zone::build(&w, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "web-0.default", QType::A)),
            vec![addr("10.30.0.29")]
        );
        // The old sandbox's DEL removes its record: the name stays on the new address.
        v.delete(&nkeys::endpoint("blue", "s1", "eth0"));
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "web-0.default", QType::A)),
            vec![addr("10.30.0.29")]
        );
        // An update of the old record (a later write) does not make it newer.
        let mut v = sample();
        put_pod(&mut v, &old, 10);
        put_pod(&mut v, &new, 12);
        let mut touched = old.clone();
        touched.host_mac = Some("02:00:00:00:00:01".into());
        put_pod(&mut v, &touched, 10);
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "web-0.default", QType::A)),
            vec![addr("10.30.0.29")]
        );
    }

    #[test]
    fn no_one_else_takes_a_pods_name() {
        let mut v = sample();
        put_pod(
            &mut v,
            &pod("blue", "s1", "default", "web-0", &["10.30.0.20/24"]),
            10,
        );
        // A pod of another namespace named like it, a namespace-less runtime's container and a
        // CLI container spelled `web-0.default`, all created later.
        put_pod(
            &mut v,
            &pod("blue", "s2", "evil", "web-0.default", &["10.30.0.66/24"]),
            11,
        );
        put_pod(
            &mut v,
            &ep("blue", "s3", Some("web-0.default"), &[], &["10.30.0.67/24"]),
            12,
        );
        put_pod(
            &mut v,
            &ep(
                "blue",
                "s4",
                Some("x"),
                &["Web-0.Default"],
                &["10.30.0.68/24"],
            ),
            13,
        );
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        for q in ["web-0.default", "web-0.default.blue.ferrynet.internal"] {
            assert_eq!(
                recs(z.answer("blue", q, QType::A)),
                vec![addr("10.30.0.20")],
                "{q}"
            );
        }
        // The other namespace's pod has its own, longer name.
        assert_eq!(
            recs(z.answer("blue", "web-0.default.evil", QType::A)),
            vec![addr("10.30.0.66")]
        );
    }

    #[test]
    fn other_networks_are_invisible() {
        let z = Zone::build(&sample(), DEFAULT_DOMAIN);
        assert_eq!(
            z.answer("blue", "secret.red.ferrynet.internal", QType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.answer("blue", "secret.blue.ferrynet.internal", QType::A),
            Answer::NxDomain
        );
        assert_eq!(
            recs(z.answer("red", "secret.red.ferrynet.internal", QType::A)),
            vec![addr("10.31.0.2")]
        );
        // The service is visible on blue only.
        assert_eq!(
            z.answer("red", "api.red.ferrynet.internal", QType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.answer("red", "web1.blue.ferrynet.internal", QType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn outside_names_are_forwarded() {
        let z = Zone::build(&sample(), DEFAULT_DOMAIN);
        assert_eq!(z.answer("blue", "example.org", QType::A), Answer::Forward);
        assert_eq!(z.answer("blue", "nosuchbare", QType::A), Answer::Forward);
        assert_eq!(z.answer("unknown-net", "web1", QType::A), Answer::Forward);
        assert_eq!(
            recs(z.answer("blue", "ferrynet.internal", QType::A)),
            vec![]
        );
        assert_eq!(
            recs(z.answer("blue", "blue.ferrynet.internal", QType::A)),
            vec![]
        );
    }

    #[test]
    fn services_tasks_and_srv() {
        let z = Zone::build(&sample(), DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "api.blue.ferrynet.internal", QType::A)),
            vec![addr("10.96.0.5")]
        );
        assert_eq!(
            recs(z.answer("blue", "tasks.api.blue.ferrynet.internal", QType::A)),
            vec![addr("10.30.0.10"), addr("10.30.0.11")]
        );
        assert_eq!(
            recs(z.answer("blue", "a2.tasks.api.blue.ferrynet.internal", QType::A)),
            vec![addr("10.30.0.11")]
        );
        let Answer::Records {
            answers,
            additionals,
        } = z.answer("blue", "_http._tcp.api.blue.ferrynet.internal", QType::Srv)
        else {
            panic!("no SRV")
        };
        assert_eq!(
            answers[1].data,
            RData::Srv {
                port: 8081,
                target: "a2.tasks.api.blue.ferrynet.internal".into()
            }
        );
        assert_eq!(additionals.len(), 2);
        assert_eq!(
            additionals[0].name.as_deref(),
            Some("a1.tasks.api.blue.ferrynet.internal")
        );
        assert_eq!(
            z.answer("blue", "_grpc._tcp.api.blue.ferrynet.internal", QType::Srv),
            Answer::NxDomain
        );
    }

    #[test]
    fn unhealthy_producers_leave_tasks_and_srv() {
        let mut v = sample();
        v.delete(&nkeys::host("h1"));
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "tasks.api.blue.ferrynet.internal", QType::A)),
            vec![]
        );
        assert_eq!(
            recs(z.answer("blue", "_http._tcp.api.blue.ferrynet.internal", QType::Srv)),
            vec![]
        );
        // The VIP stays: the load balancer decides what is behind it.
        assert_eq!(
            recs(z.answer("blue", "api.blue.ferrynet.internal", QType::A)),
            vec![addr("10.96.0.5")]
        );
    }

    #[test]
    fn service_without_vip_answers_its_producers() {
        let mut v = sample();
        let mut svc: Service = serde_json::from_slice(&enc(&v.services["api"])).unwrap();
        svc.vips.clear();
        v.put(&skeys::service("api"), &enc(&svc));
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(
            recs(z.answer("blue", "api", QType::A)),
            vec![addr("10.30.0.10"), addr("10.30.0.11")]
        );
    }

    #[test]
    fn reverse_lookups() {
        let z = Zone::build(&sample(), "Cluster.Test.");
        let ptr = |ip: &str| RData::Ptr(ip.into());
        let q = reverse_name("10.30.0.2".parse().unwrap());
        assert_eq!(q, "2.0.30.10.in-addr.arpa");
        assert_eq!(
            recs(z.answer("blue", &q, QType::Ptr))[0].data,
            ptr("web1.blue.cluster.test")
        );
        let q6 = reverse_name("fd00:30::2".parse().unwrap());
        assert_eq!(parse_reverse(&q6), Some("fd00:30::2".parse().unwrap()));
        assert_eq!(
            recs(z.answer("blue", &q6, QType::Ptr))[0].data,
            ptr("web1.blue.cluster.test")
        );
        // Unknown address inside the network's pool: ours to deny; elsewhere: upstream's.
        let unknown = reverse_name("10.30.0.99".parse().unwrap());
        assert_eq!(z.answer("blue", &unknown, QType::Ptr), Answer::NxDomain);
        let outside = reverse_name("192.0.2.1".parse().unwrap());
        assert_eq!(z.answer("blue", &outside, QType::Ptr), Answer::Forward);
        // Another network's container does not reverse from here.
        let other = reverse_name("10.31.0.2".parse().unwrap());
        assert_eq!(z.answer("blue", &other, QType::Ptr), Answer::Forward);
        assert_eq!(parse_reverse("1.2.3.in-addr.arpa"), None);
        assert_eq!(parse_reverse("x.2.3.4.in-addr.arpa"), None);
    }

    #[test]
    fn internal_networks_do_not_forward() {
        let mut v = sample();
        let mut red = net("red", &["10.31.0.0/24"]);
        red.internal = true;
        v.put(&nkeys::network("red"), &enc(&red));
        let z = Zone::build(&v, DEFAULT_DOMAIN);
        assert_eq!(z.answer("red", "example.org", QType::A), Answer::Refused);
        assert_eq!(
            recs(z.answer("red", "secret", QType::A)),
            vec![addr("10.31.0.2")]
        );
        assert_eq!(z.answer("blue", "example.org", QType::A), Answer::Forward);
    }

    #[test]
    fn labels() {
        assert_eq!(label("Web_1.x"), "web-1-x");
    }
}

#[cfg(test)]
#[path = "zone_hostile.rs"]
mod hostile;
