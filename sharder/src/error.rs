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
    /// A signal (SIGINT, SIGTERM, SIGHUP) stopped the build: the complete shards are kept and
    /// journaled, the shard in progress was dropped.
    #[error(
        "stopped early: {shards} complete shard(s) kept in {path}, the shard in progress dropped; \
         run the same command with --resume to finish the build"
    )]
    Stopped { path: PathBuf, shards: u64 },
    /// `sharder verify` on a folder whose build has not finished (a journal is there).
    #[error(
        "{path} holds an unfinished build ({shards} complete shard(s) journaled, no finished \
         manifest.json): run the same `sharder build` command with --resume to finish it (without \
         --strict if a --strict build stopped on rejected inputs), then verify"
    )]
    Unfinished { path: PathBuf, shards: u64 },
    /// The manifest cannot be read.
    #[error(transparent)]
    Manifest(#[from] cae_pipeline::manifest::ManifestError),
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
