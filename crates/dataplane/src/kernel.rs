//! The kernel as the control layer drives it, behind a trait (in the spirit of youki's
//! `Syscall`): links, addresses, routes and qdiscs of the host's namespace and of one
//! container's, the multi-host fabric (VXLAN devices, routes, FDB and neighbour entries), and
//! ferrynet's iptables chain. [`Linux`] carries the calls out;
//! [`fake::Recording`] records them and keeps a small model of the links, so the control
//! layer's flows are unit-tested without root.

pub mod fake;

use std::collections::BTreeSet;
use std::net::Ipv6Addr;

use async_trait::async_trait;
use ferrynet_model::bandwidth::Shaping;
use ferrynet_model::fabric::{FabricDiff, FabricState};
use ferrynet_model::routed::HostPort;
use ipnet::IpNet;

use crate::bridge::BridgeSpec;
use crate::error::{DataplaneError, Result};
use crate::hostpair::{Pair, PairSpec};
use crate::netlink::{Netlink, RouteSpec};
use crate::netns::Netns;
use crate::veth::{Attached, IfaceState, VethSpec};
use crate::vxlan::VxlanSpec;

/// Handles on the host's namespace and, for the calls that need it, one container's, for the
/// length of one operation.
#[async_trait]
pub trait Links: Send + Sync {
    /// The index of a host link, if it exists.
    async fn link_index(&self, name: &str) -> Result<Option<u32>>;
    /// The addresses of host link `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>>;
    /// Delete a host link; true if it existed.
    async fn delete_link(&self, name: &str) -> Result<bool>;
    /// Remove `addr` from host link `index`; true if it was there.
    async fn delete_address(&self, index: u32, addr: IpNet) -> Result<bool>;
    /// Create (or converge) a bridge; its index.
    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<u32>;
    /// Delete bridge `name`; true if it existed.
    async fn delete_bridge(&self, name: &str) -> Result<bool>;
    /// The names of the host's bridges.
    async fn bridges(&self) -> Result<Vec<String>>;
    /// The names of the links enslaved to bridge `name` (none when it does not exist).
    async fn bridge_ports(&self, name: &str) -> Result<Vec<String>>;
    /// Put `gateways` on `lo` with the forwarding `sysctls` (a routed network's gateways).
    async fn ensure_gateways(&self, gateways: &[IpNet], sysctls: &[(String, String)])
        -> Result<()>;
    /// Remove the gateways on `lo` and the `unreachable` routes inside `pool` (a routed
    /// network's, whatever blocks this host held).
    async fn remove_gateways(&self, pool: &[IpNet]) -> Result<()>;
    /// The prefixes of ferrynet's `unreachable` routes (routed networks' subnets and blocks).
    async fn unreachable_prefixes(&self) -> Result<Vec<IpNet>>;
    /// A veth pair left in the host namespace for a runtime to move (Docker's).
    async fn create_pair(&self, spec: &PairSpec) -> Result<Pair>;
    /// Give a routed container's host end `index` what `port` says.
    async fn plumb_routed_port(&self, index: u32, port: &HostPort) -> Result<()>;
    /// Make the proxy NDP entries on routed ports `ports` exactly `want`; per-entry failures.
    async fn sync_proxy_ndp(
        &self,
        ports: &[String],
        want: &BTreeSet<(String, Ipv6Addr)>,
    ) -> Result<Vec<String>>;
    /// Shape host end `index` (IFB `ifb` for the container's egress).
    async fn apply_shaping(&self, index: u32, ifb: &str, mtu: u32, shaping: &Shaping)
        -> Result<()>;
    /// Delete IFB `ifb` if it exists.
    async fn remove_ifb(&self, ifb: &str) -> Result<()>;
    /// What is missing of `shaping` on host end `index` and IFB `ifb`.
    async fn shaping_problems(
        &self,
        index: u32,
        ifb: &str,
        shaping: &Shaping,
    ) -> Result<Vec<String>>;
    /// The container's interface `ifname`, if it exists (needs the container's namespace).
    async fn inspect(&self, ifname: &str) -> Result<Option<IfaceState>>;
    /// Create the veth pair, move one end into the container, configure both.
    async fn attach_veth(&self, spec: &VethSpec) -> Result<Attached>;
    /// Remove the container's `ifname` (when the container's namespace is open) and the host
    /// end `host_name`; missing links are no error.
    async fn detach_veth(&self, ifname: &str, host_name: &str) -> Result<()>;
    /// Give the container's `ifname` the addresses `add` and `routes`, then drop `remove`
    /// (needs the container's namespace).
    async fn renumber(
        &self,
        ifname: &str,
        remove: &[IpNet],
        add: &[IpNet],
        routes: &[RouteSpec],
    ) -> Result<()>;
    /// Create (or converge) a network's VXLAN device; its index.
    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32>;
    /// The fabric state ferrynet programmed (routes, and entries on `vxlan_devs`).
    async fn read_fabric(&self, vxlan_devs: &[String]) -> Result<FabricState>;
    /// Carry out `diff`; per-item failures as "item: error" lines.
    async fn apply_fabric(&self, diff: &FabricDiff) -> Result<Vec<String>>;
}

/// Opens [`Links`] and runs the host-wide calls.
pub trait Kernel: Send + Sync {
    /// The host's namespace.
    fn host(&self) -> Result<Box<dyn Links>>;
    /// The host's namespace and the container's at `netns` (an error when it cannot be opened).
    fn container(&self, netns: &str) -> Result<Box<dyn Links>>;
    /// ferrynet's iptables FORWARD chain, after Docker's jumps.
    fn ensure_forward_accept(&self) -> Result<()>;
    /// Remove that chain and its jumps (nothing left to serve).
    fn remove_forward_accept(&self) -> Result<()>;
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

impl Kernel for Linux {
    fn host(&self) -> Result<Box<dyn Links>> {
        Ok(Box::new(LinuxLinks::host(Netlink::current()?)))
    }

