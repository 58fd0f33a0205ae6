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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::fabric::Backend;
    use ferrynet_model::network::{keys, Endpoint, FabricSpec, Network};

    fn view() -> DiscoveryView {
        let mut v = DiscoveryView::default();
        let net = Network {
            fabric: Some(FabricSpec {
                backend: Backend::Bgp,
                vni: 1,
                block_v4: 30,
                block_v6: 122,
                encrypt: false,
            }),
            ..Network::bridged("sp", ["10.50.0.0/16".parse().unwrap()])
        };
        v.put(&keys::network("sp"), &serde_json::to_vec(&net).unwrap());
        v.put(
            &keys::block("sp", &"10.50.0.0/30".parse().unwrap()),
            br#"{"host":"h1"}"#,
        );
        v
    }

    #[test]
    fn a_claim_in_flight_is_not_made_twice_and_a_lost_one_is_retried() {
        let mut v = view();
        let mut pending = Pending::new();
        let t = Instant::now();
        // The block is empty: it is the spare.
        assert!(wanted(&v, "h1", &mut pending, t).is_empty());
        let mut e = Endpoint::new("sp", "c1", "eth0");
        e.ips = vec!["10.50.0.2/30".parse().unwrap()];
        v.put(
            &keys::endpoint("sp", "c1", "eth0"),
            &serde_json::to_vec(&e).unwrap(),
        );
        assert_eq!(
            wanted(&v, "h1", &mut pending, t),
            vec![("sp".to_string(), false)]
        );
        assert!(wanted(&v, "h2", &mut pending, t).is_empty(), "not h2's");
        // Claimed, not yet in the view: not wanted again until the claim shows or times out.
        let spare: IpNet = "10.50.0.4/30".parse().unwrap();
        pending.insert(("sp".into(), false), (spare, t));
        assert!(wanted(&v, "h1", &mut pending, t + Duration::from_secs(1)).is_empty());
        assert_eq!(
            wanted(&v, "h1", &mut pending, t + PENDING_FOR),
            vec![("sp".to_string(), false)]
        );
        pending.insert(("sp".into(), false), (spare, t));
        v.put(&keys::block("sp", &spare), br#"{"host":"h1"}"#);
        assert!(wanted(&v, "h1", &mut pending, t).is_empty());
        assert!(pending.is_empty(), "the claim came back");
    }
}
