//! LayerNorm over the last axis: one row-wise forward kernel and one row-wise backward for x, γ
//! and β instead of burn's nine-op chain and its backward.
//!
//! With `x̂ = (x − μ)·r`, `r = 1/√(σ² + ε)`, `y = γ⊙x̂ + β` and upstream gradient `g`, per row:
//! `dx = r·(g⊙γ − mean(g⊙γ) − x̂·mean(g⊙γ⊙x̂))`, and over all rows `dγ = Σ g⊙x̂`, `dβ = Σ g`.
//! σ² is computed in two passes (`mean((x − μ)²)`), as burn's composite does, not as
//! `E[x²] − μ²` (burn-flex's fused forward), which cancels catastrophically for rows whose mean
//! is large against their spread; the backward reuses the forward's μ and r.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{AutodiffFlexTensor, CHUNK, Cpu, classify, from_primitive, primitive, tensor, values};

/// `ln` (built with epsilon `eps`) applied over the last axis of `x`; see the
/// [module docs](super) for which kernel runs. burn's `LayerNorm` keeps its epsilon private,
/// so the caller passes the one it configured.
pub fn layer_norm<B: Backend, const D: usize>(ln: &LayerNorm<B>, eps: f64, x: Tensor<B, D>) -> Tensor<B, D> {
    let Some(beta) = ln.beta.as_ref().map(|b| b.val()) else {
        return ln.forward(x);
    };
    let gamma = ln.gamma.val();
    if gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 {
        return ln.forward(x);
    }
    match classify(x) {
        Cpu::Tracked(x) => {
            let (gamma, beta) =
                (primitive::<B, AutodiffFlexTensor, 1>(gamma), primitive::<B, AutodiffFlexTensor, 1>(beta));
            tensor(layer_norm_autodiff(x, gamma, beta, eps))
        }
        Cpu::Plain(x) => {
            let (gamma, beta) = (primitive::<B, FlexTensor, 1>(gamma), primitive::<B, FlexTensor, 1>(beta));
            tensor(forward(&x, &gamma, &beta, eps).0)
        }
        Cpu::Other(p) => ln.forward(from_primitive(p)),
    }
}

/// Rows of `dim` values per rayon task.
fn rows_per_task(dim: usize) -> usize {
    (CHUNK / dim).max(1)
}

/// `y`, and per row `[μ, r]` for the backward.
fn forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
    let shape = x.shape();
    let dim = shape[shape.num_dims() - 1].max(1);
    let (xs, gammas, betas) = (values(x), values(gamma), values(beta));
    let eps = eps as f32;
    let per = rows_per_task(dim);
    let mut y = vec![0.0f32; xs.len()];
    let mut stats = vec![0.0f32; 2 * (xs.len() / dim)];
    y.par_chunks_mut(per * dim).zip(xs.par_chunks(per * dim)).zip(stats.par_chunks_mut(2 * per)).for_each(
        |((y, x), stats)| {
            for ((y, x), stat) in y.chunks_mut(dim).zip(x.chunks(dim)).zip(stats.chunks_mut(2)) {
                let mean = x.iter().sum::<f32>() / dim as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let r = 1.0 / (var + eps).sqrt();
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gammas.iter()).zip(betas.iter()) {
                    *y = (x - mean) * r * g + b;
                }
                stat.copy_from_slice(&[mean, r]);
            }
        },
    );
    (FlexTensor::from_data(TensorData::new(y, shape)), stats)
}

/// Backward step of the custom op; the state is (x, γ, per-row [μ, r]).
#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let (dx, dgamma, dbeta) = backward(&x, &gamma, &stats, &g);
        let [node_x, node_gamma, node_beta] = ops.parents;
        for (node, grad) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

fn layer_norm_autodiff(
    x: AutodiffFlexTensor,
    gamma: AutodiffFlexTensor,
    beta: AutodiffFlexTensor,
    eps: f64,
) -> AutodiffFlexTensor {
    let (y, stats) = forward(&x.primitive, &gamma.primitive, &beta.primitive, eps);
    let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
    match LayerNormBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, stats), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// (dx, dγ, dβ). Rows go in fixed chunks, each with its own partial dγ/dβ, summed in chunk
