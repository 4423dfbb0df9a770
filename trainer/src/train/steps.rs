//! The step loop of `trainer run` (the run's setup is in [`super::run`]).
//!
//! One optimizer step `t` (0-based; spec §2.2, §4):
//! 1. for each of `accumulation_steps` micro-batches: the next ready batch from the device
//!    feeder (the time blocked there is the step's `data_wait_seconds`; the part the feeder spent
//!    on the batch's targets is its tokenizer wait), forward under the run's
//!    autocast ([`crate::amp`]), backward of `loss / k` (x the loss scale with f16 scaling);
//! 2. teacher hard copy (`update_teacher`), **before** the optimizer update;
//! 3. unscaling, global norm and clipping on the device, then AdamW with `lr(t)` (`lr(0) = 0`);
//! 4. the step's losses and gradient norm stay on the device ([`Pending`]) until they are read,
//!    all pending steps in one read: at `log_every` steps, checkpoints, the end and a stop. Then
//!    the listeners ([`super::listeners`]) write each step's line to `metrics.jsonl`, set the
//!    Prometheus series and print the loss lines (counters move when the step completes), and
//!    a non-finite loss or gradient norm stops the run naming the first such step. With f16 loss
//!    scaling the step reads its four values at once to decide skip-or-apply (GradScaler reads
//!    its overflow flag every step too): one sync per step, none otherwise between log steps;
//! 5. a checkpoint every `checkpoint.every` steps, at the end, when the data ends and when a
//!    signal asked to stop; never of non-finite weights (checked in the same read).
//!
//! In a data-parallel run ([`crate::dist`]) the gradients of step 1 are summed over the ranks
//! between 1 and 2 ([`super::reduce`]: one all-reduce that also carries the stop requests, data
//! ends and failures), so every rank takes the same decisions after the same step. Rank 0
//! writes the step log and the checkpoints (with every rank's loader state, gathered).

use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use cae_pipeline::LoaderState;
use indicatif::ProgressBar;

use super::feeder::{DataWait, Feeder};
use super::listeners::{Console, Listener, Prometheus, StepDone, StepLogFile, StepValues, Totals};
use super::reduce::{GradReducer, LocalControl};
use super::{HANG_ENV, RunOptions, RunSummary, Saver, say};
use crate::CaeError;
use crate::config::RunConfig;
use crate::dist::Dist;
use crate::model::{Cae, CaeTargets};
use crate::optim::{CaeOptimizer, LrSchedule};
use crate::precision::{LossScaler, ScaleDecision};
use crate::readback::{self, read_f64s};

/// A completed step whose values may still be on the device.
struct Pending<I: Backend> {
    done: StepDone,
    /// `[loss, loss_main, loss_align, grad_norm]` (the norm unscaled, before clipping).
    values: Tensor<I, 1>,
    /// The values, once read (steps with loss scaling read them at once).
    known: Option<Vec<f64>>,
    /// Host syncs during the step (its own, with loss scaling); the read of the flush that
    /// ends it is added to the last step of the flush. (A checkpoint's weight read comes after
    /// its line is written: it is in Prometheus' `cae_train_host_syncs_total` only.)
    host_syncs: u64,
}

/// One optimizer step's accumulated forward and backward passes.
struct Accumulated<B: AutodiffBackend> {
    /// `None`: no batch (the data ended before the first micro-batch).
    grads: Option<GradientsParams>,
    /// `[loss, loss_main, loss_align]`, the mean over the micro-batches.
    losses: Option<Tensor<B::InnerBackend, 1>>,
    images: usize,
    epoch: u64,
    /// Loader state after the step's last batch.
    resume: LoaderState,
    wait: DataWait,
    /// The data ended during this step (it had fewer micro-batches).
    data_ended: bool,
    /// A fatal data error ended the step (this rank's, or in a data-parallel run another's).
    error: Option<CaeError>,
    /// Data parallel: the group's stop request (the signal's number), and the seconds spent in
    /// the all-reduce.
    group_stop: Option<i32>,
    allreduce_seconds: f64,
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

/// One micro-batch's forward (under the run's autocast) and backward: the loss is divided by
/// the micro-batches per step and multiplied by the loss scale before the backward.
pub(crate) struct MicroBatch<'m, B: AutodiffBackend> {
    pub model: &'m Cae<B>,
    pub dtype: crate::precision::Dtype,
    pub accumulation: usize,
    pub loss_scale: f64,
}

