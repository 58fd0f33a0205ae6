//! The Kubernetes node path: a private containerd (Debian's 1.6, CRI plugin on) runs ferrynet
//! as its CNI plugin, and the tests drive it over the CRI gRPC API as a kubelet would
//! (`tests/cri/cri.py`, PyPI's container-runtime-interface-api): RunPodSandbox,
//! PodSandboxStatus, StopPodSandbox, RemovePodSandbox. Each test's containerd runs in a "host"
//! network namespace of its own with ferrynet's state in a temp dir (or on a lab host on etcd),
//! so nothing reaches the machine's namespaces or Docker's containerd.

mod common;

use std::net::IpAddr;

use common::containerd::{eventually, ferrynet_conflist, Containerd, Pod};
use common::lab::Lab as Cluster;
use common::{links_in, out, Lab, Proc};
use ipnet::IpNet;
use serde_json::{json, Value};

/// A node: ferrynet's host namespace and state, and containerd running in it. Fields drop in
/// order: containerd (removing its pods over CRI) before the namespace.
struct Node {
    ctd: Containerd,
    lab: Lab,
    /// The network's name (the conflist's `name`).
    net: String,
}

impl Node {
    /// A node whose conflist defines network `cri<tag>` on `subnets`, with `extra` plugin keys.
    fn new(subnets: &[&str], extra: Value) -> Node {
        let lab = Lab::new();
        let net = format!("cri{}", lab.tag);
        let mut plugin = json!({
            "subnets": subnets.iter().map(|s| json!({"cidr": s})).collect::<Vec<_>>(),
            "stateDir": lab.state.path().display().to_string(),
        });
        if let (Some(p), Some(e)) = (plugin.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                p.insert(k.clone(), v.clone());
            }
        }
        let ctd = Containerd::start(Some(&lab.host.name), &ferrynet_conflist(&net, plugin));
        Node { ctd, lab, net }
    }

    /// `ferrynet network inspect` of this node's network (Null when it does not exist).
    fn inspect(&self) -> Value {
        let o = self.lab.cli(&["network", "inspect", &self.net]);
        if !o.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    /// The endpoint records of this node's network.
    fn endpoints(&self) -> Vec<Value> {
        self.inspect()["endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The endpoint record of pod `p` (its sandbox id is CNI's container id).
    fn endpoint(&self, p: &Pod) -> Option<Value> {
        self.endpoints()
            .into_iter()
            .find(|e| e["containerId"] == p.id.as_str())
    }

    /// Links of the host namespace that ferrynet makes (bridges, host ends of veths, IFB
    /// devices of egress limits).
    fn ferrynet_links(&self) -> Vec<String> {
        links_in(Some(&self.lab.host.name), &["fn-", "fnv", "fnp", "fnb"])
    }

    /// Elements of the anti-spoofing `macs` set (one per container port), as text.
    fn guard_elements(&self) -> String {
        let o = self
            .lab
            .host
            .run(&["nft", "list", "set", "bridge", "ferrynet", "macs"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// nftables tables in the host namespace.
    fn nft_tables(&self) -> String {
        String::from_utf8_lossy(&self.lab.host.run(&["nft", "list", "tables"]).stdout).into_owned()
    }

    /// Nothing of ferrynet's or containerd's pods is left in the node: no sandbox, no pod
    /// netns, no ferrynet link, no endpoint record, no nftables table.
    fn assert_clean(&self, what: &str) {
        assert!(
            self.ctd.pods().is_empty(),
            "{what}: sandboxes {:?}",
            self.ctd.pods()
        );
        assert!(
            self.ctd.netns_files().is_empty(),
            "{what}: pod netns left {:?}",
            self.ctd.netns_files()
        );
        assert!(
            self.ferrynet_links().is_empty(),
            "{what}: links left {:?}",
            self.ferrynet_links()
        );
        assert!(
            self.endpoints().is_empty(),
            "{what}: endpoint records left {:?}",
            self.endpoints()
        );
        let tables = self.nft_tables();
        assert!(
            !tables.contains("ferrynet"),
            "{what}: nft tables left:\n{tables}"
        );
    }
}

/// `addr` lies in one of `subnets`.
fn in_subnets(addr: &str, subnets: &[&str]) -> bool {
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return false;
    };
    subnets
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .any(|n| n.contains(&ip))
}

/// One ping from pod `from` to `addr` succeeds (retried for a few seconds).
fn ping(from: &Pod, addr: &str) {
    eventually(10, &format!("ping {} -> {addr}", from.name), || {
        let o = from.run(&["ping", "-c", "1", "-W", "2", addr]);
        o.status.success().then_some(()).ok_or_else(|| out(&o))
    });
}

/// A TCP server in pod `p` on `port` answering each connection with `reply` and the peer's
/// address; killed by PID on drop.
fn tcp_server(p: &Pod, port: u16, reply: &str) -> Proc {
    common::tcp_server_at(&p.enter(), port, reply)
}

/// Connect from pod `from` to `addr`:`port`; the server's reply line.
fn tcp_get(from: &Pod, addr: &str, port: u16) -> Result<String, String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=3)\nprint(s.recv(200).decode().strip())"
    );
    let o = from.run(&["python3", "-c", &code]);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(out(&o))
    }
}

