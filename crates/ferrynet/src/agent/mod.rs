//! `ferrynet agent`: the per-host daemon of a multi-host cluster.
//!
//! It registers the host under a lease, claims this host's first blocks of every multi-host
//! network, and keeps the kernel in line with the store: routes to the other hosts' blocks,
//! VXLAN devices with their FDB and neighbour entries, bridge addresses. It reads the kernel
//! and diffs, never flushes, so restarting it drops no traffic.

pub mod api;
pub mod bgp;
pub mod conntrack;
pub mod discovery;
pub mod dns;
pub mod fabric_guard;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod policy;
pub mod reassert;
pub mod reconcile;
pub mod register;
pub mod sleeve;
pub mod status;
pub mod underlay;
pub mod view;
pub mod web;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferrynet_dataplane::netlink::Netlink;
use ferrynet_model::host::HostRecord;
use ferrynet_model::network::keys;
use ferrynet_store::{Revision, StoreError};
use futures::StreamExt;

use crate::control::host::{LocalConfig, LocalDns};
use crate::control::{Control, Paths};
use status::AgentStatus;
use view::ClusterView;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Host name (default: host.json, else the system's).
    pub host: Option<String>,
    /// Store URL (default: FERRYNET_STORE, host.json, else the embedded file).
    pub store: Option<String>,
    /// Underlay interface (default: the IPv4 default route's).
    pub underlay_dev: Option<String>,
    /// TTL of the host's registration lease.
    pub lease_ttl: Duration,
    /// How long a vanished host keeps its routes and blocks before they are released.
    pub grace: Duration,
    /// Full re-read of the kernel and store, to repair drift nobody told us about.
    pub resync: Duration,
    /// Serve Docker's network and IPAM driver on this unix socket too.
    pub docker_socket: Option<std::path::PathBuf>,
    /// The Docker driver's scope setting.
    pub docker_scope: crate::cnm::scope::ScopeSetting,
    /// Serve DNS on the gateways (None: no DNS server, containers keep the host's resolver).
    pub dns: Option<dns::DnsOptions>,
    /// The sleeve's UDP port (0: no sleeve).
    pub sleeve_port: u16,
    /// Sleeve queues (None: the CPUs, at most 4).
    pub sleeve_queues: Option<usize>,
    /// Addresses of the HTTP listener (metrics, health, topology page); empty: none.
    pub http: Vec<std::net::SocketAddr>,
}

