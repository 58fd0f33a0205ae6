//! The peer table the queue threads read: peers by key, by session index and by the blocks
//! routed to them. Replaced whole on every change (readers keep the `Arc` they took), while a
//! peer whose key did not change keeps its tunnel state (sessions, learned endpoint).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use ferrynet_model::sleeve::SleevePeer;
use ipnet::IpNet;

/// Seconds between keepalives, so a NAT in the path keeps the sleeve's mapping.
pub const KEEPALIVE_SECS: u16 = 25;

/// One peer's tunnel and what the datapath learned about it.
pub struct PeerState {
    /// Host name.
    pub host: String,
    /// Static public key.
    pub key: [u8; 32],
    /// Session index prefix (the top 24 bits of every index this tunnel hands out).
    pub index: u32,
    /// WireGuard's state machine for this peer.
    pub tunn: Mutex<Tunn>,
    /// Where the peer is reached: learned from it, or the registered one in turn.
    pub path: Mutex<PathState>,
    /// Inner bytes sent.
    pub tx_bytes: AtomicU64,
    /// Inner bytes received.
    pub rx_bytes: AtomicU64,
}

/// How a peer is reached.
#[derive(Debug, Default)]
pub struct PathState {
    /// Where it was last heard from (authenticated), followed as it moves.
    pub learned: Option<SocketAddr>,
    /// The registered endpoint tried while none is learned.
    pub cursor: usize,
    /// Since when a handshake initiation waits for an answer.
    pub waiting_since: Option<Instant>,
}

/// A handshake unanswered this long moves the peer to its next registered endpoint (an IPv4
/// path that is firewalled while the IPv6 one passes, or the reverse).
pub const ROTATE_AFTER: Duration = Duration::from_secs(5);

impl PeerState {
    /// The endpoint to send to: the learned one, else the registered one in turn.
    pub fn endpoint(&self, entry: &Entry) -> Option<SocketAddr> {
        let p = self.path.lock().ok()?;
        p.learned.or_else(|| {
            let n = entry.endpoints.len();
            (n > 0).then(|| entry.endpoints[p.cursor % n])
        })
    }

    /// Note an authenticated packet from `src` (roaming: the peer is followed there).
    pub fn heard_from(&self, src: SocketAddr) {
        if let Ok(mut p) = self.path.lock() {
            p.waiting_since = None;
            if p.learned != Some(src) {
                if p.learned.is_some() {
                    tracing::info!(peer = %self.host, endpoint = %src, "sleeve peer moved");
                }
                p.learned = Some(src);
            }
        }
    }

    /// Note a datagram sent to the peer: a handshake initiation starts the wait for its answer.
    pub fn sent(&self, msg: &[u8]) {
        if msg.first() != Some(&1) {
            return;
        }
        if let Ok(mut p) = self.path.lock() {
            p.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    /// When a handshake went unanswered for [`ROTATE_AFTER`] and the peer has another
    /// registered endpoint, forget the learned one and move to the next; true if moved.
    pub fn rotate_if_stuck(&self, entry: &Entry, now: Instant) -> bool {
        let Ok(mut p) = self.path.lock() else {
            return false;
        };
        let stuck = p
            .waiting_since
            .is_some_and(|t| now.duration_since(t) >= ROTATE_AFTER);
        if !stuck || entry.endpoints.len() < 2 {
            return false;
        }
        p.cursor = (p.cursor + 1) % entry.endpoints.len();
        p.learned = None;
        p.waiting_since = None;
        tracing::info!(peer = %self.host, endpoint = %entry.endpoints[p.cursor], "sleeve: no answer; trying the peer's next endpoint");
        true
    }
}

/// A peer with what the store says about it.
pub struct Entry {
    /// The tunnel state.
    pub peer: Arc<PeerState>,
    /// Registered endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Blocks it may send from.
    pub allowed: Vec<IpNet>,
}

/// The table.
#[derive(Default)]
pub struct Table {
    /// Peers in host order.
    pub entries: Vec<Entry>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    /// (block, entry), longest prefix first.
    routes: Vec<(IpNet, usize)>,
}

impl Table {
    /// The entry routed to `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(n, _)| n.contains(&dst))
            .map(|(_, i)| *i)
    }

    /// The entry holding session index `idx` (the receiver index of a message).
    pub fn by_index(&self, idx: u32) -> Option<usize> {
        self.by_index.get(&(idx >> 8)).copied()
    }

    /// The entry with this public key.
    pub fn by_key(&self, key: &[u8; 32]) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// Whether entry `i` may send from `src`.
    pub fn allows(&self, i: usize, src: IpAddr) -> bool {
        self.entries[i].allowed.iter().any(|n| n.contains(&src))
    }
}

/// Builds tables, keeping the tunnels of unchanged peers.
pub struct TableBuilder {
    secret: StaticSecret,
    limiter: Arc<RateLimiter>,
    next_index: u32,
}

impl TableBuilder {
    /// For this host's key and the shared handshake rate limiter.
    pub fn new(secret: StaticSecret, limiter: Arc<RateLimiter>) -> TableBuilder {
        TableBuilder {
            secret,
            limiter,
            next_index: 1,
        }
    }

