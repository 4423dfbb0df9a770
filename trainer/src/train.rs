//! The training loop of `trainer run`: pipeline batches -> device -> CAE step -> logs,
//! metrics and checkpoints. Generic over the autodiff backend; the binary picks it.
//!
//! One optimizer step `t` (0-based; spec §2.2, §4):
//! 1. for each of `accumulation_steps` micro-batches: forward, backward (loss / k); right after
//!    the backward the **next** batch is taken from the loader and uploaded, so on an async
//!    device the upload and the tokenizer run while the step's kernels run. The time the loop
//!    is blocked in the loader is the step's `data_wait_seconds`;
//! 2. non-finite loss: stop with the step number (the last good checkpoint stays);
//! 3. teacher hard copy (`update_teacher`), **before** the optimizer update;
//! 4. AdamW with `lr(t)` (so `lr(0) = 0`), global-norm clipping inside [`CaeOptimizer`];
//! 5. one JSONL line in `<run>/metrics.jsonl`, Prometheus series, progress bar;
//! 6. a checkpoint every `checkpoint.every` steps, at the end, and when a signal asked to stop.
//!
//! Normalisation of the u8 views happens on the device (spec §1 step 6), in the inner
//! (non-autodiff) backend, so no graph is recorded for it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use cae_pipeline::batch::{IMAGENET_MEAN, IMAGENET_STD};
use cae_pipeline::{Batch, Loader, LoaderState};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::CaeError;
use crate::checkpoint::{self, Checkpoint, CheckpointHeader, encode_record};
use crate::config::RunConfig;
use crate::metrics as m;
use crate::model::dalle_weights::load_dalle;
use crate::model::{Cae, CaeTargets, DalleEncoder, TargetKind, map_pixels, pixel_targets};
use crate::optim::CaeOptimizer;
use crate::precision::{LossScaler, ScaleDecision};

/// Name of the per-step log in the run dir.
pub const STEP_LOG: &str = "metrics.jsonl";
/// Name of the resolved config in the run dir.
pub const CONFIG_FILE: &str = "config.toml";
/// Test hook: after completing this step (and its checkpoint, if due) the loop prints
/// `hang after step N` to stderr and sleeps forever, so a test can kill -9 it at a known point.
pub const HANG_ENV: &str = "CAE_TRAINER_TEST_HANG_AFTER_STEP";

/// One line of `metrics.jsonl` (one per optimizer step). `step` counts completed steps
/// (1-based); `lr` is the rate that step used, `lr(step - 1)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub loss_main: f64,
    pub loss_align: f64,
    pub lr: f64,
    /// `null` in the file (NaN here) for a step skipped on loss-scale overflow.
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    pub step_seconds: f64,
    pub data_wait_seconds: f64,
    pub images_per_second: f64,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Where and how a run goes (the config says what it is).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Run directory: config, step log, checkpoints.
    pub run_dir: PathBuf,
    /// Shard source (path, brace pattern, manifest directory, URLs; see `cae_pipeline::source`).
    pub shards: String,
    /// Checkpoint to resume from (a file).
    pub resume: Option<PathBuf>,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, return.
    pub stop: Arc<AtomicBool>,
    /// Draw a progress bar (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Initial weights of a fresh run (ignored on resume): an mmselfsup CAE checkpoint (`.pth`)
    /// or one of our checkpoints (model weights only; optimizer, step and data start fresh).
    pub init_from: Option<PathBuf>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// Completed steps when the run started (0, or the checkpoint's step).
    pub start_step: u64,
    /// Completed steps at the end.
    pub end_step: u64,
    /// Steps of the whole schedule.
    pub total_steps: u64,
    /// Loss of the first step of this invocation and of the last one.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Mean loss over the first / last (up to) 10 % of this invocation's steps.
    pub early_mean_loss: Option<f64>,
    pub late_mean_loss: Option<f64>,
    pub seconds: f64,
    /// Sum of data wait over sum of step time.
    pub data_wait_fraction: f64,
    pub last_checkpoint: Option<PathBuf>,
    /// Stopped by a signal before the end of the schedule.
    pub interrupted: bool,
}

/// A batch on the device, ready for the step.
struct DeviceBatch<B: AutodiffBackend> {
    images: Tensor<B, 4>,
    visible: Tensor<B, 2, Int>,
    masked: Tensor<B, 2, Int>,
    targets: CaeTargets<B>,
    resume: LoaderState,
    epoch: u64,
    size: usize,
}

