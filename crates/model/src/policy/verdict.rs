//! The one decision: what happens to a new connection SRC -> DST:PORT/proto, and which policy
//! and rule decided it. `ferrynet policy test` prints it; [`super::render`] encodes the same
//! [`PolicyBook`] (the same order, selection and rule matching) as nft rules.
//!
//! Semantics (Kubernetes NetworkPolicy with Calico's order and deny): an endpoint selected by
//! no policy for a direction is open in that direction, unless its network is default-deny.
//! Once selected, its policies are walked in order (lower `order` first, no order last, then
//! by name), each one's rules in turn; the first rule that matches decides; when none does,
//! the connection is denied. Egress is decided at the source endpoint, ingress at the
//! destination endpoint; both must allow. Replies of allowed connections are not decided here:
//! conntrack lets them pass.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use serde::Serialize;

use super::document::{Action, Peer, Policy, PortRange, Proto, Rule};
use super::selector::Selector;
use crate::network::Endpoint;
use crate::pod::PodIdentity;
use crate::portmap::PortMapping;

/// Labels shared between the endpoints that carry the same set (see [`Interner`]).
pub type Labels = Arc<BTreeMap<String, String>>;

/// An endpoint as the agent holds it: what policy decides on, and what discovery's consumers
/// (DNS, the load balancer, templates) read. One record per endpoint, shared through `Arc`
/// by every consumer; strings that many endpoints repeat (network, host, label sets) are
/// interned, so 100,000 endpoints cost a few hundred bytes each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct PolicyEndpoint {
    /// `network/container/ifname`.
    pub id: Arc<str>,
    /// Its DNS name (a `ferrynet run` container's name), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Arc<str>>,
    /// Its network.
    pub network: Arc<str>,
    /// Its host (None: a single-host network's endpoint, on whichever host reads it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Arc<str>>,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Its labels.
    pub labels: Labels,
    /// Further DNS names on its network.
    #[serde(skip)]
    pub aliases: Vec<String>,
    /// The Kubernetes pod it belongs to.
    #[serde(skip)]
    pub pod: Option<Box<PodIdentity>>,
    /// Ports published for it.
    #[serde(skip)]
    pub port_mappings: Vec<PortMapping>,
    /// The store revision that created its record (0: not told); the newest of a pod's
    /// endpoints holds the pod's name.
    #[serde(skip)]
    pub created: u64,
}

impl PolicyEndpoint {
    /// The record of `ep` (stored under `network/container/ifname`), its strings interned.
    pub fn of(ep: Endpoint, created: u64, interner: &Interner) -> PolicyEndpoint {
        PolicyEndpoint {
            id: format!("{}/{}/{}", ep.network, ep.container_id, ep.ifname).into(),
            name: ep.name.map(Arc::from),
            network: interner.str(&ep.network),
            host: ep.host.as_deref().map(|h| interner.str(h)),
            addrs: ep.ips.iter().map(|i| i.addr()).collect(),
            labels: interner.labels(ep.labels),
            aliases: ep.aliases,
            pod: ep.pod.map(Box::new),
            port_mappings: ep.port_mappings,
            created,
        }
    }

    /// The container id (the middle of the id).
    pub fn container_id(&self) -> &str {
        self.id.split('/').nth(1).unwrap_or("")
    }
}

/// Shares equal strings and label sets between endpoint records. Entries nobody else holds any
/// more are dropped when the table has doubled since the last sweep. Clones share the table.
#[derive(Debug, Clone, Default)]
pub struct Interner(Arc<Mutex<Interned>>);

#[derive(Debug, Default)]
struct Interned {
    strs: HashSet<Arc<str>>,
    labels: HashSet<Labels>,
    swept_at: usize,
}

impl Interned {
    fn sweep(&mut self) {
        let n = self.strs.len() + self.labels.len();
        if n > 2 * self.swept_at.max(512) {
            self.strs.retain(|s| Arc::strong_count(s) > 1);
            self.labels.retain(|l| Arc::strong_count(l) > 1);
            self.swept_at = self.strs.len() + self.labels.len();
        }
    }
}

/// Two views are equal whatever their interners hold (bookkeeping, not state).
impl PartialEq for Interner {
    fn eq(&self, _: &Interner) -> bool {
        true
    }
}

