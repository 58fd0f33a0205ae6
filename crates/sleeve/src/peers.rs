//! The peer table the queue threads read: peers by key (and its prefix, for relay envelopes),
//! by host, by session index and by the blocks routed to them; how each is reached (directly
//! or through a relay). Replaced whole on every change (readers keep the `Arc` they took), while a
//! peer whose key did not change keeps its tunnel state (sessions, learned endpoint).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use ferrynet_model::sleeve::path::{
    self, PathCandidate, PathView, KEY_PREFIX, RELAY_FORWARD, RELAY_HEADER,
};
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
    /// Where the peer is reached: learned from it, or the candidates in turn.
    pub path: Mutex<PathState>,
    /// Inner bytes sent.
    pub tx_bytes: AtomicU64,
    /// Inner bytes received.
    pub rx_bytes: AtomicU64,
}

/// Where a peer's authenticated packets came from, and so where its next ones go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Straight from (to) this address.
    Direct(SocketAddr),
    /// Forwarded by the relay at this address.
    Relay(SocketAddr),
}

/// Where to send a peer's next datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dest {
    /// The peer's (direct) or the relay's address.
    pub addr: SocketAddr,
    /// Through a relay: the destination's key prefix for the envelope.
    pub relay_to: Option<[u8; KEY_PREFIX]>,
}

impl Dest {
    /// Bytes put before the WireGuard message.
    pub fn header_len(&self) -> usize {
        if self.relay_to.is_some() {
            RELAY_HEADER
        } else {
            0
        }
    }

    /// Write the envelope (if any) at the start of `buf`.
    pub fn write_header(&self, buf: &mut [u8]) {
        if let Some(k) = self.relay_to {
            write_envelope(buf, RELAY_FORWARD, &k);
        }
    }

    /// The datagram for `msg`: the message, enveloped when relayed.
    pub fn frame(&self, msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; self.header_len() + msg.len()];
        self.write_header(&mut v);
        v[self.header_len()..].copy_from_slice(msg);
        v
    }
}

/// Write a relay envelope of `kind` naming `key` into the first [`RELAY_HEADER`] bytes.
pub fn write_envelope(buf: &mut [u8], kind: u8, key: &[u8; KEY_PREFIX]) {
    buf[..4].copy_from_slice(&[kind, 0, 0, 0]);
    buf[4..RELAY_HEADER].copy_from_slice(key);
}

/// How a peer is reached.
#[derive(Debug, Default)]
pub struct PathState {
    /// Where it was last heard from (authenticated), followed as it moves.
    pub learned: Option<Hop>,
    /// The candidate (`Entry::paths`) tried while nothing is learned.
    pub cursor: usize,
    /// Since when a handshake initiation waits for an answer.
    pub waiting_since: Option<Instant>,
    /// This host went through every direct endpoint unanswered and moved on to relays.
    pub direct_failed: bool,
}

/// A handshake unanswered this long moves the peer to its next candidate path (another
/// endpoint: an IPv4 path that is firewalled while the IPv6 one passes, or the reverse; then
/// a relay).
pub const ROTATE_AFTER: Duration = Duration::from_secs(5);