/// order afterwards, so the result does not depend on the number of threads.
fn backward(x: &FlexTensor, gamma: &FlexTensor, stats: &[f32], g: &FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = x.shape();
    let dim = shape[shape.num_dims() - 1].max(1);
    let (xs, gammas, gs) = (values(x), values(gamma), values(g));
    let per = rows_per_task(dim);
    let mut dx = vec![0.0f32; xs.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per * dim)
        .zip(xs.par_chunks(per * dim))
        .zip(gs.par_chunks(per * dim))
        .zip(stats.par_chunks(2 * per))
        .map(|(((dx, x), g), stats)| {
            let (mut dgamma, mut dbeta, mut xhat) = (vec![0.0f32; dim], vec![0.0f32; dim], vec![0.0f32; dim]);
            for (((dx, x), g), stat) in dx.chunks_mut(dim).zip(x.chunks(dim)).zip(g.chunks(dim)).zip(stats.chunks(2)) {
                let (mean, r) = (stat[0], stat[1]);
                let (mut a, mut b) = (0.0f32, 0.0f32);
                for i in 0..dim {
                    xhat[i] = (x[i] - mean) * r;
                    let dxhat = g[i] * gammas[i];
                    a += dxhat;
                    b += dxhat * xhat[i];
                    dgamma[i] += g[i] * xhat[i];
                    dbeta[i] += g[i];
                }
                let (a, b) = (a / dim as f32, b / dim as f32);
                for i in 0..dim {
                    dx[i] = r * (g[i] * gammas[i] - a - xhat[i] * b);
                }
            }
            (dgamma, dbeta)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f32; dim], vec![0.0f32; dim]);
    for (pg, pb) in &partials {
        for i in 0..dim {
            dgamma[i] += pg[i];
            dbeta[i] += pb[i];
        }
    }
    let vector = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, Shape::new([dim])));
    (FlexTensor::from_data(TensorData::new(dx, shape)), vector(dgamma), vector(dbeta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::layer_norm as new_layer_norm;
    use crate::model::tests::{AB, B as Fx, device, max_abs_diff, randomize, to_vec};
    use burn::module::AutodiffModule;
    use burn::tensor::Distribution;

    /// Values and the gradients of x, γ and β against an f64 loop, over enough rows for
    /// several chunks (so the partial dγ/dβ sums are exercised).
    #[test]
    fn fused_layer_norm_matches_a_plain_loop_forward_and_backward() {
        let dev = device();
        let eps = 1e-6;
        // The last case has rows with mean 1000 and spread 2: f32 rounding of x alone allows
        // ~1e-3 there, while E[x²] − μ² would be off by tens of percent.
        for (rows, dim, mean, tol) in [(3, 7, 0.5, 2e-5), (2 * CHUNK / 48 + 5, 48, 0.5, 2e-5), (4, 192, 1000.0, 1e-2)] {
            let ln = randomize(new_layer_norm::<AB>(dim, eps, &dev), 1.0);
            let x = Tensor::<Fx, 2>::random([rows, dim], Distribution::Normal(mean, 2.0), &dev);
            let w = Tensor::<Fx, 2>::random([rows, dim], Distribution::Normal(0.0, 1.0), &dev);
            let (xs, ws) = (to_vec(x.clone()), to_vec(w.clone()));
            let gamma = to_vec(ln.gamma.val());
            let beta = to_vec(ln.beta.as_ref().expect("beta").val());
            let (mut y_ref, mut dx_ref) = (Vec::new(), Vec::new());
            let (mut dgamma_ref, mut dbeta_ref) = (vec![0.0f64; dim], vec![0.0f64; dim]);
            for r in 0..rows {
                let xr: Vec<f64> = xs[r * dim..(r + 1) * dim].iter().map(|&v| v as f64).collect();
                let wr: Vec<f64> = ws[r * dim..(r + 1) * dim].iter().map(|&v| v as f64).collect();
                let mean = xr.iter().sum::<f64>() / dim as f64;
                let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
                let rs = 1.0 / (var + eps).sqrt();
                let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rs).collect();
                y_ref.extend((0..dim).map(|i| gamma[i] as f64 * xhat[i] + beta[i] as f64));
                let dxhat: Vec<f64> = (0..dim).map(|i| wr[i] * gamma[i] as f64).collect();
                let a = dxhat.iter().sum::<f64>() / dim as f64;
                let b = dxhat.iter().zip(&xhat).map(|(d, h)| d * h).sum::<f64>() / dim as f64;
                dx_ref.extend((0..dim).map(|i| rs * (dxhat[i] - a - xhat[i] * b)));
                for i in 0..dim {
                    dgamma_ref[i] += wr[i] * xhat[i];
                    dbeta_ref[i] += wr[i];
                }
            }
            let plain = layer_norm(&ln.valid(), eps, x.clone());
            assert!(max_abs_diff(&to_vec(plain), &y_ref) < tol, "plain, dim {dim}");

            let xa = Tensor::<AB, 2>::from_inner(x).require_grad();
            let y = layer_norm(&ln, eps, xa.clone());
            assert!(max_abs_diff(&to_vec(y.clone()), &y_ref) < tol, "tracked, dim {dim}");
            let grads = (y * Tensor::<AB, 2>::from_inner(w)).sum().backward();
            let dx = to_vec(xa.grad(&grads).expect("x gradient"));
            assert!(max_abs_diff(&dx, &dx_ref) < 5.0 * tol, "dx, dim {dim}");
            let dgamma = to_vec(ln.gamma.grad(&grads).expect("gamma gradient"));
            let tol = tol * rows as f64;
            assert!(max_abs_diff(&dgamma, &dgamma_ref) < tol, "dgamma, dim {dim}");
            let dbeta = to_vec(ln.beta.as_ref().expect("beta").grad(&grads).expect("beta gradient"));
            assert!(max_abs_diff(&dbeta, &dbeta_ref) < tol, "dbeta, dim {dim}");
        }
    }
}
