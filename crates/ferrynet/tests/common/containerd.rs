//! A private containerd (Debian's package, 1.6) with its CRI plugin on, for the CRI tests: its
//! own root, state, gRPC socket, runc root, CNI bin and conf directories, the native
//! snapshotter and a pause image built by the test and imported locally (no registry). It can
//! run inside a network namespace (a lab "host"), where it runs the CNI plugins. It shares
//! nothing with the machine's containerd (Docker's): other socket, root and state, so its
//! `k8s.io` namespace is its own. Pods are driven over CRI by `tests/cri/cri.py`.
//!
//! On drop: every pod is stopped and removed over CRI (so the plugin's DEL runs), containerd is
//! stopped by PID, containers and shims it left are ended by PID (found under its own runc root
//! and socket path), mounts under its directories are undone and the directories removed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{must, out, tag};

/// The CRI helper script.
pub const CRI_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cri/cri.py");

/// The name of the pause image every private containerd imports.
pub const PAUSE_IMAGE: &str = "fnt.local/pause:1";

/// Where the reference CNI plugins are (Debian's `containernetworking-plugins`).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Fail (not skip) when containerd, runc, the reference loopback plugin or the CRI client
/// package is missing.
pub fn require() {
    for (path, package) in [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/ctr", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: apt-get install {package} (scripts/deps.sh test)"
        );
    }
    let o = Command::new("python3")
        .args(["-c", "import grpc, cri_api.v1.api_pb2_grpc"])
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "the CRI client is missing: python3 -m pip install container-runtime-interface-api \
         (scripts/deps.sh test): {}",
        out(&o)
    );
}

/// A pod sandbox as CRI reports it.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Sandbox id.
    pub id: String,
    /// Its metadata name.
    pub name: String,
    /// Addresses from PodSandboxStatus (`network.ip` then `additional_ips`).
    pub ips: Vec<String>,
    /// The pause process.
    pub pid: u32,
    /// The pod's network namespace file.
    pub netns: String,
}

impl Pod {
    fn from_status(v: &Value) -> Pod {
        Pod {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            name: v["name"].as_str().unwrap_or_default().to_string(),
            ips: v["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            pid: v["pid"].as_u64().unwrap_or(0) as u32,
            netns: v["netns"].as_str().unwrap_or_default().to_string(),
        }
    }

    /// Its IPv4 address ("" when none).
    pub fn v4(&self) -> String {
        self.ips
            .iter()
            .find(|i| !i.contains(':'))
            .cloned()
            .unwrap_or_default()
    }

    /// Its IPv6 address ("" when none).
    pub fn v6(&self) -> String {
        self.ips
            .iter()
            .find(|i| i.contains(':'))
            .cloned()
            .unwrap_or_default()
    }

    /// `nsenter --net=<its netns>`, as a runtime's exec would enter it.
    pub fn enter(&self) -> String {
        format!("--net={}", self.netns)
    }

    /// Run a command in the pod's network namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        let e = self.enter();
        let mut v = vec!["nsenter", e.as_str()];
        v.extend_from_slice(args);
        super::sh(&v)
    }

