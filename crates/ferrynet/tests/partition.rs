//! Partitions past the lease and grace period (issue 17, part 1), in 3-host labs on etcd with
//! a 2 s lease and a 3 s grace period: hosts cut off from etcd (by an nftables drop in their
//! namespace) for three times that while containers start elsewhere come back with their
//! containers' records, addresses, blocks and producers; no address is ever held twice;
//! traffic to the returned containers flows again. A restart of etcd on its data changes
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::out;
use serde_json::Value;

const NET: &str = "part";

/// Write `value` at `key` in the lab's etcd (its v3 JSON gateway), from `host`'s namespace:
/// what another host's agent, or a store writer, would write.
fn etcd_put(lab: &Lab, host: &str, key: &str, value: &str) {
    let code = format!(
        "import base64,json,urllib.request\n\
         b=lambda s: base64.b64encode(s.encode()).decode()\n\
         d=json.dumps({{'key':b({key:?}),'value':b({value:?})}}).encode()\n\
         urllib.request.urlopen(urllib.request.Request('http://172.31.0.253:2379/v3/kv/put',data=d),timeout=5).read()\n"
    );
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.host_ns(host), "python3", "-c", &code])
        .output()
        .expect("python3");
    assert!(o.status.success(), "etcd put {key}: {}", out(&o));
}

/// Every endpoint of the test network: address -> container ids holding it.
fn holders(lab: &Lab, from: &str) -> BTreeMap<String, Vec<String>> {
    let v: Value = serde_json::from_str(&lab.ok(from, &["network", "inspect", NET])).expect("json");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ep in v["endpoints"].as_array().into_iter().flatten() {
        for ip in ep["ips"].as_array().into_iter().flatten() {
            let a = ip.as_str().unwrap_or_default();
            let a = a.split('/').next().unwrap_or(a).to_string();
            out.entry(a)
                .or_default()
                .push(ep["containerId"].as_str().unwrap_or_default().to_string());
        }
    }
    out
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> Result<(), String>) {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() >= until => panic!("{what} within {secs} s: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// One TCP round trip from container `from` to `addr`:7000.
fn echo(from: &Container, addr: &str) -> Result<(), String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',7000),timeout=2)\ns.sendall(b'ping')\nassert s.recv(4)==b'ping'\n"
    );
    let o = Command::new("ip")
        .args(["netns", "exec", &from.netns(), "python3", "-c", &code])
        .output()
        .expect("python3");
    o.status.success().then_some(()).ok_or_else(|| out(&o))
}

const SERVER: &str = "import socket,threading\n\
    s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
    s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',7000));s.listen(64)\n\
    def serve(c):\n  while True:\n    d=c.recv(4096)\n    if not d: break\n    c.sendall(d)\n  c.close()\n\
    while True:\n  c,_=s.accept();threading.Thread(target=serve,args=(c,),daemon=True).start()\n";

/// `NET` on h1: blocks of 8 addresses, so a few containers make a host claim another block.
fn create_net(lab: &Lab) {
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            NET,
            "--backend",
            "vxlan",
            "--subnet",
            "10.77.0.0/24",
            "--subnet",
            "fd77::/64",
            "--block-size",
            "29",
            "--block-size6",
            "125",
        ],
    );
}

const LAB_ARGS: [&str; 8] = [
    "--hosts",
    "3",
    "--backend",
    "vxlan",
    "--grace",
    "3s",
    "--lease-ttl",
    "2s",
];

