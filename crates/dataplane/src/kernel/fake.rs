//! Recording fakes of the kernel and of nftables, for unit tests that run without root: every
//! call is logged as one line, links are kept in a small model (so a retried attach finds its
//! interface and a detach removes it), and any call can be made to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use ferrynet_model::bandwidth::Shaping;
use ferrynet_model::routed::HostPort;
use ipnet::IpNet;

use super::{Kernel, Links};
use crate::bridge::BridgeSpec;
use crate::error::{DataplaneError, Result};
use crate::hostpair::{Pair, PairSpec};
use crate::nft::{NftError, NftExecutor};
use crate::veth::{Attached, IfaceState, VethSpec};

/// What the fake kernel holds.
#[derive(Debug, Default)]
pub struct State {
    /// Every call, in order (`op arg…`).
    pub calls: Vec<String>,
    /// Host links by name -> index.
    pub host_links: BTreeMap<String, u32>,
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

    fn add_host_link(&mut self, name: &str) -> u32 {
        if let Some(i) = self.host_links.get(name) {
            return *i;
        }
        self.next_index += 1;
        let i = self.next_index;
        self.host_links.insert(name.to_string(), i);
        i
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
        self.k.state().record("addresses", index.to_string())?;
        Ok(Vec::new())
    }
    async fn delete_link(&self, name: &str) -> Result<bool> {
        let mut s = self.k.state();
        s.record("delete_link", name.to_string())?;
        Ok(s.host_links.remove(name).is_some())
    }
    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<u32> {
        let mut s = self.k.state();
        s.record("ensure_bridge", spec.name.clone())?;
        Ok(s.add_host_link(&spec.name))
    }
    async fn ensure_gateways(
        &self,
        gateways: &[IpNet],
        _sysctls: &[(String, String)],
    ) -> Result<()> {
        self.k
            .state()
            .record("ensure_gateways", format!("{gateways:?}"))
    }
    async fn create_pair(&self, spec: &PairSpec) -> Result<Pair> {
        let mut s = self.k.state();
        s.record("create_pair", spec.host_name.clone())?;
        let host_index = s.add_host_link(&spec.host_name);
        let peer = s.add_host_link(&spec.peer_name);
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
        let host_index = s.add_host_link(&spec.host_name);
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
        s.host_links.remove(host_name);
        Ok(())
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
