//! JPEG probing and decoding with zune-jpeg into RGB u8 (HWC).
//!
//! Grayscale comes out as RGB (the channel repeated), CMYK/YCCK are converted by the decoder.
//! Dimensions are bounded ([`MAX_SIDE`]) so hostile headers cannot make us allocate gigabytes.

use std::sync::atomic::{AtomicUsize, Ordering};

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::errors::DecodeErrors;
use zune_jpeg::{JpegDecoder, NeverCancel, SampleRatios};

mod orient;
pub use orient::{exif_orientation, orient};

/// Largest accepted image side (pixels). ImageNet's largest is under 5000.
pub const MAX_SIDE: usize = 16384;

/// Default cap on an image's total pixels (width x height), checked from the header before
/// anything is allocated: 100 MP (300 MB of RGB). ImageNet's largest is about 16 MP.
pub const DEFAULT_MAX_PIXELS: usize = 100_000_000;

/// Container formats recognised by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Bmp,
    Tiff,
    Webp,
    Unknown,
}

impl Format {
    /// Sniffs the format from the first bytes.
    pub fn sniff(bytes: &[u8]) -> Format {
        match bytes {
            [0xFF, 0xD8, 0xFF, ..] => Format::Jpeg,
            [0x89, b'P', b'N', b'G', ..] => Format::Png,
            [b'G', b'I', b'F', b'8', ..] => Format::Gif,
            [b'B', b'M', ..] => Format::Bmp,
            [b'I', b'I', 0x2A, 0x00, ..] | [b'M', b'M', 0x00, 0x2A, ..] => Format::Tiff,
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Format::Webp,
            _ => Format::Unknown,
        }
    }
}

/// Why an image could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty file")]
    Empty,
    #[error("not a JPEG (looks like {0:?})")]
    NotJpeg(Format),
    #[error("corrupt JPEG: {0}")]
    Corrupt(String),
    /// The header claims more pixels than allowed: refused before any allocation.
    #[error("image is {width}x{height}, over the limits ({max_side} px a side, {max_pixels} pixels)")]
    TooLarge { width: usize, height: usize, max_side: usize, max_pixels: usize },
    /// A PNG or WebP the `image` crate cannot read.
    #[error("corrupt {format:?}: {message}")]
    Other { format: Format, message: String },
    #[error("output buffer holds {have} bytes, {need} needed")]
    Buffer { have: usize, need: usize },
}

/// What the headers of a JPEG say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: usize,
    pub height: usize,
    /// Colour space stored in the file (YCbCr, Luma, CMYK, YCCK, ...).
    pub colorspace: ColorSpace,
    pub progressive: bool,
    /// EXIF orientation tag (1..=8), 1 when absent.
    pub orientation: u8,
}

impl JpegInfo {
    /// Stored as 4-channel CMYK or YCCK.
    pub fn is_cmyk(&self) -> bool {
        matches!(self.colorspace, ColorSpace::CMYK | ColorSpace::YCCK)
    }
    /// Stored as one channel.
    pub fn is_grayscale(&self) -> bool {
        matches!(self.colorspace, ColorSpace::Luma)
    }
}

fn options(strict: bool) -> DecoderOptions {
    DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .set_strict_mode(strict)
}

fn check_jpeg(bytes: &[u8]) -> Result<(), DecodeError> {
    match Format::sniff(bytes) {
        _ if bytes.is_empty() => Err(DecodeError::Empty),
        Format::Jpeg => Ok(()),
        other => Err(DecodeError::NotJpeg(other)),
    }
}

/// Reads the JPEG headers only (fast: no entropy decoding).
pub fn probe_jpeg(bytes: &[u8]) -> Result<JpegInfo, DecodeError> {
    check_jpeg(bytes)?;
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options(true));
    dec.decode_headers().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let info = dec.info().ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    let colorspace = dec.input_colorspace().unwrap_or(ColorSpace::Unknown);
    let orientation = dec.exif().and_then(|e| exif_orientation(e)).unwrap_or(1);
    Ok(JpegInfo {
        width: info.width as usize,
        height: info.height as usize,
        colorspace,
        progressive: info.sof.is_progressive(),
        orientation,
    })
}

