//! The loader: shards -> batches on a fixed pool of threads, with bounded memory and exact resume.
//!
//! ```text
//!  reader thread                 worker threads (N)              assembler thread
//!  epoch shard shuffle    jobs   decode (zune-jpeg)      done    reorder by sequence number,
//!  rank split, tar read  -----> crop/flip/resize, mask  -----> skip bad samples, fill Batch,
//!  shuffle buffer,     bounded  (per-sample RNG)       bounded  send (bounded async-channel,
//!  sequence numbers                                             `prefetch` batches)
//! ```
//!
//! Determinism: the reader's output order depends only on (seed, epoch, rank) — shard order and
//! the shuffle buffer use seeded RNGs — and every random choice of a sample (flip, crop box,
//! mask) comes from an RNG seeded with (seed, epoch, shard, index in shard, pass). Workers may
//! finish in any order; the assembler puts samples back in sequence order. So the same seed gives
//! byte-identical batches whatever the number of workers.
//!
//! Epochs: with sample counts from a manifest, an epoch is exactly
//! `floor(total_samples / (world_size * batch_size))` batches on every rank (DDP runs must not
//! hang): a rank that runs out (fewer samples, bad samples) wraps around its shard list; the rest
//! of a longer list is left for later epochs. Without counts (plain paths or URLs, one rank), an
//! epoch ends with the data and the last partial batch is dropped.
//!
//! Resume: [`LoaderState`] = (epoch, batches done in it, sequence numbers consumed). Restoring
//! it replays that epoch's reader (tar parsing only, no decoding) up to the position, then goes
//! on: the batches are exactly those an uninterrupted run would have produced next.
//!
//! Memory bound (approximately): `shuffle_buffer` x mean encoded sample size, plus
//! `(prefetch + 2)` batches of `B x 3 x (S² + T²)` bytes, plus per worker one decoded image, plus
//! `4 x workers` samples in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::batch::{Batch, BufferPool};
use crate::http::{HttpConfig, HttpFetcher};
use crate::mask::MaskConfig;
use crate::metrics as m;
use crate::source::ShardSpec;
use crate::wds::ShardSample;
use assemble::Assembler;
use reader::Reader;
use worker::{report_panic, worker};

/// Everything that shapes the batches (serde: part of the trainer's run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Decode/augment threads; 0 = all cores.
    pub workers: usize,
    /// Ready batches kept ahead of the consumer.
    pub prefetch: usize,
    /// Samples held by the shuffle buffer (encoded bytes, ~110 KB each for ImageNet).
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// More bad samples than this fraction of those seen (after 200) is a fatal error.
    pub max_bad_fraction: f64,
    /// Stop after this many epochs; `None` = endless.
    pub epochs: Option<u64>,
    /// Failed shards (distinct) tolerated before the run stops with [`LoaderError::ShardsFailed`];
    /// `None` = 0 when every shard is local, 1 % of the shard count when some are remote.
    pub max_failed_shards: Option<u64>,
    /// Largest image accepted, in total pixels (width x height), checked from the header before
    /// anything is allocated; larger ones are bad samples of kind `too_large`.
    pub max_pixels: u64,
    /// Largest tar member read; larger ones are skipped while streaming (never held in memory)
    /// and their sample is a bad sample of kind `too_large`.
    pub max_member_bytes: u64,
    /// Whether every sample needs a `.cls` member. Pre-training never uses labels, so by
    /// default a sample without one is fine (label -1).
    pub labels: LabelPolicy,
    pub augment: AugmentConfig,
    pub mask: MaskConfig,
    pub http: HttpConfig,
}

/// `data.labels`: what a sample without a `.cls` member is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelPolicy {
    /// A bad sample of kind `missing_class`.
    Required,
    /// A sample with label -1.
    #[default]
    Optional,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            workers: 0,
            prefetch: 4,
            shuffle_buffer: 1000,
            seed: 0,
            rank: 0,
            world_size: 1,
            max_bad_fraction: 0.01,
            epochs: None,
            max_failed_shards: None,
            max_pixels: crate::decode::DEFAULT_MAX_PIXELS as u64,
            max_member_bytes: 64 << 20,
            labels: LabelPolicy::Optional,
            augment: AugmentConfig::default(),
            mask: MaskConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl LoaderConfig {
    /// Worker threads to use.
    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            self.workers
        }
    }
}

