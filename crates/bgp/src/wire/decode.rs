//! Bytes to [`Msg`]: framing checks, netgauze's parser, then the narrowing to unicast.

use std::net::IpAddr;

use bytes::BytesMut;
use ipnet::IpNet;
use netgauze_bgp_pkt::capabilities::BgpCapability;
use netgauze_bgp_pkt::codec::{BgpCodec, BgpCodecDecoderError};
use netgauze_bgp_pkt::notification::BgpNotificationMessage;
use netgauze_bgp_pkt::open::BgpOpenMessage;
use netgauze_bgp_pkt::path_attribute::{AsPath, MpReach, MpUnreach, PathAttributeValue};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::AddressType;
use tokio_util::codec::Decoder as _;

use super::{Attrs, GracefulRestart, Msg, Notify, Open, Update, HEADER, MAX_MESSAGE};

/// Decodes one session's byte stream (it remembers whether 4-byte ASNs were agreed).
#[derive(Debug, Default)]
pub struct Decoder {
    codec: BgpCodec,
}

impl Decoder {
    /// A decoder for a session that has agreed 4-byte ASNs (`asn4`) or not yet.
    pub fn new(asn4: bool) -> Self {
        Decoder {
            codec: BgpCodec::new(asn4),
        }
    }

    /// The next whole message of `buf` (consumed), None when more bytes are needed, or the
    /// NOTIFICATION to send for a malformed one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Msg>, Notify> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[16], buf[17]]);
        // RFC 4271 6.1: a length outside 19..=4096 is a header error, and waiting for more
        // bytes of an impossible length would stall the session.
        if usize::from(len) < HEADER || usize::from(len) > MAX_MESSAGE {
            return Err(Notify {
                code: 1,
                subcode: 2,
                data: len.to_be_bytes().to_vec(),
            });
        }
        match self.codec.decode(buf) {
            Ok(None) => Ok(None),
            Ok(Some((msg, _ignored))) => Ok(Some(narrow(msg))),
            Err(BgpCodecDecoderError::BgpMessageParsingError(e)) => {
                Err(notify_of(BgpNotificationMessage::from(e)))
            }
            Err(BgpCodecDecoderError::Incomplete(_)) => Ok(None),
            Err(BgpCodecDecoderError::IoError(_)) => Err(Notify::new(1, 0)),
        }
    }
}

/// Code, subcode and data of a netgauze notification, read from its own encoding.
pub(crate) fn notify_of(n: BgpNotificationMessage) -> Notify {
    let frame = super::encode::raw(BgpMessage::Notification(n)).unwrap_or_default();
    match frame.get(HEADER..) {
        Some([code, sub, data @ ..]) => Notify {
            code: *code,
            subcode: *sub,
            data: data.to_vec(),
        },
        _ => Notify::new(5, 0),
    }
}

fn narrow(msg: BgpMessage) -> Msg {
    match msg {
        BgpMessage::Open(o) => Msg::Open(open(&o)),
        BgpMessage::Update(u) => Msg::Update(update(&u)),
        BgpMessage::KeepAlive => Msg::Keepalive,
        BgpMessage::Notification(n) => Msg::Notification(notify_of(n)),
        BgpMessage::RouteRefresh(r) => {
            Msg::RouteRefresh(matches!(r.address_type(), AddressType::Ipv6Unicast))
        }
    }
}

fn open(o: &BgpOpenMessage) -> Open {
    let mut out = Open {
        asn: o.my_asn4(),
        hold_time: o.hold_time(),
        router_id: o.bgp_id(),
        ipv4: false,
        ipv6: false,
        route_refresh: false,
        asn4: false,
        graceful_restart: None,
    };
    for c in o.capabilities() {
        match c {
            BgpCapability::MultiProtocolExtensions(m) => match m.address_type() {
                AddressType::Ipv4Unicast => out.ipv4 = true,
                AddressType::Ipv6Unicast => out.ipv6 = true,
                _ => {}
            },
            BgpCapability::RouteRefresh | BgpCapability::EnhancedRouteRefresh => {
                out.route_refresh = true
            }
            BgpCapability::FourOctetAs(_) => out.asn4 = true,
            BgpCapability::GracefulRestartCapability(g) => {
                out.graceful_restart = Some(GracefulRestart {
                    restarting: g.restart(),
                    time: g.time(),
                    families: g
                        .address_families()
                        .iter()
                        .filter_map(|f| match f.address_type() {
                            AddressType::Ipv4Unicast => Some((false, f.forwarding_state())),
                            AddressType::Ipv6Unicast => Some((true, f.forwarding_state())),
                            _ => None,
                        })
                        .collect(),
                })
            }
            _ => {}
        }
    }
    // RFC 4760 8: a speaker without any multiprotocol capability does IPv4 unicast only.
    if !o
        .capabilities()
        .iter()
        .any(|c| matches!(c, BgpCapability::MultiProtocolExtensions(_)))
    {
        out.ipv4 = true;
    }
    out
}

