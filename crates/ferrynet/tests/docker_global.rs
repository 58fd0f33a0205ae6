//! ferrynet as a global-scope Docker driver: one Docker network spanning two hosts.
//!
//! A two-host `ferrynet lab` on etcd; each host runs its agent (serving the Docker driver) and
//! a private dockerd of its own inside the host's namespace, with the lab's etcd as Docker's
//! cluster store (`--cluster-store`, Docker 20.10). The machine's shared engine is never
//! touched. Everything is removed on drop, also when the test fails.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::dockerd::{import_busybox, import_busybox_page, Dockerd, DockerdOpts};
use common::lab::Lab;
use common::{out, tag};
use serde_json::Value;

const ETCD: &str = "etcd://172.31.0.253:2379";

fn require_tools() {
    for (bin, pkg) in [("dockerd", "docker.io"), ("/bin/busybox", "busybox-static")] {
        let found = if bin.starts_with('/') {
            std::path::Path::new(bin).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        assert!(found, "this test needs {bin}: apt-get install {pkg}");
    }
}

fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() >= within && std::env::var_os("FNT_HOLD").is_some() {
            // Debugging aid: keep everything up for a look before cleaning up.
            eprintln!("timed out waiting for {what}; holding for 300 s (FNT_HOLD)");
            std::thread::sleep(Duration::from_secs(300));
        }
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A lab host's IPv4 underlay address.
fn underlay_v4(ns: &str) -> String {
    let o = Command::new("ip")
        .args(["-n", ns, "-j", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    let v: Value = serde_json::from_slice(&o.stdout).expect("ip -j");
    v[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap_or_else(|| panic!("no IPv4 address on {ns}'s eth0: {}", out(&o)))
        .to_string()
}

/// A private dockerd on lab host `host`, on the lab's etcd, seeing the agent's plugin socket.
fn host_engine(lab: &Lab, host: &str, t: &str) -> Dockerd {
    engine_on(lab, host, t, true)
}

/// A private dockerd on lab host `host`, with the lab's etcd as cluster store or without one.
fn engine_on(lab: &Lab, host: &str, t: &str, cluster: bool) -> Dockerd {
    let dir = PathBuf::from(format!("/run/ferrynet-lab/{}/{host}", lab.name));
    let ns = lab.host_ns(host);
    let advertise = format!("{}:2376", underlay_v4(&ns));
    Dockerd::start_opts(
        &format!("{t}{host}"),
        DockerdOpts {
            netns: Some(ns),
            sock: Some(dir.join("docker.sock")),
            plugins_dir: Some(dir.join("plugins")),
            hostname: Some(format!("{}-{host}", lab.name)),
            extra: if cluster {
                vec![
                    "--cluster-store".into(),
                    ETCD.into(),
                    "--cluster-advertise".into(),
                    advertise,
                ]
            } else {
                Vec::new()
            },
        },
    )
}

/// The IPv4 address of `container` on `net`.
fn ip_on(d: &Dockerd, container: &str, net: &str) -> String {
    d.docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        container,
    ])
}

/// The IPv6 address of `container` on `net`.
fn ip6_on(d: &Dockerd, container: &str, net: &str) -> String {
    d.docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}"),
        container,
    ])
}

/// `docker network create -d DRIVER --ipam-driver DRIVER ARGS NET` on `d`.
fn create_network(d: &Dockerd, driver: &str, net: &str, args: &[&str]) {
    let mut a = vec!["network", "create", "-d", driver, "--ipam-driver", driver];
    a.extend_from_slice(args);
    a.push(net);
    d.docker_ok(&a);
}

/// A web server (busybox httpd on :80 serving /www) on `net`.
fn web(d: &Dockerd, name: &str, net: &str, image: &str, extra: &[&str]) {
    let mut a = vec!["run", "-d", "--name", name, "--network", net];
    a.extend_from_slice(extra);
    a.extend_from_slice(&[image, "httpd", "-f", "-p", "80", "-h", "/www"]);
    d.docker_ok(&a);
}

/// An HTTP GET of `/` at `ip`:`port` from inside container `from` (busybox nc; its wget
/// crashes): the answer, or None.
fn fetch(d: &Dockerd, from: &str, ip: &str, port: u16) -> Option<String> {
    let o = d.docker(&["exec", from, "sh", "-c", &http_get(ip, port)]);
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    (o.status.success() && s.contains("200 OK")).then_some(s)
}

fn http_get(ip: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}")
}

/// The interfaces of a namespace whose names start with `prefix`.
fn links(ns: &str, prefix: &str) -> Vec<String> {
    common::links_in(Some(ns), &[prefix])
}

