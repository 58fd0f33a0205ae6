//! The load balancer: keeps the table `inet ferrynet-svc` (virtual IPs, ingress) in line with
//! the discovery view. Each new view is turned into the desired state
//! ([`ferrynet_model::lb::desired`]), diffed against what was last programmed and applied as
//! one nft transaction; unchanged services are not touched.
//!
//! The table is rebuilt whole (one transaction too) when the agent starts, when a periodic
//! check finds it missing (`nft flush ruleset`, a firewall reload) and after a failed
//! transaction. It is left in place when the agent stops, as the fabric is: a restarting
//! agent must not drop traffic, and established connections live in conntrack anyway.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrynet_dataplane::firewall_compat::ensure_forward_accept;
use ferrynet_dataplane::nft::NftExecutor;
use ferrynet_model::lb::{absent_batch, desired, diff_batch, full_batch, LbState, TABLE};

use super::status::AgentStatus;
use crate::feed::ViewRx;

/// How often the table's presence is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Serve virtual IPs and ingress for `host` until the discovery feed ends.
pub async fn run(
    nft: Arc<dyn NftExecutor>,
    mut rx: ViewRx,
    host: String,
    status: Arc<Mutex<AgentStatus>>,
) {
    // The channel's first value is an empty placeholder: programming it would withdraw every
    // service until the snapshot arrives, so wait for the feed's first real view.
    if rx.changed().await.is_err() {
        return;
    }
    let mut programmed: Option<LbState> = None;
    // Conntrack entries follow what is programmed.
    let mut follower = super::conntrack::Follower::default();
    // The iptables FORWARD accept of ingress connections, made sure of once per agent run
    // (a bridge created by an older version did not add it).
    let mut forward_accepted = false;
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.tick().await;
    loop {
        let view = rx.borrow_and_update().clone();
        let want = desired(&view, &host);
        if !want.ingress.is_empty() && !forward_accepted {
            forward_accepted = accept_ingress_forward().await;
        }
        let (batch, rebuild) = match &programmed {
            // Nothing to serve: no table at all, so a host without services keeps no rules of
            // ours (and an agent that served none leaves nothing behind).
            Some(old) if want.is_empty() && old.is_empty() => (String::new(), false),
            _ if want.is_empty() => (absent_batch(), false),
            Some(old) => (diff_batch(old, &want), false),
            None => (full_batch(&want), true),
        };
        if !batch.is_empty() {
            let started = Instant::now();
            let exec = nft.clone();
            let res = tokio::task::spawn_blocking(move || exec.apply(&batch))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let took = started.elapsed();
            record_apply(&status, &want, view.revision, rebuild, took, &res);
            match res {
                Ok(()) => {
                    tracing::info!(
                        chains = want.chains.len(),
                        vip_ports = want.service_ports(),
                        ingress = want.ingress.len(),
                        rebuild,
                        took_ms = took.as_millis() as u64,
                        "load balancer programmed"
                    );
                    follower
                        .after_lb(programmed.as_ref(), &want, &view, &status)
                        .await;
                    programmed = Some(want);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "programming the load balancer failed; rebuilding on the next change or check");
                    programmed = None;
                }
            }
        } else {
            // Nothing to program, but a draining producer's container may have gone.
            if let Some(old) = &programmed {
                follower.after_lb(Some(old), &want, &view, &status).await;
            }
            programmed = Some(want);
        }
        if !wait_for_change(&mut rx, &mut check, &nft, &mut programmed).await {
            return;
        }
    }
}

/// Wait for a new view (true) or the feed's end (false); meanwhile check that the table is
/// still there (forgetting what was programmed when it is not), and retry a failed
/// transaction on every check.
async fn wait_for_change(
    rx: &mut ViewRx,
    check: &mut tokio::time::Interval,
    nft: &Arc<dyn NftExecutor>,
    programmed: &mut Option<LbState>,
) -> bool {
    loop {
        tokio::select! {
            r = rx.changed() => return r.is_ok(),
            _ = check.tick() => {
                match programmed {
                    None => return true,
                    Some(p) if p.is_empty() => continue,
                    Some(_) => {}
                }
                if !table_present(nft).await {
                    tracing::warn!("table inet {TABLE} is gone; rebuilding it");
                    *programmed = None;
                    return true;
                }
            }
        }
    }
}

/// Make sure ingress connections are accepted in iptables FORWARD; true when they are.
async fn accept_ingress_forward() -> bool {
    match tokio::task::spawn_blocking(ensure_forward_accept).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot accept ingress in iptables FORWARD");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot accept ingress in iptables FORWARD");
            false
        }
    }
}

