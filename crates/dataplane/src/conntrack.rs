//! Conntrack entries through the kernel's ctnetlink API (NETLINK_NETFILTER): dump the table and
//! delete the entries a [`FlushRule`] calls stale, in the calling thread's network namespace.
//!
//! Messages are built and parsed with `netlink-packet-netfilter` (conntrack GET dump and
//! DELETE by original tuple); the socket is a plain blocking `netlink-sys` socket, since a
//! flush is one dump and a few deletes done on a blocking thread. The kernel's own dump
//! filters (CTA_FILTER) cannot express "reply source not in this set", so the table is dumped
//! whole and filtered here; deleting by the original tuple (and zone) is exact.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ferrynet_model::conntrack::{involves, is_stale, Flow, FlushRule};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Status, Tuple,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::error::{DataplaneError, Result};
use crate::netfilter::request;

/// How long one read from ctnetlink may wait.
const RECV_TIMEOUT_SECS: i64 = 5;

/// CTA_ZONE: a non-default zone must be given back for the delete to find the entry.
const CTA_ZONE: u16 = 18;

/// One entry of the dump: what the model decides on, and what the kernel needs to delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The decoded flow.
    pub flow: Flow,
    /// The original tuple as the kernel sent it (given back verbatim to delete the entry).
    orig: Vec<Tuple>,
    /// Its zone attribute, if any.
    zone: Option<Vec<u8>>,
    /// IPv6 (else IPv4): the family the delete request is addressed to.
    v6: bool,
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Entries read from the table.
    pub scanned: usize,
    /// Entries deleted.
    pub deleted: usize,
}

