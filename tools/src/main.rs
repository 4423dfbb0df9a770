//! `make-fixtures`: writes the built-in ImageNet-like sample set (see `cae_tools::fixtures`).

use std::path::PathBuf;

use anyhow::Context;
use cae_tools::fixtures::{FixtureSpec, generate, generate_structured};
use cae_tools::scenes::{SceneSpec, generate_scenes};
use clap::Parser;

/// Write a deterministic ImageNet-style folder `OUT/train/<wnid>/<wnid>_<n>.JPEG` of photo-like
/// images plus the odd files real ImageNet has (grayscale, CMYK, progressive, PNG named .JPEG,
/// truncated, empty, non-image, EXIF-rotated, restart markers).
#[derive(Parser, Debug)]
#[command(name = "make-fixtures", version)]
struct Args {
    /// Output folder (train/ and fixtures.tsv are written inside).
    #[arg(long)]
    out: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Ordinary images per class (default 40; with --scenes: train images per class, default 120).
    #[arg(long)]
    per_class: Option<usize>,
    /// Seed for every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave out the odd files.
    #[arg(long)]
    no_odd: bool,
    /// The structured classes (shapes, layouts, textures at random colours; at most 10 classes)
    /// instead of the photo-like ones.
    #[arg(long)]
    structured: bool,
    /// Largest image side (not with --scenes).
    #[arg(long, default_value_t = 2000)]
    max_side: u32,
    /// The object-centric scenes set instead (1-3 small copies of the class's shape per image,
    /// with clutter; at most 10 classes): OUT/train/<class>/*.jpg, OUT/val/<class>/*.jpg and
    /// OUT/scenes.tsv.
    #[arg(long, conflicts_with = "structured")]
    scenes: bool,
    /// With --scenes: val images per class.
    #[arg(long, default_value_t = 30, requires = "scenes")]
    val_per_class: usize,
    /// With --scenes: nominal image side (each side within ±8 % of it).
    #[arg(long, default_value_t = 200, requires = "scenes")]
    side: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenes {
        let spec = SceneSpec {
            classes: args.classes,
            train_per_class: args.per_class.unwrap_or(120),
            val_per_class: args.val_per_class,
            seed: args.seed,
            side: args.side,
            ..SceneSpec::default()
        };
        let s = generate_scenes(&args.out, &spec)
            .with_context(|| format!("generating scenes in {}", args.out.display()))?;
        println!("wrote {} images under {} and {}", s.files.len(), s.train_dir.display(), s.val_dir.display());
        return Ok(());
    }
    let spec = FixtureSpec {
        classes: args.classes,
        per_class: args.per_class.unwrap_or(40),
        seed: args.seed,
        odd_files: !args.no_odd,
        max_side: args.max_side,
    };
    let made = if args.structured { generate_structured(&args.out, &spec) } else { generate(&args.out, &spec) };
    let fx = made.with_context(|| format!("generating fixtures in {}", args.out.display()))?;
    println!("wrote {} files under {}", fx.files.len(), fx.train_dir.display());
    Ok(())
}
