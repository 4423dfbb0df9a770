//! The built-in ImageNet-like sample set.
//!
//! Layout written under `out`:
//!
//! ```text
//! out/train/<wnid>/<wnid>_<n>.JPEG   photo-like images and the odd files (see [`OddKind`])
//! out/fixtures.tsv                   relative path <TAB> kind, one row per file
//! ```
//!
//! Images are smooth structure (separable waves and soft blobs in a per-class palette) plus
//! per-pixel texture, so JPEG sizes and decode costs are close to real photographs. Classes differ
//! in palette and wave orientation, so a representation can tell them apart. Sizes centre on
//! 500x375 with a spread from ~100 px to ~2000 px. Everything follows from the seed: the same
//! spec gives byte-identical files.
//!
//! [`generate_structured`] writes the same layout with the structured classes of
//! [`crate::shapes`] (shape, layout and texture at random colours): the set where a random
//! network's features fail and a learned representation must see shapes.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::shapes::{self, ShapeKind};

/// What to generate.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    /// Number of class folders.
    pub classes: usize,
    /// Ordinary photo-like JPEGs per class.
    pub per_class: usize,
    /// Seed for every random choice.
    pub seed: u64,
    /// Add one file of each [`OddKind`] (spread over the classes).
    pub odd_files: bool,
    /// Largest side of the ordinary images; the spread to ~2000 px is capped here (tests use
    /// smaller values to stay fast).
    pub max_side: u32,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        Self { classes: 10, per_class: 40, seed: 0, odd_files: true, max_side: 2000 }
    }
}

/// The unusual files real ImageNet has, and worse. Each has a defined outcome in the sharder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OddKind {
    /// Single-channel baseline JPEG (kept as it is).
    Grayscale,
    /// Four-channel Adobe CMYK JPEG (converted to RGB).
    Cmyk,
    /// Progressive JPEG (kept).
    Progressive,
    /// A PNG file named `.JPEG` (converted).
    PngNamedJpeg,
    /// A JPEG cut in half (rejected).
    Truncated,
    /// A zero-byte file (rejected).
    Empty,
    /// A text file named `.JPEG` (rejected).
    NotAnImage,
    /// A JPEG with EXIF orientation 6 (rotated upright and converted).
    ExifOrientation,
    /// A baseline JPEG with restart markers (kept).
    RestartMarkers,
}

impl OddKind {
    /// Every odd kind, in the order they are generated.
    pub const ALL: [OddKind; 9] = [
        OddKind::Grayscale,
        OddKind::Cmyk,
        OddKind::Progressive,
        OddKind::PngNamedJpeg,
        OddKind::Truncated,
        OddKind::Empty,
        OddKind::NotAnImage,
        OddKind::ExifOrientation,
        OddKind::RestartMarkers,
    ];

    /// Name used in `fixtures.tsv`.
    pub fn name(self) -> &'static str {
        match self {
            OddKind::Grayscale => "grayscale",
            OddKind::Cmyk => "cmyk",
            OddKind::Progressive => "progressive",
            OddKind::PngNamedJpeg => "png_named_jpeg",
            OddKind::Truncated => "truncated",
            OddKind::Empty => "empty",
            OddKind::NotAnImage => "not_an_image",
            OddKind::ExifOrientation => "exif_orientation",
            OddKind::RestartMarkers => "restart_markers",
        }
    }
}

impl fmt::Display for OddKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One generated file.
#[derive(Debug, Clone)]
pub struct GeneratedFile {
    /// Path relative to the `train/` folder, e.g. `n01000000/n01000000_3.JPEG`.
    pub rel_path: String,
    /// Class folder name.
    pub class: String,
    /// `None` for an ordinary image.
    pub odd: Option<OddKind>,
    /// Width and height of the stored pixels (0 for the non-images).
    pub width: u32,
    pub height: u32,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// The `train/` folder (the sharder's `--input`).
    pub train_dir: PathBuf,
    pub files: Vec<GeneratedFile>,
}

impl Fixtures {
    /// The file of the given odd kind, if generated.
    pub fn odd(&self, kind: OddKind) -> Option<&GeneratedFile> {
        self.files.iter().find(|f| f.odd == Some(kind))
    }
}

/// Errors while writing fixtures.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("encoding {path}: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("the structured set has {max} classes ({asked} asked)")]
    TooManyClasses { asked: usize, max: usize },
}

/// ImageNet-style folder name of class `c` (`n` + 8 digits).
pub fn wnid(c: usize) -> String {
    format!("n{:08}", 1_000_000 + c * 7919)
}

/// Writes the photo-like sample set under `out` (created if missing). Existing files with the same
/// names are overwritten; the result depends only on `spec`.
pub fn generate(out: &Path, spec: &FixtureSpec) -> Result<Fixtures, FixtureError> {
    generate_with(out, spec, &photo_like)
}

