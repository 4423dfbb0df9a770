//! Multi-head self-attention with BEiT-style q/v bias (spec §2.1 "Attention").

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Tensor, backend::Backend};

use super::fused::{cross_attention, self_attention, softmax_last};
use super::init::{constant, xavier_linear};
use super::linear::token_linear;

/// Splits `[b, n, d]` into heads `[b, h, n, d/h]` (head i = channels `i·d/h .. (i+1)·d/h`).
/// A view: no copy when `x` is contiguous.
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, n, d] = x.dims();
    x.reshape([b, n, heads, d / heads]).swap_dims(1, 2) // [b, h, n, hd]
}

/// Attention probabilities softmax(Q·Kᵀ·hd^-0.5) per head.
///
/// # Shapes
/// - q: `[b, nq, d]`, k: `[b, nk, d]` -> `[b, h, nq, nk]`
pub fn attention_weights<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    head_weights(split_heads(q, heads), split_heads(k, heads))
}

/// softmax(Q·Kᵀ·hd^-0.5) on per-head tensors. The scale multiplies the (contiguous) scores, as
/// PyTorch's reference attention does, rather than a strided view of Q.
///
/// # Shapes
/// - q: `[b, h, nq, hd]`, k: `[b, h, nk, hd]` (views allowed) -> `[b, h, nq, nk]`
fn head_weights<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
    let hd = q.dims()[3];
    softmax_last(crate::amp::matmul(q, k.swap_dims(2, 3)) * (hd as f64).powf(-0.5)) // [b, h, nq, nk]
}

/// softmax(Q·Kᵀ·scale)·V on per-head tensors, heads merged back into channels. Under
/// [`crate::amp::autocast`] both products run in the half type; the softmax stays f32.
///
/// # Shapes
/// - q: `[b, h, nq, hd]`, k, v: `[b, h, nk, hd]` (views allowed) -> `[b, nq, h·hd]`
fn attend_heads<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, nq, hd] = q.dims();
    crate::amp::matmul(head_weights(q, k), v).swap_dims(1, 2).reshape([b, nq, h * hd]) // [b, nq, d]
}

/// softmax(Q·Kᵀ·scale)·V over `heads` heads, the core of the cross-attention.
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
    cross_attention(q, k, v, heads, |q, k, v| {
        attend_heads(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)) // [b, nq, d]
    })
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
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let qkv = token_linear(&self.qkv, x) + qkv_bias.unsqueeze::<3>(); // [b, n, 3d]
        let out = self_attention(qkv, h, |qkv| {
            // Channel c = (part·h + head)·hd + j, so one reshape + swap gives every part's heads
            // as strided views (q = parts 0..h, k = h..2h, v = 2h..3h) that the matmuls read.
            let heads = qkv.reshape([b, n, 3 * h, d / h]).swap_dims(1, 2); // [b, 3h, n, hd]
            let q = heads.clone().narrow(1, 0, h); // [b, h, n, hd]
            let k = heads.clone().narrow(1, h, h); // [b, h, n, hd]
            let v = heads.narrow(1, 2 * h, h); // [b, h, n, hd]
            attend_heads(q, k, v) // [b, n, d]
        }); // [b, n, d]
        token_linear(&self.proj, out) // [b, n, d]
    }
}
