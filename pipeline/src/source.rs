//! Where shards come from: local paths, `http(s)://` URLs, brace patterns
//! (`train-{000000..001281}.tar`, `{a,b}`), and directories holding a `manifest.json` (which also
//! gives each shard's sample count, so the epoch length is known up front). Several sources can
//! be joined with `::` (webdataset's convention).

use std::path::Path;

use crate::manifest::{MANIFEST_FILE, Manifest};

/// One shard to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// Local path or URL.
    pub url: String,
    /// Samples in the shard, when a manifest says so.
    pub samples: Option<u64>,
}

impl ShardSpec {
    pub fn is_http(&self) -> bool {
        self.url.starts_with("http://") || self.url.starts_with("https://")
    }
    /// Short name for logs (the file name).
    pub fn name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or(&self.url)
    }
}

/// Why a shard source could not be expanded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad brace pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("no shards in {0:?}")]
    Empty(String),
}

/// Expands a source string into shards.
pub fn expand(source: &str) -> Result<Vec<ShardSpec>, SourceError> {
    let mut out = Vec::new();
    for part in source.split("::").filter(|p| !p.is_empty()) {
        let path = Path::new(part);
        let is_url = part.starts_with("http://") || part.starts_with("https://");
        if !is_url && (path.is_dir() || part.ends_with(MANIFEST_FILE)) {
            let dir =
                if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let m = Manifest::load(path)?;
            out.extend(m.shards.iter().map(|s| ShardSpec {
                url: dir.join(&s.name).to_string_lossy().into_owned(),
                samples: Some(s.digest.samples),
            }));
        } else if is_url && part.ends_with(MANIFEST_FILE) {
            return Err(SourceError::Pattern {
                pattern: part.into(),
                message: "remote manifests are not supported yet; list the shard URLs with a brace pattern".into(),
            });
        } else {
            out.extend(expand_braces(part)?.into_iter().map(|url| ShardSpec { url, samples: None }));
        }
    }
    if out.is_empty() {
        return Err(SourceError::Empty(source.into()));
    }
    Ok(out)
}

/// Expands `{000..012}` numeric ranges (zero padding kept) and `{a,b,c}` alternatives, several
/// groups allowed, left to right.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, SourceError> {
    let err = |message: &str| SourceError::Pattern { pattern: pattern.into(), message: message.into() };
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|c| c + open).ok_or_else(|| err("unclosed '{'"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let options: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| err("range start is not a number"))?,
            b.parse().map_err(|_| err("range end is not a number"))?,
        );
        if hi < lo {
            return Err(err("range end is before its start"));
        }
        if hi - lo > 10_000_000 {
            return Err(err("range too large"));
        }
        let width = a.len();
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(String::from).collect()
    };
    let tails = expand_braces(tail)?;
    let mut out = Vec::with_capacity(options.len() * tails.len());
    for o in &options {
        for t in &tails {
            out.push(format!("{head}{o}{t}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_with_padding_and_lists() {
        assert_eq!(expand_braces("s-{000..002}.tar").unwrap(), ["s-000.tar", "s-001.tar", "s-002.tar"]);
        assert_eq!(
            expand_braces("{a,b}/x-{8..10}.tar").unwrap(),
            ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("x-{3..1}.tar").is_err());
        assert!(expand_braces("x-{1..2.tar").is_err());
        let urls = expand("http://h/s-{0..1}.tar::local.tar").unwrap();
        assert_eq!(urls.len(), 3);
        assert!(urls[0].is_http() && !urls[2].is_http());
        assert_eq!(urls[1].name(), "s-1.tar");
    }
}
