//! What a host announces and what it accepts.
//!
//! Export (Romana's aggregation): one route per block this host owns, never one per
//! container, plus a /32 or /128 only for an address of this host's containers that lies
//! outside its own blocks (a borrowed address: see [`may_borrow`]). Import: only prefixes
//! inside the configured pools (and a default route from a peer allowed to send one), never one
//! that overlaps this host's own blocks except the host route of an address the store lends to
//! another host's container, no AS_PATH that holds our AS (a loop), and a next hop that is a
//! neighbour on one of this host's underlay links.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::discovery::DiscoveryView;
use crate::fabric::Backend;
use crate::network::{Network, NetworkMode};

/// Whether a container of `net` may hold an address of a block another host owns (or nobody
/// does): only on a `bgp` network in routed mode, where the container's gateway is link-local
/// (no block gateway needed on its host) and its address is announced as a host route that
/// wins over the block's aggregate by longest prefix. Calico's "borrowed" addresses.
pub fn may_borrow(net: &Network) -> bool {
    net.mode == NetworkMode::Routed && net.fabric.is_some_and(|f| f.backend == Backend::Bgp)
}

/// What this host announces and accepts, from the cluster's records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPrefixes {
    /// The subnets of the `bgp` networks.
    pub pools: Vec<IpNet>,
    /// This host's blocks of them.
    pub own: Vec<IpNet>,
    /// Addresses of this host's containers inside a pool but outside its own blocks (announced
    /// as /32 or /128).
    pub borrowed: Vec<IpAddr>,
    /// Addresses inside this host's blocks held by other hosts' containers (their host routes
    /// are accepted from peers).
    pub lent: BTreeSet<IpAddr>,
}

impl HostPrefixes {
    /// What [`export`] announces.
    pub fn exports(&self) -> BTreeSet<IpNet> {
        export(&self.own, &self.borrowed)
    }
}

/// Pools, own blocks, borrowed and lent addresses of host `me` on the `bgp` networks of `view`
/// (block claims and endpoint records; both already checked by the view). An endpoint address
/// outside every pool is ignored: a record cannot make a host announce foreign space.
pub fn host_prefixes(view: &DiscoveryView, me: &str) -> HostPrefixes {
    let mut out = HostPrefixes::default();
    for net in view
        .networks
        .values()
        .filter(|n| n.fabric.is_some_and(|f| f.backend == Backend::Bgp))
    {
        let pools: Vec<IpNet> = net.subnets.iter().map(|s| s.cidr.trunc()).collect();
        let own = view.blocks_of(&net.name, me);
        for ep in view.endpoints_on(&net.name) {
            let Some(host) = ep.host.as_deref() else {
                continue;
            };
            for ip in ep.addrs.iter().copied() {
                if !pools.iter().any(|p| p.contains(&ip)) {
                    continue;
                }
                let in_own = own.iter().any(|b| b.contains(&ip));
                if host == me && !in_own {
                    out.borrowed.push(ip);
                } else if host != me && in_own {
                    out.lent.insert(ip);
                }
            }
        }
        out.pools.extend(pools);
        out.own.extend(own);
    }
    out.borrowed.sort();
    out.borrowed.dedup();
    out
}

/// This host's announcements: its blocks (truncated) and host routes for `extra` addresses
/// that no block of its own covers.
pub fn export(blocks: &[IpNet], extra: &[IpAddr]) -> BTreeSet<IpNet> {
    let mut out: BTreeSet<IpNet> = blocks.iter().map(IpNet::trunc).collect();
    for a in extra {
        if !blocks.iter().any(|b| b.contains(a)) {
            out.insert(IpNet::from(*a));
        }
    }
    out
}

