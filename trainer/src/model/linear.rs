//! Token-wise linear layers as one 2-D matmul.
//!
//! burn's `Linear` on a `[b, n, d]` input broadcasts the weight to `[1, d, out]` and runs a
//! batched matmul: `b` small GEMMs forward, and for the weight gradient `b` separate `[d, out]`
//! products summed afterwards (burn-backend's default `linear_weight_backward`). Folding the
//! tokens into rows first makes each of forward, input gradient and weight gradient a single
//! `[b·n, d]` GEMM, which is what PyTorch's `F.linear` does. The result is the same function.
//! On the CPU backend the product runs as the fused op of [`super::fused::linear`]; under
//! [`crate::amp::autocast`] it runs in the half type.

use burn::nn::Linear;
use burn::tensor::{Tensor, backend::Backend};

/// `l` applied to every token: `[b, n, d_in]` -> `[b, n, d_out]`, computed as `[b·n, d_in]·W`.
pub fn token_linear<B: Backend>(l: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, d] = x.dims();
    let bias = l.bias.as_ref().map(|b| b.val());
    let x = x.reshape([b * n, d]); // [b·n, d_in]
    // Mixed precision: the product in the autocast type, the result in f32 (amp.rs).
    if let Some(y) = crate::amp::linear_rows(&x, &l.weight.val(), bias.as_ref()) {
        let d_out = y.dims()[1];
        return y.reshape([b, n, d_out]);
    }
    let y = super::fused::linear(x, l.weight.val(), bias, |x, _, _| l.forward(x)); // [b·n, d_out]
    let d_out = y.dims()[1];
    y.reshape([b, n, d_out]) // [b, n, d_out]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::xavier_linear;
    use crate::model::tests::{AB, device, max_abs_diff, randomize, to_vec};
    use burn::tensor::Distribution;

    /// Values and all three gradients (input, weight, bias) against a plain f64 loop over
    /// `y[t] = x[t]·W + b` with the upstream gradient `g`: `dx = g·Wᵀ`, `dW = Σ_t x[t]ᵀ g[t]`,
    /// `db = Σ_t g[t]`.
    #[test]
    fn token_linear_matches_a_plain_loop_with_gradients() {
        let dev = device();
        let (b, n, di, dout) = (3, 4, 5, 7);
        let l = randomize(xavier_linear::<AB>(di, dout, true, &dev), 1.0);
        let x = Tensor::<AB, 3>::random([b, n, di], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let g = Tensor::<AB, 3>::random([b, n, dout], Distribution::Normal(0.0, 1.0), &dev);
        let y = token_linear(&l, x.clone());
        let grads = (y.clone() * g.clone()).sum().backward();

        let (xv, gv) = (to_vec(x.clone()), to_vec(g));
        let wv = to_vec(l.weight.val()); // [di, dout]
        let bv = to_vec(l.bias.as_ref().expect("bias").val());
        let (mut y_ref, mut dx_ref) = (vec![0.0f64; b * n * dout], vec![0.0f64; b * n * di]);
        let (mut dw_ref, mut db_ref) = (vec![0.0f64; di * dout], vec![0.0f64; dout]);
        for t in 0..b * n {
            for o in 0..dout {
                let gto = gv[t * dout + o] as f64;
                y_ref[t * dout + o] =
                    bv[o] as f64 + (0..di).map(|i| xv[t * di + i] as f64 * wv[i * dout + o] as f64).sum::<f64>();
                db_ref[o] += gto;
                for i in 0..di {
                    dx_ref[t * di + i] += gto * wv[i * dout + o] as f64;
                    dw_ref[i * dout + o] += xv[t * di + i] as f64 * gto;
                }
            }
        }
        assert_eq!(y.dims(), [b, n, dout]);
        assert!(max_abs_diff(&to_vec(y.inner()), &y_ref) < 1e-4, "values");
        let grad = |t: Option<Tensor<burn::backend::Flex, 3>>| to_vec(t.expect("grad"));
        assert!(max_abs_diff(&grad(x.grad(&grads)), &dx_ref) < 1e-4, "input gradient");
        assert!(max_abs_diff(&to_vec(l.weight.grad(&grads).expect("weight grad")), &dw_ref) < 1e-4, "weight gradient");
        let db = l.bias.as_ref().expect("bias").grad(&grads).expect("bias grad");
        assert!(max_abs_diff(&to_vec(db), &db_ref) < 1e-4, "bias gradient");
    }
}
