//! `pipeline bench --json` states the memory bound and the resume cost (issue 16), end to end
//! through the binary: on a shard directory with a manifest the resume fields are measured and
//! within their bound; on the same shards without counts they are `null`.

use std::path::Path;
use std::process::Command;

use cae_pipeline::manifest::{MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardEntry};
use cae_pipeline::wds::ShardWriter;

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(120, 90, |x, y| image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(seed: u8) -> Vec<u8> {
    let (w, h) = (120u16, 90u16);
    let rgb: Vec<u8> =
        (0..w as usize * h as usize * 3).map(|i| (i as u8).wrapping_mul(seed) ^ (i / 53) as u8).collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// `n` shards of `per` samples, with a manifest giving their counts.
fn shard_dir(dir: &Path, n: usize, per: usize) {
    shard_dir_of(dir, n, per, |i| ("jpg", jpeg(i as u8 | 1)));
}

/// `n` shards of `per` samples whose image member `image(i)` makes, with a manifest.
fn shard_dir_of(dir: &Path, n: usize, per: usize, image: impl Fn(usize) -> (&'static str, Vec<u8>)) {
    let mut shards = Vec::new();
    for s in 0..n {
        let name = format!("t-{s:06}.tar");
        let mut w = ShardWriter::create(&dir.join(&name)).unwrap();
        for i in 0..per {
            let (ext, bytes) = image(s * per + i);
            w.write_sample(&format!("k{s}_{i}"), &[("cls", b"0"), (ext, &bytes)]).unwrap();
        }
        shards.push(ShardEntry { name, digest: w.finish().unwrap() });
    }
    let total = (n * per) as u64;
    let m = Manifest {
        format: MANIFEST_FORMAT.into(),
        prefix: "t".into(),
        seed: 0,
        classes: vec!["a".into()],
        input_files: total,
        total_samples: total,
        total_bytes: shards.iter().map(|s| s.digest.bytes).sum(),
        converted: 0,
        rejected: 0,
        shards,
    };
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
}

fn bench(shards: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["bench", "--json", "--workers", "2", "--batch-size", "8", "--batches", "3", "--shuffle-buffer", "40"])
        .args(["--shards", shards])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_json_states_the_memory_bound_and_the_resume_cost() {
    let tmp = tempfile::tempdir().unwrap();
    shard_dir(tmp.path(), 10, 20); // 200 samples: 25 batches of 8 per epoch

    let j = bench(&tmp.path().to_string_lossy());
    assert_eq!(j["in_flight_bound"], 16, "K = 8 x workers: {j}");
    assert!(j["in_flight_peak"].as_u64().is_some_and(|p| p <= 16), "{j}");
    assert_eq!(j["shuffle_buffer"], 40);
    assert_eq!((j["resume_at_batch"].as_u64(), j["batches_per_epoch"].as_u64()), (Some(22), Some(25)), "{j}");
    let bound = j["resume_shards_bound"].as_u64().expect("bound");
    assert_eq!(bound, 40 / 20 + 2);
    let read = j["resume_shards_read"].as_u64().expect("shards read");
    assert!((1..=bound).contains(&read), "{read} shards read, bound {bound}");
    assert!(j["resume_seconds"].as_f64().is_some_and(|s| s > 0.0), "{j}");

    // The same shards by pattern (no manifest, no counts): a resume would replay; nothing measured.
    let j = bench(&tmp.path().join("t-{000000..000009}.tar").to_string_lossy());
    assert!(j["resume_shards_read"].is_null() && j["resume_shards_bound"].is_null(), "{j}");
    assert!(j["images_per_second"].as_f64().is_some_and(|r| r > 0.0));
}

/// Regression (issue 22): on shards holding no JPEG (PNG or WebP sets) the decode-only baseline
/// found nothing to decode and the bench failed; on a small set it printed "MB/s read 0.0" (the
/// shuffle buffer had read every byte during the warm-up). Now the baseline decodes whatever
/// image members the shards hold, and the rate read is images/s x the mean sample size.
#[test]
fn bench_runs_on_png_shards_and_states_a_read_rate() {
    let tmp = tempfile::tempdir().unwrap();
    shard_dir_of(tmp.path(), 2, 20, |i| ("png", png(i as u8 | 1)));
    let j = bench(&tmp.path().to_string_lossy());
    assert!(j["decode_only_images"].as_u64().is_some_and(|n| n > 0), "{j}");
    assert!(j["decode_only_images_per_second"].as_f64().is_some_and(|r| r > 0.0), "{j}");
    let (ips, mb) = (j["images_per_second"].as_f64().unwrap(), j["mb_per_second"].as_f64().unwrap());
    // The bytes per image that rate implies are those of a sample (its PNG and its "0").
    let mean = (0..40).map(|i| png(i as u8 | 1).len() + 1).sum::<usize>() as f64 / 40.0;
    let per_image = mb * 1e6 / ips;
    assert!(
        (per_image - mean).abs() < 0.2 * mean,
        "{mb} MB/s at {ips} images/s: {per_image} bytes per image, not {mean}"
    );
}
