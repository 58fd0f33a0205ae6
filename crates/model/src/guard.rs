//! Anti-spoofing on container ports as nftables batches (table `bridge ferrynet`).
//!
//! Every frame entering a bridge through a container's host-side veth (`fnv…`, see
//! [`crate::names::host_veth_name`]) must come from that container's MAC and one of its
//! addresses. The allowed triples are set elements keyed by port, so a frame costs one hash
//! lookup whatever the number of containers, and a port without elements drops everything
//! (default deny): a container is guarded from its first frame. Drops are counted per reason
//! in named counters ([`REASONS`]).
//!
//! A routed network's port (see [`crate::routed`]) is no bridge port, so bridge prerouting
//! never sees its frames. Its guard is the same rules in two more tables: `inet
//! ferrynet-routed` (hook prerouting, priority -300: every IPv4 and IPv6 packet entering
//! through an `fnv…` port before conntrack and routing; bridged frames enter the IP hooks with
//! the bridge as input device, so they never match) and `arp ferrynet-routed` (hook input: every
//! ARP frame the host receives on such a port). All three tables are made together, so a port's
//! elements can always be removed from all of them in one transaction.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::names::format_mac;

/// The table's name (family `bridge`).
pub const TABLE: &str = "ferrynet";
/// The table with its family, as nft spells it.
pub const FAMILY_TABLE: &str = "bridge ferrynet";
/// Prefix of every container port's host end: these ports are guarded.
pub const PORT_PREFIX: &str = "fnv";
/// `port . MAC`: the container's MAC on its port.
pub const MACS: &str = "macs";
/// `port . MAC . IPv4 source`.
pub const SRC4: &str = "src4";
/// `port . MAC . IPv6 source` (its addresses and its EUI-64 link-local).
pub const SRC6: &str = "src6";
/// `port . MAC . ARP sender MAC . ARP sender IP` (its IPv4 addresses and 0.0.0.0 for probes).
pub const ARP: &str = "arp_src";
/// `port . MAC . IPv6 source . ND target`: neighbour advertisements for its own addresses, and
/// duplicate address detection (a solicitation from `::`) only for them.
pub const NA: &str = "na_src";
/// The routed ports' tables' name (families `inet` and `arp`).
pub const ROUTED_TABLE: &str = "ferrynet-routed";
/// The routed ports' IP table with its family.
pub const ROUTED_IP: &str = "inet ferrynet-routed";
/// The routed ports' ARP table with its family.
pub const ROUTED_ARP: &str = "arp ferrynet-routed";
/// Every guard table with its family: `(family, name)`.
pub const TABLES: [(&str, &str); 3] = [
    ("bridge", TABLE),
    ("inet", ROUTED_TABLE),
    ("arp", ROUTED_TABLE),
];

/// The regular chains: the dispatcher and one per protocol.
pub const CHAINS: [&str; 5] = ["guard", "guard4", "guard6", "guard_na", "guard_arp"];

/// The target address of a neighbour advertisement (ICMPv6 bytes 8–23); nft 1.0.6 has no
/// `icmpv6 taddr`, so it is a raw 128-bit field and its elements are written as integers.
const NA_TARGET: &str = "@th,64,128";

/// Drop reasons, each a named counter in the table.
pub const REASONS: [&str; 10] = [
    "mac_spoof",
    "ip4_spoof",
    "ip6_spoof",
    "arp_spoof",
    "na_spoof",
    "router_advert",
    "icmp6_redirect",
    "dhcp_server",
    "dhcp6_server",
    "other_ethertype",
];

/// One guarded container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedPort {
    /// Host end of the veth (a bridge port).
    pub port: String,
    /// The container interface's MAC.
    pub mac: [u8; 6],
    /// The container's addresses on this port.
    pub ips: Vec<IpAddr>,
    /// A routed network's port (not a bridge port): guarded by the routed tables.
    pub routed: bool,
}

