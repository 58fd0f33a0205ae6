//! Per-host address blocks: carving a network's pool into blocks a host owns.
//!
//! A multi-host network's pool (its subnets) is split into fixed-size blocks (default /26 and
//! /122). A host claims blocks as it needs them and hands out addresses only from its own, so
//! hosts never coordinate per address and every other host routes a whole block to its owner.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

pub use crate::fabric::block_gateway;
use crate::fabric::{vxlan_mtu, Backend};
use crate::host::HostRecord;
use crate::ipam::overlaps;
use crate::network::{FabricSpec, Network, Subnet};

/// The first block of `pool` with prefix `len` that overlaps none of `taken`, if any is left.
/// `taken` may hold blocks of any size (claims made with another block size still count).
pub fn free_block(pool: &IpNet, len: u8, taken: &[IpNet]) -> Option<IpNet> {
    if len < pool.prefix_len() {
        return None;
    }
    let subnets = pool.subnets(len).ok()?;
    // Each skipped candidate overlaps a taken block, so this walks at most taken.len()+1 blocks
    // when claims are packed from the start, and stays cheap on a huge IPv6 pool.
    for candidate in subnets {
        match taken.iter().find(|t| overlaps(t, &candidate)) {
            None => return Some(candidate),
            Some(_) => continue,
        }
    }
    None
}

/// The block to claim next for one address family: the first free block in the first subnet
/// of that family with room.
pub fn next_block(
    subnets: &[Subnet],
    spec: &FabricSpec,
    v6: bool,
    taken: &[IpNet],
) -> Option<IpNet> {
    subnets
        .iter()
        .filter(|s| s.cidr.addr().is_ipv6() == v6)
        .find_map(|s| free_block(&s.cidr, spec.block_len(v6), taken))
}

/// A block's quarantine: its peers released it from a departed host (which may return with
/// containers still using it), so others take it last. Stored at `keys::orphan_block`; the
/// returning host takes it back first and the record goes. Store input: a record that does not
/// parse, or names a block that is not one of the pool's, is ignored (the block is then just
/// free), and a forged one can only change the order in which free blocks are taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quarantine {
    /// The host that held the block.
    pub host: String,
    /// When it was released (seconds since the Unix epoch; 0: unknown, a record of an older
    /// agent that wrote the bare host name).
    #[serde(default)]
    pub released_at: u64,
}

/// Whether `s` can be a host name in a quarantine record (what registration keys allow).
fn plausible_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

impl Quarantine {
    /// The stored form (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A stored value: the JSON record, or the bare host name older agents wrote; None when
    /// it is neither.
    pub fn parse(value: &[u8]) -> Option<Quarantine> {
        let q = match serde_json::from_slice::<Quarantine>(value) {
            Ok(q) => q,
            Err(_) => Quarantine {
                host: std::str::from_utf8(value).ok()?.to_string(),
                released_at: 0,
            },
        };
        plausible_host(&q.host).then_some(q)
    }
}

/// One quarantine record of a network's pool as read from the store (`cidr` is the key's last
/// part, `/` written `_`): None unless it names a whole block of the pool at its family's
/// block size and its value parses.
pub fn parse_quarantine(
    subnets: &[Subnet],
    spec: &FabricSpec,
    cidr: &str,
    value: &[u8],
) -> Option<(IpNet, Quarantine)> {
    let block: IpNet = cidr.replace('_', "/").parse().ok()?;
    let v6 = block.addr().is_ipv6();
    let whole = block.trunc() == block && block.prefix_len() == spec.block_len(v6);
    let in_pool = subnets.iter().any(|s| s.cidr.contains(&block));
    (whole && in_pool).then_some(())?;
    Some((block, Quarantine::parse(value)?))
}

