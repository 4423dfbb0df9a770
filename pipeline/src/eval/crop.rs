//! The test transform of spec §5: resize the shorter side to `resize` (bicubic, Pillow's
//! a = -0.5 kernel, antialiased), then centre-crop `crop` x `crop` — torchvision's `Resize(256)` +
//! `CenterCrop(224)` on a PIL image. An image whose shorter side already equals `resize` is not
//! resampled (torchvision returns it as it is).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::augment::hwc_to_chw;
use crate::decode::RgbImage;

/// Size after torchvision's `Resize(size)` with an int size: the shorter side becomes `size`,
/// the longer `int(size * long / short)` (truncated).
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height { (size, new_long) } else { (new_long, size) }
}

/// Top-left corner of torchvision's `CenterCrop(crop)`: `int(round((side - crop) / 2))` with
/// Python's round-half-to-even.
pub fn center_crop_origin(width: usize, height: usize, crop: usize) -> (usize, usize) {
    let off = |side: usize| ((side as f64 - crop as f64) / 2.0).round_ties_even() as usize;
    (off(width), off(height))
}

/// Per-worker resampling state.
pub struct CenterCropper {
    resizer: Resizer,
    resized: Image<'static>,
    crop: Vec<u8>,
    resize: usize,
    size: usize,
}

impl CenterCropper {
    pub fn new(resize: usize, crop: usize) -> Self {
        Self {
            resizer: Resizer::new(),
            resized: Image::new(1, 1, PixelType::U8x3),
            crop: Vec::new(),
            resize,
            size: crop,
        }
    }

    /// Side of the crop.
    pub fn crop_size(&self) -> usize {
        self.size
    }

    /// Resize + centre crop of `img`, written planar (CHW) into `out` (3·crop·crop).
    pub fn apply(&mut self, img: &RgbImage, out: &mut [u8]) -> Result<(), String> {
        let (nw, nh) = resized_size(img.width, img.height, self.resize);
        if nw < self.size || nh < self.size {
            return Err(format!(
                "{}x{} resized to {nw}x{nh} is smaller than the {} crop",
                img.width, img.height, self.size
            ));
        }
        let (src, sw): (&[u8], usize) = if (nw, nh) == (img.width, img.height) {
            (&img.pixels, img.width)
        } else {
            let from = ImageRef::new(img.width as u32, img.height as u32, &img.pixels, PixelType::U8x3)
                .map_err(|e| format!("source image: {e}"))?;
            if (self.resized.width() as usize, self.resized.height() as usize) != (nw, nh) {
                self.resized = Image::new(nw as u32, nh as u32, PixelType::U8x3);
            }
            let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
            self.resizer.resize(&from, &mut self.resized, &opts).map_err(|e| format!("resize: {e}"))?;
            (self.resized.buffer(), nw)
        };
        let (left, top) = center_crop_origin(nw, nh, self.size);
        let s = self.size;
        self.crop.clear();
        for row in src.chunks_exact(3 * sw).skip(top).take(s) {
            self.crop.extend_from_slice(&row[3 * left..3 * (left + s)]);
        }
        hwc_to_chw(&self.crop, s, false, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_follows_torchvision() {
        // int(256 * 500 / 375) = int(341.33) = 341; portrait keeps the width at 256.
        assert_eq!(resized_size(500, 375, 256), (341, 256));
        assert_eq!(resized_size(375, 500, 256), (256, 341));
        // int(256 * 333 / 250) = int(340.992) = 340 (truncated, not rounded).
        assert_eq!(resized_size(333, 250, 256), (340, 256));
        assert_eq!(resized_size(224, 224, 224), (224, 224));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        // (341 - 224) / 2 = 58.5 -> 58 (Python round), (256 - 224) / 2 = 16.
        assert_eq!(center_crop_origin(341, 256, 224), (58, 16));
        // (227 - 224) / 2 = 1.5 -> 2; (225 - 224) / 2 = 0.5 -> 0.
        assert_eq!(center_crop_origin(227, 225, 224), (2, 0));
    }

    fn gradient(w: usize, h: usize) -> RgbImage {
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                pixels.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8]);
            }
        }
        RgbImage { width: w, height: h, pixels }
    }

    #[test]
    fn an_image_of_the_crop_size_passes_unchanged() {
        let img = gradient(224, 224);
        let mut c = CenterCropper::new(224, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        let mut expect = vec![0u8; 3 * 224 * 224];
        hwc_to_chw(&img.pixels, 224, false, &mut expect);
        assert_eq!(out, expect);
    }

    #[test]
    fn no_resample_when_the_short_side_already_fits_only_a_crop() {
        // 300x256 with resize 256: no resampling, the crop is the middle 224x224 at (38, 16).
        let img = gradient(300, 256);
        let mut c = CenterCropper::new(256, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        let (y, x) = (5, 7);
        let src = 3 * ((16 + y) * 300 + 38 + x);
        assert_eq!(out[y * 224 + x], img.pixels[src]);
        assert_eq!(out[224 * 224 + y * 224 + x], img.pixels[src + 1]);
        assert_eq!(out[2 * 224 * 224 + y * 224 + x], img.pixels[src + 2]);
    }

    #[test]
    fn a_flat_image_stays_flat_after_resize_and_crop() {
        let img = RgbImage { width: 500, height: 375, pixels: [10u8, 120, 250].repeat(500 * 375) };
        let mut c = CenterCropper::new(256, 224);
        let mut out = vec![0u8; 3 * 224 * 224];
        c.apply(&img, &mut out).expect("crop");
        assert!(out[..224 * 224].iter().all(|&v| v == 10));
        assert!(out[224 * 224..2 * 224 * 224].iter().all(|&v| v == 120));
        assert!(out[2 * 224 * 224..].iter().all(|&v| v == 250));
    }
}
