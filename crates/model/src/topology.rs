//! The cluster as the agent's observability listener shows it: hosts, networks, blocks,
//! endpoints, services and producers, followed from the store, and what the metrics and the
//! topology page derive from them. Pure: the agent feeds it store records and reads documents.
//!
//! Every record is validated where it is decoded (a forged one is refused and listed by key,
//! never shown), and every string handed on is data: the page escapes it, the Prometheus
//! encoder quotes it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::host::{BlockClaim, HostRecord};
use crate::network::{keys, Endpoint, Network};
use crate::service::{keys as skeys, HealthRecord, Producer, Service};
use crate::validate::Validate;

/// Refusal reasons are cut to this many characters (a forged record may carry megabytes).
const MAX_REASON: usize = 200;

/// What the agent follows for the page and the metrics.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Live hosts by name.
    pub hosts: BTreeMap<String, HostRecord>,
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    /// Block claims: (network, block) -> owning host.
    pub blocks: BTreeMap<(String, IpNet), String>,
    /// Endpoints by store key (changed only through `put`/`delete`, which keep `tally` in step).
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Producers by (service, id).
    pub producers: BTreeMap<(String, String), Producer>,
    /// Producer health by (service, id).
    pub health: BTreeMap<(String, String), HealthRecord>,
    /// Records refused as invalid, by key, with the reason.
    pub rejected: BTreeMap<String, String>,
    /// What the metrics count, kept as records come and go so a scrape never walks every
    /// endpoint (at 100,000 endpoints that walk made a scrape cost hundreds of milliseconds).
    tally: EndpointTally,
}

/// Endpoint counts per (network, host) and each network's endpoint addresses as a multiset.
#[derive(Debug, Clone, Default)]
struct EndpointTally {
    /// Endpoints per (network, host); `None`: the endpoint names no host (single-host network).
    per_network_host: BTreeMap<(String, Option<String>), u64>,
    /// Per network, each endpoint address and how many endpoints hold it.
    addresses: BTreeMap<String, BTreeMap<IpAddr, u32>>,
}

impl EndpointTally {
    fn add(&mut self, e: &Endpoint) {
        *self
            .per_network_host
            .entry((e.network.clone(), e.host.clone()))
            .or_default() += 1;
        let addrs = self.addresses.entry(e.network.clone()).or_default();
        for ip in &e.ips {
            *addrs.entry(ip.addr()).or_default() += 1;
        }
    }

