//! ferrynet's Docker driver across restarts of dockerd: a clean stop, a crash, `--live-restore`,
//! published ports, and the driver itself down while dockerd restarts.
//!
//! The machine's shared engine is never restarted: each test runs a private dockerd
//! (`common::dockerd`) in a "host" network namespace of its own, with the agent serving the
//! driver there under a driver name nobody else asks for (`/run/docker/plugins/fnt-<tag>.sock`)
//! and its own state directory; an "outside" client namespace is wired to the host by a veth.
//! Each test has its own namespaces, nftables table and subnet, so tests run in parallel and
//! beside `docker_cnm`. Everything (containers, networks, the engine with its directories and
//! mounts, the agent, the namespaces) is removed in Drop guards, also when a test fails.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::dockerd::{import_busybox, Dockerd};
use common::{bin, out, sh, tag, Ns};
use serde_json::Value;

/// How long containers get to come back after dockerd starts again.
const COME_BACK: Duration = Duration::from_secs(60);

/// `ferrynet agent --docker-socket` in the host namespace, its Engine API namer pointed at the
/// private engine; stopped with SIGTERM on drop.
struct Agent {
    child: Option<Child>,
    host: String,
    socket: PathBuf,
    state: tempfile::TempDir,
    log: PathBuf,
    docker_host: String,
}

impl Agent {
    fn start(host: &Ns, driver: &str, docker_host: &str) -> Agent {
        let state = tempfile::tempdir().expect("state dir");
        let mut a = Agent {
            child: None,
            host: host.path(),
            socket: PathBuf::from(format!("/run/docker/plugins/{driver}.sock")),
            log: state.path().join("agent.log"),
            state,
            docker_host: docker_host.to_string(),
        };
        a.spawn();
        a
    }

    /// Start it (again) on the same socket and state; wait until the socket answers.
    fn spawn(&mut self) {
        self.spawn_with(None);
    }

