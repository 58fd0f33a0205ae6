//! A queue thread's second stage: batches handed to a helper thread when that pays (a bulk
//! flow: the helper's kernel work runs beside the crypto on another core), done inline when
//! the helper is idle and the batch small (request/response traffic: no thread wake-up on
//! the way, so no added latency). Inline only while nothing is in flight, so order holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

/// Batches of fewer items than this are done inline when the helper is idle.
pub const SMALL: usize = 8;

/// The handing-over side of a stage.
pub struct Stage<B> {
    full: SyncSender<B>,
    free: Receiver<B>,
    in_flight: Arc<AtomicUsize>,
}

impl<B: Send + 'static> Stage<B> {
    /// Start the helper thread `name` running `work` on each batch handed over; `pools` are
    /// the batches that go round. Returns the stage and the first batch to fill.
    pub fn spawn(
        name: String,
        mut pools: Vec<B>,
        mut work: impl FnMut(&mut B) + Send + 'static,
    ) -> std::io::Result<(Stage<B>, B)> {
        let first = pools
            .pop()
            .ok_or_else(|| std::io::Error::other("no batches"))?;
        let (full, full_rx) = sync_channel::<B>(pools.len() + 1);
        let (free_tx, free) = sync_channel::<B>(pools.len() + 1);
        for b in pools {
            let _ = free_tx.send(b);
        }
        let in_flight = Arc::new(AtomicUsize::new(0));
        let done = in_flight.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(mut b) = full_rx.recv() {
                work(&mut b);
                done.fetch_sub(1, Ordering::Release);
                if free_tx.send(b).is_err() {
                    return;
                }
            }
        })?;
        Ok((
            Stage {
                full,
                free,
                in_flight,
            },
            first,
        ))
    }

    /// Finish a filled batch of `items`: inline with `inline` when small and the helper idle,
    /// else hand it over; returns the batch to fill next (None: the helper is gone).
    pub fn finish(&self, mut b: B, items: usize, inline: impl FnOnce(&mut B)) -> Option<B> {
        if items < SMALL && self.in_flight.load(Ordering::Acquire) == 0 {
            inline(&mut b);
            return Some(b);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.full.send(b).ok()?;
        self.free.recv().ok()
    }
}
