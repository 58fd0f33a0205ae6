//! One DNS message in, one decision out: a reply, a forward, or silence. Wire format by
//! hickory-proto; the names come from the [`Zone`].

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SRV};
use hickory_proto::rr::{DNSClass, Name, RData as HRData, Record, RecordType};

use super::fast;
use super::zone::{Answer, QType, RData, Rec, Zone};

/// Largest UDP reply we send when the client announces no EDNS buffer (RFC 1035).
pub(super) const CLASSIC_UDP: usize = 512;
/// The EDNS buffer we announce and cap replies at (the DNS flag day 2020 value).
pub(super) const EDNS_UDP: u16 = 1232;

/// What to do with a received packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: forward the packet unchanged to the upstream resolvers.
    Forward,
    /// Not worth an answer (too short to carry an id, or itself a response).
    Drop,
}

/// Decide what to answer to `packet`, received on `network`'s gateway. `udp` caps the reply
/// at the client's buffer size (truncating with TC set); over TCP anything up to 64 KiB goes.
/// The common query is answered by [`fast::answer`], the rest by [`general`].
pub fn handle(zone: &Zone, network: &str, packet: &[u8], ttl: u32, udp: bool) -> Outcome {
    let mut out = Vec::new();
    if fast::answer(zone, network, packet, ttl, udp, &mut out) {
        return Outcome::Reply(out);
    }
    general(zone, network, packet, ttl, udp)
}

/// [`handle`] through hickory-proto alone: every query the fast path declines comes here.
pub fn general(zone: &Zone, network: &str, packet: &[u8], ttl: u32, udp: bool) -> Outcome {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let req = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return Outcome::Reply(header_only(packet, ResponseCode::FormErr)),
    };
    if req.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if req.metadata.op_code != OpCode::Query {
        return Outcome::Reply(error_reply(&req, ResponseCode::NotImp));
    }
    let [q] = req.queries.as_slice() else {
        return Outcome::Reply(error_reply(&req, ResponseCode::FormErr));
    };
    if q.query_class() != DNSClass::IN {
        return Outcome::Forward;
    }
    let qtype = match q.query_type() {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::SRV => QType::Srv,
        RecordType::PTR => QType::Ptr,
        _ => QType::Other,
    };
    let (code, answers, additionals) = match zone.answer(network, &q.name().to_ascii(), qtype) {
        Answer::Forward => return Outcome::Forward,
        Answer::NxDomain => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
        Answer::Refused => return Outcome::Reply(error_reply(&req, ResponseCode::Refused)),
        Answer::Records {
            answers,
            additionals,
        } => (ResponseCode::NoError, answers, additionals),
    };
    let mut resp = reply_to(&req, code);
    resp.metadata.authoritative = true;
    resp.answers = answers.iter().filter_map(|r| record(q, r, ttl)).collect();
    resp.additionals = additionals
        .iter()
        .filter_map(|r| record(q, r, ttl))
        .collect();
    let limit = if !udp {
        usize::from(u16::MAX)
    } else {
        match &req.edns {
            Some(e) => usize::from(e.max_payload().clamp(512, EDNS_UDP)),
            None => CLASSIC_UDP,
        }
    };
    let mut bytes = match resp.to_vec() {
        Ok(b) => b,
        Err(_) => return Outcome::Reply(error_reply(&req, ResponseCode::ServFail)),
    };
    if bytes.len() > limit && !resp.additionals.is_empty() {
        // Additional records are optional: drop them before truncating.
        resp.additionals.clear();
        bytes = resp.to_vec().unwrap_or_default();
    }
    if bytes.len() > limit || bytes.is_empty() {
        resp.answers.clear();
        resp.metadata.truncation = true;
        bytes = resp.to_vec().unwrap_or_default();
    }
    Outcome::Reply(bytes)
}

fn reply_to(req: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    resp.metadata.response_code = code;
    resp.queries = req.queries.clone();
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_UDP);
        resp.edns = Some(e);
    }
    resp
}

/// An answer with no records and `code`, echoing the question.
pub fn error_reply(req: &Message, code: ResponseCode) -> Vec<u8> {
    reply_to(req, code)
        .to_vec()
        .unwrap_or_else(|_| header_only_parts(req.metadata.id, 0, code))
}

/// SERVFAIL for a query we could not get answered upstream.
pub fn servfail(packet: &[u8]) -> Vec<u8> {
    match Message::from_vec(packet) {
        Ok(req) => error_reply(&req, ResponseCode::ServFail),
        Err(_) => header_only(packet, ResponseCode::ServFail),
    }
}

/// REFUSED for a query from a source that may not ask here; None for what gets no answer
/// at all (too short to carry an id, or itself a response).
pub fn refused(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return None;
    }
    Some(match Message::from_vec(packet) {
        Ok(req) => error_reply(&req, ResponseCode::Refused),
        Err(_) => header_only(packet, ResponseCode::Refused),
    })
}