    /// [`Agent::spawn`], aborting at crash point `failpoint` when given.
    fn spawn_with(&mut self, failpoint: Option<&str>) {
        assert!(self.child.is_none(), "already running");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let state = self.state.path().display().to_string();
        let socket = self.socket.display().to_string();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.host))
            .args([bin(), "--state-dir", &state, "agent", "--no-dns"])
            .args(["--docker-socket", &socket])
            .env("DOCKER_HOST", &self.docker_host)
            .env("FERRYNET_LOG", "debug")
            .env("FERRYNET_FAILPOINT", failpoint.unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start the agent");
        self.child = Some(child);
        let log = self.log.clone();
        common::wait_for_socket(&mut self.child, &self.socket, "agent", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        });
    }

    /// SIGTERM and wait (SIGKILL after 10 s); its exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().ok();
                let _ = std::fs::remove_file(&self.socket);
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the agent to die at a crash point (60 s at most); its exit status. Its socket
    /// file stays behind, as after a real crash.
    fn wait_crashed(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent started");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not reach its crash point:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The ferrynet CLI on this agent's state, in the host namespace.
    fn cli(&self, args: &[&str]) -> Output {
        let state = self.state.path().display().to_string();
        let net = format!("--net={}", self.host);
        let mut v = vec!["nsenter", net.as_str(), bin(), "--state-dir", &state];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Every key of the store but the publish sequence and the agent's host registration.
    fn store_keys(&self) -> Vec<String> {
        let store = ferrynet_store::EmbeddedStore::open(self.state.path().join("store.redb"))
            .expect("open the store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (kvs, _) = rt
            .block_on(ferrynet_store::Store::range(&store, "/ferrynet/v1/"))
            .expect("read the store");
        kvs.into_iter()
            .map(|kv| kv.key)
            .filter(|k| k != "/ferrynet/v1/ports-seq" && !k.starts_with("/ferrynet/v1/hosts/"))
            .collect()
    }

    /// How many host ports the store's port claims hold, in all.
    fn claimed_ports(&self) -> usize {
        let store = ferrynet_store::EmbeddedStore::open(self.state.path().join("store.redb"))
            .expect("open the store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (kvs, _) = rt
            .block_on(ferrynet_store::Store::range(
                &store,
                &ferrynet_model::network::keys::port_claims(),
            ))
            .expect("read the store");
        kvs.iter()
            .map(|kv| {
                let c: ferrynet_model::portclaim::PortClaim =
                    serde_json::from_slice(&kv.value).expect("a port claim record");
                c.runs
                    .iter()
                    .map(|r| usize::from(r.last - r.first) + 1)
                    .sum::<usize>()
            })
            .sum()
    }

    /// The last part of the store keys under `/ferrynet/v1/<what>/<network>/`.
    fn keys_under(&self, what: &str, network: &str) -> BTreeSet<String> {
        let prefix = format!("/ferrynet/v1/{what}/{network}/");
        self.store_keys()
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Networks left after a failure: removed with their bridges (the CLI works on the store).
        let o = self.cli(&["network", "ls", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        for n in v.as_array().into_iter().flatten() {
            if let Some(name) = n["name"].as_str() {
                let _ = self.cli(&["network", "rm", "--force", name]);
            }
        }
        let _ = self.stop();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
    }
}

/// One test's world: host and client namespaces, the agent, the private engine with a busybox
/// image and one ferrynet network. Dropped in reverse: Docker objects, engine, agent, namespaces.
struct Rig {
    // Field order is drop order after `Drop::drop`: engine, agent, then the namespaces.
    docker: Dockerd,
    agent: Agent,
    client: Ns,
    host: Ns,
    /// The host's address on the client's link (the published ports' address).
    host_ip: String,
    image: String,
    driver: String,
    /// The Docker network, its ferrynet name, its subnet's first three octets.
    net: String,
    fname: String,
    prefix: String,
}

impl Rig {
    /// Subnet `10.232.<n>.0/24` and client link `10.254.<n>.0/24`: distinct per test.
    fn new(n: u8, dockerd_args: &[&str]) -> Rig {
        assert!(
            std::path::Path::new("/bin/busybox").exists(),
            "these tests build their image from Debian's busybox-static: apt-get install busybox-static"
        );
        common::need("dockerd", "docker.io");
        common::need("nft", "nftables");
        let t = tag();
        let host = Ns::new("rh");
        let client = Ns::new("rc");
        let host_ip = format!("10.254.{n}.1");
        let client_ip = format!("10.254.{n}.2");
        common::wire_client(
            Some(&host),
            &client,
            &format!("frh{t}"),
            &host_ip,
            &client_ip,
        );
        // The agent's underlay is the default route's interface.
        host.must(&["ip", "route", "add", "default", "via", &client_ip]);
        let driver = format!("fnt-{t}");
        let docker_host = format!("unix:///run/fnd-{t}.sock");
        let agent = Agent::start(&host, &driver, &docker_host);
        let docker = Dockerd::start_with(&t, Some(&host.name), dockerd_args);
        assert_eq!(docker.host(), docker_host);
        let image = format!("fnt-busybox:{t}");
        import_busybox(&docker.host(), &image);
        let net = format!("{driver}-net");
        let prefix = format!("10.232.{n}");
        let mut rig = Rig {
            docker,
            agent,
            client,
            host,
            host_ip,
            image,
            driver: driver.clone(),
            net: net.clone(),
            fname: String::new(),
            prefix: prefix.clone(),
        };
        let id = rig.docker.docker_ok(&[
            "network",
            "create",
            "-d",
            &driver,
            "--ipam-driver",
            &driver,
            "--subnet",
            &format!("{prefix}.0/24"),
            &net,
        ]);
        rig.fname = format!("docker-{}", &id[..12]);
        rig
    }

    fn d(&self, args: &[&str]) -> String {
        self.docker.docker_ok(args)
    }

    /// `docker run -d --restart always --name NAME [ARGS] IMAGE CMD` on the network.
    fn run(&self, name: &str, args: &[&str], cmd: &[&str]) {
        let mut v = vec!["run", "-d", "--name", name, "--network", &self.net];
        v.extend_from_slice(args);
        v.push(&self.image);
        v.extend_from_slice(cmd);
        self.d(&v);
    }

    /// A `--restart always` server answering TCP on 7000 with `reply`.
    fn echo_server(&self, name: &str, reply: &str, args: &[&str]) {
        let mut a = vec!["--restart", "always"];
        a.extend_from_slice(args);
        self.run(
            name,
            &a,
            &["/bin/nc", "-ll", "-p", "7000", "-e", "/bin/echo", reply],
        );
    }

    fn inspect(&self, c: &str, field: &str) -> String {
        self.d(&[
            "inspect",
            "-f",
            &format!("{{{{range .NetworkSettings.Networks}}}}{{{{.{field}}}}}{{{{end}}}}"),
            c,
        ])
    }

    fn ip_of(&self, c: &str) -> String {
        self.inspect(c, "IPAddress")
    }

    /// `docker exec FROM nc IP 7000`: the server's answer.
    fn talk(&self, from: &str, ip: &str) -> Result<String, String> {
        let o = self
            .docker
            .docker(&["exec", from, "/bin/nc", "-w", "3", ip, "7000"]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !s.is_empty() {
            Ok(s)
        } else {
            Err(format!("{from} -> {ip}:7000: {}", out(&o)))
        }
    }

    /// From the client namespace to the host's published `port`: the server's answer.
    fn via_port(&self, port: u16) -> Result<String, String> {
        let o = self.client.run(&[
            "/bin/busybox",
            "nc",
            "-w",
            "3",
            &self.host_ip,
            &port.to_string(),
        ]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !s.is_empty() {
            Ok(s)
        } else {
            Err(format!("client -> {}:{port}: {}", self.host_ip, out(&o)))
        }
    }

    /// Wait until every container in `names` runs with an address on the network.
    fn wait_running(&self, names: &[&str]) {
        common::within(COME_BACK, || {
            for n in names {
                let o = self.docker.docker(&[
                    "inspect",
                    "-f",
                    "{{.State.Running}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    n,
                ]);
                let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if !s.starts_with("true ") || s.len() <= "true ".len() {
                    return Err(format!("{n}: {s} {}", out(&o)));
                }
            }
            Ok(())
        });
    }

    /// `docker ARGS` while the driver, restarted with crash point `point`, dies there; the
    /// driver is started again at once (as a supervisor would) and Docker's call, which waits
    /// on and retries the driver, is left to finish as it may.
    fn docker_while_driver_dies(&mut self, point: &str, args: &[&str]) {
        use std::os::unix::process::ExitStatusExt;
        let st = self.agent.stop().expect("agent was running");
        assert!(st.success(), "{st}");
        self.agent.spawn_with(Some(point));
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.docker.host()).args(args);
        let call = std::thread::spawn(move || cmd.output());
        let st = self.agent.wait_crashed();
        assert_eq!(st.signal(), Some(6), "aborted at {point}: {st}");
        assert!(
            self.agent
                .log_text()
                .contains(&format!("crash point {point} reached")),
            "{}",
            self.agent.log_text()
        );
        let _ = std::fs::remove_file(&self.agent.socket);
        self.agent.spawn();
        let _ = call.join().expect("docker call thread");
    }

    /// Elements of one set of the anti-spoofing table in the host namespace.
    fn guard_elements(&self, set: &str) -> Vec<Value> {
        common::guard_elements(Some(&self.host.name), set)
    }

    /// Links in the host namespace starting with `prefix`.
    fn links(&self, prefix: &str) -> Vec<String> {
        common::links_in(Some(&self.host.name), &[prefix])
    }

    /// Elements of one of ferrynet's port maps in the host namespace (0 without the table).
    fn map_elems(&self, map: &str) -> Vec<String> {
        common::map_elements(Some(&self.host.name), map)
            .iter()
            .map(Value::to_string)
            .collect()
    }

    /// ferrynet holds exactly what the live containers `names` need on the network: one
    /// endpoint record per Docker endpoint, one address each (beside `base`, what the empty
    /// network holds), one host veth each, `ports` published ports; nothing else.
    fn assert_exactly(&self, names: &[&str], base: &BTreeSet<String>, ports: usize) {
        let eps: BTreeSet<String> = names
            .iter()
            .map(|n| self.inspect(n, "EndpointID"))
            .collect();
        let ips: BTreeSet<String> = names.iter().map(|n| self.ip_of(n)).collect();
        assert_eq!(eps.len(), names.len(), "endpoint ids {eps:?}");
        assert_eq!(
            ips.len(),
            names.len(),
            "two containers share an address: {ips:?}"
        );
        assert_eq!(
            self.agent.keys_under("endpoints", &self.fname),
            eps,
            "endpoint records vs Docker's endpoints"
        );
        let held: BTreeSet<String> = self
            .agent
            .keys_under("ipam", &self.fname)
            .difference(base)
            .cloned()
            .collect();
        assert_eq!(
            held, ips,
            "address allocations vs the containers' addresses"
        );
        let veths = self.links("fnv");
        assert_eq!(veths.len(), names.len(), "host veths: {veths:?}");
        let peers = self.links("fnp");
        assert!(peers.is_empty(), "unmoved peer ends left: {peers:?}");
        let claims = self.agent.claimed_ports();
        assert_eq!(claims, ports, "published ports claimed in the store");
        let elems = self.map_elems("pm4_any");
        assert_eq!(elems.len(), ports, "published-port elements: {elems:?}");
    }

    /// Remove the containers (one at a time: Docker 20.10 removing several of one network in
    /// parallel can lose count of its endpoints) and the network; assert nothing is left.
    fn tear_down_clean(&self, names: &[&str]) {
        for n in names {
            self.d(&["rm", "-f", n]);
        }
        self.d(&["network", "rm", &self.net]);
        let left = self.links("fn");
        assert!(left.is_empty(), "links left: {left:?}");
        let keys = self.agent.store_keys();
        assert!(keys.is_empty(), "records left in the store: {keys:?}");
        assert!(
            !self
                .host
                .run(&["nft", "list", "table", "inet", "ferrynet"])
                .status
                .success(),
            "the nftables table goes with the last network"
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Docker objects go through a running engine, so the driver sees them leave. A test
        // that failed with the engine down (a crash test) starts it again for that.
        if !self.docker.is_running() {
            let d = &mut self.docker;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.restart()));
        }
        if self.docker.is_running() {
            let ids = self.docker.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.docker.docker(&["rm", "-f", id]);
            }
            let _ = self.docker.docker(&["network", "rm", &self.net]);
        }
        if std::thread::panicking() {
            let o = self.host.run(&["ip", "-br", "link"]);
            eprintln!("--- host links ---\n{}", out(&o));
            eprintln!("--- store ---\n{:?}", self.agent.store_keys());
        }
    }
}

/// 1. A clean restart (SIGTERM): the driver is found again, `--restart always` containers come
///    back and talk, a new one joins, and ferrynet holds exactly what the live containers need.
#[test]
fn clean_restart_brings_containers_back_without_leaks() {
    let mut rig = Rig::new(1, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("srv", "pong-srv", &[]);
    rig.run(
        "web",
        &["--restart", "always", "-p", "18090:80"],
        &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
    );
    let (srv_ip, web_ip) = (rig.ip_of("srv"), rig.ip_of("web"));
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("web", &srv_ip)),
        "pong-srv"
    );
    let page = |rig: &Rig, ip: &str| {
        let o = rig.docker.docker(&[
            "exec",
            "srv",
            "/bin/wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip}/"),
        ]);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        if s.contains("hello from a private engine") {
            Ok(s)
        } else {
            Err(out(&o))
        }
    };
    common::within(Duration::from_secs(15), || page(&rig, &web_ip));
    rig.assert_exactly(&["srv", "web"], &base, 1);

    rig.docker.restart();

    let ls = rig.d(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(
        ls.contains(&format!("{} {}", rig.net, rig.driver)),
        "the network is still listed: {ls}"
    );
    rig.wait_running(&["srv", "web"]);
    let (srv_ip, web_ip) = (rig.ip_of("srv"), rig.ip_of("web"));
    assert!(srv_ip.starts_with(&rig.prefix) && web_ip.starts_with(&rig.prefix));
    assert_eq!(
        common::within(COME_BACK, || rig.talk("web", &srv_ip)),
        "pong-srv",
        "after the restart"
    );
    common::within(COME_BACK, || page(&rig, &web_ip));
    // A new container joins the network the engine found again.
    rig.echo_server("new", "pong-new", &[]);
    let new_ip = rig.ip_of("new");
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("new", &srv_ip)),
        "pong-srv"
    );
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("srv", &new_ip)),
        "pong-new"
    );
    rig.assert_exactly(&["srv", "web", "new"], &base, 1);
    rig.tear_down_clean(&["srv", "web", "new"]);
}

