//! MS0 initialisation (spec §2.6). Every helper returns lazily-initialised parameters, so a
//! module can be built (and its parameters counted) without allocating its weights.
//!
//! - every Linear: xavier-uniform over the whole matrix, bias 0;
//! - LayerNorm: weight 1, bias 0;
//! - patch Conv2d, cls token, mask token, head weight: trunc-normal std 0.02, truncated at the
//!   *absolute* bounds ±2 (MMCV `trunc_normal_init` defaults; at std 0.02 that is 100σ, so it is
//!   realised as a normal draw clamped to ±2, which only differs on a ~1e-2000 event);
//! - layer scale gamma: 0.1; q_bias / v_bias: 0.
//!
//! Random values come from our own seeded streams, not from burn's process-wide RNG: every random
//! parameter takes, when it is *built*, the next ChaCha8 stream of the seed set by [`with_seed`]
//! on this thread, and draws its values on the host from that stream when first used. So the
//! same seed gives bit-identical initial weights on every backend (CPU or CUDA), whatever else
//! draws random numbers in the process (drop path, other threads), and whatever order the
//! parameters are first touched in.

use std::cell::Cell;

use burn::module::{Initializer, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Shape, Tensor, TensorData, backend::Backend};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

thread_local! {
    /// (seed, next stream) of the parameters built on this thread.
    static STREAMS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Runs `f` (which builds modules) with the initial weights drawn from `seed`: the parameters it
/// builds take the seed's streams 0, 1, 2, ... in construction order. Outside any `with_seed`
/// a thread uses seed 0. Restores the previous seed afterwards, even if `f` panics.
pub fn with_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    struct Restore((u64, u64));
    impl Drop for Restore {
        fn drop(&mut self) {
            STREAMS.set(self.0);
        }
    }
    let _restore = Restore(STREAMS.replace((seed, 0)));
    f()
}

/// The RNG of the next parameter built on this thread.
fn next_stream() -> ChaCha8Rng {
    let (seed, stream) = STREAMS.get();
    STREAMS.set((seed, stream + 1));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A lazily drawn parameter: `draw` fills it on the host from this parameter's own stream.
pub fn drawn<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
    require_grad: bool,
    draw: impl Fn(&mut ChaCha8Rng) -> f32 + Send + Sync + 'static,
) -> Param<Tensor<B, D>> {
    let rng = next_stream();
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| {
            let mut rng = rng.clone();
            let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| draw(&mut rng)).collect();
            let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), device);
            if require_grad { t.require_grad() } else { t }
        },
        device.clone(),
        require_grad,
        Shape::from(shape),
    )
}

/// A lazily drawn N(0, std²) parameter (no truncation).
pub fn normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
    require_grad: bool,
) -> Param<Tensor<B, D>> {
    drawn(shape, device, require_grad, move |rng| (std * rng.sample::<f64, _>(StandardNormal)) as f32)
}

/// Std of the trunc-normal draws (spec §2.6).
pub const TRUNC_NORMAL_STD: f64 = 0.02;
/// Absolute truncation bound of the trunc-normal draws (MMCV defaults a = -2, b = 2).
pub const TRUNC_NORMAL_BOUND: f64 = 2.0;

/// `Linear(d_in -> d_out)`, weight xavier-uniform (bound √(6/(d_in+d_out))), bias 0 if present.
/// burn stores the weight as `[d_in, d_out]`.
pub fn xavier_linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    let a = (6.0 / (d_in + d_out) as f64).sqrt();
    let weight = drawn([d_in, d_out], device, true, move |rng| rng.random_range(-a..=a) as f32);
    let bias = bias.then(|| Initializer::Zeros.init([d_out], device));
    Linear { weight, bias }
}

/// A lazily drawn N(0, std²) tensor clamped to ±[`TRUNC_NORMAL_BOUND`].
pub fn trunc_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    drawn(shape, device, true, move |rng| {
        (std * rng.sample::<f64, _>(StandardNormal)).clamp(-TRUNC_NORMAL_BOUND, TRUNC_NORMAL_BOUND) as f32
    })
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
