//! The sleeve's UDP sockets: one per queue on the same port (SO_REUSEPORT, so one flow stays on
//! one socket and keeps its order), dual-stack, with batched I/O: `sendmmsg` whose messages
//! carry runs of equal-size datagrams as one UDP GSO send, and `recvmmsg` with UDP GRO, which
//! hands over runs of datagrams of one flow as one buffer. std and socket2 have neither call,
//! hence the libc below.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Most datagrams one GSO send may carry (the kernel's UDP_MAX_SEGMENTS is 64 or more).
pub const MAX_SEGMENTS: usize = 64;
/// Bytes one GSO send or GRO receive may span (an IP packet's payload).
pub const MAX_GSO_BYTES: usize = 65000;

/// Open one socket of the port's reuse group: IPv6 with IPv4 mapped when the host has IPv6,
/// else IPv4 only.
pub fn bind(port: u16) -> io::Result<Socket> {
    let v6 = || -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(false)?;
        prepare(&s)?;
        s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
        Ok(s)
    };
    match v6() {
        Ok(s) => Ok(s),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            prepare(&s)?;
            s.bind(&SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port).into())?;
            Ok(s)
        }
    }
}

fn prepare(s: &Socket) -> io::Result<()> {
    s.set_reuse_port(true)?;
    // Big buffers absorb bursts while a queue thread is busy encrypting.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    // UDP GRO: runs of one flow's datagrams arrive as one buffer (segment size in a cmsg).
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            &on as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(())
}

/// Normalise an address the dual-stack socket reports (IPv4-mapped back to IPv4).
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// An IPv4 destination as an IPv6 socket needs it (mapped).
fn mapped(a: SocketAddr, v6_socket: bool) -> SocketAddr {
    match (a, v6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (a, _) => a,
    }
}

fn to_storage(a: SocketAddr, v6_socket: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    let sa: socket2::SockAddr = mapped(a, v6_socket).into();
    // SAFETY: SockAddr holds a sockaddr_storage of at least `len` valid bytes.
    let mut st: libc::sockaddr_storage = unsafe { zeroed() };
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr() as *const u8,
            &mut st as *mut _ as *mut u8,
            sa.len() as usize,
        );
    }
    (st, sa.len())
}

fn from_storage(st: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match st.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(st as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(u32::from_be(a.sin_addr.s_addr).into()),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(st as *const _ as *const libc::sockaddr_in6) };
            Some(unmap(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    }
}

/// One send: `len` bytes at `off` of the batch buffer to `dst`, cut into datagrams of `seg`
/// bytes (the last may be shorter) when `len > seg`.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Destination.
    pub dst: SocketAddr,
    /// Offset in the buffer.
    pub off: usize,
    /// Bytes.
    pub len: usize,
    /// Segment size.
    pub seg: usize,
}

/// Batched sender of one socket.
pub struct Sender {
    fd: RawFd,
    v6: bool,
    /// UDP GSO works here (cleared after the kernel refuses it once).
    gso: bool,
}

const CMSG_SPACE_U16: usize = 32;