/// Where the loader is: resumes exactly after the batch it was taken from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    /// Batches already delivered in `epoch`.
    pub batch: u64,
    /// Shuffle-buffer outputs (samples, good or bad) already consumed in `epoch`.
    pub consumed: u64,
}

/// Errors the loader reports (through the batch stream or at construction).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoaderError {
    #[error("loader config: {0}")]
    Config(String),
    #[error("{bad} bad samples out of {seen} exceeds max_bad_fraction {max}")]
    TooManyBad { bad: u64, seen: u64, max: f64 },
    #[error("no readable samples in any shard of rank {rank} (epoch {epoch})")]
    NoData { rank: usize, epoch: u64 },
    #[error("i/o: {0}")]
    Io(String),
    /// Local shards listed (path, brace pattern or manifest) that do not exist: at start.
    #[error("{} listed shard(s) do not exist: {}", missing.len(), list_some(missing))]
    MissingShards { missing: Vec<String> },
    /// More shards failed (open error, broken tar, short against the manifest) than
    /// `max_failed_shards` allows: the run stops rather than train on a silent subset.
    #[error("{} shard(s) failed, more than max_failed_shards {max} (last: {last}): {}", failed.len(), list_some(failed))]
    ShardsFailed { failed: Vec<String>, max: u64, last: String },
    #[error("the loader's {thread} thread panicked (a bug, please report it): {what}")]
    Panicked { thread: &'static str, what: String },
}

/// Counters for reports (`pipeline bench`); the same numbers go to the metrics facade.
#[derive(Debug, Default)]
pub struct LoaderStats {
    pub samples_read: AtomicU64,
    pub bytes_read: AtomicU64,
    pub samples_done: AtomicU64,
    pub bad_samples: AtomicU64,
    /// Bad samples of kind `too_large` (over `max_pixels` or `max_member_bytes`).
    pub too_large: AtomicU64,
    pub shards_failed: AtomicU64,
    pub decode_ns: AtomicU64,
    pub augment_ns: AtomicU64,
    pub read_ns: AtomicU64,
    /// Image rows decoded (decoding stops below the crop box) and rows in those images.
    pub decoded_rows: AtomicU64,
    pub image_rows: AtomicU64,
}

/// A running loader. Dropping it stops its threads.
pub struct Loader {
    rx: async_channel::Receiver<Result<Batch, LoaderError>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<LoaderStats>,
    batches_per_epoch: Option<u64>,
}

/// A sample on its way from the reader to a worker.
struct Job {
    epoch: u64,
    seq: u64,
    shard: u32,
    index: u64,
    pass: u32,
    shard_name: Arc<str>,
    /// The sample, or the error kind (`format`, `too_large`) and message of a broken one.
    sample: Result<ShardSample, (&'static str, String)>,
}

enum Work {
    Sample(Box<Job>),
    /// Unknown-length epochs: `total` sequence numbers were issued for `epoch`.
    EndOfEpoch {
        epoch: u64,
        total: u64,
    },
}

/// A worker's result.
#[derive(Debug)]
struct Processed {
    view: Vec<u8>,
    token: Vec<u8>,
    masked: Vec<u32>,
    visible: Vec<u32>,
    label: i64,
    key: String,
}

#[derive(Debug)]
struct Bad {
    kind: &'static str,
    shard: Arc<str>,
    key: String,
    reason: String,
}

/// What a worker made of a sample.
type Outcome = Result<Box<Processed>, Box<Bad>>;

enum Done {
    Sample { epoch: u64, seq: u64, result: Outcome },
    EndOfEpoch { epoch: u64, total: u64 },
}

/// The first names of a list, and how many more, for error messages.
fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// SplitMix64 over several words: independent seeds for (seed, epoch, shard, index, ...).
fn mix(words: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &w in words {
        let mut z = h ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// Error kind of a sample over `max_pixels` or with a member over `max_member_bytes`.
const TOO_LARGE: &str = "too_large";

const SHARD_SALT: u64 = 0x5AAD;
const BUFFER_SALT: u64 = 0xB0FF;

/// The shards of `rank` in `epoch`, in reading order.
pub fn epoch_shards(num_shards: usize, seed: u64, epoch: u64, rank: usize, world_size: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..num_shards).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, SHARD_SALT])));
    order.into_iter().skip(rank).step_by(world_size.max(1)).collect()
}

