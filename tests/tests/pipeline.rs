//! End-to-end tests of the loader: generated images -> sharder -> pipeline batches.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use cae_pipeline::source::{self, ShardSpec};
use cae_pipeline::wds::ShardWriter;
use cae_pipeline::{Batch, Loader, LoaderConfig, LoaderError, LoaderState};
use cae_sharder::{BuildOptions, build};
use cae_tools::fixtures::{FixtureSpec, generate};

#[path = "pipeline/http.rs"]
mod http;
#[path = "pipeline/http_server.rs"]
mod http_server;

/// Shards of a small generated set (~46 samples in 6 shards of <= 8).
fn shards(dir: &Path) -> PathBuf {
    let fx =
        generate(&dir.join("in"), &FixtureSpec { classes: 4, per_class: 10, seed: 11, odd_files: true, max_side: 320 })
            .expect("fixtures");
    let out = dir.join("shards");
    let mut o = BuildOptions::new(&fx.train_dir, &out);
    o.shard_max_samples = 8;
    build(&o).expect("build");
    out
}

/// The image of the first sample of `dir`'s first shard: one real JPEG, reused.
fn first_jpg(dir: &Path) -> Vec<u8> {
    let f = std::fs::File::open(dir.join("train-000000.tar")).unwrap();
    let s = cae_pipeline::wds::SampleReader::new(f).next().unwrap().unwrap();
    s.get("jpg").unwrap().to_vec()
}

fn cfg(workers: usize) -> LoaderConfig {
    LoaderConfig { batch_size: 4, workers, prefetch: 2, shuffle_buffer: 16, seed: 5, ..LoaderConfig::default() }
}

/// What identifies a batch's content.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Fingerprint {
    keys: Vec<String>,
    labels: Vec<i64>,
    masked: Vec<u32>,
    visible: Vec<u32>,
    views: u64,
    tokens: u64,
    epoch: u64,
    index: u64,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn fingerprint(b: &Batch) -> Fingerprint {
    Fingerprint {
        keys: b.keys.clone(),
        labels: b.labels.clone(),
        masked: b.masked.clone(),
        visible: b.visible.clone(),
        views: fnv(&b.views),
        tokens: fnv(&b.token_views),
        epoch: b.epoch,
        index: b.index,
    }
}

/// The shard list of a directory and its total sample count (from the manifest).
fn shard_specs(dir: &Path) -> (Vec<ShardSpec>, u64) {
    let specs = source::expand(dir.to_str().unwrap()).unwrap();
    let total = specs.iter().map(|s| s.samples.unwrap()).sum();
    (specs, total)
}

fn run_all(cfg: LoaderConfig, shards: Vec<ShardSpec>, start: LoaderState) -> Vec<(Fingerprint, LoaderState)> {
    let loader = Loader::new(cfg, shards, start).expect("loader");
    let mut out = Vec::new();
    while let Some(b) = loader.next_blocking() {
        let b = b.expect("batch");
        out.push((fingerprint(&b), b.resume));
    }
    out
}

#[test]
fn same_seed_gives_identical_batches_with_1_and_2_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (specs, total) = shard_specs(&shards(tmp.path()));
    let c = |w| LoaderConfig { epochs: Some(2), ..cfg(w) };
    let one = run_all(c(1), specs.clone(), LoaderState::default());
    let two = run_all(c(2), specs.clone(), LoaderState::default());
    assert_eq!(one.len() as u64, 2 * (total / 4), "two epochs of floor(total / batch) batches");
    assert_eq!(one, two, "worker count must not change the batches");
    // Batch contract: masks have exactly 75 sorted indices and 121 visible, disjoint.
    for (f, _) in &one {
        for (m, v) in f.masked.chunks(75).zip(f.visible.chunks(121)) {
            assert!(m.windows(2).all(|w| w[0] < w[1]) && v.windows(2).all(|w| w[0] < w[1]));
            let all: HashSet<u32> = m.iter().chain(v).copied().collect();
            assert_eq!(all.len(), 196);
        }
    }
    // The second epoch is reshuffled, and a different seed gives different batches.
    let e0: Vec<&String> = one.iter().filter(|(f, _)| f.epoch == 0).flat_map(|(f, _)| &f.keys).collect();
    let e1: Vec<&String> = one.iter().filter(|(f, _)| f.epoch == 1).flat_map(|(f, _)| &f.keys).collect();
    assert_ne!(e0, e1);
    let other = run_all(LoaderConfig { seed: 6, ..c(2) }, specs, LoaderState::default());
    assert_ne!(one[0].0, other[0].0);
}

