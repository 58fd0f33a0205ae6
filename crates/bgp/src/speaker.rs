//! The speaker: a listener on the BGP port, one task per configured peer, and the RIB they
//! feed. The agent gives it the peers, what to announce and the import rules (watch
//! channels), and reads back the RIB when it changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferrynet_model::bgp::peers::{PeerKind, PeerSpec};
use ferrynet_model::bgp::rib::Rib;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::session;

/// The well-known BGP port.
pub const BGP_PORT: u16 = 179;

/// Session settings shared by every peer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Hold time offered.
    pub hold_time: u16,
    /// Keepalive interval (None: a third of the negotiated hold time).
    pub keepalive: Option<u16>,
    /// Graceful-restart time offered.
    pub restart_time: u16,
    /// This speaker restarted with its routes kept in the kernel (R and F bits, RFC 4724).
    pub restarted: bool,
    /// Port peers are dialled on (179; tests may use another).
    pub peer_port: u16,
    /// First delay between connection attempts (doubles up to 30 s).
    pub connect_retry: Duration,
}

/// What this host announces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exports {
    /// Prefixes (blocks and host routes).
    pub prefixes: BTreeSet<IpNet>,
    /// Next hop of IPv4 prefixes when the session is not over IPv4.
    pub next_hop4: Option<Ipv4Addr>,
    /// Next hop of IPv6 prefixes when the session is not over IPv6.
    pub next_hop6: Option<Ipv6Addr>,
}

/// What received routes are held to (`ferrynet_model::bgp::policy::ImportRules`, owned).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The pools.
    pub pools: Vec<IpNet>,
    /// This host's blocks.
    pub own: Vec<IpNet>,
    /// Addresses of the own blocks lent to other hosts' containers (host routes accepted).
    pub lent: BTreeSet<IpAddr>,
    /// This host's underlay addresses with prefixes.
    pub underlay: Vec<IpNet>,
}

/// One session as `ferrynet bgp status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerState {
    /// Peer name.
    pub name: String,
    /// `mesh` or `external`.
    pub kind: String,
    /// Peer address.
    pub address: String,
    /// Peer AS.
    pub remote_asn: u32,
    /// Our AS.
    pub local_asn: u32,
    /// FSM state: Idle, Connect, Active, OpenSent, OpenConfirm, Established.
    pub state: String,
    /// Seconds in the current state.
    pub uptime_secs: u64,
    /// The peer's BGP identifier (once known).
    pub router_id: Option<String>,
    /// Negotiated hold time.
    pub hold_time: u16,
    /// Prefixes accepted from the peer (stale ones included).
    pub prefixes_in: usize,
    /// Prefixes refused by the import policy (since the session came up).
    pub prefixes_rejected: usize,
    /// Prefixes announced to the peer.
    pub prefixes_out: usize,
    /// Graceful restart agreed.
    pub graceful_restart: bool,
    /// Its End-of-RIB arrived for every family since the session came up.
    pub synced: bool,
    /// Last error (a NOTIFICATION sent or received, a connection failure).
    pub last_error: Option<String>,
    /// Sessions established since the agent started.
    pub established_count: u64,
    #[serde(skip)]
    pub(crate) since: Option<Instant>,
}

/// Shared between the speaker and its sessions.
pub(crate) struct Inner {
    pub settings: Settings,
    pub rib: Mutex<Rib>,
    pub rib_version: watch::Sender<u64>,
    pub status: Mutex<BTreeMap<String, PeerState>>,
    pub exports: watch::Receiver<Exports>,
    pub policy: watch::Receiver<Policy>,
    pub started: Instant,
}

impl Inner {
    /// Tell the agent the RIB changed.
    pub fn rib_changed(&self) {
        self.rib_version.send_modify(|v| *v += 1);
    }

    /// Update one peer's status entry.
    pub fn with_status(&self, name: &str, f: impl FnOnce(&mut PeerState)) {
        if let Ok(mut s) = self.status.lock() {
            if let Some(p) = s.get_mut(name) {
                f(p);
            }
        }
    }
}

