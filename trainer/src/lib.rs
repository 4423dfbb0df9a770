//! CAE (Context Autoencoder, arXiv 2202.03026) pre-training with burn.
//!
//! Layout:
//! - [`model`]: the network, one file per part of spec §2 (encoder, regressor, decoder, the
//!   teacher copy, the DALL-E tokenizer of §3), generic over `B: Backend`.
//! - [`error`]: the crate's typed error, [`CaeError`].
//!
//! The backend type is chosen only in binaries and tests (CPU: burn-flex; GPU: the `cuda` feature).

pub mod error;
pub mod model;
pub mod optim;

pub use error::CaeError;
