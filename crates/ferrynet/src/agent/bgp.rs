//! The `bgp` backend in the agent: runs the speaker (`ferrynet-bgp`) when the cluster has a
//! `bgp` network, feeds it the sessions, announcements and import rules that
//! `ferrynet_model::bgp` decides from the store, and keeps the kernel's BGP routes
//! (protocol 114, `ferrynet_dataplane::fabric::RTPROT_FERRYNET_BGP`) in line with its RIB by diff.
//!
//! Announcements follow the discovery feed (block claims and endpoint records), not the
//! reconciler: a block claimed by a CNI ADD is announced as soon as its watch event arrives,
//! without waiting for a reconcile that may be busy with kernel work.
//!
//! Graceful restart: routes stay in the kernel when the agent stops or dies. A starting agent
//! that finds them says so in its OPEN (restarting, forwarding kept), so peers keep its routes
//! meanwhile, and it removes none of them until every peer has sent End-of-RIB (or the
//! restart time has passed).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrynet_bgp::{Exports, PeerState, Policy, Settings, Speaker, BGP_PORT};
use ferrynet_dataplane::netlink::Netlink;
use ferrynet_model::bgp::keys;
use ferrynet_model::bgp::peers::{host_asn, plan, router_id};
use ferrynet_model::bgp::policy::{host_prefixes, HostPrefixes};
use ferrynet_model::bgp::rib::kernel_routes;
use ferrynet_model::fabric::{Backend, FabricRoute};
use ferrynet_model::host::HostRecord;
use ferrynet_store::Store;
use futures::StreamExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::status::AgentStatus;
use super::underlay::Underlay;
use super::view::ClusterView;
use crate::control::bgp::{parse_records, BgpRecords};
use crate::feed::ViewRx;

/// What the reconciler's view holds that BGP needs (whether to run, and the mesh's hosts),
/// published after every reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpView {
    /// The cluster has at least one `bgp` network.
    pub active: bool,
    /// Hosts, live and in their grace period.
    pub hosts: Vec<HostRecord>,
}

/// The BGP part of the cluster view.
pub fn view_of(view: &ClusterView) -> BgpView {
    BgpView {
        active: view
            .fabric_networks()
            .any(|n| n.fabric.is_some_and(|f| f.backend == Backend::Bgp)),
        hosts: view
            .hosts
            .values()
            .chain(view.departed.values().map(|(h, _)| h))
            .cloned()
            .collect(),
    }
}

/// `ferrynet status`'s BGP section (`ferrynet bgp status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpStatus {
    /// BGP identifier.
    pub router_id: String,
    /// This host's AS.
    pub asn: u32,
    /// Full mesh among ferrynet hosts.
    pub mesh: bool,
    /// The first sync after start is over (stale kernel routes may go).
    pub converged: bool,
    /// Prefixes announced.
    pub exported: Vec<IpNet>,
    /// Routes in the kernel (protocol 114).
    pub routes_installed: usize,
    /// Sessions.
    pub peers: Vec<PeerState>,
    /// Kernel route failures and refused records.
    pub errors: Vec<String>,
}

/// Follow `bgp/` in the store into `tx` (a fresh read after every change; there are few).
async fn follow_records(store: Arc<dyn Store>, tx: watch::Sender<Option<BgpRecords>>) {
    let mut backoff = crate::feed::Backoff::default();
    loop {
        let res: Result<(), ferrynet_store::StoreError> = async {
            let (kvs, rev) = store.range(&keys::all()).await?;
            tx.send_replace(Some(parse_records(&kvs)));
            let mut w = store.watch(&keys::all(), rev).await?;
            while let Some(ev) = w.next().await {
                ev?;
                let (kvs, _) = store.range(&keys::all()).await?;
                tx.send_replace(Some(parse_records(&kvs)));
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "following the BGP records");
        }
        backoff.wait().await;
    }
}

/// Everything the loop keeps between rounds.
struct Bgp {
    me: String,
    underlay: Underlay,
    speaker: Arc<Speaker>,
    exports: watch::Sender<Exports>,
    policy: watch::Sender<Policy>,
    nl: Netlink,
    /// The kernel's BGP routes as last read or changed.
    have: BTreeSet<FabricRoute>,
    deferral: Duration,
    errors: Vec<String>,
}

impl Bgp {
    /// Peers from the records and the view.
    fn configure(&mut self, rec: &BgpRecords, view: &BgpView) {
        let specs = plan(
            &self.me,
            &self.underlay.addrs,
            &rec.config,
            &rec.nodes,
            &view.hosts,
            &rec.peers,
        );
        self.speaker.set_peers(&specs);
        self.errors = rec
            .rejected
            .iter()
            .map(|(k, e)| format!("record {k} refused: {e}"))
            .collect();
    }

    /// Announcements and import rules from the discovery view; true when the announcements
    /// changed.
    fn announce(&mut self, px: &HostPrefixes) -> bool {
        let first = |v6: bool| {
            self.underlay
                .addrs
                .iter()
                .map(|a| a.addr())
                .find(|a| a.is_ipv6() == v6)
        };
        let ex = Exports {
            prefixes: px.exports(),
            next_hop4: match first(false) {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            },
            next_hop6: match first(true) {
                Some(IpAddr::V6(a)) => Some(a),
                _ => None,
            },
        };
        let changed = self.exports.send_if_modified(|e| replace(e, ex));
        let pol = Policy {
            pools: px.pools.clone(),
            own: px.own.clone(),
            lent: px.lent.clone(),
            underlay: self.underlay.addrs.clone(),
        };
        self.policy.send_if_modified(|p| replace(p, pol));
        changed
    }

