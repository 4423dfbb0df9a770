//! `cae-pipeline`: streams WebDataset shards into CAE training batches.
//!
//! Data flows one way: shard bytes -> [`wds::ShardSample`] -> [`decode::RgbImage`] -> two views +
//! mask -> batch. This crate knows nothing of burn.
//!
//! - [`wds`]: the shard format (shared with the sharder).
//! - [`decode`]: JPEG probing and decoding (zune-jpeg).

pub mod augment;
pub mod decode;
pub mod manifest;
pub mod mask;
pub mod wds;
