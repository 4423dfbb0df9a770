//! The CAE network (spec §2) and its tokenizer (spec §3), one file per part.
//!
//! Data flow of one step (shapes for ViT-B, B = batch):
//! `images [B,3,224,224]` -> [`Encoder`] on the 121 visible patches -> `x_vis [B,121,768]`
//! -> [`Regressor`] (queries = mask token + masked pos) -> `latent_pred [B,75,768]`
//! -> [`Decoder`] -> logits `[B,75,8192]`; in parallel the frozen teacher (an [`Encoder`]) on the
//! 75 masked patches gives `latent_target [B,75,768]`. Losses: [`Cae::forward`].

pub mod attention;
pub mod block;
pub mod cae;
pub mod config;
pub mod dalle;
pub mod decoder;
pub mod encoder;
pub mod fused;
pub mod init;
pub mod linear;
pub mod pos_embed;
pub mod regressor;

pub use cae::{
    Cae, CaeForward, CaeOutput, CaeTargets, MaskIndices, mask_index_tensors, mask_to_indices, pixel_targets,
    pixel_targets_eps, raw_pixel_targets,
};
pub use config::{CaeConfig, TargetKind};
pub use dalle::{DalleConfig, DalleEncoder, map_pixels};
pub use decoder::Decoder;
pub use encoder::Encoder;
pub use regressor::Regressor;

#[cfg(test)]
mod tests;
