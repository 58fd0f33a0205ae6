//! A multi-host `ferrynet lab` on a real etcd for the multi-host tests: hosts are network
//! namespaces with an agent each. The containers `run` made and the namespaces `add_netns`
//! added are removed with the lab on drop, also when a test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, must, out, Proc};

/// A container made with `ferrynet run` on a lab host.
#[derive(Clone, Debug)]
pub struct Container {
    /// Its name: the lab's name and a short suffix.
    pub name: String,
    /// The lab host it runs on.
    pub host: String,
    /// Its addresses, without prefix length.
    pub ips: Vec<String>,
    /// Its first IPv4 address.
    pub v4: String,
    /// Its first IPv6 address ("" when it has none).
    pub v6: String,
}

impl Container {
    /// Its network namespace's name.
    pub fn netns(&self) -> String {
        format!("fnc-{}", self.name)
    }
}

/// A dual-stack echo server on port 7000 (python3): TCP, one thread per connection, and UDP.
pub const ECHO_SERVER: &str = "import socket,threading\n\
    s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
    s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',7000));s.listen(64)\n\
    def serve(c):\n  while True:\n    d=c.recv(65536)\n    if not d: break\n    c.sendall(d)\n  c.close()\n\
    def udp():\n  u=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n  u.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);u.bind(('::',7000))\n  while True:\n    d,a=u.recvfrom(65536);u.sendto(d,a)\n\
    threading.Thread(target=udp,daemon=True).start()\n\
    while True:\n  c,_=s.accept();threading.Thread(target=serve,args=(c,),daemon=True).start()\n";

/// A lab, removed on drop with what the test made on it.
pub struct Lab {
    /// Its name (the prefix of its namespaces and links).
    pub name: String,
    /// Containers as (host, name), removed before the lab goes.
    containers: Vec<(String, String)>,
    /// Extra namespaces on the lab's underlay, removed after it.
    netns: Vec<String>,
    /// Processes in a container's namespace by container name, killed (by PID) first.
    pub servers: BTreeMap<String, Proc>,
    /// Other processes the test started, killed (by PID) first.
    pub procs: Vec<Proc>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.servers.clear();
        self.procs.clear();
        for (host, c) in &self.containers {
            let _ = self.exec(host, &["rm", "--force", c]);
        }
        let _ = Command::new(bin())
            .args(["lab", "down", "--name", &self.name])
            .output();
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Lab {
    /// `ferrynet lab up --name NAME ARGS` (`--hosts`, `--backend`, …), after removing a
    /// leftover lab of the same name (a killed earlier run).
    pub fn up(name: &str, args: &[&str]) -> Lab {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "etcd is missing: apt-get install etcd-server"
        );
        let _ = Command::new(bin())
            .args(["lab", "down", "--name", name])
            .output();
        let lab = Lab {
            name: name.to_string(),
            containers: Vec::new(),
            netns: Vec::new(),
            servers: BTreeMap::new(),
            procs: Vec::new(),
        };
        let o = Command::new(bin())
            .args(["lab", "up", "--name", name])
            .args(args)
            .output()
            .expect("run lab up");
        assert!(o.status.success(), "lab up failed: {}", out(&o));
        lab
    }

    /// The usual lab: three hosts over VXLAN.
    pub fn vxlan3(name: &str) -> Lab {
        Lab::up(name, &["--hosts", "3", "--backend", "vxlan"])
    }

    /// The network namespace of lab host `host`.
    pub fn host_ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    /// The tail (last `n` lines, newest first) of `host`'s agent log.
    pub fn agent_log_tail(&self, host: &str, n: usize) -> String {
        let log =
            std::fs::read_to_string(format!("/run/ferrynet-lab/{}/{host}/agent.log", self.name))
                .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(n).collect();
        tail.join("\n")
    }

