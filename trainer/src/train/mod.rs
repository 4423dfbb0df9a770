//! The training loop of `trainer run`: pipeline batches -> device feeder -> CAE step -> logs,
//! metrics and checkpoints. Generic over the autodiff backend; the binary picks it.
//!
//! - [`run`] (here): the run's setup: run dir, model, tokenizer, optimizer, resume, loader.
//! - [`feeder`]: the device-feeder thread (u8 upload, normalisation and targets on the device).
//! - [`steps`]: the step loop (lazy read-backs, loss scaling, checkpoints).
//! - [`listeners`]: what hangs off the loop (step log file, Prometheus, console).
//! - [`step_log`]: the per-step log, `metrics.jsonl`.

pub mod feeder;
mod group;
mod listeners;
mod reduce;
pub mod step_log;
mod steps;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use cae_pipeline::{Loader, LoaderState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::CaeError;
use crate::checkpoint::{self, Checkpoint, CheckpointHeader, encode_record};
use crate::config::RunConfig;
use crate::dist::Dist;
use crate::model::{Cae, DalleEncoder, TargetKind};
use crate::optim::CaeOptimizer;
use crate::precision::LossScaler;

pub use feeder::{BatchSource, DataWait, DeviceBatch, Feeder, Synthetic, normalize_on_device, upload_pixels};
pub use step_log::{STEP_LOG, StepLog, read_step_log};
pub use steps::nonfinite_count;

/// Name of the resolved config in the run dir.
pub const CONFIG_FILE: &str = "config.toml";
/// Test hook (only with feature `test-hooks`, which the tests enable): after completing this
/// step (and its checkpoint, if due) the loop prints `hang after step N` to stderr and sleeps
/// forever, so a test can kill -9 it at a known point. `0` holds a fresh run before its first
/// step (everything set up, the metrics endpoint serving).
pub const HANG_ENV: &str = "CAE_TRAINER_TEST_HANG_AFTER_STEP";

/// Where and how a run goes (the config says what it is).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Run directory: config, step log, checkpoints.
    pub run_dir: PathBuf,
    /// Shard source (path, brace pattern, manifest directory, URLs; see `cae_pipeline::source`).
    pub shards: String,
    /// Checkpoint to resume from (a file).
    pub resume: Option<PathBuf>,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, return.
    pub stop: Arc<AtomicBool>,
    /// The number of the signal that set `stop`.
    pub signal: Arc<AtomicUsize>,
    /// This process's data-parallel group (a single process by default).
    pub dist: std::rc::Rc<Dist>,
    /// Draw a progress bar (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// No loss or checkpoint lines on stdout (`trainer bench --json`: the JSON owns stdout).
    pub quiet: bool,
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
    /// The part of the data wait the feeder spent preparing batches (the tokenizer, mostly).
    pub tokenizer_wait_fraction: f64,
    pub last_checkpoint: Option<PathBuf>,
    /// Stopped by a signal before the end of the schedule.
    pub interrupted: bool,
    /// Data parallel: the signal that stopped the group (perhaps sent to another rank).
    pub stop_signal: Option<i32>,
}

/// What a checkpoint records besides the weights: the step, where the data resumes (rank 0's
/// state, and in a data-parallel run every rank's), the last loss.
pub(crate) struct SavedState {
    pub step: u64,
    pub loader: LoaderState,
    /// Every rank's loader state, in rank order (empty for a single process).
    pub rank_loaders: Vec<LoaderState>,
    pub loss: Option<f64>,
}

/// Writes a run's checkpoints (what does not change between them).
pub(crate) struct Saver<'a, B: AutodiffBackend> {
    run_dir: &'a Path,
    config: &'a RunConfig,
    config_toml: &'a str,
    shards: &'a str,
    /// A randomly initialised tokenizer is saved with the run (real weights come from their file).
    tokenizer: Option<DalleEncoder<B::InnerBackend>>,
    /// File name of the lineage's previous checkpoint (the next one's `parent`).
    parent: Option<String>,
}

