//! Which BGP sessions a host opens: the iBGP mesh among ferrynet hosts (unless turned off)
//! and the external peers meant for it, one session per peer address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::config::{BgpConfig, NodeConfig, PeerRecord};
use crate::host::HostRecord;

/// Where a session comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// Another ferrynet host (the mesh).
    Mesh,
    /// A `bgp peer add` record.
    External,
}

/// One session to run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// `mesh-<host>` or the record's name.
    pub name: String,
    /// Mesh or external.
    pub kind: PeerKind,
    /// TCP destination.
    pub address: IpAddr,
    /// Our AS on this session.
    pub local_asn: u32,
    /// The peer's AS.
    pub remote_asn: u32,
    /// TCP-MD5 key.
    pub password: Option<String>,
    /// Accept a default route from it.
    pub accept_default: bool,
}

/// This host's AS: its node record's, else the cluster's.
pub fn host_asn(cfg: &BgpConfig, node: Option<&NodeConfig>) -> u32 {
    node.and_then(|n| n.asn).unwrap_or(cfg.asn)
}

/// The BGP identifier: the first IPv4 underlay address, else four bytes of a hash of the name
/// (RFC 6286 allows any non-zero, AS-wide unique value).
pub fn router_id(host: &str, underlay: &[IpNet]) -> Ipv4Addr {
    if let Some(IpAddr::V4(a)) = underlay
        .iter()
        .map(|n| n.addr())
        .find(|a| a.is_ipv4() && !a.is_unspecified())
    {
        return a;
    }
    let h = crate::names::hash12(&["bgp-router-id", host]);
    let n = u32::from_str_radix(&h[..8], 16).unwrap_or(1);
    Ipv4Addr::from(n.max(1))
}

/// Sessions of host `me`: the mesh (every other live host, over IPv4 when both have it,
/// else IPv6) when the config asks for it, then the external peers for everyone or for
/// `me`. An external peer at a mesh host's address replaces that mesh session.
pub fn plan(
    me: &str,
    my_underlay: &[IpNet],
    cfg: &BgpConfig,
    nodes: &BTreeMap<String, NodeConfig>,
    hosts: &[HostRecord],
    records: &[PeerRecord],
) -> Vec<PeerSpec> {
    let local_asn = host_asn(cfg, nodes.get(me));
    let mut by_addr: BTreeMap<IpAddr, PeerSpec> = BTreeMap::new();
    if cfg.mesh {
        for h in hosts.iter().filter(|h| h.name != me) {
            let Some(address) = session_address(my_underlay, &h.underlay) else {
                continue;
            };
            by_addr.insert(
                address,
                PeerSpec {
                    name: format!("mesh-{}", h.name),
                    kind: PeerKind::Mesh,
                    address,
                    local_asn,
                    remote_asn: host_asn(cfg, nodes.get(&h.name)),
                    password: None,
                    accept_default: false,
                },
            );
        }
    }
    for r in records {
        if r.host.as_deref().is_some_and(|h| h != me) || r.check().is_err() {
            continue;
        }
        by_addr.insert(
            r.address,
            PeerSpec {
                name: r.name.clone(),
                kind: PeerKind::External,
                address: r.address,
                local_asn,
                remote_asn: r.asn,
                password: r.password.clone(),
                accept_default: r.accept_default,
            },
        );
    }
    let mut out: Vec<PeerSpec> = by_addr.into_values().collect();
    out.sort();
    out
}

/// The peer's address to connect to: IPv4 when both hosts have it, else IPv6.
fn session_address(mine: &[IpNet], theirs: &[IpNet]) -> Option<IpAddr> {
    for v6 in [false, true] {
        let has = |n: &[IpNet]| n.iter().any(|a| a.addr().is_ipv6() == v6);
        if has(mine) && has(theirs) {
            return theirs.iter().map(|a| a.addr()).find(|a| a.is_ipv6() == v6);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, addrs: &[&str]) -> HostRecord {
        HostRecord::for_test(name, addrs)
    }

    fn tor(host: Option<&str>) -> PeerRecord {
        PeerRecord {
            name: "tor".into(),
            address: "172.31.0.254".parse().unwrap(),
            asn: 65000,
            host: host.map(Into::into),
            password: Some("s3cret".into()),
            accept_default: true,
        }
    }

    fn mine() -> Vec<IpNet> {
        vec![
            "172.31.0.1/24".parse().unwrap(),
            "fd31::1/64".parse().unwrap(),
        ]
    }

    #[test]
    fn mesh_peers_every_other_host_over_ipv4_first() {
        let hosts = [
            host("h1", &["172.31.0.1/24"]),
            host("h2", &["172.31.1.2/24", "fd31:1::2/64"]),
            host("h3", &["fd31:1::3/64"]),
        ];
        let nodes = BTreeMap::from([("h2".to_string(), NodeConfig { asn: Some(65002) })]);
        let p = plan("h1", &mine(), &BgpConfig::default(), &nodes, &hosts, &[]);
        assert_eq!(p.len(), 2);
        let h2 = p.iter().find(|s| s.name == "mesh-h2").unwrap();
        assert_eq!(h2.address, "172.31.1.2".parse::<IpAddr>().unwrap());
        assert_eq!((h2.local_asn, h2.remote_asn), (64512, 65002));
        let h3 = p.iter().find(|s| s.name == "mesh-h3").unwrap();
        assert_eq!(h3.address, "fd31:1::3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn mesh_off_leaves_external_peers_for_this_host() {
        let cfg = BgpConfig {
            mesh: false,
            ..Default::default()
        };
        let hosts = [host("h2", &["172.31.0.2/24"])];
        let recs = [tor(Some("h1")), {
            let mut t = tor(Some("h2"));
            t.name = "other".into();
            t.address = "172.31.1.254".parse().unwrap();
            t
        }];
        let p = plan("h1", &mine(), &cfg, &BTreeMap::new(), &hosts, &recs);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "tor");
        assert_eq!(p[0].kind, PeerKind::External);
        assert_eq!(p[0].password.as_deref(), Some("s3cret"));
        assert!(p[0].accept_default);
    }

    #[test]
    fn an_external_record_replaces_the_mesh_session_at_its_address_and_bad_ones_are_skipped() {
        let hosts = [host("h2", &["172.31.0.254/24"])];
        let mut bad = tor(None);
        bad.name = "bad".into();
        bad.address = "172.31.0.9".parse().unwrap();
        bad.asn = 0;
        let p = plan(
            "h1",
            &mine(),
            &BgpConfig::default(),
            &BTreeMap::new(),
            &hosts,
            &[tor(None), bad],
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "tor");
    }

    #[test]
    fn router_id_is_the_ipv4_underlay_or_a_stable_hash() {
        assert_eq!(router_id("h1", &mine()), Ipv4Addr::new(172, 31, 0, 1));
        let v6: Vec<IpNet> = vec!["fd31::1/64".parse().unwrap()];
        assert_eq!(router_id("h1", &v6), router_id("h1", &v6));
        assert_ne!(router_id("h1", &v6), router_id("h2", &v6));
        assert_ne!(router_id("h1", &v6), Ipv4Addr::UNSPECIFIED);
    }
}
