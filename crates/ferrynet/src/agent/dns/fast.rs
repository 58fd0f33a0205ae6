//! A hand-written answer for the one query that dominates a cluster's traffic: a single A or
//! AAAA question, class IN, for a container, alias or service name of the network, with no
//! EDNS or plain EDNS (version 0, no options), answered from the compiled [`Zone`].
//!
//! Why not hickory-proto here: decoding a [`Message`](hickory_proto::op::Message) and
//! re-encoding the reply costs a dozen allocations per query (the message, its query and
//! record vectors, the name's labels, `to_ascii`, the lower-case copy, the records' names);
//! this path reads the question in place, lower-cases it into a stack buffer, looks it up
//! without allocating and writes the reply into the caller's reused buffer. `bench/dns.py`
//! measures the difference (docs/BENCHMARKS.md, "DNS queries per second"). Anything else —
//! other types, several questions, compressed or unusual names, EDNS options, replies that
//! would need truncation, names the zone does not answer from its names map — is declined
//! and goes to the hickory-proto path, which stays the reference: the tests below check that
//! both give the same bytes.

use std::net::IpAddr;

use super::wire::{CLASSIC_UDP, EDNS_UDP};
use super::zone::Zone;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Longest name on the wire (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;

fn u16_at(p: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]))
}

/// Write the reply to `packet` into `out` and return true, or return false (leaving `out` in
/// any state) when the query is not the common case; `udp` as in [`super::wire::handle`].
pub fn answer(
    zone: &Zone,
    network: &str,
    packet: &[u8],
    ttl: u32,
    udp: bool,
    out: &mut Vec<u8>,
) -> bool {
    let Some(arcount) = plain_header(packet) else {
        return false;
    };
    let mut lower = [0u8; MAX_NAME];
    let Some((len, i)) = question_name(packet, &mut lower) else {
        return false;
    };
    let qend = i + 4;
    let (Some(qtype), Some(qclass)) = (u16_at(packet, i), u16_at(packet, i + 2)) else {
        return false;
    };
    if qclass != CLASS_IN || (qtype != TYPE_A && qtype != TYPE_AAAA) {
        return false;
    }
    let Some(edns_payload) = plain_edns(packet, qend, arcount) else {
        return false;
    };
    let Ok(lower) = std::str::from_utf8(&lower[..len]) else {
        return false;
    };
    let Some(addrs) = zone.names_hit(network, lower) else {
        return false;
    };
    let want_v6 = qtype == TYPE_AAAA;
    let count = addrs.iter().filter(|a| a.is_ipv6() == want_v6).count();
    let Ok(ancount) = u16::try_from(count) else {
        return false;
    };
    let limit = match (udp, edns_payload) {
        (false, _) => usize::from(u16::MAX),
        (true, Some(p)) => usize::from(p.clamp(512, EDNS_UDP)),
        (true, None) => CLASSIC_UDP,
    };
    let rdlen = if want_v6 { 16 } else { 4 };
    let size = qend + count * (12 + rdlen) + if edns_payload.is_some() { 11 } else { 0 };
    if size > limit {
        // Truncation (and its TC bit) is the general path's business.
        return false;
    }
    out.clear();
    out.reserve(size);
    out.extend_from_slice(&packet[..2]);
    // QR, AA, the client's RD; RA, the client's CD; NOERROR.
    out.push(0x84 | (packet[2] & 0x01));
    out.push(0x80 | (packet[3] & 0x10));
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&ancount.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, u8::from(edns_payload.is_some())]);
    out.extend_from_slice(&packet[12..qend]);
    for a in addrs.iter().filter(|a| a.is_ipv6() == want_v6) {
        // The owner is the question's name: a pointer to offset 12.
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdlen as u16).to_be_bytes());
        match a {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    if edns_payload.is_some() {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_UDP.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    true
}

/// A plain query's header: QR 0, opcode QUERY, AA, TC, Z and RCODE clear, one question, no
/// answers or authority, at most one additional record (its count).
#[inline]
fn plain_header(packet: &[u8]) -> Option<u16> {
    if packet.len() < 12 {
        return None;
    }
    if packet[2] & 0xfe != 0 || packet[3] & 0x4f != 0 {
        return None;
    }
    if u16_at(packet, 4) != Some(1) || u16_at(packet, 6) != Some(0) || u16_at(packet, 8) != Some(0)
    {
        return None;
    }
    let arcount = u16_at(packet, 10).unwrap_or(u16::MAX);
    (arcount <= 1).then_some(arcount)
}

/// The question name: plain labels of letters, digits, `-` and `_` (so hickory's `to_ascii`
/// would spell it the same), lower-cased into `lower` with dots between labels; its length
/// there and the offset after it in `packet`.
#[inline]
fn question_name(packet: &[u8], lower: &mut [u8; MAX_NAME]) -> Option<(usize, usize)> {
    let mut len = 0;
    let mut i = 12;
    loop {
        let l = usize::from(*packet.get(i)?);
        if l == 0 {
            i += 1;
            break;
        }
        // 0xc0 is a compression pointer, 0x40/0x80 extended labels: not in a plain query.
        if l > 63 || i + 1 + l > packet.len() || len + l + 1 > MAX_NAME {
            return None;
        }
        if len > 0 {
            lower[len] = b'.';
            len += 1;
        }
        for &c in &packet[i + 1..i + 1 + l] {
            if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                return None;
            }
            lower[len] = c.to_ascii_lowercase();
            len += 1;
        }
        i += 1 + l;
    }
    if len == 0 || i - 12 > MAX_NAME {
        return None;
    }
    Some((len, i))
}