/// Writes the structured sample set under `out` ([`crate::shapes`]: class `c` is
/// `ShapeKind::ALL[c]` at random colours, scales, positions and rotations; at most 10 classes).
/// Same layout, sizes and odd files as [`generate`].
pub fn generate_structured(out: &Path, spec: &FixtureSpec) -> Result<Fixtures, FixtureError> {
    let max = ShapeKind::ALL.len();
    if spec.classes > max {
        return Err(FixtureError::TooManyClasses { asked: spec.classes, max });
    }
    generate_with(out, spec, &|rng, c, w, h| shapes::paint(rng, ShapeKind::ALL[c], w, h))
}

/// Draws the pixels of one image of class `c` at `w x h` (RGB, row-major).
type Painter = dyn Fn(&mut ChaCha8Rng, usize, u32, u32) -> Vec<u8>;

fn generate_with(out: &Path, spec: &FixtureSpec, paint: &Painter) -> Result<Fixtures, FixtureError> {
    let train_dir = out.join("train");
    let mut files = Vec::new();
    for c in 0..spec.classes {
        let class = wnid(c);
        let dir = train_dir.join(&class);
        fs::create_dir_all(&dir).map_err(|source| FixtureError::Io { path: dir.clone(), source })?;
        for n in 0..spec.per_class {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed, c as u64, n as u64));
            let (w, h) = draw_size(&mut rng, spec.max_side);
            let rgb = paint(&mut rng, c, w, h);
            let quality = rng.random_range(75..=95u8);
            let bytes = encode_rgb(&rgb, w, h, quality, |_| {})
                .map_err(|message| FixtureError::Encode { path: dir.join(format!("{class}_{n}.JPEG")), message })?;
            let rel_path = format!("{class}/{class}_{n}.JPEG");
            write(&train_dir.join(&rel_path), &bytes)?;
            files.push(GeneratedFile { rel_path, class: class.clone(), odd: None, width: w, height: h });
        }
    }
    if spec.odd_files && spec.classes > 0 {
        for (i, kind) in OddKind::ALL.iter().enumerate() {
            let c = i % spec.classes;
            let class = wnid(c);
            let n = spec.per_class + 1000 + i;
            let rel_path = format!("{class}/{class}_{n}.JPEG");
            let path = train_dir.join(&rel_path);
            fs::create_dir_all(train_dir.join(&class))
                .map_err(|source| FixtureError::Io { path: path.clone(), source })?;
            let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed ^ 0x0dd, c as u64, n as u64));
            let (w, h) = (rng.random_range(180..=320u32), rng.random_range(140..=260u32));
            let rgb = paint(&mut rng, c, w, h);
            let enc_err = |message| FixtureError::Encode { path: path.clone(), message };
            let (bytes, sw, sh) = match kind {
                OddKind::Grayscale => {
                    let luma: Vec<u8> = rgb.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect();
                    (encode(&luma, w, h, 90, ColorType::Luma, |_| {}).map_err(enc_err)?, w, h)
                }
                OddKind::Cmyk => {
                    let cmyk: Vec<u8> = rgb
                        .chunks_exact(3)
                        .flat_map(|p| {
                            let k = 255 - p[0].max(p[1]).max(p[2]);
                            [255 - p[0] - k, 255 - p[1] - k, 255 - p[2] - k, k]
                        })
                        .collect();
                    (encode(&cmyk, w, h, 90, ColorType::Cmyk, |_| {}).map_err(enc_err)?, w, h)
                }
                OddKind::Progressive => {
                    (encode_rgb(&rgb, w, h, 90, |e| e.set_progressive(true)).map_err(enc_err)?, w, h)
                }
                OddKind::PngNamedJpeg => {
                    let mut out = Vec::new();
                    let img = image::RgbImage::from_raw(w, h, rgb.clone())
                        .ok_or_else(|| enc_err("pixel buffer size".into()))?;
                    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                        .map_err(|e| enc_err(e.to_string()))?;
                    (out, w, h)
                }
                OddKind::Truncated => {
                    let full = encode_rgb(&rgb, w, h, 90, |_| {}).map_err(enc_err)?;
                    (full[..full.len() / 2].to_vec(), w, h)
                }
                OddKind::Empty => (Vec::new(), 0, 0),
                OddKind::NotAnImage => (b"<html><body>403 Forbidden</body></html>\n".to_vec(), 0, 0),
                OddKind::ExifOrientation => {
                    let exif = exif_orientation(6);
                    let bytes = encode_rgb(&rgb, w, h, 90, |e| {
                        // Cannot fail: the segment is tiny.
                        let _ = e.add_exif_metadata(&exif);
                    })
                    .map_err(enc_err)?;
                    (bytes, w, h)
                }
                OddKind::RestartMarkers => {
                    (encode_rgb(&rgb, w, h, 90, |e| e.set_restart_interval(4)).map_err(enc_err)?, w, h)
                }
            };
            write(&path, &bytes)?;
            files.push(GeneratedFile { rel_path, class, odd: Some(*kind), width: sw, height: sh });
        }
    }
    let mut tsv = String::from("path\tkind\n");
    for f in &files {
        tsv.push_str(&format!("{}\t{}\n", f.rel_path, f.odd.map(OddKind::name).unwrap_or("image")));
    }
    write(&out.join("fixtures.tsv"), tsv.as_bytes())?;
    Ok(Fixtures { train_dir, files })
}