    /// The table for `peers`; returns it and the peers that are new (to handshake at once).
    pub fn build(&mut self, old: &Table, peers: &[SleevePeer]) -> (Table, Vec<Arc<PeerState>>) {
        let mut t = Table::default();
        let mut fresh = Vec::new();
        for p in peers {
            let kept = old
                .by_key(&p.public_key)
                .map(|i| old.entries[i].peer.clone())
                .filter(|s| s.host == p.host);
            let peer = match kept {
                Some(s) => s,
                None => {
                    let s = Arc::new(self.new_peer(p));
                    fresh.push(s.clone());
                    s
                }
            };
            let i = t.entries.len();
            t.by_key.insert(p.public_key, i);
            t.by_index.insert(peer.index, i);
            for b in &p.allowed {
                t.routes.push((b.trunc(), i));
            }
            t.entries.push(Entry {
                peer,
                endpoints: p.endpoints.clone(),
                allowed: p.allowed.iter().map(IpNet::trunc).collect(),
            });
        }
        t.routes
            .sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        (t, fresh)
    }

    fn new_peer(&mut self, p: &SleevePeer) -> PeerState {
        // 24 bits of index; wrapping after 16 million key changes is harmless (old ones are gone).
        let index = self.next_index & 0x00ff_ffff;
        self.next_index = self.next_index.wrapping_add(1).max(1);
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(p.public_key),
            None,
            Some(KEEPALIVE_SECS),
            index,
            Some(self.limiter.clone()),
        );
        PeerState {
            host: p.host.clone(),
            key: p.public_key,
            index,
            tunn: Mutex::new(tunn),
            path: Mutex::new(PathState::default()),
            tx_bytes: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
        }
    }
}

/// Bump a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(host: &str, key: u8, endpoints: &[&str], allowed: &[&str]) -> SleevePeer {
        SleevePeer {
            host: host.into(),
            public_key: *PublicKey::from(&StaticSecret::from([key; 32])).as_bytes(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            allowed: allowed.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn builder() -> TableBuilder {
        let me = StaticSecret::from([9u8; 32]);
        let limiter = Arc::new(RateLimiter::new(&PublicKey::from(&me), 10));
        TableBuilder::new(me, limiter)
    }

    #[test]
    fn routes_indexes_and_kept_tunnels() {
        let mut b = builder();
        let peers = [
            peer("h2", 2, &["172.31.0.2:6784"], &["10.20.0.64/26"]),
            peer(
                "h3",
                3,
                &["172.31.0.3:6784"],
                &["10.20.0.128/26", "fd20::80/122"],
            ),
        ];
        let (t, fresh) = b.build(&Table::default(), &peers);
        assert_eq!(fresh.len(), 2);
        let h3 = t.route("fd20::81".parse().unwrap()).unwrap();
        assert_eq!(t.entries[h3].peer.host, "h3");
        assert_eq!(t.route("10.20.1.1".parse().unwrap()), None);
        assert_eq!(t.by_index(t.entries[h3].peer.index << 8 | 7), Some(h3));
        assert!(t.allows(h3, "10.20.0.130".parse().unwrap()));
        assert!(!t.allows(h3, "10.20.0.65".parse().unwrap()));
        // Same key: the tunnel (and what it learned) stays; a new key is a new peer.
        t.entries[h3]
            .peer
            .heard_from("172.31.0.103:40000".parse().unwrap());
        let changed = [peers[0].clone(), peer("h3", 4, &["172.31.0.3:6784"], &[])];
        let (t2, fresh) = b.build(&t, &peers[..1]);
        assert!(fresh.is_empty() && Arc::ptr_eq(&t2.entries[0].peer, &t.entries[0].peer));
        let (t3, fresh) = b.build(&t, &changed);
        assert_eq!(fresh.len(), 1);
        assert_ne!(t3.entries[1].peer.index, t.entries[h3].peer.index);
        assert_eq!(
            t3.entries[1].peer.endpoint(&t3.entries[1]),
            "172.31.0.3:6784".parse().ok()
        );
    }

    #[test]
    fn an_unanswered_handshake_moves_to_the_next_endpoint() {
        let mut b = builder();
        let p = peer("h2", 2, &["172.31.0.2:6784", "[fd31::2]:6784"], &[]);
        let (t, _) = b.build(&Table::default(), &[p]);
        let (e, s) = (&t.entries[0], &t.entries[0].peer);
        let start = Instant::now();
        assert_eq!(s.endpoint(e), "172.31.0.2:6784".parse().ok());
        s.sent(&[4, 0, 0, 0]);
        assert!(
            !s.rotate_if_stuck(e, start + ROTATE_AFTER * 2),
            "data is no handshake"
        );
        s.sent(&[1, 0, 0, 0]);
        assert!(!s.rotate_if_stuck(e, Instant::now()));
        assert!(s.rotate_if_stuck(e, Instant::now() + ROTATE_AFTER));
        assert_eq!(s.endpoint(e), "[fd31::2]:6784".parse().ok());
        // An answer ends the wait; the learned address wins.
        s.sent(&[1, 0, 0, 0]);
        s.heard_from("[fd31::2]:6784".parse().unwrap());
        assert!(!s.rotate_if_stuck(e, Instant::now() + ROTATE_AFTER * 2));
    }
}
