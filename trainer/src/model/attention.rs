//! Multi-head self-attention with BEiT-style q/v bias (spec §2.1 "Attention").

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Tensor, activation::softmax, backend::Backend};

use super::init::{constant, xavier_linear};
use super::linear::token_linear;

/// Splits `[b, n, d]` into heads `[b, h, n, d/h]` (head i = channels `i·d/h .. (i+1)·d/h`).
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, n, d] = x.dims();
    x.reshape([b, n, heads, d / heads]).swap_dims(1, 2) // [b, h, n, hd]
}

/// Attention probabilities softmax(Q·Kᵀ·hd^-0.5) per head.
///
/// # Shapes
/// - q: `[b, nq, d]`, k: `[b, nk, d]` -> `[b, h, nq, nk]`
pub fn attention_weights<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let hd = q.dims()[2] / heads;
    let q = split_heads(q, heads) * (hd as f64).powf(-0.5); // [b, h, nq, hd]
    let k = split_heads(k, heads); // [b, h, nk, hd]
    softmax(q.matmul(k.swap_dims(2, 3)), 3) // [b, h, nq, nk]
}

/// softmax(Q·Kᵀ·scale)·V over `heads` heads, the shared core of self- and cross-attention.
///
/// # Shapes
/// - q: `[b, nq, d]`, k: `[b, nk, d]`, v: `[b, nk, d]` (already projected, biases added)
/// - output: `[b, nq, d]`
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
) -> Tensor<B, 3> {
    let [b, nq, d] = q.dims();
    let attn = attention_weights(q, k, heads); // [b, h, nq, nk]
    let v = split_heads(v, heads); // [b, h, nk, hd]
    attn.matmul(v).swap_dims(1, 2).reshape([b, nq, d]) // [b, nq, d]
}

/// Self-attention: `qkv = x·W + [q_bias, 0, v_bias]`, `qkv` Linear without bias, k bias fixed 0.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Fused projection D -> 3D (q = channels 0..D, k = D..2D, v = 2D..3D), no bias.
    pub qkv: Linear<B>,
    /// Learnable query bias `[D]`.
    pub q_bias: Param<Tensor<B, 1>>,
    /// Learnable value bias `[D]`.
    pub v_bias: Param<Tensor<B, 1>>,
    /// Output projection D -> D with bias.
    pub proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// MS0 init (spec §2.6): xavier-uniform over the whole fused qkv matrix, biases 0.
    pub fn new(dim: usize, num_heads: usize, device: &B::Device) -> Self {
        Self {
            qkv: xavier_linear(dim, 3 * dim, false, device),
            q_bias: constant([dim], 0.0, device),
            v_bias: constant([dim], 0.0, device),
            proj: xavier_linear(dim, dim, true, device),
            num_heads,
        }
    }

    /// # Shapes
    /// - x: `[b, n, d]` -> `[b, n, d]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let device = x.device();
        let d = x.dims()[2];
        // k bias is a constant 0 (spec §2.1), so no gradient is created for it.
        let bias = Tensor::cat(vec![self.q_bias.val(), Tensor::zeros([d], &device), self.v_bias.val()], 0); // [3d]
        self.forward_with_qkv_bias(x, bias)
    }

    /// Forward with an explicit fused bias `[3d]` (used to check that a k bias cancels, spec §2.4).
    pub fn forward_with_qkv_bias(&self, x: Tensor<B, 3>, qkv_bias: Tensor<B, 1>) -> Tensor<B, 3> {
        let qkv = token_linear(&self.qkv, x) + qkv_bias.unsqueeze::<3>(); // [b, n, 3d]
        let mut parts = qkv.chunk(3, 2).into_iter(); // 3 x [b, n, d]
        let (q, k, v) = match (parts.next(), parts.next(), parts.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            // chunk(3) of a 3d-wide axis always yields three equal parts.
            _ => unreachable!("chunk(3) of a 3d-wide axis yields 3 parts"),
        };
        let out = multi_head_attention(q, k, v, self.num_heads); // [b, n, d]
        token_linear(&self.proj, out) // [b, n, d]
    }
}
