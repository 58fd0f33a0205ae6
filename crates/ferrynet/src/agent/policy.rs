//! Keeps this host's policy table (`inet ferrynet-policy`) in line with the store. It reads
//! the agent's one cluster feed (`discovery`: policies, networks for default-deny, and every
//! host's endpoints, whose addresses fill the peer sets; one shared record per endpoint);
//! each published view becomes one nft transaction (element changes when the rules stay, the
//! table whole when they change), then the conntrack entries the new state denies are
//! deleted. A timer re-checks that the table is still there (a flushed ruleset is rebuilt).
//! The table stays when the agent stops: restarts drop nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrynet_dataplane::nft::NftExecutor;
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::Network;
use ferrynet_model::policy::render::{self, Desired, Shape, TABLE};
use ferrynet_model::policy::{Direction, EndpointIndex, PolicyBook};
use serde::{Deserialize, Serialize};

use super::status::AgentStatus;
use crate::control::policy::{book_of, cut_denied, is_local_on};
use crate::feed::ViewRx;

/// The policy table as `ferrynet status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Policies in the store.
    pub policies: usize,
    /// Endpoints known (every host's).
    pub endpoints: usize,
    /// The table's chains, rules, sets and elements (absent: no table, nothing restricted here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Shape>,
    /// The store revision the table reflects.
    pub applied_revision: u64,
    /// Unix time (ms) from which the table reflected `applied_revision` (its transaction).
    pub applied_at_ms: u64,
    /// How long the last sync took (ms): decision, transaction, conntrack.
    pub last_took_ms: f64,
    /// Transactions since start.
    pub applies: u64,
    /// Of which the table was built whole.
    pub rebuilds: u64,
    /// Connections cut because a policy no longer allowed them.
    pub cut: u64,
    /// This host's endpoints: labels and the policies restricting each direction.
    #[serde(default)]
    pub local: Vec<LocalEndpoint>,
    /// The last error, if the last sync failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One of this host's endpoints as policy sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalEndpoint {
    /// `network/container/ifname`.
    pub id: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Policies restricting ingress, in order (None: open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<String>>,
    /// Policies restricting egress, in order (None: open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<String>>,
}

/// At most this many local endpoints are listed in the status.
const LOCAL_LISTED: usize = 256;

fn local_endpoints(book: &PolicyBook, eps: &EndpointIndex, host: &str) -> Vec<LocalEndpoint> {
    let side = |e, dir| {
        let list = book.applicable(e, dir);
        book.restricted(e, &list).then(|| {
            list.iter()
                .map(|&i| book.policies[i].policy.name.clone())
                .collect()
        })
    };
    eps.iter()
        .filter(|e| !e.addrs.is_empty() && is_local_on(host, e))
        .take(LOCAL_LISTED)
        .map(|e| LocalEndpoint {
            id: e.id.to_string(),
            labels: (*e.labels).clone(),
            ingress: side(e, Direction::Ingress),
            egress: side(e, Direction::Egress),
        })
        .collect()
}

/// What the feed hands the worker thread.
enum Msg {
    /// A newer view of the cluster.
    View(Arc<DiscoveryView>),
    /// Check that the table is still there.
    Tick,
}

/// Follow the discovery feed and keep the table until the task is aborted. The decisions and
/// the nft transactions live on a thread of their own, so a large view's work never stalls
/// the agent's other tasks, nor theirs this one.
pub async fn run(
    mut views: ViewRx,
    nft: Arc<dyn NftExecutor>,
    host: String,
    status: Arc<Mutex<AgentStatus>>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let worker = std::thread::Builder::new()
        .name("policy".into())
        .spawn(move || work(rx, nft, host, status));
    if let Err(e) = worker {
        tracing::warn!(error = %e, "policy: cannot start its thread; network policy is not enforced");
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            // The first view is the feed's first snapshot (the channel's empty initial view
            // counts as seen): an agent that starts never removes a table it has not read.
            r = views.changed() => {
                if r.is_err() {
                    return;
                }
                let view = views.borrow_and_update().clone();
                let _ = tx.send(Msg::View(view));
            }
            _ = tick.tick() => { let _ = tx.send(Msg::Tick); }
        }
    }
}

/// True when `a` and `b` differ in what the table is made of.
fn policy_changed(a: &DiscoveryView, b: &DiscoveryView) -> bool {
    !a.endpoints.same(&b.endpoints) || a.policies != b.policies || a.networks != b.networks
}

/// The worker: take the newest view (everything queued at once), then sync.
fn work(
    rx: std::sync::mpsc::Receiver<Msg>,
    nft: Arc<dyn NftExecutor>,
    host: String,
    status: Arc<Mutex<AgentStatus>>,
) {
    let mut view: Option<Arc<DiscoveryView>> = None;
    // What the kernel holds: None = unknown (start, an error), Some(None) = no table.
    let mut applied: Option<Option<Desired>> = None;
    while let Ok(first) = rx.recv() {
        let mut changed = false;
        let mut tick = false;
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                Msg::View(v) => {
                    changed |= view.as_ref().is_none_or(|old| policy_changed(old, &v));
                    view = Some(v);
                }
                Msg::Tick => tick = true,
            }
        }
        let Some(view) = &view else { continue };
        // A flushed ruleset or a deleted table: build it again.
        if tick && !changed && matches!(applied, Some(Some(_))) && !table_exists(&nft) {
            tracing::warn!("table inet {TABLE} is gone; rebuilding it");
            applied = None;
            changed = true;
        }
        if changed || applied.is_none() {
            sync(view, &nft, &host, &status, &mut applied);
            let elements = status_shape(&applied).map_or(0, |s| s.elements);
            if worth_trimming(view.endpoints.len(), elements) {
                crate::feed::trim_heap();
            }
        } else {
            // Nothing policy reads changed: the table reflects this revision too.
            report(
                status_shape(&applied),
                view,
                &status,
                Instant::now(),
                None,
                |_| {},
            );
        }
    }
}

