//! `cae-sharder`: turns an ImageNet-style folder into reproducible WebDataset tar shards.
//!
//! - [`input`]: listing class folders (torchvision ImageFolder order) or a `path<TAB>class` list.
//! - [`process`]: one file -> a sample (kept, converted, resized) or a rejection with its reason.
//! - [`build`]: the seeded shuffle, parallel validation, ordered atomic shard writing, resume.
//! - [`verify`]: checks a shard directory against its manifest.
//!
//! The tar/WebDataset format itself lives in `cae_pipeline::wds`, shared with the loader.

pub mod build;
pub mod error;
pub mod input;
pub mod process;
pub mod verify;

pub use build::{BuildOptions, BuildReport, build};
pub use error::ShardError;
pub use process::Validate;
pub use verify::{VerifyReport, verify};
