//! MS0 initialisation (spec §2.6). Every helper returns lazily-initialised parameters, so a
//! module can be built (and its parameters counted) without allocating its weights.
//!
//! - every Linear: xavier-uniform over the whole matrix, bias 0;
//! - LayerNorm: weight 1, bias 0;
//! - patch Conv2d, cls token, mask token, head weight: trunc-normal std 0.02, truncated at the
//!   *absolute* bounds ±2 (MMCV `trunc_normal_init` defaults; at std 0.02 that is 100σ, so it is
//!   realised as a normal draw clamped to ±2, which only differs on a ~1e-2000 event);
//! - layer scale gamma: 0.1; q_bias / v_bias: 0.

use burn::module::{Initializer, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Distribution, Shape, Tensor, backend::Backend};

/// Std of the trunc-normal draws (spec §2.6).
pub const TRUNC_NORMAL_STD: f64 = 0.02;
/// Absolute truncation bound of the trunc-normal draws (MMCV defaults a = -2, b = 2).
pub const TRUNC_NORMAL_BOUND: f64 = 2.0;

/// `Linear(d_in -> d_out)`, weight xavier-uniform (bound √(6/(d_in+d_out))), bias 0 if present.
/// burn stores the weight as `[d_in, d_out]`.
pub fn xavier_linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    let weight = Initializer::XavierUniform { gain: 1.0 }.init_with([d_in, d_out], Some(d_in), Some(d_out), device);
    let bias = bias.then(|| Initializer::Zeros.init([d_out], device));
    Linear { weight, bias }
}

/// A lazily drawn N(0, std²) tensor clamped to ±[`TRUNC_NORMAL_BOUND`].
pub fn trunc_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let shape_for_init = shape;
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| {
            let t = Tensor::<B, D>::random(shape_for_init, Distribution::Normal(0.0, std), device)
                .clamp(-TRUNC_NORMAL_BOUND, TRUNC_NORMAL_BOUND);
            if require_grad { t.require_grad() } else { t }
        },
        device.clone(),
        true,
        Shape::from(shape),
    )
}

/// A lazily filled constant parameter (layer scale 0.1, q/v bias 0).
pub fn constant<B: Backend, const D: usize>(shape: [usize; D], value: f64, device: &B::Device) -> Param<Tensor<B, D>> {
    Initializer::Constant { value }.init(shape, device)
}

/// LayerNorm with weight 1, bias 0 and the given epsilon (1e-6 in CAE).
pub fn layer_norm<B: Backend>(d: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

/// Patch embedding conv `3 -> D`, kernel = stride = patch, trunc-normal weight, bias 0.
pub fn patch_conv<B: Backend>(in_chans: usize, d: usize, patch: usize, device: &B::Device) -> Conv2d<B> {
    let mut conv = Conv2dConfig::new([in_chans, d], [patch, patch]).with_stride([patch, patch]).init(device);
    conv.weight = trunc_normal([d, in_chans, patch, patch], TRUNC_NORMAL_STD, device);
    conv.bias = Some(Initializer::Zeros.init([d], device));
    conv
}
