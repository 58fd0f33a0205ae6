//! Virtual IPs and ingress as nftables state (pure): what one host must program for the
//! services it knows, the difference between two such states as one atomic batch, and the
//! whole table as one batch.
//!
//! The table `inet ferrynet-svc` belongs to the agent alone (the CNI plugin and the CLI own
//! `inet ferrynet` and flush its chains). Its shape follows kube-proxy's nftables mode:
//!
//! - verdict maps `vips4`/`vips6` keyed by `daddr . l4proto . dport` send a new connection to
//!   a VIP to its service port's chain: one lookup whatever the number of services;
//! - `ingress4`/`ingress6` keyed by `l4proto . dport` do the same for connections to any local
//!   address of the host (published ports of the routing mesh); they are marked
//!   ([`INGRESS_MARK`]) and leave for a producer on another host from this host's gateway in
//!   the producer's network (`ingress_src4`/`ingress_src6`, see [`LbState::ingress_src`]),
//!   else masqueraded; a `local`
//!   ingress port leads to a chain of this host's producers only (`loc-…`), and where there
//!   is none it is in `noingress4`/`noingress6` and refused in the input filter;
//! - every connection a service chain takes is marked [`LB_MARK`] (conntrack mark): the
//!   edge's hairpin masquerade leaves it alone, so the producer sees the client's own
//!   address (bridges call the IP hooks, so a reply bridged back to a client on the same
//!   bridge is still un-DNATed by the host); only a producer that reached itself through
//!   its own service (`saddr . daddr` in `hairpin4`/`hairpin6`) is masqueraded;
//! - a service port's chain picks a producer with `numgen random mod N` and DNATs to it; with
//!   client-IP affinity, each producer has its own chain and a dynamic set of client addresses
//!   (with a timeout) that keeps sending those clients to it;
//! - a VIP port without healthy producers is in `noprod4`/`noprod6` and rejected (TCP reset,
//!   ICMP port unreachable) in the filter chains, as kube-proxy does, rather than blackholed.
//!
//! Chains of unchanged service ports are never rewritten; a service port whose producers
//! change has its chain flushed and refilled in the same transaction. Conntrack keeps
//! established connections on the producer they were DNATed to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::discovery::DiscoveryView;
use crate::fabric::tunnel_source;
use crate::portmap::Protocol;
use crate::service::{IngressPort, Producer};

/// The table's name (family `inet`).
pub const TABLE: &str = "ferrynet-svc";
/// Packet mark bit of ingress connections (masqueraded when they leave for another host).
pub const INGRESS_MARK: u32 = 0x0040_0000;
/// Conntrack mark bit of every connection a service chain DNATs (VIP or ingress): the edge's
/// hairpin masquerade skips these, the load balancer decides their SNAT itself.
pub const LB_MARK: u32 = 0x0080_0000;
/// How long a client stays with its producer after its last new connection (affinity).
pub const AFFINITY_TIMEOUT: &str = "3h";

const T: &str = "inet ferrynet-svc";

/// One producer behind a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// The producer's id (names its affinity chain and set).
    pub id: String,
    /// Its address of the chain's family.
    pub addr: IpAddr,
    /// Its port for this service port.
    pub port: u16,
}

/// A service port of one address family with healthy producers: one chain in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChain {
    /// Transport protocol.
    pub protocol: Protocol,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Client-IP affinity.
    pub affinity: bool,
    /// Healthy producers, in id order (never empty).
    pub backends: Vec<Backend>,
}

/// A VIP port: `vip . protocol . port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipPort {
    /// The virtual IP.
    pub vip: IpAddr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Port.
    pub port: u16,
}

/// An ingress port of one family: `protocol . port` on every local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressKey {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Published port.
    pub port: u16,
}

/// Everything the load balancer programs on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbState {
    /// Service-port chains by name.
    pub chains: BTreeMap<String, ServiceChain>,
    /// VIP ports with producers → their chain.
    pub vips: BTreeMap<VipPort, String>,
    /// VIP ports without healthy producers (rejected).
    pub no_producers: BTreeSet<VipPort>,
    /// Ingress ports → their chain.
    pub ingress: BTreeMap<IngressKey, String>,
    /// `local` ingress ports without a producer on this host (refused) → their service.
    pub ingress_refused: BTreeMap<IngressKey, String>,
    /// Every producer address in a chain: a connection from one of them to itself (a
    /// producer picked by its own service) is masqueraded.
    pub hairpin: BTreeSet<IpAddr>,
    /// Pool prefix of a multi-host network → this host's gateway in it
    /// ([`crate::fabric::tunnel_source`]): the source of ingress connections sent to a producer
    /// of that network on another host. Masquerade would take the output device's address,
    /// and a tunnel device has none: the kernel then picks another interface's (a routed
    /// network's gateway on `lo`), which the producer's host drops as another network's.
    pub ingress_src: BTreeMap<IpNet, IpAddr>,
    /// Ingress ports not programmed here, and why.
    pub conflicts: Vec<String>,
}

impl LbState {
    /// Number of services with at least one programmed chain or VIP.
    pub fn service_ports(&self) -> usize {
        self.vips.len() + self.no_producers.len()
    }
    /// True when there is nothing to serve: the host then keeps no table at all.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.vips.is_empty()
            && self.no_producers.is_empty()
            && self.ingress.is_empty()
            && self.ingress_refused.is_empty()
    }
}

fn fam(v6: bool) -> char {
    if v6 {
        '6'
    } else {
        '4'
    }
}

/// The chain of a service port of one family: `svc-<service>-<proto>-<port>-<4|6>`.
pub fn chain_name(service: &str, protocol: Protocol, port: u16, v6: bool) -> String {
    format!("svc-{service}-{}-{port}-{}", protocol.as_str(), fam(v6))
}

