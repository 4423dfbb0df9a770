//! The WebDataset shard format: the one place that knows how samples sit in a tar file.
//!
//! Contract (the Python `webdataset` library's, `tariterators.py` / `writer.py`):
//! - every member is named `key.ext`; the key is everything before the FIRST dot of the member's
//!   base name (a directory prefix stays part of the key), so keys never contain a dot — use
//!   [`sanitize_key`] when making them;
//! - consecutive members with the same key form one sample; a sample never spans shards;
//! - the same extension twice in one sample is an error;
//! - writers are reproducible: members sorted by extension, fixed mtime/uid/gid/mode.
//!
//! Reading and writing go through the `webdataset` crate (webdataset-rs): its streaming tar parser
//! [`webdataset::shard::TarEntries`] works on any `Read` (file, pipe, HTTP body) and its
//! [`webdataset::TarWriter`] writes the same headers as Python's. What it does not do, this module
//! adds on top: grouping with our error rules, sample positions for exact resume (a position is
//! the sample index within the shard; resuming re-reads and skips that many samples, which costs
//! only tar parsing at GB/s), and hashing while writing.

use std::io::Read;

mod cap;
mod writer;
use cap::{MemberCap, SkipLog};
use webdataset::shard::{RawEntry, TarEntries};
pub use writer::{ShardDigest, ShardWriter, sha256_file};

/// Extension of the image member the sharder writes.
pub const IMAGE_EXT: &str = "jpg";
/// Image member extensions the loader reads, in order of preference (the first found is used).
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// The decoder's format for an image member extension (one of [`IMAGE_EXTS`]).
pub fn image_format(ext: &str) -> crate::decode::Format {
    use crate::decode::Format;
    match ext {
        "png" => Format::Png,
        "webp" => Format::Webp,
        _ => Format::Jpeg,
    }
}
/// Extension of the class-index member (decimal text).
pub const CLASS_EXT: &str = "cls";
/// Extension of the per-sample metadata member (JSON).
pub const META_EXT: &str = "json";

/// The largest image member, in bytes, by default on both sides of the format: the loader's
/// `data.max_member_bytes` (larger members are skipped) and the sharder's `--max-file-bytes`
/// (larger input files are rejected; a kept file becomes a member of the same size), so nothing
/// the sharder writes with its defaults is skipped by the loader with its defaults.
pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 64 << 20;

/// Fixed modification time written into every header (reproducible shards).
pub const FIXED_MTIME: u64 = 0;

/// Errors of the shard format.
#[derive(Debug, thiserror::Error)]
pub enum WdsError {
    /// The tar structure itself is broken (bad checksum, truncated member, ...). Nothing after this
    /// point of the shard can be read: a streaming tar reader cannot resynchronise.
    #[error("corrupt tar after sample {after_sample}: {message}")]
    Tar { after_sample: u64, message: String },
    /// A member name has no `.ext` part.
    #[error("member {name:?} has no extension (expected key.ext)")]
    NoExtension { name: String },
    /// One sample has the same extension twice.
    #[error("sample {key:?} has the extension {ext:?} twice")]
    DuplicateExtension { key: String, ext: String },
    /// A member is larger than the reader's cap: it was skipped without being read into memory.
    #[error("sample {key:?}: member .{ext} is {size} bytes, over the {max}-byte cap; skipped")]
    MemberTooLarge { key: String, ext: String, size: u64, max: u64 },
    /// Writing failed.
    #[error("writing shard: {0}")]
    Write(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a member name into (key, extension) at the first dot of its base name.
///
/// `"n01_5.jpg"` -> `("n01_5", "jpg")`, `"a/b.seg.png"` -> `("a/b", "seg.png")`.
pub fn split_member_name(name: &str) -> Option<(&str, &str)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.')? + base_start;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Makes a string safe as a sample key: dots, path separators, whitespace and control characters
/// become `_` (a dot would split the key; a slash would look like a directory).
pub fn sanitize_key(raw: &str) -> String {
    raw.chars()
        .map(|c| if c == '.' || c == '/' || c == '\\' || c.is_whitespace() || c.is_control() { '_' } else { c })
        .collect()
}

/// One sample as stored in a shard: its key and its members in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSample {
    pub key: String,
    /// (extension, bytes) in archive order.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl ShardSample {
    /// The bytes of the member with this extension.
    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(e, _)| e == ext).map(|(_, b)| b.as_slice())
    }

    /// Takes the bytes of the member with this extension out of the sample.
    pub fn take(&mut self, ext: &str) -> Option<Vec<u8>> {
        let i = self.fields.iter().position(|(e, _)| e == ext)?;
        Some(self.fields.swap_remove(i).1)
    }

    /// The image member: the first of [`IMAGE_EXTS`] the sample has, with its extension.
    pub fn image(&self) -> Option<(&'static str, &[u8])> {
        IMAGE_EXTS.iter().find_map(|&ext| self.get(ext).map(|b| (ext, b)))
    }

    /// Drops every member but the image [`image`](Self::image) picks and `.cls`: what the
    /// loader keeps of a sample (in its shuffle buffer) is only what it uses.
    pub fn keep_image_and_class(&mut self) {
        let image = self.image().map(|(ext, _)| ext);
        self.fields.retain(|(ext, _)| Some(ext.as_str()) == image || ext == CLASS_EXT);
    }

    /// The `.cls` member parsed as a class index.
    pub fn class(&self) -> Option<Result<i64, String>> {
        let raw = self.get(CLASS_EXT)?;
        Some(
            std::str::from_utf8(raw)
                .map_err(|e| e.to_string())
                .and_then(|s| s.trim().parse::<i64>().map_err(|e| format!("{e} in {s:?}"))),
        )
    }
}

