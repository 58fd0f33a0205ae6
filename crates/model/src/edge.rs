//! The edge as nftables batches (nft's own syntax; one batch is one atomic transaction).
//!
//! One table, `inet ferrynet`, covers IPv4 and IPv6. Published ports are elements of four maps,
//! so a DNAT is one hash lookup whatever the number of ports, and a container's ADD or DEL only
//! adds or removes elements: the chains are rewritten only when the set of networks changes.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::lb::LB_MARK;
use crate::portmap::PortMapping;

/// The table's name (family `inet`).
pub const TABLE: &str = "ferrynet";
/// The named counter of packets dropped by network isolation.
pub const ISOLATION_COUNTER: &str = "isolation";
/// Published ports on every host address, IPv4: `l4proto . dport : addr . port`.
pub const PM4_ANY: &str = "pm4_any";
/// Published ports on one host address, IPv4: `daddr . l4proto . dport : addr . port`.
pub const PM4_IP: &str = "pm4_ip";
/// IPv6 counterpart of [`PM4_ANY`].
pub const PM6_ANY: &str = "pm6_any";
/// IPv6 counterpart of [`PM4_IP`].
pub const PM6_IP: &str = "pm6_ip";
/// The set of ferrynet bridge names.
pub const BRIDGES: &str = "bridges";
/// Every bridged network's IPv4 pool (interval set): the sources and destinations isolation
/// looks at.
pub const NETS4: &str = "nets4";
/// IPv6 counterpart of [`NETS4`].
pub const NETS6: &str = "nets6";
/// Same-network pairs, IPv4: `saddr . daddr` intervals, one element per pair of subnets of
/// one network.
pub const SAME4: &str = "same4";
/// IPv6 counterpart of [`SAME4`].
pub const SAME6: &str = "same6";
/// The input filter chain that keeps 127.0.0.0/8 and ::1 on `lo`. Forwarded traffic (the
/// DNATed `127.0.0.1:PORT` case) is judged in `forward` instead, so container-to-container
/// packets never pass it.
pub const LOCALNET: &str = "localnet";
/// Loopback addresses that never arrive from outside `lo` (the `localnet` chain's drops).
const LOOPBACK_MATCHES: [&str; 4] = [
    "ip daddr 127.0.0.0/8",
    "ip saddr 127.0.0.0/8",
    "ip6 daddr ::1",
    "ip6 saddr ::1",
];
/// The base chains.
pub const CHAINS: [&str; 5] = ["prerouting", "output", "postrouting", "forward", LOCALNET];

/// The edge's view of one bridged network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeNetwork {
    /// Network name (for comments).
    pub name: String,
    /// Its bridge.
    pub bridge: String,
    /// Its subnets.
    pub subnets: Vec<IpNet>,
    /// No traffic in or out of the network.
    pub internal: bool,
    /// Masquerade traffic leaving the host.
    pub ip_masq: bool,
    /// Routed endpoints (no bridge): its containers' traffic enters and leaves the host through
    /// their own `fnv…` ports, so device-based rules match those instead of the bridge.
    pub routed: bool,
}

/// Every container port's host end (routed networks' ports are routed interfaces).
const PORTS: &str = "\"fnv*\"";

/// One published port bound to one container address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedPort {
    /// The mapping.
    pub mapping: PortMapping,
    /// The container address it forwards to.
    pub container_ip: IpAddr,
}

/// Pair every mapping with the container's address of each matching family: a mapping on one
/// host address (or on `0.0.0.0` / `::`, every address of one family) goes to the container
/// address of that family; a mapping on every address goes to each family the container has.
pub fn published_ports(mappings: &[PortMapping], container_ips: &[IpAddr]) -> Vec<PublishedPort> {
    let mut out = Vec::new();
    for m in mappings {
        for ip in container_ips {
            let fits = match m.host_ip {
                None => true,
                Some(h) => h.is_ipv4() == ip.is_ipv4(),
            };
            // One address per family is enough: the first of each.
            if fits
                && !out.iter().any(|p: &PublishedPort| {
                    p.mapping == *m && p.container_ip.is_ipv4() == ip.is_ipv4()
                })
            {
                out.push(PublishedPort {
                    mapping: *m,
                    container_ip: *ip,
                });
            }
        }
    }
    out
}

