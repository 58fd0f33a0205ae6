//! TCP-MD5 signatures (RFC 2385) through `setsockopt(TCP_MD5SIG)`. libc has the option's
//! number but not its struct, so the struct is declared here as `linux/tcp.h` lays it out.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;

const TCP_MD5SIG_MAXKEYLEN: usize = 80;

#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    pad: u32,
    key: [u8; TCP_MD5SIG_MAXKEYLEN],
}

/// Sign (and require signatures on) segments between `sock` and `peer` with `key`; an empty
/// key removes it. On a dual-stack IPv6 socket an IPv4 peer is given in its mapped form.
pub fn set_key(sock: &impl AsRawFd, peer: IpAddr, v6_socket: bool, key: &[u8]) -> io::Result<()> {
    if key.len() > TCP_MD5SIG_MAXKEYLEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP-MD5 key longer than 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid sockaddr_storage and a valid TcpMd5Sig.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let sa: SocketAddr = match (peer, v6_socket) {
        (IpAddr::V4(a), true) => SocketAddr::V6(SocketAddrV6::new(a.to_ipv6_mapped(), 0, 0, 0)),
        (a, _) => SocketAddr::new(a, 0),
    };
    let sa = socket2::SockAddr::from(sa);
    // SAFETY: `sa` holds at most a sockaddr_storage's worth of bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr() as *const u8,
            &mut sig.addr as *mut _ as *mut u8,
            sa.len() as usize,
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: the pointer and length describe `sig`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const _ as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
