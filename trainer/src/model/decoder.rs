//! Decoder and prediction head (spec §2.4).

use burn::module::Module;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, backend::Backend};

use super::block::{Block, drop_path_schedule};
use super::config::CaeConfig;
use super::fused;
use super::init::{TRUNC_NORMAL_STD, layer_norm, trunc_normal, xavier_linear};
use super::linear::token_linear;

/// `y = latent_pred + p_m` -> pre-norm blocks -> LN_dec -> head.
///
/// The blocks use q/v bias only; MS0 HEAD's extra k bias cancels in the softmax (spec §2.4).
/// The head maps D to the vocabulary (`dalle` target) or to patch_size²·3 pixels (`pixels`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// The decoder blocks.
    pub layers: Vec<Block<B>>,
    /// LN_dec (MS0 `norm_decoder`).
    pub norm_decoder: LayerNorm<B>,
    /// Epsilon of its LayerNorms (burn's `LayerNorm` keeps its own private).
    pub ln_eps: f64,
    /// Prediction head, weight trunc-normal 0.02, bias 0 (spec §2.6).
    pub head: Linear<B>,
}

impl<B: Backend> Decoder<B> {
    /// A freshly initialised decoder + head.
    pub fn new(config: &CaeConfig, device: &B::Device) -> Self {
        let d = config.embed_dim;
        let layers = drop_path_schedule(config.drop_path, config.decoder_depth)
            .into_iter()
            .map(|dp| {
                Block::new(d, config.num_heads, config.mlp_dim, config.ln_eps, config.layer_scale_init, dp, device)
            })
            .collect();
        let out = config.head_out_dim();
        let mut head = xavier_linear(d, out, true, device);
        head.weight = trunc_normal([d, out], TRUNC_NORMAL_STD, device);
        Self { layers, norm_decoder: layer_norm(d, config.ln_eps, device), ln_eps: config.ln_eps, head }
    }

    /// # Shapes
    /// - latent_pred, pos_mask: `[b, n_mask, d]` -> `[b, n_mask, out]`
    pub fn forward(&self, latent_pred: Tensor<B, 3>, pos_mask: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut y = latent_pred + pos_mask; // [b, n_mask, d]
        for layer in &self.layers {
            y = layer.forward(y); // [b, n_mask, d]
        }
        token_linear(&self.head, fused::layer_norm(&self.norm_decoder, self.ln_eps, y)) // [b, n_mask, out]
    }
}
