//! The CAE model: encoder, teacher, regressor, decoder, and the losses (spec §2.2-§2.5).

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax, backend::Backend};

pub use super::config::{ALIGN_WEIGHT, NORM_PIX_EPS};
use super::config::{CaeConfig, TargetKind};
use super::decoder::Decoder;
use super::encoder::{Encoder, copy_params_frozen, gather_tokens};
use super::regressor::Regressor;
use crate::CaeError;

/// What the decoder is trained to predict, given for **every** patch (raster order); the model
/// takes the masked entries itself, in batch-major, raster order (spec §2.5).
#[derive(Clone, Debug)]
pub enum CaeTargets<B: Backend> {
    /// DALL-E token ids `[b, N]` (from [`super::dalle::DalleEncoder::tokens`]).
    Tokens(Tensor<B, 2, Int>),
    /// Per-patch-normalised pixels `[b, N, patch²·3]` (from [`pixel_targets`]).
    Pixels(Tensor<B, 3>),
}

impl<B: Backend> CaeTargets<B> {
    fn kind_name(&self) -> &'static str {
        match self {
            Self::Tokens(_) => "dalle",
            Self::Pixels(_) => "pixels",
        }
    }
}

/// Losses of one forward pass (all scalars `[1]`). Only `loss` is back-propagated.
#[derive(Clone, Debug)]
pub struct CaeOutput<B: Backend> {
    /// `loss_main + loss_align`.
    pub loss: Tensor<B, 1>,
    /// Cross-entropy over the masked tokens (dalle) or MSE over masked pixels (pixels).
    pub loss_main: Tensor<B, 1>,
    /// `λ · mean((latent_pred - latent_target)²)`, target detached (λ = `align_weight`, 2).
    pub loss_align: Tensor<B, 1>,
}

/// Intermediate tensors of a forward pass (for diagnostics and tests).
#[derive(Clone, Debug)]
pub struct CaeForward<B: Backend> {
    /// Encoder output without cls `[b, n_vis, d]` (after the final LN).
    pub x_vis: Tensor<B, 3>,
    /// Regressor output `[b, n_mask, d]`.
    pub latent_pred: Tensor<B, 3>,
    /// Teacher output on the masked patches, cls dropped, detached `[b, n_mask, d]`.
    pub latent_target: Tensor<B, 3>,
    /// Head output `[b, n_mask, vocab]` or `[b, n_mask, patch²·3]`.
    pub prediction: Tensor<B, 3>,
}

/// The whole CAE network (the DALL-E tokenizer is separate: it only produces targets).
#[derive(Module, Debug)]
pub struct Cae<B: Backend> {
    /// The student encoder, trained.
    pub encoder: Encoder<B>,
    /// Frozen copy of the encoder (spec §2.2): never requires grad, refreshed by
    /// [`Cae::update_teacher`]. With `drop_path > 0` it applies drop path too whenever autodiff
    /// is on, as ORIG's teacher does (it stays in train mode).
    pub teacher: Encoder<B>,
    /// Latent context regressor (spec §2.3), holds the mask token.
    pub regressor: Regressor<B>,
    /// Decoder and head (spec §2.4).
    pub decoder: Decoder<B>,
    /// The configuration the model was built from.
    pub config: CaeConfig,
}

impl<B: Backend> Cae<B> {
    /// Validates the config and builds a freshly initialised model (spec §2.6); the teacher
    /// starts as a copy of the encoder.
    pub fn new(config: &CaeConfig, device: &B::Device) -> Result<Self, CaeError> {
        config.validate()?;
        let encoder = Encoder::new(config, device);
        let teacher = copy_params_frozen(&encoder, Encoder::new(config, device));
        Ok(Self {
            encoder,
            teacher,
            regressor: Regressor::new(config, device),
            decoder: Decoder::new(config, device),
            config: config.clone(),
        })
    }

    /// Hard copy of the current encoder weights into the teacher (momentum 0, spec §2.2).
    /// Call it after the forward pass and **before** the optimizer step: at iteration k the
    /// teacher then holds the encoder as it was at the start of iteration k-1.
    pub fn update_teacher(self) -> Self {
        let teacher = copy_params_frozen(&self.encoder, self.teacher);
        Self { teacher, ..self }
    }

