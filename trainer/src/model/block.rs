//! Pre-norm ViT block with layer scale (spec §2.1 "Block"), shared by encoder, teacher and decoder.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Distribution, Tensor, backend::Backend};

use super::attention::Attention;
use super::fused::{self, gelu};
use super::init::{constant, layer_norm, xavier_linear};
use super::linear::token_linear;

/// FFN = Linear(D, M) -> GELU (exact erf) -> Linear(M, D) (MMCV `FFN`, spec §2.1).
///
/// Note: on the CPU backend the fused kernel ([`fused::gelu`]) computes both GELU and its
/// derivative exactly; burn's generic backward (used by the cubecl/cuda backend) differentiates
/// the tanh approximation instead, a ~1e-3 relative difference in the gradient only.
#[derive(Module, Debug)]
pub struct Ffn<B: Backend> {
    /// D -> M.
    pub fc1: Linear<B>,
    /// M -> D.
    pub fc2: Linear<B>,
}

impl<B: Backend> Ffn<B> {
    /// xavier-uniform weights, bias 0 (spec §2.6).
    pub fn new(dim: usize, hidden: usize, device: &B::Device) -> Self {
        Self { fc1: xavier_linear(dim, hidden, true, device), fc2: xavier_linear(hidden, dim, true, device) }
    }

    /// `[b, n, d]` -> `[b, n, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        token_linear(&self.fc2, gelu(token_linear(&self.fc1, x))) // [b, n, d]
    }
}

/// Stochastic depth on the residual branch: each sample's branch is dropped with probability
/// `p` and the kept ones scaled by 1/(1-p); identity when `p == 0` or autodiff is off.
pub fn drop_path<B: Backend>(x: Tensor<B, 3>, p: f64) -> Tensor<B, 3> {
    if p == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let keep = 1.0 - p;
    let b = x.dims()[0];
    let mask = Tensor::<B, 3>::random([b, 1, 1], Distribution::Bernoulli(keep), &x.device()) / keep; // [b, 1, 1]
    x * mask
}

/// `x += γ1 ⊙ Attn(LN1(x)); x += γ2 ⊙ FFN(LN2(x))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Pre-attention LayerNorm (MS0 name `ln1`).
    pub ln1: LayerNorm<B>,
    /// Self-attention with q/v bias.
    pub attn: Attention<B>,
    /// Layer scale of the attention branch, init 0.1.
    pub gamma_1: Param<Tensor<B, 1>>,
    /// Pre-FFN LayerNorm (MS0 name `ln2`).
    pub ln2: LayerNorm<B>,
    /// MLP.
    pub ffn: Ffn<B>,
    /// Layer scale of the FFN branch, init 0.1.
    pub gamma_2: Param<Tensor<B, 1>>,
    /// Drop-path rate of this block.
    pub drop_path: f64,
    /// Epsilon of its LayerNorms (burn's `LayerNorm` keeps its own private).
    pub ln_eps: f64,
}

impl<B: Backend> Block<B> {
    /// A freshly initialised block (spec §2.6).
    pub fn new(
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        ln_eps: f64,
        layer_scale_init: f64,
        drop_path: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            ln1: layer_norm(dim, ln_eps, device),
            attn: Attention::new(dim, num_heads, device),
            gamma_1: constant([dim], layer_scale_init, device),
            ln2: layer_norm(dim, ln_eps, device),
            ffn: Ffn::new(dim, mlp_dim, device),
            gamma_2: constant([dim], layer_scale_init, device),
            drop_path,
            ln_eps,
        }
    }

    /// `[b, n, d]` -> `[b, n, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = self.attn.forward(fused::layer_norm(&self.ln1, self.ln_eps, x.clone()))
            * self.gamma_1.val().unsqueeze::<3>(); // [b, n, d]
        let x = x + drop_path(a, self.drop_path); // [b, n, d]
        let f = self.ffn.forward(fused::layer_norm(&self.ln2, self.ln_eps, x.clone()))
            * self.gamma_2.val().unsqueeze::<3>(); // [b, n, d]
        x + drop_path(f, self.drop_path) // [b, n, d]
    }
}

/// Drop-path rates linearly spaced from 0 to `max` over `depth` blocks (timm/BEiT convention).
pub fn drop_path_schedule(max: f64, depth: usize) -> Vec<f64> {
    if depth <= 1 {
        return vec![0.0; depth];
    }
    (0..depth).map(|i| max * i as f64 / (depth - 1) as f64).collect()
}
