//! The sockets: one UDP and one TCP listener per gateway address, bound with IP_FREEBIND so
//! they can be bound before the bridge holds the address (it gets it with its first container).
//! Every query is first checked against [`Clients`]: a source outside the network gets
//! REFUSED and nothing else; an own-network UDP source that did not come in on the network's
//! bridge is forged and gets nothing ([`ingress`]). Forwards and TCP connections are capped per listener (so one
//! network cannot take all) and in total (so the agent's file descriptors and memory stay
//! bounded whatever the number of networks).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::clients::Clients;
use super::fast;
use super::forward::Upstreams;
use super::ingress;
use super::wire::{self, Outcome};
use super::zone::Zone;
use crate::agent::metrics::{instruments, DnsResult};

/// Forwarded queries in flight per listener (each holds one upstream socket and a 64 KiB
/// buffer); beyond it, or beyond [`FORWARDS`], a query to forward gets SERVFAIL at once: a
/// quick, definite answer (the client's stub moves on) that holds nothing, never larger than
/// the query plus an OPT record.
const FORWARDS_PER_LISTENER: usize = 128;
/// Forwarded queries in flight in total.
pub const FORWARDS: usize = 512;
/// TCP connections per listener; beyond it, or beyond [`TCP_CONNS`], new ones are closed.
const TCP_PER_LISTENER: usize = 64;
/// TCP connections in total.
pub const TCP_CONNS: usize = 256;
/// TCP connections from foreign sources being answered REFUSED at once; beyond it they are
/// closed unanswered. Kept apart so foreigners cannot take the network's own connections.
const TCP_REFUSALS: usize = 16;
/// Time a foreign TCP client gets to send its query before the connection is closed.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
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
    /// Who may ask each network's gateways, from the newest view.
    pub clients: watch::Receiver<Arc<Clients>>,
    /// The agent-wide caps.
    pub limits: Arc<Limits>,
}

/// The caps shared by all listeners.
pub struct Limits {
    forwards: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            forwards: Arc::new(Semaphore::new(FORWARDS)),
            tcp: Arc::new(Semaphore::new(TCP_CONNS)),
            refusals: Arc::new(Semaphore::new(TCP_REFUSALS)),
        }
    }
}

/// A permit from both the listener's semaphore and the agent-wide one, or None when either
/// is exhausted.
fn both(local: &Arc<Semaphore>, global: &Arc<Semaphore>) -> Option<Permits> {
    let l = local.clone().try_acquire_owned().ok()?;
    let g = global.clone().try_acquire_owned().ok()?;
    Some((l, g))
}

type Permits = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

impl Ctx {
    /// May `peer` ask the gateway of `network`?
    fn allowed(&self, network: &str, peer: IpAddr) -> bool {
        self.clients.borrow().allowed(network, peer)
    }