/// `nc IP 7000` from the network namespace of process `pid` (a container's, while the engine
/// is down and `docker exec` cannot be used).
fn talk_from_pid(pid: &str, ip: &str) -> Result<String, String> {
    let o = sh(&[
        "nsenter",
        &format!("--net=/proc/{pid}/ns/net"),
        "/bin/busybox",
        "nc",
        "-w",
        "3",
        ip,
        "7000",
    ]);
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if o.status.success() && !s.is_empty() {
        Ok(s)
    } else {
        Err(format!("pid {pid} -> {ip}:7000: {}", out(&o)))
    }
}

/// 2. dockerd killed (SIGKILL; its containerd and the containers' shims live on): started
///    again, Docker removes the old sandboxes and endpoints and restarts the `always`
///    containers; ferrynet ends with exactly the live endpoints and their addresses.
#[test]
fn crash_of_dockerd_leaves_exactly_the_live_endpoints() {
    let mut rig = Rig::new(2, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("ca", "pong-a", &[]);
    rig.echo_server("cb", "pong-b", &[]);
    // Without a restart policy: stays stopped after the crash, and so holds nothing.
    rig.run("once", &[], &["/bin/sleep", "600"]);
    let a_ip = rig.ip_of("ca");
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("cb", &a_ip)),
        "pong-a"
    );
    rig.assert_exactly(&["ca", "cb", "once"], &base, 0);

    rig.docker.kill();
    rig.docker.start_again();

    rig.wait_running(&["ca", "cb"]);
    let running = rig.d(&["inspect", "-f", "{{.State.Running}}", "once"]);
    assert_eq!(
        running, "false",
        "a container without restart policy stays stopped"
    );
    let (a_ip, b_ip) = (rig.ip_of("ca"), rig.ip_of("cb"));
    assert_eq!(
        common::within(COME_BACK, || rig.talk("cb", &a_ip)),
        "pong-a",
        "after the crash"
    );
    assert_eq!(
        common::within(COME_BACK, || rig.talk("ca", &b_ip)),
        "pong-b"
    );
    rig.assert_exactly(&["ca", "cb"], &base, 0);
    // The stopped one starts again on a fresh endpoint.
    rig.d(&["start", "once"]);
    rig.wait_running(&["once"]);
    rig.assert_exactly(&["ca", "cb", "once"], &base, 0);
    rig.tear_down_clean(&["ca", "cb", "once"]);
}

