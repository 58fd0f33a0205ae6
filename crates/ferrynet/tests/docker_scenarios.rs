//! What a Docker user does with a network plugin, against the machine's real Docker engine:
//! `docker network connect`/`disconnect`, stop/start/restart/pause, every form of `-p`, fixed
//! addresses and MACs, internal networks, `docker network inspect`/`prune`, creation errors,
//! docker-compose, and many short-lived containers.
//!
//! Each test serves the plugin under its own driver name with its own state directory and sets
//! up once for a group of scenarios (see `common::docker`). Cleanliness is checked on what the
//! test itself made (the veths and bridges its plugin recorded, the ports and subnets it used),
//! so another ferrynet on the host does not disturb the checks.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use common::docker::*;
use common::{out, sh, tag, Ns, Proc};
use ferrynet_model::names::{host_veth_name, temp_peer_name};
use serde_json::{json, Value};

/// Everything of a plugin's store under `prefix`, as (key, JSON value).
fn records(plugin: &Plugin, prefix: &str) -> Vec<(String, Value)> {
    let store = ferrynet_store::EmbeddedStore::open(plugin.state.path().join("store.redb"))
        .expect("open the store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (kvs, _) = rt
        .block_on(ferrynet_store::Store::range(&store, prefix))
        .expect("read the store");
    kvs.into_iter()
        .map(|kv| {
            let v = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            (kv.key, v)
        })
        .collect()
}

/// The endpoint records of a plugin: one per Docker endpoint that exists.
fn endpoints(plugin: &Plugin) -> Vec<Value> {
    records(plugin, "/ferrynet/v1/endpoints/")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Addresses held on a ferrynet network (by containers and aux addresses; the gateway is the
/// network's own).
fn held_addresses(plugin: &Plugin, network: &str) -> Vec<String> {
    records(plugin, &format!("/ferrynet/v1/ipam/{network}/"))
        .into_iter()
        .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
        .filter(|a| a.contains('.') || a.contains(':'))
        .collect()
}

/// Kernel objects a test's plugin made, noted while they exist and checked gone at the end.
#[derive(Default)]
struct Seen {
    links: BTreeSet<String>,
}

impl Seen {
    /// Note the host veths, temporary peers and bridges of every current record.
    fn note(&mut self, plugin: &Plugin) {
        for ep in endpoints(plugin) {
            let (Some(net), Some(id), Some(ifname)) = (
                ep["network"].as_str(),
                ep["containerId"].as_str(),
                ep["ifname"].as_str(),
            ) else {
                continue;
            };
            self.links.insert(host_veth_name(net, id, ifname));
            self.links.insert(temp_peer_name(net, id, ifname));
            if let Some(h) = ep["hostVeth"].as_str() {
                self.links.insert(h.to_string());
            }
        }
        for (_, n) in records(plugin, "/ferrynet/v1/networks/") {
            if let Some(b) = n["bridge"].as_str() {
                self.links.insert(b.to_string());
            }
        }
    }

    /// Note the veths of every endpoint the plugin ever created, from its log (short-lived
    /// containers come and go between two looks at the store).
    fn note_log(&mut self, plugin: &Plugin) {
        for line in plugin.log_text().lines() {
            if !line.contains("Docker endpoint created") {
                continue;
            }
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_string)
            };
            if let (Some(id), Some(net)) = (field("endpoint="), field("network=")) {
                self.links.insert(host_veth_name(&net, &id, "docker"));
                self.links.insert(temp_peer_name(&net, &id, "docker"));
            }
        }
    }

    /// The noted links that still exist.
    fn left(&self) -> Vec<String> {
        let now: BTreeSet<String> = host_links(&["fn"]).into_iter().collect();
        self.links.intersection(&now).cloned().collect()
    }
}

/// The text of ferrynet's four port maps in the host namespace (empty without the table).
fn port_maps() -> String {
    ["pm4_any", "pm4_ip", "pm6_any", "pm6_ip"]
        .iter()
        .map(|m| out(&sh(&["nft", "list", "map", "inet", "ferrynet", m])))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether any of ferrynet's port maps publishes host port `port`.
fn published(port: u16) -> bool {
    port_maps().contains(&format!(" {port} : "))
}

/// Assert the end state: no record in the plugin's store, none of the noted links, nothing in
/// the port maps or the table pointing into `prefixes` (the test's subnets).
fn assert_clean(plugin: &Plugin, seen: &mut Seen, prefixes: &[&str]) {
    seen.note_log(plugin);
    let keys = plugin.store_keys();
    assert!(keys.is_empty(), "records left in the store: {keys:?}");
    let left = seen.left();
    assert!(left.is_empty(), "links left: {left:?}");
    let table = out(&sh(&["nft", "list", "table", "inet", "ferrynet"]));
    for p in prefixes {
        assert!(
            !table.contains(p),
            "the nftables table still has {p}:\n{table}"
        );
    }
}

/// `docker inspect` of one field of a container's endpoint on `net`.
fn on_net(container: &str, net: &str, field: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        &format!(
            "{{{{with index .NetworkSettings.Networks \"{net}\"}}}}{{{{.{field}}}}}{{{{end}}}}"
        ),
        container,
    ])
}

