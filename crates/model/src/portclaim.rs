//! Host-port claims in the store: which endpoint holds which published host ports, and the
//! conflict rule between claims.
//!
//! An endpoint's ports are one record (`keys::port_claim`) holding coalesced runs, so
//! publishing `-p 10000-11000` is one write, not 1,001: etcd refuses a transaction of more
//! than 128 operations. Records of older versions (one `ports/<proto>/<ip|*>/<port>` key per
//! port) are still read and released.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::network::keys;
use crate::portmap::{host_ips_overlap, PortMapping, Protocol};

/// Consecutive host ports of one protocol and host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRun {
    /// Protocol.
    pub proto: Protocol,
    /// Host address; None for every address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// First port of the run.
    pub first: u16,
    /// Last port of the run (inclusive).
    pub last: u16,
}

/// The host ports one endpoint holds, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortClaim {
    /// The owning endpoint's key.
    pub endpoint: String,
    /// The ports, coalesced.
    pub runs: Vec<PortRun>,
}

/// A published host port already held by someone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPort {
    /// Protocol name (`tcp`, `udp`, `sctp`).
    pub proto: String,
    /// Host address, None for every address.
    pub host_ip: Option<IpAddr>,
    /// Host port.
    pub port: u16,
    /// The owning endpoint's key.
    pub owner: String,
}

/// Coalesce mappings into runs of consecutive host ports (sorted; duplicates merged).
pub fn runs(mappings: &[PortMapping]) -> Vec<PortRun> {
    let mut ports: Vec<(Protocol, Option<IpAddr>, u16)> = mappings
        .iter()
        .map(|m| (m.protocol, m.host_ip, m.host_port))
        .collect();
    ports.sort();
    ports.dedup();
    let mut out: Vec<PortRun> = Vec::new();
    for (proto, host_ip, port) in ports {
        match out.last_mut() {
            Some(r)
                if r.proto == proto
                    && r.host_ip == host_ip
                    && u32::from(r.last) + 1 == u32::from(port) =>
            {
                r.last = port
            }
            _ => out.push(PortRun {
                proto,
                host_ip,
                first: port,
                last: port,
            }),
        }
    }
    out
}

impl PortClaim {
    /// The claim record of `mappings` for the endpoint at `endpoint`.
    pub fn new(endpoint: &str, mappings: &[PortMapping]) -> Self {
        PortClaim {
            endpoint: endpoint.to_string(),
            runs: runs(mappings),
        }
    }

    /// Decode a stored claim; a record that does not parse, or a run whose bounds are
    /// reversed (the store is input), yields None, so it claims nothing rather than
    /// failing every publisher.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let c: PortClaim = serde_json::from_slice(value).ok()?;
        c.runs.iter().all(|r| r.first <= r.last).then_some(c)
    }

    /// Every port of the claim.
    pub fn held(&self) -> impl Iterator<Item = HeldPort> + '_ {
        self.runs.iter().flat_map(move |r| {
            (r.first..=r.last).map(move |port| HeldPort {
                proto: r.proto.as_str().to_string(),
                host_ip: r.host_ip,
                port,
                owner: self.endpoint.clone(),
            })
        })
    }
}

/// Parse a `ports/<proto>/<ip|*>/<port>` key of the one-key-per-port layout.
pub fn parse_port_key(key: &str, owner: String) -> Option<HeldPort> {
    let rest = key.strip_prefix(&keys::host_ports())?;
    let mut parts = rest.splitn(3, '/');
    let proto = parts.next()?.to_string();
    let ip = parts.next()?;
    let port = parts.next()?.parse().ok()?;
    let host_ip = if ip == "*" {
        None
    } else {
        Some(ip.parse().ok()?)
    };
    Some(HeldPort {
        proto,
        host_ip,
        port,
        owner,
    })
}