/// Views of this many endpoints, or tables of this many elements, leave megabytes of freed
/// heap behind a sync. Below that, trimming costs more than it gives back: the pages it
/// returns to the kernel are faulted in again by the next allocations (libnftables alone
/// touches ~3 MB of fresh hash tables per transaction, every container's guard included).
const TRIM_AFTER: usize = 10_000;

/// Whether a sync over `endpoints` endpoints, leaving a table of `elements` elements, was a
/// transient worth handing back to the system.
fn worth_trimming(endpoints: usize, elements: usize) -> bool {
    endpoints >= TRIM_AFTER || elements >= TRIM_AFTER
}

fn status_shape(applied: &Option<Option<Desired>>) -> Option<Shape> {
    applied.as_ref().and_then(|d| d.as_ref()).map(|d| d.shape)
}

/// Cheap whatever the table's size: the kernel is asked for the base chain alone (listing it
/// through libnftables read every set element into its cache, ~30 MiB at 100,000 elements).
/// An error counts as present: a failing check must not rebuild the table once a tick.
fn table_exists(nft: &Arc<dyn NftExecutor>) -> bool {
    match nft.chain_exists("inet", TABLE, render::BASE_CHAIN) {
        Ok(present) => present,
        Err(e) => {
            tracing::debug!(error = %e, "policy: checking table inet {TABLE}");
            true
        }
    }
}

/// Set elements above which the policy table counts as large for nft (see `sync`).
const LARGE_TABLE_ELEMENTS: usize = 10_000;

/// One sync: decide, one transaction, cut what is now denied, report.
fn sync(
    view: &DiscoveryView,
    nft: &Arc<dyn NftExecutor>,
    host: &str,
    status: &Arc<Mutex<AgentStatus>>,
    applied: &mut Option<Option<Desired>>,
) {
    let start = Instant::now();
    let networks: Vec<Network> = view.networks.values().cloned().collect();
    let book = book_of(view.policies.values().cloned().collect(), &networks);
    let want = render::desired(&book, &view.endpoints, &|e| is_local_on(host, e));
    let local = local_endpoints(&book, &view.endpoints, host);
    if applied.as_ref() == Some(&want) {
        report(want.map(|d| d.shape), view, status, start, None, |s| {
            s.local = local
        });
        return;
    }
    // Unknown kernel state (start, after an error): the table is built whole, or removed.
    let batch = render::plan(applied.as_ref().and_then(Option::as_ref), want.as_ref());
    let rebuilt = batch.starts_with("table ");
    // A table this large is changed by a separate `nft` process (see
    // `apply_touching_large_sets`); a small one in-process, which is faster.
    let large = [applied.as_ref().and_then(Option::as_ref), want.as_ref()]
        .into_iter()
        .flatten()
        .any(|d| d.shape.elements > LARGE_TABLE_ELEMENTS);
    let applied_now = if large {
        nft.apply_touching_large_sets(&batch)
    } else {
        nft.apply(&batch)
    };
    if let Err(e) = applied_now {
        let e = e.to_string();
        tracing::warn!(error = %e, "policy: programming table inet {TABLE}");
        *applied = None;
        report(want.map(|d| d.shape), view, status, start, Some(e), |_| {});
        return;
    }
    // New connections meet the new rules from here; established ones are cut next.
    let at = now_ms();
    let cut = cut_denied(&book, &view.endpoints, host);
    let shape = want.as_ref().map(|d| d.shape);
    *applied = Some(want);
    report(shape, view, status, start, None, |s| {
        s.local = local;
        s.applies += 1;
        s.rebuilds += u64::from(rebuilt && shape.is_some());
        s.cut += cut as u64;
        s.applied_at_ms = at;
    });
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn report(
    shape: Option<Shape>,
    view: &DiscoveryView,
    status: &Arc<Mutex<AgentStatus>>,
    start: Instant,
    error: Option<String>,
    f: impl FnOnce(&mut PolicyStatus),
) {
    if let Ok(mut s) = status.lock() {
        let p = &mut s.policy;
        p.policies = view.policies.len();
        p.endpoints = view.endpoints.len();
        p.table = shape;
        if error.is_none() && p.applied_revision != view.revision {
            // The table reflects this revision from now (a transaction below may say when).
            p.applied_revision = view.revision;
            p.applied_at_ms = now_ms();
        }
        p.last_took_ms = start.elapsed().as_secs_f64() * 1000.0;
        p.error = error;
        f(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_syncs_trim_the_heap() {
        // A container's endpoint on a small host: trimming would only make the next
        // transaction fault its pages in again.
        assert!(!worth_trimming(40, 0));
        assert!(!worth_trimming(TRIM_AFTER - 1, TRIM_AFTER - 1));
        assert!(worth_trimming(TRIM_AFTER, 0));
        assert!(worth_trimming(12, 100_000));
    }
}