/// The link-local address the kernel derives from a MAC (modified EUI-64, RFC 4291).
pub fn eui64_link_local(mac: &[u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 0x02, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

fn q(ifname: &str) -> String {
    // Interface names are ours (`fnv` + hex), so quoting is enough.
    format!("\"{ifname}\"")
}

/// The skeleton: the three tables with their sets, counters, chains and rules. Re-applying it
/// is idempotent and keeps set elements and counter values; the chains are flushed and
/// refilled atomically.
pub fn skeleton() -> String {
    let mut b = bridge_skeleton();
    b.push_str(&routed_ip_skeleton());
    b.push_str(&routed_arp_skeleton());
    b
}

/// Sets of each table, with their types.
fn set_decls(t: &str, sets: &[&str]) -> Vec<String> {
    sets.iter()
        .map(|set| {
            let ty = match *set {
                MACS => "type ifname . ether_addr;".to_string(),
                SRC4 => "type ifname . ether_addr . ipv4_addr;".to_string(),
                SRC6 => "type ifname . ether_addr . ipv6_addr;".to_string(),
                ARP => "type ifname . ether_addr . ether_addr . ipv4_addr;".to_string(),
                _ => format!("typeof iifname . ether saddr . ip6 saddr . {NA_TARGET};"),
            };
            format!("add set {t} {set} {{ {ty} }}")
        })
        .collect()
}

/// The protocol checks of `chains` (a subset of guard4, guard6, guard_na, guard_arp), shared by
/// the bridge table and the routed ones: drops of server messages first, then the one lookup,
/// then the counted drops.
fn protocol_rules(chains: &[&str]) -> Vec<(&'static str, String)> {
    let mac_or = |reason: &str| {
        // Reached only after the one lookup failed: tell a wrong address from a wrong MAC.
        [
            format!("iifname . ether saddr @{MACS} counter name {reason} drop"),
            "counter name mac_spoof drop".to_string(),
        ]
    };
    let mut rules: Vec<(&'static str, String)> = vec![
        // A DHCP server reply is dropped even from the container's own address.
        ("guard4", "udp sport 67 counter name dhcp_server drop".to_string()),
        (
            "guard4",
            format!("iifname . ether saddr . ip saddr @{SRC4} accept"),
        ),
        (
            "guard6",
            "icmpv6 type nd-router-advert counter name router_advert drop".to_string(),
        ),
        (
            "guard6",
            "icmpv6 type nd-redirect counter name icmp6_redirect drop".to_string(),
        ),
        (
            "guard6",
            "udp sport 547 counter name dhcp6_server drop".to_string(),
        ),
        ("guard6", "icmpv6 type nd-neighbor-advert goto guard_na".to_string()),
        (
            "guard6",
            format!("iifname . ether saddr . ip6 saddr @{SRC6} accept"),
        ),
        // Duplicate address detection and MLD before an address is usable send from `::`.
        (
            "guard6",
            format!("ip6 saddr :: icmpv6 type nd-neighbor-solicit iifname . ether saddr . ip6 saddr . {NA_TARGET} @{NA} accept"),
        ),
        (
            "guard6",
            format!("ip6 saddr :: icmpv6 type {{ mld-listener-report, mld2-listener-report }} iifname . ether saddr @{MACS} accept"),
        ),
        (
            "guard_na",
            format!("iifname . ether saddr . ip6 saddr . {NA_TARGET} @{NA} accept"),
        ),
        (
            "guard_arp",
            format!("iifname . ether saddr . arp saddr ether . arp saddr ip @{ARP} accept"),
        ),
    ];
    for (chain, reason) in [
        ("guard4", "ip4_spoof"),
        ("guard6", "ip6_spoof"),
        ("guard_na", "na_spoof"),
        ("guard_arp", "arp_spoof"),
    ] {
        for r in mac_or(reason) {
            rules.push((chain, r));
        }
    }
    rules.retain(|(c, _)| chains.contains(c));
    rules
}

/// The TCP fast path: a TCP segment from a port's own MAC and address needs none of the
/// protocol checks (they are about ARP, ND, RA and DHCP), so it is accepted by one lookup. The
/// sets hold only `fnv*` ports, so nothing else matches; anything that does not match takes the
/// full path.
fn tcp_fast_path() -> [String; 2] {
    [
        format!("meta l4proto tcp iifname . ether saddr . ip saddr @{SRC4} accept"),
        format!("meta l4proto tcp iifname . ether saddr . ip6 saddr @{SRC6} accept"),
    ]
}

/// One table: its sets, counters, base chain, regular chains and rules, as nft lines.
struct TableSpec<'a> {
    table: &'a str,
    sets: &'a [&'a str],
    base: &'a str,
    chains: &'a [&'a str],
    rules: Vec<(&'a str, String)>,
}

