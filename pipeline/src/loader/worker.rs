//! The worker threads: decode, crop/flip/resize and mask one sample at a time (per-sample RNG).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Bad, Done, Job, LoaderConfig, LoaderError, LoaderStats, Outcome, Processed, Work, mix};
use crate::augment::{TwoViewParams, TwoViewResizer};
use crate::batch::Batch;
use crate::decode::{self, RgbImage};
use crate::mask;
use crate::metrics as m;
use crate::wds::{CLASS_EXT, IMAGE_EXT};

struct WorkerCtx {
    img: RgbImage,
    resizer: TwoViewResizer,
}

pub(super) fn worker(
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
    let pm = mask::generate(&cfg.mask, &mut rng).map_err(|e| bad("mask", &sample.key, e.to_string()))?;
    let t2 = Instant::now();
    let (dec, aug) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    stats.decode_ns.fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
    stats.augment_ns.fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
    ::metrics::histogram!(m::DECODE_SECONDS).record(dec);
    ::metrics::histogram!(m::AUGMENT_SECONDS).record(aug);
    Ok(Box::new(Processed { view, token, masked: pm.masked, visible: pm.visible, label, key: sample.key.clone() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wds::ShardSample;

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
}
