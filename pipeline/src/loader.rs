//! The loader: shards -> batches on a fixed pool of threads, with bounded memory and exact resume.
//!
//! ```text
//!  reader thread               ordered map: worker threads (N)     assembler thread
//!  epoch shard order,   submit  decode (zune-jpeg)         recv     results in order,
//!  rank split, tar read -------> crop/flip/resize, mask   -------> skip bad samples, fill Batch,
//!  shuffle buffer       window of K (per-sample RNG)                send (bounded async-channel,
//!                                                                   `prefetch` batches)
//! ```
//!
//! The reading itself — opening a shard (file or HTTP), the member cap, the sample policy
//! (labels, image member by content, pixel cap) and the failed-shard policy — is
//! [`crate::read`]'s, shared with the eval reader; [`LoaderConfig::read_config`] gives its
//! settings. The loader adds the order (epochs, ranks, shuffle buffer, resume) and the two views.
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
//! Ranks: each epoch the shards are shuffled (seeded) and dealt greedily by sample count (each
//! goes to the rank with the fewest samples so far), so ranks differ by at most one shard.
//!
//! Resume: [`LoaderState`] = (epoch, batches done in it, stream outputs consumed) plus a
//! fingerprint of what it refers to (shard names and counts, the data config): a state saved
//! with other shards or another config is refused ([`LoaderError::ResumeMismatch`]); a state
//! without one (older checkpoints) is accepted with a warning. With the manifest's counts the
//! position is computed, not replayed: only the shards whose samples are still in the shuffle
//! buffer, and the one being read, are read again — at most `shuffle_buffer /
//! samples_per_shard + 2` per rank ([`reader`] and [`stream`]). Without counts (or when the
//! byte cap shaped the order) the epoch's reading is replayed up to the position (tar parsing
//! only). Either way the batches are exactly those an uninterrupted run would have produced.
//!
//! Memory bound: the shuffle buffer (`shuffle_buffer` samples and `shuffle_buffer_bytes`, only
//! the image and `.cls` members kept; at an epoch boundary the next epoch's buffer fills while
//! a few samples of the ending one wait in reserve), plus at most `K = 8 x workers` samples
//! decoded (or decoding) and not yet in a batch, whatever is slow (the ordered map's window),
//! plus `K` encoded samples queued for the workers, plus per worker one decoded image (shrunk
//! back after an outlier), plus `(prefetch + 2)` batches of `B x 3 x (S² + T²)` bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::bad_sample::BadSample;
use crate::batch::{Batch, BufferPool};
use crate::http::HttpConfig;
use crate::mask::MaskConfig;
use crate::metrics as m;
use crate::ordered_map::{self, MapConfig, MapCounters};
use crate::read::{BrokenSample, ReadConfig, ShardFailures, TooManyFailed};
use crate::source::ShardSpec;
use crate::wds::ShardSample;
use assemble::{Assembler, Progress};
use reader::Reader;
use worker::{WorkerCtx, report_panic};

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
    /// Bytes held by the shuffle buffer at most (image and `.cls` members only); when more
    /// would be held, samples leave early.
    pub shuffle_buffer_bytes: u64,
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

pub use crate::batch::LoaderState;
pub use crate::read::LabelPolicy;

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            workers: 0,
            prefetch: 4,
            shuffle_buffer: 1000,
            shuffle_buffer_bytes: DEFAULT_SHUFFLE_BUFFER_BYTES,
            seed: 0,
            rank: 0,
            world_size: 1,
            max_bad_fraction: 0.01,
            epochs: None,
            max_failed_shards: None,
            max_pixels: ReadConfig::default().max_pixels,
            max_member_bytes: ReadConfig::default().max_member_bytes,
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

    /// The reading settings (caps, labels, failed-shard policy, HTTP) the eval reader shares.
    pub fn read_config(&self) -> ReadConfig {
        ReadConfig {
            max_pixels: self.max_pixels,
            max_member_bytes: self.max_member_bytes,
            labels: self.labels,
            max_failed_shards: self.max_failed_shards,
            http: self.http.clone(),
        }
    }
}

