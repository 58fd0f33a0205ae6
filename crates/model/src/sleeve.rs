//! The sleeve: an encrypted userspace overlay (WireGuard's protocol) over one UDP port, for
//! peers no kernel tunnel reaches. Pure: which peers the datapath knows (keys, endpoints, the
//! blocks they may send from), which backend carries traffic to each peer and why, and the
//! routes into the sleeve's TUN device.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::fabric::{
    block_gateway, desired as fabric_desired, routes_reach, tunnel_source, Backend, FabricInput,
    FabricRoute, FabricState, Peer, PeerStatus,
};
use crate::host::HostRecord;

/// The sleeve's UDP port unless the agent is told otherwise (Weave's sleeve port).
pub const SLEEVE_PORT: u16 = 6784;

/// The file in the state directory holding this host's private key (mode 0600).
pub const KEY_FILE_NAME: &str = "sleeve.key";

/// The TUN device every sleeve route leads into (`fns` is ferrynet's sleeve prefix).
pub const SLEEVE_DEV: &str = "fns0";

/// Bytes the sleeve adds to an inner packet: outer IPv6 (40) + UDP (8) + WireGuard's data
/// header and tag (32) + the relay envelope (12, [`path::RELAY_HEADER`]). Counted for IPv6 and
/// a relayed path so one MTU serves every peer however it is reached.
pub const SLEEVE_OVERHEAD: u32 = 92;

/// Probes over the VXLAN port left unanswered before `auto` sends a peer through the sleeve.
pub const PROBE_MISSES: u32 = 3;

/// The first bytes of a VXLAN path probe (never a WireGuard message: those start with a type
/// 1-4 followed by three zero bytes).
pub const PROBE_MAGIC: &[u8; 8] = b"FNPROBE1";

/// MTU of the sleeve (and of containers of sleeve and encrypted networks) over an underlay of
/// `underlay_mtu`.
pub fn sleeve_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(SLEEVE_OVERHEAD)
}

/// What a host registers about its sleeve in its host record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SleeveRecord {
    /// The host's static X25519 public key, base64 (the private key never leaves the host).
    pub public_key: String,
    /// The UDP port the sleeve listens on (every underlay address).
    pub port: u16,
}

/// A key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a sleeve key (32 bytes, base64): {0:?}")]
pub struct BadKey(pub String);

/// Decode a base64 X25519 key.
pub fn decode_key(s: &str) -> Result<[u8; 32], BadKey> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| BadKey(s.chars().take(64).collect()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| BadKey(s.chars().take(64).collect()))
}

/// Encode an X25519 key as base64 (WireGuard's spelling).
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// A peer as the datapath knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SleevePeer {
    /// The peer's host name.
    pub host: String,
    /// Its static public key.
    pub public_key: [u8; 32],
    /// Where to reach it until it is heard from (its registered underlay addresses, IPv4
    /// first); an authenticated packet from elsewhere replaces this (roaming, NAT).
    pub endpoints: Vec<SocketAddr>,
    /// The blocks whose addresses it may send from (its blocks in every multi-host network).
    pub allowed: Vec<IpNet>,
}

/// The datapath's peers: every other host with a sleeve record. A key registered by two hosts
/// is refused for both (one could otherwise impersonate the other); returned as errors.
pub fn peers<'a>(
    me: &str,
    hosts: impl IntoIterator<Item = &'a HostRecord>,
    blocks_of: &BTreeMap<String, Vec<IpNet>>,
) -> (Vec<SleevePeer>, Vec<String>) {
    let mut by_key: BTreeMap<[u8; 32], Vec<SleevePeer>> = BTreeMap::new();
    let mut errors = Vec::new();
    for h in hosts {
        let Some(rec) = &h.sleeve else { continue };
        let key = match decode_key(&rec.public_key) {
            Ok(k) => k,
            Err(e) => {
                errors.push(format!("host {}: {e}", h.name));
                continue;
            }
        };
        let mut endpoints: Vec<SocketAddr> = h
            .underlay
            .iter()
            .map(|n| SocketAddr::new(n.addr(), rec.port))
            .collect();
        endpoints.sort_by_key(|e| e.is_ipv6());
        by_key.entry(key).or_default().push(SleevePeer {
            host: h.name.clone(),
            public_key: key,
            endpoints,
            allowed: blocks_of.get(&h.name).cloned().unwrap_or_default(),
        });
    }
    let mut out = Vec::new();
    for (_, mut same) in by_key {
        same.sort_by(|a, b| a.host.cmp(&b.host));
        same.dedup_by(|a, b| a.host == b.host);
        if same.iter().any(|p| p.host == me) {
            if same.len() > 1 {
                errors.push(format!(
                    "hosts {} register this host's sleeve key; refused",
                    names(&same, me)
                ));
            }
            continue;
        }
        match <[SleevePeer; 1]>::try_from(same) {
            Ok([p]) => out.push(p),
            Err(same) => errors.push(format!(
                "hosts {} register one sleeve key; all refused",
                names(&same, "")
            )),
        }
    }
    out.sort_by(|a, b| a.host.cmp(&b.host));
    (out, errors)
}