impl<B: AutodiffBackend> MicroBatch<'_, B> {
    /// The gradients and `[loss, loss_main, loss_align] / accumulation` (unscaled).
    pub fn run(
        &self,
        images: Tensor<B::InnerBackend, 4>,
        visible: Tensor<B::InnerBackend, 2, burn::tensor::Int>,
        masked: Tensor<B::InnerBackend, 2, burn::tensor::Int>,
        targets: CaeTargets<B::InnerBackend>,
    ) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>), CaeError> {
        let targets = match targets {
            CaeTargets::Tokens(t) => CaeTargets::Tokens(Tensor::from_inner(t)),
            CaeTargets::Pixels(p) => CaeTargets::Pixels(Tensor::from_inner(p)),
        };
        let (x, vis, msk) = (Tensor::from_inner(images), Tensor::from_inner(visible), Tensor::from_inner(masked));
        let out = crate::amp::autocast(self.dtype, || self.model.forward(x, vis, msk, &targets))?;
        let k = self.accumulation;
        let mut scaled = if k == 1 { out.loss.clone() } else { out.loss.clone() / k as f64 };
        if self.loss_scale != 1.0 {
            scaled = scaled.mul_scalar(self.loss_scale); // f16 loss scaling (GradScaler)
        }
        let grads = GradientsParams::from_grads(scaled.backward(), self.model);
        let v = Tensor::cat(vec![out.loss.inner(), out.loss_main.inner(), out.loss_align.inner()], 0); // [3]
        Ok((grads, if k == 1 { v } else { v / k as f64 }))
    }
}

/// A step's update up to AdamW: the teacher hard copy (spec §2.2: after the forward, before the
/// optimizer update), then unscaling by `loss_scale` and global-norm clipping (spec §4).
/// Returns the model, the gradients to apply and the unscaled pre-clipping norm `[1]`.
pub(crate) fn prepare_update<B: AutodiffBackend>(
    model: Cae<B>,
    optimizer: &CaeOptimizer<B, Cae<B>>,
    grads: GradientsParams,
    loss_scale: f64,
) -> (Cae<B>, GradientsParams, Tensor<B::InnerBackend, 1>) {
    let model = model.update_teacher();
    let (grads, norm) = optimizer.unscale_and_clip(&model, grads, loss_scale);
    (model, grads, norm)
}

/// Everything a step loop is made of (one struct, not a dozen arguments).
pub(super) struct LoopParts<'a, B: AutodiffBackend> {
    pub config: &'a RunConfig,
    pub opts: &'a RunOptions,
    pub saver: Saver<'a, B>,
    pub optimizer: CaeOptimizer<B, Cae<B>>,
    pub scaler: LossScaler,
    pub feeder: Feeder<B::InnerBackend>,
    pub schedule: LrSchedule,
    /// Rank 0's (the only rank that writes one).
    pub step_log: Option<StepLogFile>,
    pub pb: ProgressBar,
    pub dist: &'a Dist,
    pub device: B::Device,
    /// Micro-batches per optimizer step on this rank ([`RunConfig::local_accumulation`]).
    pub accumulation: usize,
    /// Completed steps when this invocation starts, and the loader state after them.
    pub step: u64,
    pub loader_state: LoaderState,
    pub summary: RunSummary,
}

/// The listeners of a run, each with its one job ([`super::listeners`]).
struct Listeners {
    log: Option<StepLogFile>,
    prometheus: Prometheus,
    console: Console,
    totals: Totals,
}