    /// Run a command in the pod's network namespace that must succeed; its stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let e = self.enter();
        let mut v = vec!["nsenter", e.as_str()];
        v.extend_from_slice(args);
        must(&v)
    }

    /// Global addresses of `eth0` in the pod, without prefix length, sorted.
    pub fn eth0_addrs(&self) -> Vec<String> {
        let o = self.run(&["ip", "-j", "addr", "show", "dev", "eth0"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let mut a: Vec<String> = v
            .get(0)
            .and_then(|i| i["addr_info"].as_array())
            .into_iter()
            .flatten()
            .filter(|x| x["scope"] == "global")
            .filter_map(|x| x["local"].as_str().map(str::to_string))
            .collect();
        a.sort();
        a
    }
}

/// A containerd of the test's own.
pub struct Containerd {
    /// Short unique tag in its paths.
    pub tag: String,
    /// The network namespace it runs in (None: the root namespace).
    pub netns: Option<String>,
    /// Root (content, snapshots, metadata), config, log, CNI directories.
    pub dir: PathBuf,
    /// State (tasks, pod netns files), socket, runc root: short, under /run.
    pub run_dir: PathBuf,
    /// Its gRPC socket (CRI and containerd's own API).
    pub sock: PathBuf,
    /// The CNI plugin directory it searches.
    pub cni_bin: PathBuf,
    /// The CNI configuration directory it reads (the first conflist by name).
    pub cni_conf: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Start one in `netns` with `conflist` as its only network configuration and ferrynet
    /// (as `ferrynet`), the reference plugins and `loopback` in its CNI bin directory; wait
    /// until CRI answers and import the pause image.
    pub fn start(netns: Option<&str>, conflist: &Value) -> Containerd {
        Self::start_with(netns, Some(conflist))
    }

    /// [`Containerd::start`] with no conflist written (the caller writes one, e.g. with
    /// `ferrynet install-cni`, before the first pod).
    pub fn start_with(netns: Option<&str>, conflist: Option<&Value>) -> Containerd {
        require();
        let tag = format!("fc{}", tag());
        let dir = PathBuf::from(format!("/tmp/fnctd-{tag}"));
        let run_dir = PathBuf::from(format!("/run/fnctd-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&run_dir);
        let cni_bin = dir.join("cni-bin");
        let cni_conf = dir.join("cni-conf");
        for d in [&dir, &run_dir, &cni_bin, &cni_conf] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        std::os::unix::fs::symlink(super::bin(), cni_bin.join("ferrynet")).expect("ferrynet link");
        for p in ["loopback", "bridge", "host-local", "portmap", "bandwidth"] {
            let src = Path::new(REFERENCE_PLUGINS).join(p);
            if src.exists() {
                std::os::unix::fs::symlink(&src, cni_bin.join(p)).expect("plugin link");
            }
        }
        let sock = run_dir.join("containerd.sock");
        let mut c = Containerd {
            tag,
            netns: netns.map(str::to_string),
            dir,
            run_dir,
            sock,
            cni_bin,
            cni_conf,
            child: None,
        };
        if let Some(conf) = conflist {
            c.write_conflist("10-test.conflist", conf);
        }
        std::fs::write(c.dir.join("config.toml"), c.config()).expect("config.toml");
        c.spawn();
        c.import_pause();
        c
    }

    /// containerd's configuration: everything of its own, CRI on, native snapshotter.
    fn config(&self) -> String {
        let d = self.dir.display();
        let r = self.run_dir.display();
        // restrict_oom_score_adj: a sandbox asks for -998, which this VM refuses even to root;
        // containerd then caps it at its own score. netns_mounts_under_state_dir: pod netns
        // files live under our state, not /run/netns, so they go with it.
        format!(
            r#"version = 2
root = "{d}/root"
state = "{r}/state"
[grpc]
  address = "{r}/containerd.sock"
[ttrpc]
  address = "{r}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{r}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"#
        )
    }

    /// Write a network configuration into its conf directory (atomically: containerd watches
    /// the directory).
    pub fn write_conflist(&self, file: &str, conf: &Value) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(conf).expect("json")).expect("write");
        std::fs::rename(&tmp, self.cni_conf.join(file)).expect("rename conflist");
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .expect("containerd log");
        // nsenter --net only (not `ip netns exec`, whose private mount namespace would hide
        // the pod netns mounts from us and the shims).
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("starting containerd"));
        let t0 = Instant::now();
        loop {
            let (ok, v) = self.cri(&["version"]);
            if ok {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!("private containerd exited ({st}):\n{}", self.log_tail(40));
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "private containerd's CRI did not answer in 60 s ({v}):\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Build the pause image archive and import it into `k8s.io` for the native snapshotter.
    fn import_pause(&self) {
        let tar = self.dir.join("pause.tar").display().to_string();
        must(&["python3", CRI_PY, "image", &tar, PAUSE_IMAGE]);
        must(&[
            "ctr",
            "--address",
            &self.sock.display().to_string(),
            "-n",
            "k8s.io",
            "images",
            "import",
            "--snapshotter",
            "native",
            &tar,
        ]);
    }

    /// Run the CRI helper against this containerd: (success, its JSON answer).
    pub fn cri(&self, args: &[&str]) -> (bool, Value) {
        let o = Command::new("python3")
            .arg(CRI_PY)
            .arg("--sock")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("running the CRI helper");
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|_| serde_json::json!({"error": "HELPER", "message": out(&o)}));
        (o.status.success(), v)
    }

    /// RunPodSandbox `name` (extra helper arguments: `--port`, `--annotation`, `--namespace`);
    /// the pod, or the CRI error (`{"error", "message"}`).
    pub fn try_run_pod(&self, name: &str, extra: &[&str]) -> Result<Pod, Value> {
        let mut a = vec!["run", name];
        a.extend_from_slice(extra);
        match self.cri(&a) {
            (true, v) => Ok(Pod::from_status(&v)),
            (false, v) => Err(v),
        }
    }

    /// RunPodSandbox that must succeed and leave the sandbox ready.
    pub fn run_pod(&self, name: &str, extra: &[&str]) -> Pod {
        let p = self
            .try_run_pod(name, extra)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name} failed: {e}\n{}", self.log_tail(30)));
        assert!(!p.netns.is_empty() && p.pid > 0, "pod {name}: {p:?}");
        p
    }

    /// Wait until CRI reports NetworkReady (containerd has loaded a network configuration).
    pub fn wait_network_ready(&self) {
        eventually(30, "CRI NetworkReady", || {
            let (ok, v) = self.cri(&["ready"]);
            (ok && v["NetworkReady"][0] == true)
                .then_some(())
                .ok_or_else(|| v.to_string())
        });
    }

    /// PodSandboxStatus of `id`.
    pub fn status(&self, id: &str) -> Value {
        let (ok, v) = self.cri(&["status", id]);
        assert!(ok, "PodSandboxStatus {id}: {v}");
        v
    }

    /// StopPodSandbox, which must succeed.
    pub fn stop_pod(&self, id: &str) {
        let (ok, v) = self.cri(&["stop", id]);
        assert!(ok, "StopPodSandbox {id}: {v}\n{}", self.log_tail(30));
    }

    /// RemovePodSandbox, which must succeed.
    pub fn remove_pod(&self, id: &str) {
        let (ok, v) = self.cri(&["rm", id]);
        assert!(ok, "RemovePodSandbox {id}: {v}\n{}", self.log_tail(30));
    }

    /// ListPodSandbox: (id, name, state) of every sandbox.
    pub fn pods(&self) -> Vec<(String, String, String)> {
        let (ok, v) = self.cri(&["ls"]);
        assert!(ok, "ListPodSandbox: {v}");
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                (s("id"), s("name"), s("state"))
            })
            .collect()
    }

    /// Pod network namespace files containerd holds (under its state directory).
    pub fn netns_files(&self) -> Vec<String> {
        let d = self.run_dir.join("state/io.containerd.grpc.v1.cri/netns");
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `kill -9` containerd, as a crash would; the shims, and so the pods, keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM containerd as an init system would (pods keep running), SIGKILL after 20 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if t0.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// Start it again on the same directories after [`Containerd::kill`] or
    /// [`Containerd::stop`], and wait until CRI answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the private containerd is running");
        self.spawn();
    }

    /// The runc root of its `k8s.io` namespace.
    fn runc_root(&self) -> String {
        self.run_dir.join("runc/k8s.io").display().to_string()
    }

    /// End what a failed test may leave: containers under its runc root and shims serving its
    /// socket, each by PID.
    fn end_leftovers(&self) {
        let root = self.runc_root();
        let ids = Command::new("runc")
            .args(["--root", &root, "list", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = Command::new("runc")
                .args(["--root", &root, "kill", id, "KILL"])
                .output();
            let _ = Command::new("runc")
                .args(["--root", &root, "delete", "--force", id])
                .output();
        }
        let needle = self.sock.display().to_string();
        for pid in shims_of(&needle) {
            // SAFETY: kill(2) on a shim serving this test's own containerd socket.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// PIDs of containerd shims whose command line names `sock` (a test's own socket path).
fn shims_of(sock: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with("/usr/bin/containerd-shim") && cmd.contains(sock)
        })
        .collect()
}

/// Unmount everything mounted under `dir`, deepest first (pod netns files, rootfs).
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", &p]).output();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- private containerd {} log (last 40 lines) ---\n{}",
                self.tag,
                self.log_tail(40)
            );
        }
        if self.child.is_some() {
            // Stop and remove pods over CRI first, so the network plugin's DEL runs.
            let (ok, v) = self.cri(&["ls"]);
            if ok {
                for p in v.as_array().into_iter().flatten() {
                    if let Some(id) = p["id"].as_str() {
                        let _ = self.cri(&["stop", id]);
                        let _ = self.cri(&["rm", id]);
                    }
                }
            }
        }
        self.stop();
        self.end_leftovers();
        unmount_under(&self.run_dir);
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A ferrynet conflist as a node would have it: one plugin, the capabilities containerd fills
/// (`portMappings`, `bandwidth`), `plugin` merged into the plugin's keys.
pub fn ferrynet_conflist(name: &str, plugin: Value) -> Value {
    let mut p = serde_json::json!({
        "type": "ferrynet",
        "capabilities": {"portMappings": true, "bandwidth": true},
    });
    if let (Some(o), Some(extra)) = (p.as_object_mut(), plugin.as_object()) {
        for (k, v) in extra {
            o.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({"cniVersion": "1.0.0", "name": name, "plugins": [p]})
}

/// Retry a failed `assert`-style probe until it holds, for `secs` seconds.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> Result<(), String>) {
    super::within(Duration::from_secs(secs), || {
        f().map_err(|e| format!("{what}: {e}"))
    })
}
