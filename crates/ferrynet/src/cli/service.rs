//! `ferrynet service register | deregister | ls | inspect`, and the `--service` / `--check`
//! flags of `ferrynet run`: argument parsing here, the store work in `control::service`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferrynet_dataplane::vxlan::VXLAN_PORT;
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::portmap::Protocol;
use ferrynet_model::registry::{default_producer_id, ServiceRequest, VipChoice};
use ferrynet_model::reserved::{check_ingress, check_vips, host_ports};
use ferrynet_model::service::{
    default_port_name, CheckKind, HealthCheck, IngressPort, Producer, ServicePort,
};

use super::parse_duration;
use super::table::Table;
use crate::control::Control;

/// Service registry commands.
#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Create or update a service and, with --addr, one producer of it.
    Register(Box<RegisterArgs>),
    /// Remove a service (its VIPs, producers and health records), or with --id one producer.
    Deregister {
        /// Service name.
        name: String,
        /// Remove only this producer.
        #[arg(long)]
        id: Option<String>,
    },
    /// List services: VIPs, ports, healthy/total producers.
    Ls {
        /// Print JSON for programs instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one service with its producers and their health (JSON).
    Inspect {
        /// Service name.
        name: String,
    },
}

/// A health check on the command line; shared by `service register` and `run`.
#[derive(Args, Debug, Default)]
pub struct CheckArgs {
    /// Health check: tcp:PORT, http:PORT[/PATH][=STATUS] (default path /, status 200),
    /// exec:'CMD ARGS' (run in the producer's network namespace; exit 0 is healthy), or none
    /// (remove). PORT is the producer's own port.
    #[arg(long, value_name = "CHECK")]
    pub check: Option<String>,
    /// Time between checks.
    #[arg(long, value_parser = parse_duration, requires = "check")]
    pub interval: Option<Duration>,
    /// Time one check may take.
    #[arg(long, value_parser = parse_duration, requires = "check")]
    pub timeout: Option<Duration>,
    /// Consecutive passes that make a producer healthy.
    #[arg(long, requires = "check", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rise: Option<u32>,
    /// Consecutive failures that make a producer unhealthy.
    #[arg(long, requires = "check", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub fall: Option<u32>,
}

impl CheckArgs {
    /// None: not given; Some(None): `--check none`; Some(Some(c)): a check.
    pub fn to_check(&self) -> anyhow::Result<Option<Option<HealthCheck>>> {
        let Some(spec) = &self.check else {
            return Ok(None);
        };
        let Some(kind) = parse_check(spec).map_err(anyhow::Error::msg)? else {
            return Ok(Some(None));
        };
        let mut c = HealthCheck::new(kind);
        if let Some(i) = self.interval {
            c.interval_ms = i.as_millis() as u64;
        }
        if let Some(t) = self.timeout {
            c.timeout_ms = t.as_millis() as u64;
        }
        if let Some(r) = self.rise {
            c.rise = r;
        }
        if let Some(f) = self.fall {
            c.fall = f;
        }
        if c.interval_ms == 0 || c.timeout_ms == 0 {
            bail!("--interval and --timeout must be more than 0");
        }
        Ok(Some(Some(c)))
    }
}

/// `ferrynet service register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// Service name (a DNS label: lowercase letters, digits, '-').
    pub name: String,
    /// A port: [NAME=]PORT[/tcp|udp|sctp]; repeatable; replaces the service's ports.
    #[arg(long, value_name = "SPEC")]
    pub port: Vec<String>,
    /// A producer address; repeatable (one per family is used).
    #[arg(long, value_name = "IP")]
    pub addr: Vec<IpAddr>,
    /// Producer id (default: the first --addr, ':' written '-').
    #[arg(long, requires = "addr")]
    pub id: Option<String>,
    /// Host whose agent checks the producer and whose departure removes it (default: the
    /// host of the ferrynet container holding the address, else this host); `none`: no host,
    /// never checked, kept until deregistered.
    #[arg(long, requires = "addr")]
    pub host: Option<String>,
    /// A network whose containers see the service's name; repeatable (default: all).
    #[arg(long, value_name = "NAME")]
    pub network: Vec<String>,
    /// The producer serves service port SVCPORT on its PORT; repeatable.
    #[arg(long, value_name = "SVCPORT:PORT", requires = "addr")]
    pub target: Vec<String>,
    /// Virtual IP: auto (one per family from the VIP ranges, the default), none, or an
    /// address; repeatable (one address per family, `auto` for the rest).
    #[arg(long, value_name = "auto|none|IP")]
    pub vip: Vec<VipChoice>,
    /// Publish a service port on every host: PUBLISHED:SVCPORT[/proto]; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub ingress: Vec<String>,
    /// The --ingress ports given with it reach only producers on the host that receives the
    /// connection, without SNAT (producers see the outside client); a host without one
    /// refuses it (TCP reset, ICMP port unreachable).
    #[arg(long, requires = "ingress")]
    pub local: bool,
    /// Keep each client address on one producer.
    #[arg(long, conflicts_with = "no_affinity")]
    pub affinity: bool,
    /// Spread every connection again (undo --affinity).
    #[arg(long)]
    pub no_affinity: bool,
    /// The check: the producer's own with --addr, else the service's default check.
    #[command(flatten)]
    pub check: CheckArgs,
    /// Take an ingress port the hosts need (etcd, VXLAN, SSH, DNS) or a `--vip` outside the
    /// VIP ranges anyway.
    #[arg(long)]
    pub force: bool,
}

