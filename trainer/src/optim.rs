//! AdamW setup of spec §4: learning-rate schedule, weight-decay groups by parameter name,
//! global-norm gradient clipping.
//!
//! burn 0.21's AdamW has one weight decay per optimizer, so [`CaeOptimizer`] runs two AdamW
//! instances over disjoint parameter sets (decay / no decay). burn's AdamW update is
//! `p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε)` with bias-corrected moments, i.e. torch's AdamW.

use std::collections::HashSet;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, backend::AutodiffBackend, backend::Backend};

use serde::{Deserialize, Serialize};

use crate::CaeError;

/// Reference batch of the MS0 recipe; lr scales linearly with it (spec §4).
pub const REFERENCE_BATCH: usize = 2048;

/// Per-iteration warmup + cosine schedule (MS0 `StepFixCosineAnnealing`, spec §4):
///
/// `c(t) = min + ½(base − min)(1 + cos(π(t − W)/(T − W)))`;
/// `lr(t) = c(t)·t/W` for `t < W` (so `lr(0) = 0`), `c(t)` otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    /// Peak lr (1.5e-3 at batch 2048).
    pub base_lr: f64,
    /// Floor of the cosine (1e-5).
    pub min_lr: f64,
    /// W, warmup iterations (10 epochs).
    pub warmup_iters: usize,
    /// T, total iterations (300 epochs).
    pub total_iters: usize,
}

impl LrSchedule {
    /// A checked schedule: `0 ≤ min ≤ base`, `W < T`.
    pub fn new(base_lr: f64, min_lr: f64, warmup_iters: usize, total_iters: usize) -> Result<Self, CaeError> {
        if !(base_lr.is_finite() && min_lr.is_finite() && 0.0 <= min_lr && min_lr <= base_lr) {
            return Err(CaeError::Config(format!("lr schedule: need 0 <= min_lr {min_lr} <= base_lr {base_lr}")));
        }
        if warmup_iters >= total_iters {
            return Err(CaeError::Config(format!(
                "lr schedule: warmup {warmup_iters} must be shorter than total {total_iters}"
            )));
        }
        Ok(Self { base_lr, min_lr, warmup_iters, total_iters })
    }

    /// The MS0 recipe: 300 epochs, 10 warmup, lr 1.5e-3·batch/2048, min 1e-5 (spec §4).
    pub fn ms0(iters_per_epoch: usize, batch: usize) -> Result<Self, CaeError> {
        Self::new(scaled_lr(1.5e-3, batch), 1e-5, 10 * iters_per_epoch, 300 * iters_per_epoch)
    }

    /// Learning rate at iteration `t` (0-based, before the step).
    pub fn lr(&self, t: usize) -> f64 {
        let (w, total) = (self.warmup_iters as f64, self.total_iters as f64);
        let t = t as f64;
        let progress = (t - w) / (total - w);
        let c = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos());
        if t < w { c * t / w } else { c }
    }
}

/// Linear lr scaling rule: `lr·batch/2048` (spec §4).
pub fn scaled_lr(lr_at_2048: f64, batch: usize) -> f64 {
    lr_at_2048 * batch as f64 / REFERENCE_BATCH as f64
}

/// MS0's no-decay rule: a name containing `norm`, `bias` or `gamma` gets weight decay 0 (spec §4).
/// Apply it to [`param_names`] (torch-style names), not to burn's raw field names.
pub fn has_weight_decay(name: &str) -> bool {
    !(name.contains("norm") || name.contains("bias") || name.contains("gamma"))
}

