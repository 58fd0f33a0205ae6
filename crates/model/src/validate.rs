//! Records read back from the store are input: whoever can write the store (or a bug) must not
//! be able to smuggle nft statements, DNS names, file paths or interface names through them.
//! Every record is checked here once, where it is decoded; a record that fails is treated as
//! absent and reported with its key, so one bad record never breaks the view of the others.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::host::{BlockClaim, HostRecord};
use crate::ipam::validate_network_subnets;
use crate::names::{parse_mac, validate_network_name};
use crate::network::{keys, Endpoint, Network};
use crate::portmap::PortMapping;
use crate::service::{
    keys as skeys, validate_producer, validate_service, CheckKind, HealthCheck, HealthRecord,
    Producer, Service, VipRanges,
};

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;
/// Longest DNS name (RFC 1035, without the trailing dot).
pub const MAX_DNS_NAME: usize = 253;
/// Longest path accepted for a network namespace.
const MAX_PATH: usize = 4096;

/// Why a record read from the store (or given at the write edge) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?}: {why}")]
pub struct RecordError {
    /// The field that is wrong (`bridge`, `aliases`, `addrs`, …).
    pub field: &'static str,
    /// The offending value, cut to 64 characters (shown escaped, never raw).
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

impl RecordError {
    /// An error on `field` whose value is `value`.
    pub fn new(field: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        RecordError {
            field,
            value: value.to_string().chars().take(64).collect(),
            why: why.into(),
        }
    }
}

/// A record that can check itself, and check that it sits under the key it claims.
pub trait Validate {
    /// Every name, id, address and port of the record is well formed.
    fn validate(&self) -> Result<(), RecordError>;
    /// The record matches the store key it was read from (a network under `networks/blue`
    /// is named `blue`); records whose key says nothing about them accept any key.
    fn check_key(&self, _key: &str) -> Result<(), RecordError> {
        Ok(())
    }
    /// Both checks, as a reader of the store applies them.
    fn validate_at(&self, key: &str) -> Result<(), RecordError> {
        self.validate()?;
        self.check_key(key)
    }
}

fn key_is(field: &'static str, key: &str, expected: String) -> Result<(), RecordError> {
    if key == expected {
        Ok(())
    } else {
        Err(RecordError::new(
            field,
            key,
            format!("record stored under the wrong key (expected {expected:?})"),
        ))
    }
}

/// A bridge name: `fn-` then 1–12 of `[a-z0-9-]`, so it fits IFNAMSIZ and matches the
/// firewall's `fn-*` rules, with nothing nft or a shell would read specially.
pub fn check_bridge_name(name: &str) -> Result<(), RecordError> {
    let ok = name.len() <= MAX_IFNAME
        && name.strip_prefix("fn-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    ok.then_some(()).ok_or_else(|| {
        RecordError::new(
            "bridge",
            name,
            "must be \"fn-\" and 1-12 of [a-z0-9-] (at most 15 bytes)",
        )
    })
}

/// An interface name as the kernel takes it (1–15 bytes, not `.`/`..`, no `/`, `:` or
/// whitespace), and without `%` (the kernel's name template), quotes, `\` or control characters.
pub fn check_ifname(field: &'static str, name: &str) -> Result<(), RecordError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_IFNAME {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("may not be '.' or '..'")
    } else if name.chars().any(|c| {
        matches!(c, '/' | ':' | '%' | '"' | '\'' | '\\') || c.is_whitespace() || c.is_control()
    }) {
        Some("may not contain '/', ':', '%', quotes, '\\', whitespace or control characters")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(RecordError::new(field, name, why)),
    }
}

/// A host name: 1–253 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn check_host_name(field: &'static str, name: &str) -> Result<(), RecordError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= MAX_DNS_NAME
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ok.then_some(()).ok_or_else(|| {
        RecordError::new(
            field,
            name,
            "must be 1-253 of [A-Za-z0-9_.-], starting with a letter or digit",
        )
    })
}

/// A container id (CNI_CONTAINERID, a Docker endpoint id, a CLI container name): 1–256 of
/// `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn check_container_id(id: &str) -> Result<(), RecordError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.len() <= 256
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ok.then_some(()).ok_or_else(|| {
        RecordError::new(
            "containerId",
            id,
            "must be 1-256 of [A-Za-z0-9_.-], starting with a letter or digit",
        )
    })
}