/// Give back to the system the heap glibc kept after a large transient (the discovery
/// snapshot, a policy sync over 100,000 endpoints): freed memory otherwise stays in the
/// process, in whichever thread's arena held it, and the agent's RSS would be its peak.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Run the agent until SIGINT/SIGTERM.
pub async fn run(paths: Paths, opts: AgentOptions) -> anyhow::Result<()> {
    // As a managed Docker plugin the agent gets /proc/sys read-only, but sets forwarding and
    // bridge sysctls; the remount affects only its own mount namespace.
    match ferrynet_dataplane::sysctl::ensure_writable() {
        Ok(true) => tracing::info!("remounted the read-only /proc/sys read-write"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "/proc/sys is read-only; setting sysctls will fail"),
    }
    let ctl = Arc::new(
        Control::open_with(paths.clone(), opts.store.as_deref(), opts.host.as_deref()).await?,
    );
    // Bridges of networks removed while no agent ran would shadow newer ones on their subnets.
    if let Err(e) = ctl.remove_stale_bridges().await {
        tracing::warn!(error = %e, "could not remove stale bridges");
    }
    let store_url = opts
        .store
        .clone()
        .or_else(|| {
            std::env::var("FERRYNET_STORE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or(LocalConfig::load(&paths.state_dir)?.store);
    // The CNI plugin and CLI on this host find the same identity and store here.
    LocalConfig {
        host: Some(ctl.host().to_string()),
        store: store_url.clone(),
        dns: opts.dns.as_ref().map(|d| LocalDns {
            domain: d.domain.clone(),
        }),
    }
    .save(&paths.state_dir)?;

    let nl = Netlink::current().context("opening netlink")?;
    let underlay = underlay::find(&nl, opts.underlay_dev.as_deref()).await?;
    // The sleeve's key is made now and its public half registered; the datapath starts when
    // the first network that can use it appears (`reconcile`), so a host without multi-host
    // networks gets no TUN device and no open port.
    let sleeve_key = match opts.sleeve_port {
        0 => None,
        _ => match sleeve::load_or_create_key(&paths.state_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "no sleeve key; this host runs without the sleeve");
                None
            }
        },
    };
    let mut capabilities = vec!["route".to_string(), "vxlan".to_string(), "bgp".to_string()];
    if sleeve_key.is_some() {
        capabilities.push("sleeve".into());
    }
    let record = HostRecord {
        name: ctl.host().to_string(),
        underlay: underlay.addrs.clone(),
        underlay_mtu: underlay.mtu,
        capabilities,
        sleeve: sleeve_key.map(|k| ferrynet_model::sleeve::SleeveRecord {
            public_key: ferrynet_model::sleeve::encode_key(&ferrynet_sleeve::public_of(k)),
            port: opts.sleeve_port,
        }),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    tracing::info!(host = %ctl.host(), underlay = %underlay.dev, addrs = ?underlay.addrs, store = store_url.as_deref().map(ferrynet_store::config::redact_url).unwrap_or_else(|| "embedded".into()), "agent starting");

    let status = Arc::new(Mutex::new(AgentStatus {
        host: ctl.host().to_string(),
        store: store_url
            .as_deref()
            .map(ferrynet_store::config::redact_url)
            .unwrap_or_else(|| paths.store_file().display().to_string()),
        underlay_dev: underlay.dev.clone(),
        underlay: underlay.addrs.clone(),
        underlay_mtu: underlay.mtu,
        ..Default::default()
    }));
    // Bound before anything runs: an address that cannot be bound stops the agent at once.
    let http_listeners = web::bind(&opts.http).await?;
    ferrynet_dataplane::nft::set_batch_observer(|took, ok| {
        metrics::instruments().nft_batch(took, ok)
    });
    let web_state = web::Web::new(ctl.clone(), status.clone());
    let mut web_tasks = Vec::new();
    for l in http_listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "serving metrics, health and the topology page over HTTP");
        }
        web_tasks.push(tokio::spawn(web::serve(l, web_state.clone())));
    }
    let sock = paths.agent_socket();
    let listener = api::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let api_task = tokio::spawn(api::serve(listener, status.clone()));
    let docker_task = match &opts.docker_socket {
        Some(path) => {
            let listener = crate::cnm::bind_socket(path)?;
            tracing::info!(socket = %path.display(), "serving the Docker network and IPAM driver");
            Some(tokio::spawn(crate::cnm::serve(
                ctl.clone(),
                listener,
                opts.docker_scope,
                std::future::pending::<()>(),
            )))
        }
        None => None,
    };
    // Service discovery's feed; its consumers (DNS, load balancer, health checks) each hold a
    // receiver.
    let (disc_tx, disc_rx) = discovery::channel();
    let disc_task = tokio::spawn(discovery::follow(ctl.store_handle(), disc_tx));
    web_tasks.push(tokio::spawn(web::follow(
        web_state.clone(),
        disc_rx.clone(),
    )));
    // The host's current lease, for keys that must vanish with the host (health records).
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(None);
    // Sockets are capped (DNS forwards, TCP), but the usual soft 1024 is below the caps' sum.
    dns::raise_nofile();
    // Its own thread: it stops when the discovery feed (disc_task) is gone.
    if let Some(d) = opts.dns.clone() {
        dns::spawn(ctl.host().to_string(), d, disc_rx.clone(), status.clone())
            .context("starting the DNS server")?;
    }
    let health_task = tokio::spawn(health::run(
        ctl.host().to_string(),
        ctl.store_handle(),
        disc_rx.clone(),
        lease_rx.clone(),
        status.clone(),
    ));
    let lb_task = tokio::spawn(lb::run(
        ctl.nft_handle(),
        disc_rx.clone(),
        ctl.host().to_string(),
        status.clone(),
    ));
    let policy_task = tokio::spawn(policy::run(
        disc_rx.clone(),
        ctl.nft_handle(),
        ctl.host().to_string(),
        status.clone(),
    ));
    let rejected = (status.clone(), disc_rx.clone());
    let reassert_task = tokio::spawn(reassert::run(ctl.clone(), lease_rx.clone(), status.clone()));
    let disc_bgp = disc_rx.clone();
    let _discovery = (disc_rx, lease_rx);
    let reg_task = tokio::spawn(register::keep_registered(
        ctl.store_handle(),
        record,
        opts.lease_ttl,
        lease_tx,
    ));

    let probes = sleeve::Probes::default();
    let probe_changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (probe_tx, probe_rx) = tokio::sync::watch::channel(Vec::new());
    let probe_task = tokio::spawn(sleeve::probe_loop(
        probe_rx,
        probes.clone(),
        opts.sleeve_port,
        underlay.addrs.clone(),
        probe_changed.clone(),
    ));
    let sleeve_slot: Arc<std::sync::OnceLock<Arc<ferrynet_sleeve::Sleeve>>> = Default::default();
    let sleeve_report_task = {
        let (slot, status) = (sleeve_slot.clone(), status.clone());
        tokio::spawn(async move {
            loop {
                if let Some(r) = slot.get().map(|s| s.report()) {
                    if let Ok(mut st) = status.lock() {
                        st.sleeve = Some(r);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // BGP follows the reconciler's view (networks, hosts, blocks) and the `bgp/` records.
    let (bgp_tx, bgp_rx) = tokio::sync::watch::channel(bgp::BgpView::default());
    let bgp_task = tokio::spawn({
        let (store, me, ul, disc, st) = (
            ctl.store_handle(),
            ctl.host().to_string(),
            underlay.clone(),
            disc_bgp,
            status.clone(),
        );
        async move {
            if let Err(e) = bgp::run(store, me, ul, bgp_rx, disc, st).await {
                tracing::error!(error = %e, "BGP stopped");
            }
        }
    });
    let mut rec = reconcile::Reconciler::new(ctl.clone(), nl, underlay, status.clone());
    rec.bgp = Some(bgp_tx);
    rec.sleeve_launch = sleeve_key.map(|key| reconcile::SleeveLaunch {
        key,
        port: opts.sleeve_port,
        queues: opts.sleeve_queues,
        slot: sleeve_slot,
    });
    rec.probes = probes;
    rec.probe_targets = Some(probe_tx);
    rec.probe_changed = probe_changed;
    let mut view = ClusterView::default();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = follow(&mut rec, &mut view, &opts, &rejected) => {
                let e = match r { Ok(()) => break, Err(e) => e };
                tracing::warn!(error = %e, "store connection lost; the kernel keeps its last state; retrying");
                crate::notify::status(&format!("store unreachable, retrying: {e}"));
                if let Ok(mut s) = status.lock() {
                    s.store_ok = false;
                    s.store_error = Some(e.to_string());
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    crate::notify::stopping();
    // The lease is left to expire: a restarting agent finds its registration still there, and
    // peers keep routing to this host meanwhile.
    api_task.abort();
    for t in web_tasks {
        t.abort();
    }
    reg_task.abort();
    disc_task.abort();
    health_task.abort();
    probe_task.abort();
    sleeve_report_task.abort();
    reassert_task.abort();
    // The load balancer's table stays: restarts must not drop traffic.
    lb_task.abort();
    // So does the policy table.
    policy_task.abort();
    // BGP routes stay in the kernel too; peers hold ours for the restart time.
    bgp_task.abort();
    let _ = std::fs::remove_file(&sock);
    if let (Some(t), Some(path)) = (docker_task, &opts.docker_socket) {
        t.abort();
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Read the cluster, reconcile, then follow the store's changes until an error.
async fn follow(
    rec: &mut reconcile::Reconciler,
    view: &mut ClusterView,
    opts: &AgentOptions,
    rejected: &(Arc<Mutex<AgentStatus>>, discovery::ViewRx),
) -> Result<(), StoreError> {
    // Refused records of both views go to `ferrynet status`, refreshed after every event and tick.
    let publish_rejected = |view: &ClusterView| {
        let list = status::rejected_list([&view.rejected, &rejected.1.borrow().rejected]);
        if let Ok(mut s) = rejected.0.lock() {
            s.rejected = list;
        }
    };
    let store = rec.ctl.store_handle();
    let mut kvs = Vec::new();
    let mut streams = Vec::new();
    let mut revs: Vec<Revision> = Vec::new();
    for prefix in [keys::networks(), keys::hosts(), keys::all_blocks()] {
        let (mut part, rev) = store.range(&prefix).await?;
        kvs.append(&mut part);
        revs.push(rev);
        streams.push(store.watch(&prefix, rev).await?);
    }
    if !rec.reclaimed {
        rec.reclaim_saved_blocks().await?;
        rec.reclaimed = true;
    }
    view.reset(&kvs, Instant::now());
    rec.mark_store_ok();
    rec.run(view).await;
    // systemd (Type=notify) starts dependent units once the fabric is in the kernel; after a
    // store outage this says so again, which systemd takes as a status update.
    crate::notify::ready(&format!("following the store; {} hosts", view.hosts.len()));
    let mut events = futures::stream::select_all(streams);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            ev = events.next() => {
                let ev = match ev {
                    Some(ev) => ev?,
                    None => return Err(StoreError::Unavailable("watch ended".into())),
                };
                let now = Instant::now();
                view.apply(&ev, now);
                // Take whatever else is already queued, then reconcile once.
                while let Some(Some(more)) = futures::FutureExt::now_or_never(events.next()) {
                    view.apply(&more?, now);
                }
                rec.run(view).await;
                metrics::instruments().watch_lag(now.elapsed());
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let expired = view.expired(now, opts.grace);
                let probed = rec.probe_changed.swap(false, std::sync::atomic::Ordering::Relaxed);
                if !expired.is_empty() {
                    rec.release_departed(view, &expired).await?;
                    for h in &expired {
                        view.departed.remove(h);
                    }
                    rec.run(view).await;
                } else if probed || now.duration_since(last_full) >= opts.resync {
                    last_full = now;
                    rec.run(view).await;
                }
                for h in view.unknown_owners() {
                    view.departed.insert(h.clone(), (view::placeholder(&h), now));
                }
            }
        }
        publish_rejected(view);
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed by this call, not at the first
/// poll: a SIGTERM right after READY=1 must stop the agent cleanly, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
