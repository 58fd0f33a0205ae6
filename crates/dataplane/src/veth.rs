//! Attaching a container: a veth pair from the bridge into the container's namespace.

use ipnet::IpNet;
use rtnetlink::{LinkBridgePort, LinkUnspec, LinkVeth};

use crate::error::{errno, DataplaneError, Result};
use crate::netlink::{LinkInfo, Netlink, RouteInfo, RouteSpec};
use crate::netns::Netns;

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
    /// Container end's name before it is moved and renamed.
    pub peer_temp_name: String,
    /// The bridge to enslave the host end to.
    pub bridge_index: u32,
    /// MTU of the host end.
    pub mtu: Option<u32>,
    /// Hairpin mode on the bridge port (a container reaching itself through the host).
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

/// Create the veth pair, move and configure the container end, enslave the host end.
/// On any failure the pair is deleted before the error is returned.
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
    host.delete_link(&spec.peer_temp_name).await?;
    let mut b = LinkVeth::new(&spec.host_name, &spec.peer_temp_name);
    if let Some(m) = spec.mtu {
        b = b.mtu(m);
    }
    match host.handle.link().add(b.build()).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(17) => {
            return Err(DataplaneError::Conflict(format!(
                "interface {} already exists on the host",
                spec.host_name
            )));
        }
        Err(e) => {
            return Err(DataplaneError::Netlink {
                op: format!("creating veth {}", spec.host_name),
                source: e,
            })
        }
    }
    match plumb(host, container_ns, container, spec).await {
        Ok(a) => Ok(a),
        Err(e) => {
            // Deleting either end removes the pair, wherever the peer now is.
            let _ = host.delete_link(&spec.host_name).await;
            let _ = host.delete_link(&spec.peer_temp_name).await;
            let _ = container.delete_link(&spec.peer_temp_name).await;
            Err(e)
        }
    }
}

async fn plumb(
    host: &Netlink,
    container_ns: &Netns,
    container: &Netlink,
    spec: &VethSpec,
) -> Result<Attached> {
    let c = &spec.container;
    let peer = host
        .link_by_name(&spec.peer_temp_name)
        .await?
        .ok_or_else(|| {
            DataplaneError::NotFound(format!(
                "veth peer {} missing after creation",
                spec.peer_temp_name
            ))
        })?;
    host.set_link(
        LinkUnspec::new_with_index(peer.index)
            .setns_by_fd(container_ns.fd())
            .build(),
        &format!(
            "moving {} into {}",
            spec.peer_temp_name,
            container_ns.path().display()
        ),
    )
    .await?;

    // Container side: rename (while down), MAC, MTU, up, addresses, routes.
    let moved = container
        .link_by_name(&spec.peer_temp_name)
        .await?
        .ok_or_else(|| {
            DataplaneError::NotFound(format!(
                "{} did not arrive in the container",
                spec.peer_temp_name
            ))
        })?;
    let mut m = LinkUnspec::new_with_index(moved.index).name(c.ifname.clone());
    if let Some(mac) = c.mac {
        m = m.address(mac.to_vec());
    }
    if let Some(mtu) = c.mtu {
        m = m.mtu(mtu);
    }
    container
        .set_link(
            m.build(),
            &format!("renaming {} to {}", spec.peer_temp_name, c.ifname),
        )
        .await
        .map_err(|e| {
            if Netlink::is_gone(&e) {
                e
            } else if let DataplaneError::Netlink { source, .. } = &e {
                if errno(source) == Some(17) {
                    return DataplaneError::Conflict(format!(
                        "interface {} already exists in the container",
                        c.ifname
                    ));
                }
                e
            } else {
                e
            }
        })?;
    if let Some(lo) = container.link_index("lo").await? {
        container.set_up(lo).await?;
    }
    for a in &c.addresses {
        container.add_address(moved.index, *a).await?;
    }
    container.set_up(moved.index).await?;
    for r in &c.routes {
        container.add_route(r, moved.index).await?;
    }

    // Host side: into the bridge, hairpin, up.
    let host_link = host
        .link_by_name(&spec.host_name)
        .await?
        .ok_or_else(|| DataplaneError::NotFound(format!("host end {} vanished", spec.host_name)))?;
    host.set_link(
        LinkUnspec::new_with_index(host_link.index)
            .controller(spec.bridge_index)
            .build(),
        &format!("adding {} to bridge #{}", spec.host_name, spec.bridge_index),
    )
    .await?;
    if spec.hairpin {
        host.handle
            .link()
            .set_port(LinkBridgePort::new(host_link.index).hairpin(true).build())
            .execute()
            .await
            .map_err(crate::error::nl(format!("hairpin on {}", spec.host_name)))?;
    }
    host.set_up(host_link.index).await?;

    let cl: LinkInfo = container.link_by_index(moved.index).await?.ok_or_else(|| {
        DataplaneError::NotFound(format!("{} vanished in the container", c.ifname))
    })?;
    Ok(Attached {
        host_index: host_link.index,
        host_mac: host_link.mac.unwrap_or_default(),
        container_index: moved.index,
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
