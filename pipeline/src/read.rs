//! The front half every reader shares: shard list -> open (a file or an HTTP stream) -> tar
//! members (over `max_member_bytes` skipped while streaming) -> the sample policy -> (key, label,
//! image bytes and format) or a [`BadSample`].
//!
//! ```text
//!  ShardSpec --open_shard--> ShardSamples (member cap,         --check_sample--> Checked { label,
//!  (file/HTTP)               short-shard check) -> ShardSample     (labels policy,   image, format }
//!                            or a failed shard (ShardFailures)      image member)     or BadSample
//! ```
//!
//! The loader ([`crate::loader`]) puts its shuffle/resume order between the two halves and
//! makes two views; the eval reader ([`crate::eval`]) reads in shard order and centre-crops.
//! Both take one [`ReadConfig`], so a cap or a policy cannot drift between them.
//!
//! Sample policy: the image member is the first of [`IMAGE_EXTS`] the sample has, decoded by its
//! content ([`Format::sniff`]: ImageNet has a PNG stored as `.JPEG`, and Python-written shards
//! keep its `.jpg` name), by its extension only when the bytes say nothing. A sample without
//! `.cls` is label -1, or a bad sample of kind `missing_class` under [`LabelPolicy::Required`].
//! Failed shards (cannot open, broken tar, fewer samples than the manifest says) are counted per
//! distinct shard; more than `max_failed_shards` stops the reading ([`ShardFailures`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};

use serde::{Deserialize, Serialize};

use crate::bad_sample::BadSample;
use crate::decode::{self, DecodeError, Format, RgbImage};
use crate::http::{HttpConfig, HttpFetcher};
use crate::metrics as m;
use crate::source::ShardSpec;
use crate::wds::{CLASS_EXT, IMAGE_EXTS, SampleReader, ShardSample, WdsError, image_format};

/// Error kind of a sample over `max_pixels` or with a member over `max_member_bytes`.
pub const TOO_LARGE: &str = "too_large";

/// How shards are read and what a usable sample is: the loader's and the eval reader's common
/// settings (the trainer's `data.max_pixels`, `data.max_member_bytes`, `data.labels`,
/// `data.max_failed_shards`, `data.http`; [`crate::LoaderConfig::read_config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadConfig {
    /// Largest image accepted, in total pixels, checked from the header before anything is
    /// allocated; larger ones are bad samples of kind `too_large`.
    pub max_pixels: u64,
    /// Largest tar member read; larger ones are skipped while streaming (never held in memory)
    /// and their sample is a bad sample of kind `too_large`.
    pub max_member_bytes: u64,
    /// Whether every sample needs a `.cls` member.
    pub labels: LabelPolicy,
    /// Failed shards (distinct) tolerated; `None` = 0 when every shard is local, 1 % of the
    /// shard count when some are remote.
    pub max_failed_shards: Option<u64>,
    pub http: HttpConfig,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            max_pixels: decode::DEFAULT_MAX_PIXELS as u64,
            max_member_bytes: crate::wds::DEFAULT_MAX_MEMBER_BYTES,
            labels: LabelPolicy::Optional,
            max_failed_shards: None,
            http: HttpConfig::default(),
        }
    }
}

/// `data.labels`: what a sample without a `.cls` member is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelPolicy {
    /// A bad sample of kind `missing_class`.
    Required,
    /// A sample with label -1.
    #[default]
    Optional,
}

impl ReadConfig {
    /// Refuses caps of 0 (nothing could be read).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_pixels == 0 || self.max_member_bytes == 0 {
            return Err("max_pixels and max_member_bytes must be at least 1".into());
        }
        Ok(())
    }

    /// `max_pixels` as a `usize` (saturating).
    pub fn max_pixels(&self) -> usize {
        usize::try_from(self.max_pixels).unwrap_or(usize::MAX)
    }

    /// Failed shards tolerated when reading `shards` (see `max_failed_shards`).
    pub fn max_failed_for(&self, shards: &[ShardSpec]) -> u64 {
        let remote = shards.iter().any(ShardSpec::is_http);
        self.max_failed_shards.unwrap_or(if remote { shards.len() as u64 / 100 } else { 0 })
    }

    /// The HTTP client, when some shard is remote.
    pub fn fetcher(&self, shards: &[ShardSpec]) -> std::io::Result<Option<HttpFetcher>> {
        if shards.iter().any(ShardSpec::is_http) { HttpFetcher::new(&self.http).map(Some) } else { Ok(None) }
    }
}

/// The local shards of a list that do not exist (shown forms): an error at start, before any
/// reading (a mistyped brace range or a deleted shard is not a silent subset).
pub fn missing_shards(shards: &[ShardSpec]) -> Vec<String> {
    shards
        .iter()
        .filter(|s| !s.is_http() && !std::path::Path::new(s.url.raw()).is_file())
        .map(|s| s.url.shown().to_string())
        .collect()
}

