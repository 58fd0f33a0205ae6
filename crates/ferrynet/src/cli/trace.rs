//! `ferrynet trace SRC DST[:PORT[/tcp|udp]]`: where a packet goes and why, hop by hop (the
//! decision is `model::trace`; the facts come from the store and this host's kernel through
//! `Control`), optionally confirmed on this host with nftables tracing (`--live`).

use std::net::IpAddr;

use anyhow::{bail, Context};
use clap::Args;
use ferrynet_model::trace::{Basis, Party, Trace};
use serde::Serialize;

use super::trace_live;
use crate::control::trace::TraceRequest;
use crate::control::Control;

/// `ferrynet trace` options.
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Where the packet comes from: a container (`NAME` or `NETWORK/NAME`), an address, `host`
    /// (this host) or a host's name.
    src: String,
    /// Where it goes: the same, with `:PORT[/tcp|udp]` (tcp by default; no port: an ICMP
    /// echo). IPv6 addresses with a port in brackets: `[fd20::5]:80`.
    dst: String,
    /// Use the IPv6 addresses of named containers and hosts (default: IPv4).
    #[arg(long, short = '6')]
    ipv6: bool,
    /// Send from this (forged) source address instead of SRC's own: what a hostile container
    /// would try (the anti-spoofing step drops it).
    #[arg(long, value_name = "ADDR")]
    spoof: Option<IpAddr>,
    /// Confirm the path on this host: inject a probe from SRC's namespace with nftables tracing
    /// on (a temporary table, removed afterwards) and print the rules it really hit.
    #[arg(long)]
    live: bool,
    /// Print JSON for tools.
    #[arg(long)]
    json: bool,
}

/// The JSON printed by `--json`.
#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    trace: &'a Trace,
    /// The host whose kernel was read.
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    live: Option<&'a trace_live::Live>,
}

/// Run `ferrynet trace`.
pub async fn run(ctl: &Control, a: TraceArgs) -> anyhow::Result<()> {
    let req = TraceRequest {
        src: &a.src,
        dst: &a.dst,
        ipv6: a.ipv6,
        spoof: a.spoof,
    };
    let (t, facts, q) = ctl.trace(&req).await?;
    let live = if a.live {
        let Party::Endpoint(i) = &q.src else {
            bail!(
                "--live injects its probe from a container: SRC must be a container on this host"
            );
        };
        let e = &facts.endpoints[*i];
        if e.host.as_deref().is_some_and(|h| h != facts.me) {
            bail!(
                "--live reads this host's kernel: {} runs on {}, run the trace there",
                a.src,
                e.host.as_deref().unwrap_or("?")
            );
        }
        if a.spoof.is_some() {
            bail!("--live sends an honest probe: it cannot be combined with --spoof");
        }
        let netns = e
            .netns
            .clone()
            .with_context(|| format!("{} has no recorded network namespace", a.src))?;
        let mut l = trace_live::run(&netns, t.src, t.dst, t.port, t.proto).await?;
        let drops_here = !t.verdict.delivered && t.verdict.host.as_deref() == Some(&*facts.me);
        l.agrees = l.dropped == drops_here;
        Some(l)
    } else {
        None
    };
    if a.json {
        let o = Output {
            trace: &t,
            host: &facts.me,
            live: live.as_ref(),
        };
        println!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(());
    }
    print_text(&t, &facts.me);
    if let Some(l) = &live {
        trace_live::print(l);
    }
    Ok(())
}

fn print_text(t: &Trace, me: &str) {
    let what = match t.port {
        Some(p) => format!("{}:{p}/{}", t.dst, t.proto.as_str()),
        None => format!("{} (icmp echo)", t.dst),
    };
    println!(
        "trace {} -> {what}  (kernel read: {me}; other hosts: store records and the model)",
        t.src
    );
    for (i, h) in t.hops.iter().enumerate() {
        let basis = match h.basis {
            Basis::Store => "store",
            Basis::Kernel => "kernel",
            Basis::Model => "model",
        };
        let step = serde_json::to_value(h.step)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "{:>3} {:<8} {:<14} {}{} [{basis}]",
            i + 1,
            h.host.as_deref().unwrap_or("-"),
            step,
            if h.pass { "" } else { "DROP: " },
            h.what
        );
    }
    let step = serde_json::to_value(t.verdict.step)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    println!(
        "{} at {step}{}: {}",
        if t.verdict.delivered {
            "DELIVERED"
        } else {
            "DROPPED"
        },
        t.verdict
            .host
            .as_deref()
            .map(|h| format!(" on {h}"))
            .unwrap_or_default(),
        t.verdict.reason
    );
}
