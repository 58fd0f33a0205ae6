//! The multi-host fabric's kernel state: routes to other hosts' blocks (main table, marked with
//! [`RTPROT_FERRYNET`]), static FDB entries and permanent neighbour entries on the VXLAN
//! devices. Reads it back as a `model::fabric::FabricState` and applies `FabricDiff`s.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrynet_model::fabric::{FabricDiff, FabricRoute, FabricState, FdbEntry, NeighEntry};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use crate::error::{errno, nl, Result};
use crate::netlink::Netlink;

/// The route protocol number (`rtm_protocol`) of every route ferrynet's fabric installs. Routes
/// are read back, replaced and deleted only when they carry it, so routes made by anyone else
/// are never touched. 113 is unassigned in iproute2's `rt_protos`; `ip route show proto 113`
/// lists the fabric's routes.
pub const RTPROT_FERRYNET: u8 = 113;

/// The route protocol of routes learned over BGP (the `bgp` backend's speaker): ferrynet's
/// too, but apart from the fabric's so that each owner diffs only its own routes. 114 is
/// unassigned in iproute2's `rt_protos`; `ip route show proto 114` lists them.
pub const RTPROT_FERRYNET_BGP: u8 = 114;

const RT_TABLE_MAIN: u8 = 254;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;

/// Whether an error on a deletion means the object is already gone.
pub(crate) fn gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(ENOENT) | Some(ESRCH) | Some(ENODEV))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        // AF_BRIDGE messages carry NDA_DST as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(&b[..])
                .ok()
                .map(|o| Ipv4Addr::from(o).into()),
            16 => <[u8; 16]>::try_from(&b[..])
                .ok()
                .map(|o| Ipv6Addr::from(o).into()),
            _ => None,
        },
        _ => None,
    }
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into())
}

/// A unicast route of the main table, as read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MainRoute {
    pub(crate) dst: IpNet,
    pub(crate) gateway: Option<IpAddr>,
    pub(crate) oif: Option<u32>,
    pub(crate) protocol: u8,
    pub(crate) onlink: bool,
    pub(crate) prefsrc: Option<IpAddr>,
}

/// A main-table unicast route; None for anything else.
fn parse_main_route(m: &RouteMessage) -> Option<MainRoute> {
    if route_table(m) != u32::from(RT_TABLE_MAIN) || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    let mut prefsrc = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Gateway(g) => gw = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => prefsrc = route_ip(s),
            _ => {}
        }
    }
    let any = if m.header.address_family == AddressFamily::Inet6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let dst = IpNet::new(dst.unwrap_or(any), m.header.destination_prefix_length).ok()?;
    Some(MainRoute {
        dst,
        gateway: gw,
        oif,
        protocol: m.header.protocol.into(),
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        prefsrc,
    })
}

/// The netlink message of a fabric route out of `oif`.
fn route_message(r: &FabricRoute, oif: u32) -> std::result::Result<RouteMessage, String> {
    route_message_of(r, oif, RTPROT_FERRYNET)
}

/// The netlink message of a route out of `oif` with route protocol `proto`.
pub(crate) fn route_message_of(
    r: &FabricRoute,
    oif: u32,
    proto: u8,
) -> std::result::Result<RouteMessage, String> {
    let proto = RouteProtocol::from(proto);
    let mut m = match (r.dst.trunc(), r.gateway) {
        (IpNet::V4(d), IpAddr::V4(g)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .gateway(g)
            .output_interface(oif)
            .protocol(proto)
            .build(),
        (IpNet::V6(d), IpAddr::V6(g)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .gateway(g)
            .output_interface(oif)
            .protocol(proto)
            .build(),
        _ => return Err("destination and gateway are of different families".into()),
    };
    if r.onlink {
        m.header.flags.insert(RouteFlags::Onlink);
    }
    match (r.src, r.gateway) {
        (Some(IpAddr::V4(s)), IpAddr::V4(_)) => m
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet(s))),
        (Some(IpAddr::V6(s)), IpAddr::V6(_)) => m
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet6(s))),
        (Some(_), _) => return Err("source and gateway are of different families".into()),
        (None, _) => {}
    }
    Ok(m)
}

fn fdb_message(e: &FdbEntry, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(e.dst.into()));
    m
}

fn neigh_message(n: &NeighEntry, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match n.ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(n.ip.into()));
    m
}

/// Link name -> index lookups, each name asked once.
struct Indices<'a> {
    nl: &'a Netlink,
    known: BTreeMap<String, Option<u32>>,
}

impl Indices<'_> {
    async fn get(&mut self, name: &str) -> Result<Option<u32>> {
        if let Some(i) = self.known.get(name) {
            return Ok(*i);
        }
        let i = self.nl.link_index(name).await?;
        self.known.insert(name.to_string(), i);
        Ok(i)
    }
}