#[test]
fn resume_yields_exactly_the_batches_that_would_have_come_next() {
    let tmp = tempfile::tempdir().unwrap();
    let (specs, _) = shard_specs(&shards(tmp.path()));
    let c = LoaderConfig { epochs: Some(2), ..cfg(2) };
    let full = run_all(c.clone(), specs.clone(), LoaderState::default());
    let per_epoch = full.iter().filter(|(f, _)| f.epoch == 0).count();
    // mid-epoch, the last batch of an epoch (resume state points at the next epoch), mid-epoch 2
    for k in [2, per_epoch - 1, per_epoch + 3] {
        let state = full[k].1;
        let resumed = run_all(c.clone(), specs.clone(), state);
        let expect: Vec<Fingerprint> = full[k + 1..].iter().map(|(f, _)| f.clone()).collect();
        let got: Vec<Fingerprint> = resumed.into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, expect, "resume after batch {k} (state {state:?})");
    }
    // The state is serialisable (it goes into checkpoints).
    let json = serde_json::to_string(&full[3].1).unwrap();
    assert_eq!(serde_json::from_str::<LoaderState>(&json).unwrap(), full[3].1);
}

#[test]
fn every_rank_yields_the_same_number_of_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (specs, total) = shard_specs(&shards(tmp.path()));
    for world in [2usize, 3] {
        let mut counts = Vec::new();
        let mut keys: Vec<HashSet<String>> = Vec::new();
        for rank in 0..world {
            let c = LoaderConfig { rank, world_size: world, epochs: Some(1), ..cfg(1) };
            let batches = run_all(c, specs.clone(), LoaderState::default());
            counts.push(batches.len() as u64);
            keys.push(batches.iter().flat_map(|(f, _)| f.keys.clone()).collect());
        }
        let expect = total / (world as u64 * 4);
        assert!(counts.iter().all(|&c| c == expect), "world {world}: {counts:?}, expected {expect} each");
        // ranks read different shards
        assert!(keys[0].is_disjoint(&keys[1]), "ranks 0 and 1 share samples");
    }
}

fn shard_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
        .filter(|n| n.ends_with(".tar"))
        .collect();
    v.sort();
    v
}

#[test]
fn corrupt_shard_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let good = std::fs::read(dir.join(&names[0])).unwrap();
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let mut state = 0x9E37_79B9u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for v in 0..12 {
        let mut bytes = good.clone();
        match v % 3 {
            0 => {
                for _ in 0..20 {
                    let i = (rnd() as usize) % bytes.len();
                    bytes[i] = rnd() as u8;
                }
            }
            1 => bytes.truncate((rnd() as usize) % bytes.len()),
            _ => {
                let i = (rnd() as usize) % bytes.len();
                let n = (rnd() as usize % 4096).min(bytes.len() - i);
                bytes[i..i + n].fill(0xFF);
            }
        }
        std::fs::write(bad_dir.join(format!("bad-{v:02}.tar")), bytes).unwrap();
    }
    let pattern = bad_dir.join("bad-{00..11}.tar");
    let c =
        LoaderConfig { epochs: Some(1), max_bad_fraction: 1.0, batch_size: 2, max_failed_shards: Some(100), ..cfg(2) };
    let loader = Loader::new(c, source::expand(pattern.to_str().unwrap()).unwrap(), LoaderState::default()).unwrap();
    let mut batches = 0;
    while let Some(b) = loader.next_blocking() {
        if b.is_ok() {
            batches += 1;
        }
    }
    let s = loader.stats();
    let problems = s.bad_samples.load(Ordering::Relaxed) + s.shards_failed.load(Ordering::Relaxed);
    assert!(problems > 0, "corruption must be counted");
    assert!(batches > 0, "the intact parts still deliver");
}

