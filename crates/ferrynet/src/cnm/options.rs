//! Pure translations between Docker's vocabulary and ferrynet's: network options, pools,
//! published ports, names and MAC addresses. No I/O; unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrynet_model::fabric::Backend;
use ferrynet_model::network::{
    FabricSpec, NetworkMode, Subnet, DEFAULT_BLOCK_V4, DEFAULT_BLOCK_V6,
};
use ferrynet_model::portmap::{PortMapping, Protocol};
use ipnet::IpNet;
use serde_json::Value;

use super::error::CnmError;
use super::protocol::{PortBinding, ENABLE_IPV6, GENERIC, INTERNAL, PORTMAP};
use crate::control::ipam::HeldPort;

/// `-o ferrynet.network=NAME`: the ferrynet network a Docker network is (or becomes).
pub const OPT_NETWORK: &str = "ferrynet.network";
/// `-o ferrynet.bridge=fn-NAME`: the Linux bridge's name.
pub const OPT_BRIDGE: &str = "ferrynet.bridge";
/// `-o ferrynet.internal=true`: no way in or out (same as `docker network create --internal`).
pub const OPT_INTERNAL: &str = "ferrynet.internal";
/// `-o ferrynet.masquerade=false`: keep container source addresses on the way out.
pub const OPT_MASQUERADE: &str = "ferrynet.masquerade";
/// `-o ferrynet.mode=routed`: routed endpoints, no bridge (`bridge` is the default).
pub const OPT_MODE: &str = "ferrynet.mode";
/// `-o ferrynet.mtu=N`: same as Docker's `com.docker.network.driver.mtu`.
pub const OPT_MTU: &str = "ferrynet.mtu";
/// `-o ferrynet.backend=route|vxlan|auto|bgp`: a multi-host network over that fabric (the default
/// of a global-scope driver is `auto`).
pub const OPT_BACKEND: &str = "ferrynet.backend";
/// `-o ferrynet.block-size=N`: prefix length of each host's IPv4 block (multi-host).
pub const OPT_BLOCK: &str = "ferrynet.block-size";
/// `-o ferrynet.block-size6=N`: prefix length of each host's IPv6 block (multi-host).
pub const OPT_BLOCK6: &str = "ferrynet.block-size6";
/// `-o ferrynet.vni=N`: the VXLAN network identifier (multi-host; default: the lowest free).
pub const OPT_VNI: &str = "ferrynet.vni";
/// `-o ferrynet.encrypt=true`: cross-host traffic through the sleeve, encrypted and
/// authenticated (as `network create --encrypt`; multi-host networks only).
pub const OPT_ENCRYPT: &str = "ferrynet.encrypt";
/// Docker's conventional MTU option.
pub const DOCKER_MTU: &str = "com.docker.network.driver.mtu";
/// Docker's bridge-driver masquerade option, honoured for familiarity.
pub const DOCKER_MASQ: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Every `ferrynet.*` option; anything else under that prefix is a typo and refused.
pub const KNOWN_OPTIONS: [&str; 11] = [
    OPT_NETWORK,
    OPT_MODE,
    OPT_BRIDGE,
    OPT_INTERNAL,
    OPT_MASQUERADE,
    OPT_MTU,
    OPT_BACKEND,
    OPT_BLOCK,
    OPT_BLOCK6,
    OPT_VNI,
    OPT_ENCRYPT,
];

/// First host port handed out for `-p PORT` (no host port given), as Docker's own default.
pub const EPHEMERAL_START: u16 = 49153;
/// Last such port.
pub const EPHEMERAL_END: u16 = 65535;

