//! Evaluation reading: every sample of a shard list exactly once, in shard order (no shuffle, no
//! augmentation, no mask), with the test transform of spec §5 ([`crop`]: resize the shorter side
//! to `resize`, centre-crop `crop` x `crop`).
//!
//! ```text
//!  reader thread            ordered map: worker threads (N)      consumer (Iterator::next)
//!  shards in order, -->     check, decode, resize, crop     -->  results in order, fill EvalBatch
//!  read::ShardSamples       (window of K)
//! ```
//!
//! The front half is the loader's ([`crate::read`], one [`ReadConfig`]): the same member and
//! pixel caps, label policy, image choice by content and failed-shard policy. A bad sample
//! (corrupt image, bad `.cls`, too large) is counted, logged with shard + key + reason, recorded
//! in [`EvalStats`] and skipped; a failed shard (cannot open, broken tar, short against its
//! manifest) is recorded too, and more than `max_failed_shards` of them end the pass with
//! [`LoaderError::ShardsFailed`]. [`EvalStats`] says what was not read, so a caller can refuse a
//! partial pass or report "N of M". The last batch may be short: nothing is dropped.
//!
//! Memory is bounded whatever the speed of the consumer ([`crate::ordered_map`]): at most
//! `K = 8 x workers` samples decoded (or decoding) and not yet in a batch, plus `K` encoded
//! samples queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::bad_sample::BadSample;
use crate::batch::normalize_imagenet;
use crate::decode::RgbImage;
use crate::http::HttpFetcher;
use crate::loader::LoaderError;
use crate::metrics as m;
use crate::ordered_map::{self, MapConfig, Results, Submitter};
use crate::read::{
    ReadConfig, ReadSample, ShardFailures, ShardItem, ShardSamples, check_sample, decode_kind, decode_whole, open_shard,
};
use crate::source::ShardSpec;

mod crop;
pub use crop::{CenterCropper, center_crop_origin, resized_size};

/// The test transform, the threads and how shards are read.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    pub batch_size: usize,
    /// Decode threads; 0 = all cores.
    pub workers: usize,
    /// Shorter side after the resize (256 for ImageNet evaluation).
    pub resize: usize,
    /// Side of the centre crop (224).
    pub crop: usize,
    /// Caps, label policy, failed-shard policy, HTTP (the run's `data` settings).
    pub read: ReadConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { batch_size: 64, workers: 0, resize: 256, crop: 224, read: ReadConfig::default() }
    }
}

/// A batch of evaluation images.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalBatch {
    /// Side of every image (the crop).
    pub size: usize,
    /// u8 `[n, 3, size, size]` planar RGB, not normalised.
    pub images: Vec<u8>,
    /// Class per image (-1 when the sample has no `.cls`).
    pub labels: Vec<i64>,
    pub keys: Vec<String>,
}

impl EvalBatch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The images as f32 `[n, 3, size, size]`, normalised with the ImageNet mean/std.
    pub fn images_f32(&self) -> Vec<f32> {
        normalize_imagenet(&self.images, self.size * self.size)
    }
}

/// Bad samples described in [`EvalStats::first_bad_samples`] at most.
pub const BAD_SAMPLES_SHOWN: usize = 10;

/// Counters of a pass, and what was not read.
#[derive(Debug, Default)]
pub struct EvalStats {
    pub samples_read: AtomicU64,
    pub samples_done: AtomicU64,
    pub bad_samples: AtomicU64,
    pub shards_failed: AtomicU64,
    /// Samples the shards hold by their manifests; `None` when a shard has no count.
    pub expected_samples: Option<u64>,
    failed: Mutex<Vec<String>>,
    bad: Mutex<Vec<String>>,
}

impl EvalStats {
    /// The failed shards so far (shown forms: secrets redacted).
    pub fn failed_shards(&self) -> Vec<String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }
    /// The first [`BAD_SAMPLES_SHOWN`] bad samples, as `shard: sample key: reason`.
    pub fn first_bad_samples(&self) -> Vec<String> {
        self.bad.lock().map(|b| b.clone()).unwrap_or_default()
    }
    fn record_bad(&self, b: &BadSample) {
        self.bad_samples.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut list) = self.bad.lock()
            && list.len() < BAD_SAMPLES_SHOWN
        {
            list.push(format!("{}: sample {}: {}", b.shard, b.key, b.reason));
        }
    }
}

