//! Routed endpoints on the host (see `ferrynet_model::routed`): the network's gateways (host
//! addresses on `lo`, `unreachable` routes for its subnets or blocks) and each container's
//! routed port (the host end of its veth: link-local gateways as its own addresses, a /32 and
//! /128 to the container).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrynet_model::routed::{HostPort, Route};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use crate::error::{errno, DataplaneError, Result};
use crate::fabric::RTPROT_FERRYNET;
use crate::netlink::Netlink;
use crate::sysctl;

const ESRCH: i32 = 3;
const ENOENT: i32 = 2;

/// The loopback device, the same index in every network namespace.
const LOOPBACK: u32 = 1;

/// A routed network's gateways on this host: each as a host address on `lo` (a local address
/// the containers reach through their link-local gateway), and its subnet or block as an
/// `unreachable` route, so an address no container holds is refused at once rather than
/// following the host's other routes. Idempotent. Sysctls are written in the calling thread's
/// namespace, which must be the one `nl` works in.
pub async fn ensure_gateways(
    nl: &Netlink,
    gateways: &[IpNet],
    sysctls: &[(String, String)],
) -> Result<()> {
    for (k, v) in sysctls {
        sysctl::set(k, v)?;
    }
    let have = nl.addresses(LOOPBACK).await?;
    for g in gateways {
        let host = IpNet::new(g.addr(), g.max_prefix_len()).expect("host prefix is valid");
        if !have.contains(&host) {
            nl.add_address(LOOPBACK, host).await?;
        }
        unreachable(nl, g.trunc(), true).await?;
    }
    Ok(())
}

/// Undo [`ensure_gateways`] for a network whose pool is `pool`: every host address on `lo` and
/// every ferrynet `unreachable` route inside it (whatever blocks this host held).
pub async fn remove_gateways(nl: &Netlink, pool: &[IpNet]) -> Result<()> {
    let inside = |n: &IpNet| pool.iter().any(|p| p.contains(n));
    for a in nl.addresses(LOOPBACK).await? {
        if a.prefix_len() == a.max_prefix_len() && inside(&a) {
            nl.handle
                .address()
                .del(address_message(a))
                .execute()
                .await
                .map_err(|e| DataplaneError::Netlink {
                    op: format!("removing {a} from lo"),
                    source: e,
                })?;
        }
    }
    for dst in unreachable_prefixes(nl).await? {
        if inside(&dst) {
            unreachable(nl, dst, false).await?;
        }
    }
    Ok(())
}

/// Every `unreachable` route of ferrynet's in the main table (routed networks' subnets and
/// blocks).
pub async fn unreachable_prefixes(nl: &Netlink) -> Result<Vec<IpNet>> {
    Ok(nl
        .typed_routes()
        .await?
        .into_iter()
        .filter(|(_, proto, kind)| *proto == RTPROT_FERRYNET && *kind == RouteType::Unreachable)
        .map(|(dst, _, _)| dst)
        .collect())
}

fn address_message(a: IpNet) -> rtnetlink::packet_route::address::AddressMessage {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    use rtnetlink::packet_route::AddressFamily;
    let mut m = AddressMessage::default();
    m.header.index = LOOPBACK;
    m.header.prefix_len = a.prefix_len();
    m.header.family = if a.addr().is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.attributes.push(AddressAttribute::Local(a.addr()));
    m.attributes.push(AddressAttribute::Address(a.addr()));
    m
}

/// Add (replacing) or delete the `unreachable` route to `dst`, ferrynet's protocol.
async fn unreachable(nl: &Netlink, dst: IpNet, add: bool) -> Result<()> {
    let proto = RouteProtocol::from(RTPROT_FERRYNET);
    let msg = match dst {
        IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .kind(RouteType::Unreachable)
            .protocol(proto)
            .build(),
        IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .kind(RouteType::Unreachable)
            .protocol(proto)
            .build(),
    };
    let res = if add {
        nl.handle.route().add(msg).replace().execute().await
    } else {
        match nl.handle.route().del(msg).execute().await {
            Err(e) if errno(&e) == Some(ESRCH) => Ok(()),
            other => other,
        }
    };
    res.map_err(|e| DataplaneError::Netlink {
        op: format!(
            "{} unreachable route {dst}",
            if add { "adding" } else { "removing" }
        ),
        source: e,
    })
}

