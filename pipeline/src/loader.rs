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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::{AugmentConfig, TwoViewParams, TwoViewResizer};
use crate::batch::{Batch, BufferPool};
use crate::decode::{self, RgbImage};
use crate::http::{HttpConfig, HttpFetcher};
use crate::mask::{self, MaskConfig};
use crate::metrics as m;
use crate::source::ShardSpec;
use crate::wds::{CLASS_EXT, IMAGE_EXT, SampleReader, ShardSample, WdsError};

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
    pub augment: AugmentConfig,
    pub mask: MaskConfig,
    pub http: HttpConfig,
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
    sample: Result<ShardSample, String>,
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
struct Processed {
    view: Vec<u8>,
    token: Vec<u8>,
    masked: Vec<u32>,
    visible: Vec<u32>,
    label: i64,
    key: String,
}

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

struct Reader {
    cfg: Arc<LoaderConfig>,
    shards: Arc<[ShardSpec]>,
    http: Option<HttpFetcher>,
    job_tx: crossbeam_channel::Sender<Work>,
    err_tx: async_channel::Sender<Result<Batch, LoaderError>>,
    stop: Arc<AtomicBool>,
    epoch_done: Arc<AtomicU64>,
    stats: Arc<LoaderStats>,
    known_length: bool,
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
    fn run(self, start: LoaderState) {
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
                        tracing::warn!(
                            "{}",
                            crate::redact::text(&format!("shard {}: cannot open: {e}; skipped", spec.url))
                        );
                        self.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                        ::metrics::counter!(m::SHARDS_FAILED).increment(1);
                        continue;
                    }
                };
                ::metrics::counter!(m::SHARDS_OPENED).increment(1);
                let mut t = Instant::now();
                for (index, sample) in SampleReader::new(reader).enumerate() {
                    if let Some(h) = self.halted(epoch) {
                        return Err(h);
                    }
                    let sample = match sample {
                        Ok(s) => Ok(s),
                        Err(WdsError::Tar { after_sample, message }) => {
                            tracing::warn!(
                                "{}",
                                crate::redact::text(&format!(
                                    "shard {}: {message} after sample {after_sample}; rest of shard skipped",
                                    spec.url
                                ))
                            );
                            self.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                            ::metrics::counter!(m::SHARDS_FAILED).increment(1);
                            ::metrics::counter!(m::ERRORS, "kind" => "tar").increment(1);
                            break;
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let bytes: u64 = sample.as_ref().map_or(0, |s| s.fields.iter().map(|(_, b)| b.len() as u64).sum());
                    self.stats.samples_read.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                    self.stats.read_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    ::metrics::counter!(m::SAMPLES_READ).increment(1);
                    ::metrics::counter!(m::BYTES_READ).increment(bytes);
                    read_this_pass += 1;
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

struct WorkerCtx {
    img: RgbImage,
    resizer: TwoViewResizer,
}

fn worker(
    cfg: &LoaderConfig,
    jobs: crossbeam_channel::Receiver<Work>,
    done: crossbeam_channel::Sender<Done>,
    recycle: crossbeam_channel::Receiver<(Vec<u8>, Vec<u8>)>,
    stats: &LoaderStats,
    stop: &AtomicBool,
) {
    let mut ctx = WorkerCtx { img: RgbImage::default(), resizer: TwoViewResizer::new(&cfg.augment) };
    loop {
        // Poll the stop flag now and then: the reader may be stuck in a slow read at shutdown.
        let work = match jobs.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(w) => w,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
            Err(_) => return,
        };
        let out = match work {
            Work::EndOfEpoch { epoch, total } => Done::EndOfEpoch { epoch, total },
            Work::Sample(job) => {
                let result = contain_panic(&job, || process(cfg, &job, &mut ctx, &recycle, stats));
                if result.as_ref().is_err_and(|b| b.kind == PANIC_KIND) {
                    // A panic may leave the reused buffers half-written: start them afresh.
                    ctx = WorkerCtx { img: RgbImage::default(), resizer: TwoViewResizer::new(&cfg.augment) };
                }
                Done::Sample { epoch: job.epoch, seq: job.seq, result }
            }
        };
        if done.send(out).is_err() {
            return;
        }
    }
}

/// Runs the body of the reader or assembler thread. Should it panic (a bug), the consumer gets
/// [`LoaderError::Panicked`] instead of a stream that ends as if the epochs were done. (After a
/// reader panic the error may overtake the last good batches still in the workers: harmless, the
/// consumer stops at the first error.)
fn report_panic(thread: &'static str, out: &async_channel::Sender<Result<Batch, LoaderError>>, body: impl FnOnce()) {
    if let Err(what) = crate::guard::catch_panic(body) {
        tracing::error!("the loader's {thread} thread panicked: {what}");
        let _ = out.send_blocking(Err(LoaderError::Panicked { thread, what }));
    }
}

/// Error kind of a sample whose processing panicked (a bug, in our code or a dependency's).
const PANIC_KIND: &str = "panic";

/// Runs a sample's processing so that a panic cannot take its worker down: the sample becomes a
/// bad sample of kind [`PANIC_KIND`] (counted, logged with shard + key, skipped) and the run goes
/// on. Without this, the lost sequence number would leave the assembler waiting for ever.
fn contain_panic(job: &Job, f: impl FnOnce() -> Outcome) -> Outcome {
    crate::guard::catch_panic(f).unwrap_or_else(|what| {
        let key = job.sample.as_ref().map(|s| s.key.clone()).unwrap_or_else(|_| "?".into());
        Err(Box::new(Bad {
            kind: PANIC_KIND,
            shard: job.shard_name.clone(),
            key,
            reason: format!("processing panicked (a bug, please report it with this sample): {what}"),
        }))
    })
}

fn process(
    cfg: &LoaderConfig,
    job: &Job,
    ctx: &mut WorkerCtx,
    recycle: &crossbeam_channel::Receiver<(Vec<u8>, Vec<u8>)>,
    stats: &LoaderStats,
) -> Outcome {
    let bad = |kind: &'static str, key: &str, reason: String| {
        Box::new(Bad { kind, shard: job.shard_name.clone(), key: key.to_string(), reason })
    };
    let sample = job.sample.as_ref().map_err(|e| bad("format", "?", e.clone()))?;
    let label = match sample.class() {
        None => return Err(bad("missing_class", &sample.key, format!("no .{CLASS_EXT} member"))),
        Some(Err(e)) => return Err(bad("bad_class", &sample.key, e)),
        Some(Ok(c)) => c,
    };
    let jpg =
        sample.get(IMAGE_EXT).ok_or_else(|| bad("missing_image", &sample.key, format!("no .{IMAGE_EXT} member")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[cfg.seed, job.epoch, job.shard as u64, job.index, job.pass as u64]));
    // The crop box is drawn from the header's size, so decoding can stop below the box.
    let mut params = None;
    let t0 = Instant::now();
    let (_, full_height) = decode::decode_jpeg_rows_into(jpg, true, &mut ctx.img, |w, h| {
        let p = TwoViewParams::draw(w, h, &cfg.augment, &mut rng);
        let b = p.source_box(w);
        params = Some(p);
        b.top + b.height
    })
    .map_err(|e| bad("decode", &sample.key, e.to_string()))?;
    let t1 = Instant::now();
    let params = params.ok_or_else(|| bad("decode", &sample.key, "no crop box drawn".into()))?;
    stats.decoded_rows.fetch_add(ctx.img.height as u64, Ordering::Relaxed);
    stats.image_rows.fetch_add(full_height as u64, Ordering::Relaxed);
    let (vs, ts) = (cfg.augment.view_size, cfg.augment.token_size);
    let (mut view, mut token) = recycle.try_recv().unwrap_or_default();
    view.resize(3 * vs * vs, 0);
    token.resize(3 * ts * ts, 0);
    ctx.resizer.apply(&ctx.img, &params, &mut view, &mut token).map_err(|e| bad("augment", &sample.key, e))?;
    let pm = mask::generate(&cfg.mask, &mut rng);
    let t2 = Instant::now();
    let (dec, aug) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    stats.decode_ns.fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
    stats.augment_ns.fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
    ::metrics::histogram!(m::DECODE_SECONDS).record(dec);
    ::metrics::histogram!(m::AUGMENT_SECONDS).record(aug);
    Ok(Box::new(Processed { view, token, masked: pm.masked, visible: pm.visible, label, key: sample.key.clone() }))
}

struct Assembler {
    cfg: Arc<LoaderConfig>,
    pool: BufferPool,
    recycle_tx: crossbeam_channel::Sender<(Vec<u8>, Vec<u8>)>,
    tx: async_channel::Sender<Result<Batch, LoaderError>>,
    epoch_done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stats: Arc<LoaderStats>,
    per_epoch: Option<u64>,
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

    fn run(self, done: crossbeam_channel::Receiver<Done>, start: LoaderState) {
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
    fn a_panic_while_processing_becomes_a_bad_sample() {
        let job = Job {
            epoch: 0,
            seq: 5,
            shard: 1,
            index: 2,
            pass: 0,
            shard_name: "train-000001.tar".into(),
            sample: Ok(ShardSample { key: "n01440764_10026".into(), fields: vec![] }),
        };
        let formatted = 7;
        let bad = contain_panic(&job, || panic!("index out of bounds: {formatted}")).err().expect("a bad sample");
        assert_eq!((bad.kind, &*bad.shard, bad.key.as_str()), (PANIC_KIND, "train-000001.tar", "n01440764_10026"));
        assert!(bad.reason.contains("index out of bounds: 7"), "{}", bad.reason);
        let bad = contain_panic(&job, || std::panic::panic_any(3u8)).err().expect("a bad sample");
        assert!(bad.reason.contains("non-text panic payload"), "{}", bad.reason);
        // No panic: the outcome passes through untouched.
        let ok = contain_panic(&job, || {
            Err(Box::new(Bad { kind: "decode", shard: "s".into(), key: "k".into(), reason: "r".into() }))
        });
        assert_eq!(ok.err().map(|b| b.kind), Some("decode"));
    }

    #[test]
    fn a_panicking_loader_thread_reaches_the_consumer_as_an_error() {
        let (tx, rx) = async_channel::bounded(1);
        let t = std::thread::spawn(move || report_panic("reader", &tx, || panic!("shard index 9 of 4")));
        match rx.recv_blocking() {
            Ok(Err(LoaderError::Panicked { thread, what })) => {
                assert_eq!((thread, what.as_str()), ("reader", "shard index 9 of 4"))
            }
            other => panic!("expected the panic as an error, got {:?}", other.map(|r| r.map(|b| b.index))),
        }
        t.join().expect("report_panic itself does not panic");
        // A body that returns normally sends nothing.
        let (tx, rx) = async_channel::bounded(1);
        report_panic("assembler", &tx, || {});
        drop(tx);
        assert!(rx.recv_blocking().is_err(), "nothing sent");
    }

    #[test]
    fn epoch_length_from_counts() {
        let s = |n| ShardSpec { url: "x".into(), samples: Some(n) };
        assert_eq!(batches_per_epoch(&[s(100), s(100), s(57)], 16, 2), Some(257 / 32));
        assert_eq!(batches_per_epoch(&[s(1), ShardSpec { url: "y".into(), samples: None }], 1, 1), None);
    }
}
