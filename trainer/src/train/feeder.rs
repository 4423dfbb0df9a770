//! The device feeder: a thread between the data pipeline and the step loop.
//!
//! It takes host batches from the [`Loader`], uploads the views as u8 (a quarter of the bytes of
//! f32), converts and normalises them on the device (spec §1 step 6), computes the targets (the
//! DALL-E tokenizer's forward, or the per-patch-normalised pixels) and queues the ready
//! [`DeviceBatch`]es, at most [`DEPTH`] ahead. So while step k runs, batch k+1 is uploaded and
//! tokenised, and the step thread only launches kernels. On CUDA and wgpu each thread has its
//! own stream; cubecl orders the step's use of a batch after the feeder's work on it.
//!
//! The time the step loop waits in [`Feeder::next`] is its `data_wait_seconds`; the part of it
//! during which the feeder was computing that batch's targets (the tokenizer's forward, mostly)
//! is its tokenizer wait ([`DataWait`]), so a slow tokenizer is not mistaken for a slow
//! pipeline. (On a GPU the feeder's work is queued, not waited for: there the tokenizer's cost
//! shows in the step time instead.) While it waits
//! it runs queued rayon work ([`rayon::yield_now`]): the step loop runs on a worker of rayon's
//! pool (`cli::main_from`) and the feeder's CPU kernels (burn-flex) are injected into that pool,
//! so with one rayon thread a plain blocking wait would deadlock.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use cae_pipeline::batch::{IMAGENET_MEAN, IMAGENET_STD};
use cae_pipeline::{Batch, Loader, LoaderState};

use crate::CaeError;
use crate::config::RunConfig;
use crate::model::{CaeTargets, DalleEncoder, TargetKind, map_pixels, pixel_targets_eps, raw_pixel_targets};

/// Ready batches queued ahead of the step loop.
pub const DEPTH: usize = 2;

/// A batch on the device, ready for the step (tensors of the inner, non-autodiff backend).
pub struct DeviceBatch<B: Backend> {
    /// View 1, normalised: `[b, 3, s, s]` f32.
    pub images: Tensor<B, 4>,
    /// Visible patch indices `[b, n_vis]`, sorted.
    pub visible: Tensor<B, 2, Int>,
    /// Masked patch indices `[b, n_mask]`, sorted.
    pub masked: Tensor<B, 2, Int>,
    pub targets: CaeTargets<B>,
    /// Loader state that resumes right after this batch.
    pub resume: LoaderState,
    pub epoch: u64,
    pub size: usize,
    /// When the feeder got the host batch from the pipeline, and when it had uploaded it and
    /// computed its targets.
    pub loaded_at: Instant,
    pub ready_at: Instant,
}

/// Seconds the step loop waited for ready batches, and the part of them during which the feeder
/// was preparing the batch (upload, normalisation, targets) rather than waiting on the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DataWait {
    pub total: f64,
    pub tokenizer: f64,
}

impl DataWait {
    /// Adds a wait from `from` to `to` for a batch the feeder prepared from `loaded_at` to
    /// `ready_at`: the overlap of the two intervals is tokenizer time.
    pub fn add(&mut self, from: Instant, to: Instant, loaded_at: Instant, ready_at: Instant) {
        self.total += to.saturating_duration_since(from).as_secs_f64();
        let (start, end) = (from.max(loaded_at), to.min(ready_at));
        self.tokenizer += end.saturating_duration_since(start).as_secs_f64();
    }
}

/// `u32` host indices `[b, n]` as a device int tensor.
fn index_tensor<B: Backend>(idx: &[u32], b: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = idx.len() / b.max(1);
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [b, n]), device)
}

/// u8 pixels uploaded as bytes and converted to f32 (0..255) on the device. Where the backend
/// has no u8 tensors (wgpu's WGSL), four bytes travel as one i32 and are unpacked on the device
/// with shifts and masks.
///
/// # Shapes
/// - pixels: `shape` elements, row-major -> `shape`
pub fn upload_pixels<B: Backend, const D: usize>(
    pixels: Vec<u8>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    if B::supports_dtype(device, DType::U8) {
        let bytes = Tensor::<B, D, Int>::from_data(TensorData::new(pixels, shape), (device, DType::U8));
        return bytes.float();
    }
    upload_packed(pixels, shape, device)
}

/// [`upload_pixels`] through i32 words (little-endian: byte j of word w is pixel 4w + j).
fn upload_packed<B: Backend, const D: usize>(
    mut pixels: Vec<u8>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let n = pixels.len();
    pixels.resize(n.div_ceil(4) * 4, 0);
    let words: Vec<i32> = pixels.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let w = words.len();
    let packed = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [w]), (device, DType::I32)); // [w]
    let bytes: Vec<Tensor<B, 2, Int>> = (0..4)
        .map(|j: i64| {
            let shifted = packed.clone().bitwise_right_shift_scalar((8 * j).elem::<B::IntElem>());
            shifted.bitwise_and_scalar(255i64.elem::<B::IntElem>()).reshape([w, 1])
        })
        .collect(); // 4 x [w, 1]
    let all = Tensor::cat(bytes, 1).reshape([4 * w]); // [4w], pixel order
    all.slice(0..n).float().reshape(shape)
}

