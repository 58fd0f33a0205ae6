//! Keeps the VXLAN guard (`inet ferrynet-fabric`, see [`ferrynet_model::fabric_guard`]) in
//! line with the registered hosts, on every reconcile: the kernel's table is listed, compared
//! with the wanted peer set and changed by element diff, or rebuilt whole when it is missing
//! or damaged (so a flushed or deleted table is back by the next periodic reconcile).
//!
//! The table exists while the host has VXLAN devices of ours; without any, nothing listens on
//! the port for us and another VXLAN user of the host is left alone. It stays in place when the
//! agent stops, like the devices it protects.

use std::sync::Arc;

use ferrynet_dataplane::nft::NftExecutor;
use ferrynet_model::fabric_guard::{plan, read, GuardState, TABLE};

use super::status::VxlanGuardStatus;

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    /// Transactions applied (0 or 1).
    pub applied: u64,
    /// The table was built whole.
    pub rebuilt: bool,
    /// The guard's report (None: no table wanted).
    pub report: Option<VxlanGuardStatus>,
}

/// Bring the table to `want` (None: no table).
pub async fn sync(nft: &Arc<dyn NftExecutor>, want: Option<GuardState>) -> Result<Synced, String> {
    let exec = nft.clone();
    tokio::task::spawn_blocking(move || {
        let port = want.as_ref().map(|w| w.port).unwrap_or_default();
        // A listing through libnftables reads the whole ruleset (every policy set element):
        // when no table is wanted, the kernel is asked first whether there is one at all.
        let listed = if want.is_none()
            && !exec
                .table_exists("inet", TABLE)
                .map_err(|e| format!("checking table inet {TABLE}: {e}"))?
        {
            None
        } else {
            exec.list_table("inet", TABLE)
                .map_err(|e| format!("listing table inet {TABLE}: {e}"))?
        };
        let have = listed.map(|l| read(&l, port));
        let report = want.as_ref().map(|w| VxlanGuardStatus {
            peers: w.peers4.len() + w.peers6.len(),
            dropped: have.as_ref().map(|h| h.dropped.clone()).unwrap_or_default(),
            rebuilds: 0,
        });
        let batch = plan(have.as_ref(), want.as_ref());
        if batch.is_empty() {
            return Ok(Synced {
                report,
                ..Default::default()
            });
        }
        let rebuilt = want.is_some() && !have.as_ref().is_some_and(|h| h.intact);
        if have.as_ref().is_some_and(|h| !h.intact) {
            tracing::warn!("table inet {TABLE} is damaged; rebuilding it");
        }
        exec.apply(&batch)
            .map_err(|e| format!("programming table inet {TABLE}: {e}"))?;
        Ok(Synced {
            applied: 1,
            rebuilt,
            report,
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_dataplane::nft::LibNftables;
    use ferrynet_model::fabric_guard::{diff_batch, full_batch};

    fn state(v4: &[&str], v6: &[&str]) -> GuardState {
        GuardState {
            port: 4789,
            peers4: v4.iter().map(|a| a.parse().unwrap()).collect(),
            peers6: v6.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    /// The batches apply on a real kernel, and the listing reads back as what was programmed:
    /// intact after a build and a diff, damaged after a flush.
    #[test]
    fn batches_apply_and_read_back_on_a_real_kernel() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let nft = LibNftables::load().expect("libnftables");
            let a = state(&["172.31.0.2", "172.31.1.3"], &["fd31::2"]);
            nft.apply(&full_batch(&a)).expect("full batch");
            let listed = nft.list_table("inet", TABLE).unwrap().expect("table");
            let p = read(&listed, 4789);
            assert!(p.intact, "{listed}");
            assert_eq!(p.state, a);
            let b = state(&["172.31.1.3", "172.31.1.4"], &[]);
            nft.apply(&diff_batch(&a, &b)).expect("diff");
            let p = read(&nft.list_table("inet", TABLE).unwrap().unwrap(), 4789);
            assert!(p.intact);
            assert_eq!(p.state, b);
            nft.apply(&format!("flush chain inet {TABLE} input"))
                .expect("flush");
            let p = read(&nft.list_table("inet", TABLE).unwrap().unwrap(), 4789);
            assert!(!p.intact);
            assert_eq!(plan(Some(&p), Some(&b)), full_batch(&b));
            nft.apply(&full_batch(&b)).expect("rebuild");
            nft.apply(&ferrynet_model::fabric_guard::absent_batch())
                .expect("remove");
            assert!(nft.list_table("inet", TABLE).unwrap().is_none());
        })
        .join()
        .expect("thread");
    }
}
