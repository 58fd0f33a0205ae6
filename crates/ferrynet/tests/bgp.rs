//! The `bgp` backend on an L3 fabric (`ferrynet lab up --racks 2 --router bird|gobgp`):
//! hosts in two racks, each rack behind a ToR namespace running BIRD 2 or GoBGP; the agents'
//! speakers peer with their ToR. Containers reach each other across racks through the
//! routers only; blocks appear in and leave the routers' tables; an agent killed with -9
//! keeps a TCP stream flowing (graceful restart); a hostile neighbour's routes are refused and
//! its malformed UPDATE gets a NOTIFICATION while the other sessions stay up; compressed
//! session flaps leave no stale route; a container cut off from the store while another host
//! takes its block comes back with a borrowed address. Every lab is removed on drop, also on
//! failure.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::{all_pairs, echo, stream, Container, Lab, ECHO_SERVER};
use common::{need, out, within};
use serde_json::Value;

/// A rack lab: `hosts` hosts dealt over two racks (h1, h3 … in rack 0, h2 … in rack 1).
fn rack_lab(name: &str, hosts: u8, router: &str) -> Lab {
    need("bird", "bird2");
    need("gobgpd", "gobgpd");
    let h = hosts.to_string();
    Lab::up(
        name,
        &[
            "--hosts",
            &h,
            "--racks",
            "2",
            "--router",
            router,
            "--backend",
            "bgp",
        ],
    )
}

fn sh(args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The BGP routes (protocol 114) in `host`'s kernel, both families, as `ip route` prints them.
fn kernel_routes(lab: &Lab, host: &str) -> Vec<String> {
    let ns = lab.host_ns(host);
    let mut v: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|f| {
            sh(&["ip", "-n", &ns, *f, "route", "show", "proto", "114"])
                .lines()
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

/// Rack `r`'s ToR routing table as its daemon shows it (both families).
fn tor_table(lab: &Lab, r: u8, router: &str) -> String {
    let ns = format!("{}-tor{r}", lab.name);
    match router {
        "bird" => {
            let ctl = format!("/run/ferrynet-lab/{}/tor{r}/bird.ctl", lab.name);
            sh(&[
                "ip", "netns", "exec", &ns, "birdc", "-s", &ctl, "show", "route",
            ])
        }
        _ => ["ipv4", "ipv6"]
            .iter()
            .map(|f| {
                sh(&[
                    "ip", "netns", "exec", &ns, "gobgp", "global", "rib", "-a", f,
                ])
            })
            .collect(),
    }
}

/// `host`'s blocks of `net`, from its agent's status.
fn blocks(lab: &Lab, host: &str, net: &str) -> Vec<String> {
    let st = lab.status(host);
    st["networks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["name"] == net)
        .flat_map(|n| n["blocks"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect()
}

/// `bgp status --json` on `host`.
fn bgp_status(lab: &Lab, host: &str) -> Value {
    serde_json::from_str(&lab.ok(host, &["bgp", "status", "--json"])).expect("bgp status json")
}

fn peer<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no peer {name} in {st}"))
}

/// Each host's kernel holds exactly the other hosts' blocks of the `bgp` networks, and no
/// other BGP route (nothing stale).
fn converged(lab: &Lab, hosts: &[&str], nets: &[&str]) -> Result<(), String> {
    for h in hosts {
        let mut want: Vec<String> = hosts
            .iter()
            .filter(|o| *o != h)
            .flat_map(|o| nets.iter().flat_map(|n| blocks(lab, o, n)))
            .collect();
        want.sort();
        let have: Vec<String> = kernel_routes(lab, h)
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        if have != want {
            return Err(format!("{h}: kernel has {have:?}, expected {want:?}"));
        }
    }
    Ok(())
}

/// A two-host BIRD rack lab with an echo container on each host, its routes converged.
fn two_racks(name: &str) -> (Lab, Container, Container) {
    let mut lab = rack_lab(name, 2, "bird");
    let c1 = lab.container("h1", "c1");
    let c2 = lab.container("h2", "c2");
    within(Duration::from_secs(30), || {
        converged(&lab, &["h1", "h2"], &["fabric"])
    });
    (lab, c1, c2)
}

fn routes_follow_blocks(name: &str, router: &str) {
    let mut lab = rack_lab(name, 3, router);
    let hosts = ["h1", "h2", "h3"];
    let cs: Vec<_> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.container(h, &format!("c{}", i + 1)))
        .collect();
    within(Duration::from_secs(30), || {
        converged(&lab, &hosts, &["fabric"])
    });
    all_pairs(&cs);
    // Across racks the only path is the ToRs: h1 (rack 0) reaches h2's containers via its ToR.
    let via = sh(&["ip", "-n", &lab.host_ns("h1"), "route", "get", &cs[1].v4]);
    assert!(
        via.contains("via 172.31.0.254"),
        "h1 -> c2 not via its ToR: {via}"
    );
    let via = sh(&[
        "ip",
        "-n",
        &lab.host_ns("h1"),
        "-6",
        "route",
        "get",
        &cs[1].v6,
    ]);
    assert!(
        via.contains("via fd31::fe"),
        "h1 -> c2 (IPv6) not via its ToR: {via}"
    );

    // A network with one-container blocks: the second container on h1 claims a block, which
    // appears in both ToRs' tables and h2's kernel; removing it all withdraws every block.
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "tiny",
            "--subnet",
            "10.30.0.0/24",
            "--subnet",
            "fd30::/64",
            "--backend",
            "bgp",
            "--block-size",
            "30",
            "--block-size6",
            "126",
        ],
    );
    let t1 = lab.run_on("h1", "t1", "tiny", &[], &["sleep", "infinity"]);
    let t2 = lab.run_on("h1", "t2", "tiny", &[], &["sleep", "infinity"]);
    let new_block = format!("{}/30", {
        let o: Vec<u8> = t2.v4.split('.').map(|x| x.parse().unwrap()).collect();
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] & !3)
    });
    for r in [0, 1] {
        within(Duration::from_secs(20), || {
            let t = tor_table(&lab, r, router);
            t.contains(&new_block)
                .then_some(())
                .ok_or(format!("{new_block} not in tor{r}'s table:\n{t}"))
        });
    }
    within(Duration::from_secs(20), || {
        converged(&lab, &hosts, &["fabric", "tiny"])
    });
    echo(&cs[1], &cs[0].v4, Duration::from_secs(5)).unwrap();
    lab.rm(&t1);
    lab.rm(&t2);
    lab.ok("h1", &["network", "rm", "tiny"]);
    for r in [0, 1] {
        within(Duration::from_secs(20), || {
            let t = tor_table(&lab, r, router);
            (!t.contains("10.30.") && !t.contains("fd30:"))
                .then_some(())
                .ok_or(format!("tiny's blocks still in tor{r}'s table:\n{t}"))
        });
    }
    within(Duration::from_secs(20), || {
        converged(&lab, &hosts, &["fabric"])
    });
}

