//! What an operator relies on beyond the features: systemd's readiness protocol (READY=1,
//! STOPPING=1 on a test-owned NOTIFY_SOCKET), FERRYNET_* variables for every flag,
//! `--log-format json`, the agent socket's place and override, `ferrynet logs`, distinct exit
//! codes, and `--version` naming the commit.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Exit codes documented in `ferrynet --help`.
const NOT_FOUND: i32 = 3;
const CONFLICT: i32 = 4;
const STORE: i32 = 5;
const SYSTEM: i32 = 6;
const USAGE: i32 = 2;

/// A unix datagram socket standing in for systemd's notification socket.
struct Notify {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
        // A guard against a hang, not a timing assertion: the test fails with the log.
        sock.set_read_timeout(Some(Duration::from_secs(90)))
            .unwrap();
        Notify { sock, path }
    }
    /// Read messages until one holds the line `want`; every message read on the way.
    fn wait_for(&self, want: &str, log: impl Fn() -> String) -> Vec<String> {
        self.wait_for_line(|l| l == want, log)
    }
    /// Read messages until one holds a line `hit` accepts; every message read on the way.
    fn wait_for_line(&self, hit: impl Fn(&str) -> bool, log: impl Fn() -> String) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let found = msg.lines().any(&hit);
                    seen.push(msg);
                    if found {
                        return seen;
                    }
                }
                Err(e) => panic!("not seen (got {seen:?}): {e}; log: {}", log()),
            }
        }
    }
}

/// A namespace with an underlay: a veth with an address and a default route, the way
/// the agent finds its underlay on a host.
fn host_ns() -> Ns {
    let ns = Ns::new("op");
    ns.must(&[
        "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    ns.must(&["ip", "addr", "add", "192.0.2.10/24", "dev", "ul0"]);
    ns.must(&["ip", "link", "set", "ul1", "up"]);
    ns.must(&["ip", "link", "set", "ul0", "up"]);
    ns.must(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "192.0.2.1",
        "dev",
        "ul0",
    ]);
    ns
}

fn log_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn sigterm(child: &std::process::Child) {
    // By PID: only the process this test started.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

#[test]
fn the_agent_notifies_ready_after_its_first_reconcile_and_stopping_on_sigterm() {
    let ns = host_ns();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let notify = Notify::new(dir.path());
    let log = dir.path().join("agent.log");
    let api = dir.path().join("api").join("agent.sock");
    let child = Command::new("nsenter")
        .arg(ns.enter())
        .arg(bin())
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--agent-socket", api.to_str().unwrap()])
        .args(["agent", "--no-dns", "--sleeve-port", "0"])
        // Flags from the environment, as a unit file's EnvironmentFile gives them.
        .env("FERRYNET_AGENT_HTTP", "none")
        .env("FERRYNET_LOG_FORMAT", "json")
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting the agent");
    let mut agent = Proc(child);
    let seen = notify.wait_for("READY=1", || log_of(&log));
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=following the store")),
        "{seen:?}"
    );
    // Ready means the API answers, at the socket named by --agent-socket (not in the state
    // directory).
    let st = Command::new("nsenter")
        .arg(ns.enter())
        .arg(bin())
        .args(["--state-dir", state.to_str().unwrap(), "status", "--json"])
        .env("FERRYNET_AGENT_SOCKET", &api)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", out(&st));
    assert!(!state.join("agent.sock").exists());
    sigterm(&agent.0);
    notify.wait_for("STOPPING=1", || log_of(&log));
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", log_of(&log));
    // --log-format json (from FERRYNET_LOG_FORMAT): every line is one JSON object.
    let text = log_of(&log);
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    drop(agent);
}

/// The hostile case: an agent that cannot reach its store never claims to be ready. It keeps
/// retrying (the kernel keeps its last state) and says why in its status line instead.
#[test]
fn an_agent_without_its_store_never_notifies_ready() {
    let ns = host_ns();
    let dir = tempfile::tempdir().unwrap();
    let notify = Notify::new(dir.path());
    let log = dir.path().join("agent.log");
    let child = Command::new("nsenter")
        .arg(ns.enter())
        .arg(bin())
        .args(["--state-dir", dir.path().join("s").to_str().unwrap()])
        .args(["--store", "etcd://127.0.0.1:1"])
        .args(["agent", "--no-dns", "--sleeve-port", "0", "--http", "none"])
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Proc(child);
    let seen = notify.wait_for_line(
        |l| l.starts_with("STATUS=store unreachable"),
        || log_of(&log),
    );
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{seen:?}"
    );
    sigterm(&agent.0);
    let seen = notify.wait_for("STOPPING=1", || log_of(&log));
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{seen:?}"
    );
    drop(agent);
}

