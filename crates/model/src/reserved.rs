//! Ports and addresses the hosts need for themselves (pure): service ingress and explicit
//! virtual IPs must not take them over.
//!
//! Ingress answers on every local address of every host (`fib daddr type local`), gateways
//! included, so an ingress port equal to etcd's, the VXLAN port, SSH or the agent's DNS would
//! divert the cluster's own traffic to a service's producers. An explicit `--vip` outside the
//! VIP ranges could likewise be a host's or etcd's address. Both are refused unless forced.
//!
//! A published port (`hostPort`, CNI's `portMappings`) is DNATed by the same
//! `fib daddr type local` test, so a pod publishing one of these ports would take the host's
//! own traffic: UDP 53 every container's DNS through its gateway, the VXLAN port the other
//! hosts' tunnelled pod traffic, SSH and etcd their clients. Those are refused outright: a pod
//! spec is not trusted the way the cluster's own `service register` is.

use std::net::IpAddr;

use crate::portmap::{PortMapping, Protocol};
use crate::service::{IngressPort, VipRanges};

/// etcd's default client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's default peer port.
pub const ETCD_PEER_PORT: u16 = 2380;
/// SSH.
pub const SSH_PORT: u16 = 22;
/// DNS (the agent serves it on the gateways).
pub const DNS_PORT: u16 = 53;

/// A port a host needs, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedPort {
    /// The port.
    pub port: u16,
    /// The protocols it is needed on.
    pub protocols: Vec<Protocol>,
    /// Who uses it, for the error message.
    pub what: String,
}

/// Why a registration is refused (each names the conflict and `--force`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservedError {
    /// An ingress port is one the hosts need.
    #[error("--ingress {published}/{protocol}: port {published}/{protocol} is {what} on the hosts; ingress would take it over on every host's addresses (choose another port, or --force)")]
    IngressPort {
        /// The published port.
        published: u16,
        /// Its protocol.
        protocol: &'static str,
        /// Who needs it.
        what: String,
    },
    /// A published port (a pod's `hostPort`) is one the hosts need.
    #[error("hostPort {port}/{protocol} is {what} on this host; publishing it would divert the host's own traffic to the container (choose another host port)")]
    HostPort {
        /// The host port.
        port: u16,
        /// Its protocol.
        protocol: &'static str,
        /// Who needs it.
        what: String,
    },
    /// An explicit VIP lies outside the configured ranges.
    #[error("--vip {ip}: outside the VIP ranges ({ranges}); it could be a host's or the store's address (use an address inside them, or --force)")]
    VipOutsideRanges {
        /// The address.
        ip: IpAddr,
        /// The configured ranges.
        ranges: String,
    },
}

/// The ports of the endpoints of an etcd store URL (`etcd://h:p[,h:p…]`, `etcds://…`); none
/// for another kind of store. Endpoints without a port use etcd's client port.
pub fn store_ports(url: &str) -> Vec<u16> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    if !["etcd", "etcds"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return Vec::new();
    }
    let hosts = rest.split(['?', '/']).next().unwrap_or_default();
    let mut ports: Vec<u16> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            // `[v6]:port`, `host:port`, or a bare host.
            let tail = h.rsplit_once(']').map_or(h, |(_, t)| t);
            tail.rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(ETCD_CLIENT_PORT)
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The ports the hosts need: etcd's (2379, 2380 and those of `store_url` when it is etcd),
/// the VXLAN port, SSH, and the agent's DNS on the gateways.
pub fn host_ports(store_url: Option<&str>, vxlan_port: u16) -> Vec<ReservedPort> {
    let r = |port, protocols: &[Protocol], what: &str| ReservedPort {
        port,
        protocols: protocols.to_vec(),
        what: what.to_string(),
    };
    let tcp = [Protocol::Tcp];
    let mut out = vec![
        r(ETCD_CLIENT_PORT, &tcp, "etcd's client port"),
        r(ETCD_PEER_PORT, &tcp, "etcd's peer port"),
    ];
    for p in store_url.map(store_ports).unwrap_or_default() {
        if p != ETCD_CLIENT_PORT && p != ETCD_PEER_PORT {
            out.push(r(p, &tcp, "the store's (etcd) port"));
        }
    }
    out.push(r(
        vxlan_port,
        &[Protocol::Udp],
        "the VXLAN port of the fabric",
    ));
    out.push(r(SSH_PORT, &tcp, "SSH"));
    out.push(r(
        DNS_PORT,
        &[Protocol::Udp, Protocol::Tcp],
        "DNS (the agent answers on the gateways)",
    ));
    out
}

/// Refuse ingress ports the hosts need.
pub fn check_ingress(
    ingress: &[IngressPort],
    reserved: &[ReservedPort],
) -> Result<(), ReservedError> {
    for i in ingress {
        if let Some(r) = reserved
            .iter()
            .find(|r| r.port == i.published && r.protocols.contains(&i.protocol))
        {
            return Err(ReservedError::IngressPort {
                published: i.published,
                protocol: i.protocol.as_str(),
                what: r.what.clone(),
            });
        }
    }
    Ok(())
}

