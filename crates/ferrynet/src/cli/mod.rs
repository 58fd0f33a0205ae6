//! The command line: networks, containers, CNI installation.

mod bgp;
mod docs;
pub mod env;
pub mod exit;
mod install;
mod lab;
mod lab_gobgp_fib;
mod lab_nat;
mod lab_racks;
mod logs;
mod policy;
mod render;
pub mod service;
mod sleeve_cmd;
mod status;
mod table;
mod trace;
mod trace_live;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ferrynet_dataplane::netns::Netns;
use ferrynet_model::fabric::Backend;
use ferrynet_model::names::{parse_mac, validate_container_name};
use ferrynet_model::network::{
    EndpointOwner, FabricSpec, Network, NetworkMode, Subnet, DEFAULT_BLOCK_V4, DEFAULT_BLOCK_V6,
};
use ipnet::IpNet;

use crate::container::{self, netns_name, netns_path, parse_publish, Container};
use crate::control::endpoint::AttachRequest;
use crate::control::{Control, Paths};
use table::Table;

/// Container networking: bridged and host networks, published ports, multi-host networks
/// (routed or VXLAN) on etcd, a CNI plugin and a Docker network driver.
///
/// Run as root. State lives in an embedded store under --state-dir (default /var/lib/ferrynet),
/// or in etcd with --store etcd://HOST:2379. When CNI_COMMAND is set in the environment,
/// ferrynet acts as a CNI plugin instead (configuration on stdin, result on stdout), so the same
/// binary is installed into the CNI bin directory by `ferrynet install-cni`. For several hosts,
/// run `ferrynet agent` on each; try it on one machine with `ferrynet lab up`.
///
/// Every flag can also be set by an environment variable, named in its help: FERRYNET_, the
/// subcommand path and the flag (`ferrynet agent --http` ← FERRYNET_AGENT_HTTP); global flags
/// without a path (FERRYNET_STORE). The command line wins.
#[derive(Parser, Debug)]
#[command(name = "ferrynet", version = crate::failpoint::VERSION, about, long_about, after_help = exit::HELP)]
struct Cli {
    /// State directory holding the embedded store.
    #[arg(long, global = true, env = "FERRYNET_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Cluster store: `etcd://host:2379[,host:2379]` (or `etcds://` with TLS). Default: what
    /// this host's agent recorded in <state-dir>/host.json, else the embedded file.
    #[arg(long, global = true, env = "FERRYNET_STORE", value_name = "URL")]
    store: Option<String>,
    /// Log lines as human text or one JSON object per line (on stderr; FERRYNET_LOG filters).
    #[arg(long, global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    log_format: crate::logging::LogFormat,
    /// The agent's unix socket (`ferrynet status`). Default: /run/ferrynet/agent.sock with the
    /// default state directory, else agent.sock inside the state directory.
    #[arg(long, global = true, value_name = "PATH")]
    agent_socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create, list, inspect and remove networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Start a container: a new network namespace attached to a network, running CMD.
    Run(RunArgs),
    /// List containers started with `ferrynet run`.
    Ps(JsonFlag),
    /// Print the output (stdout and stderr) of a container started with `ferrynet run`.
    Logs(logs::LogsArgs),
    /// Run a command inside a container's network namespace (in the foreground).
    Exec {
        /// Container name.
        name: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Stop a container's process (SIGTERM, then SIGKILL after --time seconds).
    Stop {
        /// Container name.
        name: String,
        /// Seconds to wait before SIGKILL.
        #[arg(long, short, default_value_t = 10)]
        time: u64,
    },
    /// Remove a container: its process, its network attachment and its namespace.
    Rm {
        /// Container name.
        name: String,
        /// Stop it first if it is running.
        #[arg(long, short)]
        force: bool,
    },
    /// Install ferrynet as a CNI plugin: copy the binary and write a conflist.
    InstallCni(install::InstallArgs),
    /// Rebuild ferrynet's nftables table from the store (after a firewall reload wiped it) and
    /// remove bridges of networks that no longer exist.
    Reload,
    /// Show the anti-spoofing drop counters of this host's container ports, per reason.
    Guard(JsonFlag),
    /// Serve Docker's network and IPAM driver API in the foreground (see docs/DOCKER.md).
    DockerPlugin(crate::cnm::PluginArgs),
    /// Run the per-host agent of a multi-host cluster (foreground; stop with SIGTERM).
    Agent(AgentArgs),
    /// Show the agent's view: hosts, blocks, peers, the backend to each, the last reconcile.
    Status(JsonFlag),
    /// Register, deregister, list and inspect services and their producers.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// A multi-host lab on this machine: hosts as network namespaces, etcd, an agent per host.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// The sleeve (encrypted overlay): this host's public key, a handshake test.
    #[command(subcommand)]
    Sleeve(sleeve_cmd::SleeveCmd),
    /// Keep files rendered from templates over services, producers and keys; reload on change.
    ///
    /// The confd / consul-template job, built in. Follows the store (embedded or etcd) and, on
    /// every change, renders each template (Jinja2 syntax, minijinja); a file is rewritten only
    /// when its content changed, atomically (temporary file in the same directory, fsync,
    /// rename; mode and owner kept), then --exec runs once. A template error is reported with
    /// its file and line; the file keeps its last good content and rendering goes on (--once
    /// exits non-zero instead; a syntax error or a missing template stops it at the start).
    /// SIGHUP reads the template files again (a broken edit is refused and logged).
    ///
    /// Template globals: `host`; `services` (by name: `services.web`; each with name, vip,
    /// vip4, vip6, vips, port, ports[name, port, protocol], networks, affinity, ingress, and
    /// `producers`: the healthy ones, each with id, addr, addrs, port, ports.<port name>, host,
    /// network, container); `all_producers` (also unhealthy, with `healthy`); `kv` (ferrynet kv
    /// values); `networks` (name, subnets, gateways, multi_host, internal); `endpoints` or
    /// `containers` (name, network, ips, aliases, host). Functions: service("web"),
    /// producers("web"), key("name"[, default]). Filters: sort_by("attr"[, reverse]) (addresses
    /// and numbers in numeric order), shquote, and minijinja's (join, map, selectattr, tojson…).
    /// Printing an undefined value is an error; testing it (`{% if s.vip6 %}`) is not.
    ///
    /// Example: ferrynet render -t nginx.conf.tmpl -o /etc/nginx/conf.d/web.conf --exec "nginx -s reload"
    Render(render::RenderArgs),
    /// Network policy: label selectors, allow and deny rules, enforced on every host.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Show or change the labels of a container (`KEY=VALUE`, `KEY-` removes); policies
    /// follow at once, and connections they no longer allow are cut.
    Label(policy::LabelArgs),
    /// Free-form keys for templates (`key("name")`, `kv.name` in `ferrynet render`).
    #[command(subcommand)]
    Kv(render::KvCmd),
    /// BGP for `--backend bgp` networks: peers (ToR routers, route reflectors), settings,
    /// sessions. See docs/BGP.md.
    #[command(subcommand)]
    Bgp(bgp::BgpCmd),
    /// Explain where a packet from SRC to DST[:PORT[/tcp|udp]] goes and why, hop by hop:
    /// anti-spoofing, DNAT, isolation, policy, routes and the backend hop per host, or the
    /// step that drops it. Reads the store and this host's kernel (other hosts: from their
    /// records); --live confirms it on this host with nftables tracing.
    Trace(trace::TraceArgs),
    /// Print a shell completion script (bash, zsh, fish), e.g.
    /// `ferrynet completions bash > /etc/bash_completion.d/ferrynet`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Write man pages (ferrynet.1 and one per subcommand) into DIR.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
}

/// The command line definition with every flag's environment variable (`env`).
pub fn command() -> clap::Command {
    env::with_env(Cli::command())
}

/// Parse `args` (program name first) as the command line would be parsed, without running
/// anything: for checking command lines written elsewhere (systemd units, manifests).
pub fn check_args<I, T>(args: I) -> Result<(), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let m = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&m).map(|_| ())
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// This host's name in the cluster (default: the system host name).
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// Underlay interface other hosts are reached through (default: the default route's).
    #[arg(long, env = "FERRYNET_UNDERLAY_DEV", value_name = "DEV")]
    underlay_dev: Option<String>,
    /// TTL of the host's registration; a host silent for longer is considered gone.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// How long a gone host keeps its routes and blocks before they are released.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    grace: Duration,
    /// How often the kernel is re-checked against the store even without changes.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resync: Duration,
    /// Also serve Docker's remote network + IPAM driver on this socket (Docker finds
    /// /run/docker/plugins/ferrynet.sock as driver `ferrynet`; see docs/DOCKER.md).
    #[arg(long, value_name = "PATH")]
    docker_socket: Option<PathBuf>,
    /// Scope the Docker driver tells Docker: auto (global when the store is etcd and dockerd
    /// runs with --cluster-store), local or global.
    #[arg(long, value_enum, default_value_t = crate::cnm::scope::ScopeSetting::Auto, requires = "docker_socket")]
    docker_scope: crate::cnm::scope::ScopeSetting,
    /// Do not serve DNS on the networks' gateways (containers keep the host's resolver).
    #[arg(long)]
    no_dns: bool,
    /// Cluster DNS domain: a container on network N resolves `X` and `X.N.<domain>`.
    #[arg(long, default_value = crate::agent::dns::zone::DEFAULT_DOMAIN, value_name = "DOMAIN")]
    dns_domain: String,
    /// TTL of cluster names in DNS answers (short: names follow containers and health).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    dns_ttl: Duration,
    /// Upstream resolver for names outside the cluster, IP[:PORT]; repeatable. Default: the
    /// nameservers of the host's /etc/resolv.conf. `none`: answer them SERVFAIL.
    #[arg(long, value_name = "IP[:PORT]")]
    dns_upstream: Vec<String>,
    /// Port the DNS server listens on at each gateway.
    #[arg(long, default_value_t = 53, hide = true)]
    dns_port: u16,
    /// UDP port of the sleeve (the encrypted overlay); 0: run no sleeve (this host then cannot
    /// join sleeve or encrypted networks' peers). Open it between hosts.
    #[arg(long, default_value_t = ferrynet_model::sleeve::SLEEVE_PORT, value_name = "PORT")]
    sleeve_port: u16,
    /// Sleeve queues: threads encrypting (and decrypting) in parallel (default: the CPUs, at
    /// most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    sleeve_queues: Option<u16>,
    /// HTTP listener for /metrics (Prometheus), /healthz, /api/topology and the topology page
    /// at /; repeat for more addresses; `none`: no listener. Whoever reaches it reads the
    /// whole topology: keep it on loopback or a management address.
    #[arg(long, value_name = "ADDR:PORT|none", default_value = crate::agent::web::DEFAULT_ADDR)]
    http: Vec<String>,
}

