//! `cae-pipeline`: streams WebDataset shards into CAE training batches.
//!
//! Data flows one way: shard bytes -> [`wds::ShardSample`] -> [`decode::RgbImage`] -> two views
//! ([`augment`]) + mask ([`mask`]) -> [`batch::Batch`]. [`loader::Loader`] runs it on a fixed pool
//! of threads with bounded memory and exact resume. This crate knows nothing of burn.
//!
//! - [`wds`]: the shard format (shared with the sharder); [`manifest`]: `manifest.json`.
//! - [`source`]: shard lists (paths, URLs, brace patterns, manifest directories); [`http`]: streaming
//!   HTTP reads on tokio with retries; [`redact`]: secrets out of what is shown.
//! - [`read`]: the front half the loader and the eval reader share — open, member cap, sample
//!   policy (labels, image member by content, pixel cap), failed-shard policy — with one
//!   [`read::ReadConfig`].
//! - [`decode`]: JPEG probing and decoding (zune-jpeg); [`guard`]: panics in untrusted-input
//!   code contained as errors.
//! - [`augment`]: flip + one RandomResizedCrop box -> 224 bicubic and 112 Lanczos views (spec §1).
//! - [`mask`]: the block-wise mask generator (spec §1.1).
//! - [`batch`]: the `Batch` contract and normalisation; [`loader`]: the threads; [`metrics`]: names.
//! - [`ordered_map`]: the bounded ordered parallel map the loader, the eval reader and the sharder
//!   run on; [`bad_sample`]: how a bad sample is reported.
//! - [`bench`]: the decode-only baseline `pipeline bench` compares against.
//! - [`signals`]: SIGINT/SIGTERM/SIGHUP as a stop flag, for the long commands of every binary.
//! - [`eval`]: every sample once, in order, resized + centre-cropped (the test transform), for features.

pub mod augment;
pub mod bad_sample;
pub mod batch;
pub mod bench;
pub mod decode;
pub mod eval;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod http;
pub mod loader;
pub mod manifest;
pub mod mask;
pub mod metrics;
pub mod ordered_map;
pub mod read;
pub mod redact;
pub mod signals;
pub mod source;
pub mod wds;

pub use batch::Batch;
pub use loader::{LabelPolicy, Loader, LoaderConfig, LoaderError, LoaderState};
