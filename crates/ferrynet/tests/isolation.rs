//! The trust boundary between networks, on the real kernel: isolation by the source network's
//! identity (single host and a 3-host lab on etcd for each backend, IPv4 and IPv6), loopback
//! that stays on `lo`, and ferrynet's iptables accepts placed after Docker's DOCKER-USER.
//!
//! One-way probes (forged sources, crafted frames) use UDP: a sink records every datagram, and
//! after the forged ones a control datagram is sent along the same path; once the control one
//! arrived, a forged one that was not dropped would have arrived before it. No timing.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::{Container, Lab as MultiLab};
use common::*;
use serde_json::{json, Value};

/// A UDP sink in the namespace `netns` (a path under /run/netns) on `port`, both families,
/// appending each datagram's payload as a line to a file; waits until it listens.
struct Sink {
    _proc: Proc,
    file: tempfile::NamedTempFile,
}

impl Sink {
    fn start(netns: &str, port: u16) -> Sink {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let code = format!(
            "import socket,sys\n\
             s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',{port}))\n\
             f=open(sys.argv[1],'a')\n\
             print('ready',flush=True)\n\
             while True:\n  d,a=s.recvfrom(2000);f.write(d.decode(errors='replace')+'\\n');f.flush()\n"
        );
        let mut child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["python3", "-u", "-c", &code])
            .arg(file.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sink");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut out, &mut buf).expect("sink did not start");
        Sink {
            _proc: Proc(child),
            file,
        }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.file.path())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Send `forged` once, then `control` until it arrives; whether the forged payload
    /// arrived. Panics when the control never arrives (the probe proved nothing).
    fn forged_arrives(&self, what: &str, forged: impl Fn(), control: impl Fn()) -> bool {
        forged();
        within(Duration::from_secs(15), || {
            control();
            if self.lines().iter().any(|l| l.starts_with("control")) {
                Ok(())
            } else {
                Err(format!("{what}: the control datagram never arrived"))
            }
        });
        let got = self.lines().iter().any(|l| l.starts_with("forged"));
        // Empty the file for the next probe.
        let _ = std::fs::write(self.file.path(), "");
        got
    }
}

/// Send one UDP datagram from namespace `netns` (path), bound to `src` when given.
fn udp_send(netns: &str, src: Option<&str>, dst: &str, port: u16, payload: &str) {
    let bind = src.map_or(String::new(), |s| format!("s.bind(('{s}',0))\n"));
    let fam = if dst.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let code = format!(
        "import socket\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n{bind}s.sendto(b'{payload}',('{dst}',{port}))\n"
    );
    let o = sh(&["nsenter", &format!("--net={netns}"), "python3", "-c", &code]);
    assert!(
        o.status.success(),
        "udp send {payload} to {dst}: {}",
        out(&o)
    );
}

/// Send a hand-made Ethernet/IPv4/UDP frame out of `ifname` in namespace `netns` (path): to
/// `dmac`, from `src` to `dst`:`port`. This is how a container or a neighbour puts a packet
/// with destination 127.0.0.1 on the wire (its own stack would keep it on its `lo`).
fn raw_udp(netns: &str, ifname: &str, dmac: &str, src: &str, dst: &str, port: u16, payload: &str) {
    let code = "import socket,struct,sys\n\
        ifn,dmac,src,dst,dport,data=sys.argv[1:7]\n\
        def csum(b):\n  s=sum(struct.unpack('!%dH'%(len(b)//2),b));s=(s>>16)+(s&0xffff);s+=s>>16;return ~s&0xffff\n\
        mac=lambda m: bytes(int(x,16) for x in m.split(':'))\n\
        s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);s.bind((ifn,0));smac=s.getsockname()[4]\n\
        data=data.encode()\n\
        udp=struct.pack('!HHHH',40000,int(dport),8+len(data),0)+data\n\
        ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),1,0,64,17,0,socket.inet_aton(src),socket.inet_aton(dst))\n\
        ip=ip[:10]+struct.pack('!H',csum(ip))+ip[12:]\n\
        s.send(mac(dmac)+smac+b'\\x08\\x00'+ip+udp)\n";
    let port = port.to_string();
    let o = sh(&[
        "nsenter",
        &format!("--net={netns}"),
        "python3",
        "-c",
        code,
        ifname,
        dmac,
        src,
        dst,
        &port,
        payload,
    ]);
    assert!(o.status.success(), "raw frame {payload}: {}", out(&o));
}