/// 3. `--live-restore`: the containers keep running and talking while dockerd is down and after
///    it is back, and Docker still manages them: stop and rm clean up in ferrynet.
#[test]
fn live_restore_keeps_containers_talking_and_managed() {
    let mut rig = Rig::new(3, &["--live-restore"]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("ca", "pong-a", &[]);
    rig.echo_server("cb", "pong-b", &["-p", "18093:7000"]);
    let (a_ip, b_ip) = (rig.ip_of("ca"), rig.ip_of("cb"));
    let eps = (
        rig.inspect("ca", "EndpointID"),
        rig.inspect("cb", "EndpointID"),
    );
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("cb", &a_ip)),
        "pong-a"
    );
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18093)),
        "pong-b"
    );
    let pid_a = rig.d(&["inspect", "-f", "{{.State.Pid}}", "ca"]);
    rig.assert_exactly(&["ca", "cb"], &base, 1);

    rig.docker.stop();
    // Checked once the engine is back, so a failure still cleans up through it.
    let while_down = (talk_from_pid(&pid_a, &b_ip), rig.via_port(18093));
    rig.docker.start_again();
    assert_eq!(
        while_down,
        (Ok("pong-b".to_string()), Ok("pong-b".to_string())),
        "the containers talk while dockerd is down"
    );

    // The same containers, endpoints and addresses.
    assert_eq!(rig.d(&["inspect", "-f", "{{.State.Pid}}", "ca"]), pid_a);
    assert_eq!(
        (
            rig.inspect("ca", "EndpointID"),
            rig.inspect("cb", "EndpointID")
        ),
        eps
    );
    assert_eq!(rig.talk("cb", &a_ip).as_deref(), Ok("pong-a"));
    assert_eq!(rig.talk("ca", &b_ip).as_deref(), Ok("pong-b"));
    assert_eq!(rig.via_port(18093).as_deref(), Ok("pong-b"));
    rig.assert_exactly(&["ca", "cb"], &base, 1);

    // Still Docker's: a stop releases the endpoint, the port and the address.
    rig.d(&["stop", "-t", "1", "cb"]);
    rig.assert_exactly(&["ca"], &base, 0);
    rig.d(&["start", "cb"]);
    rig.wait_running(&["cb"]);
    let b_ip = rig.ip_of("cb");
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("ca", &b_ip)),
        "pong-b"
    );
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18093)),
        "pong-b"
    );
    rig.assert_exactly(&["ca", "cb"], &base, 1);
    rig.tear_down_clean(&["ca", "cb"]);
}

