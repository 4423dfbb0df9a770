//! The run config: one TOML file that says what a run *is* (preset, model, data and masking,
//! tokenizer, optimizer, schedule, checkpoint policy). CLI flags say where and how it runs.
//!
//! Resolution: the named `preset` gives a complete config ([`RunConfig::preset`]); the file's
//! tables are merged over it key by key, then every `--set a.b.c=value`; the result is parsed
//! with `deny_unknown_fields`, so a misspelt key fails at start-up. The resolved config is what
//! a run saves (`config.toml` in the run dir, and inside every checkpoint). Presets set the
//! model; the view sizes, the mask grid and count and the vocabulary follow from it
//! ([`derived`]), so `--set model.img_size=96` is a whole change.
//!
//! ```toml
//! preset = "micro"
//! [data]
//! batch_size = 16
//! [optimizer]
//! lr = 1.5e-3          # peak lr at `lr_batch` images per optimizer step (spec §4)
//! [schedule]
//! total_steps = 500    # overrides epochs
//! ```

mod derived;

use std::path::PathBuf;

use cae_pipeline::LoaderConfig;
use cae_pipeline::augment::AugmentConfig;
use cae_pipeline::mask::MaskConfig;
use serde::{Deserialize, Serialize};

use crate::CaeError;
use crate::model::{CaeConfig, TargetKind};
use crate::optim::{LrSchedule, NoDecayRule, OptimConfig, REFERENCE_BATCH};
use crate::precision::PrecisionConfig;

/// Named model presets (spec §2, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// ViT-B/16, the MS0 recipe.
    Base,
    /// ViT-S/16 (12 heads of 32).
    Small,
    /// CAE-Ti: D 192, 224 px, full DALL-E (spec §7 A).
    Tiny,
    /// 64 px, 4x4 patches, D 64 (spec §7 B): CPU smoke runs and tests.
    Micro,
}

impl Preset {
    /// Parses `base|small|tiny|micro`.
    pub fn parse(s: &str) -> Result<Self, CaeError> {
        match s {
            "base" => Ok(Self::Base),
            "small" => Ok(Self::Small),
            "tiny" => Ok(Self::Tiny),
            "micro" => Ok(Self::Micro),
            _ => Err(CaeError::Config(format!("unknown preset {s:?} (base, small, tiny, micro)"))),
        }
    }

    /// The preset whose encoder has this width and depth (to read foreign checkpoints).
    pub fn from_encoder_shape(embed_dim: usize, depth: usize) -> Result<Self, CaeError> {
        [Self::Base, Self::Small, Self::Tiny, Self::Micro]
            .into_iter()
            .find(|p| {
                let m = p.model();
                (m.embed_dim, m.depth) == (embed_dim, depth)
            })
            .ok_or_else(|| CaeError::Config(format!("no preset has an encoder of width {embed_dim} and depth {depth}")))
    }

    fn model(self) -> CaeConfig {
        match self {
            Self::Base => CaeConfig::base(),
            Self::Small => CaeConfig::small(),
            Self::Tiny => CaeConfig::tiny(),
            Self::Micro => CaeConfig::micro(),
        }
    }
}

/// Where the DALL-E tokenizer weights come from (spec §3). Only read for `model.target = "dalle"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// `cae_ckpt/dalle_encoder.pth` (torch.save) or a safetensors conversion of it; loaded at
    /// start-up (and again on resume: checkpoints do not copy these frozen weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Use DALL-E's random init (frozen, seeded by `seed`) instead of real weights: only
    /// meaningful for tests and the `micro` preset (spec §7 B). Saved with every checkpoint.
    pub random_init: bool,
}

/// Optimizer (spec §4: AdamW, no-decay rule, global-norm clipping, accumulation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    /// Peak learning rate at a total batch of `lr_batch` images per optimizer step; scaled
    /// linearly to the real total batch (`data.batch_size x accumulation_steps`).
    pub lr: f64,
    /// Reference total batch of `lr` (2048 in the MS0 recipe).
    pub lr_batch: usize,
    /// Floor of the cosine (1e-5).
    pub min_lr: f64,
    /// AdamW β1, β2, ε.
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// Decoupled weight decay of the decayed group (0.05).
    pub weight_decay: f32,
    /// `names` (MS0: names containing norm/bias/gamma) or `one_d` (ORIG: every 1-D tensor and
    /// every bias).
    pub no_decay: NoDecayRule,
    /// Global L2-norm clipping threshold (3.0); 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Micro-batches per optimizer step (gradient accumulation to reach a total batch).
    pub accumulation_steps: usize,
}

