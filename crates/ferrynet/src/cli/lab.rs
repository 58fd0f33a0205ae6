//! `ferrynet lab`: a multi-host cluster on one machine, for tests and demos.
//!
//! Hosts are network namespaces on an underlay bridge that lives in its own namespace (which
//! also routes between two underlay subnets when asked, to exercise `auto`); etcd runs in its
//! own namespace; each host runs `ferrynet agent` with its own state directory. Nothing is
//! created in the root namespace, so all lab traffic stays inside the lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use super::lab_racks;
use crate::agent::api::{query_status, socket_path};

/// Where labs keep their files.
const LAB_ROOT: &str = "/run/ferrynet-lab";

/// Lab subcommands.
#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab: hosts as network namespaces, a store, an agent per host.
    Up(Box<UpArgs>),
    /// Remove a lab: stop its agents and etcd, delete its namespaces and files.
    Down {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Stop a host's agent (SIGTERM, or SIGKILL with --kill), as a crash or maintenance would.
    StopAgent {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Host (h1, h2, …).
        host: String,
        /// SIGKILL instead of SIGTERM.
        #[arg(long)]
        kill: bool,
    },
    /// Start a host's agent again (after stop-agent).
    StartAgent {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Host (h1, h2, …).
        host: String,
    },
    /// Stop the lab's etcd (an outage).
    StopEtcd {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Start the lab's etcd again, on its existing data.
    StartEtcd {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Follow GoBGP's best paths into this namespace's kernel (the lab's GoBGP ToRs).
    #[command(hide = true)]
    GobgpFib,
    /// Run a command on a lab host (in its namespace, with its state dir and store set).
    Exec {
        /// Lab name.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Host (h1, h2, …).
        host: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// `lab up` options.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Lab name (at most 8 letters/digits; prefixes every namespace).
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// Number of hosts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=60))]
    pub hosts: u8,
    /// Underlay subnets: 1 (all hosts share a link) or 2 (joined by a router; odd hosts on
    /// the first, even on the second).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub subnets: u8,
    /// Store: etcd (in its own namespace) or file (one embedded store file shared by the hosts).
    #[arg(long, default_value = "etcd", value_parser = ["etcd", "file"])]
    pub store: String,
    /// Also create this multi-host network (dual-stack, 10.20.0.0/16 + fd20::/64) with this
    /// backend: route, vxlan, auto, sleeve or bgp.
    #[arg(long)]
    pub backend: Option<String>,
    /// Create that network with `--encrypt` (cross-host traffic through the sleeve).
    #[arg(long, requires = "backend")]
    pub encrypt: bool,
    /// Put this host behind NAT (repeatable): a router namespace on the underlay masquerades
    /// its traffic and passes only connections it started; the host's own underlay is the
    /// private 172.30.N.0/24 and fd30:N::/64. Each such host has its own router, so two of
    /// them (`--nat h2,h3`) reach each other only through a third host (the sleeve's relay).
    #[arg(long, value_name = "HOST", value_delimiter = ',')]
    pub nat: Vec<String>,
    /// Drop UDP to port 4789 (VXLAN) to and from this host on the underlay (repeatable), as a
    /// firewall between sites would.
    #[arg(long, value_name = "HOST")]
    pub block_vxlan: Vec<String>,
    /// How the network's containers attach: bridge or routed (see `network create --mode`).
    #[arg(long, default_value = "bridge", value_parser = ["bridge", "routed"], requires = "backend")]
    pub mode: String,
    /// Agents' grace period for vanished hosts.
    #[arg(long, default_value = "60s")]
    pub grace: String,
    /// Agents' lease TTL.
    #[arg(long, default_value = "10s")]
    pub lease_ttl: String,
    /// Upstream resolver of the agents' DNS servers, IP[:PORT] (repeatable). Default: none,
    /// so names outside the cluster get SERVFAIL and no lab query leaves the lab.
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns_upstream: Vec<String>,
    /// Agents also serve Docker's network and IPAM driver under this name, on
    /// `<lab dir>/<host>/plugins/NAME.sock`, for a dockerd of each host's own (one that sees
    /// that directory as /run/docker/plugins and listens on `<lab dir>/<host>/docker.sock`).
    #[arg(long, value_name = "NAME")]
    pub docker_driver: Option<String>,
    /// An L3 fabric instead: this many racks, each its own underlay subnet behind a ToR
    /// router namespace (hosts dealt over the racks in turn). The ToRs route the underlay
    /// statically and container blocks over BGP; hosts peer with their ToR (no mesh, an AS
    /// per host). Use with --backend bgp.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8), conflicts_with = "subnets")]
    pub racks: u8,
    /// The ToRs' BGP daemon: bird (BIRD 2) or gobgp (gobgpd, with FRR's zebra for the kernel).
    #[arg(long, default_value = "bird", requires = "racks")]
    pub router: String,
    /// TCP-MD5 password on the host-ToR sessions.
    #[arg(long, requires = "racks")]
    pub bgp_password: Option<String>,
}

/// What `lab down` needs to undo a lab.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LabRecord {
    /// Lab name.
    pub name: String,
    /// Namespaces created, in creation order.
    pub namespaces: Vec<String>,
    /// Processes started (PID and what they are).
    pub pids: Vec<(u32, String)>,
    /// The store URL the hosts use.
    pub store: String,
    /// Host names.
    pub hosts: Vec<String>,
    /// The ferrynet binary the agents run.
    #[serde(default)]
    pub exe: String,
    /// Agents' grace period.
    #[serde(default)]
    pub grace: String,
    /// Agents' lease TTL.
    #[serde(default)]
    pub lease_ttl: String,
    /// Agents' DNS upstreams (empty: none).
    #[serde(default)]
    pub dns_upstream: Vec<String>,
    /// The Docker driver name the agents serve (None: no Docker driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_driver: Option<String>,
    /// Racks (0: no ToRs, one or two flat subnets).
    #[serde(default)]
    pub racks: u8,
    /// The ToRs' BGP daemon.
    #[serde(default)]
    pub router: String,
    /// TCP-MD5 password of the host-ToR sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_password: Option<String>,
}

/// The lab's directory.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// A host's namespace name.
pub fn host_ns(lab: &str, host: &str) -> String {
    format!("{lab}-{host}")
}

/// Underlay addresses of host `i` (1-based): (v4 cidr, v6 cidr, subnet index).
pub fn host_underlay(i: u8, subnets: u8) -> (String, String, u8) {
    let s = if subnets == 2 && i.is_multiple_of(2) {
        1
    } else {
        0
    };
    (format!("172.31.{s}.{i}/24"), format!("fd31:{s}::{i}/64"), s)
}

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn save(rec: &LabRecord) -> anyhow::Result<()> {
    let p = lab_dir(&rec.name).join("lab.json");
    // Atomically: `lab exec` and the others read it while `start-agent` or `stop-etcd` rewrite
    // it (a plain write let a reader see it empty).
    crate::render::output::write_atomic(&p, &serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("writing {}", p.display()))
}

fn load(name: &str) -> anyhow::Result<LabRecord> {
    let p = lab_dir(name).join("lab.json");
    let b =
        std::fs::read(&p).with_context(|| format!("no lab {name} ({} missing)", p.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))
}

/// Start `cmd` in namespace `ns` in the background, its output to `log`; returns its PID.
pub(crate) fn spawn_in(
    ns: &str,
    cmd: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<u32> {
    let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    for (k, v) in env {
        c.env(k, v);
    }
    // Its own process group, so the lab outlives the `lab up` command.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let child = c
        .spawn()
        .with_context(|| format!("starting {}", cmd.join(" ")))?;
    Ok(child.id())
}

/// Run a lab subcommand.
pub async fn run(cmd: LabCmd, exe: &Path) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        LabCmd::Up(a) => {
            up(&a, exe).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        LabCmd::Down { name } => {
            down(&name)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        LabCmd::Exec { name, host, cmd } => exec(&name, &host, &cmd),
        LabCmd::GobgpFib => {
            super::lab_gobgp_fib::gobgp_fib().map(|_| std::process::ExitCode::FAILURE)
        }
        LabCmd::StopAgent { name, host, kill } => {
            let mut rec = load(&name)?;
            let what = format!("agent {host}");
            stop_process(&mut rec, &what, kill)?;
            save(&rec)?;
            println!("agent on {host} stopped");
            Ok(std::process::ExitCode::SUCCESS)
        }
        LabCmd::StartAgent { name, host } => {
            let mut rec = load(&name)?;
            if !rec.hosts.contains(&host) {
                bail!("lab {name} has no host {host}");
            }
            if rec
                .pids
                .iter()
                .any(|(p, w)| *w == format!("agent {host}") && is_ours(*p, "agent"))
            {
                bail!("the agent on {host} is already running");
            }
            start_agent(&mut rec, &host)?;
            save(&rec)?;
            println!("agent on {host} started");
            Ok(std::process::ExitCode::SUCCESS)
        }
        LabCmd::StopEtcd { name } => {
            let mut rec = load(&name)?;
            stop_process(&mut rec, "etcd", false)?;
            save(&rec)?;
            println!("etcd stopped");
            Ok(std::process::ExitCode::SUCCESS)
        }
        LabCmd::StartEtcd { name } => {
            let mut rec = load(&name)?;
            if rec
                .pids
                .iter()
                .any(|(p, w)| w == "etcd" && is_ours(*p, "etcd"))
            {
                bail!("etcd is already running");
            }
            start_etcd(&mut rec)?;
            save(&rec)?;
            println!("etcd started");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// Stop the recorded process `what` (by its PID) and forget it.
fn stop_process(rec: &mut LabRecord, what: &str, kill: bool) -> anyhow::Result<()> {
    let needle = needle(what);
    let Some(i) = rec
        .pids
        .iter()
        .position(|(p, w)| w == what && is_ours(*p, needle))
    else {
        bail!("{what} is not running in lab {}", rec.name);
    };
    let (pid, _) = rec.pids.remove(i);
    terminate(pid, needle, kill);
    Ok(())
}

/// The word a recorded process's command line holds: `agent h1` -> agent, `bird tor0` ->
/// bird, `etcd` -> etcd.
fn needle(what: &str) -> &str {
    what.split(' ').next().unwrap_or(what)
}

fn terminate(pid: u32, needle: &str, kill: bool) {
    use nix::sys::signal::{kill as send, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = send(
        p,
        if kill {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        },
    );
    let until = Instant::now() + Duration::from_secs(5);
    while is_ours(pid, needle) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_ours(pid, needle) {
        let _ = send(p, Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_etcd(rec: &mut LabRecord) -> anyhow::Result<()> {
    let ns = format!("{}-etcd", rec.name);
    let data = lab_dir(&rec.name).join("etcd").display().to_string();
    let pid = spawn_in(
        &ns,
        &[
            "/usr/bin/etcd",
            "--name",
            "lab",
            "--data-dir",
            &data,
            "--listen-client-urls",
            "http://172.31.0.253:2379",
            "--advertise-client-urls",
            "http://172.31.0.253:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
            // Docker's cluster store (dockerd --cluster-store, Docker <= 22) speaks the v2 API.
            "--enable-v2=true",
        ],
        &[],
        &lab_dir(&rec.name).join("etcd.log"),
    )?;
    rec.pids.push((pid, "etcd".into()));
    Ok(())
}

fn start_agent(rec: &mut LabRecord, host: &str) -> anyhow::Result<()> {
    let ns = host_ns(&rec.name, host);
    let state = lab_dir(&rec.name).join(host);
    std::fs::create_dir_all(&state)?;
    let state_s = state.display().to_string();
    let log = state.join("agent.log");
    // Append: a restarted agent's log follows its predecessor's.
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).args([
        rec.exe.as_str(),
        "--state-dir",
        &state_s,
        "--store",
        &rec.store,
        "agent",
        "--host-name",
        host,
        "--underlay-dev",
        "eth0",
        "--grace",
        &rec.grace,
        "--lease-ttl",
        &rec.lease_ttl,
    ]);
    // The HTTP listener on loopback (as on a real host) and on the underlay address, so a
    // Prometheus in another lab namespace can scrape every host.
    c.args(["--http", crate::agent::web::DEFAULT_ADDR]);
    if let Some(a) = underlay_v4(&ns) {
        c.args(["--http", &format!("{a}:9470")]);
    }
    if rec.dns_upstream.is_empty() {
        c.args(["--dns-upstream", "none"]);
    }
    for u in &rec.dns_upstream {
        c.args(["--dns-upstream", u]);
    }
    if let Some(d) = &rec.docker_driver {
        // A dockerd of the host's own finds the plugin when it sees `plugins/` as
        // /run/docker/plugins, and listens on `docker.sock`, where the driver asks for names.
        std::fs::create_dir_all(state.join("plugins"))?;
        c.arg("--docker-socket")
            .arg(state.join("plugins").join(format!("{d}.sock")));
        c.env(
            "DOCKER_HOST",
            format!("unix://{}", state.join("docker.sock").display()),
        );
    }
    // `FERRYNET_LAB_LOG=ferrynet=debug` (say) for the timed debug lines of a benchmark.
    let level = std::env::var("FERRYNET_LAB_LOG").unwrap_or_else(|_| "info".into());
    c.env("FERRYNET_LOG", level)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let child = c.spawn().context("starting the agent")?;
    rec.pids.push((child.id(), format!("agent {host}")));
    Ok(())
}

/// The first IPv4 address of `eth0` in namespace `ns`.
fn underlay_v4(ns: &str) -> Option<std::net::Ipv4Addr> {
    let o = Command::new("ip")
        .args(["-n", ns, "-j", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v.get(0)?
        .get("addr_info")?
        .as_array()?
        .iter()
        .find_map(|a| a.get("local")?.as_str()?.parse().ok())
}

async fn up(a: &UpArgs, exe: &Path) -> anyhow::Result<()> {
    if a.name.is_empty() || a.name.len() > 8 || !a.name.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("lab name {:?} must be 1-8 letters or digits", a.name);
    }
    if let Some(d) = &a.docker_driver {
        if d.is_empty()
            || d.len() > 32
            || !d
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("Docker driver name {d:?} must be 1-32 letters, digits, '-' or '_'");
        }
    }
    for h in a.nat.iter().chain(&a.block_vxlan) {
        let known = h
            .strip_prefix('h')
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (1..=a.hosts).contains(&n));
        if !known {
            bail!(
                "--nat/--block-vxlan {h:?}: the lab's hosts are h1 to h{}",
                a.hosts
            );
        }
    }
    let dir = lab_dir(&a.name);
    if dir.join("lab.json").exists() {
        bail!(
            "lab {} is already up; `ferrynet lab down --name {}` first",
            a.name,
            a.name
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rec = LabRecord {
        name: a.name.clone(),
        exe: exe.display().to_string(),
        grace: a.grace.clone(),
        lease_ttl: a.lease_ttl.clone(),
        dns_upstream: a.dns_upstream.clone(),
        docker_driver: a.docker_driver.clone(),
        racks: a.racks,
        router: a.router.clone(),
        bgp_password: a.bgp_password.clone(),
        ..Default::default()
    };
    if a.racks > 0 {
        lab_racks::check_router(&a.router)?;
    }
    let res = build(a, exe, &mut rec).await;
    save(&rec)?;
    if let Err(e) = res {
        let _ = down(&a.name);
        return Err(e.context(format!(
            "lab {} could not be built; removed what was made",
            a.name
        )));
    }
    println!(
        "lab {} is up: {} host(s), store {}",
        a.name, a.hosts, rec.store
    );
    println!(
        "  run on a host:   ferrynet lab exec --name {} h1 -- ferrynet status",
        a.name
    );
    println!(
        "  a container:     ferrynet lab exec --name {} h1 -- ferrynet run --name c1 --net NET -- sleep infinity",
        a.name
    );
    println!("  remove it:       ferrynet lab down --name {}", a.name);
    Ok(())
}

async fn build(a: &UpArgs, exe: &Path, rec: &mut LabRecord) -> anyhow::Result<()> {
    let ul = build_underlay(a, rec)?;
    let store = start_store(a, &ul, rec)?;
    rec.store = store.clone();
    save(rec)?;
    if a.racks > 0 {
        lab_racks::start_routers(rec, a.racks, a.hosts, &a.router, a.bgp_password.as_deref())?;
        save(rec)?;
    }
    build_hosts(a, &ul, rec)?;
    wait_agents(a, rec).await?;
    if a.racks > 0 {
        for cmd in lab_racks::host_bgp_commands(a.racks, a.hosts, a.bgp_password.as_deref()) {
            run_on_h1(a, exe, &cmd)?;
        }
    }
    if let Some(b) = &a.backend {
        create_fabric(a, exe, b, rec).await?;
    }
    Ok(())
}

/// The underlay namespace with its subnets' bridges (or the racks' fabric); its name.
fn build_underlay(a: &UpArgs, rec: &mut LabRecord) -> anyhow::Result<String> {
    let ul = format!("{}-ul", a.name);
    ip(&["netns", "add", &ul])?;
    rec.namespaces.push(ul.clone());
    ip(&["-n", &ul, "link", "set", "lo", "up"])?;
    if a.racks > 0 {
        lab_racks::build_fabric(&ul, a.racks, rec)?;
    }
    for s in (0..a.subnets).filter(|_| a.racks == 0) {
        let br = format!("ul{s}");
        ip(&["-n", &ul, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", &br, "up"])?;
        ip(&[
            "-n",
            &ul,
            "addr",
            "add",
            &format!("172.31.{s}.254/24"),
            "dev",
            &br,
        ])?;
        ip(&[
            "-n",
            &ul,
            "addr",
            "add",
            &format!("fd31:{s}::fe/64"),
            "dev",
            &br,
            "nodad",
        ])?;
    }
    // The underlay namespace routes between its subnets (with racks, the ToRs do).
    if a.racks == 0 {
        sysctl_in(&ul, "net.ipv4.ip_forward", "1")?;
        sysctl_in(&ul, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(ul)
}

/// The store the hosts share: etcd in a namespace of its own on the underlay, or a file; its URL.
fn start_store(a: &UpArgs, ul: &str, rec: &mut LabRecord) -> anyhow::Result<String> {
    Ok(match a.store.as_str() {
        "etcd" => {
            let etcd = Path::new("/usr/bin/etcd");
            if !etcd.exists() {
                bail!(
                    "/usr/bin/etcd is missing: apt-get install etcd-server (or use --store file)"
                );
            }
            let ns = format!("{}-etcd", a.name);
            ip(&["netns", "add", &ns])?;
            rec.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", ul, "link", "add", "etcd", "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", ul, "link", "set", "etcd", "master", "ul0", "up"])?;
            ip(&["-n", &ns, "addr", "add", "172.31.0.253/24", "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", "172.31.0.254"])?;
            start_etcd(rec)?;
            "etcd://172.31.0.253:2379".to_string()
        }
        _ => format!("file://{}", lab_dir(&a.name).join("store.redb").display()),
    })
}

/// The hosts: a namespace each, on the underlay (or behind NAT), with its agent.
fn build_hosts(a: &UpArgs, ul: &str, rec: &mut LabRecord) -> anyhow::Result<()> {
    for i in 1..=a.hosts {
        let host = format!("h{i}");
        let ns = host_ns(&a.name, &host);
        ip(&["netns", "add", &ns])?;
        rec.namespaces.push(ns.clone());
        rec.hosts.push(host.clone());
        let (v4, v6, s) = if a.racks > 0 {
            let r = lab_racks::host_rack(i, a.racks);
            (format!("172.31.{r}.{i}/24"), format!("fd31:{r}::{i}/64"), r)
        } else {
            host_underlay(i, a.subnets)
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        if a.nat.contains(&host) {
            super::lab_nat::behind_nat(rec, ul, &ns, i, s)?;
        } else {
            plug(ul, &ns, &host, s, &v4, &v6)?;
        }
        if a.block_vxlan.contains(&host) {
            super::lab_nat::block_vxlan(ul, &host, &v4, &v6)?;
        }
        start_agent(rec, &host)?;
        save(rec)?;
    }
    Ok(())
}

/// Wait until every agent answers and sees every host (30 s at most).
async fn wait_agents(a: &UpArgs, rec: &LabRecord) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for host in &rec.hosts {
        let sock = socket_path(&lab_dir(&a.name).join(host));
        loop {
            match query_status(&sock).await {
                Ok(s)
                    if s.store_ok
                        && s.hosts.iter().filter(|h| h.live).count() == rec.hosts.len() =>
                {
                    break
                }
                r => {
                    if Instant::now() > deadline {
                        let why = match r {
                            Ok(s) => format!(
                                "sees {} live host(s), store ok: {}",
                                s.hosts.iter().filter(|h| h.live).count(),
                                s.store_ok
                            ),
                            Err(e) => e.to_string(),
                        };
                        bail!(
                            "agent on {host} not ready after 30 s ({why}); see {}",
                            lab_dir(&a.name).join(host).join("agent.log").display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Ok(())
}

/// The `fabric` network (`--backend`), created on h1.
async fn create_fabric(a: &UpArgs, exe: &Path, b: &str, rec: &LabRecord) -> anyhow::Result<()> {
    let state = lab_dir(&a.name).join("h1").display().to_string();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host_ns(&a.name, "h1")))
        .arg(exe)
        .args([
            "--state-dir",
            &state,
            "network",
            "create",
            "fabric",
            "--subnet",
            "10.20.0.0/16",
            "--subnet",
            "fd20::/64",
            "--backend",
            b,
            "--mode",
            &a.mode,
        ])
        .args(a.encrypt.then_some("--encrypt"))
        .output()?;
    if !out.status.success() {
        bail!(
            "creating network fabric: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "network fabric (10.20.0.0/16, fd20::/64, backend {b}{}, mode {}) created",
        if a.encrypt { ", encrypted" } else { "" },
        a.mode
    );
    if b == "bgp" {
        wait_bgp(&a.name, &rec.hosts).await?;
    }
    Ok(())
}

/// Join namespace `ns` to underlay bridge `ul{s}` through a veth (`name` on the bridge side,
/// `eth0` inside) with these addresses and default routes via the underlay's router.
pub(super) fn plug(
    ul: &str,
    ns: &str,
    name: &str,
    s: u8,
    v4: &str,
    v6: &str,
) -> anyhow::Result<()> {
    ip(&[
        "-n", ul, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&[
        "-n",
        ul,
        "link",
        "set",
        name,
        "master",
        &format!("ul{s}"),
        "up",
    ])?;
    ip(&["-n", ns, "addr", "add", v4, "dev", "eth0"])?;
    ip(&["-n", ns, "addr", "add", v6, "dev", "eth0", "nodad"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &format!("172.31.{s}.254"),
    ])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd31:{s}::fe"),
    ])?;
    Ok(())
}

/// Wait until every host's BGP sessions are Established (60 s at most).
async fn wait_bgp(lab: &str, hosts: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for host in hosts {
        let sock = socket_path(&lab_dir(lab).join(host));
        loop {
            let why = match query_status(&sock).await {
                Ok(s) => match s.bgp {
                    Some(b)
                        if !b.peers.is_empty()
                            && b.peers.iter().all(|p| p.state == "Established") =>
                    {
                        break
                    }
                    Some(b) => b
                        .peers
                        .iter()
                        .map(|p| format!("{} {}", p.name, p.state))
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => "BGP not started".into(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("BGP on {host} not up after 60 s: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("BGP sessions established on every host");
    Ok(())
}

/// `ferrynet CMD` on h1, which must succeed.
fn run_on_h1(a: &UpArgs, exe: &Path, cmd: &[String]) -> anyhow::Result<()> {
    let state = lab_dir(&a.name).join("h1").display().to_string();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host_ns(&a.name, "h1")))
        .arg(exe)
        .args(["--state-dir", &state])
        .args(cmd)
        .output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
}

/// True if `pid` is still the process we started (its command line names `what`).
fn is_ours(pid: u32, what: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(what))
        .unwrap_or(false)
}

/// Remove the containers `ferrynet run` made on the lab's hosts (best effort: the store may
/// be down), each from the host it runs on.
fn remove_containers(rec: &LabRecord) {
    for host in &rec.hosts {
        let state = lab_dir(&rec.name).join(host).display().to_string();
        let base = |c: &mut Command| {
            c.arg(format!("--net=/run/netns/{}", host_ns(&rec.name, host)))
                .args([
                    rec.exe.as_str(),
                    "--state-dir",
                    &state,
                    "--store",
                    &rec.store,
                ]);
        };
        let mut ps = Command::new("nsenter");
        base(&mut ps);
        let Ok(out) = ps.args(["ps", "--json"]).output() else {
            continue;
        };
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for c in list {
            let Some(n) = c.get("name").and_then(|v| v.as_str()) else {
                continue;
            };
            let mut rm = Command::new("nsenter");
            base(&mut rm);
            let _ = rm.args(["rm", "--force", n]).output();
        }
    }
}

fn down(name: &str) -> anyhow::Result<()> {
    let rec = load(name)?;
    if !rec.exe.is_empty() {
        remove_containers(&rec);
    }
    for (pid, what) in rec.pids.iter().rev() {
        let needle = needle(what);
        if is_ours(*pid, needle) {
            terminate(*pid, needle, false);
        }
    }
    for ns in rec.namespaces.iter().rev() {
        if let Err(e) = ip(&["netns", "del", ns]) {
            tracing::warn!(error = %e, "removing namespace {ns}");
        }
    }
    std::fs::remove_dir_all(lab_dir(name))
        .with_context(|| format!("removing {}", lab_dir(name).display()))?;
    println!("lab {name} removed");
    Ok(())
}

fn exec(name: &str, host: &str, cmd: &[String]) -> anyhow::Result<std::process::ExitCode> {
    let rec = load(name)?;
    if !rec.hosts.iter().any(|h| h == host) {
        bail!(
            "lab {name} has no host {host} (hosts: {})",
            rec.hosts.join(", ")
        );
    }
    let state = lab_dir(name).join(host);
    // nsenter, not `ip netns exec`: the latter runs in a private mount namespace, so the
    // namespaces `ferrynet run` mounts under /run/netns would vanish when it exits.
    let st = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host_ns(name, host)))
        .args(cmd)
        .env("FERRYNET_STATE_DIR", &state)
        .env("FERRYNET_STORE", &rec.store)
        .status()
        .context("running nsenter (package util-linux)")?;
    Ok(std::process::ExitCode::from(st.code().unwrap_or(1) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_alternate_subnets_when_asked() {
        assert_eq!(host_underlay(1, 1).2, 0);
        assert_eq!(host_underlay(2, 1).2, 0);
        assert_eq!(
            host_underlay(2, 2),
            ("172.31.1.2/24".into(), "fd31:1::2/64".into(), 1)
        );
        assert_eq!(host_underlay(3, 2).2, 0);
    }
}
