//! Network records: create, read, list, delete.

use std::collections::BTreeSet;

use ferrynet_model::ipam::{find_overlap, validate_network_subnets};
use ferrynet_model::names::{bridge_name, validate_network_name};
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_model::validate::check_bridge_name;
use ferrynet_store::{Compare, Op, Revision};
use ipnet::IpNet;

use super::transact::Round;
use super::{decode, decode_all, encode, Control};
use crate::error::{ControlError, Result};

/// Check a network's own fields (name, subnets, MTU) without looking at other networks.
pub fn validate_network(net: &Network) -> Result<()> {
    validate_network_name(&net.name).map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
    check_bridge_name(&net.bridge).map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
    if let Some(mtu) = net.mtu {
        if !(576..=65535).contains(&mtu) {
            return Err(ControlError::InvalidConfig(format!(
                "mtu {mtu} is outside 576..=65535"
            )));
        }
    }
    if net.mode.gives_interfaces() {
        validate_network_subnets(&net.subnets)
            .map_err(|e| ControlError::InvalidConfig(format!("network {}: {e}", net.name)))?;
    }
    if let Some(f) = &net.fabric {
        if !net.mode.gives_interfaces() || net.internal {
            return Err(ControlError::InvalidConfig(format!(
                "network {}: a multi-host network must be a bridged or routed, non-internal network",
                net.name
            )));
        }
        if f.vni >= 1 << 24 {
            return Err(ControlError::InvalidConfig(format!(
                "vni {} is outside 1..16777215",
                f.vni
            )));
        }
        for s in &net.subnets {
            let len = f.block_len(s.cidr.addr().is_ipv6());
            if len < s.cidr.prefix_len() || len > s.cidr.max_prefix_len() - 2 {
                return Err(ControlError::InvalidConfig(format!(
                    "network {}: block size /{len} does not fit subnet {} (blocks must be smaller than the subnet and hold at least 4 addresses)",
                    net.name, s.cidr
                )));
            }
        }
    }
    Ok(())
}

/// The lowest VXLAN network identifier not in `taken`.
pub fn lowest_free_vni(taken: &BTreeSet<u32>) -> u32 {
    (1..1 << 24).find(|v| !taken.contains(v)).unwrap_or(0)
}

/// A network with its bridge name filled in from its name when empty.
pub fn with_defaults(mut net: Network) -> Network {
    if net.bridge.is_empty() {
        net.bridge = bridge_name(&net.name);
    }
    for s in &mut net.subnets {
        s.cidr = s.cidr.trunc();
    }
    net
}