/// A bare header answering an unparsable packet: its id and opcode, QR set, no sections.
fn header_only(packet: &[u8], code: ResponseCode) -> Vec<u8> {
    header_only_parts(
        u16::from_be_bytes([packet[0], packet[1]]),
        packet[2] & 0x79,
        code,
    )
}

fn header_only_parts(id: u16, opcode_bits: u8, code: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80 | (opcode_bits & 0x78);
    h[3] = u16::from(code) as u8 & 0x0f;
    h
}

fn record(q: &Query, r: &Rec, ttl: u32) -> Option<Record> {
    let name = match &r.name {
        None => q.name().clone(),
        Some(n) => Name::from_ascii(format!("{n}.")).ok()?,
    };
    let data = match &r.data {
        RData::Addr(IpAddr::V4(a)) => HRData::A(A(*a)),
        RData::Addr(IpAddr::V6(a)) => HRData::AAAA(AAAA(*a)),
        RData::Srv { port, target } => HRData::SRV(SRV::new(
            0,
            10,
            *port,
            Name::from_ascii(format!("{target}.")).ok()?,
        )),
        RData::Ptr(n) => HRData::PTR(PTR(Name::from_ascii(format!("{n}.")).ok()?)),
    };
    Some(Record::from_rdata(name, ttl, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::discovery::DiscoveryView;
    use ferrynet_model::network::{keys, Endpoint, Network};

    fn zone() -> Zone {
        let mut v = DiscoveryView::default();
        let net = Network::bridged("blue", ["10.30.0.0/24".parse().unwrap()]);
        v.put(&keys::network("blue"), &serde_json::to_vec(&net).unwrap());
        for i in 0..100u8 {
            let ep = Endpoint {
                ips: vec![format!("10.30.0.{}/24", i + 2).parse().unwrap()],
                name: Some("many".into()),
                ..Endpoint::new("blue", &format!("c{i}"), "eth0")
            };
            v.put(
                &keys::endpoint("blue", &ep.container_id, "eth0"),
                &serde_json::to_vec(&ep).unwrap(),
            );
        }
        Zone::build(&v, "ferrynet.internal")
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(o: Outcome) -> Message {
        match o {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn answers_and_errors() {
        let z = zone();
        let r = reply(handle(
            &z,
            "blue",
            &query("many.blue.ferrynet.internal.", RecordType::A),
            2,
            false,
        ));
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.answers.len(), 100);
        assert_eq!(r.answers[0].ttl, 2);
        let r = reply(handle(
            &z,
            "blue",
            &query("nope.blue.ferrynet.internal.", RecordType::A),
            2,
            true,
        ));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            handle(&z, "blue", &query("example.org.", RecordType::A), 2, true),
            Outcome::Forward
        );
    }

    #[test]
    fn udp_replies_fit_or_truncate() {
        let z = zone();
        let r = reply(handle(
            &z,
            "blue",
            &query("many.blue.ferrynet.internal.", RecordType::A),
            2,
            true,
        ));
        assert!(r.metadata.truncation && r.answers.is_empty());
    }

    #[test]
    fn junk_gets_formerr_or_nothing() {
        let z = zone();
        assert_eq!(handle(&z, "blue", b"short", 2, true), Outcome::Drop);
        let mut garbage = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 4000]);
        let r = handle(&z, "blue", &garbage, 2, true);
        let Outcome::Reply(b) = r else {
            panic!("no reply")
        };
        assert_eq!(&b[..2], &[0xAB, 0xCD]);
        assert_eq!(b[3] & 0x0f, 1, "FORMERR");
        let q = query("many.blue.ferrynet.internal.", RecordType::A);
        let Outcome::Reply(b) = handle(&z, "blue", &q[..q.len() - 3], 2, true) else {
            panic!("no reply to a truncated query")
        };
        assert_eq!(b[3] & 0x0f, 1, "FORMERR");
        // A response is never answered (no loops between servers).
        let mut resp = q.clone();
        resp[2] |= 0x80;
        assert_eq!(handle(&z, "blue", &resp, 2, true), Outcome::Drop);
        let s = servfail(&q);
        assert_eq!(
            Message::from_vec(&s).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
    }

    #[test]
    fn refusals_echo_the_question_and_never_answer_responses() {
        let q = query("many.blue.ferrynet.internal.", RecordType::A);
        let r = Message::from_vec(&refused(&q).expect("a refusal")).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.answers.is_empty() && r.additionals.is_empty());
        assert_eq!(r.queries.len(), 1);
        let mut garbage = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let b = refused(&garbage).expect("a refusal");
        assert_eq!((&b[..2], b[3] & 0x0f, b.len()), (&[0xAB, 0xCD][..], 5, 12));
        garbage[2] |= 0x80;
        assert_eq!(refused(&garbage), None, "a response");
        assert_eq!(refused(b"short"), None);
    }
}
