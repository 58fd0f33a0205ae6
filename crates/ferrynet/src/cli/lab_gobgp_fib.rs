//! `ferrynet lab gobgp-fib`: GoBGP keeps its RIB to itself (its kernel path is FRR's zebra,
//! whose Debian version GoBGP's ZAPI client cannot read), so in the lab a follower installs
//! GoBGP's best paths in the ToR namespace's kernel, as zebra would.

use anyhow::{bail, Context};

use super::lab::ip;

/// `ferrynet lab gobgp-fib` (in a ToR namespace): follow GoBGP's best paths
/// (`gobgp monitor global rib --current -j`, both families) into the kernel, `proto bgp`.
pub fn gobgp_fib() -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for fam in ["ipv4", "ipv6"] {
        threads.push(std::thread::spawn(move || follow_family(fam)));
    }
    for t in threads {
        let _ = t.join();
    }
    bail!("gobgp monitor ended")
}

fn follow_family(fam: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    loop {
        let mut child = std::process::Command::new("gobgp")
            .args(["monitor", "global", "rib", "--current", "-a", fam, "-j"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running gobgp (package gobgpd)")?;
        let out = child.stdout.take().context("gobgp stdout")?;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let Ok(paths) = serde_json::from_str::<Vec<serde_json::Value>>(&line) else {
                continue;
            };
            for p in &paths {
                apply_path(p);
            }
        }
        let _ = child.wait();
        // gobgpd not up yet, or restarted: follow it again.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// One monitored path: withdrawn -> delete the route, else replace it via its next hop.
fn apply_path(p: &serde_json::Value) {
    let Some(prefix) = p.pointer("/nlri/prefix").and_then(|v| v.as_str()) else {
        return;
    };
    let withdrawn = p
        .get("withdrawal")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let nh = p.get("attrs").and_then(|a| a.as_array()).and_then(|a| {
        a.iter()
            .find_map(|x| x.get("nexthop").and_then(|n| n.as_str()))
    });
    let fam = if prefix.contains(':') { "-6" } else { "-4" };
    let res = match (withdrawn, nh) {
        (true, _) => ip(&[fam, "route", "del", prefix, "proto", "bgp"]),
        (false, Some(nh)) => ip(&[fam, "route", "replace", prefix, "via", nh, "proto", "bgp"]),
        (false, None) => return,
    };
    if let Err(e) = res {
        eprintln!("{e}");
    }
}
