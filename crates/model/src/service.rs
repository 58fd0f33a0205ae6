//! Services: a name, ports, a stable virtual IP per address family, and the producers (IP and
//! port pairs) that serve it. Records and keys here; the agent turns them into DNS answers and
//! load-balancing rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::portmap::Protocol;

/// Default IPv4 range virtual IPs are taken from.
pub const DEFAULT_VIP_RANGE_V4: &str = "10.96.0.0/16";
/// Default IPv6 range virtual IPs are taken from.
pub const DEFAULT_VIP_RANGE_V6: &str = "fd00:96::/112";

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name for SRV records (`_http._tcp.web`); defaults to `p<port>`.
    pub name: String,
    /// Port on the virtual IP.
    pub port: u16,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service port published on every host (ingress, Docker's routing mesh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressPort {
    /// Port opened on every host's addresses.
    pub published: u16,
    /// The service port it leads to.
    pub target: u16,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Only producers on the receiving host, without SNAT (Kubernetes'
    /// `externalTrafficPolicy: Local`): producers see the outside client, and a host without
    /// a local producer refuses the port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// How a producer's health is checked (on the producer's host, by its agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum CheckKind {
    /// A TCP connect to the producer's address and this port succeeds.
    Tcp {
        /// Port to connect to.
        port: u16,
    },
    /// An HTTP GET of `path` on this port answers with `status`.
    Http {
        /// Port to connect to.
        port: u16,
        /// Request path.
        path: String,
        /// Expected status code.
        status: u16,
    },
    /// A command run in the producer's network namespace exits 0.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
}

/// A health check with its timing and thresholds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// What is checked.
    pub kind: CheckKind,
    /// Time between checks, in milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Time one check may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy producer healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy producer unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    1
}
fn default_fall() -> u32 {
    2
}

impl HealthCheck {
    /// A check of `kind` with the default timing (1 s interval, 500 ms timeout, rise 1, fall 2).
    pub fn new(kind: CheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
    /// Time between checks.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.max(10))
    }
    /// Time one check may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// A service as stored under `/ferrynet/v1/services/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Unique name, a DNS label (lowercase letters, digits, `-`).
    pub name: String,
    /// Its ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Its virtual IPs, at most one per address family, each claimed under `vips/<ip>`.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Networks whose containers see the service's name; empty: every network.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Ports published on every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressPort>,
    /// Keep a client address on the same producer (while that producer stays healthy).
    #[serde(default)]
    pub affinity: bool,
    /// Check applied to producers that bring none of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<HealthCheck>,
}

impl Service {
    /// A service with nothing but its name: no ports, no VIPs, every network, no check.
    pub fn named(name: &str) -> Service {
        Service {
            name: name.to_string(),
            ports: Vec::new(),
            vips: Vec::new(),
            networks: Vec::new(),
            ingress: Vec::new(),
            affinity: false,
            check: None,
        }
    }
    /// True when containers on `network` see this service.
    pub fn visible_on(&self, network: &str) -> bool {
        self.networks.is_empty() || self.networks.iter().any(|n| n == network)
    }
    /// The virtual IP of one family.
    pub fn vip(&self, v6: bool) -> Option<IpAddr> {
        self.vips.iter().copied().find(|a| a.is_ipv6() == v6)
    }
}

/// One producer of a service, stored under `/ferrynet/v1/producers/<service>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Producer {
    /// The service it serves.
    pub service: String,
    /// Unique within the service (a container's name, or what `service register --id` gave).
    pub id: String,
    /// The host whose agent checks it; its producers leave when the host does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The network it is on (None: an address outside ferrynet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The container it runs in, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The container's network namespace path, for `exec` checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Its addresses (one per family is used).
    pub addrs: Vec<IpAddr>,
    /// Service port -> the producer's port, where they differ.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
    /// Its own health check (else the service's; none: healthy while its host is alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<HealthCheck>,
}

