//! Forwarding names outside the cluster to the host's upstream resolvers: the query's bytes
//! unchanged, each upstream in turn with a short timeout, within one overall deadline, so a
//! dead upstream costs the client a quick SERVFAIL and never a hang.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

/// Time one upstream gets before the next is asked.
pub const PER_UPSTREAM: Duration = Duration::from_millis(1000);
/// Time a forwarded query gets in total before SERVFAIL.
pub const DEADLINE: Duration = Duration::from_millis(2000);

/// The upstream resolvers, in the order they are asked.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    /// Resolver addresses.
    pub addrs: Vec<SocketAddr>,
}

/// Parse `IP`, `IP:PORT` or `[IPv6]:PORT` (port 53 by default).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))
}

/// The `nameserver` lines of a resolv.conf. Loopback stubs (systemd-resolved's 127.0.0.53)
/// stay: the agent forwards from the host's namespace, where they answer.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is not supported by SocketAddr parsing.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

fn unspecified(for_addr: &SocketAddr) -> SocketAddr {
    match for_addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

impl Upstreams {
    /// Ask over UDP; None when no upstream answered in time.
    pub async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.ask(|up| udp_once(up, query)).await
    }

    /// Ask over TCP (for clients that asked over TCP); None when no upstream answered in time.
    pub async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.ask(|up| tcp_once(up, query)).await
    }

    /// Each upstream in turn, each within its share of the deadline; a SERVFAIL or REFUSED
    /// moves on to the next and is returned only when nobody answered better.
    async fn ask<F, Fut>(&self, once: F) -> Option<Vec<u8>>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<Vec<u8>>>,
    {
        let deadline = Instant::now() + DEADLINE;
        let mut refusal = None;
        for up in &self.addrs {
            let until = deadline.min(Instant::now() + PER_UPSTREAM);
            match timeout_at(until, once(*up)).await {
                Ok(Ok(r)) if refused(&r) => refusal = Some(r),
                Ok(Ok(r)) => return Some(r),
                Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(upstream = %up, "upstream timed out"),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        refusal
    }
}

/// SERVFAIL or REFUSED: worth asking the next upstream, as a stub resolver would.
fn refused(reply: &[u8]) -> bool {
    reply.len() >= 4 && matches!(reply[3] & 0x0f, 2 | 5)
}

async fn udp_once(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified(&up)).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Only the answer to this query (same id) counts; a connected socket sees no others.
        if n >= 12 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_once(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        assert_eq!(
            parse_upstream("10.0.0.1").unwrap(),
            "10.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("10.0.0.1:5353").unwrap(),
            "10.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("fd00::1").unwrap(),
            "[fd00::1]:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[fd00::1]:54").unwrap(),
            "[fd00::1]:54".parse().unwrap()
        );
        assert!(parse_upstream("example.org").is_err());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let rc = "# comment\nsearch lan\nnameserver 127.0.0.53\nnameserver fd00::1\nnameserver fe80::1%eth0\noptions edns0\n";
        assert_eq!(
            nameservers(rc),
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:53".parse().unwrap()
            ]
        );
    }
}