impl Listeners {
    fn each(&mut self) -> impl Iterator<Item = &mut dyn Listener> {
        let log = self.log.as_mut().map(|l| l as &mut dyn Listener);
        let rest: [&mut dyn Listener; 3] = [&mut self.prometheus, &mut self.console, &mut self.totals];
        log.into_iter().chain(rest)
    }
}

/// The state of a run's step loop.
pub(super) struct StepLoop<'a, B: AutodiffBackend> {
    config: &'a RunConfig,
    opts: &'a RunOptions,
    saver: Saver<'a, B>,
    optimizer: CaeOptimizer<B, Cae<B>>,
    scaler: LossScaler,
    feeder: Feeder<B::InnerBackend>,
    schedule: LrSchedule,
    listeners: Listeners,
    step: u64,
    total: u64,
    /// Loader state after the last batch a completed step consumed.
    last_resume: LoaderState,
    summary: RunSummary,
    pending: Vec<Pending<B::InnerBackend>>,
    /// Step of the last checkpoint written (or resumed from).
    checkpointed: u64,
    /// Test hook (feature `test-hooks`): hang after this step.
    hang_after: Option<u64>,
    dist: &'a Dist,
    device: B::Device,
    /// Micro-batches per optimizer step on this rank.
    accumulation: usize,
    reducer: GradReducer,
    /// The group's stop signal, once one stopped the run.
    stop_signal: Option<i32>,
}

impl<'a, B: AutodiffBackend> StepLoop<'a, B> {
    pub fn new(p: LoopParts<'a, B>) -> Self {
        let total = p.schedule.total_iters as u64;
        let console = Console {
            pb: p.pb,
            log_every: p.config.log_every,
            first_step: p.step + 1,
            total,
            loss_lines: p.dist.is_root() && !p.opts.quiet,
        };
        let hang_after =
            if cfg!(feature = "test-hooks") { std::env::var(HANG_ENV).ok().and_then(|v| v.parse().ok()) } else { None };
        Self {
            config: p.config,
            opts: p.opts,
            saver: p.saver,
            optimizer: p.optimizer,
            scaler: p.scaler,
            feeder: p.feeder,
            schedule: p.schedule,
            listeners: Listeners { log: p.step_log, prometheus: Prometheus, console, totals: Totals::default() },
            step: p.step,
            total,
            last_resume: p.loader_state,
            summary: p.summary,
            pending: Vec::new(),
            checkpointed: p.step,
            hang_after,
            dist: p.dist,
            device: p.device,
            accumulation: p.accumulation,
            reducer: GradReducer::default(),
            stop_signal: None,
        }
    }

    fn pb(&self) -> &ProgressBar {
        &self.listeners.console.pb
    }

    /// Runs steps until the schedule ends, the data ends or a stop signal; then the summary.
    /// The loop owns `model` as a local: the optimizer then holds its parameters' only
    /// references and can update them in place.
    pub fn run(mut self, mut model: Cae<B>) -> Result<RunSummary, CaeError> {
        if self.hang_after == Some(0) && self.step == 0 {
            self.hang(0); // before the first step: a scrape sees the series registered at start
        }
        self.dist.arm_watchdog(self.step);
        while self.step < self.total {
            self.dist.set_step(self.step + 1);
            let (started, syncs) = (Instant::now(), readback::syncs());
            let mut acc = self.accumulate(&model)?;
            if self.dist.is_parallel() {
                acc = self.reduce(&model, acc)?;
            }
            if let Some(e) = acc.error.take() {
                return Err(self.save_before_error(e, &model));
            }
            let Some(grads) = acc.grads.take() else {
                say(self.pb(), "the data pipeline ended (data.epochs reached); stopping".into());
                break;
            };
            let data_ended = acc.data_ended;
            let group_stop = acc.group_stop;
            model = self.update(model, grads, acc, started, syncs)?;
            let step = self.step;
            // A data-parallel run stops on the group's decision only (every rank after the same
            // step); a signal that arrives later is in the next step's all-reduce.
            let stop = match self.dist.is_parallel() {
                true => group_stop.is_some(),
                false => self.opts.stop.load(Ordering::SeqCst),
            };
            if stop {
                self.stop_signal = group_stop;
            }
            let last = stop || step == self.total || data_ended;
            let every = self.config.checkpoint.every;
            if last || (every > 0 && step.is_multiple_of(every)) {
                let path = self.checked_save(&model)?;
                if last && !self.opts.quiet && self.dist.is_root() {
                    say(self.pb(), format!("checkpoint {}", path.display()));
                }
            } else if step == self.summary.start_step + 1 || step.is_multiple_of(self.config.log_every.max(1)) {
                self.flush(None)?;
            }
            if self.hang_after == Some(step) {
                self.hang(step);
            }
            if stop {
                self.summary.interrupted = step < self.total;
                say(self.pb(), format!("stopped by signal after step {step}"));
                break;
            }
            if data_ended {
                break;
            }
        }
        if self.dist.is_parallel() {
            self.check_same_weights(&model)?;
        }
        self.finish()
    }

