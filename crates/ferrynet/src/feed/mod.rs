//! The cluster feed: one snapshot of the discovery prefixes, then their watch events,
//! folded into a [`DiscoveryView`] and published to every consumer (DNS server, load balancer,
//! health checker) through a `tokio::sync::watch` channel, so each sees the newest state and
//! skips intermediate ones when it is busy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferrynet_model::discovery::{prefixes, DiscoveryView};
use ferrynet_store::{EventKind, Store, StoreError};
use futures::StreamExt;
use tokio::sync::watch;

/// The receiving side consumers hold.
pub type ViewRx = watch::Receiver<Arc<DiscoveryView>>;

/// A channel with an empty view; `follow` fills it.
pub fn channel() -> (watch::Sender<Arc<DiscoveryView>>, ViewRx) {
    watch::channel(Arc::new(DiscoveryView::default()))
}

/// Follow the store until `tx` has no receivers; store errors back off and resync from a
/// fresh snapshot (consumers keep the last view meanwhile).
pub async fn follow(store: Arc<dyn Store>, tx: watch::Sender<Arc<DiscoveryView>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow_once(&store, &tx).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "discovery feed lost the store; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Give back to the system the heap glibc kept after a large transient (the discovery
/// snapshot, a policy sync over 100,000 endpoints): freed memory otherwise stays in the
/// process, in whichever thread's arena held it, and the agent's RSS would be its peak.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Log each record the view newly refuses, with its key (the view itself is pure).
fn log_rejected(view: &DiscoveryView, logged: &mut BTreeMap<String, String>) {
    for (key, reason) in &view.rejected {
        if logged.get(key) != Some(reason) {
            tracing::warn!(key = %key.escape_debug(), reason = %reason, "rejected a store record");
        }
    }
    logged.clone_from(&view.rejected);
}

async fn follow_once(
    store: &Arc<dyn Store>,
    tx: &watch::Sender<Arc<DiscoveryView>>,
) -> Result<(), StoreError> {
    let mut streams = Vec::new();
    let mut top = 0;
    // Records are decoded page by page as they arrive (100,000 endpoints are never held raw),
    // into the interner the published view already uses, so a resync shares its strings.
    let mut view = DiscoveryView {
        interner: tx.borrow().interner.clone(),
        ..DiscoveryView::default()
    };
    for prefix in prefixes() {
        let rev = store
            .range_pages(&prefix, &mut |page| {
                for kv in page {
                    view.put_created(&kv.key, &kv.value, kv.create_revision);
                }
            })
            .await?;
        top = top.max(rev);
        streams.push(store.watch(&prefix, rev).await?);
    }
    view.revision = top;
    trim_heap();
    let mut logged = BTreeMap::new();
    log_rejected(&view, &mut logged);
    // The view's maps are persistent: a published clone shares them, and the next batch
    // copies only the paths it changes.
    if tx.send(Arc::new(view.clone())).is_err() {
        return Ok(());
    }
    let mut events = futures::stream::select_all(streams);
    while let Some(ev) = events.next().await {
        let mut apply = |ev: ferrynet_store::WatchEvent| {
            view.revision = view.revision.max(ev.kv.mod_revision);
            match ev.kind {
                EventKind::Put => view.put_created(&ev.kv.key, &ev.kv.value, ev.kv.create_revision),
                EventKind::Delete => view.delete(&ev.kv.key),
            }
        };
        apply(ev?);
        // Fold whatever else is already queued into the same publication.
        while let Some(Some(more)) = futures::FutureExt::now_or_never(events.next()) {
            apply(more?);
        }
        log_rejected(&view, &mut logged);
        if tx.send(Arc::new(view.clone())).is_err() {
            return Ok(());
        }
    }
    Err(StoreError::Unavailable("discovery watch ended".into()))
}

/// The discovery view of the store now (what `follow` starts from, without the watches).
pub async fn snapshot(store: &dyn Store) -> Result<DiscoveryView, StoreError> {
    let mut kvs = Vec::new();
    let mut top = 0;
    for prefix in prefixes() {
        let (mut part, rev) = store.range(&prefix).await?;
        kvs.append(&mut part);
        top = top.max(rev);
    }
    let mut view = DiscoveryView::default();
    view.reset(
        kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        top,
    );
    Ok(view)
}