/// Writes `bytes` to `path` (the scenes set shares it).
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), FixtureError> {
    let io = |source| FixtureError::Io { path: path.to_path_buf(), source };
    let mut f = fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)
}

/// SplitMix64-style mixing of the seed with two indices, so every image has its own stream.
pub(crate) fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// ImageNet-like size: mostly 500 on the long side (landscape 4:3 / 3:2 or portrait), now and
/// then small (~100 px) or large (up to `max_side`).
fn draw_size(rng: &mut ChaCha8Rng, max_side: u32) -> (u32, u32) {
    let long = match rng.random_range(0..20u32) {
        0 => rng.random_range(90..=160u32),
        1 => rng.random_range(800..=2000u32),
        _ => 500,
    }
    .min(max_side.max(32));
    let aspect = [4.0 / 3.0, 3.0 / 2.0, 1.0, 5.0 / 4.0][rng.random_range(0..4usize)];
    let short = ((long as f64 / aspect).round() as u32).max(16);
    if rng.random_bool(0.25) { (short, long) } else { (long, short) }
}

/// Photo-like RGB pixels: separable waves and blobs in the class palette, plus texture noise.
fn photo_like(rng: &mut ChaCha8Rng, class: usize, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w as usize, h as usize);
    // Class identity: base colour and wave orientation/frequency.
    let hue = (class as f32 * 0.618_034).fract();
    let base = hsv(hue, 0.55, 0.75);
    let accent = hsv((hue + 0.5).fract(), 0.6, 0.9);
    let freq = 2.0 + (class % 5) as f32 * 1.5;
    let phase_x: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let phase_y: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let tilt = (class % 3) as f32 * 0.5;
    let col: Vec<f32> = (0..w).map(|x| (x as f32 / w as f32 * freq * std::f32::consts::TAU + phase_x).sin()).collect();
    let row: Vec<f32> =
        (0..h).map(|y| (y as f32 / h as f32 * freq * std::f32::consts::TAU * tilt + phase_y).sin()).collect();
    // A few soft blobs, separable Gaussians.
    let blobs: Vec<(Vec<f32>, Vec<f32>, f32)> = (0..3)
        .map(|_| {
            let (cx, cy) = (rng.random_range(0.0..1.0f32), rng.random_range(0.0..1.0f32));
            let r = rng.random_range(0.08..0.35f32);
            let bx = (0..w).map(|x| (-((x as f32 / w as f32 - cx) / r).powi(2)).exp()).collect();
            let by = (0..h).map(|y| (-((y as f32 / h as f32 - cy) / r).powi(2)).exp()).collect();
            (bx, by, rng.random_range(-0.6..0.6f32))
        })
        .collect();
    let mut noise_state = rng.random::<u64>() | 1;
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let wave = 0.5 + 0.25 * col[x] + 0.25 * row[y] * col[x].abs();
            let mut blob = 0.0;
            for (bx, by, a) in &blobs {
                blob += a * bx[x] * by[y];
            }
            // xorshift texture, roughly ±12 levels
            noise_state ^= noise_state << 13;
            noise_state ^= noise_state >> 7;
            noise_state ^= noise_state << 17;
            let noise = ((noise_state >> 56) as f32 - 128.0) / 128.0 * 12.0;
            let t = (wave + blob).clamp(0.0, 1.0);
            let i = (y * w + x) * 3;
            for ch in 0..3 {
                let v = (base[ch] * (1.0 - t) + accent[ch] * t) * 255.0 + noise;
                out[i + ch] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 299 + g as u32 * 587 + b as u32 * 114) / 1000) as u8
}

/// Baseline 4:2:0 RGB JPEG (the scenes set shares it).
pub(crate) fn encode_rgb(
    rgb: &[u8],
    w: u32,
    h: u32,
    quality: u8,
    configure: impl FnOnce(&mut Encoder<&mut Vec<u8>>),
) -> Result<Vec<u8>, String> {
    encode(rgb, w, h, quality, ColorType::Rgb, |e| {
        e.set_sampling_factor(SamplingFactor::R_4_2_0);
        configure(e)
    })
}

