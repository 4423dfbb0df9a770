//! One input file -> one shard sample, or a rejection with a reason.
//!
//! Outcomes (each hostile input has exactly one):
//! - baseline/progressive/restart-marker JPEG (RGB or grayscale): bytes kept untouched;
//! - CMYK/YCCK JPEG, non-JPEG images (PNG named .JPEG, GIF, BMP, TIFF, WebP): decoded, re-encoded
//!   as RGB baseline JPEG (`converted`);
//! - JPEG with an EXIF orientation other than 1: rotated upright and re-encoded (`converted`), as
//!   OpenCV's `imdecode` (the reference decoder, spec §1 step 1) would show it; Python readers of
//!   the shards (PIL ignores EXIF) then see the same pixels as we do;
//! - longer side over `--max-side`: resized (Lanczos3) and re-encoded (`resized`);
//! - empty, truncated, corrupt, unreadable, non-image, or outside any class folder: rejected.

use std::io::Read;

use cae_pipeline::decode::{self, DecodeError, Format, JpegInfo, RgbImage, orient};
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use serde::Serialize;

use crate::input::InputFile;

/// JPEG quality of re-encoded images (conversions and resizes).
pub const REENCODE_QUALITY: u8 = 95;

/// How thoroughly each input image is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Validate {
    /// Parse the JPEG headers and require an end-of-image marker near the end (fast, I/O bound).
    Header,
    /// Fully decode every image (strict: truncated or corrupt data is rejected).
    Decode,
}

/// Options that change what a file becomes.
#[derive(Debug, Clone, Copy)]
pub struct ProcessOptions {
    pub validate: Validate,
    pub max_side: Option<u32>,
    /// Input files larger than this are rejected from their size, before they are read.
    pub max_file_bytes: u64,
}

/// Default `--max-file-bytes`: the loader's default `data.max_member_bytes` (one constant,
/// [`cae_pipeline::wds::DEFAULT_MAX_MEMBER_BYTES`]), so nothing the sharder writes is skipped by
/// the loader.
pub const DEFAULT_MAX_FILE_BYTES: u64 = cae_pipeline::wds::DEFAULT_MAX_MEMBER_BYTES;

/// What was done to an accepted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Original bytes, untouched.
    Kept,
    /// Re-encoded as RGB baseline JPEG (CMYK, non-JPEG, EXIF orientation).
    Converted,
    /// Re-encoded smaller because the longer side exceeded `--max-side`.
    Resized,
}

/// The `key.json` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SampleMeta {
    /// Original path relative to the input folder.
    pub path: String,
    /// Class name.
    pub class: String,
    /// Stored image size.
    pub width: usize,
    pub height: usize,
    pub action: Action,
    /// Why it was converted/resized (absent when kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An accepted sample, ready to be written.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub key: String,
    pub class_index: usize,
    pub jpg: Vec<u8>,
    pub meta: SampleMeta,
}

impl Prepared {
    /// Bytes of the `.json` member.
    pub fn meta_json(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(&self.meta).unwrap_or_default()
    }
}

/// Result of processing one file.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sample(Box<Prepared>),
    Rejected { rel_path: String, reason: String },
}

/// Reads and checks one input file. `bytes_read` is increased by the size read.
pub fn process(file: &InputFile, opts: &ProcessOptions, bytes_read: &mut u64) -> Outcome {
    let reject = |reason: String| Outcome::Rejected { rel_path: file.rel_path.clone(), reason };
    let (Some(class), Some(class_index)) = (&file.class, file.class_index) else {
        return reject("not inside a class folder".into());
    };
    if let Some(problem) = &file.problem {
        return reject(problem.clone());
    }
    let max = opts.max_file_bytes;
    let mut bytes = Vec::new();
    let read = std::fs::File::open(&file.path).and_then(|f| {
        let len = f.metadata()?.len();
        if len > max {
            return Ok(Err(len));
        }
        // The file may grow after the stat: never read more than the cap allows.
        f.take(max.saturating_add(1)).read_to_end(&mut bytes).map(Ok)
    });
    match read {
        Ok(Ok(n)) if n as u64 > max => return reject(format!("grew past --max-file-bytes {max} while read")),
        Ok(Ok(n)) => *bytes_read += n as u64,
        Ok(Err(len)) => return reject(format!("{len} bytes, over --max-file-bytes {max}: not read")),
        Err(e) => return reject(format!("unreadable: {e}")),
    }
    let prepared = cae_pipeline::guard::catch_panic(|| prepare(bytes, opts))
        .unwrap_or_else(|what| Err(format!("processing panicked (a bug, please report it with this file): {what}")));
    match prepared {
        Ok((jpg, width, height, action, reason)) => Outcome::Sample(Box::new(Prepared {
            key: file.key.clone(),
            class_index,
            jpg,
            meta: SampleMeta { path: file.rel_path.clone(), class: class.clone(), width, height, action, reason },
        })),
        Err(reason) => reject(reason),
    }
}

type Prep = (Vec<u8>, usize, usize, Action, Option<String>);

