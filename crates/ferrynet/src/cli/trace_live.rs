//! `ferrynet trace --live`: one probe packet from the source container's namespace with
//! nftables tracing on (`meta nftrace set 1` in a temporary table matching only the probe's
//! addresses and port, read through `nft monitor trace`), and the rules it really hit on this
//! host. The temporary tables and the monitor go on every exit: error, Ctrl-C or SIGTERM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferrynet_dataplane::netns::Netns;
use ferrynet_model::trace::L4;
use serde::Serialize;

/// What the live probe saw on this host.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Live {
    /// The probe's own outcome inside the container (connected, refused, no answer…).
    pub probe: String,
    /// True when a rule or a chain policy on this host dropped it.
    pub dropped: bool,
    /// The rule lines it hit (`nft monitor trace`), per packet, in order.
    pub rules: Vec<String>,
    /// Whether that agrees with the trace (dropped here exactly when the trace drops it on
    /// this host).
    pub agrees: bool,
}

/// The temporary trace tables; deleted on drop.
struct TraceTables {
    name: String,
}

impl Drop for TraceTables {
    fn drop(&mut self) {
        for family in ["inet", "bridge"] {
            let _ = Command::new("nft")
                .args(["delete", "table", family, &self.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `nft monitor trace`, killed (by its PID) on drop.
struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The match for the probe packet (nft syntax), in any family.
fn probe_match(src: IpAddr, dst: IpAddr, port: Option<u16>, l4: L4) -> String {
    let ip = if src.is_ipv6() { "ip6" } else { "ip" };
    let l4m = match (l4, port) {
        (L4::Tcp, Some(p)) => format!("tcp dport {p}"),
        (L4::Udp, Some(p)) => format!("udp dport {p}"),
        _ if src.is_ipv6() => "icmpv6 type echo-request".into(),
        _ => "icmp type echo-request".into(),
    };
    format!("{ip} saddr {src} {ip} daddr {dst} {l4m}")
}

/// The tables' batch: a prerouting chain before every ferrynet chain (bridge and inet, for
/// bridged and routed ports) that turns tracing on for the probe.
fn batch(name: &str, m: &str) -> String {
    let mut b = String::new();
    for family in ["inet", "bridge"] {
        b.push_str(&format!(
            "table {family} {name} {{\n  chain pre {{\n    type filter hook prerouting priority -350; policy accept;\n    {m} meta nftrace set 1\n  }}\n}}\n"
        ));
    }
    b
}

/// Send the probe from inside `netns`: a TCP connect, a UDP datagram or a ping, 1.5 s at most.
fn probe(netns: &str, dst: IpAddr, port: Option<u16>, l4: L4) -> anyhow::Result<String> {
    let wait = Duration::from_millis(1500);
    if l4 == L4::Icmp {
        let o = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["ping", "-c", "1", "-W", "1", &dst.to_string()])
            .output()
            .context("running ping in the source's namespace")?;
        return Ok(if o.status.success() {
            "echo answered".into()
        } else {
            "no echo reply".into()
        });
    }
    let port = port.unwrap_or(0);
    let ns = Netns::open(netns).with_context(|| format!("opening {netns}"))?;
    let to = SocketAddr::new(dst, port);
    let r = ns.run_in(move || -> std::io::Result<String> {
        if l4 == L4::Tcp {
            return Ok(match TcpStream::connect_timeout(&to, wait) {
                Ok(_) => "connected".into(),
                Err(e) => format!("connect failed: {e}"),
            });
        }
        let bind: SocketAddr = if dst.is_ipv6() {
            "[::]:0".parse().map_err(std::io::Error::other)?
        } else {
            "0.0.0.0:0".parse().map_err(std::io::Error::other)?
        };
        let u = UdpSocket::bind(bind)?;
        u.set_read_timeout(Some(wait))?;
        u.send_to(b"ferrynet-trace", to)?;
        let mut buf = [0u8; 64];
        Ok(match u.recv_from(&mut buf) {
            Ok(_) => "answered".into(),
            Err(_) => "no answer".into(),
        })
    })?;
    Ok(r?)
}

/// Run the live probe from `netns` and collect what nftables traced.
pub async fn run(
    netns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: Option<u16>,
    l4: L4,
) -> anyhow::Result<Live> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("catching SIGTERM")?;
    let name = format!("fntrace{}", std::process::id());
    // The work runs on a blocking thread; its guards clean up when it ends, and the process
    // waits for it after a signal (the probe is bounded by its timeouts).
    let netns = netns.to_string();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c2 = cancel.clone();
    let work = tokio::task::spawn_blocking(move || live(&name, &netns, src, dst, port, l4, &c2));
    let mut work = std::pin::pin!(work);
    tokio::select! {
        r = &mut work => r.map_err(|e| anyhow!("live probe: {e}"))?,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = work.await;
            bail!("interrupted; the trace tables were removed")
        }
        _ = term.recv() => {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = work.await;
            bail!("terminated; the trace tables were removed")
        }
    }
}

fn live(
    name: &str,
    netns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: Option<u16>,
    l4: L4,
    cancel: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Live> {
    let tables = TraceTables {
        name: name.to_string(),
    };
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (package nftables)")?;
    nft.stdin
        .take()
        .context("nft stdin")?
        .write_all(batch(name, &probe_match(src, dst, port, l4)).as_bytes())?;
    let o = nft.wait_with_output()?;
    if !o.status.success() {
        bail!(
            "adding the trace tables: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    // Line-buffered, so nothing is lost when it is killed.
    let mut mon = Monitor(
        Command::new("stdbuf")
            .args(["-oL", "nft", "monitor", "trace"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running nft monitor trace")?,
    );
    // Let the monitor subscribe before the probe leaves.
    std::thread::sleep(Duration::from_millis(300));
    let outcome = if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        "not sent (interrupted)".to_string()
    } else {
        probe(netns, dst, port, l4)?
    };
    std::thread::sleep(Duration::from_millis(300));
    let _ = mon.0.kill();
    let mut text = String::new();
    if let Some(mut out) = mon.0.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    drop(mon);
    drop(tables);
    Ok(parse(&text, name, outcome))
}

/// The monitor's lines: per trace id, the rules and verdicts, leaving out our own table.
fn parse(text: &str, ours: &str, probe: String) -> Live {
    let mut by_id: BTreeMap<usize, (String, Vec<String>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("trace id ") else {
            continue;
        };
        let Some((id, what)) = rest.split_once(' ') else {
            continue;
        };
        if what.split_whitespace().nth(1) == Some(ours) {
            continue;
        }
        if !(what.contains(" rule ") || what.contains(" verdict ") || what.contains(" policy ")) {
            continue;
        }
        let idx = match order.iter().position(|o| o == id) {
            Some(i) => i,
            None => {
                order.push(id.to_string());
                order.len() - 1
            }
        };
        by_id
            .entry(idx)
            .or_insert_with(|| (id.to_string(), Vec::new()))
            .1
            .push(what.to_string());
    }
    let mut rules = Vec::new();
    let mut dropped = false;
    for (_, (id, lines)) in by_id {
        for l in lines {
            if l.contains("verdict drop")
                || l.ends_with("policy drop")
                || l.contains("(verdict drop)")
            {
                dropped = true;
            }
            rules.push(format!("[{id}] {l}"));
        }
    }
    Live {
        probe,
        dropped,
        rules,
        agrees: true,
    }
}

/// Print the live section.
pub fn print(l: &Live) {
    println!(
        "live on this host: probe {}; {} ({} the trace)",
        l.probe,
        if l.dropped {
            "DROPPED by a rule below (verdict drop)"
        } else {
            "no rule dropped it"
        },
        if l.agrees {
            "agrees with"
        } else {
            "DISAGREES with"
        }
    );
    if l.rules.is_empty() {
        println!("  (no traced packet: the probe never reached this host's hooks)");
    }
    for r in &l.rules {
        println!("  {r}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_and_parse() {
        let m = probe_match(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            Some(80),
            L4::Tcp,
        );
        assert_eq!(m, "ip saddr 10.0.0.1 ip daddr 10.0.0.2 tcp dport 80");
        assert!(batch("t", &m).contains("table bridge t"));
        let text = "trace id ab12 inet t pre rule x meta nftrace set 1 (verdict continue)\n\
                    trace id ab12 inet ferrynet forward rule ip daddr @nets4 drop (verdict drop)\n\
                    trace id ab12 inet ferrynet forward packet: iif x\n";
        let l = parse(text, "t", "no answer".into());
        assert!(l.dropped);
        assert_eq!(l.rules.len(), 1);
    }
}
