//! Spare blocks: the agent keeps one block of each family claimed ahead on every multi-host
//! network, so a container's ADD allocates in a block whose route every peer already has and
//! never waits for a claim transaction itself.
//!
//! The decision is `ferrynet_model::blocks::spare_families` (when, and the scarcity rule); the
//! claim goes through the ordinary block claim (`Control::claim_block`). It follows the
//! discovery feed, which carries block claims and endpoint records: an ADD that takes the
//! host's last empty block into use shows up as an endpoint event, and the next spare is
//! claimed at once. Spares are ordinary claims of this host: the departed-host release frees
//! them with the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrynet_model::blocks::{spare_families, SpareInput};
use ferrynet_model::discovery::DiscoveryView;
use ipnet::IpNet;

use crate::control::Control;
use crate::feed::ViewRx;

/// How long a claim may take to come back through the feed before the family is decided
/// again (the feed lags the store by a watch event; this only guards against a lost one).
const PENDING_FOR: Duration = Duration::from_secs(5);

/// Claims made and not yet seen in the view, by (network, IPv6).
type Pending = BTreeMap<(String, bool), (IpNet, Instant)>;

/// Follow the discovery feed, claiming a spare block whenever the model asks for one.
pub async fn run(ctl: Arc<Control>, mut views: ViewRx) {
    let mut pending = Pending::new();
    loop {
        let view = views.borrow_and_update().clone();
        for (net, v6) in wanted(&view, ctl.host(), &mut pending, Instant::now()) {
            let Some(pool) = view.networks.get(&net) else {
                continue;
            };
            match ctl.claim_block(pool, v6).await {
                Ok(Some(block)) => {
                    tracing::debug!(network = %net, %block, "claimed a spare block");
                    pending.insert((net, v6), (block, Instant::now()));
                }
                Ok(None) => tracing::debug!(network = %net, v6, "no block left for a spare"),
                // The next feed change decides again.
                Err(e) => tracing::warn!(network = %net, error = %e, "claiming a spare block"),
            }
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// (network, IPv6) pairs to claim a spare of now: what the model wants, less claims made and
/// not yet in the view (which would otherwise be claimed twice).
fn wanted(
    view: &DiscoveryView,
    me: &str,
    pending: &mut Pending,
    now: Instant,
) -> Vec<(String, bool)> {
    pending.retain(|(net, _), (block, at)| {
        !view.blocks.contains_key(&(net.clone(), *block)) && now.duration_since(*at) < PENDING_FOR
    });
    let live: Vec<&str> = view.live_hosts.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for pool in view.networks.values().filter(|n| n.fabric.is_some()) {
        let claims: Vec<(IpNet, &str)> = view
            .blocks
            .iter()
            .filter(|((n, _), _)| *n == pool.name)
            .map(|((_, b), h)| (*b, h.as_str()))
            .collect();
        let in_use = |b: &IpNet| view.endpoints.addresses_in(&pool.name, b).next().is_some();
        let families = spare_families(&SpareInput {
            pool,
            me,
            claims: &claims,
            live_hosts: &live,
            in_use: &in_use,
        });
        out.extend(
            families
                .into_iter()
                .filter(|v6| !pending.contains_key(&(pool.name.clone(), *v6)))
                .map(|v6| (pool.name.clone(), v6)),
        );
    }
    out
}