/// The container's PID (its network namespace is /proc/PID/ns/net).
fn pid_of(container: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.Pid}}", container])
}

/// Read one line from a child's stdout (a server saying it is ready).
fn ready(child: &mut std::process::Child) {
    let mut outp = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut outp, &mut buf).expect("the server did not start");
}

/// A UDP server inside a container's network namespace (python from the host: busybox has no
/// UDP server), answering each datagram with `reply` and the sender's address.
fn udp_server_in(container: &str, port: u16, reply: &str) -> Proc {
    let code = format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',{port}))\n\
         print('ready',flush=True)\n\
         while True:\n  d,a=s.recvfrom(200);s.sendto(('{reply} '+a[0]).encode(),a)\n"
    );
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net=/proc/{}/ns/net", pid_of(container)),
            "python3",
            "-u",
            "-c",
            &code,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the UDP server");
    ready(&mut child);
    Proc(child)
}

/// One UDP question from `ns` (None: the host namespace) to `addr`:`port`; the answer.
fn udp_get(ns: Option<&Ns>, addr: &str, port: u16) -> Option<String> {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2)\n\
         s.sendto(b'q',('{addr}',{port}));print(s.recvfrom(200)[0].decode())"
    );
    let o = match ns {
        Some(ns) => ns.run(&["python3", "-c", &code]),
        None => sh(&["python3", "-c", &code]),
    };
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// One TCP connection from the host namespace: the server's line, or None.
fn host_tcp(addr: &str, port: u16) -> Option<String> {
    let o = sh(&["/bin/busybox", "nc", "-w", "3", addr, &port.to_string()]);
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// One TCP connection from `ns`: the server's line, or None.
fn ns_tcp(ns: &Ns, addr: &str, port: u16) -> Option<String> {
    let o = ns.run(&["/bin/busybox", "nc", "-w", "3", addr, &port.to_string()]);
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// A detached container answering TCP on `port` with `reply`, with extra `docker run` flags.
fn server(made: &mut Made, name: &str, image: &str, flags: &[&str], port: u16, reply: &str) {
    made.containers.push(name.to_string());
    let p = port.to_string();
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(flags);
    args.extend([image, "/bin/nc", "-ll", "-p", &p, "-e", "/bin/echo", reply]);
    docker_ok(&args);
}

/// A ferrynet Docker network labelled with the test's tag (so `prune` can be scoped to it).
fn create_net(made: &mut Made, d: &str, name: &str, label: &str, extra: &[&str]) -> String {
    made.networks.push(name.to_string());
    let mut args = vec![
        "network",
        "create",
        "-d",
        d,
        "--ipam-driver",
        d,
        "--label",
        label,
    ];
    args.extend_from_slice(extra);
    args.push(name);
    docker_ok(&args)
}

/// The ferrynet name of a Docker network made without `-o ferrynet.network`.
fn fname(docker_id: &str) -> String {
    format!("docker-{}", &docker_id[..12])
}

/// An Engine API call over the Docker socket (for what this CLI cannot say to a 20.10 engine).
fn engine(method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    raw(
        Path::new("/var/run/docker.sock"),
        format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// What every test starts with: the engine checked, its turn on the host namespace, a plugin
/// of its own, the cleanup guard, the leftover tracker and the busybox image. Returned in the
/// order they are dropped last to first, so containers go before the plugin and the turn.
fn set_up() -> (Turn, Plugin, Made, Seen, String) {
    require_docker();
    let turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    (turn, plugin, made, Seen::default(), image)
}

#[test]
fn connect_and_disconnect_running_containers() {
    let (_turn, plugin, mut made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let label = format!("fnt.test={d}");
    let (na, nb, br) = (format!("{d}-a"), format!("{d}-b"), format!("{d}-br"));
    let ida = create_net(&mut made, &d, &na, &label, &["--subnet", "10.233.1.0/24"]);
    let idb = create_net(&mut made, &d, &nb, &label, &["--subnet", "10.233.2.0/24"]);
    // A container on one of Docker's own bridge networks (this engine may lack docker0).
    made.networks.push(br.clone());
    docker_ok(&["network", "create", "--subnet", "10.243.9.0/24", &br]);

    let (a, b, c) = (format!("{d}-ca"), format!("{d}-cb"), format!("{d}-cc"));
    server(&mut made, &a, &image, &["--network", &na], 7000, "from-a");
    server(&mut made, &b, &image, &["--network", &nb], 7000, "from-b");
    server(&mut made, &c, &image, &["--network", &br], 7000, "from-c");
    let (a_ip, b_ip) = (ip_of(&a), ip_of(&b));

    // c (on Docker's bridge) joins network a: a second interface, both ways over TCP.
    docker_ok(&["network", "connect", &na, &c]);
    seen.note(&plugin);
    let c_on_a = on_net(&c, &na, "IPAddress");
    assert!(c_on_a.starts_with("10.233.1."), "{c_on_a}");
    let addrs = docker_ok(&["exec", &c, "/bin/ip", "-4", "addr"]);
    assert!(
        addrs.contains(&format!("{c_on_a}/24")) && addrs.contains("10.243.9."),
        "{addrs}"
    );
    assert_eq!(eventually("a from c", || talk(&c, &a_ip)), "from-a");
    assert_eq!(eventually("c from a", || talk(&a, &c_on_a)), "from-c");
    // Networks stay apart: a cannot reach b on another ferrynet network.
    assert_eq!(talk(&a, &b_ip), None, "a reached b across networks");

    // And network b too, with a fixed address and an alias: c is on two ferrynet networks.
    docker_ok(&[
        "network",
        "connect",
        "--ip",
        "10.233.2.77",
        "--alias",
        "kitty",
        &nb,
        &c,
    ]);
    seen.note(&plugin);
    assert_eq!(on_net(&c, &nb, "IPAddress"), "10.233.2.77");
    assert_eq!(eventually("b from c", || talk(&c, &b_ip)), "from-b");
    assert_eq!(eventually("a from c again", || talk(&c, &a_ip)), "from-a");
    assert_eq!(eventually("c from b", || talk(&b, "10.233.2.77")), "from-c");
    // The alias and the name resolve through Docker's embedded DNS on that network.
    assert_eq!(eventually("c by alias", || talk(&b, "kitty")), "from-c");
    assert_eq!(eventually("c by name", || talk(&b, &c)), "from-c");
    let rec = eventually("c's endpoint record on b named", || {
        endpoints(&plugin).into_iter().find(|e| {
            e["ips"]
                .as_array()
                .is_some_and(|i| i.iter().any(|x| x == "10.233.2.77/24"))
                && e["name"].as_str() == Some(c.as_str())
        })
    });
    assert!(
        rec["aliases"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "kitty")),
        "{rec}"
    );
    let c_eps: Vec<String> = endpoints(&plugin)
        .into_iter()
        .filter(|e| e["name"].as_str() == Some(c.as_str()))
        .filter_map(|e| e["hostVeth"].as_str().map(str::to_string))
        .collect();
    assert_eq!(c_eps.len(), 2, "c has an endpoint on each ferrynet network");

    // Disconnect both: c is back to its bridge alone; its veths, records, addresses are gone.
    docker_ok(&["network", "disconnect", &nb, &c]);
    docker_ok(&["network", "disconnect", &na, &c]);
    let addrs = docker_ok(&["exec", &c, "/bin/ip", "-4", "addr"]);
    assert!(
        !addrs.contains("10.233.") && addrs.contains("10.243.9."),
        "{addrs}"
    );
    let routes = docker_ok(&["exec", &c, "/bin/ip", "route"]);
    assert!(routes.contains("default via 10.243.9.1"), "{routes}");
    let links = host_links(&["fnv"]);
    assert!(
        c_eps.iter().all(|v| !links.contains(v)),
        "{c_eps:?} still in {links:?}"
    );
    assert_eq!(
        endpoints(&plugin).len(),
        2,
        "only a's and b's endpoints are left: {:?}",
        endpoints(&plugin)
    );
    assert!(
        !held_addresses(&plugin, &fname(&idb)).contains(&"10.233.2.77".to_string()),
        "the fixed address is released"
    );
    assert!(!held_addresses(&plugin, &fname(&ida)).contains(&c_on_a));
    assert_eq!(talk(&a, &c_on_a), None, "c's old address answers no more");
    // A disconnected container connects again.
    docker_ok(&["network", "connect", &na, &c]);
    seen.note(&plugin);
    let again = on_net(&c, &na, "IPAddress");
    assert_eq!(
        eventually("c from a after reconnecting", || talk(&a, &again)),
        "from-c"
    );

    for x in [&a, &b, &c] {
        docker_ok(&["rm", "-f", x]);
    }
    made.containers.clear();
    for n in [&na, &nb, &br] {
        docker_ok(&["network", "rm", n]);
    }
    made.networks.clear();
    assert_clean(&plugin, &mut seen, &["10.233.1.", "10.233.2."]);
}

#[test]
fn stop_start_restart_and_pause_keep_the_published_port() {
    let (_turn, plugin, mut made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let label = format!("fnt.test={d}");
    let net = format!("{d}-net");
    let id = create_net(&mut made, &d, &net, &label, &["--subnet", "10.233.3.0/24"]);
    let fnet = fname(&id);
    let (s, f) = (format!("{d}-s"), format!("{d}-f"));
    server(
        &mut made,
        &s,
        &image,
        &["--network", &net, "-p", "18201:7000"],
        7000,
        "from-s",
    );
    server(
        &mut made,
        &f,
        &image,
        &["--network", &net, "--ip", "10.233.3.50", "-p", "18202:7000"],
        7000,
        "from-f",
    );
    seen.note(&plugin);
    let (client, host_ip) = outside_client(31);
    assert_eq!(
        eventually("s's port", || ns_tcp(&client, &host_ip, 18201)),
        "from-s"
    );
    assert_eq!(
        eventually("f's port", || ns_tcp(&client, &host_ip, 18202)),
        "from-f"
    );
    let s_ip = ip_of(&s);
    let s_veth = eventually("s's record", || {
        endpoints(&plugin)
            .into_iter()
            .find(|e| e["name"].as_str() == Some(s.as_str()))
            .and_then(|e| e["hostVeth"].as_str().map(str::to_string))
    });

    // Stop: Docker leaves and deletes the endpoint: port, veth and address go.
    docker_ok(&["stop", "-t", "1", &s]);
    assert!(!published(18201), "{}", port_maps());
    assert!(!host_links(&["fnv"]).contains(&s_veth));
    assert!(!held_addresses(&plugin, &fnet).contains(&s_ip));
    assert_eq!(ns_tcp(&client, &host_ip, 18201), None);
    // Start: a new endpoint with the next free address; the same host port works again.
    docker_ok(&["start", &s]);
    seen.note(&plugin);
    let s_ip2 = ip_of(&s);
    assert!(s_ip2.starts_with("10.233.3."), "{s_ip2}");
    assert!(held_addresses(&plugin, &fnet).contains(&s_ip2));
    assert_eq!(
        eventually("s's port after start", || ns_tcp(&client, &host_ip, 18201)),
        "from-s"
    );
    // Restart: the same again; a container with --ip keeps its address.
    docker_ok(&["restart", "-t", "1", &s]);
    docker_ok(&["restart", "-t", "1", &f]);
    seen.note(&plugin);
    assert_eq!(ip_of(&f), "10.233.3.50");
    assert_eq!(
        eventually("s's port after restart", || ns_tcp(
            &client, &host_ip, 18201
        )),
        "from-s"
    );
    assert_eq!(
        eventually("f's port after restart", || ns_tcp(
            &client, &host_ip, 18202
        )),
        "from-f"
    );
    assert_eq!(
        eventually("f from s", || talk(&s, "10.233.3.50")),
        "from-f",
        "containers reach each other after restarts"
    );
    // Pause/unpause does not touch the network.
    docker_ok(&["pause", &f]);
    docker_ok(&["unpause", &f]);
    assert_eq!(
        eventually("f after unpause", || ns_tcp(&client, &host_ip, 18202)),
        "from-f"
    );
    assert_eq!(endpoints(&plugin).len(), 2, "{:?}", endpoints(&plugin));
    // Only the two containers' addresses are held.
    assert_eq!(
        held_addresses(&plugin, &fnet).len(),
        2,
        "{:?}",
        held_addresses(&plugin, &fnet)
    );

    for x in [&s, &f] {
        docker_ok(&["rm", "-f", x]);
    }
    made.containers.clear();
    assert!(!published(18201) && !published(18202), "{}", port_maps());
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    drop(client);
    assert_clean(&plugin, &mut seen, &["10.233.3."]);
}

#[test]
fn every_form_of_publishing_a_port() {
    let (_turn, plugin, mut made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let label = format!("fnt.test={d}");
    let net = format!("{d}-net");
    let fnet = fname(&create_net(
        &mut made,
        &d,
        &net,
        &label,
        &["--subnet", "10.233.5.0/24"],
    ));
    let (client, host_ip) = outside_client(32);

    // UDP, from a client in another namespace; the container sees the client's own address.
    let u = format!("{d}-udp");
    made.containers.push(u.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &u,
        "--network",
        &net,
        "-p",
        "15353:53/udp",
        &image,
        "/bin/sleep",
        "600",
    ]);
    let _udp = udp_server_in(&u, 53, "udp-pong");
    assert_eq!(
        eventually("the UDP port", || udp_get(Some(&client), &host_ip, 15353)),
        "udp-pong 10.253.32.2"
    );

    // Bound to one host address: 127.0.0.1 from the host, the outside address from outside;
    // neither answers on the other address.
    let h = format!("{d}-hostip");
    let on_host = format!("{host_ip}:18212:7000");
    server(
        &mut made,
        &h,
        &image,
        &[
            "--network",
            &net,
            "-p",
            "127.0.0.1:18211:7000",
            "-p",
            &on_host,
        ],
        7000,
        "from-h",
    );
    assert_eq!(
        eventually("127.0.0.1:18211", || host_tcp("127.0.0.1", 18211)),
        "from-h"
    );
    assert_eq!(
        eventually("HOSTIP:18212", || ns_tcp(&client, &host_ip, 18212)),
        "from-h"
    );
    assert_eq!(
        ns_tcp(&client, &host_ip, 18211),
        None,
        "18211 is on 127.0.0.1 only"
    );
    assert_eq!(
        host_tcp("127.0.0.1", 18212),
        None,
        "18212 is on {host_ip} only"
    );

    // A range: every port of it is published, to the same port in the container.
    let r = format!("{d}-range");
    made.containers.push(r.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &r,
        "--network",
        &net,
        "-p",
        "20000-20010:20000-20010",
        &image,
        "/bin/sh",
        "-c",
        "/bin/nc -ll -p 20000 -e /bin/echo r0 & /bin/nc -ll -p 20010 -e /bin/echo r10 & wait",
    ]);
    assert_eq!(
        eventually("20000", || ns_tcp(&client, &host_ip, 20000)),
        "r0"
    );
    assert_eq!(
        eventually("20010", || ns_tcp(&client, &host_ip, 20010)),
        "r10"
    );
    assert!((20000..=20010).all(published), "{}", port_maps());

    // -P: every exposed port gets a free host port of the ephemeral range, and answers.
    let p = format!("{d}-all");
    server(
        &mut made,
        &p,
        &image,
        &[
            "--network",
            &net,
            "-P",
            "--expose",
            "7000",
            "--expose",
            "7001",
        ],
        7000,
        "from-p",
    );
    let rec = eventually("-P's record", || {
        endpoints(&plugin)
            .into_iter()
            .find(|e| e["name"].as_str() == Some(p.as_str()))
    });
    let ports: Vec<(u64, u64)> = rec["portMappings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["containerPort"].as_u64()?, m["hostPort"].as_u64()?)))
        .collect();
    assert_eq!(ports.len(), 2, "{rec}");
    assert!(ports.iter().all(|(_, h)| *h >= 49153), "{ports:?}");
    let host_port = ports
        .iter()
        .find(|(c, _)| *c == 7000)
        .map(|(_, h)| *h as u16)
        .expect("7000 published");
    assert_eq!(
        eventually("-P's port", || ns_tcp(&client, &host_ip, host_port)),
        "from-p"
    );
    // ferrynet's CLI shows them with the container's name (Docker shows no ports of a remote
    // driver: its daemon reads them only from its own drivers).
    let inspect = out(&plugin.cli(&["network", "inspect", &fnet]));
    assert!(
        inspect.contains(&format!("\"name\": \"{p}\""))
            && inspect.contains(&format!("\"hostPort\": {host_port}")),
        "{inspect}"
    );
    seen.note(&plugin);

    // Two containers asking for one host port: the second fails with a clear error and
    // leaves nothing behind; once the port is free, it starts.
    let eps_before = endpoints(&plugin).len();
    let maps_before = port_maps();
    let second = format!("{d}-second");
    made.containers.push(second.clone());
    let o = docker(&[
        "run",
        "-d",
        "--name",
        &second,
        "--network",
        &net,
        "-p",
        &on_host,
        &image,
        "/bin/nc",
        "-ll",
        "-p",
        "7000",
        "-e",
        "/bin/echo",
        "from-second",
    ]);
    assert!(!o.status.success(), "a second container got {on_host}");
    let msg = out(&o);
    assert!(
        msg.contains(&format!(
            "host port 18212/tcp on {host_ip} is already published"
        )) && msg.contains(&format!("container {h}")),
        "{msg}"
    );
    assert_eq!(
        endpoints(&plugin).len(),
        eps_before,
        "{:?}",
        endpoints(&plugin)
    );
    // No veth of an endpoint that is not recorded (the refused attempt's) is left.
    let (mut ever, mut live) = (Seen::default(), Seen::default());
    ever.note_log(&plugin);
    live.note(&plugin);
    let stray: Vec<String> = ever
        .left()
        .into_iter()
        .filter(|l| !live.links.contains(l))
        .collect();
    assert!(
        stray.is_empty(),
        "links of the refused container: {stray:?}"
    );
    assert_eq!(port_maps(), maps_before);
    assert_eq!(
        eventually("the first keeps the port", || ns_tcp(
            &client, &host_ip, 18212
        )),
        "from-h"
    );
    docker_ok(&["rm", "-f", &h]);
    docker_ok(&["start", &second]);
    seen.note(&plugin);
    assert_eq!(
        eventually("the second has it now", || ns_tcp(&client, &host_ip, 18212)),
        "from-second"
    );

    for x in [&u, &r, &p, &second] {
        docker_ok(&["rm", "-f", x]);
    }
    made.containers.clear();
    assert!(
        ![15353, 18211, 18212, 20000, 20010, host_port]
            .into_iter()
            .any(published),
        "{}",
        port_maps()
    );
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    drop(client);
    assert_clean(&plugin, &mut seen, &["10.233.5."]);
}

#[test]
fn addresses_internal_networks_inspect_prune_and_errors() {
    let (_turn, plugin, mut made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let label = format!("fnt.test={d}");

    // Dual stack with fixed addresses; inspect shows the subnets and gateway asked for.
    let ds = format!("{d}-ds");
    let ds_id = create_net(
        &mut made,
        &d,
        &ds,
        &label,
        &[
            "--ipv6",
            "--subnet",
            "10.233.6.0/24",
            "--gateway",
            "10.233.6.254",
            "--subnet",
            "fd33:6::/64",
        ],
    );
    let ipam = docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}};{{end}} {{.EnableIPv6}} {{.IPAM.Driver}}",
        &ds,
    ]);
    assert_eq!(
        ipam,
        format!("10.233.6.0/24 10.233.6.254;fd33:6::/64 ; true {d}")
    );
    let fixed = format!("{d}-fixed");
    server(
        &mut made,
        &fixed,
        &image,
        &[
            "--network",
            &ds,
            "--ip",
            "10.233.6.33",
            "--ip6",
            "fd33:6::33",
        ],
        7000,
        "from-fixed",
    );
    let addrs = docker_ok(&["exec", &fixed, "/bin/ip", "addr", "show", "eth0"]);
    assert!(
        addrs.contains("10.233.6.33/24") && addrs.contains("fd33:6::33/64"),
        "{addrs}"
    );
    assert_eq!(on_net(&fixed, &ds, "GlobalIPv6Address"), "fd33:6::33");
    for ip in ["10.233.6.33", "fd33:6::33"] {
        let r = eventually("the fixed addresses", || {
            nc_reply(&[
                "run",
                "--rm",
                "--network",
                &ds,
                &image,
                "/bin/nc",
                "-w",
                "3",
                ip,
                "7000",
            ])
        });
        assert_eq!(r, "from-fixed", "{ip}");
    }
    // A taken --ip is refused with the container that holds it.
    let o = docker(&[
        "run",
        "--rm",
        "--network",
        &ds,
        "--ip",
        "10.233.6.33",
        &image,
        "/bin/true",
    ]);
    assert!(!o.status.success());
    assert!(
        out(&o).contains("10.233.6.33 is already in use"),
        "{}",
        out(&o)
    );

    // A MAC address (this CLI cannot send one to a 20.10 engine: the Engine API can).
    let mac = format!("{d}-mac");
    made.containers.push(mac.clone());
    let (st, v) = engine(
        "POST",
        &format!("/v1.41/containers/create?name={mac}"),
        &json!({"Image": image, "Cmd": ["/bin/sleep", "600"], "MacAddress": "02:42:0a:e9:06:99",
                "HostConfig": {"NetworkMode": ds}}),
    );
    assert_eq!(st, 201, "{v}");
    docker_ok(&["start", &mac]);
    let link = docker_ok(&["exec", &mac, "/bin/ip", "link", "show", "eth0"]);
    assert!(link.contains("02:42:0a:e9:06:99"), "{link}");
    assert_eq!(on_net(&mac, &ds, "MacAddress"), "02:42:0a:e9:06:99");
    seen.note(&plugin);

    // Internal: a container that even routes out itself reaches nothing outside, while one on
    // an ordinary network does.
    let (client, _host_ip) = outside_client(33);
    let _outside = common::tcp_server(&client, 7100, "outside");
    let inet = format!("{d}-int");
    create_net(
        &mut made,
        &d,
        &inet,
        &label,
        &["--internal", "--subnet", "10.233.7.0/24"],
    );
    let inside = format!("{d}-inside");
    made.containers.push(inside.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &inside,
        "--network",
        &inet,
        "--cap-add",
        "NET_ADMIN",
        &image,
        "/bin/sleep",
        "600",
    ]);
    seen.note(&plugin);
    let routes = docker_ok(&["exec", &inside, "/bin/ip", "route"]);
    assert!(!routes.contains("default"), "{routes}");
    docker_ok(&[
        "exec",
        &inside,
        "/bin/ip",
        "route",
        "add",
        "default",
        "via",
        "10.233.7.1",
    ]);
    let leak = nc_reply(&["exec", &inside, "/bin/nc", "-w", "2", "10.253.33.2", "7100"]);
    assert_eq!(leak, None, "an internal network's container got out");
    let r = eventually("outside from an ordinary network", || {
        nc_reply(&["exec", &fixed, "/bin/nc", "-w", "3", "10.253.33.2", "7100"])
    });
    assert!(r.starts_with("outside"), "{r}");
    drop(client);

    // Creation errors come back through the docker CLI with ferrynet's reason, and leave
    // nothing half made.
    let pools_before = records(&plugin, "/ferrynet/v1/docker/").len();
    for (extra, want) in [
        (
            vec!["--subnet", "10.233.6.128/25"],
            "pool 10.233.6.128/25 overlaps subnet 10.233.6.0/24 of ferrynet network".to_string(),
        ),
        (
            vec!["-o", "ferrynet.bogus=1"],
            "unknown option ferrynet.bogus".to_string(),
        ),
        (
            vec!["-o", "ferrynet.mtu=abc"],
            "option ferrynet.mtu=\"abc\": expected a number".to_string(),
        ),
        (
            vec!["--ipam-opt", "ferrynet.nope=1"],
            "unknown IPAM option ferrynet.nope".to_string(),
        ),
    ] {
        let bad = format!("{d}-bad");
        made.networks.push(bad.clone());
        let mut args = vec!["network", "create", "-d", &d, "--ipam-driver", &d];
        args.extend(extra.iter().copied());
        args.push(&bad);
        let o = docker(&args);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(out(&o).contains(&want), "{extra:?}: {}", out(&o));
        assert!(!docker(&["network", "inspect", &bad]).status.success());
        assert_eq!(
            records(&plugin, "/ferrynet/v1/docker/").len(),
            pools_before,
            "{extra:?} left records"
        );
    }
    made.networks.retain(|n| !n.ends_with("-bad"));

    // Prune (scoped to this test's label: the engine is shared) removes the unused ferrynet
    // networks and keeps those in use; inspect of a picked pool shows it and its gateway.
    let (p1, p2) = (format!("{d}-p1"), format!("{d}-p2"));
    let p1_id = create_net(&mut made, &d, &p1, &label, &[]);
    create_net(&mut made, &d, &p2, &label, &["--ipv6"]);
    let picked = docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
        &p1,
    ]);
    let (subnet, gw) = picked.split_once(' ').unwrap_or_default();
    assert!(
        subnet.starts_with("10.89.") && subnet.ends_with(".0/24"),
        "{picked}"
    );
    assert_eq!(gw, subnet.replace(".0/24", ".1"), "{picked}");
    let ls = out(&plugin.cli(&["network", "ls"]));
    assert!(ls.contains(&fname(&p1_id)) && ls.contains(subnet), "{ls}");
    seen.note(&plugin);
    docker_ok(&["rm", "-f", &inside]);
    let pruned = docker_ok(&[
        "network",
        "prune",
        "-f",
        "--filter",
        &format!("label={label}"),
    ]);
    assert!(
        pruned.contains(&p1) && pruned.contains(&p2) && pruned.contains(&inet),
        "{pruned}"
    );
    assert!(!pruned.contains(&ds), "{pruned}");
    let ls = out(&plugin.cli(&["network", "ls", "--json"]));
    let v: Value = serde_json::from_str(&ls).unwrap_or(Value::Null);
    let names: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .collect();
    let ds_name = fname(&ds_id);
    assert_eq!(names, vec![ds_name.as_str()], "{ls}");

    for x in [&fixed, &mac] {
        docker_ok(&["rm", "-f", x]);
    }
    made.containers.clear();
    docker_ok(&["network", "rm", &ds]);
    made.networks.clear();
    assert_clean(
        &plugin,
        &mut seen,
        &["10.233.6.", "fd33:6:", "10.233.7.", subnet],
    );
}

