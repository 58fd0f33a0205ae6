//! The VXLAN guard (pure): only registered hosts may send to the VXLAN port.
//!
//! The kernel's VXLAN socket decapsulates any frame that reaches its UDP port, whatever its
//! source, and delivers the inner frame to the bridge of its VNI: without a filter, a container
//! or any machine on the underlay could inject frames into every network. The agent owns the
//! table `inet ferrynet-fabric` (separate from `inet ferrynet` and `inet ferrynet-svc`, so no
//! other writer flushes it):
//!
//! - `input`: UDP to the VXLAN port is dropped when it comes in from a ferrynet bridge (`fn-*`,
//!   a container of this host), accepted from an address in `vtep_peers4`/`vtep_peers6` (the
//!   underlay addresses of the other registered hosts), and dropped from anywhere else;
//! - `forward`: UDP to the VXLAN port from a ferrynet bridge, or to a peer's underlay address,
//!   is dropped: the outbound masquerade would otherwise give a container's frame its host's
//!   (registered) source address. A ferrynet host never routes its peers' tunnels;
//! - drops are counted in the named counters [`FROM_CONTAINERS`], [`FROM_STRANGERS`] and
//!   [`FORWARDED`].
//!
//! The peer sets follow the store by diff (elements added and removed); the table is rebuilt
//! whole when a listing shows it missing or damaged (a flushed chain, a deleted set).

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::Value;

use crate::host::HostRecord;

/// The table's name (family `inet`).
pub const TABLE: &str = "ferrynet-fabric";
/// Counter of VXLAN frames from this host's containers (input and forward).
pub const FROM_CONTAINERS: &str = "from_containers";
/// Counter of VXLAN frames from sources that are not registered hosts.
pub const FROM_STRANGERS: &str = "from_strangers";
/// Counter of forwarded VXLAN frames towards a peer (from a routed or Docker container).
pub const FORWARDED: &str = "forwarded";

const T: &str = "inet ferrynet-fabric";
const SETS: [&str; 2] = ["vtep_peers4", "vtep_peers6"];
const COUNTERS: [&str; 3] = [FROM_CONTAINERS, FROM_STRANGERS, FORWARDED];

/// What the guard must hold on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardState {
    /// The VXLAN UDP port.
    pub port: u16,
    /// IPv4 underlay addresses of the other registered hosts.
    pub peers4: BTreeSet<Ipv4Addr>,
    /// IPv6 underlay addresses of the other registered hosts.
    pub peers6: BTreeSet<Ipv6Addr>,
}

/// The guard for host `me` given every registered host (live or still in its grace period):
/// the underlay addresses of all of them but `me`. Unspecified, loopback and multicast
/// addresses in a record are never peers (a forged record must not open the port to all).
pub fn desired<'a>(
    port: u16,
    me: &str,
    hosts: impl IntoIterator<Item = &'a HostRecord>,
) -> GuardState {
    let mut st = GuardState {
        port,
        ..Default::default()
    };
    for h in hosts.into_iter().filter(|h| h.name != me) {
        for a in &h.underlay {
            let ip = a.addr();
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                continue;
            }
            match ip {
                IpAddr::V4(v4) if v4.is_broadcast() => {}
                IpAddr::V4(v4) => {
                    st.peers4.insert(v4);
                }
                IpAddr::V6(v6) => {
                    st.peers6.insert(v6);
                }
            }
        }
    }
    st
}

/// The guard as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    /// The chains, sets and counters are all there with the expected number of rules.
    pub intact: bool,
    /// The peer set elements found.
    pub state: GuardState,
    /// Packets counted by each named counter.
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// The rules of the table, per chain, for `port`.
fn rules(port: u16) -> Vec<(&'static str, String)> {
    let p = format!("udp dport {port}");
    vec![
        (
            "input",
            format!("iifname \"fn-*\" {p} counter name \"{FROM_CONTAINERS}\" drop"),
        ),
        ("input", format!("{p} ip saddr @vtep_peers4 accept")),
        ("input", format!("{p} ip6 saddr @vtep_peers6 accept")),
        (
            "input",
            format!("{p} counter name \"{FROM_STRANGERS}\" drop"),
        ),
        (
            "forward",
            format!("iifname \"fn-*\" {p} counter name \"{FROM_CONTAINERS}\" drop"),
        ),
        (
            "forward",
            format!("{p} ip daddr @vtep_peers4 counter name \"{FORWARDED}\" drop"),
        ),
        (
            "forward",
            format!("{p} ip6 daddr @vtep_peers6 counter name \"{FORWARDED}\" drop"),
        ),
    ]
}