    fn remove(&mut self, e: &Endpoint) {
        let k = (e.network.clone(), e.host.clone());
        if let Some(n) = self.per_network_host.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.per_network_host.remove(&k);
            }
        }
        if let Some(addrs) = self.addresses.get_mut(&e.network) {
            for ip in &e.ips {
                if let Some(c) = addrs.get_mut(&ip.addr()) {
                    *c -= 1;
                    if *c == 0 {
                        addrs.remove(&ip.addr());
                    }
                }
            }
            if addrs.is_empty() {
                self.addresses.remove(&e.network);
            }
        }
    }

    /// Endpoint addresses of `network` inside `block`.
    fn used_in(&self, network: &str, block: &IpNet) -> u64 {
        self.addresses
            .get(network)
            .map(|a| {
                a.range(block.network()..=block.broadcast())
                    .map(|(_, c)| u64::from(*c))
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// The store prefixes the topology follows.
pub fn prefixes() -> Vec<String> {
    vec![
        keys::networks(),
        keys::hosts(),
        keys::all_blocks(),
        keys::all_endpoints(),
        skeys::services(),
        skeys::producers(),
        skeys::all_health(),
    ]
}

fn decode<T: serde::de::DeserializeOwned + Validate>(key: &str, value: &[u8]) -> Result<T, String> {
    let v: T = serde_json::from_slice(value).map_err(|e| format!("undecodable: {e}"))?;
    v.validate_at(key).map_err(|e| e.to_string())?;
    Ok(v)
}

/// `(a, b)` from `PREFIX a/b`, both non-empty.
fn two_parts<'a>(key: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let (a, b) = key.strip_prefix(prefix)?.split_once('/')?;
    (!a.is_empty() && !b.is_empty() && !b.contains('/')).then_some((a, b))
}

impl Topology {
    /// Apply a record written under `key`; returns false when the key is not followed.
    pub fn put(&mut self, key: &str, value: &[u8]) -> bool {
        let r = self.put_checked(key, value);
        match r {
            Some(Ok(())) => {
                self.rejected.remove(key);
                true
            }
            Some(Err(why)) => {
                // A refused record is absent: its predecessor under the key goes too.
                self.delete(key);
                self.rejected
                    .insert(key.to_string(), why.chars().take(MAX_REASON).collect());
                true
            }
            None => false,
        }
    }

    fn put_checked(&mut self, key: &str, value: &[u8]) -> Option<Result<(), String>> {
        if let Some(name) = key.strip_prefix(&keys::networks()) {
            return Some(decode::<Network>(key, value).map(|n| {
                self.networks.insert(name.to_string(), n);
            }));
        }
        if let Some(name) = key.strip_prefix(&keys::hosts()) {
            return Some(decode::<HostRecord>(key, value).map(|h| {
                self.hosts.insert(name.to_string(), h);
            }));
        }
        if key.starts_with(&keys::all_blocks()) {
            let Some((net, block)) = keys::parse_block(key) else {
                return Some(Err("not a block key".into()));
            };
            return Some(decode::<BlockClaim>(key, value).map(|c| {
                self.blocks.insert((net, block), c.host);
            }));
        }
        if key.starts_with(&keys::all_endpoints()) {
            return Some(decode::<Endpoint>(key, value).map(|e| {
                self.tally.add(&e);
                if let Some(old) = self.endpoints.insert(key.to_string(), e) {
                    self.tally.remove(&old);
                }
            }));
        }
        if let Some(name) = key.strip_prefix(&skeys::services()) {
            return Some(decode::<Service>(key, value).map(|s| {
                self.services.insert(name.to_string(), s);
            }));
        }
        if let Some((svc, id)) = two_parts(key, &skeys::producers()) {
            return Some(decode::<Producer>(key, value).map(|p| {
                self.producers.insert((svc.to_string(), id.to_string()), p);
            }));
        }
        if let Some((svc, id)) = two_parts(key, &skeys::all_health()) {
            return Some(decode::<HealthRecord>(key, value).map(|h| {
                self.health.insert((svc.to_string(), id.to_string()), h);
            }));
        }
        None
    }

    /// Forget the record under `key`.
    pub fn delete(&mut self, key: &str) {
        self.rejected.remove(key);
        if let Some(name) = key.strip_prefix(&keys::networks()) {
            self.networks.remove(name);
        } else if let Some(name) = key.strip_prefix(&keys::hosts()) {
            self.hosts.remove(name);
        } else if let Some(b) = keys::parse_block(key) {
            self.blocks.remove(&b);
        } else if key.starts_with(&keys::all_endpoints()) {
            if let Some(old) = self.endpoints.remove(key) {
                self.tally.remove(&old);
            }
        } else if let Some(name) = key.strip_prefix(&skeys::services()) {
            self.services.remove(name);
        } else if let Some((svc, id)) = two_parts(key, &skeys::producers()) {
            self.producers.remove(&(svc.to_string(), id.to_string()));
        } else if let Some((svc, id)) = two_parts(key, &skeys::all_health()) {
            self.health.remove(&(svc.to_string(), id.to_string()));
        }
    }

    /// Endpoints per (network, host); endpoints without a host (single-host networks) count
    /// under `local_host`, where they live.
    pub fn endpoints_by_network_host(&self, local_host: &str) -> BTreeMap<(String, String), u64> {
        let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((net, host), n) in &self.tally.per_network_host {
            let host = host.as_deref().unwrap_or(local_host);
            *out.entry((net.clone(), host.to_string())).or_default() += n;
        }
        out
    }

    /// Every claimed block with its addresses in use and free.
    pub fn block_usage(&self) -> Vec<BlockUsage> {
        self.blocks
            .iter()
            .map(|((net, block), host)| {
                let used = self.tally.used_in(net, block);
                let capacity = block_capacity(block);
                BlockUsage {
                    network: net.clone(),
                    block: *block,
                    host: host.clone(),
                    capacity,
                    used,
                    free: capacity.saturating_sub(used),
                }
            })
            .collect()
    }

    /// Producers per service: (all, healthy). A producer without a health record counts as
    /// healthy (it has no check, or its check has not decided yet).
    pub fn producers_by_service(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for s in self.services.keys() {
            out.insert(s.clone(), (0, 0));
        }
        for (k, _) in self.producers.iter() {
            let e = out.entry(k.0.clone()).or_default();
            e.0 += 1;
            if self.health.get(k).is_none_or(|h| h.healthy) {
                e.1 += 1;
            }
        }
        out
    }

    /// The document `/api/topology` serves: everything followed, plus this host's peers.
    pub fn document(&self, me: &str, peers: &[PeerLink], local: &[LocalPolicies]) -> Document {
        let policies: BTreeMap<&str, &LocalPolicies> =
            local.iter().map(|l| (l.id.as_str(), l)).collect();
        let blocks = self.block_usage();
        Document {
            host: me.to_string(),
            hosts: self
                .hosts
                .values()
                .map(|h| HostDoc {
                    name: h.name.clone(),
                    underlay: h.underlay.clone(),
                    capabilities: h.capabilities.clone(),
                    version: h.version.clone(),
                })
                .collect(),
            networks: self
                .networks
                .values()
                .map(|n| NetworkDoc {
                    name: n.name.clone(),
                    mode: n.mode.as_str().to_string(),
                    subnets: n.subnets.iter().map(|s| s.cidr).collect(),
                    backend: n.fabric.map(|f| f.backend.to_string()),
                    internal: n.internal,
                    default_deny: n.default_deny,
                })
                .collect(),
            blocks,
            endpoints: self
                .endpoints
                .values()
                .map(|e| {
                    let id = format!("{}/{}/{}", e.network, e.container_id, e.ifname);
                    let pol = policies.get(id.as_str());
                    EndpointDoc {
                        host: e.host.clone().unwrap_or_else(|| me.to_string()),
                        network: e.network.clone(),
                        container_id: e.container_id.clone(),
                        ifname: e.ifname.clone(),
                        name: e.name.clone(),
                        ips: e.ips.clone(),
                        labels: e.labels.clone(),
                        ports: e
                            .port_mappings
                            .iter()
                            .map(|p| {
                                format!(
                                    "{}{}->{}/{}",
                                    p.host_ip.map(|i| format!("{i}:")).unwrap_or_default(),
                                    p.host_port,
                                    p.container_port,
                                    p.protocol.as_str()
                                )
                            })
                            .collect(),
                        ingress_policies: pol.and_then(|p| p.ingress.clone()),
                        egress_policies: pol.and_then(|p| p.egress.clone()),
                        policies_known: pol.is_some(),
                        id,
                    }
                })
                .collect(),
            services: self
                .services
                .values()
                .map(|s| ServiceDoc {
                    name: s.name.clone(),
                    vips: s.vips.clone(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
                        .collect(),
                })
                .collect(),
            producers: self
                .producers
                .iter()
                .map(|(k, p)| ProducerDoc {
                    service: p.service.clone(),
                    id: p.id.clone(),
                    host: p.host.clone(),
                    network: p.network.clone(),
                    container: p.container.clone(),
                    addrs: p.addrs.clone(),
                    healthy: self.health.get(k).map(|h| h.healthy),
                })
                .collect(),
            peers: peers.to_vec(),
            rejected: self.rejected.keys().cloned().collect(),
        }
    }
}

/// Addresses of a block a container can get: all but the gateway (the block's first host
/// address) and, for IPv4 wider than /31, the network and broadcast addresses, or for IPv6
/// the subnet-router anycast address. Exclusions inside the block are not subtracted.
pub fn block_capacity(block: &IpNet) -> u64 {
    let bits = block.max_prefix_len() - block.prefix_len();
    let size: u64 = if bits >= 63 { u64::MAX / 2 } else { 1 << bits };
    let reserved = match block {
        IpNet::V4(n) if n.prefix_len() < 31 => 3,
        IpNet::V4(_) => 0,
        IpNet::V6(n) if n.prefix_len() < 127 => 2,
        IpNet::V6(_) => 0,
    };
    size.saturating_sub(reserved)
}

/// One block's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockUsage {
    /// Network.
    pub network: String,
    /// The block.
    pub block: IpNet,
    /// Its owner.
    pub host: String,
    /// Addresses a container can get.
    pub capacity: u64,
    /// Held by endpoints.
    pub used: u64,
    /// Still free.
    pub free: u64,
}

/// One peer of this host on one network, as its reconciler reached it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerLink {
    /// Network.
    pub network: String,
    /// The peer host.
    pub host: String,
    /// Backend in use (`route`, `vxlan`, `sleeve`, `bgp`); None: unreachable.
    pub backend: Option<String>,
    /// `up`, or `down` with `errors`.
    pub state: String,
    /// Why that backend.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Policies restricting one of this host's endpoints (None: that direction is open).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalPolicies {
    /// `network/container/ifname`.
    pub id: String,
    /// Ingress policies in order.
    pub ingress: Option<Vec<String>>,
    /// Egress policies in order.
    pub egress: Option<Vec<String>>,
}

/// `/api/topology`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    /// The host serving it.
    pub host: String,
    /// Live hosts.
    pub hosts: Vec<HostDoc>,
    /// Networks.
    pub networks: Vec<NetworkDoc>,
    /// Claimed blocks with their use.
    pub blocks: Vec<BlockUsage>,
    /// Endpoints.
    pub endpoints: Vec<EndpointDoc>,
    /// Services.
    pub services: Vec<ServiceDoc>,
    /// Producers.
    pub producers: Vec<ProducerDoc>,
    /// This host's peers per network.
    pub peers: Vec<PeerLink>,
    /// Keys of refused records.
    pub rejected: Vec<String>,
}

