//! Mixed precision as PyTorch's AMP does it (autocast + GradScaler; spec §4 trains MS0's recipe
//! in fp16 that way).
//!
//! The backend stays f32: parameters, accumulated gradients, AdamW moments and the update are f32
//! (master weights). Inside [`autocast`] the products that dominate the step run in the half type:
//! linear layers ([`linear_rows`]), the attention products ([`matmul`]), the patch embedding and
//! the DALL-E convolutions ([`conv2d`]). Their inputs and weights are cast to the half type, the
//! product computes there, and the result is cast back to f32, so softmax, LayerNorm, GELU, the
//! residual stream, the losses and every reduction stay f32. burn's autodiff records the casts:
//! a gradient reaching a cast flows back in the type of the cast's input, so a weight's gradient
//! arrives in f32 whatever its product ran in. f16's narrow range is covered by the dynamic loss
//! scaling of [`crate::precision::LossScaler`] (scale and unscaling in f32).
//!
//! The setting is per thread, like `torch.autocast`: the training loop and the device feeder
//! (which runs the tokenizer) each enter it. Outside [`autocast`] every function here is the
//! plain f32 op.

use std::cell::Cell;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d as conv2d_op;
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::{DType, Tensor};

use crate::precision::Dtype;

thread_local! {
    /// The half type products compute in on this thread, `None` outside [`autocast`].
    static HALF: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Runs `f` with products in `dtype` (nothing changes for [`Dtype::F32`]); the previous setting
/// is restored afterwards, also when `f` panics.
pub fn autocast<R>(dtype: Dtype, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<DType>);
    impl Drop for Restore {
        fn drop(&mut self) {
            HALF.with(|h| h.set(self.0));
        }
    }
    let _restore = Restore(HALF.with(|h| h.replace(half_of(dtype))));
    f()
}

/// The burn dtype products run in for a run's `precision.dtype` (`None` for f32).
pub fn half_of(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => None,
        Dtype::Bf16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
    }
}

/// The half type of the current thread's [`autocast`], if any.
pub fn active() -> Option<DType> {
    HALF.with(Cell::get)
}

/// `t` in the half type `h`.
pub fn to_half<B: Backend, const D: usize>(t: Tensor<B, D>, h: DType) -> Tensor<B, D> {
    if t.dtype() == h { t } else { t.cast(h) }
}

/// `t` back in f32.
pub fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) }
}

/// `a · b` (burn's batched matmul), computed in the autocast type, returned in f32.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    match active() {
        None => a.matmul(b),
        Some(h) => to_f32(to_half(a, h).matmul(to_half(b, h))),
    }
}

/// `x·w + b` over rows in the autocast type, returned in f32; `None` outside [`autocast`] (the
/// caller then takes its f32 path).
///
/// # Shapes
/// - x: `[m, k]`, w: `[k, n]`, b: `[n]` -> `[m, n]`
pub fn linear_rows<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, b: Option<&Tensor<B, 1>>) -> Option<Tensor<B, 2>> {
    let h = active()?;
    let y = to_half(x.clone(), h).matmul(to_half(w.clone(), h)); // [m, n] in h
    let y = match b {
        Some(b) => y + to_half(b.clone(), h).unsqueeze::<2>(),
        None => y,
    };
    Some(to_f32(y))
}

/// `conv.forward(x)` with input, weight and bias in the autocast type; the output stays in that
/// type (a chain of convolutions, the DALL-E tokenizer, keeps its activations half as under
/// `torch.autocast`; call [`to_f32`] where f32 is needed). Outside [`autocast`]: `conv.forward`.
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let Some(h) = active() else { return conv.forward(x) };
    let (start, end) = match &conv.padding {
        PaddingConfig2d::Valid => ([0, 0], [0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => ([*top, *left], [*bottom, *right]),
        // Not used by the model (its convolutions are `Valid` or `Explicit`): burn's own f32 op.
        PaddingConfig2d::Same => return conv.forward(to_f32(x)),
    };
    let options = PaddedConvOptions::asymmetric(conv.stride, start, end, conv.dilation, conv.groups);
    conv2d_op(to_half(x, h), to_half(conv.weight.val(), h), conv.bias.as_ref().map(|b| to_half(b.val(), h)), options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    type AB = Autodiff<Flex>;

    #[test]
    fn autocast_is_scoped_and_restored() {
        assert_eq!(active(), None);
        autocast(Dtype::Bf16, || {
            assert_eq!(active(), Some(DType::BF16));
            autocast(Dtype::F32, || assert_eq!(active(), None));
            assert_eq!(active(), Some(DType::BF16));
        });
        assert_eq!(active(), None);
        let r = std::panic::catch_unwind(|| autocast(Dtype::F16, || panic!("inside")));
        assert!(r.is_err());
        assert_eq!(active(), None, "restored after a panic");
        // Per thread, as torch.autocast.
        autocast(Dtype::F16, || {
            let other = std::thread::spawn(active).join().unwrap();
            assert_eq!(other, None);
        });
    }

    /// Under autocast the product is the f32 product of the half-rounded operands (within the
    /// half type's rounding of the result), the output and the gradients reaching f32 leaves are
    /// f32, and the gradients equal the f32 formulas `dx = g·wᵀ`, `dw = xᵀ·g` within bf16
    /// tolerance.
    #[test]
    fn half_products_return_f32_and_pass_f32_gradients() {
        let dev = Default::default();
        let x = Tensor::<AB, 2>::random([6, 5], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let w = Tensor::<AB, 2>::random([5, 4], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let b = Tensor::<AB, 1>::random([4], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let y = autocast(Dtype::Bf16, || linear_rows(&x, &w, Some(&b))).expect("inside autocast");
        assert_eq!(y.dtype(), DType::F32);
        assert!(linear_rows(&x, &w, Some(&b)).is_none(), "outside autocast the caller's path runs");
        let reference = x.clone().matmul(w.clone()) + b.clone().unsqueeze::<2>();
        let diff = (y.clone() - reference.clone()).abs().max().into_scalar();
        let scale = reference.clone().abs().max().into_scalar();
        assert!(diff <= 2e-2 * scale && diff > 0.0, "bf16 product: diff {diff} of {scale}");

        let grads = y.sum().backward();
        let (gx, gw, gb) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap(), b.grad(&grads).unwrap());
        assert_eq!((gx.dtype(), gw.dtype(), gb.dtype()), (DType::F32, DType::F32, DType::F32));
        let ones = Tensor::<Flex, 2>::ones([6, 4], &dev);
        let gx_ref = ones.clone().matmul(w.inner().transpose());
        let gw_ref = x.inner().transpose().matmul(ones);
        let close = |a: Tensor<Flex, 2>, r: Tensor<Flex, 2>| {
            let d = (a - r.clone()).abs().max().into_scalar();
            d <= 2e-2 * r.abs().max().into_scalar()
        };
        assert!(close(gx, gx_ref), "input gradient");
        assert!(close(gw, gw_ref), "weight gradient");
        assert_eq!(gb.into_data(), TensorData::from([6.0f32; 4]), "bias gradient: 6 rows of ones, exact in bf16");
    }
}