/// This host's own quarantined blocks (released from it while it was cut off) that nobody
/// claimed since: what it takes back when it returns.
pub fn own_quarantined(
    me: &str,
    taken: &[IpNet],
    quarantined: &[(IpNet, Quarantine)],
) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = quarantined
        .iter()
        .filter(|(b, q)| q.host == me && !taken.iter().any(|t| overlaps(t, b)))
        .map(|(b, _)| *b)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The block `me` claims next for one address family, and the quarantine record it ends (if
/// any): first one of its own quarantined blocks (it returned), then the first free block
/// nobody is quarantined for, and only when none is left a block quarantined for another
/// host, the longest released first (that host is the least likely to return).
pub fn choose_block(
    subnets: &[Subnet],
    spec: &FabricSpec,
    v6: bool,
    me: &str,
    taken: &[IpNet],
    quarantined: &[(IpNet, Quarantine)],
) -> Option<(IpNet, Option<Quarantine>)> {
    let family: Vec<&(IpNet, Quarantine)> = quarantined
        .iter()
        .filter(|(b, _)| {
            b.addr().is_ipv6() == v6
                && b.prefix_len() == spec.block_len(v6)
                && subnets.iter().any(|s| s.cidr.contains(b))
                && !taken.iter().any(|t| overlaps(t, b))
        })
        .collect();
    if let Some((b, q)) = family
        .iter()
        .filter(|(_, q)| q.host == me)
        .min_by_key(|(b, _)| *b)
    {
        return Some((*b, Some(q.clone())));
    }
    let avoid: Vec<IpNet> = taken
        .iter()
        .copied()
        .chain(family.iter().map(|(b, _)| *b))
        .collect();
    if let Some(b) = next_block(subnets, spec, v6, &avoid) {
        return Some((b, None));
    }
    family
        .iter()
        .min_by_key(|(b, q)| (q.released_at, *b))
        .map(|(b, q)| (*b, Some(q.clone())))
}

/// What the spare-block decision reads about one multi-host network.
#[derive(Clone, Copy)]
pub struct SpareInput<'a> {
    /// The network as stored (its whole pool).
    pub pool: &'a Network,
    /// This host's name.
    pub me: &'a str,
    /// Every block claim of the network with its owner.
    pub claims: &'a [(IpNet, &'a str)],
    /// Hosts whose registration is live (this one included or not).
    pub live_hosts: &'a [&'a str],
    /// Whether an endpoint holds an address inside a block.
    pub in_use: &'a dyn Fn(&IpNet) -> bool,
}

/// How many blocks of prefix `len` the subnets of one family hold (saturating: an IPv6 pool
/// has more than any count needs).
fn pool_blocks(subnets: &[Subnet], v6: bool, len: u8) -> u128 {
    subnets
        .iter()
        .filter(|s| s.cidr.addr().is_ipv6() == v6 && len >= s.cidr.prefix_len())
        .map(|s| {
            1u128
                .checked_shl(u32::from(len - s.cidr.prefix_len()))
                .unwrap_or(u128::MAX)
        })
        .fold(0u128, u128::saturating_add)
}

/// The address families (false: IPv4, true: IPv6) of which this host should claim a spare
/// block now: a block claimed ahead, so a container's ADD never waits for a claim and the
/// block's route is in every peer's kernel before a container needs it.
///
/// A family wants one when this host holds blocks of it (the first is the reconciler's:
/// `ensure_blocks`) and every one of them has an endpoint in it. Scarcity rule, so a spare
/// never starves another host of its first block: a spare is claimed only when, after it, the
/// pool still has a free block for every live host without one plus one more (a host joining
/// next), and at least half of the family's blocks stay free.
pub fn spare_families(input: &SpareInput<'_>) -> Vec<bool> {
    let Some(spec) = input.pool.fabric else {
        return Vec::new();
    };
    [false, true]
        .into_iter()
        .filter(|&v6| {
            let family: Vec<&(IpNet, &str)> = input
                .claims
                .iter()
                .filter(|(b, _)| b.addr().is_ipv6() == v6)
                .collect();
            let mut mine = family.iter().filter(|(_, h)| *h == input.me).peekable();
            if mine.peek().is_none() || mine.any(|(b, _)| !(input.in_use)(b)) {
                return false;
            }
            let total = pool_blocks(&input.pool.subnets, v6, spec.block_len(v6));
            let free = total.saturating_sub(family.len() as u128);
            // Owners as a set: a thousand hosts against a thousand claims stays linear.
            let owners: BTreeSet<&str> = family.iter().map(|(_, h)| *h).collect();
            let without = input
                .live_hosts
                .iter()
                .filter(|h| **h != input.me && !owners.contains(**h))
                .count() as u128;
            // After the claim: free - 1 >= without + 1, and (free - 1) * 2 >= total.
            free >= without.saturating_add(2) && (free - 1).saturating_mul(2) >= total
        })
        .collect()
}

