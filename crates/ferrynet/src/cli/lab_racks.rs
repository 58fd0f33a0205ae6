//! `ferrynet lab up --racks N --router bird|gobgp`: an L3 data-centre fabric. Each rack is
//! its own underlay subnet (a switch: a bridge in the underlay namespace, no address) with a
//! ToR router namespace as the hosts' gateway; the ToRs meet on a spine link and route the
//! underlay subnets statically (the fabric's IGP), and container routes only over BGP: the
//! hosts' agents peer with their ToR (eBGP, a 4-byte AS per host), the ToRs with each
//! other. The ToRs run Debian's BIRD 2, or GoBGP (with `lab_gobgp_fib` installing its best
//! paths in the ToR's kernel).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};

use super::lab::{ip, lab_dir, spawn_in, sysctl_in, LabRecord};

/// The AS of rack `r`'s ToR.
pub fn tor_asn(r: u8) -> u32 {
    65000 + u32::from(r)
}

/// The AS of lab host `i` (1-based): a 4-byte private ASN (RFC 6996) per host, Calico's
/// AS-per-host model.
pub fn host_asn(i: u8) -> u32 {
    4_200_000_000 + u32::from(i)
}

/// The rack of lab host `i` (1-based): hosts are dealt over the racks in turn.
pub fn host_rack(i: u8, racks: u8) -> u8 {
    (i - 1) % racks.max(1)
}

/// The ToR namespace of rack `r`.
pub fn tor_ns(lab: &str, r: u8) -> String {
    format!("{lab}-tor{r}")
}

/// The ToR's address on the spine link.
fn spine_v4(r: u8) -> String {
    format!("172.31.200.{}", r + 1)
}
fn spine_v6(r: u8) -> String {
    format!("fd31:200::{}", r + 1)
}

/// Build the racks' switches and ToR namespaces in the underlay namespace `ul`.
pub fn build_fabric(ul: &str, racks: u8, rec: &mut LabRecord) -> anyhow::Result<()> {
    ip(&["-n", ul, "link", "add", "spine", "type", "bridge"])?;
    ip(&["-n", ul, "link", "set", "spine", "up"])?;
    for r in 0..racks {
        let br = format!("ul{r}");
        ip(&["-n", ul, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", ul, "link", "set", &br, "up"])?;
        let ns = tor_ns(&rec.name, r);
        ip(&["netns", "add", &ns])?;
        rec.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (dev, peer, master) in [
            ("eth0", format!("tor{r}"), br.as_str()),
            ("eth1", format!("sp{r}"), "spine"),
        ] {
            ip(&[
                "-n", ul, "link", "add", &peer, "type", "veth", "peer", "name", dev, "netns", &ns,
            ])?;
            ip(&["-n", ul, "link", "set", &peer, "master", master, "up"])?;
            ip(&["-n", &ns, "link", "set", dev, "up"])?;
        }
        let addrs = [
            ("eth0", format!("172.31.{r}.254/24")),
            ("eth0", format!("fd31:{r}::fe/64")),
            ("eth1", format!("{}/24", spine_v4(r))),
            ("eth1", format!("{}/64", spine_v6(r))),
        ];
        for (dev, a) in &addrs {
            let mut args = vec!["-n", &ns, "addr", "add", a, "dev", dev];
            if a.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        sysctl_in(&ns, "net.ipv4.ip_forward", "1")?;
        sysctl_in(&ns, "net.ipv6.conf.all.forwarding", "1")?;
        // The underlay's own routing (an IGP in a real fabric): the other racks' subnets.
        for o in (0..racks).filter(|o| *o != r) {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("172.31.{o}.0/24"),
                "via",
                &spine_v4(o),
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                &format!("fd31:{o}::/64"),
                "via",
                &spine_v6(o),
            ])?;
        }
    }
    Ok(())
}

/// The BGP neighbours of rack `r`'s ToR: (name, address, AS).
fn neighbours(r: u8, racks: u8, hosts: u8) -> Vec<(String, String, u32)> {
    let mut v = Vec::new();
    for i in (1..=hosts).filter(|i| host_rack(*i, racks) == r) {
        v.push((format!("h{i}v4"), format!("172.31.{r}.{i}"), host_asn(i)));
        // Canonical text: GoBGP matches neighbours by the address string.
        let v6: std::net::Ipv6Addr = format!("fd31:{r}::{i}")
            .parse()
            .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED);
        v.push((format!("h{i}v6"), v6.to_string(), host_asn(i)));
    }
    for o in (0..racks).filter(|o| *o != r) {
        v.push((format!("tor{o}v4"), spine_v4(o), tor_asn(o)));
        v.push((format!("tor{o}v6"), spine_v6(o), tor_asn(o)));
    }
    v
}

