//! End-to-end tests of the loader's epochs (issue 16): resume reads only the shards still in the
//! shuffle buffer, an epoch decodes nothing past its end, and a saved state says what it
//! refers to.

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};

use cae_pipeline::source::ShardSpec;
use cae_pipeline::wds::ShardWriter;
use cae_pipeline::{Loader, LoaderConfig, LoaderError, LoaderState};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

fn jpeg(i: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, (i * 37 % 256) as u8]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

/// `n` shards of `per` samples each (with their counts, as a manifest gives them); samples for
/// which `bad(shard, index)` holds get a corrupt JPEG.
fn write_shards(dir: &Path, n: usize, per: usize, bad: impl Fn(usize, usize) -> bool) -> Vec<ShardSpec> {
    (0..n)
        .map(|s| {
            let path = dir.join(format!("s-{s:04}.tar"));
            let mut w = ShardWriter::create(&path).expect("create");
            for i in 0..per {
                let img = if bad(s, i) { b"\xFF\xD8\xFFbroken".to_vec() } else { jpeg(s * per + i) };
                w.write_sample(&format!("k{s:04}_{i:03}"), &[("jpg", &img), ("cls", b"1")]).expect("write");
            }
            w.finish().expect("finish");
            ShardSpec::new(path.to_string_lossy().into_owned(), Some(per as u64))
        })
        .collect()
}

fn cfg(workers: usize) -> LoaderConfig {
    let mut c = LoaderConfig { batch_size: 4, workers, prefetch: 2, shuffle_buffer: 20, seed: 3, ..Default::default() };
    c.augment.view_size = 112;
    c.augment.token_size = 56;
    c.mask.grid = 8;
    c.mask.num_masked = 20;
    c
}

fn run(cfg: LoaderConfig, shards: &[ShardSpec], start: LoaderState) -> (Vec<(Vec<String>, LoaderState)>, Loader) {
    let loader = Loader::new(cfg, shards.to_vec(), start).expect("loader");
    let mut out = Vec::new();
    while let Some(b) = loader.next_blocking() {
        let b = b.expect("batch");
        out.push((b.keys.clone(), b.resume));
    }
    (out, loader)
}

/// Tests that resume hold this: the resume metric is one counter for the whole process, and
/// `resume_at_90_percent...` checks it moved by exactly its own resume.
static RESUMES: Mutex<()> = Mutex::new(());

/// The value of `cae_pipeline_resume_shards_read_total` in this process's Prometheus exporter
/// (installed on first use; 0 before any resume).
fn resume_metric() -> f64 {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("recorder"));
    let body = handle.render();
    let name = cae_pipeline::metrics::RESUME_SHARDS_READ;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// Regression: resume re-read every shard before the saved position (up to a whole epoch).
/// Now the position comes from the counts, and only the shards still in the shuffle buffer
/// (and the one being read) are read: at 90 % of an epoch, at most
/// `shuffle_buffer / samples_per_shard + 2` shards — against 18 for a replay.
#[test]
fn resume_at_90_percent_reads_only_the_buffered_shards() {
    let _one_at_a_time = RESUMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = tempfile::tempdir().unwrap();
    let (n, per) = (20, 10);
    let shards = write_shards(tmp.path(), n, per, |_, _| false);
    let c = LoaderConfig { epochs: Some(1), ..cfg(2) };
    let (full, _) = run(c.clone(), &shards, LoaderState::default());
    assert_eq!(full.len(), n * per / 4);
    let k = full.len() * 9 / 10 - 1; // the state after batch 45 of 50
    let state = full[k].1;
    assert!(state.fingerprint.is_some() && !state.replay, "{state:?}");
    let expect: Vec<Vec<String>> = full[k + 1..].iter().map(|(keys, _)| keys.clone()).collect();

    let before = resume_metric();
    let (resumed, loader) = run(c.clone(), &shards, state);
    let got: Vec<Vec<String>> = resumed.into_iter().map(|(keys, _)| keys).collect();
    assert_eq!(got, expect, "resume gives exactly the batches that would have come next");
    let read = loader.stats().resume_shards_read.load(Ordering::Relaxed);
    let bound = (c.shuffle_buffer / per + 2) as u64;
    assert!((1..=bound).contains(&read), "{read} shards read to resume, bound {bound}");
    // Users watch it on Prometheus: the counter moved by exactly the shards read.
    assert_eq!(resume_metric() - before, read as f64, "cae_pipeline_resume_shards_read_total");

    // `pipeline bench` states the same cost (its JSON's `resume_shards_read`/`_bound`).
    let cost = cae_pipeline::bench::resume_cost(&c, &shards, 0.9).expect("resume cost").expect("counts known");
    assert_eq!((cost.at_batch, cost.batches_per_epoch, cost.shards_bound), (45, 50, bound));
    assert!((1..=bound).contains(&cost.shards_read), "{cost:?}");
    let no_counts: Vec<ShardSpec> = shards.iter().map(|s| ShardSpec { samples: None, ..s.clone() }).collect();
    assert_eq!(cae_pipeline::bench::resume_cost(&c, &no_counts, 0.9).expect("no counts"), None);

    // The replay path (what every resume did before) gives the same batches, reading much more.
    let (replayed, loader) = run(c, &shards, LoaderState { replay: true, ..state });
    let got: Vec<Vec<String>> = replayed.into_iter().map(|(keys, _)| keys).collect();
    assert_eq!(got, expect);
    let replay_read = loader.stats().resume_shards_read.load(Ordering::Relaxed);
    assert!(replay_read >= 17, "a replay reads the shards before the position: {replay_read}");
}

