//! Subnet choice for new networks, both families: which host routes count against a subnet,
//! whether a requested subnet is free, and the default pick when none is requested.
//!
//! Every frontend (CLI `network create`, the Docker IPAM driver) decides through here; the
//! host's routes are read by `ferrynet_dataplane::routes` and the store's networks by the
//! control layer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::ipam::overlaps;

/// A route of the host that a new network's subnet must not overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// Destination.
    pub dst: IpNet,
    /// Outgoing device.
    pub dev: String,
    /// The kernel marks it `linkdown` (no carrier): it still wins the lookup, so it black-holes
    /// the prefix for anything newer on the same subnet.
    pub linkdown: bool,
}

impl HostRoute {
    /// The route for people: `10.1.0.0/24 via eth0 (a LAN or VPN)`, or for a route that is down,
    /// what it does and how to get rid of it.
    pub fn describe(&self) -> String {
        if self.linkdown {
            format!(
                "{} on {}, which is linkdown (the device has no carrier, yet the kernel still sends {} there: a stale bridge?); remove it (`ip link del {}`; `ferrynet reload` removes ferrynet bridges of networks that no longer exist)",
                self.dst, self.dev, self.dst, self.dev
            )
        } else {
            format!("{} via {} (a LAN or VPN)", self.dst, self.dev)
        }
    }
}

/// Whether a main-table route counts against new subnets: not default, link-local, multicast,
/// loopback or host routes; ferrynet's own `fn-*` bridges only when down (a live bridge's subnet
/// is checked against the store's networks instead).
pub fn counts(dst: &IpNet, dev: &str, linkdown: bool) -> bool {
    if dst.prefix_len() == 0 || dev == "lo" {
        return false;
    }
    let special = match dst.addr() {
        IpAddr::V4(a) => a.is_loopback() || a.is_multicast() || a.is_link_local(),
        IpAddr::V6(a) => {
            let seg0 = a.segments()[0];
            dst.prefix_len() == 128 || seg0 & 0xffc0 == 0xfe80 || seg0 & 0xff00 == 0xff00
        }
    };
    !special && (!dev.starts_with("fn-") || linkdown)
}

/// Why a requested subnet cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubnetConflict {
    /// It overlaps a subnet of another network in the store.
    Network {
        /// The network holding it.
        name: String,
        /// Its subnet.
        cidr: IpNet,
    },
    /// It overlaps a route of the host (a LAN, a VPN, a stale bridge).
    HostRoute(HostRoute),
}

impl fmt::Display for SubnetConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubnetConflict::Network { name, cidr } => {
                write!(f, "subnet {cidr} of ferrynet network {name}")
            }
            SubnetConflict::HostRoute(r) => write!(
                f,
                "the host route {}; containers could not reach it",
                r.describe()
            ),
        }
    }
}

/// The first thing `cidr` overlaps: a network's subnet, then a host route.
pub fn conflict(
    cidr: &IpNet,
    networks: &[(String, IpNet)],
    routes: &[HostRoute],
) -> Option<SubnetConflict> {
    networks
        .iter()
        .find(|(_, c)| overlaps(c, cidr))
        .map(|(name, c)| SubnetConflict::Network {
            name: name.clone(),
            cidr: *c,
        })
        .or_else(|| {
            routes
                .iter()
                .find(|r| overlaps(&r.dst, cidr))
                .map(|r| SubnetConflict::HostRoute(r.clone()))
        })
}

/// What a new subnet must not overlap: the store's networks and this host's routes, read once
/// per operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetSpace {
    /// Every network's subnets, with the network's name.
    pub networks: Vec<(String, IpNet)>,
    /// The host routes that count (see [`counts`]).
    pub routes: Vec<HostRoute>,
}

impl SubnetSpace {
    /// The first network subnet, then host route, that `cidr` overlaps.
    pub fn conflict(&self, cidr: &IpNet) -> Option<SubnetConflict> {
        conflict(cidr, &self.networks, &self.routes)
    }

    /// The first host route that `cidr` overlaps (networks are checked when one is created).
    pub fn route_conflict(&self, cidr: &IpNet) -> Option<SubnetConflict> {
        conflict(cidr, &[], &self.routes)
    }

    /// The default subnet of a family free of every network, route and `also_taken`.
    pub fn pick(&self, v6: bool, also_taken: &[IpNet]) -> Option<IpNet> {
        let taken: Vec<IpNet> = self
            .networks
            .iter()
            .map(|(_, c)| *c)
            .chain(self.routes.iter().map(|r| r.dst))
            .chain(also_taken.iter().copied())
            .collect();
        pick_free(v6, &taken)
    }
}

