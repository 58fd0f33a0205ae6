//! The policy table `inet ferrynet-policy` as nft batches, from a [`PolicyBook`].
//!
//! One base chain, `forward`, on the forward hook (where bridged traffic arrives through
//! `br_netfilter` and routed traffic anyway), so a packet of an established flow costs one
//! chain and one rule (`ct state established,related accept`: replies of allowed connections
//! pass). A new flow's source is looked up in the verdict maps `out4`/`out6` (egress), then
//! its destination in `in4`/`in6` (regular chain `ingress`, reached by `goto`). The maps hold
//! this host's endpoints' addresses (anti-spoofing guarantees a container sends only from its
//! own, so an address is as good a key as its port, and it is what the forward hook sees
//! whether the endpoint sits on a bridge or is routed) and lead to a *profile* chain: the
//! ordered jumps to the policy chains that select the endpoint, then `drop`. An egress allow
//! is `goto ingress` (the destination's policies still decide), an ingress allow `accept`.
//! Endpoints with the same policies share a profile, so chains and rules grow with policies,
//! not with endpoints. A policy chain holds its rules in order; a selector or network peer is
//! a named set (`e_<hash>_4`/`_6`) of the addresses of every host's endpoints it names,
//! shared by every rule naming it. Endpoint changes are element changes; a policy change
//! rebuilds the table in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::document::{Action, PortRange, Proto};
use super::verdict::{
    Direction, EndpointIndex, EndpointSet, PeerMatch, PolicyBook, PolicyEndpoint, RuleMatch,
};

/// The table's name (family `inet`).
pub const TABLE: &str = "ferrynet-policy";
/// The table with its family, as nft spells it.
pub const FAMILY_TABLE: &str = "inet ferrynet-policy";
/// The named counter of packets a `deny` rule dropped.
pub const DENY_COUNTER: &str = "policy_deny";
/// The named counter of packets no policy allowed (the end of a restricted endpoint's chain).
pub const DEFAULT_COUNTER: &str = "policy_default";
const DENY_VERDICT: &str = "counter name policy_deny drop";

/// What the table should hold: its structure, and the elements of its sets and maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Sets, maps and chains with their rules (no elements).
    pub skeleton: String,
    /// Elements by set or map name: address -> value (`jump pr_…` for maps, "" for sets).
    /// Addresses, not their text: 100,000 set members are 100,000 small keys, not strings.
    pub elements: BTreeMap<String, BTreeMap<IpAddr, String>>,
    /// Its counts.
    pub shape: Shape,
}

/// Counts for `ferrynet status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shape {
    /// Policy chains.
    pub policy_chains: usize,
    /// Profile chains.
    pub profiles: usize,
    /// Rules in policy chains.
    pub rules: usize,
    /// Named address sets.
    pub sets: usize,
    /// Elements in sets and maps.
    pub elements: usize,
}

