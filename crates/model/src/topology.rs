//! The cluster as the agent's observability listener shows it: hosts, networks, blocks,
//! endpoints, services and producers, and what the metrics and the topology page derive from
//! them. Pure: it reads the cluster feed's view ([`DiscoveryView`]), whose records are shared
//! with DNS, the load balancer and policy rather than held again here (at 100,000 endpoints a
//! copy of its own cost the agent ~170 MiB).
//!
//! Every record was validated where the feed decoded it (a forged one is refused and listed by
//! key, never shown), and every string handed on is data: the page escapes it, the Prometheus
//! encoder quotes it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::discovery::DiscoveryView;
use crate::policy::PolicyEndpoint;

/// Endpoints per (network, host); endpoints without a host (single-host networks) count
/// under `local_host`, where they live.
pub fn endpoints_by_network_host(
    view: &DiscoveryView,
    local_host: &str,
) -> BTreeMap<(String, String), u64> {
    // Counted under the shared (interned) strings first: no allocation per endpoint.
    let mut shared: BTreeMap<(&str, Option<&str>), u64> = BTreeMap::new();
    for e in view.endpoints.iter() {
        *shared.entry((&e.network, e.host.as_deref())).or_default() += 1;
    }
    let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((net, host), n) in shared {
        *out.entry((net.to_string(), host.unwrap_or(local_host).to_string()))
            .or_default() += n;
    }
    out
}