/// BIRD 2's configuration for rack `r`'s ToR: one session per neighbour and family,
/// graceful restart, learned routes exported to the kernel.
pub fn bird_conf(r: u8, racks: u8, hosts: u8, password: Option<&str>) -> String {
    let mut c = format!(
        "router id {};\nprotocol device {{}}\n\
         protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}\n\
         protocol kernel {{ ipv6 {{ export all; }}; merge paths on; }}\n",
        spine_v4(r)
    );
    for (name, addr, asn) in neighbours(r, racks, hosts) {
        let v6 = addr.contains(':');
        let pw = password
            .filter(|_| name.starts_with('h'))
            .map(|p| format!("  password \"{p}\";\n"))
            .unwrap_or_default();
        let _ = write!(
            c,
            "protocol bgp {name} {{\n  local as {};\n  neighbor {addr} as {asn};\n  direct;\n  \
             graceful restart on;\n  graceful restart time 120;\n  hold time 30;\n  \
             connect retry time 1;\n  error wait time 1, 5;\n{pw}  {} {{ import all; export all; }};\n}}\n",
            tor_asn(r),
            if v6 { "ipv6" } else { "ipv4" },
        );
    }
    c
}

/// GoBGP's configuration for rack `r`'s ToR.
pub fn gobgp_conf(r: u8, racks: u8, hosts: u8, password: Option<&str>) -> String {
    let mut c = format!(
        "[global.config]\n  as = {}\n  router-id = \"{}\"\n\n\
",
        tor_asn(r),
        spine_v4(r),
    );
    for (name, addr, asn) in neighbours(r, racks, hosts) {
        let afi = if addr.contains(':') {
            "ipv6-unicast"
        } else {
            "ipv4-unicast"
        };
        let pw = password
            .filter(|_| name.starts_with('h'))
            .map(|p| format!("    auth-password = \"{p}\"\n"))
            .unwrap_or_default();
        let _ = write!(
            c,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{addr}\"\n    peer-as = {asn}\n{pw}\
             [neighbors.timers.config]\n    hold-time = 30\n    keepalive-interval = 10\n    connect-retry = 1\n\
             [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 120\n\
             [[neighbors.afi-safis]]\n  [neighbors.afi-safis.config]\n    afi-safi-name = \"{afi}\"\n\
             [neighbors.afi-safis.mp-graceful-restart.config]\n    enabled = true\n\n"
        );
    }
    c
}

/// Start the routers of every rack.
pub fn start_routers(
    rec: &mut LabRecord,
    racks: u8,
    hosts: u8,
    router: &str,
    password: Option<&str>,
) -> anyhow::Result<()> {
    for r in 0..racks {
        start_router(rec, r, racks, hosts, router, password)?;
    }
    Ok(())
}

