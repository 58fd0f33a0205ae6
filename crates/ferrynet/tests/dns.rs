//! The agent's embedded DNS server on a real kernel, queried with real clients (dig, glibc's
//! resolver through getent, python) from inside containers made by `ferrynet run`.
//! Upstream resolvers are servers the tests run in their own namespaces (dnsmasq with one
//! static record, and a "silent" one that never answers): no query leaves the test.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lab::Lab as Cluster;
use common::{bin, must, need, out as text, within, Lab, Ns, Proc};
use serde_json::Value;

/// A single host with its agent serving DNS, and upstream resolvers in their own namespace.
struct Host {
    /// Containers, removed first on drop.
    containers: Vec<String>,
    agent: Option<Proc>,
    dnsmasq: Option<Proc>,
    _silent: Proc,
    upstream: Ns,
    lab: Lab,
    /// The upstream answering `outside.test`, and the silent one.
    up_ip: String,
    silent_ip: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.lab.cli(&["rm", "--force", c]);
        }
        self.agent.take();
        self.dnsmasq.take();
    }
}

impl Host {
    fn new() -> Host {
        need("dig", "dnsutils");
        need("kdig", "knot-dnsutils");
        need("dnsmasq", "dnsmasq-base");
        let lab = Lab::new();
        let (upstream, _host_ip, up_ip) = lab.outside(1);
        let silent_ip = "10.250.1.3".to_string();
        let dnsmasq_log = lab.state.path().join("dnsmasq.log");
        must(&[
            "ip",
            "-n",
            &upstream.name,
            "addr",
            "add",
            &format!("{silent_ip}/24"),
            "dev",
            "ext0",
        ]);
        let dnsmasq = Command::new("nsenter")
            .args([
                &upstream.enter(),
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={up_ip}"),
                "--address=/outside.test/192.0.2.7",
                "--log-queries",
                &format!("--log-facility={}", dnsmasq_log.display()),
                "--pid-file",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        // Reads queries and never answers.
        let silent = Command::new("nsenter")
            .args([
                &upstream.enter(),
                "python3",
                "-c",
                &format!(
                    "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{silent_ip}',53))\nwhile True: s.recv(65535)\n"
                ),
            ])
            .spawn()
            .expect("start the silent upstream");
        let underlay = lab.host_links("fto").pop().expect("outside link");
        let mut h = Host {
            containers: Vec::new(),
            agent: None,
            dnsmasq: Some(Proc(dnsmasq)),
            _silent: Proc(silent),
            upstream,
            lab,
            up_ip,
            silent_ip,
        };
        h.start_agent(&underlay);
        h
    }

    fn start_agent(&mut self, underlay: &str) {
        let state = self.lab.state.path().display().to_string();
        let log = std::fs::File::create(self.lab.state.path().join("agent.log")).expect("log");
        // The usual soft limit on open files, under a higher hard one: the agent raises it.
        let child = Command::new("prlimit")
            .args([
                "--nofile=1024:",
                "nsenter",
                &self.lab.host.enter(),
                bin(),
                "--state-dir",
                &state,
                "agent",
                "--host-name",
                "h1",
                "--underlay-dev",
                underlay,
                "--dns-ttl",
                "1s",
                "--dns-upstream",
                &self.up_ip,
                "--dns-upstream",
                &self.silent_ip,
            ])
            .env("FERRYNET_LOG", "debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.agent = Some(Proc(child));
        within(Duration::from_secs(20), || {
            let o = self.lab.cli(&["status", "--json"]);
            o.status.success().then_some(()).ok_or_else(|| text(&o))
        });
    }

    /// The queries the answering upstream (dnsmasq) has seen.
    fn upstream_log(&self) -> String {
        std::fs::read_to_string(self.lab.state.path().join("dnsmasq.log")).unwrap_or_default()
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.lab.state.path().join("agent.log")).unwrap_or_default()
    }

    fn network(&self, name: &str, v4: &str, v6: &str) {
        let o = self
            .lab
            .cli(&["network", "create", name, "--subnet", v4, "--subnet", v6]);
        assert!(o.status.success(), "network create: {}", text(&o));
    }

    /// `ferrynet run` a sleeping container; its addresses.
    fn run(&mut self, name: &str, net: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["run", "--name", name, "--net", net];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sleep", "600"]);
        let o = self.lab.cli(&args);
        assert!(o.status.success(), "run {name}: {}", text(&o));
        self.containers.push(name.to_string());
        let ps = self.lab.cli(&["ps", "--json"]);
        let list: Vec<Value> = serde_json::from_slice(&ps.stdout).expect("ps json");
        list.iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["ips"].as_array())
            .expect("container listed")
            .iter()
            .filter_map(|v| v.as_str()?.split('/').next().map(str::to_string))
            .collect()
    }

    fn exec(&self, c: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", c, "--"];
        args.extend_from_slice(cmd);
        self.lab.cli(&args)
    }

    /// `dig` from inside container `c` against `server`; the whole output.
    fn dig(&self, c: &str, server: &str, args: &[&str]) -> String {
        let at = format!("@{server}");
        let mut cmd = vec!["dig", "+tries=1", "+time=8", at.as_str()];
        cmd.extend_from_slice(args);
        text(&self.exec(c, &cmd))
    }

    /// The answer lines (`+short`).
    fn short(&self, c: &str, server: &str, args: &[&str]) -> Vec<String> {
        let mut a = vec!["+short"];
        a.extend_from_slice(args);
        let mut v: Vec<String> = self
            .dig(c, server, &a)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }
}

fn v4(ips: &[String]) -> String {
    ips.iter().find(|i| !i.contains(':')).cloned().expect("v4")
}
fn v6(ips: &[String]) -> String {
    ips.iter().find(|i| i.contains(':')).cloned().expect("v6")
}

#[test]
fn container_names_on_one_host() {
    let mut h = Host::new();
    let t = common::tag();
    let (blue, red) = (format!("dnb{t}"), format!("dnr{t}"));
    h.network(&blue, "10.61.0.0/24", "fd61::/64");
    h.network(&red, "10.62.0.0/24", "fd62::/64");
    let (c1, c2, c3) = (format!("dn1{t}"), format!("dn2{t}"), format!("dn3{t}"));
    let _ = h.run(&c1, &blue, &[]);
    let ip2 = h.run(&c2, &blue, &["--alias", "Db"]);
    let ip3 = h.run(&c3, &red, &[]);
    let zone = format!("{blue}.ferrynet.internal");
    let fq2 = format!("{c2}.{zone}");

    // A and AAAA, on the IPv4 and the IPv6 gateway; names are case-insensitive.
    within(Duration::from_secs(20), || {
        let got = h.short(&c1, "10.61.0.1", &[&fq2, "A"]);
        (got == [v4(&ip2)])
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    assert_eq!(
        h.short(&c1, "fd61::1", &[&fq2.to_uppercase(), "AAAA"]),
        [v6(&ip2)]
    );
    assert_eq!(
        h.short(&c1, "10.61.0.1", &[&format!("db.{zone}"), "A"]),
        [v4(&ip2)]
    );
    // The agent reports where it serves.
    let st: Value =
        serde_json::from_slice(&h.lab.cli(&["status", "--json"]).stdout).expect("status");
    let listening = st["dns"]["listening"].to_string();
    assert!(
        listening.contains(&format!("10.61.0.1 ({blue})")) && listening.contains("fd62::1"),
        "{st}"
    );
    // kdig over TCP agrees.
    let o = h.exec(&c1, &["kdig", "+tcp", "+short", "@10.61.0.1", &fq2, "A"]);
    assert_eq!(text(&o).trim(), v4(&ip2), "kdig +tcp");

    // A name on another network does not exist from here, but does from there.
    let fq3 = format!("{c3}.{red}.ferrynet.internal");
    let out = h.dig(&c1, "10.61.0.1", &[&fq3, "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let out = h.dig(&c1, "10.61.0.1", &[&format!("{c3}.{zone}"), "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    within(Duration::from_secs(20), || {
        let got = h.short(&c3, "10.62.0.1", &[&fq3, "A"]);
        (got == [v4(&ip3)]).then_some(()).ok_or(format!("{got:?}"))
    });

    // Reverse names of container addresses.
    assert_eq!(
        h.short(&c1, "10.61.0.1", &["-x", &v4(&ip2)]),
        [format!("{fq2}.")]
    );
    assert_eq!(
        h.short(&c1, "fd61::1", &["-x", &v6(&ip2)]),
        [format!("{fq2}.")]
    );

    // The container's resolver is the gateway with the network's search domain: glibc and
    // python find the short name.
    let o = h.exec(&c1, &["cat", "/etc/resolv.conf"]);
    assert!(
        text(&o).contains("nameserver 10.61.0.1") && text(&o).contains(&format!("search {zone}")),
        "{}",
        text(&o)
    );
    let o = h.exec(&c1, &["getent", "ahostsv4", &c2]);
    assert!(text(&o).contains(&v4(&ip2)), "getent: {}", text(&o));
    let o = h.exec(
        &c1,
        &[
            "python3",
            "-c",
            &format!("import socket;print(socket.gethostbyname('{c2}'))"),
        ],
    );
    assert_eq!(text(&o).trim(), v4(&ip2), "python");

    // A removed container leaves DNS within seconds.
    let o = h.lab.cli(&["rm", "--force", &c2]);
    assert!(o.status.success(), "rm: {}", text(&o));
    h.containers.retain(|c| *c != c2);
    assert!(
        !std::path::Path::new(&format!("/etc/netns/fnc-{c2}")).exists(),
        "rm leaves the container's resolv.conf behind"
    );
    within(Duration::from_secs(20), || {
        let out = h.dig(&c1, "10.61.0.1", &[&fq2, "A"]);
        out.contains("status: NXDOMAIN")
            .then_some(())
            .ok_or(format!("{out}\n{}", h.agent_log()))
    });
}

#[test]
fn forwarding_servfail_and_bad_packets() {
    let mut h = Host::new();
    let t = common::tag();
    let net = format!("dnf{t}");
    h.network(&net, "10.63.0.0/24", "fd63::/64");
    let c1 = format!("dnf1{t}");
    let _ = h.run(&c1, &net, &[]);
    let gw = "10.63.0.1";

    // Outside names go to the upstream (dnsmasq here), from the container's own resolver too.
    within(Duration::from_secs(20), || {
        let got = h.short(&c1, gw, &["outside.test", "A"]);
        (got == ["192.0.2.7"])
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    let o = h.exec(&c1, &["getent", "ahostsv4", "outside.test"]);
    assert!(text(&o).contains("192.0.2.7"), "getent: {}", text(&o));
    let o = h.exec(
        &c1,
        &[
            "kdig",
            "+tcp",
            "+short",
            &format!("@{gw}"),
            "outside.test",
            "A",
        ],
    );
    assert_eq!(text(&o).trim(), "192.0.2.7", "forwarded over TCP");

    // Malformed packets: FORMERR or silence, never a crash. Python sends them raw.
    let probe = format!(
        r#"
import socket, struct
gw = '{gw}'
q = bytes.fromhex('abcd01000001000000000000') + b'\x04test\x00\x00\x01\x00\x01'
res = []
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
for p in [b'\x12\x34junk', bytes.fromhex('beef01000001000000000000') + b'\xff' * 4096, q[:-3], b'\x00' * 12]:
    u.sendto(p, (gw, 53))
    try:
        d = u.recv(65535); res.append(d[3] & 15 if d[:2] == p[:2] else 'wrong-id')
    except socket.timeout:
        res.append('drop')
t = socket.create_connection((gw, 53), timeout=3)
t.sendall(struct.pack('!H', 65535) + bytes.fromhex('beef01000001000000000000') + b'\xff' * 65523)
try:
    n = struct.unpack('!H', t.recv(2))[0]; res.append(t.recv(n)[3] & 15)
except Exception as e:
    res.append('drop')
print(res)
"#
    );
    let o = h.exec(&c1, &["python3", "-c", &probe]);
    assert_eq!(
        text(&o).trim(),
        "['drop', 1, 1, 1, 1]",
        "short: dropped; garbage, truncated, no question, 64 KiB TCP: FORMERR"
    );
    // Still serving.
    assert_eq!(h.short(&c1, gw, &["outside.test", "A"]), ["192.0.2.7"]);

    // The answering upstream goes away: the silent one is asked next, and the client gets
    // SERVFAIL promptly instead of waiting out its own timeout.
    h.dnsmasq.take();
    let start = Instant::now();
    let out = h.dig(&c1, gw, &["outside.test", "A"]);
    let took = start.elapsed();
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(took < Duration::from_secs(6), "SERVFAIL took {took:?}");
    let _ = &h.upstream;
}

impl Cluster {
    /// A 3-host `ferrynet lab` on etcd (VXLAN), removed on drop.
    fn dns(name: &str) -> Cluster {
        need("dig", "dnsutils");
        Cluster::vxlan3(name)
    }

    /// A sleeping container on `host`: its name and addresses.
    fn sleeper(&mut self, host: &str, short: &str) -> (String, Vec<String>) {
        self.run_with(host, short, &[], &["sleep", "600"])
    }

    /// A container on `host` running `cmd` with `extra` flags: its name and addresses.
    fn run_with(
        &mut self,
        host: &str,
        short: &str,
        extra: &[&str],
        cmd: &[&str],
    ) -> (String, Vec<String>) {
        let c = self.run(host, short, extra, cmd);
        (c.name, c.ips)
    }

    /// `dig +short` inside a container, with the resolver ferrynet gave it.
    fn short(&self, host: &str, c: &str, args: &[&str]) -> Vec<String> {
        let mut a = vec!["exec", c, "--", "dig", "+short", "+tries=1", "+time=8"];
        a.extend_from_slice(args);
        let mut v: Vec<String> = String::from_utf8_lossy(&self.exec(host, &a).stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Write (Some) or delete (None) a key through etcd's JSON gateway, from a lab host:
    /// the registry's records exactly as `ferrynet service` stores them.
    fn etcd(&self, key: &str, value: Option<&Value>) {
        let code = match value {
            Some(v) => format!(
                "import base64,json,urllib.request\nb=lambda s: base64.b64encode(s.encode()).decode()\nurllib.request.urlopen('http://172.31.0.253:2379/v3/kv/put', json.dumps({{'key': b({key:?}), 'value': b({:?})}}).encode(), timeout=5).read()\n",
                v.to_string()
            ),
            None => format!(
                "import base64,json,urllib.request\nb=lambda s: base64.b64encode(s.encode()).decode()\nurllib.request.urlopen('http://172.31.0.253:2379/v3/kv/deleterange', json.dumps({{'key': b({key:?})}}).encode(), timeout=5).read()\n"
            ),
        };
        let o = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{}", self.host_ns("h1")),
                "python3",
                "-c",
                &code,
            ])
            .output()
            .expect("python3");
        assert!(o.status.success(), "etcd write {key}: {}", text(&o));
    }
}

#[test]
fn names_and_services_across_three_hosts() {
    let mut lab = Cluster::dns("dnsvx");
    let (c1, _ip1) = lab.sleeper("h1", "a");
    let (c2, ip2) = lab.sleeper("h2", "b");
    let (c3, ip3) = lab.sleeper("h3", "c");
    let zone = "fabric.ferrynet.internal";

    // Containers on other hosts, by full and short name, from every host.
    within(Duration::from_secs(20), || {
        let got = lab.short("h1", &c1, &[&format!("{c2}.{zone}"), "A"]);
        (got == [v4(&ip2)]).then_some(()).ok_or(format!("{got:?}"))
    });
    assert_eq!(lab.short("h1", &c1, &["+search", &c3, "AAAA"]), [v6(&ip3)]);
    within(Duration::from_secs(20), || {
        let got = lab.short("h3", &c3, &["+search", &c2, "A"]);
        (got == [v4(&ip2)]).then_some(()).ok_or(format!("{got:?}"))
    });

    // A service with a VIP and two producers (on h2 and h3) with a target port.
    lab.etcd(
        "/ferrynet/v1/services/web",
        Some(&serde_json::json!({
            "name": "web", "ports": [{"name": "http", "port": 80, "protocol": "tcp"}],
            "vips": ["10.96.0.10"], "networks": []
        })),
    );
    for (id, host, ips) in [("p2", "h2", &ip2), ("p3", "h3", &ip3)] {
        lab.etcd(
            &format!("/ferrynet/v1/producers/web/{id}"),
            Some(&serde_json::json!({
                "service": "web", "id": id, "host": host, "network": "fabric",
                "addrs": ips, "ports": {"80": 8080}
            })),
        );
    }
    let mut producers = vec![v4(&ip2), v4(&ip3)];
    producers.sort();
    for (host, c) in [("h1", &c1), ("h3", &c3)] {
        within(Duration::from_secs(20), || {
            let got = lab.short(host, c, &["+search", "web", "A"]);
            (got == ["10.96.0.10"])
                .then_some(())
                .ok_or(format!("{host}: {got:?}"))
        });
        assert_eq!(
            lab.short(host, c, &[&format!("tasks.web.{zone}"), "A"]),
            producers
        );
        let srv = lab.short(host, c, &[&format!("_http._tcp.web.{zone}"), "SRV"]);
        assert_eq!(
            srv,
            [
                format!("0 10 8080 p2.tasks.web.{zone}."),
                format!("0 10 8080 p3.tasks.web.{zone}.")
            ],
            "{host}"
        );
        assert_eq!(
            lab.short(host, c, &[&format!("p3.tasks.web.{zone}"), "AAAA"]),
            [v6(&ip3)]
        );
    }

    // A producer that leaves the registry leaves DNS.
    lab.etcd("/ferrynet/v1/producers/web/p2", None);
    within(Duration::from_secs(20), || {
        let got = lab.short("h1", &c1, &[&format!("tasks.web.{zone}"), "A"]);
        (got == [v4(&ip3)]).then_some(()).ok_or(format!("{got:?}"))
    });
}

#[test]
fn cni_containers_get_the_resolver_and_their_names() {
    let h = Host::new();
    let t = common::tag();
    let net = format!("dnc{t}");
    let mut conf = h.lab.conf(&net, "10.65.0.0/24", Some("fd65::/64"));
    conf["args"] = serde_json::json!({"ferrynet": {"name": "Web", "aliases": ["www"]}});
    let ns1 = Ns::new("c");
    let r1 = h.lab.add(&conf, "cid1", &ns1, "eth0");
    let search = format!("{net}.ferrynet.internal");
    assert_eq!(
        r1["dns"]["nameservers"],
        serde_json::json!(["10.65.0.1", "fd65::1"]),
        "{r1}"
    );
    assert_eq!(r1["dns"]["search"], serde_json::json!([search]), "{r1}");
    let ip1 = common::first_v4(&r1);

    // A Kubernetes runtime's pod name names the second container.
    let plain = h.lab.conf(&net, "10.65.0.0/24", Some("fd65::/64"));
    let ns2 = Ns::new("c");
    let add = h.lab.cni(
        "ADD",
        &plain,
        &[
            ("CNI_CONTAINERID", "cid2"),
            ("CNI_NETNS", &ns2.path()),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod2",
            ),
        ],
    );
    assert_eq!(add.code, 0, "{} {}", add.json, add.stderr);
    let ip2 = common::first_v4(&add.json);

    let dig = |ns: &Ns, name: &str| -> String {
        let o = ns.run(&[
            "dig",
            "+short",
            "+tries=1",
            "+time=8",
            "@10.65.0.1",
            name,
            "A",
        ]);
        text(&o).trim().to_string()
    };
    within(Duration::from_secs(20), || {
        let got = dig(&ns2, &format!("web.{search}"));
        (got == ip1)
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    assert_eq!(dig(&ns2, &format!("www.{search}")), ip1);
    // A pod is named with its namespace: `POD.NAMESPACE`, under the network's domain and as
    // asked.
    within(Duration::from_secs(20), || {
        let got = dig(&ns1, &format!("pod2.default.{search}"));
        (got == ip2).then_some(()).ok_or(got)
    });
    assert_eq!(dig(&ns1, "pod2.default"), ip2);
    for (id, ns) in [("cid1", &ns1), ("cid2", &ns2)] {
        let c = h.lab.del(&plain, id, Some(ns), "eth0");
        assert_eq!(c.code, 0, "DEL {id}: {}", c.stderr);
    }
}

/// ADD a Kubernetes pod sandbox (`CNI_ARGS` as containerd sends them) on `conf`'s network;
/// its IPv4 and IPv6 addresses.
fn add_pod(
    h: &Host,
    conf: &Value,
    sandbox: &str,
    ns: &Ns,
    namespace: &str,
    pod: &str,
) -> (String, String) {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};\
         K8S_POD_INFRA_CONTAINER_ID={sandbox};K8S_POD_UID=uid-{sandbox}"
    );
    let add = h.lab.cni(
        "ADD",
        conf,
        &[
            ("CNI_CONTAINERID", sandbox),
            ("CNI_NETNS", &ns.path()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &args),
        ],
    );
    assert_eq!(add.code, 0, "{} {}", add.json, add.stderr);
    let addr = |v6: bool| {
        add.json["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .find(|a| a.contains(':') == v6)
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_string()
    };
    (addr(false), addr(true))
}

#[test]
fn kubernetes_pods_answer_as_pod_namespace() {
    let h = Host::new();
    let t = common::tag();
    let net = format!("k8{t}");
    let conf = h.lab.conf(&net, "10.69.0.0/24", Some("fd69::/64"));
    let zone = format!("{net}.ferrynet.internal");
    let client = Ns::new("c");
    add_pod(&h, &conf, "sbclient", &client, "default", "client");
    let (a, b, c, d) = (Ns::new("c"), Ns::new("c"), Ns::new("c"), Ns::new("c"));
    let (ip1, ip1v6) = add_pod(&h, &conf, "sb1", &a, "default", "web-0");
    let (ip2, _) = add_pod(&h, &conf, "sb2", &b, "team-b", "web-0");
    // A pod elsewhere named like the first one with its namespace: its own, longer name.
    let (ip_evil, _) = add_pod(&h, &conf, "sb3", &c, "evil", "web-0.default");
    let dig = |name: &str, qtype: &str| -> String {
        let o = client.run(&[
            "dig",
            "+short",
            "+tries=1",
            "+time=8",
            "@10.69.0.1",
            name,
            qtype,
        ]);
        text(&o).trim().to_string()
    };
    within(Duration::from_secs(20), || {
        let got = dig("web-0.default", "A");
        (got == ip1)
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    assert_eq!(dig(&format!("web-0.default.{zone}"), "A"), ip1);
    let o = client.run(&["kdig", "+short", "@fd69::1", "web-0.default", "AAAA"]);
    assert_eq!(text(&o).trim(), ip1v6, "kdig AAAA over IPv6");
    assert_eq!(dig("web-0.team-b", "A"), ip2);
    within(Duration::from_secs(20), || {
        let got = dig("web-0.default.evil", "A");
        (got == ip_evil).then_some(()).ok_or(got)
    });
    assert_eq!(
        dig("web-0.default", "A"),
        ip1,
        "another namespace cannot take the name"
    );

    // Re-created under the same name (a new sandbox, a new address) before the old one's DEL:
    // the name moves to the new address.
    let (ip4, _) = add_pod(&h, &conf, "sb4", &d, "default", "web-0");
    within(Duration::from_secs(20), || {
        let got = dig("web-0.default", "A");
        (got == ip4).then_some(()).ok_or(got)
    });
    // The old sandbox's DEL does not take the name from the new one. A later marker pod shows
    // the agent has seen the DEL.
    let del = h.lab.del(&conf, "sb1", Some(&a), "eth0");
    assert_eq!(del.code, 0, "{}", del.stderr);
    let marker = Ns::new("c");
    let (ipm, _) = add_pod(&h, &conf, "sbm", &marker, "default", "marker");
    within(Duration::from_secs(20), || {
        let got = dig("marker.default", "A");
        (got == ipm).then_some(()).ok_or(got)
    });
    assert_eq!(dig("web-0.default", "A"), ip4);

    // A forged record (its namespace label says kube-system, not its pod's namespace) written
    // straight to the store is rejected on read-back: it never takes the name.
    let key = format!("/ferrynet/v1/endpoints/{net}/sbforged/eth0");
    let forged = serde_json::json!({
        "network": net, "containerId": "sbforged", "ifname": "eth0",
        "ips": ["10.69.0.250/24"], "owner": "cni",
        "pod": {"namespace": "default", "name": "web-0"},
        "labels": {"namespace": "kube-system"}
    });
    forge_put(&h.lab, &key, &forged);
    within(Duration::from_secs(20), || {
        let o = h.lab.cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let listed = v["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["key"] == key.as_str());
        listed.then_some(()).ok_or(format!("{v}"))
    });
    assert_eq!(dig("web-0.default", "A"), ip4);

    // status, ps and network inspect show who is who.
    let o = h.lab.cli(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    let pods = v["dns"]["pods"].as_array().cloned().unwrap_or_default();
    let web = pods
        .iter()
        .find(|p| p["name"] == "web-0.default")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(web["containerId"], "sb4");
    assert_eq!(web["uid"], "uid-sb4");
    let ps = text(&h.lab.cli(&["ps"]));
    assert!(
        ps.contains("NAMESPACE") && ps.contains("team-b") && ps.contains("web-0"),
        "{ps}"
    );
    let o = h.lab.cli(&["network", "inspect", &net]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("inspect json");
    let ep = v["endpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["containerId"] == "sb4"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ep["pod"]["namespace"], "default", "{ep}");
    assert_eq!(ep["pod"]["infraContainerId"], "sb4", "{ep}");
    assert_eq!(ep["labels"]["namespace"], "default", "{ep}");

    for (id, ns) in [
        ("sbclient", &client),
        ("sb2", &b),
        ("sb3", &c),
        ("sb4", &d),
        ("sbm", &marker),
    ] {
        assert_eq!(h.lab.del(&conf, id, Some(ns), "eth0").code, 0);
    }
}

/// Write one record straight into the lab's embedded store (as a store writer could).
fn forge_put(lab: &Lab, key: &str, value: &Value) {
    use ferrynet_store::{EmbeddedStore, Op, Store};
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.txn(
            vec![],
            vec![Op::put(key.to_string(), value.to_string().into_bytes())],
        ))
        .expect("forge a record");
}

#[test]
fn registered_services_follow_health_across_hosts() {
    let mut lab = Cluster::dns("dnshc");
    let (c1, _) = lab.sleeper("h1", "a");
    let server = ["python3", "-m", "http.server", "8080"];
    let svc = [
        "--service",
        "api:80:8080",
        "--check",
        "tcp:8080",
        "--interval",
        "300ms",
        "--fall",
        "2",
    ];
    let (p2, ip2) = lab.run_with("h2", "b", &svc, &server);
    let (p3, ip3) = lab.run_with("h3", "c", &svc, &server);
    let zone = "fabric.ferrynet.internal";
    let inspect = lab.exec("h1", &["service", "inspect", "api"]);
    let j: Value = serde_json::from_slice(&inspect.stdout).expect("inspect json");
    let mut vips: Vec<String> = j["service"]["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .filter(|v| !v.contains(':'))
        .collect();
    vips.sort();
    assert_eq!(vips.len(), 1, "{j}");

    // The VIP by name; the producers once their checks pass; SRV with the target port.
    within(Duration::from_secs(20), || {
        let got = lab.short("h1", &c1, &["+search", "api", "A"]);
        (got == vips).then_some(()).ok_or(format!("{got:?}"))
    });
    let mut both = vec![v4(&ip2), v4(&ip3)];
    both.sort();
    within(Duration::from_secs(20), || {
        let got = lab.short("h1", &c1, &[&format!("tasks.api.{zone}"), "A"]);
        (got == both).then_some(()).ok_or(format!("{got:?}"))
    });
    let srv = lab.short("h1", &c1, &[&format!("_p80._tcp.api.{zone}"), "SRV"]);
    assert_eq!(srv.len(), 2, "{srv:?}");
    assert!(srv.iter().all(|r| r.starts_with("0 10 8080 ")), "{srv:?}");

    // The producer on h2 stops serving: its check fails and it leaves DNS on every host.
    let o = lab.exec("h2", &["stop", "--time", "1", &p2]);
    assert!(o.status.success(), "stop: {}", text(&o));
    for host in ["h1", "h3"] {
        let c = if host == "h1" { c1.clone() } else { p3.clone() };
        within(Duration::from_secs(20), || {
            let got = lab.short(host, &c, &[&format!("tasks.api.{zone}"), "A"]);
            (got == [v4(&ip3)])
                .then_some(())
                .ok_or(format!("{host}: {got:?}"))
        });
    }
}

/// `dig` from inside namespace `ns` (a neighbour, not a container) against `server`.
fn dig_in(ns: &Ns, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    let mut cmd = vec!["dig", "+tries=1", "+time=8", at.as_str()];
    cmd.extend_from_slice(args);
    text(&ns.run(&cmd))
}

#[test]
fn other_networks_and_the_underlay_are_refused() {
    let mut h = Host::new();
    let t = common::tag();
    let (a, b) = (format!("dga{t}"), format!("dgb{t}"));
    h.network(&a, "10.66.0.0/24", "fd66::/64");
    h.network(&b, "10.67.0.0/24", "fd67::/64");
    let (ca, cb) = (format!("dga1{t}"), format!("dgb1{t}"));
    let ipa = h.run(&ca, &a, &[]);
    let _ = h.run(&cb, &b, &[]);
    let fqa = format!("{ca}.{a}.ferrynet.internal");

    // The network's own containers: names and forwards, on both gateways.
    within(Duration::from_secs(20), || {
        let got = h.short(&ca, "10.66.0.1", &[&fqa, "A"]);
        (got == [v4(&ipa)])
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    assert_eq!(h.short(&ca, "fd66::1", &[&fqa, "AAAA"]), [v6(&ipa)]);
    let own = format!("own-{t}.outside.test");
    assert_eq!(h.short(&ca, "fd66::1", &[&own, "A"]), ["192.0.2.7"]);

    // A neighbour on the underlay routes to the gateways, over IPv4 and IPv6.
    let link = h.lab.host_links("fto").pop().expect("outside link");
    let nb = &h.upstream;
    h.lab
        .host
        .must(&["ip", "addr", "add", "fd25:1::1/64", "dev", &link, "nodad"]);
    nb.must(&["ip", "addr", "add", "fd25:1::2/64", "dev", "ext0", "nodad"]);
    nb.must(&["ip", "-6", "route", "add", "default", "via", "fd25:1::1"]);

    // Another network's container and the neighbour: REFUSED for the network's names and
    // for outside names, over UDP and TCP, on both gateways.
    let foreign = format!("foreign-{t}.outside.test");
    for gw in ["10.66.0.1", "fd66::1"] {
        for name in [fqa.as_str(), foreign.as_str()] {
            for proto in ["+notcp", "+tcp"] {
                let out = h.dig(&cb, gw, &[name, "A", proto]);
                assert!(
                    out.contains("status: REFUSED"),
                    "container of {b} asking {gw} for {name} ({proto}): {out}"
                );
                let out = dig_in(nb, gw, &[name, "A", proto]);
                assert!(
                    out.contains("status: REFUSED"),
                    "underlay neighbour asking {gw} for {name} ({proto}): {out}"
                );
            }
        }
    }
    // The neighbour forges the container's own addresses as sources: the queries are dropped
    // (they came in on the underlay, not the bridge), never forwarded.
    let spoofed = format!("spoofed-{t}.outside.test");
    nb.must(&[
        "ip",
        "addr",
        "add",
        &format!("{}/32", v4(&ipa)),
        "dev",
        "ext0",
    ]);
    nb.must(&[
        "ip",
        "addr",
        "add",
        &format!("{}/128", v6(&ipa)),
        "dev",
        "ext0",
        "nodad",
    ]);
    for (gw, src) in [("10.66.0.1", v4(&ipa)), ("fd66::1", v6(&ipa))] {
        let out = dig_in(nb, gw, &["-b", &src, &spoofed, "A", "+time=2"]);
        assert!(
            !out.contains("status:"),
            "forged {src} got an answer: {out}"
        );
    }
    // Nothing listens on the host's own addresses.
    let out = dig_in(nb, "10.250.1.1", &[&foreign, "A", "+time=2"]);
    assert!(
        !out.contains("status:"),
        "the underlay address answers: {out}"
    );

    // The refused queries never reached the upstream; a later own query did (the log works).
    let later = format!("later-{t}.outside.test");
    assert_eq!(h.short(&ca, "10.66.0.1", &[&later, "A"]), ["192.0.2.7"]);
    within(Duration::from_secs(10), || {
        let log = h.upstream_log();
        log.contains(&later).then_some(()).ok_or(log)
    });
    let log = h.upstream_log();
    assert!(log.contains(&own), "{log}");
    assert!(
        !log.contains(&foreign),
        "a refused query was forwarded: {log}"
    );
    assert!(
        !log.contains(&spoofed),
        "a forged query was forwarded: {log}"
    );
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_flood_of_outside_names_stays_bounded() {
    let mut h = Host::new();
    let t = common::tag();
    let net = format!("dgf{t}");
    h.network(&net, "10.68.0.0/24", "fd68::/64");
    let (c1, c2) = (format!("dgf1{t}"), format!("dgf2{t}"));
    let _ = h.run(&c1, &net, &[]);
    let ip2 = h.run(&c2, &net, &[]);
    let fq2 = format!("{c2}.{net}.ferrynet.internal");
    let gw = "10.68.0.1";
    within(Duration::from_secs(20), || {
        let got = h.short(&c1, gw, &[&fq2, "A"]);
        (got == [v4(&ip2)])
            .then_some(())
            .ok_or(format!("{got:?}\n{}", h.agent_log()))
    });
    // Only the silent upstream remains: every forward holds its socket until the deadline.
    h.dnsmasq.take();
    let pid = h.agent.as_ref().expect("agent").0.id();
    let base = fds(pid);
    // The agent raised its soft limit on open files (1024 when it started) to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect())
        .unwrap_or_default();
    assert!(
        nofile.len() == 2 && nofile[0] == nofile[1] && nofile[0] != "1024",
        "{limits}"
    );

    // 5,000 random outside names, in bursts, then 200 TCP connections held open; every UDP
    // query must get an answer (SERVFAIL at once when the forwards are taken).
    let flood = format!(
        r#"
import json, random, select, socket, string, struct, time
gw = '{gw}'
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
u.setblocking(False)
codes = {{}}
def drain():
    while True:
        try:
            d = u.recv(65535)
        except BlockingIOError:
            return
        codes[d[3] & 15] = codes.get(d[3] & 15, 0) + 1
sent = 0
for i in range(5000):
    name = ''.join(random.choices(string.ascii_lowercase, k=12)) + '.flood.example'
    q = struct.pack('!HHHHHH', i, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0\0\1\0\1'
    u.sendto(q, (gw, 53))
    sent += 1
    if i % 50 == 49:
        drain()
        time.sleep(0.01)
conns = []
for i in range(200):
    try:
        conns.append(socket.create_connection((gw, 53), timeout=2))
    except OSError:
        pass
end = time.time() + 4
while time.time() < end:
    drain()
    time.sleep(0.05)
closed, _, _ = select.select(conns, [], [], 1)
print(json.dumps({{'sent': sent, 'answered': sum(codes.values()), 'servfail': codes.get(2, 0),
                  'tcp': len(conns), 'tcp_open': len(conns) - len(closed)}}))
"#
    );
    let (out, max, during) = std::thread::scope(|s| {
        let flooder = s.spawn(|| h.exec(&c1, &["python3", "-c", &flood]));
        let mut max = base;
        let mut during = Vec::new();
        while !flooder.is_finished() {
            max = max.max(fds(pid));
            if during.is_empty() && max > base + 20 {
                // The flood is on: the network's own names still answer.
                during = h.short(&c2, gw, &[&fq2, "A"]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (flooder.join().expect("flooder"), max, during)
    });
    let r: Value = serde_json::from_str(text(&out).trim())
        .unwrap_or_else(|e| panic!("flood output {e}: {}", text(&out)));
    eprintln!("flood: {r}, fds {base} -> {max}");
    assert_eq!(during, [v4(&ip2)], "own name during the flood: {r}");
    // Per listener: 128 forwards and 64 TCP connections (and a few more for the agent).
    assert!(
        max <= base + 128 + 64 + 32,
        "agent fds {base} -> {max} during the flood: {r}"
    );
    assert!(r["tcp_open"].as_u64() <= Some(64), "{r}");
    assert!(r["servfail"].as_u64() > Some(0), "{r}");
    assert!(
        r["answered"].as_u64().unwrap_or(0) * 10 >= 9 * 5000,
        "queries went unanswered: {r}"
    );
    // And after it.
    assert_eq!(h.short(&c1, gw, &[&fq2, "A"]), [v4(&ip2)]);
    let o = h.exec(
        &c1,
        &["kdig", "+tcp", "+short", &format!("@{gw}"), &fq2, "A"],
    );
    assert_eq!(text(&o).trim(), v4(&ip2), "kdig +tcp after the flood");
}

#[test]
fn other_hosts_blocks_and_the_lab_underlay_are_refused() {
    need("dig", "dnsutils");
    let mut lab = Cluster::up("dnsgr", &["--hosts", "2", "--backend", "route"]);
    let (c1, ip1) = lab.sleeper("h1", "a");
    let (c2, _) = lab.sleeper("h2", "b");
    let fq1 = format!("{c1}.fabric.ferrynet.internal");
    // h1's gateways are c1's nameservers.
    let rc = text(&lab.exec("h1", &["exec", &c1, "--", "cat", "/etc/resolv.conf"]));
    let gws: Vec<String> = rc
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .collect();
    assert_eq!(gws.len(), 2, "{rc}");
    within(Duration::from_secs(20), || {
        let got = lab.short("h1", &c1, &[&fq1, "A"]);
        (got == [v4(&ip1)]).then_some(()).ok_or(format!("{got:?}"))
    });

    // A neighbour on the lab's underlay with routes to the pool through h1.
    let nb = format!("{}-nb", lab.name);
    let ul = format!("{}-ul", lab.name);
    lab.add_netns(&nb);
    let ip = |args: &[&str]| {
        let mut v = vec!["ip"];
        v.extend_from_slice(args);
        must(&v);
    };
    ip(&["-n", &nb, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ul, "link", "add", "nb", "type", "veth", "peer", "name", "eth0", "netns", &nb,
    ]);
    ip(&["-n", &ul, "link", "set", "nb", "master", "ul0", "up"]);
    ip(&["-n", &nb, "addr", "add", "172.31.0.201/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &nb,
        "addr",
        "add",
        "fd31::c9/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &nb, "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        &nb,
        "route",
        "add",
        "10.20.0.0/16",
        "via",
        "172.31.0.1",
    ]);
    ip(&[
        "-n",
        &nb,
        "-6",
        "route",
        "add",
        "fd20::/64",
        "via",
        "fd31::1",
    ]);

    let outside = "outside.test";
    for gw in &gws {
        let at = format!("@{gw}");
        for name in [fq1.as_str(), outside] {
            for proto in ["+notcp", "+tcp"] {
                let dig = ["dig", "+tries=1", "+time=8", &at, name, "A", proto];
                // The same network's container on another host: not a client of h1's blocks.
                let mut cmd = vec!["exec", &c2, "--"];
                cmd.extend_from_slice(&dig);
                let out = text(&lab.exec("h2", &cmd));
                assert!(
                    out.contains("status: REFUSED"),
                    "{c2} on h2 asking h1's {gw} for {name} ({proto}): {out}"
                );
                let mut cmd = vec!["ip", "netns", "exec", &nb];
                cmd.extend_from_slice(&dig);
                let out = text(&common::sh(&cmd));
                assert!(
                    out.contains("status: REFUSED"),
                    "underlay neighbour asking {gw} for {name} ({proto}): {out}"
                );
            }
        }
    }
    // h1's own container still gets its answers.
    assert_eq!(lab.short("h1", &c1, &[&fq1, "A"]), [v4(&ip1)]);
}
