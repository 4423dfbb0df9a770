//! Where shards come from: local paths, `http(s)://` URLs, brace patterns
//! (`train-{000000..001281}.tar`, `{a,b}`), and directories holding a `manifest.json` (which also
//! gives each shard's sample count, so the epoch length is known up front, and the class list),
//! local or remote (`http://host/shards/manifest.json`, or the URL of the directory ending in
//! `/`). Several sources can be joined with `::` (webdataset's convention); a `::` inside an IPv6
//! literal (`http://[::1]:8080/x.tar`) does not split.
//!
//! A shard's location is a [`ShardUrl`]: the raw path or URL, used only to open the shard, and
//! the form shown in logs, errors and files (credentials and signatures as `***`), made once when
//! the spec is made. Nothing formats the raw form: `Display` and `Debug` show the redacted one.

use std::path::Path;

use crate::http::{HttpConfig, HttpFetcher};
use crate::manifest::{MANIFEST_FILE, Manifest};

mod hint;

/// Largest remote manifest read (ImageNet's 1282 shards take ~200 KB).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// A shard's path or URL: the raw text (opened, never shown) and its shown form.
#[derive(Clone, PartialEq, Eq)]
pub struct ShardUrl {
    raw: String,
    shown: String,
}

impl ShardUrl {
    pub fn new(raw: impl Into<String>) -> Self {
        let raw = raw.into();
        let shown = crate::redact::url(&raw);
        Self { raw, shown }
    }
    /// The path or URL itself, credentials included: only for opening the shard.
    pub fn raw(&self) -> &str {
        &self.raw
    }
    /// The form for logs, errors and files (secrets as `***`).
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl From<String> for ShardUrl {
    fn from(raw: String) -> Self {
        Self::new(raw)
    }
}

impl From<&str> for ShardUrl {
    fn from(raw: &str) -> Self {
        Self::new(raw)
    }
}

impl std::fmt::Display for ShardUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for ShardUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.shown, f)
    }
}

impl PartialEq<str> for ShardUrl {
    fn eq(&self, other: &str) -> bool {
        self.raw == other
    }
}

impl PartialEq<String> for ShardUrl {
    fn eq(&self, other: &String) -> bool {
        self.raw == *other
    }
}

/// One shard to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// Local path or URL.
    pub url: ShardUrl,
    /// Samples in the shard, when a manifest says so.
    pub samples: Option<u64>,
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

impl ShardSpec {
    pub fn new(url: impl Into<ShardUrl>, samples: Option<u64>) -> Self {
        Self { url: url.into(), samples }
    }
    pub fn is_http(&self) -> bool {
        is_url(self.url.raw())
    }
    /// Short name for logs (the file name, redacted).
    pub fn name(&self) -> &str {
        let shown = self.url.shown();
        shown.rsplit('/').next().unwrap_or(shown)
    }
}

/// The shards of a source and, when every part of it is a manifest, their class list (the index
/// in it is the `.cls` value).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSet {
    pub shards: Vec<ShardSpec>,
    /// `None` when a part has no manifest (plain paths, URLs or patterns).
    pub classes: Option<Vec<String>>,
}

/// Why a shard source could not be expanded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad brace pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    /// A local directory without `manifest.json`; the hint says what it looks like instead.
    #[error("{dir} is not a shard directory (it has no {MANIFEST_FILE}): {hint}")]
    NotShards { dir: String, hint: String },
    /// A glob pattern: the loader does not expand `*`, `?` or `[...]`.
    #[error(
        "{pattern}: glob patterns (*, ?, [...]) are not expanded; name the shards with a brace pattern such as \
         train-{{000000..000099}}.tar, a shard directory holding {MANIFEST_FILE}, or paths joined with ::"
    )]
    Glob { pattern: String },
    /// Two manifests of one source list different classes: their labels mean different things.
    #[error("{0}")]
    Classes(String),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    /// A remote manifest could not be fetched (after the HTTP retries).
    #[error("fetching manifest {url}: {message}")]
    Remote { url: String, message: String },
    #[error("no shards in {0:?}")]
    Empty(String),
}

/// Expands a source string into shards; remote manifests are fetched with the default
/// [`HttpConfig`]. Call it outside any tokio runtime (it may start one).
pub fn expand(source: &str) -> Result<Vec<ShardSpec>, SourceError> {
    expand_with(source, &HttpConfig::default())
}