/// Learning-rate schedule length (spec §4: per-iteration warmup + cosine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Epochs of the run (an epoch = the shard manifest's sample count / total batch).
    pub epochs: u64,
    /// Warmup epochs.
    pub warmup_epochs: f64,
    /// Optimizer steps of the whole run; overrides `epochs` (needed when the shards have no
    /// manifest). `trainer run --steps N` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Warmup steps; default: the same fraction of the run as `warmup_epochs / epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
}

/// Checkpoint policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Write a checkpoint every this many optimizer steps (0: only at the end and on signals).
    pub every: u64,
    /// Checkpoints kept in the run dir (older ones are deleted after a successful write).
    pub keep_last: usize,
}

/// A complete, resolved run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The preset the defaults came from (informative once resolved).
    pub preset: Preset,
    /// Seed of the model init and of a random tokenizer (the data seed is `data.seed`).
    pub seed: u64,
    /// Print a loss line every this many steps (the progress bar updates every step).
    pub log_every: u64,
    /// The network (spec §2).
    pub model: CaeConfig,
    /// Data, augmentation and masking (the pipeline's `LoaderConfig`, spec §1).
    pub data: LoaderConfig,
    pub tokenizer: TokenizerSection,
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleSection,
    pub checkpoint: CheckpointSection,
    /// Float type and loss scaling (`[precision]`; default f32, no scaling).
    #[serde(default)]
    pub precision: PrecisionConfig,
}

impl RunConfig {
    /// The complete defaults of a preset.
    pub fn preset(preset: Preset) -> Self {
        let model = preset.model();
        let micro = preset == Preset::Micro;
        // The view sizes, mask grid and count are derived from the model (`derived`); the data
        // side sets only what is its own. spec §7 B: blocks must be < 4 on a 4x4 grid, so the
        // micro minimum block is 2.
        let mask = MaskConfig { min_num_patches: if micro { 2 } else { 16 }, ..MaskConfig::default() };
        let data = LoaderConfig {
            batch_size: match preset {
                Preset::Base | Preset::Small => 256,
                Preset::Tiny => 64,
                Preset::Micro => 32,
            },
            shuffle_buffer: if micro { 256 } else { 1000 },
            augment: AugmentConfig::default(),
            mask,
            ..LoaderConfig::default()
        };
        let optimizer = OptimizerSection {
            lr: 1.5e-3,
            lr_batch: if micro { 32 } else { REFERENCE_BATCH },
            min_lr: 1e-5,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.05,
            no_decay: NoDecayRule::Names,
            clip_grad_norm: 3.0,
            accumulation_steps: match preset {
                Preset::Base | Preset::Small => 8,
                _ => 1,
            },
        };
        let schedule = if micro {
            ScheduleSection { epochs: 40, warmup_epochs: 2.0, total_steps: None, warmup_steps: None }
        } else {
            ScheduleSection { epochs: 300, warmup_epochs: 10.0, total_steps: None, warmup_steps: None }
        };
        let mut config = Self {
            preset,
            seed: 0,
            log_every: if micro { 20 } else { 100 },
            model,
            data,
            tokenizer: TokenizerSection { weights: None, random_init: micro },
            optimizer,
            schedule,
            checkpoint: CheckpointSection { every: if micro { 100 } else { 1000 }, keep_last: 3 },
            precision: PrecisionConfig::default(),
        };
        // A preset's own model: nothing of it was set by a user.
        let derived = derived::derive(&mut config, &toml::Table::new());
        debug_assert!(derived.is_ok(), "a preset derives its data sizes: {derived:?}");
        config
    }

