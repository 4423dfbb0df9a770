//! EXIF orientation: reading the tag and turning decoded pixels upright.

use super::RgbImage;

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

/// Applies an EXIF orientation (1..=8) so the result is upright.
pub fn orient(img: RgbImage, orientation: u8) -> RgbImage {
    if !(2..=8).contains(&orientation) {
        return img;
    }
    let (w, h) = (img.width, img.height);
    let swap = orientation >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = vec![0u8; w * h * 3];
    for oy in 0..oh {
        for ox in 0..ow {
            // Source coordinates for output pixel (ox, oy).
            let (sx, sy) = match orientation {
                2 => (w - 1 - ox, oy),
                3 => (w - 1 - ox, h - 1 - oy),
                4 => (ox, h - 1 - oy),
                5 => (oy, ox),
                6 => (oy, h - 1 - ox),
                7 => (w - 1 - oy, h - 1 - ox),
                _ => (w - 1 - oy, ox), // 8
            };
            let s = (sy * w + sx) * 3;
            let d = (oy * ow + ox) * 3;
            out[d..d + 3].copy_from_slice(&img.pixels[s..s + 3]);
        }
    }
    RgbImage { width: ow, height: oh, pixels: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize) -> RgbImage {
        // pixel value encodes its position: (x, y, 0)
        let pixels = (0..h).flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 0])).collect();
        RgbImage { width: w, height: h, pixels }
    }
    fn at(i: &RgbImage, x: usize, y: usize) -> (u8, u8) {
        let p = (y * i.width + x) * 3;
        (i.pixels[p], i.pixels[p + 1])
    }

    #[test]
    fn orientation_6_rotates_clockwise() {
        // Orientation 6: the stored image must be rotated 90° clockwise to display upright.
        // Then the stored bottom-left pixel (0, h-1) lands at the displayed top-left.
        let i = img(3, 2);
        let o = orient(i, 6);
        assert_eq!((o.width, o.height), (2, 3));
        assert_eq!(at(&o, 0, 0), (0, 1));
        assert_eq!(at(&o, 1, 0), (0, 0));
        assert_eq!(at(&o, 0, 2), (2, 1));
    }

    #[test]
    fn orientations_3_and_8() {
        let o = orient(img(3, 2), 3);
        assert_eq!(at(&o, 0, 0), (2, 1));
        // 8: rotate 90° counter-clockwise: stored top-right (w-1, 0) goes to displayed top-left.
        let o = orient(img(3, 2), 8);
        assert_eq!((o.width, o.height), (2, 3));
        assert_eq!(at(&o, 0, 0), (2, 0));
        assert_eq!(at(&o, 1, 2), (0, 1));
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

    /// A JPEG stored sideways (EXIF orientation 6: turn 90 degrees clockwise to show) comes out
    /// of the loader's decode upright: the crop box is drawn on the upright size and the stored
    /// left half (red) is the top.
    #[test]
    fn the_loader_decode_applies_exif_orientation() {
        let (w, h) = (64usize, 32usize);
        let rgb: Vec<u8> = (0..w * h).flat_map(|i| if i % w < w / 2 { [220, 20, 20] } else { [20, 20, 220] }).collect();
        let tiff =
            [b"MM\0\x2a\0\0\0\x08".to_vec(), vec![0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]].concat();
        let mut jpg = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut jpg, 95);
        enc.add_exif_metadata(&tiff).unwrap();
        enc.encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();

        let mut out = RgbImage::default();
        let mut asked = None;
        let full = crate::decode::decode_jpeg_rows_capped(&jpg, true, 1 << 20, &mut out, |uw, uh| {
            asked = Some((uw, uh));
            1
        })
        .unwrap();
        assert_eq!(asked, Some((h, w)), "the crop box is drawn on the upright size");
        assert_eq!(full, (h, w));
        assert_eq!((out.width, out.height), (h, w));
        let px = |x: usize, y: usize| &out.pixels[(y * out.width + x) * 3..][..3];
        assert!(px(h / 2, 2)[0] > 150 && px(h / 2, 2)[2] < 100, "top is the stored left (red): {:?}", px(h / 2, 2));
        assert!(px(h / 2, w - 3)[2] > 150, "bottom is the stored right (blue): {:?}", px(h / 2, w - 3));

        let mut whole = RgbImage::default();
        crate::decode::decode_jpeg_upright_into(&jpg, true, 1 << 20, &mut whole).unwrap();
        assert_eq!(whole, out);
        let stored = crate::decode::decode_jpeg(&jpg, true).unwrap();
        assert_eq!((stored.width, stored.height), (w, h), "the plain decode keeps the stored pixels");
    }
}