impl Sender {
    /// A sender for `sock`.
    pub fn new(sock: &Socket) -> Sender {
        let v6 = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.is_ipv6());
        Sender {
            fd: sock.as_raw_fd(),
            v6,
            gso: true,
        }
    }

    /// Send the runs; datagrams that cannot be sent are dropped (UDP), errors are returned
    /// after the rest went out.
    pub fn send(&mut self, buf: &[u8], runs: &[Run]) -> io::Result<()> {
        if !self.gso {
            return self.send_each(buf, runs);
        }
        let n = runs.len();
        let mut addrs = Vec::with_capacity(n);
        let mut iovs = Vec::with_capacity(n);
        let mut ctrl = vec![0u8; n * CMSG_SPACE_U16];
        // SAFETY: zeroed mmsghdr is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { zeroed() }).collect();
        for r in runs {
            addrs.push(to_storage(r.dst, self.v6));
            iovs.push(libc::iovec {
                iov_base: buf[r.off..r.off + r.len].as_ptr() as *mut libc::c_void,
                iov_len: r.len,
            });
        }
        for (i, r) in runs.iter().enumerate() {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut addrs[i].0 as *mut _ as *mut libc::c_void;
            h.msg_namelen = addrs[i].1;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if r.len > r.seg {
                let c = &mut ctrl[i * CMSG_SPACE_U16..(i + 1) * CMSG_SPACE_U16];
                h.msg_control = c.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_SPACE(2) <= CMSG_SPACE_U16, the buffer is ours and zeroed.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let cm = libc::CMSG_FIRSTHDR(h);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut u16, r.seg as u16);
                }
            }
        }
        let mut done = 0;
        while done < n {
            // SAFETY: every header points at live buffers above.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd,
                    hdrs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The device cannot checksum-offload a GSO send: fall back for good.
                    Some(libc::EIO) | Some(libc::EINVAL) if runs[done].len > runs[done].seg => {
                        self.gso = false;
                        tracing::warn!("UDP GSO refused; sending datagrams one by one");
                        return self.send_each(buf, &runs[done..]);
                    }
                    // A datagram nobody can take (unreachable peer): skip it, keep the rest.
                    _ => {
                        done += 1;
                        if done == n {
                            return Err(e);
                        }
                        continue;
                    }
                }
            }
            done += rc as usize;
        }
        Ok(())
    }

    fn send_each(&self, buf: &[u8], runs: &[Run]) -> io::Result<()> {
        let mut last = Ok(());
        for r in runs {
            let (st, len) = to_storage(r.dst, self.v6);
            let mut off = r.off;
            while off < r.off + r.len {
                let l = r.seg.min(r.off + r.len - off);
                // SAFETY: a live buffer slice and address.
                let rc = unsafe {
                    libc::sendto(
                        self.fd,
                        buf[off..off + l].as_ptr() as *const libc::c_void,
                        l,
                        0,
                        &st as *const _ as *const libc::sockaddr,
                        len,
                    )
                };
                if rc < 0 {
                    last = Err(io::Error::last_os_error());
                }
                off += l;
            }
        }
        last
    }
}

/// Send one datagram (handshakes, probe answers).
pub fn send_one(sock: &Socket, dst: SocketAddr, data: &[u8]) -> io::Result<()> {
    let v6 = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some_and(|a| a.is_ipv6());
    sock.send_to(data, &mapped(dst, v6).into()).map(|_| ())
}

/// One received buffer: `len` bytes from `src`, datagrams of `seg` bytes each (GRO).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Index of the buffer (`Receiver::bufs`).
    pub idx: usize,
    /// Sender.
    pub src: SocketAddr,
    /// Bytes in the buffer.
    pub len: usize,
    /// Size of each datagram in it (the last may be shorter).
    pub seg: usize,
}

/// Batched receiver of one socket.
pub struct Receiver {
    fd: RawFd,
    /// Receive buffers, one per message.
    pub bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u8; 64]>,
}

impl Receiver {
    /// A receiver of `batch` buffers for `sock`.
    pub fn new(sock: &Socket, batch: usize) -> Receiver {
        Receiver {
            fd: sock.as_raw_fd(),
            bufs: (0..batch)
                .map(|_| vec![0u8; MAX_GSO_BYTES + 1024])
                .collect(),
            // SAFETY: zeroed storage is a valid (empty) address.
            addrs: (0..batch).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0u8; 64]; batch],
        }
    }

    /// Wait for at least one datagram, take what else is queued; `out` gets one entry per
    /// buffer filled (`self.bufs[i]`).
    pub fn recv(&mut self, out: &mut Vec<Received>) -> io::Result<()> {
        out.clear();
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { zeroed() }).collect();
        for i in 0..n {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = self.ctrl[i].len();
        }
        let rc = loop {
            // SAFETY: headers point at our buffers; MSG_WAITFORONE returns after the first.
            let rc = unsafe {
                libc::recvmmsg(
                    self.fd,
                    hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break rc;
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, hdr) in hdrs.iter().enumerate().take(rc as usize) {
            let len = hdr.msg_len as usize;
            let Some(src) = from_storage(&self.addrs[i], hdr.msg_hdr.msg_namelen) else {
                continue;
            };
            let seg = gro_size(&hdr.msg_hdr).unwrap_or(len).max(1);
            out.push(Received {
                idx: i,
                src,
                len,
                seg,
            });
        }
        Ok(())
    }
}

fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(h);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_UDP && (*cm).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            cm = libc::CMSG_NXTHDR(h, cm);
        }
    }
    None
}
