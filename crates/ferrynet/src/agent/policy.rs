//! Keeps this host's policy table (`inet ferrynet-policy`) in line with the store: policies,
//! networks (default-deny) and every host's endpoints (their addresses fill the peer sets) are
//! followed by watch; each batch of events becomes one nft transaction (element changes when
//! the rules stay, the table whole when they change), then the conntrack entries the new
//! state denies are deleted. A timer re-checks that the table is still there (a flushed
//! ruleset is rebuilt). The table stays when the agent stops: restarts drop nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrynet_dataplane::nft::NftExecutor;
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_model::policy::document::keys as policy_keys;
use ferrynet_model::policy::render::{self, Desired, Shape, TABLE};
use ferrynet_model::policy::{Direction, EndpointIndex, Policy, PolicyBook};
use ferrynet_model::validate::Validate;
use ferrynet_store::{EventKind, KeyValue, Revision, Store, StoreError, WatchEvent};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::status::AgentStatus;
use crate::control::policy::{book_of, cut_denied, is_local_on, policy_endpoint};

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
    eps.list
        .values()
        .filter(|e| is_local_on(host, e))
        .take(LOCAL_LISTED)
        .map(|e| LocalEndpoint {
            id: e.id.clone(),
            labels: e.labels.clone(),
            ingress: side(e, Direction::Ingress),
            egress: side(e, Direction::Egress),
        })
        .collect()
}

/// What the agent follows.
#[derive(Default)]
struct View {
    policies: std::collections::BTreeMap<String, Policy>,
    networks: std::collections::BTreeMap<String, Network>,
    endpoints: EndpointIndex,
    /// Endpoint id by store key (deletes carry only the key).
    ids: std::collections::HashMap<String, String>,
    revision: Revision,
}

impl View {
    fn put(&mut self, kv: &KeyValue) {
        let key = kv.key.as_str();
        if key.starts_with(&policy_keys::policies()) {
            match decode::<Policy>(kv) {
                Some(p) => self.policies.insert(kv.key.clone(), p),
                None => self.policies.remove(key),
            };
        } else if key.starts_with(&keys::networks()) {
            match decode::<Network>(kv) {
                Some(n) => self.networks.insert(kv.key.clone(), n),
                None => self.networks.remove(key),
            };
        } else if key.starts_with(&keys::all_endpoints()) {
            self.delete(key);
            if let Some(pe) = decode::<Endpoint>(kv).as_ref().and_then(policy_endpoint) {
                self.ids.insert(kv.key.clone(), pe.id.clone());
                self.endpoints.upsert(pe);
            }
        }
    }

    fn delete(&mut self, key: &str) {
        self.policies.remove(key);
        self.networks.remove(key);
        if let Some(id) = self.ids.remove(key) {
            self.endpoints.remove(&id);
        }
    }
}

/// A record that fails its checks is treated as absent (and logged), like everywhere else.
fn decode<T: serde::de::DeserializeOwned + Validate>(kv: &KeyValue) -> Option<T> {
    let r: Result<T, String> = serde_json::from_slice::<T>(&kv.value)
        .map_err(|e| e.to_string())
        .and_then(|r| r.validate_at(&kv.key).map(|_| r).map_err(|e| e.to_string()));
    r.map_err(|e| tracing::warn!(key = %kv.key.escape_debug(), error = %e, "policy: skipping a rejected record"))
        .ok()
}

/// What the store feed hands the worker thread.
enum Msg {
    /// A fresh read (after start or a lost feed): replace the view, rebuild the table.
    Reset(Vec<KeyValue>, Revision),
    /// Watch events, in order.
    Events(Vec<WatchEvent>),
    /// Check that the table is still there.
    Tick,
}