/// Dotted names of every float parameter, in visiting order, with burn's LayerNorm fields
/// renamed to torch's (`gamma` -> `weight`, `beta` -> `bias`) so that the MS0 rule sees what
/// MS0 sees: e.g. `encoder.layers.0.ln1.weight` (decayed), `regressor.layers.0.norm1_q.weight`
/// (not decayed), `encoder.layers.0.gamma_1` (not decayed).
pub fn param_names<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamId, String)> {
    struct Names {
        stack: Vec<(String, String)>,
        out: Vec<(ParamId, String)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Names {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.push((name.to_string(), container_type.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let mut parts: Vec<String> = self.stack.iter().map(|(n, _)| n.clone()).collect();
            if let (Some(last), Some((_, container))) = (parts.last_mut(), self.stack.last())
                && container == "Struct:LayerNorm"
            {
                match last.as_str() {
                    "gamma" => *last = "weight".into(),
                    "beta" => *last = "bias".into(),
                    _ => {}
                }
            }
            self.out.push((param.id, parts.join(".")));
        }
    }
    let mut v = Names { stack: Vec::new(), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Parameter ids that get weight decay 0 under the MS0 rule.
pub fn no_decay_ids<B: Backend, M: Module<B>>(module: &M) -> HashSet<ParamId> {
    param_names(module).into_iter().filter(|(_, n)| !has_weight_decay(n)).map(|(id, _)| id).collect()
}

/// Which parameters get weight decay 0 (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDecayRule {
    /// MS0: names containing `norm`, `bias` or `gamma` ([`has_weight_decay`]).
    Names,
    /// ORIG (`furnace/optim_factory.py`): every 1-D tensor and every `.bias`.
    OneD,
}

/// Parameter ids that get weight decay 0 under the ORIG rule: 1-D tensors and `.bias` names.
pub fn no_decay_ids_1d<B: Backend, M: Module<B>>(module: &M) -> HashSet<ParamId> {
    struct OneD(HashSet<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for OneD {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if D == 1 {
                self.0.insert(param.id);
            }
        }
    }
    let mut v = OneD(HashSet::new());
    module.visit(&mut v);
    v.0.extend(param_names(module).into_iter().filter(|(_, n)| n.ends_with(".bias") || n == "bias").map(|(id, _)| id));
    v.0
}

/// Global L2 norm over every gradient of `module` present in `grads`, and the clipped
/// gradients: all scaled by `max_norm/(‖g‖ + 1e-6)` when that is below 1 (torch
/// `clip_grad_norm_`, spec §4). No host synchronisation: the norm stays on the device.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
    struct SumSq<'a, I: Backend>(&'a GradientsParams, Option<Tensor<I, 1>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSq<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
                let s = g.powi_scalar(2).sum(); // [1]
                self.1 = Some(match self.1.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<I: Backend>(GradientsParams, Tensor<I, 1>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                let factor: Tensor<B::InnerBackend, D> = self.1.clone().reshape([1; D]);
                self.0.register(param.id, g * factor);
            }
        }
    }
    let mut sum = SumSq::<B::InnerBackend>(&grads, None);
    module.visit(&mut sum);
    let Some(sum_sq) = sum.1 else {
        return (grads, Tensor::zeros([1], &Default::default()));
    };
    let norm = sum_sq.sqrt(); // [1]
    let factor = (norm.clone() + 1e-6).recip().mul_scalar(max_norm).clamp_max(1.0); // [1]
    let mut scale = Scale(grads, factor);
    module.visit(&mut scale);
    (scale.0, norm)
}

/// Hyper-parameters of [`CaeOptimizer`] (spec §4 defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// AdamW β1 (0.9).
    pub beta_1: f32,
    /// AdamW β2 (0.999).
    pub beta_2: f32,
    /// AdamW ε (1e-8, torch default; burn's default is 1e-5).
    pub epsilon: f32,
    /// Weight decay of the decayed group (0.05).
    pub weight_decay: f32,
    /// Global-norm clipping threshold (3.0); `None` disables clipping.
    pub clip_grad_norm: Option<f64>,
    /// Which parameters are not decayed.
    pub no_decay: NoDecayRule,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.05,
            clip_grad_norm: Some(3.0),
            no_decay: NoDecayRule::Names,
        }
    }
}

/// The saved state of a [`CaeOptimizer`]: AdamW moments and step counts of both groups, keyed
/// by parameter id (ids are restored with the model record, so the two always match).
pub type CaeOptimizerRecord<B, M> = (
    <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
    <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
);

