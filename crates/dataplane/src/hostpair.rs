//! A veth pair left whole in one namespace, for runtimes that move the container end
//! themselves (Docker's libnetwork moves `SrcName` into the sandbox and renames it).

use rtnetlink::LinkBridgePort;

use crate::error::{errno, nl as nl_err, DataplaneError, Result};
use crate::netlink::Netlink;
use crate::veth::{pair_message, PairPeer};

/// A pair to create: one end on a bridge, the other loose for the runtime to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSpec {
    /// Name of the end that stays (enslaved to the bridge, brought up).
    pub host_name: String,
    /// Name of the end the runtime moves (left down).
    pub peer_name: String,
    /// The bridge's ifindex (None: a routed network's port, enslaved to nothing).
    pub bridge_index: Option<u32>,
    /// MTU of both ends.
    pub mtu: Option<u32>,
    /// MAC of the moving end.
    pub peer_mac: Option<[u8; 6]>,
    /// Hairpin mode on the bridge port.
    pub hairpin: bool,
}

/// What was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// Index of the staying end.
    pub host_index: u32,
    /// MAC of the staying end.
    pub host_mac: [u8; 6],
    /// MAC of the moving end.
    pub peer_mac: [u8; 6],
}

/// Create the pair in `nl`'s namespace, replacing leftovers with the same names (an
/// interrupted earlier attempt). On failure nothing is left.
pub async fn create_pair(nl: &Netlink, spec: &PairSpec) -> Result<Pair> {
    nl.delete_link(&spec.host_name).await?;
    nl.delete_link(&spec.peer_name).await?;
    let msg = pair_message(
        &spec.host_name,
        spec.bridge_index,
        spec.mtu,
        PairPeer {
            name: &spec.peer_name,
            mac: spec.peer_mac,
            mtu: spec.mtu,
            netns_fd: None,
        },
    );
    match nl.handle.link().add(msg).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(17) => {
            return Err(DataplaneError::Conflict(format!(
                "interface {} or {} already exists",
                spec.host_name, spec.peer_name
            )))
        }
        Err(e) => return Err(nl_err(format!("creating veth pair {}", spec.host_name))(e)),
    }
    match finish(nl, spec).await {
        Ok(p) => Ok(p),
        Err(e) => {
            let _ = nl.delete_link(&spec.host_name).await;
            Err(e)
        }
    }
}

async fn finish(nl: &Netlink, spec: &PairSpec) -> Result<Pair> {
    let host = nl
        .link_by_name(&spec.host_name)
        .await?
        .ok_or_else(|| DataplaneError::NotFound(format!("{} vanished", spec.host_name)))?;
    let peer = nl
        .link_by_name(&spec.peer_name)
        .await?
        .ok_or_else(|| DataplaneError::NotFound(format!("{} vanished", spec.peer_name)))?;
    if spec.hairpin && spec.bridge_index.is_some() {
        nl.handle
            .link()
            .set_port(LinkBridgePort::new(host.index).hairpin(true).build())
            .execute()
            .await
            .map_err(nl_err(format!("hairpin on {}", spec.host_name)))?;
    }
    nl.set_up(host.index).await?;
    Ok(Pair {
        host_index: host.index,
        host_mac: host.mac.unwrap_or_default(),
        peer_mac: peer.mac.unwrap_or_default(),
    })
}
