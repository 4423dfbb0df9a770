//! The built-in sample sets, generated once (the tools crate's fixtures), sharded once, reused
//! after:
//!
//! - **shapes** (`data/shapes*`): the structured classes of `cae_tools::shapes` (shape, layout
//!   and texture at random colours, scales, positions and rotations): colour statistics say
//!   nothing about the class, so random features fail on it and a learned representation must see
//!   shapes. The no-argument `trainer run` and `trainer eval knn|linear` use it.
//! - **photos** (`data/builtin*`): the ImageNet-like photo-like set (per-class palettes and wave
//!   orientations, ~500 px JPEGs, realistic decode costs): `trainer bench` uses it.

use std::path::{Path, PathBuf};

use cae_pipeline::manifest::MANIFEST_FILE;
use cae_sharder::BuildOptions;
use cae_tools::fixtures::{FixtureSpec, generate, generate_structured};

use crate::CaeError;

/// Classes x images per class of the built-in shapes set (all ten `ShapeKind`s).
pub const CLASSES: usize = 10;
pub const PER_CLASS: usize = 100;
/// Images per class of its validation set (another seed: other images of the same classes), the
/// queries of `trainer eval knn|linear` on built-in data.
pub const VAL_PER_CLASS: usize = 30;
/// Largest image side of the shapes set (the micro preset crops to 64 px: larger images would
/// only cost decode time on the CPU).
pub const MAX_SIDE: u32 = 160;

/// The photo-like set of `trainer bench`: classes, images per class, validation images per
/// class and largest side (~500 px images, as ImageNet's decode costs).
pub const PHOTO_CLASSES: usize = 10;
pub const PHOTO_PER_CLASS: usize = 40;
pub const PHOTO_VAL_PER_CLASS: usize = 10;
pub const PHOTO_MAX_SIDE: u32 = 640;

/// Which built-in set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinSet {
    /// Structured classes (shapes, layouts, textures at random colours).
    Shapes,
    /// Photo-like classes (palettes, waves).
    Photos,
}

/// Paths of a built-in set under a data root (`data/` by default).
#[derive(Clone, Debug)]
pub struct BuiltinData {
    pub set: BuiltinSet,
    /// The generated JPEG folders (`train/<wnid>/...`): `data/shapes` or `data/builtin`.
    pub images: PathBuf,
    /// WebDataset shards with `manifest.json`: `data/shapes-shards` or `data/builtin-shards`.
    pub shards: PathBuf,
    /// The validation images (same classes, another seed, no odd files): `data/shapes-val` or
    /// `data/builtin-val`.
    pub val_images: PathBuf,
    /// `data/shapes-val-shards` or `data/builtin-val-shards`.
    pub val_shards: PathBuf,
}

impl BuiltinData {
    /// The shapes set (the default of `trainer run` and `trainer eval`).
    pub fn under(root: &Path) -> Self {
        Self::named(BuiltinSet::Shapes, root, "shapes")
    }

    /// The photo-like set (`trainer bench`).
    pub fn photos_under(root: &Path) -> Self {
        Self::named(BuiltinSet::Photos, root, "builtin")
    }

    fn named(set: BuiltinSet, root: &Path, name: &str) -> Self {
        Self {
            set,
            images: root.join(name),
            shards: root.join(format!("{name}-shards")),
            val_images: root.join(format!("{name}-val")),
            val_shards: root.join(format!("{name}-val-shards")),
        }
    }

    /// The generator's spec of the training (`val` false) or validation set.
    pub fn spec(&self, val: bool) -> FixtureSpec {
        let (classes, per_class, val_per_class, max_side) = match self.set {
            BuiltinSet::Shapes => (CLASSES, PER_CLASS, VAL_PER_CLASS, MAX_SIDE),
            BuiltinSet::Photos => (PHOTO_CLASSES, PHOTO_PER_CLASS, PHOTO_VAL_PER_CLASS, PHOTO_MAX_SIDE),
        };
        if val {
            FixtureSpec { classes, per_class: val_per_class, seed: 1, odd_files: false, max_side }
        } else {
            FixtureSpec { classes, per_class, seed: 0, odd_files: true, max_side }
        }
    }
}

/// Generates (unless `fixtures.tsv` is there) and shards (unless `manifest.json` is there) the
/// training split of a built-in set; `say` gets one line per action. Returns the shard directory.
pub fn ensure(data: &BuiltinData, say: &mut dyn FnMut(String)) -> Result<PathBuf, CaeError> {
    ensure_set(data.set, &data.images, &data.shards, &data.spec(false), say)
}

/// The validation split (generated and sharded like [`ensure`]); returns its shard dir.
pub fn ensure_val(data: &BuiltinData, say: &mut dyn FnMut(String)) -> Result<PathBuf, CaeError> {
    ensure_set(data.set, &data.val_images, &data.val_shards, &data.spec(true), say)
}

fn ensure_set(
    set: BuiltinSet,
    images: &Path,
    shards: &Path,
    spec: &FixtureSpec,
    say: &mut dyn FnMut(String),
) -> Result<PathBuf, CaeError> {
    let what = match set {
        BuiltinSet::Shapes => "built-in shapes set",
        BuiltinSet::Photos => "built-in photo-like set",
    };
    if images.join("fixtures.tsv").is_file() {
        say(format!("{what}: reusing {}", images.display()));
    } else {
        say(format!("{what}: generating {} classes x {} images in {}", spec.classes, spec.per_class, images.display()));
        let made = match set {
            BuiltinSet::Shapes => generate_structured(images, spec),
            BuiltinSet::Photos => generate(images, spec),
        };
        made.map_err(|e| CaeError::Data(format!("generating the {what}: {e}")))?;
    }
    if shards.join(MANIFEST_FILE).is_file() {
        say(format!("shards: reusing {}", shards.display()));
    } else {
        say(format!("shards: writing {}", shards.display()));
        let mut o = BuildOptions::new(images.join("train"), shards);
        o.shard_max_samples = 100;
        o.force = true;
        let r = cae_sharder::build(&o).map_err(|e| CaeError::Data(format!("sharding the {what}: {e}")))?;
        say(format!("shards: {} samples in {} shards ({} odd files rejected)", r.samples, r.shards, r.rejected));
    }
    Ok(shards.to_path_buf())
}