struct Job {
    shard: Arc<str>,
    sample: Result<crate::wds::ShardSample, crate::read::BrokenSample>,
}

struct Good {
    image: Vec<u8>,
    label: i64,
    key: String,
}

type Outcome = Result<Good, BadSample>;

/// Reads a shard list once, in order, as [`EvalBatch`]es (an iterator). Dropping it stops its
/// threads.
pub struct EvalReader {
    cfg: EvalConfig,
    results: Option<Results<Outcome>>,
    stats: Arc<EvalStats>,
    workers: Vec<JoinHandle<()>>,
    finished: bool,
    /// Set by the reader thread when it stops the pass: a panic (a bug) or too many failed
    /// shards. Reported instead of a silently short pass.
    fatal: Arc<Mutex<Option<LoaderError>>>,
}

impl EvalReader {
    pub fn new(cfg: EvalConfig, shards: Vec<ShardSpec>) -> Result<Self, LoaderError> {
        if cfg.batch_size == 0 || cfg.crop == 0 {
            return Err(LoaderError::Config("batch_size and crop must be at least 1".into()));
        }
        if cfg.resize < cfg.crop {
            return Err(LoaderError::Config(format!("resize {} is smaller than crop {}", cfg.resize, cfg.crop)));
        }
        if shards.is_empty() {
            return Err(LoaderError::Config("no shards".into()));
        }
        cfg.read.validate().map_err(LoaderError::Config)?;
        let missing = crate::read::missing_shards(&shards);
        if !missing.is_empty() {
            return Err(LoaderError::MissingShards { missing });
        }
        m::describe();
        let io = |e: std::io::Error| LoaderError::Io(e.to_string());
        let http = cfg.read.fetcher(&shards).map_err(io)?;
        let workers =
            if cfg.workers == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cfg.workers };
        let mut handles = Vec::new();
        let (resize, crop, read) = (cfg.resize, cfg.crop, cfg.read.clone());
        let map = MapConfig { workers, bound: ordered_map::bound_for(workers), name: "cae-eval-worker".into() };
        let (submit, results) = ordered_map::start_threads(
            &map,
            move || (RgbImage::default(), CenterCropper::new(resize, crop), read.clone()),
            |(img, cropper, read), job: &Job| process(job, read, img, cropper),
            |job, what| {
                let key = job.sample.as_ref().map_or_else(|b| b.key.clone(), |s| s.key.clone());
                Err(BadSample::panicked(job.shard.clone(), key, &what))
            },
            &mut handles,
        )
        .map_err(io)?;
        let expected_samples = shards.iter().map(|s| s.samples).sum();
        let stats = Arc::new(EvalStats { expected_samples, ..EvalStats::default() });
        let fatal = Arc::new(Mutex::new(None));
        {
            let (stats, slot) = (stats.clone(), fatal.clone());
            let failures = ShardFailures::new(cfg.read.max_failed_for(&shards));
            let read = cfg.read.clone();
            let body = move || {
                let pass = ReadPass { read: &read, http: http.as_ref(), stats: &stats, failures };
                let error = match crate::guard::catch_panic(|| pass.run(&shards, submit)) {
                    Ok(outcome) => outcome.err(),
                    Err(what) => {
                        tracing::error!("the eval reader thread panicked: {what}");
                        Some(LoaderError::Panicked { thread: "eval reader", what })
                    }
                };
                if let (Some(e), Ok(mut s)) = (error, slot.lock()) {
                    *s = Some(e);
                }
            };
            // The reader may sit in a blocking read when the pass is dropped: not joined.
            std::thread::Builder::new().name("cae-eval-reader".into()).spawn(body).map_err(io)?;
        }
        Ok(Self { cfg, results: Some(results), stats, workers: handles, finished: false, fatal })
    }

    pub fn stats(&self) -> &EvalStats {
        &self.stats
    }
}

