//! One conflict loop for every store transaction planned from a read: plan, commit under the
//! plan's preconditions, and plan again from fresh reads when a concurrent writer won.

use ferrynet_store::{Compare, Op, StoreError};
use futures::future::BoxFuture;

use super::Control;
use crate::error::{ControlError, Result};

/// Rounds before a planned transaction gives up. Each lost race means another writer committed,
/// so this many in a row only happens under a storm of writers to the same keys.
pub const MAX_ATTEMPTS: usize = 64;

/// What one planning round decided.
#[derive(Debug)]
pub enum Round<T> {
    /// Write `ops` if every compare still holds; the call then returns `value`.
    Commit {
        /// The preconditions: what the plan read and relies on.
        compares: Vec<Compare>,
        /// The writes.
        ops: Vec<Op>,
        /// The result once committed.
        value: T,
    },
    /// Nothing to write: the answer is known (a record already there, a retried call).
    Done(T),
    /// Plan again at once: the round changed what the next plan reads (it claimed a block).
    Again,
}

impl<T> Round<T> {
    /// A commit of `ops` under `compares` returning `value`.
    pub fn commit(compares: Vec<Compare>, ops: Vec<Op>, value: T) -> Round<T> {
        Round::Commit {
            compares,
            ops,
            value,
        }
    }
}

impl Control {
    /// Run planning rounds until one commits or needs no write. `what` completes "could not …"
    /// in the error after [`MAX_ATTEMPTS`] lost races (reported as the store being unavailable,
    /// so CNI callers get "try again later").
    ///
    /// A round is a boxed `async move` block over references (not an async closure: those
    /// futures cannot yet be proven `Send` for the Docker plugin's spawned handlers); state
    /// kept across rounds lives in the caller, behind a `Mutex`.
    pub(crate) async fn transact<'a, T: 'a>(
        &self,
        what: impl Fn() -> String,
        mut round: impl FnMut() -> BoxFuture<'a, Result<Round<T>>>,
    ) -> Result<T> {
        for _ in 0..MAX_ATTEMPTS {
            match round().await? {
                Round::Done(v) => return Ok(v),
                Round::Again => {}
                Round::Commit {
                    compares,
                    ops,
                    value,
                } => {
                    if self.store.txn(compares, ops).await?.succeeded {
                        return Ok(value);
                    }
                    tracing::debug!(what = %what(), "transaction lost a race; planning again");
                }
            }
        }
        Err(ControlError::Store(StoreError::Unavailable(format!(
            "could not {} after {MAX_ATTEMPTS} attempts (heavy contention)",
            what()
        ))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use ferrynet_store::{EmbeddedStore, Store};

    use super::*;

    async fn control() -> (tempfile::TempDir, Control) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        (dir, Control::for_tests(store))
    }

    #[tokio::test]
    async fn a_lost_race_plans_again_from_fresh_reads() {
        let (_d, ctl) = control().await;
        ctl.store.put("/k", b"1".to_vec()).await.unwrap();
        let rounds = &AtomicUsize::new(0);
        let c = &ctl;
        let got = ctl
            .transact(
                || "bump /k".into(),
                || {
                    Box::pin(async move {
                        let kv = c.store.get("/k").await?.expect("seeded");
                        // A concurrent writer wins the first round.
                        if rounds.fetch_add(1, Ordering::SeqCst) == 0 {
                            c.store.put("/k", b"2".to_vec()).await?;
                        }
                        let next = format!("{}+", String::from_utf8_lossy(&kv.value));
                        Ok(Round::commit(
                            vec![Compare::ModRevision("/k".into(), kv.mod_revision)],
                            vec![Op::put("/k", next.clone().into_bytes())],
                            next,
                        ))
                    })
                },
            )
            .await
            .unwrap();
        assert_eq!(got, "2+");
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn endless_conflicts_end_as_unavailable_and_done_needs_no_write() {
        let (_d, ctl) = control().await;
        let err = ctl
            .transact(
                || "take /never".into(),
                || {
                    Box::pin(async {
                        Ok(Round::commit(
                            vec![Compare::Exists("/never".into())],
                            vec![Op::put("/never", Vec::new())],
                            (),
                        ))
                    })
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ControlError::Store(StoreError::Unavailable(_))
        ));
        assert!(
            err.to_string().contains("could not take /never after 64"),
            "{err}"
        );
        let v = ctl
            .transact(
                || "nothing".into(),
                || Box::pin(async { Ok(Round::Done(7)) }),
            )
            .await
            .unwrap();
        assert_eq!(v, 7);
        assert!(ctl.store.get("/never").await.unwrap().is_none());
    }
}
