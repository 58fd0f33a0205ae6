//! What a host announces and what it accepts.
//!
//! Export (Romana's aggregation): one route per block this host owns, never one per
//! container, plus a /32 or /128 only for an address of this host that lies outside its own
//! blocks (a routed endpoint that kept its address). Import: only prefixes inside the
//! configured pools (and a default route from a peer allowed to send one), never one that
//! overlaps this host's own blocks, no AS_PATH that holds our AS (a loop), and a next hop that
//! is a neighbour on one of this host's underlay links.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

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
        if let Some(b) = rules.own.iter().find(|b| b.contains(&prefix)) {
            return Err(Rejected::OwnBlock(prefix, *b));
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

    fn rules<'a>(pools: &'a [IpNet], own: &'a [IpNet], underlay: &'a [IpNet]) -> ImportRules<'a> {
        ImportRules {
            pools,
            own,
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
}