/// AdamW with the MS0 no-decay groups and global-norm clipping.
pub struct CaeOptimizer<B: AutodiffBackend, M: AutodiffModule<B>> {
    decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay_ids: HashSet<ParamId>,
    clip: Option<f64>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> CaeOptimizer<B, M> {
    /// Groups are fixed from the module's parameter names now (ids are stable across steps).
    pub fn new(config: &OptimConfig, module: &M) -> Self {
        let base =
            AdamWConfig::new().with_beta_1(config.beta_1).with_beta_2(config.beta_2).with_epsilon(config.epsilon);
        Self {
            decay: base.clone().with_weight_decay(config.weight_decay).init(),
            no_decay: base.with_weight_decay(0.0).init(),
            no_decay_ids: match config.no_decay {
                NoDecayRule::Names => no_decay_ids(module),
                NoDecayRule::OneD => no_decay_ids_1d(module),
            },
            clip: config.clip_grad_norm,
        }
    }

    /// The optimizer state (decay group, no-decay group), for checkpoints.
    pub fn to_record(&self) -> CaeOptimizerRecord<B, M> {
        (self.decay.to_record(), self.no_decay.to_record())
    }

    /// Restores a state saved by [`CaeOptimizer::to_record`].
    pub fn load_record(self, record: CaeOptimizerRecord<B, M>) -> Self {
        let (decay, no_decay) = record;
        Self { decay: self.decay.load_record(decay), no_decay: self.no_decay.load_record(no_decay), ..self }
    }

    /// Ids of the parameters that are not decayed.
    pub fn no_decay_ids(&self) -> &HashSet<ParamId> {
        &self.no_decay_ids
    }

    /// Clips, then updates both groups with learning rate `lr`. Returns the module and the
    /// pre-clipping global gradient norm (a device tensor `[1]`, zero if clipping is off).
    pub fn step(&mut self, lr: f64, module: M, grads: GradientsParams) -> (M, Tensor<B::InnerBackend, 1>) {
        let (grads, norm) = match self.clip {
            Some(max) => clip_grad_norm(&module, grads, max),
            None => (grads, Tensor::zeros([1], &Default::default())),
        };
        (self.apply(lr, module, grads), norm)
    }

    /// The training loop's gradient preparation, all on the device (no host synchronisation):
    /// divides the gradients by `loss_scale` (the factor the loss was multiplied by; 1 without
    /// loss scaling), computes the unscaled pre-clipping global norm `[1]` and clips. Non-finite
    /// gradients give a non-finite norm (and non-finite clipped gradients): a caller with loss
    /// scaling reads the norm and skips the update ([`crate::precision::LossScaler`]); without,
    /// the lazily read norm stops the run ([`crate::train`]).
    pub fn unscale_and_clip(
        &self,
        module: &M,
        grads: GradientsParams,
        loss_scale: f64,
    ) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
        let grads = if loss_scale == 1.0 { grads } else { scale_grads(module, grads, 1.0 / loss_scale) };
        clip_grad_norm(module, grads, self.clip.unwrap_or(f64::INFINITY))
    }

    /// Updates both groups with learning rate `lr` (gradients already unscaled and clipped).
    pub fn apply(&mut self, lr: f64, module: M, grads: GradientsParams) -> M {
        let (decay_grads, no_decay_grads) = split_grads::<B, M>(&module, grads, &self.no_decay_ids);
        let module = self.decay.step(lr, module, decay_grads);
        self.no_decay.step(lr, module, no_decay_grads)
    }
}

/// Every gradient of `module` in `grads` multiplied by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    struct Scale(GradientsParams, f64);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                self.0.register(param.id, g.mul_scalar(self.1));
            }
        }
    }
    let mut s = Scale(grads, factor);
    module.visit(&mut s);
    s.0
}