/// RunPodSandbox on a one-family or dual-stack network: PodSandboxStatus reports exactly the
/// addresses ferrynet gave `eth0` in the pod, from the configured subnets, and the endpoint
/// record carries the sandbox id and the pod's identity (namespace, name, UID, sandbox, the
/// namespace label); Stop/Remove leave nothing.
fn pod_ips_reported(subnets: &[&str]) {
    let node = Node::new(subnets, json!({}));
    let uid = "6f1b1f9e-2d44-4c55-9b6a-0c7f3e0d1a2b";
    let p = node
        .ctd
        .run_pod("web-0", &["--namespace", "team-a", "--uid", uid]);
    assert_eq!(p.ips.len(), subnets.len(), "{p:?}");
    for ip in &p.ips {
        assert!(in_subnets(ip, subnets), "{ip} not in {subnets:?}");
    }
    let mut reported = p.ips.clone();
    reported.sort();
    assert_eq!(p.eth0_addrs(), reported, "addresses in the pod vs CRI");
    // The status is stable when asked again (containerd keeps the CNI result).
    let again = node.ctd.status(&p.id);
    assert_eq!(again["state"], "SANDBOX_READY");
    assert_eq!(again["ips"], json!(p.ips));
    let ep = node
        .endpoint(&p)
        .unwrap_or_else(|| panic!("no endpoint record for {}: {:?}", p.id, node.endpoints()));
    // The pod's identity from CNI_ARGS, and its namespace as a label.
    assert_eq!(
        ep["pod"],
        json!({"namespace": "team-a", "name": "web-0", "uid": uid, "infraContainerId": p.id}),
        "{ep}"
    );
    assert_eq!(ep["labels"]["namespace"], "team-a", "{ep}");
    let mut recorded: Vec<String> = ep["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str()?.split('/').next().map(str::to_string))
        .collect();
    recorded.sort();
    assert_eq!(recorded, reported, "{ep}");
    node.ctd.stop_pod(&p.id);
    node.ctd.remove_pod(&p.id);
    node.assert_clean("after Stop+Remove");
}

#[test]
fn pod_ips_ipv4() {
    pod_ips_reported(&["10.231.1.0/24"]);
}

#[test]
fn pod_ips_ipv6() {
    pod_ips_reported(&["fd23:2::/64"]);
}

#[test]
fn pod_ips_dual_stack() {
    pod_ips_reported(&["10.231.3.0/24", "fd23:3::/64"]);
}

/// Two pods on one node reach each other over IPv4 and IPv6 (ping and TCP, both ways), and
/// the server sees the client pod's own address (no NAT between pods).
#[test]
fn pod_to_pod_one_host() {
    let node = Node::new(&["10.231.4.0/24", "fd23:4::/64"], json!({}));
    let a = node.ctd.run_pod("a", &[]);
    let b = node.ctd.run_pod("b", &[]);
    for (from, to) in [(&a, &b), (&b, &a)] {
        ping(from, &to.v4());
        ping(from, &to.v6());
    }
    let _sa = tcp_server(&a, 8080, "from-a");
    let _sb = tcp_server(&b, 8080, "from-b");
    for (from, to, reply) in [(&a, &b, "from-b"), (&b, &a, "from-a")] {
        for (addr, src) in [(to.v4(), from.v4()), (to.v6(), from.v6())] {
            let got = tcp_get(from, &addr, 8080).unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(got, format!("{reply} {src}"), "{} -> {addr}", from.name);
        }
    }
}

/// StopPodSandbox releases the pod's network (its veth, its egress limit's IFB device, guard
/// elements, endpoint record and netns) while the other pod keeps working; RemovePodSandbox forgets it; the last pod's
/// removal also takes the network's bridge and nftables tables.
#[test]
fn stop_and_remove_release_everything() {
    let node = Node::new(&["10.231.5.0/24", "fd23:5::/64"], json!({}));
    let a = node
        .ctd
        .run_pod("a", &["--annotation", "kubernetes.io/egress-bandwidth=50M"]);
    let b = node.ctd.run_pod("b", &[]);
    let ep_a = node.endpoint(&a).expect("a's endpoint");
    let veth_a = ep_a["hostVeth"]
        .as_str()
        .unwrap_or_else(|| panic!("host veth of a: {ep_a}"))
        .to_string();
    let ifb_a = veth_a.replacen("fnv", "fnb", 1);
    assert!(node.ferrynet_links().contains(&veth_a));
    assert!(
        node.ferrynet_links().contains(&ifb_a),
        "{:?}",
        node.ferrynet_links()
    );
    assert!(
        node.guard_elements().contains(&veth_a),
        "{}",
        node.guard_elements()
    );
    assert_eq!(node.ctd.netns_files().len(), 2);

    node.ctd.stop_pod(&a.id);
    assert!(
        !node.ferrynet_links().contains(&ifb_a),
        "{:?}",
        node.ferrynet_links()
    );
    assert!(
        !node.ferrynet_links().contains(&veth_a),
        "{:?}",
        node.ferrynet_links()
    );
    assert!(
        !node.guard_elements().contains(&veth_a),
        "{}",
        node.guard_elements()
    );
    assert!(node.endpoint(&a).is_none(), "{:?}", node.endpoints());
    assert!(node.endpoint(&b).is_some());
    assert_eq!(
        node.ctd.netns_files().len(),
        1,
        "a's netns stays after Stop"
    );
    // A stopped sandbox is still listed until removed, NOTREADY.
    let st = node.ctd.status(&a.id);
    assert_eq!(st["state"], "SANDBOX_NOTREADY", "{st}");
    // b is untouched: the host still reaches it.
    let o = node.lab.host.run(&["ping", "-c", "1", "-W", "2", &b.v4()]);
    assert!(o.status.success(), "host -> b: {}", out(&o));

    node.ctd.remove_pod(&a.id);
    assert!(node.ctd.pods().iter().all(|(id, _, _)| *id != a.id));
    node.ctd.stop_pod(&b.id);
    node.ctd.remove_pod(&b.id);
    node.assert_clean("after the last pod");
    assert!(
        node.inspect().is_null(),
        "network record left: {}",
        node.inspect()
    );
}

/// containerd killed (-9) and later stopped (SIGTERM) with pods running: the pods keep their
/// addresses and talk throughout, a restarted containerd reports them ready with the same IPs,
/// starts new pods, and a later Stop/Remove still cleans up everything.
#[test]
fn containerd_restart_keeps_pods() {
    let mut node = Node::new(&["10.231.6.0/24", "fd23:6::/64"], json!({}));
    let a = node.ctd.run_pod("a", &[]);
    let b = node.ctd.run_pod("b", &[]);
    let _sb = tcp_server(&b, 8080, "b");
    for restart in ["kill -9", "SIGTERM"] {
        if restart == "kill -9" {
            node.ctd.kill();
        } else {
            node.ctd.stop();
        }
        // No containerd at all: the pods' networking is the kernel's, it keeps working.
        for addr in [b.v4(), b.v6()] {
            let got = tcp_get(&a, &addr, 8080).unwrap_or_else(|e| panic!("{restart}: {e}"));
            assert_eq!(
                got,
                format!("b {}", if addr.contains(':') { a.v6() } else { a.v4() })
            );
        }
        node.ctd.start_again();
        for p in [&a, &b] {
            let st = node.ctd.status(&p.id);
            assert_eq!(st["state"], "SANDBOX_READY", "{restart}: {st}");
            assert_eq!(st["ips"], json!(p.ips), "{restart}: {st}");
        }
        ping(&a, &b.v6());
        ping(&b, &a.v4());
    }
    // A new pod after the restarts gets a fresh address and reaches the old ones.
    let c = node.ctd.run_pod("c", &[]);
    assert!(
        !c.ips.iter().any(|i| a.ips.contains(i) || b.ips.contains(i)),
        "{c:?}"
    );
    assert_eq!(
        tcp_get(&c, &b.v4(), 8080).expect("c -> b"),
        format!("b {}", c.v4())
    );
    for p in [&a, &b, &c] {
        node.ctd.stop_pod(&p.id);
        node.ctd.remove_pod(&p.id);
    }
    node.assert_clean("after removing the pods of a restarted containerd");
}

/// A conflist with an invalid option: RunPodSandbox fails with ferrynet's message and leaves no
/// sandbox, netns, link, record or table behind.
#[test]
fn failed_add_with_an_invalid_option_leaves_nothing() {
    let node = Node::new(&["10.231.7.0/24"], json!({"ipMasq": "sometimes"}));
    let err = node
        .ctd
        .try_run_pod("bad", &[])
        .expect_err("RunPodSandbox with an invalid ipMasq");
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(msg.contains("ipMasq"), "{err}");
    node.assert_clean("after a refused ADD");
    assert!(
        node.inspect().is_null(),
        "network record: {}",
        node.inspect()
    );
}

/// A subnet with room for one pod: the second RunPodSandbox fails (no address left) without
/// leftovers and without disturbing the first pod; once the first is removed its address is
/// free again and a new pod gets it.
#[test]
fn failed_add_on_an_exhausted_subnet_leaves_nothing() {
    let node = Node::new(&["10.231.8.0/30"], json!({}));
    let first = node.ctd.run_pod("first", &[]);
    assert_eq!(first.ips, vec!["10.231.8.2".to_string()], "{first:?}");
    let links_before = node.ferrynet_links();
    let err = node
        .ctd
        .try_run_pod("second", &[])
        .expect_err("RunPodSandbox on a full subnet");
    assert_eq!(node.ctd.pods().len(), 1, "{:?}", node.ctd.pods());
    assert_eq!(
        node.ctd.netns_files().len(),
        1,
        "{:?}",
        node.ctd.netns_files()
    );
    assert_eq!(node.ferrynet_links(), links_before, "{err}");
    assert_eq!(node.endpoints().len(), 1, "{:?}", node.endpoints());
    let o = node
        .lab
        .host
        .run(&["ping", "-c", "1", "-W", "2", &first.v4()]);
    assert!(o.status.success(), "host -> first: {}", out(&o));

    node.ctd.stop_pod(&first.id);
    node.ctd.remove_pod(&first.id);
    let third = node.ctd.run_pod("third", &[]);
    assert_eq!(third.ips, first.ips, "the released address is given again");
    node.ctd.stop_pod(&third.id);
    node.ctd.remove_pod(&third.id);
    node.assert_clean("after the last pod");
}

/// Two lab hosts on etcd (VXLAN) named `name`, each with its own containerd in its namespace
/// and the conflist `ferrynet install-cni` writes there. The lab is dropped after the
/// containerds (declare the tuple's parts in this order).
fn two_hosts(name: &str) -> (Cluster, Vec<Containerd>) {
    let cluster = Cluster::up(name, &["--hosts", "2", "--backend", "vxlan"]);
    let mut ctds = Vec::new();
    for h in ["h1", "h2"] {
        let ctd = Containerd::start_with(Some(&cluster.host_ns(h)), None);
        let bin_dir = ctd.cni_bin.display().to_string();
        let conf_dir = ctd.cni_conf.display().to_string();
        cluster.ok(
            h,
            &[
                "install-cni",
                "--bin-dir",
                &bin_dir,
                "--conf-dir",
                &conf_dir,
                "--network",
                "fabric",
            ],
        );
        ctd.wait_network_ready();
        ctds.push(ctd);
    }
    (cluster, ctds)
}

/// Two lab hosts on etcd (VXLAN), each with its own containerd in its namespace and the
/// conflist `ferrynet install-cni` writes: pods on different hosts reach each other over IPv4
/// and IPv6 (ping and TCP, real source addresses), find each other by name through the
/// agent's DNS, and a removed pod leaves no record, name or link on its host.
#[test]
fn pod_to_pod_across_two_hosts() {
    let (cluster, ctds) = two_hosts("cri2h");
    let a = ctds[0].run_pod("pod-a", &["--namespace", "team-a"]);
    let b = ctds[1].run_pod("pod-b", &["--namespace", "team-b"]);
    assert!(in_subnets(&a.v4(), &["10.20.0.0/16"]) && in_subnets(&b.v6(), &["fd20::/64"]));
    for (from, to) in [(&a, &b), (&b, &a)] {
        ping(from, &to.v4());
        ping(from, &to.v6());
    }
    let _sb = tcp_server(&b, 8080, "b");
    for (addr, src) in [(b.v4(), a.v4()), (b.v6(), a.v6())] {
        let got = tcp_get(&a, &addr, 8080).unwrap_or_else(|e| panic!("a -> {addr}: {e}"));
        assert_eq!(got, format!("b {src}"));
    }
    // The agents' DNS: b as POD.NAMESPACE from a, through a's gateway, as asked and in the
    // network's zone.
    let gw = default_gateway(&a);
    let fq_b = "pod-b.team-b.fabric.ferrynet.internal";
    eventually(20, "pod-b in DNS", || {
        let got = dig(&a, &gw, fq_b);
        (got == b.v4()).then_some(()).ok_or(got)
    });
    assert_eq!(dig(&a, &gw, "pod-b.team-b"), b.v4());

    let inspect = |h: &str| -> Value {
        serde_json::from_str(&cluster.ok(h, &["network", "inspect", "fabric"])).expect("json")
    };
    let has = |v: &Value, p: &Pod| {
        v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e.to_string().contains(&p.id))
    };
    assert!(has(&inspect("h1"), &b), "b's record is in the shared store");
    ctds[1].stop_pod(&b.id);
    ctds[1].remove_pod(&b.id);
    assert!(!has(&inspect("h1"), &b), "b's record left");
    assert!(
        links_in(Some(&cluster.host_ns("h2")), &["fnv", "fnp"]).is_empty(),
        "veths left on h2"
    );
    assert!(ctds[1].netns_files().is_empty());
    eventually(20, "pod-b gone from DNS", || {
        let got = dig(&a, &gw, fq_b);
        got.is_empty().then_some(()).ok_or(got)
    });
    ctds[0].stop_pod(&a.id);
    ctds[0].remove_pod(&a.id);
    assert!(!has(&inspect("h2"), &a), "a's record left");
    drop(ctds);
    drop(cluster);
}

