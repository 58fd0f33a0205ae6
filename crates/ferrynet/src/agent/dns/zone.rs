//! What the embedded DNS server answers, decided from a [`DiscoveryView`] alone (pure).
//!
//! A [`Zone`] holds, per network, maps from lower-case names to records, so a query costs a
//! couple of hash lookups whatever the cluster's size. A [`ZoneBuilder`] keeps it up to date
//! per change: each endpoint added, changed or removed updates only its own names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::policy::PolicyEndpoint;
use imbl::ordmap::DiffItem;

#[cfg(test)]
mod incremental_tests;
mod names;
mod services;

use names::EndpointNames;
use services::{ServiceInputs, ServiceNames};

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

/// One network's answers: its endpoints' names (kept per endpoint) under its services' names.
#[derive(Debug, Default, Clone)]
struct NetZone {
    /// Lower-case network name, the label(s) between a name and the domain.
    name: String,
    /// Container, alias and pod names; services win over them.
    eps: EndpointNames,
    /// Service names, `tasks.` and SRV records.
    svc: Arc<ServiceNames>,
    /// The network's pool: reverse lookups inside it never leave the host.
    subnets: Vec<ipnet::IpNet>,
    /// An internal network: its containers' queries are never forwarded.
    internal: bool,
}

impl NetZone {
    /// The addresses a name answers with: a service's, else a pod's, else a container's.
    fn addrs(&self, name: &str) -> Option<&[IpAddr]> {
        match self.svc.names.get(name) {
            Some(a) => Some(a),
            None => self.eps.name(name),
        }
    }

    /// The name an address reverses to: a VIP's service, else a pod's, else a container's.
    fn ptr(&self, ip: &IpAddr) -> Option<&str> {
        match self.svc.ptr.get(ip) {
            Some(n) => Some(n),
            None => self.eps.ptr(ip),
        }
    }
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

/// Keeps a zone up to date with successive views: endpoint changes are found by diffing the
/// views' persistent endpoint maps (shared structure is skipped, so the cost follows the
/// change, not the cluster) and applied one endpoint at a time; the service part is compiled
/// again only when its inputs changed.
#[derive(Debug, Default)]
pub struct ZoneBuilder {
    domain: String,
    /// The endpoints the names below were built from.
    seen: imbl::OrdMap<Arc<str>, Arc<PolicyEndpoint>>,
    /// Endpoint names per network (also for networks not known yet: the record may follow).
    by_network: HashMap<Arc<str>, EndpointNames>,
    /// What the service names were compiled from, and the result per network.
    svc_inputs: Option<ServiceInputs>,
    svc: HashMap<String, Arc<ServiceNames>>,
}

impl ZoneBuilder {
    /// A builder for names under `domain`.
    pub fn new(domain: &str) -> ZoneBuilder {
        ZoneBuilder {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            ..ZoneBuilder::default()
        }
    }

    /// Bring the zone up to `view` and return it (a cheap copy: the maps are shared).
    pub fn update(&mut self, view: &DiscoveryView) -> Zone {
        let list = &view.endpoints.list;
        for change in self.seen.diff(list) {
            let (old, new) = match change {
                DiffItem::Add(_, e) => (None, Some(e)),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
                DiffItem::Remove(_, e) => (Some(e), None),
            };
            // An endpoint that moved networks leaves one and joins the other.
            if let Some(o) = old {
                self.by_network
                    .entry(o.network.clone())
                    .or_default()
                    .apply(Some(o), None);
            }
            if let Some(n) = new {
                self.by_network
                    .entry(n.network.clone())
                    .or_default()
                    .apply(None, Some(n));
            }
        }
        self.seen = list.clone();
        if !self.svc_inputs.as_ref().is_some_and(|i| i.same_as(view)) {
            self.svc = view
                .networks
                .keys()
                .map(|n| (n.clone(), Arc::new(ServiceNames::on(view, n))))
                .collect();
            self.svc_inputs = Some(ServiceInputs::of(view));
        }
        self.zone(view)
    }

    /// The zone of every network that gives its containers interfaces.
    fn zone(&self, view: &DiscoveryView) -> Zone {
        let mut nets = HashMap::new();
        for (name, net) in &view.networks {
            if !net.mode.gives_interfaces() {
                continue;
            }
            let z = NetZone {
                name: name.to_ascii_lowercase(),
                eps: self
                    .by_network
                    .get(name.as_str())
                    .cloned()
                    .unwrap_or_default(),
                svc: self.svc.get(name).cloned().unwrap_or_default(),
                subnets: net.subnets.iter().map(|s| s.cidr).collect(),
                internal: net.internal,
            };
            // Keyed by the network's own name: the server asks with it.
            nets.insert(name.clone(), z);
        }
        Zone {
            domain: self.domain.clone(),
            nets,
        }
    }
}

impl Zone {
    /// Compile the answers for every bridged network of `view` under `domain` from nothing
    /// (the agent keeps a [`ZoneBuilder`] instead, and updates it per change).
    pub fn build(view: &DiscoveryView, domain: &str) -> Zone {
        ZoneBuilder::new(domain).update(view)
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
            None if !lower.contains('.') || net.eps.is_pod(lower) => lower,
            None => return None,
        };
        net.addrs(inner)
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
        } else if (!q.contains('.') || net.eps.is_pod(&q)) && net.addrs(&q).is_some() {
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
        if let Some(addrs) = net.addrs(inner) {
            return Answer::records(addr_recs(None, addrs, qtype));
        }
        if let Some(svc) = inner.strip_prefix("tasks.") {
            if let Some(tasks) = net.svc.tasks.get(svc) {
                let all: Vec<IpAddr> = tasks.iter().flat_map(|t| t.addrs.clone()).collect();
                return Answer::records(addr_recs(None, &all, qtype));
            }
        }
        if let Some((id, svc)) = inner.split_once(".tasks.") {
            if let Some(t) = net
                .svc
                .tasks
                .get(svc)
                .and_then(|ts| ts.iter().find(|t| t.label == id))
            {
                return Answer::records(addr_recs(None, &t.addrs, qtype));
            }
        }
        if let Some(targets) = net.svc.srv.get(inner) {
            if qtype != QType::Srv {
                return Answer::empty();
            }
            let svc = inner.splitn(3, '.').nth(2).unwrap_or_default();
            let tasks = net
                .svc
                .tasks
                .get(svc)
                .map(Vec::as_slice)
                .unwrap_or_default();
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
        match net.ptr(&ip) {
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