/// The default subnet of a family overlapping nothing in `taken`: the first `10.89.N.0/24`
/// for IPv4, the first `fd89:N::/64` for IPv6.
pub fn pick_free(v6: bool, taken: &[IpNet]) -> Option<IpNet> {
    let free = |c: &IpNet| !taken.iter().any(|t| overlaps(t, c));
    if v6 {
        (0..=u16::MAX)
            .filter_map(|n| Ipv6Net::new(Ipv6Addr::new(0xfd89, n, 0, 0, 0, 0, 0, 0), 64).ok())
            .map(IpNet::V6)
            .find(free)
    } else {
        (0..=u8::MAX)
            .filter_map(|n| Ipv4Net::new(Ipv4Addr::new(10, 89, n, 0), 24).ok())
            .map(IpNet::V4)
            .find(free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn down_ferrynet_bridges_and_other_devices_count() {
        assert!(counts(&n("192.168.0.0/24"), "eth0", false));
        assert!(counts(&n("192.168.0.0/24"), "eth1", true));
        assert!(counts(&n("fd00::/64"), "wg0", false));
        // A live ferrynet bridge: its network is in the store and checked there.
        assert!(!counts(&n("10.89.0.0/24"), "fn-blue", false));
        // A down one still routes its subnet: taken.
        assert!(counts(&n("10.89.0.0/24"), "fn-old", true));
        for (dst, dev) in [
            ("0.0.0.0/0", "eth0"),
            ("::/0", "eth0"),
            ("fe80::/64", "eth0"),
            ("ff00::/8", "eth0"),
            ("fd00::1/128", "eth0"),
            ("127.0.0.0/8", "lo"),
            ("169.254.0.0/16", "eth0"),
        ] {
            assert!(!counts(&n(dst), dev, false), "{dst} {dev}");
        }
    }

    #[test]
    fn a_down_route_says_what_it_is() {
        let r = HostRoute {
            dst: n("10.9.0.0/24"),
            dev: "fn-old".into(),
            linkdown: true,
        };
        let d = SubnetConflict::HostRoute(r).to_string();
        assert!(d.contains("fn-old") && d.contains("linkdown"), "{d}");
    }

    #[test]
    fn conflicts_name_the_network_before_the_route() {
        let nets = vec![("blue".to_string(), n("10.1.0.0/16"))];
        let routes = vec![HostRoute {
            dst: n("10.1.2.0/24"),
            dev: "eth0".into(),
            linkdown: false,
        }];
        assert_eq!(
            conflict(&n("10.1.2.0/24"), &nets, &routes),
            Some(SubnetConflict::Network {
                name: "blue".into(),
                cidr: n("10.1.0.0/16")
            })
        );
        assert!(matches!(
            conflict(&n("10.1.2.0/24"), &[], &routes),
            Some(SubnetConflict::HostRoute(_))
        ));
        assert_eq!(conflict(&n("10.2.0.0/24"), &nets, &routes), None);
        // Families never overlap each other.
        assert_eq!(conflict(&n("fd00::/64"), &nets, &routes), None);
    }

    #[test]
    fn a_space_picks_around_networks_routes_and_extras() {
        let space = SubnetSpace {
            networks: vec![("blue".into(), n("10.89.0.0/24"))],
            routes: vec![HostRoute {
                dst: n("10.89.1.0/24"),
                dev: "eth0".into(),
                linkdown: false,
            }],
        };
        assert_eq!(
            space.pick(false, &[n("10.89.2.0/24")]),
            Some(n("10.89.3.0/24"))
        );
        assert_eq!(space.pick(true, &[]), Some(n("fd89::/64")));
        assert!(space.route_conflict(&n("10.89.0.0/24")).is_none());
        assert!(space.conflict(&n("10.89.0.0/24")).is_some());
    }

    #[test]
    fn picks_the_first_free_subnet_of_each_family() {
        let taken = vec![n("10.89.0.0/24"), n("10.89.1.128/25"), n("fd89::/64")];
        assert_eq!(pick_free(false, &taken), Some(n("10.89.2.0/24")));
        assert_eq!(pick_free(true, &taken), Some(n("fd89:1::/64")));
        assert_eq!(pick_free(false, &[n("10.0.0.0/8")]), None);
        assert_eq!(pick_free(true, &[n("fd89::/16")]), None);
    }
}
