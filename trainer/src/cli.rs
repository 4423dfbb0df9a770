//! The `trainer` command line (the binary is a thin wrapper around [`main_from`], which lives
//! here so the end-to-end tests can run it in a child process). This is the only place that
//! picks a backend: burn-flex on the CPU, burn-cuda with the `cuda` feature.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::builtin::{self, BuiltinData};
use crate::checkpoint;
use crate::config::RunConfig;
use crate::precision::Dtype;
use crate::train::{self, CONFIG_FILE, RunOptions, RunSummary, STEP_LOG};

/// The shipped micro config: the no-argument run.
pub const MICRO_CONFIG: &str = include_str!("../../configs/cae_micro.toml");
/// Where the no-argument run looks for the DALL-E tokenizer (spec §3).
pub const DALLE_CHECKPOINT: &str = "cae_ckpt/dalle_encoder.pth";

#[derive(Parser, Debug)]
#[command(name = "trainer", about = "CAE pre-training (burn), fed by the cae pipeline", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pre-train (the default command). With no arguments: the micro preset on the built-in
    /// sample set, on the CPU, for a few minutes.
    Run(RunArgs),
    /// Export the pre-trained encoder of a checkpoint as safetensors (timm or mmselfsup names).
    Export(ExportArgs),
    /// Steps/s and images/s of a preset: synthetic batches (compute only), then the real
    /// pipeline, with the data-wait fraction.
    Bench(BenchArgs),
    /// Print, as JSON, each image's DALL-E token ids from its centre view (spec §3).
    Tokens(TokensArgs),
    /// Same weights and batch on the CPU and on a device: the losses must agree; then time
    /// forward + backward on the device (see tools/gpu-check.sh).
    GpuCheck(GpuCheckArgs),
    /// Encoder features (cls and mean-pooled patch tokens) of every sample of a shard set, as
    /// safetensors (`cls`, `mean`, `labels`, `keys`).
    Features(FeaturesArgs),
    /// Evaluate a checkpoint's representations.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Weighted k-NN (cosine, k = 20, T = 0.07) top-1/top-5 on frozen encoder features.
    Knn(KnnArgs),
}

/// Which encoder to use, how to read the images, where to run.
#[derive(Args, Debug, Clone)]
pub struct EncoderArgs {
    /// A checkpoint file, a run directory (its latest checkpoint), or an mmselfsup CAE
    /// checkpoint (`.pth`: the full algorithm state or the extracted backbone).
    #[arg(long, required_unless_present = "random_init")]
    pub checkpoint: Option<PathBuf>,
    /// Use the same network freshly initialised (the untrained baseline): the checkpoint's
    /// config and seed, or --preset without a checkpoint.
    #[arg(long)]
    pub random_init: bool,
    /// Preset of a --random-init net without --checkpoint.
    #[arg(long, default_value = "micro")]
    pub preset: String,
    /// Seed of a --random-init net without --checkpoint.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shorter side before the centre crop (default: 8/7 of the model's input size, 256 for 224).
    #[arg(long)]
    pub resize: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Decode threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub encoder: EncoderArgs,
    /// Shards: a directory with manifest.json, a path, a brace pattern or URLs (joined by ::).
    #[arg(long)]
    pub shards: String,
    /// Output file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct KnnArgs {
    #[command(flatten)]
    pub encoder: EncoderArgs,
    /// The labeled reference set (default: the built-in sample set, generated if missing).
    #[arg(long)]
    pub train_shards: Option<String>,
    /// The queries (default: the built-in validation set, generated if missing).
    #[arg(long)]
    pub val_shards: Option<String>,
    /// Root of the built-in data (for the defaults above).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokensArgs {
    /// DALL-E encoder weights (.pth state_dict or .safetensors).
    #[arg(long, default_value = DALLE_CHECKPOINT)]
    pub tokenizer: PathBuf,
    /// Tokenizer size: `openai` (n_hid 256, vocab 8192) or `micro` (n_hid 64, vocab 512).
    #[arg(long, default_value = "openai")]
    pub tokenizer_size: String,
    /// Side of the view the tokens are computed from (112 for ViT-B/16 at 224 px).
    #[arg(long, default_value_t = 112)]
    pub size: usize,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// Model preset: base, small, tiny or micro.
    #[arg(long, default_value = "base")]
    pub preset: String,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// f32, f16 or bf16 on the device (the CPU reference is always f32).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Timed forward + backward steps on the device.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// cpu (checks the CPU against itself) or cuda[:N].
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run config (default: the built-in micro config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards for the pipeline phase (default: the built-in sample set).
    #[arg(long)]
    pub shards: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed steps per phase.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Root of the built-in data.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint file, a run directory (its latest checkpoint), or an mmselfsup CAE
    /// checkpoint (.pth) to convert.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Key names: timm (`vit_base_patch16_224` layout) or mmselfsup (MS0 `backbone.*`).
    #[arg(long, value_enum)]
    pub format: crate::export::ExportFormat,
    /// Output file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

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
    /// cpu, cuda or cuda:N.
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

/// Where a run executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
}

impl DeviceKind {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
            },
        }
    }
}

