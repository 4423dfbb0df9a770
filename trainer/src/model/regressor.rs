//! Latent context regressor (spec §2.3, MS0 `necks/cae_neck.py` + `CrossMultiheadAttention`).

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, backend::Backend};

use super::attention::multi_head_attention;
use super::block::{Ffn, drop_path, drop_path_schedule};
use super::config::CaeConfig;
use super::fused;
use super::init::{TRUNC_NORMAL_STD, constant, layer_norm, trunc_normal, xavier_linear};
use super::linear::token_linear;

/// Cross-attention with separate q/k/v projections (no Linear bias), learnable q_bias and v_bias,
/// k bias fixed at 0, output projection with bias.
#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    /// W_q, D -> D, no bias.
    pub q: Linear<B>,
    /// W_k, D -> D, no bias.
    pub k: Linear<B>,
    /// W_v, D -> D, no bias.
    pub v: Linear<B>,
    /// Learnable query bias `[D]`.
    pub q_bias: Param<Tensor<B, 1>>,
    /// Learnable value bias `[D]`.
    pub v_bias: Param<Tensor<B, 1>>,
    /// Output projection.
    pub proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

impl<B: Backend> CrossAttention<B> {
    /// xavier-uniform per matrix, biases 0 (spec §2.6).
    pub fn new(dim: usize, num_heads: usize, device: &B::Device) -> Self {
        Self {
            q: xavier_linear(dim, dim, false, device),
            k: xavier_linear(dim, dim, false, device),
            v: xavier_linear(dim, dim, false, device),
            q_bias: constant([dim], 0.0, device),
            v_bias: constant([dim], 0.0, device),
            proj: xavier_linear(dim, dim, true, device),
            num_heads,
        }
    }

    /// Inputs are already normalised (and, for q and k, position-embedded) by the caller.
    ///
    /// # Shapes
    /// - q: `[b, nq, d]`, k: `[b, nk, d]`, v: `[b, nk, d]` -> `[b, nq, d]`
    pub fn forward(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = token_linear(&self.q, q) + self.q_bias.val().unsqueeze::<3>(); // [b, nq, d]
        let k = token_linear(&self.k, k); // [b, nk, d]
        let v = token_linear(&self.v, v) + self.v_bias.val().unsqueeze::<3>(); // [b, nk, d]
        let out = multi_head_attention(q, k, v, self.num_heads); // [b, nq, d]
        token_linear(&self.proj, out) // [b, nq, d]
    }
}

/// One regressor layer (spec §2.3; MS0 `TransformerEncoderLayer` with `cross` = True):
///
/// ```text
/// kv = [x_vis, q];  p_kv = [p_v, p_m]
/// x  = q + γ1 ⊙ CrossAttn(LN_q(q + p_m), LN_k(kv + p_kv), LN_v(kv))
/// x  = LN2(x)                      // the residual stream itself is normalised
/// q' = x + γ2 ⊙ FFN(x)
/// ```
#[derive(Module, Debug)]
pub struct RegressorLayer<B: Backend> {
    /// LN_q (MS0 `norm1_q_cross`).
    pub norm1_q: LayerNorm<B>,
    /// LN_k (MS0 `norm1_k_cross`).
    pub norm1_k: LayerNorm<B>,
    /// LN_v (MS0 `norm1_v_cross`).
    pub norm1_v: LayerNorm<B>,
    /// The cross-attention.
    pub cross_attn: CrossAttention<B>,
    /// Layer scale of the attention branch (MS0 `gamma_1_cross`).
    pub gamma_1: Param<Tensor<B, 1>>,
    /// LN2 applied to the residual stream (MS0 `norm2_cross`).
    pub norm2: LayerNorm<B>,
    /// MLP.
    pub ffn: Ffn<B>,
    /// Layer scale of the FFN branch (MS0 `gamma_2_cross`).
    pub gamma_2: Param<Tensor<B, 1>>,
    /// Drop-path rate.
    pub drop_path: f64,
    /// Epsilon of its LayerNorms (burn's `LayerNorm` keeps its own private).
    pub ln_eps: f64,
}

