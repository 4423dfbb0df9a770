//! `trainer features` and `trainer eval knn`: frozen encoder features of shard sets, and the
//! weighted k-NN on them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::tensor::backend::Backend;
use cae_pipeline::LabelPolicy;
use cae_pipeline::read::ReadConfig;
use cae_pipeline::source::{self, ShardSet};
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
    /// Use the samples that can be read when some cannot (a corrupt image, a failed shard) and
    /// say "N of M" in the result, instead of failing naming them.
    #[arg(long)]
    pub allow_partial: bool,
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
/// how to read shards: a run checkpoint's `data` settings (`max_pixels`, `max_member_bytes`,
/// `max_failed_shards`, `http`: what its run was given for those shards and servers), else the
/// defaults.
type LoadedEncoder<B> = (crate::model::Encoder<B>, crate::model::CaeConfig, String, ReadConfig);

fn load_encoder<B: Backend>(a: &EncoderArgs, device: &B::Device) -> anyhow::Result<LoadedEncoder<B>> {
    let Some(path) = &a.checkpoint else {
        let config = RunConfig::preset(crate::config::Preset::parse(&a.preset)?);
        config.model.validate()?;
        let enc = crate::model::init::with_seed(a.seed, || crate::model::Encoder::new(&config.model, device));
        let what = format!("random init (seed {}) of the {} preset", a.seed, a.preset);
        return Ok((enc, config.model, what, ReadConfig::default()));
    };
    let file = WeightsFile::locate(path)?;
    if a.random_init {
        let (config, from_run) = crate::weights::config_of(&file)?;
        let enc = crate::model::init::with_seed(config.seed, || crate::model::Encoder::new(&config.model, device));
        let what = format!("random init (seed {}) of the net of {}", config.seed, file.path().display());
        let read = if from_run { config.data.read_config() } else { ReadConfig::default() };
        return Ok((enc, config.model, what, read));
    }
    let loaded = crate::weights::load::<B>(&file, device)?;
    let read = if loaded.from_run { loaded.config.data.read_config() } else { ReadConfig::default() };
    Ok((loaded.model.encoder, loaded.config.model, loaded.what, read))
}

/// The test transform for `model`, reading with `read` under the `labels` policy of the command.
fn eval_config(
    a: &EncoderArgs,
    model: &crate::model::CaeConfig,
    read: ReadConfig,
    labels: LabelPolicy,
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
        read: ReadConfig { labels, ..read },
    })
}

/// Features of shard sets, the encoder's config and a description of it.
type FeatureSets = (Vec<crate::features::Features>, crate::model::CaeConfig, String);

/// What to extract: the shard sources, and what a sample needs. `Eval`: a labeled train set and
/// a labeled val set with the same classes (k-NN, linear probe). `Features`: one set, labels
/// optional.
enum Extraction<'a> {
    Eval { train: &'a str, val: &'a str },
    Features { shards: &'a str },
}

/// Features of each shard set of `what`, on the backend of `a.device`; for an evaluation, the
/// train and val class lists are compared first (before hours of extraction).
fn extract_features(a: &EncoderArgs, what: Extraction<'_>) -> anyhow::Result<(FeatureSets, Vec<ShardSet>)> {
    struct Extract<'a>(&'a EncoderArgs, Extraction<'a>);
    impl OnBackend for Extract<'_> {
        type Output = (FeatureSets, Vec<ShardSet>);
        fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<Self::Output> {
            let Extract(a, what) = self;
            let (enc, model, described, read) = load_encoder::<B>(a, device)?;
            let (sources, labels) = match what {
                Extraction::Eval { train, val } => (vec![train, val], LabelPolicy::Required),
                Extraction::Features { shards } => (vec![shards], LabelPolicy::Optional),
            };
            let mut sets = Vec::new();
            for s in &sources {
                let shown = source::redacted(s);
                sets.push(source::expand_set(s, &read.http).with_context(|| format!("shard source {shown}"))?);
            }
            if let [train, val] = &sets[..] {
                check_classes(train, val, &source::redacted(sources[0]), &source::redacted(sources[1]))?;
            }
            let eval = eval_config(a, &model, read, labels)?;
            println!("encoder: {described}; images: shorter side {}, centre crop {}", eval.resize, eval.crop);
            let mut out = Vec::new();
            for (s, set) in sources.iter().zip(&sets) {
                let shown = source::redacted(s);
                let cfg = crate::features::ExtractConfig {
                    eval: eval.clone(),
                    shown: shown.clone(),
                    allow_partial: a.allow_partial,
                    progress: !a.no_progress,
                };
                let f = crate::features::extract(&enc, set.shards.clone(), &cfg, device)
                    .with_context(|| format!("features of {shown}"))?;
                let n = if f.read.complete() { format!("{} images", f.len()) } else { f.read.describe() };
                println!("{shown}: {n}");
                out.push(f);
            }
            Ok(((out, model, described), sets))
        }
    }
    on_device(DeviceKind::from_flag(&a.device)?, Extract(a, what))
}

