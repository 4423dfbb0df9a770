//! Evaluation reading: every sample of a shard list exactly once, in shard order (no shuffle, no
//! augmentation, no mask), with the test transform of spec §5: resize the shorter side to
//! `resize` (bicubic, Pillow's a = -0.5 kernel, antialiased), then centre-crop `crop` x `crop` —
//! torchvision's `Resize(256)` + `CenterCrop(224)` on a PIL image. An image whose shorter side
//! already equals `resize` is not resampled (torchvision returns it as it is), so a 224x224 image
//! with `resize = crop = 224` passes through untouched.
//!
//! ```text
//!  reader thread       ordered map: worker threads (N)      consumer (Iterator::next)
//!  shards in order, --> decode, resize, crop           -->  results in order, fill EvalBatch
//!  tar read           (window of K)
//! ```
//!
//! Memory is bounded whatever the speed of the consumer ([`crate::ordered_map`]): at most
//! `K = 8 x workers` samples decoded (or decoding) and not yet in a batch, plus `K` encoded
//! samples queued. The image member is the
//! loader's: the first of `.jpg`, `.jpeg`, `.png`, `.webp`. A bad sample (corrupt image, bad
//! `.cls`) is counted, logged with shard + key + reason, and skipped; a sample without `.cls`
//! gets label -1 (features of unlabeled data). The last batch may be short: nothing is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::augment::hwc_to_chw;
use crate::bad_sample::BadSample;
use crate::batch::normalize_imagenet;
use crate::decode::{self, RgbImage};
use crate::http::{HttpConfig, HttpFetcher};
use crate::loader::{LoaderError, open_shard};
use crate::metrics as m;
use crate::ordered_map::{self, MapConfig, Results, Submitter};
use crate::source::ShardSpec;
use crate::wds::{IMAGE_EXTS, SampleReader, WdsError, image_format};

/// The test transform and the threads.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    pub batch_size: usize,
    /// Decode threads; 0 = all cores.
    pub workers: usize,
    /// Shorter side after the resize (256 for ImageNet evaluation).
    pub resize: usize,
    /// Side of the centre crop (224).
    pub crop: usize,
    pub http: HttpConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { batch_size: 64, workers: 0, resize: 256, crop: 224, http: HttpConfig::default() }
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

/// Counters of a pass.
#[derive(Debug, Default)]
pub struct EvalStats {
    pub samples_read: AtomicU64,
    pub samples_done: AtomicU64,
    pub bad_samples: AtomicU64,
    pub shards_failed: AtomicU64,
}

/// Size after torchvision's `Resize(size)` with an int size: the shorter side becomes `size`,
/// the longer `int(size * long / short)` (truncated).
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height { (size, new_long) } else { (new_long, size) }
}

/// Top-left corner of torchvision's `CenterCrop(crop)`: `int(round((side - crop) / 2))` with
/// Python's round-half-to-even.
pub fn center_crop_origin(width: usize, height: usize, crop: usize) -> (usize, usize) {
    let off = |side: usize| ((side as f64 - crop as f64) / 2.0).round_ties_even() as usize;
    (off(width), off(height))
}

/// Per-worker resampling state.
pub struct CenterCropper {
    resizer: Resizer,
    resized: Image<'static>,
    crop: Vec<u8>,
    resize: usize,
    size: usize,
}

impl CenterCropper {
    pub fn new(resize: usize, crop: usize) -> Self {
        Self {
            resizer: Resizer::new(),
            resized: Image::new(1, 1, PixelType::U8x3),
            crop: Vec::new(),
            resize,
            size: crop,
        }
    }