    fn check_inputs(
        &self,
        images: &Tensor<B, 4>,
        visible_idx: &Tensor<B, 2, Int>,
        masked_idx: &Tensor<B, 2, Int>,
    ) -> Result<(), CaeError> {
        let c = &self.config;
        let [b, ch, h, w] = images.dims();
        if ch != 3 || h != c.img_size || w != c.img_size {
            return Err(CaeError::Shape {
                what: "images",
                expected: vec![b, 3, c.img_size, c.img_size],
                got: images.dims().to_vec(),
            });
        }
        let expect_vis = vec![b, c.num_visible()];
        if visible_idx.dims().to_vec() != expect_vis {
            return Err(CaeError::Shape {
                what: "visible_idx",
                expected: expect_vis,
                got: visible_idx.dims().to_vec(),
            });
        }
        let expect_mask = vec![b, c.num_mask];
        if masked_idx.dims().to_vec() != expect_mask {
            return Err(CaeError::Shape { what: "masked_idx", expected: expect_mask, got: masked_idx.dims().to_vec() });
        }
        Ok(())
    }

    /// Runs encoder, teacher, regressor and decoder (spec §2.1-§2.4).
    ///
    /// # Shapes
    /// - images: `[b, 3, H, W]`, normalised view 1
    /// - visible_idx: `[b, n_vis]`, masked_idx: `[b, n_mask]`: sorted patch indices, disjoint,
    ///   together covering `0..N` (see [`mask_to_indices`]). Values are not checked here.
    pub fn forward_parts(
        &self,
        images: Tensor<B, 4>,
        visible_idx: Tensor<B, 2, Int>,
        masked_idx: Tensor<B, 2, Int>,
    ) -> Result<CaeForward<B>, CaeError> {
        self.check_inputs(&images, &visible_idx, &masked_idx)?;
        let [b, _, _, _] = images.dims();
        let d = self.config.embed_dim;
        let n_vis = self.config.num_visible();
        let n_mask = self.config.num_mask;

        let x = self.encoder.forward(images.clone(), visible_idx.clone()); // [b, 1 + n_vis, d]
        let x_vis = x.slice([0..b, 1..1 + n_vis, 0..d]); // [b, n_vis, d]
        let pos_vis = self.encoder.pos_at(visible_idx); // [b, n_vis, d]
        let pos_mask = self.encoder.pos_at(masked_idx.clone()); // [b, n_mask, d]

        let latent_pred = self.regressor.forward(x_vis.clone(), pos_vis, pos_mask.clone()); // [b, n_mask, d]
        let prediction = self.decoder.forward(latent_pred.clone(), pos_mask); // [b, n_mask, out]

        // Teacher on the masked patches of the same image, cls dropped (spec §2.2).
        let t = self.teacher.forward(images.detach(), masked_idx); // [b, 1 + n_mask, d]
        let latent_target = t.slice([0..b, 1..1 + n_mask, 0..d]).detach(); // [b, n_mask, d]

        Ok(CaeForward { x_vis, latent_pred, latent_target, prediction })
    }

    /// Forward pass and losses (spec §2.5).
    ///
    /// `targets` must match `config.target`; see [`Cae::forward_parts`] for the other inputs.
    pub fn forward(
        &self,
        images: Tensor<B, 4>,
        visible_idx: Tensor<B, 2, Int>,
        masked_idx: Tensor<B, 2, Int>,
        targets: &CaeTargets<B>,
    ) -> Result<CaeOutput<B>, CaeError> {
        let expected = match self.config.target {
            TargetKind::Dalle => "dalle",
            TargetKind::Pixels => "pixels",
        };
        if targets.kind_name() != expected {
            return Err(CaeError::TargetKind { expected, got: targets.kind_name() });
        }
        let b = images.dims()[0];
        let n = self.config.num_patches();
        match targets {
            CaeTargets::Tokens(t) if t.dims() != [b, n] => {
                return Err(CaeError::Shape { what: "token targets", expected: vec![b, n], got: t.dims().to_vec() });
            }
            CaeTargets::Pixels(t) if t.dims() != [b, n, self.config.head_out_dim()] => {
                return Err(CaeError::Shape {
                    what: "pixel targets",
                    expected: vec![b, n, self.config.head_out_dim()],
                    got: t.dims().to_vec(),
                });
            }
            _ => {}
        }
        let parts = self.forward_parts(images, visible_idx, masked_idx.clone())?;
        let loss_main = match targets {
            CaeTargets::Tokens(tokens) => {
                let tokens = tokens.clone().gather(1, masked_idx); // [b, n_mask]
                cross_entropy(parts.prediction, tokens)
            }
            CaeTargets::Pixels(pixels) => {
                let target = gather_tokens(pixels.clone(), masked_idx).detach(); // [b, n_mask, p²·3]
                (parts.prediction - target).powi_scalar(2).mean()
            }
        };
        let loss_align = (parts.latent_pred - parts.latent_target).powi_scalar(2).mean() * self.config.align_weight;
        Ok(CaeOutput { loss: loss_main.clone() + loss_align.clone(), loss_main, loss_align })
    }
}

