//! Typed errors of the trainer library.

use std::path::PathBuf;

use thiserror::Error;

/// Everything the trainer library can refuse.
#[derive(Debug, Error)]
pub enum CaeError {
    /// Command-line flags that contradict each other or name nothing valid (exit status 2).
    #[error("usage: {0}")]
    Usage(String),
    /// A [`crate::model::CaeConfig`] or a run config is inconsistent (raised at start-up).
    #[error("invalid config: {0}")]
    Config(String),
    /// A tensor handed to a forward pass has the wrong shape.
    #[error("shape mismatch in {what}: expected {expected:?}, got {got:?}")]
    Shape { what: &'static str, expected: Vec<usize>, got: Vec<usize> },
    /// A host-side patch mask cannot be turned into index tensors (wrong count or length).
    #[error("invalid mask for sample {sample}: {reason}")]
    Mask { sample: usize, reason: String },
    /// The targets handed to `Cae::forward` do not match the configured target kind.
    #[error("target kind mismatch: config wants {expected}, got {got}")]
    TargetKind { expected: &'static str, got: &'static str },
    /// A weights file is missing, unreadable, or does not fit the model.
    #[error("weights {path}: {reason}")]
    Weights { path: String, reason: String },
    /// A file or directory of the run (config, checkpoint, log) cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A checkpoint file is malformed, from another format version, or does not fit the model.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// The data pipeline failed (shard list, loader thread, too many bad samples).
    #[error("data: {0}")]
    Data(String),
    /// The loss, the gradient norm or the weights became NaN or infinite; the run stops at that
    /// step and the last good checkpoint is kept (no checkpoint is written with such weights).
    #[error("non-finite {what} ({value}) at step {step}; the last good checkpoint is kept")]
    NonFinite { what: &'static str, step: u64, value: f64 },
}

impl CaeError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
