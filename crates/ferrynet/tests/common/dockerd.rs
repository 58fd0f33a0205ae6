//! A private Docker engine for tests that restart dockerd or turn on swarm mode, which the
//! machine's shared engine must never see: its own data root (vfs), exec root, API socket and
//! managed containerd, no default bridge and no iptables rules. It can run inside a network
//! namespace (a "host" of a lab); its containerd, and the host-network plugins it runs, are then
//! there too. Stopped by PID and its directories unmounted and removed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{must, out};

/// A dockerd of the test's own.
pub struct Dockerd {
    /// Short unique tag in its paths.
    pub tag: String,
    /// The network namespace it runs in (None: the root namespace).
    pub netns: Option<String>,
    /// Data root, config file and log.
    pub root: PathBuf,
    /// Exec root (short: managed plugins' sockets live under it, within 108 bytes).
    pub exec_root: PathBuf,
    /// Its API socket.
    pub sock: PathBuf,
    child: Option<Child>,
    /// Arguments added to dockerd's command line.
    pub extra: Vec<String>,
    /// Seen by this dockerd as /run/docker/plugins (None: the machine's directory).
    pub plugins_dir: Option<PathBuf>,
    /// Its host name, in a UTS namespace of its own (None: the machine's).
    pub hostname: Option<String>,
}

/// How to start a [`Dockerd`] beyond the defaults.
#[derive(Default, Clone, Debug)]
pub struct DockerdOpts {
    /// The network namespace to run in.
    pub netns: Option<String>,
    /// The API socket (default `/run/fnd-<tag>.sock`).
    pub sock: Option<PathBuf>,
    /// A directory the daemon sees as /run/docker/plugins (its own legacy plugins, e.g. a
    /// lab host's agent), in a mount namespace of its own.
    pub plugins_dir: Option<PathBuf>,
    /// A host name of its own (engines sharing a cluster store need distinct ones).
    pub hostname: Option<String>,
    /// More dockerd arguments.
    pub extra: Vec<String>,
}

impl Dockerd {
    /// Start one (`tag` must be short and unique) and wait until its API answers.
    pub fn start(tag: &str, netns: Option<&str>) -> Dockerd {
        Self::start_with(tag, netns, &[])
    }

