//! A linear layer `y = x·W + b` on rows (`x` `[m, k]`, `W` `[k, n]` in burn's layout, `b` `[n]`)
//! as one op, forward and backward, with `gemm` writing straight into the output buffers.
//!
//! burn-flex allocates every matmul output as zeroed bytes and then copies them into a buffer of
//! its runtime alignment (a memset and a memmove per product), adds the bias in a separate pass,
//! and under autodiff reduces the bias gradient through a broadcast-shape sum: ~6% of a `tiny`
//! step on the thread that runs it. Here the bias is written into the output rows first and the
//! product accumulated onto them, and the backward computes only the gradients whose parents
//! need one: `dx = g·Wᵀ`, `dW = xᵀ·g`, `db = Σ_rows g` (in row order, so deterministic).
//! Products above burn-flex's threshold (192³ multiply-adds) run on rayon's pool, as in burn-flex.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData, TensorMetadata};
use burn_flex::FlexTensor;
use gemm::Parallelism;

use super::{AutodiffFlexTensor, Cpu, classify, from_primitive, matmul, tensor, values};

/// `x·w + b` over rows; `composite` computes the same from burn ops and runs on every backend
/// and dtype the fast path does not cover.
///
/// # Shapes
/// - x: `[m, k]`, w: `[k, n]`, b: `[n]` -> `[m, n]`
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
    composite: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let ([m, k], [kw, n]) = (x.dims(), w.dims());
    if m == 0 || k == 0 || n == 0 || kw != k || b.as_ref().is_some_and(|b| b.dims() != [n]) {
        return composite(x, w, b);
    }
    let geo = Geo { m, k, n };
    let b = b.map(classify);
    match (classify(x), classify(w), b) {
        (Cpu::Tracked(x), Cpu::Tracked(w), None) => tensor(tracked(geo, x, w, None)),
        (Cpu::Tracked(x), Cpu::Tracked(w), Some(Cpu::Tracked(b))) => tensor(tracked(geo, x, w, Some(b))),
        (Cpu::Plain(x), Cpu::Plain(w), None) => tensor(forward(&geo, &values(&x), &values(&w), None)),
        (Cpu::Plain(x), Cpu::Plain(w), Some(Cpu::Plain(b))) => {
            tensor(forward(&geo, &values(&x), &values(&w), Some(values(&b).as_ref())))
        }
        (x, w, b) => composite(back(x), back(w), b.map(back)),
    }
}

/// A classified tensor as a tensor of `B` again.
fn back<B: Backend, const D: usize>(c: Cpu<B::FloatTensorPrimitive>) -> Tensor<B, D> {
    match c {
        Cpu::Tracked(t) => tensor(t),
        Cpu::Plain(t) => tensor(t),
        Cpu::Other(p) => from_primitive(p),
    }
}

#[derive(Debug, Clone, Copy)]
struct Geo {
    m: usize,
    k: usize,
    n: usize,
}

/// burn-flex's rule: parallel GEMM from 192³ multiply-adds on.
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 { Parallelism::Rayon(0) } else { Parallelism::None }
}

fn forward(g: &Geo, x: &[f32], w: &[f32], b: Option<&[f32]>) -> FlexTensor {
    let Geo { m, k, n } = *g;
    let mut y = match b {
        Some(b) => b.repeat(m),
        None => vec![0.0f32; m * n],
    };
    // SAFETY: x is m×k, w k×n and y m×n, contiguous row-major (shapes checked by `linear`).
    unsafe {
        matmul(
            m,
            n,
            k,
            (y.as_mut_ptr(), 1, n),
            (x.as_ptr(), 1, k),
            (w.as_ptr(), 1, n),
            1.0,
            b.is_some(),
            parallelism(m, n, k),
        );
    }
    FlexTensor::from_data(TensorData::new(y, Shape::new([m, n])))
}

/// The gradients of x, w and b that are `wanted`, from the upstream gradient `g` `[m, n]`.
fn backward(geo: &Geo, x: &[f32], w: &[f32], g: &[f32], wanted: [bool; 3]) -> [Option<Vec<f32>>; 3] {
    let Geo { m, k, n } = *geo;
    assert_eq!(g.len(), m * n, "linear output gradient of the wrong size");
    let dx = wanted[0].then(|| {
        let mut dx = vec![0.0f32; m * k];
        // SAFETY: dx m×k; g m×n; wᵀ read from w (k×n) with strides (n, 1).
        unsafe {
            matmul(
                m,
                k,
                n,
                (dx.as_mut_ptr(), 1, k),
                (g.as_ptr(), 1, n),
                (w.as_ptr(), n, 1),
                1.0,
                false,
                parallelism(m, k, n),
            )
        };
        dx
    });
    let dw = wanted[1].then(|| {
        let mut dw = vec![0.0f32; k * n];
        // SAFETY: dw k×n; xᵀ read from x (m×k) with strides (k, 1); g m×n.
        unsafe {
            matmul(
                k,
                n,
                m,
                (dw.as_mut_ptr(), 1, n),
                (x.as_ptr(), k, 1),
                (g.as_ptr(), 1, n),
                1.0,
                false,
                parallelism(k, n, m),
            )
        };
        dw
    });
    let db = wanted[2].then(|| {
        let mut db = vec![0.0f32; n];
        for row in g.chunks(n) {
            db.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
        }
        db
    });
    [dx, dw, db]
}