/// The reader thread: every shard in order, through the shared front half.
struct ReadPass<'a> {
    read: &'a ReadConfig,
    http: Option<&'a HttpFetcher>,
    stats: &'a EvalStats,
    failures: ShardFailures,
}

impl ReadPass<'_> {
    /// Submits every sample; stops early when the pass was dropped or too many shards failed.
    fn run(mut self, shards: &[ShardSpec], mut submit: Submitter<Job>) -> Result<(), LoaderError> {
        for spec in shards {
            let name: Arc<str> = spec.name().into();
            let mut samples = match open_shard(spec, self.http) {
                Ok(r) => ShardSamples::new(r, spec, self.read),
                Err(e) => {
                    self.failed(spec, &format!("cannot open: {e}"))?;
                    continue;
                }
            };
            while let Some(item) = samples.next_item() {
                let sample: ReadSample = match item {
                    ShardItem::Sample(s) => s,
                    ShardItem::Failed(reason) => {
                        self.failed(spec, &reason)?;
                        break;
                    }
                };
                self.stats.samples_read.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(m::SAMPLES_READ).increment(1);
                let job = Job { shard: name.clone(), sample: sample.map(|(s, _)| s) };
                if submit.submit(job).is_err() {
                    return Ok(()); // the pass was dropped
                }
            }
        }
        Ok(())
    }

    fn failed(&mut self, spec: &ShardSpec, reason: &str) -> Result<(), LoaderError> {
        self.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
        let outcome = self.failures.fail(spec, reason);
        if let Ok(mut names) = self.stats.failed.lock() {
            *names = self.failures.names();
        }
        outcome.map_err(LoaderError::from)
    }
}

fn process(job: &Job, read: &ReadConfig, img: &mut RgbImage, cropper: &mut CenterCropper) -> Outcome {
    let bad = |kind: &'static str, key: &str, reason: String| BadSample::new(kind, job.shard.clone(), key, reason);
    let sample = job.sample.as_ref().map_err(|b| b.bad_sample(job.shard.clone()))?;
    let checked = check_sample(sample, read.labels).map_err(|(kind, e)| bad(kind, &sample.key, e))?;
    // Upright by its EXIF orientation, as the loader sees it.
    decode_whole(checked.image, checked.format, read.max_pixels(), img)
        .map_err(|e| bad(decode_kind(&e), &sample.key, e.to_string()))?;
    let s = cropper.crop_size();
    let mut image = vec![0u8; 3 * s * s];
    cropper.apply(img, &mut image).map_err(|e| bad("decode", &sample.key, e))?;
    Ok(Good { image, label: checked.label, key: sample.key.clone() })
}

impl Iterator for EvalReader {
    type Item = Result<EvalBatch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let results = self.results.as_mut()?;
        let s = self.cfg.crop;
        let mut batch = EvalBatch { size: s, images: Vec::new(), labels: Vec::new(), keys: Vec::new() };
        while batch.len() < self.cfg.batch_size {
            let Some(out) = results.recv() else {
                // Every worker has exited: the reader is done and everything is in.
                self.finished = true;
                break;
            };
            match out {
                Ok(g) => {
                    batch.images.extend_from_slice(&g.image);
                    batch.labels.push(g.label);
                    batch.keys.push(g.key);
                    self.stats.samples_done.fetch_add(1, Ordering::Relaxed);
                }
                Err(b) => {
                    self.stats.record_bad(&b);
                    b.report();
                }
            }
        }
        if self.finished {
            if let Some(e) = self.fatal.lock().ok().and_then(|mut s| s.take()) {
                return Some(Err(e));
            }
            if results.stranded() > 0 {
                let n = results.stranded();
                return Some(Err(LoaderError::Io(format!(
                    "{n} processed samples were stranded: a worker thread died"
                ))));
            }
        }
        if batch.is_empty() {
            return None;
        }
        Some(Ok(batch))
    }
}

impl Drop for EvalReader {
    fn drop(&mut self) {
        // Dropping the results stops the workers (and makes the reader's next submit fail).
        self.results = None;
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}
