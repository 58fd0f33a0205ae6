//! A network's Linux bridge: created if missing, converged if present, never torn down while
//! in use.

use ipnet::IpNet;
use rtnetlink::packet_route::link::{InfoBridge, InfoKind};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec};

use crate::error::{errno, DataplaneError, Result};
use crate::netlink::Netlink;
use crate::sysctl;

/// What a network's bridge must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Its name.
    pub name: String,
    /// MTU (None: leave the kernel default).
    pub mtu: Option<u32>,
    /// Gateway addresses with their subnet prefix.
    pub addresses: Vec<IpNet>,
    /// Allow 127.0.0.0/8 sources to be routed out of it (for DNAT of 127.0.0.1:PORT).
    pub route_localnet: bool,
}

/// Make the bridge exist as specified; returns its index. Idempotent and safe against a
/// concurrent creator. Sysctls are written in the calling thread's namespace, which must be the
/// one `nl` works in.
pub async fn ensure_bridge(nl: &Netlink, spec: &BridgeSpec) -> Result<u32> {
    let existing = nl.link_by_name(&spec.name).await?;
    let link = match existing {
        Some(l) => l,
        None => {
            // A fixed MAC: otherwise the bridge takes its lowest port's, and removing that
            // container changes the gateway's MAC under every other container's ARP cache.
            let mut b = LinkBridge::new(&spec.name)
                .stp_state(rtnetlink::packet_route::link::BridgeStpState::Disabled)
                .forward_delay(0)
                .append_info_data(InfoBridge::NfCallIpTables(true))
                .append_info_data(InfoBridge::NfCallIp6Tables(true))
                .address(bridge_mac(&spec.name).to_vec());
            if let Some(m) = spec.mtu {
                b = b.mtu(m);
            }
            match nl.handle.link().add(b.build()).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(17) => {} // created by a concurrent ADD
                Err(e) => {
                    return Err(DataplaneError::Netlink {
                        op: format!("creating bridge {}", spec.name),
                        source: e,
                    })
                }
            }
            nl.link_by_name(&spec.name).await?.ok_or_else(|| {
                DataplaneError::NotFound(format!("bridge {} vanished after creation", spec.name))
            })?
        }
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(DataplaneError::Conflict(format!(
            "{} exists but is a {} link, not a bridge",
            spec.name,
            link.kind.as_deref().unwrap_or("unknown")
        )));
    }
    // Bridged packets pass the host's IP hooks (what kube-proxy relies on with bridge CNIs):
    // a producer's reply bridged straight to a client on the same bridge must still be
    // un-DNATed by the host's conntrack, so service clients keep their own address. Per bridge,
    // so it holds whatever the namespace's net.bridge.bridge-nf-call-ip*tables say.
    if link.bridge_nf_call != (true, true) {
        nl.set_link(
            LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
                .index(link.index)
                .append_info_data(InfoBridge::NfCallIpTables(true))
                .append_info_data(InfoBridge::NfCallIp6Tables(true))
                .build(),
            &format!("making {} call the IP netfilter hooks", spec.name),
        )
        .await?;
    }
    // IPv6 on the bridge: no router advertisements accepted, forwarding on.
    let conf6 = format!("net/ipv6/conf/{}", spec.name);
    if spec.addresses.iter().any(|a| a.addr().is_ipv6()) {
        sysctl::set(&format!("{conf6}/disable_ipv6"), "0")?;
        sysctl::set(&format!("{conf6}/accept_ra"), "0")?;
        sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
    }
    if spec.addresses.iter().any(|a| a.addr().is_ipv4()) {
        sysctl::set("net.ipv4.ip_forward", "1")?;
    }
    if spec.route_localnet {
        sysctl::set(&format!("net/ipv4/conf/{}/route_localnet", spec.name), "1")?;
    }
    if let Some(m) = spec.mtu {
        if link.mtu != m {
            nl.set_link(
                LinkUnspec::new_with_index(link.index).mtu(m).build(),
                &format!("setting MTU {m} on {}", spec.name),
            )
            .await?;
        }
    }
    let have = nl.addresses(link.index).await?;
    for a in &spec.addresses {
        if !have.contains(a) {
            nl.add_address(link.index, *a).await?;
        }
    }
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok(link.index)
}

/// The bridge's MAC: locally administered, derived from its name (FNV-1a), so it is stable
/// across re-creation.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x02, 0xfb, b[4], b[5], b[6], b[7]]
}

/// Delete a bridge; false if absent.
pub async fn delete_bridge(nl: &Netlink, name: &str) -> Result<bool> {
    nl.delete_link(name).await
}