fn parse_proto(spec: &str, p: &str) -> Result<Protocol, String> {
    match p {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        other => Err(format!(
            "{spec}: unknown protocol {other:?} (tcp, udp or sctp)"
        )),
    }
}

fn parse_port(spec: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{spec}: {p:?} is not a port (1-65535)")),
        Ok(n) => Ok(n),
    }
}

/// Split a trailing `/proto` (TCP when absent).
fn split_proto(spec: &str) -> Result<(&str, Protocol), String> {
    match spec.rsplit_once('/') {
        Some((b, p)) => Ok((b, parse_proto(spec, p)?)),
        None => Ok((spec, Protocol::Tcp)),
    }
}

fn port_name(port: u16, proto: Protocol) -> String {
    match proto {
        Protocol::Tcp => default_port_name(port),
        other => format!("{}-{}", default_port_name(port), other.as_str()),
    }
}

/// `[NAME=]PORT[/tcp|udp|sctp]`.
pub fn parse_service_port(spec: &str) -> Result<ServicePort, String> {
    let (body, protocol) = split_proto(spec)?;
    let (name, port) = match body.split_once('=') {
        Some((n, p)) => (Some(n), p),
        None => (None, body),
    };
    let port = parse_port(spec, port)?;
    let name = match name {
        Some(n) if ferrynet_model::service::is_port_name(n) => n.to_string(),
        Some(n) => {
            return Err(format!(
                "{spec}: port name {n:?} must be 1-62 lowercase letters, digits or '-'"
            ))
        }
        None => port_name(port, protocol),
    };
    Ok(ServicePort {
        name,
        port,
        protocol,
    })
}

/// `SVCPORT:PORT`.
pub fn parse_target(spec: &str) -> Result<(u16, u16), String> {
    let (a, b) = spec
        .split_once(':')
        .ok_or_else(|| format!("{spec}: expected SVCPORT:PORT"))?;
    Ok((parse_port(spec, a)?, parse_port(spec, b)?))
}

/// `PUBLISHED:SVCPORT[/proto]`.
pub fn parse_ingress(spec: &str) -> Result<IngressPort, String> {
    let (body, protocol) = split_proto(spec)?;
    let (a, b) = body
        .split_once(':')
        .ok_or_else(|| format!("{spec}: expected PUBLISHED:SVCPORT[/proto]"))?;
    Ok(IngressPort {
        published: parse_port(spec, a)?,
        target: parse_port(spec, b)?,
        protocol,
        local: false,
    })
}