#[test]
fn bad_samples_are_skipped_and_too_many_is_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let jpg = first_jpg(&dir);
    let write = |path: &Path, n: usize, bad_every: usize| {
        let mut w = ShardWriter::create(path).unwrap();
        for i in 0..n {
            let key = format!("s{i:04}");
            if i % bad_every == 0 {
                w.write_sample(&key, &[("jpg", b"\xFF\xD8\xFFnot really a jpeg"), ("cls", b"0")]).unwrap();
            } else if i % bad_every == 1 {
                w.write_sample(&key, &[("jpg", &jpg)]).unwrap(); // no class
            } else {
                w.write_sample(&key, &[("jpg", &jpg), ("cls", b"1")]).unwrap();
            }
        }
        w.finish().unwrap();
    };
    let some_bad = tmp.path().join("some-bad.tar");
    write(&some_bad, 40, 10); // 8 bad of 40
    let c = LoaderConfig {
        epochs: Some(1),
        max_bad_fraction: 0.5,
        batch_size: 4,
        labels: cae_pipeline::LabelPolicy::Required,
        ..cfg(2)
    };
    let batches = run_all(c, source::expand(some_bad.to_str().unwrap()).unwrap(), LoaderState::default());
    let keys: Vec<String> = batches.iter().flat_map(|(f, _)| f.keys.clone()).collect();
    assert_eq!(keys.len(), 32, "the 32 good samples arrive");
    assert!(keys.iter().all(|k| {
        let i: usize = k[1..].parse().unwrap();
        i % 10 > 1
    }));

    let mostly_bad = tmp.path().join("mostly-bad.tar");
    write(&mostly_bad, 300, 2); // every sample bad
    let c = LoaderConfig { epochs: Some(1), max_bad_fraction: 0.1, batch_size: 4, ..cfg(2) };
    let loader = Loader::new(c, source::expand(mostly_bad.to_str().unwrap()).unwrap(), LoaderState::default()).unwrap();
    let mut fatal = None;
    while let Some(b) = loader.next_blocking() {
        if let Err(e) = b {
            fatal = Some(e);
        }
    }
    assert!(matches!(fatal, Some(LoaderError::TooManyBad { .. })), "{fatal:?}");
}

/// Regression (issue 16): header-only 16384² JPEGs cost 805 MiB per worker; oversized members
/// were read whole; unlabeled samples and `.png` members were rejected. Now the big ones are
/// `too_large` (counted, skipped), and unlabeled and PNG samples train.
#[test]
fn huge_headers_and_members_are_skipped_while_unlabeled_and_png_samples_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let jpg = first_jpg(&dir);
    let mut bomb = jpg.clone();
    let sof = bomb.windows(2).position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1])).expect("frame header");
    bomb[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0x40, 0x00]); // claims 16384 x 16384
    let sos = bomb.windows(2).position(|m| m == [0xFF, 0xDA]).expect("scan header");
    bomb.truncate(sos + 64); // headers only, like the 166-byte file of the issue
    let png = png_of(&jpg);
    let path = tmp.path().join("mixed.tar");
    let mut w = ShardWriter::create(&path).unwrap();
    let big_member = vec![0u8; 300_000];
    for i in 0..24 {
        let key = format!("m{i:03}");
        match i % 6 {
            0 => w.write_sample(&key, &[("jpg", &bomb), ("cls", b"1")]).unwrap(),
            1 => w.write_sample(&key, &[("jpg", &big_member), ("cls", b"1")]).unwrap(),
            2 => w.write_sample(&key, &[("png", &png)]).unwrap(), // PNG, no label
            3 => w.write_sample(&key, &[("jpeg", &jpg)]).unwrap(), // .jpeg, no label
            _ => w.write_sample(&key, &[("jpg", &jpg), ("cls", b"2")]).unwrap(),
        }
    }
    w.finish().unwrap();
    let c = LoaderConfig { epochs: Some(1), max_bad_fraction: 0.5, max_member_bytes: 200_000, ..cfg(2) };
    let loader = Loader::new(c, source::expand(path.to_str().unwrap()).unwrap(), LoaderState::default()).unwrap();
    let mut got = Vec::new();
    while let Some(b) = loader.next_blocking() {
        let b = b.expect("no fatal error");
        got.extend(b.keys.iter().cloned().zip(b.labels.iter().copied()));
    }
    let s = loader.stats();
    assert_eq!(s.too_large.load(Ordering::Relaxed), 8, "4 pixel bombs + 4 oversized members");
    assert_eq!(s.bad_samples.load(Ordering::Relaxed), 8);
    assert_eq!(got.len(), 16, "every other sample arrives: {got:?}");
    for (key, label) in &got {
        let i: usize = key[1..].parse().unwrap();
        assert!(i % 6 >= 2, "{key} should have been skipped");
        assert_eq!(*label, if i % 6 < 4 { -1 } else { 2 }, "{key}");
    }
}