/// A pod asking for a hostPort the hosts need -- DNS (53, the agent's server on the gateways),
/// the VXLAN port, SSH, etcd -- on any host address is refused, naming the port and its user,
/// and leaves nothing; the other pods' DNS and the cross-host fabric keep working.
#[test]
fn a_pod_cannot_take_a_port_the_hosts_need() {
    let (cluster, ctds) = two_hosts("cri2r");
    let a = ctds[0].run_pod("pod-a", &[]);
    let b = ctds[1].run_pod("pod-b", &[]);
    let gw = default_gateway(&a);
    let fq_b = "pod-b.default.fabric.ferrynet.internal";
    eventually(20, "pod-b in DNS", || {
        let got = dig(&a, &gw, fq_b);
        (got == b.v4()).then_some(()).ok_or(got)
    });
    let gw_port = format!("53:5353/udp@{gw}");
    for (port, what) in [
        ("53:5353/udp", "DNS"),
        (gw_port.as_str(), "DNS"),
        ("53:5353/tcp", "DNS"),
        ("4789:4789/udp", "VXLAN"),
        ("22:2222/tcp@0.0.0.0", "SSH"),
        ("2379:2379/tcp", "etcd"),
    ] {
        let err = ctds[0]
            .try_run_pod("evil", &["--port", port])
            .expect_err(port);
        let msg = err["message"].as_str().unwrap_or_default();
        let host_port = port.split(':').next().unwrap_or_default();
        assert!(
            msg.contains(&format!("hostPort {host_port}/")) && msg.contains(what),
            "{port}: {err}"
        );
        assert_eq!(ctds[0].pods().len(), 1, "{port}: {:?}", ctds[0].pods());
        assert_eq!(ctds[0].netns_files().len(), 1, "{port}");
        assert_eq!(
            links_in(Some(&cluster.host_ns("h1")), &["fnv"]).len(),
            1,
            "{port}: veths on h1"
        );
    }
    assert_eq!(dig(&a, &gw, fq_b), b.v4(), "DNS through the gateway");
    ping(&a, &b.v4());
    ping(&b, &a.v6());
    drop(ctds);
    drop(cluster);
}

