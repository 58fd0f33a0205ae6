//! The multi-host fabric: what one host must program so that its containers reach the address
//! blocks of the other hosts, either by plain routes over a shared link (Flannel's host-gw) or
//! through a kernel VXLAN device whose FDB and neighbour entries are all static (no multicast, no
//! learning). Pure: [`desired`] decides, [`diff`] compares with what the kernel holds, and the
//! dataplane applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ipam::overlaps;
use crate::names::{format_mac, hash12};

/// How traffic to another host's blocks travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A route to each block via the peer's underlay address (hosts share a link).
    Route,
    /// Encapsulation in VXLAN over the underlay, with static FDB and neighbour entries.
    Vxlan,
    /// Per peer: `Route` when routes reach all its blocks, else `Vxlan`, else (when the VXLAN
    /// port does not pass) `Sleeve`.
    Auto,
    /// The encrypted userspace overlay over one UDP port (`crate::sleeve`).
    Sleeve,
    /// Routes learned over BGP (the agent's speaker) from peers and routers: nothing is
    /// programmed from the store, hosts need no shared link.
    Bgp,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Route => "route",
            Backend::Vxlan => "vxlan",
            Backend::Auto => "auto",
            Backend::Sleeve => "sleeve",
            Backend::Bgp => "bgp",
        })
    }
}

/// A backend name that is not `route`, `vxlan` or `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fabric backend {0:?}: expected route, vxlan, auto, sleeve or bgp")]
pub struct BadBackend(pub String);

impl FromStr for Backend {
    type Err = BadBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "route" => Ok(Backend::Route),
            "vxlan" => Ok(Backend::Vxlan),
            "auto" => Ok(Backend::Auto),
            "sleeve" => Ok(Backend::Sleeve),
            "bgp" => Ok(Backend::Bgp),
            _ => Err(BadBackend(s.to_string())),
        }
    }
}

/// Another host of the fabric, as seen by one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The host's name.
    pub host: String,
    /// Address/prefix of the host's underlay interface, IPv4 and/or IPv6.
    pub underlay: Vec<IpNet>,
    /// The peer's VXLAN device MAC for this network.
    pub vtep_mac: [u8; 6],
    /// The address blocks the peer's containers take their addresses from.
    pub blocks: Vec<IpNet>,
}

/// Everything [`desired`] needs for one network on one host.
#[derive(Debug, Clone, Copy)]
pub struct FabricInput<'a> {
    /// This host's name (its entry in `peers`, if any, is skipped).
    pub me: &'a str,
    /// Address/prefix of this host's underlay interface(s).
    pub my_underlay: &'a [IpNet],
    /// Name of the underlay interface (routes of the route backend leave through it).
    pub underlay_dev: &'a str,
    /// Name of this network's VXLAN device.
    pub vxlan_dev: &'a str,
    /// The backend asked for.
    pub backend: Backend,
    /// All hosts of the fabric with their blocks in this network.
    pub peers: &'a [Peer],
    /// This host's own blocks in this network (their gateways source its packets through a
    /// tunnel, see [`tunnel_source`]).
    pub my_blocks: &'a [IpNet],
}

/// A route in the main table, marked with ferrynet's route protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FabricRoute {
    /// Destination (a peer's block).
    pub dst: IpNet,
    /// Next hop.
    pub gateway: IpAddr,
    /// Output interface name.
    pub dev: String,
    /// The next hop is on the link even without a matching connected route.
    pub onlink: bool,
    /// Preferred source of this host's own packets (a tunnel device has no address of its
    /// own, see [`tunnel_source`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
}

/// A static entry of a VXLAN device's forwarding database: frames for `mac` go to `dst`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FdbEntry {
    /// The VXLAN device.
    pub dev: String,
    /// A remote VTEP's MAC.
    pub mac: [u8; 6],
    /// The remote VTEP's underlay address.
    pub dst: IpAddr,
}

/// A permanent neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NeighEntry {
    /// The device.
    pub dev: String,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its MAC.
    pub mac: [u8; 6],
}

impl fmt::Display for FabricRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "route {} via {} dev {}",
            self.dst, self.gateway, self.dev
        )?;
        if self.onlink {
            f.write_str(" onlink")?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        Ok(())
    }
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fdb {} dst {} dev {}",
            format_mac(&self.mac),
            self.dst,
            self.dev
        )
    }
}

impl fmt::Display for NeighEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "neigh {} lladdr {} dev {}",
            self.ip,
            format_mac(&self.mac),
            self.dev
        )
    }
}

/// The fabric part of a host's kernel state (desired or read back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricState {
    /// Routes to peer blocks.
    pub routes: BTreeSet<FabricRoute>,
    /// VXLAN forwarding entries.
    pub fdb: BTreeSet<FdbEntry>,
    /// Neighbour entries on VXLAN devices.
    pub neigh: BTreeSet<NeighEntry>,
}

impl FabricState {
    /// Union with another state (e.g. the states of several networks).
    pub fn merge(&mut self, other: FabricState) {
        self.routes.extend(other.routes);
        self.fdb.extend(other.fdb);
        self.neigh.extend(other.neigh);
    }

    /// True when nothing is in it.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.fdb.is_empty() && self.neigh.is_empty()
    }

    /// The state after `diff` is carried out: its deletions removed, then its additions added.
    pub fn apply(&mut self, diff: &FabricDiff) {
        for r in &diff.del_routes {
            self.routes.remove(r);
        }
        for e in &diff.del_fdb {
            self.fdb.remove(e);
        }
        for n in &diff.del_neigh {
            self.neigh.remove(n);
        }
        self.routes.extend(diff.add_routes.iter().cloned());
        self.fdb.extend(diff.add_fdb.iter().cloned());
        self.neigh.extend(diff.add_neigh.iter().cloned());
    }
}

