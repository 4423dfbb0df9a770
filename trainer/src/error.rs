//! Typed errors of the trainer library.

use thiserror::Error;

/// Everything the trainer library can refuse.
#[derive(Debug, Error)]
pub enum CaeError {
    /// A [`crate::model::CaeConfig`] is inconsistent (raised by `validate`, i.e. at start-up).
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
}
