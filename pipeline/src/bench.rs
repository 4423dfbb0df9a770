//! What `pipeline bench` measures besides throughput: the decode-only baseline (the same
//! shards' images decoded whole on one thread, to compare the pipeline's per-core rate against)
//! and the cost of resuming inside an epoch.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::decode::{self, Format, RgbImage};
use crate::http::HttpConfig;
use crate::loader::{batches_per_epoch, data_fingerprint};
use crate::read::{ReadConfig, check_sample, open_shard};
use crate::source::ShardSpec;
use crate::wds::SampleReader;
use crate::{LabelPolicy, Loader, LoaderConfig, LoaderError, LoaderState};

/// Up to `max` image members of the first shards (the member the loader decodes: JPEG, PNG,
/// WebP, ...), read in list order, local or remote (fetched into memory, so the timing that
/// follows measures decoding only), each with its format (from its bytes).
pub fn sample_images(shards: &[ShardSpec], http: &HttpConfig, max: usize) -> Result<Vec<(Format, Vec<u8>)>, String> {
    let read = ReadConfig { http: http.clone(), ..ReadConfig::default() };
    let fetcher = read.fetcher(shards).map_err(|e| format!("HTTP client: {e}"))?;
    let mut images = Vec::new();
    for s in shards {
        if images.len() >= max {
            break;
        }
        let reader = open_shard(s, fetcher.as_ref()).map_err(|e| format!("opening {}: {e}", s.url))?;
        for sample in SampleReader::new(reader) {
            // A broken sample is skipped here (the pipeline run counts it); a broken shard ends.
            let Ok(sample) = sample else { continue };
            if let Ok(c) = check_sample(&sample, LabelPolicy::Optional) {
                images.push((c.format, c.image.to_vec()));
            }
            if images.len() >= max {
                break;
            }
        }
    }
    if images.is_empty() {
        return Err("no image members in the shards to measure decoding on".into());
    }
    Ok(images)
}

/// Decodes every image whole, on this thread, twice; the faster pass counts (on a busy machine
/// this keeps the ratio conservative). Returns (images per second, images decoded). JPEGs go to
/// zune-jpeg as stored (no EXIF turn: the baseline is the decoder alone), other formats to the
/// decoder the loader uses for them.
pub fn decode_only_rate(images: &[(Format, Vec<u8>)]) -> (f64, usize) {
    let mut img = RgbImage::default();
    let max_pixels = ReadConfig::default().max_pixels();
    let mut decode = |f: Format, b: &[u8]| match f {
        Format::Jpeg => decode::decode_jpeg_into(b, true, &mut img),
        other => decode::decode_other_into(b, other, max_pixels, &mut img),
    };
    let (mut ok, mut best) = (0usize, f64::INFINITY);
    for _ in 0..2 {
        let t = Instant::now();
        ok = images.iter().filter(|(f, b)| decode(*f, b).is_ok()).count();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (ok as f64 / best, ok)
}

/// What resuming inside an epoch costs (issue 16): the shards read to reach the saved position
/// and the time to the first batch after it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResumeCost {
    /// The position resumed at: batches already delivered in epoch 0.
    pub at_batch: u64,
    pub batches_per_epoch: u64,
    /// Shards opened to rebuild the position (`LoaderStats::resume_shards_read`).
    pub shards_read: u64,
    /// The documented bound: `shuffle_buffer / samples_per_shard + 2` shards per rank.
    pub shards_bound: u64,
    /// From opening the loader at the position to its first batch (decoding included).
    pub seconds_to_first_batch: f64,
}

/// Opens a loader at `fraction` of epoch 0 (a state as a checkpoint saves it, with the
/// fingerprint of `cfg` and `shards`) and measures what reaching that position costs. `None`
/// when the shards carry no sample counts: the position is then replayed from the epoch's start.
pub fn resume_cost(cfg: &LoaderConfig, shards: &[ShardSpec], fraction: f64) -> Result<Option<ResumeCost>, LoaderError> {
    let Some(per_epoch) = batches_per_epoch(shards, cfg.batch_size, cfg.world_size) else {
        return Ok(None);
    };
    let counts: Vec<u64> = shards.iter().filter_map(|s| s.samples).collect();
    let per_shard = (counts.iter().sum::<u64>() / counts.len().max(1) as u64).max(1);
    let at = ((per_epoch as f64 * fraction.clamp(0.0, 1.0)) as u64).min(per_epoch.saturating_sub(1));
    let state = LoaderState {
        epoch: 0,
        batch: at,
        consumed: at * cfg.batch_size as u64,
        replay: false,
        fingerprint: Some(data_fingerprint(cfg, shards)),
    };
    let t = Instant::now();
    let loader = Loader::new(cfg.clone(), shards.to_vec(), state)?;
    loader.next_blocking().transpose()?;
    let seconds_to_first_batch = t.elapsed().as_secs_f64();
    Ok(Some(ResumeCost {
        at_batch: at,
        batches_per_epoch: per_epoch,
        shards_read: loader.stats().resume_shards_read.load(Ordering::Relaxed),
        shards_bound: cfg.shuffle_buffer as u64 / per_shard + 2,
        seconds_to_first_batch,
    }))
}