/// Refuses train and val shards whose manifests list different classes: their labels would be
/// compared index by index, each meaning another class (a config error, exit status 2). Sets
/// without manifests cannot be compared: a warning says so.
fn check_classes(train: &ShardSet, val: &ShardSet, train_shown: &str, val_shown: &str) -> Result<(), crate::CaeError> {
    let (Some(t), Some(v)) = (&train.classes, &val.classes) else {
        tracing::warn!(
            "the class lists of the train and val shards cannot be compared (a source without manifest.json): \
             their labels are taken to mean the same classes"
        );
        return Ok(());
    };
    match cae_pipeline::manifest::first_class_difference(t, v) {
        None => Ok(()),
        Some(d) => Err(crate::CaeError::Config(format!(
            "the train shards ({train_shown}) and the val shards ({val_shown}) list different classes ({} and {}): \
             {}, so every label after it would be scored against another class. Build both with the same class \
             list (`sharder build --classes <train shards>/classes.txt`)",
            t.len(),
            v.len(),
            d.describe("the train shards", "the val shards")
        ))),
    }
}

pub(super) fn features_command(a: &FeaturesArgs) -> anyhow::Result<()> {
    super::init_tracing();
    crate::run_dir::check_file_writable(&a.out)?;
    let ((mut feats, model, what), sets) = extract_features(&a.encoder, Extraction::Features { shards: &a.shards })?;
    let f = feats.pop().context("no features")?;
    let mut meta = vec![
        ("encoder", what),
        ("shards", source::redacted(&a.shards)),
        ("dim", model.embed_dim.to_string()),
        ("features", "cls and mean of the patch tokens, after the encoder's final LayerNorm".to_string()),
        ("keys", "uint8 rows: UTF-8 sample keys, zero-padded".to_string()),
        ("read", serde_json::to_string(&f.read)?),
    ];
    // The class list the labels index (from the manifests): two feature files can then be checked
    // against each other. Pre-training uses no labels, so the checkpoint's training classes say
    // nothing about these labels and are not compared.
    if let Some(classes) = sets.first().and_then(|s| s.classes.as_ref()) {
        meta.push(("classes", serde_json::to_string(classes)?));
    }
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
    let what = Extraction::Eval { train: &train_shards, val: &val_shards };
    let ((feats, _model, what), _) = extract_features(&a.encoder, what)?;
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
        j["scored"] = scored(train, val)?;
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
    let what = Extraction::Eval { train: &train_shards, val: &val_shards };
    let ((feats, _model, what), _) = extract_features(&a.encoder, what)?;
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
        results.insert("scored".into(), scored(train, val)?);
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}

/// The result's `scored` object: what was read of each set ("N of M", bad samples, failed
/// shards); anything short of every sample needed `--allow-partial`.
fn scored(train: &crate::features::Features, val: &crate::features::Features) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({ "train": serde_json::to_value(&train.read)?, "val": serde_json::to_value(&val.read)? }))
}
