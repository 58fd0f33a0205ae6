//! Recording fakes of the kernel and of nftables, for unit tests that run without root: every
//! call is logged as one line, links, bridge ports, addresses, `unreachable` routes and the
//! fabric are kept in a small model (so a retried attach finds its interface, a detach removes
//! it, a sweep finds what is left), and any call can be made to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use ferrynet_model::bandwidth::Shaping;
use ferrynet_model::fabric::{FabricDiff, FabricState};
use ferrynet_model::routed::HostPort;
use ipnet::IpNet;

use super::{Kernel, Links};
use crate::bridge::BridgeSpec;
use crate::error::{DataplaneError, Result};
use crate::hostpair::{Pair, PairSpec};
use crate::netlink::{RouteInfo, RouteSpec};
use crate::nft::{NftError, NftExecutor};
use crate::veth::{Attached, IfaceState, VethSpec};
use crate::vxlan::VxlanSpec;

/// The index of `lo`, the same in every namespace (a routed network's gateways live there).
pub const LOOPBACK: u32 = 1;

/// What the fake kernel holds.
#[derive(Debug, Default)]
pub struct State {
    /// Every call, in order (`op arg…`).
    pub calls: Vec<String>,
    /// Host links by name -> index (`lo`, index 1, is not listed).
    pub host_links: BTreeMap<String, u32>,
    /// The host links that are bridges.
    pub bridges: BTreeSet<String>,
    /// Bridge ports: host link -> the bridge it is enslaved to.
    pub masters: BTreeMap<String, String>,
    /// Host addresses by link index ([`LOOPBACK`] holds routed gateways).
    pub addresses: BTreeMap<u32, BTreeSet<IpNet>>,
    /// ferrynet's `unreachable` routes.
    pub unreachable: BTreeSet<IpNet>,
    /// The fabric's routes, FDB and neighbour entries.
    pub fabric: FabricState,
    /// Container interfaces by netns path, then name.
    pub containers: BTreeMap<String, BTreeMap<String, IfaceState>>,
    /// Namespaces that cannot be opened.
    pub missing_netns: BTreeSet<String>,
    /// Calls (by op name) that fail.
    pub failing: BTreeSet<String>,
    next_index: u32,
}

/// A kernel that records; clones share their state.
#[derive(Debug, Clone, Default)]
pub struct Recording(Arc<Mutex<State>>);

impl Recording {
    /// The shared state (a poisoned lock is taken over: a failed test already reports).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every later call of `op` (`attach_veth`, `apply_shaping`, …) fail.
    pub fn fail(&self, op: &str) {
        self.state().failing.insert(op.to_string());
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// The calls so far whose op is `op`.
    pub fn calls_of(&self, op: &str) -> Vec<String> {
        let prefix = format!("{op} ");
        let calls = self.calls();
        calls
            .into_iter()
            .filter(|c| c == op || c.starts_with(&prefix))
            .collect()
    }
}

impl State {
    /// Log a call; its injected failure, if any.
    fn record(&mut self, op: &str, args: String) -> Result<()> {
        self.calls
            .push(format!("{op} {args}").trim_end().to_string());
        if self.failing.contains(op) {
            return Err(DataplaneError::NotFound(format!("injected failure: {op}")));
        }
        Ok(())
    }

    /// Add a host link (a test's setup, or what a call creates); its index.
    pub fn add_link(&mut self, name: &str) -> u32 {
        if let Some(i) = self.host_links.get(name) {
            return *i;
        }
        // Indices after lo's, as in a fresh namespace.
        self.next_index = self.next_index.max(LOOPBACK) + 1;
        let i = self.next_index;
        self.host_links.insert(name.to_string(), i);
        i
    }

    /// Add a bridge (as `ensure_bridge` does) with `addresses`; its index.
    pub fn add_bridge(&mut self, name: &str, addresses: &[IpNet]) -> u32 {
        let i = self.add_link(name);
        self.bridges.insert(name.to_string());
        self.addresses
            .entry(i)
            .or_default()
            .extend(addresses.iter().copied());
        i
    }