/// hostPort as containerd sends it (`HostPort`, `HostIP`…): without hostIP and with `0.0.0.0`
/// or `::` on every address of its family, with a host address only there; the client's
/// address reaches the pod; a second pod asking for a port taken on an overlapping address is
/// refused without leftovers; Stop withdraws the ports.
#[test]
fn host_port_with_and_without_host_ip() {
    let node = Node::new(&["10.231.9.0/24", "fd23:9::/64"], json!({}));
    let t = common::tag();
    let client = common::Ns::new("o");
    let other = common::Ns::new("o");
    common::wire_client(
        Some(&node.lab.host),
        &client,
        &format!("fta{t}"),
        "10.250.91.1",
        "10.250.91.2",
    );
    common::wire_client(
        Some(&node.lab.host),
        &other,
        &format!("ftb{t}"),
        "10.250.92.1",
        "10.250.92.2",
    );
    node.lab.host.must(&[
        "ip",
        "addr",
        "add",
        "fd50:91::1/64",
        "dev",
        &format!("fta{t}"),
        "nodad",
    ]);
    client.must(&["ip", "addr", "add", "fd50:91::2/64", "dev", "ext0", "nodad"]);
    client.must(&["ip", "-6", "route", "add", "default", "via", "fd50:91::1"]);

    let a = node.ctd.run_pod(
        "a",
        &[
            "--port",
            "18090:8080",
            "--port",
            "18091:8080@0.0.0.0",
            "--port",
            "18093:8080@::",
        ],
    );
    let b = node.ctd.run_pod("b", &["--port", "18092:8080@10.250.91.1"]);
    let _sa = tcp_server(&a, 8080, "a");
    let _sb = tcp_server(&b, 8080, "b");
    let get = |ns: &common::Ns, addr: &str, port: u16| common::tcp_get(ns, addr, port);
    let answers = [
        (&client, "10.250.91.1", 18090, Some("a 10.250.91.2")),
        (&client, "10.250.91.1", 18091, Some("a 10.250.91.2")),
        (&client, "10.250.91.1", 18092, Some("b 10.250.91.2")),
        (&other, "10.250.92.1", 18090, Some("a 10.250.92.2")),
        (&other, "10.250.92.1", 18091, Some("a 10.250.92.2")),
        // hostIP 10.250.91.1: not on the host's other address.
        (&other, "10.250.92.1", 18092, None),
        (&client, "fd50:91::1", 18090, Some("a fd50:91::2")),
        (&client, "fd50:91::1", 18093, Some("a fd50:91::2")),
        // 0.0.0.0 is every IPv4 address, not IPv6 ones; :: the other way round.
        (&client, "fd50:91::1", 18091, None),
        (&client, "10.250.91.1", 18093, None),
    ];
    for (ns, addr, port, want) in answers {
        assert_eq!(
            get(ns, addr, port).as_deref(),
            want,
            "{addr}:{port} from {}",
            ns.name
        );
    }
    let rec = node.endpoint(&a).expect("a's record");
    assert_eq!(
        rec["portMappings"].as_array().map(Vec::len),
        Some(3),
        "{rec}"
    );

    // Taken: 18090 on every address; 18092 on 10.250.91.1 (also 0.0.0.0's).
    let links = node.ferrynet_links();
    for port in ["18090:80", "18092:80@0.0.0.0"] {
        let err = node
            .ctd
            .try_run_pod("c", &["--port", port])
            .expect_err(port);
        assert!(err.to_string().contains("1809"), "{port}: {err}");
        assert_eq!(node.ctd.pods().len(), 2, "{port}: {:?}", node.ctd.pods());
        assert_eq!(node.ferrynet_links(), links, "{port}");
    }
    let maps = |n: &Node| -> Vec<usize> {
        ["pm4_any", "pm6_any", "pm4_ip", "pm6_ip"]
            .iter()
            .map(|m| n.lab.map_len(m))
            .collect()
    };
    // a: 18090 in both families, 18091 IPv4, 18093 IPv6; b: 18092 on one IPv4 address.
    assert_eq!(maps(&node), vec![2, 2, 1, 0], "port map elements");
    node.ctd.stop_pod(&a.id);
    assert_eq!(
        maps(&node),
        vec![0, 0, 1, 0],
        "port map elements after Stop"
    );
    assert_eq!(get(&client, "10.250.91.1", 18090), None, "18090 after Stop");
    assert_eq!(get(&client, "fd50:91::1", 18093), None, "18093 after Stop");
    assert_eq!(
        get(&client, "10.250.91.1", 18092).as_deref(),
        Some("b 10.250.91.2"),
        "b keeps its port"
    );
    node.ctd.remove_pod(&a.id);
    node.ctd.stop_pod(&b.id);
    node.ctd.remove_pod(&b.id);
    node.assert_clean("after the last pod");
}