/// True when `name` is a sequence of DNS labels: each 1–63 of `[A-Za-z0-9_-]`, at most 253
/// bytes in all.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_NAME
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// One DNS label: 1–63 of `[A-Za-z0-9_-]` (a pod's namespace, a pod UID).
pub fn check_dns_label(field: &'static str, label: &str) -> Result<(), RecordError> {
    (!label.contains('.') && is_dns_name(label))
        .then_some(())
        .ok_or_else(|| {
            RecordError::new(
                field,
                label,
                "must be one DNS label of [A-Za-z0-9_-] (1-63 bytes)",
            )
        })
}

/// A container's DNS name or alias.
pub fn check_dns_name(field: &'static str, name: &str) -> Result<(), RecordError> {
    is_dns_name(name).then_some(()).ok_or_else(|| {
        RecordError::new(
            field,
            name,
            "must be DNS labels of [A-Za-z0-9_-] (1-63 bytes each, 253 in all)",
        )
    })
}

/// A network namespace path: absolute, printable, no `..`, at most 4096 bytes; or empty
/// (a host-network container has none of its own).
pub fn check_netns_path(path: &str) -> Result<(), RecordError> {
    let ok = path.is_empty()
        || path.starts_with('/')
            && path.len() <= MAX_PATH
            && !path.chars().any(char::is_control)
            && !path.split('/').any(|c| c == "..");
    ok.then_some(()).ok_or_else(|| {
        RecordError::new(
            "netns",
            path,
            "must be an absolute path without '..' or control characters",
        )
    })
}

/// An address a container, producer, VIP or host can have: not unspecified, multicast,
/// IPv4 broadcast, nor an IPv4-mapped IPv6 address (an IPv4 address dressed as IPv6).
pub fn check_unicast(field: &'static str, a: IpAddr) -> Result<(), RecordError> {
    let why = match a {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("is an IPv4-mapped IPv6 address (wrong family)")
        }
        _ if a.is_unspecified() => Some("is unspecified"),
        _ if a.is_multicast() => Some("is multicast"),
        _ => None,
    };
    match why {
        None => Ok(()),
        Some(why) => Err(RecordError::new(field, a, why)),
    }
}

/// At most one address per family (the load balancer and DNS use one of each).
fn one_per_family(field: &'static str, addrs: &[IpAddr]) -> Result<(), RecordError> {
    for v6 in [false, true] {
        if addrs.iter().filter(|a| a.is_ipv6() == v6).count() > 1 {
            return Err(RecordError::new(
                field,
                format!("{addrs:?}"),
                "holds more than one address of a family",
            ));
        }
    }
    Ok(())
}

fn check_port(field: &'static str, port: u16) -> Result<(), RecordError> {
    (port != 0)
        .then_some(())
        .ok_or_else(|| RecordError::new(field, port, "port 0 is not a port"))
}

fn check_network_ref(field: &'static str, name: &str) -> Result<(), RecordError> {
    validate_network_name(name).map_err(|e| RecordError::new(field, name, e.to_string()))
}

impl Validate for Network {
    fn validate(&self) -> Result<(), RecordError> {
        check_network_ref("name", &self.name)?;
        check_bridge_name(&self.bridge)?;
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(RecordError::new("mtu", mtu, "outside 576..=65535"));
            }
        }
        if self.mode.gives_interfaces() {
            validate_network_subnets(&self.subnets)
                .map_err(|e| RecordError::new("subnets", self.subnets.len(), e.to_string()))?;
        }
        if let Some(f) = &self.fabric {
            if f.vni == 0 || f.vni >= 1 << 24 {
                return Err(RecordError::new("vni", f.vni, "outside 1..16777215"));
            }
            for s in &self.subnets {
                let len = f.block_len(s.cidr.addr().is_ipv6());
                if len < s.cidr.prefix_len() || len > s.cidr.max_prefix_len() - 2 {
                    return Err(RecordError::new(
                        "blockV4/blockV6",
                        len,
                        "does not fit the subnets",
                    ));
                }
            }
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        key_is("name", key, keys::network(&self.name))
    }
}

