//! The walk: a packet's steps from its source to the verdict.

use super::*;
use crate::policy::verdict::Side;

/// A step of the walk: the value to go on with, or the walk's end (delivered or dropped).
type Flow<T> = Result<T, Outcome>;

/// Walk the packet from its source: every step it meets, up to the one that delivers or
/// drops it (`Err` ends the walk early with that verdict).
pub(super) fn walk(w: &mut Walk, src: IpAddr, dst: IpAddr) -> Outcome {
    let f = w.f;
    let q = w.q;
    // 1. Where it starts.
    let (mut at, src_ep) = source(w, src);
    // 2. Anti-spoofing at the source's port.
    if let Some(e) = src_ep {
        let h = at.clone().unwrap_or_default();
        anti_spoofing(w, &h, e, src)?;
    }
    // 3. DNAT: a VIP on the sending host, a published or ingress port on the receiving one.
    let target = match dnat(w, &mut at, src, dst) {
        Ok(t) => t,
        Err(end) => return end,
    };
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
        policy(w, h.as_deref(), "egress", side)?;
    }
    // 6. Routing, host by host, to where the target lives.
    let dst_host = destination_host(f, at.as_deref(), dst_ep, dst_net, target.addr);
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
        return no_endpoint(w, &h, dst_net, target.addr);
    };
    if host_src && q.src != Party::Host(h.clone()) {
        isolation(w, Some(&h), src, &target)?;
    }
    local_delivery(w, &h, e, target.addr)?;
    if let Some(side) = &v.ingress {
        policy(w, Some(&h), "ingress", side)?;
    }
    Ok(deliver(w, h, e, &target))
}

/// Where the packet starts: the source's host (None: outside the cluster) and its endpoint.
fn source<'a>(w: &mut Walk<'a>, src: IpAddr) -> (Option<String>, Option<&'a Endpoint>) {
    let f = w.f;
    match &w.q.src {
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
    }
}

/// Anti-spoofing at endpoint `e`'s port on host `h`: `src` must be its own address (and, on
/// this host, its element in the guard's set).
fn anti_spoofing(w: &mut Walk, h: &str, e: &Endpoint, src: IpAddr) -> Result<(), Verdict> {
    let f = w.f;
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
            Some(h),
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
                    Some(h),
                    Step::AntiSpoofing,
                    Basis::Kernel,
                    format!(
                    "element {element} is missing from {table} {set}: the port drops every frame"
                ),
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
        Some(h),
        Step::AntiSpoofing,
        basis,
        format!("element {element} in {table} {set}: its own address"),
    );
    Ok(())
}

/// DNAT: the target after a service VIP (on the sending host) or a published or ingress port
/// (on host destination, which the packet travels to first, moving `at`); the walk ends
/// there when the packet is for that host itself.
fn dnat(w: &mut Walk, at: &mut Option<String>, src: IpAddr, dst: IpAddr) -> Flow<Target> {
    let f = w.f;
    let q = w.q;
    let mut target = Target {
        addr: dst,
        port: q.port,
        dnat: false,
    };
    if let Some(svc) = f.services.iter().find(|s| s.vips.contains(&dst)) {
        let dnat_host = at.clone();
        target = vip_dnat(w, dnat_host.as_deref(), svc, dst).map_err(Err)?;
    } else if let Party::Host(h) = &q.dst {
        // The packet travels to host h first (unless it is already there).
        if at.as_deref() != Some(h.as_str()) {
            route_segment(w, at.as_deref(), src, dst, Some(h)).map_err(Err)?;
            *at = Some(h.clone());
        }
        match host_dnat(w, h, dst).map_err(Err)? {
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
                return Err(Ok(Verdict {
                    delivered: true,
                    step: Step::Destination,
                    host: Some(h.clone()),
                    reason: format!("delivered to host {h}'s own stack ({dst})"),
                }));
            }
        }
    }
    Ok(target)
}

/// One side's policy decision (`dir`: egress or ingress) on host `h`: a hop, or the drop.
fn policy(w: &mut Walk, h: Option<&str>, dir: &str, side: &Side) -> Result<(), Verdict> {
    let ok = side.decision.allows();
    let what = format!("{dir} of {}: {}", side.endpoint, side.decision.describe());
    if !ok {
        return Err(w.drop(h, Step::Policy, Basis::Store, what));
    }
    w.hop(h, Step::Policy, Basis::Store, what);
    Ok(())
}

/// The host the target lives on: its endpoint's, its block's owner, or (a single-host
/// network's unused address) the host in question; None: outside the cluster.
fn destination_host(
    f: &Facts,
    at: Option<&str>,
    dst_ep: Option<&Endpoint>,
    dst_net: Option<&Network>,
    addr: IpAddr,
) -> Option<String> {
    match dst_ep {
        Some(e) => Some(ep_host(e, at.unwrap_or(&f.me))),
        None => block_owner(f, addr).or_else(|| {
            // A single-host network's unused address: on the host in question.
            dst_net
                .filter(|n| n.fabric.is_none())
                .and_then(|_| at.map(str::to_string))
        }),
    }
}

/// On host `h` with no endpoint holding `addr`: dropped inside a network's pool, else
/// delivered to the host's own stack.
fn no_endpoint(w: &mut Walk, h: &str, dst_net: Option<&Network>, addr: IpAddr) -> Outcome {
    if let Some(n) = dst_net {
        return Err(w.drop(
            Some(h),
            Step::Destination,
            Basis::Store,
            format!(
                "no endpoint holds {} in network {} ({})",
                addr,
                n.name,
                if n.mode == NetworkMode::Routed {
                    "the block's `unreachable` route answers with an ICMP error"
                } else {
                    "nobody answers ARP/ND on the bridge"
                }
            ),
        ));
    }
    Ok(Verdict {
        delivered: true,
        step: Step::Destination,
        host: Some(h.to_string()),
        reason: format!("delivered to host {h}'s own stack ({})", addr),
    })
}

/// The last step: endpoint `e` on host `h` receives the packet at the target's port.
fn deliver(w: &mut Walk, h: String, e: &Endpoint, target: &Target) -> Verdict {
    let q = w.q;
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
    Verdict {
        delivered: true,
        step: Step::Destination,
        host: Some(h),
        reason: format!("delivered to {} ({}) {port}", ep_label(e), target.addr),
    }
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
