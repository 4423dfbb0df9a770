//! The reader thread: per-epoch shard order, tar reading, the shuffle buffer, sequence numbers.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    BUFFER_SALT, Job, LoaderConfig, LoaderError, LoaderState, LoaderStats, TOO_LARGE, Work, epoch_shards, mix,
};
use crate::batch::Batch;
use crate::http::HttpFetcher;
use crate::metrics as m;
use crate::source::ShardSpec;
use crate::wds::{SampleReader, WdsError};

pub(super) struct Reader {
    pub(super) cfg: Arc<LoaderConfig>,
    pub(super) shards: Arc<[ShardSpec]>,
    pub(super) http: Option<HttpFetcher>,
    pub(super) job_tx: crossbeam_channel::Sender<Work>,
    pub(super) err_tx: async_channel::Sender<Result<Batch, LoaderError>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) epoch_done: Arc<AtomicU64>,
    pub(super) stats: Arc<LoaderStats>,
    pub(super) known_length: bool,
    /// Failed shards (distinct URLs) so far, and how many are tolerated.
    pub(super) failed: RefCell<BTreeSet<String>>,
    pub(super) max_failed_shards: u64,
}

/// Why the reader stops reading the current epoch.
enum Halt {
    /// The loader is shutting down.
    Stop,
    /// The assembler finished this epoch.
    EpochDone,
}

#[allow(clippy::vec_box)] // jobs are moved in and out; boxing keeps the moves pointer-sized
struct ShuffleBuffer {
    items: Vec<Box<Job>>,
    cap: usize,
    rng: ChaCha8Rng,
}

impl ShuffleBuffer {
    fn push(&mut self, job: Box<Job>) -> Option<Box<Job>> {
        if self.items.len() < self.cap {
            self.items.push(job);
            return None;
        }
        let j = self.rng.random_range(0..self.items.len());
        Some(std::mem::replace(&mut self.items[j], job))
    }
    fn pop(&mut self) -> Option<Box<Job>> {
        if self.items.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.items.len());
        Some(self.items.swap_remove(j))
    }
}

impl Reader {
    pub(super) fn run(self, start: LoaderState) {
        let mut epoch = start.epoch;
        loop {
            if self.cfg.epochs.is_some_and(|n| epoch >= n) {
                return;
            }
            let skip = if epoch == start.epoch { start.consumed } else { 0 };
            match self.read_epoch(epoch, skip) {
                Ok(()) => {}
                Err(Halt::Stop) => return,
                Err(Halt::EpochDone) => {}
            }
            epoch += 1;
        }
    }

    fn halted(&self, epoch: u64) -> Option<Halt> {
        if self.stop.load(Ordering::Relaxed) {
            return Some(Halt::Stop);
        }
        (self.known_length && self.epoch_done.load(Ordering::Relaxed) > epoch).then_some(Halt::EpochDone)
    }

