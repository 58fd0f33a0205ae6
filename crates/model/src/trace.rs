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
use crate::policy::verdict::{decide, Decision, EndpointIndex, PolicyBook};
use crate::policy::{Action, Proto};
use crate::portmap::Protocol;
use crate::service::{Producer, Service};
use crate::sleeve::SLEEVE_DEV;

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

fn describe_decision(d: &Decision) -> String {
    match d {
        Decision::Open => "open (no policy selects it)".into(),
        Decision::Rule {
            policy,
            rule,
            action,
        } => format!(
            "{} by policy {policy}, rule {rule}",
            if *action == Action::Allow {
                "allowed"
            } else {
                "denied"
            }
        ),
        Decision::Default { policies } if policies.is_empty() => {
            "denied: its network is default-deny and no policy allows it".into()
        }
        Decision::Default { policies } => format!(
            "denied: selected by {} and no rule matches",
            policies.join(", ")
        ),
    }
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
        // (with no address on a VXLAN or sleeve device, another interface's: maybe a routed
        // network's gateway on `lo`, which isolation then treats as that network's).
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
    let verdict = match walk(&mut w, src, dst) {
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

fn walk(w: &mut Walk, src: IpAddr, dst: IpAddr) -> Outcome {
    let f = w.f;
    let q = w.q;
    // 1. Where it starts.
    let (mut at, src_ep): (Option<String>, Option<&Endpoint>) = match &q.src {
        Party::Endpoint(i) => {
            let e = &f.endpoints[*i];
            let h = ep_host(e, &f.me);
            let mode = network(f, &e.network).map(|n| n.mode);
            w.hop(
                Some(&h),
                Step::Source,
                Basis::Store,
                format!(
                    "{} ({}) on network {} ({}): {} leaves through host end {}",
                    ep_label(e),
                    e.netns.as_deref().unwrap_or("?"),
                    e.network,
                    if mode == Some(NetworkMode::Routed) {
                        "routed"
                    } else {
                        "bridged"
                    },
                    e.ifname,
                    e.host_veth.as_deref().unwrap_or("?")
                ),
            );
            (Some(h), Some(e))
        }
        Party::Host(h) => {
            w.hop(
                Some(h),
                Step::Source,
                Basis::Store,
                format!("host {h}'s own stack, from {src}"),
            );
            (Some(h.clone()), None)
        }
        Party::Address(a) => {
            w.hop(
                None,
                Step::Source,
                Basis::Store,
                format!("{a}: no endpoint or host of the cluster holds it (outside)"),
            );
            (None, None)
        }
    };
    // 2. Anti-spoofing at the source's port.
    if let Some(e) = src_ep {
        let h = at.clone().unwrap_or_default();
        let routed = network(f, &e.network).is_some_and(|n| n.mode == NetworkMode::Routed);
        let table = if routed {
            "inet ferrynet-routed"
        } else {
            "bridge ferrynet"
        };
        let set = if src.is_ipv6() { "src6" } else { "src4" };
        let port = e.host_veth.clone().unwrap_or_default();
        let mac = e.mac.clone().unwrap_or_default();
        let element = format!("{port} . {mac} . {src}");
        if !e.ips.iter().any(|n| n.addr() == src) {
            return Err(w.drop(
                Some(&h),
                Step::AntiSpoofing,
                Basis::Store,
                format!(
                    "{src} is not {}'s address: no element {element} in {table} {set} (counter {})",
                    ep_label(e),
                    if src.is_ipv6() {
                        "ip6_spoof"
                    } else {
                        "ip4_spoof"
                    }
                ),
            ));
        }
        let basis = if h == f.me {
            match f.kernel.guard_entry {
                Some(true) => Basis::Kernel,
                Some(false) => {
                    return Err(w.drop(
                        Some(&h),
                        Step::AntiSpoofing,
                        Basis::Kernel,
                        format!("element {element} is missing from {table} {set}: the port drops every frame"),
                    ))
                }
                None => {
                    w.guard_lookup = Some((port.clone(), mac.clone(), src, routed));
                    Basis::Store
                }
            }
        } else {
            Basis::Store
        };
        w.hop(
            Some(&h),
            Step::AntiSpoofing,
            basis,
            format!("element {element} in {table} {set}: its own address"),
        );
    }
    // 3. DNAT: a VIP on the sending host, a published or ingress port on the receiving one.
    let mut target = Target {
        addr: dst,
        port: q.port,
        dnat: false,
    };
    if let Some(svc) = f.services.iter().find(|s| s.vips.contains(&dst)) {
        let dnat_host = at.clone();
        target = vip_dnat(w, dnat_host.as_deref(), svc, dst)?;
    } else if let Party::Host(h) = &q.dst {
        // The packet travels to host h first (unless it is already there).
        if at.as_deref() != Some(h.as_str()) {
            route_segment(w, at.as_deref(), src, dst, Some(h))?;
            at = Some(h.clone());
        }
        match host_dnat(w, h, dst)? {
            Some(t) => target = t,
            None => {
                w.hop(
                    Some(h),
                    Step::Destination,
                    Basis::Store,
                    format!(
                        "no published or ingress port {}: the packet is for host {h} itself",
                        port_str(q)
                    ),
                );
                return Ok(Verdict {
                    delivered: true,
                    step: Step::Destination,
                    host: Some(h.clone()),
                    reason: format!("delivered to host {h}'s own stack ({dst})"),
                });
            }
        }
    }
    // 4. Isolation between networks, in the forward hook: on the sending host, or for this
    // host's own packets on the receiving one (they never cross the sender's forward hook).
    let host_src = matches!(q.src, Party::Host(_));
    let dst_net = network_of(f, target.addr);
    if !host_src {
        isolation(w, at.as_deref(), src, &target)?;
    }
    // 5. Policy (egress at the source's host, ingress at the destination's).
    let dst_idx = endpoint_by_addr(f, target.addr);
    let dst_ep = dst_idx.map(|i| &f.endpoints[i]);
    let v = decide(
        &f.book,
        &f.eps,
        src,
        target.addr,
        q.l4.policy_proto(),
        target.port.unwrap_or(0),
    );
    if let Some(side) = &v.egress {
        let h = at.clone();
        let ok = side.decision.allows();
        let what = format!(
            "egress of {}: {}",
            side.endpoint,
            describe_decision(&side.decision)
        );
        if !ok {
            return Err(w.drop(h.as_deref(), Step::Policy, Basis::Store, what));
        }
        w.hop(h.as_deref(), Step::Policy, Basis::Store, what);
    }
    // 6. Routing, host by host, to where the target lives.
    let dst_host: Option<String> = match dst_ep {
        Some(e) => Some(ep_host(e, at.as_deref().unwrap_or(&f.me))),
        None => block_owner(f, target.addr).or_else(|| {
            // A single-host network's unused address: on the host in question.
            dst_net
                .filter(|n| n.fabric.is_none())
                .and_then(|_| at.clone())
        }),
    };
    if at.as_deref() != dst_host.as_deref() || at.is_none() {
        route_segment(w, at.as_deref(), src, target.addr, dst_host.as_deref())?;
        at = dst_host.clone();
    }
    let Some(h) = at.clone() else {
        return Ok(Verdict {
            delivered: true,
            step: Step::Route,
            host: None,
            reason: format!("left the cluster towards {}", target.addr),
        });
    };
    // 7. On the destination's host.
    let Some(e) = dst_ep else {
        if let Some(n) = dst_net {
            return Err(w.drop(
                Some(&h),
                Step::Destination,
                Basis::Store,
                format!(
                    "no endpoint holds {} in network {} ({})",
                    target.addr,
                    n.name,
                    if n.mode == NetworkMode::Routed {
                        "the block's `unreachable` route answers with an ICMP error"
                    } else {
                        "nobody answers ARP/ND on the bridge"
                    }
                ),
            ));
        }
        return Ok(Verdict {
            delivered: true,
            step: Step::Destination,
            host: Some(h.clone()),
            reason: format!("delivered to host {h}'s own stack ({})", target.addr),
        });
    };
    if host_src && q.src != Party::Host(h.clone()) {
        isolation(w, Some(&h), src, &target)?;
    }
    local_delivery(w, &h, e, target.addr)?;
    if let Some(side) = &v.ingress {
        let ok = side.decision.allows();
        let what = format!(
            "ingress of {}: {}",
            side.endpoint,
            describe_decision(&side.decision)
        );
        if !ok {
            return Err(w.drop(Some(&h), Step::Policy, Basis::Store, what));
        }
        w.hop(Some(&h), Step::Policy, Basis::Store, what);
    }
    let port = match target.port {
        Some(p) => format!("port {p}/{}", q.l4.as_str()),
        None => "ICMP echo".to_string(),
    };
    w.hop(
        Some(&h),
        Step::Destination,
        Basis::Store,
        format!("{} {} {port}", ep_label(e), target.addr),
    );
    Ok(Verdict {
        delivered: true,
        step: Step::Destination,
        host: Some(h),
        reason: format!("delivered to {} ({}) {port}", ep_label(e), target.addr),
    })
}

/// Isolation by address (`nets4`/`same4`): a new connection between two networks' pools is
/// dropped unless DNAT made it (`ct status dnat accept`).
fn isolation(w: &mut Walk, h: Option<&str>, src: IpAddr, target: &Target) -> Result<(), Verdict> {
    let f = w.f;
    let src_net = network_of(f, src).filter(|n| !n.subnets.is_empty());
    let dst_net = network_of(f, target.addr);
    let (Some(a), Some(b)) = (src_net, dst_net) else {
        return Ok(());
    };
    if a.name != b.name && !target.dnat {
        return Err(w.drop(
            h,
            Step::Isolation,
            Basis::Store,
            format!(
                "{src} (network {}) and {} (network {}) are in different networks' pools: \
                 inet ferrynet forward `ip daddr @nets4 ip saddr @nets4 ip saddr . ip daddr != @same4 drop`",
                a.name, target.addr, b.name
            ),
        ));
    }
    w.hop(
        h,
        Step::Isolation,
        Basis::Store,
        if target.dnat {
            "a DNATed connection: passes isolation (`ct status dnat accept`)".to_string()
        } else {
            format!("both in network {}: passes", a.name)
        },
    );
    Ok(())
}

fn port_str(q: &Query) -> String {
    match q.port {
        Some(p) => format!("{p}/{}", q.l4.as_str()),
        None => "(ICMP)".into(),
    }
}

/// The owner of the block holding `ip`.
fn block_owner(f: &Facts, ip: IpAddr) -> Option<String> {
    f.blocks
        .iter()
        .find(|(_, b, _)| b.contains(&ip))
        .map(|(_, _, h)| h.clone())
}

/// A VIP: the load balancer on the sending host picks a healthy producer.
fn vip_dnat(
    w: &mut Walk,
    host: Option<&str>,
    svc: &Service,
    vip: IpAddr,
) -> Result<Target, Verdict> {
    let q = w.q;
    let Some(port) = q.port else {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!("{vip} is service {}'s VIP: only its ports answer", svc.name),
        ));
    };
    if !svc
        .ports
        .iter()
        .any(|p| p.port == port && q.l4.matches(p.protocol))
    {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!(
                "{vip} is service {}'s VIP, which has no port {port}/{}",
                svc.name,
                q.l4.as_str()
            ),
        ));
    }
    pick_producer(w, host, svc, port, None, &format!("VIP {vip}:{port}"))
}

