//! Weights come in through one door: every command that takes a model from a file (`run
//! --init-from`, `eval`, `features`, `export`, soon `finetune`) asks [`WeightsFile::locate`]
//! what the path is — one of our checkpoints, a run directory (its newest valid checkpoint), or
//! an mmselfsup CAE `.pth` — and [`load`] builds the model from it. The model (`crate::model`)
//! knows nothing about file formats (candle's `VarBuilder` idea); the readers live here:
//!
//! - [`torch_file`] and [`torch_pickle`]: a `torch.save` file audited before anything is
//!   allocated (every tensor's storage and view checked against the bytes there);
//! - [`mmselfsup`]: mmselfsup's CAE checkpoint (full algorithm state or extracted backbone);
//! - [`dalle`]: the DALL-E tokenizer's `dalle_encoder.pth` (spec §3).

pub mod dalle;
pub mod mmselfsup;
pub mod torch_file;
pub mod torch_pickle;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};

pub use dalle::load_dalle;

use crate::CaeError;
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Preset, RunConfig};
use crate::model::Cae;

/// What a weights path holds.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsFile {
    /// One of our checkpoint files (a run directory resolves to its newest valid one).
    Checkpoint(PathBuf),
    /// A PyTorch file (`torch.save`, zip or legacy pickle): an mmselfsup CAE checkpoint.
    Mmselfsup(PathBuf),
}

impl WeightsFile {
    /// Decides what `path` is: a PyTorch file by its content, else our checkpoint (a file, or a
    /// run directory's newest valid checkpoint).
    pub fn locate(path: &Path) -> Result<Self, CaeError> {
        if path.is_file() && mmselfsup::is_torch_checkpoint(path) {
            return Ok(Self::Mmselfsup(path.to_path_buf()));
        }
        Ok(Self::Checkpoint(checkpoint::locate(path)?))
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Checkpoint(p) | Self::Mmselfsup(p) => p,
        }
    }
}

/// A model read from a weights file.
pub struct Loaded<B: Backend> {
    pub model: Cae<B>,
    /// The run's config (a checkpoint), or the preset of the imported encoder's shape.
    pub config: RunConfig,
    /// The checkpoint's step (`None` for an import).
    pub step: Option<u64>,
    /// Whether `config` is a real run's (its data settings — HTTP retries, caps — apply to
    /// reading that run's shards), not a preset's defaults.
    pub from_run: bool,
    /// Where the weights came from, for the user: `path (step N)` or `path (mmselfsup, form)`.
    pub what: String,
}

/// The model of a weights file, on `device`.
pub fn load<B: Backend>(file: &WeightsFile, device: &B::Device) -> Result<Loaded<B>, CaeError> {
    match file {
        WeightsFile::Checkpoint(path) => {
            let (model, config, step) = load_model::<B>(path, device)?;
            let what = format!("{} (step {step})", path.display());
            Ok(Loaded { model, config, step: Some(step), from_run: true, what })
        }
        WeightsFile::Mmselfsup(path) => {
            let (dim, depth) = mmselfsup::probe_mmselfsup(path)?;
            let config = RunConfig::preset(Preset::from_encoder_shape(dim, depth)?);
            let model = Cae::<B>::new(&config.model, device)?;
            let (model, report) = mmselfsup::load_mmselfsup(model, path)?;
            let what = format!("{} (mmselfsup, {} form)", path.display(), report.form);
            Ok(Loaded { model, config, step: None, from_run: false, what })
        }
    }
}

/// The config of a weights file without building the model (a checkpoint's header, or the
/// preset of an import's encoder shape); `true` when it is a real run's.
pub fn config_of(file: &WeightsFile) -> Result<(RunConfig, bool), CaeError> {
    match file {
        WeightsFile::Checkpoint(path) => {
            Ok((RunConfig::from_resolved_toml(&Checkpoint::read_header(path)?.config)?, true))
        }
        WeightsFile::Mmselfsup(path) => {
            let (dim, depth) = mmselfsup::probe_mmselfsup(path)?;
            Ok((RunConfig::preset(Preset::from_encoder_shape(dim, depth)?), false))
        }
    }
}

/// The model of one of our checkpoint files (for export and evaluation), on `device`, with its
/// run config and step.
pub fn load_model<B: Backend>(path: &Path, device: &B::Device) -> Result<(Cae<B>, RunConfig, u64), CaeError> {
    let ck = Checkpoint::read(path)?;
    let config = RunConfig::from_resolved_toml(&ck.header.config)?;
    let model = Cae::<B>::new(&config.model, device)?;
    let model = model.load_record(ck.record::<B, _>("model", device)?);
    Ok((model, config, ck.header.step))
}

/// Initial weights of a fresh pre-training run (`trainer run --init-from`): an mmselfsup
/// checkpoint (whatever of the network it holds), or the model of one of our checkpoints with
/// the same model config (optimizer, step and data start fresh).
pub fn init_pretraining<B: AutodiffBackend>(
    model: Cae<B>,
    path: &Path,
    config: &RunConfig,
    device: &B::Device,
) -> Result<Cae<B>, CaeError> {
    match WeightsFile::locate(path)? {
        WeightsFile::Mmselfsup(path) => {
            let (model, r) = mmselfsup::load_mmselfsup(model, &path)?;
            tracing::info!("initial weights from {} ({} form, {} tensors)", path.display(), r.form, r.loaded);
            say!(
                "initial weights: {} (mmselfsup {} checkpoint: encoder{}{})",
                path.display(),
                r.form,
                if r.teacher { ", teacher" } else { "; teacher = encoder copy" },
                if r.neck { ", regressor and decoder" } else { "; regressor and decoder freshly initialised" }
            );
            Ok(model)
        }
        WeightsFile::Checkpoint(ckpt) => {
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
    }
}