impl PeerState {
    /// Note an authenticated packet that came by `hop` (roaming: the peer is followed there).
    pub fn heard_from(&self, hop: Hop) {
        if let Ok(mut p) = self.path.lock() {
            p.waiting_since = None;
            if p.learned != Some(hop) {
                if p.learned.is_some() {
                    tracing::info!(peer = %self.host, path = ?hop, "sleeve peer moved");
                }
                if matches!(hop, Hop::Direct(_)) {
                    p.direct_failed = false;
                }
                p.learned = Some(hop);
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
}

/// A peer with what the store says about it.
pub struct Entry {
    /// The tunnel state.
    pub peer: Arc<PeerState>,
    /// Registered endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The ways to try, in order (`model::sleeve::path::candidates`).
    pub paths: Vec<PathCandidate>,
    /// The first bytes of its key, naming it in relay envelopes.
    pub prefix: [u8; KEY_PREFIX],
    /// Blocks it may send from.
    pub allowed: Vec<IpNet>,
}

/// The table.
#[derive(Default)]
pub struct Table {
    /// Peers in host order.
    pub entries: Vec<Entry>,
    by_key: HashMap<[u8; 32], usize>,
    by_prefix: HashMap<[u8; KEY_PREFIX], usize>,
    by_host: HashMap<String, usize>,
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

    /// The entry whose key starts with `prefix`.
    pub fn by_prefix(&self, prefix: &[u8]) -> Option<usize> {
        let p: [u8; KEY_PREFIX] = prefix.try_into().ok()?;
        self.by_prefix.get(&p).copied()
    }

    /// Whether entry `i` may send from `src`.
    pub fn allows(&self, i: usize, src: IpAddr) -> bool {
        self.entries[i].allowed.iter().any(|n| n.contains(&src))
    }

    /// Where entry `i` was last heard from directly (None: never, or only through a relay).
    pub fn direct_addr(&self, i: usize) -> Option<SocketAddr> {
        match self.entries[i].peer.path.lock().ok()?.learned {
            Some(Hop::Direct(a)) => Some(a),
            _ => None,
        }
    }

    /// The entry heard directly at `src` (a relay's check of who asks it to forward; a scan,
    /// done only for relayed datagrams).
    pub fn heard_directly_at(&self, src: SocketAddr) -> Option<usize> {
        (0..self.entries.len()).find(|&i| self.direct_addr(i) == Some(src))
    }

    /// Whether `host` can relay for this host now: heard directly.
    fn usable_relay(&self, host: &str) -> bool {
        self.by_host
            .get(host)
            .is_some_and(|&j| self.direct_addr(j).is_some())
    }

    /// Where entry `i`'s next datagram goes: the way it was last heard from, else the current
    /// candidate (a relay only while this host hears the relay directly).
    pub fn dest(&self, i: usize) -> Option<Dest> {
        let e = &self.entries[i];
        let candidate = {
            let p = e.peer.path.lock().ok()?;
            match p.learned {
                Some(Hop::Direct(addr)) => {
                    return Some(Dest {
                        addr,
                        relay_to: None,
                    })
                }
                Some(Hop::Relay(addr)) => {
                    return Some(Dest {
                        addr,
                        relay_to: Some(e.prefix),
                    })
                }
                None => e.paths.get(p.cursor % e.paths.len().max(1))?.clone(),
            }
        };
        match candidate {
            PathCandidate::Direct(addr) => Some(Dest {
                addr,
                relay_to: None,
            }),
            PathCandidate::Relay(h) => {
                let j = *self.by_host.get(&h)?;
                Some(Dest {
                    addr: self.direct_addr(j)?,
                    relay_to: Some(e.prefix),
                })
            }
        }
    }

    /// When entry `i`'s handshake went unanswered for [`ROTATE_AFTER`] and another candidate
    /// is usable (`model::sleeve::path::next`), forget what was learned and move there; true
    /// if moved.
    pub fn rotate_if_stuck(&self, i: usize, now: Instant) -> bool {
        let e = &self.entries[i];
        // Which relays are usable, before taking this peer's lock (they take theirs).
        let usable: Vec<&str> = e
            .paths
            .iter()
            .filter_map(|c| match c {
                PathCandidate::Relay(h) if self.usable_relay(h) => Some(h.as_str()),
                _ => None,
            })
            .collect();
        let Ok(mut p) = e.peer.path.lock() else {
            return false;
        };
        let stuck = p
            .waiting_since
            .is_some_and(|t| now.duration_since(t) >= ROTATE_AFTER);
        if !stuck {
            return false;
        }
        let Some(next) = path::next(&e.paths, p.cursor, |h| usable.contains(&h)) else {
            return false;
        };
        if next == p.cursor % e.paths.len() && p.learned.is_none() {
            return false;
        }
        p.cursor = next;
        p.learned = None;
        p.waiting_since = None;
        if matches!(e.paths[next], PathCandidate::Relay(_)) {
            p.direct_failed = true;
        }
        tracing::info!(peer = %e.peer.host, path = ?e.paths[next], "sleeve: no answer; trying the peer's next path");
        true
    }

    /// What the datapath knows of its way to entry `i`, for `ferrynet status`.
    pub fn view(&self, i: usize) -> (PathView, Option<String>) {
        let e = &self.entries[i];
        let Ok(p) = e
            .peer
            .path
            .lock()
            .map(|p| (p.learned, p.cursor, p.direct_failed))
        else {
            return (PathView::Unreachable, None);
        };
        let (learned, cursor, direct_failed) = p;
        match learned {
            Some(Hop::Direct(endpoint)) => (
                PathView::Direct {
                    endpoint,
                    registered: e.endpoints.contains(&endpoint),
                },
                None,
            ),
            Some(Hop::Relay(addr)) => {
                let via = self
                    .heard_directly_at(addr)
                    .map(|j| self.entries[j].peer.host.clone());
                (
                    PathView::Relayed {
                        via: via.clone(),
                        direct_failed,
                    },
                    via,
                )
            }
            None => match e.paths.get(cursor % e.paths.len().max(1)) {
                Some(c) => (PathView::Trying(c.clone()), None),
                None => (PathView::Unreachable, None),
            },
        }
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
            t.by_prefix.insert(prefix_of(&p.public_key), i);
            t.by_host.insert(p.host.clone(), i);
            t.by_index.insert(peer.index, i);
            for b in &p.allowed {
                t.routes.push((b.trunc(), i));
            }
            t.entries.push(Entry {
                peer,
                endpoints: p.endpoints.clone(),
                paths: path::candidates(p, peers),
                prefix: prefix_of(&p.public_key),
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

/// The first [`KEY_PREFIX`] bytes of a key.
pub fn prefix_of(key: &[u8; 32]) -> [u8; KEY_PREFIX] {
    let mut p = [0u8; KEY_PREFIX];
    p.copy_from_slice(&key[..KEY_PREFIX]);
    p
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

    fn direct(s: &str) -> Option<Dest> {
        Some(Dest {
            addr: s.parse().unwrap(),
            relay_to: None,
        })
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
        assert_eq!(t.by_prefix(&peers[1].public_key[..KEY_PREFIX]), Some(h3));
        assert_eq!(t.by_prefix(&[0u8; KEY_PREFIX]), None);
        assert!(t.allows(h3, "10.20.0.130".parse().unwrap()));
        assert!(!t.allows(h3, "10.20.0.65".parse().unwrap()));
        // Same key: the tunnel (and what it learned) stays; a new key is a new peer.
        let nat: SocketAddr = "172.31.0.103:40000".parse().unwrap();
        t.entries[h3].peer.heard_from(Hop::Direct(nat));
        assert_eq!(t.heard_directly_at(nat), Some(h3));
        let changed = [peers[0].clone(), peer("h3", 4, &["172.31.0.3:6784"], &[])];
        let (t2, fresh) = b.build(&t, &peers[..1]);
        assert!(fresh.is_empty() && Arc::ptr_eq(&t2.entries[0].peer, &t.entries[0].peer));
        let (t3, fresh) = b.build(&t, &changed);
        assert_eq!(fresh.len(), 1);
        assert_ne!(t3.entries[1].peer.index, t.entries[h3].peer.index);
        assert_eq!(t3.dest(1), direct("172.31.0.3:6784"));
    }

    #[test]
    fn an_unanswered_handshake_moves_to_the_next_endpoint() {
        let mut b = builder();
        let p = peer("h2", 2, &["172.31.0.2:6784", "[fd31::2]:6784"], &[]);
        let (t, _) = b.build(&Table::default(), &[p]);
        let s = &t.entries[0].peer;
        let start = Instant::now();
        assert_eq!(t.dest(0), direct("172.31.0.2:6784"));
        s.sent(&[4, 0, 0, 0]);
        assert!(
            !t.rotate_if_stuck(0, start + ROTATE_AFTER * 2),
            "data is no handshake"
        );
        s.sent(&[1, 0, 0, 0]);
        assert!(!t.rotate_if_stuck(0, Instant::now()));
        assert!(t.rotate_if_stuck(0, Instant::now() + ROTATE_AFTER));
        assert_eq!(t.dest(0), direct("[fd31::2]:6784"));
        // An answer ends the wait; the learned address wins.
        s.sent(&[1, 0, 0, 0]);
        s.heard_from(Hop::Direct("[fd31::2]:6784".parse().unwrap()));
        assert!(!t.rotate_if_stuck(0, Instant::now() + ROTATE_AFTER * 2));
    }

    #[test]
    fn unanswered_endpoints_move_to_a_relay_heard_directly() {
        let mut b = builder();
        let peers = [
            peer("h1", 1, &["172.31.0.1:6784"], &[]),
            peer("h3", 3, &["172.30.3.2:6784"], &[]),
            peer("h4", 4, &["172.31.0.4:6784"], &[]),
        ];
        let (t, _) = b.build(&Table::default(), &peers);
        let h3 = t.by_key(&peers[1].public_key).unwrap();
        let s = &t.entries[h3].peer;
        let later = || Instant::now() + ROTATE_AFTER;
        // No relay heard yet: nothing else to try.
        s.sent(&[1, 0, 0, 0]);
        assert!(!t.rotate_if_stuck(h3, later()));
        // h4 answers directly: it becomes h3's relay, in an envelope naming h3.
        let h4_at: SocketAddr = "172.31.0.4:6784".parse().unwrap();
        t.entries[2].peer.heard_from(Hop::Direct(h4_at));
        assert!(t.rotate_if_stuck(h3, later()));
        let d = t.dest(h3).unwrap();
        assert_eq!(d.addr, h4_at);
        assert_eq!(d.relay_to, Some(prefix_of(&peers[1].public_key)));
        let framed = d.frame(&[1, 0, 0, 0, 9]);
        assert_eq!(framed[0], RELAY_FORWARD);
        assert_eq!(&framed[4..RELAY_HEADER], &peers[1].public_key[..KEY_PREFIX]);
        assert_eq!(&framed[RELAY_HEADER..], &[1, 0, 0, 0, 9]);
        assert!(matches!(
            t.view(h3).0,
            PathView::Trying(PathCandidate::Relay(ref h)) if h == "h4"
        ));
        // The answer comes through the relay: relayed, and this host had tried directly first.
        s.heard_from(Hop::Relay(h4_at));
        let (view, via) = t.view(h3);
        assert_eq!(via.as_deref(), Some("h4"));
        assert_eq!(
            view,
            PathView::Relayed {
                via: Some("h4".into()),
                direct_failed: true
            }
        );
        // A direct packet from h3 later (its NAT opened): followed there.
        s.heard_from(Hop::Direct("172.31.0.103:6784".parse().unwrap()));
        assert_eq!(t.dest(h3), direct("172.31.0.103:6784"));
    }
}