/// The same image as a PNG.
fn png_of(jpg: &[u8]) -> Vec<u8> {
    let img = cae_pipeline::decode::decode_jpeg(jpg, true).unwrap();
    let rgb = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    rgb.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Regression (issue 16): a mistyped brace range, a deleted shard or a shard cut exactly at a
/// member boundary trained silently on a subset. Now a missing local shard is an error at start
/// naming it, and a short shard (against the manifest) is a failed shard that stops the run.
#[test]
fn missing_and_short_local_shards_are_errors_not_silent_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let n = shard_names(&dir).len();
    // A brace range one past the last shard.
    let pattern = dir.join(format!("train-{{000000..{n:06}}}.tar"));
    let err = Loader::new(cfg(1), source::expand(pattern.to_str().unwrap()).unwrap(), LoaderState::default()).err();
    match err {
        Some(LoaderError::MissingShards { missing }) => {
            assert_eq!(missing, vec![dir.join(format!("train-{n:06}.tar")).to_string_lossy().into_owned()])
        }
        other => panic!("expected the missing shard named, got {other:?}"),
    }
    // A shard rewritten with two samples fewer: whole tar, but short against the manifest.
    let (specs, _) = shard_specs(&dir);
    let victim = dir.join("train-000001.tar");
    let samples: Vec<_> =
        cae_pipeline::wds::SampleReader::new(std::fs::File::open(&victim).unwrap()).map(|s| s.unwrap()).collect();
    let mut w = ShardWriter::create(&victim).unwrap();
    for smp in &samples[..samples.len() - 2] {
        let refs: Vec<(&str, &[u8])> = smp.fields.iter().map(|(e, b)| (e.as_str(), b.as_slice())).collect();
        w.write_sample(&smp.key, &refs).unwrap();
    }
    w.finish().unwrap();
    let run = |c: LoaderConfig| {
        let loader = Loader::new(c, specs.clone(), LoaderState::default()).expect("starts");
        let mut fatal = None;
        while let Some(b) = loader.next_blocking() {
            if let Err(e) = b {
                fatal = Some(e);
                break;
            }
        }
        (fatal, loader.stats().shards_failed.load(Ordering::Relaxed))
    };
    let (fatal, _) = run(LoaderConfig { epochs: Some(1), ..cfg(2) });
    match fatal {
        Some(LoaderError::ShardsFailed { failed, max: 0, last }) => {
            assert_eq!(failed, vec![victim.to_string_lossy().into_owned()]);
            assert!(last.contains("short shard") && last.contains(&format!("says {}", samples.len())), "{last}");
        }
        other => panic!("expected the short shard to stop the run, got {other:?}"),
    }
    // Tolerated when configured: counted, and the run completes.
    let (fatal, failed) = run(LoaderConfig { epochs: Some(1), max_failed_shards: Some(1), ..cfg(2) });
    assert!(fatal.is_none(), "{fatal:?}");
    assert!(failed >= 1);
}

#[test]
fn bad_configs_fail_at_start() {
    let spec = vec![ShardSpec::new("x.tar", None)];
    let err = |c: LoaderConfig| Loader::new(c, spec.clone(), LoaderState::default()).err().map(|e| e.to_string());
    assert!(err(LoaderConfig { world_size: 2, rank: 0, ..cfg(1) }).is_some_and(|e| e.contains("shards")));
    assert!(err(LoaderConfig { batch_size: 0, ..cfg(1) }).is_some());
    let mut micro_bad = cfg(1);
    micro_bad.mask.grid = 4;
    micro_bad.mask.num_masked = 6;
    micro_bad.augment.view_size = 64;
    assert!(err(micro_bad).is_some_and(|e| e.contains("min_num_patches")));
    // Values that made the mask generator spin for ever, or the crop sampler draw from NaN.
    let mut spin = cfg(1);
    spin.mask.max_num_patches = Some(0);
    assert!(err(spin).is_some_and(|e| e.contains("mask.max_num_patches")));
    let mut nan_aspect = cfg(1);
    nan_aspect.mask.min_aspect = f64::NAN;
    assert!(err(nan_aspect).is_some_and(|e| e.contains("mask.min_aspect")));
    let mut reversed = cfg(1);
    reversed.augment.scale = (1.0, 0.08);
    assert!(err(reversed).is_some_and(|e| e.contains("augment.scale")));
    let mut nan_ratio = cfg(1);
    nan_ratio.augment.ratio = (f64::NAN, 1.0);
    assert!(err(nan_ratio).is_some_and(|e| e.contains("augment.ratio")));
}