/// Default `shuffle_buffer_bytes`: 1 GiB (ImageNet's 1000 samples hold about 110 MB).
pub const DEFAULT_SHUFFLE_BUFFER_BYTES: u64 = 1 << 30;

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
    /// The saved state refers to other shards or another data config.
    #[error(
        "the saved loader state does not fit this run: it was saved with another shard list, other sample counts \
         or another data config (fingerprint {saved:016x}, this run {current:016x}); resume with the same shards \
         and data settings, or start a new run"
    )]
    ResumeMismatch { saved: u64, current: u64 },
    #[error("the loader's {thread} thread panicked (a bug, please report it): {what}")]
    Panicked { thread: &'static str, what: String },
}

impl From<TooManyFailed> for LoaderError {
    fn from(e: TooManyFailed) -> Self {
        LoaderError::ShardsFailed { failed: e.failed, max: e.max, last: e.last }
    }
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
    /// Shards opened.
    pub shards_opened: AtomicU64,
    /// Shards read to rebuild a saved position (on resume; rarely in an epoch's tail): with the
    /// manifest's counts only those still in the shuffle buffer and the one being read.
    pub resume_shards_read: AtomicU64,
    pub decode_ns: AtomicU64,
    pub augment_ns: AtomicU64,
    pub read_ns: AtomicU64,
    /// Image rows decoded (decoding stops below the crop box) and rows in those images.
    pub decoded_rows: AtomicU64,
    pub image_rows: AtomicU64,
    /// The ordered map's counters (in flight, peaks); set when the loader starts.
    pub map: std::sync::OnceLock<Arc<MapCounters>>,
}

/// A running loader. Dropping it stops its threads.
pub struct Loader {
    rx: async_channel::Receiver<Result<Batch, LoaderError>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<LoaderStats>,
    batches_per_epoch: Option<u64>,
    in_flight_bound: usize,
}

/// A sample on its way from the reader to a worker.
struct Job {
    epoch: u64,
    shard: u32,
    index: u64,
    pass: u32,
    shard_name: Arc<str>,
    /// The sample, or a broken one (kind `format`, `too_large`).
    sample: Result<ShardSample, BrokenSample>,
    /// The shuffle buffer's byte cap had shaped the epoch's order when this sample left it.
    capped: bool,
}