/// Read the guard from `nft -j list table inet ferrynet-fabric` (None: no table). The port
/// is taken from `port` (the caller's configuration); `intact` is false when any chain, set
/// or counter is missing or a chain does not hold its rules.
pub fn read(listing: &Value, port: u16) -> Programmed {
    let items = listing["nftables"].as_array().cloned().unwrap_or_default();
    let mut state = GuardState {
        port,
        ..Default::default()
    };
    let mut chains = BTreeSet::new();
    let mut sets = BTreeSet::new();
    let mut counters = BTreeSet::new();
    let mut dropped = std::collections::BTreeMap::new();
    let mut rule_count: std::collections::BTreeMap<String, usize> = Default::default();
    for it in &items {
        if let Some(c) = it.get("chain") {
            if let Some(n) = c["name"].as_str() {
                chains.insert(n.to_string());
            }
        } else if let Some(c) = it.get("counter") {
            if let Some(n) = c["name"].as_str() {
                counters.insert(n.to_string());
                dropped.insert(n.to_string(), c["packets"].as_u64().unwrap_or(0));
            }
        } else if let Some(r) = it.get("rule") {
            if let Some(n) = r["chain"].as_str() {
                *rule_count.entry(n.to_string()).or_default() += 1;
            }
        } else if let Some(s) = it.get("set") {
            let Some(n) = s["name"].as_str() else {
                continue;
            };
            sets.insert(n.to_string());
            for e in s["elem"].as_array().into_iter().flatten() {
                match e.as_str().and_then(|a| a.parse::<IpAddr>().ok()) {
                    Some(IpAddr::V4(a)) if n == SETS[0] => {
                        state.peers4.insert(a);
                    }
                    Some(IpAddr::V6(a)) if n == SETS[1] => {
                        state.peers6.insert(a);
                    }
                    _ => {}
                }
            }
        }
    }
    let mut want_rules: std::collections::BTreeMap<String, usize> = Default::default();
    for (chain, _) in rules(port) {
        *want_rules.entry(chain.to_string()).or_default() += 1;
    }
    let intact = want_rules
        .iter()
        .all(|(c, n)| chains.contains(c) && rule_count.get(c) == Some(n))
        && SETS.iter().all(|s| sets.contains(*s))
        && COUNTERS.iter().all(|c| counters.contains(*c));
    Programmed {
        intact,
        state,
        dropped,
    }
}

fn elements(b: &mut String, verb: &str, st_v4: &BTreeSet<Ipv4Addr>, st_v6: &BTreeSet<Ipv6Addr>) {
    let join = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(", ");
    let v4 = join(&mut st_v4.iter().map(|a| a.to_string()));
    let v6 = join(&mut st_v6.iter().map(|a| a.to_string()));
    if !v4.is_empty() {
        let _ = writeln!(b, "{verb} element {T} {} {{ {v4} }}", SETS[0]);
    }
    if !v6.is_empty() {
        let _ = writeln!(b, "{verb} element {T} {} {{ {v6} }}", SETS[1]);
    }
}

/// The whole table for `st`, replacing whatever is there, as one transaction.
pub fn full_batch(st: &GuardState) -> String {
    let mut b = String::new();
    // `add` first so the `delete` never meets a missing table.
    let _ = writeln!(b, "add table {T}");
    let _ = writeln!(b, "delete table {T}");
    let _ = writeln!(b, "add table {T}");
    for c in COUNTERS {
        let _ = writeln!(b, "add counter {T} {c}");
    }
    let _ = writeln!(b, "add set {T} {} {{ type ipv4_addr; }}", SETS[0]);
    let _ = writeln!(b, "add set {T} {} {{ type ipv6_addr; }}", SETS[1]);
    for hook in ["input", "forward"] {
        let _ = writeln!(
            b,
            "add chain {T} {hook} {{ type filter hook {hook} priority filter - 5; policy accept; }}"
        );
    }
    for (chain, rule) in rules(st.port) {
        let _ = writeln!(b, "add rule {T} {chain} {rule}");
    }
    elements(&mut b, "add", &st.peers4, &st.peers6);
    b
}

/// The element changes that turn `old` into `new` (same port); empty when equal.
pub fn diff_batch(old: &GuardState, new: &GuardState) -> String {
    let mut b = String::new();
    elements(
        &mut b,
        "delete",
        &old.peers4.difference(&new.peers4).copied().collect(),
        &old.peers6.difference(&new.peers6).copied().collect(),
    );
    elements(
        &mut b,
        "add",
        &new.peers4.difference(&old.peers4).copied().collect(),
        &new.peers6.difference(&old.peers6).copied().collect(),
    );
    b
}

/// Remove the table whether or not it exists.
pub fn absent_batch() -> String {
    format!("add table {T}\ndelete table {T}\n")
}

