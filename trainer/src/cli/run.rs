//! `trainer run` (also the no-argument command): pre-training, fresh or resumed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;

use super::DALLE_CHECKPOINT;
use super::device::{DeviceKind, OnBackend, on_device};
use crate::builtin::{self, BuiltinData};
use crate::checkpoint;
use crate::config::RunConfig;
use crate::run_dir;
use crate::train::{self, CONFIG_FILE, RunOptions, RunSummary, STEP_LOG};

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Run config (TOML: preset + overrides). Default: configs/cae_micro.toml (built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards: a directory with manifest.json, a path, a brace pattern or URLs (joined by ::).
    /// Default: the built-in shapes set (generated and sharded under --data-dir if missing).
    #[arg(long)]
    pub shards: Option<String>,
    /// Run directory (default: runs/<UTC timestamp>/; with --resume: the checkpoint's run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda[:N], wgpu[:N] or wgpu:cpu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Resume: a checkpoint file, or a run directory (its latest checkpoint); without a value,
    /// the --out directory.
    #[arg(long, num_args = 0..=1, value_name = "CKPT")]
    pub resume: Option<Option<PathBuf>>,
    /// Prometheus endpoint (`off` disables it). Only loopback unless you ask otherwise.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Optimizer steps of the whole run (sets schedule.total_steps).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Epochs of the whole run (sets schedule.epochs).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Override a config key, e.g. --set data.batch_size=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Write a checkpoint every N steps (sets checkpoint.every).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Root of the built-in data (data/shapes, data/shapes-shards).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// No progress bar (loss lines are still printed).
    #[arg(long)]
    pub no_progress: bool,
    /// Start over in an --out directory that holds a run: its content is moved to
    /// `replaced-<time>/` inside it (nothing is deleted).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Initial weights: an mmselfsup CAE checkpoint (.pth, full or backbone only) or one of our
    /// checkpoints (weights only; optimizer, step and data start fresh).
    #[arg(long, value_name = "CKPT")]
    pub init_from: Option<PathBuf>,
}

/// `runs/<YYYYmmdd-HHMMSS>` in UTC.
fn timestamp_dir() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from("runs").join(format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}

