//! The fabric's consumer of the cluster feed: every network, host and block update folded into
//! the [`ClusterView`] in order, one reconcile per batch, and the one-second tick that releases
//! departed hosts and repairs drift.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::reconcile::Reconciler;
use super::status::{self, AgentStatus};
use super::view::{self, ClusterView};
use crate::feed::{FabricRx, FabricUpdate, ViewRx};

/// How the loop times its work.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a vanished host keeps its routes and blocks.
    pub grace: Duration,
    /// Full reconcile at least this often.
    pub resync: Duration,
}

/// Follow the feed's fabric updates until the feed stops.
pub async fn follow(
    rec: &mut Reconciler,
    mut updates: FabricRx,
    timing: Timing,
    status: Arc<Mutex<AgentStatus>>,
    discovery: ViewRx,
) {
    // Former blocks first, before the re-assertion after registration puts back records
    // (with their blocks) and before the first reconcile claims new ones.
    reclaimed(rec).await;
    let mut view = ClusterView::default();
    // Nothing is reconciled before the first snapshot (an empty view would remove everything).
    let mut have_snapshot = false;
    // Set by each fresh snapshot: the reconcile after it tells systemd the agent is ready.
    let mut fresh = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else { return };
                let now = Instant::now();
                let mut changed = fold(&mut view, update, now, &status, &mut have_snapshot, &mut fresh);
                // Take whatever else is already queued, then reconcile once.
                while let Ok(more) = updates.try_recv() {
                    changed |= fold(&mut view, more, now, &status, &mut have_snapshot, &mut fresh);
                }
                if changed && have_snapshot && reclaimed(rec).await {
                    rec.run(&view).await;
                    super::metrics::instruments().watch_lag(now.elapsed());
                    if std::mem::take(&mut fresh) {
                        // systemd (Type=notify) starts dependent units once the fabric is in
                        // the kernel; after a store outage this says so again, which systemd
                        // takes as a status update.
                        crate::notify::ready(&format!(
                            "following the store; {} hosts",
                            view.hosts.len()
                        ));
                    }
                }
            }
            _ = tick.tick() => {
                if have_snapshot && reclaimed(rec).await {
                    on_tick(rec, &mut view, timing, &mut last_full, &status).await;
                }
            }
        }
        // Refused records of both views go to `ferrynet status`.
        let list = status::rejected_list([&view.rejected, &discovery.borrow().rejected]);
        if let Ok(mut s) = status.lock() {
            s.rejected = list;
        }
    }
}

/// Apply one update to the view; true when a reconcile should follow.
fn fold(
    view: &mut ClusterView,
    update: FabricUpdate,
    now: Instant,
    status: &Mutex<AgentStatus>,
    have_snapshot: &mut bool,
    fresh: &mut bool,
) -> bool {
    match update {
        FabricUpdate::Reset(kvs) => {
            view.reset(&kvs, now);
            *have_snapshot = true;
            *fresh = true;
            mark_store(status, None);
            true
        }
        FabricUpdate::Events(events) => {
            for ev in &events {
                view.apply(ev, now);
            }
            true
        }
        FabricUpdate::Lost(e) => {
            tracing::warn!(error = %e, "store connection lost; the kernel keeps its last state; retrying");
            crate::notify::status(&format!("store unreachable, retrying: {e}"));
            mark_store(status, Some(e));
            false
        }
    }
}

/// Former blocks are reclaimed once, before the first reconcile claims new ones; false while
/// that fails (tried again at the next update or tick).
async fn reclaimed(rec: &mut Reconciler) -> bool {
    if rec.reclaimed {
        return true;
    }
    match rec.reclaim_saved_blocks().await {
        Ok(()) => {
            rec.reclaimed = true;
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "reclaiming former blocks; retrying");
            false
        }
    }
}

/// Every second: release hosts whose grace ended, reconcile after a probe changed a choice or
/// when the resync period is over, and start the grace of block owners never seen.
async fn on_tick(
    rec: &mut Reconciler,
    view: &mut ClusterView,
    timing: Timing,
    last_full: &mut Instant,
    status: &Mutex<AgentStatus>,
) {
    let now = Instant::now();
    let expired = view.expired(now, timing.grace);
    let probed = rec
        .probe_changed
        .swap(false, std::sync::atomic::Ordering::Relaxed);
    if !expired.is_empty() {
        match rec.release_departed(view, &expired).await {
            Ok(()) => {
                for h in &expired {
                    view.departed.remove(h);
                }
                mark_store(status, None);
                rec.run(view).await;
            }
            // They stay departed: the next tick tries again.
            Err(e) => {
                tracing::warn!(error = %e, "releasing departed hosts; retrying");
                mark_store(status, Some(e.to_string()));
            }
        }
    } else if probed || now.duration_since(*last_full) >= timing.resync {
        *last_full = now;
        rec.run(view).await;
    }
    for h in view.unknown_owners() {
        view.departed
            .insert(h.clone(), (view::placeholder(&h), now));
    }
}

/// Record whether the store answers, for `ferrynet status`.
fn mark_store(status: &Mutex<AgentStatus>, error: Option<String>) {
    if let Ok(mut s) = status.lock() {
        s.store_ok = error.is_none();
        s.store_error = error;
    }
}

#[cfg(test)]
mod tests;
