//! What `pipeline bench` measures besides throughput: the decode-only baseline (the same
//! shards' JPEGs decoded whole on one thread, to compare the pipeline's per-core rate against)
//! and the cost of resuming inside an epoch.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::decode;
use crate::http::{HttpConfig, HttpFetcher};
use crate::loader::{batches_per_epoch, data_fingerprint};
use crate::source::ShardSpec;
use crate::wds::{IMAGE_EXTS, SampleReader};
use crate::{Loader, LoaderConfig, LoaderError, LoaderState};

/// Up to `max` JPEG members (`.jpg`/`.jpeg`) of the first shards, read in list order, local or
/// remote (fetched into memory, so the timing that follows measures decoding only).
pub fn sample_jpegs(shards: &[ShardSpec], http: &HttpConfig, max: usize) -> Result<Vec<Vec<u8>>, String> {
    let fetcher = if shards.iter().any(ShardSpec::is_http) {
        Some(HttpFetcher::new(http).map_err(|e| format!("HTTP client: {e}"))?)
    } else {
        None
    };
    let mut jpgs = Vec::new();
    for s in shards {
        if jpgs.len() >= max {
            break;
        }
        let shown = crate::redact::url(&s.url);
        let reader = crate::loader::open_shard(s, fetcher.as_ref()).map_err(|e| format!("opening {shown}: {e}"))?;
        for sample in SampleReader::new(reader) {
            // A broken sample is skipped here (the pipeline run counts it); a broken shard ends.
            let Ok(sample) = sample else { continue };
            let jpeg = IMAGE_EXTS[..2].iter().find_map(|&ext| sample.get(ext));
            if let Some(b) = jpeg {
                jpgs.push(b.to_vec());
            }
            if jpgs.len() >= max {
                break;
            }
        }
    }
    if jpgs.is_empty() {
        return Err("no JPEG images in the shards to measure decoding on".into());
    }
    Ok(jpgs)
}

/// Decodes every image whole, on this thread, twice; the faster pass counts (on a busy machine
/// this keeps the ratio conservative). Returns (images per second, images decoded).
pub fn decode_only_rate(jpgs: &[Vec<u8>]) -> (f64, usize) {
    let mut img = decode::RgbImage::default();
    let (mut ok, mut best) = (0usize, f64::INFINITY);
    for _ in 0..2 {
        let t = Instant::now();
        ok = jpgs.iter().filter(|j| decode::decode_jpeg_into(j, true, &mut img).is_ok()).count();
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
