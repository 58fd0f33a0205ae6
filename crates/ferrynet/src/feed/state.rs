//! The feed's state between two store reads (pure): the discovery view it publishes, and the
//! part of each snapshot and batch the fabric reconciler receives.

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::keys;
use ferrynet_store::{EventKind, KeyValue, Revision, WatchEvent};

/// What the fabric reconciler receives from the feed, in store order.
#[derive(Debug, Clone, PartialEq)]
pub enum FabricUpdate {
    /// A fresh snapshot of every network, host and block record (the first read, and again
    /// after each reconnect): the reconciler's view is rebuilt from it.
    Reset(Vec<KeyValue>),
    /// Watch events on those records since the last update, in store order.
    Events(Vec<WatchEvent>),
    /// The feed lost the store (the message); a `Reset` follows when it answers again.
    Lost(String),
}

/// True for the keys the fabric follows: networks, hosts and block claims.
pub fn is_fabric_key(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(keys::ROOT) else {
        return false;
    };
    rest.starts_with("networks/") || rest.starts_with("hosts/") || rest.starts_with("blocks/")
}

/// One store read folded: a snapshot page by page, then batches of watch events.
#[derive(Debug, Default)]
pub struct FeedState {
    /// The discovery view (persistent maps: a published clone shares them).
    pub view: DiscoveryView,
    /// The fabric's records of the snapshot under way, handed over by `finish`.
    fabric: Vec<KeyValue>,
}

impl FeedState {
    /// An empty state whose view shares `interner`'s strings (a resync reuses the published
    /// view's, so its records share them).
    pub fn new(interner: ferrynet_model::policy::Interner) -> FeedState {
        FeedState {
            view: DiscoveryView {
                interner,
                ..DiscoveryView::default()
            },
            fabric: Vec::new(),
        }
    }

    /// Fold one page of the snapshot: records are decoded as they arrive (100,000 endpoints
    /// are never held raw); only the fabric's few records are kept for its reset.
    pub fn snapshot_page(&mut self, page: Vec<KeyValue>) {
        for kv in page {
            self.view
                .put_created(&kv.key, &kv.value, kv.create_revision);
            if is_fabric_key(&kv.key) {
                self.fabric.push(kv);
            }
        }
    }

    /// The snapshot is complete at `revision`: the fabric's reset.
    pub fn finish(&mut self, revision: Revision) -> FabricUpdate {
        self.view.revision = revision;
        FabricUpdate::Reset(std::mem::take(&mut self.fabric))
    }

    /// Apply one batch of watch events to the view; the fabric's share of it, if any.
    pub fn apply(&mut self, batch: Vec<WatchEvent>) -> Option<FabricUpdate> {
        let mut fabric = Vec::new();
        for ev in batch {
            self.view.revision = self.view.revision.max(ev.kv.mod_revision);
            match ev.kind {
                EventKind::Put => {
                    self.view
                        .put_created(&ev.kv.key, &ev.kv.value, ev.kv.create_revision)
                }
                EventKind::Delete => self.view.delete(&ev.kv.key),
            }
            if is_fabric_key(&ev.kv.key) {
                fabric.push(ev);
            }
        }
        (!fabric.is_empty()).then_some(FabricUpdate::Events(fabric))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabric_keys_are_networks_hosts_and_blocks() {
        assert!(is_fabric_key(&keys::network("blue")));
        assert!(is_fabric_key(&keys::host("h1")));
        assert!(is_fabric_key(&keys::block(
            "blue",
            &"10.0.0.0/26".parse().unwrap()
        )));
        assert!(!is_fabric_key(&keys::endpoint("blue", "c1", "eth0")));
        assert!(!is_fabric_key(&keys::orphan_block(
            "blue",
            &"10.0.0.0/26".parse().unwrap()
        )));
        assert!(!is_fabric_key("/elsewhere/networks/blue"));
    }
}
