//! CLI containers: a named network namespace plus one process running in it.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferrynet_model::names::{validate_container_name, validate_network_name};
use ferrynet_model::network::keys;
use ferrynet_model::portmap::{PortMapping, Protocol};
use ferrynet_model::validate::{
    check_ifname, check_netns_path, check_unicast, RecordError, Validate,
};
use ipnet::IpNet;
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Result};

/// A CLI container as recorded under `/ferrynet/v1/containers/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Name (also the CNI container id).
    pub name: String,
    /// Network it is attached to.
    pub network: String,
    /// Its network namespace (None on a host network).
    pub netns: Option<String>,
    /// Interface name inside the netns.
    pub ifname: String,
    /// The command it runs.
    pub command: Vec<String>,
    /// Process id once started.
    pub pid: Option<i32>,
    /// The process's start time in clock ticks since boot, so a reused pid is not mistaken for it.
    pub start_ticks: Option<u64>,
    /// Addresses it got.
    #[serde(default)]
    pub ips: Vec<IpNet>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

impl Validate for Container {
    fn validate(&self) -> std::result::Result<(), RecordError> {
        // The name becomes a netns name and a directory under the state dir.
        validate_container_name(&self.name)
            .map_err(|e| RecordError::new("name", &self.name, e.to_string()))?;
        validate_network_name(&self.network)
            .map_err(|e| RecordError::new("network", &self.network, e.to_string()))?;
        if let Some(p) = &self.netns {
            check_netns_path(p)?;
        }
        check_ifname("ifname", &self.ifname)?;
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(RecordError::new(
                "command",
                format!("{:?}", self.command),
                "holds NUL",
            ));
        }
        // A pid is signalled on `rm`: never init or a process group.
        if let Some(pid) = self.pid.filter(|p| *p <= 1) {
            return Err(RecordError::new("pid", pid, "must be above 1"));
        }
        for ip in &self.ips {
            check_unicast("ips", ip.addr())?;
        }
        for m in &self.ports {
            m.validate()?;
        }
        Ok(())
    }
    fn check_key(&self, key: &str) -> std::result::Result<(), RecordError> {
        if key == keys::container(&self.name) {
            Ok(())
        } else {
            Err(RecordError::new(
                "name",
                key,
                "record stored under the wrong key",
            ))
        }
    }
}

/// Name of the netns of a CLI container.
pub fn netns_name(container: &str) -> String {
    format!("fnc-{container}")
}

/// Parse `-p [HOSTIP:]HOSTPORT[-END]:PORT[-END][/udp|/tcp|/sctp]` into one mapping per port.
pub fn parse_publish(spec: &str) -> std::result::Result<Vec<PortMapping>, String> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => {
            let proto = match p {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                other => {
                    return Err(format!(
                        "{spec}: unknown protocol {other:?} (tcp, udp or sctp)"
                    ))
                }
            };
            (b, proto)
        }
        None => (spec, Protocol::Tcp),
    };
    // The host IP may be IPv6 in brackets: [fd00::1]:8080:80
    let (host_ip, rest) = if let Some(r) = body.strip_prefix('[') {
        let (ip, rest) = r
            .split_once("]:")
            .ok_or_else(|| format!("{spec}: expected [IPv6]:HOSTPORT:PORT"))?;
        (Some(ip.to_string()), rest.to_string())
    } else {
        let parts: Vec<&str> = body.split(':').collect();
        match parts.len() {
            2 => (None, body.to_string()),
            3 => (
                Some(parts[0].to_string()),
                format!("{}:{}", parts[1], parts[2]),
            ),
            _ => {
                return Err(format!(
                    "{spec}: expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/PROTO]"
                ))
            }
        }
    };
    let host_ip: Option<IpAddr> = match host_ip.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse()
                .map_err(|_| format!("{spec}: {s:?} is not an IP address"))?,
        ),
    };
    let (h, c) = rest
        .split_once(':')
        .ok_or_else(|| format!("{spec}: expected HOSTPORT:CONTAINERPORT"))?;
    let range = |s: &str| -> std::result::Result<(u16, u16), String> {
        let port = |p: &str| -> std::result::Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{spec}: {p:?} is not a port (1-65535)")),
                Ok(n) => Ok(n),
            }
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("{spec}: range {a}-{b} is backwards"));
                }
                Ok((a, b))
            }
            None => {
                let p = port(s)?;
                Ok((p, p))
            }
        }
    };
    let (h0, h1) = range(h)?;
    let (c0, c1) = range(c)?;
    let n = h1 - h0;
    if c1 != c0 && c1 - c0 != n {
        return Err(format!(
            "{spec}: host range and container range differ in size"
        ));
    }
    Ok((0..=n)
        .map(|i| PortMapping {
            host_port: h0 + i,
            container_port: if c1 == c0 { c0 } else { c0 + i },
            protocol: proto,
            host_ip,
        })
        .collect())
}