/// Nothing after the question (ending at `qend`) but, optionally, one plain OPT record: root
/// name, version 0, no flags but DO, no options. None: not the common case; Some(payload): the
/// client's EDNS payload size, if it sent one.
#[inline]
fn plain_edns(packet: &[u8], qend: usize, arcount: u16) -> Option<Option<u16>> {
    if arcount != 1 {
        return (packet.len() == qend).then_some(None);
    }
    let opt = &packet[qend.min(packet.len())..];
    if opt.len() != 11
        || opt[0] != 0
        || u16_at(opt, 1) != Some(TYPE_OPT)
        || opt[5..7] != [0, 0]
        || opt[7] & 0x7f != 0
        || opt[8] != 0
        || opt[9..11] != [0, 0]
    {
        return None;
    }
    Some(u16_at(opt, 3))
}

#[cfg(test)]
mod tests {
    use super::super::wire::{general, Outcome};
    use super::*;
    use ferrynet_model::discovery::DiscoveryView;
    use ferrynet_model::network::{keys, Endpoint, Network};

    fn endpoint(id: &str, name: &str, aliases: &[&str], ips: &[&str]) -> Endpoint {
        Endpoint {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            name: Some(name.into()),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            ..Endpoint::new("blue", id, "eth0")
        }
    }

    fn zone() -> Zone {
        let mut v = DiscoveryView::default();
        let net = Network::bridged(
            "blue",
            [
                "10.30.0.0/24".parse().unwrap(),
                "fd30::/64".parse().unwrap(),
            ],
        );
        v.put(&keys::network("blue"), &serde_json::to_vec(&net).unwrap());
        let mut eps = vec![
            endpoint("a", "Web", &["www_1"], &["10.30.0.2/24", "fd30::2/64"]),
            endpoint("b", "db", &[], &["10.30.0.3/24"]),
            endpoint("c", "blue", &[], &["10.30.0.4/24"]),
        ];
        // Fifty containers sharing one name: too many A records for 512 bytes.
        for i in 0..50u8 {
            eps.push(endpoint(
                &format!("m{i}"),
                "many",
                &[],
                &[&format!("10.30.0.{}/24", i + 100)],
            ));
        }
        for ep in &eps {
            v.put(
                &keys::endpoint("blue", &ep.container_id, "eth0"),
                &serde_json::to_vec(ep).unwrap(),
            );
        }
        Zone::build(&v, "ferrynet.internal")
    }

    /// A query written byte by byte: id 0xbeef, RD and AD set (as dig sends), `labels` as given.
    fn query(labels: &[&str], qtype: u16, edns: Option<[u8; 11]>) -> Vec<u8> {
        let mut p = vec![0xbe, 0xef, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 0];
        p[11] = u8::from(edns.is_some());
        for l in labels {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(e) = edns {
            p.extend_from_slice(&e);
        }
        p
    }

    /// OPT: root, type 41, payload, extended rcode, version, flags, no options.
    fn opt(payload: u16, version: u8, flags: u16) -> [u8; 11] {
        let [p0, p1] = payload.to_be_bytes();
        let [f0, f1] = flags.to_be_bytes();
        [0, 0, 41, p0, p1, 0, version, f0, f1, 0, 0]
    }

    fn fast(z: &Zone, p: &[u8], udp: bool) -> Option<Vec<u8>> {
        let mut out = vec![0xaa; 7];
        answer(z, "blue", p, 7, udp, &mut out).then_some(out)
    }

    fn hickory(z: &Zone, p: &[u8], udp: bool) -> Vec<u8> {
        match general(z, "blue", p, 7, udp) {
            Outcome::Reply(b) => b,
            other => panic!("hickory path did not reply: {other:?}"),
        }
    }

    #[test]
    fn same_bytes_as_hickory() {
        let z = zone();
        let plain = opt(4096, 0, 0);
        let small = opt(100, 0, 0);
        let dnssec_ok = opt(1232, 0, 0x8000);
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (query(&["web"], TYPE_A, None), 1),
            (query(&["WEB"], TYPE_A, None), 1),
            (query(&["wEb"], TYPE_AAAA, None), 1),
            (query(&["www_1"], TYPE_A, None), 1),
            (
                query(&["web", "blue", "ferrynet", "internal"], TYPE_A, None),
                1,
            ),
            (
                query(&["Db", "BLUE", "Ferrynet", "INTERNAL"], TYPE_A, None),
                1,
            ),
            (query(&["db"], TYPE_AAAA, None), 0),
            (
                query(&["blue", "blue", "ferrynet", "internal"], TYPE_A, None),
                1,
            ),
            (query(&["web"], TYPE_A, Some(plain)), 1),
            (query(&["web"], TYPE_AAAA, Some(small)), 1),
            (query(&["web"], TYPE_A, Some(dnssec_ok)), 1),
            (query(&["many"], TYPE_A, Some(plain)), 50),
        ];
        for (q, n) in &cases {
            for udp in [true, false] {
                let f = fast(&z, q, udp).unwrap_or_else(|| panic!("declined {q:?}"));
                assert_eq!(f, hickory(&z, q, udp), "query {q:?} udp {udp}");
                assert_eq!(usize::from(u16::from_be_bytes([f[6], f[7]])), *n);
            }
        }
        // Without TC or CD the flags follow the client's.
        let mut q = query(&["web"], TYPE_A, None);
        q[2] = 0;
        q[3] = 0x10;
        assert_eq!(fast(&z, &q, true).unwrap(), hickory(&z, &q, true));
    }

