//! ferrynet's sleeve: an encrypted overlay in userspace over one UDP port, for peers no kernel
//! tunnel reaches (through NAT, across sites). WireGuard's protocol through boringtun's `noise`
//! module; a multi-queue TUN device with the kernel's offloads (TSO segments read whole and cut
//! here, received segments coalesced back by GRO before they are written); batched UDP (GSO
//! sends, GRO receives); one encrypt thread and one decrypt thread per queue. A peer no direct
//! path reaches (both ends behind NAT) goes through a third peer both reach, which forwards the
//! end-to-end encrypted datagrams in an envelope it can neither read nor forge.

mod peers;
mod rx;
mod stage;
mod tx;
pub mod udp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519::{PublicKey, StaticSecret};
use ferrynet_model::sleeve::path::{self, PathCandidate, PathView};
use ferrynet_model::sleeve::SleevePeer;
use serde::{Deserialize, Serialize};
use tun_rs::{DeviceBuilder, SyncDevice};

use peers::{Dest, Table, TableBuilder};

/// Handshakes per second before the sleeve answers with cookies (WireGuard's DoS defence).
const HANDSHAKE_RATE: u64 = 100;

/// What can go wrong starting the sleeve.
#[derive(Debug, thiserror::Error)]
pub enum SleeveError {
    /// The TUN device could not be made or opened.
    #[error("TUN device {dev}: {source}")]
    Tun {
        /// Device name.
        dev: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The UDP port could not be bound.
    #[error("UDP port {port}: {source}")]
    Udp {
        /// Port.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting a sleeve thread: {0}")]
    Thread(std::io::Error),
}

/// How to run the sleeve.
#[derive(Debug, Clone)]
pub struct SleeveConfig {
    /// TUN device name.
    pub dev: String,
    /// Its MTU (`model::sleeve::sleeve_mtu`).
    pub mtu: u32,
    /// UDP port.
    pub port: u16,
    /// Queues (threads per direction).
    pub queues: usize,
    /// This host's static private key.
    pub private_key: [u8; 32],
}

/// Packets dropped, by reason.
#[derive(Default)]
pub struct Counters {
    /// Data whose counter was seen before or is too old (replay).
    pub replayed: AtomicU64,
    /// Data or handshakes failing authentication (tampered, forged).
    pub auth_failed: AtomicU64,
    /// Handshakes from a static key no registered host has.
    pub unknown_key: AtomicU64,
    /// Messages for a session index this host does not hold (a peer's state from before a
    /// restart, or forged).
    pub unknown_session: AtomicU64,
    /// Decrypted packets whose source is outside the sender's blocks.
    pub spoofed_source: AtomicU64,
    /// Packets from the TUN for which no peer is routed.
    pub no_peer: AtomicU64,
    /// Datagrams that are neither WireGuard messages nor probes.
    pub malformed: AtomicU64,
    /// Other protocol errors.
    pub other: AtomicU64,
    /// VXLAN path probes answered.
    pub probes_answered: AtomicU64,
    /// Datagrams this host was asked to relay and refused (`model::sleeve::path::RelayRefusal`:
    /// from an address no peer is heard at directly, to an unknown key, to a peer not reached
    /// directly, or back to the sender).
    pub relay_refused: AtomicU64,
    /// Datagrams this host relayed between two peers.
    pub relayed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BTreeMap::from([
            ("replayed".to_string(), g(&self.replayed)),
            ("authFailed".to_string(), g(&self.auth_failed)),
            ("unknownKey".to_string(), g(&self.unknown_key)),
            ("unknownSession".to_string(), g(&self.unknown_session)),
            ("spoofedSource".to_string(), g(&self.spoofed_source)),
            ("noPeer".to_string(), g(&self.no_peer)),
            ("malformed".to_string(), g(&self.malformed)),
            ("other".to_string(), g(&self.other)),
            ("relayRefused".to_string(), g(&self.relay_refused)),
        ])
    }
}

/// State shared by the sleeve's threads.
pub(crate) struct Shared {
    table: RwLock<Arc<Table>>,
    builder: Mutex<TableBuilder>,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    counters: Counters,
    sockets: Vec<Arc<socket2::Socket>>,
    mtu: usize,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// A running sleeve.
pub struct Sleeve {
    shared: Arc<Shared>,
    config: SleeveConfig,
}

/// One peer as `ferrynet status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    /// Host name.
    pub host: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Where its packets go (learned from it, else the path being tried): the peer's address,
    /// or the relay's when relayed.
    pub endpoint: Option<SocketAddr>,
    /// True when learned from an authenticated packet (it may differ from the registered one
    /// behind NAT).
    pub learned: bool,
    /// The relay its traffic goes through (None: direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// How it is reached and why (`model::sleeve::path::reason`).
    #[serde(default)]
    pub path: String,
    /// Seconds since the last completed handshake (none: no session).
    pub last_handshake_secs: Option<f64>,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
}

/// The sleeve as `ferrynet status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SleeveReport {
    /// TUN device.
    pub dev: String,
    /// UDP port.
    pub port: u16,
    /// Queues.
    pub queues: usize,
    /// This host's public key.
    pub public_key: String,
    /// Peers.
    pub peers: Vec<PeerReport>,
    /// Dropped packets by reason.
    pub dropped: BTreeMap<String, u64>,
    /// VXLAN path probes answered.
    pub probes_answered: u64,
    /// Datagrams relayed for other peers.
    #[serde(default)]
    pub relayed: u64,
}