/// `tcp:PORT`, `http:PORT[/PATH][=STATUS]`, `exec:CMD ARGS` (shell-style words), or `none`.
pub fn parse_check(spec: &str) -> Result<Option<CheckKind>, String> {
    if spec == "none" {
        return Ok(None);
    }
    let (kind, rest) = spec.split_once(':').ok_or_else(|| {
        format!("--check {spec:?}: expected tcp:PORT, http:PORT/PATH or exec:CMD")
    })?;
    match kind {
        "tcp" => Ok(Some(CheckKind::Tcp {
            port: parse_port(spec, rest)?,
        })),
        "http" => {
            let (rest, status) = match rest.rsplit_once('=') {
                Some((r, s)) => {
                    let status: u16 = s
                        .parse()
                        .ok()
                        .filter(|n| (100..=599).contains(n))
                        .ok_or_else(|| format!("{spec}: {s:?} is not an HTTP status (100-599)"))?;
                    (r, status)
                }
                None => (rest, 200),
            };
            let (port, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            };
            if path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(format!("{spec}: the path may not contain spaces"));
            }
            Ok(Some(CheckKind::Http {
                port: parse_port(spec, port)?,
                path,
                status,
            }))
        }
        "exec" => {
            let command = shlex::split(rest)
                .filter(|w| !w.is_empty())
                .ok_or_else(|| format!("{spec}: expected exec:'CMD ARGS' (balanced quotes)"))?;
            Ok(Some(CheckKind::Exec { command }))
        }
        other => Err(format!(
            "--check {spec:?}: unknown kind {other:?} (tcp, http, exec or none)"
        )),
    }
}

/// `ferrynet run --service NAME:PORT[:TARGET][/proto]`: the service, its port, and the
/// container's port when it differs.
pub fn parse_run_service(spec: &str) -> Result<(String, ServicePort, Option<u16>), String> {
    let (body, protocol) = split_proto(spec)?;
    let parts: Vec<&str> = body.split(':').collect();
    let (name, port, target) = match parts.as_slice() {
        [n, p] => (*n, parse_port(spec, p)?, None),
        [n, p, t] => (*n, parse_port(spec, p)?, Some(parse_port(spec, t)?)),
        _ => {
            return Err(format!(
                "--service {spec:?}: expected NAME:PORT[:TARGET][/proto]"
            ))
        }
    };
    if !ferrynet_model::service::is_dns_label(name) {
        return Err(format!(
            "--service {spec:?}: service name {name:?} must be 1-63 lowercase letters, digits or '-'"
        ));
    }
    Ok((
        name.to_string(),
        ServicePort {
            name: port_name(port, protocol),
            port,
            protocol,
        },
        target.filter(|t| *t != port),
    ))
}

/// Per service a container joins: the ports the service must have, and service port ->
/// container port where they differ.
pub type RunServices = BTreeMap<String, (Vec<ServicePort>, BTreeMap<u16, u16>)>;

/// The services a container joins (`--service` flags grouped by name).
pub fn group_run_services(specs: &[String]) -> anyhow::Result<RunServices> {
    let mut out = RunServices::new();
    for s in specs {
        let (name, port, target) = parse_run_service(s).map_err(anyhow::Error::msg)?;
        let e = out.entry(name).or_default();
        if let Some(t) = target {
            e.1.insert(port.port, t);
        }
        e.0.push(port);
    }
    Ok(out)
}

/// Run a `service` subcommand.
pub async fn run(ctl: &Control, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Register(a) => register(ctl, *a).await,
        ServiceCmd::Deregister { name, id } => {
            match id {
                Some(id) => ctl.deregister_producer(&name, &id).await?,
                None => {
                    ctl.deregister_service(&name).await?;
                }
            }
            println!("{name}");
            Ok(())
        }
        ServiceCmd::Ls { json } => ls(ctl, json).await,
        ServiceCmd::Inspect { name } => inspect(ctl, &name).await,
    }
}

