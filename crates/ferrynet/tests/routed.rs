//! Routed endpoints (`--mode routed`) on a real kernel: no bridge, a /32 and /128 per
//! container on its host-side `fnv*` port, the link-local gateways 169.254.1.1 and fe80::1.
//! Single host through the CNI plugin (TCP both families, a published port from outside, another
//! network refused, forged sources and ARP dropped at the routed guard; an `--internal` routed
//! network that neither gets out nor lets the outside in, forged sources included), and 3-host
//! labs on etcd
//! for the route and vxlan backends (all pairs over IPv4 and IPv6, names through the agents'
//! DNS). Everything is removed on drop, also when a test fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::lab::{echo, Container, Lab as MultiLab};
use common::{out, tcp_get, tcp_server, Lab, Ns};
use serde_json::{json, Value};

/// A routed CNI config with one IPv4 and one IPv6 subnet.
fn routed_conf(lab: &Lab, name: &str, v4: &str, v6: &str) -> Value {
    let mut c = lab.conf(name, v4, Some(v6));
    c["mode"] = json!("routed");
    c
}

/// The address of `family` (v6 or not) in an ADD result, without its prefix.
fn addr_of(res: &Value, v6: bool) -> String {
    res["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':') == v6)
        .map(|a| a.split('/').next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no address in {res}"))
}

/// Run python `code` in `ns`; whether it exited 0, and its output.
fn py(ns: &Ns, code: &str) -> (bool, String) {
    let o = ns.run(&["python3", "-c", code]);
    (o.status.success(), out(&o))
}

#[test]
fn single_host_routed_containers_talk_publish_and_stay_isolated() {
    let lab = Lab::new();
    let name = format!("rt{}", lab.tag);
    let mut conf = routed_conf(&lab, &name, "10.71.0.0/24", "fd71::/64");
    let (a, b) = (Ns::new("ra"), Ns::new("rb"));
    let ra = lab.add(&conf, "ctr-a", &a, "eth0");
    let conf_a = conf.clone();
    conf["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]});
    let rb = lab.add(&conf, "ctr-b", &b, "eth0");

    // The result: host prefixes, the link-local gateways; no bridge on the host.
    let ips = ra["ips"].as_array().expect("ips");
    assert!(ips.iter().all(|i| {
        let a = i["address"].as_str().unwrap_or("");
        a.ends_with("/32") || a.ends_with("/128")
    }));
    let gws: Vec<&str> = ips.iter().filter_map(|i| i["gateway"].as_str()).collect();
    assert_eq!(gws, vec!["169.254.1.1", "fe80::1"], "{ra}");
    let bridges = lab
        .host
        .must(&["ip", "-j", "link", "show", "type", "bridge"]);
    assert_eq!(bridges.trim(), "[]", "a routed network made a bridge");
    let routes = lab.host.must(&["ip", "route", "show", "proto", "113"]);
    assert!(
        routes.contains(&format!("{} dev fnv", addr_of(&ra, false))),
        "{routes}"
    );
    assert!(routes.contains("unreachable 10.71.0.0/24"), "{routes}");

    // CHECK passes, and a repeated ADD gives the same addresses.
    let path = a.path();
    let env = [
        ("CNI_CONTAINERID", "ctr-a"),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let check = lab.cni("CHECK", &conf_a, &env);
    assert_eq!(check.code, 0, "CHECK: {} {}", check.json, check.stderr);
    assert_eq!(lab.add(&conf_a, "ctr-a", &a, "eth0")["ips"], ra["ips"]);

    // TCP both families, the server seeing the client's own address.
    let _srv = tcp_server(&b, 8080, "hello-b");
    for v6 in [false, true] {
        let got = tcp_get(&a, &addr_of(&rb, v6), 8080).expect("a -> b");
        assert_eq!(got, format!("hello-b {}", addr_of(&ra, v6)));
    }
    // A published port from an outside namespace.
    let (client, host_ip, client_ip) = lab.outside(71);
    let got = tcp_get(&client, &host_ip, 18080).expect("published port from outside");
    assert_eq!(got, format!("hello-b {client_ip}"));
    // Hairpin: a reaching b through the host's published port.
    assert!(tcp_get(&a, &host_ip, 18080).is_some(), "hairpin to b");
    // An unused address of the subnet is refused at once (unreachable), not routed on.
    let (ok, o) = py(
        &a,
        "import socket\ntry:\n  socket.create_connection(('10.71.0.200',8080),timeout=3)\nexcept OSError as e:\n  print(e.errno);raise SystemExit(0 if e.errno in (113,101) else 1)\nraise SystemExit(1)\n",
    );
    assert!(ok, "unused address not refused: {o}");

    // Another network, routed or bridged, is refused both ways.
    let other = routed_conf(&lab, &format!("ro{}", lab.tag), "10.72.0.0/24", "fd72::/64");
    let x = Ns::new("rx");
    let rx = lab.add(&other, "ctr-x", &x, "eth0");
    let bridged = lab.conf(
        &format!("rbr{}", lab.tag),
        "10.73.0.0/24",
        Some("fd73::/64"),
    );
    let y = Ns::new("ry");
    let ry = lab.add(&bridged, "ctr-y", &y, "eth0");
    for v6 in [false, true] {
        assert_eq!(
            tcp_get(&x, &addr_of(&rb, v6), 8080),
            None,
            "other routed network"
        );
        assert_eq!(
            tcp_get(&y, &addr_of(&rb, v6), 8080),
            None,
            "bridged network"
        );
    }
    let _srv_x = tcp_server(&x, 8081, "hello-x");
    assert_eq!(tcp_get(&a, &addr_of(&rx, false), 8081), None);
    // The bridged container still reaches b's published port (DNATed, as on bridges).
    assert!(tcp_get(&y, &host_ip, 18080).is_some(), "{ry}");

    // DEL leaves nothing of the container on the host.
    for (id, ns, c) in [("ctr-a", &a, &conf), ("ctr-b", &b, &conf)] {
        let d = lab.del(c, id, Some(ns), "eth0");
        assert_eq!(d.code, 0, "{}", d.stderr);
    }
    // The last DEL of a config's network retires it: its gateways and unreachable routes go.
    let routes = lab.host.must(&["ip", "route", "show", "proto", "113"]);
    assert!(!routes.contains("10.71.0."), "{routes}");
    let lo = lab.host.must(&["ip", "addr", "show", "lo"]);
    assert!(
        !lo.contains("10.71.0.1/32") && !lo.contains("fd71::1/128"),
        "{lo}"
    );
    // The other routed network's are still there until `network rm`.
    assert!(lo.contains("10.72.0.1/32"), "{lo}");
    let d = lab.del(&other, "ctr-x", Some(&x), "eth0");
    assert_eq!(d.code, 0, "{}", d.stderr);
    let o = lab.cli(&["network", "rm", "--force", &format!("ro{}", lab.tag)]);
    assert!(
        o.status.success() || out(&o).contains("does not exist"),
        "{}",
        out(&o)
    );
    let lo = lab.host.must(&["ip", "addr", "show", "lo"]);
    assert!(!lo.contains("10.72.0.1/32"), "{lo}");
    let routes = lab
        .host
        .must(&["ip", "-6", "route", "show", "proto", "113"]);
    assert!(!routes.contains("fd72::"), "{routes}");
}

#[test]
fn a_routed_container_sends_only_as_itself() {
    let lab = Lab::new();
    let conf = routed_conf(&lab, &format!("rs{}", lab.tag), "10.74.0.0/24", "fd74::/64");
    let (a, b, c) = (Ns::new("sa"), Ns::new("sb"), Ns::new("sc"));
    let ra = lab.add(&conf, "ctr-a", &a, "eth0");
    let rb = lab.add(&conf, "ctr-b", &b, "eth0");
    let rc = lab.add(&conf, "ctr-c", &c, "eth0");
    let (a4, b4, c4) = (
        addr_of(&ra, false),
        addr_of(&rb, false),
        addr_of(&rc, false),
    );
    let (b6, c6) = (addr_of(&rb, true), addr_of(&rc, true));
    let _srv = tcp_server(&c, 9090, "hello-c");
    // Honest first: the guard lets the container's own traffic through.
    assert!(tcp_get(&a, &c4, 9090).is_some());
    let before = lab.guard_counters();

    // a takes b's addresses (and an unallocated one) and connects from them: nothing arrives.
    a.must(&["ip", "addr", "add", &format!("{b4}/32"), "dev", "eth0"]);
    a.must(&["ip", "addr", "add", "10.74.0.250/32", "dev", "eth0"]);
    a.must(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{b6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    for (src, dst) in [(&b4, &c4), (&"10.74.0.250".to_string(), &c4), (&b6, &c6)] {
        let code = format!(
            "import socket\ns=socket.socket(socket.AF_INET6 if ':' in '{dst}' else socket.AF_INET)\ns.settimeout(2)\ns.bind(('{src}',0))\ntry:\n  s.connect(('{dst}',9090));raise SystemExit(1)\nexcept OSError:\n  pass\n"
        );
        let (ok, o) = py(&a, &code);
        assert!(ok, "a forged {src} -> {dst} and connected: {o}");
    }
    // A forged MAC with a's own address is dropped too.
    // (nsenter --net keeps the host's /sys: read the MAC over netlink.)
    let link: Value =
        serde_json::from_str(&a.must(&["ip", "-j", "link", "show", "eth0"])).expect("ip -j link");
    let mac = link[0]["address"].as_str().expect("mac").to_string();
    a.must(&["ip", "link", "set", "eth0", "address", "02:00:00:00:66:66"]);
    assert_eq!(tcp_get(&a, &c4, 9090), None, "forged MAC passed");
    a.must(&["ip", "link", "set", "eth0", "address", mac.trim()]);

    // Forged ARP: replies claiming b's address (from a's own MAC), and from a forged MAC.
    let arp = format!(
        "import socket,struct\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('eth0',0))\n\
         own=':'.join('%02x'%b for b in s.getsockname()[4])\n\
         def mac(m): return bytes(int(x,16) for x in m.split(':'))\n\
         def ip(a): return socket.inet_aton(a)\n\
         for src,sender in ((own,'{b4}'),('02:00:00:00:77:77','{a4}')):\n\
         \x20 for op in (1,2):\n\
         \x20   p=struct.pack('!HHBBH',1,0x0800,6,4,op)+mac(src)+ip(sender)+b'\\xff'*6+ip(sender)\n\
         \x20   s.send(b'\\xff'*6+mac(src)+b'\\x08\\x06'+p)\n"
    );
    let (ok, o) = py(&a, &arp);
    assert!(ok, "sending ARP: {o}");
    let after = lab.guard_counters();
    let grew = |k: &str| after.get(k).copied().unwrap_or(0) > before.get(k).copied().unwrap_or(0);
    assert!(grew("ip4_spoof"), "{before:?} -> {after:?}");
    assert!(grew("ip6_spoof"), "{before:?} -> {after:?}");
    assert!(grew("arp_spoof"), "{before:?} -> {after:?}");
    assert!(grew("mac_spoof"), "{before:?} -> {after:?}");
    // The host never learnt b's address at a's port.
    let neigh = lab.host.must(&["ip", "neigh", "show", &b4]);
    assert!(!neigh.contains(mac.trim()), "{neigh}");
    assert!(!neigh.contains("02:00:00:00:77:77"), "{neigh}");
    // And the honest container still talks, from its own address.
    assert_eq!(tcp_get(&a, &c4, 9090).map(|s| s.ends_with(&a4)), Some(true));
}

fn multi_host_all_pairs(name: &str, backend: &str) {
    let mut lab = MultiLab::up(
        name,
        &["--hosts", "3", "--backend", backend, "--mode", "routed"],
    );
    let cs: Vec<Container> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{}", i + 1)))
        .collect();
    let mut failures = Vec::new();
    for a in &cs {
        for b in &cs {
            if a.name != b.name {
                for addr in [&b.v4, &b.v6] {
                    failures.extend(echo(a, addr, Duration::from_secs(5)).err());
                }
            }
        }
    }
    assert!(failures.is_empty(), "unreachable:\n{}", failures.join("\n"));
    // No bridge on any host; each container's /32 on its own host's port.
    for h in ["h1", "h2", "h3"] {
        let o = Command::new("ip")
            .args([
                "-n",
                &lab.host_ns(h),
                "-j",
                "link",
                "show",
                "type",
                "bridge",
            ])
            .output()
            .expect("ip");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]", "{h}");
    }
    // Names through the agent's DNS on the network's gateway, across hosts.
    let (c1, c3) = (&cs[0], &cs[2]);
    let mut answer = String::new();
    for _ in 0..25 {
        let o = Command::new("ip")
            .args(["netns", "exec", &c1.netns(), "getent", "ahostsv4", &c3.name])
            .output()
            .expect("getent");
        answer = out(&o);
        if answer.contains(&c3.v4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answer.contains(&c3.v4), "{} by name: {answer}", c3.name);
    let st = lab.status("h1");
    assert_eq!(st["errors"].as_array().map(Vec::len), Some(0), "{st}");
}

#[test]
fn routed_route_backend_all_pairs() {
    multi_host_all_pairs("rtroute", "route");
}

#[test]
fn routed_vxlan_backend_all_pairs() {
    multi_host_all_pairs("rtvxlan", "vxlan");
}

/// Ping `addr` once from network namespace `ns`.
fn ping_from(ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c1", "-W2", addr])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn docker_endpoints_on_a_routed_network() {
    use common::docker_rig::DockerRig;
    let mut rig = DockerRig::with_network(&[
        "-o",
        "ferrynet.mode=routed",
        "--ipv6",
        "--subnet",
        "fd34::/64",
    ]);
    let a = rig.run("ra");
    let _b = rig.run("rb");
    let (a4, b4) = (rig.ip_of("ra"), rig.ip_of("rb"));
    let routes = common::must(&["ip", "-n", &a, "route"]);
    assert!(routes.contains("default via 169.254.1.1"), "{routes}");
    let bridges = rig
        .host
        .must(&["ip", "-j", "link", "show", "type", "bridge"]);
    assert_eq!(
        bridges.trim(),
        "[]",
        "a routed Docker network made a bridge"
    );
    // Host prefixes from ferrynet's IPAM (as Calico's): everything through the gateways.
    let addrs = common::must(&["ip", "-n", &a, "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("{}/32", a4.trim())), "{addrs}");
    let b6 = rig.docker.docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
        "rb",
    ]);
    assert!(addrs.contains("/128"), "{addrs}");
    assert!(ping_from(&a, b4.trim()), "ra -> rb");
    assert!(ping_from(&a, b6.trim()), "ra -> rb over IPv6");
    assert!(ping_from(&rig.host.name, a4.trim()), "host -> ra");
    // A forged source is dropped and counted; the honest one still passes.
    common::must(&[
        "ip",
        "-n",
        &a,
        "addr",
        "add",
        "10.234.0.99/32",
        "dev",
        "eth0",
    ]);
    let forged = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            "ping",
            "-c1",
            "-W2",
            "-I",
            "10.234.0.99",
            b4.trim(),
        ])
        .output()
        .expect("ping");
    assert!(!forged.status.success(), "a forged source got an answer");
    let o = rig.cli(&["guard", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("guard json");
    let spoofed = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["reason"] == "ip4_spoof")
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0);
    assert!(spoofed > 0, "{v}");
    assert!(ping_from(&a, b4.trim()), "ra -> rb after the forgery");
    // `docker rm` takes ra's elements out of the routed tables.
    let a_link: Value = serde_json::from_str(&common::must(&[
        "ip", "-n", &a, "-j", "link", "show", "eth0",
    ]))
    .expect("ip -j link");
    let a_mac = a_link[0]["address"].as_str().expect("mac").to_string();
    rig.docker.docker_ok(&["rm", "-f", "ra"]);
    let macs = rig
        .host
        .must(&["nft", "list", "set", "inet", "ferrynet-routed", "macs"]);
    assert!(!macs.contains(&a_mac), "{macs}");
}

/// The proxy NDP entries on the host, as (address, port).
fn proxies(rig: &common::docker_rig::DockerRig) -> Vec<(String, String)> {
    let v: Value =
        serde_json::from_str(&rig.host.must(&["ip", "-6", "-j", "neigh", "show", "proxy"]))
            .expect("ip -j neigh");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["dst"].as_str().unwrap_or("").to_string(),
                n["dev"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Docker with its own IPAM on a routed network gives the containers the pool's prefix
/// (`fd35::/64`): they solicit their neighbours, and each port answers (proxy NDP) for the
/// other containers' addresses only: never its own container's (its DAD would fail), nor an
/// address nobody holds. Removing a container takes its address out of the others' ports.
#[test]
fn proxy_ndp_for_addresses_from_another_ipam() {
    use common::docker_rig::DockerRig;
    let mut rig = DockerRig::with_network_ipam(
        &[
            "-o",
            "ferrynet.mode=routed",
            "--ipv6",
            "--subnet",
            "fd35::/64",
        ],
        false,
    );
    let a = rig.run("pa");
    let _b = rig.run("pb");
    let v6 = |name: &str| {
        rig.docker.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
            name,
        ])
    };
    let (a6, b6) = (v6("pa"), v6("pb"));
    let addrs = common::must(&["ip", "-n", &a, "-6", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("{a6}/64")), "{addrs}");
    assert!(
        ping_from(&a, &b6),
        "pa -> pb over IPv6 through the proxied neighbour"
    );
    assert!(
        ping_from(&a, rig.ip_of("pb").trim()),
        "pa -> pb over IPv4 (proxy ARP)"
    );
    let p = proxies(&rig);
    let port_of = |addr: &str| -> Vec<String> {
        p.iter()
            .filter(|(d, _)| d == addr)
            .map(|(_, dev)| dev.clone())
            .collect()
    };
    let (on_a, on_b) = (port_of(&b6), port_of(&a6));
    assert_eq!((on_a.len(), on_b.len()), (1, 1), "{p:?}");
    assert_ne!(
        on_a, on_b,
        "a port proxies its own container's address: {p:?}"
    );
    // Hostile: an address of the prefix nobody holds is not answered for.
    assert!(!ping_from(&a, "fd35::99"), "fd35::99 answered");
    assert!(
        !p.iter().any(|(d, _)| d == "fd35::99"),
        "an unheld address is proxied: {p:?}"
    );
    let neigh = common::must(&["ip", "-n", &a, "-6", "neigh", "show", "fd35::99"]);
    assert!(!neigh.contains("lladdr"), "{neigh}");
    // pb goes: its address leaves pa's port.
    rig.docker.docker_ok(&["rm", "-f", "pb"]);
    let p = proxies(&rig);
    assert!(!p.iter().any(|(d, _)| *d == b6), "{p:?}");
}

#[test]
fn reload_removes_the_gateways_of_routed_networks_gone_meanwhile() {
    let lab = Lab::new();
    let conf = routed_conf(&lab, &format!("rg{}", lab.tag), "10.75.0.0/24", "fd75::/64");
    let a = Ns::new("ga");
    lab.add(&conf, "ctr-a", &a, "eth0");
    // What a routed network removed while this host's agent was away leaves behind.
    lab.host
        .must(&["ip", "addr", "add", "10.76.0.1/32", "dev", "lo"]);
    lab.host.must(&[
        "ip",
        "route",
        "add",
        "unreachable",
        "10.76.0.0/24",
        "proto",
        "113",
    ]);
    // Someone else's loopback address and unreachable route (another protocol) stay.
    lab.host
        .must(&["ip", "addr", "add", "192.0.2.9/32", "dev", "lo"]);
    lab.host
        .must(&["ip", "route", "add", "unreachable", "198.51.100.0/24"]);
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "reload: {}", out(&o));
    let lo = lab.host.must(&["ip", "addr", "show", "lo"]);
    assert!(!lo.contains("10.76.0.1/32"), "{lo}");
    assert!(
        lo.contains("10.75.0.1/32") && lo.contains("192.0.2.9/32"),
        "{lo}"
    );
    let routes = lab.host.must(&["ip", "route"]);
    assert!(!routes.contains("10.76.0.0/24"), "{routes}");
    assert!(
        routes.contains("unreachable 10.75.0.0/24")
            && routes.contains("unreachable 198.51.100.0/24"),
        "{routes}"
    );
    // The live network still works for its container.
    assert!(
        a.run(&["ping", "-c1", "-W2", "10.75.0.1"]).status.success(),
        "the container reaches its gateway"
    );
}

#[test]
fn an_internal_routed_network_keeps_to_itself() {
    let lab = Lab::new();
    let mut conf = routed_conf(&lab, &format!("ri{}", lab.tag), "10.75.0.0/24", "fd75::/64");
    conf["internal"] = json!(true);
    let (a, b) = (Ns::new("ia"), Ns::new("ib"));
    let ra = lab.add(&conf, "ctr-a", &a, "eth0");
    let rb = lab.add(&conf, "ctr-b", &b, "eth0");
    let (a4, b4) = (addr_of(&ra, false), addr_of(&rb, false));
    // Inside the network: both families, each side seeing the other's own address.
    let _srv = tcp_server(&b, 8080, "hello-b");
    for v6 in [false, true] {
        let got = tcp_get(&a, &addr_of(&rb, v6), 8080).expect("a -> b inside the network");
        assert_eq!(got, format!("hello-b {}", addr_of(&ra, v6)));
    }
    // An outside namespace routed through the host, with a server of its own.
    let (client, host_ip, client_ip) = lab.outside(75);
    let _out = tcp_server(&client, 7100, "outside");
    // The host itself reaches the outside (the path exists), a container does not: its own
    // default route to the link-local gateway leads nowhere beyond the network.
    assert!(
        tcp_get(&lab.host, &client_ip, 7100).is_some(),
        "host -> outside"
    );
    let routes = a.must(&["ip", "route"]);
    assert!(routes.contains("default via 169.254.1.1"), "{routes}");
    assert_eq!(
        tcp_get(&a, &client_ip, 7100),
        None,
        "an internal container got out"
    );
    // Nor does the outside get in (it routes the subnet through the host).
    client.must(&["ip", "route", "add", "10.75.0.0/24", "via", &host_ip]);
    assert_eq!(tcp_get(&client, &b4, 8080), None, "the outside got in");
    // A container of an ordinary routed network on the same host: refused both ways.
    let other = routed_conf(&lab, &format!("ro{}", lab.tag), "10.76.0.0/24", "fd76::/64");
    let x = Ns::new("ix");
    let rx = lab.add(&other, "ctr-x", &x, "eth0");
    let _srv_x = tcp_server(&x, 8081, "hello-x");
    assert_eq!(tcp_get(&a, &addr_of(&rx, false), 8081), None);
    assert_eq!(tcp_get(&x, &b4, 8080), None);
    assert!(tcp_get(&x, &client_ip, 7100).is_some(), "x -> outside");

    // Hostile: the outside forges a source inside the network. b logs every datagram's
    // sender; the forged one is sent first, then a marker from a: when the marker is in, the
    // forged datagram would have been too.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("senders");
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',9999))\n\
         print('ready',flush=True)\n\
         while True:\n  d,p=s.recvfrom(100)\n  open('{}','a').write(p[0]+'\\n')\n",
        log.display()
    );
    let mut child = Command::new("nsenter")
        .args([b.enter().as_str(), "python3", "-u", "-c", &code])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("udp logger");
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut ready)
        .expect("udp logger did not start");
    let _logger = common::Proc(child);
    client.must(&["ip", "addr", "add", "10.75.0.99/32", "dev", "ext0"]);
    let send = |ns: &Ns, src: &str| {
        let (ok, o) = py(
            ns,
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{src}',0))\ns.sendto(b'x',('{b4}',9999))\n"
            ),
        );
        assert!(ok, "sending from {src}: {o}");
    };
    send(&client, "10.75.0.99");
    send(&a, &a4);
    let seen = common::within(Duration::from_secs(10), || {
        let s = std::fs::read_to_string(&log).unwrap_or_default();
        s.contains(&a4)
            .then_some(s.clone())
            .ok_or_else(|| format!("no marker yet: {s:?}"))
    });
    assert!(
        !seen.contains("10.75.0.99"),
        "a forged source from outside reached the network: {seen}"
    );
    for (id, ns, c) in [
        ("ctr-a", &a, &conf),
        ("ctr-b", &b, &conf),
        ("ctr-x", &x, &other),
    ] {
        let d = lab.del(c, id, Some(ns), "eth0");
        assert_eq!(d.code, 0, "{}", d.stderr);
    }
}