/// Docker containers (engine API address, name) removed before the engines and the lab go.
struct Containers(Vec<(String, String)>);

impl Containers {
    fn add(&mut self, d: &Dockerd, name: &str) {
        self.0.push((d.host(), name.to_string()));
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for (host, c) in &self.0 {
            let _ = Command::new("docker")
                .args(["-H", host, "rm", "-f", c])
                .output();
        }
    }
}

#[test]
fn one_docker_network_spans_two_hosts() {
    require_tools();
    let t = tag();
    let lab_name: String = format!("g{t}").chars().take(8).collect();
    let driver = format!("fng{t}");
    let lab = Lab::up(&lab_name, &["--hosts", "2", "--docker-driver", &driver]);
    let d1 = host_engine(&lab, "h1", &t);
    let mut d2 = host_engine(&lab, "h2", &t);
    let image = format!("fng-busybox:{t}");
    import_busybox(&d1.host(), &image);
    import_busybox(&d2.host(), &image);
    let mut made = Containers(Vec::new());

    // The driver answers global scope: both engines share the cluster store and ferrynet etcd.
    let net = format!("gnet{t}");
    create_network(
        &d1,
        &driver,
        &net,
        &[
            "--subnet",
            "10.73.0.0/16",
            "--ipv6",
            "--subnet",
            "fd73::/64",
        ],
    );
    let scope = d1.docker_ok(&["network", "inspect", "-f", "{{.Scope}}", &net]);
    assert_eq!(scope, "global", "the network's scope");
    eventually(
        "h2's engine to list the network",
        Duration::from_secs(20),
        || {
            d2.docker(&["network", "inspect", &net])
                .status
                .success()
                .then_some(())
        },
    );
    // ferrynet made one multi-host network, seen from both hosts.
    let nets: Value = serde_json::from_str(&lab.ok("h2", &["network", "ls", "--json"])).unwrap();
    let fnet = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["subnets"].to_string().contains("10.73.0.0/16"))
        .unwrap_or_else(|| panic!("no ferrynet network for 10.73.0.0/16: {nets}"));
    assert!(fnet["fabric"].is_object(), "a multi-host network: {fnet}");
    let fname = fnet["name"].as_str().unwrap().to_string();

    // A container on each host; each gets an address from its own host's block.
    made.add(&d1, "a1");
    web(&d1, "a1", &net, &image, &[]);
    made.add(&d2, "b1");
    web(
        &d2,
        "b1",
        &net,
        &image,
        &["-p", "8080:80", "--restart", "always"],
    );
    let a1 = ip_on(&d1, "a1", &net);
    let b1 = ip_on(&d2, "b1", &net);
    let a1n: std::net::Ipv4Addr = a1.parse().expect("a1's address");
    let b1n: std::net::Ipv4Addr = b1.parse().expect("b1's address");
    assert!(
        a1.starts_with("10.73.") && b1.starts_with("10.73."),
        "{a1} {b1}"
    );
    // Default blocks are /26: different hosts, different blocks.
    assert_ne!(
        u32::from(a1n) >> 6,
        u32::from(b1n) >> 6,
        "a1 ({a1}) and b1 ({b1}) should be in different hosts' blocks"
    );

    // They reach each other across the hosts, both ways.
    let page = eventually("a1 to answer b1", Duration::from_secs(30), || {
        fetch(&d2, "b1", &a1, 80)
    });
    assert!(page.contains("hello from a private engine"), "{page}");
    eventually("b1 to answer a1", Duration::from_secs(30), || {
        fetch(&d1, "a1", &b1, 80)
    });

    // Over IPv6 too, each from its host's /122 block.
    let a1v6 = ip6_on(&d1, "a1", &net);
    let b1v6 = ip6_on(&d2, "b1", &net);
    let (a6, b6): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
        a1v6.parse().expect("a1's v6"),
        b1v6.parse().expect("b1's v6"),
    );
    assert_ne!(u128::from(a6) >> 6, u128::from(b6) >> 6, "{a1v6} {b1v6}");
    eventually("a1 to answer b1 over IPv6", Duration::from_secs(30), || {
        fetch(&d2, "b1", &a1v6, 80)
    });

    // A second container on h1 joins the same network and reaches b1 too.
    made.add(&d1, "a2");
    web(&d1, "a2", &net, &image, &[]);
    eventually("a2 to reach b1", Duration::from_secs(30), || {
        fetch(&d1, "a2", &b1, 80)
    });

    // b1's published port answers on h2's underlay address, from the other host.
    let h2 = underlay_v4(&lab.host_ns("h2"));
    let o = eventually("b1's published port", Duration::from_secs(30), || {
        let o = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.host_ns("h1")))
            .args(["busybox", "sh", "-c", &http_get(&h2, 8080)])
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success() && s.contains("200 OK")).then_some(s)
    });
    assert!(o.contains("hello"), "{o}");

    // h2's engine restarts (SIGTERM, as an init system stops it): it finds the driver again
    // (global scope, asked before its API answers), b1 comes back by its restart policy and
    // is reached again, at its published port too, and h2 holds one endpoint, not two.
    d2.restart();
    let b1 = eventually("b1 back with an address", Duration::from_secs(60), || {
        let ip = ip_on(&d2, "b1", &net);
        (!ip.is_empty()).then_some(ip)
    });
    eventually(
        "a1 to reach b1 after h2's engine restarted",
        Duration::from_secs(30),
        || fetch(&d1, "a1", &b1, 80),
    );
    eventually(
        "b1's published port after the restart",
        Duration::from_secs(30),
        || {
            let o = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", lab.host_ns("h1")))
                .args(["busybox", "sh", "-c", &http_get(&h2, 8080)])
                .output()
                .ok()?;
            (o.status.success() && String::from_utf8_lossy(&o.stdout).contains("200 OK"))
                .then_some(())
        },
    );
    eventually("one veth on h2", Duration::from_secs(20), || {
        (links(&lab.host_ns("h2"), "fnv").len() == 1).then_some(())
    });
    // The store holds a1, a2 and the new b1: the old b1's record and address are gone.
    let v: Value = serde_json::from_str(&lab.ok("h1", &["network", "inspect", &fname]))
        .expect("network inspect");
    let eps = v["endpoints"].as_array().cloned().unwrap_or_default();
    assert_eq!(eps.len(), 3, "endpoints after h2's restart: {eps:?}");
    assert!(
        eps.iter()
            .any(|e| e["ips"].to_string().contains(&format!("\"{b1}/"))),
        "b1's new address {b1} recorded: {eps:?}"
    );

    // A static address from another host's block (h1's, where a1 is) is refused with the
    // reason.
    let in_h1 = std::net::Ipv4Addr::from((u32::from(a1n) & !63) | 40).to_string();
    let o = d2.docker(&[
        "run",
        "--rm",
        "--network",
        &net,
        "--ip",
        &in_h1,
        &image,
        "true",
    ]);
    let why = out(&o);
    assert!(
        !o.status.success() && why.contains("not in a block of host"),
        "--ip in another host's block: {why}"
    );

    // The network cannot go while containers use it, on any host.
    let o = d1.docker(&["network", "rm", &net]);
    assert!(
        !o.status.success(),
        "network rm with containers should fail"
    );

    // Containers removed, then the network: nothing stays on either host.
    drop(made);
    d1.docker_ok(&["network", "rm", &net]);
    for h in ["h1", "h2"] {
        let ns = lab.host_ns(h);
        eventually(
            &format!("{h} to drop the network"),
            Duration::from_secs(30),
            || {
                let nets = lab.ok(h, &["network", "ls", "--json"]);
                // No veth, bridge or VXLAN device of the network is left.
                let left: Vec<String> = ["fnv", "fnp", "fn-", "fnx"]
                    .iter()
                    .flat_map(|p| links(&ns, p))
                    .collect();
                (!nets.contains(&fname) && left.is_empty()).then_some(())
            },
        );
        let eps = lab.ok(h, &["ps", "--json"]);
        assert!(!eps.contains(&fname), "endpoints left on {h}: {eps}");
    }
    drop(d2);
    drop(d1);
}

