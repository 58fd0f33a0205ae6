//! `ferrynet agent`: the per-host daemon of a multi-host cluster.
//!
//! It registers the host under a lease, claims this host's first blocks of every multi-host
//! network, and keeps the kernel in line with the store: routes to the other hosts' blocks,
//! VXLAN devices with their FDB and neighbour entries, bridge addresses. It reads the kernel
//! and diffs, never flushes, so restarting it drops no traffic.

pub mod api;
pub mod bgp;
pub mod conntrack;
pub mod dns;
pub mod fabric_guard;
pub mod follow;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod policy;
pub mod reassert;
pub mod reconcile;
pub mod register;
pub mod sleeve;
pub mod spare;
pub mod status;
pub mod underlay;
pub mod view;
pub mod web;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ferrynet_dataplane::netlink::Netlink;
use ferrynet_model::host::HostRecord;

use crate::control::host::{LocalConfig, LocalDns};
use crate::control::{Control, Paths};
use crate::feed;
use status::AgentStatus;

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

/// Run the agent until SIGINT/SIGTERM.
pub async fn run(paths: Paths, opts: AgentOptions) -> anyhow::Result<()> {
    let ctl = open_control(&paths, &opts).await?;
    let store_url = save_local_config(&paths, &opts, &ctl)?;
    let nl = Netlink::current().context("opening netlink")?;
    let underlay = underlay::find(&nl, opts.underlay_dev.as_deref()).await?;
    let sleeve_key = sleeve_key(&paths, opts.sleeve_port);
    let record = host_record(&ctl, &underlay, sleeve_key, opts.sleeve_port);
    tracing::info!(host = %ctl.host(), underlay = %underlay.dev, addrs = ?underlay.addrs, store = store_url.as_deref().map(ferrynet_store::config::redact_url).unwrap_or_else(|| "embedded".into()), "agent starting");
    let status = initial_status(&ctl, &paths, store_url.as_deref(), &underlay);
    let mut tasks = Tasks::default();
    let web_state = spawn_listeners(&mut tasks, &ctl, &paths, &opts, &status).await?;
    let feed = spawn_feed(&mut tasks, &ctl, &opts, &status)?;
    tasks.spawn(web::follow(web_state, feed.views.clone()));
    tasks.spawn(register::keep_registered(
        ctl.store_handle(),
        record,
        opts.lease_ttl,
        feed.lease_tx,
    ));
    let mut rec = reconciler(
        &mut tasks,
        &ctl,
        nl,
        underlay,
        sleeve_key,
        &opts,
        &status,
        &feed.views,
    );
    let timing = follow::Timing {
        grace: opts.grace,
        resync: opts.resync,
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = follow::follow(&mut rec, feed.fabric, timing, status.clone(), feed.views.clone()) => {
            tracing::error!("the cluster feed stopped");
        }
    }
    // The lease is left to expire: a restarting agent finds its registration still there, and
    // peers keep routing to this host meanwhile. The load balancer's and policy's tables and
    // BGP's routes stay in the kernel too: restarts must not drop traffic (peers hold our
    // routes for the restart time).
    crate::notify::stopping();
    tasks.stop();
    tracing::info!("agent stopped");
    Ok(())
}

/// The agent's tasks, and the sockets to remove when they stop.
#[derive(Default)]
struct Tasks {
    handles: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<std::path::PathBuf>,
}