/// Give the host end `index` of a routed container's veth what `port` says: settings,
/// addresses, up, then its routes (replacing any left by an interrupted attempt).
pub async fn plumb_port(nl: &Netlink, index: u32, port: &HostPort) -> Result<()> {
    for (k, v) in &port.sysctls {
        sysctl::set(k, v)?;
    }
    for a in &port.addresses {
        nl.add_address(index, *a).await?;
    }
    nl.set_up(index).await?;
    for r in &port.routes {
        add_host_route(nl, index, r).await?;
    }
    Ok(())
}

/// A link-scope route to a container out of `oif`, ferrynet's protocol, with its preferred
/// source. The route goes with the link when the veth is deleted.
async fn add_host_route(nl: &Netlink, oif: u32, r: &Route) -> Result<()> {
    let proto = RouteProtocol::from(RTPROT_FERRYNET);
    let msg = match r.dst {
        IpNet::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .output_interface(oif)
                .scope(RouteScope::Link)
                .protocol(proto);
            if let Some(IpAddr::V4(s)) = r.src {
                b = b.pref_source(s);
            }
            b.build()
        }
        IpNet::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .output_interface(oif)
                .protocol(proto);
            if let Some(IpAddr::V6(s)) = r.src {
                b = b.pref_source(s);
            }
            b.build()
        }
    };
    nl.handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| DataplaneError::Netlink {
            op: format!("adding route {} to link #{oif}", r.dst),
            source: e,
        })
}

/// Make the proxy NDP entries on the routed ports `ports` exactly `want` (`(port, address)`);
/// entries on other devices are left alone, and a port that no longer exists has none.
/// Per-entry failures come back as lines.
pub async fn sync_proxy_ndp(
    nl: &Netlink,
    ports: &[String],
    want: &BTreeSet<(String, Ipv6Addr)>,
) -> Result<Vec<String>> {
    let mut index: BTreeMap<u32, String> = BTreeMap::new();
    for p in ports {
        if let Some(i) = nl.link_index(p).await? {
            index.insert(i, p.clone());
        }
    }
    let mut have: BTreeSet<(String, Ipv6Addr)> = BTreeSet::new();
    let mut dump = nl
        .handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet6)
        .proxies()
        .execute();
    while let Some(m) = dump.try_next().await.map_err(|e| DataplaneError::Netlink {
        op: "listing proxy neighbours".into(),
        source: e,
    })? {
        let Some(port) = index.get(&m.header.ifindex) else {
            continue;
        };
        for a in &m.attributes {
            if let NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) = a {
                have.insert((port.clone(), *v6));
            }
        }
    }
    let idx_of = |p: &str| index.iter().find(|(_, n)| *n == p).map(|(i, _)| *i);
    let mut failures = Vec::new();
    for (p, a) in have.difference(want) {
        let Some(i) = idx_of(p) else { continue };
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = i;
        m.header.flags = NeighbourFlags::Proxy;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(*a)));
        if let Err(e) = nl.handle.neighbours().del(m).execute().await {
            if errno(&e) != Some(ENOENT) {
                failures.push(format!("deleting proxy {a} on {p}: {e}"));
            }
        }
    }
    for (p, a) in want.difference(&have) {
        let Some(i) = idx_of(p) else {
            // Not here (yet): the next sync after its attach adds it.
            continue;
        };
        let res = nl
            .handle
            .neighbours()
            .add(i, IpAddr::V6(*a))
            .flags(NeighbourFlags::Proxy)
            .replace()
            .execute()
            .await;
        if let Err(e) = res {
            failures.push(format!("adding proxy {a} on {p}: {e}"));
        }
    }
    Ok(failures)
}