#[test]
fn bird_tors_route_all_pairs_and_follow_blocks() {
    routes_follow_blocks("bgpbird", "bird");
}

#[test]
fn gobgp_tors_route_all_pairs_and_follow_blocks() {
    routes_follow_blocks("bgpgobgp", "gobgp");
}

/// A container on h2 (rack 1) holding an address of h1's block (`run --ip`, routed mode):
/// h2 announces it as a /32 beside its own blocks, both ToRs carry it, h1 (the block's owner,
/// which accepts a host route inside its block only for an address the store lends to another
/// host's container) and h3 reach it across the racks, by longest prefix over the block's
/// route; when it goes, the /32 leaves the ToRs' tables and every kernel.
#[test]
fn a_borrowed_address_is_announced_as_a_host_route_and_withdrawn() {
    need("bird", "bird2");
    let mut lab = Lab::up(
        "bgpbrw",
        &[
            "--hosts",
            "3",
            "--racks",
            "2",
            "--router",
            "bird",
            "--backend",
            "bgp",
            "--mode",
            "routed",
        ],
    );
    let hosts = ["h1", "h2", "h3"];
    let c1 = lab.container("h1", "c1");
    let c3 = lab.container("h3", "c3");
    lab.container("h2", "c2");
    within(Duration::from_secs(30), || {
        converged(&lab, &hosts, &["fabric"])
    });
    let b1 = blocks(&lab, "h1", "fabric")
        .into_iter()
        .find(|b| !b.contains(':'))
        .unwrap();
    let addr = {
        let o: Vec<u8> = b1
            .split('/')
            .next()
            .unwrap()
            .split('.')
            .map(|x| x.parse().unwrap())
            .collect();
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] + 20)
    };
    let host_route = format!("{addr}/32");
    let b = lab.run_on(
        "h2",
        "b",
        "fabric",
        &["--ip", &addr],
        &["python3", "-c", ECHO_SERVER],
    );
    assert_eq!(b.v4, addr);
    let exported = bgp_status(&lab, "h2")["exported"].to_string();
    assert!(exported.contains(&host_route), "h2 exports {exported}");
    for r in [0, 1] {
        within(Duration::from_secs(20), || {
            let t = tor_table(&lab, r, "bird");
            t.contains(&host_route)
                .then_some(())
                .ok_or(format!("{host_route} not in tor{r}'s table:\n{t}"))
        });
    }
    for h in ["h1", "h3"] {
        within(Duration::from_secs(20), || {
            let k = kernel_routes(&lab, h);
            k.iter()
                .any(|l| l.starts_with(&format!("{addr} via")))
                .then_some(())
                .ok_or(format!("{h}: no host route to {addr}: {k:?}"))
        });
    }
    let via = sh(&["ip", "-n", &lab.host_ns("h1"), "route", "get", &addr]);
    assert!(
        via.contains("via 172.31.0.254"),
        "h1 -> {addr} not via its ToR: {via}"
    );
    echo(&c1, &addr, Duration::from_secs(10)).unwrap();
    echo(&c3, &addr, Duration::from_secs(10)).unwrap();
    echo(&b, &c1.v4, Duration::from_secs(10)).unwrap();
    lab.rm(&b);
    for r in [0, 1] {
        within(Duration::from_secs(20), || {
            let t = tor_table(&lab, r, "bird");
            (!t.contains(&host_route))
                .then_some(())
                .ok_or(format!("{host_route} still in tor{r}'s table:\n{t}"))
        });
    }
    within(Duration::from_secs(20), || {
        converged(&lab, &hosts, &["fabric"])
    });
}