/// Streams the samples of one shard from any reader.
///
/// Yields `Err` for a broken sample (and continues) or for broken tar structure (and stops).
pub struct SampleReader<R: Read> {
    entries: TarEntries<MemberCap<R>>,
    /// Per regular member: skipped for its size or not (see [`cap`]).
    skipped: SkipLog,
    max_member: u64,
    pending: Option<(RawEntry, Option<u64>)>,
    /// A tar error met while looking for more members of the previous sample; yielded next.
    pending_error: Option<WdsError>,
    samples: u64,
    done: bool,
}

impl<R: Read> SampleReader<R> {
    pub fn new(reader: R) -> Self {
        Self::with_max_member(reader, u64::MAX)
    }

    /// A reader that skips members larger than `max_member` bytes without reading them into
    /// memory; their sample comes out as [`WdsError::MemberTooLarge`].
    pub fn with_max_member(reader: R, max_member: u64) -> Self {
        let skipped = SkipLog::default();
        Self {
            entries: TarEntries::new(MemberCap::new(reader, max_member, skipped.clone())),
            skipped,
            max_member,
            pending: None,
            pending_error: None,
            samples: 0,
            done: false,
        }
    }

    /// Samples yielded so far (good or bad): the position to resume from.
    pub fn position(&self) -> u64 {
        self.samples
    }

    /// The next member, with its size when it was skipped for being too large.
    fn next_entry(&mut self) -> Option<Result<(RawEntry, Option<u64>), WdsError>> {
        if let Some(e) = self.pending.take() {
            return Some(Ok(e));
        }
        // A parser panic on hostile bytes ends the shard like any broken tar structure.
        let next = match crate::guard::catch_panic(|| self.entries.next()) {
            Ok(next) => next?,
            Err(what) => {
                self.done = true;
                let message = format!("the tar parser panicked (a bug, please report it with this shard): {what}");
                return Some(Err(WdsError::Tar { after_sample: self.samples, message }));
            }
        };
        match next {
            Ok(e) => {
                let skipped = self.skipped.lock().ok().and_then(|mut log| log.pop_front()).flatten();
                Some(Ok((e, skipped)))
            }
            Err(e) => {
                self.done = true;
                Some(Err(WdsError::Tar { after_sample: self.samples, message: e.to_string() }))
            }
        }
    }
}

