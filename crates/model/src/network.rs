//! Networks and endpoints: the records ferrynet keeps in its store.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bandwidth::Bandwidth;
use crate::pod::PodIdentity;
use crate::portmap::PortMapping;

/// How containers on a network are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A Linux bridge, a veth pair per container, one netns per container.
    #[default]
    Bridge,
    /// The container shares the host's network namespace; nothing is created.
    Host,
    /// No bridge: a veth pair per container whose host end carries a /32 and /128 route to
    /// it; the container's default route goes to the link-local gateway the host end answers
    /// (Calico's model, see [`crate::routed`]).
    Routed,
}

impl NetworkMode {
    /// Whether a container gets an interface of its own (a veth pair): bridged and routed
    /// networks; host networking creates nothing.
    pub fn gives_interfaces(self) -> bool {
        matches!(self, NetworkMode::Bridge | NetworkMode::Routed)
    }

    /// The mode as the CLI, CNI configurations and Docker options spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::Routed => "routed",
        }
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bridge" => Ok(NetworkMode::Bridge),
            "host" => Ok(NetworkMode::Host),
            "routed" => Ok(NetworkMode::Routed),
            other => Err(format!(
                "mode {other:?} is not one of \"bridge\", \"routed\", \"host\""
            )),
        }
    }
}

/// One subnet of a network's address pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subnet {
    /// The subnet, e.g. `10.88.0.0/16` or `fd00:88::/64`.
    pub cidr: IpNet,
    /// The gateway (bridge) address; defaults to the first host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// First address handed to containers (inclusive); defaults to the one after the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    /// Last address handed to containers (inclusive); defaults to the last usable address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    /// Addresses or blocks never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<IpNet>,
}

impl Subnet {
    /// A subnet with defaults for everything but the CIDR.
    pub fn new(cidr: IpNet) -> Self {
        Subnet {
            cidr: cidr.trunc(),
            gateway: None,
            range_start: None,
            range_end: None,
            exclude: Vec::new(),
        }
    }
}

/// A ferrynet network as stored under `/ferrynet/v1/networks/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Unique name, also the CNI network name.
    pub name: String,
    /// Attachment mode.
    #[serde(default)]
    pub mode: NetworkMode,
    /// The Linux bridge's name (at most 15 bytes); derived from the name when empty. A routed
    /// network has no bridge: a dummy device of this name holds its gateway addresses.
    #[serde(default)]
    pub bridge: String,
    /// Address pool: any number of IPv4 and IPv6 subnets.
    #[serde(default)]
    pub subnets: Vec<Subnet>,
    /// MTU for the bridge and container interfaces (None: kernel default, 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// No route out: no default route, no masquerade, no published ports from outside.
    #[serde(default)]
    pub internal: bool,
    /// Masquerade traffic leaving the network's subnets (default true unless internal).
    #[serde(default = "default_true")]
    pub ip_masq: bool,
    /// Set for a multi-host network: its pool is carved into per-host blocks and the agents
    /// connect the hosts with this fabric. None: a single-host network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<FabricSpec>,
    /// Network policy: its endpoints are restricted in both directions even when no policy
    /// selects them (only what a policy allows passes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_deny: bool,
}

/// How a multi-host network spans hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricSpec {
    /// How hosts reach each other's blocks.
    pub backend: crate::fabric::Backend,
    /// VXLAN network identifier (used by the vxlan and auto backends).
    pub vni: u32,
    /// Prefix length of an IPv4 block (default 26: 64 addresses).
    #[serde(default = "default_block_v4")]
    pub block_v4: u8,
    /// Prefix length of an IPv6 block (default 122: 64 addresses, matching the IPv4 block).
    #[serde(default = "default_block_v6")]
    pub block_v6: u8,
    /// Cross-host traffic goes through the sleeve (encrypted) whatever the backend.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypt: bool,
}

/// Default IPv4 block prefix length.
pub const DEFAULT_BLOCK_V4: u8 = 26;
/// Default IPv6 block prefix length.
pub const DEFAULT_BLOCK_V6: u8 = 122;

