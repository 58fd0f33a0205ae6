//! Service traffic keeps its client (issue 19, parts 1 and 2), in 3-host labs on a real etcd:
//! producers (`common::peers::PRODUCER`) answer with the peer address they see, over TCP and
//! UDP. Container → VIP → producer keeps the client's address on one host and across hosts
//! (route, vxlan, auto), IPv4 and IPv6, with the namespaces' `bridge-nf-call-ip*tables` off
//! (the bridges' own option must carry it); a producer reaching itself through its service
//! still works; affinity holds per real client; a container cannot use the VIP path to appear
//! as another client; another network's producers stay reachable through a VIP.
//! `--ingress … --local`: outside clients reach only the receiving host's producers, under
//! their own address; a host without one refuses at once; other ports stay closed.

mod common;

use std::time::Duration;

use common::lab::{Container, Lab};
use common::peers::{connect, Tally, PRODUCER};
use common::{must, out, within};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// A producer container on `host` answering as `short`; its UDP log file.
fn producer(lab: &mut Lab, host: &str, short: &str, net: &str) -> (Container, tempfile::TempPath) {
    let log = tempfile::NamedTempFile::new()
        .expect("temp file")
        .into_temp_path();
    let path = log.to_string_lossy().to_string();
    let c = lab.run_on(
        host,
        short,
        net,
        &[],
        &["python3", "-c", PRODUCER, short, &path],
    );
    assert!(!c.v6.is_empty(), "{short}: dual-stack");
    (c, log)
}

/// `service register NAME` with ports http=80 (→ 8080) and dns=53/udp (→ 5353) and producer
/// `c` as `id`; `extra` adds options (VIPs, affinity, ingress).
fn register(lab: &Lab, name: &str, c: &Container, id: &str, extra: &[&str]) {
    let mut args = vec![
        "service",
        "register",
        name,
        "--port",
        "http=80",
        "--port",
        "dns=53/udp",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--addr", &c.v4, "--addr", &c.v6, "--id", id, "--target", "80:8080", "--target", "53:5353",
    ]);
    lab.ok(&c.host, &args);
}

/// Until `n` attempts from `ns` all reach producer `id`, which sees `peer` (30 s).
fn only(ns: &str, addr: &str, port: u16, udp: bool, id: &str, peer: &str) {
    within(Duration::from_secs(30), || {
        connect(ns, addr, port, 5, udp).only(id, peer)
    });
    connect(ns, addr, port, 20, udp)
        .only(id, peer)
        .unwrap_or_else(|e| panic!("{ns} -> {addr}:{port}: {e}"));
}

/// Turn the namespace-wide bridge netfilter sysctls off on every lab host: only the bridges'
/// own `nf_call_iptables`/`nf_call_ip6tables` can then make bridged replies pass conntrack.
fn bridge_sysctls_off(lab: &Lab) {
    for h in ["h1", "h2", "h3"] {
        for fam in ["iptables", "ip6tables"] {
            must(&[
                "nsenter",
                &format!("--net=/run/netns/{}", lab.host_ns(h)),
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{fam}=0"),
            ]);
        }
    }
}

/// The lines of a producer's UDP log.
fn log_lines(log: &tempfile::TempPath) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One UDP datagram from namespace `ns`, from `src`, to `dst`:`port`.
fn udp_from(ns: &str, src: &str, dst: &str, port: u16, payload: &str) {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{src}',0))\ns.sendto(b'{payload}',('{dst}',{port}))\n"
    );
    must(&[
        "nsenter",
        &format!("--net=/run/netns/{ns}"),
        "python3",
        "-c",
        &code,
    ]);
}

/// The device of `ns`'s default route.
fn default_dev(ns: &str) -> String {
    let o = must(&["ip", "-n", ns, "-j", "route", "show", "default"]);
    let v: serde_json::Value = serde_json::from_str(&o).expect("route json");
    v[0]["dev"].as_str().expect("default route dev").to_string()
}