/// A host's view of a multi-host network's pool: one subnet per block it owns, gatewayed by
/// the block's first address, carrying the network's exclusions that fall inside it.
pub fn block_subnets(network_subnets: &[Subnet], my_blocks: &[IpNet]) -> Vec<Subnet> {
    my_blocks
        .iter()
        .map(|b| {
            let exclude = network_subnets
                .iter()
                .filter(|s| s.cidr.contains(&b.network()))
                .flat_map(|s| s.exclude.iter().copied())
                .filter(|e| overlaps(e, b))
                .collect();
            Subnet {
                cidr: *b,
                gateway: Some(block_gateway(b)),
                range_start: None,
                range_end: None,
                exclude,
            }
        })
        .collect()
}

/// True when a host's view of `pool` depends on the host's underlay: a tunnelled network
/// without an explicit MTU takes the underlay's minus the encapsulation.
pub fn view_needs_underlay(pool: &Network) -> bool {
    pool.mtu.is_none()
        && pool
            .fabric
            .is_some_and(|f| !matches!(f.backend, Backend::Route | Backend::Bgp) || f.encrypt)
}

/// The network as one host sees it: its subnets are the host's blocks (each gatewayed by its
/// first address), and over VXLAN its MTU is the host's underlay MTU minus the encapsulation.
/// Single-host networks are returned unchanged.
pub fn host_view(pool: &Network, my_blocks: &[IpNet], me: Option<&HostRecord>) -> Network {
    let mut view = pool.clone();
    if pool.fabric.is_none() {
        return view;
    }
    view.subnets = block_subnets(&pool.subnets, my_blocks);
    if let (true, Some(rec), Some(f)) = (view_needs_underlay(pool), me, pool.fabric) {
        // Encrypted and sleeve networks carry the sleeve's overhead; `auto` keeps VXLAN's and
        // relies on path MTU discovery towards peers it sends through the sleeve.
        view.mtu = Some(if f.encrypt || f.backend == Backend::Sleeve {
            crate::sleeve::sleeve_mtu(rec.underlay_mtu)
        } else {
            vxlan_mtu(rec.underlay_mtu, !rec.has_v4_underlay())
        });
    }
    view
}

/// A network as one host sees it, derived once per operation and passed down: the stored
/// record, this host's blocks of it, and the network seen through them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The network as stored (a multi-host network's whole pool).
    pub pool: Network,
    /// This host's blocks of it (none on a single-host network).
    pub blocks: Vec<IpNet>,
    /// This host's record, when the view's MTU depends on its underlay.
    pub me: Option<HostRecord>,
    /// The pool seen through the blocks: what this host plumbs and reports.
    pub net: Network,
}

impl HostView {
    /// A single-host network: the view is the network itself.
    pub fn single(net: Network) -> HostView {
        HostView {
            pool: net.clone(),
            blocks: Vec::new(),
            me: None,
            net,
        }
    }

    /// The view of `pool` through `blocks` (see [`host_view`]).
    pub fn new(pool: Network, blocks: Vec<IpNet>, me: Option<HostRecord>) -> HostView {
        let net = host_view(&pool, &blocks, me.as_ref());
        HostView {
            pool,
            blocks,
            me,
            net,
        }
    }

    /// Whether the network spans hosts (its addresses come from this host's blocks).
    pub fn is_multi_host(&self) -> bool {
        self.pool.fabric.is_some()
    }

    /// The same view with one more block.
    pub fn with_block(&self, block: IpNet) -> HostView {
        let mut blocks = self.blocks.clone();
        blocks.push(block);
        HostView::new(self.pool.clone(), blocks, self.me.clone())
    }

    /// The address families (false: IPv4, true: IPv6) the pool has and this host holds no
    /// block of yet.
    pub fn families_without_block(&self) -> Vec<bool> {
        if !self.is_multi_host() {
            return Vec::new();
        }
        [false, true]
            .into_iter()
            .filter(|&v6| {
                self.pool
                    .subnets
                    .iter()
                    .any(|s| s.cidr.addr().is_ipv6() == v6)
                    && !self.blocks.iter().any(|b| b.addr().is_ipv6() == v6)
            })
            .collect()
    }