#[test]
fn the_docker_plugin_notifies_ready_once_its_socket_listens() {
    let ns = Ns::new("dp");
    let dir = tempfile::tempdir().unwrap();
    let notify = Notify::new(dir.path());
    let sock = dir
        .path()
        .join("plugins")
        .join(format!("fnt{}.sock", tag()));
    let log = dir.path().join("plugin.log");
    let child = Command::new("nsenter")
        .arg(ns.enter())
        .arg(bin())
        .args(["--state-dir", dir.path().join("s").to_str().unwrap()])
        .args(["docker-plugin", "--socket", sock.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let plugin = Proc(child);
    notify.wait_for("READY=1", || log_of(&log));
    // READY=1 came after listen(): connecting needs no retry.
    std::os::unix::net::UnixStream::connect(&sock).expect("the socket listens when READY=1");
    sigterm(&plugin.0);
    notify.wait_for("STOPPING=1", || log_of(&log));
    drop(plugin);
}

#[test]
fn the_default_agent_socket_is_under_run_ferrynet() {
    let default = ferrynet::control::Paths::resolve(Some(Path::new("/var/lib/ferrynet")));
    assert_eq!(
        default.agent_socket(),
        Path::new("/run/ferrynet/agent.sock")
    );
    // A state directory of its own (a lab host) keeps its socket: agents stay apart.
    let lab = ferrynet::control::Paths::resolve(Some(Path::new("/tmp/lab/h1")));
    assert_eq!(lab.agent_socket(), Path::new("/tmp/lab/h1/agent.sock"));
}

#[test]
fn every_flag_has_a_variable_and_help_shows_it() {
    let cmd = ferrynet::cli::command();
    let vars = ferrynet::cli::env::all_vars(&cmd);
    assert!(vars.len() > 100, "{}", vars.len());
    let mut names: Vec<&str> = vars.iter().map(|v| v.var.as_str()).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "two flags share a variable");
    // Every long flag of every command has one.
    fn check(c: &clap::Command, path: &str) {
        for a in c.get_arguments() {
            if a.get_long().is_some()
                && !matches!(
                    a.get_action(),
                    clap::ArgAction::Help | clap::ArgAction::Version
                )
            {
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("FERRYNET_")),
                    "{path} --{} has no FERRYNET_ variable",
                    a.get_long().unwrap()
                );
            }
        }
        for s in c.get_subcommands() {
            check(s, &format!("{path} {}", s.get_name()));
        }
    }
    check(&cmd, "ferrynet");
    // Variables the program reads for other purposes are not taken by flags: the env file
    // `ferrynet render --format env` writes holds FERRYNET_HOST.
    for other in [
        "FERRYNET_HOST",
        "FERRYNET_LOG",
        "FERRYNET_FAILPOINT",
        "FERRYNET_NFT",
    ] {
        assert!(!names.contains(&other), "{other}");
    }
    let help = Command::new(bin())
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for want in [
        "[env: FERRYNET_AGENT_HTTP=",
        "[env: FERRYNET_STORE=",
        "[env: FERRYNET_LOG_FORMAT=",
        "[env: FERRYNET_UNDERLAY_DEV=",
    ] {
        assert!(help.contains(want), "{want} not in:\n{help}");
    }
    let top = Command::new(bin()).arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.contains("Exit status:") && top.contains("5  store"),
        "{top}"
    );
}