/// The op's state: the inputs the gradients need.
#[derive(Debug, Clone)]
struct State {
    geo: Geo,
    x: FlexTensor,
    w: FlexTensor,
}

#[derive(Debug)]
struct LinearBackward;

fn run_backward<const N: usize>(ops: Ops<State, N>, grads: &mut Gradients) {
    let g = grads.consume::<Flex>(&ops.node);
    let st = ops.state;
    let mut wanted = [false; 3];
    for (want, parent) in wanted.iter_mut().zip(&ops.parents) {
        *want = parent.is_some();
    }
    let d = backward(&st.geo, &values(&st.x), &values(&st.w), &values(&g), wanted);
    let shapes = [st.x.shape(), st.w.shape(), Shape::new([st.geo.n])];
    for ((parent, grad), shape) in ops.parents.into_iter().zip(d).zip(shapes) {
        if let (Some(node), Some(grad)) = (parent, grad) {
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(grad, shape)));
        }
    }
}

impl Backward<Flex, 2> for LinearBackward {
    type State = State;
    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        run_backward(ops, grads);
    }
}

impl Backward<Flex, 3> for LinearBackward {
    type State = State;
    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        run_backward(ops, grads);
    }
}

fn tracked(
    geo: Geo,
    x: AutodiffFlexTensor,
    w: AutodiffFlexTensor,
    b: Option<AutodiffFlexTensor>,
) -> AutodiffFlexTensor {
    let bias = b.as_ref().map(|b| values(&b.primitive));
    let y = forward(&geo, &values(&x.primitive), &values(&w.primitive), bias.as_deref());
    let state = State { geo, x: x.primitive.clone(), w: w.primitive.clone() };
    match b {
        None => match <LinearBackward as Backward<Flex, 2>>::prepare::<NoCheckpointing>(
            LinearBackward,
            [x.node.clone(), w.node.clone()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        Some(b) => match <LinearBackward as Backward<Flex, 3>>::prepare::<NoCheckpointing>(
            LinearBackward,
            [x.node.clone(), w.node.clone(), b.node.clone()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{AB, B as Fx, device, max_abs_diff, to_vec};
    use burn::tensor::Distribution;

    fn rand<const D: usize>(shape: [usize; D]) -> Tensor<Fx, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
    }

    /// f64 `x·w (+ b)` and, for upstream `g`, `dx = g·wᵀ`, `db = Σ_t g[t]`.
    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        g: &[f32],
        (m, k, n): (usize, usize, usize),
    ) -> [Vec<f64>; 3] {
        let mut y = vec![0.0; m * n];
        let (mut dx, mut db) = (vec![0.0; m * k], vec![0.0; n]);
        for t in 0..m {
            for o in 0..n {
                y[t * n + o] = b.map_or(0.0, |b| b[o] as f64)
                    + (0..k).map(|i| x[t * k + i] as f64 * w[i * n + o] as f64).sum::<f64>();
                db[o] += g[t * n + o] as f64;
                for i in 0..k {
                    dx[t * k + i] += g[t * n + o] as f64 * w[i * n + o] as f64;
                }
            }
        }
        [y, dx, db]
    }

    /// A frozen weight gets no gradient; input and bias gradients are right; a bias-free layer
    /// on the plain backend gives the plain product.
    #[test]
    fn frozen_weight_and_bias_free_layers() {
        let (m, k, n) = (6, 5, 7);
        let (x, w, b, g) = (rand([m, k]), rand([k, n]), rand([n]), rand([m, n]));
        let (xv, wv, bv, gv) = (to_vec(x.clone()), to_vec(w.clone()), to_vec(b.clone()), to_vec(g.clone()));
        let [y_ref, dx_ref, db_ref] = reference(&xv, &wv, Some(&bv), &gv, (m, k, n));

        let xa = Tensor::<AB, 2>::from_inner(x.clone()).require_grad();
        let wa = Tensor::<AB, 2>::from_inner(w.clone()); // frozen
        let ba = Tensor::<AB, 1>::from_inner(b).require_grad();
        let y = linear(xa.clone(), wa.clone(), Some(ba.clone()), |_, _, _| unreachable!("fast path"));
        assert!(max_abs_diff(&to_vec(y.clone()), &y_ref) < 1e-4);
        let grads = (y * Tensor::<AB, 2>::from_inner(g.clone())).sum().backward();
        assert!(max_abs_diff(&to_vec(xa.grad(&grads).expect("dx")), &dx_ref) < 1e-4);
        assert!(max_abs_diff(&to_vec(ba.grad(&grads).expect("db")), &db_ref) < 1e-4);
        assert!(wa.grad(&grads).is_none(), "a frozen weight must get no gradient");

        let [y_ref, _, _] = reference(&xv, &wv, None, &gv, (m, k, n));
        let y = linear(x, w, None, |_, _, _| unreachable!("fast path"));
        assert!(max_abs_diff(&to_vec(y), &y_ref) < 1e-4);
    }

    /// Mismatched shapes go to the composite instead of the kernels.
    #[test]
    fn mismatched_shapes_take_the_composite() {
        let mut called = false;
        let _ = linear(rand([3, 4]), rand([5, 2]), None, |x, _, _| {
            called = true;
            x
        });
        assert!(called);
    }
}
