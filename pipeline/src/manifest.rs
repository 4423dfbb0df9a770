//! `manifest.json`: the list of shards a sharder run wrote, with sizes and digests.
//!
//! The sharder writes it last (atomically); the pipeline reads it to know every shard and the
//! epoch length up front; `sharder verify` checks files against it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::wds::ShardDigest;

/// File name of the manifest inside a shard directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Format tag written into every manifest.
pub const MANIFEST_FORMAT: &str = "cae-wds/1";

/// One shard of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, relative to the manifest's directory.
    pub name: String,
    #[serde(flatten)]
    pub digest: ShardDigest,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Shard file name prefix (`<prefix>-000000.tar`).
    pub prefix: String,
    /// Seed of the global sample shuffle.
    pub seed: u64,
    /// Class names; the index in this list is the `.cls` value (torchvision ImageFolder order).
    pub classes: Vec<String>,
    /// Input files seen (= `total_samples` + `rejected`).
    pub input_files: u64,
    /// Samples written, over all shards.
    pub total_samples: u64,
    /// Bytes of all shard files.
    pub total_bytes: u64,
    /// Input files that were re-encoded (CMYK, non-JPEG, EXIF-rotated, or over `--max-side`).
    pub converted: u64,
    /// Input files rejected (listed in `rejected.tsv`).
    pub rejected: u64,
    pub shards: Vec<ShardEntry>,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: unsupported format {found:?} (expected {MANIFEST_FORMAT:?})")]
    Format { path: String, found: String },
}

impl Manifest {
    /// Reads `dir/manifest.json` (or the file itself when `path` is a file).
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = if path.is_dir() { path.join(MANIFEST_FILE) } else { path.to_path_buf() };
        let p = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Io { path: p.clone(), source })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path: p.clone(), source })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format { path: p, found: m.format });
        }
        Ok(m)
    }
}