    /// Resolves a config: preset defaults, then the TOML `file` (if any), then `sets`
    /// (`a.b.c=value`, the value parsed as TOML, or taken as a string when it is not TOML).
    /// The preset is `--set preset=...`, else the file's `preset`, else `micro`.
    pub fn resolve(file: Option<&str>, sets: &[String]) -> Result<Self, CaeError> {
        let file_table: toml::Table = match file {
            Some(text) => toml::from_str(text).map_err(|e| CaeError::Config(format!("run config: {e}")))?,
            None => toml::Table::new(),
        };
        let mut set_table = toml::Table::new();
        for s in sets {
            let (key, value) =
                s.split_once('=').ok_or_else(|| CaeError::Config(format!("--set {s:?}: expected key=value")))?;
            let value = parse_value(value.trim());
            insert_path(&mut set_table, key.trim(), value)?;
        }
        let preset_name = [&set_table, &file_table]
            .iter()
            .find_map(|t| t.get("preset"))
            .map(|v| v.as_str().ok_or_else(|| CaeError::Config("preset must be a string".into())))
            .transpose()?
            .unwrap_or("micro")
            .to_string();
        let preset = Preset::parse(&preset_name)?;
        let mut merged = toml::Table::try_from(Self::preset(preset))
            .map_err(|e| CaeError::Config(format!("serialising preset: {e}")))?;
        let mut user = file_table;
        merge(&mut user, set_table);
        merge(&mut merged, user.clone());
        let mut config: Self = toml::Value::Table(merged).try_into().map_err(|e| CaeError::Config(format!("{e}")))?;
        derived::derive(&mut config, &user)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a saved, complete config (`config.toml` of a run, or a checkpoint's; older ones
    /// with the derived keys written out load too).
    pub fn from_resolved_toml(text: &str) -> Result<Self, CaeError> {
        let saved: toml::Table = toml::from_str(text).map_err(|e| CaeError::Config(format!("saved config: {e}")))?;
        let mut config: Self =
            toml::Value::Table(saved.clone()).try_into().map_err(|e| CaeError::Config(format!("saved config: {e}")))?;
        derived::derive(&mut config, &saved)?;
        config.validate()?;
        Ok(config)
    }

    /// Re-derives the data sizes after code changed the model section (the built-in run's
    /// switch to the DALL-E target), then validates.
    pub fn rederive(&mut self) -> Result<(), CaeError> {
        let set =
            toml::Table::try_from(&self.model).map_err(|e| CaeError::Config(format!("serialising config: {e}")))?;
        let mut user = toml::Table::new();
        user.insert("model".into(), toml::Value::Table(set));
        if let Some(m) = user.get_mut("model").and_then(toml::Value::as_table_mut) {
            m.remove("vocab_size");
        }
        derived::derive(self, &user)?;
        self.validate()
    }

    /// The resolved config as TOML, without the derived keys. (A value TOML's integers cannot
    /// hold — `log_every = u64::MAX` in `trainer bench` — keeps them: they agree anyway.)
    pub fn to_toml(&self) -> Result<String, CaeError> {
        let text = match toml::Table::try_from(self) {
            Ok(mut table) => {
                derived::strip(&mut table);
                toml::to_string_pretty(&table)
            }
            Err(_) => toml::to_string_pretty(self),
        };
        text.map_err(|e| CaeError::Config(format!("serialising config: {e}")))
    }

    /// Cross-checks the sections (model vs data vs masking vs tokenizer).
    pub fn validate(&self) -> Result<(), CaeError> {
        let fail = |m: String| Err(CaeError::Config(m));
        // Size-like values are bounded here, so an absurd value is a config error, not an
        // allocation failure later (`data.shuffle_buffer = 2^40` used to abort the process).
        let bounds: [(&str, u64, u64); 10] = [
            ("data.batch_size", self.data.batch_size as u64, 65_536),
            ("data.workers", self.data.workers as u64, 4_096),
            ("data.prefetch", self.data.prefetch as u64, 4_096),
            ("data.shuffle_buffer", self.data.shuffle_buffer as u64, 1_000_000),
            ("optimizer.accumulation_steps", self.optimizer.accumulation_steps as u64, 65_536),
            ("checkpoint.keep_last", self.checkpoint.keep_last as u64, 100_000),
            ("model.embed_dim", self.model.embed_dim as u64, 16_384),
            ("model.depth", self.model.depth as u64, 1_024),
            ("model.mlp_dim", self.model.mlp_dim as u64, 65_536),
            ("model.img_size", self.model.img_size as u64, 4_096),
        ];
        for (key, value, max) in bounds {
            if value > max {
                return fail(format!("{key} = {value} is above its bound {max}"));
            }
        }
        self.data.http.validate().map_err(CaeError::Config)?;
        self.model.validate()?;
        let (m, d) = (&self.model, &self.data);
        if d.augment.view_size != m.img_size {
            return fail(format!(
                "data.augment.view_size {} must equal model.img_size {}",
                d.augment.view_size, m.img_size
            ));
        }
        if d.mask.grid != m.grid_size() {
            return fail(format!("data.mask.grid {} must equal the patch grid {}", d.mask.grid, m.grid_size()));
        }
        if d.mask.num_masked != m.num_mask {
            return fail(format!(
                "data.mask.num_masked {} must equal model.num_mask {}",
                d.mask.num_masked, m.num_mask
            ));
        }
        d.mask.validate().map_err(|e| CaeError::Config(e.to_string()))?;
        if m.target == TargetKind::Dalle {
            if d.augment.token_size != m.target_view_size() {
                return fail(format!(
                    "data.augment.token_size {} must be model.img_size / 2 = {} for the dalle target",
                    d.augment.token_size,
                    m.target_view_size()
                ));
            }
            if self.tokenizer.weights.is_none() && !self.tokenizer.random_init {
                return fail(
                    "model.target = \"dalle\" needs tokenizer.weights (cae_ckpt/dalle_encoder.pth) or \
                     tokenizer.random_init = true (tests); or use model.target = \"pixels\""
                        .into(),
                );
            }
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) || o.lr_batch == 0 {
            return fail(format!("optimizer.lr {} and lr_batch {} must be > 0", o.lr, o.lr_batch));
        }
        if o.accumulation_steps == 0 {
            return fail("optimizer.accumulation_steps must be >= 1".into());
        }
        if o.clip_grad_norm.is_nan() || o.clip_grad_norm < 0.0 {
            return fail(format!("optimizer.clip_grad_norm {} must be >= 0", o.clip_grad_norm));
        }
        self.precision.validate()?;
        if self.checkpoint.keep_last == 0 {
            return fail("checkpoint.keep_last must be >= 1".into());
        }
        if self.schedule.total_steps == Some(0) || (self.schedule.total_steps.is_none() && self.schedule.epochs == 0) {
            return fail("the schedule must have at least one step".into());
        }
        Ok(())
    }

    /// Images per optimizer step: `data.batch_size x accumulation_steps` (the recipe's total
    /// batch, whatever the number of processes: [`Self::local_accumulation`]).
    pub fn total_batch(&self) -> usize {
        self.data.batch_size * self.optimizer.accumulation_steps
    }

    /// Micro-batches per optimizer step on each of `world` data-parallel ranks, each of
    /// `data.batch_size` images, so that the step's total stays [`Self::total_batch`]:
    /// `accumulation_steps / world` (spec §4: the base recipe's 2048 holds on 1 GPU or 8). An
    /// error when that is not a whole number.
    pub fn local_accumulation(&self, world: usize) -> Result<usize, CaeError> {
        let (accum, world) = (self.optimizer.accumulation_steps, world.max(1));
        if accum % world != 0 {
            return Err(CaeError::Config(format!(
                "the total batch {} (data.batch_size {} x optimizer.accumulation_steps {accum}) does not split over                  {world} processes of {} images: {} / ({world} x {}) is not a whole number; set                  optimizer.accumulation_steps to a multiple of {world}, or change data.batch_size (per process)",
                self.total_batch(),
                self.data.batch_size,
                self.data.batch_size,
                self.total_batch(),
                self.data.batch_size
            )));
        }
        Ok(accum / world)
    }

    /// Peak lr after the linear scaling rule (spec §4).
    pub fn peak_lr(&self) -> f64 {
        self.optimizer.lr * self.total_batch() as f64 / self.optimizer.lr_batch as f64
    }

    /// The AdamW settings for [`crate::optim::CaeOptimizer`].
    pub fn optim_config(&self) -> OptimConfig {
        let o = &self.optimizer;
        OptimConfig {
            beta_1: o.beta_1,
            beta_2: o.beta_2,
            epsilon: o.epsilon,
            weight_decay: o.weight_decay,
            clip_grad_norm: (o.clip_grad_norm > 0.0).then_some(o.clip_grad_norm),
            no_decay: o.no_decay,
        }
    }

    /// The lr schedule, given the optimizer steps per epoch (from the shard manifest, if known).
    /// Warmup is at least one step, so `lr(0) = 0` always holds.
    pub fn lr_schedule(&self, steps_per_epoch: Option<u64>) -> Result<LrSchedule, CaeError> {
        let s = &self.schedule;
        let total = match (s.total_steps, steps_per_epoch) {
            (Some(t), _) => t,
            (None, Some(per)) if per > 0 => s.epochs * per,
            _ => {
                return Err(CaeError::Config(
                    "the epoch length is unknown (shards without manifest.json, or fewer samples than one \
                     total batch): set schedule.total_steps or pass --steps"
                        .into(),
                ));
            }
        };
        let warmup = match (s.warmup_steps, s.total_steps, steps_per_epoch) {
            (Some(w), _, _) => w,
            (None, None, Some(per)) => (s.warmup_epochs * per as f64).round() as u64,
            _ => (total as f64 * s.warmup_epochs / s.epochs.max(1) as f64).round() as u64,
        };
        let warmup = warmup.clamp(1.min(total.saturating_sub(1)), total.saturating_sub(1));
        if total < 2 {
            // A one-step run: lr(0) = 0 by the rule, nothing else to schedule.
            return LrSchedule::new(self.peak_lr(), self.optimizer.min_lr.min(self.peak_lr()), 0, 1);
        }
        LrSchedule::new(self.peak_lr(), self.optimizer.min_lr.min(self.peak_lr()), warmup as usize, total as usize)
    }
}

/// A `--set` value: TOML if it parses as one (`8`, `1e-3`, `true`, `"x"`, `[1, 2]`), else a string.
fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Inserts `value` at the dotted `path`, creating tables on the way.
fn insert_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), CaeError> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last =
        parts.pop().filter(|p| !p.is_empty()).ok_or_else(|| CaeError::Config(format!("--set: empty key {path:?}")))?;
    let mut t = table;
    for p in parts {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| CaeError::Config(format!("--set {path}: {p} is not a table")))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_validate() {
        for p in ["base", "small", "tiny", "micro"] {
            let c = RunConfig::resolve(None, &[format!("preset={p}"), "model.target=\"pixels\"".into()]).unwrap();
            assert_eq!(c.data.augment.view_size, c.model.img_size);
            assert_eq!(c.data.mask.num_masked, c.model.num_mask);
        }
        let micro = RunConfig::resolve(None, &[]).unwrap();
        assert_eq!(micro.preset, Preset::Micro);
        assert_eq!((micro.data.augment.view_size, micro.data.augment.token_size), (64, 32));
        assert_eq!((micro.data.mask.grid, micro.data.mask.num_masked, micro.data.mask.min_num_patches), (4, 6, 2));
    }