/// A short stable name part.
fn short_hash(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn set_name(set: &EndpointSet, v6: bool) -> String {
    format!("e_{}_{}", short_hash(&set.key()), if v6 { 6 } else { 4 })
}

fn policy_chain(name: &str, dir: Direction) -> String {
    format!("po_{}_{}", short_hash(name), dir.short())
}

/// The desired table for the endpoints `local` accepts; None when no local endpoint is
/// restricted in any direction (then the table is not needed).
pub fn desired(
    book: &PolicyBook,
    eps: &EndpointIndex,
    local: &dyn Fn(&PolicyEndpoint) -> bool,
) -> Option<Desired> {
    // Profiles: the ordered applicable policies per (local endpoint, direction).
    let mut maps: BTreeMap<String, BTreeMap<IpAddr, String>> = BTreeMap::new();
    let mut profiles: BTreeMap<(Direction, Vec<usize>), String> = BTreeMap::new();
    for ep in eps.iter().filter(|e| local(e) && !e.addrs.is_empty()) {
        for dir in [Direction::Ingress, Direction::Egress] {
            let applicable = book.applicable(ep, dir);
            if !book.restricted(ep, &applicable) {
                continue;
            }
            let names: Vec<&str> = applicable
                .iter()
                .map(|&i| book.policies[i].policy.name.as_str())
                .collect();
            let chain = format!("pr_{}_{}", dir.short(), short_hash(&names.join(",")));
            profiles
                .entry((dir, applicable))
                .or_insert_with(|| chain.clone());
            for a in &ep.addrs {
                let map = format!("{}{}", dir.short(), if a.is_ipv6() { 6 } else { 4 });
                maps.entry(map)
                    .or_default()
                    .insert(*a, format!("jump {chain}"));
            }
        }
    }
    if profiles.is_empty() {
        return None;
    }
    let used: BTreeSet<(usize, Direction)> = profiles
        .keys()
        .flat_map(|(dir, list)| list.iter().map(move |&i| (i, *dir)))
        .collect();
    let mut sets: BTreeSet<EndpointSet> = BTreeSet::new();
    let mut chains = String::new();
    let mut shape = Shape {
        policy_chains: used.len(),
        profiles: profiles.len(),
        ..Shape::default()
    };
    for &(i, dir) in &used {
        let c = &book.policies[i];
        let _ = writeln!(chains, "  chain {} {{", policy_chain(&c.policy.name, dir));
        for rule in merge_adjacent(c.rules(dir).unwrap_or_default()) {
            for line in rule_lines(&rule, dir, &mut sets) {
                shape.rules += 1;
                let _ = writeln!(chains, "    {line}");
            }
        }
        chains.push_str("  }\n");
    }
    for ((dir, list), name) in &profiles {
        let _ = writeln!(chains, "  chain {name} {{");
        for &i in list {
            let _ = writeln!(
                chains,
                "    jump {}",
                policy_chain(&book.policies[i].policy.name, *dir)
            );
        }
        let _ = writeln!(chains, "    counter name {DEFAULT_COUNTER} drop\n  }}");
    }
    let mut elements = maps;
    let mut decl = String::new();
    let by_label = LabelIndex::new(eps, &sets);
    for set in &sets {
        let members: Vec<&PolicyEndpoint> = by_label
            .candidates(set)
            .filter(|e| set.matches(e))
            .collect();
        for v6 in [false, true] {
            let name = set_name(set, v6);
            let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let _ = writeln!(decl, "  set {name} {{ type {ty}; }}");
            let els: BTreeMap<IpAddr, String> = members
                .iter()
                .flat_map(|e| e.addrs.iter().filter(|a| a.is_ipv6() == v6))
                .map(|a| (*a, String::new()))
                .collect();
            elements.insert(name, els);
        }
    }
    let skeleton = format!(
        "table {FAMILY_TABLE} {{\n  counter {DENY_COUNTER} {{ }}\n  counter {DEFAULT_COUNTER} {{ }}\n{decl}{}{}{chains}}}\n",
        MAPS, BASE_CHAINS
    );
    shape.sets = sets.len() * 2;
    shape.elements = elements.values().map(BTreeMap::len).sum();
    Some(Desired {
        skeleton,
        elements,
        shape,
    })
}

/// Endpoints by the label values the sets' selectors require, so a set's members are found
/// among the endpoints carrying its label rather than among all (100,000 endpoints and a
/// hundred sets: a hundred thousand tests, not ten million).
struct LabelIndex<'a> {
    eps: &'a EndpointIndex,
    by: std::collections::HashMap<(&'a str, &'a str), Vec<&'a PolicyEndpoint>>,
}

impl<'a> LabelIndex<'a> {
    fn new(eps: &'a EndpointIndex, sets: &BTreeSet<EndpointSet>) -> LabelIndex<'a> {
        let keys: BTreeSet<String> = sets
            .iter()
            .filter_map(|s| s.selector.as_ref()?.required().map(|(k, _)| k.to_string()))
            .collect();
        let mut by: std::collections::HashMap<(&str, &str), Vec<&PolicyEndpoint>> =
            std::collections::HashMap::new();
        for e in eps.iter() {
            for (k, v) in e.labels.iter() {
                if keys.contains(k) {
                    by.entry((k.as_str(), v.as_str())).or_default().push(e);
                }
            }
        }
        LabelIndex { eps, by }
    }

    /// Every endpoint that may belong to `set` (each once).
    fn candidates<'s>(
        &'s self,
        set: &'s EndpointSet,
    ) -> Box<dyn Iterator<Item = &'a PolicyEndpoint> + 's> {
        match set.selector.as_ref().and_then(|s| s.required()) {
            Some((k, vs)) => Box::new(
                vs.iter()
                    .filter_map(move |v| self.by.get(&(k, v.as_str())))
                    .flatten()
                    .copied(),
            ),
            None => Box::new(self.eps.iter()),
        }
    }
}

