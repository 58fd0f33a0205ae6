//! A throwaway lab for runtime-style tests: a "host" network namespace with its own ferrynet
//! state, "containers" as further namespaces, and an "outside" client namespace wired to the
//! host by a veth. Everything is removed on drop, also when the test fails.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod capture;
pub mod containerd;
pub mod docker;
pub mod docker_rig;
pub mod dockerd;
pub mod lab;
pub mod peers;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names (netns, links) of this test process.
pub fn tag() -> String {
    format!(
        "{:x}{}",
        std::process::id() % 0xffff,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Run a command, panic with its output on spawn failure.
pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

/// Run a command that must succeed.
pub fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A named network namespace removed on drop.
pub struct Ns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Ns {
    /// Create `fnt-<kind>-<tag>`.
    pub fn new(kind: &str) -> Ns {
        let name = format!("fnt-{kind}-{}", tag());
        must(&["ip", "netns", "add", &name]);
        must(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Ns { name }
    }
    /// Its path.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
    /// `nsenter --net=<path>`: enter only the network namespace (not a private mount
    /// namespace as `ip netns exec` does), the way a runtime runs CNI plugins.
    pub fn enter(&self) -> String {
        format!("--net={}", self.path())
    }
    /// Run a command inside.
    pub fn run(&self, args: &[&str]) -> Output {
        let e = self.enter();
        let mut v = vec!["nsenter", e.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
    /// Run a command inside that must succeed; its stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let e = self.enter();
        let mut v = vec!["nsenter", e.as_str()];
        v.extend_from_slice(args);
        must(&v)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A process started in a namespace, killed (by PID) on drop.
pub struct Proc(pub std::process::Child);

impl Proc {
    /// Kill it now (by PID) rather than at the end of the scope.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command's stdout and stderr, for failure messages.
pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Assert that `tool` is installed (a test that needs it fails, never skips).
pub fn need(tool: &str, package: &str) {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .any(|d| std::path::Path::new(d).join(tool).exists());
    assert!(found, "{tool} is missing: apt-get install {package}");
}

/// Retry `f` every 200 ms until it returns Ok, for up to `within`; the last error otherwise.
pub fn try_within<T>(
    within: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let until = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Retry `f` until it returns Ok, for up to `within`; panic with the last failure otherwise.
pub fn within<T>(within: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    try_within(within, f).unwrap_or_else(|e| panic!("not within {within:?}: {e}"))
}

/// A TCP server in `ns` on `port` that answers every connection with `reply` and the peer's
/// address, so tests can check who connected. Waits until it listens.
pub fn tcp_server(ns: &Ns, port: u16, reply: &str) -> Proc {
    tcp_server_at(&ns.enter(), port, reply)
}

/// [`tcp_server`] in the network namespace `enter` names (`--net=PATH`, nsenter's argument).
pub fn tcp_server_at(enter: &str, port: u16, reply: &str) -> Proc {
    let code = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',{port}));s.listen(64)\n\
         print('ready',flush=True)\n\
         while True:\n  c,a=s.accept();h=a[0]\n  h=h[7:] if h.startswith('::ffff:') else h\n  c.sendall(('{reply} '+h+'\\n').encode());c.close()\n"
    );
    let mut child = Command::new("nsenter")
        .args([enter, "python3", "-u", "-c", &code])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).expect("server did not start");
    Proc(child)
}

/// Connect from `ns` to `addr`:`port`; the server's reply line, or None.
pub fn tcp_get(ns: &Ns, addr: &str, port: u16) -> Option<String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=3)\nprint(s.recv(200).decode().strip())"
    );
    let o = ns.run(&["python3", "-c", &code]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The lab: host netns, state dir, and the ferrynet binary run as a CNI plugin inside it.
pub struct Lab {
    /// The "host".
    pub host: Ns,
    /// ferrynet's state directory for this lab.
    pub state: tempfile::TempDir,
    /// Unique tag for network names.
    pub tag: String,
}

/// Result of one plugin call.
#[derive(Debug)]
pub struct Call {
    /// Exit code.
    pub code: i32,
    /// stdout parsed as JSON (Null if empty/unparseable).
    pub json: Value,
    /// Raw stderr.
    pub stderr: String,
}

/// A veth from `host` (None: this namespace), named `link` there with `host_ip`/24, to `client`
/// (`ext0`, `client_ip`/24, default route via `host_ip`). Removed with the client namespace.
pub fn wire_client(host: Option<&Ns>, client: &Ns, link: &str, host_ip: &str, client_ip: &str) {
    let on_host = |args: &[&str]| match host {
        Some(h) => h.must(args),
        None => must(args),
    };
    on_host(&[
        "ip",
        "link",
        "add",
        link,
        "type",
        "veth",
        "peer",
        "name",
        "ext0",
        "netns",
        &client.name,
    ]);
    on_host(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", link]);
    on_host(&["ip", "link", "set", link, "up"]);
    client.must(&[
        "ip",
        "addr",
        "add",
        &format!("{client_ip}/24"),
        "dev",
        "ext0",
    ]);
    client.must(&["ip", "link", "set", "ext0", "up"]);
    client.must(&["ip", "route", "add", "default", "via", host_ip]);
}

/// Links of namespace `ns` (None: this one) whose names start with one of `prefixes`.
pub fn links_in(ns: Option<&str>, prefixes: &[&str]) -> Vec<String> {
    let o = match ns {
        Some(ns) => sh(&["ip", "-n", ns, "-j", "link", "show"]),
        None => sh(&["ip", "-j", "link", "show"]),
    };
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// The elements of nft set or map `kind` `family table name` in namespace `ns` (None: this
/// one); none when the table is gone.
fn nft_elements(ns: Option<&str>, kind: &str, family: &str, table: &str, name: &str) -> Vec<Value> {
    let list = ["nft", "-j", "list", kind, family, table, name];
    let o = match ns {
        Some(ns) => {
            let mut a = vec!["ip", "netns", "exec", ns];
            a.extend_from_slice(&list);
            sh(&a)
        }
        None => sh(&list),
    };
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x[kind]["elem"].as_array())
        .flatten()
        .cloned()
        .collect()
}

/// Elements of one of ferrynet's port maps in namespace `ns` (None: this one); none when the
/// table is gone.
pub fn map_elements(ns: Option<&str>, map: &str) -> Vec<Value> {
    nft_elements(ns, "map", "inet", "ferrynet", map)
}

/// Elements of one set of the anti-spoofing table (`bridge ferrynet`), in `ns` or here.
pub fn guard_elements(ns: Option<&str>, set: &str) -> Vec<Value> {
    nft_elements(ns, "set", "bridge", "ferrynet", set)
}

/// Wait until `socket` accepts connections; fail with `log()` if `child` (then set to None)
/// exits first or 20 s pass. `what` names the process in the message.
pub fn wait_for_socket(
    child: &mut Option<std::process::Child>,
    socket: &std::path::Path,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(Ok(Some(st))) = child.as_mut().map(|c| c.try_wait()) {
            *child = None;
            panic!("{what} exited early ({st}): {}", log());
        }
        assert!(
            Instant::now() < deadline,
            "{what} socket never appeared: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ferrynet binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrynet")
}

impl Lab {
    /// A new host namespace with forwarding on.
    pub fn new() -> Lab {
        let host = Ns::new("h");
        Lab {
            host,
            state: tempfile::tempdir().expect("tempdir"),
            tag: tag(),
        }
    }

    /// A network config (single-plugin form) with one IPv4 and one IPv6 subnet.
    pub fn conf(&self, name: &str, v4: &str, v6: Option<&str>) -> Value {
        let mut subnets = vec![json!({"cidr": v4})];
        if let Some(v6) = v6 {
            subnets.push(json!({"cidr": v6}));
        }
        json!({
            "cniVersion": "1.1.0",
            "name": name,
            "type": "ferrynet",
            "subnets": subnets,
            "stateDir": self.state.path().display().to_string(),
        })
    }

    /// Invoke a CNI plugin binary (ferrynet or a reference plugin) in the host netns.
    pub fn call_plugin(&self, plugin: &str, cmd: &str, conf: &Value, env: &[(&str, &str)]) -> Call {
        let mut c = Command::new("nsenter");
        c.args([&self.host.enter(), plugin]);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", cmd)
            .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write conf");
        let o = child.wait_with_output().expect("plugin output");
        Call {
            code: o.status.code().unwrap_or(-1),
            json: serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Invoke ferrynet as a CNI plugin.
    pub fn cni(&self, cmd: &str, conf: &Value, env: &[(&str, &str)]) -> Call {
        self.call_plugin(bin(), cmd, conf, env)
    }

    /// ADD a container; panics unless it succeeds.
    pub fn add(&self, conf: &Value, id: &str, ns: &Ns, ifname: &str) -> Value {
        let c = self.cni(
            "ADD",
            conf,
            &[
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &ns.path()),
                ("CNI_IFNAME", ifname),
            ],
        );
        assert_eq!(c.code, 0, "ADD failed: {} {}", c.json, c.stderr);
        c.json
    }

    /// DEL a container; returns the call.
    pub fn del(&self, conf: &Value, id: &str, ns: Option<&Ns>, ifname: &str) -> Call {
        let path = ns.map(|n| n.path()).unwrap_or_default();
        let mut env = vec![("CNI_CONTAINERID", id), ("CNI_IFNAME", ifname)];
        if ns.is_some() {
            env.push(("CNI_NETNS", &path));
        }
        self.cni("DEL", conf, &env)
    }

    /// Run the ferrynet CLI in the host netns with this lab's state.
    pub fn cli(&self, args: &[&str]) -> Output {
        let state = self.state.path().display().to_string();
        let e = self.host.enter();
        let mut v = vec!["nsenter", e.as_str(), bin(), "--state-dir", &state];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Wire an "outside" client namespace to the host: host side `addr_host`, client `addr_client`
    /// (both /24 in 10.250.N.0), client default route via the host.
    pub fn outside(&self, n: u8) -> (Ns, String, String) {
        let client = Ns::new("o");
        let host_ip = format!("10.250.{n}.1");
        let client_ip = format!("10.250.{n}.2");
        wire_client(
            Some(&self.host),
            &client,
            &format!("fto{}", tag()),
            &host_ip,
            &client_ip,
        );
        (client, host_ip, client_ip)
    }

    /// Addresses (CIDR) of `ifname` in `ns`.
    pub fn addrs(ns: &Ns, ifname: &str) -> Vec<String> {
        let o = ns.run(&["ip", "-j", "addr", "show", "dev", ifname]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v.get(0)
            .and_then(|i| i["addr_info"].as_array())
            .map(|a| {
                a.iter()
                    .filter(|x| x["scope"] == "global")
                    .map(|x| format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `ferrynet guard --json` on the host, as reason → dropped packets.
    pub fn guard_counters(&self) -> std::collections::BTreeMap<String, u64> {
        let o = self.cli(&["guard", "--json"]);
        assert!(o.status.success(), "guard: {}", out(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("guard json");
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["reason"].as_str().unwrap_or_default().to_string(),
                    c["packets"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Links in the host netns whose names start with `prefix`.
    pub fn host_links(&self, prefix: &str) -> Vec<String> {
        links_in(Some(&self.host.name), &[prefix])
    }

    /// Number of elements in one of ferrynet's port maps in the host netns.
    pub fn map_len(&self, map: &str) -> usize {
        map_elements(Some(&self.host.name), map).len()
    }
}

/// The first IPv4 address of an ADD result.
pub fn first_v4(result: &Value) -> String {
    result["ips"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(|i| i["address"].as_str())
                .find(|a| !a.contains(':'))
        })
        .map(|a| a.split('/').next().unwrap_or("").to_string())
        .unwrap_or_default()
}
