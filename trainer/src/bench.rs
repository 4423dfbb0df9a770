//! `trainer bench`: steps/s and images/s of a preset on a device, first on one synthetic batch
//! (compute only: forward, backward, teacher copy, AdamW), then through the real pipeline (the
//! `trainer run` loop on a scratch run dir), with the data-wait fraction of step time.

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};

use crate::CaeError;
use crate::config::RunConfig;
use crate::model::{Cae, CaeTargets, TargetKind, mask_index_tensors, pixel_targets};
use crate::optim::CaeOptimizer;
use crate::train::{self, RunOptions, STEP_LOG, read_step_log};

/// Timings of one bench phase (warmup steps excluded).
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub steps: usize,
    pub seconds_per_step: f64,
    pub images_per_second: f64,
    /// Data wait / step time (0 for the synthetic phase).
    pub data_wait_fraction: f64,
}

/// A fixed mask with exactly `num_mask` patches per row: patch i of sample b is masked when
/// `(37 i + 11 b) mod N < num_mask` (a bijection of the patches whenever gcd(37, N) = 1).
pub fn synthetic_mask(batch: usize, n: usize, num_mask: usize) -> Vec<bool> {
    (0..batch).flat_map(|b| (0..n).map(move |i| (37 * i + 11 * b) % n < num_mask)).collect()
}

/// Compute only: `warmup + steps` optimizer steps on one synthetic batch already on the device.
pub fn synthetic<B: AutodiffBackend>(
    config: &RunConfig,
    warmup: usize,
    steps: usize,
    device: &B::Device,
) -> Result<BenchResult, CaeError> {
    let c = &config.model;
    let b = config.data.batch_size;
    B::seed(device, config.seed);
    let mut model = crate::model::init::with_seed(config.seed, || Cae::<B>::new(c, device))?;
    let mut optimizer = CaeOptimizer::new(&config.optim_config(), &model);
    let images = Tensor::<B, 4>::random([b, 3, c.img_size, c.img_size], Distribution::Normal(0.0, 1.0), device);
    let (vis, msk) = mask_index_tensors::<B>(
        &synthetic_mask(b, c.num_patches(), c.num_mask),
        b,
        c.num_patches(),
        c.num_mask,
        device,
    )?;
    let targets = match c.target {
        TargetKind::Pixels => CaeTargets::Pixels(pixel_targets(images.clone(), c.patch_size)),
        TargetKind::Dalle => {
            // Token ids of the right range; the tokenizer's own cost is not part of this phase.
            let ids =
                Tensor::<B, 2>::random([b, c.num_patches()], Distribution::Uniform(0.0, c.vocab_size as f64), device);
            CaeTargets::Tokens(ids.int().clamp(0, c.vocab_size as i64 - 1))
        }
    };
    let mut timed = 0.0;
    for s in 0..warmup + steps {
        let t = Instant::now();
        let out = model.forward(images.clone(), vis.clone(), msk.clone(), &targets)?;
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = model.update_teacher();
        let (m, _) = optimizer.step(1e-4, model, grads);
        model = m;
        let loss: f64 =
            out.loss.into_data().convert::<f64>().to_vec::<f64>().map_err(|e| CaeError::Data(format!("{e:?}")))?[0];
        if !loss.is_finite() {
            return Err(CaeError::NonFinite { what: "loss", step: s as u64 + 1, value: loss });
        }
        if s >= warmup {
            timed += t.elapsed().as_secs_f64();
        }
    }
    let per = timed / steps.max(1) as f64;
    Ok(BenchResult { steps, seconds_per_step: per, images_per_second: b as f64 / per, data_wait_fraction: 0.0 })
}

/// The real pipeline: `trainer run` for `warmup + steps` steps in `scratch` (removed afterwards).
pub fn pipeline<B: AutodiffBackend>(
    config: &RunConfig,
    shards: &str,
    warmup: usize,
    steps: usize,
    scratch: PathBuf,
    device: &B::Device,
) -> Result<BenchResult, CaeError> {
    let mut config = config.clone();
    config.schedule.total_steps = Some((warmup + steps) as u64);
    config.checkpoint.every = 0;
    config.log_every = u64::MAX;
    let opts = RunOptions {
        run_dir: scratch.clone(),
        shards: shards.to_string(),
        resume: None,
        stop: Default::default(),
        progress: false,
        init_from: None,
    };
    let result = train::run::<B>(&config, &opts, device).and_then(|_| read_step_log(&scratch.join(STEP_LOG)));
    let _ = std::fs::remove_dir_all(&scratch);
    let log = result?;
    let timed = &log[warmup.min(log.len())..];
    let (step, wait, images) = timed.iter().fold((0.0, 0.0, 0.0), |(s, w, i), l| {
        (s + l.step_seconds, w + l.data_wait_seconds, i + l.images_per_second * l.step_seconds)
    });
    let n = timed.len().max(1) as f64;
    Ok(BenchResult {
        steps: timed.len(),
        seconds_per_step: step / n,
        images_per_second: images / step.max(1e-12),
        data_wait_fraction: wait / step.max(1e-12),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_mask_has_the_exact_count_per_row() {
        for (n, k) in [(16, 6), (196, 75)] {
            let m = synthetic_mask(5, n, k);
            for row in m.chunks(n) {
                assert_eq!(row.iter().filter(|&&x| x).count(), k);
            }
            assert_ne!(m[..n], m[n..2 * n], "rows differ");
        }
    }

    #[test]
    fn synthetic_bench_runs_micro() {
        let c = RunConfig::resolve(None, &["data.batch_size=4".into(), "model.target=\"pixels\"".into()]).unwrap();
        let r = synthetic::<burn::backend::Autodiff<burn::backend::Flex>>(&c, 1, 2, &Default::default()).unwrap();
        assert_eq!(r.steps, 2);
        assert!(r.seconds_per_step > 0.0 && (r.images_per_second - 4.0 / r.seconds_per_step).abs() < 1e-6);
    }
}