impl Control {
    /// The network called `name` and the revision of its record.
    pub async fn network(&self, name: &str) -> Result<Option<(Network, Revision)>> {
        match self.store.get(&keys::network(name)).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every network, sorted by name.
    pub async fn networks(&self) -> Result<Vec<Network>> {
        let (kvs, _) = self.store.range(&keys::networks()).await?;
        Ok(decode_all(&kvs))
    }

    /// Every endpoint of a network.
    pub async fn endpoints(&self, network: &str) -> Result<Vec<Endpoint>> {
        let (kvs, _) = self.store.range(&keys::endpoints(network)).await?;
        Ok(decode_all(&kvs))
    }

    /// This host's endpoints on `network` (a record naming no host is a single-host one, so
    /// here), read page by page and filtered as they arrive: on a multi-host network of 100,000
    /// endpoints the agent never holds the others (decoding them all whole was the agent's peak
    /// memory at scale, ~130 MiB for one guard reload).
    pub async fn local_endpoints(&self, network: &str) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        let host = self.host.as_str();
        self.store
            .range_pages(&keys::endpoints(network), &mut |page| {
                for kv in &page {
                    match decode::<Endpoint>(kv) {
                        Ok(e) if e.host.as_deref().is_none_or(|h| h == host) => out.push(e),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(key = %kv.key.escape_debug(), error = %e, "skipping a rejected store record");
                        }
                    }
                }
            })
            .await?;
        Ok(out)
    }

    /// Refuse `net` if a subnet or bridge name clashes with another network.
    async fn check_against_others(&self, net: &Network) -> Result<()> {
        let others: Vec<Network> = self
            .networks()
            .await?
            .into_iter()
            .filter(|n| n.name != net.name)
            .collect();
        let existing: Vec<(String, IpNet)> = others
            .iter()
            .flat_map(|n| n.subnets.iter().map(move |s| (n.name.clone(), s.cidr)))
            .collect();
        let mine: Vec<IpNet> = net.subnets.iter().map(|s| s.cidr).collect();
        if let Some((ours, other_name, theirs)) = find_overlap(&mine, &existing) {
            return Err(ControlError::InvalidConfig(format!(
                "subnet {ours} of network {} overlaps subnet {theirs} of network {other_name}",
                net.name
            )));
        }
        if let Some(o) = others.iter().find(|o| o.bridge == net.bridge) {
            return Err(ControlError::InvalidConfig(format!(
                "bridge {} is already used by network {}",
                net.bridge, o.name
            )));
        }
        Ok(())
    }

    /// Create a network; fails if the name is taken or a subnet overlaps another network's.
    pub async fn create_network(&self, net: Network) -> Result<Network> {
        let mut net = with_defaults(net);
        validate_network(&net)?;
        self.check_against_others(&net).await?;
        let key = keys::network(&net.name);
        let mut compares = vec![Compare::Missing(key.clone())];
        let mut ops = Vec::new();
        if let Some(f) = &mut net.fabric {
            // The VNI is reserved in the same transaction, so two networks never share one.
            if f.vni == 0 {
                let (kvs, _) = self.store.range(&format!("{}vni/", keys::ROOT)).await?;
                let taken = kvs
                    .iter()
                    .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
                    .collect();
                f.vni = lowest_free_vni(&taken);
            }
            let vkey = keys::vni(f.vni);
            if let Some(kv) = self.store.get(&vkey).await? {
                return Err(ControlError::InvalidConfig(format!(
                    "vni {} is already used by network {}",
                    f.vni,
                    String::from_utf8_lossy(&kv.value)
                )));
            }
            compares.push(Compare::Missing(vkey.clone()));
            ops.push(Op::put(vkey, net.name.clone().into_bytes()));
        }
        ops.push(Op::put(key, encode(&net)));
        let res = self.store.txn(compares, ops).await?;
        if !res.succeeded {
            return Err(ControlError::AlreadyExists(format!(
                "network {} already exists (or its vni was taken meanwhile)",
                net.name
            )));
        }
        tracing::info!(network = %net.name, bridge = %net.bridge, "network created");
        crate::failpoint::hit("network-create-recorded");
        self.sync_edge_after_change(&net.name).await;
        Ok(net)
    }

    /// Make the stored network match a definition from a CNI config: create it if missing,
    /// replace it if the definition changed (refused while it has endpoints and the subnets change).
    pub async fn ensure_network(&self, net: Network) -> Result<Network> {
        let net = with_defaults(net);
        validate_network(&net)?;
        let what = || format!("update network {} from its config", net.name);
        // The value: the network, and whether this call rewrote an existing definition.
        let net = &net;
        let (stored, updated) = self
            .transact(what, || Box::pin(async move {
                Ok(match self.network(&net.name).await? {
                    Some((stored, _)) if stored == *net => Round::Done((stored, false)),
                    // A multi-host network is defined once, by `ferrynet network create`;
                    // configs on each host only name it.
                    Some((stored, _)) if stored.fabric.is_some() => Round::Done((stored, false)),
                    Some((stored, rev)) => {
                        if stored.subnets != net.subnets
                            && !self.endpoints(&net.name).await?.is_empty()
                        {
                            return Err(ControlError::InvalidConfig(format!(
                                "network {} exists with subnets {}; it has endpoints, so its subnets cannot change to {}",
                                net.name,
                                subnet_list(&stored),
                                subnet_list(net)
                            )));
                        }
                        self.check_against_others(net).await?;
                        let key = keys::network(&net.name);
                        Round::commit(
                            vec![Compare::ModRevision(key.clone(), rev)],
                            vec![Op::put(key, encode(&net))],
                            (net.clone(), true),
                        )
                    }
                    None => match self.create_network(net.clone()).await {
                        Ok(n) => {
                            // Made by a config: its last DEL may retire it (control::stale).
                            self.store
                                .put(&super::stale::cni_defined_key(&n.name), Vec::new())
                                .await?;
                            Round::Done((n, false))
                        }
                        // Lost a race with a concurrent ADD creating the same network: re-read.
                        Err(ControlError::AlreadyExists(_)) => Round::Again,
                        Err(e) => return Err(e),
                    },
                })
            }))
            .await?;
        if updated {
            tracing::info!(network = %net.name, "network definition updated from config");
            self.sync_edge_after_change(&net.name).await;
        }
        Ok(stored)
    }

    /// Remove a network record and its allocations. Refuses while endpoints exist unless
    /// `force`, in which case they are detached first. Removes the bridge and its rules.
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<()> {
        let Some((net, rev)) = self.network(name).await? else {
            // A removal interrupted after its record went leaves the bridge: take it now.
            for b in self.remove_stale_bridges().await? {
                tracing::info!(bridge = %b, "removed the bridge of a network removed earlier");
            }
            return Err(ControlError::InvalidConfig(format!(
                "network {name} does not exist"
            )));
        };
        let eps = self.endpoints(name).await?;
        if !eps.is_empty() && !force {
            let ids: Vec<String> = eps.iter().map(|e| e.container_id.clone()).collect();
            return Err(ControlError::InvalidConfig(format!(
                "network {name} has {} endpoint(s) ({}); detach them first or use --force",
                eps.len(),
                ids.join(", ")
            )));
        }
        for ep in &eps {
            // Interfaces on other hosts are not ours to remove; their records go below.
            if ep.host.as_deref().is_some_and(|h| h != self.host) {
                continue;
            }
            self.detach(&net, &ep.container_id, &ep.ifname, ep.netns.as_deref())
                .await?;
        }
        crate::failpoint::hit("network-rm-detached");
        let key = keys::network(name);
        let mut ops = vec![
            Op::delete(key.clone()),
            // Port claims of endpoints on other hosts (local ones went with their detach).
            Op::DeletePrefix(format!("{}{name}/", keys::port_claims())),
            Op::DeletePrefix(keys::ipam_prefix(name)),
            Op::delete(keys::ipam_last(name)),
            Op::DeletePrefix(keys::endpoints(name)),
            Op::DeletePrefix(keys::blocks(name)),
            Op::DeletePrefix(keys::orphan_blocks(name)),
        ];
        if let Some(f) = &net.fabric {
            ops.push(Op::delete(keys::vni(f.vni)));
        }
        let res = self
            .store
            .txn(vec![Compare::ModRevision(key.clone(), rev)], ops)
            .await?;
        if !res.succeeded {
            return Err(ControlError::InvalidConfig(format!(
                "network {name} changed while it was being removed; try again"
            )));
        }
        crate::failpoint::hit("network-rm-deleted");
        self.remove_bridge(&net).await?;
        if self.networks().await?.is_empty() {
            // The last network is gone: leave the host as ferrynet found it.
            self.remove_edge()?;
        } else {
            self.sync_edge().await?;
        }
        tracing::info!(network = %name, "network removed");
        Ok(())
    }
}