#[test]
fn agent_kill_9_keeps_a_stream_and_the_routers_keep_its_routes() {
    let (lab, c1, c2) = two_racks("bgpkill");
    echo(&c2, &c1.v4, Duration::from_secs(5)).unwrap();
    let client = stream(&c2, &c1.v4, 10);
    std::thread::sleep(Duration::from_secs(1));
    let h1_block = blocks(&lab, "h1", "fabric")[0].clone();
    lab.lab(&["stop-agent", "h1", "--kill"]);
    std::thread::sleep(Duration::from_secs(2));
    // The ToR holds h1's routes as stale (graceful restart), so h2 keeps them too.
    let t = tor_table(&lab, 0, "bird");
    assert!(
        t.contains(&h1_block),
        "tor0 dropped {h1_block} when h1's agent died:\n{t}"
    );
    assert!(
        kernel_routes(&lab, "h2")
            .iter()
            .any(|r| r.starts_with(&h1_block)),
        "h2 lost its route to {h1_block}"
    );
    lab.lab(&["start-agent", "h1"]);
    let o = client.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "stream broke across kill -9: {}",
        out(&o)
    );
    within(Duration::from_secs(30), || {
        let st = bgp_status(&lab, "h1");
        (st["converged"] == true && peer(&st, "tor-h1")["state"] == "Established")
            .then_some(())
            .ok_or(format!("h1 not back: {st}"))
    });
    within(Duration::from_secs(20), || {
        converged(&lab, &["h1", "h2"], &["fabric"])
    });
    echo(&c1, &c2.v6, Duration::from_secs(5)).unwrap();
}