    /// `ferrynet ARGS` on `host`.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(["lab", "exec", "--name", &self.name, host, "--", bin()])
            .args(args)
            .output()
            .expect("lab exec")
    }

    /// `ferrynet ARGS` on `host`, which must succeed; its stdout.
    pub fn ok(&self, host: &str, args: &[&str]) -> String {
        let o = self.exec(host, args);
        assert!(o.status.success(), "{args:?} on {host}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ferrynet ARGS` on `host`, which must fail saying `what`.
    pub fn fails(&self, host: &str, args: &[&str], what: &str) {
        let o = self.exec(host, args);
        assert!(
            !o.status.success() && out(&o).contains(what),
            "{args:?} should fail with {what:?}: {}",
            out(&o)
        );
    }

    /// `ferrynet lab ARGS --name NAME`, which must succeed.
    pub fn lab(&self, args: &[&str]) {
        let mut a = vec!["lab"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--name", &self.name]);
        let o = Command::new(bin()).args(&a).output().expect("lab cmd");
        assert!(o.status.success(), "lab {args:?}: {}", out(&o));
    }

    /// `ferrynet status --json` on `host`.
    pub fn status(&self, host: &str) -> Value {
        self.try_status(host).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `status --json` on `host`, or why not (e.g. an agent just started, not yet listening).
    pub fn try_status(&self, host: &str) -> Result<Value, String> {
        let o = self.exec(host, &["status", "--json"]);
        if !o.status.success() {
            return Err(format!("status on {host}: {}", out(&o)));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("status on {host}: {e}"))
    }

    /// `ferrynet run --name LAB+short --net fabric EXTRA -- CMD` on `host`, removed with the
    /// lab; its addresses as `ps` shows them.
    pub fn run(&mut self, host: &str, short: &str, extra: &[&str], cmd: &[&str]) -> Container {
        self.run_on(host, short, "fabric", extra, cmd)
    }

    /// [`Lab::run`] on network `net`.
    pub fn run_on(
        &mut self,
        host: &str,
        short: &str,
        net: &str,
        extra: &[&str],
        cmd: &[&str],
    ) -> Container {
        let name = format!("{}{short}", self.name);
        let mut args = vec!["run", "--name", &name, "--net", net];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(cmd);
        let o = self.exec(host, &args);
        assert!(o.status.success(), "run {name} on {host}: {}", out(&o));
        self.containers.push((host.to_string(), name.clone()));
        let list: Vec<Value> =
            serde_json::from_str(&self.ok(host, &["ps", "--json"])).expect("ps json");
        let ips: Vec<String> = list
            .iter()
            .find(|c| c["name"] == name.as_str())
            .and_then(|c| c["ips"].as_array())
            .unwrap_or_else(|| panic!("{name} not in ps on {host}: {list:?}"))
            .iter()
            .filter_map(|v| v.as_str()?.split('/').next().map(str::to_string))
            .collect();
        let v4 = ips
            .iter()
            .find(|i| !i.contains(':'))
            .cloned()
            .expect("an IPv4 address");
        let v6 = ips.iter().find(|i| i.contains(':')).cloned();
        Container {
            name,
            host: host.to_string(),
            v4,
            v6: v6.unwrap_or_default(),
            ips,
        }
    }

    /// A container on `host` (network `fabric`) running a dual-stack TCP and UDP echo server
    /// on port 7000.
    pub fn echo_container(&mut self, host: &str, short: &str) -> Container {
        let c = self.run(host, short, &[], &["python3", "-c", ECHO_SERVER]);
        assert!(!c.v6.is_empty(), "v6");
        c
    }

    /// Remove container `c` now (`ferrynet rm --force`, which must succeed), after killing
    /// its server.
    pub fn rm(&mut self, c: &Container) {
        if let Some(s) = self.servers.remove(&c.name) {
            s.kill();
        }
        self.ok(&c.host, &["rm", "--force", &c.name]);
        self.containers.retain(|(_, n)| *n != c.name);
    }

    /// Cut `host` off from the lab's etcd (172.31.0.253, both directions, by an nftables drop
    /// in its namespace), or heal it.
    pub fn cut_from_store(&self, host: &str, on: bool) {
        let ns = self.host_ns(host);
        let script = if on {
            "add table inet fnpartition\n\
             add chain inet fnpartition out { type filter hook output priority -10; }\n\
             add chain inet fnpartition in { type filter hook input priority -10; }\n\
             add rule inet fnpartition out ip daddr 172.31.0.253 drop\n\
             add rule inet fnpartition in ip saddr 172.31.0.253 drop\n"
        } else {
            "delete table inet fnpartition\n"
        };
        let o = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft");
        assert!(o.status.success(), "nft in {ns}: {}", out(&o));
    }

    /// Create namespace `ns` (removed after the lab on drop); `ip netns add` must succeed.
    pub fn add_netns(&mut self, ns: &str) {
        let o = Command::new("ip")
            .args(["netns", "add", ns])
            .output()
            .expect("ip netns add");
        assert!(o.status.success(), "ip netns add {ns}: {}", out(&o));
        self.netns.push(ns.to_string());
    }

    /// An "outside" namespace on the lab's underlay (172.31.0.200, fd31::c8), removed with
    /// the lab; its name.
    pub fn outside(&mut self) -> String {
        let ns = format!("{}-out", self.name);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let ul = format!("{}-ul", self.name);
        self.add_netns(&ns);
        for args in [
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec![
                "-n", &ul, "link", "add", "out", "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
            vec!["-n", &ul, "link", "set", "out", "master", "ul0", "up"],
            vec!["-n", &ns, "addr", "add", "172.31.0.200/24", "dev", "eth0"],
            vec![
                "-n",
                &ns,
                "addr",
                "add",
                "fd31::c8/64",
                "dev",
                "eth0",
                "nodad",
            ],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
        ] {
            let mut v = vec!["ip"];
            v.extend(args);
            must(&v);
        }
        ns
    }

    /// A container on `host` running the dual-stack echo server ([`ECHO_SERVER`]) on port 7000.
    pub fn container(&mut self, host: &str, short: &str) -> Container {
        self.echo_container(host, short)
    }
}

/// One echo from every container to every other one's IPv4 and IPv6 address (5 s each).
pub fn all_pairs(cs: &[Container]) {
    all_pairs_with(cs, |a, addr| echo(a, addr, Duration::from_secs(5)));
}

/// A client in `from` that sends a line every 20 ms to `addr`:7000 and checks the echo,
/// for `secs`; prints the longest gap it saw and exits non-zero on any error.
pub fn stream(from: &Container, addr: &str, secs: u32) -> Child {
    let code = format!(
        "import socket,time,sys\n\
         s=socket.create_connection(('{addr}',7000),timeout=5)\n\
         print('connected',flush=True)\n\
         end=time.time()+{secs};worst=0;n=0\n\
         while time.time()<end:\n  t=time.time();s.sendall(b'x'*64);d=b''\n  \
         while len(d)<64:\n    r=s.recv(64-len(d))\n    assert r,'closed'\n    d+=r\n  \
         worst=max(worst,time.time()-t);n+=1;time.sleep(0.02)\n\
         print('ok',n,round(worst,3),flush=True)\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &from.netns(), "python3", "-u", "-c", &code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stream client");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    child
}

/// Run `check(from, addr)` from every container to every other one's IPv4 and IPv6 address;
/// panic listing every pair that failed.
pub fn all_pairs_with(cs: &[Container], check: impl Fn(&Container, &str) -> Result<(), String>) {
    let mut failures = Vec::new();
    for a in cs {
        for b in cs.iter().filter(|b| b.name != a.name) {
            for addr in [&b.v4, &b.v6].into_iter().filter(|s| !s.is_empty()) {
                if let Err(e) = check(a, addr) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unreachable pairs:\n{}",
        failures.join("\n")
    );
}

/// One TCP round trip from `from` to `addr`:7000 (retried for up to `within`).
pub fn echo(from: &Container, addr: &str, within: Duration) -> Result<(), String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',7000),timeout=2)\ns.sendall(b'ping')\nassert s.recv(4)==b'ping'\n"
    );
    let until = Instant::now() + within;
    loop {
        let o = Command::new("ip")
            .args(["netns", "exec", &from.netns(), "python3", "-c", &code])
            .output()
            .expect("python3");
        if o.status.success() {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("{} -> {addr}: {}", from.name, out(&o)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