    #[test]
    fn file_then_sets_override_the_preset_key_by_key() {
        let file = "preset = \"micro\"\n[data]\nbatch_size = 8\n[optimizer]\nlr = 1e-3\n";
        let c =
            RunConfig::resolve(Some(file), &["data.augment.flip_prob=0.0".into(), "optimizer.lr=2e-3".into()]).unwrap();
        assert_eq!(c.data.batch_size, 8);
        assert_eq!(c.data.augment.flip_prob, 0.0);
        assert_eq!(c.data.augment.view_size, 64, "untouched keys keep the preset's value");
        assert_eq!(c.optimizer.lr, 2e-3, "--set wins over the file");
        // Round trip through the saved form.
        let again = RunConfig::from_resolved_toml(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_and_inconsistent_sections_fail_at_start() {
        let e = RunConfig::resolve(Some("[optimizer]\nlearning_rate = 1.0\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("learning_rate"), "{e}");
        let e = RunConfig::resolve(None, &["data.mask.num_masked=5".into()]).unwrap_err();
        assert!(e.to_string().contains("num_masked"), "{e}");
        let e = RunConfig::resolve(None, &["preset=tiny".into()]).unwrap_err();
        assert!(e.to_string().contains("dalle"), "{e}");
        assert!(RunConfig::resolve(None, &["nokey".into()]).is_err());
        // HTTP values that would never time out or overflow a wait are refused, naming the key.
        for (set, key) in [
            ("data.http.read_timeout_s=0", "read_timeout_s"),
            ("data.http.low_speed_time_s=0.0", "low_speed_time_s"),
            ("data.http.backoff_max_s=-1.0", "backoff_max_s"),
            ("data.http.retry_after_max_s=nan", "retry_after_max_s"),
        ] {
            let e = RunConfig::resolve(None, &[set.into()]).unwrap_err();
            assert!(e.to_string().contains(key), "{set}: {e}");
        }
        let c = RunConfig::resolve(None, &["data.http.low_speed_time_s=0.5".into(), "data.http.retries=2".into()]);
        let h = c.unwrap().data.http;
        assert_eq!((h.low_speed_time_s, h.retries, h.low_speed_bytes_per_s), (0.5, 2, 1024));
    }

    #[test]
    fn the_base_total_batch_holds_on_one_process_or_eight() {
        let c = RunConfig::resolve(None, &["preset=base".into(), "model.target=\"pixels\"".into()]).unwrap();
        // 256 per process: 8 micro-batches on 1, 1 on 8, 4 on 2; 2048 images per step each time.
        for (world, local) in [(1, 8), (2, 4), (8, 1)] {
            assert_eq!(c.local_accumulation(world).unwrap(), local);
            assert_eq!(local * world * c.data.batch_size, 2048);
        }
        let e = c.local_accumulation(3).unwrap_err().to_string();
        assert!(e.contains("2048") && e.contains("multiple of 3"), "{e}");
        assert!(c.local_accumulation(16).is_err(), "16 x 256 > 2048");
    }

    #[test]
    fn lr_is_scaled_linearly_and_schedule_follows_epochs_or_steps() {
        let c = RunConfig::resolve(None, &["preset=base".into(), "model.target=\"pixels\"".into()]).unwrap();
        assert_eq!(c.total_batch(), 2048);
        assert_eq!(c.peak_lr(), 1.5e-3);
        let s = c.lr_schedule(Some(626)).unwrap();
        assert_eq!((s.warmup_iters, s.total_iters), (6260, 187_800));
        assert_eq!(s.lr(0), 0.0);
        let half = RunConfig::resolve(
            None,
            &["preset=base".into(), "model.target=\"pixels\"".into(), "data.batch_size=128".into()],
        )
        .unwrap();
        assert!((half.peak_lr() - 1.5e-3 / 2.0).abs() < 1e-18);
        let steps = RunConfig::resolve(None, &["schedule.total_steps=100".into()]).unwrap();
        let s = steps.lr_schedule(None).unwrap();
        // micro: 2 warmup epochs of 40 -> 5 % of the run.
        assert_eq!((s.warmup_iters, s.total_iters), (5, 100));
        let tiny_run = RunConfig::resolve(None, &["schedule.total_steps=3".into()]).unwrap();
        let s = tiny_run.lr_schedule(None).unwrap();
        assert_eq!(s.warmup_iters, 1, "warmup is at least one step so lr(0) = 0");
        assert_eq!(s.lr(0), 0.0);
        assert!(RunConfig::resolve(None, &[]).unwrap().lr_schedule(None).is_err());
    }

    #[test]
    fn shipped_configs_resolve_to_the_spec_recipe() {
        let base = include_str!("../../configs/cae_base_300e.toml");
        let dalle = RunConfig::resolve(Some(base), &[]).unwrap();
        assert_eq!(dalle.model.target, TargetKind::Dalle);
        assert_eq!(dalle.tokenizer.weights.as_deref(), Some(std::path::Path::new("cae_ckpt/dalle_encoder.pth")));
        let c = RunConfig::resolve(Some(base), &["model.target=\"pixels\"".into()]).unwrap();
        assert_eq!(c.preset, Preset::Base);
        assert_eq!(c.model, CaeConfig { target: TargetKind::Pixels, ..CaeConfig::base() });
        assert_eq!(c.total_batch(), 2048);
        assert_eq!(c.peak_lr(), 1.5e-3);
        assert_eq!((c.optimizer.beta_1, c.optimizer.beta_2, c.optimizer.weight_decay), (0.9, 0.999, 0.05));
        assert_eq!(c.optimizer.clip_grad_norm, 3.0);
        assert_eq!(c.optimizer.no_decay, NoDecayRule::Names);
        let s = c.lr_schedule(Some(626)).unwrap();
        assert_eq!((s.warmup_iters, s.total_iters, s.min_lr), (6260, 187_800, 1e-5));
        assert_eq!((c.data.mask.num_masked, c.data.mask.min_num_patches), (75, 16));

        let tiny = include_str!("../../configs/cae_tiny.toml");
        let t = RunConfig::resolve(Some(tiny), &["model.target=\"pixels\"".into()]).unwrap();
        assert_eq!((t.model.embed_dim, t.model.img_size, t.model.num_heads), (192, 224, 3));
        assert_eq!(t.model.tokenizer, crate::model::DalleConfig::openai(), "full-size DALL-E tokenizer");
        assert!((t.peak_lr() - 1.5e-3 * 64.0 / 2048.0).abs() < 1e-15);

        let micro = RunConfig::resolve(Some(include_str!("../../configs/cae_micro.toml")), &[]).unwrap();
        let recipe =
            CaeConfig { target: TargetKind::Pixels, align_weight: 0.0, norm_pix_eps: 0.3, ..CaeConfig::micro() };
        assert_eq!(micro.model, recipe);
        assert_eq!(micro.peak_lr(), 1.5e-3);
    }
}
