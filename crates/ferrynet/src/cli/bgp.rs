//! `ferrynet bgp`: external peers, cluster and per-host BGP settings, session status.

use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use ferrynet_model::bgp::{BgpConfig, NodeConfig, PeerRecord};

use super::table::Table;
use crate::agent::api::query_status;
use crate::control::{Control, Paths};

/// `ferrynet bgp` subcommands.
#[derive(Subcommand, Debug)]
pub enum BgpCmd {
    /// External BGP peers (ToR routers, route reflectors) of every host or of one.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Show or change the cluster's BGP settings, or one host's AS (`--host H --asn N`).
    ///
    /// Every host of a `bgp` network runs a BGP speaker in its agent. By default the hosts
    /// form a full iBGP mesh in AS 64512; with ToR routers, turn the mesh off and give hosts
    /// their own AS (AS-per-rack or AS-per-host), then add the ToRs as peers. Hold time,
    /// keepalive and restart time apply to sessions that start after the change.
    Config(ConfigArgs),
    /// Sessions (state, uptime, prefixes in/out, last error), announced prefixes and the
    /// routes this host installed (protocol 114), from this host's agent.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `ferrynet bgp peer` subcommands.
#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Add (or replace) a peer: every host peers with it, or only --host.
    Add {
        /// Peer name.
        name: String,
        /// The peer's address.
        #[arg(long)]
        address: IpAddr,
        /// The peer's AS (4-byte ASNs allowed).
        #[arg(long)]
        asn: u32,
        /// Only this host peers with it (a ToR peers with the hosts of its rack).
        #[arg(long)]
        host: Option<String>,
        /// TCP-MD5 password (RFC 2385), as the peer has it.
        #[arg(long)]
        password: Option<String>,
        /// Also install a default route it announces.
        #[arg(long)]
        accept_default: bool,
    },
    /// List peers.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a peer (its sessions close with Cease, its routes leave the kernel).
    Rm {
        /// Peer name.
        name: String,
    },
}

/// On or off.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// `ferrynet bgp config` options.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The AS of every host (or of --host only).
    #[arg(long)]
    asn: Option<u32>,
    /// Set the AS of this host only.
    #[arg(long, requires = "asn")]
    host: Option<String>,
    /// Full iBGP mesh among the ferrynet hosts.
    #[arg(long, value_enum)]
    mesh: Option<OnOff>,
    /// Hold time offered, seconds (0, or 3 and more).
    #[arg(long)]
    hold_time: Option<u16>,
    /// Keepalive interval, seconds (default: a third of the hold time).
    #[arg(long)]
    keepalive: Option<u16>,
    /// Graceful-restart time, seconds: how long peers keep a restarting host's routes.
    #[arg(long)]
    restart_time: Option<u16>,
}

/// Run a `ferrynet bgp` command.
pub async fn run(paths: &Paths, ctl: Option<&Control>, cmd: BgpCmd) -> anyhow::Result<ExitCode> {
    match (cmd, ctl) {
        (BgpCmd::Status { json }, _) => status(paths, json).await,
        (BgpCmd::Peer(p), Some(ctl)) => peer(ctl, p).await,
        (BgpCmd::Config(c), Some(ctl)) => config(ctl, c).await,
        _ => bail!("this command needs the store"),
    }
}

async fn peer(ctl: &Control, cmd: PeerCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PeerCmd::Add {
            name,
            address,
            asn,
            host,
            password,
            accept_default,
        } => {
            let p = PeerRecord {
                name,
                address,
                asn,
                host,
                password,
                accept_default,
            };
            ctl.bgp_peer_put(&p).await?;
            println!("peer {} ({} AS {}) added", p.name, p.address, p.asn);
        }
        PeerCmd::Ls { json } => {
            let r = ctl.bgp_records().await?;
            if json {
                // Passwords stay out of listings.
                let list: Vec<_> = r
                    .peers
                    .iter()
                    .map(|p| PeerRecord {
                        password: p.password.as_ref().map(|_| "***".into()),
                        ..p.clone()
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["NAME", "ADDRESS", "ASN", "HOST", "MD5", "DEFAULT"]);
            for p in &r.peers {
                t.row(vec![
                    p.name.clone(),
                    p.address.to_string(),
                    p.asn.to_string(),
                    p.host.clone().unwrap_or_else(|| "*".into()),
                    if p.password.is_some() { "yes" } else { "no" }.into(),
                    if p.accept_default { "yes" } else { "no" }.into(),
                ]);
            }
            print!("{t}");
        }
        PeerCmd::Rm { name } => {
            if !ctl.bgp_peer_remove(&name).await? {
                bail!("no BGP peer {name}");
            }
            println!("peer {name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn config(ctl: &Control, a: ConfigArgs) -> anyhow::Result<ExitCode> {
    let mut r = ctl.bgp_records().await?;
    if let (Some(h), Some(asn)) = (&a.host, a.asn) {
        ctl.bgp_node_put(h, &NodeConfig { asn: Some(asn) }).await?;
        println!("host {h}: AS {asn}");
        return Ok(ExitCode::SUCCESS);
    }
    let before = r.config.clone();
    let c: &mut BgpConfig = &mut r.config;
    if let Some(asn) = a.asn {
        c.asn = asn;
    }
    if let Some(m) = a.mesh {
        c.mesh = matches!(m, OnOff::On);
    }
    if let Some(h) = a.hold_time {
        c.hold_time = h;
    }
    if let Some(k) = a.keepalive {
        c.keepalive = Some(k);
    }
    if let Some(t) = a.restart_time {
        c.restart_time = t;
    }
    if *c != before {
        ctl.bgp_config_put(c).await?;
    }
    println!("{}", serde_json::to_string_pretty(&r.config)?);
    for (h, n) in &r.nodes {
        if let Some(asn) = n.asn {
            println!("host {h}: AS {asn}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(paths: &Paths, json: bool) -> anyhow::Result<ExitCode> {
    let s = query_status(&paths.agent_socket()).await?;
    let Some(b) = s.bgp else {
        bail!("BGP is not running on this host (no network with --backend bgp)");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "router id {}  AS {}  mesh {}  {}  {} route(s) installed (proto 114)",
        b.router_id,
        b.asn,
        if b.mesh { "on" } else { "off" },
        if b.converged {
            "synced"
        } else {
            "syncing after restart"
        },
        b.routes_installed
    );
    let exported: Vec<String> = b.exported.iter().map(|p| p.to_string()).collect();
    println!("announcing: {}", exported.join(", "));
    let mut t = Table::new(&[
        "PEER",
        "ADDRESS",
        "ASN",
        "STATE",
        "UPTIME",
        "IN",
        "REJECTED",
        "OUT",
        "LAST ERROR",
    ]);
    for p in &b.peers {
        t.row(vec![
            p.name.clone(),
            p.address.clone(),
            p.remote_asn.to_string(),
            p.state.clone(),
            format!("{}s", p.uptime_secs),
            p.prefixes_in.to_string(),
            p.prefixes_rejected.to_string(),
            p.prefixes_out.to_string(),
            p.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{t}");
    for e in &b.errors {
        println!("error: {e}");
    }
    Ok(ExitCode::SUCCESS)
}