/// The MAC address behind `ip` as seen from `netns` (path) on `dev` (resolved by a datagram).
fn neighbour_mac(netns: &str, ip: &str, dev: &str) -> String {
    within(Duration::from_secs(10), || {
        udp_send(netns, None, ip, 9, "arp");
        let o = sh(&[
            "nsenter",
            &format!("--net={netns}"),
            "ip",
            "-j",
            "neigh",
            "show",
            ip,
            "dev",
            dev,
        ]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v.get(0)
            .and_then(|n| n["lladdr"].as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("no neighbour entry for {ip}: {}", out(&o)))
    })
}

/// Addresses of an ADD result: (IPv4, IPv6).
fn addrs(res: &Value) -> (String, String) {
    let all: Vec<String> = res["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    let v4 = all
        .iter()
        .find(|a| !a.contains(':'))
        .cloned()
        .unwrap_or_default();
    let v6 = all
        .iter()
        .find(|a| a.contains(':'))
        .cloned()
        .unwrap_or_default();
    (v4, v6)
}

/// The elements of one of ferrynet's sets in the host namespace, as nft prints them.
fn set_text(lab: &Lab, set: &str) -> String {
    out(&lab
        .host
        .run(&["nft", "list", "set", "inet", "ferrynet", set]))
}

/// Give the outside client of a single-host lab IPv6 too: host `fd50:N::1`, client
/// `fd50:N::2`, default route via the host.
fn outside_v6(lab: &Lab, client: &Ns, host_ip: &str, n: u8) -> (String, String) {
    let o = lab.host.must(&["ip", "-j", "-4", "addr", "show"]);
    let v: Value = serde_json::from_str(&o).expect("ip -j");
    let link = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| {
            l["addr_info"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["local"] == host_ip))
        })
        .and_then(|l| l["ifname"].as_str())
        .expect("the host's outside link")
        .to_string();
    let (h6, c6) = (format!("fd50:{n}::1"), format!("fd50:{n}::2"));
    lab.host.must(&[
        "ip",
        "addr",
        "add",
        &format!("{h6}/64"),
        "dev",
        &link,
        "nodad",
    ]);
    client.must(&[
        "ip",
        "addr",
        "add",
        &format!("{c6}/64"),
        "dev",
        "ext0",
        "nodad",
    ]);
    client.must(&["ip", "-6", "route", "add", "default", "via", &h6]);
    (h6, c6)
}

