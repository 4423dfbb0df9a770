//! The step loop of `trainer run` (the run's setup is in [`super::run`]).
//!
//! One optimizer step `t` (0-based; spec §2.2, §4):
//! 1. for each of `accumulation_steps` micro-batches: the next ready batch from the device
//!    feeder (the time blocked there is the step's `data_wait_seconds`), forward under the run's
//!    autocast ([`crate::amp`]), backward of `loss / k` (x the loss scale with f16 scaling);
//! 2. teacher hard copy (`update_teacher`), **before** the optimizer update;
//! 3. unscaling, global norm and clipping on the device, then AdamW with `lr(t)` (`lr(0) = 0`);
//! 4. the step's losses and gradient norm stay on the device ([`Pending`]) until they are read,
//!    all pending steps in one read: at `log_every` steps, checkpoints, the end and a stop. Then
//!    each step's JSONL line is written to `metrics.jsonl`, the Prometheus series are set, and
//!    a non-finite loss or gradient norm stops the run naming the first such step. With f16 loss
//!    scaling the step reads its four values at once to decide skip-or-apply (GradScaler reads
//!    its overflow flag every step too): one sync per step, none otherwise between log steps;
//! 5. a checkpoint every `checkpoint.every` steps, at the end, when the data ends and when a
//!    signal asked to stop; never of non-finite weights (checked in the same read).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use cae_pipeline::LoaderState;
use indicatif::ProgressBar;

use super::feeder::Feeder;
use super::step_log::StepLog;
use super::{HANG_ENV, RunOptions, RunSummary, Saver, say};
use crate::CaeError;
use crate::config::RunConfig;
use crate::metrics as m;
use crate::model::{Cae, CaeTargets};
use crate::optim::{CaeOptimizer, LrSchedule};
use crate::precision::{LossScaler, ScaleDecision};
use crate::readback::{self, read_f64s};

/// A completed step whose values may still be on the device.
struct Pending<I: Backend> {
    step: u64,
    lr: f64,
    /// `[loss, loss_main, loss_align, grad_norm]` (the norm unscaled, before clipping).
    values: Tensor<I, 1>,
    /// The values, once read (steps with loss scaling read them at once).
    known: Option<Vec<f64>>,
    /// Skipped on loss-scale overflow (no update).
    skipped: bool,
    images: usize,
    step_seconds: f64,
    data_wait: f64,
    epoch: u64,
    /// Host syncs during the step: its own (with loss scaling), and the read of the flush
    /// that ends it. (A checkpoint's weight read comes after its line is written: it is in
    /// Prometheus' `cae_train_host_syncs_total` only.)
    host_syncs: u64,
}

/// Number of non-finite values over every float parameter of `module`, as one device scalar
/// `[1]` (`None` for a module without parameters).
pub fn nonfinite_count<B: Backend, M: Module<B>>(module: &M) -> Option<Tensor<B, 1>> {
    struct V<B: Backend>(Option<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for V<B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let v = p.val();
            let bad = (v.clone().is_nan().float().sum() + v.is_inf().float().sum()).reshape([1]); // [1]
            self.0 = Some(match self.0.take() {
                Some(acc) => acc + bad,
                None => bad,
            });
        }
    }
    let mut v = V(None);
    module.visit(&mut v);
    v.0
}

/// The state of a run's step loop.
pub(super) struct StepLoop<'a, B: AutodiffBackend> {
    pub config: &'a RunConfig,
    pub opts: &'a RunOptions,
    pub saver: Saver<'a, B>,
    pub optimizer: CaeOptimizer<B, Cae<B>>,
    pub scaler: LossScaler,
    pub feeder: Feeder<B::InnerBackend>,
    pub schedule: LrSchedule,
    pub log: File,
    pub log_path: PathBuf,
    pub pb: ProgressBar,
    pub step: u64,
    pub total: u64,
    /// Loader state after the last batch a completed step consumed.
    pub last_resume: LoaderState,
    pub summary: RunSummary,
    /// Losses of this invocation's steps, in order (for the summary).
    pub losses: Vec<f64>,
    pending: Vec<Pending<B::InnerBackend>>,
    /// Step of the last checkpoint written (or resumed from).
    checkpointed: u64,
    sum_wait: f64,
    sum_step: f64,
}