impl<B: AutodiffBackend> Saver<'_, B> {
    /// Where the checkpoint of `step` goes (written by rank 0).
    fn path_of(&self, step: u64) -> PathBuf {
        self.run_dir.join(checkpoint::CHECKPOINT_DIR).join(checkpoint::file_name(step))
    }

    fn save(
        &mut self,
        state: &SavedState,
        model: &Cae<B>,
        optimizer: &CaeOptimizer<B, Cae<B>>,
        scaler: &LossScaler,
    ) -> Result<PathBuf, CaeError> {
        crate::readback::count_sync(); // every weight is read back
        let mut sections = vec![
            ("model", encode_record::<B, _>(model.clone().into_record())?),
            ("optimizer", encode_record::<B, _>(optimizer.to_record())?),
        ];
        if let Some(tok) = self.tokenizer.as_ref().filter(|_| self.config.tokenizer.weights.is_none()) {
            sections.push(("tokenizer", encode_record::<B::InnerBackend, _>(tok.clone().into_record())?));
        }
        let header = CheckpointHeader {
            step: state.step,
            loader: state.loader,
            world_size: state.rank_loaders.len().max(1),
            rank_loaders: state.rank_loaders.clone(),
            config: self.config_toml.to_string(),
            loss: state.loss,
            // Absolute local paths (a resume from another directory finds them); credentials
            // never reach a checkpoint (a resume then needs --shards again).
            shards: Some(cae_pipeline::source::redacted(&absolute_source(self.shards))),
            loss_scaler: scaler.enabled.then_some(*scaler),
            parent: self.parent.clone(),
            sections: Vec::new(),
            section_crc32: Vec::new(),
        };
        let path = checkpoint::write(self.run_dir, &header, &sections, self.config.checkpoint.keep_last)?;
        self.parent = path.file_name().map(|n| n.to_string_lossy().into_owned());
        Ok(path)
    }
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A shard source with every relative local path made absolute (URLs unchanged).
pub fn absolute_source(source: &str) -> String {
    // Split as the source is read: `::` inside an IPv6 literal (`[::1]`) is not a separator.
    cae_pipeline::source::split_sources(source)
        .into_iter()
        .map(|part| {
            if part.contains("://") || Path::new(part).is_absolute() {
                return part.to_string();
            }
            std::path::absolute(part).map_or_else(|_| part.to_string(), |p| p.to_string_lossy().into_owned())
        })
        .collect::<Vec<_>>()
        .join("::")
}

/// Whether every float parameter of `module` is finite (one read-back).
pub fn all_finite<B: Backend, M: Module<B>>(module: &M) -> bool {
    match nonfinite_count(module) {
        None => true,
        Some(n) => crate::readback::read_f64s(n).is_ok_and(|v| v.first() == Some(&0.0)),
    }
}

fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() { say!("{line}") } else { pb.println(line) }
}

/// Runs (or resumes) a pre-training run until the end of its schedule or a stop signal.
pub fn run<B: AutodiffBackend>(
    config: &RunConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary, CaeError> {
    let shards = cae_pipeline::source::expand_with(&opts.shards, &config.data.http)
        .map_err(|e| CaeError::Data(format!("{}: {e}", cae_pipeline::source::redacted(&opts.shards))))?;
    let data = group::rank_data(&config.data, &opts.dist);
    run_from::<B>(config, opts, device, move |state| {
        let loader = Loader::new(data, shards, state).map_err(|e| CaeError::Data(e.to_string()))?;
        Ok(Box::new(loader) as Box<dyn BatchSource>)
    })
}

/// [`run`] with batches from the source `make_source` opens at a loader state (the saved one
/// on resume): the pipeline's loader, or a synthetic source for compute-only benchmarks.
pub fn run_from<B: AutodiffBackend>(
    config: &RunConfig,
    opts: &RunOptions,
    device: &B::Device,
    make_source: impl FnOnce(LoaderState) -> Result<Box<dyn BatchSource>, CaeError>,
) -> Result<RunSummary, CaeError> {
    let started = Instant::now();
    check_precision::<B>(config, device)?;
    let (run_dir, root) = (&opts.run_dir, opts.dist.is_root());
    let config_toml = config.to_toml()?;
    if root {
        fs::create_dir_all(run_dir).map_err(CaeError::io(run_dir))?;
        let config_path = run_dir.join(CONFIG_FILE);
        fs::write(&config_path, &config_toml).map_err(CaeError::io(&config_path))?;
    }
    let start = restore::<B>(config, opts, device)?;
    let step_log = if root { Some(open_step_log(run_dir, start.step)?) } else { None };
    let source = make_source(start.loader_state)?;
    let accum = config.local_accumulation(opts.dist.world)?;
    let schedule = config.lr_schedule(source.batches_per_epoch().map(|b| b / accum as u64))?;
    let total = schedule.total_iters as u64;
    let pb = progress_bar(opts.progress, total, start.step);
    let mut summary = RunSummary::starting(run_dir, start.step, total);
    if start.step >= total {
        say(&pb, format!("nothing to do: step {} is the end of the schedule ({total} steps)", start.step));
        return Ok(summary);
    }
    // The feeder owns the source and runs the tokenizer; the saver keeps a handle to a random
    // tokenizer's weights for the checkpoints.
    let feeder = Feeder::spawn(source, config.clone(), start.tokenizer.clone(), device.clone())?;
    let (tokenizer, parent) = (start.tokenizer, start.parent);
    let saver = Saver { run_dir, config, config_toml: &config_toml, shards: &opts.shards, tokenizer, parent };
    let parts = steps::LoopParts {
        config,
        opts,
        saver,
        optimizer: start.optimizer,
        scaler: start.scaler,
        feeder,
        schedule,
        step_log,
        pb,
        dist: &opts.dist,
        device: device.clone(),
        accumulation: accum,
        step: start.step,
        loader_state: start.loader_state,
        summary,
    };
    summary = steps::StepLoop::new(parts).run(start.model)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

impl RunSummary {
    fn starting(run_dir: &Path, step: u64, total: u64) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            start_step: step,
            end_step: step,
            total_steps: total,
            first_loss: None,
            last_loss: None,
            early_mean_loss: None,
            late_mean_loss: None,
            seconds: 0.0,
            data_wait_fraction: 0.0,
            tokenizer_wait_fraction: 0.0,
            last_checkpoint: None,
            interrupted: false,
            stop_signal: None,
        }
    }
}

