//! Virtual IPs, load balancing and ingress in a 3-host lab on a real etcd: producers are
//! containers (`ferrynet run`) on the lab hosts answering with their id and the peer address
//! they see; clients are containers, a lab host itself, and an "outside" namespace on the
//! lab's underlay. Every lab is removed on drop (its namespaces take the nftables tables
//! with them), also when a test fails.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::{bin, out};
use serde_json::Value;

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// Answers every connection on port 8080 with `<id> <peer address>\n`, then echoes what it
/// gets until the client closes (so a connection can stay open).
fn server_code(id: &str) -> String {
    format!(
        "import socket,threading\n\
         s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',8080));s.listen(512)\n\
         def serve(c,a):\n  h=a[0]\n  h=h[7:] if h.startswith('::ffff:') else h\n  \
         try:\n    c.sendall(('{id} '+h+'\\n').encode())\n    \
         while True:\n      d=c.recv(4096)\n      if not d: break\n      c.sendall(d)\n  \
         except OSError: pass\n  c.close()\n\
         while True:\n  c,a=s.accept();threading.Thread(target=serve,args=(c,a),daemon=True).start()\n"
    )
}

/// Opens `n` connections to `addr`:`port` one after another; prints a JSON object
/// {"counts": {id: n}, "peers": {id: [peer addresses]}, "errors": [..]}.
fn client_code(addr: &str, port: u16, n: u32) -> String {
    format!(
        "import socket,json\n\
         counts={{}};peers={{}};errors=[]\n\
         for i in range({n}):\n  \
         try:\n    s=socket.create_connection(('{addr}',{port}),timeout=3);f=s.makefile()\n    \
         l=f.readline().split();s.close()\n    counts[l[0]]=counts.get(l[0],0)+1\n    \
         peers.setdefault(l[0],set()).add(l[1])\n  \
         except Exception as e:\n    errors.append(type(e).__name__+': '+str(e))\n\
         print(json.dumps({{'counts':counts,'peers':{{k:sorted(v) for k,v in peers.items()}},'errors':errors[:5],'nerrors':len(errors)}}))\n"
    )
}

/// The result of a client run.
#[derive(Debug)]
struct Tally {
    counts: BTreeMap<String, u64>,
    peers: BTreeMap<String, Vec<String>>,
    errors: Vec<String>,
    nerrors: u64,
}

fn tally(o: &Output) -> Tally {
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("client output ({e}): {}", out(o)));
    let counts = v["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect();
    let peers = v["peers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, l)| {
            (
                k.clone(),
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    Tally {
        counts,
        peers,
        errors: v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        nerrors: v["nerrors"].as_u64().unwrap(),
    }
}

impl Lab {
    /// The 3-host VXLAN lab, after removing a leftover "outside" namespace of a killed run.
    fn lb(name: &str) -> Lab {
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{name}-out")])
            .output();
        Lab::vxlan3(name)
    }

    /// A producer container on `host` answering with its id `short`.
    fn producer(&mut self, host: &str, short: &str) -> Container {
        let code = server_code(short);
        let c = self.run(host, short, &[], &["python3", "-c", &code]);
        assert!(!c.v6.is_empty(), "v6");
        c
    }
}

/// A service's registration on the command line.
struct Svc<'a> {
    name: &'a str,
    vips: &'a [&'a str],
    affinity: bool,
    ingress: Option<&'a str>,
}

impl Svc<'_> {
    /// `ferrynet service register` one producer (container `c`, id `id`, port 80 -> 8080);
    /// `extra` adds flags (a check).
    fn register(&self, lab: &Lab, c: &Container, id: &str, extra: &[&str]) {
        let mut args = vec!["service", "register", self.name, "--port", "http=80"];
        for v in self.vips {
            args.extend_from_slice(&["--vip", v]);
        }
        if self.affinity {
            args.push("--affinity");
        }
        if let Some(i) = self.ingress {
            args.extend_from_slice(&["--ingress", i]);
        }
        args.extend_from_slice(&[
            "--addr", &c.v4, "--addr", &c.v6, "--id", id, "--target", "80:8080",
        ]);
        args.extend_from_slice(extra);
        let o = lab.exec(&c.host, &args);
        assert!(o.status.success(), "register {id}: {}", out(&o));
    }
    /// Register the three producers p1..p3.
    fn register_all(&self, lab: &Lab, ps: &[Container]) {
        for (i, c) in ps.iter().enumerate() {
            self.register(lab, c, &format!("p{}", i + 1), &[]);
        }
    }
}