/// A compose project brought down on drop.
struct Compose {
    dir: tempfile::TempDir,
    project: String,
}

impl Compose {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let file = self
            .dir
            .path()
            .join("docker-compose.yml")
            .display()
            .to_string();
        let mut v = vec!["docker-compose", "-p", &self.project, "-f", &file];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--timeout", "1"]);
    }
}

#[test]
fn a_compose_project_on_a_ferrynet_network() {
    common::need("docker-compose", "docker-compose");
    let (_turn, plugin, _made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let project = format!("fnt{}", tag());
    let compose = Compose {
        dir: tempfile::tempdir().expect("compose dir"),
        project: project.clone(),
    };
    let file = format!(
        r#"version: "2.4"
services:
  web:
    image: {image}
    command: ["/bin/nc", "-ll", "-p", "7000", "-e", "/bin/echo", "from-web"]
    mac_address: "02:42:0a:e9:08:0a"
    ports: ["18221:7000"]
    networks:
      front:
        ipv4_address: 10.233.8.10
  client:
    image: {image}
    command: ["/bin/nc", "-ll", "-p", "7000", "-e", "/bin/echo", "from-client"]
    networks: [front]
networks:
  front:
    driver: {d}
    ipam:
      driver: {d}
      config:
        - subnet: 10.233.8.0/24
"#
    );
    std::fs::write(compose.dir.path().join("docker-compose.yml"), file).expect("compose file");
    let o = compose.run(&["up", "-d", "--scale", "client=3"]);
    assert!(o.status.success(), "{}", out(&o));
    seen.note(&plugin);
    let web = format!("{project}_web_1");
    let client = format!("{project}_client_1");
    assert_eq!(ip_of(&web), "10.233.8.10");
    let link = docker_ok(&["exec", &web, "/bin/ip", "link", "show", "eth0"]);
    assert!(link.contains("02:42:0a:e9:08:0a"), "{link}");
    // By service name (Docker's embedded DNS) and by address, both ways.
    assert_eq!(
        eventually("web by name", || talk(&client, "web")),
        "from-web"
    );
    assert_eq!(
        eventually("web by address", || talk(&client, "10.233.8.10")),
        "from-web"
    );
    assert_eq!(
        eventually("client by name", || talk(&web, "client")),
        "from-client"
    );
    let client_ip = ip_of(&client);
    assert_eq!(
        eventually("client by address", || talk(&web, &client_ip)),
        "from-client"
    );
    let (outside, host_ip) = outside_client(34);
    assert_eq!(
        eventually("web's port", || ns_tcp(&outside, &host_ip, 18221)),
        "from-web"
    );
    assert_eq!(endpoints(&plugin).len(), 4);
    // The names reach ferrynet's records too (service name as an alias).
    let rec = eventually("web's record named", || {
        endpoints(&plugin)
            .into_iter()
            .find(|e| e["name"].as_str() == Some(web.as_str()))
    });
    assert!(
        rec["aliases"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "web")),
        "{rec}"
    );

    let o = compose.run(&["down", "--timeout", "1"]);
    assert!(o.status.success(), "{}", out(&o));
    let left = docker_ok(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("name={project}_front"),
    ]);
    assert!(left.is_empty(), "{left}");
    assert!(!published(18221), "{}", port_maps());
    drop(outside);
    assert_clean(&plugin, &mut seen, &["10.233.8."]);
}

