//! An rtnetlink handle bound to one network namespace, and the few link/address/route
//! operations ferrynet needs, each idempotent.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{
    InfoBridge, InfoData, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::error::{errno, io, nl, DataplaneError, Result};
use crate::netns::Netns;

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;
const RT_TABLE_MAIN: u8 = 254;

/// A link as seen by netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    /// Link kind (`bridge`, `veth`, …).
    pub kind: Option<String>,
    /// A bridge's `nf_call_iptables` and `nf_call_ip6tables` options (bridged IPv4 / IPv6
    /// packets pass the IP netfilter hooks); false for other links.
    pub bridge_nf_call: (bool, bool),
}

/// A route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination prefix (`0.0.0.0/0` for a default route).
    pub dst: IpNet,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Take the next hop as on-link without looking it up (a link-local gateway no subnet of
    /// the interface covers).
    pub onlink: bool,
}

/// A route as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
}

/// An rtnetlink handle whose socket lives in one network namespace.
#[derive(Clone)]
pub struct Netlink {
    /// The underlying handle.
    pub handle: rtnetlink::Handle,
}

fn mac_of(v: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(v).ok()
}

fn parse_link(m: &LinkMessage) -> LinkInfo {
    let mut l = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
        kind: None,
        bridge_nf_call: (false, false),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(a) => l.mac = mac_of(a),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Controller(c) => l.master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        NlLinkInfo::Data(InfoData::Bridge(opts)) => {
                            for o in opts {
                                match o {
                                    InfoBridge::NfCallIpTables(v) => l.bridge_nf_call.0 = *v,
                                    InfoBridge::NfCallIp6Tables(v) => l.bridge_nf_call.1 = *v,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

impl Netlink {
    /// A handle in the calling thread's namespace; its connection runs as a task on the
    /// current tokio runtime.
    pub fn current() -> Result<Netlink> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(io("opening a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A handle whose socket is created inside `ns` (on a dedicated thread), so every request
    /// acts there, while the connection itself runs on the current runtime.
    pub fn in_netns(ns: &Netns) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns
            .run_in(move || {
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(io(format!(
                "opening a netlink socket in {}",
                ns.path().display()
            )))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The raw netlink message of the link called `name`, if present.
    pub(crate) async fn link_message(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(None),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("looking up link {name}"),
                source: e,
            }),
        }
    }

    /// The link called `name`, if present.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
        Ok(self.link_message(name).await?.as_ref().map(parse_link))
    }

    /// The link with this index, if present.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(parse_link(&m))),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(None),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("looking up link #{index}"),
                source: e,
            }),
        }
    }

    /// The index of the link called `name`, if present.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.map(|l| l.index))
    }

    /// Delete a link by name; false if it was not there.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(false),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("deleting link {name}"),
                source: e,
            }),
        }
    }

    /// Apply a link change message.
    pub async fn set_link(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl(what.to_string()))
    }

    /// Bring a link up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(
            LinkUnspec::new_with_index(index).up().build(),
            &format!("setting link #{index} up"),
        )
        .await
    }

    /// Addresses on a link (global and link scope), with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(nl(format!("listing addresses of link #{index}")))?
        {
            if m.header.index != index {
                continue;
            }
            let mut addr = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => addr = Some(*ip),
                    AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = addr {
                if let Ok(n) = IpNet::new(ip, m.header.prefix_len) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Add an address (no-op if present). IPv6 addresses skip duplicate address detection so
    /// they are usable at once.
    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(EEXIST)) => Ok(()),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("adding {addr} to link #{index}"),
                source: e,
            }),
        }
    }

    /// Remove an address from a link; false when it was not there.
    pub async fn delete_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        // The add request builds the message the kernel matches a delete by (family,
        // prefix length, link, local address).
        let mut add = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        let msg = add.message_mut().clone();
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ESRCH)) => Ok(false),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("removing {addr} from link #{index}"),
                source: e,
            }),
        }
    }

    /// Routes of the main table leaving through link `index`, both families.
    pub async fn routes(&self, index: u32) -> Result<Vec<RouteInfo>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await.map_err(nl("listing routes"))? {
                if let Some(r) = parse_route(&m) {
                    if r.oif == Some(index) && m.header.table == RT_TABLE_MAIN {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Add a route out of link `oif` (no-op if it exists).
    pub async fn add_route(&self, route: &RouteSpec, oif: u32) -> Result<()> {
        self.put_route(route, oif, false).await
    }

    /// Add a route out of link `oif`, replacing one to the same destination (another gateway).
    pub async fn replace_route(&self, route: &RouteSpec, oif: u32) -> Result<()> {
        self.put_route(route, oif, true).await
    }

    async fn put_route(&self, route: &RouteSpec, oif: u32, replace: bool) -> Result<()> {
        let mut msg = match (route.dst, route.gateway) {
            (IpNet::V4(d), gw) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(oif);
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
            (IpNet::V6(d), gw) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(oif);
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        if route.onlink {
            msg.header.flags.insert(RouteFlags::Onlink);
        }
        let req = self.handle.route().add(msg);
        let req = if replace { req.replace() } else { req };
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(EEXIST)) => Ok(()),
            Err(e) => Err(DataplaneError::Netlink {
                op: format!("adding route {} via {:?}", route.dst, route.gateway),
                source: e,
            }),
        }
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl("listing links"))? {
            out.push(parse_link(&m));
        }
        Ok(out)
    }

    /// The main table's route messages, both families.
    async fn main_table(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await.map_err(nl("listing routes"))? {
                if m.header.table == RT_TABLE_MAIN {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// Every route of the main table, both families, with whether the kernel marks it
    /// `linkdown` (its device has no carrier, yet the route still takes the traffic).
    pub async fn main_routes_linkdown(&self) -> Result<Vec<(RouteInfo, bool)>> {
        Ok(self
            .main_table()
            .await?
            .iter()
            .filter_map(|m| {
                Some((
                    parse_route(m)?,
                    m.header.flags.contains(RouteFlags::Linkdown),
                ))
            })
            .collect())
    }

    /// Every route of the main table, both families: destination, protocol and type (for
    /// routes without a device, such as `unreachable`).
    pub async fn typed_routes(
        &self,
    ) -> Result<Vec<(IpNet, u8, rtnetlink::packet_route::route::RouteType)>> {
        Ok(self
            .main_table()
            .await?
            .iter()
            .filter_map(|m| Some((parse_route(m)?.dst, m.header.protocol.into(), m.header.kind)))
            .collect())
    }

    /// True if a link disappeared between lookup and use (ENODEV/ESRCH).
    pub fn is_gone(e: &DataplaneError) -> bool {
        matches!(e, DataplaneError::Netlink { source, .. } if matches!(errno(source), Some(ENODEV) | Some(ESRCH)))
    }
}

fn parse_route(m: &RouteMessage) -> Option<RouteInfo> {
    let v4 = m.header.address_family == AddressFamily::Inet;
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let any: IpAddr = if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    let dst = IpNet::new(dst.unwrap_or(any), m.header.destination_prefix_length).ok()?;
    Some(RouteInfo { dst, gateway, oif })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}
