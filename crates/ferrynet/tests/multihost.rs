//! Multi-host tests on a real kernel with a real etcd: `ferrynet lab` builds hosts as network
//! namespaces with an agent each; containers on every host must reach each other over IPv4
//! and IPv6 with each backend, survive an agent restart and an etcd outage, and a removed
//! host's peers must clean up. Every lab is removed on drop, also when a test fails.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lab::{all_pairs, echo, stream, Container, Lab};
use common::{bin, out};
use serde_json::Value;

impl Lab {
    /// `hosts` hosts with `subnets` underlay subnets, on `backend`, and `extra` flags.
    fn sized(name: &str, hosts: u8, subnets: u8, backend: &str, extra: &[&str]) -> Lab {
        let h = hosts.to_string();
        let s = subnets.to_string();
        let mut args = vec!["--hosts", &h, "--subnets", &s, "--backend", backend];
        args.extend_from_slice(extra);
        Lab::up(name, &args)
    }
}

fn three_containers(lab: &mut Lab) -> Vec<Container> {
    ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.container(h, &format!("c{}", i + 1)))
        .collect()
}

fn peer_backend(status: &Value, peer: &str) -> Option<String> {
    status["networks"][0]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["host"] == peer)?["backend"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn route_backend_all_pairs() {
    let mut lab = Lab::sized("mhroute", 3, 1, "route", &[]);
    let cs = three_containers(&mut lab);
    all_pairs(&cs);
    let st = lab.status("h1");
    assert_eq!(peer_backend(&st, "h2").as_deref(), Some("route"), "{st}");
    assert_eq!(st["errors"].as_array().map(Vec::len), Some(0), "{st}");
}

#[test]
fn vxlan_backend_all_pairs_with_overlay_mtu() {
    let mut lab = Lab::sized("mhvxlan", 3, 1, "vxlan", &[]);
    let cs = three_containers(&mut lab);
    all_pairs(&cs);
    // Container interfaces carry the underlay MTU minus the VXLAN overhead.
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cs[0].netns(),
            "cat",
            "/sys/class/net/eth0/mtu",
        ])
        .output()
        .unwrap();
    let mtu = Command::new("ip")
        .args(["-n", &cs[0].netns(), "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        out(&mtu).contains("mtu 1450"),
        "container mtu: {} {}",
        out(&mtu),
        out(&o)
    );
    assert_eq!(
        peer_backend(&lab.status("h2"), "h3").as_deref(),
        Some("vxlan")
    );
}

#[test]
fn auto_backend_routes_on_link_and_tunnels_across() {
    // Two underlay subnets joined by a router: h1 and h3 share one, h2 is on the other.
    let mut lab = Lab::sized("mhauto", 3, 2, "auto", &[]);
    let cs = three_containers(&mut lab);
    all_pairs(&cs);
    let st = lab.status("h1");
    assert_eq!(peer_backend(&st, "h3").as_deref(), Some("route"), "{st}");
    assert_eq!(peer_backend(&st, "h2").as_deref(), Some("vxlan"), "{st}");
}

#[test]
fn route_backend_reports_a_peer_off_link() {
    let lab = Lab::sized("mhoff", 2, 2, "route", &[]);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = lab.status("h1");
        let peers = st["networks"][0]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(p) = peers.iter().find(|p| p["host"] == "h2") {
            let errs = p["errors"].to_string();
            assert!(errs.contains("not on a shared link"), "{st}");
            break;
        }
        assert!(Instant::now() < until, "h2 never appeared as a peer: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agent_kill_and_restart_keeps_a_stream_flowing() {
    let mut lab = Lab::sized("mhrest", 2, 1, "vxlan", &[]);
    let c1 = lab.container("h1", "c1");
    let c2 = lab.container("h2", "c2");
    echo(&c1, &c2.v4, Duration::from_secs(5)).unwrap();
    let client = stream(&c1, &c2.v4, 8);
    std::thread::sleep(Duration::from_secs(1));
    lab.lab(&["stop-agent", "h2", "--kill"]);
    std::thread::sleep(Duration::from_secs(2));
    lab.lab(&["start-agent", "h2"]);
    let o = client.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "stream broke across the restart: {}",
        out(&o)
    );
    // The restarted agent found the kernel already right: it changed nothing.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let o = lab.exec("h2", &["status", "--json"]);
        if o.status.success() {
            let st: Value = serde_json::from_slice(&o.stdout).unwrap();
            if st["reconciles"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(st["changes"], 0, "restart rewrote the fabric: {st}");
                break;
            }
        }
        assert!(Instant::now() < until, "restarted agent never reconciled");
        std::thread::sleep(Duration::from_millis(200));
    }
    echo(&c2, &c1.v6, Duration::from_secs(5)).unwrap();
}