/// The chain of a `local` ingress port's service port (this host's producers only):
/// `loc-<service>-<proto>-<port>-<4|6>`.
pub fn local_chain_name(service: &str, protocol: Protocol, port: u16, v6: bool) -> String {
    format!("loc-{service}-{}-{port}-{}", protocol.as_str(), fam(v6))
}

fn backend_chain(chain: &str, id: &str) -> String {
    format!("{chain}/{id}")
}

fn affinity_set(chain: &str, id: &str) -> String {
    format!("aff-{chain}/{id}")
}

/// What host `host` must program for `view`: every service port with a VIP (or an ingress
/// port) of a family gets a chain over its healthy producers' addresses of that family.
///
/// Ingress ports: a port a container on this host publishes (`-p`, the `ports/` keys) keeps
/// it here, and of two services publishing one port the first by name wins; the losers are
/// reported in `conflicts`, not programmed.
pub fn desired(view: &DiscoveryView, host: &str) -> LbState {
    let mut st = LbState::default();
    // Ports published by containers on this host (single-host endpoints have no host).
    let published: BTreeSet<(Protocol, u16)> = view
        .endpoints
        .iter()
        .filter(|e| e.host.as_deref().is_none_or(|h| h == host))
        .flat_map(|e| e.port_mappings.iter().map(|m| (m.protocol, m.host_port)))
        .collect();
    for svc in view.services.values() {
        let producers = view.healthy_producers(&svc.name);
        for p in &svc.ports {
            let ingress: Vec<&IngressPort> = svc
                .ingress
                .iter()
                .filter(|i| i.target == p.port && i.protocol == p.protocol)
                .collect();
            for v6 in [false, true] {
                let vip = svc.vip(v6);
                if vip.is_none() && ingress.is_empty() {
                    continue;
                }
                let (backends, local) =
                    backends_of(&producers, host, v6, |pr| pr.target_port(p.port));
                let name = chain_name(&svc.name, p.protocol, p.port, v6);
                let loc_name = local_chain_name(&svc.name, p.protocol, p.port, v6);
                let key = vip.map(|vip| VipPort {
                    vip,
                    protocol: p.protocol,
                    port: p.port,
                });
                match key {
                    Some(k) if backends.is_empty() => {
                        st.no_producers.insert(k);
                    }
                    Some(k) => {
                        st.vips.insert(k, name.clone());
                    }
                    None => {}
                }
                for i in &ingress {
                    let ik = IngressKey {
                        v6,
                        protocol: p.protocol,
                        port: i.published,
                    };
                    let target = match (i.local, local.is_empty(), backends.is_empty()) {
                        (true, true, _) => IngressTarget::Refuse,
                        (true, false, _) => IngressTarget::Chain(loc_name.clone()),
                        // Default ingress without any producer: not programmed (as before).
                        (false, _, true) => continue,
                        (false, _, false) => IngressTarget::Chain(name.clone()),
                    };
                    place_ingress(&mut st, &published, &svc.name, ik, target);
                }
                let affinity = svc.affinity;
                if ingress.iter().any(|i| i.local) && !local.is_empty() {
                    st.hairpin.extend(local.iter().map(|b| b.addr));
                    st.chains.insert(
                        loc_name,
                        ServiceChain {
                            protocol: p.protocol,
                            v6,
                            affinity,
                            backends: local,
                        },
                    );
                }
                if backends.is_empty() {
                    continue;
                }
                st.hairpin.extend(backends.iter().map(|b| b.addr));
                st.chains.insert(
                    name,
                    ServiceChain {
                        protocol: p.protocol,
                        v6,
                        affinity,
                        backends,
                    },
                );
            }
        }
    }
    drop_unused_local_chains(&mut st);
    st.ingress_src = ingress_sources(view, host);
    st.conflicts.sort();
    st.conflicts.dedup();
    st
}

/// Per pool prefix of every multi-host network where `host` has a block of the family, its
/// gateway there. A prefix overlapping one kept earlier (an inconsistent store) is left out:
/// nft refuses overlapping intervals, and one bad record must not fail the whole table.
fn ingress_sources(view: &DiscoveryView, host: &str) -> BTreeMap<IpNet, IpAddr> {
    let mut out: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
    for net in view.networks.values().filter(|n| n.fabric.is_some()) {
        let mine = view.blocks_of(&net.name, host);
        for pool in net.subnets.iter().map(|s| s.cidr.trunc()) {
            if out.keys().any(|k| k.contains(&pool) || pool.contains(k)) {
                continue;
            }
            if let Some(gw) = tunnel_source(&mine, &pool) {
                out.insert(pool, gw);
            }
        }
    }
    out
}

/// The backends of one service port and family, sorted, and those of them on `host`.
fn backends_of(
    producers: &[&Producer],
    host: &str,
    v6: bool,
    port_of: impl Fn(&Producer) -> u16,
) -> (Vec<Backend>, Vec<Backend>) {
    let mut backends: Vec<(Backend, bool)> = producers
        .iter()
        .filter_map(|pr| {
            let here = pr.host.as_deref() == Some(host);
            pr.addr(v6).map(|addr| {
                let be = Backend {
                    id: pr.id.clone(),
                    addr,
                    port: port_of(pr),
                };
                (be, here)
            })
        })
        .collect();
    backends.sort();
    let local: Vec<Backend> = backends
        .iter()
        .filter(|(_, here)| *here)
        .map(|(b, _)| b.clone())
        .collect();
    (backends.into_iter().map(|(b, _)| b).collect(), local)
}

/// A local chain nobody leads to (its port lost to a conflict) is not programmed.
fn drop_unused_local_chains(st: &mut LbState) {
    let used: BTreeSet<&String> = st.vips.values().chain(st.ingress.values()).collect();
    let unused: Vec<String> = st
        .chains
        .keys()
        .filter(|c| c.starts_with("loc-") && !used.contains(c))
        .cloned()
        .collect();
    for c in unused {
        st.chains.remove(&c);
    }
}

