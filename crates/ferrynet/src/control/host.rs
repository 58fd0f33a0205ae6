//! This host's identity in a cluster and its view of multi-host networks (its own blocks).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ferrynet_model::blocks::{
    choose_block, own_quarantined, parse_quarantine, view_needs_underlay, HostView, Quarantine,
};
use ferrynet_model::host::{BlockClaim, HostRecord};
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_store::{Compare, Op};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::transact::Round;
use super::{decode, encode, Control};
use crate::error::{ControlError, Result};

/// What a host's `ferrynet agent` writes to `<state_dir>/host.json` so the CNI plugin and the
/// CLI on that host use the same identity and store without being told again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// This host's name in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The store URL (absent: the embedded store in the state directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Set while this host's agent serves DNS on the gateways: containers get it as resolver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<LocalDns>,
}

/// The agent's DNS service as containers on this host see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalDns {
    /// The cluster domain; a container on network N searches `N.<domain>`.
    pub domain: String,
}

impl LocalConfig {
    /// Read `<state_dir>/host.json`; a missing file is the default (single host, embedded store).
    pub fn load(state_dir: &Path) -> Result<LocalConfig> {
        let path = state_dir.join("host.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ControlError::InvalidConfig(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocalConfig::default()),
            Err(e) => Err(ControlError::io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Write it atomically (temp file + rename).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = state_dir.join("host.json");
        let tmp = state_dir.join("host.json.tmp");
        // 0600: the store URL it records may name an etcd user (and password).
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &encode(self)))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(ControlError::io(format!("writing {}", path.display())))
    }
}

