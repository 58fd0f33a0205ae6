//! The DNS server, differentially: wherever the hand-written fast path answers a packet,
//! hickory's general path must give the same bytes; neither may panic on any packet.
use std::sync::OnceLock;

use ferrynet::agent::dns::fast;
use ferrynet::agent::dns::wire::{general, Outcome};
use ferrynet::agent::dns::zone::Zone;
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::{keys, Endpoint, Network};

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let mut v = DiscoveryView::default();
        let net = Network::bridged(
            "blue",
            [
                "10.30.0.0/24".parse().unwrap(),
                "fd30::/64".parse().unwrap(),
            ],
        );
        v.put(&keys::network("blue"), &serde_json::to_vec(&net).unwrap());
        let mut eps: Vec<(&str, &str, Vec<&str>, Vec<String>)> = vec![
            (
                "a",
                "web",
                vec!["www_1"],
                vec!["10.30.0.2/24".into(), "fd30::2/64".into()],
            ),
            ("b", "db", vec![], vec!["10.30.0.3/24".into()]),
        ];
        for i in 0..40u8 {
            eps.push(("m", "many", vec![], vec![format!("10.30.0.{}/24", i + 100)]));
        }
        for (i, (id, name, aliases, ips)) in eps.iter().enumerate() {
            let ep: Endpoint = serde_json::from_value(serde_json::json!({
                "network": "blue", "containerId": format!("{id}{i}"), "ifname": "eth0",
                "ips": ips, "name": name, "aliases": aliases,
            }))
            .unwrap();
            v.put(
                &keys::endpoint("blue", &ep.container_id, "eth0"),
                &serde_json::to_vec(&ep).unwrap(),
            );
        }
        Zone::build(&v, "ferrynet.internal")
    })
}

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    let Some((&flags, packet)) = data.split_first() else {
        return;
    };
    let udp = flags & 1 == 1;
    let mut out = Vec::new();
    let fast_answered = fast::answer(zone(), "blue", packet, 30, udp, &mut out);
    let slow = general(zone(), "blue", packet, 30, udp);
    if fast_answered {
        match slow {
            Outcome::Reply(bytes) => assert_eq!(out, bytes, "fast and general paths differ"),
            other => panic!(
                "fast path answered, general path says {:?}",
                other_name(&other)
            ),
        }
    }
}

fn other_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Reply(_) => "reply",
        Outcome::Forward => "forward",
        Outcome::Drop => "drop",
    }
}
