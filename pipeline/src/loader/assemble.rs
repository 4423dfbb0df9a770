//! The assembler thread: takes the workers' results in order (the ordered map puts them back
//! in sequence), skips bad ones, fills batches, and tells the reader how far the epoch is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Done, LoaderConfig, LoaderError, LoaderState, LoaderStats, Outcome, Processed};
use crate::batch::{Batch, BufferPool};
use crate::metrics as m;
use crate::ordered_map::Results;

/// What the reader needs to know of the assembler: the epoch being assembled and its bad
/// samples so far (each one lets the reader send one more sample of the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProgressState {
    pub(super) epoch: u64,
    pub(super) bad: u64,
    /// The assembler has stopped (done, error, or the loader dropped).
    pub(super) closed: bool,
}

pub(super) struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

impl Progress {
    pub(super) fn new(epoch: u64) -> Self {
        Self { state: Mutex::new(ProgressState { epoch, bad: 0, closed: false }), changed: Condvar::new() }
    }

    pub(super) fn get(&self) -> ProgressState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Waits until the state differs from `seen`, at most `timeout`.
    pub(super) fn wait_change(&self, seen: ProgressState, timeout: Duration) {
        let guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self.changed.wait_timeout_while(guard, timeout, |s| *s == seen);
    }
}

/// Tells the reader the assembler is gone, however it leaves.
struct CloseOnDrop<'a>(&'a Progress);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.update(|p| p.closed = true);
    }
}

pub(super) struct Assembler {
    pub(super) cfg: Arc<LoaderConfig>,
    pub(super) pool: BufferPool,
    pub(super) recycle_tx: crossbeam_channel::Sender<(Vec<u8>, Vec<u8>)>,
    pub(super) tx: async_channel::Sender<Result<Batch, LoaderError>>,
    pub(super) progress: Arc<Progress>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stats: Arc<LoaderStats>,
    pub(super) per_epoch: Option<u64>,
    /// What the saved states refer to (shard list, counts, data config).
    pub(super) fingerprint: u64,
}

impl Assembler {
    fn new_batch(&self, epoch: u64, index: u64) -> Batch {
        let c = &self.cfg;
        let (b, s, t) = (c.batch_size, c.augment.view_size, c.augment.token_size);
        let (views, token_views) = self.pool.get(b * 3 * s * s, b * 3 * t * t);
        let nm = c.mask.num_masked;
        Batch {
            batch_size: b,
            view_size: s,
            token_size: t,
            grid: c.mask.grid,
            num_masked: nm,
            views,
            token_views,
            masked: Vec::with_capacity(b * nm),
            visible: Vec::with_capacity(b * (c.mask.num_patches() - nm)),
            labels: Vec::with_capacity(b),
            keys: Vec::with_capacity(b),
            epoch,
            index,
            resume: LoaderState::default(),
            pool: Some(self.pool.clone()),
        }
    }

