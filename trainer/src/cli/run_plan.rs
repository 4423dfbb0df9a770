//! `trainer run`, first half: everything the command line and the files say, parsed and checked
//! into one [`RunPlan`] before anything is created, locked, bound or generated. A start that
//! would fail (a misspelt `--shards`, a missing tokenizer, `--device cuda` on a CPU build, an
//! unreadable config, an `--out` that cannot be written) fails here, with exit status 2, and
//! leaves nothing behind: the corrected command then runs into the same `--out`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::DALLE_CHECKPOINT;
use super::device::DeviceKind;
use super::run::{ResumeMode, RunArgs};
use crate::CaeError;
use crate::builtin::BuiltinData;
use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::model::TargetKind;
use crate::run_dir;

/// Where the shards come from.
#[derive(Debug)]
pub(super) enum ShardPlan {
    /// `--shards` (or the resumed checkpoint's source), checked to exist.
    Given(String),
    /// The built-in shapes set, generated and sharded at start if missing.
    Builtin(BuiltinData),
}

/// The run directory.
#[derive(Debug)]
pub(super) enum OutPlan {
    /// `--out`, or the resumed checkpoint's run dir.
    Dir(PathBuf),
    /// A fresh `runs/<UTC timestamp>` (made unique at start).
    Fresh(PathBuf),
}

/// A run, planned: nothing has been created yet.
#[derive(Debug)]
pub(super) struct RunPlan {
    pub config: RunConfig,
    pub device: DeviceKind,
    pub device_name: String,
    /// The checkpoint file a resumed run continues.
    pub resume: Option<PathBuf>,
    pub shards: ShardPlan,
    pub out: OutPlan,
    /// `--force`: move a run found in `--out` aside.
    pub force: bool,
    /// `None`: `--metrics-addr off`.
    pub metrics_addr: Option<SocketAddr>,
    pub init_from: Option<PathBuf>,
    pub progress: bool,
    /// Lines to print once the run starts (what was chosen for the user, and warnings).
    pub notes: Vec<String>,
    /// Micro-batches per optimizer step on each process ([`RunConfig::local_accumulation`]).
    pub accumulation: usize,
}

impl RunPlan {
    /// Parses and checks everything for a group of `world` processes (1: a single process); no
    /// side effect.
    pub fn from_args(a: &RunArgs, world: usize) -> anyhow::Result<Self> {
        let device = DeviceKind::from_flag(&a.device)?;
        let mut notes = Vec::new();
        let resume = plan_resume(a, &mut notes)?;
        let header = resume.as_deref().map(Checkpoint::read_header).transpose()?;
        if let (Some(ckpt), Some(h)) = (&resume, &header) {
            notes.insert(0, format!("resuming from {} (step {})", ckpt.display(), h.step));
            if h.world_size != world {
                super::usage!(
                    "--resume {}: the checkpoint was written by a group of {} process(es); this launch has {world}. \
                     Resume it with {} (mpirun -n {}), or start a new run from its weights with --init-from",
                    ckpt.display(),
                    h.world_size,
                    h.world_size,
                    h.world_size
                );
            }
        }
        let mut config = match &header {
            Some(h) => resumed_config(a, &h.config)?,
            None => RunConfig::resolve(Some(&config_text(a)?), &a.sets)?,
        };
        if let (Some(n), Some(_)) = (a.steps, &resume)
            && config.schedule.total_steps != Some(n)
        {
            notes.push(format!("note: --steps {n} changes the lr schedule of the resumed run"));
        }
        apply_run_flags(&mut config, a);
        config.validate()?;
        let accumulation = config.local_accumulation(world)?;
        if a.config.is_none() && resume.is_none() && !a.sets.iter().any(|s| s.starts_with("model.target")) {
            builtin_target(&mut config, &mut notes)?;
        }
        check_config_files(&config)?;
        if config.peak_lr() < config.optimizer.min_lr {
            notes.push(format!(
                "warning: the scaled peak lr {:.3e} is below optimizer.min_lr {:.3e}: the cosine ends at the peak lr \
                 (min_lr is clamped to it); lower optimizer.min_lr or raise optimizer.lr",
                config.peak_lr(),
                config.optimizer.min_lr
            ));
        }
        let shards = plan_shards(a, header.as_ref().and_then(|h| h.shards.clone()), resume.is_some(), &config)?;
        let out = plan_out(a, resume.as_deref())?;
        let metrics_addr = plan_metrics(&a.metrics_addr)?;
        Ok(Self {
            config,
            device,
            device_name: a.device.clone(),
            resume,
            shards,
            out,
            force: a.force,
            metrics_addr,
            init_from: a.init_from.clone(),
            progress: !a.no_progress,
            notes,
            accumulation,
        })
    }
}