fn render(spec: TableSpec<'_>) -> String {
    let t = spec.table;
    let mut b = String::new();
    let mut line = |s: String| {
        b.push_str(&s);
        b.push('\n');
    };
    line(format!("add table {t}"));
    for d in set_decls(t, spec.sets) {
        line(d);
    }
    for r in REASONS {
        line(format!("add counter {t} {r}"));
    }
    line(spec.base.to_string());
    for c in spec.chains {
        line(format!("add chain {t} {c}"));
    }
    for c in ["prerouting", "input"]
        .iter()
        .filter(|c| spec.base.contains(&format!(" {c} {{")))
        .chain(spec.chains)
    {
        line(format!("flush chain {t} {c}"));
    }
    for (chain, rule) in spec.rules {
        line(format!("add rule {t} {chain} {rule}"));
    }
    b
}

/// `bridge ferrynet`: bridge prerouting sees every frame entering a bridge port, bridged or
/// routed, before br_netfilter (priority 0) hands it to the IP hooks.
fn bridge_skeleton() -> String {
    let t = FAMILY_TABLE;
    let [fast4, fast6] = tcp_fast_path();
    let mut rules: Vec<(&str, String)> = vec![
        ("prerouting", fast4),
        ("prerouting", fast6),
        (
            "prerouting",
            format!("iifname \"{PORT_PREFIX}*\" jump guard"),
        ),
        (
            "guard",
            "ether type vmap { ip : jump guard4, ip6 : jump guard6, arp : jump guard_arp }"
                .to_string(),
        ),
        // VLAN tags, LLC, LLDP, STP… a container has no business sending them.
        ("guard", "counter name other_ethertype drop".to_string()),
    ];
    rules.extend(protocol_rules(&CHAINS));
    render(TableSpec {
        table: t,
        sets: &[MACS, SRC4, SRC6, ARP, NA],
        base: &format!("add chain {t} prerouting {{ type filter hook prerouting priority -300; policy accept; }}"),
        chains: &CHAINS,
        rules,
    })
}

/// `inet ferrynet-routed`: IP packets entering through a routed port (its ARP is the ARP
/// table's). Only IPv4 and IPv6 reach this hook; other ether types have no handler on a routed
/// interface and are dropped by the kernel.
fn routed_ip_skeleton() -> String {
    let t = ROUTED_IP;
    let mut rules: Vec<(&str, String)> = vec![(
        "prerouting",
        format!("iifname \"{PORT_PREFIX}*\" jump guard"),
    )];
    for r in tcp_fast_path() {
        rules.push(("guard", r));
    }
    rules.push((
        "guard",
        "meta nfproto vmap { ipv4 : jump guard4, ipv6 : jump guard6 }".to_string(),
    ));
    rules.extend(protocol_rules(&["guard4", "guard6", "guard_na"]));
    render(TableSpec {
        table: t,
        sets: &[MACS, SRC4, SRC6, NA],
        base: &format!("add chain {t} prerouting {{ type filter hook prerouting priority -300; policy accept; }}"),
        chains: &["guard", "guard4", "guard6", "guard_na"],
        rules,
    })
}