/// Batches per epoch on every rank, when every shard's sample count is known.
pub fn batches_per_epoch(shards: &[ShardSpec], batch_size: usize, world_size: usize) -> Option<u64> {
    let total: u64 = shards.iter().map(|s| s.samples).sum::<Option<u64>>()?;
    Some(total / (world_size.max(1) as u64 * batch_size.max(1) as u64))
}

impl Loader {
    /// Starts the threads. `start` is where to begin (use `LoaderState::default()` for a fresh
    /// run, or a saved [`Batch::resume`]).
    pub fn new(cfg: LoaderConfig, shards: Vec<ShardSpec>, start: LoaderState) -> Result<Loader, LoaderError> {
        let bad = |m: String| Err(LoaderError::Config(m));
        if cfg.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return bad(format!("rank {} is not in 0..world_size {}", cfg.rank, cfg.world_size));
        }
        if shards.is_empty() {
            return bad("no shards".into());
        }
        if shards.len() < cfg.world_size {
            return bad(format!("{} shards cannot feed {} ranks", shards.len(), cfg.world_size));
        }
        cfg.mask.validate().map_err(|e| LoaderError::Config(e.to_string()))?;
        cfg.augment.validate().map_err(|e| LoaderError::Config(e.to_string()))?;
        if cfg.max_pixels == 0 || cfg.max_member_bytes == 0 {
            return bad("max_pixels and max_member_bytes must be at least 1".into());
        }
        let patch = cfg.augment.view_size / cfg.mask.grid.max(1);
        if patch * cfg.mask.grid != cfg.augment.view_size {
            return bad(format!(
                "view_size {} is not a multiple of the mask grid {}",
                cfg.augment.view_size, cfg.mask.grid
            ));
        }
        let per_epoch = batches_per_epoch(&shards, cfg.batch_size, cfg.world_size);
        if per_epoch.is_none() && cfg.world_size > 1 {
            return bad("world_size > 1 needs shard sample counts: pass a shard directory with manifest.json".into());
        }
        if per_epoch == Some(0) {
            return bad(format!(
                "fewer samples than world_size x batch_size ({} x {})",
                cfg.world_size, cfg.batch_size
            ));
        }
        let missing: Vec<String> = shards
            .iter()
            .filter(|s| !s.is_http() && !std::path::Path::new(&s.url).is_file())
            .map(|s| s.url.clone())
            .collect();
        if !missing.is_empty() {
            return Err(LoaderError::MissingShards { missing });
        }
        let max_failed_shards = cfg.max_failed_shards.unwrap_or(if shards.iter().any(ShardSpec::is_http) {
            shards.len() as u64 / 100
        } else {
            0
        });
        m::describe();
        let http = if shards.iter().any(ShardSpec::is_http) {
            Some(HttpFetcher::new(&cfg.http).map_err(|e| LoaderError::Io(e.to_string()))?)
        } else {
            None
        };
        let workers = cfg.worker_count();
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Work>(workers * 2);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(workers * 2);
        let (recycle_tx, recycle_rx) = crossbeam_channel::bounded::<(Vec<u8>, Vec<u8>)>(workers * 4 + 8);
        let (tx, rx) = async_channel::bounded::<Result<Batch, LoaderError>>(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch_done = Arc::new(AtomicU64::new(start.epoch));
        let stats = Arc::new(LoaderStats::default());
        let cfg = Arc::new(cfg);
        let shards: Arc<[ShardSpec]> = shards.into();
        let mut threads = Vec::new();

        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map_err(|e| LoaderError::Io(e.to_string()))
        };
        {
            let reader = Reader {
                cfg: cfg.clone(),
                shards: shards.clone(),
                http,
                job_tx,
                err_tx: tx.clone(),
                stop: stop.clone(),
                epoch_done: epoch_done.clone(),
                stats: stats.clone(),
                known_length: per_epoch.is_some(),
                failed: Default::default(),
                max_failed_shards,
            };
            // The reader may sit in a blocking read when the loader is dropped: not joined.
            let out = reader.err_tx.clone();
            spawn("cae-reader".into(), Box::new(move || report_panic("reader", &out, || reader.run(start))))?;
        }
        for w in 0..workers {
            let (cfg, job_rx, done_tx, recycle_rx, stats, stop) =
                (cfg.clone(), job_rx.clone(), done_tx.clone(), recycle_rx.clone(), stats.clone(), stop.clone());
            threads.push(spawn(
                format!("cae-worker-{w}"),
                Box::new(move || worker(&cfg, job_rx, done_tx, recycle_rx, &stats, &stop)),
            )?);
        }
        drop(done_tx);
        {
            let asm = Assembler {
                cfg: cfg.clone(),
                pool: BufferPool::new(cfg.prefetch + 2),
                recycle_tx,
                tx,
                epoch_done,
                stop: stop.clone(),
                stats: stats.clone(),
                per_epoch,
            };
            let out = asm.tx.clone();
            let run = move || report_panic("assembler", &out, || asm.run(done_rx, start));
            threads.push(spawn("cae-assembler".into(), Box::new(run))?);
        }
        Ok(Loader { rx, stop, threads, stats, batches_per_epoch: per_epoch })
    }

    /// The next batch, blocking; `None` when the configured epochs are done.
    pub fn next_blocking(&self) -> Option<Result<Batch, LoaderError>> {
        let b = self.rx.recv_blocking().ok()?;
        ::metrics::counter!(m::BATCHES_POPPED).increment(1);
        Some(b)
    }

    /// The next batch (async); `None` when the configured epochs are done.
    pub async fn next(&self) -> Option<Result<Batch, LoaderError>> {
        let b = self.rx.recv().await.ok()?;
        ::metrics::counter!(m::BATCHES_POPPED).increment(1);
        Some(b)
    }

    /// Batches ready in the prefetch queue right now.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Batches per epoch on every rank (known when the shards came with a manifest).
    pub fn batches_per_epoch(&self) -> Option<u64> {
        self.batches_per_epoch
    }

    pub fn stats(&self) -> &LoaderStats {
        &self.stats
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.rx.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

mod assemble;
mod reader;
mod worker;

pub(crate) use reader::open_shard;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_split_covers_every_shard_once_per_epoch() {
        for world in 1..5 {
            let mut all: Vec<usize> = (0..world).flat_map(|r| epoch_shards(13, 7, 2, r, world)).collect();
            all.sort();
            assert_eq!(all, (0..13).collect::<Vec<_>>());
        }
        assert_ne!(epoch_shards(13, 7, 0, 0, 1), epoch_shards(13, 7, 1, 0, 1), "epochs reshuffle");
        assert_eq!(epoch_shards(13, 7, 1, 0, 1), epoch_shards(13, 7, 1, 0, 1));
    }

    #[test]
    fn epoch_length_from_counts() {
        let s = |n| ShardSpec { url: "x".into(), samples: Some(n) };
        assert_eq!(batches_per_epoch(&[s(100), s(100), s(57)], 16, 2), Some(257 / 32));
        assert_eq!(batches_per_epoch(&[s(1), ShardSpec { url: "y".into(), samples: None }], 1, 1), None);
    }
}