/// The agent's DNS settings from its flags.
fn dns_options(a: &AgentArgs) -> anyhow::Result<Option<crate::agent::dns::DnsOptions>> {
    use crate::agent::dns;
    if a.no_dns {
        return Ok(None);
    }
    let upstreams = if a.dns_upstream.is_empty() {
        dns::host_upstreams()
    } else if a.dns_upstream.iter().any(|u| u == "none") {
        Vec::new()
    } else {
        a.dns_upstream
            .iter()
            .map(|u| dns::forward::parse_upstream(u).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()
            .context("--dns-upstream")?
    };
    let domain = a.dns_domain.trim_matches('.').to_ascii_lowercase();
    if domain.is_empty() || hickory_proto::rr::Name::from_ascii(&domain).is_err() {
        bail!("--dns-domain {:?} is not a domain name", a.dns_domain);
    }
    Ok(Some(dns::DnsOptions {
        domain,
        ttl: u32::try_from(a.dns_ttl.as_secs()).unwrap_or(u32::MAX),
        upstreams,
        port: a.dns_port,
    }))
}

/// `10s`, `500ms`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10s, 500ms or 2m");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

#[derive(Args, Debug)]
struct JsonFlag {
    /// Print JSON for programs instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Create a network.
    Create(CreateArgs),
    /// List networks.
    Ls(JsonFlag),
    /// Show one network with its endpoints (JSON).
    Inspect {
        /// Network name.
        name: String,
    },
    /// Remove a network (refused while containers are attached, unless --force).
    Rm {
        /// Network name.
        name: String,
        /// Detach attached containers first.
        #[arg(long, short)]
        force: bool,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Network name: letters, digits, `_ . -`, at most 64 characters.
    name: String,
    /// Succeed when the network exists already with the subnets and backend given (for
    /// setups that run the same command on every node); it is not changed.
    #[arg(long)]
    exist_ok: bool,
    /// A subnet (IPv4 or IPv6 CIDR); repeat for several. Default: a free 10.89.N.0/24.
    #[arg(long, value_name = "CIDR")]
    subnet: Vec<IpNet>,
    /// Gateway address for the subnet given at the same position (default: its first address).
    #[arg(long, value_name = "IP")]
    gateway: Vec<IpAddr>,
    /// MTU of the bridge and the containers' interfaces.
    #[arg(long)]
    mtu: Option<u32>,
    /// No outside access: no masquerade, no default route (a routed network's containers keep
    /// their on-link one, and the host forwards nothing of theirs beyond the network).
    #[arg(long)]
    internal: bool,
    /// Do not masquerade traffic leaving the network.
    #[arg(long)]
    no_masquerade: bool,
    /// Network policy: every endpoint of the network is closed in both directions (new
    /// connections in and out) until a policy allows them; replies of allowed connections
    /// pass. See `ferrynet policy --help` and docs/POLICY.md.
    #[arg(long, conflicts_with = "host")]
    default_deny: bool,
    /// Bridge name (must start with `fn-`, at most 15 bytes; default derived from the name).
    #[arg(long)]
    bridge: Option<String>,
    /// Host networking: containers share the host's namespace; nothing is created.
    #[arg(long, conflicts_with_all = ["subnet", "internal", "bridge", "backend", "mode"])]
    host: bool,
    /// How containers attach. bridge: one Linux bridge per network. routed: no bridge (as
    /// Calico); each container's host-side veth carries a /32 and /128 route to it, the
    /// container holds its addresses as /32 and /128 and its default routes go on-link to
    /// 169.254.1.1 and fe80::1, which the host end answers; every packet, also between two
    /// containers of one host, is routed by the host. Works with every --backend, and with
    /// --internal on one host.
    #[arg(long, value_name = "MODE", default_value = "bridge", value_parser = ["bridge", "routed"])]
    mode: String,
    /// Make the network span hosts (needs `ferrynet agent` on each host and a shared store):
    /// route (hosts share a link), vxlan (kernel overlay over UDP 4789), sleeve (encrypted
    /// userspace overlay over one UDP port, through NAT; see docs/OVERLAY.md), auto (per
    /// peer: route on a shared link, vxlan where UDP 4789 passes, else sleeve) or bgp (each
    /// host announces its blocks over BGP to its peers and routers; `ferrynet bgp`).
    #[arg(long, value_name = "BACKEND", conflicts_with = "internal")]
    backend: Option<Backend>,
    /// Send all cross-host traffic of a route, vxlan or auto network through the sleeve,
    /// encrypted and authenticated (containers see no change but a smaller MTU).
    #[arg(long, requires = "backend")]
    encrypt: bool,
    /// VXLAN network identifier for a multi-host network (default: the lowest free one).
    #[arg(long, requires = "backend", value_parser = clap::value_parser!(u32).range(1..16_777_216))]
    vni: Option<u32>,
    /// Prefix length of the IPv4 block each host claims from the pool.
    #[arg(long, requires = "backend", default_value_t = DEFAULT_BLOCK_V4, value_parser = clap::value_parser!(u8).range(8..=30))]
    block_size: u8,
    /// Prefix length of the IPv6 block each host claims from the pool.
    #[arg(long, requires = "backend", default_value_t = DEFAULT_BLOCK_V6, value_parser = clap::value_parser!(u8).range(48..=126))]
    block_size6: u8,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Container name.
    #[arg(long)]
    name: String,
    /// Network to attach to.
    #[arg(long, alias = "network")]
    net: String,
    /// Publish a port: [HOSTIP:]HOSTPORT[-END]:PORT[-END][/tcp|udp|sctp]; repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// Static address (one per address family).
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// Static MAC address.
    #[arg(long)]
    mac: Option<String>,
    /// Interface name inside the container.
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// A label for network policy, KEY=VALUE; repeatable (change it later with `ferrynet label`).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A further DNS name of the container on its network; repeatable.
    #[arg(long = "alias", value_name = "NAME")]
    aliases: Vec<String>,
    /// Register the container as a producer of a service: NAME:PORT[:CONTAINERPORT][/proto]
    /// (service port PORT served on the container's CONTAINERPORT); repeatable.
    #[arg(long = "service", value_name = "SPEC")]
    services: Vec<String>,
    /// Health check of the container's service producers.
    #[command(flatten)]
    check: service::CheckArgs,
    /// Command and arguments to run.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

/// Parse arguments, run, and map failures to a message and an exit code (`exit::HELP`).
pub fn main() -> ExitCode {
    let matches = command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    crate::logging::init("info", cli.log_format);
    // An empty FERRYNET_STORE (as a container's or plugin's settable default) means unset.
    cli.store = cli.store.filter(|s| !s.trim().is_empty());
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrynet: error: {e:#}");
            ExitCode::from(exit::code(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(code) = run_docs(&cli.cmd)? {
        return Ok(code);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(exit::CliError::System(
            "ferrynet must run as root: it creates network namespaces, links and nftables rules"
                .into(),
        )
        .into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut paths = Paths::resolve(cli.state_dir.as_deref());
        paths.agent_socket = cli.agent_socket.clone();
        if !needs_store(&cli.cmd) {
            return run_storeless(cli.cmd, paths, cli.store).await;
        }
        let ctl = Control::open_with(paths, cli.store.as_deref(), None).await?;
        run_with_store(ctl, cli.cmd).await
    })
}

/// Generated documentation, which needs neither root nor a store (package builds run it):
/// `Some` exit code when `cmd` was such a command.
fn run_docs(cmd: &Cmd) -> anyhow::Result<Option<ExitCode>> {
    match cmd {
        Cmd::Completions { shell } => {
            docs::completions(command(), *shell, &mut std::io::stdout());
            Ok(Some(ExitCode::SUCCESS))
        }
        Cmd::Man { dir } => {
            let n = docs::man_pages(command(), dir)?;
            println!("{n} man pages in {}", dir.display());
            Ok(Some(ExitCode::SUCCESS))
        }
        _ => Ok(None),
    }
}

/// Whether `cmd` opens the store itself through `Control` (the others run without it, or
/// reach it through the agent).
fn needs_store(cmd: &Cmd) -> bool {
    !matches!(
        cmd,
        Cmd::Agent(_)
            | Cmd::Bgp(bgp::BgpCmd::Status { .. })
            | Cmd::Status(_)
            | Cmd::Lab(_)
            | Cmd::Sleeve(_)
    )
}

/// Run a command that does not open the store through `Control` (see [`needs_store`]).
async fn run_storeless(cmd: Cmd, paths: Paths, store: Option<String>) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Agent(a) => {
            let opts = agent_options(a, store)?;
            crate::agent::run(paths, opts)
                .await
                .map(|_| ExitCode::SUCCESS)
        }
        Cmd::Bgp(bgp::BgpCmd::Status { json }) => {
            bgp::run(&paths, None, bgp::BgpCmd::Status { json }).await
        }
        Cmd::Status(f) => status::show(&paths, f.json)
            .await
            .map(|_| ExitCode::SUCCESS),
        Cmd::Lab(c) => {
            let exe = std::env::current_exe().context("locating the ferrynet binary")?;
            lab::run(c, &exe).await
        }
        Cmd::Sleeve(c) => sleeve_cmd::run(&paths, c),
        _ => unreachable!("needs_store said no store"),
    }
}

/// The agent's options from its arguments and the cluster store's address.
fn agent_options(
    a: AgentArgs,
    store: Option<String>,
) -> anyhow::Result<crate::agent::AgentOptions> {
    let dns = dns_options(&a)?;
    Ok(crate::agent::AgentOptions {
        host: a.host_name,
        store,
        underlay_dev: a.underlay_dev.filter(|d| !d.trim().is_empty()),
        lease_ttl: a.lease_ttl,
        grace: a.grace,
        resync: a.resync,
        docker_socket: a.docker_socket,
        docker_scope: a.docker_scope,
        dns,
        sleeve_port: a.sleeve_port,
        sleeve_queues: a.sleeve_queues.map(usize::from),
        http: crate::agent::web::parse_addrs(&a.http).map_err(anyhow::Error::msg)?,
    })
}

/// Run a command against the opened store and kernel.
async fn run_with_store(ctl: Control, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Agent(_)
        | Cmd::Status(_)
        | Cmd::Lab(_)
        | Cmd::Sleeve(_)
        | Cmd::Completions { .. }
        | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
        Cmd::Logs(a) => logs::logs(&ctl, a).await.map(|_| ExitCode::SUCCESS),
        Cmd::Network(c) => network(&ctl, c).await.map(|_| ExitCode::SUCCESS),
        Cmd::Service(c) => service::run(&ctl, c).await.map(|_| ExitCode::SUCCESS),
        Cmd::Run(a) => run_container(&ctl, a).await.map(|_| ExitCode::SUCCESS),
        Cmd::Ps(f) => ps(&ctl, f.json).await.map(|_| ExitCode::SUCCESS),
        Cmd::Exec { name, cmd } => exec(&ctl, &name, &cmd).await,
        Cmd::Stop { name, time } => stop(&ctl, &name, time).await.map(|_| ExitCode::SUCCESS),
        Cmd::Rm { name, force } => rm(&ctl, &name, force).await.map(|_| ExitCode::SUCCESS),
        Cmd::InstallCni(a) => install::install_cni(&ctl, a)
            .await
            .map(|_| ExitCode::SUCCESS),
        Cmd::Reload => {
            let n = ctl.reload_edge().await?;
            println!("ruleset restored ({n} published port element(s))");
            for b in ctl.remove_stale_bridges().await? {
                println!("removed bridge {b}: its network no longer exists");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Guard(f) => guard(&ctl, f.json).map(|_| ExitCode::SUCCESS),
        Cmd::DockerPlugin(a) => crate::cnm::run_plugin(std::sync::Arc::new(ctl), a)
            .await
            .map(|_| ExitCode::SUCCESS),
        Cmd::Render(a) => render::render(&ctl, a).await.map(|_| ExitCode::SUCCESS),
        Cmd::Kv(c) => render::kv(&ctl, c).await,
        Cmd::Policy(c) => policy::run(&ctl, c).await.map(|_| ExitCode::SUCCESS),
        Cmd::Label(a) => policy::label(&ctl, a).await.map(|_| ExitCode::SUCCESS),
        Cmd::Bgp(c) => bgp::run(ctl.paths(), Some(&ctl), c).await,
        Cmd::Trace(a) => trace::run(&ctl, a).await.map(|_| ExitCode::SUCCESS),
    }
}

/// Print the guard's drop counters (a table, or JSON).
fn guard(ctl: &Control, json: bool) -> anyhow::Result<()> {
    let counters = ctl.guard_counters()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&counters)?);
        return Ok(());
    }
    if counters.is_empty() {
        println!("no anti-spoofing table on this host (no bridged network yet)");
        return Ok(());
    }
    println!("{:<16} {:>10} {:>12}", "DROPPED", "PACKETS", "BYTES");
    for c in counters {
        println!("{:<16} {:>10} {:>12}", c.reason, c.packets, c.bytes);
    }
    Ok(())
}

/// `ferrynet network`: one subcommand each.
async fn network(ctl: &Control, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create(a) => network_create(ctl, a).await,
        NetworkCmd::Ls(f) => network_ls(ctl, f.json).await,
        NetworkCmd::Inspect { name } => network_inspect(ctl, &name).await,
        NetworkCmd::Rm { name, force } => network_rm(ctl, &name, force).await,
    }
}

/// `network create`: a new network, printed by name.
async fn network_create(ctl: &Control, a: CreateArgs) -> anyhow::Result<()> {
    if a.exist_ok {
        return network_create_exist_ok(ctl, a).await;
    }
    let net = network_from_args(ctl, a).await?;
    let net = ctl.create_network(net).await?;
    println!("{}", net.name);
    Ok(())
}

/// `network create --exist-ok`: success when the same network exists already (also when it
/// appears between the look-up and the create).
async fn network_create_exist_ok(ctl: &Control, a: CreateArgs) -> anyhow::Result<()> {
    // Declarative setups (a DaemonSet on every node) create the same network.
    let (name, subnets, backend) = (a.name.clone(), a.subnet.clone(), a.backend);
    if let Some((have, _)) = ctl.network(&name).await? {
        same_network(&have, &subnets, backend)?;
        println!("{name}");
        return Ok(());
    }
    let net = network_from_args(ctl, a).await?;
    match ctl.create_network(net).await {
        Ok(net) => println!("{}", net.name),
        Err(crate::error::ControlError::AlreadyExists(e)) => {
            let (have, _) = ctl.network(&name).await?.ok_or_else(|| exit::conflict(e))?;
            same_network(&have, &subnets, backend)?;
            println!("{name}");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `network ls`: a table of networks with their flags and endpoint counts (or JSON).
async fn network_ls(ctl: &Control, json: bool) -> anyhow::Result<()> {
    let nets = ctl.networks().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nets)?);
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME",
        "MODE",
        "BRIDGE",
        "SUBNETS",
        "MTU",
        "FLAGS",
        "ENDPOINTS",
    ]);
    // Networks that are Docker networks (ferrynet's CNM driver) say which.
    let docker = ctl.docker_bindings().await.unwrap_or_default();
    for n in &nets {
        let eps = ctl.endpoints(&n.name).await?.len();
        let mut flags = Vec::new();
        let docker_flag = docker
            .iter()
            .find(|d| d.name == n.name)
            .map(|d| format!("docker={}", d.docker_id.get(..12).unwrap_or(&d.docker_id)));
        if let Some(f) = &docker_flag {
            flags.push(f.as_str());
        }
        if n.internal {
            flags.push("internal");
        }
        if !n.ip_masq {
            flags.push("no-masq");
        }
        t.row(vec![
            n.name.clone(),
            format!("{:?}", n.mode).to_lowercase(),
            if n.mode == NetworkMode::Host {
                "-".into()
            } else {
                n.bridge.clone()
            },
            n.subnets
                .iter()
                .map(|s| s.cidr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            n.mtu.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            flags.join(","),
            eps.to_string(),
        ]);
    }
    print!("{t}");
    Ok(())
}

/// `network inspect`: the network and its endpoints as JSON.
async fn network_inspect(ctl: &Control, name: &str) -> anyhow::Result<()> {
    let (net, _) = ctl
        .network(name)
        .await?
        .ok_or_else(|| exit::not_found(format!("network {name} does not exist")))?;
    let eps = ctl.endpoints(name).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"network": net, "endpoints": eps}))?
    );
    Ok(())
}