impl Interner {
    /// The shared copy of `s`.
    pub fn str(&self, s: &str) -> Arc<str> {
        let Ok(mut t) = self.0.lock() else {
            return s.into();
        };
        if let Some(x) = t.strs.get(s) {
            return x.clone();
        }
        let x: Arc<str> = s.into();
        t.strs.insert(x.clone());
        t.sweep();
        x
    }

    /// The shared copy of `labels`.
    pub fn labels(&self, labels: BTreeMap<String, String>) -> Labels {
        let Ok(mut t) = self.0.lock() else {
            return Arc::new(labels);
        };
        if let Some(x) = t.labels.get(&labels) {
            return x.clone();
        }
        let x = Arc::new(labels);
        t.labels.insert(x.clone());
        t.sweep();
        x
    }
}

/// A direction of traffic relative to a selected endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Connections to the endpoint.
    Ingress,
    /// Connections from the endpoint.
    Egress,
}

impl Direction {
    /// `in` or `out`, for names.
    pub fn short(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        }
    }
}

/// Endpoints a peer names: by selector and/or network. Equal sets share one nft set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointSet {
    /// Labels to match (None: any).
    pub selector: Option<Selector>,
    /// Network to be on (None: any).
    pub network: Option<String>,
}

impl EndpointSet {
    /// True when `ep` belongs to the set.
    pub fn matches(&self, ep: &PolicyEndpoint) -> bool {
        self.network.as_deref().is_none_or(|n| n == &*ep.network)
            && self.selector.as_ref().is_none_or(|s| s.matches(&ep.labels))
    }

    /// A stable spelling (for the nft set's name).
    pub fn key(&self) -> String {
        format!(
            "{}|{}",
            self.network.as_deref().unwrap_or("*"),
            self.selector
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default()
        )
    }
}

/// A compiled peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Addresses of endpoints in the set.
    Endpoints(EndpointSet),
    /// Addresses in `net` but in none of `except`.
    Cidr {
        /// The block.
        net: IpNet,
        /// Holes in it.
        except: Vec<IpNet>,
    },
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// What it does when it matches.
    pub action: Action,
    /// Empty: any peer.
    pub peers: Vec<PeerMatch>,
    /// Empty: any protocol and port.
    pub ports: Vec<PortRange>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The document.
    pub policy: Policy,
    selector: Selector,
    /// Compiled ingress rules, when ingress is restricted.
    pub ingress: Option<Vec<RuleMatch>>,
    /// Compiled egress rules, when egress is restricted.
    pub egress: Option<Vec<RuleMatch>>,
}

impl Compiled {
    /// The rules of a direction (None: the policy does not restrict it).
    pub fn rules(&self, dir: Direction) -> Option<&[RuleMatch]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// True when the policy selects `ep` (its network, its selector).
    pub fn selects(&self, ep: &PolicyEndpoint) -> bool {
        self.policy
            .network
            .as_deref()
            .is_none_or(|n| n == &*ep.network)
            && self.selector.matches(&ep.labels)
    }
}

/// Every policy, compiled and in evaluation order, and the default-deny networks.
#[derive(Debug, Clone, Default)]
pub struct PolicyBook {
    /// In order: `order` (absent last), then name.
    pub policies: Vec<Compiled>,
    /// Networks whose endpoints are selected in both directions even without a policy.
    pub default_deny: BTreeSet<String>,
}

/// Who decided, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "camelCase")]
pub enum Decision {
    /// No policy selects the endpoint in this direction: open.
    Open,
    /// A rule matched.
    Rule {
        /// The policy.
        policy: String,
        /// The rule's index in the direction's list.
        rule: usize,
        /// Its action.
        action: Action,
    },
    /// Selected, but no rule matched: denied.
    Default {
        /// The policies that select it (empty: the network's default-deny alone).
        policies: Vec<String>,
    },
}