/// `u32` host indices `[b, n]` as a device int tensor.
fn index_tensor<B: Backend>(idx: &[u32], b: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = idx.len() / b.max(1);
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [b, n]), device)
}

/// Planar u8 images `[b, 3, s, s]` uploaded and normalised on the device with the ImageNet
/// mean/std: `(x / 255 - mean) / std`.
pub fn normalize_on_device<B: Backend>(pixels: Vec<u8>, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    let raw = Tensor::<B, 4>::from_data(TensorData::new(pixels, shape), device); // [b, 3, s, s] 0..255
    let mean = Tensor::<B, 1>::from_floats(IMAGENET_MEAN, device).reshape([1, 3, 1, 1]);
    let std = Tensor::<B, 1>::from_floats(IMAGENET_STD, device).reshape([1, 3, 1, 1]);
    (raw / 255.0 - mean) / std // [b, 3, s, s]
}

/// Uploads a batch and normalises it on the device; computes the targets (tokenizer or pixels).
fn upload<B: AutodiffBackend>(
    batch: &Batch,
    config: &RunConfig,
    tokenizer: Option<&DalleEncoder<B::InnerBackend>>,
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
    let images = normalize_on_device::<B::InnerBackend>(batch.views.clone(), [b, 3, s, s], device); // spec §1 step 6
    let targets = match (c.target, tokenizer) {
        (TargetKind::Dalle, Some(tok)) => {
            let tv = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(batch.token_views.clone(), [b, 3, t, t]),
                device,
            );
            let tokens = tok.tokens(map_pixels(tv / 255.0)); // [b, N]
            CaeTargets::Tokens(Tensor::from_inner(tokens))
        }
        (TargetKind::Dalle, None) => return Err(CaeError::Config("dalle target without a tokenizer".into())),
        (TargetKind::Pixels, _) => CaeTargets::Pixels(Tensor::from_inner(pixel_targets(images.clone(), c.patch_size))),
    };
    Ok(DeviceBatch {
        images: Tensor::from_inner(images),
        visible: index_tensor(&batch.visible, b, device),
        masked: index_tensor(&batch.masked, b, device),
        targets,
        resume: batch.resume,
        epoch: batch.epoch,
        size: b,
    })
}

/// Blocks for the next batch; adds the blocked time to `wait`. `Ok(None)`: the loader ended.
fn fetch<B: AutodiffBackend>(
    loader: &Loader,
    config: &RunConfig,
    tokenizer: Option<&DalleEncoder<B::InnerBackend>>,
    device: &B::Device,
    wait: &mut f64,
) -> Result<Option<DeviceBatch<B>>, CaeError> {
    let t = Instant::now();
    let next = loader.next_blocking();
    *wait += t.elapsed().as_secs_f64();
    match next {
        None => Ok(None),
        Some(Err(e)) => Err(CaeError::Data(e.to_string())),
        Some(Ok(batch)) => upload(&batch, config, tokenizer, device).map(Some),
    }
}

fn floats<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Result<Vec<f64>, CaeError> {
    t.into_data().convert::<f64>().to_vec::<f64>().map_err(|e| CaeError::Data(format!("reading a scalar: {e:?}")))
}

/// Keeps the lines of the step log up to `step` (a resumed run rewrites what came after).
fn truncate_step_log(path: &Path, step: u64) -> Result<(), CaeError> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(path, kept).map_err(CaeError::io(path))
}

