//! Per-sample augmentation cost without decoding: both views (224 Catmull-Rom + 112 Lanczos3,
//! planar output) of a mean-size RandomResizedCrop box (~340x340 of a 500x375 image).
use cae_pipeline::augment::{AugmentConfig, CropBox, TwoViewParams, TwoViewResizer};
use cae_pipeline::decode::RgbImage;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let (w, h) = (500, 375);
    let pixels = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    let img = RgbImage { width: w, height: h, pixels };
    let cfg = AugmentConfig::default();
    let mut rs = TwoViewResizer::new(&cfg);
    let mut view = vec![0u8; 3 * cfg.view_size * cfg.view_size];
    let mut token = vec![0u8; 3 * cfg.token_size * cfg.token_size];
    for (name, side) in [("two_views_crop_340", 340), ("two_views_crop_160", 160)] {
        let p = TwoViewParams { flip: true, crop: CropBox { left: 60, top: 20, width: side, height: side } };
        c.bench_function(name, |b| b.iter(|| rs.apply(&img, &p, &mut view, &mut token)));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
