//! One queue's inbound path: receive batches (GRO runs cut back into datagrams), find the peer
//! by session index or, for a handshake initiation, by the static key it carries (relayed
//! datagrams out of their envelope first; those asking this host to relay are forwarded, see
//! [`relay`]); decrypt;
//! drop what is replayed, forged, from an unknown key or from outside the sender's blocks
//! (each counted); follow the peer to the address it spoke from; hand the packets to the
//! queue's writer, which writes them to the TUN queue in one batch, GRO coalescing TCP
//! segments into large ones.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ferrynet_model::sleeve::path::{
    self, KEY_PREFIX, RELAY_FORWARD, RELAY_FORWARDED, RELAY_HEADER,
};
use ferrynet_model::sleeve::probe_nonce;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::peers::{add, write_envelope, Dest, Hop, Table};
use crate::stage::Stage;
use crate::udp::{send_one, Received, Receiver};
use crate::Shared;

const BATCH: usize = 32;
/// WireGuard's cookie reply message size.
const COOKIE_REPLY_LEN: usize = 64;

/// Batches going round between a queue's decrypting thread and its writer.
const POOLS: usize = 3;

/// Decrypted packets on their way to the TUN queue, each with the virtio header's room first.
struct Batch {
    bufs: Vec<Vec<u8>>,
    n: usize,
}

/// The queue's two stages: this thread receives and decrypts, a writer thread (`sleeve-w<N>`)
/// coalesces (GRO) and writes bulk batches to the TUN queue, where the kernel's forwarding to
/// the container runs in its time; small batches are written here (`stage`).
pub(crate) fn run(shared: Arc<Shared>, dev: Arc<SyncDevice>, q: usize) {
    let cap = VIRTIO_NET_HDR_LEN + shared.mtu.max(1280) + 64;
    let pools = (0..POOLS)
        .map(|_| Batch {
            bufs: (0..IDEAL_BATCH_SIZE).map(|_| gro_buffer(cap)).collect(),
            n: 0,
        })
        .collect();
    let writer_dev = dev.clone();
    let mut writer_gro = GROTable::default();
    let spawned = Stage::spawn(format!("sleeve-w{q}"), pools, move |b: &mut Batch| {
        write(&writer_dev, &mut writer_gro, b, cap)
    });
    let (stage, mut batch) = match spawned {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, queue = q, "sleeve: cannot start the TUN writer");
            return;
        }
    };
    let mut gro = GROTable::default();
    let sock = shared.sockets[q].clone();
    let mut rx = Receiver::new(&sock, BATCH);
    let mut got: Vec<Received> = Vec::with_capacity(BATCH);
    let mut scratch = vec![0u8; cap];
    loop {
        if let Err(e) = rx.recv(&mut got) {
            tracing::debug!(error = %e, "sleeve: receiving");
            continue;
        }
        let table = shared.table();
        for r in &got {
            let buf = &rx.bufs[r.idx][..r.len];
            for dgram in buf.chunks(r.seg) {
                if batch.n == batch.bufs.len() {
                    let n = batch.n;
                    batch = match stage.finish(batch, n, |b| write(&dev, &mut gro, b, cap)) {
                        Some(b) => b,
                        None => return,
                    };
                }
                let slot = &mut batch.bufs[batch.n];
                if let Some(len) = handle(&shared, &table, &sock, r.src, dgram, slot, &mut scratch)
                {
                    slot.truncate(VIRTIO_NET_HDR_LEN + len);
                    batch.n += 1;
                }
            }
        }
        if batch.n > 0 {
            let n = batch.n;
            batch = match stage.finish(batch, n, |b| write(&dev, &mut gro, b, cap)) {
                Some(b) => b,
                None => return,
            };
        }
    }
}

/// Room a buffer needs for GRO to append segments to it: tun-rs coalesces into a buffer only
/// when its capacity holds the result (and the offset twice), else it writes every segment on
/// its own, one trip up the kernel's stack each. 32 KiB (22 segments of a 1408-byte MTU per
/// trip) keeps most of the gain of 64 KiB at half the memory: the pages of a slot that once
/// held a coalesced packet stay resident (128 slots x 3 batches x 32 KiB = 12 MiB per queue at
/// most).
const GRO_ROOM: usize = 2 * VIRTIO_NET_HDR_LEN + 32 * 1024;

/// A slot of `len` bytes with [`GRO_ROOM`] capacity (pages are touched only when used).
fn gro_buffer(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(GRO_ROOM.max(len));
    v.resize(len, 0);
    v
}

fn write(dev: &SyncDevice, gro: &mut GROTable, b: &mut Batch, cap: usize) {
    let mut bufs: Vec<&mut Vec<u8>> = b.bufs[..b.n].iter_mut().collect();
    if let Err(e) = dev.send_multiple(gro, &mut bufs, VIRTIO_NET_HDR_LEN) {
        tracing::debug!(error = %e, "sleeve: writing to the TUN queue");
    }
    for buf in b.bufs[..b.n].iter_mut() {
        buf.resize(cap, 0);
    }
    b.n = 0;
}

