//! Exact GELU, `x·Φ(x) = ½·x·(1 + erf(x/√2))` (spec §2.1 "exact GELU"): a branch-free
//! rational `erf` that the compiler vectorises, split over rayon's pool, forward and backward.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorMetadata};
use burn_flex::FlexTensor;

use super::{AutodiffFlexTensor, CHUNK, Cpu, classify, fill_chunks, from_primitive, tensor, values};

/// `1/√(2π)`, the normal density's constant.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact (erf) GELU of every element; see the [module docs](super) for which kernel runs.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match classify(x) {
        Cpu::Tracked(t) => tensor(gelu_autodiff(t)),
        Cpu::Plain(t) => tensor(gelu_forward(&t)),
        Cpu::Other(p) => gelu_erf(from_primitive(p)),
    }
}

/// Exact GELU from burn ops, `½·x·(1 + erf(x/√2))`, for every backend and dtype the CPU kernels
/// do not cover (CUDA, wgpu, half types). burn's autodiff differentiates `erf` exactly
/// (`2/√π·e^(−u²)`), so the gradient is PyTorch's exact `Φ(x) + x·φ(x)`; burn's own `gelu`
/// backward on the cubecl backends is the tanh approximation's derivative. With burn's fusion
/// the chain compiles to one element-wise kernel each way.
pub fn gelu_erf<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5); // Φ(x)
    x * cdf
}

/// Backward step of the custom op: `dL/dx = g · (Φ(x) + x·φ(x))`; the state is the input x.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| gelu_backward(&x, &g));
    }
}