/// A host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostDoc {
    /// Name.
    pub name: String,
    /// Underlay addresses.
    pub underlay: Vec<IpNet>,
    /// What its agent can do.
    pub capabilities: Vec<String>,
    /// Agent version.
    pub version: String,
}

/// A network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDoc {
    /// Name.
    pub name: String,
    /// `bridge`, `routed` or `host`.
    pub mode: String,
    /// Its pool.
    pub subnets: Vec<IpNet>,
    /// Multi-host backend (None: single host).
    pub backend: Option<String>,
    /// No route out.
    pub internal: bool,
    /// Default-deny policy.
    pub default_deny: bool,
}

/// An endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDoc {
    /// `network/container/ifname`.
    pub id: String,
    /// Its host.
    pub host: String,
    /// Network.
    pub network: String,
    /// Container id.
    pub container_id: String,
    /// Interface in the container.
    pub ifname: String,
    /// DNS name.
    pub name: Option<String>,
    /// Addresses.
    pub ips: Vec<IpNet>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Published ports, `[hostip:]port->port/proto`.
    pub ports: Vec<String>,
    /// Policies restricting ingress (None: open or not known here).
    pub ingress_policies: Option<Vec<String>>,
    /// Policies restricting egress.
    pub egress_policies: Option<Vec<String>>,
    /// Whether this host enforces its policies (only its own endpoints').
    pub policies_known: bool,
}

