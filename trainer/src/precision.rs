//! Training precision and dynamic loss scaling (the run config's `[precision]` table).
//!
//! burn 0.21 has no autocast: the float type is the backend's. `dtype = "bf16"` or `"f16"` runs the
//! whole step — weights, activations, gradients, AdamW moments — in that type on CUDA (`Cuda<bf16>`
//! / `Cuda<f16>`); the CPU backend is f32 only. f16's narrow range needs loss scaling, done as
//! PyTorch's `GradScaler` does (MS0's recipe trains with fp16 + dynamic loss scale, spec §4): the
//! loss is multiplied by `scale` before backward, the gradients divided by it before clipping; a
//! step whose loss or gradients are not finite is skipped (no update; the lr schedule and the step
//! counter advance, as with GradScaler) and the scale halves; after `growth_interval` good steps in
//! a row it doubles. A scale that falls below 1 means the run diverges even unscaled: the run stops
//! with the step number (the last good checkpoint is kept).

use serde::{Deserialize, Serialize};

use crate::CaeError;

/// The float type of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// `f32`, `bf16` or `f16` (the config's spelling).
    pub fn parse(s: &str) -> Result<Self, CaeError> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(CaeError::Config(format!("precision {other:?}: expected f32, bf16 or f16"))),
        }
    }
}

/// When loss scaling is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossScaling {
    /// Dynamic for f16, off for f32 and bf16.
    Auto,
    /// Always dynamic (also f32: the losses are unchanged, the scale being a power of two).
    Dynamic,
    Off,
}

/// `[precision]` of the run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecisionConfig {
    pub dtype: Dtype,
    pub loss_scaling: LossScaling,
    /// First scale (GradScaler: 2^16).
    pub init_scale: f64,
    /// Good steps in a row before the scale doubles (GradScaler: 2000).
    pub growth_interval: u64,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self { dtype: Dtype::F32, loss_scaling: LossScaling::Auto, init_scale: 65536.0, growth_interval: 2000 }
    }
}

impl PrecisionConfig {
    /// Whether the loss is scaled in this run.
    pub fn scaling(&self) -> bool {
        match self.loss_scaling {
            LossScaling::Auto => self.dtype == Dtype::F16,
            LossScaling::Dynamic => true,
            LossScaling::Off => false,
        }
    }

    pub fn validate(&self) -> Result<(), CaeError> {
        if self.scaling() && !(self.init_scale.is_finite() && self.init_scale >= 1.0) {
            return Err(CaeError::Config(format!("precision.init_scale {} must be >= 1", self.init_scale)));
        }
        if self.growth_interval == 0 {
            return Err(CaeError::Config("precision.growth_interval must be >= 1".into()));
        }
        Ok(())
    }
}

/// Dynamic loss scale state (saved in checkpoints for exact resume).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Current scale (1 when scaling is off).
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: u64,
    pub enabled: bool,
    pub growth_interval: u64,
}

/// What the scaler decided about a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDecision {
    /// Apply the update.
    Apply,
    /// Skip the update (overflow); the scale was halved.
    Skip,
    /// Not finite even at a scale below 1 (or scaling is off): the run diverged.
    Diverged,
}

impl LossScaler {
    pub fn new(cfg: &PrecisionConfig) -> Self {
        let enabled = cfg.scaling();
        Self {
            scale: if enabled { cfg.init_scale } else { 1.0 },
            good_steps: 0,
            enabled,
            growth_interval: cfg.growth_interval,
        }
    }

    /// The factor the loss is multiplied by (1 when off).
    pub fn scale(&self) -> f64 {
        if self.enabled { self.scale } else { 1.0 }
    }

    /// Updates the state after a step whose loss and gradients were `finite` (or not).
    pub fn update(&mut self, finite: bool) -> ScaleDecision {
        if !self.enabled {
            return if finite { ScaleDecision::Apply } else { ScaleDecision::Diverged };
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            return ScaleDecision::Apply;
        }
        self.good_steps = 0;
        self.scale *= 0.5;
        if self.scale < 1.0 { ScaleDecision::Diverged } else { ScaleDecision::Skip }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_scales_only_f16() {
        let c = |dtype| PrecisionConfig { dtype, ..PrecisionConfig::default() };
        assert!(!c(Dtype::F32).scaling());
        assert!(!c(Dtype::Bf16).scaling());
        assert!(c(Dtype::F16).scaling());
        let forced = PrecisionConfig { loss_scaling: LossScaling::Dynamic, ..PrecisionConfig::default() };
        assert!(forced.scaling());
        assert_eq!(LossScaler::new(&PrecisionConfig::default()).scale(), 1.0);
    }

    /// GradScaler's rules: halve and skip on overflow, double after `growth_interval` good steps,
    /// the count restarting at every change.
    #[test]
    fn backoff_and_growth_follow_gradscaler() {
        let cfg =
            PrecisionConfig { dtype: Dtype::F16, init_scale: 8.0, growth_interval: 3, ..PrecisionConfig::default() };
        let mut s = LossScaler::new(&cfg);
        assert_eq!(s.scale(), 8.0);
        assert_eq!(s.update(true), ScaleDecision::Apply);
        assert_eq!(s.update(true), ScaleDecision::Apply);
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!((s.scale(), s.good_steps), (4.0, 0));
        for _ in 0..2 {
            assert_eq!(s.update(true), ScaleDecision::Apply);
            assert_eq!(s.scale(), 4.0);
        }
        assert_eq!(s.update(true), ScaleDecision::Apply);
        assert_eq!((s.scale(), s.good_steps), (8.0, 0));
        // 8 -> 4 -> 2 -> 1 are skips; below 1 the run has diverged.
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!(s.update(false), ScaleDecision::Diverged);
        let mut off = LossScaler::new(&PrecisionConfig::default());
        assert_eq!(off.update(false), ScaleDecision::Diverged);
    }
}