#[test]
fn many_quick_containers_leave_nothing_behind() {
    let (_turn, plugin, mut made, mut seen, image) = set_up();
    let d = plugin.driver.clone();
    let label = format!("fnt.test={d}");
    let net = format!("{d}-net");
    let id = create_net(&mut made, &d, &net, &label, &["--subnet", "10.233.10.0/24"]);
    let fnet = fname(&id);
    let keep = format!("{d}-keep");
    server(
        &mut made,
        &keep,
        &image,
        &["--network", &net],
        7000,
        "from-keep",
    );
    let keep_ip = ip_of(&keep);
    seen.note(&plugin);
    for i in 0..30 {
        // Each one talks to the long-lived container over a published port of its own.
        let o = docker(&[
            "run",
            "--rm",
            "--network",
            &net,
            "-p",
            "18231:7000",
            &image,
            "/bin/nc",
            "-w",
            "3",
            &keep_ip,
            "7000",
        ]);
        assert!(o.status.success(), "run {i}: {}", out(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "from-keep",
            "run {i}: {}",
            out(&o)
        );
    }
    // Only the long-lived container's endpoint and address remain.
    let eps = endpoints(&plugin);
    assert_eq!(eps.len(), 1, "{eps:?}");
    let held = held_addresses(&plugin, &fnet);
    assert_eq!(held, vec![keep_ip.clone()]);
    assert!(!published(18231), "{}", port_maps());
    // None of the 30 containers' veths (host ends or temporary peers) is left.
    let mut runs = Seen::default();
    runs.note_log(&plugin);
    assert!(runs.links.len() >= 62, "{:?}", runs.links);
    let left = runs.left();
    assert_eq!(
        left.len(),
        1,
        "only the long-lived container's veth: {left:?}"
    );
    docker_ok(&["rm", "-f", &keep]);
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    assert_clean(&plugin, &mut seen, &["10.233.10."]);
}