fn prepare(bytes: Vec<u8>, opts: &ProcessOptions) -> Result<Prep, String> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty.to_string());
    }
    let format = Format::sniff(&bytes);
    match format {
        Format::Jpeg => prepare_jpeg(bytes, opts),
        Format::Unknown => Err("not an image (unrecognised file format)".into()),
        other => {
            let img = image::load_from_memory(&bytes).map_err(|e| format!("corrupt {other:?} image: {e}"))?;
            let rgb = img.to_rgb8();
            let img = RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, pixels: rgb.into_raw() };
            let reason = format!("{other:?} file converted to JPEG").to_lowercase();
            reencode(img, opts.max_side, Action::Converted, reason)
        }
    }
}

fn prepare_jpeg(bytes: Vec<u8>, opts: &ProcessOptions) -> Result<Prep, String> {
    let info: JpegInfo = decode::probe_jpeg(&bytes).map_err(|e| e.to_string())?;
    let mut reasons = Vec::new();
    if info.is_cmyk() {
        reasons.push("cmyk jpeg converted to rgb".to_string());
    }
    if info.orientation != 1 {
        reasons.push(format!("exif orientation {} applied", info.orientation));
    }
    let too_big = opts.max_side.is_some_and(|m| info.width.max(info.height) > m as usize);
    if reasons.is_empty() && !too_big {
        match opts.validate {
            Validate::Decode => {
                decode::decode_jpeg(&bytes, true).map_err(|e| e.to_string())?;
            }
            Validate::Header => {
                if !has_eoi_near_end(&bytes) {
                    return Err("corrupt JPEG: no end-of-image marker (truncated?)".into());
                }
            }
        }
        return Ok((bytes, info.width, info.height, Action::Kept, None));
    }
    let img = decode::decode_jpeg(&bytes, true).map_err(|e| e.to_string())?;
    let img = orient(img, info.orientation);
    let action = if reasons.is_empty() { Action::Resized } else { Action::Converted };
    reencode(img, opts.max_side, action, reasons.join("; "))
}

/// JPEG end-of-image marker in the last 64 KiB (real files sometimes carry trailing bytes).
fn has_eoi_near_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64 * 1024)..];
    tail.windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

fn reencode(img: RgbImage, max_side: Option<u32>, action: Action, reason: String) -> Result<Prep, String> {
    let (img, action, reason) = match max_side {
        Some(m) if img.width.max(img.height) > m as usize => {
            let note = format!("resized from {}x{} to fit {m}", img.width, img.height);
            let reason = if reason.is_empty() { note } else { format!("{reason}; {note}") };
            let action = if action == Action::Converted { action } else { Action::Resized };
            (resize_to_fit(&img, m)?, action, reason)
        }
        _ => (img, action, reason),
    };
    let mut out = Vec::with_capacity(img.pixels.len() / 8);
    let mut enc = Encoder::new(&mut out, REENCODE_QUALITY);
    enc.set_sampling_factor(SamplingFactor::R_4_2_0);
    let w = u16::try_from(img.width).map_err(|_| format!("width {} too large to encode", img.width))?;
    let h = u16::try_from(img.height).map_err(|_| format!("height {} too large to encode", img.height))?;
    enc.encode(&img.pixels, w, h, ColorType::Rgb).map_err(|e| format!("re-encoding failed: {e}"))?;
    Ok((out, img.width, img.height, action, Some(reason)))
}

/// Resizes so that the longer side is `max_side` (Lanczos3, aspect kept).
fn resize_to_fit(img: &RgbImage, max_side: u32) -> Result<RgbImage, String> {
    let long = img.width.max(img.height) as f64;
    let scale = max_side as f64 / long;
    let nw = ((img.width as f64 * scale).round() as u32).max(1);
    let nh = ((img.height as f64 * scale).round() as u32).max(1);
    let src = Image::from_vec_u8(img.width as u32, img.height as u32, img.pixels.clone(), PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut dst = Image::new(nw, nh, PixelType::U8x3);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)))
        .map_err(|e| format!("resize: {e}"))?;
    Ok(RgbImage { width: nw as usize, height: nh as usize, pixels: dst.into_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize) -> RgbImage {
        let pixels = (0..h).flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 0])).collect();
        RgbImage { width: w, height: h, pixels }
    }

    #[test]
    fn resize_keeps_aspect() {
        let r = resize_to_fit(&img(200, 100), 50).unwrap();
        assert_eq!((r.width, r.height), (50, 25));
        assert_eq!(r.pixels.len(), 50 * 25 * 3);
    }

    #[test]
    fn eoi_detection() {
        assert!(has_eoi_near_end(&[0xFF, 0xD8, 1, 2, 0xFF, 0xD9]));
        assert!(has_eoi_near_end(&[0xFF, 0xD8, 1, 2, 0xFF, 0xD9, 0, 0]));
        assert!(!has_eoi_near_end(&[0xFF, 0xD8, 1, 2, 3]));
    }
}
