//! Routes and backend hops between hosts, and the last hop into the endpoint.

use super::*;
use crate::fabric::Peer;
use crate::network::FabricSpec;
use crate::sleeve::SleeveRecord;

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
    let expect = expected(w, from, to, dst)?;
    let basis = w.basis_on(from);
    if from == f.me {
        let Some(r) = w.kernel_route(dst) else {
            return Ok(());
        };
        kernel_route_hop(w, from, to, src, dst, &r, expect.as_ref())?;
    } else {
        model_route_hop(w, from, to, src, dst, basis, expect.as_ref());
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

/// The fabric's expectation on `from` for `dst` on host `to`: which backend, which next hop
/// (None: nothing to expect, as for a packet leaving the cluster or staying on `from`).
fn expected(
    w: &mut Walk,
    from: &str,
    to: Option<&str>,
    dst: IpAddr,
) -> Result<Option<Expected>, Verdict> {
    let f = w.f;
    let dst_net = network_of(f, dst);
    Ok(match (to, dst_net) {
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
    })
}

/// This host's kernel route `r` for `dst`, held against the fabric's expectation: a hop, or
/// the drop when there is no route or it is not the fabric's path.
fn kernel_route_hop(
    w: &mut Walk,
    from: &str,
    to: Option<&str>,
    src: IpAddr,
    dst: IpAddr,
    r: &RouteLookup,
    expect: Option<&Expected>,
) -> Result<(), Verdict> {
    let f = w.f;
    let desc = r.describe(dst);
    match (r, expect) {
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
    Ok(())
}

/// The route on another host `from`, from the fabric model (its kernel is not read here).
fn model_route_hop(
    w: &mut Walk,
    from: &str,
    to: Option<&str>,
    src: IpAddr,
    dst: IpAddr,
    basis: Basis,
    expect: Option<&Expected>,
) {
    let f = w.f;
    match expect {
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

/// One fabric hop's parties: the sending host and the block's owner in network `n`.
struct Link<'l> {
    from: &'l str,
    to: &'l str,
    n: &'l Network,
    spec: &'l FabricSpec,
    /// The sender's underlay addresses.
    mine: &'l [IpNet],
    peer: &'l Peer,
    /// The owner's block holding the destination.
    block: IpNet,
    /// Why the backend was chosen (for auto or encrypted networks), else empty.
    why: &'l str,
}

/// What one backend programs: the route's devices and next hop, its description, and the
/// backend hop's description and basis.
struct BackendPath {
    devs: Vec<String>,
    gateway: Option<Option<IpAddr>>,
    what: String,
    hop: String,
    basis: Basis,
}

/// The fabric's expectation from `from` to block owner `to` in multi-host network `n`: the
/// backend chosen for that peer and what it programs, or the drop when it cannot reach it.
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
    let peer = Peer {
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
    let why = if spec.backend == Backend::Auto || spec.encrypt {
        format!(" ({})", choice.reason)
    } else {
        String::new()
    };
    let l = Link {
        from,
        to,
        n,
        spec,
        mine: &mine,
        peer: &peer,
        block,
        why: &why,
    };
    let path = match choice.backend {
        Backend::Route | Backend::Auto => route_backend(w, &l, dst.is_ipv6())?,
        Backend::Vxlan => vxlan_backend(w, &l)?,
        Backend::Sleeve => sleeve_backend(w, &l, peer_rec.sleeve.as_ref())?,
        Backend::Bgp => BackendPath {
            // The route is the kernel's (the route step); the announcement is the model's.
            devs: vec![],
            gateway: None,
            what: format!("a BGP-learned route to {block} (announced by {to})"),
            hop: format!(
                "backend bgp: {to} announces {block}; the route is the speaker's (proto 114)"
            ),
            basis: w.basis_on(from),
        },
    };
    // For auto, any backend's device is acceptable on this host's kernel.
    let (devs, gateway) = if spec.backend == Backend::Auto {
        (vec![], None)
    } else {
        (path.devs, path.gateway)
    };
    Ok(Expected {
        backend_hop: Some((path.hop, path.basis)),
        devs,
        gateway,
        what: path.what,
    })
}

/// Backend route: the peer's underlay address as next hop, when the two share a link in
/// this family (else the drop).
fn route_backend(w: &mut Walk, l: &Link, v6: bool) -> Result<BackendPath, Verdict> {
    let Link {
        from,
        to,
        block,
        why,
        ..
    } = *l;
    let Some((_, gw)) = same_link(l.mine, &l.peer.underlay, v6) else {
        return Err(w.drop(
            Some(from),
            Step::Backend,
            Basis::Model,
            format!("backend route: {to} is not on a shared link with {from} in this family: no route to block {block}"),
        ));
    };
    Ok(BackendPath {
        devs: vec![],
        gateway: Some(Some(gw)),
        what: format!("fabric route {block} via {gw} ({to}'s underlay address)"),
        hop: format!("backend route{why}: next hop {gw}, host {to}'s underlay address"),
        basis: w.basis_on(from),
    })
}

/// Backend vxlan: the route onlink through the network's VXLAN device, with the peer's
/// neighbour and FDB entries (checked in this host's kernel when it holds them).
fn vxlan_backend(w: &mut Walk, l: &Link) -> Result<BackendPath, Verdict> {
    let Link { to, block, why, .. } = *l;
    let dev = vxlan_dev_name(&l.n.name);
    let gw = block_gateway(&block);
    let mac = format_mac(&l.peer.vtep_mac);
    let vtep_ip = vxlan_local(l.mine).and_then(|local| {
        l.peer
            .underlay
            .iter()
            .map(|u| u.addr())
            .find(|a| a.is_ipv6() == local.is_ipv6())
    });
    let vtep = vtep_ip.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    let basis = vxlan_entries(w, l, &dev, gw, vtep_ip)?;
    Ok(BackendPath {
        devs: vec![dev.clone()],
        gateway: Some(Some(gw)),
        what: format!("fabric route {block} via {gw} dev {dev} onlink"),
        hop: format!(
            "backend vxlan{why}: neighbour {gw} lladdr {mac}, FDB {mac} dst {vtep} ({to}'s VTEP), VNI {}, UDP 4789",
            l.spec.vni
        ),
        basis,
    })
}

/// Whether this host's kernel holds the peer's neighbour (`gw`) and FDB (`vtep_ip`) entries
/// on `dev`: the hop's basis (the model's when not read here, or asked for), or the drop.
fn vxlan_entries(
    w: &mut Walk,
    l: &Link,
    dev: &str,
    gw: IpAddr,
    vtep_ip: Option<IpAddr>,
) -> Result<Basis, Verdict> {
    let f = w.f;
    let (from, to) = (l.from, l.to);
    if !(from == f.me && l.spec.backend == Backend::Vxlan && !l.spec.encrypt) {
        return Ok(Basis::Model);
    }
    let Some(k) = f.kernel.vxlan.get(dev) else {
        if !w.vxlan_lookups.iter().any(|d| d == dev) {
            w.vxlan_lookups.push(dev.to_string());
        }
        return Ok(Basis::Model);
    };
    let peer_mac = l.peer.vtep_mac;
    let fdb = k
        .fdb
        .iter()
        .any(|e| e.dev == dev && e.mac == peer_mac && Some(e.dst) == vtep_ip);
    let neigh = k
        .neigh
        .iter()
        .any(|e| e.dev == dev && e.ip == gw && e.mac == peer_mac);
    if !(fdb && neigh) {
        let mac = format_mac(&peer_mac);
        let vtep = vtep_ip.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
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
    Ok(w.basis_on(from))
}

/// Backend sleeve: the route onlink through the sleeve device to the peer's sleeve
/// endpoint, or the drop when the peer has no sleeve key.
fn sleeve_backend(
    w: &mut Walk,
    l: &Link,
    sleeve: Option<&SleeveRecord>,
) -> Result<BackendPath, Verdict> {
    let Link {
        from,
        to,
        block,
        why,
        ..
    } = *l;
    // The sleeve's peer table lives in the agent; the store's record is what it holds.
    let Some(s) = sleeve else {
        return Err(w.drop(
            Some(from),
            Step::Backend,
            Basis::Store,
            format!("backend sleeve: host {to} has no sleeve key: traffic to it is dropped in the sleeve"),
        ));
    };
    let ep = l
        .peer
        .underlay
        .iter()
        .map(|u| u.addr())
        .find(|a| a.is_ipv4())
        .or_else(|| l.peer.underlay.first().map(|u| u.addr()))
        .map(|a| match a {
            IpAddr::V6(a) => format!("[{a}]:{}", s.port),
            a => format!("{a}:{}", s.port),
        })
        .unwrap_or_else(|| "?".into());
    Ok(BackendPath {
        devs: vec![SLEEVE_DEV.to_string()],
        gateway: None,
        what: format!(
            "fabric route {block} via {} dev {SLEEVE_DEV} onlink",
            block_gateway(&block)
        ),
        hop: format!(
            "backend sleeve{why}: peer {to} key {}, endpoint {ep} (encrypted, UDP)",
            s.public_key
        ),
        basis: Basis::Model,
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