#[test]
fn hostile_neighbour_is_refused_and_its_malformed_update_gets_a_notification() {
    let (mut lab, c1, c2) = two_racks("bgpevil");
    let before = bgp_status(&lab, "h1");
    let ups = peer(&before, "tor-h1")["establishedCount"].clone();
    // A neighbour on rack 0's link, configured as h1's peer.
    let ns = format!("{}-x", lab.name);
    lab.add_netns(&ns);
    let ul = format!("{}-ul", lab.name);
    for args in [
        vec![
            "-n", &ul, "link", "add", "evil", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
        vec!["-n", &ul, "link", "set", "evil", "master", "ul0", "up"],
        vec!["-n", &ns, "addr", "add", "172.31.0.50/24", "dev", "eth0"],
        vec!["-n", &ns, "link", "set", "eth0", "up"],
    ] {
        let o = Command::new("ip").args(&args).output().unwrap();
        assert!(o.status.success(), "ip {args:?}: {}", out(&o));
    }
    lab.ok(
        "h1",
        &[
            "bgp",
            "peer",
            "add",
            "evil",
            "--address",
            "172.31.0.50",
            "--asn",
            "65099",
            "--host",
            "h1",
        ],
    );
    let own = blocks(&lab, "h1", "fabric")
        .into_iter()
        .find(|b| !b.contains(':'))
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bgp/hostile_peer.py");
    let run = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                script,
                "172.31.0.1",
                "65099",
            ])
            .args(["172.31.0.50", &own, "172.31.0.50"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // The agent learns of the peer through the store: retry until it accepts the session.
    let o = within(Duration::from_secs(20), || {
        let o = run();
        String::from_utf8_lossy(&o.stdout)
            .contains("established")
            .then_some(o.clone())
            .ok_or(out(&o))
    });
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("sent-hostile"), "{text}");
    assert!(
        text.contains("notification 3 "),
        "no UPDATE error NOTIFICATION: {}",
        out(&o)
    );
    let st = bgp_status(&lab, "h1");
    let evil = peer(&st, "evil");
    assert!(
        evil["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("UPDATE message error"),
        "{evil}"
    );
    // All six of its routes arrived and were refused by the import policy (a /32 inside the
    // own block too: no container of another host holds that address): none reached the
    // kernel, and the ToR sessions never dropped.
    assert_eq!(evil["prefixesRejected"], 6, "{evil}");
    let routes = kernel_routes(&lab, "h1").join("\n");
    let inside = {
        let o: Vec<u8> = own
            .split('/')
            .next()
            .unwrap()
            .split('.')
            .map(|x| x.parse().unwrap())
            .collect();
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] + 5)
    };
    for p in ["192.168.99.", "10.0.0.0/8", "10.20.99.0", &own, &inside] {
        assert!(
            !routes.contains(p),
            "{p} installed from a hostile peer:\n{routes}"
        );
    }
    assert_eq!(peer(&st, "tor-h1")["establishedCount"], ups, "{st}");
    assert_eq!(peer(&st, "tor-h1")["state"], "Established");
    echo(&c1, &c2.v4, Duration::from_secs(5)).unwrap();
    lab.ok("h1", &["bgp", "peer", "rm", "evil"]);
}

