//! The lab's hard underlays: a host behind a masquerading router that passes only what the
//! host started (`lab up --nat`), and a firewall dropping VXLAN to and from a host
//! (`lab up --block-vxlan`), for the sleeve and `auto`.

use super::lab::{ip, plug, sysctl_in, LabRecord};

/// Put host `i` (namespace `ns`, plugged into nothing yet) behind a router namespace on
/// underlay subnet `s`: the host gets 172.30.i.2/24 and fd30:i::2/64, the router 172.31.s.(100+i)
/// and fd31:s::(100+i) on the underlay, masquerades both families out, and forwards in only
/// packets of connections from the inside.
pub fn behind_nat(rec: &mut LabRecord, ul: &str, ns: &str, i: u8, s: u8) -> anyhow::Result<()> {
    let router = format!("{}-nat{i}", rec.name);
    ip(&["netns", "add", &router])?;
    rec.namespaces.push(router.clone());
    ip(&["-n", &router, "link", "set", "lo", "up"])?;
    let r = 100 + u16::from(i);
    plug(
        ul,
        &router,
        &format!("nat{i}"),
        s,
        &format!("172.31.{s}.{r}/24"),
        &format!("fd31:{s}::{r:x}/64"),
    )?;
    ip(&[
        "-n", &router, "link", "add", "in0", "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&[
        "-n",
        &router,
        "addr",
        "add",
        &format!("172.30.{i}.1/24"),
        "dev",
        "in0",
    ])?;
    ip(&[
        "-n",
        &router,
        "addr",
        "add",
        &format!("fd30:{i}::1/64"),
        "dev",
        "in0",
        "nodad",
    ])?;
    ip(&["-n", &router, "link", "set", "in0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("172.30.{i}.2/24"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("fd30:{i}::2/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &format!("172.30.{i}.1"),
    ])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd30:{i}::1"),
    ])?;
    sysctl_in(&router, "net.ipv4.ip_forward", "1")?;
    sysctl_in(&router, "net.ipv6.conf.all.forwarding", "1")?;
    nft_in(
        &router,
        "table inet labnat {
           chain post {
             type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade;
           }
           chain forward_filter {
             type filter hook forward priority filter; policy drop;
             ct state established,related accept; iifname \"in0\" oifname \"eth0\" accept;
           }
         }\n",
    )
}

/// Drop UDP to port 4789 from and to a host's underlay addresses, bridged or routed.
pub fn block_vxlan(ul: &str, host: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    let a4 = v4.split('/').next().unwrap_or(v4);
    let a6 = v6.split('/').next().unwrap_or(v6);
    let rules = format!(
        "ip saddr {a4} udp dport 4789 drop; ip daddr {a4} udp dport 4789 drop;
         ip6 saddr {a6} udp dport 4789 drop; ip6 daddr {a6} udp dport 4789 drop;"
    );
    let table = format!("block-{host}");
    nft_in(
        ul,
        &format!(
            "table bridge {table} {{\n chain forward_filter {{\n type filter hook forward priority filter;\n {rules}\n }}\n}}\n\
             table inet {table} {{\n chain forward_filter {{\n type filter hook forward priority filter;\n {rules}\n }}\n}}\n"
        ),
    )
}

fn nft_in(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut c = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft (package nftables): {e}"))?;
    c.stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("nft stdin"))?
        .write_all(ruleset.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
