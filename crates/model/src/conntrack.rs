//! Which conntrack entries go stale when producers or published ports change (pure).
//!
//! A NATed flow keeps the destination it was given by its first packet for as long as its
//! conntrack entry lives. A UDP client that sends from a fixed source port every 100 ms keeps
//! its entry alive forever, so a producer that leaves (deregistered, unhealthy, host gone) or a
//! published port whose container is replaced would black-hole it for good (kube-proxy's
//! classic bug). After the nft transaction that stops new flows from reaching the departed
//! address, the entries that still point at it are deleted; the client's next packet is then a
//! new flow and meets the current rules.
//!
//! Only entries whose translated destination departed are deleted: flows to producers that stay
//! are never touched. UDP entries go whenever their producer leaves the service. A TCP
//! connection is its own session: it is cut only when its producer is known to be dead
//! (failing its check, its host gone, its container removed), so the client's next segment
//! meets a live producer and is reset at once instead of retransmitting into nothing. A
//! producer deregistered while its container still runs keeps its established connections
//! (they drain, as Kubernetes lets terminating endpoints do); see [`draining`]. The decision rests on what the load balancer or the edge programmed from
//! validated store records ([`LbState`], [`PublishedPort`]), never on anything a container says.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::discovery::DiscoveryView;
use crate::edge::PublishedPort;
use crate::lb::{Backend, LbState};
use crate::portmap::Protocol;

/// One conntrack entry as read from the kernel: the original direction's tuple, the reply
/// direction's source (the translated destination) and whether the destination was NATed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    /// Source address the first packet had.
    pub orig_src: IpAddr,
    /// Destination address the first packet had (a VIP, a host address).
    pub orig_dst: IpAddr,
    /// Source port of the first packet.
    pub orig_sport: u16,
    /// Destination port of the first packet.
    pub orig_dport: u16,
    /// Source of replies: the address the flow was DNATed to (or `orig_dst` without DNAT).
    pub reply_src: IpAddr,
    /// Source port of replies.
    pub reply_sport: u16,
    /// The kernel's IPS_DST_NAT status bit.
    pub dnat: bool,
}

/// Where new flows of a service or published port are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// One address and port (a VIP, a port published on one host address).
    Address {
        /// The address.
        addr: IpAddr,
        /// The port.
        port: u16,
    },
    /// A port on every local address of the host (ingress, a port published on all
    /// addresses), of one family.
    AnyLocal {
        /// IPv6 (else IPv4).
        v6: bool,
        /// The port.
        port: u16,
    },
}

/// A translated destination: address and port.
pub type Target = (IpAddr, u16);

/// Which entries of a frontend are stale.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stale {
    /// DNATed flows whose target is not one of the frontend's remaining producers
    /// (`targets`) and whose address is not draining (`draining`, TCP and SCTP only).
    DnatNotIn {
        /// Targets the frontend still sends new flows to.
        targets: BTreeSet<Target>,
        /// Addresses of departed producers whose sessions are left to drain.
        draining: BTreeSet<IpAddr>,
    },
    /// DNATed flows to exactly this target (a removed container's published port).
    DnatTo(Target),
    /// Flows that were not DNATed at all: they reached the host itself while the frontend had
    /// nowhere to send them (UDP only; see [`serving_again`]).
    Undelivered,
}

/// A rule for deleting conntrack entries: protocol, frontend and which of its flows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlushRule {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Where the flows were addressed.
    pub frontend: Frontend,
    /// Which of them are stale.
    pub stale: Stale,
}

