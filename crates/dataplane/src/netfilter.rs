//! What the netfilter netlink users (ctnetlink in `conntrack`, nf_tables in `nft_netlink`)
//! share: the request header every message carries.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

/// One netfilter request of `family`: `msg` with `flags` (NLM_F_REQUEST added) and `seq`.
pub(crate) fn request(
    family: NetfilterProtoFamily,
    msg: impl Into<NetfilterMessageInner>,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | flags;
    hdr.sequence_number = seq;
    let mut m = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            msg,
        )),
    );
    m.finalize();
    m
}

/// Run `f` in a thread-private network namespace (gone when the thread ends), for tests that
/// talk to the kernel.
#[cfg(test)]
pub(crate) fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (run as root)");
        f()
    })
    .join()
    .expect("thread")
}