impl Producer {
    /// The producer's port for a service port.
    pub fn target_port(&self, service_port: u16) -> u16 {
        self.ports
            .get(&service_port)
            .copied()
            .unwrap_or(service_port)
    }
    /// The producer's address of one family.
    pub fn addr(&self, v6: bool) -> Option<IpAddr> {
        self.addrs.iter().copied().find(|a| a.is_ipv6() == v6)
    }
    /// The check in force: the producer's own, else the service's.
    pub fn effective_check<'a>(&'a self, svc: Option<&'a Service>) -> Option<&'a HealthCheck> {
        self.check
            .as_ref()
            .or_else(|| svc.and_then(|s| s.check.as_ref()))
    }
}

/// A producer's health as its host's agent last saw it, stored under
/// `/ferrynet/v1/health/<service>/<id>` on that agent's lease (it vanishes with the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthRecord {
    /// Passing (after `rise` successes) or failing (after `fall` failures).
    pub healthy: bool,
    /// The host that checked.
    pub host: String,
    /// Unix time in milliseconds of the last change.
    pub since_ms: u64,
    /// What the last check said (an error, a status line).
    #[serde(default)]
    pub output: String,
}

/// Why a service or producer record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The name is not a DNS label.
    #[error("service name {0:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'")]
    BadName(String),
    /// A port name that cannot be an SRV label (`_NAME`).
    #[error("service {service}: port name {name:?} must be 1-62 lowercase letters, digits or '-' (it becomes the SRV label _{name})")]
    BadPortName {
        /// The service.
        service: String,
        /// The port name.
        name: String,
    },
    /// A producer id that cannot be a key segment.
    #[error("producer id {0:?} must be 1-63 letters, digits or '_.-' (it becomes a DNS label)")]
    BadId(String),
    /// Two ports with the same number and protocol, or the same name.
    #[error("service {service}: port {port} is given twice")]
    DuplicatePort {
        /// The service.
        service: String,
        /// The port.
        port: String,
    },
    /// A producer without an address.
    #[error("producer {0} has no address")]
    NoAddress(String),
    /// An ingress port that leads to no service port.
    #[error("service {service}: ingress port {published} leads to port {target}, which the service does not have")]
    UnknownTarget {
        /// The service.
        service: String,
        /// The published port.
        published: u16,
        /// The missing service port.
        target: u16,
    },
    /// The virtual IP range is used up.
    #[error("no free virtual IP in {0}")]
    VipRangeFull(IpNet),
}

/// True when `name` is a DNS label ferrynet accepts for services (RFC 1123, lowercase).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// True when `name` can name a service port: a DNS label short enough to take SRV's `_`.
pub fn is_port_name(name: &str) -> bool {
    is_dns_label(name) && name.len() < 63
}

/// Check a service record's own consistency (names, duplicate ports, ingress targets).
pub fn validate_service(s: &Service) -> Result<(), ServiceError> {
    if !is_dns_label(&s.name) {
        return Err(ServiceError::BadName(s.name.clone()));
    }
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in &s.ports {
        if !is_port_name(&p.name) {
            return Err(ServiceError::BadPortName {
                service: s.name.clone(),
                name: p.name.clone(),
            });
        }
        if !seen.insert((p.port, p.protocol)) || !names.insert(p.name.as_str()) {
            return Err(ServiceError::DuplicatePort {
                service: s.name.clone(),
                port: format!("{}/{}", p.port, p.protocol.as_str()),
            });
        }
    }
    for i in &s.ingress {
        if !s
            .ports
            .iter()
            .any(|p| p.port == i.target && p.protocol == i.protocol)
        {
            return Err(ServiceError::UnknownTarget {
                service: s.name.clone(),
                published: i.published,
                target: i.target,
            });
        }
    }
    Ok(())
}