    /// Remove a host link with its addresses; a bridge's ports are released from it.
    fn remove_host_link(&mut self, name: &str) -> bool {
        let Some(i) = self.host_links.remove(name) else {
            return false;
        };
        self.addresses.remove(&i);
        self.bridges.remove(name);
        self.masters.remove(name);
        self.masters.retain(|_, m| m != name);
        // The kernel drops what hangs off a deleted device.
        self.fabric.routes.retain(|r| r.dev != name);
        self.fabric.fdb.retain(|e| e.dev != name);
        self.fabric.neigh.retain(|e| e.dev != name);
        true
    }

    fn bridge_named(&self, index: u32) -> Option<String> {
        self.bridges
            .iter()
            .find(|b| self.host_links.get(*b) == Some(&index))
            .cloned()
    }
}

impl Kernel for Recording {
    fn host(&self) -> Result<Box<dyn Links>> {
        self.state().record("open_host", String::new())?;
        Ok(Box::new(FakeLinks {
            k: self.clone(),
            netns: None,
        }))
    }

    fn container(&self, netns: &str) -> Result<Box<dyn Links>> {
        let mut s = self.state();
        s.record("open_container", netns.to_string())?;
        if s.missing_netns.contains(netns) {
            return Err(DataplaneError::NotFound(format!("netns {netns}")));
        }
        Ok(Box::new(FakeLinks {
            k: self.clone(),
            netns: Some(netns.to_string()),
        }))
    }

    fn ensure_forward_accept(&self) -> Result<()> {
        self.state().record("ensure_forward_accept", String::new())
    }

    fn remove_forward_accept(&self) -> Result<()> {
        self.state().record("remove_forward_accept", String::new())
    }
}

/// The fake's handles for one operation.
struct FakeLinks {
    k: Recording,
    netns: Option<String>,
}

/// A MAC derived from an index (the fake's links need distinct ones).
fn mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x02, 0, b[0], b[1], b[2], b[3]]
}