/// Refuse published ports (CNI `portMappings`, whatever their host address) the hosts need.
pub fn check_host_ports(
    mappings: &[PortMapping],
    reserved: &[ReservedPort],
) -> Result<(), ReservedError> {
    for m in mappings {
        if let Some(r) = reserved
            .iter()
            .find(|r| r.port == m.host_port && r.protocols.contains(&m.protocol))
        {
            return Err(ReservedError::HostPort {
                port: m.host_port,
                protocol: m.protocol.as_str(),
                what: r.what.clone(),
            });
        }
    }
    Ok(())
}

/// Refuse explicit virtual IPs outside the configured ranges of their family.
pub fn check_vips(vips: &[IpAddr], ranges: &VipRanges) -> Result<(), ReservedError> {
    for ip in vips {
        let range = if ip.is_ipv6() { ranges.v6 } else { ranges.v4 };
        if !range.is_some_and(|r| r.contains(ip)) {
            let ranges = [ranges.v4, ranges.v6]
                .iter()
                .flatten()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ReservedError::VipOutsideRanges {
                ip: *ip,
                ranges: if ranges.is_empty() {
                    "none".into()
                } else {
                    ranges
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(published: u16, protocol: Protocol) -> IngressPort {
        IngressPort {
            published,
            target: 80,
            protocol,
            local: false,
        }
    }

    #[test]
    fn store_ports_of_etcd_urls_only() {
        assert_eq!(store_ports("etcd://10.0.0.1:2379"), [2379]);
        assert_eq!(
            store_ports("etcds://a:32379,[fd00::1]:4001,b?ca=/x.pem"),
            [2379, 4001, 32379]
        );
        assert!(store_ports("file:///var/lib/ferrynet/store.redb").is_empty());
        assert!(store_ports("/var/lib/ferrynet/store.redb").is_empty());
    }

    #[test]
    fn every_host_port_is_refused_for_ingress_with_its_reason() {
        let reserved = host_ports(Some("etcd://10.0.0.1:32379"), 4789);
        for (port, proto, what) in [
            (2379, Protocol::Tcp, "etcd's client port"),
            (2380, Protocol::Tcp, "etcd's peer port"),
            (32379, Protocol::Tcp, "the store's (etcd) port"),
            (4789, Protocol::Udp, "the VXLAN port"),
            (22, Protocol::Tcp, "SSH"),
            (53, Protocol::Udp, "DNS"),
            (53, Protocol::Tcp, "DNS"),
        ] {
            let e = check_ingress(
                &[ingress(8080, Protocol::Tcp), ingress(port, proto)],
                &reserved,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(what) && e.contains("--force"), "{e}");
            assert!(e.contains(&format!("{port}/{}", proto.as_str())), "{e}");
        }
        // Other protocols on those ports, and ordinary ports, are fine.
        let ok = [
            ingress(4789, Protocol::Tcp),
            ingress(22, Protocol::Udp),
            ingress(8080, Protocol::Tcp),
        ];
        assert_eq!(check_ingress(&ok, &reserved), Ok(()));
    }

    fn mapping(host_port: u16, protocol: Protocol, host_ip: Option<&str>) -> PortMapping {
        PortMapping {
            host_port,
            container_port: 8080,
            protocol,
            host_ip: host_ip.map(|a| a.parse().unwrap()),
        }
    }

    #[test]
    fn host_ports_the_hosts_need_are_refused_for_pods() {
        let reserved = host_ports(Some("etcd://10.0.0.1:32379"), 4789);
        for (port, proto, what) in [
            (53, Protocol::Udp, "DNS"),
            (53, Protocol::Tcp, "DNS"),
            (4789, Protocol::Udp, "VXLAN"),
            (22, Protocol::Tcp, "SSH"),
            (2379, Protocol::Tcp, "etcd"),
            (32379, Protocol::Tcp, "etcd"),
        ] {
            // Whatever the host address: every one of them is the host's.
            for ip in [None, Some("0.0.0.0"), Some("127.0.0.1"), Some("::")] {
                let e = check_host_ports(
                    &[mapping(8080, Protocol::Tcp, None), mapping(port, proto, ip)],
                    &reserved,
                )
                .unwrap_err()
                .to_string();
                assert!(e.contains(what), "{e}");
                assert!(
                    e.contains(&format!("hostPort {port}/{}", proto.as_str())),
                    "{e}"
                );
            }
        }
        let ok = [
            mapping(4789, Protocol::Tcp, None),
            mapping(53, Protocol::Sctp, None),
            mapping(8080, Protocol::Udp, Some("10.0.0.1")),
        ];
        assert_eq!(check_host_ports(&ok, &reserved), Ok(()));
    }

    #[test]
    fn vips_must_lie_in_the_ranges_of_their_family() {
        let ranges = VipRanges::default();
        let ok: Vec<IpAddr> = vec!["10.96.0.9".parse().unwrap(), "fd00:96::9".parse().unwrap()];
        assert_eq!(check_vips(&ok, &ranges), Ok(()));
        let e = check_vips(&["172.31.0.253".parse().unwrap()], &ranges).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("172.31.0.253") && msg.contains("10.96.0.0/16"),
            "{msg}"
        );
        assert!(msg.contains("--force"), "{msg}");
        assert!(check_vips(&["fd31::1".parse().unwrap()], &ranges).is_err());
        let v4_only = VipRanges {
            v4: ranges.v4,
            v6: None,
        };
        assert!(check_vips(&["fd00:96::9".parse().unwrap()], &v4_only).is_err());
    }
}