    fn container(&self, netns: &str) -> Result<Box<dyn Links>> {
        let ns = Netns::open(netns)?;
        let nl = Netlink::in_netns(&ns)?;
        Ok(Box::new(LinuxLinks {
            host: Netlink::current()?,
            container: Some((ns, nl)),
        }))
    }

    fn ensure_forward_accept(&self) -> Result<()> {
        crate::firewall_compat::ensure_forward_accept()
    }

    fn remove_forward_accept(&self) -> Result<()> {
        crate::firewall_compat::remove_forward_accept()
    }
}

/// Netlink handles in the host's namespace and maybe a container's.
pub struct LinuxLinks {
    host: Netlink,
    container: Option<(Netns, Netlink)>,
}

impl LinuxLinks {
    /// Over an open host handle (the agent keeps one).
    pub fn host(host: Netlink) -> LinuxLinks {
        LinuxLinks {
            host,
            container: None,
        }
    }

    fn container(&self) -> Result<&(Netns, Netlink)> {
        self.container
            .as_ref()
            .ok_or_else(|| DataplaneError::NotFound("no container namespace is open".into()))
    }
}

#[async_trait]
impl Links for LinuxLinks {
    async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        self.host.link_index(name).await
    }
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        self.host.addresses(index).await
    }
    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.host.delete_link(name).await
    }
    async fn delete_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        self.host.delete_address(index, addr).await
    }
    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<u32> {
        crate::bridge::ensure_bridge(&self.host, spec).await
    }
    async fn delete_bridge(&self, name: &str) -> Result<bool> {
        crate::bridge::delete_bridge(&self.host, name).await
    }
    async fn bridges(&self) -> Result<Vec<String>> {
        let links = self.host.links().await?;
        Ok(links
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("bridge"))
            .map(|l| l.name)
            .collect())
    }
    async fn bridge_ports(&self, name: &str) -> Result<Vec<String>> {
        let Some(br) = self.host.link_by_name(name).await? else {
            return Ok(Vec::new());
        };
        let links = self.host.links().await?;
        Ok(links
            .into_iter()
            .filter(|l| l.master == Some(br.index))
            .map(|l| l.name)
            .collect())
    }
    async fn ensure_gateways(
        &self,
        gateways: &[IpNet],
        sysctls: &[(String, String)],
    ) -> Result<()> {
        crate::routed::ensure_gateways(&self.host, gateways, sysctls).await
    }
    async fn remove_gateways(&self, pool: &[IpNet]) -> Result<()> {
        crate::routed::remove_gateways(&self.host, pool).await
    }
    async fn unreachable_prefixes(&self) -> Result<Vec<IpNet>> {
        crate::routed::unreachable_prefixes(&self.host).await
    }
    async fn create_pair(&self, spec: &PairSpec) -> Result<Pair> {
        crate::hostpair::create_pair(&self.host, spec).await
    }
    async fn plumb_routed_port(&self, index: u32, port: &HostPort) -> Result<()> {
        crate::routed::plumb_port(&self.host, index, port).await
    }
    async fn sync_proxy_ndp(
        &self,
        ports: &[String],
        want: &BTreeSet<(String, Ipv6Addr)>,
    ) -> Result<Vec<String>> {
        crate::routed::sync_proxy_ndp(&self.host, ports, want).await
    }
    async fn apply_shaping(
        &self,
        index: u32,
        ifb: &str,
        mtu: u32,
        shaping: &Shaping,
    ) -> Result<()> {
        crate::tc::apply_shaping(&self.host, index, ifb, mtu, shaping).await
    }
    async fn remove_ifb(&self, ifb: &str) -> Result<()> {
        crate::tc::remove_ifb(&self.host, ifb).await.map(|_| ())
    }
    async fn shaping_problems(
        &self,
        index: u32,
        ifb: &str,
        shaping: &Shaping,
    ) -> Result<Vec<String>> {
        crate::tc::shaping_problems(&self.host, index, ifb, shaping).await
    }
    async fn inspect(&self, ifname: &str) -> Result<Option<IfaceState>> {
        crate::veth::inspect(&self.container()?.1, ifname).await
    }
    async fn attach_veth(&self, spec: &VethSpec) -> Result<Attached> {
        let (ns, nl) = self.container()?;
        crate::veth::attach(&self.host, ns, nl, spec).await
    }
    async fn detach_veth(&self, ifname: &str, host_name: &str) -> Result<()> {
        let container = self.container.as_ref().map(|(_, nl)| nl);
        crate::veth::detach(&self.host, container, ifname, host_name).await
    }
    async fn renumber(
        &self,
        ifname: &str,
        remove: &[IpNet],
        add: &[IpNet],
        routes: &[RouteSpec],
    ) -> Result<()> {
        crate::veth::renumber(&self.container()?.1, ifname, remove, add, routes).await
    }
    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32> {
        self.host.ensure_vxlan(spec).await
    }
    async fn read_fabric(&self, vxlan_devs: &[String]) -> Result<FabricState> {
        self.host.read_fabric(vxlan_devs).await
    }
    async fn apply_fabric(&self, diff: &FabricDiff) -> Result<Vec<String>> {
        self.host.apply_fabric(diff).await
    }
}
