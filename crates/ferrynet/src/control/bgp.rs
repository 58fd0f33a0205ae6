//! BGP records (`ferrynet bgp`): the cluster's settings, per-host settings and external
//! peers, under `bgp/` in the store. Records read back are checked again (they are input).

use std::collections::BTreeMap;

use ferrynet_model::bgp::{keys, BgpConfig, NodeConfig, PeerRecord};
use ferrynet_store::Store;

use super::Control;
use crate::error::{ControlError, Result};

/// Every BGP record, as read from the store (invalid ones left out and named).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpRecords {
    /// The cluster's settings (defaults when unset or invalid).
    pub config: BgpConfig,
    /// Per-host settings.
    pub nodes: BTreeMap<String, NodeConfig>,
    /// External peers.
    pub peers: Vec<PeerRecord>,
    /// Keys refused, with why.
    pub rejected: Vec<(String, String)>,
}

/// Read every BGP record from `store`.
pub async fn read_records(store: &dyn Store) -> Result<BgpRecords> {
    let (kvs, _) = store.range(&keys::all()).await?;
    Ok(parse_records(&kvs))
}

/// Decode and check BGP records; bad ones go to `rejected`.
pub fn parse_records(kvs: &[ferrynet_store::KeyValue]) -> BgpRecords {
    let mut out = BgpRecords::default();
    for kv in kvs {
        let res: std::result::Result<(), String> = if kv.key == keys::config() {
            serde_json::from_slice::<BgpConfig>(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check().map(|_| c).map_err(|e| e.to_string()))
                .map(|c| out.config = c)
        } else if let Some(host) = kv.key.strip_prefix(&keys::nodes()) {
            serde_json::from_slice::<NodeConfig>(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|n| n.check().map(|_| n).map_err(|e| e.to_string()))
                .map(|n| {
                    out.nodes.insert(host.to_string(), n);
                })
        } else if kv.key.starts_with(&keys::peers()) {
            serde_json::from_slice::<PeerRecord>(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|p| p.check_at(&kv.key).map(|_| p).map_err(|e| e.to_string()))
                .map(|p| out.peers.push(p))
        } else {
            Ok(())
        };
        if let Err(e) = res {
            out.rejected.push((kv.key.clone(), e));
        }
    }
    out
}

fn invalid(e: impl std::fmt::Display) -> ControlError {
    ControlError::InvalidConfig(e.to_string())
}

impl Control {
    /// Every BGP record.
    pub async fn bgp_records(&self) -> Result<BgpRecords> {
        read_records(self.store.as_ref()).await
    }

    /// Add or replace an external peer.
    pub async fn bgp_peer_put(&self, p: &PeerRecord) -> Result<()> {
        p.check().map_err(invalid)?;
        let v = serde_json::to_vec(p).map_err(invalid)?;
        self.store.put(&keys::peer(&p.name), v).await?;
        Ok(())
    }

    /// Remove an external peer; false when there was none.
    pub async fn bgp_peer_remove(&self, name: &str) -> Result<bool> {
        Ok(self.store.delete(&keys::peer(name)).await?)
    }

    /// Set the cluster's settings.
    pub async fn bgp_config_put(&self, c: &BgpConfig) -> Result<()> {
        c.check().map_err(invalid)?;
        let v = serde_json::to_vec(c).map_err(invalid)?;
        self.store.put(&keys::config(), v).await?;
        Ok(())
    }

    /// Set one host's settings.
    pub async fn bgp_node_put(&self, host: &str, n: &NodeConfig) -> Result<()> {
        n.check().map_err(invalid)?;
        let v = serde_json::to_vec(n).map_err(invalid)?;
        self.store.put(&keys::node(host), v).await?;
        Ok(())
    }
}