/// The flags that set config values (`--steps`, `--epochs`, `--checkpoint-every`), and the
/// tokenizer weights' path made absolute (the config is stored in checkpoints: a resume from
/// another working directory must find the file).
fn apply_run_flags(config: &mut RunConfig, a: &RunArgs) {
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

/// Dotted keys whose values differ between two configs.
fn config_differences(a: &RunConfig, b: &RunConfig) -> anyhow::Result<Vec<String>> {
    fn walk(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(&key, u, v, out),
                        _ => out.push(key),
                    }
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let (x, y): (toml::Value, toml::Value) = (toml::from_str(&a.to_toml()?)?, toml::from_str(&b.to_toml()?)?);
    let mut out = Vec::new();
    walk("", &x, &y, &mut out);
    Ok(out)
}

pub(super) fn run_command(a: RunArgs) -> anyhow::Result<()> {
    super::init_tracing();
    let device = DeviceKind::parse(&a.device)?;

    // Resume: the checkpoint's config, in the checkpoint's run dir.
    let resume = match &a.resume {
        None => None,
        Some(path) => {
            let base = match (path, &a.out) {
                (Some(p), _) => p.clone(),
                (None, Some(out)) => out.clone(),
                (None, None) => super::usage!("--resume needs a checkpoint, a run directory, or --out"),
            };
            Some(checkpoint::locate(&base)?)
        }
    };

    let mut resume_shards = None;
    let mut config = match &resume {
        Some(ckpt) => {
            // The header only: the run reads the whole file once, when it loads it.
            let header = checkpoint::Checkpoint::read_header(ckpt)?;
            say!("resuming from {} (step {})", ckpt.display(), header.step);
            resume_shards = header.shards.clone();
            let saved = RunConfig::from_resolved_toml(&header.config)?;
            // The launch command re-run with --resume (what job scripts do): its --config and
            // --set must resolve to the saved config; a different one is refused, naming keys.
            if a.config.is_some() || !a.sets.is_empty() {
                let text = match &a.config {
                    Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                    None => super::MICRO_CONFIG.to_string(),
                };
                let mut given = RunConfig::resolve(Some(&text), &a.sets)?;
                let mut theirs = saved.clone();
                for c in [&mut given, &mut theirs] {
                    apply_run_flags(c, &a);
                }
                let differ = config_differences(&given, &theirs)?;
                if !differ.is_empty() {
                    super::usage!(
                        "--resume: --config/--set differ from the checkpoint's config in {}; drop them to continue \
                         the saved run, or start a new run",
                        differ.join(", ")
                    );
                }
            }
            saved
        }
        None => {
            let text = match &a.config {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                None => super::MICRO_CONFIG.to_string(),
            };
            RunConfig::resolve(Some(&text), &a.sets)?
        }
    };
    if let (Some(n), Some(_)) = (a.steps, &resume)
        && config.schedule.total_steps != Some(n)
    {
        say!("note: --steps {n} changes the lr schedule of the resumed run");
    }
    apply_run_flags(&mut config, &a);
    config.validate()?;
    if config.model.target == crate::model::TargetKind::Pixels
        && a.config.is_none()
        && resume.is_none()
        && !a.sets.iter().any(|s| s.starts_with("model.target"))
    {
        if Path::new(DALLE_CHECKPOINT).is_file() {
            // The real tokenizer: DALL-E tokens (vocab 8192) of the 32 px view, one per patch.
            config.model.target = crate::model::TargetKind::Dalle;
            config.model.tokenizer = crate::model::DalleConfig::openai();
            config.model.vocab_size = config.model.tokenizer.vocab_size;
            config.tokenizer.weights = Some(std::path::absolute(DALLE_CHECKPOINT)?);
            config.tokenizer.random_init = false;
            config.validate()?;
            say!("found {DALLE_CHECKPOINT}: training with the `dalle` target (DALL-E token cross-entropy)");
        } else {
            say!(
                "{DALLE_CHECKPOINT} not found: training with the `pixels` target (per-patch normalised pixels, MSE) \
                 instead of DALL-E tokens"
            );
        }
    }

    let shards = match &a.shards {
        Some(s) => s.clone(),
        None if resume.is_some() => match resume_shards {
            Some(s) if cae_pipeline::redact::is_redacted(&s) => {
                super::usage!(
                    "--resume: the checkpoint's shard source had credentials (stored redacted: {s}); pass --shards"
                )
            }
            Some(s) => s,
            None => super::usage!("--resume: the checkpoint does not name its shards; pass --shards"),
        },
        None => {
            let dir = builtin::ensure(&BuiltinData::under(&a.data_dir), &mut |l| say!("{l}"))?;
            dir.to_string_lossy().into_owned()
        }
    };

    // The run directory, locked for this process; a fresh run never writes into another run.
    let stamp = timestamp_dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let run_dir = match (&a.out, &resume) {
        (Some(o), _) => o.clone(),
        (None, Some(ckpt)) => match checkpoint::run_dir_of(ckpt) {
            Some(d) => d,
            None => run_dir::create_unique(&timestamp_dir())?,
        },
        (None, None) => run_dir::create_unique(&timestamp_dir())?,
    };
    let _lock = run_dir::lock(&run_dir)?;
    if resume.is_none() && run_dir::holds_run(&run_dir) {
        if !a.force {
            super::usage!(
                "{} holds a run: --resume continues it, --force starts over (the old run is moved to {}/replaced-<time>/, \
                 nothing is deleted)",
                run_dir.display(),
                run_dir.display()
            );
        }
        let aside = run_dir::move_aside(&run_dir, &stamp)?;
        say!("--force: the run that was in {} is now in {}", run_dir.display(), aside.display());
    }

    let metrics_url = if a.metrics_addr == "off" {
        None
    } else {
        let addr: SocketAddr =
            a.metrics_addr.parse().with_context(|| format!("--metrics-addr {:?}", a.metrics_addr))?;
        if !addr.ip().is_loopback() {
            say_err!(
                "warning: --metrics-addr {addr} is not a loopback address: the metrics endpoint has no \
                 authentication, anyone who can reach this port can read it"
            );
        }
        match crate::metrics::install(addr) {
            Ok(()) => Some(format!("http://{addr}/metrics")),
            Err(e) => {
                say_err!("warning: {e}; continuing without the Prometheus endpoint");
                None
            }
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    // SIGINT, SIGTERM, SIGHUP: the loop finishes its step, writes a checkpoint, and the process
    // exits with 128 + N; a second signal exits at once.
    cae_pipeline::signals::install(&stop, &signal).context("installing signal handlers")?;

    say!(
        "run {}: preset {:?}, target {:?}, batch {} x {} accumulation, peak lr {:.3e}, device {}, {}{}",
        run_dir.display(),
        config.preset,
        config.model.target,
        config.data.batch_size,
        config.optimizer.accumulation_steps,
        config.peak_lr(),
        a.device,
        format!("{:?}", config.precision.dtype).to_lowercase(),
        if config.precision.scaling() { " with dynamic loss scaling" } else { "" }
    );
    if device.is_cpu() {
        say!(
            "  threads     {} for the step (burn-flex on rayon; RAYON_NUM_THREADS), {} decode workers (data.workers)",
            rayon::current_num_threads(),
            config.data.worker_count()
        );
    }
    say!("  config      {}", run_dir.join(CONFIG_FILE).display());
    say!("  step log    {}", run_dir.join(STEP_LOG).display());
    say!("  checkpoints {}", run_dir.join(checkpoint::CHECKPOINT_DIR).display());
    match &metrics_url {
        Some(u) => say!("  metrics     {u}"),
        None => say!("  metrics     off"),
    }

    if a.init_from.is_some() && resume.is_some() {
        super::usage!("--init-from starts a fresh run; a resumed run takes its weights from the checkpoint");
    }
    let opts = RunOptions { run_dir, shards, resume, stop, progress: !a.no_progress, init_from: a.init_from.clone() };
    let summary = on_device(device, Train(&config, &opts))?;
    print_summary(&summary, metrics_url.as_deref());
    if summary.interrupted {
        // Stopped by a signal before the schedule's end, its checkpoint written: a scheduler
        // (Kubernetes Job, Slurm requeue) must not take this for a finished run.
        return Err(super::Stopped { signal: signal.load(Ordering::SeqCst) as i32 }.into());
    }
    Ok(())
}

/// `train::run` on a backend (with autodiff).
struct Train<'a>(&'a RunConfig, &'a RunOptions);

impl OnBackend for Train<'_> {
    type Output = RunSummary;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<RunSummary> {
        Ok(train::run::<Autodiff<B>>(self.0, self.1, device)?)
    }
}

fn print_summary(s: &RunSummary, metrics_url: Option<&str>) {
    let steps = s.end_step - s.start_step;
    say!(
        "done: steps {} -> {} of {} in {:.1} s ({:.2} steps/s), data wait {:.1}% of step time{}",
        s.start_step,
        s.end_step,
        s.total_steps,
        s.seconds,
        steps as f64 / s.seconds.max(1e-9),
        100.0 * s.data_wait_fraction,
        if s.interrupted { " (interrupted)" } else { "" }
    );
    if let (Some(a), Some(b), Some(ea), Some(lb)) = (s.first_loss, s.last_loss, s.early_mean_loss, s.late_mean_loss) {
        say!("loss {a:.4} -> {b:.4} (mean of the first 10% of steps {ea:.4}, of the last 10% {lb:.4})");
    }
    if let Some(c) = &s.last_checkpoint {
        say!("checkpoint {}", c.display());
    }
    say!("step log {}", s.run_dir.join(STEP_LOG).display());
    if let Some(u) = metrics_url {
        say!("metrics were served at {u} (the endpoint closes with the process)");
    }
}