/// Parses `args` (argv, program name first) and runs the command.
pub fn main_from<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    // The command runs on a worker of rayon's global pool, the pool burn-flex's CPU kernels
    // (GEMM, softmax, LayerNorm, ...) fork into. Called from a thread outside the pool, every
    // parallel kernel would be injected into the pool while this thread sleeps on a latch; from
    // inside, it keeps half of the work and the other workers steal the rest. Measured on the
    // 2-core CI machine (criterion `step`, tiny b2): 466 -> 395 ms per step.
    // Constraints this places on the code: nothing may inject rayon work from another thread
    // and wait for it while the command blocks (with one rayon thread that would deadlock; the
    // pipeline's threads and tokio never use rayon), and the pool is built here, once: its
    // workers get the main thread's 8 MiB of stack (threads default to 2 MiB) and
    // RAYON_NUM_THREADS still sets their number.
    let _already_built = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    rayon::scope(|_| dispatch(cli))
}

/// Runs one parsed command.
fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => run_command(RunArgs {
            device: "cpu".into(),
            metrics_addr: "127.0.0.1:9464".into(),
            data_dir: "data".into(),
            ..RunArgs::default()
        }),
        Some(Command::Run(a)) => run_command(a),
        Some(Command::Export(a)) => export_command(&a),
        Some(Command::Bench(a)) => bench_command(&a),
        Some(Command::Tokens(a)) => tokens_command(&a),
        Some(Command::GpuCheck(a)) => gpu_check_command(&a),
        Some(Command::Features(a)) => features_command(&a),
        Some(Command::Eval(EvalCommand::Knn(a))) => knn_command(&a),
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// A PyTorch file (`.pth`, `.pt`): an mmselfsup checkpoint to import.
fn is_torch_file(path: &Path) -> bool {
    path.is_file() && crate::model::mmselfsup_weights::is_torch_checkpoint(path)
}

/// Imports an mmselfsup CAE checkpoint into the preset of matching width and depth.
fn import_mmselfsup<B: burn::tensor::backend::Backend>(
    path: &Path,
    device: &B::Device,
) -> anyhow::Result<(RunConfig, crate::model::Cae<B>, crate::model::mmselfsup_weights::ImportReport)> {
    use crate::model::mmselfsup_weights::{load_mmselfsup, probe_mmselfsup};
    let (dim, depth) = probe_mmselfsup(path)?;
    let preset = crate::config::Preset::from_encoder_shape(dim, depth)?;
    let config = RunConfig::preset(preset);
    let model = crate::model::Cae::<B>::new(&config.model, device)?;
    let (model, report) = load_mmselfsup(model, path)?;
    Ok((config, model, report))
}