/// Where an ingress port leads on this host.
enum IngressTarget {
    /// A service chain.
    Chain(String),
    /// Refused (a `local` port without a producer here).
    Refuse,
}

/// Take ingress port `ik` for `service`, unless a container on this host publishes it or
/// another service (first by name) took it: those are reported in `conflicts`.
fn place_ingress(
    st: &mut LbState,
    published: &BTreeSet<(Protocol, u16)>,
    service: &str,
    ik: IngressKey,
    target: IngressTarget,
) {
    if published.contains(&(ik.protocol, ik.port)) {
        if !ik.v6 {
            st.conflicts.push(format!(
                "ingress {}/{} of service {service}: published by a container on this host",
                ik.protocol.as_str(),
                ik.port
            ));
        }
        return;
    }
    if let Some(owner) = st.ingress.get(&ik).or(st.ingress_refused.get(&ik)) {
        st.conflicts.push(format!(
            "ingress {}/{} of service {service}: already served for {owner}",
            ik.protocol.as_str(),
            ik.port
        ));
        return;
    }
    match target {
        IngressTarget::Chain(c) => st.ingress.insert(ik, c),
        IngressTarget::Refuse => st.ingress_refused.insert(ik, service.to_string()),
    };
}

fn dnat_target(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn ipfam(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

/// Rules (and affinity sets and chains) of a new chain, the chain itself already added.
fn fill_chain(b: &mut String, name: &str, c: &ServiceChain) {
    let f = ipfam(c.v6);
    let proto = c.protocol.as_str();
    let n = c.backends.len();
    // The connection is the load balancer's: no hairpin masquerade by the edge (see LB_MARK).
    let _ = writeln!(b, "add rule {T} {name} ct mark set ct mark | {LB_MARK:#x}");
    if !c.affinity {
        let rule = if n == 1 {
            let be = &c.backends[0];
            format!(
                "meta l4proto {proto} dnat {f} to {}",
                dnat_target(be.addr, be.port)
            )
        } else {
            let elems: Vec<String> = c
                .backends
                .iter()
                .enumerate()
                .map(|(i, be)| format!("{i} : {} . {}", be.addr, be.port))
                .collect();
            format!(
                "meta l4proto {proto} dnat {f} to numgen random mod {n} map {{ {} }}",
                elems.join(", ")
            )
        };
        let _ = writeln!(b, "add rule {T} {name} {rule}");
        return;
    }
    for be in &c.backends {
        let set = affinity_set(name, &be.id);
        let sub = backend_chain(name, &be.id);
        let ty = if c.v6 { "ipv6_addr" } else { "ipv4_addr" };
        let _ = writeln!(
            b,
            "add set {T} {set} {{ type {ty}; flags dynamic,timeout; timeout {AFFINITY_TIMEOUT}; }}"
        );
        let _ = writeln!(b, "add chain {T} {sub}");
        let _ = writeln!(
            b,
            "add rule {T} {sub} update @{set} {{ {f} saddr }} meta l4proto {proto} dnat {f} to {}",
            dnat_target(be.addr, be.port)
        );
    }
    for be in &c.backends {
        let _ = writeln!(
            b,
            "add rule {T} {name} {f} saddr @{} goto {}",
            affinity_set(name, &be.id),
            backend_chain(name, &be.id)
        );
    }
    let elems: Vec<String> = c
        .backends
        .iter()
        .enumerate()
        .map(|(i, be)| format!("{i} : goto {}", backend_chain(name, &be.id)))
        .collect();
    let _ = writeln!(
        b,
        "add rule {T} {name} numgen random mod {n} vmap {{ {} }}",
        elems.join(", ")
    );
}

fn affinity_ids(c: &ServiceChain) -> BTreeSet<&str> {
    if c.affinity {
        c.backends.iter().map(|b| b.id.as_str()).collect()
    } else {
        BTreeSet::new()
    }
}

/// Empty a chain and its affinity chains (so nothing references what is deleted next).
fn flush_chain(b: &mut String, name: &str, c: &ServiceChain) {
    let _ = writeln!(b, "flush chain {T} {name}");
    for id in affinity_ids(c) {
        let _ = writeln!(b, "flush chain {T} {}", backend_chain(name, id));
    }
}

/// Delete affinity chains and sets of `old` that `new` (if any) does not keep; after flushing.
fn drop_affinity(b: &mut String, name: &str, old: &ServiceChain, new: Option<&ServiceChain>) {
    let keep = new.map(affinity_ids).unwrap_or_default();
    for id in affinity_ids(old).difference(&keep) {
        let _ = writeln!(b, "delete chain {T} {}", backend_chain(name, id));
        let _ = writeln!(b, "delete set {T} {}", affinity_set(name, id));
    }
}

fn vip_elem(k: &VipPort) -> String {
    format!("{} . {} . {}", k.vip, k.protocol.as_str(), k.port)
}

fn ingress_elem(k: &IngressKey) -> String {
    format!("{} . {}", k.protocol.as_str(), k.port)
}

fn vip_map(k: &VipPort) -> &'static str {
    if k.vip.is_ipv6() {
        "vips6"
    } else {
        "vips4"
    }
}

fn noprod_set(k: &VipPort) -> &'static str {
    if k.vip.is_ipv6() {
        "noprod6"
    } else {
        "noprod4"
    }
}

fn refused_set(k: &IngressKey) -> &'static str {
    if k.v6 {
        "noingress6"
    } else {
        "noingress4"
    }
}

fn hairpin_set(a: &IpAddr) -> &'static str {
    if a.is_ipv6() {
        "hairpin6"
    } else {
        "hairpin4"
    }
}

fn hairpin_elem(a: &IpAddr) -> String {
    format!("{a} . {a}")
}