    /// Data parallel, at the end of an invocation: every rank's weights digest, printed, and
    /// checked to be the same on every rank (they are bit-identical by construction: the same
    /// mean gradients applied by the same code to the same start).
    fn check_same_weights(&mut self, model: &Cae<B>) -> Result<(), CaeError> {
        let bytes = crate::checkpoint::encode_record::<B, _>(model.clone().into_record())?;
        let digest = crate::dist::digest(&bytes);
        say(self.pb(), format!("rank {}: weights digest {digest:08x} after step {}", self.dist.rank, self.step));
        if !self.dist.same_everywhere(digest) {
            return Err(CaeError::Data(format!(
                "rank {}: the weights differ between ranks after step {} (digest {digest:08x} here)",
                self.dist.rank, self.step
            )));
        }
        Ok(())
    }

    /// The forward and backward passes of one optimizer step over this rank's micro-batches
    /// (no gradients: the data ended before the first). A fatal data error is returned in the
    /// step (the loop keeps the last completed step: [`Self::save_before_error`]).
    fn accumulate(&mut self, model: &Cae<B>) -> Result<Accumulated<B>, CaeError> {
        let accum = self.accumulation;
        let mut wait = DataWait::default();
        let mut error = None;
        let mut summed = GradientsAccumulator::<Cae<B>>::new();
        let mut single: Option<GradientsParams> = None;
        let mut losses: Option<Tensor<B::InnerBackend, 1>> = None; // [3], mean over micro-batches
        let (mut images, mut epoch, mut resume, mut data_ended) = (0, 0, self.last_resume, false);
        for _ in 0..accum {
            let batch = match self.feeder.next(&mut wait) {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    data_ended = true;
                    break;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            let scale = if self.scaler.enabled { self.scaler.scale() } else { 1.0 };
            let pass = MicroBatch { model, dtype: self.config.precision.dtype, accumulation: accum, loss_scale: scale };
            let (grads, v) = pass.run(batch.images, batch.visible, batch.masked, batch.targets)?;
            losses = Some(match losses {
                Some(sum) => sum + v,
                None => v,
            });
            (images, epoch, resume) = (images + batch.size, batch.epoch, batch.resume);
            match accum {
                1 => single = Some(grads),
                _ => summed.accumulate(model, grads),
            }
        }
        let grads = losses.as_ref().map(|_| single.unwrap_or_else(|| summed.grads()));
        Ok(Accumulated {
            grads,
            losses,
            images,
            epoch,
            resume,
            wait,
            data_ended,
            error,
            group_stop: None,
            allreduce_seconds: 0.0,
        })
    }

    /// Data parallel: this rank's gradients and control values summed with every other rank's
    /// ([`super::reduce`]); the step then carries the group's mean gradients and losses, its
    /// images, and its decisions (stop, data ended, a rank's data failed).
    fn reduce(&mut self, model: &Cae<B>, mut acc: Accumulated<B>) -> Result<Accumulated<B>, CaeError> {
        let own_signal = self.opts.stop.load(Ordering::SeqCst).then(|| self.opts.signal.load(Ordering::SeqCst) as i32);
        let local = LocalControl {
            images: acc.images,
            stop_signal: own_signal,
            data_ended: acc.data_ended,
            failed: acc.error.is_some(),
            no_batch: acc.grads.is_none(),
        };
        let (grads, group, seconds) =
            self.reducer.reduce::<B, _>(self.dist, model, acc.grads.take(), acc.losses.take(), local, &self.device)?;
        acc.allreduce_seconds = seconds;
        acc.images = group.images;
        acc.data_ended = group.ended_ranks > 0;
        acc.group_stop = group.stop_signal;
        if group.failed_ranks > 0 && acc.error.is_none() {
            acc.error = Some(CaeError::Data(format!(
                "{} other rank(s) of the group stopped on a data error (their log names it)",
                group.failed_ranks
            )));
        }
        if group.ranks_without_batch == 0 {
            acc.grads = Some(grads);
            let l = group.losses.map(|x| x as f32);
            acc.losses = Some(Tensor::from_floats(l, &self.device));
        }
        Ok(acc)
    }

    /// Teacher copy (spec §2.2: before the update), unscaling and clipping, then AdamW with
    /// `lr(t)` — or, with f16 loss scaling, GradScaler's skip-or-apply. Completes the step: its
    /// values wait on the device, the listeners hear of it.
    fn update(
        &mut self,
        model: Cae<B>,
        grads: GradientsParams,
        acc: Accumulated<B>,
        started: Instant,
        syncs: u64,
    ) -> Result<Cae<B>, CaeError> {
        let lr = self.schedule.lr(self.step as usize);
        let loss_scale = self.scaler.scale();
        let (mut model, grads, norm) = prepare_update(model, &self.optimizer, grads, loss_scale);
        let losses = acc.losses.unwrap_or_else(|| Tensor::zeros([3], &self.device));
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
        self.last_resume = acc.resume;
        if let Some(v) = &known {
            self.scale_decision(applied, loss_scale, v)?;
        }
        let done = StepDone {
            step: self.step,
            lr,
            images: acc.images,
            step_seconds: started.elapsed().as_secs_f64(),
            data_wait: acc.wait.total,
            tokenizer_wait: acc.wait.tokenizer,
            epoch: acc.epoch,
            skipped: !applied,
            allreduce_seconds: self.dist.is_parallel().then_some(acc.allreduce_seconds),
        };
        for l in self.listeners.each() {
            l.on_step(&done);
        }
        self.pending.push(Pending { done, values, known, host_syncs: readback::syncs() - syncs });
        Ok(model)
    }

    /// The loss scaler's verdict on a step whose values were read (f16 scaling only).
    fn scale_decision(&mut self, applied: bool, loss_scale: f64, v: &[f64]) -> Result<(), CaeError> {
        let step = self.step;
        match self.scaler.update(applied) {
            ScaleDecision::Apply => {}
            ScaleDecision::Skip => say(
                self.pb(),
                format!(
                    "step {step}: {} overflowed at loss scale {loss_scale}; update skipped, scale -> {}",
                    if v[0].is_finite() { "the gradients" } else { "the loss" },
                    self.scaler.scale()
                ),
            ),
            ScaleDecision::Diverged => {
                self.pb().abandon();
                let (what, value) = if v[0].is_finite() { ("gradient norm", v[3]) } else { ("loss", v[0]) };
                return Err(CaeError::NonFinite { what, step, value });
            }
        }
        ::metrics::gauge!(crate::metrics::LOSS_SCALE).set(self.scaler.scale());
        Ok(())
    }

    /// The one way a checkpoint is written: every pending value and the weights' finiteness
    /// read at once, then — only if all are finite — the checkpoint of the last completed step.
    /// Data parallel: every rank calls it after the same step; the loader states are gathered
    /// and rank 0 writes (the others return the path it writes).
    fn checked_save(&mut self, model: &Cae<B>) -> Result<std::path::PathBuf, CaeError> {
        let loaders = match self.dist.is_parallel() {
            true => self.dist.gather_loader_states(self.last_resume)?,
            false => Vec::new(),
        };
        let bad = self.flush(nonfinite_count(&model.valid()))?;
        if bad.is_some_and(|n| n != 0.0) {
            self.pb().abandon();
            return Err(CaeError::NonFinite { what: "weights", step: self.step, value: f64::NAN });
        }
        if !self.dist.is_root() {
            self.checkpointed = self.step;
            return Ok(self.saver.path_of(self.step));
        }
        let t = Instant::now();
        let loss = self.summary.last_loss;
        let state = super::SavedState { step: self.step, loader: self.last_resume, rank_loaders: loaders, loss };
        let path = self.saver.save(&state, model, &self.optimizer, &self.scaler)?;
        self.checkpointed = self.step;
        for l in self.listeners.each() {
            l.on_checkpoint(self.step, &path, t.elapsed().as_secs_f64());
        }
        self.summary.last_checkpoint = Some(path.clone());
        Ok(path)
    }

    /// Before a fatal data error ends the run: a checkpoint of the last completed step, unless
    /// one was written at that step. Returns the error to report (the data error, or the
    /// checkpoint's own failure after it).
    fn save_before_error(&mut self, error: CaeError, model: &Cae<B>) -> CaeError {
        self.pb().abandon();
        if self.step == self.checkpointed {
            return error;
        }
        match self.checked_save(model) {
            Ok(path) => {
                say(self.pb(), format!("data error after step {}: checkpoint {}", self.step, path.display()));
                error
            }
            Err(e) => CaeError::Data(format!("{error}; and the checkpoint before stopping failed: {e}")),
        }
    }

    /// Reads every pending step's values (and `extra`, returned) in one host sync, then hands
    /// them to the listeners in order. A non-finite loss, or gradient norm of an applied step,
    /// stops the run naming the first such step (the steps before it are logged).
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
            let v: Vec<f64> = p.known.unwrap_or_else(|| read.by_ref().take(4).collect());
            let [loss, loss_main, loss_align, norm] = [v[0], v[1], v[2], v[3]];
            let finite = loss.is_finite() && norm.is_finite();
            if !p.done.skipped && !finite {
                self.pb().abandon();
                let (what, value) = if loss.is_finite() { ("gradient norm", norm) } else { ("loss", loss) };
                return Err(CaeError::NonFinite { what, step: p.done.step, value });
            }
            // This read belongs to the step that asked for it, the last one.
            let host_syncs = p.host_syncs + if i + 1 == last { flush_syncs } else { 0 };
            let grad_norm = if p.done.skipped { f64::NAN } else { norm };
            let values = StepValues { done: p.done, loss, loss_main, loss_align, grad_norm, host_syncs };
            for l in self.listeners.each() {
                l.on_values(&values)?;
            }
            self.summary.first_loss.get_or_insert(loss);
            self.summary.last_loss = Some(loss);
        }
        Ok(extra_value)
    }

    /// The test hook: prints `hang after step N` and sleeps for ever (a test kills the process).
    fn hang(&mut self, step: u64) -> ! {
        let _ = self.flush(None);
        say_err!("hang after step {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    /// The last values read, the files flushed, the summary.
    fn finish(mut self) -> Result<RunSummary, CaeError> {
        self.dist.disarm_watchdog();
        self.flush(None)?;
        for l in self.listeners.each() {
            l.on_end()?;
        }
        let t = &self.listeners.totals;
        let mut summary = self.summary;
        if !t.losses.is_empty() {
            let tenth = (t.losses.len() / 10).max(1);
            summary.early_mean_loss = Some(t.losses[..tenth].iter().sum::<f64>() / tenth as f64);
            summary.late_mean_loss = Some(t.losses[t.losses.len() - tenth..].iter().sum::<f64>() / tenth as f64);
        }
        summary.end_step = self.step;
        summary.stop_signal = self.stop_signal;
        if t.step_seconds > 0.0 {
            summary.data_wait_fraction = t.wait / t.step_seconds;
            summary.tokenizer_wait_fraction = t.tokenizer_wait / t.step_seconds;
        }
        Ok(summary)
    }
}