/// The outcome for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's host name.
    pub host: String,
    /// The backend used for it (`Route` or `Vxlan`, never `Auto`); `None` when nothing at all
    /// could be programmed for it.
    pub backend: Option<Backend>,
    /// Why some or all of its blocks are unreachable.
    pub errors: Vec<String>,
}

/// What to change to go from one state to another: deletions first, then additions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricDiff {
    /// Routes to add (or replace).
    pub add_routes: Vec<FabricRoute>,
    /// Routes to delete.
    pub del_routes: Vec<FabricRoute>,
    /// FDB entries to add (or replace).
    pub add_fdb: Vec<FdbEntry>,
    /// FDB entries to delete.
    pub del_fdb: Vec<FdbEntry>,
    /// Neighbour entries to add (or replace).
    pub add_neigh: Vec<NeighEntry>,
    /// Neighbour entries to delete.
    pub del_neigh: Vec<NeighEntry>,
}

impl FabricDiff {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add_routes.is_empty()
            && self.del_routes.is_empty()
            && self.add_fdb.is_empty()
            && self.del_fdb.is_empty()
            && self.add_neigh.is_empty()
            && self.del_neigh.is_empty()
    }
}

/// Entries of `desired` missing from `current` are added, entries of `current` missing from
/// `desired` deleted; each list is sorted. Deletions run before additions, so an entry that only
/// changes (a neighbour's MAC, a route's gateway) is removed and re-added.
pub fn diff(current: &FabricState, desired: &FabricState) -> FabricDiff {
    fn minus<T: Ord + Clone>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> Vec<T> {
        a.difference(b).cloned().collect()
    }
    FabricDiff {
        add_routes: minus(&desired.routes, &current.routes),
        del_routes: minus(&current.routes, &desired.routes),
        add_fdb: minus(&desired.fdb, &current.fdb),
        del_fdb: minus(&current.fdb, &desired.fdb),
        add_neigh: minus(&desired.neigh, &current.neigh),
        del_neigh: minus(&current.neigh, &desired.neigh),
    }
}

/// The VXLAN MAC of `host` on `network`: a hash of both, locally administered and unicast.
pub fn vtep_mac(host: &str, network: &str) -> [u8; 6] {
    let h = hash12(&["vtep", host, network]);
    let mut mac = [0u8; 6];
    for (i, o) in mac.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// The VXLAN device of a network: `fnx` + a hash of its name (15 bytes; `fn-`, `fnv` and `fnp`
/// are taken by bridges and veths).
pub fn vxlan_dev_name(network: &str) -> String {
    format!("fnx{}", hash12(&["vxlan", network]))
}

/// MTU of a VXLAN device over an underlay of `underlay_mtu`: 50 bytes of headers over IPv4, 70
/// over IPv6.
pub fn vxlan_mtu(underlay_mtu: u32, underlay_is_v6: bool) -> u32 {
    underlay_mtu.saturating_sub(if underlay_is_v6 { 70 } else { 50 })
}

/// The first host address of a block: the bridge's address on the host that owns it (the
/// network address itself for /31, /32, /127 and /128).
pub fn block_gateway(block: &IpNet) -> IpAddr {
    match block.trunc() {
        IpNet::V4(n) if n.prefix_len() < 31 => {
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(1)))
        }
        IpNet::V6(n) if n.prefix_len() < 127 => {
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(1)))
        }
        n => n.network(),
    }
}

/// The preferred source of this host's own packets to `dst` through a tunnel (a VXLAN device
/// or the sleeve's): the gateway of this host's first block of that family in the same network
/// (`my_blocks`, smallest first), None when it has none.
///
/// A tunnel device has no address, so without it the kernel takes another interface's: often
/// a routed network's gateway on `lo`, which the receiving host's isolation reads as a
/// container of that other network (and drops), and which no peer routes back through the
/// tunnel. This host's gateway in the destination's own network passes isolation there, is
/// inside the blocks the sleeve accepts from this host, and its replies come back the way the
/// packet went (peers route this host's blocks to it).
pub fn tunnel_source(my_blocks: &[IpNet], dst: &IpNet) -> Option<IpAddr> {
    my_blocks
        .iter()
        .filter(|b| b.addr().is_ipv6() == dst.addr().is_ipv6())
        .map(IpNet::trunc)
        .min()
        .map(|b| block_gateway(&b))
}

/// The first of my underlay subnets of the family (IPv6 if `family_v6`) that holds one of the
/// peer's underlay addresses of that family: (my subnet, truncated; the peer's address).
pub fn same_link(mine: &[IpNet], peer: &[IpNet], family_v6: bool) -> Option<(IpNet, IpAddr)> {
    for m in of_family(mine, family_v6) {
        for p in of_family(peer, family_v6) {
            if m.trunc().contains(&p.addr()) && p.addr() != m.addr() {
                return Some((m.trunc(), p.addr()));
            }
        }
    }
    None
}

/// The local address of this host's VXLAN devices: its first IPv4 underlay address, else its
/// first IPv6 one. A VXLAN device tunnels over this one family only.
pub fn vxlan_local(my_underlay: &[IpNet]) -> Option<IpAddr> {
    of_family(my_underlay, false)
        .chain(of_family(my_underlay, true))
        .map(|n| n.addr())
        .next()
}