struct PeerTask {
    spec: PeerSpec,
    inbound: mpsc::Sender<TcpStream>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A running speaker.
pub struct Speaker {
    inner: Arc<Inner>,
    peers: Mutex<BTreeMap<String, PeerTask>>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    passwords: Arc<Mutex<BTreeMap<IpAddr, String>>>,
    listen_fd: Option<std::os::fd::RawFd>,
}

impl Speaker {
    /// Start a speaker; `listen` binds the dual-stack listener (None: dial out only).
    pub fn start(
        settings: Settings,
        exports: watch::Receiver<Exports>,
        policy: watch::Receiver<Policy>,
        listen: Option<SocketAddr>,
    ) -> std::io::Result<Arc<Speaker>> {
        let (rib_version, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            settings,
            rib: Mutex::new(Rib::default()),
            rib_version,
            status: Mutex::new(BTreeMap::new()),
            exports,
            policy,
            started: Instant::now(),
        });
        let listener = match listen {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let listen_fd = listener.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let sp = Arc::new(Speaker {
            inner,
            peers: Mutex::new(BTreeMap::new()),
            listener: Mutex::new(None),
            passwords: Arc::new(Mutex::new(BTreeMap::new())),
            listen_fd,
        });
        let Some(l) = listener else {
            return Ok(sp);
        };
        let weak = Arc::downgrade(&sp);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Some(sp) = weak.upgrade() else { return };
                sp.dispatch(stream, from.ip().to_canonical());
            }
        });
        // Kept so Drop can stop the accept loop.
        *sp.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(sp)
    }

    /// Hand an accepted connection to the peer at its address; strangers are closed.
    fn dispatch(&self, stream: TcpStream, from: IpAddr) {
        let peers = self.lock_peers();
        match peers.values().find(|p| p.spec.address == from) {
            Some(p) => {
                let _ = p.inbound.try_send(stream);
            }
            None => tracing::debug!(%from, "BGP connection from an unknown address closed"),
        }
    }

    fn lock_peers(&self) -> MutexGuard<'_, BTreeMap<String, PeerTask>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run exactly these peers: new ones start, removed ones stop (their routes leave the
    /// RIB), changed ones restart.
    pub fn set_peers(&self, specs: &[PeerSpec]) {
        let mut peers = self.lock_peers();
        let wanted: BTreeMap<&str, &PeerSpec> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let gone: Vec<String> = peers
            .iter()
            .filter(|(n, t)| wanted.get(n.as_str()) != Some(&&t.spec))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(t) = peers.remove(&n) {
                let _ = t.stop.send(true);
                t.task.abort();
                self.set_password(t.spec.address, None);
                if let Ok(mut r) = self.inner.rib.lock() {
                    if r.drop_peer(&n) > 0 {
                        self.inner.rib_changed();
                    }
                }
                if let Ok(mut s) = self.inner.status.lock() {
                    s.remove(&n);
                }
            }
        }
        for spec in specs {
            if peers.contains_key(&spec.name) {
                continue;
            }
            self.set_password(spec.address, spec.password.as_deref());
            let (tx, rx) = mpsc::channel(4);
            let (stop_tx, stop_rx) = watch::channel(false);
            if let Ok(mut s) = self.inner.status.lock() {
                s.insert(spec.name.clone(), initial_state(spec));
            }
            let task = tokio::spawn(session::run_peer(
                self.inner.clone(),
                spec.clone(),
                rx,
                stop_rx,
            ));
            peers.insert(
                spec.name.clone(),
                PeerTask {
                    spec: spec.clone(),
                    inbound: tx,
                    stop: stop_tx,
                    task,
                },
            );
        }
    }

    /// Install (or remove) the TCP-MD5 key for a peer on the listener.
    fn set_password(&self, peer: IpAddr, key: Option<&str>) {
        let mut pw = self.passwords.lock().unwrap_or_else(|e| e.into_inner());
        let had = pw.contains_key(&peer);
        match key {
            Some(k) => {
                pw.insert(peer, k.to_string());
            }
            None => {
                pw.remove(&peer);
            }
        }
        let Some(fd) = self.listen_fd else { return };
        if key.is_none() && !had {
            return;
        }
        let raw = RawSock(fd);
        if let Err(e) = crate::md5::set_key(&raw, peer, true, key.unwrap_or("").as_bytes()) {
            tracing::warn!(%peer, error = %e, "setting the TCP-MD5 key on the listener");
        }
    }

    /// The RIB (read it, do not hold it across awaits).
    pub fn rib(&self) -> MutexGuard<'_, Rib> {
        self.inner.rib.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumps on every RIB change.
    pub fn rib_changes(&self) -> watch::Receiver<u64> {
        self.inner.rib_version.subscribe()
    }

    /// Every session's state, by name.
    pub fn status(&self) -> Vec<PeerState> {
        let now = Instant::now();
        let s = self.inner.status.lock().unwrap_or_else(|e| e.into_inner());
        s.values()
            .map(|p| {
                let mut p = p.clone();
                p.uptime_secs = p.since.map_or(0, |t| now.duration_since(t).as_secs());
                p
            })
            .collect()
    }

    /// The first sync after a restart is over: every peer is Established and sent its
    /// End-of-RIB, or `deferral` has passed since the start (RFC 4724's selection deferral),
    /// so stale kernel routes may now be removed.
    pub fn converged(&self, deferral: Duration) -> bool {
        if self.inner.started.elapsed() >= deferral {
            return true;
        }
        let s = self.inner.status.lock().unwrap_or_else(|e| e.into_inner());
        s.values().all(|p| p.synced)
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        if let Some(t) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        for t in self.lock_peers().values() {
            t.task.abort();
        }
    }
}

struct RawSock(std::os::fd::RawFd);
impl std::os::fd::AsRawFd for RawSock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn initial_state(spec: &PeerSpec) -> PeerState {
    PeerState {
        name: spec.name.clone(),
        kind: match spec.kind {
            PeerKind::Mesh => "mesh".into(),
            PeerKind::External => "external".into(),
        },
        address: spec.address.to_string(),
        remote_asn: spec.remote_asn,
        local_asn: spec.local_asn,
        state: "Idle".into(),
        since: Some(Instant::now()),
        ..Default::default()
    }
}

/// A listener on `addr`; an IPv6 wildcard also takes IPv4 peers (v6only off).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    TcpListener::from_std(s.into())
}