/// Reads a step log (`metrics.jsonl`).
pub fn read_step_log(path: &Path) -> Result<Vec<StepLog>, CaeError> {
    let text = fs::read_to_string(path).map_err(CaeError::io(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| CaeError::Data(format!("{}: {e}", path.display()))))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn save<B: AutodiffBackend>(
    run_dir: &Path,
    config: &RunConfig,
    config_toml: &str,
    shards: &str,
    step: u64,
    loader: LoaderState,
    loss: Option<f64>,
    model: &Cae<B>,
    optimizer: &CaeOptimizer<B, Cae<B>>,
    tokenizer: Option<&DalleEncoder<B::InnerBackend>>,
    scaler: &LossScaler,
) -> Result<PathBuf, CaeError> {
    let t = Instant::now();
    let mut sections = vec![
        ("model", encode_record::<B, _>(model.clone().into_record())?),
        ("optimizer", encode_record::<B, _>(optimizer.to_record())?),
    ];
    if let Some(tok) = tokenizer.filter(|_| config.tokenizer.weights.is_none()) {
        sections.push(("tokenizer", encode_record::<B::InnerBackend, _>(tok.clone().into_record())?));
    }
    let header = CheckpointHeader {
        step,
        loader,
        config: config_toml.to_string(),
        loss,
        shards: Some(shards.to_string()),
        loss_scaler: scaler.enabled.then_some(*scaler),
        sections: Vec::new(),
        section_crc32: Vec::new(),
    };
    let path = checkpoint::write(run_dir, &header, &sections, config.checkpoint.keep_last)?;
    ::metrics::counter!(m::CHECKPOINTS).increment(1);
    ::metrics::histogram!(m::CHECKPOINT_SECONDS).record(t.elapsed().as_secs_f64());
    Ok(path)
}

/// Whether every float parameter of `module` is finite (checked before a checkpoint is written).
pub fn all_finite<B: Backend, M: Module<B>>(module: &M) -> bool {
    struct V(bool);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.0 {
                let v = p.val();
                let bad = (v.clone().is_nan().int().sum() + v.is_inf().int().sum()).into_scalar().elem::<i64>();
                self.0 = bad == 0;
            }
        }
    }
    let mut v = V(true);
    module.visit(&mut v);
    v.0
}

fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() { println!("{line}") } else { pb.println(line) }
}

