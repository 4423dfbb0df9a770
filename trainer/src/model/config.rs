//! Model configuration and named presets (spec §2.1, §2.3, §2.4, §7).

use serde::{Deserialize, Serialize};

use super::dalle::DalleConfig;
use crate::CaeError;

/// Weight λ of the alignment loss (spec §2.5); the default of `CaeConfig::align_weight`.
pub const ALIGN_WEIGHT: f64 = 2.0;

/// MAE's variance floor of the per-patch normalisation (the default of `norm_pix_eps`).
pub const NORM_PIX_EPS: f64 = 1e-6;

/// What the decoder predicts at the masked positions (spec §2.4, §2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// DALL-E visual tokens, cross-entropy loss (the CAE recipe).
    Dalle,
    /// Per-patch-normalised pixels, MSE loss (MAE-style `norm_pix_loss`).
    Pixels,
}

/// Hyper-parameters of the CAE network. Build one with a preset (`base()`, `small()`, `tiny()`,
/// `micro()`) and override fields; call [`CaeConfig::validate`] before use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaeConfig {
    /// Side of the (square) input view 1, in pixels (224 for ViT-B).
    pub img_size: usize,
    /// Side of a square patch, in pixels (16).
    pub patch_size: usize,
    /// Token width D, shared by encoder, regressor and decoder.
    pub embed_dim: usize,
    /// Number of encoder blocks (the teacher has the same).
    pub depth: usize,
    /// Attention heads in every block; head dim = D / heads.
    pub num_heads: usize,
    /// Hidden width of every FFN (4·D in all presets).
    pub mlp_dim: usize,
    /// Latent context regressor layers (spec §2.3).
    pub regressor_depth: usize,
    /// Decoder blocks (spec §2.4).
    pub decoder_depth: usize,
    /// Masked patches per sample: 75 in MS0, 98 in the authors' scripts (spec §1.1).
    pub num_mask: usize,
    /// Size of the token vocabulary predicted by the head (`dalle` target). In a run config it
    /// follows `tokenizer.vocab_size` (`crate::config`'s derived keys).
    #[serde(default)]
    pub vocab_size: usize,
    /// Stochastic depth rate, spread linearly over the blocks (0 in MS0, 0.1 in ORIG; spec §2.1).
    pub drop_path: f64,
    /// Initial value of the layer-scale vectors gamma_1 / gamma_2 (spec §2.1).
    pub layer_scale_init: f64,
    /// LayerNorm epsilon (1e-6, spec §2.1).
    pub ln_eps: f64,
    /// Prediction target.
    pub target: TargetKind,
    /// The DALL-E tokenizer that produces the targets (spec §3); ignored for `pixels`.
    pub tokenizer: DalleConfig,
    /// Weight λ of the alignment loss (spec §2.5: 2).
    #[serde(default = "default_align_weight")]
    pub align_weight: f64,
    /// `pixels` target: normalise every target patch by its own mean and variance (MAE's
    /// `norm_pix_loss`, the default) instead of predicting the normalised view's pixels as they
    /// are.
    #[serde(default = "default_norm_pix")]
    pub norm_pix_loss: bool,
    /// Variance floor of that normalisation, `(x - μ)/√(σ² + eps)` (MAE: 1e-6).
    #[serde(default = "default_norm_pix_eps")]
    pub norm_pix_eps: f64,
}

fn default_norm_pix_eps() -> f64 {
    NORM_PIX_EPS
}

fn default_align_weight() -> f64 {
    ALIGN_WEIGHT
}

fn default_norm_pix() -> bool {
    true
}