/// The encoder of `a` (a checkpoint's, or a fresh one) and a description of where it came from.
fn load_encoder<B: burn::tensor::backend::Backend>(
    a: &EncoderArgs,
    device: &B::Device,
) -> anyhow::Result<(crate::model::Encoder<B>, crate::model::CaeConfig, String)> {
    match (&a.checkpoint, a.random_init) {
        (Some(path), false) if is_torch_file(path) => {
            let (_, model, report) = import_mmselfsup::<B>(path, device)?;
            Ok((model.encoder, model.config.clone(), format!("{} (mmselfsup, {} form)", path.display(), report.form)))
        }
        (Some(path), false) => {
            let ckpt = checkpoint::locate(path)?;
            let (model, config, step) = train::load_model::<B>(&ckpt, device)?;
            Ok((model.encoder, config.model, format!("{} (step {step})", ckpt.display())))
        }
        (Some(path), true) => {
            let ckpt = checkpoint::locate(path)?;
            let ck = checkpoint::Checkpoint::read(&ckpt)?;
            let config = RunConfig::from_resolved_toml(&ck.header.config)?;
            let enc = crate::model::init::with_seed(config.seed, || crate::model::Encoder::new(&config.model, device));
            Ok((enc, config.model, format!("random init (seed {}) of the net of {}", config.seed, ckpt.display())))
        }
        (None, _) => {
            let config = RunConfig::preset(crate::config::Preset::parse(&a.preset)?);
            config.model.validate()?;
            let enc = crate::model::init::with_seed(a.seed, || crate::model::Encoder::new(&config.model, device));
            Ok((enc, config.model, format!("random init (seed {}) of the {} preset", a.seed, a.preset)))
        }
    }
}

fn eval_config(a: &EncoderArgs, model: &crate::model::CaeConfig) -> anyhow::Result<cae_pipeline::eval::EvalConfig> {
    let resize = a.resize.unwrap_or_else(|| crate::features::default_resize(model.img_size));
    if resize < model.img_size {
        bail!("--resize {resize} is smaller than the model's input size {}", model.img_size);
    }
    Ok(cae_pipeline::eval::EvalConfig {
        batch_size: a.batch_size.max(1),
        workers: a.workers,
        resize,
        crop: model.img_size,
        ..Default::default()
    })
}

type FeatureSets = (Vec<crate::features::Features>, crate::model::CaeConfig, String);

/// Features of each shard source in `sources`, on the backend of `a.device`.
fn extract_features(a: &EncoderArgs, sources: &[&str]) -> anyhow::Result<FeatureSets> {
    match DeviceKind::parse(&a.device)? {
        DeviceKind::Cpu => features_on::<burn::backend::Flex>(a, sources, &Default::default()),
        DeviceKind::Cuda(n) => features_cuda(a, sources, n),
    }
}

fn features_on<B: burn::tensor::backend::Backend>(
    a: &EncoderArgs,
    sources: &[&str],
    device: &B::Device,
) -> anyhow::Result<FeatureSets> {
    let (enc, model, what) = load_encoder::<B>(a, device)?;
    let cfg = eval_config(a, &model)?;
    println!("encoder: {what}; images: shorter side {}, centre crop {}", cfg.resize, cfg.crop);
    let mut out = Vec::new();
    for s in sources {
        let f = crate::features::extract(&enc, s, cfg.clone(), device, !a.no_progress)
            .with_context(|| format!("features of {s}"))?;
        let bad = if f.bad_samples > 0 { format!(", {} bad samples skipped", f.bad_samples) } else { String::new() };
        println!("{s}: {} images{bad}", f.len());
        out.push(f);
    }
    Ok((out, model, what))
}

#[cfg(feature = "cuda")]
fn features_cuda(a: &EncoderArgs, sources: &[&str], index: usize) -> anyhow::Result<FeatureSets> {
    features_on::<burn::backend::Cuda>(a, sources, &burn::backend::cuda::CudaDevice { index })
}

#[cfg(not(feature = "cuda"))]
fn features_cuda(_a: &EncoderArgs, _sources: &[&str], _index: usize) -> anyhow::Result<FeatureSets> {
    bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
}