/// Every claimed block with its addresses in use and free.
pub fn block_usage(view: &DiscoveryView) -> Vec<BlockUsage> {
    view.blocks
        .iter()
        .map(|((net, block), host)| {
            let used = view.endpoints.addresses_in(net, block).count() as u64;
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
pub fn producers_by_service(view: &DiscoveryView) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in view.services.keys() {
        out.insert(s.clone(), (0, 0));
    }
    for k in view.producers.keys() {
        let e = out.entry(k.0.clone()).or_default();
        e.0 += 1;
        if view.health.get(k).is_none_or(|h| h.healthy) {
            e.1 += 1;
        }
    }
    out
}

/// One endpoint as the page shows it, with this host's knowledge of its policies.
fn endpoint_doc(e: &PolicyEndpoint, me: &str, pol: Option<&&LocalPolicies>) -> EndpointDoc {
    let mut parts = e.id.splitn(3, '/');
    let (_, container_id, ifname) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    EndpointDoc {
        id: e.id.to_string(),
        host: e.host.as_deref().unwrap_or(me).to_string(),
        network: e.network.to_string(),
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        name: e.name.as_deref().map(str::to_string),
        ips: e.addrs.clone(),
        labels: e
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ports: e.port_mappings.iter().map(|p| p.to_string()).collect(),
        ingress_policies: pol.and_then(|p| p.ingress.clone()),
        egress_policies: pol.and_then(|p| p.egress.clone()),
        policies_known: pol.is_some(),
    }
}

/// The document `/api/topology` serves: the cluster feed's view, plus this host's peers.
pub fn document(
    view: &DiscoveryView,
    me: &str,
    peers: &[PeerLink],
    local: &[LocalPolicies],
) -> Document {
    let policies: BTreeMap<&str, &LocalPolicies> =
        local.iter().map(|l| (l.id.as_str(), l)).collect();
    Document {
        host: me.to_string(),
        hosts: view
            .live_hosts
            .iter()
            .map(|name| {
                let rec = view.host_records.get(name);
                HostDoc {
                    name: name.clone(),
                    underlay: rec.map(|h| h.underlay.clone()).unwrap_or_default(),
                    capabilities: rec.map(|h| h.capabilities.clone()).unwrap_or_default(),
                    version: rec.map(|h| h.version.clone()).unwrap_or_default(),
                }
            })
            .collect(),
        networks: view
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
        blocks: block_usage(view),
        endpoints: view
            .endpoints
            .iter()
            .map(|e| endpoint_doc(e, me, policies.get(&*e.id)))
            .collect(),
        services: view
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
        producers: view
            .producers
            .iter()
            .map(|(k, p)| ProducerDoc {
                service: p.service.clone(),
                id: p.id.clone(),
                host: p.host.clone(),
                network: p.network.clone(),
                container: p.container.clone(),
                addrs: p.addrs.clone(),
                healthy: view.health.get(k).map(|h| h.healthy),
            })
            .collect(),
        peers: peers.to_vec(),
        rejected: view.rejected.keys().cloned().collect(),
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
    pub ips: Vec<IpAddr>,
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
    use crate::host::BlockClaim;
    use crate::network::{keys, Endpoint, Network};
    use crate::service::{keys as skeys, HealthRecord, Producer, Service};

    fn ep(net: &str, id: &str, host: Option<&str>, ips: &[&str]) -> (String, Vec<u8>) {
        let mut e = Endpoint::new(net, id, "eth0");
        e.host = host.map(str::to_string);
        e.ips = ips.iter().map(|i| i.parse().unwrap()).collect();
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
        let mut v = DiscoveryView::default();
        for (i, h) in ["h1", "h1", "h2"].iter().enumerate() {
            let ip = format!("10.1.0.{}/16", i + 2);
            let (k, val) = ep("fabric", &format!("c{i}"), Some(h), &[&ip]);
            v.put(&k, &val);
        }
        let (k, val) = ep("solo", "c9", None, &["10.9.0.2/24"]);
        v.put(&k, &val);
        let c = endpoints_by_network_host(&v, "me");
        assert_eq!(c[&("fabric".into(), "h1".into())], 2);
        assert_eq!(c[&("fabric".into(), "h2".into())], 1);
        assert_eq!(c[&("solo".into(), "me".into())], 1);
        v.delete(&keys::endpoint("fabric", "c0", "eth0"));
        assert_eq!(
            endpoints_by_network_host(&v, "me")[&("fabric".into(), "h1".into())],
            1
        );
    }

    #[test]
    fn block_usage_counts_addresses_inside_each_block() {
        let mut v = DiscoveryView::default();
        let b1: IpNet = "10.1.0.0/26".parse().unwrap();
        let b2: IpNet = "10.1.0.64/26".parse().unwrap();
        v.put(&keys::block("fabric", &b1), &claim("h1"));
        v.put(&keys::block("fabric", &b2), &claim("h2"));
        for (i, ip) in ["10.1.0.2/16", "10.1.0.3/16", "10.1.0.66/16"]
            .iter()
            .enumerate()
        {
            let (k, val) = ep("fabric", &format!("c{i}"), Some("h1"), &[ip]);
            v.put(&k, &val);
        }
        // Same addresses on another network, or on a network whose name the block's network
        // starts with, do not count.
        for net in ["other", "fabric2"] {
            let (k, val) = ep(net, "x", Some("h1"), &["10.1.0.4/16"]);
            v.put(&k, &val);
        }
        let u = block_usage(&v);
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].block, u[0].host.as_str()), (b1, "h1"));
        assert_eq!((u[0].capacity, u[0].used, u[0].free), (61, 2, 59));
        assert_eq!((u[1].used, u[1].free), (1, 60));
        assert_eq!(block_capacity(&"fd00::/122".parse().unwrap()), 62);
        assert_eq!(block_capacity(&"10.0.0.0/32".parse().unwrap()), 1);
    }

    /// The counts walked the plain way, over every endpoint.
    fn walked(v: &DiscoveryView) -> (BTreeMap<(String, String), u64>, Vec<u64>) {
        let mut per: BTreeMap<(String, String), u64> = BTreeMap::new();
        for e in v.endpoints.iter() {
            let h = e.host.as_deref().unwrap_or("me").to_string();
            *per.entry((e.network.to_string(), h)).or_default() += 1;
        }
        let used = v
            .blocks
            .keys()
            .map(|(net, b)| {
                v.endpoints
                    .iter()
                    .filter(|e| &*e.network == net)
                    .flat_map(|e| e.addrs.iter())
                    .filter(|a| b.contains(*a))
                    .count() as u64
            })
            .collect();
        (per, used)
    }

    proptest::proptest! {
        /// Any sequence of puts, rewrites, forged records and deletes gives the counts a walk
        /// over every endpoint gives.
        #[test]
        fn counts_equal_a_plain_walk(ops in proptest::collection::vec(
            (0u8..4, 0u8..6, 0u8..3, 0u8..8, proptest::option::of(0u8..3)), 0..60)) {
            let mut v = DiscoveryView::default();
            for b in ["10.1.0.0/29", "10.1.0.8/29", "fd00::/125"] {
                let b: IpNet = b.parse().unwrap();
                v.put(&keys::block("n0", &b), &claim("h0"));
                v.put(&keys::block("n1", &b), &claim("h1"));
            }
            for (op, id, net, ip, host) in ops {
                let net = format!("n{net}");
                let key = keys::endpoint(&net, &format!("c{id}"), "eth0");
                match op {
                    0 | 1 => {
                        let v4 = format!("10.1.0.{ip}/24");
                        let v6 = format!("fd00::{ip}/64");
                        let host = host.map(|h| format!("h{h}"));
                        let ips: Vec<&str> = if ip % 3 == 0 { vec![&v4, &v6] } else { vec![&v4] };
                        let (_, val) = ep(&net, &format!("c{id}"), host.as_deref(), &ips);
                        v.put(&key, &val);
                    }
                    // A forged record under a held key.
                    2 => v.put(&key, b"{not json"),
                    _ => v.delete(&key),
                }
                let (per, used) = walked(&v);
                proptest::prop_assert_eq!(endpoints_by_network_host(&v, "me"), per);
                let got: Vec<u64> = block_usage(&v).iter().map(|u| u.used).collect();
                proptest::prop_assert_eq!(got, used);
            }
        }
    }

    #[test]
    fn producers_count_healthy_ones() {
        let mut v = DiscoveryView::default();
        let s = Service::named("web");
        v.put(&skeys::service("web"), &serde_json::to_vec(&s).unwrap());
        v.put(
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
            v.put(
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
        v.put(&skeys::health("web", "b"), &serde_json::to_vec(&h).unwrap());
        let c = producers_by_service(&v);
        assert_eq!(c["web"], (2, 1));
        assert_eq!(c["idle"], (0, 0));
    }

    #[test]
    fn forged_records_are_listed_and_never_shown() {
        let mut v = DiscoveryView::default();
        let (k, val) = ep("fabric", "c1", Some("h1"), &["10.1.0.2/16"]);
        v.put(&k, &val);
        // The same key rewritten with a name that is not a DNS label (HTML in it).
        let mut bad = Endpoint::new("fabric", "c1", "eth0");
        bad.name = Some("<img src=x onerror=alert(1)>".into());
        v.put(&k, &serde_json::to_vec(&bad).unwrap());
        // A network record under another name's key.
        let n = Network::bridged("blue", ["10.5.0.0/24".parse().unwrap()]);
        v.put(&keys::network("red"), &serde_json::to_vec(&n).unwrap());
        // A host record that does not decode: the host is live by name, with no details.
        v.put(&keys::host("h9"), b"<script>");
        let d = document(&v, "h1", &[], &[]);
        assert!(d.endpoints.is_empty(), "{:?}", d.endpoints);
        assert!(d.networks.is_empty());
        assert!(d.rejected.contains(&k), "{:?}", d.rejected);
        assert!(d.rejected.contains(&keys::network("red")));
        assert_eq!(d.hosts.len(), 1);
        assert!(d.hosts[0].underlay.is_empty() && d.hosts[0].version.is_empty());
        // A valid rewrite clears the refusal.
        v.put(&k, &val);
        let d = document(&v, "h1", &[], &[]);
        assert_eq!(d.endpoints.len(), 1);
        assert!(!d.rejected.contains(&k));
    }

    #[test]
    fn document_carries_local_policies_and_peers() {
        let mut v = DiscoveryView::default();
        let (k, val) = ep("fabric", "c1", Some("h1"), &["10.1.0.2/16"]);
        v.put(&k, &val);
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
        let d = document(&v, "h1", &peers, &local);
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.endpoints[0].ingress_policies, Some(vec!["web-in".into()]));
        assert!(d.endpoints[0].policies_known);
        assert_eq!(d.peers, peers);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["endpoints"][0]["containerId"], "c1");
        assert_eq!(json["endpoints"][0]["ifname"], "eth0");
        assert_eq!(json["endpoints"][0]["ips"][0], "10.1.0.2");
    }

    #[test]
    fn metric_names() {
        assert!(is_metric_name("ferrynet_endpoints"));
        assert!(!is_metric_name("9lives"));
        assert!(!is_metric_name("a-b"));
        assert!(!is_metric_name(""));
    }
}
