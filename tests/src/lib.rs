//! Shared helpers for the end-to-end tests in `tests/tests/`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use cae_pipeline::wds::SampleReader;

/// Every file of a directory (non-recursive) as name -> bytes, hidden files included.
pub fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            out.insert(e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"));
        }
    }
    out
}

/// All samples of all `.tar` files of a directory, in shard-name order, as (shard, sample).
pub fn all_samples(dir: &Path) -> Vec<(String, cae_pipeline::wds::ShardSample)> {
    let mut names: Vec<String> = dir_bytes(dir).into_keys().filter(|n| n.ends_with(".tar")).collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        for s in SampleReader::new(File::open(dir.join(&n)).expect("open shard")) {
            out.push((n.clone(), s.expect("valid sample")));
        }
    }
    out
}
