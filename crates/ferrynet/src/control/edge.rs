//! The edge: nftables rules for masquerade, isolation and published ports.
//!
//! The skeleton (chains, per-network rules) is re-applied only when networks change or the
//! table is found missing; a container ADD/DEL only adds or removes map elements, one atomic
//! transaction each, so its cost does not depend on how many ports are already published.

use ferrynet_dataplane::bridge::BridgeSpec;
use ferrynet_dataplane::kernel::Links;
use ferrynet_model::conntrack::{published_flush, unpublished_flush, FlushRule};
use ferrynet_model::edge::{
    add_ports, base_ruleset, delete_table, published_ports, remove_ports_tolerant, EdgeNetwork,
    TABLE,
};
use ferrynet_model::ipam::validate_network_subnets;
use ferrynet_model::network::{Endpoint, Network, NetworkMode};
use ferrynet_model::routed::forwarding_sysctls;

use super::Control;
use crate::error::{ControlError, Result};

/// The loopback device, the same index in every network namespace: a routed network's
/// gateways live there.
const LOOPBACK: u32 = 1;

/// The edge's view of a network.
pub fn edge_network(n: &Network) -> EdgeNetwork {
    EdgeNetwork {
        name: n.name.clone(),
        bridge: n.bridge.clone(),
        subnets: n.subnets.iter().map(|s| s.cidr).collect(),
        internal: n.internal,
        ip_masq: n.ip_masq && !n.internal,
        routed: n.mode == NetworkMode::Routed,
    }
}

/// The edge's view of every bridged network among `nets` (the isolation sets hold them all,
/// whether or not this host has their bridge).
pub fn edge_networks<'a>(nets: impl IntoIterator<Item = &'a Network>) -> Vec<EdgeNetwork> {
    nets.into_iter()
        .filter(|n| n.mode.gives_interfaces())
        .map(edge_network)
        .collect()
}

impl Control {
    /// Re-apply the nftables skeleton for every bridged network in the store (atomic; keeps
    /// published-port elements).
    pub async fn sync_edge(&self) -> Result<()> {
        let nets = edge_networks(&self.networks().await?);
        self.apply_edge(&nets)
    }

    /// Apply the nftables skeleton for exactly `nets` (atomic; keeps published-port elements).
    pub fn apply_edge(&self, nets: &[EdgeNetwork]) -> Result<()> {
        self.nft
            .apply(&base_ruleset(nets))
            .map_err(ControlError::firewall(
                "applying the ferrynet nftables ruleset",
            ))?;
        Ok(())
    }

    /// After a network record was created or changed: its pool joins the isolation sets at
    /// once, before any bridge exists. The record is already stored, so a failure is logged,
    /// not returned; the next bridge creation or agent reconcile applies the sets again.
    pub(crate) async fn sync_edge_after_change(&self, network: &str) {
        if let Err(e) = self.sync_edge().await {
            tracing::warn!(network, error = %e, "updating the isolation sets after a network change");
        }
    }