fn of_family(nets: &[IpNet], v6: bool) -> impl Iterator<Item = &IpNet> + '_ {
    nets.iter().filter(move |n| n.addr().is_ipv6() == v6)
}

fn fam(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The routes, FDB and neighbour entries this host needs for one network, and an outcome per
/// peer (sorted by host name).
///
/// - The host itself (`peer.host == me`) is skipped. Peers are taken in host-name order; a block
///   overlapping one of an earlier peer (two blocks could share a gateway), or a VXLAN MAC used
///   by an earlier peer, is reported on the later one and skipped; a host listed twice with
///   different data is ignored altogether. So the output never holds two entries for one kernel
///   key, converges, and does not depend on the order of `peers`.
/// - Blocks are handled per family: an IPv4 block needs an IPv4 underlay path, an IPv6 block an
///   IPv6 one.
/// - `Route`: each block of the peer gets `dst=block via <peer underlay address of that family>
///   dev underlay_dev`, only if that address is inside one of my underlay subnets of the family
///   ([`same_link`]); otherwise no route and an error such as `peer h3 (192.168.2.3) is not on a
///   shared link with h1 (192.168.1.0/24): backend route cannot reach it; use vxlan or auto`.
///   A family missing on either side is an error too.
/// - `Vxlan`: the tunnel family is IPv4 when both hosts have an IPv4 underlay, else IPv6. As a
///   VXLAN device carries one family (its local address, [`vxlan_local`]: IPv4 whenever this host
///   has one), a peer lacking that family, or no underlay on either side, is an error. Each block
///   (IPv4 and IPv6 alike) gets `dst=block via block_gateway(block) dev vxlan_dev onlink` (with
///   `src` [`tunnel_source`] when this host has a block of the family) and a
///   neighbour `block_gateway(block) -> peer.vtep_mac` on `vxlan_dev`; the peer gets one FDB entry
///   `peer.vtep_mac -> peer tunnel address` on `vxlan_dev` (none when it has no block).
/// - `Auto`: per peer, `Route` when it shares a link in every family its blocks need (with no
///   block: in the tunnel family, so the IPv4 underlay decides when both have one), else `Vxlan`.
///   `PeerStatus::backend` says which was chosen.
pub fn desired(input: &FabricInput) -> (FabricState, Vec<PeerStatus>) {
    let mut state = FabricState::default();
    let mut statuses = Vec::new();
    let mut by_host: BTreeMap<&str, Vec<&Peer>> = BTreeMap::new();
    for p in input.peers.iter().filter(|p| p.host != input.me) {
        let same = by_host.entry(p.host.as_str()).or_default();
        if !same.contains(&p) {
            same.push(p);
        }
    }
    let mut owners: Vec<(IpNet, &str)> = Vec::new();
    let mut macs: BTreeMap<[u8; 6], &str> = BTreeMap::new();

    for (host, entries) in by_host {
        // BGP routes come from the speaker, not from the store.
        if input.backend == Backend::Bgp {
            statuses.push(PeerStatus {
                host: host.to_string(),
                backend: Some(Backend::Bgp),
                errors: Vec::new(),
            });
            continue;
        }
        let mut st = PeerStatus {
            host: host.to_string(),
            backend: None,
            errors: Vec::new(),
        };
        let [peer] = entries[..] else {
            st.errors.push(format!(
                "peer {host} is listed {} times with different data; all its entries are ignored",
                entries.len()
            ));
            statuses.push(st);
            continue;
        };
        let mut blocks: Vec<IpNet> = Vec::new();
        for b in peer.blocks.iter().map(IpNet::trunc) {
            if blocks.contains(&b) {
                continue;
            }
            match owners.iter().find(|(o, _)| overlaps(o, &b)) {
                Some((o, owner)) => st.errors.push(format!(
                    "block {b} of peer {host} overlaps {o} of peer {owner}; skipped"
                )),
                None => blocks.push(b),
            }
        }
        owners.extend(blocks.iter().map(|b| (*b, host)));
        let backend = match input.backend {
            Backend::Route => Backend::Route,
            Backend::Vxlan => Backend::Vxlan,
            Backend::Auto if routes_reach(input.my_underlay, peer, &blocks) => Backend::Route,
            Backend::Auto | Backend::Bgp => Backend::Vxlan,
            Backend::Sleeve => Backend::Sleeve,
        };
        let programmed = match backend {
            Backend::Vxlan => vxlan_peer(input, peer, &blocks, &mut macs, &mut state, &mut st),
            // Sleeve routes come from `sleeve::desired`, which never asks for them here.
            Backend::Sleeve => {
                st.errors
                    .push(format!("peer {host}: sleeve routes are not decided here"));
                false
            }
            _ => route_peer(input, peer, &blocks, &mut state, &mut st),
        };
        if programmed || st.errors.is_empty() {
            st.backend = Some(backend);
        }
        statuses.push(st);
    }
    (state, statuses)
}

/// The tunnel family between me and a peer (true: IPv6): IPv4 if both have IPv4, else IPv6 if
/// both have IPv6.
fn tunnel_family(mine: &[IpNet], peer: &[IpNet]) -> Option<bool> {
    let has = |n: &[IpNet], v6| of_family(n, v6).next().is_some();
    if has(mine, false) && has(peer, false) {
        Some(false)
    } else if has(mine, true) && has(peer, true) {
        Some(true)
    } else {
        None
    }
}

/// Whether the route backend reaches every block of the peer (for `Auto`).
pub fn routes_reach(mine: &[IpNet], peer: &Peer, blocks: &[IpNet]) -> bool {
    let mut families: BTreeSet<bool> = blocks.iter().map(|b| b.addr().is_ipv6()).collect();
    if families.is_empty() {
        match tunnel_family(mine, &peer.underlay) {
            Some(f) => {
                families.insert(f);
            }
            None => return false,
        }
    }
    families
        .into_iter()
        .all(|v6| same_link(mine, &peer.underlay, v6).is_some())
}

fn route_peer(
    input: &FabricInput,
    peer: &Peer,
    blocks: &[IpNet],
    state: &mut FabricState,
    st: &mut PeerStatus,
) -> bool {
    let mut programmed = false;
    for v6 in [false, true] {
        let wanted: Vec<&IpNet> = blocks.iter().filter(|b| b.addr().is_ipv6() == v6).collect();
        if wanted.is_empty() {
            continue;
        }
        if let Some((_, gw)) = same_link(input.my_underlay, &peer.underlay, v6) {
            for b in wanted {
                // The underlay device has an address: the kernel's choice is right.
                state.routes.insert(FabricRoute {
                    dst: *b,
                    gateway: gw,
                    dev: input.underlay_dev.to_string(),
                    onlink: false,
                    src: None,
                });
            }
            programmed = true;
            continue;
        }
        let mine: Vec<IpNet> = of_family(input.my_underlay, v6).map(IpNet::trunc).collect();
        let theirs: Vec<IpAddr> = of_family(&peer.underlay, v6).map(IpNet::addr).collect();
        st.errors.push(if mine.is_empty() {
            format!(
                "{} has no {} underlay address: backend route cannot reach the {} blocks of peer {} ({}); use vxlan or auto",
                input.me, fam(v6), fam(v6), peer.host, join(wanted)
            )
        } else if theirs.is_empty() {
            format!(
                "peer {} has no {} underlay address: backend route cannot reach its blocks {}; use vxlan or auto",
                peer.host, fam(v6), join(wanted)
            )
        } else {
            format!(
                "peer {} ({}) is not on a shared link with {} ({}): backend route cannot reach it; use vxlan or auto",
                peer.host, join(theirs), input.me, join(mine)
            )
        });
    }
    programmed
}

fn vxlan_peer<'p>(
    input: &FabricInput,
    peer: &'p Peer,
    blocks: &[IpNet],
    macs: &mut BTreeMap<[u8; 6], &'p str>,
    state: &mut FabricState,
    st: &mut PeerStatus,
) -> bool {
    if blocks.is_empty() {
        return false;
    }
    let mac = peer.vtep_mac;
    if mac[0] & 1 == 1 || mac == [0; 6] {
        st.errors.push(format!(
            "peer {} has an unusable VXLAN MAC {}: backend vxlan cannot reach it",
            peer.host,
            format_mac(&mac)
        ));
        return false;
    }
    if let Some(other) = macs.get(&mac) {
        st.errors.push(format!(
            "peer {} has the same VXLAN MAC {} as peer {other}: backend vxlan cannot reach it",
            peer.host,
            format_mac(&mac)
        ));
        return false;
    }
    let Some(v6) = tunnel_family(input.my_underlay, &peer.underlay) else {
        st.errors.push(format!(
            "{} ({}) and peer {} ({}) have no underlay address family in common: backend vxlan cannot reach it",
            input.me,
            join(input.my_underlay),
            peer.host,
            join(&peer.underlay)
        ));
        return false;
    };
    let local_v6 = vxlan_local(input.my_underlay).is_some_and(|a| a.is_ipv6());
    if v6 != local_v6 {
        st.errors.push(format!(
            "peer {} has no {} underlay address, the family of {}'s VXLAN device {}: backend vxlan cannot reach it",
            peer.host,
            fam(local_v6),
            input.me,
            input.vxlan_dev
        ));
        return false;
    }
    let Some(dst) = of_family(&peer.underlay, v6).map(IpNet::addr).next() else {
        return false;
    };
    macs.insert(mac, &peer.host);
    state.fdb.insert(FdbEntry {
        dev: input.vxlan_dev.to_string(),
        mac,
        dst,
    });
    for b in blocks {
        let gw = block_gateway(b);
        state.routes.insert(FabricRoute {
            dst: *b,
            gateway: gw,
            dev: input.vxlan_dev.to_string(),
            onlink: true,
            src: tunnel_source(input.my_blocks, b),
        });
        state.neigh.insert(NeighEntry {
            dev: input.vxlan_dev.to_string(),
            ip: gw,
            mac,
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn peer(host: &str, underlay: &[&str], blocks: &[&str]) -> Peer {
        Peer {
            host: host.into(),
            underlay: underlay.iter().map(|s| net(s)).collect(),
            vtep_mac: vtep_mac(host, "n"),
            blocks: blocks.iter().map(|s| net(s)).collect(),
        }
    }
    fn run(
        me: &str,
        mine: &[&str],
        backend: Backend,
        peers: &[Peer],
    ) -> (FabricState, Vec<PeerStatus>) {
        let my: Vec<IpNet> = mine.iter().map(|s| net(s)).collect();
        desired(&FabricInput {
            me,
            my_underlay: &my,
            underlay_dev: "eth0",
            vxlan_dev: "fnx0",
            backend,
            peers,
            my_blocks: &[],
        })
    }
    fn route(dst: &str, gw: &str, dev: &str, onlink: bool) -> FabricRoute {
        FabricRoute {
            dst: net(dst),
            gateway: ip(gw),
            dev: dev.into(),
            onlink,
            src: None,
        }
    }
    fn status<'a>(s: &'a [PeerStatus], host: &str) -> &'a PeerStatus {
        s.iter().find(|p| p.host == host).unwrap()
    }

    const H1: [&str; 2] = ["192.168.1.1/24", "fd00:1::1/64"];

    fn lan() -> Vec<Peer> {
        vec![
            peer("h1", &H1, &["10.1.1.0/24", "fd10:1:1::/64"]),
            peer(
                "h2",
                &["192.168.1.2/24", "fd00:1::2/64"],
                &["10.1.2.0/24", "fd10:1:2::/64"],
            ),
        ]
    }

    #[test]
    fn backend_names() {
        for b in [Backend::Route, Backend::Vxlan, Backend::Auto, Backend::Bgp] {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
            assert_eq!(serde_json::to_string(&b).unwrap(), format!("\"{b}\""));
        }
        assert_eq!(" VXLAN ".parse::<Backend>().unwrap(), Backend::Vxlan);
        assert!("ospf"
            .parse::<Backend>()
            .unwrap_err()
            .to_string()
            .contains("ospf"));
        assert_eq!(
            serde_json::from_str::<Backend>("\"auto\"").unwrap(),
            Backend::Auto
        );
    }

    #[test]
    fn route_backend_v4_and_v6_skips_self() {
        let (s, st) = run("h1", &H1, Backend::Route, &lan());
        let want: BTreeSet<_> = [
            route("10.1.2.0/24", "192.168.1.2", "eth0", false),
            route("fd10:1:2::/64", "fd00:1::2", "eth0", false),
        ]
        .into();
        assert_eq!(s.routes, want);
        assert!(s.fdb.is_empty() && s.neigh.is_empty());
        assert_eq!(st.len(), 1, "self is skipped");
        assert_eq!(st[0].host, "h2");
        assert_eq!(st[0].backend, Some(Backend::Route));
        assert!(st[0].errors.is_empty());
    }

    #[test]
    fn route_backend_refuses_peers_off_link() {
        let mut peers = lan();
        peers.push(peer("h3", &["192.168.2.3/24"], &["10.1.3.0/24"]));
        let (s, st) = run("h1", &["192.168.1.1/24"], Backend::Route, &peers);
        assert!(!s.routes.iter().any(|r| r.dst == net("10.1.3.0/24")));
        let h3 = status(&st, "h3");
        assert_eq!(h3.backend, None);
        assert_eq!(
            h3.errors,
            vec!["peer h3 (192.168.2.3) is not on a shared link with h1 (192.168.1.0/24): backend route cannot reach it; use vxlan or auto"]
        );
        // h2's IPv6 block cannot be routed: h1 has no IPv6 underlay; its IPv4 block still is.
        let h2 = status(&st, "h2");
        assert_eq!(h2.backend, Some(Backend::Route));
        assert_eq!(h2.errors.len(), 1);
        assert!(
            h2.errors[0].starts_with("h1 has no IPv6 underlay address"),
            "{:?}",
            h2.errors
        );
        assert!(s
            .routes
            .contains(&route("10.1.2.0/24", "192.168.1.2", "eth0", false)));
        assert_eq!(s.routes.len(), 1);
    }

    #[test]
    fn route_backend_peer_without_family() {
        let peers = vec![peer(
            "h2",
            &["192.168.1.2/24"],
            &["10.1.2.0/24", "fd10:1:2::/64"],
        )];
        let (s, st) = run("h1", &H1, Backend::Route, &peers);
        assert_eq!(s.routes.len(), 1);
        assert!(st[0].errors[0].starts_with("peer h2 has no IPv6 underlay address"));
    }

    #[test]
    fn vxlan_backend_v4_and_v6_blocks_over_v4() {
        let (s, st) = run("h1", &H1, Backend::Vxlan, &lan());
        let mac = vtep_mac("h2", "n");
        let want: BTreeSet<_> = [
            route("10.1.2.0/24", "10.1.2.1", "fnx0", true),
            route("fd10:1:2::/64", "fd10:1:2::1", "fnx0", true),
        ]
        .into();
        assert_eq!(s.routes, want);
        let fdb: BTreeSet<_> = [FdbEntry {
            dev: "fnx0".into(),
            mac,
            dst: ip("192.168.1.2"),
        }]
        .into();
        assert_eq!(s.fdb, fdb);
        let neigh: BTreeSet<_> = [
            NeighEntry {
                dev: "fnx0".into(),
                ip: ip("10.1.2.1"),
                mac,
            },
            NeighEntry {
                dev: "fnx0".into(),
                ip: ip("fd10:1:2::1"),
                mac,
            },
        ]
        .into();
        assert_eq!(s.neigh, neigh);
        assert_eq!(st[0].backend, Some(Backend::Vxlan));
        assert!(st[0].errors.is_empty());
    }

    #[test]
    fn tunnel_source_is_my_gateway_of_the_family() {
        let mine = [
            net("10.1.1.64/26"),
            net("fd10:1:1::/64"),
            net("10.1.1.0/26"),
        ];
        // The smallest block of the family, whatever the order.
        assert_eq!(
            tunnel_source(&mine, &net("10.1.2.0/24")),
            Some(ip("10.1.1.1"))
        );
        assert_eq!(
            tunnel_source(&mine, &net("fd10:1:2::/64")),
            Some(ip("fd10:1:1::1"))
        );
        // No block of the family: the kernel keeps its choice.
        assert_eq!(tunnel_source(&mine[..1], &net("fd10:1:2::/64")), None);
        assert_eq!(tunnel_source(&[], &net("10.1.2.0/24")), None);
    }

    #[test]
    fn vxlan_routes_leave_from_my_gateway_route_routes_from_the_underlay() {
        let my_underlay = [net("192.168.1.1/24")];
        let blocks = [net("10.1.1.0/24")];
        let input = |backend| FabricInput {
            me: "h1",
            my_underlay: &my_underlay,
            underlay_dev: "eth0",
            vxlan_dev: "fnx0",
            backend,
            peers: &[],
            my_blocks: &blocks,
        };
        let peers = lan();
        let (s, _) = desired(&FabricInput {
            peers: &peers,
            ..input(Backend::Vxlan)
        });
        let srcs: Vec<_> = s.routes.iter().map(|r| (r.dst, r.src)).collect();
        // The IPv6 block gets none: this host has no IPv6 block.
        assert_eq!(
            srcs,
            vec![
                (net("10.1.2.0/24"), Some(ip("10.1.1.1"))),
                (net("fd10:1:2::/64"), None)
            ]
        );
        assert!(s
            .routes
            .first()
            .unwrap()
            .to_string()
            .ends_with(" src 10.1.1.1"));
        let (s, _) = desired(&FabricInput {
            peers: &peers,
            ..input(Backend::Route)
        });
        assert!(!s.routes.is_empty());
        assert!(s.routes.iter().all(|r| r.src.is_none()), "{:?}", s.routes);
    }

    #[test]
    fn vxlan_backend_over_v6_and_family_errors() {
        let peers = vec![
            peer("h2", &["fd00:9::2/64"], &["10.1.2.0/24"]),
            peer("h3", &["192.168.7.3/24"], &["10.1.3.0/24"]),
        ];
        // An IPv6-only host tunnels over IPv6, even to a peer on another subnet.
        let (s, st) = run("h1", &["fd00:1::1/64"], Backend::Vxlan, &peers);
        assert_eq!(
            s.fdb.iter().map(|e| e.dst).collect::<Vec<_>>(),
            vec![ip("fd00:9::2")]
        );
        assert_eq!(status(&st, "h2").backend, Some(Backend::Vxlan));
        let h3 = status(&st, "h3");
        assert_eq!(h3.backend, None);
        assert!(
            h3.errors[0].contains("no underlay address family in common"),
            "{:?}",
            h3.errors
        );
        // A dual-stack host's device is IPv4: an IPv6-only peer cannot be reached through it.
        let (s, st) = run("h1", &H1, Backend::Vxlan, &peers);
        assert_eq!(s.fdb.len(), 1);
        let h2 = status(&st, "h2");
        assert_eq!(h2.backend, None);
        assert!(
            h2.errors[0].contains("no IPv4 underlay address, the family of h1's VXLAN device fnx0"),
            "{:?}",
            h2.errors
        );
        assert_eq!(status(&st, "h3").backend, Some(Backend::Vxlan));
    }

    #[test]
    fn auto_picks_route_on_link_and_vxlan_elsewhere() {
        let mut peers = lan();
        peers.push(peer(
            "h3",
            &["192.168.2.3/24", "fd00:2::3/64"],
            &["10.1.3.0/24", "fd10:1:3::/64"],
        ));
        let (s, st) = run("h1", &H1, Backend::Auto, &peers);
        assert_eq!(status(&st, "h2").backend, Some(Backend::Route));
        assert_eq!(status(&st, "h3").backend, Some(Backend::Vxlan));
        assert!(st.iter().all(|p| p.errors.is_empty()));
        assert!(s
            .routes
            .contains(&route("10.1.2.0/24", "192.168.1.2", "eth0", false)));
        assert!(s
            .routes
            .contains(&route("fd10:1:2::/64", "fd00:1::2", "eth0", false)));
        assert!(s
            .routes
            .contains(&route("10.1.3.0/24", "10.1.3.1", "fnx0", true)));
        assert!(s
            .routes
            .contains(&route("fd10:1:3::/64", "fd10:1:3::1", "fnx0", true)));
        assert_eq!(s.fdb.len(), 1);
        assert_eq!(s.neigh.len(), 2);
    }

    #[test]
    fn auto_uses_vxlan_when_one_family_is_off_link() {
        // Same IPv4 link, but the IPv6 block has no IPv6 path: routes cannot reach all of it.
        let peers = vec![peer(
            "h2",
            &["192.168.1.2/24"],
            &["10.1.2.0/24", "fd10:1:2::/64"],
        )];
        let (s, st) = run("h1", &H1, Backend::Auto, &peers);
        assert_eq!(st[0].backend, Some(Backend::Vxlan));
        assert!(s.routes.iter().all(|r| r.dev == "fnx0" && r.onlink));
        // A peer without blocks: the IPv4 underlay decides, and nothing is programmed.
        let peers = vec![peer("h2", &["192.168.1.2/24"], &[])];
        let (s, st) = run("h1", &H1, Backend::Auto, &peers);
        assert_eq!(st[0].backend, Some(Backend::Route));
        assert!(s.is_empty());
        let (s, st) = run("h1", &H1, Backend::Vxlan, &peers);
        assert_eq!(st[0].backend, Some(Backend::Vxlan));
        assert!(s.is_empty(), "no FDB entry for a peer without blocks");
    }

    #[test]
    fn conflicts_are_reported_on_the_later_peer() {
        let mut a = peer("ha", &["192.168.1.2/24"], &["10.1.2.0/24"]);
        let mut b = peer("hb", &["192.168.1.3/24"], &["10.1.2.0/24", "10.1.3.0/24"]);
        b.vtep_mac = a.vtep_mac;
        for peers in [
            vec![b.clone(), a.clone()],
            vec![a.clone(), b.clone(), a.clone()],
        ] {
            let (s, st) = run("h1", &H1, Backend::Route, &peers);
            let want: BTreeSet<_> = [
                route("10.1.2.0/24", "192.168.1.2", "eth0", false),
                route("10.1.3.0/24", "192.168.1.3", "eth0", false),
            ]
            .into();
            assert_eq!(s.routes, want);
            assert_eq!(st.len(), 2, "an identical duplicate counts once");
            let hb = status(&st, "hb");
            assert_eq!(
                hb.errors,
                vec!["block 10.1.2.0/24 of peer hb overlaps 10.1.2.0/24 of peer ha; skipped"]
            );
            assert_eq!(hb.backend, Some(Backend::Route));
        }
        // A host listed twice with different data is ignored.
        let other = peer("ha", &["192.168.1.9/24"], &["10.1.9.0/24"]);
        let (s, st) = run("h1", &H1, Backend::Route, &[a.clone(), other]);
        assert!(s.is_empty());
        assert_eq!(st[0].backend, None);
        assert!(st[0].errors[0].contains("listed 2 times"));
        // Duplicate VXLAN MACs: the later peer is refused.
        a.blocks = vec![net("10.1.2.0/24")];
        b.blocks = vec![net("10.1.3.0/24")];
        let (s, st) = run("h1", &H1, Backend::Vxlan, &[b, a]);
        assert_eq!(s.fdb.len(), 1);
        assert_eq!(s.routes.len(), 1);
        assert!(status(&st, "hb").errors[0].contains("same VXLAN MAC"));
        assert_eq!(status(&st, "hb").backend, None);
    }

    #[test]
    fn helpers() {
        assert_eq!(block_gateway(&net("10.1.2.0/24")), ip("10.1.2.1"));
        assert_eq!(block_gateway(&net("10.1.2.77/24")), ip("10.1.2.1"));
        assert_eq!(block_gateway(&net("fd10::/64")), ip("fd10::1"));
        assert_eq!(block_gateway(&net("10.1.2.4/31")), ip("10.1.2.4"));
        assert_eq!(block_gateway(&net("10.1.2.5/32")), ip("10.1.2.5"));
        assert_eq!(block_gateway(&net("fd10::5/128")), ip("fd10::5"));
        assert_eq!(vxlan_mtu(1500, false), 1450);
        assert_eq!(vxlan_mtu(1500, true), 1430);
        assert_eq!(vxlan_mtu(20, true), 0);
        let n = vxlan_dev_name("a-very-long-network-name-indeed");
        assert!(n.starts_with("fnx") && n.len() == 15);
        assert_ne!(vxlan_dev_name("a"), vxlan_dev_name("b"));
        assert_eq!(vxlan_dev_name("a"), vxlan_dev_name("a"));
        assert_eq!(
            same_link(
                &[net("192.168.1.1/24"), net("fd00:1::1/64")],
                &[net("fd00:1::2/64"), net("192.168.1.2/24")],
                false
            ),
            Some((net("192.168.1.0/24"), ip("192.168.1.2")))
        );
        assert_eq!(
            same_link(
                &[net("192.168.1.1/24"), net("fd00:1::1/64")],
                &[net("fd00:1::2/64")],
                true
            ),
            Some((net("fd00:1::/64"), ip("fd00:1::2")))
        );
        assert_eq!(
            same_link(&[net("192.168.1.1/24")], &[net("192.168.2.2/24")], false),
            None
        );
        assert_eq!(
            same_link(&[net("192.168.1.1/24")], &[net("192.168.1.1/24")], false),
            None
        );
        assert_eq!(
            vxlan_local(&[net("fd00::1/64"), net("10.0.0.1/8")]),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(vxlan_local(&[net("fd00::1/64")]), Some(ip("fd00::1")));
        assert_eq!(vxlan_local(&[]), None);
    }

    #[test]
    fn vtep_macs_are_unicast_local_and_distinct() {
        let m = vtep_mac("h1", "n");
        assert_eq!(m, vtep_mac("h1", "n"));
        assert_ne!(m, vtep_mac("h1", "m"));
        assert_ne!(m, vtep_mac("h2", "n"));
        assert_ne!(vtep_mac("h1n", ""), vtep_mac("h1", "n"));
        assert_eq!(m[0] & 0x03, 0x02);
        assert!(crate::names::parse_mac(&format_mac(&m)).is_ok());
    }

    #[test]
    fn display_and_diff_basics() {
        let r = route("10.1.2.0/24", "10.1.2.1", "fnx0", true);
        assert_eq!(
            r.to_string(),
            "route 10.1.2.0/24 via 10.1.2.1 dev fnx0 onlink"
        );
        let e = FdbEntry {
            dev: "fnx0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            dst: ip("192.168.1.2"),
        };
        assert_eq!(
            e.to_string(),
            "fdb 02:00:00:00:00:01 dst 192.168.1.2 dev fnx0"
        );
        let mut a = FabricState::default();
        a.routes.insert(r.clone());
        let mut b = FabricState::default();
        b.fdb.insert(e.clone());
        let d = diff(&a, &b);
        assert_eq!(
            (d.del_routes.clone(), d.add_fdb.clone()),
            (vec![r], vec![e])
        );
        assert!(d.add_routes.is_empty() && d.del_fdb.is_empty() && !d.is_empty());
        let mut m = a.clone();
        m.merge(b.clone());
        assert_eq!((m.routes.len(), m.fdb.len()), (1, 1));
        m.merge(b);
        assert_eq!(m.fdb.len(), 1);
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..4).prop_map(|x| IpAddr::V4(Ipv4Addr::new(10, 0, 0, x))),
            (0u16..4).prop_map(|x| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x))),
        ]
    }
    fn arb_state() -> impl Strategy<Value = FabricState> {
        let dev = prop_oneof![Just("a".to_string()), Just("b".to_string())];
        let mac = (0u8..3).prop_map(|x| [2, 0, 0, 0, 0, x]);
        let route =
            (arb_ip(), arb_ip(), dev.clone(), any::<bool>()).prop_map(|(d, g, dev, onlink)| {
                FabricRoute {
                    dst: IpNet::new(d, if d.is_ipv4() { 32 } else { 128 }).unwrap(),
                    gateway: g,
                    dev,
                    onlink,
                    src: None,
                }
            });
        let fdb = (dev.clone(), mac.clone(), arb_ip()).prop_map(|(dev, mac, dst)| FdbEntry {
            dev,
            mac,
            dst,
        });
        let neigh = (dev, arb_ip(), mac).prop_map(|(dev, ip, mac)| NeighEntry { dev, ip, mac });
        (
            proptest::collection::btree_set(route, 0..6),
            proptest::collection::btree_set(fdb, 0..6),
            proptest::collection::btree_set(neigh, 0..6),
        )
            .prop_map(|(routes, fdb, neigh)| FabricState { routes, fdb, neigh })
    }

    fn arb_peers() -> impl Strategy<Value = Vec<Peer>> {
        let underlay = proptest::collection::vec(
            prop_oneof![
                (1u8..3, 2u8..6).prop_map(|(s, h)| net(&format!("192.168.{s}.{h}/24"))),
                (1u16..3, 2u16..6).prop_map(|(s, h)| net(&format!("fd00:{s}::{h}/64"))),
            ],
            0..3,
        );
        let blocks = proptest::collection::vec(
            prop_oneof![
                (0u8..3).prop_map(|b| net(&format!("10.1.{b}.0/24"))),
                Just(net("10.1.0.0/16")),
                (0u16..3).prop_map(|b| net(&format!("fd10:1:{b}::/64"))),
            ],
            0..3,
        );
        proptest::collection::vec(((0u8..5), underlay, blocks, 0u8..4), 0..6).prop_map(|v| {
            v.into_iter()
                .map(|(h, underlay, blocks, m)| Peer {
                    host: format!("h{h}"),
                    underlay,
                    vtep_mac: [2, 0, 0, 0, 1, m],
                    blocks,
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn diff_of_equal_states_is_empty(a in arb_state()) {
            prop_assert!(diff(&a, &a).is_empty());
        }

        #[test]
        fn applying_a_diff_reaches_the_target(a in arb_state(), b in arb_state()) {
            let d = diff(&a, &b);
            let mut x = a.clone();
            x.apply(&d);
            prop_assert_eq!(&x, &b);
            prop_assert!(diff(&x, &b).is_empty());
            prop_assert_eq!(d.is_empty(), a == b);
        }

        #[test]
        fn desired_is_deterministic_and_keys_are_unique(
            peers in arb_peers(),
            mine in proptest::sample::select(vec![
                vec!["192.168.1.1/24", "fd00:1::1/64"],
                vec!["192.168.1.1/24"],
                vec!["fd00:1::1/64"],
                vec![],
            ]),
            backend in proptest::sample::select(vec![Backend::Route, Backend::Vxlan, Backend::Auto]),
        ) {
            let (s, st) = run("h0", &mine, backend, &peers);
            let mut rev = peers.clone();
            rev.reverse();
            let (s2, st2) = run("h0", &mine, backend, &rev);
            prop_assert_eq!(&s, &s2);
            prop_assert_eq!(&st, &st2);
            prop_assert!(st.iter().all(|p| p.host != "h0" && p.backend != Some(Backend::Auto)));
            prop_assert!(st.windows(2).all(|w| w[0].host < w[1].host));
            let dsts: BTreeSet<_> = s.routes.iter().map(|r| r.dst).collect();
            prop_assert_eq!(dsts.len(), s.routes.len());
            let nk: BTreeSet<_> = s.neigh.iter().map(|n| (&n.dev, n.ip)).collect();
            prop_assert_eq!(nk.len(), s.neigh.len());
            let fk: BTreeSet<_> = s.fdb.iter().map(|f| (&f.dev, f.mac)).collect();
            prop_assert_eq!(fk.len(), s.fdb.len());
            // Every route of the route backend goes via an on-link peer address; every VXLAN
            // route has its neighbour entry.
            for r in &s.routes {
                if r.dev == "eth0" {
                    prop_assert!(!r.onlink);
                    prop_assert!(mine.iter().any(|m| net(m).trunc().contains(&r.gateway)));
                } else {
                    prop_assert!(r.onlink);
                    prop_assert_eq!(r.gateway, block_gateway(&r.dst));
                    prop_assert!(s.neigh.iter().any(|n| n.ip == r.gateway));
                }
            }
            // A peer whose status says "nothing" has nothing programmed.
            for p in st.iter().filter(|p| p.backend.is_none()) {
                prop_assert!(!p.errors.is_empty());
            }
        }
    }
}