/// The host address a mapping's element is keyed by: None for "any" (`""`, `0.0.0.0`, `::`),
/// whose elements go to the `*_any` maps; an unspecified address as a key would match nothing.
fn keyed_host_ip(m: &PortMapping) -> Option<IpAddr> {
    m.host_ip.filter(|h| !h.is_unspecified())
}

fn map_of(p: &PublishedPort) -> &'static str {
    match (
        p.container_ip.is_ipv4(),
        keyed_host_ip(&p.mapping).is_some(),
    ) {
        (true, false) => PM4_ANY,
        (true, true) => PM4_IP,
        (false, false) => PM6_ANY,
        (false, true) => PM6_IP,
    }
}

fn element(p: &PublishedPort) -> String {
    let m = &p.mapping;
    let key = match keyed_host_ip(m) {
        Some(h) => format!("{h} . {} . {}", m.protocol.as_str(), m.host_port),
        None => format!("{} . {}", m.protocol.as_str(), m.host_port),
    };
    format!("{key} : {} . {}", p.container_ip, m.container_port)
}

fn elements_by_map(ports: &[PublishedPort]) -> Vec<(&'static str, Vec<String>)> {
    let mut out: Vec<(&'static str, Vec<String>)> = Vec::new();
    for p in ports {
        let map = map_of(p);
        match out.iter_mut().find(|(n, _)| *n == map) {
            Some((_, v)) => v.push(element(p)),
            None => out.push((map, vec![element(p)])),
        }
    }
    out
}

/// The address sets of isolation: every network's pool, and the same-network pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IsolationSets {
    /// Pool prefixes, IPv4.
    pub nets4: Vec<IpNet>,
    /// Pool prefixes, IPv6.
    pub nets6: Vec<IpNet>,
    /// `(source, destination)` prefixes of one network, IPv4.
    pub same4: Vec<(IpNet, IpNet)>,
    /// `(source, destination)` prefixes of one network, IPv6.
    pub same6: Vec<(IpNet, IpNet)>,
}

/// The isolation sets of `networks` (all of them, internal ones included). Pools never overlap
/// in a consistent store; a subnet overlapping one taken earlier (by input order) is left out,
/// so a bad record cannot make the whole transaction fail (nft refuses overlapping intervals).
pub fn isolation_sets(networks: &[EdgeNetwork]) -> IsolationSets {
    let mut kept: Vec<(usize, IpNet)> = Vec::new();
    for (i, n) in networks.iter().enumerate() {
        for s in &n.subnets {
            let s = s.trunc();
            if !kept.iter().any(|(_, k)| k.contains(&s) || s.contains(k)) {
                kept.push((i, s));
            }
        }
    }
    let mut out = IsolationSets::default();
    for (i, s) in &kept {
        let v4 = s.addr().is_ipv4();
        if v4 {
            out.nets4.push(*s);
        } else {
            out.nets6.push(*s);
        }
        for (j, d) in &kept {
            if i == j && d.addr().is_ipv4() == v4 {
                if v4 {
                    out.same4.push((*s, *d));
                } else {
                    out.same6.push((*s, *d));
                }
            }
        }
    }
    out
}

fn prefixes(v: &[IpNet]) -> String {
    let list: Vec<String> = v.iter().map(|p| p.to_string()).collect();
    list.join(", ")
}

fn pairs(v: &[(IpNet, IpNet)]) -> String {
    let list: Vec<String> = v.iter().map(|(s, d)| format!("{s} . {d}")).collect();
    list.join(", ")
}

fn q(ifname: &str) -> String {
    // Interface names are validated (letters, digits, `_ . -`), so quoting is enough.
    format!("\"{ifname}\"")
}

/// The skeleton: table, maps, sets, chains and their rules for `networks`. Re-applying it is
/// idempotent; `add` keeps existing map elements, while chains are flushed and refilled in the
/// same transaction, so a change of networks replaces the rules atomically.
pub fn base_ruleset(networks: &[EdgeNetwork]) -> String {
    let t = format!("inet {TABLE}");
    let mut b = String::new();
    declarations(&t, &mut b);
    flush_and_fill(&t, networks, &mut b);
    localnet_rules(&t, &mut b);
    dnat_rules(&t, &mut b);
    postrouting_rules(&t, networks, &mut b);
    forward_rules(&t, networks, &mut b);
    b
}

/// One line of a batch.
fn line(b: &mut String, s: String) {
    b.push_str(&s);
    b.push('\n');
}