fn deregister(lab: &Lab, args: &[&str]) {
    let mut a = vec!["service", "deregister"];
    a.extend_from_slice(args);
    let o = lab.exec("h1", &a);
    assert!(o.status.success(), "deregister {args:?}: {}", out(&o));
}

/// Run the client in the namespace `ns` (a container's or a lab host's).
fn connect_from(ns: &str, addr: &str, port: u16, n: u32) -> Tally {
    let o = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "python3",
            "-c",
            &client_code(addr, port, n),
        ])
        .output()
        .expect("python3");
    assert!(o.status.success(), "client in {ns}: {}", out(&o));
    tally(&o)
}

/// What a failed convergence reports: each host's table and load-balancer status.
fn diagnose(lab_name: &str) -> String {
    let mut s = String::new();
    for h in ["h1", "h2", "h3"] {
        let o = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{lab_name}-{h}"),
                "nft",
                "list",
                "table",
                "inet",
                "ferrynet-svc",
            ])
            .output()
            .unwrap();
        let log = std::fs::read_to_string(format!("/run/ferrynet-lab/{lab_name}/{h}/agent.log"))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        s += &format!("--- {h}\n{}\n{}\n", out(&o), tail.join("\n"));
    }
    s
}

/// Repeat small runs until `ok` holds for one (the agents converge), up to 30 s.
fn converge(
    lab_name: &str,
    ns: &str,
    addr: &str,
    port: u16,
    what: &str,
    ok: impl Fn(&Tally) -> bool,
) -> Tally {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let t = connect_from(ns, addr, port, 30);
        if ok(&t) {
            return t;
        }
        if Instant::now() >= until {
            panic!(
                "{what}: not converged after 30 s from {ns} to {addr}:{port}: {t:?}\n{}",
                diagnose(lab_name)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn all_three(t: &Tally) -> bool {
    t.nerrors == 0 && ["p1", "p2", "p3"].iter().all(|p| t.counts.contains_key(*p))
}

fn assert_even(t: &Tally, n: u64, what: &str) {
    assert_eq!(t.nerrors, 0, "{what}: failed connections: {t:?}");
    let (lo, hi) = (n * 85 / 100, n * 115 / 100);
    for p in ["p1", "p2", "p3"] {
        let got = t.counts.get(p).copied().unwrap_or(0);
        assert!(
            (lo..=hi).contains(&got),
            "{what}: {p} got {got} of {} (want {lo}..={hi}): {t:?}",
            3 * n
        );
    }
}

fn three_producers(lab: &mut Lab) -> Vec<Container> {
    ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.producer(h, &format!("p{}", i + 1)))
        .collect()
}

#[test]
fn vip_spreads_evenly_from_containers_and_hosts_with_affinity_and_ipv6() {
    let mut lab = Lab::lb("lbvip");
    let ps = three_producers(&mut lab);
    let client = lab.run("h1", "cl", &[], &["sleep", "infinity"]);
    let web = Svc {
        name: "web",
        vips: &[VIP4, VIP6],
        affinity: false,
        ingress: None,
    };
    web.register_all(&lab, &ps);
    converge(
        &lab.name,
        &client.netns(),
        VIP4,
        80,
        "web from a container",
        all_three,
    );

    // 3,000 new connections from a container on h1 (p1 is on its bridge: its replies are
    // bridged back, and the host still un-DNATs them).
    let t = connect_from(&client.netns(), VIP4, 80, 3000);
    assert_even(&t, 1000, "container -> VIP");
    // Producers see the client's own address, wherever they run.
    for p in ["p1", "p2", "p3"] {
        assert!(
            t.peers[p].iter().all(|a| a == &client.v4),
            "{p} saw {:?}, expected {}",
            t.peers[p],
            client.v4
        );
    }
    // The same from host h1 itself (the output path).
    let h1 = lab.host_ns("h1");
    converge(&lab.name, &h1, VIP4, 80, "web from host h1", all_three);
    let t = connect_from(&h1, VIP4, 80, 3000);
    assert_even(&t, 1000, "host -> VIP");
    // IPv6 VIP, from a container and from a host.
    let t = converge(
        &lab.name,
        &client.netns(),
        VIP6,
        80,
        "web over IPv6",
        all_three,
    );
    assert_eq!(t.nerrors, 0);
    converge(
        &lab.name,
        &lab.host_ns("h2"),
        VIP6,
        80,
        "web over IPv6 from h2",
        all_three,
    );

    // Client-IP affinity: every connection of one client lands on one producer. Adding the
    // service leaves web's chain as it was (same rule handles: not rewritten).
    let web_chain = || {
        let o = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{}", lab.host_ns("h1")),
                "nft",
                "-a",
                "list",
                "chain",
                "inet",
                "ferrynet-svc",
                "svc-web-tcp-80-4",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", out(&o));
        out(&o)
    };
    let before = web_chain();
    let sticky = Svc {
        name: "sticky",
        vips: &["10.96.0.11", "fd00:96::11"],
        affinity: true,
        ingress: None,
    };
    sticky.register_all(&lab, &ps);
    let t = converge(
        &lab.name,
        &client.netns(),
        "10.96.0.11",
        80,
        "sticky",
        |t| t.nerrors == 0 && !t.counts.is_empty(),
    );
    let t2 = connect_from(&client.netns(), "10.96.0.11", 80, 200);
    assert_eq!(t2.nerrors, 0, "{t2:?}");
    assert_eq!(t.counts.len(), 1, "one client, one producer: {t:?}");
    assert_eq!(web_chain(), before, "web's chain was rewritten");
    assert_eq!(
        t2.counts.keys().collect::<Vec<_>>(),
        t.counts.keys().collect::<Vec<_>>(),
        "affinity held: {t:?} then {t2:?}"
    );
    // Other clients are still spread: the three hosts together reach more than one producer
    // is not guaranteed, but each host sticks to one too.
    for h in ["h1", "h2", "h3"] {
        let t = converge(
            &lab.name,
            &lab.host_ns(h),
            "10.96.0.11",
            80,
            "sticky from a host",
            |t| t.nerrors == 0 && !t.counts.is_empty(),
        );
        assert_eq!(t.counts.len(), 1, "host {h} sticks to one producer: {t:?}");
    }

    // Every host reports its table.
    for h in ["h1", "h2", "h3"] {
        let st = lab.status(h);
        assert_eq!(st["lb"]["chains"], 4, "{h}: {}", st["lb"]);
        assert!(st["lb"]["error"].is_null(), "{h}: {}", st["lb"]);
    }
    let o = lab.exec("h2", &["status"]);
    assert!(
        out(&o).contains("load balancer: 4 service chains, 4 VIP ports"),
        "{}",
        out(&o)
    );

    // p3 moves: a new container on h1 takes over the producer id p3 (it answers "p3m"); the
    // VIP reaches it, and no longer the old one.
    let moved = lab.producer("h1", "p3m");
    web.register(&lab, &moved, "p3", &[]);
    converge(&lab.name, &client.netns(), VIP4, 80, "p3 moved", |t| {
        t.nerrors == 0 && t.counts.contains_key("p3m") && !t.counts.contains_key("p3")
    });
    converge(
        &lab.name,
        &lab.host_ns("h3"),
        VIP6,
        80,
        "p3 moved (IPv6, h3)",
        |t| t.nerrors == 0 && t.counts.contains_key("p3m") && !t.counts.contains_key("p3"),
    );
}

/// A client that connects to `addr`:80 until it reaches producer `want`, then sends a line
/// every 50 ms and checks the echo until its stdin closes; prints `connected`, then `ok N`;
/// exits non-zero on any error.
fn long_lived(ns: &str, addr: &str, want: &str) -> Child {
    let code = format!(
        "import socket,time,sys,select\n\
         for i in range(2000):\n  \
         s=socket.create_connection(('{addr}',80),timeout=5);f=s.makefile('rb')\n  \
         if f.readline().split()[0]==b'{want}': break\n  s.close()\n\
         else:\n  sys.exit('never reached {want}')\n\
         print('connected',flush=True)\n\
         n=0\n\
         while not select.select([sys.stdin],[],[],0)[0]:\n  s.sendall(b'x'*16+b'\\n');l=f.readline()\n  \
         assert l==b'x'*16+b'\\n',('bad echo',l)\n  n+=1;time.sleep(0.05)\n\
         print('ok',n,flush=True)\n"
    );
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "python3",
            "-u",
            "-c",
            &code,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("long-lived client");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected", "long-lived client to {want}");
    child
}

/// Close the client's stdin (it stops) and check that it never failed.
fn finished_ok(mut c: Child, what: &str) {
    drop(c.stdin.take());
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{what} broke: {}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ok "),
        "{what}: {}",
        out(&o)
    );
}

#[test]
fn producer_changes_keep_established_connections_and_no_producers_refuse() {
    let mut lab = Lab::lb("lbchurn");
    let ps = three_producers(&mut lab);
    let client = lab.run("h1", "cl", &[], &["sleep", "infinity"]);
    let web = Svc {
        name: "web",
        vips: &[VIP4, VIP6],
        affinity: false,
        ingress: None,
    };
    web.register_all(&lab, &ps);
    converge(&lab.name, &client.netns(), VIP4, 80, "web", all_three);

    // Long-lived connections to p3 (about to be removed) and to p1 (staying).
    let to_p3 = long_lived(&client.netns(), VIP4, "p3");
    let to_p1 = long_lived(&client.netns(), VIP4, "p1");

    // The agent on h1 restarts meanwhile: the table stays, nothing is dropped.
    let lab_cmd = |args: &[&str]| {
        let mut a = vec!["lab"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--name", &lab.name]);
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert!(o.status.success(), "lab {args:?}: {}", out(&o));
    };
    lab_cmd(&["stop-agent", "h1", "--kill"]);
    let t = connect_from(&client.netns(), VIP4, 80, 60);
    assert_eq!(t.nerrors, 0, "VIP served while the agent is down: {t:?}");
    lab_cmd(&["start-agent", "h1"]);

    // p3 leaves (its container keeps running): new connections avoid it.
    deregister(&lab, &["web", "--id", "p3"]);
    converge(&lab.name, &client.netns(), VIP4, 80, "p3 removed", |t| {
        t.nerrors == 0 && !t.counts.contains_key("p3")
    });
    let t = connect_from(&client.netns(), VIP4, 80, 300);
    assert!(
        t.nerrors == 0 && !t.counts.contains_key("p3") && t.counts.len() == 2,
        "{t:?}"
    );

    // p2 fails its health check: it leaves the LB too.
    // p2 fails its health check (run by h2's agent in p2's namespace): it leaves the LB.
    web.register(
        &lab,
        &ps[1],
        "p2",
        &["--check", "exec:false", "--interval", "300ms"],
    );
    converge(&lab.name, &client.netns(), VIP4, 80, "p2 unhealthy", |t| {
        t.nerrors == 0 && t.counts.keys().collect::<Vec<_>>() == ["p1"]
    });

    // Both long-lived connections kept working through all of it (conntrack).
    finished_ok(to_p3, "connection to the removed p3");
    finished_ok(to_p1, "connection to p1");

    // The table vanishes (a firewall reload): the agent puts it back.
    let h1 = lab.host_ns("h1");
    let o = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{h1}"),
            "nft",
            "delete",
            "table",
            "inet",
            "ferrynet-svc",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    converge(&lab.name, &client.netns(), VIP4, 80, "table rebuilt", |t| {
        t.nerrors == 0 && t.counts.keys().collect::<Vec<_>>() == ["p1"]
    });

    // No producers left: connections are refused (a reset), not left hanging.
    deregister(&lab, &["web", "--id", "p1"]);
    let t = converge(&lab.name, &client.netns(), VIP4, 80, "no producers", |t| {
        t.counts.is_empty()
    });
    assert_eq!(t.nerrors, 30, "{t:?}");
    assert!(
        t.errors.iter().all(|e| e.contains("ConnectionRefused")),
        "refused, not timed out: {t:?}"
    );
    let t = connect_from(&h1, VIP4, 80, 5);
    assert!(
        t.errors.iter().all(|e| e.contains("ConnectionRefused")) && t.nerrors == 5,
        "from the host too: {t:?}"
    );
    let t = connect_from(&client.netns(), VIP6, 80, 5);
    assert!(
        t.errors.iter().all(|e| e.contains("ConnectionRefused")) && t.nerrors == 5,
        "over IPv6 too: {t:?}"
    );
}

#[test]
fn ingress_answers_on_every_host_from_outside() {
    let mut lab = Lab::lb("lbingr");
    let ps = three_producers(&mut lab);
    let out_ns = lab.outside();
    let web = Svc {
        name: "web",
        vips: &[VIP4],
        affinity: false,
        ingress: Some("8088:80"),
    };
    web.register_all(&lab, &ps);
    // Every host drops forwarded traffic by default, as Docker makes it; ferrynet's own
    // iptables accepts (fn-* interfaces, marked ingress connections) must carry everything.
    for h in ["h1", "h2", "h3"] {
        for tool in ["iptables", "ip6tables"] {
            let o = Command::new("nsenter")
                .args([
                    &format!("--net=/run/netns/{}", lab.host_ns(h)),
                    tool,
                    "-P",
                    "FORWARD",
                    "DROP",
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{tool} on {h}: {}", out(&o));
        }
    }
    for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
        let addr = format!("172.31.0.{}", i + 1);
        let local = format!("p{}", i + 1);
        converge(
            &lab.name,
            &out_ns,
            &addr,
            8088,
            &format!("ingress on {h}"),
            all_three,
        );
        let t = connect_from(&out_ns, &addr, 8088, 300);
        assert_eq!(t.nerrors, 0, "{h}: {t:?}");
        assert_eq!(t.counts.len(), 3, "{h}: spread over every host: {t:?}");
        // The producer on the host that took the connection sees the client itself; the
        // others see that host (masquerade), so replies return through it.
        for (p, peers) in &t.peers {
            if *p == local {
                assert_eq!(peers, &["172.31.0.200"], "{h} -> {p}: {t:?}");
            } else {
                assert!(
                    !peers.iter().any(|a| a == "172.31.0.200"),
                    "{h} -> {p} must be masqueraded: {t:?}"
                );
            }
        }
        // The host itself, on its own address.
        let t = converge(
            &lab.name,
            &lab.host_ns(h),
            &addr,
            8088,
            &format!("ingress from {h} itself"),
            all_three,
        );
        assert_eq!(t.nerrors, 0, "{t:?}");
        // IPv6 ingress on the host's underlay address.
        let addr6 = format!("fd31::{}", i + 1);
        converge(
            &lab.name,
            &out_ns,
            &addr6,
            8088,
            &format!("ingress over IPv6 on {h}"),
            all_three,
        );
    }
    // Removing the service closes the port everywhere.
    deregister(&lab, &["web"]);
    converge(
        &lab.name,
        &out_ns,
        "172.31.0.2",
        8088,
        "ingress withdrawn",
        |t| t.counts.is_empty() && t.errors.iter().all(|e| e.contains("ConnectionRefused")),
    );
}
