//! After every (re)registration of this host, put back what its peers released while it was
//! cut off (`Control::reassert_local`). Registration comes first: peers release a departed
//! host's records only while its registration is missing, so nothing is released after this
//! runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrynet_store::LeaseId;
use tokio::sync::watch;

use super::status::AgentStatus;
use crate::control::Control;

/// Follow the host's lease; on each new one, re-assert (retrying through store errors).
pub async fn run(
    ctl: Arc<Control>,
    mut lease: watch::Receiver<Option<LeaseId>>,
    status: Arc<Mutex<AgentStatus>>,
) {
    let mut done_for: Option<LeaseId> = None;
    loop {
        let current = *lease.borrow_and_update();
        if let Some(l) = current.filter(|l| done_for != Some(*l)) {
            match ctl.reassert_local().await {
                Ok(report) => {
                    done_for = Some(l);
                    if let Ok(mut s) = status.lock() {
                        s.reassert
                            .get_or_insert_with(Default::default)
                            .absorb(report);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-asserting this host's records failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if lease.changed().await.is_err() {
            return;
        }
    }
}
