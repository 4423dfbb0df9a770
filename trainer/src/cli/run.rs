//! `trainer run` (also the no-argument command): pre-training, fresh or resumed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;

use super::DALLE_CHECKPOINT;
use super::device::{DeviceKind, OnBackend, on_device};
use crate::builtin::{self, BuiltinData};
use crate::checkpoint;
use crate::config::RunConfig;
use crate::train::{self, CONFIG_FILE, RunOptions, RunSummary, STEP_LOG};

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Run config (TOML: preset + overrides). Default: configs/cae_micro.toml (built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards: a directory with manifest.json, a path, a brace pattern or URLs (joined by ::).
    /// Default: the built-in sample set (generated and sharded under --data-dir if missing).
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
    /// Root of the built-in data (data/builtin, data/builtin-shards).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// No progress bar (loss lines are still printed).
    #[arg(long)]
    pub no_progress: bool,
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

fn install_signal_handlers(stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM] {
        // A second signal while the flag is already set exits at once (status 130).
        flag::register_conditional_shutdown(sig, 130, Arc::clone(stop)).context("installing signal handlers")?;
        flag::register(sig, Arc::clone(stop)).context("installing signal handlers")?;
    }
    Ok(())
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
                (None, None) => bail!("--resume needs a checkpoint, a run directory, or --out"),
            };
            Some(checkpoint::locate(&base)?)
        }
    };

    let mut resume_shards = None;
    let mut config = match &resume {
        Some(ckpt) => {
            if a.config.is_some() || !a.sets.is_empty() || a.epochs.is_some() {
                bail!("a resumed run uses its checkpoint's config: drop --config, --set and --epochs");
            }
            let ck = checkpoint::Checkpoint::read(ckpt)?;
            println!("resuming from {} (step {})", ckpt.display(), ck.header.step);
            resume_shards = ck.header.shards.clone();
            RunConfig::from_resolved_toml(&ck.header.config)?
        }
        None => {
            let text = match &a.config {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                None => super::MICRO_CONFIG.to_string(),
            };
            RunConfig::resolve(Some(&text), &a.sets)?
        }
    };
    if let Some(n) = a.steps {
        if resume.is_some() && config.schedule.total_steps != Some(n) {
            println!("note: --steps {n} changes the lr schedule of the resumed run");
        }
        config.schedule.total_steps = Some(n);
    }
    if let Some(n) = a.epochs {
        config.schedule.epochs = n;
        config.schedule.total_steps = None;
    }
    if let Some(n) = a.checkpoint_every {
        config.checkpoint.every = n;
    }
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
            config.tokenizer.weights = Some(PathBuf::from(DALLE_CHECKPOINT));
            config.tokenizer.random_init = false;
            config.validate()?;
            println!("found {DALLE_CHECKPOINT}: training with the `dalle` target (DALL-E token cross-entropy)");
        } else {
            println!(
                "{DALLE_CHECKPOINT} not found: training with the `pixels` target (per-patch normalised pixels, MSE) \
                 instead of DALL-E tokens"
            );
        }
    }

    let shards = match &a.shards {
        Some(s) => s.clone(),
        None if resume.is_some() => match resume_shards {
            Some(s) => s,
            None => bail!("--resume: the checkpoint does not name its shards; pass --shards"),
        },
        None => {
            let dir = builtin::ensure(&BuiltinData::under(&a.data_dir), &mut |l| println!("{l}"))?;
            dir.to_string_lossy().into_owned()
        }
    };

    let run_dir = match (&a.out, &resume) {
        (Some(o), _) => o.clone(),
        (None, Some(ckpt)) => checkpoint::run_dir_of(ckpt).unwrap_or_else(timestamp_dir),
        (None, None) => timestamp_dir(),
    };

    let metrics_url = if a.metrics_addr == "off" {
        None
    } else {
        let addr: SocketAddr =
            a.metrics_addr.parse().with_context(|| format!("--metrics-addr {:?}", a.metrics_addr))?;
        match crate::metrics::install(addr) {
            Ok(()) => Some(format!("http://{addr}/metrics")),
            Err(e) => {
                eprintln!("warning: {e}; continuing without the Prometheus endpoint");
                None
            }
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(&stop)?;

    println!(
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
        println!(
            "  threads     {} for the step (burn-flex on rayon; RAYON_NUM_THREADS), {} decode workers (data.workers)",
            rayon::current_num_threads(),
            config.data.worker_count()
        );
    }
    println!("  config      {}", run_dir.join(CONFIG_FILE).display());
    println!("  step log    {}", run_dir.join(STEP_LOG).display());
    println!("  checkpoints {}", run_dir.join(checkpoint::CHECKPOINT_DIR).display());
    match &metrics_url {
        Some(u) => println!("  metrics     {u}"),
        None => println!("  metrics     off"),
    }

    if a.init_from.is_some() && resume.is_some() {
        bail!("--init-from starts a fresh run; a resumed run takes its weights from the checkpoint");
    }
    let opts = RunOptions { run_dir, shards, resume, stop, progress: !a.no_progress, init_from: a.init_from.clone() };
    let summary = on_device(device, Train(&config, &opts))?;
    print_summary(&summary, metrics_url.as_deref());
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
    println!(
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
        println!("loss {a:.4} -> {b:.4} (mean of the first 10% of steps {ea:.4}, of the last 10% {lb:.4})");
    }
    if let Some(c) = &s.last_checkpoint {
        println!("checkpoint {}", c.display());
    }
    println!("step log {}", s.run_dir.join(STEP_LOG).display());
    if let Some(u) = metrics_url {
        println!("metrics were served at {u} (the endpoint closes with the process)");
    }
}