    /// Emits the epoch's shuffled stream; sequence numbers below `skip` are consumed silently.
    fn read_epoch(&self, epoch: u64, skip: u64) -> Result<(), Halt> {
        let cfg = &self.cfg;
        let list = epoch_shards(self.shards.len(), cfg.seed, epoch, cfg.rank, cfg.world_size);
        let mut buffer = ShuffleBuffer {
            items: Vec::with_capacity(cfg.shuffle_buffer.max(1)),
            cap: cfg.shuffle_buffer.max(1),
            rng: ChaCha8Rng::seed_from_u64(mix(&[cfg.seed, epoch, cfg.rank as u64, BUFFER_SALT])),
        };
        let mut seq = 0u64;
        let emit = |job: Box<Job>, seq: &mut u64| -> Result<(), Halt> {
            let mut job = job;
            job.seq = *seq;
            *seq += 1;
            if job.seq < skip {
                return Ok(());
            }
            self.job_tx.send(Work::Sample(job)).map_err(|_| Halt::Stop)
        };
        let mut pass = 0u32;
        loop {
            let mut read_this_pass = 0u64;
            // Downloads start one shard ahead so the network overlaps parsing.
            let mut next_reader = list.first().map(|&s| self.open(s));
            for (k, &shard) in list.iter().enumerate() {
                if let Some(h) = self.halted(epoch) {
                    return Err(h);
                }
                let opened = next_reader.take().unwrap_or_else(|| self.open(shard));
                if let Some(&next) = list.get(k + 1)
                    && self.shards[next].is_http()
                {
                    next_reader = Some(self.open(next));
                }
                let spec = &self.shards[shard];
                let name: Arc<str> = spec.name().into();
                let reader = match opened {
                    Ok(r) => r,
                    Err(e) => {
                        self.shard_failed(spec, format!("cannot open: {e}"))?;
                        continue;
                    }
                };
                let (mut in_shard, mut broken) = (0u64, false);
                ::metrics::counter!(m::SHARDS_OPENED).increment(1);
                let mut t = Instant::now();
                for (index, sample) in SampleReader::with_max_member(reader, cfg.max_member_bytes).enumerate() {
                    if let Some(h) = self.halted(epoch) {
                        return Err(h);
                    }
                    let sample = match sample {
                        Ok(s) => Ok(s),
                        Err(WdsError::Tar { after_sample, message }) => {
                            ::metrics::counter!(m::ERRORS, "kind" => "tar").increment(1);
                            broken = true;
                            self.shard_failed(
                                spec,
                                format!("{message} after sample {after_sample}; rest of shard skipped"),
                            )?;
                            break;
                        }
                        Err(e @ WdsError::MemberTooLarge { .. }) => Err((TOO_LARGE, e.to_string())),
                        Err(e) => Err(("format", e.to_string())),
                    };
                    let bytes: u64 = sample.as_ref().map_or(0, |s| s.fields.iter().map(|(_, b)| b.len() as u64).sum());
                    self.stats.samples_read.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                    self.stats.read_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    ::metrics::counter!(m::SAMPLES_READ).increment(1);
                    ::metrics::counter!(m::BYTES_READ).increment(bytes);
                    read_this_pass += 1;
                    in_shard += 1;
                    let job = Box::new(Job {
                        epoch,
                        seq: 0,
                        shard: shard as u32,
                        index: index as u64,
                        pass,
                        shard_name: name.clone(),
                        sample,
                    });
                    if let Some(out) = buffer.push(job) {
                        emit(out, &mut seq)?;
                    }
                    t = Instant::now();
                }
                if let Some(n) = spec.samples
                    && !broken
                    && in_shard != n
                {
                    self.shard_failed(spec, format!("{in_shard} samples read, the manifest says {n} (short shard)"))?;
                }
            }
            if read_this_pass == 0 {
                let _ = self.err_tx.send_blocking(Err(LoaderError::NoData { rank: cfg.rank, epoch }));
                return Err(Halt::Stop);
            }
            // Drain the shuffle buffer at the end of every pass, so that every sample of the
            // pass is emitted before any sample of the next one: an epoch sees each sample of
            // its shard list once before a wrap-around repeats any.
            while let Some(out) = buffer.pop() {
                if let Some(h) = self.halted(epoch) {
                    return Err(h);
                }
                emit(out, &mut seq)?;
            }
            if !self.known_length {
                break;
            }
            // Known epoch length: keep going (wrap around) until the assembler has its batches.
            pass += 1;
        }
        self.job_tx.send(Work::EndOfEpoch { epoch, total: seq }).map_err(|_| Halt::Stop)
    }

    /// Counts a failed shard (open error, broken tar, fewer samples than its manifest says) and
    /// stops the run once more distinct shards have failed than `max_failed_shards` allows.
    fn shard_failed(&self, spec: &ShardSpec, reason: String) -> Result<(), Halt> {
        let reason = crate::redact::text(&reason);
        tracing::warn!("shard {}: {reason}", crate::redact::url(&spec.url));
        self.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(m::SHARDS_FAILED).increment(1);
        let mut failed = self.failed.borrow_mut();
        failed.insert(spec.url.clone());
        if failed.len() as u64 > self.max_failed_shards {
            let failed: Vec<String> = failed.iter().map(|u| crate::redact::url(u)).collect();
            let e = LoaderError::ShardsFailed { failed, max: self.max_failed_shards, last: reason };
            let _ = self.err_tx.send_blocking(Err(e));
            return Err(Halt::Stop);
        }
        Ok(())
    }

    fn open(&self, shard: usize) -> Result<Box<dyn Read + Send>, String> {
        open_shard(&self.shards[shard], self.http.as_ref())
    }
}

/// Opens a shard for streaming: a buffered file, or an HTTP stream with retries.
pub(crate) fn open_shard(spec: &ShardSpec, http: Option<&HttpFetcher>) -> Result<Box<dyn Read + Send>, String> {
    if spec.is_http() {
        let fetcher = http.ok_or("no HTTP client")?;
        Ok(Box::new(fetcher.open(&spec.url)))
    } else {
        let f = File::open(&spec.url).map_err(|e| e.to_string())?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
    }
}
