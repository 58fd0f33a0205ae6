//! `ferrynet trace`: where a packet from SRC to DST goes and why, hop by hop, decided from the
//! store's records and (for the host the trace runs on) the kernel's route lookups. Pure: the
//! caller gathers [`Facts`]; [`trace`] walks the packet through the same decisions the
//! dataplane makes (anti-spoofing, DNAT of published ports, VIPs and ingress, isolation by
//! address, policy, the fabric's route per backend) and names the step that delivers or drops
//! it. Other hosts' kernels are not read: their hops come from the store and the model
//! (`fabric`, `sleeve::choose`), and say so.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::fabric::{block_gateway, same_link, vtep_mac, vxlan_dev_name, vxlan_local, Backend};
use crate::host::HostRecord;
use crate::names::format_mac;
use crate::network::{Endpoint, Network, NetworkMode};
use crate::policy::verdict::{decide, EndpointIndex, PolicyBook};
use crate::policy::Proto;
use crate::portmap::Protocol;
use crate::service::{Producer, Service};
use crate::sleeve::SLEEVE_DEV;

mod dnat;
mod route;
mod walk;

use dnat::{host_dnat, vip_dnat};
use route::{local_delivery, route_segment};

/// Bad input to a trace (unknown names, bad port specs): the CLI's exit is non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// No container, host or address by that name.
    #[error("no container, host or address {0:?}")]
    Unknown(String),
    /// A container name on several networks.
    #[error("{0:?} is on several networks ({1}); say NETWORK/NAME")]
    Ambiguous(String, String),
    /// A malformed `DST[:PORT[/proto]]`.
    #[error("bad destination {0:?}: {1}")]
    BadSpec(String, String),
    /// The named party has no address of the family asked.
    #[error("{0} has no IPv{1} address")]
    NoFamily(String, u8),
}

/// The transport of the traced packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    /// TCP to a port.
    Tcp,
    /// UDP to a port.
    Udp,
    /// An ICMP echo (no port given).
    Icmp,
}

impl L4 {
    /// Its spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
            L4::Icmp => "icmp",
        }
    }
    fn policy_proto(self) -> Option<Proto> {
        match self {
            L4::Tcp => Some(Proto::Tcp),
            L4::Udp => Some(Proto::Udp),
            L4::Icmp => None,
        }
    }
    fn matches(self, p: Protocol) -> bool {
        matches!(
            (self, p),
            (L4::Tcp, Protocol::Tcp) | (L4::Udp, Protocol::Udp)
        )
    }
}

/// `DST[:PORT[/tcp|udp]]` split: the party, the port (None: ICMP echo) and the transport.
/// IPv6 literals with a port are bracketed (`[fd20::5]:80`).
pub fn parse_dst(spec: &str) -> Result<(String, Option<u16>, L4), TraceError> {
    let bad = |why: &str| TraceError::BadSpec(spec.to_string(), why.to_string());
    if spec.is_empty() {
        return Err(bad("empty"));
    }
    if spec.parse::<IpAddr>().is_ok() {
        return Ok((spec.to_string(), None, L4::Icmp));
    }
    let (rest, proto) = match spec.rsplit_once('/') {
        // A NETWORK/NAME without a port keeps its slash.
        Some((r, p)) if r.contains(':') || r.ends_with(']') => (
            r,
            match p.to_ascii_lowercase().as_str() {
                "tcp" => Some(L4::Tcp),
                "udp" => Some(L4::Udp),
                _ => return Err(bad("the protocol must be tcp or udp")),
            },
        ),
        _ => (spec, None),
    };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, tail) = r.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        match tail {
            "" => (h, None),
            t => (
                h,
                Some(t.strip_prefix(':').ok_or_else(|| bad("expected :PORT"))?),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no destination before the port"));
    }
    let port = match port {
        None if proto.is_some() => return Err(bad("a protocol needs a port")),
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(&format!("{p:?} is not a port (1-65535)")))?,
        ),
    };
    let l4 = match (port, proto) {
        (None, _) => L4::Icmp,
        (Some(_), Some(p)) => p,
        (Some(_), None) => L4::Tcp,
    };
    Ok((host.to_string(), port, l4))
}

