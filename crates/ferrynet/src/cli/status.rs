//! `ferrynet status`: the agent's report for people (tables) or programs (`--json`).

use ipnet::IpNet;

use super::table::Table;
use crate::agent::api::query_status;
use crate::agent::status::AgentStatus;
use crate::control::Paths;

fn list(v: &[IpNet]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Print the status of the agent of the host whose state directory is `paths`.
pub async fn show(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let s = query_status(&paths.agent_socket()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print_summary(&s);
    print_reassert(&s);
    print_lb(&s);
    print_policy(&s);
    print_dns(&s);
    print_rejected(&s);
    print_hosts(&s);
    print_networks(&s);
    if let Some(sl) = &s.sleeve {
        print_sleeve(sl);
    }
    Ok(())
}

/// What re-asserting after a partition moved or could not put back.
fn print_reassert(s: &AgentStatus) {
    let Some(r) = &s.reassert else { return };
    for m in &r.moved {
        println!(
            "moved after a partition: {} on {}: {} -> {} ({})",
            m.container,
            m.network,
            list(&m.from),
            list(&m.to),
            m.reason
        );
    }
    for c in &r.conflicts {
        println!("re-assert conflict: {c}");
    }
}

/// The host, store, last reconcile and its errors.
fn print_summary(s: &AgentStatus) {
    println!(
        "host {}  underlay {} {} mtu {}  store {} ({})",
        s.host,
        s.underlay_dev,
        list(&s.underlay),
        s.underlay_mtu,
        s.store,
        if s.store_ok { "ok" } else { "UNREACHABLE" }
    );
    if let Some(e) = &s.store_error {
        println!("store error: {e}");
    }
    println!(
        "last reconcile: {:.1} ms, {} reconciles, {} kernel changes since start, {} error(s)",
        s.last_reconcile_took_ms,
        s.reconciles,
        s.changes,
        s.errors.len()
    );
    for e in &s.errors {
        println!("  error: {e}");
    }
}

/// The load balancer.
fn print_lb(s: &AgentStatus) {
    let lb = &s.lb;
    println!(
        "load balancer: {} service chains, {} VIP ports, {} ingress ports; {} transactions ({} rebuilds), last {:.1} ms",
        lb.chains, lb.vip_ports, lb.ingress_ports, lb.applies, lb.rebuilds, lb.last_apply_took_ms
    );
    if let Some(e) = &lb.error {
        println!("  error: {e}");
    }
    for c in &lb.conflicts {
        println!("  not served: {c}");
    }
}

/// The policy table and this host's endpoints under policy.
fn print_policy(s: &AgentStatus) {
    let p = &s.policy;
    match &p.table {
        Some(t) => println!(
            "policy: {} policies, {} endpoints known; table: {} policy chains, {} profiles, {} rules, {} sets, {} elements; {} transactions ({} rebuilds), {} connections cut, last {:.1} ms",
            p.policies, p.endpoints, t.policy_chains, t.profiles, t.rules, t.sets, t.elements, p.applies, p.rebuilds, p.cut, p.last_took_ms
        ),
        None => println!(
            "policy: {} policies, {} endpoints known; nothing restricted on this host",
            p.policies, p.endpoints
        ),
    }
    if let Some(e) = &p.error {
        println!("  error: {e}");
    }
    for e in &p.local {
        let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let side = |s: &Option<Vec<String>>| match s {
            None => "open".to_string(),
            Some(l) if l.is_empty() => "default-deny".to_string(),
            Some(l) => l.join(","),
        };
        println!(
            "  {} [{}] ingress: {} egress: {}",
            e.id,
            labels.join(","),
            side(&e.ingress),
            side(&e.egress)
        );
    }
}

/// The VXLAN guard and the DNS server.
fn print_dns(s: &AgentStatus) {
    if let Some(g) = &s.vxlan_guard {
        let dropped: Vec<String> = g.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "vxlan guard: {} peer addresses, {} rebuilds; dropped: {}",
            g.peers,
            g.rebuilds,
            dropped.join(", ")
        );
    }
    match &s.dns {
        Some(d) => {
            println!(
                "dns: {} on {} (upstreams: {})",
                d.domain,
                if d.listening.is_empty() {
                    "no gateway yet".to_string()
                } else {
                    d.listening.join(", ")
                },
                if d.upstreams.is_empty() {
                    "none".to_string()
                } else {
                    d.upstreams.join(", ")
                }
            );
            for e in &d.errors {
                println!("  dns error: {e}");
            }
            if !d.pods.is_empty() {
                let mut t = Table::new(&["POD", "NETWORK", "ADDRESSES", "SANDBOX"]);
                for p in &d.pods {
                    t.row(vec![
                        p.name.clone(),
                        p.network.clone(),
                        p.addresses
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        p.container_id.chars().take(12).collect(),
                    ]);
                }
                print!("{t}");
            }
        }
        None => println!("dns: off"),
    }
}

/// Records refused, treated as absent.
fn print_rejected(s: &AgentStatus) {
    if !s.rejected.is_empty() {
        println!(
            "rejected records ({}), treated as absent:",
            s.rejected.len()
        );
        let mut t = Table::new(&["KEY", "REASON"]);
        for r in &s.rejected {
            // Keys come from the store: print them escaped, never raw.
            t.row(vec![
                r.key.escape_debug().to_string(),
                r.reason.escape_debug().to_string(),
            ]);
        }
        print!("{t}");
    }
}

/// Hosts and producers' health.
fn print_hosts(s: &AgentStatus) {
    println!();
    let mut t = Table::new(&["HOST", "UNDERLAY", "STATE"]);
    for h in &s.hosts {
        t.row(vec![
            h.name.clone(),
            list(&h.underlay),
            if h.live { "live" } else { "gone (grace)" }.into(),
        ]);
    }
    print!("{t}");
    if !s.health.is_empty() {
        println!();
        let mut t = Table::new(&["PRODUCER", "CHECK", "STATE", "CHECKS", "LAST OUTPUT"]);
        for (k, h) in &s.health {
            t.row(vec![
                k.clone(),
                h.check.clone(),
                match h.healthy {
                    Some(true) => "healthy",
                    Some(false) => "unhealthy",
                    None => "pending",
                }
                .into(),
                h.checks.to_string(),
                h.output.chars().take(60).collect(),
            ]);
        }
        print!("{t}");
    }
}

/// Multi-host networks and their peers.
fn print_networks(s: &AgentStatus) {
    for n in &s.networks {
        println!();
        println!(
            "network {} backend {} vni {}  my blocks {}",
            n.name,
            n.backend,
            n.vni,
            list(&n.blocks)
        );
        let mut t = Table::new(&["PEER", "VIA", "BLOCKS", "WHY", "PROBLEM"]);
        for p in &n.peers {
            t.row(vec![
                p.host.clone(),
                p.backend.clone().unwrap_or_else(|| "-".into()),
                list(&p.blocks),
                if p.reason.is_empty() {
                    "-".into()
                } else {
                    p.reason.clone()
                },
                if p.errors.is_empty() {
                    "-".into()
                } else {
                    p.errors.join("; ")
                },
            ]);
        }
        print!("{t}");
    }
}

fn print_sleeve(sl: &ferrynet_sleeve::SleeveReport) {
    println!();
    let dropped: Vec<String> = sl.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "sleeve: {} on UDP {} ({} queues), key {}; dropped: {}",
        sl.dev,
        sl.port,
        sl.queues,
        sl.public_key,
        dropped.join(", ")
    );
    if sl.relayed > 0 {
        println!("relayed for other peers: {} datagrams", sl.relayed);
    }
    let mut t = Table::new(&["PEER", "ENDPOINT", "HANDSHAKE", "TX", "RX", "PATH"]);
    for p in &sl.peers {
        t.row(vec![
            p.host.clone(),
            match p.endpoint {
                Some(e) if p.learned => format!("{e} (learned)"),
                Some(e) => e.to_string(),
                None => "-".into(),
            },
            p.last_handshake_secs
                .map_or_else(|| "never".into(), |s| format!("{s:.0}s ago")),
            p.tx_bytes.to_string(),
            p.rx_bytes.to_string(),
            p.path.clone(),
        ]);
    }
    print!("{t}");
}