impl Validate for PortMapping {
    fn validate(&self) -> Result<(), RecordError> {
        check_port("hostPort", self.host_port)?;
        check_port("containerPort", self.container_port)?;
        match self.host_ip {
            Some(ip) if ip.is_multicast() => Err(RecordError::new("hostIP", ip, "is multicast")),
            _ => Ok(()),
        }
    }
}

impl Validate for Endpoint {
    fn validate(&self) -> Result<(), RecordError> {
        check_network_ref("network", &self.network)?;
        check_container_id(&self.container_id)?;
        check_ifname("ifname", &self.ifname)?;
        if let Some(p) = &self.netns {
            check_netns_path(p)?;
        }
        for ip in &self.ips {
            check_unicast("ips", ip.addr())?;
        }
        for (field, mac) in [("mac", &self.mac), ("hostMac", &self.host_mac)] {
            if let Some(m) = mac {
                parse_mac(m).map_err(|e| RecordError::new(field, m, e.to_string()))?;
            }
        }
        if let Some(v) = &self.host_veth {
            check_ifname("hostVeth", v)?;
        }
        for m in &self.port_mappings {
            m.validate()?;
        }
        if let Some(h) = &self.host {
            check_host_name("host", h)?;
        }
        if let Some(n) = &self.name {
            check_dns_name("name", n)?;
        }
        for a in &self.aliases {
            check_dns_name("aliases", a)?;
        }
        if let Some(p) = &self.pod {
            p.validate()?;
        }
        crate::pod::check_labels(&self.labels, self.pod.as_ref())?;
        if let Some(b) = &self.bandwidth {
            // The MTU is not known here; only what any interface needs.
            b.shaping(0)
                .map_err(|e| RecordError::new("bandwidth", format!("{b:?}"), e.to_string()))?;
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        key_is(
            "endpoint",
            key,
            keys::endpoint(&self.network, &self.container_id, &self.ifname),
        )
    }
}

impl Validate for HostRecord {
    fn validate(&self) -> Result<(), RecordError> {
        check_host_name("name", &self.name)?;
        for a in &self.underlay {
            check_unicast("underlay", a.addr())?;
        }
        if self.underlay_mtu > 65535 {
            return Err(RecordError::new(
                "underlayMtu",
                self.underlay_mtu,
                "above 65535",
            ));
        }
        for c in &self.capabilities {
            if c.is_empty()
                || c.len() > 32
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(RecordError::new(
                    "capabilities",
                    c,
                    "must be 1-32 of [a-z0-9-]",
                ));
            }
        }
        if self.version.len() > 64 || !self.version.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RecordError::new(
                "version",
                &self.version,
                "must be at most 64 printable ASCII characters",
            ));
        }
        if let Some(s) = &self.sleeve {
            crate::sleeve::decode_key(&s.public_key).map_err(|_| {
                RecordError::new("sleeve.publicKey", &s.public_key, "not 32 bytes of base64")
            })?;
            check_port("sleeve.port", s.port)?;
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        key_is("name", key, keys::host(&self.name))
    }
}

impl Validate for BlockClaim {
    fn validate(&self) -> Result<(), RecordError> {
        check_host_name("host", &self.host)
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        let (net, _) = keys::parse_block(key)
            .ok_or_else(|| RecordError::new("block", key, "not a block key"))?;
        check_network_ref("network", &net)
    }
}

impl Validate for HealthCheck {
    fn validate(&self) -> Result<(), RecordError> {
        match &self.kind {
            CheckKind::Tcp { port } => check_port("check.port", *port)?,
            CheckKind::Http { port, path, status } => {
                check_port("check.port", *port)?;
                if !path.starts_with('/')
                    || path.len() > 1024
                    || !path.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(RecordError::new(
                        "check.path",
                        path,
                        "must start with '/' and be at most 1024 printable ASCII characters",
                    ));
                }
                if !(100..=599).contains(status) {
                    return Err(RecordError::new(
                        "check.status",
                        status,
                        "outside 100..=599",
                    ));
                }
            }
            CheckKind::Exec { command } => {
                if command.is_empty()
                    || command.len() > 64
                    || command.iter().any(|a| a.len() > 4096 || a.contains('\0'))
                {
                    return Err(RecordError::new(
                        "check.command",
                        format!("{command:?}"),
                        "must be 1-64 arguments without NUL, each at most 4096 bytes",
                    ));
                }
            }
        }
        const DAY_MS: u64 = 86_400_000;
        if self.interval_ms > DAY_MS || self.timeout_ms > DAY_MS {
            return Err(RecordError::new(
                "check.intervalMs",
                self.interval_ms,
                "above one day",
            ));
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            return Err(RecordError::new(
                "check.rise/fall",
                format!("{}/{}", self.rise, self.fall),
                "outside 1..=100",
            ));
        }
        Ok(())
    }
}