/// Handle one datagram; returns the length of a decrypted packet left in `slot` after the
/// virtio header room.
fn handle(
    shared: &Shared,
    table: &Table,
    sock: &socket2::Socket,
    src: SocketAddr,
    dgram: &[u8],
    slot: &mut [u8],
    scratch: &mut [u8],
) -> Option<usize> {
    let c = &shared.counters;
    if probe_nonce(dgram).is_some() {
        // A VXLAN path probe from a peer's agent: echo it (it proves the way in, not out).
        add(&c.probes_answered, 1);
        let _ = send_one(sock, src, dgram);
        return None;
    }
    let (msg, relayed_by) = match envelope(dgram) {
        Some((RELAY_FORWARD, key)) => {
            relay(table, sock, src, key, dgram, scratch, c);
            return None;
        }
        Some((_, key)) => (&dgram[RELAY_HEADER..], Some(key)),
        None => (dgram, None),
    };
    // The way the peer's packet came, and so the way answers go.
    let hop = match relayed_by {
        Some(_) => Hop::Relay(src),
        None => Hop::Direct(src),
    };
    let Ok(packet) = Tunn::parse_incoming_packet(msg) else {
        add(&c.malformed, 1);
        return None;
    };
    let i = peer_of(shared, table, &packet)?;
    let e = &table.entries[i];
    // A relay naming another sender than the session's is lying about who it forwards for.
    if relayed_by.is_some_and(|k| k != e.prefix) {
        add(&c.auth_failed, 1);
        return None;
    }
    let is_data = matches!(packet, Packet::PacketData(_));
    let out = &mut slot[VIRTIO_NET_HDR_LEN..];
    // boringtun panics when the plaintext cannot fit: a datagram larger than the MTU allows is
    // nobody's packet.
    if msg.len() > out.len() {
        add(&c.malformed, 1);
        return None;
    }
    // Answers go back the way the message came: through the relay, enveloped for the peer.
    let back = Dest {
        addr: src,
        relay_to: relayed_by.map(|_| e.prefix),
    };
    let mut tunn = e.peer.tunn.lock().ok()?;
    match tunn.decapsulate(Some(src.ip()), msg, out) {
        TunnResult::WriteToNetwork(p) => {
            // A handshake answered (authenticated), or a cookie reply the rate limiter sends
            // under load before anything is verified: that one teaches nothing.
            if p.len() != COOKIE_REPLY_LEN {
                e.peer.heard_from(hop);
            }
            reply(sock, back, p);
            // Packets queued while the handshake was under way.
            while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], scratch) {
                reply(sock, back, p);
            }
            None
        }
        TunnResult::WriteToTunnelV4(p, ip) => {
            let len = p.len();
            deliver(table, i, ip.into(), len, hop, c)
        }
        TunnResult::WriteToTunnelV6(p, ip) => {
            let len = p.len();
            deliver(table, i, ip.into(), len, hop, c)
        }
        TunnResult::Done => {
            if is_data {
                e.peer.heard_from(hop);
            }
            None
        }
        TunnResult::Err(err) => {
            add(counter_for(&err, c), 1);
            None
        }
    }
}

/// The peer entry a WireGuard message belongs to: by the static key a handshake initiation
/// carries, else by the session index; None (counted) for a key or index nobody has.
fn peer_of(shared: &Shared, table: &Table, packet: &Packet<'_>) -> Option<usize> {
    let c = &shared.counters;
    match packet {
        Packet::HandshakeInit(h) => {
            let Ok(half) = parse_handshake_anon(&shared.secret, &shared.public, h) else {
                add(&c.auth_failed, 1);
                return None;
            };
            let i = table.by_key(&half.peer_static_public);
            if i.is_none() {
                add(&c.unknown_key, 1);
            }
            i
        }
        Packet::HandshakeResponse(h) => by_index(table, h.receiver_idx, c),
        Packet::PacketCookieReply(h) => by_index(table, h.receiver_idx, c),
        Packet::PacketData(d) => by_index(table, d.receiver_idx, c),
    }
}

/// The envelope of a relayed datagram: its kind ([`RELAY_FORWARD`], [`RELAY_FORWARDED`]) and
/// the key prefix it names; None for anything else (WireGuard messages start 1-4, 0, 0, 0).
fn envelope(dgram: &[u8]) -> Option<(u8, [u8; KEY_PREFIX])> {
    let kind = *dgram.first()?;
    if !matches!(kind, RELAY_FORWARD | RELAY_FORWARDED)
        || dgram.get(1..4) != Some(&[0, 0, 0][..])
        || dgram.len() <= RELAY_HEADER
    {
        return None;
    }
    let mut key = [0u8; KEY_PREFIX];
    key.copy_from_slice(&dgram[4..RELAY_HEADER]);
    Some((kind, key))
}