/// The machine's host name, the default cluster identity.
pub fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Control {
    /// Blocks of `network` and their owners.
    pub async fn block_claims(&self, network: &str) -> Result<Vec<(IpNet, String)>> {
        let (kvs, _) = self.store.range(&keys::blocks(network)).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            if let Some((_, b)) = keys::parse_block(&kv.key) {
                let claim: BlockClaim = decode(kv)?;
                out.push((b, claim.host));
            }
        }
        Ok(out)
    }

    /// The blocks of `network` someone holds, whoever it is.
    async fn claimed_blocks(&self, network: &str) -> Result<Vec<IpNet>> {
        Ok(self
            .block_claims(network)
            .await?
            .into_iter()
            .map(|(b, _)| b)
            .collect())
    }

    /// The quarantine records of `net`'s pool that parse and name one of its blocks (others
    /// are ignored: store input).
    pub async fn quarantined(&self, net: &Network) -> Result<Vec<(IpNet, Quarantine)>> {
        let Some(spec) = &net.fabric else {
            return Ok(Vec::new());
        };
        let prefix = keys::orphan_blocks(&net.name);
        let (kvs, _) = self.store.range(&prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let cidr = kv.key.strip_prefix(&prefix)?;
                parse_quarantine(&net.subnets, spec, cidr, &kv.value)
            })
            .collect())
    }

    /// Take back every block of `net` released from this host while it was cut off that
    /// nobody claimed since (each guarded by "still unclaimed"); returns the blocks taken.
    pub async fn reclaim_quarantined(&self, net: &Network) -> Result<Vec<IpNet>> {
        let taken = self.claimed_blocks(&net.name).await?;
        let mut got = Vec::new();
        for b in own_quarantined(&self.host, &taken, &self.quarantined(net).await?) {
            if self.reclaim_block(&net.name, &b).await? {
                tracing::info!(network = %net.name, block = %b, "took back a block released from this host while it was cut off");
                got.push(b);
            }
        }
        Ok(got)
    }

    /// This host's blocks of `network`.
    pub async fn my_blocks(&self, network: &str) -> Result<Vec<IpNet>> {
        Ok(self
            .block_claims(network)
            .await?
            .into_iter()
            .filter(|(_, h)| *h == self.host)
            .map(|(b, _)| b)
            .collect())
    }

    /// Take back a block this host held before a restart, if its network still exists and
    /// nobody claimed the block meanwhile; true when it did.
    pub async fn reclaim_block(
        &self,
        network: &str,
        block: &IpNet,
    ) -> std::result::Result<bool, ferrynet_store::StoreError> {
        let key = keys::block(network, block);
        let claim = BlockClaim {
            host: self.host.clone(),
        };
        let res = self
            .store
            .txn(
                vec![
                    Compare::Exists(keys::network(network)),
                    Compare::Missing(key.clone()),
                ],
                vec![
                    Op::put(key, encode(&claim)),
                    Op::delete(keys::orphan_block(network, block)),
                ],
            )
            .await?;
        Ok(res.succeeded)
    }

    /// Claim one more block of the given family for this host; None when the pool is full.
    pub async fn claim_block(&self, net: &Network, v6: bool) -> Result<Option<IpNet>> {
        let Some(spec) = &net.fabric else {
            return Ok(None);
        };
        let what = || format!("claim a block of network {}", net.name);
        let block = self
            .transact(what, || {
                Box::pin(async move {
                    let taken = self.claimed_blocks(&net.name).await?;
                    // Blocks released from a departed host come last (its containers may
                    // still run and return with their addresses), except to that host.
                    let quarantined = self.quarantined(net).await?;
                    let Some((block, ends)) =
                        choose_block(&net.subnets, spec, v6, &self.host, &taken, &quarantined)
                    else {
                        return Ok(Round::Done(None));
                    };
                    let key = keys::block(&net.name, &block);
                    let claim = BlockClaim {
                        host: self.host.clone(),
                    };
                    let mut ops = vec![Op::put(key.clone(), encode(&claim))];
                    match ends {
                        Some(q) if q.host == self.host => {
                            tracing::info!(network = %net.name, %block, "took back a block released from this host while it was cut off");
                            ops.push(Op::delete(keys::orphan_block(&net.name, &block)));
                        }
                        Some(q) => {
                            tracing::warn!(network = %net.name, %block, departed = %q.host, released_at = q.released_at, "no other block is free: taking one released from a departed host; its containers cannot return to it");
                            ops.push(Op::delete(keys::orphan_block(&net.name, &block)));
                        }
                        None => {}
                    }
                    Ok(Round::commit(
                        vec![Compare::Missing(key.clone())],
                        ops,
                        Some(block),
                    ))
                })
            })
            .await?;
        if let Some(block) = block {
            tracing::info!(network = %net.name, %block, host = %self.host, "claimed block");
        }
        Ok(block)
    }

    /// Make sure this host owns at least one block of every address family of the pool.
    pub async fn ensure_blocks(&self, net: &Network) -> Result<Vec<IpNet>> {
        let view = HostView::new(net.clone(), self.my_blocks(&net.name).await?, None);
        Ok(self.with_first_blocks(view).await?.blocks)
    }

    /// This host's registration, if its agent is up.
    pub async fn host_record(&self, name: &str) -> Result<Option<HostRecord>> {
        match self.store.get(&keys::host(name)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// The network as this host sees it, derived once per operation: for a multi-host network
    /// its subnets are this host's blocks (each gatewayed by its first address) and, over VXLAN,
    /// its MTU is the underlay's minus the encapsulation. Single-host networks are unchanged.
    pub async fn host_view(&self, net: &Network) -> Result<HostView> {
        if net.fabric.is_none() {
            return Ok(HostView::single(net.clone()));
        }
        // Always from the stored record: `net` may itself be a host view (blocks, not the pool).
        let (pool, _) = self.network(&net.name).await?.ok_or_else(|| {
            ControlError::InvalidConfig(format!("network {} does not exist", net.name))
        })?;
        let blocks = self.my_blocks(&pool.name).await?;
        let me = self.underlay_record(&pool).await?;
        Ok(HostView::new(pool, blocks, me))
    }

    /// `view` with a block of every family the pool has and this host has none of (claimed).
    pub async fn with_first_blocks(&self, view: HostView) -> Result<HostView> {
        let mut view = view;
        for v6 in view.families_without_block() {
            let Some(b) = self.claim_block(&view.pool, v6).await? else {
                return Err(ControlError::Ipam(format!(
                    "network {}: no free {} block left in the pool for host {}",
                    view.pool.name,
                    if v6 { "IPv6" } else { "IPv4" },
                    self.host
                )));
            };
            view = view.with_block(b);
        }
        Ok(view)
    }

    /// A host view that holds `ep`'s addresses: `view`, or a fresh one when a reservation
    /// claimed a new block for them meanwhile.
    pub async fn view_holding(&self, view: &HostView, ep: &Endpoint) -> Result<HostView> {
        if view.holds(&ep.ips) || !view.is_multi_host() {
            Ok(view.clone())
        } else {
            self.host_view(&view.pool).await
        }
    }

    /// This host's record when a view of `pool` depends on its underlay (VXLAN's MTU).
    async fn underlay_record(&self, pool: &Network) -> Result<Option<HostRecord>> {
        if !view_needs_underlay(pool) {
            return Ok(None);
        }
        Ok(Some(self.host_record(&self.host).await?.ok_or_else(|| {
            ControlError::Store(ferrynet_store::StoreError::Unavailable(format!(
                "network {} spans hosts, but host {} has no running agent registered; start `ferrynet agent` on it",
                pool.name, self.host
            )))
        })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_config_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(LocalConfig::load(d.path()).unwrap(), LocalConfig::default());
        let c = LocalConfig {
            host: Some("h1".into()),
            store: Some("etcd://10.0.0.1:2379".into()),
            dns: Some(LocalDns {
                domain: "ferrynet.internal".into(),
            }),
        };
        c.save(d.path()).unwrap();
        assert_eq!(LocalConfig::load(d.path()).unwrap(), c);
        // Saved again over itself, still root's only: the URL may carry etcd credentials.
        c.save(d.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("host.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
