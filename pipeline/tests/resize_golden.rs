//! The two-view resize against Pillow (the reference resampler, spec §1 step 3). Golden files are
//! made by `tools/py/make_resize_golden.py`; the source pixels come from the same integer
//! formulas on both sides.

use cae_pipeline::augment::{AugmentConfig, CropBox, TwoViewParams, TwoViewResizer};
use cae_pipeline::decode::RgbImage;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn source(w: usize, h: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let b = 20 + 200 * ((x / 8 + y / 8) % 2);
            pixels.extend_from_slice(&[
                (x * 255 / (w - 1)) as u8,
                (y * 255 / (h - 1)) as u8,
                ((b + (x * y) % 23) % 256) as u8,
            ]);
        }
    }
    RgbImage { width: w, height: h, pixels }
}

/// planar CHW -> interleaved HWC
fn to_hwc(chw: &[u8], side: usize) -> Vec<u8> {
    let plane = side * side;
    (0..plane).flat_map(|i| [chw[i], chw[plane + i], chw[2 * plane + i]]).collect()
}

/// (99th percentile, max, mean) of the absolute differences.
fn diff(a: &[u8], b: &[u8]) -> (u8, u8, f64) {
    assert_eq!(a.len(), b.len());
    let mut d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    d.sort_unstable();
    (d[d.len() * 99 / 100], d[d.len() - 1], mean)
}

#[test]
fn both_views_match_pillow_within_rounding() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/resize_golden.json")).unwrap()).unwrap();
    let (w, h) = (meta["width"].as_u64().unwrap() as usize, meta["height"].as_u64().unwrap() as usize);
    let img = source(w, h);
    let cfg = AugmentConfig::default();
    let mut rs = TwoViewResizer::new(&cfg);
    for case in meta["cases"].as_array().unwrap() {
        let g = |k: &str| case[k].as_u64().unwrap() as usize;
        let crop = CropBox { top: g("top"), left: g("left"), height: g("height"), width: g("width") };
        let (mut v, mut t) = (vec![0u8; 3 * 224 * 224], vec![0u8; 3 * 112 * 112]);
        rs.apply(&img, &TwoViewParams { flip: false, crop }, &mut v, &mut t).unwrap();
        let gv = std::fs::read(format!("{DIR}/{}", case["view"].as_str().unwrap())).unwrap();
        let gt = std::fs::read(format!("{DIR}/{}", case["token"].as_str().unwrap())).unwrap();
        // Pillow rounds to u8 between its two passes (22-bit fixed point); fast_image_resize keeps
        // more precision, so a few ringing pixels of an upscale differ by more than 1.
        let (vp, vmax, vmean) = diff(&to_hwc(&v, 224), &gv);
        let (tp, tmax, tmean) = diff(&to_hwc(&t, 112), &gt);
        eprintln!("{crop:?}: bicubic p99 {vp} max {vmax} mean {vmean:.3}; lanczos p99 {tp} max {tmax} mean {tmean:.3}");
        assert!(vp <= 2 && vmax <= 16 && vmean < 0.2, "bicubic view differs from Pillow: max {vmax} mean {vmean}");
        assert!(tp <= 2 && tmax <= 16 && tmean < 0.2, "lanczos view differs from Pillow: max {tmax} mean {tmean}");
    }
}

#[test]
fn eval_transform_matches_torchvision_resize_and_center_crop() {
    use cae_pipeline::eval::CenterCropper;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/resize_golden.json")).unwrap()).unwrap();
    let (w, h) = (meta["width"].as_u64().unwrap() as usize, meta["height"].as_u64().unwrap() as usize);
    let img = source(w, h);
    let cases = meta["eval"].as_array().unwrap();
    assert!(!cases.is_empty(), "golden file has no eval cases (run make_resize_golden.py with torchvision)");
    for case in cases {
        let (resize, crop) = (case["resize"].as_u64().unwrap() as usize, case["crop"].as_u64().unwrap() as usize);
        let mut c = CenterCropper::new(resize, crop);
        let mut out = vec![0u8; 3 * crop * crop];
        c.apply(&img, &mut out).unwrap();
        let golden = std::fs::read(format!("{DIR}/{}", case["image"].as_str().unwrap())).unwrap();
        let (p, max, mean) = diff(&to_hwc(&out, crop), &golden);
        eprintln!("eval resize {resize} crop {crop}: p99 {p} max {max} mean {mean:.3}");
        // A geometry error (an off-by-one crop offset or a wrong resized size) moves every edge
        // of the 8-px checkerboard and gives a mean difference far above these bounds.
        assert!(p <= 2 && max <= 16 && mean < 0.2, "eval transform differs from torchvision: max {max} mean {mean}");
    }
}
