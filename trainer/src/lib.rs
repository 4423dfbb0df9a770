//! CAE (Context Autoencoder, arXiv 2202.03026) pre-training with burn.
//!
//! Layout:
//! - [`model`]: the network, one file per part of spec §2 (encoder, regressor, decoder, the
//!   teacher copy, the DALL-E tokenizer of §3), generic over `B: Backend`.
//! - [`optim`]: spec §4 — warmup + cosine lr schedule, AdamW with MS0's no-decay groups,
//!   global-norm gradient clipping.
//! - [`config`]: the TOML run config ([`config::RunConfig`]: preset + overrides).
//! - [`train`]: the training loop of `trainer run` (pipeline -> device -> step -> logs).
//! - [`checkpoint`]: atomic checkpoint files with exact resume state.
//! - [`weights`]: the one door weights come in through (our checkpoints, run dirs, mmselfsup
//!   `.pth`, the DALL-E tokenizer's file) and the audited `torch.save` reader.
//! - [`metrics`]: the Prometheus series (`cae_train_*`).
//! - [`export`]: the encoder as safetensors with timm / mmselfsup names (spec §5).
//! - [`features`]: `trainer features` (frozen encoder features of a shard set); [`knn`]: the
//!   weighted k-NN of `trainer eval knn`.
//! - [`bench`]: `trainer bench` (synthetic compute-only steps vs the real pipeline).
//! - [`builtin`]: the built-in sample set of the no-argument run.
//! - [`cli`]: the `trainer` command line; the only place that picks a backend.
//! - [`error`]: the crate's typed error, [`CaeError`].
//! - [`amp`]: mixed precision (autocast of the products; f32 master weights).
//! - [`readback`]: every device -> host read, counted (`cae_train_host_syncs_total`).
//!
//! One training step: `tokens = tokenizer.tokens(map_pixels(view2))`, `out = model.forward(view1,
//! visible_idx, masked_idx, &CaeTargets::Tokens(tokens))?`, `grads = out.loss.backward()`,
//! `model = model.update_teacher()` (before the step, spec §2.2), then `optimizer.step(lr(t), ...)`.
//!
//! The backend type is chosen only in [`cli`] (CPU: burn-flex; GPU: the `cuda` feature).

/// `println!` that never panics: when stdout is closed (`trainer run | head`) the output stops
/// and the run goes on.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that never panics (a closed stderr stops that output, not the run).
macro_rules! say_err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

pub mod amp;
pub mod bench;
pub mod builtin;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod dist;
pub mod error;
pub mod export;
pub mod features;
pub mod flops;
pub mod gpu_check;
pub mod knn;
pub mod linear_probe;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod precision;
pub mod readback;
pub mod run_dir;
pub mod tokens;
pub mod train;
pub mod weights;

pub use error::CaeError;
