//! Keeping this host registered: its record under `hosts/<name>` on a lease kept alive.

use std::sync::Arc;
use std::time::Duration;

use ferrynet_model::host::HostRecord;
use ferrynet_model::network::keys;
use ferrynet_store::{LeaseId, Op, Store, StoreError};
use tokio::sync::watch;

/// Register `record` under a lease of `ttl` and keep it alive forever, re-registering after the
/// lease is lost (store outage longer than the TTL) and retrying through store errors. The
/// current lease is published on `lease_tx`, for other keys that must vanish with the host.
pub async fn keep_registered(
    store: Arc<dyn Store>,
    record: HostRecord,
    ttl: Duration,
    lease_tx: watch::Sender<Option<LeaseId>>,
) {
    let value = serde_json::to_vec(&record).unwrap_or_default();
    let key = keys::host(&record.name);
    let beat = (ttl / 3).max(Duration::from_millis(100));
    loop {
        let lease = match store.grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant the host lease; retrying");
                tokio::time::sleep(beat).await;
                continue;
            }
        };
        let put = Op::Put {
            key: key.clone(),
            value: value.clone(),
            lease: Some(lease),
        };
        if let Err(e) = store.txn(vec![], vec![put]).await {
            tracing::warn!(error = %e, "cannot register the host; retrying");
            tokio::time::sleep(beat).await;
            continue;
        }
        tracing::info!(host = %record.name, lease, "host registered");
        lease_tx.send_replace(Some(lease));
        loop {
            tokio::time::sleep(beat).await;
            match store.keep_alive(lease).await {
                Ok(()) => {}
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(host = %record.name, "host lease expired; registering again");
                    lease_tx.send_replace(None);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "lease keep-alive failed; retrying"),
            }
        }
    }
}