/// What a `docker network create` asks of ferrynet besides its pools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkOptions {
    /// The ferrynet network name (`ferrynet.network`), None: derived from Docker's id.
    pub name: Option<String>,
    /// Bridge name.
    pub bridge: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// `--internal` or `ferrynet.internal=true`.
    pub internal: bool,
    /// Masquerade setting when given.
    pub masquerade: Option<bool>,
    /// `--ipv6`.
    pub ipv6: bool,
    /// `ferrynet.backend`: make a multi-host network with this fabric.
    pub backend: Option<Backend>,
    /// `ferrynet.block-size`.
    pub block_v4: Option<u8>,
    /// `ferrynet.block-size6`.
    pub block_v6: Option<u8>,
    /// `ferrynet.vni`.
    pub vni: Option<u32>,
    /// `ferrynet.mode`: bridge (default) or routed.
    pub mode: NetworkMode,
    /// `ferrynet.encrypt`: cross-host traffic through the sleeve.
    pub encrypt: bool,
}

impl NetworkOptions {
    /// The multi-host spec these options ask for: with `ferrynet.backend`, or `default` (a
    /// global-scope driver's `auto`) when the network must span hosts anyway. Block sizes and
    /// a VNI without a backend are refused rather than ignored.
    pub fn fabric(&self, default: Option<Backend>) -> Result<Option<FabricSpec>, CnmError> {
        let Some(backend) = self.backend.or(default) else {
            if self.block_v4.is_some()
                || self.block_v6.is_some()
                || self.vni.is_some()
                || self.encrypt
            {
                return Err(CnmError::Invalid(format!(
                    "{OPT_BLOCK}, {OPT_BLOCK6}, {OPT_VNI} and {OPT_ENCRYPT} are for multi-host networks: add -o {OPT_BACKEND}=route|vxlan|auto"
                )));
            }
            return Ok(None);
        };
        let block_v4 = self.block_v4.unwrap_or(DEFAULT_BLOCK_V4);
        let block_v6 = self.block_v6.unwrap_or(DEFAULT_BLOCK_V6);
        if !(8..=30).contains(&block_v4) {
            return Err(CnmError::Invalid(format!(
                "{OPT_BLOCK}={block_v4}: expected 8 to 30"
            )));
        }
        if !(48..=126).contains(&block_v6) {
            return Err(CnmError::Invalid(format!(
                "{OPT_BLOCK6}={block_v6}: expected 48 to 126"
            )));
        }
        if let Some(v) = self.vni.filter(|v| !(1..16_777_216).contains(v)) {
            return Err(CnmError::Invalid(format!(
                "{OPT_VNI}={v}: expected 1 to 16777215"
            )));
        }
        Ok(Some(FabricSpec {
            backend,
            vni: self.vni.unwrap_or(0),
            block_v4,
            block_v6,
            encrypt: self.encrypt,
        }))
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, CnmError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(CnmError::Invalid(format!(
            "option {key}={v:?}: expected true or false"
        ))),
    }
}

fn flag(options: &BTreeMap<String, Value>, key: &str) -> Result<bool, CnmError> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => parse_bool(key, s),
        Some(other) => Err(CnmError::Invalid(format!(
            "option {key} is {other}, expected a boolean"
        ))),
    }
}

