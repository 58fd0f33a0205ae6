//! The host's own routes, to refuse subnets that would shadow a LAN or VPN.
//!
//! Read from /proc/net/route and /proc/net/ipv6_route: a one-off read at network creation.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A route of the host that ferrynet did not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// Destination.
    pub dst: IpNet,
    /// Outgoing device.
    pub dev: String,
}

/// Parse /proc/net/route (IPv4; addresses in little-endian hex). Default routes and routes
/// through ferrynet's own `fn-*` bridges are left out.
pub fn parse_ipv4_routes(text: &str) -> Vec<HostRoute> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dev = *f.first()?;
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            let prefix = u32::from_be(mask).count_ones() as u8;
            let net = Ipv4Net::new(Ipv4Addr::from(u32::from_be(dst)), prefix).ok()?;
            (prefix > 0 && !dev.starts_with("fn-")).then(|| HostRoute {
                dst: IpNet::V4(net),
                dev: dev.to_string(),
            })
        })
        .collect()
}

/// Parse /proc/net/ipv6_route; link-local, multicast, loopback and default routes are left out.
pub fn parse_ipv6_routes(text: &str) -> Vec<HostRoute> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = u128::from_str_radix(f.first()?, 16).ok()?;
            let prefix = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let dev = *f.get(9)?;
            let ip = Ipv6Addr::from(addr);
            let seg0 = ip.segments()[0];
            let skip = prefix == 0
                || prefix == 128
                || seg0 & 0xffc0 == 0xfe80
                || seg0 & 0xff00 == 0xff00
                || dev == "lo"
                || dev.starts_with("fn-");
            (!skip).then(|| {
                Ipv6Net::new(ip, prefix).ok().map(|n| HostRoute {
                    dst: IpNet::V6(n),
                    dev: dev.to_string(),
                })
            })?
        })
        .collect()
}

/// The host's routes that are not ferrynet's (and not defaults).
pub fn foreign_routes() -> std::io::Result<Vec<HostRoute>> {
    let mut out = parse_ipv4_routes(&std::fs::read_to_string("/proc/net/route")?);
    if let Ok(t) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(parse_ipv6_routes(&t));
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
    fn parses_proc_net_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 fn-x\t0000590A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_ipv4_routes(t);
        assert_eq!(
            r,
            vec![HostRoute {
                dst: "192.168.0.0/24".parse().unwrap(),
                dev: "eth0".into()
            }]
        );
    }

    #[test]
    fn parses_ipv6_route() {
        let t = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                 fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        let r = parse_ipv6_routes(t);
        assert_eq!(
            r,
            vec![HostRoute {
                dst: "fd00::/64".parse().unwrap(),
                dev: "eth0".into()
            }]
        );
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