/// `arp ferrynet-routed`: ARP frames the host receives on a routed port (its own answers for
/// the link-local gateway, and its neighbour cache, come after this hook).
fn routed_arp_skeleton() -> String {
    let t = ROUTED_ARP;
    let mut rules: Vec<(&str, String)> = vec![(
        "input",
        format!("iifname \"{PORT_PREFIX}*\" jump guard_arp"),
    )];
    rules.extend(protocol_rules(&["guard_arp"]));
    render(TableSpec {
        table: t,
        sets: &[MACS, ARP],
        base: &format!(
            "add chain {t} input {{ type filter hook input priority -300; policy accept; }}"
        ),
        chains: &["guard_arp"],
        rules,
    })
}

/// The elements of one port, per set.
pub fn port_elements(p: &GuardedPort) -> Vec<(&'static str, Vec<String>)> {
    let port = q(&p.port);
    let mac = format_mac(&p.mac);
    let v4: Vec<Ipv4Addr> = p
        .ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut v6: Vec<Ipv6Addr> = vec![eui64_link_local(&p.mac)];
    for ip in &p.ips {
        if let IpAddr::V6(a) = ip {
            if !v6.contains(a) {
                v6.push(*a);
            }
        }
    }
    let mut out = vec![(MACS, vec![format!("{port} . {mac}")])];
    if !v4.is_empty() {
        out.push((
            SRC4,
            v4.iter().map(|a| format!("{port} . {mac} . {a}")).collect(),
        ));
        let senders = v4.iter().copied().chain([Ipv4Addr::UNSPECIFIED]);
        out.push((
            ARP,
            senders
                .map(|a| format!("{port} . {mac} . {mac} . {a}"))
                .collect(),
        ));
    }
    out.push((
        SRC6,
        v6.iter().map(|a| format!("{port} . {mac} . {a}")).collect(),
    ));
    // Any own source may advertise any own target (a reply to an NS for the global address
    // comes from the link-local one and the other way round); `::` probes its own targets.
    let nd_sources: Vec<Ipv6Addr> = v6.iter().copied().chain([Ipv6Addr::UNSPECIFIED]).collect();
    out.push((
        NA,
        nd_sources
            .iter()
            .flat_map(|s| v6.iter().map(move |t| (s, t)))
            .map(|(s, t)| format!("{port} . {mac} . {s} . 0x{:032x}", u128::from(*t)))
            .collect(),
    ));
    out
}

