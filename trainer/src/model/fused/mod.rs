//! Fused CPU kernels for a ViT step: exact GELU, softmax over the last axis, LayerNorm,
//! multi-head attention and linear layers, each forward and backward.
//!
//! burn 0.21 has no fused backward for these on its autodiff backend: softmax and LayerNorm
//! run as chains of 5-9 tracked ops (max, sub, exp, sum, div, ...), burn-flex evaluates GELU one
//! element at a time through libm's scalar `erff`, attention's head split/merge views are copied
//! element by element, and every matmul output is zero-filled and then copied to an aligned
//! buffer. Here, on the CPU backend in f32 (`Flex` / `Autodiff<Flex>`), each op is one forward
//! kernel (burn-flex's row kernel for softmax; ours, calling `gemm` directly, for the rest) and
//! one backward kernel registered with burn's autodiff as a custom op. Every other backend,
//! dtype and checkpointing strategy calls burn's composite, so the CUDA path is unchanged. The
//! backend is recognised by its concrete type at run time (`Any`), which keeps the model generic
//! over plain `Backend`.
//!
//! Determinism: every kernel computes each output element (and each chunk's partial sum, see
//! [`layer_norm`]) in a fixed order, independent of the number of threads;
//! large GEMMs use gemm's own rayon split, as burn-flex's do.

mod attention;
mod gelu;
mod layer_norm;
mod linear;
mod softmax;

pub use attention::{cross_attention, self_attention};
pub use gelu::{gelu, gelu_erf};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use softmax::softmax_last;

use std::any::{Any, TypeId};
use std::borrow::Cow;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use gemm::Parallelism;
use rayon::prelude::*;

/// The float primitive of `Autodiff<Flex>` (burn's `AutodiffTensor<Flex>`).
type AutodiffFlexTensor = burn::tensor::ops::FloatTensor<Autodiff<Flex>>;

/// Elements per rayon task for element-wise kernels; smaller tensors run on the calling thread.
const CHUNK: usize = 16 * 1024;

/// The primitive of a tensor on the CPU backend, tracked or not, when the fast path applies.
enum Cpu<P> {
    /// `Autodiff<Flex>` (its default, non-checkpointing strategy).
    Tracked(AutodiffFlexTensor),
    /// Plain `Flex` (inference, the teacher's inner backend).
    Plain(FlexTensor),
    /// Any other backend or dtype: use burn's op on the original primitive.
    Other(P),
}

/// Sorts `x`'s primitive into the [`Cpu`] cases.
fn classify<B: Backend, const D: usize>(x: Tensor<B, D>) -> Cpu<B::FloatTensorPrimitive> {
    let backend = TypeId::of::<B>();
    let fast =
        x.dtype() == DType::F32 && (backend == TypeId::of::<Autodiff<Flex>>() || backend == TypeId::of::<Flex>());
    let p = x.into_primitive().tensor();
    if !fast {
        return Cpu::Other(p);
    }
    let p = match cast::<_, AutodiffFlexTensor>(p) {
        Ok(t) => return Cpu::Tracked(t),
        Err(p) => p,
    };
    match cast::<_, FlexTensor>(p) {
        Ok(t) => Cpu::Plain(t),
        Err(p) => Cpu::Other(p),
    }
}

/// A tensor of `B` from a primitive of the same concrete type `P` (checked by [`classify`]).
fn tensor<B: Backend, P: 'static, const D: usize>(p: P) -> Tensor<B, D> {
    match cast::<P, B::FloatTensorPrimitive>(p) {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(p)),
        Err(_) => unreachable!("the primitive was classified as this backend's"),
    }
}

/// A tensor of `B` from its own primitive.
fn from_primitive<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `t` as a `U` when `T` is `U`, else `t` back.
fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    if let Some(u) = (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take) {
        return Ok(u);
    }
    match slot {
        Some(t) => Err(t),
        None => unreachable!("the slot is emptied only by a successful downcast"),
    }
}

/// The row-major f32 values of `t`: borrowed when `t` is a contiguous f32 tensor, else copied
/// (a strided view, or a gradient of another dtype converted to f32).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    if let Some(s) = t.as_slice::<f32>() {
        return Cow::Borrowed(s);
    }
    let data = t.clone().into_data().convert::<f32>();
    Cow::Owned(data.to_vec::<f32>().unwrap_or_else(|_| data.iter::<f32>().collect()))
}

/// A new f32 tensor of `shape` whose chunks `f(start, out_chunk)` fills in parallel (chunks of
/// `chunk` elements; one call when the tensor is no larger than a chunk).
fn fill_chunks(shape: Shape, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> FlexTensor {
    let mut out = vec![0.0f32; shape.num_elements()];
    if out.len() <= chunk {
        f(0, &mut out);
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| f(i * chunk, o));
    }
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// A pointer shared by rayon tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the kernels that share one give every task its own rows and columns to write.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the `Send` wrapper, not its field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)`, each given by pointer, column stride and row
/// stride (in elements); with `accumulate`, `dst += beta · lhs · rhs`.
///
/// # Safety
/// Every element addressed through the strides must be in bounds of its allocation, and `dst`
/// must not overlap `lhs`, `rhs` or memory another thread uses.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let s = |x: usize| x as isize;
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: forwarded from the caller; gemm computes dst = alpha·dst + beta·lhs·rhs and reads
    // dst only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            s(dst.1),
            s(dst.2),
            accumulate,
            lhs.0,
            s(lhs.1),
            s(lhs.2),
            rhs.0,
            s(rhs.1),
            s(rhs.2),
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The primitive of `t`, whose backend the caller has already classified as having primitive
/// type `P` (another tensor of the same `B` came out of [`classify`] as `P`).
fn primitive<B: Backend, P: 'static, const D: usize>(t: Tensor<B, D>) -> P {
    match cast::<B::FloatTensorPrimitive, P>(t.into_primitive().tensor()) {
        Ok(p) => p,
        Err(_) => unreachable!("a tensor of the same backend was classified as this primitive"),
    }
}
