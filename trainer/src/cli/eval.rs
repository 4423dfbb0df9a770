//! `trainer features` and `trainer eval knn`: frozen encoder features of shard sets, and the
//! weighted k-NN on them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::tensor::backend::Backend;
use cae_pipeline::http::HttpConfig;
use clap::Args;

use super::device::{DeviceKind, OnBackend, on_device};
use crate::builtin::{self, BuiltinData};
use crate::config::RunConfig;
use crate::weights::WeightsFile;

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
    /// cpu, cuda[:N], wgpu[:N] or wgpu:cpu.
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
    #[command(flatten)]
    pub sets: EvalSets,
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
}

/// The two sets of an evaluation and the output form (`eval knn`, `eval linear`).
#[derive(Args, Debug)]
pub struct EvalSets {
    /// The labeled reference / training set (default: the built-in shapes set, generated if
    /// missing).
    #[arg(long)]
    pub train_shards: Option<String>,
    /// The queries / evaluation set (default: the built-in shapes validation set, generated if missing).
    #[arg(long)]
    pub val_shards: Option<String>,
    /// Root of the built-in data (for the defaults above).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The encoder of `a` (a checkpoint's, or a fresh one), a description of where it came from, and
/// the HTTP settings to read shards with: a run checkpoint's `data.http` (the retries and timeouts
/// its run was given for those servers), else the defaults.
type LoadedEncoder<B> = (crate::model::Encoder<B>, crate::model::CaeConfig, String, HttpConfig);

fn load_encoder<B: Backend>(a: &EncoderArgs, device: &B::Device) -> anyhow::Result<LoadedEncoder<B>> {
    let Some(path) = &a.checkpoint else {
        let config = RunConfig::preset(crate::config::Preset::parse(&a.preset)?);
        config.model.validate()?;
        let enc = crate::model::init::with_seed(a.seed, || crate::model::Encoder::new(&config.model, device));
        let what = format!("random init (seed {}) of the {} preset", a.seed, a.preset);
        return Ok((enc, config.model, what, HttpConfig::default()));
    };
    let file = WeightsFile::locate(path)?;
    if a.random_init {
        let (config, _) = crate::weights::config_of(&file)?;
        let enc = crate::model::init::with_seed(config.seed, || crate::model::Encoder::new(&config.model, device));
        let what = format!("random init (seed {}) of the net of {}", config.seed, file.path().display());
        return Ok((enc, config.model, what, config.data.http));
    }
    let loaded = crate::weights::load::<B>(&file, device)?;
    let http = if loaded.from_run { loaded.config.data.http } else { HttpConfig::default() };
    Ok((loaded.model.encoder, loaded.config.model, loaded.what, http))
}

fn eval_config(
    a: &EncoderArgs,
    model: &crate::model::CaeConfig,
    http: HttpConfig,
) -> anyhow::Result<cae_pipeline::eval::EvalConfig> {
    let resize = a.resize.unwrap_or_else(|| crate::features::default_resize(model.img_size));
    if resize < model.img_size {
        bail!("--resize {resize} is smaller than the model's input size {}", model.img_size);
    }
    Ok(cae_pipeline::eval::EvalConfig {
        batch_size: a.batch_size.max(1),
        workers: a.workers,
        resize,
        crop: model.img_size,
        http,
    })
}

type FeatureSets = (Vec<crate::features::Features>, crate::model::CaeConfig, String);

/// Features of each shard source in `sources`, on the backend of `a.device`.
fn extract_features(a: &EncoderArgs, sources: &[&str]) -> anyhow::Result<FeatureSets> {
    struct Extract<'a>(&'a EncoderArgs, &'a [&'a str]);
    impl OnBackend for Extract<'_> {
        type Output = FeatureSets;
        fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<FeatureSets> {
            let Extract(a, sources) = self;
            let (enc, model, what, http) = load_encoder::<B>(a, device)?;
            let cfg = eval_config(a, &model, http)?;
            println!("encoder: {what}; images: shorter side {}, centre crop {}", cfg.resize, cfg.crop);
            let mut out = Vec::new();
            for s in sources {
                let f = crate::features::extract(&enc, s, cfg.clone(), device, !a.no_progress)
                    .with_context(|| format!("features of {}", cae_pipeline::redact::source(s)))?;
                let bad =
                    if f.bad_samples > 0 { format!(", {} bad samples skipped", f.bad_samples) } else { String::new() };
                println!("{}: {} images{bad}", cae_pipeline::redact::source(s), f.len());
                out.push(f);
            }
            Ok((out, model, what))
        }
    }
    on_device(DeviceKind::from_flag(&a.device)?, Extract(a, sources))
}

pub(super) fn features_command(a: &FeaturesArgs) -> anyhow::Result<()> {
    super::init_tracing();
    crate::run_dir::check_file_writable(&a.out)?;
    let (mut feats, model, what) = extract_features(&a.encoder, &[&a.shards])?;
    let f = feats.pop().context("no features")?;
    let meta = [
        ("encoder", what),
        ("shards", cae_pipeline::redact::source(&a.shards)),
        ("dim", model.embed_dim.to_string()),
        ("features", "cls and mean of the patch tokens, after the encoder's final LayerNorm".to_string()),
        ("keys", "uint8 rows: UTF-8 sample keys, zero-padded".to_string()),
    ];
    f.save(&a.out, &meta).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} x {} features (cls, mean), labels and keys -> {}", f.len(), f.dim, a.out.display());
    Ok(())
}

