//! One reconcile: from the cluster view to the kernel, by diff (never by flush).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferrynet_dataplane::kernel::Links;
use ferrynet_dataplane::vxlan::{VxlanSpec, VXLAN_PORT};
use ferrynet_model::edge::EdgeNetwork;
use ferrynet_model::fabric::{
    diff, vtep_mac, vxlan_dev_name, vxlan_local, vxlan_mtu, Backend, FabricInput, FabricState,
};
use ferrynet_model::fabric_guard;
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_model::service::{keys as service_keys, Producer};
use ferrynet_model::sleeve::{self as sleeve_model, Choice, SLEEVE_DEV};
use ferrynet_store::{Compare, Op, StoreError};
use ipnet::IpNet;

use super::status::{AgentStatus, HostStatus, NetworkStatus, PeerReport};
use super::underlay::Underlay;
use super::view::ClusterView;
use crate::control::edge::edge_networks;
use crate::control::Control;

/// What starting the sleeve takes, kept until a network needs it.
pub struct SleeveLaunch {
    /// This host's private key.
    pub key: [u8; 32],
    /// UDP port.
    pub port: u16,
    /// Queues (None: the CPUs, at most 4).
    pub queues: Option<usize>,
    /// Where the started sleeve is published (for the status reporter).
    pub slot: Arc<std::sync::OnceLock<Arc<ferrynet_sleeve::Sleeve>>>,
}

/// Carries out reconciles and remembers what it made.
pub struct Reconciler {
    /// The control plane (store, firewall, bridges).
    pub ctl: Arc<Control>,
    /// The host's namespace, held for the agent's life (the real kernel, or a fake in tests).
    links: Box<dyn Links>,
    underlay: Underlay,
    status: Arc<Mutex<AgentStatus>>,
    /// Multi-host networks served at the last reconcile, to clean up after removed ones.
    served: BTreeMap<String, Network>,
    /// This host's blocks as last saved to `<state-dir>/blocks.json`.
    saved_blocks: BTreeMap<String, Vec<IpNet>>,
    /// Former blocks were reclaimed (done once, at the first successful store read).
    pub reclaimed: bool,
    /// The networks the edge's isolation sets were last applied for.
    edge: Option<Vec<EdgeNetwork>>,
    /// The sleeve's datapath, once started.
    pub sleeve: Option<Arc<ferrynet_sleeve::Sleeve>>,
    /// How to start it (None: this host runs no sleeve).
    pub sleeve_launch: Option<SleeveLaunch>,
    /// What the VXLAN path probe found per peer.
    pub probes: super::sleeve::Probes,
    /// Where the probe learns whom to probe.
    pub probe_targets: Option<tokio::sync::watch::Sender<Vec<super::sleeve::ProbeTarget>>>,
    /// Set by the probe when a result changes a choice (a reconcile follows).
    pub probe_changed: Arc<std::sync::atomic::AtomicBool>,
    /// Where the BGP part of the view goes after each reconcile (None: no BGP task).
    pub bgp: Option<tokio::sync::watch::Sender<super::bgp::BgpView>>,
}

impl Reconciler {
    /// A reconciler for this host, acting through `links`.
    pub fn new(
        ctl: Arc<Control>,
        links: Box<dyn Links>,
        underlay: Underlay,
        status: Arc<Mutex<AgentStatus>>,
    ) -> Self {
        Reconciler {
            ctl,
            links,
            underlay,
            status,
            served: BTreeMap::new(),
            saved_blocks: BTreeMap::new(),
            reclaimed: false,
            edge: None,
            sleeve: None,
            sleeve_launch: None,
            probes: Default::default(),
            probe_targets: None,
            probe_changed: Default::default(),
            bgp: None,
        }
    }

    fn blocks_file(&self) -> std::path::PathBuf {
        self.ctl.paths().state_dir.join("blocks.json")
    }

