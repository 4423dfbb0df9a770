//! Per-sample augmentation cost, without decoding: both views of a mean-size crop.
use cae_pipeline::augment::{AugmentConfig, CropBox, TwoViewParams, TwoViewResizer};
use cae_pipeline::decode::RgbImage;
use criterion::{Criterion, criterion_group, criterion_main};
use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

fn image(w: usize, h: usize) -> RgbImage {
    let pixels = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    RgbImage { width: w, height: h, pixels }
}

fn bench(c: &mut Criterion) {
    let cfg = AugmentConfig::default();
    let img = image(500, 375);
    let p = TwoViewParams { flip: true, crop: CropBox { left: 60, top: 20, width: 340, height: 340 } };
    let mut rs = TwoViewResizer::new(&cfg);
    let mut v = vec![0u8; 3 * 224 * 224];
    let mut t = vec![0u8; 3 * 112 * 112];
    c.bench_function("two_views_340", |b| b.iter(|| rs.apply(&img, &p, &mut v, &mut t).unwrap()));

    for (pt, ch) in [(PixelType::U8x3, 3usize), (PixelType::U8x4, 4)] {
        let px: Vec<u8> = (0..500 * 375 * ch).map(|i| ((i * 7919) % 251) as u8).collect();
        let src = ImageRef::new(500, 375, &px, pt).unwrap();
        let region = CroppedImage::new(&src, 60, 20, 340, 340).unwrap();
        let mut r = Resizer::new();
        for (name, f, side) in
            [("catmull224", FilterType::CatmullRom, 224u32), ("lanczos112", FilterType::Lanczos3, 112)]
        {
            let mut dst = Image::new(side, side, pt);
            let o = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(f));
            c.bench_function(&format!("{name}_{ch}ch"), |b| b.iter(|| r.resize(&region, &mut dst, &o).unwrap()));
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
