//! Read-only questions to nf_tables over netlink (NETLINK_NETFILTER), for checks that must stay
//! cheap whatever the size of the ruleset.
//!
//! libnftables (1.0.6) fills its cache with every table, chain, set and set element of the
//! namespace before it runs any listing, even `list tables` or `list counters table T`: with a
//! policy table of 100,000 set elements each listing receives ~1.6 MB from the kernel and
//! builds a ~30 MiB cache, which glibc keeps in the caller's heap. Asking the kernel directly
//! for one chain, or for one table's counter objects, receives only those.

use std::os::fd::AsRawFd;

use netlink_packet_core::{DefaultNla, NlasIterator, NLM_F_DUMP};
use netlink_packet_netfilter::nftables::{ChainAttribute, ChainMessage, NfTablesMessage};
use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::netfilter::request;
use crate::nft::NftError;

/// How long one read may wait for the kernel.
const RECV_TIMEOUT_SECS: i64 = 5;

/// Netlink's own message types.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// nfnetlink's subsystem for nf_tables, and the replies read here.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWOBJ: u16 = 18;
/// NFTA_OBJ_* attributes, NFT_OBJECT_COUNTER and NFTA_COUNTER_* (linux/netfilter/nf_tables.h).
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// A named counter object: (name, packets, bytes).
pub type NamedCounter = (String, u64, u64);

fn io(op: &str, e: std::io::Error) -> NftError {
    NftError::Io(std::io::Error::new(e.kind(), format!("{op}: {e}")))
}

/// nft's family keyword as nfgenmsg's protocol family.
fn family_of(family: &str) -> Result<NetfilterProtoFamily, NftError> {
    Ok(match family {
        "inet" => NetfilterProtoFamily::Inet,
        "ip" => NetfilterProtoFamily::IPv4,
        "ip6" => NetfilterProtoFamily::IPv6,
        "bridge" => NetfilterProtoFamily::Bridge,
        "arp" => NetfilterProtoFamily::ARP,
        "netdev" => NetfilterProtoFamily::NetDev,
        other => return Err(NftError::Command(format!("unknown nft family {other:?}"))),
    })
}

/// One request's bytes.
fn request_bytes(
    family: NetfilterProtoFamily,
    msg: NfTablesMessage,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let m = request(family, msg, flags, seq);
    let mut out = vec![0u8; m.buffer_len()];
    m.serialize(&mut out);
    out
}

/// What one reply message says.
#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    /// An nf_tables message of this type; its attributes (after nfgenmsg).
    NfTables(u16, &'a [u8]),
    /// An error or acknowledgement: 0 or a negative errno.
    Error(i32),
    /// The end of a dump.
    Done,
    /// Anything else.
    Other,
}