/// An opened shard's bytes.
pub type ShardReader = Box<dyn Read + Send>;

/// Opens a shard for streaming: a buffered file, or an HTTP stream with retries.
pub fn open_shard(spec: &ShardSpec, http: Option<&HttpFetcher>) -> Result<ShardReader, String> {
    if spec.is_http() {
        let fetcher = http.ok_or("no HTTP client")?;
        Ok(Box::new(fetcher.open(spec.url.raw())))
    } else {
        let f = File::open(spec.url.raw()).map_err(|e| e.to_string())?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
    }
}

/// A sample as read: (the sample with only its image and `.cls` members, bytes of all its
/// members), or a broken one.
pub type ReadSample = Result<(ShardSample, u64), BrokenSample>;

/// A sample the tar layer could not give whole (a member over the cap, a duplicate extension, a
/// member without extension): a bad sample of `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenSample {
    pub kind: &'static str,
    /// The sample's key (a member name when it has no key), `?` when unknown.
    pub key: String,
    pub message: String,
}

impl BrokenSample {
    fn of(e: WdsError) -> Self {
        let kind = if matches!(e, WdsError::MemberTooLarge { .. }) { TOO_LARGE } else { "format" };
        let key = match &e {
            WdsError::MemberTooLarge { key, .. } | WdsError::DuplicateExtension { key, .. } => key.clone(),
            WdsError::NoExtension { name } => name.clone(),
            _ => "?".into(),
        };
        Self { kind, key, message: e.to_string() }
    }

    /// The bad sample it is, in `shard`.
    pub fn bad_sample(&self, shard: std::sync::Arc<str>) -> BadSample {
        BadSample::new(self.kind, shard, &self.key, self.message.clone())
    }
}

/// What reading a shard gives next.
pub enum ShardItem {
    Sample(ReadSample),
    /// The shard is broken (tar structure, or fewer samples than its manifest says): the reason.
    /// Nothing more comes from it.
    Failed(String),
}

/// The samples of one opened shard, with the member cap, checked against the manifest's count.
pub struct ShardSamples {
    samples: SampleReader<ShardReader>,
    expected: Option<u64>,
    done: bool,
}

impl ShardSamples {
    pub fn new(reader: ShardReader, spec: &ShardSpec, cfg: &ReadConfig) -> Self {
        Self {
            samples: SampleReader::with_max_member(reader, cfg.max_member_bytes),
            expected: spec.samples,
            done: false,
        }
    }

    /// The next sample, a failed shard, or `None` at a clean end.
    pub fn next_item(&mut self) -> Option<ShardItem> {
        if self.done {
            return None;
        }
        let item = match self.samples.next() {
            None => {
                self.done = true;
                let read = self.samples.position();
                return match self.expected {
                    Some(n) if read != n => {
                        Some(ShardItem::Failed(format!("{read} samples read, the manifest says {n} (short shard)")))
                    }
                    _ => None,
                };
            }
            Some(Err(WdsError::Tar { after_sample, message })) => {
                ::metrics::counter!(m::ERRORS, "kind" => "tar").increment(1);
                self.done = true;
                return Some(ShardItem::Failed(format!(
                    "{message} after sample {after_sample}; rest of shard skipped"
                )));
            }
            Some(Ok(mut s)) => {
                // Only the image the readers decode and the label travel on.
                let read: u64 = s.fields.iter().map(|(_, b)| b.len() as u64).sum();
                s.keep_image_and_class();
                Ok((s, read))
            }
            Some(Err(e)) => Err(BrokenSample::of(e)),
        };
        Some(ShardItem::Sample(item))
    }
}

/// What the sample policy makes of a sample: its label and the image to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    /// The `.cls` value, -1 without one (under [`LabelPolicy::Optional`]).
    pub label: i64,
    pub image: &'a [u8],
    /// From the bytes ([`Format::sniff`]); from the member's extension when they say nothing.
    pub format: Format,
}

/// Applies the sample policy (see the module docs): `Err((kind, reason))` for a bad sample.
pub fn check_sample(sample: &ShardSample, labels: LabelPolicy) -> Result<Checked<'_>, (&'static str, String)> {
    let label = match (sample.class(), labels) {
        (None, LabelPolicy::Optional) => -1,
        (None, LabelPolicy::Required) => {
            return Err(("missing_class", format!("no .{CLASS_EXT} member (data.labels = required)")));
        }
        (Some(Err(e)), _) => return Err(("bad_class", e)),
        (Some(Ok(c)), _) => c,
    };
    let (ext, image) =
        sample.image().ok_or_else(|| ("missing_image", format!("no image member (.{})", IMAGE_EXTS.join(", ."))))?;
    let format = match Format::sniff(image) {
        Format::Unknown => image_format(ext),
        known => known,
    };
    Ok(Checked { label, image, format })
}

/// The bad-sample kind of a decoding error: `too_large` (over the pixel cap) or `decode`.
pub fn decode_kind(e: &DecodeError) -> &'static str {
    if matches!(e, DecodeError::TooLarge { .. }) { TOO_LARGE } else { "decode" }
}