/// GELU on `Autodiff<Flex>` (no checkpointing): our forward kernel, our backward registered.
fn gelu_autodiff(x: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let y = gelu_forward(&x.primitive);
    match GeluBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(x.primitive, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// erf(x) by an odd/even rational fit on [-4, 4], evaluated without branches so that slices of
/// it vectorise. From |x| = 3.92 on, where the true erf rounds to ±1 in f32, it returns ±1
/// exactly (a select, not a branch), so GELU is exactly 0 far in the negative tail. Error:
/// 6.5e-8 in exact arithmetic, 4.5e-7 (a few ulps of 1) in f32 near |x| = 3.9.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let tail = 1.0f32.copysign(x);
    let big = x.abs() >= 3.92;
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    if big { tail } else { x * p / q }
}

/// Φ(x) = ½(1 + erf(x/√2)).
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// e^t for t ≤ 0 (used for e^(-x²/2)): `2^n · e^r` with `n = round(t/ln 2)`, `r = t − n·ln 2`
/// (ln 2 split in two for exactness) and e^r by its degree-7 Taylor polynomial (|r| ≤ ln2/2,
/// relative error < 3e-9 before f32 rounding). Branch-free, so slices of it vectorise (libm's
/// `expf` is a call per element). t is clamped to -87, where e^t ≈ 1.6e-38 is below what any
/// GELU gradient can resolve.
#[inline(always)]
fn exp_nonpositive(t: f32) -> f32 {
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let t = t.clamp(-87.0, 0.0);
    let n = (t * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (t - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n through the exponent bits; n ∈ [-126, 0] keeps them in the normal range.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Forward kernel: `½·x·(1 + erf(x/√2))`.
fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let xs = values(x);
    fill_chunks(x.shape(), CHUNK, |start, out| kernels::forward(out, &xs[start..]))
}

/// Backward kernel: `g · (Φ(x) + x·φ(x))`, φ(x) = e^(-x²/2)/√(2π).
fn gelu_backward(x: &FlexTensor, g: &FlexTensor) -> FlexTensor {
    let (xs, gs) = (values(x), values(g));
    fill_chunks(x.shape(), CHUNK, |start, out| kernels::backward(out, &xs[start..], &gs[start..]))
}

/// The element loops, compiled twice: for the baseline target (SSE2, 4 lanes) and with AVX2 + FMA
/// (8 lanes), chosen at run time. Rust never fuses a multiply and an add on its own, so both
/// give bit-identical results.
mod kernels {
    use super::{INV_SQRT_2PI, exp_nonpositive, normal_cdf};

    #[inline(always)]
    fn forward_loop(out: &mut [f32], xs: &[f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = x * normal_cdf(x);
        }
    }

    #[inline(always)]
    fn backward_loop(out: &mut [f32], xs: &[f32], gs: &[f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(xs).zip(gs) {
            *o = g * (normal_cdf(x) + x * INV_SQRT_2PI * exp_nonpositive(-0.5 * x * x));
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_avx2(out: &mut [f32], xs: &[f32]) {
        forward_loop(out, xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn backward_avx2(out: &mut [f32], xs: &[f32], gs: &[f32]) {
        backward_loop(out, xs, gs)
    }

    /// `out[i] = GELU(xs[i])`.
    pub(super) fn forward(out: &mut [f32], xs: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { forward_avx2(out, xs) };
        }
        forward_loop(out, xs)
    }

    /// `out[i] = gs[i] · GELU'(xs[i])`.
    pub(super) fn backward(out: &mut [f32], xs: &[f32], gs: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { backward_avx2(out, xs, gs) };
        }
        backward_loop(out, xs, gs)
    }

    #[cfg(test)]
    mod tests {
        /// The AVX2 build of the loops gives the same bits as the baseline build.
        #[test]
        #[cfg(target_arch = "x86_64")]
        fn avx2_and_baseline_loops_agree_bit_for_bit() {
            if !super::avx2() {
                return;
            }
            let xs: Vec<f32> = (0..20_011).map(|i| (i as f32 - 10_000.0) / 1_000.0).collect();
            let gs: Vec<f32> = xs.iter().map(|x| 1.0 - 0.3 * x).collect();
            let (mut a, mut b) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
            super::forward_loop(&mut a, &xs);
            // SAFETY: AVX2 and FMA checked above.
            unsafe { super::forward_avx2(&mut b, &xs) };
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "forward");
            super::backward_loop(&mut a, &xs, &gs);
            // SAFETY: as above.
            unsafe { super::backward_avx2(&mut b, &xs, &gs) };
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "backward");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::reference;
    use crate::model::tests::{AB, B as Fx, device, max_abs_diff, to_vec};
    use burn::tensor::{DType, Distribution};

    /// The rational erf against the test suite's independent erf (Numerical Recipes' erfc fit,
    /// f64) on a dense grid over [-6, 6].
    #[test]
    fn rational_erf_matches_an_independent_erf() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f64 / 10_000.0)
            .map(|x| (erf(x as f32) as f64 - reference::erf(x)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "max |erf error| {worst}");
        assert_eq!((erf(3.92), erf(-7.0), erf(-1e30)), (1.0, -1.0, -1.0));
    }

    /// The polynomial exp against std's over its whole domain (relative error), and 0 below.
    #[test]
    fn polynomial_exp_matches_std_exp() {
        let worst = (0..=870_000)
            .map(|i| -(i as f32) / 10_000.0)
            .map(|t| ((exp_nonpositive(t) as f64 - (t as f64).exp()) / (t as f64).exp()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "max relative error {worst}");
        assert!(exp_nonpositive(-1e4) < 1e-37);
    }

    /// Values on `Flex` and values + input gradient on `Autodiff<Flex>` against the f64
    /// reference GELU and its derivative, over sizes below and above the parallel chunk.
    #[test]
    fn fast_gelu_matches_the_reference_forward_and_backward() {
        let dev = device();
        for n in [7, CHUNK + 5, 3 * CHUNK] {
            let x = Tensor::<Fx, 1>::random([n], Distribution::Normal(0.0, 3.0), &dev);
            let xs: Vec<f64> = to_vec(x.clone()).into_iter().map(f64::from).collect();
            let y_ref: Vec<f64> = xs.iter().map(|&x| reference::gelu(x)).collect();
            assert!(max_abs_diff(&to_vec(gelu(x.clone())), &y_ref) < 2e-6, "flex forward, n {n}");

            let xa = Tensor::<AB, 1>::from_inner(x.clone()).require_grad();
            let w = Tensor::<AB, 1>::random([n], Distribution::Normal(0.0, 1.0), &dev);
            let ya = gelu(xa.clone());
            assert!(max_abs_diff(&to_vec(ya.clone()), &y_ref) < 2e-6, "autodiff forward, n {n}");
            let grads = (ya * w.clone()).sum().backward();
            let ws = to_vec(w);
            let dx_ref: Vec<f64> = xs
                .iter()
                .zip(&ws)
                .map(|(&x, &w)| {
                    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    w as f64 * (0.5 * (1.0 + reference::erf(x / std::f64::consts::SQRT_2)) + x * pdf)
                })
                .collect();
            let dx = to_vec(xa.grad(&grads).expect("input gradient"));
            assert!(max_abs_diff(&dx, &dx_ref) < 1e-5, "autodiff backward, n {n}");
        }
    }

    /// `sum().backward()` hands the op a broadcast (stride-0) upstream gradient of ones.
    #[test]
    fn broadcast_upstream_gradients_are_read_correctly() {
        let dev = device();
        let x = Tensor::<Fx, 2>::random([40, 30], Distribution::Normal(0.0, 2.0), &dev);
        let xa = Tensor::<AB, 2>::from_inner(x.clone()).require_grad();
        let grads = gelu(xa.clone()).sum().backward();
        let want: Vec<f64> = to_vec(x)
            .into_iter()
            .map(|x| {
                let x = x as f64;
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                0.5 * (1.0 + reference::erf(x / std::f64::consts::SQRT_2)) + x * pdf
            })
            .collect();
        assert!(max_abs_diff(&to_vec(xa.grad(&grads).expect("input gradient")), &want) < 1e-5);
    }

    /// A strided (transposed) input gives the same values as its contiguous copy, and a
    /// non-f32 tensor takes burn's path.
    #[test]
    fn strided_inputs_and_other_dtypes_are_handled() {
        let dev = device();
        let x = Tensor::<Fx, 2>::random([300, 200], Distribution::Normal(0.0, 2.0), &dev);
        let t = x.clone().swap_dims(0, 1);
        let contiguous = Tensor::<Fx, 2>::from_data(t.clone().into_data(), &dev);
        assert_eq!(to_vec(gelu(t)), to_vec(gelu(contiguous)));

        let xd = x.clone().cast(DType::F64);
        let ours = to_vec(gelu(x));
        let theirs = to_vec(gelu(xd));
        let theirs: Vec<f64> = theirs.into_iter().map(f64::from).collect();
        assert!(max_abs_diff(&ours, &theirs) < 2e-6);
    }
    /// The path of every other backend and dtype (CUDA, wgpu, half types): `gelu_erf`'s gradient
    /// is the exact `Φ(x) + x·φ(x)`, not the tanh approximation's derivative (which differs by up
    /// to ~1e-3, far above this f64 comparison's tolerance). Run in f64, which the CPU kernels
    /// do not take, so the dispatcher's fallback is what is tested.
    #[test]
    fn fallback_gelu_has_the_exact_erf_gradient() {
        let dev = device();
        let xs: Vec<f64> = (-400..=400).map(|i| i as f64 / 100.0).collect();
        let x = Tensor::<AB, 1>::from_data(burn::tensor::TensorData::new(xs.clone(), [xs.len()]), &dev);
        let x = x.cast(DType::F64).require_grad();
        assert_eq!(x.dtype(), DType::F64);
        let y = gelu(x.clone());
        let grads = y.clone().sum().backward();
        let dx: Vec<f64> = x.grad(&grads).expect("input gradient").into_data().convert::<f64>().to_vec().unwrap();
        let ys: Vec<f64> = y.into_data().convert::<f64>().to_vec().unwrap();
        let exact = |x: f64| {
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * (1.0 + reference::erf(x / std::f64::consts::SQRT_2)) + x * pdf
        };
        let tanh_approx = |x: f64| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = c * (x + 0.044715 * x.powi(3));
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        };
        let worst = xs.iter().zip(&dx).map(|(&x, &d)| (d - exact(x)).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "max |dGELU - exact| {worst}");
        let tanh_gap = xs.iter().map(|&x| (tanh_approx(x) - exact(x)).abs()).fold(0.0, f64::max);
        assert!(tanh_gap > 1e-4, "the comparison tells the two derivatives apart ({tanh_gap})");
        let worst_y = xs.iter().zip(&ys).map(|(&x, &y)| (y - reference::gelu(x)).abs()).fold(0.0, f64::max);
        assert!(worst_y < 1e-6, "forward {worst_y}");
    }
}
