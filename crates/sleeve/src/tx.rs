//! One queue's outbound path: read the TUN queue (a TSO packet comes out cut into segments),
//! encrypt each for the peer its destination is routed to (one lock per run of packets to one
//! peer), and send the ciphertexts as GSO runs per peer (each in a relay envelope when the
//! peer is reached through a relay).

use std::net::SocketAddr;
use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};
use ferrynet_model::sleeve::path::RELAY_HEADER;
use tun_rs::{SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::peers::add;
use crate::stage::Stage;
use crate::udp::{Run, Sender, MAX_GSO_BYTES, MAX_SEGMENTS};
use crate::Shared;

/// WireGuard's data message overhead (header 16 + tag 16); handshakes need 148 bytes.
const OVERHEAD: usize = 32;
const MIN_OUT: usize = 148;

/// Ciphertexts on their way to the socket, as GSO runs.
struct Batch {
    out: Vec<u8>,
    runs: Vec<Run>,
}

/// Batches going round between a queue's encrypting thread and its sender.
const POOLS: usize = 3;

/// The queue's two stages: this thread reads the TUN queue and encrypts, a sender thread
/// (`sleeve-s<N>`) hands bulk batches to the kernel, whose UDP and underlay work runs in its
/// time; small batches are sent from here (`stage`).
pub(crate) fn run(shared: Arc<Shared>, dev: Arc<SyncDevice>, q: usize) {
    let seg_cap = shared.mtu.max(1280) + 64;
    let pools = (0..POOLS)
        .map(|_| Batch {
            out: vec![0u8; IDEAL_BATCH_SIZE * (seg_cap + MIN_OUT + RELAY_HEADER)],
            runs: Vec::with_capacity(IDEAL_BATCH_SIZE),
        })
        .collect();
    let mut helper = Sender::new(&shared.sockets[q]);
    let spawned = Stage::spawn(format!("sleeve-s{q}"), pools, move |b: &mut Batch| {
        send(&mut helper, b)
    });
    let (stage, mut batch) = match spawned {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, queue = q, "sleeve: cannot start the UDP sender");
            return;
        }
    };
    let mut sender = Sender::new(&shared.sockets[q]);
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65536];
    let mut bufs = vec![vec![0u8; seg_cap]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut sent: Vec<(SocketAddr, usize, usize)> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    loop {
        let n = match dev.recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, queue = q, "sleeve: reading the TUN queue");
                if e.raw_os_error() == Some(libc::EBADFD) {
                    return;
                }
                continue;
            }
        };
        seal(&shared, &bufs, &sizes[..n], &mut batch.out, &mut sent);
        if sent.is_empty() {
            continue;
        }
        runs_of(&sent, &mut batch.runs);
        batch = match stage.finish(batch, sent.len(), |b| send(&mut sender, b)) {
            Some(b) => b,
            None => return,
        };
    }
}

fn send(sender: &mut Sender, b: &mut Batch) {
    if let Err(e) = sender.send(&b.out, &b.runs) {
        tracing::debug!(error = %e, "sleeve: sending");
    }
}

/// Encrypt the `sizes.len()` packets of `bufs` for their peers into `out`, one lock per run
/// of packets to one peer; `sent` gets (endpoint, offset, length) per ciphertext.
fn seal(
    shared: &Shared,
    bufs: &[Vec<u8>],
    sizes: &[usize],
    out: &mut [u8],
    sent: &mut Vec<(SocketAddr, usize, usize)>,
) {
    let n = sizes.len();
    let table = shared.table();
    sent.clear();
    let mut off = 0;
    let mut i = 0;
    while i < n {
        let Some(dst) = Tunn::dst_address(&bufs[i][..sizes[i]]) else {
            add(&shared.counters.malformed, 1);
            i += 1;
            continue;
        };
        let Some(p) = table.route(dst) else {
            add(&shared.counters.no_peer, 1);
            i += 1;
            continue;
        };
        let e = &table.entries[p];
        let dest = table.dest(p);
        let hdr = dest.map_or(0, |d| d.header_len());
        let Ok(mut tunn) = e.peer.tunn.lock() else {
            i += 1;
            continue;
        };
        let mut bytes = 0u64;
        let start = i;
        // The run: this packet and those after it routed to the same peer.
        while i < n {
            let pkt = &bufs[i][..sizes[i]];
            if i > start && !same_peer(&table, pkt, p) {
                break;
            }
            let room = (pkt.len() + OVERHEAD).max(MIN_OUT);
            // Relayed: the envelope first, the ciphertext right after it (one GSO segment).
            if let TunnResult::WriteToNetwork(c) =
                tunn.encapsulate(pkt, &mut out[off + hdr..off + hdr + room])
            {
                let l = c.len();
                e.peer.sent(c);
                if let Some(d) = dest {
                    d.write_header(&mut out[off..off + hdr]);
                    sent.push((d.addr, off, hdr + l));
                    off += hdr + l;
                }
            }
            bytes += pkt.len() as u64;
            i += 1;
        }
        drop(tunn);
        add(&e.peer.tx_bytes, bytes);
    }
}

fn same_peer(table: &crate::peers::Table, pkt: &[u8], p: usize) -> bool {
    Tunn::dst_address(pkt).and_then(|d| table.route(d)) == Some(p)
}

/// Group consecutive ciphertexts for one endpoint into GSO runs: equal sizes, laid end to end,
/// the last of a run may be shorter, within the kernel's segment and byte limits.
fn runs_of(sent: &[(SocketAddr, usize, usize)], runs: &mut Vec<Run>) {
    runs.clear();
    for &(dst, off, len) in sent {
        if let Some(r) = runs.last_mut() {
            let count = r.len.div_ceil(r.seg);
            let fits = r.dst == dst
                && r.off + r.len == off
                && r.len % r.seg == 0
                && len <= r.seg
                && count < MAX_SEGMENTS
                && r.len + len <= MAX_GSO_BYTES;
            if fits {
                r.len += len;
                continue;
            }
        }
        runs.push(Run {
            dst,
            off,
            len,
            seg: len,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_equal_sizes_per_endpoint() {
        let a: SocketAddr = "172.31.0.2:6784".parse().unwrap();
        let b: SocketAddr = "172.31.0.3:6784".parse().unwrap();
        let sent = [
            (a, 0, 100),
            (a, 100, 100),
            (a, 200, 60),
            (a, 260, 100),
            (b, 360, 100),
            (b, 460, 120),
        ];
        let mut runs = Vec::new();
        runs_of(&sent, &mut runs);
        let got: Vec<_> = runs.iter().map(|r| (r.dst, r.off, r.len, r.seg)).collect();
        assert_eq!(
            got,
            vec![
                (a, 0, 260, 100),
                (a, 260, 100, 100),
                (b, 360, 100, 100),
                (b, 460, 120, 120)
            ]
        );
    }
}
