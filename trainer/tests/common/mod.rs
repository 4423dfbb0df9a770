//! Shared by the trainer's integration tests.

use std::path::{Path, PathBuf};

/// A small sharded sample set under `dir` (2 classes x 12 images, 12 per shard, a manifest).
pub fn shards(dir: &Path) -> PathBuf {
    let spec = cae_tools::fixtures::FixtureSpec { classes: 2, per_class: 12, seed: 1, odd_files: false, max_side: 120 };
    let fx = cae_tools::fixtures::generate(&dir.join("img"), &spec).unwrap();
    let out = dir.join("shards");
    let mut o = cae_sharder::BuildOptions::new(&fx.train_dir, &out);
    o.shard_max_samples = 12;
    o.workers = 1;
    cae_sharder::build(&o).unwrap();
    out
}