#[async_trait]
impl Links for FakeLinks {
    async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut s = self.k.state();
        s.record("link_index", name.to_string())?;
        Ok(s.host_links.get(name).copied())
    }
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let mut s = self.k.state();
        s.record("addresses", index.to_string())?;
        Ok(s.addresses
            .get(&index)
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default())
    }
    async fn delete_link(&self, name: &str) -> Result<bool> {
        let mut s = self.k.state();
        s.record("delete_link", name.to_string())?;
        Ok(s.remove_host_link(name))
    }
    async fn delete_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        let mut s = self.k.state();
        s.record("delete_address", format!("{index} {addr}"))?;
        Ok(s.addresses.get_mut(&index).is_some_and(|a| a.remove(&addr)))
    }
    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<u32> {
        let mut s = self.k.state();
        s.record("ensure_bridge", spec.name.clone())?;
        Ok(s.add_bridge(&spec.name, &spec.addresses))
    }
    async fn delete_bridge(&self, name: &str) -> Result<bool> {
        let mut s = self.k.state();
        s.record("delete_bridge", name.to_string())?;
        Ok(s.remove_host_link(name))
    }
    async fn bridges(&self) -> Result<Vec<String>> {
        let mut s = self.k.state();
        s.record("bridges", String::new())?;
        Ok(s.bridges.iter().cloned().collect())
    }
    async fn bridge_ports(&self, name: &str) -> Result<Vec<String>> {
        let mut s = self.k.state();
        s.record("bridge_ports", name.to_string())?;
        Ok(s.masters
            .iter()
            .filter(|(_, m)| *m == name)
            .map(|(p, _)| p.clone())
            .collect())
    }
    async fn ensure_gateways(
        &self,
        gateways: &[IpNet],
        _sysctls: &[(String, String)],
    ) -> Result<()> {
        let mut s = self.k.state();
        s.record("ensure_gateways", format!("{gateways:?}"))?;
        for g in gateways {
            if let Ok(host) = IpNet::new(g.addr(), g.max_prefix_len()) {
                s.addresses.entry(LOOPBACK).or_default().insert(host);
            }
            s.unreachable.insert(g.trunc());
        }
        Ok(())
    }
    async fn remove_gateways(&self, pool: &[IpNet]) -> Result<()> {
        let mut s = self.k.state();
        s.record("remove_gateways", format!("{pool:?}"))?;
        let inside = |n: &IpNet| pool.iter().any(|p| p.contains(n));
        if let Some(lo) = s.addresses.get_mut(&LOOPBACK) {
            lo.retain(|a| a.prefix_len() != a.max_prefix_len() || !inside(a));
        }
        s.unreachable.retain(|u| !inside(u));
        Ok(())
    }
    async fn unreachable_prefixes(&self) -> Result<Vec<IpNet>> {
        let mut s = self.k.state();
        s.record("unreachable_prefixes", String::new())?;
        Ok(s.unreachable.iter().copied().collect())
    }
    async fn create_pair(&self, spec: &PairSpec) -> Result<Pair> {
        let mut s = self.k.state();
        s.record("create_pair", spec.host_name.clone())?;
        let host_index = s.add_link(&spec.host_name);
        let peer = s.add_link(&spec.peer_name);
        Ok(Pair {
            host_index,
            host_mac: mac(host_index),
            peer_mac: spec.peer_mac.unwrap_or(mac(peer)),
        })
    }
    async fn plumb_routed_port(&self, index: u32, _port: &HostPort) -> Result<()> {
        self.k
            .state()
            .record("plumb_routed_port", index.to_string())
    }
    async fn sync_proxy_ndp(
        &self,
        ports: &[String],
        want: &std::collections::BTreeSet<(String, std::net::Ipv6Addr)>,
    ) -> Result<Vec<String>> {
        self.k
            .state()
            .record("sync_proxy_ndp", format!("{ports:?} {want:?}"))?;
        Ok(Vec::new())
    }
    async fn apply_shaping(
        &self,
        index: u32,
        ifb: &str,
        _mtu: u32,
        _shaping: &Shaping,
    ) -> Result<()> {
        self.k
            .state()
            .record("apply_shaping", format!("{index} {ifb}"))
    }
    async fn remove_ifb(&self, ifb: &str) -> Result<()> {
        self.k.state().record("remove_ifb", ifb.to_string())
    }
    async fn shaping_problems(
        &self,
        index: u32,
        ifb: &str,
        _shaping: &Shaping,
    ) -> Result<Vec<String>> {
        self.k
            .state()
            .record("shaping_problems", format!("{index} {ifb}"))?;
        Ok(Vec::new())
    }
    async fn inspect(&self, ifname: &str) -> Result<Option<IfaceState>> {
        let ns = self.open_netns()?;
        let mut s = self.k.state();
        s.record("inspect", format!("{ns} {ifname}"))?;
        Ok(s.containers.get(&ns).and_then(|m| m.get(ifname)).cloned())
    }
    async fn attach_veth(&self, spec: &VethSpec) -> Result<Attached> {
        let ns = self.open_netns()?;
        let mut s = self.k.state();
        let c = &spec.container;
        s.record(
            "attach_veth",
            format!("{ns} {} {}", c.ifname, spec.host_name),
        )?;
        if s.containers
            .get(&ns)
            .is_some_and(|m| m.contains_key(&c.ifname))
        {
            return Err(DataplaneError::Conflict(format!(
                "{} already exists in {ns}",
                c.ifname
            )));
        }
        let host_index = s.add_link(&spec.host_name);
        if let Some(br) = spec.bridge_index.and_then(|i| s.bridge_named(i)) {
            s.masters.insert(spec.host_name.clone(), br);
        }
        let container_mac = c.mac.unwrap_or(mac(host_index + 1000));
        let state = IfaceState {
            index: host_index + 1000,
            mac: container_mac,
            mtu: c.mtu.unwrap_or(1500),
            up: true,
            addresses: c.addresses.clone(),
            routes: Vec::new(),
        };
        s.containers
            .entry(ns)
            .or_default()
            .insert(c.ifname.clone(), state);
        Ok(Attached {
            host_index,
            host_mac: mac(host_index),
            container_index: host_index + 1000,
            container_mac,
        })
    }
    async fn detach_veth(&self, ifname: &str, host_name: &str) -> Result<()> {
        let mut s = self.k.state();
        let ns = self.netns.clone().unwrap_or_default();
        s.record("detach_veth", format!("{ns} {ifname} {host_name}"))?;
        if let Some(m) = s.containers.get_mut(&ns) {
            m.remove(ifname);
        }
        s.remove_host_link(host_name);
        Ok(())
    }
    async fn renumber(
        &self,
        ifname: &str,
        remove: &[IpNet],
        add: &[IpNet],
        routes: &[RouteSpec],
    ) -> Result<()> {
        let ns = self.open_netns()?;
        let mut s = self.k.state();
        s.record("renumber", format!("{ns} {ifname} {remove:?} -> {add:?}"))?;
        let Some(iface) = s.containers.get_mut(&ns).and_then(|m| m.get_mut(ifname)) else {
            return Err(DataplaneError::NotFound(format!(
                "interface {ifname} in the container's namespace"
            )));
        };
        // As the real one: new addresses and routes first, then the old addresses.
        for a in add {
            if !iface.addresses.contains(a) {
                iface.addresses.push(*a);
            }
        }
        for r in routes {
            iface.routes.retain(|have| have.dst != r.dst);
            iface.routes.push(RouteInfo {
                dst: r.dst,
                gateway: r.gateway,
                oif: Some(iface.index),
            });
        }
        iface
            .addresses
            .retain(|a| !remove.contains(a) || add.contains(a));
        Ok(())
    }
    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32> {
        let mut s = self.k.state();
        s.record("ensure_vxlan", format!("{} vni {}", spec.name, spec.vni))?;
        Ok(s.add_link(&spec.name))
    }
    async fn read_fabric(&self, vxlan_devs: &[String]) -> Result<FabricState> {
        let mut s = self.k.state();
        s.record("read_fabric", format!("{vxlan_devs:?}"))?;
        // As the real one: every fabric route, entries only of the named devices.
        let mut have = s.fabric.clone();
        have.fdb.retain(|e| vxlan_devs.contains(&e.dev));
        have.neigh.retain(|e| vxlan_devs.contains(&e.dev));
        Ok(have)
    }
    async fn apply_fabric(&self, diff: &FabricDiff) -> Result<Vec<String>> {
        let mut s = self.k.state();
        s.record(
            "apply_fabric",
            format!(
                "+{} -{} routes, +{} -{} fdb, +{} -{} neigh",
                diff.add_routes.len(),
                diff.del_routes.len(),
                diff.add_fdb.len(),
                diff.del_fdb.len(),
                diff.add_neigh.len(),
                diff.del_neigh.len()
            ),
        )?;
        s.fabric.apply(diff);
        Ok(Vec::new())
    }
}