impl<B: Backend> RegressorLayer<B> {
    fn new(config: &CaeConfig, drop_path: f64, device: &B::Device) -> Self {
        let d = config.embed_dim;
        let eps = config.ln_eps;
        Self {
            norm1_q: layer_norm(d, eps, device),
            norm1_k: layer_norm(d, eps, device),
            norm1_v: layer_norm(d, eps, device),
            cross_attn: CrossAttention::new(d, config.num_heads, device),
            gamma_1: constant([d], config.layer_scale_init, device),
            norm2: layer_norm(d, eps, device),
            ffn: Ffn::new(d, config.mlp_dim, device),
            gamma_2: constant([d], config.layer_scale_init, device),
            drop_path,
            ln_eps: eps,
        }
    }

    /// # Shapes
    /// - q, pos_mask: `[b, n_mask, d]`; x_vis, pos_vis: `[b, n_vis, d]` -> `[b, n_mask, d]`
    pub fn forward(
        &self,
        q: Tensor<B, 3>,
        x_vis: Tensor<B, 3>,
        pos_mask: Tensor<B, 3>,
        pos_vis: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let kv = Tensor::cat(vec![x_vis, q.clone()], 1); // [b, N, d]
        let pos_kv = Tensor::cat(vec![pos_vis, pos_mask.clone()], 1); // [b, N, d]
        let out = self.cross_attn.forward(
            fused::layer_norm(&self.norm1_q, self.ln_eps, q.clone() + pos_mask), // [b, n_mask, d]
            fused::layer_norm(&self.norm1_k, self.ln_eps, kv.clone() + pos_kv),  // [b, N, d]
            fused::layer_norm(&self.norm1_v, self.ln_eps, kv), // [b, N, d] — values carry no position embedding
        ); // [b, n_mask, d]
        let x = q + drop_path(out * self.gamma_1.val().unsqueeze::<3>(), self.drop_path); // [b, n_mask, d]
        let x = fused::layer_norm(&self.norm2, self.ln_eps, x); // [b, n_mask, d]
        let f = self.ffn.forward(x.clone()) * self.gamma_2.val().unsqueeze::<3>(); // [b, n_mask, d]
        x + drop_path(f, self.drop_path) // [b, n_mask, d]
    }
}

/// The regressor: predicts the masked patches' latents from the visible ones (spec §2.3).
#[derive(Module, Debug)]
pub struct Regressor<B: Backend> {
    /// Learned query `[1, 1, D]` broadcast to every masked position (MS0 `neck.mask_token`).
    pub mask_token: Param<Tensor<B, 3>>,
    /// The layers; x_vis is never updated by them.
    pub layers: Vec<RegressorLayer<B>>,
    /// LN_reg after the last layer (MS0 `norm_regressor`).
    pub norm_regressor: LayerNorm<B>,
    /// Epsilon of its LayerNorms (burn's `LayerNorm` keeps its own private).
    pub ln_eps: f64,
}

impl<B: Backend> Regressor<B> {
    /// A freshly initialised regressor (spec §2.6: mask token trunc-normal 0.02).
    pub fn new(config: &CaeConfig, device: &B::Device) -> Self {
        let layers = drop_path_schedule(config.drop_path, config.regressor_depth)
            .into_iter()
            .map(|dp| RegressorLayer::new(config, dp, device))
            .collect();
        Self {
            mask_token: trunc_normal([1, 1, config.embed_dim], TRUNC_NORMAL_STD, device),
            layers,
            norm_regressor: layer_norm(config.embed_dim, config.ln_eps, device),
            ln_eps: config.ln_eps,
        }
    }

    /// latent_pred = LN_reg(q_L), with q_0 = mask_token.
    ///
    /// # Shapes
    /// - x_vis, pos_vis: `[b, n_vis, d]`; pos_mask: `[b, n_mask, d]` -> `[b, n_mask, d]`
    pub fn forward(&self, x_vis: Tensor<B, 3>, pos_vis: Tensor<B, 3>, pos_mask: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n_mask, d] = pos_mask.dims();
        let mut q = self.mask_token.val().expand([b, n_mask, d]); // [b, n_mask, d]
        for layer in &self.layers {
            q = layer.forward(q, x_vis.clone(), pos_mask.clone(), pos_vis.clone()); // [b, n_mask, d]
        }
        fused::layer_norm(&self.norm_regressor, self.ln_eps, q) // [b, n_mask, d]
    }
}