    /// Resize + centre crop of `img`, written planar (CHW) into `out` (3·crop·crop).
    pub fn apply(&mut self, img: &RgbImage, out: &mut [u8]) -> Result<(), String> {
        let (nw, nh) = resized_size(img.width, img.height, self.resize);
        if nw < self.size || nh < self.size {
            return Err(format!(
                "{}x{} resized to {nw}x{nh} is smaller than the {} crop",
                img.width, img.height, self.size
            ));
        }
        let (src, sw): (&[u8], usize) = if (nw, nh) == (img.width, img.height) {
            (&img.pixels, img.width)
        } else {
            let from = ImageRef::new(img.width as u32, img.height as u32, &img.pixels, PixelType::U8x3)
                .map_err(|e| format!("source image: {e}"))?;
            if (self.resized.width() as usize, self.resized.height() as usize) != (nw, nh) {
                self.resized = Image::new(nw as u32, nh as u32, PixelType::U8x3);
            }
            let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
            self.resizer.resize(&from, &mut self.resized, &opts).map_err(|e| format!("resize: {e}"))?;
            (self.resized.buffer(), nw)
        };
        let (left, top) = center_crop_origin(nw, nh, self.size);
        let s = self.size;
        self.crop.clear();
        for row in src.chunks_exact(3 * sw).skip(top).take(s) {
            self.crop.extend_from_slice(&row[3 * left..3 * (left + s)]);
        }
        hwc_to_chw(&self.crop, s, false, out);
        Ok(())
    }
}

struct Job {
    shard: Arc<str>,
    sample: Result<crate::wds::ShardSample, String>,
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
    /// Set when the reader thread panicked (a bug): reported instead of a silently short pass.
    reader_panic: Arc<Mutex<Option<String>>>,
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
        m::describe();
        let http = if shards.iter().any(ShardSpec::is_http) {
            Some(HttpFetcher::new(&cfg.http).map_err(|e| LoaderError::Io(e.to_string()))?)
        } else {
            None
        };
        let workers =
            if cfg.workers == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cfg.workers };
        let io = |e: std::io::Error| LoaderError::Io(e.to_string());
        let mut handles = Vec::new();
        let (resize, crop) = (cfg.resize, cfg.crop);
        let map = MapConfig { workers, bound: ordered_map::bound_for(workers), name: "cae-eval-worker".into() };
        let (submit, results) = ordered_map::start_threads(
            &map,
            move || (RgbImage::default(), CenterCropper::new(resize, crop)),
            |(img, cropper), job: &Job| process(job, img, cropper),
            |job, what| {
                let key = job.sample.as_ref().map_or("?", |s| s.key.as_str()).to_string();
                Err(BadSample::panicked(job.shard.clone(), key, &what))
            },
            &mut handles,
        )
        .map_err(io)?;
        let stats = Arc::new(EvalStats::default());
        let reader_panic = Arc::new(Mutex::new(None));
        {
            let (stats, slot) = (stats.clone(), reader_panic.clone());
            let body = move || {
                let run = || read_all(&shards, http.as_ref(), submit, &stats);
                if let Err(what) = crate::guard::catch_panic(run) {
                    tracing::error!("the eval reader thread panicked: {what}");
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(what);
                    }
                }
            };
            // The reader may sit in a blocking read when the pass is dropped: not joined.
            std::thread::Builder::new().name("cae-eval-reader".into()).spawn(body).map_err(io)?;
        }
        Ok(Self { cfg, results: Some(results), stats, workers: handles, finished: false, reader_panic })
    }

    pub fn stats(&self) -> &EvalStats {
        &self.stats
    }
}

fn read_all(shards: &[ShardSpec], http: Option<&HttpFetcher>, mut submit: Submitter<Job>, stats: &EvalStats) {
    for spec in shards {
        let name: Arc<str> = spec.name().into();
        let reader = match open_shard(spec, http) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("shard {}: cannot open: {e}; skipped", crate::redact::url(&spec.url));
                stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(m::SHARDS_FAILED).increment(1);
                continue;
            }
        };
        for sample in SampleReader::new(reader) {
            let sample = match sample {
                Ok(mut s) => {
                    s.keep_image_and_class();
                    Ok(s)
                }
                Err(WdsError::Tar { after_sample, message }) => {
                    tracing::warn!(
                        "shard {}: {message} after sample {after_sample}; rest of shard skipped",
                        crate::redact::url(&spec.url)
                    );
                    stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                    ::metrics::counter!(m::SHARDS_FAILED).increment(1);
                    break;
                }
                Err(e) => Err(e.to_string()),
            };
            stats.samples_read.fetch_add(1, Ordering::Relaxed);
            ::metrics::counter!(m::SAMPLES_READ).increment(1);
            if submit.submit(Job { shard: name.clone(), sample }).is_err() {
                return; // the pass was dropped
            }
        }
    }
}

