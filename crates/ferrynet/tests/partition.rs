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

/// The block claims of the test network in the lab's etcd, read from `host`'s namespace:
/// block (as keyed, `_` for `/`) -> owner.
fn store_blocks(lab: &Lab, host: &str) -> BTreeMap<String, String> {
    let prefix = format!("/ferrynet/v1/blocks/{NET}/");
    let code = format!(
        "import base64,json,urllib.request\n\
         b=lambda s: base64.b64encode(s.encode()).decode()\n\
         p={prefix:?}\n\
         end=p[:-1]+chr(ord(p[-1])+1)\n\
         d=json.dumps({{'key':b(p),'range_end':b(end)}}).encode()\n\
         r=json.load(urllib.request.urlopen(urllib.request.Request('http://172.31.0.253:2379/v3/kv/range',data=d),timeout=5))\n\
         for kv in r.get('kvs',[]):\n  \
         k=base64.b64decode(kv['key']).decode()[len(p):]\n  \
         print(k, json.loads(base64.b64decode(kv['value']))['host'])\n"
    );
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.host_ns(host), "python3", "-c", &code])
        .output()
        .expect("python3");
    assert!(o.status.success(), "etcd range {prefix}: {}", out(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(b, h)| (b.to_string(), h.to_string()))
        .collect()
}

/// The blocks `owner` holds in the store.
fn blocks_of(lab: &Lab, from: &str, owner: &str) -> Vec<String> {
    store_blocks(lab, from)
        .into_iter()
        .filter(|(_, h)| h == owner)
        .map(|(b, _)| b)
        .collect()
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
    // Each isolated host holds its container's blocks and, beside them, an empty spare of
    // each family: all of them must be its own again after the partition.
    let mut before = BTreeMap::new();
    for h in isolated {
        wait("spare blocks", 30, || {
            let mine = blocks_of(&lab, client_host, h);
            let v6 = mine.iter().filter(|b| b.contains(':')).count();
            match (mine.len() - v6 >= 2, v6 >= 2) {
                (true, true) => Ok(()),
                _ => Err(format!("{h}: {mine:?}")),
            }
        });
        before.insert(*h, blocks_of(&lab, client_host, h));
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
    // Each isolated host has every block it had back (the empty spares too): the busy hosts
    // grew into other blocks, and the returning host took its quarantined ones back.
    for h in isolated {
        wait("the isolated host's blocks back", 40, || {
            let now = blocks_of(&lab, client_host, h);
            let missing: Vec<&String> = before[h].iter().filter(|b| !now.contains(b)).collect();
            match missing.is_empty() {
                true => Ok(()),
                false => Err(format!(
                    "{h} lacks {missing:?}; claims: {:?}",
                    store_blocks(&lab, client_host)
                )),
            }
        });
    }
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

/// A TCP connection from `from` to `addr`:7000 held open (idle after one round trip), so
/// the hosts on its path keep a conntrack entry of it; killed with the lab.
fn held_connection(lab: &mut Lab, from: &Container, addr: &str) {
    let code = format!(
        "import socket,time\ns=socket.create_connection(('{addr}',7000),timeout=5)\n\
         s.sendall(b'ping');assert s.recv(4)==b'ping'\nprint('connected',flush=True)\ntime.sleep(900)\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &from.netns(), "python3", "-u", "-c", &code])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    lab.procs.push(common::Proc(child));
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("read");
    assert_eq!(line.trim(), "connected", "TCP connection to {addr}");
}

/// The conntrack entries of `host`'s namespace that name `addr`.
fn conntrack_of(lab: &Lab, host: &str, addr: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.host_ns(host),
            "cat",
            "/proc/net/nf_conntrack",
        ])
        .output()
        .expect("cat");
    let want = [format!("src={addr} "), format!("dst={addr} ")];
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| want.iter().any(|w| l.contains(w.as_str())))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_container_whose_block_another_host_took_moves_to_a_block_of_its_own_host() {
    move_scenario("ptmove", false);
}

/// The same move with the container-side renumbering failing once (fail point
/// `move-renumber`): the agent renumbers it again and it converges.
#[test]
fn a_moved_container_whose_renumbering_failed_converges() {
    move_scenario("ptmvfail", true);
}

fn move_scenario(name: &str, fail_renumber: bool) {
    let mut lab = Lab::up(name, &LAB_ARGS);
    if fail_renumber {
        lab.lab(&["stop-agent", "h2"]);
        let o = Command::new(common::bin())
            .args(["lab", "start-agent", "h2", "--name", &lab.name])
            .env("FERRYNET_FAILPOINT", "move-renumber")
            .output()
            .expect("lab start-agent");
        assert!(o.status.success(), "start-agent: {}", out(&o));
        wait("h2's agent", 30, || {
            let o = lab.exec("h2", &["status", "--json"]);
            o.status.success().then_some(()).ok_or_else(|| out(&o))
        });
    }
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
    // A connection to the old address: h2 keeps a conntrack entry of it.
    held_connection(&mut lab, &client, &v.v4);
    assert!(
        !conntrack_of(&lab, "h2", &v.v4).is_empty(),
        "no conntrack entry of {} on h2",
        v.v4
    );
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
    if fail_renumber {
        assert!(
            m["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("renumbering its interface failed"),
            "the fail point did not fire: {m}"
        );
    }
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
    // The container itself: the new address, not the old one (after a failed renumbering,
    // once the agent renumbered it again).
    wait("the container's interface", 60, || {
        let o = Command::new("ip")
            .args(["-n", &v.netns(), "-j", "addr", "show"])
            .output()
            .expect("ip");
        let addrs = String::from_utf8_lossy(&o.stdout).to_string();
        let done =
            addrs.contains(&format!("\"{new4}\"")) && !addrs.contains(&format!("\"{}\"", v.v4));
        done.then_some(()).ok_or(addrs)
    });
    // h2 forgot the old address's flows (the held connection's entry went with the move).
    wait("conntrack entries of the old address gone", 30, || {
        let left = conntrack_of(&lab, "h2", &v.v4);
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    });
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