#[test]
fn single_host_networks_are_isolated_by_address() {
    let lab = Lab::new();
    let t = &lab.tag;
    // Two networks defined in CNI configs, dual-stack, and one created with the CLI.
    let a = lab.conf(&format!("ia{t}"), "10.231.0.0/24", Some("fd31:a::/64"));
    let b = lab.conf(&format!("ib{t}"), "10.232.0.0/24", Some("fd31:b::/64"));
    let (ca, ca2, cb) = (Ns::new("c"), Ns::new("c"), Ns::new("c"));
    let (a4, a6) = addrs(&lab.add(&a, "a", &ca, "eth0"));
    lab.add(&a, "a2", &ca2, "eth0");
    let mut bp = b.clone();
    bp["runtimeConfig"] = json!({ "portMappings": [
        {"hostPort": 8090, "containerPort": 80, "protocol": "tcp"}] });
    let (b4, b6) = addrs(&lab.add(&bp, "b", &cb, "eth0"));
    let _sa = tcp_server(&ca, 80, "a");
    let _sb = tcp_server(&cb, 80, "b");
    let (client, host_ip, client_ip) = lab.outside(31);
    let (host6, client6) = outside_v6(&lab, &client, &host_ip, 31);

    // Across networks: refused both ways, both families.
    for (from, to, what) in [
        (&ca, &b4, "a -> b v4"),
        (&ca, &b6, "a -> b v6"),
        (&cb, &a4, "b -> a v4"),
        (&cb, &a6, "b -> a v6"),
    ] {
        assert!(tcp_get(from, to, 80).is_none(), "{what} must be refused");
    }
    // Same network: works.
    assert_eq!(
        tcp_get(&ca2, &a4, 80)
            .as_deref()
            .map(|s| s.starts_with("a ")),
        Some(true)
    );
    assert!(tcp_get(&ca2, &a6, 80).is_some(), "same network v6");
    // B's published port is reachable from A's container through the host's address, and
    // from outside.
    assert!(tcp_get(&ca, &host_ip, 8090).is_some(), "a -> host:8090 (b)");
    assert!(
        tcp_get(&client, &host_ip, 8090).is_some(),
        "outside -> host:8090"
    );
    assert!(
        tcp_get(&client, &host6, 8090).is_some(),
        "outside -> [host]:8090"
    );

    // A neighbour forging a source in A's pool reaches nothing of B (the receiving-host rule:
    // on one host the device pair alone would let it through, it comes from no bridge).
    let sink = Sink::start(&cb.path(), 9999);
    for (forged_src, dst, control_src) in [
        ("10.231.0.250", &b4, &client_ip),
        ("fd31:a::fa", &b6, &client6),
    ] {
        let mut add = vec!["ip", "addr", "add", forged_src, "dev", "ext0"];
        if forged_src.contains(':') {
            add.push("nodad");
        }
        client.must(&add);
        let arrived = sink.forged_arrives(
            &format!("forged {forged_src} -> {dst}"),
            || udp_send(&client.path(), Some(forged_src), dst, 9999, "forged"),
            || udp_send(&client.path(), Some(control_src), dst, 9999, "control"),
        );
        assert!(
            !arrived,
            "a datagram from {forged_src} (network a's pool) reached b"
        );
    }

    // A network created with the CLI joins the isolation sets at once, before any bridge.
    let o = lab.cli(&[
        "network",
        "create",
        &format!("ic{t}"),
        "--subnet",
        "10.233.0.0/24",
        "--subnet",
        "fd31:c::/64",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        set_text(&lab, "nets4").contains("10.233.0.0/24"),
        "{}",
        set_text(&lab, "nets4")
    );
    assert!(set_text(&lab, "same6").contains("fd31:c::/64 . fd31:c::/64"));
    let o = lab.cli(&["network", "rm", &format!("ic{t}")]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(!set_text(&lab, "nets4").contains("10.233.0.0/24"));
}

#[test]
fn loopback_stays_on_lo() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("lo{}", lab.tag), "10.234.0.0/24", None);
    let (web, probe) = (Ns::new("c"), Ns::new("c"));
    let mut pc = conf.clone();
    pc["runtimeConfig"] = json!({ "portMappings": [
        {"hostPort": 9001, "containerPort": 9999, "protocol": "udp", "hostIP": "127.0.0.1"},
        {"hostPort": 9002, "containerPort": 9999, "protocol": "udp"},
        {"hostPort": 9003, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}] });
    lab.add(&pc, "web", &web, "eth0");
    let res = lab.add(&conf, "probe", &probe, "eth0");
    let (probe_ip, _) = addrs(&res);
    let gw = res["ips"][0]["gateway"]
        .as_str()
        .expect("gateway")
        .to_string();
    let _srv = tcp_server(&web, 80, "web");
    let (client, host_ip, client_ip) = lab.outside(32);

    // The host itself still reaches its port published on 127.0.0.1 (the hairpin's reply is
    // addressed to the gateway when the localnet chain sees it).
    assert!(
        tcp_get(&lab.host, "127.0.0.1", 9003).is_some(),
        "host -> 127.0.0.1:9003"
    );

    // A container crafts frames to 127.0.0.1 for the gateway's MAC: neither a host service
    // (the sink on the host, all addresses) nor the port published on 127.0.0.1 answers.
    let gw_mac = neighbour_mac(&probe.path(), &gw, "eth0");
    let host_sink = Sink::start(&lab.host.path(), 7777);
    let arrived = host_sink.forged_arrives(
        "container -> 127.0.0.1:7777",
        || {
            raw_udp(
                &probe.path(),
                "eth0",
                &gw_mac,
                &probe_ip,
                "127.0.0.1",
                7777,
                "forged",
            )
        },
        || {
            raw_udp(
                &probe.path(),
                "eth0",
                &gw_mac,
                &probe_ip,
                &gw,
                7777,
                "control",
            )
        },
    );
    assert!(!arrived, "a container reached a host service on 127.0.0.1");
    let web_sink = Sink::start(&web.path(), 9999);
    let arrived = web_sink.forged_arrives(
        "container -> 127.0.0.1:9001 (published)",
        || {
            raw_udp(
                &probe.path(),
                "eth0",
                &gw_mac,
                &probe_ip,
                "127.0.0.1",
                9001,
                "forged",
            )
        },
        || {
            raw_udp(
                &probe.path(),
                "eth0",
                &gw_mac,
                &probe_ip,
                &gw,
                9002,
                "control",
            )
        },
    );
    assert!(
        !arrived,
        "a container reached a port published on 127.0.0.1"
    );

    // A neighbour routing 127.0.0.1 to the host, on a host where route_localnet is on for
    // every interface (as kube-proxy sets it): still nothing.
    lab.host
        .must(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"]);
    let host_mac = neighbour_mac(&client.path(), &host_ip, "ext0");
    let arrived = web_sink.forged_arrives(
        "neighbour -> 127.0.0.1:9001 (published)",
        || {
            raw_udp(
                &client.path(),
                "ext0",
                &host_mac,
                &client_ip,
                "127.0.0.1",
                9001,
                "forged",
            )
        },
        || {
            raw_udp(
                &client.path(),
                "ext0",
                &host_mac,
                &client_ip,
                &host_ip,
                9002,
                "control",
            )
        },
    );
    assert!(
        !arrived,
        "a neighbour reached a port published on 127.0.0.1"
    );
    let arrived = host_sink.forged_arrives(
        "neighbour -> 127.0.0.1:7777",
        || {
            raw_udp(
                &client.path(),
                "ext0",
                &host_mac,
                &client_ip,
                "127.0.0.1",
                7777,
                "forged",
            )
        },
        || {
            raw_udp(
                &client.path(),
                "ext0",
                &host_mac,
                &client_ip,
                &host_ip,
                7777,
                "control",
            )
        },
    );
    assert!(!arrived, "a neighbour reached a host service on 127.0.0.1");
}

/// iptables in the lab host namespace.
fn ipt(lab: &Lab, args: &[&str]) -> String {
    let mut v = vec!["iptables", "-w", "5"];
    v.extend_from_slice(args);
    lab.host.must(&v)
}

#[test]
fn docker_user_still_decides_over_ferrynet_traffic() {
    let lab = Lab::new();
    // Docker's FORWARD layout (as dockerd 20+ leaves it), in the lab host's own iptables, and
    // a "docker0" bridge with a "Docker container" behind it.
    for args in [
        &["-P", "FORWARD", "DROP"][..],
        &["-N", "DOCKER-USER"],
        &["-A", "DOCKER-USER", "-j", "RETURN"],
        &["-N", "DOCKER-ISOLATION-STAGE-1"],
        &["-A", "DOCKER-ISOLATION-STAGE-1", "-j", "RETURN"],
        &["-N", "DOCKER"],
        &["-A", "FORWARD", "-j", "DOCKER-USER"],
        &["-A", "FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"],
        &[
            "-A",
            "FORWARD",
            "-o",
            "docker0",
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ],
        &["-A", "FORWARD", "-o", "docker0", "-j", "DOCKER"],
        &[
            "-A", "FORWARD", "-i", "docker0", "!", "-o", "docker0", "-j", "ACCEPT",
        ],
    ] {
        ipt(&lab, args);
    }
    // An older ferrynet's accepts at the top of FORWARD, ahead of DOCKER-USER.
    ipt(&lab, &["-I", "FORWARD", "1", "-i", "fn-+", "-j", "ACCEPT"]);
    let dctr = Ns::new("d");
    lab.host
        .must(&["ip", "link", "add", "docker0", "type", "bridge"]);
    lab.host
        .must(&["ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    lab.host.must(&["ip", "link", "set", "docker0", "up"]);
    let veth = format!("fdv{}", lab.tag);
    lab.host.must(&[
        "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &dctr.name,
    ]);
    lab.host
        .must(&["ip", "link", "set", &veth, "master", "docker0", "up"]);
    dctr.must(&["ip", "addr", "add", "172.17.0.2/16", "dev", "eth0"]);
    dctr.must(&["ip", "link", "set", "eth0", "up"]);
    dctr.must(&["ip", "route", "add", "default", "via", "172.17.0.1"]);
    let _dsrv = tcp_server(&dctr, 80, "docker");

    let (client, _, _) = lab.outside(33);
    let _osrv = tcp_server(&client, 9000, "outside");
    let conf = lab.conf(&format!("du{}", lab.tag), "10.235.0.0/24", None);
    let c = Ns::new("c");
    let (c4, _) = addrs(&lab.add(&conf, "c", &c, "eth0"));

    // The chain's jump sits right after Docker's jumps; the old accept is gone.
    let fwd = ipt(&lab, &["-S", "FORWARD"]);
    let rules: Vec<&str> = fwd.lines().filter(|l| l.starts_with("-A")).collect();
    assert_eq!(rules[0], "-A FORWARD -j DOCKER-USER", "{fwd}");
    assert_eq!(rules[1], "-A FORWARD -j DOCKER-ISOLATION-STAGE-1", "{fwd}");
    assert_eq!(rules[2], "-A FORWARD -j FERRYNET-FORWARD", "{fwd}");
    assert!(!fwd.contains("-A FORWARD -i fn-+ -j ACCEPT"), "{fwd}");

    // The host has FORWARD policy DROP: ferrynet traffic still flows...
    assert!(
        tcp_get(&c, "10.250.33.2", 9000).is_some(),
        "container -> outside"
    );
    // ...but not into a Docker bridge, which Docker's own rules do not allow.
    assert!(
        tcp_get(&c, "172.17.0.2", 80).is_none(),
        "ferrynet -> docker0 must stay Docker's call"
    );

    // A DOCKER-USER drop drops ferrynet traffic, both ways.
    ipt(&lab, &["-I", "DOCKER-USER", "1", "-s", &c4, "-j", "DROP"]);
    ipt(&lab, &["-I", "DOCKER-USER", "1", "-d", &c4, "-j", "DROP"]);
    assert!(
        tcp_get(&c, "10.250.33.2", 9000).is_none(),
        "DOCKER-USER drop ignored (out)"
    );
    let _csrv = tcp_server(&c, 80, "c");
    assert!(
        tcp_get(&client, &c4, 80).is_none(),
        "DOCKER-USER drop ignored (in)"
    );
    ipt(&lab, &["-D", "DOCKER-USER", "-s", &c4, "-j", "DROP"]);
    ipt(&lab, &["-D", "DOCKER-USER", "-d", &c4, "-j", "DROP"]);
    assert!(
        tcp_get(&c, "10.250.33.2", 9000).is_some(),
        "back after the drop went"
    );

    // dockerd restarting puts its jumps back on top; the next ensure (a new bridge) moves
    // ferrynet's below them again.
    ipt(&lab, &["-D", "FORWARD", "-j", "FERRYNET-FORWARD"]);
    ipt(&lab, &["-I", "FORWARD", "1", "-j", "FERRYNET-FORWARD"]);
    let conf2 = lab.conf(&format!("dv{}", lab.tag), "10.236.0.0/24", None);
    let c2 = Ns::new("c");
    lab.add(&conf2, "c2", &c2, "eth0");
    let fwd = ipt(&lab, &["-S", "FORWARD"]);
    let jumps: Vec<usize> = fwd
        .lines()
        .filter(|l| l.starts_with("-A"))
        .enumerate()
        .filter(|(_, l)| l.ends_with("-j FERRYNET-FORWARD"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(jumps, vec![2], "{fwd}");

    // A firewall reload wiped the chain: `ferrynet reload` places it again.
    ipt(&lab, &["-D", "FORWARD", "-j", "FERRYNET-FORWARD"]);
    ipt(&lab, &["-F", "FERRYNET-FORWARD"]);
    ipt(&lab, &["-X", "FERRYNET-FORWARD"]);
    assert!(
        tcp_get(&c, "10.250.33.2", 9000).is_none(),
        "FORWARD DROP without the chain"
    );
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(ipt(&lab, &["-S", "FORWARD"]).contains("-A FORWARD -j FERRYNET-FORWARD"));
    assert!(tcp_get(&c, "10.250.33.2", 9000).is_some(), "after reload");

    // Uninstall: removing the last network removes the chain and its jump.
    for (conf, id, ns) in [(&conf, "c", &c), (&conf2, "c2", &c2)] {
        assert_eq!(lab.del(conf, id, Some(ns), "eth0").code, 0);
    }
    // Both networks exist only through their CNI configs: their last DEL retires them.
    let o = lab.cli(&["network", "ls"]);
    assert!(o.status.success(), "{}", out(&o));
    let ls = String::from_utf8_lossy(&o.stdout).to_string();
    for n in [format!("du{}", lab.tag), format!("dv{}", lab.tag)] {
        assert!(!ls.contains(&n), "{n} outlived its last DEL: {ls}");
    }
    let fwd = ipt(&lab, &["-S"]);
    assert!(!fwd.contains("FERRYNET"), "{fwd}");
    assert!(
        fwd.contains("-A FORWARD -j DOCKER-USER"),
        "Docker's rules stay: {fwd}"
    );
}

// ---------------------------------------------------------------------------------------------
// Multi-host: a 3-host lab on etcd per backend.

/// A dual-stack TCP echo server on port 7000 (as in multihost.rs).
const ECHO: &str = "import socket,threading\n\
    s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
    s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',7000));s.listen(64)\n\
    def serve(c):\n  while True:\n    d=c.recv(4096)\n    if not d: break\n    c.sendall(d)\n  c.close()\n\
    while True:\n  c,_=s.accept();threading.Thread(target=serve,args=(c,),daemon=True).start()\n";

/// One TCP echo round trip from namespace `netns` to `addr`:`port`.
fn echo_once(netns: &str, addr: &str, port: u16) -> Result<(), String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=2)\ns.sendall(b'ping')\nassert s.recv(4)==b'ping'\n"
    );
    let o = sh(&[
        "nsenter",
        &format!("--net=/run/netns/{netns}"),
        "python3",
        "-c",
        &code,
    ]);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{netns} -> {addr}:{port}: {}", out(&o)))
    }
}

fn echo_within(netns: &str, addr: &str, port: u16) {
    within(Duration::from_secs(30), || echo_once(netns, addr, port));
}

/// An outside namespace on the lab's underlay (172.31.0.201, fd31::c9).
fn underlay_neighbour(lab: &mut MultiLab) -> String {
    let ns = format!("{}-nb", lab.name);
    let ul = format!("{}-ul", lab.name);
    lab.add_netns(&ns);
    let ip = |args: &[&str]| {
        let o = sh(&[&["ip"][..], args].concat());
        assert!(o.status.success(), "ip {args:?}: {}", out(&o));
    };
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ul, "link", "add", "nb", "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&["-n", &ul, "link", "set", "nb", "master", "ul0", "up"]);
    ip(&["-n", &ns, "addr", "add", "172.31.0.201/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "fd31::c9/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    ns
}

fn cross_host_isolation(name: &str, backend: &str) {
    let mut lab = MultiLab::up(name, &["--hosts", "3", "--backend", backend]);
    // Network A is the lab's "fabric" (10.20.0.0/16, fd20::/64); B another multi-host one.
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
    let a1 = lab.run("h1", "a1", &[], &["python3", "-c", ECHO]);
    let a2 = lab.run("h2", "a2", &[], &["python3", "-c", ECHO]);
    let b1 = lab.run_on("h1", "b1", "netb", &[], &["python3", "-c", ECHO]);
    let b2 = lab.run_on(
        "h2",
        "b2",
        "netb",
        &["-p", "8080:7000"],
        &["python3", "-c", ECHO],
    );
    assert!(
        !a1.v6.is_empty() && !b2.v6.is_empty(),
        "dual-stack containers"
    );

    // The fabric is up for both networks (controls: same network across hosts works).
    for (from, to) in [(&a1, &a2), (&a2, &a1), (&b1, &b2), (&b2, &b1)] {
        echo_within(&from.netns(), &to.v4, 7000);
        echo_within(&from.netns(), &to.v6, 7000);
    }
    // Across networks and hosts: refused, both directions, both families.
    let refused = |from: &Container, to: &Container| {
        for addr in [&to.v4, &to.v6] {
            assert!(
                echo_once(&from.netns(), addr, 7000).is_err(),
                "{backend}: {} -> {} ({addr}) must be refused",
                from.name,
                to.name
            );
        }
    };
    refused(&a1, &b2);
    refused(&b2, &a1);
    refused(&a2, &b1);
    // A network created on another host joins every agent's isolation sets, bridge or not
    // (a single-host network here: h3 never makes its bridge), and leaves them when removed.
    let h3_set = |set: &str| {
        let o = sh(&[
            "nsenter",
            &format!("--net=/run/netns/{}", lab.host_ns("h3")),
            "nft",
            "list",
            "set",
            "inet",
            "ferrynet",
            set,
        ]);
        out(&o)
    };
    lab.ok(
        "h1",
        &["network", "create", "netc", "--subnet", "10.22.0.0/24"],
    );
    within(Duration::from_secs(30), || {
        let s = h3_set("same4");
        s.contains("10.22.0.0/24 . 10.22.0.0/24")
            .then_some(())
            .ok_or(format!("h3 same4: {s}"))
    });
    lab.ok("h1", &["network", "rm", "netc"]);
    within(Duration::from_secs(30), || {
        let s = h3_set("nets4");
        (!s.contains("10.22.0.0/24") && s.contains("10.21.0.0/16"))
            .then_some(())
            .ok_or(format!("h3 nets4: {s}"))
    });

    // B's published port on h2: from an outside namespace and from A's container, replies
    // flowing back.
    let nb = underlay_neighbour(&mut lab);
    echo_within(&nb, "172.31.0.2", 8080);
    echo_within(&nb, "fd31::2", 8080);
    echo_within(&a1.netns(), "172.31.0.2", 8080);
    echo_within(&a1.netns(), "fd31::2", 8080);

    // The receiving host drops too: a neighbour on the underlay forging a source in A's pool
    // (outside any block, so no host claims it) towards B's container on h2.
    let sink = Sink::start(&format!("/run/netns/{}", b2.netns()), 9999);
    let nbp = format!("/run/netns/{nb}");
    let on_nb = |args: &[&str]| {
        let mut v = vec!["ip", "-n", nb.as_str()];
        v.extend_from_slice(args);
        must(&v);
    };
    on_nb(&["addr", "add", "10.20.255.250/32", "dev", "eth0"]);
    on_nb(&["addr", "add", "fd20::ffff:fa/128", "dev", "eth0", "nodad"]);
    on_nb(&["route", "add", "10.21.0.0/16", "via", "172.31.0.2"]);
    on_nb(&["-6", "route", "add", "fd21::/64", "via", "fd31::2"]);
    for (forged, dst, control) in [
        ("10.20.255.250", &b2.v4, "172.31.0.201"),
        ("fd20::ffff:fa", &b2.v6, "fd31::c9"),
    ] {
        let arrived = sink.forged_arrives(
            &format!("{backend}: forged {forged} -> {dst}"),
            || udp_send(&nbp, Some(forged), dst, 9999, "forged"),
            || udp_send(&nbp, Some(control), dst, 9999, "control"),
        );
        assert!(
            !arrived,
            "{backend}: h2 let {forged} (network A) reach B's container"
        );
    }
}

#[test]
fn cross_host_isolation_route() {
    cross_host_isolation("isoroute", "route");
}

#[test]
fn cross_host_isolation_vxlan() {
    cross_host_isolation("isovx", "vxlan");
}

#[test]
fn cross_host_isolation_auto() {
    cross_host_isolation("isoauto", "auto");
}