/// Split one datagram into its messages of sequence number `seq` (others are skipped).
fn replies(data: &[u8], seq: u32) -> Result<Vec<Reply<'_>>, NftError> {
    let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= data.len() {
        let len = word(data, off) as usize;
        if len < 16 || off + len > data.len() {
            return Err(NftError::Command("truncated netlink message".into()));
        }
        let msg = &data[off..off + len];
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        if word(msg, 8) == seq {
            out.push(match kind {
                NLMSG_ERROR if len >= 20 => Reply::Error(word(msg, 16) as i32),
                NLMSG_DONE => Reply::Done,
                k if k >> 8 == NFNL_SUBSYS_NFTABLES && len >= 20 => {
                    Reply::NfTables(k & 0xff, &msg[20..])
                }
                _ => Reply::Other,
            });
        }
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// An nf_tables netlink socket in the calling thread's network namespace.
struct Query {
    sock: Socket,
    buf: Vec<u8>,
}

impl Query {
    fn open() -> Result<Query, NftError> {
        let mut sock =
            Socket::new(NETLINK_NETFILTER).map_err(|e| io("opening an nf_tables socket", e))?;
        sock.bind_auto()
            .map_err(|e| io("binding the nf_tables socket", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| io("connecting the nf_tables socket", e))?;
        // A kernel that never answers must not hold the caller's thread forever.
        // SAFETY: `sock` owns the descriptor and outlives `fd`, used only in this statement.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|e| io("setting the nf_tables receive timeout", e.into()))?;
        Ok(Query {
            sock,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// Send `req` (sequence number 1) and hand every reply to `each` until it returns false.
    fn exchange(
        &mut self,
        req: &[u8],
        mut each: impl FnMut(Reply<'_>) -> Result<bool, NftError>,
    ) -> Result<(), NftError> {
        self.sock
            .send(req, 0)
            .map_err(|e| io("sending an nf_tables request", e))?;
        loop {
            self.buf.clear();
            let n = self
                .sock
                .recv(&mut self.buf, 0)
                .map_err(|e| io("reading from nf_tables", e))?;
            for r in replies(&self.buf[..n.min(self.buf.len())], 1)? {
                if !each(r)? {
                    return Ok(());
                }
            }
        }
    }
}

fn errno(op: &str, code: i32) -> NftError {
    io(op, std::io::Error::from_raw_os_error(-code))
}

/// True when chain `chain` of table `family table` exists, in the calling thread's network
/// namespace; the kernel answers with that chain alone.
pub fn chain_exists(family: &str, table: &str, chain: &str) -> Result<bool, NftError> {
    let req = request_bytes(
        family_of(family)?,
        NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(table.to_string()),
                ChainAttribute::Name(chain.to_string()),
            ],
        }),
        0,
        1,
    );
    exists(&req, NFT_MSG_NEWCHAIN, "asking nf_tables for a chain")
}

/// Send a get request for one object: true when the kernel answers with a message of type
/// `answer`, false when it says ENOENT.
fn exists(req: &[u8], answer: u16, what: &str) -> Result<bool, NftError> {
    let mut found = None;
    Query::open()?.exchange(req, |r| match r {
        Reply::NfTables(t, _) if t == answer => {
            found = Some(true);
            Ok(false)
        }
        Reply::Error(0) => Ok(found.is_none()),
        Reply::Error(e) if -e == libc::ENOENT => {
            found = Some(false);
            Ok(false)
        }
        Reply::Error(e) => Err(errno(what, e)),
        _ => Ok(true),
    })?;
    Ok(found.unwrap_or(false))
}

/// The counter objects of table `family table` (None: no such table), in the calling
/// thread's network namespace; the kernel sends those objects alone.
pub fn counters(family: &str, table: &str) -> Result<Option<Vec<NamedCounter>>, NftError> {
    // A dump filtered by table and object type (the kernel honours both).
    let req = request_bytes(
        family_of(family)?,
        NfTablesMessage::GetObject(vec![
            DefaultNla::new(NFTA_OBJ_TABLE, nul_terminated(table)),
            DefaultNla::new(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER.to_be_bytes().to_vec()),
        ]),
        NLM_F_DUMP,
        1,
    );
    let mut out = Vec::new();
    Query::open()?.exchange(&req, |r| match r {
        Reply::NfTables(NFT_MSG_NEWOBJ, attrs) => {
            out.extend(counter_of(attrs));
            Ok(true)
        }
        Reply::Done => Ok(false),
        Reply::Error(0) => Ok(true),
        Reply::Error(e) => Err(errno("dumping nf_tables counters", e)),
        _ => Ok(true),
    })?;
    // A dump of a missing table is empty, not an error: tell the two apart with one more,
    // equally small, question only when there is nothing.
    if out.is_empty() && !table_exists(family, table)? {
        return Ok(None);
    }
    out.sort();
    Ok(Some(out))
}

/// True when table `family table` exists.
pub fn table_exists(family: &str, table: &str) -> Result<bool, NftError> {
    // NFT_MSG_GETTABLE with NFTA_TABLE_NAME (1): the kernel answers with that table alone.
    let req = request_bytes(
        family_of(family)?,
        NfTablesMessage::Other {
            message_type: 1,
            attributes: vec![DefaultNla::new(1, nul_terminated(table))],
        },
        0,
        1,
    );
    // NFT_MSG_NEWTABLE (0) is the answer.
    exists(&req, 0, "asking nf_tables for a table")
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One NEWOBJ message's counter: its name and NFTA_OBJ_DATA's packets and bytes.
fn counter_of(attrs: &[u8]) -> Option<NamedCounter> {
    let mut name = None;
    let mut kind = None;
    let (mut packets, mut bytes) = (0, 0);
    let be64 = |v: &[u8]| <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes);
    for nla in NlasIterator::new(attrs).flatten() {
        let v = nla.value();
        match nla.kind() & netlink_packet_core::NLA_TYPE_MASK {
            NFTA_OBJ_NAME => {
                name = Some(String::from_utf8_lossy(v.strip_suffix(&[0]).unwrap_or(v)).into())
            }
            NFTA_OBJ_TYPE => kind = <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes),
            NFTA_OBJ_DATA => {
                for d in NlasIterator::new(v).flatten() {
                    match d.kind() & netlink_packet_core::NLA_TYPE_MASK {
                        NFTA_COUNTER_PACKETS => packets = be64(d.value()).unwrap_or(0),
                        NFTA_COUNTER_BYTES => bytes = be64(d.value()).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (kind == Some(NFT_OBJECT_COUNTER)).then_some(())?;
    Some((name?, packets, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::in_private_netns;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        v.extend(kind.to_ne_bytes());
        v.extend(value);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    fn counter_objects_are_decoded() {
        let mut data = nla(1, &3u64.to_be_bytes());
        data.extend(nla(2, &7u64.to_be_bytes()));
        let mut attrs = nla(NFTA_OBJ_NAME, b"dropped\0");
        attrs.extend(nla(NFTA_OBJ_TYPE, &1u32.to_be_bytes()));
        attrs.extend(nla(NFTA_OBJ_DATA | 0x8000, &data));
        assert_eq!(counter_of(&attrs), Some(("dropped".into(), 7, 3)));
        // A quota object of the same name is not a counter.
        let mut quota = nla(NFTA_OBJ_NAME, b"q\0");
        quota.extend(nla(NFTA_OBJ_TYPE, &2u32.to_be_bytes()));
        assert_eq!(counter_of(&quota), None);
    }

    #[test]
    fn replies_keep_their_sequence_and_reject_truncation() {
        let msg = |kind: u16, seq: u32, body: &[u8]| {
            let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
            m.extend(kind.to_ne_bytes());
            m.extend(0u16.to_ne_bytes());
            m.extend(seq.to_ne_bytes());
            m.extend(0u32.to_ne_bytes());
            m.extend(body);
            m
        };
        let mut d = msg(NLMSG_ERROR, 1, &(-2i32).to_ne_bytes());
        d.extend(msg(NLMSG_ERROR, 9, &0i32.to_ne_bytes()));
        d.extend(msg(
            NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWCHAIN,
            1,
            &[1, 0, 0, 0],
        ));
        d.extend(msg(NLMSG_DONE, 1, &[0, 0, 0, 0]));
        assert_eq!(
            replies(&d, 1).unwrap(),
            vec![
                Reply::Error(-2),
                Reply::NfTables(NFT_MSG_NEWCHAIN, &[]),
                Reply::Done
            ]
        );
        assert!(replies(&d[..d.len() - 2], 1).is_err());
    }

    #[test]
    fn kernel_answers_for_one_chain_and_one_tables_counters() {
        in_private_netns(|| {
            let nft = crate::nft::NftBinary;
            use crate::nft::NftExecutor;
            assert!(!chain_exists("inet", "fnq", "base").unwrap());
            assert!(!table_exists("inet", "fnq").unwrap());
            assert_eq!(counters("inet", "fnq").unwrap(), None);
            nft.apply(
                "table inet fnq {\n counter dropped { packets 5 bytes 300 }\n counter z {\n }\n \
                 quota q { 10 mbytes }\n set s { type ipv4_addr; elements = { 10.0.0.1 } }\n \
                 chain base { type filter hook forward priority 0; }\n}\n\
                 table ip fnq {\n counter other {\n }\n}\n",
            )
            .unwrap();
            assert!(chain_exists("inet", "fnq", "base").unwrap());
            assert!(!chain_exists("inet", "fnq", "nope").unwrap());
            // Same table name, other family: not this one.
            assert!(!chain_exists("ip", "fnq", "base").unwrap());
            assert_eq!(
                counters("inet", "fnq").unwrap(),
                Some(vec![("dropped".into(), 5, 300), ("z".into(), 0, 0)])
            );
            nft.apply("table inet fnr {}").unwrap();
            assert_eq!(counters("inet", "fnr").unwrap(), Some(vec![]));
            // A flushed ruleset: gone.
            nft.apply("flush ruleset").unwrap();
            assert!(!chain_exists("inet", "fnq", "base").unwrap());
            assert_eq!(counters("inet", "fnq").unwrap(), None);
        });
    }
}
