//! The training loop of `trainer run`: pipeline batches -> device feeder -> CAE step -> logs,
//! metrics and checkpoints. Generic over the autodiff backend; the binary picks it.
//!
//! - [`run`] (here): the run's setup: run dir, model, tokenizer, optimizer, resume, loader.
//! - [`feeder`]: the device-feeder thread (u8 upload, normalisation and targets on the device).
//! - [`steps`]: the step loop (lazy read-backs, loss scaling, checkpoints).
//! - [`step_log`]: the per-step log, `metrics.jsonl`.

pub mod feeder;
pub mod step_log;
mod steps;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use cae_pipeline::{Loader, LoaderState, redact};
use indicatif::{ProgressBar, ProgressStyle};

use crate::CaeError;
use crate::checkpoint::{self, Checkpoint, CheckpointHeader, encode_record};
use crate::config::RunConfig;
use crate::metrics as m;
use crate::model::dalle_weights::load_dalle;
use crate::model::{Cae, DalleEncoder, TargetKind};
use crate::optim::CaeOptimizer;
use crate::precision::LossScaler;

pub use feeder::{BatchSource, DeviceBatch, Feeder, Synthetic, normalize_on_device, upload_pixels};
pub use step_log::{STEP_LOG, StepLog, read_step_log};
pub use steps::nonfinite_count;