/// A kernel route lookup (`ip route get ADDR`) on the host the trace runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteLookup {
    /// A route: next hop, output device, route protocol number, preferred source.
    Route {
        /// Next hop (None: on-link).
        gateway: Option<IpAddr>,
        /// Output device name.
        dev: String,
        /// The route's protocol (113 ferrynet's fabric, 114 its BGP routes, 2 kernel…).
        protocol: u8,
        /// The source address the kernel would pick.
        prefsrc: Option<IpAddr>,
    },
    /// No usable route (unreachable, prohibit, blackhole, or none): the kernel's error.
    Error(String),
}

impl RouteLookup {
    fn describe(&self, dst: IpAddr) -> String {
        match self {
            RouteLookup::Route {
                gateway,
                dev,
                protocol,
                ..
            } => format!(
                "ip route get {dst}: {}dev {dev}{}",
                gateway.map(|g| format!("via {g} ")).unwrap_or_default(),
                match protocol {
                    0 => String::new(),
                    p => format!(" proto {p}"),
                }
            ),
            RouteLookup::Error(e) => format!("ip route get {dst}: {e}"),
        }
    }
}

/// What this host's kernel said, gathered by the caller for the addresses [`Trace::lookups`]
/// asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// Route lookups by destination.
    pub routes: BTreeMap<IpAddr, RouteLookup>,
    /// Whether the source port's anti-spoofing element for the source address is in the
    /// kernel (None: not read: the source is not on this host).
    pub guard_entry: Option<bool>,
    /// What ferrynet programmed on VXLAN devices (FDB and neighbour entries), by device.
    pub vxlan: BTreeMap<String, crate::fabric::FabricState>,
}

/// A producer with its health as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerFact {
    /// The record.
    pub producer: Producer,
    /// Healthy (live host, passing check).
    pub healthy: bool,
}

/// Everything a trace decides on.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The host the trace runs on (its kernel is the one read).
    pub me: String,
    /// Networks (store records; multi-host ones with their whole pool).
    pub networks: Vec<Network>,
    /// Endpoint records.
    pub endpoints: Vec<Endpoint>,
    /// Live hosts' records.
    pub hosts: Vec<HostRecord>,
    /// Block claims: (network, block, owning host).
    pub blocks: Vec<(String, IpNet, String)>,
    /// Services.
    pub services: Vec<Service>,
    /// Producers with their health.
    pub producers: Vec<ProducerFact>,
    /// The policy book and endpoint index (what `ferrynet policy test` decides on).
    pub book: PolicyBook,
    /// The policy view of the endpoints.
    pub eps: EndpointIndex,
    /// This host's kernel.
    pub kernel: KernelFacts,
}

/// Who sends or receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    /// An endpoint (index into [`Facts::endpoints`]).
    Endpoint(usize),
    /// A cluster host, by name.
    Host(String),
    /// An address that is neither (outside the cluster, or unused).
    Address(IpAddr),
}

/// One traced packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Sender.
    pub src: Party,
    /// Receiver.
    pub dst: Party,
    /// Destination port (None: ICMP echo).
    pub port: Option<u16>,
    /// Transport.
    pub l4: L4,
    /// Use IPv6 addresses for named parties.
    pub v6: bool,
    /// A forged source address (a hostile container's), instead of its own.
    pub spoof: Option<IpAddr>,
}

/// Resolve a SRC or DST word: `host` (this host), a host name, `NETWORK/NAME` or a container
/// name, or an address (an endpoint's or a host's address becomes that party).
pub fn resolve(facts: &Facts, word: &str) -> Result<Party, TraceError> {
    let word = word.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = word.parse::<IpAddr>() {
        if let Some(i) = endpoint_by_addr(facts, ip) {
            return Ok(Party::Endpoint(i));
        }
        if let Some(h) = facts
            .hosts
            .iter()
            .find(|h| h.underlay.iter().any(|u| u.addr() == ip))
        {
            return Ok(Party::Host(h.name.clone()));
        }
        return Ok(Party::Address(ip));
    }
    if word == "host" {
        return Ok(Party::Host(facts.me.clone()));
    }
    let (net, name) = match word.split_once('/') {
        Some((n, c)) => (Some(n), c),
        None => (None, word),
    };
    let found: Vec<usize> = facts
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            (e.name.as_deref() == Some(name) || e.container_id == name)
                && net.is_none_or(|n| n == e.network)
        })
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [one] => return Ok(Party::Endpoint(*one)),
        [] => {}
        many => {
            return Err(TraceError::Ambiguous(
                word.to_string(),
                many.iter()
                    .map(|i| facts.endpoints[*i].network.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ))
        }
    }
    if facts.hosts.iter().any(|h| h.name == word) || word == facts.me {
        return Ok(Party::Host(word.to_string()));
    }
    Err(TraceError::Unknown(word.to_string()))
}

