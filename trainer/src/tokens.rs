//! `trainer tokens`: the DALL-E token ids of images, to inspect targets and check against PyTorch.
//!
//! Each image is decoded (JPEG via zune-jpeg; other formats via the `image` crate), its centre
//! square is resized to the tokenizer's view size with Lanczos3 (the view-2 resampler, spec §1) —
//! an image that already has that size is used as it is, with no resampling — mapped with
//! `map_pixels` and tokenized: `(size/8)²` ids in raster order (spec §3).

use std::path::Path;

use burn::prelude::Backend;
use burn::tensor::{Tensor, TensorData};
use cae_pipeline::augment::{AugmentConfig, CropBox, TwoViewParams, TwoViewResizer};
use cae_pipeline::decode::{self, RgbImage};

use crate::error::CaeError;
use crate::model::{DalleEncoder, map_pixels};

/// Reads an image file into RGB.
pub fn read_image(path: &Path) -> Result<RgbImage, CaeError> {
    let err = |reason: String| CaeError::Weights { path: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    match decode::Format::sniff(&bytes) {
        decode::Format::Jpeg => decode::decode_jpeg(&bytes, true).map_err(|e| err(e.to_string())),
        _ => {
            let img = image::load_from_memory(&bytes).map_err(|e| err(format!("not a readable image: {e}")))?.to_rgb8();
            Ok(RgbImage { width: img.width() as usize, height: img.height() as usize, pixels: img.into_raw() })
        }
    }
}

/// The centre view of `img` at `size`x`size`, planar f32 in [0, 1].
pub fn centre_view(img: &RgbImage, size: usize) -> Result<Vec<f32>, CaeError> {
    let plane = size * size;
    let mut chw = vec![0u8; 3 * plane];
    if img.width == size && img.height == size {
        cae_pipeline::augment::hwc_to_chw(&img.pixels, size, false, &mut chw);
    } else {
        let side = img.width.min(img.height);
        let crop = CropBox { top: (img.height - side) / 2, left: (img.width - side) / 2, height: side, width: side };
        // The resizer makes both CAE views; only view 2 (Lanczos3 at `size`) is used here.
        let cfg = AugmentConfig { view_size: size, token_size: size, ..AugmentConfig::default() };
        let mut resizer = TwoViewResizer::new(&cfg);
        let mut unused = vec![0u8; 3 * plane];
        resizer.apply(img, &TwoViewParams { flip: false, crop }, &mut unused, &mut chw).map_err(|reason| {
            CaeError::Config(format!("centre view of a {}x{} image: {reason}", img.width, img.height))
        })?;
    }
    Ok(chw.iter().map(|&v| v as f32 / 255.0).collect())
}

/// Token ids `[(size/8)²]` of one image.
pub fn image_tokens<B: Backend>(
    enc: &DalleEncoder<B>,
    img: &RgbImage,
    size: usize,
    device: &B::Device,
) -> Result<Vec<i64>, CaeError> {
    let view = centre_view(img, size)?;
    let x = Tensor::<B, 4>::from_data(TensorData::new(view, [1, 3, size, size]), device);
    enc.tokens(map_pixels(x))
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| CaeError::Config(format!("reading token ids: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DalleConfig;

    type B = burn::backend::Flex;

    #[test]
    fn exact_size_images_are_not_resampled_and_others_are_centre_cropped() {
        let px = |w: usize, h: usize| RgbImage {
            width: w,
            height: h,
            pixels: (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x % 256) as u8, (y % 256) as u8, 9])).collect(),
        };
        let v = centre_view(&px(32, 32), 32).unwrap();
        // identical values, planar: red plane = x / 255
        assert!((0..32).all(|x| (v[x] - x as f32 / 255.0).abs() < 1e-7));
        assert!((v[2 * 1024] - 9.0 / 255.0).abs() < 1e-7);
        // a wide image: the centre square (x in 32..96 of 128) is used
        let w = centre_view(&px(128, 64), 32).unwrap();
        let red = &w[..1024];
        assert!(red.iter().all(|&r| (30.0 / 255.0..=98.0 / 255.0).contains(&r)), "{:?}", &red[..4]);
    }

    #[test]
    fn tokens_have_the_grid_size_and_vocab_range() {
        let dev = Default::default();
        let enc = DalleConfig::micro().init::<B>(&dev);
        let img = RgbImage { width: 40, height: 50, pixels: vec![128; 40 * 50 * 3] };
        let t = image_tokens(&enc, &img, 32, &dev).unwrap();
        assert_eq!(t.len(), 16);
        assert!(t.iter().all(|&i| (0..512).contains(&i)));
    }
}