impl<R: Read> Iterator for SampleReader<R> {
    type Item = Result<ShardSample, WdsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(e));
        }
        if self.done {
            return None;
        }
        let (first, first_skipped) = match self.next_entry()? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let Some((key, ext)) = split_member_name(&first.name) else {
            self.samples += 1;
            return Some(Err(WdsError::NoExtension { name: first.name }));
        };
        let key = key.to_string();
        let mut too_large: Option<(String, u64)> = first_skipped.map(|size| (ext.to_string(), size));
        let fields = if too_large.is_some() { vec![] } else { vec![(ext.to_string(), first.data)] };
        let mut sample = ShardSample { key, fields };
        let mut duplicate: Option<String> = None;
        loop {
            match self.next_entry() {
                None => break,
                Some(Err(mut e)) => {
                    if let WdsError::Tar { after_sample, .. } = &mut e {
                        *after_sample = self.samples + 1;
                    }
                    // The tar broke after this sample's members: yield what we have (a missing
                    // member shows up downstream), then the break.
                    self.pending_error = Some(e);
                    break;
                }
                Some(Ok((entry, skipped))) => match split_member_name(&entry.name) {
                    Some((k, ext)) if k == sample.key => {
                        if let Some(size) = skipped {
                            too_large.get_or_insert_with(|| (ext.to_string(), size));
                        } else if sample.fields.iter().any(|(e, _)| e == ext) {
                            duplicate.get_or_insert_with(|| ext.to_string());
                        } else {
                            sample.fields.push((ext.to_string(), entry.data));
                        }
                    }
                    _ => {
                        self.pending = Some((entry, skipped));
                        break;
                    }
                },
            }
        }
        self.samples += 1;
        if let Some(ext) = duplicate {
            return Some(Err(WdsError::DuplicateExtension { key: sample.key, ext }));
        }
        if let Some((ext, size)) = too_large {
            return Some(Err(WdsError::MemberTooLarge { key: sample.key, ext, size, max: self.max_member }));
        }
        Some(Ok(sample))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::Path;

    use super::*;

    #[test]
    fn member_names_split_at_first_dot_of_base_name() {
        assert_eq!(split_member_name("n01_5.jpg"), Some(("n01_5", "jpg")));
        assert_eq!(split_member_name("a.seg.png"), Some(("a", "seg.png")));
        assert_eq!(split_member_name("dir.x/a.b.c"), Some(("dir.x/a", "b.c")));
        assert_eq!(split_member_name("noext"), None);
    }

    /// Regression: the shuffle buffer kept members the loader never uses (`.json`, a second
    /// image, segmentation maps). Only the chosen image and `.cls` stay.
    #[test]
    fn only_the_chosen_image_and_the_class_are_kept() {
        let f = |e: &str, n: usize| (e.to_string(), vec![1u8; n]);
        let mut s = ShardSample {
            key: "k".into(),
            fields: vec![f("json", 900), f("png", 50), f("cls", 1), f("jpg", 40), f("seg.png", 700)],
        };
        s.keep_image_and_class();
        let mut kept: Vec<&str> = s.fields.iter().map(|(e, _)| e.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["cls", "jpg"], "the .jpg comes first among the images");
        let mut unlabeled = ShardSample { key: "k".into(), fields: vec![f("txt", 5), f("webp", 9)] };
        unlabeled.keep_image_and_class();
        assert_eq!(unlabeled.fields, vec![f("webp", 9)]);
    }

    #[test]
    fn sanitize_removes_dots_and_separators() {
        assert_eq!(sanitize_key("n01440764_10026"), "n01440764_10026");
        assert_eq!(sanitize_key("a.b/c d\t"), "a_b_c_d_");
        assert!(!sanitize_key("x.y.z").contains('.'));
    }

    type Fields<'a> = Vec<(&'a str, Vec<u8>)>;

    fn write_shard(path: &Path, samples: &[(&str, Fields<'_>)]) -> ShardDigest {
        let mut w = ShardWriter::create(path).unwrap();
        for (key, fields) in samples {
            let refs: Vec<(&str, &[u8])> = fields.iter().map(|(e, b)| (*e, b.as_slice())).collect();
            w.write_sample(key, &refs).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_and_digest_matches_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        let digest = write_shard(
            &path,
            &[
                ("a", vec![("jpg", b"JPEGDATA".to_vec()), ("cls", b"3".to_vec())]),
                ("b", vec![("json", b"{}".to_vec()), ("cls", b"4".to_vec()), ("jpg", vec![1; 700])]),
            ],
        );
        assert_eq!(digest.samples, 2);
        assert_eq!(sha256_file(&path).unwrap(), (digest.bytes, digest.sha256.clone()));
        // An independent tar reader (the `tar` crate) sees members sorted by extension, fixed mtime.
        let mut ar = tar::Archive::new(File::open(&path).unwrap());
        let names: Vec<(String, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_string_lossy().into_owned(), e.header().mtime().unwrap())
            })
            .collect();
        let expected = ["a.cls", "a.jpg", "b.cls", "b.jpg", "b.json"];
        assert_eq!(names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), expected);
        assert!(names.iter().all(|(_, m)| *m == FIXED_MTIME));

        let samples: Vec<ShardSample> = SampleReader::new(File::open(&path).unwrap()).map(|s| s.unwrap()).collect();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].get("jpg"), Some(&b"JPEGDATA"[..]));
        assert_eq!(samples[0].class(), Some(Ok(3)));
        assert_eq!(samples[1].get("jpg").map(|b| b.len()), Some(700));
        assert_eq!(samples[1].class(), Some(Ok(4)));
    }

    #[test]
    fn same_samples_give_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = [("k", vec![("jpg", vec![9u8; 1000]), ("cls", b"1".to_vec())])];
        let a = write_shard(&dir.path().join("a.tar"), &s);
        let b = write_shard(&dir.path().join("b.tar"), &s);
        assert_eq!(a, b);
    }

    #[test]
    fn duplicate_extension_is_an_error_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.tar");
        // Build with the tar crate directly: our writer refuses duplicates.
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        for (name, data) in [("x.jpg", &b"1"[..]), ("x.jpg", b"2"), ("y.jpg", b"3"), ("y.cls", b"0")] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o444);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap();
        let out: Vec<_> = SampleReader::new(File::open(&path).unwrap()).collect();
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], Err(WdsError::DuplicateExtension { key, ext }) if key == "x" && ext == "jpg"));
        assert_eq!(out[1].as_ref().unwrap().key, "y");
    }

    /// The bytes of a shard of `n` samples `k0, k1, ...`: a 600-byte `.jpg` and a `.cls` each
    /// (per sample: cls 512 + 512, jpg 512 + 1024 bytes).
    fn small_shard(n: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        let samples: Vec<(String, Fields<'_>)> =
            (0..n).map(|i| (format!("k{i}"), vec![("jpg", vec![i as u8; 600]), ("cls", b"0".to_vec())])).collect();
        let refs: Vec<(&str, Fields<'_>)> = samples.iter().map(|(k, f)| (k.as_str(), f.clone())).collect();
        write_shard(&path, &refs);
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn corrupt_header_stops_with_error_and_truncation_is_reported() {
        let good = small_shard(4);

        // Flip a byte inside the third sample's first header: checksum fails there.
        let mut bad = good.clone();
        let third_header = 2 * (512 + 512 + 512 + 1024); // two samples: cls(512+512) + jpg(512+1024)
        bad[third_header + 10] ^= 0x55;
        let out: Vec<_> = SampleReader::new(&bad[..]).collect();
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 2);
        assert!(matches!(out.last(), Some(Err(WdsError::Tar { after_sample: 2, .. }))));

        // Truncated in the middle of a member.
        let out: Vec<_> = SampleReader::new(&good[..good.len() / 2]).collect();
        assert!(out.last().unwrap().is_err(), "truncation must be reported");
    }

    #[test]
    fn a_panic_below_the_reader_ends_the_shard_with_an_error() {
        /// Panics once the first sample (cls 1024 + jpg 1536 bytes) has been read.
        struct Bomb(Vec<u8>, usize);
        impl Read for Bomb {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                assert!(self.1 < 2560, "reader bug at byte {}", self.1);
                let n = buf.len().min(self.0.len() - self.1).min(512);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let out: Vec<_> = SampleReader::new(Bomb(small_shard(3), 0)).collect();
        assert_eq!(out.len(), 2, "the first sample, then the error");
        assert_eq!(out[0].as_ref().unwrap().key, "k0");
        match &out[1] {
            Err(WdsError::Tar { after_sample: 1, message }) => {
                assert!(message.contains("panicked") && message.contains("reader bug at byte 2560"), "{message}")
            }
            other => panic!("expected a tar error, got {other:?}"),
        }
    }

    /// Members over the cap are skipped while streaming (the sample is an error naming them),
    /// the samples around them read normally, and the skipped bytes never sit in memory whole.
    #[test]
    fn members_over_the_cap_are_skipped_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.tar");
        let big = vec![7u8; 5000];
        write_shard(
            &path,
            &[
                ("a", vec![("jpg", vec![1; 600]), ("cls", b"0".to_vec())]),
                ("b", vec![("jpg", big.clone()), ("cls", b"1".to_vec())]),
                ("c", vec![("cls", b"2".to_vec()), ("json", big)]),
                ("d", vec![("jpg", vec![4; 1000]), ("cls", b"3".to_vec())]),
            ],
        );
        let reader = SampleReader::with_max_member(File::open(&path).unwrap(), 1024);
        let out: Vec<_> = reader.collect();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].as_ref().unwrap().get("jpg").map(<[u8]>::len), Some(600));
        match &out[1] {
            Err(WdsError::MemberTooLarge { key, ext, size, max }) => {
                assert_eq!((key.as_str(), ext.as_str(), *size, *max), ("b", "jpg", 5000, 1024))
            }
            other => panic!("expected b's jpg to be too large, got {other:?}"),
        }
        assert!(matches!(&out[2], Err(WdsError::MemberTooLarge { key, ext, .. }) if key == "c" && ext == "json"));
        let d = out[3].as_ref().unwrap();
        assert_eq!((d.key.as_str(), d.class()), ("d", Some(Ok(3))));
        assert_eq!(d.get("jpg"), Some(&[4u8; 1000][..]));
        // Without a cap the same shard reads whole.
        let all: Vec<_> = SampleReader::new(File::open(&path).unwrap()).collect();
        assert!(all.iter().all(|s| s.is_ok()));
        // Truncated inside a skipped member: a tar error, not a clean end.
        let bytes = std::fs::read(&path).unwrap();
        // a.cls 0..1024, a.jpg ..2560, b.cls ..3584, b.jpg's header ..4096, then its payload.
        let cut = &bytes[..4096 + 3000];
        let out: Vec<_> = SampleReader::with_max_member(cut, 1024).collect();
        assert!(out.iter().any(|r| matches!(r, Err(WdsError::Tar { .. }))), "{out:?}");
    }

    /// Mutation fuzzing of the shard reader (webdataset-rs's tar parser plus our grouping): bit
    /// flips, overwritten runs, cuts and splices, in headers (names, sizes, checksums, ustar and
    /// long-name fields) and payloads. Reading never panics and always ends, with at most one
    /// item per 512-byte block. `CAE_WDS_FUZZ_CASES` raises the count for a long local run.
    #[test]
    fn mutated_shards_never_panic_and_always_end() {
        let cases = crate::fuzz::cases("CAE_WDS_FUZZ_CASES", 2000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        let long_key = "k".repeat(120); // a GNU long-name / pax member
        let samples: Vec<(String, Fields<'_>)> = (0..5)
            .map(|i| {
                let key = if i == 2 { long_key.clone() } else { format!("n0144_{i}") };
                (key, vec![("jpg", vec![i as u8; 300 + 250 * i]), ("cls", format!("{i}").into_bytes())])
            })
            .collect();
        let refs: Vec<(&str, Fields<'_>)> = samples.iter().map(|(k, f)| (k.as_str(), f.clone())).collect();
        write_shard(&path, &refs);
        let good = std::fs::read(&path).unwrap();
        let mut rng = crate::fuzz::Xorshift::new(0x9E37_79B9_7F4A_7C15);
        let mut rnd = move |n: usize| rng.next(n);
        let mut failures = Vec::new();
        for case in 0..cases {
            let mut b = good.clone();
            for _ in 0..1 + rnd(3) {
                // Headers are where parsing happens: aim half the mutations at a header block.
                let i = if rnd(2) == 0 { (rnd(b.len()) / 512) * 512 + rnd(512) } else { rnd(b.len()) }.min(b.len() - 1);
                match rnd(5) {
                    0 => b[i] ^= 1 << rnd(8),
                    1 => b[i] = [b'0', b'7', b' ', 0, 0xFF, b'9'][rnd(6)],
                    2 => {
                        let n = rnd(24).min(b.len() - i);
                        b[i..i + n].fill([0x00, 0xFF, b'7'][rnd(3)]);
                    }
                    3 => b.truncate(i),
                    _ => {
                        let (j, n) = (rnd(good.len()), 1 + rnd(600));
                        b.splice(i..i, good[j..(j + n).min(good.len())].iter().copied());
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            let limit = b.len() / 512 + 2;
            let run = std::panic::catch_unwind(|| {
                let mut items = 0;
                for r in SampleReader::new(&b[..]) {
                    items += 1;
                    assert!(items <= limit, "reader does not end: {items} items from {} bytes", b.len());
                    if let Ok(s) = r {
                        let _ = s.class();
                    }
                }
            });
            if run.is_err() {
                failures.push((case, b));
            }
        }
        crate::fuzz::report(&failures, cases, "wds-fuzz", "tar");
    }
}
