//! The agent's embedded DNS server: container names, aliases, services (VIPs, tasks, SRV) and
//! reverse names per network, answered on each of this host's gateway addresses from the
//! discovery view; other names forwarded to the upstream resolvers, only for the network's own
//! containers.

pub mod clients;
pub mod fast;
pub mod forward;
pub mod gateways;
pub mod ingress;
pub mod server;
pub mod wire;
pub mod zone;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrynet_model::discovery::DiscoveryView;
use tokio::sync::watch;

use super::status::{AgentStatus, DnsStatus, PodStatus};
use crate::feed::ViewRx;
use clients::Clients;
use server::{Ctx, Limits, Listener};
use zone::{Zone, ZoneBuilder};

/// How the DNS server runs.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Cluster domain, e.g. `ferrynet.internal`.
    pub domain: String,
    /// TTL of cluster answers, in seconds.
    pub ttl: u32,
    /// Upstream resolvers for other names (empty: SERVFAIL for them).
    pub upstreams: Vec<SocketAddr>,
    /// Port to listen on (53).
    pub port: u16,
}

/// How often binding a gateway that failed is retried.
const RETRY: Duration = Duration::from_secs(2);

/// Run [`serve`] on a thread of its own (with its own single-threaded runtime), so answers never
/// wait behind the agent's reconciles and health checks. It ends when the view channel closes.
pub fn spawn(
    host: String,
    opts: DnsOptions,
    views: ViewRx,
    status: Arc<Mutex<AgentStatus>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ferrynet-dns".into())
        .spawn(move || rt.block_on(serve(host, opts, views, status)))
}

/// Serve until the view channel closes: update the zone on every view change and keep one
/// listener per gateway of this host's networks, binding new ones and closing departed ones.
pub async fn serve(
    host: String,
    opts: DnsOptions,
    mut views: ViewRx,
    status: Arc<Mutex<AgentStatus>>,
) {
    let (zone_tx, zone_rx) = watch::channel(Arc::new(Zone::default()));
    let (clients_tx, clients_rx) = watch::channel(Arc::new(Clients::default()));
    let ctx = Ctx {
        zones: zone_rx,
        ttl: opts.ttl,
        upstreams: Arc::new(forward::Upstreams {
            addrs: opts.upstreams.clone(),
        }),
        clients: clients_rx,
        limits: Arc::new(Limits::default()),
    };
    tracing::info!(domain = %opts.domain, ttl = opts.ttl, upstreams = ?opts.upstreams, "dns: serving");
    let mut listeners: BTreeMap<IpAddr, (String, Listener)> = BTreeMap::new();
    let mut zone = ZoneBuilder::new(&opts.domain);
    loop {
        let view = views.borrow_and_update().clone();
        zone_tx.send_replace(Arc::new(zone.update(&view)));
        clients_tx.send_replace(Arc::new(Clients::build(&view, &host)));
        let want = gateways::gateways(&view, &host);
        listeners.retain(|ip, (net, _)| {
            let keep = want.get(ip) == Some(net);
            if !keep {
                tracing::info!(%ip, network = %net, "dns: closing listener");
            }
            keep
        });
        let mut errors = Vec::new();
        for (ip, net) in want {
            if listeners.contains_key(&ip) {
                continue;
            }
            match server::listen(ip, opts.port, net.clone(), ctx.clone()) {
                Ok(l) => {
                    tracing::info!(%ip, network = %net, "dns: listening");
                    listeners.insert(ip, (net, l));
                }
                Err(e) => {
                    tracing::warn!(%ip, network = %net, error = %e, "dns: cannot listen; retrying");
                    errors.push(format!("{ip}:{} ({net}): {e}", opts.port));
                }
            }
        }
        if let Ok(mut s) = status.lock() {
            s.dns = Some(DnsStatus {
                domain: opts.domain.clone(),
                upstreams: opts.upstreams.iter().map(|u| u.to_string()).collect(),
                listening: listeners
                    .iter()
                    .map(|(ip, (net, _))| format!("{ip} ({net})"))
                    .collect(),
                errors: errors.clone(),
                pods: pods_of(&view, &host),
            });
        }
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY), if !errors.is_empty() => {}
        }
    }
}

/// The pods of `host` (or of single-host networks, whose endpoints name no host) that the
/// zone names, per bridged network.
fn pods_of(view: &DiscoveryView, host: &str) -> Vec<PodStatus> {
    let mut out = Vec::new();
    for name in view.networks.keys() {
        for (pname, ep) in view.pods_on(name) {
            if ep.host.as_deref().is_some_and(|h| h != host) {
                continue;
            }
            out.push(PodStatus {
                name: pname,
                network: name.clone(),
                addresses: ep.addrs.clone(),
                container_id: ep.container_id().to_string(),
                uid: ep.pod.as_ref().and_then(|p| p.uid.clone()),
            });
        }
    }
    out
}

/// Raise the soft limit on open files to the hard one, so the capped forwards and TCP
/// connections (and everything else the agent holds) never meet the usual soft 1024.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

/// The upstreams the host itself uses: its /etc/resolv.conf nameservers.
pub fn host_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|s| forward::nameservers(&s))
        .unwrap_or_default()
}