/// Cut `isolated` off for 15 s (3x lease + grace) while `busy` hosts start containers that
/// need new blocks, heal, and check that the isolated hosts' containers are back whole.
fn partition_and_heal(name: &str, isolated: &[&str], busy: &[&str]) {
    let mut lab = Lab::up(name, &LAB_ARGS);
    create_net(&lab);
    let mut victims = Vec::new();
    for h in isolated {
        let c = lab.run_on(
            h,
            &format!("v{h}"),
            NET,
            &["--service", &format!("p{h}:7000")],
            &["python3", "-c", SERVER],
        );
        victims.push(c);
    }
    let client_host = busy[0];
    let client = lab.run_on(client_host, "cl", NET, &[], &["python3", "-c", SERVER]);
    for v in &victims {
        wait("first contact", 20, || echo(&client, &v.v4));
    }
    for h in isolated {
        lab.cut_from_store(h, true);
    }
    // The busy side releases the isolated hosts' records after lease and grace.
    wait("release of the isolated hosts", 40, || {
        let held = holders(&lab, client_host);
        match victims.iter().find(|v| held.contains_key(&v.v4)) {
            Some(v) => Err(format!("{} still recorded", v.name)),
            None => Ok(()),
        }
    });
    // Meanwhile the busy hosts grow: 10 containers each need a second block of 8.
    for h in busy {
        for i in 0..10 {
            lab.run_on(h, &format!("g{h}{i}"), NET, &[], &["sleep", "600"]);
        }
    }
    std::thread::sleep(Duration::from_secs(8));
    for h in isolated {
        lab.cut_from_store(h, false);
    }
    // Back: every isolated container is recorded again, with its own address.
    wait("re-assertion", 40, || {
        let held = holders(&lab, client_host);
        for v in &victims {
            for ip in &v.ips {
                match held.get(ip) {
                    Some(ids) if ids.len() == 1 => {}
                    other => return Err(format!("{} of {}: {other:?}", ip, v.name)),
                }
            }
        }
        Ok(())
    });
    // No address is held twice, by the store's records.
    let held = holders(&lab, client_host);
    let twice: Vec<_> = held.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "addresses held twice: {twice:?}");
    // Nor among the containers the hosts run: each address belongs to one container.
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for h in ["h1", "h2", "h3"] {
        let v: Vec<Value> = serde_json::from_str(&lab.ok(h, &["ps", "--json"])).unwrap();
        for c in v {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            for ip in c["ips"].as_array().into_iter().flatten() {
                let ip = ip.as_str().unwrap_or_default().to_string();
                let prev = owner.insert(ip.clone(), name.clone());
                assert!(
                    prev.is_none_or(|p| p == name),
                    "address {ip} runs in two containers"
                );
            }
        }
    }
    for (h, v) in isolated.iter().zip(&victims) {
        let st = lab.status(h);
        assert!(
            st["reassert"]["restored"].as_u64().unwrap_or(0) >= 1,
            "{h}: {}",
            st["reassert"]
        );
        assert_eq!(st["reassert"]["conflicts"], serde_json::json!([]), "{h}");
        // Its producer is back.
        let svc: Value =
            serde_json::from_str(&lab.ok(client_host, &["service", "inspect", &format!("p{h}")]))
                .expect("json");
        assert!(
            svc.to_string().contains(&v.v4),
            "{h}'s producer not back: {svc}"
        );
        // And the data path: routes to its block again on the busy side.
        wait("traffic to the returned container", 30, || {
            echo(&client, &v.v4)
        });
    }
}

#[test]
fn one_host_cut_off_past_its_grace_period_comes_back_whole() {
    partition_and_heal("ptone", &["h2"], &["h1", "h3"]);
}

#[test]
fn the_majority_cut_off_comes_back_whole() {
    partition_and_heal("ptmaj", &["h1", "h3"], &["h2"]);
}