/// Name of the resolved config in the run dir.
pub const CONFIG_FILE: &str = "config.toml";
/// Test hook (only with feature `test-hooks`, which the tests enable): after completing this
/// step (and its checkpoint, if due) the loop prints `hang after step N` to stderr and sleeps
/// forever, so a test can kill -9 it at a known point.
pub const HANG_ENV: &str = "CAE_TRAINER_TEST_HANG_AFTER_STEP";

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
    fn save(
        &mut self,
        step: u64,
        loader: LoaderState,
        loss: Option<f64>,
        model: &Cae<B>,
        optimizer: &CaeOptimizer<B, Cae<B>>,
        scaler: &LossScaler,
    ) -> Result<PathBuf, CaeError> {
        let t = Instant::now();
        crate::readback::count_sync(); // every weight is read back
        let mut sections = vec![
            ("model", encode_record::<B, _>(model.clone().into_record())?),
            ("optimizer", encode_record::<B, _>(optimizer.to_record())?),
        ];
        if let Some(tok) = self.tokenizer.as_ref().filter(|_| self.config.tokenizer.weights.is_none()) {
            sections.push(("tokenizer", encode_record::<B::InnerBackend, _>(tok.clone().into_record())?));
        }
        let header = CheckpointHeader {
            step,
            loader,
            config: self.config_toml.to_string(),
            loss,
            // Absolute local paths (a resume from another directory finds them); credentials
            // never reach a checkpoint (a resume then needs --shards again).
            shards: Some(redact::source(&absolute_source(self.shards))),
            loss_scaler: scaler.enabled.then_some(*scaler),
            parent: self.parent.clone(),
            sections: Vec::new(),
            section_crc32: Vec::new(),
        };
        let path = checkpoint::write(self.run_dir, &header, &sections, self.config.checkpoint.keep_last)?;
        self.parent = path.file_name().map(|n| n.to_string_lossy().into_owned());
        ::metrics::counter!(m::CHECKPOINTS).increment(1);
        ::metrics::histogram!(m::CHECKPOINT_SECONDS).record(t.elapsed().as_secs_f64());
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
    source
        .split("::")
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
        .map_err(|e| CaeError::Data(format!("{}: {e}", redact::source(&opts.shards))))?;
    run_from::<B>(config, opts, device, move |state| {
        let loader = Loader::new(config.data.clone(), shards, state).map_err(|e| CaeError::Data(e.to_string()))?;
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
    if let Some(h) = crate::amp::half_of(config.precision.dtype)
        && !B::InnerBackend::supports_dtype(device, h)
    {
        return Err(CaeError::Config(format!(
            "precision.dtype = {:?} is not supported by this device ({}); use f16 or f32",
            config.precision.dtype,
            B::InnerBackend::name(device)
        )));
    }
    let run_dir = &opts.run_dir;
    fs::create_dir_all(run_dir).map_err(CaeError::io(run_dir))?;
    let config_toml = config.to_toml()?;
    let config_path = run_dir.join(CONFIG_FILE);
    fs::write(&config_path, &config_toml).map_err(CaeError::io(&config_path))?;

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
    let ck = opts.resume.as_deref().map(Checkpoint::read).transpose()?; // read once
    let mut scaler = LossScaler::new(&config.precision);
    let mut optimizer_record = None;
    let (step, loader_state) = match &ck {
        Some(ck) => {
            model = model.load_record(ck.record::<B, _>("model", device)?);
            if config.tokenizer.weights.is_none()
                && let Some(tok) = tokenizer.take()
            {
                tokenizer = Some(tok.load_record(ck.record::<B::InnerBackend, _>("tokenizer", device)?));
            }
            optimizer_record = Some(ck.record::<B, _>("optimizer", device)?);
            if let Some(s) = ck.header.loss_scaler.filter(|_| scaler.enabled) {
                scaler = s;
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
    // Resuming from an older checkpoint of this run rewinds it: the abandoned branch's later
    // checkpoints move aside (never deleted), so "latest" means the newest of this lineage.
    let parent = opts.resume.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    if let Some(resumed) = &opts.resume
        && checkpoint::run_dir_of(resumed).is_some_and(|d| same_dir(&d, run_dir))
    {
        let stamp = format!("step{step}-{}", std::process::id());
        if let Some(aside) = checkpoint::abandon_after(run_dir, step, &stamp)? {
            say!("rewound to step {step}: the later checkpoints of the abandoned branch are in {}", aside.display());
        }
    }
    drop(ck);
    // The optimizer's groups are keyed by parameter id, which the model record restores: build
    // it from the loaded model.
    let mut optimizer = CaeOptimizer::new(&config.optim_config(), &model);
    if let Some(record) = optimizer_record {
        optimizer = optimizer.load_record(record);
    }
    let log_path = run_dir.join(STEP_LOG);
    step_log::truncate_step_log(&log_path, step)?;
    let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(CaeError::io(&log_path))?;

    let source = make_source(loader_state)?;
    let accum = config.optimizer.accumulation_steps;
    let per_epoch = source.batches_per_epoch().map(|b| b / accum as u64);
    let schedule = config.lr_schedule(per_epoch)?;
    let total = schedule.total_iters as u64;

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
        start_step: step,
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

    // The feeder owns the source and runs the tokenizer; the saver keeps a handle to a random
    // tokenizer's weights for the checkpoints.
    let feeder = Feeder::spawn(source, config.clone(), tokenizer.clone(), device.clone())?;
    let saver = Saver { run_dir, config, config_toml: &config_toml, shards: &opts.shards, tokenizer, parent };
    let steps = steps::StepLoop::new(
        config,
        opts,
        saver,
        optimizer,
        scaler,
        feeder,
        schedule,
        (log, log_path),
        pb,
        step,
        loader_state,
        summary.clone(),
    );
    summary = steps.run(model)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

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
        say!(
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
    say!("initial weights: {} (step {}; optimizer and data start fresh)", ckpt.display(), ck.header.step);
    Ok(model.load_record(ck.record::<B, _>("model", device)?))
}

/// The model of a checkpoint (for export and evaluation), on `device`.
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
    use std::sync::atomic::Ordering;

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
        let loader = ck.header.loader;
        assert_eq!((loader.epoch, loader.batch, loader.consumed), (0, 1, 4));
        assert!(loader.fingerprint.is_some(), "the state says what it refers to");
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
    /// Mixed precision trains (issue: AMP semantics): 200 micro steps from the same weights in
    /// f32, bf16 autocast and f16 autocast with dynamic loss scaling; no NaN, and the mean loss
    /// over the last 10 % of steps within 5 % of f32's.
    #[test]
    fn bf16_and_f16_autocast_train_like_f32() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        let sets = |dtype: &str| -> Vec<String> {
            [
                "model.target=\"pixels\"",
                "data.batch_size=8",
                "data.workers=1",
                "data.shuffle_buffer=8",
                "schedule.total_steps=200",
                "checkpoint.every=0",
                "log_every=50",
            ]
            .map(String::from)
            .into_iter()
            .chain([format!("precision.dtype=\"{dtype}\"")])
            .collect()
        };
        let late_mean = |dtype: &str| {
            let config = RunConfig::resolve(None, &sets(dtype)).unwrap();
            let dir = tmp.path().join(dtype);
            let s = run::<AB>(&config, &opts(dir.clone(), &data, None), &Default::default()).unwrap();
            assert_eq!(s.end_step, 200);
            let log = read_step_log(&dir.join(STEP_LOG)).unwrap();
            assert_eq!(log.len(), 200);
            assert!(log.iter().all(|l| l.loss.is_finite()), "{dtype}: a non-finite loss");
            let late: Vec<f64> = log[180..].iter().map(|l| l.loss).collect();
            (log[0].loss, late.iter().sum::<f64>() / late.len() as f64)
        };
        let (f32_first, f32_late) = late_mean("f32");
        assert!(f32_late < 0.8 * f32_first, "f32 trains: {f32_first} -> {f32_late}");
        for dtype in ["bf16", "f16"] {
            let (first, late) = late_mean(dtype);
            assert!(((first - f32_first) / f32_first).abs() < 0.05, "{dtype} first loss {first} vs {f32_first}");
            assert!(((late - f32_late) / f32_late).abs() < 0.05, "{dtype} late mean {late} vs f32 {f32_late}");
        }
    }

    /// At most one host sync per step (a checkpoint step adds the weights' finiteness check):
    /// none between log steps in f32 (the values are read once per `log_every` steps, all in
    /// one read), one per step with f16 loss scaling.
    #[test]
    fn host_syncs_are_lazy() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards(tmp.path());
        let run_with = |name: &str, extra: &str| {
            let sets: Vec<String> = [
                "model.target=\"pixels\"",
                "data.batch_size=4",
                "data.workers=1",
                "schedule.total_steps=12",
                "checkpoint.every=0",
                "log_every=5",
                extra,
            ]
            .map(String::from)
            .to_vec();
            let dir = tmp.path().join(name);
            run::<AB>(&RunConfig::resolve(None, &sets).unwrap(), &opts(dir.clone(), &data, None), &Default::default())
                .unwrap();
            read_step_log(&dir.join(STEP_LOG)).unwrap().iter().map(|l| l.host_syncs).collect::<Vec<u64>>()
        };
        // Reads at step 1 (the first line), 5, 10 and 12 (the end, with the checkpoint).
        let f32_syncs = run_with("f32", "precision.dtype=\"f32\"");
        assert_eq!(f32_syncs, vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1]);
        // f16: GradScaler's read every step; the last step's checkpoint adds its weight check.
        let f16_syncs = run_with("f16", "precision.dtype=\"f16\"");
        assert_eq!(f16_syncs, [vec![1; 11], vec![2]].concat());
    }
}