/// This host as a relay: forward `dgram` (a [`RELAY_FORWARD`] envelope naming `key`) from the
/// peer heard directly at `src` to the peer with that key, re-enveloped to name the sender.
/// The message inside is end-to-end encrypted; this host only copies it.
fn relay(
    table: &Table,
    sock: &socket2::Socket,
    src: SocketAddr,
    key: [u8; KEY_PREFIX],
    dgram: &[u8],
    scratch: &mut [u8],
    c: &crate::Counters,
) {
    let sender = table.heard_directly_at(src);
    let dst = table.by_prefix(&key);
    let dst_addr = dst.and_then(|d| table.direct_addr(d));
    let verdict = path::relay_verdict(
        sender.map(|s| table.entries[s].peer.host.as_str()),
        dst.map(|d| (table.entries[d].peer.host.as_str(), dst_addr.is_some())),
    );
    let (Ok(()), Some(s), Some(to)) = (verdict, sender, dst_addr) else {
        add(&c.relay_refused, 1);
        return;
    };
    let Some(out) = scratch.get_mut(..dgram.len()) else {
        add(&c.relay_refused, 1);
        return;
    };
    write_envelope(out, RELAY_FORWARDED, &table.entries[s].prefix);
    out[RELAY_HEADER..].copy_from_slice(&dgram[RELAY_HEADER..]);
    if send_one(sock, to, out).is_ok() {
        add(&c.relayed, 1);
    }
}

/// Send one message back the way `back` says.
fn reply(sock: &socket2::Socket, back: Dest, msg: &[u8]) {
    let _ = if back.relay_to.is_some() {
        send_one(sock, back.addr, &back.frame(msg))
    } else {
        send_one(sock, back.addr, msg)
    };
}

fn deliver(
    table: &Table,
    i: usize,
    inner_src: std::net::IpAddr,
    len: usize,
    hop: Hop,
    c: &crate::Counters,
) -> Option<usize> {
    let e = &table.entries[i];
    e.peer.heard_from(hop);
    if !table.allows(i, inner_src) {
        add(&c.spoofed_source, 1);
        return None;
    }
    add(&e.peer.rx_bytes, len as u64);
    Some(len)
}

fn by_index(table: &Table, idx: u32, c: &crate::Counters) -> Option<usize> {
    let i = table.by_index(idx);
    if i.is_none() {
        add(&c.unknown_session, 1);
    }
    i
}

fn counter_for<'a>(e: &WireGuardError, c: &'a crate::Counters) -> &'a AtomicU64 {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => &c.replayed,
        WireGuardError::InvalidAeadTag | WireGuardError::InvalidMac | WireGuardError::WrongKey => {
            &c.auth_failed
        }
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => &c.unknown_session,
        _ => &c.other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's-complement sum of `data` folded onto `init`.
    fn csum(data: &[u8], mut sum: u32) -> u16 {
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Put an IPv4 TCP segment (ACK, `seq`, `payload` bytes, valid checksums) into `buf`
    /// after the virtio header's room, as a decrypted packet lands in a slot.
    fn segment(buf: &mut Vec<u8>, seq: u32, payload: usize) {
        let total = 40 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 20, 0, 66]);
        p[16..20].copy_from_slice(&[10, 20, 0, 2]);
        let ip = csum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&1u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10;
        p[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_add(seq as u8);
        }
        let pseudo: u32 = [0x0a14u32, 0x0042, 0x0a14, 0x0002, 6, (total - 20) as u32]
            .iter()
            .sum();
        let tcp = csum(&p[20..], pseudo);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(&p);
    }

    /// Four consecutive segments in slots of `slots`, through tun-rs's GRO: the length of the
    /// first slot afterwards.
    fn coalesce(mut slots: Vec<Vec<u8>>, payload: usize) -> usize {
        for (i, b) in slots.iter_mut().enumerate() {
            segment(b, 1 + (i * payload) as u32, payload);
        }
        let mut refs: Vec<&mut Vec<u8>> = slots.iter_mut().collect();
        GROTable::default()
            .apply_gro(&mut refs, VIRTIO_NET_HDR_LEN, false)
            .expect("gro");
        slots[0].len()
    }

    #[test]
    fn received_segments_are_coalesced_into_one_write() {
        let payload = 1408 - 40;
        let cap = VIRTIO_NET_HDR_LEN + 1408 + 64;
        let slots = (0..4).map(|_| gro_buffer(cap)).collect();
        assert_eq!(
            coalesce(slots, payload),
            VIRTIO_NET_HDR_LEN + 40 + 4 * payload,
            "four segments, one buffer"
        );
        // Slots only an MTU large (what the sleeve had before) are left one segment each:
        // tun-rs does not grow a buffer to coalesce.
        let small = (0..4).map(|_| vec![0u8; cap]).collect();
        assert_eq!(coalesce(small, payload), VIRTIO_NET_HDR_LEN + 40 + payload);
    }
}