/// Read `CreateNetwork` options: Docker's flags plus the `-o` map in `com.docker.network.generic`.
pub fn network_options(options: &BTreeMap<String, Value>) -> Result<NetworkOptions, CnmError> {
    let mut out = NetworkOptions {
        internal: flag(options, INTERNAL)?,
        ipv6: flag(options, ENABLE_IPV6)?,
        ..Default::default()
    };
    let generic: BTreeMap<String, String> = match options.get(GENERIC) {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                Value::Bool(b) => Ok((k.clone(), b.to_string())),
                Value::Number(n) => Ok((k.clone(), n.to_string())),
                other => Err(CnmError::Invalid(format!(
                    "option {k} is {other}, expected a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(CnmError::Invalid(format!(
                "{GENERIC} is {other}, expected a map of options"
            )))
        }
    };
    let mut mtu_src: Option<(&str, u32)> = None;
    for (k, v) in &generic {
        match k.as_str() {
            OPT_NETWORK => out.name = Some(v.trim().to_string()),
            OPT_BRIDGE => out.bridge = Some(v.trim().to_string()),
            OPT_MODE => {
                out.mode = match v.trim() {
                    "bridge" => NetworkMode::Bridge,
                    "routed" => NetworkMode::Routed,
                    other => {
                        return Err(CnmError::Invalid(format!(
                            "option {k}={other:?}: expected bridge or routed"
                        )))
                    }
                }
            }
            OPT_INTERNAL => out.internal |= parse_bool(k, v)?,
            OPT_MASQUERADE | DOCKER_MASQ => out.masquerade = Some(parse_bool(k, v)?),
            OPT_MTU | DOCKER_MTU => {
                let m: u32 = v.trim().parse().map_err(|_| {
                    CnmError::Invalid(format!("option {k}={v:?}: expected a number"))
                })?;
                if let Some((other, prev)) = mtu_src {
                    if prev != m {
                        return Err(CnmError::Invalid(format!(
                            "options {other}={prev} and {k}={m} disagree"
                        )));
                    }
                }
                mtu_src = Some((k.as_str(), m));
                out.mtu = Some(m);
            }
            OPT_BACKEND => {
                out.backend = Some(
                    v.parse()
                        .map_err(|e| CnmError::Invalid(format!("option {k}: {e}")))?,
                )
            }
            OPT_BLOCK | OPT_BLOCK6 => {
                let n: u8 = v.trim().parse().map_err(|_| {
                    CnmError::Invalid(format!("option {k}={v:?}: expected a prefix length"))
                })?;
                if k == OPT_BLOCK {
                    out.block_v4 = Some(n);
                } else {
                    out.block_v6 = Some(n);
                }
            }
            OPT_ENCRYPT => out.encrypt = parse_bool(k, v)?,
            OPT_VNI => {
                out.vni = Some(v.trim().parse().map_err(|_| {
                    CnmError::Invalid(format!("option {k}={v:?}: expected a number"))
                })?)
            }
            other if other.starts_with("ferrynet.") => {
                return Err(CnmError::Invalid(format!(
                "unknown option {other}; ferrynet understands {}, {DOCKER_MTU} and {DOCKER_MASQ}",
                KNOWN_OPTIONS.join(", ")
            )))
            }
            other => tracing::debug!(option = other, "ignoring an option ferrynet does not use"),
        }
    }
    Ok(out)
}

/// The ferrynet name of a Docker network created without `-o ferrynet.network`:
/// `docker-` and the 12-character id `docker network ls` shows.
pub fn derived_name(docker_network_id: &str) -> Result<String, CnmError> {
    let id = docker_network_id.trim();
    if id.len() < 12 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CnmError::Invalid(format!(
            "NetworkID {docker_network_id:?} is not a Docker network id (hex, at least 12 characters)"
        )));
    }
    Ok(format!("docker-{}", id[..12].to_ascii_lowercase()))
}

/// Parse `ip/len` (Docker's gateway and address form) or a bare address.
pub fn parse_addr(what: &str, s: &str) -> Result<IpAddr, CnmError> {
    let t = s.trim();
    let ip = t.split('/').next().unwrap_or(t);
    ip.parse()
        .map_err(|_| CnmError::Invalid(format!("{what} {s:?} is not an IP address")))
}

/// Parse a CIDR; the host part must be zero.
pub fn parse_pool(what: &str, s: &str) -> Result<IpNet, CnmError> {
    let n: IpNet = s
        .trim()
        .parse()
        .map_err(|_| CnmError::Invalid(format!("{what} {s:?} is not a CIDR prefix")))?;
    if n.trunc() != n {
        return Err(CnmError::Invalid(format!(
            "{what} {s} has host bits set; did you mean {}?",
            n.trunc()
        )));
    }
    Ok(n)
}

/// An `--ip-range` lies inside its pool, of the same family.
pub fn check_sub_pool(sp: IpNet, pool: IpNet) -> Result<(), CnmError> {
    if sp.addr().is_ipv4() != pool.addr().is_ipv4()
        || !pool.contains(&sp.network())
        || !pool.contains(&sp.broadcast())
    {
        return Err(CnmError::Invalid(format!(
            "ip range {sp} is not inside the pool {pool}"
        )));
    }
    Ok(())
}