fn default_block_v4() -> u8 {
    DEFAULT_BLOCK_V4
}
fn default_block_v6() -> u8 {
    DEFAULT_BLOCK_V6
}

impl Network {
    /// A single-host bridged network over `cidrs` that masquerades outbound traffic, with the
    /// kernel's MTU and the bridge name derived from `name`.
    pub fn bridged(name: &str, cidrs: impl IntoIterator<Item = IpNet>) -> Network {
        Network {
            name: name.to_string(),
            mode: NetworkMode::Bridge,
            bridge: crate::names::bridge_name(name),
            subnets: cidrs.into_iter().map(Subnet::new).collect(),
            mtu: None,
            internal: false,
            ip_masq: true,
            fabric: None,
            default_deny: false,
        }
    }
}

impl FabricSpec {
    /// The block prefix length for an address family.
    pub fn block_len(&self, v6: bool) -> u8 {
        if v6 {
            self.block_v6
        } else {
            self.block_v4
        }
    }
}

fn default_true() -> bool {
    true
}

/// A container's attachment to a network, stored under
/// `/ferrynet/v1/endpoints/<network>/<container_id>/<ifname>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The network this endpoint is on.
    pub network: String,
    /// The runtime's container id (CNI_CONTAINERID).
    pub container_id: String,
    /// Interface name inside the container (CNI_IFNAME).
    pub ifname: String,
    /// Path of the container's network namespace (CNI_NETNS), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Addresses with the subnet's prefix length, e.g. `10.88.0.2/16`.
    pub ips: Vec<IpNet>,
    /// MAC address of the container interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Name of the host side of the veth pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_veth: Option<String>,
    /// MAC address of the host side of the veth pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    /// Ports published for this endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
    /// The host the endpoint lives on (multi-host networks), so a dead host's endpoints can be
    /// released by the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The container's name in DNS on this network (CLI containers; CNI when the runtime
    /// passes one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Further DNS names of this endpoint on its network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Which runtime attached it; CNI GC releases only CNI's (see [`crate::gc`]).
    #[serde(default)]
    pub owner: EndpointOwner,
    /// The Kubernetes pod it belongs to (`CNI_ARGS`), when the runtime said; DNS answers
    /// `POD.NAMESPACE` for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
    /// Labels for policy; `namespace` is the pod's namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Bandwidth limits, applied on the host side of its veth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
}

/// The runtime that made an endpoint, recorded at ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointOwner {
    /// A record written before owners were recorded; [`crate::gc::legacy_owner`] infers it.
    #[default]
    Unknown,
    /// A CNI ADD (a container runtime).
    Cni,
    /// `ferrynet run`.
    Cli,
    /// The Docker (CNM) network driver.
    Docker,
}

impl Endpoint {
    /// An endpoint of `container_id`'s `ifname` on `network`, with nothing recorded yet.
    pub fn new(network: &str, container_id: &str, ifname: &str) -> Endpoint {
        Endpoint {
            network: network.to_string(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            netns: None,
            ips: Vec::new(),
            mac: None,
            host_veth: None,
            host_mac: None,
            port_mappings: Vec::new(),
            host: None,
            name: None,
            aliases: Vec::new(),
            owner: EndpointOwner::Unknown,
            pod: None,
            labels: BTreeMap::new(),
            bandwidth: None,
        }
    }
}

/// Store key layout; one place so every reader and writer agrees.
pub mod keys {
    /// Root of ferrynet's keyspace.
    pub const ROOT: &str = "/ferrynet/v1/";