const MAPS: &str = "  map in4 { type ipv4_addr : verdict; }
  map in6 { type ipv6_addr : verdict; }
  map out4 { type ipv4_addr : verdict; }
  map out6 { type ipv6_addr : verdict; }
";

/// The one base chain and the ingress half it continues to. Neighbour discovery between
/// containers is bridged through the forward hook too; it is never policy's to stop (a lost
/// advertisement would break allowed traffic afterwards).
const BASE_CHAINS: &str = "  chain forward {
    type filter hook forward priority filter + 1; policy accept;
    ct state established,related accept
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    ip saddr vmap @out4
    ip6 saddr vmap @out6
    goto ingress
  }
  chain ingress {
    ip daddr vmap @in4
    ip6 daddr vmap @in6
    accept
  }
";

/// The base chain's name (the agent checks that it exists).
pub const BASE_CHAIN: &str = "forward";

/// Adjacent rules with the same action and ports whose peers are all plain blocks become one:
/// whichever of them matches first, the verdict is the same, so their peers can be unioned
/// (and then looked up at once). Other rules keep their place.
fn merge_adjacent(rules: &[RuleMatch]) -> Vec<RuleMatch> {
    let plain = |r: &RuleMatch| {
        !r.peers.is_empty()
            && r.peers
                .iter()
                .all(|p| matches!(p, PeerMatch::Cidr { except, .. } if except.is_empty()))
    };
    let mut out: Vec<RuleMatch> = Vec::new();
    for r in rules {
        match out.last_mut() {
            Some(last)
                if plain(last) && plain(r) && last.action == r.action && last.ports == r.ports =>
            {
                last.peers.extend(r.peers.iter().cloned())
            }
            _ => out.push(r.clone()),
        }
    }
    out
}

