//! The DNS zone updated per change (`ZoneBuilder::update`) against compiled whole from the
//! view (`Zone::build`, what every view change cost before), in one run, at cluster sizes.
//!
//!     cargo bench -p ferrynet --bench zone [-- ENDPOINTS...]
//!
//! Each size: a view of N named endpoints over 10 networks; the full compile is timed 5 times,
//! then 200 single-endpoint changes (an add, a readdress, a removal, in turn) are applied to
//! the view and the builder is updated after each. Prints medians and the ratio.

use std::time::{Duration, Instant};

use ferrynet::agent::dns::zone::{Zone, ZoneBuilder};
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::{keys, Endpoint, Network};

const NETWORKS: usize = 10;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn endpoint(i: usize, host_byte: usize) -> (String, Vec<u8>) {
    let net = format!("n{}", i % NETWORKS);
    let id = format!("c{i}");
    let ep = Endpoint {
        ips: vec![format!(
            "10.{}.{}.{}/16",
            i % NETWORKS,
            (i / NETWORKS) / 250 % 250,
            (i / NETWORKS) % 250 + host_byte
        )
        .parse()
        .expect("address")],
        name: Some(format!("web-{i}")),
        ..Endpoint::new(&net, &id, "eth0")
    };
    (
        keys::endpoint(&net, &id, "eth0"),
        serde_json::to_vec(&ep).expect("encode"),
    )
}

fn view_of(n: usize) -> DiscoveryView {
    let mut v = DiscoveryView::default();
    for k in 0..NETWORKS {
        let net = Network::bridged(
            &format!("n{k}"),
            [format!("10.{k}.0.0/16").parse().expect("cidr")],
        );
        v.put(
            &keys::network(&net.name),
            &serde_json::to_vec(&net).expect("encode"),
        );
    }
    for i in 0..n {
        let (k, val) = endpoint(i, 2);
        v.put(&k, &val);
    }
    v
}

fn main() {
    let sizes: Vec<usize> = {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if a.is_empty() {
            vec![1_000, 10_000, 100_000]
        } else {
            a
        }
    };
    println!("| endpoints | full compile, median ms | one change, median us | change / compile |");
    println!("|---|---|---|---|");
    for n in sizes {
        let mut view = view_of(n);
        let full = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(Zone::build(&view, "ferrynet.internal"));
                    t.elapsed()
                })
                .collect(),
        );
        let mut builder = ZoneBuilder::new("ferrynet.internal");
        builder.update(&view);
        let mut changes = Vec::new();
        for c in 0..200 {
            let i = c * 7 % n.max(1);
            match c % 3 {
                0 => {
                    let (k, val) = endpoint(n + c, 2);
                    view.put(&k, &val);
                }
                1 => {
                    let (k, val) = endpoint(i, 3);
                    view.put(&k, &val);
                }
                _ => view.delete(&keys::endpoint(
                    &format!("n{}", i % NETWORKS),
                    &format!("c{i}"),
                    "eth0",
                )),
            }
            let t = Instant::now();
            std::hint::black_box(builder.update(&view));
            changes.push(t.elapsed());
        }
        let one = median(changes);
        println!(
            "| {n} | {:.1} | {:.1} | {:.5} |",
            full.as_secs_f64() * 1e3,
            one.as_secs_f64() * 1e6,
            one.as_secs_f64() / full.as_secs_f64()
        );
    }
}
