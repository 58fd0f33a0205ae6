//! `ferrynet trace` against real probes, in one 3-host etcd lab: a table of cases (same
//! host, cross host per backend, published port, VIP, ingress, an isolated network, a policy
//! deny, a spoofed source, an unused address, the outside, the host itself, a fabric route
//! and a VXLAN FDB entry deleted in a host's namespace). For each case the trace's verdict
//! (delivered, or dropped at a step) is what the test expects, and a real probe from the
//! source's namespace (TCP or UDP to the echo server) agrees with it. Then `--live` on a
//! passing and a dropped case (and its cleanup after SIGINT), and bad input.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::{echo, Container, Lab, ECHO_SERVER};
use common::{bin, must, out, within, Proc};
use serde_json::Value;

/// A probe from namespace `ns` to `addr:port` (tcp or udp): true when the echo came back
/// within 1.5 s. `bind`: a source address to send from.
fn probe(ns: &str, addr: &str, port: u16, udp: bool, bind: Option<&str>) -> bool {
    let fam = if addr.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let bind = bind
        .map(|b| format!("s.bind(('{b}',0))\n"))
        .unwrap_or_default();
    let code = if udp {
        format!(
            "import socket\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n{bind}s.settimeout(1.5)\n\
             s.sendto(b'ping',('{addr}',{port}))\nassert s.recv(10)==b'ping'\n"
        )
    } else {
        format!(
            "import socket\ns=socket.socket(socket.{fam},socket.SOCK_STREAM)\n{bind}s.settimeout(1.5)\n\
             s.connect(('{addr}',{port}))\ns.sendall(b'ping')\nassert s.recv(4)==b'ping'\n"
        )
    };
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["python3", "-c", &code])
        .output()
        .expect("python3")
        .status
        .success()
}

/// `ferrynet trace ARGS --json` on `host`: the parsed output.
fn trace(lab: &Lab, host: &str, args: &[&str]) -> Value {
    let mut a = vec!["trace"];
    a.extend_from_slice(args);
    a.push("--json");
    let o = lab.exec(host, &a);
    assert!(o.status.success(), "trace {args:?}: {}", out(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("json: {e}: {}", out(&o)))
}

/// One case of the table.
struct Case {
    name: &'static str,
    /// `ferrynet trace` arguments (run on h1).
    args: Vec<String>,
    /// Expected (delivered, step).
    want: (bool, &'static str),
    /// The probe's namespace, address, port, udp, bound source.
    ns: String,
    udp: bool,
    bind: Option<String>,
}

fn case(name: &'static str, args: &[&str], want: (bool, &'static str), ns: &str) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        want,
        ns: ns.to_string(),
        udp: args.iter().any(|a| a.ends_with("/udp")),
        bind: None,
    }
}

struct Setup {
    lab: Lab,
    cs: std::collections::BTreeMap<&'static str, Container>,
    out_ns: String,
    vip: String,
}

fn run(lab: &mut Lab, host: &str, short: &str, net: &str, extra: &[&str]) -> Container {
    lab.run_on(host, short, net, extra, &["python3", "-c", ECHO_SERVER])
}

