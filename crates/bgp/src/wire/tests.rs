use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;

use super::*;

fn n(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn decode_all(asn4: bool, bytes: &[u8]) -> Vec<Result<Msg, Notify>> {
    let mut d = Decoder::new(asn4);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    loop {
        match d.decode(&mut buf) {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    out
}

fn open() -> Open {
    Open {
        asn: 4_200_000_001,
        hold_time: 9,
        router_id: Ipv4Addr::new(172, 31, 0, 1),
        ipv4: true,
        ipv6: true,
        route_refresh: true,
        asn4: true,
        graceful_restart: Some(GracefulRestart {
            restarting: true,
            time: 120,
            families: vec![(false, true), (true, true)],
        }),
    }
}

#[test]
fn open_round_trips_with_a_4_byte_asn() {
    let bytes = encode(&Msg::Open(open())).unwrap();
    // The 2-byte field carries AS_TRANS.
    assert_eq!(u16::from_be_bytes([bytes[20], bytes[21]]), 23456);
    assert_eq!(decode_all(false, &bytes), vec![Ok(Msg::Open(open()))]);
}

#[test]
fn updates_round_trip_in_chunks_with_both_families() {
    let a = Announce {
        local_asn: 65001,
        ebgp: true,
        asn4: true,
        next_hop4: Some(Ipv4Addr::new(172, 31, 0, 1)),
        next_hop6: Some("fd31::1".parse::<Ipv6Addr>().unwrap()),
    };
    let add: Vec<IpNet> = (0..1200u32)
        .map(|i| IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a14_0000 + i), 32).unwrap()))
        .chain([n("fd20::40/122")])
        .collect();
    let frames = updates(&a, &add, &[n("10.20.9.0/26"), n("fd20::80/122")]);
    assert_eq!(frames.len(), 2 + 3 + 1);
    let mut got = Vec::new();
    for f in &frames {
        assert!(f.len() <= MAX_MESSAGE);
        let [Ok(Msg::Update(u))] = &decode_all(true, f)[..] else {
            panic!("not one update");
        };
        got.push(u.clone());
    }
    assert_eq!(got[0].withdrawn, vec![n("10.20.9.0/26")]);
    assert_eq!(got[1].withdrawn, vec![n("fd20::80/122")]);
    let a4 = got[2].attrs.as_ref().unwrap();
    assert_eq!(a4.as_path, vec![65001]);
    assert_eq!(a4.next_hop, Some(Ipv4Addr::new(172, 31, 0, 1)));
    assert!(!got[2].treat_as_withdraw);
    let all: usize = got.iter().map(|u| u.announced.len()).sum();
    assert_eq!(all, 1201);
    assert_eq!(got[5].announced, vec![n("fd20::40/122")]);
    assert_eq!(
        got[5].attrs.as_ref().unwrap().next_hop6,
        Some(("fd31::1".parse().unwrap(), None))
    );
}

#[test]
fn end_of_rib_markers_are_recognised() {
    for v6 in [false, true] {
        let [Ok(Msg::Update(u))] = &decode_all(true, &end_of_rib(v6))[..] else {
            panic!()
        };
        assert_eq!(u.end_of_rib, Some(v6));
    }
}

fn header(len: u16, kind: u8) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&len.to_be_bytes());
    v.push(kind);
    v
}

#[test]
fn malformed_messages_get_the_rfc_4271_notification() {
    // Length below the header, above 4096, a bad marker, an unknown type.
    assert_eq!(
        decode_all(true, &header(18, 4))[0]
            .as_ref()
            .unwrap_err()
            .code,
        1
    );
    let e = decode_all(true, &header(5000, 2))[0].clone().unwrap_err();
    assert_eq!((e.code, e.subcode), (1, 2));
    let mut bad = header(19, 4);
    bad[3] = 0;
    assert_eq!(decode_all(true, &bad)[0].as_ref().unwrap_err().code, 1);
    let e = decode_all(true, &header(19, 9))[0].clone().unwrap_err();
    assert_eq!((e.code, e.subcode), (1, 3));
    // An UPDATE whose attribute length runs past the message: an UPDATE error.
    let mut u = header(0, 2);
    u.extend_from_slice(&[0, 0, 0, 7, 0x40, 1, 5, 0]);
    let len = u.len() as u16;
    u[16..18].copy_from_slice(&len.to_be_bytes());
    let e = decode_all(true, &u)[0].clone().unwrap_err();
    assert_eq!(e.code, 3, "{e}");
}

#[test]
fn an_update_without_mandatory_attributes_is_treated_as_withdraw() {
    // NLRI 10.20.0.0/26 with no attributes at all.
    let mut u = header(0, 2);
    u.extend_from_slice(&[0, 0, 0, 0, 26, 10, 20, 0, 0]);
    let len = u.len() as u16;
    u[16..18].copy_from_slice(&len.to_be_bytes());
    let [Ok(Msg::Update(up))] = &decode_all(true, &u)[..] else {
        panic!()
    };
    assert!(up.treat_as_withdraw);
    assert_eq!(up.announced, vec![n("10.20.0.0/26")]);
}

#[test]
fn notifications_round_trip() {
    let n = Notify {
        code: 6,
        subcode: 7,
        data: vec![1, 2],
    };
    let [Ok(Msg::Notification(got))] = &decode_all(true, &notification_frame(&n))[..] else {
        panic!()
    };
    assert_eq!(got, &n);
}

#[test]
fn ibgp_updates_carry_an_empty_as_path_and_local_pref() {
    let a = Announce {
        local_asn: 64512,
        ebgp: false,
        asn4: true,
        next_hop4: Some(Ipv4Addr::new(172, 31, 0, 1)),
        next_hop6: Some("fd31::1".parse::<Ipv6Addr>().unwrap()),
    };
    let frames = updates(&a, &[n("10.20.0.64/26"), n("fd20::40/122")], &[]);
    assert_eq!(frames.len(), 2);
    for f in &frames {
        let [Ok(Msg::Update(u))] = &decode_all(true, f)[..] else {
            panic!("{:?}", decode_all(true, f))
        };
        assert_eq!(u.announced.len(), 1, "{u:?}");
        assert!(!u.treat_as_withdraw, "{u:?}");
        let at = u.attrs.as_ref().unwrap();
        assert_eq!((at.as_path_len, at.local_pref), (0, Some(100)));
    }
}