/// A decoded RGB image, HWC u8.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes a JPEG into RGB. `strict` rejects non-conforming streams (truncated data, bad
/// markers) instead of filling in gray; the sharder validates strictly, the loader does too.
pub fn decode_jpeg(bytes: &[u8], strict: bool) -> Result<RgbImage, DecodeError> {
    let mut img = RgbImage::default();
    decode_jpeg_into(bytes, strict, &mut img)?;
    Ok(img)
}

/// Decodes into a reused image buffer (grown when needed, never shrunk).
pub fn decode_jpeg_into(bytes: &[u8], strict: bool, out: &mut RgbImage) -> Result<(), DecodeError> {
    let (mut dec, w, h) = start(bytes, strict, DEFAULT_MAX_PIXELS, out)?;
    dec.decode_into(&mut out.pixels).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    (out.width, out.height) = (w, h);
    Ok(())
}

/// Decodes only the top of a JPEG: `rows_for(width, height)`, called once when the headers are
/// read, says how many rows from the top the caller needs (the training crop box's bottom edge),
/// and decoding stops soon after them instead of running to the last row. On return `out` holds
/// the rows decoded (`out.height`: at least the rows asked for, at most the full height); the
/// full size is returned. Entropy decoding is sequential, so rows above the box are decoded too.
///
/// Stopping uses zune-jpeg's cooperative cancellation, which is polled before every MCU row
/// (twice per row in 0.5.16, at interval 1). The decode stops one MCU row past the rows asked for,
/// so that rows whose chroma upsampling needs the next MCU row are finished; the result is then
/// checked with `decoded_scanlines`, and if fewer rows are complete than asked (a decoder whose
/// polling differs), the decode resumes to the end. Progressive images are decoded whole (their
/// rows exist only after the last scan).
///
/// An EXIF orientation other than 1 is applied: `rows_for` gets the upright size, the image is
/// decoded whole and turned, and the upright size is returned (third-party shards; ours are
/// stored upright).
///
/// Unlike [`decode_jpeg_into`], corruption below the rows decoded goes unnoticed;
/// `sharder build` and `sharder verify` decode every image whole.
pub fn decode_jpeg_rows_into(
    bytes: &[u8],
    strict: bool,
    out: &mut RgbImage,
    rows_for: impl FnOnce(usize, usize) -> usize,
) -> Result<(usize, usize), DecodeError> {
    decode_jpeg_rows_capped(bytes, strict, DEFAULT_MAX_PIXELS, out, rows_for)
}

/// [`decode_jpeg_rows_into`] with a cap on the image's total pixels: a header claiming more
/// than `max_pixels` is [`DecodeError::TooLarge`] before `out` is touched (a 166-byte file whose
/// header says 16384x16384 would otherwise cost 805 MiB).
pub fn decode_jpeg_rows_capped(
    bytes: &[u8],
    strict: bool,
    max_pixels: usize,
    out: &mut RgbImage,
    rows_for: impl FnOnce(usize, usize) -> usize,
) -> Result<(usize, usize), DecodeError> {
    decode_rows_with(bytes, strict, max_pixels, out, rows_for, POLLS_PER_MCU_ROW).map(|(w, h, _resumed)| (w, h))
}

/// Decodes a whole JPEG, turned upright by its EXIF orientation, with the pixel cap of
/// [`decode_jpeg_rows_capped`] (which also applies the orientation). For readers that want the
/// picture as shown (evaluation, features); the sharder keeps stored pixels and orients itself.
pub fn decode_jpeg_upright_into(
    bytes: &[u8],
    strict: bool,
    max_pixels: usize,
    out: &mut RgbImage,
) -> Result<(), DecodeError> {
    decode_rows_with(bytes, strict, max_pixels, out, |_, h| h, POLLS_PER_MCU_ROW).map(|_| ())
}

