//! The built-in sample set for the no-argument `trainer run`: generated once (the tools crate's
//! ImageNet-like fixtures: per-class palettes and wave orientations), sharded once, reused after.

use std::path::{Path, PathBuf};

use cae_pipeline::manifest::MANIFEST_FILE;
use cae_sharder::BuildOptions;
use cae_tools::fixtures::{FixtureSpec, generate};

use crate::CaeError;

/// Classes x images per class of the built-in set.
pub const CLASSES: usize = 10;
pub const PER_CLASS: usize = 40;
/// Largest image side (the micro preset crops to 64 px: large images would only cost decode time).
pub const MAX_SIDE: u32 = 640;

/// Paths of the built-in data under a data root (`data/` by default).
#[derive(Clone, Debug)]
pub struct BuiltinData {
    /// `data/builtin`: the generated JPEG folders (`train/<wnid>/...`).
    pub images: PathBuf,
    /// `data/builtin-shards`: WebDataset shards with `manifest.json`.
    pub shards: PathBuf,
}

impl BuiltinData {
    pub fn under(root: &Path) -> Self {
        Self { images: root.join("builtin"), shards: root.join("builtin-shards") }
    }
}

/// Generates (unless `fixtures.tsv` is there) and shards (unless `manifest.json` is there) the
/// built-in set; `say` gets one line per action. Returns the shard directory.
pub fn ensure(data: &BuiltinData, say: &mut dyn FnMut(String)) -> Result<PathBuf, CaeError> {
    if data.images.join("fixtures.tsv").is_file() {
        say(format!("built-in sample set: reusing {}", data.images.display()));
    } else {
        say(format!(
            "built-in sample set: generating {CLASSES} classes x {PER_CLASS} images in {}",
            data.images.display()
        ));
        let spec = FixtureSpec { classes: CLASSES, per_class: PER_CLASS, seed: 0, odd_files: true, max_side: MAX_SIDE };
        generate(&data.images, &spec).map_err(|e| CaeError::Data(format!("generating the built-in set: {e}")))?;
    }
    if data.shards.join(MANIFEST_FILE).is_file() {
        say(format!("shards: reusing {}", data.shards.display()));
    } else {
        say(format!("shards: writing {}", data.shards.display()));
        let mut o = BuildOptions::new(data.images.join("train"), &data.shards);
        o.shard_max_samples = 100;
        o.force = true;
        let r = cae_sharder::build(&o).map_err(|e| CaeError::Data(format!("sharding the built-in set: {e}")))?;
        say(format!("shards: {} samples in {} shards ({} odd files rejected)", r.samples, r.shards, r.rejected));
    }
    Ok(data.shards.clone())
}