/// The transaction from what the kernel holds (`have`, None: no table) to `want` (None: the
/// host needs no guard, it has no VXLAN device). Empty when nothing is to be done. A damaged
/// table, or one guarding another port, is rebuilt whole; an intact one gets element diffs.
pub fn plan(have: Option<&Programmed>, want: Option<&GuardState>) -> String {
    match (have, want) {
        (None, None) => String::new(),
        (Some(_), None) => absent_batch(),
        (Some(h), Some(w)) if h.intact && h.state.port == w.port => diff_batch(&h.state, w),
        (_, Some(w)) => full_batch(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host(name: &str, addrs: &[&str]) -> HostRecord {
        HostRecord::for_test(name, addrs)
    }

    fn sample() -> GuardState {
        let hosts = [
            host("h1", &["172.31.0.1/24", "fd31::1/64"]),
            host("h2", &["172.31.0.2/24", "fd31::2/64"]),
            host("h3", &["172.31.1.3/24"]),
        ];
        desired(4789, "h1", &hosts)
    }

    #[test]
    fn peers_are_the_other_hosts_underlay_addresses() {
        let st = sample();
        assert_eq!(st.port, 4789);
        let v4: Vec<String> = st.peers4.iter().map(|a| a.to_string()).collect();
        assert_eq!(v4, ["172.31.0.2", "172.31.1.3"]);
        let v6: Vec<String> = st.peers6.iter().map(|a| a.to_string()).collect();
        assert_eq!(v6, ["fd31::2"]);
    }

    #[test]
    fn forged_wildcard_addresses_are_never_peers() {
        let hosts = [host(
            "evil",
            &[
                "0.0.0.0/0",
                "::/0",
                "127.0.0.1/8",
                "::1/128",
                "224.0.0.1/4",
                "ff02::1/16",
                "255.255.255.255/32",
            ],
        )];
        let st = desired(4789, "h1", &hosts);
        assert!(st.peers4.is_empty() && st.peers6.is_empty(), "{st:?}");
    }

    #[test]
    fn full_batch_drops_containers_before_accepting_peers() {
        let b = full_batch(&sample());
        let containers = b.find("iifname \"fn-*\" udp dport 4789").unwrap();
        let accept = b.find("ip saddr @vtep_peers4 accept").unwrap();
        let strangers = b.find("udp dport 4789 counter name \"from_strangers\" drop");
        assert!(containers < accept && accept < strangers.unwrap(), "{b}");
        assert!(
            b.contains("add element inet ferrynet-fabric vtep_peers4 { 172.31.0.2, 172.31.1.3 }")
        );
        assert!(b.contains("add element inet ferrynet-fabric vtep_peers6 { fd31::2 }"));
        assert!(b.starts_with("add table inet ferrynet-fabric\ndelete table"));
    }

    #[test]
    fn diff_adds_and_removes_only_changed_peers() {
        let old = sample();
        let mut new = old.clone();
        new.peers4.remove(&"172.31.1.3".parse().unwrap());
        new.peers4.insert("172.31.1.4".parse().unwrap());
        let b = diff_batch(&old, &new);
        assert_eq!(
            b,
            "delete element inet ferrynet-fabric vtep_peers4 { 172.31.1.3 }\n\
             add element inet ferrynet-fabric vtep_peers4 { 172.31.1.4 }\n"
        );
        assert!(diff_batch(&old, &old).is_empty());
    }

    fn listing(rules_in_input: usize, elems4: &[&str]) -> Value {
        let mut items = vec![json!({"metainfo": {}}), json!({"table": {"name": TABLE}})];
        for c in COUNTERS {
            items.push(json!({"counter": {"name": c, "packets": 7}}));
        }
        items.push(json!({"set": {"name": "vtep_peers4", "elem": elems4}}));
        items.push(json!({"set": {"name": "vtep_peers6"}}));
        for c in ["input", "forward"] {
            items.push(json!({"chain": {"name": c}}));
        }
        for _ in 0..rules_in_input {
            items.push(json!({"rule": {"chain": "input"}}));
        }
        for _ in 0..3 {
            items.push(json!({"rule": {"chain": "forward"}}));
        }
        json!({ "nftables": items })
    }

    #[test]
    fn read_finds_elements_and_damage() {
        let p = read(&listing(4, &["172.31.0.2", "172.31.1.3"]), 4789);
        assert!(p.intact);
        assert_eq!(p.state.peers4.len(), 2);
        assert_eq!(p.dropped.get(FROM_STRANGERS), Some(&7));
        // A flushed chain (nft flush chain) is damage.
        assert!(!read(&listing(0, &[]), 4789).intact);
        assert!(!read(&json!({"nftables": []}), 4789).intact);
    }

    #[test]
    fn plan_rebuilds_damage_diffs_intact_and_removes_unwanted() {
        let want = sample();
        assert!(plan(None, None).is_empty());
        assert_eq!(plan(None, Some(&want)), full_batch(&want));
        let intact = read(&listing(4, &["172.31.0.2", "172.31.1.3"]), 4789);
        // fd31::2 is missing from the intact table: only that is added.
        assert_eq!(
            plan(Some(&intact), Some(&want)),
            "add element inet ferrynet-fabric vtep_peers6 { fd31::2 }\n"
        );
        let damaged = read(&listing(1, &[]), 4789);
        assert_eq!(plan(Some(&damaged), Some(&want)), full_batch(&want));
        assert_eq!(plan(Some(&intact), None), absent_batch());
        let other_port = GuardState {
            port: 8472,
            ..want.clone()
        };
        assert_eq!(
            plan(Some(&intact), Some(&other_port)),
            full_batch(&other_port)
        );
    }
}