/// Checks a size read from a header against [`MAX_SIDE`] and `max_pixels`.
pub fn check_size(width: usize, height: usize, max_pixels: usize) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!("image has size {width}x{height}")));
    }
    if width > MAX_SIDE || height > MAX_SIDE || width.saturating_mul(height) > max_pixels {
        return Err(DecodeError::TooLarge { width, height, max_side: MAX_SIDE, max_pixels });
    }
    Ok(())
}

/// Decodes a PNG, WebP, GIF, BMP or TIFF (the `image` crate) whole into `out` as RGB, after
/// checking the size its header claims against `max_pixels` (nothing is allocated for a refused
/// image); a JPEG goes to [`decode_jpeg_upright_into`] with the same cap. `format` is the
/// member's, from [`Format::sniff`] (or its extension when the bytes say nothing).
pub fn decode_other_into(
    bytes: &[u8],
    format: Format,
    max_pixels: usize,
    out: &mut RgbImage,
) -> Result<(), DecodeError> {
    let fmt = match format {
        Format::Png => image::ImageFormat::Png,
        Format::Webp => image::ImageFormat::WebP,
        Format::Gif => image::ImageFormat::Gif,
        Format::Bmp => image::ImageFormat::Bmp,
        Format::Tiff => image::ImageFormat::Tiff,
        Format::Jpeg => return decode_jpeg_upright_into(bytes, true, max_pixels, out),
        Format::Unknown => {
            return Err(DecodeError::Other { format, message: "not an image format this reader knows".into() });
        }
    };
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let err = |e: image::ImageError| DecodeError::Other { format, message: e.to_string() };
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), fmt);
    let (w, h) = reader().into_dimensions().map_err(err)?;
    check_size(w as usize, h as usize, max_pixels)?;
    let mut r = reader();
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA at 16 bits a channel is the largest buffer the decoder may need, plus the RGB copy.
    limits.max_alloc = Some((w as u64 * h as u64).saturating_mul(8 + 3).max(1 << 20));
    r.limits(limits);
    let img = r.decode().map_err(err)?.into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    out.pixels.clear();
    out.pixels.extend_from_slice(img.as_raw());
    (out.width, out.height) = (w, h);
    Ok(())
}

/// How many times zune-jpeg 0.5.16 polls the cancel check per MCU row of a sequential image.
const POLLS_PER_MCU_ROW: usize = 2;

fn decode_rows_with(
    bytes: &[u8],
    strict: bool,
    max_pixels: usize,
    out: &mut RgbImage,
    rows_for: impl FnOnce(usize, usize) -> usize,
    polls_per_row: usize,
) -> Result<(usize, usize, bool), DecodeError> {
    let (mut dec, w, h) = start(bytes, strict, max_pixels, out)?;
    let corrupt = |e: DecodeErrors| DecodeError::Corrupt(e.to_string());
    let orientation = dec.exif().and_then(|e| exif_orientation(e)).unwrap_or(1);
    if orientation != 1 {
        // EXIF-rotated (third-party shards; ours are stored upright): the caller's rows are
        // rows of the upright image, so decode whole and turn it.
        let (uw, uh) = if orientation >= 5 { (h, w) } else { (w, h) };
        rows_for(uw, uh);
        dec.decode_into(&mut out.pixels).map_err(corrupt)?;
        (out.width, out.height) = (w, h);
        *out = orient(std::mem::take(out), orientation);
        return Ok((uw, uh, false));
    }
    let want = rows_for(w, h).min(h);
    let info = dec.info().ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    // One-component images decode in 8-row MCUs whatever their sampling factors say.
    let mcu_rows = 8 * match info.sample_ratio {
        _ if info.components == 1 => 1,
        SampleRatios::HV | SampleRatios::V => 2,
        SampleRatios::Generic(_, v) => v.max(1),
        SampleRatios::H | SampleRatios::None => 1,
    };
    let (mut rows, mut resumed) = (h, false);
    if info.sof.is_sequential_dct() && want + mcu_rows < h {
        let polls = AtomicUsize::new(0);
        dec.set_cancel(move || polls.fetch_add(1, Ordering::Relaxed) / polls_per_row * mcu_rows >= want + mcu_rows);
        dec.set_cancel_interval(1);
        match dec.decode_into(&mut out.pixels) {
            Ok(()) => {}
            Err(DecodeErrors::Cancelled) => {
                let stable = dec.decoded_scanlines().unwrap_or(0).min(h);
                if stable >= want {
                    rows = stable;
                } else {
                    dec.set_cancel(NeverCancel);
                    dec.decode_into(&mut out.pixels).map_err(corrupt)?;
                    resumed = true;
                }
            }
            Err(e) => return Err(corrupt(e)),
        }
    } else {
        dec.decode_into(&mut out.pixels).map_err(corrupt)?;
    }
    out.pixels.truncate(w * rows * 3);
    (out.width, out.height) = (w, rows);
    Ok((w, h, resumed))
}

