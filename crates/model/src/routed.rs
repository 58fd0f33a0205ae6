//! Routed endpoints (network mode `routed`, Calico's model), the pure decisions.
//!
//! No bridge: each container's host-side veth (`fnv…`) is a plain routed interface. The
//! container holds its addresses as host prefixes (/32, /128), so it never resolves a neighbour
//! but its gateway, and its default routes go on-link to a link-local gateway, the same on every
//! host and port: `169.254.1.1` and `fe80::1`. The host end holds both as its own addresses, so
//! the kernel answers ARP and NDP for them on that veth (a link-local IPv6 address is scoped to
//! its interface; the IPv4 one is a /32 of link scope), and routes the container's addresses to
//! it by a /32 and a /128. Traffic between two containers of one host is routed by the host like
//! any other (no bridge, no `br_netfilter`), so isolation, anti-spoofing and policy see every
//! packet at the IP hooks with the container's port as input or output device.
//!
//! The network's gateway addresses (a single-host network's subnet gateways, this host's block
//! gateways for a multi-host one) are host addresses on `lo`: the addresses the agent's DNS
//! answers on and the host's source towards its containers, reached by the containers through
//! their link-local gateway. Each subnet or block also gets an `unreachable` route: an address no
//! container holds is refused at once (ICMP unreachable) instead of following the host's other
//! routes back to the underlay or out of a default route, where it could loop between hosts
//! that route the block to each other. A container's /32 and /128 win over it by longest prefix.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The IPv4 gateway every routed container uses (link-local, on-link).
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway every routed container uses (link-local, on-link).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The link-local gateway of an address's family.
pub fn gateway_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY4),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY6),
    }
}

/// One route to program: `dst`, via `gateway` if any (on-link: the kernel does not look the
/// gateway up in its routes), with the preferred source `src` if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Preferred source address (host routes to a container: the network's gateway).
    pub src: Option<IpAddr>,
}

/// The container's addresses as host prefixes: with no on-link subnet, every destination but the
/// gateway goes through the host.
pub fn container_addresses(ips: &[IpNet]) -> Vec<IpNet> {
    ips.iter()
        .filter_map(|ip| IpNet::new(ip.addr(), ip.max_prefix_len()).ok())
        .collect()
}

/// The container's routes: per family it has an address of, the default route via the
/// link-local gateway, on-link.
pub fn container_routes(ips: &[IpNet]) -> Vec<Route> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if !ips.iter().any(|ip| ip.addr().is_ipv6() == v6) {
            continue;
        }
        let (dst, gw) = if v6 {
            (IpNet::V6(Default::default()), IpAddr::V6(GATEWAY6))
        } else {
            (IpNet::V4(Default::default()), IpAddr::V4(GATEWAY4))
        };
        out.push(Route {
            dst,
            gateway: Some(gw),
            src: None,
        });
    }
    out
}

/// What the host end of a routed container's veth carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The link-local gateways of the container's families (`169.254.1.1/32`, `fe80::1/64`).
    pub addresses: Vec<IpNet>,
    /// A /32 or /128 per container address, sourced from the network's gateway of that family.
    pub routes: Vec<Route>,
    /// Per-interface kernel settings, `(key in path form, value)`.
    pub sysctls: Vec<(String, String)>,
}

/// The host end `port` of a container with addresses `ips`, on a network whose gateways on this
/// host are `gateways` (the preferred sources of the host's own traffic to the container).
pub fn host_port(port: &str, ips: &[IpNet], gateways: &[IpAddr]) -> HostPort {
    let has = |v6: bool| ips.iter().any(|ip| ip.addr().is_ipv6() == v6);
    let mut addresses = Vec::new();
    let mut sysctls = Vec::new();
    if has(false) {
        addresses.push(IpNet::new(IpAddr::V4(GATEWAY4), 32).expect("/32 is valid"));
        // The host's own 127.0.0.1:PORT published ports are DNATed out of this port; the
        // edge's `localnet` rules keep loopback on `lo` (as for bridges).
        sysctls.push((format!("net/ipv4/conf/{port}/route_localnet"), "1".into()));
        // A runtime that gives the container its subnet's prefix (Docker sets the pool's) makes
        // it ARP for its neighbours directly: the host answers for whatever it routes
        // elsewhere, on this port only, at once.
        sysctls.push((format!("net/ipv4/conf/{port}/proxy_arp"), "1".into()));
        sysctls.push((format!("net/ipv4/neigh/{port}/proxy_delay"), "0".into()));
    }
    if has(true) {
        addresses.push(IpNet::new(IpAddr::V6(GATEWAY6), 64).expect("/64 is valid"));
        sysctls.push((format!("net/ipv6/conf/{port}/disable_ipv6"), "0".into()));
        // The host routes for the container; a router advertisement from it means nothing.
        sysctls.push((format!("net/ipv6/conf/{port}/accept_ra"), "0".into()));
        // A container given its pool's prefix by another IPAM solicits its neighbours: the
        // host answers for the entries of `proxy_ndp`, at once.
        sysctls.push((format!("net/ipv6/conf/{port}/proxy_ndp"), "1".into()));
        sysctls.push((format!("net/ipv6/neigh/{port}/proxy_delay"), "0".into()));
    }
    let routes = ips
        .iter()
        .filter_map(|ip| {
            let dst = IpNet::new(ip.addr(), ip.max_prefix_len()).ok()?;
            let src = gateways
                .iter()
                .find(|g| g.is_ipv6() == ip.addr().is_ipv6())
                .copied();
            Some(Route {
                dst,
                gateway: None,
                src,
            })
        })
        .collect();
    HostPort {
        addresses,
        routes,
        sysctls,
    }
}

