//! `sharder verify DIR`: checks a shard directory against its manifest.
//!
//! Checks, shard by shard: the file exists, its size and sha256 match the manifest, the tar
//! structure parses to the end, the sample count matches, keys are unique across all shards,
//! every sample has `jpg` and `cls` (a valid class index), and with `--decode` that every image
//! decodes. Every problem is collected (the first one names shard and key); totals are printed.
//! A directory whose build is unfinished (its resume journal is there) is not checked: the error
//! says to finish it with `sharder build ... --resume` first.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use cae_pipeline::decode;
use cae_pipeline::manifest::Manifest;
use cae_pipeline::wds::{CLASS_EXT, IMAGE_EXT, SampleReader, sha256_file};
use indicatif::ProgressBar;

use crate::build::{JOURNAL_FILE, journaled_shards};
use crate::error::ShardError;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub shard: String,
    /// Sample key, when the problem is in one sample.
    pub key: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{} (sample {k}): {}", self.shard, self.message),
            None => write!(f, "{}: {}", self.shard, self.message),
        }
    }
}

/// Totals of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub shards: u64,
    pub samples: u64,
    pub bytes: u64,
    pub decoded: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies `dir` (which holds `manifest.json`). Errors only when the build there is unfinished
/// ([`ShardError::Unfinished`], which says to `--resume` it) or the manifest itself cannot be
/// read; everything else is a [`Problem`] in the report.
pub fn verify(dir: &Path, decode_images: bool, progress: bool) -> Result<VerifyReport, ShardError> {
    if dir.join(JOURNAL_FILE).exists() {
        return Err(ShardError::Unfinished { path: dir.to_path_buf(), shards: journaled_shards(dir) });
    }
    let manifest = Manifest::load(dir)?;
    let mut report = VerifyReport::default();
    let mut keys: HashSet<String> = HashSet::new();
    let pb = if progress { ProgressBar::new(manifest.shards.len() as u64) } else { ProgressBar::hidden() };
    let num_classes = manifest.classes.len() as i64;
    for entry in &manifest.shards {
        pb.inc(1);
        report.shards += 1;
        let path = dir.join(&entry.name);
        let mut problem = |key: Option<String>, message: String| {
            report.problems.push(Problem { shard: entry.name.clone(), key, message });
        };
        match sha256_file(&path) {
            Err(e) => {
                problem(None, format!("cannot read: {e}"));
                continue;
            }
            Ok((bytes, sha)) => {
                report.bytes += bytes;
                if bytes != entry.digest.bytes {
                    problem(None, format!("size {bytes} bytes, manifest says {}", entry.digest.bytes));
                }
                if sha != entry.digest.sha256 {
                    problem(None, format!("sha256 {sha} does not match the manifest's {}", entry.digest.sha256));
                }
            }
        }
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                problem(None, format!("cannot open: {e}"));
                continue;
            }
        };
        let mut count = 0u64;
        let mut img = decode::RgbImage::default();
        let mut last_key: Option<String> = None;
        for sample in SampleReader::new(BufReader::with_capacity(1 << 20, file)) {
            count += 1;
            let s = match sample {
                Ok(s) => s,
                Err(e) => {
                    let after = last_key.as_ref().map(|k| format!(" (after sample {k})")).unwrap_or_default();
                    problem(None, format!("{e}{after}"));
                    continue;
                }
            };
            last_key = Some(s.key.clone());
            if !keys.insert(s.key.clone()) {
                problem(Some(s.key.clone()), "duplicate key".into());
            }
            match s.class() {
                None => problem(Some(s.key.clone()), format!("no .{CLASS_EXT} member")),
                Some(Err(e)) => problem(Some(s.key.clone()), format!("bad class: {e}")),
                Some(Ok(c)) if c < 0 || c >= num_classes => {
                    problem(Some(s.key.clone()), format!("class {c} out of range 0..{num_classes}"))
                }
                Some(Ok(_)) => {}
            }
            match s.get(IMAGE_EXT) {
                None => problem(Some(s.key.clone()), format!("no .{IMAGE_EXT} member")),
                Some(bytes) if decode_images => {
                    match cae_pipeline::guard::catch_panic(|| decode::decode_jpeg_into(bytes, true, &mut img)) {
                        Ok(Ok(())) => report.decoded += 1,
                        Ok(Err(e)) => problem(Some(s.key.clone()), format!("image does not decode: {e}")),
                        Err(what) => problem(Some(s.key.clone()), format!("the decoder panicked (a bug): {what}")),
                    }
                }
                Some(_) => {}
            }
        }
        report.samples += count;
        if count != entry.digest.samples {
            problem(None, format!("{count} samples, manifest says {}", entry.digest.samples));
        }
    }
    pb.finish_and_clear();
    if report.samples != manifest.total_samples {
        report.problems.push(Problem {
            shard: "manifest.json".into(),
            key: None,
            message: format!("{} samples in shards, total_samples says {}", report.samples, manifest.total_samples),
        });
    }
    Ok(report)
}
