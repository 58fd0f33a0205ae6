//! The host's own routes, to refuse subnets that would shadow a LAN or VPN, or be shadowed by a
//! route that is down but still takes the traffic.
//!
//! Read from the main table over netlink (in the caller's namespace): a one-off read at network
//! creation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ferrynet_dataplane::error::DataplaneError;
use ferrynet_dataplane::netlink::Netlink;
use ipnet::{IpNet, Ipv4Net};

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

/// The host's routes that a new subnet must not overlap (see [`counts`]).
pub async fn foreign_routes() -> Result<Vec<HostRoute>, DataplaneError> {
    let nl = Netlink::current()?;
    let names: BTreeMap<u32, String> = nl
        .links()
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = Vec::new();
    for (r, linkdown) in nl.main_routes_linkdown().await? {
        let Some(dev) = r.oif.and_then(|i| names.get(&i)).cloned() else {
            continue;
        };
        if counts(&r.dst, &dev, linkdown) {
            out.push(HostRoute {
                dst: r.dst,
                dev,
                linkdown,
            });
        }
    }
    Ok(out)
}

/// The first 10.89.N.0/24 overlapping nothing in `taken`.
pub fn pick_free_subnet(taken: &[IpNet]) -> Option<IpNet> {
    (0..=255u8)
        .map(|n| {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 89, n, 0), 24).expect("/24 is a valid prefix"))
        })
        .find(|c| !taken.iter().any(|t| ferrynet_model::ipam::overlaps(t, c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_ferrynet_bridges_and_other_devices_count() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
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
            dst: "10.9.0.0/24".parse().unwrap(),
            dev: "fn-old".into(),
            linkdown: true,
        };
        let d = r.describe();
        assert!(d.contains("fn-old") && d.contains("linkdown"), "{d}");
    }

    #[test]
    fn picks_first_free() {
        let taken: Vec<IpNet> = vec![
            "10.89.0.0/24".parse().unwrap(),
            "10.89.1.128/25".parse().unwrap(),
        ];
        assert_eq!(
            pick_free_subnet(&taken),
            Some("10.89.2.0/24".parse().unwrap())
        );
        assert_eq!(pick_free_subnet(&["10.0.0.0/8".parse().unwrap()]), None);
    }
}