/// The table, its maps, sets, counter and base chains (`add` keeps what exists).
fn declarations(t: &str, b: &mut String) {
    line(b, format!("add table {t}"));
    line(
        b,
        format!(
        "add map {t} {PM4_ANY} {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}"
    ),
    );
    line(b, format!("add map {t} {PM4_IP} {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}"));
    line(
        b,
        format!(
        "add map {t} {PM6_ANY} {{ type inet_proto . inet_service : ipv6_addr . inet_service; }}"
    ),
    );
    line(b, format!("add map {t} {PM6_IP} {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }}"));
    line(b, format!("add set {t} {BRIDGES} {{ type ifname; }}"));
    // Isolation drops are counted by name, for the agent's drop metrics.
    line(b, format!("add counter {t} {ISOLATION_COUNTER}"));
    line(
        b,
        format!("add set {t} {NETS4} {{ type ipv4_addr; flags interval; }}"),
    );
    line(
        b,
        format!("add set {t} {NETS6} {{ type ipv6_addr; flags interval; }}"),
    );
    line(
        b,
        format!("add set {t} {SAME4} {{ type ipv4_addr . ipv4_addr; flags interval; }}"),
    );
    line(
        b,
        format!("add set {t} {SAME6} {{ type ipv6_addr . ipv6_addr; flags interval; }}"),
    );
    line(
        b,
        format!(
        "add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"
    ),
    );
    line(
        b,
        format!("add chain {t} output {{ type nat hook output priority -100; policy accept; }}"),
    );
    line(
        b,
        format!(
        "add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
    ),
    );
    line(
        b,
        format!(
            "add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}"
        ),
    );
    line(
        b,
        format!(
            "add chain {t} {LOCALNET} {{ type filter hook input priority filter; policy accept; }}"
        ),
    );
}

/// The chains emptied and the sets refilled for `networks`.
fn flush_and_fill(t: &str, networks: &[EdgeNetwork], b: &mut String) {
    for c in CHAINS {
        line(b, format!("flush chain {t} {c}"));
    }
    for set in [BRIDGES, NETS4, NETS6, SAME4, SAME6] {
        line(b, format!("flush set {t} {set}"));
    }
    if !networks.is_empty() {
        let names: Vec<String> = networks.iter().map(|n| q(&n.bridge)).collect();
        line(
            b,
            format!("add element {t} {BRIDGES} {{ {} }}", names.join(", ")),
        );
    }
    let sets = isolation_sets(networks);
    if !sets.nets4.is_empty() {
        line(
            b,
            format!("add element {t} {NETS4} {{ {} }}", prefixes(&sets.nets4)),
        );
        line(
            b,
            format!("add element {t} {SAME4} {{ {} }}", pairs(&sets.same4)),
        );
    }
    if !sets.nets6.is_empty() {
        line(
            b,
            format!("add element {t} {NETS6} {{ {} }}", prefixes(&sets.nets6)),
        );
        line(
            b,
            format!("add element {t} {SAME6} {{ {} }}", pairs(&sets.same6)),
        );
    }
}

/// The `localnet` chain (input): loopback stays local.
fn localnet_rules(t: &str, b: &mut String) {
    // Loopback stays local (CVE-2020-8558): bridges have route_localnet=1 so the host can reach
    // its 127.0.0.1:PORT published ports, which would also let anything on a bridge (or on an
    // interface someone else gave route_localnet) reach 127.0.0.1. A new flow to or from
    // loopback arriving on anything but lo is dropped: here when it is for the host, in
    // `forward` when a published 127.0.0.1 port DNATed it to a container. Replies (the host's own
    // 127.0.0.1:PORT hairpin comes back from the bridge to 127.0.0.1) are established. Input
    // only sees the host's own traffic, so container-to-container packets pay nothing.
    line(b, format!("add rule {t} {LOCALNET} iif \"lo\" accept"));
    line(
        b,
        format!("add rule {t} {LOCALNET} ct state established,related accept"),
    );
    for m in LOOPBACK_MATCHES {
        line(
            b,
            format!("add rule {t} {LOCALNET} {m} drop comment \"loopback from outside lo\""),
        );
    }
}

