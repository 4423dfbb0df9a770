//! `trainer gpu-check`: the same weights and the same batch on the CPU reference backend and on a
//! device backend — the loss must agree — then the device's training-step throughput.
//!
//! Used by `tools/gpu-check.sh` on a GPU machine (base preset, batch 64, f32 and f16). The weights
//! travel between backends as a full-precision record (`BinBytesRecorder`), so both sides start
//! from bit-identical parameters; the batch is generated on the host from a seed. The pixel target
//! is used (no tokenizer weights needed); the forward pass is the full CAE forward (encoder,
//! teacher, regressor, decoder, both losses).

use std::time::Instant;

use burn::module::Module;
use burn::prelude::Backend;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::error::CaeError;
use crate::model::{Cae, CaeConfig, CaeTargets, TargetKind, pixel_targets};

type Rec = BinBytesRecorder<FullPrecisionSettings>;

/// A synthetic, seeded host batch: images in roughly normalised range and a valid mask.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub batch: usize,
    pub size: usize,
    pub images: Vec<f32>,
    pub visible: Vec<i64>,
    pub masked: Vec<i64>,
    pub n_vis: usize,
    pub n_mask: usize,
}

impl HostBatch {
    /// Smooth random images (a few sinusoids, values within about ±2) and a strided mask with
    /// exactly `cfg.num_mask` patches per row.
    pub fn new(cfg: &CaeConfig, batch: usize, seed: u64) -> Self {
        let s = cfg.img_size;
        let grid = s / cfg.patch_size;
        let n = grid * grid;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut images = Vec::with_capacity(batch * 3 * s * s);
        for _ in 0..batch * 3 {
            let (fx, fy, ph) = (1.0 + 6.0 * next(), 1.0 + 6.0 * next(), std::f64::consts::TAU * next());
            for y in 0..s {
                for x in 0..s {
                    let v = ((x as f64 / s as f64 * fx + ph).sin() + (y as f64 / s as f64 * fy).cos()) * 0.9;
                    images.push(v as f32);
                }
            }
        }
        let (mut visible, mut masked) = (Vec::new(), Vec::new());
        for _ in 0..batch {
            let offset = (next() * n as f64) as usize;
            let mut is_masked = vec![false; n];
            let mut count = 0;
            let mut i = 0;
            while count < cfg.num_mask {
                let p = (offset + i * 5) % n;
                if !is_masked[p] {
                    is_masked[p] = true;
                    count += 1;
                }
                i += 1;
            }
            for (p, &m) in is_masked.iter().enumerate() {
                if m { masked.push(p as i64) } else { visible.push(p as i64) }
            }
        }
        Self { batch, size: s, images, visible, masked, n_vis: n - cfg.num_mask, n_mask: cfg.num_mask }
    }

    fn tensors<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let s = self.size;
        (
            Tensor::from_data(TensorData::new(self.images.clone(), [self.batch, 3, s, s]), device),
            Tensor::from_data(TensorData::new(self.visible.clone(), [self.batch, self.n_vis]), device),
            Tensor::from_data(TensorData::new(self.masked.clone(), [self.batch, self.n_mask]), device),
        )
    }
}

/// Weights made once (on the CPU), to load on any backend.
pub fn reference_weights<B: Backend>(cfg: &CaeConfig, seed: u64, device: &B::Device) -> Result<Vec<u8>, CaeError> {
    let model = crate::model::init::with_seed(seed, || Cae::<B>::new(cfg, device))?;
    Rec::default().record(model.into_record(), ()).map_err(|e| CaeError::Config(format!("recording weights: {e}")))
}

fn load<B: Backend>(cfg: &CaeConfig, weights: &[u8], device: &B::Device) -> Result<Cae<B>, CaeError> {
    let record =
        Rec::default().load(weights.to_vec(), device).map_err(|e| CaeError::Config(format!("loading weights: {e}")))?;
    Ok(Cae::<B>::new(cfg, device)?.load_record(record))
}

