//! The Loc-RIB: every accepted path per prefix and peer, best-path selection (RFC 4271
//! 9.1.2, the steps that apply to a leaf that never re-advertises), graceful-restart
//! staleness (RFC 4724), and the kernel routes that follow from the best paths.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::fabric::{FabricRoute, FabricState};

/// One peer's path to a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Path {
    /// Next hop (already checked by `policy::import`).
    pub next_hop: IpAddr,
    /// AS_PATH, flattened (AS_SET counts as one AS, RFC 4271 9.1.2.2).
    pub as_path_len: u32,
    /// ORIGIN (0 IGP, 1 EGP, 2 INCOMPLETE).
    pub origin: u8,
    /// MULTI_EXIT_DISC (0 when absent).
    pub med: u32,
    /// LOCAL_PREF (100 when absent or from an eBGP peer).
    pub local_pref: u32,
    /// Learned over eBGP.
    pub ebgp: bool,
    /// The peer's BGP identifier.
    pub router_id: u32,
    /// The peer's address (the last tie-breaker).
    pub peer_addr: IpAddr,
    /// Kept from before the peer restarted, until it re-announces or the timer runs out.
    pub stale: bool,
}

/// Preference between two paths: `Less` means `a` is better.
fn rank(a: &Path, b: &Path) -> Ordering {
    b.local_pref
        .cmp(&a.local_pref)
        .then(a.as_path_len.cmp(&b.as_path_len))
        .then(a.origin.cmp(&b.origin))
        .then(a.med.cmp(&b.med))
        .then(b.ebgp.cmp(&a.ebgp))
        .then(a.stale.cmp(&b.stale))
        .then(a.router_id.cmp(&b.router_id))
        .then(a.peer_addr.cmp(&b.peer_addr))
}

/// Paths by prefix and peer name. Sized for large tables: a prefix holds a vector of exactly
/// as many paths as peers sent it (one, mostly), and each path names its peer by a shared,
/// interned name rather than a string of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rib {
    paths: BTreeMap<IpNet, Vec<(Arc<str>, Path)>>,
    /// Peer names, one allocation each.
    names: Vec<Arc<str>>,
}

impl Rib {
    fn intern(&mut self, peer: &str) -> Arc<str> {
        if let Some(n) = self.names.iter().find(|n| &***n == peer) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(peer);
        self.names.push(n.clone());
        n
    }

    /// Add or replace `peer`'s path to `prefix`.
    pub fn announce(&mut self, peer: &str, prefix: IpNet, path: Path) {
        let name = self.intern(peer);
        let v = self.paths.entry(prefix.trunc()).or_default();
        match v.iter_mut().find(|(n, _)| **n == *peer) {
            Some(slot) => slot.1 = path,
            None => {
                v.reserve_exact(1);
                v.push((name, path));
            }
        }
    }

    /// Remove `peer`'s path to `prefix`; true if there was one.
    pub fn withdraw(&mut self, peer: &str, prefix: IpNet) -> bool {
        let prefix = prefix.trunc();
        let Some(v) = self.paths.get_mut(&prefix) else {
            return false;
        };
        let before = v.len();
        v.retain(|(n, _)| **n != *peer);
        let had = v.len() != before;
        if v.is_empty() {
            self.paths.remove(&prefix);
        }
        had
    }

    /// Remove every path of `peer` (session gone without graceful restart); how many.
    pub fn drop_peer(&mut self, peer: &str) -> usize {
        let n = self.retain(|p, _| p != peer);
        // The name goes when no path holds it any more.
        self.names
            .retain(|n| Arc::strong_count(n) > 1 || &**n != peer);
        n
    }

    /// Mark every path of `peer` stale (it restarts gracefully); how many.
    pub fn mark_stale(&mut self, peer: &str) -> usize {
        let mut n = 0;
        for v in self.paths.values_mut() {
            for (_, p) in v.iter_mut().filter(|(name, _)| **name == *peer) {
                p.stale = true;
                n += 1;
            }
        }
        n
    }

