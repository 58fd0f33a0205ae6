//! [`Msg`] to bytes, through netgauze's writers; announcements split to fit 4096 bytes.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As2PathSegment, As4PathSegment, AsPath, AsPathSegmentType, LocalPreference, MpReach, MpUnreach,
    NextHop, Origin, PathAttribute, PathAttributeValue,
};
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::WritablePdu;

use super::{Msg, Notify, Open, HEADER};
use crate::config::AS_TRANS;

/// Prefixes per UPDATE: 500 IPv4 /32s (5 bytes each) or 200 IPv6 /128s (17) stay well
/// under 4096 bytes with the attributes.
const CHUNK_V4: usize = 500;
const CHUNK_V6: usize = 200;

/// The wire form of a netgauze message.
pub(crate) fn raw(m: BgpMessage) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    m.write(&mut out).ok()?;
    Some(out)
}

/// A NOTIFICATION frame (written by hand: any code/subcode, also ones netgauze has no
/// variant for).
pub fn notification_frame(n: &Notify) -> Vec<u8> {
    let len = (HEADER + 2 + n.data.len()).min(super::MAX_MESSAGE);
    let mut out = vec![0xff; 16];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.push(3);
    out.push(n.code);
    out.push(n.subcode);
    out.extend_from_slice(&n.data[..len - HEADER - 2]);
    out
}

fn open(o: &Open) -> BgpMessage {
    let mut caps = Vec::new();
    if o.ipv4 {
        caps.push(BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(AddressType::Ipv4Unicast),
        ));
    }
    if o.ipv6 {
        caps.push(BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(AddressType::Ipv6Unicast),
        ));
    }
    if o.route_refresh {
        caps.push(BgpCapability::RouteRefresh);
    }
    if let Some(g) = &o.graceful_restart {
        let fams: Vec<_> = g
            .families
            .iter()
            .map(|(v6, f)| {
                GracefulRestartAddressFamily::new(
                    *f,
                    if *v6 {
                        AddressType::Ipv6Unicast
                    } else {
                        AddressType::Ipv4Unicast
                    },
                )
            })
            .collect();
        caps.push(BgpCapability::GracefulRestartCapability(
            GracefulRestartCapability::new(g.restarting, false, g.time.min(4095), fams),
        ));
    }
    caps.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(
        o.asn,
    )));
    let my_as = u16::try_from(o.asn).unwrap_or(AS_TRANS as u16);
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        o.hold_time,
        o.router_id,
        vec![BgpOpenMessageParameter::Capabilities(caps.into())],
    ))
}

/// Encode a message; None if netgauze refuses it (a bug, reported by the caller).
pub fn encode(m: &Msg) -> Option<Vec<u8>> {
    match m {
        Msg::Open(o) => raw(open(o)),
        Msg::Keepalive => raw(BgpMessage::KeepAlive),
        Msg::Notification(n) => Some(notification_frame(n)),
        Msg::RouteRefresh(v6) => raw(BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(
            if *v6 {
                AddressType::Ipv6Unicast
            } else {
                AddressType::Ipv4Unicast
            },
            RouteRefreshSubcode::NormalRequest,
        ))),
        // Updates are built by `updates`, which knows the session's next hops.
        Msg::Update(_) => None,
    }
}

/// How this speaker's announcements look on one session.
#[derive(Debug, Clone, Copy)]
pub struct Announce {
    /// Our AS.
    pub local_asn: u32,
    /// eBGP session (prepend our AS; no LOCAL_PREF).
    pub ebgp: bool,
    /// 4-byte ASNs agreed.
    pub asn4: bool,
    /// Next hop for IPv4 prefixes.
    pub next_hop4: Option<Ipv4Addr>,
    /// Next hop for IPv6 prefixes.
    pub next_hop6: Option<Ipv6Addr>,
}

fn attr(optional: bool, ext: bool, v: PathAttributeValue) -> Option<PathAttribute> {
    PathAttribute::from(optional, !optional, false, ext, v).ok()
}