impl Tasks {
    fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.handles.push(tokio::spawn(f));
    }

    fn stop(self) {
        for t in self.handles {
            t.abort();
        }
        for s in self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// `/proc/sys` writable, the control layer open, and stale bridges gone.
async fn open_control(paths: &Paths, opts: &AgentOptions) -> anyhow::Result<Arc<Control>> {
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
    ctl.keep_store_open();
    // Bridges of networks removed while no agent ran would shadow newer ones on their subnets.
    if let Err(e) = ctl.remove_stale_bridges().await {
        tracing::warn!(error = %e, "could not remove stale bridges");
    }
    Ok(ctl)
}

/// Write host.json (the CNI plugin and CLI on this host find the same identity and store
/// there); the store URL in use.
fn save_local_config(
    paths: &Paths,
    opts: &AgentOptions,
    ctl: &Control,
) -> anyhow::Result<Option<String>> {
    let store_url = opts
        .store
        .clone()
        .or_else(|| {
            std::env::var("FERRYNET_STORE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or(LocalConfig::load(&paths.state_dir)?.store);
    LocalConfig {
        host: Some(ctl.host().to_string()),
        store: store_url.clone(),
        dns: opts.dns.as_ref().map(|d| LocalDns {
            domain: d.domain.clone(),
        }),
    }
    .save(&paths.state_dir)?;
    Ok(store_url)
}

/// The sleeve's key, made now so its public half is registered; the datapath starts when the
/// first network that can use it appears (`reconcile`), so a host without multi-host networks
/// gets no TUN device and no open port.
fn sleeve_key(paths: &Paths, port: u16) -> Option<[u8; 32]> {
    if port == 0 {
        return None;
    }
    match sleeve::load_or_create_key(&paths.state_dir) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "no sleeve key; this host runs without the sleeve");
            None
        }
    }
}

/// This host's registration.
fn host_record(
    ctl: &Control,
    underlay: &underlay::Underlay,
    sleeve_key: Option<[u8; 32]>,
    sleeve_port: u16,
) -> HostRecord {
    let mut capabilities = vec!["route".to_string(), "vxlan".to_string(), "bgp".to_string()];
    if sleeve_key.is_some() {
        capabilities.push("sleeve".into());
    }
    HostRecord {
        name: ctl.host().to_string(),
        underlay: underlay.addrs.clone(),
        underlay_mtu: underlay.mtu,
        capabilities,
        sleeve: sleeve_key.map(|k| ferrynet_model::sleeve::SleeveRecord {
            public_key: ferrynet_model::sleeve::encode_key(&ferrynet_sleeve::public_of(k)),
            port: sleeve_port,
        }),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// What `ferrynet status` shows before the first reconcile.
fn initial_status(
    ctl: &Control,
    paths: &Paths,
    store_url: Option<&str>,
    underlay: &underlay::Underlay,
) -> Arc<Mutex<AgentStatus>> {
    Arc::new(Mutex::new(AgentStatus {
        host: ctl.host().to_string(),
        store: store_url
            .map(ferrynet_store::config::redact_url)
            .unwrap_or_else(|| paths.store_file().display().to_string()),
        underlay_dev: underlay.dev.clone(),
        underlay: underlay.addrs.clone(),
        underlay_mtu: underlay.mtu,
        ..Default::default()
    }))
}

/// The HTTP listener (metrics, health, topology), the status socket and Docker's driver
/// socket; each address is bound before anything runs, so one that cannot be bound stops the
/// agent at once.
async fn spawn_listeners(
    tasks: &mut Tasks,
    ctl: &Arc<Control>,
    paths: &Paths,
    opts: &AgentOptions,
    status: &Arc<Mutex<AgentStatus>>,
) -> anyhow::Result<Arc<web::Web>> {
    let http_listeners = web::bind(&opts.http).await?;
    ferrynet_dataplane::nft::set_batch_observer(|took, ok| {
        metrics::instruments().nft_batch(took, ok)
    });
    let web_state = web::Web::new(ctl.clone(), status.clone());
    for l in http_listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "serving metrics, health and the topology page over HTTP");
        }
        tasks.spawn(web::serve(l, web_state.clone()));
    }
    let sock = paths.agent_socket();
    let listener = api::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    tasks.spawn(api::serve(listener, status.clone()));
    tasks.sockets.push(sock);
    if let Some(path) = &opts.docker_socket {
        let listener = crate::cnm::bind_socket(path)?;
        tracing::info!(socket = %path.display(), "serving the Docker network and IPAM driver");
        let serve = crate::cnm::serve(
            ctl.clone(),
            listener,
            opts.docker_scope,
            std::future::pending::<()>(),
        );
        tasks.spawn(async move {
            let _ = serve.await;
        });
        tasks.sockets.push(path.clone());
    }
    Ok(web_state)
}

/// The cluster feed as the agent holds it.
struct AgentFeed {
    /// The discovery view.
    views: feed::ViewRx,
    /// The fabric's updates (the reconciler's).
    fabric: feed::FabricRx,
    /// Where the registration task publishes the host's lease.
    lease_tx: tokio::sync::watch::Sender<Option<ferrynet_store::LeaseId>>,
}