fn update(u: &BgpUpdateMessage) -> Update {
    let mut out = Update {
        end_of_rib: u.end_of_rib().and_then(|t| match t {
            AddressType::Ipv4Unicast => Some(false),
            AddressType::Ipv6Unicast => Some(true),
            _ => None,
        }),
        ..Default::default()
    };
    out.withdrawn.extend(
        u.withdraw_routes()
            .iter()
            .map(|a| IpNet::V4(a.network().address())),
    );
    out.announced
        .extend(u.nlri().iter().map(|a| IpNet::V4(a.network().address())));
    let mut attrs = Attrs {
        local_pref: None,
        ..Default::default()
    };
    let (mut origin, mut path) = (false, false);
    for a in u.path_attributes() {
        match a.value() {
            PathAttributeValue::Origin(o) => {
                origin = true;
                attrs.origin = *o as u8;
            }
            PathAttributeValue::AsPath(p) => {
                path = true;
                (attrs.as_path, attrs.as_path_len) = flatten(p);
            }
            PathAttributeValue::NextHop(n) => attrs.next_hop = Some(n.next_hop()),
            PathAttributeValue::MultiExitDiscriminator(m) => attrs.med = Some(m.metric()),
            PathAttributeValue::LocalPreference(l) => attrs.local_pref = Some(l.metric()),
            PathAttributeValue::MpReach(r) => mp_reach(r, &mut out, &mut attrs),
            PathAttributeValue::MpUnreach(r) => mp_unreach(r, &mut out),
            _ => {}
        }
    }
    if !out.announced.is_empty() {
        let v4 = out.announced.iter().any(|p| p.addr().is_ipv4());
        let v6 = out.announced.iter().any(|p| p.addr().is_ipv6());
        let hops = (!v4 || attrs.next_hop.is_some()) && (!v6 || attrs.next_hop6.is_some());
        // RFC 7606 3(d): a missing well-known mandatory attribute makes the update a
        // withdrawal of its prefixes, not a reason to reset the session.
        out.treat_as_withdraw = !(origin && path && hops);
        out.attrs = Some(attrs);
    }
    out
}

fn flatten(p: &AsPath) -> (Vec<u32>, u32) {
    let mut asns = Vec::new();
    let mut len = 0u32;
    let mut seg = |set: bool, v: &mut dyn Iterator<Item = u32>| {
        let before = asns.len();
        asns.extend(v);
        let n = (asns.len() - before) as u32;
        len += if set { n.min(1) } else { n };
    };
    use netgauze_bgp_pkt::path_attribute::AsPathSegmentType::AsSet;
    match p {
        AsPath::As2PathSegments(s) => s.iter().for_each(|s| {
            seg(
                s.segment_type() == AsSet,
                &mut s.as_numbers().iter().map(|a| u32::from(*a)),
            )
        }),
        AsPath::As4PathSegments(s) => s.iter().for_each(|s| {
            seg(
                s.segment_type() == AsSet,
                &mut s.as_numbers().iter().copied(),
            )
        }),
    }
    (asns, len)
}

fn mp_reach(r: &MpReach, out: &mut Update, attrs: &mut Attrs) {
    match r {
        MpReach::Ipv4Unicast { next_hop, nlri, .. } => {
            if let IpAddr::V4(n) = next_hop {
                attrs.next_hop.get_or_insert(*n);
            }
            out.announced
                .extend(nlri.iter().map(|a| IpNet::V4(a.network().address())));
        }
        MpReach::Ipv6Unicast {
            next_hop_global,
            next_hop_local,
            nlri,
        } => {
            attrs.next_hop6 = Some((*next_hop_global, *next_hop_local));
            out.announced
                .extend(nlri.iter().map(|a| IpNet::V6(a.network().address())));
        }
        _ => {}
    }
}

fn mp_unreach(r: &MpUnreach, out: &mut Update) {
    match r {
        MpUnreach::Ipv4Unicast { nlri } => out
            .withdrawn
            .extend(nlri.iter().map(|a| IpNet::V4(a.network().address()))),
        MpUnreach::Ipv6Unicast { nlri } => out
            .withdrawn
            .extend(nlri.iter().map(|a| IpNet::V6(a.network().address()))),
        _ => {}
    }
}
