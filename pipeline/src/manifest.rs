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
    /// A shard name that is not a plain file name (`/`, `\\`, `..`, empty): joined to the
    /// manifest's directory it could point anywhere (`/etc/passwd`, `../../x`).
    #[error("{path}: shard name {name:?} refused: {reason}")]
    ShardName { path: String, name: String, reason: &'static str },
}

/// Checks that a shard name from a manifest (or a sharder journal) is a plain file name inside
/// the manifest's directory: not empty, no path separator, not `.`/`..` and no `..` anywhere.
pub fn check_shard_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." {
        return Err("empty");
    }
    if name.contains('/') || name.contains('\\') {
        return Err("contains a path separator");
    }
    if name.contains("..") {
        return Err("contains `..`");
    }
    if name.contains('\0') {
        return Err("contains a NUL byte");
    }
    Ok(())
}

/// Where two class lists first differ: the class index and each list's class there (`None`
/// past its end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDifference {
    pub index: usize,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// The first place where class lists `a` and `b` differ; `None` when they are the same list.
/// Labels are indices into these lists (`.cls`), so two shard sets whose lists differ give the
/// same label to different classes: evaluating one against the other scores shifted labels.
pub fn first_class_difference(a: &[String], b: &[String]) -> Option<ClassDifference> {
    let index = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    (index < a.len().max(b.len())).then(|| ClassDifference {
        index,
        a: a.get(index).cloned(),
        b: b.get(index).cloned(),
    })
}

impl ClassDifference {
    /// "class 3 is \"n01443537\" in the train shards but \"n01484850\" in the val shards".
    pub fn describe(&self, a_name: &str, b_name: &str) -> String {
        let show = |c: &Option<String>, n: &str| match c {
            Some(c) => format!("{c:?} in {n}"),
            None => format!("missing in {n} (its list ends before)"),
        };
        format!("class {} is {} but {}", self.index, show(&self.a, a_name), show(&self.b, b_name))
    }
}

impl Manifest {
    /// Reads `dir/manifest.json` (or the file itself when `path` is a file).
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = if path.is_dir() { path.join(MANIFEST_FILE) } else { path.to_path_buf() };
        let p = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Io { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks a manifest's text; `origin` (its path or URL) names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let p = origin.to_string();
        let m: Manifest =
            serde_json::from_str(text).map_err(|source| ManifestError::Parse { path: p.clone(), source })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format { path: p, found: m.format });
        }
        for s in &m.shards {
            check_shard_name(&s.name).map_err(|reason| ManifestError::ShardName {
                path: p.clone(),
                name: s.name.clone(),
                reason,
            })?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wds::ShardDigest;

    fn manifest_with(names: &[&str]) -> Manifest {
        let digest = ShardDigest { samples: 1, bytes: 1, sha256: "0".repeat(64) };
        Manifest {
            format: MANIFEST_FORMAT.into(),
            prefix: "train".into(),
            seed: 0,
            classes: vec![],
            input_files: 1,
            total_samples: 1,
            total_bytes: 1,
            converted: 0,
            rejected: 0,
            shards: names.iter().map(|n| ShardEntry { name: n.to_string(), digest: digest.clone() }).collect(),
        }
    }

    #[test]
    fn the_first_class_difference_is_found_and_named() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(first_class_difference(&l(&["a", "b"]), &l(&["a", "b"])), None);
        // A list lacking one class: every later index shifts by one.
        let d = first_class_difference(&l(&["a", "b", "c", "d"]), &l(&["a", "c", "d"])).unwrap();
        assert_eq!((d.index, d.a.as_deref(), d.b.as_deref()), (1, Some("b"), Some("c")));
        assert_eq!(
            d.describe("the train shards", "the val shards"),
            r#"class 1 is "b" in the train shards but "c" in the val shards"#
        );
        let d = first_class_difference(&l(&["a", "b"]), &l(&["a", "b", "c"])).unwrap();
        assert_eq!((d.index, d.a.as_deref(), d.b.as_deref()), (2, None, Some("c")));
        assert!(d.describe("T", "V").contains("missing in T"), "{}", d.describe("T", "V"));
    }

    #[test]
    fn shard_names_with_separators_or_dot_dot_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MANIFEST_FILE);
        for bad in ["/etc/passwd", "../x.tar", "a/b.tar", "..", "x..tar", "", "a\\b.tar"] {
            let text = serde_json::to_string(&manifest_with(&["train-000000.tar", bad])).expect("json");
            std::fs::write(&path, text).expect("write");
            match Manifest::load(dir.path()) {
                Err(ManifestError::ShardName { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        let text = serde_json::to_string(&manifest_with(&["train-000000.tar", "train-000001.tar"])).expect("json");
        std::fs::write(&path, text).expect("write");
        assert_eq!(Manifest::load(dir.path()).expect("plain names load").shards.len(), 2);
    }
}