    /// Make sure the network's bridge exists with its gateway addresses (a routed network's
    /// gateways, see [`ferrynet_model::routed`]); on first creation also install the firewall
    /// skeleton and ferrynet's iptables FORWARD chain (after Docker's jumps). Returns the
    /// index of the device holding the gateways (`lo` for a routed network).
    pub async fn ensure_bridge(&self, host: &dyn Links, net: &Network) -> Result<u32> {
        let subnets = validate_network_subnets(&net.subnets)
            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let addresses: Vec<_> = subnets.iter().map(|s| s.gateway_net()).collect();
        let what = || format!("setting up bridge {}", net.bridge);
        let (index, existed) = if net.mode == NetworkMode::Routed {
            let have = host
                .addresses(LOOPBACK)
                .await
                .map_err(ControlError::dataplane(what()))?;
            let existed = addresses.iter().all(|g| {
                have.iter()
                    .any(|a| a.addr() == g.addr() && a.prefix_len() == a.max_prefix_len())
            });
            let sysctls = forwarding_sysctls(addresses.iter().map(|a| a.addr()));
            host.ensure_gateways(&addresses, &sysctls)
                .await
                .map_err(ControlError::dataplane(what()))?;
            (LOOPBACK, existed)
        } else {
            let existed = host
                .link_index(&net.bridge)
                .await
                .map_err(ControlError::dataplane(format!(
                    "looking up bridge {}",
                    net.bridge
                )))?
                .is_some();
            let spec = BridgeSpec {
                name: net.bridge.clone(),
                mtu: net.mtu,
                addresses,
                route_localnet: true,
            };
            let index = host
                .ensure_bridge(&spec)
                .await
                .map_err(ControlError::dataplane(what()))?;
            (index, existed)
        };
        if !existed {
            self.kernel
                .ensure_forward_accept()
                .map_err(ControlError::dataplane(
                    "allowing fn-* interfaces in iptables FORWARD",
                ))?;
            self.sync_edge().await?;
            // With every local endpoint's elements: containers attached before the guard
            // existed (an upgrade) keep sending.
            self.reload_guard().await?;
            tracing::info!(bridge = %net.bridge, network = %net.name, mode = net.mode.as_str(), "bridge created");
        }
        Ok(index)
    }

    /// Remove ferrynet's nftables table and its iptables FORWARD accepts (nothing left to serve).
    pub fn remove_edge(&self) -> Result<()> {
        if self
            .nft
            .list_table("inet", TABLE)
            .map_err(ControlError::firewall("listing the ferrynet table"))?
            .is_some()
        {
            self.nft
                .apply(&delete_table())
                .map_err(ControlError::firewall("deleting the ferrynet table"))?;
        }
        self.remove_guard()?;
        self.kernel
            .remove_forward_accept()
            .map_err(ControlError::dataplane(
                "removing the iptables FORWARD accepts",
            ))?;
        tracing::info!("no networks left: removed the ferrynet nftables table and FORWARD accepts");
        Ok(())
    }

    /// Delete a network's bridge (nothing else uses it once the network is gone).
    pub async fn remove_bridge(&self, net: &Network) -> Result<()> {
        if !net.mode.gives_interfaces() {
            return Ok(());
        }
        let host = self.host_links()?;
        if net.mode == NetworkMode::Routed {
            let pool: Vec<_> = net.subnets.iter().map(|s| s.cidr).collect();
            return host
                .remove_gateways(&pool)
                .await
                .map_err(ControlError::dataplane(format!(
                    "removing the gateways of network {}",
                    net.name
                )));
        }
        host.delete_bridge(&net.bridge)
            .await
            .map_err(ControlError::dataplane(format!(
                "deleting bridge {}",
                net.bridge
            )))?;
        Ok(())
    }

    /// Publish an endpoint's ports (one transaction). If the table was removed behind our back
    /// (a firewall reload), the skeleton is re-applied and the publish retried once.
    pub async fn publish_ports(&self, ep: &Endpoint) -> Result<()> {
        if ep.port_mappings.is_empty() {
            return Ok(());
        }
        let ips: Vec<_> = ep.ips.iter().map(|n| n.addr()).collect();
        let ports = published_ports(&ep.port_mappings, &ips);
        let batch = add_ports(&ports);
        if let Err(first) = self.nft.apply(&batch) {
            tracing::warn!(error = %first, "publishing ports failed; restoring the ruleset from the store and retrying");
            self.reload_edge().await?;
            self.nft
                .apply(&batch)
                .map_err(ControlError::firewall("publishing ports"))?;
        }
        // UDP datagrams sent to these ports while nothing published them (the previous
        // container being replaced) reached the host itself; their entries would keep the
        // flow there.
        flush_conntrack(&published_flush(&ports), "published").await;
        Ok(())
    }

