//! Who may ask a network's gateway (pure): the DNS server answers and forwards only for
//! sources inside the subnets that network's bridge holds on this host, so a container of
//! another network, a neighbour on the underlay or anything else that can route to a gateway
//! gets REFUSED and never uses the agent as a resolver.
//!
//! Multi-host networks: only this host's blocks, not the whole pool. A container's resolver is
//! the gateway of its own block on its own host (`ferrynet run` and CNI ADD write that), so no
//! legitimate query comes from another host's block; and with the `route` backend an underlay
//! neighbour can send packets with a source in another host's block that the kernel delivers
//! like any routed packet, while sources in this host's blocks sit behind this host's own
//! bridge ports, where the anti-spoofing rules hold every container to its own addresses.

use std::collections::{HashMap, HashSet};

use ferrynet_model::network::NetworkMode;
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::names::bridge_name;
use ipnet::IpNet;

use super::gateways::local_subnets;

/// Network name -> the source prefixes its gateways on this host answer, and its bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clients {
    by_network: HashMap<String, Vec<IpNet>>,
    bridges: HashMap<String, String>,
    /// Routed networks: their containers' queries come in on their own `fnv*` ports.
    routed: HashSet<String>,
}

impl Clients {
    /// The client prefixes of every bridged network on `host` in `view`.
    pub fn build(view: &DiscoveryView, host: &str) -> Clients {
        let by_network = local_subnets(view, host)
            .into_iter()
            .map(|(name, subnets)| (name, subnets.into_iter().map(|s| s.cidr).collect()))
            .collect::<HashMap<_, _>>();
        let bridges = view
            .networks
            .iter()
            .filter(|(name, _)| by_network.contains_key(*name))
            .map(|(name, net)| {
                let br = match net.bridge.as_str() {
                    "" => bridge_name(name),
                    b => b.to_string(),
                };
                (name.clone(), br)
            })
            .collect();
        let routed = view
            .networks
            .iter()
            .filter(|(name, net)| by_network.contains_key(*name) && net.mode == NetworkMode::Routed)
            .map(|(name, _)| name.clone())
            .collect();
        Clients {
            by_network,
            bridges,
            routed,
        }
    }

    /// Whether `network` is routed (no bridge: see [`super::ingress::routed_port`]).
    pub fn is_routed(&self, network: &str) -> bool {
        self.routed.contains(network)
    }

    /// The bridge that holds `network`'s gateways on this host.
    pub fn bridge(&self, network: &str) -> Option<&str> {
        self.bridges.get(network).map(String::as_str)
    }

    /// May `src` ask the gateway of `network`? Unknown networks answer nobody.
    pub fn allowed(&self, network: &str, src: IpAddr) -> bool {
        // An IPv4-mapped IPv6 source is the IPv4 host it stands for.
        let src = src.to_canonical();
        self.by_network
            .get(network)
            .is_some_and(|prefixes| prefixes.iter().any(|p| p.contains(&src)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::fabric::Backend;
    use ferrynet_model::network::{keys, FabricSpec, Network};

    fn view() -> DiscoveryView {
        let mut v = DiscoveryView::default();
        let blue = Network::bridged(
            "blue",
            [
                "10.30.0.0/24".parse().unwrap(),
                "fd00:30::/64".parse().unwrap(),
            ],
        );
        v.put(&keys::network("blue"), &serde_json::to_vec(&blue).unwrap());
        let red = Network::bridged("red", ["10.31.0.0/24".parse().unwrap()]);
        v.put(&keys::network("red"), &serde_json::to_vec(&red).unwrap());
        let wide = Network {
            fabric: Some(FabricSpec {
                backend: Backend::Route,
                vni: 7,
                block_v4: 26,
                block_v6: 122,
                encrypt: false,
            }),
            ..Network::bridged(
                "wide",
                [
                    "10.40.0.0/16".parse().unwrap(),
                    "fd00:40::/64".parse().unwrap(),
                ],
            )
        };
        v.put(&keys::network("wide"), &serde_json::to_vec(&wide).unwrap());
        let blocks = [
            ("10.40.0.64/26", "h1"),
            ("fd00:40::/122", "h1"),
            ("10.40.0.128/26", "h2"),
            ("fd00:40::40/122", "h2"),
        ];
        for (b, h) in blocks {
            v.put(
                &keys::block("wide", &b.parse().unwrap()),
                format!(r#"{{"host":"{h}"}}"#).as_bytes(),
            );
        }
        v
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_network_sources_only() {
        let c = Clients::build(&view(), "h1");
        assert!(c.allowed("blue", ip("10.30.0.7")));
        assert!(c.allowed("blue", ip("fd00:30::7")));
        assert!(c.allowed("red", ip("10.31.0.200")));
        // Another network's container, on either family.
        assert!(!c.allowed("blue", ip("10.31.0.7")));
        assert!(!c.allowed("red", ip("10.30.0.7")));
        assert!(!c.allowed("red", ip("fd00:30::7")));
        // The underlay, loopback, link-local, anything else.
        for other in [
            "172.31.0.2",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "8.8.8.8",
        ] {
            assert!(!c.allowed("blue", ip(other)), "{other}");
        }
        // A network that is not (or no longer) on this host answers nobody.
        assert!(!c.allowed("gone", ip("10.30.0.7")));
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let c = Clients::build(&view(), "h1");
        assert!(c.allowed("blue", ip("::ffff:10.30.0.7")));
        assert!(!c.allowed("blue", ip("::ffff:10.31.0.7")));
    }

    #[test]
    fn multi_host_networks_answer_this_hosts_blocks() {
        let c = Clients::build(&view(), "h1");
        assert!(c.allowed("wide", ip("10.40.0.70")));
        assert!(c.allowed("wide", ip("fd00:40::3")));
        // Another host's block, the rest of the pool: not this gateway's clients.
        assert!(!c.allowed("wide", ip("10.40.0.130")));
        assert!(!c.allowed("wide", ip("fd00:40::42")));
        assert!(!c.allowed("wide", ip("10.40.9.9")));
        // A host with no block of the network answers nobody on it.
        let h3 = Clients::build(&view(), "h3");
        assert!(!h3.allowed("wide", ip("10.40.0.70")));
        assert!(h3.allowed("blue", ip("10.30.0.7")));
    }

    #[test]
    fn routed_networks_are_answered_for_their_own_sources_on_their_ports() {
        let mut v = view();
        let routed = Network {
            mode: NetworkMode::Routed,
            ..Network::bridged("rt", ["10.50.0.0/24".parse().unwrap()])
        };
        v.put(&keys::network("rt"), &serde_json::to_vec(&routed).unwrap());
        let c = Clients::build(&v, "h1");
        assert!(c.is_routed("rt"));
        assert!(!c.is_routed("blue"));
        assert!(c.allowed("rt", "10.50.0.9".parse().unwrap()));
        assert!(!c.allowed("rt", "10.30.0.9".parse().unwrap()));
        // Its gateway is listened on like a bridge's.
        let g = super::super::gateways::gateways(&v, "h1");
        assert_eq!(
            g.get(&"10.50.0.1".parse().unwrap()).map(String::as_str),
            Some("rt")
        );
    }

    #[test]
    fn bridges_of_local_networks() {
        let c = Clients::build(&view(), "h1");
        assert_eq!(c.bridge("blue"), Some("fn-blue"));
        assert_eq!(c.bridge("wide"), Some("fn-wide"));
        assert_eq!(Clients::build(&view(), "h3").bridge("wide"), None);
        assert_eq!(c.bridge("gone"), None);
    }
}