    /// Bring the kernel's BGP routes to the RIB's best paths; before the first sync is over,
    /// only add (a restarted agent keeps forwarding on what it had).
    async fn sync_kernel(&mut self) -> Vec<String> {
        let want = kernel_routes(&self.speaker.rib(), &self.underlay.dev).routes;
        let converged = self.speaker.converged(self.deferral);
        let add: Vec<FabricRoute> = want.difference(&self.have).cloned().collect();
        let del: Vec<FabricRoute> = if converged {
            self.have.difference(&want).cloned().collect()
        } else {
            Vec::new()
        };
        if add.is_empty() && del.is_empty() {
            return Vec::new();
        }
        tracing::info!(add = add.len(), del = del.len(), "BGP routes");
        let failed = match self.nl.apply_bgp_routes(&del, &add).await {
            Ok(f) => f,
            Err(e) => vec![format!("applying BGP routes: {e}")],
        };
        for r in &del {
            self.have.remove(r);
        }
        self.have.extend(add);
        failed
    }
}

fn replace<T: PartialEq>(slot: &mut T, v: T) -> bool {
    if *slot == v {
        return false;
    }
    *slot = v;
    true
}

/// Run BGP for this host until the agent stops (the kernel routes stay).
pub async fn run(
    store: Arc<dyn Store>,
    me: String,
    underlay: Underlay,
    mut view: watch::Receiver<BgpView>,
    mut disc: ViewRx,
    status: Arc<Mutex<AgentStatus>>,
) -> anyhow::Result<()> {
    while !view.borrow_and_update().active {
        view.changed().await?;
    }
    let nl = Netlink::current()?;
    let have = nl.read_bgp_routes().await?;
    let (rec_tx, mut rec_rx) = watch::channel(None);
    tokio::spawn(follow_records(store, rec_tx));
    let rec = loop {
        if let Some(r) = rec_rx.borrow_and_update().clone() {
            break r;
        }
        rec_rx.changed().await?;
    };
    let settings = Settings {
        router_id: router_id(&me, &underlay.addrs),
        hold_time: rec.config.hold_time,
        keepalive: rec.config.keepalive,
        restart_time: rec.config.restart_time,
        restarted: !have.is_empty(),
        peer_port: BGP_PORT,
        connect_retry: Duration::from_secs(1),
    };
    tracing::info!(router_id = %settings.router_id, restarted = settings.restarted, kept = have.len(), "starting the BGP speaker");
    let (ex_tx, ex_rx) = watch::channel(Exports::default());
    let (pol_tx, pol_rx) = watch::channel(Policy::default());
    let listen = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), BGP_PORT);
    let speaker = Speaker::start(settings.clone(), ex_rx, pol_rx, Some(listen))?;
    let mut rib_rx = speaker.rib_changes();
    let mut b = Bgp {
        me,
        underlay,
        speaker,
        exports: ex_tx,
        policy: pol_tx,
        nl,
        have,
        deferral: Duration::from_secs(u64::from(settings.restart_time).min(60)),
        errors: Vec::new(),
    };
    let px = host_prefixes(&disc.borrow_and_update(), &b.me);
    b.announce(&px);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    let mut kernel_errors = Vec::new();
    loop {
        tokio::select! {
            r = rec_rx.changed() => r?,
            r = view.changed() => r?,
            r = disc.changed() => {
                r?;
                let started = std::time::Instant::now();
                let px = host_prefixes(&disc.borrow_and_update(), &b.me);
                if b.announce(&px) {
                    tracing::debug!(prefixes = b.exports.borrow().prefixes.len(), took_us = started.elapsed().as_micros() as u64, "announcements changed");
                }
            }
            r = rib_rx.changed() => {
                r?;
                kernel_errors = b.sync_kernel().await;
            }
            _ = tick.tick() => {
                ticks += 1;
                // Drift nobody told us about (a route deleted by hand) is repaired every 30 s.
                if ticks.is_multiple_of(30) {
                    if let Ok(k) = b.nl.read_bgp_routes().await {
                        b.have = k;
                    }
                }
                kernel_errors = b.sync_kernel().await;
            }
        }
        let rec = rec_rx.borrow().clone().unwrap_or_default();
        b.configure(&rec, &view.borrow());
        publish(&b, &rec, &settings, &kernel_errors, &status);
    }
}

fn publish(
    b: &Bgp,
    rec: &BgpRecords,
    settings: &Settings,
    kernel_errors: &[String],
    status: &Mutex<AgentStatus>,
) {
    let st = BgpStatus {
        router_id: settings.router_id.to_string(),
        asn: host_asn(&rec.config, rec.nodes.get(&b.me)),
        mesh: rec.config.mesh,
        converged: b.speaker.converged(b.deferral),
        exported: b.exports.borrow().prefixes.iter().copied().collect(),
        routes_installed: b.have.len(),
        peers: b.speaker.status(),
        errors: b.errors.iter().chain(kernel_errors).cloned().collect(),
    };
    if let Ok(mut s) = status.lock() {
        s.bgp = Some(st);
    }
}
