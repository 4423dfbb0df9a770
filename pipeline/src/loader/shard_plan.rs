//! Which shards each rank reads in an epoch, how long an epoch is, and the fingerprint of what
//! a saved [`LoaderState`](super::LoaderState) refers to.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::{LoaderConfig, SHARD_SALT, mix};
use crate::source::ShardSpec;

/// The shards of `rank` in `epoch`, in reading order: all shards shuffled with (seed, epoch),
/// then dealt greedily by sample count — each to the rank with the fewest samples so far (the
/// lowest rank on ties) — so that ranks differ by at most one shard's worth. Without counts
/// (one rank only), round-robin.
pub fn epoch_shards(shards: &[ShardSpec], seed: u64, epoch: u64, rank: usize, world_size: usize) -> Vec<usize> {
    let world = world_size.max(1);
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, SHARD_SALT])));
    let Some(counts) = shards.iter().map(|s| s.samples).collect::<Option<Vec<u64>>>() else {
        return order.into_iter().skip(rank).step_by(world).collect();
    };
    let mut loads = vec![0u64; world];
    let mut mine = Vec::new();
    for s in order {
        let r = (0..world).min_by_key(|&r| (loads[r], r)).unwrap_or(0);
        loads[r] += counts[s];
        if r == rank {
            mine.push(s);
        }
    }
    mine
}

/// What a [`LoaderState`] refers to: a hash of the shard names and counts and of every setting
/// that shapes the batches (not `workers`, `prefetch`, `epochs`, failure tolerances or HTTP
/// settings, which can change between a run and its resume).
pub fn data_fingerprint(cfg: &LoaderConfig, shards: &[ShardSpec]) -> u64 {
    let mut h = Sha256::new();
    let shaping = serde_json::json!({
        "batch_size": cfg.batch_size,
        "shuffle_buffer": cfg.shuffle_buffer,
        "shuffle_buffer_bytes": cfg.shuffle_buffer_bytes,
        "seed": cfg.seed,
        "rank": cfg.rank,
        "world_size": cfg.world_size,
        "max_pixels": cfg.max_pixels,
        "max_member_bytes": cfg.max_member_bytes,
        "labels": cfg.labels,
        "augment": cfg.augment,
        "mask": cfg.mask,
    });
    h.update(shaping.to_string().as_bytes());
    for s in shards {
        h.update(s.name().as_bytes());
        h.update([0]);
        h.update(s.samples.map_or(u64::MAX, |n| n).to_le_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Batches per epoch on every rank, when every shard's sample count is known.
pub fn batches_per_epoch(shards: &[ShardSpec], batch_size: usize, world_size: usize) -> Option<u64> {
    let total: u64 = shards.iter().map(|s| s.samples).sum::<Option<u64>>()?;
    Some(total / (world_size.max(1) as u64 * batch_size.max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(counts: &[Option<u64>]) -> Vec<ShardSpec> {
        counts.iter().enumerate().map(|(i, &samples)| ShardSpec { url: format!("s{i}.tar").into(), samples }).collect()
    }

    #[test]
    fn shard_split_covers_every_shard_once_per_epoch() {
        for shards in [specs(&[Some(10); 13]), specs(&[None; 13])] {
            for world in 1..5 {
                let mut all: Vec<usize> = (0..world).flat_map(|r| epoch_shards(&shards, 7, 2, r, world)).collect();
                all.sort();
                assert_eq!(all, (0..13).collect::<Vec<_>>());
            }
            assert_ne!(epoch_shards(&shards, 7, 0, 0, 1), epoch_shards(&shards, 7, 1, 0, 1), "epochs reshuffle");
            assert_eq!(epoch_shards(&shards, 7, 1, 0, 1), epoch_shards(&shards, 7, 1, 0, 1));
        }
    }

    /// Regression: shards were dealt by count, so with uneven shards one rank could get far
    /// more samples than another. Dealt greedily by samples, ranks differ by at most the
    /// largest shard, in every epoch.
    #[test]
    fn ranks_split_by_sample_count_within_one_shard() {
        let counts: Vec<Option<u64>> = (0..23u64).map(|i| Some(if i % 4 == 0 { 100 } else { 7 + i })).collect();
        let shards = specs(&counts);
        let largest = 100;
        for world in [2usize, 3, 4] {
            for epoch in 0..5 {
                let loads: Vec<u64> = (0..world)
                    .map(|r| epoch_shards(&shards, 3, epoch, r, world).iter().map(|&s| counts[s].unwrap()).sum())
                    .collect();
                let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
                assert!(hi - lo <= largest, "world {world} epoch {epoch}: {loads:?}");
            }
        }
    }

    #[test]
    fn the_fingerprint_covers_shards_counts_and_shaping_settings_only() {
        let shards = specs(&[Some(10), Some(12)]);
        let cfg = LoaderConfig::default();
        let f = data_fingerprint(&cfg, &shards);
        assert_eq!(
            f,
            data_fingerprint(&LoaderConfig { workers: 3, prefetch: 9, epochs: Some(4), ..cfg.clone() }, &shards)
        );
        assert_ne!(f, data_fingerprint(&LoaderConfig { seed: 1, ..cfg.clone() }, &shards));
        assert_ne!(f, data_fingerprint(&LoaderConfig { shuffle_buffer: 10, ..cfg.clone() }, &shards));
        assert_ne!(f, data_fingerprint(&cfg, &specs(&[Some(10), Some(13)])));
        assert_ne!(f, data_fingerprint(&cfg, &specs(&[Some(10)])));
    }

    #[test]
    fn epoch_length_from_counts() {
        let s = |n| ShardSpec { url: "x".into(), samples: Some(n) };
        assert_eq!(batches_per_epoch(&[s(100), s(100), s(57)], 16, 2), Some(257 / 32));
        assert_eq!(batches_per_epoch(&[s(1), ShardSpec { url: "y".into(), samples: None }], 1, 1), None);
    }
}
