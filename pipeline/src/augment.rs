//! The CAE two-view augmentation, spec §1 steps 2-3: horizontal flip (p = 0.5) of the whole
//! image, ONE RandomResizedCrop box shared by both views, view 1 resized to 224x224 bicubic
//! (Pillow's a = -0.5 kernel = Catmull-Rom, antialiased when downscaling), view 2 to 112x112
//! Lanczos3.
//!
//! The flip is never applied to the full image: a box drawn on the flipped image is the mirrored
//! box on the original (`left' = W - left - w`), and resampling with symmetric kernels commutes
//! with mirroring, so we resize the mirrored box of the original and mirror the small output.
//! Only the crop region is resampled (a cropped view of the decoded image, no copy).

use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{Filter, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::decode::RgbImage;
use crate::mask::{py_round, uniform};

/// Augmentation parameters (spec §1; sizes and ranges are config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Side of view 1 (the encoder's input).
    pub view_size: usize,
    /// Side of view 2 (the tokenizer's input).
    pub token_size: usize,
    /// RandomResizedCrop area fraction range.
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect (w/h) range.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { view_size: 224, token_size: 112, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0), flip_prob: 0.5 }
    }
}

/// Why an augmentation configuration cannot work (the message names the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("augment config: {0}")]
pub struct AugmentConfigError(pub String);

impl AugmentConfig {
    /// Rejects values the crop sampler cannot use: sizes of 0, NaN/infinite or non-positive
    /// ranges, reversed ranges, a crop scale above 1 (a box larger than the image never fits, so
    /// every sample would fall back to the centre crop) and a flip probability outside 0..=1.
    pub fn validate(&self) -> Result<(), AugmentConfigError> {
        let err = |m: String| Err(AugmentConfigError(m));
        if self.view_size == 0 || self.token_size == 0 {
            return err(format!(
                "augment.view_size {} and augment.token_size {} must be at least 1",
                self.view_size, self.token_size
            ));
        }
        let (lo, hi) = self.scale;
        // Written as negations so that NaN (false in every comparison) is rejected too.
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi && hi <= 1.0) {
            return err(format!("augment.scale ({lo}, {hi}) must satisfy 0 < min <= max <= 1"));
        }
        let (lo, hi) = self.ratio;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
            return err(format!("augment.ratio ({lo}, {hi}) must be finite with 0 < min <= max"));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return err(format!("augment.flip_prob {} must be in 0..=1", self.flip_prob));
        }
        Ok(())
    }
}

/// A crop box in pixel coordinates of the image it was drawn on: `top`, `left`, `height`, `width`
/// (torchvision's i, j, h, w).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// RandomResizedCrop's box, spec §1 step 3 (torchvision/BEiT `get_params`): 10 attempts, then
/// the centre fallback. Python rounding (half to even) as in the reference.
pub fn crop_box(width: usize, height: usize, cfg: &AugmentConfig, rng: &mut impl Rng) -> CropBox {
    let (w_img, h_img) = (width as f64, height as f64);
    let area = w_img * h_img;
    let (log_lo, log_hi) = (cfg.ratio.0.ln(), cfg.ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, cfg.scale.0, cfg.scale.1);
        let ar = uniform(rng, log_lo, log_hi).exp();
        let w = py_round((target * ar).sqrt());
        let h = py_round((target / ar).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox { top, left, height: h, width: w };
        }
    }
    fallback_box(width, height, cfg)
}

