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
use ferrynet_store::{EventKind, KeyValue, Revision, Store, StoreError};
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

/// Follow the store and keep the table until the task is aborted.
pub async fn run(
    store: Arc<dyn Store>,
    nft: Arc<dyn NftExecutor>,
    host: String,
    status: Arc<Mutex<AgentStatus>>,
) {
    let mut applied: Option<Desired> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let e = follow(&store, &nft, &host, &status, &mut applied).await;
        tracing::warn!(error = %e, "policy: store feed lost; the table keeps its last state");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow(
    store: &Arc<dyn Store>,
    nft: &Arc<dyn NftExecutor>,
    host: &str,
    status: &Arc<Mutex<AgentStatus>>,
    applied: &mut Option<Desired>,
) -> StoreError {
    let mut view = View::default();
    let mut streams = Vec::new();
    for prefix in [
        policy_keys::policies(),
        keys::networks(),
        keys::all_endpoints(),
    ] {
        let (kvs, rev) = match store.range(&prefix).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        for kv in &kvs {
            view.put(kv);
        }
        view.revision = view.revision.max(rev);
        match store.watch(&prefix, rev).await {
            Ok(s) => streams.push(s),
            Err(e) => return e,
        }
    }
    // After a lost feed the kernel is whatever it is: rebuild once.
    *applied = None;
    sync(&view, nft, host, status, applied).await;
    let mut events = futures::stream::select_all(streams);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            ev = events.next() => {
                let mut batch = vec![ev];
                while let Some(more) = futures::FutureExt::now_or_never(events.next()) {
                    batch.push(more);
                }
                for ev in batch {
                    let ev = match ev {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => return e,
                        None => return StoreError::Unavailable("watch ended".into()),
                    };
                    view.revision = view.revision.max(ev.kv.mod_revision);
                    match ev.kind {
                        EventKind::Put => view.put(&ev.kv),
                        EventKind::Delete => view.delete(&ev.kv.key),
                    }
                }
                sync(&view, nft, host, status, applied).await;
            }
            _ = tick.tick() => {
                // A flushed ruleset or a deleted table: build it again.
                if applied.is_some() && !table_exists(nft).await {
                    tracing::warn!("table inet {TABLE} is gone; rebuilding it");
                    *applied = None;
                    sync(&view, nft, host, status, applied).await;
                }
            }
        }
    }
}

async fn table_exists(nft: &Arc<dyn NftExecutor>) -> bool {
    let exec = nft.clone();
    tokio::task::spawn_blocking(move || {
        // A failed listing is no proof of absence: leave the table alone then.
        exec.list_table("inet", TABLE)
            .map(|t| t.is_some())
            .unwrap_or(true)
    })
    .await
    .unwrap_or(true)
}

/// One sync: decide, one transaction, cut what is now denied, report.
async fn sync(
    view: &View,
    nft: &Arc<dyn NftExecutor>,
    host: &str,
    status: &Arc<Mutex<AgentStatus>>,
    applied: &mut Option<Desired>,
) {
    let start = Instant::now();
    let networks: Vec<Network> = view.networks.values().cloned().collect();
    let book = book_of(view.policies.values().cloned().collect(), &networks);
    let want = render::desired(&book, &view.endpoints, &|e| is_local_on(host, e));
    let first = applied.is_none();
    let local = local_endpoints(&book, &view.endpoints, host);
    if !first && *applied == want {
        report(status, view, &want, start, None, |s| s.local = local);
        return;
    }
    // Unknown kernel state (start, after an error): the table is built whole, or removed.
    let batch = render::plan(applied.as_ref(), want.as_ref());
    let rebuilt = batch.starts_with("table ");
    let exec = nft.clone();
    let res = tokio::task::spawn_blocking(move || exec.apply(&batch))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = res {
        tracing::warn!(error = %e, "policy: programming table inet {TABLE}");
        *applied = None;
        report(status, view, &want, start, Some(e), |_| {});
        return;
    }
    // Inline: one ctnetlink dump and a few deletes; the view is not copied for a thread.
    let cut = cut_denied(&book, &view.endpoints, host);
    *applied = want.clone();
    report(status, view, &want, start, None, |s| {
        s.local = local;
        s.applies += 1;
        s.rebuilds += u64::from(rebuilt && want.is_some());
        s.cut += cut as u64;
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
    want: &Option<Desired>,
    start: Instant,
    error: Option<String>,
    f: impl FnOnce(&mut PolicyStatus),
) {
    if let Ok(mut s) = status.lock() {
        let p = &mut s.policy;
        p.policies = view.policies.len();
        p.endpoints = view.endpoints.list.len();
        p.table = want.as_ref().map(|d| d.shape);
        if error.is_none() && p.applied_revision != view.revision {
            // The table reflects this revision from now (changed by this sync or not).
            p.applied_revision = view.revision;
            p.applied_at_ms = now_ms();
        }
        p.last_took_ms = start.elapsed().as_secs_f64() * 1000.0;
        p.error = error;
        f(p);
    }
}