#[test]
fn variables_set_flags_and_the_command_line_wins() {
    let lab = Lab::new();
    let net = format!("ev{}", lab.tag);
    let state = lab.state.path().to_str().unwrap().to_string();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new("nsenter");
        c.arg(lab.host.enter())
            .arg(bin())
            .args(["--state-dir", &state])
            .args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(
        &["network", "create", &net],
        &[("FERRYNET_NETWORK_CREATE_SUBNET", "10.247.3.0/24")],
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = run(&["network", "ls"], &[("FERRYNET_NETWORK_LS_JSON", "true")]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON from the variable");
    assert_eq!(v[0]["subnets"][0]["cidr"], "10.247.3.0/24", "{v}");
    // A bad value in a variable is a usage error like a bad flag.
    let o = run(&["network", "ls"], &[("FERRYNET_LOG_FORMAT", "yaml")]);
    assert_eq!(o.status.code(), Some(USAGE), "{}", out(&o));
    // The command line wins over the variable.
    let o = run(
        &[
            "network",
            "create",
            &format!("{net}b"),
            "--subnet",
            "10.247.4.0/24",
        ],
        &[("FERRYNET_NETWORK_CREATE_SUBNET", "10.247.3.0/24")],
    );
    assert!(o.status.success(), "{}", out(&o));
    // --exist-ok: the same network again is fine; a different one under the name is not.
    let again = [
        "network",
        "create",
        &net,
        "--subnet",
        "10.247.3.0/24",
        "--exist-ok",
    ];
    let o = run(&again, &[]);
    assert!(o.status.success(), "{}", out(&o));
    let o = run(
        &[
            "network",
            "create",
            &net,
            "--subnet",
            "10.247.9.0/24",
            "--exist-ok",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(CONFLICT), "{}", out(&o));
}

#[test]
fn errors_exit_with_their_documented_codes() {
    let lab = Lab::new();
    let net = format!("ex{}", lab.tag);
    let code = |args: &[&str]| {
        let o = lab.cli(args);
        (o.status.code(), out(&o))
    };
    let (c, o) = code(&["network", "inspect", "nosuchnet"]);
    assert_eq!(c, Some(NOT_FOUND), "{o}");
    let (c, o) = code(&["logs", &format!("nope{}", lab.tag)]);
    assert_eq!(c, Some(NOT_FOUND), "{o}");
    let (c, o) = code(&["network", "create", &net, "--subnet", "10.247.5.0/24"]);
    assert_eq!(c, Some(0), "{o}");
    let (c, o) = code(&["network", "create", &net, "--subnet", "10.247.6.0/24"]);
    assert_eq!(c, Some(CONFLICT), "{o}");
    let (c, o) = code(&["network", "ls", "--no-such-flag"]);
    assert_eq!(c, Some(USAGE), "{o}");
    let (c, o) = code(&["--store", "etcd://127.0.0.1:1", "network", "ls"]);
    assert_eq!(c, Some(STORE), "{o}");
    // Not root: refused before anything is touched.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "network",
            "ls",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(SYSTEM), "{}", out(&o));
}

/// Removes a CLI container when the test ends, also on failure.
struct Container<'a>(&'a Lab, String);
impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.0.cli(&["rm", "--force", &self.1]);
    }
}

#[test]
fn logs_prints_and_follows_a_containers_output() {
    let lab = Lab::new();
    let net = format!("lg{}", lab.tag);
    let o = lab.cli(&["network", "create", &net, "--subnet", "10.247.7.0/24"]);
    assert!(o.status.success(), "{}", out(&o));
    let name = format!("lg{}", tag());
    let o = lab.cli(&[
        "run",
        "--name",
        &name,
        "--net",
        &net,
        "--",
        "sh",
        "-c",
        "echo out-line; echo err-line >&2; sleep 1; echo last-line",
    ]);
    let _c = Container(&lab, name.clone());
    assert!(o.status.success(), "{}", out(&o));
    // -f returns when the process ends, with everything it wrote.
    let f = lab.cli(&["logs", "-f", &name]);
    assert!(f.status.success(), "{}", out(&f));
    let text = String::from_utf8_lossy(&f.stdout);
    for want in ["out-line", "err-line", "last-line"] {
        assert!(text.contains(want), "{want} not in {text:?}");
    }
    let once = lab.cli(&["logs", &name]);
    assert_eq!(once.stdout, f.stdout);
    // Hostile: a name that is a path is refused before it reaches the file system.
    let (c, o) = {
        let o = lab.cli(&["logs", "../../../../etc"]);
        (o.status.code(), out(&o))
    };
    assert_eq!(c, Some(USAGE), "{o}");
    assert!(!o.contains("root:"), "{o}");
}

#[test]
fn version_names_the_commit() {
    let o = Command::new(bin()).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        v.starts_with(&format!("ferrynet {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "not a git checkout?");
    assert!(v.contains(&format!("commit {head}")), "{v} (HEAD {head})");
}