/// [`expand`], fetching remote manifests with `http`'s retries and timeouts.
pub fn expand_with(source: &str, http: &HttpConfig) -> Result<Vec<ShardSpec>, SourceError> {
    expand_set(source, http).map(|set| set.shards)
}

/// [`expand_with`], with the class list of the source's manifests.
pub fn expand_set(source: &str, http: &HttpConfig) -> Result<ShardSet, SourceError> {
    let mut out = Vec::new();
    let mut fetcher: Option<HttpFetcher> = None;
    // The classes of the manifests so far, with the first manifest's name; `None` once a part
    // without a manifest is seen.
    let mut classes: Option<(Vec<String>, String)> = None;
    let mut all_manifests = true;
    for part in split_sources(source) {
        let path = Path::new(part);
        let manifest = if is_url(part) {
            match remote_manifest_url(part) {
                Some(url) => {
                    if fetcher.is_none() {
                        fetcher = Some(HttpFetcher::new(http).map_err(|e| remote_error(&url, e))?);
                    }
                    let f = fetcher.as_ref().ok_or_else(|| remote_error(&url, "no client"))?;
                    let (specs, m) = remote_manifest(&url, f)?;
                    out.extend(specs);
                    Some((m, crate::redact::url(url.as_str())))
                }
                None => {
                    hint::check_url_part(part)?;
                    out.extend(expand_braces(part)?.into_iter().map(|url| ShardSpec::new(url, None)));
                    None
                }
            }
        } else if path.is_dir() || part.ends_with(MANIFEST_FILE) {
            hint::check_shard_dir(path)?;
            let dir =
                if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let m = Manifest::load(path)?;
            out.extend(
                m.shards
                    .iter()
                    .map(|s| ShardSpec::new(dir.join(&s.name).to_string_lossy().into_owned(), Some(s.digest.samples))),
            );
            Some((m, crate::redact::url(part)))
        } else {
            hint::check_local_part(part)?;
            out.extend(expand_braces(part)?.into_iter().map(|url| ShardSpec::new(url, None)));
            None
        };
        match manifest {
            None => all_manifests = false,
            Some((m, name)) => match &classes {
                None => classes = Some((m.classes, name)),
                Some((first, first_name)) => {
                    if let Some(d) = crate::manifest::first_class_difference(first, &m.classes) {
                        return Err(SourceError::Classes(format!(
                            "the manifests of one shard source list different classes: {}",
                            d.describe(first_name, &name)
                        )));
                    }
                }
            },
        }
    }
    if out.is_empty() {
        return Err(SourceError::Empty(redacted(source)));
    }
    let classes = classes.filter(|_| all_manifests).map(|(c, _)| c);
    Ok(ShardSet { shards: out, classes })
}

/// A shard source (paths, patterns and URLs joined by `::`) with every URL redacted: the form to
/// print or store.
pub fn redacted(source: &str) -> String {
    // Split as the source is read: `::` inside an IPv6 literal (`[::1]`) is not a separator.
    split_sources(source).into_iter().map(crate::redact::url).collect::<Vec<_>>().join("::")
}