impl CaeConfig {
    /// ViT-B/16, the MS0 recipe (spec §2.1-§2.4): 85.8 M encoder, 63.0 M neck.
    pub fn base() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_dim: 3072,
            regressor_depth: 4,
            decoder_depth: 4,
            num_mask: 75,
            vocab_size: 8192,
            drop_path: 0.0,
            layer_scale_init: 0.1,
            ln_eps: 1e-6,
            target: TargetKind::Dalle,
            tokenizer: DalleConfig::openai(),
            align_weight: ALIGN_WEIGHT,
            norm_pix_loss: true,
            norm_pix_eps: NORM_PIX_EPS,
        }
    }

    /// ViT-S/16 as in ORIG (spec §6: 12 heads of dim 32), same neck depths as base.
    pub fn small() -> Self {
        Self { embed_dim: 384, num_heads: 12, mlp_dim: 1536, ..Self::base() }
    }

    /// "CAE-Ti" (spec §7 A): D 192, 3 heads, 224 input, 75 masks, the real DALL-E.
    pub fn tiny() -> Self {
        Self { embed_dim: 192, num_heads: 3, mlp_dim: 768, ..Self::base() }
    }

    /// "micro" (spec §7 B): 64 px, 4x4 patches, 6 masks, D 64, random 512-token tokenizer.
    pub fn micro() -> Self {
        Self {
            img_size: 64,
            patch_size: 16,
            embed_dim: 64,
            depth: 2,
            num_heads: 2,
            mlp_dim: 256,
            regressor_depth: 1,
            decoder_depth: 1,
            num_mask: 6,
            vocab_size: 512,
            drop_path: 0.0,
            layer_scale_init: 0.1,
            ln_eps: 1e-6,
            target: TargetKind::Dalle,
            tokenizer: DalleConfig::micro(),
            align_weight: ALIGN_WEIGHT,
            norm_pix_loss: true,
            norm_pix_eps: NORM_PIX_EPS,
        }
    }

    /// Patches per side (14 for 224/16).
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Patches per image N (196 for 224/16).
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Visible patches per image, N - num_mask (121 for base).
    pub fn num_visible(&self) -> usize {
        self.num_patches() - self.num_mask
    }

    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Side of the tokenizer view 2 (half of view 1, spec §1 step 3).
    pub fn target_view_size(&self) -> usize {
        self.img_size / 2
    }

    /// Width of one prediction: vocab (dalle) or patch_size²·3 (pixels).
    pub fn head_out_dim(&self) -> usize {
        match self.target {
            TargetKind::Dalle => self.vocab_size,
            TargetKind::Pixels => self.patch_size * self.patch_size * 3,
        }
    }

    /// Checks the invariants the model relies on; call once at start-up.
    pub fn validate(&self) -> Result<(), CaeError> {
        let fail = |m: String| Err(CaeError::Config(m));
        if self.patch_size == 0 || self.img_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            return fail(format!("img_size {} not a multiple of patch_size {}", self.img_size, self.patch_size));
        }
        if self.embed_dim == 0 || self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return fail(format!("embed_dim {} not divisible by num_heads {}", self.embed_dim, self.num_heads));
        }
        if !self.embed_dim.is_multiple_of(4) {
            return fail(format!("embed_dim {} must be a multiple of 4 (2-D sin-cos, spec §2.1)", self.embed_dim));
        }
        if self.mlp_dim == 0 || self.depth == 0 || self.regressor_depth == 0 || self.decoder_depth == 0 {
            return fail("mlp_dim and all depths must be > 0".into());
        }
        if self.num_mask == 0 || self.num_mask >= self.num_patches() {
            return fail(format!("num_mask {} must be in 1..{}", self.num_mask, self.num_patches()));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return fail(format!("drop_path {} must be in [0, 1)", self.drop_path));
        }
        if !(self.align_weight.is_finite() && self.align_weight >= 0.0) {
            return fail(format!("align_weight {} must be >= 0", self.align_weight));
        }
        if !(self.norm_pix_eps.is_finite() && self.norm_pix_eps > 0.0) {
            return fail(format!("norm_pix_eps {} must be > 0", self.norm_pix_eps));
        }
        if self.ln_eps.is_nan() || self.ln_eps <= 0.0 {
            return fail(format!("ln_eps {} must be > 0", self.ln_eps));
        }
        if self.target == TargetKind::Dalle {
            if self.vocab_size != self.tokenizer.vocab_size {
                return fail(format!(
                    "vocab_size {} differs from tokenizer vocab {}",
                    self.vocab_size, self.tokenizer.vocab_size
                ));
            }
            self.tokenizer.validate()?;
            // The tokenizer downsamples by 8 (three 2x pools, spec §3): one token per patch.
            let token_grid = self.target_view_size() / 8;
            if !self.img_size.is_multiple_of(2)
                || !self.target_view_size().is_multiple_of(8)
                || token_grid != self.grid_size()
            {
                return fail(format!(
                    "tokenizer grid ({}/2)/8 = {} must equal the patch grid {}",
                    self.img_size,
                    token_grid,
                    self.grid_size()
                ));
            }
        }
        Ok(())
    }
}