    /// Remove `peer`'s paths still stale (its End-of-RIB arrived, or the restart timer ran
    /// out), in one family (`Some(v6)`) or both; how many.
    pub fn sweep_stale(&mut self, peer: &str, family_v6: Option<bool>) -> usize {
        self.retain(|p, (prefix, path)| {
            !(p == peer && path.stale && family_v6.is_none_or(|v6| prefix.addr().is_ipv6() == v6))
        })
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, (&IpNet, &Path)) -> bool) -> usize {
        let mut removed = 0;
        self.paths.retain(|prefix, v| {
            v.retain(|(peer, path)| {
                let k = keep(peer, (prefix, path));
                removed += usize::from(!k);
                k
            });
            v.shrink_to_fit();
            !v.is_empty()
        });
        removed
    }

    /// Paths held from `peer`.
    pub fn count_from(&self, peer: &str) -> usize {
        self.paths
            .values()
            .filter(|v| v.iter().any(|(n, _)| **n == *peer))
            .count()
    }

    /// Number of prefixes with at least one path.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True when no path is held.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The best path of every prefix: (peer, path).
    pub fn best(&self) -> BTreeMap<IpNet, (&str, &Path)> {
        self.paths
            .iter()
            .filter_map(|(prefix, v)| {
                v.iter()
                    .min_by(|a, b| rank(&a.1, &b.1).then(a.0.cmp(&b.0)))
                    .map(|(peer, p)| (*prefix, (&**peer, p)))
            })
            .collect()
    }
}

/// The kernel routes for the best paths: `prefix via next_hop dev <underlay>`.
pub fn kernel_routes(rib: &Rib, underlay_dev: &str) -> FabricState {
    let routes: BTreeSet<FabricRoute> = rib
        .best()
        .into_iter()
        .map(|(dst, (_, p))| FabricRoute {
            dst,
            gateway: p.next_hop,
            dev: underlay_dev.to_string(),
            onlink: false,
            src: None,
        })
        .collect();
    FabricState {
        routes,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn path(nh: &str) -> Path {
        Path {
            next_hop: nh.parse().unwrap(),
            as_path_len: 2,
            origin: 0,
            med: 0,
            local_pref: 100,
            ebgp: true,
            router_id: 1,
            peer_addr: nh.parse().unwrap(),
            stale: false,
        }
    }

    #[test]
    fn best_path_follows_rfc4271_order() {
        let mut rib = Rib::default();
        let p = n("10.20.0.64/26");
        rib.announce("a", p, path("172.31.0.2"));
        let mut b = path("172.31.0.3");
        b.as_path_len = 1;
        rib.announce("b", p, b.clone());
        assert_eq!(rib.best()[&p].0, "b");
        let mut c = path("172.31.0.4");
        c.local_pref = 200;
        c.as_path_len = 5;
        rib.announce("c", p, c);
        assert_eq!(rib.best()[&p].0, "c");
        rib.withdraw("c", p);
        let mut d = b.clone();
        d.ebgp = false;
        d.router_id = 0;
        rib.announce("d", p, d);
        assert_eq!(rib.best()[&p].0, "b", "eBGP before iBGP");
        let mut e = b;
        e.router_id = 0;
        e.peer_addr = "172.31.0.9".parse().unwrap();
        rib.announce("e", p, e);
        assert_eq!(rib.best()[&p].0, "e", "lowest router id");
    }

    #[test]
    fn stale_paths_survive_until_swept_and_lose_ties() {
        let mut rib = Rib::default();
        let v4 = n("10.20.0.64/26");
        let v6 = n("fd20::40/122");
        rib.announce("a", v4, path("172.31.0.2"));
        rib.announce("a", v6, path("fd31::2"));
        rib.announce("b", v4, path("172.31.0.3"));
        assert_eq!(rib.mark_stale("a"), 2);
        assert_eq!(rib.best()[&v4].0, "b", "a fresh path beats a stale one");
        assert_eq!(rib.best()[&v6].0, "a", "a stale path still forwards");
        rib.announce("a", v4, path("172.31.0.2"));
        assert_eq!(rib.sweep_stale("a", Some(false)), 0);
        assert_eq!(rib.sweep_stale("a", Some(true)), 1);
        assert!(!rib.best().contains_key(&v6));
        assert_eq!(rib.count_from("a"), 1);
        assert_eq!(rib.drop_peer("a"), 1);
        assert_eq!(rib.len(), 1);
        assert!(!rib.withdraw("a", v4));
        assert!(rib.withdraw("b", v4));
        assert!(rib.is_empty());
    }

    #[test]
    fn kernel_routes_point_at_the_best_next_hop() {
        let mut rib = Rib::default();
        rib.announce("a", n("10.20.0.64/26"), path("172.31.0.2"));
        let k = kernel_routes(&rib, "eth0");
        let r: Vec<_> = k.routes.into_iter().collect();
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].to_string(),
            "route 10.20.0.64/26 via 172.31.0.2 dev eth0"
        );
    }
}
