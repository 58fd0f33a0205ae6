//! `ferrynet policy …` and `ferrynet label …`: policy records, the verdict on a connection, and
//! labels of running containers.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferrynet_model::policy::verdict::{EndpointIndex, PolicyEndpoint};
use ferrynet_model::policy::{decide, parse_documents, Proto};

use super::table::Table;
use crate::control::Control;

/// Network policy: which endpoints may talk to which (see docs/POLICY.md).
///
/// A policy selects endpoints by label (`selector: app=web`, Kubernetes syntax) and, when it
/// has `ingress` or `egress`, restricts that direction: only what one of its rules allows
/// passes. Policies apply in `order` (lower first); the first matching rule decides (allow or
/// deny); a selected endpoint that no rule matches is denied. Endpoints that no policy selects
/// are open, unless their network was created with `--default-deny`. Replies of allowed
/// connections always pass. Every host enforces it in nftables for its own endpoints.
#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Create or replace policies from a YAML or JSON file (`-` for stdin); one or many
    /// documents. A file with any invalid document is refused whole, naming the field.
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List policies in evaluation order.
    Ls {
        /// Print JSON for programs instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one policy (YAML) and the endpoints it selects.
    Show {
        /// Policy name.
        name: String,
    },
    /// Remove a policy.
    Rm {
        /// Policy name.
        name: String,
    },
    /// What the policies decide for a new connection, without sending a packet: the verdict
    /// and the policy and rule that decided each side (the same decision nftables enforces).
    ///
    /// SRC and DST are container names (`NAME` or `NETWORK/NAME`) or addresses; DST ends in
    /// `:PORT[/tcp|udp|sctp]` (tcp by default), e.g. `ferrynet policy test client web:80/tcp`.
    Test {
        /// Where the connection comes from.
        src: String,
        /// Where it goes: NAME:PORT[/proto], IP:PORT[/proto] or [IPv6]:PORT[/proto].
        dst: String,
        /// Use the IPv6 address of named containers (default: IPv4).
        #[arg(long, short = '6')]
        ipv6: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `ferrynet label NAME KEY=VALUE… KEY-…`.
#[derive(Args, Debug)]
pub struct LabelArgs {
    /// Container name (`ferrynet run`).
    name: String,
    /// `KEY=VALUE` to set, `KEY-` to remove; none: print the labels.
    changes: Vec<String>,
}

/// Parse `--label k=v` values.
pub fn parse_labels(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in list {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?} must be KEY=VALUE"))?;
        out.insert(k.to_string(), v.to_string());
    }
    ferrynet_model::pod::check_labels(&out, None)?;
    Ok(out)
}

/// Run a `policy` subcommand.
pub async fn run(ctl: &Control, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Apply { file } => apply(ctl, &file).await,
        PolicyCmd::Ls { json } => {
            let (book, _) = ctl.policy_inputs().await?;
            let list: Vec<_> = book.policies.iter().map(|c| &c.policy).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let mut t = Table::new(&["NAME", "ORDER", "NETWORK", "SELECTOR", "INGRESS", "EGRESS"]);
            let rules = |r: &Option<Vec<_>>| {
                r.as_ref()
                    .map_or("-".into(), |r: &Vec<_>| r.len().to_string())
            };
            for p in list {
                t.row(vec![
                    p.name.clone(),
                    p.order.map_or("-".into(), |o| o.to_string()),
                    p.network.clone().unwrap_or_else(|| "*".into()),
                    if p.selector.is_empty() {
                        "(all)".into()
                    } else {
                        p.selector.clone()
                    },
                    rules(&p.ingress),
                    rules(&p.egress),
                ]);
            }
            print!("{t}");
            Ok(())
        }
        PolicyCmd::Show { name } => {
            let (book, eps) = ctl.policy_inputs().await?;
            let c = book
                .policies
                .iter()
                .find(|c| c.policy.name == name)
                .with_context(|| format!("no policy named {name}"))?;
            print!("{}", serde_norway::to_string(&c.policy)?);
            let selected: Vec<&str> = eps
                .list
                .values()
                .filter(|e| c.selects(e))
                .map(|e| &*e.id)
                .collect();
            println!(
                "# selects {} endpoint(s): {}",
                selected.len(),
                selected.join(" ")
            );
            Ok(())
        }
        PolicyCmd::Rm { name } => {
            let Some(rev) = ctl.remove_policy(&name).await? else {
                bail!("no policy named {name}");
            };
            println!("{name}\nstore revision {rev}");
            Ok(())
        }
        PolicyCmd::Test {
            src,
            dst,
            ipv6,
            json,
        } => test(ctl, &src, &dst, ipv6, json).await,
    }
}