/// Follow the store and keep the table until the task is aborted. The store is read on the
/// agent's runtime; the view, the decisions and the nft transactions live on a thread of their
/// own, so a large view's work never stalls the agent's other tasks, nor theirs this one.
pub async fn run(
    store: Arc<dyn Store>,
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
    let mut backoff = Duration::from_millis(200);
    loop {
        let e = feed(&store, &tx).await;
        tracing::warn!(error = %e, "policy: store feed lost; the table keeps its last state");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Read the three prefixes, then forward their watch events (queued ones together).
async fn feed(store: &Arc<dyn Store>, tx: &std::sync::mpsc::Sender<Msg>) -> StoreError {
    let mut all = Vec::new();
    let mut top = 0;
    let mut streams = Vec::new();
    for prefix in [
        policy_keys::policies(),
        keys::networks(),
        keys::all_endpoints(),
    ] {
        let (mut kvs, rev) = match store.range(&prefix).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        all.append(&mut kvs);
        top = top.max(rev);
        match store.watch(&prefix, rev).await {
            Ok(s) => streams.push(s),
            Err(e) => return e,
        }
    }
    let _ = tx.send(Msg::Reset(all, top));
    let mut events = futures::stream::select_all(streams);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            ev = events.next() => {
                let mut batch = Vec::new();
                let mut next = Some(ev);
                while let Some(ev) = next {
                    match ev {
                        Some(Ok(ev)) => batch.push(ev),
                        Some(Err(e)) => return e,
                        None => return StoreError::Unavailable("watch ended".into()),
                    }
                    next = futures::FutureExt::now_or_never(events.next());
                }
                let _ = tx.send(Msg::Events(batch));
            }
            _ = tick.tick() => { let _ = tx.send(Msg::Tick); }
        }
    }
}

/// The worker: apply what the feed sends (everything queued at once), then sync.
fn work(
    rx: std::sync::mpsc::Receiver<Msg>,
    nft: Arc<dyn NftExecutor>,
    host: String,
    status: Arc<Mutex<AgentStatus>>,
) {
    let mut view = View::default();
    // What the kernel holds: None = unknown (start, a lost feed, an error), Some(None) = no table.
    let mut applied: Option<Option<Desired>> = None;
    while let Ok(first) = rx.recv() {
        let mut changed = false;
        let mut tick = false;
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                Msg::Reset(kvs, rev) => {
                    view = View::default();
                    for kv in &kvs {
                        view.put(kv);
                    }
                    view.revision = rev;
                    // After a lost feed the kernel is whatever it is: rebuild once.
                    applied = None;
                    changed = true;
                }
                Msg::Events(evs) => {
                    for ev in evs {
                        view.revision = view.revision.max(ev.kv.mod_revision);
                        match ev.kind {
                            EventKind::Put => view.put(&ev.kv),
                            EventKind::Delete => view.delete(&ev.kv.key),
                        }
                    }
                    changed = true;
                }
                Msg::Tick => tick = true,
            }
        }
        // A flushed ruleset or a deleted table: build it again.
        if tick && !changed && matches!(applied, Some(Some(_))) && !table_exists(&nft) {
            tracing::warn!("table inet {TABLE} is gone; rebuilding it");
            applied = None;
            changed = true;
        }
        if changed {
            sync(&view, &nft, &host, &status, &mut applied);
        }
    }
}

/// Cheap whatever the table's size: one chain is listed, not the sets.
fn table_exists(nft: &Arc<dyn NftExecutor>) -> bool {
    nft.apply(&format!("list chain {} egress", render::FAMILY_TABLE))
        .is_ok()
}

/// One sync: decide, one transaction, cut what is now denied, report.
fn sync(
    view: &View,
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
        report(status, view, want.map(|d| d.shape), start, None, |s| {
            s.local = local
        });
        return;
    }
    // Unknown kernel state (start, after an error): the table is built whole, or removed.
    let batch = render::plan(applied.as_ref().and_then(Option::as_ref), want.as_ref());
    let rebuilt = batch.starts_with("table ");
    if let Err(e) = nft.apply(&batch) {
        let e = e.to_string();
        tracing::warn!(error = %e, "policy: programming table inet {TABLE}");
        *applied = None;
        report(status, view, want.map(|d| d.shape), start, Some(e), |_| {});
        return;
    }
    // New connections meet the new rules from here; established ones are cut next.
    let at = now_ms();
    let cut = cut_denied(&book, &view.endpoints, host);
    let shape = want.as_ref().map(|d| d.shape);
    *applied = Some(want);
    report(status, view, shape, start, None, |s| {
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
    status: &Arc<Mutex<AgentStatus>>,
    view: &View,
    shape: Option<Shape>,
    start: Instant,
    error: Option<String>,
    f: impl FnOnce(&mut PolicyStatus),
) {
    if let Ok(mut s) = status.lock() {
        let p = &mut s.policy;
        p.policies = view.policies.len();
        p.endpoints = view.endpoints.list.len();
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
