//! Bridges and routed gateways left behind: removed when their network is gone, so a down
//! bridge's gateway address and `linkdown` route, or a routed network's `unreachable` route,
//! cannot shadow a newer network on the same subnet.

use ferrynet_dataplane::kernel::Links;
use ferrynet_model::gc::{stale_bridges, stale_unreachable};
use ferrynet_model::network::{keys, Network};
use ferrynet_store::{Compare, Op};

use super::Control;
use crate::error::{ControlError, Result};

/// Key marking a network as defined by a runtime's CNI config (created by its first ADD), so
/// its last DEL may retire it.
pub fn cni_defined_key(network: &str) -> String {
    format!("{}cni-networks/{network}", keys::ROOT)
}

impl Control {
    /// Delete the `fn-*` bridges of this namespace that no stored network uses; returns their
    /// names. Run by `ferrynet reload` and at agent start.
    pub async fn remove_stale_bridges(&self) -> Result<Vec<String>> {
        let host = self.host_links()?;
        let bridges = host
            .bridges()
            .await
            .map_err(ControlError::dataplane("listing links"))?;
        // Links first, networks second: a bridge is made after its network's record, so any
        // bridge listed here whose network exists is found in the read below.
        let stale = stale_bridges(bridges.iter().map(String::as_str), &self.networks().await?);
        for b in &stale {
            host.delete_bridge(b)
                .await
                .map_err(ControlError::dataplane(format!(
                    "deleting stale bridge {b}"
                )))?;
            tracing::info!(bridge = %b, "removed a bridge whose network no longer exists");
        }
        self.remove_stale_gateways(&*host).await?;
        Ok(stale)
    }

    /// Remove the gateways (`lo` host addresses) and `unreachable` routes of routed networks
    /// that no longer exist (removed while this host's agent was away).
    async fn remove_stale_gateways(&self, host: &dyn Links) -> Result<()> {
        let unreachable = host
            .unreachable_prefixes()
            .await
            .map_err(ControlError::dataplane("listing routes"))?;
        if unreachable.is_empty() {
            return Ok(());
        }
        let stale = stale_unreachable(&unreachable, &self.networks().await?);
        if !stale.is_empty() {
            host.remove_gateways(&stale)
                .await
                .map_err(ControlError::dataplane("removing stale routed gateways"))?;
            tracing::info!(prefixes = ?stale, "removed the gateways of routed networks that no longer exist");
        }
        Ok(())
    }

    /// Whether `net` was created from a CNI config (rather than `ferrynet network create`).
    pub async fn cni_defined(&self, net: &str) -> Result<bool> {
        Ok(self.store.get(&cni_defined_key(net)).await?.is_some())
    }

    /// After the last CNI DEL of a network that exists only because of a CNI config: remove its
    /// record, allocations and bridge, so nothing of it outlives the containers (the next ADD
    /// recreates it from the config). Does nothing while anything is attached or allocated, and
    /// gives way to a concurrent ADD (its reservation moves `ipam-last`, failing the
    /// transaction). Returns whether it was retired.
    pub async fn retire_cni_network(&self, net: &Network) -> Result<bool> {
        if net.fabric.is_some() || !self.cni_defined(&net.name).await? {
            return Ok(false);
        }
        let Some((_, rev)) = self.network(&net.name).await? else {
            return Ok(false);
        };
        let last_rev = self
            .store
            .get(&keys::ipam_last(&net.name))
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let (held, _) = self.store.range(&keys::ipam_prefix(&net.name)).await?;
        if !self.endpoints(&net.name).await?.is_empty() || !held.is_empty() {
            return Ok(false);
        }
        // A port of the bridge means an ADD is plumbing right now.
        let ports = self
            .host_links()?
            .bridge_ports(&net.bridge)
            .await
            .map_err(ControlError::dataplane("listing the bridge's ports"))?;
        if !ports.is_empty() {
            return Ok(false);
        }
        let key = keys::network(&net.name);
        let res = self
            .store
            .txn(
                vec![
                    Compare::ModRevision(key.clone(), rev),
                    Compare::ModRevision(keys::ipam_last(&net.name), last_rev),
                ],
                vec![
                    Op::delete(key),
                    Op::delete(keys::ipam_last(&net.name)),
                    Op::delete(cni_defined_key(&net.name)),
                ],
            )
            .await?;
        if !res.succeeded {
            return Ok(false);
        }
        // An ADD that read the network just before it went may still have reserved since:
        // give it its network back and leave the bridge.
        if !self.endpoints(&net.name).await?.is_empty() {
            let (stored, _) = self.network(&net.name).await?.unzip();
            if stored.is_none() {
                self.store
                    .txn(
                        vec![Compare::Missing(keys::network(&net.name))],
                        vec![
                            Op::put(keys::network(&net.name), super::encode(net)),
                            Op::put(cni_defined_key(&net.name), Vec::new()),
                        ],
                    )
                    .await?;
            }
            return Ok(false);
        }
        self.remove_bridge(net).await?;
        if self.networks().await?.is_empty() {
            self.remove_edge()?;
        } else {
            self.sync_edge().await?;
        }
        tracing::info!(network = %net.name, "last CNI container left: network and bridge removed");
        Ok(true)
    }
}