/// The cluster feed and its discovery consumers: DNS, health checks, load balancer, policy,
/// and the re-assertion after each new lease.
fn spawn_feed(
    tasks: &mut Tasks,
    ctl: &Arc<Control>,
    opts: &AgentOptions,
    status: &Arc<Mutex<AgentStatus>>,
) -> anyhow::Result<AgentFeed> {
    let (disc_tx, disc_rx) = feed::channel();
    let (subscribers, fabric) = feed::Subscribers::with_fabric(disc_tx);
    tasks.spawn(feed::follow(ctl.store_handle(), subscribers));
    // The host's current lease, for keys that must vanish with the host (health records).
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(None);
    // Sockets are capped (DNS forwards, TCP), but the usual soft 1024 is below the caps' sum.
    dns::raise_nofile();
    // Its own thread: it stops when the feed is gone.
    if let Some(d) = opts.dns.clone() {
        dns::spawn(ctl.host().to_string(), d, disc_rx.clone(), status.clone())
            .context("starting the DNS server")?;
    }
    let me = ctl.host().to_string();
    tasks.spawn(health::run(
        me.clone(),
        ctl.store_handle(),
        disc_rx.clone(),
        lease_rx.clone(),
        status.clone(),
    ));
    tasks.spawn(lb::run(
        ctl.nft_handle(),
        disc_rx.clone(),
        me.clone(),
        status.clone(),
    ));
    tasks.spawn(policy::run(
        disc_rx.clone(),
        ctl.nft_handle(),
        me,
        status.clone(),
    ));
    tasks.spawn(reassert::run(ctl.clone(), lease_rx, status.clone()));
    tasks.spawn(spare::run(ctl.clone(), disc_rx.clone()));
    Ok(AgentFeed {
        views: disc_rx,
        fabric,
        lease_tx,
    })
}

/// The reconciler with what it drives beside the kernel: the VXLAN path probe, the sleeve (and
/// its status reporter) and the BGP speaker, which follows the reconciler's view and the
/// `bgp/` records.
#[allow(clippy::too_many_arguments)]
fn reconciler(
    tasks: &mut Tasks,
    ctl: &Arc<Control>,
    nl: Netlink,
    underlay: underlay::Underlay,
    sleeve_key: Option<[u8; 32]>,
    opts: &AgentOptions,
    status: &Arc<Mutex<AgentStatus>>,
    views: &feed::ViewRx,
) -> reconcile::Reconciler {
    let probes = sleeve::Probes::default();
    let probe_changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (probe_tx, probe_rx) = tokio::sync::watch::channel(Vec::new());
    tasks.spawn(sleeve::probe_loop(
        probe_rx,
        probes.clone(),
        opts.sleeve_port,
        underlay.addrs.clone(),
        probe_changed.clone(),
    ));
    let sleeve_slot: Arc<std::sync::OnceLock<Arc<ferrynet_sleeve::Sleeve>>> = Default::default();
    tasks.spawn(report_sleeve(sleeve_slot.clone(), status.clone()));
    let (bgp_tx, bgp_rx) = tokio::sync::watch::channel(bgp::BgpView::default());
    let (store, me, ul, disc, st) = (
        ctl.store_handle(),
        ctl.host().to_string(),
        underlay.clone(),
        views.clone(),
        status.clone(),
    );
    tasks.spawn(async move {
        if let Err(e) = bgp::run(store, me, ul, bgp_rx, disc, st).await {
            tracing::error!(error = %e, "BGP stopped");
        }
    });
    let links = Box::new(ferrynet_dataplane::kernel::LinuxLinks::host(nl));
    let mut rec = reconcile::Reconciler::new(ctl.clone(), links, underlay, status.clone());
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
    rec
}

/// Copy the sleeve's report into the status twice a second, once it runs.
async fn report_sleeve(
    slot: Arc<std::sync::OnceLock<Arc<ferrynet_sleeve::Sleeve>>>,
    status: Arc<Mutex<AgentStatus>>,
) {
    loop {
        if let Some(r) = slot.get().map(|s| s.report()) {
            if let Ok(mut st) = status.lock() {
                st.sleeve = Some(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
