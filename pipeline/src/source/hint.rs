//! What a `--shards` value that names no shards looks like instead, said in the error: an image
//! folder (shard it first with `sharder build`), a folder of tar files without a manifest (name
//! them with a brace pattern), or a glob pattern (not expanded: use a brace pattern).

use std::path::Path;

use super::SourceError;
use crate::manifest::MANIFEST_FILE;

/// Directory entries looked at (a folder of 1.28M images is not listed whole).
const MAX_ENTRIES: usize = 2000;
/// Class folders looked into for images.
const MAX_SUBDIRS: usize = 8;

/// A local part: a glob pattern naming nothing is refused with the brace-pattern hint.
pub(super) fn check_local_part(part: &str) -> Result<(), SourceError> {
    if part.contains(['*', '?']) && !Path::new(part).exists() {
        return Err(SourceError::Glob { pattern: crate::redact::url(part) });
    }
    Ok(())
}

/// A URL part: `*` in a URL is a glob (`?` starts its query).
pub(super) fn check_url_part(part: &str) -> Result<(), SourceError> {
    let path = url::Url::parse(part).map(|u| u.path().to_string()).unwrap_or_default();
    if path.contains('*') {
        return Err(SourceError::Glob { pattern: crate::redact::url(part) });
    }
    Ok(())
}

/// A local directory must hold a manifest; without one, the error says what it holds.
pub(super) fn check_shard_dir(path: &Path) -> Result<(), SourceError> {
    if !path.is_dir() || path.join(MANIFEST_FILE).is_file() {
        return Ok(());
    }
    let dir = path.display().to_string();
    let hint = match Contents::of(path) {
        c if !c.tars.is_empty() => {
            format!("it holds .tar files; name them with a brace pattern such as {}", brace_pattern(path, &c.tars))
        }
        c if c.images => format!(
            "it looks like an image folder; shard it first with `sharder build --input {dir} --output <shard dir>` \
             and pass the shard directory"
        ),
        _ => format!(
            "pass a directory made by `sharder build` (holding {MANIFEST_FILE}), shard paths or a brace pattern"
        ),
    };
    Err(SourceError::NotShards { dir, hint })
}

#[derive(Default)]
struct Contents {
    /// `.tar` file names, sorted.
    tars: Vec<String>,
    /// Image files in the folder or in one of its first subfolders (class folders).
    images: bool,
}

impl Contents {
    fn of(dir: &Path) -> Contents {
        let mut c = Contents::default();
        let mut subdirs = Vec::new();
        for e in entries(dir) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if subdirs.len() < MAX_SUBDIRS {
                    subdirs.push(p);
                }
            } else if name.ends_with(".tar") {
                c.tars.push(name);
            } else if is_image(&name) {
                c.images = true;
            }
        }
        c.tars.sort();
        c.images =
            c.images || subdirs.iter().any(|d| entries(d).take(50).any(|e| is_image(&e.file_name().to_string_lossy())));
        c
    }
}

fn entries(dir: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().take(MAX_ENTRIES)
}

fn is_image(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    crate::wds::IMAGE_EXTS.contains(&ext.as_str())
}

/// `dir/train-{000000..000041}.tar` when the first and last names are `<prefix><digits>.tar`
/// with the same prefix and width; else `dir/{first,...}.tar` spelled with the first names.
fn brace_pattern(dir: &Path, tars: &[String]) -> String {
    fn split(n: &str) -> Option<(&str, &str)> {
        let stem = n.strip_suffix(".tar")?;
        let digits = stem.chars().rev().take_while(char::is_ascii_digit).count();
        (digits > 0).then(|| stem.split_at(stem.len() - digits))
    }
    let (first, last) = (&tars[0], &tars[tars.len() - 1]);
    let pattern = match (split(first), split(last)) {
        (Some((p, a)), Some((q, b))) if p == q && a.len() == b.len() => format!("{p}{{{a}..{b}}}.tar"),
        _ => {
            let stems: Vec<&str> = tars.iter().take(3).map(|n| n.trim_end_matches(".tar")).collect();
            format!("{{{}}}.tar", stems.join(","))
        }
    };
    dir.join(pattern).display().to_string()
}

#[cfg(test)]
mod tests {
    fn err(source: &str) -> String {
        super::super::expand(source).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn an_image_folder_hints_at_sharder_build() {
        let tmp = tempfile::tempdir().unwrap();
        let class = tmp.path().join("n01440764");
        std::fs::create_dir(&class).unwrap();
        std::fs::write(class.join("n01440764_10026.JPEG"), b"x").unwrap();
        let e = err(tmp.path().to_str().unwrap());
        assert!(e.contains("image folder") && e.contains("sharder build --input"), "{e}");
        assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    }

    #[test]
    fn a_folder_of_tars_without_manifest_hints_at_a_brace_pattern() {
        let tmp = tempfile::tempdir().unwrap();
        for i in [0, 1, 41] {
            std::fs::write(tmp.path().join(format!("train-{i:06}.tar")), b"").unwrap();
        }
        let e = err(tmp.path().to_str().unwrap());
        let want = tmp.path().join("train-{000000..000041}.tar").display().to_string();
        assert!(e.contains(&want), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(err(empty.path().to_str().unwrap()).contains("sharder build"), "an empty folder");
    }

    #[test]
    fn a_glob_hints_at_a_brace_pattern() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("train-000000.tar"), b"").unwrap();
        let glob = tmp.path().join("train-*.tar");
        let e = err(glob.to_str().unwrap());
        assert!(e.contains("glob") && e.contains("train-{000000..000099}.tar"), "{e}");
        assert!(err("http://h/shards/train-*.tar").contains("glob"));
        // A `?` in a URL is its query, not a glob; brace patterns are not globs.
        assert!(super::super::expand("http://h/x.tar?part=1").is_ok());
        assert!(super::super::expand(tmp.path().join("train-{000000..000001}.tar").to_str().unwrap()).is_ok());
    }
}