    /// Whether every one of `ips` lies in the view's subnets.
    pub fn holds(&self, ips: &[IpNet]) -> bool {
        ips.iter()
            .all(|ip| self.net.subnets.iter().any(|s| s.cidr.contains(&ip.addr())))
    }

    /// The view to plan `requested` addresses in: this one, plus on a network that lets
    /// containers borrow addresses (`bgp::policy::may_borrow`) the blocks (owned by another
    /// host or by nobody) holding requested addresses that lie in the pool but outside this
    /// host's blocks. Their first addresses stay reserved (the owner's gateways); the address
    /// keys themselves keep two hosts from handing out one address.
    pub fn borrowing(&self, requested: &[IpAddr]) -> HostView {
        let Some(spec) = self
            .pool
            .fabric
            .filter(|_| crate::bgp::policy::may_borrow(&self.pool))
        else {
            return self.clone();
        };
        let mut blocks = self.blocks.clone();
        for ip in requested {
            let in_pool = self.pool.subnets.iter().any(|s| s.cidr.contains(ip));
            if !in_pool || blocks.iter().any(|b| b.contains(ip)) {
                continue;
            }
            if let Ok(b) = IpNet::new(*ip, spec.block_len(ip.is_ipv6())) {
                blocks.push(b.trunc());
            }
        }
        if blocks.len() == self.blocks.len() {
            return self.clone();
        }
        HostView::new(self.pool.clone(), blocks, self.me.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::Backend;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn spec() -> FabricSpec {
        FabricSpec {
            backend: Backend::Route,
            vni: 1,
            block_v4: 26,
            block_v6: 122,
            encrypt: false,
        }
    }

    #[test]
    fn requested_addresses_borrow_their_block_only_where_allowed() {
        let mut pool = Network {
            name: "fab".into(),
            mode: crate::network::NetworkMode::Routed,
            bridge: "fn-fab".into(),
            subnets: vec![Subnet::new(n("10.20.0.0/16"))],
            mtu: None,
            internal: false,
            ip_masq: true,
            fabric: Some(FabricSpec {
                backend: Backend::Bgp,
                ..spec()
            }),
            default_deny: false,
        };
        let v = HostView::new(pool.clone(), vec![n("10.20.0.64/26")], None);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let b = v.borrowing(&[a("10.20.0.9"), a("10.20.0.70"), a("192.168.0.1")]);
        assert_eq!(b.blocks, vec![n("10.20.0.64/26"), n("10.20.0.0/26")]);
        assert!(b.holds(&[n("10.20.0.9/32")]));
        assert_eq!(v.borrowing(&[a("10.20.0.70")]), v);
        // Bridged, or another backend: nothing borrowed.
        let mut bridged = pool.clone();
        bridged.mode = crate::network::NetworkMode::Bridge;
        let v = HostView::new(bridged, vec![n("10.20.0.64/26")], None);
        assert_eq!(v.borrowing(&[a("10.20.0.9")]), v);
        pool.fabric = Some(spec());
        let v = HostView::new(pool, vec![n("10.20.0.64/26")], None);
        assert_eq!(v.borrowing(&[a("10.20.0.9")]), v);
    }

    #[test]
    fn first_free_blocks_in_order() {
        let pool = n("10.20.0.0/24");
        assert_eq!(free_block(&pool, 26, &[]), Some(n("10.20.0.0/26")));
        assert_eq!(
            free_block(&pool, 26, &[n("10.20.0.0/26")]),
            Some(n("10.20.0.64/26"))
        );
        let taken = [n("10.20.0.0/26"), n("10.20.0.128/26")];
        assert_eq!(free_block(&pool, 26, &taken), Some(n("10.20.0.64/26")));
        let all: Vec<IpNet> = pool.subnets(26).unwrap().collect();
        assert_eq!(free_block(&pool, 26, &all), None);
    }

    #[test]
    fn claims_of_another_size_count() {
        let pool = n("10.20.0.0/24");
        assert_eq!(
            free_block(&pool, 26, &[n("10.20.0.0/25")]),
            Some(n("10.20.0.128/26"))
        );
        assert_eq!(
            free_block(&pool, 23, &[]),
            None,
            "block larger than the pool"
        );
    }

    #[test]
    fn v6_pool_is_cheap() {
        let pool = n("fd00:20::/64");
        let taken: Vec<IpNet> = pool.subnets(122).unwrap().take(1000).collect();
        assert_eq!(free_block(&pool, 122, &taken), Some(n("fd00:20::fa00/122")));
    }

    #[test]
    fn next_block_per_family() {
        let subnets = vec![
            Subnet::new(n("10.20.0.0/16")),
            Subnet::new(n("fd00:20::/64")),
        ];
        assert_eq!(
            next_block(&subnets, &spec(), false, &[]),
            Some(n("10.20.0.0/26"))
        );
        assert_eq!(
            next_block(&subnets, &spec(), true, &[]),
            Some(n("fd00:20::/122"))
        );
        let only_v4 = vec![Subnet::new(n("10.20.0.0/16"))];
        assert_eq!(next_block(&only_v4, &spec(), true, &[]), None);
    }

    fn q(host: &str, at: u64) -> Quarantine {
        Quarantine {
            host: host.into(),
            released_at: at,
        }
    }

    #[test]
    fn quarantined_blocks_are_taken_last_and_by_their_host_first() {
        let subnets = vec![Subnet::new(n("10.20.0.0/24")), Subnet::new(n("fd20::/64"))];
        let quarantined = vec![
            (n("10.20.0.0/26"), q("h2", 100)),
            (n("10.20.0.64/26"), q("h3", 50)),
        ];
        let taken = [n("10.20.0.128/26")];
        // Another host takes the first block nobody is quarantined for.
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h1", &taken, &quarantined),
            Some((n("10.20.0.192/26"), None))
        );
        // The returning host takes its own back, and the record goes with it.
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h2", &taken, &quarantined),
            Some((n("10.20.0.0/26"), Some(q("h2", 100))))
        );
        assert_eq!(
            own_quarantined("h2", &taken, &quarantined),
            vec![n("10.20.0.0/26")]
        );
        // Nothing else free: the one released longest ago (h3's), then the other.
        let full = [n("10.20.0.128/25")];
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h1", &full, &quarantined),
            Some((n("10.20.0.64/26"), Some(q("h3", 50))))
        );
        let more = [n("10.20.0.64/26"), n("10.20.0.128/25")];
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h1", &more, &quarantined),
            Some((n("10.20.0.0/26"), Some(q("h2", 100))))
        );
        // A quarantined block claimed since is neither reclaimed nor chosen.
        let claimed = [n("10.20.0.0/26")];
        assert!(own_quarantined("h2", &claimed, &quarantined).is_empty());
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h2", &claimed, &quarantined),
            Some((n("10.20.0.128/26"), None))
        );
        // Families stay apart.
        assert_eq!(
            choose_block(&subnets, &spec(), true, "h2", &[], &quarantined),
            Some((n("fd20::/122"), None))
        );
        // First-free order, what the quarantine replaces, would hand h2's block to h1.
        assert_eq!(
            next_block(&subnets, &spec(), false, &taken),
            Some(n("10.20.0.0/26"))
        );
    }

    #[test]
    fn malformed_or_foreign_quarantine_records_are_ignored() {
        let subnets = vec![Subnet::new(n("10.20.0.0/24"))];
        let p = |cidr: &str, v: &[u8]| parse_quarantine(&subnets, &spec(), cidr, v);
        let rec = q("h2", 7).encode();
        assert_eq!(
            p("10.20.0.64_26", &rec),
            Some((n("10.20.0.64/26"), q("h2", 7)))
        );
        // What older agents wrote: the bare host name.
        assert_eq!(
            p("10.20.0.64_26", b"h2"),
            Some((n("10.20.0.64/26"), q("h2", 0)))
        );
        for (cidr, v) in [
            ("10.20.0.64_26", &b""[..]),
            ("10.20.0.64_26", b"\xff\xfe"),
            ("10.20.0.64_26", b"h2/../x"),
            ("10.20.0.64_26", br#"{"host":"h2","releasedAt":-1}"#),
            ("10.20.0.64_26", br#"{"host":"","releasedAt":1}"#),
            ("10.20.0.64_26", br#"{"host":"h2","extra":1}"#),
            // Not a block of the pool: outside it, unaligned, another size, not a CIDR.
            ("10.99.0.0_26", &rec[..]),
            ("10.20.0.65_26", &rec[..]),
            ("10.20.0.0_25", &rec[..]),
            ("10.20.0.0_24", &rec[..]),
            ("nonsense", &rec[..]),
        ] {
            assert_eq!(p(cidr, v), None, "{cidr} {:?}", String::from_utf8_lossy(v));
        }
        // Even unvalidated, a record outside the pool or of another size is never chosen.
        let forged = vec![
            (n("10.99.0.0/26"), q("h1", 0)),
            (n("10.20.0.0/25"), q("h1", 0)),
        ];
        assert_eq!(
            choose_block(&subnets, &spec(), false, "h1", &[], &forged),
            Some((n("10.20.0.0/26"), None))
        );
    }

    #[test]
    fn host_view_takes_blocks_and_overlay_mtu() {
        let mut pool = Network {
            name: "blue".into(),
            mode: Default::default(),
            bridge: "fn-blue".into(),
            subnets: vec![Subnet::new(n("10.20.0.0/16"))],
            mtu: None,
            internal: false,
            ip_masq: true,
            fabric: Some(FabricSpec {
                backend: Backend::Vxlan,
                ..spec()
            }),
            default_deny: false,
        };
        let me = HostRecord {
            name: "h1".into(),
            underlay: vec![n("192.168.1.1/24")],
            underlay_mtu: 1500,
            capabilities: vec![],
            version: String::new(),
            started_at: 0,
            sleeve: None,
        };
        let v = host_view(&pool, &[n("10.20.0.64/26")], Some(&me));
        assert_eq!(v.subnets[0].cidr, n("10.20.0.64/26"));
        assert_eq!(v.mtu, Some(1450));
        pool.fabric = Some(spec());
        assert_eq!(
            host_view(&pool, &[], Some(&me)).mtu,
            None,
            "route keeps the MTU"
        );
        pool.fabric = None;
        assert_eq!(
            host_view(&pool, &[], None),
            pool,
            "single-host networks unchanged"
        );
    }

    #[test]
    fn block_view_has_gateway_and_exclusions() {
        let mut s = Subnet::new(n("10.20.0.0/16"));
        s.exclude = vec![n("10.20.0.10/32"), n("10.20.9.0/24")];
        let v = block_subnets(&[s], &[n("10.20.0.0/26")]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].gateway, Some("10.20.0.1".parse().unwrap()));
        assert_eq!(v[0].exclude, vec![n("10.20.0.10/32")]);
        assert_eq!(
            block_gateway(&n("fd00::40/122")),
            "fd00::41".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_host_view_grows_by_blocks_and_knows_what_it_holds() {
        let pool = Network {
            fabric: Some(spec()),
            ..Network::bridged("m", [n("10.20.0.0/24"), n("fd20::/64")])
        };
        let v = HostView::new(pool.clone(), vec![n("10.20.0.64/26")], None);
        assert!(v.is_multi_host());
        assert_eq!(v.families_without_block(), vec![true]);
        assert!(v.holds(&[n("10.20.0.70/26")]));
        assert!(!v.holds(&[n("10.20.0.130/26")]));
        let g = v
            .with_block(n("10.20.0.128/26"))
            .with_block(n("fd20::/122"));
        assert!(g.holds(&[n("10.20.0.130/26"), n("fd20::5/122")]));
        assert!(g.families_without_block().is_empty());
        assert_eq!(g.net, host_view(&pool, &g.blocks, None));
        let single = HostView::single(Network::bridged("s", [n("10.9.0.0/24")]));
        assert!(!single.is_multi_host() && single.families_without_block().is_empty());
        assert_eq!(single.net, single.pool);
    }

    fn spare_pool(cidrs: &[&str], v4: u8) -> Network {
        Network {
            fabric: Some(FabricSpec {
                backend: Backend::Bgp,
                block_v4: v4,
                ..spec()
            }),
            ..Network::bridged("sp", cidrs.iter().map(|c| n(c)))
        }
    }

    #[test]
    fn a_spare_is_wanted_once_every_block_of_the_host_is_in_use() {
        let pool = spare_pool(&["10.50.0.0/16", "fd50::/64"], 30);
        let used = [n("10.50.0.0/30"), n("10.50.0.4/30")];
        let in_use = |b: &IpNet| used.contains(b);
        let claims = [(n("10.50.0.0/30"), "h1"), (n("fd50::/122"), "h1")];
        let input = SpareInput {
            pool: &pool,
            me: "h1",
            claims: &claims,
            live_hosts: &["h1", "h2"],
            in_use: &in_use,
        };
        // The IPv4 block holds a container, the IPv6 one is still empty (it is the spare).
        assert_eq!(spare_families(&input), vec![false]);
        // With an empty IPv4 block beside the used one, nothing is wanted.
        let claims = [
            (n("10.50.0.0/30"), "h1"),
            (n("10.50.0.8/30"), "h1"),
            (n("fd50::/122"), "h1"),
        ];
        assert!(spare_families(&SpareInput {
            claims: &claims,
            ..input
        })
        .is_empty());
        // Another host's used block is not this host's business; nor is a host without blocks
        // (its first block is the reconciler's).
        let claims = [(n("10.50.0.4/30"), "h2")];
        assert!(spare_families(&SpareInput {
            claims: &claims,
            ..input
        })
        .is_empty());
        // A single-host network never has spares.
        let single = Network::bridged("s", [n("10.9.0.0/24")]);
        assert!(spare_families(&SpareInput {
            pool: &single,
            ..input
        })
        .is_empty());
    }

    #[test]
    fn spares_never_take_the_blocks_hosts_without_one_need() {
        // A /27 of /30 blocks: 8 blocks.
        let pool = spare_pool(&["10.60.0.0/27"], 30);
        let all_used = |_: &IpNet| true;
        let blocks: Vec<IpNet> = n("10.60.0.0/27").subnets(30).unwrap().collect();
        let claims_of = |owners: &[&'static str]| -> Vec<(IpNet, &'static str)> {
            blocks.iter().copied().zip(owners.iter().copied()).collect()
        };
        let want = |claims: &[(IpNet, &str)], live: &[&str]| {
            spare_families(&SpareInput {
                pool: &pool,
                me: "h1",
                claims,
                live_hosts: live,
                in_use: &all_used,
            })
        };
        // 1 of 8 claimed: after a spare 6 stay free, enough for h2..h4 and one more, and
        // more than half of the pool.
        assert_eq!(
            want(&claims_of(&["h1"]), &["h1", "h2", "h3", "h4"]),
            vec![false]
        );
        // Six hosts without a block and 7 free: after a spare 6 would be left, not one more
        // than they need.
        let seven = ["h1", "h2", "h3", "h4", "h5", "h6", "h7"];
        assert!(want(&claims_of(&["h1"]), &seven).is_empty());
        assert_eq!(want(&claims_of(&["h1"]), &seven[..6]), vec![false]);
        // 4 of 8 claimed, everyone has one: a spare would leave 3 free, under half the pool.
        assert!(want(
            &claims_of(&["h1", "h2", "h3", "h4"]),
            &["h1", "h2", "h3", "h4"]
        )
        .is_empty());
        // 3 of 8 claimed: a spare leaves 4, half of the pool: allowed.
        assert_eq!(
            want(&claims_of(&["h1", "h2", "h3"]), &["h1", "h2", "h3"]),
            vec![false]
        );
        // An exhausted pool: nothing.
        let owners = ["h1"; 8];
        assert!(want(&claims_of(&owners), &["h1"]).is_empty());
    }

    #[test]
    fn pool_blocks_counts_and_saturates() {
        let s = |c: &str| Subnet::new(n(c));
        assert_eq!(
            pool_blocks(&[s("10.0.0.0/24"), s("10.1.0.0/25")], false, 26),
            6
        );
        assert_eq!(pool_blocks(&[s("10.0.0.0/24")], false, 23), 0);
        assert_eq!(pool_blocks(&[s("fd00::/64")], true, 122), 1 << 58);
        assert_eq!(pool_blocks(&[s("fd00::/0")], true, 128), u128::MAX);
    }
}