/// Check a producer record (id usable as a key segment, at least one address).
pub fn validate_producer(p: &Producer) -> Result<(), ServiceError> {
    if !is_dns_label(&p.service) {
        return Err(ServiceError::BadName(p.service.clone()));
    }
    let id_ok = !p.id.is_empty()
        && p.id.len() <= 63
        && p.id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !id_ok {
        return Err(ServiceError::BadId(p.id.clone()));
    }
    if p.addrs.is_empty() {
        return Err(ServiceError::NoAddress(p.id.clone()));
    }
    Ok(())
}

/// A free virtual IP in `range`: the first free address from a start derived from the service
/// name (so a re-created service tends to get its old VIP back), skipping the range's network
/// and broadcast addresses and everything in `taken`.
pub fn pick_vip(
    range: IpNet,
    taken: &BTreeSet<IpAddr>,
    service: &str,
) -> Result<IpAddr, ServiceError> {
    let range = range.trunc();
    let bits = range.max_prefix_len() - range.prefix_len();
    // Usable addresses: all but the first and (IPv4) the last.
    let size: u128 = if bits >= 127 {
        u128::MAX
    } else {
        1u128 << bits
    };
    let usable = if range.addr().is_ipv4() {
        size.saturating_sub(2)
    } else {
        size.saturating_sub(1)
    };
    if usable == 0 {
        return Err(ServiceError::VipRangeFull(range));
    }
    let base: u128 = match range.network() {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    };
    let start = fnv1a(service.as_bytes()) as u128 % usable;
    let tries = usable.min(1 << 20);
    for i in 0..tries {
        let off = 1 + (start + i) % usable;
        let ip = match range.network() {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from((base + off) as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(base + off)),
        };
        if !taken.contains(&ip) {
            return Ok(ip);
        }
    }
    Err(ServiceError::VipRangeFull(range))
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The port name a bare port gets: `p80`.
pub fn default_port_name(port: u16) -> String {
    format!("p{port}")
}

/// Store keys of the registry.
pub mod keys {
    use crate::network::keys::ROOT;

    /// Key of a service record.
    pub fn service(name: &str) -> String {
        format!("{ROOT}services/{name}")
    }
    /// Prefix of every service record.
    pub fn services() -> String {
        format!("{ROOT}services/")
    }
    /// Key claiming a virtual IP (value: the service name).
    pub fn vip(ip: std::net::IpAddr) -> String {
        format!("{ROOT}vips/{ip}")
    }
    /// Prefix of every virtual IP claim.
    pub fn vips() -> String {
        format!("{ROOT}vips/")
    }
    /// Key of a producer record.
    pub fn producer(service: &str, id: &str) -> String {
        format!("{ROOT}producers/{service}/{id}")
    }
    /// Prefix of one service's producers.
    pub fn producers_of(service: &str) -> String {
        format!("{ROOT}producers/{service}/")
    }
    /// Prefix of every producer.
    pub fn producers() -> String {
        format!("{ROOT}producers/")
    }
    /// Key of a producer's health record (on the checking agent's lease).
    pub fn health(service: &str, id: &str) -> String {
        format!("{ROOT}health/{service}/{id}")
    }
    /// Prefix of every health record.
    pub fn all_health() -> String {
        format!("{ROOT}health/")
    }
    /// Key of the cluster's virtual IP ranges (JSON [`super::VipRanges`]).
    pub fn vip_ranges() -> String {
        format!("{ROOT}settings/vip-ranges")
    }
    /// Key of a free-form value for `ferrynet render` templates.
    pub fn kv(name: &str) -> String {
        format!("{ROOT}kv/{name}")
    }
    /// Prefix of the free-form values.
    pub fn kvs() -> String {
        format!("{ROOT}kv/")
    }
    /// `(service, id)` of a producer or health key.
    pub fn parse_pair(key: &str, kind: &str) -> Option<(String, String)> {
        let rest = key
            .strip_prefix(ROOT)?
            .strip_prefix(kind)?
            .strip_prefix('/')?;
        let (s, id) = rest.split_once('/')?;
        Some((s.to_string(), id.to_string()))
    }
}

/// The ranges virtual IPs come from (stored once per cluster; defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VipRanges {
    /// IPv4 range.
    pub v4: Option<IpNet>,
    /// IPv6 range.
    pub v6: Option<IpNet>,
}