#[test]
fn eval_reader_yields_every_sample_once_in_order_and_skips_bad_ones() {
    use cae_pipeline::eval::{EvalConfig, EvalReader};
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    // The independent expectation: every sample of every shard, in shard-name order.
    let expected: Vec<(String, i64)> = cae_tests::all_samples(&dir)
        .into_iter()
        .map(|(_, s)| {
            let label = s.class().map_or(-1, |c| c.unwrap());
            (s.key, label)
        })
        .collect();
    assert!(expected.len() > 30);
    // A shard with a corrupt JPEG, a sample without class and a good one, appended at the end.
    let extra = tmp.path().join("extra.tar");
    let jpg = first_jpg(&dir);
    let mut w = ShardWriter::create(&extra).unwrap();
    w.write_sample("x0", &[("jpg", b"\xFF\xD8\xFFnot a jpeg"), ("cls", b"0")]).unwrap();
    w.write_sample("x1", &[("jpg", &jpg)]).unwrap();
    w.write_sample("x2", &[("jpg", &jpg), ("cls", b"3")]).unwrap();
    // Regression: eval read only `.jpg` members; now the loader's choice (.jpeg, .png, .webp).
    w.write_sample("x3", &[("cls", b"4"), ("png", &png_of(&jpg))]).unwrap();
    w.write_sample("x4", &[("jpeg", &jpg), ("json", b"{}")]).unwrap();
    w.finish().unwrap();
    let mut specs = source::expand(dir.to_str().unwrap()).unwrap();
    specs.extend(source::expand(extra.to_str().unwrap()).unwrap());
    for workers in [1, 3] {
        let cfg = EvalConfig { batch_size: 7, workers, ..EvalConfig::default() };
        let reader = EvalReader::new(cfg, specs.clone()).unwrap();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let mut fingerprint = Vec::new();
        let mut reader = reader;
        for b in reader.by_ref() {
            let b = b.unwrap();
            assert_eq!(b.images.len(), b.len() * 3 * 224 * 224);
            sizes.push(b.len());
            fingerprint.push(fnv(&b.images));
            got.extend(b.keys.iter().cloned().zip(b.labels.iter().copied()));
        }
        let mut want = expected.clone();
        want.push(("x1".into(), -1));
        want.push(("x2".into(), 3));
        want.push(("x3".into(), 4));
        want.push(("x4".into(), -1));
        assert_eq!(got, want, "{workers} workers: every good sample once, in order");
        assert!(sizes[..sizes.len() - 1].iter().all(|&s| s == 7), "only the last batch is short: {sizes:?}");
        assert_eq!(reader.stats().bad_samples.load(Ordering::Relaxed), 1);
        drop(reader);
    }
}

