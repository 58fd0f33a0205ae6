//! The sleeve's cipher bound: seal and open throughput of the exact data path its queue threads
//! run (boringtun's `Tunn::encapsulate` / `decapsulate`: copy, ChaCha20-Poly1305 by ring,
//! counters, replay window, IP header check) on packets of the sleeve's MTU (1408 bytes on a
//! 1500 underlay), one thread, beside ring's bare AEAD on the same sizes in the same run.
//! Timed in the thread's CPU time, so other processes on a shared machine do not count (its
//! wall-clock rate is printed too).
//!
//!     cargo bench -p ferrynet-sleeve --bench cipher [-- ROUNDS PACKETS VXLAN_GBIT VXLAN_CPU]
//!
//! With VXLAN's measured rate (Gbit/s) and CPU (CPU-seconds per Gbit, `bench/sleeve.py`) it
//! prints the cores half of that rate needs: sealing and opening it at the measured per-core
//! speed, plus what VXLAN itself spends per Gbit (a floor for everything else: the kernel's
//! TCP, forwarding, UDP and veth work, which the sleeve pays as well); and the best
//! sleeve / VXLAN ratio this machine's cores allow on that floor.

use std::hint::black_box;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

/// The sleeve's MTU on a 1500-byte underlay (`model::sleeve::sleeve_mtu`).
const MTU: usize = 1408;
/// WireGuard's data message overhead: header 16, tag 16.
const OVERHEAD: usize = 32;

/// CPU time this thread has used (CLOCK_THREAD_CPUTIME_ID), and the wall clock.
#[derive(Clone, Copy)]
struct Instant {
    cpu: Duration,
    wall: std::time::Instant,
}

impl Instant {
    fn now() -> Instant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Instant {
            cpu: Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
            wall: std::time::Instant::now(),
        }
    }

    /// (CPU time, wall time) since `self`.
    fn elapsed(&self) -> Elapsed {
        let now = Instant::now();
        Elapsed {
            cpu: now.cpu - self.cpu,
            wall: now.wall - self.wall,
        }
    }
}

/// One timed stretch: CPU time and wall time.
#[derive(Clone, Copy, Default)]
struct Elapsed {
    cpu: Duration,
    wall: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// An IPv4 packet of `len` bytes (a header boringtun accepts, a payload that varies).
fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 20, 1, 2]);
    p[16..20].copy_from_slice(&[10, 20, 0, 2]);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    p
}

/// Two tunnels with a completed handshake (in memory, no sockets).
fn pair() -> (Tunn, Tunn) {
    let (ka, kb) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1 << 8, None);
    let mut b = Tunn::new(kb, pa, None, None, 2 << 8, None);
    let (mut m1, mut m2, mut m3) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut m1, false) else {
        panic!("no initiation");
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut m2) else {
        panic!("no response");
    };
    // The initiator confirms with a keepalive; the responder's session starts with it.
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, resp, &mut m3) else {
        panic!("no keepalive");
    };
    let mut scratch = vec![0u8; 2048];
    match b.decapsulate(None, keepalive, &mut scratch) {
        TunnResult::Done => {}
        _ => panic!("keepalive not accepted"),
    }
    (a, b)
}

/// One round through boringtun: seal `n` packets into `wire`, then open them in order.
fn round_tunn(
    a: &mut Tunn,
    b: &mut Tunn,
    pkts: &[Vec<u8>],
    wire: &mut [Vec<u8>],
    out: &mut [u8],
) -> (Elapsed, Elapsed) {
    let mut lens = vec![0usize; wire.len()];
    let t = Instant::now();
    for (i, w) in wire.iter_mut().enumerate() {
        let p = &pkts[i % pkts.len()];
        match a.encapsulate(p, w) {
            TunnResult::WriteToNetwork(c) => lens[i] = c.len(),
            _ => panic!("seal failed"),
        }
    }
    let seal = t.elapsed();
    let t = Instant::now();
    for (w, &l) in wire.iter().zip(&lens) {
        match b.decapsulate(None, &w[..l], out) {
            TunnResult::WriteToTunnelV4(p, _) => {
                black_box(p);
            }
            _ => panic!("open failed"),
        }
    }
    (seal, t.elapsed())
}

