//! Published ports: a host port forwarded to a container port.

use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl<'de> Deserialize<'de> for Protocol {
    /// `tcp`, `udp`, `sctp` in any case (Kubernetes spells them `TCP`…); `""` is the default,
    /// as a Go zero value is.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "" | "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(serde::de::Error::custom(format!(
                "unknown protocol {s:?} (tcp, udp or sctp)"
            ))),
        }
    }
}

impl Protocol {
    /// The protocol's name as nftables and CNI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One published port, in the CNI `portMappings` capability's field names.
///
/// A missing port decodes as 0, as a Go zero value does, and is refused by the checks
/// (`RuntimeConfig::validate`, [`crate::validate`]) rather than by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// Port on the host.
    #[serde(default)]
    pub host_port: u16,
    /// Port inside the container.
    #[serde(default)]
    pub container_port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Host address the port is published on; None means every host address of both
    /// families, `0.0.0.0` every IPv4 address, `::` every IPv6 address.
    #[serde(
        default,
        rename = "hostIP",
        skip_serializing_if = "Option::is_none",
        with = "empty_ip"
    )]
    pub host_ip: Option<IpAddr>,
}

/// `[hostip:]port->port/proto`, as `ferrynet ps` and the topology page show a published port.
impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}->{}/{}",
            self.host_port,
            self.container_port,
            self.protocol.as_str()
        )
    }
}

/// CNI runtimes send `"hostIP": ""` for "any"; accept it as None.
mod empty_ip {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::IpAddr;

    pub fn serialize<S: Serializer>(v: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(t) => t.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Whether two published host addresses of one port can receive the same packet: either is
/// "any" (None), they are equal, or one is the unspecified address of the other's family.
pub fn host_ips_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(x), Some(y)) => {
            x == y || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified()))
        }
    }
}

/// Whether a host address means "every address" (of both families, or of its own).
pub fn is_any_address(ip: Option<IpAddr>) -> bool {
    ip.is_none_or(|i| i.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn overlapping_host_addresses() {
        let any = None;
        for x in [any, ip("0.0.0.0"), ip("::"), ip("10.0.0.1"), ip("fd00::1")] {
            assert!(host_ips_overlap(any, x) && host_ips_overlap(x, any));
            assert!(host_ips_overlap(x, x));
        }
        assert!(host_ips_overlap(ip("0.0.0.0"), ip("10.0.0.1")));
        assert!(host_ips_overlap(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(host_ips_overlap(ip("::"), ip("fd00::1")));
        // Different families never meet.
        assert!(!host_ips_overlap(ip("0.0.0.0"), ip("::")));
        assert!(!host_ips_overlap(ip("0.0.0.0"), ip("fd00::1")));
        assert!(!host_ips_overlap(ip("::"), ip("10.0.0.1")));
        assert!(!host_ips_overlap(ip("10.0.0.1"), ip("10.0.0.2")));
        assert!(is_any_address(None) && is_any_address(ip("::")) && is_any_address(ip("0.0.0.0")));
        assert!(!is_any_address(ip("127.0.0.1")));
    }

    #[test]
    fn protocols_in_any_case() {
        let p = |s: &str| serde_json::from_value::<Protocol>(serde_json::json!(s));
        assert_eq!(p("TCP").unwrap(), Protocol::Tcp);
        assert_eq!(p("").unwrap(), Protocol::Tcp);
        assert_eq!(p("Udp").unwrap(), Protocol::Udp);
        assert_eq!(p("SCTP").unwrap(), Protocol::Sctp);
        assert!(p("icmp").unwrap_err().to_string().contains("icmp"));
        assert_eq!(serde_json::to_value(Protocol::Udp).unwrap(), "udp");
    }
}