    /// A host that comes back under its name takes its former blocks again where they are
    /// still free (they were released after its grace period), so its addresses stay stable.
    pub async fn reclaim_saved_blocks(&mut self) -> Result<(), StoreError> {
        let saved: BTreeMap<String, Vec<IpNet>> = std::fs::read(self.blocks_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (net, blocks) in &saved {
            for b in blocks {
                if self.ctl.reclaim_block(net, b).await? {
                    tracing::info!(network = %net, block = %b, "reclaimed a former block");
                }
            }
        }
        self.saved_blocks = saved;
        Ok(())
    }

    fn save_blocks(&mut self, view: &ClusterView) {
        let me = self.ctl.host();
        let now: BTreeMap<String, Vec<IpNet>> = view
            .fabric_networks()
            .map(|n| (n.name.clone(), view.blocks_of(&n.name, me)))
            .filter(|(_, b)| !b.is_empty())
            .collect();
        if now == self.saved_blocks {
            return;
        }
        let tmp = self.blocks_file().with_extension("json.tmp");
        let ok = serde_json::to_vec(&now).ok().map(|b| {
            std::fs::write(&tmp, b).and_then(|_| std::fs::rename(&tmp, self.blocks_file()))
        });
        match ok {
            Some(Ok(())) => self.saved_blocks = now,
            Some(Err(e)) => tracing::warn!(error = %e, "saving blocks.json"),
            None => {}
        }
    }

    /// Re-apply the edge skeleton when the bridged networks in view changed (created or removed
    /// on another host): isolation must know every network's pool, not only local bridges'.
    fn sync_edge_sets(&mut self, view: &ClusterView) -> crate::error::Result<()> {
        let nets = edge_networks(view.networks.values());
        // No network left: whoever removed the last one removes the table (leaving the host as
        // ferrynet found it); stale sets on the way cannot let anything more through.
        if nets.is_empty() {
            self.edge = None;
            return Ok(());
        }
        if self.edge.as_ref() == Some(&nets) {
            return Ok(());
        }
        self.ctl.apply_edge(&nets)?;
        self.edge = Some(nets);
        Ok(())
    }

    /// Bring the kernel in line with `view`; errors are recorded in the status, not returned,
    /// so one broken peer or network never stops the others from converging.
    pub async fn run(&mut self, view: &ClusterView) {
        let started = Instant::now();
        let me = self.ctl.host().to_string();
        self.publish_bgp_view(view);
        let mut round = Round::default();
        if let Err(e) = self.sync_edge_sets(view) {
            round
                .errors
                .push(format!("applying the edge's isolation sets: {e}"));
        }
        let peers = PeerFacts {
            probes: self.probes.lock().map(|p| p.clone()).unwrap_or_default(),
            with_sleeve: view
                .hosts
                .values()
                .chain(view.departed.values().map(|(h, _)| h))
                .filter(|h| h.sleeve.is_some())
                .map(|h| h.name.clone())
                .collect(),
        };
        for net in view.fabric_networks() {
            self.serve_network(view, net, &me, &peers, &mut round).await;
        }
        self.remove_unserved(view, &round.served, &mut round.errors)
            .await;
        self.served = std::mem::take(&mut round.served);
        self.save_blocks(view);
        self.sync_sleeve(view, &me, round.sleeve_needed, &mut round.errors);
        self.publish_probe_targets(std::mem::take(&mut round.probe_targets));
        round.changes = self
            .apply_fabric(&round.vxlan_devs, &round.want, &mut round.errors)
            .await;
        let guard_report = self.sync_fabric_guard(view, &me, &mut round).await;
        // A moved container whose renumbering failed is renumbered again until it holds what
        // its record says.
        round.errors.extend(self.ctl.converge_moves().await);
        for e in &round.errors {
            tracing::warn!(error = %e, "reconcile");
        }
        self.report(view, started, round, guard_report);
    }

    /// BGP's sessions follow the hosts (its announcements follow the discovery feed).
    fn publish_bgp_view(&self, view: &ClusterView) {
        if let Some(tx) = &self.bgp {
            let bv = super::bgp::view_of(view);
            tx.send_if_modified(|old| {
                let changed = *old != bv;
                if changed {
                    *old = bv;
                }
                changed
            });
        }
    }

    /// One multi-host network: this host's blocks and bridge, its VXLAN device, a backend per
    /// peer, and the fabric state it wants.
    async fn serve_network(
        &mut self,
        view: &ClusterView,
        net: &Network,
        me: &str,
        facts: &PeerFacts,
        round: &mut Round,
    ) {
        let Some(spec) = net.fabric else { return };
        let mine = view.blocks_of(&net.name, me);
        self.ensure_local(view, net, me, &mine, &mut round.errors)
            .await;
        let vxlan_dev = vxlan_dev_name(&net.name);
        // An encrypted network sends nothing over VXLAN; a sleeve one neither.
        let uses_vxlan = matches!(spec.backend, Backend::Vxlan | Backend::Auto) && !spec.encrypt;
        if uses_vxlan {
            match self.ensure_vxlan(net, spec.vni, me).await {
                Ok(()) => round.vxlan_devs.push(vxlan_dev.clone()),
                Err(e) => round.errors.push(e),
            }
        }
        let peers = view.peers(&net.name, me);
        let choices = self.choose(&spec, &peers, facts);
        if spec.backend == Backend::Auto && uses_vxlan {
            round
                .probe_targets
                .extend(probe_targets(&peers, &choices, &vxlan_dev));
        }
        round.sleeve_needed |= choices.values().any(|c| c.backend == Backend::Sleeve);
        let (state, peer_status) = sleeve_model::desired(
            &FabricInput {
                me,
                my_underlay: &self.underlay.addrs,
                underlay_dev: &self.underlay.dev,
                vxlan_dev: &vxlan_dev,
                backend: spec.backend,
                peers: &peers,
                my_blocks: &mine,
            },
            SLEEVE_DEV,
            &choices,
        );
        round.want.merge(state);
        round.networks.push(NetworkStatus {
            name: net.name.clone(),
            backend: spec.backend.to_string(),
            vni: spec.vni,
            blocks: mine,
            peers: peer_reports(peer_status, &peers, &choices),
        });
        round.served.insert(net.name.clone(), net.clone());
    }

    /// This host's first blocks (claimed ahead of its first container, so peers route to it
    /// before; the claim comes back as a watch event and a new reconcile) and its bridge.
    async fn ensure_local(
        &self,
        view: &ClusterView,
        net: &Network,
        me: &str,
        mine: &[IpNet],
        errors: &mut Vec<String>,
    ) {
        let missing = net
            .subnets
            .iter()
            .map(|s| s.cidr.addr().is_ipv6())
            .any(|v6| !mine.iter().any(|b| b.addr().is_ipv6() == v6));
        if missing {
            if let Err(e) = self.ctl.ensure_blocks(net).await {
                errors.push(format!("network {}: claiming blocks: {e}", net.name));
            }
        }
        let hv = view.host_view(net, me);
        if !hv.subnets.is_empty() {
            if let Err(e) = self.ctl.ensure_bridge(&*self.links, &hv).await {
                errors.push(format!("network {}: bridge: {e}", net.name));
            }
        }
    }

    /// The network's VXLAN device on the underlay.
    async fn ensure_vxlan(&self, net: &Network, vni: u32, me: &str) -> Result<(), String> {
        let vxlan_dev = vxlan_dev_name(&net.name);
        let Some(local) = vxlan_local(&self.underlay.addrs) else {
            return Err(format!(
                "network {}: the underlay has no address to tunnel from",
                net.name
            ));
        };
        let vx = VxlanSpec {
            name: vxlan_dev.clone(),
            vni,
            local,
            underlay_index: Some(self.underlay.index),
            port: VXLAN_PORT,
            mtu: vxlan_mtu(self.underlay.mtu, local.is_ipv6()),
            mac: vtep_mac(me, &net.name),
        };
        self.links
            .ensure_vxlan(&vx)
            .await
            .map(|_| ())
            .map_err(|e| format!("network {}: vxlan device {vxlan_dev}: {e}", net.name))
    }

    /// The backend towards each peer (`model::sleeve::choose`).
    fn choose(
        &self,
        spec: &ferrynet_model::network::FabricSpec,
        peers: &[ferrynet_model::fabric::Peer],
        facts: &PeerFacts,
    ) -> BTreeMap<String, Choice> {
        peers
            .iter()
            .map(|p| {
                let probe = facts.probes.get(&p.host).copied().unwrap_or_default();
                let has_key = facts.with_sleeve.contains(&p.host);
                let c = sleeve_model::choose(
                    spec.backend,
                    spec.encrypt,
                    &self.underlay.addrs,
                    p,
                    has_key,
                    probe,
                );
                (p.host.clone(), c)
            })
            .collect()
    }

    /// Networks removed from the store: their tunnel and (on hosts that did not remove them
    /// themselves) their bridge go too.
    async fn remove_unserved(
        &self,
        view: &ClusterView,
        served: &BTreeMap<String, Network>,
        errors: &mut Vec<String>,
    ) {
        for (name, old) in &self.served {
            if served.contains_key(name) {
                continue;
            }
            if let Err(e) = self.links.delete_link(&vxlan_dev_name(name)).await {
                errors.push(format!("network {name}: removing its vxlan device: {e}"));
            }
            if !view.networks.contains_key(name) {
                if let Err(e) = self.ctl.remove_bridge(old).await {
                    errors.push(format!("network {name}: removing its bridge: {e}"));
                }
            }
        }
    }

    /// Tell the VXLAN path probe whom to probe (one target per host).
    fn publish_probe_targets(&self, mut targets: Vec<super::sleeve::ProbeTarget>) {
        if let Some(tx) = &self.probe_targets {
            targets.sort_by(|a, b| a.host.cmp(&b.host));
            targets.dedup_by(|a, b| a.host == b.host);
            tx.send_if_modified(|t| {
                let changed = *t != targets;
                *t = targets;
                changed
            });
        }
    }

    /// Read the kernel's fabric state, diff it with `want`, apply the difference; how many
    /// changes were made.
    async fn apply_fabric(
        &self,
        vxlan_devs: &[String],
        want: &FabricState,
        errors: &mut Vec<String>,
    ) -> u64 {
        let have = match self.links.read_fabric(vxlan_devs).await {
            Ok(have) => have,
            Err(e) => {
                errors.push(format!("reading the kernel's fabric state: {e}"));
                return 0;
            }
        };
        let d = diff(&have, want);
        if d.is_empty() {
            return 0;
        }
        tracing::info!(
            add_routes = d.add_routes.len(),
            del_routes = d.del_routes.len(),
            add_fdb = d.add_fdb.len(),
            del_fdb = d.del_fdb.len(),
            add_neigh = d.add_neigh.len(),
            del_neigh = d.del_neigh.len(),
            "reconciling the fabric"
        );
        match self.links.apply_fabric(&d).await {
            Ok(failed) => errors.extend(failed),
            Err(e) => errors.push(format!("applying the fabric: {e}")),
        }
        crate::failpoint::hit("agent-fabric-applied");
        (d.add_routes.len()
            + d.del_routes.len()
            + d.add_fdb.len()
            + d.del_fdb.len()
            + d.add_neigh.len()
            + d.del_neigh.len()) as u64
    }

    /// Only registered hosts may send to the VXLAN port (while this host has tunnels). None:
    /// the sync failed, the last report stays.
    async fn sync_fabric_guard(
        &self,
        view: &ClusterView,
        me: &str,
        round: &mut Round,
    ) -> Option<GuardReport> {
        let guard = (!round.vxlan_devs.is_empty()).then(|| {
            let registered = view
                .hosts
                .values()
                .chain(view.departed.values().map(|(h, _)| h));
            fabric_guard::desired(VXLAN_PORT, me, registered)
        });
        match super::fabric_guard::sync(&self.ctl.nft_handle(), guard).await {
            Ok(s) => {
                round.changes += s.applied;
                Some(s.report.map(|r| (r, s.rebuilt)))
            }
            Err(e) => {
                round.errors.push(e);
                None
            }
        }
    }

    /// The round's outcome into the status and the metrics.
    fn report(
        &self,
        view: &ClusterView,
        started: Instant,
        round: Round,
        guard_report: Option<GuardReport>,
    ) {
        let hosts = view
            .hosts
            .values()
            .map(|h| HostStatus {
                name: h.name.clone(),
                underlay: h.underlay.clone(),
                live: true,
            })
            .chain(view.departed.values().map(|(h, _)| HostStatus {
                name: h.name.clone(),
                underlay: h.underlay.clone(),
                live: false,
            }))
            .collect();
        if let Ok(mut s) = self.status.lock() {
            s.last_reconcile_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            s.last_reconcile_took_ms = started.elapsed().as_secs_f64() * 1000.0;
            super::metrics::instruments().reconciled(started.elapsed(), round.errors.len());
            s.reconciles += 1;
            s.changes += round.changes;
            s.errors = round.errors;
            s.hosts = hosts;
            s.networks = round.networks;
            if let Some(report) = guard_report {
                let rebuilds = s.vxlan_guard.as_ref().map_or(0, |g| g.rebuilds);
                s.vxlan_guard = report.map(|(mut r, rebuilt)| {
                    r.rebuilds = rebuilds + u64::from(rebuilt);
                    r
                });
            }
        }
    }

    /// Give the sleeve its peers: every other host with a sleeve key, allowed to send from its
    /// blocks in every multi-host network (a peer may choose the sleeve towards this host
    /// where this host chose otherwise).
    fn sync_sleeve(
        &mut self,
        view: &ClusterView,
        me: &str,
        needed: bool,
        errors: &mut Vec<String>,
    ) {
        let usable = view.fabric_networks().any(|n| {
            n.fabric
                .is_some_and(|f| f.encrypt || matches!(f.backend, Backend::Sleeve | Backend::Auto))
        });
        self.start_sleeve(usable, errors);
        let Some(sl) = &self.sleeve else {
            if needed {
                errors.push(
                    "peers are routed into the sleeve, which does not run on this host (see the agent's log; --sleeve-port 0 turns it off)"
                        .into(),
                );
            }
            return;
        };
        let mut blocks_of: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        for (net, blocks) in &view.blocks {
            if view.networks.get(net).is_none_or(|n| n.fabric.is_none()) {
                continue;
            }
            for (b, h) in blocks {
                if view.block_fits(net, b) {
                    blocks_of.entry(h.clone()).or_default().push(*b);
                }
            }
        }
        let hosts = view
            .hosts
            .values()
            .chain(view.departed.values().map(|(h, _)| h));
        let (peers, errs) = sleeve_model::peers(me, hosts, &blocks_of);
        errors.extend(errs.into_iter().map(|e| format!("sleeve: {e}")));
        sl.set_peers(&peers);
    }

    /// Start the sleeve the first time a network can use it (sleeve, encrypted or `auto`: a
    /// peer may choose the sleeve towards this host).
    fn start_sleeve(&mut self, usable: bool, errors: &mut Vec<String>) {
        let (true, None, Some(l)) = (usable, &self.sleeve, &self.sleeve_launch) else {
            return;
        };
        match super::sleeve::start(l.key, l.port, l.queues, self.underlay.mtu) {
            Ok(s) => {
                let s = Arc::new(s);
                let _ = l.slot.set(s.clone());
                self.sleeve = Some(s);
            }
            Err(e) => errors.push(format!("starting the sleeve: {e:#}")),
        }
    }

    /// Release what departed hosts held once their grace period is over: their service
    /// producers, the records and addresses of their endpoints, and their blocks. Guarded by
    /// "the host is still absent", so a host that came back in the meantime keeps everything.
    /// A host with many endpoints is released in several transactions (`release_batches`, each
    /// within the store's limit and each guarded); its blocks go last, because they are what
    /// makes a restarted agent see an unknown owner (`ClusterView::unknown_owners`): a release
    /// cut short by a crash keeps them, and the next agent resumes it (deletes are idempotent).
    pub async fn release_departed(
        &self,
        view: &ClusterView,
        hosts: &[String],
    ) -> Result<(), StoreError> {
        let store = &self.ctl.store_handle();
        let released_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for h in hosts {
            // Its service producers (its agent no longer checks them).
            let (producers, _) = store.range(&service_keys::producers()).await?;
            let mut groups: Vec<Vec<Op>> = producers
                .iter()
                .filter(|kv| {
                    serde_json::from_slice::<Producer>(&kv.value)
                        .is_ok_and(|p| p.host.as_deref() == Some(h.as_str()))
                })
                .map(|kv| vec![Op::delete(kv.key.clone())])
                .collect();
            let producer_count = groups.len();
            let mut block_groups = Vec::new();
            for net in view.networks.values().filter(|n| n.fabric.is_some()) {
                let (eps, _) = store.range(&keys::endpoints(&net.name)).await?;
                for kv in &eps {
                    let Ok(ep) = serde_json::from_slice::<Endpoint>(&kv.value) else {
                        continue;
                    };
                    if ep.host.as_deref() == Some(h.as_str()) {
                        // An endpoint's record and its addresses go together.
                        let mut group = vec![Op::delete(kv.key.clone())];
                        group.extend(
                            ep.ips
                                .iter()
                                .map(|ip| Op::delete(keys::ipam(&net.name, ip.addr()))),
                        );
                        groups.push(group);
                    }
                }
                // Quarantined, so others take it last and the host takes it back when it
                // returns (`model::blocks::choose_block`).
                let record = ferrynet_model::blocks::Quarantine {
                    host: h.clone(),
                    released_at,
                }
                .encode();
                block_groups.extend(view.blocks_of(&net.name, h).iter().map(|b| {
                    vec![
                        Op::delete(keys::block(&net.name, b)),
                        Op::put(keys::orphan_block(&net.name, b), record.clone()),
                    ]
                }));
            }
            let endpoint_count = groups.len() - producer_count;
            let block_count = block_groups.len();
            groups.extend(block_groups);
            let n = self.release_batches(h, groups).await?;
            if n > 0 {
                tracing::info!(host = %h, producers = producer_count, endpoints = endpoint_count, blocks = block_count, keys = n, "released a departed host");
            }
        }
        Ok(())
    }

    /// Commit `groups` of deletes in as few transactions as the store's limit allows, each
    /// guarded by "host `h` is still absent"; returns how many keys were deleted. Stops at the
    /// first guard that fails (the host is back).
    async fn release_batches(&self, h: &str, groups: Vec<Vec<Op>>) -> Result<usize, StoreError> {
        let store = self.ctl.store_handle();
        let mut deleted = 0;
        for batch in ferrynet_model::batch::pack(groups, ferrynet_store::MAX_TXN_OPS) {
            let n = batch.len();
            let res = store
                .txn(vec![Compare::Missing(keys::host(h))], batch)
                .await?;
            if !res.succeeded {
                break;
            }
            deleted += n;
            crate::failpoint::hit("agent-release-batched");
        }
        Ok(deleted)
    }
}

/// What one reconcile gathers on its way.
#[derive(Default)]
struct Round {
    errors: Vec<String>,
    want: FabricState,
    vxlan_devs: Vec<String>,
    networks: Vec<NetworkStatus>,
    served: BTreeMap<String, Network>,
    probe_targets: Vec<super::sleeve::ProbeTarget>,
    sleeve_needed: bool,
    changes: u64,
}

/// What the backend choice knows of the peers beside the view: probe results and sleeve keys.
struct PeerFacts {
    probes: BTreeMap<String, sleeve_model::Probe>,
    with_sleeve: std::collections::BTreeSet<String>,
}

/// The VXLAN guard's report and whether its table was rebuilt (None: no guard).
type GuardReport = Option<(super::status::VxlanGuardStatus, bool)>;

/// The peers an `auto` network probes: those not routed on-link.
fn probe_targets(
    peers: &[ferrynet_model::fabric::Peer],
    choices: &BTreeMap<String, Choice>,
    vxlan_dev: &str,
) -> Vec<super::sleeve::ProbeTarget> {
    peers
        .iter()
        .filter(|p| choices.get(&p.host).map(|c| c.backend) != Some(Backend::Route))
        .filter_map(|p| {
            Some(super::sleeve::ProbeTarget {
                host: p.host.clone(),
                dst: sleeve_model::probe_target(p)?,
                dev: vxlan_dev.to_string(),
            })
        })
        .collect()
}

/// Each peer's status line: its blocks, backend, why, and errors.
fn peer_reports(
    status: Vec<ferrynet_model::fabric::PeerStatus>,
    peers: &[ferrynet_model::fabric::Peer],
    choices: &BTreeMap<String, Choice>,
) -> Vec<PeerReport> {
    status
        .into_iter()
        .map(|p| PeerReport {
            blocks: peers
                .iter()
                .find(|q| q.host == p.host)
                .map(|q| q.blocks.clone())
                .unwrap_or_default(),
            reason: choices
                .get(&p.host)
                .map(|c| c.reason.clone())
                .unwrap_or_default(),
            host: p.host,
            backend: p.backend.map(|b| b.to_string()),
            errors: p.errors,
        })
        .collect()
}

#[cfg(test)]
mod tests;