#[test]
fn compressed_session_flaps_leave_no_stale_route() {
    let mut lab = rack_lab("bgpflap", 2, "bird");
    let c1 = lab.container("h1", "c1");
    let c2 = lab.container("h2", "c2");
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "flap",
            "--subnet",
            "10.40.0.0/16",
            "--subnet",
            "fd40::/64",
            "--backend",
            "bgp",
        ],
    );
    within(Duration::from_secs(30), || {
        converged(&lab, &["h1", "h2"], &["fabric", "flap"])
    });
    let birdc = |r: u8, args: &[&str]| {
        let ns = format!("{}-tor{r}", lab.name);
        let ctl = format!("/run/ferrynet-lab/{}/tor{r}/bird.ctl", lab.name);
        let mut a = vec!["ip", "netns", "exec", &ns, "birdc", "-s", &ctl];
        a.extend_from_slice(args);
        sh(&a)
    };
    // An hour of trouble in a minute: host sessions reset by the ToR, the spine flapping,
    // agents killed, and a network removed while sessions are down.
    for i in 0..24 {
        match i % 4 {
            0 => {
                birdc(0, &["disable", "h1v4"]);
                birdc(0, &["disable", "h1v6"]);
                std::thread::sleep(Duration::from_millis(300));
                birdc(0, &["enable", "h1v4"]);
                birdc(0, &["enable", "h1v6"]);
            }
            1 => {
                birdc(1, &["restart", "tor0v4"]);
                birdc(1, &["restart", "tor0v6"]);
            }
            2 => {
                lab.lab(&["stop-agent", "h2", "--kill"]);
                std::thread::sleep(Duration::from_millis(300));
                lab.lab(&["start-agent", "h2"]);
            }
            _ => {
                birdc(1, &["disable", "h2v4"]);
                std::thread::sleep(Duration::from_millis(300));
                birdc(1, &["enable", "h2v4"]);
            }
        }
        if i == 13 {
            // h1's session to its ToR is down now and then: the withdrawals must still land.
            lab.ok("h1", &["network", "rm", "flap"]);
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    within(Duration::from_secs(60), || {
        converged(&lab, &["h1", "h2"], &["fabric"])
    });
    for r in [0, 1] {
        let t = birdc(r, &["show", "route"]);
        assert!(
            !t.contains("10.40.") && !t.contains("fd40:"),
            "stale in tor{r}:\n{t}"
        );
    }
    echo(&c1, &c2.v4, Duration::from_secs(10)).unwrap();
    echo(&c2, &c1.v6, Duration::from_secs(10)).unwrap();
}

#[test]
fn hosts_form_a_full_ibgp_mesh_by_default() {
    let mut lab = Lab::up("bgpmesh", &["--hosts", "3", "--backend", "bgp"]);
    let cs: Vec<_> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.container(h, &format!("c{}", i + 1)))
        .collect();
    within(Duration::from_secs(30), || {
        converged(&lab, &["h1", "h2", "h3"], &["fabric"])
    });
    let st = bgp_status(&lab, "h1");
    for p in ["mesh-h2", "mesh-h3"] {
        assert_eq!(peer(&st, p)["state"], "Established", "{st}");
        assert_eq!(peer(&st, p)["remoteAsn"], 64512);
    }
    all_pairs(&cs);
}