/// A ferrynet subnet for a Docker pool: its gateway, `--ip-range` as the allocation range and
/// `--aux-address`es excluded.
pub fn subnet_for_pool(
    pool: IpNet,
    gateway: Option<IpAddr>,
    sub_pool: Option<IpNet>,
    aux: &[IpAddr],
) -> Result<Subnet, CnmError> {
    let mut s = Subnet::new(pool);
    s.gateway = gateway;
    if let Some(sp) = sub_pool {
        check_sub_pool(sp, pool)?;
        if sp.network() != pool.network() {
            s.range_start = Some(sp.network());
        }
        if !(pool.addr().is_ipv4() && sp.broadcast() == pool.broadcast()) {
            s.range_end = Some(sp.broadcast());
        }
    }
    for ip in aux {
        if !pool.contains(ip) {
            return Err(CnmError::Invalid(format!(
                "auxiliary address {ip} is not inside the pool {pool}"
            )));
        }
        let host = IpNet::new(*ip, if ip.is_ipv4() { 32 } else { 128 })
            .map_err(|e| CnmError::Invalid(e.to_string()))?;
        if !s.exclude.contains(&host) {
            s.exclude.push(host);
        }
    }
    Ok(s)
}

/// A MAC for a Docker endpoint when Docker did not set one: locally administered, unicast,
/// `02:66` followed by the IPv4 address (unique on the network), else by bytes of the id.
pub fn endpoint_mac(ipv4: Option<IpAddr>, endpoint_id: &str) -> [u8; 6] {
    let tail: [u8; 4] = match ipv4 {
        Some(IpAddr::V4(a)) => a.octets(),
        _ => {
            let mut t = [0u8; 4];
            let hex: Vec<u8> = endpoint_id
                .as_bytes()
                .chunks(2)
                .filter_map(|c| std::str::from_utf8(c).ok())
                .filter_map(|c| u8::from_str_radix(c, 16).ok())
                .collect();
            for (i, b) in hex.iter().take(4).enumerate() {
                t[i] = *b;
            }
            t
        }
    };
    [0x02, 0x66, tail[0], tail[1], tail[2], tail[3]]
}

/// The port bindings in a `ProgramExternalConnectivity` request's options.
pub fn port_bindings(options: &BTreeMap<String, Value>) -> Result<Vec<PortBinding>, CnmError> {
    match options.get(PORTMAP) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CnmError::Invalid(format!("{PORTMAP} is not a list of port bindings: {e}"))
        }),
    }
}

/// A Docker protocol number as ferrynet's protocol.
pub fn protocol(proto: u8) -> Result<Protocol, CnmError> {
    match proto {
        6 => Ok(Protocol::Tcp),
        17 => Ok(Protocol::Udp),
        132 => Ok(Protocol::Sctp),
        p => Err(CnmError::Invalid(format!(
            "protocol number {p} cannot be published (tcp 6, udp 17, sctp 132)"
        ))),
    }
}

/// Docker's number of a ferrynet protocol.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn clashes(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    // CNI endpoints may hold `0.0.0.0` or `::` (every address of one family).
    ferrynet_model::portmap::host_ips_overlap(a, b)
}