impl<'a, B: AutodiffBackend> StepLoop<'a, B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &'a RunConfig,
        opts: &'a RunOptions,
        saver: Saver<'a, B>,
        optimizer: CaeOptimizer<B, Cae<B>>,
        scaler: LossScaler,
        feeder: Feeder<B::InnerBackend>,
        schedule: LrSchedule,
        log: (File, PathBuf),
        pb: ProgressBar,
        step: u64,
        last_resume: LoaderState,
        summary: RunSummary,
    ) -> Self {
        let total = schedule.total_iters as u64;
        Self {
            config,
            opts,
            saver,
            optimizer,
            scaler,
            feeder,
            schedule,
            log: log.0,
            log_path: log.1,
            pb,
            step,
            total,
            last_resume,
            summary,
            losses: Vec::new(),
            pending: Vec::new(),
            checkpointed: step,
            sum_wait: 0.0,
            sum_step: 0.0,
        }
    }

    /// Runs steps until the schedule ends, the data ends or a stop signal; then the summary.
    /// The loop owns `model` as a local: the optimizer then holds its parameters' only
    /// references and can update them in place.
    pub fn run(mut self, mut model: Cae<B>) -> Result<RunSummary, CaeError> {
        // A test hook, only in builds with feature `test-hooks`.
        let hang_after: Option<u64> =
            if cfg!(feature = "test-hooks") { std::env::var(HANG_ENV).ok().and_then(|v| v.parse().ok()) } else { None };
        let start_step = self.step;
        let dtype = self.config.precision.dtype;
        let accum = self.config.optimizer.accumulation_steps;
        while self.step < self.total {
            let step_start = Instant::now();
            let syncs_at_start = readback::syncs();
            let mut data_wait = 0.0;
            let mut acc = GradientsAccumulator::<Cae<B>>::new();
            let mut single: Option<GradientsParams> = None;
            let mut losses: Option<Tensor<B::InnerBackend, 1>> = None; // [3], mean over micro-batches
            let (mut images, mut epoch, mut data_ended) = (0usize, 0u64, false);
            let mut step_resume = self.last_resume;
            for _ in 0..accum {
                let batch = match self.feeder.next(&mut data_wait) {
                    Ok(Some(batch)) => batch,
                    Ok(None) => {
                        data_ended = true;
                        break;
                    }
                    // A fatal data error: the last completed step is consistent; keep it.
                    Err(e) => return Err(self.save_before_error(e, &model)),
                };
                let targets = match batch.targets {
                    CaeTargets::Tokens(t) => CaeTargets::Tokens(Tensor::from_inner(t)),
                    CaeTargets::Pixels(p) => CaeTargets::Pixels(Tensor::from_inner(p)),
                };
                let (x, vis, msk) = (
                    Tensor::from_inner(batch.images),
                    Tensor::from_inner(batch.visible),
                    Tensor::from_inner(batch.masked),
                );
                let out = crate::amp::autocast(dtype, || model.forward(x, vis, msk, &targets))?;
                let mut scaled = if accum == 1 { out.loss.clone() } else { out.loss.clone() / accum as f64 };
                if self.scaler.enabled {
                    scaled = scaled.mul_scalar(self.scaler.scale()); // f16 loss scaling (GradScaler)
                }
                let grads = GradientsParams::from_grads(scaled.backward(), &model);
                let v = Tensor::cat(vec![out.loss.inner(), out.loss_main.inner(), out.loss_align.inner()], 0); // [3]
                let v = if accum == 1 { v } else { v / accum as f64 };
                losses = Some(match losses {
                    Some(sum) => sum + v,
                    None => v,
                });
                images += batch.size;
                step_resume = batch.resume;
                epoch = batch.epoch;
                if accum == 1 {
                    single = Some(grads);
                } else {
                    acc.accumulate(&model, grads);
                }
            }
            let Some(losses) = losses else {
                say(&self.pb, "the data pipeline ended (data.epochs reached); stopping".into());
                break;
            };
            let grads = single.unwrap_or_else(|| acc.grads());
            let lr = self.schedule.lr(self.step as usize);
            model = model.update_teacher(); // spec §2.2: hard copy before the update
            let loss_scale = self.scaler.scale();
            let (grads, norm) = self.optimizer.unscale_and_clip(&model, grads, loss_scale);
            let values = Tensor::cat(vec![losses, norm], 0); // [4]
            let (known, applied) = if self.scaler.enabled {
                // GradScaler's decision needs the values now: this step's one host sync.
                let v = read_f64s(values.clone())?;
                let finite = v.iter().all(|x| x.is_finite());
                if finite {
                    model = self.optimizer.apply(lr, model, grads);
                }
                (Some(v), finite)
            } else {
                model = self.optimizer.apply(lr, model, grads);
                (None, true)
            };
            self.step += 1;
            self.last_resume = step_resume;
            let step = self.step;
            if let Some(v) = known.as_ref().filter(|_| self.scaler.enabled) {
                match self.scaler.update(applied) {
                    ScaleDecision::Apply => {}
                    ScaleDecision::Skip => {
                        ::metrics::counter!(m::SKIPPED_STEPS).increment(1);
                        say(
                            &self.pb,
                            format!(
                                "step {step}: {} overflowed at loss scale {loss_scale}; update skipped, scale -> {}",
                                if v[0].is_finite() { "the gradients" } else { "the loss" },
                                self.scaler.scale()
                            ),
                        );
                    }
                    ScaleDecision::Diverged => {
                        self.pb.abandon();
                        let (what, value) = if v[0].is_finite() { ("gradient norm", v[3]) } else { ("loss", v[0]) };
                        return Err(CaeError::NonFinite { what, step, value });
                    }
                }
                ::metrics::gauge!(m::LOSS_SCALE).set(self.scaler.scale());
            }
            self.pending.push(Pending {
                step,
                lr,
                values,
                known,
                skipped: !applied,
                images,
                step_seconds: step_start.elapsed().as_secs_f64(),
                data_wait,
                epoch,
                host_syncs: readback::syncs() - syncs_at_start,
            });
            self.pb.set_position(step);

            let stop = self.opts.stop.load(Ordering::SeqCst);
            let every = self.config.checkpoint.every;
            let checkpoint = stop || step == self.total || data_ended || (every > 0 && step.is_multiple_of(every));
            let log_step = step == start_step + 1 || step.is_multiple_of(self.config.log_every.max(1));
            if checkpoint {
                let bad = self.flush(nonfinite_count(&model.valid()))?;
                if bad.is_some_and(|n| n != 0.0) {
                    self.pb.abandon();
                    return Err(CaeError::NonFinite { what: "weights", step, value: f64::NAN });
                }
                let loss = self.summary.last_loss;
                let path = self.saver.save(step, self.last_resume, loss, &model, &self.optimizer, &self.scaler)?;
                self.checkpointed = step;
                if stop || step == self.total || data_ended {
                    say(&self.pb, format!("checkpoint {}", path.display()));
                }
                self.summary.last_checkpoint = Some(path);
            } else if log_step || hang_after == Some(step) {
                self.flush(None)?;
            }
            if hang_after == Some(step) {
                say_err!("hang after step {step}");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            if stop {
                self.summary.interrupted = step < self.total;
                say(&self.pb, format!("stopped by signal after step {step}"));
                break;
            }
            if data_ended {
                break;
            }
        }
        self.flush(None)?;
        self.pb.finish_and_clear();
        self.log.flush().map_err(CaeError::io(&self.log_path))?;
        let mut summary = self.summary;
        if !self.losses.is_empty() {
            let tenth = (self.losses.len() / 10).max(1);
            summary.early_mean_loss = Some(self.losses[..tenth].iter().sum::<f64>() / tenth as f64);
            let late = &self.losses[self.losses.len() - tenth..];
            summary.late_mean_loss = Some(late.iter().sum::<f64>() / tenth as f64);
        }
        summary.end_step = self.step;
        summary.data_wait_fraction = if self.sum_step > 0.0 { self.sum_wait / self.sum_step } else { 0.0 };
        Ok(summary)
    }

    /// Before a fatal data error ends the run: a checkpoint of the last completed step (its
    /// values checked finite first), unless one was written at that step. Returns the error to
    /// report (the data error, or the checkpoint's own failure after it).
    fn save_before_error(&mut self, error: CaeError, model: &Cae<B>) -> CaeError {
        self.pb.abandon();
        if self.step == self.checkpointed {
            return error;
        }
        let saved = self.flush(nonfinite_count(&model.valid())).and_then(|bad| {
            if bad.is_some_and(|n| n != 0.0) {
                return Err(CaeError::NonFinite { what: "weights", step: self.step, value: f64::NAN });
            }
            let loss = self.summary.last_loss;
            self.saver.save(self.step, self.last_resume, loss, model, &self.optimizer, &self.scaler)
        });
        match saved {
            Ok(path) => {
                say(&self.pb, format!("data error after step {}: checkpoint {}", self.step, path.display()));
                error
            }
            Err(e) => CaeError::Data(format!("{error}; and the checkpoint before stopping failed: {e}")),
        }
    }

    /// Reads every pending step's values (and `extra`, returned) in one host sync, then logs
    /// them in order. A non-finite loss, or gradient norm of an applied step, stops the run
    /// naming the first such step (the steps before it are logged).
    fn flush(&mut self, extra: Option<Tensor<B::InnerBackend, 1>>) -> Result<Option<f64>, CaeError> {
        let mut parts: Vec<Tensor<B::InnerBackend, 1>> =
            self.pending.iter().filter(|p| p.known.is_none()).map(|p| p.values.clone()).collect();
        let with_extra = extra.is_some();
        parts.extend(extra);
        let before = readback::syncs();
        let mut read = if parts.is_empty() { Vec::new() } else { read_f64s(Tensor::cat(parts, 0))? };
        let flush_syncs = readback::syncs() - before;
        let extra_value = if with_extra { read.pop() } else { None };
        let mut read = read.into_iter();
        let pending = std::mem::take(&mut self.pending);
        let last = pending.len();
        for (i, p) in pending.into_iter().enumerate() {
            let v = match &p.known {
                Some(v) => v.clone(),
                None => read.by_ref().take(4).collect(),
            };
            let [loss, loss_main, loss_align, norm] = [v[0], v[1], v[2], v[3]];
            let finite = loss.is_finite() && norm.is_finite();
            if !p.skipped && !finite {
                self.pb.abandon();
                let (what, value) = if loss.is_finite() { ("gradient norm", norm) } else { ("loss", loss) };
                return Err(CaeError::NonFinite { what, step: p.step, value });
            }
            // This read belongs to the step that asked for it, the last one.
            let host_syncs = p.host_syncs + if i + 1 == last { flush_syncs } else { 0 };
            self.log_step(&p, loss, loss_main, loss_align, if p.skipped { f64::NAN } else { norm }, host_syncs)?;
        }
        Ok(extra_value)
    }

    fn log_step(
        &mut self,
        p: &Pending<B::InnerBackend>,
        loss: f64,
        loss_main: f64,
        loss_align: f64,
        grad_norm: f64,
        host_syncs: u64,
    ) -> Result<(), CaeError> {
        let entry = StepLog {
            step: p.step,
            loss,
            loss_main,
            loss_align,
            lr: p.lr,
            grad_norm,
            step_seconds: p.step_seconds,
            data_wait_seconds: p.data_wait,
            images_per_second: p.images as f64 / p.step_seconds.max(1e-9),
            host_syncs,
        };
        let line = serde_json::to_string(&entry).map_err(|e| CaeError::Data(e.to_string()))?;
        writeln!(self.log, "{line}").map_err(CaeError::io(&self.log_path))?;
        ::metrics::counter!(m::STEPS).increment(1);
        ::metrics::counter!(m::IMAGES).increment(p.images as u64);
        ::metrics::gauge!(m::LOSS).set(loss);
        ::metrics::gauge!(m::LOSS_MAIN).set(loss_main);
        ::metrics::gauge!(m::LOSS_ALIGN).set(loss_align);
        ::metrics::gauge!(m::LR).set(p.lr);
        ::metrics::gauge!(m::GRAD_NORM).set(grad_norm);
        ::metrics::histogram!(m::STEP_SECONDS).record(p.step_seconds);
        ::metrics::histogram!(m::DATA_WAIT_SECONDS).record(p.data_wait);
        ::metrics::gauge!(m::IMAGES_PER_SECOND).set(entry.images_per_second);
        ::metrics::gauge!(m::EPOCH).set(p.epoch as f64);
        self.sum_wait += p.data_wait;
        self.sum_step += p.step_seconds;
        self.losses.push(loss);
        self.summary.first_loss.get_or_insert(loss);
        self.summary.last_loss = Some(loss);
        let step = p.step;
        self.pb.set_message(format!("loss {loss:.4} lr {:.2e} {:.0} img/s", p.lr, entry.images_per_second));
        if step == self.summary.start_step + 1
            || step.is_multiple_of(self.config.log_every.max(1))
            || step == self.total
        {
            say(
                &self.pb,
                format!(
                    "step {step:>6}/{}  loss {loss:.4} (main {loss_main:.4}, align {loss_align:.4})  lr {:.3e}  \
                     |g| {grad_norm:.3}  {:.0} img/s  data wait {:.1}%",
                    self.total,
                    p.lr,
                    entry.images_per_second,
                    100.0 * p.data_wait / p.step_seconds.max(1e-9)
                ),
            );
        }
        Ok(())
    }
}