/// Planar u8 images `[b, 3, s, s]` uploaded and normalised on the device with the ImageNet
/// mean/std: `(x / 255 - mean) / std` (spec §1 step 6).
pub fn normalize_on_device<B: Backend>(pixels: Vec<u8>, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    let raw = upload_pixels::<B, 4>(pixels, shape, device); // [b, 3, s, s] 0..255
    let mean = Tensor::<B, 1>::from_floats(IMAGENET_MEAN, device).reshape([1, 3, 1, 1]);
    let std = Tensor::<B, 1>::from_floats(IMAGENET_STD, device).reshape([1, 3, 1, 1]);
    (raw / 255.0 - mean) / std // [b, 3, s, s]
}

/// Uploads a batch and normalises it on the device; computes the targets (tokenizer or pixels).
pub fn prepare<B: Backend>(
    batch: &Batch,
    config: &RunConfig,
    tokenizer: Option<&DalleEncoder<B>>,
    device: &B::Device,
) -> Result<DeviceBatch<B>, CaeError> {
    let c = &config.model;
    let (b, s, t) = (batch.batch_size, batch.view_size, batch.token_size);
    if s != c.img_size || batch.num_masked != c.num_mask || batch.grid != c.grid_size() {
        return Err(CaeError::Data(format!(
            "batch of {s} px, grid {}, {} masked does not fit the model ({} px, grid {}, {} masked)",
            batch.grid,
            batch.num_masked,
            c.img_size,
            c.grid_size(),
            c.num_mask
        )));
    }
    let loaded_at = Instant::now();
    let images = normalize_on_device::<B>(batch.views.clone(), [b, 3, s, s], device);
    let targets = match (c.target, tokenizer) {
        (TargetKind::Dalle, Some(tok)) => {
            let tv = upload_pixels::<B, 4>(batch.token_views.clone(), [b, 3, t, t], device);
            CaeTargets::Tokens(tok.tokens(map_pixels(tv / 255.0))) // [b, N]
        }
        (TargetKind::Dalle, None) => return Err(CaeError::Config("dalle target without a tokenizer".into())),
        (TargetKind::Pixels, _) if c.norm_pix_loss => {
            CaeTargets::Pixels(pixel_targets_eps(images.clone(), c.patch_size, c.norm_pix_eps))
        }
        (TargetKind::Pixels, _) => CaeTargets::Pixels(raw_pixel_targets(images.clone(), c.patch_size)),
    };
    Ok(DeviceBatch {
        images,
        visible: index_tensor(&batch.visible, b, device),
        masked: index_tensor(&batch.masked, b, device),
        targets,
        resume: batch.resume,
        epoch: batch.epoch,
        size: b,
        loaded_at,
        ready_at: Instant::now(),
    })
}

/// Where the feeder's host batches come from: the pipeline's [`Loader`], or [`Synthetic`].
pub trait BatchSource: Send + 'static {
    /// The next batch, blocking; `None` when the data has ended.
    fn next_batch(&self) -> Option<Result<Batch, CaeError>>;
    /// Batches per epoch, when known (it sets an epoch-based schedule).
    fn batches_per_epoch(&self) -> Option<u64>;
}

impl BatchSource for Loader {
    fn next_batch(&self) -> Option<Result<Batch, CaeError>> {
        self.next_blocking().map(|r| r.map_err(|e| CaeError::Data(e.to_string())))
    }
    fn batches_per_epoch(&self) -> Option<u64> {
        Loader::batches_per_epoch(self)
    }
}

/// The same generated batch for ever (compute-only benchmarks: no decoding, the rest of the
/// step — upload, normalisation, tokenizer, forward, backward, optimizer — as in a run).
pub struct Synthetic(pub Batch);

impl BatchSource for Synthetic {
    fn next_batch(&self) -> Option<Result<Batch, CaeError>> {
        Some(Ok(self.0.clone()))
    }
    fn batches_per_epoch(&self) -> Option<u64> {
        None
    }
}

/// What the feeder sends: a batch, the end of the data (`Ok(None)`), or an error (then it stops).
type Msg<B> = Result<Option<DeviceBatch<B>>, CaeError>;