/// Steps of a trace, in the order a packet meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Where the packet starts: interface, network, host.
    Source,
    /// The anti-spoofing table (`bridge ferrynet` / `inet ferrynet-routed`).
    AntiSpoofing,
    /// DNAT: a published port, a VIP or an ingress port.
    Dnat,
    /// Isolation between networks (`nets4`/`same4` sets).
    Isolation,
    /// Network policy (`inet ferrynet-policy`).
    Policy,
    /// A route lookup on a host.
    Route,
    /// The backend hop between hosts (route next hop, VXLAN, sleeve, BGP).
    Backend,
    /// Arrival on the destination's host.
    Arrival,
    /// The destination itself.
    Destination,
}

/// Where a hop's facts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Store records.
    Store,
    /// This host's kernel.
    Kernel,
    /// The model applied to store records (another host's kernel is not read).
    Model,
}

/// One hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// The host it happens on (None: inside the source, or outside the cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The step.
    pub step: Step,
    /// What happens, in a sentence.
    pub what: String,
    /// Where that comes from.
    pub basis: Basis,
    /// False at the step that drops the packet.
    pub pass: bool,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// Delivered (true) or dropped.
    pub delivered: bool,
    /// The step that delivered or dropped it.
    pub step: Step,
    /// The host of that step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why, in a sentence.
    pub reason: String,
}

/// A trace: the packet, its hops, the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// Source address as sent.
    pub src: IpAddr,
    /// Destination address as sent.
    pub dst: IpAddr,
    /// Destination port (None: ICMP echo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Transport.
    pub proto: L4,
    /// Every hop up to the verdict.
    pub hops: Vec<Hop>,
    /// Delivered or dropped, and where.
    pub verdict: Verdict,
    /// Addresses this host's kernel must be asked about (routes) that [`KernelFacts`] lacked;
    /// the caller looks them up and traces again.
    #[serde(skip)]
    pub lookups: Vec<IpAddr>,
    /// The source endpoint's anti-spoofing element, when the source is on this host and the
    /// caller has not read it yet: (port, MAC, address, routed).
    #[serde(skip)]
    pub guard_lookup: Option<(String, String, IpAddr, bool)>,
    /// VXLAN devices of this host whose FDB and neighbour entries the caller must read.
    #[serde(skip)]
    pub vxlan_lookups: Vec<String>,
}

/// The endpoint holding `ip`.
pub fn endpoint_by_addr(facts: &Facts, ip: IpAddr) -> Option<usize> {
    facts
        .endpoints
        .iter()
        .position(|e| e.ips.iter().any(|n| n.addr() == ip))
}

fn network<'a>(facts: &'a Facts, name: &str) -> Option<&'a Network> {
    facts.networks.iter().find(|n| n.name == name)
}

/// The network whose subnets (pool) hold `ip`.
fn network_of(facts: &Facts, ip: IpAddr) -> Option<&Network> {
    facts
        .networks
        .iter()
        .find(|n| n.subnets.iter().any(|s| s.cidr.contains(&ip)))
}

fn host_record<'a>(facts: &'a Facts, name: &str) -> Option<&'a HostRecord> {
    facts.hosts.iter().find(|h| h.name == name)
}

/// The host an endpoint lives on (a single-host network's: `fallback`, the host in question).
fn ep_host(e: &Endpoint, fallback: &str) -> String {
    e.host.clone().unwrap_or_else(|| fallback.to_string())
}

fn ep_label(e: &Endpoint) -> String {
    e.name.clone().unwrap_or_else(|| e.container_id.clone())
}

/// Where the packet is headed after DNAT: the address, port and (when known) the endpoint.
#[derive(Debug, Clone)]
struct Target {
    addr: IpAddr,
    port: Option<u16>,
    dnat: bool,
}