/// A service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDoc {
    /// Name.
    pub name: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// `port/proto`.
    pub ports: Vec<String>,
}

/// A producer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducerDoc {
    /// Service.
    pub service: String,
    /// Id.
    pub id: String,
    /// Host checking it.
    pub host: Option<String>,
    /// Network.
    pub network: Option<String>,
    /// Container.
    pub container: Option<String>,
    /// Addresses.
    pub addrs: Vec<IpAddr>,
    /// Health (None: no record).
    pub healthy: Option<bool>,
}

/// True when `name` is a valid Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::keys;

    fn ep(net: &str, id: &str, host: &str, ip: &str) -> (String, Vec<u8>) {
        let mut e = Endpoint::new(net, id, "eth0");
        e.host = Some(host.into());
        e.ips = vec![ip.parse().unwrap()];
        (
            keys::endpoint(net, id, "eth0"),
            serde_json::to_vec(&e).unwrap(),
        )
    }

    fn claim(host: &str) -> Vec<u8> {
        serde_json::to_vec(&BlockClaim { host: host.into() }).unwrap()
    }

    #[test]
    fn counts_endpoints_per_network_and_host() {
        let mut t = Topology::default();
        for (i, h) in ["h1", "h1", "h2"].iter().enumerate() {
            let (k, v) = ep(
                "fabric",
                &format!("c{i}"),
                h,
                &format!("10.1.0.{}/16", i + 2),
            );
            assert!(t.put(&k, &v));
        }
        let mut local = Endpoint::new("solo", "c9", "eth0");
        local.ips = vec!["10.9.0.2/24".parse().unwrap()];
        t.put(
            &keys::endpoint("solo", "c9", "eth0"),
            &serde_json::to_vec(&local).unwrap(),
        );
        let c = t.endpoints_by_network_host("me");
        assert_eq!(c[&("fabric".into(), "h1".into())], 2);
        assert_eq!(c[&("fabric".into(), "h2".into())], 1);
        assert_eq!(c[&("solo".into(), "me".into())], 1);
        t.delete(&keys::endpoint("fabric", "c0", "eth0"));
        assert_eq!(
            t.endpoints_by_network_host("me")[&("fabric".into(), "h1".into())],
            1
        );
    }

    #[test]
    fn block_usage_counts_addresses_inside_each_block() {
        let mut t = Topology::default();
        let b1: IpNet = "10.1.0.0/26".parse().unwrap();
        let b2: IpNet = "10.1.0.64/26".parse().unwrap();
        t.put(&keys::block("fabric", &b1), &claim("h1"));
        t.put(&keys::block("fabric", &b2), &claim("h2"));
        for (i, ip) in ["10.1.0.2/16", "10.1.0.3/16", "10.1.0.66/16"]
            .iter()
            .enumerate()
        {
            let (k, v) = ep("fabric", &format!("c{i}"), "h1", ip);
            t.put(&k, &v);
        }
        // Same addresses on another network do not count.
        let (k, v) = ep("other", "x", "h1", "10.1.0.4/16");
        t.put(&k, &v);
        let u = t.block_usage();
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].block, u[0].host.as_str()), (b1, "h1"));
        assert_eq!((u[0].capacity, u[0].used, u[0].free), (61, 2, 59));
        assert_eq!((u[1].used, u[1].free), (1, 60));
        assert_eq!(block_capacity(&"fd00::/122".parse().unwrap()), 62);
        assert_eq!(block_capacity(&"10.0.0.0/32".parse().unwrap()), 1);
    }

    /// The counts walked from scratch, as the scrape computed them before the tally.
    fn walked(t: &Topology) -> (BTreeMap<(String, String), u64>, Vec<u64>) {
        let mut per: BTreeMap<(String, String), u64> = BTreeMap::new();
        for e in t.endpoints.values() {
            let h = e.host.clone().unwrap_or_else(|| "me".into());
            *per.entry((e.network.clone(), h)).or_default() += 1;
        }
        let used = t
            .blocks
            .keys()
            .map(|(net, b)| {
                t.endpoints
                    .values()
                    .filter(|e| &e.network == net)
                    .flat_map(|e| e.ips.iter())
                    .filter(|ip| b.contains(&ip.addr()))
                    .count() as u64
            })
            .collect();
        (per, used)
    }

    proptest::proptest! {
        /// Any sequence of puts, rewrites, forged records and deletes leaves the kept counts
        /// equal to a walk over what is held.
        #[test]
        fn tally_equals_a_fresh_walk(ops in proptest::collection::vec(
            (0u8..4, 0u8..6, 0u8..3, 0u8..8, proptest::option::of(0u8..3)), 0..60)) {
            let mut t = Topology::default();
            for b in ["10.1.0.0/29", "10.1.0.8/29", "fd00::/125"] {
                let b: IpNet = b.parse().unwrap();
                t.put(&keys::block("n0", &b), &claim("h0"));
                t.put(&keys::block("n1", &b), &claim("h1"));
            }
            for (op, id, net, ip, host) in ops {
                let net = format!("n{net}");
                let key = keys::endpoint(&net, &format!("c{id}"), "eth0");
                match op {
                    0 | 1 => {
                        let mut e = Endpoint::new(&net, &format!("c{id}"), "eth0");
                        e.host = host.map(|h| format!("h{h}"));
                        e.ips = vec![format!("10.1.0.{ip}/24").parse().unwrap()];
                        if ip % 3 == 0 {
                            e.ips.push(format!("fd00::{ip}/64").parse().unwrap());
                        }
                        t.put(&key, &serde_json::to_vec(&e).unwrap());
                    }
                    // A forged record under a held key: refused, and its predecessor goes.
                    2 => {
                        t.put(&key, b"{not json");
                    }
                    _ => t.delete(&key),
                }
                let (per, used) = walked(&t);
                proptest::prop_assert_eq!(t.endpoints_by_network_host("me"), per);
                let got: Vec<u64> = t.block_usage().iter().map(|u| u.used).collect();
                proptest::prop_assert_eq!(got, used);
            }
        }
    }

    #[test]
    fn producers_count_healthy_ones() {
        let mut t = Topology::default();
        let s = Service::named("web");
        t.put(&skeys::service("web"), &serde_json::to_vec(&s).unwrap());
        t.put(
            &skeys::service("idle"),
            &serde_json::to_vec(&Service::named("idle")).unwrap(),
        );
        for id in ["a", "b"] {
            let p = Producer {
                service: "web".into(),
                id: id.into(),
                host: Some("h1".into()),
                network: None,
                container: None,
                netns: None,
                addrs: vec!["10.0.0.5".parse().unwrap()],
                ports: BTreeMap::new(),
                check: None,
            };
            t.put(
                &skeys::producer("web", id),
                &serde_json::to_vec(&p).unwrap(),
            );
        }
        let h = HealthRecord {
            healthy: false,
            host: "h1".into(),
            since_ms: 0,
            output: String::new(),
        };
        t.put(&skeys::health("web", "b"), &serde_json::to_vec(&h).unwrap());
        let c = t.producers_by_service();
        assert_eq!(c["web"], (2, 1));
        assert_eq!(c["idle"], (0, 0));
    }

    #[test]
    fn forged_records_are_refused_and_replace_nothing() {
        let mut t = Topology::default();
        let (k, v) = ep("fabric", "c1", "h1", "10.1.0.2/16");
        t.put(&k, &v);
        // The same key rewritten with a name that is not a DNS label (HTML in it).
        let mut bad = Endpoint::new("fabric", "c1", "eth0");
        bad.name = Some("<img src=x onerror=alert(1)>".into());
        assert!(t.put(&k, &serde_json::to_vec(&bad).unwrap()));
        assert!(
            t.endpoints.is_empty(),
            "the forged record replaced the old one"
        );
        assert!(t.rejected.contains_key(&k));
        // Junk bytes with a huge payload: refused, reason bounded.
        let huge = vec![b'x'; 1 << 20];
        t.put(&keys::network("big"), &huge);
        assert!(t.rejected[&keys::network("big")].len() <= MAX_REASON);
        assert!(t.networks.is_empty());
        // A network record under another name's key.
        let n = Network::bridged("blue", ["10.5.0.0/24".parse().unwrap()]);
        t.put(&keys::network("red"), &serde_json::to_vec(&n).unwrap());
        assert!(t.networks.is_empty());
        // A valid rewrite clears the refusal.
        t.put(&k, &v);
        assert!(!t.rejected.contains_key(&k));
        assert_eq!(t.endpoints.len(), 1);
        // Keys outside the followed prefixes are ignored.
        assert!(!t.put("/ferrynet/v1/kv/x", b"{}"));
    }

    #[test]
    fn document_carries_local_policies_and_peers() {
        let mut t = Topology::default();
        let (k, v) = ep("fabric", "c1", "h1", "10.1.0.2/16");
        t.put(&k, &v);
        let peers = vec![PeerLink {
            network: "fabric".into(),
            host: "h2".into(),
            backend: Some("vxlan".into()),
            state: "up".into(),
            reason: String::new(),
            errors: vec![],
        }];
        let local = vec![LocalPolicies {
            id: "fabric/c1/eth0".into(),
            ingress: Some(vec!["web-in".into()]),
            egress: None,
        }];
        let d = t.document("h1", &peers, &local);
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.endpoints[0].ingress_policies, Some(vec!["web-in".into()]));
        assert!(d.endpoints[0].policies_known);
        assert_eq!(d.peers, peers);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["endpoints"][0]["containerId"], "c1");
    }

    #[test]
    fn metric_names() {
        assert!(is_metric_name("ferrynet_endpoints"));
        assert!(!is_metric_name("9lives"));
        assert!(!is_metric_name("a-b"));
        assert!(!is_metric_name(""));
    }
}
