//! JPEG probing and decoding with zune-jpeg into RGB u8 (HWC).
//!
//! Grayscale comes out as RGB (the channel repeated), CMYK/YCCK are converted by the decoder.
//! Dimensions are bounded ([`MAX_SIDE`]) so hostile headers cannot make us allocate gigabytes.

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Largest accepted image side (pixels). ImageNet's largest is under 5000.
pub const MAX_SIDE: usize = 16384;

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
    #[error("image is {width}x{height}, larger than the {max} px limit")]
    TooLarge { width: usize, height: usize, max: usize },
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
    check_jpeg(bytes)?;
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options(strict));
    dec.decode_headers().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let info = dec.info().ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        return Err(DecodeError::Corrupt(format!("image has size {w}x{h}")));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(DecodeError::TooLarge { width: w, height: h, max: MAX_SIDE });
    }
    let need = dec.output_buffer_size().ok_or_else(|| DecodeError::Corrupt("unknown output size".into()))?;
    if need != w * h * 3 {
        return Err(DecodeError::Buffer { have: w * h * 3, need });
    }
    out.pixels.resize(need, 0);
    dec.decode_into(&mut out.pixels).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    out.width = w;
    out.height = h;
    Ok(())
}

/// Reads the Orientation tag (0x0112) from a raw EXIF block (with or without the `Exif\0\0`
/// prefix). Returns `None` when absent or malformed.
pub fn exif_orientation(exif: &[u8]) -> Option<u8> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let big = match tiff.get(0..2)? {
        b"MM" => true,
        b"II" => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(o..o + 2)?.try_into().ok()?;
        Some(if big { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(o..o + 4)?.try_into().ok()?;
        Some(if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count.min(256) {
        let e = ifd + 2 + i * 12;
        if u16_at(e)? == 0x0112 {
            let v = u16_at(e + 8)?;
            return (1..=8).contains(&v).then_some(v as u8);
        }
    }
    None
}

#[cfg(test)]
mod tests {
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
    fn exif_orientation_both_endians() {
        let be =
            [b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec(), vec![0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]]
                .concat();
        assert_eq!(exif_orientation(&be), Some(6));
        let le =
            [b"II\x2a\0\x08\0\0\0".to_vec(), vec![1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]].concat();
        assert_eq!(exif_orientation(&le), Some(3));
        assert_eq!(exif_orientation(b"garbage"), None);
    }

    #[test]
    fn garbage_after_magic_is_an_error_not_a_panic() {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bytes.extend((0..2000u32).map(|i| (i * 7919 % 251) as u8));
        assert!(decode_jpeg(&bytes, true).is_err());
        // lenient mode must not panic either; whatever it returns is fine
        let _ = decode_jpeg(&bytes, false);
    }
}