/// The checkpoint a resumed run continues, if any (`--resume auto` without one: a fresh run).
fn plan_resume(a: &RunArgs, notes: &mut Vec<String>) -> anyhow::Result<Option<PathBuf>> {
    let base = match (a.resume_mode(), &a.out) {
        (ResumeMode::No, _) => return Ok(None),
        (ResumeMode::Auto, Some(out)) => {
            if checkpoint::list(&out.join(checkpoint::CHECKPOINT_DIR)).is_ok_and(|l| !l.is_empty()) {
                out.clone()
            } else {
                notes.push(format!("--resume auto: {} holds no checkpoint; starting a fresh run", out.display()));
                return Ok(None);
            }
        }
        (ResumeMode::Auto, None) => super::usage!("--resume auto needs --out (the run directory to continue)"),
        (ResumeMode::Path(p), _) => p,
        (ResumeMode::Out, Some(out)) => out.clone(),
        (ResumeMode::Out, None) => super::usage!("--resume needs a checkpoint, a run directory, or --out"),
    };
    match checkpoint::locate(&base) {
        Ok(ckpt) => Ok(Some(ckpt)),
        Err(CaeError::Checkpoint { path, reason }) if base.is_dir() => super::usage!(
            "--resume {}: {reason}; start it fresh (without --resume), or use --resume auto to continue a run \
             when there is one",
            path.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// The `--config` file's text (the built-in micro config without one).
fn config_text(a: &RunArgs) -> anyhow::Result<String> {
    match &a.config {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| CaeError::Config(format!("--config {}: {e}", p.display())).into())
        }
        None => Ok(super::MICRO_CONFIG.to_string()),
    }
}

/// A resumed run's config: the saved one. The launch command re-run with `--resume` (what job
/// scripts do) may repeat its `--config` and `--set`: they must resolve to the saved config; a
/// difference is refused, naming exactly the keys that differ.
fn resumed_config(a: &RunArgs, saved_toml: &str) -> anyhow::Result<RunConfig> {
    let saved = RunConfig::from_resolved_toml(saved_toml)?;
    if a.config.is_none() && a.sets.is_empty() {
        return Ok(saved);
    }
    let mut given = match &a.config {
        Some(_) => RunConfig::resolve(Some(&config_text(a)?), &a.sets)?,
        // `--set` alone applies over the saved config: only the keys it names can differ.
        None => RunConfig::resolve(Some(&saved.to_toml()?), &a.sets)?,
    };
    let mut theirs = saved.clone();
    for c in [&mut given, &mut theirs] {
        apply_run_flags(c, a);
    }
    let differ = super::run::config_differences(&given, &theirs)?;
    if !differ.is_empty() {
        super::usage!(
            "--resume: --config/--set differ from the checkpoint's config in {}; drop them to continue the saved run, \
             or start a new run",
            differ.join(", ")
        );
    }
    Ok(saved)
}

/// The flags that set config values (`--steps`, `--epochs`, `--checkpoint-every`), and the
/// tokenizer weights' path made absolute (the config is stored in checkpoints: a resume from
/// another working directory must find the file).
pub(super) fn apply_run_flags(config: &mut RunConfig, a: &RunArgs) {
    if let Some(w) = &config.tokenizer.weights
        && let Ok(abs) = std::path::absolute(w)
    {
        config.tokenizer.weights = Some(abs);
    }
    if let Some(n) = a.steps {
        config.schedule.total_steps = Some(n);
    }
    if let Some(n) = a.epochs {
        config.schedule.epochs = n;
        config.schedule.total_steps = None;
    }
    if let Some(n) = a.checkpoint_every {
        config.checkpoint.every = n;
    }
}

/// The no-argument run's target: DALL-E tokens when `cae_ckpt/dalle_encoder.pth` is there,
/// else pixels (a random micro tokenizer gives near-constant tokens).
fn builtin_target(config: &mut RunConfig, notes: &mut Vec<String>) -> anyhow::Result<()> {
    if config.model.target != TargetKind::Pixels {
        return Ok(());
    }
    if Path::new(DALLE_CHECKPOINT).is_file() {
        config.model.target = TargetKind::Dalle;
        config.model.tokenizer = crate::model::DalleConfig::openai();
        config.tokenizer.weights = Some(std::path::absolute(DALLE_CHECKPOINT)?);
        config.tokenizer.random_init = false;
        config.rederive()?;
        notes.push(format!("found {DALLE_CHECKPOINT}: training with the `dalle` target (DALL-E token cross-entropy)"));
    } else {
        notes.push(format!(
            "{DALLE_CHECKPOINT} not found: training with the `pixels` target (per-patch normalised pixels, MSE) \
             instead of DALL-E tokens"
        ));
    }
    Ok(())
}

/// Files the config names must be there: the tokenizer weights of the `dalle` target.
fn check_config_files(config: &RunConfig) -> Result<(), CaeError> {
    if config.model.target == TargetKind::Dalle
        && let Some(w) = &config.tokenizer.weights
        && !w.is_file()
    {
        return Err(CaeError::Config(format!(
            "tokenizer.weights {}: no such file (the DALL-E encoder, spec §3: put dalle_encoder.pth there, or train \
             with --set model.target=\"pixels\")",
            w.display()
        )));
    }
    Ok(())
}

/// The shard source, checked: every local shard it lists must exist.
fn plan_shards(a: &RunArgs, saved: Option<String>, resumed: bool, config: &RunConfig) -> anyhow::Result<ShardPlan> {
    let source = match (&a.shards, saved) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) if resumed && cae_pipeline::redact::is_redacted(&s) => super::usage!(
            "--resume: the checkpoint's shard source had credentials (stored redacted: {s}); pass --shards"
        ),
        (None, Some(s)) if resumed => s,
        (None, None) if resumed => super::usage!("--resume: the checkpoint does not name its shards; pass --shards"),
        _ => return Ok(ShardPlan::Builtin(BuiltinData::under(&a.data_dir))),
    };
    let shown = cae_pipeline::source::redacted(&source);
    let specs = cae_pipeline::source::expand_with(&source, &config.data.http)
        .map_err(|e| CaeError::Usage(format!("--shards {shown}: {e}")))?;
    let missing: Vec<&str> =
        specs.iter().filter(|s| !s.is_http() && !Path::new(s.url.raw()).is_file()).map(|s| s.url.shown()).collect();
    if let Some(first) = missing.first() {
        super::usage!(
            "--shards {shown}: {} of {} listed shard(s) do not exist (first: {first}); pass a shard directory with \
             manifest.json, a .tar path or a brace pattern (train-{{000000..000009}}.tar); `sharder build` makes \
             shards from an image folder",
            missing.len(),
            specs.len()
        );
    }
    Ok(ShardPlan::Given(source))
}