/// `network rm`: a Docker network's ferrynet network only with --force (Docker owns it).
async fn network_rm(ctl: &Control, name: &str, force: bool) -> anyhow::Result<()> {
    // A Docker network's ferrynet network is removed through Docker, which owns it.
    if let Some(d) = ctl
        .docker_bindings()
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.name == name)
    {
        if !force {
            bail!(
                "network {name} is Docker network {}; remove it with `docker network rm` (or use --force)",
                d.docker_id.get(..12).unwrap_or(&d.docker_id)
            );
        }
    }
    ctl.delete_network(name, force).await?;
    println!("{name}");
    Ok(())
}

/// `network create --exist-ok`: the existing network must have the subnets and backend asked
/// for (those given); anything else is a conflict, not a silent success.
fn same_network(have: &Network, subnets: &[IpNet], backend: Option<Backend>) -> anyhow::Result<()> {
    let mut want: Vec<IpNet> = subnets.to_vec();
    let mut got: Vec<IpNet> = have.subnets.iter().map(|s| s.cidr).collect();
    want.sort();
    got.sort();
    if !want.is_empty() && want != got {
        return Err(exit::conflict(format!(
            "network {} exists with subnets {:?}, not {:?}",
            have.name, got, want
        )));
    }
    let have_backend = have.fabric.as_ref().map(|f| f.backend);
    if backend.is_some() && backend != have_backend {
        return Err(exit::conflict(format!(
            "network {} exists with backend {:?}, not {:?}",
            have.name, have_backend, backend
        )));
    }
    Ok(())
}