impl Netlink {
    /// Main-table unicast routes of both families (protocol included), for conflict checks.
    pub(crate) async fn main_routes(&self) -> Result<Vec<MainRoute>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await.map_err(nl("listing routes"))? {
                out.extend(parse_main_route(&m));
            }
        }
        Ok(out)
    }

    /// What ferrynet programmed: main-table routes carrying [`RTPROT_FERRYNET`] (any device,
    /// output index mapped to its name), FDB entries with a destination on the named VXLAN
    /// devices, and permanent neighbour entries on them. Devices that do not exist hold nothing.
    pub async fn read_fabric(&self, vxlan_devs: &[String]) -> Result<FabricState> {
        let mut state = FabricState::default();
        let mut names: BTreeMap<u32, Option<String>> = BTreeMap::new();
        for r in self.main_routes().await? {
            let (Some(gateway), Some(oif), RTPROT_FERRYNET) = (r.gateway, r.oif, r.protocol) else {
                continue;
            };
            let name = match names.get(&oif) {
                Some(n) => n.clone(),
                None => {
                    let n = self.link_by_index(oif).await?.map(|l| l.name);
                    names.insert(oif, n.clone());
                    n
                }
            };
            let Some(dev) = name else { continue };
            state.routes.insert(FabricRoute {
                dst: r.dst,
                gateway,
                dev,
                onlink: r.onlink,
                src: r.prefsrc,
            });
        }

        let mut vx: BTreeMap<u32, String> = BTreeMap::new();
        for d in vxlan_devs {
            if let Some(i) = self.link_index(d).await? {
                vx.insert(i, d.clone());
            }
        }
        if vx.is_empty() {
            return Ok(state);
        }
        for family in [
            AddressFamily::Bridge,
            AddressFamily::Inet,
            AddressFamily::Inet6,
        ] {
            let mut s = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(m) = s
                .try_next()
                .await
                .map_err(nl(format!("listing {family:?} neighbours")))?
            {
                let Some(dev) = vx.get(&m.header.ifindex) else {
                    continue;
                };
                if m.header.state != NeighbourState::Permanent || m.header.family != family {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(d) => ip = neigh_ip(d),
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = <[u8; 6]>::try_from(&l[..]).ok()
                        }
                        _ => {}
                    }
                }
                let (Some(ip), Some(mac)) = (ip, mac) else {
                    continue;
                };
                if family == AddressFamily::Bridge {
                    state.fdb.insert(FdbEntry {
                        dev: dev.clone(),
                        mac,
                        dst: ip,
                    });
                } else {
                    state.neigh.insert(NeighEntry {
                        dev: dev.clone(),
                        ip,
                        mac,
                    });
                }
            }
        }
        Ok(state)
    }

    /// Apply a diff: deletions first (routes, neighbours, FDB), then additions (FDB, neighbours,
    /// routes, so a route appears once its path is ready). Deletions tolerate "already gone"
    /// (and a device that no longer exists); additions replace what has the same key, so they
    /// are idempotent, except that a route whose destination is held in the main table by a
    /// route of another protocol is left alone and reported. Per-item failures do not stop the
    /// rest: they are returned as "item: error" lines for the caller's status.
    pub async fn apply_fabric(&self, diff: &FabricDiff) -> Result<Vec<String>> {
        let mut failures = Vec::new();
        let mut idx = Indices {
            nl: self,
            known: BTreeMap::new(),
        };
        self.delete_fabric(diff, &mut idx, &mut failures).await?;
        self.add_neighbours(diff, &mut idx, &mut failures).await?;
        if !diff.add_routes.is_empty() {
            self.add_routes(&diff.add_routes, &mut idx, &mut failures)
                .await?;
        }
        Ok(failures)
    }

    /// The diff's deletions: routes, neighbours, FDB entries (a missing device or entry is no
    /// failure).
    async fn delete_fabric(
        &self,
        diff: &FabricDiff,
        idx: &mut Indices<'_>,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        for r in &diff.del_routes {
            let Some(oif) = idx.get(&r.dev).await? else {
                continue;
            };
            let msg = match route_message(r, oif) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("deleting {r}: {e}"));
                    continue;
                }
            };
            match self.handle.route().del(msg).execute().await {
                Err(e) if !gone(&e) => failures.push(format!("deleting {r}: {e}")),
                _ => {}
            }
        }
        for n in &diff.del_neigh {
            let Some(i) = idx.get(&n.dev).await? else {
                continue;
            };
            match self
                .handle
                .neighbours()
                .del(neigh_message(n, i))
                .execute()
                .await
            {
                Err(e) if !gone(&e) => failures.push(format!("deleting {n}: {e}")),
                _ => {}
            }
        }
        for f in &diff.del_fdb {
            let Some(i) = idx.get(&f.dev).await? else {
                continue;
            };
            match self
                .handle
                .neighbours()
                .del(fdb_message(f, i))
                .execute()
                .await
            {
                Err(e) if !gone(&e) => failures.push(format!("deleting {f}: {e}")),
                _ => {}
            }
        }
        Ok(())
    }

    /// The diff's FDB entries and neighbours (replacing what has the same key).
    async fn add_neighbours(
        &self,
        diff: &FabricDiff,
        idx: &mut Indices<'_>,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        for f in &diff.add_fdb {
            let Some(i) = idx.get(&f.dev).await? else {
                failures.push(format!("adding {f}: device {} does not exist", f.dev));
                continue;
            };
            let res = self
                .handle
                .neighbours()
                .add_bridge(i, &f.mac)
                .destination(f.dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await;
            if let Err(e) = res {
                failures.push(format!("adding {f}: {e}"));
            }
        }
        for n in &diff.add_neigh {
            let Some(i) = idx.get(&n.dev).await? else {
                failures.push(format!("adding {n}: device {} does not exist", n.dev));
                continue;
            };
            let res = self
                .handle
                .neighbours()
                .add(i, n.ip)
                .link_layer_address(&n.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await;
            if let Err(e) = res {
                failures.push(format!("adding {n}: {e}"));
            }
        }
        Ok(())
    }

    /// The diff's routes, except where a route of another protocol holds the destination.
    async fn add_routes(
        &self,
        routes: &[FabricRoute],
        idx: &mut Indices<'_>,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        // Destinations held by routes that are not ours: replacing them would clobber them.
        let mut foreign: BTreeMap<IpNet, u8> = BTreeMap::new();
        for r in self.main_routes().await? {
            if r.protocol != RTPROT_FERRYNET {
                foreign.entry(r.dst).or_insert(r.protocol);
            }
        }
        for r in routes {
            if let Some(p) = foreign.get(&r.dst.trunc()) {
                failures.push(format!(
                    "adding {r}: a route to {} with protocol {p} (not ferrynet's) is in the main table; left alone",
                    r.dst
                ));
                continue;
            }
            let Some(oif) = idx.get(&r.dev).await? else {
                failures.push(format!("adding {r}: device {} does not exist", r.dev));
                continue;
            };
            let msg = match route_message(r, oif) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("adding {r}: {e}"));
                    continue;
                }
            };
            let Err(e) = self.handle.route().add(msg).replace().execute().await else {
                continue;
            };
            // A source this host does not hold (its gateway not yet on its bridge) must not
            // cost the containers their route: added without it, only the host's own packets
            // take the kernel's choice until the next reconcile puts the source back.
            let bare = FabricRoute {
                src: None,
                ..r.clone()
            };
            let retried = match (r.src, errno(&e)) {
                (Some(_), Some(EINVAL)) => match route_message(&bare, oif) {
                    Ok(m) => self.handle.route().add(m).replace().execute().await.is_ok(),
                    Err(_) => false,
                },
                _ => false,
            };
            failures.push(if retried {
                format!("adding {r}: {e}; added without its source")
            } else {
                format!("adding {r}: {e}")
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_messages_carry_protocol_table_and_onlink() {
        let r = FabricRoute {
            dst: "10.1.2.0/24".parse().unwrap(),
            gateway: "10.1.2.1".parse().unwrap(),
            dev: "x".into(),
            onlink: true,
            src: Some("10.1.1.1".parse().unwrap()),
        };
        let m = route_message(&r, 7).unwrap();
        assert_eq!(u8::from(m.header.protocol), RTPROT_FERRYNET);
        assert_eq!(m.header.table, RT_TABLE_MAIN);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(
            parse_main_route(&m),
            Some(MainRoute {
                dst: r.dst,
                gateway: Some(r.gateway),
                oif: Some(7),
                protocol: RTPROT_FERRYNET,
                onlink: true,
                prefsrc: r.src,
            })
        );
        let mixed = FabricRoute {
            gateway: "fd00::1".parse().unwrap(),
            onlink: false,
            src: None,
            ..r.clone()
        };
        assert!(route_message(&mixed, 7).is_err());
        let mixed_src = FabricRoute {
            src: Some("fd00::2".parse().unwrap()),
            ..r
        };
        assert!(route_message(&mixed_src, 7).is_err());
    }

    #[test]
    fn bridge_destinations_are_raw_bytes() {
        assert_eq!(
            neigh_ip(&NeighbourAddress::Other(vec![192, 168, 1, 2])),
            Some("192.168.1.2".parse().unwrap())
        );
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        assert_eq!(
            neigh_ip(&NeighbourAddress::Other(v6.octets().to_vec())),
            Some(IpAddr::V6(v6))
        );
        assert_eq!(neigh_ip(&NeighbourAddress::Other(vec![1, 2, 3])), None);
    }
}