fn names(peers: &[SleevePeer], skip: &str) -> String {
    peers
        .iter()
        .filter(|p| p.host != skip)
        .map(|p| p.host.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the VXLAN path probe has found for a peer so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum Probe {
    /// Not probed yet.
    #[default]
    Pending,
    /// The last probe was answered.
    Answered,
    /// This many probes in a row went unanswered.
    Silent {
        /// Consecutive misses.
        misses: u32,
    },
}

impl Probe {
    /// The state after one more probe.
    pub fn after(self, answered: bool) -> Probe {
        match (answered, self) {
            (true, _) => Probe::Answered,
            (false, Probe::Silent { misses }) => Probe::Silent {
                misses: misses.saturating_add(1),
            },
            (false, _) => Probe::Silent { misses: 1 },
        }
    }
}

/// The backend chosen for one peer and why (shown by `ferrynet status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// `Route`, `Vxlan` or `Sleeve`.
    pub backend: Backend,
    /// Why, in a sentence.
    pub reason: String,
}

/// How one network's traffic travels to `peer`.
///
/// - `--encrypt` or backend `sleeve`: the sleeve, always (without the peer's key the traffic is
///   dropped in the sleeve, never sent in clear).
/// - `route`, `vxlan`: themselves.
/// - `auto`: route when routes reach all the peer's blocks; else the sleeve when the VXLAN
///   probe went unanswered [`PROBE_MISSES`] times in a row and the peer has a sleeve key; else
///   VXLAN.
pub fn choose(
    backend: Backend,
    encrypt: bool,
    my_underlay: &[IpNet],
    peer: &Peer,
    peer_has_sleeve: bool,
    probe: Probe,
) -> Choice {
    let c = |backend, reason: &str| Choice {
        backend,
        reason: reason.to_string(),
    };
    if encrypt {
        return c(
            Backend::Sleeve,
            "the network is encrypted: every peer through the sleeve",
        );
    }
    match backend {
        Backend::Sleeve => c(Backend::Sleeve, "backend sleeve"),
        Backend::Route => c(Backend::Route, "backend route"),
        Backend::Vxlan => c(Backend::Vxlan, "backend vxlan"),
        Backend::Bgp => c(Backend::Bgp, "backend bgp: routes from the BGP speaker"),
        Backend::Auto if routes_reach(my_underlay, peer, &peer.blocks) => {
            c(Backend::Route, "shares an underlay link in every family its blocks need")
        }
        Backend::Auto => match probe {
            Probe::Silent { misses } if misses >= PROBE_MISSES && peer_has_sleeve => Choice {
                backend: Backend::Sleeve,
                reason: format!(
                    "no answer over the VXLAN port ({misses} probes in a row): only the sleeve port passes"
                ),
            },
            Probe::Silent { misses } if misses >= PROBE_MISSES => c(
                Backend::Vxlan,
                "no answer over the VXLAN port, and the peer has no sleeve key",
            ),
            Probe::Answered => c(Backend::Vxlan, "not on a shared link; the VXLAN probe was answered"),
            _ => c(Backend::Vxlan, "not on a shared link; VXLAN probe pending"),
        },
    }
}

/// The route into the sleeve for a block: via its gateway, on-link on the TUN device (which
/// has no neighbours, so the gateway only keeps the route's shape the fabric's), from this
/// host's gateway in the network ([`tunnel_source`] of `my_blocks`: the TUN device has no
/// address, and the peer accepts only this host's blocks as sources).
pub fn sleeve_route(block: IpNet, dev: &str, my_blocks: &[IpNet]) -> FabricRoute {
    let dst = block.trunc();
    FabricRoute {
        dst,
        gateway: block_gateway(&block),
        dev: dev.to_string(),
        onlink: true,
        src: tunnel_source(my_blocks, &dst),
    }
}

/// The fabric state and peer outcomes of one network given a backend choice per peer.
///
/// Route and VXLAN peers are programmed by [`crate::fabric::desired`]; sleeve peers get
/// [`sleeve_route`]s, and on `auto` networks keep their VXLAN FDB and neighbour entries (no
/// route), so the probe can still find out when the VXLAN port passes again.
pub fn desired(
    input: &FabricInput,
    sleeve_dev: &str,
    choices: &BTreeMap<String, Choice>,
) -> (FabricState, Vec<PeerStatus>) {
    let mut state = FabricState::default();
    let mut statuses = Vec::new();
    let chosen = |p: &Peer| {
        choices
            .get(&p.host)
            .map(|c| c.backend)
            .unwrap_or(Backend::Vxlan)
    };
    for backend in [Backend::Route, Backend::Vxlan, Backend::Bgp] {
        let peers: Vec<Peer> = input
            .peers
            .iter()
            .filter(|p| chosen(p) == backend)
            .cloned()
            .collect();
        if peers.is_empty() {
            continue;
        }
        let (s, st) = fabric_desired(&FabricInput {
            backend,
            peers: &peers,
            ..*input
        });
        state.merge(s);
        statuses.extend(st);
    }
    let sleeved: Vec<Peer> = input
        .peers
        .iter()
        .filter(|p| p.host != input.me && chosen(p) == Backend::Sleeve)
        .cloned()
        .collect();
    if input.backend == Backend::Auto && !sleeved.is_empty() {
        let (s, _) = fabric_desired(&FabricInput {
            backend: Backend::Vxlan,
            peers: &sleeved,
            ..*input
        });
        state.fdb.extend(s.fdb);
        state.neigh.extend(s.neigh);
    }
    let mut taken: BTreeSet<IpNet> = state.routes.iter().map(|r| r.dst).collect();
    let mut seen = BTreeSet::new();
    for p in &sleeved {
        if !seen.insert(p.host.as_str()) {
            continue;
        }
        let mut st = PeerStatus {
            host: p.host.clone(),
            backend: Some(Backend::Sleeve),
            errors: Vec::new(),
        };
        for b in &p.blocks {
            let b = b.trunc();
            if taken.iter().any(|t| crate::ipam::overlaps(t, &b)) {
                st.errors.push(format!(
                    "block {b} of peer {} overlaps another peer's; skipped",
                    p.host
                ));
                continue;
            }
            taken.insert(b);
            state
                .routes
                .insert(sleeve_route(b, sleeve_dev, input.my_blocks));
        }
        statuses.push(st);
    }
    statuses.sort_by(|a, b| a.host.cmp(&b.host));
    (state, statuses)
}

/// A probe datagram: the magic, then a nonce the answer must echo.
pub fn probe_message(nonce: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(PROBE_MAGIC);
    m[8..].copy_from_slice(&nonce.to_be_bytes());
    m
}

/// The nonce of a probe datagram (or its echo), if it is one.
pub fn probe_nonce(msg: &[u8]) -> Option<u64> {
    if msg.len() != 16 || &msg[..8] != PROBE_MAGIC {
        return None;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&msg[8..]);
    Some(u64::from_be_bytes(n))
}

/// Where to send a peer's VXLAN probe: the gateway of its first block (IPv4 first), which its
/// bridge holds; the probe leaves through this host's VXLAN device.
pub fn probe_target(peer: &Peer) -> Option<IpAddr> {
    let mut blocks = peer.blocks.clone();
    blocks.sort_by_key(|b| b.addr().is_ipv6());
    blocks.first().map(block_gateway)
}

pub mod path;

#[cfg(test)]
mod tests;