fn vip_clients_keep_their_address(name: &str, backend: &str, full: bool) {
    let mut lab = Lab::up(name, &["--hosts", "3", "--backend", backend]);
    bridge_sysctls_off(&lab);
    let (p1, p1_log) = producer(&mut lab, "h1", "p1", "fabric");
    let c1 = lab.run("h1", "c1", &[], &["sleep", "infinity"]);
    let c2 = lab.run("h2", "c2", &[], &["sleep", "infinity"]);
    register(&lab, "one", &p1, "p1", &["--vip", VIP4, "--vip", VIP6]);
    // Same host (one bridge: the reply is bridged back and un-DNATed by the host) and
    // another host, both families, TCP and UDP: p1 sees each client itself.
    for (c, vip, peer) in [
        (&c1, VIP4, &c1.v4),
        (&c2, VIP4, &c2.v4),
        (&c1, VIP6, &c1.v6),
        (&c2, VIP6, &c2.v6),
    ] {
        only(&c.netns(), vip, 80, false, "p1", peer);
        only(&c.netns(), vip, 53, true, "p1", peer);
    }
    // Hairpin: p1 calling its own service is picked and still answered (from the gateway: a
    // packet from its own address would be dropped by its own kernel).
    for vip in [VIP4, VIP6] {
        let t = connect(&p1.netns(), vip, 80, 10, false);
        assert!(
            t.nerrors == 0 && t.counts.get("p1") == Some(&10),
            "{backend}: hairpin to {vip}: {t:?}"
        );
        assert!(
            !t.peers["p1"].iter().any(|a| a == &p1.v4 || a == &p1.v6),
            "{backend}: hairpin must be masqueraded: {t:?}"
        );
    }
    if !full {
        return;
    }

    // A container cannot use the VIP path to appear as another client: c3 on c1's host and
    // bridge sends a datagram from c1's address, then a control from its own; the control
    // arrives with c3's address, the forgery never does (the anti-spoofing table drops it
    // before NAT sees it).
    let c3 = lab.run("h1", "c3", &[], &["sleep", "infinity"]);
    let ns3 = c3.netns();
    let dev = default_dev(&ns3);
    must(&[
        "ip",
        "-n",
        &ns3,
        "addr",
        "add",
        &format!("{}/32", c1.v4),
        "dev",
        &dev,
    ]);
    udp_from(&ns3, &c1.v4, VIP4, 53, "forged");
    within(Duration::from_secs(15), || {
        udp_from(&ns3, &c3.v4, VIP4, 53, "control");
        let lines = log_lines(&p1_log);
        lines
            .iter()
            .any(|l| l.starts_with("control "))
            .then_some(())
            .ok_or_else(|| format!("control never arrived: {lines:?}"))
    });
    let lines = log_lines(&p1_log);
    assert!(
        !lines.iter().any(|l| l.starts_with("forged")),
        "a forged source reached the producer through the VIP: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("control "))
            .all(|l| *l == format!("control {}", c3.v4)),
        "{lines:?}"
    );
    must(&[
        "ip",
        "-n",
        &ns3,
        "addr",
        "del",
        &format!("{}/32", c1.v4),
        "dev",
        &dev,
    ]);

    // Affinity holds per real client: three producers on three hosts, every client's
    // connections land on one producer, which sees that client.
    let (p2, _l2) = producer(&mut lab, "h2", "p2", "fabric");
    let (p3, _l3) = producer(&mut lab, "h3", "p3", "fabric");
    let c4 = lab.run("h1", "c4", &[], &["sleep", "infinity"]);
    let sticky = ["--vip", "10.96.0.11", "--vip", "fd00:96::11", "--affinity"];
    for (c, id) in [(&p1, "p1"), (&p2, "p2"), (&p3, "p3")] {
        register(&lab, "sticky", c, id, &sticky);
    }
    let up = || -> Result<(), String> {
        let t = connect(&c1.netns(), "10.96.0.11", 80, 1, false);
        (t.nerrors == 0).then_some(()).ok_or(format!("{t:?}"))
    };
    within(Duration::from_secs(30), up);
    for c in [&c1, &c2, &c3, &c4] {
        let t: Tally = connect(&c.netns(), "10.96.0.11", 80, 30, false);
        let id = t.counts.keys().next().cloned().unwrap_or_default();
        t.only(&id, &c.v4)
            .unwrap_or_else(|e| panic!("affinity of {}: {e}", c.name));
    }

    // Another network's producers stay reachable through a VIP (published ports, ingress and
    // VIPs are reachable from anywhere): on the client's host the producer sees the client;
    // across hosts the client's host masquerades, because the receiving host cannot tell a
    // VIP flow from a forged source in the client's network (isolation drops those).
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "netb",
            "--subnet",
            "10.21.0.0/16",
            "--subnet",
            "fd21::/64",
            "--backend",
            backend,
        ],
    );
    let (q1, _lq1) = producer(&mut lab, "h1", "q1", "netb");
    let (q2, _lq2) = producer(&mut lab, "h2", "q2", "netb");
    register(&lab, "other1", &q1, "q1", &["--vip", "10.96.0.21"]);
    register(&lab, "other2", &q2, "q2", &["--vip", "10.96.0.22"]);
    only(&c1.netns(), "10.96.0.21", 80, false, "q1", &c1.v4);
    within(Duration::from_secs(30), || {
        let t = connect(&c1.netns(), "10.96.0.22", 80, 5, false);
        let ok = t.nerrors == 0
            && t.counts.get("q2") == Some(&5)
            && !t.peers["q2"].iter().any(|a| a == &c1.v4);
        ok.then_some(()).ok_or(format!("c1 -> other2 on h2: {t:?}"))
    });
    // Isolation itself holds: q2's own address is refused to c1.
    let t = connect(&c1.netns(), &q2.v4, 8080, 1, false);
    assert_eq!(t.nerrors, 1, "c1 reached netb's q2 directly: {t:?}");
}

