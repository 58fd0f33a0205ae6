//! Attaching a container: a veth pair from the bridge into the container's namespace.

use ipnet::IpNet;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth};

use crate::error::{errno, DataplaneError, Result};
use crate::netlink::{Netlink, RouteInfo, RouteSpec};
use crate::netns::Netns;

/// The far end of a veth pair being created.
pub(crate) struct PairPeer<'a> {
    /// Its name.
    pub name: &'a str,
    /// Static MAC.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Namespace to create it in (None: the same as the host end).
    pub netns_fd: Option<std::os::fd::RawFd>,
}

/// The netlink request creating a veth pair whose host end is enslaved to a bridge (None: a
/// routed port, enslaved to nothing).
pub(crate) fn pair_message(
    host_name: &str,
    bridge_index: Option<u32>,
    mtu: Option<u32>,
    peer: PairPeer<'_>,
) -> rtnetlink::packet_route::link::LinkMessage {
    let mut p = LinkUnspec::new_with_name(peer.name).build();
    if let Some(fd) = peer.netns_fd {
        p.attributes.push(LinkAttribute::NetNsFd(fd));
    }
    if let Some(mac) = peer.mac {
        p.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    if let Some(m) = peer.mtu {
        p.attributes.push(LinkAttribute::Mtu(m));
    }
    let mut b = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(p)));
    if let Some(br) = bridge_index {
        b = b.controller(br);
    }
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    b.build()
}

/// The container side of an attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerIface {
    /// Interface name inside the container.
    pub ifname: String,
    /// Static MAC, if any.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Addresses with prefix.
    pub addresses: Vec<IpNet>,
    /// Routes (e.g. default via the gateway).
    pub routes: Vec<RouteSpec>,
}

/// A whole attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end's name.
    pub host_name: String,
    /// The bridge to enslave the host end to (None: a routed port).
    pub bridge_index: Option<u32>,
    /// MTU of the host end.
    pub mtu: Option<u32>,
    /// Hairpin mode on the bridge port (a container reaching itself through the host); only
    /// for a bridge port.
    pub hairpin: bool,
    /// The container end.
    pub container: ContainerIface,
}

/// What was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Host end's index.
    pub host_index: u32,
    /// Host end's MAC.
    pub host_mac: [u8; 6],
    /// Container end's index (in the container's namespace).
    pub container_index: u32,
    /// Container end's MAC.
    pub container_mac: [u8; 6],
}

/// The container interface as it is now, for CNI CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceState {
    /// Index.
    pub index: u32,
    /// MAC.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Addresses.
    pub addresses: Vec<IpNet>,
    /// Routes out of it.
    pub routes: Vec<RouteInfo>,
}

/// Create the veth pair with its container end born inside the container's namespace (so the
/// kernel never moves a device between namespaces, which waits for an RCU grace period, ~20 ms)
/// under its final name, MAC and MTU, and the host end already in the bridge; then addresses,
/// routes, hairpin, up. On any failure the pair is deleted before the error is returned.
pub async fn attach(
    host: &Netlink,
    container_ns: &Netns,
    container: &Netlink,
    spec: &VethSpec,
) -> Result<Attached> {
    let c = &spec.container;
    if container.link_by_name(&c.ifname).await?.is_some() {
        return Err(DataplaneError::Conflict(format!(
            "interface {} already exists in netns {}",
            c.ifname,
            container_ns.path().display()
        )));
    }
    // A host end with our deterministic name is a leftover of an interrupted attempt: replace it.
    host.delete_link(&spec.host_name).await?;
    let msg = pair_message(
        &spec.host_name,
        spec.bridge_index,
        spec.mtu,
        PairPeer {
            name: &c.ifname,
            mac: c.mac,
            mtu: c.mtu,
            netns_fd: Some(container_ns.fd()),
        },
    );
    match host.handle.link().add(msg).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(17) => {
            return Err(DataplaneError::Conflict(format!(
                "interface {} (host) or {} (container) already exists",
                spec.host_name, c.ifname
            )));
        }
        Err(e) => {
            return Err(DataplaneError::Netlink {
                op: format!("creating veth {}", spec.host_name),
                source: e,
            })
        }
    }
    match plumb(host, container, spec).await {
        Ok(a) => Ok(a),
        Err(e) => {
            // Deleting either end removes the pair.
            let _ = host.delete_link(&spec.host_name).await;
            Err(e)
        }
    }
}

async fn plumb(host: &Netlink, container: &Netlink, spec: &VethSpec) -> Result<Attached> {
    let c = &spec.container;
    let cl = container.link_by_name(&c.ifname).await?.ok_or_else(|| {
        DataplaneError::NotFound(format!("{} did not appear in the container", c.ifname))
    })?;
    if let Some(lo) = container.link_index("lo").await? {
        container.set_up(lo).await?;
    }
    for a in &c.addresses {
        container.add_address(cl.index, *a).await?;
    }
    container.set_up(cl.index).await?;
    for r in &c.routes {
        container.add_route(r, cl.index).await?;
    }

    let host_link = host
        .link_by_name(&spec.host_name)
        .await?
        .ok_or_else(|| DataplaneError::NotFound(format!("host end {} vanished", spec.host_name)))?;
    if spec.hairpin && spec.bridge_index.is_some() {
        host.handle
            .link()
            .set_port(LinkBridgePort::new(host_link.index).hairpin(true).build())
            .execute()
            .await
            .map_err(crate::error::nl(format!("hairpin on {}", spec.host_name)))?;
    }
    host.set_up(host_link.index).await?;
    Ok(Attached {
        host_index: host_link.index,
        host_mac: host_link.mac.unwrap_or_default(),
        container_index: cl.index,
        container_mac: cl.mac.unwrap_or_default(),
    })
}

/// Remove an attachment; succeeds when nothing is left to remove.
pub async fn detach(
    host: &Netlink,
    container: Option<&Netlink>,
    ifname: &str,
    host_name: &str,
) -> Result<()> {
    if let Some(c) = container {
        c.delete_link(ifname).await?;
    }
    host.delete_link(host_name).await?;
    Ok(())
}

/// The container interface's current state, if it exists.
pub async fn inspect(container: &Netlink, ifname: &str) -> Result<Option<IfaceState>> {
    let Some(l) = container.link_by_name(ifname).await? else {
        return Ok(None);
    };
    Ok(Some(IfaceState {
        index: l.index,
        mac: l.mac.unwrap_or_default(),
        mtu: l.mtu,
        up: l.up,
        addresses: container.addresses(l.index).await?,
        routes: container.routes(l.index).await?,
    }))
}

/// Give container interface `ifname` (in the namespace `container` is open in) the addresses
/// `add` and the routes `routes` (replacing routes to the same destinations), then remove
/// `remove`. New before old, so the new gateway is on-link when the default route moves to it.
pub async fn renumber(
    container: &Netlink,
    ifname: &str,
    remove: &[IpNet],
    add: &[IpNet],
    routes: &[RouteSpec],
) -> Result<()> {
    let index = container.link_index(ifname).await?.ok_or_else(|| {
        DataplaneError::NotFound(format!("interface {ifname} in the container's namespace"))
    })?;
    for a in add {
        container.add_address(index, *a).await?;
    }
    for r in routes {
        container.replace_route(r, index).await?;
    }
    for a in remove.iter().filter(|a| !add.contains(a)) {
        container.delete_address(index, *a).await?;
    }
    Ok(())
}