impl FakeLinks {
    fn open_netns(&self) -> Result<String> {
        self.netns
            .clone()
            .ok_or_else(|| DataplaneError::NotFound("no container namespace is open".into()))
    }
}

/// An nft executor that records its batches and applies nothing; tables read as missing.
#[derive(Debug, Clone, Default)]
pub struct RecordingNft(Arc<Mutex<Vec<String>>>);

impl RecordingNft {
    /// The batches applied so far.
    pub fn batches(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl NftExecutor for RecordingNft {
    fn apply(&self, batch: &str) -> std::result::Result<(), NftError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(batch.to_string());
        Ok(())
    }
    fn list_table(
        &self,
        _family: &str,
        _table: &str,
    ) -> std::result::Result<Option<serde_json::Value>, NftError> {
        Ok(None)
    }
    fn list_counters(
        &self,
        _family: &str,
        _table: &str,
    ) -> std::result::Result<Option<Vec<crate::nft::NamedCounter>>, NftError> {
        Ok(None)
    }
    fn table_exists(&self, _family: &str, _table: &str) -> std::result::Result<bool, NftError> {
        Ok(false)
    }
    fn chain_exists(
        &self,
        _family: &str,
        _table: &str,
        _chain: &str,
    ) -> std::result::Result<bool, NftError> {
        Ok(false)
    }
    fn name(&self) -> &'static str {
        "recording"
    }
}
