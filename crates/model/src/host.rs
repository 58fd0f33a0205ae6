//! Hosts of a multi-host cluster: what an agent registers about its host.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A live host, stored under `/ferrynet/v1/hosts/<name>` on the agent's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// Unique host name.
    pub name: String,
    /// The underlay interface's addresses with their subnet prefix (IPv4 and/or IPv6).
    pub underlay: Vec<IpNet>,
    /// The underlay interface's MTU.
    pub underlay_mtu: u32,
    /// What this host's agent can do (e.g. `route`, `vxlan`).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// Unix time (seconds) the agent started.
    #[serde(default)]
    pub started_at: u64,
    /// The host's sleeve (encrypted overlay) key and port; absent when it runs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeve: Option<crate::sleeve::SleeveRecord>,
}

impl HostRecord {
    /// A record for tests: `name` with these underlay `addr/prefix`es, MTU 1500.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str, addrs: &[&str]) -> HostRecord {
        HostRecord {
            name: name.into(),
            underlay: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            underlay_mtu: 1500,
            capabilities: vec![],
            version: String::new(),
            started_at: 0,
            sleeve: None,
        }
    }

    /// True when the underlay has an IPv4 address (VXLAN then tunnels over IPv4).
    pub fn has_v4_underlay(&self) -> bool {
        self.underlay.iter().any(|a| a.addr().is_ipv4())
    }
}

/// A block claim, the value under `/ferrynet/v1/blocks/<network>/<cidr>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockClaim {
    /// The host that owns the block.
    pub host: String,
}