fn features_command(a: &FeaturesArgs) -> anyhow::Result<()> {
    init_tracing();
    let (mut feats, model, what) = extract_features(&a.encoder, &[&a.shards])?;
    let f = feats.pop().context("no features")?;
    let meta = [
        ("encoder", what),
        ("shards", a.shards.clone()),
        ("dim", model.embed_dim.to_string()),
        ("features", "cls and mean of the patch tokens, after the encoder's final LayerNorm".to_string()),
        ("keys", "uint8 rows: UTF-8 sample keys, zero-padded".to_string()),
    ];
    f.save(&a.out, &meta).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} x {} features (cls, mean), labels and keys -> {}", f.len(), f.dim, a.out.display());
    Ok(())
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn knn_cuda(
    t: &[f32],
    tl: &[i64],
    v: &[f32],
    vl: &[i64],
    d: usize,
    k: usize,
    temp: f64,
    index: usize,
) -> anyhow::Result<crate::knn::KnnResult> {
    let device = burn::backend::cuda::CudaDevice { index };
    Ok(crate::knn::weighted_knn::<burn::backend::Cuda>(t, tl, v, vl, d, k, temp, &device)?)
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn knn_cuda(
    _t: &[f32],
    _tl: &[i64],
    _v: &[f32],
    _vl: &[i64],
    _d: usize,
    _k: usize,
    _temp: f64,
    _index: usize,
) -> anyhow::Result<crate::knn::KnnResult> {
    bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
}

fn knn_command(a: &KnnArgs) -> anyhow::Result<()> {
    init_tracing();
    let builtin = BuiltinData::under(&a.data_dir);
    let mut say = |l: String| println!("{l}");
    let train_shards = match &a.train_shards {
        Some(s) => s.clone(),
        None => builtin::ensure(&builtin, &mut say)?.to_string_lossy().into_owned(),
    };
    let val_shards = match &a.val_shards {
        Some(s) => s.clone(),
        None => builtin::ensure_val(&builtin, &mut say)?.to_string_lossy().into_owned(),
    };
    let (feats, _model, what) = extract_features(&a.encoder, &[&train_shards, &val_shards])?;
    let (train, val) = (&feats[0], &feats[1]);
    let mut results = serde_json::Map::new();
    for (name, t, v) in [("cls", &train.cls, &val.cls), ("mean", &train.mean, &val.mean)] {
        let (tl, vl, d, k, temp) = (&train.labels[..], &val.labels[..], train.dim, a.k, a.temperature);
        let r = match DeviceKind::parse(&a.encoder.device)? {
            DeviceKind::Cpu => {
                crate::knn::weighted_knn::<burn::backend::Flex>(t, tl, v, vl, d, k, temp, &Default::default())?
            }
            DeviceKind::Cuda(n) => knn_cuda(t, tl, v, vl, d, k, temp, n)?,
        };
        if !a.json {
            println!(
                "k-NN ({name} features, k {}, T {}): top-1 {:.2}%  top-5 {:.2}%  ({} train, {} val, {} classes)",
                r.k,
                r.temperature,
                100.0 * r.top1,
                100.0 * r.top5,
                r.train_samples,
                r.val_samples,
                r.classes
            );
        }
        results.insert(name.to_string(), serde_json::to_value(&r)?);
    }
    if a.json {
        results.insert("encoder".into(), what.into());
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}

fn tokens_command(a: &TokensArgs) -> anyhow::Result<()> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let size_cfg = match a.tokenizer_size.as_str() {
        "openai" => crate::model::DalleConfig::openai(),
        "micro" => crate::model::DalleConfig::micro(),
        other => bail!("--tokenizer-size {other:?}: expected openai or micro"),
    };
    if a.size == 0 || !a.size.is_multiple_of(8) {
        bail!("--size {} must be a positive multiple of 8", a.size);
    }
    let enc = crate::model::dalle_weights::load_dalle(size_cfg.init::<B>(&device), &a.tokenizer)?;
    let grid = a.size / 8;
    let mut out = Vec::new();
    for path in &a.images {
        let img = crate::tokens::read_image(path)?;
        let ids = crate::tokens::image_tokens(&enc, &img, a.size, &device)?;
        let rows: Vec<Vec<i64>> = ids.chunks(grid).map(|r| r.to_vec()).collect();
        out.push(serde_json::json!({ "path": path.display().to_string(), "width": img.width, "height": img.height, "tokens": rows }));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn gpu_check_command(a: &GpuCheckArgs) -> anyhow::Result<()> {
    use crate::gpu_check::{HostBatch, check_config, loss_of, reference_weights};
    let cfg = check_config(&a.preset)?;
    let cpu = Default::default();
    let weights = reference_weights::<burn::backend::Flex>(&cfg, a.seed, &cpu)?;
    let batch = HostBatch::new(&cfg, a.batch, a.seed);
    let t = std::time::Instant::now();
    let cpu_loss = loss_of::<burn::backend::Flex>(&cfg, &weights, &batch, &cpu)?;
    let cpu_seconds = t.elapsed().as_secs_f64();
    let (device_loss, timing) = match (DeviceKind::parse(&a.device)?, a.precision.as_str()) {
        (DeviceKind::Cpu, "f32") => {
            type B = burn::backend::Flex;
            let l = loss_of::<B>(&cfg, &weights, &batch, &cpu)?;
            (l, crate::gpu_check::time_steps::<burn::backend::Autodiff<B>>(&cfg, &weights, &batch, a.steps, &cpu)?)
        }
        (DeviceKind::Cpu, p) => bail!("--precision {p} is only checked on cuda"),
        (DeviceKind::Cuda(n), p) => gpu_check_cuda(&cfg, &weights, &batch, a.steps, n, p)?,
    };
    let rel = ((device_loss - cpu_loss) / cpu_loss).abs();
    let tolerance = if a.precision == "f32" { 1e-3 } else { 2e-2 };
    let j = serde_json::json!({
        "preset": a.preset, "batch": a.batch, "precision": a.precision, "device": a.device,
        "cpu_loss": cpu_loss, "cpu_forward_seconds": cpu_seconds, "device_loss": device_loss,
        "relative_difference": rel, "tolerance": tolerance, "agree": rel <= tolerance,
        "steps": timing.steps, "seconds": timing.seconds, "images_per_second": timing.images_per_second,
    });
    println!("{j}");
    if rel > tolerance {
        bail!("device loss {device_loss} differs from the CPU reference {cpu_loss} by {rel:.2e} (> {tolerance})");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_check_cuda(
    cfg: &crate::model::CaeConfig,
    weights: &[u8],
    batch: &crate::gpu_check::HostBatch,
    steps: usize,
    index: usize,
    precision: &str,
) -> anyhow::Result<(f64, crate::gpu_check::StepTiming)> {
    use crate::gpu_check::{loss_of, time_steps};
    let d = burn::backend::cuda::CudaDevice { index };
    Ok(match precision {
        "f32" => {
            type B = burn::backend::Cuda<f32>;
            (
                loss_of::<B>(cfg, weights, batch, &d)?,
                time_steps::<burn::backend::Autodiff<B>>(cfg, weights, batch, steps, &d)?,
            )
        }
        "f16" => {
            type B = burn::backend::Cuda<burn::tensor::f16>;
            (
                loss_of::<B>(cfg, weights, batch, &d)?,
                time_steps::<burn::backend::Autodiff<B>>(cfg, weights, batch, steps, &d)?,
            )
        }
        "bf16" => {
            type B = burn::backend::Cuda<burn::tensor::bf16>;
            (
                loss_of::<B>(cfg, weights, batch, &d)?,
                time_steps::<burn::backend::Autodiff<B>>(cfg, weights, batch, steps, &d)?,
            )
        }
        other => bail!("--precision {other:?}: expected f32, f16 or bf16"),
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_check_cuda(
    _cfg: &crate::model::CaeConfig,
    _weights: &[u8],
    _batch: &crate::gpu_check::HostBatch,
    _steps: usize,
    _index: usize,
    _precision: &str,
) -> anyhow::Result<(f64, crate::gpu_check::StepTiming)> {
    bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
}

fn bench_command(a: &BenchArgs) -> anyhow::Result<()> {
    let text = match &a.config {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => MICRO_CONFIG.to_string(),
    };
    let config = RunConfig::resolve(Some(&text), &a.sets)?;
    let shards = match &a.shards {
        Some(s) => s.clone(),
        None => {
            builtin::ensure(&BuiltinData::under(&a.data_dir), &mut |l| println!("{l}"))?.to_string_lossy().into_owned()
        }
    };
    let scratch = std::env::temp_dir().join(format!("cae-bench-{}", std::process::id()));
    println!(
        "bench: preset {:?}, batch {}, {} timed steps after {} warmup, device {}",
        config.preset, config.data.batch_size, a.steps, a.warmup, a.device
    );
    let (syn, pipe) = match DeviceKind::parse(&a.device)? {
        DeviceKind::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            let d = Default::default();
            (
                crate::bench::synthetic::<B>(&config, a.warmup, a.steps, &d)?,
                crate::bench::pipeline::<B>(&config, &shards, a.warmup, a.steps, scratch, &d)?,
            )
        }
        DeviceKind::Cuda(n) => bench_cuda(&config, &shards, a, scratch, n)?,
    };
    println!(
        "synthetic (compute only): {:.3} s/step, {:.2} steps/s, {:.1} images/s",
        syn.seconds_per_step,
        1.0 / syn.seconds_per_step.max(1e-12),
        syn.images_per_second
    );
    println!(
        "real pipeline:            {:.3} s/step, {:.2} steps/s, {:.1} images/s, data wait {:.2}% of step time",
        pipe.seconds_per_step,
        1.0 / pipe.seconds_per_step.max(1e-12),
        pipe.images_per_second,
        100.0 * pipe.data_wait_fraction
    );
    println!("pipeline / synthetic throughput: {:.2}", pipe.images_per_second / syn.images_per_second.max(1e-12));
    Ok(())
}

type BenchPair = (crate::bench::BenchResult, crate::bench::BenchResult);

#[cfg(feature = "cuda")]
fn bench_cuda(
    config: &RunConfig,
    shards: &str,
    a: &BenchArgs,
    scratch: PathBuf,
    index: usize,
) -> anyhow::Result<BenchPair> {
    type B = burn::backend::Autodiff<burn::backend::Cuda>;
    let d = burn::backend::cuda::CudaDevice { index };
    Ok((
        crate::bench::synthetic::<B>(config, a.warmup, a.steps, &d)?,
        crate::bench::pipeline::<B>(config, shards, a.warmup, a.steps, scratch, &d)?,
    ))
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_c: &RunConfig, _s: &str, _a: &BenchArgs, _p: PathBuf, _i: usize) -> anyhow::Result<BenchPair> {
    bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
}

fn export_command(a: &ExportArgs) -> anyhow::Result<()> {
    let device = Default::default();
    let (ckpt, model, config, step) = if is_torch_file(&a.checkpoint) {
        let (config, model, _) = import_mmselfsup::<burn::backend::Flex>(&a.checkpoint, &device)?;
        (a.checkpoint.clone(), model, config, 0)
    } else {
        let ckpt = checkpoint::locate(&a.checkpoint)?;
        let (model, config, step) = train::load_model::<burn::backend::Flex>(&ckpt, &device)?;
        (ckpt, model, config, step)
    };
    let tensors = crate::export::encoder_tensors(&model.encoder, a.format)?;
    let params: usize = tensors.iter().map(|t| t.data.len()).sum();
    let meta = [
        ("format", "pt".to_string()),
        ("source", ckpt.display().to_string()),
        ("step", step.to_string()),
        ("preset", format!("{:?}", config.preset).to_lowercase()),
        ("layout", format!("{:?}", a.format).to_lowercase()),
    ];
    crate::export::write_safetensors(&a.out, &tensors, &meta)?;
    println!(
        "exported the encoder of {} (step {step}): {} tensors, {params} values -> {}",
        ckpt.display(),
        tensors.len(),
        a.out.display()
    );
    Ok(())
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

fn run_command(a: RunArgs) -> anyhow::Result<()> {
    init_tracing();
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
                None => MICRO_CONFIG.to_string(),
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
    if device == DeviceKind::Cpu && config.precision.dtype != Dtype::F32 {
        bail!(
            "precision.dtype = {} runs on cuda only (the CPU backend is f32); use --device cuda or drop it",
            format!("{:?}", config.precision.dtype).to_lowercase()
        );
    }
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
    if matches!(DeviceKind::parse(&a.device)?, DeviceKind::Cpu) {
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
    let summary = match device {
        DeviceKind::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            train::run::<B>(&config, &opts, &Default::default())?
        }
        DeviceKind::Cuda(n) => run_cuda(&config, &opts, n)?,
    };
    print_summary(&summary, metrics_url.as_deref());
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(config: &RunConfig, opts: &RunOptions, index: usize) -> anyhow::Result<RunSummary> {
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    let device = burn::backend::cuda::CudaDevice { index };
    Ok(match config.precision.dtype {
        Dtype::F32 => train::run::<Autodiff<Cuda<f32>>>(config, opts, &device)?,
        Dtype::Bf16 => train::run::<Autodiff<Cuda<bf16>>>(config, opts, &device)?,
        Dtype::F16 => train::run::<Autodiff<Cuda<f16>>>(config, opts, &device)?,
    })
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_config: &RunConfig, _opts: &RunOptions, _index: usize) -> anyhow::Result<RunSummary> {
    bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
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