fn base_attrs(a: &Announce) -> Vec<PathAttribute> {
    // iBGP: an empty AS_PATH (no segment at all, RFC 4271 5.1.2); eBGP: our AS.
    let path: Vec<u32> = if a.ebgp { vec![a.local_asn] } else { vec![] };
    let as_path = if a.asn4 {
        AsPath::As4PathSegments(
            Some(path)
                .filter(|p| !p.is_empty())
                .map(|p| As4PathSegment::new(AsPathSegmentType::AsSequence, p))
                .into_iter()
                .collect(),
        )
    } else {
        let p: Vec<u16> = path
            .iter()
            .map(|x| u16::try_from(*x).unwrap_or(AS_TRANS as u16))
            .collect();
        AsPath::As2PathSegments(
            Some(p)
                .filter(|p| !p.is_empty())
                .map(|p| As2PathSegment::new(AsPathSegmentType::AsSequence, p))
                .into_iter()
                .collect(),
        )
    };
    let mut v = vec![
        attr(false, false, PathAttributeValue::Origin(Origin::IGP)),
        attr(false, false, PathAttributeValue::AsPath(as_path)),
    ];
    if !a.ebgp {
        v.push(attr(
            false,
            false,
            PathAttributeValue::LocalPreference(LocalPreference::new(100)),
        ));
    }
    v.into_iter().flatten().collect()
}

fn v4(p: &IpNet) -> Option<Ipv4UnicastAddress> {
    match p.trunc() {
        IpNet::V4(n) => Ipv4Unicast::from_net(n)
            .ok()
            .map(Ipv4UnicastAddress::new_no_path_id),
        IpNet::V6(_) => None,
    }
}

fn v6(p: &IpNet) -> Option<Ipv6UnicastAddress> {
    match p.trunc() {
        IpNet::V6(n) => Ipv6Unicast::from_net(n)
            .ok()
            .map(|u| Ipv6UnicastAddress::new(None, u)),
        IpNet::V4(_) => None,
    }
}

/// The UPDATE frames that announce `add` and withdraw `del` on one session, split to fit;
/// prefixes of a family without a next hop are left out (the session cannot carry them).
pub fn updates(a: &Announce, add: &[IpNet], del: &[IpNet]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |u: BgpUpdateMessage| out.extend(raw(BgpMessage::Update(u)));
    let (del4, del6): (Vec<_>, Vec<_>) = (
        del.iter().filter_map(v4).collect::<Vec<_>>(),
        del.iter().filter_map(v6).collect::<Vec<_>>(),
    );
    for c in del4.chunks(CHUNK_V4) {
        push(BgpUpdateMessage::new(c.to_vec(), vec![], vec![]));
    }
    for c in del6.chunks(CHUNK_V6) {
        let un = MpUnreach::Ipv6Unicast { nlri: c.into() };
        push(BgpUpdateMessage::new(
            vec![],
            attr(true, true, PathAttributeValue::MpUnreach(un))
                .into_iter()
                .collect::<Vec<_>>(),
            vec![],
        ));
    }
    if let Some(nh) = a.next_hop4 {
        let add4: Vec<_> = add.iter().filter_map(v4).collect();
        for c in add4.chunks(CHUNK_V4) {
            let mut attrs = base_attrs(a);
            attrs.extend(attr(
                false,
                false,
                PathAttributeValue::NextHop(NextHop::new(nh)),
            ));
            push(BgpUpdateMessage::new(vec![], attrs, c.to_vec()));
        }
    }
    if let Some(nh) = a.next_hop6 {
        let add6: Vec<_> = add.iter().filter_map(v6).collect();
        for c in add6.chunks(CHUNK_V6) {
            let mut attrs = base_attrs(a);
            let reach = MpReach::Ipv6Unicast {
                next_hop_global: nh,
                next_hop_local: None,
                nlri: c.into(),
            };
            attrs.extend(attr(true, true, PathAttributeValue::MpReach(reach)));
            push(BgpUpdateMessage::new(vec![], attrs, vec![]));
        }
    }
    out
}

/// End-of-RIB for IPv4 (an empty UPDATE) or IPv6 (an empty MP_UNREACH).
pub fn end_of_rib(ipv6: bool) -> Vec<u8> {
    let u = if ipv6 {
        let un = MpUnreach::Ipv6Unicast {
            nlri: Vec::new().into(),
        };
        BgpUpdateMessage::new(
            vec![],
            attr(true, true, PathAttributeValue::MpUnreach(un))
                .into_iter()
                .collect::<Vec<_>>(),
            vec![],
        )
    } else {
        BgpUpdateMessage::new(vec![], vec![], vec![])
    };
    raw(BgpMessage::Update(u)).unwrap_or_default()
}
