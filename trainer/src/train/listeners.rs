//! What hangs off the step loop (burn-train's learner events): the loop says what happened, each
//! listener does its one job with it — the step log file, the Prometheus series, the console
//! (progress bar and loss lines). Checkpoints are written by the loop itself
//! ([`super::steps`]), which alone holds the model; listeners hear of them.
//!
//! Two moments per step: [`Listener::on_step`] right after it completes, with what the host
//! knows (counters move every step, no device sync), and [`Listener::on_values`] once its
//! losses and gradient norm have been read from the device (every `log_every` steps, at
//! checkpoints, at the end: one read for all the steps since the last).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::say;
use super::step_log::StepLog;
use crate::CaeError;
use crate::metrics as m;

/// A completed optimizer step, as the host knows it when it completes.
#[derive(Clone, Debug)]
pub struct StepDone {
    pub step: u64,
    /// The rate the step used, `lr(step - 1)`.
    pub lr: f64,
    pub images: usize,
    pub step_seconds: f64,
    /// Seconds blocked on the device feeder, and the part of them the feeder spent preparing
    /// the batch (mostly the tokenizer).
    pub data_wait: f64,
    pub tokenizer_wait: f64,
    pub epoch: u64,
    /// Skipped on loss-scale overflow (no update).
    pub skipped: bool,
    /// Data parallel: seconds in the step's all-reduce.
    pub allreduce_seconds: Option<f64>,
}

/// A step's values, once read from the device.
#[derive(Clone, Debug)]
pub struct StepValues {
    pub done: StepDone,
    pub loss: f64,
    pub loss_main: f64,
    pub loss_align: f64,
    /// NaN for a skipped step.
    pub grad_norm: f64,
    /// Blocking device -> host reads during the step (its own, and the read that ended it).
    pub host_syncs: u64,
}

impl StepValues {
    fn images_per_second(&self) -> f64 {
        self.done.images as f64 / self.done.step_seconds.max(1e-9)
    }
}

/// Something that hears the loop's events.
pub trait Listener {
    /// Right after the step completes.
    fn on_step(&mut self, _s: &StepDone) {}
    /// Once the step's values are read, in step order.
    fn on_values(&mut self, _v: &StepValues) -> Result<(), CaeError> {
        Ok(())
    }
    /// After a checkpoint was written.
    fn on_checkpoint(&mut self, _step: u64, _path: &Path, _seconds: f64) {}
    /// The run's end (flush files).
    fn on_end(&mut self) -> Result<(), CaeError> {
        Ok(())
    }
}

/// `metrics.jsonl`: one line per step.
pub struct StepLogFile {
    pub file: File,
    pub path: PathBuf,
}

impl Listener for StepLogFile {
    fn on_values(&mut self, v: &StepValues) -> Result<(), CaeError> {
        let d = &v.done;
        let entry = StepLog {
            step: d.step,
            loss: v.loss,
            loss_main: v.loss_main,
            loss_align: v.loss_align,
            lr: d.lr,
            grad_norm: v.grad_norm,
            step_seconds: d.step_seconds,
            data_wait_seconds: d.data_wait,
            images_per_second: v.images_per_second(),
            host_syncs: v.host_syncs,
            allreduce_seconds: d.allreduce_seconds,
        };
        let line = serde_json::to_string(&entry).map_err(|e| CaeError::Data(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(CaeError::io(&self.path))
    }

    fn on_end(&mut self) -> Result<(), CaeError> {
        self.file.flush().map_err(CaeError::io(&self.path))
    }
}

/// The `cae_train_*` series.
pub struct Prometheus;

impl Listener for Prometheus {
    fn on_step(&mut self, s: &StepDone) {
        ::metrics::counter!(m::STEPS).increment(1);
        ::metrics::counter!(m::IMAGES).increment(s.images as u64);
        ::metrics::histogram!(m::STEP_SECONDS).record(s.step_seconds);
        ::metrics::histogram!(m::DATA_WAIT_SECONDS).record(s.data_wait);
        ::metrics::histogram!(m::TOKENIZER_WAIT_SECONDS).record(s.tokenizer_wait);
        ::metrics::gauge!(m::IMAGES_PER_SECOND).set(s.images as f64 / s.step_seconds.max(1e-9));
        ::metrics::gauge!(m::EPOCH).set(s.epoch as f64);
        ::metrics::gauge!(m::LR).set(s.lr);
        if s.skipped {
            ::metrics::counter!(m::SKIPPED_STEPS).increment(1);
        }
        if let Some(seconds) = s.allreduce_seconds {
            ::metrics::histogram!(m::ALLREDUCE_SECONDS).record(seconds);
        }
    }

    fn on_values(&mut self, v: &StepValues) -> Result<(), CaeError> {
        ::metrics::gauge!(m::LOSS).set(v.loss);
        ::metrics::gauge!(m::LOSS_MAIN).set(v.loss_main);
        ::metrics::gauge!(m::LOSS_ALIGN).set(v.loss_align);
        ::metrics::gauge!(m::GRAD_NORM).set(v.grad_norm);
        Ok(())
    }

    fn on_checkpoint(&mut self, _step: u64, _path: &Path, seconds: f64) {
        ::metrics::counter!(m::CHECKPOINTS).increment(1);
        ::metrics::histogram!(m::CHECKPOINT_SECONDS).record(seconds);
    }
}

/// The progress bar and the loss lines (every `log_every` steps, the first and the last).
pub struct Console {
    pub pb: ProgressBar,
    pub log_every: u64,
    pub first_step: u64,
    pub total: u64,
    /// Print the loss lines (rank 0 of a data-parallel run; every single-process run).
    pub loss_lines: bool,
}

impl Listener for Console {
    fn on_step(&mut self, s: &StepDone) {
        self.pb.set_position(s.step);
    }

    fn on_values(&mut self, v: &StepValues) -> Result<(), CaeError> {
        let (step, lr, ips) = (v.done.step, v.done.lr, v.images_per_second());
        self.pb.set_message(format!("loss {:.4} lr {lr:.2e} {ips:.0} img/s", v.loss));
        let due = step == self.first_step || step.is_multiple_of(self.log_every.max(1)) || step == self.total;
        if self.loss_lines && due {
            let pct = |x: f64| 100.0 * x / v.done.step_seconds.max(1e-9);
            say(
                &self.pb,
                format!(
                    "step {step:>6}/{}  loss {:.4} (main {:.4}, align {:.4})  lr {lr:.3e}  |g| {:.3}  {ips:.0} img/s  \
                     data wait {:.1}% (tokenizer {:.1}%)",
                    self.total,
                    v.loss,
                    v.loss_main,
                    v.loss_align,
                    v.grad_norm,
                    pct(v.done.data_wait),
                    pct(v.done.tokenizer_wait)
                ),
            );
        }
        Ok(())
    }

    fn on_end(&mut self) -> Result<(), CaeError> {
        self.pb.finish_and_clear();
        Ok(())
    }
}

/// The numbers of the run's summary: every step's loss (for the early and late means) and the
/// sums behind the data-wait fractions.
#[derive(Debug, Default)]
pub struct Totals {
    pub losses: Vec<f64>,
    pub wait: f64,
    pub tokenizer_wait: f64,
    pub step_seconds: f64,
}

impl Listener for Totals {
    fn on_values(&mut self, v: &StepValues) -> Result<(), CaeError> {
        self.losses.push(v.loss);
        self.wait += v.done.data_wait;
        self.tokenizer_wait += v.done.tokenizer_wait;
        self.step_seconds += v.done.step_seconds;
        Ok(())
    }
}
