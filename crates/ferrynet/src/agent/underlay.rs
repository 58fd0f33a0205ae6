//! Finding this host's underlay: the interface its default route leaves through.

use ferrynet_dataplane::netlink::Netlink;
use ipnet::IpNet;

/// The interface of the IPv4 default route in a `/proc/net/route` table.
pub fn default_route_dev(proc_net_route: &str) -> Option<String> {
    proc_net_route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// Addresses usable for the underlay: global unicast (no loopback, no link-local).
pub fn usable(addrs: &[IpNet]) -> Vec<IpNet> {
    addrs
        .iter()
        .filter(|a| match a.addr() {
            std::net::IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
            std::net::IpAddr::V6(v) => !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80,
        })
        .copied()
        .collect()
}

/// The underlay interface as found in the kernel.
#[derive(Debug, Clone)]
pub struct Underlay {
    /// Interface name.
    pub dev: String,
    /// Interface index.
    pub index: u32,
    /// Its addresses with their prefix lengths.
    pub addrs: Vec<IpNet>,
    /// Its MTU.
    pub mtu: u32,
}

/// Look up the underlay interface (`dev`, else the default route's interface).
pub async fn find(nl: &Netlink, dev: Option<&str>) -> anyhow::Result<Underlay> {
    let dev = match dev {
        Some(d) => d.to_string(),
        None => {
            let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
            default_route_dev(&table).ok_or_else(|| {
                anyhow::anyhow!(
                    "no IPv4 default route to pick the underlay interface from; pass --underlay-dev"
                )
            })?
        }
    };
    let link = nl
        .link_by_name(&dev)
        .await?
        .ok_or_else(|| anyhow::anyhow!("underlay interface {dev} does not exist"))?;
    let addrs = usable(&nl.addresses(link.index).await?);
    if addrs.is_empty() {
        anyhow::bail!("underlay interface {dev} has no global address");
    }
    Ok(Underlay {
        dev,
        index: link.index,
        addrs,
        mtu: link.mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_proc() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_dev(t).as_deref(), Some("eth0"));
        assert_eq!(default_route_dev("Iface\n"), None);
    }

    #[test]
    fn only_global_addresses() {
        let a: Vec<IpNet> = ["127.0.0.1/8", "fe80::1/64", "192.168.1.2/24", "fd00::2/64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let u = usable(&a);
        assert_eq!(u.len(), 2);
    }
}