/// Served by the encrypted network's container; it must never appear on the underlay.
const MARKER: &str = "FERRYNET-DOCKER-ENCRYPT-PLAINTEXT-MARKER";

#[test]
fn an_encrypted_docker_network_goes_through_the_sleeve() {
    require_tools();
    let t = tag();
    let lab_name: String = format!("e{t}").chars().take(8).collect();
    let driver = format!("fne{t}");
    let lab = Lab::up(&lab_name, &["--hosts", "2", "--docker-driver", &driver]);
    let d1 = host_engine(&lab, "h1", &t);
    let d2 = host_engine(&lab, "h2", &t);
    let image = format!("fne-busybox:{t}");
    import_busybox(&d1.host(), &image);
    // h2's web server serves the marker (many times over, so full-size segments carry it).
    import_busybox_page(&d2.host(), &image, &MARKER.repeat(100));
    let mut made = Containers(Vec::new());

    let net = format!("enet{t}");
    create_network(
        &d1,
        &driver,
        &net,
        &[
            "-o",
            "ferrynet.backend=vxlan",
            "-o",
            "ferrynet.encrypt=true",
            "--subnet",
            "10.74.0.0/16",
        ],
    );
    let nets: Value = serde_json::from_str(&lab.ok("h1", &["network", "ls", "--json"])).unwrap();
    let fnet = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["subnets"].to_string().contains("10.74.0.0/16"))
        .cloned()
        .unwrap_or_else(|| panic!("no ferrynet network for 10.74.0.0/16: {nets}"));
    assert_eq!(fnet["fabric"]["encrypt"], true, "{fnet}");
    assert_eq!(fnet["fabric"]["backend"], "vxlan", "{fnet}");
    eventually(
        "h2's engine to list the network",
        Duration::from_secs(20),
        || {
            d2.docker(&["network", "inspect", &net])
                .status
                .success()
                .then_some(())
        },
    );
    made.add(&d1, "a1");
    web(&d1, "a1", &net, &image, &[]);
    made.add(&d2, "b1");
    web(&d2, "b1", &net, &image, &[]);
    let a1 = ip_on(&d1, "a1", &net);
    let b1 = ip_on(&d2, "b1", &net);
    eventually("a1 to reach b1", Duration::from_secs(30), || {
        fetch(&d1, "a1", &b1, 80)
    });
    eventually("b1 to reach a1", Duration::from_secs(30), || {
        fetch(&d2, "b1", &a1, 80)
    });
    // Both hosts send the other through the sleeve, and say why.
    for (me, peer) in [("h1", "h2"), ("h2", "h1")] {
        let s = lab.status(me);
        let p = s["networks"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == fnet["name"]))
            .and_then(|n| n["peers"].as_array())
            .and_then(|ps| ps.iter().find(|p| p["host"] == peer))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(p["backend"], "sleeve", "{me} -> {peer}: {s}");
        assert!(
            p["reason"].as_str().unwrap_or("").contains("encrypted"),
            "{p}"
        );
    }

    // The page with the marker crosses the underlay, both ways as requests and answers, and
    // the capture holds sleeve datagrams but neither the marker nor VXLAN.
    let mut cap = Capture::start(&lab);
    let page = fetch(&d1, "a1", &b1, 80).expect("the marker page over the sleeve");
    assert!(page.contains(MARKER), "{page}");
    let o = d2.docker(&[
        "exec",
        "b1",
        "sh",
        "-c",
        &format!("printf 'GET /{MARKER} HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {a1} 80"),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    cap.stop();
    assert!(
        !cap.contains(MARKER),
        "the marker crossed the underlay in clear"
    );
    assert!(
        !cap.matching("udp port 6784").is_empty(),
        "no sleeve traffic on the underlay"
    );
    assert!(
        cap.matching("udp port 4789").is_empty(),
        "VXLAN on the underlay of an encrypted network"
    );

    drop(made);
    d1.docker_ok(&["network", "rm", &net]);
    drop(d2);
    drop(d1);
}

#[test]
fn without_a_cluster_store_the_driver_stays_local() {
    require_tools();
    let t = tag();
    let lab_name: String = format!("l{t}").chars().take(8).collect();
    let driver = format!("fnl{t}");
    let lab = Lab::up(&lab_name, &["--hosts", "1", "--docker-driver", &driver]);
    let d = engine_on(&lab, "h1", &t, false);
    let image = format!("fnl-busybox:{t}");
    import_busybox(&d.host(), &image);
    let mut made = Containers(Vec::new());
    let net = format!("lnet{t}");
    // ferrynet is on etcd, but this engine has no cluster store: a global answer would make
    // every network create fail, so the driver answers local.
    create_network(&d, &driver, &net, &["--subnet", "10.74.0.0/24"]);
    assert_eq!(
        d.docker_ok(&["network", "inspect", "-f", "{{.Scope}}", &net]),
        "local"
    );
    made.add(&d, "c1");
    web(&d, "c1", &net, &image, &[]);
    made.add(&d, "c2");
    web(&d, "c2", &net, &image, &[]);
    let c1 = ip_on(&d, "c1", &net);
    eventually("c2 to reach c1", Duration::from_secs(30), || {
        fetch(&d, "c2", &c1, 80)
    });
    drop(made);
    d.docker_ok(&["network", "rm", &net]);
    let nets = lab.ok("h1", &["network", "ls", "--json"]);
    assert!(
        !nets.contains("10.74.0.0/24"),
        "the ferrynet network stays: {nets}"
    );
}

/// Docker's borrowed reservation (issue 14): on a `bgp` + `routed` network spanning two racks,
/// a container on h2 asks for an address of h1's block (`--ip`, through ferrynet's IPAM). It
/// gets it as a borrowed address: h2 announces it as a /32, and h1's container and the
/// borrower reach each other across the ToRs. An address someone holds, or the block's
/// gateway, is still refused.
#[test]
fn docker_borrows_an_address_of_another_hosts_block_on_bgp_routed() {
    require_tools();
    common::need("bird", "bird2");
    let t = tag();
    let lab_name: String = format!("b{t}").chars().take(8).collect();
    let driver = format!("fnb{t}");
    let lab = Lab::up(
        &lab_name,
        &[
            "--hosts",
            "2",
            "--racks",
            "2",
            "--router",
            "bird",
            "--backend",
            "bgp",
            "--mode",
            "routed",
            "--docker-driver",
            &driver,
        ],
    );
    let d1 = host_engine(&lab, "h1", &t);
    let d2 = host_engine(&lab, "h2", &t);
    let image = format!("fnb-busybox:{t}");
    import_busybox(&d1.host(), &image);
    import_busybox(&d2.host(), &image);
    let mut made = Containers(Vec::new());
    let net = format!("bnet{t}");
    create_network(
        &d1,
        &driver,
        &net,
        &[
            "--subnet",
            "10.79.0.0/24",
            "-o",
            "ferrynet.backend=bgp",
            "-o",
            "ferrynet.mode=routed",
        ],
    );
    eventually(
        "h2's engine to list the network",
        Duration::from_secs(20),
        || {
            d2.docker(&["network", "inspect", &net])
                .status
                .success()
                .then_some(())
        },
    );
    made.add(&d1, "a1");
    web(&d1, "a1", &net, &image, &[]);
    let a1 = ip_on(&d1, "a1", &net);
    let a1n: std::net::Ipv4Addr = a1.parse().expect("a1's address");
    // h1's block (default /26): its gateway, and a free address in it.
    let base = u32::from(a1n) & !63;
    let gw = std::net::Ipv4Addr::from(base + 1).to_string();
    let in_h1 = std::net::Ipv4Addr::from(base + 40).to_string();

    // Hostile first: a held address and the block's gateway are refused on h2.
    for taken in [&a1, &gw] {
        let o = d2.docker(&[
            "run",
            "--rm",
            "--network",
            &net,
            "--ip",
            taken,
            &image,
            "true",
        ]);
        assert!(!o.status.success(), "--ip {taken} on h2: {}", out(&o));
    }

    // The borrowed address.
    made.add(&d2, "b1");
    web(&d2, "b1", &net, &image, &["--ip", &in_h1]);
    assert_eq!(ip_on(&d2, "b1", &net), in_h1);
    let host_route = format!("{in_h1}/32");
    eventually("h2 to export the /32", Duration::from_secs(20), || {
        let st: Value = serde_json::from_str(&lab.ok("h2", &["bgp", "status", "--json"])).ok()?;
        st["exported"]
            .to_string()
            .contains(&host_route)
            .then_some(())
    });
    // h1 owns the block and still routes the borrowed address to h2 (its /32 over the
    // block's unreachable route), both ways.
    eventually("a1 to reach b1", Duration::from_secs(30), || {
        fetch(&d1, "a1", &in_h1, 80)
    });
    eventually("b1 to reach a1", Duration::from_secs(30), || {
        fetch(&d2, "b1", &a1, 80)
    });
    // Recorded once, as b1's.
    let nets: Value = serde_json::from_str(&lab.ok("h1", &["network", "ls", "--json"])).unwrap();
    let fname = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["subnets"].to_string().contains("10.79.0.0/24"))
        .and_then(|n| n["name"].as_str())
        .unwrap_or_else(|| panic!("no ferrynet network for 10.79.0.0/24: {nets}"))
        .to_string();
    let v: Value =
        serde_json::from_str(&lab.ok("h1", &["network", "inspect", &fname])).expect("inspect");
    let holders = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["ips"].to_string().contains(&format!("\"{in_h1}/")))
        .count();
    assert_eq!(holders, 1, "{v}");

    // Gone with its container: the /32 is withdrawn.
    drop(made);
    eventually("h2 to withdraw the /32", Duration::from_secs(20), || {
        let st: Value = serde_json::from_str(&lab.ok("h2", &["bgp", "status", "--json"])).ok()?;
        (!st["exported"].to_string().contains(&host_route)).then_some(())
    });
    d1.docker_ok(&["network", "rm", &net]);
    drop(d2);
    drop(d1);
}