    pub(super) fn run(self, mut results: Results<Done>, start: LoaderState) {
        let _close = CloseOnDrop(&self.progress);
        let b = self.cfg.batch_size;
        let (mut epoch, mut next_seq, mut index) = (start.epoch, start.consumed, start.batch);
        // Whether the shuffle buffer's byte cap shaped this epoch's order so far (resume then
        // replays the epoch instead of computing its position from the counts).
        let mut capped = start.replay;
        let mut batch = self.new_batch(epoch, index);
        let (mut seen, mut bad_count) = (0u64, 0u64);
        let mut last = Instant::now();
        while let Some(done) = results.recv() {
            let (e, job_capped, result) = match done {
                Done::EndOfEpoch { epoch: e } => {
                    if e == epoch {
                        // Unknown-length epoch exhausted: the partial batch is dropped (drop_last).
                        if !self.finish_epoch(&mut epoch, &mut next_seq, &mut index, &mut capped) {
                            return;
                        }
                        batch = self.new_batch(epoch, index);
                    }
                    continue;
                }
                Done::Sample { epoch, capped, result } => (epoch, capped, result),
            };
            if e != epoch {
                // Not sent by the reader, which submits only what an epoch uses; harmless.
                self.recycle(result);
                continue;
            }
            next_seq += 1;
            seen += 1;
            capped |= job_capped;
            let p = match result {
                Err(bad) => {
                    bad_count += 1;
                    self.stats.bad_samples.fetch_add(1, Ordering::Relaxed);
                    if bad.kind == crate::read::TOO_LARGE {
                        self.stats.too_large.fetch_add(1, Ordering::Relaxed);
                    }
                    bad.report();
                    self.progress.update(|p| p.bad += 1);
                    if seen >= 200 && bad_count as f64 > self.cfg.max_bad_fraction * seen as f64 {
                        let max = self.cfg.max_bad_fraction;
                        let _ = self.tx.send_blocking(Err(LoaderError::TooManyBad { bad: bad_count, seen, max }));
                        return;
                    }
                    continue;
                }
                Ok(p) => p,
            };
            let k = batch.labels.len();
            let (vl, tl) = (p.view.len(), p.token.len());
            batch.views[k * vl..(k + 1) * vl].copy_from_slice(&p.view);
            batch.token_views[k * tl..(k + 1) * tl].copy_from_slice(&p.token);
            batch.masked.extend_from_slice(&p.masked);
            batch.visible.extend_from_slice(&p.visible);
            batch.labels.push(p.label);
            let Processed { view, token, key, .. } = *p;
            batch.keys.push(key);
            let _ = self.recycle_tx.try_send((view, token));
            self.stats.samples_done.fetch_add(1, Ordering::Relaxed);
            ::metrics::counter!(m::SAMPLES_DONE).increment(1);
            if batch.labels.len() < b {
                continue;
            }
            index += 1;
            // `>=`, not `==`: whatever the state resumed from, the epoch ends.
            let epoch_complete = self.per_epoch.is_some_and(|n| index >= n);
            let fingerprint = Some(self.fingerprint);
            batch.resume = if epoch_complete {
                LoaderState { epoch: epoch + 1, batch: 0, consumed: 0, replay: false, fingerprint }
            } else {
                LoaderState { epoch, batch: index, consumed: next_seq, replay: capped, fingerprint }
            };
            let full = std::mem::replace(&mut batch, self.new_batch(epoch, index));
            let rate = b as f64 / last.elapsed().as_secs_f64().max(1e-9);
            last = Instant::now();
            ::metrics::gauge!(m::IMAGES_PER_SECOND).set(rate);
            if self.tx.send_blocking(Ok(full)).is_err() || self.stop.load(Ordering::Relaxed) {
                return;
            }
            ::metrics::counter!(m::BATCHES_PUSHED).increment(1);
            ::metrics::gauge!(m::QUEUE_DEPTH).set(self.tx.len() as f64);
            if epoch_complete {
                if !self.finish_epoch(&mut epoch, &mut next_seq, &mut index, &mut capped) {
                    return;
                }
                batch = self.new_batch(epoch, index);
            }
        }
        if results.stranded() > 0 && !self.stop.load(Ordering::Relaxed) {
            let what = format!("{} processed samples were stranded: a worker thread died", results.stranded());
            let _ = self.tx.send_blocking(Err(LoaderError::Panicked { thread: "worker", what }));
        }
    }

    /// Moves to the next epoch; false when the configured epochs are done.
    fn finish_epoch(&self, epoch: &mut u64, next_seq: &mut u64, index: &mut u64, capped: &mut bool) -> bool {
        *epoch += 1;
        (*next_seq, *index, *capped) = (0, 0, false);
        let e = *epoch;
        self.progress.update(|p| (p.epoch, p.bad) = (e, 0));
        self.cfg.epochs.is_none_or(|n| e < n)
    }

    fn recycle(&self, r: Outcome) {
        if let Ok(p) = r {
            let Processed { view, token, .. } = *p;
            let _ = self.recycle_tx.try_send((view, token));
        }
    }
}