    /// Rebuild the whole edge from the store: skeleton plus every endpoint's published ports.
    /// This is what `ferrynet reload` runs after someone flushed the ruleset.
    pub async fn reload_edge(&self) -> Result<usize> {
        self.sync_edge().await?;
        let nets = self.networks().await?;
        if !nets.is_empty() {
            // A firewall reload that wiped nft also wiped iptables: the FORWARD chain too.
            self.kernel
                .ensure_forward_accept()
                .map_err(ControlError::dataplane(
                    "placing ferrynet's iptables FORWARD chain",
                ))?;
        }
        let mut ports = Vec::new();
        for net in nets {
            for ep in self.endpoints(&net.name).await? {
                let ips: Vec<_> = ep.ips.iter().map(|n| n.addr()).collect();
                ports.extend(published_ports(&ep.port_mappings, &ips));
            }
        }
        if !ports.is_empty() {
            self.nft
                .apply(&add_ports(&ports))
                .map_err(ControlError::firewall("restoring published ports"))?;
        }
        self.reload_guard().await?;
        Ok(ports.len())
    }

    /// Start withdrawing an endpoint's ports on a blocking thread and return at once: deleting
    /// map elements waits for an RCU grace period in the kernel (~16 ms), which can overlap the
    /// link deletion's own wait. Await the handle with [`Control::finish_unpublish`].
    pub fn unpublish_ports_in_background(
        &self,
        ep: &Endpoint,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        if ep.port_mappings.is_empty() {
            return None;
        }
        let ips: Vec<_> = ep.ips.iter().map(|n| n.addr()).collect();
        let batch = remove_ports_tolerant(&published_ports(&ep.port_mappings, &ips));
        let nft = self.nft.clone();
        Some(tokio::task::spawn_blocking(move || {
            nft.apply(&batch).is_ok()
        }))
    }

    /// Wait for a background withdrawal; if it failed (table flushed), restore the edge from the
    /// store and withdraw again.
    pub async fn finish_unpublish(
        &self,
        ep: &Endpoint,
        handle: Option<tokio::task::JoinHandle<bool>>,
    ) -> Result<()> {
        let Some(h) = handle else { return Ok(()) };
        if h.await.unwrap_or(false) {
            flush_unpublished(ep).await;
            return Ok(());
        }
        self.unpublish_ports(ep).await
    }

    /// Withdraw an endpoint's ports; succeeds when they are already gone.
    pub async fn unpublish_ports(&self, ep: &Endpoint) -> Result<()> {
        if ep.port_mappings.is_empty() {
            return Ok(());
        }
        let ips: Vec<_> = ep.ips.iter().map(|n| n.addr()).collect();
        let batch = remove_ports_tolerant(&published_ports(&ep.port_mappings, &ips));
        if self.nft.apply(&batch).is_err() {
            // The maps are missing (table flushed): restore the rest; this endpoint's elements
            // come back only if it is still recorded, and the caller releases it afterwards.
            self.reload_edge().await?;
            let _ = self.nft.apply(&batch);
        }
        flush_unpublished(ep).await;
        Ok(())
    }
}

/// After an endpoint's ports were withdrawn: delete the conntrack entries DNATed to it through
/// them, so a client's long-lived UDP flow reaches whatever publishes the port next.
async fn flush_unpublished(ep: &Endpoint) {
    let ips: Vec<_> = ep.ips.iter().map(|n| n.addr()).collect();
    let rules = unpublished_flush(&published_ports(&ep.port_mappings, &ips));
    flush_conntrack(&rules, "unpublished").await;
}

/// Delete the entries `rules` name, in this process's (the host's) network namespace. A
/// failure is logged, not returned: the ports are already right, and a stale entry costs a
/// flow, not the operation.
async fn flush_conntrack(rules: &[FlushRule], what: &'static str) {
    if rules.is_empty() || !ferrynet_dataplane::conntrack::flush_enabled() {
        return;
    }
    let rules = rules.to_vec();
    let res = tokio::task::spawn_blocking(move || ferrynet_dataplane::conntrack::flush(&rules))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match res {
        Ok(st) if st.deleted > 0 => {
            tracing::info!(
                deleted = st.deleted,
                ports = what,
                "stale conntrack entries deleted"
            )
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, ports = what, "deleting stale conntrack entries failed")
        }
    }
}