fn err(op: &str, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Io {
        op: op.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn ioerr(op: &str) -> impl FnOnce(std::io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io {
        op: op.to_string(),
        source,
    }
}

/// Addresses and ports of one direction's tuple.
#[derive(Default)]
struct Ends {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

fn ends(tuple: &[Tuple]) -> Ends {
    let mut e = Ends::default();
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for i in ips {
                    match i {
                        IPTuple::SourceAddress(a) => e.src = Some(*a),
                        IPTuple::DestinationAddress(a) => e.dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => e.proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => e.sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => e.dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    e
}

/// Decode one conntrack message's attributes into an entry; `None` for entries without ports
/// (ICMP and other protocols: nothing ferrynet translates by port) or without a reply tuple.
pub fn decode_entry(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let mut orig = None;
    let mut reply = None;
    let mut status = Status::empty();
    let mut zone = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t.clone()),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
            ConntrackAttribute::CtaStatus(s) => status = *s,
            ConntrackAttribute::Other(nla) if netlink_packet_core::Nla::kind(nla) == CTA_ZONE => {
                let mut v = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
                netlink_packet_core::Nla::emit_value(nla, &mut v);
                zone = Some(v);
            }
            _ => {}
        }
    }
    let orig = orig?;
    let o = ends(&orig);
    let r = ends(reply?);
    let flow = Flow {
        protocol: o.proto?,
        orig_src: o.src?,
        orig_dst: o.dst?,
        orig_sport: o.sport?,
        orig_dport: o.dport?,
        reply_src: r.src?,
        reply_sport: r.sport?,
        dnat: status.contains(Status::DstNat),
    };
    let v6 = flow.orig_src.is_ipv6();
    Some(Entry {
        flow,
        orig,
        zone,
        v6,
    })
}

/// The DELETE request for an entry (original tuple and zone).
pub fn delete_message(e: &Entry, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(e.orig.clone())];
    if let Some(z) = &e.zone {
        attrs.push(ConntrackAttribute::Other(
            netlink_packet_core::DefaultNla::new(CTA_ZONE, z.clone()),
        ));
    }
    let family = if e.v6 {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    };
    request(family, ConntrackMessage::Delete(attrs), NLM_F_ACK, seq)
}

/// A ctnetlink socket in the calling thread's network namespace.
pub struct Conntrack {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    /// Open a ctnetlink socket in the namespace of the calling thread.
    pub fn open() -> Result<Conntrack> {
        let mut sock =
            Socket::new(NETLINK_NETFILTER).map_err(ioerr("opening a ctnetlink socket"))?;
        sock.bind_auto()
            .map_err(ioerr("binding the ctnetlink socket"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(ioerr("connecting the ctnetlink socket"))?;
        // A kernel that never answers must not hold the caller's thread forever.
        // SAFETY: `sock` owns the descriptor and outlives `fd`, used only in this statement.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|source| DataplaneError::Nix {
            op: "setting the ctnetlink receive timeout".into(),
            source,
        })?;
        Ok(Conntrack {
            sock,
            seq: 0,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    fn send(&mut self, m: &NetlinkMessage<NetfilterMessage>) -> Result<()> {
        let mut out = vec![0u8; m.buffer_len()];
        m.serialize(&mut out);
        self.sock
            .send(&out, 0)
            .map_err(ioerr("sending a ctnetlink request"))?;
        Ok(())
    }

    /// Receive one datagram and hand each netlink message in it to `each` (header length and
    /// parsed message; `None` when its payload does not parse). Returns false once `each`
    /// says the exchange is over.
    fn recv_each(
        &mut self,
        mut each: impl FnMut(Option<NetlinkMessage<NetfilterMessage>>) -> Result<bool>,
    ) -> Result<bool> {
        self.buf.clear();
        let n = self
            .sock
            .recv(&mut self.buf, 0)
            .map_err(ioerr("reading from ctnetlink"))?;
        let data = &self.buf[..n.min(self.buf.len())];
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            if len < 16 || off + len > data.len() {
                return Err(err("reading from ctnetlink", "truncated netlink message"));
            }
            let parsed =
                NetlinkMessage::<NetfilterMessage>::deserialize(&data[off..off + len]).ok();
            if !each(parsed)? {
                return Ok(false);
            }
            off += (len + 3) & !3;
        }
        Ok(true)
    }

    /// Every entry with ports in the table (IPv4 and IPv6). Entries the crate cannot parse are
    /// skipped (they belong to protocols ferrynet does not translate).
    pub fn dump(&mut self) -> Result<Vec<Entry>> {
        self.seq = self.seq.wrapping_add(1);
        let m = request(
            NetfilterProtoFamily::Unspec,
            ConntrackMessage::Get(vec![]),
            NLM_F_DUMP,
            self.seq,
        );
        self.send(&m)?;
        let mut out = Vec::new();
        while self.recv_each(|msg| {
            let Some(msg) = msg else { return Ok(true) };
            match msg.payload {
                NetlinkPayload::Done(_) => Ok(false),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    Err(err("dumping conntrack", e.to_io()))
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                    ..
                }) => {
                    out.extend(decode_entry(&attrs));
                    Ok(true)
                }
                _ => Ok(true),
            }
        })? {}
        Ok(out)
    }

    /// Delete one entry; false when it was already gone.
    pub fn delete(&mut self, e: &Entry) -> Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(&delete_message(e, seq))?;
        let mut result = None;
        while result.is_none() {
            self.recv_each(|msg| {
                if let Some(m) = msg {
                    let NetlinkPayload::Error(e) = &m.payload else {
                        return Ok(true);
                    };
                    if m.header.sequence_number == seq {
                        result = Some(match e.raw_code().abs() {
                            0 => Ok(true),
                            libc::ENOENT => Ok(false),
                            _ => Err(err("deleting a conntrack entry", e.to_io())),
                        });
                        return Ok(false);
                    }
                }
                Ok(true)
            })?;
        }
        result.unwrap_or(Ok(false))
    }

    /// Delete every entry that one of `rules` calls stale. Run it after the nft transaction
    /// that stops new flows from reaching the departed targets, or a packet in between could
    /// re-create what was just deleted.
    pub fn flush(&mut self, rules: &[FlushRule]) -> Result<FlushStats> {
        if rules.is_empty() {
            return Ok(FlushStats::default());
        }
        let entries = self.dump()?;
        let mut stats = FlushStats {
            scanned: entries.len(),
            deleted: 0,
        };
        let mut local: Option<BTreeSet<IpAddr>> = None;
        let needs_local = rules
            .iter()
            .any(|r| r.stale == ferrynet_model::conntrack::Stale::Undelivered);
        if needs_local {
            local = Some(local_addresses()?);
        }
        let is_local = |a: IpAddr| local.as_ref().is_some_and(|l| l.contains(&a));
        self.delete_where(&entries, &mut stats, |f| is_stale(rules, f, &is_local))?;
        Ok(stats)
    }

    /// Delete every entry with one of `addrs` at either end (`model::conntrack::involves`).
    pub fn flush_addresses(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<FlushStats> {
        if addrs.is_empty() {
            return Ok(FlushStats::default());
        }
        let entries = self.dump()?;
        let mut stats = FlushStats {
            scanned: entries.len(),
            deleted: 0,
        };
        self.delete_where(&entries, &mut stats, |f| involves(f, addrs))?;
        Ok(stats)
    }

    fn delete_where(
        &mut self,
        entries: &[Entry],
        stats: &mut FlushStats,
        stale: impl Fn(&Flow) -> bool,
    ) -> Result<()> {
        for e in entries {
            if stale(&e.flow) && self.delete(e)? {
                stats.deleted += 1;
            }
        }
        Ok(())
    }
}

/// Delete the entries with one of `addrs` at either end, in the calling thread's network
/// namespace.
pub fn flush_addresses(addrs: &BTreeSet<IpAddr>) -> Result<FlushStats> {
    if addrs.is_empty() {
        return Ok(FlushStats::default());
    }
    Conntrack::open()?.flush_addresses(addrs)
}

/// The environment variable that, set to `off`, keeps stale entries: only `bench/failover.py`
/// sets it, to measure its anchor (the behaviour before conntrack followed producers).
pub const DISABLE_ENV: &str = "FERRYNET_CONNTRACK_FLUSH";

/// False when [`DISABLE_ENV`] is `off`.
pub fn flush_enabled() -> bool {
    std::env::var(DISABLE_ENV).map_or(true, |v| v != "off")
}

/// Delete the entries `rules` call stale, in the calling thread's network namespace.
pub fn flush(rules: &[FlushRule]) -> Result<FlushStats> {
    if rules.is_empty() {
        return Ok(FlushStats::default());
    }
    Conntrack::open()?.flush(rules)
}

/// Every address of the calling thread's network namespace.
fn local_addresses() -> Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|source| DataplaneError::Nix {
        op: "listing local addresses".into(),
        source,
    })?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLM_F_REQUEST;
    use netlink_packet_netfilter::conntrack::Protocol as CtProto;

    fn tuple(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProto::from(proto)),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    /// An entry as the kernel sends it in a dump, through the wire format and back.
    fn wire(attrs: Vec<ConntrackAttribute>) -> Vec<ConntrackAttribute> {
        let m = request(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::New(attrs),
            0,
            0,
        );
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        match NetlinkMessage::<NetfilterMessage>::deserialize(&buf)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(a)),
                ..
            }) => a,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_dnated_udp_entry_decodes_and_its_delete_carries_tuple_and_zone() {
        let attrs = wire(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.20.0.9", "10.96.0.5", 17, 40000, 53)),
            ConntrackAttribute::CtaTupleReply(tuple("10.20.0.2", "10.20.0.9", 17, 5300, 40000)),
            ConntrackAttribute::CtaStatus(Status::DstNat | Status::Confirmed),
            ConntrackAttribute::Other(netlink_packet_core::DefaultNla::new(CTA_ZONE, vec![0, 7])),
        ]);
        let e = decode_entry(&attrs).expect("entry");
        assert_eq!(
            e.flow,
            Flow {
                protocol: 17,
                orig_src: "10.20.0.9".parse().unwrap(),
                orig_dst: "10.96.0.5".parse().unwrap(),
                orig_sport: 40000,
                orig_dport: 53,
                reply_src: "10.20.0.2".parse().unwrap(),
                reply_sport: 5300,
                dnat: true,
            }
        );
        let del = delete_message(&e, 9);
        let mut buf = vec![0u8; del.buffer_len()];
        del.serialize(&mut buf);
        // nlmsg_type: NFNL_SUBSYS_CTNETLINK (1) << 8 | IPCTNL_MSG_CT_DELETE (2).
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x0102);
        // Request + ack.
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        // nfgen_family AF_INET.
        assert_eq!(buf[16], libc::AF_INET as u8);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        match back.payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(a)),
                ..
            }) => {
                assert_eq!(
                    a[0],
                    ConntrackAttribute::CtaTupleOrig(tuple(
                        "10.20.0.9",
                        "10.96.0.5",
                        17,
                        40000,
                        53
                    ))
                );
                assert!(matches!(&a[1], ConntrackAttribute::Other(n)
                    if netlink_packet_core::Nla::kind(n) == CTA_ZONE));
                assert_eq!(a.len(), 2);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn ipv6_and_unnated_entries_decode_and_portless_ones_are_skipped() {
        let attrs = wire(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("fd20::9", "fd00:96::5", 6, 40000, 80)),
            ConntrackAttribute::CtaTupleReply(tuple("fd00:96::5", "fd20::9", 6, 80, 40000)),
            ConntrackAttribute::CtaStatus(Status::Confirmed),
        ]);
        let e = decode_entry(&attrs).expect("entry");
        assert!(!e.flow.dnat);
        assert!(e.v6);
        let mut buf = vec![0u8; delete_message(&e, 1).buffer_len()];
        delete_message(&e, 1).serialize(&mut buf);
        assert_eq!(buf[16], libc::AF_INET6 as u8);
        // ICMP: no ports, nothing to decide on.
        let icmp = vec![
            ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![
                IPTuple::SourceAddress("10.0.0.1".parse().unwrap()),
                IPTuple::DestinationAddress("10.0.0.2".parse().unwrap()),
            ])]),
            ConntrackAttribute::CtaTupleReply(vec![]),
        ];
        assert!(decode_entry(&icmp).is_none());
    }
}