/// Loss of one forward pass with the given weights and batch.
pub fn loss_of<B: Backend>(
    cfg: &CaeConfig,
    weights: &[u8],
    batch: &HostBatch,
    device: &B::Device,
) -> Result<f64, CaeError> {
    let model = load::<B>(cfg, weights, device)?;
    let (images, vis, msk) = batch.tensors::<B>(device);
    let targets = CaeTargets::Pixels(pixel_targets(images.clone(), cfg.patch_size));
    let out = model.forward(images, vis, msk, &targets)?;
    let v: Vec<f32> = out.loss.into_data().convert::<f32>().to_vec().map_err(|e| CaeError::Config(format!("{e:?}")))?;
    Ok(v.first().copied().unwrap_or(f32::NAN) as f64)
}

/// Result of timing forward + backward on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub loss: f64,
    pub steps: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Forward + backward `steps` times (after one warm-up), reading the loss back each step so the
/// work is really done.
pub fn time_steps<B: AutodiffBackend>(
    cfg: &CaeConfig,
    weights: &[u8],
    batch: &HostBatch,
    steps: usize,
    device: &B::Device,
) -> Result<StepTiming, CaeError> {
    let model = load::<B>(cfg, weights, device)?;
    let (images, vis, msk) = batch.tensors::<B>(device);
    let targets = CaeTargets::Pixels(pixel_targets(images.clone(), cfg.patch_size));
    let step = || -> Result<f64, CaeError> {
        let out = model.forward(images.clone(), vis.clone(), msk.clone(), &targets)?;
        let loss = out.loss.clone();
        let _grads = out.loss.backward();
        let v: Vec<f32> = loss.into_data().convert::<f32>().to_vec().map_err(|e| CaeError::Config(format!("{e:?}")))?;
        Ok(v.first().copied().unwrap_or(f32::NAN) as f64)
    };
    let first = step()?;
    let t = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(StepTiming { loss: first, steps, seconds, images_per_second: (steps * batch.batch) as f64 / seconds.max(1e-9) })
}

/// The preset used by the GPU check, with the pixel target.
pub fn check_config(preset: &str) -> Result<CaeConfig, CaeError> {
    let mut cfg = match preset {
        "base" => CaeConfig::base(),
        "small" => CaeConfig::small(),
        "tiny" => CaeConfig::tiny(),
        "micro" => CaeConfig::micro(),
        other => return Err(CaeError::Config(format!("unknown preset {other:?} (base, small, tiny, micro)"))),
    };
    cfg.target = TargetKind::Pixels;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn weights_travel_exactly_and_losses_agree_across_model_instances() {
        let cfg = check_config("micro").unwrap();
        let dev = Default::default();
        let w = reference_weights::<Flex>(&cfg, 3, &dev).unwrap();
        let batch = HostBatch::new(&cfg, 4, 9);
        assert_eq!(batch.masked.len(), 4 * cfg.num_mask);
        let a = loss_of::<Flex>(&cfg, &w, &batch, &dev).unwrap();
        let b = loss_of::<Autodiff<Flex>>(&cfg, &w, &batch, &dev).unwrap();
        assert!(a.is_finite() && a > 0.0);
        // Autodiff<Flex> takes other kernels for a few ops: agreement within float tolerance.
        assert!(((a - b) / a).abs() < 1e-5, "same weights and batch must give the same loss: {a} vs {b}");
        // Other weights give another loss: the record really carries the parameters.
        let w2 = reference_weights::<Flex>(&cfg, 4, &dev).unwrap();
        assert_ne!(a, loss_of::<Flex>(&cfg, &w2, &batch, &dev).unwrap());
        let t = time_steps::<Autodiff<Flex>>(&cfg, &w, &batch, 2, &dev).unwrap();
        assert!(((t.loss - b) / b).abs() < 1e-6, "{} vs {b}", t.loss);
        assert!(t.images_per_second > 0.0);
    }
}