/// DNAT of published ports, for traffic arriving and for the host's own.
fn dnat_rules(t: &str, b: &mut String) {
    // DNAT of published ports: a host-address-specific mapping wins over an any-address one.
    let dnat = [
        (
            "ipv4",
            "ip",
            format!("ip daddr . meta l4proto . th dport map @{PM4_IP}"),
        ),
        (
            "ipv4",
            "ip",
            format!("meta l4proto . th dport map @{PM4_ANY}"),
        ),
        (
            "ipv6",
            "ip6",
            format!("ip6 daddr . meta l4proto . th dport map @{PM6_IP}"),
        ),
        (
            "ipv6",
            "ip6",
            format!("meta l4proto . th dport map @{PM6_ANY}"),
        ),
    ];
    for chain in ["prerouting", "output"] {
        for (nfproto, fam, lookup) in &dnat {
            line(b, format!("add rule {t} {chain} fib daddr type local meta nfproto {nfproto} dnat {fam} to {lookup}"));
        }
    }
}

/// Hairpin and outbound masquerade per network, and the host's 127.0.0.1 hairpin.
fn postrouting_rules(t: &str, networks: &[EdgeNetwork], b: &mut String) {
    for n in networks {
        let br = q(&n.bridge);
        // Hairpin: DNATed traffic from this network back into it must return through the
        // host, so its source becomes the gateway. Matched by source subnet, not input
        // interface: frames that br_netfilter bridges reach POSTROUTING with no input device.
        // Internal networks publish no ports, so they need no hairpin. Service connections
        // (VIPs, ingress: the load balancer's `LB_MARK`) keep their client's address: the
        // bridge calls the IP hooks, so the host still un-DNATs a bridged reply, and the load
        // balancer masquerades only a producer that reached itself.
        // A routed network's DNATed traffic leaves through the container's own port.
        let out = if n.routed {
            PORTS.to_string()
        } else {
            br.clone()
        };
        for s in n.subnets.iter().filter(|_| !n.internal) {
            let fam = if s.addr().is_ipv4() { "ip" } else { "ip6" };
            line(b, format!("add rule {t} postrouting oifname {out} {fam} saddr {s} ct status dnat ct mark & {LB_MARK:#x} == 0 masquerade comment \"hairpin {}\"", n.name));
        }
        if n.ip_masq && !n.internal {
            // Traffic to the network's own subnets keeps its source: on a multi-host network it
            // leaves through the underlay or a tunnel towards a container on another host.
            for s in &n.subnets {
                let fam = if s.addr().is_ipv4() { "ip" } else { "ip6" };
                let own: Vec<String> = n
                    .subnets
                    .iter()
                    .filter(|o| o.addr().is_ipv4() == s.addr().is_ipv4())
                    .map(|o| o.to_string())
                    .collect();
                let own = own.join(", ");
                // Nor does traffic to another ferrynet network's container on this host (a
                // bridge, or a routed network's port).
                line(b, format!("add rule {t} postrouting {fam} saddr {s} {fam} daddr != {{ {own} }} oifname != @{BRIDGES} oifname != {PORTS} masquerade comment \"outbound {}\"", n.name));
            }
        }
    }
    // The host reaching 127.0.0.1:PORT: DNATed out of a bridge, the loopback source must go.
    line(
        b,
        format!("add rule {t} postrouting ip saddr 127.0.0.0/8 oifname @{BRIDGES} masquerade"),
    );
    line(
        b,
        format!("add rule {t} postrouting ip saddr 127.0.0.0/8 oifname {PORTS} masquerade"),
    );
}