/// The proxy NDP entries of this host's routed ports of one network, `(port, address)`:
/// `ports` are the ports with their containers' addresses, `held` every address of the
/// network someone holds (on any host).
///
/// A container whose IPv6 address has a prefix shorter than /128 got it from another IPAM
/// (Docker then sets the pool's prefix): it solicits its on-link neighbours itself, and
/// IPv6 has no proxy ARP, so its port answers for each listed address. Listed: every held
/// address inside that prefix but the container's own (its duplicate address detection must
/// go unanswered); never an address outside the prefix or one nobody holds.
pub fn proxy_ndp(ports: &[(String, Vec<IpNet>)], held: &[IpAddr]) -> BTreeSet<(String, Ipv6Addr)> {
    let mut out = BTreeSet::new();
    for (port, ips) in ports {
        let own: Vec<IpAddr> = ips.iter().map(IpNet::addr).collect();
        for prefix in ips
            .iter()
            .filter(|i| i.addr().is_ipv6() && i.prefix_len() < 128)
        {
            let prefix = prefix.trunc();
            for a in held {
                if let IpAddr::V6(v6) = a {
                    if prefix.contains(a) && !own.contains(a) {
                        out.insert((port.clone(), *v6));
                    }
                }
            }
        }
    }
    out
}

/// Host-wide settings a routed network needs: forwarding in each family it has.
pub fn forwarding_sysctls(ips: impl IntoIterator<Item = IpAddr>) -> Vec<(String, String)> {
    let mut v4 = false;
    let mut v6 = false;
    for ip in ips {
        v4 |= ip.is_ipv4();
        v6 |= ip.is_ipv6();
    }
    let mut out = Vec::new();
    if v4 {
        out.push(("net/ipv4/ip_forward".to_string(), "1".to_string()));
    }
    if v6 {
        out.push(("net/ipv6/conf/all/forwarding".to_string(), "1".to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn proxy_ndp_only_for_ports_of_another_ipam_and_never_their_own_address() {
        let held: Vec<IpAddr> = ["fd05::2", "fd05::3", "fd05::4", "fd06::9", "10.5.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ports = vec![
            // Docker with another IPAM: the pool's prefix.
            ("fnva".to_string(), nets(&["10.5.0.2/24", "fd05::2/64"])),
            // ferrynet's IPAM: host prefixes, nothing to proxy.
            ("fnvb".to_string(), nets(&["10.5.0.3/32", "fd05::3/128"])),
        ];
        let got = proxy_ndp(&ports, &held);
        let want: BTreeSet<(String, Ipv6Addr)> = [
            ("fnva".to_string(), "fd05::3".parse().unwrap()),
            ("fnva".to_string(), "fd05::4".parse().unwrap()),
        ]
        .into();
        // Not fd05::2 (fnva's own), not fd06::9 (outside its prefix), not IPv4.
        assert_eq!(got, want);
        assert!(proxy_ndp(&ports[1..], &held).is_empty());
        let sys = host_port("fnva", &ports[0].1, &[]).sysctls;
        assert!(sys.contains(&("net/ipv6/conf/fnva/proxy_ndp".into(), "1".into())));
        assert!(sys.contains(&("net/ipv6/neigh/fnva/proxy_delay".into(), "0".into())));
    }

    #[test]
    fn containers_hold_host_prefixes() {
        assert_eq!(
            container_addresses(&nets(&["10.5.0.7/24", "fd05::7/64"])),
            nets(&["10.5.0.7/32", "fd05::7/128"])
        );
    }

    #[test]
    fn default_routes_go_on_link_to_the_link_local_gateway_per_family() {
        let r = container_routes(&nets(&["fd05::7/64", "10.5.0.7/24"]));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r[0].gateway, Some("169.254.1.1".parse().unwrap()));
        assert_eq!(r[1].dst.to_string(), "::/0");
        assert_eq!(r[1].gateway, Some("fe80::1".parse().unwrap()));
        let v6only = container_routes(&nets(&["fd05::7/64"]));
        assert_eq!(v6only.len(), 1);
        assert!(container_routes(&[]).is_empty());
    }

    #[test]
    fn the_host_end_holds_the_gateways_and_routes_each_address() {
        let gws: Vec<IpAddr> = vec!["10.5.0.1".parse().unwrap(), "fd05::1".parse().unwrap()];
        let p = host_port(
            "fnv0123456789ab",
            &nets(&["10.5.0.7/24", "fd05::7/64"]),
            &gws,
        );
        assert_eq!(p.addresses, nets(&["169.254.1.1/32", "fe80::1/64"]));
        assert_eq!(
            p.routes,
            vec![
                Route {
                    dst: "10.5.0.7/32".parse().unwrap(),
                    gateway: None,
                    src: Some(gws[0])
                },
                Route {
                    dst: "fd05::7/128".parse().unwrap(),
                    gateway: None,
                    src: Some(gws[1])
                },
            ]
        );
        assert!(p.sysctls.contains(&(
            "net/ipv4/conf/fnv0123456789ab/route_localnet".into(),
            "1".into()
        )));
        assert!(p
            .sysctls
            .contains(&("net/ipv6/conf/fnv0123456789ab/accept_ra".into(), "0".into())));
    }

    #[test]
    fn an_ipv4_only_port_gets_nothing_of_ipv6() {
        let p = host_port("fnv1", &nets(&["10.5.0.7/24"]), &[]);
        assert_eq!(p.addresses, nets(&["169.254.1.1/32"]));
        assert!(p.sysctls.iter().all(|(k, _)| !k.contains("ipv6")));
        assert_eq!(p.routes[0].src, None);
        assert_eq!(
            forwarding_sysctls(["10.5.0.1".parse().unwrap()]),
            vec![("net/ipv4/ip_forward".to_string(), "1".to_string())]
        );
    }
}