/// Why a received route is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not inside any pool (and not an allowed default route).
    #[error("{0} is outside the configured pools")]
    OutsidePools(IpNet),
    /// Equals or lies inside one of this host's blocks: it would steal local traffic (a
    /// covering aggregate is harmless, the block's own route is more specific).
    #[error("{0} lies inside this host's block {1}")]
    OwnBlock(IpNet, IpNet),
    /// Our AS in the AS_PATH.
    #[error("AS_PATH of {0} contains our AS {1} (a loop)")]
    Loop(IpNet, u32),
    /// Next hop of another family than the prefix.
    #[error("next hop {1} of {0} is of the other address family")]
    NextHopFamily(IpNet, IpAddr),
    /// Next hop not a neighbour on an underlay link (or one of ours, or not unicast).
    #[error("next hop {1} of {0} is not a neighbour on this host's underlay links")]
    NextHop(IpNet, IpAddr),
}

/// The rules imports are held to.
#[derive(Debug, Clone, Copy)]
pub struct ImportRules<'a> {
    /// The pools (subnets of the `bgp` networks).
    pub pools: &'a [IpNet],
    /// This host's own blocks.
    pub own: &'a [IpNet],
    /// Addresses in the own blocks lent to other hosts' containers: their host routes pass.
    pub lent: &'a BTreeSet<IpAddr>,
    /// This host's underlay addresses with their prefixes.
    pub underlay: &'a [IpNet],
    /// Our AS.
    pub local_asn: u32,
    /// The peer may send a default route.
    pub accept_default: bool,
}

/// Check one received route; Ok means it may enter the RIB.
pub fn import(
    rules: &ImportRules<'_>,
    prefix: IpNet,
    next_hop: IpAddr,
    as_path: &[u32],
) -> Result<(), Rejected> {
    let prefix = prefix.trunc();
    let default = prefix.prefix_len() == 0;
    let in_pool = rules
        .pools
        .iter()
        .any(|p| p.contains(&prefix) || *p == prefix);
    if !(in_pool || default && rules.accept_default) {
        return Err(Rejected::OutsidePools(prefix));
    }
    if !default {
        let lent =
            prefix.prefix_len() == prefix.max_prefix_len() && rules.lent.contains(&prefix.addr());
        if let Some(b) = rules.own.iter().find(|b| b.contains(&prefix)) {
            if !lent {
                return Err(Rejected::OwnBlock(prefix, *b));
            }
        }
    }
    if as_path.contains(&rules.local_asn) {
        return Err(Rejected::Loop(prefix, rules.local_asn));
    }
    if next_hop.is_ipv6() != prefix.addr().is_ipv6() {
        return Err(Rejected::NextHopFamily(prefix, next_hop));
    }
    if !next_hop_ok(rules.underlay, next_hop) {
        return Err(Rejected::NextHop(prefix, next_hop));
    }
    Ok(())
}