/// The `forward` chain: established first, loopback, internal networks, published ports,
/// isolation, then ferrynet's bridges.
fn forward_rules(t: &str, networks: &[EdgeNetwork], b: &mut String) {
    line(
        b,
        format!("add rule {t} forward ct state established,related accept"),
    );
    for fam in ["ip", "ip6"] {
        let lo = if fam == "ip" { "127.0.0.0/8" } else { "::1" };
        for dir in ["daddr", "saddr"] {
            line(b, format!("add rule {t} forward ct original {fam} {dir} {lo} drop comment \"loopback from outside lo\""));
        }
    }
    for n in networks.iter().filter(|n| n.internal && n.routed) {
        internal_routed_rules(t, n, b);
    }
    for n in networks.iter().filter(|n| n.internal && !n.routed) {
        let br = q(&n.bridge);
        line(
            b,
            format!(
                "add rule {t} forward iifname {br} oifname != {br} drop comment \"internal {}\"",
                n.name
            ),
        );
        line(
            b,
            format!(
                "add rule {t} forward oifname {br} iifname != {br} drop comment \"internal {}\"",
                n.name
            ),
        );
    }
    // A published port is reachable by whoever reaches the host, other networks included.
    line(b, format!("add rule {t} forward ct status dnat accept"));
    // Isolation by the identity of the source network, not by device: a new connection from
    // one network's pool to another network's pool is dropped on every host it crosses (the
    // sending host, where it leaves a bridge, and the receiving one, where it comes from the
    // underlay or a tunnel). Destination first: traffic to the outside stops at one lookup.
    line(b, format!("add rule {t} forward ip daddr @{NETS4} ip saddr @{NETS4} ip saddr . ip daddr != @{SAME4} counter name {ISOLATION_COUNTER} drop comment \"isolate networks\""));
    line(b, format!("add rule {t} forward ip6 daddr @{NETS6} ip6 saddr @{NETS6} ip6 saddr . ip6 daddr != @{SAME6} counter name {ISOLATION_COUNTER} drop comment \"isolate networks\""));
    for n in networks.iter().filter(|n| !n.internal && !n.routed) {
        let br = q(&n.bridge);
        line(b, format!("add rule {t} forward iifname {br} oifname @{BRIDGES} oifname != {br} counter name {ISOLATION_COUNTER} drop comment \"isolate {}\"", n.name));
    }
    line(b, format!("add rule {t} forward iifname @{BRIDGES} accept"));
    line(b, format!("add rule {t} forward oifname @{BRIDGES} accept"));
}

/// An internal routed network: no bridge to match, and its containers' ports (`fnv…`) are
/// named per container, so the network is matched by its addresses. A packet from its
/// subnets may only go to them, one to them only come from them, and from a container port:
/// the routed guard makes sure a port's source is its container's own, while a packet from
/// the underlay or another interface could carry any source.
fn internal_routed_rules(t: &str, n: &EdgeNetwork, b: &mut String) {
    for v6 in [false, true] {
        let own: Vec<String> = n
            .subnets
            .iter()
            .filter(|s| s.addr().is_ipv6() == v6)
            .map(|s| s.trunc().to_string())
            .collect();
        if own.is_empty() {
            continue;
        }
        let fam = if v6 { "ip6" } else { "ip" };
        let set = format!("{{ {} }}", own.join(", "));
        let name = &n.name;
        line(b, format!("add rule {t} forward {fam} saddr {set} {fam} daddr != {set} drop comment \"internal {name}\""));
        line(b, format!("add rule {t} forward {fam} daddr {set} {fam} saddr != {set} drop comment \"internal {name}\""));
        line(b, format!("add rule {t} forward {fam} daddr {set} iifname != {PORTS} drop comment \"internal {name}\""));
    }
}

/// Publish ports: element adds, one transaction.
pub fn add_ports(ports: &[PublishedPort]) -> String {
    let mut b = String::new();
    for (map, elems) in elements_by_map(ports) {
        let _ = writeln!(
            b,
            "add element inet {TABLE} {map} {{ {} }}",
            elems.join(", ")
        );
    }
    b
}

/// Withdraw ports, succeeding when some are already gone: each element is first added (a no-op
/// when present) and then deleted, in one transaction, so the delete never meets a missing
/// element.
pub fn remove_ports_tolerant(ports: &[PublishedPort]) -> String {
    let mut b = String::new();
    for (map, elems) in elements_by_map(ports) {
        let list = elems.join(", ");
        let _ = writeln!(b, "add element inet {TABLE} {map} {{ {list} }}");
        let _ = writeln!(b, "delete element inet {TABLE} {map} {{ {list} }}");
    }
    b
}