/// A service port's name, used in SRV names (`_http._tcp.web`): 1-63 of `[A-Za-z0-9_-]`.
fn check_port_name(name: &str) -> Result<(), RecordError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(())
        .ok_or_else(|| RecordError::new("ports.name", name, "must be 1-63 of [A-Za-z0-9_-]"))
}

impl Validate for Service {
    fn validate(&self) -> Result<(), RecordError> {
        validate_service(self)
            .map_err(|e| RecordError::new("service", &self.name, e.to_string()))?;
        for p in &self.ports {
            check_port("ports.port", p.port)?;
            check_port_name(&p.name)?;
        }
        for i in &self.ingress {
            check_port("ingress.published", i.published)?;
        }
        for v in &self.vips {
            check_unicast("vips", *v)?;
        }
        one_per_family("vips", &self.vips)?;
        for n in &self.networks {
            check_network_ref("networks", n)?;
        }
        if let Some(c) = &self.check {
            c.validate()?;
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        key_is("name", key, skeys::service(&self.name))
    }
}

impl Validate for Producer {
    fn validate(&self) -> Result<(), RecordError> {
        validate_producer(self)
            .map_err(|e| RecordError::new("producer", &self.id, e.to_string()))?;
        if let Some(h) = &self.host {
            check_host_name("host", h)?;
        }
        if let Some(n) = &self.network {
            check_network_ref("network", n)?;
        }
        if let Some(c) = &self.container {
            check_container_id(c)?;
        }
        if let Some(p) = &self.netns {
            check_netns_path(p)?;
        }
        for a in &self.addrs {
            check_unicast("addrs", *a)?;
        }
        one_per_family("addrs", &self.addrs)?;
        for (s, t) in &self.ports {
            check_port("ports", *s)?;
            check_port("ports", *t)?;
        }
        if let Some(c) = &self.check {
            c.validate()?;
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> Result<(), RecordError> {
        key_is("id", key, skeys::producer(&self.service, &self.id))
    }
}

impl Validate for HealthRecord {
    fn validate(&self) -> Result<(), RecordError> {
        check_host_name("host", &self.host)?;
        if self.output.len() > 64 * 1024 {
            return Err(RecordError::new(
                "output",
                self.output.len(),
                "longer than 64 KiB",
            ));
        }
        Ok(())
    }
}

impl Validate for VipRanges {
    fn validate(&self) -> Result<(), RecordError> {
        let wrong = |field, r: &IpNet| RecordError::new(field, r, "wrong address family");
        match (self.v4, self.v6) {
            (Some(r), _) if r.addr().is_ipv6() => Err(wrong("v4", &r)),
            (_, Some(r)) if r.addr().is_ipv4() => Err(wrong("v6", &r)),
            _ => Ok(()),
        }
    }
}

/// A block claim must lie inside one of its network's subnets: a forged claim of `0.0.0.0/0`
/// (or of another tenant's range) would otherwise be routed to the claiming host.
pub fn check_block_on(block: &IpNet, net: &Network) -> Result<(), RecordError> {
    let inside = net.subnets.iter().any(|s| s.cidr.contains(block));
    if net.fabric.is_some() && inside {
        Ok(())
    } else {
        Err(RecordError::new(
            "block",
            block,
            format!(
                "is not a block of multi-host network {}'s subnets",
                net.name
            ),
        ))
    }
}

/// The addresses of a producer on a known network must lie in that network's subnets (so in
/// its address families): a producer cannot point a service at another tenant's range.
pub fn check_producer_on(p: &Producer, net: &Network) -> Result<(), RecordError> {
    for a in &p.addrs {
        if !net.subnets.iter().any(|s| s.cidr.contains(a)) {
            return Err(RecordError::new(
                "addrs",
                a,
                format!(
                    "is outside network {}'s subnets (or of the wrong family)",
                    net.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
