//! A data-parallel run's start ([`crate::dist`]): each rank's view of the data, its random
//! stream, and the same weights and optimizer state on every rank.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use cae_pipeline::loader::LoaderConfig;

use crate::CaeError;
use crate::checkpoint::{decode_record, encode_record};
use crate::dist::{Dist, digest};
use crate::model::Cae;
use crate::optim::{CaeOptimizer, OptimConfig};

/// The loader config of this rank: its part of the samples (the loader splits them by sample
/// count, every rank gets the same number of batches per epoch) and, when `data.workers` is 0
/// (all cores), the cores of this machine divided among its ranks.
pub fn rank_data(data: &LoaderConfig, dist: &Dist) -> LoaderConfig {
    let mut d = data.clone();
    d.rank = dist.rank;
    d.world_size = dist.world;
    if d.workers == 0 && dist.local_world > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        d.workers = (cores / dist.local_world).max(1);
    }
    d
}

/// The seed of burn's per-step random stream (drop path) on `rank`: the run's seed on rank 0
/// (a single process is unchanged), a different stream on every other rank.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    match rank {
        0 => seed,
        r => seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

/// A model and its optimizer.
type ModelAndOptimizer<B> = (Cae<B>, CaeOptimizer<B, Cae<B>>);

/// Rank 0's weights and optimizer state on every rank (broadcast once), then a digest of the
/// weights checked on every rank. A single process returns them unchanged.
pub fn same_start<B: AutodiffBackend>(
    dist: &Dist,
    model: Cae<B>,
    optimizer: CaeOptimizer<B, Cae<B>>,
    optim_config: &OptimConfig,
    device: &B::Device,
) -> Result<ModelAndOptimizer<B>, CaeError> {
    if !dist.is_parallel() {
        return Ok((model, optimizer));
    }
    let here = Path::new("the start broadcast");
    let (mine_model, mine_optim) = match dist.is_root() {
        true => (encode_record::<B, _>(model.clone().into_record())?, encode_record::<B, _>(optimizer.to_record())?),
        false => (Vec::new(), Vec::new()),
    };
    let model_bytes = dist.broadcast(mine_model);
    let optim_bytes = dist.broadcast(mine_optim);
    let sent = digest(&model_bytes);
    let (model, optimizer) = match dist.is_root() {
        true => (model, optimizer),
        false => {
            let model = model.load_record(decode_record::<B, _>(model_bytes, "rank 0's weights", here, device)?);
            // The optimizer's state and groups are keyed by parameter id, which the model record
            // restores: built again from the loaded model.
            let record = decode_record::<B, _>(optim_bytes, "rank 0's optimizer", here, device)?;
            drop(optimizer);
            let optimizer = CaeOptimizer::new(optim_config, &model).load_record(record);
            (model, optimizer)
        }
    };
    let held = match dist.is_root() {
        true => sent,
        false => digest(&encode_record::<B, _>(model.clone().into_record())?),
    };
    if !dist.same_everywhere(held) {
        return Err(CaeError::Data(format!(
            "rank {}: the weights differ between ranks after rank 0's broadcast (digest {held:08x} here, {sent:08x} \
             sent)",
            dist.rank
        )));
    }
    Ok((model, optimizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zero_keeps_the_run_seed_and_others_differ() {
        assert_eq!(rank_seed(7, 0), 7);
        let seeds: std::collections::HashSet<u64> = (0..8).map(|r| rank_seed(7, r)).collect();
        assert_eq!(seeds.len(), 8);
    }

    #[test]
    fn one_process_keeps_its_loader_config() {
        let data = LoaderConfig::default();
        assert_eq!(rank_data(&data, &Dist::single()), data);
    }
}