/// The first address of a `ferrynet status` move list entry's `to` of a family.
fn moved_to(m: &Value, v6: bool) -> String {
    m["to"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.split('/').next())
        .find(|a| a.contains(':') == v6)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_container_whose_block_another_host_took_moves_to_a_block_of_its_own_host() {
    let mut lab = Lab::up("ptmove", &LAB_ARGS);
    create_net(&lab);
    let v = lab.run_on(
        "h2",
        "vmv",
        NET,
        &["--service", "pmv:7000"],
        &["python3", "-c", SERVER],
    );
    let client = lab.run_on("h1", "cl", NET, &[], &["python3", "-c", SERVER]);
    wait("first contact", 20, || echo(&client, &v.v4));
    lab.cut_from_store("h2", true);
    wait("release of h2", 40, || {
        match holders(&lab, "h1").contains_key(&v.v4) {
            true => Err(format!("{} still recorded", v.name)),
            false => Ok(()),
        }
    });
    // Meanwhile h3 takes the block of the container's IPv4 address.
    let a: std::net::Ipv4Addr = v.v4.parse().expect("v4");
    let block = std::net::Ipv4Addr::from(u32::from(a) & !7);
    let key = format!("/ferrynet/v1/blocks/{NET}/{block}_29");
    etcd_put(&lab, "h1", &key, r#"{"host":"h3"}"#);
    lab.cut_from_store("h2", false);
    wait("the move", 40, || {
        let st = lab.status("h2");
        match st["reassert"]["moved"].as_array().map_or(0, Vec::len) {
            1 => Ok(()),
            _ => Err(st["reassert"].to_string()),
        }
    });
    let st = lab.status("h2");
    let m = &st["reassert"]["moved"][0];
    assert_eq!(st["reassert"]["conflicts"], serde_json::json!([]), "{st}");
    assert_eq!(m["container"], v.name.as_str(), "{m}");
    assert!(
        m["reason"].as_str().unwrap_or_default().contains("h3"),
        "{m}"
    );
    let new4 = moved_to(m, false);
    let n: std::net::Ipv4Addr = new4.parse().expect("moved v4");
    assert_ne!(
        u32::from(n) & !7,
        u32::from(block),
        "still in the taken block: {m}"
    );
    // Its IPv6 address was in a block nobody took: kept.
    assert_eq!(moved_to(m, true), v.v6, "{m}");
    // The store: the new address held once, by the container; nothing held twice.
    let held = holders(&lab, "h1");
    assert_eq!(held.get(&new4), Some(&vec![v.name.clone()]), "{held:?}");
    assert!(
        held.get(&v.v4).is_none_or(|ids| !ids.contains(&v.name)),
        "{held:?}"
    );
    assert!(held.values().all(|ids| ids.len() == 1), "{held:?}");
    // The container itself: the new address, not the old one.
    let o = Command::new("ip")
        .args(["-n", &v.netns(), "-j", "addr", "show"])
        .output()
        .expect("ip");
    let addrs = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        addrs.contains(&format!("\"{new4}\"")) && !addrs.contains(&format!("\"{}\"", v.v4)),
        "{addrs}"
    );
    // h2's bridge gave up the taken block's gateway (the block is h3's to route now).
    let gw = std::net::Ipv4Addr::from(u32::from(block) + 1).to_string();
    let o = Command::new("ip")
        .args(["-n", &lab.host_ns("h2"), "-j", "addr", "show"])
        .output()
        .expect("ip");
    let host_addrs = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        !host_addrs.contains(&format!("\"{gw}\"")),
        "{gw} still on h2: {host_addrs}"
    );
    // ps shows it, its producer follows, DNS answers it.
    assert!(lab.ok("h2", &["ps", "--json"]).contains(&new4));
    wait("the producer's new address", 30, || {
        let svc = lab.ok("h1", &["service", "inspect", "pmv"]);
        svc.contains(&new4).then_some(()).ok_or(svc)
    });
    let rc = lab.ok(
        "h1",
        &["exec", &client.name, "--", "cat", "/etc/resolv.conf"],
    );
    let ns = rc
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(str::trim)
        .find(|s| !s.contains(':'))
        .unwrap_or_else(|| panic!("no IPv4 nameserver: {rc}"))
        .to_string();
    let fq = format!("{}.{NET}.ferrynet.internal", v.name);
    wait("DNS answering the new address", 30, || {
        let at = format!("@{ns}");
        let args = [
            "exec",
            &client.name,
            "--",
            "dig",
            "+short",
            "+tries=1",
            "+time=8",
        ];
        let mut args = args.to_vec();
        args.extend_from_slice(&[&at, &fq, "A"]);
        let got = lab.ok("h1", &args);
        (got.trim() == new4).then_some(()).ok_or(got)
    });
    // Traffic from another host's container reaches it at its new address.
    wait("traffic to the moved container", 30, || {
        echo(&client, &new4)
    });
}