fn setup() -> Setup {
    let mut lab = Lab::up(
        &format!("tr{}", std::process::id() % 10000),
        &["--hosts", "3", "--backend", "vxlan"],
    );
    for (net, args) in [
        ("rt", vec!["--backend", "route", "--subnet", "10.31.0.0/16"]),
        (
            "sl",
            vec!["--backend", "sleeve", "--subnet", "10.32.0.0/16"],
        ),
        (
            "ro",
            vec![
                "--backend",
                "route",
                "--mode",
                "routed",
                "--subnet",
                "10.33.0.0/16",
            ],
        ),
        ("iso", vec!["--subnet", "10.34.0.0/24"]),
    ] {
        let mut a = vec!["network", "create", net];
        a.extend(args);
        lab.ok("h1", &a);
    }
    let mut cs = std::collections::BTreeMap::new();
    cs.insert("a1", run(&mut lab, "h1", "a1", "fabric", &[]));
    cs.insert("b1", run(&mut lab, "h1", "b1", "fabric", &[]));
    cs.insert(
        "a2",
        run(&mut lab, "h2", "a2", "fabric", &["-p", "8080:7000"]),
    );
    cs.insert("a3", run(&mut lab, "h3", "a3", "fabric", &[]));
    cs.insert(
        "lk",
        run(&mut lab, "h3", "lk", "fabric", &["--label", "app=locked"]),
    );
    cs.insert("r1", run(&mut lab, "h1", "r1", "rt", &[]));
    cs.insert("r2", run(&mut lab, "h2", "r2", "rt", &[]));
    cs.insert("s1", run(&mut lab, "h1", "s1", "sl", &[]));
    cs.insert("s2", run(&mut lab, "h2", "s2", "sl", &[]));
    cs.insert("o1", run(&mut lab, "h1", "o1", "ro", &[]));
    cs.insert("o2", run(&mut lab, "h2", "o2", "ro", &[]));
    cs.insert("i1", run(&mut lab, "h1", "i1", "iso", &[]));
    let out_ns = lab.outside();
    lab.procs.push(Proc(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{out_ns}"))
            .args(["python3", "-c", ECHO_SERVER])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("outside server"),
    ));
    let a3 = cs["a3"].v4.clone();
    lab.ok(
        "h1",
        &[
            "service",
            "register",
            "web",
            "--port",
            "80",
            "--addr",
            &a3,
            "--target",
            "80:7000",
            "--ingress",
            "30080:80",
        ],
    );
    let svc: Value =
        serde_json::from_str(&lab.ok("h1", &["service", "inspect", "web"])).expect("json");
    let vip = svc["service"]["vips"]
        .as_array()
        .or_else(|| svc["vips"].as_array())
        .and_then(|v| {
            v.iter()
                .filter_map(|x| x.as_str())
                .find(|x| !x.contains(':'))
        })
        .unwrap_or_else(|| panic!("no IPv4 VIP in {svc}"))
        .to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("p.yaml");
    std::fs::write(
        &f,
        "name: lock\nselector: app=locked\ningress:\n  - action: deny\n    ports: [tcp/7000]\n",
    )
    .unwrap();
    lab.ok("h1", &["policy", "apply", "-f", f.to_str().unwrap()]);
    // Settle: every path the table expects to work works (agents converged).
    let pairs = [
        ("a1", "b1"),
        ("a1", "a2"),
        ("a1", "a3"),
        ("r1", "r2"),
        ("s1", "s2"),
        ("o1", "o2"),
    ];
    for (a, b) in pairs {
        echo(&cs[a], &cs[b].v4, Duration::from_secs(40)).unwrap();
    }
    echo(&cs["a1"], &cs["a2"].v6, Duration::from_secs(20)).unwrap();
    within(Duration::from_secs(20), || {
        probe(&cs["a1"].netns(), &vip, 80, false, None)
            .then_some(())
            .ok_or_else(|| "VIP not yet".to_string())
    });
    // Ingress on h2 (172.31.0.2 in the lab's layout) from outside, to the producer a3 on h3:
    // the connection leaves h2 through the VXLAN device from h2's gateway in `fabric`, not
    // from network ro's gateway on lo (which h3's isolation would drop).
    within(Duration::from_secs(30), || {
        probe(&out_ns, "172.31.0.2", 30080, false, None)
            .then_some(())
            .ok_or_else(|| "ingress not yet".to_string())
    });
    within(Duration::from_secs(20), || {
        (!probe(&cs["a1"].netns(), &cs["lk"].v4, 7000, false, None))
            .then_some(())
            .ok_or_else(|| "policy not yet enforced".to_string())
    });
    Setup {
        lab,
        cs,
        out_ns,
        vip,
    }
}