/// The centre crop used after 10 failed attempts.
pub fn fallback_box(width: usize, height: usize, cfg: &AugmentConfig) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < cfg.ratio.0 {
        (width, (py_round(width as f64 / cfg.ratio.0) as usize).clamp(1, height))
    } else if in_ratio > cfg.ratio.1 {
        ((py_round(height as f64 * cfg.ratio.1) as usize).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// The random choices for one sample, drawn in this order: flip, box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TwoViewParams {
    pub flip: bool,
    /// Box on the (possibly flipped) image, as the reference draws it.
    pub crop: CropBox,
}

impl TwoViewParams {
    pub fn draw(width: usize, height: usize, cfg: &AugmentConfig, rng: &mut impl Rng) -> Self {
        let flip = rng.random::<f64>() < cfg.flip_prob;
        let crop = crop_box(width, height, cfg, rng);
        Self { flip, crop }
    }

    /// The same region on the unflipped original.
    pub fn source_box(&self, width: usize) -> CropBox {
        let mut b = self.crop;
        if self.flip {
            b.left = width - b.left - b.width;
        }
        b
    }
}

/// Per-worker resampling state: the resizer and destination images are reused for every sample.
pub struct TwoViewResizer {
    resizer: Resizer,
    view: Image<'static>,
    token: Image<'static>,
    token_filter: FilterType,
    cfg: AugmentConfig,
}

/// Lanczos3, `sinc(x)·sinc(x/3)` on |x| < 3, with one `sin` instead of two: for `t = πx/3` and
/// `s = sin t`, `sin πx = sin 3t = s(3 − 4s²)`, so the product is `3s²(3 − 4s²)/(πx)²`.
/// fast_image_resize recomputes its kernel weights on every resize, and for the 112 view (a
/// ~21-tap window per output pixel when downscaling 3x) its two-`sin` Lanczos3 was ~30% of the
/// resize.
fn lanczos3(x: f64) -> f64 {
    use std::f64::consts::PI;
    if x == 0.0 {
        return 1.0;
    }
    if !(-3.0..3.0).contains(&x) {
        return 0.0;
    }
    let s = (x * (PI / 3.0)).sin();
    let px = PI * x;
    3.0 * s * s * (3.0 - 4.0 * s * s) / (px * px)
}

impl TwoViewResizer {
    pub fn new(cfg: &AugmentConfig) -> Self {
        let v = cfg.view_size as u32;
        let t = cfg.token_size as u32;
        Self {
            resizer: Resizer::new(),
            view: Image::new(v, v, PixelType::U8x3),
            token: Image::new(t, t, PixelType::U8x3),
            token_filter: Filter::new("Lanczos3", lanczos3, 3.0).map_or(FilterType::Lanczos3, FilterType::Custom),
            cfg: cfg.clone(),
        }
    }

    /// Resizes the crop region of `img` into both views and writes them planar (CHW, u8) into
    /// `view_out` (3·S·S) and `token_out` (3·T·T), mirrored when `p.flip`.
    pub fn apply(
        &mut self,
        img: &RgbImage,
        p: &TwoViewParams,
        view_out: &mut [u8],
        token_out: &mut [u8],
    ) -> Result<(), String> {
        let b = p.source_box(img.width);
        let src = ImageRef::new(img.width as u32, img.height as u32, &img.pixels, PixelType::U8x3)
            .map_err(|e| format!("source image: {e}"))?;
        // A cropped view (no copy) whose edges are the crop's edges: the kernels clamp there, as
        // torchvision's crop-then-resize does, instead of reading pixels outside the box.
        let region = CroppedImage::new(&src, b.left as u32, b.top as u32, b.width as u32, b.height as u32)
            .map_err(|e| format!("crop box {b:?}: {e}"))?;
        let alg = |f| ResizeOptions::new().resize_alg(ResizeAlg::Convolution(f));
        self.resizer
            .resize(&region, &mut self.view, &alg(FilterType::CatmullRom))
            .map_err(|e| format!("resize: {e}"))?;
        self.resizer.resize(&region, &mut self.token, &alg(self.token_filter)).map_err(|e| format!("resize: {e}"))?;
        hwc_to_chw(self.view.buffer(), self.cfg.view_size, p.flip, view_out);
        hwc_to_chw(self.token.buffer(), self.cfg.token_size, p.flip, token_out);
        Ok(())
    }
}

/// Interleaved RGB (S·S·3) -> planar (3·S·S), optionally mirrored left-right.
pub fn hwc_to_chw(src: &[u8], side: usize, flip: bool, dst: &mut [u8]) {
    let plane = side * side;
    let (r, rest) = dst[..3 * plane].split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    #[cfg(target_arch = "x86_64")]
    let ssse3 = std::arch::is_x86_feature_detected!("ssse3");
    let planes = r.chunks_exact_mut(side).zip(g.chunks_exact_mut(side)).zip(b.chunks_exact_mut(side));
    for (row, ((r, g), b)) in src[..3 * plane].chunks_exact(3 * side).zip(planes) {
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if ssse3 {
            // SAFETY: the CPU has SSSE3 (checked above).
            done = unsafe { simd::deinterleave_row_ssse3(row, flip, r, g, b) };
        }
        deinterleave_row_scalar(row, flip, done, r, g, b);
    }
}

/// One row of RGB triples into three planes from pixel `start` on (the SIMD path leaves the
/// last `side % 16` pixels to this); mirrored writes column `x` to `side - 1 - x`.
fn deinterleave_row_scalar(src: &[u8], flip: bool, start: usize, r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let n = r.len();
    for (x, p) in src.chunks_exact(3).enumerate().skip(start) {
        let d = if flip { n - 1 - x } else { x };
        r[d] = p[0];
        g[d] = p[1];
        b[d] = p[2];
    }
}

/// Byte-shuffle deinterleaving: 16 RGB pixels (three 16-byte loads) per step. The baseline
/// x86-64 target has no byte shuffle, so without this the compiler moves one byte at a time
/// (~70 µs per 224x224 view, against ~12 µs here).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_or_si128, _mm_setr_epi8, _mm_shuffle_epi8, _mm_storeu_si128,
    };

    /// `pshufb` mask taking source bytes `first, first + 3, ...` into lanes `lo..hi`; -1 zeroes.
    #[target_feature(enable = "ssse3")]
    fn gather(first: i8, lo: usize, hi: usize) -> __m128i {
        let mut m = [-1i8; 16];
        for (k, lane) in (lo..hi).enumerate() {
            m[lane] = first + 3 * k as i8;
        }
        _mm_setr_epi8(
            m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], m[12], m[13], m[14], m[15],
        )
    }

    /// Converts whole blocks of 16 pixels and returns how many pixels it wrote.
    #[target_feature(enable = "ssse3")]
    pub(super) fn deinterleave_row_ssse3(src: &[u8], flip: bool, r: &mut [u8], g: &mut [u8], b: &mut [u8]) -> usize {
        let n = r.len().min(g.len()).min(b.len()).min(src.len() / 3);
        let blocks = n / 16;
        // Channel c of pixel i sits at byte 3i + c of the 48: lanes 0..6 come from the first
        // load, 6..11 from the second, 11..16 from the third (shifted by one per channel).
        let (r0, r1, r2) = (gather(0, 0, 6), gather(2, 6, 11), gather(1, 11, 16));
        let (g0, g1, g2) = (gather(1, 0, 5), gather(0, 5, 11), gather(2, 11, 16));
        let (b0, b1, b2) = (gather(2, 0, 5), gather(1, 5, 10), gather(0, 10, 16));
        let reverse = _mm_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for k in 0..blocks {
            let s = &src[48 * k..48 * k + 48];
            // SAFETY: `s` holds 48 bytes, so the three unaligned 16-byte loads stay inside it.
            let (a, bb, c) = unsafe {
                (
                    _mm_loadu_si128(s.as_ptr().cast()),
                    _mm_loadu_si128(s.as_ptr().add(16).cast()),
                    _mm_loadu_si128(s.as_ptr().add(32).cast()),
                )
            };
            let pick = |m0, m1, m2| {
                let v = _mm_or_si128(
                    _mm_or_si128(_mm_shuffle_epi8(a, m0), _mm_shuffle_epi8(bb, m1)),
                    _mm_shuffle_epi8(c, m2),
                );
                if flip { _mm_shuffle_epi8(v, reverse) } else { v }
            };
            let at = if flip { n - 16 * (k + 1) } else { 16 * k };
            for (plane, v) in [(&mut *r, pick(r0, r1, r2)), (&mut *g, pick(g0, g1, g2)), (&mut *b, pick(b0, b1, b2))] {
                let d = &mut plane[at..at + 16];
                // SAFETY: `d` holds 16 bytes.
                unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), v) };
            }
        }
        16 * blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn planar_conversion_matches_the_per_pixel_definition() {
        // Sides with and without a 16-pixel remainder, both directions.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for side in [1usize, 7, 16, 23, 112, 224] {
            let src: Vec<u8> = (0..3 * side * side).map(|_| rng.random()).collect();
            for flip in [false, true] {
                let mut got = vec![0u8; 3 * side * side];
                hwc_to_chw(&src, side, flip, &mut got);
                for y in 0..side {
                    for x in 0..side {
                        let xs = if flip { side - 1 - x } else { x };
                        for c in 0..3 {
                            assert_eq!(
                                got[c * side * side + y * side + x],
                                src[3 * (y * side + xs) + c],
                                "side {side} flip {flip} at ({x},{y}) channel {c}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_sin_lanczos3_is_the_product_of_sincs() {
        use std::f64::consts::PI;
        let sinc = |x: f64| if x == 0.0 { 1.0 } else { (PI * x).sin() / (PI * x) };
        for i in -4000..=4000 {
            let x = i as f64 / 1000.0 + 0.000_37;
            let want = if x.abs() < 3.0 { sinc(x) * sinc(x / 3.0) } else { 0.0 };
            assert!((lanczos3(x) - want).abs() < 1e-14, "x {x}: {} vs {want}", lanczos3(x));
        }
        assert_eq!(lanczos3(0.0), 1.0);
        assert_eq!(lanczos3(3.0), 0.0);
    }

    #[test]
    fn boxes_stay_in_bounds_and_respect_scale_and_ratio() {
        let cfg = AugmentConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for &(w, h) in &[(500, 375), (375, 500), (100, 80), (2000, 1500), (16, 16), (1000, 50)] {
            for _ in 0..500 {
                let b = crop_box(w, h, &cfg, &mut rng);
                assert!(b.width >= 1 && b.height >= 1);
                assert!(b.left + b.width <= w && b.top + b.height <= h, "{b:?} in {w}x{h}");
                let frac = (b.width * b.height) as f64 / (w * h) as f64;
                assert!(frac <= 1.0 + 1e-9);
            }
        }
        // On a normal image the attempts succeed: area fraction within the scale range (up to
        // rounding) and aspect within the ratio range (up to rounding).
        for _ in 0..500 {
            let b = crop_box(500, 375, &cfg, &mut rng);
            let frac = (b.width * b.height) as f64 / (500.0 * 375.0);
            if b != fallback_box(500, 375, &cfg) {
                assert!(frac > 0.07, "{b:?}");
                let ar = b.width as f64 / b.height as f64;
                assert!(ar > 0.7 && ar < 1.4, "{b:?}");
            }
        }
    }

    /// Regression: NaN, reversed or out-of-range crop values were accepted unchecked.
    #[test]
    fn bad_crop_values_are_config_errors_naming_the_key() {
        let d = AugmentConfig::default();
        d.validate().expect("defaults are valid");
        let nan = f64::NAN;
        let cases = [
            (AugmentConfig { scale: (nan, 1.0), ..d.clone() }, "augment.scale"),
            (AugmentConfig { scale: (0.5, 0.2), ..d.clone() }, "augment.scale"),
            (AugmentConfig { scale: (0.0, 1.0), ..d.clone() }, "augment.scale"),
            (AugmentConfig { scale: (0.5, 1.5), ..d.clone() }, "augment.scale"),
            (AugmentConfig { ratio: (nan, 1.0), ..d.clone() }, "augment.ratio"),
            (AugmentConfig { ratio: (0.75, f64::INFINITY), ..d.clone() }, "augment.ratio"),
            (AugmentConfig { ratio: (-1.0, 1.0), ..d.clone() }, "augment.ratio"),
            (AugmentConfig { ratio: (1.33, 0.75), ..d.clone() }, "augment.ratio"),
            (AugmentConfig { flip_prob: nan, ..d.clone() }, "augment.flip_prob"),
            (AugmentConfig { view_size: 0, ..d.clone() }, "augment.view_size"),
        ];
        for (cfg, key) in cases {
            let e = cfg.validate().expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
        // The sampler's attempts stay bounded whatever the values: 10 tries, then the fallback.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let b = crop_box(300, 200, &AugmentConfig { scale: (nan, nan), ratio: (nan, nan), ..d }, &mut rng);
        assert!(b.left + b.width <= 300 && b.top + b.height <= 200, "{b:?}");
    }

    #[test]
    fn fallback_is_the_reference_centre_crop() {
        let cfg = AugmentConfig::default();
        // very wide image: r = 20 > 4/3 -> h = H, w = round(H * 4/3)
        assert_eq!(fallback_box(1000, 50, &cfg), CropBox { top: 0, left: (1000 - 67) / 2, height: 50, width: 67 });
        // very tall: r < 3/4 -> w = W, h = round(W / (3/4))
        assert_eq!(fallback_box(30, 900, &cfg), CropBox { top: (900 - 40) / 2, left: 0, height: 40, width: 30 });
        // in range: whole image
        assert_eq!(fallback_box(400, 300, &cfg), CropBox { top: 0, left: 0, height: 300, width: 400 });
        // An image so wide that no attempt can fit: scale (0.9, 1) with ratio near 1 on 1000x50.
        let strict = AugmentConfig { scale: (0.9, 1.0), ratio: (0.99, 1.01), ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert_eq!(crop_box(1000, 50, &strict, &mut rng), fallback_box(1000, 50, &strict));
    }

    #[test]
    fn flip_mirrors_the_box_and_both_views_share_it() {
        let p = TwoViewParams { flip: true, crop: CropBox { top: 5, left: 10, height: 50, width: 40 } };
        assert_eq!(p.source_box(200).left, 200 - 10 - 40);
        let q = TwoViewParams { flip: false, ..p };
        assert_eq!(q.source_box(200), q.crop);
    }

    fn gradient(w: usize, h: usize) -> RgbImage {
        let pixels =
            (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 77])).collect();
        RgbImage { width: w, height: h, pixels }
    }

    #[test]
    fn views_come_from_the_same_region_and_flip_mirrors_them() {
        let cfg = AugmentConfig { view_size: 32, token_size: 16, ..Default::default() };
        let img = gradient(300, 200);
        let mut rs = TwoViewResizer::new(&cfg);
        let crop = CropBox { top: 20, left: 100, height: 100, width: 100 };
        let (mut v, mut t) = (vec![0u8; 3 * 32 * 32], vec![0u8; 3 * 16 * 16]);
        rs.apply(&img, &TwoViewParams { flip: false, crop }, &mut v, &mut t).unwrap();
        // red channel = x position: both views span x in [100, 200) -> red in [85, 170)
        let red_v = &v[..32 * 32];
        let red_t = &t[..16 * 16];
        for red in [red_v, red_t] {
            assert!(red.iter().all(|&r| (80..=172).contains(&r)), "{:?}", &red[..8]);
        }
        // left-to-right increasing without flip
        assert!(red_v[0] < red_v[31] && red_t[0] < red_t[15]);
        // mean of the two views agrees (same region, different sizes)
        let mean = |s: &[u8]| s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
        assert!((mean(red_v) - mean(red_t)).abs() < 2.0);
        // flipped: the drawn box is on the mirrored image; its mirror on the original is
        // left = 300 - 100 - 100 = 100 (same region here), and the output is mirrored.
        let (mut vf, mut tf) = (vec![0u8; 3 * 32 * 32], vec![0u8; 3 * 16 * 16]);
        rs.apply(&img, &TwoViewParams { flip: true, crop }, &mut vf, &mut tf).unwrap();
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(vf[y * 32 + x], v[y * 32 + 31 - x]);
            }
        }
    }
}
