//! The interface a UDP query came in on. A source inside the network's subnets is only
//! believed when the datagram arrived on the network's bridge (or on `lo`, from the host
//! itself): the same source address sent by an underlay neighbour — which the kernel delivers
//! to the gateway address when reverse-path filtering is off — is dropped unanswered, so it
//! can neither use the forwarder nor reflect replies at the address's owner. TCP needs no such
//! check: a forged source never completes the handshake.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};

/// The loopback device's index, the same in every network namespace.
const LOOPBACK: u32 = 1;
/// A bridge's index is looked up again at most this often (it changes when the bridge is
/// made again), so a flood of wrong-interface packets costs no lookup each.
const RELOOK: Duration = Duration::from_secs(1);

/// Ask the kernel to report each datagram's incoming interface on `sock`.
pub fn enable(sock: &impl AsFd, v6: bool) -> std::io::Result<()> {
    if v6 {
        setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(sock, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

/// One datagram into `buf`: its length, sender and incoming interface index (0: unknown).
pub fn recv(sock: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, u32)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let mut ifindex = 0;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(i) => {
                ifindex = u32::try_from(i.ipi_ifindex).unwrap_or(0)
            }
            ControlMessageOwned::Ipv6PacketInfo(i) => ifindex = i.ipi6_ifindex,
            _ => {}
        }
    }
    let peer = msg.address.as_ref().and_then(socket_addr).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "datagram without a sender")
    })?;
    Ok((msg.bytes, peer, ifindex))
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    match a.family()? {
        nix::sys::socket::AddressFamily::Inet => {
            Some(SocketAddr::V4((*a.as_sockaddr_in()?).into()))
        }
        nix::sys::socket::AddressFamily::Inet6 => {
            Some(SocketAddr::V6((*a.as_sockaddr_in6()?).into()))
        }
        _ => None,
    }
}

/// Did a datagram arriving on interface `got` come from a container's own port (a routed
/// network's `fnv*` host end) or from the host? Those ports are anti-spoofing guarded, so a
/// source there is the container's own; an underlay neighbour forging it arrives elsewhere.
/// One name lookup (an ioctl) per datagram: routed ports are many, so there is no one index
/// to cache.
pub fn routed_port(got: u32) -> bool {
    if got == LOOPBACK {
        return true;
    }
    got != 0
        && nix::net::if_::if_indextoname(got).is_ok_and(|n| {
            n.to_bytes()
                .starts_with(ferrynet_model::guard::PORT_PREFIX.as_bytes())
        })
}

/// The network bridge's interface index, cached per listener.
#[derive(Debug, Default)]
pub struct Bridge {
    name: String,
    index: Option<u32>,
    looked: Option<Instant>,
}

impl Bridge {
    /// Did a datagram arriving on interface `got` come through `bridge` (or from the host)?
    pub fn admits(&mut self, bridge: &str, got: u32) -> bool {
        if got == LOOPBACK {
            return true;
        }
        if self.name != bridge {
            *self = Bridge {
                name: bridge.to_string(),
                ..Bridge::default()
            };
        }
        if self.index != Some(got) && self.looked.is_none_or(|t| t.elapsed() >= RELOOK) {
            self.index = nix::net::if_::if_nametoindex(bridge).ok();
            self.looked = Some(Instant::now());
        }
        self.index == Some(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_ports_are_container_ports_or_loopback() {
        assert!(routed_port(LOOPBACK));
        assert!(!routed_port(0));
        assert!(!routed_port(99_999));
    }

    #[test]
    fn loopback_and_the_bridge_only() {
        let mut b = Bridge::default();
        // The test's own namespace has `lo`; no bridge of this name exists.
        assert!(b.admits("fn-nosuchbr0", LOOPBACK));
        assert!(!b.admits("fn-nosuchbr0", 2));
        assert!(!b.admits("fn-nosuchbr0", 0));
        // A name that resolves: `lo` itself stands in for a bridge here.
        let mut lo = Bridge::default();
        assert!(lo.admits("lo", LOOPBACK));
        assert!(!lo.admits("lo", 99_999));
    }
}