enum Work {
    Sample(Box<Job>),
    /// Unknown-length epochs: every sample of `epoch` was submitted before this.
    EndOfEpoch {
        epoch: u64,
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

/// What a worker made of a sample.
type Outcome = Result<Box<Processed>, Box<BadSample>>;

enum Done {
    Sample { epoch: u64, capped: bool, result: Outcome },
    EndOfEpoch { epoch: u64 },
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

pub(super) const SHARD_SALT: u64 = 0x5AAD;
const BUFFER_SALT: u64 = 0xB0FF;

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
        let read = cfg.read_config();
        read.validate().map_err(LoaderError::Config)?;
        if cfg.shuffle_buffer_bytes == 0 {
            return bad("shuffle_buffer_bytes must be at least 1".into());
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
            return bad("world_size > 1 needs shard sample counts: pass a manifest.json (a shard directory holding one, or its http(s) URL)".into());
        }
        if per_epoch == Some(0) {
            return bad(format!(
                "fewer samples than world_size x batch_size ({} x {})",
                cfg.world_size, cfg.batch_size
            ));
        }
        let missing = crate::read::missing_shards(&shards);
        if !missing.is_empty() {
            return Err(LoaderError::MissingShards { missing });
        }
        let fingerprint = data_fingerprint(&cfg, &shards);
        match start.fingerprint {
            Some(saved) if saved != fingerprint => {
                return Err(LoaderError::ResumeMismatch { saved, current: fingerprint });
            }
            None if start != LoaderState::default() => tracing::warn!(
                "the saved loader state has no fingerprint (saved by an older version): it cannot be checked \
                 against this run's shards and data config; resuming as if they were the same"
            ),
            _ => {}
        }
        if let Some(n) = per_epoch
            && start.batch >= n
        {
            return bad(format!("the saved loader state is at batch {} of an epoch of {n} batches", start.batch));
        }
        let failures = ShardFailures::new(read.max_failed_for(&shards));
        m::describe();
        let http = read.fetcher(&shards).map_err(|e| LoaderError::Io(e.to_string()))?;
        let workers = cfg.worker_count();
        let bound = ordered_map::bound_for(workers);
        let (recycle_tx, recycle_rx) = crossbeam_channel::bounded::<(Vec<u8>, Vec<u8>)>(bound + 8);
        let (tx, rx) = async_channel::bounded::<Result<Batch, LoaderError>>(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::new(start.epoch));
        let stats = Arc::new(LoaderStats::default());
        let cfg = Arc::new(cfg);
        let shards: Arc<[ShardSpec]> = shards.into();
        let mut threads = Vec::new();
        let io = |e: std::io::Error| LoaderError::Io(e.to_string());

        let (submit, results) = {
            let (c, st) = (cfg.clone(), stats.clone());
            let map = MapConfig { workers, bound, name: "cae-worker".into() };
            ordered_map::start_threads(
                &map,
                move || (WorkerCtx::new(&c), c.clone(), recycle_rx.clone(), st.clone()),
                |(ctx, cfg, recycle, stats), work: &Work| worker::work(cfg, work, ctx, recycle, stats),
                |work, what| match work {
                    Work::Sample(job) => {
                        let key = job.sample.as_ref().map_or_else(|b| b.key.clone(), |s| s.key.clone());
                        let bad = BadSample::panicked(job.shard_name.clone(), key, &what);
                        Done::Sample { epoch: job.epoch, capped: job.capped, result: Err(Box::new(bad)) }
                    }
                    Work::EndOfEpoch { epoch } => Done::EndOfEpoch { epoch: *epoch },
                },
                &mut threads,
            )
            .map_err(io)?
        };
        let _ = stats.map.set(submit.counters().clone());
        {
            let reader = Reader {
                cfg: cfg.clone(),
                read,
                shards: shards.clone(),
                http,
                err_tx: tx.clone(),
                stop: stop.clone(),
                progress: progress.clone(),
                stats: stats.clone(),
                per_epoch,
                bound,
                failures: failures.into(),
            };
            // The reader may sit in a blocking read when the loader is dropped: not joined.
            let out = reader.err_tx.clone();
            let run = move || report_panic("reader", &out, || reader.run(submit, start));
            std::thread::Builder::new().name("cae-reader".into()).spawn(run).map_err(io)?;
        }
        {
            let asm = Assembler {
                cfg: cfg.clone(),
                pool: BufferPool::new(cfg.prefetch + 2),
                recycle_tx,
                tx,
                progress,
                stop: stop.clone(),
                stats: stats.clone(),
                per_epoch,
                fingerprint,
            };
            let out = asm.tx.clone();
            let run = move || report_panic("assembler", &out, || asm.run(results, start));
            threads.push(std::thread::Builder::new().name("cae-assembler".into()).spawn(run).map_err(io)?);
        }
        Ok(Loader { rx, stop, threads, stats, batches_per_epoch: per_epoch, in_flight_bound: bound })
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

    /// `K`: samples decoded (or decoding) and not yet in a batch, at most (`8 x workers`).
    pub fn in_flight_bound(&self) -> usize {
        self.in_flight_bound
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
mod shard_plan;
mod stream;
mod worker;

pub use shard_plan::{batches_per_epoch, data_fingerprint, epoch_shards};