/// A TCP counter of the namespace `ns` (`nstat`), e.g. TcpExtTCPMD5Failure.
fn nstat(ns: &str, counter: &str) -> u64 {
    sh(&["ip", "netns", "exec", ns, "nstat", "-az", counter])
        .lines()
        .find(|l| l.starts_with(counter))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn tcp_md5_sessions_come_up_only_with_the_key() {
    need("nstat", "iproute2");
    let lab = Lab::up(
        "bgpmd5",
        &[
            "--hosts",
            "2",
            "--racks",
            "2",
            "--router",
            "bird",
            "--backend",
            "bgp",
            "--bgp-password",
            "s3cr3t",
        ],
    );
    let tor0 = format!("{}-tor0", lab.name);
    let st = bgp_status(&lab, "h1");
    assert_eq!(peer(&st, "tor-h1")["state"], "Established", "{st}");
    let failures = nstat(&tor0, "TcpExtTCPMD5Failure");
    // The wrong key: the ToR's kernel drops h1's signed segments, the session stays down.
    let peer_add = |pw: &str| {
        lab.ok(
            "h1",
            &[
                "bgp",
                "peer",
                "add",
                "tor-h1",
                "--address",
                "172.31.0.254",
                "--asn",
                "65000",
                "--host",
                "h1",
                "--password",
                pw,
            ],
        )
    };
    peer_add("wrong");
    within(Duration::from_secs(20), || {
        let st = bgp_status(&lab, "h1");
        let n = nstat(&tor0, "TcpExtTCPMD5Failure");
        (n > failures && peer(&st, "tor-h1")["state"] != "Established")
            .then_some(())
            .ok_or(format!("MD5 failures {failures} -> {n}: {st}"))
    });
    peer_add("s3cr3t");
    within(Duration::from_secs(30), || {
        let st = bgp_status(&lab, "h1");
        (peer(&st, "tor-h1")["state"] == "Established")
            .then_some(())
            .ok_or(format!("not back with the key: {st}"))
    });
}

/// Partition → borrowed (issue 14): on a `bgp` + `routed` network whose pool has room for one
/// block more than its 3 hosts hold, h2 is cut off from etcd past its lease and grace period;
/// its records are released and, with no other block left, h1 claims h2's old block. When h2
/// comes back its container keeps its address as a borrowed one (no conflict, nobody holds it
/// twice): h2 announces it as a /32, and h1 (now the block's owner) and h3 reach it.
#[test]
fn a_container_cut_off_while_its_block_is_taken_comes_back_borrowed() {
    need("bird", "bird2");
    let net = "brw";
    let mut lab = Lab::up(
        "bgpprt",
        &[
            "--hosts",
            "3",
            "--racks",
            "2",
            "--router",
            "bird",
            "--backend",
            "bgp",
            "--mode",
            "routed",
            "--grace",
            "3s",
            "--lease-ttl",
            "2s",
        ],
    );
    // 4 blocks of 8 addresses: one each for the 3 hosts (claimed ahead), one spare.
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            net,
            "--subnet",
            "10.78.0.0/27",
            "--backend",
            "bgp",
            "--mode",
            "routed",
            "--block-size",
            "29",
        ],
    );
    let hosts = ["h1", "h2", "h3"];
    within(Duration::from_secs(30), || {
        let n: usize = hosts.iter().map(|h| blocks(&lab, h, net).len()).sum();
        (n == 3)
            .then_some(())
            .ok_or(format!("{n} blocks claimed, want 3"))
    });
    let b2 = blocks(&lab, "h2", net).remove(0);
    // The victim holds an address high in h2's block, so h1 filling the block later takes
    // other addresses first.
    let addr = {
        let o: Vec<u8> = b2
            .split('/')
            .next()
            .unwrap()
            .split('.')
            .map(|x| x.parse().unwrap())
            .collect();
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] + 5)
    };
    let v = lab.run_on(
        "h2",
        "v",
        net,
        &["--ip", &addr],
        &["python3", "-c", ECHO_SERVER],
    );
    let c3 = lab.run_on("h3", "c3", net, &[], &["python3", "-c", ECHO_SERVER]);
    echo(&c3, &addr, Duration::from_secs(30)).unwrap();

    let holders = |lab: &Lab| -> Vec<String> {
        let v: Value =
            serde_json::from_str(&lab.ok("h1", &["network", "inspect", net])).expect("json");
        v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|ep| {
                ep["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|ip| ip.as_str().unwrap_or("").split('/').next() == Some(&addr))
            })
            .map(|ep| ep["containerId"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    lab.cut_from_store("h2", true);
    within(Duration::from_secs(40), || {
        let held = holders(&lab);
        let owned = blocks(&lab, "h1", net).len() + blocks(&lab, "h3", net).len();
        (held.is_empty() && owned == 2)
            .then_some(())
            .ok_or(format!("h2 not released yet: {held:?}"))
    });
    // h1 grows until it holds h2's old block: the spare one first, then, with no other
    // block free, the released one.
    let mut grown = Vec::new();
    for i in 0..24 {
        if blocks(&lab, "h1", net).contains(&b2) {
            break;
        }
        grown.push(lab.run_on("h1", &format!("g{i}"), net, &[], &["sleep", "600"]));
    }
    assert!(
        blocks(&lab, "h1", net).contains(&b2),
        "h1 never took {b2}: {:?}",
        blocks(&lab, "h1", net)
    );
    assert!(
        grown.iter().all(|g| g.v4 != addr),
        "h1 gave the victim's address away"
    );
    lab.cut_from_store("h2", false);

    // Back: recorded once, as the victim's; no conflict; a borrowed /32 announced by h2.
    within(Duration::from_secs(40), || {
        let held = holders(&lab);
        (held.len() == 1)
            .then_some(())
            .ok_or(format!("{addr} held by {held:?}"))
    });
    let st = lab.status("h2");
    assert!(
        st["reassert"]["restored"].as_u64().unwrap_or(0) >= 1,
        "{}",
        st["reassert"]
    );
    assert_eq!(st["reassert"]["conflicts"], serde_json::json!([]), "{st}");
    assert!(
        blocks(&lab, "h1", net).contains(&b2),
        "the block stays h1's"
    );
    let host_route = format!("{addr}/32");
    within(Duration::from_secs(20), || {
        let exported = bgp_status(&lab, "h2")["exported"].to_string();
        exported
            .contains(&host_route)
            .then_some(())
            .ok_or(format!("h2 exports {exported}"))
    });
    // Reached from a container in the block on its new owner (round trips: the replies
    // leave the borrowed address too) and from the other rack's host; and it reaches out.
    let from_h1 = grown.last().expect("h1 grew");
    echo(from_h1, &addr, Duration::from_secs(20)).unwrap();
    echo(&c3, &addr, Duration::from_secs(20)).unwrap();
    echo(&v, &c3.v4, Duration::from_secs(10)).unwrap();
}

/// The /30 (or /126) block holding `ip`.
fn block_of(ip: &str) -> String {
    if ip.contains(':') {
        let a: std::net::Ipv6Addr = ip.parse().unwrap();
        let b = std::net::Ipv6Addr::from(u128::from(a) & !3);
        format!("{b}/126")
    } else {
        let a: std::net::Ipv4Addr = ip.parse().unwrap();
        let b = std::net::Ipv4Addr::from(u32::from(a) & !3);
        format!("{b}/30")
    }
}

/// `host`'s blocks of `net` that no container of `cs` is in: its spares.
fn spares(lab: &Lab, host: &str, net: &str, cs: &[&Container]) -> Vec<String> {
    let used: Vec<String> = cs
        .iter()
        .flat_map(|c| c.ips.iter().map(|i| block_of(i)))
        .collect();
    blocks(lab, host, net)
        .into_iter()
        .filter(|b| !used.contains(b))
        .collect()
}

/// Each host keeps one spare block per family claimed ahead, already routed by its peers; a
/// container takes the spare into use (its block was in the other host's kernel before its
/// ADD started) and the agent claims the next one.
#[test]
fn a_spare_block_is_claimed_ahead_and_routed_before_a_container_needs_it() {
    let mut lab = rack_lab("bgpspare", 2, "bird");
    let hosts = ["h1", "h2"];
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "sp",
            "--subnet",
            "10.31.0.0/24",
            "--subnet",
            "fd31:5::/64",
            "--backend",
            "bgp",
            "--block-size",
            "30",
            "--block-size6",
            "126",
        ],
    );
    // Before any container: one empty block per family on each host, routed by the other.
    within(Duration::from_secs(30), || {
        for h in hosts {
            let s = spares(&lab, h, "sp", &[]);
            if s.len() != 2 {
                return Err(format!("{h}'s spare blocks: {s:?}"));
            }
        }
        converged(&lab, &hosts, &["fabric", "sp"])
    });
    let mut cs: Vec<Container> = Vec::new();
    for i in 0..3 {
        let mine = blocks(&lab, "h1", "sp");
        let before = spares(&lab, "h1", "sp", &cs.iter().collect::<Vec<_>>());
        let h2_routes = kernel_routes(&lab, "h2");
        let c = lab.run_on("h1", &format!("s{i}"), "sp", &[], &["sleep", "infinity"]);
        // The container's blocks were h1's before its ADD and already in h2's kernel.
        for ip in [&c.v4, &c.v6] {
            let b = block_of(ip);
            assert!(mine.contains(&b), "{} in {b}, h1 held {mine:?}", c.name);
            assert!(
                h2_routes.iter().any(|r| r.starts_with(&format!("{b} "))),
                "{b} not in h2's kernel before the ADD: {h2_routes:?}"
            );
        }
        // A /30 holds one container: the IPv4 spare is taken into use. A /126 holds two: the
        // second container fills the first one's block before the spare.
        let v4 = block_of(&c.v4);
        assert!(
            before.contains(&v4),
            "{} in {v4}, spares were {before:?}",
            c.name
        );
        if i == 1 {
            assert_eq!(block_of(&c.v6), block_of(&cs[0].v6), "v6 spare taken early");
        }
        cs.push(c);
        // New spares follow (one empty block per family again), routed by h2.
        let refs: Vec<&Container> = cs.iter().collect();
        within(Duration::from_secs(20), || {
            let s = spares(&lab, "h1", "sp", &refs);
            let v6 = s.iter().filter(|b| b.contains(':')).count();
            if s.len() != 2 || v6 != 1 || s.contains(&v4) {
                return Err(format!("h1's spares after {}: {s:?}", i + 1));
            }
            converged(&lab, &hosts, &["fabric", "sp"])
        });
    }
    // h2, which ran nothing, still holds just its first (spare) blocks.
    assert_eq!(blocks(&lab, "h2", "sp").len(), 2);
    for c in &cs {
        lab.rm(c);
    }
    lab.ok("h1", &["network", "rm", "sp"]);
}