impl Sleeve {
    /// Make (or re-attach to) the persistent TUN device, bind the port, start the threads.
    /// The device persists when the process dies, so the routes into it stay and traffic to
    /// sleeve peers is dropped, never sent in clear, until a new agent attaches.
    pub fn start(config: SleeveConfig) -> Result<Sleeve, SleeveError> {
        let queues = config.queues.max(1);
        let tun_err = |source| SleeveError::Tun {
            dev: config.dev.clone(),
            source,
        };
        let first = DeviceBuilder::new()
            .name(&config.dev)
            .mtu(config.mtu.min(65535) as u16)
            .with(|b| {
                b.offload(true).multi_queue(true).packet_information(false);
            })
            .build_sync()
            .map_err(tun_err)?;
        first.persist().map_err(tun_err)?;
        first.enabled(true).map_err(tun_err)?;
        let mut devs = vec![first];
        for _ in 1..queues {
            let d = devs[0].try_clone().map_err(tun_err)?;
            devs.push(d);
        }
        let udp_err = |source| SleeveError::Udp {
            port: config.port,
            source,
        };
        let mut sockets = Vec::new();
        for _ in 0..queues {
            sockets.push(Arc::new(udp::bind(config.port).map_err(udp_err)?));
        }
        let secret = StaticSecret::from(config.private_key);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE));
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            builder: Mutex::new(TableBuilder::new(secret.clone(), limiter.clone())),
            secret,
            public,
            limiter,
            counters: Counters::default(),
            sockets,
            mtu: config.mtu as usize,
        });
        let devs: Vec<Arc<SyncDevice>> = devs.into_iter().map(Arc::new).collect();
        for (q, dev) in devs.iter().enumerate() {
            let (s, d) = (shared.clone(), dev.clone());
            spawn(format!("sleeve-tx{q}"), move || tx::run(s, d, q))?;
            let (s, d) = (shared.clone(), dev.clone());
            spawn(format!("sleeve-rx{q}"), move || rx::run(s, d, q))?;
        }
        let s = shared.clone();
        spawn("sleeve-timers".into(), move || timers(s))?;
        tracing::info!(dev = %config.dev, port = config.port, queues, "sleeve started");
        Ok(Sleeve { shared, config })
    }

    /// This host's public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.shared.public.as_bytes()
    }

    /// Replace the peer table. Peers whose key is new get a handshake at once, so a restarted
    /// host (or a changed key) is back in one round trip rather than at the next timer.
    pub fn set_peers(&self, peers: &[SleevePeer]) {
        let old = self.shared.table();
        let (table, fresh) = match self.shared.builder.lock() {
            Ok(mut b) => b.build(&old, peers),
            Err(_) => return,
        };
        let table = Arc::new(table);
        if let Ok(mut t) = self.shared.table.write() {
            *t = table.clone();
        }
        for p in fresh {
            if let Some(i) = table.by_key(&p.key) {
                tracing::info!(peer = %p.host, "sleeve: new peer key, handshaking");
                initiate(&self.shared, &table, i);
            }
        }
    }

    /// The report for `ferrynet status`.
    pub fn report(&self) -> SleeveReport {
        let t = self.shared.table();
        let peers = t
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let learned = e.peer.path.lock().ok().and_then(|p| p.learned);
                let since = e
                    .peer
                    .tunn
                    .lock()
                    .ok()
                    .and_then(|t| t.time_since_last_handshake());
                let (view, via) = t.view(i);
                PeerReport {
                    host: e.peer.host.clone(),
                    public_key: ferrynet_model::sleeve::encode_key(&e.peer.key),
                    endpoint: t.dest(i).map(|d| d.addr),
                    learned: learned.is_some(),
                    via: via.or_else(|| match &view {
                        PathView::Trying(PathCandidate::Relay(h)) => Some(h.clone()),
                        _ => None,
                    }),
                    path: path::reason(&view, &e.endpoints),
                    last_handshake_secs: since.map(|d| d.as_secs_f64()),
                    tx_bytes: e.peer.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: e.peer.rx_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        SleeveReport {
            dev: self.config.dev.clone(),
            port: self.config.port,
            queues: self.config.queues.max(1),
            public_key: ferrynet_model::sleeve::encode_key(&self.public_key()),
            peers,
            dropped: self.shared.counters.snapshot(),
            probes_answered: self.shared.counters.probes_answered.load(Ordering::Relaxed),
            relayed: self.shared.counters.relayed.load(Ordering::Relaxed),
        }
    }
}

fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, SleeveError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(SleeveError::Thread)
}

/// Send a handshake initiation to entry `i` now.
fn initiate(shared: &Shared, table: &Table, i: usize) {
    let e = &table.entries[i];
    let mut buf = [0u8; 256];
    let Some(dst) = table.dest(i) else {
        return;
    };
    let Ok(mut t) = e.peer.tunn.lock() else {
        return;
    };
    if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, false) {
        e.peer.sent(p);
        send_to(shared, dst, p);
    }
}

/// Send one message (a handshake, a keepalive) the way `dst` says, enveloped when relayed.
fn send_to(shared: &Shared, dst: Dest, msg: &[u8]) {
    let _ = if dst.relay_to.is_some() {
        udp::send_one(&shared.sockets[0], dst.addr, &dst.frame(msg))
    } else {
        udp::send_one(&shared.sockets[0], dst.addr, msg)
    };
}

/// WireGuard's timers (rekey every 2 minutes, retries, keepalives) for every peer, 4 times a
/// second; the handshake rate limiter starts a new second every second.
fn timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 2048];
    let mut tick = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        tick += 1;
        if tick.is_multiple_of(4) {
            shared.limiter.reset_count();
        }
        let table = shared.table();
        let now = std::time::Instant::now();
        for (i, e) in table.entries.iter().enumerate() {
            if table.rotate_if_stuck(i, now) {
                if let Ok(mut t) = e.peer.tunn.lock() {
                    // A fresh initiation, on the new path.
                    if let (TunnResult::WriteToNetwork(p), Some(dst)) =
                        (t.format_handshake_initiation(&mut buf, true), table.dest(i))
                    {
                        e.peer.sent(p);
                        send_to(&shared, dst, p);
                    }
                }
                continue;
            }
            let Some(dst) = table.dest(i) else {
                continue;
            };
            let Ok(mut t) = e.peer.tunn.lock() else {
                continue;
            };
            match t.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(p) => {
                    e.peer.sent(p);
                    send_to(&shared, dst, p);
                }
                TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    // Traffic stopped long ago; the next packet starts a handshake again.
                }
                _ => {}
            }
        }
    }
}

/// The public key of a private key.
pub fn public_of(private: [u8; 32]) -> [u8; 32] {
    *PublicKey::from(&StaticSecret::from(private)).as_bytes()
}

/// Send one handshake initiation from key `private` to the sleeve at `endpoint` whose key is
/// `peer_public`, and wait up to `wait` for its answer: true when the handshake completed.
/// A diagnostic (`ferrynet sleeve hello`): a host that does not know `private`'s public key
/// never answers, and counts the attempt as `unknownKey`.
pub fn hello(
    private: [u8; 32],
    peer_public: [u8; 32],
    endpoint: SocketAddr,
    wait: Duration,
) -> std::io::Result<bool> {
    let mut t = boringtun::noise::Tunn::new(
        StaticSecret::from(private),
        PublicKey::from(peer_public),
        None,
        None,
        rand::random::<u32>() >> 8,
        None,
    );
    let local: SocketAddr = if endpoint.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let sock = std::net::UdpSocket::bind(local)?;
    sock.set_read_timeout(Some(wait))?;
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, false) {
        sock.send_to(p, endpoint)?;
    }
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        if let TunnResult::WriteToNetwork(_) =
            t.decapsulate(Some(endpoint.ip()), &buf[..n], &mut out)
        {
            return Ok(t.time_since_last_handshake().is_some());
        }
    }
    Ok(false)
}