/// The feeder thread and the receiving end of its queue. Dropping it stops and joins the thread
/// (and drops the source it owns).
pub struct Feeder<B: Backend> {
    rx: Option<Receiver<Msg<B>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl<B: Backend> Feeder<B> {
    /// Starts the thread. It owns `source`; `tokenizer` runs on it (under the run's autocast).
    pub fn spawn(
        source: Box<dyn BatchSource>,
        config: RunConfig,
        tokenizer: Option<DalleEncoder<B>>,
        device: B::Device,
    ) -> Result<Self, CaeError> {
        let (tx, rx) = sync_channel::<Msg<B>>(DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("device-feeder".into())
            .spawn(move || {
                let body = AssertUnwindSafe(|| feed(source.as_ref(), &config, tokenizer.as_ref(), &device, &tx, &flag));
                if let Err(panic) = std::panic::catch_unwind(body) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    let _ = tx.send(Err(CaeError::Data(format!("the device feeder panicked: {what}"))));
                }
            })
            .map_err(|e| CaeError::Data(format!("starting the device feeder thread: {e}")))?;
        Ok(Self { rx: Some(rx), stop, handle: Some(handle) })
    }

    /// The next ready batch (`Ok(None)`: the data ended); adds the time waited to `wait`.
    pub fn next(&self, wait: &mut DataWait) -> Result<Option<DeviceBatch<B>>, CaeError> {
        let Some(rx) = &self.rx else { return Ok(None) };
        let t = Instant::now();
        let msg = loop {
            match rx.try_recv() {
                Ok(m) => break Some(m),
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) => {}
            }
            if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                continue;
            }
            match rx.recv_timeout(Duration::from_micros(200)) {
                Ok(m) => break Some(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break None,
            }
        };
        let now = Instant::now();
        match &msg {
            Some(Ok(Some(b))) => wait.add(t, now, b.loaded_at, b.ready_at),
            _ => wait.add(t, now, now, now),
        }
        msg.unwrap_or_else(|| Err(CaeError::Data("the device feeder stopped without a word".into())))
    }
}

impl<B: Backend> Drop for Feeder<B> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.rx.take()); // a feeder blocked in `send` sees the closed queue
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn feed<B: Backend>(
    source: &dyn BatchSource,
    config: &RunConfig,
    tokenizer: Option<&DalleEncoder<B>>,
    device: &B::Device,
    tx: &SyncSender<Msg<B>>,
    stop: &AtomicBool,
) {
    crate::amp::autocast(config.precision.dtype, || {
        while !stop.load(Ordering::SeqCst) {
            let msg = match source.next_batch() {
                None => Ok(None),
                Some(Err(e)) => Err(e),
                Some(Ok(batch)) => prepare(&batch, config, tokenizer, device).map(Some),
            };
            let last = !matches!(msg, Ok(Some(_)));
            if tx.send(msg).is_err() || last {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The tokenizer part of a wait is the overlap of the wait with the batch's preparation.
    #[test]
    fn tokenizer_wait_is_the_overlap_with_the_preparation() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = DataWait::default();
        // Waited 0..100 ms; the feeder prepared the batch 40..90 ms (waited on the pipeline before).
        w.add(at(0), at(100), at(40), at(90));
        assert!((w.total - 0.1).abs() < 1e-9 && (w.tokenizer - 0.05).abs() < 1e-9, "{w:?}");
        // A batch ready before the wait began adds no tokenizer time.
        w.add(at(200), at(201), at(150), at(190));
        assert!((w.total - 0.101).abs() < 1e-9 && (w.tokenizer - 0.05).abs() < 1e-9, "{w:?}");
        // Preparation spanning the whole wait: all of it is tokenizer time.
        w.add(at(300), at(310), at(250), at(400));
        assert!((w.tokenizer - 0.06).abs() < 1e-9, "{w:?}");
    }

    /// Bytes reach the device unchanged through both upload paths (u8 tensors, and i32 words
    /// unpacked on the device), including a length that is not a multiple of 4.
    #[test]
    fn both_upload_paths_carry_every_byte() {
        let dev = Default::default();
        let pixels: Vec<u8> = (0..2 * 3 * 5 * 5).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let want: Vec<f32> = pixels.iter().map(|&p| p as f32).collect();
        let direct = upload_pixels::<Flex, 4>(pixels.clone(), [2, 3, 5, 5], &dev);
        assert!(Flex::supports_dtype(&dev, DType::U8));
        let packed = upload_packed::<Flex, 4>(pixels, [2, 3, 5, 5], &dev);
        for t in [direct, packed] {
            assert_eq!(t.dims(), [2, 3, 5, 5]);
            assert_eq!(t.dtype(), DType::F32);
            assert_eq!(t.into_data().to_vec::<f32>().unwrap(), want);
        }
    }

    /// Device normalisation equals the pipeline's host normalisation (`Batch::views_f32`'s rule).
    #[test]
    fn device_normalisation_matches_the_host_formula() {
        let dev = Default::default();
        let s = 4;
        let pixels: Vec<u8> = (0..3 * s * s).map(|i| (i * 29 % 256) as u8).collect();
        let got = normalize_on_device::<Flex>(pixels.clone(), [1, 3, s, s], &dev).into_data().to_vec::<f32>().unwrap();
        for (i, (&p, g)) in pixels.iter().zip(got).enumerate() {
            let c = i / (s * s);
            let want = (p as f64 / 255.0 - IMAGENET_MEAN[c] as f64) / IMAGENET_STD[c] as f64;
            assert!((g as f64 - want).abs() < 1e-5, "pixel {i}: {g} vs {want}");
        }
    }
}