/// Regression (issue 22): the eval reader re-implemented the loader's reading and drifted: no
/// tar-member cap, a fixed pixel cap instead of `max_pixels`, a PNG stored as `.jpg` sent to the
/// JPEG decoder, and a failed shard only a warning (`eval knn` scored a subset). Now it reads
/// through the loader's front half with the run's `ReadConfig`.
#[test]
fn eval_reader_honours_the_caps_and_the_failed_shard_policy() {
    use cae_pipeline::eval::{EvalConfig, EvalReader};
    use cae_pipeline::read::ReadConfig;
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let jpg = first_jpg(&dir);
    let small_png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let caps = tmp.path().join("caps.tar");
    let mut w = ShardWriter::create(&caps).unwrap();
    w.write_sample("a", &[("cls", b"1"), ("jpg", &small_png)]).unwrap(); // a PNG named .jpg
    w.write_sample("b", &[("cls", b"2"), ("jpg", &jpg)]).unwrap(); // over the pixel cap
    w.write_sample("c", &[("cls", b"3"), ("jpg", &vec![0u8; 300_000])]).unwrap(); // over the member cap
    w.write_sample("d", &[("cls", b"4"), ("png", &small_png)]).unwrap();
    w.finish().unwrap();
    let read = ReadConfig { max_pixels: 64 * 48, max_member_bytes: 200_000, ..ReadConfig::default() };
    let cfg = EvalConfig { batch_size: 3, workers: 2, read, ..EvalConfig::default() };
    let mut reader = EvalReader::new(cfg.clone(), source::expand(caps.to_str().unwrap()).unwrap()).unwrap();
    let mut got = Vec::new();
    for b in reader.by_ref() {
        let b = b.expect("no fatal error");
        got.extend(b.keys.iter().cloned().zip(b.labels.iter().copied()));
    }
    assert_eq!(got, [("a".to_string(), 1), ("d".to_string(), 4)]);
    let bad = reader.stats().first_bad_samples();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].contains("sample b") && bad[0].contains("over the limits"), "{bad:?}");
    assert!(bad[1].contains("sample c") && bad[1].contains("over the 200000-byte cap"), "{bad:?}");
    drop(reader);

    // A broken shard (cut in half) of a manifest set: the pass ends with an error naming it
    // (local shards: none tolerated by default) ...
    let victim = dir.join("train-000002.tar");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let specs = source::expand(dir.to_str().unwrap()).unwrap();
    let total: u64 = specs.iter().filter_map(|s| s.samples).sum();
    let pass = |cfg: EvalConfig| {
        let mut reader = EvalReader::new(cfg, specs.clone()).unwrap();
        let (mut n, mut fatal) = (0, None);
        for b in reader.by_ref() {
            match b {
                Ok(b) => n += b.len() as u64,
                Err(e) => fatal = Some(e),
            }
        }
        (n, fatal, reader.stats().failed_shards(), reader.stats().expected_samples)
    };
    let (_, fatal, _, _) = pass(EvalConfig { batch_size: 4, workers: 2, ..EvalConfig::default() });
    match fatal {
        Some(LoaderError::ShardsFailed { failed, max: 0, .. }) => {
            assert_eq!(failed, [victim.to_string_lossy().into_owned()])
        }
        other => panic!("expected the broken shard to end the pass, got {other:?}"),
    }
    // ... or, tolerated, the rest is read and the stats say what was not.
    let read = ReadConfig { max_failed_shards: Some(1), ..ReadConfig::default() };
    let (n, fatal, failed, expected) = pass(EvalConfig { batch_size: 4, workers: 2, read, ..EvalConfig::default() });
    assert!(fatal.is_none(), "{fatal:?}");
    assert_eq!((failed, expected), (vec![victim.to_string_lossy().into_owned()], Some(total)));
    assert!(n < total && n >= total - 8, "{n} of {total} read");
    // A listed local shard that does not exist is an error at start, naming it.
    std::fs::remove_file(&victim).unwrap();
    let e = EvalReader::new(EvalConfig::default(), specs.clone()).err();
    assert!(matches!(&e, Some(LoaderError::MissingShards { missing }) if missing.len() == 1), "{e:?}");
}

/// The shuffle buffer is drained at the end of the shard list, before a wrap-around: an epoch
/// never repeats a sample while another is left out (a small set makes this visible: with a
/// buffer of 16 and no drain, 16 samples would be replaced by repeats of the next pass).
#[test]
fn an_epoch_sees_distinct_samples_before_any_repeat() {
    let tmp = tempfile::tempdir().unwrap();
    let (specs, total) = shard_specs(&shards(tmp.path()));
    let c = LoaderConfig { epochs: Some(2), ..cfg(2) };
    let batches = run_all(c, specs, LoaderState::default());
    for epoch in 0..2 {
        let keys: Vec<String> =
            batches.iter().filter(|(f, _)| f.epoch == epoch).flat_map(|(f, _)| f.keys.clone()).collect();
        assert_eq!(keys.len() as u64, total / 4 * 4, "epoch {epoch}: floor(total / B) batches");
        let distinct: HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "epoch {epoch} repeats a sample: {keys:?}");
    }
}