/// Splits at `::` outside square brackets (an IPv6 literal's `::` stays).
pub fn split_sources(source: &str) -> Vec<&str> {
    let b = source.as_bytes();
    let (mut out, mut depth, mut start, mut i) = (Vec::new(), 0u32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b':' if depth == 0 && b.get(i + 1) == Some(&b':') => {
                out.push(&source[start..i]);
                i += 2;
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&source[start..]);
    out.retain(|p| !p.is_empty());
    out
}

/// The manifest URL a URL source names: one whose path ends in `/manifest.json`, or a directory
/// URL (path ending in `/`, no brace pattern) with `manifest.json` added.
fn remote_manifest_url(part: &str) -> Option<url::Url> {
    if part.contains('{') {
        return None;
    }
    let mut u = url::Url::parse(part).ok()?;
    let path = u.path().to_string();
    if path.ends_with(&format!("/{MANIFEST_FILE}")) {
        Some(u)
    } else if path.ends_with('/') {
        u.set_path(&format!("{path}{MANIFEST_FILE}"));
        Some(u)
    } else {
        None
    }
}

fn remote_error(url: &url::Url, e: impl std::fmt::Display) -> SourceError {
    SourceError::Remote { url: crate::redact::url(url.as_str()), message: crate::redact::text(&e.to_string()) }
}

/// Fetches a remote manifest: its shards sit next to it (same scheme, host and directory; the
/// manifest URL's query string, if any, is kept on each).
fn remote_manifest(url: &url::Url, fetcher: &HttpFetcher) -> Result<(Vec<ShardSpec>, Manifest), SourceError> {
    let body = fetcher.get(url.as_str(), MAX_MANIFEST_BYTES).map_err(|e| remote_error(url, e))?;
    let text = String::from_utf8(body).map_err(|e| remote_error(url, e))?;
    let m = Manifest::parse(&text, &crate::redact::url(url.as_str()))?;
    let mut out = Vec::with_capacity(m.shards.len());
    for s in &m.shards {
        let mut u = url.clone();
        u.set_fragment(None);
        u.path_segments_mut().map_err(|()| remote_error(url, "URL cannot have a path"))?.pop().push(&s.name);
        out.push(ShardSpec::new(String::from(u), Some(s.digest.samples)));
    }
    Ok((out, m))
}

/// Expands `{000..012}` numeric ranges (zero padding kept) and `{a,b,c}` alternatives, several
/// groups allowed, left to right.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, SourceError> {
    let err = |message: &str| SourceError::Pattern { pattern: crate::redact::url(pattern), message: message.into() };
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

    #[test]
    fn ipv6_literals_are_not_split_at_their_colons() {
        assert_eq!(split_sources("a.tar::b.tar"), ["a.tar", "b.tar"]);
        assert_eq!(split_sources("::a.tar::::b.tar::"), ["a.tar", "b.tar"]);
        let urls = expand("http://[::1]:8080/s-{0..1}.tar::http://[fe80::1%25lo]/x.tar::local.tar").unwrap();
        let urls: Vec<&str> = urls.iter().map(|s| s.url.raw()).collect();
        assert_eq!(
            urls,
            ["http://[::1]:8080/s-0.tar", "http://[::1]:8080/s-1.tar", "http://[fe80::1%25lo]/x.tar", "local.tar"]
        );
    }

    #[test]
    fn sources_are_redacted_part_by_part() {
        let r = redacted("/a.tar::https://u:p@h/b.tar");
        assert!(r.starts_with("/a.tar::") && !r.contains("u:p"), "{r}");
        // Regression: an IPv6 literal's `::` split the URL, and its pieces were left as they were.
        let r = redacted("/a.tar::http://u:s3cr3t@[::1]:8080/b.tar");
        assert!(!r.contains("s3cr3t") && r.contains("[::1]:8080/b.tar") && r.starts_with("/a.tar::"), "{r}");
        assert_eq!(
            redacted("/data/train-{000..009}.tar::http://h/x.tar"),
            "/data/train-{000..009}.tar::http://h/x.tar"
        );
    }

    /// Regression: `ShardSpec::name()` kept a presigned URL's query string, signature included,
    /// and every bad-sample warning of that shard logged it.
    #[test]
    fn a_specs_shown_forms_never_hold_its_secrets() {
        let raw = "http://127.0.0.1:9/d/x.tar?X-Amz-Credential=AKIA&X-Amz-Signature=SECRET&part=1";
        let spec = expand(raw).unwrap().remove(0);
        assert_eq!(spec.url.raw(), raw, "the raw URL is what is opened");
        for shown in [spec.name().to_string(), spec.url.to_string(), format!("{spec:?}"), spec.url.shown().into()] {
            assert!(!shown.contains("SECRET") && !shown.contains("AKIA"), "{shown}");
        }
        assert_eq!(spec.name(), "x.tar?X-Amz-Credential=***&X-Amz-Signature=***&part=1");
        assert_eq!(ShardSpec::new("/d/train-000001.tar", None).name(), "train-000001.tar");
    }

    #[test]
    fn remote_manifest_urls_are_recognised() {
        let m = |s: &str| remote_manifest_url(s).map(String::from);
        assert_eq!(m("http://h/d/manifest.json").as_deref(), Some("http://h/d/manifest.json"));
        assert_eq!(m("https://[::1]:9/d/").as_deref(), Some("https://[::1]:9/d/manifest.json"));
        assert_eq!(m("http://h/d/manifest.json?sig=1").as_deref(), Some("http://h/d/manifest.json?sig=1"));
        assert_eq!(m("http://h/d/x.tar"), None);
        assert_eq!(m("http://h/{a,b}/"), None);
    }
}