/// Runs (or resumes) a pre-training run until the end of its schedule or a stop signal.
pub fn run<B: AutodiffBackend>(
    config: &RunConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary, CaeError> {
    let started = Instant::now();
    let run_dir = &opts.run_dir;
    fs::create_dir_all(run_dir).map_err(CaeError::io(run_dir))?;
    let config_toml = config.to_toml()?;
    let config_path = run_dir.join(CONFIG_FILE);
    fs::write(&config_path, &config_toml).map_err(CaeError::io(&config_path))?;

    let shards =
        cae_pipeline::source::expand(&opts.shards).map_err(|e| CaeError::Data(format!("{}: {e}", opts.shards)))?;

    // Model, tokenizer and optimizer; a checkpoint overwrites all of them.
    // Initial weights come from the seed alone (model/init.rs); burn's RNG, seeded too, serves
    // the per-step randomness (drop path).
    B::seed(device, config.seed);
    let (mut model, mut tokenizer) = crate::model::init::with_seed(config.seed, || -> Result<_, CaeError> {
        let model = Cae::<B>::new(&config.model, device)?;
        let dalle = config.model.target == TargetKind::Dalle;
        Ok((model, dalle.then(|| config.model.tokenizer.init::<B::InnerBackend>(device))))
    })?;
    // Real DALL-E weights come from their file (also on resume); a random tokenizer from the
    // checkpoint.
    if let Some(path) = &config.tokenizer.weights
        && let Some(tok) = tokenizer.take()
    {
        tokenizer = Some(load_dalle(tok, path)?);
    }
    let (mut step, loader_state) = match &opts.resume {
        Some(path) => {
            let ck = Checkpoint::read(path)?;
            model = model.load_record(ck.record::<B, _>("model", device)?);
            if config.tokenizer.weights.is_none()
                && let Some(tok) = tokenizer.take()
            {
                tokenizer = Some(tok.load_record(ck.record::<B::InnerBackend, _>("tokenizer", device)?));
            }
            (ck.header.step, ck.header.loader)
        }
        None => {
            if let Some(path) = &opts.init_from {
                model = init_weights(model, path, config, device)?;
            }
            (0, LoaderState::default())
        }
    };
    let mut optimizer = CaeOptimizer::new(&config.optim_config(), &model);
    let mut scaler = LossScaler::new(&config.precision);
    if let Some(path) = &opts.resume {
        let ck = Checkpoint::read(path)?;
        optimizer = optimizer.load_record(ck.record::<B, _>("optimizer", device)?);
        if let Some(s) = ck.header.loss_scaler.filter(|_| scaler.enabled) {
            scaler = s;
        }
    }
    let log_path = run_dir.join(STEP_LOG);
    truncate_step_log(&log_path, step)?;
    let mut log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(CaeError::io(&log_path))?;

    let loader = Loader::new(config.data.clone(), shards, loader_state).map_err(|e| CaeError::Data(e.to_string()))?;
    let accum = config.optimizer.accumulation_steps;
    let per_epoch = loader.batches_per_epoch().map(|b| b / accum as u64);
    let schedule = config.lr_schedule(per_epoch)?;
    let total = schedule.total_iters as u64;
    let start_step = step;

    let pb = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} elapsed {elapsed} ETA {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_position(step);
    pb.reset_eta();

    let mut summary = RunSummary {
        run_dir: run_dir.clone(),
        start_step,
        end_step: step,
        total_steps: total,
        first_loss: None,
        last_loss: None,
        early_mean_loss: None,
        late_mean_loss: None,
        seconds: 0.0,
        data_wait_fraction: 0.0,
        last_checkpoint: None,
        interrupted: false,
    };
    if step >= total {
        say(&pb, format!("nothing to do: step {step} is the end of the schedule ({total} steps)"));
        return Ok(summary);
    }

    let tok = tokenizer.as_ref();
    let hang_after: Option<u64> = std::env::var(HANG_ENV).ok().and_then(|v| v.parse().ok());
    let mut wait_first = 0.0;
    let mut pending: Option<DeviceBatch<B>> = fetch::<B>(&loader, config, tok, device, &mut wait_first)?;
    let mut losses: Vec<f64> = Vec::new();
    let (mut sum_wait, mut sum_step) = (0.0f64, 0.0f64);
    let mut last_resume = loader_state;
    let mut data_ended = false;
    let mut carried_wait = wait_first;

    while step < total {
        let step_start = Instant::now();
        let mut data_wait = std::mem::take(&mut carried_wait);
        let mut acc = GradientsAccumulator::<Cae<B>>::new();
        let mut single: Option<GradientsParams> = None;
        let (mut loss, mut loss_main, mut loss_align, mut images) = (0.0, 0.0, 0.0, 0usize);
        let mut epoch = 0;
        let mut loss_overflow = false;
        for micro in 0..accum {
            let Some(batch) = pending.take() else {
                data_ended = true;
                break;
            };
            let out = model.forward(batch.images, batch.visible, batch.masked, &batch.targets)?;
            let mut scaled = if accum == 1 { out.loss.clone() } else { out.loss.clone() / accum as f64 };
            if scaler.enabled {
                scaled = scaled.mul_scalar(scaler.scale()); // f16 loss scaling (GradScaler)
            }
            let grads = GradientsParams::from_grads(scaled.backward(), &model);
            // Prefetch: the next batch is uploaded while this step's kernels run (async devices).
            let last_of_run = step + 1 == total && micro + 1 == accum;
            if !last_of_run {
                pending = fetch::<B>(&loader, config, tok, device, &mut data_wait)?;
            }
            let values = floats(Tensor::cat(vec![out.loss.inner(), out.loss_main.inner(), out.loss_align.inner()], 0))?;
            if !values[0].is_finite() {
                if !scaler.enabled {
                    pb.abandon();
                    return Err(CaeError::NonFinite { what: "loss", step: step + 1, value: values[0] });
                }
                loss_overflow = true;
            }
            loss += values[0] / accum as f64;
            loss_main += values[1] / accum as f64;
            loss_align += values[2] / accum as f64;
            images += batch.size;
            last_resume = batch.resume;
            epoch = batch.epoch;
            if accum == 1 {
                single = Some(grads);
            } else {
                acc.accumulate(&model, grads);
            }
        }
        if data_ended && images == 0 {
            say(&pb, "the data pipeline ended (data.epochs reached); stopping".into());
            break;
        }
        let grads = single.unwrap_or_else(|| acc.grads());
        let lr = schedule.lr(step as usize);
        model = model.update_teacher(); // spec §2.2: hard copy before the update
        let loss_scale = scaler.scale();
        let (updated, grad_norm, applied) =
            if loss_overflow { (model, f64::NAN, false) } else { optimizer.step_scaled(lr, model, grads, loss_scale) };
        model = updated;
        step += 1;
        match scaler.update(applied) {
            ScaleDecision::Apply => {}
            ScaleDecision::Skip => {
                ::metrics::counter!(m::SKIPPED_STEPS).increment(1);
                say(
                    &pb,
                    format!(
                        "step {step}: {} overflowed at loss scale {loss_scale}; update skipped, scale -> {}",
                        if loss_overflow { "the loss" } else { "the gradients" },
                        scaler.scale()
                    ),
                );
            }
            ScaleDecision::Diverged => {
                pb.abandon();
                let (what, value) = if loss_overflow { ("loss", loss) } else { ("gradient norm", grad_norm) };
                return Err(CaeError::NonFinite { what, step, value });
            }
        }
        ::metrics::gauge!(m::LOSS_SCALE).set(scaler.scale());

        let step_seconds = step_start.elapsed().as_secs_f64();
        let entry = StepLog {
            step,
            loss,
            loss_main,
            loss_align,
            lr,
            grad_norm,
            step_seconds,
            data_wait_seconds: data_wait,
            images_per_second: images as f64 / step_seconds.max(1e-9),
        };
        let line = serde_json::to_string(&entry).map_err(|e| CaeError::Data(e.to_string()))?;
        writeln!(log, "{line}").map_err(CaeError::io(&log_path))?;
        ::metrics::counter!(m::STEPS).increment(1);
        ::metrics::counter!(m::IMAGES).increment(images as u64);
        ::metrics::gauge!(m::LOSS).set(loss);
        ::metrics::gauge!(m::LOSS_MAIN).set(loss_main);
        ::metrics::gauge!(m::LOSS_ALIGN).set(loss_align);
        ::metrics::gauge!(m::LR).set(lr);
        ::metrics::gauge!(m::GRAD_NORM).set(grad_norm);
        ::metrics::histogram!(m::STEP_SECONDS).record(step_seconds);
        ::metrics::histogram!(m::DATA_WAIT_SECONDS).record(data_wait);
        ::metrics::gauge!(m::IMAGES_PER_SECOND).set(entry.images_per_second);
        ::metrics::gauge!(m::EPOCH).set(epoch as f64);
        sum_wait += data_wait;
        sum_step += step_seconds;
        losses.push(loss);
        summary.first_loss.get_or_insert(loss);
        summary.last_loss = Some(loss);
        pb.set_position(step);
        pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} img/s", entry.images_per_second));
        if step == start_step + 1 || step % config.log_every.max(1) == 0 || step == total {
            say(
                &pb,
                format!(
                    "step {step:>6}/{total}  loss {loss:.4} (main {loss_main:.4}, align {loss_align:.4})  lr {lr:.3e}  \
                     |g| {grad_norm:.3}  {:.0} img/s  data wait {:.1}%",
                    entry.images_per_second,
                    100.0 * data_wait / step_seconds.max(1e-9)
                ),
            );
        }

        let stop = opts.stop.load(Ordering::SeqCst);
        let every = config.checkpoint.every;
        if stop || step == total || data_ended || (every > 0 && step.is_multiple_of(every)) {
            if !all_finite(&model) {
                pb.abandon();
                return Err(CaeError::NonFinite { what: "weights", step, value: f64::NAN });
            }
            let path = save(
                run_dir,
                config,
                &config_toml,
                &opts.shards,
                step,
                last_resume,
                Some(loss),
                &model,
                &optimizer,
                tokenizer.as_ref(),
                &scaler,
            )?;
            if stop || step == total || data_ended {
                say(&pb, format!("checkpoint {}", path.display()));
            }
            summary.last_checkpoint = Some(path);
        }
        if hang_after == Some(step) {
            eprintln!("hang after step {step}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        if stop {
            summary.interrupted = step < total;
            say(&pb, format!("stopped by signal after step {step}"));
            break;
        }
        if data_ended {
            break;
        }
    }
    pb.finish_and_clear();
    log.flush().map_err(CaeError::io(&log_path))?;
    drop(loader);

    if !losses.is_empty() {
        let tenth = (losses.len() / 10).max(1);
        summary.early_mean_loss = Some(losses[..tenth].iter().sum::<f64>() / tenth as f64);
        summary.late_mean_loss = Some(losses[losses.len() - tenth..].iter().sum::<f64>() / tenth as f64);
    }
    summary.end_step = step;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.data_wait_fraction = if sum_step > 0.0 { sum_wait / sum_step } else { 0.0 };
    Ok(summary)
}

/// The model of a checkpoint (for export and evaluation), on `device`.
/// Model weights of a fresh run from `path` (see [`RunOptions::init_from`]).
fn init_weights<B: AutodiffBackend>(
    model: Cae<B>,
    path: &Path,
    config: &RunConfig,
    device: &B::Device,
) -> Result<Cae<B>, CaeError> {
    if crate::model::mmselfsup_weights::is_torch_checkpoint(path) {
        let (model, r) = crate::model::mmselfsup_weights::load_mmselfsup(model, path)?;
        tracing::info!("initial weights from {} ({} form, {} tensors)", path.display(), r.form, r.loaded);
        println!(
            "initial weights: {} (mmselfsup {} checkpoint: encoder{}{})",
            path.display(),
            r.form,
            if r.teacher { ", teacher" } else { "; teacher = encoder copy" },
            if r.neck { ", regressor and decoder" } else { "; regressor and decoder freshly initialised" }
        );
        return Ok(model);
    }
    let ckpt = crate::checkpoint::locate(path)?;
    let ck = Checkpoint::read(&ckpt)?;
    let theirs = RunConfig::from_resolved_toml(&ck.header.config)?;
    if theirs.model != config.model {
        return Err(CaeError::Checkpoint {
            path: ckpt,
            reason: "its model config differs from this run's (preset, sizes or target)".into(),
        });
    }
    println!("initial weights: {} (step {}; optimizer and data start fresh)", ckpt.display(), ck.header.step);
    Ok(model.load_record(ck.record::<B, _>("model", device)?))
}

pub fn load_model<B: Backend>(path: &Path, device: &B::Device) -> Result<(Cae<B>, RunConfig, u64), CaeError> {
    let ck = Checkpoint::read(path)?;
    let config = RunConfig::from_resolved_toml(&ck.header.config)?;
    let model = Cae::<B>::new(&config.model, device)?;
    let model = model.load_record(ck.record::<B, _>("model", device)?);
    Ok((model, config, ck.header.step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type AB = Autodiff<Flex>;

    fn shards(dir: &Path) -> PathBuf {
        let spec =
            cae_tools::fixtures::FixtureSpec { classes: 2, per_class: 12, seed: 1, odd_files: false, max_side: 120 };
        let fx = cae_tools::fixtures::generate(&dir.join("img"), &spec).unwrap();
        let out = dir.join("shards");
        let mut o = cae_sharder::BuildOptions::new(&fx.train_dir, &out);
        o.shard_max_samples = 10;
        o.workers = 1;
        cae_sharder::build(&o).unwrap();
        out
    }

    fn opts(run_dir: PathBuf, shards: &Path, resume: Option<PathBuf>) -> RunOptions {
        RunOptions {
            run_dir,
            shards: shards.to_string_lossy().into_owned(),
            resume,
            stop: Arc::new(AtomicBool::new(false)),
            progress: false,
            init_from: None,
        }
    }

    /// 8 steps of micro (pixels target) from the weights of `init` (so that runs compared with
    /// each other start from the same weights even while other tests use burn's global RNG).
    fn precision_run(tmp: &Path, data: &Path, init: &Path, name: &str, extra: &[&str]) -> Vec<StepLog> {
        let mut sets: Vec<String> = [
            "model.target=\"pixels\"",
            "data.batch_size=4",
            "data.workers=1",
            "data.shuffle_buffer=8",
            "schedule.total_steps=8",
            "checkpoint.every=4",
        ]
        .map(String::from)
        .to_vec();
        sets.extend(extra.iter().map(|s| s.to_string()));
        let config = RunConfig::resolve(None, &sets).unwrap();
        let dir = tmp.join(name);
        let mut o = opts(dir.clone(), data, None);
        o.init_from = Some(init.to_path_buf());
        run::<AB>(&config, &o, &Default::default()).unwrap();
        read_step_log(&dir.join(STEP_LOG)).unwrap()
    }

    /// Dynamic loss scaling multiplies the loss by a power of two and divides the gradients by
    /// it: in f32 both are exact, so the losses and gradient norms equal the unscaled run's bit
    /// for bit (the scaler's wiring changes nothing but the scale). A scale that overflows f32
    /// skips steps (no update, grad_norm null in the log) and halves until training goes on.
    #[test]
    fn loss_scaling_is_exact_in_f32_and_skips_overflowing_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        // The common initial weights: a 1-step run's checkpoint.
        let sets: Vec<String> =
            ["model.target=\"pixels\"", "data.batch_size=4", "data.workers=1", "schedule.total_steps=1"]
                .map(String::from)
                .to_vec();
        let init_dir = tmp.path().join("init");
        run::<AB>(&RunConfig::resolve(None, &sets).unwrap(), &opts(init_dir.clone(), &data, None), &Default::default())
            .unwrap();
        let init = checkpoint::locate(&init_dir).unwrap();
        let plain = precision_run(tmp.path(), &data, &init, "plain", &[]);
        let scaled = precision_run(
            tmp.path(),
            &data,
            &init,
            "scaled",
            &["precision.loss_scaling=\"dynamic\"", "precision.init_scale=1024.0", "precision.growth_interval=3"],
        );
        let key = |s: &StepLog| (s.step, s.loss.to_bits(), s.grad_norm.to_bits());
        assert_eq!(plain.iter().map(key).collect::<Vec<_>>(), scaled.iter().map(key).collect::<Vec<_>>());
        // The scaler state is in the checkpoint: 8 good steps with growth every 3 -> 1024 * 4.
        let ck = Checkpoint::read(&tmp.path().join("scaled/checkpoints").join(checkpoint::file_name(8))).unwrap();
        let sc = ck.header.loss_scaler.expect("scaler state saved");
        assert_eq!((sc.scale, sc.good_steps), (4096.0, 2));

        // 2^130 is infinite in f32: the first steps overflow and are skipped until 2^127 > scale
        // x (gradient) stops overflowing.
        let over = precision_run(
            tmp.path(),
            &data,
            &init,
            "overflow",
            &["precision.loss_scaling=\"dynamic\"", "precision.init_scale=1.361129467683754e39"],
        );
        assert_eq!(over.len(), 8);
        let skipped = over.iter().take_while(|s| s.grad_norm.is_nan()).count();
        assert!((1..8).contains(&skipped), "skipped {skipped}: {over:?}");
        assert!(over[skipped..].iter().all(|s| s.grad_norm.is_finite() && s.loss.is_finite()));
        // Skipped steps still count: the lr schedule advances through them (as with GradScaler).
        assert_eq!(over[7].lr.to_bits(), plain[7].lr.to_bits());
    }

    /// Dalle target with the random micro tokenizer (saved in the checkpoint) and gradient
    /// accumulation over 2 micro-batches: resuming at step 3 reproduces steps 4..6 exactly.
    #[test]
    fn resume_with_tokenizer_and_accumulation_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        let sets: Vec<String> = [
            "model.target=\"dalle\"",
            "tokenizer.random_init=true",
            "data.batch_size=4",
            "data.workers=1",
            "data.shuffle_buffer=8",
            "optimizer.accumulation_steps=2",
            "schedule.total_steps=6",
            "checkpoint.every=3",
        ]
        .map(String::from)
        .to_vec();
        let config = RunConfig::resolve(None, &sets).unwrap();
        assert_eq!(config.total_batch(), 8);
        let dev = Default::default();
        let a = tmp.path().join("a");
        let sa = run::<AB>(&config, &opts(a.clone(), &data, None), &dev).unwrap();
        assert_eq!((sa.start_step, sa.end_step), (0, 6));
        let full = read_step_log(&a.join(STEP_LOG)).unwrap();
        assert_eq!(full.len(), 6);
        assert_eq!(full[0].lr, 0.0);
        // Initial CE of a random head over 512 tokens is about ln 512 (spec §7 B).
        let ln512 = (512f64).ln();
        assert!((full[0].loss_main - ln512).abs() < 0.5, "initial CE {} vs ln 512 = {ln512}", full[0].loss_main);

        // Resume from the step-3 checkpoint into a fresh run dir (log lines 1..3 copied).
        let b = tmp.path().join("b");
        fs::create_dir_all(&b).unwrap();
        let ck3 = a.join(checkpoint::CHECKPOINT_DIR).join(checkpoint::file_name(3));
        assert!(ck3.is_file());
        let head: String =
            fs::read_to_string(a.join(STEP_LOG)).unwrap().lines().take(3).map(|l| format!("{l}\n")).collect();
        fs::write(b.join(STEP_LOG), head).unwrap();
        let ck = Checkpoint::read(&ck3).unwrap();
        assert!(ck.has("tokenizer") && ck.has("model") && ck.has("optimizer"));
        let resumed_config = RunConfig::from_resolved_toml(&ck.header.config).unwrap();
        assert_eq!(resumed_config, config);
        let sb = run::<AB>(&resumed_config, &opts(b.clone(), &data, Some(ck3)), &dev).unwrap();
        assert_eq!((sb.start_step, sb.end_step), (3, 6));
        let resumed = read_step_log(&b.join(STEP_LOG)).unwrap();
        let key = |s: &StepLog| {
            (s.step, s.loss.to_bits(), s.loss_main.to_bits(), s.loss_align.to_bits(), s.grad_norm.to_bits())
        };
        assert_eq!(resumed.iter().map(key).collect::<Vec<_>>(), full.iter().map(key).collect::<Vec<_>>());
        let (ma, _, _) = load_model::<Flex>(&checkpoint::locate(&a).unwrap(), &dev).unwrap();
        let (mb, _, step) = load_model::<Flex>(&checkpoint::locate(&b).unwrap(), &dev).unwrap();
        assert_eq!(step, 6);
        assert_eq!(ma.encoder.cls_token.val().into_data(), mb.encoder.cls_token.val().into_data());
    }

    #[test]
    fn stop_flag_checkpoints_after_the_current_step() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        let config = RunConfig::resolve(
            None,
            &["data.batch_size=4", "data.workers=1", "schedule.total_steps=50", "checkpoint.every=0"].map(String::from),
        )
        .unwrap();
        let o = opts(tmp.path().join("run"), &data, None);
        o.stop.store(true, Ordering::SeqCst); // as if SIGTERM arrived during step 1
        let s = run::<AB>(&config, &o, &Default::default()).unwrap();
        assert_eq!(s.end_step, 1);
        assert!(s.interrupted);
        let ck = Checkpoint::read(s.last_checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!(ck.header.step, 1);
        assert_eq!(ck.header.loader, LoaderState { epoch: 0, batch: 1, consumed: 4 });
    }

    #[test]
    fn non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        // An absurd learning rate blows the weights up within a few steps.
        let config = RunConfig::resolve(
            None,
            &[
                "model.target=\"pixels\"",
                "data.batch_size=4",
                "data.workers=1",
                "optimizer.lr=1e30",
                "optimizer.lr_batch=4",
                "optimizer.clip_grad_norm=0.0",
                "schedule.total_steps=20",
                "schedule.warmup_steps=1",
                "checkpoint.every=1",
                "checkpoint.keep_last=2",
            ]
            .map(String::from),
        )
        .unwrap();
        let run_dir = tmp.path().join("run");
        let err = run::<AB>(&config, &opts(run_dir.clone(), &data, None), &Default::default()).unwrap_err();
        let CaeError::NonFinite { step, value, what } = err else { panic!("expected NonFinite, got {err}") };
        assert!(!value.is_finite(), "{what}");
        assert!((2..=20).contains(&step), "step {step}");
        // The newest checkpoint is the step before, and it holds finite weights.
        let latest = checkpoint::locate(&run_dir).unwrap();
        let ck = Checkpoint::read(&latest).unwrap();
        assert_eq!(ck.header.step, step - 1);
        assert!(ck.header.loss.is_some_and(f64::is_finite));
        let (model, _, _) = load_model::<Flex>(&latest, &Default::default()).unwrap();
        assert!(all_finite(&model), "a checkpoint never holds non-finite weights");
        let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
        assert!(log.len() as u64 >= step - 1, "every completed step is logged");
    }

    /// The dalle target with tokenizer weights from a file (the golden micro DALL-E `.pth`):
    /// the run loads them, trains, and does not copy them into its checkpoints.
    #[test]
    fn dalle_weights_file_feeds_the_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dalle_micro.pth");
        let sets = vec![
            "model.target=\"dalle\"".to_string(),
            "tokenizer.random_init=false".into(),
            format!("tokenizer.weights={:?}", pth.to_string_lossy()),
            "data.batch_size=4".into(),
            "data.workers=1".into(),
            "schedule.total_steps=3".into(),
        ];
        let config = RunConfig::resolve(None, &sets).unwrap();
        let run_dir = tmp.path().join("run");
        let s = run::<AB>(&config, &opts(run_dir.clone(), &data, None), &Default::default()).unwrap();
        assert_eq!(s.end_step, 3);
        let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
        assert!((log[0].loss_main - (512f64).ln()).abs() < 0.5, "initial CE {}", log[0].loss_main);
        let ck = Checkpoint::read(&checkpoint::locate(&run_dir).unwrap()).unwrap();
        assert!(ck.has("model") && !ck.has("tokenizer"));
        let missing = RunConfig::resolve(
            None,
            &[sets[0].clone(), sets[1].clone(), "tokenizer.weights=\"/nonexistent.pth\"".into()],
        )
        .unwrap();
        let e = run::<AB>(&missing, &opts(tmp.path().join("r2"), &data, None), &Default::default()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pth"), "{e}");
    }
}
