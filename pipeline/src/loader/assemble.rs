//! The assembler thread: puts samples back in sequence order, skips bad ones, fills batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::{Done, LoaderConfig, LoaderError, LoaderState, LoaderStats, Outcome, Processed};
use crate::batch::{Batch, BufferPool};
use crate::metrics as m;

pub(super) struct Assembler {
    pub(super) cfg: Arc<LoaderConfig>,
    pub(super) pool: BufferPool,
    pub(super) recycle_tx: crossbeam_channel::Sender<(Vec<u8>, Vec<u8>)>,
    pub(super) tx: async_channel::Sender<Result<Batch, LoaderError>>,
    pub(super) epoch_done: Arc<AtomicU64>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stats: Arc<LoaderStats>,
    pub(super) per_epoch: Option<u64>,
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

    pub(super) fn run(self, done: crossbeam_channel::Receiver<Done>, start: LoaderState) {
        let b = self.cfg.batch_size;
        let (mut epoch, mut next_seq, mut index) = (start.epoch, start.consumed, start.batch);
        let mut batch = self.new_batch(epoch, index);
        let mut pending: BTreeMap<(u64, u64), Outcome> = BTreeMap::new();
        let mut ends: HashMap<u64, u64> = HashMap::new();
        let (mut seen, mut bad_count) = (0u64, 0u64);
        let mut last = Instant::now();
        for d in done.iter() {
            match d {
                Done::Sample { epoch: e, seq, result } => {
                    if e < epoch {
                        self.recycle(result); // stale: a wrap-around sample of a finished epoch
                        continue;
                    }
                    pending.insert((e, seq), result);
                }
                Done::EndOfEpoch { epoch: e, total } => {
                    ends.insert(e, total);
                }
            }
            loop {
                if ends.get(&epoch) == Some(&next_seq) {
                    // Unknown-length epoch exhausted: the partial batch is dropped (drop_last).
                    ends.remove(&epoch);
                    if !self.finish_epoch(&mut epoch, &mut next_seq, &mut index, &mut pending) {
                        return;
                    }
                    batch = self.new_batch(epoch, index);
                    continue;
                }
                let Some(result) = pending.remove(&(epoch, next_seq)) else { break };
                next_seq += 1;
                seen += 1;
                match result {
                    Err(bad) => {
                        bad_count += 1;
                        self.stats.bad_samples.fetch_add(1, Ordering::Relaxed);
                        if bad.kind == super::TOO_LARGE {
                            self.stats.too_large.fetch_add(1, Ordering::Relaxed);
                        }
                        ::metrics::counter!(m::ERRORS, "kind" => bad.kind).increment(1);
                        tracing::warn!(
                            "skipping sample {} of shard {}: {}",
                            bad.key,
                            crate::redact::url(&bad.shard),
                            bad.reason
                        );
                        if seen >= 200 && bad_count as f64 > self.cfg.max_bad_fraction * seen as f64 {
                            let max = self.cfg.max_bad_fraction;
                            let _ = self.tx.send_blocking(Err(LoaderError::TooManyBad { bad: bad_count, seen, max }));
                            return;
                        }
                    }
                    Ok(p) => {
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
                        if batch.labels.len() == b {
                            index += 1;
                            let epoch_complete = self.per_epoch == Some(index);
                            batch.resume = if epoch_complete {
                                LoaderState { epoch: epoch + 1, batch: 0, consumed: 0 }
                            } else {
                                LoaderState { epoch, batch: index, consumed: next_seq }
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
                                if !self.finish_epoch(&mut epoch, &mut next_seq, &mut index, &mut pending) {
                                    return;
                                }
                                batch = self.new_batch(epoch, index);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Moves to the next epoch; false when the configured epochs are done.
    fn finish_epoch(
        &self,
        epoch: &mut u64,
        next_seq: &mut u64,
        index: &mut u64,
        pending: &mut BTreeMap<(u64, u64), Outcome>,
    ) -> bool {
        *epoch += 1;
        *next_seq = 0;
        *index = 0;
        self.epoch_done.store(*epoch, Ordering::SeqCst);
        let stale: Vec<(u64, u64)> = pending.range(..(*epoch, 0)).map(|(k, _)| *k).collect();
        for k in stale {
            if let Some(r) = pending.remove(&k) {
                self.recycle(r);
            }
        }
        self.cfg.epochs.is_none_or(|n| *epoch < n)
    }

    fn recycle(&self, r: Outcome) {
        if let Ok(p) = r {
            let Processed { view, token, .. } = *p;
            let _ = self.recycle_tx.try_send((view, token));
        }
    }
}
