//! The worker threads: decode, crop/flip/resize and mask one sample at a time (per-sample RNG).

use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Done, Job, LoaderConfig, LoaderError, LoaderStats, Outcome, Processed, Work, mix};
use crate::augment::{TwoViewParams, TwoViewResizer};
use crate::bad_sample::BadSample;
use crate::batch::Batch;
use crate::decode::{self, DecodeError, Format, RgbImage};
use crate::mask;
use crate::metrics as m;
use crate::read::{check_sample, decode_kind};

/// Decoded-image capacity a worker keeps between samples (about 21 MP of RGB, above any
/// ImageNet image): after an outlier the buffer is released instead of staying that large for
/// the rest of the run.
const RETAINED_DECODE_BYTES: usize = 64 << 20;

pub(super) struct WorkerCtx {
    img: RgbImage,
    resizer: TwoViewResizer,
    /// Capacity of `img.pixels` kept after a sample; more is released.
    retain: usize,
}

impl WorkerCtx {
    pub(super) fn new(cfg: &LoaderConfig) -> Self {
        Self { img: RgbImage::default(), resizer: TwoViewResizer::new(&cfg.augment), retain: RETAINED_DECODE_BYTES }
    }

    /// Shrinks the decode buffer back after an outlier.
    fn release_outlier(&mut self) {
        if self.img.pixels.capacity() > self.retain {
            self.img.pixels = Vec::new();
        }
    }
}

/// One item of the ordered map: a sample processed (or the end-of-epoch marker passed on).
pub(super) fn work(
    cfg: &LoaderConfig,
    work: &Work,
    ctx: &mut WorkerCtx,
    recycle: &crossbeam_channel::Receiver<(Vec<u8>, Vec<u8>)>,
    stats: &LoaderStats,
) -> Done {
    match work {
        Work::EndOfEpoch { epoch } => Done::EndOfEpoch { epoch: *epoch },
        Work::Sample(job) => {
            let result = process(cfg, job, ctx, recycle, stats);
            ctx.release_outlier();
            Done::Sample { epoch: job.epoch, capped: job.capped, result }
        }
    }
}

/// Runs the body of the reader or assembler thread. Should it panic (a bug), the consumer gets
/// [`LoaderError::Panicked`] instead of a stream that ends as if the epochs were done. (After a
/// reader panic the error may overtake the last good batches still in the workers: harmless, the
/// consumer stops at the first error.)
pub(super) fn report_panic(
    thread: &'static str,
    out: &async_channel::Sender<Result<Batch, LoaderError>>,
    body: impl FnOnce(),
) {
    if let Err(what) = crate::guard::catch_panic(body) {
        tracing::error!("the loader's {thread} thread panicked: {what}");
        let _ = out.send_blocking(Err(LoaderError::Panicked { thread, what }));
    }
}