impl Default for VipRanges {
    fn default() -> Self {
        VipRanges {
            v4: DEFAULT_VIP_RANGE_V4.parse().ok(),
            v6: DEFAULT_VIP_RANGE_V6.parse().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Service {
        Service {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            ..Service::named(name)
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(is_dns_label("web"));
        assert!(is_dns_label("web-2"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label("-web"));
        assert!(!is_dns_label("web_x"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(validate_service(&svc("web")).is_ok());
        assert!(validate_service(&svc("we.b")).is_err());
    }

    #[test]
    fn port_names_leave_room_for_the_srv_underscore() {
        assert!(is_port_name(&"a".repeat(62)));
        assert!(!is_port_name(&"a".repeat(63)));
        let mut s = svc("web");
        s.ports[0].name = "a".repeat(63);
        assert!(matches!(
            validate_service(&s),
            Err(ServiceError::BadPortName { .. })
        ));
    }

    #[test]
    fn duplicate_ports_and_bad_ingress_are_refused() {
        let mut s = svc("web");
        s.ports.push(ServicePort {
            name: "other".into(),
            port: 80,
            protocol: Protocol::Tcp,
        });
        assert!(matches!(
            validate_service(&s),
            Err(ServiceError::DuplicatePort { .. })
        ));
        let mut s = svc("web");
        s.ingress.push(IngressPort {
            published: 8080,
            target: 81,
            protocol: Protocol::Tcp,
            local: false,
        });
        assert!(matches!(
            validate_service(&s),
            Err(ServiceError::UnknownTarget { .. })
        ));
    }

    #[test]
    fn vip_is_stable_per_name_and_skips_taken() {
        let r: IpNet = "10.96.0.0/16".parse().unwrap();
        let a = pick_vip(r, &BTreeSet::new(), "web").unwrap();
        assert_eq!(a, pick_vip(r, &BTreeSet::new(), "web").unwrap());
        assert!(r.contains(&a) && a != r.network() && a != r.broadcast());
        let taken: BTreeSet<IpAddr> = [a].into();
        let b = pick_vip(r, &taken, "web").unwrap();
        assert_ne!(a, b);
        let tiny: IpNet = "10.96.0.0/30".parse().unwrap();
        let all: BTreeSet<IpAddr> = ["10.96.0.1", "10.96.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(matches!(
            pick_vip(tiny, &all, "x"),
            Err(ServiceError::VipRangeFull(_))
        ));
        let v6: IpNet = "fd00:96::/112".parse().unwrap();
        assert!(v6.contains(&pick_vip(v6, &BTreeSet::new(), "web").unwrap()));
    }

    #[test]
    fn producer_ports_and_checks() {
        let mut p = Producer {
            service: "web".into(),
            id: "w1".into(),
            host: None,
            network: None,
            container: None,
            netns: None,
            addrs: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            ports: [(80, 8080)].into(),
            check: None,
        };
        assert_eq!(p.target_port(80), 8080);
        assert_eq!(p.target_port(443), 443);
        assert_eq!(p.addr(true), Some("fd00::2".parse().unwrap()));
        let mut s = svc("web");
        s.check = Some(HealthCheck::new(CheckKind::Tcp { port: 80 }));
        assert!(p.effective_check(Some(&s)).is_some());
        assert!(p.effective_check(None).is_none());
        p.id = "a/b".into();
        assert!(matches!(validate_producer(&p), Err(ServiceError::BadId(_))));
    }

    #[test]
    fn keys_round_trip() {
        let k = keys::producer("web", "w1");
        assert_eq!(
            keys::parse_pair(&k, "producers"),
            Some(("web".into(), "w1".into()))
        );
        assert_eq!(keys::parse_pair(&k, "health"), None);
    }
}