fn process(job: &Job, img: &mut RgbImage, cropper: &mut CenterCropper) -> Outcome {
    let bad = |key: &str, reason: String| BadSample {
        kind: "decode",
        shard: job.shard.clone(),
        key: key.to_string(),
        reason,
    };
    let sample = job.sample.as_ref().map_err(|e| bad("?", e.clone()))?;
    let label = match sample.class() {
        None => -1,
        Some(Err(e)) => return Err(bad(&sample.key, format!("bad class: {e}"))),
        Some(Ok(c)) => c,
    };
    let (ext, bytes) = sample.image().ok_or_else(|| BadSample {
        kind: "missing_image",
        ..bad(&sample.key, format!("no image member (.{})", IMAGE_EXTS.join(", .")))
    })?;
    let max = decode::DEFAULT_MAX_PIXELS;
    match image_format(ext) {
        // Upright by its EXIF orientation, as the loader sees it.
        decode::Format::Jpeg => decode::decode_jpeg_upright_into(bytes, true, max, img),
        format => decode::decode_other_into(bytes, format, max, img),
    }
    .map_err(|e| bad(&sample.key, e.to_string()))?;
    let mut image = vec![0u8; 3 * cropper.size * cropper.size];
    cropper.apply(img, &mut image).map_err(|e| bad(&sample.key, e))?;
    Ok(Good { image, label, key: sample.key.clone() })
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
                    self.stats.bad_samples.fetch_add(1, Ordering::Relaxed);
                    b.report();
                }
            }
        }
        if self.finished {
            let panic = self.reader_panic.lock().ok().and_then(|mut s| s.take());
            if let Some(what) = panic {
                return Some(Err(LoaderError::Panicked { thread: "eval reader", what }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_follows_torchvision() {
        // int(256 * 500 / 375) = int(341.33) = 341; portrait keeps the width at 256.
        assert_eq!(resized_size(500, 375, 256), (341, 256));
        assert_eq!(resized_size(375, 500, 256), (256, 341));
        // int(256 * 333 / 250) = int(340.992) = 340 (truncated, not rounded).
        assert_eq!(resized_size(333, 250, 256), (340, 256));
        assert_eq!(resized_size(224, 224, 224), (224, 224));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        // (341 - 224) / 2 = 58.5 -> 58 (Python round), (256 - 224) / 2 = 16.
        assert_eq!(center_crop_origin(341, 256, 224), (58, 16));
        // (227 - 224) / 2 = 1.5 -> 2; (225 - 224) / 2 = 0.5 -> 0.
        assert_eq!(center_crop_origin(227, 225, 224), (2, 0));
    }

    fn gradient(w: usize, h: usize) -> RgbImage {
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                pixels.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8]);
            }
        }
        RgbImage { width: w, height: h, pixels }
    }

    #[test]
    fn an_image_of_the_crop_size_passes_unchanged() {
        let img = gradient(224, 224);
        let mut c = CenterCropper::new(224, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        let mut expect = vec![0u8; 3 * 224 * 224];
        hwc_to_chw(&img.pixels, 224, false, &mut expect);
        assert_eq!(out, expect);
    }

    #[test]
    fn no_resample_when_the_short_side_already_fits_only_a_crop() {
        // 300x256 with resize 256: no resampling, the crop is the middle 224x224 at (38, 16).
        let img = gradient(300, 256);
        let mut c = CenterCropper::new(256, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        let (y, x) = (5, 7);
        let src = 3 * ((16 + y) * 300 + 38 + x);
        assert_eq!(out[y * 224 + x], img.pixels[src]);
        assert_eq!(out[224 * 224 + y * 224 + x], img.pixels[src + 1]);
        assert_eq!(out[2 * 224 * 224 + y * 224 + x], img.pixels[src + 2]);
    }

    #[test]
    fn a_flat_image_stays_flat_after_resize_and_crop() {
        let img = RgbImage { width: 500, height: 375, pixels: [10u8, 120, 250].repeat(500 * 375) };
        let mut c = CenterCropper::new(256, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        assert!(out[..224 * 224].iter().all(|&v| v == 10));
        assert!(out[224 * 224..2 * 224 * 224].iter().all(|&v| v == 120));
        assert!(out[2 * 224 * 224..].iter().all(|&v| v == 250));
    }
}