/// Turn Docker's bindings into concrete mappings: a host port of 0 becomes a free port of the
/// ephemeral range, a range `HostPort..HostPortEnd` its first free port. "Free" means held by
/// no published port of ferrynet's (`held`) and not chosen for an earlier binding. A binding on
/// the unspecified address (`0.0.0.0`, `::`) or none is published on every host address.
///
/// A conflict names the holder through `names` (endpoint key → container name, see
/// [`port_owner`]).
pub fn resolve_bindings(
    bindings: &[PortBinding],
    held: &[HeldPort],
    names: &BTreeMap<String, String>,
) -> Result<Vec<PortMapping>, CnmError> {
    let mut out: Vec<PortMapping> = Vec::new();
    for b in bindings {
        let proto = protocol(b.proto)?;
        if b.port == 0 {
            return Err(CnmError::Invalid(format!(
                "port binding {b:?} has no container port"
            )));
        }
        let host_ip = match b.host_ip.trim() {
            "" => None,
            s => {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| CnmError::Invalid(format!("host IP {s:?} is not an address")))?;
                (!ip.is_unspecified()).then_some(ip)
            }
        };
        let (lo, hi) = match (b.host_port, b.host_port_end) {
            (0, _) => (EPHEMERAL_START, EPHEMERAL_END),
            (p, e) if e <= p => (p, p),
            (p, e) => (p, e),
        };
        let taken = |port: u16| {
            held.iter()
                .any(|h| h.proto == proto.as_str() && h.port == port && clashes(h.host_ip, host_ip))
                || out.iter().any(|m| {
                    m.protocol == proto && m.host_port == port && clashes(m.host_ip, host_ip)
                })
        };
        let Some(port) = (lo..=hi).find(|p| !taken(*p)) else {
            let what = if lo == hi {
                format!("host port {lo}/{}", proto.as_str())
            } else {
                format!("every host port of {lo}-{hi}/{}", proto.as_str())
            };
            let owner = held
                .iter()
                .find(|h| h.proto == proto.as_str() && h.port == lo && clashes(h.host_ip, host_ip))
                .map(|h| format!(" by {}", port_owner(&h.owner, names)))
                .unwrap_or_default();
            return Err(CnmError::Invalid(format!(
                "{what}{} is already published{owner}",
                host_ip.map(|i| format!(" on {i}")).unwrap_or_default()
            )));
        };
        out.push(PortMapping {
            host_port: port,
            container_port: b.port,
            protocol: proto,
            host_ip,
        });
    }
    Ok(out)
}

/// Who holds a published port, for messages: `container NAME on ferrynet network NET` when
/// `names` knows the owning endpoint (key → container name), else the endpoint key's tail
/// (`NET/CONTAINER-ID/IFNAME`).
pub fn port_owner(owner: &str, names: &BTreeMap<String, String>) -> String {
    let short = owner.rsplit_once("endpoints/").map_or(owner, |(_, o)| o);
    match names.get(owner) {
        Some(name) => {
            let net = short.split('/').next().unwrap_or(short);
            format!("container {name} on ferrynet network {net}")
        }
        None => short.to_string(),
    }
}

/// Docker's description of published mappings (for `EndpointOperInfo`).
pub fn bindings_of(mappings: &[PortMapping], container_ip: Option<IpAddr>) -> Vec<PortBinding> {
    mappings
        .iter()
        .map(|m| PortBinding {
            proto: protocol_number(m.protocol),
            ip: container_ip.map(|i| i.to_string()).unwrap_or_default(),
            port: m.container_port,
            host_ip: m.host_ip.map(|i| i.to_string()).unwrap_or_default(),
            host_port: m.host_port,
            host_port_end: m.host_port,
        })
        .collect()
}