/// Run the plugin as a runtime would, on lab host `host`, for container `id` in `netns`.
fn cni(lab: &Lab, host: &str, network: &str, cmd: &str, id: &str, netns: &str) -> Output {
    let state = format!("/run/ferrynet-lab/{}/{host}", lab.name);
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": network, "type": "ferrynet", "stateDir": state
    });
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}-{host}", lab.name))
        .arg(bin())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A CNI ADD on network `fabric`: exit code and the parsed result or error.
fn cni_add(lab: &Lab, host: &str, id: &str, netns: &str) -> (i32, Value) {
    let o = cni(lab, host, "fabric", "ADD", id, netns);
    (
        o.status.code().unwrap_or(-1),
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
    )
}

/// A bare network namespace for a CNI ADD, removed on drop.
struct Netns(String);
impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let o = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(o.status.success());
        Netns(name.to_string())
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn etcd_outage_keeps_traffic_and_fails_adds_with_try_again() {
    let mut lab = Lab::sized("mhetcd", 2, 1, "route", &[]);
    let c1 = lab.container("h1", "c1");
    let c2 = lab.container("h2", "c2");
    echo(&c1, &c2.v4, Duration::from_secs(5)).unwrap();
    lab.lab(&["stop-etcd"]);
    let started = Instant::now();
    // Existing traffic does not depend on the store.
    echo(&c1, &c2.v4, Duration::from_secs(5)).unwrap();
    echo(&c2, &c1.v6, Duration::from_secs(5)).unwrap();
    let ns = Netns::new(&format!("{}-cni", lab.name));
    let t = Instant::now();
    let (code, err) = cni_add(&lab, "h1", "outage1", &ns.0);
    assert_ne!(code, 0, "ADD succeeded with etcd down: {err}");
    assert_eq!(err["code"], 11, "expected try-again-later: {err}");
    assert!(
        err["msg"].as_str().unwrap_or("").contains("store"),
        "message should name the store: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "ADD hung for {:?}",
        t.elapsed()
    );
    // Agents report the outage.
    let until = Instant::now() + Duration::from_secs(15);
    while lab.status("h2")["storeOk"] != false {
        assert!(Instant::now() < until, "agent never noticed the outage");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The outage lasts 30 s; traffic keeps flowing all along.
    while started.elapsed() < Duration::from_secs(30) {
        echo(&c1, &c2.v4, Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    lab.lab(&["start-etcd"]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, res) = cni_add(&lab, "h1", "outage1", &ns.0);
        if code == 0 {
            let ip = res["ips"][0]["address"].as_str().unwrap().to_string();
            assert!(ip.starts_with("10.20."), "{res}");
            break;
        }
        assert!(
            Instant::now() < until,
            "ADD still failing after etcd returned: {res}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for h in ["h1", "h2"] {
        let until = Instant::now() + Duration::from_secs(20);
        while lab.status(h)["storeOk"] != true {
            assert!(Instant::now() < until, "agent on {h} never reconnected");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    echo(&c2, &c1.v4, Duration::from_secs(5)).unwrap();
    cni(&lab, "h1", "fabric", "DEL", "outage1", &ns.0);
}

#[test]
fn removed_host_is_cleaned_up_by_its_peers() {
    let mut lab = Lab::sized(
        "mhgone",
        3,
        1,
        "vxlan",
        &["--grace", "3s", "--lease-ttl", "2s"],
    );
    let c3 = lab.container("h3", "c3");
    let block = |st: &Value| -> Vec<String> {
        st["networks"][0]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|p| p["host"] == "h3")
            .flat_map(|p| p["blocks"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect()
    };
    // h3's blocks once its spares (one empty block per family beside c3's) are claimed and
    // saved to its blocks.json, which is what it takes back below.
    let saved = format!("/run/ferrynet-lab/{}/h3/blocks.json", lab.name);
    let h3_blocks = common::within(Duration::from_secs(20), || {
        let b = block(&lab.status("h1"));
        let file = std::fs::read_to_string(&saved).unwrap_or_default();
        let in_file = |x: &String| file.contains(&format!("\"{x}\""));
        (b.len() == 4 && b.iter().all(in_file))
            .then(|| b.clone())
            .ok_or(format!(
                "h3's blocks as h1 sees them: {b:?}; blocks.json: {file}"
            ))
    });
    lab.lab(&["stop-agent", "h3", "--kill"]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let st = lab.status("h1");
        let routes = Command::new("ip")
            .args([
                "-n",
                &format!("{}-h1", lab.name),
                "route",
                "show",
                "proto",
                "113",
            ])
            .output()
            .unwrap();
        let routes = out(&routes);
        let v4_block = h3_blocks.iter().find(|b| !b.contains(':')).unwrap();
        if block(&st).is_empty() && !routes.contains(v4_block.as_str()) {
            // Its endpoint was released too: the address is free in the store.
            let o = lab.exec("h1", &["network", "inspect", "fabric"]);
            assert!(
                !out(&o).contains(&c3.v4),
                "h3's endpoint still recorded: {}",
                out(&o)
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "h1 still routes to h3 after 30 s: {st}\n{routes}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // It comes back under its name: it takes its former blocks again, as they are free.
    lab.lab(&["start-agent", "h3"]);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let mut now = block(&lab.status("h1"));
        now.sort();
        let mut before = h3_blocks.clone();
        before.sort();
        if now == before {
            // Taken back from blocks.json, not merely the first free blocks again.
            let log =
                std::fs::read_to_string(format!("/run/ferrynet-lab/{}/h3/agent.log", lab.name))
                    .unwrap_or_default();
            assert!(log.contains("reclaimed a former block"), "{log}");
            break;
        }
        assert!(
            Instant::now() < until,
            "h3 did not reclaim {before:?}; h1 sees {now:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn first_add_on_a_host_claims_its_block_itself() {
    // No agent on h1 has claimed anything yet when its first container arrives.
    let lab = Lab::sized("mhfirst", 2, 1, "route", &[]);
    lab.lab(&["stop-agent", "h1"]);
    let o = lab.exec(
        "h2",
        &[
            "network",
            "create",
            "late",
            "--subnet",
            "10.30.0.0/16",
            "--backend",
            "route",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let ns = Netns::new(&format!("{}-cni", lab.name));
    let run = |cmd: &str| cni(&lab, "h1", "late", cmd, "first", &ns.0);
    let o = run("ADD");
    assert!(o.status.success(), "first ADD failed: {}", out(&o));
    let res: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ip = res["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.30.") && ip.ends_with("/26"), "{res}");
    assert!(res["ips"][0]["gateway"].as_str().is_some(), "{res}");
    lab.lab(&["start-agent", "h1"]);
    // h2's agent routes to the block h1 claimed by itself.
    let until = Instant::now() + Duration::from_secs(10);
    let h1_addr = ip.split('/').next().unwrap().to_string();
    loop {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-h2", lab.name),
                "ping",
                "-c1",
                "-W1",
                &h1_addr,
            ])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < until,
            "h2 cannot reach {h1_addr}: {}",
            out(&o)
        );
    }
    let o = run("DEL");
    assert!(o.status.success(), "{}", out(&o));
}

/// The routes on `host` with ferrynet's fabric protocol (113).
fn fabric_routes(lab: &Lab, host: &str) -> String {
    let ns = format!("{}-{host}", lab.name);
    let v4 = Command::new("ip")
        .args(["-n", &ns, "route", "show", "proto", "113"])
        .output()
        .expect("ip route");
    let v6 = Command::new("ip")
        .args(["-n", &ns, "-6", "route", "show", "proto", "113"])
        .output()
        .expect("ip -6 route");
    format!("{}{}", out(&v4), out(&v6))
}

/// h1's agent killed right after it applied a fabric change (crash point
/// `agent-fabric-applied`: its first reconcile puts back a route deleted while it was away)
/// and started again: it adopts what it had programmed, containers talk, and removing the
/// network later leaves no fabric route, FDB entry or VXLAN device on h1.
#[test]
fn agent_killed_after_applying_the_fabric_converges_when_back() {
    let mut lab = Lab::sized("mhfab", 2, 1, "vxlan", &[]);
    let c1 = lab.container("h1", "c1");
    let c2 = lab.container("h2", "c2");
    all_pairs(&[c1.clone(), c2.clone()]);
    lab.lab(&["stop-agent", "h1"]);
    let ns = format!("{}-h1", lab.name);
    let routes = fabric_routes(&lab, "h1");
    let first = routes.lines().next().expect("h1 routes to h2's blocks");
    let dst = first.split_whitespace().next().expect("a destination");
    let o = Command::new("ip")
        .args(["-n", &ns, "route", "del", dst, "proto", "113"])
        .output()
        .expect("ip route del");
    assert!(o.status.success(), "ip route del {dst}: {}", out(&o));
    let o = Command::new(bin())
        .args(["lab", "start-agent", "h1", "--name", &lab.name])
        .env("FERRYNET_FAILPOINT", "agent-fabric-applied")
        .output()
        .expect("lab start-agent");
    assert!(o.status.success(), "start-agent: {}", out(&o));
    let until = Instant::now() + Duration::from_secs(30);
    while !lab
        .agent_log_tail("h1", 40)
        .contains("crash point agent-fabric-applied reached")
    {
        assert!(
            Instant::now() < until,
            "h1's agent never reached the crash point\n{}",
            lab.agent_log_tail("h1", 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        fabric_routes(&lab, "h1").contains(dst),
        "the crashed reconcile had put the route back"
    );
    lab.lab(&["start-agent", "h1"]);
    all_pairs(&[c1.clone(), c2.clone()]);
    lab.rm(&c1);
    lab.rm(&c2);
    lab.ok("h1", &["network", "rm", "fabric"]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let routes = fabric_routes(&lab, "h1");
        let vx = Command::new("ip")
            .args(["-n", &ns, "-d", "link", "show", "type", "vxlan"])
            .output()
            .expect("ip link");
        let vx = out(&vx);
        if routes.trim().is_empty() && vx.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "h1 keeps fabric state of a removed network:\n{routes}\n{vx}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `host`'s blocks of network `scarce`, from its agent's status.
fn net_blocks(lab: &Lab, host: &str) -> Result<Vec<String>, String> {
    Ok(lab.try_status(host)?["networks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["name"] == "scarce")
        .flat_map(|n| n["blocks"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect())
}

/// A pool with barely a block per host: spares never take the block a host without one needs.
/// h3's agent is stopped while the network is made and h1 and h2 fill their first blocks (each
/// would want a spare); when h3 comes back it still gets its first block and runs a container.
#[test]
fn spare_blocks_never_starve_a_host_of_its_first_block() {
    let mut lab = Lab::sized("mhscarce", 3, 1, "route", &["--lease-ttl", "2s"]);
    lab.lab(&["stop-agent", "h3"]);
    // Four /30 blocks for three hosts.
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "scarce",
            "--subnet",
            "10.33.0.0/28",
            "--backend",
            "route",
            "--block-size",
            "30",
        ],
    );
    for h in ["h1", "h2"] {
        common::within(Duration::from_secs(20), || {
            let b = net_blocks(&lab, h)?;
            (b.len() == 1).then_some(()).ok_or(format!("{h}: {b:?}"))
        });
    }
    // Each fills its block; with two blocks left and h3 without one, neither claims a spare.
    let c1 = lab.run_on("h1", "c1", "scarce", &[], &["sleep", "infinity"]);
    let c2 = lab.run_on("h2", "c2", "scarce", &[], &["sleep", "infinity"]);
    lab.lab(&["start-agent", "h3"]);
    common::within(Duration::from_secs(20), || {
        // The agent listens a moment after `start-agent` returns: until then, ask again.
        let b = net_blocks(&lab, "h3")?;
        (b.len() == 1).then_some(()).ok_or(format!("h3: {b:?}"))
    });
    let c3 = lab.run_on("h3", "c3", "scarce", &[], &["sleep", "infinity"]);
    assert!(c3.v4.starts_with("10.33.0."), "{}", c3.v4);
    // Neither h1 nor h2 took a spare meanwhile (the agents saw the endpoints before h3's
    // ADD: its container's record is what made h3's block used).
    assert_eq!(
        net_blocks(&lab, "h1").map(|b| b.len()),
        Ok(1),
        "h1 took a spare"
    );
    assert_eq!(
        net_blocks(&lab, "h2").map(|b| b.len()),
        Ok(1),
        "h2 took a spare"
    );
    for c in [&c1, &c2, &c3] {
        lab.rm(c);
    }
}