/// An autocast type the device cannot do is a config error at start.
fn check_precision<B: AutodiffBackend>(config: &RunConfig, device: &B::Device) -> Result<(), CaeError> {
    if let Some(h) = crate::amp::half_of(config.precision.dtype)
        && !B::InnerBackend::supports_dtype(device, h)
    {
        return Err(CaeError::Config(format!(
            "precision.dtype = {:?} is not supported by this device ({}); use f16 or f32",
            config.precision.dtype,
            B::InnerBackend::name(device)
        )));
    }
    Ok(())
}

/// Where a run starts: the model, tokenizer, optimizer and loss scaler, fresh (from the seed, or
/// `--init-from`'s weights) or from the checkpoint it resumes, and the step and loader state.
struct Start<B: AutodiffBackend> {
    model: Cae<B>,
    tokenizer: Option<DalleEncoder<B::InnerBackend>>,
    optimizer: CaeOptimizer<B, Cae<B>>,
    scaler: LossScaler,
    step: u64,
    loader_state: LoaderState,
    /// File name of the checkpoint resumed from (the next one's `parent`).
    parent: Option<String>,
}

fn restore<B: AutodiffBackend>(
    config: &RunConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<Start<B>, CaeError> {
    // Initial weights come from the seed alone (model/init.rs); burn's RNG, seeded too, serves
    // the per-step randomness (drop path): each rank of a group draws its own.
    B::seed(device, group::rank_seed(config.seed, opts.dist.rank));
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
        tokenizer = Some(crate::weights::load_dalle(tok, path)?);
    }
    let Some(ck) = opts.resume.as_deref().map(Checkpoint::read).transpose()? else {
        if let Some(path) = &opts.init_from {
            model = crate::weights::init_pretraining(model, path, config, device)?;
        }
        let optimizer = CaeOptimizer::new(&config.optim_config(), &model);
        let (model, optimizer) = group::same_start(&opts.dist, model, optimizer, &config.optim_config(), device)?;
        let scaler = LossScaler::new(&config.precision);
        return Ok(Start {
            model,
            tokenizer,
            optimizer,
            scaler,
            step: 0,
            loader_state: LoaderState::default(),
            parent: None,
        });
    };
    model = model.load_record(ck.record::<B, _>("model", device)?);
    if config.tokenizer.weights.is_none()
        && let Some(tok) = tokenizer.take()
    {
        tokenizer = Some(tok.load_record(ck.record::<B::InnerBackend, _>("tokenizer", device)?));
    }
    // The optimizer's groups are keyed by parameter id, which the model record restores: build
    // it from the loaded model.
    let optimizer =
        CaeOptimizer::new(&config.optim_config(), &model).load_record(ck.record::<B, _>("optimizer", device)?);
    let (model, optimizer) = group::same_start(&opts.dist, model, optimizer, &config.optim_config(), device)?;
    let mut scaler = LossScaler::new(&config.precision);
    if let Some(s) = ck.header.loss_scaler.filter(|_| scaler.enabled) {
        scaler = s;
    }
    let (step, loader_state) = (ck.header.step, ck.header.loader_for(opts.dist.rank));
    drop(ck);
    let parent = if opts.dist.is_root() { rewind_lineage(opts, step)? } else { None };
    Ok(Start { model, tokenizer, optimizer, scaler, step, loader_state, parent })
}

/// Resuming from an older checkpoint of this run rewinds it: the abandoned branch's later
/// checkpoints move aside (never deleted), so "latest" means the newest of this lineage. Returns
/// the resumed checkpoint's file name (the next checkpoint's `parent`).
fn rewind_lineage(opts: &RunOptions, step: u64) -> Result<Option<String>, CaeError> {
    let Some(resumed) = &opts.resume else { return Ok(None) };
    if checkpoint::run_dir_of(resumed).is_some_and(|d| same_dir(&d, &opts.run_dir)) {
        let stamp = format!("step{step}-{}", std::process::id());
        if let Some(aside) = checkpoint::abandon_after(&opts.run_dir, step, &stamp)? {
            say!("rewound to step {step}: the later checkpoints of the abandoned branch are in {}", aside.display());
        }
    }
    Ok(resumed.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// `metrics.jsonl`, its lines after `step` dropped (a resumed run rewrites what came after).
fn open_step_log(run_dir: &Path, step: u64) -> Result<listeners::StepLogFile, CaeError> {
    let path = run_dir.join(STEP_LOG);
    step_log::truncate_step_log(&path, step)?;
    let file = fs::OpenOptions::new().create(true).append(true).open(&path).map_err(CaeError::io(&path))?;
    Ok(listeners::StepLogFile { file, path })
}

fn progress_bar(shown: bool, total: u64, step: u64) -> ProgressBar {
    let pb = if shown { ProgressBar::new(total) } else { ProgressBar::hidden() };
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} elapsed {elapsed} ETA {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_position(step);
    pb.reset_eta();
    pb
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod parity;
