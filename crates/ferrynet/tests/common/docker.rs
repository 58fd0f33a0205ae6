//! The harness of the tests against the machine's real Docker engine: the plugin process
//! (its own driver name and state directory), Drop guards for what a test made, a busybox image,
//! an outside client namespace, and small `docker` helpers.
//!
//! Docker's containers live in the real host namespace, where every ferrynet keeps its one
//! nftables table, so such tests take turns: [`turn`] holds a process-wide lock and a lock file
//! shared by every test binary that uses this module.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, out, sh, tag, Ns};

static TURN: Mutex<()> = Mutex::new(());

/// Where test binaries of this module take turns across processes.
const TURN_FILE: &str = "/run/lock/ferrynet-docker-tests.lock";

/// A test's turn on the host namespace: held until dropped.
pub struct Turn {
    _file: Option<nix::fcntl::Flock<std::fs::File>>,
    _guard: MutexGuard<'static, ()>,
}

/// Wait for this test's turn: other tests of this process first (a failed one's poisoned lock
/// is taken over), then those of other processes using this module (an advisory `flock`).
pub fn turn() -> Turn {
    let guard = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _ = std::fs::create_dir_all("/run/lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(TURN_FILE)
        .ok()
        .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
    Turn {
        _file: file,
        _guard: guard,
    }
}

/// Fail (not skip) when there is no Docker engine to test against.
pub fn require_docker() {
    let o = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .unwrap_or_else(|e| panic!("these tests need the docker CLI and a running engine: {e}"));
    assert!(
        o.status.success(),
        "these tests need a running Docker engine: {}",
        out(&o)
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "these tests build their image from Debian's busybox-static (/bin/busybox): apt-get install busybox-static"
    );
}

pub fn docker(args: &[&str]) -> std::process::Output {
    let mut v = vec!["docker"];
    v.extend_from_slice(args);
    sh(&v)
}

pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed: {}", out(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A raw HTTP/1.1 POST over the plugin socket: (status, JSON body).
pub fn post(socket: &Path, method: &str, body: &str) -> (u16, Value) {
    raw(
        socket,
        format!(
            "POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// Send raw bytes, read the whole answer: (status, JSON body or Null).
pub fn raw(socket: &Path, bytes: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).expect("connect to the plugin socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    // The server may answer and close before reading everything (a body over its limit).
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// `ferrynet docker-plugin` (or `ferrynet agent --docker-socket`) in the foreground, stopped
/// with SIGTERM on drop.
pub struct Plugin {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub state: tempfile::TempDir,
    pub log: PathBuf,
    pub driver: String,
    /// Served by the per-host agent rather than `ferrynet docker-plugin`.
    pub agent: bool,
}

impl Plugin {
    pub fn start() -> Plugin {
        Plugin::launch(false)
    }

    /// The agent serving the driver: `ferrynet agent --docker-socket` on the host's default
    /// route interface, with the embedded store in its own state directory.
    pub fn start_agent() -> Plugin {
        Plugin::launch(true)
    }

    pub fn launch(agent: bool) -> Plugin {
        let driver = format!("fnt-{}", tag());
        let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
        let state = tempfile::tempdir().expect("state dir");
        let log = state.path().join("plugin.log");
        let mut p = Plugin {
            child: None,
            socket,
            state,
            log,
            driver,
            agent,
        };
        p.spawn();
        p
    }

    /// Start the process (again) on the same socket and state dir; wait until the socket answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let state = self.state.path().display().to_string();
        let socket = self.socket.display().to_string();
        let mut cmd = Command::new(bin());
        cmd.args(["--state-dir", &state]);
        if self.agent {
            // No DNS and no HTTP listener: this agent runs in the real host namespace, where
            // nothing should answer or forward queries for the tests, and where several tests'
            // agents run at once (one 127.0.0.1:9470 each would collide).
            cmd.args([
                "agent",
                "--no-dns",
                "--http",
                "none",
                "--docker-socket",
                &socket,
            ]);
        } else {
            cmd.args(["docker-plugin", "--socket", &socket]);
        }
        let child = cmd
            .env("FERRYNET_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start ferrynet");
        self.child = Some(child);
        let log = self.log.clone();
        super::wait_for_socket(&mut self.child, &self.socket, "plugin", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        });
    }

    /// `kill -9` by PID: no chance to clean up. Returns once the process is gone.
    pub fn kill9(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("plugin was running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        child.wait().expect("wait for the killed process")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let state = self.state.path().display().to_string();
        let mut v = vec![bin(), "--state-dir", &state];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// SIGTERM and wait; the exit status and whether the socket is gone.
    pub fn stop(&mut self) -> Option<(std::process::ExitStatus, bool)> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some((st, !self.socket.exists()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().ok()?;
                let _ = std::fs::remove_file(&self.socket);
                return Some((st, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint record of a Docker endpoint, as JSON.
    pub fn docker_endpoint_record(&self, network: &str, endpoint_id: &str) -> Option<Value> {
        let store = ferrynet_store::EmbeddedStore::open(self.state.path().join("store.redb"))
            .expect("open the store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let key = format!("/ferrynet/v1/endpoints/{network}/{endpoint_id}/docker");
        let kv = rt
            .block_on(ferrynet_store::Store::get(&store, &key))
            .expect("read the store")?;
        serde_json::from_slice(&kv.value).ok()
    }

    /// Every key left in this plugin's store except the global publish sequence.
    pub fn store_keys(&self) -> Vec<String> {
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
            .filter(|k| k != "/ferrynet/v1/ports-seq")
            // The agent's registration of this host lives as long as the agent.
            .filter(|k| !(self.agent && k.starts_with("/ferrynet/v1/hosts/")))
            .collect()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // Networks the test left in this state dir (after a failure): remove with their bridges.
        // (The CLI works on the store alone, also when the process was killed.)
        {
            if let Ok(o) = Command::new(bin())
                .args(["--state-dir", &self.state.path().display().to_string()])
                .args(["network", "ls", "--json"])
                .output()
            {
                let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
                for n in v.as_array().into_iter().flatten() {
                    if let Some(name) = n["name"].as_str() {
                        let _ = self.cli(&["network", "rm", "--force", name]);
                    }
                }
            }
        }
        let _ = self.stop();
        if std::thread::panicking() {
            eprintln!("--- plugin log ---\n{}", self.log_text());
        }
    }
}

/// Docker objects and CLI containers made by a test, removed on drop (containers first).
#[derive(Default)]
pub struct Made {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub images: Vec<String>,
    pub cli_containers: Vec<(PathBuf, String)>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for (state, c) in &self.cli_containers {
            let s = state.display().to_string();
            let _ = sh(&[bin(), "--state-dir", &s, "rm", "--force", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        for i in &self.images {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

/// Import a busybox image: /bin/busybox with its applets as symlinks and /www/index.html.
pub fn import_image(made: &mut Made) -> String {
    let name = format!("fnt-busybox:{}", tag());
    made.images.push(name.clone());
    super::dockerd::import_busybox_page(
        "unix:///var/run/docker.sock",
        &name,
        "hello from a docker container on ferrynet",
    );
    name
}

pub fn ip_of(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
}

/// Links of the host namespace whose names start with one of `prefixes`.
pub fn host_links(prefixes: &[&str]) -> Vec<String> {
    super::links_in(None, prefixes)
}

/// Elements of one of ferrynet's port maps in the host namespace (0 when the table is gone).
pub fn map_len(map: &str) -> usize {
    super::map_elements(None, map).len()
}

/// A client namespace wired to the host namespace by a veth: (namespace, host-side address).
/// The host side is removed with the namespace (deleting the peer deletes the pair).
pub fn outside_client(n: u8) -> (Ns, String) {
    let client = Ns::new("dc");
    let host_ip = format!("10.253.{n}.1");
    let client_ip = format!("10.253.{n}.2");
    super::wire_client(
        None,
        &client,
        &format!("fto{}", tag()),
        &host_ip,
        &client_ip,
    );
    (client, host_ip)
}

/// Retry `f` for a few seconds until it returns Some.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Start a detached container `name` on `net` answering every TCP connection on port 7000
/// with `reply`.
pub fn echo_server(name: &str, net: &str, image: &str, reply: &str) {
    docker_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        net,
        image,
        "/bin/nc",
        "-ll",
        "-p",
        "7000",
        "-e",
        "/bin/echo",
        reply,
    ]);
}

pub fn nc_reply(client_args: &[&str]) -> Option<String> {
    let o = docker(client_args);
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// `docker exec FROM nc IP 7000`: the server's one-line answer, or None.
pub fn talk(from: &str, ip: &str) -> Option<String> {
    nc_reply(&["exec", from, "/bin/nc", "-w", "3", ip, "7000"])
}