/// Regression: at an epoch's end the reader had already sent samples past it, which were
/// decoded and thrown away (and the next epoch waited for its buffer to refill). Now every
/// sample decoded is delivered or counted bad: decodes == delivered + bad, exactly, over three
/// epochs with bad samples (which make the epochs wrap around), and nothing in flight exceeds K.
#[test]
fn epochs_end_exactly_with_nothing_decoded_past_their_end() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = write_shards(tmp.path(), 10, 9, |s, i| (s * 9 + i) % 15 == 4);
    let c = LoaderConfig { epochs: Some(3), max_bad_fraction: 0.2, ..cfg(3) };
    let per_epoch = 90 / 4;
    let (batches, loader) = run(c, &shards, LoaderState::default());
    assert_eq!(batches.len(), 3 * per_epoch);
    for e in 0..3u64 {
        let last = &batches[(e as usize + 1) * per_epoch - 1].1;
        assert_eq!((last.epoch, last.batch, last.consumed), (e + 1, 0, 0), "epoch {e} ends on its last batch");
    }
    let s = loader.stats();
    let map = s.map.get().expect("map counters");
    let (done, bad) = (s.samples_done.load(Ordering::Relaxed), s.bad_samples.load(Ordering::Relaxed));
    assert_eq!(done, 3 * per_epoch as u64 * 4);
    assert!(bad >= 3 * 5, "bad samples seen: {bad}");
    assert_eq!(map.processed.load(Ordering::SeqCst), done + bad, "samples decoded beyond the epochs' ends");
    let k = loader.in_flight_bound() as u64;
    assert!(map.peak_undelivered.load(Ordering::SeqCst) <= k);
}

/// Regression: `--resume` after the shard set changed could make the epoch never end (the
/// saved position referred to other shards). A state now carries a fingerprint of the shards,
/// their counts and the data config: another run refuses it with a clear error; a state
/// without one (older checkpoints) is accepted; a position past the epoch is refused.
#[test]
fn a_state_from_other_shards_or_config_is_refused() {
    let _one_at_a_time = RESUMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = tempfile::tempdir().unwrap();
    let shards = write_shards(tmp.path(), 6, 8, |_, _| false);
    let c = LoaderConfig { epochs: Some(1), ..cfg(1) };
    let (full, _) = run(c.clone(), &shards, LoaderState::default());
    let state = full[3].1;
    let err = |c: LoaderConfig, shards: &[ShardSpec], s: LoaderState| Loader::new(c, shards.to_vec(), s).err();
    let other_seed = LoaderConfig { seed: 4, ..c.clone() };
    assert!(matches!(err(other_seed, &shards, state), Some(LoaderError::ResumeMismatch { .. })));
    let fewer = &shards[..5];
    let e = err(c.clone(), fewer, state).expect("refused");
    assert!(e.to_string().contains("another shard list"), "{e}");
    let recounted: Vec<ShardSpec> = shards.iter().map(|s| ShardSpec { samples: Some(9), ..s.clone() }).collect();
    assert!(matches!(err(c.clone(), &recounted, state), Some(LoaderError::ResumeMismatch { .. })));
    // Other workers or epochs are the same data: accepted.
    assert!(err(LoaderConfig { workers: 3, epochs: Some(5), ..c.clone() }, &shards, state).is_none());
    // An old state (no fingerprint) resumes to the same batches.
    let (old, _) = run(c.clone(), &shards, LoaderState { fingerprint: None, ..state });
    let expect: Vec<Vec<String>> = full[4..].iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(old.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), expect);
    let past = LoaderState { batch: full.len() as u64, fingerprint: None, ..state };
    assert!(matches!(err(c, &shards, past), Some(LoaderError::Config(_))));
}