impl Decision {
    /// The decision in a sentence, as `ferrynet policy test` and `ferrynet trace` print it.
    pub fn describe(&self) -> String {
        match self {
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

    /// True when the connection may pass this side.
    pub fn allows(&self) -> bool {
        matches!(
            self,
            Decision::Open
                | Decision::Rule {
                    action: Action::Allow,
                    ..
                }
        )
    }
}

impl PolicyBook {
    /// Compile policies (a bad selector, which a checked record cannot hold, selects nothing).
    pub fn new(policies: Vec<Policy>, default_deny: BTreeSet<String>) -> PolicyBook {
        let mut compiled: Vec<Compiled> = policies.into_iter().filter_map(compile).collect();
        compiled.sort_by(|a, b| {
            let key = |c: &Compiled| {
                (
                    c.policy.order.map_or(u64::MAX, u64::from),
                    c.policy.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        PolicyBook {
            policies: compiled,
            default_deny,
        }
    }

    /// Indices (in order) of the policies selecting `ep` that restrict `dir`.
    pub fn applicable(&self, ep: &PolicyEndpoint, dir: Direction) -> Vec<usize> {
        (0..self.policies.len())
            .filter(|&i| {
                let c = &self.policies[i];
                c.rules(dir).is_some() && c.selects(ep)
            })
            .collect()
    }

    /// True when `dir` of `ep` is restricted (by a policy or its network's default-deny).
    pub fn restricted(&self, ep: &PolicyEndpoint, applicable: &[usize]) -> bool {
        !applicable.is_empty() || self.default_deny.contains(&*ep.network)
    }

    /// Decide one side of a connection: `ep`'s `dir`, the other end being `peer_ip` (and the
    /// endpoint holding it, if any), to `port` of `proto` (None: a protocol without ports).
    pub fn decide_side(
        &self,
        ep: &PolicyEndpoint,
        dir: Direction,
        peer_ip: IpAddr,
        peer: Option<&PolicyEndpoint>,
        proto: Option<Proto>,
        port: u16,
    ) -> Decision {
        let applicable = self.applicable(ep, dir);
        if !self.restricted(ep, &applicable) {
            return Decision::Open;
        }
        for &i in &applicable {
            let c = &self.policies[i];
            for (r, rule) in c.rules(dir).unwrap_or_default().iter().enumerate() {
                if rule_matches(rule, peer_ip, peer, proto, port) {
                    return Decision::Rule {
                        policy: c.policy.name.clone(),
                        rule: r,
                        action: rule.action,
                    };
                }
            }
        }
        Decision::Default {
            policies: applicable
                .iter()
                .map(|&i| self.policies[i].policy.name.clone())
                .collect(),
        }
    }
}

fn compile(p: Policy) -> Option<Compiled> {
    let selector = p.parsed_selector()?;
    let net = p.network.clone();
    let rules = |rs: &Option<Vec<Rule>>, ingress: bool| -> Option<Vec<RuleMatch>> {
        rs.as_ref().map(|rs| {
            rs.iter()
                .map(|r| RuleMatch {
                    action: r.action,
                    peers: (if ingress { &r.from } else { &r.to })
                        .iter()
                        .filter_map(|peer| compile_peer(peer, net.as_ref()))
                        .collect(),
                    ports: r.ports.clone(),
                })
                .collect()
        })
    };
    Some(Compiled {
        ingress: rules(&p.ingress, true),
        egress: rules(&p.egress, false),
        selector,
        policy: p,
    })
}

/// A selector peer looks on the policy's network unless it names its own.
fn compile_peer(p: &Peer, policy_net: Option<&String>) -> Option<PeerMatch> {
    if let Some(net) = p.cidr {
        return Some(PeerMatch::Cidr {
            net,
            except: p.except.clone(),
        });
    }
    let selector = match &p.selector {
        Some(s) => Some(Selector::parse(s).ok()?),
        None => None,
    };
    Some(PeerMatch::Endpoints(EndpointSet {
        selector: selector.filter(|s| !s.is_all()),
        network: p.network.clone().or_else(|| policy_net.cloned()),
    }))
}

/// True when `rule` matches the other end and the destination port.
pub fn rule_matches(
    rule: &RuleMatch,
    peer_ip: IpAddr,
    peer: Option<&PolicyEndpoint>,
    proto: Option<Proto>,
    port: u16,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule.peers.iter().any(|p| match p {
            PeerMatch::Endpoints(set) => peer.is_some_and(|e| set.matches(e)),
            PeerMatch::Cidr { net, except } => {
                net.contains(&peer_ip) && !except.iter().any(|e| e.contains(&peer_ip))
            }
        });
    let port_ok = rule.ports.is_empty()
        || proto.is_some_and(|pr| rule.ports.iter().any(|r| r.contains(pr, port)));
    peer_ok && port_ok
}

/// Endpoints by id and by address; kept up to date by upserts and removals (the agent's
/// discovery view holds one, shared with policy). Persistent maps: a clone shares every node,
/// an update copies only its path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointIndex {
    /// Every endpoint, by id.
    pub list: imbl::OrdMap<Arc<str>, Arc<PolicyEndpoint>>,
    /// (address, id) of every address: an address two records claim belongs to the lower id,
    /// whatever order they came in.
    by_ip: imbl::OrdSet<(IpAddr, Arc<str>)>,
}

impl EndpointIndex {
    /// Index `list`.
    pub fn new(list: Vec<PolicyEndpoint>) -> EndpointIndex {
        let mut idx = EndpointIndex::default();
        for e in list {
            idx.upsert(e);
        }
        idx
    }
    /// Add or replace an endpoint.
    pub fn upsert(&mut self, e: PolicyEndpoint) {
        self.remove(&e.id.clone());
        for a in &e.addrs {
            self.by_ip.insert((*a, e.id.clone()));
        }
        self.list.insert(e.id.clone(), Arc::new(e));
    }
    /// Remove an endpoint by id.
    pub fn remove(&mut self, id: &str) -> Option<Arc<PolicyEndpoint>> {
        let e = self.list.remove(id)?;
        for a in &e.addrs {
            self.by_ip.remove(&(*a, e.id.clone()));
        }
        Some(e)
    }
    /// How many endpoints.
    pub fn len(&self) -> usize {
        self.list.len()
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    /// Every endpoint, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &PolicyEndpoint> {
        self.list.values().map(|e| &**e)
    }
    /// True when both share the same maps (nothing changed between them).
    pub fn same(&self, other: &EndpointIndex) -> bool {
        self.list.ptr_eq(&other.list) && self.by_ip.ptr_eq(&other.by_ip)
    }
    /// The endpoint holding `ip`.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&PolicyEndpoint> {
        let (a, id) = self.by_ip.range((ip, Arc::from(""))..).next()?;
        (*a == ip)
            .then(|| self.list.get(id))
            .flatten()
            .map(|e| &**e)
    }
    /// Addresses inside `net` held by an endpoint of `network`, each with its endpoint's id, in
    /// address order (the walk visits only addresses inside `net`).
    pub fn addresses_in<'a>(
        &'a self,
        network: &'a str,
        net: &IpNet,
    ) -> impl Iterator<Item = (IpAddr, &'a Arc<str>)> + 'a {
        let last = net.broadcast();
        self.by_ip
            .range((net.network(), Arc::from(""))..)
            .take_while(move |(a, _)| *a <= last)
            .filter(move |(_, id)| {
                id.strip_prefix(network)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(a, id)| (*a, id))
    }
    /// Endpoints whose name, container id or `network/name` is `who`.
    pub fn by_name(&self, who: &str) -> Vec<&PolicyEndpoint> {
        self.iter()
            .filter(|e| {
                let mut parts = e.id.splitn(3, '/');
                let (net, cid) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let name = e.name.as_deref().unwrap_or(cid);
                who == name || who == cid || who == format!("{net}/{name}")
            })
            .collect()
    }
}

/// One side's decision and whose it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    /// The endpoint (`network/container/ifname`).
    pub endpoint: String,
    /// What its policies decided.
    #[serde(flatten)]
    pub decision: Decision,
}

/// Both sides of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// True when both sides allow it.
    pub allowed: bool,
    /// The source endpoint's egress (None: the source is no endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Side>,
    /// The destination endpoint's ingress (None: the destination is no endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Side>,
}

/// Decide a new connection from `src` to `dst`:`port` over `proto`.
pub fn decide(
    book: &PolicyBook,
    eps: &EndpointIndex,
    src: IpAddr,
    dst: IpAddr,
    proto: Option<Proto>,
    port: u16,
) -> Verdict {
    let (s, d) = (eps.by_ip(src), eps.by_ip(dst));
    let side = |e: &PolicyEndpoint, dir, peer_ip, peer| Side {
        endpoint: e.id.to_string(),
        decision: book.decide_side(e, dir, peer_ip, peer, proto, port),
    };
    let egress = s.map(|e| side(e, Direction::Egress, dst, d));
    let ingress = d.map(|e| side(e, Direction::Ingress, src, s));
    Verdict {
        allowed: egress.as_ref().is_none_or(|x| x.decision.allows())
            && ingress.as_ref().is_none_or(|x| x.decision.allows()),
        egress,
        ingress,
    }
}

#[cfg(test)]
mod tests;