async fn network_from_args(ctl: &Control, a: CreateArgs) -> anyhow::Result<Network> {
    if a.host {
        return Ok(Network {
            name: a.name,
            mode: NetworkMode::Host,
            bridge: String::new(),
            subnets: Vec::new(),
            mtu: None,
            internal: false,
            ip_masq: false,
            fabric: None,
            default_deny: false,
        });
    }
    if a.gateway.len() > a.subnet.len() {
        bail!(
            "{} --gateway given for {} --subnet",
            a.gateway.len(),
            a.subnet.len()
        );
    }
    let space = ctl.subnet_space().await?;
    let mut subnets: Vec<Subnet> = Vec::new();
    for (i, cidr) in a.subnet.iter().enumerate() {
        if cidr.trunc() != *cidr {
            bail!(
                "--subnet {cidr} has host bits set; did you mean {}?",
                cidr.trunc()
            );
        }
        if let Some(c) = space.route_conflict(cidr) {
            bail!("--subnet {cidr} overlaps {c}. Pick another subnet.");
        }
        let mut s = Subnet::new(*cidr);
        s.gateway = a.gateway.get(i).copied();
        subnets.push(s);
    }
    if subnets.is_empty() {
        let cidr = space
            .pick(false, &[])
            .context("no free 10.89.N.0/24 left for a default subnet; pass --subnet")?;
        subnets.push(Subnet::new(cidr));
    }
    let mode: NetworkMode = a.mode.parse().map_err(anyhow::Error::msg)?;
    Ok(Network {
        name: a.name,
        mode,
        bridge: a.bridge.unwrap_or_default(),
        subnets,
        mtu: a.mtu,
        internal: a.internal,
        ip_masq: !a.internal && !a.no_masquerade,
        fabric: a.backend.map(|backend| FabricSpec {
            backend,
            // 0: the control layer picks the lowest free VNI.
            vni: a.vni.unwrap_or(0),
            block_v4: a.block_size,
            block_v6: a.block_size6,
            encrypt: a.encrypt,
        }),
        default_deny: a.default_deny,
    })
}