/// The tables a port's elements go to, and which of its sets each holds.
fn layer_sets(routed: bool) -> Vec<(&'static str, &'static [&'static str])> {
    if routed {
        vec![
            (ROUTED_IP, &[MACS, SRC4, SRC6, NA]),
            (ROUTED_ARP, &[MACS, ARP]),
        ]
    } else {
        vec![(FAMILY_TABLE, &[MACS, SRC4, SRC6, ARP, NA])]
    }
}

fn element_lines(verb: &str, p: &GuardedPort, routed: bool) -> String {
    let mut b = String::new();
    let elems = port_elements(p);
    for (table, sets) in layer_sets(routed) {
        for (set, e) in elems.iter().filter(|(s, _)| sets.contains(s)) {
            let _ = writeln!(b, "{verb} element {table} {set} {{ {} }}", e.join(", "));
        }
    }
    b
}

/// Allow a port's frames in the tables of its kind (one transaction; repeating it is harmless).
pub fn add_port(p: &GuardedPort) -> String {
    element_lines("add", p, p.routed)
}

/// Allow several ports in one transaction (a rebuild).
pub fn add_ports(ports: &[GuardedPort]) -> String {
    ports.iter().map(add_port).collect()
}

/// Forget a port's elements from every guard table (whatever kind of port it was, so callers
/// need not know its network); succeeds when they are already gone (add, then delete).
pub fn remove_port_tolerant(p: &GuardedPort) -> String {
    let mut b = String::new();
    for routed in [false, true] {
        b.push_str(&element_lines("add", p, routed));
        b.push_str(&element_lines("delete", p, routed));
    }
    b
}

/// Forget every element of `port` found in a listing of the table (`nft -j list table bridge
/// ferrynet`): for a port whose MAC was never recorded (an ADD interrupted after the guard).
/// Empty when there is nothing to remove; tolerant like [`remove_port_tolerant`].
pub fn remove_listed_port(table: &serde_json::Value, port: &str, family_table: &str) -> String {
    let mut by_set: Vec<(String, Vec<String>)> = Vec::new();
    let items = table
        .get("nftables")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for set in items.iter().filter_map(|i| i.get("set")) {
        let Some(name) = set.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let elems = set
            .get("elem")
            .and_then(|e| e.as_array())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut mine = Vec::new();
        for e in elems {
            let parts: Vec<&str> = e
                .get("concat")
                .and_then(|c| c.as_array())
                .map(|c| c.iter().filter_map(|p| p.as_str()).collect())
                .unwrap_or_default();
            if parts.first() == Some(&port) && parts.len() > 1 {
                mine.push(format!("{} . {}", q(port), parts[1..].join(" . ")));
            }
        }
        if !mine.is_empty() {
            by_set.push((name.to_string(), mine));
        }
    }
    let mut b = String::new();
    for verb in ["add", "delete"] {
        for (set, elems) in &by_set {
            let _ = writeln!(
                b,
                "{verb} element {family_table} {set} {{ {} }}",
                elems.join(", ")
            );
        }
    }
    b
}

/// Remove the guard's tables (no network left); tolerant of missing ones (add, then delete).
pub fn delete_table() -> String {
    TABLES
        .iter()
        .map(|(f, t)| format!("add table {f} {t}\ndelete table {f} {t}\n"))
        .collect()
}

/// Sort (name, packets, bytes) counters in the order of [`REASONS`] (others last).
pub fn in_reason_order(counters: &mut [(String, u64, u64)]) {
    counters.sort_by_key(|(n, _, _)| REASONS.iter().position(|r| r == n).unwrap_or(usize::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> GuardedPort {
        GuardedPort {
            port: "fnv0123456789ab".into(),
            mac: [0x02, 0x42, 0x0a, 0x05, 0x00, 0x02],
            ips: vec!["10.5.0.2".parse().unwrap(), "fd05::2".parse().unwrap()],
            routed: false,
        }
    }

    #[test]
    fn link_local_is_modified_eui64() {
        assert_eq!(
            eui64_link_local(&[0x02, 0x42, 0x0a, 0x05, 0x00, 0x02]).to_string(),
            "fe80::42:aff:fe05:2"
        );
        assert_eq!(
            eui64_link_local(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55]).to_string(),
            "fe80::211:22ff:fe33:4455"
        );
    }

    #[test]
    fn skeleton_guards_every_container_port_by_default() {
        let s = skeleton();
        assert!(s.contains("add table bridge ferrynet"));
        assert!(s.contains("hook prerouting"));
        assert!(s.contains("iifname \"fnv*\" jump guard"));
        // Each family chain ends in drops: a port without elements passes nothing.
        for chain in ["guard4", "guard6", "guard_na", "guard_arp"] {
            let last = s
                .lines()
                .rfind(|l| l.starts_with(&format!("add rule bridge ferrynet {chain} ")))
                .unwrap();
            assert!(last.ends_with("counter name mac_spoof drop"), "{last}");
        }
        assert!(s.contains("counter name other_ethertype drop"));
        for r in REASONS {
            assert!(s.contains(&format!("add counter bridge ferrynet {r}\n")));
            assert!(
                s.contains(&format!("counter name {r} drop")),
                "{r} never counted"
            );
        }
    }

    #[test]
    fn server_messages_are_dropped_before_any_allow() {
        let s = skeleton();
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle}"));
        let allow4 = format!("guard4 iifname . ether saddr . ip saddr @{SRC4} accept");
        let allow6 = format!("guard6 iifname . ether saddr . ip6 saddr @{SRC6} accept");
        assert!(pos("udp sport 67 ") < pos(&allow4));
        assert!(pos("nd-router-advert counter") < pos(&allow6));
        assert!(pos("nd-redirect counter") < pos(&allow6));
        assert!(pos("udp sport 547 ") < pos(&allow6));
        assert!(pos("nd-neighbor-advert goto guard_na") < pos(&allow6));
        // The only allows before those checks are the TCP fast path: no ARP, ICMPv6 or UDP.
        for l in s
            .lines()
            .filter(|l| l.starts_with("add rule bridge ferrynet prerouting "))
        {
            assert!(
                l.ends_with("jump guard")
                    || l.contains(" meta l4proto tcp iifname . ether saddr . "),
                "{l}"
            );
        }
    }

    #[test]
    fn elements_bind_port_mac_and_own_addresses() {
        let e = port_elements(&port());
        let get = |set: &str| e.iter().find(|(s, _)| *s == set).unwrap().1.clone();
        let p = "\"fnv0123456789ab\" . 02:42:0a:05:00:02";
        assert_eq!(get(MACS), vec![p.to_string()]);
        assert_eq!(get(SRC4), vec![format!("{p} . 10.5.0.2")]);
        assert_eq!(
            get(ARP),
            vec![
                format!("{p} . 02:42:0a:05:00:02 . 10.5.0.2"),
                format!("{p} . 02:42:0a:05:00:02 . 0.0.0.0"),
            ]
        );
        assert_eq!(
            get(SRC6),
            vec![
                format!("{p} . fe80::42:aff:fe05:2"),
                format!("{p} . fd05::2")
            ]
        );
        let na = get(NA);
        assert_eq!(na.len(), 6);
        assert!(na.contains(&format!("{p} . :: . 0xfd050000000000000000000000000002")));
        assert!(na.contains(&format!(
            "{p} . fe80::42:aff:fe05:2 . 0xfd050000000000000000000000000002"
        )));
    }

    #[test]
    fn routed_ports_are_guarded_at_the_ip_and_arp_hooks_by_default() {
        let s = skeleton();
        assert!(s.contains("add chain inet ferrynet-routed prerouting { type filter hook prerouting priority -300;"));
        assert!(
            s.contains("add rule inet ferrynet-routed prerouting iifname \"fnv*\" jump guard\n")
        );
        assert!(s.contains(
            "add chain arp ferrynet-routed input { type filter hook input priority -300;"
        ));
        assert!(s.contains("add rule arp ferrynet-routed input iifname \"fnv*\" jump guard_arp\n"));
        // Each chain of the routed tables ends in drops, as in the bridge table.
        for (t, chain) in [
            ("inet ferrynet-routed", "guard4"),
            ("inet ferrynet-routed", "guard6"),
            ("inet ferrynet-routed", "guard_na"),
            ("arp ferrynet-routed", "guard_arp"),
        ] {
            let last = s
                .lines()
                .rfind(|l| l.starts_with(&format!("add rule {t} {chain} ")))
                .unwrap();
            assert!(last.ends_with("counter name mac_spoof drop"), "{last}");
        }
        // Router advertisements are dropped before the allow, as on bridges.
        let pos = |n: &str| s.find(n).unwrap_or_else(|| panic!("{n}"));
        assert!(
            pos("add rule inet ferrynet-routed guard6 icmpv6 type nd-router-advert")
                < pos("add rule inet ferrynet-routed guard6 iifname . ether saddr . ip6 saddr @src6 accept")
        );
    }

    #[test]
    fn a_routed_port_gets_elements_in_the_routed_tables_only_and_loses_them_everywhere() {
        let mut p = port();
        p.routed = true;
        let b = add_port(&p);
        assert!(b
            .lines()
            .all(|l| l.starts_with("add element inet ferrynet-routed ")
                || l.starts_with("add element arp ferrynet-routed ")));
        assert!(b.contains("add element arp ferrynet-routed arp_src {"));
        assert!(b.contains("add element inet ferrynet-routed src4 {"));
        assert!(!b.contains("inet ferrynet-routed arp_src"));
        let bridged = add_port(&port());
        assert!(bridged
            .lines()
            .all(|l| l.starts_with("add element bridge ferrynet ")));
        // Removal needs no knowledge of the port's kind.
        assert_eq!(remove_port_tolerant(&p), remove_port_tolerant(&port()));
        assert!(remove_port_tolerant(&p).contains("delete element arp ferrynet-routed macs"));
        assert!(delete_table().contains("delete table inet ferrynet-routed\n"));
    }

    #[test]
    fn ipv6_only_port_gets_no_ipv4_or_arp() {
        let mut p = port();
        p.ips.retain(|ip| ip.is_ipv6());
        let e = port_elements(&p);
        assert!(e.iter().all(|(s, _)| *s != SRC4 && *s != ARP));
    }

    #[test]
    fn tolerant_removal_adds_then_deletes_the_same_elements() {
        let p = port();
        let b = remove_port_tolerant(&p);
        let adds: Vec<&str> = b.lines().filter(|l| l.starts_with("add ")).collect();
        let dels: Vec<&str> = b.lines().filter(|l| l.starts_with("delete ")).collect();
        assert_eq!(adds.len(), dels.len());
        for (a, d) in adds.iter().zip(&dels) {
            assert_eq!(
                a.trim_start_matches("add "),
                d.trim_start_matches("delete ")
            );
        }
        assert_eq!(add_ports(&[p.clone(), p.clone()]), add_port(&p).repeat(2));
    }

    #[test]
    fn a_listed_port_loses_only_its_own_elements() {
        let j: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},
            {"set":{"name":"macs","elem":[{"concat":["fnvaaaaaaaaaaaa","02:00:00:00:00:01"]},{"concat":["fnvbbbbbbbbbbbb","02:00:00:00:00:02"]}]}},
            {"set":{"name":"na_src","elem":[{"concat":["fnvaaaaaaaaaaaa","02:00:00:00:00:01","fd05::2","0xfd050000000000000000000000000002"]}]}},
            {"set":{"name":"src4"}}]}"#,
        )
        .unwrap();
        let b = remove_listed_port(&j, "fnvaaaaaaaaaaaa", FAMILY_TABLE);
        assert_eq!(
            b,
            "add element bridge ferrynet macs { \"fnvaaaaaaaaaaaa\" . 02:00:00:00:00:01 }\n\
             add element bridge ferrynet na_src { \"fnvaaaaaaaaaaaa\" . 02:00:00:00:00:01 . fd05::2 . 0xfd050000000000000000000000000002 }\n\
             delete element bridge ferrynet macs { \"fnvaaaaaaaaaaaa\" . 02:00:00:00:00:01 }\n\
             delete element bridge ferrynet na_src { \"fnvaaaaaaaaaaaa\" . 02:00:00:00:00:01 . fd05::2 . 0xfd050000000000000000000000000002 }\n"
        );
        assert_eq!(remove_listed_port(&j, "fnvcccccccccccc", FAMILY_TABLE), "");
    }

    #[test]
    fn counters_are_put_in_reason_order() {
        let mut c = vec![
            ("other".to_string(), 0, 0),
            ("ip4_spoof".to_string(), 3, 252),
            ("mac_spoof".to_string(), 1, 60),
        ];
        in_reason_order(&mut c);
        let names: Vec<&str> = c.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["mac_spoof", "ip4_spoof", "other"]);
    }
}