async fn register(ctl: &Control, a: RegisterArgs) -> anyhow::Result<()> {
    let ports = a
        .port
        .iter()
        .map(|s| parse_service_port(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let ingress = a
        .ingress
        .iter()
        .map(|s| {
            parse_ingress(s).map(|i| IngressPort {
                local: a.local,
                ..i
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let check = a.check.to_check()?;
    for n in &a.network {
        if ctl.network(n).await?.is_none() {
            bail!("--network {n}: network {n} does not exist");
        }
    }
    let mut req = ServiceRequest {
        name: a.name.clone(),
        ports: (!ports.is_empty()).then_some(ports),
        vips: (!a.vip.is_empty()).then(|| a.vip.clone()),
        networks: (!a.network.is_empty()).then(|| a.network.clone()),
        ingress: (!ingress.is_empty()).then_some(ingress),
        affinity: if a.affinity {
            Some(true)
        } else if a.no_affinity {
            Some(false)
        } else {
            None
        },
        ..Default::default()
    };
    if !a.force {
        refuse_reserved(ctl, &req).await?;
    }
    let producer = if a.addr.is_empty() {
        req.check = check;
        None
    } else {
        let id =
            a.id.clone()
                .or_else(|| default_producer_id(&a.addr))
                .context("no address")?;
        let mut targets = BTreeMap::new();
        for t in &a.target {
            let (sp, p) = parse_target(t).map_err(anyhow::Error::msg)?;
            targets.insert(sp, p);
        }
        // A ferrynet container's address: the producer is that container, on its host.
        let ep = ctl.endpoint_by_addr(a.addr[0]).await?;
        let ep_host = ep
            .as_ref()
            .map(|e| e.host.clone().unwrap_or(ctl.host().to_string()));
        let host = match a.host.as_deref() {
            Some("none") => None,
            Some(h) => Some(h.to_string()),
            None => Some(ep_host.clone().unwrap_or(ctl.host().to_string())),
        };
        let local = ep.as_ref().filter(|_| host == ep_host);
        Some(Producer {
            service: a.name.clone(),
            id,
            network: ep.as_ref().map(|e| e.network.clone()),
            container: ep
                .as_ref()
                .map(|e| e.name.clone().unwrap_or(e.container_id.clone())),
            netns: local.and_then(|e| e.netns.clone()),
            host,
            addrs: a.addr.clone(),
            ports: targets,
            check: check.flatten(),
        })
    };
    let r = ctl.register_service(&req, producer).await?;
    if r.service.check.is_some() {
        // Producers without a host have no agent to run the service's check: they stay out.
        let v = ctl.registry_view().await?;
        for p in v.producers_of(&r.service.name).filter(|p| p.host.is_none()) {
            eprintln!(
                "warning: producer {} has no host, so nobody runs the service's check and it takes no traffic; give it a host or remove the check",
                p.id
            );
        }
    }
    let vips: Vec<String> = r.service.vips.iter().map(|v| v.to_string()).collect();
    match &r.producer {
        Some(p) => println!("{} {} producer={}", r.service.name, vips.join(","), p.id),
        None => println!("{} {}", r.service.name, vips.join(",")),
    }
    Ok(())
}

/// Refuse what the hosts need for themselves: reserved ingress ports, VIPs outside the ranges.
async fn refuse_reserved(ctl: &Control, req: &ServiceRequest) -> anyhow::Result<()> {
    let reserved = host_ports(ctl.store_url(), VXLAN_PORT);
    check_ingress(req.ingress.as_deref().unwrap_or_default(), &reserved)?;
    let explicit: Vec<IpAddr> = req
        .vips
        .iter()
        .flatten()
        .filter_map(|v| match v {
            VipChoice::Ip(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    if !explicit.is_empty() {
        check_vips(&explicit, &ctl.vip_ranges().await?)?;
    }
    Ok(())
}

/// `PUBLISHED:SVCPORT/proto`, `(local)` for local ingress; `-` for none.
fn ingress_text(ingress: &[IngressPort]) -> String {
    if ingress.is_empty() {
        return "-".into();
    }
    ingress
        .iter()
        .map(|i| {
            let local = if i.local { "(local)" } else { "" };
            format!(
                "{}:{}/{}{local}",
                i.published,
                i.target,
                i.protocol.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_text(ports: &[ServicePort]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| format!("{}={}/{}", p.name, p.port, p.protocol.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

async fn ls(ctl: &Control, json: bool) -> anyhow::Result<()> {
    let v = ctl.registry_view().await?;
    if json {
        let list: Vec<serde_json::Value> = v
            .services
            .values()
            .map(|s| {
                serde_json::json!({
                    "service": s,
                    "producers": v.producers_of(&s.name).count(),
                    "healthy": v.healthy_producers(&s.name).len(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let mut t = Table::new(&["NAME", "VIPS", "PORTS", "INGRESS", "PRODUCERS", "NETWORKS"]);
    for s in v.services.values() {
        t.row(vec![
            s.name.clone(),
            if s.vips.is_empty() {
                "-".into()
            } else {
                s.vips
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            ports_text(&s.ports),
            ingress_text(&s.ingress),
            format!(
                "{}/{} healthy",
                v.healthy_producers(&s.name).len(),
                v.producers_of(&s.name).count()
            ),
            if s.networks.is_empty() {
                "all".into()
            } else {
                s.networks.join(",")
            },
        ]);
    }
    print!("{t}");
    Ok(())
}

/// The JSON `service inspect` prints.
pub fn inspect_json(v: &DiscoveryView, name: &str) -> Option<serde_json::Value> {
    let svc = v.services.get(name)?;
    let producers: Vec<serde_json::Value> = v
        .producers_of(name)
        .map(|p| {
            let mut j = serde_json::to_value(p).unwrap_or_default();
            j["healthy"] = serde_json::Value::Bool(v.is_healthy(p));
            j["hostLive"] =
                serde_json::Value::Bool(p.host.as_ref().is_none_or(|h| v.live_hosts.contains(h)));
            j["health"] = v
                .health
                .get(&(p.service.clone(), p.id.clone()))
                .and_then(|h| serde_json::to_value(h).ok())
                .unwrap_or(serde_json::Value::Null);
            j
        })
        .collect();
    Some(serde_json::json!({ "service": svc, "producers": producers }))
}

async fn inspect(ctl: &Control, name: &str) -> anyhow::Result<()> {
    let v = ctl.registry_view().await?;
    let j = inspect_json(&v, name).with_context(|| format!("service {name} does not exist"))?;
    println!("{}", serde_json::to_string_pretty(&j)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ports() {
        let p = parse_service_port("80").unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.protocol),
            ("p80", 80, Protocol::Tcp)
        );
        let p = parse_service_port("dns=53/udp").unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.protocol),
            ("dns", 53, Protocol::Udp)
        );
        assert_eq!(parse_service_port("53/udp").unwrap().name, "p53-udp");
        for bad in ["0", "70000", "x", "Web=80", "80/icmp", "=80", ""] {
            assert!(parse_service_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_and_ingress() {
        assert_eq!(parse_target("80:8080").unwrap(), (80, 8080));
        assert!(parse_target("80").is_err());
        assert!(parse_target("80:0").is_err());
        let i = parse_ingress("8080:80/udp").unwrap();
        assert_eq!(
            (i.published, i.target, i.protocol),
            (8080, 80, Protocol::Udp)
        );
        assert!(parse_ingress("8080").is_err());
    }

    #[test]
    fn checks() {
        assert_eq!(
            parse_check("tcp:80").unwrap(),
            Some(CheckKind::Tcp { port: 80 })
        );
        assert_eq!(
            parse_check("http:8080/healthz=204").unwrap(),
            Some(CheckKind::Http {
                port: 8080,
                path: "/healthz".into(),
                status: 204
            })
        );
        assert_eq!(
            parse_check("http:8080").unwrap(),
            Some(CheckKind::Http {
                port: 8080,
                path: "/".into(),
                status: 200
            })
        );
        assert_eq!(
            parse_check("exec:sh -c 'test -e /x'").unwrap(),
            Some(CheckKind::Exec {
                command: vec!["sh".into(), "-c".into(), "test -e /x".into()]
            })
        );
        assert_eq!(parse_check("none").unwrap(), None);
        for bad in [
            "tcp",
            "tcp:0",
            "udp:53",
            "http:80/x=99",
            "http:80/a b",
            "exec:",
            "exec:'unbalanced",
        ] {
            assert!(parse_check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn check_timing() {
        let a = CheckArgs {
            check: Some("tcp:80".into()),
            interval: Some(Duration::from_millis(200)),
            timeout: None,
            rise: Some(2),
            fall: Some(3),
        };
        let c = a.to_check().unwrap().unwrap().unwrap();
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.rise, c.fall),
            (200, 500, 2, 3)
        );
        assert!(CheckArgs::default().to_check().unwrap().is_none());
    }

    #[test]
    fn run_services() {
        let (n, p, t) = parse_run_service("web:80:8080").unwrap();
        assert_eq!((n.as_str(), p.port, t), ("web", 80, Some(8080)));
        let (_, p, t) = parse_run_service("dns:53/udp").unwrap();
        assert_eq!((p.protocol, t), (Protocol::Udp, None));
        assert_eq!(parse_run_service("web:80:80").unwrap().2, None);
        for bad in ["web", "Web:80", "web:80:81:82", "web:x", "web:80/icmp"] {
            assert!(parse_run_service(bad).is_err(), "{bad}");
        }
        let g = group_run_services(&["web:80:8080".into(), "web:443".into(), "db:5432".into()])
            .unwrap();
        assert_eq!(g["web"].0.len(), 2);
        assert_eq!(g["web"].1, [(80, 8080)].into());
        assert_eq!(g["db"].0[0].port, 5432);
    }
}