fn process(
    cfg: &LoaderConfig,
    job: &Job,
    ctx: &mut WorkerCtx,
    recycle: &crossbeam_channel::Receiver<(Vec<u8>, Vec<u8>)>,
    stats: &LoaderStats,
) -> Outcome {
    let bad = |kind: &'static str, key: &str, reason: String| {
        Box::new(BadSample::new(kind, job.shard_name.clone(), key, reason))
    };
    let sample = job.sample.as_ref().map_err(|b| Box::new(b.bad_sample(job.shard_name.clone())))?;
    let checked = check_sample(sample, cfg.labels).map_err(|(kind, e)| bad(kind, &sample.key, e))?;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[cfg.seed, job.epoch, job.shard as u64, job.index, job.pass as u64]));
    let max_pixels = usize::try_from(cfg.max_pixels).unwrap_or(usize::MAX);
    let decode_err = |e: DecodeError| bad(decode_kind(&e), &sample.key, e.to_string());
    let mut params = None;
    let t0 = Instant::now();
    let full_height = if checked.format == Format::Jpeg {
        // The crop box is drawn from the header's size, so decoding can stop below the box.
        let (_, full_height) =
            decode::decode_jpeg_rows_capped(checked.image, true, max_pixels, &mut ctx.img, |w, h| {
                let p = TwoViewParams::draw(w, h, &cfg.augment, &mut rng);
                let b = p.source_box(w);
                params = Some(p);
                b.top + b.height
            })
            .map_err(decode_err)?;
        full_height
    } else {
        decode::decode_other_into(checked.image, checked.format, max_pixels, &mut ctx.img).map_err(decode_err)?;
        params = Some(TwoViewParams::draw(ctx.img.width, ctx.img.height, &cfg.augment, &mut rng));
        ctx.img.height
    };
    let t1 = Instant::now();
    let params = params.ok_or_else(|| bad("decode", &sample.key, "no crop box drawn".into()))?;
    stats.decoded_rows.fetch_add(ctx.img.height as u64, Ordering::Relaxed);
    stats.image_rows.fetch_add(full_height as u64, Ordering::Relaxed);
    let (vs, ts) = (cfg.augment.view_size, cfg.augment.token_size);
    let (mut view, mut token) = recycle.try_recv().unwrap_or_default();
    view.resize(3 * vs * vs, 0);
    token.resize(3 * ts * ts, 0);
    ctx.resizer.apply(&ctx.img, &params, &mut view, &mut token).map_err(|e| bad("augment", &sample.key, e))?;
    let pm = mask::generate(&cfg.mask, &mut rng).map_err(|e| bad("mask", &sample.key, e.to_string()))?;
    let t2 = Instant::now();
    let (dec, aug) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    stats.decode_ns.fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
    stats.augment_ns.fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
    ::metrics::histogram!(m::DECODE_SECONDS).record(dec);
    ::metrics::histogram!(m::AUGMENT_SECONDS).record(aug);
    let label = checked.label;
    Ok(Box::new(Processed { view, token, masked: pm.masked, visible: pm.visible, label, key: sample.key.clone() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::{LabelPolicy, TOO_LARGE};
    use crate::wds::ShardSample;

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let px: Vec<u8> = (0..w as usize * h as usize * 3).map(|i| (i * 31 % 251) as u8).collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 90).encode(&px, w, h, jpeg_encoder::ColorType::Rgb).expect("encode");
        out
    }

    /// A small JPEG whose frame header claims `side` x `side` (the entropy data is a 16x16's).
    pub(crate) fn header_claiming(side: u16) -> Vec<u8> {
        let mut b = jpeg(16, 16);
        let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).expect("SOF0");
        b[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
        b[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
        b
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("png");
        out.into_inner()
    }

    fn run(cfg: &LoaderConfig, ctx: &mut WorkerCtx, fields: Vec<(&str, Vec<u8>)>) -> Outcome {
        let fields = fields.into_iter().map(|(e, b)| (e.to_string(), b)).collect();
        let job = Job {
            epoch: 0,
            shard: 0,
            index: 0,
            pass: 0,
            shard_name: "s.tar".into(),
            sample: Ok(ShardSample { key: "k".into(), fields }),
            capped: false,
        };
        let (_tx, recycle) = crossbeam_channel::bounded(1);
        let out = process(cfg, &job, ctx, &recycle, &LoaderStats::default());
        ctx.release_outlier();
        out
    }

    /// Regression: a 166-byte JPEG whose header claims 16384x16384 made each worker allocate and
    /// zero 805 MiB, kept for the rest of the run. Now it is refused from the header as
    /// `too_large` with nothing allocated, and a buffer grown by a big image is released after it.
    #[test]
    fn a_huge_header_is_too_large_and_the_decode_buffer_shrinks_back() {
        let cfg = LoaderConfig::default();
        let mut ctx = WorkerCtx::new(&cfg);
        let bomb = header_claiming(16384);
        assert!(bomb.len() < 4096, "a small file");
        let out = run(&cfg, &mut ctx, vec![("jpg", bomb.clone()), ("cls", b"1".to_vec())]);
        assert_eq!(out.err().map(|b| b.kind), Some(TOO_LARGE));
        assert!(ctx.img.pixels.capacity() < 1 << 20, "allocated {} bytes", ctx.img.pixels.capacity());
        // The cap is the config's: a lower one refuses an ordinary image the same way.
        let small_cap = LoaderConfig { max_pixels: 300 * 200 - 1, ..LoaderConfig::default() };
        let out = run(&small_cap, &mut ctx, vec![("jpg", jpeg(300, 200))]);
        assert_eq!(out.err().map(|b| b.kind), Some(TOO_LARGE));
        // An outlier under the cap decodes, then the worker gives the memory back.
        ctx.retain = 100_000;
        let ok = run(&cfg, &mut ctx, vec![("jpg", jpeg(400, 300))]).expect("decodes");
        assert_eq!(ok.view.len(), 3 * 224 * 224);
        assert!(ctx.img.pixels.capacity() <= 100_000, "kept {} bytes", ctx.img.pixels.capacity());
        let ok = run(&cfg, &mut ctx, vec![("jpg", jpeg(100, 80))]).expect("decodes");
        assert!(ctx.img.pixels.capacity() >= 100 * 3, "a small buffer is kept for reuse");
        assert_eq!(ok.key, "k");
    }

    #[test]
    fn png_webp_and_jpeg_members_and_optional_labels() {
        let cfg = LoaderConfig::default();
        let mut ctx = WorkerCtx::new(&cfg);
        // No .cls: label -1 by default (pre-training), a bad sample when labels are required.
        let p = run(&cfg, &mut ctx, vec![("png", png(120, 90))]).expect("png loads");
        assert_eq!(p.label, -1);
        let required = LoaderConfig { labels: LabelPolicy::Required, ..LoaderConfig::default() };
        let out = run(&required, &mut ctx, vec![("png", png(120, 90))]);
        assert_eq!(out.err().map(|b| b.kind), Some("missing_class"));
        let j = run(&cfg, &mut ctx, vec![("jpeg", jpeg(64, 48)), ("cls", b"7".to_vec())]).expect(".jpeg loads");
        assert_eq!(j.label, 7);
        // `.jpg` comes first when a sample has several images.
        let first = run(&cfg, &mut ctx, vec![("png", png(120, 90)), ("jpg", jpeg(64, 48))]).expect("loads");
        let only_jpg = run(&cfg, &mut ctx, vec![("jpg", jpeg(64, 48))]).expect("loads");
        assert!(first.view == only_jpg.view, "the .jpg member was not the one used");
        // A PNG over the pixel cap is refused from its header too.
        let tiny_cap = LoaderConfig { max_pixels: 1000, ..LoaderConfig::default() };
        assert_eq!(run(&tiny_cap, &mut ctx, vec![("png", png(120, 90))]).err().map(|b| b.kind), Some(TOO_LARGE));
        let broken = run(&cfg, &mut ctx, vec![("webp", b"RIFF\0\0\0\0WEBPjunk".to_vec())]);
        assert_eq!(broken.err().map(|b| b.kind), Some("decode"));
        let none = run(&cfg, &mut ctx, vec![("txt", b"hi".to_vec())]);
        assert_eq!(none.err().map(|b| b.kind), Some("missing_image"));
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
}