/// Decodes a whole image, upright, with the pixel cap (the eval reader, `pipeline bench`'s
/// baseline). The loader decodes JPEGs only down to its crop box instead.
pub fn decode_whole(image: &[u8], format: Format, max_pixels: usize, out: &mut RgbImage) -> Result<(), DecodeError> {
    decode::decode_other_into(image, format, max_pixels, out)
}

/// More shards failed than `max_failed_shards` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyFailed {
    /// Every failed shard so far (shown forms).
    pub failed: Vec<String>,
    pub max: u64,
    /// The last failure's reason.
    pub last: String,
}

/// The failed-shard policy: each failure is logged (shard and reason, secrets redacted) and
/// counted in `cae_pipeline_shards_failed_total`; more distinct failed shards than `max` is an error.
#[derive(Debug, Clone, Default)]
pub struct ShardFailures {
    failed: BTreeSet<String>,
    max: u64,
}

impl ShardFailures {
    pub fn new(max: u64) -> Self {
        Self { failed: BTreeSet::new(), max }
    }

    /// Records that `spec` failed for `reason`.
    pub fn fail(&mut self, spec: &ShardSpec, reason: &str) -> Result<(), TooManyFailed> {
        let reason = crate::redact::text(reason);
        tracing::warn!("shard {}: {reason}", spec.url);
        ::metrics::counter!(m::SHARDS_FAILED).increment(1);
        self.failed.insert(spec.url.shown().to_string());
        if self.failed.len() as u64 > self.max {
            return Err(TooManyFailed { failed: self.names(), max: self.max, last: reason });
        }
        Ok(())
    }

    /// The failed shards so far (shown forms, sorted).
    pub fn names(&self) -> Vec<String> {
        self.failed.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(fields: &[(&str, &[u8])]) -> ShardSample {
        ShardSample { key: "k".into(), fields: fields.iter().map(|(e, b)| (e.to_string(), b.to_vec())).collect() }
    }

    /// Regression: a `.jpg` member holding a PNG (ImageNet's n02105855_2933.JPEG; Python-written
    /// shards keep the name) went to the JPEG decoder and was a bad sample.
    #[test]
    fn the_image_format_comes_from_the_bytes() {
        let png = b"\x89PNG\r\n\x1a\nrest";
        let check = |fields: &[(&str, &[u8])], labels| {
            check_sample(&sample(fields), labels).map(|c| (c.label, c.format)).map_err(|(k, _)| k)
        };
        assert_eq!(check(&[("jpg", png), ("cls", b"3")], LabelPolicy::Required), Ok((3, Format::Png)));
        assert_eq!(check(&[("png", b"\xFF\xD8\xFF\xE0")], LabelPolicy::Optional), Ok((-1, Format::Jpeg)));
        // Bytes that say nothing: the extension decides (and the decoder names the problem).
        assert_eq!(check(&[("webp", b"junk")], LabelPolicy::Optional), Ok((-1, Format::Webp)));
    }

    #[test]
    fn the_label_policy_and_missing_images_are_bad_samples() {
        let kind = |s: ShardSample, l| check_sample(&s, l).err().map(|(k, _)| k);
        assert_eq!(kind(sample(&[("jpg", b"\xFF\xD8\xFF")]), LabelPolicy::Required), Some("missing_class"));
        assert_eq!(kind(sample(&[("jpg", b"\xFF\xD8\xFF"), ("cls", b"x")]), LabelPolicy::Optional), Some("bad_class"));
        assert_eq!(kind(sample(&[("txt", b"hi"), ("cls", b"1")]), LabelPolicy::Optional), Some("missing_image"));
    }

    #[test]
    fn failed_shards_are_counted_once_each_up_to_the_cap() {
        let (a, b) = (ShardSpec::new("/d/a.tar", None), ShardSpec::new("http://h/b.tar?sig=SECRET", None));
        let mut f = ShardFailures::new(1);
        assert!(f.fail(&a, "broken").is_ok());
        assert!(f.fail(&a, "broken again").is_ok(), "the same shard counts once");
        let e = f.fail(&b, "HTTP 404 for http://h/b.tar?sig=SECRET").unwrap_err();
        assert_eq!(e.failed, ["/d/a.tar", "http://h/b.tar?sig=***"]);
        assert_eq!((e.max, e.last.contains("SECRET")), (1, false));
        let cfg = ReadConfig::default();
        assert_eq!(cfg.max_failed_for(std::slice::from_ref(&a)), 0);
        let remote: Vec<ShardSpec> = (0..300).map(|i| ShardSpec::new(format!("http://h/{i}.tar"), None)).collect();
        assert_eq!(cfg.max_failed_for(&remote), 3);
        assert_eq!(ReadConfig { max_failed_shards: Some(7), ..cfg }.max_failed_for(&remote), 7);
    }
}