/// Healthy producers of `svc` (only `local_to`'s when set); the first is followed.
fn pick_producer(
    w: &mut Walk,
    host: Option<&str>,
    svc: &Service,
    port: u16,
    local_to: Option<&str>,
    element: &str,
) -> Result<Target, Verdict> {
    let v6 = w.q.v6;
    let healthy: Vec<&Producer> =
        w.f.producers
            .iter()
            .filter(|p| p.producer.service == svc.name && p.healthy)
            .map(|p| &p.producer)
            .filter(|p| p.addr(v6).is_some())
            .filter(|p| local_to.is_none_or(|h| p.host.as_deref() == Some(h)))
            .collect();
    let Some(first) = healthy.first() else {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!(
                "{element} (service {}): no healthy producer{}",
                svc.name,
                if local_to.is_some() {
                    " on this host (local ingress)"
                } else {
                    ""
                }
            ),
        ));
    };
    let addr = first.addr(v6).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let tport = first.target_port(port);
    w.hop(
        host,
        Step::Dnat,
        Basis::Store,
        format!(
            "{element} of service {} → one of {} healthy producer(s) ({}); following {} {addr}:{tport}{}",
            svc.name,
            healthy.len(),
            healthy
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            first.id,
            first
                .host
                .as_deref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default()
        ),
    );
    Ok(Target {
        addr,
        port: Some(tport),
        dnat: true,
    })
}