struct Walk<'a> {
    f: &'a Facts,
    q: &'a Query,
    hops: Vec<Hop>,
    lookups: Vec<IpAddr>,
    guard_lookup: Option<(String, String, IpAddr, bool)>,
    vxlan_lookups: Vec<String>,
}

type Outcome = Result<Verdict, Verdict>;

impl Walk<'_> {
    fn hop(&mut self, host: Option<&str>, step: Step, basis: Basis, what: String) {
        self.hops.push(Hop {
            host: host.map(str::to_string),
            step,
            what,
            basis,
            pass: true,
        });
    }

    fn drop(&mut self, host: Option<&str>, step: Step, basis: Basis, why: String) -> Verdict {
        self.hops.push(Hop {
            host: host.map(str::to_string),
            step,
            what: why.clone(),
            basis,
            pass: false,
        });
        Verdict {
            delivered: false,
            step,
            host: host.map(str::to_string),
            reason: why,
        }
    }

    fn basis_on(&self, host: &str) -> Basis {
        if host == self.f.me {
            Basis::Kernel
        } else {
            Basis::Model
        }
    }

    /// This host's route lookup for `dst`, or None (and a lookup to ask for).
    fn kernel_route(&mut self, dst: IpAddr) -> Option<RouteLookup> {
        match self.f.kernel.routes.get(&dst) {
            Some(r) => Some(r.clone()),
            None => {
                if !self.lookups.contains(&dst) {
                    self.lookups.push(dst);
                }
                None
            }
        }
    }
}

/// Trace `q` through `facts`. Missing kernel facts for this host are listed in
/// [`Trace::lookups`] / [`Trace::guard_lookup`]: gather them and call again.
pub fn trace(facts: &Facts, q: &Query) -> Result<Trace, TraceError> {
    let f = facts;
    let fam = |ips: &[IpNet], who: &str| {
        ips.iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv6() == q.v6)
            .ok_or(TraceError::NoFamily(
                who.to_string(),
                if q.v6 { 6 } else { 4 },
            ))
    };
    let addr_of = |p: &Party| -> Result<IpAddr, TraceError> {
        match p {
            Party::Endpoint(i) => {
                let e = &f.endpoints[*i];
                fam(&e.ips, &ep_label(e))
            }
            Party::Host(h) => {
                let r = host_record(f, h).ok_or_else(|| TraceError::Unknown(h.clone()))?;
                fam(&r.underlay, h)
            }
            Party::Address(a) => Ok(*a),
        }
    };
    let dst = addr_of(&q.dst)?;
    let mut lookups = Vec::new();
    let src = match (&q.src, q.spoof) {
        (_, Some(s)) => s,
        // This host's own packets leave from the address its kernel prefers for the route
        // (ferrynet's vxlan and sleeve routes carry this host's gateway in the network; a
        // route without `src` through an addressless device takes another interface's, maybe
        // a routed network's gateway on `lo`, which isolation then treats as that network's).
        (Party::Host(h), None) if *h == f.me => match f.kernel.routes.get(&dst) {
            Some(RouteLookup::Route {
                prefsrc: Some(p), ..
            }) => *p,
            Some(_) => addr_of(&q.src)?,
            None => {
                // First pass: ask the kernel; a host without a record (no agent) has no other
                // address to offer meanwhile.
                lookups.push(dst);
                addr_of(&q.src).unwrap_or(if dst.is_ipv6() {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                })
            }
        },
        (p, None) => addr_of(p)?,
    };
    if src.is_ipv6() != dst.is_ipv6() {
        return Err(TraceError::BadSpec(
            format!("{src} -> {dst}"),
            "source and destination are of different address families".into(),
        ));
    }
    let mut w = Walk {
        f,
        q,
        hops: Vec::new(),
        lookups,
        guard_lookup: None,
        vxlan_lookups: Vec::new(),
    };
    let verdict = match walk::walk(&mut w, src, dst) {
        Ok(v) | Err(v) => v,
    };
    Ok(Trace {
        src,
        dst,
        port: q.port,
        proto: q.l4,
        hops: w.hops,
        verdict,
        lookups: w.lookups,
        guard_lookup: w.guard_lookup,
        vxlan_lookups: w.vxlan_lookups,
    })
}

#[cfg(test)]
#[path = "trace/tests.rs"]
mod tests;