type Decoder<'a> = JpegDecoder<ZCursor<&'a [u8]>>;

/// Reads and checks the headers (size against [`MAX_SIDE`] and `max_pixels`) and only then
/// sizes `out.pixels` for the whole image.
fn start<'a>(
    bytes: &'a [u8],
    strict: bool,
    max_pixels: usize,
    out: &mut RgbImage,
) -> Result<(Decoder<'a>, usize, usize), DecodeError> {
    check_jpeg(bytes)?;
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options(strict));
    dec.decode_headers().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let info = dec.info().ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    check_size(w, h, max_pixels)?;
    let need = dec.output_buffer_size().ok_or_else(|| DecodeError::Corrupt("unknown output size".into()))?;
    if need != w * h * 3 {
        return Err(DecodeError::Buffer { have: w * h * 3, need });
    }
    out.pixels.resize(need, 0);
    Ok((dec, w, h))
}

#[cfg(test)]
mod tests {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

    use super::*;

    #[test]
    fn sniffs_formats() {
        assert_eq!(Format::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Format::Jpeg);
        assert_eq!(Format::sniff(b"\x89PNG\r\n"), Format::Png);
        assert_eq!(Format::sniff(b"<html>"), Format::Unknown);
        assert_eq!(decode_jpeg(b"", true), Err(DecodeError::Empty));
        assert_eq!(decode_jpeg(b"\x89PNG\r\n\x1a\n", true), Err(DecodeError::NotJpeg(Format::Png)));
    }

    #[test]
    fn garbage_after_magic_is_an_error_not_a_panic() {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bytes.extend((0..2000u32).map(|i| (i * 7919 % 251) as u8));
        assert!(decode_jpeg(&bytes, true).is_err());
        // lenient mode must not panic either; whatever it returns is fine
        let _ = decode_jpeg(&bytes, false);
    }