/// Mean cross-entropy of `logits [b, n, v]` against `targets [b, n]`, rows in batch-major order.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, n, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * n, v]), 1); // [b·n, v]
    let picked = logp.gather(1, targets.reshape([b * n, 1])); // [b·n, 1]
    picked.mean().neg()
}

/// The pixels of every patch, patchified as [`pixel_targets`] but not normalised (the target
/// with `norm_pix_loss = false`).
///
/// # Shapes
/// - images: `[b, 3, H, W]` -> `[b, N, patch²·3]`
pub fn raw_pixel_targets<B: Backend>(images: Tensor<B, 4>, patch: usize) -> Tensor<B, 3> {
    let [b, c, h, w] = images.dims();
    let (gh, gw) = (h / patch, w / patch);
    let x = images.detach().reshape([b, c, gh, patch, gw, patch]); // [b, c, gh, p, gw, p]
    x.permute([0, 2, 4, 3, 5, 1]).reshape([b, gh * gw, patch * patch * c]) // [b, N, p²c]
}

/// MAE-style pixel target: patchify (per patch: row, col, channel order), then normalise every
/// patch by its own mean and unbiased variance, `(x - μ)/√(σ² + 1e-6)`.
///
/// # Shapes
/// - images: `[b, 3, H, W]` -> `[b, N, patch²·3]`
pub fn pixel_targets<B: Backend>(images: Tensor<B, 4>, patch: usize) -> Tensor<B, 3> {
    pixel_targets_eps(images, patch, NORM_PIX_EPS)
}

/// [`pixel_targets`] with the variance floor `eps`: `(x - μ)/√(σ² + eps)`. A floor near the
/// images' own variance (≈1 after the ImageNet normalisation) keeps a flat patch's noise from
/// being blown up to unit variance (an unpredictable target).
///
/// # Shapes
/// - images: `[b, 3, H, W]` -> `[b, N, patch²·3]`
pub fn pixel_targets_eps<B: Backend>(images: Tensor<B, 4>, patch: usize, eps: f64) -> Tensor<B, 3> {
    let x = raw_pixel_targets(images, patch); // [b, N, p²c]
    let (var, mean) = x.clone().var_mean(2); // [b, N, 1] each
    (x - mean) / (var + eps).sqrt() // [b, N, p²c]
}

/// Turns host-side boolean masks (`true` = masked, raster order, `batch` rows of `num_patches`)
/// into the sorted index lists `(visible, masked)`, row-major `[batch, n_vis]` and
/// `[batch, num_mask]`. Every row must mask exactly `num_mask` patches (spec §1.1).
pub fn mask_to_indices(
    mask: &[bool],
    batch: usize,
    num_patches: usize,
    num_mask: usize,
) -> Result<(Vec<i64>, Vec<i64>), CaeError> {
    if mask.len() != batch * num_patches {
        return Err(CaeError::Mask {
            sample: 0,
            reason: format!("mask has {} entries, expected {batch} x {num_patches}", mask.len()),
        });
    }
    let mut visible = Vec::with_capacity(batch * (num_patches - num_mask.min(num_patches)));
    let mut masked = Vec::with_capacity(batch * num_mask);
    for (sample, row) in mask.chunks(num_patches).enumerate() {
        let count = row.iter().filter(|&&m| m).count();
        if count != num_mask {
            return Err(CaeError::Mask { sample, reason: format!("{count} patches masked, expected {num_mask}") });
        }
        for (i, &m) in row.iter().enumerate() {
            if m { masked.push(i as i64) } else { visible.push(i as i64) }
        }
    }
    Ok((visible, masked))
}

/// Sorted `(visible [b, n_vis], masked [b, n_mask])` patch indices on the device.
pub type MaskIndices<B> = (Tensor<B, 2, Int>, Tensor<B, 2, Int>);

/// [`mask_to_indices`] straight to device tensors `(visible [b, n_vis], masked [b, n_mask])`.
pub fn mask_index_tensors<B: Backend>(
    mask: &[bool],
    batch: usize,
    num_patches: usize,
    num_mask: usize,
    device: &B::Device,
) -> Result<MaskIndices<B>, CaeError> {
    let (vis, msk) = mask_to_indices(mask, batch, num_patches, num_mask)?;
    let n_vis = num_patches - num_mask;
    Ok((
        Tensor::from_data(TensorData::new(vis, [batch, n_vis]), device),
        Tensor::from_data(TensorData::new(msk, [batch, num_mask]), device),
    ))
}
