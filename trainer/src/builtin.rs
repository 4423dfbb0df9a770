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
/// Images per class of the built-in validation set (another seed: other images of the same
/// classes), the queries of `trainer eval knn` on built-in data.
pub const VAL_PER_CLASS: usize = 10;
/// Largest image side (the micro preset crops to 64 px: large images would only cost decode time).
pub const MAX_SIDE: u32 = 640;

/// Paths of the built-in data under a data root (`data/` by default).
#[derive(Clone, Debug)]
pub struct BuiltinData {
    /// `data/builtin`: the generated JPEG folders (`train/<wnid>/...`).
    pub images: PathBuf,
    /// `data/builtin-shards`: WebDataset shards with `manifest.json`.
    pub shards: PathBuf,
    /// `data/builtin-val`: the validation images (same classes, another seed, no odd files).
    pub val_images: PathBuf,
    /// `data/builtin-val-shards`.
    pub val_shards: PathBuf,
}

impl BuiltinData {
    pub fn under(root: &Path) -> Self {
        Self {
            images: root.join("builtin"),
            shards: root.join("builtin-shards"),
            val_images: root.join("builtin-val"),
            val_shards: root.join("builtin-val-shards"),
        }
    }
}

/// Generates (unless `fixtures.tsv` is there) and shards (unless `manifest.json` is there) the
/// built-in set; `say` gets one line per action. Returns the shard directory.
pub fn ensure(data: &BuiltinData, say: &mut dyn FnMut(String)) -> Result<PathBuf, CaeError> {
    let spec = FixtureSpec { classes: CLASSES, per_class: PER_CLASS, seed: 0, odd_files: true, max_side: MAX_SIDE };
    ensure_set(&data.images, &data.shards, &spec, say)
}

/// The built-in validation set (generated and sharded like [`ensure`]); returns its shard dir.
pub fn ensure_val(data: &BuiltinData, say: &mut dyn FnMut(String)) -> Result<PathBuf, CaeError> {
    let spec =
        FixtureSpec { classes: CLASSES, per_class: VAL_PER_CLASS, seed: 1, odd_files: false, max_side: MAX_SIDE };
    ensure_set(&data.val_images, &data.val_shards, &spec, say)
}

fn ensure_set(
    images: &Path,
    shards: &Path,
    spec: &FixtureSpec,
    say: &mut dyn FnMut(String),
) -> Result<PathBuf, CaeError> {
    let data =
        BuiltinData { images: images.to_path_buf(), shards: shards.to_path_buf(), ..BuiltinData::under(Path::new("")) };
    if data.images.join("fixtures.tsv").is_file() {
        say(format!("built-in sample set: reusing {}", data.images.display()));
    } else {
        say(format!(
            "built-in sample set: generating {} classes x {} images in {}",
            spec.classes,
            spec.per_class,
            data.images.display()
        ));
        generate(&data.images, spec).map_err(|e| CaeError::Data(format!("generating the built-in set: {e}")))?;
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
