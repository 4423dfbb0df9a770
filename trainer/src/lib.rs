//! CAE (Context Autoencoder, arXiv 2202.03026) pre-training with burn.
//!
//! Layout:
//! - [`model`]: the network, one file per part of spec §2 (encoder, regressor, decoder, the
//!   teacher copy, the DALL-E tokenizer of §3), generic over `B: Backend`.
//! - [`optim`]: spec §4 — warmup + cosine lr schedule, AdamW with MS0's no-decay groups,
//!   global-norm gradient clipping.
//! - [`error`]: the crate's typed error, [`CaeError`].
//!
//! One training step: `tokens = tokenizer.tokens(map_pixels(view2))`, `out = model.forward(view1,
//! visible_idx, masked_idx, &CaeTargets::Tokens(tokens))?`, `grads = out.loss.backward()`,
//! `model = model.update_teacher()` (before the step, spec §2.2), then `optimizer.step(lr(t), ...)`.
//!
//! The backend type is chosen only in binaries and tests (CPU: burn-flex; GPU: the `cuda` feature).

pub mod error;
pub mod gpu_check;
pub mod model;
pub mod optim;
pub mod tokens;

pub use error::CaeError;