fn src_map(pool: &IpNet) -> &'static str {
    if pool.addr().is_ipv6() {
        "ingress_src6"
    } else {
        "ingress_src4"
    }
}

fn ingress_map(k: &IngressKey) -> &'static str {
    if k.v6 {
        "ingress6"
    } else {
        "ingress4"
    }
}

/// Elements grouped per map/set, one statement each.
#[derive(Default)]
struct Elements(BTreeMap<&'static str, Vec<String>>);

impl Elements {
    fn push(&mut self, map: &'static str, elem: String) {
        self.0.entry(map).or_default().push(elem);
    }
    fn write(&self, b: &mut String, verb: &str) {
        for (map, elems) in &self.0 {
            // Bounded statements keep nft's parser from holding one huge line.
            for chunk in elems.chunks(2000) {
                let _ = writeln!(b, "{verb} element {T} {map} {{ {} }}", chunk.join(", "));
            }
        }
    }
}

fn skeleton(b: &mut String) {
    let m = INGRESS_MARK;
    let lb = LB_MARK;
    let lines = [
        format!("add map {T} vips4 {{ type ipv4_addr . inet_proto . inet_service : verdict; }}"),
        format!("add map {T} vips6 {{ type ipv6_addr . inet_proto . inet_service : verdict; }}"),
        format!("add map {T} ingress4 {{ type inet_proto . inet_service : verdict; }}"),
        format!("add map {T} ingress6 {{ type inet_proto . inet_service : verdict; }}"),
        format!("add set {T} noprod4 {{ type ipv4_addr . inet_proto . inet_service; }}"),
        format!("add set {T} noprod6 {{ type ipv6_addr . inet_proto . inet_service; }}"),
        format!("add set {T} noingress4 {{ type inet_proto . inet_service; }}"),
        format!("add set {T} noingress6 {{ type inet_proto . inet_service; }}"),
        format!("add set {T} hairpin4 {{ type ipv4_addr . ipv4_addr; }}"),
        format!("add set {T} hairpin6 {{ type ipv6_addr . ipv6_addr; }}"),
        format!("add map {T} ingress_src4 {{ type ipv4_addr : ipv4_addr; flags interval; }}"),
        format!("add map {T} ingress_src6 {{ type ipv6_addr : ipv6_addr; flags interval; }}"),
        // Before `inet ferrynet` (dstnat) and Docker's nat PREROUTING (-100): the first NAT of
        // a connection wins, and VIPs are never local addresses, so they meet no other DNAT.
        format!("add chain {T} prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; }}"),
        format!("add chain {T} output {{ type nat hook output priority -110; policy accept; }}"),
        format!("add chain {T} postrouting {{ type nat hook postrouting priority srcnat - 10; policy accept; }}"),
        format!("add chain {T} filter_forward {{ type filter hook forward priority filter - 10; policy accept; }}"),
        format!("add chain {T} filter_output {{ type filter hook output priority filter - 10; policy accept; }}"),
        format!("add chain {T} filter_input {{ type filter hook input priority filter - 10; policy accept; }}"),
        format!("add chain {T} vip"),
        format!("add chain {T} ingress"),
        format!("add chain {T} noprod"),
        format!("add rule {T} vip ip daddr . meta l4proto . th dport vmap @vips4"),
        format!("add rule {T} vip ip6 daddr . meta l4proto . th dport vmap @vips6"),
        // The packet mark picks masquerade in postrouting; the connection mark lets iptables
        // FORWARD (Docker's policy DROP) accept the connection both ways.
        format!("add rule {T} ingress meta nfproto ipv4 meta l4proto . th dport @ingress4 meta mark set meta mark | {m:#x} ct mark set ct mark | {m:#x}"),
        format!("add rule {T} ingress meta nfproto ipv6 meta l4proto . th dport @ingress6 meta mark set meta mark | {m:#x} ct mark set ct mark | {m:#x}"),
        format!("add rule {T} ingress meta nfproto ipv4 meta l4proto . th dport vmap @ingress4"),
        format!("add rule {T} ingress meta nfproto ipv6 meta l4proto . th dport vmap @ingress6"),
        format!("add rule {T} prerouting jump vip"),
        format!("add rule {T} prerouting fib daddr type local jump ingress"),
        format!("add rule {T} output jump vip"),
        // The host's own connections to its published ports, except to loopback addresses (a
        // DNAT to another host cannot leave with a loopback source).
        format!("add rule {T} output meta nfproto ipv4 ip daddr != 127.0.0.0/8 fib daddr type local jump ingress"),
        format!("add rule {T} output meta nfproto ipv6 ip6 daddr != ::1 fib daddr type local jump ingress"),
        // Return traffic of ingress connections sent to another host must come back through
        // this one; a producer on a local bridge (`fn-*`) sees the client's own address. A
        // producer in a multi-host network gets this host's gateway there (a missing map
        // element ends the rule); anything else the output device's address.
        format!("add rule {T} postrouting meta mark & {m:#x} != 0 oifname != \"fn-*\" meta nfproto ipv4 snat ip to ip daddr map @ingress_src4"),
        format!("add rule {T} postrouting meta mark & {m:#x} != 0 oifname != \"fn-*\" meta nfproto ipv6 snat ip6 to ip6 daddr map @ingress_src6"),
        format!("add rule {T} postrouting meta mark & {m:#x} != 0 oifname != \"fn-*\" masquerade"),
        // A producer its own service picked: its packet comes back to itself, which would
        // drop a packet from its own address, so it comes from the gateway instead. Every other
        // client keeps its address (the edge's hairpin masquerade skips LB_MARK connections).
        format!("add rule {T} postrouting ct mark & {lb:#x} != 0 ip saddr . ip daddr @hairpin4 masquerade"),
        format!("add rule {T} postrouting ct mark & {lb:#x} != 0 ip6 saddr . ip6 daddr @hairpin6 masquerade"),
        format!("add rule {T} noprod meta l4proto tcp reject with tcp reset"),
        format!("add rule {T} noprod reject"),
        format!("add rule {T} filter_forward ip daddr . meta l4proto . th dport @noprod4 goto noprod"),
        format!("add rule {T} filter_forward ip6 daddr . meta l4proto . th dport @noprod6 goto noprod"),
        format!("add rule {T} filter_output ip daddr . meta l4proto . th dport @noprod4 goto noprod"),
        format!("add rule {T} filter_output ip6 daddr . meta l4proto . th dport @noprod6 goto noprod"),
        // A `local` ingress port without a producer on this host: refused at once (new
        // connections only; a reply to the host's own connection may use the same port), so
        // an outside load balancer's health check moves to another host.
        format!("add rule {T} filter_input ct state new meta nfproto ipv4 meta l4proto . th dport @noingress4 goto noprod"),
        format!("add rule {T} filter_input ct state new meta nfproto ipv6 meta l4proto . th dport @noingress6 goto noprod"),
    ];
    for l in lines {
        b.push_str(&l);
        b.push('\n');
    }
}

/// The whole table for `st`, replacing whatever is there, as one transaction.
pub fn full_batch(st: &LbState) -> String {
    let mut b = String::new();
    // `add` first so the `delete` never meets a missing table.
    let _ = writeln!(b, "add table {T}");
    let _ = writeln!(b, "delete table {T}");
    let _ = writeln!(b, "add table {T}");
    skeleton(&mut b);
    for (name, c) in &st.chains {
        let _ = writeln!(b, "add chain {T} {name}");
        fill_chain(&mut b, name, c);
    }
    let mut add = Elements::default();
    for (k, chain) in &st.vips {
        add.push(vip_map(k), format!("{} : goto {chain}", vip_elem(k)));
    }
    for k in &st.no_producers {
        add.push(noprod_set(k), vip_elem(k));
    }
    for (k, chain) in &st.ingress {
        add.push(
            ingress_map(k),
            format!("{} : goto {chain}", ingress_elem(k)),
        );
    }
    for k in st.ingress_refused.keys() {
        add.push(refused_set(k), ingress_elem(k));
    }
    for a in &st.hairpin {
        add.push(hairpin_set(a), hairpin_elem(a));
    }
    for (pool, gw) in &st.ingress_src {
        add.push(src_map(pool), format!("{pool} : {gw}"));
    }
    add.write(&mut b, "add");
    b
}

/// The transaction that turns the programmed `old` into `new`; empty when they are equal.
/// Only changed chains are touched; chains are created before the map elements that lead to
/// them and deleted after the elements are gone.
pub fn diff_batch(old: &LbState, new: &LbState) -> String {
    let mut b = String::new();
    for (name, c) in &new.chains {
        match old.chains.get(name) {
            None => {
                let _ = writeln!(b, "add chain {T} {name}");
                fill_chain(&mut b, name, c);
            }
            Some(o) if o != c => {
                flush_chain(&mut b, name, o);
                drop_affinity(&mut b, name, o, Some(c));
                fill_chain(&mut b, name, c);
            }
            Some(_) => {}
        }
    }
    let (mut del, mut add) = (Elements::default(), Elements::default());
    for (k, chain) in &old.vips {
        if new.vips.get(k) != Some(chain) {
            del.push(vip_map(k), vip_elem(k));
        }
    }
    for (k, chain) in &new.vips {
        if old.vips.get(k) != Some(chain) {
            add.push(vip_map(k), format!("{} : goto {chain}", vip_elem(k)));
        }
    }
    for k in old.no_producers.difference(&new.no_producers) {
        del.push(noprod_set(k), vip_elem(k));
    }
    for k in new.no_producers.difference(&old.no_producers) {
        add.push(noprod_set(k), vip_elem(k));
    }
    for (k, chain) in &old.ingress {
        if new.ingress.get(k) != Some(chain) {
            del.push(ingress_map(k), ingress_elem(k));
        }
    }
    for (k, chain) in &new.ingress {
        if old.ingress.get(k) != Some(chain) {
            add.push(
                ingress_map(k),
                format!("{} : goto {chain}", ingress_elem(k)),
            );
        }
    }
    for k in old.ingress_refused.keys() {
        if !new.ingress_refused.contains_key(k) {
            del.push(refused_set(k), ingress_elem(k));
        }
    }
    for k in new.ingress_refused.keys() {
        if !old.ingress_refused.contains_key(k) {
            add.push(refused_set(k), ingress_elem(k));
        }
    }
    for a in old.hairpin.difference(&new.hairpin) {
        del.push(hairpin_set(a), hairpin_elem(a));
    }
    for a in new.hairpin.difference(&old.hairpin) {
        add.push(hairpin_set(a), hairpin_elem(a));
    }
    for (pool, gw) in &old.ingress_src {
        if new.ingress_src.get(pool) != Some(gw) {
            del.push(src_map(pool), pool.to_string());
        }
    }
    for (pool, gw) in &new.ingress_src {
        if old.ingress_src.get(pool) != Some(gw) {
            add.push(src_map(pool), format!("{pool} : {gw}"));
        }
    }
    del.write(&mut b, "delete");
    add.write(&mut b, "add");
    for (name, o) in &old.chains {
        if !new.chains.contains_key(name) {
            flush_chain(&mut b, name, o);
            drop_affinity(&mut b, name, o, None);
            let _ = writeln!(b, "delete chain {T} {name}");
        }
    }
    b
}

/// Remove the table.
pub fn delete_table() -> String {
    format!("delete table {T}\n")
}

/// Remove the table whether or not it exists (`add` first, so the `delete` always applies).
pub fn absent_batch() -> String {
    format!("add table {T}\ndelete table {T}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::keys as nkeys;
    use crate::service::{keys as skeys, IngressPort, Producer, Service, ServicePort};

    fn service(name: &str, vip: &str, affinity: bool) -> Service {
        Service {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            vips: vec![vip.parse().unwrap(), "fd00:96::5".parse().unwrap()],
            affinity,
            ..Service::named(name)
        }
    }
    fn producer(svc: &str, id: &str, host: &str, ips: &[&str]) -> Producer {
        Producer {
            service: svc.into(),
            id: id.into(),
            host: Some(host.into()),
            network: Some("fabric".into()),
            container: None,
            netns: None,
            addrs: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ports: [(80, 8080)].into(),
            check: None,
        }
    }
    fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }
    fn view(affinity: bool) -> DiscoveryView {
        let mut v = DiscoveryView::default();
        for h in ["h1", "h2"] {
            v.put(&nkeys::host(h), b"{}");
        }
        v.put(
            &skeys::service("web"),
            &enc(&service("web", "10.96.0.5", affinity)),
        );
        v.put(
            &skeys::producer("web", "a"),
            &enc(&producer("web", "a", "h1", &["10.20.0.2", "fd20::2"])),
        );
        v.put(
            &skeys::producer("web", "b"),
            &enc(&producer("web", "b", "h2", &["10.20.0.66"])),
        );
        v
    }

    #[test]
    fn one_chain_per_service_port_and_family_over_healthy_producers() {
        let st = desired(&view(false), "h1");
        let c4 = &st.chains["svc-web-tcp-80-4"];
        assert_eq!(c4.backends.len(), 2);
        assert_eq!(c4.backends[0].port, 8080);
        assert_eq!(st.chains["svc-web-tcp-80-6"].backends.len(), 1);
        assert_eq!(st.vips.len(), 2);
        let b = full_batch(&st);
        assert!(b.contains("add rule inet ferrynet-svc svc-web-tcp-80-4 meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.20.0.2 . 8080, 1 : 10.20.0.66 . 8080 }"), "{b}");
        assert!(
            b.contains("dnat ip6 to [fd20::2]:8080"),
            "single producer: plain dnat\n{b}"
        );
        assert!(b.contains(
            "add element inet ferrynet-svc vips4 { 10.96.0.5 . tcp . 80 : goto svc-web-tcp-80-4 }"
        ));
        // A dead host takes its producer out.
        let mut v = view(false);
        v.delete(&nkeys::host("h2"));
        assert_eq!(
            desired(&v, "h1").chains["svc-web-tcp-80-4"].backends.len(),
            1
        );
    }

    #[test]
    fn ingress_leaves_from_my_gateway_in_the_producers_network() {
        use crate::fabric::Backend as Fb;
        use crate::network::{FabricSpec, Network};
        let mut v = view(false);
        let multi = |name: &str, cidrs: &[&str]| {
            let mut n = Network::bridged(name, cidrs.iter().map(|c| c.parse().unwrap()));
            n.fabric = Some(FabricSpec {
                backend: Fb::Vxlan,
                vni: 7,
                block_v4: 26,
                block_v6: 122,
                encrypt: false,
            });
            n
        };
        v.put(
            &nkeys::network("fabric"),
            &enc(&multi("fabric", &["10.20.0.0/16", "fd20::/64"])),
        );
        // Single-host networks and pools without a block of mine get no element; an
        // overlapping pool (a bad record) is left out.
        v.put(
            &nkeys::network("single"),
            &enc(&Network::bridged(
                "single",
                ["10.50.0.0/24".parse().unwrap()],
            )),
        );
        v.put(
            &nkeys::network("other"),
            &enc(&multi("other", &["10.60.0.0/16"])),
        );
        v.put(
            &nkeys::network("overlap"),
            &enc(&multi("overlap", &["10.20.5.0/24"])),
        );
        for (net, block, host) in [
            ("fabric", "10.20.0.64/26", "h1"),
            ("fabric", "10.20.0.0/26", "h2"),
            ("fabric", "10.20.1.0/26", "h1"),
            ("other", "10.60.0.0/26", "h2"),
            ("overlap", "10.20.5.0/26", "h1"),
        ] {
            v.put(
                &nkeys::block(net, &block.parse().unwrap()),
                format!("{{\"host\":\"{host}\"}}").as_bytes(),
            );
        }
        let st = desired(&v, "h1");
        let want: BTreeMap<IpNet, IpAddr> = [(
            "10.20.0.0/16".parse().unwrap(),
            "10.20.0.65".parse().unwrap(),
        )]
        .into();
        assert_eq!(st.ingress_src, want);
        let b = full_batch(&st);
        assert!(
            b.contains("add element inet ferrynet-svc ingress_src4 { 10.20.0.0/16 : 10.20.0.65 }"),
            "{b}"
        );
        // The SNAT to the gateway comes before the masquerade that takes everything else.
        let snat = b
            .find("snat ip to ip daddr map @ingress_src4")
            .expect("snat rule");
        assert!(
            snat < b.find("oifname != \"fn-*\" masquerade").unwrap(),
            "{b}"
        );
        // A block of the other family appears: its element is added, nothing else changes.
        v.put(
            &nkeys::block("fabric", &"fd20::40/122".parse().unwrap()),
            br#"{"host":"h1"}"#,
        );
        let d = diff_batch(&st, &desired(&v, "h1"));
        assert_eq!(
            d,
            "add element inet ferrynet-svc ingress_src6 { fd20::/64 : fd20::41 }\n"
        );
    }

    #[test]
    fn a_host_without_services_keeps_no_table() {
        assert!(desired(&DiscoveryView::default(), "h1").is_empty());
        assert!(!desired(&view(false), "h1").is_empty());
        assert_eq!(absent_batch(), format!("add table {T}\ndelete table {T}\n"));
    }

    #[test]
    fn no_producers_means_reject_not_a_chain() {
        let mut v = view(false);
        v.delete(&skeys::producer("web", "a"));
        v.delete(&skeys::producer("web", "b"));
        let st = desired(&v, "h1");
        assert!(st.chains.is_empty());
        assert_eq!(st.no_producers.len(), 2);
        let b = full_batch(&st);
        assert!(b.contains("add element inet ferrynet-svc noprod4 { 10.96.0.5 . tcp . 80 }"));
        assert!(b.contains("noprod meta l4proto tcp reject with tcp reset"));
    }

    #[test]
    fn unchanged_chains_are_not_touched_and_changed_ones_are_replaced() {
        let mut v = view(false);
        let mut other = service("api", "10.96.0.9", false);
        other.vips.truncate(1);
        v.put(&skeys::service("api"), &enc(&other));
        v.put(
            &skeys::producer("api", "x"),
            &enc(&producer("api", "x", "h1", &["10.20.0.3"])),
        );
        let old = desired(&v, "h1");
        assert!(diff_batch(&old, &old).is_empty());
        v.delete(&skeys::producer("web", "b"));
        let new = desired(&v, "h1");
        let d = diff_batch(&old, &new);
        assert!(
            d.contains("flush chain inet ferrynet-svc svc-web-tcp-80-4"),
            "{d}"
        );
        assert!(d.contains("dnat ip to 10.20.0.2:8080"), "{d}");
        assert!(!d.contains("svc-api"), "api untouched:\n{d}");
        assert!(
            !d.contains("element inet ferrynet-svc vips"),
            "keys unchanged:\n{d}"
        );
        // Everything gone: elements before chains.
        v.delete(&skeys::producer("web", "a"));
        let gone = desired(&v, "h1");
        let d = diff_batch(&new, &gone);
        let del_elem = d.find("delete element inet ferrynet-svc vips4").unwrap();
        let del_chain = d
            .find("delete chain inet ferrynet-svc svc-web-tcp-80-4")
            .unwrap();
        assert!(del_elem < del_chain, "{d}");
        assert!(d.contains("add element inet ferrynet-svc noprod4 { 10.96.0.5 . tcp . 80 }"));
    }

    #[test]
    fn affinity_keeps_sets_of_remaining_producers() {
        let v = view(true);
        let old = desired(&v, "h1");
        let b = full_batch(&old);
        assert!(b.contains("add set inet ferrynet-svc aff-svc-web-tcp-80-4/a { type ipv4_addr; flags dynamic,timeout; timeout 3h; }"), "{b}");
        assert!(b.contains("add rule inet ferrynet-svc svc-web-tcp-80-4 ip saddr @aff-svc-web-tcp-80-4/a goto svc-web-tcp-80-4/a"), "{b}");
        assert!(b.contains("update @aff-svc-web-tcp-80-4/b { ip saddr } meta l4proto tcp dnat ip to 10.20.0.66:8080"), "{b}");
        let mut v2 = v.clone();
        v2.delete(&skeys::producer("web", "b"));
        let d = diff_batch(&old, &desired(&v2, "h1"));
        assert!(
            d.contains("delete set inet ferrynet-svc aff-svc-web-tcp-80-4/b"),
            "{d}"
        );
        assert!(
            !d.contains("delete set inet ferrynet-svc aff-svc-web-tcp-80-4/a"),
            "{d}"
        );
        // Flushes come before deletes.
        assert!(
            d.find("flush chain inet ferrynet-svc svc-web-tcp-80-4/b")
                .unwrap()
                < d.find("delete chain inet ferrynet-svc svc-web-tcp-80-4/b")
                    .unwrap()
        );
    }

    #[test]
    fn ingress_yields_to_published_ports_and_to_the_first_service() {
        let mut v = view(false);
        let mut web = service("web", "10.96.0.5", false);
        web.ingress.push(IngressPort {
            published: 8080,
            target: 80,
            protocol: Protocol::Tcp,
            local: false,
        });
        let mut zed = service("zed", "10.96.0.6", false);
        zed.vips.truncate(1);
        zed.ingress = web.ingress.clone();
        v.put(&skeys::service("web"), &enc(&web));
        v.put(&skeys::service("zed"), &enc(&zed));
        v.put(
            &skeys::producer("zed", "z"),
            &enc(&producer("zed", "z", "h2", &["10.20.0.70"])),
        );
        let st = desired(&v, "h1");
        let k = IngressKey {
            v6: false,
            protocol: Protocol::Tcp,
            port: 8080,
        };
        assert_eq!(st.ingress[&k], "svc-web-tcp-80-4");
        assert_eq!(st.conflicts.len(), 1, "{:?}", st.conflicts);
        assert!(full_batch(&st).contains(
            "add element inet ferrynet-svc ingress4 { tcp . 8080 : goto svc-web-tcp-80-4 }"
        ));
        // A container on h1 publishing 8080 keeps the port on h1 only.
        let ep = serde_json::json!({
            "network": "fabric", "containerId": "c", "ifname": "eth0", "ips": [],
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "host": "h1"
        });
        v.put(
            &nkeys::endpoint("fabric", "c", "eth0"),
            ep.to_string().as_bytes(),
        );
        assert!(!desired(&v, "h1").ingress.contains_key(&k));
        assert!(desired(&v, "h2").ingress.contains_key(&k));
    }

    fn local_ingress_view() -> DiscoveryView {
        let mut v = view(false);
        let mut web = service("web", "10.96.0.5", false);
        web.ingress.push(IngressPort {
            published: 8080,
            target: 80,
            protocol: Protocol::Tcp,
            local: true,
        });
        v.put(&skeys::service("web"), &enc(&web));
        v
    }

    #[test]
    fn local_ingress_leads_to_this_hosts_producers_or_is_refused() {
        let mut v = local_ingress_view();
        v.put(&nkeys::host("h3"), b"{}");
        let k4 = IngressKey {
            v6: false,
            protocol: Protocol::Tcp,
            port: 8080,
        };
        let k6 = IngressKey { v6: true, ..k4 };
        // h1 holds producer a (both families): its own chain of a alone, for both families.
        let h1 = desired(&v, "h1");
        assert_eq!(h1.ingress[&k4], "loc-web-tcp-80-4");
        assert_eq!(h1.ingress[&k6], "loc-web-tcp-80-6");
        let loc = &h1.chains["loc-web-tcp-80-4"];
        assert_eq!(loc.backends.len(), 1);
        assert_eq!(loc.backends[0].id, "a");
        // The VIP still spreads over every host.
        assert_eq!(h1.chains["svc-web-tcp-80-4"].backends.len(), 2);
        assert!(h1.ingress_refused.is_empty());
        // h2's producer b has no IPv6 address: IPv4 local, IPv6 refused.
        let h2 = desired(&v, "h2");
        assert_eq!(h2.ingress[&k4], "loc-web-tcp-80-4");
        assert!(h2.ingress_refused.contains_key(&k6), "{h2:?}");
        // h3 has no producer: refused in both families, no local chain.
        let h3 = desired(&v, "h3");
        assert!(h3.ingress.is_empty());
        assert_eq!(h3.ingress_refused.len(), 2);
        assert!(!h3.chains.keys().any(|c| c.starts_with("loc-")));
        let b = full_batch(&h3);
        assert!(
            b.contains("add element inet ferrynet-svc noingress4 { tcp . 8080 }"),
            "{b}"
        );
        assert!(b.contains("filter_input ct state new meta nfproto ipv4 meta l4proto . th dport @noingress4 goto noprod"));
        // A producer arriving on h3 turns refusal into a local chain in one transaction.
        let mut v3 = v.clone();
        v3.put(
            &skeys::producer("web", "c"),
            &enc(&producer("web", "c", "h3", &["10.20.0.130"])),
        );
        let d = diff_batch(&h3, &desired(&v3, "h3"));
        assert!(
            d.contains("delete element inet ferrynet-svc noingress4 { tcp . 8080 }"),
            "{d}"
        );
        assert!(
            d.contains("add chain inet ferrynet-svc loc-web-tcp-80-4"),
            "{d}"
        );
        assert!(d.contains("dnat ip to 10.20.0.130:8080"), "{d}");
        assert!(
            d.contains(
                "add element inet ferrynet-svc ingress4 { tcp . 8080 : goto loc-web-tcp-80-4 }"
            ),
            "{d}"
        );
        // Default ingress is unchanged: every producer, and nothing refused.
        let mut d = view(false);
        let mut web = service("web", "10.96.0.5", false);
        web.ingress.push(IngressPort {
            published: 8080,
            target: 80,
            protocol: Protocol::Tcp,
            local: false,
        });
        d.put(&skeys::service("web"), &enc(&web));
        d.put(&nkeys::host("h3"), b"{}");
        let st = desired(&d, "h3");
        assert_eq!(st.ingress[&k4], "svc-web-tcp-80-4");
        assert!(st.ingress_refused.is_empty());
    }

    #[test]
    fn service_connections_are_marked_and_only_a_producer_reaching_itself_is_masqueraded() {
        let st = desired(&view(false), "h1");
        let want: BTreeSet<IpAddr> = ["10.20.0.2", "10.20.0.66", "fd20::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(st.hairpin, want);
        let b = full_batch(&st);
        assert!(
            b.contains(
                "add rule inet ferrynet-svc svc-web-tcp-80-4 ct mark set ct mark | 0x800000"
            ),
            "{b}"
        );
        // The mark comes before the DNAT in the chain.
        assert!(
            b.find("svc-web-tcp-80-4 ct mark set").unwrap()
                < b.find("svc-web-tcp-80-4 meta l4proto tcp dnat").unwrap()
        );
        assert!(b.contains("add element inet ferrynet-svc hairpin4 { 10.20.0.2 . 10.20.0.2, 10.20.0.66 . 10.20.0.66 }"), "{b}");
        assert!(b.contains("add element inet ferrynet-svc hairpin6 { fd20::2 . fd20::2 }"));
        assert!(b.contains(
            "postrouting ct mark & 0x800000 != 0 ip saddr . ip daddr @hairpin4 masquerade"
        ));
        // No SNAT of service traffic otherwise: the only other masquerade is ingress's.
        assert_eq!(b.matches("masquerade").count(), 3, "{b}");
        // A producer leaving takes its pair out.
        let mut v = view(false);
        v.delete(&skeys::producer("web", "b"));
        let d = diff_batch(&st, &desired(&v, "h1"));
        assert!(
            d.contains("delete element inet ferrynet-svc hairpin4 { 10.20.0.66 . 10.20.0.66 }"),
            "{d}"
        );
    }

    #[test]
    fn ten_thousand_services_are_one_statement_per_thousands_of_elements() {
        let mut v = DiscoveryView::default();
        for i in 0..10_000u32 {
            let name = format!("s{i}");
            let mut s = service(&name, &format!("10.96.{}.{}", i / 250, 1 + i % 250), false);
            s.vips.truncate(1);
            v.put(&skeys::service(&name), &enc(&s));
            v.put(
                &skeys::producer(&name, "p"),
                &enc(&producer(&name, "p", "h1", &["10.20.0.2"])),
            );
        }
        v.put(&nkeys::host("h1"), b"{}");
        let st = desired(&v, "h1");
        assert_eq!(st.chains.len(), 10_000);
        let b = full_batch(&st);
        assert_eq!(b.matches("add element inet ferrynet-svc vips4").count(), 5);
    }
}