/// The start time (clock ticks since boot) of a process, from /proc/PID/stat field 22.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

impl Container {
    /// True when its recorded process is still the one running.
    pub fn running(&self) -> bool {
        match (self.pid, self.start_ticks) {
            (Some(pid), Some(t)) => process_start_ticks(pid) == Some(t) && !is_zombie(pid),
            _ => false,
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, a)| a.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The directory `ip netns exec` (and ferrynet) bind-mounts over `/etc` for a named netns.
pub fn netns_etc_dir(netns_name: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns_name)
}

/// The resolv.conf a container on `network` gets from this host's DNS server at `gateways`.
pub fn resolv_conf(gateways: &[IpAddr], network: &str, domain: &str) -> String {
    let mut s = String::from("# written by ferrynet: the agent's DNS server on the gateway\n");
    for g in gateways {
        s.push_str(&format!("nameserver {g}\n"));
    }
    // Names with a dot are tried as given first; bare names get the network's domain.
    s.push_str(&format!(
        "search {}.{domain}\noptions ndots:1 edns0\n",
        network.to_ascii_lowercase()
    ));
    s
}

/// Write `/etc/netns/<netns>/resolv.conf`.
pub fn write_resolv_conf(netns_name: &str, content: &str) -> Result<PathBuf> {
    let dir = netns_etc_dir(netns_name);
    std::fs::create_dir_all(&dir)
        .map_err(ControlError::io(format!("creating {}", dir.display())))?;
    let path = dir.join("resolv.conf");
    std::fs::write(&path, content)
        .map_err(ControlError::io(format!("writing {}", path.display())))?;
    Ok(path)
}

/// Remove `/etc/netns/<netns>` (nothing there is fine).
pub fn remove_netns_etc(netns_name: &str) {
    let _ = std::fs::remove_dir_all(netns_etc_dir(netns_name));
}

/// The container's resolv.conf, when ferrynet wrote one.
pub fn resolv_conf_of(netns: Option<&Path>) -> Option<PathBuf> {
    let name = netns?.file_name()?.to_str()?;
    let p = netns_etc_dir(name).join("resolv.conf");
    p.exists().then_some(p)
}

/// C strings for [`enter`], made before fork (no allocation after it).
struct Mounts {
    src: std::ffi::CString,
    dst: std::ffi::CString,
    root: std::ffi::CString,
}

fn mounts(resolv: Option<&Path>) -> Result<Option<Mounts>> {
    use std::os::unix::ffi::OsStrExt;
    let Some(r) = resolv else { return Ok(None) };
    // Nothing to cover (a minimal system without one): the container goes without.
    if std::fs::metadata("/etc/resolv.conf").is_err() {
        return Ok(None);
    }
    let c = |b: &[u8]| {
        std::ffi::CString::new(b).map_err(|_| ControlError::InvalidConfig("NUL in a path".into()))
    };
    Ok(Some(Mounts {
        src: c(r.as_os_str().as_bytes())?,
        dst: c(b"/etc/resolv.conf")?,
        root: c(b"/")?,
    }))
}

/// Between fork and exec: join the netns, then (as `ip netns exec` does) a private mount
/// namespace where the container's resolv.conf covers the host's. Only async-signal-safe calls.
fn enter(ns_fd: Option<i32>, m: Option<&Mounts>) -> std::io::Result<()> {
    if let Some(fd) = ns_fd {
        if unsafe { libc::setns(fd, CloneFlags::CLONE_NEWNET.bits()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(m) = m {
        // SAFETY: plain syscalls on C strings that outlive the call.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Our mounts must not propagate back to the host.
            if libc::mount(
                std::ptr::null(),
                m.root.as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                m.src.as_ptr(),
                m.dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Start `argv` detached inside `netns` (None: the host's), logging to `log`; with
/// `resolv`, that file is its /etc/resolv.conf.
pub fn spawn_in(
    netns: Option<&Path>,
    resolv: Option<&Path>,
    argv: &[String],
    log: &Path,
) -> Result<(i32, u64)> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| ControlError::InvalidConfig("no command given".into()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ControlError::io(format!("opening log {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(ControlError::io("duplicating log fd"))?;
    let ns_file = match netns {
        Some(p) => Some(
            std::fs::File::open(p)
                .map_err(ControlError::io(format!("opening netns {}", p.display())))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
    let m = mounts(resolv)?;
    // SAFETY: between fork and exec only async-signal-safe calls: setns, unshare, mount, setsid.
    unsafe {
        cmd.pre_exec(move || {
            enter(ns_fd, m.as_ref())?;
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(ControlError::io(format!("starting {prog}")))?;
    let pid = child.id() as i32;
    // Not waited for: the container outlives this CLI call; init reaps it after we exit.
    std::mem::forget(child);
    let ticks = process_start_ticks(pid).unwrap_or(0);
    Ok((pid, ticks))
}

/// Run `argv` in a container's netns in the foreground (with `resolv` as its
/// /etc/resolv.conf); returns its exit code.
pub fn exec_in(netns: Option<&Path>, resolv: Option<&Path>, argv: &[String]) -> Result<i32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| ControlError::InvalidConfig("no command given".into()))?;
    let ns_file = match netns {
        Some(p) => Some(
            std::fs::File::open(p)
                .map_err(ControlError::io(format!("opening netns {}", p.display())))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
    let m = mounts(resolv)?;
    // SAFETY: only setns, unshare and mount between fork and exec.
    unsafe {
        cmd.pre_exec(move || enter(ns_fd, m.as_ref()));
    }
    let status = cmd
        .status()
        .map_err(ControlError::io(format!("running {prog}")))?;
    Ok(status
        .code()
        .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

/// Send SIGTERM, wait up to `timeout`, then SIGKILL. Only the recorded process is signalled.
pub fn stop_process(c: &Container, timeout: std::time::Duration) {
    let Some(pid) = c.pid else { return };
    if !c.running() {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !c.running() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Path of a named netns file.
pub fn netns_path(name: &str) -> PathBuf {
    ferrynet_dataplane::netns::Netns::named_path(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let m = parse_publish("8080:80").unwrap();
        assert_eq!(
            (
                m[0].host_port,
                m[0].container_port,
                m[0].protocol,
                m[0].host_ip
            ),
            (8080, 80, Protocol::Tcp, None)
        );
        let m = parse_publish("127.0.0.1:53:5353/udp").unwrap();
        assert_eq!(
            (m[0].host_ip, m[0].protocol),
            (Some("127.0.0.1".parse().unwrap()), Protocol::Udp)
        );
        let m = parse_publish("[fd00::1]:8443:443").unwrap();
        assert_eq!(m[0].host_ip, Some("fd00::1".parse().unwrap()));
        let m = parse_publish("9000-9002:8000-8002").unwrap();
        assert_eq!(
            m.iter()
                .map(|p| (p.host_port, p.container_port))
                .collect::<Vec<_>>(),
            vec![(9000, 8000), (9001, 8001), (9002, 8002)]
        );
        let m = parse_publish("9000-9001:80").unwrap();
        assert_eq!(
            m.iter().map(|p| p.container_port).collect::<Vec<_>>(),
            vec![80, 80]
        );
    }

    #[test]
    fn publish_errors() {
        for bad in [
            "80",
            "0:80",
            "70000:80",
            "a:80",
            "9000-8000:80",
            "9000-9002:80-81",
            "1.2.3:80:80",
            "80:80/icmp",
            "[::1:80:80",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn resolv_conf_content() {
        let s = resolv_conf(
            &["10.30.0.1".parse().unwrap(), "fd00:30::1".parse().unwrap()],
            "Blue",
            "ferrynet.internal",
        );
        assert!(s.contains("nameserver 10.30.0.1\nnameserver fd00:30::1\n"));
        assert!(s.contains("search blue.ferrynet.internal\n"));
    }

    #[test]
    fn start_ticks_of_self() {
        let me = std::process::id() as i32;
        assert!(process_start_ticks(me).is_some());
        assert!(process_start_ticks(-5).is_none());
    }
}
