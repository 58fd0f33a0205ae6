//! Conntrack follows producers: after the load balancer's transaction, the entries that still
//! point at a producer that left (or at nothing, for UDP flows that reached the host while a
//! frontend had no producer) are deleted, so a long-lived UDP flow's next datagram is a new
//! flow that meets the current rules. Every agent does it for its own host: a client's DNAT
//! happens on the client's host.

use std::sync::{Arc, Mutex};

use ferrynet_model::conntrack::{draining, lb_flush, Drains};
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::lb::LbState;

use super::status::AgentStatus;

/// What earlier flush decisions left: producers whose TCP sessions were left to drain.
#[derive(Default)]
pub struct Follower {
    drains: Drains,
}

impl Follower {
    /// Delete the entries that programming `new` (made from `view`) over `old` (None:
    /// unknown, a rebuild) left stale. Call it after the nft transaction (so no new packet
    /// re-creates an entry toward a departed producer), and also for views that change nothing
    /// in the load balancer (a draining producer's container may have gone). Errors are
    /// logged and reported in the status; a rebuild sweeps whatever a failure left.
    pub async fn after_lb(
        &mut self,
        old: Option<&LbState>,
        new: &LbState,
        view: &DiscoveryView,
        status: &Arc<Mutex<AgentStatus>>,
    ) {
        if !ferrynet_dataplane::conntrack::flush_enabled() {
            return;
        }
        let rules = lb_flush(old, new, &draining(view), &mut self.drains);
        if rules.is_empty() {
            return;
        }
        let res = tokio::task::spawn_blocking(move || ferrynet_dataplane::conntrack::flush(&rules))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Ok(mut s) = status.lock() {
            match &res {
                Ok(st) => {
                    s.lb.conntrack_deleted += st.deleted as u64;
                    s.lb.conntrack_error = None;
                }
                Err(e) => s.lb.conntrack_error = Some(e.clone()),
            }
        }
        match res {
            Ok(st) if st.deleted > 0 => tracing::info!(
                deleted = st.deleted,
                scanned = st.scanned,
                "conntrack entries of departed producers deleted"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deleting stale conntrack entries failed"),
        }
    }
}