/// iperf3 from `from` (`nsenter` argument) to `addr` (`-R`: the other way); receiver's bit/s
/// after the first `omit` seconds.
fn iperf(from: &str, addr: &str, reverse: bool, omit: u32, secs: u32) -> f64 {
    let (o, t) = (omit.to_string(), secs.to_string());
    let mut args = vec![
        "nsenter", from, "iperf3", "-c", addr, "-J", "-O", &o, "-t", &t,
    ];
    if reverse {
        args.push("-R");
    }
    let o = common::sh(&args);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 {args:?}: {}", out(&o)))
}

/// The pod annotations `kubernetes.io/ingress-bandwidth` / `egress-bandwidth` (which
/// containerd turns into the `bandwidth` capability) limit the pod: iperf3 measures the limit
/// in each direction, once the bucket is spent, while an unannotated pod runs much faster.
#[test]
fn bandwidth_limited_pod() {
    common::need("iperf3", "iperf3");
    let node = Node::new(&["10.231.10.0/24"], json!({}));
    let limit = 20_000_000.0;
    let slow = node.ctd.run_pod(
        "slow",
        &[
            "--annotation",
            "kubernetes.io/ingress-bandwidth=20M",
            "--annotation",
            "kubernetes.io/egress-bandwidth=20M",
        ],
    );
    let fast = node.ctd.run_pod("fast", &[]);
    let host = node.lab.host.enter();
    let mut rates = Vec::new();
    for p in [&slow, &fast] {
        let server = std::process::Command::new("nsenter")
            .args([&p.enter(), "iperf3", "-s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        let _server = Proc(server);
        eventually(10, "iperf3 listening", || {
            let o = p.run(&["ss", "-ltnH", "sport", "=", ":5201"]);
            (!String::from_utf8_lossy(&o.stdout).trim().is_empty())
                .then_some(())
                .ok_or_else(|| out(&o))
        });
        // To the pod (its ingress), then from it (its egress). containerd asks for a burst of
        // 2^32-1 bits (512 MiB) with every limit, as the kubelet once did; like the reference
        // plugin, ferrynet gives that bucket, so the limit shows once it is spent: the first
        // seconds are left out of the measurement.
        let (omit, secs) = if p.name == "slow" { (6, 4) } else { (0, 2) };
        rates.push((
            iperf(&host, &p.v4(), false, omit, secs),
            iperf(&host, &p.v4(), true, omit, secs),
        ));
    }
    let (slow_in, slow_out) = rates[0];
    let (fast_in, fast_out) = rates[1];
    let show =
        format!("slow {slow_in:.0}/{slow_out:.0} bit/s, fast {fast_in:.0}/{fast_out:.0} bit/s");
    eprintln!("measured: {show}");
    assert!(
        slow_in < 1.5 * limit && slow_in > 0.3 * limit,
        "ingress: {show}"
    );
    assert!(
        slow_out < 1.5 * limit && slow_out > 0.3 * limit,
        "egress: {show}"
    );
    assert!(
        fast_in > 5.0 * limit && fast_out > 5.0 * limit,
        "unlimited: {show}"
    );
}

/// The pod's default IPv4 gateway.
fn default_gateway(p: &Pod) -> String {
    let v: Value = serde_json::from_str(&p.must(&["ip", "-j", "-4", "route", "show", "default"]))
        .expect("json");
    v[0]["gateway"]
        .as_str()
        .expect("default gateway")
        .to_string()
}

/// `dig +short NAME A` from pod `p` against `server`.
fn dig(p: &Pod, server: &str, name: &str) -> String {
    let at = format!("@{server}");
    let o = p.run(&["dig", "+short", "+tries=1", "+time=5", &at, name, "A"]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