    /// A smooth photo-like RGB image with detail in every row (no flat MCU rows).
    fn photo(w: usize, h: usize) -> Vec<u8> {
        let mut px = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f64, y as f64);
                px.push((128.0 + 100.0 * (fx / 9.0).sin() * (fy / 13.0).cos()) as u8);
                px.push(((x * 3 + y * 5) % 256) as u8);
                px.push((128.0 + 90.0 * ((fx + fy) / 7.0).sin()) as u8);
            }
        }
        px
    }

    fn encode(w: usize, h: usize, sampling: SamplingFactor, progressive: bool, gray: bool) -> Vec<u8> {
        encode_with(w, h, sampling, progressive, gray, 0)
    }

    fn encode_with(
        w: usize,
        h: usize,
        sampling: SamplingFactor,
        progressive: bool,
        gray: bool,
        restart: u16,
    ) -> Vec<u8> {
        let rgb = photo(w, h);
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, 92);
        enc.set_sampling_factor(sampling);
        enc.set_progressive(progressive);
        if restart > 0 {
            enc.set_restart_interval(restart);
        }
        if gray {
            let luma: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
            enc.encode(&luma, w as u16, h as u16, ColorType::Luma).expect("encode");
        } else {
            enc.encode(&rgb, w as u16, h as u16, ColorType::Rgb).expect("encode");
        }
        out
    }

    #[test]
    fn top_rows_decode_stops_early_and_matches_a_full_decode() {
        let (w, h) = (203, 301);
        for (sampling, gray) in [
            (SamplingFactor::F_1_1, false),
            (SamplingFactor::F_2_2, false),
            (SamplingFactor::F_2_1, false),
            (SamplingFactor::F_1_1, true),
        ] {
            let jpg = encode(w, h, sampling, false, gray);
            let full = decode_jpeg(&jpg, true).expect("full decode");
            for want in [0, 1, 17, 100, 250, 268, 285, 300, 301, 999] {
                let mut out = RgbImage::default();
                let size = decode_jpeg_rows_into(&jpg, true, &mut out, |a, b| {
                    assert_eq!((a, b), (w, h));
                    want
                })
                .expect("rows decode");
                let case = format!("{sampling:?} gray {gray}, {want} rows asked");
                assert_eq!(size, (w, h), "{case}");
                assert!(out.height >= want.min(h) && out.height <= h, "{case}: {} rows decoded", out.height);
                assert_eq!(out.width, w);
                assert_eq!(out.pixels.len(), w * out.height * 3, "{case}");
                assert!(out.pixels == full.pixels[..out.pixels.len()], "{case}: rows differ from a full decode");
                if want + 48 <= h {
                    assert!(out.height < h, "{case}: decoded every row");
                }
            }
        }
    }

    /// Regression: a header claiming 16384x16384 (within `MAX_SIDE`) made the decoder allocate
    /// 805 MiB before finding out the data was missing. The pixel cap refuses it from the header.
    #[test]
    fn the_pixel_cap_refuses_before_allocating() {
        let mut b = encode(16, 16, SamplingFactor::F_1_1, false, false);
        let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).expect("SOF0");
        b[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0x40, 0x00]); // 16384 x 16384
        let mut out = RgbImage::default();
        let e = decode_jpeg_rows_into(&b, true, &mut out, |_, h| h).expect_err("refused");
        assert!(matches!(e, DecodeError::TooLarge { width: 16384, height: 16384, .. }), "{e}");
        assert_eq!(out.pixels.capacity(), 0, "nothing allocated");
        let ok = encode(64, 48, SamplingFactor::F_1_1, false, false);
        assert!(decode_jpeg_rows_capped(&ok, true, 64 * 48 - 1, &mut out, |_, h| h).is_err());
        assert_eq!(decode_jpeg_rows_capped(&ok, true, 64 * 48, &mut out, |_, h| h), Ok((64, 48)));
    }

    #[test]
    fn stopping_too_early_resumes_to_the_end() {
        // One poll per MCU row assumed where the decoder makes two: the stop comes at about half
        // the rows asked for, too early, so the decode must resume and finish the image.
        let (w, h) = (160, 240);
        let jpg = encode(w, h, SamplingFactor::F_2_2, false, false);
        let full = decode_jpeg(&jpg, true).expect("full decode");
        let mut out = RgbImage::default();
        let (_, _, resumed) =
            decode_rows_with(&jpg, true, DEFAULT_MAX_PIXELS, &mut out, |_, _| 200, 1).expect("decode");
        assert!(resumed, "expected the early stop to fall short of 200 rows");
        assert_eq!(out.height, h);
        assert!(out.pixels == full.pixels);
    }

    #[test]
    fn progressive_images_are_decoded_whole() {
        let jpg = encode(96, 200, SamplingFactor::F_2_2, true, false);
        let full = decode_jpeg(&jpg, true).expect("full decode");
        let mut out = RgbImage::default();
        decode_jpeg_rows_into(&jpg, true, &mut out, |_, _| 20).expect("decode");
        assert_eq!(out.height, 200);
        assert!(out.pixels == full.pixels);
    }

    #[test]
    fn truncated_input_fails_only_where_its_rows_are_needed() {
        let (w, h) = (128, 512);
        let mut jpg = encode(w, h, SamplingFactor::F_1_1, false, false);
        jpg.truncate(jpg.len() * 3 / 4);
        assert!(decode_jpeg(&jpg, true).is_err(), "strict full decode must reject truncation");
        let mut out = RgbImage::default();
        assert!(decode_jpeg_rows_into(&jpg, true, &mut out, |_, h| h).is_err());
        // the top rows come before the cut: decoded, and no error (documented trade-off)
        let mut top = RgbImage::default();
        decode_jpeg_rows_into(&jpg, true, &mut top, |_, _| 64).expect("top rows are intact");
        assert!(top.height >= 64 && top.height < h);
    }

    /// Mutation fuzzing of every decode entry point: flipped bits, overwritten runs, cuts,
    /// splices and stray markers in JPEGs of every layout the loader meets. Whatever the bytes,
    /// decoding returns a value or an error, never panics, and a success upholds the size
    /// contract. `CAE_DECODE_FUZZ_CASES` raises the count for a long local run (in release).
    #[test]
    fn mutated_jpegs_never_panic_and_keep_the_size_contract() {
        let cases = crate::fuzz::cases("CAE_DECODE_FUZZ_CASES", 1500);
        let mut seeds = vec![
            encode_with(67, 93, SamplingFactor::F_1_1, false, false, 0),
            encode_with(80, 61, SamplingFactor::F_2_2, false, false, 0),
            encode_with(53, 70, SamplingFactor::F_2_1, false, false, 3),
            encode_with(64, 90, SamplingFactor::F_1_1, false, true, 0),
            encode_with(72, 56, SamplingFactor::F_2_2, true, false, 0),
            encode_with(40, 120, SamplingFactor::F_1_2, false, false, 2),
        ];
        // A long local run can add real files as seeds (camera JPEGs: EXIF, ICC, other tables).
        seeds.extend(crate::fuzz::seed_files("CAE_DECODE_FUZZ_DIR", "jpg"));
        let mut rng = crate::fuzz::Xorshift::new(0x2545_F491_4F6C_DD1D);
        let mut rnd = move |n: usize| rng.next(n);
        const MARKERS: [u8; 9] = [0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xD0];
        let mut failures = Vec::new();
        let mut img = RgbImage::default();
        for case in 0..cases {
            let base = &seeds[case % seeds.len()];
            let mut b = base.clone();
            for _ in 0..1 + rnd(4) {
                let i = rnd(b.len());
                match rnd(6) {
                    0 => b[i] ^= 1 << rnd(8),
                    1 => b[i] = rnd(256) as u8,
                    2 => {
                        let n = rnd(64).min(b.len() - i);
                        let v = [0x00, 0xFF][rnd(2)];
                        b[i..i + n].fill(v);
                    }
                    3 => b.truncate(i.max(3)),
                    4 => {
                        let (j, n) = (rnd(base.len()), 1 + rnd(48));
                        let chunk = base[j..(j + n).min(base.len())].to_vec();
                        b.splice(i..i, chunk);
                    }
                    _ => {
                        b.splice(i..i, [0xFF, MARKERS[rnd(MARKERS.len())]]);
                    }
                }
            }
            let want = rnd(130);
            let strict = rnd(2) == 0;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = probe_jpeg(&b);
                let _ = decode_jpeg(&b, strict);
                match decode_jpeg_rows_into(&b, strict, &mut img, |_, _| want) {
                    Ok((w, h)) => {
                        assert_eq!(img.width, w);
                        assert!(
                            img.height >= want.min(h) && img.height <= h,
                            "{} rows of {h}, {want} asked",
                            img.height
                        );
                        assert_eq!(img.pixels.len(), w * img.height * 3);
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }));
            if run.is_err() {
                failures.push((case, b));
            }
        }
        crate::fuzz::report(&failures, cases, "decode-fuzz", "jpg");
    }
}