/// IP protocol number of a transport protocol.
pub fn ip_protocol(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

impl FlushRule {
    /// True when `flow` must be deleted. `local` tells whether an address is the host's own
    /// (only asked for [`Frontend::AnyLocal`] flows that were not DNATed).
    pub fn matches(&self, flow: &Flow, local: &dyn Fn(IpAddr) -> bool) -> bool {
        if flow.protocol != ip_protocol(self.protocol) {
            return false;
        }
        let addressed = match self.frontend {
            Frontend::Address { addr, port } => flow.orig_dst == addr && flow.orig_dport == port,
            Frontend::AnyLocal { v6, port } => {
                flow.orig_dst.is_ipv6() == v6 && flow.orig_dport == port
            }
        };
        if !addressed {
            return false;
        }
        let target = (flow.reply_src, flow.reply_sport);
        match &self.stale {
            Stale::DnatNotIn { targets, draining } => {
                flow.dnat && !targets.contains(&target) && !draining.contains(&flow.reply_src)
            }
            Stale::DnatTo(t) => flow.dnat && *t == target,
            Stale::Undelivered => {
                !flow.dnat
                    && (matches!(self.frontend, Frontend::Address { .. }) || local(flow.orig_dst))
            }
        }
    }
}

/// True when any rule matches `flow`.
pub fn is_stale(rules: &[FlushRule], flow: &Flow, local: &dyn Fn(IpAddr) -> bool) -> bool {
    rules.iter().any(|r| r.matches(flow, local))
}

/// True when `flow` has one of `addrs` at either end (before or after translation): after a
/// container moved to other addresses (`model::journal::plan_move`), its host's entries of the
/// addresses it left go, so a flow of the block's new owner is never matched to them.
pub fn involves(flow: &Flow, addrs: &BTreeSet<IpAddr>) -> bool {
    [flow.orig_src, flow.orig_dst, flow.reply_src]
        .iter()
        .any(|a| addrs.contains(a))
}

/// Every frontend the load balancer serves, with its protocol and current targets (empty
/// for a VIP port without healthy producers).
fn lb_frontends(st: &LbState) -> BTreeMap<(Protocol, Frontend), BTreeSet<Target>> {
    let targets = |chain: &str| -> BTreeSet<Target> {
        st.chains
            .get(chain)
            .map(|c| {
                c.backends
                    .iter()
                    .map(|b: &Backend| (b.addr, b.port))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = BTreeMap::new();
    for (k, chain) in &st.vips {
        let f = Frontend::Address {
            addr: k.vip,
            port: k.port,
        };
        out.insert((k.protocol, f), targets(chain));
    }
    for k in &st.no_producers {
        let f = Frontend::Address {
            addr: k.vip,
            port: k.port,
        };
        out.entry((k.protocol, f)).or_default();
    }
    for (k, chain) in &st.ingress {
        let f = Frontend::AnyLocal {
            v6: k.v6,
            port: k.port,
        };
        out.insert((k.protocol, f), targets(chain));
    }
    out
}

/// Addresses of producers whose TCP (and SCTP) sessions may drain rather than be cut: every
/// address a container holds on a live host (or on no host: single-host endpoints), except
/// those of registered producers that fail their check or whose host is gone. A producer that
/// was deregistered while its container still runs is draining; one whose container was
/// removed, or that is not a ferrynet container (nothing is known about it), is not.
pub fn draining(view: &DiscoveryView) -> BTreeSet<IpAddr> {
    let mut alive: BTreeSet<IpAddr> = view
        .endpoints
        .iter()
        .filter(|e| {
            e.host
                .as_deref()
                .is_none_or(|h| view.live_hosts.contains(h))
        })
        .flat_map(|e| e.addrs.iter().copied())
        .collect();
    for p in view.producers.values() {
        if !view.is_healthy(p) {
            for a in &p.addrs {
                alive.remove(a);
            }
        }
    }
    alive
}

fn keep_rule(
    protocol: Protocol,
    frontend: Frontend,
    targets: BTreeSet<Target>,
    draining: &BTreeSet<IpAddr>,
) -> FlushRule {
    // UDP has no session to drain: a departed producer's datagrams must move at once.
    let draining = if protocol == Protocol::Udp {
        BTreeSet::new()
    } else {
        draining.clone()
    };
    FlushRule {
        protocol,
        frontend,
        stale: Stale::DnatNotIn { targets, draining },
    }
}

/// Addresses of producers that left a TCP (or SCTP) frontend while they were draining: their
/// sessions are cut once they stop draining. Carried from one [`lb_flush`] to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drains {
    departed: BTreeSet<IpAddr>,
}

impl Drains {
    /// Addresses still draining after leaving a frontend.
    pub fn departed(&self) -> &BTreeSet<IpAddr> {
        &self.departed
    }
}

/// What the load balancer must flush after turning `old` into `new` (both as programmed);
/// `draining` is [`draining`] of the view `new` was made from, `drains` what earlier calls
/// left draining (updated here):
///
/// - a frontend that lost a target (producer gone, unhealthy, its host gone, the service or
///   port removed): its DNATed flows to anything but its remaining targets (TCP: and but
///   draining addresses, which are remembered in `drains`);
/// - every TCP frontend when a remembered address stopped draining (the deregistered
///   producer's container was removed afterwards, or its host died): the same rule, which
///   now cuts its sessions. Other containers coming and going cost nothing;
/// - a UDP frontend that had no target and now has one: its flows that reached the host
///   undelivered meanwhile (an ingress port without producers is not in the ingress map, so
///   its datagrams went to the host itself and their entry would outlive the producer's
///   return).
///
/// With `old` unknown (the agent starts, or rebuilds after a failure) every served frontend
/// keeps only its current targets, so entries left by producers that departed while no agent
/// watched are swept too.
pub fn lb_flush(
    old: Option<&LbState>,
    new: &LbState,
    draining: &BTreeSet<IpAddr>,
    drains: &mut Drains,
) -> Vec<FlushRule> {
    let now = lb_frontends(new);
    let mut rules = Vec::new();
    let ended: BTreeSet<IpAddr> = drains.departed.difference(draining).copied().collect();
    drains.departed.retain(|a| !ended.contains(a));
    let Some(old) = old else {
        for ((protocol, frontend), keep) in now {
            rules.push(keep_rule(protocol, frontend, keep, draining));
        }
        return rules;
    };
    let before = lb_frontends(old);
    for ((protocol, frontend), had) in &before {
        let keep = now
            .get(&(*protocol, *frontend))
            .cloned()
            .unwrap_or_default();
        let lost: Vec<&Target> = had.iter().filter(|t| !keep.contains(t)).collect();
        if *protocol != Protocol::Udp {
            drains
                .departed
                .extend(lost.iter().map(|t| t.0).filter(|a| draining.contains(a)));
        }
        if !lost.is_empty() || (*protocol != Protocol::Udp && !ended.is_empty()) {
            rules.push(keep_rule(*protocol, *frontend, keep, draining));
        }
    }
    for ((protocol, frontend), has) in &now {
        let had_none = before
            .get(&(*protocol, *frontend))
            .is_none_or(|t| t.is_empty());
        if *protocol == Protocol::Udp && had_none && !has.is_empty() {
            rules.push(serving_again(*protocol, *frontend));
        }
    }
    rules
}

/// The rule for flows of `frontend` that were not DNATed: they reached the host itself while
/// nothing was published there. Only UDP: a TCP flow to a closed local port ends with a reset
/// on its own, and deleting TCP entries to a local port could cut the host's own sessions.
fn serving_again(protocol: Protocol, frontend: Frontend) -> FlushRule {
    FlushRule {
        protocol,
        frontend,
        stale: Stale::Undelivered,
    }
}

fn published_frontend(p: &PublishedPort) -> Frontend {
    match p.mapping.host_ip {
        Some(addr) => Frontend::Address {
            addr,
            port: p.mapping.host_port,
        },
        None => Frontend::AnyLocal {
            v6: p.container_ip.is_ipv6(),
            port: p.mapping.host_port,
        },
    }
}

/// What to flush after a container's published ports were withdrawn: the flows DNATed to it
/// through them (its address and container port; every protocol).
pub fn unpublished_flush(ports: &[PublishedPort]) -> Vec<FlushRule> {
    let mut rules: Vec<FlushRule> = ports
        .iter()
        .map(|p| FlushRule {
            protocol: p.mapping.protocol,
            frontend: published_frontend(p),
            stale: Stale::DnatTo((p.container_ip, p.mapping.container_port)),
        })
        .collect();
    rules.sort();
    rules.dedup();
    rules
}

/// What to flush after a container's ports were published: UDP flows to those ports that
/// reached the host undelivered (sent while no container published them, e.g. while the
/// previous container was being replaced), so their next datagram is DNATed to this one.
pub fn published_flush(ports: &[PublishedPort]) -> Vec<FlushRule> {
    let mut rules: Vec<FlushRule> = ports
        .iter()
        .filter(|p| p.mapping.protocol == Protocol::Udp)
        .map(|p| serving_again(Protocol::Udp, published_frontend(p)))
        .collect();
    rules.sort();
    rules.dedup();
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::published_ports;
    use crate::lb::desired;
    use crate::network::keys as nkeys;
    use crate::portmap::PortMapping;
    use crate::service::{keys as skeys, IngressPort, Producer, Service, ServicePort};

    const VIP: &str = "10.96.0.5";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn service(protocol: Protocol) -> Service {
        Service {
            ports: vec![ServicePort {
                name: "dns".into(),
                port: 53,
                protocol,
            }],
            vips: vec![ip(VIP)],
            ingress: vec![IngressPort {
                published: 5353,
                target: 53,
                protocol,
                local: false,
            }],
            ..Service::named("dns")
        }
    }
    fn producer(id: &str, host: &str, addr: &str) -> Producer {
        Producer {
            service: "dns".into(),
            id: id.into(),
            host: Some(host.into()),
            network: None,
            container: None,
            netns: None,
            addrs: vec![ip(addr)],
            ports: [(53, 5300)].into(),
            check: None,
        }
    }
    fn view(protocol: Protocol, producers: &[(&str, &str, &str)]) -> DiscoveryView {
        let mut v = DiscoveryView::default();
        for h in ["h1", "h2"] {
            v.put(&nkeys::host(h), b"{}");
        }
        v.put(
            &skeys::service("dns"),
            &serde_json::to_vec(&service(protocol)).unwrap(),
        );
        for (id, host, addr) in producers {
            v.put(
                &skeys::producer("dns", id),
                &serde_json::to_vec(&producer(id, host, addr)).unwrap(),
            );
        }
        v
    }
    /// A flow from a client to `dst:dport`, DNATed to `to` (or not NATed when `to` is None).
    fn flow(proto: u8, dst: &str, dport: u16, to: Option<(&str, u16)>) -> Flow {
        let (reply_src, reply_sport, dnat) = match to {
            Some((a, p)) => (ip(a), p, true),
            None => (ip(dst), dport, false),
        };
        Flow {
            protocol: proto,
            orig_src: ip("10.20.0.9"),
            orig_dst: ip(dst),
            orig_sport: 40000,
            orig_dport: dport,
            reply_src,
            reply_sport,
            dnat,
        }
    }
    fn none() -> BTreeSet<IpAddr> {
        BTreeSet::new()
    }
    fn nothing() -> BTreeSet<IpAddr> {
        BTreeSet::new()
    }
    fn nowhere(_: IpAddr) -> bool {
        false
    }
    fn host_addr(a: IpAddr) -> bool {
        a == ip("192.168.7.1")
    }

    #[test]
    fn a_moved_containers_old_addresses_are_matched_at_either_end() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let old: BTreeSet<IpAddr> = [a("10.7.0.10"), a("fd07::a")].into();
        let flow = |src: &str, dst: &str, reply: &str| Flow {
            protocol: 6,
            orig_src: a(src),
            orig_dst: a(dst),
            orig_sport: 40000,
            orig_dport: 7000,
            reply_src: a(reply),
            reply_sport: 7000,
            dnat: src != reply && dst != reply,
        };
        assert!(involves(&flow("10.7.0.10", "10.7.0.3", "10.7.0.3"), &old));
        assert!(involves(&flow("10.7.0.3", "10.7.0.10", "10.7.0.10"), &old));
        // DNATed to it through a published port or a VIP.
        assert!(involves(
            &flow("192.0.2.9", "10.96.0.20", "10.7.0.10"),
            &old
        ));
        assert!(involves(&flow("fd07::3", "fd07::a", "fd07::a"), &old));
        // Its new address and everyone else's stay.
        assert!(!involves(&flow("10.7.0.18", "10.7.0.3", "10.7.0.3"), &old));
        assert!(!involves(&flow("10.7.0.3", "10.7.0.11", "10.7.0.11"), &old));
        assert!(!involves(
            &flow("10.7.0.3", "10.7.0.11", "10.7.0.11"),
            &BTreeSet::new()
        ));
    }

    #[test]
    fn a_departed_producer_loses_its_flows_and_the_remaining_one_keeps_them() {
        let old = desired(
            &view(
                Protocol::Udp,
                &[("a", "h1", "10.20.0.2"), ("b", "h2", "10.20.0.66")],
            ),
            "h1",
        );
        let new = desired(&view(Protocol::Udp, &[("b", "h2", "10.20.0.66")]), "h1");
        let rules = lb_flush(Some(&old), &new, &none(), &mut Drains::default());
        let to_a = flow(17, VIP, 53, Some(("10.20.0.2", 5300)));
        let to_b = flow(17, VIP, 53, Some(("10.20.0.66", 5300)));
        assert!(is_stale(&rules, &to_a, &nowhere), "{rules:?}");
        assert!(!is_stale(&rules, &to_b, &nowhere), "{rules:?}");
        // Through ingress (any local address) too.
        let ingress_a = flow(17, "192.168.7.1", 5353, Some(("10.20.0.2", 5300)));
        assert!(is_stale(&rules, &ingress_a, &nowhere));
        // Not the same address reached directly (no DNAT), nor another port or protocol.
        assert!(!is_stale(
            &rules,
            &flow(17, "10.20.0.2", 5300, None),
            &host_addr
        ));
        assert!(!is_stale(
            &rules,
            &flow(6, VIP, 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, "10.96.0.6", 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        // Nothing changed: nothing to flush.
        assert!(lb_flush(Some(&new), &new, &none(), &mut Drains::default()).is_empty());
        // A producer joining removes nothing either (only the UDP "serving again" rule when
        // the frontend had none).
        assert!(lb_flush(Some(&new), &old, &none(), &mut Drains::default()).is_empty());
    }

    #[test]
    fn tcp_flows_follow_producers_too() {
        let old = desired(
            &view(
                Protocol::Tcp,
                &[("a", "h1", "10.20.0.2"), ("b", "h2", "10.20.0.66")],
            ),
            "h1",
        );
        let new = desired(&view(Protocol::Tcp, &[("a", "h1", "10.20.0.2")]), "h1");
        let rules = lb_flush(Some(&old), &new, &none(), &mut Drains::default());
        assert!(is_stale(
            &rules,
            &flow(6, VIP, 53, Some(("10.20.0.66", 5300))),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(6, VIP, 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        // No "undelivered" rule for TCP.
        assert!(rules.iter().all(|r| r.stale != Stale::Undelivered));
    }

    #[test]
    fn a_producer_moving_to_a_new_address_flushes_the_old_one() {
        let old = desired(&view(Protocol::Udp, &[("a", "h1", "10.20.0.2")]), "h1");
        let new = desired(&view(Protocol::Udp, &[("a", "h2", "10.20.0.70")]), "h1");
        let rules = lb_flush(Some(&old), &new, &none(), &mut Drains::default());
        assert!(is_stale(
            &rules,
            &flow(17, VIP, 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, VIP, 53, Some(("10.20.0.70", 5300))),
            &nowhere
        ));
    }

    #[test]
    fn the_last_producer_leaving_flushes_all_and_its_return_flushes_undelivered_udp() {
        let one = desired(&view(Protocol::Udp, &[("a", "h1", "10.20.0.2")]), "h1");
        let none = desired(&view(Protocol::Udp, &[]), "h1");
        let rules = lb_flush(Some(&one), &none, &nothing(), &mut Drains::default());
        assert!(is_stale(
            &rules,
            &flow(17, VIP, 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        let back = lb_flush(Some(&none), &one, &nothing(), &mut Drains::default());
        // Datagrams to the ingress port went to the host itself meanwhile.
        let undelivered = flow(17, "192.168.7.1", 5353, None);
        assert!(is_stale(&back, &undelivered, &host_addr), "{back:?}");
        // Not flows to the same port on a foreign address (the host's own outgoing flows).
        let outgoing = flow(17, "198.51.100.1", 5353, None);
        assert!(!is_stale(&back, &outgoing, &host_addr));
        // Nor DNATed flows (they are the new producer's).
        assert!(!is_stale(
            &back,
            &flow(17, VIP, 53, Some(("10.20.0.2", 5300))),
            &host_addr
        ));
    }

    fn endpoint(v: &mut DiscoveryView, id: &str, host: &str, addr: &str) {
        let ep = serde_json::json!({
            "network": "fabric", "containerId": id, "ifname": "eth0",
            "ips": [format!("{addr}/24")], "host": host
        });
        v.put(
            &nkeys::endpoint("fabric", id, "eth0"),
            ep.to_string().as_bytes(),
        );
    }

    #[test]
    fn tcp_to_a_deregistered_running_container_drains_but_udp_moves() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let mut both = view(
                protocol,
                &[("a", "h1", "10.20.0.2"), ("b", "h2", "10.20.0.66")],
            );
            endpoint(&mut both, "ca", "h1", "10.20.0.2");
            endpoint(&mut both, "cb", "h2", "10.20.0.66");
            let old = desired(&both, "h1");
            let mut gone = both.clone();
            gone.delete(&skeys::producer("dns", "b"));
            let new = desired(&gone, "h1");
            let proto = ip_protocol(protocol);
            let to_b = flow(proto, VIP, 53, Some(("10.20.0.66", 5300)));
            // Deregistered, container still there: TCP drains, UDP moves.
            let mut drains = Drains::default();
            let rules = lb_flush(Some(&old), &new, &draining(&gone), &mut drains);
            assert_eq!(
                is_stale(&rules, &to_b, &nowhere),
                protocol == Protocol::Udp,
                "{protocol:?} {rules:?}"
            );
            // Another container removed meanwhile: nothing to do.
            let mut other = gone.clone();
            endpoint(&mut other, "cx", "h1", "10.20.0.9");
            let before = drains.clone();
            assert!(lb_flush(Some(&new), &new, &draining(&other), &mut drains).is_empty());
            assert!(lb_flush(Some(&new), &new, &draining(&gone), &mut drains).is_empty());
            assert_eq!(drains, before);
            // Its container removed in the same view: dead, cut.
            let mut removed = gone.clone();
            removed.delete(&nkeys::endpoint("fabric", "cb", "eth0"));
            let rules = lb_flush(
                Some(&old),
                &new,
                &draining(&removed),
                &mut Drains::default(),
            );
            assert!(is_stale(&rules, &to_b, &nowhere), "{protocol:?}");
            // ... and (TCP: UDP went at the deregistration) in a later view that changes
            // nothing in the load balancer; once.
            let rules = lb_flush(Some(&new), &new, &draining(&removed), &mut drains);
            assert_eq!(
                is_stale(&rules, &to_b, &nowhere),
                protocol == Protocol::Tcp,
                "{protocol:?} {rules:?}"
            );
            assert!(drains.departed().is_empty());
            assert!(lb_flush(Some(&new), &new, &draining(&removed), &mut drains).is_empty());
            // Its host gone (the producer still registered): dead, cut.
            let mut dead = both.clone();
            dead.delete(&nkeys::host("h2"));
            assert!(!draining(&dead).contains(&ip("10.20.0.66")));
            let rules = lb_flush(
                Some(&old),
                &desired(&dead, "h1"),
                &draining(&dead),
                &mut Drains::default(),
            );
            assert!(is_stale(&rules, &to_b, &nowhere), "{protocol:?}");
            // The remaining producer's flows are never touched.
            let to_a = flow(proto, VIP, 53, Some(("10.20.0.2", 5300)));
            assert!(!is_stale(&rules, &to_a, &nowhere));
        }
    }

    #[test]
    fn a_rebuild_keeps_only_current_targets() {
        let st = desired(&view(Protocol::Udp, &[("b", "h2", "10.20.0.66")]), "h1");
        let rules = lb_flush(None, &st, &none(), &mut Drains::default());
        assert!(is_stale(
            &rules,
            &flow(17, VIP, 53, Some(("10.20.0.2", 5300))),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, VIP, 53, Some(("10.20.0.66", 5300))),
            &nowhere
        ));
    }

    #[test]
    fn a_replaced_published_port_flushes_its_old_container_only() {
        let m = PortMapping {
            host_port: 5353,
            container_port: 53,
            protocol: Protocol::Udp,
            host_ip: None,
        };
        let old = published_ports(&[m], &[ip("10.88.0.2"), ip("fd88::2")]);
        let rules = unpublished_flush(&old);
        assert_eq!(rules.len(), 2, "one per family: {rules:?}");
        assert!(is_stale(
            &rules,
            &flow(17, "192.168.7.1", 5353, Some(("10.88.0.2", 53))),
            &nowhere
        ));
        assert!(is_stale(
            &rules,
            &flow(17, "fd07::1", 5353, Some(("fd88::2", 53))),
            &nowhere
        ));
        // Another container's flows (another port published elsewhere) stay.
        assert!(!is_stale(
            &rules,
            &flow(17, "192.168.7.1", 5353, Some(("10.88.0.3", 53))),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, "192.168.7.1", 6000, Some(("10.88.0.2", 53))),
            &nowhere
        ));
        // The new container: datagrams that reached the host in between are flushed.
        let new = published_ports(&[m], &[ip("10.88.0.7")]);
        let rules = published_flush(&new);
        assert!(is_stale(
            &rules,
            &flow(17, "192.168.7.1", 5353, None),
            &host_addr
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, "192.168.7.1", 5353, Some(("10.88.0.7", 53))),
            &host_addr
        ));
        // TCP publishing flushes nothing.
        let tcp = PortMapping {
            protocol: Protocol::Tcp,
            ..m
        };
        assert!(published_flush(&published_ports(&[tcp], &[ip("10.88.0.7")])).is_empty());
    }

    #[test]
    fn a_port_on_one_host_address_matches_only_that_address() {
        let m = PortMapping {
            host_port: 5353,
            container_port: 53,
            protocol: Protocol::Udp,
            host_ip: Some(ip("192.168.7.1")),
        };
        let rules = published_flush(&published_ports(&[m], &[ip("10.88.0.7")]));
        assert!(is_stale(
            &rules,
            &flow(17, "192.168.7.1", 5353, None),
            &nowhere
        ));
        assert!(!is_stale(
            &rules,
            &flow(17, "192.168.7.2", 5353, None),
            &|_| true
        ));
    }
}