/// A next hop is a unicast neighbour on one of our underlay subnets, not one of our own
/// addresses; an IPv6 link-local one is on-link by definition (the route names the device).
fn next_hop_ok(underlay: &[IpNet], nh: IpAddr) -> bool {
    let unicast = match nh {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
    };
    if !unicast || underlay.iter().any(|u| u.addr() == nh) {
        return false;
    }
    if let IpAddr::V6(a) = nh {
        if a.segments()[0] & 0xffc0 == 0xfe80 {
            return true;
        }
    }
    underlay.iter().any(|u| {
        u.prefix_len() < u.max_prefix_len()
            && u.trunc().contains(&nh)
            && nh != u.network()
            && (nh.is_ipv6() || nh != u.broadcast())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    static NONE: BTreeSet<IpAddr> = BTreeSet::new();

    fn rules<'a>(pools: &'a [IpNet], own: &'a [IpNet], underlay: &'a [IpNet]) -> ImportRules<'a> {
        ImportRules {
            pools,
            own,
            lent: &NONE,
            underlay,
            local_asn: 64512,
            accept_default: false,
        }
    }

    #[test]
    fn export_is_blocks_plus_host_routes_outside_them() {
        let blocks = [n("10.20.0.64/26"), n("fd20::40/122")];
        let e = export(&blocks, &[a("10.20.0.70"), a("10.20.9.9"), a("fd20::1:5")]);
        let want: BTreeSet<IpNet> = [
            n("10.20.0.64/26"),
            n("fd20::40/122"),
            n("10.20.9.9/32"),
            n("fd20::1:5/128"),
        ]
        .into();
        assert_eq!(e, want);
    }

    #[test]
    fn import_takes_pool_prefixes_from_on_link_neighbours() {
        let pools = [n("10.20.0.0/16"), n("fd20::/64")];
        let own = [n("10.20.0.0/26"), n("fd20::/122")];
        let ul = [n("172.31.0.1/24"), n("fd31::1/64")];
        let r = rules(&pools, &own, &ul);
        import(&r, n("10.20.0.64/26"), a("172.31.0.254"), &[65000, 64513]).unwrap();
        import(&r, n("10.20.9.9/32"), a("172.31.0.2"), &[]).unwrap();
        import(&r, n("fd20::40/122"), a("fd31::fe"), &[65000]).unwrap();
        import(&r, n("fd20::40/122"), a("fe80::1"), &[65000]).unwrap();
        import(&r, n("10.20.0.0/16"), a("172.31.0.254"), &[]).unwrap();
    }

    #[test]
    fn import_refuses_what_a_hostile_peer_sends() {
        let pools = [n("10.20.0.0/16"), n("fd20::/64")];
        let own = [n("10.20.0.0/26")];
        let ul = [n("172.31.0.1/24"), n("fd31::1/64")];
        let r = rules(&pools, &own, &ul);
        let nh = a("172.31.0.254");
        for p in ["192.168.0.0/24", "10.0.0.0/8", "0.0.0.0/0", "10.21.0.0/26"] {
            assert_eq!(
                import(&r, n(p), nh, &[]),
                Err(Rejected::OutsidePools(n(p))),
                "{p}"
            );
        }
        assert!(matches!(
            import(&r, n("10.20.0.5/32"), nh, &[]),
            Err(Rejected::OwnBlock(..))
        ));
        assert!(matches!(
            import(&r, n("10.20.0.0/26"), nh, &[]),
            Err(Rejected::OwnBlock(..))
        ));
        assert!(matches!(
            import(&r, n("10.20.1.0/26"), nh, &[65000, 64512]),
            Err(Rejected::Loop(..))
        ));
        assert!(matches!(
            import(&r, n("10.20.1.0/26"), a("fd31::fe"), &[]),
            Err(Rejected::NextHopFamily(..))
        ));
        for bad in [
            "172.31.1.254",
            "172.31.0.1",
            "172.31.0.0",
            "172.31.0.255",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(
                matches!(
                    import(&r, n("10.20.1.0/26"), a(bad), &[]),
                    Err(Rejected::NextHop(..))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            import(&r, n("fd20::40/122"), a("fd99::1"), &[]),
            Err(Rejected::NextHop(..))
        ));
    }

    #[test]
    fn a_default_route_only_when_allowed() {
        let pools = [n("10.20.0.0/16")];
        let ul = [n("172.31.0.1/24")];
        let mut r = rules(&pools, &[], &ul);
        assert!(import(&r, n("0.0.0.0/0"), a("172.31.0.254"), &[]).is_err());
        r.accept_default = true;
        import(&r, n("0.0.0.0/0"), a("172.31.0.254"), &[]).unwrap();
    }

    #[test]
    fn only_a_lent_address_passes_inside_an_own_block() {
        let pools = [n("10.20.0.0/16")];
        let own = [n("10.20.0.0/26")];
        let ul = [n("172.31.0.1/24")];
        let lent: BTreeSet<IpAddr> = [a("10.20.0.9")].into();
        let mut r = rules(&pools, &own, &ul);
        r.lent = &lent;
        let nh = a("172.31.0.254");
        import(&r, n("10.20.0.9/32"), nh, &[]).unwrap();
        for p in [
            "10.20.0.10/32",
            "10.20.0.8/31",
            "10.20.0.0/26",
            "10.20.0.9/31",
        ] {
            assert!(
                matches!(import(&r, n(p), nh, &[]), Err(Rejected::OwnBlock(..))),
                "{p}"
            );
        }
        // Lending does not open the pools.
        let far: BTreeSet<IpAddr> = [a("10.99.0.1")].into();
        r.lent = &far;
        assert!(matches!(
            import(&r, n("10.99.0.1/32"), nh, &[]),
            Err(Rejected::OutsidePools(..))
        ));
    }

    fn view(records: &[(String, serde_json::Value)]) -> DiscoveryView {
        let raw: Vec<(String, Vec<u8>)> = records
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_vec(v).unwrap()))
            .collect();
        let mut v = DiscoveryView::default();
        v.reset(raw.iter().map(|(k, v)| (k.as_str(), v.as_slice())), 1);
        assert!(v.rejected.is_empty(), "{:?}", v.rejected);
        v
    }

    fn net(name: &str, backend: &str, subnet: &str) -> (String, serde_json::Value) {
        (
            crate::network::keys::network(name),
            serde_json::json!({
                "name": name, "mode": "routed", "bridge": format!("fn-{name}"),
                "subnets": [{"cidr": subnet}],
                "fabric": {"backend": backend, "vni": 7, "blockV4": 26, "blockV6": 122}
            }),
        )
    }

    fn block(net: &str, cidr: &str, host: &str) -> (String, serde_json::Value) {
        (
            crate::network::keys::block(net, &n(cidr)),
            serde_json::json!({ "host": host }),
        )
    }

    fn ep(net: &str, id: &str, host: &str, ips: &[&str]) -> (String, serde_json::Value) {
        (
            crate::network::keys::endpoint(net, id, "eth0"),
            serde_json::json!({
                "network": net, "containerId": id, "ifname": "eth0", "host": host, "ips": ips
            }),
        )
    }

    #[test]
    fn borrowed_addresses_are_exported_and_lent_ones_accepted() {
        let v = view(&[
            net("fab", "bgp", "10.20.0.0/16"),
            net("vx", "vxlan", "10.30.0.0/16"),
            block("fab", "10.20.0.0/26", "h1"),
            block("fab", "10.20.0.64/26", "h2"),
            block("vx", "10.30.0.0/26", "h1"),
            // h2's containers: one in its block, one borrowed from h1's, one in a free block.
            ep("fab", "a", "h2", &["10.20.0.66/32"]),
            ep("fab", "b", "h2", &["10.20.0.9/32"]),
            ep("fab", "c", "h2", &["10.20.1.5/32"]),
            // h1's own container, and a vxlan network's (not announced at all).
            ep("fab", "d", "h1", &["10.20.0.2/32"]),
            ep("vx", "e", "h2", &["10.30.0.7/32"]),
        ]);
        let h2 = host_prefixes(&v, "h2");
        assert_eq!(h2.pools, vec![n("10.20.0.0/16")]);
        assert_eq!(h2.own, vec![n("10.20.0.64/26")]);
        assert_eq!(h2.borrowed, vec![a("10.20.0.9"), a("10.20.1.5")]);
        assert!(h2.lent.is_empty());
        let want: BTreeSet<IpNet> =
            [n("10.20.0.64/26"), n("10.20.0.9/32"), n("10.20.1.5/32")].into();
        assert_eq!(h2.exports(), want);
        let h1 = host_prefixes(&v, "h1");
        assert!(h1.borrowed.is_empty());
        assert_eq!(h1.lent, [a("10.20.0.9")].into());
        assert_eq!(h1.exports(), [n("10.20.0.0/26")].into());
    }

    #[test]
    fn borrowing_only_on_routed_bgp_networks() {
        let mut nt: Network = serde_json::from_value(net("fab", "bgp", "10.20.0.0/16").1).unwrap();
        assert!(may_borrow(&nt));
        nt.mode = NetworkMode::Bridge;
        assert!(!may_borrow(&nt));
        let vx: Network = serde_json::from_value(net("vx", "vxlan", "10.30.0.0/16").1).unwrap();
        assert!(!may_borrow(&vx));
    }
}