fn encode(
    pixels: &[u8],
    w: u32,
    h: u32,
    quality: u8,
    color: ColorType,
    configure: impl FnOnce(&mut Encoder<&mut Vec<u8>>),
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, quality);
    configure(&mut enc);
    let (w16, h16) = (u16::try_from(w).map_err(|e| e.to_string())?, u16::try_from(h).map_err(|e| e.to_string())?);
    enc.encode(pixels, w16, h16, color).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A minimal big-endian TIFF/EXIF block holding only the Orientation tag (0x0112).
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"MM\0\x2a"); // big-endian TIFF header
    v.extend_from_slice(&8u32.to_be_bytes()); // offset of IFD0
    v.extend_from_slice(&1u16.to_be_bytes()); // one entry
    v.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    v.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    v.extend_from_slice(&1u32.to_be_bytes()); // count
    v.extend_from_slice(&orientation.to_be_bytes());
    v.extend_from_slice(&[0, 0]); // value padding
    v.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_all_odd_kinds_present() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let spec = FixtureSpec { classes: 3, per_class: 2, seed: 7, odd_files: true, max_side: 400 };
        let fa = generate(a.path(), &spec).unwrap();
        let fb = generate(b.path(), &spec).unwrap();
        assert_eq!(fa.files.len(), 3 * 2 + OddKind::ALL.len());
        for f in &fa.files {
            let x = fs::read(fa.train_dir.join(&f.rel_path)).unwrap();
            let y = fs::read(fb.train_dir.join(&f.rel_path)).unwrap();
            assert_eq!(x, y, "{} differs between two runs with one seed", f.rel_path);
        }
        for kind in OddKind::ALL {
            assert!(fa.odd(kind).is_some(), "{kind} missing");
        }
        let other = tempfile::tempdir().unwrap();
        let fc = generate(other.path(), &FixtureSpec { seed: 8, ..spec }).unwrap();
        let first = &fc.files[0].rel_path;
        assert_ne!(
            fs::read(fa.train_dir.join(first)).unwrap(),
            fs::read(fc.train_dir.join(first)).unwrap(),
            "another seed must give other pixels"
        );
    }

    #[test]
    fn structured_set_is_deterministic_and_bounded() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spec = FixtureSpec { classes: 10, per_class: 1, seed: 3, odd_files: true, max_side: 120 };
        let fa = generate_structured(a.path(), &spec).unwrap();
        let fb = generate_structured(b.path(), &spec).unwrap();
        assert_eq!(fa.files.len(), 10 + OddKind::ALL.len());
        for f in &fa.files {
            let x = fs::read(fa.train_dir.join(&f.rel_path)).unwrap();
            assert_eq!(x, fs::read(fb.train_dir.join(&f.rel_path)).unwrap(), "{}", f.rel_path);
        }
        // Other pixels than the photo-like set of the same spec.
        let c = tempfile::tempdir().unwrap();
        let fc = generate(c.path(), &spec).unwrap();
        let first = &fa.files[0].rel_path;
        assert_ne!(fs::read(fa.train_dir.join(first)).unwrap(), fs::read(fc.train_dir.join(first)).unwrap());
        let err = generate_structured(c.path(), &FixtureSpec { classes: 11, ..spec }).unwrap_err();
        assert!(matches!(err, FixtureError::TooManyClasses { asked: 11, max: 10 }), "{err}");
    }

    #[test]
    fn odd_files_have_the_advertised_form() {
        let dir = tempfile::tempdir().unwrap();
        let spec = FixtureSpec { classes: 2, per_class: 1, seed: 1, odd_files: true, max_side: 300 };
        let fx = generate(dir.path(), &spec).unwrap();
        let read = |k| fs::read(fx.train_dir.join(&fx.odd(k).unwrap().rel_path)).unwrap();
        assert!(read(OddKind::Empty).is_empty());
        assert_eq!(&read(OddKind::PngNamedJpeg)[..4], b"\x89PNG");
        assert_eq!(&read(OddKind::Cmyk)[..2], [0xFF, 0xD8]);
        // progressive JPEGs carry an SOF2 marker
        assert!(read(OddKind::Progressive).windows(2).any(|w| w == [0xFF, 0xC2]));
        // restart markers RST0..RST7
        assert!(read(OddKind::RestartMarkers).windows(2).any(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1])));
        assert!(read(OddKind::ExifOrientation).windows(6).any(|w| w == b"Exif\0\0"));
        let truncated = read(OddKind::Truncated);
        assert_ne!(&truncated[truncated.len() - 2..], [0xFF, 0xD9], "truncated file must lack EOI");
    }
}
