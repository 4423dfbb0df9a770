//! The sharder's errors. Per-file problems are not errors: they become rejections
//! (`rejected.tsv`) and the run goes on.

use std::path::{Path, PathBuf};

/// Errors that stop a sharder run.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The input folder or list cannot be read.
    #[error("input {path}: {message}")]
    Input { path: PathBuf, message: String },
    /// The output folder holds files and neither `--resume` nor `--force` was given.
    #[error("output {0} is not empty (use --resume to finish an interrupted run or --force to overwrite)")]
    OutputNotEmpty(PathBuf),
    /// `--resume` found a journal written with other options or another input.
    #[error("cannot resume in {path}: {message}")]
    Resume { path: PathBuf, message: String },
    /// Writing the output failed (disk full, permissions, ...).
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The shard format layer failed.
    #[error("shard {path}: {source}")]
    Shard { path: PathBuf, source: cae_pipeline::wds::WdsError },
    /// `--strict` and some inputs were rejected.
    #[error("{0} input file(s) rejected (see rejected.tsv) and --strict is set")]
    Strict(u64),
    /// A worker thread died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ShardError {
    pub(crate) fn input(path: &Path, e: impl std::fmt::Display) -> Self {
        ShardError::Input { path: path.to_path_buf(), message: e.to_string() }
    }
    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        ShardError::Write { path: path.to_path_buf(), source }
    }
}