/// Moves the gradients of `ids` out of `grads`: returns (the rest, those of `ids`).
fn split_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    ids: &HashSet<ParamId>,
) -> (GradientsParams, GradientsParams) {
    struct Split<'a>(&'a HashSet<ParamId>, GradientsParams, GradientsParams);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.0.contains(&param.id)
                && let Some(g) = self.1.remove::<B::InnerBackend, D>(param.id)
            {
                self.2.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
    let mut s = Split(ids, grads, GradientsParams::new());
    module.visit(&mut s);
    (s.1, s.2)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, Param};
    use burn::nn::LayerNorm;
    use burn::optim::GradientsParams;
    use burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::model::init::layer_norm;
    use crate::model::{Cae, CaeConfig};

    type AB = Autodiff<Flex>;

    fn scalar<Bk: Backend>(t: Tensor<Bk, 1>) -> f64 {
        t.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
    }

    #[test]
    fn lr_schedule_matches_spec_formulas_at_key_iterations() {
        // MS0: I = 626 -> W = 6260, T = 187800 (spec §4).
        let s = LrSchedule::ms0(626, 2048).unwrap();
        assert_eq!((s.warmup_iters, s.total_iters), (6260, 187_800));
        let (base, min, w, total) = (1.5e-3f64, 1e-5f64, 6260f64, 187_800f64);
        // Independent form of the cosine: ½(1 + cos x) = cos²(x/2).
        let c = |t: f64| min + (base - min) * (std::f64::consts::PI * (t - w) / (2.0 * (total - w))).cos().powi(2);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 + 1e-12 * b.abs();
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(1), c(1.0) / w), "{} vs {}", s.lr(1), c(1.0) / w);
        assert!(close(s.lr(6259), c(6259.0) * 6259.0 / w));
        assert!(close(s.lr(6260), base), "lr(W) must be the peak: {}", s.lr(6260));
        assert!(close(s.lr(187_799), c(187_799.0)));
        assert!(s.lr(187_799) > min && s.lr(187_799) < min + 1e-12);
        // Warmup is increasing, cosine decreasing.
        assert!(s.lr(100) < s.lr(200) && s.lr(10_000) > s.lr(100_000));
        assert!(close(LrSchedule::ms0(626, 256).unwrap().base_lr, 1.5e-3 / 8.0));
        assert!(LrSchedule::new(1e-3, 1e-5, 10, 10).is_err());
        assert!(LrSchedule::new(1e-3, 1e-2, 1, 10).is_err());
    }

    #[test]
    fn weight_decay_groups_follow_ms0_names() {
        let dev = Default::default();
        let model = Cae::<Flex>::new(&CaeConfig::micro(), &dev).unwrap();
        let names: Vec<String> = param_names(&model).into_iter().map(|(_, n)| n).collect();
        let decays = |n: &str| {
            assert!(names.iter().any(|x| x == n), "missing parameter name {n}; have {names:?}");
            has_weight_decay(n)
        };
        // spec §4: decayed.
        for n in [
            "encoder.patch_embed.projection.weight",
            "encoder.cls_token",
            "encoder.layers.0.attn.qkv.weight",
            "encoder.layers.1.ffn.fc2.weight",
            "encoder.layers.0.ln1.weight",
            "encoder.layers.0.ln2.weight",
            "encoder.ln1.weight",
            "regressor.mask_token",
            "regressor.layers.0.cross_attn.k.weight",
            "decoder.layers.0.ln1.weight",
            "decoder.head.weight",
        ] {
            assert!(decays(n), "{n} should be decayed");
        }
        // spec §4: not decayed.
        for n in [
            "encoder.patch_embed.projection.bias",
            "encoder.layers.0.attn.q_bias",
            "encoder.layers.0.attn.v_bias",
            "encoder.layers.0.gamma_1",
            "encoder.layers.0.gamma_2",
            "encoder.layers.0.ln1.bias",
            "regressor.layers.0.norm1_q.weight",
            "regressor.layers.0.norm1_k.weight",
            "regressor.layers.0.norm1_v.weight",
            "regressor.layers.0.norm2.weight",
            "regressor.norm_regressor.weight",
            "decoder.norm_decoder.weight",
            "decoder.head.bias",
        ] {
            assert!(!decays(n), "{n} should not be decayed");
        }
        assert_eq!(no_decay_ids(&model).len(), names.iter().filter(|n| !has_weight_decay(n)).count());
    }

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        weight: Param<Tensor<B, 1>>,
        bias: Param<Tensor<B, 1>>,
        norm: LayerNorm<B>,
    }

    fn toy(w: [f32; 2], b: [f32; 2]) -> Toy<AB> {
        let dev = Default::default();
        Toy {
            weight: Param::from_tensor(Tensor::from_data(TensorData::from(w), &dev)),
            bias: Param::from_tensor(Tensor::from_data(TensorData::from(b), &dev)),
            norm: layer_norm(2, 1e-6, &dev),
        }
    }

    /// Gradients g_w and g_b through loss = Σ g_w·w + Σ g_b·b (+ 0·norm).
    fn grads(m: &Toy<AB>, gw: [f32; 2], gb: [f32; 2]) -> GradientsParams {
        let dev = Default::default();
        let loss = (m.weight.val() * Tensor::<AB, 1>::from_data(TensorData::from(gw), &dev)).sum()
            + (m.bias.val() * Tensor::<AB, 1>::from_data(TensorData::from(gb), &dev)).sum()
            + m.norm.gamma.val().sum() * 0.0;
        GradientsParams::from_grads(loss.backward(), m)
    }

    #[test]
    fn clip_grad_norm_scales_to_max_norm_globally() {
        let m = toy([1.0, 2.0], [3.0, 4.0]);
        // ‖(3, 4, 12, 0)‖ = 13 -> scaled by 3/13 (the 1e-6 only shifts the 7th digit).
        let (clipped, norm) = clip_grad_norm(&m, grads(&m, [3.0, 4.0], [12.0, 0.0]), 3.0);
        assert!((scalar(norm) - 13.0).abs() < 1e-5);
        let gw: Tensor<Flex, 1> = clipped.get(m.weight.id).unwrap();
        let gb: Tensor<Flex, 1> = clipped.get(m.bias.id).unwrap();
        let gw = gw.into_data().to_vec::<f32>().unwrap();
        let gb = gb.into_data().to_vec::<f32>().unwrap();
        let f = 3.0 / (13.0 + 1e-6);
        for (got, want) in gw.iter().chain(&gb).zip([3.0 * f, 4.0 * f, 12.0 * f, 0.0]) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Below the threshold nothing changes.
        let (kept, norm) = clip_grad_norm(&m, grads(&m, [0.3, 0.4], [0.0, 1.2]), 3.0);
        assert!((scalar(norm) - 1.3).abs() < 1e-6);
        let gb: Tensor<Flex, 1> = kept.get(m.bias.id).unwrap();
        assert!((gb.into_data().to_vec::<f32>().unwrap()[1] - 1.2).abs() < 1e-7);
    }

    #[test]
    fn adamw_step_decays_only_the_decay_group() {
        let m = toy([1.0, -2.0], [3.0, 4.0]);
        let config = OptimConfig { clip_grad_norm: None, ..OptimConfig::default() };
        let mut opt = CaeOptimizer::new(&config, &m);
        assert!(opt.no_decay_ids().contains(&m.bias.id));
        assert!(opt.no_decay_ids().contains(&m.norm.gamma.id), "LN weight named `norm.weight` is not decayed");
        assert!(!opt.no_decay_ids().contains(&m.weight.id));
        let g = grads(&m, [0.5, 0.0], [0.0, -0.25]);
        let (m, _) = opt.step(0.1, m, g);
        // First Adam step: update = g/(|g| + ε) ≈ sign(g); decoupled decay p·(1 − lr·wd) first.
        let w = m.weight.val().into_data().to_vec::<f32>().unwrap();
        let b = m.bias.val().into_data().to_vec::<f32>().unwrap();
        let keep = 1.0 - 0.1 * 0.05;
        let want_w = [1.0 * keep - 0.1, -2.0 * keep];
        let want_b = [3.0, 4.0 + 0.1];
        for (got, want) in w.iter().zip(want_w).chain(b.iter().zip(want_b)) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn cae_optimizer_with_schedule_and_clipping_trains_micro() {
        use crate::model::{CaeTargets, mask_index_tensors};
        use burn::tensor::{Distribution, Int};
        let dev = Default::default();
        let mut model = crate::model::init::with_seed(77, || Cae::<AB>::new(&CaeConfig::micro(), &dev)).unwrap();
        let mut mask = vec![false; 32];
        for i in [0, 3, 5, 8, 13, 14, 17, 18, 22, 25, 26, 31] {
            mask[i] = true;
        }
        let (vis, msk) = mask_index_tensors::<AB>(&mask, 2, 16, 6, &dev).unwrap();
        let img = Tensor::<AB, 4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &dev);
        let tokens: Vec<i64> = (0..32).map(|i| i * 29 % 512).collect();
        let targets = CaeTargets::Tokens(Tensor::<AB, 2, Int>::from_data(TensorData::new(tokens, [2, 16]), &dev));
        let schedule = LrSchedule::new(3e-3, 1e-5, 10, 150).unwrap();
        let mut opt = CaeOptimizer::new(&OptimConfig::default(), &model);
        let mut encoder_before_last_step = None;
        let (mut first, mut last, mut max_norm) = (0.0f64, 0.0f64, 0.0f64);
        for t in 0..150 {
            let out = model.forward(img.clone(), vis.clone(), msk.clone(), &targets).unwrap();
            let loss = scalar(out.loss.clone());
            if t == 0 {
                first = loss;
                // lr(0) = 0: the first step must leave the student unchanged.
                let enc_before = model.encoder.patch_embed.projection.weight.val().into_data();
                let grads = GradientsParams::from_grads(out.loss.backward(), &model);
                model = model.update_teacher();
                let (m, norm) = opt.step(schedule.lr(t), model, grads);
                model = m;
                max_norm = max_norm.max(scalar(norm));
                assert_eq!(model.encoder.patch_embed.projection.weight.val().into_data(), enc_before);
                continue;
            }
            last = loss;
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            model = model.update_teacher();
            encoder_before_last_step = Some(model.encoder.cls_token.val().into_data());
            let (m, norm) = opt.step(schedule.lr(t), model, grads);
            model = m;
            max_norm = max_norm.max(scalar(norm));
        }
        assert!(max_norm > 0.0);
        assert!(last < 0.2 * first, "loss {first} -> {last}");
        // The optimizer groups never touch the teacher: it still holds the encoder as it was
        // right before the last step (the one-step lag of spec §2.2).
        assert_eq!(Some(model.teacher.cls_token.val().into_data()), encoder_before_last_step);
        assert_ne!(model.teacher.cls_token.val().into_data(), model.encoder.cls_token.val().into_data());
    }
    /// Mixed precision keeps AdamW in f32: one update inside `autocast(Bf16)` (gradients from a
    /// bf16 forward) equals the f32 AdamW formula on those same gradients, computed here in f64,
    /// including the parts bf16 state would lose: at lr 1e-4 the decay factor `1 − lr·wd` and
    /// the step `lr·m̂/(√v̂ + ε)` are below half a bf16 ulp of these weights.
    #[test]
    fn adamw_update_in_bf16_mode_is_the_f32_update() {
        use crate::precision::Dtype;
        use burn::tensor::DType;
        let dev = Default::default();
        let l = burn::nn::LinearConfig::new(4, 3).init::<AB>(&dev);
        let w0: Vec<f32> = (0..12).map(|i| 0.5 + 0.01 * i as f32).collect();
        let l = burn::nn::Linear {
            weight: Param::from_tensor(Tensor::<AB, 2>::from_data(TensorData::new(w0.clone(), [4, 3]), &dev)),
            bias: l.bias,
        };
        let x = Tensor::<AB, 2>::from_data(TensorData::new((0..8).map(|i| i as f32 - 3.5).collect(), [2, 4]), &dev);
        let lr = 1e-4;
        let (l1, g) = crate::amp::autocast(Dtype::Bf16, || {
            let y = crate::amp::linear_rows(&x, &l.weight.val(), None).expect("autocast is on"); // [2, 3]
            let grads = GradientsParams::from_grads((y.clone() * y).sum().backward(), &l);
            let g: Vec<f32> = grads.get::<Flex, 2>(l.weight.id).expect("weight grad").into_data().to_vec().unwrap();
            let mut opt = CaeOptimizer::new(&OptimConfig { clip_grad_norm: None, ..OptimConfig::default() }, &l);
            (opt.apply(lr, l, grads), g)
        });
        assert_eq!(l1.weight.val().dtype(), DType::F32, "master weights stay f32");
        let w1: Vec<f32> = l1.weight.val().into_data().to_vec().unwrap();
        let (wd, eps) = (0.05f64, 1e-8f64);
        for i in 0..12 {
            let (w, gi) = (w0[i] as f64, g[i] as f64);
            // First AdamW step: m̂ = g, v̂ = g² (bias corrections cancel the betas).
            let want = w * (1.0 - lr * wd) - lr * gi / (gi.abs() + eps);
            assert!((w1[i] as f64 - want).abs() <= 1e-6 * want.abs(), "w[{i}]: {} vs {want}", w1[i]);
            // What bf16 weights would have kept: nothing.
            let bf = |v: f64| burn::tensor::bf16::from_f64(v).to_f64();
            assert_eq!(bf(want), bf(w), "the update is below bf16's resolution at w[{i}]");
            assert_ne!(w1[i], w0[i], "but f32 master weights keep it");
        }
    }
}