/// 4. A published port of a `--restart always` container answers a client in its own
///    namespace before and after a restart; its nftables element is neither doubled nor lost.
#[test]
fn published_port_survives_a_restart_once() {
    let mut rig = Rig::new(4, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("pub", "pong-pub", &["-p", "18094:7000"]);
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18094)),
        "pong-pub"
    );
    rig.assert_exactly(&["pub"], &base, 1);
    let before = rig.map_elems("pm4_any");

    for round in 0..2 {
        rig.docker.restart();
        rig.wait_running(&["pub"]);
        assert_eq!(
            common::within(COME_BACK, || rig.via_port(18094)),
            "pong-pub",
            "after restart {round}"
        );
        rig.assert_exactly(&["pub"], &base, 1);
        let after = rig.map_elems("pm4_any");
        // Same port, the container's (possibly new) address.
        let ip = rig.ip_of("pub");
        assert!(
            after.len() == 1 && after[0].contains("18094") && after[0].contains(&ip),
            "{before:?} -> {after:?} ({ip})"
        );
    }
    rig.tear_down_clean(&["pub"]);
}

/// 5. The driver down while dockerd restarts: Docker retries activating it and the containers
///    come back once it is up again.
#[test]
fn driver_down_while_dockerd_restarts() {
    let mut rig = Rig::new(5, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("ca", "pong-a", &[]);
    rig.echo_server("cb", "pong-b", &["-p", "18095:7000"]);
    let a_ip = rig.ip_of("ca");
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.talk("cb", &a_ip)),
        "pong-a"
    );

    let st = rig.agent.stop().expect("agent was running");
    assert!(st.success(), "{st}");
    // Docker retries the driver's calls for the containers it stops, then gives up at its
    // shutdown timeout; the sandboxes it could not clean up it removes when it starts again.
    rig.docker.stop();
    // dockerd starts while the driver is away; the driver comes back a few seconds later.
    let Rig { docker, agent, .. } = &mut rig;
    std::thread::scope(|s| {
        let t = s.spawn(|| docker.start_again());
        std::thread::sleep(Duration::from_secs(3));
        agent.spawn();
        let _ = t.join();
    });
    assert!(rig.docker.is_running());

    rig.wait_running(&["ca", "cb"]);
    let (a_ip, b_ip) = (rig.ip_of("ca"), rig.ip_of("cb"));
    assert_eq!(
        common::within(COME_BACK, || rig.talk("cb", &a_ip)),
        "pong-a"
    );
    assert_eq!(
        common::within(COME_BACK, || rig.talk("ca", &b_ip)),
        "pong-b"
    );
    assert_eq!(common::within(COME_BACK, || rig.via_port(18095)), "pong-b");
    rig.assert_exactly(&["ca", "cb"], &base, 1);
    rig.tear_down_clean(&["ca", "cb"]);
}