    /// [`Dockerd::start`] with extra dockerd arguments.
    pub fn start_with(tag: &str, netns: Option<&str>, extra: &[&str]) -> Dockerd {
        Self::start_opts(
            tag,
            DockerdOpts {
                netns: netns.map(str::to_string),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    /// Start one as `opts` say.
    pub fn start_opts(tag: &str, opts: DockerdOpts) -> Dockerd {
        let root = PathBuf::from(format!("/tmp/fnd-{tag}"));
        let exec_root = PathBuf::from(format!("/run/fnd-{tag}"));
        std::fs::create_dir_all(&root).expect("dockerd root");
        // Its own (empty) config: the machine's daemon.json sets data-root and a storage driver.
        std::fs::write(root.join("daemon.json"), "{}").expect("daemon.json");
        let mut d = Dockerd {
            tag: tag.to_string(),
            netns: opts.netns,
            sock: opts
                .sock
                .unwrap_or_else(|| PathBuf::from(format!("/run/fnd-{tag}.sock"))),
            root,
            exec_root,
            child: None,
            extra: opts.extra,
            plugins_dir: opts.plugins_dir,
            hostname: opts.hostname,
        };
        d.spawn();
        d
    }

    /// `unix://…` for `docker -H` and `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dockerd.log"))
            .expect("dockerd log");
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts dockerd
        // needs ("Devices cgroup isn't mounted"). A private plugin directory and host name are set in mount and UTS namespaces
        // of the daemon's own (`unshare`), then sh execs dockerd, so the child's PID is dockerd's.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"));
                c
            }
            None => Command::new("env"),
        };
        if self.plugins_dir.is_none() && self.hostname.is_none() {
            cmd.arg("dockerd");
        } else {
            cmd.args(["unshare", "-m", "-u", "--propagation", "slave", "sh", "-c"])
                .arg(concat!(
                    "set -e; ",
                    "if [ -n \"$FND_HOSTNAME\" ]; then hostname \"$FND_HOSTNAME\"; fi; ",
                    "if [ -n \"$FND_PLUGINS\" ]; then mount --bind \"$FND_PLUGINS\" /run/docker/plugins; fi; ",
                    "exec dockerd \"$@\""
                ))
                .arg("dockerd")
                .env("FND_HOSTNAME", self.hostname.clone().unwrap_or_default())
                .env(
                    "FND_PLUGINS",
                    self.plugins_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                );
        }
        cmd.arg("--config-file")
            .arg(self.root.join("daemon.json"))
            .arg("--data-root")
            .arg(self.root.join("data"))
            .arg("--exec-root")
            .arg(&self.exec_root)
            .arg("--pidfile")
            .arg(self.root.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            .args([
                "--bridge",
                "none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver",
                "vfs",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("starting dockerd"));
        let t0 = Instant::now();
        loop {
            let o = self.docker(&["info", "--format", "{{.ServerVersion}}"]);
            if o.status.success() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("private dockerd exited ({st}):\n{}", self.log());
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "private dockerd did not answer in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run `docker -H <this> ARGS`.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args(args)
            .output()
            .expect("running the docker CLI")
    }

    /// Run `docker -H <this> ARGS`, which must succeed; its trimmed stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker -H {} {args:?} failed: {}",
            self.host(),
            out(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default()
    }

    /// The PID of the containerd it started, from containerd's pid file.
    fn containerd_pid(&self) -> Option<i32> {
        let p = self.exec_root.join("containerd").join("containerd.pid");
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// Whether the dockerd process this harness started is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9` dockerd, as a crash would; its containerd goes too (it dies with dockerd or is
    /// killed), the containers' shims, and so the containers, keep running for the next start
    /// to find. The containerd pid file is removed: a dead containerd may linger as a zombie
    /// (not every init reaps promptly), which the next dockerd would take for a live one and
    /// wait for in vain.
    pub fn kill(&mut self) {
        let containerd = self.containerd_pid();
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        if let Some(c) = containerd.filter(|c| self.is_our_containerd(*c)) {
            // SAFETY: kill(2) on the containerd our dockerd started.
            unsafe { libc::kill(c, libc::SIGKILL) };
            let t0 = Instant::now();
            while self.is_our_containerd(c) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_file(self.exec_root.join("containerd").join("containerd.pid"));
    }

    /// Stop it with SIGTERM as an init system would (containers without live-restore stop
    /// too); SIGKILL after 30 s. Its containerd is ended by PID if it outlives it (also after
    /// [`Dockerd::kill`]).
    pub fn stop(&mut self) {
        let containerd = self.containerd_pid();
        let Some(mut child) = self.child.take() else {
            self.end_containerd(containerd);
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t0.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        self.end_containerd(containerd);
    }

    /// Wait up to 10 s for the containerd our dockerd started to exit, then SIGKILL it.
    fn end_containerd(&self, containerd: Option<i32>) {
        let Some(c) = containerd else {
            return;
        };
        let t0 = Instant::now();
        while self.is_our_containerd(c) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.is_our_containerd(c) {
            // SAFETY: kill(2) on the containerd our dockerd started.
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
    }

    /// `pid` is a containerd under this engine's exec root (a stale pid file's number may
    /// have been reused by another process, even the shared engine's containerd).
    fn is_our_containerd(&self, pid: i32) -> bool {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        is_containerd(pid)
            && String::from_utf8_lossy(&cmdline).contains(&self.exec_root.display().to_string())
    }

    /// Stop and start it again on the same roots (containers, networks and plugins persist).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }

    /// Start it again after [`Dockerd::stop`] or [`Dockerd::kill`] and wait until its API
    /// answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the private dockerd is running");
        self.spawn();
    }
}

fn is_containerd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "containerd")
        .unwrap_or(false)
}

/// Unmount everything mounted under `dir` (deepest first), as a killed dockerd leaves netns
/// files, plugin rootfs and vfs layers mounted.
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

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- private dockerd {} log (last 60 lines) ---", self.tag);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.child.is_some() {
            // Leave swarm first so a restart of the test never finds an old cluster.
            let _ = self.docker(&["swarm", "leave", "--force"]);
        }
        self.stop();
        unmount_under(&self.exec_root);
        unmount_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.exec_root);
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Import a busybox image (applets as symlinks, `/www/index.html` saying `page`) into the
/// engine at `host` (`unix://…`) as `name`.
pub fn import_busybox_page(host: &str, name: &str, page: &str) {
    let root = tempfile::tempdir().expect("image root");
    let binp = root.path().join("bin");
    std::fs::create_dir_all(&binp).expect("bin dir");
    std::fs::copy("/bin/busybox", binp.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "nc", "wget", "httpd", "ip", "ping", "cat", "echo", "sleep", "true", "nslookup",
    ] {
        std::os::unix::fs::symlink("busybox", binp.join(applet)).expect("symlink");
    }
    let www = root.path().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("index.html"), format!("{page}\n")).expect("index");
    let tar = root.path().join("image.tar").display().to_string();
    let r = root.path().display().to_string();
    must(&["tar", "-C", &r, "-cf", &tar, "bin", "www"]);
    must(&["docker", "-H", host, "import", &tar, name]);
}

/// [`import_busybox_page`] saying "hello from a private engine".
pub fn import_busybox(host: &str, name: &str) {
    import_busybox_page(host, name, "hello from a private engine");
}
