//! What `ferrynet status` shows: the agent's view of hosts, blocks and peers, and how its last
//! reconcile went.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The agent's report, served as JSON on its unix socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// This host's name.
    pub host: String,
    /// The store URL (or the embedded file).
    pub store: String,
    /// False while the store cannot be reached (the kernel keeps its last good state).
    pub store_ok: bool,
    /// Why the store is unreachable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// The underlay interface.
    pub underlay_dev: String,
    /// Its addresses.
    pub underlay: Vec<IpNet>,
    /// Its MTU.
    pub underlay_mtu: u32,
    /// Unix time (ms) of the last reconcile.
    pub last_reconcile_ms: u64,
    /// How long it took, in milliseconds.
    pub last_reconcile_took_ms: f64,
    /// Reconciles since start.
    pub reconciles: u64,
    /// Errors of the last reconcile (empty when all went well).
    pub errors: Vec<String>,
    /// Kernel changes made since start (routes, FDB and neighbour entries added or removed).
    pub changes: u64,
    /// Known hosts.
    pub hosts: Vec<HostStatus>,
    /// Multi-host networks.
    pub networks: Vec<NetworkStatus>,
    /// The DNS server (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// Health checks this agent runs, by `service/id`.
    #[serde(default)]
    pub health: std::collections::BTreeMap<String, super::health::HealthReport>,
    /// The load balancer (virtual IPs and ingress).
    #[serde(default)]
    pub lb: LbStatus,
    /// The VXLAN guard (absent: this host has no VXLAN device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_guard: Option<VxlanGuardStatus>,
    /// Network policy: the table of this host's endpoints.
    #[serde(default)]
    pub policy: super::policy::PolicyStatus,
    /// Store records refused as invalid (treated as absent), by key.
    #[serde(default)]
    pub rejected: Vec<RejectedRecord>,
    /// The sleeve (absent: not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeve: Option<ferrynet_sleeve::SleeveReport>,
    /// Re-assertions of this host's own records since the agent started (one per new lease):
    /// what partitions longer than the grace period had released and was put back, and what
    /// others hold now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reassert: Option<crate::control::journal::ReassertReport>,
    /// BGP (absent: no `bgp` network in the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<super::bgp::BgpStatus>,
}

/// The VXLAN guard (`inet ferrynet-fabric`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VxlanGuardStatus {
    /// Peer underlay addresses admitted.
    pub peers: usize,
    /// Packets dropped so far, by counter (as last read).
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// Times the table was built whole (first build, or repaired after damage).
    pub rebuilds: u64,
}

/// A store record the agent refused: it reaches no nft rule, DNS name, path or interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedRecord {
    /// The store key.
    pub key: String,
    /// Why it was refused.
    pub reason: String,
}

/// The union of the refusals of the agent's views, by key (the first view's reason wins).
pub fn rejected_list<'a>(
    views: impl IntoIterator<Item = &'a std::collections::BTreeMap<String, String>>,
) -> Vec<RejectedRecord> {
    let mut all = std::collections::BTreeMap::new();
    for v in views {
        for (k, r) in v {
            all.entry(k.clone()).or_insert_with(|| r.clone());
        }
    }
    all.into_iter()
        .map(|(key, reason)| RejectedRecord { key, reason })
        .collect()
}

/// What the load balancer has programmed (table `inet ferrynet-svc`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LbStatus {
    /// Service-port chains programmed (one per service port and family with producers).
    pub chains: usize,
    /// VIP ports served (with or without producers).
    pub vip_ports: usize,
    /// Ingress ports served.
    pub ingress_ports: usize,
    /// Transactions applied since start.
    pub applies: u64,
    /// Whole-table rebuilds among them (start, table found missing, after an error).
    pub rebuilds: u64,
    /// Unix time (ms) of the last transaction.
    pub last_apply_ms: u64,
    /// How long it took, in milliseconds.
    pub last_apply_took_ms: f64,
    /// Discovery view revision last programmed.
    pub revision: u64,
    /// Ingress ports not served here, and why.
    pub conflicts: Vec<String>,
    /// Conntrack entries deleted since start because their producer left.
    #[serde(default)]
    pub conntrack_deleted: u64,
    /// The last conntrack flush error (cleared by the next successful flush).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_error: Option<String>,
    /// The last error (cleared by the next successful transaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The embedded DNS server's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    /// Cluster domain.
    pub domain: String,
    /// Upstream resolvers.
    pub upstreams: Vec<String>,
    /// Addresses served, as `address (network)`.
    pub listening: Vec<String>,
    /// Addresses that could not be bound, with the error (retried).
    pub errors: Vec<String>,
    /// Kubernetes pods of this host named in DNS (`POD.NAMESPACE`), the newest sandbox of each.
    #[serde(default)]
    pub pods: Vec<PodStatus>,
}

/// A pod the DNS server answers for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `POD.NAMESPACE`.
    pub name: String,
    /// Its network.
    pub network: String,
    /// The addresses the name answers.
    pub addresses: Vec<std::net::IpAddr>,
    /// The sandbox (CNI container id) holding the name.
    pub container_id: String,
    /// The pod's UID, when the runtime gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A host as this agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// Name.
    pub name: String,
    /// Underlay addresses.
    pub underlay: Vec<IpNet>,
    /// False once its registration vanished (routes stay until the grace period ends).
    pub live: bool,
}

/// One multi-host network on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Network name.
    pub name: String,
    /// Configured backend.
    pub backend: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// This host's blocks.
    pub blocks: Vec<IpNet>,
    /// Peers and how each is reached.
    pub peers: Vec<PeerReport>,
}

/// One peer of a network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    /// Peer host.
    pub host: String,
    /// The backend used to reach it (`route`, `vxlan` or `sleeve`), if it can be reached.
    pub backend: Option<String>,
    /// Why that backend (`auto` shows what its probe found).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Its blocks.
    pub blocks: Vec<IpNet>,
    /// Why it cannot be reached, if so.
    pub errors: Vec<String>,
}