/// A network's subnets as `a, b` for messages.
pub(crate) fn subnet_list(n: &Network) -> String {
    n.subnets
        .iter()
        .map(|s| s.cidr.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::network::NetworkMode;

    fn net(name: &str, cidr: &str) -> Network {
        with_defaults(Network::bridged(name, [cidr.parse().unwrap()]))
    }

    #[test]
    fn defaults_fill_bridge_and_truncate_cidr() {
        let n = net("blue", "10.1.2.3/24");
        assert_eq!(n.bridge, "fn-blue");
        assert_eq!(n.subnets[0].cidr.to_string(), "10.1.2.0/24");
        assert!(validate_network(&n).is_ok());
    }

    #[test]
    fn rejects_bad_mtu_and_bridge() {
        let mut n = net("blue", "10.1.2.0/24");
        n.mtu = Some(100);
        assert!(validate_network(&n)
            .unwrap_err()
            .to_string()
            .contains("mtu"));
        let mut n = net("blue", "10.1.2.0/24");
        n.bridge = "docker0".into();
        assert!(validate_network(&n)
            .unwrap_err()
            .to_string()
            .contains("fn-"));
    }

    #[test]
    fn routed_networks_may_be_internal_on_one_host() {
        let mut n = net("blue", "10.1.2.0/24");
        n.mode = NetworkMode::Routed;
        assert!(validate_network(&n).is_ok());
        n.internal = true;
        assert!(validate_network(&n).is_ok());
        n.fabric = Some(ferrynet_model::network::FabricSpec {
            backend: ferrynet_model::fabric::Backend::Vxlan,
            vni: 9,
            block_v4: 26,
            block_v6: 122,
            encrypt: false,
        });
        assert!(validate_network(&n)
            .unwrap_err()
            .to_string()
            .contains("non-internal"));
    }

    #[test]
    fn rejects_network_without_subnets() {
        let mut n = net("blue", "10.1.2.0/24");
        n.subnets.clear();
        assert!(validate_network(&n).is_err());
    }
}
