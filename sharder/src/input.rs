//! Listing the input: class folders (torchvision ImageFolder order) or a `path<TAB>class` list.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use cae_pipeline::wds::sanitize_key;

use crate::error::ShardError;

/// One input file with its class and sample key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Path relative to the input folder, with `/` separators.
    pub rel_path: String,
    /// Absolute (or input-relative joined) path to read.
    pub path: PathBuf,
    /// Class name; `None` for a file outside any class folder (rejected later).
    pub class: Option<String>,
    /// Index of the class in the sorted class list.
    pub class_index: Option<usize>,
    /// Stable, unique, dot-free sample key (`n01440764_10026`).
    pub key: String,
    /// Why this entry cannot be read (a symlink loop), found while listing: a rejection.
    pub problem: Option<String>,
}

/// The listed input: files in sorted order and the class list.
#[derive(Debug, Clone)]
pub struct InputListing {
    pub files: Vec<InputFile>,
    pub classes: Vec<String>,
}

/// Walks `root/<class>/**` (regular files, sorted by path; every file counts, images or not).
/// Files directly in `root` belong to no class and are kept so they can be reported.
pub fn walk_class_folders(root: &Path) -> Result<InputListing, ShardError> {
    let meta = std::fs::metadata(root).map_err(|e| ShardError::input(root, e))?;
    if !meta.is_dir() {
        return Err(ShardError::Input { path: root.to_path_buf(), message: "not a directory".into() });
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut problems: HashMap<String, String> = HashMap::new();
    for entry in walkdir::WalkDir::new(root).follow_links(true).min_depth(1).sort_by_file_name() {
        let entry = match entry {
            Ok(entry) => entry,
            // A symlink that points back to one of its own ancestors: a rejected entry (listed
            // in rejected.tsv), not the end of the build.
            Err(e) if e.loop_ancestor().is_some() => {
                let (Some(path), Some(ancestor)) = (e.path(), e.loop_ancestor()) else { continue };
                let (rel_str, class) = relative(root, path);
                problems.insert(rel_str.clone(), format!("symlink loop: points back to {}", ancestor.display()));
                entries.push((rel_str, path.to_path_buf(), class));
                continue;
            }
            Err(e) => {
                return Err(ShardError::Input {
                    path: e.path().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf()),
                    message: e.to_string(),
                });
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let (rel_str, class) = relative(root, entry.path());
        entries.push((rel_str, entry.path().to_path_buf(), class));
    }
    let classes: BTreeSet<String> = entries.iter().filter_map(|(_, _, c)| c.clone()).collect();
    let mut listing = assemble(entries, classes.into_iter().collect());
    for f in &mut listing.files {
        f.problem = problems.remove(&f.rel_path);
    }
    Ok(listing)
}

/// A listed path, relative with `/` separators, and its class (first folder, if nested).
type Entry = (String, PathBuf, Option<String>);

fn relative(root: &Path, path: &Path) -> (String, Option<String>) {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel_str = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
    let class = if rel.components().count() >= 2 {
        rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned())
    } else {
        None
    };
    (rel_str, class)
}

/// Reads a `relative/path<TAB>class` list (ImageNet val style). Paths are relative to `root`.
/// `classes` fixes the class order (e.g. the train set's `classes.txt`); otherwise the sorted
/// distinct class names of the list are used.
pub fn read_list(root: &Path, list: &Path, classes: Option<Vec<String>>) -> Result<InputListing, ShardError> {
    let text = std::fs::read_to_string(list).map_err(|e| ShardError::input(list, e))?;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((rel, class)) = line.split_once('\t') else {
            return Err(ShardError::Input {
                path: list.to_path_buf(),
                message: format!("line {}: expected `path<TAB>class`, got {line:?}", n + 1),
            });
        };
        entries.push((rel.to_string(), root.join(rel), Some(class.trim().to_string())));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let names = match classes {
        Some(c) => {
            let known: BTreeSet<&String> = c.iter().collect();
            if let Some((rel, _, Some(cl))) =
                entries.iter().find(|(_, _, cl)| cl.as_ref().is_some_and(|x| !known.contains(x)))
            {
                return Err(ShardError::Input {
                    path: list.to_path_buf(),
                    message: format!("{rel}: class {cl:?} is not in the given classes file"),
                });
            }
            c
        }
        None => entries.iter().filter_map(|(_, _, c)| c.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
    };
    Ok(assemble(entries, names))
}

fn assemble(entries: Vec<(String, PathBuf, Option<String>)>, classes: Vec<String>) -> InputListing {
    let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    // Every key given so far, and per base key the next `_dupN` suffix to try.
    let mut used: HashSet<String> = HashSet::new();
    let mut next_dup: HashMap<String, usize> = HashMap::new();
    let mut files = Vec::with_capacity(entries.len());
    for (rel_path, path, class) in entries {
        let file_name = rel_path.rsplit('/').next().unwrap_or(&rel_path);
        let stem = file_name.rsplit_once('.').map_or(file_name, |(s, _)| s);
        let mut key = sanitize_key(if stem.is_empty() { file_name } else { stem });
        if key.is_empty() {
            key = "_".into();
        }
        // Disambiguate collisions deterministically (input order is sorted). A generated
        // `x_dup1` may itself be the stem of another file (`a/x_dup1.JPEG`): try suffixes until
        // the key is one no earlier file has, whichever way it got it.
        if used.contains(&key) {
            let n = next_dup.entry(key.clone()).or_insert(1);
            let base = key;
            loop {
                let candidate = format!("{base}_dup{n}");
                *n += 1;
                if !used.contains(&candidate) {
                    key = candidate;
                    break;
                }
            }
        }
        used.insert(key.clone());
        let class_index = class.as_deref().and_then(|c| index.get(c).copied());
        files.push(InputFile { rel_path, path, class, class_index, key, problem: None });
    }
    InputListing { files, classes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_sorted_keys_unique_and_stray_files_kept() {
        let d = tempfile::tempdir().unwrap();
        for (rel, body) in [("b/x.JPEG", "1"), ("a/x.JPEG", "2"), ("a/y.z.JPEG", "3"), ("README", "4")] {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let l = walk_class_folders(d.path()).unwrap();
        assert_eq!(l.classes, vec!["a", "b"]);
        let got: Vec<(&str, &str, Option<usize>)> =
            l.files.iter().map(|f| (f.rel_path.as_str(), f.key.as_str(), f.class_index)).collect();
        assert_eq!(
            got,
            vec![
                ("README", "README", None),
                ("a/x.JPEG", "x", Some(0)),
                ("a/y.z.JPEG", "y_z", Some(0)),
                ("b/x.JPEG", "x_dup1", Some(1))
            ]
        );
    }

    /// Regression: `a/x.JPEG`, `a/x_dup1.JPEG`, `b/x.JPEG` gave two samples keyed `x_dup1`.
    #[test]
    fn generated_dup_keys_never_collide_with_real_stems() {
        let d = tempfile::tempdir().unwrap();
        let rels = ["a/x.JPEG", "a/x_dup1.JPEG", "b/x.JPEG", "b/x_dup1.JPEG", "c/x.JPEG", "c/x.png", "c/x_dup2.JPEG"];
        for rel in rels {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "1").unwrap();
        }
        let l = walk_class_folders(d.path()).unwrap();
        assert_eq!(l.files.len(), rels.len());
        let keys: HashSet<&str> = l.files.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys.len(), rels.len(), "keys collide: {:?}", l.files.iter().map(|f| &f.key).collect::<Vec<_>>());
        // The first three of the example: three distinct keys, the first two unchanged.
        let key_of = |rel: &str| l.files.iter().find(|f| f.rel_path == rel).map(|f| f.key.clone()).unwrap();
        assert_eq!(key_of("a/x.JPEG"), "x");
        assert_eq!(key_of("a/x_dup1.JPEG"), "x_dup1");
        assert_ne!(key_of("b/x.JPEG"), "x_dup1");
        // Same input, same keys (the resume digest covers them).
        let again = walk_class_folders(d.path()).unwrap();
        assert_eq!(again.files, l.files);
    }

    #[test]
    fn list_file_with_fixed_classes() {
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("val.tsv");
        std::fs::write(&list, "v/2.JPEG\tn2\nv/1.JPEG\tn1\n").unwrap();
        let l = read_list(d.path(), &list, Some(vec!["n0".into(), "n1".into(), "n2".into()])).unwrap();
        assert_eq!(l.files[0].rel_path, "v/1.JPEG");
        assert_eq!(l.files[0].class_index, Some(1));
        assert_eq!(l.files[1].class_index, Some(2));
        assert!(read_list(d.path(), &list, Some(vec!["n1".into()])).is_err());
        std::fs::write(&list, "no tab here\n").unwrap();
        assert!(read_list(d.path(), &list, None).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn missing_input_is_a_clear_error() {
        let e = walk_class_folders(Path::new("/nonexistent/input")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/input"), "{e}");
    }
}
