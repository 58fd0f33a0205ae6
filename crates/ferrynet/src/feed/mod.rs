//! The cluster feed: the one reader of the cluster's state in the store. One paged snapshot of
//! every prefix the agent follows, then their watch events, with one retry policy (back off,
//! then a fresh snapshot). Two kinds of consumer:
//!
//! - the discovery consumers (DNS, load balancer, health checks, policy, BGP's producer list,
//!   `ferrynet render`) get the newest [`DiscoveryView`] through a `tokio::sync::watch`
//!   channel: each sees the newest state and skips intermediate ones when it is busy; the
//!   view's maps are persistent, so a publication shares them with the one before;
//! - the fabric reconciler gets every network, host and block event in order
//!   ([`FabricUpdate`]), because it times departures from them.

mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferrynet_model::discovery::{prefixes, DiscoveryView};
use ferrynet_store::{Store, StoreError, WatchEvent};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

pub use state::{is_fabric_key, FabricUpdate, FeedState};

/// The receiving side discovery consumers hold.
pub type ViewRx = watch::Receiver<Arc<DiscoveryView>>;

/// The receiving side the fabric reconciler holds.
pub type FabricRx = mpsc::UnboundedReceiver<FabricUpdate>;

/// A channel with an empty view; `follow` fills it.
pub fn channel() -> (watch::Sender<Arc<DiscoveryView>>, ViewRx) {
    watch::channel(Arc::new(DiscoveryView::default()))
}

/// Where the feed publishes.
pub struct Subscribers {
    /// The discovery view.
    pub views: watch::Sender<Arc<DiscoveryView>>,
    /// The fabric's updates (None: nobody reconciles the fabric, as in `ferrynet render`).
    pub fabric: Option<mpsc::UnboundedSender<FabricUpdate>>,
}

impl Subscribers {
    /// Only the discovery view.
    pub fn views(views: watch::Sender<Arc<DiscoveryView>>) -> Subscribers {
        Subscribers {
            views,
            fabric: None,
        }
    }

    /// With a fabric channel too; its receiving side.
    pub fn with_fabric(views: watch::Sender<Arc<DiscoveryView>>) -> (Subscribers, FabricRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let subs = Subscribers {
            views,
            fabric: Some(tx),
        };
        (subs, rx)
    }

    /// True when nobody listens any more (the feed stops).
    fn gone(&self) -> bool {
        self.views.is_closed() && self.fabric.as_ref().is_none_or(|f| f.is_closed())
    }

    /// Hand a fabric update over (dropped when nobody reconciles).
    fn fabric(&self, update: FabricUpdate) {
        if let Some(f) = &self.fabric {
            let _ = f.send(update);
        }
    }

    /// Publish a copy of `view` (its maps are shared, not copied).
    fn publish(&self, view: &DiscoveryView) {
        self.views.send_replace(Arc::new(view.clone()));
    }
}

/// The one retry policy of store readers: 200 ms doubling to 5 s, back to 200 ms after a
/// read that got through.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Backoff::FIRST)
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    /// Sleep for the current delay, then double it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Backoff::MAX);
    }

    /// The store answered: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.0 = Backoff::FIRST;
    }
}

/// Follow the store until nobody listens; store errors back off and resync from a fresh
/// snapshot (consumers keep the last view meanwhile, the fabric is told with `Lost`).
pub async fn follow(store: Arc<dyn Store>, subs: Subscribers) {
    let mut backoff = Backoff::default();
    loop {
        match follow_once(&store, &subs, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "the cluster feed lost the store; retrying");
                subs.fabric(FabricUpdate::Lost(e.to_string()));
                backoff.wait().await;
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

/// Read every prefix page by page into `state`; the highest revision read, and each prefix
/// with the revision its read saw (where its watch starts: no event between two prefixes'
/// reads is lost, none is applied twice).
async fn read_snapshot(
    store: &dyn Store,
    state: &mut FeedState,
) -> Result<(u64, Vec<(String, u64)>), StoreError> {
    let mut top = 0;
    let mut read = Vec::new();
    for prefix in prefixes() {
        let rev = store
            .range_pages(&prefix, &mut |page| state.snapshot_page(page))
            .await?;
        top = top.max(rev);
        read.push((prefix, rev));
    }
    Ok((top, read))
}

/// One snapshot, then the watch until it fails (an error) or nobody listens (`Ok`).
async fn follow_once(
    store: &Arc<dyn Store>,
    subs: &Subscribers,
    backoff: &mut Backoff,
) -> Result<(), StoreError> {
    // Into the interner the published view already uses, so a resync shares its strings.
    let mut state = FeedState::new(subs.views.borrow().interner.clone());
    let (top, read) = read_snapshot(store.as_ref(), &mut state).await?;
    // One watch for every prefix: the embedded store then reads each change once.
    let mut events = store.watch_many(&read).await?;
    backoff.reset();
    trim_heap();
    let mut logged = BTreeMap::new();
    log_rejected(&state.view, &mut logged);
    subs.fabric(state.finish(top));
    subs.publish(&state.view);
    while let Some(ev) = events.next().await {
        let mut batch: Vec<WatchEvent> = vec![ev?];
        // Fold whatever else is already queued into the same publication.
        while let Some(Some(more)) = futures::FutureExt::now_or_never(events.next()) {
            batch.push(more?);
        }
        if let Some(update) = state.apply(batch) {
            subs.fabric(update);
        }
        log_rejected(&state.view, &mut logged);
        subs.publish(&state.view);
        if subs.gone() {
            return Ok(());
        }
    }
    Err(StoreError::Unavailable(
        "the cluster feed's watch ended".into(),
    ))
}

/// The discovery view of the store now (what `follow` starts from, without the watches).
pub async fn snapshot(store: &dyn Store) -> Result<DiscoveryView, StoreError> {
    let mut state = FeedState::default();
    let (top, _) = read_snapshot(store, &mut state).await?;
    state.finish(top);
    Ok(state.view)
}
