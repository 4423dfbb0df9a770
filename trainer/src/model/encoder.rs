//! ViT encoder on the visible patches (`CAEViT`, spec §2.1); also the teacher's architecture (§2.2).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::LayerNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Int, Tensor, backend::Backend};

use super::block::{Block, drop_path_schedule};
use super::config::CaeConfig;
use super::fused;
use super::init::{TRUNC_NORMAL_STD, layer_norm, patch_conv, trunc_normal};
use super::pos_embed::sincos_pos_embed;

/// Rows `idx[b, j]` of `x[b]`: a gather with a fixed count per sample.
///
/// # Shapes
/// - x: `[b, n, d]`, idx: `[b, k]` (values in `0..n`) -> `[b, k, d]`
pub fn gather_tokens<B: Backend>(x: Tensor<B, 3>, idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, _, d] = x.dims();
    let k = idx.dims()[1];
    let idx = idx.unsqueeze_dim::<3>(2).expand([b, k, d]); // [b, k, d]
    x.gather(1, idx) // [b, k, d]
}

/// Conv2d(3 -> D, kernel = stride = patch) then flatten to tokens (MS0 `patch_embed.projection`).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// The patchifying convolution.
    pub projection: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// `[b, 3, H, W]` -> `[b, N, d]`, tokens in raster order.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = crate::amp::to_f32(crate::amp::conv2d(&self.projection, images)); // [b, d, g, g]
        x.flatten::<3>(2, 3).swap_dims(1, 2) // [b, N, d]
    }
}

/// The CAE encoder (also used, frozen, as the teacher).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// Patch embedding.
    pub patch_embed: PatchEmbed<B>,
    /// Learned cls token `[1, 1, D]`.
    pub cls_token: Param<Tensor<B, 3>>,
    /// Fixed sin-cos table `[1 + N, D]` (cls row 0). A constant, not a parameter (spec §2.1).
    pub pos_embed: Tensor<B, 2>,
    /// The ViT blocks.
    pub layers: Vec<Block<B>>,
    /// Final LayerNorm after the last block (MS0 `ln1`).
    pub ln1: LayerNorm<B>,
    /// Epsilon of its LayerNorms (burn's `LayerNorm` keeps its own private).
    pub ln_eps: f64,
}

impl<B: Backend> Encoder<B> {
    /// A freshly initialised encoder (spec §2.6). The config is assumed validated.
    pub fn new(config: &CaeConfig, device: &B::Device) -> Self {
        let d = config.embed_dim;
        let layers = drop_path_schedule(config.drop_path, config.depth)
            .into_iter()
            .map(|dp| {
                Block::new(d, config.num_heads, config.mlp_dim, config.ln_eps, config.layer_scale_init, dp, device)
            })
            .collect();
        Self {
            patch_embed: PatchEmbed { projection: patch_conv(3, d, config.patch_size, device) },
            cls_token: trunc_normal([1, 1, d], TRUNC_NORMAL_STD, device),
            pos_embed: sincos_pos_embed(config.grid_size(), d, device),
            layers,
            ln1: layer_norm(d, config.ln_eps, device),
            ln_eps: config.ln_eps,
        }
    }

    /// Position embeddings of the given patches (cls slot excluded).
    ///
    /// # Shapes
    /// - idx: `[b, k]` -> `[b, k, d]`
    pub fn pos_at(&self, idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n1, d] = self.pos_embed.dims();
        let b = idx.dims()[0];
        let table = self.pos_embed.clone().narrow(0, 1, n1 - 1).unsqueeze::<3>().expand([b, n1 - 1, d]); // [b, N, d]
        gather_tokens(table, idx) // [b, k, d]
    }

    /// Encoder forward on the patches `visible_idx` (sorted, raster order; spec §2.1 steps 1-5).
    ///
    /// # Shapes
    /// - images: `[b, 3, H, W]` (normalised), visible_idx: `[b, n_vis]` -> `[b, 1 + n_vis, d]`
    pub fn forward(&self, images: Tensor<B, 4>, visible_idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n1, d] = self.pos_embed.dims();
        let x = self.patch_embed.forward(images); // [b, N, d]
        let b = x.dims()[0];
        let x = x + self.pos_embed.clone().narrow(0, 1, n1 - 1).unsqueeze::<3>(); // [b, N, d]
        let x = gather_tokens(x, visible_idx); // [b, n_vis, d]
        // pe_cls = 0 (spec §2.1), so the cls token goes in as is.
        let cls = self.cls_token.val().expand([b, 1, d]); // [b, 1, d]
        let mut x = Tensor::cat(vec![cls, x], 1); // [b, 1 + n_vis, d]
        for layer in &self.layers {
            x = layer.forward(x); // [b, 1 + n_vis, d]
        }
        fused::layer_norm(&self.ln1, self.ln_eps, x) // [b, 1 + n_vis, d]
    }

    /// Number of parameters from their shapes, without initialising lazy ones; excludes the
    /// constant `pos_embed` (add `(1 + N)·D` for the spec §2.7 figure).
    pub fn num_params_lazy(&self) -> usize {
        count_params_lazy(self)
    }
}

/// Parameter count of any module from lazy shapes (allocates nothing for lazy parameters).
pub fn count_params_lazy<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut c = Count(0);
    module.visit(&mut c);
    c.0
}

/// Copies every parameter value of `src` into the structurally identical `dst`, detached and
/// with `require_grad = false`; `dst` keeps its own parameter ids (so optimizers never confuse
/// the two). This is the teacher hard copy of spec §2.2 (momentum 0).
///
/// # Panics
/// If the two modules do not have the same parameter shapes in the same order (a programming
/// error: both are built from one config).
pub fn copy_params_frozen<B: Backend, M: Module<B>>(src: &M, dst: M) -> M {
    struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val().detach();
            let n = t.shape().num_elements();
            self.0.push(t.reshape([n]));
        }
    }
    struct Assign<B: Backend>(std::vec::IntoIter<Tensor<B, 1>>);
    impl<B: Backend> ModuleMapper<B> for Assign<B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let shape = param.lazy_shape();
            let src = self.0.next().expect("copy_params_frozen: source has fewer parameters than destination");
            assert_eq!(src.dims()[0], shape.num_elements(), "copy_params_frozen: parameter shape mismatch");
            let dims: [usize; D] = shape.dims();
            Param::initialized(param.id, src.reshape(dims).set_require_grad(false))
        }
    }
    let mut collect = Collect(Vec::new());
    src.visit(&mut collect);
    let mut assign = Assign(collect.0.into_iter());
    let out = dst.map(&mut assign);
    assert!(assign.0.next().is_none(), "copy_params_frozen: source has more parameters than destination");
    out
}