/// Remove the whole table (uninstall).
pub fn delete_table() -> String {
    format!("delete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::Protocol;

    fn net(name: &str, cidr: &str, internal: bool) -> EdgeNetwork {
        EdgeNetwork {
            name: name.into(),
            bridge: format!("fn-{name}"),
            subnets: vec![cidr.parse().unwrap()],
            internal,
            ip_masq: !internal,
            routed: false,
        }
    }
    fn pm(port: u16, host_ip: Option<&str>, proto: Protocol) -> PortMapping {
        PortMapping {
            host_port: port,
            container_port: 80,
            protocol: proto,
            host_ip: host_ip.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn skeleton_never_flushes_or_deletes_maps() {
        let r = base_ruleset(&[net("a", "10.1.0.0/24", false)]);
        for m in [PM4_ANY, PM4_IP, PM6_ANY, PM6_IP] {
            assert!(r.contains(&format!("add map inet ferrynet {m}")));
            assert!(!r.contains(&format!("flush map inet ferrynet {m}")));
            assert!(!r.contains(&format!("delete map inet ferrynet {m}")));
        }
        assert!(r.contains("flush chain inet ferrynet forward"));
    }

    #[test]
    fn masquerade_only_for_non_internal_networks() {
        let r = base_ruleset(&[
            net("a", "10.1.0.0/24", false),
            net("i", "10.2.0.0/24", true),
        ]);
        assert!(r.contains(
            "ip saddr 10.1.0.0/24 ip daddr != { 10.1.0.0/24 } oifname != @bridges oifname != \"fnv*\" masquerade"
        ));
        assert!(r.contains(
            "oifname \"fn-a\" ip saddr 10.1.0.0/24 ct status dnat ct mark & 0x800000 == 0 masquerade"
        ));
        assert!(!r.contains("ip saddr 10.2.0.0/24"));
        assert!(r.contains("iifname \"fn-i\" oifname != \"fn-i\" drop"));
        assert!(r.contains(
            "iifname \"fn-a\" oifname @bridges oifname != \"fn-a\" counter name isolation drop"
        ));
        assert!(r.contains("add element inet ferrynet bridges { \"fn-a\", \"fn-i\" }"));
        // Internal drops come before the accept of DNATed traffic.
        assert!(r.find("internal i").unwrap() < r.find("ct status dnat accept").unwrap());
    }

    #[test]
    fn internal_routed_networks_are_matched_by_address() {
        let mut i = net("ri", "10.3.0.0/24", true);
        i.routed = true;
        i.subnets.push("fd03::/64".parse().unwrap());
        let r = base_ruleset(&[net("a", "10.1.0.0/24", false), i]);
        for rule in [
            "forward ip saddr { 10.3.0.0/24 } ip daddr != { 10.3.0.0/24 } drop comment \"internal ri\"",
            "forward ip daddr { 10.3.0.0/24 } ip saddr != { 10.3.0.0/24 } drop comment \"internal ri\"",
            "forward ip daddr { 10.3.0.0/24 } iifname != \"fnv*\" drop comment \"internal ri\"",
            "forward ip6 saddr { fd03::/64 } ip6 daddr != { fd03::/64 } drop comment \"internal ri\"",
            "forward ip6 daddr { fd03::/64 } iifname != \"fnv*\" drop comment \"internal ri\"",
        ] {
            assert!(r.contains(rule), "{rule}\n{r}");
        }
        // No masquerade or hairpin for it, and its drops come before the accept of DNATed
        // traffic (a published port would otherwise open it).
        assert!(!r.contains("saddr 10.3.0.0/24 ct status dnat"));
        assert!(!r.contains("outbound ri"));
        assert!(r.find("internal ri").unwrap() < r.find("ct status dnat accept").unwrap());
    }

    #[test]
    fn ipv6_subnets_use_ip6_matches() {
        let r = base_ruleset(&[net("a", "fd00:1::/64", false)]);
        assert!(r.contains(
            "ip6 saddr fd00:1::/64 ip6 daddr != { fd00:1::/64 } oifname != @bridges oifname != \"fnv*\" masquerade"
        ));
    }

    #[test]
    fn no_networks_still_valid() {
        let r = base_ruleset(&[]);
        assert!(!r.contains("add element"));
        assert!(r.contains("dnat ip to meta l4proto . th dport map @pm4_any"));
    }

    #[test]
    fn unspecified_host_ips_publish_on_every_address_of_their_family() {
        let ips: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let ports = published_ports(
            &[
                pm(8080, Some("0.0.0.0"), Protocol::Tcp),
                pm(8081, Some("::"), Protocol::Tcp),
                pm(8082, None, Protocol::Tcp),
            ],
            &ips,
        );
        let b = add_ports(&ports);
        assert!(
            b.contains("add element inet ferrynet pm4_any { tcp . 8080 : 10.1.0.2 . 80, tcp . 8082 : 10.1.0.2 . 80 }"),
            "{b}"
        );
        assert!(
            b.contains("add element inet ferrynet pm6_any { tcp . 8081 : fd00::2 . 80, tcp . 8082 : fd00::2 . 80 }"),
            "{b}"
        );
        // No element keyed by an unspecified address (it would match no packet), and each
        // family's "any" stays in its family.
        assert!(!b.contains("0.0.0.0") && !b.contains(":: ."), "{b}");
        assert!(!b.contains("pm4_ip") && !b.contains("pm6_ip"), "{b}");
        assert_eq!(ports.len(), 4, "{ports:?}");
        // Removal addresses the same elements.
        let r = remove_ports_tolerant(&ports);
        assert!(
            r.contains("tcp . 8080 : 10.1.0.2 . 80") && !r.contains("0.0.0.0"),
            "{r}"
        );
        // A v6-only container has nothing to publish on 0.0.0.0.
        let v6: Vec<IpAddr> = vec!["fd00::2".parse().unwrap()];
        assert!(published_ports(&[pm(8080, Some("0.0.0.0"), Protocol::Tcp)], &v6).is_empty());
    }

    #[test]
    fn elements_land_in_the_right_maps() {
        let ips: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let ports = published_ports(
            &[
                pm(8080, None, Protocol::Tcp),
                pm(53, Some("10.250.0.1"), Protocol::Udp),
                pm(443, Some("fd00::1"), Protocol::Tcp),
            ],
            &ips,
        );
        assert_eq!(ports.len(), 4, "{ports:?}");
        let b = add_ports(&ports);
        assert!(
            b.contains("add element inet ferrynet pm4_any { tcp . 8080 : 10.1.0.2 . 80 }"),
            "{b}"
        );
        assert!(
            b.contains("add element inet ferrynet pm6_any { tcp . 8080 : fd00::2 . 80 }"),
            "{b}"
        );
        assert!(
            b.contains(
                "add element inet ferrynet pm4_ip { 10.250.0.1 . udp . 53 : 10.1.0.2 . 80 }"
            ),
            "{b}"
        );
        assert!(
            b.contains("add element inet ferrynet pm6_ip { fd00::1 . tcp . 443 : fd00::2 . 80 }"),
            "{b}"
        );
    }

    #[test]
    fn tolerant_removal_adds_then_deletes() {
        let ports = published_ports(
            &[pm(8080, None, Protocol::Tcp)],
            &["10.1.0.2".parse().unwrap()],
        );
        let b = remove_ports_tolerant(&ports);
        let add = b.find("add element").unwrap();
        let del = b.find("delete element").unwrap();
        assert!(add < del);
        assert!(add_ports(&[]).is_empty());
    }

    #[test]
    fn routed_networks_match_their_ports_not_a_bridge() {
        let routed = EdgeNetwork {
            routed: true,
            ..net("r", "10.7.0.0/24", false)
        };
        let b = base_ruleset(&[net("a", "10.1.0.0/24", false), routed]);
        // Hairpin through the container's own port; the bridged network keeps its bridge.
        assert!(b.contains("postrouting oifname \"fnv*\" ip saddr 10.7.0.0/24 ct status dnat"));
        assert!(b.contains("postrouting oifname \"fn-a\" ip saddr 10.1.0.0/24 ct status dnat"));
        // No per-bridge isolation line for it (its packets never come from the dummy); the
        // address sets hold its pool.
        assert!(!b.contains("iifname \"fn-r\" oifname @bridges"));
        assert!(b.contains("add element inet ferrynet nets4 { 10.1.0.0/24, 10.7.0.0/24 }"));
        // Traffic to a routed neighbour on this host keeps its source.
        assert!(
            b.contains("oifname != @bridges oifname != \"fnv*\" masquerade comment \"outbound r\"")
        );
        assert!(b.contains("ip saddr 127.0.0.0/8 oifname \"fnv*\" masquerade"));
    }

    fn dual(name: &str, v4: &str, v6: &str) -> EdgeNetwork {
        EdgeNetwork {
            subnets: vec![v4.parse().unwrap(), v6.parse().unwrap()],
            ..net(name, v4, false)
        }
    }

    #[test]
    fn isolation_pairs_only_subnets_of_one_network() {
        let mut a = dual("a", "10.1.0.0/16", "fd01::/64");
        a.subnets.push("10.9.0.0/24".parse().unwrap());
        let b = dual("b", "10.2.0.0/16", "fd02::/64");
        let s = isolation_sets(&[a, b]);
        let p = |x: &str| -> IpNet { x.parse().unwrap() };
        assert_eq!(
            s.nets4,
            vec![p("10.1.0.0/16"), p("10.9.0.0/24"), p("10.2.0.0/16")]
        );
        assert_eq!(s.nets6, vec![p("fd01::/64"), p("fd02::/64")]);
        // Every pair within a network, in both directions; none across networks.
        assert_eq!(s.same4.len(), 4 + 1);
        assert!(s.same4.contains(&(p("10.9.0.0/24"), p("10.1.0.0/16"))));
        assert!(s.same4.contains(&(p("10.1.0.0/16"), p("10.9.0.0/24"))));
        assert!(!s.same4.iter().any(|(x, y)| (x.contains(&p("10.1.0.1/32"))
            && y.contains(&p("10.2.0.1/32")))
            || (x.contains(&p("10.2.0.1/32")) && y.contains(&p("10.1.0.1/32")))));
        assert_eq!(
            s.same6,
            vec![
                (p("fd01::/64"), p("fd01::/64")),
                (p("fd02::/64"), p("fd02::/64"))
            ]
        );
    }

    #[test]
    fn overlapping_subnet_of_a_bad_record_is_left_out() {
        let a = net("a", "10.1.0.0/16", false);
        let bad = dual("bad", "10.1.2.0/24", "fd09::/64");
        let s = isolation_sets(&[a, bad]);
        assert_eq!(s.nets4, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(s.same4.len(), 1);
        assert_eq!(s.nets6.len(), 1, "its other subnet stays");
    }

    #[test]
    fn isolation_rule_comes_after_dnat_accept_and_before_bridge_accepts() {
        let r = base_ruleset(&[
            dual("a", "10.1.0.0/16", "fd01::/64"),
            dual("b", "10.2.0.0/16", "fd02::/64"),
        ]);
        assert!(
            r.contains("add element inet ferrynet nets4 { 10.1.0.0/16, 10.2.0.0/16 }"),
            "{r}"
        );
        assert!(r.contains(
            "add element inet ferrynet same4 { 10.1.0.0/16 . 10.1.0.0/16, 10.2.0.0/16 . 10.2.0.0/16 }"
        ));
        assert!(r.contains(
            "add element inet ferrynet same6 { fd01::/64 . fd01::/64, fd02::/64 . fd02::/64 }"
        ));
        let rule4 = "ip daddr @nets4 ip saddr @nets4 ip saddr . ip daddr != @same4 counter name isolation drop";
        let rule6 = "ip6 daddr @nets6 ip6 saddr @nets6 ip6 saddr . ip6 daddr != @same6 counter name isolation drop";
        let dnat = r.find("forward ct status dnat accept").unwrap();
        let est = r
            .find("forward ct state established,related accept")
            .unwrap();
        let accept = r.find("forward iifname @bridges accept").unwrap();
        for rule in [rule4, rule6] {
            let at = r
                .find(rule)
                .unwrap_or_else(|| panic!("{rule} missing: {r}"));
            assert!(est < at && dnat < at && at < accept, "{r}");
        }
        // Sets are flushed and refilled in the same transaction as the rules.
        for set in [NETS4, NETS6, SAME4, SAME6] {
            assert!(
                r.find(&format!("flush set inet ferrynet {set}")).unwrap() < r.find(rule4).unwrap()
            );
        }
        // One rule per family, whatever the number of networks.
        assert_eq!(r.matches("isolate networks").count(), 2);
    }

    #[test]
    fn loopback_is_dropped_before_dnat_unless_on_lo() {
        let r = base_ruleset(&[net("a", "10.1.0.0/24", false)]);
        assert!(r.contains("add chain inet ferrynet localnet { type filter hook input priority filter; policy accept; }"));
        assert!(r.contains("forward ct original ip daddr 127.0.0.0/8 drop"));
        assert!(r.contains("forward ct original ip6 daddr ::1 drop"));
        let lo = r
            .find("add rule inet ferrynet localnet iif \"lo\" accept")
            .expect("lo leaves first");
        for m in [
            "ip daddr 127.0.0.0/8",
            "ip saddr 127.0.0.0/8",
            "ip6 daddr ::1",
            "ip6 saddr ::1",
        ] {
            let at = r
                .find(&format!("add rule inet ferrynet localnet {m} drop"))
                .unwrap_or_else(|| panic!("{m}"));
            assert!(lo < at, "{m} before the lo accept");
        }
        assert!(r.contains("flush chain inet ferrynet localnet"));
    }

    #[test]
    fn many_ports_are_one_statement_per_map() {
        let m: Vec<PortMapping> = (1000..11000).map(|p| pm(p, None, Protocol::Tcp)).collect();
        let b = add_ports(&published_ports(&m, &["10.1.0.2".parse().unwrap()]));
        assert_eq!(b.lines().count(), 1);
    }
}