/// A packet for host `h`'s address: a published port of one of its endpoints, or an ingress
/// port; None when neither (the host itself receives it).
fn host_dnat(w: &mut Walk, h: &str, dst: IpAddr) -> Result<Option<Target>, Verdict> {
    let f = w.f;
    let q = w.q;
    let Some(port) = q.port else {
        return Ok(None);
    };
    for e in &f.endpoints {
        if ep_host(e, h) != h {
            continue;
        }
        for m in &e.port_mappings {
            let ip_ok = match m.host_ip {
                None => true,
                Some(ip) if ip.is_unspecified() => ip.is_ipv6() == dst.is_ipv6(),
                Some(ip) => ip == dst,
            };
            if m.host_port != port || !q.l4.matches(m.protocol) || !ip_ok {
                continue;
            }
            let Some(addr) = e
                .ips
                .iter()
                .map(|n| n.addr())
                .find(|a| a.is_ipv6() == dst.is_ipv6())
            else {
                continue;
            };
            let map = match (dst.is_ipv6(), m.host_ip.filter(|i| !i.is_unspecified())) {
                (false, None) => "pm4_any",
                (true, None) => "pm6_any",
                (false, Some(_)) => "pm4_ip",
                (true, Some(_)) => "pm6_ip",
            };
            w.hop(
                Some(h),
                Step::Dnat,
                Basis::Store,
                format!(
                    "published port {port}/{} of {} → {addr}:{} (inet ferrynet map {map})",
                    q.l4.as_str(),
                    ep_label(e),
                    m.container_port
                ),
            );
            return Ok(Some(Target {
                addr,
                port: Some(m.container_port),
                dnat: true,
            }));
        }
    }
    for svc in &f.services {
        if let Some(ing) = svc
            .ingress
            .iter()
            .find(|i| i.published == port && q.l4.matches(i.protocol))
        {
            let local = ing.local.then_some(h);
            let t = pick_producer(
                w,
                Some(h),
                svc,
                ing.target,
                local,
                &format!("ingress port {port} → service port {}", ing.target),
            )?;
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// The path from host `from` (None: outside the cluster) to host `to` (None: outside) for
/// `dst`: this host's kernel lookup when `from` is this host, the fabric model otherwise.
fn route_segment(
    w: &mut Walk,
    from: Option<&str>,
    src: IpAddr,
    dst: IpAddr,
    to: Option<&str>,
) -> Result<(), Verdict> {
    let f = w.f;
    let Some(from) = from else {
        // From outside: the underlay delivers to the host (its address, or its block's route).
        if let Some(t) = to {
            w.hop(
                Some(t),
                Step::Arrival,
                Basis::Model,
                format!("arrives from outside ({src}) on host {t}'s underlay"),
            );
        }
        return Ok(());
    };
    let dst_net = network_of(f, dst);
    // The fabric's expectation: which backend, which next hop.
    let expect: Option<Expected> = match (to, dst_net) {
        (Some(t), Some(n)) if n.fabric.is_some() && t != from => {
            Some(fabric_hop(w, from, t, n, dst)?)
        }
        (Some(t), _) if t != from => {
            // A host's own address: over the underlay.
            let mine = host_record(f, from)
                .map(|r| r.underlay.clone())
                .unwrap_or_default();
            let peer = host_record(f, t)
                .map(|r| r.underlay.clone())
                .unwrap_or_default();
            let gw = same_link(&mine, &peer, dst.is_ipv6()).map(|(_, a)| a);
            Some(Expected {
                backend_hop: None,
                devs: vec![],
                gateway: gw.map(|_| None),
                what: format!("host {t}'s underlay address, over the underlay"),
            })
        }
        _ => None,
    };
    let basis = w.basis_on(from);
    if from == f.me {
        let Some(r) = w.kernel_route(dst) else {
            return Ok(());
        };
        let desc = r.describe(dst);
        match (&r, &expect) {
            (RouteLookup::Error(_), _) => {
                return Err(w.drop(
                    Some(from),
                    Step::Route,
                    Basis::Kernel,
                    format!("{desc}: no route"),
                ));
            }
            (RouteLookup::Route { dev, gateway, .. }, Some(x))
                if !x.devs.is_empty() || matches!(x.gateway, Some(Some(_))) =>
            {
                let dev_ok = x.devs.is_empty() || x.devs.iter().any(|d| d == dev);
                let gw_ok = match &x.gateway {
                    Some(Some(g)) => gateway.as_ref() == Some(g),
                    _ => true,
                };
                if !(dev_ok && gw_ok) {
                    return Err(w.drop(
                        Some(from),
                        Step::Route,
                        Basis::Kernel,
                        format!(
                            "{desc}: not the fabric's path ({}); the fabric route is missing or overridden",
                            x.what
                        ),
                    ));
                }
                w.hop(
                    Some(from),
                    Step::Route,
                    Basis::Kernel,
                    format!("{desc} ({})", x.what),
                );
            }
            (RouteLookup::Route { dev, .. }, None) if to.is_none() => {
                let masq = masquerade_note(f, src, dst);
                w.hop(
                    Some(from),
                    Step::Route,
                    Basis::Kernel,
                    format!("{desc}: out of the cluster through {dev}{masq}"),
                );
            }
            _ => w.hop(Some(from), Step::Route, Basis::Kernel, desc),
        }
    } else {
        match &expect {
            Some(x) => w.hop(
                Some(from),
                Step::Route,
                basis,
                format!(
                    "{} (from the store; {from}'s kernel is not read here)",
                    x.what
                ),
            ),
            None if to.is_none() => {
                let masq = masquerade_note(f, src, dst);
                w.hop(
                    Some(from),
                    Step::Route,
                    basis,
                    format!(
                        "{dst} is outside every network and host: {from}'s default route{masq} \
                         (from the model; {from}'s kernel is not read here)"
                    ),
                )
            }
            None => {}
        }
    }
    if let (Some(x), Some(t)) = (&expect, to) {
        if let Some((b, basis)) = &x.backend_hop {
            w.hop(Some(from), Step::Backend, *basis, b.clone());
        }
        w.hop(
            Some(t),
            Step::Arrival,
            Basis::Model,
            format!("arrives on host {t} from {from}"),
        );
    }
    if to.is_none() {
        // Leaving the cluster: also the source network's `--internal`.
        if let Some(n) = network_of(f, src).filter(|n| n.internal) {
            return Err(w.drop(
                Some(from),
                Step::Route,
                Basis::Store,
                format!("network {} is internal: no way out", n.name),
            ));
        }
    }
    Ok(())
}

fn masquerade_note(f: &Facts, src: IpAddr, dst: IpAddr) -> String {
    match network_of(f, src) {
        Some(n) if n.ip_masq && network_of(f, dst).is_none() => {
            format!(
                ", masqueraded (network {} leaves through a non-ferrynet interface)",
                n.name
            )
        }
        _ => String::new(),
    }
}

/// What the fabric programs on `from` for a packet to `dst` on host `to`.
struct Expected {
    /// The backend hop's description.
    backend_hop: Option<(String, Basis)>,
    /// Acceptable output devices (empty: any).
    devs: Vec<String>,
    /// Expected next hop (None: not checked; Some(None): none).
    gateway: Option<Option<IpAddr>>,
    what: String,
}

fn fabric_hop(
    w: &mut Walk,
    from: &str,
    to: &str,
    n: &Network,
    dst: IpAddr,
) -> Result<Expected, Verdict> {
    let f = w.f;
    let Some(spec) = &n.fabric else {
        return Err(w.drop(
            Some(from),
            Step::Route,
            Basis::Store,
            "not multi-host".into(),
        ));
    };
    let mine = host_record(f, from)
        .map(|r| r.underlay.clone())
        .unwrap_or_default();
    let Some(peer_rec) = host_record(f, to) else {
        return Err(w.drop(
            Some(from),
            Step::Backend,
            Basis::Store,
            format!("host {to} owns the block of {dst} but has no live registration: its routes are gone"),
        ));
    };
    let block = f
        .blocks
        .iter()
        .find(|(net, b, _)| *net == n.name && b.contains(&dst))
        .map(|(_, b, _)| *b)
        .unwrap_or_else(|| IpNet::from(dst));
    let peer = crate::fabric::Peer {
        host: to.to_string(),
        underlay: peer_rec.underlay.clone(),
        vtep_mac: vtep_mac(to, &n.name),
        blocks: f
            .blocks
            .iter()
            .filter(|(net, _, h)| *net == n.name && h == to)
            .map(|(_, b, _)| *b)
            .collect(),
    };
    let choice = crate::sleeve::choose(
        spec.backend,
        spec.encrypt,
        &mine,
        &peer,
        peer_rec.sleeve.is_some(),
        crate::sleeve::Probe::Answered,
    );
    let v6 = dst.is_ipv6();
    let mut basis = w.basis_on(from);
    let why = if spec.backend == Backend::Auto || spec.encrypt {
        format!(" ({})", choice.reason)
    } else {
        String::new()
    };
    let (devs, gateway, what, backend_hop) = match choice.backend {
        Backend::Route | Backend::Auto => {
            let Some((_, gw)) = same_link(&mine, &peer.underlay, v6) else {
                return Err(w.drop(
                    Some(from),
                    Step::Backend,
                    Basis::Model,
                    format!("backend route: {to} is not on a shared link with {from} in this family: no route to block {block}"),
                ));
            };
            (
                vec![],
                Some(Some(gw)),
                format!("fabric route {block} via {gw} ({to}'s underlay address)"),
                format!("backend route{why}: next hop {gw}, host {to}'s underlay address"),
            )
        }
        Backend::Vxlan => {
            let dev = vxlan_dev_name(&n.name);
            let gw = block_gateway(&block);
            let mac = format_mac(&peer.vtep_mac);
            let vtep_ip = vxlan_local(&mine).and_then(|l| {
                peer.underlay
                    .iter()
                    .map(|u| u.addr())
                    .find(|a| a.is_ipv6() == l.is_ipv6())
            });
            let vtep = vtep_ip.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
            if from == f.me && spec.backend == Backend::Vxlan && !spec.encrypt {
                match f.kernel.vxlan.get(&dev) {
                    None => {
                        if !w.vxlan_lookups.contains(&dev) {
                            w.vxlan_lookups.push(dev.clone());
                        }
                        basis = Basis::Model;
                    }
                    Some(k) => {
                        let fdb = k.fdb.iter().any(|e| {
                            e.dev == dev && e.mac == peer.vtep_mac && Some(e.dst) == vtep_ip
                        });
                        let neigh = k
                            .neigh
                            .iter()
                            .any(|e| e.dev == dev && e.ip == gw && e.mac == peer.vtep_mac);
                        if !(fdb && neigh) {
                            return Err(w.drop(
                                Some(from),
                                Step::Backend,
                                Basis::Kernel,
                                format!(
                                    "backend vxlan: {} on {dev} (expected neighbour {gw} lladdr {mac}, FDB {mac} dst {vtep}): frames for {to} go nowhere",
                                    match (fdb, neigh) {
                                        (false, false) => "FDB and neighbour entries missing",
                                        (false, true) => "FDB entry missing",
                                        _ => "neighbour entry missing",
                                    }
                                ),
                            ));
                        }
                    }
                }
            } else {
                basis = Basis::Model;
            }
            (
                vec![dev.clone()],
                Some(Some(gw)),
                format!("fabric route {block} via {gw} dev {dev} onlink"),
                format!(
                    "backend vxlan{why}: neighbour {gw} lladdr {mac}, FDB {mac} dst {vtep} ({to}'s VTEP), VNI {}, UDP 4789",
                    spec.vni
                ),
            )
        }
        Backend::Sleeve => {
            // The sleeve's peer table lives in the agent; the store's record is what it holds.
            basis = Basis::Model;
            let Some(s) = &peer_rec.sleeve else {
                return Err(w.drop(
                    Some(from),
                    Step::Backend,
                    Basis::Store,
                    format!("backend sleeve: host {to} has no sleeve key: traffic to it is dropped in the sleeve"),
                ));
            };
            let ep = peer
                .underlay
                .iter()
                .map(|u| u.addr())
                .find(|a| a.is_ipv4())
                .or_else(|| peer.underlay.first().map(|u| u.addr()))
                .map(|a| match a {
                    IpAddr::V6(a) => format!("[{a}]:{}", s.port),
                    a => format!("{a}:{}", s.port),
                })
                .unwrap_or_else(|| "?".into());
            (
                vec![SLEEVE_DEV.to_string()],
                None,
                format!(
                    "fabric route {block} via {} dev {SLEEVE_DEV} onlink",
                    block_gateway(&block)
                ),
                format!(
                    "backend sleeve{why}: peer {to} key {}, endpoint {ep} (encrypted, UDP)",
                    s.public_key
                ),
            )
        }
        Backend::Bgp => (
            // The route is the kernel's (the route step); the announcement is the model's.
            vec![],
            None,
            format!("a BGP-learned route to {block} (announced by {to})"),
            format!("backend bgp: {to} announces {block}; the route is the speaker's (proto 114)"),
        ),
    };
    // For auto, any backend's device is acceptable on this host's kernel.
    let (devs, gateway) = if spec.backend == Backend::Auto {
        (vec![], None)
    } else {
        (devs, gateway)
    };
    Ok(Expected {
        backend_hop: Some((backend_hop, basis)),
        devs,
        gateway,
        what,
    })
}

/// The last hop: from the destination host into the endpoint.
fn local_delivery(w: &mut Walk, h: &str, e: &Endpoint, addr: IpAddr) -> Result<(), Verdict> {
    let f = w.f;
    let n = network(f, &e.network);
    let routed = n.is_some_and(|n| n.mode == NetworkMode::Routed);
    let dev = if routed {
        e.host_veth.clone().unwrap_or_default()
    } else {
        n.map(|n| n.bridge.clone()).unwrap_or_default()
    };
    if h == f.me {
        let Some(r) = w.kernel_route(addr) else {
            return Ok(());
        };
        let desc = r.describe(addr);
        match &r {
            RouteLookup::Route { dev: d, .. } if *d == dev => {
                w.hop(
                    Some(h),
                    Step::Route,
                    Basis::Kernel,
                    format!("{desc}: into {}", e.network),
                );
            }
            RouteLookup::Route { .. } if dev.is_empty() => {
                w.hop(Some(h), Step::Route, Basis::Kernel, desc);
            }
            _ => {
                return Err(w.drop(
                    Some(h),
                    Step::Route,
                    Basis::Kernel,
                    format!(
                    "{desc}: expected dev {dev} (network {}): the route to the endpoint is missing",
                    e.network
                ),
                ))
            }
        }
    } else {
        w.hop(
            Some(h),
            Step::Route,
            Basis::Model,
            format!(
                "{addr} dev {dev} ({}; from the store, {h}'s kernel is not read here)",
                if routed {
                    "the endpoint's /32 or /128 route on its host end"
                } else {
                    "the network's bridge"
                }
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
#[path = "trace/tests.rs"]
mod tests;
