//! The agent's side of the sleeve: this host's key (a 0600 file in the state directory, never
//! in the store), starting the datapath, and the VXLAN path probe `auto` decides by.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ferrynet_model::sleeve::{
    decode_key, encode_key, probe_message, probe_nonce, sleeve_mtu, Probe, PROBE_MISSES, SLEEVE_DEV,
};
use ferrynet_sleeve::{Sleeve, SleeveConfig};
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use ferrynet_model::sleeve::KEY_FILE_NAME as KEY_FILE;

/// This host's private key: read from `<state-dir>/sleeve.key`, made (random, mode 0600) when
/// missing. A file readable by others is refused: the key is the host's identity.
pub fn load_or_create_key(state_dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "{} is readable by others (mode {:o}); chmod 600 it or remove it for a new key",
                    path.display(),
                    mode & 0o777
                );
            }
            decode_key(&s).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", encode_key(&key))?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "made a new sleeve key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Start the sleeve with this host's `key` on `port` over an underlay of `underlay_mtu`.
pub fn start(
    key: [u8; 32],
    port: u16,
    queues: Option<usize>,
    underlay_mtu: u32,
) -> anyhow::Result<Sleeve> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sleeve = Sleeve::start(SleeveConfig {
        dev: SLEEVE_DEV.into(),
        mtu: sleeve_mtu(underlay_mtu),
        port,
        queues: queues.unwrap_or(cpus.min(4)),
        private_key: key,
    })?;
    Ok(sleeve)
}

/// One peer to probe over the VXLAN port: its bridge address, through this host's VXLAN
/// device of a network both are on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Peer host.
    pub host: String,
    /// The peer's block gateway.
    pub dst: IpAddr,
    /// The VXLAN device the probe must leave through.
    pub dev: String,
}

/// Probe results by host, shared with the reconciler.
pub type Probes = Arc<Mutex<BTreeMap<String, Probe>>>;

/// Every second, probe each target (a datagram to its sleeve port, forced out through the
/// VXLAN device with IP_UNICAST_IF: it arrives only if UDP 4789 passes and the peer's VXLAN
/// guard admits us) and wait a second for the echoes. Sets `changed` when a result would
/// change a backend choice.
pub async fn probe_loop(
    mut targets: watch::Receiver<Vec<ProbeTarget>>,
    probes: Probes,
    port: u16,
    underlay: Vec<IpNet>,
    changed: Arc<AtomicBool>,
) {
    let v4 = underlay
        .iter()
        .find(|a| a.addr().is_ipv4())
        .map(|a| a.addr());
    let v6 = underlay
        .iter()
        .find(|a| a.addr().is_ipv6())
        .map(|a| a.addr());
    let bind = |a: Option<IpAddr>| async move {
        match a {
            Some(a) => UdpSocket::bind(SocketAddr::new(a, 0)).await.ok(),
            None => None,
        }
    };
    let (s4, s6) = (bind(v4).await, bind(v6).await);
    let mut nonce: u64 = rand::random();
    loop {
        let list = targets.borrow_and_update().clone();
        if list.is_empty() {
            if let Ok(mut p) = probes.lock() {
                p.clear();
            }
            if targets.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut sent: BTreeMap<u64, String> = BTreeMap::new();
        for t in &list {
            let sock = if t.dst.is_ipv4() { &s4 } else { &s6 };
            let Some(sock) = sock else { continue };
            let Some(index) = if_index(&t.dev) else {
                continue;
            };
            if set_unicast_if(sock, t.dst.is_ipv6(), index).is_err() {
                continue;
            }
            nonce = nonce.wrapping_add(1);
            if sock
                .send_to(&probe_message(nonce), SocketAddr::new(t.dst, port))
                .await
                .is_ok()
            {
                sent.insert(nonce, t.host.clone());
            }
        }
        let answered = collect(&s4, &s6, &sent, Duration::from_secs(1)).await;
        if let Ok(mut p) = probes.lock() {
            let hosts: std::collections::BTreeSet<&String> = list.iter().map(|t| &t.host).collect();
            p.retain(|h, _| hosts.contains(h));
            for h in hosts {
                let old = p.get(h).copied().unwrap_or_default();
                let new = old.after(answered.contains(h));
                if decisive(old) != decisive(new) {
                    tracing::info!(peer = %h, probe = ?new, "VXLAN path probe changed");
                    changed.store(true, Ordering::Relaxed);
                }
                p.insert(h.clone(), new);
            }
        }
    }
}

/// Whether a probe state sends the peer through the sleeve (what a choice depends on).
fn decisive(p: Probe) -> bool {
    matches!(p, Probe::Silent { misses } if misses >= PROBE_MISSES)
}

async fn collect(
    s4: &Option<UdpSocket>,
    s6: &Option<UdpSocket>,
    sent: &BTreeMap<u64, String>,
    wait: Duration,
) -> std::collections::BTreeSet<String> {
    let mut answered = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut b4 = [0u8; 64];
    let mut b6 = [0u8; 64];
    loop {
        let r = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            r = recv(s4, &mut b4) => r.map(|n| b4[..n].to_vec()),
            r = recv(s6, &mut b6) => r.map(|n| b6[..n].to_vec()),
        };
        if let Some(n) = r.as_deref().and_then(probe_nonce) {
            if let Some(h) = sent.get(&n) {
                answered.insert(h.clone());
            }
        }
    }
    answered
}

async fn recv(s: &Option<UdpSocket>, buf: &mut [u8]) -> Option<usize> {
    match s {
        Some(s) => s.recv_from(buf).await.ok().map(|(n, _)| n),
        None => std::future::pending().await,
    }
}

fn if_index(dev: &str) -> Option<u32> {
    let name = std::ffi::CString::new(dev).ok()?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// Route the socket's unicast sends out of interface `index` whatever the routes say (the
/// route to the peer's block may lead into the sleeve while the VXLAN path is probed).
fn set_unicast_if(sock: &UdpSocket, v6: bool, index: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // IPv4 takes the index in network byte order, IPv6 in host order.
    let (level, opt, val) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_IF,
            index as libc::c_int,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_UNICAST_IF,
            index.to_be() as libc::c_int,
        )
    };
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            &val as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_0600_kept_and_refused_when_open_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let k = load_or_create_key(dir.path()).unwrap();
        let p = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(dir.path()).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