    /// Did a datagram on interface `ifindex` come through `network`'s bridge, a routed
    /// network's container port, or the host?
    fn came_in(&self, network: &str, ifindex: u32, bridge: &mut ingress::Bridge) -> bool {
        let clients = self.clients.borrow();
        if clients.is_routed(network) {
            return ingress::routed_port(ifindex);
        }
        clients
            .bridge(network)
            .is_some_and(|b| bridge.admits(b, ifindex))
    }
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
    ingress::enable(&udp, ip.is_ipv6())?;
    let udp = UdpSocket::from_std(udp.into())?;
    let tcp = socket(addr, Type::STREAM, Protocol::TCP)?;
    tcp.listen(128)?;
    let tcp = TcpListener::from_std(tcp.into())?;
    let network: Arc<str> = network.into();
    // UDP and TCP forwards of this gateway share one cap.
    let forwards = Arc::new(Semaphore::new(FORWARDS_PER_LISTENER));
    Ok(Listener {
        tasks: vec![
            tokio::spawn(serve_udp(
                Arc::new(udp),
                ip,
                network.clone(),
                ctx.clone(),
                forwards.clone(),
            )),
            tokio::spawn(serve_tcp(tcp, ip, network, ctx, forwards)),
        ],
    })
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    own: IpAddr,
    network: Arc<str>,
    ctx: Ctx,
    forwards: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; 65535];
    // The fast path's reply buffer, reused across packets.
    let mut out = Vec::with_capacity(512);
    let mut bridge = ingress::Bridge::default();
    loop {
        let received = sock
            .async_io(tokio::io::Interest::READABLE, || {
                ingress::recv(sock.as_ref(), &mut buf)
            })
            .await;
        let (n, peer, ifindex) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dns: udp receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let packet = &buf[..n];
        let started = std::time::Instant::now();
        let record = |r: DnsResult| instruments().dns(r, started.elapsed());
        if !ctx.allowed(&network, peer.ip()) {
            if let Some(r) = wire::refused(packet) {
                let _ = sock.send_to(&r, peer).await;
            }
            record(DnsResult::Refused);
            continue;
        }
        // An own-network source from elsewhere is forged: no answer, not even REFUSED.
        if !ctx.came_in(&network, ifindex, &mut bridge) {
            record(DnsResult::Dropped);
            continue;
        }
        let zone = ctx.zones.borrow().clone();
        if fast::answer(&zone, &network, packet, ctx.ttl, true, &mut out) {
            let _ = sock.send_to(&out, peer).await;
            record(DnsResult::Answered);
            continue;
        }
        match wire::general(&zone, &network, packet, ctx.ttl, true) {
            Outcome::Reply(r) => {
                let _ = sock.send_to(&r, peer).await;
                record(DnsResult::Answered);
            }
            Outcome::Drop => record(DnsResult::Dropped),
            // Our own forward coming back (an upstream list naming this gateway): no loop.
            Outcome::Forward if peer.ip() == own => {
                let _ = sock.send_to(&wire::servfail(packet), peer).await;
                record(DnsResult::Servfail);
            }
            Outcome::Forward => {
                let Some(permit) = both(&forwards, &ctx.limits.forwards) else {
                    let _ = sock.send_to(&wire::servfail(packet), peer).await;
                    record(DnsResult::Servfail);
                    continue;
                };
                let (sock, up, q) = (sock.clone(), ctx.upstreams.clone(), packet.to_vec());
                tokio::spawn(async move {
                    let (r, result) = match up.udp(&q).await {
                        Some(r) => (r, DnsResult::Forwarded),
                        None => (wire::servfail(&q), DnsResult::Servfail),
                    };
                    let _ = sock.send_to(&r, peer).await;
                    instruments().dns(result, started.elapsed());
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    own: IpAddr,
    network: Arc<str>,
    ctx: Ctx,
    forwards: Arc<Semaphore>,
) {
    let conns = Arc::new(Semaphore::new(TCP_PER_LISTENER));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "dns: tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !ctx.allowed(&network, peer.ip()) {
            // Dropping the stream closes it at once when no refusal slot is free.
            let Ok(permit) = ctx.limits.refusals.clone().try_acquire_owned() else {
                continue;
            };
            instruments().dns(DnsResult::Refused, Duration::ZERO);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REFUSAL_WAIT, refuse_conn(stream)).await;
                drop(permit);
            });
            continue;
        }
        let Some(permit) = both(&conns, &ctx.limits.tcp) else {
            continue;
        };
        let (network, ctx, forwards) = (network.clone(), ctx.clone(), forwards.clone());
        tokio::spawn(async move {
            let _ = serve_conn(stream, peer.ip() == own, &network, &ctx, &forwards).await;
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
    forwards: &Arc<Semaphore>,
) -> std::io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return Ok(());
        };
        let mut q = vec![0u8; usize::from(len?)];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let started = std::time::Instant::now();
        let zone = ctx.zones.borrow().clone();
        let (reply, result) = match wire::handle(&zone, network, &q, ctx.ttl, false) {
            Outcome::Reply(r) => (r, DnsResult::Answered),
            Outcome::Drop => {
                instruments().dns(DnsResult::Dropped, started.elapsed());
                return Ok(());
            }
            Outcome::Forward if from_self => (wire::servfail(&q), DnsResult::Servfail),
            Outcome::Forward => match both(forwards, &ctx.limits.forwards) {
                Some(_permit) => match ctx.upstreams.tcp(&q).await {
                    Some(r) => (r, DnsResult::Forwarded),
                    None => (wire::servfail(&q), DnsResult::Servfail),
                },
                None => (wire::servfail(&q), DnsResult::Servfail),
            },
        };
        instruments().dns(result, started.elapsed());
        write_msg(&mut s, &reply).await?;
    }
}

/// One length-prefixed message.
async fn write_msg(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).unwrap_or(0);
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&msg[..usize::from(len)]);
    s.write_all(&out).await
}

/// A foreign client's connection: its first query gets REFUSED, then it is closed.
async fn refuse_conn(mut s: TcpStream) -> std::io::Result<()> {
    let len = s.read_u16().await?;
    let mut q = vec![0u8; usize::from(len)];
    s.read_exact(&mut q).await?;
    if let Some(r) = wire::refused(&q) {
        write_msg(&mut s, &r).await?;
    }
    Ok(())
}
