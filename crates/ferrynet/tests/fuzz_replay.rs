//! The fuzz targets' bodies (`fuzz/bodies/`) on stable Rust, for CI: every committed seed
//! (`fuzz/seeds/<target>/`, among them the inputs fuzzing once crashed on) and, per target, a
//! few hand-written valid inputs each mutated many times by a deterministic generator (bit
//! flips, byte inserts and deletes, truncation, splices of two inputs). A panic fails the test.
//!
//! This is not coverage-guided fuzzing (that is `scripts/fuzz.sh`, nightly and cargo-fuzz,
//! run outside CI): it keeps the decoders honest on every change, in seconds.

#[path = "../../../fuzz/bodies/mod.rs"]
#[allow(dead_code)]
mod bodies;

use std::path::Path;

/// Mutations per target (each a fresh input from a seed, deterministic per target).
const MUTATIONS: usize = 50_000;

/// xorshift64*: deterministic, so a failing input is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seeds[..]`: 1–4 edits of a randomly chosen seed.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                // Bytes parsers care about: delimiters, multi-byte UTF-8, extremes.
                let b = [
                    b'"', b'{', b'}', b'[', b':', b'/', b'-', 0, 0xff, 0xc3, 0xa9, b'9',
                ][rng.below(12)];
                v.insert(i, b);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            3 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.splice(at..at, other[from..].iter().copied());
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// The committed seeds of `target` plus `extra`.
fn seeds(target: &str, extra: &[&[u8]]) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = extra.iter().map(|s| s.to_vec()).collect();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            out.push(std::fs::read(e.path()).expect("read a seed"));
        }
    }
    out
}

/// Every seed as is, then [`MUTATIONS`] mutations; on a panic, the input is printed.
fn replay(target: &str, extra: &[&[u8]], run: fn(&[u8])) {
    let seeds = seeds(target, extra);
    assert!(!seeds.is_empty(), "{target}: no seeds");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let inputs = seeds
        .iter()
        .cloned()
        .chain((0..MUTATIONS).map(|_| mutate(&mut rng, &seeds)));
    for input in inputs {
        if std::panic::catch_unwind(|| run(&input)).is_err() {
            panic!("{target} panicked on input {input:?}");
        }
    }
}

#[test]
fn bgp_decode() {
    // A KEEPALIVE after the 4-byte-ASN flag; the committed seeds carry OPEN, UPDATE and more.
    let mut keepalive = vec![1u8];
    keepalive.extend([0xff; 16]);
    keepalive.extend([0, 19, 4]);
    replay("bgp_decode", &[&keepalive], bodies::bgp_decode::run);
}

#[test]
fn cli_specs() {
    replay(
        "cli_specs",
        &[
            b"\x008080:80",
            b"\x00127.0.0.1:10000-10100:20000-20100/udp",
            b"\x00[::1]:53:53/tcp",
            b"\x01tcp:80",
            b"\x01http:8080/healthz=204",
        ],
        bodies::cli_specs::run,
    );
}

#[test]
fn cni_config() {
    replay(
        "cni_config",
        &[
            br#"{"cniVersion":"1.0.0","name":"blue","type":"ferrynet","subnet":"10.30.0.0/24","runtimeConfig":{"ips":["10.30.0.9/24"],"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]},"args":{"labels":{"app":"web"}}}"#,
            br#"{"cniVersion":"1.1.0","name":"l","plugins":[{"type":"ferrynet","subnet":"fd30::/64"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
            b"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            b"ADD",
        ],
        bodies::cni_config::run,
    );
}

#[test]
fn cnm_request() {
    // The first byte picks the method (an index into the target's list).
    let req = |m: u8, body: &[u8]| [&[m][..], body].concat();
    let create = req(
        6,
        br#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.30.0.2/24","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":[{"Proto":6,"Port":80}]}}"#,
    );
    let network = req(
        2,
        br#"{"NetworkID":"n1","IPv4Data":[{"AddressSpace":"","Pool":"10.30.0.0/24","Gateway":"10.30.0.1/24"}],"Options":{"com.docker.network.generic":{"ferrynet.mode":"routed"}}}"#,
    );
    let address = req(
        19,
        br#"{"PoolID":"p1","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
    );
    replay(
        "cnm_request",
        &[&create, &network, &address],
        bodies::cnm_request::run,
    );
}

#[test]
fn dns_diff() {
    // web.blue.ferrynet.internal A, then AAAA (the first byte: 1 = over UDP).
    let query = |qtype: u8| {
        let mut q = vec![1u8, 0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["web", "blue", "ferrynet", "internal"] {
            q.push(label.len() as u8);
            q.extend(label.as_bytes());
        }
        q.extend([0, 0, qtype, 0, 1]);
        q
    };
    let (a, aaaa) = (query(1), query(28));
    replay("dns_diff", &[&a, &aaaa], bodies::dns_diff::run);
}

#[test]
fn store_url() {
    replay(
        "store_url",
        &[
            b"etcd://10.0.0.1:2379,10.0.0.2:2379?ca=/etc/ca.pem",
            b"embedded:///var/lib/ferrynet/store.redb",
            b"etcds://[fd00::1]:2379",
        ],
        bodies::store_url::run,
    );
}

#[test]
fn template() {
    replay(
        "template",
        &[
            b"{% for s in services %}{{ s.name }}={{ s.vip or '-' }};{% endfor %}",
            b"{% for p in producers('web') %}server {{ p.addr }}:{{ p.ports.http }};{% endfor %}",
            b"{{ key('greeting', 'dflt') }} {{ services|length }}",
        ],
        bodies::template::run,
    );
}
