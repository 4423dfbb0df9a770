//! The decode-only baseline of `pipeline bench`: the same shards' JPEGs decoded whole on one
//! thread, to compare the pipeline's per-core rate against.

use std::time::Instant;

use crate::decode;
use crate::http::{HttpConfig, HttpFetcher};
use crate::source::ShardSpec;
use crate::wds::{IMAGE_EXTS, SampleReader};

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
