//! The BGP decoder on arbitrary bytes: every input must decode to messages or to a
//! NOTIFICATION, never panic, and decoded announcements must pass through the import policy.
use bytes::BytesMut;
use ferrynet_bgp::wire::{Decoder, Msg};
use ferrynet_model::bgp::policy::{import, ImportRules};
use ipnet::IpNet;

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    let pools: [IpNet; 2] = [
        "10.20.0.0/16".parse().unwrap(),
        "fd20::/64".parse().unwrap(),
    ];
    let underlay: [IpNet; 2] = [
        "172.31.0.1/24".parse().unwrap(),
        "fd31::1/64".parse().unwrap(),
    ];
    let rules = ImportRules {
        pools: &pools,
        own: &[],
        underlay: &underlay,
        local_asn: 64512,
        accept_default: true,
    };
    // The first byte picks whether 4-byte ASNs were agreed.
    let (asn4, rest) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => return,
    };
    let mut dec = Decoder::new(asn4);
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(m)) = dec.decode(&mut buf) {
        if let Msg::Update(u) = m {
            if let Some(a) = &u.attrs {
                for p in &u.announced {
                    if let Some(nh) = a.next_hop {
                        let _ = import(&rules, *p, nh.into(), &a.as_path);
                    }
                }
            }
        }
    }
}