    /// Key of a network record.
    pub fn network(name: &str) -> String {
        format!("{ROOT}networks/{name}")
    }
    /// Prefix of all network records.
    pub fn networks() -> String {
        format!("{ROOT}networks/")
    }
    /// Key of an IP allocation (value: the owner `container_id/ifname`).
    pub fn ipam(network: &str, ip: std::net::IpAddr) -> String {
        format!("{ROOT}ipam/{network}/{ip}")
    }
    /// Prefix of a network's IP allocations.
    pub fn ipam_prefix(network: &str) -> String {
        format!("{ROOT}ipam/{network}/")
    }
    /// Key of an endpoint record.
    pub fn endpoint(network: &str, container_id: &str, ifname: &str) -> String {
        format!("{ROOT}endpoints/{network}/{container_id}/{ifname}")
    }
    /// Prefix of a network's endpoints.
    pub fn endpoints(network: &str) -> String {
        format!("{ROOT}endpoints/{network}/")
    }
    /// Prefix of every endpoint on every network.
    pub fn all_endpoints() -> String {
        format!("{ROOT}endpoints/")
    }
    /// Key of a published host port (value: the owning endpoint key), so a port is taken once.
    pub fn host_port(proto: &str, host_ip: Option<std::net::IpAddr>, port: u16) -> String {
        let ip = host_ip.map(|i| i.to_string()).unwrap_or_else(|| "*".into());
        format!("{ROOT}ports/{proto}/{ip}/{port}")
    }
    /// Prefix of all published host ports.
    pub fn host_ports() -> String {
        format!("{ROOT}ports/")
    }
    /// The host ports one endpoint publishes (a `portclaim::PortClaim`), keyed like the
    /// endpoint.
    pub fn port_claim(network: &str, container_id: &str, ifname: &str) -> String {
        format!("{ROOT}port-claims/{network}/{container_id}/{ifname}")
    }
    /// Prefix of every endpoint's port claim.
    pub fn port_claims() -> String {
        format!("{ROOT}port-claims/")
    }
    /// Bumped by every transaction that publishes ports, so two concurrent publishers of
    /// overlapping ports (one on any address, one on a specific one) cannot both win.
    pub fn host_ports_seq() -> String {
        format!("{ROOT}ports-seq")
    }
    /// Last address handed out per subnet of a network (JSON map cidr -> ip), for rotation.
    pub fn ipam_last(network: &str) -> String {
        format!("{ROOT}ipam-last/{network}")
    }
    /// Key of a CLI container record.
    pub fn container(name: &str) -> String {
        format!("{ROOT}containers/{name}")
    }
    /// Prefix of CLI container records.
    pub fn containers() -> String {
        format!("{ROOT}containers/")
    }
    /// Key of a live host's registration (attached to the host agent's lease).
    pub fn host(name: &str) -> String {
        format!("{ROOT}hosts/{name}")
    }
    /// Prefix of host registrations.
    pub fn hosts() -> String {
        format!("{ROOT}hosts/")
    }
    /// Key of a block claim (value: the owning host). `/` in the CIDR becomes `_`.
    pub fn block(network: &str, block: &ipnet::IpNet) -> String {
        format!(
            "{ROOT}blocks/{network}/{}",
            block.to_string().replace('/', "_")
        )
    }
    /// Prefix of a network's block claims.
    pub fn blocks(network: &str) -> String {
        format!("{ROOT}blocks/{network}/")
    }
    /// Marks a block released from a departed host (value: that host), so other hosts take
    /// it only when no other block is free and the host finds it when it returns.
    pub fn orphan_block(network: &str, block: &ipnet::IpNet) -> String {
        format!(
            "{ROOT}orphan-blocks/{network}/{}",
            block.to_string().replace('/', "_")
        )
    }
    /// Prefix of a network's orphaned blocks.
    pub fn orphan_blocks(network: &str) -> String {
        format!("{ROOT}orphan-blocks/{network}/")
    }
    /// Prefix of every block claim.
    pub fn all_blocks() -> String {
        format!("{ROOT}blocks/")
    }
    /// The block a block key names, if it is one.
    pub fn parse_block(key: &str) -> Option<(String, ipnet::IpNet)> {
        let rest = key.strip_prefix(ROOT)?.strip_prefix("blocks/")?;
        let (net, cidr) = rest.split_once('/')?;
        Some((net.to_string(), cidr.replace('_', "/").parse().ok()?))
    }
    /// Key reserving a VXLAN network identifier (value: the network name).
    pub fn vni(vni: u32) -> String {
        format!("{ROOT}vni/{vni}")
    }
}