async fn apply(ctl: &Control, file: &std::path::Path) -> anyhow::Result<()> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let docs = parse_documents(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was applied", file.display()))?;
    let (_, eps) = ctl.policy_inputs().await?;
    let book = ferrynet_model::policy::PolicyBook::new(docs.clone(), Default::default());
    for c in &book.policies {
        if !eps.list.values().any(|e| c.selects(e)) {
            eprintln!(
                "warning: policy {}: selector {:?}{} matches no endpoint yet",
                c.policy.name,
                c.policy.selector,
                c.policy
                    .network
                    .as_ref()
                    .map(|n| format!(" on network {n}"))
                    .unwrap_or_default()
            );
        }
    }
    let (applied, rev) = ctl.apply_policies(&docs).await?;
    for (name, created) in applied {
        println!(
            "policy {name} {}",
            if created { "created" } else { "replaced" }
        );
    }
    // Agents report the revision they enforce (`ferrynet status`): this one, once they do.
    println!("store revision {rev}");
    Ok(())
}

/// An address by container name or literal.
fn resolve(
    eps: &EndpointIndex,
    who: &str,
    v6: bool,
) -> anyhow::Result<(IpAddr, Option<PolicyEndpoint>)> {
    let who = who.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = who.parse::<IpAddr>() {
        return Ok((ip, eps.by_ip(ip).cloned()));
    }
    let found = eps.by_name(who);
    let ep = match found.as_slice() {
        [one] => *one,
        [] => bail!("no container or address {who:?}"),
        many => bail!(
            "{who:?} is on several networks ({}); say NETWORK/NAME",
            many.iter()
                .map(|e| &*e.network)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let ip = ep
        .addrs
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .with_context(|| format!("{who} has no IPv{} address", if v6 { 6 } else { 4 }))?;
    Ok((*ip, Some(ep.clone())))
}

/// `HOST:PORT[/proto]` with HOST a name, an IPv4 address or `[IPv6]`.
fn split_dst(dst: &str) -> anyhow::Result<(&str, u16, Proto)> {
    let (rest, proto) = match dst.rsplit_once('/') {
        Some((r, p)) => (r, p.parse::<Proto>().map_err(anyhow::Error::msg)?),
        None => (dst, Proto::Tcp),
    };
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("{dst:?} must be HOST:PORT[/proto]"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("{port:?} is not a port"))?;
    Ok((host, port, proto))
}

async fn test(ctl: &Control, src: &str, dst: &str, v6: bool, json: bool) -> anyhow::Result<()> {
    let (book, eps) = ctl.policy_inputs().await?;
    let (host, port, proto) = split_dst(dst)?;
    let (s, _) = resolve(&eps, src, v6)?;
    let (d, _) = resolve(&eps, host, v6)?;
    let v = decide(&book, &eps, s, d, Some(proto), port);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{s} -> {d}:{port}/{}: {}",
        proto.as_str(),
        if v.allowed { "ALLOW" } else { "DENY" }
    );
    match &v.egress {
        Some(s) => println!("  egress of {}: {}", s.endpoint, s.decision.describe()),
        None => println!("  egress: the source is no endpoint (not restricted here)"),
    }
    match &v.ingress {
        Some(s) => println!("  ingress of {}: {}", s.endpoint, s.decision.describe()),
        None => println!("  ingress: the destination is no endpoint (not restricted here)"),
    }
    Ok(())
}

/// `ferrynet label`: show or change a `ferrynet run` container's labels.
pub async fn label(ctl: &Control, a: LabelArgs) -> anyhow::Result<()> {
    let c = ctl
        .container(&a.name)
        .await?
        .with_context(|| format!("no container named {}", a.name))?;
    let ep = ctl
        .endpoint_at(&ferrynet_model::network::keys::endpoint(
            &c.network, &c.name, &c.ifname,
        ))
        .await?
        .with_context(|| format!("container {} has no endpoint on {}", c.name, c.network))?;
    let mut labels = ep.labels.clone();
    for ch in &a.changes {
        if let Some(k) = ch.strip_suffix('-').filter(|_| !ch.contains('=')) {
            labels.remove(k);
        } else {
            labels.extend(parse_labels(std::slice::from_ref(ch))?);
        }
    }
    for (k, v) in &labels {
        println!("{k}={v}");
    }
    if !a.changes.is_empty() {
        let (_, rev) = ctl
            .set_labels(&c.network, &c.name, &c.ifname, labels)
            .await?;
        println!("store revision {rev}");
    }
    Ok(())
}