/// Families present in a list of subnets: (has IPv4, has IPv6).
pub fn families(subnets: &[Subnet]) -> (bool, bool) {
    let v: BTreeSet<bool> = subnets.iter().map(|s| s.cidr.addr().is_ipv4()).collect();
    (v.contains(&true), v.contains(&false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn network_options_from_docker() {
        let o = network_options(&opts(json!({
            "com.docker.network.enable_ipv6": true,
            "com.docker.network.generic": {
                "com.docker.network.driver.mtu": "1400",
                "ferrynet.network": "blue",
                "ferrynet.bridge": "fn-blue0",
                "ferrynet.masquerade": "false",
                "com.example.unrelated": "x"
            }
        })))
        .unwrap();
        assert_eq!(
            o,
            NetworkOptions {
                name: Some("blue".into()),
                bridge: Some("fn-blue0".into()),
                mtu: Some(1400),
                internal: false,
                masquerade: Some(false),
                ipv6: true,
                ..Default::default()
            }
        );
        let o = network_options(&opts(json!({"com.docker.network.internal": true}))).unwrap();
        assert!(o.internal && o.name.is_none());
        let o = network_options(&opts(
            json!({"com.docker.network.generic": {"ferrynet.internal": "1"}}),
        ))
        .unwrap();
        assert!(o.internal);
        assert!(network_options(&BTreeMap::new()).unwrap() == NetworkOptions::default());
    }

    #[test]
    fn the_mode_option_makes_a_routed_network() {
        let o = network_options(&opts(
            json!({"com.docker.network.generic": {"ferrynet.mode": "routed"}}),
        ))
        .unwrap();
        assert_eq!(o.mode, NetworkMode::Routed);
        let e = network_options(&opts(
            json!({"com.docker.network.generic": {"ferrynet.mode": "host"}}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("expected bridge or routed"), "{e}");
    }

    #[test]
    fn network_options_errors_are_clear() {
        let e = network_options(&opts(
            json!({"com.docker.network.generic": {"ferrynet.netwrk": "x"}}),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown option ferrynet.netwrk") && e.contains("ferrynet.network"),
            "{e}"
        );
        let e = network_options(&opts(
            json!({"com.docker.network.generic": {"ferrynet.mtu": "big"}}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected a number"), "{e}");
        let e = network_options(&opts(json!({"com.docker.network.generic": {
            "ferrynet.mtu": "1400", "com.docker.network.driver.mtu": "1500"}})))
        .unwrap_err()
        .to_string();
        assert!(e.contains("disagree"), "{e}");
        assert!(network_options(&opts(json!({"com.docker.network.generic": "mtu=1"}))).is_err());
        assert!(network_options(&opts(json!({"com.docker.network.internal": "maybe"}))).is_err());
    }

    #[test]
    fn fabric_options_make_a_multi_host_network() {
        let g = |m: Value| network_options(&opts(json!({ "com.docker.network.generic": m })));
        let o = g(
            json!({"ferrynet.backend": "vxlan", "ferrynet.block-size": "24", "ferrynet.vni": "77"}),
        )
        .unwrap();
        let f = o.fabric(None).unwrap().unwrap();
        assert_eq!(
            (f.backend, f.block_v4, f.block_v6, f.vni),
            (Backend::Vxlan, 24, DEFAULT_BLOCK_V6, 77)
        );
        // A global-scope driver's default applies only without an explicit backend.
        let plain = g(json!({})).unwrap();
        assert_eq!(plain.fabric(None).unwrap(), None);
        assert_eq!(
            plain.fabric(Some(Backend::Auto)).unwrap().unwrap().backend,
            Backend::Auto
        );
        assert_eq!(
            o.fabric(Some(Backend::Auto)).unwrap().unwrap().backend,
            Backend::Vxlan
        );
        // Fabric details without a fabric, and bad values, are refused with the reason.
        let e = g(json!({"ferrynet.block-size": "24"}))
            .unwrap()
            .fabric(None)
            .unwrap_err();
        assert!(e.to_string().contains("ferrynet.backend"), "{e}");
        let e = g(json!({"ferrynet.backend": "route", "ferrynet.block-size": "31"}))
            .unwrap()
            .fabric(None)
            .unwrap_err();
        assert!(e.to_string().contains("8 to 30"), "{e}");
        assert!(g(json!({"ferrynet.backend": "gre"}))
            .unwrap_err()
            .to_string()
            .contains("route, vxlan, auto, sleeve or bgp"));
        assert!(g(json!({"ferrynet.vni": "x"})).is_err());
        let e = g(json!({"ferrynet.backend": "vxlan", "ferrynet.vni": "16777216"}))
            .unwrap()
            .fabric(None)
            .unwrap_err();
        assert!(e.to_string().contains("16777215"), "{e}");
    }

    #[test]
    fn encrypt_option_sends_a_fabric_through_the_sleeve() {
        let g = |m: Value| network_options(&opts(json!({ "com.docker.network.generic": m })));
        let f = g(json!({"ferrynet.backend": "vxlan", "ferrynet.encrypt": "true"}))
            .unwrap()
            .fabric(None)
            .unwrap()
            .unwrap();
        assert!(f.encrypt && f.backend == Backend::Vxlan, "{f:?}");
        // A global-scope driver's default fabric (auto) may be encrypted without a backend.
        let o = g(json!({"ferrynet.encrypt": "1"})).unwrap();
        let f = o.fabric(Some(Backend::Auto)).unwrap().unwrap();
        assert!(f.encrypt && f.backend == Backend::Auto, "{f:?}");
        // Without any fabric there is no cross-host traffic to encrypt: refused, not ignored.
        let e = o.fabric(None).unwrap_err().to_string();
        assert!(
            e.contains("ferrynet.encrypt") && e.contains("ferrynet.backend"),
            "{e}"
        );
        let plain = g(json!({"ferrynet.backend": "route", "ferrynet.encrypt": "false"}));
        assert!(!plain.unwrap().fabric(None).unwrap().unwrap().encrypt);
        let e = g(json!({"ferrynet.encrypt": "maybe"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected true or false"), "{e}");
    }

    #[test]
    fn derived_names() {
        assert_eq!(
            derived_name("0123456789abcdef0123").unwrap(),
            "docker-0123456789ab"
        );
        assert!(derived_name("short").is_err());
        assert!(derived_name("zzzzzzzzzzzzzzzz").is_err());
    }

    #[test]
    fn pools_and_subnets() {
        let p = parse_pool("pool", "10.7.0.0/24").unwrap();
        assert!(parse_pool("pool", "10.7.0.5/24")
            .unwrap_err()
            .to_string()
            .contains("10.7.0.0/24"));
        assert!(parse_pool("pool", "nonsense").is_err());
        assert_eq!(
            parse_addr("gw", "10.7.0.1/24").unwrap().to_string(),
            "10.7.0.1"
        );
        let s = subnet_for_pool(
            p,
            Some("10.7.0.254".parse().unwrap()),
            Some("10.7.0.128/25".parse().unwrap()),
            &["10.7.0.200".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(s.range_start, Some("10.7.0.128".parse().unwrap()));
        assert_eq!(
            s.range_end, None,
            "the range ends at the pool's end: keep the default"
        );
        assert_eq!(s.exclude, vec!["10.7.0.200/32".parse::<IpNet>().unwrap()]);
        ferrynet_model::ipam::validate_subnet(&s).unwrap();
        let s = subnet_for_pool(p, None, Some("10.7.0.0/26".parse().unwrap()), &[]).unwrap();
        assert_eq!(
            (s.range_start, s.range_end),
            (None, Some("10.7.0.63".parse().unwrap()))
        );
        assert!(subnet_for_pool(p, None, Some("10.8.0.0/26".parse().unwrap()), &[]).is_err());
        assert!(subnet_for_pool(p, None, None, &["10.9.0.1".parse().unwrap()]).is_err());
    }

    #[test]
    fn endpoint_macs() {
        assert_eq!(
            endpoint_mac(Some("10.1.2.3".parse().unwrap()), "x"),
            [2, 0x66, 10, 1, 2, 3]
        );
        assert_eq!(
            endpoint_mac(None, "a1b2c3d4ee"),
            [2, 0x66, 0xa1, 0xb2, 0xc3, 0xd4]
        );
    }

    fn held(port: u16, ip: Option<&str>) -> HeldPort {
        HeldPort {
            proto: "tcp".into(),
            host_ip: ip.map(|s| s.parse().unwrap()),
            port,
            owner: "/ferrynet/v1/endpoints/n/c/eth0".into(),
        }
    }

    fn pb(host_port: u16, end: u16, host_ip: &str) -> PortBinding {
        PortBinding {
            proto: 6,
            port: 80,
            host_ip: host_ip.into(),
            host_port,
            host_port_end: end,
            ..Default::default()
        }
    }

    #[test]
    fn port_bindings_from_options() {
        let o = opts(json!({
            "com.docker.network.portmap": [
                {"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080},
                {"Proto":17,"IP":"","Port":53,"HostIP":"127.0.0.1","HostPort":5353,"HostPortEnd":0}
            ],
            "com.docker.network.endpoint.exposedports": [{"Proto":6,"Port":80}]
        }));
        let b = port_bindings(&o).unwrap();
        assert_eq!(b.len(), 2);
        let m = resolve_bindings(&b, &[], &BTreeMap::new()).unwrap();
        assert_eq!(
            m[0],
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None
            }
        );
        assert_eq!(m[1].protocol, Protocol::Udp);
        assert_eq!(m[1].host_ip, Some("127.0.0.1".parse().unwrap()));
        assert!(port_bindings(&BTreeMap::new()).unwrap().is_empty());
        assert!(port_bindings(&opts(json!({"com.docker.network.portmap": "8080:80"}))).is_err());
    }

    #[test]
    fn resolving_ports() {
        let none = BTreeMap::new();
        // Ephemeral: the first free one, skipping held and already chosen ports.
        let m = resolve_bindings(
            &[pb(0, 0, ""), pb(0, 0, "")],
            &[held(EPHEMERAL_START, None)],
            &none,
        )
        .unwrap();
        assert_eq!(m[0].host_port, EPHEMERAL_START + 1);
        assert_eq!(m[1].host_port, EPHEMERAL_START + 2);
        // A range: its first free port.
        let m = resolve_bindings(
            &[pb(8000, 8002, "")],
            &[held(8000, Some("10.0.0.1"))],
            &none,
        )
        .unwrap();
        assert_eq!(m[0].host_port, 8001);
        // 0.0.0.0 means every address; a specific address only clashes with the same or any.
        let m = resolve_bindings(&[pb(8080, 8080, "0.0.0.0")], &[], &none).unwrap();
        assert_eq!(m[0].host_ip, None);
        let m = resolve_bindings(
            &[pb(8080, 0, "10.0.0.2")],
            &[held(8080, Some("10.0.0.1"))],
            &none,
        )
        .unwrap();
        assert_eq!(m[0].host_port, 8080);
        let e = resolve_bindings(&[pb(8080, 8080, "")], &[held(8080, None)], &none)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8080/tcp") && e.contains("already published") && e.contains("n/c/eth0"),
            "{e}"
        );
        let e = resolve_bindings(
            &[pb(8080, 8081, "")],
            &[held(8080, None), held(8081, None)],
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("8080-8081"), "{e}");
        // A holder whose record carries a container name is named; the one that clashes.
        let names = BTreeMap::from([(
            "/ferrynet/v1/endpoints/n/c/eth0".to_string(),
            "web".to_string(),
        )]);
        let mut other = held(8080, Some("10.0.0.1"));
        other.owner = "/ferrynet/v1/endpoints/n/x/eth0".into();
        let e = resolve_bindings(
            &[pb(8080, 8080, "10.0.0.2")],
            &[other, held(8080, Some("10.0.0.2"))],
            &names,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("host port 8080/tcp on 10.0.0.2 is already published by container web on ferrynet network n"),
            "{e}"
        );
        let mut icmp = pb(1, 1, "");
        icmp.proto = 1;
        assert!(resolve_bindings(&[icmp], &[], &none)
            .unwrap_err()
            .to_string()
            .contains("protocol number 1"));
        assert!(resolve_bindings(&[pb(1, 1, "nowhere")], &[], &none).is_err());
    }

    #[test]
    fn bindings_round_trip() {
        let m = vec![PortMapping {
            host_port: 9000,
            container_port: 80,
            protocol: Protocol::Sctp,
            host_ip: None,
        }];
        let b = bindings_of(&m, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(b[0].proto, 132);
        assert_eq!(b[0].ip, "10.0.0.2");
        assert_eq!(resolve_bindings(&b, &[], &BTreeMap::new()).unwrap(), m);
    }
}