/// One rule as nft lines: one per (peer match, protocol) pair.
fn rule_lines(rule: &RuleMatch, dir: Direction, sets: &mut BTreeSet<EndpointSet>) -> Vec<String> {
    let field = match dir {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    let mut peers: Vec<String> = Vec::new();
    // Plain blocks of one family share one rule (an anonymous interval set: one lookup).
    let mut plain: [Vec<IpNet>; 2] = [Vec::new(), Vec::new()];
    for p in &rule.peers {
        match p {
            PeerMatch::Endpoints(set) => {
                sets.insert(set.clone());
                peers.push(format!("ip {field} @{}", set_name(set, false)));
                peers.push(format!("ip6 {field} @{}", set_name(set, true)));
            }
            PeerMatch::Cidr { net, except } if except.is_empty() => {
                plain[usize::from(net.addr().is_ipv6())].push(*net);
            }
            PeerMatch::Cidr { net, except } => peers.push(cidr_match(field, net, except)),
        }
    }
    for (fam, nets) in ["ip", "ip6"].iter().zip(plain) {
        match nets.as_slice() {
            [] => {}
            [one] => peers.push(format!("{fam} {field} {one}")),
            many => peers.push(format!("{fam} {field} {{ {} }}", interval_list(many))),
        }
    }
    if rule.peers.is_empty() {
        peers.push(String::new());
    }
    let ports = port_matches(&rule.ports);
    // An egress allow leaves the decision to the destination's ingress policies.
    let verdict = match (rule.action, dir) {
        (Action::Allow, Direction::Ingress) => "accept",
        (Action::Allow, Direction::Egress) => "goto ingress",
        (Action::Deny, _) => DENY_VERDICT,
    };
    let mut out = Vec::new();
    for p in &peers {
        for q in &ports {
            let parts: Vec<&str> = [p.as_str(), q.as_str(), verdict]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            out.push(parts.join(" "));
        }
    }
    out
}

/// Blocks as an nft interval list: merged (nft refuses overlapping intervals), sorted.
fn interval_list(nets: &[IpNet]) -> String {
    let merged = IpNet::aggregate(&nets.to_vec());
    merged
        .iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn cidr_match(field: &str, net: &IpNet, except: &[IpNet]) -> String {
    let fam = if net.addr().is_ipv6() { "ip6" } else { "ip" };
    let mut s = format!("{fam} {field} {net}");
    if !except.is_empty() {
        let list: Vec<String> = except.iter().map(IpNet::to_string).collect();
        let _ = write!(s, " {fam} {field} != {{ {} }}", list.join(", "));
    }
    s
}

/// `meta l4proto P th dport { … }` per protocol named; one empty match when no port is named.
fn port_matches(ports: &[PortRange]) -> Vec<String> {
    if ports.is_empty() {
        return vec![String::new()];
    }
    let mut by: BTreeMap<Proto, Vec<&PortRange>> = BTreeMap::new();
    for p in ports {
        by.entry(p.proto).or_default().push(p);
    }
    by.into_iter()
        .map(|(proto, rs)| {
            if rs.iter().any(|r| (r.first, r.last) == (1, 65535)) {
                return format!("meta l4proto {}", proto.as_str());
            }
            let list: Vec<String> = rs
                .iter()
                .map(|r| match r.first == r.last {
                    true => r.first.to_string(),
                    false => format!("{}-{}", r.first, r.last),
                })
                .collect();
            format!(
                "meta l4proto {} th dport {{ {} }}",
                proto.as_str(),
                list.join(", ")
            )
        })
        .collect()
}

/// Elements per command, so no single line grows without bound.
const CHUNK: usize = 4096;

fn element_cmds(out: &mut String, verb: &str, set: &str, items: &[String]) {
    for chunk in items.chunks(CHUNK) {
        let _ = writeln!(
            out,
            "{verb} element {FAMILY_TABLE} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}

fn element(k: &IpAddr, v: &str) -> String {
    if v.is_empty() {
        k.to_string()
    } else {
        format!("{k} : {v}")
    }
}

/// The whole table again, in one transaction (created if missing, then replaced).
pub fn full_batch(d: &Desired) -> String {
    let mut out = format!(
        "table {FAMILY_TABLE} {{}}\ndelete table {FAMILY_TABLE}\n{}",
        d.skeleton
    );
    for (set, els) in &d.elements {
        let items: Vec<String> = els.iter().map(|(k, v)| element(k, v)).collect();
        element_cmds(&mut out, "add", set, &items);
    }
    out
}

/// Only the elements that changed between two desired states of one skeleton (deletions
/// first, so a map key whose verdict changed is replaced).
pub fn element_diff(old: &Desired, new: &Desired) -> String {
    let mut out = String::new();
    let empty = BTreeMap::new();
    for (set, els) in &old.elements {
        let now = new.elements.get(set).unwrap_or(&empty);
        let gone: Vec<String> = els
            .iter()
            .filter(|(k, v)| now.get(*k) != Some(v))
            .map(|(k, _)| k.to_string())
            .collect();
        element_cmds(&mut out, "delete", set, &gone);
    }
    for (set, els) in &new.elements {
        let before = old.elements.get(set).unwrap_or(&empty);
        let added: Vec<String> = els
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, v)| element(k, v))
            .collect();
        element_cmds(&mut out, "add", set, &added);
    }
    out
}

/// How to go from `old` (None: unknown, rebuild) to `new` (None: no table).
pub fn plan(old: Option<&Desired>, new: Option<&Desired>) -> String {
    match (old, new) {
        (_, None) => delete_table(),
        (Some(o), Some(n)) if o.skeleton == n.skeleton => element_diff(o, n),
        (_, Some(n)) => full_batch(n),
    }
}

/// Remove the table (missing is fine).
pub fn delete_table() -> String {
    format!("table {FAMILY_TABLE} {{}}\ndelete table {FAMILY_TABLE}\n")
}

/// True when `ip` is an address of an endpoint `local` accepts (conntrack entries of other
/// hosts' endpoints are their hosts' business).
pub fn is_local(eps: &EndpointIndex, local: &dyn Fn(&PolicyEndpoint) -> bool, ip: IpAddr) -> bool {
    eps.by_ip(ip).is_some_and(local)
}

#[cfg(test)]
mod tests;