    #[test]
    fn declines_everything_else() {
        let z = zone();
        let good = query(&["web"], TYPE_A, None);
        let mut declined: Vec<(&str, Vec<u8>)> = vec![
            ("short", good[..11].to_vec()),
            ("truncated question", good[..good.len() - 1].to_vec()),
            ("trailing byte", [good.clone(), vec![0]].concat()),
            ("root name", query(&[], TYPE_A, None)),
            ("MX", query(&["web"], 15, None)),
            ("SRV", query(&["_http", "_tcp", "web"], 33, None)),
            (
                "PTR",
                query(&["2", "0", "30", "10", "in-addr", "arpa"], 12, None),
            ),
            ("unknown name", query(&["nope"], TYPE_A, None)),
            ("forwarded", query(&["example", "org"], TYPE_A, None)),
            ("the domain", query(&["ferrynet", "internal"], TYPE_A, None)),
            (
                "the network",
                query(&["blue", "ferrynet", "internal"], TYPE_A, None),
            ),
            (
                "tasks",
                query(
                    &["tasks", "web", "blue", "ferrynet", "internal"],
                    TYPE_A,
                    None,
                ),
            ),
            ("dot in a label", query(&["we.b"], TYPE_A, None)),
            ("space in a label", query(&["we b"], TYPE_A, None)),
            (
                "EDNS version 1",
                query(&["web"], TYPE_A, Some(opt(1232, 1, 0))),
            ),
            (
                "EDNS flags",
                query(&["web"], TYPE_A, Some(opt(1232, 0, 0x0001))),
            ),
            ("too big for 512", query(&["many"], TYPE_A, None)),
            (
                "too big for EDNS 512",
                query(&["many"], TYPE_A, Some(opt(512, 0, 0))),
            ),
        ];
        let mut e = query(&["web"], TYPE_A, Some(opt(1232, 0, 0)));
        // An option (cookie, 8 bytes) in the OPT record.
        let l = e.len();
        e[l - 1] = 12;
        e.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        declined.push(("EDNS option", e));
        let c = [&good[..12], &[0xc0, 0x0c, 0, 1, 0, 1][..]].concat();
        declined.push(("compression pointer", c));
        let mut ch = good.clone();
        let l = ch.len();
        ch[l - 1] = 3;
        declined.push(("class CH", ch));
        for (byte, bits, what) in [
            (2, 0x80, "a response"),
            (2, 0x10, "opcode 2"),
            (2, 0x02, "TC"),
            (3, 0x01, "rcode"),
            (5, 0x01, "qdcount 0"),
            (7, 0x01, "an answer"),
            (11, 0x02, "two additionals"),
        ] {
            let mut m = good.clone();
            m[byte] ^= bits;
            declined.push((what, m));
        }
        let mut two = good.clone();
        two[5] = 2;
        two.extend_from_slice(&good[12..]);
        declined.push(("two questions", two));
        for (what, q) in &declined {
            for udp in [true, false] {
                // Over TCP they fit: only UDP's limit makes them the general path's.
                if what.starts_with("too big") && !udp {
                    continue;
                }
                assert_eq!(fast(&z, q, udp), None, "{what} was not declined");
            }
        }
        // And they still get the general path's answers: FORMERR, truncation, NXDOMAIN.
        let junk = hickory(&z, &declined[1].1, true);
        assert_eq!(junk[3] & 0x0f, 1);
        let tc = hickory(&z, &query(&["many"], TYPE_A, None), true);
        assert_eq!(tc[2] & 0x02, 0x02);
        let nx = hickory(
            &z,
            &query(&["x", "blue", "ferrynet", "internal"], TYPE_A, None),
            true,
        );
        assert_eq!(nx[3] & 0x0f, 3);
    }
}