/// The run directory: a fresh run may not write into one that holds checkpoints (unless
/// `--force`), and the directory (or the folder it will be made in) must be writable.
fn plan_out(a: &RunArgs, resume: Option<&Path>) -> anyhow::Result<OutPlan> {
    let out = match (&a.out, resume.and_then(checkpoint::run_dir_of)) {
        (Some(o), _) => OutPlan::Dir(o.clone()),
        (None, Some(d)) => OutPlan::Dir(d),
        (None, None) => OutPlan::Fresh(super::run::timestamp_dir()),
    };
    let dir = match &out {
        OutPlan::Dir(d) | OutPlan::Fresh(d) => d,
    };
    run_dir::check_writable(dir)?;
    if resume.is_none() && !a.force && run_dir::holds_run(dir) {
        super::usage!(
            "{} holds a run: --resume continues it, --force starts over (the old run is moved to {}/replaced-<time>/, \
             nothing is deleted)",
            dir.display(),
            dir.display()
        );
    }
    Ok(out)
}

/// `--metrics-addr`: an address to bind at start, or `off`.
fn plan_metrics(addr: &str) -> anyhow::Result<Option<SocketAddr>> {
    if addr == "off" {
        return Ok(None);
    }
    match addr.parse() {
        Ok(a) => Ok(Some(a)),
        Err(e) => super::usage!("--metrics-addr {addr:?}: {e} (expected IP:PORT, or off)"),
    }
}
