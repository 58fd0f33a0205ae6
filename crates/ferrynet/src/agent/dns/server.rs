//! The sockets: one UDP and one TCP listener per gateway address, bound with IP_FREEBIND so
//! they can be bound before the bridge holds the address (it gets it with its first container).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::fast;
use super::forward::Upstreams;
use super::wire::{self, Outcome};
use super::zone::Zone;

/// Forwarded queries in flight per listener; beyond it new ones are dropped (clients retry).
const MAX_FORWARDS: usize = 1024;
/// TCP connections per listener.
const MAX_TCP: usize = 256;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What every listener shares.
#[derive(Clone)]
pub struct Ctx {
    /// The newest compiled zone.
    pub zones: watch::Receiver<Arc<Zone>>,
    /// TTL of cluster answers, in seconds.
    pub ttl: u32,
    /// Where other names go.
    pub upstreams: Arc<Upstreams>,
}

/// The UDP and TCP tasks of one gateway address; dropping it closes both sockets.
pub struct Listener {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Bind `ip:port` over UDP and TCP and serve `network`'s names there.
pub fn listen(ip: IpAddr, port: u16, network: String, ctx: Ctx) -> std::io::Result<Listener> {
    let addr = SocketAddr::new(ip, port);
    let udp = socket(addr, Type::DGRAM, Protocol::UDP)?;
    // Bursts of queries (a benchmark, a chatty client) should wait in the kernel, not drop.
    let _ = udp.set_recv_buffer_size(4 << 20);
    let udp = UdpSocket::from_std(udp.into())?;
    let tcp = socket(addr, Type::STREAM, Protocol::TCP)?;
    tcp.listen(128)?;
    let tcp = TcpListener::from_std(tcp.into())?;
    let network: Arc<str> = network.into();
    Ok(Listener {
        tasks: vec![
            tokio::spawn(serve_udp(Arc::new(udp), ip, network.clone(), ctx.clone())),
            tokio::spawn(serve_tcp(tcp, ip, network, ctx)),
        ],
    })
}

async fn serve_udp(sock: Arc<UdpSocket>, own: IpAddr, network: Arc<str>, ctx: Ctx) {
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; 65535];
    // The fast path's reply buffer, reused across packets.
    let mut out = Vec::with_capacity(512);
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dns: udp receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let packet = &buf[..n];
        let zone = ctx.zones.borrow().clone();
        if fast::answer(&zone, &network, packet, ctx.ttl, true, &mut out) {
            let _ = sock.send_to(&out, peer).await;
            continue;
        }
        match wire::general(&zone, &network, packet, ctx.ttl, true) {
            Outcome::Reply(r) => {
                let _ = sock.send_to(&r, peer).await;
            }
            Outcome::Drop => {}
            // Our own forward coming back (an upstream list naming this gateway): no loop.
            Outcome::Forward if peer.ip() == own => {
                let _ = sock.send_to(&wire::servfail(packet), peer).await;
            }
            Outcome::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    continue;
                };
                let (sock, up, q) = (sock.clone(), ctx.upstreams.clone(), packet.to_vec());
                tokio::spawn(async move {
                    let r = up.udp(&q).await.unwrap_or_else(|| wire::servfail(&q));
                    let _ = sock.send_to(&r, peer).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, own: IpAddr, network: Arc<str>, ctx: Ctx) {
    let conns = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "dns: tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let (network, ctx) = (network.clone(), ctx.clone());
        tokio::spawn(async move {
            let _ = serve_conn(stream, peer.ip() == own, &network, &ctx).await;
            drop(permit);
        });
    }
}

/// Length-prefixed messages (RFC 7766) until the client closes, goes idle or sends junk.
async fn serve_conn(
    mut s: TcpStream,
    from_self: bool,
    network: &str,
    ctx: &Ctx,
) -> std::io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return Ok(());
        };
        let mut q = vec![0u8; usize::from(len?)];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let zone = ctx.zones.borrow().clone();
        let reply = match wire::handle(&zone, network, &q, ctx.ttl, false) {
            Outcome::Reply(r) => r,
            Outcome::Drop => return Ok(()),
            Outcome::Forward if from_self => wire::servfail(&q),
            Outcome::Forward => ctx
                .upstreams
                .tcp(&q)
                .await
                .unwrap_or_else(|| wire::servfail(&q)),
        };
        let len = u16::try_from(reply.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply[..usize::from(len)]);
        s.write_all(&out).await?;
    }
}