/// Start rack `r`'s router (also after `lab stop-router`).
pub fn start_router(
    rec: &mut LabRecord,
    r: u8,
    racks: u8,
    hosts: u8,
    router: &str,
    password: Option<&str>,
) -> anyhow::Result<()> {
    let ns = tor_ns(&rec.name, r);
    let dir = lab_dir(&rec.name).join(format!("tor{r}"));
    std::fs::create_dir_all(&dir)?;
    let d = |f: &str| dir.join(f).display().to_string();
    match router {
        "bird" => {
            let bird = Path::new("/usr/sbin/bird");
            if !bird.exists() {
                bail!("/usr/sbin/bird is missing: apt-get install bird2");
            }
            std::fs::write(dir.join("bird.conf"), bird_conf(r, racks, hosts, password))?;
            let pid = spawn_in(
                &ns,
                &[
                    "/usr/sbin/bird",
                    "-f",
                    "-c",
                    &d("bird.conf"),
                    "-s",
                    &d("bird.ctl"),
                    "-P",
                    &d("bird.pid"),
                ],
                &[],
                &dir.join("bird.log"),
            )?;
            rec.pids.push((pid, format!("bird tor{r}")));
        }
        "gobgp" => {
            if !Path::new("/usr/bin/gobgpd").exists() {
                bail!("/usr/bin/gobgpd is missing: apt-get install gobgpd");
            }
            std::fs::write(
                dir.join("gobgpd.toml"),
                gobgp_conf(r, racks, hosts, password),
            )?;
            let pid = spawn_in(
                &ns,
                &[
                    "/usr/bin/gobgpd",
                    "-f",
                    &d("gobgpd.toml"),
                    "-t",
                    "toml",
                    "--api-hosts",
                    "127.0.0.1:50051",
                    "--pprof-disable",
                ],
                &[],
                &dir.join("gobgpd.log"),
            )?;
            rec.pids.push((pid, format!("gobgpd tor{r}")));
            // GoBGP keeps its RIB to itself (its FIB path is FRR's zebra, whose Debian
            // version its ZAPI client cannot read): a follower installs its best paths.
            let pid = spawn_in(
                &ns,
                &[&rec.exe, "lab", "gobgp-fib"],
                &[],
                &dir.join("gobgp-fib.log"),
            )?;
            rec.pids.push((pid, format!("gobgp-fib tor{r}")));
        }
        other => bail!("unknown router {other:?}: bird or gobgp"),
    }
    Ok(())
}

/// The BGP settings a rack lab gives its hosts (before the `bgp` network exists, so the
/// speakers start with them): no mesh, an AS per host, its ToR over IPv4 and IPv6.
pub fn host_bgp_commands(racks: u8, hosts: u8, password: Option<&str>) -> Vec<Vec<String>> {
    let mut cmds = vec![vec![
        "bgp".into(),
        "config".into(),
        "--mesh".into(),
        "off".into(),
        "--hold-time".into(),
        "30".into(),
    ]];
    for i in 1..=hosts {
        let r = host_rack(i, racks);
        cmds.push(vec![
            "bgp".into(),
            "config".into(),
            "--host".into(),
            format!("h{i}"),
            "--asn".into(),
            host_asn(i).to_string(),
        ]);
        for (suffix, addr) in [
            ("", format!("172.31.{r}.254")),
            ("-v6", format!("fd31:{r}::fe")),
        ] {
            let mut c: Vec<String> = vec![
                "bgp".into(),
                "peer".into(),
                "add".into(),
                format!("tor-h{i}{suffix}"),
                "--address".into(),
                addr,
                "--asn".into(),
                tor_asn(r).to_string(),
                "--host".into(),
                format!("h{i}"),
            ];
            if let Some(p) = password {
                c.extend(["--password".into(), p.to_string()]);
            }
            cmds.push(c);
        }
    }
    cmds
}

/// Check that `router` is one the lab knows before anything is built.
pub fn check_router(router: &str) -> anyhow::Result<()> {
    match router {
        "bird" | "gobgp" => Ok(()),
        o => Err(anyhow::anyhow!("unknown router {o:?}: bird or gobgp")).context("--router"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racks_deal_hosts_in_turn_and_asns_are_4_byte() {
        assert_eq!(
            (host_rack(1, 2), host_rack(2, 2), host_rack(3, 2)),
            (0, 1, 0)
        );
        assert!(host_asn(1) > 65535);
        let n = neighbours(0, 2, 3);
        let names: Vec<&str> = n.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["h1v4", "h1v6", "h3v4", "h3v6", "tor1v4", "tor1v6"]);
    }

    #[test]
    fn bird_conf_has_a_session_per_neighbour_and_family() {
        let c = bird_conf(1, 2, 2, Some("pw"));
        assert!(c.contains("neighbor 172.31.1.2 as 4200000002;"));
        assert!(c.contains("neighbor fd31:200::1 as 65000;"));
        assert_eq!(c.matches("password \"pw\"").count(), 2);
        assert_eq!(c.matches("protocol bgp").count(), 4);
    }
}