/// One round of ring's bare AEAD on the same sizes, in place (no copies, no bookkeeping).
fn round_ring(key: &LessSafeKey, wire: &mut [Vec<u8>], counter: &mut u64) -> (Elapsed, Elapsed) {
    let nonce = |c: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&c.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let first = *counter;
    let t = Instant::now();
    for w in wire.iter_mut() {
        let (data, tag) = w.split_at_mut(MTU);
        let tg = key
            .seal_in_place_separate_tag(nonce(*counter), Aad::empty(), data)
            .expect("seal");
        tag[..16].copy_from_slice(tg.as_ref());
        *counter += 1;
    }
    let seal = t.elapsed();
    let t = Instant::now();
    for (i, w) in wire.iter_mut().enumerate() {
        let p = key
            .open_in_place(nonce(first + i as u64), Aad::empty(), &mut w[..MTU + 16])
            .expect("open");
        black_box(p);
    }
    (seal, t.elapsed())
}

fn gbit(bytes: usize, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let rounds = num(0, 15.0) as usize;
    let n = num(1, 4096.0) as usize;
    let (vx_gbit, vx_cpu) = (num(2, 8.44), num(3, 0.08));

    let pkts: Vec<Vec<u8>> = (0..16).map(|s| packet(MTU, s)).collect();
    let (mut a, mut b) = pair();
    let mut wire = vec![vec![0u8; MTU + OVERHEAD]; n];
    let mut out = vec![0u8; MTU + 64];
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"));
    let mut counter = 0u64;
    // Warm up both (caches, CPU frequency).
    round_tunn(&mut a, &mut b, &pkts, &mut wire, &mut out);
    round_ring(&key, &mut wire, &mut counter);
    let (mut ts, mut to, mut rs, mut ro) = (vec![], vec![], vec![], vec![]);
    // Alternating, so the machine's load falls on both alike.
    for _ in 0..rounds {
        let (s, o) = round_tunn(&mut a, &mut b, &pkts, &mut wire, &mut out);
        ts.push(s);
        to.push(o);
        let (s, o) = round_ring(&key, &mut wire, &mut counter);
        rs.push(s);
        ro.push(o);
    }
    let bytes = n * MTU;
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    let cpu = |v: &[Elapsed]| median(v.iter().map(|e| e.cpu).collect());
    let wall = |v: &[Elapsed]| median(v.iter().map(|e| e.wall).collect());
    println!(
        "{rounds} rounds of {n} packets of {MTU} bytes, one thread, median round \
         (per CPU-second; wall clock in brackets):\n"
    );
    println!("| path | seal Gbit/s | ns/packet | open Gbit/s | ns/packet |");
    println!("|---|---|---|---|---|");
    for (name, s, o) in [
        ("boringtun `Tunn` (the sleeve's path)", &ts, &to),
        ("ring ChaCha20-Poly1305, in place", &rs, &ro),
    ] {
        println!(
            "| {name} | {:.2} ({:.2}) | {:.0} | {:.2} ({:.2}) | {:.0} |",
            gbit(bytes, cpu(s)),
            gbit(bytes, wall(s)),
            per(cpu(s)),
            gbit(bytes, cpu(o)),
            gbit(bytes, wall(o)),
            per(cpu(o))
        );
    }
    let (ts, to) = (cpu(&ts), cpu(&to));
    // CPU-seconds per Gbit of inner traffic, for each side of the tunnel.
    let seal_cpu = 1.0 / gbit(bytes, ts);
    let open_cpu = 1.0 / gbit(bytes, to);
    let half = vx_gbit / 2.0;
    println!(
        "\nseal {seal_cpu:.3} + open {open_cpu:.3} = {:.3} CPU-s per Gbit for the cipher path; \
         VXLAN {vx_cpu:.3} CPU-s per Gbit.",
        seal_cpu + open_cpu
    );
    println!(
        "Half of VXLAN's {vx_gbit:.2} Gbit/s = {half:.2} Gbit/s needs {:.2} cores for the cipher \
         + {:.2} for what VXLAN itself spends = {:.2} cores at least.",
        half * (seal_cpu + open_cpu),
        half * vx_cpu,
        half * (seal_cpu + open_cpu + vx_cpu)
    );
    // The best the sleeve can do on this machine's cores if it cost nothing beyond the cipher
    // and what VXLAN costs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let best = cores / (seal_cpu + open_cpu + vx_cpu);
    println!(
        "On {cores} cores, all of them for this flow: at most {best:.2} Gbit/s, sleeve / VXLAN \
         <= {:.2}.",
        best / vx_gbit
    );
}