/// 5b. The driver away for longer than Docker retries it while dockerd starts after a crash:
///     Docker removes the old endpoint without the driver and cannot start the container.
///     Back, the driver finds the endpoint Docker forgot and removes it with its address and
///     published port, so `docker start` gets the container its port again.
#[test]
fn endpoints_docker_forgot_during_a_long_driver_outage_are_removed() {
    let mut rig = Rig::new(6, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    rig.echo_server("ca", "pong-a", &["-p", "18096:7000"]);
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18096)),
        "pong-a"
    );
    rig.assert_exactly(&["ca"], &base, 1);
    let old_ep = rig.inspect("ca", "EndpointID");

    let st = rig.agent.stop().expect("agent was running");
    assert!(st.success(), "{st}");
    rig.docker.kill();
    // Docker looks for the driver for about 15 s per call, then removes the stale sandbox and
    // endpoint without it, and the container's start fails.
    rig.docker.start_again();
    let state = rig.d(&["inspect", "-f", "{{.State.Running}}", "ca"]);
    assert_eq!(
        state, "false",
        "Docker could not start the container without its driver"
    );
    assert!(
        rig.agent
            .keys_under("endpoints", &rig.fname)
            .contains(&old_ep),
        "the driver still holds the endpoint Docker removed"
    );

    rig.agent.spawn();
    common::within(Duration::from_secs(30), || {
        let eps = rig.agent.keys_under("endpoints", &rig.fname);
        eps.is_empty()
            .then_some(())
            .ok_or(format!("endpoint records left: {eps:?}"))
    });
    rig.assert_exactly(&[], &base, 0);

    rig.d(&["start", "ca"]);
    rig.wait_running(&["ca"]);
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18096)),
        "pong-a"
    );
    rig.assert_exactly(&["ca"], &base, 1);
    rig.tear_down_clean(&["ca"]);
}