/// One transaction's outcome into the status.
fn record_apply(
    status: &Mutex<AgentStatus>,
    want: &LbState,
    revision: u64,
    rebuild: bool,
    took: Duration,
    res: &Result<(), String>,
) {
    let Ok(mut s) = status.lock() else { return };
    let lb = &mut s.lb;
    lb.applies += 1;
    lb.rebuilds += u64::from(rebuild);
    lb.last_apply_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    lb.last_apply_took_ms = took.as_secs_f64() * 1000.0;
    match res {
        Ok(()) => {
            lb.error = None;
            lb.chains = want.chains.len();
            lb.vip_ports = want.service_ports();
            lb.ingress_ports = want.ingress.len();
            lb.revision = revision;
            lb.conflicts = want.conflicts.clone();
        }
        Err(e) => lb.error = Some(e.clone()),
    }
}

/// True when the table and its VIP dispatch chain exist. The kernel is asked for that chain
/// alone: a `list chain` through libnftables reads the whole ruleset into its cache, every
/// policy set element included. An error counts as present (no rebuild once a tick).
async fn table_present(nft: &Arc<dyn NftExecutor>) -> bool {
    let exec = nft.clone();
    tokio::task::spawn_blocking(move || match exec.chain_exists("inet", TABLE, "vip") {
        Ok(present) => present,
        Err(e) => {
            tracing::debug!(error = %e, "lb: checking table inet {TABLE}");
            true
        }
    })
    .await
    .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_dataplane::nft::LibNftables;
    use ferrynet_model::discovery::DiscoveryView;
    use ferrynet_model::network::keys as nkeys;
    use ferrynet_model::portmap::Protocol;
    use ferrynet_model::service::{keys, IngressPort, Producer, Service, ServicePort};

    fn put<T: serde::Serialize>(v: &mut DiscoveryView, key: String, x: &T) {
        v.put(&key, &serde_json::to_vec(x).unwrap());
    }
    fn service(name: &str, vip: &str, affinity: bool) -> Service {
        Service {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            vips: vec![
                vip.parse().unwrap(),
                format!("fd00:96::{}", name.len()).parse().unwrap(),
            ],
            ingress: vec![IngressPort {
                published: 8000 + name.len() as u16,
                target: 80,
                protocol: Protocol::Tcp,
                // Affinity services here publish local ingress: both kinds of chain and the
                // refusal of a local port without a producer on h1 are exercised.
                local: affinity,
            }],
            affinity,
            ..Service::named(name)
        }
    }
    fn producer(svc: &str, id: &str, n: u8) -> Producer {
        Producer {
            service: svc.into(),
            id: id.into(),
            host: (id == "a").then(|| "h1".to_string()),
            network: None,
            container: None,
            netns: None,
            addrs: vec![
                format!("10.20.0.{n}").parse().unwrap(),
                format!("fd20::{n}").parse().unwrap(),
            ],
            ports: Default::default(),
            check: None,
        }
    }

    /// Every batch the load balancer can produce is accepted by the kernel, in sequence:
    /// build, change producers (with and without affinity), empty, remove, rebuild.
    #[test]
    fn batches_apply_on_a_real_kernel() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let nft = LibNftables::load().expect("libnftables");
            let mut v = DiscoveryView::default();
            v.put(&nkeys::host("h1"), b"{}");
            put(
                &mut v,
                keys::service("web"),
                &service("web", "10.96.0.5", false),
            );
            put(
                &mut v,
                keys::service("sticky"),
                &service("sticky", "10.96.0.6", true),
            );
            for (i, id) in ["a", "b", "c"].iter().enumerate() {
                for s in ["web", "sticky"] {
                    put(&mut v, keys::producer(s, id), &producer(s, id, i as u8 + 2));
                }
            }
            let mut states = vec![desired(&v, "h1")];
            nft.apply(&full_batch(&states[0])).expect("full batch");
            for id in ["b", "a"] {
                for s in ["web", "sticky"] {
                    v.delete(&keys::producer(s, id));
                }
                states.push(desired(&v, "h1"));
            }
            for s in ["web", "sticky"] {
                v.delete(&keys::producer(s, "c"));
            }
            states.push(desired(&v, "h1"));
            put(&mut v, keys::producer("web", "d"), &producer("web", "d", 9));
            states.push(desired(&v, "h1"));
            v.delete(&keys::service("web"));
            v.delete(&keys::service("sticky"));
            states.push(desired(&v, "h1"));
            for w in states.windows(2) {
                let b = diff_batch(&w[0], &w[1]);
                nft.apply(&b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            }
            let listed = nft.list_table("inet", TABLE).unwrap().unwrap().to_string();
            assert!(!listed.contains("svc-web"), "{listed}");
            // A rebuild over an existing table, then removal.
            nft.apply(&full_batch(&states[0])).expect("rebuild");
            nft.apply(&full_batch(&states[0])).expect("rebuild again");
            nft.apply(&ferrynet_model::lb::delete_table())
                .expect("delete");
        })
        .join()
        .expect("thread");
    }
}