#[test]
fn vip_clients_keep_their_address_vxlan() {
    vip_clients_keep_their_address("srcvx", "vxlan", true);
}

#[test]
fn vip_clients_keep_their_address_route() {
    vip_clients_keep_their_address("srcrt", "route", false);
}

#[test]
fn vip_clients_keep_their_address_auto() {
    vip_clients_keep_their_address("srcau", "auto", false);
}

/// Every attempt failed with `ConnectionRefusedError` (a reset or ICMP port unreachable,
/// not a timeout).
fn refused(t: &Tally, n: u64) -> Result<(), String> {
    let ok = t.counts.is_empty()
        && t.nerrors == n
        && t.errors.iter().all(|e| e.starts_with("ConnectionRefused"));
    ok.then_some(()).ok_or(format!("want refused: {t:?}"))
}

#[test]
fn local_ingress_keeps_the_outside_client_and_refuses_without_a_local_producer() {
    let mut lab = Lab::up("srcloc", &["--hosts", "3", "--backend", "vxlan"]);
    let (p1, _l1) = producer(&mut lab, "h1", "p1", "fabric");
    let (p2, _l2) = producer(&mut lab, "h2", "p2", "fabric");
    let out_ns = lab.outside();
    let web = [
        "--vip",
        VIP4,
        "--ingress",
        "8088:80",
        "--ingress",
        "8089:53/udp",
        "--local",
    ];
    register(&lab, "web", &p1, "p1", &web);
    register(&lab, "web", &p2, "p2", &web);

    // Each host sends outside clients to its own producer only, which sees the client.
    only(&out_ns, "172.31.0.1", 8088, false, "p1", "172.31.0.200");
    only(&out_ns, "172.31.0.2", 8088, false, "p2", "172.31.0.200");
    only(&out_ns, "fd31::1", 8088, false, "p1", "fd31::c8");
    only(&out_ns, "fd31::2", 8088, false, "p2", "fd31::c8");
    only(&out_ns, "172.31.0.1", 8089, true, "p1", "172.31.0.200");
    only(&out_ns, "fd31::2", 8089, true, "p2", "fd31::c8");
    // h3 has no producer: refused at once, TCP (reset) and UDP (port unreachable), both
    // families, so an outside load balancer's health check moves on.
    for (addr, udp) in [
        ("172.31.0.3", false),
        ("fd31::3", false),
        ("172.31.0.3", true),
        ("fd31::3", true),
    ] {
        let port = if udp { 8089 } else { 8088 };
        within(Duration::from_secs(30), || {
            refused(&connect(&out_ns, addr, port, 3, udp), 3)
        });
    }
    // The VIP still spreads over both hosts' producers (only ingress is local).
    within(Duration::from_secs(30), || {
        let t = connect(&lab.host_ns("h3"), VIP4, 80, 30, false);
        (t.nerrors == 0 && t.counts.len() == 2)
            .then_some(())
            .ok_or(format!("VIP from h3: {t:?}"))
    });
    // `--local` opens nothing else: not the producers' own ports, not the service port,
    // not the ingress port in the other protocol.
    for (port, udp) in [
        (8080, false),
        (80, false),
        (5353, true),
        (8088, true),
        (8089, false),
    ] {
        let t = connect(&out_ns, "172.31.0.1", port, 2, udp);
        assert!(
            t.counts.is_empty() && t.nerrors == 2,
            "outside reached port {port} (udp {udp}) on h1: {t:?}"
        );
    }
    // Shown and stored.
    let ls = lab.ok("h1", &["service", "ls"]);
    assert!(
        ls.contains("8088:80/tcp(local)") && ls.contains("8089:53/udp(local)"),
        "{ls}"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.ok("h2", &["service", "inspect", "web"])).expect("json");
    assert_eq!(inspect["service"]["ingress"][0]["local"], true, "{inspect}");
    // A producer arriving on h3 turns its refusal into service.
    let (p3, _l3) = producer(&mut lab, "h3", "p3", "fabric");
    register(&lab, "web", &p3, "p3", &web);
    only(&out_ns, "172.31.0.3", 8088, false, "p3", "172.31.0.200");
    // `--local` needs ingress ports to apply to.
    let o = lab.exec("h1", &["service", "register", "web", "--local"]);
    assert!(
        !o.status.success(),
        "--local without --ingress: {}",
        out(&o)
    );
}