/// Weighted k-NN of `val` against `train` (features `[n, d]`, row-major) on a backend.
struct Knn<'a> {
    train: (&'a [f32], &'a [i64]),
    val: (&'a [f32], &'a [i64]),
    dim: usize,
    k: usize,
    temperature: f64,
}

impl OnBackend for Knn<'_> {
    type Output = crate::knn::KnnResult;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<crate::knn::KnnResult> {
        let ((t, tl), (v, vl)) = (self.train, self.val);
        Ok(crate::knn::weighted_knn::<B>(t, tl, v, vl, self.dim, self.k, self.temperature, device)?)
    }
}

/// The train and val shard sources of an evaluation: the flags, or the built-in sets (made if
/// missing).
fn eval_sources(sets: &EvalSets) -> anyhow::Result<(String, String)> {
    let (train, val) = (&sets.train_shards, &sets.val_shards);
    let builtin = BuiltinData::under(&sets.data_dir);
    let mut say = |l: String| println!("{l}");
    let train_shards = match train {
        Some(s) => s.clone(),
        None => builtin::ensure(&builtin, &mut say)?.to_string_lossy().into_owned(),
    };
    let val_shards = match val {
        Some(s) => s.clone(),
        None => builtin::ensure_val(&builtin, &mut say)?.to_string_lossy().into_owned(),
    };
    Ok((train_shards, val_shards))
}

/// `trainer eval linear`: the linear probe ([`crate::linear_probe`]) on frozen features.
#[derive(Args, Debug)]
pub struct LinearArgs {
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub sets: EvalSets,
    /// Which feature: `cls` (the cls token) or `mean` (mean of the patch tokens), both after the
    /// encoder's final LayerNorm.
    #[arg(long, default_value = "cls")]
    pub feature: String,
    /// Training epochs of the classifier (for each learning rate tried, and the final fit); a
    /// small set gets more, to make at least 2000 optimizer steps per fit.
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    /// Seed of the classifier's batch order and held-out split.
    #[arg(long, default_value_t = 0)]
    pub probe_seed: u64,
}

/// The probe on a backend (with autodiff).
struct Probe<'a> {
    train: (&'a [f32], &'a [i64]),
    val: (&'a [f32], &'a [i64]),
    dim: usize,
    epochs: usize,
    seed: u64,
}

impl OnBackend for Probe<'_> {
    type Output = crate::linear_probe::ProbeResult;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<Self::Output> {
        let ((t, tl), (v, vl)) = (self.train, self.val);
        Ok(crate::linear_probe::linear_probe::<burn::backend::Autodiff<B>>(
            t,
            tl,
            v,
            vl,
            self.dim,
            self.epochs,
            self.seed,
            device,
        )?)
    }
}

pub(super) fn linear_command(a: &LinearArgs) -> anyhow::Result<()> {
    super::init_tracing();
    if a.feature != "cls" && a.feature != "mean" {
        super::usage!("--feature {:?}: expected cls or mean", a.feature);
    }
    let (train_shards, val_shards) = eval_sources(&a.sets)?;
    let (feats, _model, what) = extract_features(&a.encoder, &[&train_shards, &val_shards])?;
    let (train, val) = (&feats[0], &feats[1]);
    let (t, v) = if a.feature == "cls" { (&train.cls, &val.cls) } else { (&train.mean, &val.mean) };
    let job = Probe {
        train: (t, &train.labels),
        val: (v, &val.labels),
        dim: train.dim,
        epochs: a.epochs,
        seed: a.probe_seed,
    };
    let r = on_device(DeviceKind::from_flag(&a.encoder.device)?, job)?;
    if a.sets.json {
        let mut j = serde_json::to_value(&r)?;
        j["feature"] = a.feature.clone().into();
        j["encoder"] = what.into();
        println!("{j}");
    } else {
        println!(
            "linear probe ({} features, {} epochs, lr {} chosen on held-out {:.2}%): top-1 {:.2}%  top-5 {:.2}%  \
             ({} train, {} val, {} classes)",
            a.feature,
            r.epochs,
            r.lr,
            100.0 * r.heldout_top1,
            100.0 * r.top1,
            100.0 * r.top5,
            r.train_samples,
            r.val_samples,
            r.classes
        );
    }
    Ok(())
}

pub(super) fn knn_command(a: &KnnArgs) -> anyhow::Result<()> {
    super::init_tracing();
    let (train_shards, val_shards) = eval_sources(&a.sets)?;
    let (feats, _model, what) = extract_features(&a.encoder, &[&train_shards, &val_shards])?;
    let (train, val) = (&feats[0], &feats[1]);
    let mut results = serde_json::Map::new();
    for (name, t, v) in [("cls", &train.cls, &val.cls), ("mean", &train.mean, &val.mean)] {
        let job = Knn {
            train: (t, &train.labels),
            val: (v, &val.labels),
            dim: train.dim,
            k: a.k,
            temperature: a.temperature,
        };
        let r = on_device(DeviceKind::from_flag(&a.encoder.device)?, job)?;
        if !a.sets.json {
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
    if a.sets.json {
        results.insert("encoder".into(), what.into());
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}