async fn run_container(ctl: &Control, a: RunArgs) -> anyhow::Result<()> {
    validate_container_name(&a.name)?;
    let (net, _) = ctl
        .network(&a.net)
        .await?
        .ok_or_else(|| exit::not_found(format!("network {} does not exist", a.net)))?;
    let mut ports = Vec::new();
    for spec in &a.publish {
        ports.extend(parse_publish(spec).map_err(anyhow::Error::msg)?);
    }
    let mac = a.mac.as_deref().map(parse_mac).transpose()?;
    let labels = policy::parse_labels(&a.labels)?;
    let services = service::group_run_services(&a.services)?;
    let check = a.check.to_check()?.flatten();
    if check.is_some() && services.is_empty() {
        bail!("--check needs --service (it checks the container's service producers)");
    }
    let host_mode = net.mode == NetworkMode::Host;
    if host_mode && !services.is_empty() {
        bail!(
            "--service needs a bridged network: a container on host network {} has no address of its own (register the host's address with `ferrynet service register NAME --addr IP`)",
            net.name
        );
    }
    let ns_name = netns_name(&a.name);
    let mut c = Container {
        name: a.name.clone(),
        network: net.name.clone(),
        netns: (!host_mode).then(|| netns_path(&ns_name).display().to_string()),
        ifname: a.ifname.clone(),
        command: a.cmd.clone(),
        pid: None,
        start_ticks: None,
        ips: Vec::new(),
        ports: ports.clone(),
    };
    ctl.claim_container(&c).await?;
    // From here on, undo everything on failure.
    let result = async {
        if !host_mode {
            Netns::create_named(&ns_name).with_context(|| format!("creating netns {ns_name}"))?;
        }
        let (ep, view) = ctl
            .attach(
                &ctl.host_view(&net).await?,
                AttachRequest {
                    container_id: a.name.clone(),
                    ifname: a.ifname.clone(),
                    netns: c.netns.clone().unwrap_or_default(),
                    static_ips: a.ip.clone(),
                    mac,
                    port_mappings: ports.clone(),
                    name: Some(a.name.clone()),
                    aliases: a.aliases.clone(),
                    owner: EndpointOwner::Cli,
                    pod: None,
                    labels: labels.clone(),
                    bandwidth: None,
                },
            )
            .await?;
        // Policy in place before the command starts (the agent does it where one runs).
        ctl.sync_policy_without_agent().await;
        c.ips = ep.ips.clone();
        let dir = ctl.paths().container_dir(&a.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let resolv = if host_mode {
            None
        } else {
            container_resolver(ctl, &view, &ep, &ns_name).await?
        };
        let ns_path = c.netns.as_ref().map(PathBuf::from);
        let (pid, ticks) = container::spawn_in(
            ns_path.as_deref(),
            resolv.as_deref(),
            &a.cmd,
            &dir.join("log"),
        )?;
        c.pid = Some(pid);
        c.start_ticks = Some(ticks);
        ctl.save_container(&c).await?;
        register_producers(ctl, &c, &services, check.as_ref()).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        undo_run(ctl, &net, &c, &ns_name).await;
        return Err(e);
    }
    print_started(&c);
    Ok(())
}

/// `NAME ADDRESSES pid=PID` (`host` for host networking).
fn print_started(c: &Container) {
    let ips: Vec<String> = c.ips.iter().map(|i| i.addr().to_string()).collect();
    println!(
        "{} {} pid={}",
        c.name,
        if ips.is_empty() {
            "host".into()
        } else {
            ips.join(",")
        },
        c.pid.unwrap_or(0)
    );
}

/// The container as the producer of each of its `--service`s.
async fn register_producers(
    ctl: &Control,
    c: &Container,
    services: &service::RunServices,
    check: Option<&ferrynet_model::service::HealthCheck>,
) -> anyhow::Result<()> {
    for (svc, (ports, targets)) in services {
        let req = ferrynet_model::registry::ServiceRequest {
            name: svc.clone(),
            ensure_ports: ports.clone(),
            ..Default::default()
        };
        let producer = ferrynet_model::service::Producer {
            service: svc.clone(),
            id: c.name.clone(),
            host: Some(ctl.host().to_string()),
            network: Some(c.network.clone()),
            container: Some(c.name.clone()),
            netns: c.netns.clone(),
            addrs: c.ips.iter().map(|i| i.addr()).collect(),
            ports: targets.clone(),
            check: check.cloned(),
        };
        ctl.register_service(&req, Some(producer))
            .await
            .with_context(|| format!("registering {} as a producer of {svc}", c.name))?;
    }
    Ok(())
}

/// Undo a `run` that failed half-way: producers, process, attachment, namespace, record.
async fn undo_run(ctl: &Control, net: &Network, c: &Container, ns_name: &str) {
    let _ = ctl.deregister_container(&c.name).await;
    container::stop_process(c, Duration::from_secs(2));
    let _ = ctl
        .detach(net, &c.name, &c.ifname, c.netns.as_deref())
        .await;
    if net.mode != NetworkMode::Host {
        let _ = Netns::delete_named(ns_name);
        container::remove_netns_etc(ns_name);
    }
    let _ = ctl.forget_container(&c.name).await;
}

/// When this host's agent serves DNS: the container's resolv.conf (the gateways of its
/// addresses, the network's search domain), written where `ip netns exec` also finds it.
async fn container_resolver(
    ctl: &Control,
    view: &ferrynet_model::blocks::HostView,
    ep: &ferrynet_model::network::Endpoint,
    ns_name: &str,
) -> anyhow::Result<Option<PathBuf>> {
    let Some(dns) = crate::control::host::LocalConfig::load(&ctl.paths().state_dir)?.dns else {
        return Ok(None);
    };
    let view = ctl.view_holding(view, ep).await?.net;
    let subnets = ferrynet_model::ipam::validate_network_subnets(&view.subnets)?;
    let mut gws: Vec<IpAddr> = Vec::new();
    for ip in &ep.ips {
        if let Some(g) = crate::control::endpoint::gateway_for(&subnets, ip.addr()) {
            if !gws.contains(&g) {
                gws.push(g);
            }
        }
    }
    if gws.is_empty() {
        return Ok(None);
    }
    let content = container::resolv_conf(&gws, &view.name, &dns.domain);
    Ok(Some(container::write_resolv_conf(ns_name, &content)?))
}

async fn ps(ctl: &Control, json: bool) -> anyhow::Result<()> {
    let cs = ctl.containers().await?;
    // Labels live on the endpoint record (policy selects by them).
    let mut labels = Vec::new();
    for c in &cs {
        let key = ferrynet_model::network::keys::endpoint(&c.network, &c.name, &c.ifname);
        let l = ctl.endpoint_at(&key).await.ok().flatten().map(|e| e.labels);
        labels.push(l.unwrap_or_default());
    }
    if json {
        let v: Vec<serde_json::Value> = cs
            .iter()
            .zip(&labels)
            .map(|(c, l)| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                v["running"] = serde_json::Value::Bool(c.running());
                v["labels"] = serde_json::to_value(l).unwrap_or_default();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME",
        "NETWORK",
        "ADDRESSES",
        "PORTS",
        "STATUS",
        "PID",
        "LABELS",
        "COMMAND",
    ]);
    for (c, l) in cs.iter().zip(&labels) {
        t.row(vec![
            c.name.clone(),
            c.network.clone(),
            c.ips
                .iter()
                .map(|i| i.addr().to_string())
                .collect::<Vec<_>>()
                .join(","),
            c.ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
            if c.running() {
                "running".into()
            } else {
                "exited".into()
            },
            c.pid.map(|p| p.to_string()).unwrap_or_default(),
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            c.command.join(" "),
        ]);
    }
    print!("{t}");
    // Kubernetes pods attached through CNI, with their identity.
    let mut pods = Table::new(&["POD", "NAMESPACE", "NETWORK", "ADDRESSES", "SANDBOX", "UID"]);
    let mut any = false;
    for net in ctl.networks().await? {
        for ep in ctl.endpoints(&net.name).await? {
            let Some(p) = &ep.pod else { continue };
            any = true;
            pods.row(vec![
                p.name.clone(),
                p.namespace.clone(),
                ep.network.clone(),
                ep.ips
                    .iter()
                    .map(|i| i.addr().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                ep.container_id.chars().take(12).collect(),
                p.uid.clone().unwrap_or_default(),
            ]);
        }
    }
    if any {
        println!();
        print!("{pods}");
    }
    Ok(())
}

async fn exec(ctl: &Control, name: &str, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let c = ctl
        .container(name)
        .await?
        .ok_or_else(|| exit::not_found(format!("no container named {name}")))?;
    let ns = c.netns.as_ref().map(PathBuf::from);
    let resolv = container::resolv_conf_of(ns.as_deref());
    let code = container::exec_in(ns.as_deref(), resolv.as_deref(), cmd)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

async fn stop(ctl: &Control, name: &str, time: u64) -> anyhow::Result<()> {
    let c = ctl
        .container(name)
        .await?
        .ok_or_else(|| exit::not_found(format!("no container named {name}")))?;
    container::stop_process(&c, Duration::from_secs(time));
    println!("{name}");
    Ok(())
}

async fn rm(ctl: &Control, name: &str, force: bool) -> anyhow::Result<()> {
    let c = ctl
        .container(name)
        .await?
        .ok_or_else(|| exit::not_found(format!("no container named {name}")))?;
    if c.running() {
        if !force {
            return Err(exit::conflict(format!(
                "container {name} is running; stop it first or use --force"
            )));
        }
        container::stop_process(&c, Duration::from_secs(5));
    }
    // Out of DNS and the load balancer before the address goes.
    ctl.deregister_container(name).await?;
    if let Some((net, _)) = ctl.network(&c.network).await? {
        ctl.detach(&net, &c.name, &c.ifname, c.netns.as_deref())
            .await?;
    }
    if c.netns.is_some() {
        Netns::delete_named(&netns_name(name))
            .with_context(|| format!("removing netns of {name}"))?;
        container::remove_netns_etc(&netns_name(name));
    }
    let _ = std::fs::remove_dir_all(ctl.paths().container_dir(name));
    ctl.forget_container(name).await?;
    ctl.sync_policy_without_agent().await;
    println!("{name}");
    Ok(())
}