/// The guard's `ip4_spoof` packets on host `h`.
fn spoof_count(lab: &Lab, h: &str) -> u64 {
    let v: Value = serde_json::from_str(&lab.ok(h, &["guard", "--json"])).expect("guard json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["reason"] == "ip4_spoof")
        .filter_map(|c| c["packets"].as_u64())
        .sum()
}

/// An address of the block holding `ip` (a /26) that nobody holds: `ip` + 40 within it.
fn unused_in_block(ip: &str) -> String {
    let a: std::net::Ipv4Addr = ip.parse().unwrap();
    let o = a.octets();
    let base = o[3] & !63;
    assert!(
        o[3] - base < 20,
        "{ip} too far into its block for this test"
    );
    std::net::Ipv4Addr::new(o[0], o[1], o[2], base + 40).to_string()
}

fn check(s: &Setup, c: &Case) {
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let t = trace(&s.lab, "h1", &args);
    let got = (
        t["verdict"]["delivered"].as_bool().unwrap(),
        t["verdict"]["step"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        (got.0, got.1.as_str()),
        c.want,
        "case {}: trace says {}",
        c.name,
        serde_json::to_string_pretty(&t).unwrap()
    );
    let dst = t["dst"].as_str().unwrap().to_string();
    let port = t["port"].as_u64().unwrap() as u16;
    let real = probe(&c.ns, &dst, port, c.udp, c.bind.as_deref());
    assert_eq!(
        real,
        got.0,
        "case {}: the probe {} but the trace says {}",
        c.name,
        if real { "got through" } else { "failed" },
        serde_json::to_string_pretty(&t).unwrap()
    );
    eprintln!("case {:<22} {:?} = probe", c.name, c.want);
}

#[test]
fn trace_matches_probes_live_and_bad_input() {
    let s = setup();
    let cs = &s.cs;
    let a1 = cs["a1"].netns();
    let v6 = format!("[{}]:7000", cs["a2"].v6);
    let unused = format!("{}:7000", unused_in_block(&cs["a2"].v4));
    let spoofed = unused_in_block(&cs["a1"].v4);
    let lk = format!("{}:7000", cs["lk"].name);
    let vip = format!("{}:80", s.vip);
    let h1 = s.lab.host_ns("h1");
    let n = |k: &str| cs[k].name.clone();
    let d = |k: &str| format!("{}:7000", cs[k].name);
    let mut table = vec![
        case(
            "same host",
            &[&n("a1"), &d("b1")],
            (true, "destination"),
            &a1,
        ),
        case(
            "vxlan cross host",
            &[&n("a1"), &d("a2")],
            (true, "destination"),
            &a1,
        ),
        case(
            "vxlan cross host v6",
            &[&n("a1"), &v6],
            (true, "destination"),
            &a1,
        ),
        case(
            "vxlan cross host udp",
            &[&n("a1"), &format!("{}/udp", d("a3"))],
            (true, "destination"),
            &a1,
        ),
        case(
            "route backend",
            &[&n("r1"), &d("r2")],
            (true, "destination"),
            &cs["r1"].netns(),
        ),
        case(
            "sleeve backend",
            &[&n("s1"), &d("s2")],
            (true, "destination"),
            &cs["s1"].netns(),
        ),
        case(
            "routed mode",
            &[&n("o1"), &d("o2")],
            (true, "destination"),
            &cs["o1"].netns(),
        ),
        case(
            "published port",
            &[&n("a1"), "h2:8080"],
            (true, "destination"),
            &a1,
        ),
        case(
            "published from outside",
            &["172.31.0.200", "h2:8080"],
            (true, "destination"),
            &s.out_ns,
        ),
        case("VIP", &[&n("a1"), &vip], (true, "destination"), &a1),
        case(
            "ingress from outside",
            &["172.31.0.200", "h2:30080"],
            (true, "destination"),
            &s.out_ns,
        ),
        case(
            "isolated network",
            &[&n("a1"), &d("i1")],
            (false, "isolation"),
            &a1,
        ),
        case("policy deny", &[&n("a1"), &lk], (false, "policy"), &a1),
        case(
            "unused address",
            &[&n("a1"), &unused],
            (false, "destination"),
            &a1,
        ),
        case(
            "outside address",
            &[&n("a1"), "172.31.0.200:7000"],
            (true, "route"),
            &a1,
        ),
        // h1's own packets to a2 leave through the VXLAN device, which has no address: the
        // fabric route's preferred source is h1's gateway in `fabric` (else the kernel would
        // pick network ro's gateway on lo, and isolation would drop them on h2).
        case(
            "host to container",
            &["host", &d("a2")],
            (true, "destination"),
            &h1,
        ),
        // The same through the sleeve's device.
        case(
            "host to sleeve container",
            &["host", &d("s2")],
            (true, "destination"),
            &h1,
        ),
        case(
            "host to own container",
            &["host", &d("b1")],
            (true, "destination"),
            &h1,
        ),
    ];
    let mut spoof = case(
        "spoofed source",
        &[&n("a1"), &d("b1"), "--spoof", &spoofed],
        (false, "anti-spoofing"),
        &a1,
    );
    spoof.bind = Some(spoofed.clone());
    for c in &table {
        check(&s, c);
    }
    // The spoofed source: the forged address on a1's interface, and the guard counts the drop.
    must(&[
        "ip",
        "-n",
        &a1,
        "addr",
        "add",
        &format!("{spoofed}/32"),
        "dev",
        "eth0",
    ]);
    let before = spoof_count(&s.lab, "h1");
    check(&s, &spoof);
    must(&[
        "ip",
        "-n",
        &a1,
        "addr",
        "del",
        &format!("{spoofed}/32"),
        "dev",
        "eth0",
    ]);
    assert!(
        spoof_count(&s.lab, "h1") > before,
        "the guard counted no spoofed packet"
    );
    table.push(spoof);

    // --live: a passing and a dropped case, the tables gone afterwards.
    let live = trace(&s.lab, "h1", &[&n("a1"), &d("a2"), "--live"]);
    assert_eq!(live["live"]["dropped"], false, "{live}");
    assert_eq!(live["live"]["agrees"], true, "{live}");
    assert_eq!(live["live"]["probe"], "connected", "{live}");
    assert!(
        !live["live"]["rules"].as_array().unwrap().is_empty(),
        "{live}"
    );
    let live = trace(&s.lab, "h1", &[&n("a1"), &d("i1"), "--live"]);
    assert_eq!(live["live"]["dropped"], true, "{live}");
    assert_eq!(live["live"]["agrees"], true, "{live}");
    assert!(
        live["live"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("drop")),
        "{live}"
    );
    let tables = || must(&["ip", "netns", "exec", &h1, "nft", "list", "tables"]);
    assert!(!tables().contains("fntrace"), "{}", tables());
    // SIGINT while the probe waits: the tables still go.
    let rec: Value = serde_json::from_slice(
        &std::fs::read(format!("/run/ferrynet-lab/{}/lab.json", s.lab.name)).unwrap(),
    )
    .unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{h1}"))
        .arg(bin())
        .args(["trace", &n("a1"), &d("i1"), "--live"])
        .env(
            "FERRYNET_STATE_DIR",
            format!("/run/ferrynet-lab/{}/h1", s.lab.name),
        )
        .env("FERRYNET_STORE", rec["store"].as_str().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    within(Duration::from_secs(10), || {
        tables()
            .contains("fntrace")
            .then_some(())
            .ok_or_else(|| "no table yet".to_string())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("interrupted"), "{}", out(&o));
    assert!(!tables().contains("fntrace"), "{}", tables());

    // Bad input: clear errors, non-zero exit.
    s.lab.fails(
        "h1",
        &["trace", "nosuch", &d("a2")],
        "no container, host or address",
    );
    s.lab.fails(
        "h1",
        &["trace", &n("a1"), "nosuch:80"],
        "no container, host or address",
    );
    for bad in [":80", "x:0", "x:http", "x:80/icmp", "x:99999"] {
        let dst = bad.replace('x', &n("a2"));
        s.lab
            .fails("h1", &["trace", &n("a1"), &dst], "bad destination");
    }
    s.lab.fails(
        "h1",
        &["trace", &n("a2"), &d("a1"), "--live"],
        "run the trace there",
    );

    // Last: a fabric route deleted in h1's namespace (its agent stopped first, so nothing puts
    // it back): the trace drops at h1's route step, as the probe does.
    s.lab.lab(&["stop-agent", "h1"]);
    let ns = s.lab.host_ns("h1");
    let routes = must(&["ip", "-n", &ns, "-j", "route", "show", "proto", "113"]);
    let routes: Vec<Value> = serde_json::from_str(&routes).unwrap();
    let a3: std::net::IpAddr = cs["a3"].v4.parse().unwrap();
    let block = routes
        .iter()
        .filter_map(|r| r["dst"].as_str())
        .find(|d| {
            d.parse::<ipnet::IpNet>()
                .map(|n| n.contains(&a3))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no fabric route to {a3} on h1: {routes:?}"))
        .to_string();
    must(&["ip", "-n", &ns, "route", "del", &block]);
    check(
        &s,
        &case(
            "missing route",
            &[&n("a1"), &d("a3")],
            (false, "route"),
            &a1,
        ),
    );
    // And h2's FDB entry on h1's VXLAN device: dropped at h1's backend step.
    let t = trace(&s.lab, "h1", &[&n("a1"), &d("a2")]);
    let hop = t["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["step"] == "backend")
        .unwrap_or_else(|| panic!("no backend hop: {t}"));
    assert_eq!(hop["basis"], "kernel", "{t}");
    let what = hop["what"].as_str().unwrap();
    let words: Vec<&str> = what.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "FDB")
        .expect("FDB in the hop");
    let (mac, vtep) = (words[at + 1], words[at + 3]);
    let route = t["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["step"] == "route")
        .unwrap()["what"]
        .as_str()
        .unwrap()
        .to_string();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .expect("dev in the route hop")
        .to_string();
    must(&[
        "bridge", "-n", &ns, "fdb", "del", mac, "dev", &dev, "dst", vtep, "self",
    ]);
    check(
        &s,
        &case(
            "missing FDB entry",
            &[&n("a1"), &d("a2")],
            (false, "backend"),
            &a1,
        ),
    );
    eprintln!("{} cases matched their probes", table.len() + 2);
}
