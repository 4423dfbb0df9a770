//! `trainer bench`: the whole training step of a preset on a device, timed through the
//! `trainer run` loop itself (device feeder, u8 upload, normalisation, the tokenizer for the
//! `dalle` target, forward, backward, teacher copy, clipping, AdamW, lazy read-backs), on a
//! scratch run directory:
//! - **synthetic**: one generated batch repeated (no decoding): what the device can do;
//! - **pipeline**: the real data pipeline on shards: what the run will do.
//!
//! Each reports images/s, step time, the data-wait fraction, host syncs per step and the model
//! FLOP utilisation ([`crate::flops`]) against `--peak-tflops`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use cae_pipeline::Batch;
use serde::Serialize;

use crate::CaeError;
use crate::config::RunConfig;
use crate::train::{self, BatchSource, RunOptions, STEP_LOG, StepLog, Synthetic, read_step_log};

/// Timings of one bench phase (warmup steps excluded).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub steps: usize,
    pub seconds_per_step: f64,
    pub images_per_second: f64,
    /// Data wait / step time.
    pub data_wait_fraction: f64,
    /// Blocking device -> host reads per step.
    pub host_syncs_per_step: f64,
    /// Model FLOPs per second achieved (FLOPs per image x images/s).
    pub tflops: f64,
    /// `tflops / peak`, when a peak was given.
    pub mfu: Option<f64>,
}

/// A [`BenchResult`] from a run's step log (steps after `warmup`).
pub fn summarize(log: &[StepLog], warmup: usize, flops_per_image: f64, peak_tflops: Option<f64>) -> BenchResult {
    let timed = &log[warmup.min(log.len())..];
    let (step, wait, images, syncs) = timed.iter().fold((0.0, 0.0, 0.0, 0u64), |(s, w, i, h), l| {
        (s + l.step_seconds, w + l.data_wait_seconds, i + l.images_per_second * l.step_seconds, h + l.host_syncs)
    });
    let n = timed.len().max(1) as f64;
    let images_per_second = images / f64::max(step, 1e-12);
    let tflops = flops_per_image * images_per_second / 1e12;
    BenchResult {
        steps: timed.len(),
        seconds_per_step: step / n,
        images_per_second,
        data_wait_fraction: wait / f64::max(step, 1e-12),
        host_syncs_per_step: syncs as f64 / n,
        tflops,
        mfu: peak_tflops.filter(|p| *p > 0.0).map(|p| tflops / p),
    }
}

/// Runs `warmup + steps` steps of `config` in `scratch` (removed afterwards) from `source`.
fn timed_run<B: AutodiffBackend>(
    config: &RunConfig,
    shards: &str,
    warmup: usize,
    steps: usize,
    scratch: &Path,
    device: &B::Device,
    source: Option<Box<dyn BatchSource>>,
) -> Result<Vec<StepLog>, CaeError> {
    let mut config = config.clone();
    config.schedule.total_steps = Some((warmup + steps) as u64);
    config.checkpoint.every = 0;
    config.log_every = u64::MAX; // values read once, at the end: as a long run between log steps
    let opts =
        RunOptions { run_dir: scratch.to_path_buf(), shards: shards.to_string(), quiet: true, ..RunOptions::default() };
    let result = match source {
        Some(source) => train::run_from::<B>(&config, &opts, device, |_| Ok(source)),
        None => train::run::<B>(&config, &opts, device),
    };
    let log = result.and_then(|_| read_step_log(&scratch.join(STEP_LOG)));
    let _ = std::fs::remove_dir_all(scratch);
    log
}

/// Compute only: one generated batch of the config's shape, repeated.
pub fn synthetic<B: AutodiffBackend>(
    config: &RunConfig,
    warmup: usize,
    steps: usize,
    scratch: PathBuf,
    device: &B::Device,
) -> Result<Vec<StepLog>, CaeError> {
    let c = &config.model;
    let batch =
        Batch::synthetic(config.data.batch_size, c.img_size, c.img_size / 2, c.grid_size(), c.num_mask, config.seed);
    timed_run::<B>(config, "synthetic", warmup, steps, &scratch, device, Some(Box::new(Synthetic(batch))))
}

/// The real pipeline on `shards`.
pub fn pipeline<B: AutodiffBackend>(
    config: &RunConfig,
    shards: &str,
    warmup: usize,
    steps: usize,
    scratch: PathBuf,
    device: &B::Device,
) -> Result<Vec<StepLog>, CaeError> {
    timed_run::<B>(config, shards, warmup, steps, &scratch, device, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step_seconds: f64, wait: f64, images: f64, syncs: u64) -> StepLog {
        StepLog {
            step: 1,
            loss: 1.0,
            loss_main: 1.0,
            loss_align: 0.0,
            lr: 0.0,
            grad_norm: 1.0,
            step_seconds,
            data_wait_seconds: wait,
            images_per_second: images / step_seconds,
            host_syncs: syncs,
            allreduce_seconds: None,
        }
    }

    #[test]
    fn summary_skips_warmup_and_weights_by_time() {
        let log = vec![line(10.0, 5.0, 4.0, 3), line(1.0, 0.1, 4.0, 0), line(3.0, 0.0, 4.0, 1)];
        let r = summarize(&log, 1, 1e12, Some(4.0));
        assert_eq!(r.steps, 2);
        assert!((r.seconds_per_step - 2.0).abs() < 1e-12);
        assert!((r.images_per_second - 2.0).abs() < 1e-12, "8 images in 4 s");
        assert!((r.data_wait_fraction - 0.025).abs() < 1e-12);
        assert!((r.host_syncs_per_step - 0.5).abs() < 1e-12);
        assert!((r.tflops - 2.0).abs() < 1e-9 && (r.mfu.unwrap() - 0.5).abs() < 1e-9);
        assert!(summarize(&log, 1, 1e12, None).mfu.is_none());
    }

    /// The synthetic phase runs the real loop: the tokenizer for the dalle target, and the
    /// f32 run reads its values once, at the end.
    #[test]
    fn synthetic_bench_runs_the_training_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let sets = ["data.batch_size=4", "model.target=\"dalle\"", "tokenizer.random_init=true"].map(String::from);
        let c = RunConfig::resolve(None, &sets).unwrap();
        let log = synthetic::<burn::backend::Autodiff<burn::backend::Flex>>(
            &c,
            1,
            3,
            tmp.path().join("s"),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(log.len(), 4);
        assert!(log.iter().all(|l| l.loss.is_finite()));
        // Initial CE of a random head over 512 tokens is about ln 512: the tokenizer ran.
        assert!((log[0].loss_main - 512f64.ln()).abs() < 0.5, "{}", log[0].loss_main);
        let syncs: Vec<u64> = log.iter().map(|l| l.host_syncs).collect();
        assert_eq!(syncs, vec![1, 0, 0, 1], "first line, then the final read");
        assert!(!tmp.path().join("s").exists(), "scratch removed");
    }
}
