//! Softmax over the last axis: burn-flex's fused row kernel forward (SIMD, rayon), and one
//! row-wise backward `dx = y ⊙ (g − Σ g⊙y)` instead of burn's five-op chain and its backward.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::Backend;
use burn::tensor::ops::ActivationOps;
use burn::tensor::{Tensor, TensorMetadata, activation};
use burn_flex::FlexTensor;

use super::{AutodiffFlexTensor, CHUNK, Cpu, classify, fill_chunks, from_primitive, tensor, values};

/// softmax over the last axis; see the [module docs](super) for which kernel runs.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match classify(x) {
        Cpu::Tracked(t) => tensor(softmax_autodiff(t)),
        Cpu::Plain(t) => tensor(forward(t)),
        Cpu::Other(p) => activation::softmax(from_primitive::<B, D>(p), D - 1),
    }
}

fn forward(x: FlexTensor) -> FlexTensor {
    let last = x.shape().num_dims() - 1;
    <Flex as ActivationOps<Flex>>::softmax(x, last)
}

/// Backward step of the custom op; the state is the forward output `y`.
#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let y = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| backward(&y, &g));
    }
}

fn softmax_autodiff(x: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let y = forward(x.primitive.clone());
    match SoftmaxBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// `dx = y ⊙ (g − Σ_row g⊙y)`, row by row over the last axis.
fn backward(y: &FlexTensor, g: &FlexTensor) -> FlexTensor {
    let shape = y.shape();
    let row = shape[shape.num_dims() - 1].max(1);
    let (ys, gs) = (values(y), values(g));
    fill_chunks(shape, (CHUNK / row).max(1) * row, |start, out| {
        for ((o, y), g) in out.chunks_mut(row).zip(ys[start..].chunks(row)).zip(gs[start..].chunks(row)) {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{AB, B as Fx, device, max_abs_diff, to_vec};
    use burn::tensor::Distribution;

    /// Values and input gradient against an f64 loop: `y_i = e^{x_i}/Σ e^{x_j}` and
    /// `∂(Σ w⊙y)/∂x_i = y_i (w_i − Σ_j w_j y_j)`, for a row shorter and one longer than a chunk.
    #[test]
    fn fused_softmax_matches_a_plain_loop_forward_and_backward() {
        let dev = device();
        for (rows, len) in [(6, 5), (3, CHUNK + 3)] {
            let x = Tensor::<Fx, 3>::random([1, rows, len], Distribution::Normal(0.0, 3.0), &dev);
            let w = Tensor::<Fx, 3>::random([1, rows, len], Distribution::Normal(0.0, 1.0), &dev);
            let (xs, ws) = (to_vec(x.clone()), to_vec(w.clone()));
            let (mut y_ref, mut dx_ref) = (Vec::new(), Vec::new());
            for r in 0..rows {
                let xr: Vec<f64> = xs[r * len..(r + 1) * len].iter().map(|&v| v as f64).collect();
                let m = xr.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = xr.iter().map(|v| (v - m).exp()).sum();
                let y: Vec<f64> = xr.iter().map(|v| (v - m).exp() / z).collect();
                let wr = &ws[r * len..(r + 1) * len];
                let dot: f64 = y.iter().zip(wr).map(|(y, &w)| y * w as f64).sum();
                dx_ref.extend(y.iter().zip(wr).map(|(y, &w)| y * (w as f64 - dot)));
                y_ref.extend(y);
            }
            // f32 against f64: a few 1e-6 over 16k-element rows.
            assert!(max_abs_diff(&to_vec(softmax_last(x.clone())), &y_ref) < 1e-5, "plain, len {len}");

            let xa = Tensor::<AB, 3>::from_inner(x).require_grad();
            let y = softmax_last(xa.clone());
            assert!(max_abs_diff(&to_vec(y.clone()), &y_ref) < 1e-5, "tracked, len {len}");
            let grads = (y * Tensor::<AB, 3>::from_inner(w)).sum().backward();
            let dx = to_vec(xa.grad(&grads).expect("input gradient"));
            assert!(max_abs_diff(&dx, &dx_ref) < 1e-5, "backward, len {len}");
        }
    }
}