/// The first requested mapping that clashes with a held port or with another requested one:
/// same protocol and port, and host addresses that overlap (`host_ips_overlap`: equal, or
/// either "any" or the unspecified address of the other's family).
pub fn port_conflict(held: &[HeldPort], wanted: &[PortMapping]) -> Option<String> {
    let clash = |a: Option<IpAddr>, b: Option<IpAddr>| host_ips_overlap(a, b);
    for (i, m) in wanted.iter().enumerate() {
        let proto = m.protocol.as_str();
        if let Some(h) = held
            .iter()
            .find(|h| h.proto == proto && h.port == m.host_port && clash(h.host_ip, m.host_ip))
        {
            return Some(format!(
                "host port {}/{proto}{} is already published by {}",
                m.host_port,
                m.host_ip.map(|i| format!(" on {i}")).unwrap_or_default(),
                h.owner
            ));
        }
        if wanted[..i].iter().any(|o| {
            o.protocol == m.protocol && o.host_port == m.host_port && clash(o.host_ip, m.host_ip)
        }) {
            return Some(format!(
                "host port {}/{proto} is requested twice",
                m.host_port
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(port: u16, ip: Option<&str>, proto: Protocol) -> PortMapping {
        PortMapping {
            host_port: port,
            container_port: 80,
            protocol: proto,
            host_ip: ip.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn a_range_is_one_run_and_round_trips() {
        let wanted: Vec<_> = (10000..=11000)
            .map(|p| pm(p, None, Protocol::Tcp))
            .collect();
        let c = PortClaim::new("/ep", &wanted);
        assert_eq!(c.runs.len(), 1);
        assert_eq!((c.runs[0].first, c.runs[0].last), (10000, 11000));
        let back = PortClaim::decode(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.held().count(), 1001);
        assert!(back.held().all(|h| h.owner == "/ep" && h.proto == "tcp"));
    }

    #[test]
    fn runs_split_by_protocol_address_and_gaps() {
        let r = runs(&[
            pm(81, None, Protocol::Tcp),
            pm(80, None, Protocol::Tcp),
            pm(80, None, Protocol::Tcp),
            pm(83, None, Protocol::Tcp),
            pm(80, None, Protocol::Udp),
            pm(80, Some("10.0.0.1"), Protocol::Tcp),
            pm(65535, None, Protocol::Sctp),
        ]);
        let spans: Vec<_> = r
            .iter()
            .map(|r| (r.proto.as_str(), r.host_ip.is_some(), r.first, r.last))
            .collect();
        assert_eq!(
            spans,
            vec![
                ("tcp", false, 80, 81),
                ("tcp", false, 83, 83),
                ("tcp", true, 80, 80),
                ("udp", false, 80, 80),
                ("sctp", false, 65535, 65535),
            ]
        );
    }

    #[test]
    fn malformed_records_claim_nothing() {
        assert!(PortClaim::decode(b"{").is_none());
        let reversed = br#"{"endpoint":"/e","runs":[{"proto":"tcp","first":90,"last":80}]}"#;
        assert!(PortClaim::decode(reversed).is_none());
        let ok =
            br#"{"endpoint":"/e","runs":[{"proto":"udp","hostIp":null,"first":53,"last":53}]}"#;
        // Unknown fields are ignored, as for every record.
        assert_eq!(PortClaim::decode(ok).unwrap().held().count(), 1);
    }

    #[test]
    fn port_key_round_trip() {
        let k = keys::host_port("udp", Some("10.0.0.1".parse().unwrap()), 53);
        let h = parse_port_key(&k, "o".into()).unwrap();
        assert_eq!(
            (h.proto.as_str(), h.host_ip, h.port),
            ("udp", Some("10.0.0.1".parse().unwrap()), 53)
        );
        let k = keys::host_port("tcp", None, 8080);
        assert_eq!(parse_port_key(&k, "o".into()).unwrap().host_ip, None);
    }

    #[test]
    fn conflicts_between_any_and_specific_addresses() {
        let held = vec![HeldPort {
            proto: "tcp".into(),
            host_ip: None,
            port: 8080,
            owner: "x".into(),
        }];
        let m = port_conflict(&held, &[pm(8080, Some("10.0.0.1"), Protocol::Tcp)]).unwrap();
        assert!(m.contains("8080/tcp"), "{m}");
        assert!(port_conflict(&held, &[pm(8080, None, Protocol::Udp)]).is_none());
        assert!(port_conflict(&held, &[pm(8081, None, Protocol::Tcp)]).is_none());
        let held = vec![HeldPort {
            proto: "tcp".into(),
            host_ip: Some("10.0.0.1".parse().unwrap()),
            port: 80,
            owner: "x".into(),
        }];
        assert!(port_conflict(&held, &[pm(80, Some("10.0.0.2"), Protocol::Tcp)]).is_none());
        assert!(port_conflict(&held, &[pm(80, None, Protocol::Tcp)]).is_some());
    }

    #[test]
    fn unspecified_addresses_claim_their_family_only() {
        let held = |ip: &str| {
            vec![HeldPort {
                proto: "tcp".into(),
                host_ip: Some(ip.parse().unwrap()),
                port: 80,
                owner: "o".into(),
            }]
        };
        let v4 = held("0.0.0.0");
        assert!(port_conflict(&v4, &[pm(80, Some("127.0.0.1"), Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v4, &[pm(80, None, Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v4, &[pm(80, Some("::"), Protocol::Tcp)]).is_none());
        assert!(port_conflict(&v4, &[pm(80, Some("fd00::1"), Protocol::Tcp)]).is_none());
        let v6 = held("::");
        assert!(port_conflict(&v6, &[pm(80, Some("fd00::1"), Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v6, &[pm(80, Some("0.0.0.0"), Protocol::Tcp)]).is_none());
        // Both families' "any" in one request is no duplicate (Docker-style callers send both).
        assert!(port_conflict(
            &[],
            &[
                pm(80, Some("0.0.0.0"), Protocol::Tcp),
                pm(80, Some("::"), Protocol::Tcp)
            ]
        )
        .is_none());
    }

    #[test]
    fn duplicate_in_one_request() {
        let m = port_conflict(
            &[],
            &[
                pm(80, None, Protocol::Tcp),
                pm(80, Some("10.0.0.1"), Protocol::Tcp),
            ],
        );
        assert!(m.unwrap().contains("requested twice"));
    }
}
