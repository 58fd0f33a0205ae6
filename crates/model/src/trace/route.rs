//! Routes and backend hops between hosts, and the last hop into the endpoint.

use super::*;

/// The path from host `from` (None: outside the cluster) to host `to` (None: outside) for
/// `dst`: this host's kernel lookup when `from` is this host, the fabric model otherwise.
pub(super) fn route_segment(
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
    if to.is_none() {
        // Leaving the cluster: an `--internal` network's containers have no route out.
        if let Some(n) = network_of(f, src).filter(|n| n.internal) {
            return Err(w.drop(
                Some(from),
                Step::Route,
                Basis::Store,
                format!(
                    "network {} is internal: its containers have no route out",
                    n.name
                ),
            ));
        }
    }
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
pub(super) fn local_delivery(
    w: &mut Walk,
    h: &str,
    e: &Endpoint,
    addr: IpAddr,
) -> Result<(), Verdict> {
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