/// 6. The driver killed at each of its crash points during a `docker run -p` (after
///    CreateEndpoint recorded the endpoint, after Join plugged and guarded it, after
///    ProgramExternalConnectivity published its port) and during a `docker rm -f` (after Leave
///    removed the host link, after DeleteEndpoint did), and started again at once: whatever
///    Docker then does with that container (a retried call, a failed start, removal), once it
///    is removed ferrynet holds exactly what the live containers need, anti-spoofing elements
///    included.
#[test]
fn driver_killed_at_each_step_of_a_docker_run_leaks_nothing() {
    let mut rig = Rig::new(7, &[]);
    let base = rig.agent.keys_under("ipam", &rig.fname);
    for (i, point) in ["cnm-endpoint-recorded", "cnm-joined", "cnm-published"]
        .into_iter()
        .enumerate()
    {
        let name = format!("crash{i}");
        let port = format!("{}:7000", 18110 + i);
        let (net, image) = (rig.net.clone(), rig.image.clone());
        rig.docker_while_driver_dies(
            point,
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                &net,
                "-p",
                &port,
                &image,
                "sleep",
                "600",
            ],
        );
        rig.docker.docker(&["rm", "-f", &name]);
    }
    for (i, point) in ["cnm-left", "cnm-endpoint-unlinked"]
        .into_iter()
        .enumerate()
    {
        let name = format!("gone{i}");
        rig.run(
            &name,
            &["-p", &format!("{}:7000", 18120 + i)],
            &["sleep", "600"],
        );
        rig.wait_running(&[&name]);
        rig.docker_while_driver_dies(point, &["rm", "-f", &name]);
        rig.docker.docker(&["rm", "-f", &name]);
    }
    // The driver's start-up sweep and Docker's retried deletes leave nothing of the three.
    common::within(Duration::from_secs(60), || {
        let eps = rig.agent.keys_under("endpoints", &rig.fname);
        let held = rig.agent.keys_under("ipam", &rig.fname);
        let veths = rig.links("fnv");
        (eps.is_empty() && held == base && veths.is_empty())
            .then_some(())
            .ok_or(format!(
                "left: endpoints {eps:?}, addresses {held:?}, veths {veths:?}"
            ))
    });
    rig.assert_exactly(&[], &base, 0);
    for set in ["macs", "src4", "src6", "arp_src", "na_src"] {
        let left = rig.guard_elements(set);
        assert!(
            left.is_empty(),
            "anti-spoofing {set} elements left: {left:?}"
        );
    }
    rig.echo_server("ok", "pong-ok", &["-p", "18110:7000"]);
    rig.wait_running(&["ok"]);
    assert_eq!(
        common::within(Duration::from_secs(15), || rig.via_port(18110)),
        "pong-ok"
    );
    rig.assert_exactly(&["ok"], &base, 1);
    // The sets checked empty above are the ones a live container's port is in.
    for set in ["macs", "src4"] {
        assert_eq!(
            rig.guard_elements(set).len(),
            1,
            "{set} of the live container"
        );
    }
    rig.tear_down_clean(&["ok"]);
}
